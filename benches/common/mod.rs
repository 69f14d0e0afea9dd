//! Synthetic cells for the benchmarks: a silk-format metadata store, the kernel view that goes
//! with it, and the netlink listing of the agent's tables it reads back, for any number of
//! containers.
//!
//! Shared by the `pure` (criterion) and `cell` (root) bench targets; each uses a subset, hence
//! the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use egress_guard::dataplane::netlink::Listing;
use egress_guard::dataplane::netlink::socket::decode_reply;
use egress_guard::dataplane::{AgentTable, ObservedTable, plan};
use egress_guard::inventory::{Inventory, KernelView, StoreSnapshot};
use egress_guard::policy::DesiredRules;
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nftables::{
    NfTablesMessage, TableAttribute, TableFlags, TableMessage,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use serde_json::{Value, json};

/// The container counts measured by default (a small cell to a large one).
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
    // Containers spread over SPACES spaces in ORGS orgs (what `[[rules]]` scopes name).
    let n = u32::from(ip) as usize;
    json!({
        "handle": handle,
        "ip": ip.to_string(),
        "metadata": {
            "app_id": app,
            "space_id": space_guid(n % SPACES),
            "org_id": org_guid(n % ORGS),
            "policy_group_id": app,
            "ports": "8080,2222",
            "container_workload": workload.as_str(),
            "log_config": format!(
                "{{\"guid\":\"{app}\",\"index\":0,\"source_name\":\"CELL\",\"tags\":{{\"app_id\":\"{app}\",\"app_name\":\"bench\",\"instance_id\":\"0\",\"organization_name\":\"bench-org\",\"process_type\":\"web\",\"space_name\":\"bench\"}}}}"
            ),
        }
    })
}

/// How many spaces and orgs the bench's containers are spread over.
pub const SPACES: usize = 20;
pub const ORGS: usize = 5;

pub fn space_guid(i: usize) -> String {
    format!("5ace0000-0000-4000-8000-{i:012}")
}

pub fn org_guid(i: usize) -> String {
    format!("0a90000{}-0000-4000-8000-000000000000", i % 10)
}

/// `rules` `[[rules]]` entries, each scoped to three of the bench's spaces (and every fifth
/// also to an org): TCP to one TEST-NET-2 address on two ports, as a segment with a rule per
/// tenant service would have them.
pub fn rules_toml(rules: usize) -> String {
    let mut out = String::new();
    for r in 0..rules {
        let spaces: Vec<String> = (0..3)
            .map(|k| format!("{:?}", space_guid((r * 3 + k) % SPACES)))
            .collect();
        let orgs = if r % 5 == 0 {
            format!("orgs = [{:?}]\n", org_guid(r % ORGS))
        } else {
            String::new()
        };
        out.push_str(&format!(
            "\n[[rules]]\ndescription = \"tenant service {r}\"\ndestination = \"198.51.100.{}\"\n\
             protocol = \"tcp\"\nports = \"5432,{}\"\nspaces = [{}]\n{orgs}",
            r % 250 + 1,
            6000 + r,
            spaces.join(", ")
        ));
    }
    out
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

/// The netlink port id the synthetic listings give the owned table's owner.
pub const OWN_PORT: u32 = 4242;

/// What a dump of the agent's two tables would return holding `rules`: each table's creation
/// messages read back as NEW* replies (the kernel answers dumps with the same message types and
/// attributes, plus handles and use counts the decoder ignores), after a table message that
/// carries the use count (the model's chains, sets and counters, as the kernel counts them)
/// and, for the owned table, its owner.
/// Encoded as the kernel would send them: whole netlink messages, back to back.
pub fn listing_bytes(rules: &DesiredRules) -> Vec<u8> {
    let mut out = Vec::new();
    for table in AgentTable::ALL {
        let mut attributes = vec![
            TableAttribute::Name(table.name().into()),
            TableAttribute::Flags(TableFlags::from_bits_retain(table.flags())),
            TableAttribute::Use(egress_guard::dataplane::model::shape(table, rules).objects),
        ];
        if table == AgentTable::Owned {
            attributes.push(TableAttribute::Owner(OWN_PORT));
        }
        push_message(
            &mut out,
            NfTablesMessage::NewTable(TableMessage { attributes }),
        );
        for message in messages(&plan::create(table, rules).encode(1).bytes) {
            if !matches!(message, NfTablesMessage::NewTable(_)) {
                push_message(&mut out, message);
            }
        }
    }
    out
}

fn push_message(out: &mut Vec<u8>, message: NfTablesMessage) {
    let inner = NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
        message,
    );
    let mut message = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::InnerMessage(inner),
    );
    message.finalize();
    let start = out.len();
    out.resize(start + message.buffer_len(), 0);
    message.serialize(&mut out[start..]);
}

/// The nf_tables messages in `bytes` (whole netlink messages back to back), as the agent's
/// socket parses a dump's replies; batch begin/end and other messages are skipped.
pub fn messages(bytes: &[u8]) -> Vec<NfTablesMessage> {
    let mut found = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 4 {
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        // NFNL_MSG_BATCH_BEGIN and _END frame a batch; everything else is a table's message.
        let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
        if kind != 0x10 && kind != 0x11 {
            found.push(decode_reply(&rest[..len]).expect("message parses"));
        }
        rest = &rest[((len + 3) & !3).min(rest.len())..];
    }
    found
}

/// The agent's tables as a [`Listing`] of `bytes` reads them back.
pub fn observed(bytes: &[u8]) -> BTreeMap<AgentTable, ObservedTable> {
    let mut listing = Listing::default();
    for message in messages(bytes) {
        listing.add(&message);
    }
    listing.finish()
}
