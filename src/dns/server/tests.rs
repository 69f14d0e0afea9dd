use super::*;
use crate::dns::{DnsHealth, LogRefusals};
use hickory_proto::op::{Message, MessageType, OpCode, Query as Question, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType, rdata::A};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts refusals (what a `/blocked` sink would receive).
#[derive(Default)]
struct Recorder(Mutex<Vec<DnsRefusal>>);

impl RefusalSink for Recorder {
    fn refused(&self, refusal: &DnsRefusal) {
        self.0.lock().expect("lock").push(refusal.clone());
    }
}

/// A fake upstream on 127.0.0.1: answers every query with an A record 10.0.0.99 (UDP and
/// TCP) after `delay`, or never when `delay` is None; counts the names it was asked.
struct Upstream {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<String>>>,
}

fn answer_for(query: &[u8]) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let mut answer = Message::response(query.metadata.id, OpCode::Query);
    let question = query.queries.first()?.clone();
    answer.add_answer(Record::from_rdata(
        question.name().clone(),
        60,
        RData::A(A::new(10, 0, 0, 99)),
    ));
    answer.add_query(question);
    answer.to_vec().ok()
}

/// A test resolver that answers every query after `delay` (None: never), each on its own, as
/// a real resolver answers queries concurrently.
async fn upstream(delay: Option<Duration>) -> Upstream {
    let udp = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let addr = udp.local_addr().expect("addr");
    let tcp = TcpListener::bind(addr).await.expect("bind tcp");
    let asked = Arc::new(Mutex::new(Vec::new()));
    let record = asked.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((len, peer)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            let query = buf[..len].to_vec();
            if let Ok(m) = Message::from_vec(&query) {
                record
                    .lock()
                    .expect("lock")
                    .push(m.queries[0].name().to_ascii());
            }
            let Some(delay) = delay else { continue };
            let udp = udp.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Some(answer) = answer_for(&query) {
                    let _ = udp.send_to(&answer, peer).await;
                }
            });
        }
    });
    let record = asked.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = tcp.accept().await else {
                continue;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let mut len = [0u8; 2];
                stream.read_exact(&mut len).await.ok()?;
                let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                stream.read_exact(&mut query).await.ok()?;
                let m = Message::from_vec(&query).ok()?;
                record.lock().ok()?.push(m.queries[0].name().to_ascii());
                tokio::time::sleep(delay?).await;
                let answer = answer_for(&query)?;
                stream
                    .write_all(&(answer.len() as u16).to_be_bytes())
                    .await
                    .ok()?;
                stream.write_all(&answer).await.ok()
            });
        }
    });
    Upstream { addr, asked }
}

struct Running {
    addr: SocketAddr,
    health: SharedDnsHealth,
    refusals: Arc<Recorder>,
}

/// The server on 127.0.0.1:0 with 127.0.0.0/8 as "the overlay".
async fn serve(upstream: SocketAddr, extra: &str) -> Running {
    let config = Config::parse(&format!(
        "overlay_network = \"127.0.0.0/8\"\n[dns]\nenabled = true\nupstream = \"{upstream}\"\n{extra}"
    ))
    .expect("valid");
    let health = Arc::new(DnsHealth::new(&config));
    let refusals = Arc::new(Recorder::default());
    let sinks: Arc<dyn RefusalSink> = Arc::new(crate::dns::Sinks(vec![
        refusals.clone(),
        Arc::new(LogRefusals::default()),
    ]));
    let server = Arc::new(Server::new(&config, health.clone(), sinks));
    let (udp, tcp) = bind("127.0.0.1:0".parse().expect("literal"))
        .await
        .expect("bind");
    let addr = udp.local_addr().expect("addr");
    health.listening(Ok(addr));
    tokio::spawn(server.serve_on(udp, tcp));
    Running {
        addr,
        health,
        refusals,
    }
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Question::query(
        Name::from_ascii(name).expect("name"),
        RecordType::A,
    ));
    m.to_vec().expect("encodes")
}

async fn ask_udp(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Message> {
    ask_udp_from(Ipv4Addr::LOCALHOST, server, bytes, wait).await
}

/// The same from source address `from` (any of 127.0.0.0/8: "a container").
async fn ask_udp_from(
    from: Ipv4Addr,
    server: SocketAddr,
    bytes: &[u8],
    wait: Duration,
) -> Option<Message> {
    let socket = UdpSocket::bind(SocketAddr::from((from, 0)))
        .await
        .expect("bind");
    socket.connect(server).await.expect("connect");
    socket.send(bytes).await.expect("send");
    let mut buf = vec![0u8; 65535];
    let len = tokio::time::timeout(wait, socket.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    Message::from_vec(&buf[..len]).ok()
}

async fn ask_tcp(server: SocketAddr, bytes: &[u8]) -> Option<Message> {
    let mut stream = TcpStream::connect(server).await.ok()?;
    stream
        .write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .ok()?;
    stream.write_all(bytes).await.ok()?;
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut len))
        .await
        .ok()?
        .ok()?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer).await.ok()?;
    Message::from_vec(&answer).ok()
}

const WAIT: Duration = Duration::from_secs(3);

#[tokio::test]
async fn allowed_names_are_relayed_and_others_refused_without_asking_upstream() {
    let up = upstream(Some(Duration::ZERO)).await;
    let dns = serve(up.addr, "").await;
    for (id, ask) in [(1u16, true), (2, false)] {
        let bytes = query(id, "web.apps.internal.");
        let answer = if ask {
            ask_udp(dns.addr, &bytes, WAIT).await
        } else {
            ask_tcp(dns.addr, &bytes).await
        }
        .expect("an answer");
        assert_eq!(answer.metadata.id, id);
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert_eq!(answer.answers.len(), 1, "{answer:?}");
    }
    let refused = ask_udp(dns.addr, &query(3, "x.attacker.example."), WAIT)
        .await
        .expect("an answer");
    assert_eq!(refused.metadata.id, 3);
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
    let refused = ask_tcp(dns.addr, &query(4, "y.attacker.example."))
        .await
        .expect("an answer");
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
    assert_eq!(
        *up.asked.lock().expect("lock"),
        vec![
            "web.apps.internal.".to_string(),
            "web.apps.internal.".to_string()
        ],
        "the upstream saw only the allowed name"
    );
    let refusals = dns.refusals.0.lock().expect("lock").clone();
    assert_eq!(refusals.len(), 2);
    assert_eq!(refusals[0].name, "x.attacker.example.");
    assert_eq!(refusals[0].src, Ipv4Addr::LOCALHOST);
    assert_eq!(refusals[1].transport, "tcp");
    assert_eq!(dns.health.counted(QueryResult::Forwarded), 2);
    assert_eq!(dns.health.counted(QueryResult::Refused), 2);
}

#[tokio::test]
async fn malformed_and_oversized_queries_get_no_answer_and_are_counted() {
    let up = upstream(Some(Duration::ZERO)).await;
    let dns = serve(up.addr, "").await;
    assert!(
        ask_udp(dns.addr, b"\x00\x01garbage", Duration::from_millis(300))
            .await
            .is_none()
    );
    let mut big = query(5, "web.apps.internal.");
    big.resize(2000, 0);
    assert!(
        ask_udp(dns.addr, &big, Duration::from_millis(300))
            .await
            .is_none()
    );
    assert!(ask_tcp(dns.addr, &vec![0u8; 600]).await.is_none());
    assert_eq!(dns.health.counted(QueryResult::Malformed), 3);
    // Still serving.
    let answer = ask_udp(dns.addr, &query(6, "web.apps.internal."), WAIT).await;
    assert_eq!(answer.expect("an answer").answers.len(), 1);
    assert!(up.asked.lock().expect("lock").len() == 1);
}

#[tokio::test]
async fn an_upstream_that_never_answers_costs_one_timeout_and_servfail() {
    let up = upstream(None).await;
    let dns = serve(up.addr, "upstream_timeout = \"300ms\"").await;
    let started = std::time::Instant::now();
    for id in 0..3 {
        let answer = ask_udp(dns.addr, &query(id, "web.apps.internal."), WAIT)
            .await
            .expect("SERVFAIL, not silence");
        assert_eq!(answer.metadata.id, id);
        assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    }
    let answer = ask_tcp(dns.addr, &query(9, "web.apps.internal."))
        .await
        .expect("an answer");
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let problem = dns.health.problem().expect("health says what is wrong");
    assert!(problem.contains("upstream"), "{problem}");
    assert_eq!(dns.health.counted(QueryResult::Error), 4);
    // Refusals do not depend on the upstream.
    let refused = ask_udp(dns.addr, &query(10, "x.attacker.example."), WAIT).await;
    assert_eq!(
        refused.expect("answer").metadata.response_code,
        ResponseCode::Refused
    );
}

#[tokio::test]
async fn upstream_queries_in_flight_are_bounded() {
    let up = upstream(Some(Duration::from_millis(400))).await;
    let dns = serve(up.addr, "max_inflight = 2\nupstream_timeout = \"2s\"").await;
    let answered = Arc::new(AtomicUsize::new(0));
    let servfail = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for id in 0..6u16 {
        let (answered, servfail, addr) = (answered.clone(), servfail.clone(), dns.addr);
        tasks.push(tokio::spawn(async move {
            match ask_udp(addr, &query(id, "web.apps.internal."), WAIT).await {
                Some(m) if m.metadata.response_code == ResponseCode::NoError => {
                    answered.fetch_add(1, Ordering::SeqCst)
                }
                Some(m) if m.metadata.response_code == ResponseCode::ServFail => {
                    servfail.fetch_add(1, Ordering::SeqCst)
                }
                other => panic!("unexpected {other:?}"),
            };
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(answered.load(Ordering::SeqCst), 2);
    assert_eq!(servfail.load(Ordering::SeqCst), 4);
    assert_eq!(
        up.asked.lock().expect("lock").len(),
        2,
        "only 2 reached the upstream"
    );
    assert_eq!(dns.health.body().overloaded, 4);
}

#[tokio::test]
async fn queries_from_outside_the_overlay_are_ignored() {
    let up = upstream(Some(Duration::ZERO)).await;
    let config = Config::parse(&format!(
        "[dns]\nenabled = true\nupstream = \"{}\"",
        up.addr
    ))
    .expect("valid");
    let health = Arc::new(DnsHealth::new(&config));
    let server = Arc::new(Server::new(
        &config,
        health.clone(),
        Arc::new(LogRefusals::default()),
    ));
    let (udp, tcp) = bind("127.0.0.1:0".parse().expect("literal"))
        .await
        .expect("bind");
    let addr = udp.local_addr().expect("addr");
    tokio::spawn(server.serve_on(udp, tcp));
    // 127.0.0.1 is not in the default overlay 10.255.0.0/16.
    assert!(
        ask_udp(
            addr,
            &query(1, "web.apps.internal."),
            Duration::from_millis(300)
        )
        .await
        .is_none()
    );
    assert!(
        ask_tcp(addr, &query(2, "web.apps.internal."))
            .await
            .is_none()
    );
    assert_eq!(health.counted(QueryResult::Ignored), 2);
    assert!(up.asked.lock().expect("lock").is_empty());
}

/// Several flooders cannot take the upstream from a quiet container: each container has at
/// most its share of `max_inflight` in flight (a 32nd, at least 4), the rest get SERVFAIL at
/// once, and another container's queries are still forwarded and answered.
#[tokio::test]
async fn each_container_has_only_its_share_of_the_upstream_queries() {
    // Answered a second after they arrive: every flooder's queries are in flight together
    // long before its first is answered, and all within the timeout.
    let up = upstream(Some(Duration::from_secs(1))).await;
    let dns = serve(up.addr, "max_inflight = 64\nupstream_timeout = \"10s\"").await;
    let wait = Duration::from_secs(10);
    let share = (64 / INFLIGHT_SHARE_DIVISOR).max(MIN_INFLIGHT_PER_CONTAINER);
    assert_eq!(share, 4);
    let flooders = [2u8, 3, 4];
    let per_flooder = 12u16;
    let mut tasks = Vec::new();
    for (f, &last) in flooders.iter().enumerate() {
        for i in 0..per_flooder {
            let (addr, from) = (dns.addr, Ipv4Addr::new(127, 0, 0, last));
            let id = u16::try_from(f).expect("few") * 100 + i;
            tasks.push(tokio::spawn(async move {
                let got = ask_udp_from(from, addr, &query(id, "web.apps.internal."), wait).await;
                (last, got.map(|m| m.metadata.response_code))
            }));
        }
    }
    // The flooders' queries are in flight; the quiet container asks now.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let quiet = Ipv4Addr::new(127, 0, 0, 9);
    let mut quiet_tasks = Vec::new();
    for id in 0..3u16 {
        let addr = dns.addr;
        quiet_tasks.push(tokio::spawn(async move {
            ask_udp_from(quiet, addr, &query(900 + id, "web.apps.internal."), wait).await
        }));
    }
    let mut answered = std::collections::BTreeMap::<u8, usize>::new();
    let mut servfail = 0;
    for t in tasks {
        match t.await.expect("task") {
            (from, Some(ResponseCode::NoError)) => *answered.entry(from).or_default() += 1,
            (_, Some(ResponseCode::ServFail)) => servfail += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    for from in flooders {
        assert_eq!(
            answered.get(&from),
            Some(&share),
            "flooder 127.0.0.{from}: {answered:?}"
        );
    }
    assert_eq!(
        servfail,
        flooders.len() * (usize::from(per_flooder) - share)
    );
    for t in quiet_tasks {
        let got = t
            .await
            .expect("task")
            .expect("the quiet container is answered");
        assert_eq!(got.metadata.response_code, ResponseCode::NoError);
    }
    assert_eq!(
        dns.health.body().overloaded,
        (flooders.len() * (usize::from(per_flooder) - share)) as u64
    );
}
