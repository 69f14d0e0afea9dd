//! The kernel's side of the inventory: which host interface leads to each container IP.
//!
//! silk (and the CNI `ptp` plugin) give every container a veth and a /32 host route to its IP
//! through the host-side end. That route's output interface index is what an exemption is keyed
//! on: a kernel ifindex is never reused while the machine is up, so an exemption can never be
//! inherited by a later container that reuses the IP.
//!
//! Links and host routes are dumped once, then kept from rtnetlink events ([`KernelChanges`]
//! queues them; [`RouteTable`] applies route events the way the kernel changes its routes); a buffer
//! overrun or a message that does not parse means "dump again", and the reconcile loop's
//! verifying pass dumps regardless. This module never changes kernel state.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols};
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_core::Parseable;
use tokio::sync::Notify;

use crate::change_flag::ChangeFlag;
use crate::inventory::routes::{self, Event, RTM_DELLINK, RTM_NEWLINK, RouteTable, RouteUpdate};
use crate::wire::{self, Message, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR};

/// rtnetlink multicast groups (linux/rtnetlink.h): RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR and
/// RTNLGRP_IPV4_ROUTE. Address events matter to routes: IPv4 drops an interface's routes,
/// without a route notification, when its last address goes.
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
/// RTNLGRP_IPV6_ROUTE: container IPv6 /128 routes.
const RTNLGRP_IPV6_ROUTE: u32 = 11;
/// rtnetlink route messages, and the IPv6 address family (linux/rtnetlink.h, socket.h).
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const AF_INET6: u8 = 10;
/// RTNLGRP_NEXTHOP: a change to a nexthop object changes the routes through it silently.
/// Joined best effort (kernels before 5.3 have neither the group nor nexthop objects).
const RTNLGRP_NEXTHOP: u32 = 32;
/// Receive buffer for event sockets; an overrun is harmless (we re-list) but rarer is cheaper.
const EVENT_RCVBUF: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open rtnetlink socket: {0}")]
    Connect(std::io::Error),
    #[error("cannot list {what} over rtnetlink: {source}")]
    Dump {
        what: &'static str,
        source: rtnetlink::Error,
    },
    #[error("cannot list {what} over rtnetlink: {source}")]
    RawDump {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Host routes and interfaces that matter for the overlay, as of one dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelView {
    /// Container IP -> ifindex of the host interface its /32 route goes through.
    /// IPs with routes through more than one interface are left out (ambiguous: restricted).
    pub routes: BTreeMap<Ipv4Addr, u32>,
    /// Container IPv6 address -> ifindex of the host interface its /128 route goes through
    /// (the same rules: main table, unicast, one interface, no gateway; link-local left out).
    pub routes6: BTreeMap<Ipv6Addr, u32>,
    /// ifindex -> interface name, for operators and to read back nft's set listing
    /// (nft prints an `iface_index` element as the interface's name when it exists).
    pub links: BTreeMap<u32, String>,
}

impl KernelView {
    /// The ifindex of the interface named `name`, if it exists.
    pub fn ifindex_of(&self, name: &str) -> Option<u32> {
        self.links
            .iter()
            .find_map(|(index, n)| (n == name).then_some(*index))
    }
}

/// Reads links and routes of the network namespace the process runs in.
#[derive(Clone)]
pub struct KernelReader {
    handle: rtnetlink::Handle,
}

impl KernelReader {
    /// Opens the rtnetlink connection; must be called inside a tokio runtime.
    pub fn connect() -> Result<KernelReader, KernelError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(KernelError::Connect)?;
        tokio::spawn(connection);
        Ok(KernelReader { handle })
    }

    /// Dumps links and the IPv4 main-table host routes into `overlay`.
    pub async fn snapshot(&self, overlay: Ipv4Net) -> Result<KernelView, KernelError> {
        Ok(KernelView {
            links: self.links().await?,
            routes: self.routes(overlay).await?,
            routes6: self.routes6().await?,
        })
    }

    /// ifindex -> name of every link.
    ///
    /// Read from a dump of its own socket, one datagram at a time, keeping only the names:
    /// the rtnetlink crate's connection would parse every link message of the dump in full
    /// (statistics, per-family configuration) and queue them all before the first is read,
    /// which at 5,000 links is tens of MB for a moment.
    pub async fn links(&self) -> Result<BTreeMap<u32, String>, KernelError> {
        let mut names = BTreeMap::new();
        dump_bounded("links", link_dump_request(), |kind, payload| {
            add_link_name(&mut names, kind, payload);
        })
        .await?;
        Ok(names)
    }

    /// Container IP -> host ifindex, from the main table's /32 routes into `overlay`. IPs
    /// routed through more than one interface are left out (ambiguous: restricted).
    pub async fn routes(&self, overlay: Ipv4Net) -> Result<BTreeMap<Ipv4Addr, u32>, KernelError> {
        let mut containers = ContainerRoutes::default();
        let request = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let mut routes = self.handle.route().get(request).execute();
        while let Some(route) = routes
            .try_next()
            .await
            .map_err(|source| KernelError::Dump {
                what: "routes",
                source,
            })?
        {
            containers.add(&route, overlay);
        }
        Ok(containers.finish())
    }

    /// Container IPv6 address -> host ifindex, from the main table's /128 routes through one
    /// interface without a gateway (link-local and multicast destinations left out). IPs
    /// routed through more than one interface are left out (ambiguous: restricted). A kernel
    /// without IPv6 has none.
    pub async fn routes6(&self) -> Result<BTreeMap<Ipv6Addr, u32>, KernelError> {
        let mut found: BTreeMap<Ipv6Addr, Option<u32>> = BTreeMap::new();
        let request = dump_request(RTM_GETROUTE, &rtmsg(AF_INET6));
        let dumped = dump_bounded("IPv6 routes", request, |kind, payload| {
            // Every veth brings IPv6 link-local, local and multicast routes: only a unicast /128
            // is parsed further.
            if kind != RTM_NEWROUTE || !maybe_container6(payload) {
                return;
            }
            let route = RouteMessage::parse(payload).ok();
            if let Some((ip, oif)) = route.as_ref().and_then(container_route6) {
                let slot = found.entry(ip).or_insert(Some(oif));
                if *slot != Some(oif) {
                    *slot = None;
                }
            }
        })
        .await;
        match dumped {
            Ok(()) => {}
            // No IPv6 in this kernel: nothing is routed over it.
            Err(KernelError::RawDump { source, .. })
                if source.raw_os_error() == Some(nix::libc::EAFNOSUPPORT) => {}
            Err(err) => return Err(err),
        }
        Ok(found
            .into_iter()
            .filter_map(|(ip, oif)| Some((ip, oif?)))
            .collect())
    }

    /// Dumps the main table's IPv4 /32 routes and the IPv4 addresses into a [`RouteTable`],
    /// which route events then keep current. Its `containers(overlay)` equals
    /// [`KernelReader::routes`]`(overlay)` taken at the same moment.
    pub async fn route_table(&self) -> Result<RouteTable, KernelError> {
        // Built as the dump arrives (no list of every route beside the table), and read by the
        // same byte parsers as events, so both read a route alike.
        let mut table = RouteTable::default();
        let routes = dump_request(RTM_GETROUTE, &rtmsg(AF_INET));
        dump_bounded("routes", routes, |kind, payload| {
            if kind == RTM_NEWROUTE {
                match routes::parse_route(payload) {
                    Ok(Some((slot, alias))) => table.push_dumped(slot, alias),
                    Ok(None) => {}
                    Err(_) => tracing::debug!("route in dump not understood; skipped"),
                }
            }
        })
        .await?;
        // struct ifaddrmsg of the family, the rest zero.
        let addresses = dump_request(RTM_GETADDR, &[AF_INET, 0, 0, 0, 0, 0, 0, 0]);
        dump_bounded("addresses", addresses, |kind, payload| {
            if kind == RTM_NEWADDR {
                match routes::parse_address(payload) {
                    Ok(Some(address)) => table.push_dumped_address(address),
                    Ok(None) => {}
                    Err(_) => tracing::debug!("address in dump not understood; skipped"),
                }
            }
        })
        .await?;
        Ok(table)
    }

    /// Brings `table` up to date for a pass: applies the route events queued in `changes`, or
    /// dumps afresh when `force` is set (a verifying pass), when routes are unwatched or the
    /// queue overran, or when an event cannot be followed. Returns whether it dumped.
    ///
    /// The queue is drained *before* the flag is taken: an overrun empties the queue and then
    /// sets the flag, so a partial queue is never applied without a dump following it. When
    /// it dumps, the drained events are dropped: they all happened before the dump began.
    /// Events arriving during the dump are applied next pass; replaying them is harmless.
    ///
    /// On error the table is emptied (no container is exempt: fail closed) and routes stay
    /// marked changed, so the next pass dumps again.
    pub async fn refresh_routes(
        &self,
        table: &mut RouteTable,
        changes: &KernelChanges,
        force: bool,
    ) -> Result<bool, KernelError> {
        let updates = changes.drain_route_updates();
        let dump = changes.take_routes() | force;
        if !dump && updates.iter().all(|update| table.apply(update)) {
            return Ok(false);
        }
        // The old table goes first, so that a dump never holds two tables (5,000 routes on a
        // large cell); until it is back the table is empty, which exempts nobody.
        *table = RouteTable::default();
        match self.route_table().await {
            Ok(fresh) => {
                *table = fresh;
                Ok(true)
            }
            Err(err) => {
                *table = RouteTable::default();
                changes.mark_routes();
                Err(err)
            }
        }
    }
}

/// Container IP -> host ifindex from dumped routes, one route at a time: the dump-based rules
/// that [`RouteTable::containers`] reproduces from events.
#[derive(Default)]
pub(crate) struct ContainerRoutes {
    found: BTreeMap<Ipv4Addr, u32>,
    ambiguous: Vec<Ipv4Addr>,
}

impl ContainerRoutes {
    pub(crate) fn add(
        &mut self,
        route: &netlink_packet_route::route::RouteMessage,
        overlay: Ipv4Net,
    ) {
        if let Some((ip, oif)) = container_route(route, overlay) {
            match self.found.insert(ip, oif) {
                Some(previous) if previous != oif => self.ambiguous.push(ip),
                _ => {}
            }
        }
    }

    /// IPs routed through more than one interface are left out (ambiguous: restricted).
    pub(crate) fn finish(mut self) -> BTreeMap<Ipv4Addr, u32> {
        for ip in &self.ambiguous {
            self.found.remove(ip);
        }
        self.found
    }
}

/// `Some((destination, oif))` when `route` is a main-table unicast route to a single address
/// (`/32` or `/128`) through one interface with no gateway: the shape of a container's host
/// route. A gateway, a `via` or multipath means the address is elsewhere, not behind a veth.
fn host_route(
    route: &netlink_packet_route::route::RouteMessage,
    prefix_len: u8,
) -> Option<(RouteAddress, u32)> {
    let header = &route.header;
    if header.destination_prefix_length != prefix_len || header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(header.table);
    let mut destination = None;
    let mut oif = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Table(id) => table = *id,
            RouteAttribute::Destination(address) => destination = Some(address.clone()),
            RouteAttribute::Oif(index) => oif = Some(*index),
            RouteAttribute::Gateway(_) | RouteAttribute::MultiPath(_) | RouteAttribute::Via(_) => {
                return None;
            }
            _ => {}
        }
    }
    (table == u32::from(RouteHeader::RT_TABLE_MAIN)).then_some((destination?, oif?))
}

/// `Some((ip, oif))` when `route` is a host route to an overlay IP via one interface.
fn container_route(
    route: &netlink_packet_route::route::RouteMessage,
    overlay: Ipv4Net,
) -> Option<(Ipv4Addr, u32)> {
    match host_route(route, 32)? {
        (RouteAddress::Inet(ip), oif) if overlay.contains(&ip) => Some((ip, oif)),
        _ => None,
    }
}

/// `Some((ip, oif))` when `route` is a host route to a global IPv6 address via one interface.
fn container_route6(route: &netlink_packet_route::route::RouteMessage) -> Option<(Ipv6Addr, u32)> {
    match host_route(route, 128)? {
        (RouteAddress::Inet6(ip), oif) => {
            let link_local = ip.segments()[0] & 0xffc0 == 0xfe80;
            (!link_local && !ip.is_multicast()).then_some((ip, oif))
        }
        _ => None,
    }
}

/// Whether an rtnetlink route message (payload: struct rtmsg, then attributes) may be a
/// container's IPv6 route: IPv6, a /128, unicast. Every veth that comes up also gets IPv6
/// link-local, local and multicast routes; those must not each cost a dump of all IPv6 routes.
/// A message this passes over can only be a route the dump would leave out anyway.
fn maybe_container6(payload: &[u8]) -> bool {
    const RTN_UNICAST: u8 = 1;
    match payload.get(..8) {
        Some(header) => header[0] == AF_INET6 && header[1] == 128 && header[7] == RTN_UNICAST,
        // Too short to tell: look again rather than miss one.
        None => payload.first() == Some(&AF_INET6),
    }
}

/// Whether IPv6 is in use in this network namespace (not disabled by sysctl, not absent).
pub fn ipv6_in_use() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .is_ok_and(|v| v.trim() == "0")
}

/// What the route and link watcher ([`watch_events`]) saw change since the loop last looked:
/// its flags and queues, and nothing of the other watchers'. Unwatched flags always count as
/// changed (see [`ChangeFlag`]).
#[derive(Debug, Default)]
pub struct KernelChanges {
    /// Set when the link cache cannot be kept from events (overrun, unparsable message).
    links: ChangeFlag,
    /// Set when the route table cannot be kept from events (overrun, unparsable message).
    routes: ChangeFlag,
    /// IPv6 routes changed (they are dumped again; a cell routes few).
    routes6: ChangeFlag,
    /// Link renames, additions (Some(name)) and removals (None), in event order, not yet
    /// applied to the loop's link cache.
    link_updates: Mutex<Vec<(u32, Option<String>)>>,
    /// Route, address and interface-state changes, in event order, not yet applied to the
    /// loop's [`RouteTable`].
    route_updates: Mutex<Vec<RouteUpdate>>,
}

/// Beyond this many unapplied link updates the queue is dropped and the links re-dumped.
const MAX_LINK_UPDATES: usize = 100_000;
/// Beyond this many unapplied route updates the queue is dropped and the routes re-dumped.
const MAX_ROUTE_UPDATES: usize = 100_000;

impl KernelChanges {
    /// Whether links may have changed since the last call (dump the link table again).
    pub fn take_links(&self) -> bool {
        self.links.take()
    }

    /// Whether the route table must be dumped again (unwatched, overrun, or an event that
    /// could not be parsed) since the last call. Prefer [`KernelReader::refresh_routes`],
    /// which takes this flag and the queue in the right order.
    pub fn take_routes(&self) -> bool {
        self.routes.take()
    }

    /// Whether IPv6 routes may have changed since the last call (dump them again).
    pub fn take_routes6(&self) -> bool {
        self.routes6.take()
    }

    /// Route updates seen since the last call, oldest first, for [`RouteTable::apply`].
    /// Drain *before* [`KernelChanges::take_routes`]; when that says "dump", these are all older
    /// than the dump and can be dropped.
    pub fn drain_route_updates(&self) -> Vec<RouteUpdate> {
        let mut queue = self.route_updates.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *queue)
    }

    /// Link updates seen since the last call, oldest first. Apply them after any dump taken
    /// because [`KernelChanges::take_links`] said so: replaying in order converges on the latest state.
    pub fn drain_link_updates(&self) -> Vec<(u32, Option<String>)> {
        let mut queue = self.link_updates.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *queue)
    }

    fn queue_link_update(&self, index: u32, name: Option<String>) {
        let mut queue = self.link_updates.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() >= MAX_LINK_UPDATES {
            queue.clear();
            self.mark_links();
        } else {
            queue.push((index, name));
        }
    }

    fn mark_links(&self) {
        self.links.mark();
    }

    fn queue_route_update(&self, update: RouteUpdate) {
        let mut queue = self.route_updates.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() >= MAX_ROUTE_UPDATES {
            queue.clear();
            // Under the lock, after clearing: whoever drains next also sees the flag.
            self.mark_routes();
        } else {
            queue.push(update);
        }
    }

    /// The route watcher started (true) or stopped (false).
    pub(crate) fn routes_watched(&self, watched: bool) {
        self.routes.watching(watched);
    }

    fn mark_routes(&self) {
        self.routes.mark();
    }
}

/// Wakes `trigger` on every link or IPv4 route change, recording what changed in `changes`.
///
/// Link messages are queued as (ifindex, name) updates for the loop's link cache, and route,
/// address and interface up/down messages as [`RouteUpdate`]s for its [`RouteTable`], so no
/// pass has to dump every link or route. A receive error (typically ENOBUFS after an overrun)
/// marks links and routes changed. (nf_tables events are the dataplane's.)
pub async fn watch_events(
    trigger: Arc<Notify>,
    changes: Arc<KernelChanges>,
) -> std::io::Result<()> {
    let mut route_socket = event_socket(
        protocols::NETLINK_ROUTE,
        &[RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV4_ROUTE],
    )?;
    if let Err(err) = route_socket.socket_mut().add_membership(RTNLGRP_NEXTHOP) {
        tracing::debug!(error = %err, "no nexthop events (kernel without nexthop objects)");
    }
    // Best effort: a kernel without IPv6 has no IPv6 routes to watch (they are then dumped on
    // every verifying pass, and there are none).
    let ipv6_watched = route_socket
        .socket_mut()
        .add_membership(RTNLGRP_IPV6_ROUTE)
        .is_ok();
    changes.links.watching(true);
    changes.routes_watched(true);
    changes.routes6.watching(ipv6_watched);
    let result = pump(route_socket, "rtnetlink", trigger, {
        let changes = changes.clone();
        move |datagram: Option<&[u8]>| rtnetlink_datagram(&changes, datagram)
    })
    .await;
    changes.links.watching(false);
    changes.routes_watched(false);
    changes.routes6.watching(false);
    result
}

/// Records what one rtnetlink datagram (None: a receive error, typically ENOBUFS after an
/// overrun) changed in `changes`; returns whether the loop should look (anything queued or
/// marked).
pub(crate) fn rtnetlink_datagram(changes: &KernelChanges, datagram: Option<&[u8]>) -> bool {
    let Some(bytes) = datagram else {
        changes.mark_links();
        changes.mark_routes();
        changes.routes6.mark();
        return true;
    };
    let mut relevant = false;
    for Message {
        kind,
        flags,
        payload,
        ..
    } in wire::messages(bytes)
    {
        // IPv6 routes are dumped again on any IPv6 route change, and when a link goes (the
        // kernel may drop its routes without a message).
        let ipv6_route =
            (kind == RTM_NEWROUTE || kind == RTM_DELROUTE) && maybe_container6(payload);
        if ipv6_route || kind == RTM_DELLINK {
            relevant = true;
            changes.routes6.mark();
        }
        if kind == RTM_NEWLINK || kind == RTM_DELLINK {
            relevant = true;
            match (link_update(payload), kind) {
                (Some((index, name)), RTM_NEWLINK) => changes.queue_link_update(index, Some(name)),
                (Some((index, _)), _) => changes.queue_link_update(index, None),
                (None, _) => changes.mark_links(),
            }
        }
        match routes::route_event(kind, flags, payload) {
            Event::Irrelevant => {}
            Event::Update(update) => {
                relevant = true;
                changes.queue_route_update(update);
            }
            Event::Redump => {
                relevant = true;
                changes.mark_routes();
            }
        }
    }
    relevant
}

fn event_socket(protocol: isize, groups: &[u32]) -> std::io::Result<TokioSocket> {
    let mut socket = TokioSocket::new(protocol)?;
    socket.socket_mut().bind(&SocketAddr::new(0, 0))?;
    for group in groups {
        socket.socket_mut().add_membership(*group)?;
    }
    // Best effort: a small buffer only means more overruns, which we handle anyway.
    let _ = socket.socket_mut().set_rx_buf_sz(EVENT_RCVBUF);
    Ok(socket)
}

/// Receives datagrams; `relevant(Some(bytes))` / `relevant(None)` (on error) says whether to
/// wake the loop.
async fn pump(
    socket: TokioSocket,
    name: &'static str,
    trigger: Arc<Notify>,
    relevant: impl Fn(Option<&[u8]>) -> bool,
) -> std::io::Result<()> {
    let mut consecutive_errors = 0u32;
    loop {
        let wake = match socket.recv_from_full().await {
            Ok((bytes, _)) => {
                consecutive_errors = 0;
                relevant(Some(&bytes))
            }
            Err(err) => {
                consecutive_errors += 1;
                tracing::debug!(source = name, error = %err, "netlink event socket error; re-listing");
                if consecutive_errors > 1000 {
                    return Err(err);
                }
                relevant(None)
            }
        };
        if wake {
            trigger.notify_one();
        }
    }
}

/// Longest a dump (links, routes, addresses) may take.
const DUMP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// RTM_GETLINK, and the netlink message types and flags a dump uses (linux/netlink.h).
const RTM_GETLINK: u16 = 18;
/// Sequence number of the one request a dump socket sends.
const DUMP_SEQ: u32 = 1;

/// A dump request of `kind`: the netlink header, then `body` (the family's header and
/// attributes).
fn dump_request(kind: u16, body: &[u8]) -> Vec<u8> {
    wire::request(kind, NLM_F_REQUEST | NLM_F_DUMP, DUMP_SEQ, body)
}

/// A `struct rtmsg` asking for the routes of `family`, the rest zero.
fn rtmsg(family: u8) -> [u8; 12] {
    let mut header = [0; 12];
    header[0] = family;
    header
}

/// `RTM_GETLINK` dump request: an all-zero `ifinfomsg` (every family), asking the kernel to
/// leave counters out.
fn link_dump_request() -> Vec<u8> {
    let mut body = vec![0; IFINFOMSG_LEN];
    // Only names are read: the kernel need not gather every link's counters (a third of each
    // message; at 5,000 containers the dumps are most of a verifying pass).
    body.extend_from_slice(&(EXT_MASK_ATTR_LEN as u16).to_ne_bytes());
    body.extend_from_slice(&IFLA_EXT_MASK.to_ne_bytes());
    body.extend_from_slice(&RTEXT_FILTER_SKIP_STATS.to_ne_bytes());
    dump_request(RTM_GETLINK, &body)
}

/// `IFLA_EXT_MASK` (u32) and its flag that leaves statistics out of a link dump
/// (linux/if_link.h, linux/rtnetlink.h; unknown to a kernel older than 4.20, which ignores it).
const IFLA_EXT_MASK: u16 = 29;
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;
const EXT_MASK_ATTR_LEN: usize = 8;
/// Dump requests for IPv4 routes and addresses (linux/rtnetlink.h), and what they answer.
const RTM_GETROUTE: u16 = 26;
const RTM_GETADDR: u16 = 22;
const RTM_NEWADDR: u16 = 20;
const AF_INET: u8 = 2;

/// A link of a link dump into `names`.
fn add_link_name(names: &mut BTreeMap<u32, String>, kind: u16, payload: &[u8]) {
    if kind == RTM_NEWLINK
        && let Some((index, name)) = link_update(payload)
    {
        names.insert(index, name);
    }
}

/// [`dump_raw`] within [`DUMP_TIMEOUT`], its failure named as a listing of `what`.
async fn dump_bounded(
    what: &'static str,
    request: Vec<u8>,
    each: impl FnMut(u16, &[u8]),
) -> Result<(), KernelError> {
    match tokio::time::timeout(DUMP_TIMEOUT, dump_raw(request, each)).await {
        Ok(result) => result.map_err(|source| KernelError::RawDump { what, source }),
        Err(_) => Err(KernelError::RawDump {
            what,
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no complete answer within {DUMP_TIMEOUT:?}"),
            ),
        }),
    }
}

/// Sends one dump `request` on a socket of its own and gives each answer's message type and
/// payload to `each`, datagram by datagram, until the dump ends.
async fn dump_raw(request: Vec<u8>, mut each: impl FnMut(u16, &[u8])) -> std::io::Result<()> {
    let mut socket = TokioSocket::new(protocols::NETLINK_ROUTE)?;
    socket.socket_mut().bind_auto()?;
    socket.socket_mut().connect(&SocketAddr::new(0, 0))?;
    socket.send(&request).await?;
    loop {
        let (datagram, _) = socket.recv_from_full().await?;
        if dump_datagram(&datagram, &mut each)? {
            return Ok(());
        }
    }
}

/// Gives the messages of one datagram of a dump to `each`; returns whether the dump ended.
fn dump_datagram(datagram: &[u8], each: &mut impl FnMut(u16, &[u8])) -> std::io::Result<bool> {
    for Message { kind, payload, .. } in wire::messages(datagram) {
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = payload
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map(i32::from_ne_bytes)
                    .unwrap_or(-nix::libc::EPROTO);
                return Err(std::io::Error::from_raw_os_error(-code));
            }
            kind => each(kind, payload),
        }
    }
    Ok(false)
}

/// Adds the links of one datagram of a link dump to `names`; returns whether the dump ended.
#[cfg(test)]
fn link_dump_datagram(datagram: &[u8], names: &mut BTreeMap<u32, String>) -> std::io::Result<bool> {
    dump_datagram(datagram, &mut |kind, payload| {
        add_link_name(names, kind, payload)
    })
}

/// struct ifinfomsg, and the attribute holding the interface name (linux/if_link.h).
const IFINFOMSG_LEN: usize = 16;
const IFLA_IFNAME: u16 = 3;

/// (ifindex, name) of an RTM_NEWLINK/RTM_DELLINK payload: an ifinfomsg, then attributes.
fn link_update(payload: &[u8]) -> Option<(u32, String)> {
    let index = u32::try_from(i32::from_ne_bytes(payload.get(4..8)?.try_into().ok()?)).ok()?;
    for attribute in wire::attributes(payload.get(IFINFOMSG_LEN..)?) {
        let (kind, raw) = attribute.ok()?;
        if kind == IFLA_IFNAME {
            let text = raw.split(|b| *b == 0).next().unwrap_or_default();
            return Some((index, String::from_utf8_lossy(text).into_owned()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{NLMSG_HDRLEN, align4};
    use netlink_packet_route::route::RouteMessage;

    fn route(prefix_len: u8, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header.destination_prefix_length = prefix_len;
        message.header.kind = RouteType::Unicast;
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.attributes = attrs;
        message
    }

    fn overlay() -> Ipv4Net {
        "10.255.0.0/16".parse().expect("literal")
    }

    #[test]
    fn host_route_through_a_veth_is_a_container_route() {
        let ip = Ipv4Addr::new(10, 255, 1, 5);
        let message = route(
            32,
            vec![
                RouteAttribute::Destination(RouteAddress::Inet(ip)),
                RouteAttribute::Oif(42),
            ],
        );
        assert_eq!(container_route(&message, overlay()), Some((ip, 42)));
    }

    #[test]
    fn other_routes_are_ignored() {
        let ip = Ipv4Addr::new(10, 255, 1, 5);
        let dst = RouteAttribute::Destination(RouteAddress::Inet(ip));
        // Not a /32.
        assert_eq!(
            container_route(
                &route(24, vec![dst.clone(), RouteAttribute::Oif(1)]),
                overlay()
            ),
            None
        );
        // Outside the overlay.
        let outside = RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(
            container_route(&route(32, vec![outside, RouteAttribute::Oif(1)]), overlay()),
            None
        );
        // Via a gateway.
        let gw = RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(
            container_route(
                &route(32, vec![dst.clone(), gw, RouteAttribute::Oif(1)]),
                overlay()
            ),
            None
        );
        // No output interface.
        assert_eq!(
            container_route(&route(32, vec![dst.clone()]), overlay()),
            None
        );
        // Another table.
        let mut other_table = route(32, vec![dst.clone(), RouteAttribute::Oif(1)]);
        other_table.header.table = 100;
        assert_eq!(container_route(&other_table, overlay()), None);
        // Local (the host's own address), not unicast.
        let mut local = route(32, vec![dst, RouteAttribute::Oif(1)]);
        local.header.kind = RouteType::Local;
        assert_eq!(container_route(&local, overlay()), None);
    }

    fn nlmsg(kind: u16, payload: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + payload.len();
        let mut out = Vec::new();
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(payload);
        out.resize(align4(out.len()), 0);
        out
    }

    #[test]
    fn only_ipv6_host_routes_ask_for_an_ipv6_dump() {
        // family, dst_len, src_len, tos, table, protocol, scope, type
        let host = [AF_INET6, 128, 0, 0, 254, 3, 0, 1];
        assert!(maybe_container6(&host));
        let link_local_prefix = [AF_INET6, 64, 0, 0, 254, 2, 0, 1];
        assert!(!maybe_container6(&link_local_prefix));
        let local = [AF_INET6, 128, 0, 0, 255, 2, 0, 2];
        assert!(!maybe_container6(&local));
        let ipv4 = [2, 32, 0, 0, 254, 3, 0, 1];
        assert!(!maybe_container6(&ipv4));
        assert!(
            maybe_container6(&[AF_INET6, 128]),
            "too short to tell: dump"
        );
    }

    #[test]
    fn messages_are_split() {
        let mut datagram = nlmsg(RTM_NEWLINK, &[1, 2, 3, 4]);
        datagram.extend(nlmsg(RTM_DELLINK, &[5, 6, 7, 8]));
        let parsed: Vec<(u16, Vec<u8>)> = wire::messages(&datagram)
            .map(|m| (m.kind, m.payload.to_vec()))
            .collect();
        assert_eq!(
            parsed,
            vec![
                (RTM_NEWLINK, vec![1, 2, 3, 4]),
                (RTM_DELLINK, vec![5, 6, 7, 8])
            ]
        );
    }

    #[test]
    fn link_messages_give_index_and_name() {
        let mut payload = vec![0u8; IFINFOMSG_LEN];
        payload[4..8].copy_from_slice(&42i32.to_ne_bytes());
        let name = b"s-010255001005\0";
        payload.extend_from_slice(&((4 + name.len()) as u16).to_ne_bytes());
        payload.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        payload.extend_from_slice(name);
        payload.resize(align4(payload.len()), 0);
        assert_eq!(
            link_update(&payload),
            Some((42, "s-010255001005".to_string()))
        );
        assert_eq!(link_update(&payload[..IFINFOMSG_LEN]), None);
        assert_eq!(link_update(&[1, 2]), None);
    }

    #[test]
    fn link_updates_drain_in_order_and_overflow_to_a_dump() {
        let changes = KernelChanges::default();
        changes.links.watching(true);
        assert!(changes.take_links());
        changes.queue_link_update(5, Some("a".into()));
        changes.queue_link_update(5, None);
        assert_eq!(
            changes.drain_link_updates(),
            vec![(5, Some("a".into())), (5, None)]
        );
        assert!(changes.drain_link_updates().is_empty());
        assert!(!changes.take_links());
    }

    #[test]
    fn a_link_dump_gives_every_name_until_done() {
        let link = |index: i32, name: &[u8]| {
            let mut payload = vec![0u8; IFINFOMSG_LEN];
            payload[4..8].copy_from_slice(&index.to_ne_bytes());
            payload.extend_from_slice(&((4 + name.len()) as u16).to_ne_bytes());
            payload.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
            payload.extend_from_slice(name);
            payload.resize(align4(payload.len()), 0);
            nlmsg(RTM_NEWLINK, &payload)
        };
        let mut names = BTreeMap::new();
        let mut first = link(1, b"lo\0");
        first.extend(link(7, b"s-010255000002\0"));
        assert!(!link_dump_datagram(&first, &mut names).expect("no error"));
        assert!(link_dump_datagram(&nlmsg(NLMSG_DONE, &[0; 4]), &mut names).expect("done"));
        assert_eq!(
            names,
            BTreeMap::from([(1, "lo".to_string()), (7, "s-010255000002".to_string())])
        );
        let refused = nlmsg(NLMSG_ERROR, &(-nix::libc::EPERM).to_ne_bytes());
        let err = link_dump_datagram(&refused, &mut names).expect_err("an error");
        assert_eq!(err.raw_os_error(), Some(nix::libc::EPERM));
        let request = link_dump_request();
        assert_eq!(request.len(), NLMSG_HDRLEN + IFINFOMSG_LEN + 8);
        assert_eq!(
            u32::from_ne_bytes(request[..4].try_into().expect("4 bytes")) as usize,
            request.len()
        );
        // The one attribute: IFLA_EXT_MASK = RTEXT_FILTER_SKIP_STATS.
        assert_eq!(request[32..34], 8u16.to_ne_bytes());
        assert_eq!(request[34..36], 29u16.to_ne_bytes());
        assert_eq!(request[36..40], 8u32.to_ne_bytes());
        assert_eq!(
            wire::messages(&request).next().map(|m| (m.kind, m.flags)),
            Some((RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP))
        );
    }

    #[test]
    fn malformed_messages_stop_parsing_without_panicking() {
        assert_eq!(wire::messages(&[1, 2, 3]).count(), 0);
        let mut bad = nlmsg(RTM_NEWLINK, &[0; 16]);
        bad[0] = 0xff; // length beyond the buffer
        assert_eq!(wire::messages(&bad).count(), 0);
    }

    #[test]
    fn changes_start_dirty_and_are_taken_once() {
        let changes = KernelChanges::default();
        // Unwatched: always "changed".
        assert!(changes.take_links());
        assert!(changes.take_links());
        assert!(changes.take_routes6());
        assert!(changes.take_routes6());
        changes.links.watching(true);
        changes.routes6.watching(true);
        assert!(changes.take_links());
        assert!(!changes.take_links());
        assert!(changes.take_routes6());
        assert!(!changes.take_routes6());
        changes.mark_links();
        assert!(changes.take_links());
        assert!(!changes.take_links());
    }

    #[test]
    fn ifindex_of_finds_by_name() {
        let view = KernelView {
            routes6: BTreeMap::new(),
            routes: BTreeMap::new(),
            links: BTreeMap::from([(1, "lo".to_string()), (7, "s-010255001005".to_string())]),
        };
        assert_eq!(view.ifindex_of("s-010255001005"), Some(7));
        assert_eq!(view.ifindex_of("eth9"), None);
    }
}
