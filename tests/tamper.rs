//! Root integration tests: tampering with the firewall, or killing the agent, lets no
//! restricted packet out, and the agent needs no `nft` binary to enforce.
//!
//! Run (as root): `cargo test --test tamper -- --include-ignored --nocapture`
//!
//! A running app container sends restricted traffic to the "internet" namespace the whole time:
//! UDP datagrams (several thousand a second) and TCP connection attempts (a few thousand a
//! second), to a port where nothing listens (so a leaked SYN is answered by the destination's
//! reset and the next attempt follows at once), so even a window of a fraction of a millisecond
//! lets some through. What arrives is counted by an nft counter at the internet namespace's
//! prerouting hook, ahead of everything else there: ground truth, whatever the sockets do. Two
//! controls run beside it: the same app container streams to the VPC (allowed: it must keep
//! arriving), and a staging container sends UDP to the internet namespace (exempt: it must keep
//! arriving, which also proves the path a leak would take is open).
//!
//! The agent is expected to keep its rules in two tables: `inet egress_guard` (no
//! flags: it survives the agent) and `inet egress_guard_owned` (`NFT_TABLE_F_OWNER`, held by the
//! agent's netlink socket: no other process can delete or change it, `nft flush ruleset` skips
//! it, the kernel removes it when the agent exits). A reject in either is final, so no single
//! fault below may open a window.
//!
//! The walk runs twice: with the address rules alone, and with a hostname rule whose answer
//! (the internet host, TCP port 443 only) the app has learned, so that the learned maps, the
//! host chain and the conntrack-mark accepts are in both tables through every fault while the
//! streams go to that very host on another port.
//!
//! Everything happens in namespaces the tests create and always delete; the "internet" is
//! TEST-NET-3 (203.0.113.0/24), the VPC 10.0.0.0/8.

use egress_guard_testkit as support;

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::agent::AgentConfig;
use support::cell::{Cell, Container, INET_HOST, RESOLVER, TABLE, VPC_HOST};
use support::cmd::ns_try_run;
use support::http;
use support::probe::{self, TcpTally};
use support::store::Kind;

/// The table the agent holds through its own netlink socket (`NFT_TABLE_F_OWNER`).
const OWNED: &str = "egress_guard_owned";
/// Destination port of every stream: the discard port, where nothing listens in any namespace.
const SINK_PORT: u16 = 9;
/// How long the agent may take to start and install its tables and the first exemption.
const READY: Duration = Duration::from_secs(10);
/// Traffic flows this long before each disruption, with the rules in place.
const PRE_ROLL: Duration = Duration::from_millis(300);
/// How long the agent stays down after kill -9 or SIGTERM before it is started again.
const AGENT_DOWN: Duration = Duration::from_millis(500);
/// Longest wait for the agent to repair what a disruption damaged. The agent runs with the
/// shipped 10 s interval, so a repair within this bound may come from the timer; the leak
/// counts say whether that was soon enough.
const REPAIR_TIMEOUT: Duration = Duration::from_secs(15);
/// Traffic keeps flowing this long after the repair, before the counters are read.
const SETTLE: Duration = Duration::from_millis(500);
/// Pace of the restricted UDP stream (app -> internet).
const RESTRICTED_UDP_EVERY: Duration = Duration::from_micros(100);
/// Pace of the restricted TCP connection attempts (app -> internet).
const RESTRICTED_TCP_EVERY: Duration = Duration::from_micros(250);
/// Pace of the control streams (app -> VPC, staging -> internet).
const CONTROL_EVERY: Duration = Duration::from_millis(1);
/// Each stream must have sent at least this many packets in every step (the slowest sends
/// about 1,000 a second; a step lasts more than a second).
const FLOOR: u64 = 200;

// ------------------------------------------------------------------ traffic

/// The streams of one step, running until [`Traffic::stop`] (or drop).
struct Traffic {
    stop: Arc<AtomicBool>,
    /// app -> internet, restricted.
    udp: Option<JoinHandle<u64>>,
    tcp: Option<JoinHandle<TcpTally>>,
    /// app -> VPC, allowed.
    vpc_udp: Option<JoinHandle<u64>>,
    vpc_tcp: Option<JoinHandle<TcpTally>>,
    /// staging -> internet, exempt.
    staging_udp: Option<JoinHandle<u64>>,
}

/// What the streams of one step sent.
#[derive(Clone, Copy, Debug, Default)]
struct Sent {
    udp: u64,
    tcp: TcpTally,
    vpc_udp: u64,
    vpc_tcp: TcpTally,
    staging_udp: u64,
}

impl Traffic {
    fn start(app: &Container, stg: &Container) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let inet = SocketAddrV4::new(INET_HOST, SINK_PORT);
        let vpc = SocketAddrV4::new(VPC_HOST, SINK_PORT);
        let s = || stop.clone();
        Traffic {
            udp: Some(probe::udp_stream_every(
                &app.ns,
                inet,
                RESTRICTED_UDP_EVERY,
                s(),
            )),
            tcp: Some(probe::tcp_stream(&app.ns, inet, RESTRICTED_TCP_EVERY, s())),
            vpc_udp: Some(probe::udp_stream_every(&app.ns, vpc, CONTROL_EVERY, s())),
            vpc_tcp: Some(probe::tcp_stream(&app.ns, vpc, CONTROL_EVERY, s())),
            staging_udp: Some(probe::udp_stream_every(&stg.ns, inet, CONTROL_EVERY, s())),
            stop,
        }
    }

    fn stop(mut self) -> Sent {
        self.stop.store(true, Ordering::Relaxed);
        fn join<T>(h: &mut Option<JoinHandle<T>>) -> T {
            h.take()
                .expect("joined once")
                .join()
                .expect("stream thread panicked")
        }
        Sent {
            udp: join(&mut self.udp),
            tcp: join(&mut self.tcp),
            vpc_udp: join(&mut self.vpc_udp),
            vpc_tcp: join(&mut self.vpc_tcp),
            staging_udp: join(&mut self.staging_udp),
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        // On a panic mid-step the threads stop instead of sending into deleted namespaces.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The destination counters (packets that arrived, since the watches were installed).
#[derive(Clone, Copy, Debug, Default)]
struct Arrived {
    udp: u64,
    tcp: u64,
    vpc_udp: u64,
    vpc_tcp: u64,
    staging_udp: u64,
}

impl Arrived {
    fn read(cell: &Cell, app: &Container, stg: &Container) -> Arrived {
        Arrived {
            udp: cell.inet_ingress(app.ip, "udp"),
            tcp: cell.inet_ingress(app.ip, "tcp"),
            vpc_udp: cell.ingress(&cell.vpc, app.ip, "udp"),
            vpc_tcp: cell.ingress(&cell.vpc, app.ip, "tcp"),
            staging_udp: cell.inet_ingress(stg.ip, "udp"),
        }
    }

    fn since(self, before: Arrived) -> Arrived {
        Arrived {
            udp: self.udp - before.udp,
            tcp: self.tcp - before.tcp,
            vpc_udp: self.vpc_udp - before.vpc_udp,
            vpc_tcp: self.vpc_tcp - before.vpc_tcp,
            staging_udp: self.staging_udp - before.staging_udp,
        }
    }
}

// ------------------------------------------------------------------ disruptions

/// One disruption, in the order the walk runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tamper {
    FlushRuleset,
    DeleteTable,
    DeleteOwnedTable,
    AddAcceptToOwned,
    InsertAcceptIntoTable,
    IptablesAcceptAll,
    Kill9AndRestart,
    SigtermAndRestart,
}

/// What the kernel must answer to a tampering command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// The command succeeds (it changes `egress_guard` or iptables, which the agent repairs or
    /// which cannot matter).
    Accepted,
    /// The kernel refuses it: the owned table belongs to the agent's socket.
    Refused,
}

impl Tamper {
    const ALL: [Tamper; 8] = [
        Tamper::FlushRuleset,
        Tamper::DeleteTable,
        Tamper::DeleteOwnedTable,
        Tamper::AddAcceptToOwned,
        Tamper::InsertAcceptIntoTable,
        Tamper::IptablesAcceptAll,
        Tamper::Kill9AndRestart,
        Tamper::SigtermAndRestart,
    ];

    /// The command as an operator would type it, with `owned` the owned table's name (the
    /// name of the step in every report).
    fn label(self, owned: &str) -> String {
        match self {
            Tamper::FlushRuleset => "nft flush ruleset".into(),
            Tamper::DeleteTable => format!("nft delete table inet {TABLE}"),
            Tamper::DeleteOwnedTable => format!("nft delete table inet {owned}"),
            Tamper::AddAcceptToOwned => format!("nft add rule inet {owned} overlay_egress accept"),
            Tamper::InsertAcceptIntoTable => {
                format!("nft insert rule inet {TABLE} overlay_egress accept")
            }
            Tamper::IptablesAcceptAll => "iptables -I FORWARD -j ACCEPT".into(),
            Tamper::Kill9AndRestart => "kill -9 the agent, restart it".into(),
            Tamper::SigtermAndRestart => "SIGTERM the agent, restart it".into(),
        }
    }

    /// The words of a command step and the answer it must get; None for the agent's restarts.
    fn command(self, owned: &str) -> Option<(Vec<String>, Expect)> {
        let words = self.label(owned).split(' ').map(String::from).collect();
        let expect = match self {
            Tamper::DeleteOwnedTable | Tamper::AddAcceptToOwned => Expect::Refused,
            Tamper::Kill9AndRestart | Tamper::SigtermAndRestart => return None,
            _ => Expect::Accepted,
        };
        Some((words, expect))
    }
}

/// Harness self-check only: a table with the agent's rules and `flags owner`, held by an
/// `nft -i` process of the test (its netlink socket owns the table until the process exits),
/// standing in for the owned table the agent is to keep.
struct OwnedStandIn {
    child: Child,
    /// Kept open: nft -i exits (and the kernel drops the table) at end of input.
    _stdin: ChildStdin,
}

/// Name of the stand-in table (not `egress_guard_owned`, so that it can sit beside an agent
/// that keeps its own).
const STAND_IN: &str = "egt_owned_stand_in";

impl OwnedStandIn {
    /// Creates the stand-in in the cell namespace, exempting `stg`, and waits until it holds
    /// every rule.
    fn start(cell: &Cell, stg: &Container) -> OwnedStandIn {
        let t = format!("inet {STAND_IN}");
        // One command a line: nft -i reads line by line.
        let script = [
            format!("add table {t} {{ flags owner; }}"),
            format!("add counter {t} rejected_tcp"),
            format!("add counter {t} rejected_other"),
            format!(
                "add set {t} exempt {{ type iface_index . ipv4_addr; elements = {{ \"{}\" . {} }}; }}",
                stg.host_if, stg.ip
            ),
            format!(
                "add chain {t} forward {{ type filter hook forward priority -10; policy accept; }}"
            ),
            format!("add chain {t} overlay_egress"),
            format!("add rule {t} forward ip saddr 10.255.0.0/16 jump overlay_egress"),
            format!("add rule {t} overlay_egress iif . ip saddr @exempt return"),
            format!("add rule {t} overlay_egress ip daddr 10.0.0.0/8 return"),
            format!(
                "add rule {t} overlay_egress meta l4proto tcp counter name \"rejected_tcp\" reject with tcp reset"
            ),
            format!(
                "add rule {t} overlay_egress counter name \"rejected_other\" reject with icmpx admin-prohibited"
            ),
        ]
        .join("\n")
            + "\n";
        let mut child = Command::new("ip")
            .args(["netns", "exec", &cell.cell, "nft", "-i"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nft -i");
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(script.as_bytes())
            .expect("write the stand-in's rules to nft -i");
        stdin.flush().expect("flush nft -i input");
        support::wait_until(
            Duration::from_secs(5),
            "the owned stand-in table to hold all its rules",
            || {
                cell.table_shape(STAND_IN)
                    .is_some_and(|t| t.contains("reject with icmpx admin-prohibited"))
            },
        );
        OwnedStandIn {
            child,
            _stdin: stdin,
        }
    }
}

impl Drop for OwnedStandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cell, the agent and what it installed, shared by the steps of the walk.
struct Walk {
    cell: Cell,
    config: AgentConfig,
    app: Container,
    stg: Container,
    /// `egress_guard` as the agent installed it (handles and counter values scrubbed).
    installed: Value,
    /// Name of the owned table: [`OWNED`], or [`STAND_IN`] in the harness self-check.
    owned_name: &'static str,
    /// The owned table's [`Cell::table_shape`] at the start; None if it did not exist, in which case
    /// the steps do not wait for it (the walk fails on its absence anyway).
    owned: Option<String>,
    /// The harness self-check's stand-in for the agent's owned table.
    _stand_in: Option<OwnedStandIn>,
    /// With a hostname rule: the cell's resolver, answering its name.
    _resolver: Option<PartnerResolver>,
}

/// The hostname rule's name in the walk with one.
const PARTNER: &str = "api.partner.example.";

/// The cell's resolver (on [`RESOLVER`]:53, UDP) in the walk with a hostname rule: answers A
/// queries for [`PARTNER`] with the internet host, anything else with no record. Stops when
/// dropped.
struct PartnerResolver {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PartnerResolver {
    fn start(ns: &str) -> PartnerResolver {
        use hickory_proto::op::{Message, OpCode};
        use hickory_proto::rr::{Name, RData, Record, RecordType, rdata::A};
        let socket = support::probe::in_netns(ns, || {
            UdpSocket::bind((RESOLVER, 53)).expect("bind the cell's resolver")
        });
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let partner = Name::from_ascii(PARTNER).expect("name");
            let mut buf = [0u8; 1500];
            while !stopping.load(Ordering::Relaxed) {
                let Ok((len, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(query) = Message::from_vec(&buf[..len]) else {
                    continue;
                };
                let Some(question) = query.queries.first().cloned() else {
                    continue;
                };
                let mut answer = Message::response(query.metadata.id, OpCode::Query);
                answer.metadata.recursion_desired = query.metadata.recursion_desired;
                answer.metadata.recursion_available = true;
                if question.query_type() == RecordType::A
                    && question.name().to_lowercase() == partner
                {
                    answer.add_answer(Record::from_rdata(
                        question.name().clone(),
                        2,
                        RData::A(A(INET_HOST)),
                    ));
                }
                answer.add_query(question);
                if let Ok(bytes) = answer.to_vec() {
                    let _ = socket.send_to(&bytes, from);
                }
            }
        });
        PartnerResolver {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PartnerResolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The addresses of the A records `ns` gets for [`PARTNER`] from the cell's resolver (through
/// the agent's DNS filter, which the redirect puts in between).
fn resolve_partner(ns: &str) -> Vec<Ipv4Addr> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut query = Message::new(7, MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(
        Name::from_ascii(PARTNER).expect("name"),
        RecordType::A,
    ));
    let bytes = query.to_vec().expect("encodes");
    support::probe::in_netns(ns, || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        socket.send_to(&bytes, (RESOLVER, 53)).expect("send");
        let mut buf = [0u8; 1500];
        let Ok((len, _)) = socket.recv_from(&mut buf) else {
            return Vec::new();
        };
        Message::from_vec(&buf[..len])
            .map(|m| {
                m.answers
                    .iter()
                    .filter_map(|r| match r.data {
                        RData::A(a) => Some(a.0),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}

fn show(out: &Output) -> String {
    let text = format!(
        "{} {}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    format!("{} ({})", text.trim(), out.status)
}

/// The outcome of one step.
struct Step {
    /// The command, as in [`Tamper::label`].
    label: String,
    /// What the command answered, or what happened to the agent.
    command: String,
    /// Time from the start of the disruption until the agent had repaired what it can.
    repaired: Result<Duration, String>,
    sent: Sent,
    arrived: Arrived,
    problems: Vec<String>,
}

impl Step {
    fn line(&self) -> String {
        let s = &self.sent;
        let a = &self.arrived;
        format!(
            "{:<58} | {} | repaired: {} | restricted delivered: {} UDP + {} TCP of {} UDP + {} TCP sent \
             (TCP refused {}, connected {}, other {}) | VPC got {}/{} UDP, {}/{} TCP | staging got {}/{} UDP | {}",
            self.label,
            self.command,
            match &self.repaired {
                Ok(d) => format!("{} ms", d.as_millis()),
                Err(e) => format!("NO ({e})"),
            },
            a.udp,
            a.tcp,
            s.udp,
            s.tcp.attempts,
            s.tcp.refused,
            s.tcp.connected,
            s.tcp.other,
            a.vpc_udp,
            s.vpc_udp,
            a.vpc_tcp,
            s.vpc_tcp.attempts,
            a.staging_udp,
            s.staging_udp,
            if self.problems.is_empty() {
                "ok"
            } else {
                "FAILED"
            }
        )
    }
}

impl Walk {
    /// A cell with one app and one staging container, the agent running with the shipped
    /// interval, its tables installed, the destination counters watching. With `stand_in`,
    /// the test holds an owned table of its own (see [`OwnedStandIn`]) and the walk tampers
    /// with that one instead of [`OWNED`]. With `hostname_rule`, the DNS filter is on with a
    /// rule for [`PARTNER`] (TCP 443 only) and the app has learned its answer, the internet
    /// host, for the whole walk.
    fn new(stand_in: bool, hostname_rule: bool) -> Walk {
        let mut cell = Cell::new();
        let app = cell.add_container("app1", Kind::App);
        let stg = cell.add_container("stg1", Kind::Staging);
        let mut config = cell.agent_config();
        // The shipped default: repairs must come from events, not the timer.
        config.reconcile_interval = "10s".into();
        let resolver = hostname_rule.then(|| {
            cell.stop_resolver_stand_in();
            // Ten minutes: the learned address outlives the walk.
            config.dns = Some(format!(
                "enabled = true\nupstream = \"{RESOLVER}:53\"\nanswer_ttl_min = \"10m\"\n\
                 answer_ttl_max = \"10m\"\n"
            ));
            config.rules = Some(format!(
                "[[rules]]\ndestination = \"{}\"\nprotocol = \"tcp\"\nports = \"443\"\n",
                PARTNER.trim_end_matches('.')
            ));
            PartnerResolver::start(&cell.cell)
        });
        cell.start_agent_with(&config);
        let took = cell.wait_exempt(&[stg.ip], READY);
        eprintln!("agent ready after {took:?}");
        if hostname_rule {
            let start = Instant::now();
            while resolve_partner(&app.ns) != vec![INET_HOST] {
                assert!(
                    start.elapsed() < READY,
                    "the app never got the hostname rule's answer"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            for table in [TABLE, OWNED] {
                let learned = cell.nft(&["list", "map", "inet", table, "learned4"]);
                assert!(
                    learned.contains(&INET_HOST.to_string()),
                    "{table} holds the learned address:\n{learned}"
                );
            }
        }
        let installed = cell
            .fingerprint()
            .expect("table inet egress_guard installed");
        let stand_in = stand_in.then(|| OwnedStandIn::start(&cell, &stg));
        let owned_name = if stand_in.is_some() { STAND_IN } else { OWNED };
        // Both tables come in one batch; a little grace all the same.
        let start = Instant::now();
        let mut owned = cell.table_shape(owned_name);
        while owned.is_none() && start.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(50));
            owned = cell.table_shape(owned_name);
        }
        cell.assert_rejected("app1", INET_HOST, "before the walk: app -> internet");
        cell.assert_open("app1", VPC_HOST, "before the walk: app -> VPC");
        cell.assert_open("stg1", INET_HOST, "before the walk: staging -> internet");
        cell.watch_inet_ingress(app.ip);
        cell.watch_inet_ingress(stg.ip);
        cell.watch_ingress(&cell.vpc.clone(), app.ip);
        Walk {
            cell,
            config,
            app,
            stg,
            installed,
            owned_name,
            owned,
            _stand_in: stand_in,
            _resolver: resolver,
        }
    }

    /// Waits until the agent runs and both tables are back as installed.
    fn wait_repaired(&mut self, start: Instant) -> Result<Duration, String> {
        loop {
            if let Some(status) = self.cell.agent().exit_status() {
                return Err(format!("the agent exited ({status})"));
            }
            let table = self.cell.fingerprint();
            let owned = self
                .owned
                .as_ref()
                .map(|_| self.cell.table_shape(self.owned_name));
            let table_ok = table.as_ref() == Some(&self.installed);
            let owned_ok = owned.as_ref().is_none_or(|o| o == &self.owned);
            if table_ok && owned_ok {
                return Ok(start.elapsed());
            }
            if start.elapsed() > REPAIR_TIMEOUT {
                let state = |ok: bool, present: bool| match (ok, present) {
                    (true, _) => "as installed",
                    (false, true) => "present but changed",
                    (false, false) => "absent",
                };
                return Err(format!(
                    "not repaired within {REPAIR_TIMEOUT:?}: inet {TABLE} {}, inet {} {}",
                    state(table_ok, table.is_some()),
                    self.owned_name,
                    state(owned_ok, owned.flatten().is_some())
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Runs one disruption with the streams running from before it until after the repair,
    /// and checks what arrived.
    fn step(&mut self, tamper: Tamper) -> Step {
        let mut problems = Vec::new();
        let before = Arrived::read(&self.cell, &self.app, &self.stg);
        let traffic = Traffic::start(&self.app, &self.stg);
        std::thread::sleep(PRE_ROLL);

        let start = Instant::now();
        let command = match tamper.command(self.owned_name) {
            Some((words, expect)) => {
                let args: Vec<&str> = words[1..].iter().map(String::as_str).collect();
                let out = ns_try_run(&self.cell.cell, &words[0], &args, None);
                let stderr = String::from_utf8_lossy(&out.stderr);
                match expect {
                    Expect::Accepted if !out.status.success() => problems.push(format!(
                        "the command should have been accepted, but failed: {}",
                        show(&out)
                    )),
                    Expect::Refused if out.status.success() => problems.push(format!(
                        "the kernel should have refused the command with \"Operation not \
                         permitted\" (the table is owned by the agent's socket), but it succeeded: {}",
                        show(&out)
                    )),
                    Expect::Refused if !stderr.contains("Operation not permitted") => {
                        problems.push(format!(
                            "the command should have been refused with \"Operation not \
                             permitted\" (the table is owned by the agent's socket), but failed \
                             otherwise: {}",
                            show(&out)
                        ));
                    }
                    _ => {}
                }
                if out.status.success() {
                    "accepted".to_string()
                } else {
                    format!(
                        "refused: {}",
                        stderr.lines().next().unwrap_or_default().trim()
                    )
                }
            }
            None => {
                let status = if tamper == Tamper::Kill9AndRestart {
                    self.cell.agent().kill9();
                    "killed".to_string()
                } else {
                    self.cell.agent().terminate()
                };
                std::thread::sleep(AGENT_DOWN);
                let config = self.config.clone();
                self.cell.start_agent_with(&config);
                format!(
                    "agent {status}, down {} ms, restarted",
                    AGENT_DOWN.as_millis()
                )
            }
        };
        let repaired = self.wait_repaired(start);
        if tamper == Tamper::IptablesAcceptAll {
            let out = self
                .cell
                .iptables("iptables", &["-D", "FORWARD", "-j", "ACCEPT"]);
            assert!(
                out.status.success(),
                "cleanup: iptables -D FORWARD -j ACCEPT: {}",
                show(&out)
            );
        }
        std::thread::sleep(SETTLE);
        let sent = traffic.stop();
        // Let the last packets in flight land.
        std::thread::sleep(Duration::from_millis(100));
        let arrived = Arrived::read(&self.cell, &self.app, &self.stg).since(before);

        if arrived.udp + arrived.tcp > 0 {
            problems.insert(
                0,
                format!(
                    "LEAKED {} restricted packets to the internet namespace ({} UDP, {} TCP)",
                    arrived.udp + arrived.tcp,
                    arrived.udp,
                    arrived.tcp
                ),
            );
        }
        if let Err(e) = &repaired {
            problems.push(format!("the agent did not repair: {e}"));
        }
        for (what, n) in [
            ("restricted UDP datagrams", sent.udp),
            ("restricted TCP connection attempts", sent.tcp.attempts),
            ("UDP datagrams to the VPC", sent.vpc_udp),
            ("TCP connection attempts to the VPC", sent.vpc_tcp.attempts),
            ("staging UDP datagrams", sent.staging_udp),
        ] {
            if n < FLOOR {
                problems.push(format!(
                    "only {n} {what} were sent (floor {FLOOR}): zero leaks would prove little"
                ));
            }
        }
        for (what, got, of) in [
            ("the VPC received (UDP)", arrived.vpc_udp, sent.vpc_udp),
            (
                "the VPC received (TCP)",
                arrived.vpc_tcp,
                sent.vpc_tcp.attempts,
            ),
            (
                "the internet namespace received from staging",
                arrived.staging_udp,
                sent.staging_udp,
            ),
        ] {
            if got * 2 < of {
                problems.push(format!(
                    "control: {what} only {got} of {of}: allowed traffic must keep flowing"
                ));
            }
        }
        Step {
            label: tamper.label(self.owned_name),
            command,
            repaired,
            sent,
            arrived,
            problems,
        }
    }
}

// ------------------------------------------------------------------ tests

/// Runs every step of the walk in turn and fails with a per-step report if any step leaked,
/// got the wrong answer to its command, was not repaired, or sent or delivered too little.
fn walk_all(walk: &mut Walk) {
    let started = Instant::now();
    let mut failures = Vec::new();
    if walk.owned.is_none() {
        failures.push(format!(
            "setup: table inet {} does not exist (NFT_TABLE_F_OWNER, held by the agent's \
             socket), so nothing is left to reject while inet {TABLE} is flushed or deleted",
            walk.owned_name
        ));
    }

    let mut steps: Vec<Step> = Vec::new();
    for tamper in Tamper::ALL {
        let step = walk.step(tamper);
        eprintln!("{}", step.line());
        let stop = step.repaired.is_err();
        steps.push(step);
        if stop {
            // The next step would start from a damaged cell and prove nothing.
            break;
        }
    }
    walk.cell.agent().assert_running();

    let mut report = String::from("per step (counted at the destinations):\n");
    for step in &steps {
        let _ = writeln!(report, "  {}", step.line());
    }
    for tamper in Tamper::ALL.iter().skip(steps.len()) {
        let _ = writeln!(
            report,
            "  {:<58} | not run (the previous step was not repaired)",
            tamper.label(walk.owned_name)
        );
    }
    let _ = writeln!(report, "walk took {:?}", started.elapsed());
    eprintln!("{report}");

    for step in &steps {
        for p in &step.problems {
            failures.push(format!("{}: {p}", step.label));
        }
    }
    if steps.len() < Tamper::ALL.len() {
        failures.push(format!(
            "{} of {} steps not run",
            Tamper::ALL.len() - steps.len(),
            Tamper::ALL.len()
        ));
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n  - {}\n\n{report}",
        failures.len(),
        failures.join("\n  - ")
    );
}

/// Continuous restricted TCP and UDP from a running app container while, in turn: the ruleset
/// is flushed, `egress_guard` is deleted, `egress_guard_owned` is deleted and loosened (both
/// must be refused with EPERM), an accept is inserted into `egress_guard`, iptables accepts
/// everything, the agent is killed with kill -9 and restarted, and stopped with SIGTERM and
/// restarted. Not one restricted packet may arrive in any step; the VPC and a staging container
/// keep receiving; after each step the agent has repaired both tables before the next.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn no_restricted_packet_gets_out_under_any_single_tampering() {
    walk_all(&mut Walk::new(false, false));
}

/// The same walk with a hostname rule whose answer (the internet host, TCP 443 only) the app
/// has learned: the streams to that host's port 9 stay rejected through every fault.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn no_restricted_packet_gets_out_under_any_single_tampering_with_a_learned_hostname() {
    let mut walk = Walk::new(false, true);
    walk_all(&mut walk);
    for table in [TABLE, OWNED] {
        let learned = walk.cell.nft(&["list", "map", "inet", table, "learned4"]);
        assert!(
            learned.contains(&INET_HOST.to_string()),
            "after the walk (two restarts, two repairs), {table} still holds the learned \
             address:\n{learned}"
        );
    }
}

/// Harness self-check: the same walk passes when an owned table holds the agent's rules (here a
/// stand-in the test keeps with `nft -i`, beside whatever the agent keeps). So the walk can be
/// passed, the refusals are the kernel's EPERM as the walk expects it, and a failure of the walk
/// above is the agent's, not the harness's.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn harness_walk_passes_while_an_owned_table_holds_the_rules() {
    walk_all(&mut Walk::new(true, false));
}

/// The agent installs its rules, repairs a deleted table and reports the kernel's reject
/// counters with no `nft` anywhere on its `PATH`. This test still uses nft (from its own PATH)
/// as an independent witness of what the kernel holds.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn agent_enforces_repairs_and_counts_without_nft_on_its_path() {
    const PATH: &str = "/usr/local/bin:/usr/bin:/bin";
    for dir in PATH.split(':') {
        let nft = std::path::Path::new(dir).join("nft");
        assert!(
            !nft.exists(),
            "{} exists: this PATH would not hide nft from the agent",
            nft.display()
        );
    }
    let mut cell = Cell::new();
    let stg = cell.add_container("stg1", Kind::Staging);
    cell.add_container("app1", Kind::App);
    let mut config = cell.agent_config();
    config.env.push(("PATH".into(), PATH.into()));
    let port = config.health_port;
    let pid = cell.start_agent_with(&config).pid();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|v| v == format!("PATH={PATH}").as_bytes()),
        "the agent (pid {pid}) does not run with PATH={PATH}"
    );

    // Enforces: the table appears with the staging container exempt.
    let start = Instant::now();
    while cell.exempt_ips() != Some(vec![stg.ip]) {
        cell.agent().assert_running();
        assert!(
            start.elapsed() < READY,
            "with no nft on its PATH ({PATH}) the agent did not install table inet {TABLE} \
             exempting {} within {READY:?}; found: {:?}",
            stg.ip,
            cell.exempt_ips()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("no nft: table installed after {:?}", start.elapsed());
    let installed = cell.fingerprint().expect("table installed");
    cell.assert_rejected("app1", INET_HOST, "no nft: app -> internet");
    cell.assert_open("app1", VPC_HOST, "no nft: app -> VPC");
    cell.assert_open("stg1", INET_HOST, "no nft: staging -> internet");
    support::wait_until(READY, "/readyz 200 with no nft on the agent's PATH", || {
        http::try_get(&cell.cell, port, "/readyz").is_ok_and(|r| r.code == 200)
    });

    // Reports counters: the probes above were rejected, so the metric counts them.
    let rejected = |cell: &Cell| -> Option<f64> {
        let r = http::try_get(&cell.cell, port, "/metrics").ok()?;
        http::metric(&r.body, "egress_guard_rejected_packets_total")
    };
    let mut first = None;
    support::wait_until(
        Duration::from_secs(5),
        "egress_guard_rejected_packets_total > 0 with no nft on the agent's PATH",
        || {
            first = rejected(&cell).filter(|v| *v > 0.0);
            first.is_some()
        },
    );
    let first = first.expect("checked above");

    // Repairs: the table deleted behind its back comes back as it was.
    cell.nft(&["delete", "table", "inet", TABLE]);
    let start = Instant::now();
    while cell.fingerprint().as_ref() != Some(&installed) {
        cell.agent().assert_running();
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "with no nft on its PATH the agent did not repair a deleted table inet {TABLE} \
             within 3 s (1 s interval); found: {:?}",
            cell.fingerprint()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    eprintln!("no nft: deleted table repaired after {:?}", start.elapsed());
    cell.assert_rejected(
        "app1",
        INET_HOST,
        "no nft: app -> internet after the repair",
    );
    cell.assert_open("stg1", INET_HOST, "no nft: staging after the repair");

    // The counter keeps growing across the rebuild (the kernel's counters restart at 0).
    let mut last = None;
    support::wait_until(
        Duration::from_secs(5),
        "egress_guard_rejected_packets_total to grow after the repair",
        || {
            last = rejected(&cell);
            last.is_some_and(|v| v > first)
        },
    );
    eprintln!(
        "no nft: rejected_packets_total {first} before the repair, {} after",
        last.expect("checked above")
    );
    cell.agent().assert_running();
}
