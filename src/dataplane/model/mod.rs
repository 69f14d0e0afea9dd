//! The typed description of what the agent keeps in the kernel (pure, no I/O).
//!
//! Two tables hold the same rules (see the crate README, "How enforcement works"):
//!
//! - `inet egress_guard`: no flags; it outlives the agent, so enforcement holds while the agent
//!   is stopped, crashed or restarting;
//! - `inet egress_guard_owned`: `NFT_TABLE_F_OWNER`, bound to the agent's netlink socket: no
//!   other process may delete or change it and `nft flush ruleset` skips it.
//!
//! A reject in either is final, so either table alone enforces.
//!
//! Rules are nf_tables expressions exactly as `nft` itself compiles the rules that
//! [`super::render`] prints (checked byte for byte against `nft --debug=netlink`), so that
//! `nft list ruleset` on a cell reads our tables back as `egress-guard render` prints them.

mod dns;
mod elements;
mod exprs;
mod learned;
mod rules;
mod scoped;
mod spec;
mod table;
#[cfg(test)]
mod tests;
mod uapi;

pub use dns::*;
pub use elements::*;
pub use learned::*;
pub use rules::*;
pub use scoped::*;
pub use spec::*;
pub use table::*;
pub use uapi::*;

/// The base chain on the forward hook: every packet a container sends off the cell passes it.
pub const FORWARD_CHAIN: &str = "forward";
/// The regular chain holding the decision for overlay-sourced packets.
pub const EGRESS_CHAIN: &str = "overlay_egress";
/// (host ifindex, source IP) pairs of exempt (staging) containers.
pub const EXEMPT_SET: &str = "exempt";
/// Destinations restricted containers may reach (interval set of `allowed_networks`).
pub const ALLOWED_SET: &str = "allowed";
pub const COUNTER_TCP: &str = "rejected_tcp";
pub const COUNTER_OTHER: &str = "rejected_other";
/// The IPv6 decision for packets that entered the cell from a container's veth.
pub const EGRESS6_CHAIN: &str = "overlay6_egress";
/// (host ifindex, source IPv6) pairs of exempt (staging) containers.
pub const EXEMPT6_SET: &str = "exempt6";
/// IPv6 destinations restricted containers may reach (the IPv6 `allowed_networks`).
pub const ALLOWED6_SET: &str = "allowed6";
/// The IPv6 addresses of this cell's containers: reaching one is container-to-container.
pub const CONTAINERS6_SET: &str = "containers6";
pub const COUNTER6_TCP: &str = "rejected6_tcp";
pub const COUNTER6_OTHER: &str = "rejected6_other";
/// Every packet the rules match, before the rate limit, in either mode.
pub const COUNTER_BLOCKED: &str = "blocked";
/// The packets the rate limit let through to the NFLOG group: `blocked - blocked_logged` is
/// what the limit suppressed, read from one counter dump (both kernel counters, no race with
/// the agent's socket).
pub const COUNTER_LOGGED: &str = "blocked_logged";
/// The NFLOG group the rules hand matched packets to, read by the agent
/// ([`super::netlink::nflog`]). Per network namespace; one listener per group (a second bind
/// gets EBUSY). 9851, like the health port: distinctive, and far from the 0..=3 that
/// `iptables -j NFLOG` and ulogd configurations usually take.
pub const NFLOG_GROUP: u16 = 9851;
/// Kernel-side bound on what reaches NFLOG, per table: a token bucket of
/// [`LOG_BURST`] packets refilled at this rate. Under a flood of any size the agent parses at
/// most about 2 × (rate + burst) messages a second (two tables), a few hundred microseconds of
/// CPU; everything above is counted (`blocked`) but not copied to user space.
pub const LOG_RATE_PER_SECOND: u64 = 200;
pub const LOG_BURST: u32 = 100;
/// Each container's own report budget, ahead of the cell-wide one: a token bucket per host
/// interface in the dynamic set [`REPORT_BUDGET_SET`], so that one container flooding
/// restricted destinations spends its own budget and the others' attempts still reach NFLOG
/// (ten containers at their limit fill the cell-wide one).
pub const REPORT_RATE_PER_CONTAINER: u64 = 20;
pub const REPORT_BURST_PER_CONTAINER: u32 = 20;
/// The per-container report budgets, keyed on the host interface the packet entered on (one
/// per container: a container that forges source addresses gets no second budget and cannot
/// fill the set). Bounded; an element expires a minute after its container's last blocked
/// packet. When full, a new container's packets skip to the cell-wide limit alone (they are
/// still rejected: the report rule has no verdict).
pub const REPORT_BUDGET_SET: &str = "report_budget";
pub const REPORT_BUDGET_SIZE: u32 = 4096;
pub const REPORT_BUDGET_TIMEOUT_MS: u64 = 60_000;
/// `enum nft_limit_type`: packets.
pub const LIMIT_PKTS: u32 = 0;
/// `filter - 10`: ahead of the iptables filter table (priority 0, legacy or nf_tables backend),
/// so our reject is final whatever ACCEPT silk, the policy agent or an ASG adds later.
pub const FORWARD_PRIORITY: i32 = -10;

/// The DNS filter's base chain (`[dns] enabled`): redirects restricted containers' DNS
/// queries to the agent's listener.
pub const DNS_CHAIN: &str = "dns_redirect";
/// The DNS filter's guard (`[dns] enabled`): each container's DNS rate, limited before
/// conntrack, and IPv6 DNS, which the filter does not serve, dropped.
pub const DNS_GUARD_CHAIN: &str = "dns_guard";
/// Each container's DNS budget (keyed on its host interface, like [`REPORT_BUDGET_SET`]).
pub const DNS_BUDGET_SET: &str = "dns_budget";
/// Queries the guard dropped for being over a container's rate (or, were `dns_budget` ever
/// full, over the one budget the containers it could not hold share).
pub const COUNTER_DNS_RATE_LIMITED: &str = "dns_rate_limited";
/// IPv6 DNS from containers, dropped by the guard.
pub const COUNTER_DNS6_DROPPED: &str = "dns6_dropped";
/// `dstnat` (-100, `NF_IP_PRI_NAT_DST`): where destination NAT belongs, after conntrack
/// (-200) has seen the packet. Both tables' chains sit here; NAT is decided once per
/// connection, by the first chain that sets a mapping, so the second never redirects again.
pub const DNS_PRIORITY: i32 = -100;

/// One of the agent's two tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AgentTable {
    /// `inet egress_guard`: survives the agent (fail closed while it is down).
    Persistent,
    /// `inet egress_guard_owned`: owned by the agent's socket (tamper-proof while it runs).
    Owned,
    /// `inet egress_guard_probe`: made and deleted at start by [`crate::dataplane::probe`],
    /// never part of [`AgentTable::ALL`] nor enforcing anything.
    Probe,
}

impl AgentTable {
    pub const ALL: [AgentTable; 2] = [AgentTable::Persistent, AgentTable::Owned];

    pub fn name(self) -> &'static str {
        match self {
            AgentTable::Persistent => "egress_guard",
            AgentTable::Owned => "egress_guard_owned",
            AgentTable::Probe => "egress_guard_probe",
        }
    }

    /// Table flags the agent creates it with.
    pub fn flags(self) -> u32 {
        match self {
            AgentTable::Persistent => 0,
            AgentTable::Owned => TABLE_F_OWNER,
            AgentTable::Probe => 0,
        }
    }

    pub fn from_name(name: &str) -> Option<AgentTable> {
        AgentTable::ALL.into_iter().find(|t| t.name() == name)
    }
}
