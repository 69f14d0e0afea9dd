//! The pure parts of one reconcile pass, at 10 to 5,000 containers (no root, no kernel):
//!
//! - `store_parse`: silk's store.json bytes -> `StoreSnapshot` (`inventory::store::parse_store`)
//! - `policy_plan`: (config, inventory) -> plan (`policy::plan`)
//! - `observe_listing`: `nft -j list table` output -> observed table (`dataplane::observe`)
//! - `render_full_sync`: plan -> full-sync nft JSON text (`render::full_sync(..).to_json()`)
//! - `render_element_update`: one added exemption -> nft JSON text
//! - `choose_action`: desired vs observed -> the transaction to apply
//!
//! Run: `cargo bench --bench pure` (add `-- store_parse` etc. to filter).

mod common;

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::path::Path;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use egress_guard::config::Config;
use egress_guard::dataplane::{self, observe, render};
use egress_guard::inventory::store::parse_store;
use egress_guard::policy::{self, ExemptKey};

fn benches(c: &mut Criterion) {
    let config = Config::default();

    let mut group = c.benchmark_group("store_parse");
    for n in common::COUNTS {
        let bytes = common::store_bytes(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &bytes, |b, bytes| {
            b.iter(|| parse_store(Path::new("store.json"), black_box(bytes)).expect("parses"))
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

    let mut group = c.benchmark_group("observe_listing");
    for n in common::COUNTS {
        let inventory = common::inventory(n);
        let plan = policy::plan(&config, &inventory);
        let listing = common::listing(&plan.rules, &inventory.kernel);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &listing, |b, listing| {
            b.iter(|| {
                let seen = observe::parse_listing(black_box(listing), &inventory.kernel)
                    .expect("listing parses");
                assert_eq!(seen.exempt.as_ref(), Some(&plan.rules.exempt));
                seen
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("render_full_sync");
    for n in common::COUNTS {
        let plan = policy::plan(&config, &common::inventory(n));
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &plan.rules, |b, rules| {
            b.iter(|| render::full_sync(black_box(rules)).to_json())
        });
    }
    group.finish();

    let mut group = c.benchmark_group("render_element_update");
    let add = [ExemptKey {
        ifindex: 70_000,
        ip: Ipv4Addr::new(10, 255, 200, 7),
    }];
    group.bench_function("one_add", |b| {
        b.iter(|| render::element_update(black_box(&add), &[]).to_json())
    });
    group.finish();

    let mut group = c.benchmark_group("choose_action");
    for n in common::COUNTS {
        let inventory = common::inventory(n);
        let plan = policy::plan(&config, &inventory);
        let listing = common::listing(&plan.rules, &inventory.kernel);
        let seen = observe::parse_listing(&listing, &inventory.kernel).expect("parses");
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &seen, |b, seen| {
            b.iter(|| dataplane::choose_action(Some(black_box(&plan.rules)), Some(seen)))
        });
    }
    group.finish();
}

criterion_group!(pure, benches);
criterion_main!(pure);
