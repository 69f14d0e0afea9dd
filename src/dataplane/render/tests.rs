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
        containers6: ["fd00::4", "fd00::1:3", "2001:db8::5"]
            .iter()
            .map(|ip| ip.parse().expect("literal"))
            .collect(),
        dns: None,
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

\tcounter dns_rate_limited {
\t}

\tcounter dns6_dropped {
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

\tset containers6 {
\t\ttype ipv6_addr
\t\telements = { 2001:db8::5,
\t\t\t     fd00::4,
\t\t\t     fd00::1:3 }
\t}

\tset report_budget {
\t\ttype iface_index
\t\tsize 4096
\t\tflags dynamic,timeout
\t\ttimeout 1m
\t}

\tset dns_budget {
\t\ttype iface_index
\t\tsize 4096
\t\tflags dynamic,timeout
\t\ttimeout 1m
\t}

\tchain forward {
\t\ttype filter hook forward priority filter - 10; policy accept;
\t\tip saddr 10.255.0.0/16 jump overlay_egress
\t\tmeta nfproto ipv6 meta iifkind \"veth\" jump overlay6_egress
\t}

\tchain overlay_egress {
\t\tiif . ip saddr @exempt return
\t\tip daddr @allowed return
\t\tcounter name \"blocked\" update @report_budget { iif limit rate 20/second burst 20 packets } limit rate 200/second burst 100 packets counter name \"blocked_logged\" log prefix \"egress_guard\" group 9851
\t\tmeta l4proto tcp counter name \"rejected_tcp\" reject with tcp reset
\t\tcounter name \"rejected_other\" reject with icmpx admin-prohibited
\t}

\tchain overlay6_egress {
\t\tiif . ip6 saddr @exempt6 return
\t\tip6 daddr @allowed6 return
\t\tip6 daddr @containers6 return
\t\tcounter name \"blocked\" update @report_budget { iif limit rate 20/second burst 20 packets } limit rate 200/second burst 100 packets counter name \"blocked_logged\" log prefix \"egress_guard\" group 9851
\t\tmeta l4proto tcp counter name \"rejected6_tcp\" reject with tcp reset
\t\tcounter name \"rejected6_other\" reject with icmpx admin-prohibited
\t}
}
";
    assert_eq!(text, expected);
}

/// What nft 1.0.6 printed for the DNS chains (`[dns] enabled`, listen port 9853, the default
/// per-container rate).
#[test]
fn dns_chain_text_is_what_nft_lists() {
    let mut with_dns = rules(&["10.0.0.0/8"], &[]);
    let without = table_text(AgentTable::Persistent, &with_dns, &BTreeMap::new());
    with_dns.dns = Some(crate::policy::DnsRules::on_port(9853));
    let text = table_text(AgentTable::Persistent, &with_dns, &BTreeMap::new());
    let chain = "
\tchain dns_redirect {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiif . ip saddr @exempt return
\t\tip saddr 10.255.0.0/16 udp dport 53 redirect to :9853
\t\tip saddr 10.255.0.0/16 tcp dport 53 redirect to :9853
\t}

\tchain dns_guard {
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tiif . ip saddr @exempt return
\t\tiif . ip6 saddr @exempt6 return
\t\tip saddr 10.255.0.0/16 udp dport 53 update @dns_budget { iif limit rate over 200/second burst 400 packets } counter name \"dns_rate_limited\" drop
\t\tip saddr 10.255.0.0/16 tcp dport 53 tcp flags syn / syn,ack update @dns_budget { iif limit rate over 200/second burst 400 packets } counter name \"dns_rate_limited\" drop
\t\tip saddr 10.255.0.0/16 udp dport 53 iif != @dns_budget limit rate over 200/second burst 400 packets counter name \"dns_rate_limited\" drop
\t\tip saddr 10.255.0.0/16 tcp dport 53 tcp flags syn / syn,ack iif != @dns_budget limit rate over 200/second burst 400 packets counter name \"dns_rate_limited\" drop
\t\tmeta nfproto ipv6 meta iifkind \"veth\" udp dport 53 counter name \"dns6_dropped\" drop
\t\tmeta nfproto ipv6 meta iifkind \"veth\" tcp dport 53 counter name \"dns6_dropped\" drop
\t}
}
";
    let expected = format!("{}{chain}", without.strip_suffix("}\n").expect("table end"));
    assert_eq!(text, expected);
    let json = to_json(&AgentTable::ALL, &with_dns, &BTreeMap::new());
    let objects = json["nftables"].as_array().expect("array");
    // Per table: 32 objects as without DNS, plus the two chains and their 3 + 8 rules.
    assert_eq!(objects.len(), 90);
    let chain = objects
        .iter()
        .find(|o| o["chain"]["name"] == DNS_CHAIN)
        .expect("the DNS chain");
    assert_eq!(chain["chain"]["prio"], -100);
    let redirect = objects
        .iter()
        .find(|o| o["rule"]["chain"] == DNS_CHAIN && o["rule"]["expr"][2].get("redirect").is_some())
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
    // Per table: table, 8 counters, 7 sets, 3 chains, 13 rules.
    assert_eq!(objects.len(), 64);
    assert_eq!(
        objects[10]["set"]["elem"],
        json!([{ "concat": ["12", "10.255.1.4"] }])
    );
    assert_eq!(
        objects[9]["set"]["elem"],
        json!([{ "prefix": { "addr": "10.0.0.0", "len": 8 } }])
    );
    assert_eq!(
        objects[11]["set"]["elem"],
        json!([{ "prefix": { "addr": "fd00::", "len": 8 } }])
    );
    assert_eq!(
        objects[12]["set"]["elem"],
        json!([{ "concat": ["12", "fd00::4"] }])
    );
    assert_eq!(
        objects[32 + 23]["rule"]["expr"][4],
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
    // table, 8 counters, 7 sets, 3 chains, 9 rules (4 IPv4, 5 IPv6).
    assert_eq!(objects.len(), 28);
    assert!(!json.to_string().contains("\"reject\""));
}
