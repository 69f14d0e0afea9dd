//! A scratch "cell" made of network namespaces, deleted when dropped (also on panic):
//!
//! ```text
//!   <p>-vpc  10.0.0.10/24 ── up-vpc  10.0.0.1/24 ──┐
//!                                                   <p>-cell (ip_forward=1, no NAT)
//!   <p>-inet 203.0.113.10/24 ── up-inet 203.0.113.1/24 ┘  10.0.0.0/8 via vpc, default via inet
//!
//!   real containers (own netns): eth0 <ip>/32, default via 169.254.0.1 ── s-<ip> in the cell
//!     (169.254.0.1/32 on the host side, /32 host route to <ip>): silk's wiring.
//!   filler containers: a veth s-<ip> in the cell with a /32 host route to <ip> and a store
//!     entry, its peer (up, no address) parked in one shared `<p>-park` namespace instead of a
//!     namespace of its own. The cell namespace, which is all the agent sees, looks exactly as
//!     with real containers, at a fraction of the cost. They send no traffic.
//! ```
//!
//! Namespaces are named `egb-<owner>-…` (see `egress_guard_testkit::netns`); ones left by a
//! bench process that no longer exists (killed with SIGKILL) are deleted at start.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use egress_guard_testkit::netns;
use egress_guard_testkit::store::Store;
use serde_json::Value;
use tempfile::TempDir;

use super::cmd::{enter_netns, ip_batch, ns_run, ns_try_run, run};
use crate::common::{self, Workload};

pub const CELL_VPC_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const VPC_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
pub const CELL_INET_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const INET_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// silk's gateway address on every host-side veth.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);
/// TCP port of the listener in the internet namespace (exemption probes).
pub const PROBE_PORT: u16 = 8080;
/// UDP port the traffic generator sends to; the VPC and internet namespaces count and drop it.
pub const SINK_PORT: u16 = 9;

/// A container with its own namespace, able to send traffic.
#[derive(Clone, Debug)]
pub struct RealContainer {
    pub ns: String,
    pub ip: Ipv4Addr,
    pub host_if: String,
    pub handle: String,
}

pub struct ScratchCell {
    pub prefix: String,
    pub cell: String,
    pub vpc: String,
    pub inet: String,
    /// Where filler containers' veth peers live.
    pub park: String,
    pub store: Store,
    /// Filler containers wired so far (indexes 0..fillers).
    pub fillers: usize,
    namespaces: Vec<String>,
    dir: TempDir,
    listener_stop: Arc<AtomicBool>,
    listener: Option<JoinHandle<()>>,
}

impl ScratchCell {
    pub fn new() -> ScratchCell {
        netns::sweep_stale(&["egb"]);
        let prefix = format!("egb-{}", netns::my_tag());
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()
            .expect("temp dir");
        let store = Store::new(&dir.path().join("container-metadata")).without_sync();
        let mut cell = ScratchCell {
            cell: format!("{prefix}-cell"),
            vpc: format!("{prefix}-vpc"),
            inet: format!("{prefix}-inet"),
            park: format!("{prefix}-park"),
            prefix,
            store,
            fillers: 0,
            namespaces: Vec::new(),
            dir,
            listener_stop: Arc::new(AtomicBool::new(false)),
            listener: None,
        };
        cell.build();
        cell
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Creates namespace `<prefix>-<suffix>` (deleted on drop) with `lo` up; returns its name.
    pub fn add_ns(&mut self, suffix: &str) -> String {
        let name = format!("{}-{suffix}", self.prefix);
        netns::add(&name);
        self.namespaces.push(name.clone());
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        // No IPv6: nothing here uses it, and 5,000 links' addrconf is setup time and noise.
        for k in ["all", "default"] {
            ns_run(
                &name,
                "sysctl",
                &["-qw", &format!("net.ipv6.conf.{k}.disable_ipv6=1")],
                None,
            );
        }
        name
    }

    fn build(&mut self) {
        let (c, v, i) = (self.add_ns("cell"), self.add_ns("vpc"), self.add_ns("inet"));
        self.add_ns("park");
        for kv in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            ns_run(&c, "sysctl", &["-qw", kv], None);
        }
        for (peer, link, cell_ip, host_ip) in [
            (&v, "up-vpc", CELL_VPC_IP, VPC_HOST),
            (&i, "up-inet", CELL_INET_IP, INET_HOST),
        ] {
            ip_batch(
                &c,
                &format!(
                    "link add {link} type veth peer name eth0 netns {peer}\n\
                     addr add {cell_ip}/24 dev {link}\n\
                     link set {link} up\n"
                ),
            );
            ip_batch(
                peer,
                &format!(
                    "addr add {host_ip}/24 dev eth0\n\
                     link set eth0 up\n\
                     route add 10.255.0.0/16 via {cell_ip}\n"
                ),
            );
            // Count and drop the generator's traffic where it arrives.
            ns_run(
                peer,
                "nft",
                &["-f", "-"],
                Some(
                    format!(
                        "table inet sink {{\n counter udp_in {{ }}\n chain pre {{ type filter hook prerouting priority -300; policy accept;\n  udp dport {SINK_PORT} counter name \"udp_in\" drop\n }}\n}}\n"
                    )
                    .as_bytes(),
                ),
            );
        }
        ip_batch(
            &c,
            &format!("route add 10.0.0.0/8 via {VPC_HOST}\nroute add default via {INET_HOST}\n"),
        );
        self.start_listener();
    }

    /// TCP listener in the internet namespace: accepts and closes (exemption probes).
    fn start_listener(&mut self) {
        let ns = self.inet.clone();
        let stop = self.listener_stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        self.listener = Some(std::thread::spawn(move || {
            enter_netns(&ns);
            let listener = TcpListener::bind((INET_HOST, PROBE_PORT)).expect("bind probe port");
            listener.set_nonblocking(true).expect("nonblocking");
            tx.send(()).expect("report bound");
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => drop(stream),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        }));
        rx.recv().expect("listener started");
    }

    /// Wires fillers `self.fillers..n` (veth + host route + store entry) and rewrites the
    /// store once.
    pub fn grow_fillers(&mut self, n: usize) {
        let mut batch = String::new();
        let mut peers = String::new();
        for i in self.fillers..n {
            let ip = common::container_ip(i);
            let dev = common::host_if(ip);
            batch.push_str(&format!(
                "link add {dev} type veth peer name f{i} netns {park}\n\
                 link set {dev} up\n\
                 route add {ip}/32 dev {dev}\n",
                park = self.park
            ));
            peers.push_str(&format!("link set f{i} up\n"));
            let handle = common::handle(0, i);
            let entry = common::entry(&handle, ip, common::workload(i));
            self.store.entries_mut().insert(handle, entry);
        }
        ip_batch(&self.cell, &batch);
        ip_batch(&self.park, &peers);
        self.fillers = self.fillers.max(n);
        self.store.write();
    }

    /// The veth commands for a container at `ip` in namespace `ns`, silk-style.
    pub fn wire(&self, ns: &str, ip: Ipv4Addr) -> String {
        let dev = common::host_if(ip);
        ip_batch(
            &self.cell,
            &format!(
                "link add {dev} type veth peer name eth0 netns {ns}\n\
                 addr add {GATEWAY}/32 dev {dev}\n\
                 link set {dev} up\n\
                 route add {ip}/32 dev {dev}\n"
            ),
        );
        ip_batch(
            ns,
            &format!(
                "addr add {ip}/32 dev eth0\n\
                 link set eth0 up\n\
                 route add {GATEWAY} dev eth0 scope link\n\
                 route add default via {GATEWAY} dev eth0\n"
            ),
        );
        dev
    }

    /// Deletes the host side of a veth (the container side goes with it).
    pub fn unwire(&self, dev: &str) {
        ip_batch(&self.cell, &format!("link del {dev}\n"));
    }

    /// A container with its own namespace and a store entry of `workload`.
    pub fn add_real(&mut self, name: &str, ip: Ipv4Addr, workload: Workload) -> RealContainer {
        let ns = self.add_ns(name);
        let host_if = self.wire(&ns, ip);
        let handle = common::handle(1, u32::from(ip) as usize);
        let entry = common::entry(&handle, ip, workload);
        self.store.entries_mut().insert(handle.clone(), entry);
        self.store.write();
        RealContainer {
            ns,
            ip,
            host_if,
            handle,
        }
    }

    pub fn nft(&self, args: &[&str]) -> std::process::Output {
        ns_try_run(&self.cell, "nft", args, None)
    }

    /// Deletes `inet egress_guard`, as `nft flush ruleset` would. The owned table cannot be
    /// deleted from outside (the kernel refuses); it goes when its owner's socket closes.
    pub fn delete_table(&self) {
        let _ = self.nft(&["delete", "table", "inet", "egress_guard"]);
    }

    /// Elements in the exempt set of `table` (0 when the table is missing).
    pub fn exempt_len_in(&self, table: &str) -> usize {
        let out = self.nft(&["-j", "list", "set", "inet", table, "exempt"]);
        let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) else {
            return 0;
        };
        v["nftables"]
            .as_array()
            .and_then(|a| a.iter().find_map(|o| o.get("set")?.get("elem")?.as_array()))
            .map_or(0, Vec::len)
    }

    /// Elements in the agent's exempt sets: the smaller count of its two tables.
    pub fn exempt_len(&self) -> usize {
        self.exempt_len_in("egress_guard")
            .min(self.exempt_len_in("egress_guard_owned"))
    }

    /// Whether the owned table exists (its owner is alive).
    pub fn has_owned_table(&self) -> bool {
        self.nft(&["list", "table", "inet", "egress_guard_owned"])
            .status
            .success()
    }

    /// Packets the sink in `ns` (vpc or inet) has counted.
    pub fn sink_packets(&self, ns: &str) -> u64 {
        let out = ns_run(
            ns,
            "nft",
            &["-j", "list", "counter", "inet", "sink", "udp_in"],
            None,
        );
        let v: Value = serde_json::from_str(&out).expect("nft -j is JSON");
        v["nftables"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find_map(|o| o.get("counter")?.get("packets")?.as_u64())
            })
            .expect("sink counter")
    }

    /// Packets the cell received on host interface `dev` (what the container sent into it).
    pub fn rx_packets(&self, dev: &str) -> u64 {
        let out = run(
            "ip",
            &["-n", &self.cell, "-s", "-j", "link", "show", "dev", dev],
        );
        let v: Value = serde_json::from_str(&out).expect("ip -j is JSON");
        v[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .expect("rx packets")
    }
}

impl Drop for ScratchCell {
    fn drop(&mut self) {
        self.listener_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.listener.take() {
            let _ = t.join();
        }
        for ns in self.namespaces.drain(..).rev() {
            let _ = netns::delete(&ns);
        }
    }
}
