//! What the kernel holds in one of the agent's tables, as read back over netlink
//! ([`super::netlink::dump`] builds it).

use std::collections::BTreeSet;
use std::net::Ipv6Addr;

use super::model::Shape;
use crate::policy::{Exempt6Key, ExemptKey, ScopeElements};

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
    /// The IPv6 exempt set's elements, likewise.
    pub exempt6: Option<BTreeSet<Exempt6Key>>,
    /// The `containers6` set's elements, likewise.
    pub containers6: Option<BTreeSet<Ipv6Addr>>,
    /// The scope maps' elements, likewise.
    pub scopes: Option<ScopeElements>,
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
    /// The IPv6 rules' counters.
    pub tcp6_packets: u64,
    pub tcp6_bytes: u64,
    pub other6_packets: u64,
    pub other6_bytes: u64,
    /// The DNS guard's drops (`[dns] enabled`): queries over a container's rate, and IPv6
    /// DNS. Not part of [`RejectCounters::packets`].
    pub dns_rate_limited: u64,
    pub dns6_dropped: u64,
}

impl RejectCounters {
    /// IPv4 and IPv6.
    pub fn packets(&self) -> u64 {
        self.ipv4_packets() + self.ipv6_packets()
    }

    pub fn bytes(&self) -> u64 {
        self.tcp_bytes + self.other_bytes + self.tcp6_bytes + self.other6_bytes
    }

    pub fn ipv4_packets(&self) -> u64 {
        self.tcp_packets + self.other_packets
    }

    pub fn ipv6_packets(&self) -> u64 {
        self.tcp6_packets + self.other6_packets
    }

    /// Each field's value after `before`, a counter that went down counting from zero (the
    /// table was rebuilt).
    pub fn since(&self, before: &RejectCounters) -> RejectCounters {
        let d = |now: u64, then: u64| if now >= then { now - then } else { now };
        RejectCounters {
            tcp_packets: d(self.tcp_packets, before.tcp_packets),
            tcp_bytes: d(self.tcp_bytes, before.tcp_bytes),
            other_packets: d(self.other_packets, before.other_packets),
            other_bytes: d(self.other_bytes, before.other_bytes),
            tcp6_packets: d(self.tcp6_packets, before.tcp6_packets),
            tcp6_bytes: d(self.tcp6_bytes, before.tcp6_bytes),
            other6_packets: d(self.other6_packets, before.other6_packets),
            other6_bytes: d(self.other6_bytes, before.other6_bytes),
            dns_rate_limited: d(self.dns_rate_limited, before.dns_rate_limited),
            dns6_dropped: d(self.dns6_dropped, before.dns6_dropped),
        }
    }
}

/// Values of the report rule's counters in one table: every packet the rule
/// matched (`blocked`, before the rate limit) and those the limit let through to NFLOG
/// (`logged`). `blocked - logged` is what the limit suppressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockedCounters {
    pub blocked: u64,
    pub logged: u64,
}
