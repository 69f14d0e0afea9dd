//! Dumps of links, routes and addresses, read raw on a socket of their own within
//! [`DUMP_TIMEOUT`], through the same byte parsers as events.

use super::KernelError;
use super::parse::{IFINFOMSG_LEN, link_update};
use crate::inventory::routes::RTM_NEWLINK;
use std::collections::BTreeMap;

use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols};

use crate::wire::{self, Message, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR};

/// Longest a dump (links, routes, addresses) may take.
pub(super) const DUMP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// RTM_GETLINK, and the netlink message types and flags a dump uses (linux/netlink.h).
pub(super) const RTM_GETLINK: u16 = 18;
/// Sequence number of the one request a dump socket sends.
pub(super) const DUMP_SEQ: u32 = 1;

/// A dump request of `kind`: the netlink header, then `body` (the family's header and
/// attributes).
pub(super) fn dump_request(kind: u16, body: &[u8]) -> Vec<u8> {
    wire::request(kind, NLM_F_REQUEST | NLM_F_DUMP, DUMP_SEQ, body)
}

/// A `struct rtmsg` asking for the routes of `family`, the rest zero.
pub(super) fn rtmsg(family: u8) -> [u8; 12] {
    let mut header = [0; 12];
    header[0] = family;
    header
}

/// `RTM_GETLINK` dump request: an all-zero `ifinfomsg` (every family), asking the kernel to
/// leave counters out.
pub(super) fn link_dump_request() -> Vec<u8> {
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
pub(super) const IFLA_EXT_MASK: u16 = 29;
pub(super) const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;
pub(super) const EXT_MASK_ATTR_LEN: usize = 8;
/// Dump requests for IPv4 routes and addresses (linux/rtnetlink.h), and what they answer.
pub(super) const RTM_GETROUTE: u16 = 26;
pub(super) const RTM_GETADDR: u16 = 22;
pub(super) const RTM_NEWADDR: u16 = 20;
pub(super) const AF_INET: u8 = 2;

/// A link of a link dump into `names`.
pub(super) fn add_link_name(names: &mut BTreeMap<u32, String>, kind: u16, payload: &[u8]) {
    if kind == RTM_NEWLINK
        && let Some((index, name)) = link_update(payload)
    {
        names.insert(index, name);
    }
}

/// [`dump_raw`] within [`DUMP_TIMEOUT`], its failure named as a listing of `what`.
pub(super) async fn dump_bounded(
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
pub(super) async fn dump_raw(
    request: Vec<u8>,
    mut each: impl FnMut(u16, &[u8]),
) -> std::io::Result<()> {
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
pub(super) fn dump_datagram(
    datagram: &[u8],
    each: &mut impl FnMut(u16, &[u8]),
) -> std::io::Result<bool> {
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
pub(super) fn link_dump_datagram(
    datagram: &[u8],
    names: &mut BTreeMap<u32, String>,
) -> std::io::Result<bool> {
    dump_datagram(datagram, &mut |kind, payload| {
        add_link_name(names, kind, payload)
    })
}
