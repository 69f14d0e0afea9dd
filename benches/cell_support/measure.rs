//! The measurements: reconcile passes in-process, exemption latency and footprint with the
//! real binary, packets per second through the cell.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use egress_guard::config::Config;
use egress_guard::dataplane::netlink::events;
use egress_guard::dataplane::{AgentTable, Dataplane, SyncAction, TableAction};
use egress_guard::inventory::kernel::watch_events;
use egress_guard::inventory::store::StoreWatcher;
use egress_guard::inventory::store::read_store;
use egress_guard::inventory::{Inventory, KernelReader, KernelView};
use egress_guard::policy;
use egress_guard::reconcile::{Changes, PassReport, Reconciler};
use egress_guard::status::{SharedStatus, Status};

use super::cell::{RealContainer, SINK_PORT, ScratchCell};
use super::cmd::{enter_netns, ip_batch};
use super::daemon::{self, Daemon};
use super::probe::{Attempt, Prober, flood};
use super::usage::{ProcSample, cpu_self_and_children};
use crate::common::{self, Workload};

/// Sorted-sample summary.
#[derive(Clone, Debug, Default)]
pub struct Dist {
    sorted: Vec<f64>,
}

impl Dist {
    pub fn new(mut v: Vec<f64>) -> Dist {
        v.sort_by(f64::total_cmp);
        Dist { sorted: v }
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// Nearest-rank percentile (NaN when empty).
    pub fn pct(&self, p: f64) -> f64 {
        if self.sorted.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }

    pub fn median(&self) -> f64 {
        self.pct(50.0)
    }

    pub fn max(&self) -> f64 {
        self.sorted.last().copied().unwrap_or(f64::NAN)
    }
}

/// One kind of pass, measured `reps` times.
#[derive(Clone, Debug, Default)]
pub struct PassStats {
    pub cpu_ms: Dist,
    pub wall_ms: Dist,
    /// Bytes of the nf_tables batch the (last) pass of this kind wrote.
    pub bytes: usize,
    /// Passes whose action was not the expected one (described).
    pub unexpected: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct ControlResult {
    /// A periodic pass with nothing changed (no event since the last pass).
    pub no_change: PassStats,
    /// A verifying pass with nothing changed (store, links and table read again).
    pub verify: PassStats,
    /// One staging container's store entry added / removed, the pass timed 30 ms after the
    /// write.
    pub add_one: PassStats,
    pub remove_one: PassStats,
    /// The same, the pass started as soon as the store watcher saw the write (as in the
    /// daemon).
    pub add_at_event: PassStats,
    pub remove_at_event: PassStats,
    /// `inet egress_guard` deleted by someone else (the owned table survives): one table
    /// recreated.
    pub full: PassStats,
    /// The steps of a no-change pass, each timed on its own: (step, stats).
    pub steps: Vec<(&'static str, PassStats)>,
}

/// Names of the steps in [`ControlResult::steps`], in pass order.
pub const STEPS: [&str; 4] = [
    "store read+parse",
    "route+address+link dump",
    "policy",
    "netlink listing of both tables",
];

fn time_sync<T>(f: impl FnOnce() -> T) -> (f64, f64, T) {
    let cpu = cpu_self_and_children();
    let wall = Instant::now();
    let out = f();
    let wall = wall.elapsed();
    (
        ms(cpu_self_and_children().saturating_sub(cpu)),
        ms(wall),
        out,
    )
}

async fn time_async<T>(f: impl std::future::Future<Output = T>) -> (f64, f64, T) {
    let cpu = cpu_self_and_children();
    let wall = Instant::now();
    let out = f.await;
    let wall = wall.elapsed();
    (
        ms(cpu_self_and_children().saturating_sub(cpu)),
        ms(wall),
        out,
    )
}

/// Times each step of a pass separately with the library's own functions, `reps` times.
async fn steps(
    config: &Config,
    kernel: &KernelReader,
    dataplane: &mut Dataplane,
    reps: usize,
) -> Vec<(&'static str, PassStats)> {
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); STEPS.len()];
    let mut wall: Vec<Vec<f64>> = vec![Vec::new(); STEPS.len()];
    for _ in 0..reps {
        let (c0, w0, store) =
            time_sync(|| read_store(&config.metadata_store).expect("store reads"));
        // What a verifying pass reads from rtnetlink: routes and addresses, then links.
        let (c1, w1, view) = time_async(async {
            let routes = kernel.route_table().await.expect("route dump");
            let links = kernel.links().await.expect("link dump");
            KernelView {
                routes: routes.containers(config.overlay_network),
                routes6: Default::default(),
                links,
            }
        })
        .await;
        let inventory = Inventory {
            store,
            kernel: view,
        };
        let (c2, w2, _plan) = time_sync(|| policy::plan(config, &inventory));
        let (c3, w3, tables) = time_async(dataplane.observe(&[])).await;
        let tables = tables.expect("netlink listing");
        assert_eq!(tables.len(), 2, "both tables listed");
        for (i, (c, w)) in [(c0, w0), (c1, w1), (c2, w2), (c3, w3)]
            .into_iter()
            .enumerate()
        {
            cpu[i].push(c);
            wall[i].push(w);
        }
    }
    STEPS
        .iter()
        .zip(cpu.into_iter().zip(wall))
        .map(|(name, (c, w))| {
            (
                *name,
                PassStats {
                    cpu_ms: Dist::new(c),
                    wall_ms: Dist::new(w),
                    bytes: 0,
                    unexpected: Vec::new(),
                },
            )
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Lets the events of a change (inotify, rtnetlink, nf_tables) reach the watchers.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(30)).await;
}

/// Until the store watcher has seen a write (at most 1 s).
async fn store_event(changes: &Changes) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !changes.store.pending() && Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
}

async fn timed(reconciler: &mut Reconciler) -> (f64, f64, PassReport) {
    let cpu = cpu_self_and_children();
    let wall = Instant::now();
    let report = reconciler.pass().await;
    let wall = wall.elapsed();
    let cpu = cpu_self_and_children().saturating_sub(cpu);
    (ms(cpu), ms(wall), report)
}

struct Collect {
    cpu: Vec<f64>,
    wall: Vec<f64>,
    bytes: usize,
    unexpected: Vec<String>,
}

impl Collect {
    fn new() -> Collect {
        Collect {
            cpu: Vec::new(),
            wall: Vec::new(),
            bytes: 0,
            unexpected: Vec::new(),
        }
    }

    fn push(&mut self, (cpu, wall, report): (f64, f64, PassReport), ok: bool) {
        self.cpu.push(cpu);
        self.wall.push(wall);
        self.bytes = report.batch_bytes;
        if !ok || !report.errors.is_empty() {
            self.unexpected
                .push(format!("{:?} errors {:?}", report.action, report.errors));
        }
    }

    fn done(self) -> PassStats {
        PassStats {
            cpu_ms: Dist::new(self.cpu),
            wall_ms: Dist::new(self.wall),
            bytes: self.bytes,
            unexpected: self.unexpected,
        }
    }
}

/// One element update of the same size in both tables.
fn one_element(action: &SyncAction, adds: usize, removes: usize) -> bool {
    AgentTable::ALL.iter().all(|t| {
        matches!(action.table(*t), TableAction::Elements { add, remove, .. }
            if add.len() == adds && remove.len() == removes)
    })
}

/// Reconcile passes run in-process (`Reconciler::pass`, exactly what the daemon runs), in the
/// cell namespace, on a current-thread runtime like the daemon's. No daemon may be running.
pub fn control_plane(cell: &ScratchCell, reps: usize) -> ControlResult {
    let config =
        Config::parse(&daemon::config_toml(&cell.store.path())).expect("bench config is valid");
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(&cell.cell);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let kernel = KernelReader::connect().expect("rtnetlink");
                let status = SharedStatus::new(Status::new(true, config.reconcile_interval));
                // The daemon's event watchers, so a pass reads only what changed, as in the
                // daemon; `settle` lets the events of a change arrive before the timed pass.
                let trigger = Arc::new(Notify::new());
                let changes = Arc::new(Changes::default());
                let dataplane = Dataplane::open().expect("nf_tables netlink socket");
                let own_port = dataplane.port_id();
                let mut reconciler =
                    Reconciler::new(config.clone(), kernel.clone(), dataplane, status)
                        .with_changes(changes.clone());
                let link_events =
                    tokio::spawn(watch_events(trigger.clone(), changes.kernel.clone()));
                let ruleset_events = tokio::spawn(events::watch(
                    own_port,
                    trigger.clone(),
                    changes.ruleset.clone(),
                ));
                let mut store_watcher = StoreWatcher::new(
                    &config.metadata_store,
                    trigger.clone(),
                    changes.store.clone(),
                );
                store_watcher.ensure();
                settle().await;
                let first = reconciler.pass().await;
                assert!(first.errors.is_empty(), "first pass: {:?}", first.errors);
                let (mut none, mut verify, mut add, mut remove, mut full) = (
                    Collect::new(),
                    Collect::new(),
                    Collect::new(),
                    Collect::new(),
                    Collect::new(),
                );
                let (mut add_at_event, mut remove_at_event) = (Collect::new(), Collect::new());
                for r in 0..reps {
                    // Full rebuild: `inet egress_guard` is gone (as after `nft flush ruleset`,
                    // which the owned table survives).
                    cell.delete_table();
                    settle().await;
                    let t = timed(&mut reconciler).await;
                    let ok = matches!(
                        t.2.action.table(AgentTable::Persistent),
                        TableAction::Full(_)
                    ) && *t.2.action.table(AgentTable::Owned) == TableAction::Nothing;
                    full.push(t, ok);

                    // A periodic tick with nothing changed.
                    settle().await;
                    reconciler.pass().await;
                    let t = timed(&mut reconciler).await;
                    let ok = t.2.action.is_nothing() && !t.2.listed;
                    none.push(t, ok);

                    // The verifying tick (every few intervals): everything read again.
                    reconciler.force_verify();
                    let t = timed(&mut reconciler).await;
                    let ok = t.2.action.is_nothing() && t.2.listed;
                    verify.push(t, ok);

                    // One new staging container: its link and route appear first (restricted,
                    // nothing to write), then its store entry (one element added).
                    let ip = Ipv4Addr::new(10, 255, 220, u8::try_from(r % 250 + 2).expect("small"));
                    let dev = common::host_if(ip);
                    ip_batch(
                        &cell.cell,
                        &format!(
                            "link add {dev} type veth peer name x{r} netns {park}\n\
                             link set {dev} up\n\
                             route add {ip}/32 dev {dev}\n",
                            park = cell.park
                        ),
                    );
                    ip_batch(&cell.park, &format!("link set x{r} up\n"));
                    settle().await;
                    reconciler.pass().await;
                    // Its store entry added, then removed: each pass timed 30 ms after the
                    // write, then the same two started as soon as the watcher has seen the
                    // write, as the daemon starts them (the file's pages as warm as the daemon
                    // finds them, not 30 ms colder).
                    for (tag, at_event, (add, remove)) in [
                        (3, false, (&mut add, &mut remove)),
                        (4, true, (&mut add_at_event, &mut remove_at_event)),
                    ] {
                        let handle = common::handle(tag, r);
                        let staging = common::entry(&handle, ip, Workload::Staging);
                        for (entry, collect, adds) in [(Some(staging), add, 1), (None, remove, 0)] {
                            let mut entries = cell.store.entries().clone();
                            entries.extend(entry.map(|e| (handle.clone(), e)));
                            cell.store
                                .write_raw(&serde_json::to_vec(&entries).expect("json"));
                            if at_event {
                                store_event(&changes).await;
                            } else {
                                settle().await;
                            }
                            let t = timed(&mut reconciler).await;
                            let ok = one_element(&t.2.action, adds, 1 - adds);
                            collect.push(t, ok);
                        }
                    }
                    ip_batch(&cell.cell, &format!("link del {dev}\n"));
                    settle().await;
                    reconciler.pass().await;
                }
                link_events.abort();
                ruleset_events.abort();
                // A socket of its own: the listing reads what any socket may.
                let mut reader = Dataplane::open().expect("nf_tables netlink socket");
                let steps = steps(&config, &kernel, &mut reader, reps).await;
                drop(reconciler);
                ControlResult {
                    steps,
                    no_change: none.done(),
                    verify: verify.done(),
                    add_one: add.done(),
                    remove_one: remove.done(),
                    add_at_event: add_at_event.done(),
                    remove_at_event: remove_at_event.done(),
                    full: full.done(),
                }
            })
        })
        .join()
        .expect("control-plane thread")
    })
}

/// CPU share and memory of the daemon over a window.
#[derive(Clone, Copy, Debug, Default)]
pub struct Footprint {
    /// Percent of one core (own CPU; reaped children too, though the agent runs none now).
    pub cpu_pct: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
}

fn footprint(a: ProcSample, b: ProcSample, secs: f64) -> Footprint {
    Footprint {
        cpu_pct: b.cpu.saturating_sub(a.cpu).as_secs_f64() / secs * 100.0,
        rss_mib: b.rss_kib as f64 / 1024.0,
        peak_rss_mib: b.hwm_kib as f64 / 1024.0,
    }
}

/// The daemon sitting idle for `secs` (its periodic 10 s pass included if it falls in).
pub fn idle(daemon: &mut Daemon, secs: f64) -> Footprint {
    let a = daemon.sample();
    std::thread::sleep(Duration::from_secs_f64(secs));
    footprint(a, daemon.sample(), secs)
}

#[derive(Clone, Debug, Default)]
pub struct ExemptResult {
    /// Store write started -> first successful connection from the new staging container.
    pub to_exempt_ms: Dist,
    /// Of which: the simulated silk's own write (lock, truncate, write, version, unlock)...
    pub write_ms: Dist,
    /// ...and the rest, from silk releasing its lock to that first connection: the agent's
    /// part (it reads once silk releases the lock).
    pub after_write_ms: Dist,
    /// Removal write started -> first refused connection.
    pub back_ms: Dist,
    pub failures: Vec<String>,
    /// The daemon during this churn.
    pub churn: Footprint,
    /// Store writes + link changes per second during the phase.
    pub changes_per_sec: f64,
}

/// Time to exemption and back, `samples` times, with the daemon running. Each sample is a new
/// staging container (new veth, so a new ifindex; IPs cycle through 10.255.200.2–201.251):
/// wire it, check it is restricted, let the agent settle, then write its store entry (silk's way)
/// and probe until it connects; then remove the entry and probe until it is refused; unwire.
pub fn exemption(
    cell: &ScratchCell,
    daemon: &mut Daemon,
    prober: &Prober,
    stg_ns: &str,
    samples: usize,
) -> ExemptResult {
    const SETTLE: Duration = Duration::from_millis(30);
    const TIMEOUT: Duration = Duration::from_secs(3);
    let mut to_exempt = Vec::new();
    let (mut write, mut after_write) = (Vec::new(), Vec::new());
    let mut back = Vec::new();
    let mut failures = Vec::new();
    let start = Instant::now();
    let before = daemon.sample();
    let mut changes = 0u64;
    for i in 0..samples {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 255, 200, 2)) + (i % 500) as u32);
        let dev = cell.wire(stg_ns, ip);
        changes += 1;
        // A new veth can take a while to pass traffic (the kernel's linkwatch batches carrier
        // changes under churn); that is before the store write, so it is not measured.
        if prober
            .until(Attempt::Refused, Duration::from_secs(3))
            .is_none()
        {
            failures.push(format!(
                "sample {i}: new container {ip} not refused before its store entry ({:?})",
                prober.once()
            ));
            cell.unwire(&dev);
            continue;
        }
        std::thread::sleep(SETTLE);
        let mut entries = cell.store.entries().clone();
        let handle = common::handle(2, i);
        entries.insert(
            handle.clone(),
            common::entry(&handle, ip, Workload::Staging),
        );
        let bytes = serde_json::to_vec(&entries).expect("json");
        let t0 = Instant::now();
        cell.store.write_raw(&bytes);
        let written = Instant::now();
        changes += 1;
        match prober.until(Attempt::Open, TIMEOUT) {
            Some(at) => {
                to_exempt.push(ms(at - t0));
                write.push(ms(written - t0));
                after_write.push(ms(at.saturating_duration_since(written)));
            }
            None => failures.push(format!("sample {i}: {ip} not exempt within {TIMEOUT:?}")),
        }
        entries.remove(&handle);
        let bytes = serde_json::to_vec(&entries).expect("json");
        let t1 = Instant::now();
        cell.store.write_raw(&bytes);
        changes += 1;
        match prober.until(Attempt::Refused, TIMEOUT) {
            Some(at) => back.push(ms(at - t1)),
            None => failures.push(format!(
                "sample {i}: {ip} still exempt {TIMEOUT:?} after removal"
            )),
        }
        cell.unwire(&dev);
        changes += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    ExemptResult {
        to_exempt_ms: Dist::new(to_exempt),
        write_ms: Dist::new(write),
        after_write_ms: Dist::new(after_write),
        back_ms: Dist::new(back),
        failures,
        churn: footprint(before, daemon.sample(), secs),
        changes_per_sec: changes as f64 / secs,
    }
}

/// Packets per second from one container through the cell, in one run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pps {
    /// Packets that entered the cell from the container (host veth rx), per second.
    pub entered: f64,
    /// Packets that arrived at the destination namespace, per second.
    pub delivered: f64,
}

/// One run: `secs` of traffic from `from` to `dst`, counted where it entered the cell and
/// at the destination.
pub fn pps(
    cell: &ScratchCell,
    from: &RealContainer,
    dst: Ipv4Addr,
    dst_ns: &str,
    secs: f64,
) -> Pps {
    let rx0 = cell.rx_packets(&from.host_if);
    let sink0 = cell.sink_packets(dst_ns);
    let start = Instant::now();
    flood(&from.ns, dst, SINK_PORT, Duration::from_secs_f64(secs));
    let elapsed = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(50));
    let rx1 = cell.rx_packets(&from.host_if);
    let sink1 = cell.sink_packets(dst_ns);
    Pps {
        entered: (rx1 - rx0) as f64 / elapsed,
        delivered: (sink1 - sink0) as f64 / elapsed,
    }
}
