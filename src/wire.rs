//! Netlink framing over byte slices: the one place that walks netlink messages and their
//! attributes by hand, for the agent's raw readers (rtnetlink dumps and events, nf_tables
//! replies and events, NFLOG).
//!
//! Everything here is pure and bounds-checked: the bytes come from the kernel, or (NFLOG, the
//! event groups) from anyone allowed to send to them, so a malformed length ends the walk and
//! nothing panics. The constants are netlink-packet-core's where it has them.

pub use netlink_packet_core::{
    NLA_ALIGNTO, NLA_HEADER_SIZE, NLA_TYPE_MASK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
};

/// `struct nlmsghdr`: length, type, flags, sequence number, port id.
pub const NLMSG_HDRLEN: usize = 16;

/// `len` rounded up to netlink's 4-byte alignment (messages and attributes alike).
pub fn align4(len: usize) -> usize {
    (len + NLA_ALIGNTO - 1) & !(NLA_ALIGNTO - 1)
}

/// One netlink message in a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// `nlmsg_type`.
    pub kind: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// `nlmsg_pid`: the sender's port id (0 for the kernel).
    pub port: u32,
    /// The bytes after the header.
    pub payload: &'a [u8],
    /// The whole message, header included.
    pub whole: &'a [u8],
}

/// Each netlink message in a datagram, in order; stops at the first malformed one (a length
/// shorter than the header or beyond the datagram).
pub fn messages(buf: &[u8]) -> impl Iterator<Item = Message<'_>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let header = rest.get(..NLMSG_HDRLEN)?;
        let len = ne_u32(&header[0..4]) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            rest = &[];
            return None;
        }
        let message = Message {
            kind: ne_u16(&header[4..6]),
            flags: ne_u16(&header[6..8]),
            seq: ne_u32(&header[8..12]),
            port: ne_u32(&header[12..16]),
            payload: &rest[NLMSG_HDRLEN..len],
            whole: &rest[..len],
        };
        rest = rest.get(align4(len)..).unwrap_or_default();
        Some(message)
    })
}

/// An attribute whose length is shorter than its header or runs past its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// (type, value) of each attribute (`struct nlattr`) in `buf`, the type without its nested
/// and byte-order flags; a malformed attribute is yielded as an error and ends the walk.
pub fn attributes(buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), Malformed>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let Some(header) = rest.get(..NLA_HEADER_SIZE) else {
            rest = &[];
            return Some(Err(Malformed));
        };
        let len = usize::from(ne_u16(&header[0..2]));
        let kind = ne_u16(&header[2..4]) & NLA_TYPE_MASK;
        if len < NLA_HEADER_SIZE || len > rest.len() {
            rest = &[];
            return Some(Err(Malformed));
        }
        let value = &rest[NLA_HEADER_SIZE..len];
        rest = rest.get(align4(len)..).unwrap_or_default();
        Some(Ok((kind, value)))
    })
}

/// The (negative) errno of an `NLMSG_ERROR` payload; 0 is an acknowledgement. A payload too
/// short to hold one reads as `-EPROTO`.
pub fn error_code(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes)
        .unwrap_or(-nix::libc::EPROTO)
}

/// A request message: the netlink header (`kind`, `flags`, `seq`, port 0), then `body` (the
/// family's header and attributes).
pub fn request(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + body.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(body);
    out
}

fn ne_u16(bytes: &[u8]) -> u16 {
    u16::from_ne_bytes([bytes[0], bytes[1]])
}

fn ne_u32(bytes: &[u8]) -> u32 {
    u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&u16::try_from(4 + value.len()).expect("small").to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(align4(out.len()), 0);
        out
    }

    #[test]
    fn messages_are_framed_with_their_header_fields() {
        let mut datagram = request(20, NLM_F_REQUEST, 7, &[1, 2, 3]);
        datagram.resize(align4(datagram.len()), 0);
        datagram[12..16].copy_from_slice(&42u32.to_ne_bytes());
        datagram.extend(request(NLMSG_DONE, 0, 8, &[]));
        let all: Vec<_> = messages(&datagram).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(
            (all[0].kind, all[0].flags, all[0].seq, all[0].port),
            (20, NLM_F_REQUEST, 7, 42)
        );
        assert_eq!(all[0].payload, &[1, 2, 3]);
        assert_eq!(all[0].whole.len(), NLMSG_HDRLEN + 3);
        assert_eq!(
            (all[1].kind, all[1].seq, all[1].payload),
            (NLMSG_DONE, 8, &[][..])
        );
    }

    #[test]
    fn a_malformed_message_ends_the_walk() {
        assert_eq!(messages(&[1, 2, 3]).count(), 0);
        let mut bad = request(20, 0, 1, &[0; 4]);
        bad[0] = 0xff; // length beyond the buffer
        assert_eq!(messages(&bad).count(), 0);
        let mut short = request(20, 0, 1, &[]);
        short[0..4].copy_from_slice(&8u32.to_ne_bytes()); // shorter than the header
        let mut two = request(20, 0, 1, &[]);
        two.extend(short);
        assert_eq!(messages(&two).count(), 1, "the good one before it is kept");
    }

    #[test]
    fn attributes_mask_flags_and_stop_at_a_bad_length() {
        let mut buf = attribute(3, b"eth0\0");
        buf.extend(attribute(0x8000 | 5, &[9, 9, 9, 9]));
        let found: Vec<_> = attributes(&buf).collect();
        assert_eq!(
            found,
            vec![Ok((3, &b"eth0\0"[..])), Ok((5, &[9, 9, 9, 9][..]))]
        );
        let mut bad = attribute(1, &[1]);
        bad.extend([200, 0, 2, 0]);
        bad.extend(attribute(2, &[2]));
        let found: Vec<_> = attributes(&bad).collect();
        assert_eq!(found, vec![Ok((1, &[1][..])), Err(Malformed)]);
        assert_eq!(
            attributes(&[1, 0]).collect::<Vec<_>>(),
            vec![Err(Malformed)]
        );
    }

    #[test]
    fn a_cut_datagram_yields_exactly_its_complete_messages() {
        let first = request(20, 0, 1, &attribute(3, b"s-010255000002\0"));
        let second = request(21, 0, 2, &attribute(4, &[1, 2, 3, 4]));
        let mut datagram = first.clone();
        datagram.resize(align4(datagram.len()), 0);
        let second_at = datagram.len();
        datagram.extend(&second);
        let ends = [first.len(), second_at + second.len()];
        for cut in 0..=datagram.len() {
            let found: Vec<_> = messages(&datagram[..cut]).collect();
            let complete = ends.iter().filter(|end| **end <= cut).count();
            assert_eq!(found.len(), complete, "cut at {cut}");
            for message in found {
                assert_eq!(attributes(message.payload).filter(Result::is_ok).count(), 1);
            }
        }
    }

    #[test]
    fn error_codes() {
        assert_eq!(error_code(&0i32.to_ne_bytes()), 0);
        assert_eq!(error_code(&(-1i32).to_ne_bytes()), -1);
        assert_eq!(error_code(&[1]), -nix::libc::EPROTO);
    }
}
