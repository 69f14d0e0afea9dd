//! Rendering: desired rules -> nftables JSON commands (pure, no I/O).
//!
//! The agent owns exactly one table and never touches anyone else's:
//!
//! ```text
//! table inet egress_guard
//!   chain forward          hook forward, priority filter - 10, policy accept
//!     ip saddr <overlay> jump overlay_egress
//!   chain overlay_egress
//!     iif . ip saddr @exempt return            # staging: (host ifindex, IP) pairs
//!     ip daddr { <allowed>, <overlay> } return # VPC, peered ranges, container-to-container
//!     meta l4proto tcp counter name rejected_tcp reject with tcp reset
//!     counter name rejected_other reject with icmpx admin-prohibited
//!   set exempt             type iface_index . ipv4_addr
//!   counter rejected_tcp, counter rejected_other
//! ```
//!
//! Rules are built as typed `nftables` statements. Two objects are written as plain JSON
//! because nftables 0.6's schema cannot express them: a set of type `iface_index` (its
//! `SetType` has no such variant) and named counters whose values exceed u32 when read back.
//!
//! Rule expressions are written in the exact canonical form `nft -j list` prints, so a
//! read-back can be compared with the desired state structurally (see `observe`).

use std::borrow::Cow;
use std::fmt::Write as _;

use ipnet::Ipv4Net;
use nftables::expr::{
    Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem,
};
use nftables::stmt::{JumpTarget, Match, Operator, Reject, RejectType, Statement};
use nftables::types::RejectCode;
use serde_json::{Value, json};

use crate::policy::{DesiredRules, ExemptKey};

pub const FAMILY: &str = "inet";
pub const TABLE: &str = "egress_guard";
/// The base chain on the forward hook: every packet a container sends off the cell passes it.
pub const FORWARD_CHAIN: &str = "forward";
/// The regular chain holding the decision for overlay-sourced packets.
pub const EGRESS_CHAIN: &str = "overlay_egress";
pub const EXEMPT_SET: &str = "exempt";
pub const COUNTER_TCP: &str = "rejected_tcp";
pub const COUNTER_OTHER: &str = "rejected_other";
/// `filter - 10`: ahead of the iptables filter table (priority 0, legacy or nf_tables backend),
/// so our reject is final whatever ACCEPT silk, the policy agent or an ASG adds later.
pub const FORWARD_PRIORITY: i32 = -10;

/// One nft transaction: a list of JSON commands applied all-or-nothing by `nft -j -f -`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    commands: Vec<Value>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    pub fn len(&self) -> usize {
        self.commands.len()
    }

    pub fn commands(&self) -> &[Value] {
        &self.commands
    }

    /// The document for `nft -j -f -`.
    pub fn to_json(&self) -> String {
        json!({ "nftables": self.commands }).to_string()
    }

    fn push(&mut self, verb: &str, object: Value) {
        self.commands.push(json!({ verb: object }));
    }
}

/// The table's objects other than set elements, in canonical listing form (no handles, no
/// counter values). `observe` projects a kernel listing onto the same form to compare.
#[derive(Debug, Clone, PartialEq)]
pub struct Skeleton {
    pub table: Value,
    pub counters: Vec<Value>,
    pub set: Value,
    pub chains: Vec<Value>,
    /// (chain name, rule expression list) in chain order.
    pub rules: Vec<(String, Value)>,
}

/// The desired skeleton for `rules`.
pub fn skeleton(rules: &DesiredRules) -> Skeleton {
    Skeleton {
        table: json!({ "family": FAMILY, "name": TABLE }),
        counters: [COUNTER_TCP, COUNTER_OTHER]
            .iter()
            .map(|name| json!({ "family": FAMILY, "table": TABLE, "name": name }))
            .collect(),
        set: json!({
            "family": FAMILY, "table": TABLE, "name": EXEMPT_SET,
            "type": ["iface_index", "ipv4_addr"],
        }),
        chains: vec![
            json!({
                "family": FAMILY, "table": TABLE, "name": FORWARD_CHAIN,
                "type": "filter", "hook": "forward", "prio": FORWARD_PRIORITY, "policy": "accept",
            }),
            json!({ "family": FAMILY, "table": TABLE, "name": EGRESS_CHAIN }),
        ],
        rules: rule_statements(rules)
            .into_iter()
            .map(|(chain, stmts)| (chain.to_string(), to_value(&stmts)))
            .collect(),
    }
}

fn to_value(stmts: &[Statement<'_>]) -> Value {
    // Serialising these typed statements cannot fail: they hold only strings and numbers.
    serde_json::to_value(stmts).unwrap_or(Value::Null)
}

/// The rules, in order, as typed statements.
fn rule_statements(rules: &DesiredRules) -> Vec<(&'static str, Vec<Statement<'static>>)> {
    let saddr = payload("ip", "saddr");
    let daddr = payload("ip", "daddr");
    vec![
        (
            FORWARD_CHAIN,
            vec![
                matches(Operator::EQ, saddr.clone(), network(rules.overlay)),
                Statement::Jump(JumpTarget {
                    target: Cow::Borrowed(EGRESS_CHAIN),
                }),
            ],
        ),
        (
            EGRESS_CHAIN,
            vec![
                matches(
                    Operator::EQ,
                    Expression::Named(NamedExpression::Concat(vec![
                        Expression::Named(NamedExpression::Meta(Meta { key: MetaKey::Iif })),
                        saddr,
                    ])),
                    Expression::String(Cow::Owned(format!("@{EXEMPT_SET}"))),
                ),
                Statement::Return(None),
            ],
        ),
        (
            EGRESS_CHAIN,
            vec![
                matches(Operator::EQ, daddr, networks(&rules.allowed)),
                Statement::Return(None),
            ],
        ),
        (
            EGRESS_CHAIN,
            vec![
                matches(
                    Operator::EQ,
                    Expression::Named(NamedExpression::Meta(Meta {
                        key: MetaKey::L4proto,
                    })),
                    Expression::String(Cow::Borrowed("tcp")),
                ),
                Statement::Counter(nftables::stmt::Counter::Named(Cow::Borrowed(COUNTER_TCP))),
                Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
            ],
        ),
        (
            EGRESS_CHAIN,
            vec![
                Statement::Counter(nftables::stmt::Counter::Named(Cow::Borrowed(COUNTER_OTHER))),
                Statement::Reject(Some(Reject::new(
                    Some(RejectType::ICMPX),
                    Some(RejectCode::AdminProhibited),
                ))),
            ],
        ),
    ]
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(field),
        },
    )))
}

fn matches(
    op: Operator,
    left: Expression<'static>,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

/// A network as nft prints it: a /32 is a bare address, anything else a prefix.
fn network(net: Ipv4Net) -> Expression<'static> {
    let addr = Expression::String(Cow::Owned(net.network().to_string()));
    if net.prefix_len() == 32 {
        addr
    } else {
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(addr),
            len: u32::from(net.prefix_len()),
        }))
    }
}

/// An anonymous set as nft prints it: a single element is printed without the set.
fn networks(nets: &[Ipv4Net]) -> Expression<'static> {
    match nets {
        [one] => network(*one),
        many => Expression::Named(NamedExpression::Set(
            many.iter().map(|n| SetItem::Element(network(*n))).collect(),
        )),
    }
}

fn element(key: &ExemptKey) -> Value {
    json!({ "concat": [key.ifindex.to_string(), key.ip.to_string()] })
}

fn elements_object<'a>(keys: impl IntoIterator<Item = &'a ExemptKey>) -> Value {
    let elem: Vec<Value> = keys.into_iter().map(element).collect();
    json!({ "family": FAMILY, "table": TABLE, "name": EXEMPT_SET, "elem": elem })
}

/// Full sync: replace the whole table in one transaction.
///
/// `add table; delete table; add table; …` is the idempotent idiom for "recreate": the first
/// add makes the delete valid when the table is absent, and because nft applies the batch
/// atomically, no packet ever sees a state without the reject rule.
pub fn full_sync(rules: &DesiredRules) -> Batch {
    let skeleton = skeleton(rules);
    let mut batch = Batch::default();
    batch.push("add", json!({ "table": skeleton.table }));
    batch.push("delete", json!({ "table": skeleton.table }));
    batch.push("add", json!({ "table": skeleton.table }));
    for counter in skeleton.counters {
        batch.push("add", json!({ "counter": counter }));
    }
    batch.push("add", json!({ "set": skeleton.set }));
    for chain in skeleton.chains {
        batch.push("add", json!({ "chain": chain }));
    }
    for (chain, expr) in skeleton.rules {
        batch.push(
            "add",
            json!({ "rule": { "family": FAMILY, "table": TABLE, "chain": chain, "expr": expr } }),
        );
    }
    if !rules.exempt.is_empty() {
        batch.push("add", json!({ "element": elements_object(&rules.exempt) }));
    }
    batch
}

/// Incremental sync: only the exempt set's elements change. Deletes come first so a failure
/// (an element already gone) aborts the whole transaction and the caller falls back to a full
/// sync; removing an exemption never loosens enforcement.
pub fn element_update(add: &[ExemptKey], remove: &[ExemptKey]) -> Batch {
    let mut batch = Batch::default();
    if !remove.is_empty() {
        batch.push("delete", json!({ "element": elements_object(remove) }));
    }
    if !add.is_empty() {
        batch.push("add", json!({ "element": elements_object(add) }));
    }
    batch
}

/// Removal of the whole table (enabled = false), valid whether or not it exists.
pub fn delete_table() -> Batch {
    let table = json!({ "family": FAMILY, "name": TABLE });
    let mut batch = Batch::default();
    batch.push("add", json!({ "table": table }));
    batch.push("delete", json!({ "table": table }));
    batch
}

/// The same ruleset in nft's own syntax, for operators (`egress-guard render`).
pub fn to_nft_text(rules: &DesiredRules) -> String {
    let join = |nets: &[Ipv4Net]| -> String {
        let items: Vec<String> = nets.iter().map(|n| text_network(*n)).collect();
        match items.as_slice() {
            [one] => one.clone(),
            _ => format!("{{ {} }}", items.join(", ")),
        }
    };
    let mut out = String::new();
    let _ = writeln!(out, "table {FAMILY} {TABLE} {{");
    for counter in [COUNTER_TCP, COUNTER_OTHER] {
        let _ = writeln!(out, "\tcounter {counter} {{\n\t}}\n");
    }
    let _ = writeln!(
        out,
        "\tset {EXEMPT_SET} {{\n\t\ttype iface_index . ipv4_addr"
    );
    if !rules.exempt.is_empty() {
        let items: Vec<String> = rules
            .exempt
            .iter()
            .map(|k| format!("{} . {}", k.ifindex, k.ip))
            .collect();
        let _ = writeln!(out, "\t\telements = {{ {} }}", items.join(",\n\t\t\t     "));
    }
    let _ = writeln!(out, "\t}}\n");
    let _ = writeln!(
        out,
        "\tchain {FORWARD_CHAIN} {{\n\t\ttype filter hook forward priority filter - 10; policy accept;\n\t\tip saddr {} jump {EGRESS_CHAIN}\n\t}}\n",
        text_network(rules.overlay)
    );
    let _ = writeln!(
        out,
        "\tchain {EGRESS_CHAIN} {{\n\t\tiif . ip saddr @{EXEMPT_SET} return\n\t\tip daddr {} return\n\t\tmeta l4proto tcp counter name \"{COUNTER_TCP}\" reject with tcp reset\n\t\tcounter name \"{COUNTER_OTHER}\" reject with icmpx admin-prohibited\n\t}}",
        join(&rules.allowed)
    );
    out.push_str("}\n");
    out
}

fn text_network(net: Ipv4Net) -> String {
    if net.prefix_len() == 32 {
        net.network().to_string()
    } else {
        net.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;

    fn rules(allowed: &[&str], exempt: &[(u32, [u8; 4])]) -> DesiredRules {
        DesiredRules {
            overlay: "10.255.0.0/16".parse().expect("literal"),
            allowed: allowed
                .iter()
                .map(|n| n.parse().expect("literal"))
                .collect(),
            exempt: exempt
                .iter()
                .map(|(ifindex, ip)| ExemptKey {
                    ifindex: *ifindex,
                    ip: Ipv4Addr::from(*ip),
                })
                .collect::<BTreeSet<_>>(),
        }
    }

    /// The exact batch for the default config with one exemption (snapshot).
    #[test]
    fn full_sync_snapshot() {
        let batch = full_sync(&rules(&["10.0.0.0/8"], &[(12, [10, 255, 1, 4])]));
        let expected = r#"{"nftables":[{"add":{"table":{"family":"inet","name":"egress_guard"}}},{"delete":{"table":{"family":"inet","name":"egress_guard"}}},{"add":{"table":{"family":"inet","name":"egress_guard"}}},{"add":{"counter":{"family":"inet","name":"rejected_tcp","table":"egress_guard"}}},{"add":{"counter":{"family":"inet","name":"rejected_other","table":"egress_guard"}}},{"add":{"set":{"family":"inet","name":"exempt","table":"egress_guard","type":["iface_index","ipv4_addr"]}}},{"add":{"chain":{"family":"inet","hook":"forward","name":"forward","policy":"accept","prio":-10,"table":"egress_guard","type":"filter"}}},{"add":{"chain":{"family":"inet","name":"overlay_egress","table":"egress_guard"}}},{"add":{"rule":{"chain":"forward","expr":[{"match":{"left":{"payload":{"field":"saddr","protocol":"ip"}},"op":"==","right":{"prefix":{"addr":"10.255.0.0","len":16}}}},{"jump":{"target":"overlay_egress"}}],"family":"inet","table":"egress_guard"}}},{"add":{"rule":{"chain":"overlay_egress","expr":[{"match":{"left":{"concat":[{"meta":{"key":"iif"}},{"payload":{"field":"saddr","protocol":"ip"}}]},"op":"==","right":"@exempt"}},{"return":null}],"family":"inet","table":"egress_guard"}}},{"add":{"rule":{"chain":"overlay_egress","expr":[{"match":{"left":{"payload":{"field":"daddr","protocol":"ip"}},"op":"==","right":{"prefix":{"addr":"10.0.0.0","len":8}}}},{"return":null}],"family":"inet","table":"egress_guard"}}},{"add":{"rule":{"chain":"overlay_egress","expr":[{"match":{"left":{"meta":{"key":"l4proto"}},"op":"==","right":"tcp"}},{"counter":"rejected_tcp"},{"reject":{"type":"tcp reset"}}],"family":"inet","table":"egress_guard"}}},{"add":{"rule":{"chain":"overlay_egress","expr":[{"counter":"rejected_other"},{"reject":{"expr":"admin-prohibited","type":"icmpx"}}],"family":"inet","table":"egress_guard"}}},{"add":{"element":{"elem":[{"concat":["12","10.255.1.4"]}],"family":"inet","name":"exempt","table":"egress_guard"}}}]}"#;
        assert_eq!(batch.to_json(), expected);
    }

    #[test]
    fn reject_rules_come_after_every_return() {
        let skeleton = skeleton(&rules(&["10.0.0.0/8"], &[]));
        let egress: Vec<String> = skeleton
            .rules
            .iter()
            .filter(|(chain, _)| chain == EGRESS_CHAIN)
            .map(|(_, expr)| expr.to_string())
            .collect();
        assert_eq!(egress.len(), 4);
        assert!(egress[0].contains("@exempt") && egress[0].contains("return"));
        assert!(egress[1].contains("daddr") && egress[1].contains("return"));
        assert!(egress[2].contains("tcp reset"));
        assert!(egress[3].contains("admin-prohibited"));
    }

    #[test]
    fn several_allowed_networks_form_an_anonymous_set_and_host_routes_are_bare() {
        let skeleton = skeleton(&rules(&["10.0.0.0/8", "172.16.5.7/32"], &[]));
        let allowed = &skeleton.rules[2].1;
        assert_eq!(
            allowed[0]["match"]["right"],
            json!({ "set": [ { "prefix": { "addr": "10.0.0.0", "len": 8 } }, "172.16.5.7" ] })
        );
    }

    #[test]
    fn empty_exempt_set_adds_no_element_command() {
        let batch = full_sync(&rules(&["10.0.0.0/8"], &[]));
        assert!(!batch.to_json().contains("\"element\""));
        // And the transaction never deletes the table without re-adding it afterwards.
        let verbs: Vec<&str> = batch
            .commands()
            .iter()
            .filter_map(|c| {
                c.as_object()
                    .and_then(|o| o.keys().next())
                    .map(String::as_str)
            })
            .collect();
        let delete_at = verbs.iter().position(|v| *v == "delete").expect("delete");
        assert!(verbs[delete_at + 1..].contains(&"add"));
    }

    #[test]
    fn element_update_deletes_then_adds() {
        let add = [ExemptKey {
            ifindex: 3,
            ip: Ipv4Addr::new(10, 255, 0, 3),
        }];
        let remove = [ExemptKey {
            ifindex: 2,
            ip: Ipv4Addr::new(10, 255, 0, 2),
        }];
        let batch = element_update(&add, &remove);
        assert_eq!(
            batch.to_json(),
            r#"{"nftables":[{"delete":{"element":{"elem":[{"concat":["2","10.255.0.2"]}],"family":"inet","name":"exempt","table":"egress_guard"}}},{"add":{"element":{"elem":[{"concat":["3","10.255.0.3"]}],"family":"inet","name":"exempt","table":"egress_guard"}}}]}"#
        );
        assert!(element_update(&[], &[]).is_empty());
    }

    #[test]
    fn delete_table_is_valid_when_absent() {
        assert_eq!(
            delete_table().to_json(),
            r#"{"nftables":[{"add":{"table":{"family":"inet","name":"egress_guard"}}},{"delete":{"table":{"family":"inet","name":"egress_guard"}}}]}"#
        );
    }

    #[test]
    fn nft_text_snapshot() {
        let text = to_nft_text(&rules(
            &["10.0.0.0/8", "172.16.5.0/24"],
            &[(12, [10, 255, 1, 4])],
        ));
        let expected = "table inet egress_guard {
\tcounter rejected_tcp {
\t}

\tcounter rejected_other {
\t}

\tset exempt {
\t\ttype iface_index . ipv4_addr
\t\telements = { 12 . 10.255.1.4 }
\t}

\tchain forward {
\t\ttype filter hook forward priority filter - 10; policy accept;
\t\tip saddr 10.255.0.0/16 jump overlay_egress
\t}

\tchain overlay_egress {
\t\tiif . ip saddr @exempt return
\t\tip daddr { 10.0.0.0/8, 172.16.5.0/24 } return
\t\tmeta l4proto tcp counter name \"rejected_tcp\" reject with tcp reset
\t\tcounter name \"rejected_other\" reject with icmpx admin-prohibited
\t}
}
";
        assert_eq!(text, expected);
    }
}
