//! A live demonstration on a simulated cell (root): `cargo test --test demo -- --live`.
//!
//! Builds a cell in network namespaces (VPC 10.0.0.10, "internet" 203.0.113.10, app, task,
//! staging and health-check containers wired by the CNI `ptp` plugin, a silk-style store), runs
//! the real agent with the default configuration (store path and health port pointed at the
//! simulated cell), and every two seconds prints what `egress-guard status` says and what each
//! container's TCP, UDP and ICMP probes get. Along the way it kills the agent, restarts it,
//! flushes the ruleset and replaces the staging container by an app container on the same IP,
//! so the fail-closed behaviour can be watched.
//!
//! However it ends — Ctrl-C, SIGTERM, SIGHUP (a closed terminal), a broken output pipe, or
//! `--rounds N` — it removes everything it made (namespaces, their mounts, the agent and
//! anything else running in them, temporary files) before it exits, and says so. Output errors
//! never stop that: every line is written best effort, and a failed write (the reader or the
//! terminal is gone) is itself a reason to stop. At start it removes what earlier runs that are
//! gone (SIGKILL) left behind, and says what it removed.
//!
//! Without `--live` (as in a plain `cargo test`) it does nothing: it is a demo, not a test.

use egress_guard_testkit as support;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::{SigHandler, Signal, signal};
use support::cell::{Cell, INET_HOST, VPC_HOST};
use support::probe::{Reach, TcpOutcome, UdpOutcome};
use support::store::Kind;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: nix::libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Writes `text` to stdout, best effort: a write that fails (a closed terminal, a reader that
/// went away) asks the demo to stop instead of panicking, so the cleanup always runs.
fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    if out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        STOP.store(true, Ordering::SeqCst);
    }
}

macro_rules! say {
    ($($arg:tt)*) => { say(&format!("{}\n", format_args!($($arg)*))) };
}

/// Sleeps up to `total`, waking early when a stop is requested.
fn pause(total: Duration) {
    let until = std::time::Instant::now() + total;
    while !STOP.load(Ordering::SeqCst) && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--live") {
        say!("demo: skipped (it is a live demonstration: cargo test --test demo -- --live)");
        return;
    }
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse::<u32>().ok());
    support::require_root();
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        for stop in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            let _ = signal(stop, SigHandler::Handler(request_stop));
        }
    }
    for leftover in support::cell::sweep_stale() {
        say!("removed {leftover}, left by an earlier run that is gone");
    }

    say!("building a simulated cell…");
    let mut cell = Cell::new();
    run(&mut cell, rounds);
    say!("\nremoving the simulated cell (namespaces, the agent, temporary files)…");
    drop(cell);
    say!("removed; nothing of this demo is left.");
}

/// The demo proper, until the rounds are done or a stop is requested.
fn run(cell: &mut Cell, rounds: Option<u32>) {
    for (name, kind) in [
        ("app1", Kind::App),
        ("task1", Kind::Task),
        ("stg1", Kind::Staging),
        ("chk1", Kind::HealthCheck),
    ] {
        if stopping() {
            return;
        }
        let ctr = cell.add_container(name, kind);
        say!("  {name:<6} {:<15} on {}", ctr.ip, ctr.host_if);
    }
    let stg_ip = cell.ctr("stg1").ip;
    let port = cell.agent_config().health_port;
    cell.start_agent();
    cell.wait_exempt(&[stg_ip], Duration::from_secs(10));

    let mut round = 0u32;
    while !stopping() && rounds.is_none_or(|n| round < n) {
        round += 1;
        let event = match round {
            4 => {
                cell.agent().kill9();
                "the agent was killed with SIGKILL: table egress_guard stays (the owned one goes with the agent), app and task stay restricted"
            }
            6 => {
                cell.start_agent();
                "the agent was started again: it adopts table egress_guard and recreates its owned table, no window"
            }
            8 => {
                support::cmd::ns_run(&cell.cell, "nft", &["flush", "ruleset"]);
                "someone ran `nft flush ruleset`: the owned table is untouched and keeps rejecting; the agent puts egress_guard back within milliseconds"
            }
            9 => {
                let refused = support::cmd::ns_try_run(
                    &cell.cell,
                    "nft",
                    &["delete", "table", "inet", "egress_guard_owned"],
                    None,
                );
                if refused.status.success() {
                    "`nft delete table inet egress_guard_owned` was ACCEPTED: this kernel does not protect owned tables"
                } else {
                    "`nft delete table inet egress_guard_owned` was refused (Operation not permitted): only the agent may change it"
                }
            }
            10 => {
                cell.remove_container("stg1");
                cell.add_container_at("app2", Kind::App, Some(stg_ip));
                "staging container gone; a new app container got its IP: it is restricted"
            }
            _ => "",
        };
        pause(Duration::from_millis(500));
        say!("\n=== round {round} {}", "=".repeat(60));
        if !event.is_empty() {
            say!(">>> {event}");
        }
        let status = support::cmd::ns_try_run(
            &cell.cell,
            support::agent::bin(),
            &["status", "--addr", &format!("127.0.0.1:{port}")],
            None,
        );
        say(&String::from_utf8_lossy(&status.stdout));
        if !status.status.success() {
            say(&String::from_utf8_lossy(&status.stderr));
        }
        say!(
            "\n{:<7} {:<15} {:<48} → VPC 10.0.0.10",
            "PROBE",
            "FROM",
            "→ internet 203.0.113.10"
        );
        for ctr in cell.containers() {
            if stopping() {
                break;
            }
            let internet = cell.reach(&ctr.name, INET_HOST);
            let vpc = cell.reach(&ctr.name, VPC_HOST);
            say!(
                "{:<7} {:<15} {:<48} {}",
                ctr.name,
                ctr.ip.to_string(),
                describe(&internet),
                describe(&vpc)
            );
        }
        pause(Duration::from_millis(1500));
    }
}

/// One line per destination: OPEN, REJECTED, or the mix seen.
fn describe(reach: &Reach) -> String {
    if reach.is_open() {
        return "OPEN (tcp, udp, ping answered)".into();
    }
    let tcp = match &reach.tcp {
        TcpOutcome::Echoed => "tcp ok".to_string(),
        TcpOutcome::Refused(took) => format!("tcp reset {}ms", took.as_millis()),
        TcpOutcome::TimedOut => "tcp timeout".to_string(),
        TcpOutcome::ConnectedNoEcho(_) => "tcp no echo".to_string(),
        TcpOutcome::Error(e) => format!("tcp {e}"),
    };
    let udp = match &reach.udp {
        UdpOutcome::Echoed => "udp ok",
        _ => "udp dropped",
    };
    let icmp = if reach.icmp.0 { "ping ok" } else { "no ping" };
    let verdict = if reach.is_rejected() {
        "REJECTED"
    } else {
        "MIXED"
    };
    format!("{verdict} ({tcp}, {udp}, {icmp})")
}
