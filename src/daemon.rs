//! The one place that starts the daemon and wires its parts together: the status and metrics
//! the endpoint reads, attribution, the DNS filter, the health endpoint, the event watchers, the
//! NFLOG reader and the reconcile loop. Signals and the stop bound live here too.
//!
//! [`serve`] takes its shutdown signal from the caller, so tests and [`run`] stop it the same
//! way; [`run`] is the process: signal handling, the runtime, and the bound on stopping.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio::sync::Notify;

use crate::app_logs;
use crate::attribution::{self, RefusedQuery, SharedBlocked, nflog::NflogSocket};
use crate::config::Config;
use crate::dataplane::model::NFLOG_GROUP;
use crate::dataplane::probe::{self, PerElementLimits};
use crate::dataplane::{Dataplane, netlink::events};
use crate::dns::{self, DnsRefusal, RefusalSink, SharedDnsHealth};
use crate::health::{self, CounterReader, Endpoint};
use crate::inventory::KernelReader;
use crate::inventory::kernel::watch_events;
use crate::inventory::store::StoreWatcher;
use crate::metrics::{Metrics, SharedMetrics};
use crate::reconcile::{Changes, Reconciler, run_until_stopped};
use crate::status::{ReloadReport, SharedStatus, Status};

/// Longest the agent takes to exit after SIGTERM or SIGINT, whatever it is doing: past this a
/// watchdog ends the process (the rules stay in place either way).
pub const STOP_BOUND: Duration = Duration::from_millis(1500);
/// How long a pass in progress may take to finish after the stop signal before the loop is
/// abandoned (a batch already sent is atomic in the kernel whether or not its answer is read).
const STOP_GRACE: Duration = Duration::from_millis(700);
/// How long the runtime's shutdown waits for blocking tasks (a store read in progress) before
/// leaving them behind; process exit ends them.
const RUNTIME_SHUTDOWN: Duration = Duration::from_millis(300);

/// For the tests only: `not-enforced` makes the agent behave as if the start-up probe had
/// found per-element limits broken, so that the fallback can be tested on a kernel with the
/// fix. Logged loudly; no deployment sets it.
pub const PER_CONTAINER_LIMITS_OVERRIDE: &str = "EGRESS_GUARD_TEST_PER_CONTAINER_LIMITS";
/// Longest the start-up probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks the kernel whether it enforces a limit per element of a dynamic set
/// ([`crate::dataplane::probe`]); None when it could not tell.
async fn probe_per_container_limits() -> Option<bool> {
    if std::env::var(PER_CONTAINER_LIMITS_OVERRIDE).as_deref() == Ok("not-enforced") {
        tracing::warn!(
            variable = PER_CONTAINER_LIMITS_OVERRIDE,
            "per-container kernel limits treated as not enforced (test override)"
        );
        return Some(false);
    }
    match tokio::time::timeout(PROBE_TIMEOUT, probe::per_element_limits()).await {
        Ok(Ok(PerElementLimits::Enforced)) => {
            tracing::info!("the kernel enforces per-container limits");
            Some(true)
        }
        Ok(Ok(PerElementLimits::NotEnforced)) => {
            tracing::warn!(
                "this kernel does not enforce a limit per element of a dynamic set (it lacks \
                 \"nft_limit: Clone packet limits' cost value\", Linux 5.19 / 5.15.148): DNS \
                 is limited with one cell-wide budget, and report budgets are cell-wide"
            );
            Some(false)
        }
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "cannot probe per-container kernel limits");
            None
        }
        Err(_) => {
            tracing::warn!(timeout = ?PROBE_TIMEOUT, "probing per-container kernel limits timed out");
            None
        }
    }
}

/// Where a reload reads the configuration again, and the signal that asks for it.
pub struct ReloadSource {
    pub path: PathBuf,
    pub requested: Arc<Notify>,
}

/// Runs the agent as a process until SIGTERM or SIGINT; SIGHUP reloads `path`. The persistent
/// table stays in place afterwards (fail closed); the owned table goes with the agent's socket.
pub fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    limit_allocator_retention();
    // Before the runtime: every thread created later inherits the blocked signals.
    let requested = Arc::new(Notify::new());
    let stop = handle_signals(requested.clone())?;
    let reload = ReloadSource { path, requested };
    let runtime = runtime()?;
    let result = runtime.block_on(async move {
        tokio::select! {
            result = serve(config, Some(reload), stopped(stop.clone())) => result,
            () = async { stopped(stop).await; tokio::time::sleep(STOP_GRACE).await } => {
                tracing::warn!(grace = ?STOP_GRACE,
                    "the reconcile pass did not finish after the stop signal; abandoning it");
                Ok(())
            }
        }
    });
    // Dropping a runtime waits for its blocking tasks without a bound; this does not.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    result
}

/// The async runtime of the agent: one thread, since the work is a short pass at a time and
/// blocking reads go to `spawn_blocking`.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Starts every part of the agent and runs the reconcile loop until `shutdown` resolves,
/// reloading the configuration when `reload` asks.
pub async fn serve(
    config: Config,
    reload: Option<ReloadSource>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut initial = Status::new(config.enabled, config.reconcile_interval);
    initial.mode = config.mode;
    let status = SharedStatus::new(initial);
    let metrics: SharedMetrics = Arc::new(Metrics::new());
    let blocked = SharedBlocked::new(config.mode);
    let (dns, dns_server, learns) = start_dns_filter(&config, &metrics, &blocked);
    let app_logs = app_logs::start(&config).map(|(sink, counts)| {
        blocked.lock().set_sink(sink);
        metrics.read_app_logs_from(counts.clone());
        counts
    });
    let endpoint = Endpoint {
        status: status.clone(),
        metrics: metrics.clone(),
        started: Instant::now(),
        counters: Some(CounterReader::new()),
        blocked: blocked.clone(),
        dns,
        app_logs,
    };
    let metrics_tls = start_metrics_tls(&config, &endpoint);
    let health = tokio::spawn(health::serve(config.health.listen, endpoint));

    let trigger = Arc::new(Notify::new());
    let changes = Arc::new(Changes::default());
    let kernel = KernelReader::connect()?;
    let dataplane = Dataplane::open()?;
    let own_port = dataplane.port_id();
    let mut store_watcher = StoreWatcher::new(
        &config.metadata_store,
        trigger.clone(),
        changes.store.clone(),
    );
    // Listen on the NFLOG group before the first pass, so that whatever the first batch
    // installs (after a mode change, the new mode) is reported from its first packet.
    let reports = start_attribution(&blocked).await;
    tracing::info!(
        enabled = config.enabled,
        mode = %config.mode,
        overlay = %config.overlay_network,
        netlink_port = own_port,
        "egress-guard starting"
    );
    let per_container_limits = probe_per_container_limits().await;
    let (reload_tx, mut reloads) = tokio::sync::mpsc::channel(1);
    let reloader = reload.map(|source| {
        tokio::spawn(reload_on_request(
            source,
            config.clone(),
            reload_tx,
            status.clone(),
            metrics.clone(),
            dns_server,
        ))
    });
    let mut reconciler = Reconciler::new(config, kernel, dataplane, status)
        .with_metrics(metrics)
        .with_per_container_limits(per_container_limits)
        .with_changes(changes.clone())
        .with_blocked(blocked)
        .with_learns(learns);
    reconciler.restore_learned().await;
    let kernel_events = {
        let (trigger, kernel_changes) = (trigger.clone(), changes.kernel.clone());
        tokio::spawn(async move {
            if let Err(err) = watch_events(trigger, kernel_changes).await {
                tracing::error!(error = %err,
                    "link and route event watch stopped; every pass reads them");
            }
        })
    };
    let ruleset_events = {
        let (trigger, ruleset) = (trigger.clone(), changes.ruleset.clone());
        tokio::spawn(async move {
            if let Err(err) = events::watch(own_port, trigger, ruleset).await {
                tracing::error!(error = %err,
                    "nf_tables event watch stopped; every pass lists the tables");
            }
        })
    };

    run_until_stopped(
        &mut reconciler,
        &trigger,
        &mut store_watcher,
        &mut reloads,
        shutdown,
    )
    .await;
    if let Some(reloader) = reloader {
        reloader.abort();
    }

    kernel_events.abort();
    ruleset_events.abort();
    if let Some(reports) = reports {
        reports.abort();
    }
    health.abort();
    if let Some(listener) = metrics_tls {
        listener.abort();
    }
    tracing::info!("egress-guard stopping; table inet egress_guard stays in place");
    Ok(())
}

/// Binds the NFLOG group and starts attribution's reader. Without it enforcement is the same;
/// only reporting is lost, and `/blocked` says why.
/// The mutual-TLS `/metrics` listener when `[metrics_tls] enabled`; a certificate that cannot be
/// read leaves it off (logged), never the agent.
fn start_metrics_tls(config: &Config, endpoint: &Endpoint) -> Option<tokio::task::JoinHandle<()>> {
    if !config.metrics_tls.enabled {
        return None;
    }
    match health::tls_acceptor(&config.metrics_tls) {
        Ok(acceptor) => Some(tokio::spawn(health::serve_metrics_tls(
            config.metrics_tls.listen,
            endpoint.clone(),
            acceptor,
        ))),
        Err(err) => {
            tracing::error!(error = %err,
                "the TLS metrics listener cannot start; the plain endpoint still serves /metrics");
            None
        }
    }
}

async fn start_attribution(blocked: &SharedBlocked) -> Option<tokio::task::JoinHandle<()>> {
    match NflogSocket::bind(NFLOG_GROUP).await {
        Ok(socket) => Some(tokio::spawn(attribution::read_reports(
            socket,
            blocked.clone(),
        ))),
        Err(err) => {
            tracing::error!(error = %err, group = NFLOG_GROUP,
                "cannot listen on the NFLOG group: blocked attempts are not reported \
                 (enforcement is unaffected)");
            blocked.lock().error = Some(format!("cannot bind NFLOG group {NFLOG_GROUP}: {err}"));
            None
        }
    }
}

/// Reads the configuration again on every request (SIGHUP): a valid file goes to the reconcile
/// loop (the keys a reload cannot change keep their running values, and are named), and its
/// names to the DNS filter; an invalid one is refused, saying why, and the running
/// configuration stays. Either way `/status` and the metrics say what happened.
async fn reload_on_request(
    source: ReloadSource,
    mut running: Config,
    loop_: tokio::sync::mpsc::Sender<Config>,
    status: SharedStatus,
    metrics: SharedMetrics,
    dns: Option<Arc<dns::server::Server>>,
) {
    loop {
        source.requested.notified().await;
        let at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let path = source.path.display().to_string();
        let report = match Config::load(&source.path) {
            Ok(new) => {
                let restart_needed = running.restart_needed(&new);
                let effective = running.reloaded(new);
                if let Some(dns) = &dns {
                    dns.set_names(&effective);
                }
                if loop_.send(effective.clone()).await.is_err() {
                    return;
                }
                running = effective;
                metrics.record_reload(true);
                if restart_needed.is_empty() {
                    tracing::info!(%path, reloaded = ?crate::config::RELOADED_KEYS,
                        "configuration reloaded");
                } else {
                    tracing::warn!(%path, restart_needed = ?restart_needed,
                        reloaded = ?crate::config::RELOADED_KEYS,
                        "configuration reloaded; some changed keys keep their running value                          until the agent restarts");
                }
                ReloadReport {
                    at,
                    result: "ok".into(),
                    error: None,
                    restart_needed: restart_needed.into_iter().map(String::from).collect(),
                }
            }
            Err(err) => {
                tracing::error!(%path, error = %err,
                    "configuration reload refused; the running configuration stays");
                metrics.record_reload(false);
                ReloadReport {
                    at,
                    result: "invalid".into(),
                    error: Some(err.to_string()),
                    restart_needed: Vec::new(),
                }
            }
        };
        status.update(|status| status.last_reload = Some(report));
    }
}

/// Starts the DNS filter on its own thread when `[dns]` (and enforcement) is enabled; its
/// health for the endpoint, and the server (None if its thread could not start). A filter that
/// cannot start leaves the redirect in place (restricted containers get no DNS answers: fail
/// closed) and says so in `/readyz`.
fn start_dns_filter(
    config: &Config,
    metrics: &SharedMetrics,
    blocked: &SharedBlocked,
) -> (
    Option<SharedDnsHealth>,
    Option<Arc<dns::server::Server>>,
    Option<tokio::sync::mpsc::Receiver<dns::LearnRequest>>,
) {
    if !(config.enabled && config.dns.enabled) {
        return (None, None, None);
    }
    let health = Arc::new(dns::DnsHealth::new(config));
    metrics.read_dns_from(health.clone());
    // Refused names go to the log and to /blocked.
    let sink = Arc::new(dns::Sinks(vec![
        Arc::new(dns::LogRefusals::default()),
        Arc::new(RefusalsToAttribution(blocked.clone())),
    ]));
    // Hostname rules: the filter asks attribution's lookup who asks, and the reconcile loop
    // to allow what answers give.
    // Every learn request is made by an upstream query that holds one of `max_inflight` slots
    // until its answer is out: a queue that size is never full, and what one container can put
    // in it is its share of those slots.
    let (learner, learns) = tokio::sync::mpsc::channel(config.dns.max_inflight.max(1));
    let askers = Arc::new(AskersFromAttribution(blocked.clone()));
    let waited: dns::LearnTimer = {
        let metrics = metrics.clone();
        Arc::new(move |waited| metrics.observe_dns_learn_wait(waited))
    };
    let learning = dns::Learning {
        askers,
        learner,
        waited,
    };
    let server = match dns::spawn(config, health.clone(), sink, Some(learning)) {
        Ok(server) => Some(server),
        Err(err) => {
            tracing::error!(error = %err, "cannot start the DNS filter's thread");
            health.listening(Err(format!("no thread: {err}")));
            None
        }
    };
    (Some(health), server, Some(learns))
}

/// Who asks a DNS query, from attribution's lookup of the last pass's decisions.
struct AskersFromAttribution(SharedBlocked);

impl dns::Askers for AskersFromAttribution {
    fn asker(&self, src: std::net::Ipv4Addr) -> Option<dns::filter::Asker> {
        let blocked = self.0.lock();
        let decision = blocked.lookup().restricted_owner(src.into())?;
        Some(dns::filter::Asker {
            ifindex: decision.host_ifindex?,
            org: decision.org_id.clone(),
            space: decision.space_id.clone(),
        })
    }
}

/// Hands the DNS filter's refusals to attribution: the two features do not know each other.
struct RefusalsToAttribution(SharedBlocked);

impl RefusalSink for RefusalsToAttribution {
    fn refused(&self, refusal: &DnsRefusal) {
        self.0.record_refusal(&RefusedQuery {
            src: refusal.src,
            name: refusal.name.clone(),
            at: refusal.at,
        });
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread (and so in every thread started after it)
/// and starts a thread that waits for them: SIGHUP wakes `reload`; the first SIGTERM or SIGINT
/// sets the returned flag, and if the process is still there [`STOP_BOUND`] later, the thread
/// ends it. The watchdog lives outside
/// the runtime so that nothing the runtime does (a stuck pass, a blocking task, a runtime
/// thread that never yields) can keep the agent from stopping. Child processes do not inherit
/// the blocked mask: std clears it before `exec`.
fn handle_signals(reload: Arc<Notify>) -> anyhow::Result<tokio::sync::watch::Receiver<bool>> {
    use nix::sys::signal::{SigSet, Signal};
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGHUP);
    signals
        .thread_block()
        .context("cannot block SIGTERM, SIGINT and SIGHUP for the signal thread")?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let signal = loop {
                match signals.wait() {
                    Ok(Signal::SIGHUP) => {
                        tracing::info!("SIGHUP: reloading the configuration");
                        reload.notify_one();
                    }
                    Ok(signal) => break signal,
                    Err(err) => tracing::warn!(error = %err, "sigwait failed; waiting again"),
                }
            };
            tracing::info!(signal = %signal, "stop signal received; rules stay in place");
            let _ = tx.send(true);
            std::thread::sleep(STOP_BOUND);
            tracing::error!(signal = %signal, bound = ?STOP_BOUND,
                "the agent did not stop in time; exiting now (rules stay in place)");
            // SAFETY: _exit ends the process at once, without running destructors or atexit
            // handlers that a stuck thread could be in the middle of.
            unsafe { nix::libc::_exit(1) }
        })
        .context("cannot start the signal thread")?;
    Ok(rx)
}

/// Resolves once the stop flag is set.
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    if stop.wait_for(|stopping| *stopping).await.is_err() {
        // The signal thread never drops its sender; should it, only SIGKILL stops the agent.
        tracing::error!("the signal thread is gone; stop the agent with SIGKILL");
        std::future::pending::<()>().await;
    }
}

/// glibc keeps freed memory per thread arena and untrimmed by default; a pass's temporaries
/// (a 3 MB store at 5,000 containers) would otherwise stay resident. One arena and a low trim
/// threshold keep the daemon's RSS near what it actually holds.
fn limit_allocator_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator tunables; called before any other thread exists.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
        nix::libc::mallopt(nix::libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
}
