//! The read-only HTTP endpoint: liveness, readiness, container status, blocked attempts and
//! metrics.
//!
//! Deliberately small: HTTP/1.1, GET (and HEAD) only, one request per connection, bounded
//! request size, bounded time to send the request and to take the response, and a cap on
//! concurrent connections. Handlers copy what they need from the status under a short read lock,
//! so no client can slow the reconcile loop. Nothing from the metadata store is exposed beyond
//! handle, IP, interface, workload and the app/space/org ids (never `log_config`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::attribution::{Filter, SharedBlocked};
use crate::config::Mode;
use crate::metrics::{self, SharedMetrics};
use crate::policy::Decision;
use crate::status::{SharedStatus, Status};

/// Largest request head accepted (request line + headers).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client has to send its whole request head (also the idle timeout).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed without an answer.
pub const MAX_CONNECTIONS: usize = 32;
/// How often to retry binding when the listen address is unavailable.
pub const BIND_RETRY: Duration = Duration::from_secs(10);

/// Container counts in health bodies.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub restricted: usize,
    pub exempt: usize,
}

/// Body of `/healthz` and `/readyz`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct HealthBody {
    /// "ok"/"unhealthy" (healthz) or "ready"/"not ready" (readyz).
    pub status: String,
    pub enabled: bool,
    /// RFC 3339 time of the last completed pass.
    pub last_reconcile: Option<String>,
    pub last_error: Option<String>,
    pub containers: Counts,
    pub drift_repairs: u64,
    /// Whether the owned table (NFT_TABLE_F_OWNER) guards the rules against other processes;
    /// false on a kernel that refused it, null before the first pass.
    #[serde(default)]
    pub tamper_protection: Option<bool>,
    /// Whether IPv6 is enabled in the cell's network namespace (the IPv6 rules are installed
    /// either way; with IPv6 off there is nothing for them to see).
    #[serde(default)]
    pub ipv6_in_use: bool,
    /// Why not healthy or not ready; absent when all is well.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// `enforce` or `audit`.
    #[serde(default)]
    pub mode: Mode,
    /// The DNS filter, when `[dns]` is enabled.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dns: Option<crate::dns::DnsHealthBody>,
}

/// Body of `/status`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct StatusBody {
    pub enabled: bool,
    /// As in [`HealthBody`].
    #[serde(default)]
    pub tamper_protection: Option<bool>,
    /// As in [`HealthBody`].
    #[serde(default)]
    pub ipv6_in_use: bool,
    pub mode: Mode,
    pub containers: Vec<Decision>,
}

/// Everything a handler needs.
#[derive(Clone)]
pub struct Endpoint {
    pub status: SharedStatus,
    pub metrics: SharedMetrics,
    /// When the agent started, for liveness before the first pass.
    pub started: Instant,
    /// Reads the kernel's reject counters when /metrics is scraped (None: never).
    pub counters: Option<CounterReader>,
    /// Blocked-attempt attribution, for `/blocked`.
    pub blocked: SharedBlocked,
    /// The DNS filter's health (None: `[dns]` disabled).
    pub dns: Option<crate::dns::SharedDnsHealth>,
}

/// Reads the reject counters for a scrape, at most once per [`COUNTER_REFRESH`]: passes that
/// change nothing do not list the table, so a scrape asks the kernel itself.
#[derive(Clone, Default)]
pub struct CounterReader {
    last: Arc<tokio::sync::Mutex<Option<Instant>>>,
}

/// Minimum time between two counter reads caused by scrapes.
pub const COUNTER_REFRESH: Duration = Duration::from_millis(500);
/// Longest a scrape waits for the kernel's counters.
pub const COUNTER_READ_TIMEOUT: Duration = Duration::from_millis(500);

impl CounterReader {
    pub fn new() -> CounterReader {
        CounterReader::default()
    }

    async fn refresh(&self, metrics: &crate::metrics::Metrics, blocked: &SharedBlocked) {
        // One read at a time; a scrape that finds one under way serves what is known.
        let Ok(mut last) = self.last.try_lock() else {
            return;
        };
        if last.is_some_and(|at| at.elapsed() < COUNTER_REFRESH) {
            return;
        }
        *last = Some(Instant::now());
        // A slow kernel must not hold the scrape: serve the last known totals instead.
        let read = crate::dataplane::read_counters();
        match tokio::time::timeout(COUNTER_READ_TIMEOUT, read).await {
            Ok(Ok(tables)) => {
                for (table, (rejected, reported)) in tables {
                    metrics.observe_rejected(table, rejected);
                    let (growth, suppressed) = {
                        let mut blocked = blocked.lock();
                        let growth = blocked.observe_counters(table, reported);
                        (growth, blocked.suppressed)
                    };
                    metrics.record_blocked(growth, suppressed);
                }
            }
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "cannot read reject counters for a scrape")
            }
            Err(_) => tracing::debug!("reading reject counters for a scrape timed out"),
        }
    }
}

/// Binds `addr` (retrying while it is unavailable) and serves until the task is dropped.
pub async fn serve(addr: SocketAddr, endpoint: Endpoint) {
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => break listener,
            Err(err) => {
                tracing::error!(%addr, error = %err, retry_in = ?BIND_RETRY,
                    "cannot bind health endpoint; enforcement continues without it");
                tokio::time::sleep(BIND_RETRY).await;
            }
        }
    };
    match listener.local_addr() {
        Ok(bound) => tracing::info!(addr = %bound, "health endpoint listening"),
        Err(_) => tracing::info!(%addr, "health endpoint listening"),
    }
    serve_on(listener, endpoint).await;
}

/// Serves on an already bound listener (tests bind 127.0.0.1:0).
pub async fn serve_on(listener: TcpListener, endpoint: Endpoint) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                tracing::debug!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many health connections; closing");
            continue;
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            handle(stream, &endpoint).await;
            drop(permit);
        });
    }
}

async fn handle(mut stream: TcpStream, endpoint: &Endpoint) {
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => Response::text(408, "request timeout\n"),
        Ok(Err(response)) => response,
        Ok(Ok(head)) => {
            if let Some(reader) = &endpoint.counters
                && reads_counters(&head)
            {
                reader.refresh(&endpoint.metrics, &endpoint.blocked).await;
            }
            route(&head, endpoint)
        }
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&response.to_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Reads up to the blank line ending the head; errors are ready-made 4xx responses.
async fn read_head(stream: &mut TcpStream) -> Result<String, Response> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| Response::text(400, "bad request\n"))?;
        if n == 0 {
            return Err(Response::text(400, "incomplete request\n"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let end = find_head_end(&buf);
        // The limit applies to the head including its blank line, wherever a read ends.
        if end.map_or(buf.len(), |end| end + 4) > MAX_REQUEST_BYTES {
            return Err(Response::text(431, "request header fields too large\n"));
        }
        if let Some(end) = end {
            buf.truncate(end);
            return String::from_utf8(buf)
                .map_err(|_| Response::text(400, "request is not UTF-8\n"));
        }
    }
}

/// `/metrics` and `/blocked` answer with the kernel's current counters (suppressed packets).
fn reads_counters(head: &str) -> bool {
    let mut words = head.split(' ');
    matches!(words.next(), Some("GET" | "HEAD"))
        && words
            .next()
            .is_some_and(|target| matches!(target.split('?').next(), Some("/metrics" | "/blocked")))
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// Routes a request head to its response. Pure apart from reading the shared status.
pub fn route(head: &str, endpoint: &Endpoint) -> Response {
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "malformed request line\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::text(505, "HTTP/1.x only\n");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            return Response::text(405, "only GET is supported\n")
                .with_header("Allow", "GET, HEAD");
        }
    };
    let path = target.split('?').next().unwrap_or_default();
    let response = match path {
        "/healthz" => healthz(endpoint),
        "/readyz" => readyz(endpoint),
        "/status" => status(endpoint),
        "/blocked" => blocked(endpoint, target.split_once('?').map_or("", |(_, q)| q)),
        "/metrics" => Response {
            code: 200,
            content_type: metrics::CONTENT_TYPE,
            body: endpoint.metrics.encode().into_bytes(),
            extra_headers: Vec::new(),
            head_only: false,
        },
        _ => Response::text(
            404,
            "not found: try /healthz, /readyz, /status, /blocked or /metrics\n",
        ),
    };
    if head_only {
        response.without_body()
    } else {
        response
    }
}

fn health_body(
    status: &Status,
    label: &str,
    reason: Option<String>,
    dns: Option<&crate::dns::SharedDnsHealth>,
) -> HealthBody {
    HealthBody {
        status: label.to_string(),
        enabled: status.enabled,
        last_reconcile: status.last_pass_wall.map(rfc3339),
        last_error: status.last_error.clone(),
        containers: Counts {
            restricted: status.restricted,
            exempt: status.exempt,
        },
        drift_repairs: status.drift_repairs,
        tamper_protection: status.tamper_protection,
        ipv6_in_use: status.ipv6_in_use,
        reason,
        mode: status.mode,
        dns: dns.map(|d| d.body()),
    }
}

fn healthz(endpoint: &Endpoint) -> Response {
    let status = endpoint.status.read();
    if status.live(Instant::now(), endpoint.started) {
        Response::json(
            200,
            &health_body(&status, "ok", None, endpoint.dns.as_ref()),
        )
    } else {
        let reason = format!(
            "no reconcile pass completed within {}",
            humantime::format_duration(status.reconcile_interval * 3)
        );
        Response::json(
            503,
            &health_body(&status, "unhealthy", Some(reason), endpoint.dns.as_ref()),
        )
    }
}

fn readyz(endpoint: &Endpoint) -> Response {
    let status = endpoint.status.read();
    // A stalled loop is not ready either: its last verdict on the kernel may be stale.
    let stalled = (!status.live(Instant::now(), endpoint.started) && status.last_pass.is_some())
        .then(|| "reconcile loop has stalled".to_string());
    // The DNS filter not listening, or its upstream not answering, is not ready either:
    // restricted containers' DNS fails while it lasts.
    let dns = endpoint.dns.as_ref();
    let reason = stalled
        .or_else(|| status.not_ready_reason())
        .or_else(|| dns.and_then(|d| d.problem()));
    match reason {
        None => Response::json(200, &health_body(&status, "ready", None, dns)),
        Some(reason) => Response::json(503, &health_body(&status, "not ready", Some(reason), dns)),
    }
}

fn status(endpoint: &Endpoint) -> Response {
    // Pointers are copied under the lock, the decisions themselves after it is released.
    let (mut body, decisions) = {
        let status = endpoint.status.read();
        let body = StatusBody {
            enabled: status.enabled,
            tamper_protection: status.tamper_protection,
            ipv6_in_use: status.ipv6_in_use,
            mode: status.mode,
            containers: Vec::new(),
        };
        (body, status.decisions.values().cloned().collect::<Vec<_>>())
    };
    body.containers = decisions.iter().map(|d| (**d).clone()).collect();
    Response::json(200, &body)
}

/// Largest value of a `/blocked` query parameter (a GUID is 36 bytes).
const MAX_QUERY_VALUE: usize = 256;

/// `GET /blocked?app_id=&space_id=&org_id=`: the summary of blocked attempts, most recent
/// first; an unknown parameter is a 400 that names it.
fn blocked(endpoint: &Endpoint, query: &str) -> Response {
    let filter = match parse_filter(query) {
        Ok(filter) => filter,
        Err(message) => return Response::text(400, &format!("{message}\n")),
    };
    let body = endpoint.blocked.lock().report(&filter);
    Response::json(200, &body)
}

/// The filter in a query string: `app_id`, `space_id`, `org_id`, percent-decoded.
pub fn parse_filter(query: &str) -> Result<Filter, String> {
    let mut filter = Filter::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, raw) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(raw)
            .filter(|v| v.len() <= MAX_QUERY_VALUE)
            .ok_or_else(|| format!("query parameter {name:?} has an invalid value"))?;
        let slot = match name {
            "app_id" => &mut filter.app_id,
            "space_id" => &mut filter.space_id,
            "org_id" => &mut filter.org_id,
            other => {
                return Err(format!(
                    "unknown query parameter {other:?}: use app_id, space_id or org_id"
                ));
            }
        };
        // An empty value (`?app_id=`) filters nothing.
        *slot = (!value.is_empty()).then_some(value);
    }
    Ok(filter)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// An HTTP response about to be written.
#[derive(Debug)]
pub struct Response {
    pub code: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    extra_headers: Vec<(&'static str, &'static str)>,
    /// Answer to HEAD: headers (with the GET Content-Length) but no body.
    head_only: bool,
}

impl Response {
    fn text(code: u16, body: &str) -> Response {
        Response {
            code,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
            extra_headers: Vec::new(),
            head_only: false,
        }
    }

    fn json(code: u16, body: &impl Serialize) -> Response {
        let mut bytes = serde_json::to_vec_pretty(body).unwrap_or_else(|_| b"{}".to_vec());
        bytes.push(b'\n');
        Response {
            code,
            content_type: "application/json",
            body: bytes,
            extra_headers: Vec::new(),
            head_only: false,
        }
    }

    fn with_header(mut self, name: &'static str, value: &'static str) -> Response {
        self.extra_headers.push((name, value));
        self
    }

    fn without_body(mut self) -> Response {
        self.head_only = true;
        self
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
            self.code,
            reason_phrase(self.code),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.extra_headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::policy::Verdict;

    fn endpoint(status: Status) -> Endpoint {
        Endpoint {
            status: SharedStatus::new(status),
            metrics: Arc::new(Metrics::new()),
            started: Instant::now(),
            counters: None,
            blocked: SharedBlocked::default(),
            dns: None,
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
            verdict: Verdict::Restricted,
            reason: "running app container".into(),
        });
        status.decisions.insert(decision.key(), decision);
        status
    }

    fn get(path: &str, endpoint: &Endpoint) -> Response {
        route(&format!("GET {path} HTTP/1.1\r\nHost: x"), endpoint)
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
        assert_eq!(route("POST /healthz HTTP/1.1", &ep).code, 405);
        assert_eq!(route("DELETE /status HTTP/1.1", &ep).code, 405);
        assert_eq!(route("GET /nope HTTP/1.1", &ep).code, 404);
        assert_eq!(route("GET /healthz", &ep).code, 400);
        assert_eq!(route("garbage", &ep).code, 400);
        assert_eq!(route("GET /healthz HTTP/2.0", &ep).code, 505);
        let head = route("HEAD /healthz HTTP/1.1", &ep);
        assert_eq!(head.code, 200);
        let wire = String::from_utf8(head.to_bytes()).expect("utf8");
        let get = route("GET /healthz HTTP/1.1", &ep);
        assert!(
            wire.contains(&format!("Content-Length: {}\r\n", get.body.len())),
            "{wire}"
        );
        assert!(wire.ends_with("\r\n\r\n"), "{wire}");
    }

    #[test]
    fn only_metrics_and_blocked_requests_read_the_kernel_counters() {
        assert!(reads_counters("GET /metrics HTTP/1.1\r\nHost: x"));
        assert!(reads_counters("HEAD /metrics?x=1 HTTP/1.1"));
        assert!(reads_counters("GET /blocked?app_id=a HTTP/1.1"));
        assert!(!reads_counters("GET /metricsx HTTP/1.1"));
        assert!(!reads_counters("POST /metrics HTTP/1.1"));
        assert!(!reads_counters("GET /healthz HTTP/1.1"));
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
}
