//! Hostname rules in the kernel: what the DNS filter learned from answers, per container.
//!
//! - `map learned4 { type iface_index . ipv4_addr : verdict; flags timeout }` (and
//!   `learned6`): the container's host interface and an address an answer gave it ->
//!   `jump host_<mark>`, the chain of the hostname rule that allowed it. Each element expires
//!   with the answer's TTL (clamped); the DNS filter adds it before the answer is relayed.
//! - `chain host_<mark>`: the rule's protocol and ports, then `ct mark set … accept`: the
//!   connection carries the rule's mark in bits 16-27 of the ct mark (the other bits kept).
//! - in both egress chains, first: `ct state established,related ct mark & 0x0fff0000 ==
//!   <mark> accept` for each hostname rule, so a connection opened while its address was
//!   allowed outlives the element, and a removed rule's connections (no rule for their mark)
//!   are rejected; then, after the scope maps, `iif . ip daddr vmap @learned4`.

use std::net::IpAddr;

use super::exprs::{dport_between, iif_dot_address, l4proto_is, port_alternatives};
use super::spec::{Expr, RuleSpec, SetBounds, SetSpec};
use super::uapi::{
    CMP_EQ, CMP_NEQ, CONCAT_TYPE_BITS, CT_MARK, CT_STATE, CT_STATE_ESTABLISHED_RELATED, NF_ACCEPT,
    NFPROTO_IPV4, NFPROTO_IPV6, REG_1, SET_F_MAP, SET_F_TIMEOUT, TYPE_IFINDEX, TYPE_IP6ADDR,
    TYPE_IPADDR,
};
use crate::config::{EgressRule, Protocol};

/// (host interface, IPv4 address) -> `jump host_<mark>`.
pub const LEARNED4_MAP: &str = "learned4";
/// (host interface, IPv6 address) -> `jump host_<mark>`.
pub const LEARNED6_MAP: &str = "learned6";
/// Elements each learned map holds at most (the agent's own bound on all containers is
/// [`MAX_LEARNED_TOTAL`], below it).
pub const LEARNED_MAP_SIZE: u32 = 65_536;
/// Learned addresses the agent keeps at once, over all containers and both families.
pub const MAX_LEARNED_TOTAL: usize = 16_384;
/// The bits of the ct mark that carry a hostname rule's mark.
pub const HOST_MARK_MASK: u32 = 0x0fff_0000;
pub const HOST_MARK_SHIFT: u32 = 16;
const HOST_CHAIN_PREFIX: &str = "host_";
const IPV4_DADDR_OFFSET: u32 = 16;
const IPV6_DADDR_OFFSET: u32 = 24;

/// Userdata nft writes for `type iface_index . ipv4_addr : verdict` (and ipv6): key byte
/// order unset, data byte order unset, the key's concat "typeof" (expression 13), then type 6,
/// as captured from `nft --debug=mnl`.
const USERDATA_CONCAT_VERDICT_MAP: [u8; 28] = [
    0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x01, 0x04, 0x00, 0x00, 0x00, 0x00, 0x03, 0x08, 0x00, 0x04,
    0x0d, 0x00, 0x00, 0x00, 0x01, 0x00, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00,
];

/// The learned map of one family.
pub fn learned_map(ipv6: bool) -> &'static str {
    if ipv6 { LEARNED6_MAP } else { LEARNED4_MAP }
}

/// `map learned4 { type iface_index . ipv4_addr : verdict; size 65536; flags timeout; }`.
pub fn learned_map_spec(ipv6: bool) -> SetSpec {
    let (addr_type, addr_len) = if ipv6 {
        (TYPE_IP6ADDR, 16)
    } else {
        (TYPE_IPADDR, 4)
    };
    SetSpec {
        name: learned_map(ipv6),
        key_type: (TYPE_IFINDEX << CONCAT_TYPE_BITS) | addr_type,
        key_len: 4 + addr_len,
        flags: SET_F_MAP | SET_F_TIMEOUT,
        userdata: USERDATA_CONCAT_VERDICT_MAP.to_vec(),
        // The elements are the DNS filter's (each with its own timeout): never compared.
        bounds: Some(SetBounds {
            size: LEARNED_MAP_SIZE,
            timeout_ms: 0,
        }),
        verdict_map: true,
    }
}

/// The chain of the hostname rule with connection mark `mark`: `host_<mark, 3 hex digits>`.
pub fn host_chain(mark: u16) -> String {
    format!("{HOST_CHAIN_PREFIX}{mark:03x}")
}

/// The mark a host chain stands for.
pub fn mark_of_host_chain(chain: &str) -> Option<u16> {
    let hex = chain.strip_prefix(HOST_CHAIN_PREFIX)?;
    (hex.len() == 3)
        .then(|| u16::from_str_radix(hex, 16).ok())
        .flatten()
}

/// The `ct mark` bits of hostname rule `mark`.
pub fn host_mark_bits(mark: u16) -> u32 {
    (u32::from(mark) << HOST_MARK_SHIFT) & HOST_MARK_MASK
}

/// A host chain's rules: `[meta l4proto p] [th dport a-b] ct mark set ct mark & ~MASK |
/// <mark> accept`, one per port range; `icmp` is ICMP for IPv4 and ICMPv6 for IPv6 (learned
/// addresses of both families jump here).
pub fn host_rule_lines(rule: &EgressRule, mark: u16) -> Vec<Vec<Expr>> {
    // ICMP (1) is only ever IPv4's and ICMPv6 (58) IPv6's: no family match needed.
    let heads: Vec<Vec<Expr>> = match rule.protocol {
        Protocol::All => vec![Vec::new()],
        Protocol::Icmp => vec![
            l4proto_is(Protocol::Icmp.number(false)).to_vec(),
            l4proto_is(Protocol::Icmp.number(true)).to_vec(),
        ],
        tcp_or_udp => vec![l4proto_is(tcp_or_udp.number(false)).to_vec()],
    };
    let ranges = port_alternatives(&rule.ports);
    let mut lines = Vec::new();
    for head in heads {
        for range in &ranges {
            let mut exprs = head.clone();
            if let Some((first, last)) = range {
                exprs.extend(dport_between(*first, *last));
            }
            exprs.extend(set_mark(mark));
            exprs.push(Expr::Verdict {
                code: NF_ACCEPT as i32,
                chain: None,
            });
            lines.push(exprs);
        }
    }
    lines
}

/// `ct <key> & <mask> ^ <xor>` into register 1. nft sends no operation attribute for a
/// state match (as for a prefix), and one for a mark.
fn ct_bitwise(key: u32, mask: u32, xor: u32, explicit_op: bool) -> [Expr; 2] {
    [
        Expr::Ct { key, dreg: REG_1 },
        Expr::Bitwise {
            sreg: REG_1,
            dreg: REG_1,
            mask: mask.to_ne_bytes().to_vec(),
            xor: xor.to_ne_bytes().to_vec(),
            explicit_op,
        },
    ]
}

/// `cmp <op> <value>` on register 1.
fn cmp_u32(op: u32, value: u32) -> Expr {
    Expr::Cmp {
        sreg: REG_1,
        op,
        data: value.to_ne_bytes().to_vec(),
    }
}

/// `ct mark set ct mark & ~MASK | <mark>`: the rule's mark, other users' bits kept.
fn set_mark(mark: u16) -> Vec<Expr> {
    let mut exprs = ct_bitwise(CT_MARK, !HOST_MARK_MASK, host_mark_bits(mark), true).to_vec();
    exprs.push(Expr::CtSet {
        key: CT_MARK,
        sreg: REG_1,
    });
    exprs
}

/// `ct state established,related ct mark & MASK == <mark> accept`.
pub fn established_accept(mark: u16) -> Vec<Expr> {
    let mut exprs = ct_bitwise(CT_STATE, CT_STATE_ESTABLISHED_RELATED, 0, false).to_vec();
    exprs.push(cmp_u32(CMP_NEQ, 0));
    exprs.extend(ct_bitwise(CT_MARK, HOST_MARK_MASK, 0, true));
    exprs.push(cmp_u32(CMP_EQ, host_mark_bits(mark)));
    exprs.push(Expr::Verdict {
        code: NF_ACCEPT as i32,
        chain: None,
    });
    exprs
}

/// `iif . ip daddr vmap @learned4` (or `ip6`, `@learned6`).
pub fn learned_lookup(ipv6: bool) -> Vec<Expr> {
    let (family, offset, len) = if ipv6 {
        (NFPROTO_IPV6, IPV6_DADDR_OFFSET, 16)
    } else {
        (NFPROTO_IPV4, IPV4_DADDR_OFFSET, 4)
    };
    let mut exprs = iif_dot_address(family, offset, len);
    exprs.push(Expr::VerdictMap {
        sreg: REG_1,
        set: learned_map(ipv6).into(),
    });
    exprs
}

/// One learned address of one container, as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnedElement {
    pub ifindex: u32,
    pub address: IpAddr,
    /// The hostname rule's connection mark (its chain is [`host_chain`]).
    pub mark: u16,
    /// Milliseconds it stays (on addition), or has left (read back).
    pub timeout_ms: u64,
}

impl LearnedElement {
    /// The map it belongs in.
    pub fn map(&self) -> &'static str {
        learned_map(self.address.is_ipv6())
    }

    /// The key in the kernel's register layout: the interface index (host order), then the
    /// address (network order).
    pub fn key(&self) -> Vec<u8> {
        let mut key = self.ifindex.to_ne_bytes().to_vec();
        match self.address {
            IpAddr::V4(a) => key.extend(a.octets()),
            IpAddr::V6(a) => key.extend(a.octets()),
        }
        key
    }

    /// The inverse of [`LearnedElement::key`].
    pub fn from_key(key: &[u8], mark: u16, timeout_ms: u64) -> Option<LearnedElement> {
        let ifindex = u32::from_ne_bytes(key.get(..4)?.try_into().ok()?);
        let address = match key.len() {
            8 => IpAddr::from(<[u8; 4]>::try_from(&key[4..]).ok()?),
            20 => IpAddr::from(<[u8; 16]>::try_from(&key[4..]).ok()?),
            _ => return None,
        };
        Some(LearnedElement {
            ifindex,
            address,
            mark,
            timeout_ms,
        })
    }
}

/// The rules the egress chain of one family gets for hostname rules, ahead of everything
/// else the rules add (the established accepts) and after it (the learned lookup).
pub fn hostname_hooks(marks: &[(usize, u16)], ipv6: bool) -> (Vec<Vec<Expr>>, Vec<Vec<Expr>>) {
    if marks.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let established = marks.iter().map(|(_, m)| established_accept(*m)).collect();
    (established, vec![learned_lookup(ipv6)])
}

/// The host chains' rules, chain by chain in mark order of writing.
pub fn host_chain_rules(rules: &[EgressRule], marks: &[(usize, u16)]) -> Vec<RuleSpec> {
    marks
        .iter()
        .flat_map(|(index, mark)| {
            host_rule_lines(&rules[*index], *mark)
                .into_iter()
                .map(move |exprs| RuleSpec {
                    chain: host_chain(*mark),
                    exprs,
                })
        })
        .collect()
}
