//! The DNS filter's chains: restricted containers' queries limited per container before
//! conntrack (`dns_guard`), then redirected to the agent's listener (`dns_redirect`).

use super::{
    COUNTER_DNS_RATE_LIMITED, COUNTER_DNS6_DROPPED, DNS_BUDGET_SET, DNS_CHAIN, DNS_GUARD_CHAIN,
    DNS_PRIORITY, EXEMPT_SET, EXEMPT6_SET, LIMIT_PKTS,
    exprs::{
        IPV4_SADDR_OFFSET, IPV6_SADDR_OFFSET, exempt_return, ipv4_only, l4proto_is, match_prefix,
        nfproto,
    },
    rules::interface_kind,
    spec::{ChainSpec, Expr, Hook, RuleSpec},
    uapi::{
        CMP_EQ, DNS_PORT, HOOK_PREROUTING, IPPROTO_TCP, IPPROTO_UDP, LIMIT_F_INV, LOOKUP_F_INV,
        META_IIF, META_IIFKIND, NAT_RANGE_PROTO_SPECIFIED, NF_ACCEPT, NF_DROP, NFPROTO_IPV4,
        NFPROTO_IPV6, PAYLOAD_TRANSPORT, RAW_PRIORITY, REG_1, TCP_ACK, TCP_FLAGS_OFFSET, TCP_SYN,
    },
};
use crate::policy::{DNS_FALLBACK_SHARE, DnsRules};
use ipnet::Ipv4Net;

/// The DNS filter's chains, in creation order (after [`chains`]), present when `[dns]` is
/// enabled.
pub fn dns_chains() -> [ChainSpec; 2] {
    [
        ChainSpec {
            name: DNS_CHAIN.into(),
            hook: Some(Hook {
                kind: "nat".into(),
                hooknum: HOOK_PREROUTING,
                priority: DNS_PRIORITY,
                policy: NF_ACCEPT,
            }),
        },
        ChainSpec {
            name: DNS_GUARD_CHAIN.into(),
            hook: Some(Hook {
                kind: "filter".into(),
                hooknum: HOOK_PREROUTING,
                priority: RAW_PRIORITY,
                policy: NF_ACCEPT,
            }),
        },
    ]
}

/// Both chains' rules: [`dns_redirect_rules`], then [`dns_guard_rules`].
pub fn dns_rules(overlay: Ipv4Net, dns: &DnsRules) -> Vec<RuleSpec> {
    let mut rules = dns_redirect_rules(overlay, dns.port);
    rules.extend(dns_guard_rules(overlay, dns));
    rules
}

/// The guard, at prerouting priority raw (before conntrack creates an entry for a query, so a
/// flood of random-port queries cannot fill the cell's conntrack table):
///
/// ```text
/// iif . ip saddr @exempt return
/// iif . ip6 saddr @exempt6 return
/// ip saddr <overlay> udp dport 53 update @dns_budget { iif limit rate over Q/second burst B packets } counter name "dns_rate_limited" drop
/// ip saddr <overlay> tcp dport 53 tcp flags syn / syn,ack update @dns_budget { … } counter … drop
/// ip saddr <overlay> udp dport 53 iif != @dns_budget limit rate over Q/second burst B packets counter … drop
/// ip saddr <overlay> tcp dport 53 tcp flags syn / syn,ack iif != @dns_budget limit … drop
/// meta nfproto ipv6 meta iifkind "veth" udp dport 53 counter name "dns6_dropped" drop
/// meta nfproto ipv6 meta iifkind "veth" tcp dport 53 counter name "dns6_dropped" drop
/// ```
///
/// Each container (host interface) has its own token bucket in `dns_budget`; UDP queries and
/// new TCP connections spend it. Should the set ever be full (it holds 4096 interfaces, far
/// more than a cell has containers), the `update` of a new container's key fails and the rule
/// ends there: the next rule then makes every container the set could not hold share one
/// budget of the same size, so a full set never lifts the limit. IPv6 DNS is not served by the
/// filter (silk gives containers IPv4 resolvers): a restricted container's IPv6 query, to any
/// address, is dropped.
pub fn dns_guard_rules(overlay: Ipv4Net, dns: &DnsRules) -> Vec<RuleSpec> {
    let rule = |exprs: Vec<Expr>| RuleSpec {
        chain: DNS_GUARD_CHAIN.into(),
        exprs,
    };
    let limit_over = Expr::Limit {
        rate: u64::from(dns.per_container_qps),
        unit: 1,
        burst: dns.per_container_burst,
        kind: LIMIT_PKTS,
        flags: LIMIT_F_INV,
    };
    let count_and_drop = |counter: &str| {
        [
            Expr::CounterRef(counter.into()),
            Expr::Verdict {
                code: NF_DROP,
                chain: None,
            },
        ]
    };
    let over_own_budget = |query: Vec<Expr>| {
        let mut exprs = query;
        exprs.extend([
            Expr::Meta {
                key: META_IIF,
                dreg: REG_1,
            },
            Expr::Dynset {
                sreg_key: REG_1,
                set: DNS_BUDGET_SET.into(),
                limit: Box::new(limit_over.clone()),
            },
        ]);
        exprs.extend(count_and_drop(COUNTER_DNS_RATE_LIMITED));
        rule(exprs)
    };
    let over_shared_budget = |query: Vec<Expr>| {
        let mut exprs = query;
        exprs.extend([
            Expr::Meta {
                key: META_IIF,
                dreg: REG_1,
            },
            Expr::Lookup {
                sreg: REG_1,
                set: DNS_BUDGET_SET.into(),
                flags: LOOKUP_F_INV,
            },
            limit_over.clone(),
        ]);
        exprs.extend(count_and_drop(COUNTER_DNS_RATE_LIMITED));
        rule(exprs)
    };
    let ipv6_dropped = |l4proto: u8| {
        let mut exprs = nfproto(NFPROTO_IPV6);
        exprs.extend(interface_kind(META_IIFKIND, "veth"));
        exprs.extend(dport_53(l4proto));
        exprs.extend(count_and_drop(COUNTER_DNS6_DROPPED));
        rule(exprs)
    };
    let over_cell_budget = |query: Vec<Expr>| {
        let mut exprs = query;
        exprs.push(Expr::Limit {
            rate: u64::from(dns.per_container_qps) * u64::from(DNS_FALLBACK_SHARE),
            unit: 1,
            burst: dns.per_container_burst.saturating_mul(DNS_FALLBACK_SHARE),
            kind: LIMIT_PKTS,
            flags: LIMIT_F_INV,
        });
        exprs.extend(count_and_drop(COUNTER_DNS_RATE_LIMITED));
        rule(exprs)
    };
    let mut rules = vec![
        rule(exempt_return(
            NFPROTO_IPV4,
            IPV4_SADDR_OFFSET,
            4,
            EXEMPT_SET,
        )),
        rule(exempt_return(
            NFPROTO_IPV6,
            IPV6_SADDR_OFFSET,
            16,
            EXEMPT6_SET,
        )),
    ];
    if dns.per_element_limits {
        rules.extend([
            over_own_budget(overlay_query(overlay, IPPROTO_UDP)),
            over_own_budget(overlay_query(overlay, IPPROTO_TCP)),
            over_shared_budget(overlay_query(overlay, IPPROTO_UDP)),
            over_shared_budget(overlay_query(overlay, IPPROTO_TCP)),
        ]);
    } else {
        // A kernel whose per-element limits pass everything: one cell-wide bucket, which a
        // plain `limit` (not cloned into set elements) enforces on any kernel.
        rules.extend([
            over_cell_budget(overlay_query(overlay, IPPROTO_UDP)),
            over_cell_budget(overlay_query(overlay, IPPROTO_TCP)),
        ]);
    }
    rules.extend([ipv6_dropped(IPPROTO_UDP), ipv6_dropped(IPPROTO_TCP)]);
    rules
}

/// `ip saddr <overlay> udp dport 53`, or for TCP a connection's first packet: `ip saddr
/// <overlay> tcp dport 53 tcp flags syn / syn,ack`.
fn overlay_query(overlay: Ipv4Net, l4proto: u8) -> Vec<Expr> {
    let mut exprs = ipv4_only();
    exprs.extend(match_prefix(IPV4_SADDR_OFFSET, overlay));
    exprs.extend(dport_53(l4proto));
    if l4proto == IPPROTO_TCP {
        exprs.extend([
            Expr::Payload {
                base: PAYLOAD_TRANSPORT,
                offset: TCP_FLAGS_OFFSET,
                len: 1,
                dreg: REG_1,
            },
            Expr::Bitwise {
                sreg: REG_1,
                dreg: REG_1,
                mask: vec![TCP_SYN | TCP_ACK],
                xor: vec![0],
                explicit_op: true,
            },
            Expr::Cmp {
                sreg: REG_1,
                op: CMP_EQ,
                data: vec![TCP_SYN],
            },
        ]);
    }
    exprs
}

/// `meta l4proto <l4proto> th dport 53`, as nft compiles `udp dport 53` in an inet table.
fn dport_53(l4proto: u8) -> [Expr; 4] {
    dport(l4proto, DNS_PORT)
}

/// `meta l4proto <l4proto> th dport <port>`.
pub fn dport(l4proto: u8, port: u16) -> [Expr; 4] {
    let [meta, cmp] = l4proto_is(l4proto);
    [
        meta,
        cmp,
        Expr::Payload {
            base: PAYLOAD_TRANSPORT,
            offset: 2,
            len: 2,
            dreg: REG_1,
        },
        Expr::Cmp {
            sreg: REG_1,
            op: CMP_EQ,
            data: port.to_be_bytes().to_vec(),
        },
    ]
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
pub fn dns_redirect_rules(overlay: Ipv4Net, port: u16) -> Vec<RuleSpec> {
    let exempt = exempt_return(NFPROTO_IPV4, IPV4_SADDR_OFFSET, 4, EXEMPT_SET);
    let redirect = |l4proto: u8| {
        let mut exprs = ipv4_only();
        exprs.extend(match_prefix(IPV4_SADDR_OFFSET, overlay));
        exprs.extend(dport_53(l4proto));
        exprs.extend([
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
