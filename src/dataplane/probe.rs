//! Whether this kernel enforces a limit per element of a dynamic set (`update @set { key limit
//! … }`), which the per-container budgets (DNS, reports) rely on.
//!
//! Before the fix "netfilter: nft_limit: Clone packet limits' cost value" (Linux 5.19,
//! backported to 5.15.148; `nft_limit_pkts_clone` did not copy `cost`), an element's copy of a
//! packet limit has a cost of zero: it never runs out of tokens, so such a limit lets every
//! packet through. Stemcell kernels carry distribution numbering (Jammy's 5.15.0-N), so the
//! version says little: the agent asks the kernel instead. At start it makes a scratch table,
//! `inet egress_guard_probe`, whose output chain sends five UDP datagrams to a local port of
//! its own through a per-element limit of one packet an hour with a burst of one, counts what
//! passes, and deletes the table. A working limit passes one (the burst); a broken one passes
//! all five.

use std::net::{Ipv4Addr, UdpSocket};

use super::model::{
    AgentTable, ChainSpec, Expr, HOOK_OUTPUT, Hook, IPPROTO_UDP, LIMIT_PKTS, META_OIF, NF_ACCEPT,
    REG_1, RuleSpec, SET_F_EVAL, SET_F_TIMEOUT, SetBounds, SetSpec, TYPE_IFINDEX, dport,
};
use super::netlink::dump::counter_packets;
use super::netlink::{Batch, DumpKind, NetlinkError, NetlinkSocket, Op, Transport};

const CHAIN: &str = "probe";
const SET: &str = "probe";
const COUNTER: &str = "passed";
/// Datagrams the probe sends through the limit.
pub const PROBE_PACKETS: u64 = 5;

/// What the probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PerElementLimits {
    /// An element's limit holds: per-container budgets work.
    Enforced,
    /// Every probe packet passed the element's limit: the kernel lacks the fix.
    NotEnforced,
}

/// The probe's table: an output chain counting the UDP datagrams to `port` that pass a
/// per-element limit of 1/hour, burst 1, in a dynamic set keyed on the output interface.
/// Starts by removing a table a crashed probe may have left.
pub fn probe_batch(port: u16) -> Batch {
    let table = AgentTable::Probe;
    let mut batch = Batch::default();
    batch.push(Op::AddTable { table, flags: None });
    batch.push(Op::DeleteTable(table));
    batch.push(Op::AddTable {
        table,
        flags: Some(0),
    });
    batch.push(Op::AddCounter {
        table,
        name: COUNTER,
    });
    batch.push(Op::AddSet {
        table,
        set: SetSpec {
            name: SET,
            key_type: TYPE_IFINDEX,
            key_len: 4,
            flags: SET_F_TIMEOUT | SET_F_EVAL,
            userdata: Vec::new(),
            bounds: Some(SetBounds {
                size: 16,
                timeout_ms: 60_000,
            }),
            verdict_map: false,
        },
        id: 1,
    });
    batch.push(Op::AddChain {
        table,
        chain: ChainSpec {
            name: CHAIN.into(),
            hook: Some(Hook {
                kind: "filter".into(),
                hooknum: HOOK_OUTPUT,
                priority: 0,
                policy: NF_ACCEPT,
            }),
        },
    });
    batch.push(Op::AddRule {
        table,
        rule: RuleSpec {
            chain: CHAIN.into(),
            exprs: dport(IPPROTO_UDP, port)
                .into_iter()
                .chain([
                    Expr::Meta {
                        key: META_OIF,
                        dreg: REG_1,
                    },
                    Expr::Dynset {
                        sreg_key: REG_1,
                        set: SET.into(),
                        limit: Box::new(Expr::Limit {
                            rate: 1,
                            unit: 3600,
                            burst: 1,
                            kind: LIMIT_PKTS,
                            flags: 0,
                        }),
                    },
                    Expr::CounterRef(COUNTER.into()),
                ])
                .collect(),
        },
    });
    batch
}

/// What `passed` of [`PROBE_PACKETS`] says: at most the burst and one refill means the
/// limit held.
pub fn verdict(passed: u64) -> PerElementLimits {
    if passed < PROBE_PACKETS {
        PerElementLimits::Enforced
    } else {
        PerElementLimits::NotEnforced
    }
}

/// Runs the probe in the current network namespace and removes its table.
pub async fn per_element_limits() -> Result<PerElementLimits, NetlinkError> {
    let mut socket = NetlinkSocket::open()?;
    // A socket of ours on the port, so the datagrams are delivered, not answered with ICMP.
    let receiver = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).map_err(NetlinkError::Open)?;
    let port = receiver.local_addr().map_err(NetlinkError::Open)?.port();
    socket.apply(&probe_batch(port)).await?;
    let sent = send_probe_packets(port);
    let counted = socket.dump(DumpKind::Objects(AgentTable::Probe)).await;
    let mut cleanup = Batch::default();
    cleanup.push(Op::DeleteTable(AgentTable::Probe));
    let removed = socket.apply(&cleanup).await;
    let passed = counter_packets(&counted?, AgentTable::Probe.name(), COUNTER).unwrap_or(0);
    removed?;
    sent.map_err(NetlinkError::Open)?;
    tracing::debug!(passed, of = PROBE_PACKETS, "per-element limit probe");
    Ok(verdict(passed))
}

fn send_probe_packets(port: u16) -> std::io::Result<()> {
    let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    for _ in 0..PROBE_PACKETS {
        sender.send_to(b"egress-guard probe", (Ipv4Addr::LOCALHOST, port))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_counts_what_a_per_element_limit_passes() {
        let batch = probe_batch(40_000);
        assert!(batch.ops.iter().all(|op| op.table() == AgentTable::Probe));
        let rule = batch
            .ops
            .iter()
            .find_map(|op| match op {
                Op::AddRule { rule, .. } => Some(rule),
                _ => None,
            })
            .expect("one rule");
        assert!(matches!(
            rule.exprs.as_slice(),
            [.., Expr::Dynset { limit, .. }, Expr::CounterRef(c)]
                if c == COUNTER && matches!(**limit, Expr::Limit { burst: 1, .. })
        ));
        assert_eq!(verdict(1), PerElementLimits::Enforced);
        assert_eq!(verdict(2), PerElementLimits::Enforced);
        assert_eq!(verdict(PROBE_PACKETS), PerElementLimits::NotEnforced);
    }
}
