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
//!   set allowed6, exempt6, containers6: the same for IPv6, and this cell's containers' IPv6
//!   set report_budget  type iface_index, dynamic: each container's report budget
//!   chain forward          hook forward, priority filter - 10, policy accept
//!     ip saddr <overlay> jump overlay_egress
//!   chain overlay_egress
//!     iif . ip saddr @exempt return
//!     ip daddr @allowed return
//!     counter name "blocked" update @report_budget { iif limit rate 20/second burst 20 packets }
//!       limit rate 200/second burst 100 packets
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
    ALLOWED_SET, ALLOWED6_SET, AgentTable, CONTAINERS6_SET, COUNTER_BLOCKED,
    COUNTER_DNS_RATE_LIMITED, COUNTER_DNS6_DROPPED, COUNTER_LOGGED, COUNTER_OTHER, COUNTER_TCP,
    COUNTER6_OTHER, COUNTER6_TCP, DNS_BUDGET_SET, DNS_CHAIN, DNS_GUARD_CHAIN, DNS_PORT,
    DNS_PRIORITY, EGRESS_CHAIN, EGRESS6_CHAIN, EXEMPT_SET, EXEMPT6_SET, FORWARD_CHAIN,
    FORWARD_PRIORITY, HOST_MARK_MASK, LEARNED_MAP_SIZE, LEARNED4_MAP, LEARNED6_MAP, LOG_BURST,
    LOG_RATE_PER_SECOND, NFLOG_GROUP, RAW_PRIORITY, REPORT_BUDGET_SET, REPORT_BUDGET_SIZE,
    REPORT_BUDGET_TIMEOUT_MS, REPORT_BURST_PER_CONTAINER, REPORT_RATE_PER_CONTAINER,
    UNSCOPED_CHAIN, chains_of_rules, counters, host_mark_bits, learned_map, scope_chain, scope_map,
};
use crate::config::{Destination, EgressRule, Mode, Protocol, ports_text};
use crate::policy::{
    DNS_FALLBACK_SHARE, DesiredRules, DnsRules, Exempt6Key, ExemptKey, RuleSet, ScopeKind,
};

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
    let containers6: Vec<String> = rules.containers6.iter().map(|ip| ip.to_string()).collect();
    out.push_str(&set_text(
        CONTAINERS6_SET,
        "ipv6_addr",
        false,
        &containers6,
        1,
    ));
    for set in [REPORT_BUDGET_SET, DNS_BUDGET_SET] {
        let _ = writeln!(
            out,
            "\tset {set} {{\n\t\ttype iface_index\n\t\tsize {REPORT_BUDGET_SIZE}\n\t\tflags dynamic,timeout\n\t\ttimeout {}\n\t}}\n",
            nft_duration(REPORT_BUDGET_TIMEOUT_MS)
        );
    }
    for kind in ScopeKind::ALL {
        out.push_str(&map_text(kind, rules, links));
    }
    for (name, addr) in [(LEARNED4_MAP, "ipv4_addr"), (LEARNED6_MAP, "ipv6_addr")] {
        // Learned elements are the DNS filter's, not the configuration's: not printed.
        let _ = writeln!(
            out,
            "\tmap {name} {{\n\t\ttype iface_index . {addr} : verdict\n\t\tsize {LEARNED_MAP_SIZE}\n\t\tflags timeout\n\t}}\n"
        );
    }
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
    out.push_str(&rule_hooks_text(&rules.rule_set, "ip"));
    out.push_str(&reject_or_log_text(
        table,
        rules.mode,
        COUNTER_TCP,
        COUNTER_OTHER,
    ));
    out.push_str("\t}\n\n");
    let _ = writeln!(
        out,
        "\tchain {EGRESS6_CHAIN} {{\n\t\tiif . ip6 saddr @{EXEMPT6_SET} return\n\t\tip6 daddr @{ALLOWED6_SET} return\n\t\tip6 daddr @{CONTAINERS6_SET} return"
    );
    out.push_str(&rule_hooks_text(&rules.rule_set, "ip6"));
    out.push_str(&reject_or_log_text(
        table,
        rules.mode,
        COUNTER6_TCP,
        COUNTER6_OTHER,
    ));
    out.push_str("\t}\n");
    for (chain, lines) in rule_chains_as(&rules.rule_set, rule_text) {
        let _ = write!(out, "\n\tchain {chain} {{\n");
        for line in lines {
            let _ = writeln!(out, "\t\t{line}");
        }
        out.push_str("\t}\n");
    }
    if let Some(dns) = &rules.dns {
        let overlay = text_network(rules.overlay);
        let port = dns.port;
        let _ = writeln!(
            out,
            "\n\tchain {DNS_CHAIN} {{\n\t\ttype nat hook prerouting priority {}; policy accept;\n\t\tiif . ip saddr @{EXEMPT_SET} return\n\t\tip saddr {overlay} udp dport {DNS_PORT} redirect to :{port}\n\t\tip saddr {overlay} tcp dport {DNS_PORT} redirect to :{port}\n\t}}",
            nat_priority(DNS_PRIORITY)
        );
        let limit = format!(
            "limit rate over {}/second burst {} packets",
            dns.per_container_qps, dns.per_container_burst
        );
        let syn = "tcp flags syn / syn,ack";
        let drop = format!("counter name \"{COUNTER_DNS_RATE_LIMITED}\" drop");
        let limits = if dns.per_element_limits {
            format!(
                "\t\tip saddr {overlay} udp dport {DNS_PORT} update @{DNS_BUDGET_SET} {{ iif {limit} }} {drop}\n\t\tip saddr {overlay} tcp dport {DNS_PORT} {syn} update @{DNS_BUDGET_SET} {{ iif {limit} }} {drop}\n\t\tip saddr {overlay} udp dport {DNS_PORT} iif != @{DNS_BUDGET_SET} {limit} {drop}\n\t\tip saddr {overlay} tcp dport {DNS_PORT} {syn} iif != @{DNS_BUDGET_SET} {limit} {drop}\n"
            )
        } else {
            let cell = format!(
                "limit rate over {}/second burst {} packets",
                u64::from(dns.per_container_qps) * u64::from(DNS_FALLBACK_SHARE),
                dns.per_container_burst.saturating_mul(DNS_FALLBACK_SHARE)
            );
            format!(
                "\t\tip saddr {overlay} udp dport {DNS_PORT} {cell} {drop}\n\t\tip saddr {overlay} tcp dport {DNS_PORT} {syn} {cell} {drop}\n"
            )
        };
        let _ = writeln!(
            out,
            "\n\tchain {DNS_GUARD_CHAIN} {{\n\t\ttype filter hook prerouting priority raw; policy accept;\n\t\tiif . ip saddr @{EXEMPT_SET} return\n\t\tiif . ip6 saddr @{EXEMPT6_SET} return\n{limits}\t\tmeta nfproto ipv6 meta iifkind \"veth\" udp dport {DNS_PORT} counter name \"{COUNTER_DNS6_DROPPED}\" drop\n\t\tmeta nfproto ipv6 meta iifkind \"veth\" tcp dport {DNS_PORT} counter name \"{COUNTER_DNS6_DROPPED}\" drop\n\t}}"
        );
    }
    out.push_str("}\n");
    out
}

/// A scope map in `nft list` notation, elements by interface index, five to a line.
fn map_text(kind: ScopeKind, rules: &DesiredRules, links: &BTreeMap<u32, String>) -> String {
    let mut out = format!(
        "\tmap {} {{\n\t\ttype iface_index : verdict\n",
        scope_map(kind)
    );
    let items: Vec<String> = scope_items(kind, rules)
        .map(|(ifindex, id)| {
            format!(
                "{} : jump {}",
                interface(ifindex, links).0,
                scope_chain(kind, id)
            )
        })
        .collect();
    if !items.is_empty() {
        let _ = writeln!(out, "\t\t{}", elements_text(&items, 5));
    }
    out.push_str("\t}\n\n");
    out
}

/// `kind`'s scope elements in the order nft lists them: by interface index.
fn scope_items<'a>(
    kind: ScopeKind,
    rules: &'a DesiredRules,
) -> impl Iterator<Item = (u32, &'a str)> + 'a {
    rules
        .scopes
        .iter()
        .filter(move |((k, _), _)| *k == kind)
        .map(|((_, ifindex), id)| (*ifindex, &**id))
}

/// The egress chains' jumps to the `[[rules]]` chains (for `family` "ip" or "ip6").
fn rule_hooks_text(rule_set: &RuleSet, family: &str) -> String {
    let mut out = String::new();
    for (_, mark) in rule_set.host_marks() {
        let _ = writeln!(
            out,
            "\t\tct state established,related ct mark & {:#010x} == {:#010x} accept",
            HOST_MARK_MASK,
            host_mark_bits(*mark)
        );
    }
    if !rule_set.unscoped().is_empty() {
        let _ = writeln!(out, "\t\tjump {UNSCOPED_CHAIN}");
    }
    for kind in ScopeKind::ALL {
        if !rule_set.scopes(kind).is_empty() {
            let _ = writeln!(out, "\t\tiif vmap @{}", scope_map(kind));
        }
    }
    if !rule_set.host_marks().is_empty() {
        let map = learned_map(family == "ip6");
        let _ = writeln!(out, "\t\tiif . {family} daddr vmap @{map}");
    }
    out
}

/// The `[[rules]]` chains and their rules, in creation order, each rule as `each` prints it.
fn rule_chains_as<T>(
    rule_set: &RuleSet,
    each: impl Fn(&EgressRule, Option<u16>) -> Vec<T>,
) -> Vec<(String, Vec<T>)> {
    let mark = |i: usize| {
        rule_set
            .host_marks()
            .iter()
            .find(|(index, _)| *index == i)
            .map(|(_, m)| *m)
    };
    chains_of_rules(rule_set)
        .into_iter()
        .map(|(chain, indices)| {
            let lines = indices
                .iter()
                .flat_map(|i| each(&rule_set.rules[*i], mark(*i)))
                .collect();
            (chain, lines)
        })
        .collect()
}

/// A hostname rule's host chain lines as nft lists them (`mark` its connection mark): nft
/// prints the `&` operand of `ct mark set` as the kernel's mask with the set bits or'ed in.
fn host_rule_text(rule: &EgressRule, mark: u16) -> Vec<String> {
    let set = format!(
        "ct mark set ct mark & {:#010x} | {:#010x} accept",
        !HOST_MARK_MASK | host_mark_bits(mark),
        host_mark_bits(mark)
    );
    host_rule_heads(rule)
        .into_iter()
        .map(|head| match head {
            Some(head) => format!("{head} {set}"),
            None => set.clone(),
        })
        .collect()
}

/// The match before a host chain's mark: `tcp dport 443`, `meta l4proto icmp`, or none.
fn host_rule_heads(rule: &EgressRule) -> Vec<Option<String>> {
    match rule.protocol {
        Protocol::All => vec![None],
        Protocol::Icmp => vec![
            Some("meta l4proto icmp".into()),
            Some("meta l4proto ipv6-icmp".into()),
        ],
        p if rule.ports.is_empty() => vec![Some(format!("meta l4proto {p}"))],
        p => rule
            .ports
            .iter()
            .map(|range| Some(format!("{p} dport {}", ports_text(&[*range]))))
            .collect(),
    }
}

/// The same in nft's JSON notation.
fn host_rule_json(rule: &EgressRule, mark: u16) -> Vec<Value> {
    let bits = host_mark_bits(mark);
    let set = json!({ "mangle": { "key": { "ct": { "key": "mark" } }, "value": { "|": [ { "&": [ { "ct": { "key": "mark" } }, !HOST_MARK_MASK | bits ] }, bits ] } } });
    let heads: Vec<Option<Value>> = match rule.protocol {
        Protocol::All => vec![None],
        Protocol::Icmp => ["icmp", "ipv6-icmp"]
            .into_iter()
            .map(|p| Some(json!({ "match": { "op": "==", "left": { "meta": { "key": "l4proto" } }, "right": p } })))
            .collect(),
        p if rule.ports.is_empty() => vec![Some(
            json!({ "match": { "op": "==", "left": { "meta": { "key": "l4proto" } }, "right": p.as_str() } }),
        )],
        p => rule
            .ports
            .iter()
            .map(|&(first, last)| Some(json_dport(p.as_str(), first, last)))
            .collect(),
    };
    heads
        .into_iter()
        .map(|head| {
            let mut exprs: Vec<Value> = head.into_iter().collect();
            exprs.extend([set.clone(), json!({ "accept": null })]);
            Value::Array(exprs)
        })
        .collect()
}

/// The protocol nft names for a rule (`meta l4proto` or the `dport` payload's); None for all.
fn protocol_name(rule: &EgressRule) -> Option<&'static str> {
    match rule.protocol {
        Protocol::All => None,
        Protocol::Icmp if rule.destination.is_ipv6() => Some("ipv6-icmp"),
        other => Some(other.as_str()),
    }
}

/// One `[[rules]]` entry as nft lists the kernel rules it becomes (one per port range).
fn rule_text(rule: &EgressRule, mark: Option<u16>) -> Vec<String> {
    match (mark, &rule.destination) {
        (Some(mark), _) => return host_rule_text(rule, mark),
        (None, Destination::Hostname(_)) => return Vec::new(),
        _ => {}
    }
    let family = if rule.destination.is_ipv6() {
        "ip6"
    } else {
        "ip"
    };
    let head = format!("{family} daddr {}", rule.destination);
    let protocol = protocol_name(rule);
    if rule.ports.is_empty() {
        return vec![match protocol {
            Some(p) => format!("{head} meta l4proto {p} accept"),
            None => format!("{head} accept"),
        }];
    }
    let protocol = protocol.unwrap_or_default();
    rule.ports
        .iter()
        .map(|range| format!("{head} {protocol} dport {} accept", ports_text(&[*range])))
        .collect()
}

/// The same rule in nft's JSON notation.
fn rule_json(rule: &EgressRule, mark: Option<u16>) -> Vec<Value> {
    let ipv6 = rule.destination.is_ipv6();
    let family = if ipv6 { "ip6" } else { "ip" };
    let right = match (&rule.destination, mark) {
        (_, Some(mark)) => return host_rule_json(rule, mark),
        (Destination::Hostname(_), None) => return Vec::new(),
        (Destination::Network(net), None) => json_network(*net),
        (Destination::Range(first, last), None) => {
            json!({ "range": [first.to_string(), last.to_string()] })
        }
    };
    let head = json!({ "match": { "op": "==", "left": { "payload": { "protocol": family, "field": "daddr" } }, "right": right } });
    let accept = json!({ "accept": null });
    let protocol = protocol_name(rule);
    if rule.ports.is_empty() {
        let mut exprs = vec![head];
        if let Some(p) = protocol {
            exprs.push(json!({ "match": { "op": "==", "left": { "meta": { "key": "l4proto" } }, "right": p } }));
        }
        exprs.push(accept);
        return vec![Value::Array(exprs)];
    }
    rule.ports
        .iter()
        .map(|&(first, last)| {
            json!([
                head,
                json_dport(protocol.unwrap_or_default(), first, last),
                accept,
            ])
        })
        .collect()
}

/// `<protocol> dport <first>[-<last>]` in nft's JSON notation.
fn json_dport(protocol: &str, first: u16, last: u16) -> Value {
    let port = if first == last {
        json!(first)
    } else {
        json!({ "range": [first, last] })
    };
    json!({ "match": { "op": "==", "left": { "payload": { "protocol": protocol, "field": "dport" } }, "right": port } })
}

/// The egress chains' jumps to the `[[rules]]` chains in nft's JSON notation.
fn rule_hooks_json(rule_set: &RuleSet, family: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for (_, mark) in rule_set.host_marks() {
        out.push(json!([
            { "match": { "op": "in", "left": { "ct": { "key": "state" } }, "right": ["established", "related"] } },
            { "match": { "op": "==", "left": { "&": [ { "ct": { "key": "mark" } }, HOST_MARK_MASK ] }, "right": host_mark_bits(*mark) } },
            { "accept": null },
        ]));
    }
    if !rule_set.unscoped().is_empty() {
        out.push(json!([{ "jump": { "target": UNSCOPED_CHAIN } }]));
    }
    for kind in ScopeKind::ALL {
        if !rule_set.scopes(kind).is_empty() {
            out.push(json!([{ "vmap": { "key": { "meta": { "key": "iif" } }, "data": format!("@{}", scope_map(kind)) } }]));
        }
    }
    if !rule_set.host_marks().is_empty() {
        let map = learned_map(family == "ip6");
        out.push(json!([{ "vmap": { "key": { "concat": [ { "meta": { "key": "iif" } }, { "payload": { "protocol": family, "field": "daddr" } } ] }, "data": format!("@{map}") } }]));
    }
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
        "\t\tcounter name \"{COUNTER_BLOCKED}\" update @{REPORT_BUDGET_SET} {{ iif limit rate {REPORT_RATE_PER_CONTAINER}/second burst {REPORT_BURST_PER_CONTAINER} packets }} limit rate {LOG_RATE_PER_SECOND}/second burst {LOG_BURST} packets counter name \"{COUNTER_LOGGED}\" log prefix \"{}\" group {NFLOG_GROUP}\n",
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
        { "set": {
            "op": "update", "elem": { "meta": { "key": "iif" } },
            "set": format!("@{REPORT_BUDGET_SET}"),
            "stmt": [ { "limit": {
                "rate": REPORT_RATE_PER_CONTAINER, "burst": REPORT_BURST_PER_CONTAINER,
                "per": "second",
            } } ],
        } },
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

/// The `dns_guard` chain's rules in nft's JSON notation.
fn dns_guard_json(overlay: Value, dns: &DnsRules) -> Vec<Value> {
    let exempt = |protocol: &str, set: &str| {
        json!([
            { "match": { "op": "==", "left": { "concat": [ { "meta": { "key": "iif" } }, { "payload": { "protocol": protocol, "field": "saddr" } } ] }, "right": format!("@{set}") } },
            { "return": null },
        ])
    };
    let limit = json!({ "limit": {
        "rate": dns.per_container_qps, "burst": dns.per_container_burst, "per": "second",
        "inv": true,
    } });
    let query = |protocol: &str| {
        let mut matches = vec![
            json!({ "match": { "op": "==", "left": { "payload": { "protocol": "ip", "field": "saddr" } }, "right": overlay.clone() } }),
            json!({ "match": { "op": "==", "left": { "payload": { "protocol": protocol, "field": "dport" } }, "right": DNS_PORT } }),
        ];
        if protocol == "tcp" {
            matches.push(json!({ "match": { "op": "==", "left": { "&": [ { "payload": { "protocol": "tcp", "field": "flags" } }, ["syn", "ack"] ] }, "right": "syn" } }));
        }
        matches
    };
    let drop = |counter: &str| [json!({ "counter": counter }), json!({ "drop": null })];
    let mut rules = vec![exempt("ip", EXEMPT_SET), exempt("ip6", EXEMPT6_SET)];
    if !dns.per_element_limits {
        let cell = json!({ "limit": {
            "rate": u64::from(dns.per_container_qps) * u64::from(DNS_FALLBACK_SHARE),
            "burst": dns.per_container_burst.saturating_mul(DNS_FALLBACK_SHARE),
            "per": "second", "inv": true,
        } });
        for protocol in ["udp", "tcp"] {
            let mut exprs = query(protocol);
            exprs.push(cell.clone());
            exprs.extend(drop(COUNTER_DNS_RATE_LIMITED));
            rules.push(Value::Array(exprs));
        }
    }
    for protocol in ["udp", "tcp"]
        .into_iter()
        .filter(|_| dns.per_element_limits)
    {
        let mut exprs = query(protocol);
        exprs.push(json!({ "set": {
            "op": "update", "elem": { "meta": { "key": "iif" } },
            "set": format!("@{DNS_BUDGET_SET}"), "stmt": [limit.clone()],
        } }));
        exprs.extend(drop(COUNTER_DNS_RATE_LIMITED));
        rules.push(Value::Array(exprs));
    }
    for protocol in ["udp", "tcp"]
        .into_iter()
        .filter(|_| dns.per_element_limits)
    {
        let mut exprs = query(protocol);
        exprs.push(json!({ "match": { "op": "!=", "left": { "meta": { "key": "iif" } }, "right": format!("@{DNS_BUDGET_SET}") } }));
        exprs.push(limit.clone());
        exprs.extend(drop(COUNTER_DNS_RATE_LIMITED));
        rules.push(Value::Array(exprs));
    }
    for protocol in ["udp", "tcp"] {
        let mut exprs = vec![
            json!({ "match": { "op": "==", "left": { "meta": { "key": "nfproto" } }, "right": "ipv6" } }),
            json!({ "match": { "op": "==", "left": { "meta": { "key": "iifkind" } }, "right": "veth" } }),
            json!({ "match": { "op": "==", "left": { "payload": { "protocol": protocol, "field": "dport" } }, "right": DNS_PORT } }),
        ];
        exprs.extend(drop(COUNTER_DNS6_DROPPED));
        rules.push(Value::Array(exprs));
    }
    rules
}

/// A duration as nft lists it (whole units: `1m`, `90s`, `1h`).
fn nft_duration(ms: u64) -> String {
    let seconds = ms / 1000;
    match seconds {
        s if s % 3600 == 0 && s > 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
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
        let mut containers6 = json!({
            "family": FAMILY, "name": CONTAINERS6_SET, "table": t, "type": "ipv6_addr",
        });
        if !rules.containers6.is_empty() {
            containers6["elem"] = rules.containers6.iter().map(|ip| ip.to_string()).collect();
        }
        objects.push(json!({ "set": containers6 }));
        for set in [REPORT_BUDGET_SET, DNS_BUDGET_SET] {
            objects.push(json!({ "set": {
                "family": FAMILY, "name": set, "table": t, "type": "iface_index",
                "size": REPORT_BUDGET_SIZE, "flags": ["timeout"],
                "timeout": REPORT_BUDGET_TIMEOUT_MS / 1000,
            }}));
        }
        for kind in ScopeKind::ALL {
            let mut map = json!({
                "family": FAMILY, "name": scope_map(kind), "table": t, "type": "iface_index",
                "map": "verdict",
            });
            let elements: Vec<Value> = scope_items(kind, rules)
                .map(|(ifindex, id)| {
                    json!([interface(ifindex, links).1, { "jump": { "target": scope_chain(kind, id) } }])
                })
                .collect();
            if !elements.is_empty() {
                map["elem"] = Value::Array(elements);
            }
            objects.push(json!({ "map": map }));
        }
        for (name, addr) in [(LEARNED4_MAP, "ipv4_addr"), (LEARNED6_MAP, "ipv6_addr")] {
            objects.push(json!({ "map": {
                "family": FAMILY, "name": name, "table": t, "type": ["iface_index", addr],
                "map": "verdict", "size": LEARNED_MAP_SIZE, "flags": ["timeout"],
            }}));
        }
        objects.push(json!({ "chain": {
            "family": FAMILY, "table": t, "name": FORWARD_CHAIN, "type": "filter",
            "hook": "forward", "prio": FORWARD_PRIORITY, "policy": "accept",
        }}));
        objects.push(json!({ "chain": { "family": FAMILY, "table": t, "name": EGRESS_CHAIN } }));
        objects.push(json!({ "chain": { "family": FAMILY, "table": t, "name": EGRESS6_CHAIN } }));
        let rule_chains = rule_chains_as(&rules.rule_set, rule_json);
        for (chain, _) in &rule_chains {
            objects.push(json!({ "chain": { "family": FAMILY, "table": t, "name": chain } }));
        }
        if rules.dns.is_some() {
            objects.push(json!({ "chain": {
                "family": FAMILY, "table": t, "name": DNS_CHAIN, "type": "nat",
                "hook": "prerouting", "prio": DNS_PRIORITY, "policy": "accept",
            }}));
            objects.push(json!({ "chain": {
                "family": FAMILY, "table": t, "name": DNS_GUARD_CHAIN, "type": "filter",
                "hook": "prerouting", "prio": RAW_PRIORITY, "policy": "accept",
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
        for expr in rule_hooks_json(&rules.rule_set, "ip") {
            objects.push(rule(EGRESS_CHAIN, expr));
        }
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
                { "match": { "op": "==", "left": { "payload": { "protocol": "ip6", "field": "daddr" } }, "right": format!("@{CONTAINERS6_SET}") } },
                { "return": null },
            ]),
        ));
        for expr in rule_hooks_json(&rules.rule_set, "ip6") {
            objects.push(rule(EGRESS6_CHAIN, expr));
        }
        for expr in reject_or_log_json(*table, rules.mode, COUNTER6_TCP, COUNTER6_OTHER) {
            objects.push(rule(EGRESS6_CHAIN, expr));
        }
        for (chain, exprs) in rule_chains {
            for expr in exprs {
                objects.push(rule(&chain, expr));
            }
        }
        if let Some(dns) = &rules.dns {
            let port = dns.port;
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
            for expr in dns_guard_json(overlay.clone(), dns) {
                objects.push(rule(DNS_GUARD_CHAIN, expr));
            }
        }
    }
    json!({ "nftables": objects })
}

#[cfg(test)]
mod tests;
