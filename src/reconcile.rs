//! The reconcile loop: events and a timer -> one pass -> at most one nft transaction.
//!
//! A pass reads what changed (the store, keeping the last good one on error; link names; the
//! agent's table when someone else committed an nf_tables transaction), dumps the kernel's
//! routes, evaluates the policy and applies the smallest transaction that makes the kernel
//! match. Nothing is written when nothing differs. Passes run on start, on every store, link,
//! route or foreign nf_tables event (bursts coalesce into one pass), and every
//! `reconcile_interval`; every [`VERIFY_EVERY`] intervals a pass reads everything. Stopping the
//! loop leaves the rules in place: the agent fails closed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::Notify;

use crate::config::Config;
use crate::dataplane::{self, FullSyncReason, Nft, ObservedTable, RejectCounters, SyncAction};
use crate::inventory::kernel::Changes;
use crate::inventory::store::{self, StoreSnapshot};
use crate::inventory::{Inventory, KernelReader, KernelView};
use crate::metrics::{Metrics, SharedMetrics};
use crate::policy::{self, DesiredRules, Plan, Verdict};
use crate::status::SharedStatus;

/// After the first event of a burst, wait this long for the rest before passing. Short, because
/// it adds to the time a new staging container waits for its exemption.
pub const EVENT_COALESCE: Duration = Duration::from_millis(5);

/// What one pass did, for logs, tests and benchmarks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub action: SyncAction,
    /// The kernel differed from what the agent last wrote: someone else changed it.
    pub drift: bool,
    /// The table was listed (a verifying pass, or a foreign change was reported).
    pub listed: bool,
    /// Problems that made the pass less than fully successful.
    pub errors: Vec<String>,
    /// Size of the nft input written, in bytes (0 when nothing was written).
    pub nft_bytes: usize,
}

/// Owns the agent's view between passes.
pub struct Reconciler {
    config: Config,
    nft: Nft,
    kernel: KernelReader,
    /// Last store that parsed; restrictive (empty) until the first good read.
    store: StoreSnapshot,
    /// What the agent last wrote successfully: Some(None) = table absent (disabled).
    last_written: Option<Option<DesiredRules>>,
    /// Link names: the last link dump, kept current from link events.
    links: BTreeMap<u32, String>,
    /// What the event watchers saw change; unwatched sources always count as changed.
    changes: Arc<Changes>,
    /// When the kernel's table was last listed and found (or made) right.
    last_verified: Option<Instant>,
    /// The previous pass had no error (otherwise the next one verifies everything).
    last_pass_ok: bool,
    status: SharedStatus,
    metrics: SharedMetrics,
}

/// Every this many reconcile intervals a pass reads everything even without events.
pub const VERIFY_EVERY: u32 = 6;

impl Reconciler {
    pub fn new(config: Config, kernel: KernelReader, status: SharedStatus) -> Reconciler {
        Reconciler {
            nft: Nft::new(config.nft.clone()),
            config,
            kernel,
            store: StoreSnapshot::default(),
            last_written: None,
            links: BTreeMap::new(),
            changes: Arc::default(),
            last_verified: None,
            last_pass_ok: true,
            status,
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Reads only what `changes` says changed (shared with the event watchers).
    pub fn with_changes(mut self, changes: Arc<Changes>) -> Reconciler {
        self.changes = changes;
        self
    }

    /// Makes the next pass a verifying one (reads the store, links and table regardless).
    pub fn force_verify(&mut self) {
        self.last_verified = None;
    }

    /// PIDs of this reconciler's own nft transactions, for the nf_tables event watcher.
    pub fn own_writes(&self) -> Arc<crate::dataplane::nft::OwnWrites> {
        self.nft.own_writes()
    }

    /// Reports into `metrics` instead of a private registry.
    pub fn with_metrics(mut self, metrics: SharedMetrics) -> Reconciler {
        self.metrics = metrics;
        self
    }

    /// One reconcile pass.
    ///
    /// What it reads depends on what changed (see [`Changes`]): the store only after a store
    /// event, links only after a link event, the nft table only after a transaction by someone
    /// else. Routes are dumped every pass. A *verifying* pass reads everything regardless: the
    /// first pass, any pass after a failure, and one every [`VERIFY_EVERY`] intervals, so that
    /// even a lost event costs at most that long.
    pub async fn pass(&mut self) -> PassReport {
        let started = Instant::now();
        let mut errors = Vec::new();
        let mut store_failed = false;
        let verify = self.last_written.is_none()
            || !self.last_pass_ok
            || self
                .last_verified
                .is_none_or(|at| at.elapsed() >= self.config.reconcile_interval * VERIFY_EVERY);
        // Take every flag now, before reading, so changes made while we read are seen next pass.
        let store_changed = self.changes.take_store() || verify;
        let links_changed = self.changes.take_links() || verify;
        let ruleset_changed = self.changes.take_ruleset() || verify;

        if store_changed {
            match read_store_blocking(self.config.metadata_store.clone()).await {
                Ok(snapshot) => {
                    if snapshot.problems != self.store.problems {
                        for problem in &snapshot.problems {
                            tracing::warn!(handle = %problem.handle, reason = %problem.reason,
                                "metadata store entry is unusable; container stays restricted");
                        }
                    }
                    self.store = snapshot;
                }
                Err(err) => {
                    store_failed = true;
                    tracing::error!(error = %err, entries_kept = self.store.entries.len(),
                        "metadata store unreadable; keeping last good inventory, rules unchanged in strictness");
                    errors.push(err.to_string());
                }
            }
        }

        if links_changed {
            match self.kernel.links().await {
                Ok(links) => self.links = links,
                Err(err) => {
                    tracing::error!(error = %err, "cannot list links");
                    errors.push(err.to_string());
                }
            }
        }
        // Link events since then, in order (after a dump too: replaying converges).
        for (index, name) in self.changes.drain_link_updates() {
            match name {
                Some(name) => self.links.insert(index, name),
                None => self.links.remove(&index),
            };
        }
        let routes = match self.kernel.routes(self.config.overlay_network).await {
            Ok(routes) => routes,
            Err(err) => {
                tracing::error!(error = %err, "cannot list routes; no container is exempt this pass");
                errors.push(err.to_string());
                Default::default()
            }
        };

        let inventory = Inventory {
            store: std::mem::take(&mut self.store),
            kernel: KernelView {
                routes,
                links: std::mem::take(&mut self.links),
            },
        };
        let plan = policy::plan(&self.config, &inventory);
        self.store = inventory.store;
        let kernel = inventory.kernel;
        let desired = self.config.enabled.then_some(&plan.rules);

        // Without a foreign transaction since our last write, the kernel holds exactly what we
        // wrote; only then is listing skipped. A wrong assumption can only make an element
        // update fail, which falls back to a full sync.
        let listed = if ruleset_changed {
            Some(match self.nft.list_table().await {
                Ok(None) => Ok(None),
                Ok(Some(listing)) => dataplane::observe::parse_listing(&listing, &kernel)
                    .map(Some)
                    .map_err(|err| err.to_string()),
                Err(err) => Err(err.to_string()),
            })
        } else {
            None
        };
        self.links = kernel.links;
        let assumed = match (&listed, &self.last_written) {
            (None, Some(Some(written))) => Some(dataplane::assume_written(written)),
            _ => None,
        };
        let (action, drift, observed) = match &listed {
            None => (
                dataplane::choose_action(desired, assumed.as_ref()),
                false,
                assumed.as_ref(),
            ),
            Some(Ok(observed)) => {
                let drift = self.last_written.as_ref().is_some_and(|written| {
                    !dataplane::matches(written.as_ref(), observed.as_ref())
                });
                (
                    dataplane::choose_action(desired, observed.as_ref()),
                    drift,
                    observed.as_ref(),
                )
            }
            Some(Err(err)) => {
                // Cannot see the table: rewrite it whole (idempotent, never looser).
                tracing::warn!(error = %err, "cannot read back the table; doing a full sync");
                let action = match desired {
                    Some(_) => SyncAction::Full(FullSyncReason::StructureDiffers),
                    None => SyncAction::DeleteTable,
                };
                (action, false, None)
            }
        };

        let (action, applied, nft_bytes) = self.apply(action, desired, &mut errors).await;
        if applied {
            self.last_written = Some(desired.cloned());
        }
        if ruleset_changed && applied && errors.is_empty() {
            self.last_verified = Some(Instant::now());
        }
        self.last_pass_ok = errors.is_empty();
        self.log_pass(&action, drift, applied, &plan, observed);
        let counters = match &listed {
            Some(Ok(observed)) => Some(observed.as_ref().map(|o| o.rejected).unwrap_or_default()),
            _ => None,
        };
        self.publish(
            &plan,
            counters,
            drift && applied,
            store_failed,
            applied,
            &errors,
            started,
        );
        PassReport {
            action,
            drift,
            listed: listed.is_some(),
            errors,
            nft_bytes,
        }
    }

    /// Applies `action`; a rejected element update falls back to a full sync in the same pass.
    /// Returns the action finally taken, whether the kernel now matches, and the bytes written.
    async fn apply(
        &self,
        action: SyncAction,
        desired: Option<&DesiredRules>,
        errors: &mut Vec<String>,
    ) -> (SyncAction, bool, usize) {
        if action == SyncAction::Nothing {
            return (action, true, 0);
        }
        let batch = action.batch(desired);
        let mut bytes = batch.to_json().len();
        match self.nft.apply(&batch).await {
            Ok(()) => return (action, true, bytes),
            Err(err) if matches!(action, SyncAction::Elements { .. }) => {
                tracing::warn!(error = %err, "element update rejected; falling back to a full sync");
            }
            Err(err) => {
                tracing::error!(error = %err, action = ?action, "nft transaction failed; kernel keeps its previous rules");
                errors.push(err.to_string());
                return (action, false, bytes);
            }
        }
        let full = SyncAction::Full(FullSyncReason::PartialSyncFailed);
        let batch = full.batch(desired);
        bytes += batch.to_json().len();
        match self.nft.apply(&batch).await {
            Ok(()) => (full, true, bytes),
            Err(err) => {
                tracing::error!(error = %err, "full sync failed; kernel keeps its previous rules");
                errors.push(err.to_string());
                (full, false, bytes)
            }
        }
    }

    fn log_pass(
        &self,
        action: &SyncAction,
        drift: bool,
        applied: bool,
        plan: &Plan,
        observed: Option<&ObservedTable>,
    ) {
        let restricted = plan.count(Verdict::Restricted);
        let exempt = plan.count(Verdict::Exempt);
        if drift && applied {
            tracing::warn!(
                action = action_name(action),
                restricted,
                exempt,
                "repaired drift: the table had been changed by someone else"
            );
        }
        match action {
            SyncAction::Nothing => {
                tracing::debug!(restricted, exempt, "in sync; nothing written")
            }
            SyncAction::Elements { add, remove } if applied => tracing::info!(
                added = add.len(),
                removed = remove.len(),
                restricted,
                exempt,
                "updated exemptions"
            ),
            SyncAction::Full(reason) if applied => tracing::info!(
                reason = reason.as_str(),
                restricted,
                exempt,
                exempt_before = dataplane::observed_exempt(observed).len(),
                "installed full ruleset"
            ),
            SyncAction::DeleteTable if applied => {
                tracing::info!("enforcement disabled: removed table inet egress_guard")
            }
            _ => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn publish(
        &mut self,
        plan: &Plan,
        counters: Option<RejectCounters>,
        repaired: bool,
        store_failed: bool,
        in_sync: bool,
        errors: &[String],
        started: Instant,
    ) {
        // Counters are only known when the table was listed this pass.
        if let Some(raw) = counters {
            self.metrics.observe_rejected(raw);
        }
        let duration = started.elapsed();
        self.status.update(|status| {
            status.enabled = self.config.enabled;
            status.last_pass = Some(Instant::now());
            status.last_pass_wall = Some(SystemTime::now());
            status.in_sync = in_sync;
            status.decisions = plan.decisions.clone();
            status.restricted = plan.count(Verdict::Restricted);
            status.exempt = plan.count(Verdict::Exempt);
            if repaired {
                status.drift_repairs += 1;
            }
            if store_failed {
                status.store_errors += 1;
            }
            if errors.is_empty() {
                status.reconciles_ok += 1;
                status.last_error = None;
                status.last_success_wall = status.last_pass_wall;
            } else {
                status.reconciles_failed += 1;
                status.last_error = Some(errors.join("; "));
            }
        });
        self.metrics.record_pass(
            self.config.enabled,
            plan.count(Verdict::Restricted),
            plan.count(Verdict::Exempt),
            duration,
            errors.is_empty(),
            repaired,
            store_failed,
        );
    }
}

fn action_name(action: &SyncAction) -> &'static str {
    match action {
        SyncAction::Nothing => "nothing",
        SyncAction::Elements { .. } => "elements",
        SyncAction::Full(_) => "full",
        SyncAction::DeleteTable => "delete-table",
    }
}

async fn read_store_blocking(path: PathBuf) -> Result<StoreSnapshot, store::StoreError> {
    // flock can block while silk writes; keep it off the async workers.
    match tokio::task::spawn_blocking(move || store::read_store(&path)).await {
        Ok(result) => result,
        Err(join) => Err(store::StoreError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(join.to_string()),
        }),
    }
}

/// Watches the store's directory (not the file: silk's pre-start deletes and recreates the
/// directory) and wakes the loop on any change to the store or its siblings.
pub struct StoreWatcher {
    dir: PathBuf,
    watcher: Option<notify::RecommendedWatcher>,
    /// Set by the callback when the directory itself went away and must be watched anew.
    lost: Arc<AtomicBool>,
    trigger: Arc<Notify>,
    changes: Arc<Changes>,
}

impl StoreWatcher {
    pub fn new(store: &Path, trigger: Arc<Notify>, changes: Arc<Changes>) -> StoreWatcher {
        let dir = match store.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        StoreWatcher {
            dir,
            watcher: None,
            lost: Arc::new(AtomicBool::new(false)),
            trigger,
            changes,
        }
    }

    /// (Re)establishes the watch if needed; cheap when already watching.
    pub fn ensure(&mut self) {
        if self.lost.swap(false, Ordering::SeqCst) {
            self.watcher = None;
            self.changes.store_watched(false);
        }
        if self.watcher.is_some() || !self.dir.is_dir() {
            return;
        }
        let trigger = self.trigger.clone();
        let lost = self.lost.clone();
        let dir = self.dir.clone();
        let changes = self.changes.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else {
                // Queue overflow or similar: the store may have changed; look again.
                changes.mark_store();
                trigger.notify_one();
                return;
            };
            // Our own reads (open, flock, close) show up as access events: ignore them or
            // every pass would trigger the next.
            if event.kind.is_access() || event.kind.is_other() {
                return;
            }
            if event.kind.is_remove() && event.paths.iter().any(|p| p == &dir) {
                lost.store(true, Ordering::SeqCst);
                changes.store_watched(false);
            }
            changes.mark_store();
            trigger.notify_one();
        });
        match watcher {
            Ok(mut watcher) => match watcher.watch(&self.dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    tracing::debug!(dir = %self.dir.display(), "watching metadata store directory");
                    self.watcher = Some(watcher);
                    // The store may have changed while unwatched.
                    self.changes.store_watched(true);
                    self.trigger.notify_one();
                }
                Err(err) => tracing::warn!(dir = %self.dir.display(), error = %err,
                    "cannot watch metadata store directory; relying on the periodic pass"),
            },
            Err(err) => tracing::warn!(error = %err, "cannot create file watcher"),
        }
    }
}

/// How often free heap memory is handed back to the kernel.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Returns freed heap pages to the kernel: a pass at thousands of containers allocates a few
/// MB of temporaries, which glibc would otherwise keep resident.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Runs the agent until `shutdown` resolves. The rules stay in place afterwards.
pub async fn run(
    config: Config,
    status: SharedStatus,
    metrics: SharedMetrics,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let trigger = Arc::new(Notify::new());
    let changes = Arc::new(Changes::default());
    let kernel = KernelReader::connect()?;
    let mut store_watcher =
        StoreWatcher::new(&config.metadata_store, trigger.clone(), changes.clone());
    let mut ticker = tokio::time::interval(config.reconcile_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconciler = Reconciler::new(config, kernel, status)
        .with_metrics(metrics)
        .with_changes(changes.clone());
    let events = {
        let trigger = trigger.clone();
        let own_writes = reconciler.own_writes();
        tokio::spawn(async move {
            if let Err(err) =
                crate::inventory::kernel::watch_events(trigger, changes, own_writes).await
            {
                tracing::error!(error = %err,
                    "kernel event watch stopped; every pass reads everything");
            }
        })
    };
    tracing::info!(
        enabled = reconciler.config.enabled,
        overlay = %reconciler.config.overlay_network,
        nft = %reconciler.nft.program().display(),
        "egress-guard starting"
    );

    tokio::pin!(shutdown);
    let mut last_trim = Instant::now();
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            _ = ticker.tick() => {}
            () = trigger.notified() => tokio::time::sleep(EVENT_COALESCE).await,
        }
        store_watcher.ensure();
        reconciler.pass().await;
        if last_trim.elapsed() >= TRIM_EVERY {
            release_free_memory();
            last_trim = Instant::now();
        }
    }
    events.abort();
    tracing::info!("egress-guard stopping; rules stay in place");
    Ok(())
}
