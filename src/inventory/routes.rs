//! Host routes kept from rtnetlink events: a pure model of the kernel's main-table /32 routes
//! that a dump builds and events keep current, so that a pass need not dump every route.
//!
//! What qualifies as a container route is exactly what the dump-based
//! [`crate::inventory::kernel::KernelReader::routes`] accepts: a main-table unicast /32 into the
//! overlay through one output interface, without gateway or multipath. The table keeps every
//! main-table IPv4 /32 route, qualifying or not, because a route *replace* names only the new
//! route: the kernel replaces the first route of the same (destination, TOS, metric), which
//! may be one that does not qualify.
//!
//! IPv4 removes routes without a netlink notification when an interface goes down (except
//! host-scope routes), is unregistered or loses its last IPv4 address, and when a preferred
//! source address leaves the host. The table follows interface and address events to do the
//! same. Where it cannot follow (multipath or nexthop-object routes through such an interface,
//! an unparsable message) it says so, and the caller dumps again.
//!
//! Everything here is pure: byte parsers over netlink payloads and a data structure. The
//! sockets live in `kernel.rs`. Nothing here changes kernel state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
// The flags of a NEWROUTE notification (linux/netlink.h).
use netlink_packet_core::{NLM_F_APPEND, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};

/// A payload that does not parse as the message it claims to be.
pub(crate) use crate::wire::Malformed;
use crate::wire::{align4, attributes};

/// Address family of IPv4 (linux/socket.h).
const AF_INET: u8 = 2;
/// The main routing table (linux/rtnetlink.h, RT_TABLE_MAIN).
const RT_TABLE_MAIN: u32 = 254;
/// rtm_type of an ordinary route (RTN_UNICAST).
const RTN_UNICAST: u8 = 1;
/// rtm_scope of host-scope routes (RT_SCOPE_HOST): they survive their interface going down.
const RT_SCOPE_HOST: u8 = 254;
/// struct rtmsg, struct ifaddrmsg, struct ifinfomsg, struct rtnexthop.
const RTMSG_LEN: usize = 12;
const IFADDRMSG_LEN: usize = 8;
const IFINFOMSG_LEN: usize = 16;
const RTNEXTHOP_LEN: usize = 8;
/// Route attributes (linux/rtnetlink.h).
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_PREFSRC: u16 = 7;
const RTA_MULTIPATH: u16 = 9;
const RTA_TABLE: u16 = 15;
const RTA_NH_ID: u16 = 30;
/// Address attributes (linux/if_addr.h).
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// Interface flag "administratively up" (linux/if.h).
const IFF_UP: u32 = 1;

/// The routes the kernel keeps together: the same destination, TOS and metric in the main
/// table. A replace acts on the first of them; ordered by destination first, so a range of
/// slots is a range of IPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Slot {
    dst: Ipv4Addr,
    tos: u8,
    priority: u32,
}

impl Slot {
    const MIN: Slot = Slot::first(Ipv4Addr::UNSPECIFIED);
    const MAX: Slot = Slot::last(Ipv4Addr::BROADCAST);

    /// The first and last slots of destination `dst`.
    const fn first(dst: Ipv4Addr) -> Slot {
        Slot {
            dst,
            tos: 0,
            priority: 0,
        }
    }

    const fn last(dst: Ipv4Addr) -> Slot {
        Slot {
            dst,
            tos: u8::MAX,
            priority: u32::MAX,
        }
    }
}

/// One route within its slot, with what tells it apart from its siblings (the kernel refuses
/// two routes of the same type and nexthop information in one slot). Flags are left out: the
/// kernel changes them (linkdown, offload) without a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Alias {
    kind: u8,
    protocol: u8,
    scope: u8,
    oif: Option<u32>,
    gateway: Option<Ipv4Addr>,
    prefsrc: Option<Ipv4Addr>,
    multipath: Option<Vec<NextHop>>,
    nh_id: Option<u32>,
}

/// One nexthop of a multipath route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NextHop {
    ifindex: u32,
    hops: u8,
    gateway: Option<Ipv4Addr>,
}

impl Alias {
    /// Multipath, or through a nexthop object: its interfaces are not its `oif`.
    fn is_special(&self) -> bool {
        self.multipath.is_some() || self.nh_id.is_some()
    }

    /// The host interface of a container route: unicast, one output interface, no gateway
    /// or multipath (the rules of `kernel::container_route`, given a main-table /32).
    fn container_oif(&self) -> Option<u32> {
        if self.kind != RTN_UNICAST || self.gateway.is_some() || self.multipath.is_some() {
            return None;
        }
        self.oif
    }
}

/// One IPv4 address of an interface, as the kernel tells addresses apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Address {
    index: u32,
    local: Ipv4Addr,
    peer: Option<Ipv4Addr>,
    prefix_len: u8,
}

/// Where a NEWROUTE notification puts its route, read from the message's netlink flags
/// (what `fib_table_insert` sets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// NLM_F_EXCL: the slot was empty; the route is now its only member.
    Only,
    /// NLM_F_CREATE alone: prepended to an occupied slot.
    First,
    /// NLM_F_APPEND: appended to an occupied slot.
    Last,
    /// NLM_F_REPLACE: took the place of the slot's first route.
    ReplaceFirst,
    /// No flags (a notification about an existing route, such as an offload flag change).
    Existing,
}

impl Placement {
    fn from_flags(flags: u16) -> Placement {
        if flags & NLM_F_REPLACE != 0 {
            Placement::ReplaceFirst
        } else if flags & NLM_F_EXCL != 0 {
            Placement::Only
        } else if flags & NLM_F_APPEND != 0 {
            Placement::Last
        } else if flags & NLM_F_CREATE != 0 {
            Placement::First
        } else {
            Placement::Existing
        }
    }
}

/// One change the kernel reported that may matter to the route table, in event order.
/// Opaque: only [`RouteTable::apply`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteUpdate(Update);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Update {
    Added {
        slot: Slot,
        alias: Alias,
        placement: Placement,
    },
    Removed {
        slot: Slot,
        alias: Alias,
    },
    /// The interface is administratively down: its routes are gone, but host-scope ones.
    LinkDown(u32),
    /// The interface is gone: so are its routes and addresses.
    LinkGone(u32),
    AddressAdded(Address),
    AddressRemoved(Address),
}

/// What an rtnetlink message means for the route table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// Nothing (another family, table or prefix length; an interface that is up).
    Irrelevant,
    Update(RouteUpdate),
    /// The table can no longer be kept from events (unparsable message, nexthop objects).
    Redump,
}

/// rtnetlink message types (linux/rtnetlink.h).
pub(crate) const RTM_NEWLINK: u16 = 16;
pub(crate) const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWNEXTHOP: u16 = 104;
const RTM_DELNEXTHOP: u16 = 105;

/// What one rtnetlink message (type, netlink flags, payload) means for the route table.
pub(crate) fn route_event(kind: u16, flags: u16, payload: &[u8]) -> Event {
    let update = match kind {
        RTM_NEWROUTE | RTM_DELROUTE => match parse_route(payload) {
            Ok(Some((slot, alias))) if kind == RTM_NEWROUTE => Update::Added {
                slot,
                alias,
                placement: Placement::from_flags(flags),
            },
            Ok(Some((slot, alias))) => Update::Removed { slot, alias },
            Ok(None) => return Event::Irrelevant,
            Err(Malformed) => return Event::Redump,
        },
        RTM_NEWADDR | RTM_DELADDR => match parse_address(payload) {
            Ok(Some(address)) if kind == RTM_NEWADDR => Update::AddressAdded(address),
            Ok(Some(address)) => Update::AddressRemoved(address),
            Ok(None) => return Event::Irrelevant,
            Err(Malformed) => return Event::Redump,
        },
        RTM_NEWLINK | RTM_DELLINK => match parse_link_state(payload) {
            Ok((index, _)) if kind == RTM_DELLINK => Update::LinkGone(index),
            Ok((index, flags)) if flags & IFF_UP == 0 => Update::LinkDown(index),
            Ok(_) => return Event::Irrelevant,
            Err(Malformed) => return Event::Redump,
        },
        // Routes through a nexthop object change with it; such routes are not a cell's
        // container routes, so simply dump again.
        RTM_NEWNEXTHOP | RTM_DELNEXTHOP => return Event::Redump,
        _ => return Event::Irrelevant,
    };
    Event::Update(RouteUpdate(update))
}

fn ipv4(value: &[u8]) -> Result<Ipv4Addr, Malformed> {
    let octets: [u8; 4] = value.try_into().map_err(|_| Malformed)?;
    Ok(Ipv4Addr::from(octets))
}

fn ne_u32(value: &[u8]) -> Result<u32, Malformed> {
    Ok(u32::from_ne_bytes(value.try_into().map_err(|_| Malformed)?))
}

/// The slot and alias of an RTM_NEWROUTE/RTM_DELROUTE payload (struct rtmsg, then
/// attributes) when it is a main-table IPv4 /32 route; `Ok(None)` for any other route.
pub(crate) fn parse_route(payload: &[u8]) -> Result<Option<(Slot, Alias)>, Malformed> {
    let header = payload.get(..RTMSG_LEN).ok_or(Malformed)?;
    let (family, dst_len, tos) = (header[0], header[1], header[3]);
    let mut table = u32::from(header[4]);
    let mut dst = None;
    let mut priority = 0;
    let mut alias = Alias {
        kind: header[7],
        protocol: header[5],
        scope: header[6],
        oif: None,
        gateway: None,
        prefsrc: None,
        multipath: None,
        nh_id: None,
    };
    if family != AF_INET {
        return Ok(None);
    }
    for attribute in attributes(&payload[RTMSG_LEN..]) {
        let (kind, value) = attribute?;
        match kind {
            RTA_DST => dst = Some(ipv4(value)?),
            RTA_OIF => alias.oif = Some(ne_u32(value)?),
            RTA_GATEWAY => alias.gateway = Some(ipv4(value)?),
            RTA_PRIORITY => priority = ne_u32(value)?,
            RTA_PREFSRC => alias.prefsrc = Some(ipv4(value)?),
            RTA_TABLE => table = ne_u32(value)?,
            RTA_MULTIPATH => alias.multipath = Some(parse_nexthops(value)?),
            RTA_NH_ID => alias.nh_id = Some(ne_u32(value)?),
            _ => {}
        }
    }
    if dst_len != 32 || table != RT_TABLE_MAIN {
        return Ok(None);
    }
    let slot = Slot {
        dst: dst.ok_or(Malformed)?,
        tos,
        priority,
    };
    Ok(Some((slot, alias)))
}

/// The nexthops of an RTA_MULTIPATH attribute: struct rtnexthop, each followed by attributes.
fn parse_nexthops(mut buf: &[u8]) -> Result<Vec<NextHop>, Malformed> {
    let mut hops = Vec::new();
    while !buf.is_empty() {
        let header = buf.get(..RTNEXTHOP_LEN).ok_or(Malformed)?;
        let len = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        if len < RTNEXTHOP_LEN || len > buf.len() {
            return Err(Malformed);
        }
        let mut hop = NextHop {
            hops: header[3],
            ifindex: ne_u32(&header[4..8])?,
            gateway: None,
        };
        for attribute in attributes(&buf[RTNEXTHOP_LEN..len]) {
            if let (RTA_GATEWAY, value) = attribute? {
                hop.gateway = Some(ipv4(value)?);
            }
        }
        hops.push(hop);
        buf = buf.get(align4(len)..).unwrap_or_default();
    }
    Ok(hops)
}

/// The address of an RTM_NEWADDR/RTM_DELADDR payload (struct ifaddrmsg, then attributes)
/// when it is IPv4; `Ok(None)` otherwise.
pub(crate) fn parse_address(payload: &[u8]) -> Result<Option<Address>, Malformed> {
    let header = payload.get(..IFADDRMSG_LEN).ok_or(Malformed)?;
    if header[0] != AF_INET {
        return Ok(None);
    }
    let mut local = None;
    let mut peer = None;
    for attribute in attributes(&payload[IFADDRMSG_LEN..]) {
        match attribute? {
            (IFA_LOCAL, value) => local = Some(ipv4(value)?),
            (IFA_ADDRESS, value) => peer = Some(ipv4(value)?),
            _ => {}
        }
    }
    // Without IFA_LOCAL, IFA_ADDRESS is the local address; with both, the latter is the peer
    // (equal to the local address unless the address was added with `peer`).
    let local = local.or(peer).ok_or(Malformed)?;
    Ok(Some(Address {
        index: ne_u32(&header[4..8])?,
        local,
        peer: peer.filter(|peer| *peer != local),
        prefix_len: header[1],
    }))
}

/// (ifindex, interface flags) of an RTM_NEWLINK/RTM_DELLINK payload (struct ifinfomsg).
fn parse_link_state(payload: &[u8]) -> Result<(u32, u32), Malformed> {
    let header = payload.get(..IFINFOMSG_LEN).ok_or(Malformed)?;
    Ok((ne_u32(&header[4..8])?, ne_u32(&header[8..12])?))
}

/// The main table's IPv4 /32 routes and the host's IPv4 addresses, built from a dump and
/// kept current by [`RouteUpdate`]s. Its [`RouteTable::containers`] view is what a fresh dump
/// through `KernelReader::routes` gives.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// Each slot's routes, in the kernel's order (a replace acts on the first).
    slots: BTreeMap<Slot, Vec<Alias>>,
    /// (output interface, slot) of every route with an output interface: the routes an
    /// interface takes with it when it goes, found without walking the whole table (a
    /// container's veth going is one of its routes at 5,000 containers, not 5,000).
    by_oif: BTreeSet<(u32, Slot)>,
    /// Routes that are multipath or use a nexthop object. While there are any, an interface
    /// going walks every route (to find whether one of them goes with it: then dump).
    special: usize,
    /// IPv4 addresses: the kernel drops an interface's routes when its last address goes, and
    /// routes with a preferred source address when that address leaves the host.
    addresses: BTreeSet<Address>,
    /// Destinations whose routes updates changed since [`RouteTable::take_touched`].
    touched: BTreeSet<Ipv4Addr>,
}

/// Two tables are equal when they hold the same routes and addresses, however they got them.
impl PartialEq for RouteTable {
    fn eq(&self, other: &RouteTable) -> bool {
        self.slots == other.slots && self.addresses == other.addresses
    }
}

impl Eq for RouteTable {}

impl RouteTable {
    /// A table from a dump: routes and addresses in the order the kernel listed them.
    #[cfg(test)]
    pub(crate) fn from_dump(
        routes: impl IntoIterator<Item = (Slot, Alias)>,
        addresses: impl IntoIterator<Item = Address>,
    ) -> RouteTable {
        let mut table = RouteTable::default();
        for (slot, alias) in routes {
            table.push_dumped(slot, alias);
        }
        for address in addresses {
            table.push_dumped_address(address);
        }
        table
    }

    /// A route of a dump, after those listed before it.
    pub(crate) fn push_dumped(&mut self, slot: Slot, alias: Alias) {
        self.edit_slot(slot, |aliases| aliases.push(alias));
    }

    /// Runs `edit` on the routes of `slot` (none yet if it has none), keeping the index, and
    /// drops the slot if it is left empty.
    fn edit_slot<R>(&mut self, slot: Slot, edit: impl FnOnce(&mut Vec<Alias>) -> R) -> R {
        let aliases = self.slots.entry(slot).or_default();
        for alias in aliases.iter() {
            if let Some(oif) = alias.oif {
                self.by_oif.remove(&(oif, slot));
            }
            self.special -= usize::from(alias.is_special());
        }
        let result = edit(aliases);
        for alias in aliases.iter() {
            if let Some(oif) = alias.oif {
                self.by_oif.insert((oif, slot));
            }
            self.special += usize::from(alias.is_special());
        }
        if aliases.is_empty() {
            self.slots.remove(&slot);
        }
        result
    }

    /// `n` container routes (`10.255.<i / 250>.<i % 250 + 2>/32` through interface `1000 + i`)
    /// and the update that the middle one's interface going brings (benchmarks).
    #[doc(hidden)]
    pub fn containers_for_bench(n: usize) -> (RouteTable, RouteUpdate) {
        let mut table = RouteTable::default();
        for i in 0..n {
            let dst = Ipv4Addr::new(10, 255, (i / 250) as u8, (i % 250 + 2) as u8);
            let alias = Alias {
                kind: RTN_UNICAST,
                protocol: 3,
                scope: 253,
                oif: Some(1000 + i as u32),
                gateway: None,
                prefsrc: None,
                multipath: None,
                nh_id: None,
            };
            table.push_dumped(Slot::first(dst), alias);
        }
        (table, RouteUpdate(Update::LinkGone(1000 + n as u32 / 2)))
    }

    /// Whether the index is what the routes say (tests).
    #[cfg(test)]
    pub(crate) fn index_is_consistent(&self) -> bool {
        let mut rebuilt = RouteTable::default();
        for (slot, aliases) in &self.slots {
            for alias in aliases {
                rebuilt.push_dumped(*slot, alias.clone());
            }
        }
        (rebuilt.by_oif == self.by_oif) && rebuilt.special == self.special
    }

    /// An address of a dump.
    pub(crate) fn push_dumped_address(&mut self, address: Address) {
        self.addresses.insert(address);
    }

    /// The host interface `ip`'s /32 routes go through, if `ip` is in `overlay` and they all
    /// go through one container interface: [`RouteTable::containers`] for one IP.
    pub fn container(&self, ip: Ipv4Addr, overlay: Ipv4Net) -> Option<u32> {
        if !overlay.contains(&ip) {
            return None;
        }
        let mut found = None;
        for (_, aliases) in self.slots.range(Slot::first(ip)..=Slot::last(ip)) {
            for oif in aliases.iter().filter_map(Alias::container_oif) {
                match found {
                    Some(previous) if previous != oif => return None,
                    _ => found = Some(oif),
                }
            }
        }
        found
    }

    /// The destinations whose routes changed through [`RouteTable::apply`] since the last call.
    pub fn take_touched(&mut self) -> BTreeSet<Ipv4Addr> {
        std::mem::take(&mut self.touched)
    }

    /// Container IP -> ifindex of the host interface its /32 route goes through, for the IPs
    /// in `overlay`. IPs routed through more than one interface are left out (ambiguous:
    /// restricted), exactly as the dump-based `KernelReader::routes` does.
    pub fn containers(&self, overlay: Ipv4Net) -> BTreeMap<Ipv4Addr, u32> {
        let mut found = BTreeMap::new();
        let mut ambiguous = Vec::new();
        let range = Slot::first(overlay.network())..=Slot::last(overlay.broadcast());
        for (slot, aliases) in self.slots.range(range) {
            for oif in aliases.iter().filter_map(Alias::container_oif) {
                match found.insert(slot.dst, oif) {
                    Some(previous) if previous != oif => ambiguous.push(slot.dst),
                    _ => {}
                }
            }
        }
        for ip in ambiguous {
            found.remove(&ip);
        }
        found
    }

    /// Number of routes held (qualifying or not), for logs.
    pub fn len(&self) -> usize {
        self.slots.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Applies one update. `false` means the table cannot follow this change (the kernel
    /// removed routes whose fate events do not tell): dump again. Updates are idempotent, so
    /// replaying ones a newer dump already reflects converges on the kernel's state.
    pub fn apply(&mut self, update: &RouteUpdate) -> bool {
        if let Update::Added { slot, .. } | Update::Removed { slot, .. } = &update.0 {
            self.touched.insert(slot.dst);
        }
        match &update.0 {
            Update::Added {
                slot,
                alias,
                placement,
            } => {
                self.edit_slot(*slot, |aliases| match placement {
                    Placement::Only => *aliases = vec![alias.clone()],
                    _ if aliases.contains(alias) => {}
                    Placement::First => aliases.insert(0, alias.clone()),
                    Placement::Last | Placement::Existing => aliases.push(alias.clone()),
                    Placement::ReplaceFirst => match aliases.first_mut() {
                        Some(first) => *first = alias.clone(),
                        None => aliases.push(alias.clone()),
                    },
                });
                true
            }
            Update::Removed { slot, alias } => {
                // An unknown route (a replayed delete) is simply not there.
                if self.slots.contains_key(slot) {
                    self.edit_slot(*slot, |aliases| {
                        if let Some(position) = aliases.iter().position(|a| a == alias) {
                            aliases.remove(position);
                        }
                    });
                }
                true
            }
            Update::LinkDown(index) => self.flush_interface(*index, false),
            Update::LinkGone(index) => {
                self.addresses.retain(|address| address.index != *index);
                self.flush_interface(*index, true)
            }
            Update::AddressAdded(address) => {
                self.addresses.insert(*address);
                true
            }
            Update::AddressRemoved(address) => {
                self.addresses.remove(address);
                let mut followed = true;
                // fib_del_ifaddr: the interface's last address took its routes with it.
                if !self.addresses.iter().any(|a| a.index == address.index) {
                    followed = self.flush_interface(address.index, true);
                }
                // fib_sync_down_addr: routes preferring a source address the host no longer
                // has are dropped.
                if !self.addresses.iter().any(|a| a.local == address.local) {
                    self.retain(|alias| alias.prefsrc != Some(address.local));
                }
                followed
            }
        }
    }

    /// Drops the routes the kernel drops when interface `index` goes down (`gone == false`:
    /// host-scope routes stay) or away / loses its last address (`gone`: all of them).
    fn flush_interface(&mut self, index: u32, gone: bool) -> bool {
        let goes =
            |alias: &Alias| alias.oif == Some(index) && (gone || alias.scope != RT_SCOPE_HOST);
        if self.special == 0 {
            // Only the interface's own routes can go: those the index lists.
            let slots: Vec<Slot> = self
                .by_oif
                .range((index, Slot::MIN)..=(index, Slot::MAX))
                .map(|(_, slot)| *slot)
                .collect();
            self.retain_in(slots, |alias| !goes(alias));
            return true;
        }
        let mut followed = true;
        self.retain(|alias| {
            let multipath = alias
                .multipath
                .as_ref()
                .is_some_and(|hops| hops.iter().any(|hop| hop.ifindex == index));
            if multipath || alias.nh_id.is_some() {
                // A multipath route goes only when all its nexthops do, and a route through a
                // nexthop object with the object: leave both to a dump.
                followed = false;
                return true;
            }
            !goes(alias)
        });
        followed
    }

    /// Keeps the routes `keep` says to keep, in every slot.
    fn retain(&mut self, keep: impl FnMut(&Alias) -> bool) {
        let slots: Vec<Slot> = self.slots.keys().copied().collect();
        self.retain_in(slots, keep);
    }

    /// Keeps the routes `keep` says to keep, in `slots`.
    fn retain_in(&mut self, slots: Vec<Slot>, mut keep: impl FnMut(&Alias) -> bool) {
        for slot in slots {
            if !self
                .slots
                .get(&slot)
                .is_some_and(|aliases| aliases.iter().any(|a| !keep(a)))
            {
                continue;
            }
            self.edit_slot(slot, |aliases| aliases.retain(&mut keep));
            self.touched.insert(slot.dst);
        }
    }
}

#[cfg(test)]
mod tests;
