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

use dump::{
    AF_INET, RTM_GETADDR, RTM_GETROUTE, RTM_NEWADDR, add_link_name, dump_bounded, dump_request,
    link_dump_request, rtmsg,
};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::route::RouteMessage;
use parse::{container_route6, maybe_container6};
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_core::Parseable;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::inventory::routes::{self, RouteTable};

mod dump;
mod events;
mod parse;
#[cfg(test)]
mod tests;

#[cfg(test)]
pub(crate) use events::rtnetlink_datagram;
pub use events::{KernelChanges, watch_events};
pub(crate) use parse::ContainerRoutes;

/// rtnetlink route messages, and the IPv6 address family (linux/rtnetlink.h, socket.h).
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const AF_INET6: u8 = 10;
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

/// Whether IPv6 is in use in this network namespace (not disabled by sysctl, not absent).
pub fn ipv6_in_use() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .is_ok_and(|v| v.trim() == "0")
}
