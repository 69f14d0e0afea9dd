//! Root integration test of the app log lines (`[loggregator]`): a simulated cell, the real
//! agent, and Cloud Foundry's own Loggregator agents (forwarder agent and syslog agent v7.0.0,
//! built from ../shared/tools/loggregator-agent with Debian's Go) in the cell's namespace, the
//! syslog agent's aggregate drain a TCP listener of the test. A restricted app's blocked
//! attempts must arrive there as RFC 5424 lines of that app (its guid, `[EGRESS/<index>]`),
//! bounded under a flood; with the forwarder agent gone, enforcement and readiness hold and the
//! failures are counted.
//!
//! Run (as root): `cargo test --test app_logs -- --include-ignored --nocapture`

use egress_guard_testkit as support;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use support::cell::{Cell, INET_HOST};
use support::http;
use support::probe::{self, spawn_in_netns};
use support::store::Kind;

const READY: Duration = Duration::from_secs(10);
const FORWARDER_PORT: u16 = 3458;
const SYSLOG_AGENT_PORT: u16 = 3460;
const DRAIN_PORT: u16 = 16514;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Loggregator agents, built once (build.sh skips what exists).
fn agents() -> PathBuf {
    static BUILT: Mutex<()> = Mutex::new(());
    let _once = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let out = repo_root().join("target/loggregator-agent");
    let script = repo_root().join("../shared/tools/loggregator-agent/build.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg(&out)
        .status()
        .expect("run build.sh");
    assert!(status.success(), "{} failed", script.display());
    out.join("bin")
}

/// A test CA and one leaf for every party (server and client auth, SAN DNS:metron), in `dir`.
fn certificates(dir: &Path) {
    std::fs::create_dir_all(dir).expect("certs dir");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=metron",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
    ]);
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=DNS:metron\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext",
        "-out",
        "leaf.crt",
    ]);
}

/// One of the Loggregator agents in namespace `ns`, until dropped.
struct Program(Child);

impl Program {
    fn start(ns: &str, bin: &Path, env: &[(String, String)], log: &Path) -> Program {
        let log = std::fs::File::create(log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start a Loggregator agent");
        Program(child)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tls(prefix: &str, certs: &Path) -> Vec<(String, String)> {
    [("CA", "ca.crt"), ("CERT", "leaf.crt"), ("KEY", "leaf.key")]
        .iter()
        .map(|(what, file)| {
            (
                format!("{prefix}_{what}_FILE_PATH"),
                certs.join(file).display().to_string(),
            )
        })
        .collect()
}

/// Everything the drain receives, appended as it comes.
fn drain(ns: &str, stop: Arc<AtomicBool>) -> Arc<Mutex<String>> {
    let received = Arc::new(Mutex::new(String::new()));
    let listener = probe::in_netns(ns, || {
        TcpListener::bind(("127.0.0.1", DRAIN_PORT)).expect("bind drain")
    });
    listener.set_nonblocking(true).expect("nonblocking");
    let into = received.clone();
    spawn_in_netns(ns, move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    let into = into.clone();
                    std::thread::spawn(move || {
                        let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
                        let mut buf = [0u8; 65536];
                        loop {
                            match conn.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => into
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push_str(&String::from_utf8_lossy(&buf[..n])),
                                Err(e)
                                    if e.kind() == std::io::ErrorKind::WouldBlock
                                        || e.kind() == std::io::ErrorKind::TimedOut =>
                                {
                                    continue;
                                }
                                Err(_) => break,
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    received
}

fn lines_of(received: &Mutex<String>, app: &str) -> Vec<String> {
    received
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .split('\n')
        .flat_map(|chunk| chunk.split("<14>1 "))
        .filter(|l| l.contains(app) && l.contains("[EGRESS/"))
        .map(str::to_string)
        .collect()
}

#[test]
#[ignore = "needs root: run with --include-ignored"]
fn blocked_attempts_reach_the_apps_log_stream_through_the_real_loggregator_agents() {
    support::require_root();
    let mut cell = Cell::new();
    let app = cell.add_container("app1", Kind::App);
    cell.add_container("stg1", Kind::Staging);
    // The store names the app's instance index in Diego's log_config, as silk writes it.
    for entry in cell.store.entries_mut().values_mut() {
        if entry["metadata"]["app_id"] == "app-guid-app1" {
            entry["metadata"]["log_config"] = Value::String(
                "{\"guid\":\"app-guid-app1\",\"index\":2,\"source_name\":\"CELL\"}".into(),
            );
        }
    }
    cell.store.write();
    let certs = cell.tmp().join("certs");
    certificates(&certs);
    let mut pipeline = pipeline(&cell, &certs);
    let received = pipeline.received.clone();

    let mut config = cell.agent_config();
    config.loggregator = Some(loggregator_section(&certs) + "lines_per_minute = 5\n");
    let stg = cell.ctr("stg1").ip;
    cell.start_agent_with(&config);
    cell.wait_exempt(&[stg], READY);

    // One blocked TCP connect: one line, the app's, with its index.
    let (outcome, _) = probe::tcp(&app.ns, SocketAddrV4::new(INET_HOST, 443));
    assert!(
        matches!(outcome, probe::TcpOutcome::Refused(_)),
        "{outcome:?}"
    );
    let wanted = "egress to 203.0.113.10:443/tcp rejected";
    let arrived = support::wait_until_or(Duration::from_secs(15), || {
        lines_of(&received, "app-guid-app1")
            .iter()
            .any(|l| l.contains(wanted))
    });
    let tmp = cell.tmp();
    let logs = || {
        ["syslog-agent.log", "forwarder-agent.log"]
            .iter()
            .map(|f| {
                format!(
                    "--- {f}\n{}",
                    std::fs::read_to_string(tmp.join(f)).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        arrived,
        "no line reached the drain; received:\n{}\nagent log:\n{}\n{}",
        received.lock().unwrap_or_else(|p| p.into_inner()),
        cell.agent().log_text(),
        logs()
    );
    let line = lines_of(&received, "app-guid-app1")
        .into_iter()
        .find(|l| l.contains(wanted))
        .unwrap_or_default();
    eprintln!("at the drain: {line}");
    assert!(
        line.contains(" app-guid-app1 [EGRESS/2] "),
        "the app's guid and its instance index: {line}"
    );
    assert!(
        line.contains("may reach only 10.0.0.0/8"),
        "what the app may reach: {line}"
    );

    // A flood to one destination: at most 5 lines a minute for it (the one above included).
    let flood_stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let stop = flood_stop.clone();
        spawn_in_netns(&app.ns, move || {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
            while !stop.load(Ordering::Relaxed) {
                let _ = socket.send_to(b"x", (INET_HOST, 9999));
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    flood_stop.store(true, Ordering::Relaxed);
    flooder.join().expect("flooder");
    std::thread::sleep(Duration::from_secs(2));
    let flood_lines = lines_of(&received, "app-guid-app1")
        .into_iter()
        .filter(|l| l.contains("203.0.113.10:9999/udp"))
        .count();
    let metrics = http::get(&cell.cell, cell.health_port(), "/metrics").body;
    let sent =
        http::metric(&metrics, "egress_guard_app_logs_total{result=\"sent\"}").unwrap_or(0.0);
    eprintln!("flood: {flood_lines} lines for the flooded destination; {sent} sent in all");
    assert!(
        (1..=5).contains(&flood_lines),
        "{flood_lines} lines for one destination within a minute"
    );

    // The forwarder agent gone: enforcement and readiness hold, the failures are counted.
    pipeline.stop_forwarder();
    let (outcome, _) = probe::tcp(&app.ns, SocketAddrV4::new(INET_HOST, 8443));
    assert!(
        matches!(outcome, probe::TcpOutcome::Refused(_)),
        "still rejected: {outcome:?}"
    );
    let failed = support::wait_until_or(Duration::from_secs(10), || {
        let text = http::get(&cell.cell, cell.health_port(), "/metrics").body;
        http::metric(&text, "egress_guard_app_logs_total{result=\"failed\"}").unwrap_or(0.0) >= 1.0
    });
    assert!(failed, "a line that could not be sent is counted as failed");
    let ready = http::get(&cell.cell, cell.health_port(), "/readyz");
    assert_eq!(
        ready.code, 200,
        "readiness does not depend on Loggregator: {}",
        ready.body
    );
    assert_eq!(
        ready.json()["app_logs"]["connected"],
        false,
        "{}",
        ready.body
    );
    drop(pipeline);
    cell.agent().assert_running();
}

/// The forwarder and syslog agents and a drain in the cell's namespace, with certificates
/// from `certs`; the `[loggregator]` body that points the agent at them with `agent_certs`.
struct Pipeline {
    received: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    programs: Vec<Program>,
}

impl Pipeline {
    /// Stops the forwarder agent (the last program started).
    fn stop_forwarder(&mut self) {
        self.programs.pop();
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pipeline(cell: &Cell, certs: &Path) -> Pipeline {
    let bin = agents();
    let ingress = cell.tmp().join("ingress/syslog-agent");
    std::fs::create_dir_all(&ingress).expect("ingress dir");
    std::fs::write(
        ingress.join("ingress_port.yml"),
        format!("ingress: {SYSLOG_AGENT_PORT}\n"),
    )
    .expect("ingress port");
    let stop = Arc::new(AtomicBool::new(false));
    let received = drain(&cell.cell, stop.clone());
    let env = |pairs: &[(&str, String)], metrics_port: u16| -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        all.extend(tls("AGENT", certs));
        all.extend(tls("METRICS", certs));
        all.push(("METRICS_PORT".into(), metrics_port.to_string()));
        all
    };
    let syslog = Program::start(
        &cell.cell,
        &bin.join("syslog-agent"),
        &env(
            &[
                ("AGENT_PORT", SYSLOG_AGENT_PORT.to_string()),
                (
                    "AGGREGATE_DRAIN_URLS",
                    format!("syslog://127.0.0.1:{DRAIN_PORT}"),
                ),
            ],
            14001,
        ),
        &cell.tmp().join("syslog-agent.log"),
    );
    let forwarder = Program::start(
        &cell.cell,
        &bin.join("forwarder-agent"),
        &env(
            &[
                ("AGENT_PORT", FORWARDER_PORT.to_string()),
                (
                    "DOWNSTREAM_INGRESS_PORT_GLOB",
                    format!(
                        "{}/*/ingress_port.yml",
                        cell.tmp().join("ingress").display()
                    ),
                ),
            ],
            14002,
        ),
        &cell.tmp().join("forwarder-agent.log"),
    );
    std::thread::sleep(Duration::from_secs(1));
    Pipeline {
        received,
        stop,
        programs: vec![syslog, forwarder],
    }
}

fn loggregator_section(certs: &Path) -> String {
    format!(
        "enabled = true\naddress = \"127.0.0.1:{FORWARDER_PORT}\"\nserver_name = \"metron\"\n\
         ca_cert = {:?}\ncert = {:?}\nkey = {:?}\n",
        certs.join("ca.crt").display().to_string(),
        certs.join("leaf.crt").display().to_string(),
        certs.join("leaf.key").display().to_string(),
    )
}

/// A cell with an app and a staging container, and test certificates for the pipeline.
fn cell_with_an_app() -> (Cell, support::cell::Container, PathBuf) {
    support::require_root();
    let mut cell = Cell::new();
    let app = cell.add_container("app1", Kind::App);
    cell.add_container("stg1", Kind::Staging);
    let certs = cell.tmp().join("certs");
    certificates(&certs);
    (cell, app, certs)
}

/// In audit mode the line says the attempt would be rejected (and that it went through).
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn an_audit_mode_attempt_says_it_would_be_rejected() {
    let (mut cell, app, certs) = cell_with_an_app();
    let pipeline = pipeline(&cell, &certs);
    let mut config = cell.agent_config();
    config.mode = "audit".into();
    config.loggregator = Some(loggregator_section(&certs));
    let stg = cell.ctr("stg1").ip;
    cell.start_agent_with(&config);
    cell.wait_exempt(&[stg], READY);
    let port = cell.health_port();
    support::wait_until(READY, "/readyz 200", || {
        http::try_get(&cell.cell, port, "/readyz").is_ok_and(|r| r.code == 200)
    });
    let (outcome, _) = probe::tcp(&app.ns, SocketAddrV4::new(INET_HOST, probe::TCP_PORT));
    assert!(
        matches!(outcome, probe::TcpOutcome::Echoed),
        "audit lets it through: {outcome:?}"
    );
    let wanted = format!(
        "egress to 203.0.113.10:{}/tcp would be rejected",
        probe::TCP_PORT
    );
    let arrived = support::wait_until_or(Duration::from_secs(15), || {
        lines_of(&pipeline.received, "app-guid-app1")
            .iter()
            .any(|l| l.contains(&wanted))
    });
    assert!(
        arrived,
        "no audit line at the drain: {}",
        pipeline.received.lock().unwrap_or_else(|p| p.into_inner())
    );
}

/// A forwarder agent that refuses our certificate (signed by another CA): the lines fail and
/// are counted, `/readyz` says `connected: false` and stays 200, and enforcement holds.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn a_refused_certificate_degrades_app_logs_only() {
    let (mut cell, app, certs) = cell_with_an_app();
    let strangers = cell.tmp().join("other-ca");
    certificates(&strangers);
    let _pipeline = pipeline(&cell, &certs);
    let mut config = cell.agent_config();
    config.loggregator = Some(loggregator_section(&strangers));
    let stg = cell.ctr("stg1").ip;
    cell.start_agent_with(&config);
    cell.wait_exempt(&[stg], READY);
    let inet_src = app.ip;
    cell.watch_inet_ingress(inet_src);
    let (outcome, _) = probe::tcp(&app.ns, SocketAddrV4::new(INET_HOST, 443));
    assert!(
        matches!(outcome, probe::TcpOutcome::Refused(_)),
        "still rejected: {outcome:?}"
    );
    assert_eq!(
        cell.inet_ingress(inet_src, "tcp"),
        0,
        "nothing arrived at the internet host"
    );
    let failed = support::wait_until_or(Duration::from_secs(10), || {
        let text = http::get(&cell.cell, cell.health_port(), "/metrics").body;
        http::metric(&text, "egress_guard_app_logs_total{result=\"failed\"}").unwrap_or(0.0) >= 1.0
    });
    assert!(failed, "the refused lines are counted as failed");
    let ready = http::get(&cell.cell, cell.health_port(), "/readyz");
    assert_eq!(ready.code, 200, "{}", ready.body);
    assert_eq!(
        ready.json()["app_logs"]["connected"],
        false,
        "{}",
        ready.body
    );
    let status = http::get(&cell.cell, cell.health_port(), "/status").json();
    assert_eq!(
        status["app_logs"]["connected"], false,
        "the degraded flag in /status: {status}"
    );
    cell.agent().assert_running();
}
