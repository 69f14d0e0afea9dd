//! The kernel's side of the inventory: which host interface leads to each container IP.
//!
//! silk (and the CNI `ptp` plugin) give every container a veth and a /32 host route to its IP
//! through the host-side end. That route's output interface index is what an exemption is keyed
//! on: a kernel ifindex is never reused while the machine is up, so an exemption can never be
//! inherited by a later container that reuses the IP.
//!
//! Reading is a fresh dump on every pass (cheap, and immune to missed or overrun events); the
//! event sockets only say *when* to look again. This module never changes kernel state.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteType};
use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols};
use rtnetlink::RouteMessageBuilder;
use tokio::sync::Notify;

/// rtnetlink multicast groups (linux/rtnetlink.h): RTNLGRP_LINK and RTNLGRP_IPV4_ROUTE.
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
/// nfnetlink group of nf_tables ruleset changes (linux/netfilter/nfnetlink.h): NFNLGRP_NFTABLES.
/// Listening to it lets the agent repair `nft flush ruleset` at once instead of at the next tick.
const NFNLGRP_NFTABLES: u32 = 7;
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
}

/// Host routes and interfaces that matter for the overlay, as of one dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelView {
    /// Container IP -> ifindex of the host interface its /32 route goes through.
    /// IPs with routes through more than one interface are left out (ambiguous: restricted).
    pub routes: BTreeMap<Ipv4Addr, u32>,
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
        let mut view = KernelView::default();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.try_next().await.map_err(|source| KernelError::Dump {
            what: "links",
            source,
        })? {
            let name = link.attributes.iter().find_map(|attr| match attr {
                LinkAttribute::IfName(name) => Some(name.clone()),
                _ => None,
            });
            if let Some(name) = name {
                view.links.insert(link.header.index, name);
            }
        }

        let mut ambiguous = Vec::new();
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
            if let Some((ip, oif)) = container_route(&route, overlay) {
                match view.routes.insert(ip, oif) {
                    Some(previous) if previous != oif => ambiguous.push(ip),
                    _ => {}
                }
            }
        }
        for ip in ambiguous {
            view.routes.remove(&ip);
        }
        Ok(view)
    }
}

/// `Some((ip, oif))` when `route` is a main-table unicast /32 to an overlay IP via one interface.
fn container_route(
    route: &netlink_packet_route::route::RouteMessage,
    overlay: Ipv4Net,
) -> Option<(Ipv4Addr, u32)> {
    let header = &route.header;
    if header.destination_prefix_length != 32 || header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(header.table);
    let mut destination = None;
    let mut oif = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Table(id) => table = *id,
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => destination = Some(*ip),
            RouteAttribute::Oif(index) => oif = Some(*index),
            // A gateway means the IP is elsewhere, not behind a local veth.
            RouteAttribute::Gateway(_) | RouteAttribute::MultiPath(_) => return None,
            _ => {}
        }
    }
    let ip = destination?;
    (table == u32::from(RouteHeader::RT_TABLE_MAIN) && overlay.contains(&ip))
        .then_some(())
        .and(oif.map(|oif| (ip, oif)))
}

/// Wakes `trigger` on every link or IPv4 route change and on every nf_tables ruleset change.
///
/// The messages are not parsed: each pass re-lists, so a message only means "look again". A
/// receive error (typically ENOBUFS after an overrun) also wakes the loop, which re-lists.
pub async fn watch_events(trigger: Arc<Notify>) -> std::io::Result<()> {
    let route_socket = event_socket(
        protocols::NETLINK_ROUTE,
        &[RTNLGRP_LINK, RTNLGRP_IPV4_ROUTE],
    )?;
    let nft_socket = match event_socket(protocols::NETLINK_NETFILTER, &[NFNLGRP_NFTABLES]) {
        Ok(socket) => Some(socket),
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch nf_tables events; drift is repaired on the periodic pass only");
            None
        }
    };
    let route_loop = pump(route_socket, "rtnetlink", trigger.clone());
    match nft_socket {
        Some(socket) => {
            let nft_loop = pump(socket, "nf_tables", trigger);
            tokio::try_join!(route_loop, nft_loop).map(|_| ())
        }
        None => route_loop.await,
    }
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

async fn pump(
    socket: TokioSocket,
    name: &'static str,
    trigger: Arc<Notify>,
) -> std::io::Result<()> {
    let mut consecutive_errors = 0u32;
    loop {
        match socket.recv_from_full().await {
            Ok(_) => consecutive_errors = 0,
            Err(err) => {
                consecutive_errors += 1;
                tracing::debug!(source = name, error = %err, "netlink event socket error; re-listing");
                if consecutive_errors > 1000 {
                    return Err(err);
                }
            }
        }
        trigger.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn ifindex_of_finds_by_name() {
        let view = KernelView {
            routes: BTreeMap::new(),
            links: BTreeMap::from([(1, "lo".to_string()), (7, "s-010255001005".to_string())]),
        };
        assert_eq!(view.ifindex_of("s-010255001005"), Some(7));
        assert_eq!(view.ifindex_of("eth9"), None);
    }
}
