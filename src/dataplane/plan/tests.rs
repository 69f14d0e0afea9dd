use super::*;
use std::net::{Ipv4Addr, Ipv6Addr};

const PORT: u32 = 4242;
const BOTH: [AgentTable; 2] = AgentTable::ALL;

fn key(ifindex: u32, last: u8) -> ExemptKey {
    ExemptKey {
        ifindex,
        ip: Ipv4Addr::new(10, 255, 0, last),
    }
}

fn rules(exempt: &[ExemptKey]) -> DesiredRules {
    DesiredRules {
        mode: Default::default(),
        overlay: "10.255.0.0/16".parse().expect("literal"),
        allowed: vec!["10.0.0.0/8".parse().expect("literal")],
        exempt: exempt.iter().copied().collect(),
        allowed6: vec!["fd00::/8".parse().expect("literal")],
        exempt6: BTreeSet::new(),
        containers6: BTreeSet::new(),
        dns: None,
        rule_set: Default::default(),
        scopes: Default::default(),
    }
}

fn written_tables(rules: &DesiredRules) -> BTreeMap<AgentTable, ObservedTable> {
    BOTH.iter()
        .map(|t| (*t, assume_written(*t, rules, PORT)))
        .collect()
}

/// Rule sets that differ in elements, structure, or both, and no rules at all.
fn variants() -> Vec<Option<DesiredRules>> {
    let base = rules(&[key(3, 3), key(4, 4)]);
    let mut more = rules(&[key(3, 3), key(5, 5), key(6, 6)]);
    more.exempt6.insert(Exempt6Key {
        ifindex: 5,
        ip: "fd00::5".parse().expect("literal"),
    });
    more.containers6
        .extend(["fd00::5", "fd00::6"].map(|ip| ip.parse::<Ipv6Addr>().expect("literal")));
    let mut audit = base.clone();
    audit.mode = crate::config::Mode::Audit;
    let mut dns = more.clone();
    dns.dns = Some(crate::policy::DnsRules::on_port(5353));
    let mut allowed = base.clone();
    allowed
        .allowed
        .push("192.168.0.0/16".parse().expect("literal"));
    let mut allowed6 = base.clone();
    allowed6.allowed6.clear();
    let mut overlay = base.clone();
    overlay.overlay = "10.254.0.0/16".parse().expect("literal");
    let empty = rules(&[]);
    [base, more, audit, dns, allowed, allowed6, overlay, empty]
        .into_iter()
        .map(Some)
        .chain([None])
        .collect()
}

#[test]
fn choosing_from_what_was_written_is_choosing_against_its_model() {
    let variants = variants();
    for desired in &variants {
        for written in &variants {
            let modelled = match written {
                Some(w) => written_tables(w),
                None => BTreeMap::new(),
            };
            assert_eq!(
                choose_from_written(desired.as_ref(), written.as_ref(), &BOTH, PORT),
                choose(desired.as_ref(), &BOTH, &modelled, PORT),
                "desired {desired:?}\nwritten {written:?}"
            );
        }
    }
}

#[test]
fn identical_state_needs_nothing() {
    let desired = rules(&[key(3, 3)]);
    let action = choose(Some(&desired), &BOTH, &written_tables(&desired), PORT);
    assert!(action.is_nothing());
    assert_eq!(action.kind(), "nothing");
    assert!(action.batch(Some(&desired)).is_empty());
}

#[test]
fn element_changes_are_one_partial_sync_of_both_tables() {
    let desired = rules(&[key(3, 3), key(4, 4)]);
    let seen = written_tables(&rules(&[key(2, 2), key(3, 3)]));
    let action = choose(Some(&desired), &BOTH, &seen, PORT);
    for table in BOTH {
        assert_eq!(
            action.table(table),
            &TableAction::Elements {
                add: vec![key(4, 4)],
                remove: vec![key(2, 2)],
                add6: vec![],
                remove6: vec![],
                add_containers6: vec![],
                remove_containers6: vec![],
                add_scopes: vec![],
                remove_scopes: vec![],
            }
        );
    }
    let batch = action.batch(Some(&desired));
    // Deletes first, for each table: a failure aborts the batch and escalates.
    let kinds: Vec<&str> = batch
        .ops
        .iter()
        .map(|op| match op {
            Op::DeleteElements { .. } => "del",
            Op::AddElements { .. } => "add",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, vec!["del", "add", "del", "add"]);
    assert_eq!(action.escalated().kind(), "full");
}

#[test]
fn a_missing_owned_table_is_created_beside_an_adopted_one() {
    let desired = rules(&[key(3, 3)]);
    let mut seen = written_tables(&desired);
    seen.remove(&AgentTable::Owned);
    let action = choose(Some(&desired), &BOTH, &seen, PORT);
    assert_eq!(action.table(AgentTable::Persistent), &TableAction::Nothing);
    assert_eq!(
        action.table(AgentTable::Owned),
        &TableAction::Full(FullSyncReason::TableMissing)
    );
    let batch = action.batch(Some(&desired));
    assert!(batch.creates_owned_table());
    assert!(batch.ops.iter().all(|op| op.table() == AgentTable::Owned));
    assert!(!batch.ops.contains(&Op::DeleteTable(AgentTable::Persistent)));
}

#[test]
fn an_owned_table_of_another_socket_is_not_ours() {
    let desired = rules(&[]);
    let seen = written_tables(&desired);
    let action = choose(Some(&desired), &BOTH, &seen, PORT + 1);
    assert_eq!(
        action.table(AgentTable::Owned),
        &TableAction::Full(FullSyncReason::NotOurs)
    );
    // Disabled: it cannot be deleted either; it goes with its owner.
    let action = choose(None, &BOTH, &seen, PORT + 1);
    assert_eq!(action.table(AgentTable::Owned), &TableAction::Nothing);
    assert_eq!(action.table(AgentTable::Persistent), &TableAction::Delete);
}

#[test]
fn changed_rules_are_replaced_in_place_and_changed_sets_recreate_the_table() {
    let desired = rules(&[]);
    let mut seen = written_tables(&desired);
    if let Some(t) = seen.get_mut(&AgentTable::Persistent) {
        t.shape.rules.pop();
    }
    let action = choose(Some(&desired), &BOTH, &seen, PORT);
    assert!(matches!(
        action.table(AgentTable::Persistent),
        TableAction::Restructure { .. }
    ));
    assert_eq!(action.table(AgentTable::Owned), &TableAction::Nothing);

    // A set of another type (or an object the listing did not name) is not patched.
    let mut odd = written_tables(&desired);
    if let Some(t) = odd.get_mut(&AgentTable::Persistent) {
        t.shape.rules.pop();
        t.shape.sets[0].key_len = 16;
    }
    let action = choose(Some(&desired), &BOTH, &odd, PORT);
    assert_eq!(
        action.table(AgentTable::Persistent),
        &TableAction::Full(FullSyncReason::StructureDiffers)
    );
    let mut hidden = written_tables(&desired);
    if let Some(t) = hidden.get_mut(&AgentTable::Persistent) {
        t.shape.rules.pop();
        t.shape.objects += 1;
    }
    let action = choose(Some(&desired), &BOTH, &hidden, PORT);
    assert_eq!(action.kind(), "full");

    // Another allowed network: its elements are added where the others stay.
    let mut wider = rules(&[]);
    wider
        .allowed
        .push("172.16.0.0/12".parse().expect("literal"));
    let action = choose(Some(&wider), &BOTH, &written_tables(&desired), PORT);
    assert_eq!(action.kind(), "restructure");
    let TableAction::Restructure { intervals, .. } = action.table(AgentTable::Owned) else {
        panic!("{action:?}");
    };
    assert_eq!(intervals.len(), 1);
    assert!(intervals[0].adding && intervals[0].set == model::ALLOWED_SET);
    assert_eq!(
        intervals[0].elements,
        model::interval_elements(&["172.16.0.0/12".parse().expect("literal")])
            .into_iter()
            .filter(|e| !e.key.iter().all(|b| *b == 0))
            .collect::<Vec<_>>()
    );

    let mut unreadable = written_tables(&desired);
    for t in unreadable.values_mut() {
        t.exempt = None;
    }
    let action = choose(Some(&desired), &BOTH, &unreadable, PORT);
    assert_eq!(
        action.table(AgentTable::Owned),
        &TableAction::Full(FullSyncReason::ElementsUnreadable)
    );
}

/// A mode change replaces both tables' rules in place in one batch: no moment has neither
/// mode's rules (the batch is atomic), the tables, sets and counters stay, and every chain is
/// flushed before the new rules are added.
#[test]
fn a_mode_change_replaces_the_rules_of_both_tables_in_one_batch() {
    for (from, to) in [
        (crate::config::Mode::Audit, crate::config::Mode::Enforce),
        (crate::config::Mode::Enforce, crate::config::Mode::Audit),
    ] {
        let mut before = rules(&[key(3, 3)]);
        before.mode = from;
        let mut after = before.clone();
        after.mode = to;
        let action = choose(Some(&after), &BOTH, &written_tables(&before), PORT);
        for table in BOTH {
            assert!(
                matches!(action.table(table), TableAction::Restructure { .. }),
                "{from:?} -> {to:?}"
            );
        }
        let batch = action.batch(Some(&after));
        for table in BOTH {
            let ops: Vec<&Op> = batch.ops.iter().filter(|op| op.table() == table).collect();
            assert!(
                !ops.iter()
                    .any(|op| matches!(op, Op::DeleteTable(_) | Op::AddSet { .. }))
            );
            let flushed = ops
                .iter()
                .take_while(|op| matches!(op, Op::FlushChain { .. }))
                .count();
            assert_eq!(flushed, 3, "every chain flushed first: {ops:?}");
            assert!(
                ops[flushed..]
                    .iter()
                    .all(|op| matches!(op, Op::AddRule { .. }))
            );
            let rejects = ops
                .iter()
                .filter(|op| {
                    matches!(op, Op::AddRule { rule, .. }
                        if rule.exprs.iter().any(|e| matches!(e, model::Expr::Reject { .. })))
                })
                .count();
            assert_eq!(
                rejects,
                if to == crate::config::Mode::Enforce {
                    4
                } else {
                    0
                }
            );
        }
        // Written as the new mode, nothing more to do.
        assert!(choose(Some(&after), &BOTH, &written_tables(&after), PORT).is_nothing());
    }
}

#[test]
fn only_managed_tables_are_touched() {
    let desired = rules(&[]);
    let action = choose(
        Some(&desired),
        &[AgentTable::Persistent],
        &BTreeMap::new(),
        PORT,
    );
    assert_eq!(action.tables.len(), 1);
    assert!(!action.batch(Some(&desired)).creates_owned_table());
}

#[test]
fn disabled_deletes_existing_tables_only() {
    let seen = written_tables(&rules(&[]));
    let action = choose(None, &BOTH, &seen, PORT);
    assert_eq!(action.kind(), "delete");
    assert!(choose(None, &BOTH, &BTreeMap::new(), PORT).is_nothing());
    assert!(matches(None, &BOTH, &BTreeMap::new(), PORT));
}

/// A container's IPv6 address coming or going is an element update of `containers6` in both
/// tables, deletes before adds, not a rebuild.
#[test]
fn container_addresses_are_element_updates() {
    let v6 = |s: &str| -> Ipv6Addr { s.parse().expect("literal") };
    let mut before = rules(&[key(3, 3)]);
    before.containers6 = BTreeSet::from([v6("fd00::1"), v6("fd00::2")]);
    let mut after = before.clone();
    after.containers6 = BTreeSet::from([v6("fd00::2"), v6("fd00::3")]);
    let action = choose(Some(&after), &BOTH, &written_tables(&before), PORT);
    for table in BOTH {
        assert_eq!(
            action.table(table),
            &TableAction::Elements {
                add: vec![],
                remove: vec![],
                add6: vec![],
                remove6: vec![],
                add_containers6: vec![v6("fd00::3")],
                remove_containers6: vec![v6("fd00::1")],
                add_scopes: vec![],
                remove_scopes: vec![],
            }
        );
    }
    let ops: Vec<(bool, &str)> = action
        .batch(Some(&after))
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::DeleteElements { set, .. } => Some((false, *set)),
            Op::AddElements { set, .. } => Some((true, *set)),
            _ => None,
        })
        .collect();
    let per_table = [
        (false, model::CONTAINERS6_SET),
        (true, model::CONTAINERS6_SET),
    ];
    assert_eq!(ops, [per_table, per_table].concat());
    assert_eq!(
        choose_from_written(Some(&after), Some(&before), &BOTH, PORT),
        action,
        "the same update without a listing"
    );
}

/// Scope map elements are element updates: a container coming, going or changing org is one
/// element in each map (a changed chain is removed, then added again), removals first.
#[test]
fn scope_elements_are_element_updates() {
    use crate::policy::ScopeKind::{Org, Space};
    use std::sync::Arc;
    let mut before = rules(&[]);
    before.scopes = Arc::new(
        [
            ((Org, 10), Arc::from("org-1")),
            ((Org, 11), Arc::from("org-1")),
            ((Space, 10), Arc::from("space-1")),
        ]
        .into_iter()
        .collect(),
    );
    let mut after = before.clone();
    {
        let map = Arc::make_mut(&mut after.scopes);
        map.insert((Org, 10), Arc::from("org-2"));
        map.remove(&(Org, 11));
        map.insert((Space, 12), Arc::from("space-1"));
    }
    let action = choose(Some(&after), &BOTH, &written_tables(&before), PORT);
    for table in BOTH {
        let TableAction::Elements {
            add_scopes,
            remove_scopes,
            ..
        } = action.table(table)
        else {
            panic!("{action:?}");
        };
        assert_eq!(
            add_scopes,
            &vec![
                ((Org, 10), Arc::from("org-2")),
                ((Space, 12), Arc::from("space-1"))
            ]
        );
        assert_eq!(
            remove_scopes,
            &vec![
                ((Org, 10), Arc::from("org-1")),
                ((Org, 11), Arc::from("org-1"))
            ]
        );
    }
    let batch = action.batch(Some(&after));
    let first_add = batch
        .ops
        .iter()
        .position(|op| matches!(op, Op::AddElements { .. }))
        .expect("additions");
    assert!(
        batch.ops[..first_add]
            .iter()
            .all(|op| matches!(op, Op::DeleteElements { .. })),
        "removals first: {:?}",
        batch.ops
    );
    // The same map on both sides (shared, unchanged): nothing to do.
    let same = choose_from_written(Some(&before), Some(&before.clone()), &BOTH, PORT);
    assert!(same.is_nothing());
}
