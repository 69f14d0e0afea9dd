//! Synthetic cells for the benchmarks: a silk-format metadata store, the kernel view that goes
//! with it, and the `nft -j list` output the agent reads back, for any number of containers.
//!
//! Shared by the `pure` (criterion) and `cell` (root) bench targets; each uses a subset, hence
//! the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use egress_guard::dataplane::render::{
    COUNTER_OTHER, COUNTER_TCP, EXEMPT_SET, FAMILY, TABLE, skeleton,
};
use egress_guard::inventory::{Inventory, KernelView, StoreSnapshot};
use egress_guard::policy::DesiredRules;
use serde_json::{Value, json};

/// The container counts the issue asks for.
pub const COUNTS: [usize; 5] = [10, 100, 250, 1_000, 5_000];

/// What a container runs. The mix is a busy isolation segment: 90% app instances, 5% tasks,
/// 5% staging (the exempt set holds the staging ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    App,
    Task,
    Staging,
}

impl Workload {
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::App => "app",
            Workload::Task => "task",
            Workload::Staging => "staging",
        }
    }
}

/// The workload of filler container `i`.
pub fn workload(i: usize) -> Workload {
    match i % 20 {
        0 => Workload::Staging,
        1 => Workload::Task,
        _ => Workload::App,
    }
}

/// Overlay IP of filler container `i`: 250 per /24 from 10.255.0.2, so 5,000 fit in
/// 10.255.0.0–10.255.19.255 (a real cell leases one /24; the bench packs more on one "cell").
pub fn container_ip(i: usize) -> Ipv4Addr {
    let third = u8::try_from(i / 250).expect("fewer than 64,000 fillers");
    let fourth = u8::try_from(i % 250 + 2).expect("below 252");
    Ipv4Addr::new(10, 255, third, fourth)
}

/// silk's host-side interface name for `ip`: `s-` + four zero-padded 3-digit groups.
pub fn host_if(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("s-{a:03}{b:03}{c:03}{d:03}")
}

/// A Garden-style handle (GUID shaped), unique per `(tag, i)`. The first group is a bijective
/// mix of `i`, so (as with real random GUIDs) the first 20 characters, which silk keeps in its
/// iptables chain names, are unique too.
pub fn handle(tag: u32, i: usize) -> String {
    let i = u32::try_from(i).expect("fewer than 2^32 containers");
    let first = i.wrapping_mul(0x9e37_79b1) ^ 0x6f2c_0a6e;
    format!(
        "{first:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        tag & 0xffff,
        (i >> 12) & 0xfff,
        i & 0xfff,
        u64::from(i).wrapping_mul(0x9e37_79b9_7f4a) & 0xffff_ffff_ffff
    )
}

/// One store entry exactly as silk's cni-wrapper-plugin writes it (every metadata value a
/// string, `log_config` itself JSON text), about 600 bytes.
pub fn entry(handle: &str, ip: Ipv4Addr, workload: Workload) -> Value {
    let app = format!("a{}", &handle[1..]);
    json!({
        "handle": handle,
        "ip": ip.to_string(),
        "metadata": {
            "app_id": app,
            "space_id": "3d2b7f61-5c4e-4a7b-9d0e-2f6a1b8c9d0e",
            "org_id": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
            "policy_group_id": app,
            "ports": "8080,2222",
            "container_workload": workload.as_str(),
            "log_config": format!(
                "{{\"guid\":\"{app}\",\"index\":0,\"source_name\":\"CELL\",\"tags\":{{\"app_id\":\"{app}\",\"app_name\":\"bench\",\"instance_id\":\"0\",\"organization_name\":\"bench-org\",\"process_type\":\"web\",\"space_name\":\"bench\"}}}}"
            ),
        }
    })
}

/// The store document for `n` filler containers.
pub fn store_entries(n: usize) -> BTreeMap<String, Value> {
    (0..n)
        .map(|i| {
            let h = handle(0, i);
            let e = entry(&h, container_ip(i), workload(i));
            (h, e)
        })
        .collect()
}

/// `store_entries(n)` serialised the way silk writes it (compact JSON).
pub fn store_bytes(n: usize) -> Vec<u8> {
    serde_json::to_vec(&store_entries(n)).expect("serialise store")
}

/// First ifindex handed to fillers in synthetic kernel views (after lo and the uplinks).
pub const FIRST_IFINDEX: u32 = 10;

/// The kernel view of `n` fillers: one host interface and one /32 route each.
pub fn kernel_view(n: usize) -> KernelView {
    let mut view = KernelView::default();
    view.links.insert(1, "lo".into());
    view.links.insert(2, "up-vpc".into());
    view.links.insert(3, "up-inet".into());
    for i in 0..n {
        let ip = container_ip(i);
        let ifindex = FIRST_IFINDEX + u32::try_from(i).expect("small");
        view.routes.insert(ip, ifindex);
        view.links.insert(ifindex, host_if(ip));
    }
    view
}

/// A parsed store plus kernel view for `n` fillers.
pub fn inventory(n: usize) -> Inventory {
    let store: StoreSnapshot = egress_guard::inventory::store::parse_store(
        std::path::Path::new("bench/store.json"),
        &store_bytes(n),
    )
    .expect("synthetic store parses");
    Inventory {
        store,
        kernel: kernel_view(n),
    }
}

/// What `nft -j list table inet egress_guard` prints for `rules`: the skeleton with handles
/// and counter values added, and the exempt elements with the interface printed by name (nft
/// does so when the interface exists), so a read-back has to map every name to an ifindex.
pub fn listing(rules: &DesiredRules, kernel: &KernelView) -> Value {
    let sk = skeleton(rules);
    let mut handle = 0u32;
    let mut next = || {
        handle += 1;
        handle
    };
    let mut objects = vec![
        json!({"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}),
    ];
    let mut table = sk.table.clone();
    table["handle"] = json!(next());
    objects.push(json!({ "table": table }));
    for (mut counter, name) in sk.counters.into_iter().zip([COUNTER_TCP, COUNTER_OTHER]) {
        counter["handle"] = json!(next());
        counter["packets"] = json!(0);
        counter["bytes"] = json!(0);
        debug_assert_eq!(counter["name"], name);
        objects.push(json!({ "counter": counter }));
    }
    let mut set = sk.set.clone();
    set["handle"] = json!(next());
    let elem: Vec<Value> = rules
        .exempt
        .iter()
        .map(|k| {
            let iface = kernel
                .links
                .get(&k.ifindex)
                .cloned()
                .unwrap_or_else(|| k.ifindex.to_string());
            json!({ "concat": [iface, k.ip.to_string()] })
        })
        .collect();
    if !elem.is_empty() {
        set["elem"] = Value::Array(elem);
    }
    debug_assert_eq!(set["name"], EXEMPT_SET);
    objects.push(json!({ "set": set }));
    for mut chain in sk.chains {
        chain["handle"] = json!(next());
        objects.push(json!({ "chain": chain }));
    }
    for (chain, expr) in sk.rules {
        objects.push(json!({ "rule": {
            "family": FAMILY, "table": TABLE, "chain": chain, "handle": next(), "expr": expr,
        }}));
    }
    json!({ "nftables": objects })
}
