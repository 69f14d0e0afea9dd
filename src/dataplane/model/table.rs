//! The objects of one agent table: its sets, chains and counters, and its shape for a rule set.

use std::collections::BTreeSet;

use super::AgentTable;
use super::{
    ALLOWED_SET, ALLOWED6_SET, CONTAINERS6_SET, COUNTER_BLOCKED, COUNTER_DNS_RATE_LIMITED,
    COUNTER_DNS6_DROPPED, COUNTER_LOGGED, COUNTER_OTHER, COUNTER_TCP, COUNTER6_OTHER, COUNTER6_TCP,
    DNS_BUDGET_SET, DNS_CHAIN, DNS_GUARD_CHAIN, EGRESS_CHAIN, EGRESS6_CHAIN, EXEMPT_SET,
    EXEMPT6_SET, FORWARD_CHAIN, FORWARD_PRIORITY, REPORT_BUDGET_SET, REPORT_BUDGET_SIZE,
    REPORT_BUDGET_TIMEOUT_MS,
    dns::{dns_chains, dns_rules},
    elements::{interval_elements, interval_elements6},
    learned::learned_map_spec,
    rules::rules_with,
    scoped::{rule_chains, scope_map_spec},
    spec::{ChainSpec, Element, Hook, SetBounds, SetShape, SetSpec, Shape},
    uapi::{
        CONCAT_TYPE_BITS, HOOK_FORWARD, NF_ACCEPT, SET_F_EVAL, SET_F_INTERVAL, SET_F_TIMEOUT,
        TYPE_IFINDEX, TYPE_IP6ADDR, TYPE_IPADDR, USERDATA_HOST_ORDER_KEY,
        USERDATA_IFINDEX_IPV4_KEY, USERDATA_IPV4_KEY,
    },
};
use crate::policy::{DesiredRules, RuleSet, ScopeKind};

/// The sets of a table, in creation order.
pub fn sets() -> [SetSpec; 11] {
    [
        SetSpec {
            name: ALLOWED_SET,
            key_type: TYPE_IPADDR,
            key_len: 4,
            flags: SET_F_INTERVAL,
            userdata: USERDATA_IPV4_KEY.to_vec(),
            bounds: None,
            verdict_map: false,
        },
        SetSpec {
            name: EXEMPT_SET,
            key_type: (TYPE_IFINDEX << CONCAT_TYPE_BITS) | TYPE_IPADDR,
            key_len: 8,
            flags: 0,
            userdata: USERDATA_IFINDEX_IPV4_KEY.to_vec(),
            bounds: None,
            verdict_map: false,
        },
        // nft writes the same userdata for the IPv6 key types as for the IPv4 ones.
        SetSpec {
            name: ALLOWED6_SET,
            key_type: TYPE_IP6ADDR,
            key_len: 16,
            flags: SET_F_INTERVAL,
            userdata: USERDATA_IPV4_KEY.to_vec(),
            bounds: None,
            verdict_map: false,
        },
        SetSpec {
            name: EXEMPT6_SET,
            key_type: (TYPE_IFINDEX << CONCAT_TYPE_BITS) | TYPE_IP6ADDR,
            key_len: 20,
            flags: 0,
            userdata: USERDATA_IFINDEX_IPV4_KEY.to_vec(),
            bounds: None,
            verdict_map: false,
        },
        SetSpec {
            name: CONTAINERS6_SET,
            key_type: TYPE_IP6ADDR,
            key_len: 16,
            flags: 0,
            userdata: USERDATA_IPV4_KEY.to_vec(),
            bounds: None,
            verdict_map: false,
        },
        per_container_budgets(REPORT_BUDGET_SET),
        // Present whether or not `[dns]` is enabled (unused then), like the counters.
        per_container_budgets(DNS_BUDGET_SET),
        // Present whether or not a rule is scoped (empty then).
        scope_map_spec(ScopeKind::Org),
        scope_map_spec(ScopeKind::Space),
        // Present whether or not a rule names a host (empty then).
        learned_map_spec(false),
        learned_map_spec(true),
    ]
}

/// A dynamic set of per-container token buckets keyed on the host interface (`type
/// iface_index; size 4096; flags dynamic,timeout; timeout 1m`).
pub fn per_container_budgets(name: &'static str) -> SetSpec {
    SetSpec {
        name,
        key_type: TYPE_IFINDEX,
        key_len: 4,
        flags: SET_F_TIMEOUT | SET_F_EVAL,
        userdata: USERDATA_HOST_ORDER_KEY.to_vec(),
        bounds: Some(SetBounds {
            size: REPORT_BUDGET_SIZE,
            timeout_ms: REPORT_BUDGET_TIMEOUT_MS,
        }),
        verdict_map: false,
    }
}

/// The names of the chains to read back one by one: the fixed ones and, for `rule_set`, the
/// chains of `[[rules]]`. The DNS chains are asked for whether or not DNS is enabled: absent,
/// they list nothing; present when they should not be, they are a difference like any other
/// (as is any other chain, through the table's use count).
pub fn chain_names(rule_set: &RuleSet) -> Vec<String> {
    let mut names: Vec<String> = [
        FORWARD_CHAIN,
        EGRESS_CHAIN,
        EGRESS6_CHAIN,
        DNS_CHAIN,
        DNS_GUARD_CHAIN,
    ]
    .map(String::from)
    .to_vec();
    names.extend(rule_chains(rule_set).into_iter().map(|c| c.name));
    names
}

/// The chains of a table, in creation order.
pub fn chains() -> [ChainSpec; 3] {
    [
        ChainSpec {
            name: FORWARD_CHAIN.into(),
            hook: Some(Hook {
                kind: "filter".into(),
                hooknum: HOOK_FORWARD,
                priority: FORWARD_PRIORITY,
                policy: NF_ACCEPT,
            }),
        },
        ChainSpec {
            name: EGRESS_CHAIN.into(),
            hook: None,
        },
        ChainSpec {
            name: EGRESS6_CHAIN.into(),
            hook: None,
        },
    ]
}

/// The named counters of a table, in creation order.
pub fn counters() -> [&'static str; 8] {
    [
        COUNTER_TCP,
        COUNTER_OTHER,
        COUNTER_BLOCKED,
        COUNTER_LOGGED,
        COUNTER6_TCP,
        COUNTER6_OTHER,
        COUNTER_DNS_RATE_LIMITED,
        COUNTER_DNS6_DROPPED,
    ]
}

/// The shape a table must have for `rules`.
pub fn shape(table: AgentTable, rules_: &DesiredRules) -> Shape {
    let allowed: BTreeSet<Element> = interval_elements(&rules_.allowed).into_iter().collect();
    let allowed6: BTreeSet<Element> = interval_elements6(&rules_.allowed6).into_iter().collect();
    let sets = sets();
    let counters = counters();
    let mut chains_ = chains().to_vec();
    chains_.extend(rule_chains(&rules_.rule_set));
    let mut rules = rules_with(table, rules_.overlay, rules_.mode, &rules_.rule_set);
    if let Some(dns) = &rules_.dns {
        chains_.extend(dns_chains());
        rules.extend(dns_rules(rules_.overlay, dns));
    }
    Shape {
        flags: table.flags(),
        objects: (chains_.len() + sets.len() + counters.len()) as u32,
        counters: counters.iter().map(|c| c.to_string()).collect(),
        sets: sets
            .into_iter()
            .map(|s| SetShape {
                name: s.name.into(),
                key_type: s.key_type,
                key_len: s.key_len,
                flags: s.flags,
                bounds: s.bounds,
                verdict_map: s.verdict_map,
                elements: match s.name {
                    ALLOWED_SET => Some(allowed.clone()),
                    ALLOWED6_SET => Some(allowed6.clone()),
                    _ => None,
                },
            })
            .collect(),
        chains: chains_,
        rules,
    }
}
