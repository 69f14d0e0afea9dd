//! Root integration tests of `[[rules]]`: rules scoped to orgs and spaces on a simulated cell
//! with containers of two orgs, the real agent binary, real packets counted where they arrive.
//!
//! Run (as root): `cargo test --test rules -- --include-ignored`

use egress_guard_testkit as support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::cell::{Cell, INET_HOST};
use support::probe::{self, TCP_PORT, TcpOutcome, UDP_PORT, UdpOutcome};
use support::store::Kind;
use support::wait_until;

const READY: Duration = Duration::from_secs(10);

const ORG_A: &str = "0a0a0a0a-0000-4000-8000-00000000000a";
const ORG_B: &str = "0b0b0b0b-0000-4000-8000-00000000000b";
const SPACE_B1: &str = "5b1b1b1b-0000-4000-8000-0000000000b1";
const SPACE_B2: &str = "5b2b2b2b-0000-4000-8000-0000000000b2";

/// Org A may reach the internet host over TCP on the probe's port only; space B1 (in org B)
/// over UDP on the probe's port only; every restricted container may ping it. Nothing else.
fn rules() -> String {
    format!(
        r#"[[rules]]
description = "org A: the partner's TCP service"
destination = "{INET_HOST}"
protocol = "tcp"
ports = "{TCP_PORT}"
orgs = ["{ORG_A}"]

[[rules]]
description = "space B1: the partner's UDP service"
destination = "203.0.113.1-203.0.113.15"
protocol = "udp"
ports = "{UDP_PORT},9999-10001"
spaces = ["{SPACE_B1}"]

[[rules]]
description = "everyone: ping the partner"
destination = "203.0.113.0/24"
protocol = "icmp"
"#
    )
}

/// What one container got through to the internet host, by protocol, judged by what arrived.
#[derive(Debug, PartialEq, Eq)]
struct Got {
    tcp: bool,
    udp: bool,
    icmp: bool,
}

/// Probes the internet host from `name` once per protocol, and checks each answer against
/// what arrived there: a protocol counts as open only when the packets arrived and the answer
/// came back, and as closed only when nothing arrived.
fn probe_inet(cell: &Cell, name: &str) -> Got {
    let ctr = cell.ctr(name).clone();
    let before = |proto| cell.inet_ingress(ctr.ip, proto);
    let (tcp0, udp0, icmp0) = (before("tcp"), before("udp"), before("icmp"));
    let (tcp, _) = probe::tcp(&ctr.ns, SocketAddr::new(IpAddr::V4(INET_HOST), TCP_PORT));
    let (udp, _) = probe::udp(&ctr.ns, SocketAddr::new(IpAddr::V4(INET_HOST), UDP_PORT));
    let (icmp, _) = probe::ping(&ctr.ns, INET_HOST);
    let arrived = |proto, before| cell.inet_ingress(ctr.ip, proto) - before;
    let got = Got {
        tcp: tcp == TcpOutcome::Echoed,
        udp: udp == UdpOutcome::Echoed,
        icmp,
    };
    for (proto, open, count) in [
        ("tcp", got.tcp, arrived("tcp", tcp0)),
        ("udp", got.udp, arrived("udp", udp0)),
        ("icmp", got.icmp, arrived("icmp", icmp0)),
    ] {
        assert_eq!(
            count > 0,
            open,
            "{name} {proto}: {count} packets arrived, answer {}",
            if open { "came back" } else { "did not" }
        );
    }
    if !got.tcp {
        assert!(
            matches!(tcp, TcpOutcome::Refused(d) if d < probe::FAST_REJECT),
            "{name}: a rejected TCP connect is reset at once: {tcp:?}"
        );
    }
    got
}

/// Starts the agent and waits for its first pass (the staging container exempted).
fn start_and_wait(cell: &mut Cell, config: &support::agent::AgentConfig) {
    let stg = cell.ctr("stg").ip;
    cell.start_agent_with(config);
    cell.wait_exempt(&[stg], READY);
}

fn scoped_cell() -> Cell {
    let mut cell = Cell::new();
    for (name, org, space) in [
        (
            "a1",
            Some(ORG_A),
            Some("5a1a1a1a-0000-4000-8000-0000000000a1"),
        ),
        ("b1", Some(ORG_B), Some(SPACE_B1)),
        ("b2", Some(ORG_B), Some(SPACE_B2)),
        ("none", None, None),
    ] {
        cell.add_container(name, Kind::App);
        cell.set_org_space(name, org, space);
    }
    cell.add_container("stg", Kind::Staging);
    for name in ["a1", "b1", "b2", "none", "stg"] {
        cell.watch_inet_ingress(cell.ctr(name).ip);
    }
    cell
}

/// Scoped CIDR, range, port and protocol rules allow exactly what they say and reject the
/// rest, counted at the destination: org A's container gets TCP on its port and not UDP; space
/// B1's gets UDP and not TCP; its org neighbour in space B2 and a container with no org or
/// space get neither; all four may ping (the unscoped rule); staging stays unrestricted.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn scoped_rules_allow_exactly_what_they_say() {
    support::require_root();
    let mut cell = scoped_cell();
    let mut config = cell.agent_config();
    config.rules = Some(rules());
    start_and_wait(&mut cell, &config);
    wait_until(READY, "both scope maps filled", || {
        cell.nft(&["list", "map", "inet", "egress_guard", "scope_space"])
            .contains(&format!("jump space_{SPACE_B1}"))
            && cell
                .nft(&["list", "map", "inet", "egress_guard_owned", "scope_org"])
                .contains(&format!("jump org_{ORG_A}"))
    });

    let expected = [
        (
            "a1",
            Got {
                tcp: true,
                udp: false,
                icmp: true,
            },
        ),
        (
            "b1",
            Got {
                tcp: false,
                udp: true,
                icmp: true,
            },
        ),
        (
            "b2",
            Got {
                tcp: false,
                udp: false,
                icmp: true,
            },
        ),
        (
            "none",
            Got {
                tcp: false,
                udp: false,
                icmp: true,
            },
        ),
        (
            "stg",
            Got {
                tcp: true,
                udp: true,
                icmp: true,
            },
        ),
    ];
    for (name, want) in expected {
        assert_eq!(probe_inet(&cell, name), want, "{name}");
    }

    // A port the rule does not name stays rejected for org A: nothing arrives.
    let a1 = cell.ctr("a1").clone();
    let before = cell.inet_ingress(a1.ip, "tcp");
    let (outcome, _) = probe::tcp(&a1.ns, SocketAddr::new(IpAddr::V4(INET_HOST), 9999));
    assert!(matches!(outcome, TcpOutcome::Refused(_)), "{outcome:?}");
    assert_eq!(
        cell.inet_ingress(a1.ip, "tcp"),
        before,
        "TCP 9999 from org A arrived"
    );

    // The blocked attempts name the rules in the sender's scope (none matched).
    for (name, protocol, scope) in [("a1", "udp", vec![0, 2]), ("b1", "tcp", vec![1, 2])] {
        let src = cell.ctr(name).ip.to_string();
        wait_until(READY, "the blocked attempt reported with its scope", || {
            let body = support::http::get(&cell.cell, config.health_port, "/blocked").json();
            body["attempts"].as_array().is_some_and(|rows| {
                rows.iter().any(|r| {
                    r["src"] == src.as_str()
                        && r["protocol"] == protocol
                        && r["rules_in_scope"] == serde_json::json!(scope)
                })
            })
        });
    }

    // /status lists each rule with how many containers it applies to.
    let status = support::http::get(&cell.cell, config.health_port, "/status").json();
    let listed = status["rules"].as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), 3, "{status}");
    let containers: Vec<u64> = listed
        .iter()
        .map(|r| r["containers"].as_u64().unwrap_or(u64::MAX))
        .collect();
    // Org A: a1; space B1: b1; every restricted container: a1, b1, b2, none.
    assert_eq!(containers, vec![1, 1, 4], "{status}");

    // The operator's view: `status` lists the rules, `explain` names the one that allows.
    let addr = format!("127.0.0.1:{}", config.health_port);
    let cli = |args: &[&str]| -> String {
        let out = support::cmd::ns_try_run(&cell.cell, support::agent::bin(), args, None);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let a1_ip = cell.ctr("a1").ip.to_string();
    let explained = cli(&[
        "explain",
        &a1_ip,
        &format!("{INET_HOST}:{TCP_PORT}"),
        "--addr",
        &addr,
    ]);
    assert!(
        explained.contains("ALLOWED by rules[0] \"org A: the partner's TCP service\""),
        "{explained}"
    );
    let explained = cli(&[
        "explain",
        &a1_ip,
        &format!("{INET_HOST}:{UDP_PORT}/udp"),
        "--addr",
        &addr,
    ]);
    assert!(
        explained.contains("REJECTED") && explained.contains("in scope: rules[0], rules[2]"),
        "{explained}"
    );
    let status = cli(&["status", "--addr", &addr]);
    assert!(
        status.contains("[1] 203.0.113.1-203.0.113.15 udp ports 5353,9999-10001"),
        "{status}"
    );

    // Steady state: the verify passes (every 6th, at 1 s) read the maps back as written.
    std::thread::sleep(Duration::from_secs(7));
    let health = support::http::get(&cell.cell, config.health_port, "/healthz").json();
    assert_eq!(health["drift_repairs"], 0, "{health}");
}

/// A container that moves into a scope (its entry now names org A) gets the rule with the
/// next pass, and one leaving the cell takes its map elements with it.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn a_container_gets_and_loses_its_scope_with_its_store_entry() {
    support::require_root();
    let mut cell = scoped_cell();
    let mut config = cell.agent_config();
    config.rules = Some(rules());
    start_and_wait(&mut cell, &config);
    wait_until(READY, "org A's element", || {
        cell.nft(&["list", "map", "inet", "egress_guard", "scope_org"])
            .contains(&format!("jump org_{ORG_A}"))
    });
    assert!(!probe_inet(&cell, "none").tcp);

    cell.set_org_space("none", Some(ORG_A), None);
    let host_if = cell.ctr("none").host_if.clone();
    wait_until(READY, "the moved container's element", || {
        let map = cell.nft(&["list", "map", "inet", "egress_guard", "scope_org"]);
        map.contains(&format!("\"{host_if}\" : jump org_{ORG_A}"))
    });
    assert!(probe_inet(&cell, "none").tcp, "org A's rule applies now");

    let org_elements = |cell: &Cell| {
        cell.nft(&["list", "map", "inet", "egress_guard_owned", "scope_org"])
            .matches(&format!("jump org_{ORG_A}"))
            .count()
    };
    assert_eq!(org_elements(&cell), 2, "a1 and the moved container");
    cell.remove_container("a1");
    wait_until(READY, "the removed container's element gone", || {
        org_elements(&cell) == 1
    });
}

/// The agent's configuration file rewritten with `rules` (None: no `[[rules]]`), then SIGHUP.
fn reload_with(cell: &mut Cell, config: &support::agent::AgentConfig, rules: Option<String>) {
    let mut config = config.clone();
    config.rules = rules;
    let text = config.toml(&cell.store.path());
    write_config_and_hup(cell, &text);
}

fn write_config_and_hup(cell: &mut Cell, text: &str) {
    let agent = cell.agent();
    std::fs::write(&agent.config, text).expect("rewrite the agent's config");
    nix::sys::signal::kill(agent.pid(), nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
}

fn last_reload(cell: &Cell, port: u16) -> serde_json::Value {
    support::http::get(&cell.cell, port, "/status").json()["last_reload"].clone()
}

/// SIGHUP adds a rule, refuses an invalid file, and removes the rule, while an out-of-scope
/// restricted container keeps trying the same destination (not one of its packets arrives)
/// and an in-scope one keeps sending to the VPC, which both configurations allow (every one
/// of its datagrams arrives: the switch, one batch replacing both tables, rejects nothing
/// that both allow).
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn sighup_adds_and_removes_rules_with_nothing_leaking_and_nothing_lost() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use support::cell::VPC_HOST;
    support::require_root();
    let mut cell = scoped_cell();
    let config = cell.agent_config();
    let port = config.health_port;
    start_and_wait(&mut cell, &config);
    let (a1, b2) = (cell.ctr("a1").clone(), cell.ctr("b2").clone());
    cell.watch_ingress(&cell.vpc.clone(), a1.ip);
    assert!(!probe_inet(&cell, "a1").tcp, "no rule yet");

    let stop = Arc::new(AtomicBool::new(false));
    let outsider = probe::tcp_stream(
        &b2.ns,
        SocketAddr::new(IpAddr::V4(INET_HOST), TCP_PORT),
        Duration::from_millis(2),
        stop.clone(),
    );
    let insider = probe::udp_stream(
        &a1.ns,
        SocketAddr::new(IpAddr::V4(VPC_HOST), UDP_PORT),
        stop.clone(),
    );

    // Each phase runs under traffic for a while.
    let under_traffic = || std::thread::sleep(Duration::from_millis(400));
    under_traffic();
    // 1. Add org A's rule.
    reload_with(&mut cell, &config, Some(rules()));
    wait_until(READY, "the reload to apply org A's rule", || {
        last_reload(&cell, port)["result"] == "ok" && probe_inet(&cell, "a1").tcp
    });
    under_traffic();

    // 2. An invalid file: refused, the rule stays, the agent stays ready.
    write_config_and_hup(&mut cell, "mode = \"sideways\"\n");
    wait_until(READY, "the invalid reload to be reported", || {
        last_reload(&cell, port)["result"] == "invalid"
    });
    let report = last_reload(&cell, port);
    assert!(
        report["error"]
            .as_str()
            .unwrap_or_default()
            .contains("sideways"),
        "{report}"
    );
    let ready = support::http::get(&cell.cell, port, "/readyz");
    assert_eq!(ready.code, 200, "{}", ready.body);
    assert!(probe_inet(&cell, "a1").tcp, "the running rules stay");
    let metrics = support::http::get(&cell.cell, port, "/metrics").body;
    for line in [
        "egress_guard_config_reloads_total{result=\"ok\"} 1",
        "egress_guard_config_reloads_total{result=\"invalid\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }

    under_traffic();
    // 3. Remove the rule: org A is restricted again.
    reload_with(&mut cell, &config, None);
    wait_until(READY, "the reload to remove org A's rule", || {
        !probe_inet(&cell, "a1").tcp
    });
    under_traffic();

    stop.store(true, Ordering::Relaxed);
    let outsider = outsider.join().expect("outsider stream");
    let sent = insider.join().expect("insider stream");
    std::thread::sleep(Duration::from_millis(100));
    assert!(outsider.attempts > 100, "{outsider:?}");
    assert_eq!(outsider.connected, 0, "{outsider:?}");
    assert_eq!(
        cell.inet_ingress(b2.ip, "tcp"),
        0,
        "packets of the out-of-scope container arrived"
    );
    let arrived = cell.ingress(&cell.vpc.clone(), a1.ip, "udp");
    assert!(sent > 100, "{sent} datagrams sent");
    assert_eq!(
        arrived, sent,
        "datagrams allowed before and after a switch were lost"
    );
    let log = cell.agent().log_text();
    assert!(
        log.contains("configuration reloaded"),
        "the reload is logged"
    );
    assert!(
        log.contains("replaced chains and rules in place"),
        "a reload keeps the tables and their sets"
    );
    assert!(!log.contains("repaired drift"), "a reload is not drift");
}

/// IPv6 destinations in scoped rules: org A's container reaches the internet host's IPv6
/// address over TCP on the rule's port, its org B neighbour does not (nothing arrives), on a
/// dual-stack cell.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn a_scoped_ipv6_rule_allows_its_org_only() {
    use support::cell::INET6_HOST;
    support::require_root();
    let mut cell = Cell::new_dual_stack();
    for (name, org) in [("a1", ORG_A), ("b2", ORG_B)] {
        cell.add_container(name, Kind::App);
        cell.set_org_space(name, Some(org), Some(SPACE_B2));
    }
    cell.add_container("stg", Kind::Staging);
    let mut config = cell.agent_config();
    config.rules = Some(format!(
        r#"[[rules]]
destination = "{INET6_HOST}"
protocol = "tcp"
ports = "{TCP_PORT}"
orgs = ["{ORG_A}"]
"#
    ));
    start_and_wait(&mut cell, &config);
    let target = SocketAddr::new(IpAddr::V6(INET6_HOST), TCP_PORT);
    let (a1, b2) = (cell.ctr("a1").clone(), cell.ctr("b2").clone());
    let (a1_6, b2_6) = (a1.ip6.expect("a1 has IPv6"), b2.ip6.expect("b2 has IPv6"));
    cell.watch_inet_ingress(a1_6);
    cell.watch_inet_ingress(b2_6);
    wait_until(READY, "org A's IPv6 rule to apply", || {
        probe::tcp(&a1.ns, target).0 == TcpOutcome::Echoed
    });
    assert!(cell.inet_ingress(a1_6, "tcp") > 0);
    // Other protocols to the same address stay rejected for org A.
    let (udp, _) = probe::udp(&a1.ns, SocketAddr::new(IpAddr::V6(INET6_HOST), UDP_PORT));
    assert_ne!(udp, UdpOutcome::Echoed);
    assert_eq!(cell.inet_ingress(a1_6, "udp"), 0, "org A's UDP arrived");
    // Org B: rejected, nothing arrives.
    let (tcp, _) = probe::tcp(&b2.ns, target);
    assert!(
        matches!(tcp, TcpOutcome::Refused(d) if d < probe::FAST_REJECT),
        "{tcp:?}"
    );
    assert_eq!(cell.inet_ingress(b2_6, "tcp"), 0, "org B's TCP arrived");
}
