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
        rule_set: Default::default(),
        scopes: Default::default(),
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

\tmap scope_org {
\t\ttype iface_index : verdict
\t}

\tmap scope_space {
\t\ttype iface_index : verdict
\t}

\tmap learned4 {
\t\ttype iface_index . ipv4_addr : verdict
\t\tsize 65536
\t\tflags timeout
\t}

\tmap learned6 {
\t\ttype iface_index . ipv6_addr : verdict
\t\tsize 65536
\t\tflags timeout
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
    // Per table: 36 objects as without DNS, plus the two chains and their 3 + 8 rules.
    assert_eq!(objects.len(), 98);
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
    // Per table: table, 8 counters, 11 sets and maps, 3 chains, 13 rules.
    assert_eq!(objects.len(), 72);
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
        objects[36 + 27]["rule"]["expr"][4],
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
    // table, 8 counters, 11 sets and maps, 3 chains, 9 rules (4 IPv4, 5 IPv6).
    assert_eq!(objects.len(), 32);
    assert!(!json.to_string().contains("\"reject\""));
}

/// `[[rules]]` as nft 1.0.6 lists them (`nft list ruleset` of the same rules loaded with
/// `nft -f`): the egress chains' jumps, the maps and the chains of each scope.
#[test]
fn scoped_rules_text_is_what_nft_lists() {
    let config = crate::config::Config::parse(
        r#"
        [[rules]]
        destination = "10.1.0.1-10.1.0.9"
        [[rules]]
        destination = "172.16.0.0/24"
        protocol = "tcp"
        ports = "5432,6379-6380"
        orgs = ["a"]
        [[rules]]
        destination = "2001:db8:1::/48"
        protocol = "udp"
        ports = "53"
        orgs = ["a"]
        [[rules]]
        destination = "2001:db8:1::5-2001:db8:1::9"
        protocol = "icmp"
        orgs = ["a"]
        [[rules]]
        destination = "192.0.2.7"
        protocol = "icmp"
        orgs = ["a"]
        [[rules]]
        destination = "10.240.0.0/12"
        orgs = ["a"]
        "#,
    )
    .expect("valid rules");
    let mut desired = rules(&["10.0.0.0/8"], &[]);
    desired.rule_set = std::sync::Arc::new(crate::policy::RuleSet::new(config.rules));
    for ifindex in [1, 12, 13, 256, 2, 300, 5, 77, 1000] {
        std::sync::Arc::make_mut(&mut desired.scopes)
            .insert((crate::policy::ScopeKind::Org, ifindex), "a".into());
    }
    let links = BTreeMap::from([(1, "lo".to_string())]);
    let text = table_text(AgentTable::Persistent, &desired, &links);
    for expected in [
        "\tmap scope_org {\n\t\ttype iface_index : verdict\n\t\telements = { \"lo\" : jump org_a, 2 : jump org_a, 5 : jump org_a, 12 : jump org_a, 13 : jump org_a,\n\t\t\t     77 : jump org_a, 256 : jump org_a, 300 : jump org_a, 1000 : jump org_a }\n\t}\n\n\tmap scope_space {\n\t\ttype iface_index : verdict\n\t}\n\n",
        "\t\tip daddr @allowed return\n\t\tjump rules_all\n\t\tiif vmap @scope_org\n\t\tcounter name \"blocked\"",
        "\t\tip6 daddr @containers6 return\n\t\tjump rules_all\n\t\tiif vmap @scope_org\n\t\tcounter name \"blocked\"",
        "\n\tchain rules_all {\n\t\tip daddr 10.1.0.1-10.1.0.9 accept\n\t}\n",
        "\n\tchain org_a {
\t\tip daddr 172.16.0.0/24 tcp dport 5432 accept
\t\tip daddr 172.16.0.0/24 tcp dport 6379-6380 accept
\t\tip6 daddr 2001:db8:1::/48 udp dport 53 accept
\t\tip6 daddr 2001:db8:1::5-2001:db8:1::9 meta l4proto ipv6-icmp accept
\t\tip daddr 192.0.2.7 meta l4proto icmp accept
\t\tip daddr 10.240.0.0/12 accept
\t}\n}\n",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    let json = to_json(&[AgentTable::Persistent], &desired, &links);
    let objects = json["nftables"].as_array().expect("array");
    let map = objects
        .iter()
        .find(|o| o["map"]["name"] == "scope_org")
        .expect("the org map");
    assert_eq!(map["map"]["map"], "verdict");
    assert_eq!(
        map["map"]["elem"][0],
        json!(["lo", { "jump": { "target": "org_a" } }])
    );
    let org_rules: Vec<&Value> = objects
        .iter()
        .filter(|o| o["rule"]["chain"] == "org_a")
        .collect();
    assert_eq!(org_rules.len(), 6);
    assert_eq!(
        org_rules[1]["rule"]["expr"],
        json!([
            { "match": { "op": "==", "left": { "payload": { "protocol": "ip", "field": "daddr" } }, "right": { "prefix": { "addr": "172.16.0.0", "len": 24 } } } },
            { "match": { "op": "==", "left": { "payload": { "protocol": "tcp", "field": "dport" } }, "right": { "range": [6379, 6380] } } },
            { "accept": null },
        ])
    );
    assert_eq!(
        org_rules[3]["rule"]["expr"][1],
        json!({ "match": { "op": "==", "left": { "meta": { "key": "l4proto" } }, "right": "ipv6-icmp" } })
    );
    let vmap = objects
        .iter()
        .find(|o| o["rule"]["expr"][0].get("vmap").is_some())
        .expect("a vmap rule");
    assert_eq!(
        vmap["rule"]["expr"][0],
        json!({ "vmap": { "key": { "meta": { "key": "iif" } }, "data": "@scope_org" } })
    );
}
