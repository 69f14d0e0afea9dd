//! The DNS redirect chain: restricted containers' queries to the agent's DNS filter.

use super::{
    DNS_CHAIN, DNS_PRIORITY, EXEMPT_SET,
    rules::{IPV4_SADDR_OFFSET, exempt_return, ipv4_only, match_prefix},
    spec::{ChainSpec, Expr, Hook, RuleSpec},
    uapi::{
        CMP_EQ, DNS_PORT, HOOK_PREROUTING, IPPROTO_TCP, IPPROTO_UDP, META_L4PROTO,
        NAT_RANGE_PROTO_SPECIFIED, NF_ACCEPT, NFPROTO_IPV4, PAYLOAD_TRANSPORT, REG_1,
    },
};
use ipnet::Ipv4Net;

/// The DNS filter's chain, in creation order (after [`chains`]), present when `[dns]` is
/// enabled.
pub fn dns_chains() -> [ChainSpec; 1] {
    [ChainSpec {
        name: DNS_CHAIN.into(),
        hook: Some(Hook {
            kind: "nat".into(),
            hooknum: HOOK_PREROUTING,
            priority: DNS_PRIORITY,
            policy: NF_ACCEPT,
        }),
    }]
}

/// The DNS filter's rules (after [`rules`]): exempt (staging) containers keep their DNS as it
/// is; every other overlay source's UDP and TCP queries to port 53, whatever the address, go
/// to `port` on the address of the interface they came in on (the container's host veth):
///
/// ```text
/// iif . ip saddr @exempt return
/// ip saddr <overlay> udp dport 53 redirect to :<port>
/// ip saddr <overlay> tcp dport 53 redirect to :<port>
/// ```
///
/// `redirect` rather than `dnat to 127.0.0.1`: a forwarded packet to 127.0.0.0/8 is a martian
/// unless `route_localnet` is set on every container interface; the interface's own address
/// needs nothing. Redirected queries are local (INPUT hook), so the forward chain's reject
/// never sees them, and conntrack gives the reply the address the container asked.
pub fn dns_rules(overlay: Ipv4Net, port: u16) -> Vec<RuleSpec> {
    let exempt = exempt_return(NFPROTO_IPV4, IPV4_SADDR_OFFSET, 4, EXEMPT_SET);
    let redirect = |l4proto: u8| {
        let mut exprs = ipv4_only();
        exprs.extend(match_prefix(IPV4_SADDR_OFFSET, overlay));
        exprs.extend([
            Expr::Meta {
                key: META_L4PROTO,
                dreg: REG_1,
            },
            Expr::Cmp {
                sreg: REG_1,
                op: CMP_EQ,
                data: vec![l4proto],
            },
            Expr::Payload {
                base: PAYLOAD_TRANSPORT,
                offset: 2,
                len: 2,
                dreg: REG_1,
            },
            Expr::Cmp {
                sreg: REG_1,
                op: CMP_EQ,
                data: DNS_PORT.to_be_bytes().to_vec(),
            },
            Expr::Immediate {
                dreg: REG_1,
                data: port.to_be_bytes().to_vec(),
            },
            Expr::Redirect {
                proto_min_reg: REG_1,
                flags: NAT_RANGE_PROTO_SPECIFIED,
            },
        ]);
        RuleSpec {
            chain: DNS_CHAIN.into(),
            exprs,
        }
    };
    vec![
        RuleSpec {
            chain: DNS_CHAIN.into(),
            exprs: exempt,
        },
        redirect(IPPROTO_UDP),
        redirect(IPPROTO_TCP),
    ]
}
