//! The dataplane: the agent's two nf_tables tables, written and read back over its own
//! netlink socket.
//!
//! - [`model`]: the typed description of the tables (pure);
//! - [`plan`]: the smallest action per table that makes the kernel match (pure);
//! - [`netlink`]: messages (pure, golden-tested against nft) and the socket (edge);
//! - [`render`]: the same ruleset as nft text and JSON, for people (`egress-guard render`).
//!
//! At most one batch per pass, built completely before it is applied.

pub mod learned;
pub mod model;
pub mod netlink;
pub mod observe;
pub mod plan;
pub mod probe;
pub mod render;

use std::collections::BTreeMap;

use nix::errno::Errno;

pub use model::AgentTable;
pub use netlink::{NetlinkError, NetlinkSocket, Transport};
pub use observe::{BlockedCounters, ObservedTable, RejectCounters};
pub use plan::{FullSyncReason, SyncAction, TableAction};

use crate::policy::{DesiredRules, RuleSet};
use netlink::{Batch, DumpKind, Listing, Op};

/// The agent's tables in the kernel, through one transport (its netlink socket).
pub struct Dataplane<T: Transport = NetlinkSocket> {
    transport: T,
    /// Whether the kernel accepts `NFT_TABLE_F_OWNER`: unknown until a batch tried it.
    owner_support: Option<bool>,
    /// What the DNS filter learned (put back into a table that is recreated).
    learned: learned::LearnedStore,
}

pub use learned::LearnOutcome;

/// What an applied batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Bytes sent to the kernel (0 when nothing was written).
    pub bytes: usize,
    /// The kernel refused the owner flag this time; the batch was applied without the owned
    /// table.
    pub owner_refused: bool,
}

impl Dataplane<NetlinkSocket> {
    /// Opens the agent's netlink socket; must be called inside a tokio runtime.
    pub fn open() -> Result<Self, NetlinkError> {
        Ok(Dataplane::new(NetlinkSocket::open()?))
    }
}

impl<T: Transport> Dataplane<T> {
    pub fn new(transport: T) -> Self {
        Dataplane {
            transport,
            owner_support: None,
            learned: learned::LearnedStore::default(),
        }
    }

    /// The socket's port id: owner of the owned table, sender of the agent's transactions.
    pub fn port_id(&self) -> u32 {
        self.transport.port_id()
    }

    /// Whether the owned (tamper-proof) table is in use: None until the kernel was asked.
    pub fn tamper_protection(&self) -> Option<bool> {
        self.owner_support
    }

    /// The tables the agent keeps: both, or only the persistent one on a kernel that refuses
    /// the owner flag.
    pub fn managed(&self) -> &'static [AgentTable] {
        match self.owner_support {
            Some(false) => &[AgentTable::Persistent],
            _ => &AgentTable::ALL,
        }
    }

    /// Reads the agent's tables back from the kernel, asking for the chains of every rule set
    /// in `rule_sets` (what was written last and what is wanted now).
    pub async fn observe(
        &mut self,
        rule_sets: &[&RuleSet],
    ) -> Result<BTreeMap<AgentTable, ObservedTable>, NetlinkError> {
        let mut chain_names: Vec<String> = Vec::new();
        for rule_set in rule_sets.iter().copied().chain([&RuleSet::default()]) {
            for name in model::chain_names(rule_set) {
                if !chain_names.contains(&name) {
                    chain_names.push(name);
                }
            }
        }
        let mut listing = Listing::default();
        for message in self.transport.dump(DumpKind::Tables).await? {
            listing.add(&message);
        }
        let tables: Vec<AgentTable> = listing.tables().collect();
        for table in tables {
            // Every chain and set the agent makes, by name: a missing one shows as a difference.
            let mut kinds: Vec<DumpKind> = chain_names
                .iter()
                .cloned()
                .map(|chain| DumpKind::Chain(table, chain))
                .collect();
            kinds.extend([DumpKind::Objects(table), DumpKind::Sets(table)]);
            // A dynamic set's elements are the kernel's own (per-container budgets): not read.
            kinds.extend(
                model::sets()
                    .into_iter()
                    .filter(|set| set.bounds.is_none())
                    .map(|set| DumpKind::Elements(table, set.name)),
            );
            kinds.push(DumpKind::Rules(table));
            for kind in kinds {
                self.transport
                    .dump_into(kind, &mut |message| listing.add(&message))
                    .await?;
            }
        }
        Ok(listing.finish())
    }

    /// Applies `action` as one batch. A kernel that refuses the owner flag gets the batch
    /// again without the owned table, and the agent keeps the single table from then on.
    pub async fn apply(
        &mut self,
        action: &SyncAction,
        desired: Option<&DesiredRules>,
    ) -> Result<Applied, NetlinkError> {
        let mut batch = action.batch(desired);
        let marks = self.with_learned(&mut batch, action, desired);
        let result = self.apply_batch(batch).await;
        if result.is_ok() {
            // The rules whose marks went took their elements with them.
            self.learned
                .take_unmarked(std::time::Instant::now(), &marks);
        }
        result
    }

    /// Puts what the DNS filter learned into the tables `action` recreates, and first takes it
    /// out of the tables it restructures where its rule goes (an element holds its chain).
    /// Returns the hostname rules' marks the kernel keeps.
    fn with_learned(
        &mut self,
        batch: &mut Batch,
        action: &SyncAction,
        desired: Option<&DesiredRules>,
    ) -> std::collections::BTreeSet<u16> {
        let marks = desired
            .map(|rules| rules.rule_set.mark_set())
            .unwrap_or_default();
        if self.learned.is_empty() {
            return marks;
        }
        let now = std::time::Instant::now();
        self.learned.prune(now);
        let live = self.learned.live(now, &marks);
        let gone: Vec<model::LearnedElement> = {
            let all: std::collections::BTreeSet<u16> = (0..=crate::policy::MAX_HOST_MARK).collect();
            let everything = self.learned.live(now, &all);
            everything
                .into_iter()
                .filter(|e| !marks.contains(&e.mark))
                .collect()
        };
        let mut removals = Vec::new();
        for (table, table_action) in &action.tables {
            match table_action {
                TableAction::Full(_) if desired.is_some() => {
                    for elements in learned::by_family(live.clone()) {
                        if !elements.is_empty() {
                            batch.push(Op::AddLearned {
                                table: *table,
                                elements,
                            });
                        }
                    }
                }
                TableAction::Restructure { .. } => {
                    for elements in learned::by_family(gone.clone()) {
                        if !elements.is_empty() {
                            removals.push(Op::DeleteLearned {
                                table: *table,
                                elements,
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        batch.ops.splice(0..0, removals);
        marks
    }

    /// Reads back what the persistent table learned before a restart (with the time each
    /// element has left), so that recreating the owned table puts it back there too.
    pub async fn restore_learned(&mut self) -> Result<usize, NetlinkError> {
        let now = std::time::Instant::now();
        for map in [model::LEARNED4_MAP, model::LEARNED6_MAP] {
            let messages = self
                .transport
                .dump(DumpKind::Elements(AgentTable::Persistent, map))
                .await?;
            self.learned
                .restore(&netlink::dump::learned_elements(&messages), now);
        }
        Ok(self.learned.len())
    }

    /// Allows what each of `requests` asks (one answer's addresses for one container, through
    /// one hostname rule, for a time), all in one batch on every table; an address a container
    /// holds already is refreshed (deleted and added again in the batch: the stemcells'
    /// kernels cannot update an element's timeout in place). Bounded per container and in
    /// total. One outcome per request, in order; a batch the kernel refuses fails them all.
    pub async fn learn(
        &mut self,
        requests: &[learned::Learn],
    ) -> Vec<Result<LearnOutcome, String>> {
        let now = std::time::Instant::now();
        self.learned.prune(now);
        let plan = learned::plan(&self.learned, requests);
        if plan.elements.is_empty() {
            return plan.outcomes.into_iter().map(Ok).collect();
        }
        let with_deletions = plan.batch(self.managed(), true);
        let result = match self.transport.apply(&with_deletions).await {
            Ok(_) => Ok(()),
            // A refreshed element may have expired in the kernel a moment ago (nothing to
            // delete): add only. Anything else fails the same way again.
            Err(_) if plan.refreshes() => self
                .transport
                .apply(&plan.batch(self.managed(), false))
                .await
                .map(|_| ()),
            Err(err) => Err(err),
        };
        match result {
            Ok(()) => {
                for element in &plan.elements {
                    self.learned.record(
                        element.ifindex,
                        &[element.address],
                        element.mark,
                        now + std::time::Duration::from_millis(element.timeout_ms),
                    );
                }
                plan.outcomes.into_iter().map(Ok).collect()
            }
            Err(err) => requests.iter().map(|_| Err(err.to_string())).collect(),
        }
    }

    /// Learned addresses held now.
    pub fn learned_count(&self) -> usize {
        self.learned.len()
    }

    /// Live learned addresses by hostname rule mark.
    pub fn learned_per_mark(&self) -> std::collections::BTreeMap<u16, usize> {
        self.learned.per_mark(std::time::Instant::now())
    }

    async fn apply_batch(&mut self, batch: Batch) -> Result<Applied, NetlinkError> {
        match self.transport.apply(&batch).await {
            Ok(bytes) => {
                if batch.creates_owned_table() {
                    self.owner_support = Some(true);
                }
                Ok(Applied {
                    bytes,
                    owner_refused: false,
                })
            }
            Err(err) if refuses_owner(&batch, &err) => {
                tracing::warn!(error = %err,
                    "the kernel refuses NFT_TABLE_F_OWNER (needs Linux 5.12 or later): running with \
                     table inet egress_guard only; `nft flush ruleset` can open egress until the \
                     agent repairs it");
                self.owner_support = Some(false);
                let bytes = self
                    .transport
                    .apply(&batch.without(AgentTable::Owned))
                    .await?;
                Ok(Applied {
                    bytes,
                    owner_refused: true,
                })
            }
            Err(err) => Err(err),
        }
    }
}

/// Whether `err` is the kernel refusing to create the owned table with its flag.
fn refuses_owner(batch: &Batch, err: &NetlinkError) -> bool {
    let NetlinkError::Refused { index, errno, .. } = err else {
        return false;
    };
    let creates_owned = matches!(
        batch.ops.get(*index),
        Some(Op::AddTable {
            table: AgentTable::Owned,
            flags: Some(_)
        })
    );
    creates_owned && matches!(errno, Errno::EOPNOTSUPP | Errno::EINVAL)
}

/// Reads the reject and report counters of the agent's tables over a socket of its own (for
/// `/metrics` and `/blocked`, outside the reconcile loop). Tables that do not exist are absent.
pub async fn read_counters()
-> Result<BTreeMap<AgentTable, (RejectCounters, BlockedCounters)>, NetlinkError> {
    let mut socket = NetlinkSocket::open()?;
    let mut listing = Listing::default();
    for message in socket.dump(DumpKind::Tables).await? {
        listing.add(&message);
    }
    let tables: Vec<AgentTable> = listing.tables().collect();
    for table in tables {
        for message in socket.dump(DumpKind::Objects(table)).await? {
            listing.add(&message);
        }
    }
    Ok(listing
        .finish()
        .into_iter()
        .map(|(table, observed)| (table, (observed.rejected, observed.blocked)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_netfilter::nftables::NfTablesMessage;
    use std::net::Ipv4Addr;

    /// A kernel that applies nothing, records batches, and refuses the owner flag when told.
    struct FakeKernel {
        refuse_owner: bool,
        applied: Vec<Batch>,
    }

    impl Transport for FakeKernel {
        fn port_id(&self) -> u32 {
            7
        }

        async fn apply(&mut self, batch: &Batch) -> Result<usize, NetlinkError> {
            if self.refuse_owner
                && let Some(index) = batch.ops.iter().position(|op| {
                    matches!(op, Op::AddTable { table: AgentTable::Owned, flags: Some(f) } if *f != 0)
                })
            {
                return Err(NetlinkError::Refused {
                    operation: batch.ops[index].describe(),
                    index,
                    errno: Errno::EOPNOTSUPP,
                });
            }
            self.applied.push(batch.clone());
            Ok(batch.ops.len())
        }

        async fn dump(&mut self, _: DumpKind) -> Result<Vec<NfTablesMessage>, NetlinkError> {
            Ok(Vec::new())
        }
    }

    fn rules() -> DesiredRules {
        DesiredRules {
            allowed6: Vec::new(),
            exempt6: Default::default(),
            containers6: Default::default(),
            mode: Default::default(),
            overlay: "10.255.0.0/16".parse().expect("literal"),
            allowed: vec!["10.0.0.0/8".parse().expect("literal")],
            exempt: [crate::policy::ExemptKey {
                ifindex: 3,
                ip: Ipv4Addr::new(10, 255, 0, 3),
            }]
            .into(),
            dns: None,
            rule_set: Default::default(),
            scopes: Default::default(),
        }
    }

    async fn first_sync(refuse_owner: bool) -> (Dataplane<FakeKernel>, Applied) {
        let mut dataplane = Dataplane::new(FakeKernel {
            refuse_owner,
            applied: Vec::new(),
        });
        let desired = rules();
        let observed = dataplane.observe(&[]).await.expect("fake dump");
        let action = plan::choose(
            Some(&desired),
            dataplane.managed(),
            &observed,
            dataplane.port_id(),
        );
        let applied = dataplane
            .apply(&action, Some(&desired))
            .await
            .expect("applies");
        (dataplane, applied)
    }

    #[tokio::test]
    async fn both_tables_are_created_in_one_batch() {
        let (dataplane, applied) = first_sync(false).await;
        assert!(!applied.owner_refused);
        assert_eq!(dataplane.tamper_protection(), Some(true));
        assert_eq!(dataplane.managed(), &AgentTable::ALL);
        let [batch] = dataplane.transport.applied.as_slice() else {
            panic!("one batch expected");
        };
        for table in AgentTable::ALL {
            assert!(batch.ops.iter().any(|op| op.table() == table), "{table:?}");
        }
    }

    #[tokio::test]
    async fn a_kernel_without_owner_support_gets_the_single_table() {
        let (mut dataplane, applied) = first_sync(true).await;
        assert!(applied.owner_refused);
        assert_eq!(dataplane.tamper_protection(), Some(false));
        assert_eq!(dataplane.managed(), &[AgentTable::Persistent]);
        let [batch] = dataplane.transport.applied.as_slice() else {
            panic!("the retried batch only");
        };
        assert!(
            batch
                .ops
                .iter()
                .all(|op| op.table() == AgentTable::Persistent)
        );
        assert!(batch.ops.iter().any(|op| matches!(op, Op::AddRule { .. })));
        // Later passes no longer try the owned table.
        let desired = rules();
        let action = plan::choose(
            Some(&desired),
            dataplane.managed(),
            &BTreeMap::new(),
            dataplane.port_id(),
        );
        dataplane
            .apply(&action, Some(&desired))
            .await
            .expect("applies");
        assert_eq!(dataplane.transport.applied.len(), 2);
        assert!(!dataplane.transport.applied[1].creates_owned_table());
    }
}
