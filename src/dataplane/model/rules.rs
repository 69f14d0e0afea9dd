//! The rules of the egress chains (IPv4 and IPv6) and the reject-or-report tail, each as nft
//! compiles the same rule (built from [`super::exprs`]).

use ipnet::Ipv4Net;

use super::AgentTable;
use super::exprs::{
    IPV4_DADDR_OFFSET, IPV4_SADDR_OFFSET, IPV6_DADDR_OFFSET, IPV6_SADDR_OFFSET, exempt_return,
    ipv4_only, l4proto_is, lookup, match_prefix, nfproto, return_,
};
use super::scoped::{egress_rule_hooks, rule_chain_rules};
use super::{
    ALLOWED_SET, ALLOWED6_SET, CONTAINERS6_SET, COUNTER_BLOCKED, COUNTER_LOGGED, COUNTER_OTHER,
    COUNTER_TCP, COUNTER6_OTHER, COUNTER6_TCP, EGRESS_CHAIN, EGRESS6_CHAIN, EXEMPT_SET,
    EXEMPT6_SET, FORWARD_CHAIN, LIMIT_PKTS, LOG_BURST, LOG_RATE_PER_SECOND, NFLOG_GROUP,
    REPORT_BUDGET_SET, REPORT_BURST_PER_CONTAINER, REPORT_RATE_PER_CONTAINER,
    spec::{Expr, RuleSpec},
    uapi::{
        CMP_EQ, IFNAMSIZ, IPPROTO_TCP, META_IIF, META_IIFKIND, NFPROTO_IPV4, NFPROTO_IPV6,
        NFT_JUMP, PAYLOAD_NETWORK, REG_1, REJECT_ICMPX_ADMIN_PROHIBITED, REJECT_ICMPX_UNREACH,
        REJECT_TCP_RST,
    },
};
use crate::config::Mode;
use crate::policy::RuleSet;

/// The rules of `table`, in order, for `mode`, with no `[[rules]]`.
pub fn rules(table: AgentTable, overlay: Ipv4Net, mode: Mode) -> Vec<RuleSpec> {
    rules_with(table, overlay, mode, &RuleSet::default())
}

/// The rules of `table`, in order, for `mode` and `rule_set`: the egress chains, then the
/// chains of `[[rules]]` ([`super::scoped`]).
pub fn rules_with(
    table: AgentTable,
    overlay: Ipv4Net,
    mode: Mode,
    rule_set: &RuleSet,
) -> Vec<RuleSpec> {
    let rule = |chain: &str, exprs: Vec<Expr>| RuleSpec {
        chain: chain.into(),
        exprs,
    };
    let mut jump = ipv4_only();
    jump.extend(match_prefix(IPV4_SADDR_OFFSET, overlay));
    jump.push(Expr::Verdict {
        code: NFT_JUMP,
        chain: Some(EGRESS_CHAIN.into()),
    });

    let exempt = exempt_return(NFPROTO_IPV4, IPV4_SADDR_OFFSET, 4, EXEMPT_SET);

    let mut allowed = ipv4_only();
    allowed.extend([
        Expr::Payload {
            base: PAYLOAD_NETWORK,
            offset: IPV4_DADDR_OFFSET,
            len: 4,
            dreg: REG_1,
        },
        lookup(ALLOWED_SET),
        return_(),
    ]);

    let mut rules = vec![
        rule(FORWARD_CHAIN, jump),
        rule(EGRESS_CHAIN, exempt),
        rule(EGRESS_CHAIN, allowed),
    ];
    rules.extend(
        egress_rule_hooks(rule_set, false)
            .into_iter()
            .chain(reject_or_log(table, mode))
            .map(|exprs| rule(EGRESS_CHAIN, exprs)),
    );
    rules.extend(ipv6_rules(table, mode, rule_set));
    rules.extend(rule_chain_rules(rule_set));
    rules
}

/// IPv6: there is no overlay to match on (silk takes containers' IPv6 addresses from the
/// cell's own prefix, whatever it is), so the jump matches a property of container traffic the
/// kernel knows without the agent: it entered the cell from a veth, the host end of every
/// container's link (silk's `s-…` and the CNI `ptp` plugin's `veth…` alike). A container the
/// agent has not seen yet is therefore restricted from its first packet.
///
/// Container-to-container traffic is recognised by its destination: an address of a container
/// on this cell (`@containers6`, from the routes the agent reads), not by the output
/// interface's kind, since on a cell whose uplink is itself a veth (BOSH-lite, a cell in a
/// container) "leaves through a veth" includes "leaves the cell". The same rule lets in the
/// replies to exempt (staging) containers' connections, which also enter on a veth there.
pub(super) fn ipv6_rules(table: AgentTable, mode: Mode, rule_set: &RuleSet) -> Vec<RuleSpec> {
    let rule = |chain: &str, exprs: Vec<Expr>| RuleSpec {
        chain: chain.into(),
        exprs,
    };
    let mut jump = nfproto(NFPROTO_IPV6);
    jump.extend(interface_kind(META_IIFKIND, "veth"));
    jump.push(Expr::Verdict {
        code: NFT_JUMP,
        chain: Some(EGRESS6_CHAIN.into()),
    });

    let exempt = exempt_return(NFPROTO_IPV6, IPV6_SADDR_OFFSET, 16, EXEMPT6_SET);

    let mut rules = vec![
        rule(FORWARD_CHAIN, jump),
        rule(EGRESS6_CHAIN, exempt),
        rule(EGRESS6_CHAIN, ipv6_daddr_return(ALLOWED6_SET)),
        rule(EGRESS6_CHAIN, ipv6_daddr_return(CONTAINERS6_SET)),
    ];
    rules.extend(
        egress_rule_hooks(rule_set, true)
            .into_iter()
            .chain(reject_or_log_counting(
                table,
                mode,
                COUNTER6_TCP,
                COUNTER6_OTHER,
            ))
            .map(|exprs| rule(EGRESS6_CHAIN, exprs)),
    );
    rules
}

/// `ip6 daddr @<set> return`.
fn ipv6_daddr_return(set: &str) -> Vec<Expr> {
    let mut exprs = nfproto(NFPROTO_IPV6);
    exprs.extend([
        Expr::Payload {
            base: PAYLOAD_NETWORK,
            offset: IPV6_DADDR_OFFSET,
            len: 16,
            dreg: REG_1,
        },
        lookup(set),
        return_(),
    ]);
    exprs
}

/// `meta iifkind "veth"`: the kind, NUL-padded to IFNAMSIZ.
pub(super) fn interface_kind(key: u32, kind: &str) -> Vec<Expr> {
    let mut data = kind.as_bytes().to_vec();
    data.resize(IFNAMSIZ, 0);
    vec![
        Expr::Meta { key, dreg: REG_1 },
        Expr::Cmp {
            sreg: REG_1,
            op: CMP_EQ,
            data,
        },
    ]
}

/// The end of `overlay_egress`: what happens to a packet from a restricted container to a
/// destination outside `allowed`. In both modes it is counted and, within the rate limit,
/// handed to NFLOG ([`report`]); enforce then rejects it. Audit adds no verdict: the packet
/// falls off the end of the chain, returns to `forward`, whose policy accepts it, and goes on
/// to the next base chain on the hook (the other table, then the iptables filter table at
/// priority 0) exactly as if egress-guard were not there. An `accept` verdict would do the
/// same in nf_tables (it is final only for the base chain that issues it), but falling off the
/// end says "no opinion" without relying on that.
pub fn reject_or_log(table: AgentTable, mode: Mode) -> Vec<Vec<Expr>> {
    reject_or_log_counting(table, mode, COUNTER_TCP, COUNTER_OTHER)
}

/// [`reject_or_log`] with the reject rules counting into `tcp_counter` and `other_counter`
/// (IPv4 and IPv6 count apart; both report to the same NFLOG group).
pub(super) fn reject_or_log_counting(
    table: AgentTable,
    mode: Mode,
    tcp_counter: &str,
    other_counter: &str,
) -> Vec<Vec<Expr>> {
    let mut rules = vec![report(table)];
    if mode == Mode::Enforce {
        let mut tcp = l4proto_is(IPPROTO_TCP).to_vec();
        tcp.extend([
            Expr::CounterRef(tcp_counter.into()),
            Expr::Reject {
                kind: REJECT_TCP_RST,
                code: 0,
            },
        ]);
        rules.push(tcp);
        rules.push(vec![
            Expr::CounterRef(other_counter.into()),
            Expr::Reject {
                kind: REJECT_ICMPX_UNREACH,
                code: REJECT_ICMPX_ADMIN_PROHIBITED,
            },
        ]);
    }
    rules
}

/// `counter name "blocked" update @report_budget { iif limit rate 20/second burst 20 packets }
/// limit rate 200/second burst 100 packets counter name "blocked_logged" log prefix "<table>"
/// group 9851`: count every match, then hand to NFLOG at most the container's own budget and,
/// of what all containers' budgets pass, the cell-wide limit's share. The prefix names the
/// table, because in audit mode a packet passes both tables and is logged by each: the agent
/// keeps one table's reports.
pub fn report(table: AgentTable) -> Vec<Expr> {
    vec![
        Expr::CounterRef(COUNTER_BLOCKED.into()),
        Expr::Meta {
            key: META_IIF,
            dreg: REG_1,
        },
        Expr::Dynset {
            sreg_key: REG_1,
            set: REPORT_BUDGET_SET.into(),
            limit: Box::new(Expr::Limit {
                rate: REPORT_RATE_PER_CONTAINER,
                unit: 1,
                burst: REPORT_BURST_PER_CONTAINER,
                kind: LIMIT_PKTS,
                flags: 0,
            }),
        },
        Expr::Limit {
            rate: LOG_RATE_PER_SECOND,
            unit: 1,
            burst: LOG_BURST,
            kind: LIMIT_PKTS,
            flags: 0,
        },
        Expr::CounterRef(COUNTER_LOGGED.into()),
        Expr::Log {
            group: NFLOG_GROUP,
            prefix: table.name().into(),
        },
    ]
}
