use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::lookup::policy_order;
use super::*;
use crate::config::Mode;
use crate::dataplane::{AgentTable, BlockedCounters};
use crate::policy::Verdict;
use crate::policy::{Change, Decision};
use std::net::Ipv4Addr;

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn decision(handle: Option<&str>, ip: [u8; 4], ifindex: u32, app: &str) -> Decision {
    Decision {
        ipv6: Vec::new(),
        handle: handle.map(Into::into),
        ip: Some(Ipv4Addr::from(ip)),
        host_ifindex: Some(ifindex),
        host_interface: Some(format!("veth{ifindex}")),
        workload: handle.map(|_| "app".into()),
        app_id: handle.map(|_| app.into()),
        space_id: handle.map(|_| format!("space-of-{app}").into()),
        org_id: handle.map(|_| "org-1".into()),
        log_index: None,
        verdict: Verdict::Restricted,
        reason: String::new(),
    }
}

#[test]
fn policy_order_is_the_order_of_decision_keys() {
    let mut all = vec![
        decision(Some("b"), [10, 255, 0, 2], 5, "x"),
        decision(Some("a"), [10, 255, 0, 9], 5, "x"),
        decision(None, [10, 255, 0, 3], 6, ""),
        decision(None, [10, 255, 0, 1], 6, ""),
    ];
    for (handle, ifindex) in [(Some("a"), 0), (Some("0"), 0), (None, 9), (None, 3)] {
        let mut d = decision(handle, [0, 0, 0, 0], ifindex, "x");
        d.ip = None;
        d.host_ifindex = Some(ifindex);
        all.push(d);
    }
    let mut by_key = all.clone();
    by_key.sort_by_key(Decision::key);
    all.sort_by(|a, b| policy_order(a).cmp(&policy_order(b)));
    assert_eq!(all, by_key);
}

#[test]
fn a_lookup_kept_from_changes_answers_as_one_built_afresh() {
    let a = Arc::new(decision(Some("a"), [10, 255, 0, 2], 5, "app-a"));
    let b = Arc::new(decision(Some("b"), [10, 255, 0, 2], 5, "app-b"));
    let c = Arc::new(decision(None, [10, 255, 0, 3], 6, ""));
    let moved = Arc::new(decision(Some("a"), [10, 255, 0, 2], 7, "app-a"));
    let add = |d: &Arc<Decision>| Change {
        before: None,
        after: Some(d.clone()),
    };
    let mut kept = Lookup::default();
    kept.apply(&[add(&a), add(&b), add(&c)]);
    let links = BTreeMap::from([(9, "s-other".to_string())]);
    kept.set_links(&links);
    kept.apply(&[
        Change {
            before: Some(b.clone()),
            after: None,
        },
        Change {
            before: Some(a.clone()),
            after: Some(moved.clone()),
        },
    ]);
    let fresh = Lookup::new(&[(*moved).clone(), (*c).clone()], &links);
    let x = IpAddr::V4(Ipv4Addr::new(10, 255, 0, 2));
    let y = IpAddr::V4(Ipv4Addr::new(10, 255, 0, 3));
    for (ifindex, src) in [
        (Some(5), x),
        (Some(7), x),
        (None, x),
        (Some(6), y),
        (Some(6), x),
        (Some(9), x),
        (None, y),
    ] {
        assert_eq!(
            kept.sender(ifindex, src),
            fresh.sender(ifindex, src),
            "{ifindex:?} {src}"
        );
    }
    assert_eq!(kept.sender(Some(7), x).app_id, "app-a");
    assert_eq!(kept.sender(Some(5), x).interface, "ifindex 5");
    assert_eq!(kept.sender(Some(9), x).interface, "s-other");
    // Two decisions for one source: the last in the policy's order, as a rebuild gives.
    let both = Lookup::new(&[(*a).clone(), (*b).clone()], &BTreeMap::new());
    assert_eq!(both.sender(Some(5), x).app_id, "app-b");
}

fn packet(table: AgentTable, ifindex: u32, src: [u8; 4], dst_port: u16, seq: u32) -> Packet {
    Packet {
        table: Some(table),
        ifindex: Some(ifindex),
        src: IpAddr::V4(Ipv4Addr::from(src)),
        dst: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
        protocol: 6,
        dst_port: Some(dst_port),
        seq: Some(seq),
    }
}

fn blocked(mode: Mode) -> Blocked {
    let mut b = Blocked::new(mode);
    b.set_policy(
        mode,
        &AgentTable::ALL,
        &[
            decision(Some("h-a"), [10, 255, 0, 2], 5, "app-a"),
            decision(Some("h-b"), [10, 255, 0, 3], 6, "app-b"),
            decision(None, [10, 255, 0, 4], 7, ""),
        ],
        &BTreeMap::from([(9, "s-010255000009".to_string())]),
    );
    b
}

#[test]
fn packets_are_attributed_by_interface_and_source() {
    let mut b = blocked(Mode::Enforce);
    let owned = AgentTable::Owned;
    let Ingested::New { attempt, log } =
        b.ingest(&packet(owned, 5, [10, 255, 0, 2], 443, 1), at(0))
    else {
        panic!("a new row");
    };
    assert!(log);
    assert_eq!(
        (attempt.handle.as_str(), attempt.app_id.as_str()),
        ("h-a", "app-a")
    );
    assert_eq!(attempt.space_id, "space-of-app-a");
    assert_eq!(attempt.org_id, "org-1");
    assert_eq!(attempt.action, Action::Rejected);
    assert_eq!(
        (attempt.protocol.as_str(), attempt.dst_port),
        ("tcp", Some(443))
    );
    assert_eq!(attempt.first_seen, "2023-11-14T22:13:20.000Z");
    // A forged source is its interface's container; the store's unknowns have empty ids
    // and their interface; an interface nobody knows is named from the links.
    b.ingest(&packet(owned, 6, [10, 255, 0, 2], 80, 2), at(1));
    b.ingest(&packet(owned, 7, [10, 255, 0, 4], 80, 3), at(2));
    b.ingest(&packet(owned, 9, [10, 255, 0, 9], 80, 4), at(3));
    let rows = b.report(&Filter::default()).attempts;
    assert_eq!(rows.len(), 4);
    assert_eq!(
        (rows[0].handle.as_str(), rows[0].interface.as_str()),
        ("", "s-010255000009")
    );
    assert_eq!((rows[1].handle.as_str(), rows[1].app_id.as_str()), ("", ""));
    assert_eq!(rows[1].interface, "veth7");
    assert_eq!(rows[2].handle, "h-b");
    assert_eq!(rows[2].src, IpAddr::V4(Ipv4Addr::new(10, 255, 0, 2)));
}

#[test]
fn repeats_count_and_move_to_the_front() {
    let mut b = blocked(Mode::Enforce);
    let t = AgentTable::Persistent;
    b.ingest(&packet(t, 5, [10, 255, 0, 2], 443, 1), at(0));
    b.ingest(&packet(t, 6, [10, 255, 0, 3], 443, 2), at(1));
    assert_eq!(
        b.ingest(&packet(t, 5, [10, 255, 0, 2], 443, 3), at(5)),
        Ingested::Repeat
    );
    let rows = b.report(&Filter::default()).attempts;
    assert_eq!(rows[0].handle, "h-a");
    assert_eq!(rows[0].count, 2);
    assert_eq!(rows[0].first_seen, "2023-11-14T22:13:20.000Z");
    assert_eq!(rows[0].last_seen, "2023-11-14T22:13:25.000Z");
    assert_eq!(rows[1].handle, "h-b");
    // Enforce: both tables' reports count (each packet is rejected by one of them).
    assert_eq!(b.reported[&Action::Rejected], 3);
}

#[test]
fn audit_keeps_one_tables_copy() {
    let mut b = blocked(Mode::Audit);
    let p = packet(AgentTable::Persistent, 5, [10, 255, 0, 2], 443, 1);
    let o = packet(AgentTable::Owned, 5, [10, 255, 0, 2], 443, 2);
    assert_eq!(b.ingest(&p, at(0)), Ingested::Ignored);
    assert!(matches!(b.ingest(&o, at(0)), Ingested::New { .. }));
    let rows = b.report(&Filter::default()).attempts;
    assert_eq!((rows.len(), rows[0].count), (1, 1));
    assert_eq!(rows[0].action, Action::WouldReject);
    // Without the owned table, the persistent one is primary: its copy counts now.
    b.set_policy(
        Mode::Audit,
        &[AgentTable::Persistent],
        &[],
        &BTreeMap::new(),
    );
    let again = packet(AgentTable::Persistent, 5, [10, 255, 0, 2], 443, 3);
    assert_eq!(b.ingest(&again, at(1)), Ingested::Repeat);
    assert_eq!(b.report(&Filter::default()).attempts[0].count, 2);
    // A prefix that is not one of our tables is not counted.
    let mut foreign = p.clone();
    foreign.table = None;
    assert_eq!(b.ingest(&foreign, at(2)), Ingested::Ignored);
    assert_eq!(b.unparsable, 1);
}

#[test]
fn the_summary_is_bounded_and_evicts_the_least_recent() {
    let mut b = blocked(Mode::Enforce);
    let t = AgentTable::Owned;
    let mut logged = 0;
    // Rows from many containers, each under its own limit: the total bound applies.
    let per = MAX_ROWS_PER_CONTAINER as u16;
    let containers = (MAX_ROWS as u16 + 250).div_ceil(per);
    let mut seq = 0;
    let mut order = Vec::new();
    for c in 0..containers {
        for port in 0..per {
            seq += 1;
            let src = [10, 255, 1, u8::try_from(c).expect("few containers")];
            if let Ingested::New { log: true, .. } =
                b.ingest(&packet(t, 100 + u32::from(c), src, port, seq), at(0))
            {
                logged += 1;
            }
            order.push((c, port));
        }
    }
    let total = order.len();
    assert_eq!(b.summary.len(), MAX_ROWS);
    assert_eq!(b.summary.evicted, (total - MAX_ROWS) as u64);
    assert_eq!(logged, MAX_NEW_ROW_LOGS);
    let rows = b.report(&Filter::default()).attempts;
    assert_eq!(rows.len(), MAX_ROWS);
    // Most recent first; the oldest rows were evicted.
    let newest = order[total - 1];
    let oldest_kept = order[total - MAX_ROWS];
    assert_eq!(rows[0].dst_port, Some(newest.1));
    assert_eq!(rows[0].src, IpAddr::from([10, 255, 1, newest.0 as u8]));
    assert_eq!(rows[MAX_ROWS - 1].dst_port, Some(oldest_kept.1));
    assert_eq!(
        rows[MAX_ROWS - 1].src,
        IpAddr::from([10, 255, 1, oldest_kept.0 as u8])
    );
    let period = b.take_period().expect("a busy period");
    assert_eq!(period.new_rows_unlogged, total as u64 - MAX_NEW_ROW_LOGS);
    assert_eq!(period.rows, MAX_ROWS);
    // The next period logs new rows again and is silent when nothing happened.
    assert_eq!(b.take_period(), None);
    assert!(matches!(
        b.ingest(&packet(t, 6, [10, 255, 0, 3], 1, 5000), at(1)),
        Ingested::New { log: true, .. }
    ));
}

#[test]
fn one_flooding_container_never_pushes_out_another_containers_rows() {
    let mut b = blocked(Mode::Enforce);
    let t = AgentTable::Owned;
    let (quiet, flooder) = ([10, 255, 0, 2], [10, 255, 0, 9]);
    // The quiet app's five blocked connects, then a flood of other destinations.
    for port in 0..5u16 {
        b.ingest(&packet(t, 5, quiet, 443 + port, u32::from(port)), at(0));
    }
    for port in 0..5_000u16 {
        b.ingest(&packet(t, 9, flooder, port, 10 + u32::from(port)), at(1));
    }
    let quiet_ip = IpAddr::from(quiet);
    let flooder_ip = IpAddr::from(flooder);
    assert_eq!(
        b.summary.rows_of(5, quiet_ip),
        5,
        "the quiet app keeps every row"
    );
    assert_eq!(b.summary.rows_of(9, flooder_ip), MAX_ROWS_PER_CONTAINER);
    let rows = b.report(&Filter::default()).attempts;
    let quiet_rows: Vec<u16> = rows
        .iter()
        .filter(|r| r.src == quiet_ip)
        .filter_map(|r| r.dst_port)
        .collect();
    assert_eq!(quiet_rows, [447, 446, 445, 444, 443]);
    // The flooder keeps its most recent rows, replacing its own oldest.
    let flooder_ports: Vec<u16> = rows
        .iter()
        .filter(|r| r.src == flooder_ip)
        .filter_map(|r| r.dst_port)
        .collect();
    let expected: Vec<u16> = (5_000 - MAX_ROWS_PER_CONTAINER as u16..5_000)
        .rev()
        .collect();
    assert_eq!(flooder_ports, expected);
    // A repeat of a kept row still counts in it.
    b.ingest(&packet(t, 5, quiet, 443, 9_999), at(2));
    assert_eq!(b.summary.rows_of(5, quiet_ip), 5);
}

#[test]
fn filters_match_ids_exactly() {
    let mut b = blocked(Mode::Enforce);
    let t = AgentTable::Owned;
    b.ingest(&packet(t, 5, [10, 255, 0, 2], 443, 1), at(0));
    b.ingest(&packet(t, 6, [10, 255, 0, 3], 443, 2), at(1));
    b.ingest(&packet(t, 7, [10, 255, 0, 4], 443, 3), at(2));
    let only = |f: Filter| -> Vec<String> {
        b.report(&f)
            .attempts
            .into_iter()
            .map(|a| a.handle)
            .collect()
    };
    assert_eq!(
        only(Filter {
            app_id: Some("app-a".into()),
            ..Filter::default()
        }),
        vec!["h-a"]
    );
    assert_eq!(
        only(Filter {
            space_id: Some("space-of-app-b".into()),
            ..Filter::default()
        }),
        vec!["h-b"]
    );
    assert_eq!(
        only(Filter {
            org_id: Some("org-1".into()),
            ..Filter::default()
        }),
        vec!["h-b", "h-a"]
    );
    assert_eq!(
        only(Filter {
            org_id: Some("org-1".into()),
            app_id: Some("app-b".into()),
            ..Filter::default()
        }),
        vec!["h-b"]
    );
    assert!(
        only(Filter {
            app_id: Some("app".into()),
            ..Filter::default()
        })
        .is_empty()
    );
    assert_eq!(only(Filter::default()).len(), 3);
}

#[test]
fn suppression_is_counted_from_the_kernel_counters_and_sequence_gaps() {
    let mut b = blocked(Mode::Enforce);
    let c = |blocked, logged| BlockedCounters { blocked, logged };
    // The first reading of an adopted table is the baseline.
    assert_eq!(
        b.observe_counters(AgentTable::Persistent, c(500, 100)),
        CounterGrowth::default()
    );
    let g = b.observe_counters(AgentTable::Persistent, c(1500, 300));
    assert_eq!((g.blocked, g.suppressed), (1000, 800));
    assert_eq!(g.action, Some(Action::Rejected));
    // A table the agent created counts from zero; a reset counts all of the new value.
    b.table_recreated(AgentTable::Owned);
    let g = b.observe_counters(AgentTable::Owned, c(50, 50));
    assert_eq!((g.blocked, g.suppressed), (50, 0));
    let g = b.observe_counters(AgentTable::Persistent, c(40, 10));
    assert_eq!((g.blocked, g.suppressed), (40, 30));
    assert_eq!(b.suppressed, 830);
    // Audit: only the primary (owned) table's counters count.
    b.set_policy(Mode::Audit, &AgentTable::ALL, &[], &BTreeMap::new());
    assert_eq!(
        b.observe_counters(AgentTable::Persistent, c(140, 20)),
        CounterGrowth::default()
    );
    let g = b.observe_counters(AgentTable::Owned, c(150, 60));
    assert_eq!((g.blocked, g.suppressed), (100, 90));
    assert_eq!(g.action, Some(Action::WouldReject));
    assert_eq!(b.suppressed, 920);
    // Sequence gaps: messages lost on the socket (in audit, half were duplicates).
    let t = AgentTable::Owned;
    b.ingest(&packet(t, 5, [10, 255, 0, 2], 1, 10), at(0));
    b.ingest(&packet(t, 5, [10, 255, 0, 2], 1, 15), at(0));
    assert_eq!(b.suppressed, 920 + 2);
    b.set_policy(Mode::Enforce, &AgentTable::ALL, &[], &BTreeMap::new());
    b.ingest(&packet(t, 5, [10, 255, 0, 2], 1, 20), at(0));
    assert_eq!(b.suppressed, 922 + 4);
    // A restart of the numbering is not a loss.
    b.ingest(&packet(t, 5, [10, 255, 0, 2], 1, 1), at(0));
    assert_eq!(b.suppressed, 926);
    let period = b.take_period().expect("suppressed in the period");
    assert_eq!(period.suppressed, 926);
}

#[test]
fn protocols_are_named() {
    assert_eq!(protocol_name(6), "tcp");
    assert_eq!(protocol_name(17), "udp");
    assert_eq!(protocol_name(1), "icmp");
    assert_eq!(protocol_name(99), "99");
}

#[test]
fn the_blocked_body_has_every_documented_field() {
    let mut b = blocked(Mode::Audit);
    b.ingest(
        &packet(AgentTable::Owned, 5, [10, 255, 0, 2], 443, 1),
        at(0),
    );
    let value = serde_json::to_value(b.report(&Filter::default())).expect("json");
    assert_eq!(value["mode"], "audit");
    assert_eq!(value["suppressed"], 0);
    let row = &value["attempts"][0];
    for key in [
        "action",
        "handle",
        "app_id",
        "space_id",
        "org_id",
        "workload",
        "src",
        "dst",
        "protocol",
        "dst_port",
        "count",
        "first_seen",
        "last_seen",
    ] {
        assert!(row.get(key).is_some(), "{key} missing in {row}");
    }
    assert_eq!(row["action"], "would_reject");
    assert_eq!(row["dst_port"], 443);
    assert!(value.get("attribution_error").is_none());
}

#[test]
fn refused_dns_queries_are_rows_with_the_name_and_protocol_dns() {
    let mut b = blocked(Mode::Audit);
    let refusal = RefusedQuery {
        src: Ipv4Addr::new(10, 255, 0, 2),
        name: "X.Attacker.Example.".into(),
        at: at(0),
    };
    let first = b.ingest_dns(&refusal).expect("a new row, logged");
    assert_eq!(first.protocol, "dns");
    assert_eq!(first.dst, "x.attacker.example.");
    assert_eq!(first.dst_port, Some(53));
    // The filter refuses in either mode.
    assert_eq!(first.action, Action::Rejected);
    // Attributed by source address alone (the filter does not know the interface).
    assert_eq!(first.app_id, "app-a");
    assert!(
        b.ingest_dns(&refusal).is_none(),
        "a repeat is not a new row"
    );
    let rows = b.report(&Filter::default()).attempts;
    assert_eq!((rows.len(), rows[0].count), (1, 2));
}
