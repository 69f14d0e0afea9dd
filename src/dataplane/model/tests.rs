use super::exprs::match_prefix;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::*;
use crate::config::Mode;
use crate::policy::{DesiredRules, ExemptKey};

fn nets(list: &[&str]) -> Vec<Ipv4Net> {
    list.iter().map(|n| n.parse().expect("literal")).collect()
}

fn keys(elements: &[Element]) -> Vec<(String, bool)> {
    elements
        .iter()
        .map(|e| (hex(&e.key), e.interval_end))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn intervals_are_written_as_nft_writes_them() {
    // What nft 1.0.6 sent for `elements = { 10.0.0.0/8, 172.16.5.0/24 }`.
    let elements = interval_elements(&nets(&["172.16.5.0/24", "10.0.0.0/8"]));
    assert_eq!(
        keys(&elements),
        vec![
            ("00000000".into(), true),
            ("0a000000".into(), false),
            ("0b000000".into(), true),
            ("ac100500".into(), false),
            ("ac100600".into(), true),
        ]
    );
}

#[test]
fn touching_ranges_keep_their_bounds_and_the_top_has_no_end() {
    // nft sent 0.0.0.0 end, 11.0.0.0, 12.0.0.0 end, 12.0.0.0, 13.0.0.0 end for
    // `{ 11.0.0.0/8, 12.0.0.0/8 }`.
    let elements = interval_elements(&nets(&["11.0.0.0/8", "12.0.0.0/8", "128.0.0.0/1"]));
    assert_eq!(
        keys(&elements),
        vec![
            ("00000000".into(), true),
            ("0b000000".into(), false),
            ("0c000000".into(), true),
            ("0c000000".into(), false),
            ("0d000000".into(), true),
            ("80000000".into(), false),
        ]
    );
    let from_zero = interval_elements(&nets(&["0.0.0.0/8"]));
    assert_eq!(
        keys(&from_zero),
        vec![("00000000".into(), false), ("01000000".into(), true)]
    );
}

#[test]
fn prefixes_compile_as_nft_compiles_them() {
    // Byte aligned: load only the prefix's bytes.
    let aligned = match_prefix(12, "10.255.0.0/16".parse().expect("literal"));
    assert_eq!(
        aligned,
        vec![
            Expr::Payload {
                base: 1,
                offset: 12,
                len: 2,
                dreg: 1
            },
            Expr::Cmp {
                sreg: 1,
                op: 0,
                data: vec![10, 255]
            },
        ]
    );
    // Not aligned: the whole address, masked.
    let masked = match_prefix(12, "10.240.0.0/12".parse().expect("literal"));
    assert_eq!(
        masked[1],
        Expr::Bitwise {
            sreg: 1,
            dreg: 1,
            mask: vec![255, 240, 0, 0],
            xor: vec![0; 4],
            explicit_op: false,
        }
    );
    // A host: the whole address, no mask.
    let host = match_prefix(12, "10.255.1.1/32".parse().expect("literal"));
    assert_eq!(host.len(), 2);
}

#[test]
fn exempt_elements_round_trip() {
    let key = ExemptKey {
        ifindex: 12,
        ip: Ipv4Addr::new(10, 255, 1, 4),
    };
    let element = exempt_element(&key);
    assert_eq!(element.key.len(), 8);
    assert_eq!(exempt_key(&element), Some(key));
    assert_eq!(
        exempt_key(&Element {
            key: vec![1, 2, 3],
            interval_end: false,
            jump: None,
        }),
        None
    );
}

#[test]
fn chain_names_name_every_chain() {
    let mut names: Vec<String> = chains().iter().map(|c| c.name.clone()).collect();
    names.extend(dns_chains().iter().map(|c| c.name.clone()));
    assert_eq!(names, chain_names(&Default::default()));
}

#[test]
fn tables_differ_only_in_name_flags_and_log_prefix() {
    let rules_ = DesiredRules {
        allowed6: Vec::new(),
        exempt6: Default::default(),
        containers6: Default::default(),
        overlay: "10.255.0.0/16".parse().expect("literal"),
        allowed: nets(&["10.0.0.0/8"]),
        exempt: BTreeSet::new(),
        mode: Mode::Enforce,
        dns: None,
        rule_set: Default::default(),
        scopes: Default::default(),
    };
    let persistent = shape(AgentTable::Persistent, &rules_);
    let mut owned = shape(AgentTable::Owned, &rules_);
    assert_eq!(owned.flags, TABLE_F_OWNER);
    owned.flags = 0;
    for rule in &mut owned.rules {
        for expr in &mut rule.exprs {
            if let Expr::Log { prefix, .. } = expr {
                assert_eq!(prefix, "egress_guard_owned");
                *prefix = "egress_guard".into();
            }
        }
    }
    assert_eq!(persistent, owned);
    assert_eq!(
        AgentTable::from_name("egress_guard_owned"),
        Some(AgentTable::Owned)
    );
    assert_eq!(AgentTable::from_name("filter"), None);
}

#[test]
fn audit_reports_what_enforce_rejects_and_adds_no_verdict() {
    let overlay = "10.255.0.0/16".parse().expect("literal");
    let enforce = rules(AgentTable::Persistent, overlay, Mode::Enforce);
    let audit = rules(AgentTable::Persistent, overlay, Mode::Audit);
    // The same classification, chain by chain: audit's rules are enforce's up to and
    // including the report rule, which ends each egress chain in audit.
    for chain in [EGRESS_CHAIN, EGRESS6_CHAIN, FORWARD_CHAIN] {
        let of = |rs: &[RuleSpec]| -> Vec<RuleSpec> {
            rs.iter().filter(|r| r.chain == chain).cloned().collect()
        };
        let (audit_chain, enforce_chain) = (of(&audit), of(&enforce));
        assert_eq!(
            audit_chain.as_slice(),
            &enforce_chain[..audit_chain.len()],
            "{chain}"
        );
        if chain != FORWARD_CHAIN {
            assert_eq!(
                audit_chain.last().map(|r| &r.exprs),
                Some(&report(AgentTable::Persistent)),
                "{chain}"
            );
        }
    }
    // Enforce rejects after the report (IPv4 and IPv6); audit never rejects.
    let rejects = |rs: &[RuleSpec]| {
        rs.iter()
            .flat_map(|r| &r.exprs)
            .filter(|e| matches!(e, Expr::Reject { .. }))
            .count()
    };
    assert_eq!(rejects(&enforce), 4);
    assert_eq!(rejects(&audit), 0);
    // The container's own budget, then the cell-wide limit, come between the two counters,
    // the log after them.
    let report = report(AgentTable::Owned);
    assert!(matches!(&report[0], Expr::CounterRef(c) if c == COUNTER_BLOCKED));
    assert!(matches!(report[1], Expr::Meta { key: META_IIF, .. }));
    assert!(matches!(
        &report[2],
        Expr::Dynset { set, limit, .. } if set == REPORT_BUDGET_SET
            && matches!(**limit, Expr::Limit { rate: REPORT_RATE_PER_CONTAINER, .. })
    ));
    assert!(matches!(
        report[3],
        Expr::Limit {
            rate: LOG_RATE_PER_SECOND,
            ..
        }
    ));
    assert!(matches!(&report[4], Expr::CounterRef(c) if c == COUNTER_LOGGED));
    assert!(
        matches!(&report[5], Expr::Log { group: NFLOG_GROUP, prefix } if prefix == "egress_guard_owned")
    );
}
