//! What a blocked attempt is: the packet NFLOG hands over, what the rules did with it, where
//! it went and by which protocol.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::dataplane::AgentTable;

/// What the rules did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Rejected,
    WouldReject,
}

impl Action {
    pub fn of(mode: Mode) -> Action {
        match mode {
            Mode::Enforce => Action::Rejected,
            Mode::Audit => Action::WouldReject,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Rejected => "rejected",
            Action::WouldReject => "would_reject",
        }
    }
}

/// One packet as NFLOG handed it over (already parsed, see `nflog::parse`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// The table that logged it (from the log prefix); None for a prefix that is not ours.
    pub table: Option<AgentTable>,
    /// Host interface it entered on (the container's host-side veth).
    pub ifindex: Option<u32>,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number.
    pub protocol: u8,
    /// TCP, UDP, SCTP or UDP-Lite destination port (None for other protocols and fragments).
    pub dst_port: Option<u16>,
    /// NFLOG's per-group sequence number, for counting messages lost on the way.
    pub seq: Option<u32>,
}

/// What a blocked attempt went to: an address, or (a refused DNS query) a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    Address(IpAddr),
    Name(Arc<str>),
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Address(ip) => ip.fmt(f),
            Destination::Name(name) => f.write_str(name),
        }
    }
}

/// A reported attempt of a known app (the kernel's report budgets already applied), with what
/// a line in the app's own log needs ([`AttemptSink`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppAttempt {
    pub app_id: String,
    /// The instance's index (`log_config`), when the store gives it.
    pub instance_index: Option<u32>,
    pub action: Action,
    pub destination: Destination,
    pub protocol: Protocol,
    pub dst_port: Option<u16>,
    /// What the app's `[[rules]]` scope lets it reach besides `allowed_networks`, in words.
    pub reachable_by_rule: Vec<String>,
    pub at: SystemTime,
}

/// Where reported attempts of known apps go besides the summary (the app log lines). Called
/// with attribution's lock held: it must not block.
pub trait AttemptSink: Send + Sync {
    fn attempt(&self, attempt: AppAttempt);
}

/// The protocol name refused DNS queries are reported with (as `tcp`/`udp`/`icmp` for packets).
pub const DNS_PROTOCOL: &str = "dns";

/// A DNS query the DNS filter refused, as attribution records it: who asked for which name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedQuery {
    /// The container's overlay address (the query's source).
    pub src: std::net::Ipv4Addr,
    /// The query name as asked.
    pub name: String,
    pub at: SystemTime,
}

/// The protocol of an attempt: an IP protocol number, or a DNS query the filter refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Ip(u8),
    Dns,
}

impl Protocol {
    pub fn name(self) -> String {
        match self {
            Protocol::Ip(number) => protocol_name(number),
            Protocol::Dns => DNS_PROTOCOL.to_string(),
        }
    }
}

/// The name of an IP protocol as the report shows it.
pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        47 => "gre".into(),
        50 => "esp".into(),
        51 => "ah".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        other => other.to_string(),
    }
}
