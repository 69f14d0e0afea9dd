//! Root integration tests of IPv6 enforcement: a restricted container must not reach the internet
//! over IPv6 either.
//!
//! Run (as root): `cargo test --test ipv6 -- --include-ignored --nocapture`
//!
//! A dual-stack simulated cell ([`Cell::new_dual_stack`]): the VPC host also has
//! fd00:0:0:1::10 (inside fd00::/8, which the agent is told to allow), the internet host
//! 2001:db8:0:1::10 (documentation range), the cell forwards IPv6, and every container also has
//! an IPv6 address from host-local's second range 2001:db8:ff:7::/64 (global unicast, outside
//! fd00::/8: container-to-container IPv6 is allowed because it is container-to-container, not
//! because `allowed_networks` happens to cover it), with the /128 host route through its
//! host-side veth that ptp adds and an IPv6 default route via 2001:db8:ff:7::1. The store stays
//! IPv4, as silk writes it. What arrives is counted at the destination (an nft counter at the
//! prerouting hook of the internet namespace, per source address and protocol), so "rejected"
//! means nothing arrived, whatever the sockets reported.
//!
//! Everything happens in namespaces the tests create and always delete.

use egress_guard_testkit as support;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::cell::{
    CELL_GW6, CELL_SUBNET6, Cell, Container, INET_HOST, INET6_HOST, TABLE, VPC_HOST, VPC6_HOST,
    VPC6_NETWORK, table_blocks,
};
use support::cmd::{self, ns_try_run};
use support::http;
use support::probe::{self, Reach, TcpTally};
use support::store::Kind;

/// How long the agent may take to start and install its tables and the first exemptions.
const READY: Duration = Duration::from_secs(10);
/// The table the agent holds through its own netlink socket.
const OWNED: &str = "egress_guard_owned";
/// The discard port: nothing listens there, so a leaked SYN is answered by the destination's
/// reset and the sender tries again at once.
const SINK_PORT: u16 = 9;

// ------------------------------------------------------------------ helpers

/// A container's IPv6 address (dual-stack cells give every container one).
fn ip6(cell: &Cell, name: &str) -> Ipv6Addr {
    cell.ctr(name)
        .ip6
        .unwrap_or_else(|| panic!("container {name} has no IPv6 address"))
}

/// Packets from `src` that arrived in the internet namespace: (TCP, UDP, ICMP echo requests).
fn arrived(cell: &Cell, src: impl Into<IpAddr> + Copy) -> (u64, u64, u64) {
    (
        cell.inet_ingress(src, "tcp"),
        cell.inet_ingress(src, "udp"),
        cell.inet_ingress(src, "icmp"),
    )
}

/// Collects the outcome of every check of a test, so that one run reports every failure (and
/// every success) instead of stopping at the first.
#[derive(Default)]
struct Checks {
    lines: Vec<String>,
    failures: Vec<String>,
}

impl Checks {
    fn record(&mut self, ok: bool, what: String) {
        self.lines
            .push(format!("  {} {what}", if ok { "ok  " } else { "FAIL" }));
        if !ok {
            self.failures.push(what);
        }
    }

    /// Every protocol gets from `from` to `to` and back.
    fn open(&mut self, cell: &Cell, from: &str, to: impl Into<IpAddr>, why: &str) -> Reach {
        let r = cell.reach(from, to);
        self.record(r.is_open(), format!("expected OPEN ({why}): {r}"));
        r
    }

    /// Rejected the way the agent rejects (fast TCP reset, no UDP echo, ping unanswered, the
    /// servers saw nothing).
    fn rejected(&mut self, cell: &Cell, from: &str, to: impl Into<IpAddr>, why: &str) -> Reach {
        let r = cell.reach(from, to);
        self.record(r.is_rejected(), format!("expected REJECTED ({why}): {r}"));
        r
    }

    /// Rejected, and nothing from `from`'s IPv6 address arrived in the internet namespace
    /// (its ingress counters must be watched).
    fn rejected_to_inet6(&mut self, cell: &Cell, from: &str, why: &str) {
        let src = ip6(cell, from);
        let before = arrived(cell, src);
        let r = cell.reach(from, INET6_HOST);
        std::thread::sleep(Duration::from_millis(50));
        let after = arrived(cell, src);
        let delta = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
        self.record(
            r.is_rejected() && delta == (0, 0, 0),
            format!(
                "expected REJECTED ({why}), nothing arriving: arrived at {INET6_HOST} from {src}: \
                 {} TCP, {} UDP, {} ICMPv6 echo; {r}",
                delta.0, delta.1, delta.2
            ),
        );
    }

    fn check(&mut self, ok: bool, what: impl Into<String>) {
        self.record(ok, what.into());
    }

    #[track_caller]
    fn finish(self, test: &str) {
        let report = self.lines.join("\n");
        eprintln!("{test}:\n{report}");
        assert!(
            self.failures.is_empty(),
            "{test}: {} of {} checks failed:\n  - {}\n\nall checks:\n{report}",
            self.failures.len(),
            self.lines.len(),
            self.failures.join("\n  - ")
        );
    }
}

/// Starts the agent and waits until exactly `exempt` (container names) are exempt (IPv4 set;
/// the IPv6 exemptions are checked by traffic).
fn start_agent_and_wait(cell: &mut Cell, exempt: &[&str]) {
    let ips: Vec<_> = exempt.iter().map(|n| cell.ctr(n).ip).collect();
    cell.start_agent();
    let took = cell.wait_exempt(&ips, READY);
    eprintln!("agent ready (exempt {exempt:?}) after {took:?}");
}

/// Waits (bounded) until `from` reaches the internet over IPv6: an exemption the agent grants
/// in the same pass as the IPv4 one, or a little later. Returns the last probe.
fn wait_open6(cell: &Cell, from: &str, timeout: Duration) -> Reach {
    let start = Instant::now();
    loop {
        let r = cell.reach(from, INET6_HOST);
        if r.is_open() || start.elapsed() > timeout {
            return r;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A dual-stack cell with app, task, staging and health-check containers.
fn standard_cell() -> Cell {
    let mut cell = Cell::new_dual_stack();
    add_standard_containers(&mut cell);
    cell
}

fn add_standard_containers(cell: &mut Cell) {
    cell.add_container("app1", Kind::App);
    cell.add_container("app2", Kind::App);
    cell.add_container("task1", Kind::Task);
    cell.add_container("stg1", Kind::Staging);
    cell.add_container("chk", Kind::HealthCheck);
}

// ------------------------------------------------------------------ harness self-checks

/// The dual-stack cell is wired as documented, and without an agent every container reaches
/// the internet, the VPC and every other container over IPv6 (TCP, UDP, ICMPv6), IPv4 works as
/// in the IPv4-only cell, and the destination counters count what arrives. This is the
/// positive control of every restriction test below.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn dual_stack_cell_baseline_without_agent_everything_is_reachable() {
    let cell = standard_cell();
    let mut checks = Checks::default();
    let subnet6: ipnet::Ipv6Net = CELL_SUBNET6.parse().expect("valid prefix");
    let routes6 = cmd::ns_run(&cell.cell, "ip", &["-6", "route"]);
    for c in cell.containers() {
        let a6 = c.ip6.expect("dual-stack container has an IPv6 address");
        checks.check(
            subnet6.contains(&a6),
            format!("{}: {a6} in {CELL_SUBNET6}", c.name),
        );
        checks.check(
            !VPC6_NETWORK
                .parse::<ipnet::Ipv6Net>()
                .expect("valid")
                .contains(&a6),
            format!("{}: {a6} outside the allowed {VPC6_NETWORK}", c.name),
        );
        let routed = routes6
            .lines()
            .any(|l| l.starts_with(&format!("{a6} dev {} ", c.host_if)));
        checks.check(
            routed,
            format!(
                "{}: the cell routes {a6}/128 through {}{}",
                c.name,
                c.host_if,
                if routed {
                    String::new()
                } else {
                    format!(":\n{routes6}")
                }
            ),
        );
        let inner = cmd::ns_run(&c.ns, "ip", &["-6", "route"]);
        let default = inner
            .lines()
            .any(|l| l.starts_with(&format!("default via {CELL_GW6} dev eth0")));
        checks.check(
            default,
            format!(
                "{}: IPv6 default route via {CELL_GW6} in the container{}",
                c.name,
                if default {
                    String::new()
                } else {
                    format!(":\n{inner}")
                }
            ),
        );
        checks.open(
            &cell,
            &c.name,
            INET6_HOST,
            "baseline: container -> internet (IPv6)",
        );
        checks.open(
            &cell,
            &c.name,
            VPC6_HOST,
            "baseline: container -> VPC (IPv6)",
        );
        checks.open(
            &cell,
            &c.name,
            INET_HOST,
            "baseline: container -> internet (IPv4)",
        );
        checks.open(
            &cell,
            &c.name,
            VPC_HOST,
            "baseline: container -> VPC (IPv4)",
        );
    }
    checks.open(
        &cell,
        "app1",
        ip6(&cell, "app2"),
        "baseline: app -> app (IPv6)",
    );
    checks.open(
        &cell,
        "app1",
        ip6(&cell, "stg1"),
        "baseline: app -> staging (IPv6)",
    );
    checks.open(
        &cell,
        &cell.vpc.clone(),
        ip6(&cell, "app1"),
        "baseline: VPC host -> container (IPv6)",
    );
    checks.open(
        &cell,
        &cell.cell.clone(),
        INET6_HOST,
        "baseline: the cell itself -> internet (IPv6)",
    );
    checks.check(
        cmd::ns_run(
            &cell.cell,
            "sysctl",
            &["-n", "net.ipv6.conf.all.forwarding"],
        )
        .trim()
            == "1",
        "the cell forwards IPv6",
    );
    // The destination counters see what arrives.
    let src = ip6(&cell, "app1");
    cell.watch_inet_ingress(src);
    cell.reach("app1", INET6_HOST);
    std::thread::sleep(Duration::from_millis(50));
    let (tcp, udp, icmp) = arrived(&cell, src);
    checks.check(
        tcp >= 1 && udp >= 1 && icmp >= 1,
        format!(
            "the internet namespace counted app1's IPv6 probes: {tcp} TCP, {udp} UDP, {icmp} ICMPv6"
        ),
    );
    checks.finish("baseline");
}

/// The design under test, hand-written: the probes and counters detect IPv6 rules shaped like
/// the agent's, so a failing agent test is the agent's, not the harness's. Also
/// shows that matching on the interface kind (`veth`) works on this cell, whose uplinks are
/// not veths.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn harness_detects_a_hand_written_ipv6_reference_ruleset() {
    let mut cell = Cell::new_dual_stack();
    cell.add_container("app1", Kind::App);
    cell.add_container("app2", Kind::App);
    let stg = cell.add_container("stg1", Kind::Staging);
    install_kind_reference_ruleset(&mut cell, &stg);
    assert_eq!(cell.exempt6_ips(), Some(vec![stg.ip6.expect("IPv6")]));
    let src = ip6(&cell, "app1");
    cell.watch_inet_ingress(src);
    let mut checks = Checks::default();
    checks.rejected_to_inet6(&cell, "app1", "reference rules: app -> internet");
    checks.open(&cell, "app1", VPC6_HOST, "reference rules: app -> VPC");
    checks.open(
        &cell,
        "app1",
        ip6(&cell, "app2"),
        "reference rules: app -> app",
    );
    checks.open(
        &cell,
        "stg1",
        INET6_HOST,
        "reference rules: staging -> internet",
    );
    checks.open(&cell, "app1", INET_HOST, "reference rules leave IPv4 alone");
    checks.check(
        cell.counter("rejected6_tcp") >= 1,
        "rejected6_tcp counted the SYN",
    );
    checks.check(
        cell.counter("rejected6_other") >= 2,
        "rejected6_other counted the UDP datagram and the echo request",
    );
    checks.finish("reference ruleset");
}

/// The IPv6 rules shaped like the agent's, by hand, with container-to-container recognised by
/// the output interface's kind (`meta oifkind "veth" return`), as an earlier agent did.
fn install_kind_reference_ruleset(cell: &mut Cell, stg: &Container) {
    cell.nft_script(&format!(
        "table inet {TABLE} {{
  counter rejected6_tcp {{ }}
  counter rejected6_other {{ }}
  set exempt6 {{ type iface_index . ipv6_addr; elements = {{ \"{}\" . {} }} }}
  set allowed6 {{ type ipv6_addr; flags interval; elements = {{ {VPC6_NETWORK} }} }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    meta nfproto ipv6 meta iifkind \"veth\" jump overlay6_egress
  }}
  chain overlay6_egress {{
    iif . ip6 saddr @exempt6 return
    ip6 daddr @allowed6 return
    meta oifkind \"veth\" return
    meta l4proto tcp counter name \"rejected6_tcp\" reject with tcp reset
    counter name \"rejected6_other\" reject with icmpv6 admin-prohibited
  }}
}}
",
        stg.host_if,
        stg.ip6.expect("IPv6")
    ));
}

/// The hole the agent's rules close, shown with that rule on a cell whose uplink is a veth: the
/// restricted app's IPv6 packets arrive at the internet host (counted there). The positive
/// control of [`agent_restricts_ipv6_on_a_cell_whose_uplink_is_a_veth`].
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn harness_shows_an_interface_kind_rule_leaks_over_a_veth_uplink() {
    let mut cell = Cell::new_dual_stack_veth_uplink();
    cell.add_container("app1", Kind::App);
    let stg = cell.add_container("stg1", Kind::Staging);
    install_kind_reference_ruleset(&mut cell, &stg);
    let src = ip6(&cell, "app1");
    cell.watch_inet_ingress(src);
    let before = arrived(&cell, src);
    let r = cell.reach("app1", INET6_HOST);
    std::thread::sleep(Duration::from_millis(50));
    let after = arrived(&cell, src);
    assert!(
        r.is_open() && after.0 > before.0 && after.1 > before.1,
        "with `meta oifkind \"veth\" return` a restricted app gets out over a veth uplink \
         (else this cell does not reproduce the hole): {r}; arrived (TCP, UDP, ICMP) before \
         {before:?}, after {after:?}"
    );
}

// ------------------------------------------------------------------ the agent

/// App, task and health-check containers cannot reach the internet over IPv6 (TCP reset fast,
/// UDP and ICMPv6 rejected, nothing arrives) but reach the VPC (fd00::/8, allowed) and other
/// containers over IPv6; staging reaches both; inbound from the VPC and the cell's own IPv6
/// traffic are untouched; IPv4 enforcement is unchanged on the dual-stack cell; the IPv6
/// rejections are counted.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn agent_restricts_ipv6_of_running_containers_and_exempts_staging() {
    restricts_ipv6_and_exempts_staging(standard_cell(), "restricts IPv6 (bridge uplink)");
}

/// The same on a cell whose uplinks are plain veths, as on BOSH-lite: the uplink is of the same
/// kind as the containers' host interfaces, so only what the agent knows (the addresses routed
/// to containers' interfaces) may tell container-to-container IPv6 from the way out.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn agent_restricts_ipv6_on_a_cell_whose_uplink_is_a_veth() {
    let mut cell = Cell::new_dual_stack_veth_uplink();
    add_standard_containers(&mut cell);
    restricts_ipv6_and_exempts_staging(cell, "restricts IPv6 (veth uplink)");
}

fn restricts_ipv6_and_exempts_staging(mut cell: Cell, test: &str) {
    let restricted = ["app1", "app2", "task1", "chk"];
    for name in restricted {
        cell.watch_inet_ingress(ip6(&cell, name));
    }
    start_agent_and_wait(&mut cell, &["stg1"]);
    let mut checks = Checks::default();
    let stg = wait_open6(&cell, "stg1", READY);
    checks.check(
        stg.is_open(),
        format!("staging -> internet (IPv6) opens within {READY:?}: {stg}"),
    );

    for name in restricted {
        checks.rejected_to_inet6(&cell, name, &format!("{name} -> internet (IPv6)"));
        checks.open(&cell, name, VPC6_HOST, &format!("{name} -> VPC (IPv6)"));
        checks.rejected(
            &cell,
            name,
            INET_HOST,
            &format!("{name} -> internet (IPv4)"),
        );
        checks.open(&cell, name, VPC_HOST, &format!("{name} -> VPC (IPv4)"));
    }
    checks.open(&cell, "stg1", VPC6_HOST, "staging -> VPC (IPv6)");
    checks.open(&cell, "stg1", INET_HOST, "staging -> internet (IPv4)");
    checks.open(&cell, "app1", ip6(&cell, "app2"), "app -> app (IPv6)");
    checks.open(&cell, "task1", ip6(&cell, "app1"), "task -> app (IPv6)");
    checks.open(&cell, "app1", ip6(&cell, "stg1"), "app -> staging (IPv6)");
    checks.open(&cell, "stg1", ip6(&cell, "app1"), "staging -> app (IPv6)");
    checks.open(
        &cell,
        "chk",
        ip6(&cell, "app1"),
        "health check -> app (IPv6)",
    );
    checks.open(
        &cell,
        &cell.vpc.clone(),
        ip6(&cell, "app1"),
        "VPC host -> app (IPv6, inbound)",
    );
    checks.open(
        &cell,
        &cell.cell.clone(),
        INET6_HOST,
        "the cell's own IPv6 traffic -> internet",
    );
    let n = restricted.len() as u64;
    let (tcp6, other6) = (
        cell.counter("rejected6_tcp"),
        cell.counter("rejected6_other"),
    );
    checks.check(
        tcp6 >= n,
        format!("rejected6_tcp counts the {n} IPv6 SYNs: {tcp6}"),
    );
    checks.check(
        other6 >= 2 * n,
        format!("rejected6_other counts the {n} UDP datagrams and {n} echo requests: {other6}"),
    );
    cell.agent().assert_running();
    checks.finish(test);
}

/// A restricted container sending from the staging container's IPv6 address is still rejected
/// (the exemption is keyed on the host-side interface too). Positive control first: without
/// the agent the same forged packets arrive at the internet host.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn forged_staging_ipv6_source_is_still_rejected() {
    let mut cell = Cell::new_dual_stack();
    cell.add_container("app1", Kind::App);
    cell.add_container("stg1", Kind::Staging);
    let stg6 = ip6(&cell, "stg1");
    cell.forge_source("app1", stg6.into(), CELL_GW6.into());
    cell.watch_inet_ingress(stg6);
    let app_ns = cell.ctr("app1").ns.clone();
    let inet_udp = SocketAddr::new(INET6_HOST.into(), probe::UDP_PORT);
    let inet_tcp = SocketAddr::new(INET6_HOST.into(), probe::TCP_PORT);
    let send_forged = |cell: &Cell| {
        let (udp, nonce) = probe::udp(&app_ns, inet_udp);
        let (tcp, _) = probe::tcp(&app_ns, inet_tcp);
        let (icmp, _) = probe::ping(&app_ns, INET6_HOST);
        std::thread::sleep(Duration::from_millis(50));
        let seen = probe::seen(&cell.hits, probe::Proto::Udp, &nonce);
        (udp, tcp, icmp, seen)
    };

    // Positive control: no agent, forged packets get through.
    let before = arrived(&cell, stg6);
    let (_, _, _, seen) = send_forged(&cell);
    let after = arrived(&cell, stg6);
    assert!(
        seen && after.0 > before.0 && after.2 > before.2,
        "positive control: forged IPv6 packets (source {stg6}) did not reach the internet host \
         without the agent: UDP seen {seen}, arrived {before:?} -> {after:?}"
    );

    start_agent_and_wait(&mut cell, &["stg1"]);
    let mut checks = Checks::default();
    let stg = wait_open6(&cell, "stg1", READY);
    checks.check(
        stg.is_open(),
        format!("genuine staging -> internet (IPv6) opens within {READY:?}: {stg}"),
    );
    let before = arrived(&cell, stg6);
    let (rej_tcp, rej_other) = (
        cell.counter("rejected6_tcp"),
        cell.counter("rejected6_other"),
    );
    let (udp, tcp, icmp, seen) = send_forged(&cell);
    let after = arrived(&cell, stg6);
    checks.check(
        !seen && after == before,
        format!(
            "forged IPv6 (source {stg6}, from app1's veth) must not arrive: UDP seen {seen}, \
             arrived (TCP, UDP, ICMPv6) {before:?} -> {after:?}; outcomes udp {udp:?}, tcp {tcp:?}, \
             ping answered {icmp}"
        ),
    );
    checks.check(
        cell.counter("rejected6_tcp") > rej_tcp,
        "rejected6_tcp counted the forged SYN",
    );
    checks.check(
        cell.counter("rejected6_other") > rej_other,
        "rejected6_other counted the forged UDP and echo request",
    );
    // The genuine staging container is still exempt.
    checks.open(
        &cell,
        "stg1",
        INET6_HOST,
        "genuine staging -> internet (IPv6) after the forgery",
    );
    checks.finish("forged IPv6 source");
}

/// A staging container goes away and an app container gets its IPv4 and IPv6 addresses while
/// the agent is frozen (SIGSTOP): the app container is restricted over IPv6 anyway (new veth,
/// new ifindex), and stays restricted once the agent catches up.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn reused_ipv6_of_staging_container_is_restricted_before_agent_reacts() {
    let mut cell = Cell::new_dual_stack();
    cell.add_container("app1", Kind::App);
    cell.add_container("stg1", Kind::Staging);
    let (stg_ip, stg6) = (cell.ctr("stg1").ip, ip6(&cell, "stg1"));
    let stg_if = cell.ctr("stg1").host_if.clone();
    start_agent_and_wait(&mut cell, &["stg1"]);
    let r = wait_open6(&cell, "stg1", READY);
    assert!(
        r.is_open(),
        "staging -> internet (IPv6) before the reuse never opened: {r}"
    );
    eprintln!("exempt6 before the reuse: {:?}", cell.exempt6_ips());

    cell.agent().freeze();
    cell.remove_container("stg1");
    let reused = cell.add_container_at_dual("app9", Kind::App, Some(stg_ip), Some(stg6));
    eprintln!(
        "staging {stg_ip} / {stg6} on {stg_if} replaced by app9 on {}",
        reused.host_if
    );
    cell.watch_inet_ingress(stg6);
    let mut checks = Checks::default();
    checks.check(
        cell.exempt6_ips() == Some(vec![stg6]),
        format!(
            "the frozen agent's exempt6 set still holds the old staging element {stg6} \
             (else this test proves nothing): {:?}",
            cell.exempt6_ips()
        ),
    );
    checks.rejected_to_inet6(
        &cell,
        "app9",
        "app on the reused staging IPv6, agent frozen",
    );
    checks.rejected(
        &cell,
        "app9",
        INET_HOST,
        "app on the reused staging IPv4, agent frozen",
    );

    cell.agent().thaw();
    let took = cell.wait_exempt(&[], READY);
    eprintln!("stale IPv4 exemption removed {took:?} after SIGCONT");
    let withdrawn =
        support::wait_until_or(READY, || cell.exempt6_ips().is_some_and(|s| s.is_empty()));
    checks.check(
        withdrawn,
        format!(
            "the gone staging container's IPv6 exemption is withdrawn once the agent runs \
             (exempt6 empty): {:?}",
            cell.exempt6_ips()
        ),
    );
    checks.rejected_to_inet6(
        &cell,
        "app9",
        "app on the reused staging IPv6, agent running",
    );
    checks.open(&cell, "app9", VPC6_HOST, "app on the reused IPv6 -> VPC");
    cell.agent().assert_running();
    checks.finish("reused IPv6");
}

/// With the agent killed (kill -9), app containers created afterwards are restricted over IPv6
/// from their first packet (nothing arrives), and so are those created while it is frozen.
/// Reaching such a container over IPv6 from another one waits for the agent too (its address
/// is not known yet: fail closed), and works once the agent is back.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn new_containers_are_restricted_over_ipv6_while_the_agent_is_stopped() {
    let mut cell = Cell::new_dual_stack();
    cell.add_container("stg1", Kind::Staging);
    start_agent_and_wait(&mut cell, &["stg1"]);
    let mut checks = Checks::default();

    cell.agent().kill9();
    for name in ["app2", "task2"] {
        let kind = if name == "app2" {
            Kind::App
        } else {
            Kind::Task
        };
        let c = cell.add_container(name, kind);
        cell.watch_inet_ingress(c.ip6.expect("IPv6"));
        checks.rejected_to_inet6(
            &cell,
            name,
            &format!("{name} created after kill -9, first packets"),
        );
        checks.open(
            &cell,
            name,
            VPC6_HOST,
            &format!("{name} (agent dead) -> VPC"),
        );
    }
    // Container to container over IPv6 is recognised by the addresses the agent has seen:
    // a container created while it is down is unknown, and unknown is restricted, until the
    // agent is back.
    checks.rejected(
        &cell,
        "app2",
        ip6(&cell, "task2"),
        "app -> task (IPv6) with the agent dead: task2's address is not known yet",
    );

    start_agent_and_wait(&mut cell, &["stg1"]);
    let known = support::wait_until_or(READY, || {
        cell.containers6_ips()
            .is_some_and(|ips| ips.contains(&ip6(&cell, "task2")))
    });
    checks.check(known, "the restarted agent adds task2's IPv6 address");
    checks.open(
        &cell,
        "app2",
        ip6(&cell, "task2"),
        "app -> task (IPv6) once the agent is back",
    );
    // The table the killed agent left already holds the exemption: wait for the new agent's
    // first pass too, or the freeze can catch it reading the store, holding silk's lock shared,
    // and the store write that creates app3 (silk's exclusive lock) waits for the thaw.
    let port = cell.agent_config().health_port;
    support::wait_until(READY, "/readyz 200", || {
        http::try_get(&cell.cell, port, "/readyz").is_ok_and(|r| r.code == 200)
    });
    cell.agent().freeze();
    let c = cell.add_container("app3", Kind::App);
    cell.watch_inet_ingress(c.ip6.expect("IPv6"));
    checks.rejected_to_inet6(&cell, "app3", "app created while the agent is frozen");
    cell.agent().thaw();
    checks.finish("agent stopped");
}

// ------------------------------------------------------------------ leaks under disruption

/// IPv6 streams of one step, running until stopped.
struct Streams6 {
    stop: Arc<AtomicBool>,
    threads: Vec<(&'static str, JoinHandle<u64>)>,
    tcp: Option<JoinHandle<TcpTally>>,
}

impl Streams6 {
    /// app -> internet (restricted: UDP every 100 µs, a TCP connection attempt every 250 µs),
    /// app -> VPC and staging -> internet (controls, UDP every ms).
    fn start(app: &Container, stg: &Container) -> Streams6 {
        let stop = Arc::new(AtomicBool::new(false));
        let inet = SocketAddr::new(INET6_HOST.into(), SINK_PORT);
        let vpc = SocketAddr::new(VPC6_HOST.into(), SINK_PORT);
        let every = Duration::from_millis(1);
        Streams6 {
            threads: vec![
                (
                    "restricted UDP",
                    probe::udp_stream_every(
                        &app.ns,
                        inet,
                        Duration::from_micros(100),
                        stop.clone(),
                    ),
                ),
                (
                    "VPC UDP",
                    probe::udp_stream_every(&app.ns, vpc, every, stop.clone()),
                ),
                (
                    "staging UDP",
                    probe::udp_stream_every(&stg.ns, inet, every, stop.clone()),
                ),
            ],
            tcp: Some(probe::tcp_stream(
                &app.ns,
                inet,
                Duration::from_micros(250),
                stop.clone(),
            )),
            stop,
        }
    }

    /// (restricted UDP, VPC UDP, staging UDP) sent, and the TCP tally.
    fn stop(mut self) -> ([u64; 3], TcpTally) {
        self.stop.store(true, Ordering::Relaxed);
        let mut sent = [0; 3];
        for (i, (_, t)) in self.threads.drain(..).enumerate() {
            sent[i] = t.join().expect("stream thread");
        }
        let tcp = self.tcp.take().expect("once").join().expect("tcp thread");
        (sent, tcp)
    }
}

impl Drop for Streams6 {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// While an app container streams IPv6 UDP and TCP to the internet without pause: `nft flush
/// ruleset`, kill -9 and restart, SIGTERM and restart. Not one restricted IPv6 packet may
/// arrive in any step; the VPC and a staging container keep receiving over IPv6; after each
/// step both tables are back as installed before the next.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn flush_and_restarts_leak_nothing_over_ipv6() {
    flush_and_restarts_leak_nothing(Cell::new_dual_stack());
}

/// The same on a cell whose uplinks are veths (BOSH-lite).
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn flush_and_restarts_leak_nothing_over_ipv6_through_a_veth_uplink() {
    flush_and_restarts_leak_nothing(Cell::new_dual_stack_veth_uplink());
}

fn flush_and_restarts_leak_nothing(mut cell: Cell) {
    let app = cell.add_container("app1", Kind::App);
    let stg = cell.add_container("stg1", Kind::Staging);
    let (app6, stg6) = (app.ip6.expect("IPv6"), stg.ip6.expect("IPv6"));
    let mut config = cell.agent_config();
    config.reconcile_interval = "10s".into();
    cell.start_agent_with(&config);
    cell.wait_exempt(&[stg.ip], READY);
    let r = wait_open6(&cell, "stg1", READY);
    assert!(r.is_open(), "staging -> internet (IPv6) never opened: {r}");
    let installed = (cell.table_shape(TABLE), cell.table_shape(OWNED));
    assert!(installed.0.is_some(), "table inet {TABLE} installed");
    cell.watch_inet_ingress(app6);
    cell.watch_inet_ingress(stg6);
    cell.watch_ingress(&cell.vpc.clone(), app6);

    let mut report = String::new();
    let mut failures = Vec::new();
    for step in [
        "nft flush ruleset",
        "kill -9 and restart",
        "SIGTERM and restart",
    ] {
        let before = (
            arrived(&cell, app6),
            cell.ingress(&cell.vpc, app6, "udp"),
            cell.inet_ingress(stg6, "udp"),
        );
        let streams = Streams6::start(&app, &stg);
        std::thread::sleep(Duration::from_millis(300));
        let start = Instant::now();
        match step {
            "nft flush ruleset" => {
                cell.nft(&["flush", "ruleset"]);
            }
            "kill -9 and restart" => {
                cell.agent().kill9();
                std::thread::sleep(Duration::from_millis(500));
                cell.start_agent_with(&config);
            }
            _ => {
                cell.agent().terminate();
                std::thread::sleep(Duration::from_millis(500));
                cell.start_agent_with(&config);
            }
        }
        let repaired = loop {
            if (cell.table_shape(TABLE), cell.table_shape(OWNED)) == installed {
                break Some(start.elapsed());
            }
            if start.elapsed() > Duration::from_secs(15) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(25));
        };
        std::thread::sleep(Duration::from_millis(500));
        let ([udp_sent, vpc_sent, stg_sent], tcp) = streams.stop();
        std::thread::sleep(Duration::from_millis(100));
        let now = arrived(&cell, app6);
        let leaked = (now.0 - before.0.0, now.1 - before.0.1);
        let vpc_got = cell.ingress(&cell.vpc, app6, "udp") - before.1;
        let stg_got = cell.inet_ingress(stg6, "udp") - before.2;
        let line = format!(
            "{step:<22} | repaired: {} | restricted IPv6 delivered: {} TCP + {} UDP of {} TCP \
             attempts (refused {}, connected {}, other {}) + {udp_sent} UDP | VPC got \
             {vpc_got}/{vpc_sent} | staging got {stg_got}/{stg_sent}",
            repaired.map_or("NO (15 s)".into(), |d| format!("{} ms", d.as_millis())),
            leaked.0,
            leaked.1,
            tcp.attempts,
            tcp.refused,
            tcp.connected,
            tcp.other,
        );
        let _ = writeln!(report, "  {line}");
        if leaked != (0, 0) {
            failures.push(format!(
                "{step}: LEAKED {} TCP + {} UDP restricted IPv6 packets to the internet",
                leaked.0, leaked.1
            ));
        }
        if repaired.is_none() {
            failures.push(format!(
                "{step}: the tables were not back as installed within 15 s"
            ));
        }
        for (what, n) in [("restricted UDP", udp_sent), ("TCP attempts", tcp.attempts)] {
            if n < 200 {
                failures.push(format!(
                    "{step}: only {n} {what} sent: zero leaks would prove little"
                ));
            }
        }
        for (what, got, of) in [("VPC", vpc_got, vpc_sent), ("staging", stg_got, stg_sent)] {
            if got * 2 < of {
                failures.push(format!(
                    "{step}: control: {what} received only {got} of {of} IPv6 datagrams"
                ));
            }
        }
        if repaired.is_none() {
            break;
        }
    }
    eprintln!("per step (counted at the destinations):\n{report}");
    cell.agent().assert_running();
    assert!(
        failures.is_empty(),
        "{} problem(s):\n  - {}\n\n{report}",
        failures.len(),
        failures.join("\n  - ")
    );
}

/// On a cell whose uplinks are veths, while an app streams IPv6 UDP and TCP to the internet
/// without pause, containers come and go: a new app's IPv6 address is reachable from another
/// container within a second of its creation (the agent adds it to the container addresses
/// on the route event), neither app's restricted IPv6 packets arrive at the internet host, and
/// a removed container's address leaves the set.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn containers_coming_and_going_over_a_veth_uplink_leak_nothing() {
    let mut cell = Cell::new_dual_stack_veth_uplink();
    let app = cell.add_container("app1", Kind::App);
    let stg = cell.add_container("stg1", Kind::Staging);
    start_agent_and_wait(&mut cell, &["stg1"]);
    let app6 = app.ip6.expect("IPv6");
    cell.watch_inet_ingress(app6);
    let streams = Streams6::start(&app, &stg);
    let mut checks = Checks::default();
    let mut took = Vec::new();
    for round in 0..3 {
        let name = format!("app-new{round}");
        let started = Instant::now();
        let new = cell.add_container(&name, Kind::App);
        let new6 = new.ip6.expect("IPv6");
        cell.watch_inet_ingress(new6);
        let target = SocketAddr::new(new6.into(), probe::TCP_PORT);
        let opened = loop {
            if matches!(probe::tcp(&app.ns, target).0, probe::TcpOutcome::Echoed) {
                break Some(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(2) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        took.push(opened);
        checks.check(
            opened.is_some(),
            format!("app1 -> {name} (IPv6) opens within 2 s of its creation: {opened:?}"),
        );
        checks.rejected_to_inet6(&cell, &name, &format!("{name} -> internet (IPv6)"));
        cell.remove_container(&name);
        let gone = support::wait_until_or(READY, || {
            cell.containers6_ips()
                .is_some_and(|ips| !ips.contains(&new6))
        });
        checks.check(
            gone,
            format!("{new6} left the containers6 set after {name} went"),
        );
    }
    let ([udp_sent, _, stg_sent], tcp) = streams.stop();
    std::thread::sleep(Duration::from_millis(100));
    let leaked = arrived(&cell, app6);
    checks.check(
        leaked.0 == 0 && leaked.1 == 0,
        format!(
            "nothing from app1 arrived at the internet host: {} TCP + {} UDP of {} TCP \
             attempts and {udp_sent} UDP datagrams",
            leaked.0, leaked.1, tcp.attempts
        ),
    );
    checks.check(
        udp_sent >= 200 && tcp.attempts >= 200 && stg_sent > 0,
        format!(
            "the streams ran: {udp_sent} UDP, {} TCP, staging {stg_sent}",
            tcp.attempts
        ),
    );
    eprintln!("new container reachable after: {took:?}");
    checks.finish("containers coming and going (veth uplink)");
}

// ------------------------------------------------------------------ reporting

/// What a `/readyz`, `/healthz` or `/status` body says about IPv6: `ipv6_in_use` (a boolean),
/// or else `ipv6` as a boolean or "in use" / "not in use". None if it says nothing
/// recognisable.
fn ipv6_in_use(v: &Value) -> Option<bool> {
    if let Some(b) = v["ipv6_in_use"].as_bool() {
        return Some(b);
    }
    match &v["ipv6"] {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s == "in use" => Some(true),
        Value::String(s) if s == "not in use" => Some(false),
        Value::Object(o) => o.get("in_use").and_then(Value::as_bool),
        _ => None,
    }
}

/// `/status` lists every container's IPv6 address beside its IPv4 one, `/readyz` and
/// `/healthz` say IPv6 is in use, `explain <IPv6 address>` finds the container, and the
/// rejected-packets metric counts IPv6 rejections.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn status_health_explain_and_metrics_show_ipv6() {
    let mut cell = standard_cell();
    let port = cell.agent_config().health_port;
    start_agent_and_wait(&mut cell, &["stg1"]);
    let mut checks = Checks::default();
    support::wait_until(READY, "/readyz 200", || {
        http::try_get(&cell.cell, port, "/readyz").is_ok_and(|r| r.code == 200)
    });

    let status = http::get(&cell.cell, port, "/status").json();
    let entries = status["containers"].as_array().cloned().unwrap_or_default();
    for c in cell.containers() {
        let a6 = c.ip6.expect("IPv6").to_string();
        let entry = entries.iter().find(|e| e["ip"] == c.ip.to_string());
        let listed = entry.is_some_and(|e| {
            e.as_object().is_some_and(|o| {
                o.iter().any(|(k, v)| {
                    k != "ip"
                        && (v == &Value::String(a6.clone())
                            || v.as_array()
                                .is_some_and(|a| a.contains(&Value::String(a6.clone()))))
                })
            })
        });
        checks.check(
            listed,
            format!(
                "/status lists {}'s IPv6 address {a6} (field `ipv6`): {}",
                c.name,
                entry.map_or("no entry".into(), Value::to_string)
            ),
        );
    }
    checks.check(
        ipv6_in_use(&status) == Some(true),
        format!(
            "/status says IPv6 is in use (`ipv6_in_use`): {}",
            status["ipv6_in_use"]
        ),
    );
    for path in ["/readyz", "/healthz"] {
        let v = http::get(&cell.cell, port, path).json();
        checks.check(
            ipv6_in_use(&v) == Some(true),
            format!("{path} says IPv6 is in use (`ipv6_in_use`): {v}"),
        );
    }
    let explain = cmd::ns_try_run(
        &cell.cell,
        support::agent::bin(),
        &[
            "explain",
            &ip6(&cell, "app1").to_string(),
            "--addr",
            &format!("127.0.0.1:{port}"),
        ],
        None,
    );
    checks.check(
        explain.status.success()
            && String::from_utf8_lossy(&explain.stdout).contains(&cell.ctr("app1").handle),
        format!(
            "explain {} finds app1 (exit 0, names its handle): {} {}",
            ip6(&cell, "app1"),
            explain.status,
            String::from_utf8_lossy(&explain.stdout).trim()
        ),
    );

    let rejected = |cell: &Cell, series: &str| -> f64 {
        http::try_get(&cell.cell, port, "/metrics")
            .ok()
            .and_then(|r| http::metric(&r.body, series))
            .unwrap_or(0.0)
    };
    std::thread::sleep(Duration::from_millis(600));
    let series = [
        "egress_guard_rejected_packets_total",
        "egress_guard_rejected_ipv6_packets_total",
    ];
    let before = series.map(|s| rejected(&cell, s));
    // IPv6 only: three rejected packets (SYN, UDP, echo request), IPv4 untouched.
    cell.reach("app1", INET6_HOST);
    let mut after = before;
    let grew = support::wait_until_or(Duration::from_secs(5), || {
        after = series.map(|s| rejected(&cell, s));
        after.iter().zip(&before).all(|(a, b)| *a >= b + 3.0)
    });
    checks.check(
        grew,
        format!(
            "{} count 3 IPv6 rejections: {before:?} -> {after:?}",
            series.join(" and ")
        ),
    );
    checks.finish("reporting");
}

/// `allowed_networks` takes IPv6 CIDRs beside IPv4 ones, in one list.
#[test]
fn allowed_networks_accepts_ipv6_cidrs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("dual.toml");
    std::fs::write(
        &path,
        format!("allowed_networks = [\"10.0.0.0/8\", \"{VPC6_NETWORK}\", \"2001:db8:5::/48\"]\n"),
    )
    .expect("write config");
    let out = cmd::try_run(
        support::agent::bin(),
        &["check-config", "--config", path.to_str().expect("UTF-8")],
        None,
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && printed.contains(VPC6_NETWORK)
            && printed.contains("2001:db8:5::/48"),
        "check-config must accept and print IPv6 CIDRs in allowed_networks: {}\nstdout: {printed}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A cell with IPv6 disabled in its namespace: the agent starts, enforces IPv4 as on any cell,
/// stays ready, and reports IPv6 as not in use.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn ipv6_disabled_cell_enforces_ipv4_and_reports_ipv6_not_in_use() {
    let mut cell = Cell::new_ipv6_disabled();
    assert_eq!(
        support::cell::read_sysctl(&cell.cell, "net.ipv6.conf.all.disable_ipv6"),
        "1"
    );
    cell.add_container("app1", Kind::App);
    cell.add_container("stg1", Kind::Staging);
    let port = cell.agent_config().health_port;
    start_agent_and_wait(&mut cell, &["stg1"]);
    let mut checks = Checks::default();
    checks.rejected(
        &cell,
        "app1",
        INET_HOST,
        "app -> internet (IPv4), IPv6 disabled",
    );
    checks.open(&cell, "app1", VPC_HOST, "app -> VPC (IPv4), IPv6 disabled");
    checks.open(
        &cell,
        "stg1",
        INET_HOST,
        "staging -> internet (IPv4), IPv6 disabled",
    );
    let mut ready = None;
    let became_ready = support::wait_until_or(READY, || {
        ready = http::try_get(&cell.cell, port, "/readyz").ok();
        ready.as_ref().is_some_and(|r| r.code == 200)
    });
    checks.check(
        became_ready,
        format!(
            "/readyz 200 on a cell without IPv6: {:?}",
            ready.as_ref().map(|r| (r.code, r.body.clone()))
        ),
    );
    std::thread::sleep(Duration::from_secs(2));
    cell.agent().assert_running();
    let log = cell.agent().log_text();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR"))
        .take(5)
        .collect();
    checks.check(
        errors.is_empty(),
        format!("no errors in the agent's log: {errors:?}"),
    );
    for path in ["/readyz", "/healthz", "/status"] {
        let v = http::get(&cell.cell, port, path).json();
        checks.check(
            ipv6_in_use(&v) == Some(false),
            format!(
                "{path} says IPv6 is not in use (`ipv6_in_use`): {}",
                v["ipv6_in_use"]
            ),
        );
    }
    checks.finish("IPv6 disabled");
}

/// `nft list table` of each of the agent's tables on a dual-stack cell prints exactly what
/// `egress-guard render` prints, and that includes the IPv6 chain with the staging container's
/// IPv6 exemption and the allowed IPv6 network.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn nft_lists_the_ipv6_rules_as_render_prints_them() {
    let mut cell = Cell::new_dual_stack();
    cell.add_container("app1", Kind::App);
    let stg = cell.add_container("stg1", Kind::Staging);
    start_agent_and_wait(&mut cell, &["stg1"]);
    let r = wait_open6(&cell, "stg1", READY);
    eprintln!("staging over IPv6: {r}");
    let config = cell.agent().config.clone();
    let store = cell.store.path();
    let out = cmd::ns_try_run(
        &cell.cell,
        support::agent::bin(),
        &[
            "render",
            "--config",
            config.to_str().expect("UTF-8"),
            "--store",
            store.to_str().expect("UTF-8"),
        ],
        None,
    );
    assert!(
        out.status.success(),
        "render: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8_lossy(&out.stdout).into_owned();
    let tables = table_blocks(&rendered);
    let mut checks = Checks::default();
    let stg6 = stg.ip6.expect("IPv6").to_string();
    for (name, block) in [TABLE, OWNED].iter().zip(&tables) {
        let listed: String = cell
            .nft(&["list", "table", "inet", name])
            .lines()
            .filter(|l| !(l.trim_start().starts_with("packets ") && l.contains(" bytes ")))
            .map(|l| format!("{l}\n"))
            .collect();
        checks.check(
            &listed == block,
            format!(
                "nft list table inet {name} equals render:\n--- nft\n{listed}--- render\n{block}"
            ),
        );
        checks.check(
            block.contains("overlay6_egress")
                && block.contains(&stg6)
                && block.contains(VPC6_NETWORK.split('/').next().expect("prefix")),
            format!(
                "render of {name} has chain overlay6_egress, staging's {stg6} and {VPC6_NETWORK}:\n{block}"
            ),
        );
    }
    checks.check(
        tables.len() == 2,
        format!("render prints both tables:\n{rendered}"),
    );
    checks.finish("render");
}

/// The handle of table `inet <name>` (a new one each time the table is recreated), or None.
fn table_handle(cell: &Cell, name: &str) -> Option<u64> {
    let out = ns_try_run(&cell.cell, "nft", &["-j", "list", "tables"], None);
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["nftables"].as_array()?.iter().find_map(|o| {
        let t = o.get("table")?;
        (t["family"] == "inet" && t["name"] == name)
            .then(|| t["handle"].as_u64())
            .flatten()
    })
}

/// The agent keeps the tables it wrote, IPv6 rules included: its verifying pass (every 6
/// intervals) and a restart (which adopts `egress_guard` as it is) recreate neither table, so
/// the kernel's reject counters keep counting. On an IPv4-only and on a dual-stack cell.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn agent_recognises_its_own_tables_and_does_not_rebuild_them() {
    let mut checks = Checks::default();
    for (label, mut cell) in [
        ("IPv4-only cell", Cell::new()),
        ("dual-stack cell", Cell::new_dual_stack()),
    ] {
        cell.add_container("app1", Kind::App);
        cell.add_container("stg1", Kind::Staging);
        start_agent_and_wait(&mut cell, &["stg1"]);
        std::thread::sleep(Duration::from_millis(300));
        let handles = |cell: &Cell| (table_handle(cell, TABLE), table_handle(cell, OWNED));
        let first = handles(&cell);
        assert!(
            first.0.is_some() && first.1.is_some(),
            "{label}: both tables installed"
        );
        cell.reach("app1", INET_HOST);
        if cell.dual_stack() {
            cell.reach("app1", INET6_HOST);
        }
        // Summed over both tables: a packet is counted by the table that rejects it.
        let counted = |cell: &Cell| {
            [
                "rejected_tcp",
                "rejected_other",
                "rejected6_tcp",
                "rejected6_other",
            ]
            .map(|c| cell.counter(c))
        };
        let before = counted(&cell);
        assert!(
            before[0] > 0,
            "{label}: the probes were counted: {before:?}"
        );
        // Past the verifying pass (6 intervals of 1 s) and then some.
        std::thread::sleep(Duration::from_secs(8));
        checks.check(
            handles(&cell) == first,
            format!(
                "{label}: no table recreated across the verifying pass: handles {first:?} -> {:?}",
                handles(&cell)
            ),
        );
        let kept = counted(&cell);
        checks.check(
            kept.iter().zip(&before).all(|(k, b)| k >= b),
            format!(
                "{label}: the reject counters (rejected_tcp, rejected_other, rejected6_tcp, \
                 rejected6_other; both tables) keep counting across the verifying pass: \
                 {before:?} -> {kept:?}"
            ),
        );
        cell.agent().terminate();
        cell.start_agent();
        cell.wait_exempt(&[cell.ctr("stg1").ip], READY);
        std::thread::sleep(Duration::from_millis(500));
        let after = handles(&cell);
        checks.check(
            after.0 == first.0,
            format!(
                "{label}: the restarted agent adopts inet {TABLE} as it is: handle {:?} -> {:?}",
                first.0, after.0
            ),
        );
        let log = cell.agent().log_text();
        let rebuilt: Vec<&str> = log.lines().filter(|l| l.contains("differ")).collect();
        checks.check(
            rebuilt.is_empty(),
            format!("{label}: the restarted agent found nothing that differs: {rebuilt:?}"),
        );
    }
    checks.finish("own tables");
}

/// With the DNS filter on, a restricted container's DNS over IPv6 (UDP and TCP, port 53) is
/// dropped before it reaches any resolver, even one inside `allowed_networks` (the filter
/// serves IPv4 only; silk gives containers IPv4 resolvers): nothing arrives at the VPC host,
/// and the drops are counted. The same container's other IPv6 traffic to the VPC and a
/// staging container's IPv6 DNS are untouched.
#[test]
#[ignore = "needs root: run with --include-ignored"]
fn dns_over_ipv6_from_restricted_containers_is_dropped_with_the_dns_filter_on() {
    let mut cell = Cell::new_dual_stack();
    let app = cell.add_container("app1", Kind::App);
    let stg = cell.add_container("stg1", Kind::Staging);
    let mut config = cell.agent_config();
    config.dns = Some("enabled = true\nlisten = \"0.0.0.0:9853\"\n".into());
    cell.start_agent_with(&config);
    cell.wait_exempt(&[stg.ip], READY);
    let r = wait_open6(&cell, "stg1", READY);
    assert!(r.is_open(), "staging -> internet (IPv6) never opened: {r}");
    let (app6, stg6) = (app.ip6.expect("IPv6"), stg.ip6.expect("IPv6"));
    let vpc = cell.vpc.clone();
    cell.watch_ingress(&vpc, app6);
    cell.watch_ingress(&vpc, stg6);

    let dns = SocketAddr::new(VPC6_HOST.into(), 53);
    let send_dns = |ns: &str| {
        probe::in_netns(ns, || {
            let socket = std::net::UdpSocket::bind("[::]:0").expect("bind");
            for _ in 0..3 {
                let _ = socket.send_to(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00", dns);
            }
            let _ = std::net::TcpStream::connect_timeout(&dns, Duration::from_millis(300));
        })
    };
    send_dns(&app.ns);
    send_dns(&stg.ns);
    std::thread::sleep(Duration::from_millis(100));
    let mut checks = Checks::default();
    let (app_udp, app_tcp) = (
        cell.ingress(&vpc, app6, "udp"),
        cell.ingress(&vpc, app6, "tcp"),
    );
    checks.check(
        (app_udp, app_tcp) == (0, 0),
        format!("nothing of app1's IPv6 DNS arrived at {VPC6_HOST}: {app_udp} UDP, {app_tcp} TCP"),
    );
    let (stg_udp, stg_tcp) = (
        cell.ingress(&vpc, stg6, "udp"),
        cell.ingress(&vpc, stg6, "tcp"),
    );
    checks.check(
        stg_udp >= 3 && stg_tcp >= 1,
        format!("staging's IPv6 DNS arrived: {stg_udp} UDP, {stg_tcp} TCP"),
    );
    checks.open(&cell, "app1", VPC6_HOST, "app -> VPC (IPv6), not DNS");
    let metrics = http::get(&cell.cell, cell.agent_config().health_port, "/metrics").body;
    let dropped = http::metric(&metrics, "egress_guard_dns_ipv6_dropped_total").unwrap_or(0.0);
    checks.check(
        dropped >= 4.0,
        format!(
            "egress_guard_dns_ipv6_dropped_total counts the 3 datagrams and the SYN: {dropped}"
        ),
    );
    checks.finish("IPv6 DNS");
}
