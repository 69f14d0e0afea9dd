//! NFLOG: the agent's listener on the group its report rule logs to.
//!
//! One netlink socket of its own, bound to [`NFLOG_GROUP`](crate::dataplane::model::NFLOG_GROUP)
//! with `NFULNL_CFG_CMD_BIND` (built with `netlink-packet-netfilter`'s nflog types): packet copy
//! mode with a short range (IP and transport headers are all the agent reads), sequence numbers
//! on (gaps are messages lost on the way), and a short flush timeout so reports arrive within
//! 100 ms instead of the kernel's default second. The messages themselves are hostile input
//! (anyone with CAP_NET_ADMIN in the namespace can log to the group): [`parse`] walks them by
//! hand, bounds-checking every length, and never panics.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use netlink_packet_netfilter::NetfilterProtoFamily;
use netlink_packet_netfilter::nflog::{
    ConfigCmd, ConfigFlags, ConfigMode, ConfigNla, Timeout, config_request,
};
use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols};
use nix::errno::Errno;
use nix::sys::socket::{setsockopt, sockopt};

use super::Packet;
use crate::dataplane::AgentTable;
use crate::dataplane::netlink::socket::{ANSWER_TIMEOUT, NetlinkError};
use crate::wire::{self, Message, NLMSG_ERROR};

/// Bytes of each packet copied to the agent: a full IPv4 header with options (60) and a full
/// TCP header (60) fit; the agent reads 24 at most.
pub const COPY_RANGE: u32 = 128;
/// The kernel sends what it has queued after this long (`NFULA_CFG_TIMEOUT`, in 1/100 s).
pub const FLUSH_TIMEOUT: Duration = Duration::from_millis(100);
/// ... or once this many messages are queued (`NFULA_CFG_QTHRESH`).
pub const QUEUE_THRESHOLD: u32 = 32;
/// Receive buffer: about 4,000 messages, twenty seconds of the rate limit's worth.
const RCVBUF: usize = 1 << 20;

/// `NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET`.
const NFULNL_PACKET: u16 = 4 << 8;
/// `struct nfgenmsg`.
const NFGENMSG_LEN: usize = 4;
// `enum nfulnl_attr_type`.
const NFULA_IFINDEX_INDEV: u16 = 4;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NFULA_SEQ: u16 = 12;

/// The agent's NFLOG socket.
pub struct NflogSocket {
    socket: TokioSocket,
}

impl NflogSocket {
    /// Opens a socket and binds `group`; must be called inside a tokio runtime. Fails with
    /// EBUSY when another socket already listens on the group.
    pub async fn bind(group: u16) -> Result<NflogSocket, NetlinkError> {
        let mut socket =
            TokioSocket::new(protocols::NETLINK_NETFILTER).map_err(NetlinkError::Open)?;
        socket
            .socket_mut()
            .bind(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Open)?;
        if setsockopt(socket.socket_ref(), sockopt::RcvBufForce, &RCVBUF).is_err() {
            let _ = socket.socket_mut().set_rx_buf_sz(RCVBUF);
        }
        let seq = std::process::id();
        let bytes = bind_request(group, seq);
        tokio::time::timeout(ANSWER_TIMEOUT, socket.send(&bytes))
            .await
            .map_err(|_| NetlinkError::Timeout {
                what: "the NFLOG bind".into(),
            })?
            .map_err(NetlinkError::Send)?;
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        loop {
            let (datagram, _) = tokio::time::timeout_at(deadline, socket.recv_from_full())
                .await
                .map_err(|_| NetlinkError::Timeout {
                    what: "the NFLOG bind".into(),
                })?
                .map_err(NetlinkError::Recv)?;
            for Message {
                kind,
                seq: message_seq,
                payload,
                ..
            } in wire::messages(&datagram)
            {
                if kind != NLMSG_ERROR || message_seq != seq {
                    continue;
                }
                let code = wire::error_code(payload);
                if code == 0 {
                    return Ok(NflogSocket { socket });
                }
                return Err(NetlinkError::Refused {
                    operation: format!("bind NFLOG group {group}"),
                    index: 0,
                    errno: Errno::from_raw(-code),
                });
            }
        }
    }

    /// The next datagram (one or more messages). ENOBUFS means the kernel dropped messages
    /// because the agent fell behind; the sequence numbers tell how many.
    pub async fn recv(&mut self) -> io::Result<Vec<u8>> {
        self.socket.recv_from_full().await.map(|(bytes, _)| bytes)
    }
}

/// The `NFULNL_MSG_CONFIG` message that binds `group`: copy `COPY_RANGE` bytes of each packet,
/// number the messages, flush after [`FLUSH_TIMEOUT`] or [`QUEUE_THRESHOLD`] messages.
pub fn bind_request(group: u16, seq: u32) -> Vec<u8> {
    let hundredths = u32::try_from(FLUSH_TIMEOUT.as_millis() / 10).unwrap_or(u32::MAX);
    let mut message = config_request(
        NetfilterProtoFamily::Unspec,
        group,
        vec![
            ConfigCmd::Bind.into(),
            ConfigMode::new_packet(COPY_RANGE).into(),
            ConfigFlags::SEQ.into(),
            Timeout::new(hundredths).into(),
            ConfigNla::QThresh(QUEUE_THRESHOLD),
        ],
    );
    message.header.sequence_number = seq;
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

/// Every NFLOG packet message in a datagram: `Some` for one the agent can attribute, `None` for
/// one it cannot (not IPv4, truncated, malformed). Other message types are skipped.
pub fn parse(datagram: &[u8]) -> impl Iterator<Item = Option<Packet>> + '_ {
    wire::messages(datagram)
        .filter(|message| message.kind == NFULNL_PACKET)
        .map(|message| packet(message.payload))
}

/// One `NFULNL_MSG_PACKET` payload (after the netlink header).
fn packet(payload: &[u8]) -> Option<Packet> {
    let (mut ifindex, mut ip, mut table, mut seq) = (None, None, None, None);
    for attribute in wire::attributes(payload.get(NFGENMSG_LEN..)?) {
        let (kind, value) = attribute.ok()?;
        match kind {
            NFULA_IFINDEX_INDEV => ifindex = be_u32(value),
            NFULA_PAYLOAD => ip = Some(value),
            NFULA_PREFIX => {
                let text = value.split(|b| *b == 0).next().unwrap_or_default();
                table = std::str::from_utf8(text)
                    .ok()
                    .and_then(AgentTable::from_name);
            }
            NFULA_SEQ => seq = be_u32(value),
            _ => {}
        }
    }
    let header = ip_header(ip?)?;
    Some(Packet {
        table,
        ifindex,
        src: header.src,
        dst: header.dst,
        protocol: header.protocol,
        dst_port: header.dst_port,
        seq,
    })
}

fn be_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
}

/// What the agent reads of an IPv4 or IPv6 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpHeader {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub dst_port: Option<u16>,
}

/// Parses the start of an IPv4 or an IPv6 packet.
pub fn ip_header(bytes: &[u8]) -> Option<IpHeader> {
    match bytes.first()? >> 4 {
        4 => ipv4(bytes),
        6 => ipv6(bytes),
        _ => None,
    }
}

/// Parses the fixed IPv6 header. The destination port is read when the next header is TCP,
/// UDP, SCTP or UDP-Lite directly (extension headers are not walked: such packets are
/// reported without a port).
pub fn ipv6(bytes: &[u8]) -> Option<IpHeader> {
    if bytes.first()? >> 4 != 6 || bytes.len() < 40 {
        return None;
    }
    let address = |at: usize| -> Option<Ipv6Addr> {
        let octets: [u8; 16] = bytes.get(at..at + 16)?.try_into().ok()?;
        Some(Ipv6Addr::from(octets))
    };
    let protocol = bytes[6];
    let dst_port = match protocol {
        6 | 17 | 132 | 136 => bytes.get(42..44).map(|p| u16::from_be_bytes([p[0], p[1]])),
        _ => None,
    };
    Some(IpHeader {
        src: IpAddr::V6(address(8)?),
        dst: IpAddr::V6(address(24)?),
        protocol,
        dst_port,
    })
}

/// Parses the start of an IPv4 packet; None unless it is one. The destination port is read
/// for TCP, UDP, SCTP and UDP-Lite (whose ports sit in the same place) in a first fragment.
pub fn ipv4(bytes: &[u8]) -> Option<IpHeader> {
    let first = *bytes.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(first & 0x0f) * 4;
    if header_len < 20 || bytes.len() < 20 {
        return None;
    }
    let octets = |at: usize| -> Option<[u8; 4]> { bytes.get(at..at + 4)?.try_into().ok() };
    let protocol = bytes[9];
    let fragment_offset = u16::from_be_bytes([bytes[6], bytes[7]]) & 0x1fff;
    let dst_port = match protocol {
        6 | 17 | 132 | 136 if fragment_offset == 0 => bytes
            .get(header_len + 2..header_len + 4)
            .map(|p| u16::from_be_bytes([p[0], p[1]])),
        _ => None,
    };
    Some(IpHeader {
        src: IpAddr::V4(Ipv4Addr::from(octets(12)?)),
        dst: IpAddr::V4(Ipv4Addr::from(octets(16)?)),
        protocol,
        dst_port,
    })
}

#[cfg(test)]
mod tests;
