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

mod learn;
mod mailbox;
mod publish;
mod refresh;
mod run;
mod sync;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crate::attribution::SharedBlocked;
use crate::config::Config;
use crate::dataplane::{AgentTable, Dataplane, ObservedTable, SyncAction};
use crate::inventory::store::StoreReader;
use crate::inventory::{KernelReader, RouteTable};
use crate::metrics::{Metrics, SharedMetrics};
use crate::policy::{DesiredRules, Dirty, Planner};
use crate::status::SharedStatus;

pub use learn::LEARN_BATCH;

pub use mailbox::Changes;
pub use run::run_until_stopped;

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

/// What a pass found and did, for [`Reconciler::publish`].
struct PassResult {
    observation: Observation,
    /// The tables had drifted and are repaired.
    repaired: bool,
    /// The store could not be read (the last good one was used).
    store_failed: bool,
    /// The kernel now holds what the pass wanted.
    in_sync: bool,
    errors: Vec<String>,
    started: Instant,
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
    /// What the start-up probe found (kept for a planner made by a reload).
    per_element_limits: Option<bool>,
    /// Learn requests of the DNS filter (hostname rules), served between passes and between
    /// a pass's steps.
    learns: Option<tokio::sync::mpsc::Receiver<crate::dns::LearnRequest>>,
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
            per_element_limits: None,
            learns: None,
        }
    }

    /// Attributes blocked attempts through `blocked` (the NFLOG reader's state).
    /// What the start-up probe found about per-element limits ([`crate::dataplane::probe`]):
    /// `Some(false)` makes the DNS guard use one cell-wide budget; None (the probe could not
    /// run) keeps the per-container rules, which on a kernel without the fix limit nothing
    /// but also let nothing else through.
    pub fn with_per_container_limits(mut self, enforced: Option<bool>) -> Reconciler {
        self.per_element_limits = enforced;
        if enforced == Some(false) {
            self.planner.set_per_element_limits(false);
        }
        self.status
            .update(|status| status.per_container_limits = enforced);
        self.metrics.set_per_container_limits(enforced);
        self
    }

    pub fn with_blocked(mut self, blocked: SharedBlocked) -> Reconciler {
        self.blocked = blocked;
        self
    }

    /// Serves the DNS filter's learn requests from `learns`.
    pub fn with_learns(
        mut self,
        learns: Option<tokio::sync::mpsc::Receiver<crate::dns::LearnRequest>>,
    ) -> Reconciler {
        self.learns = learns;
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
        let store_changed = self.changes.store.clone();
        reader.on_caught_up(Arc::new(move || {
            store_changed.take();
        }));
        reader
    }

    /// Reports into `metrics` instead of a private registry.
    pub fn with_metrics(mut self, metrics: SharedMetrics) -> Reconciler {
        self.metrics = metrics;
        self
    }

    /// Runs with `config` from the next pass on: the policy is evaluated again for every
    /// container, and a new structure (rules, allowed networks, mode) is one batch that
    /// replaces both tables at once. `config` is what [`Config::reloaded`] gives: the keys a
    /// reload cannot change keep their running values.
    pub fn reload(&mut self, config: Config) {
        let mut planner = Planner::new(&config);
        if self.per_element_limits == Some(false) {
            planner.set_per_element_limits(false);
        }
        self.planner = planner;
        self.config = config;
        self.force_verify();
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
        self.serve_waiting_learns().await;
        self.refresh_kernel(reads, &mut dirty, &mut errors).await;
        self.serve_waiting_learns().await;
        let changes = self.plan(&dirty);
        let observation = self.observe(reads.ruleset).await;
        self.serve_waiting_learns().await;
        let desired = self.config.enabled.then(|| self.planner.rules().clone());
        let (action, drift) = self.choose(desired.as_ref(), &observation);
        let outcome = self.apply(action, desired.as_ref(), &mut errors).await;
        self.serve_waiting_learns().await;
        self.record(desired, reads, &outcome, &errors);
        self.log_pass(&outcome, drift, &observation);
        let result = PassResult {
            observation,
            repaired: drift && outcome.applied,
            store_failed,
            in_sync: outcome.applied,
            errors,
            started,
        };
        self.publish(&changes, &dirty, &result);
        PassReport {
            drift,
            listed: matches!(result.observation, Observation::Listed(_)),
            errors: result.errors,
            batch_bytes: outcome.bytes,
            action: outcome.action,
        }
    }
}
