//! `[[rules]]` in the kernel: a chain of `accept` rules for the unscoped rules (`rules_all`),
//! and one per org and per space a rule names (`org_<guid>`, `space_<guid>`). The egress
//! chains jump to `rules_all`, then look the packet's input interface up in two verdict maps
//! (`iif vmap @scope_org`, `iif vmap @scope_space`) that send a container's packets to the
//! chains of its org and its space. A container coming or going changes one element in each
//! map; the chains change only with the configuration.
//!
//! `accept` ends the agent's base chain with no objection, as `return` from `overlay_egress`
//! does (the packet then meets the other table and the iptables filter table); a packet no
//! rule matches falls back into the egress chain and meets the report and reject rules.

use std::net::IpAddr;

use ipnet::IpNet;

use super::exprs::{
    IPV4_DADDR_OFFSET, IPV6_DADDR_OFFSET, between, dport_between, l4proto_is, match_prefix_bytes,
    nfproto, port_alternatives, return_or_accept,
};
use super::spec::{ChainSpec, Element, Expr, RuleSpec, SetSpec};
use super::uapi::{
    META_IIF, NF_ACCEPT, NFPROTO_IPV4, NFPROTO_IPV6, NFT_JUMP, PAYLOAD_NETWORK, REG_1, SET_F_MAP,
    TYPE_IFINDEX, USERDATA_VERDICT_MAP,
};
use crate::config::{Destination, EgressRule, Protocol};
use crate::policy::{RuleSet, ScopeKind};

/// The chain of the rules that apply to every restricted container.
pub const UNSCOPED_CHAIN: &str = "rules_all";
/// Host interface -> `jump org_<guid>`.
pub const SCOPE_ORG_MAP: &str = "scope_org";
/// Host interface -> `jump space_<guid>`.
pub const SCOPE_SPACE_MAP: &str = "scope_space";

/// The verdict map of `kind`.
pub fn scope_map(kind: ScopeKind) -> &'static str {
    match kind {
        ScopeKind::Org => SCOPE_ORG_MAP,
        ScopeKind::Space => SCOPE_SPACE_MAP,
    }
}

/// The kind a map name stands for.
pub fn scope_kind_of_map(name: &str) -> Option<ScopeKind> {
    ScopeKind::ALL.into_iter().find(|k| scope_map(*k) == name)
}

/// The chain of an org's (or space's) rules: `org_<guid>`.
pub fn scope_chain(kind: ScopeKind, id: &str) -> String {
    format!("{}_{id}", kind.as_str())
}

/// The GUID a scope chain stands for, if `chain` is one of `kind`'s.
pub fn scope_of_chain(kind: ScopeKind, chain: &str) -> Option<&str> {
    chain
        .strip_prefix(kind.as_str())
        .and_then(|rest| rest.strip_prefix('_'))
}

/// `map scope_org { type iface_index : verdict; }` (and `scope_space`).
pub fn scope_map_spec(kind: ScopeKind) -> SetSpec {
    SetSpec {
        name: scope_map(kind),
        key_type: TYPE_IFINDEX,
        key_len: 4,
        flags: SET_F_MAP,
        userdata: USERDATA_VERDICT_MAP.to_vec(),
        bounds: None,
        verdict_map: true,
    }
}

/// A scope map element: the interface index (host order) -> `jump <chain>`.
pub fn scope_element(kind: ScopeKind, ifindex: u32, id: &str) -> Element {
    Element {
        key: ifindex.to_ne_bytes().to_vec(),
        interval_end: false,
        jump: Some(scope_chain(kind, id)),
    }
}

/// The inverse of [`scope_element`].
pub fn scope_of_element(kind: ScopeKind, element: &Element) -> Option<(u32, String)> {
    let key: [u8; 4] = element.key.as_slice().try_into().ok()?;
    let id = scope_of_chain(kind, element.jump.as_deref()?)?;
    Some((u32::from_ne_bytes(key), id.to_string()))
}

/// The chains `[[rules]]` need, in creation order: unscoped, then orgs, then spaces.
pub fn rule_chains(rule_set: &RuleSet) -> Vec<ChainSpec> {
    chains_of_rules(rule_set)
        .into_iter()
        .map(|(name, _)| ChainSpec { name, hook: None })
        .collect()
}

/// Each `[[rules]]` chain, in creation order, with the indices of the rules it holds in the
/// order written: `rules_all` (when a rule is unscoped), then a chain per org and per space.
pub fn chains_of_rules(rule_set: &RuleSet) -> Vec<(String, Vec<usize>)> {
    let mut chains = Vec::new();
    let unscoped = rule_set.unscoped();
    if !unscoped.is_empty() {
        chains.push((UNSCOPED_CHAIN.to_string(), unscoped));
    }
    for kind in ScopeKind::ALL {
        for (id, indices) in rule_set.scopes(kind) {
            chains.push((scope_chain(kind, id), indices));
        }
    }
    for (index, mark) in rule_set.host_marks() {
        chains.push((super::learned::host_chain(*mark), vec![*index]));
    }
    chains
}

/// The rules of [`rule_chains`]: each chain's rules in the order written.
pub fn rule_chain_rules(rule_set: &RuleSet) -> Vec<RuleSpec> {
    let mut out = Vec::new();
    for (chain, indices) in chains_of_rules(rule_set) {
        for index in indices {
            let lines = match rule_set.host_marks().iter().find(|(i, _)| *i == index) {
                Some((_, mark)) => super::learned::host_rule_lines(&rule_set.rules[index], *mark),
                None => rule_lines(&rule_set.rules[index]),
            };
            for exprs in lines {
                out.push(RuleSpec {
                    chain: chain.clone(),
                    exprs,
                });
            }
        }
    }
    out
}

/// What the egress chain of one family does with `[[rules]]`, after its allowed
/// destinations: the established connections of hostname rules, `jump rules_all`, `iif vmap
/// @scope_org`, `iif vmap @scope_space`, then the learned addresses (each only when a rule
/// needs it).
pub fn egress_rule_hooks(rule_set: &RuleSet, ipv6: bool) -> Vec<Vec<Expr>> {
    let (established, learned) = super::learned::hostname_hooks(rule_set.host_marks(), ipv6);
    let mut out = established;
    if !rule_set.unscoped().is_empty() {
        out.push(vec![Expr::Verdict {
            code: NFT_JUMP,
            chain: Some(UNSCOPED_CHAIN.into()),
        }]);
    }
    for kind in ScopeKind::ALL {
        if !rule_set.scopes(kind).is_empty() {
            out.push(vec![
                Expr::Meta {
                    key: META_IIF,
                    dreg: REG_1,
                },
                Expr::VerdictMap {
                    sreg: REG_1,
                    set: scope_map(kind).into(),
                },
            ]);
        }
    }
    out.extend(learned);
    out
}

/// One rule as kernel rules: one per port range (or one for every port), each
/// `ip daddr <destination> [meta l4proto <p>] [th dport <ports>] accept`, as nft compiles
/// `ip daddr … tcp dport … accept`.
pub fn rule_lines(rule: &EgressRule) -> Vec<Vec<Expr>> {
    let ipv6 = rule.destination.is_ipv6();
    let mut head = nfproto(if ipv6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 });
    head.extend(destination_match(&rule.destination));
    if rule.protocol != Protocol::All {
        head.extend(l4proto_is(rule.protocol.number(ipv6)));
    }
    port_alternatives(&rule.ports)
        .into_iter()
        .map(|range| {
            let mut exprs = head.clone();
            if let Some((first, last)) = range {
                exprs.extend(dport_between(first, last));
            }
            exprs.push(return_or_accept(NF_ACCEPT as i32));
            exprs
        })
        .collect()
}

/// `ip daddr <net>` or `ip daddr <first>-<last>` (IPv6 alike).
fn destination_match(destination: &Destination) -> Vec<Expr> {
    let offset = if destination.is_ipv6() {
        IPV6_DADDR_OFFSET
    } else {
        IPV4_DADDR_OFFSET
    };
    match destination {
        Destination::Network(net) => {
            let (address, width) = match net {
                IpNet::V4(n) => (n.network().octets().to_vec(), 4),
                IpNet::V6(n) => (n.network().octets().to_vec(), 16),
            };
            match_prefix_bytes(offset, &address, net.prefix_len(), width)
        }
        // Hostname rules live in their own chains (see `super::learned`).
        Destination::Hostname(_) => Vec::new(),
        Destination::Range(first, last) => {
            let bytes = |ip: &IpAddr| match ip {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            let mut exprs = vec![Expr::Payload {
                base: PAYLOAD_NETWORK,
                offset,
                len: bytes(first).len() as u32,
                dreg: REG_1,
            }];
            exprs.extend(between(bytes(first), bytes(last)));
            exprs
        }
    }
}
