//! The ruleset for people: nft's own text and JSON notation of the agent's tables (pure).
//!
//! `egress-guard render` prints what `nft list table inet egress_guard` (and `nft -j list …`)
//! print for the tables the agent keeps, element for element, so an operator can compare them
//! on a cell. Kernel state is left out of the JSON: handles and counter values.
//!
//! ```text
//! table inet egress_guard {                  (and egress_guard_owned, flags owner)
//!   counter rejected_tcp, rejected_other, blocked, blocked_logged
//!   set allowed   type ipv4_addr, flags interval: allowed_networks + the overlay
//!   set exempt    type iface_index . ipv4_addr: staging (host ifindex, IP) pairs
//!   chain forward          hook forward, priority filter - 10, policy accept
//!     ip saddr <overlay> jump overlay_egress
//!   chain overlay_egress
//!     iif . ip saddr @exempt return
//!     ip daddr @allowed return
//!     counter name "blocked" limit rate 200/second burst 100 packets
//!       counter name "blocked_logged" log prefix "<table>" group 9851
//!     meta l4proto tcp counter name "rejected_tcp" reject with tcp reset   (enforce only)
//!     counter name "rejected_other" reject with icmpx admin-prohibited     (enforce only)
//!   chain dns_redirect     hook prerouting, priority dstnat (only with [dns] enabled)
//!     iif . ip saddr @exempt return
//!     ip saddr <overlay> udp dport 53 redirect to :<dns.listen port>
//!     ip saddr <overlay> tcp dport 53 redirect to :<dns.listen port>
//! }
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ipnet::IpNet;
use serde_json::{Value, json};

use super::model::{
    ALLOWED_SET, ALLOWED6_SET, AgentTable, COUNTER_BLOCKED, COUNTER_LOGGED, COUNTER_OTHER,
    COUNTER_TCP, COUNTER6_OTHER, COUNTER6_TCP, DNS_CHAIN, DNS_PORT, DNS_PRIORITY, EGRESS_CHAIN,
    EGRESS6_CHAIN, EXEMPT_SET, EXEMPT6_SET, FORWARD_CHAIN, FORWARD_PRIORITY, LOG_BURST,
    LOG_RATE_PER_SECOND, NFLOG_GROUP, counters,
};
use crate::config::Mode;
use crate::policy::{DesiredRules, Exempt6Key, ExemptKey};

pub const FAMILY: &str = "inet";
/// The name nft prints as an owned table's owner (`# progname …`).
pub const PROGNAME: &str = "egress-guard";

/// How an exempt element's interface prints: nft shows the interface's name (quoted) when it
/// exists, its index otherwise.
fn interface(ifindex: u32, links: &BTreeMap<u32, String>) -> (String, Value) {
    match links.get(&ifindex) {
        Some(name) => (format!("\"{name}\""), Value::String(name.clone())),
        None => (ifindex.to_string(), Value::String(ifindex.to_string())),
    }
}

/// Exempt elements in the order nft lists them: by address.
fn exempt_sorted(rules: &DesiredRules) -> Vec<ExemptKey> {
    let mut keys: Vec<ExemptKey> = rules.exempt.iter().copied().collect();
    keys.sort_by_key(|k| (k.ip, k.ifindex));
    keys
}

fn exempt6_sorted(rules: &DesiredRules) -> Vec<Exempt6Key> {
    let mut keys: Vec<Exempt6Key> = rules.exempt6.iter().copied().collect();
    keys.sort_by_key(|k| (k.ip, k.ifindex));
    keys
}

/// nft's text for a network: a host as a bare address, anything else as a prefix.
fn text_network(net: impl Into<IpNet>) -> String {
    let net: IpNet = net.into();
    if net.prefix_len() == net.max_prefix_len() {
        net.network().to_string()
    } else {
        net.to_string()
    }
}

/// nft's JSON for a network, likewise.
fn json_network(net: impl Into<IpNet>) -> Value {
    let net: IpNet = net.into();
    if net.prefix_len() == net.max_prefix_len() {
        Value::String(net.network().to_string())
    } else {
        json!({ "prefix": { "addr": net.network().to_string(), "len": net.prefix_len() } })
    }
}

/// `elements = { a, b,\n\t\t\t     c }` with `per_line` elements on a line, as nft wraps them.
fn elements_text(items: &[String], per_line: usize) -> String {
    let mut out = String::from("elements = { ");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(if i % per_line == 0 {
                ",\n\t\t\t     "
            } else {
                ", "
            });
        }
        out.push_str(item);
    }
    out.push_str(" }");
    out
}

/// One set in `nft list` notation: its type, `flags interval` for an interval set, and its
/// elements (when it has any), `per_line` to a line as nft wraps them; then a blank line.
fn set_text(name: &str, kind: &str, interval: bool, items: &[String], per_line: usize) -> String {
    let mut out = format!("\tset {name} {{\n\t\ttype {kind}\n");
    if interval {
        out.push_str("\t\tflags interval\n");
    }
    if !items.is_empty() {
        let _ = writeln!(out, "\t\t{}", elements_text(items, per_line));
    }
    out.push_str("\t}\n\n");
    out
}

/// One table in `nft list table` notation.
pub fn table_text(
    table: AgentTable,
    rules: &DesiredRules,
    links: &BTreeMap<u32, String>,
) -> String {
    let name = table.name();
    let mut out = String::new();
    let _ = write!(out, "table {FAMILY} {name} {{");
    if table == AgentTable::Owned {
        let _ = write!(out, " # progname {PROGNAME}\n\tflags owner\n");
    }
    out.push('\n');
    for counter in counters() {
        let _ = writeln!(out, "\tcounter {counter} {{\n\t}}\n");
    }
    let allowed: Vec<String> = rules.allowed.iter().map(|n| text_network(*n)).collect();
    out.push_str(&set_text(ALLOWED_SET, "ipv4_addr", true, &allowed, 2));
    let exempt: Vec<String> = exempt_sorted(rules)
        .iter()
        .map(|k| format!("{} . {}", interface(k.ifindex, links).0, k.ip))
        .collect();
    out.push_str(&set_text(
        EXEMPT_SET,
        "iface_index . ipv4_addr",
        false,
        &exempt,
        1,
    ));
    let allowed6: Vec<String> = rules.allowed6.iter().map(|n| text_network(*n)).collect();
    out.push_str(&set_text(ALLOWED6_SET, "ipv6_addr", true, &allowed6, 1));
    let exempt6: Vec<String> = exempt6_sorted(rules)
        .iter()
        .map(|k| format!("{} . {}", interface(k.ifindex, links).0, k.ip))
        .collect();
    out.push_str(&set_text(
        EXEMPT6_SET,
        "iface_index . ipv6_addr",
        false,
        &exempt6,
        1,
    ));
    let _ = writeln!(
        out,
        "\tchain {FORWARD_CHAIN} {{\n\t\ttype filter hook forward priority filter - {}; policy accept;\n\t\tip saddr {} jump {EGRESS_CHAIN}\n\t\tmeta nfproto ipv6 meta iifkind \"veth\" jump {EGRESS6_CHAIN}\n\t}}\n",
        -FORWARD_PRIORITY,
        text_network(rules.overlay)
    );
    let _ = writeln!(
        out,
        "\tchain {EGRESS_CHAIN} {{\n\t\tiif . ip saddr @{EXEMPT_SET} return\n\t\tip daddr @{ALLOWED_SET} return"
    );
    out.push_str(&reject_or_log_text(
        table,
        rules.mode,
        COUNTER_TCP,
        COUNTER_OTHER,
    ));
    out.push_str("\t}\n\n");
    let _ = writeln!(
        out,
        "\tchain {EGRESS6_CHAIN} {{\n\t\tiif . ip6 saddr @{EXEMPT6_SET} return\n\t\tip6 daddr @{ALLOWED6_SET} return\n\t\tmeta oifkind \"veth\" return"
    );
    out.push_str(&reject_or_log_text(
        table,
        rules.mode,
        COUNTER6_TCP,
        COUNTER6_OTHER,
    ));
    out.push_str("\t}\n");
    if let Some(port) = rules.dns_redirect {
        let overlay = text_network(rules.overlay);
        let _ = writeln!(
            out,
            "\n\tchain {DNS_CHAIN} {{\n\t\ttype nat hook prerouting priority {}; policy accept;\n\t\tiif . ip saddr @{EXEMPT_SET} return\n\t\tip saddr {overlay} udp dport {DNS_PORT} redirect to :{port}\n\t\tip saddr {overlay} tcp dport {DNS_PORT} redirect to :{port}\n\t}}",
            nat_priority(DNS_PRIORITY)
        );
    }
    out.push_str("}\n");
    out
}

/// The end of `overlay_egress` ([`super::model::reject_or_log`]) as nft lists it.
fn reject_or_log_text(
    table: AgentTable,
    mode: Mode,
    tcp_counter: &str,
    other_counter: &str,
) -> String {
    let mut out = format!(
        "\t\tcounter name \"{COUNTER_BLOCKED}\" limit rate {LOG_RATE_PER_SECOND}/second burst {LOG_BURST} packets counter name \"{COUNTER_LOGGED}\" log prefix \"{}\" group {NFLOG_GROUP}\n",
        table.name()
    );
    if mode == Mode::Enforce {
        let _ = writeln!(
            out,
            "\t\tmeta l4proto tcp counter name \"{tcp_counter}\" reject with tcp reset\n\t\tcounter name \"{other_counter}\" reject with icmpx admin-prohibited"
        );
    }
    out
}

/// The same rules in nft's JSON notation.
fn reject_or_log_json(
    table: AgentTable,
    mode: Mode,
    tcp_counter: &str,
    other_counter: &str,
) -> Vec<Value> {
    let mut rules = vec![json!([
        { "counter": COUNTER_BLOCKED },
        { "limit": { "rate": LOG_RATE_PER_SECOND, "burst": LOG_BURST, "per": "second" } },
        { "counter": COUNTER_LOGGED },
        { "log": { "prefix": table.name(), "group": NFLOG_GROUP } },
    ])];
    if mode == Mode::Enforce {
        rules.push(json!([
            { "match": { "op": "==", "left": { "meta": { "key": "l4proto" } }, "right": "tcp" } },
            { "counter": tcp_counter },
            { "reject": { "type": "tcp reset" } },
        ]));
        rules.push(json!([
            { "counter": other_counter },
            { "reject": { "type": "icmpx", "expr": "admin-prohibited" } },
        ]));
    }
    rules
}

/// How nft names a NAT chain's priority: `dstnat` and offsets from it.
fn nat_priority(priority: i32) -> String {
    match priority - DNS_PRIORITY {
        0 => "dstnat".into(),
        d if d > 0 => format!("dstnat + {d}"),
        d => format!("dstnat - {}", -d),
    }
}

/// Every table the agent keeps, as `nft list ruleset` prints them.
pub fn to_nft_text(
    tables: &[AgentTable],
    rules: &DesiredRules,
    links: &BTreeMap<u32, String>,
) -> String {
    tables
        .iter()
        .map(|t| table_text(*t, rules, links))
        .collect()
}

/// The tables in `nft -j list ruleset` notation, without metainfo, handles and counter values.
pub fn to_json(
    tables: &[AgentTable],
    rules: &DesiredRules,
    links: &BTreeMap<u32, String>,
) -> Value {
    let mut objects = Vec::new();
    for table in tables {
        let t = table.name();
        let mut header = json!({ "family": FAMILY, "name": t });
        if *table == AgentTable::Owned {
            header["flags"] = json!("owner");
        }
        objects.push(json!({ "table": header }));
        for counter in counters() {
            objects.push(json!({ "counter": { "family": FAMILY, "name": counter, "table": t } }));
        }
        let allowed: Vec<Value> = rules.allowed.iter().map(|n| json_network(*n)).collect();
        objects.push(json!({ "set": {
            "family": FAMILY, "name": ALLOWED_SET, "table": t, "type": "ipv4_addr",
            "flags": ["interval"], "elem": allowed,
        }}));
        let mut exempt = json!({
            "family": FAMILY, "name": EXEMPT_SET, "table": t, "type": ["iface_index", "ipv4_addr"],
        });
        if !rules.exempt.is_empty() {
            let elements: Vec<Value> = exempt_sorted(rules)
                .iter()
                .map(|k| json!({ "concat": [interface(k.ifindex, links).1, k.ip.to_string()] }))
                .collect();
            exempt["elem"] = Value::Array(elements);
        }
        objects.push(json!({ "set": exempt }));
        let mut allowed6 = json!({
            "family": FAMILY, "name": ALLOWED6_SET, "table": t, "type": "ipv6_addr",
            "flags": ["interval"],
        });
        if !rules.allowed6.is_empty() {
            allowed6["elem"] = rules.allowed6.iter().map(|n| json_network(*n)).collect();
        }
        objects.push(json!({ "set": allowed6 }));
        let mut exempt6 = json!({
            "family": FAMILY, "name": EXEMPT6_SET, "table": t, "type": ["iface_index", "ipv6_addr"],
        });
        if !rules.exempt6.is_empty() {
            exempt6["elem"] = exempt6_sorted(rules)
                .iter()
                .map(|k| json!({ "concat": [interface(k.ifindex, links).1, k.ip.to_string()] }))
                .collect();
        }
        objects.push(json!({ "set": exempt6 }));
        objects.push(json!({ "chain": {
            "family": FAMILY, "table": t, "name": FORWARD_CHAIN, "type": "filter",
            "hook": "forward", "prio": FORWARD_PRIORITY, "policy": "accept",
        }}));
        objects.push(json!({ "chain": { "family": FAMILY, "table": t, "name": EGRESS_CHAIN } }));
        objects.push(json!({ "chain": { "family": FAMILY, "table": t, "name": EGRESS6_CHAIN } }));
        if rules.dns_redirect.is_some() {
            objects.push(json!({ "chain": {
                "family": FAMILY, "table": t, "name": DNS_CHAIN, "type": "nat",
                "hook": "prerouting", "prio": DNS_PRIORITY, "policy": "accept",
            }}));
        }
        let rule = |chain: &str, expr: Value| json!({ "rule": { "family": FAMILY, "table": t, "chain": chain, "expr": expr } });
        let overlay = json_network(rules.overlay);
        objects.push(rule(
            FORWARD_CHAIN,
            json!([
                { "match": { "op": "==", "left": { "payload": { "protocol": "ip", "field": "saddr" } }, "right": overlay } },
                { "jump": { "target": EGRESS_CHAIN } },
            ]),
        ));
        objects.push(rule(
            FORWARD_CHAIN,
            json!([
                { "match": { "op": "==", "left": { "meta": { "key": "nfproto" } }, "right": "ipv6" } },
                { "match": { "op": "==", "left": { "meta": { "key": "iifkind" } }, "right": "veth" } },
                { "jump": { "target": EGRESS6_CHAIN } },
            ]),
        ));
        objects.push(rule(
            EGRESS_CHAIN,
            json!([
                { "match": { "op": "==", "left": { "concat": [ { "meta": { "key": "iif" } }, { "payload": { "protocol": "ip", "field": "saddr" } } ] }, "right": format!("@{EXEMPT_SET}") } },
                { "return": null },
            ]),
        ));
        objects.push(rule(
            EGRESS_CHAIN,
            json!([
                { "match": { "op": "==", "left": { "payload": { "protocol": "ip", "field": "daddr" } }, "right": format!("@{ALLOWED_SET}") } },
                { "return": null },
            ]),
        ));
        for expr in reject_or_log_json(*table, rules.mode, COUNTER_TCP, COUNTER_OTHER) {
            objects.push(rule(EGRESS_CHAIN, expr));
        }
        objects.push(rule(
            EGRESS6_CHAIN,
            json!([
                { "match": { "op": "==", "left": { "concat": [ { "meta": { "key": "iif" } }, { "payload": { "protocol": "ip6", "field": "saddr" } } ] }, "right": format!("@{EXEMPT6_SET}") } },
                { "return": null },
            ]),
        ));
        objects.push(rule(
            EGRESS6_CHAIN,
            json!([
                { "match": { "op": "==", "left": { "payload": { "protocol": "ip6", "field": "daddr" } }, "right": format!("@{ALLOWED6_SET}") } },
                { "return": null },
            ]),
        ));
        objects.push(rule(
            EGRESS6_CHAIN,
            json!([
                { "match": { "op": "==", "left": { "meta": { "key": "oifkind" } }, "right": "veth" } },
                { "return": null },
            ]),
        ));
        for expr in reject_or_log_json(*table, rules.mode, COUNTER6_TCP, COUNTER6_OTHER) {
            objects.push(rule(EGRESS6_CHAIN, expr));
        }
        if let Some(port) = rules.dns_redirect {
            objects.push(rule(
                DNS_CHAIN,
                json!([
                    { "match": { "op": "==", "left": { "concat": [ { "meta": { "key": "iif" } }, { "payload": { "protocol": "ip", "field": "saddr" } } ] }, "right": format!("@{EXEMPT_SET}") } },
                    { "return": null },
                ]),
            ));
            for protocol in ["udp", "tcp"] {
                objects.push(rule(
                    DNS_CHAIN,
                    json!([
                        { "match": { "op": "==", "left": { "payload": { "protocol": "ip", "field": "saddr" } }, "right": overlay } },
                        { "match": { "op": "==", "left": { "payload": { "protocol": protocol, "field": "dport" } }, "right": DNS_PORT } },
                        { "redirect": { "port": port } },
                    ]),
                ));
            }
        }
    }
    json!({ "nftables": objects })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;

    fn rules(allowed: &[&str], exempt: &[(u32, [u8; 4])]) -> DesiredRules {
        DesiredRules {
            mode: Mode::Enforce,
            allowed6: vec!["fd00::/8".parse().expect("literal")],
            exempt6: exempt
                .iter()
                .map(|(ifindex, ip)| Exempt6Key {
                    ifindex: *ifindex,
                    ip: std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(ip[3])),
                })
                .collect(),
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
            dns_redirect: None,
        }
    }

    /// What nft 1.0.6 printed for this table (`nft list table inet egress_guard`, counter
    /// values removed), with interface 12 named s-010255001004 and interface 77 absent.
    #[test]
    fn text_is_what_nft_lists() {
        let links = BTreeMap::from([(12, "s-010255001004".to_string())]);
        let text = table_text(
            AgentTable::Persistent,
            &rules(
                &["10.0.0.0/8", "172.16.5.0/24", "192.0.2.1/32"],
                &[(77, [10, 255, 1, 6]), (12, [10, 255, 1, 4])],
            ),
            &links,
        );
        let expected = "table inet egress_guard {
\tcounter rejected_tcp {
\t}

\tcounter rejected_other {
\t}

\tcounter blocked {
\t}

\tcounter blocked_logged {
\t}

\tcounter rejected6_tcp {
\t}

\tcounter rejected6_other {
\t}

\tset allowed {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 10.0.0.0/8, 172.16.5.0/24,
\t\t\t     192.0.2.1 }
\t}

\tset exempt {
\t\ttype iface_index . ipv4_addr
\t\telements = { \"s-010255001004\" . 10.255.1.4,
\t\t\t     77 . 10.255.1.6 }
\t}

\tset allowed6 {
\t\ttype ipv6_addr
\t\tflags interval
\t\telements = { fd00::/8 }
\t}

\tset exempt6 {
\t\ttype iface_index . ipv6_addr
\t\telements = { \"s-010255001004\" . fd00::4,
\t\t\t     77 . fd00::6 }
\t}

\tchain forward {
\t\ttype filter hook forward priority filter - 10; policy accept;
\t\tip saddr 10.255.0.0/16 jump overlay_egress
\t\tmeta nfproto ipv6 meta iifkind \"veth\" jump overlay6_egress
\t}

\tchain overlay_egress {
\t\tiif . ip saddr @exempt return
\t\tip daddr @allowed return
\t\tcounter name \"blocked\" limit rate 200/second burst 100 packets counter name \"blocked_logged\" log prefix \"egress_guard\" group 9851
\t\tmeta l4proto tcp counter name \"rejected_tcp\" reject with tcp reset
\t\tcounter name \"rejected_other\" reject with icmpx admin-prohibited
\t}

\tchain overlay6_egress {
\t\tiif . ip6 saddr @exempt6 return
\t\tip6 daddr @allowed6 return
\t\tmeta oifkind \"veth\" return
\t\tcounter name \"blocked\" limit rate 200/second burst 100 packets counter name \"blocked_logged\" log prefix \"egress_guard\" group 9851
\t\tmeta l4proto tcp counter name \"rejected6_tcp\" reject with tcp reset
\t\tcounter name \"rejected6_other\" reject with icmpx admin-prohibited
\t}
}
";
        assert_eq!(text, expected);
    }

    /// What nft 1.0.6 printed for the DNS chain (`[dns] enabled`, listen port 9853).
    #[test]
    fn dns_chain_text_is_what_nft_lists() {
        let mut with_dns = rules(&["10.0.0.0/8"], &[]);
        let without = table_text(AgentTable::Persistent, &with_dns, &BTreeMap::new());
        with_dns.dns_redirect = Some(9853);
        let text = table_text(AgentTable::Persistent, &with_dns, &BTreeMap::new());
        let chain = "
\tchain dns_redirect {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiif . ip saddr @exempt return
\t\tip saddr 10.255.0.0/16 udp dport 53 redirect to :9853
\t\tip saddr 10.255.0.0/16 tcp dport 53 redirect to :9853
\t}
}
";
        let expected = format!("{}{chain}", without.strip_suffix("}\n").expect("table end"));
        assert_eq!(text, expected);
        let json = to_json(&AgentTable::ALL, &with_dns, &BTreeMap::new());
        let objects = json["nftables"].as_array().expect("array");
        // Per table: 27 objects as without DNS, plus the chain and its 3 rules.
        assert_eq!(objects.len(), 62);
        let chain = objects
            .iter()
            .find(|o| o["chain"]["name"] == DNS_CHAIN)
            .expect("the DNS chain");
        assert_eq!(chain["chain"]["prio"], -100);
        let redirect = objects
            .iter()
            .find(|o| {
                o["rule"]["chain"] == DNS_CHAIN && o["rule"]["expr"][2].get("redirect").is_some()
            })
            .expect("a redirect rule");
        assert_eq!(redirect["rule"]["expr"][2]["redirect"]["port"], 9853);
    }

    #[test]
    fn owned_table_names_its_owner_and_flag() {
        let text = table_text(
            AgentTable::Owned,
            &rules(&["10.0.0.0/8"], &[]),
            &BTreeMap::new(),
        );
        assert!(
            text.starts_with(
                "table inet egress_guard_owned { # progname egress-guard\n\tflags owner\n\n"
            ),
            "{text}"
        );
        let json = to_json(
            &[AgentTable::Owned],
            &rules(&["10.0.0.0/8"], &[]),
            &BTreeMap::new(),
        );
        assert_eq!(json["nftables"][0]["table"]["flags"], "owner");
    }

    #[test]
    fn json_lists_both_tables() {
        let value = to_json(
            &AgentTable::ALL,
            &rules(&["10.0.0.0/8"], &[(12, [10, 255, 1, 4])]),
            &BTreeMap::new(),
        );
        let objects = value["nftables"].as_array().expect("array");
        // Per table: table, 6 counters, 4 sets, 3 chains, 13 rules.
        assert_eq!(objects.len(), 54);
        assert_eq!(
            objects[8]["set"]["elem"],
            json!([{ "concat": ["12", "10.255.1.4"] }])
        );
        assert_eq!(
            objects[7]["set"]["elem"],
            json!([{ "prefix": { "addr": "10.0.0.0", "len": 8 } }])
        );
        assert_eq!(
            objects[9]["set"]["elem"],
            json!([{ "prefix": { "addr": "fd00::", "len": 8 } }])
        );
        assert_eq!(
            objects[10]["set"]["elem"],
            json!([{ "concat": ["12", "fd00::4"] }])
        );
        assert_eq!(
            objects[27 + 18]["rule"]["expr"][3],
            json!({ "log": { "prefix": "egress_guard_owned", "group": 9851 } })
        );
    }

    #[test]
    fn audit_lists_the_report_rule_and_no_reject() {
        let mut audit = rules(&["10.0.0.0/8"], &[]);
        audit.mode = Mode::Audit;
        let text = table_text(AgentTable::Persistent, &audit, &BTreeMap::new());
        assert!(
            text.ends_with("group 9851\n\t}\n}\n"),
            "the report rule ends the chain:\n{text}"
        );
        assert!(!text.contains("reject with"), "{text}");
        let json = to_json(&[AgentTable::Persistent], &audit, &BTreeMap::new());
        let objects = json["nftables"].as_array().expect("array");
        // table, 6 counters, 4 sets, 3 chains, 9 rules (4 IPv4, 5 IPv6).
        assert_eq!(objects.len(), 23);
        assert!(!json.to_string().contains("\"reject\""));
    }
}
