//! The reconcile loop: events and a timer -> one pass -> at most one nf_tables batch.
//!
//! A pass is its steps, in order: take what changed, refresh the inputs that did (the store,
//! keeping the last good one on error; link names; routes), plan (the policy), observe the
//! kernel's tables (listed after a foreign transaction, otherwise assumed to hold what the
//! agent last wrote), choose the smallest action, apply it as one batch, publish status and
//! metrics. Nothing is written when nothing differs. Passes run on start, on every store, link,
//! route or foreign nf_tables event (those that arrive during a pass are taken by the next
//! together), and every
//! `reconcile_interval`; every [`VERIFY_EVERY`] intervals a pass reads everything. Stopping the
//! loop leaves the persistent table in place: the agent fails closed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::Notify;

use crate::blocked::{self, SharedBlocked};
use crate::config::Config;
use crate::dataplane::model::NFLOG_GROUP;
use crate::dataplane::netlink::nflog::NflogSocket;
use crate::dataplane::{
    self, AgentTable, Dataplane, FullSyncReason, ObservedTable, SyncAction, TableAction, plan,
};
use crate::inventory::kernel::Changes;
use crate::inventory::store::{self, StoreDelta, StoreReader};
use crate::inventory::{KernelReader, RouteTable};
use crate::metrics::{Metrics, SharedMetrics};
use crate::policy::{Change, DesiredRules, Dirty, Inputs, Planner, Verdict};
use crate::status::SharedStatus;

/// What one pass did, for logs, tests and benchmarks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub action: SyncAction,
    /// The kernel differed from what the agent last wrote: someone else changed it.
    pub drift: bool,
    /// The tables were listed (a verifying pass, or a foreign change was reported).
    pub listed: bool,
    /// Problems that made the pass less than fully successful.
    pub errors: Vec<String>,
    /// Size of the batch written, in bytes (0 when nothing was written).
    pub batch_bytes: usize,
}

/// Which inputs a pass reads.
#[derive(Debug, Clone, Copy)]
struct Reads {
    store: bool,
    links: bool,
    ruleset: bool,
    /// A verifying pass: parse the whole store, dump routes rather than follow route events,
    /// and evaluate every decision again.
    verify: bool,
}

/// What the kernel's tables are taken to hold this pass.
enum Observation {
    /// Nobody else committed since the agent's last write: exactly what it wrote, with this
    /// many IPv4 exemptions.
    Assumed { exempt: usize },
    /// Listed over netlink.
    Listed(BTreeMap<AgentTable, ObservedTable>),
    /// Could not be listed.
    Unreadable(String),
}

impl Observation {
    fn tables(&self) -> Option<&BTreeMap<AgentTable, ObservedTable>> {
        match self {
            Observation::Listed(t) => Some(t),
            Observation::Assumed { .. } | Observation::Unreadable(_) => None,
        }
    }
}

/// The outcome of applying a pass's action.
struct Outcome {
    action: SyncAction,
    /// The kernel now holds what the pass wanted.
    applied: bool,
    bytes: usize,
}

/// Owns the agent's view between passes.
pub struct Reconciler {
    config: Config,
    dataplane: Dataplane,
    kernel: KernelReader,
    /// The store as last read; holds the last good read (empty, so restrictive, until the
    /// first). Re-parses only what changed.
    store: StoreReader,
    /// The policy's decisions and rules, evaluated again only where the inputs changed.
    planner: Planner,
    /// What the agent last wrote successfully: Some(None) = tables absent (disabled).
    last_written: Option<Option<DesiredRules>>,
    /// Link names: the last link dump, kept current from link events.
    links: BTreeMap<u32, String>,
    /// Host routes: the last route dump, kept current from route, address and link events.
    routes: RouteTable,
    /// Container IP -> host ifindex, from `routes` (kept from the destinations each route
    /// event touched).
    container_routes: BTreeMap<std::net::Ipv4Addr, u32>,
    /// Container IPv6 routes: dumped again after any IPv6 route event (a cell routes few).
    routes6: BTreeMap<std::net::Ipv6Addr, u32>,
    /// Whether IPv6 is enabled in the cell's network namespace (checked on verifying passes).
    ipv6_in_use: bool,
    /// What the event watchers saw change; unwatched sources always count as changed.
    changes: Arc<Changes>,
    /// When the kernel's tables were last listed and found (or made) right.
    last_verified: Option<Instant>,
    /// The previous pass had no error (otherwise the next one verifies everything).
    last_pass_ok: bool,
    status: SharedStatus,
    metrics: SharedMetrics,
    /// Blocked-attempt attribution: the lookup and mode it attributes by, set after each pass.
    blocked: SharedBlocked,
}

/// Every this many reconcile intervals a pass reads everything even without events.
pub const VERIFY_EVERY: u32 = 6;

impl Reconciler {
    pub fn new(
        config: Config,
        kernel: KernelReader,
        dataplane: Dataplane,
        status: SharedStatus,
    ) -> Reconciler {
        Reconciler {
            store: StoreReader::new(config.metadata_store.clone()),
            planner: Planner::new(&config),
            config,
            dataplane,
            kernel,
            last_written: None,
            links: BTreeMap::new(),
            routes: RouteTable::default(),
            container_routes: BTreeMap::new(),
            routes6: BTreeMap::new(),
            ipv6_in_use: false,
            changes: Arc::default(),
            last_verified: None,
            last_pass_ok: true,
            status,
            metrics: Arc::new(Metrics::new()),
            blocked: SharedBlocked::default(),
        }
    }

    /// Attributes blocked attempts through `blocked` (the NFLOG reader's state).
    pub fn with_blocked(mut self, blocked: SharedBlocked) -> Reconciler {
        self.blocked = blocked;
        self
    }

    /// Reads only what `changes` says changed (shared with the event watchers).
    pub fn with_changes(mut self, changes: Arc<Changes>) -> Reconciler {
        self.changes = changes;
        self.store = self.new_store_reader();
        self
    }

    /// A reader of the store that has read nothing yet. It takes the store's change flag once
    /// it holds silk's lock: the events of the write it waited for are then in what it reads.
    fn new_store_reader(&self) -> StoreReader {
        let mut reader = StoreReader::new(self.config.metadata_store.clone());
        let changes = self.changes.clone();
        reader.on_caught_up(Arc::new(move || {
            changes.take_store();
        }));
        reader
    }

    /// Reports into `metrics` instead of a private registry.
    pub fn with_metrics(mut self, metrics: SharedMetrics) -> Reconciler {
        self.metrics = metrics;
        self
    }

    /// Makes the next pass a verifying one (reads the store, links and tables regardless).
    pub fn force_verify(&mut self) {
        self.last_verified = None;
    }

    /// The netlink port id of the agent's socket (its nf_tables transactions carry it).
    pub fn port_id(&self) -> u32 {
        self.dataplane.port_id()
    }

    /// One reconcile pass: refresh inputs, plan, observe, choose, apply, publish.
    pub async fn pass(&mut self) -> PassReport {
        let started = Instant::now();
        let mut errors = Vec::new();
        let reads = self.take_changes();
        let mut dirty = Dirty {
            all: reads.verify,
            ..Dirty::default()
        };
        let store_failed = self.refresh_store(reads, &mut dirty, &mut errors).await;
        self.refresh_kernel(reads, &mut dirty, &mut errors).await;
        let changes = self.plan(&dirty);
        let observation = self.observe(reads.ruleset).await;
        let desired = self.config.enabled.then(|| self.planner.rules().clone());
        let (action, drift) = self.choose(desired.as_ref(), &observation);
        let outcome = self.apply(action, desired.as_ref(), &mut errors).await;
        self.record(desired, reads, &outcome, &errors);
        self.log_pass(&outcome, drift, &observation);
        self.publish(
            &changes,
            &dirty,
            &observation,
            drift && outcome.applied,
            store_failed,
            outcome.applied,
            &errors,
            started,
        );
        PassReport {
            drift,
            listed: matches!(observation, Observation::Listed(_)),
            errors,
            batch_bytes: outcome.bytes,
            action: outcome.action,
        }
    }

    /// Which inputs to read. A *verifying* pass reads everything: the first pass, any pass
    /// after a failure, and one every [`VERIFY_EVERY`] intervals, so that even a lost event
    /// costs at most that long. Every flag is taken now, before reading, so changes made while
    /// the pass reads are seen by the next one.
    fn take_changes(&mut self) -> Reads {
        let verify = self.last_written.is_none()
            || !self.last_pass_ok
            || self
                .last_verified
                .is_none_or(|at| at.elapsed() >= self.config.reconcile_interval * VERIFY_EVERY);
        // Routes take their own flag in `refresh_routes` (after draining their queue), the
        // store reader the store's once it holds silk's lock.
        Reads {
            store: self.changes.store_pending() || verify,
            links: self.changes.take_links() || verify,
            ruleset: self.changes.take_ruleset() || verify,
            verify,
        }
    }

    /// Re-reads the store when it changed (all of it on a verifying pass, otherwise what
    /// differs from the last read); on error keeps the last good one. Returns whether the read
    /// failed.
    async fn refresh_store(
        &mut self,
        reads: Reads,
        dirty: &mut Dirty,
        errors: &mut Vec<String>,
    ) -> bool {
        if !reads.store {
            return false;
        }
        let had_read = self.store.last_read().is_some();
        let placeholder = self.new_store_reader();
        let (reader, result) = read_store_blocking(
            std::mem::replace(&mut self.store, placeholder),
            reads.verify,
        )
        .await;
        match reader {
            Some(reader) => self.store = reader,
            // The reader was lost with its thread: start again from nothing (restrictive; the
            // next read parses the whole store), and evaluate every decision again.
            None => dirty.all |= had_read,
        }
        match result {
            Ok(delta) => {
                note_store_changes(delta, dirty);
                false
            }
            Err(err) => {
                tracing::error!(error = %err, entries_kept = self.store.entries().len(),
                    "metadata store unreadable; keeping last good inventory, rules unchanged in strictness");
                errors.push(err.to_string());
                true
            }
        }
    }

    /// Link names and host routes into the overlay: each a dump when its cache cannot be
    /// trusted (a verifying pass, an overrun), otherwise the events queued since the last pass.
    /// What changed goes into `dirty`.
    async fn refresh_kernel(&mut self, reads: Reads, dirty: &mut Dirty, errors: &mut Vec<String>) {
        self.refresh_links(reads.links, dirty, errors).await;
        self.refresh_routes(reads.verify, dirty, errors).await;
        if self.changes.take_routes6() || reads.verify {
            self.ipv6_in_use = crate::inventory::kernel::ipv6_in_use();
            let routes6 = match self.kernel.routes6().await {
                Ok(routes6) => routes6,
                Err(err) => {
                    // Fail closed: no IPv6 exemption until a dump succeeds.
                    tracing::error!(error = %err, "cannot list IPv6 routes; no container is exempt over IPv6 this pass");
                    errors.push(err.to_string());
                    BTreeMap::new()
                }
            };
            dirty.routes6 |= routes6 != self.routes6;
            self.routes6 = routes6;
        }
    }

    async fn refresh_links(&mut self, dump: bool, dirty: &mut Dirty, errors: &mut Vec<String>) {
        if dump {
            match self.kernel.links().await {
                Ok(links) => {
                    dirty.links.extend(changed_keys(&self.links, &links));
                    self.links = links;
                }
                Err(err) => {
                    tracing::error!(error = %err, "cannot list links");
                    errors.push(err.to_string());
                }
            }
        }
        // Link events since then, in order (after a dump too: replaying converges).
        for (index, name) in self.changes.drain_link_updates() {
            let changed = match name {
                Some(name) => self.links.insert(index, name.clone()).as_ref() != Some(&name),
                None => self.links.remove(&index).is_some(),
            };
            if changed {
                dirty.links.insert(index);
            }
        }
    }

    async fn refresh_routes(&mut self, dump: bool, dirty: &mut Dirty, errors: &mut Vec<String>) {
        let overlay = self.config.overlay_network;
        let dumped = match self
            .kernel
            .refresh_routes(&mut self.routes, &self.changes, dump)
            .await
        {
            Ok(dumped) => dumped,
            Err(err) => {
                // The table is now empty (fail closed) and the next pass dumps.
                tracing::error!(error = %err, "cannot list routes; no container is exempt this pass");
                errors.push(err.to_string());
                true
            }
        };
        let touched = self.routes.take_touched();
        if dumped {
            let routes = self.routes.containers(overlay);
            dirty
                .routes
                .extend(changed_keys(&self.container_routes, &routes));
            self.container_routes = routes;
            return;
        }
        for ip in touched {
            let now = self.routes.container(ip, overlay);
            let before = match now {
                Some(ifindex) => self.container_routes.insert(ip, ifindex),
                None => self.container_routes.remove(&ip),
            };
            if before != now {
                dirty.routes.insert(ip);
            }
        }
    }

    /// Brings the policy's decisions up to date; returns those that changed.
    fn plan(&mut self, dirty: &Dirty) -> Vec<Change> {
        let inputs = Inputs {
            entries: self.store.entries(),
            routes: &self.container_routes,
            routes6: &self.routes6,
            links: &self.links,
        };
        self.planner.update(inputs, dirty)
    }

    /// Lists the tables when someone else may have changed them; otherwise assumes they hold
    /// what the agent last wrote (a wrong assumption can only make an element update fail,
    /// which falls back to a full sync).
    async fn observe(&mut self, list: bool) -> Observation {
        match (&self.last_written, list) {
            (Some(written), false) => Observation::Assumed {
                exempt: written.as_ref().map_or(0, |rules| rules.exempt.len()),
            },
            _ => match self.dataplane.observe().await {
                Ok(tables) => Observation::Listed(tables),
                Err(err) => Observation::Unreadable(err.to_string()),
            },
        }
    }

    /// The action that makes the kernel match, and whether it had drifted from what the agent
    /// last wrote.
    fn choose(
        &self,
        desired: Option<&DesiredRules>,
        observation: &Observation,
    ) -> (SyncAction, bool) {
        let managed = self.dataplane.managed();
        let port = self.dataplane.port_id();
        match observation {
            Observation::Assumed { .. } => {
                let written = self.last_written.as_ref().and_then(Option::as_ref);
                (
                    plan::choose_from_written(desired, written, managed, port),
                    false,
                )
            }
            Observation::Listed(tables) => {
                let drift = self
                    .last_written
                    .as_ref()
                    .is_some_and(|written| !plan::matches(written.as_ref(), managed, tables, port));
                (plan::choose(desired, managed, tables, port), drift)
            }
            Observation::Unreadable(err) => {
                // Cannot see the tables: rewrite them whole (idempotent, never looser).
                tracing::warn!(error = %err, "cannot read back the tables; doing a full sync");
                let action = match desired {
                    Some(_) => TableAction::Full(FullSyncReason::StructureDiffers),
                    None => TableAction::Delete,
                };
                let tables = managed.iter().map(|t| (*t, action.clone())).collect();
                (SyncAction { tables }, false)
            }
        }
    }

    /// Applies `action` as one batch; a rejected element update falls back to a full sync in
    /// the same pass.
    async fn apply(
        &mut self,
        action: SyncAction,
        desired: Option<&DesiredRules>,
        errors: &mut Vec<String>,
    ) -> Outcome {
        if action.is_nothing() {
            return Outcome {
                action,
                applied: true,
                bytes: 0,
            };
        }
        let err = match self.dataplane.apply(&action, desired).await {
            Ok(applied) => {
                return Outcome {
                    action,
                    applied: true,
                    bytes: applied.bytes,
                };
            }
            Err(err) => err,
        };
        let escalated = action.escalated();
        if escalated == action {
            tracing::error!(error = %err, action = action.kind(),
                "nf_tables batch failed; kernel keeps its previous rules");
            errors.push(err.to_string());
            return Outcome {
                action,
                applied: false,
                bytes: 0,
            };
        }
        tracing::warn!(error = %err, "element update rejected; falling back to a full sync");
        match self.dataplane.apply(&escalated, desired).await {
            Ok(applied) => Outcome {
                action: escalated,
                applied: true,
                bytes: applied.bytes,
            },
            Err(err) => {
                tracing::error!(error = %err, "full sync failed; kernel keeps its previous rules");
                errors.push(err.to_string());
                Outcome {
                    action: escalated,
                    applied: false,
                    bytes: 0,
                }
            }
        }
    }

    /// Remembers what the kernel now holds and whether this pass verified it.
    fn record(
        &mut self,
        desired: Option<DesiredRules>,
        reads: Reads,
        outcome: &Outcome,
        errors: &[String],
    ) {
        if outcome.applied {
            self.last_written = Some(desired);
            // A recreated table's report counters start from zero.
            let mut blocked = self.blocked.lock();
            for (table, action) in &outcome.action.tables {
                if matches!(action, TableAction::Full(_)) {
                    blocked.table_recreated(*table);
                }
            }
        }
        if reads.ruleset && outcome.applied && errors.is_empty() {
            self.last_verified = Some(Instant::now());
        }
        self.last_pass_ok = errors.is_empty();
    }

    fn log_pass(&self, outcome: &Outcome, drift: bool, observation: &Observation) {
        let restricted = self.planner.count(Verdict::Restricted);
        let exempt = self.planner.count(Verdict::Exempt);
        if drift && outcome.applied {
            tracing::warn!(
                action = outcome.action.kind(),
                restricted,
                exempt,
                "repaired drift: a table had been changed by someone else"
            );
        }
        if !outcome.applied {
            return;
        }
        for (table, action) in &outcome.action.tables {
            let table = table.name();
            match action {
                TableAction::Nothing => {}
                TableAction::Elements {
                    add,
                    remove,
                    add6,
                    remove6,
                } => tracing::info!(
                    table,
                    added = add.len() + add6.len(),
                    removed = remove.len() + remove6.len(),
                    restricted,
                    exempt,
                    "updated exemptions"
                ),
                TableAction::Full(reason) => tracing::info!(
                    table,
                    reason = reason.as_str(),
                    restricted,
                    exempt,
                    exempt_before = match observation {
                        Observation::Assumed { exempt } => *exempt,
                        _ => observation
                            .tables()
                            .and_then(|t| t.get(&AgentTable::from_name(table)?))
                            .and_then(|o| o.exempt.as_ref())
                            .map_or(0, |e| e.len()),
                    },
                    "installed full ruleset"
                ),
                TableAction::Delete => {
                    tracing::info!(table, "enforcement disabled: removed table")
                }
            }
        }
        if outcome.action.is_nothing() {
            tracing::debug!(restricted, exempt, "in sync; nothing written");
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn publish(
        &mut self,
        changes: &[Change],
        dirty: &Dirty,
        observation: &Observation,
        repaired: bool,
        store_failed: bool,
        in_sync: bool,
        errors: &[String],
        started: Instant,
    ) {
        // Counters are only known when the tables were listed this pass.
        if let Observation::Listed(tables) = observation {
            for (table, observed) in tables {
                self.metrics.observe_rejected(*table, observed.rejected);
                let (growth, suppressed) = {
                    let mut blocked = self.blocked.lock();
                    (
                        blocked.observe_counters(*table, observed.blocked),
                        blocked.suppressed,
                    )
                };
                self.metrics.record_blocked(growth, suppressed);
            }
        }
        let tamper_protection = self.dataplane.tamper_protection();
        let duration = started.elapsed();
        let mode = self.config.mode;
        let (restricted, exempt) = (
            self.planner.count(Verdict::Restricted),
            self.planner.count(Verdict::Exempt),
        );
        self.status.update(|status| {
            // The decisions that changed, nothing else: the work is the size of the change.
            for change in changes {
                if let Some(before) = &change.before {
                    status.decisions.remove(&before.key());
                }
                if let Some(after) = &change.after {
                    status.decisions.insert(after.key(), after.clone());
                }
            }
            status.mode = mode;
            status.enabled = self.config.enabled;
            status.last_pass = Some(Instant::now());
            status.last_pass_wall = Some(SystemTime::now());
            status.in_sync = in_sync;
            status.tamper_protection = tamper_protection;
            status.ipv6_in_use = self.ipv6_in_use;
            status.restricted = restricted;
            status.exempt = exempt;
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
            restricted,
            exempt,
            duration,
            errors.is_empty(),
            repaired,
            store_failed,
        );
        self.metrics.set_tamper_protection(tamper_protection);
        self.metrics.set_mode(mode);
        self.publish_attribution(changes, dirty);
    }

    /// Hands the attribution the mode, the tables kept, and the decisions and interface names
    /// that changed (the lookup follows them under the lock: the work is the size of the
    /// change).
    fn publish_attribution(&self, changes: &[Change], dirty: &Dirty) {
        let mut blocked = self.blocked.lock();
        blocked.set_mode(self.config.mode, self.dataplane.managed());
        let lookup = blocked.lookup_mut();
        lookup.apply(changes);
        for ifindex in &dirty.links {
            lookup.set_link(*ifindex, self.links.get(ifindex).map(String::as_str));
        }
    }
}

/// The keys whose values differ between `before` and `after` (present in one only, or with
/// another value).
fn changed_keys<'a, K: Ord + Copy, V: PartialEq>(
    before: &'a BTreeMap<K, V>,
    after: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = K> + 'a {
    let gone = before.keys().filter(|k| !after.contains_key(k));
    let new_or_changed = after
        .iter()
        .filter(|(k, v)| before.get(k) != Some(v))
        .map(|(k, _)| k);
    gone.chain(new_or_changed).copied()
}

/// Logs entries that became unusable and marks every changed handle for the planner.
fn note_store_changes(delta: StoreDelta, dirty: &mut Dirty) {
    for (handle, parsed) in delta.changed {
        if let Some(Err(reason)) = &parsed {
            tracing::warn!(handle = %handle, reason = %reason,
                "metadata store entry is unusable; container stays restricted");
        }
        dirty.handles.insert(handle);
    }
}

/// Reads the store on a blocking thread (flock can wait while silk writes, bounded; keep it off
/// the async workers) and hands the reader back with the result (None: lost with its thread).
async fn read_store_blocking(
    mut reader: StoreReader,
    full: bool,
) -> (Option<StoreReader>, Result<StoreDelta, store::StoreError>) {
    let path = reader.path().to_path_buf();
    match tokio::task::spawn_blocking(move || {
        let result = reader.read(full);
        (reader, result)
    })
    .await
    {
        Ok((reader, result)) => (Some(reader), result),
        Err(join) => (
            None,
            Err(store::StoreError::Io {
                path,
                source: std::io::Error::other(join.to_string()),
            }),
        ),
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

/// Runs the agent until `shutdown` resolves. The persistent table stays in place afterwards;
/// the owned table goes with the agent's socket.
pub async fn run(
    config: Config,
    status: SharedStatus,
    metrics: SharedMetrics,
    blocked: SharedBlocked,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let trigger = Arc::new(Notify::new());
    let changes = Arc::new(Changes::default());
    let kernel = KernelReader::connect()?;
    let dataplane = Dataplane::open()?;
    let own_port = dataplane.port_id();
    let mut store_watcher =
        StoreWatcher::new(&config.metadata_store, trigger.clone(), changes.clone());
    let mut ticker = tokio::time::interval(config.reconcile_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Listen on the NFLOG group before the first pass, so that whatever the first batch
    // installs (after a mode change, the new mode) is reported from its first packet.
    let reports = match NflogSocket::bind(NFLOG_GROUP).await {
        Ok(socket) => Some(tokio::spawn(blocked::read_reports(socket, blocked.clone()))),
        Err(err) => {
            tracing::error!(error = %err, group = NFLOG_GROUP,
                "cannot listen on the NFLOG group: blocked attempts are not reported \
                 (enforcement is unaffected)");
            blocked.lock().error = Some(format!("cannot bind NFLOG group {NFLOG_GROUP}: {err}"));
            None
        }
    };
    let mut reconciler = Reconciler::new(config, kernel, dataplane, status)
        .with_metrics(metrics)
        .with_changes(changes.clone())
        .with_blocked(blocked);
    let kernel_events = {
        let (trigger, changes) = (trigger.clone(), changes.clone());
        tokio::spawn(async move {
            if let Err(err) = crate::inventory::kernel::watch_events(trigger, changes).await {
                tracing::error!(error = %err,
                    "link and route event watch stopped; every pass reads them");
            }
        })
    };
    let ruleset_events = {
        let (trigger, changes) = (trigger.clone(), changes.clone());
        tokio::spawn(async move {
            if let Err(err) = dataplane::netlink::events::watch(own_port, trigger, changes).await {
                tracing::error!(error = %err,
                    "nf_tables event watch stopped; every pass lists the tables");
            }
        })
    };
    tracing::info!(
        enabled = reconciler.config.enabled,
        mode = %reconciler.config.mode,
        overlay = %reconciler.config.overlay_network,
        netlink_port = own_port,
        "egress-guard starting"
    );

    tokio::pin!(shutdown);
    let mut last_trim = Instant::now();
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            _ = ticker.tick() => {}
            // No wait for the rest of a burst: it would add to the time a new staging
            // container waits for its exemption. Events that arrive during a pass are taken
            // together by the next, and a store write's own events by the read that waited
            // for it under silk's lock (see `Reconciler::new_store_reader`). The yield lets
            // the watchers take what is already queued.
            () = trigger.notified() => tokio::task::yield_now().await,
        }
        store_watcher.ensure();
        // Every wait inside a pass is bounded, but stopping need not wait for one: a batch is
        // atomic in the kernel whether or not its answer is read.
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            _ = reconciler.pass() => {}
        }
        if last_trim.elapsed() >= TRIM_EVERY {
            release_free_memory();
            last_trim = Instant::now();
        }
    }
    kernel_events.abort();
    ruleset_events.abort();
    if let Some(reports) = reports {
        reports.abort();
    }
    tracing::info!("egress-guard stopping; table inet egress_guard stays in place");
    Ok(())
}
