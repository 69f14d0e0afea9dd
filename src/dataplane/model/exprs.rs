//! The small expression builders rules are made of, each as nft compiles it: protocol
//! dependencies, prefix and range matches, set lookups, verdicts.

use ipnet::Ipv4Net;

use super::spec::Expr;
use super::uapi::{
    CMP_EQ, CMP_GTE, CMP_LTE, META_IIF, META_L4PROTO, META_NFPROTO, NFPROTO_IPV4, NFT_RETURN,
    PAYLOAD_NETWORK, PAYLOAD_TRANSPORT, REG_1, REG32_01,
};

pub(super) const IPV4_SADDR_OFFSET: u32 = 12;
pub(super) const IPV4_DADDR_OFFSET: u32 = 16;
pub(super) const IPV6_SADDR_OFFSET: u32 = 8;
pub(super) const IPV6_DADDR_OFFSET: u32 = 24;
/// The destination port in a TCP or UDP header.
const DPORT_OFFSET: u32 = 2;

/// The dependency nft adds in an `inet` table before matching an IPv4 header field.
pub(super) fn ipv4_only() -> Vec<Expr> {
    nfproto(NFPROTO_IPV4)
}

/// `iif . ip saddr @<set> return` (or `ip6`): an exempt container's own packets leave the
/// chain. The interface index and the source address are concatenated in registers 1 and 9.
pub(super) fn exempt_return(family: u8, saddr_offset: u32, len: u32, set: &str) -> Vec<Expr> {
    let mut exprs = iif_dot_address(family, saddr_offset, len);
    exprs.extend([lookup(set), return_()]);
    exprs
}

/// `meta l4proto <number>`.
pub(super) fn l4proto_is(number: u8) -> [Expr; 2] {
    [
        Expr::Meta {
            key: META_L4PROTO,
            dreg: REG_1,
        },
        Expr::Cmp {
            sreg: REG_1,
            op: CMP_EQ,
            data: vec![number],
        },
    ]
}

/// `meta nfproto <family>`.
pub(super) fn nfproto(family: u8) -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: META_NFPROTO,
            dreg: REG_1,
        },
        Expr::Cmp {
            sreg: REG_1,
            op: CMP_EQ,
            data: vec![family],
        },
    ]
}

pub(super) fn lookup(set: &str) -> Expr {
    Expr::Lookup {
        sreg: REG_1,
        set: set.into(),
        flags: 0,
    }
}

pub(super) fn return_() -> Expr {
    Expr::Verdict {
        code: NFT_RETURN,
        chain: None,
    }
}

/// `ip saddr <net>` as nft compiles it: a byte-aligned prefix loads just its bytes; any other
/// prefix loads the whole address and masks it.
pub(super) fn match_prefix(offset: u32, net: Ipv4Net) -> Vec<Expr> {
    match_prefix_bytes(offset, &net.network().octets(), net.prefix_len(), 4)
}

/// [`match_prefix`] for an address of `width` bytes (4 or 16) and any prefix length above 0.
pub(super) fn match_prefix_bytes(offset: u32, address: &[u8], len: u8, width: usize) -> Vec<Expr> {
    if len > 0 && len.is_multiple_of(8) {
        let bytes = usize::from(len / 8);
        return vec![
            Expr::Payload {
                base: PAYLOAD_NETWORK,
                offset,
                len: u32::from(len / 8),
                dreg: REG_1,
            },
            Expr::Cmp {
                sreg: REG_1,
                op: CMP_EQ,
                data: address[..bytes].to_vec(),
            },
        ];
    }
    let mut mask = vec![0u8; width];
    for (i, byte) in mask.iter_mut().enumerate() {
        let bits = usize::from(len).saturating_sub(i * 8).min(8);
        *byte = if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
    }
    vec![
        Expr::Payload {
            base: PAYLOAD_NETWORK,
            offset,
            len: width as u32,
            dreg: REG_1,
        },
        Expr::Bitwise {
            sreg: REG_1,
            dreg: REG_1,
            mask,
            xor: vec![0; width],
            explicit_op: false,
        },
        Expr::Cmp {
            sreg: REG_1,
            op: CMP_EQ,
            data: address.to_vec(),
        },
    ]
}

/// `accept` (a verdict code with no chain).
pub(super) fn return_or_accept(code: i32) -> Expr {
    Expr::Verdict { code, chain: None }
}

/// `first-last` on register 1: `cmp gte`, `cmp lte` (an equal pair is one `cmp eq`).
pub(super) fn between(first: Vec<u8>, last: Vec<u8>) -> Vec<Expr> {
    if first == last {
        return vec![Expr::Cmp {
            sreg: REG_1,
            op: CMP_EQ,
            data: first,
        }];
    }
    vec![
        Expr::Cmp {
            sreg: REG_1,
            op: CMP_GTE,
            data: first,
        },
        Expr::Cmp {
            sreg: REG_1,
            op: CMP_LTE,
            data: last,
        },
    ]
}

/// The port alternatives of a rule: one per range in `ports`, or `None` for every port.
pub(super) fn port_alternatives(ports: &[(u16, u16)]) -> Vec<Option<(u16, u16)>> {
    if ports.is_empty() {
        vec![None]
    } else {
        ports.iter().copied().map(Some).collect()
    }
}

/// `th dport first-last` (or `th dport first`), as nft compiles it after the protocol match.
pub(super) fn dport_between(first: u16, last: u16) -> Vec<Expr> {
    let mut exprs = vec![Expr::Payload {
        base: PAYLOAD_TRANSPORT,
        offset: DPORT_OFFSET,
        len: 2,
        dreg: REG_1,
    }];
    exprs.extend(between(
        first.to_be_bytes().to_vec(),
        last.to_be_bytes().to_vec(),
    ));
    exprs
}

/// `iif . ip saddr` (or any address field of `family`): the interface index and the address
/// concatenated in registers 1 and 9, the key of the per-container sets and maps.
pub(super) fn iif_dot_address(family: u8, offset: u32, len: u32) -> Vec<Expr> {
    let mut exprs = nfproto(family);
    exprs.extend([
        Expr::Meta {
            key: META_IIF,
            dreg: REG_1,
        },
        Expr::Payload {
            base: PAYLOAD_NETWORK,
            offset,
            len,
            dreg: REG32_01,
        },
    ]);
    exprs
}
