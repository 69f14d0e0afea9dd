//! The route and link watcher: rtnetlink events queued for the loop in [`KernelChanges`],
//! with a dump asked for whenever events cannot be followed (an overrun, a message that does
//! not parse).

use std::sync::{Arc, Mutex};

use super::parse::{link_update, maybe_container6};
use super::{RTM_DELROUTE, RTM_NEWROUTE};
use crate::change_flag::ChangeFlag;
use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols};
use tokio::sync::Notify;

use crate::inventory::routes::{self, Event, RTM_DELLINK, RTM_NEWLINK, RouteUpdate};
use crate::wire::{self, Message};

/// rtnetlink multicast groups (linux/rtnetlink.h): RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR and
/// RTNLGRP_IPV4_ROUTE. Address events matter to routes: IPv4 drops an interface's routes,
/// without a route notification, when its last address goes.
pub(super) const RTNLGRP_LINK: u32 = 1;
pub(super) const RTNLGRP_IPV4_IFADDR: u32 = 5;
pub(super) const RTNLGRP_IPV4_ROUTE: u32 = 7;
/// RTNLGRP_IPV6_ROUTE: container IPv6 /128 routes.
pub(super) const RTNLGRP_IPV6_ROUTE: u32 = 11;
/// RTNLGRP_NEXTHOP: a change to a nexthop object changes the routes through it silently.
/// Joined best effort (kernels before 5.3 have neither the group nor nexthop objects).
pub(super) const RTNLGRP_NEXTHOP: u32 = 32;
/// Receive buffer for event sockets; an overrun is harmless (we re-list) but rarer is cheaper.
pub(super) const EVENT_RCVBUF: usize = 1 << 20;

/// What the route and link watcher ([`watch_events`]) saw change since the loop last looked:
/// its flags and queues, and nothing of the other watchers'. Unwatched flags always count as
/// changed (see [`ChangeFlag`]).
#[derive(Debug, Default)]
pub struct KernelChanges {
    /// Set when the link cache cannot be kept from events (overrun, unparsable message).
    pub(super) links: ChangeFlag,
    /// Set when the route table cannot be kept from events (overrun, unparsable message).
    pub(super) routes: ChangeFlag,
    /// IPv6 routes changed (they are dumped again; a cell routes few).
    pub(super) routes6: ChangeFlag,
    /// Link renames, additions (Some(name)) and removals (None), in event order, not yet
    /// applied to the loop's link cache.
    pub(super) link_updates: Mutex<Vec<(u32, Option<String>)>>,
    /// Route, address and interface-state changes, in event order, not yet applied to the
    /// loop's [`RouteTable`].
    pub(super) route_updates: Mutex<Vec<RouteUpdate>>,
}

/// Beyond this many unapplied link updates the queue is dropped and the links re-dumped.
pub(super) const MAX_LINK_UPDATES: usize = 100_000;
/// Beyond this many unapplied route updates the queue is dropped and the routes re-dumped.
pub(super) const MAX_ROUTE_UPDATES: usize = 100_000;

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

    pub(super) fn queue_link_update(&self, index: u32, name: Option<String>) {
        let mut queue = self.link_updates.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() >= MAX_LINK_UPDATES {
            queue.clear();
            self.mark_links();
        } else {
            queue.push((index, name));
        }
    }

    pub(super) fn mark_links(&self) {
        self.links.mark();
    }

    pub(super) fn queue_route_update(&self, update: RouteUpdate) {
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

    pub(super) fn mark_routes(&self) {
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

pub(super) fn event_socket(protocol: isize, groups: &[u32]) -> std::io::Result<TokioSocket> {
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
pub(super) async fn pump(
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
