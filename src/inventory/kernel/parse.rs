//! What a route or link message says about containers: the dump-based rules for which host
//! route leads to a container, and a link's index and name.

use super::AF_INET6;
use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteType};

use crate::wire::{self};

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
pub(super) fn host_route(
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
pub(super) fn container_route(
    route: &netlink_packet_route::route::RouteMessage,
    overlay: Ipv4Net,
) -> Option<(Ipv4Addr, u32)> {
    match host_route(route, 32)? {
        (RouteAddress::Inet(ip), oif) if overlay.contains(&ip) => Some((ip, oif)),
        _ => None,
    }
}

/// `Some((ip, oif))` when `route` is a host route to a global IPv6 address via one interface.
pub(super) fn container_route6(
    route: &netlink_packet_route::route::RouteMessage,
) -> Option<(Ipv6Addr, u32)> {
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
pub(super) fn maybe_container6(payload: &[u8]) -> bool {
    const RTN_UNICAST: u8 = 1;
    match payload.get(..8) {
        Some(header) => header[0] == AF_INET6 && header[1] == 128 && header[7] == RTN_UNICAST,
        // Too short to tell: look again rather than miss one.
        None => payload.first() == Some(&AF_INET6),
    }
}

/// struct ifinfomsg, and the attribute holding the interface name (linux/if_link.h).
pub(super) const IFINFOMSG_LEN: usize = 16;
pub(super) const IFLA_IFNAME: u16 = 3;

/// (ifindex, name) of an RTM_NEWLINK/RTM_DELLINK payload: an ifinfomsg, then attributes.
pub(super) fn link_update(payload: &[u8]) -> Option<(u32, String)> {
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
