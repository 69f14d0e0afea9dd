//! The route table against a model of the IPv4 FIB that emits the notifications the kernel
//! emits (and stays silent where the kernel does): after every step, the table kept from
//! events must equal one built from a fresh dump, and its container view must equal what the
//! dump-based `KernelReader::routes` rules give.

use super::*;
use crate::inventory::kernel::{ContainerRoutes, KernelChanges, rtnetlink_datagram};
use egress_guard_testkit::rng::XorShift64;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteNextHop, RouteProtocol,
    RouteScope, RouteType,
};
use rtnetlink::packet_core::Emitable;
use std::net::IpAddr;

const SCOPE_UNIVERSE: u8 = 0;
const SCOPE_LINK: u8 = 253;
const PROTO_KERNEL: u8 = 2;
const PROTO_BOOT: u8 = 3;
const PROTO_STATIC: u8 = 4;
const RTN_BLACKHOLE: u8 = 6;
const SILK_HOST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);

fn overlay() -> Ipv4Net {
    "10.255.0.0/16".parse().expect("literal")
}

/// Overlays to view the table through: the configured one, a narrower and a wider one.
fn overlays() -> [Ipv4Net; 3] {
    [
        overlay(),
        "10.255.0.0/30".parse().expect("literal"),
        "10.0.0.0/8".parse().expect("literal"),
    ]
}

/// A route as `ip route` would be asked for it.
#[derive(Debug, Clone, PartialEq)]
struct R {
    table: u32,
    dst: Ipv4Addr,
    prefix: u8,
    tos: u8,
    metric: u32,
    kind: u8,
    scope: u8,
    protocol: u8,
    oif: Option<u32>,
    gateway: Option<Ipv4Addr>,
    prefsrc: Option<Ipv4Addr>,
    multipath: Option<Vec<(u32, Option<Ipv4Addr>)>>,
}

impl R {
    /// `ip route add DST/32 dev OIF` (what a CNI plugin adds for a container).
    fn host(dst: Ipv4Addr, oif: u32) -> R {
        R {
            table: 254,
            dst,
            prefix: 32,
            tos: 0,
            metric: 0,
            kind: RTN_UNICAST,
            scope: SCOPE_LINK,
            protocol: PROTO_BOOT,
            oif: Some(oif),
            gateway: None,
            prefsrc: None,
            multipath: None,
        }
    }

    fn same_slot(&self, other: &R) -> bool {
        (self.table, self.dst, self.prefix, self.tos, self.metric)
            == (
                other.table,
                other.dst,
                other.prefix,
                other.tos,
                other.metric,
            )
    }

    fn devices(&self) -> Vec<u32> {
        match &self.multipath {
            Some(hops) => hops.iter().map(|(index, _)| *index).collect(),
            None => self.oif.into_iter().collect(),
        }
    }

    fn message(&self) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header = RouteHeader {
            address_family: AddressFamily::Inet,
            destination_prefix_length: self.prefix,
            tos: self.tos,
            table: u8::try_from(self.table).unwrap_or(252),
            protocol: RouteProtocol::from(self.protocol),
            scope: RouteScope::from(self.scope),
            kind: RouteType::from(self.kind),
            ..Default::default()
        };
        let attrs = &mut message.attributes;
        attrs.push(RouteAttribute::Table(self.table));
        attrs.push(RouteAttribute::Destination(RouteAddress::Inet(self.dst)));
        if self.metric != 0 {
            attrs.push(RouteAttribute::Priority(self.metric));
        }
        if let Some(src) = self.prefsrc {
            attrs.push(RouteAttribute::PrefSource(RouteAddress::Inet(src)));
        }
        if let Some(gateway) = self.gateway {
            attrs.push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        }
        if let Some(oif) = self.oif {
            attrs.push(RouteAttribute::Oif(oif));
        }
        if let Some(hops) = &self.multipath {
            attrs.push(RouteAttribute::MultiPath(
                hops.iter()
                    .map(|(index, gateway)| {
                        let mut hop = RouteNextHop::default();
                        hop.interface_index = *index;
                        if let Some(gateway) = gateway {
                            hop.attributes
                                .push(RouteAttribute::Gateway(RouteAddress::Inet(*gateway)));
                        }
                        hop
                    })
                    .collect(),
            ));
        }
        message
    }
}

/// An IPv4 address: (ifindex, local, peer).
type Addr = (u32, Ipv4Addr, Option<Ipv4Addr>);

fn address_message(kind: u16, (index, local, peer): Addr) -> (u16, u16, Vec<u8>) {
    let mut message = AddressMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.prefix_len = 32;
    message.header.index = index;
    message
        .attributes
        .push(AddressAttribute::Address(IpAddr::V4(peer.unwrap_or(local))));
    message
        .attributes
        .push(AddressAttribute::Local(IpAddr::V4(local)));
    (kind, 0, emitted(&message))
}

fn emitted(message: &impl Emitable) -> Vec<u8> {
    let mut buf = vec![0; message.buffer_len()];
    message.emit(&mut buf);
    buf
}

/// A netlink datagram holding one message.
fn datagram((kind, flags, payload): &(u16, u16, Vec<u8>)) -> Vec<u8> {
    let len = 16 + payload.len();
    let mut out = Vec::with_capacity(align4(len));
    out.extend_from_slice(&u32::try_from(len).expect("small").to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(payload);
    out.resize(align4(len), 0);
    out
}

/// User request flags, as iproute2 sends them.
const ADD: u16 = NLM_F_CREATE | NLM_F_EXCL;
const REPLACE: u16 = NLM_F_CREATE | NLM_F_REPLACE;
const PREPEND: u16 = NLM_F_CREATE;
const APPEND: u16 = NLM_F_CREATE | NLM_F_APPEND;
const CHANGE: u16 = NLM_F_REPLACE;

/// A model of the IPv4 FIB (net/ipv4/fib_trie.c, fib_frontend.c, fib_semantics.c): it keeps
/// routes in the kernel's order and records the notifications the kernel sends.
#[derive(Default)]
struct Kernel {
    routes: Vec<R>,
    addresses: Vec<Addr>,
    /// ifindex -> administratively up.
    links: BTreeMap<u32, bool>,
    events: Vec<(u16, u16, Vec<u8>)>,
}

impl Kernel {
    fn notify_route(&mut self, kind: u16, flags: u16, route: &R) {
        self.events.push((kind, flags, emitted(&route.message())));
    }

    fn notify_link(&mut self, kind: u16, index: u32) {
        let mut message = LinkMessage::default();
        message.header.index = index;
        if self.links.get(&index) == Some(&true) {
            message.header.flags = LinkFlags::Up;
        }
        message
            .attributes
            .push(LinkAttribute::IfName(format!("veth{index}")));
        self.events.push((kind, 0, emitted(&message)));
    }

    fn is_local(&self, ip: Ipv4Addr) -> bool {
        self.addresses.iter().any(|(_, local, _)| *local == ip)
    }

    fn link_add(&mut self, index: u32) {
        if self.links.insert(index, false).is_none() {
            self.notify_link(RTM_NEWLINK, index);
        }
    }

    fn link_up(&mut self, index: u32) {
        if self.links.get(&index) != Some(&false) {
            return;
        }
        self.links.insert(index, true);
        self.notify_link(RTM_NEWLINK, index);
        // fib_add_ifaddr on NETDEV_UP: the peer routes of the interface's addresses.
        for (i, local, peer) in self.addresses.clone() {
            if let (true, Some(peer)) = (i == index, peer) {
                self.insert(Kernel::peer_route(index, local, peer), APPEND);
            }
        }
    }

    /// NETDEV_DOWN: every route through the interface dies, but host-scope ones (silently).
    fn link_down(&mut self, index: u32) {
        if self.links.get(&index) != Some(&true) {
            return;
        }
        self.links.insert(index, false);
        self.notify_link(RTM_NEWLINK, index);
        self.flush(|r| r.devices().contains(&index) && r.scope != RT_SCOPE_HOST);
    }

    /// unregister_netdevice: close, delete the addresses, flush, then RTM_DELLINK.
    fn link_del(&mut self, index: u32) {
        if !self.links.contains_key(&index) {
            return;
        }
        self.link_down(index);
        for address in self.addresses.clone() {
            if address.0 == index {
                self.addr_del(address);
            }
        }
        self.flush(|r| r.devices().contains(&index));
        self.notify_link(RTM_DELLINK, index);
        self.links.remove(&index);
    }

    fn peer_route(index: u32, local: Ipv4Addr, peer: Ipv4Addr) -> R {
        R {
            protocol: PROTO_KERNEL,
            prefsrc: Some(local),
            ..R::host(peer, index)
        }
    }

    /// `ip addr add LOCAL [peer PEER/32] dev INDEX`.
    fn addr_add(&mut self, address: Addr) {
        if !self.links.contains_key(&address.0) || self.addresses.contains(&address) {
            return;
        }
        self.addresses.push(address);
        self.events.push(address_message(RTM_NEWADDR, address));
        if let (Some(true), Some(peer)) = (self.links.get(&address.0), address.2) {
            self.insert(Kernel::peer_route(address.0, address.1, peer), APPEND);
        }
    }

    /// `ip addr del`: RTM_DELADDR, then fib_del_ifaddr and fib_disable_ip.
    fn addr_del(&mut self, address: Addr) {
        let Some(position) = self.addresses.iter().position(|a| *a == address) else {
            return;
        };
        self.addresses.remove(position);
        self.events.push(address_message(RTM_DELADDR, address));
        let (index, local, peer) = address;
        if let Some(peer) = peer {
            self.delete(&Kernel::peer_route(index, local, peer));
        }
        if !self.is_local(local) {
            self.flush(|r| r.table == 254 && r.prefsrc == Some(local));
        }
        if !self.addresses.iter().any(|a| a.0 == index) {
            self.flush(|r| r.devices().contains(&index));
        }
    }

    /// Removes routes without telling anyone (fib_flush of dead routes).
    fn flush(&mut self, dead: impl Fn(&R) -> bool) {
        self.routes.retain(|r| !dead(r));
    }

    /// fib_table_insert, with the request flags of `ip route add/replace/prepend/append`.
    fn insert(&mut self, route: R, request: u16) {
        let usable = |index: &u32| self.links.get(index) == Some(&true);
        let devices_up = route.devices().iter().all(usable);
        let source_ok = route.prefsrc.is_none_or(|src| self.is_local(src));
        if !devices_up || !source_ok || (route.scope == RT_SCOPE_HOST && route.gateway.is_some()) {
            return;
        }
        let members: Vec<usize> = (0..self.routes.len())
            .filter(|i| self.routes[*i].same_slot(&route))
            .collect();
        let mut flags = NLM_F_EXCL;
        if let Some(&first) = members.first() {
            if request & NLM_F_EXCL != 0 {
                return;
            }
            flags &= !NLM_F_EXCL;
            let matching = members.iter().copied().find(|i| self.routes[*i] == route);
            if request & NLM_F_REPLACE != 0 {
                if matching.is_some() {
                    return;
                }
                self.routes[first] = route.clone();
                self.notify_route(RTM_NEWROUTE, flags | NLM_F_REPLACE, &route);
                return;
            }
            if matching.is_some() || request & NLM_F_CREATE == 0 {
                return;
            }
            if request & NLM_F_APPEND != 0 {
                flags |= NLM_F_APPEND;
                let after = members.last().map_or(first, |last| last + 1);
                self.routes.insert(after, route.clone());
            } else {
                self.routes.insert(first, route.clone());
            }
        } else {
            if request & NLM_F_CREATE == 0 {
                return;
            }
            self.routes.push(route.clone());
        }
        self.notify_route(RTM_NEWROUTE, flags | NLM_F_CREATE, &route);
    }

    /// fib_table_delete of exactly this route.
    fn delete(&mut self, route: &R) {
        if let Some(position) = self.routes.iter().position(|r| r == route) {
            self.routes.remove(position);
            self.notify_route(RTM_DELROUTE, 0, route);
        }
    }

    /// What `KernelReader::route_table` would build now.
    fn dump_table(&self) -> RouteTable {
        let routes = self
            .routes
            .iter()
            .filter_map(|r| parse_route(&emitted(&r.message())).expect("model routes parse"));
        let addresses = self.addresses.iter().filter_map(|a| {
            parse_address(&address_message(RTM_NEWADDR, *a).2).expect("model addresses parse")
        });
        RouteTable::from_dump(routes, addresses)
    }

    /// What `KernelReader::routes(overlay)` would answer now.
    fn dump_containers(&self, overlay: Ipv4Net) -> BTreeMap<Ipv4Addr, u32> {
        let mut containers = ContainerRoutes::default();
        for r in &self.routes {
            containers.add(&r.message(), overlay);
        }
        containers.finish()
    }
}

/// The loop's side: a table kept from the events the watcher queues.
struct Follower {
    changes: KernelChanges,
    table: RouteTable,
    /// The overlay's container routes, kept from the destinations each update touched, as
    /// the reconcile loop keeps them.
    view: BTreeMap<Ipv4Addr, u32>,
    redumps: usize,
}

impl Follower {
    fn new(kernel: &Kernel) -> Follower {
        let changes = KernelChanges::default();
        changes.routes_watched(true);
        assert!(changes.take_routes(), "first pass dumps");
        let table = kernel.dump_table();
        Follower {
            changes,
            view: table.containers(overlay()),
            table,
            redumps: 0,
        }
    }

    /// Feeds the kernel's pending notifications through the watcher's parser, then does what
    /// `KernelReader::refresh_routes` does.
    fn catch_up(&mut self, kernel: &mut Kernel) {
        for event in kernel.events.drain(..) {
            rtnetlink_datagram(&self.changes, Some(&datagram(&event)));
        }
        let updates = self.changes.drain_route_updates();
        let dump = self.changes.take_routes();
        if dump || !updates.iter().all(|update| self.table.apply(update)) {
            self.table = kernel.dump_table();
            self.view = self.table.containers(overlay());
            self.redumps += 1;
            return;
        }
        for ip in self.table.take_touched() {
            match self.table.container(ip, overlay()) {
                Some(ifindex) => self.view.insert(ip, ifindex),
                None => self.view.remove(&ip),
            };
        }
    }

    fn check(&self, kernel: &Kernel, step: &str) {
        assert_eq!(self.table, kernel.dump_table(), "table after {step}");
        assert!(self.table.index_is_consistent(), "index after {step}");
        assert_eq!(
            self.view,
            kernel.dump_containers(overlay()),
            "container routes kept from touched destinations after {step}"
        );
        for overlay in overlays() {
            assert_eq!(
                self.table.containers(overlay),
                kernel.dump_containers(overlay),
                "containers in {overlay} after {step}"
            );
        }
    }
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 255, 0, last)
}

#[test]
fn scripted_sequences_match_a_fresh_dump() {
    let mut kernel = Kernel::default();
    for index in [10, 11, 12] {
        kernel.link_add(index);
        kernel.link_up(index);
    }
    let mut follower = Follower::new(&kernel);
    let mut step = |kernel: &mut Kernel, name: &str, op: &dyn Fn(&mut Kernel)| {
        op(kernel);
        follower.catch_up(kernel);
        follower.check(kernel, name);
    };

    step(&mut kernel, "add", &|k| k.insert(R::host(ip(1), 10), ADD));
    assert_eq!(follower_view(&kernel), BTreeMap::from([(ip(1), 10)]));
    step(&mut kernel, "duplicate add (EEXIST)", &|k| {
        k.insert(R::host(ip(1), 10), ADD)
    });
    step(&mut kernel, "replace to another interface", &|k| {
        k.insert(R::host(ip(1), 11), REPLACE)
    });
    assert_eq!(follower_view(&kernel), BTreeMap::from([(ip(1), 11)]));
    step(&mut kernel, "change back", &|k| {
        k.insert(R::host(ip(1), 10), CHANGE)
    });
    step(&mut kernel, "append a second interface (ambiguous)", &|k| {
        k.insert(R::host(ip(1), 12), APPEND)
    });
    assert_eq!(follower_view(&kernel), BTreeMap::new());
    step(&mut kernel, "replace the first of two", &|k| {
        k.insert(R::host(ip(1), 12), REPLACE)
    });
    step(&mut kernel, "prepend a gateway route", &|k| {
        let via = R {
            gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
            scope: SCOPE_UNIVERSE,
            ..R::host(ip(1), 11)
        };
        k.insert(via, PREPEND)
    });
    step(&mut kernel, "replace the gateway route (the first)", &|k| {
        k.insert(R::host(ip(1), 10), REPLACE)
    });
    step(&mut kernel, "delete one of two", &|k| {
        k.delete(&R::host(ip(1), 10))
    });
    step(&mut kernel, "delete the last", &|k| {
        k.delete(&R::host(ip(1), 12))
    });
    step(&mut kernel, "delete of an unknown route", &|k| {
        k.notify_route(RTM_DELROUTE, 0, &R::host(ip(9), 10))
    });
    step(&mut kernel, "add outside the overlay", &|k| {
        k.insert(R::host(Ipv4Addr::new(10, 1, 0, 7), 10), ADD)
    });
    step(&mut kernel, "same IP, other metric and table", &|k| {
        k.insert(
            R {
                metric: 100,
                ..R::host(ip(2), 11)
            },
            ADD,
        );
        k.insert(
            R {
                table: 100,
                ..R::host(ip(2), 12)
            },
            ADD,
        );
        k.insert(
            R {
                prefix: 24,
                ..R::host(ip(0), 12)
            },
            ADD,
        );
    });
    // silk: the host route comes from a peer address, with 169.254.0.1 as source.
    step(&mut kernel, "silk container up", &|k| {
        k.link_add(20);
        k.link_up(20);
        k.addr_add((20, SILK_HOST_IP, Some(ip(5))));
        k.link_add(21);
        k.link_up(21);
        k.addr_add((21, SILK_HOST_IP, Some(ip(6))));
    });
    assert_eq!(follower_view(&kernel).get(&ip(5)), Some(&20));
    step(&mut kernel, "silk container deleted", &|k| k.link_del(20));
    assert_eq!(follower_view(&kernel).get(&ip(5)), None);
    assert_eq!(follower_view(&kernel).get(&ip(6)), Some(&21));
    step(&mut kernel, "last address removed", &|k| {
        k.addr_del((21, SILK_HOST_IP, Some(ip(6))))
    });
    // CNI ptp: a host-scope route survives its interface going down, not going away.
    step(&mut kernel, "host-scope route", &|k| {
        let route = R {
            scope: RT_SCOPE_HOST,
            ..R::host(ip(7), 12)
        };
        k.insert(route, ADD)
    });
    step(&mut kernel, "interface down", &|k| {
        k.insert(R::host(ip(8), 12), ADD);
        k.link_down(12)
    });
    assert_eq!(follower_view(&kernel).get(&ip(7)), Some(&12));
    assert_eq!(follower_view(&kernel).get(&ip(8)), None);
    step(&mut kernel, "interface deleted", &|k| k.link_del(12));
    assert_eq!(follower_view(&kernel).get(&ip(7)), None);
    assert_eq!(follower.redumps, 0, "every step was followed from events");
}

fn follower_view(kernel: &Kernel) -> BTreeMap<Ipv4Addr, u32> {
    kernel.dump_containers(overlay())
}

#[test]
fn repeated_events_change_nothing() {
    let mut kernel = Kernel::default();
    kernel.link_add(10);
    kernel.link_up(10);
    let mut follower = Follower::new(&kernel);
    kernel.insert(R::host(ip(1), 10), ADD);
    kernel.insert(R::host(ip(2), 10), ADD);
    kernel.insert(R::host(ip(2), 10), ADD);
    let events = kernel.events.clone();
    follower.catch_up(&mut kernel);
    // The same notifications again (a replay after a dump that already holds them).
    kernel.events = events;
    kernel.notify_route(RTM_NEWROUTE, 0, &R::host(ip(1), 10));
    follower.catch_up(&mut kernel);
    follower.check(&kernel, "replayed adds");
    assert_eq!(follower.table.len(), 2);
}

/// The test support's generator.
type Rng = XorShift64;

fn random_route(rng: &mut Rng, multipath: bool) -> R {
    let links = [10, 11, 12];
    let mut route = R::host(ip(*rng.pick(&[1, 2, 3])), *rng.pick(&links));
    match rng.index(12) {
        0 => route.table = 100,
        1 => route.prefix = 31,
        2 => route.metric = 100,
        3 => route.protocol = PROTO_STATIC,
        4 => route.scope = RT_SCOPE_HOST,
        5 => {
            route.gateway = Some(Ipv4Addr::new(10, 0, 0, 1));
            route.scope = SCOPE_UNIVERSE;
        }
        6 => {
            route.kind = RTN_BLACKHOLE;
            route.oif = None;
            route.scope = SCOPE_UNIVERSE;
        }
        7 => route.prefsrc = Some(SILK_HOST_IP),
        8 if multipath => {
            route.oif = None;
            route.scope = SCOPE_UNIVERSE;
            route.multipath = Some(vec![
                (10, Some(Ipv4Addr::new(10, 0, 0, 1))),
                (11, Some(Ipv4Addr::new(10, 0, 0, 2))),
            ]);
        }
        9 => route.dst = Ipv4Addr::new(10, 1, 0, 1),
        _ => {}
    }
    route
}

fn random_step(
    kernel: &mut Kernel,
    rng: &mut Rng,
    multipath: bool,
    flags: &[u16],
    addresses: bool,
) {
    let link = *rng.pick(&[10, 11, 12]);
    match rng.index(if addresses { 20 } else { 15 }) {
        0..=7 => {
            let route = random_route(rng, multipath);
            kernel.insert(route, *rng.pick(flags));
        }
        8..=11 => {
            if !kernel.routes.is_empty() {
                let route = kernel.routes[rng.index(kernel.routes.len())].clone();
                kernel.delete(&route);
            }
        }
        12 => kernel.link_down(link),
        13 => {
            kernel.link_add(link);
            kernel.link_up(link);
        }
        14 => kernel.link_del(link),
        15 | 16 => kernel.addr_add((link, SILK_HOST_IP, Some(ip(*rng.pick(&[1, 4]))))),
        17 => kernel.addr_add((link, Ipv4Addr::new(10, 0, 0, 9 + link as u8), None)),
        _ => {
            if !kernel.addresses.is_empty() {
                let address = kernel.addresses[rng.index(kernel.addresses.len())];
                kernel.addr_del(address);
            }
        }
    }
}

fn random_kernel() -> Kernel {
    let mut kernel = Kernel::default();
    for index in [10, 11, 12] {
        kernel.link_add(index);
        kernel.link_up(index);
        kernel.addr_add((index, SILK_HOST_IP, None));
    }
    kernel.events.clear();
    kernel
}

#[test]
fn random_sequences_match_a_fresh_dump() {
    let (mut exempt_views, mut ambiguous_views) = (0, 0);
    for seed in 1..=200u64 {
        let mut rng = XorShift64::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut kernel = random_kernel();
        let mut follower = Follower::new(&kernel);
        for n in 0..60 {
            random_step(
                &mut kernel,
                &mut rng,
                false,
                &[ADD, REPLACE, PREPEND, APPEND, CHANGE],
                true,
            );
            follower.catch_up(&mut kernel);
            follower.check(&kernel, &format!("seed {seed} step {n}"));
            exempt_views += usize::from(!follower.table.containers(overlay()).is_empty());
            ambiguous_views += usize::from(follower.table.slots.values().any(|aliases| {
                let oifs: BTreeSet<u32> = aliases.iter().filter_map(Alias::container_oif).collect();
                oifs.len() > 1
            }));
        }
        assert_eq!(
            follower.redumps, 0,
            "seed {seed}: followed from events alone"
        );
    }
    // The sequences reach the interesting states, not only empty tables.
    assert!(exempt_views > 2000, "{exempt_views}");
    assert!(ambiguous_views > 50, "{ambiguous_views}");
}

#[test]
fn multipath_routes_through_a_downed_interface_force_a_dump() {
    let mut redumps = 0;
    for seed in 1..=100u64 {
        let mut rng = XorShift64::new(seed.wrapping_mul(0xd1b5_4a32_d192_ed03) | 1);
        let mut kernel = random_kernel();
        let mut follower = Follower::new(&kernel);
        for n in 0..60 {
            random_step(&mut kernel, &mut rng, true, &[ADD, REPLACE, APPEND], true);
            follower.catch_up(&mut kernel);
            follower.check(&kernel, &format!("seed {seed} step {n}"));
        }
        redumps += follower.redumps;
    }
    assert!(redumps > 0, "some sequences must have needed a dump");
}

/// A dump taken while events are still queued (they reach the socket before the dump but are
/// read after it): replaying route and interface events the dump already reflects converges,
/// because each states what is true afterwards, when every slot holds one route as on a cell.
///
/// Address removals are the exception: whether one took the interface's last address (and
/// its routes with it) depends on the addresses at the time, which a newer dump no longer
/// shows. That race (a last address removed and routes re-added through the same interface
/// while a dump runs) is left to the verifying pass.
#[test]
fn replaying_route_and_link_events_over_a_newer_dump_converges() {
    for seed in 1..=200u64 {
        let mut rng = XorShift64::new(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
        let mut kernel = random_kernel();
        let mut follower = Follower::new(&kernel);
        let mut pending = Vec::new();
        for n in 0..40 {
            random_step(&mut kernel, &mut rng, false, &[ADD, REPLACE, CHANGE], false);
            pending.append(&mut kernel.events);
            if rng.index(5) == 0 {
                // The dump happens now; all pending events are replayed after it.
                follower.table = kernel.dump_table();
                follower.view = follower.table.containers(overlay());
                kernel.events = std::mem::take(&mut pending);
                follower.catch_up(&mut kernel);
                follower.check(&kernel, &format!("seed {seed} step {n}"));
            }
        }
    }
}

#[test]
fn an_overrun_forces_a_dump_and_drops_the_queue() {
    let mut kernel = Kernel::default();
    kernel.link_add(10);
    kernel.link_up(10);
    let mut follower = Follower::new(&kernel);
    kernel.insert(R::host(ip(1), 10), ADD);
    for event in kernel.events.drain(..) {
        rtnetlink_datagram(&follower.changes, Some(&datagram(&event)));
    }
    assert!(rtnetlink_datagram(&follower.changes, None));
    follower.catch_up(&mut kernel);
    assert_eq!(follower.redumps, 1);
    follower.check(&kernel, "overrun");
    assert!(!follower.changes.take_routes());
}

#[test]
fn unparsable_route_messages_force_a_dump() {
    let changes = KernelChanges::default();
    changes.routes_watched(true);
    assert!(changes.take_routes());
    let good = emitted(&R::host(ip(1), 10).message());
    // A truncated header, and an attribute longer than the message.
    for bad in [good[..5].to_vec(), {
        let mut bad = good.clone();
        bad[RTMSG_LEN] = 0xff;
        bad
    }] {
        assert!(rtnetlink_datagram(
            &changes,
            Some(&datagram(&(RTM_NEWROUTE, 0, bad)))
        ));
        assert!(changes.drain_route_updates().is_empty());
        assert!(changes.take_routes());
    }
    // Unrelated routes (IPv6 family, other table) neither queue nor wake.
    let mut other = R::host(ip(1), 10);
    other.table = 100;
    assert!(!rtnetlink_datagram(
        &changes,
        Some(&datagram(&(RTM_NEWROUTE, ADD, emitted(&other.message()))))
    ));
    // An IPv6 route wakes the loop to dump IPv6 routes, and touches no IPv4 route.
    let mut v6 = good.clone();
    v6[0] = 10;
    v6[1] = 128;
    assert!(rtnetlink_datagram(
        &changes,
        Some(&datagram(&(RTM_NEWROUTE, ADD, v6.clone())))
    ));
    assert!(changes.drain_route_updates().is_empty());
    assert!(!changes.take_routes());
    // An IPv6 prefix route (a veth's link-local /64) does not.
    v6[1] = 64;
    assert!(!rtnetlink_datagram(
        &changes,
        Some(&datagram(&(RTM_NEWROUTE, ADD, v6)))
    ));
}

#[test]
fn no_prefix_of_a_message_panics() {
    let mut route = R::host(ip(1), 10);
    route.multipath = Some(vec![(10, Some(Ipv4Addr::new(10, 0, 0, 1))), (11, None)]);
    route.prefsrc = Some(SILK_HOST_IP);
    let bytes = emitted(&route.message());
    for end in 0..=bytes.len() {
        let _ = parse_route(&bytes[..end]);
        let _ = parse_address(&bytes[..end]);
        let _ = route_event(RTM_NEWLINK, 0, &bytes[..end]);
    }
    let parsed = parse_route(&bytes).expect("parses").expect("main /32");
    assert_eq!(
        parsed.1.multipath,
        Some(vec![
            NextHop {
                ifindex: 10,
                hops: 0,
                gateway: Some(Ipv4Addr::new(10, 0, 0, 1))
            },
            NextHop {
                ifindex: 11,
                hops: 0,
                gateway: None
            },
        ])
    );
    assert_eq!(parsed.1.prefsrc, Some(SILK_HOST_IP));
}

#[test]
fn the_parser_applies_the_dump_rules() {
    // Every kind of route the dump-based rules tell apart, one at a time.
    let mut routes = vec![R::host(ip(1), 10)];
    let mut variant = |f: &dyn Fn(&mut R)| {
        let mut route = R::host(ip(1), 10);
        f(&mut route);
        routes.push(route);
    };
    variant(&|r| r.prefix = 24);
    variant(&|r| r.table = 100);
    variant(&|r| r.table = 1000);
    variant(&|r| r.kind = 2); // local
    variant(&|r| r.gateway = Some(Ipv4Addr::new(10, 0, 0, 1)));
    variant(&|r| r.oif = None);
    variant(&|r| r.dst = Ipv4Addr::new(10, 0, 0, 1));
    variant(&|r| r.multipath = Some(vec![(10, None)]));
    variant(&|r| r.metric = 7);
    variant(&|r| r.scope = RT_SCOPE_HOST);
    for route in routes {
        let message = route.message();
        let parsed = parse_route(&emitted(&message)).expect("parses");
        let table = RouteTable::from_dump(parsed, []);
        let mut reference = ContainerRoutes::default();
        reference.add(&message, overlay());
        assert_eq!(table.containers(overlay()), reference.finish(), "{route:?}");
    }
}
