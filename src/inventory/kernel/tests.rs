use super::dump::{RTM_GETLINK, link_dump_datagram};
use super::parse::{IFINFOMSG_LEN, IFLA_IFNAME, container_route, link_update};
use super::*;
use crate::inventory::routes::{RTM_DELLINK, RTM_NEWLINK};
use crate::wire;
use crate::wire::{NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR};
use crate::wire::{NLMSG_HDRLEN, align4};
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteType};

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
