//! The simulated Diego cell: namespaces, uplinks, CNI-wired containers, the metadata store,
//! echo servers, nft inspection, and the agent. Dropping a [`Cell`] kills the agent and deletes
//! every namespace it created (also on panic, after printing diagnostics).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use super::agent::{Agent, AgentConfig};
use super::cmd::{self, ns_run, ns_try_run, run};
use super::netns;
use super::probe::{self, HitLog, Reach, Servers, TCP_PORT, UDP_PORT};
use super::require_root;
use super::store::{Kind, Store};

/// The VPC host (in `<p>-vpc`).
pub const VPC_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
/// The cell's address on the VPC link.
pub const CELL_VPC_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The "internet" host (in `<p>-inet`), TEST-NET-3.
pub const INET_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The cell's address on the internet link.
pub const CELL_INET_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The cell's link-local DNS resolver address (on the cell's loopback).
pub const RESOLVER: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 2);
/// Port of the resolver stand-in (UDP and TCP echo).
pub const DNS_PORT: u16 = 53;
/// This cell's overlay /24 (each test has its own namespaces, so all cells may share it).
pub const CELL_SUBNET: &str = "10.255.7.0/24";

/// The table egress-guard owns.
pub const TABLE: &str = "egress_guard";

// Dual-stack cells only ([`Cell::new_dual_stack`]). The containers' IPv6 prefix is global
// unicast (documentation range), outside the VPC's fd00::/8, so that container-to-container
// traffic is allowed by what makes it container-to-container, not by `allowed_networks`.

/// The VPC host over IPv6 (in `<p>-vpc`), inside [`VPC6_NETWORK`].
pub const VPC6_HOST: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 0x10);
/// The cell's IPv6 address on the VPC link.
pub const CELL_VPC6_IP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 1);
/// The IPv6 network a dual-stack cell's agent is told to allow (beside 10.0.0.0/8).
pub const VPC6_NETWORK: &str = "fd00::/8";
/// The "internet" host over IPv6 (in `<p>-inet`), documentation range 2001:db8::/32.
pub const INET6_HOST: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 0x10);
/// The cell's IPv6 address on the internet link.
pub const CELL_INET6_IP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 1);
/// This cell's IPv6 container prefix (host-local's second range).
pub const CELL_SUBNET6: &str = "2001:db8:ff:7::/64";
/// What the VPC and internet hosts route to the cell for IPv6 (every cell's container prefix).
pub const OVERLAY6_ROUTE: &str = "2001:db8:ff::/48";
/// The containers' IPv6 gateway: host-local's first address, which ptp puts (as a /128) on
/// every host-side veth.
pub const CELL_GW6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 7, 0, 0, 0, 1);

/// Which IP stacks a simulated cell runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// IPv4 only, IPv6 enabled in the kernel but unused ([`Cell::new`]): the cell every
    /// other suite uses.
    Ipv4,
    /// IPv4 and IPv6 ([`Cell::new_dual_stack`]), uplinks that are bridges (as a NIC would be).
    Dual,
    /// IPv4 and IPv6 with the cell's uplinks plain veths, as on a BOSH-lite cell (a container
    /// itself) or any cell running in a container ([`Cell::new_dual_stack_veth_uplink`]).
    DualVethUplink,
    /// IPv4 only, IPv6 disabled in the cell namespace (`net.ipv6.conf.{all,default}.disable_ipv6=1`,
    /// [`Cell::new_ipv6_disabled`]), as on a cell whose stemcell disables IPv6.
    Ipv6Disabled,
}

static CELL_COUNTER: AtomicUsize = AtomicUsize::new(0);
static STALE_CLEANUP: Once = Once::new();

/// One container: its own namespace, wired by the ptp CNI plugin from the cell namespace.
#[derive(Clone, Debug)]
pub struct Container {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The container's IPv6 address (dual-stack cells only; never in the store, as silk
    /// writes only `ip`).
    pub ip6: Option<Ipv6Addr>,
    /// Host-side veth in the cell namespace.
    pub host_if: String,
    pub handle: String,
    pub kind: Kind,
    cni_id: String,
    cni_conf: String,
}

struct Slot {
    ctr: Container,
    _servers: Vec<Servers>,
}

pub struct Cell {
    /// Namespace prefix, `egt-<owner>-<n>` (see [`netns`]).
    pub prefix: String,
    /// The cell (host) namespace.
    pub cell: String,
    pub vpc: String,
    pub inet: String,
    pub store: Store,
    /// Which IP stacks the cell runs.
    pub stack: Stack,
    /// What every echo server in this cell received.
    pub hits: HitLog,
    containers: BTreeMap<String, Slot>,
    infra_servers: Vec<Servers>,
    /// The echo servers standing in for the cell's resolver (169.254.0.2:53).
    resolver_stand_in: Option<Servers>,
    namespaces: Vec<String>,
    agent: Option<Agent>,
    agents_started: usize,
    health_port: u16,
    tmp: TempDir,
}

/// Deletes `egt-<owner>-…` namespaces and temporary directories left behind by runs that are
/// gone (a test run or the demo killed with SIGKILL, or cut off mid-cleanup; their agents died
/// with them, see `PR_SET_PDEATHSIG` in the agent module). Those of live runs are left alone.
pub fn sweep_stale() -> Vec<String> {
    netns::sweep_stale(&["egt"])
}

/// The part of an ingress counter's name that stands for `src`.
fn ingress_tag(src: IpAddr) -> String {
    src.to_string().replace(['.', ':'], "_")
}

/// Writes a sysctl inside namespace `ns` (via /proc/sys from a thread in that namespace).
fn ns_sysctl(ns: &str, key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    probe::in_netns(ns, || {
        std::fs::write(&path, value)
            .unwrap_or_else(|e| panic!("sysctl {key}={value} in {ns}: {e}"));
    });
}

/// The `table inet …` blocks of `render`'s text, each from its `table` line to its closing
/// brace (comment lines left out).
pub fn table_blocks(rendered: &str) -> Vec<String> {
    let mut tables: Vec<String> = Vec::new();
    for line in rendered.lines().filter(|l| !l.starts_with('#')) {
        if line.starts_with("table inet ") {
            tables.push(String::new());
        }
        if let Some(block) = tables.last_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    tables
}

/// Writes a sysctl inside namespace `ns` (for tests: e.g. a cell that disables IPv6 later).
pub fn sysctl(ns: &str, key: &str, value: &str) {
    ns_sysctl(ns, key, value);
}

/// Reads a sysctl inside namespace `ns`.
pub fn read_sysctl(ns: &str, key: &str) -> String {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    probe::in_netns(ns, || {
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read sysctl {key} in {ns}: {e}"))
            .trim()
            .to_string()
    })
}

/// Whether the `egress-guard` binary under test accepts an IPv6 CIDR in `allowed_networks`
/// (`check-config`), asked once per test process.
pub fn agent_accepts_ipv6_allowed_networks() -> bool {
    static ACCEPTS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ACCEPTS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("v6.toml");
        std::fs::write(
            &path,
            format!("allowed_networks = [\"10.0.0.0/8\", \"{VPC6_NETWORK}\"]\n"),
        )
        .expect("write config");
        let path = path.to_str().expect("temp path is UTF-8");
        let out = cmd::try_run(
            super::agent::bin(),
            &["check-config", "--config", path],
            None,
        );
        if !out.status.success() {
            eprintln!(
                "NOTE: this egress-guard refuses allowed_networks = [\"10.0.0.0/8\", \"{VPC6_NETWORK}\"] ({}); \
                 dual-stack cells run it with 10.0.0.0/8 only",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        out.status.success()
    })
}

impl Cell {
    /// Builds the cell, VPC and internet namespaces with their links, routes and echo servers
    /// (IPv4 only).
    // No `Default`: building a cell makes namespaces and needs root, which a default should not.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Cell {
        Cell::with_stack(Stack::Ipv4)
    }

    /// A dual-stack cell: the same as [`new`](Self::new), plus IPv6 everywhere. The VPC host
    /// also has [`VPC6_HOST`], the internet host [`INET6_HOST`], the cell forwards IPv6
    /// (fd00::/8 to the VPC, default to the internet), and every container also gets an IPv6
    /// address from host-local's second range [`CELL_SUBNET6`], with the /128 host route
    /// through its host-side veth and an IPv6 default route via [`CELL_GW6`], as ptp sets
    /// them up. The store entries stay IPv4 (`ip`), as silk writes them. DAD is off in every
    /// namespace of the cell (addresses are usable at once; neighbour discovery works as
    /// usual), and the uplinks are bridges, not veths (see `build_infra`).
    pub fn new_dual_stack() -> Cell {
        Cell::with_stack(Stack::Dual)
    }

    /// A dual-stack cell whose uplinks are plain veths (kind "veth", like the containers'
    /// host ends), as on BOSH-lite: a rule that told container-to-container traffic by the
    /// output interface's kind would let a restricted container out over IPv6 here.
    pub fn new_dual_stack_veth_uplink() -> Cell {
        Cell::with_stack(Stack::DualVethUplink)
    }

    /// An IPv4-only cell whose namespace has IPv6 disabled
    /// (`net.ipv6.conf.{all,default}.disable_ipv6=1` before any link exists).
    pub fn new_ipv6_disabled() -> Cell {
        Cell::with_stack(Stack::Ipv6Disabled)
    }

    /// Builds a cell running `stack`.
    pub fn with_stack(stack: Stack) -> Cell {
        require_root();
        STALE_CLEANUP.call_once(|| {
            sweep_stale();
        });
        let n = CELL_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("egt-{}-{n}", netns::my_tag());
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()
            .expect("create temp dir");
        let store = Store::new(&tmp.path().join("container-metadata"));
        let mut cell = Cell {
            cell: format!("{prefix}-cell"),
            vpc: format!("{prefix}-vpc"),
            inet: format!("{prefix}-inet"),
            prefix,
            store,
            stack,
            hits: Arc::new(Mutex::new(Vec::new())),
            containers: BTreeMap::new(),
            infra_servers: Vec::new(),
            resolver_stand_in: None,
            namespaces: Vec::new(),
            agent: None,
            agents_started: 0,
            health_port: 19851 + u16::try_from(n % 100).expect("small"),
            tmp,
        };
        cell.build_infra();
        cell
    }

    fn add_ns(&mut self, name: &str) {
        netns::add(name);
        self.namespaces.push(name.to_string());
        run("ip", &["-n", name, "link", "set", "lo", "up"]);
    }

    /// Whether containers get IPv6 addresses.
    pub fn dual_stack(&self) -> bool {
        matches!(self.stack, Stack::Dual | Stack::DualVethUplink)
    }

    /// Turns DAD off in namespace `ns` before its links exist (dual-stack cells): an address
    /// is usable the moment it is added, instead of about a second later.
    fn no_dad(ns: &str) {
        for k in ["all", "default"] {
            ns_sysctl(ns, &format!("net.ipv6.conf.{k}.accept_dad"), "0");
        }
    }

    fn build_infra(&mut self) {
        let (c, v, i) = (self.cell.clone(), self.vpc.clone(), self.inet.clone());
        for ns in [&c, &v, &i] {
            self.add_ns(ns);
        }
        match self.stack {
            Stack::Ipv4 => {}
            Stack::Dual | Stack::DualVethUplink => {
                for ns in [&c, &v, &i] {
                    Cell::no_dad(ns);
                }
                ns_sysctl(&c, "net.ipv6.conf.all.forwarding", "1");
            }
            Stack::Ipv6Disabled => {
                for k in ["all", "default"] {
                    ns_sysctl(&c, &format!("net.ipv6.conf.{k}.disable_ipv6"), "1");
                }
            }
        }
        ns_sysctl(&c, "net.ipv4.ip_forward", "1");
        // No reverse-path filtering: the forged-source test needs the kernel to forward a
        // spoofed packet when egress-guard is not there (its positive control).
        for k in ["all", "default"] {
            ns_sysctl(&c, &format!("net.ipv4.conf.{k}.rp_filter"), "0");
        }
        for (peer, link, cell_ip, host_ip) in [
            (&v, "up-vpc", CELL_VPC_IP, VPC_HOST),
            (&i, "up-inet", CELL_INET_IP, INET_HOST),
        ] {
            if self.stack == Stack::Dual {
                // On a real cell the uplink is a NIC, not a veth. IPv6 enforcement tells
                // container traffic by the input interface's kind (`meta iifkind "veth"`), so
                // here the uplink `up-…` is a bridge (kind "bridge") whose only port is the
                // veth `upp-…` to the peer: routed packets enter and leave the cell's IP
                // layer through the bridge, as through a NIC. The IPv4-only cell and the
                // BOSH-lite-like cell (`DualVethUplink`) keep plain veth uplinks.
                let port = link.replace("up-", "upp-");
                run(
                    "ip",
                    &[
                        "-n",
                        &c,
                        "link",
                        "add",
                        link,
                        "type",
                        "bridge",
                        "mcast_snooping",
                        "0",
                    ],
                );
                run(
                    "ip",
                    &[
                        "-n", &c, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                        "netns", peer,
                    ],
                );
                run("ip", &["-n", &c, "link", "set", &port, "master", link]);
                run("ip", &["-n", &c, "link", "set", &port, "up"]);
            } else {
                run(
                    "ip",
                    &[
                        "-n", &c, "link", "add", link, "type", "veth", "peer", "name", "eth0",
                        "netns", peer,
                    ],
                );
            }
            run(
                "ip",
                &[
                    "-n",
                    &c,
                    "addr",
                    "add",
                    &format!("{cell_ip}/24"),
                    "dev",
                    link,
                ],
            );
            run("ip", &["-n", &c, "link", "set", link, "up"]);
            run(
                "ip",
                &[
                    "-n",
                    peer,
                    "addr",
                    "add",
                    &format!("{host_ip}/24"),
                    "dev",
                    "eth0",
                ],
            );
            run("ip", &["-n", peer, "link", "set", "eth0", "up"]);
            // Replies to the overlay go back via the cell; nothing else is routed.
            run(
                "ip",
                &[
                    "-n",
                    peer,
                    "route",
                    "add",
                    "10.255.0.0/16",
                    "via",
                    &cell_ip.to_string(),
                ],
            );
        }
        run(
            "ip",
            &[
                "-n",
                &c,
                "route",
                "add",
                "10.0.0.0/8",
                "via",
                &VPC_HOST.to_string(),
            ],
        );
        run(
            "ip",
            &[
                "-n",
                &c,
                "route",
                "add",
                "default",
                "via",
                &INET_HOST.to_string(),
            ],
        );
        run(
            "ip",
            &[
                "-n",
                &c,
                "addr",
                "add",
                &format!("{RESOLVER}/32"),
                "dev",
                "lo",
            ],
        );
        if self.dual_stack() {
            self.build_infra6();
        }

        let hits = self.hits.clone();
        self.infra_servers
            .push(Servers::start(&v, &[TCP_PORT], &[UDP_PORT], &hits));
        self.infra_servers
            .push(Servers::start(&i, &[TCP_PORT], &[UDP_PORT], &hits));
        self.resolver_stand_in = Some(Servers::start_on(
            &c,
            RESOLVER,
            &[DNS_PORT],
            &[DNS_PORT],
            &hits,
        ));
        if self.dual_stack() {
            for (ns, ip) in [(&v, VPC6_HOST), (&i, INET6_HOST)] {
                self.infra_servers
                    .push(Servers::start_on(ns, ip, &[TCP_PORT], &[UDP_PORT], &hits));
            }
        }
    }

    /// The IPv6 half of a dual-stack cell's uplinks and routes (the links exist already).
    fn build_infra6(&mut self) {
        let (c, v, i) = (self.cell.clone(), self.vpc.clone(), self.inet.clone());
        for (peer, link, cell_ip, host_ip) in [
            (&v, "up-vpc", CELL_VPC6_IP, VPC6_HOST),
            (&i, "up-inet", CELL_INET6_IP, INET6_HOST),
        ] {
            let (cell_addr, host_addr) = (format!("{cell_ip}/64"), format!("{host_ip}/64"));
            run(
                "ip",
                &["-n", &c, "addr", "add", &cell_addr, "dev", link, "nodad"],
            );
            run(
                "ip",
                &[
                    "-n", peer, "addr", "add", &host_addr, "dev", "eth0", "nodad",
                ],
            );
            // Replies to the containers' IPv6 prefix go back via the cell.
            run(
                "ip",
                &[
                    "-n",
                    peer,
                    "-6",
                    "route",
                    "add",
                    OVERLAY6_ROUTE,
                    "via",
                    &cell_ip.to_string(),
                ],
            );
        }
        run(
            "ip",
            &[
                "-n",
                &c,
                "-6",
                "route",
                "add",
                VPC6_NETWORK,
                "via",
                &VPC6_HOST.to_string(),
            ],
        );
        run(
            "ip",
            &[
                "-n",
                &c,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &INET6_HOST.to_string(),
            ],
        );
        // Both directions of both uplinks answer before any test relies on them (neighbour
        // discovery warmed up; a link still settling shows here, not as a flaky probe).
        for (from, to) in [
            (&c, IpAddr::from(VPC6_HOST)),
            (&c, IpAddr::from(INET6_HOST)),
            (&v, IpAddr::from(CELL_VPC6_IP)),
            (&i, IpAddr::from(CELL_INET6_IP)),
        ] {
            super::wait_until(
                Duration::from_secs(5),
                &format!("{from} to answer an IPv6 ping of {to}"),
                || probe::ping(from, to).0,
            );
        }
    }

    /// Stops the echo servers on the resolver's address (169.254.0.2:53), so that a test can
    /// run a real DNS server there.
    pub fn stop_resolver_stand_in(&mut self) {
        drop(self.resolver_stand_in.take());
    }

    /// The health endpoint's port of this cell's agents.
    pub fn health_port(&self) -> u16 {
        self.health_port
    }

    pub fn tmp(&self) -> PathBuf {
        self.tmp.path().to_path_buf()
    }

    // ---------------------------------------------------------------- containers

    /// Creates container `name` with an IP from host-local IPAM, wires it with ptp, writes
    /// its store entry (unless `kind` is `NotInStore`) and starts its echo servers.
    pub fn add_container(&mut self, name: &str, kind: Kind) -> Container {
        self.add_container_at(name, kind, None)
    }

    /// Like [`add_container`](Self::add_container), forcing the IP (a one-address host-local
    /// range), e.g. to reuse an IP.
    pub fn add_container_at(&mut self, name: &str, kind: Kind, ip: Option<Ipv4Addr>) -> Container {
        self.add_container_full(name, kind, ip, None, false)
    }

    /// Like [`add_container_at`](Self::add_container_at) on a dual-stack cell, forcing the
    /// IPv4 address, the IPv6 address, or both.
    pub fn add_container_at_dual(
        &mut self,
        name: &str,
        kind: Kind,
        ip: Option<Ipv4Addr>,
        ip6: Option<Ipv6Addr>,
    ) -> Container {
        assert!(
            self.dual_stack(),
            "add_container_at_dual needs Cell::new_dual_stack()"
        );
        self.add_container_full(name, kind, ip, ip6, false)
    }

    /// Writes the store entry for `ip` BEFORE wiring the container (the reverse of silk's
    /// order), so only the later link/route events can tell the agent the container is there.
    pub fn add_container_store_first(&mut self, name: &str, kind: Kind, ip: Ipv4Addr) -> Container {
        self.add_container_full(name, kind, Some(ip), None, true)
    }

    fn add_container_full(
        &mut self,
        name: &str,
        kind: Kind,
        ip: Option<Ipv4Addr>,
        ip6: Option<Ipv6Addr>,
        store_first: bool,
    ) -> Container {
        assert!(
            !self.containers.contains_key(name),
            "container {name} exists already"
        );
        let ns = format!("{}-{name}", self.prefix);
        let handle = kind.handle(&format!("{}-{name}", self.prefix));
        if store_first {
            let ip = ip.expect("store-first needs a fixed IP");
            self.store.add(&handle, ip, &kind, name);
        }
        self.add_ns(&ns);
        let mut range = serde_json::json!({ "subnet": CELL_SUBNET });
        if let Some(ip) = ip {
            range["rangeStart"] = Value::String(ip.to_string());
            range["rangeEnd"] = Value::String(ip.to_string());
        }
        let mut ranges = vec![Value::Array(vec![range])];
        let mut routes = vec![serde_json::json!({ "dst": "0.0.0.0/0" })];
        if self.dual_stack() {
            // Both ends of the veth are made in the container's namespace (the host end then
            // moves to the cell, whose DAD is off too).
            Cell::no_dad(&ns);
            let mut range6 = serde_json::json!({ "subnet": CELL_SUBNET6 });
            if let Some(ip6) = ip6 {
                range6["rangeStart"] = Value::String(ip6.to_string());
                range6["rangeEnd"] = Value::String(ip6.to_string());
            }
            ranges.push(Value::Array(vec![range6]));
            routes.push(serde_json::json!({ "dst": "::/0" }));
        }
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "egt-overlay",
            "type": "ptp",
            "ipMasq": false,
            "mtu": 1450,
            "ipam": {
                "type": "host-local",
                "dataDir": self.tmp.path().join("ipam").display().to_string(),
                "ranges": ranges,
                "routes": routes,
            }
        })
        .to_string();
        let cni_id = ns.clone();
        let result = self.cni("ADD", &cni_id, &ns, &conf);
        let parsed: Value = serde_json::from_str(&result)
            .unwrap_or_else(|e| panic!("ptp ADD result is not JSON ({e}): {result}"));
        let addresses: Vec<IpAddr> = parsed["ips"]
            .as_array()
            .unwrap_or_else(|| panic!("ptp ADD result has no ips: {result}"))
            .iter()
            .map(|entry| {
                let address = entry["address"]
                    .as_str()
                    .unwrap_or_else(|| panic!("ptp ADD result: an ip without address: {result}"));
                address
                    .split('/')
                    .next()
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_else(|| panic!("bad address {address} in ptp result"))
            })
            .collect();
        let ip: Ipv4Addr = addresses
            .iter()
            .find_map(|a| match a {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .unwrap_or_else(|| panic!("ptp ADD result has no IPv4 address: {result}"));
        let got6 = addresses.iter().find_map(|a| match a {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        });
        assert_eq!(
            got6.is_some(),
            self.dual_stack(),
            "ptp ADD result's IPv6 address does not match the cell's stack: {result}"
        );
        if let (Some(want), Some(got)) = (ip6, got6) {
            assert_eq!(
                got, want,
                "host-local did not hand out the forced IPv6 address"
            );
        }
        let host_if = parsed["interfaces"]
            .as_array()
            .and_then(|ifs| ifs.iter().find(|i| i.get("sandbox").is_none()))
            .and_then(|i| i["name"].as_str())
            .unwrap_or_else(|| panic!("ptp ADD result has no host interface: {result}"))
            .to_string();
        if !store_first {
            self.store.add(&handle, ip, &kind, name);
        }
        let mut servers = vec![Servers::start(&ns, &[TCP_PORT], &[UDP_PORT], &self.hits)];
        if let Some(ip6) = got6 {
            servers.push(Servers::start_on(
                &ns,
                ip6,
                &[TCP_PORT],
                &[UDP_PORT],
                &self.hits,
            ));
        }
        let ctr = Container {
            name: name.into(),
            ns,
            ip,
            ip6: got6,
            host_if,
            handle,
            kind,
            cni_id,
            cni_conf: conf,
        };
        self.containers.insert(
            name.into(),
            Slot {
                ctr: ctr.clone(),
                _servers: servers,
            },
        );
        ctr
    }

    /// Deletes a container the way silk does: store entry first, then CNI DEL, then the netns.
    pub fn remove_container(&mut self, name: &str) {
        let slot = self
            .containers
            .remove(name)
            .unwrap_or_else(|| panic!("no container {name}"));
        self.store.remove(&slot.ctr.handle);
        self.cni("DEL", &slot.ctr.cni_id, &slot.ctr.ns, &slot.ctr.cni_conf);
        drop(slot._servers);
        let _ = netns::delete(&slot.ctr.ns);
        self.namespaces.retain(|n| n != &slot.ctr.ns);
    }

    fn cni(&self, command: &str, id: &str, ns: &str, conf: &str) -> String {
        let env = [
            format!("CNI_COMMAND={command}"),
            format!("CNI_CONTAINERID={id}"),
            format!("CNI_NETNS=/run/netns/{ns}"),
            "CNI_IFNAME=eth0".to_string(),
            "CNI_PATH=/usr/lib/cni".to_string(),
        ];
        let mut args: Vec<&str> = vec!["netns", "exec", &self.cell, "env"];
        args.extend(env.iter().map(String::as_str));
        args.push("/usr/lib/cni/ptp");
        assert!(
            std::path::Path::new("/usr/lib/cni/ptp").exists(),
            "/usr/lib/cni/ptp missing: apt-get install containernetworking-plugins"
        );
        cmd::run_stdin("ip", &args, Some(conf.as_bytes()))
    }

    /// Puts container `name` in `org` and `space` (its store entry's `org_id` and `space_id`;
    /// None: no such key, as for an entry that has none).
    pub fn set_org_space(&mut self, name: &str, org: Option<&str>, space: Option<&str>) {
        let handle = self.ctr(name).handle.clone();
        self.store.pause_writes(true);
        self.store.set_metadata(&handle, "org_id", org);
        self.store.set_metadata(&handle, "space_id", space);
        self.store.pause_writes(false);
        self.store.write();
    }

    pub fn ctr(&self, name: &str) -> &Container {
        &self
            .containers
            .get(name)
            .unwrap_or_else(|| panic!("no container {name}"))
            .ctr
    }

    pub fn containers(&self) -> Vec<Container> {
        self.containers.values().map(|s| s.ctr.clone()).collect()
    }

    // ---------------------------------------------------------------- probes

    /// Probes `to` with TCP, UDP and ICMP from container `from` (or from a namespace name).
    pub fn reach(&self, from: &str, to: impl Into<IpAddr>) -> Reach {
        let ns = self
            .containers
            .get(from)
            .map_or(from.to_string(), |s| s.ctr.ns.clone());
        probe::reach(&ns, to, &self.hits)
    }

    /// Asserts every protocol gets from `from` to `to` and back.
    #[track_caller]
    pub fn assert_open(&self, from: &str, to: impl Into<IpAddr>, why: &str) {
        let r = self.reach(from, to);
        assert!(r.is_open(), "expected OPEN ({why}), got: {r}");
    }

    /// Asserts `from` -> `to` is rejected by the cell (fast TCP reset, nothing delivered).
    #[track_caller]
    pub fn assert_rejected(&self, from: &str, to: impl Into<IpAddr>, why: &str) {
        let r = self.reach(from, to);
        assert!(r.is_rejected(), "expected REJECTED ({why}), got: {r}");
    }

    // ---------------------------------------------------------------- nftables

    /// `nft list table inet <name>` in the cell, without comments (an owned table's
    /// `# progname …`) and counter values: what the table holds, whatever has passed; None if
    /// the table is absent. Text, not JSON: nft 1.0.6 prints an owned table's `flags` in JSON
    /// as garbage.
    pub fn table_shape(&self, name: &str) -> Option<String> {
        let out = ns_try_run(&self.cell, "nft", &["list", "table", "inet", name], None);
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<String> = without_meter_elements(&text)
            .into_iter()
            .map(|line| {
                let code = line.split('#').next().unwrap_or_default();
                let mut words: Vec<&str> = code.split_whitespace().collect();
                for k in 1..words.len() {
                    if matches!(words[k - 1], "packets" | "bytes") {
                        words[k] = "0";
                    }
                }
                words.join(" ")
            })
            .filter(|l| !l.is_empty())
            .collect();
        Some(lines.join("\n"))
    }

    /// Puts `ip` (another container's address) on `forger`'s eth0 and makes it the source of
    /// everything `forger` sends off-link, through `gateway`.
    pub fn forge_source(&self, forger: &str, ip: IpAddr, gateway: IpAddr) {
        let ns = self.ctr(forger).ns.clone();
        let (family, prefix) = if ip.is_ipv6() {
            ("-6", 128)
        } else {
            ("-4", 32)
        };
        let address = format!("{ip}/{prefix}");
        let mut add = vec!["-n", &ns, family, "addr", "add", &address, "dev", "eth0"];
        if ip.is_ipv6() {
            add.push("nodad");
        }
        run("ip", &add);
        let (gateway, ip) = (gateway.to_string(), ip.to_string());
        run(
            "ip",
            &[
                "-n", &ns, family, "route", "replace", "default", "via", &gateway, "dev", "eth0",
                "src", &ip,
            ],
        );
    }

    /// `nft <args>` in the cell namespace; panics on failure.
    pub fn nft(&self, args: &[&str]) -> String {
        ns_run(&self.cell, "nft", args)
    }

    /// `nft -f -` in the cell namespace with `script`; panics on failure.
    pub fn nft_script(&self, script: &str) {
        let out = ns_try_run(&self.cell, "nft", &["-f", "-"], Some(script.as_bytes()));
        assert!(
            out.status.success(),
            "nft -f - failed: {}\nscript:\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The agent's table as nft JSON, or None if it does not exist.
    pub fn table(&self) -> Option<Value> {
        self.table_of(TABLE)
    }

    /// Table `inet <name>` of the cell namespace as nft JSON, or None if it does not exist.
    pub fn table_of(&self, name: &str) -> Option<Value> {
        let out = ns_try_run(
            &self.cell,
            "nft",
            &["-j", "list", "table", "inet", name],
            None,
        );
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn has_table(&self) -> bool {
        self.table().is_some()
    }

    /// The IPs in the `exempt` set (sorted), or None if the table or set is missing.
    pub fn exempt_ips(&self) -> Option<Vec<Ipv4Addr>> {
        self.set_addresses(TABLE, "exempt")
    }

    /// The IPv6 addresses in the `exempt6` set of `inet egress_guard` (sorted), or None if
    /// the table or set is missing.
    pub fn exempt6_ips(&self) -> Option<Vec<Ipv6Addr>> {
        self.set_addresses(TABLE, "exempt6")
    }

    /// The elements of the agent's `containers6` set (the cell's container IPv6 addresses).
    pub fn containers6_ips(&self) -> Option<Vec<Ipv6Addr>> {
        self.set_addresses(TABLE, "containers6")
    }

    /// The addresses of type `A` in the elements of set `set` of table `inet <table>`
    /// (an element `iface . addr` gives its `addr`, a plain element itself), sorted; None if
    /// the table or set is missing.
    pub fn set_addresses<A: std::str::FromStr + Ord>(
        &self,
        table: &str,
        set: &str,
    ) -> Option<Vec<A>> {
        let table = self.table_of(table)?;
        let set = table["nftables"]
            .as_array()?
            .iter()
            .find_map(|o| o.get("set").filter(|s| s["name"] == set))?;
        let mut ips: Vec<A> = set
            .get("elem")
            .and_then(Value::as_array)
            .map(|elems| {
                elems
                    .iter()
                    .filter_map(|e| {
                        if let Some(plain) = e.as_str() {
                            return plain.parse().ok();
                        }
                        let concat = e
                            .get("concat")
                            .or_else(|| e.get("elem")?.get("val")?.get("concat"))?;
                        concat
                            .as_array()?
                            .iter()
                            .find_map(|p| p.as_str()?.parse().ok())
                    })
                    .collect()
            })
            .unwrap_or_default();
        ips.sort();
        Some(ips)
    }

    /// Packets counted by the agent's named counter `name` (0 if missing).
    pub fn counter(&self, name: &str) -> u64 {
        // A packet is rejected by whichever of the agent's two tables sees it first: the
        // count is their sum.
        [TABLE, "egress_guard_owned"]
            .iter()
            .map(|table| {
                let out = ns_try_run(
                    &self.cell,
                    "nft",
                    &["-j", "list", "counter", "inet", table, name],
                    None,
                );
                let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) else {
                    return 0;
                };
                v["nftables"]
                    .as_array()
                    .and_then(|a| {
                        a.iter()
                            .find_map(|o| o.get("counter")?.get("packets")?.as_u64())
                    })
                    .unwrap_or(0)
            })
            .sum()
    }

    /// The table with handles, counter values, metainfo and the elements of the sets the
    /// kernel keeps changing ([`KERNEL_KEPT_SETS`]) removed, for comparing shapes.
    pub fn fingerprint(&self) -> Option<Value> {
        self.fingerprint_of(TABLE)
    }

    /// Like [`fingerprint`](Self::fingerprint), for table `inet <name>`.
    pub fn fingerprint_of(&self, name: &str) -> Option<Value> {
        fn scrub(v: &mut Value) {
            match v {
                Value::Object(m) => {
                    m.remove("handle");
                    for k in ["packets", "bytes"] {
                        if m.contains_key(k) {
                            m.insert(k.into(), Value::from(0));
                        }
                    }
                    m.values_mut().for_each(scrub);
                }
                Value::Array(a) => a.iter_mut().for_each(scrub),
                _ => {}
            }
        }
        let mut t = self.table_of(name)?;
        if let Some(a) = t["nftables"].as_array_mut() {
            a.retain(|o| o.get("metainfo").is_none());
            for object in a.iter_mut() {
                for kind in ["set", "map"] {
                    if let Some(set) = object.get_mut(kind).and_then(Value::as_object_mut)
                        && set
                            .get("name")
                            .and_then(Value::as_str)
                            .is_some_and(|name| KERNEL_KEPT_SETS.contains(&name))
                    {
                        set.remove("elem");
                    }
                }
            }
        }
        scrub(&mut t);
        Some(t)
    }

    /// Loads a hand-written ruleset that mirrors egress-guard's design (for harness
    /// self-tests): exempts (host veth, IP) of the named containers.
    pub fn load_reference_ruleset(&self, exempt: &[&str]) {
        let elems: Vec<String> = exempt
            .iter()
            .map(|n| {
                let c = self.ctr(n);
                format!("\"{}\" . {}", c.host_if, c.ip)
            })
            .collect();
        let elements = if elems.is_empty() {
            String::new()
        } else {
            format!("elements = {{ {} }}", elems.join(", "))
        };
        self.nft_script(&format!(
            "table inet {TABLE} {{
  counter rejected_tcp {{ }}
  counter rejected_other {{ }}
  set exempt {{ type iface_index . ipv4_addr; {elements} }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    ip saddr 10.255.0.0/16 jump overlay_egress
  }}
  chain overlay_egress {{
    iif . ip saddr @exempt return
    ip daddr {{ 10.0.0.0/8, 10.255.0.0/16 }} return
    meta l4proto tcp counter name \"rejected_tcp\" reject with tcp reset
    counter name \"rejected_other\" reject with icmpx admin-prohibited
  }}
}}
"
        ));
    }

    /// Waits until the agent's table exists.
    pub fn wait_table(&mut self, timeout: Duration) -> Duration {
        self.wait_agent_state(
            timeout,
            "the agent's table inet egress_guard to exist",
            |c| c.has_table(),
        )
    }

    /// Waits until the `exempt6` set holds exactly `ips`.
    pub fn wait_exempt6(&mut self, ips: &[Ipv6Addr], timeout: Duration) -> Duration {
        let mut want = ips.to_vec();
        want.sort();
        let what = format!("the exempt6 set to be exactly {want:?}");
        self.wait_agent_state(timeout, &what, |c| {
            c.exempt6_ips().as_deref() == Some(&want)
        })
    }

    /// Waits until the exempt set holds exactly `ips`.
    pub fn wait_exempt(&mut self, ips: &[Ipv4Addr], timeout: Duration) -> Duration {
        let mut want = ips.to_vec();
        want.sort();
        let what = format!("the exempt set to be exactly {want:?}");
        self.wait_agent_state(timeout, &what, |c| c.exempt_ips().as_deref() == Some(&want))
    }

    /// Polls `cond`, failing early (with the log) if the agent dies, and with the current
    /// ruleset on timeout.
    fn wait_agent_state(
        &mut self,
        timeout: Duration,
        what: &str,
        mut cond: impl FnMut(&Cell) -> bool,
    ) -> Duration {
        let start = std::time::Instant::now();
        loop {
            if cond(self) {
                return start.elapsed();
            }
            if let Some(agent) = self.agent.as_mut() {
                agent.assert_running();
            }
            if start.elapsed() > timeout {
                let ruleset = ns_try_run(&self.cell, "nft", &["list", "ruleset"], None);
                panic!(
                    "timed out after {timeout:?} waiting for {what}\ncell ruleset:\n{}",
                    String::from_utf8_lossy(&ruleset.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // ---------------------------------------------------------------- ingress counters

    /// Starts counting packets from `src` arriving in the internet namespace (per protocol),
    /// before anything else there sees them.
    pub fn watch_inet_ingress(&self, src: impl Into<IpAddr>) {
        self.watch_ingress(&self.inet, src);
    }

    /// Packets from `src` of `proto` ("tcp", "udp", or "icmp": echo requests, ICMPv6 for an
    /// IPv6 `src`) that arrived in the internet namespace.
    pub fn inet_ingress(&self, src: impl Into<IpAddr>, proto: &str) -> u64 {
        self.ingress(&self.inet, src, proto)
    }

    /// Like [`watch_inet_ingress`](Self::watch_inet_ingress), in namespace `ns` (e.g. the VPC).
    /// Call it once per (`ns`, `src`): a second call would count every packet twice.
    pub fn watch_ingress(&self, ns: &str, src: impl Into<IpAddr>) {
        let src: IpAddr = src.into();
        let tag = ingress_tag(src);
        let (family, echo) = match src {
            IpAddr::V4(_) => ("ip", "icmp type echo-request"),
            IpAddr::V6(_) => ("ip6", "icmpv6 type echo-request"),
        };
        let script = format!(
            "table inet egt_probe {{
  chain pre {{ type filter hook prerouting priority -300; policy accept; }}
}}
add counter inet egt_probe tcp_{tag}
add counter inet egt_probe udp_{tag}
add counter inet egt_probe icmp_{tag}
add rule inet egt_probe pre {family} saddr {src} meta l4proto tcp counter name \"tcp_{tag}\"
add rule inet egt_probe pre {family} saddr {src} meta l4proto udp counter name \"udp_{tag}\"
add rule inet egt_probe pre {family} saddr {src} {echo} counter name \"icmp_{tag}\"
"
        );
        let out = ns_try_run(ns, "nft", &["-f", "-"], Some(script.as_bytes()));
        assert!(
            out.status.success(),
            "ingress watch in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Packets from `src` of `proto` ("tcp"/"udp") that arrived in namespace `ns`, counted
    /// since [`watch_ingress`](Self::watch_ingress).
    pub fn ingress(&self, ns: &str, src: impl Into<IpAddr>, proto: &str) -> u64 {
        let name = format!("{proto}_{}", ingress_tag(src.into()));
        super::cmd::ns_counter_packets(ns, "egt_probe", &name)
    }

    // ---------------------------------------------------------------- agent

    /// Starts the agent with the default test configuration (1s reconcile interval).
    pub fn start_agent(&mut self) -> &mut Agent {
        let config = self.agent_config();
        self.start_agent_with(&config)
    }

    /// The default test configuration. A dual-stack cell's also allows [`VPC6_NETWORK`]
    /// (when the agent under test accepts IPv6 CIDRs; see
    /// [`agent_accepts_ipv6_allowed_networks`]).
    pub fn agent_config(&self) -> AgentConfig {
        let mut config = AgentConfig::new(self.health_port);
        if self.dual_stack() && agent_accepts_ipv6_allowed_networks() {
            config.allowed_networks.push(VPC6_NETWORK.into());
        }
        config
    }

    /// Starts the agent with `config`; a previous agent process is killed first.
    pub fn start_agent_with(&mut self, config: &AgentConfig) -> &mut Agent {
        if let Some(mut old) = self.agent.take() {
            old.kill9();
        }
        self.agents_started += 1;
        let agent = Agent::start(
            &self.cell,
            self.tmp.path(),
            self.agents_started,
            config,
            &self.store.path(),
        );
        self.agent.insert(agent)
    }

    pub fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("no agent started")
    }

    /// `iptables` (or another xtables tool) in the cell namespace.
    pub fn iptables(&self, tool: &str, args: &[&str]) -> std::process::Output {
        ns_try_run(&self.cell, tool, args, None)
    }

    /// The address on container `name`'s host-side veth: where a REDIRECT of its packets
    /// sends them (ptp's gateway here; 169.254.0.1 on a silk cell).
    pub fn host_veth_address(&self, name: &str) -> Ipv4Addr {
        let host_if = self.ctr(name).host_if.clone();
        let out = ns_run(
            &self.cell,
            "ip",
            &["-4", "-o", "addr", "show", "dev", &host_if],
        );
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|cidr| cidr.split('/').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no IPv4 address on {host_if}: {out:?}"))
    }

    /// silk's per-container INPUT chain, as its cni-wrapper-plugin builds it
    /// (`netrules/netout.go`; see ../shared/reference/cf-cell-networking.md): a filter-table
    /// chain `input--<handle>` (truncated to iptables' 28 characters), jumped to from INPUT
    /// for the container's source address, that accepts RELATED,ESTABLISHED, TCP and UDP port
    /// 53 to each of `dns_servers`, each of `host_tcp_services` / `host_udp_services`, and
    /// REJECTs everything else the container sends to the cell itself.
    pub fn add_silk_input_chain(
        &self,
        name: &str,
        dns_servers: &[Ipv4Addr],
        host_tcp_services: &[std::net::SocketAddrV4],
        host_udp_services: &[std::net::SocketAddrV4],
    ) {
        let ctr = self.ctr(name);
        let chain: String = format!("input--{}", ctr.handle).chars().take(28).collect();
        let ipt = |args: &[&str]| ns_run(&self.cell, "iptables", args);
        ipt(&["-w", "-N", &chain]);
        ipt(&[
            "-w",
            "-A",
            &chain,
            "-m",
            "state",
            "--state",
            "RELATED,ESTABLISHED",
            "-j",
            "ACCEPT",
        ]);
        let accept = |proto: &str, address: &str, port: &str| {
            ipt(&[
                "-w", "-A", &chain, "-p", proto, "-d", address, "--dport", port, "-j", "ACCEPT",
            ]);
        };
        for server in dns_servers {
            for proto in ["tcp", "udp"] {
                accept(proto, &server.to_string(), "53");
            }
        }
        for (proto, services) in [("tcp", host_tcp_services), ("udp", host_udp_services)] {
            for service in services {
                accept(
                    proto,
                    &service.ip().to_string(),
                    &service.port().to_string(),
                );
            }
        }
        ipt(&["-w", "-A", &chain, "-j", "REJECT"]);
        ipt(&["-w", "-A", "INPUT", "-s", &ctr.ip.to_string(), "-j", &chain]);
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let ruleset = ns_try_run(&self.cell, "nft", &["list", "ruleset"], None);
            let routes = ns_try_run(&self.cell, "ip", &["route"], None);
            let routes6 = ns_try_run(&self.cell, "ip", &["-6", "route"], None);
            let links = ns_try_run(&self.cell, "ip", &["-br", "link"], None);
            let _ = netns::eprintln_safe(&format!(
                "--- cell {} at failure ---\nnft ruleset:\n{}\nroutes:\n{}{}\nlinks:\n{}\ncontainers: {:#?}\n---",
                self.cell,
                String::from_utf8_lossy(&ruleset.stdout),
                String::from_utf8_lossy(&routes.stdout),
                String::from_utf8_lossy(&routes6.stdout),
                String::from_utf8_lossy(&links.stdout),
                self.containers
                    .values()
                    .map(|s| (
                        &s.ctr.name,
                        s.ctr.ip,
                        s.ctr.ip6,
                        &s.ctr.host_if,
                        &s.ctr.kind
                    ))
                    .collect::<Vec<_>>()
            ));
        }
        // Agent first (it lives in the cell namespace), then servers, then namespaces.
        drop(self.agent.take());
        let slots = std::mem::take(&mut self.containers);
        drop(slots);
        self.infra_servers.clear();
        drop(self.resolver_stand_in.take());
        for ns in self.namespaces.drain(..).rev() {
            let _ = netns::delete(&ns);
        }
        // The temp dir (store, IPAM state, configs, logs) is removed when `tmp` drops.
    }
}

/// The agent's sets whose elements are kernel state that changes on its own, like counter
/// values: the token buckets of `report_budget` and `dns_budget` (one per container that was
/// blocked or asked lately, with its expiry), and what hostname rules learned (each with the
/// time it has left).
const KERNEL_KEPT_SETS: [&str; 4] = ["report_budget", "dns_budget", "learned4", "learned6"];

/// The lines of an `nft list` text without the elements of [`KERNEL_KEPT_SETS`].
fn without_meter_elements(text: &str) -> Vec<&str> {
    let (mut in_meter, mut in_elements) = (false, false);
    let mut kept = Vec::new();
    for line in text.lines() {
        let code = line.trim();
        if KERNEL_KEPT_SETS.iter().any(|name| {
            code.starts_with(&format!("set {name} {{"))
                || code.starts_with(&format!("map {name} {{"))
        }) {
            in_meter = true;
        } else if in_elements || (in_meter && code.starts_with("elements = {")) {
            in_elements = !code.ends_with('}');
            continue;
        } else if in_meter && code == "}" {
            in_meter = false;
        }
        kept.push(line);
    }
    kept
}
