//! How long a hostname rule's answer waits for the kernel (issue 23: "DNS answer -> address
//! allowed p99 <= 1 ms, also while a 5,000-container cell churns"). Needs root; everything
//! happens in scratch namespaces (`egb-<pid>-…`), deleted at the end.
//!
//! Run: `cargo bench --bench dns_learn` (about a minute). Knobs (environment):
//! `EGRESS_GUARD_BENCH_COUNTS` (default `250,5000`), `EGRESS_GUARD_BENCH_QUERIES` (default
//! 2000 per kind and phase).
//!
//! The cell's resolver is a thread of this process on 169.254.0.2:53 (in the cell namespace):
//! it answers `api.partner.example` (a hostname rule's name) and `web.apps.internal` (an
//! allowed suffix, relayed without learning) and notes the instant it sends each answer. A
//! restricted app container asks over UDP, one query after the other; the agent redirects,
//! forwards, and for the rule's name has the kernel allow the answer's address before it
//! relays the answer. What is measured is upstream answer sent -> answer received by the
//! app: an upper bound on "answer -> address allowed" (the address is allowed before the
//! answer is relayed), with the relay of a plain answer beside it. Each phase runs idle and
//! while the cell churns (a filler's store entry removed and written back, and a container's
//! veth created and deleted, about 40 changes a second). Figures, not pass/fail.

// The cell bench's support, of which this bench uses a part.
#[allow(dead_code, unused_imports)]
mod cell_support;
mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

use cell_support::cell::{INET_HOST, ScratchCell};
use cell_support::cmd::ip_batch;
use cell_support::daemon::Daemon;
use common::Workload;

const RESOLVER: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 2);
const LEARNED: &str = "api.partner.example.";
const PLAIN: &str = "web.apps.internal.";

/// When the resolver sent the answer with each id.
type Sent = Arc<Mutex<HashMap<u16, Instant>>>;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn resolver(ns: &str, stop: Arc<AtomicBool>, sent: Sent) -> std::thread::JoinHandle<()> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        cell_support::cmd::enter_netns(&ns);
        let socket = UdpSocket::bind((RESOLVER, 53)).expect("bind the resolver");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let mut buf = [0u8; 1500];
        while !stop.load(Ordering::Relaxed) {
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
            let address = if question.name().to_lowercase().to_ascii() == LEARNED {
                INET_HOST
            } else {
                Ipv4Addr::new(10, 0, 0, 99)
            };
            answer.add_answer(Record::from_rdata(
                question.name().clone(),
                60,
                RData::A(A(address)),
            ));
            answer.add_query(question);
            let Ok(bytes) = answer.to_vec() else { continue };
            let at = Instant::now();
            if socket.send_to(&bytes, from).is_ok() {
                sent.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(query.metadata.id, at);
            }
        }
    })
}

/// `queries` lookups of each name, alternating, from `ns`: the microseconds from the
/// resolver's answer to the app's receipt, per name.
fn measure(ns: &str, sent: &Sent, queries: usize, first_id: u16) -> (Vec<f64>, Vec<f64>) {
    let ns = ns.to_string();
    let sent = sent.clone();
    std::thread::spawn(move || {
        cell_support::cmd::enter_netns(&ns);
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let (mut learned, mut plain) = (Vec::new(), Vec::new());
        let mut buf = [0u8; 1500];
        for i in 0..queries * 2 {
            let id = first_id.wrapping_add(i as u16);
            let name = if i % 2 == 0 { LEARNED } else { PLAIN };
            let mut message = Message::new(id, MessageType::Query, OpCode::Query);
            message.metadata.recursion_desired = true;
            message.add_query(Query::query(
                Name::from_ascii(name).expect("name"),
                RecordType::A,
            ));
            let bytes = message.to_vec().expect("encodes");
            socket.send_to(&bytes, (RESOLVER, 53)).expect("send");
            let received = loop {
                match socket.recv_from(&mut buf) {
                    Ok((len, _)) => {
                        if Message::from_vec(&buf[..len]).is_ok_and(|m| m.metadata.id == id) {
                            break Some(Instant::now());
                        }
                    }
                    Err(_) => break None,
                }
            };
            let answered = sent.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            if let (Some(received), Some(answered)) = (received, answered) {
                let us = received.saturating_duration_since(answered).as_secs_f64() * 1e6;
                if i % 2 == 0 {
                    learned.push(us);
                } else {
                    plain.push(us);
                }
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        (learned, plain)
    })
    .join()
    .expect("the measuring thread")
}

/// Store and link changes until `stop`: about 40 a second.
fn churn(cell: &ScratchCell, churn_ns: &str, stop: &AtomicBool) -> usize {
    let mut changes = 0;
    let handle = common::handle(0, 0);
    let mut entries = cell.store.entries().clone();
    let entry = entries.get(&handle).cloned().expect("filler 0");
    let ip = Ipv4Addr::new(10, 255, 98, 2);
    while !stop.load(Ordering::Relaxed) {
        entries.remove(&handle);
        cell.store
            .write_raw(&serde_json::to_vec(&entries).expect("json"));
        let dev = cell.wire(churn_ns, ip);
        entries.insert(handle.clone(), entry.clone());
        cell.store
            .write_raw(&serde_json::to_vec(&entries).expect("json"));
        cell.unwire(&dev);
        changes += 4;
        std::thread::sleep(Duration::from_millis(100));
    }
    changes
}

struct Phase {
    n: usize,
    churn: Option<f64>,
    learned: Vec<f64>,
    plain: Vec<f64>,
    /// The agent's own `egress_guard_dns_learn_wait_seconds` over the phase: (upper bound,
    /// answers) per bucket, not cumulative.
    waited: Vec<(f64, u64)>,
}

/// The daemon's health port in this bench's configuration.
const HEALTH_PORT: u16 = 19952;

/// The cumulative buckets of the agent's learn-wait histogram: (le, count).
fn learn_wait_buckets(ns: &str) -> Vec<(f64, u64)> {
    let metrics = egress_guard_testkit::http::get(ns, HEALTH_PORT, "/metrics").body;
    metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("egress_guard_dns_learn_wait_seconds_bucket{le=\"")?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// What the histogram gained between two readings, per bucket.
fn gained(before: &[(f64, u64)], after: &[(f64, u64)]) -> Vec<(f64, u64)> {
    let mut previous = 0;
    after
        .iter()
        .map(|&(le, total)| {
            let was = before.iter().find(|(b, _)| *b == le).map_or(0, |(_, c)| *c);
            let cumulative = total.saturating_sub(was);
            let in_bucket = cumulative.saturating_sub(previous);
            previous = cumulative;
            (le, in_bucket)
        })
        .collect()
}

/// The bucket bound under which `p` % of the answers fall, in µs ("≤ bound").
fn bucket_percentile(buckets: &[(f64, u64)], p: f64) -> String {
    let total: u64 = buckets.iter().map(|(_, c)| c).sum();
    if total == 0 {
        return "–".into();
    }
    let mut seen = 0;
    for &(le, count) in buckets {
        seen += count;
        if seen as f64 >= total as f64 * p / 100.0 {
            return if le.is_finite() {
                format!("≤ {:.0}", le * 1e6)
            } else {
                "> 2.5 s".into()
            };
        }
    }
    "–".into()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn row(label: &str, values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    format!(
        "{label} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
        values.len(),
        percentile(values, 50.0),
        percentile(values, 90.0),
        percentile(values, 99.0),
        values.last().copied().unwrap_or(f64::NAN)
    )
}

fn config(store: &std::path::Path) -> String {
    format!(
        "enabled = true\n\
         overlay_network = \"10.255.0.0/16\"\n\
         allowed_networks = [\"10.0.0.0/8\"]\n\
         exempt_workloads = [\"staging\"]\n\
         metadata_store = {:?}\n\
         reconcile_interval = \"10s\"\n\
         \n[log]\nlevel = \"warn\"\nformat = \"text\"\n\
         \n[health]\nlisten = \"127.0.0.1:{HEALTH_PORT}\"\n\
         \n[dns]\nenabled = true\nallowed_suffixes = [\"apps.internal.\"]\n\
         upstream = \"{RESOLVER}:53\"\nlisten = \"0.0.0.0:9853\"\n\
         per_container_qps = 100000\nper_container_burst = 100000\n\
         \n[[rules]]\ndestination = \"api.partner.example\"\nprotocol = \"tcp\"\nports = \"443\"\n",
        store.display().to_string()
    )
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("dns_learn bench: run it with `cargo bench --bench dns_learn` (as root)");
        return;
    }
    // SAFETY: geteuid has no preconditions and no side effects.
    if unsafe { nix::libc::geteuid() } != 0 {
        eprintln!("dns_learn bench skipped: it needs root");
        return;
    }
    let counts: Vec<usize> = std::env::var("EGRESS_GUARD_BENCH_COUNTS")
        .unwrap_or_else(|_| "250,5000".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let queries = env_or("EGRESS_GUARD_BENCH_QUERIES", 2000usize);
    let mut phases = Vec::new();
    let mut cell = ScratchCell::new();
    ip_batch(&cell.cell, &format!("addr add {RESOLVER}/32 dev lo\n"));
    let app = cell.add_real("app0", Ipv4Addr::new(10, 255, 99, 2), Workload::App);
    let churn_ns = cell.add_ns("churn");
    let stop = Arc::new(AtomicBool::new(false));
    let sent: Sent = Arc::default();
    let resolver = resolver(&cell.cell, stop.clone(), sent.clone());
    let mut first_id = 1u16;
    for (k, &n) in counts.iter().enumerate() {
        eprintln!("== {n} containers: wiring fillers");
        cell.grow_fillers(n);
        cell.delete_table();
        let mut daemon =
            Daemon::start_with(&cell.cell, cell.dir(), 100 + k, &config(&cell.store.path()));
        daemon.wait(Duration::from_secs(60), "the tables", || {
            cell.has_owned_table()
        });
        std::thread::sleep(Duration::from_secs(2));
        // Warm up (first answers, allocation).
        let _ = measure(&app.ns, &sent, 50, first_id);
        first_id = first_id.wrapping_add(100);
        eprintln!("== {n}: idle ({queries} queries of each name)");
        let before = learn_wait_buckets(&cell.cell);
        let (learned, plain) = measure(&app.ns, &sent, queries, first_id);
        let waited = gained(&before, &learn_wait_buckets(&cell.cell));
        first_id = first_id.wrapping_add((queries * 2) as u16);
        phases.push(Phase {
            n,
            churn: None,
            learned,
            plain,
            waited,
        });
        eprintln!("== {n}: while the cell churns");
        let churning = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let before = learn_wait_buckets(&cell.cell);
        let (learned, plain, changes) = std::thread::scope(|scope| {
            let churner = scope.spawn(|| churn(&cell, &churn_ns, &churning));
            let (learned, plain) = measure(&app.ns, &sent, queries, first_id);
            churning.store(true, Ordering::Relaxed);
            let changes = churner.join().expect("churn thread");
            (learned, plain, changes)
        });
        let waited = gained(&before, &learn_wait_buckets(&cell.cell));
        first_id = first_id.wrapping_add((queries * 2) as u16);
        let rate = changes as f64 / started.elapsed().as_secs_f64();
        phases.push(Phase {
            n,
            churn: Some(rate),
            learned,
            plain,
            waited,
        });
        let log = daemon.log_text();
        daemon.stop();
        if !log.trim().is_empty() {
            eprintln!("   daemon log (warn and above):\n{log}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = resolver.join();

    println!(
        "\n### The agent's own: answer at the filter -> addresses allowed, microseconds \
         (egress_guard_dns_learn_wait_seconds; bucket bounds)\n"
    );
    println!("| containers | cell | answers | p50 | p90 | p99 | p99.9 |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for phase in &phases {
        let cell = match phase.churn {
            None => "idle".to_string(),
            Some(rate) => format!("churning ({rate:.0} changes/s)"),
        };
        let total: u64 = phase.waited.iter().map(|(_, c)| c).sum();
        println!(
            "| {} | {cell} | {total} | {} | {} | {} | {} |",
            phase.n,
            bucket_percentile(&phase.waited, 50.0),
            bucket_percentile(&phase.waited, 90.0),
            bucket_percentile(&phase.waited, 99.0),
            bucket_percentile(&phase.waited, 99.9),
        );
    }

    println!("\n### DNS answer to the app, microseconds (upstream answer sent -> app received)\n");
    println!("| containers | cell | name | answers | p50 | p90 | p99 | max |");
    println!("|---:|---|---|---:|---:|---:|---:|---:|");
    for mut phase in phases {
        let cell = match phase.churn {
            None => "idle".to_string(),
            Some(rate) => format!("churning ({rate:.0} changes/s)"),
        };
        let prefix = format!("| {} | {cell}", phase.n);
        println!(
            "{}",
            row(
                &format!("{prefix} | hostname rule (learned)"),
                &mut phase.learned
            )
        );
        println!(
            "{}",
            row(
                &format!("{prefix} | allowed suffix (relayed)"),
                &mut phase.plain
            )
        );
    }
}
