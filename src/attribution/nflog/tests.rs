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
