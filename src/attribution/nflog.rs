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
mod tests {
    use super::*;
    use egress_guard_testkit::rng::XorShift64;

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let len = u16::try_from(4 + value.len()).expect("small");
        let mut out = len.to_ne_bytes().to_vec();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    fn message(kind: u16, attrs: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = attrs.concat();
        let len = u32::try_from(16 + 4 + body.len()).expect("small");
        let mut out = len.to_ne_bytes().to_vec();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(&[2, 0, 0x26, 0x7b]);
        out.extend(body);
        out
    }

    /// An IPv4 TCP SYN 10.255.7.2 -> 203.0.113.10:443 (header and ports only).
    fn tcp_syn() -> Vec<u8> {
        let mut ip = vec![
            0x45, 0, 0, 60, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 255, 7, 2, 203, 0, 113, 10,
        ];
        ip.extend_from_slice(&[0xc3, 0x50, 0x01, 0xbb, 0, 0, 0, 1]);
        ip
    }

    fn logged(prefix: &[u8], payload: &[u8], seq: u32) -> Vec<u8> {
        message(
            NFULNL_PACKET,
            &[
                nla(1, &[0x08, 0x00, 2, 0]),
                nla(NFULA_PREFIX, prefix),
                nla(NFULA_IFINDEX_INDEV, &7u32.to_be_bytes()),
                nla(NFULA_PAYLOAD, payload),
                nla(NFULA_SEQ, &seq.to_be_bytes()),
            ],
        )
    }

    #[test]
    fn a_logged_packet_is_parsed() {
        let mut datagram = logged(b"egress_guard_owned\0", &tcp_syn(), 41);
        datagram.extend(logged(b"egress_guard\0", &tcp_syn(), 42));
        let packets: Vec<Option<Packet>> = parse(&datagram).collect();
        assert_eq!(packets.len(), 2);
        let first = packets[0].clone().expect("parses");
        assert_eq!(first.table, Some(AgentTable::Owned));
        assert_eq!(first.ifindex, Some(7));
        assert_eq!(first.src, IpAddr::V4(Ipv4Addr::new(10, 255, 7, 2)));
        assert_eq!(first.dst, IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)));
        assert_eq!((first.protocol, first.dst_port), (6, Some(443)));
        assert_eq!(first.seq, Some(41));
        assert_eq!(
            packets[1].as_ref().and_then(|p| p.table),
            Some(AgentTable::Persistent)
        );
    }

    #[test]
    fn ipv6_packets_are_parsed() {
        let mut packet = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
        packet.extend_from_slice(
            &"2001:db8:ff:7::2"
                .parse::<Ipv6Addr>()
                .expect("literal")
                .octets(),
        );
        packet.extend_from_slice(
            &"2001:db8:0:1::10"
                .parse::<Ipv6Addr>()
                .expect("literal")
                .octets(),
        );
        packet.extend_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
        let header = ip_header(&packet).expect("IPv6");
        assert_eq!(
            header.src,
            "2001:db8:ff:7::2".parse::<IpAddr>().expect("literal")
        );
        assert_eq!(
            header.dst,
            "2001:db8:0:1::10".parse::<IpAddr>().expect("literal")
        );
        assert_eq!((header.protocol, header.dst_port), (6, Some(443)));
        // Truncated: no header.
        assert_eq!(ip_header(&packet[..39]), None);
        // Another version: nothing.
        assert_eq!(ip_header(&[0x50; 40]), None);
    }

    #[test]
    fn ports_only_where_they_exist() {
        let mut icmp = tcp_syn();
        icmp[9] = 1;
        assert_eq!(ipv4(&icmp).map(|h| h.dst_port), Some(None));
        let mut fragment = tcp_syn();
        fragment[7] = 5;
        assert_eq!(ipv4(&fragment).map(|h| h.dst_port), Some(None));
        // Truncated after the IP header: no port, still attributed.
        assert_eq!(ipv4(&tcp_syn()[..20]).map(|h| h.dst_port), Some(None));
        // IP options move the ports.
        let mut options = tcp_syn();
        options[0] = 0x46;
        options.splice(20..20, [1, 1, 1, 1]);
        assert_eq!(ipv4(&options).and_then(|h| h.dst_port), Some(443));
        // Not IPv4, or too short.
        assert_eq!(ipv4(&[0x60; 40]), None);
        assert_eq!(ipv4(&tcp_syn()[..19]), None);
        assert_eq!(ipv4(&[0x44; 40]), None);
        assert_eq!(ipv4(&[]), None);
    }

    /// Hostile input: every prefix and every byte flipped of a real message, and random
    /// bytes, parse to something or nothing, never a panic.
    #[test]
    fn malformed_messages_never_panic() {
        let datagram = logged(b"egress_guard\0", &tcp_syn(), 1);
        for cut in 0..datagram.len() {
            let _ = parse(&datagram[..cut]).count();
        }
        for at in 0..datagram.len() {
            for value in [0u8, 1, 3, 0x7f, 0xff] {
                let mut bad = datagram.clone();
                bad[at] = value;
                let _ = parse(&bad).count();
            }
        }
        let mut rng = XorShift64::new(0x2545_f491_4f6c_dd1d);
        for _ in 0..2000 {
            let len = rng.index(300);
            let bytes: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            let mut bytes = bytes;
            if bytes.len() >= 6 {
                bytes[4..6].copy_from_slice(&NFULNL_PACKET.to_ne_bytes());
            }
            let _ = parse(&bytes).count();
        }
        // An attribute running past its message makes the message unparsable.
        let mut truncated = datagram.clone();
        let at = 20 + 8; // the prefix attribute's length field
        truncated[at..at + 2].copy_from_slice(&500u16.to_ne_bytes());
        assert_eq!(parse(&truncated).collect::<Vec<_>>(), vec![None]);
        // Another message type is skipped.
        assert_eq!(parse(&message(0x0a00, &[])).count(), 0);
    }

    #[test]
    fn the_bind_request_asks_for_a_short_copy_and_sequence_numbers() {
        let bytes = bind_request(9851, 77);
        let kind = u16::from_ne_bytes([bytes[4], bytes[5]]);
        assert_eq!(kind, 4 << 8 | 1, "NFULNL_MSG_CONFIG");
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().expect("4")), 77);
        // nfgenmsg: family, version, group (big endian).
        assert_eq!(&bytes[16..20], &[0, 0, 0x26, 0x7b]);
        let hex: String = bytes[20..].iter().map(|b| format!("{b:02x}")).collect();
        // CMD (1) bind; MODE (2) copy range 128, NFULNL_COPY_PACKET; FLAGS (6) NFULNL_CFG_F_SEQ;
        // TIMEOUT (4) 10 hundredths; QTHRESH (5) 32: all big endian, as the kernel reads them.
        assert_eq!(
            hex,
            concat!(
                "0500010001000000",
                "0a0002000000008002000000",
                "0600060000010000",
                "080004000000000a",
                "0800050000000020"
            )
        );
    }
}
