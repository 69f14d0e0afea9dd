//! Choosing the smallest transaction that makes the kernel match (pure).
//!
//! Each of the agent's tables is compared on its own; the actions for both are applied in one
//! batch. The default is a partial sync (exempt set elements only) when a table's structure is
//! intact; anything surprising (table missing, a rule changed, elements that cannot be read,
//! a partial sync rejected) falls back to a full sync that recreates the table atomically.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv6Addr;

use std::sync::Arc;

use super::model::{self, AgentTable, ChainSpec, Element, RuleSpec};
use super::netlink::batch::{Batch, Op};
use super::netlink::dump::normalise;
use super::observe::ObservedTable;
use crate::policy::{DesiredRules, Exempt6Key, ExemptKey, ScopeElements, ScopeKind};

/// Why a table is recreated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullSyncReason {
    TableMissing,
    StructureDiffers,
    ElementsUnreadable,
    PartialSyncFailed,
    /// The owned table exists but another socket owns it.
    NotOurs,
}

impl FullSyncReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FullSyncReason::TableMissing => "table missing",
            FullSyncReason::StructureDiffers => "chains, rules, sets or counters differ",
            FullSyncReason::ElementsUnreadable => "set elements could not be read back",
            FullSyncReason::PartialSyncFailed => "element update was rejected",
            FullSyncReason::NotOurs => "owned by another socket",
        }
    }
}

/// Elements of an interval set (`allowed`, `allowed6`) to add or remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntervalChange {
    pub set: &'static str,
    pub elements: Vec<Element>,
    pub adding: bool,
}

/// One scope map element: (kind, host ifindex) and the org or space GUID.
pub type ScopeEntry = ((ScopeKind, u32), Arc<str>);

/// What one table needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableAction {
    /// The kernel already matches.
    Nothing,
    /// Only the elements of the per-container sets differ: the exempt sets (IPv4 and IPv6)
    /// and the containers' IPv6 addresses.
    Elements {
        add: Vec<ExemptKey>,
        remove: Vec<ExemptKey>,
        add6: Vec<Exempt6Key>,
        remove6: Vec<Exempt6Key>,
        add_containers6: Vec<Ipv6Addr>,
        remove_containers6: Vec<Ipv6Addr>,
        /// Scope map elements: added (or given a new chain: removed, then added).
        add_scopes: Vec<ScopeEntry>,
        remove_scopes: Vec<ScopeEntry>,
    },
    /// Replace the chains and rules in place, keeping the table, its sets, its counters and
    /// every element that the old and the new rules share (a configuration change: rules,
    /// allowed networks, mode, DNS limits). Recreating the table instead would delete its
    /// sets under packets still walking the old rules: a lookup made after the commit sees
    /// the old set's elements gone, and a packet both configurations allow is rejected (seen
    /// in the SIGHUP root test, once in a few switches).
    Restructure {
        /// The chains the table holds now: all are flushed, those the new rules lack deleted.
        chains: Vec<ChainSpec>,
        /// `allowed` and `allowed6` elements to remove and to add.
        intervals: Vec<IntervalChange>,
        /// The per-container element changes ([`TableAction::Elements`] or Nothing).
        elements: Box<TableAction>,
    },
    /// Recreate the table in the batch.
    Full(FullSyncReason),
    /// enabled = false and the table exists.
    Delete,
}

/// The actions of one pass, per table, applied as one batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncAction {
    pub tables: BTreeMap<AgentTable, TableAction>,
}

impl SyncAction {
    pub fn is_nothing(&self) -> bool {
        self.tables.values().all(|a| *a == TableAction::Nothing)
    }

    /// The action for `table` (Nothing when it is not managed).
    pub fn table(&self, table: AgentTable) -> &TableAction {
        self.tables.get(&table).unwrap_or(&TableAction::Nothing)
    }

    /// The strongest action of any table, for logs and metrics: "nothing", "elements",
    /// "full" or "delete".
    pub fn kind(&self) -> &'static str {
        let actions = || self.tables.values();
        if actions().any(|a| matches!(a, TableAction::Full(_))) {
            "full"
        } else if actions().any(|a| matches!(a, TableAction::Restructure { .. })) {
            "restructure"
        } else if actions().any(|a| *a == TableAction::Delete) {
            "delete"
        } else if actions().any(|a| matches!(a, TableAction::Elements { .. })) {
            "elements"
        } else {
            "nothing"
        }
    }

    /// Every element update turned into a full sync (after the kernel refused one).
    pub fn escalated(&self) -> SyncAction {
        SyncAction {
            tables: self
                .tables
                .iter()
                .map(|(table, action)| {
                    let action = match action {
                        TableAction::Elements { .. } | TableAction::Restructure { .. } => {
                            TableAction::Full(FullSyncReason::PartialSyncFailed)
                        }
                        other => other.clone(),
                    };
                    (*table, action)
                })
                .collect(),
        }
    }

    /// The one batch that carries out every table's action.
    pub fn batch(&self, desired: Option<&DesiredRules>) -> Batch {
        let mut batch = Batch::default();
        for (table, action) in &self.tables {
            match (action, desired) {
                (TableAction::Nothing, _) => {}
                (TableAction::Elements { .. }, _) => {
                    let (removals, additions) = element_ops(*table, action);
                    batch.ops.extend(removals);
                    batch.ops.extend(additions);
                }
                (
                    TableAction::Restructure {
                        chains,
                        intervals,
                        elements,
                    },
                    Some(rules),
                ) => push_restructure(&mut batch, *table, rules, chains, intervals, elements),
                (TableAction::Restructure { .. }, None) => {}
                (TableAction::Full(_), Some(rules)) => {
                    // `add table` (a no-op if it exists), `delete table`, then create: the
                    // idempotent "replace", atomic because the whole batch is.
                    batch.push(Op::AddTable {
                        table: *table,
                        flags: None,
                    });
                    batch.push(Op::DeleteTable(*table));
                    batch.ops.extend(create(*table, rules).ops);
                }
                (TableAction::Full(_), None) => {}
                (TableAction::Delete, _) => {
                    batch.push(Op::AddTable {
                        table: *table,
                        flags: None,
                    });
                    batch.push(Op::DeleteTable(*table));
                }
            }
        }
        batch
    }
}

/// The operations of an [`TableAction::Elements`] update, as (removals, additions): removals
/// go first in a batch, so that a failure aborts it before anything is added, the scope maps'
/// first among them (their elements hold chains), and a map element whose chain changes is
/// free to be added again. Nothing for any other action.
fn element_ops(table: AgentTable, action: &TableAction) -> (Vec<Op>, Vec<Op>) {
    let TableAction::Elements {
        add,
        remove,
        add6,
        remove6,
        add_containers6,
        remove_containers6,
        add_scopes,
        remove_scopes,
    } = action
    else {
        return (Vec::new(), Vec::new());
    };
    let scopes =
        |entries: &[ScopeEntry], kind| scope_elements_of(entries.iter().map(|(k, v)| (k, v)), kind);
    // Each set: (name, additions, removals), in the order additions are made.
    let per_set: [(&'static str, Vec<Element>, Vec<Element>); 5] = [
        (
            model::EXEMPT_SET,
            add.iter().map(model::exempt_element).collect(),
            remove.iter().map(model::exempt_element).collect(),
        ),
        (
            model::EXEMPT6_SET,
            add6.iter().map(model::exempt6_element).collect(),
            remove6.iter().map(model::exempt6_element).collect(),
        ),
        (
            model::CONTAINERS6_SET,
            add_containers6
                .iter()
                .map(model::container6_element)
                .collect(),
            remove_containers6
                .iter()
                .map(model::container6_element)
                .collect(),
        ),
        (
            model::SCOPE_ORG_MAP,
            scopes(add_scopes, ScopeKind::Org),
            scopes(remove_scopes, ScopeKind::Org),
        ),
        (
            model::SCOPE_SPACE_MAP,
            scopes(add_scopes, ScopeKind::Space),
            scopes(remove_scopes, ScopeKind::Space),
        ),
    ];
    let (mut map_removals, mut removals, mut additions) = (Vec::new(), Vec::new(), Vec::new());
    for (set, added, removed) in per_set {
        if !removed.is_empty() {
            let is_map = set == model::SCOPE_ORG_MAP || set == model::SCOPE_SPACE_MAP;
            let op = Op::DeleteElements {
                table,
                set,
                elements: removed,
            };
            if is_map {
                map_removals.push(op);
            } else {
                removals.push(op);
            }
        }
        if !added.is_empty() {
            additions.push(Op::AddElements {
                table,
                set,
                set_id: None,
                elements: added,
            });
        }
    }
    map_removals.extend(removals);
    (map_removals, additions)
}

/// A [`TableAction::Restructure`]: element removals (map elements first: they hold their
/// chains), every old chain flushed, the chains the new rules lack deleted, the new chains
/// added, every new rule added, then the element additions. One batch: packets see the old
/// rules or the new ones, and the sets both use keep the elements both have throughout.
fn push_restructure(
    batch: &mut Batch,
    table: AgentTable,
    rules: &DesiredRules,
    chains: &[ChainSpec],
    intervals: &[IntervalChange],
    elements: &TableAction,
) {
    let (element_removals, element_additions) = element_ops(table, elements);
    batch.ops.extend(element_removals);
    for change in intervals.iter().filter(|c| !c.adding) {
        batch.push(Op::DeleteElements {
            table,
            set: change.set,
            elements: change.elements.clone(),
        });
    }
    let new_chains = table_chains(rules);
    for chain in chains {
        batch.push(Op::FlushChain {
            table,
            chain: chain.name.clone(),
        });
    }
    for chain in chains {
        if !new_chains.iter().any(|c| c.name == chain.name) {
            batch.push(Op::DeleteChain {
                table,
                chain: chain.name.clone(),
            });
        }
    }
    for chain in new_chains {
        if !chains.iter().any(|c| c.name == chain.name) {
            batch.push(Op::AddChain { table, chain });
        }
    }
    for rule in table_rules(table, rules) {
        batch.push(Op::AddRule { table, rule });
    }
    for change in intervals.iter().filter(|c| c.adding) {
        batch.push(Op::AddElements {
            table,
            set: change.set,
            set_id: None,
            elements: change.elements.clone(),
        });
    }
    batch.ops.extend(element_additions);
}

/// Every chain of a table holding `rules`, in creation order.
fn table_chains(rules: &DesiredRules) -> Vec<ChainSpec> {
    let mut chains = model::chains().to_vec();
    chains.extend(model::rule_chains(&rules.rule_set));
    if rules.dns.is_some() {
        chains.extend(model::dns_chains());
    }
    chains
}

/// Every rule of `table` holding `rules`, in order.
fn table_rules(table: AgentTable, rules: &DesiredRules) -> Vec<RuleSpec> {
    let mut out = model::rules_with(table, rules.overlay, rules.mode, &rules.rule_set);
    if let Some(dns) = &rules.dns {
        out.extend(model::dns_rules(rules.overlay, dns));
    }
    out
}

/// Batch-local ids of a table's sets (distinct across both tables of one batch).
fn set_id(table: AgentTable, index: u32) -> u32 {
    let per_table = model::sets().len() as u32;
    match table {
        AgentTable::Persistent => 1 + index,
        AgentTable::Owned | AgentTable::Probe => 1 + per_table + index,
    }
}

/// The operations that create `table` holding `rules`, in nft's order: table, counters, sets,
/// chains, rules, elements.
pub fn create(table: AgentTable, rules: &DesiredRules) -> Batch {
    let mut batch = Batch::default();
    batch.push(Op::AddTable {
        table,
        flags: Some(table.flags()),
    });
    for name in model::counters() {
        batch.push(Op::AddCounter { table, name });
    }
    for (index, set) in model::sets().into_iter().enumerate() {
        let id = set_id(table, index as u32);
        batch.push(Op::AddSet { table, set, id });
    }
    for chain in table_chains(rules) {
        batch.push(Op::AddChain { table, chain });
    }
    for rule in table_rules(table, rules) {
        batch.push(Op::AddRule { table, rule });
    }
    let elements = [
        (model::ALLOWED_SET, model::interval_elements(&rules.allowed)),
        (
            model::EXEMPT_SET,
            rules.exempt.iter().map(model::exempt_element).collect(),
        ),
        (
            model::ALLOWED6_SET,
            model::interval_elements6(&rules.allowed6),
        ),
        (
            model::EXEMPT6_SET,
            rules.exempt6.iter().map(model::exempt6_element).collect(),
        ),
        (
            model::CONTAINERS6_SET,
            rules
                .containers6
                .iter()
                .map(model::container6_element)
                .collect(),
        ),
        (
            model::SCOPE_ORG_MAP,
            scope_elements_of(rules.scopes.iter(), ScopeKind::Org),
        ),
        (
            model::SCOPE_SPACE_MAP,
            scope_elements_of(rules.scopes.iter(), ScopeKind::Space),
        ),
    ];
    for (set, elements) in elements {
        if elements.is_empty() {
            continue;
        }
        let index = model::sets()
            .iter()
            .position(|s| s.name == set)
            .unwrap_or(0) as u32;
        batch.push(Op::AddElements {
            table,
            set,
            set_id: Some(set_id(table, index)),
            elements,
        });
    }
    batch
}

/// The elements of `kind`'s scope map among `entries`.
fn scope_elements_of<'a>(
    entries: impl Iterator<Item = (&'a (ScopeKind, u32), &'a Arc<str>)>,
    kind: ScopeKind,
) -> Vec<Element> {
    entries
        .filter(|((k, _), _)| *k == kind)
        .map(|((k, ifindex), id)| model::scope_element(*k, *ifindex, id))
        .collect()
}

/// Chooses, for every table in `managed`, the action that makes `observed` match `desired`
/// (None: enforcement disabled). `own_port` is the agent's netlink port id, the only owner
/// the owned table may have.
pub fn choose(
    desired: Option<&DesiredRules>,
    managed: &[AgentTable],
    observed: &BTreeMap<AgentTable, ObservedTable>,
    own_port: u32,
) -> SyncAction {
    let mut tables = BTreeMap::new();
    for table in managed {
        let seen = observed.get(table);
        let action = match desired {
            None => match seen {
                // An owned table of another socket cannot be deleted; it goes with its owner.
                Some(o) if *table == AgentTable::Owned && o.owner != Some(own_port) => {
                    TableAction::Nothing
                }
                Some(_) => TableAction::Delete,
                None => TableAction::Nothing,
            },
            Some(rules) => choose_table(*table, rules, seen, own_port),
        };
        tables.insert(*table, action);
    }
    SyncAction { tables }
}

fn choose_table(
    table: AgentTable,
    rules: &DesiredRules,
    observed: Option<&ObservedTable>,
    own_port: u32,
) -> TableAction {
    let Some(observed) = observed else {
        return TableAction::Full(FullSyncReason::TableMissing);
    };
    if table == AgentTable::Owned && observed.owner != Some(own_port) {
        return TableAction::Full(FullSyncReason::NotOurs);
    }
    let mut expected = model::shape(table, rules);
    normalise(&mut expected);
    if observed.shape != expected {
        if let Some(difference) = observed.shape.first_difference(&expected) {
            tracing::debug!(table = table.name(), %difference, "table differs (kernel vs desired)");
        }
        return restructure(rules, observed, &expected)
            .unwrap_or(TableAction::Full(FullSyncReason::StructureDiffers));
    }
    let (Some(exempt), Some(exempt6), Some(containers6), Some(scopes)) = (
        &observed.exempt,
        &observed.exempt6,
        &observed.containers6,
        &observed.scopes,
    ) else {
        return TableAction::Full(FullSyncReason::ElementsUnreadable);
    };
    element_action(
        rules,
        &PresentElements {
            exempt,
            exempt6,
            containers6,
            scopes,
        },
    )
}

/// The in-place change from `observed` to `expected` when only chains, rules and the
/// `allowed` elements differ: the same counters and the same sets (ignoring elements), no
/// object the listing did not name, chains of both with the same hooks, and readable
/// elements. None: recreate the table.
fn restructure(
    rules: &DesiredRules,
    observed: &ObservedTable,
    expected: &model::Shape,
) -> Option<TableAction> {
    let seen = &observed.shape;
    let listed = (seen.chains.len() + seen.sets.len() + seen.counters.len()) as u32;
    if seen.flags != expected.flags || seen.counters != expected.counters || seen.objects != listed
    {
        return None;
    }
    let same_kind = |a: &model::SetShape, b: &model::SetShape| {
        (
            a.name.as_str(),
            a.key_type,
            a.key_len,
            a.flags,
            a.bounds,
            a.verdict_map,
        ) == (
            b.name.as_str(),
            b.key_type,
            b.key_len,
            b.flags,
            b.bounds,
            b.verdict_map,
        )
    };
    if seen.sets.len() != expected.sets.len()
        || seen
            .sets
            .iter()
            .zip(&expected.sets)
            .any(|(a, b)| !same_kind(a, b))
    {
        return None;
    }
    let clash = seen.chains.iter().any(|old| {
        expected
            .chains
            .iter()
            .any(|new| new.name == old.name && new.hook != old.hook)
    });
    if clash {
        return None;
    }
    let mut intervals = Vec::new();
    for (old, new) in seen.sets.iter().zip(&expected.sets) {
        let (Some(present), Some(wanted)) = (&old.elements, &new.elements) else {
            continue;
        };
        let set = match old.name.as_str() {
            model::ALLOWED_SET => model::ALLOWED_SET,
            model::ALLOWED6_SET => model::ALLOWED6_SET,
            _ => return None,
        };
        let remove: Vec<Element> = present.difference(wanted).cloned().collect();
        let add: Vec<Element> = wanted.difference(present).cloned().collect();
        for (elements, adding) in [(remove, false), (add, true)] {
            if !elements.is_empty() {
                intervals.push(IntervalChange {
                    set,
                    elements,
                    adding,
                });
            }
        }
    }
    let (Some(exempt), Some(exempt6), Some(containers6), Some(scopes)) = (
        &observed.exempt,
        &observed.exempt6,
        &observed.containers6,
        &observed.scopes,
    ) else {
        return None;
    };
    let elements = element_action(
        rules,
        &PresentElements {
            exempt,
            exempt6,
            containers6,
            scopes,
        },
    );
    Some(TableAction::Restructure {
        chains: seen.chains.clone(),
        intervals,
        elements: Box::new(elements),
    })
}

/// The elements a table holds in its per-container sets.
struct PresentElements<'a> {
    exempt: &'a BTreeSet<ExemptKey>,
    exempt6: &'a BTreeSet<Exempt6Key>,
    containers6: &'a BTreeSet<Ipv6Addr>,
    scopes: &'a ScopeElements,
}

impl<'a> PresentElements<'a> {
    fn of(rules: &'a DesiredRules) -> PresentElements<'a> {
        PresentElements {
            exempt: &rules.exempt,
            exempt6: &rules.exempt6,
            containers6: &rules.containers6,
            scopes: &rules.scopes,
        }
    }
}

/// Nothing, or the element update that turns `present` into the per-container sets of `rules`.
fn element_action(rules: &DesiredRules, present: &PresentElements<'_>) -> TableAction {
    let (add, remove) = difference(&rules.exempt, present.exempt);
    let (add6, remove6) = difference(&rules.exempt6, present.exempt6);
    let (add_containers6, remove_containers6) = difference(&rules.containers6, present.containers6);
    let (add_scopes, remove_scopes) = map_difference(&rules.scopes, present.scopes);
    let unchanged = add.is_empty()
        && remove.is_empty()
        && add6.is_empty()
        && remove6.is_empty()
        && add_containers6.is_empty()
        && remove_containers6.is_empty()
        && add_scopes.is_empty()
        && remove_scopes.is_empty();
    if unchanged {
        TableAction::Nothing
    } else {
        TableAction::Elements {
            add,
            remove,
            add6,
            remove6,
            add_containers6,
            remove_containers6,
            add_scopes,
            remove_scopes,
        }
    }
}

/// [`choose`] for tables that hold exactly `written` (nobody else has committed since the agent
/// wrote it; None: no tables). When the structure is the same, the action is the element
/// difference, computed once for every table without modelling them: the pass after a store
/// event does no work the size of the cell beyond one walk of the two sets.
pub fn choose_from_written(
    desired: Option<&DesiredRules>,
    written: Option<&DesiredRules>,
    managed: &[AgentTable],
    own_port: u32,
) -> SyncAction {
    match (desired, written) {
        (Some(desired), Some(written)) if same_structure(desired, written) => {
            let action = element_action(desired, &PresentElements::of(written));
            SyncAction {
                tables: managed.iter().map(|t| (*t, action.clone())).collect(),
            }
        }
        _ => {
            let tables = match written {
                Some(rules) => managed
                    .iter()
                    .map(|t| (*t, assume_written(*t, rules, own_port)))
                    .collect(),
                None => BTreeMap::new(),
            };
            choose(desired, managed, &tables, own_port)
        }
    }
}

/// Whether two rule sets give tables of the same shape: everything but the per-container
/// elements is equal. (Every field is named, so that a new one must be placed on one side or the other.)
fn same_structure(a: &DesiredRules, b: &DesiredRules) -> bool {
    let DesiredRules {
        overlay,
        allowed,
        exempt: _,
        allowed6,
        exempt6: _,
        containers6: _,
        mode,
        dns,
        rule_set,
        scopes: _,
    } = a;
    *overlay == b.overlay
        && *allowed == b.allowed
        && *allowed6 == b.allowed6
        && *mode == b.mode
        && *dns == b.dns
        && *rule_set == b.rule_set
}

/// (what to add, what to remove) to turn the map `present` into `desired`: a key whose value
/// changes is removed and added again (removals go first in the batch).
fn map_difference(
    desired: &ScopeElements,
    present: &ScopeElements,
) -> (Vec<ScopeEntry>, Vec<ScopeEntry>) {
    // The pass's rules and what was last written share the map until the planner changed it.
    if std::ptr::eq(desired, present) {
        return (Vec::new(), Vec::new());
    }
    // One merge walk of the two sorted maps (values are mostly the very same `Arc`s).
    let same = |a: &Arc<str>, b: &Arc<str>| Arc::ptr_eq(a, b) || a == b;
    let (mut add, mut remove) = (Vec::new(), Vec::new());
    let mut want = desired.iter().peekable();
    let mut have = present.iter().peekable();
    loop {
        match (want.peek(), have.peek()) {
            (Some((wk, wv)), Some((hk, hv))) => match wk.cmp(hk) {
                std::cmp::Ordering::Less => {
                    add.push((**wk, (*wv).clone()));
                    want.next();
                }
                std::cmp::Ordering::Greater => {
                    remove.push((**hk, (*hv).clone()));
                    have.next();
                }
                std::cmp::Ordering::Equal => {
                    if !same(wv, hv) {
                        add.push((**wk, (*wv).clone()));
                        remove.push((**hk, (*hv).clone()));
                    }
                    want.next();
                    have.next();
                }
            },
            (Some((wk, wv)), None) => {
                add.push((**wk, (*wv).clone()));
                want.next();
            }
            (None, Some((hk, hv))) => {
                remove.push((**hk, (*hv).clone()));
                have.next();
            }
            (None, None) => return (add, remove),
        }
    }
}

/// (what to add, what to remove) to turn `present` into `desired`.
fn difference<T: Ord + Copy>(desired: &BTreeSet<T>, present: &BTreeSet<T>) -> (Vec<T>, Vec<T>) {
    (
        desired.difference(present).copied().collect(),
        present.difference(desired).copied().collect(),
    )
}

/// The table as the agent last wrote it, standing in for a listing when nobody else has
/// committed a transaction since (counters unknown: zero).
pub fn assume_written(table: AgentTable, rules: &DesiredRules, own_port: u32) -> ObservedTable {
    let mut shape = model::shape(table, rules);
    normalise(&mut shape);
    ObservedTable {
        shape,
        owner: (table == AgentTable::Owned).then_some(own_port),
        exempt: Some(rules.exempt.clone()),
        exempt6: Some(rules.exempt6.clone()),
        containers6: Some(rules.containers6.clone()),
        scopes: Some((*rules.scopes).clone()),
        rejected: Default::default(),
        blocked: Default::default(),
        undecodable: Vec::new(),
    }
}

/// Whether the kernel holds exactly `expected` in every managed table (None: no tables).
pub fn matches(
    expected: Option<&DesiredRules>,
    managed: &[AgentTable],
    observed: &BTreeMap<AgentTable, ObservedTable>,
    own_port: u32,
) -> bool {
    choose(expected, managed, observed, own_port).is_nothing()
}

#[cfg(test)]
mod tests;
