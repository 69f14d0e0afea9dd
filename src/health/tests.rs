use super::*;
use crate::metrics::Metrics;
use crate::policy::Verdict;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

fn endpoint(status: Status) -> Endpoint {
    Endpoint {
        status: SharedStatus::new(status),
        metrics: Arc::new(Metrics::new()),
        started: Instant::now(),
        counters: None,
        blocked: SharedBlocked::default(),
        dns: None,
        app_logs: None,
    }
}

fn ready_status() -> Status {
    let mut status = Status::new(true, Duration::from_secs(10));
    status.last_pass = Some(Instant::now());
    status.last_pass_wall = Some(SystemTime::now());
    status.in_sync = true;
    status.restricted = 2;
    status.exempt = 1;
    let decision = Arc::new(Decision {
        ipv6: Vec::new(),
        handle: Some("h1".into()),
        ip: Some("10.255.0.2".parse().expect("literal")),
        host_ifindex: Some(5),
        host_interface: Some("s-010255000002".into()),
        workload: Some("app".into()),
        app_id: Some("a".into()),
        space_id: None,
        org_id: None,
        log_index: None,
        verdict: Verdict::Restricted,
        reason: "running app container".into(),
    });
    status.decisions.insert(decision.key(), decision);
    status
}

fn get(target: &str, endpoint: &Endpoint) -> Response {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    route(&Method::GET, path, query, endpoint)
}

#[test]
fn ready_agent_answers_200_everywhere() {
    let ep = endpoint(ready_status());
    for path in [
        "/healthz",
        "/readyz",
        "/status",
        "/metrics",
        "/readyz?verbose=1",
    ] {
        assert_eq!(get(path, &ep).code, 200, "{path}");
    }
    let body: HealthBody = serde_json::from_slice(&get("/readyz", &ep).body).expect("json");
    assert_eq!(body.status, "ready");
    assert_eq!(
        body.containers,
        Counts {
            restricted: 2,
            exempt: 1
        }
    );
    assert!(body.last_reconcile.expect("time").ends_with('Z'));
    let status: StatusBody = serde_json::from_slice(&get("/status", &ep).body).expect("json");
    assert_eq!(status.containers.len(), 1);
}

#[test]
fn not_ready_before_first_pass_and_after_errors() {
    let ep = endpoint(Status::new(true, Duration::from_secs(10)));
    let response = get("/readyz", &ep);
    assert_eq!(response.code, 503);
    let body: HealthBody = serde_json::from_slice(&response.body).expect("json");
    assert!(body.reason.expect("reason").contains("first reconcile"));
    // Alive while starting up.
    assert_eq!(get("/healthz", &ep).code, 200);

    let mut failing = ready_status();
    failing.last_error = Some("metadata store is not valid JSON".into());
    let ep = endpoint(failing);
    assert_eq!(get("/readyz", &ep).code, 503);
    assert_eq!(get("/healthz", &ep).code, 200);
}

#[test]
fn stalled_loop_is_not_live() {
    let mut status = ready_status();
    status.reconcile_interval = Duration::from_millis(100);
    status.last_pass = Some(Instant::now() - Duration::from_secs(1));
    let ep = endpoint(status);
    let response = get("/healthz", &ep);
    assert_eq!(response.code, 503);
    let body: HealthBody = serde_json::from_slice(&response.body).expect("json");
    assert_eq!(body.status, "unhealthy");
    let response = get("/readyz", &ep);
    assert_eq!(response.code, 503);
    let body: HealthBody = serde_json::from_slice(&response.body).expect("json");
    assert!(body.reason.expect("reason").contains("stalled"));
}

#[test]
fn bad_requests_get_4xx() {
    let ep = endpoint(ready_status());
    // Malformed heads, versions and sizes are hyper's to answer (the server test below and the
    // root suite); the routes answer methods and paths.
    assert_eq!(route(&Method::POST, "/healthz", "", &ep).code, 405);
    assert_eq!(route(&Method::DELETE, "/status", "", &ep).code, 405);
    assert_eq!(route(&Method::GET, "/nope", "", &ep).code, 404);
    let head = route(&Method::HEAD, "/healthz", "", &ep);
    assert_eq!(head.code, 200);
    let wire = String::from_utf8(head.to_bytes()).expect("utf8");
    let get = route(&Method::GET, "/healthz", "", &ep);
    assert!(
        wire.contains(&format!("Content-Length: {}\r\n", get.body.len())),
        "{wire}"
    );
    assert!(wire.ends_with("\r\n\r\n"), "{wire}");
}

#[test]
fn only_metrics_and_blocked_requests_read_the_kernel_counters() {
    assert!(reads_counters(&Method::GET, "/metrics"));
    assert!(reads_counters(&Method::HEAD, "/metrics"));
    assert!(reads_counters(&Method::GET, "/blocked"));
    assert!(!reads_counters(&Method::GET, "/metricsx"));
    assert!(!reads_counters(&Method::POST, "/metrics"));
    assert!(!reads_counters(&Method::GET, "/healthz"));
}

#[test]
fn blocked_answers_the_summary_with_filters() {
    use crate::attribution::{BlockedBody, Packet};
    use crate::dataplane::AgentTable;
    let mut status = ready_status();
    status.mode = Mode::Audit;
    let ep = endpoint(status.clone());
    {
        let mut b = ep.blocked.lock();
        b.set_policy(
            Mode::Audit,
            &AgentTable::ALL,
            &status
                .decisions
                .values()
                .map(|d| (**d).clone())
                .collect::<Vec<_>>(),
            &Default::default(),
        );
        b.ingest(
            &Packet {
                table: Some(AgentTable::Owned),
                ifindex: Some(5),
                src: "10.255.0.2".parse().expect("literal"),
                dst: "203.0.113.10".parse().expect("literal"),
                protocol: 17,
                dst_port: Some(53),
                seq: Some(1),
            },
            SystemTime::now(),
        );
    }
    let body: BlockedBody = serde_json::from_slice(&get("/blocked", &ep).body).expect("json");
    assert_eq!(body.mode, Mode::Audit);
    assert_eq!(body.attempts.len(), 1);
    assert_eq!(body.attempts[0].app_id, "a");
    assert_eq!(body.attempts[0].protocol, "udp");
    // An empty value is no filter.
    let filtered: BlockedBody =
        serde_json::from_slice(&get("/blocked?app_id=a&org_id=", &ep).body).expect("json");
    assert_eq!(filtered.attempts.len(), 1);
    let filtered: BlockedBody =
        serde_json::from_slice(&get("/blocked?app_id=%61", &ep).body).expect("json");
    assert_eq!(filtered.attempts.len(), 1);
    let other: BlockedBody =
        serde_json::from_slice(&get("/blocked?space_id=x", &ep).body).expect("json");
    assert!(other.attempts.is_empty());
    let bad = get("/blocked?app=a", &ep);
    assert_eq!(bad.code, 400);
    assert!(String::from_utf8_lossy(&bad.body).contains("\"app\""));
    assert_eq!(get("/blocked?app_id=%zz", &ep).code, 400);
    // The mode is in readiness and status too.
    let ready: HealthBody = serde_json::from_slice(&get("/readyz", &ep).body).expect("json");
    assert_eq!(ready.mode, Mode::Audit);
    let listing: StatusBody = serde_json::from_slice(&get("/status", &ep).body).expect("json");
    assert_eq!(listing.mode, Mode::Audit);
}

#[test]
fn status_never_leaks_other_metadata() {
    let ep = endpoint(ready_status());
    let text = String::from_utf8(get("/status", &ep).body).expect("utf8");
    assert!(!text.contains("log_config"));
    assert!(!text.contains("policy_group_id"));
    assert!(!text.contains("ports"));
}

#[tokio::test]
async fn server_limits_request_size_and_survives() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(serve_on(listener, endpoint(ready_status())));

    let mut big = TcpStream::connect(addr).await.expect("connect");
    let junk = format!(
        "GET /healthz HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(MAX_REQUEST_BYTES * 2)
    );
    let _ = big.write_all(junk.as_bytes()).await;
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    let mut ok = TcpStream::connect(addr).await.expect("connect");
    ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    ok.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains("\"status\": \"ok\""), "{answer}");
    server.abort();
}

#[tokio::test]
async fn a_full_house_closes_its_oldest_waiting_connection_never_one_being_answered() {
    let mut open = Connections::default();
    let mut tasks = Vec::new();
    for i in 0..MAX_CONNECTIONS {
        assert!(open.make_room(), "room for connection {i}");
        let task = tokio::spawn(std::future::pending::<()>());
        // The two oldest are being answered; the rest wait for their requests.
        let waiting = Arc::new(AtomicBool::new(i >= 2));
        open.add(task.abort_handle(), waiting);
        tasks.push(task);
    }
    assert!(open.make_room(), "a new connection is let in");
    tokio::task::yield_now().await;
    let closed: Vec<usize> = (0..tasks.len())
        .filter(|i| tasks[*i].is_finished())
        .collect();
    assert_eq!(
        closed,
        [2],
        "the oldest waiting one is closed, not those being answered"
    );
    assert_eq!(open.evicted, 1);
    // Every one being answered: a new connection is refused instead.
    let mut busy = Connections::default();
    for _ in 0..MAX_CONNECTIONS {
        let task = tokio::spawn(std::future::pending::<()>());
        busy.add(task.abort_handle(), Arc::new(AtomicBool::new(false)));
    }
    assert!(!busy.make_room());
    // Finished connections free their place.
    let done = tokio::spawn(async {});
    let mut one = Connections::default();
    one.add(done.abort_handle(), Arc::new(AtomicBool::new(true)));
    let _ = done.await;
    assert!(one.make_room());
    assert!(one.open.is_empty());
    for task in tasks {
        task.abort();
    }
}
