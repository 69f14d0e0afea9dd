//! What the kernel holds in one of the agent's tables, as read back over netlink
//! ([`super::netlink::dump`] builds it).

use std::collections::BTreeSet;

use super::model::Shape;
use crate::policy::ExemptKey;

/// One of the agent's tables as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedTable {
    /// Everything but the exempt set's elements, normalised for comparison.
    pub shape: Shape,
    /// The netlink port id owning the table (`NFT_TABLE_F_OWNER`), if any.
    pub owner: Option<u32>,
    /// The exempt set's elements, or None when one could not be decoded (the caller then
    /// does a full sync rather than trust a partial picture).
    pub exempt: Option<BTreeSet<ExemptKey>>,
    /// Packets and bytes the reject rules counted since the table was (re)created.
    pub rejected: RejectCounters,
    /// Packets the report rule matched and passed to NFLOG since the table was (re)created.
    pub blocked: BlockedCounters,
    /// What could not be decoded (a foreign expression, object or element), for logs.
    pub undecodable: Vec<String>,
}

/// Values of the named reject counters of one table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RejectCounters {
    pub tcp_packets: u64,
    pub tcp_bytes: u64,
    pub other_packets: u64,
    pub other_bytes: u64,
}

impl RejectCounters {
    pub fn packets(&self) -> u64 {
        self.tcp_packets + self.other_packets
    }

    pub fn bytes(&self) -> u64 {
        self.tcp_bytes + self.other_bytes
    }
}

/// Values of the report rule's counters in one table (issue 11): every packet the rule
/// matched (`blocked`, before the rate limit) and those the limit let through to NFLOG
/// (`logged`). `blocked - logged` is what the limit suppressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockedCounters {
    pub blocked: u64,
    pub logged: u64,
}
