//! The pure parts of one reconcile pass, at 10 to 5,000 containers (no root, no kernel):
//!
//! - `store_parse`: silk's store.json bytes -> `StoreSnapshot` (`inventory::store::parse_store`)
//! - `store_incremental`: a `StoreReader` fed, in turn, the store and the same store plus one
//!   staging container: each iteration one incremental re-parse (copy, compare, splice), as a
//!   read after a CNI ADD or DEL does once the file is read
//! - `store_full_read`: a `StoreReader`'s full read of an unchanged store (a verifying pass):
//!   the document hashed and parsed in regions, compared with the entries it holds
//! - `policy_plan`: (config, inventory) -> plan (`policy::plan`)
//! - `policy_update`: a `Planner` after one staging container's store entry came or went (each
//!   iteration one incremental update, as a pass after that store event runs it)
//! - `decode_listing`: a netlink dump of both tables (bytes) -> observed tables (the messages
//!   parsed as the agent's socket parses them, fed to `dataplane::netlink::Listing`)
//! - `encode_full_sync`: plan -> the batch that recreates both tables, encoded
//!   (`SyncAction::batch(..).encode(seq)`)
//! - `encode_element_update`: one added exemption in both tables -> its batch, encoded
//! - `choose_action`: desired vs observed -> the action per table (`dataplane::plan::choose`)
//! - `route_link_gone`: a container's host interface going, applied to the kept route table
//!   (`RouteTable::apply`; the clone of the table is set-up, not timed)
//!
//! Run: `cargo bench --bench pure` (add `-- store_parse` etc. to filter).

mod common;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use egress_guard::config::Config;
use egress_guard::dataplane::{AgentTable, FullSyncReason, SyncAction, TableAction, plan};
use egress_guard::inventory::RouteTable;
use egress_guard::inventory::store::{Parsed, ReadKind, StoreEntry, StoreReader, parse_store};
use egress_guard::policy::{self, Dirty, ExemptKey, Inputs, Planner};

/// The same action for both tables.
fn both(action: TableAction) -> SyncAction {
    SyncAction {
        tables: AgentTable::ALL
            .iter()
            .map(|t| (*t, action.clone()))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn benches(c: &mut Criterion) {
    // `EGRESS_GUARD_BENCH_RULES=50`: the same with that many `[[rules]]` scoped to the
    // containers' spaces (as the cell bench sets them).
    let rules: usize = std::env::var("EGRESS_GUARD_BENCH_RULES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let config = Config::parse(&common::rules_toml(rules)).expect("bench rules are valid");

    let mut group = c.benchmark_group("store_parse");
    for n in common::COUNTS {
        let bytes = common::store_bytes(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &bytes, |b, bytes| {
            b.iter(|| parse_store(Path::new("store.json"), black_box(bytes)).expect("parses"))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("store_incremental");
    for n in common::COUNTS {
        let base = common::store_bytes(n);
        let mut entries = common::store_entries(n);
        let added = common::handle(1, n);
        let ip = Ipv4Addr::new(10, 255, 250, 2);
        entries.insert(
            added.clone(),
            common::entry(&added, ip, common::Workload::Staging),
        );
        let plus_one = serde_json::to_vec(&entries).expect("serialise store");
        let mut reader = StoreReader::new(PathBuf::from("store.json"));
        reader.apply_bytes(&base, false).expect("parses");
        group.throughput(Throughput::Elements(n as u64));
        // Outside the routine, which criterion calls once per sample: the reader's document
        // must alternate across calls too.
        let mut add = true;
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let bytes = if add { &plus_one } else { &base };
                add = !add;
                let delta = reader.apply_bytes(black_box(bytes), false).expect("parses");
                // The entries of the blocks around the change (4 KiB, ~6 entries, each side).
                assert!(matches!(
                    reader.last_read(),
                    Some(ReadKind::Incremental { reparsed }) if reparsed <= 16
                ));
                assert_eq!(delta.changed.len(), 1);
                delta
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("store_full_read");
    for n in common::COUNTS {
        let bytes = common::store_bytes(n);
        let mut reader = StoreReader::new(PathBuf::from("store.json"));
        reader.apply_bytes(&bytes, true).expect("parses");
        group.throughput(Throughput::Elements(n as u64));
        // What a verifying pass does with the store (under silk's lock, as the file is read):
        // hash it and parse it in regions, comparing with the entries it has.
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let delta = reader.apply_bytes(black_box(&bytes), true).expect("parses");
                assert_eq!(reader.last_read(), Some(ReadKind::Full));
                assert!(delta.changed.is_empty());
                delta
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("policy_plan");
    for n in common::COUNTS {
        let inventory = common::inventory(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &inventory, |b, inv| {
            b.iter(|| policy::plan(&config, black_box(inv)))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("policy_update");
    for n in common::COUNTS {
        let inventory = common::inventory(n);
        let mut entries: BTreeMap<String, Parsed> = inventory
            .store
            .entries
            .iter()
            .map(|e| (e.handle.to_string(), Ok(e.clone())))
            .collect();
        // One staging container, routed, whose store entry comes and goes.
        let ip = Ipv4Addr::new(10, 255, 250, 2);
        let handle = common::handle(1, n);
        let mut routes = inventory.kernel.routes.clone();
        routes.insert(ip, 90_000);
        let mut planner = Planner::new(&config);
        fn inputs<'a>(
            entries: &'a BTreeMap<String, Parsed>,
            routes: &'a BTreeMap<Ipv4Addr, u32>,
            inventory: &'a egress_guard::inventory::Inventory,
        ) -> Inputs<'a> {
            Inputs {
                entries,
                routes,
                routes6: &inventory.kernel.routes6,
                links: &inventory.kernel.links,
            }
        }
        planner.update(inputs(&entries, &routes, &inventory), &Dirty::everything());
        let dirty = Dirty {
            handles: [handle.clone()].into(),
            ..Dirty::default()
        };
        let staging = StoreEntry {
            handle: handle.as_str().into(),
            ip,
            workload: Some("staging".into()),
            app_id: None,
            space_id: None,
            org_id: None,
            log_index: None,
        };
        group.throughput(Throughput::Elements(n as u64));
        // As for store_incremental: the toggle lives outside the routine.
        let mut add = true;
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                if add {
                    entries.insert(handle.clone(), Ok(staging.clone()));
                } else {
                    entries.remove(&handle);
                }
                add = !add;
                let changes =
                    planner.update(inputs(black_box(&entries), &routes, &inventory), &dirty);
                // Its entry and the unclaimed-route decision it replaces (or the reverse).
                assert_eq!(changes.len(), 2);
                changes
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decode_listing");
    for n in common::COUNTS {
        let plan = policy::plan(&config, &common::inventory(n));
        let bytes = common::listing_bytes(&plan.rules);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &bytes, |b, bytes| {
            b.iter(|| {
                let seen = common::observed(black_box(bytes));
                assert_eq!(
                    seen[&AgentTable::Owned].exempt.as_ref(),
                    Some(&plan.rules.exempt)
                );
                seen
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("encode_full_sync");
    let full = both(TableAction::Full(FullSyncReason::TableMissing));
    for n in common::COUNTS {
        let plan = policy::plan(&config, &common::inventory(n));
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &plan.rules, |b, rules| {
            b.iter(|| full.batch(Some(black_box(rules))).encode(1))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("encode_element_update");
    let add = both(TableAction::Elements {
        add: vec![ExemptKey {
            ifindex: 70_000,
            ip: Ipv4Addr::new(10, 255, 200, 7),
        }],
        remove: Vec::new(),
        add6: Vec::new(),
        remove6: Vec::new(),
        add_containers6: Vec::new(),
        remove_containers6: Vec::new(),
        add_scopes: Vec::new(),
        remove_scopes: Vec::new(),
    });
    group.bench_function("one_add", |b| {
        b.iter(|| black_box(&add).batch(None).encode(1))
    });
    group.finish();

    let mut group = c.benchmark_group("choose_action");
    for n in common::COUNTS {
        let plan = policy::plan(&config, &common::inventory(n));
        let seen = common::observed(&common::listing_bytes(&plan.rules));
        let action = plan::choose(Some(&plan.rules), &AgentTable::ALL, &seen, common::OWN_PORT);
        assert!(action.is_nothing(), "the listing reads back as the plan");
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &seen, |b, seen| {
            b.iter(|| {
                plan::choose(
                    Some(black_box(&plan.rules)),
                    &AgentTable::ALL,
                    seen,
                    common::OWN_PORT,
                )
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("route_link_gone");
    for n in common::COUNTS {
        let (table, gone) = RouteTable::containers_for_bench(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &table, |b, table| {
            b.iter_batched(
                || table.clone(),
                |mut table| {
                    assert!(table.apply(black_box(&gone)));
                    table
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(pure, benches);
criterion_main!(pure);
