use super::*;
use crate::inventory::store::{EntryProblem, StoreEntry};
use crate::inventory::{KernelView, StoreSnapshot};

fn entry(handle: &str, ip: [u8; 4], workload: Option<&str>) -> StoreEntry {
    StoreEntry {
        handle: handle.into(),
        ip: Ipv4Addr::from(ip),
        workload: workload.map(Into::into),
        app_id: Some(format!("app-of-{handle}").into()),
        space_id: None,
        org_id: None,
        log_index: None,
    }
}

fn inventory(entries: Vec<StoreEntry>, routes: &[([u8; 4], u32)]) -> Inventory {
    Inventory {
        store: StoreSnapshot {
            entries,
            problems: vec![],
        },
        kernel: KernelView {
            routes6: BTreeMap::new(),
            routes: routes
                .iter()
                .map(|(ip, i)| (Ipv4Addr::from(*ip), *i))
                .collect(),
            links: routes
                .iter()
                .map(|(_, i)| (*i, format!("veth{i}")))
                .collect(),
        },
    }
}

fn verdict_of(plan: &Plan, handle: &str) -> (Verdict, String) {
    let d = plan
        .decisions
        .iter()
        .find(|d| d.handle.as_deref() == Some(handle))
        .expect("decision for handle");
    (d.verdict, d.reason.clone())
}

fn key(ifindex: u32, ip: [u8; 4]) -> ExemptKey {
    ExemptKey {
        ifindex,
        ip: Ipv4Addr::from(ip),
    }
}

#[test]
fn only_routed_staging_is_exempt() {
    let inv = inventory(
        vec![
            entry("app", [10, 255, 1, 2], Some("app")),
            entry("task", [10, 255, 1, 3], Some("task")),
            entry("staging", [10, 255, 1, 4], Some("staging")),
            entry("staging-unrouted", [10, 255, 1, 5], Some("staging")),
            entry("old-platform", [10, 255, 1, 6], None),
            entry("custom", [10, 255, 1, 7], Some("build")),
        ],
        &[
            ([10, 255, 1, 2], 10),
            ([10, 255, 1, 3], 11),
            ([10, 255, 1, 4], 12),
            ([10, 255, 1, 6], 14),
            ([10, 255, 1, 7], 15),
        ],
    );
    let plan = plan(&Config::default(), &inv);
    assert_eq!(
        plan.rules.exempt,
        BTreeSet::from([key(12, [10, 255, 1, 4])])
    );
    assert_eq!(verdict_of(&plan, "staging").0, Verdict::Exempt);
    for handle in ["app", "task", "staging-unrouted", "old-platform", "custom"] {
        assert_eq!(verdict_of(&plan, handle).0, Verdict::Restricted, "{handle}");
    }
    assert!(
        verdict_of(&plan, "staging-unrouted")
            .1
            .contains("no host route")
    );
    assert!(
        verdict_of(&plan, "old-platform")
            .1
            .contains("unknown workload")
    );
    assert!(verdict_of(&plan, "app").1.contains("running app"));
    assert_eq!(plan.count(Verdict::Exempt), 1);
    assert_eq!(plan.count(Verdict::Restricted), 5);
}

#[test]
fn health_checks_are_restricted_even_if_labelled_staging() {
    let inv = inventory(
        vec![entry("check-1234", [10, 255, 1, 2], Some("staging"))],
        &[([10, 255, 1, 2], 10)],
    );
    let plan = plan(&Config::default(), &inv);
    assert!(plan.rules.exempt.is_empty());
    assert!(verdict_of(&plan, "check-1234").1.contains("health-check"));
}

#[test]
fn kernel_only_containers_are_restricted_and_listed() {
    let inv = inventory(vec![], &[([10, 255, 1, 9], 20)]);
    let plan = plan(&Config::default(), &inv);
    assert!(plan.rules.exempt.is_empty());
    let d = &plan.decisions[0];
    assert_eq!(d.handle, None);
    assert_eq!(d.ip, Some(Ipv4Addr::new(10, 255, 1, 9)));
    assert_eq!(d.verdict, Verdict::Restricted);
    assert!(d.reason.contains("not in the metadata store"));
}

#[test]
fn an_ip_claimed_twice_is_never_exempt() {
    let inv = inventory(
        vec![
            entry("old-staging", [10, 255, 1, 4], Some("staging")),
            entry("new-app", [10, 255, 1, 4], Some("app")),
        ],
        &[([10, 255, 1, 4], 12)],
    );
    let plan = plan(&Config::default(), &inv);
    assert!(plan.rules.exempt.is_empty());
    assert!(verdict_of(&plan, "old-staging").1.contains("more than one"));
}

#[test]
fn exempt_workloads_come_from_config() {
    let config = Config::parse("exempt_workloads = [\"task\"]").expect("valid");
    let inv = inventory(
        vec![
            entry("task", [10, 255, 1, 3], Some("task")),
            entry("staging", [10, 255, 1, 4], Some("staging")),
        ],
        &[([10, 255, 1, 3], 11), ([10, 255, 1, 4], 12)],
    );
    let plan = plan(&config, &inv);
    assert_eq!(
        plan.rules.exempt,
        BTreeSet::from([key(11, [10, 255, 1, 3])])
    );
    assert!(
        verdict_of(&plan, "staging")
            .1
            .contains("not in exempt_workloads")
    );
}

#[test]
fn entries_outside_the_overlay_are_not_exempt() {
    let inv = inventory(
        vec![entry("odd", [192, 168, 1, 4], Some("staging"))],
        &[([192, 168, 1, 4], 12)],
    );
    let plan = plan(&Config::default(), &inv);
    assert!(plan.rules.exempt.is_empty());
}

#[test]
fn unusable_entries_are_listed_as_restricted() {
    let mut inv = inventory(vec![], &[]);
    inv.store.problems.push(EntryProblem {
        handle: "broken".into(),
        reason: "`ip` \"x\" is not an IPv4 address".into(),
    });
    let plan = plan(&Config::default(), &inv);
    assert_eq!(verdict_of(&plan, "broken").0, Verdict::Restricted);
}

#[test]
fn allowed_networks_include_the_overlay_and_are_aggregated() {
    let config = Config::parse(
        "overlay_network = \"100.96.0.0/16\"\n\
         allowed_networks = [\"172.16.5.0/24\", \"10.0.0.0/8\", \"10.1.0.0/16\", \"172.16.4.0/24\"]",
    )
    .expect("valid");
    let plan = plan(&config, &Inventory::default());
    let allowed: Vec<String> = plan.rules.allowed.iter().map(|n| n.to_string()).collect();
    assert_eq!(allowed, ["10.0.0.0/8", "100.96.0.0/16", "172.16.4.0/23"]);
}

#[test]
fn plan_does_not_depend_on_input_order_and_follows_the_documented_order() {
    let entries = vec![
        entry("c-app", [10, 255, 1, 4], Some("app")),
        entry("a-stg", [10, 255, 1, 2], Some("staging")),
        entry("e-task", [10, 255, 1, 6], Some("task")),
        entry("b-stg", [10, 255, 1, 3], Some("staging")),
        entry("d-none", [10, 255, 1, 5], None),
    ];
    let problems = vec![
        EntryProblem {
            handle: "z-broken".into(),
            reason: "`ip` missing".into(),
        },
        EntryProblem {
            handle: "y-broken".into(),
            reason: "not an object".into(),
        },
    ];
    // Two routed IPs no entry claims, besides the entries' own.
    let routes = [
        ([10, 255, 1, 2], 10),
        ([10, 255, 1, 3], 11),
        ([10, 255, 1, 4], 12),
        ([10, 255, 1, 9], 19),
        ([10, 255, 1, 8], 18),
    ];
    let configs = [
        "allowed_networks = [\"172.16.5.0/24\", \"10.0.0.0/8\", \"172.16.4.0/24\"]",
        "allowed_networks = [\"172.16.4.0/24\", \"172.16.5.0/24\", \"10.0.0.0/8\"]",
    ]
    .map(|text| Config::parse(text).expect("valid"));
    let mut orders = Vec::new();
    for rotation in 0..entries.len() {
        let mut order = entries.clone();
        order.rotate_left(rotation);
        orders.push(order.clone());
        order.reverse();
        orders.push(order);
    }
    let reference = {
        let mut inv = inventory(entries.clone(), &routes);
        inv.store.problems = problems.clone();
        plan(&configs[0], &inv)
    };
    for (i, order) in orders.into_iter().enumerate() {
        let mut inv = inventory(order, &routes);
        inv.store.problems = problems.clone();
        if i % 2 == 1 {
            inv.store.problems.reverse();
        }
        let config = &configs[i % configs.len()];
        assert_eq!(plan(config, &inv), reference, "input order #{i}");
    }
    // The documented order: entries by handle, then unclaimed routes, then unusable entries.
    let keys: Vec<DecisionKey> = reference.decisions.iter().map(Decision::key).collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "not strictly ordered: {keys:?}"
    );
    let handles: Vec<&str> = reference
        .decisions
        .iter()
        .filter_map(|d| d.handle.as_deref())
        .collect();
    assert_eq!(
        handles,
        [
            "a-stg", "b-stg", "c-app", "d-none", "e-task", "y-broken", "z-broken"
        ]
    );
    let unclaimed: Vec<Ipv4Addr> = keys
        .iter()
        .filter_map(|k| match k {
            DecisionKey::UnclaimedRoute(ip) => Some(*ip),
            _ => None,
        })
        .collect();
    assert_eq!(
        unclaimed,
        [Ipv4Addr::new(10, 255, 1, 8), Ipv4Addr::new(10, 255, 1, 9)]
    );
    assert!(
        matches!(keys[5], DecisionKey::UnclaimedRoute(_)),
        "{keys:?}"
    );
    assert!(matches!(keys[8], DecisionKey::Problem(_)), "{keys:?}");
    let allowed: Vec<String> = reference
        .rules
        .allowed
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(allowed, ["10.0.0.0/8", "172.16.4.0/23"]);
}

/// Container-to-container IPv6 is recognised by what the agent knows: the IPv6 addresses of an
/// interface that a container's IPv4 route goes through, whatever its verdict. An interface
/// with IPv6 routes but no IPv4 container route (a cell's own veth uplink on BOSH-lite, say)
/// adds nothing: what the agent does not know stays restricted.
#[test]
fn container_ipv6_addresses_are_those_of_known_container_interfaces() {
    let mut inv = inventory(
        vec![
            entry("app", [10, 255, 1, 2], Some("app")),
            entry("staging", [10, 255, 1, 4], Some("staging")),
        ],
        &[
            ([10, 255, 1, 2], 12),
            ([10, 255, 1, 4], 14),
            ([10, 255, 1, 9], 19),
        ],
    );
    let v6 = |s: &str| -> Ipv6Addr { s.parse().expect("literal") };
    inv.kernel.routes6 = BTreeMap::from([
        (v6("fd00::2"), 12),
        (v6("fd00::4"), 14),
        (v6("fd00::9"), 19),
        (v6("2001:db8::1"), 30),
    ]);
    let plan = plan(&Config::default(), &inv);
    assert_eq!(
        plan.rules.containers6,
        BTreeSet::from([v6("fd00::2"), v6("fd00::4"), v6("fd00::9")]),
        "restricted, exempt and unclaimed containers' addresses; not the uplink's"
    );
    assert!(
        plan.decisions
            .iter()
            .any(|d| d.ipv6 == [v6("2001:db8::1")] && d.verdict == Verdict::Restricted),
        "the interface nobody claims is listed, restricted"
    );
}
