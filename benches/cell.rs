//! egress-guard on a simulated cell, side by side with silk-style per-container iptables
//! chains. Needs root; everything happens in scratch network namespaces (`egb-<pid>-…`) that
//! are deleted at the end (and, if a run was killed, at the start of the next one).
//!
//! Run: `cargo bench --bench cell` (about 13 minutes on 2 cores). Knobs (environment):
//!
//! | variable                        | default                         | what                        |
//! |---------------------------------|---------------------------------|-----------------------------|
//! | `EGRESS_GUARD_BENCH_COUNTS`     | `10,100,250,1000,5000`          | container counts            |
//! | `EGRESS_GUARD_BENCH_REPS`       | `20`                            | passes measured per kind    |
//! | `EGRESS_GUARD_BENCH_SAMPLES`    | `200`                           | exemption samples per count |
//! | `EGRESS_GUARD_BENCH_IDLE_SECS`  | `10`                            | idle footprint window       |
//! | `EGRESS_GUARD_BENCH_PPS_SECS`   | `1`                             | one traffic run             |
//! | `EGRESS_GUARD_BENCH_PPS_REPS`   | `9`                             | interleaved rounds          |
//! | `EGRESS_GUARD_BENCH_IPTABLES`   | `iptables-nft,iptables-legacy`  | silk baselines to measure   |
//!
//! Per count N the cell holds N filler containers (veth with its peer parked + /32 route + store entry: 90%
//! app, 5% task, 5% staging), one real restricted app container that sends traffic, and one
//! real staging namespace re-wired for every exemption sample. The data path is measured in
//! rounds, each of which runs every configuration once, in turn (no filtering, egress-guard's
//! two tables with the daemon running, its persistent table alone as the daemon leaves it when
//! it stops, which is the previous single-table layout, then each silk baseline), so that
//! drift in the machine's speed hits all of them alike; medians and ranges over the rounds are
//! reported. Results are printed as Markdown tables on stdout; progress goes to stderr.
//! Figures, not pass/fail.

mod cell_support;
mod common;

use std::net::Ipv4Addr;
use std::time::Instant;

use cell_support::cell::{INET_HOST, ScratchCell, VPC_HOST};
use cell_support::daemon::Daemon;
use cell_support::measure::{self, ControlResult, ExemptResult, Footprint, Pps};
use cell_support::probe::Prober;
use cell_support::silk;
use common::Workload;

struct Options {
    counts: Vec<usize>,
    reps: usize,
    samples: usize,
    idle_secs: f64,
    pps_secs: f64,
    pps_reps: usize,
    iptables: Vec<String>,
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    match std::env::var(key) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{key}={v:?} does not parse")),
        Err(_) => default,
    }
}

impl Options {
    fn from_env() -> Options {
        let list = |key: &str, default: &str| -> Vec<String> {
            std::env::var(key)
                .unwrap_or_else(|_| default.to_string())
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let mut counts: Vec<usize> = list("EGRESS_GUARD_BENCH_COUNTS", "10,100,250,1000,5000")
            .iter()
            .map(|c| c.parse().unwrap_or_else(|_| panic!("bad count {c:?}")))
            .collect();
        counts.sort_unstable();
        counts.dedup();
        Options {
            counts,
            reps: env_or("EGRESS_GUARD_BENCH_REPS", 20usize).max(1),
            samples: env_or("EGRESS_GUARD_BENCH_SAMPLES", 200usize),
            idle_secs: env_or("EGRESS_GUARD_BENCH_IDLE_SECS", 10.0f64),
            pps_secs: env_or("EGRESS_GUARD_BENCH_PPS_SECS", 1.0f64),
            pps_reps: env_or("EGRESS_GUARD_BENCH_PPS_REPS", 9usize).max(1),
            iptables: list(
                "EGRESS_GUARD_BENCH_IPTABLES",
                "iptables-nft,iptables-legacy",
            ),
        }
    }
}

/// Data path runs of one configuration, one per round.
#[derive(Clone, Debug, Default)]
struct PathRuns {
    allowed: Vec<Pps>,
    rejected: Vec<Pps>,
}

/// The configurations the data path compares, in the order each round runs them.
const EGRESS_GUARD: &str = "egress-guard";
const SINGLE_TABLE: &str = "egress-guard, single table";
const NO_FILTERING: &str = "no filtering";

struct Row {
    n: usize,
    control: ControlResult,
    exempt: ExemptResult,
    idle: Footprint,
    /// Per configuration: its runs and the rules it puts in the filter table.
    paths: Vec<(String, PathRuns, usize)>,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and no side effects.
    unsafe { nix::libc::geteuid() == 0 }
}

fn first_line(program: &str, args: &[&str]) -> String {
    let out = cell_support::cmd::try_run(program, args, None);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("?")
        .trim()
        .to_string()
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or("?".into(), |kib| format!("{} GiB", kib / 1024 / 1024));
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|s| s.trim_matches('"').to_string())
        .unwrap_or_else(|| "?".into());
    format!(
        "{model}, {cores} cores, {mem}; {os}, Linux {}; {}; {}",
        first_line("uname", &["-r"]),
        first_line("nft", &["--version"]),
        first_line("iptables-legacy", &["--version"]).replace(" (legacy)", ""),
    )
}

/// One allowed and one rejected run.
fn datapath(
    cell: &ScratchCell,
    app: &cell_support::cell::RealContainer,
    o: &Options,
    into: &mut PathRuns,
) {
    into.allowed
        .push(measure::pps(cell, app, VPC_HOST, &cell.vpc, o.pps_secs));
    into.rejected
        .push(measure::pps(cell, app, INET_HOST, &cell.inet, o.pps_secs));
}

/// Starts the daemon and waits until both tables hold every exemption.
fn start_daemon(cell: &ScratchCell, name: usize, expected_exempt: usize) -> Daemon {
    let mut daemon = Daemon::start(&cell.cell, cell.dir(), name, &cell.store.path());
    daemon.wait(
        std::time::Duration::from_secs(30),
        "both tables and their exempt sets",
        || cell.exempt_len() == expected_exempt,
    );
    daemon
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --benches` runs bench targets without --bench: nothing to test here.
        eprintln!("cell bench: run it with `cargo bench --bench cell` (as root)");
        return;
    }
    if !is_root() {
        eprintln!("cell bench skipped: it needs root (network namespaces, nftables, iptables)");
        return;
    }
    let o = Options::from_env();
    let started = Instant::now();
    let load_before = loadavg();
    let machine = machine();
    eprintln!("machine: {machine}");

    let mut cell = ScratchCell::new();
    let app = cell.add_real("app0", Ipv4Addr::new(10, 255, 99, 2), Workload::App);
    let stg_ns = cell.add_ns("stg");
    let prober = Prober::start(&stg_ns);
    let mut rows = Vec::new();

    for (k, &n) in o.counts.iter().enumerate() {
        let t = Instant::now();
        eprintln!("== {n} containers: wiring fillers");
        cell.grow_fillers(n);
        let expected_exempt = n.div_ceil(20);

        eprintln!("== {n}: control plane ({} passes of each kind)", o.reps);
        cell.delete_table();
        let control = measure::control_plane(&cell, o.reps);

        eprintln!("== {n}: daemon idle ({} s)", o.idle_secs);
        cell.delete_table();
        let mut daemon = start_daemon(&cell, k * 1000, expected_exempt);
        let idle = measure::idle(&mut daemon, o.idle_secs);

        eprintln!("== {n}: time to exemption and back ({} samples)", o.samples);
        let exempt = measure::exemption(&cell, &mut daemon, &prober, &stg_ns, o.samples);
        for f in exempt.failures.iter().take(5) {
            eprintln!("   failure: {f}");
        }
        let log = daemon.log_text();
        daemon.stop();
        if !log.trim().is_empty() {
            eprintln!("   daemon log (warn and above):\n{log}");
        }

        eprintln!("== {n}: data path ({} interleaved rounds)", o.pps_reps);
        let silk_rules = silk::rules(n, (&app.handle, app.ip, Workload::App));
        let mut modes: Vec<String> = vec![
            NO_FILTERING.to_string(),
            EGRESS_GUARD.to_string(),
            SINGLE_TABLE.to_string(),
        ];
        modes.extend(o.iptables.iter().map(|t| format!("silk {t}")));
        let mut runs: Vec<PathRuns> = vec![PathRuns::default(); modes.len()];
        let mut rule_counts = vec![0usize; modes.len()];
        rule_counts[1] = 5;
        rule_counts[2] = 5;
        for round in 0..o.pps_reps {
            // no filtering: neither table, no silk rules.
            cell.delete_table();
            datapath(&cell, &app, &o, &mut runs[0]);
            // egress-guard: the daemon running, both tables.
            let daemon = start_daemon(&cell, k * 1000 + 1 + round, expected_exempt);
            datapath(&cell, &app, &o, &mut runs[1]);
            // Its persistent table alone: what the daemon leaves when it stops, the same
            // table the previous single-table agent kept.
            daemon.stop();
            assert!(
                !cell.has_owned_table(),
                "the owned table goes with the daemon"
            );
            assert_eq!(cell.exempt_len_in("egress_guard"), expected_exempt);
            datapath(&cell, &app, &o, &mut runs[2]);
            cell.delete_table();
            for (i, tool) in o.iptables.iter().enumerate() {
                let t_load = Instant::now();
                silk::load(&cell.cell, tool, &silk_rules);
                let count = silk::rule_count(&cell.cell, tool);
                if round == 0 {
                    eprintln!(
                        "   {tool}: {count} rules loaded in {:.1} s",
                        t_load.elapsed().as_secs_f64()
                    );
                }
                rule_counts[3 + i] = count;
                datapath(&cell, &app, &o, &mut runs[3 + i]);
                silk::flush(&cell.cell, tool);
            }
        }
        let paths = modes
            .into_iter()
            .zip(runs)
            .zip(rule_counts)
            .map(|((m, r), c)| (m, r, c))
            .collect();
        eprintln!("== {n}: done in {:.0} s", t.elapsed().as_secs_f64());
        rows.push(Row {
            n,
            control,
            exempt,
            idle,
            paths,
        });
    }
    drop(prober);
    drop(cell);
    let machine = format!(
        "{machine}. Load average (1 min) {load_before} at start, {} at end (other work on the machine shows up here)",
        loadavg()
    );
    print_report(&o, &machine, &rows, started.elapsed().as_secs_f64());
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string()
}

fn f1(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn f2(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.2}")
    }
}

fn kpps(v: f64) -> String {
    format!("{:.0}k", v / 1000.0)
}

fn print_report(o: &Options, machine: &str, rows: &[Row], secs: f64) {
    println!("### Cell benchmark\n");
    println!("Machine: {machine}. Run time {secs:.0} s.\n");
    let rules = cell_support::daemon::bench_rules();
    if rules > 0 {
        println!(
            "Configuration: {rules} `[[rules]]`, each scoped to 3 of the containers' {} spaces (every fifth also to an org), as `EGRESS_GUARD_BENCH_RULES={rules}` sets them.\n",
            common::SPACES
        );
    }

    println!(
        "**Control plane** (one `Reconciler::pass`, in-process, in the cell namespace; median of {} (p90); CPU = getrusage of the process; batch = bytes of the nf_tables batch written; full rebuild = `inet egress_guard` deleted, the owned table intact)\n",
        o.reps
    );
    println!(
        "| containers | no change: CPU ms | wall ms | verifying, no change: CPU ms | wall ms | +1 staging: CPU ms | wall ms | batch bytes | −1 staging: CPU ms | wall ms | batch bytes | full rebuild: CPU ms | wall ms | batch bytes |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let cw = |p: &measure::PassStats| {
        (
            format!("{} ({})", f2(p.cpu_ms.median()), f2(p.cpu_ms.pct(90.0))),
            format!("{} ({})", f2(p.wall_ms.median()), f2(p.wall_ms.pct(90.0))),
        )
    };
    for r in rows {
        let c = &r.control;
        let (a, b) = cw(&c.no_change);
        let (v, w) = cw(&c.verify);
        let (d, e) = cw(&c.add_one);
        let (g, h) = cw(&c.remove_one);
        let (j, k) = cw(&c.full);
        println!(
            "| {} | {a} | {b} | {v} | {w} | {d} | {e} | {} | {g} | {h} | {} | {j} | {k} | {} |",
            r.n, c.add_one.bytes, c.remove_one.bytes, c.full.bytes
        );
    }
    println!(
        "\nOne-container passes started as soon as the store watcher saw silk's write, as the daemon starts them (the table above times them 30 ms after the write, with the file's pages colder; median (p90)):\n"
    );
    println!("| containers | +1 staging: CPU ms | wall ms | −1 staging: CPU ms | wall ms |");
    println!("|---:|---:|---:|---:|---:|");
    for r in rows {
        let c = &r.control;
        let (d, e) = cw(&c.add_at_event);
        let (g, h) = cw(&c.remove_at_event);
        println!("| {} | {d} | {e} | {g} | {h} |", r.n);
    }
    println!(
        "\nWhere a no-change pass goes (each step timed on its own with the library's functions; median CPU ms / wall ms):\n"
    );
    println!("| containers | {} |", measure::STEPS.join(" | "));
    println!("|---:{}|", "|---:".repeat(measure::STEPS.len()));
    for r in rows {
        let cells: Vec<String> = r
            .control
            .steps
            .iter()
            .map(|(_, p)| format!("{} / {}", f2(p.cpu_ms.median()), f2(p.wall_ms.median())))
            .collect();
        println!("| {} | {} |", r.n, cells.join(" | "));
    }
    for r in rows {
        for (what, p) in [
            ("no change", &r.control.no_change),
            ("verifying", &r.control.verify),
            ("+1", &r.control.add_one),
            ("−1", &r.control.remove_one),
            ("+1 at the event", &r.control.add_at_event),
            ("−1 at the event", &r.control.remove_at_event),
            ("full", &r.control.full),
        ] {
            if !p.unexpected.is_empty() {
                println!(
                    "\n{} containers, {what}: {} unexpected pass(es), e.g. {}",
                    r.n,
                    p.unexpected.len(),
                    p.unexpected[0]
                );
            }
        }
    }

    println!(
        "\n**Time to exemption and back** (real daemon; ms from the start of silk's store write to the first connection from the new staging container / to the first refused one)\n"
    );
    println!(
        "| containers | samples | to exemption p50 | p99 | max | back to restricted p50 | p99 | max | failures |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let e = &r.exempt;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.n,
            e.to_exempt_ms.len(),
            f1(e.to_exempt_ms.median()),
            f1(e.to_exempt_ms.pct(99.0)),
            f1(e.to_exempt_ms.max()),
            f1(e.back_ms.median()),
            f1(e.back_ms.pct(99.0)),
            f1(e.back_ms.max()),
            e.failures.len()
        );
    }
    println!(
        "\nThe time to exemption split at the end of silk's write (the agent reads once silk releases its lock; ms):\n"
    );
    println!(
        "| containers | silk's write p50 | p99 | max | lock released -> first connection p50 | p99 | max |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let e = &r.exempt;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.n,
            f1(e.write_ms.median()),
            f1(e.write_ms.pct(99.0)),
            f1(e.write_ms.max()),
            f1(e.after_write_ms.median()),
            f1(e.after_write_ms.pct(99.0)),
            f1(e.after_write_ms.max()),
        );
    }

    println!(
        "\n**Data path** (one restricted app container, one sender thread, 18-byte UDP; packets/s into the cell; {} interleaved rounds of {} s per configuration and direction: median (min–max); ratios are the median (min–max) of the per-round ratios; allowed = to the VPC, all delivered; rejected = to the internet namespace, none delivered)\n",
        o.pps_reps, o.pps_secs
    );
    let modes: Vec<String> = rows
        .first()
        .map(|r| r.paths.iter().map(|p| p.0.clone()).collect())
        .unwrap_or_default();
    let others: Vec<&String> = modes
        .iter()
        .filter(|m| m.starts_with("silk") || *m == SINGLE_TABLE)
        .collect();
    for (label, pick) in [
        (
            "allowed",
            (|p: &PathRuns| &p.allowed) as fn(&PathRuns) -> &Vec<Pps>,
        ),
        ("rejected", |p: &PathRuns| &p.rejected),
    ] {
        let mut header = format!("| {label} | ");
        header.push_str(&modes.join(" | "));
        for s in &others {
            header.push_str(&format!(" | egress-guard ÷ {s}"));
        }
        println!("{header} |");
        println!("|---:{}|", "|---:".repeat(modes.len() + others.len()));
        for r in rows {
            let get = |m: &str| -> Vec<f64> {
                r.paths
                    .iter()
                    .find(|p| p.0 == m)
                    .map(|p| pick(&p.1).iter().map(|x| x.entered).collect())
                    .unwrap_or_default()
            };
            let mut line = format!("| {} ", r.n);
            for m in &modes {
                let d = measure::Dist::new(get(m));
                line.push_str(&format!(
                    "| {} ({}–{}) ",
                    kpps(d.median()),
                    kpps(d.pct(0.0)),
                    kpps(d.max())
                ));
            }
            let ours = get(EGRESS_GUARD);
            for s in &others {
                let ratios: Vec<f64> = ours.iter().zip(get(s)).map(|(a, b)| a / b).collect();
                let d = measure::Dist::new(ratios);
                line.push_str(&format!(
                    "| {:.2}× ({:.2}–{:.2}) ",
                    d.median(),
                    d.pct(0.0),
                    d.max()
                ));
            }
            println!("{line}|");
        }
        println!();
    }
    let leaks: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r.paths.iter().flat_map(move |(m, p, _)| {
                p.allowed.iter().zip(&p.rejected).filter_map(move |(a, j)| {
                    let allowed_lost = a.entered - a.delivered;
                    let rejected_through = j.delivered;
                    (m != NO_FILTERING
                        && (rejected_through > 0.0 || allowed_lost > a.entered * 0.01))
                        .then(|| {
                            format!(
                                "{} containers, {m}: rejected traffic delivered {:.0}/s, allowed traffic lost {:.0}/s",
                                r.n, rejected_through, allowed_lost
                            )
                        })
                })
            })
        })
        .collect();
    if leaks.is_empty() {
        println!(
            "Check: in every filtered run no rejected packet reached the internet namespace and ≥99% of allowed packets reached the VPC."
        );
    } else {
        for l in leaks {
            println!("Check failed: {l}");
        }
    }
    print!("\nRules in the filter table for the silk baseline:");
    for r in rows {
        if let Some((_, _, count)) = r.paths.iter().find(|p| p.0.starts_with("silk")) {
            print!(" {} at {};", count, r.n);
        }
    }
    println!(
        " egress-guard: the same rules and sets per table at every count (its per-container sets are elements, not rules).\n"
    );

    println!(
        "**Footprint of the daemon** (RSS from /proc; CPU = own (it runs no nft now), % of one core)\n"
    );
    println!(
        "| containers | RSS idle MiB | CPU idle % ({:.0} s) | RSS peak during churn MiB | CPU during churn % | churn (changes/s) |",
        o.idle_secs
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.n,
            f1(r.idle.rss_mib),
            f2(r.idle.cpu_pct),
            f1(r.exempt.churn.peak_rss_mib),
            f1(r.exempt.churn.cpu_pct),
            f1(r.exempt.changes_per_sec)
        );
    }
}
