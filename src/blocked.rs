//! Blocked-attempt attribution (issue 11): which container tried to reach what, when and how
//! often; pure apart from the clock values handed in, so it is unit-tested without root.
//!
//! The rules hand every packet they reject (enforce) or would reject (audit) to an NFLOG group,
//! at most [`LOG_RATE_PER_SECOND`](crate::dataplane::model::LOG_RATE_PER_SECOND) a second per
//! table; [`crate::dataplane::netlink::nflog`] reads them and [`Blocked::ingest`] attributes
//! each one by host interface index and source address to the container the policy knows,
//! through a lookup the reconcile loop replaces after every pass ([`Blocked::set_policy`]).
//! The [`Summary`] keeps one row per (action, container, destination, protocol, port):
//! count, first and last seen. It is bounded ([`MAX_ROWS`]; the least recently seen row makes
//! room) and so is the log: one event per new row, at most [`MAX_NEW_ROW_LOGS`] per
//! [`SUMMARY_PERIOD`], and one summary line per period for everything else.
//!
//! Suppressed packets (matched, but not reported one by one) are counted exactly from the
//! kernel: each table's `blocked` counter counts every match before the rate limit and its
//! `blocked_logged` counter what the limit let through, read in the same dump; the difference
//! is what the limit held back. Messages lost between the kernel and the agent (a receive
//! buffer overrun) show as gaps in NFLOG's sequence numbers and are added.
//!
//! In enforce mode a packet is rejected by whichever table sees it first, so each matched packet
//! is counted and logged by exactly one table: both tables' reports and counters add up. In
//! audit mode a packet passes both tables and each logs it: only the *primary* table's reports
//! and counters count (the owned table when the agent keeps it, the persistent one otherwise),
//! told apart by the log prefix, which names the table.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::dataplane::netlink::nflog::{self, NflogSocket};
use crate::dataplane::{AgentTable, BlockedCounters};
use crate::policy::{Change, Decision};

/// Rows kept, and the most `/blocked` answers with.
pub const MAX_ROWS: usize = 1000;
/// New rows logged one by one per [`SUMMARY_PERIOD`]; the rest are counted in the summary line.
pub const MAX_NEW_ROW_LOGS: u64 = 50;
/// How often the summary line for repeats is logged (when anything was reported).
pub const SUMMARY_PERIOD: Duration = Duration::from_secs(60);

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
            Protocol::Dns => crate::dns::PROTOCOL.to_string(),
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

/// Who sent it, as the policy knew the sender when its first packet of a row arrived. Ids are
/// empty strings for a container the metadata store does not know.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Sender {
    pub handle: String,
    pub app_id: String,
    pub space_id: String,
    pub org_id: String,
    pub workload: String,
    /// Host-side interface (name, or `ifindex N` when the agent does not know its name).
    pub interface: String,
}

impl Sender {
    fn of(decision: &Decision) -> Sender {
        let text = |v: &Option<Arc<str>>| v.as_deref().unwrap_or_default().to_string();
        Sender {
            handle: text(&decision.handle),
            app_id: text(&decision.app_id),
            space_id: text(&decision.space_id),
            org_id: text(&decision.org_id),
            workload: text(&decision.workload),
            interface: decision
                .host_interface
                .clone()
                .or_else(|| decision.host_ifindex.map(|i| format!("ifindex {i}")))
                .unwrap_or_default(),
        }
    }

    fn unknown(interface: String) -> Sender {
        Sender {
            interface,
            ..Sender::default()
        }
    }
}

/// (host ifindex, source) -> the container, from the policy's decisions, kept current with the
/// decisions each pass changed. A packet whose source does not belong to its interface (a
/// forged source) is attributed to the interface's container; one from an interface the policy
/// does not know is reported as unknown.
///
/// Where several decisions share a key (two store entries claiming one IP), the lookup resolves
/// it as a full rebuild in the policy's order would: the last decision for a source or an
/// address, the first for an interface.
#[derive(Debug, Default)]
pub struct Lookup {
    /// By source address (IPv4 and IPv6); a packet's interface picks among them.
    by_address: HashMap<IpAddr, Candidates>,
    by_ifindex: HashMap<u32, Candidates>,
    links: HashMap<u32, String>,
}

/// The decisions sharing one key, in the policy's order: almost always one, kept without a
/// vector then (5,000 containers, two keys each).
#[derive(Debug)]
enum Candidates {
    One(Arc<Decision>),
    Many(Vec<Arc<Decision>>),
}

/// A decision's place in the policy's order ([`DecisionKey`]'s), without allocating.
fn policy_order(d: &Decision) -> (u8, &str, Option<std::net::Ipv4Addr>, u32) {
    match (&d.handle, d.ip) {
        (Some(handle), Some(_)) => (0, handle, None, 0),
        (None, Some(ip)) => (1, "", Some(ip), 0),
        (None, None) => (2, "", None, d.host_ifindex.unwrap_or_default()),
        (Some(handle), None) => (3, handle, None, 0),
    }
}

impl Candidates {
    fn as_slice(&self) -> &[Arc<Decision>] {
        match self {
            Candidates::One(one) => std::slice::from_ref(one),
            Candidates::Many(many) => many,
        }
    }

    /// Adds `decision`, replacing one with the same key.
    fn insert(&mut self, decision: &Arc<Decision>) {
        let order = policy_order(decision);
        self.edit(
            |all| match all.binary_search_by(|d| policy_order(d).cmp(&order)) {
                Ok(at) => all[at] = decision.clone(),
                Err(at) => all.insert(at, decision.clone()),
            },
        );
    }

    /// Removes the decision with `decision`'s key; false when none is left.
    fn remove(&mut self, decision: &Decision) -> bool {
        let order = policy_order(decision);
        self.edit(|all| all.retain(|d| policy_order(d) != order));
        !self.as_slice().is_empty()
    }

    /// Changes the candidates as a vector, then keeps them in their compact form.
    fn edit(&mut self, change: impl FnOnce(&mut Vec<Arc<Decision>>)) {
        let mut all = match std::mem::replace(self, Candidates::Many(Vec::new())) {
            Candidates::One(one) => vec![one],
            Candidates::Many(many) => many,
        };
        change(&mut all);
        *self = Candidates::from(all);
    }
}

impl From<Vec<Arc<Decision>>> for Candidates {
    fn from(mut all: Vec<Arc<Decision>>) -> Candidates {
        match all.len() {
            1 => Candidates::One(all.remove(0)),
            _ => Candidates::Many(all),
        }
    }
}

/// Adds (`add`) or removes `decision` under `key` in `map`.
fn index<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Candidates>,
    key: K,
    decision: &Arc<Decision>,
    add: bool,
) {
    if add {
        match map.get_mut(&key) {
            Some(candidates) => candidates.insert(decision),
            None => {
                map.insert(key, Candidates::One(decision.clone()));
            }
        }
    } else if let Some(candidates) = map.get_mut(&key)
        && !candidates.remove(decision)
    {
        map.remove(&key);
    }
}

impl Lookup {
    /// A lookup of `decisions` (as a full policy evaluation lists them).
    pub fn new(decisions: &[Decision], links: &BTreeMap<u32, String>) -> Lookup {
        let mut lookup = Lookup::default();
        lookup.set_links(links);
        let changes: Vec<Change> = decisions
            .iter()
            .map(|d| Change {
                before: None,
                after: Some(Arc::new(d.clone())),
            })
            .collect();
        lookup.apply(&changes);
        lookup
    }

    /// Follows the decisions a pass changed.
    pub fn apply(&mut self, changes: &[Change]) {
        for change in changes {
            if let Some(before) = &change.before {
                self.index(before, false);
            }
            if let Some(after) = &change.after {
                self.index(after, true);
            }
        }
    }

    fn index(&mut self, decision: &Arc<Decision>, add: bool) {
        let Some(ifindex) = decision.host_ifindex else {
            return;
        };
        let addresses = decision
            .ip
            .map(IpAddr::V4)
            .into_iter()
            .chain(decision.ipv6.iter().copied().map(IpAddr::V6));
        for ip in addresses {
            index(&mut self.by_address, ip, decision, add);
        }
        index(&mut self.by_ifindex, ifindex, decision, add);
    }

    /// Replaces every interface name (after a link dump).
    pub fn set_links(&mut self, links: &BTreeMap<u32, String>) {
        self.links = links.iter().map(|(i, n)| (*i, n.clone())).collect();
    }

    /// One interface's name changed (`None`: the interface went).
    pub fn set_link(&mut self, ifindex: u32, name: Option<&str>) {
        match name {
            Some(name) => self.links.insert(ifindex, name.to_string()),
            None => self.links.remove(&ifindex),
        };
    }

    pub fn sender(&self, ifindex: Option<u32>, src: IpAddr) -> Sender {
        let by_address = self.by_address.get(&src).map(Candidates::as_slice);
        let Some(ifindex) = ifindex else {
            return by_address
                .and_then(<[_]>::last)
                .map(|d| Sender::of(d))
                .unwrap_or_else(|| Sender::unknown(String::new()));
        };
        let from_interface = by_address
            .and_then(|all| all.iter().rev().find(|d| d.host_ifindex == Some(ifindex)))
            .or_else(|| {
                self.by_ifindex
                    .get(&ifindex)
                    .and_then(|c| c.as_slice().first())
            });
        match from_interface {
            Some(decision) => Sender::of(decision),
            None => Sender::unknown(
                self.links
                    .get(&ifindex)
                    .cloned()
                    .unwrap_or_else(|| format!("ifindex {ifindex}")),
            ),
        }
    }
}

/// What makes a row: one container instance (its interface index and address), destination,
/// protocol and port, and what the rules did.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub action: Action,
    pub ifindex: u32,
    pub src: IpAddr,
    pub dst: Destination,
    pub protocol: Protocol,
    pub dst_port: Option<u16>,
}

#[derive(Debug, Clone)]
struct Row {
    sender: Sender,
    count: u64,
    first_seen: SystemTime,
    last_seen: SystemTime,
    /// Position in [`Summary::recency`].
    touched: u64,
    /// Packets since the last summary line.
    in_period: u64,
}

/// One row of `/blocked`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub action: Action,
    pub handle: String,
    pub app_id: String,
    pub space_id: String,
    pub org_id: String,
    pub workload: String,
    pub interface: String,
    pub src: IpAddr,
    /// An address, or the query name of a refused DNS query.
    pub dst: String,
    pub protocol: String,
    pub dst_port: Option<u16>,
    pub count: u64,
    /// RFC 3339.
    pub first_seen: String,
    pub last_seen: String,
}

/// `?app_id=&space_id=&org_id=`: every given field must match exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub app_id: Option<String>,
    pub space_id: Option<String>,
    pub org_id: Option<String>,
}

impl Filter {
    fn accepts(&self, sender: &Sender) -> bool {
        let ok = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        ok(&self.app_id, &sender.app_id)
            && ok(&self.space_id, &sender.space_id)
            && ok(&self.org_id, &sender.org_id)
    }
}

/// The bounded summary of reported packets.
#[derive(Debug, Default)]
pub struct Summary {
    rows: HashMap<Key, Row>,
    /// touched -> key, oldest first: eviction and "most recent first" in O(log n).
    recency: BTreeMap<u64, Key>,
    tick: u64,
    /// Rows dropped to make room.
    pub evicted: u64,
}

impl Summary {
    /// Counts one packet; true when it opened a new row.
    pub fn record(&mut self, key: Key, sender: impl FnOnce() -> Sender, now: SystemTime) -> bool {
        self.tick += 1;
        let tick = self.tick;
        if let Some(row) = self.rows.get_mut(&key) {
            self.recency.remove(&row.touched);
            row.touched = tick;
            row.count += 1;
            row.in_period += 1;
            row.last_seen = row.last_seen.max(now);
            self.recency.insert(tick, key);
            return false;
        }
        while self.rows.len() >= MAX_ROWS {
            let Some((_, oldest)) = self.recency.pop_first() else {
                break;
            };
            self.rows.remove(&oldest);
            self.evicted += 1;
        }
        self.rows.insert(
            key.clone(),
            Row {
                sender: sender(),
                count: 1,
                first_seen: now,
                last_seen: now,
                touched: tick,
                in_period: 1,
            },
        );
        self.recency.insert(tick, key);
        true
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows `filter` accepts, most recently seen first, at most `limit`.
    pub fn attempts(&self, filter: &Filter, limit: usize) -> Vec<Attempt> {
        self.recency
            .values()
            .rev()
            .filter_map(|key| Some((key, self.rows.get(key)?)))
            .filter(|(_, row)| filter.accepts(&row.sender))
            .take(limit)
            .map(|(key, row)| attempt(key, row))
            .collect()
    }

    /// (packets, rows with packets, busiest row) since the last call; resets the period.
    fn take_period(&mut self) -> (u64, usize, Option<Attempt>) {
        let mut packets = 0;
        let mut rows = 0;
        let mut busiest: Option<(&Key, &Row)> = None;
        for (key, row) in &self.rows {
            if row.in_period == 0 {
                continue;
            }
            packets += row.in_period;
            rows += 1;
            if busiest.is_none_or(|(_, b)| row.in_period > b.in_period) {
                busiest = Some((key, row));
            }
        }
        let busiest = busiest.map(|(key, row)| {
            let mut a = attempt(key, row);
            a.count = row.in_period;
            a
        });
        for row in self.rows.values_mut() {
            row.in_period = 0;
        }
        (packets, rows, busiest)
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

fn attempt(key: &Key, row: &Row) -> Attempt {
    Attempt {
        action: key.action,
        handle: row.sender.handle.clone(),
        app_id: row.sender.app_id.clone(),
        space_id: row.sender.space_id.clone(),
        org_id: row.sender.org_id.clone(),
        workload: row.sender.workload.clone(),
        interface: row.sender.interface.clone(),
        src: key.src,
        dst: key.dst.to_string(),
        protocol: key.protocol.name(),
        dst_port: key.dst_port,
        count: row.count,
        first_seen: rfc3339(row.first_seen),
        last_seen: rfc3339(row.last_seen),
    }
}

/// Growth of the kernel counters the metrics add.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterGrowth {
    pub action: Option<Action>,
    /// Matched packets (rejected or would-be rejected).
    pub blocked: u64,
    /// Of those, held back by the rate limit.
    pub suppressed: u64,
}

/// Everything attribution keeps: the summary, the lookup, counters and log pacing.
#[derive(Debug)]
pub struct Blocked {
    mode: Mode,
    /// The table whose reports count in audit mode.
    primary: AgentTable,
    lookup: Lookup,
    pub summary: Summary,
    /// Packets matched but not reported one by one, since the agent started.
    pub suppressed: u64,
    /// Reported packets by action (after the rate limit, deduplicated).
    pub reported: BTreeMap<Action, u64>,
    /// Messages that were not ours or could not be parsed.
    pub unparsable: u64,
    /// Receive buffer overruns on the NFLOG socket (the lost messages count as suppressed).
    pub overruns: u64,
    /// Why attribution does not work (the NFLOG group could not be bound), if it does not.
    pub error: Option<String>,
    last_seq: Option<u32>,
    /// Kernel counters last read per table; None until first read (that read is the baseline).
    last_counters: BTreeMap<AgentTable, BlockedCounters>,
    // Log pacing.
    new_rows_logged: u64,
    new_rows_unlogged: u64,
    suppressed_in_period: u64,
}

impl Default for Blocked {
    fn default() -> Self {
        Blocked::new(Mode::Enforce)
    }
}

/// What [`Blocked::ingest`] made of a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    /// Counted in an existing row.
    Repeat,
    /// Opened a row; `log` when it is to be logged on its own.
    New { attempt: Box<Attempt>, log: bool },
    /// The other table's copy of a packet in audit mode, or not ours.
    Ignored,
}

impl Blocked {
    pub fn new(mode: Mode) -> Blocked {
        Blocked {
            mode,
            primary: AgentTable::Owned,
            lookup: Lookup::default(),
            summary: Summary::default(),
            suppressed: 0,
            reported: BTreeMap::new(),
            unparsable: 0,
            overruns: 0,
            error: None,
            last_seq: None,
            last_counters: BTreeMap::new(),
            new_rows_logged: 0,
            new_rows_unlogged: 0,
            suppressed_in_period: 0,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// After a pass: the decisions and link names to attribute by, the mode, and the tables the
    /// agent keeps (the owned one is primary when kept).
    pub fn set_policy(
        &mut self,
        mode: Mode,
        managed: &[AgentTable],
        decisions: &[Decision],
        links: &BTreeMap<u32, String>,
    ) {
        self.set_mode(mode, managed);
        self.set_lookup(Lookup::new(decisions, links));
    }

    /// The mode and the tables the agent keeps (the owned one is primary when kept).
    pub fn set_mode(&mut self, mode: Mode, managed: &[AgentTable]) {
        self.mode = mode;
        self.primary = if managed.contains(&AgentTable::Owned) {
            AgentTable::Owned
        } else {
            AgentTable::Persistent
        };
    }

    /// Replaces the lookup (built outside the lock).
    pub fn set_lookup(&mut self, lookup: Lookup) {
        self.lookup = lookup;
    }

    /// The lookup, to follow a pass's changes in place.
    pub fn lookup_mut(&mut self) -> &mut Lookup {
        &mut self.lookup
    }

    /// Whether reports and counters of `table` count (see the module doc).
    fn counts(&self, table: AgentTable) -> bool {
        self.mode == Mode::Enforce || table == self.primary
    }

    /// Attributes and counts one packet from NFLOG.
    pub fn ingest(&mut self, packet: &Packet, now: SystemTime) -> Ingested {
        if let Some(seq) = packet.seq {
            if let Some(last) = self.last_seq {
                let gap = u64::from(seq.wrapping_sub(last).wrapping_sub(1));
                // A jump backwards or absurdly far is a rebind or a wrap, not a loss.
                if gap > 0 && gap < (1 << 20) {
                    let lost = match self.mode {
                        Mode::Enforce => gap,
                        // Half the lost messages were the other table's copies.
                        Mode::Audit => gap.div_ceil(2),
                    };
                    self.suppressed += lost;
                    self.suppressed_in_period += lost;
                }
            }
            self.last_seq = Some(seq);
        }
        let Some(table) = packet.table else {
            self.unparsable += 1;
            return Ingested::Ignored;
        };
        if !self.counts(table) {
            return Ingested::Ignored;
        }
        let action = Action::of(self.mode);
        *self.reported.entry(action).or_default() += 1;
        let key = Key {
            action,
            ifindex: packet.ifindex.unwrap_or(0),
            src: packet.src,
            dst: Destination::Address(packet.dst),
            protocol: Protocol::Ip(packet.protocol),
            dst_port: packet.dst_port,
        };
        let lookup = &self.lookup;
        let new = self
            .summary
            .record(key, || lookup.sender(packet.ifindex, packet.src), now);
        if !new {
            return Ingested::Repeat;
        }
        let log = self.new_rows_logged < MAX_NEW_ROW_LOGS;
        if log {
            self.new_rows_logged += 1;
        } else {
            self.new_rows_unlogged += 1;
        }
        let attempt = self
            .summary
            .attempts(&Filter::default(), 1)
            .into_iter()
            .next();
        match attempt {
            Some(attempt) => Ingested::New {
                attempt: Box::new(attempt),
                log,
            },
            None => Ingested::Repeat,
        }
    }

    /// Records a query the DNS filter refused (protocol `dns`, the query name as destination,
    /// port 53). The filter refuses in either mode, so the action is always `rejected`.
    pub fn ingest_dns(&mut self, refusal: &crate::dns::DnsRefusal) -> Option<Attempt> {
        let src = IpAddr::V4(refusal.src);
        let key = Key {
            action: Action::Rejected,
            ifindex: refusal.iif.unwrap_or(0),
            src,
            dst: Destination::Name(refusal.name.to_ascii_lowercase().into()),
            protocol: Protocol::Dns,
            dst_port: Some(53),
        };
        let lookup = &self.lookup;
        if !self
            .summary
            .record(key, || lookup.sender(refusal.iif, src), refusal.at)
        {
            return None;
        }
        if self.new_rows_logged >= MAX_NEW_ROW_LOGS {
            self.new_rows_unlogged += 1;
            return None;
        }
        self.new_rows_logged += 1;
        self.summary
            .attempts(&Filter::default(), 1)
            .into_iter()
            .next()
    }

    /// A message from the NFLOG group that could not be parsed.
    pub fn ingest_unparsable(&mut self) {
        self.unparsable += 1;
    }

    /// The agent recreated `table` (a full sync): its counters start again from zero.
    pub fn table_recreated(&mut self, table: AgentTable) {
        self.last_counters.insert(table, BlockedCounters::default());
    }

    /// Feeds `table`'s report counters as read now. The first reading of a table the agent did
    /// not create is the baseline (what it counted before is another agent's business); a
    /// counter that went down was reset by a rebuild, so all of its value is new.
    pub fn observe_counters(&mut self, table: AgentTable, now: BlockedCounters) -> CounterGrowth {
        let Some(before) = self.last_counters.insert(table, now) else {
            return CounterGrowth::default();
        };
        if !self.counts(table) {
            return CounterGrowth::default();
        }
        let grow = |b: u64, n: u64| if n >= b { n - b } else { n };
        let (blocked, logged) = if now.blocked < before.blocked || now.logged < before.logged {
            (now.blocked, now.logged)
        } else {
            (
                grow(before.blocked, now.blocked),
                grow(before.logged, now.logged),
            )
        };
        let suppressed = blocked.saturating_sub(logged);
        self.suppressed += suppressed;
        self.suppressed_in_period += suppressed;
        CounterGrowth {
            action: Some(Action::of(self.mode)),
            blocked,
            suppressed,
        }
    }

    /// The summary line of the period now ending, or None when nothing happened in it.
    pub fn take_period(&mut self) -> Option<PeriodSummary> {
        let (packets, rows, busiest) = self.summary.take_period();
        let summary = PeriodSummary {
            packets,
            overruns: self.overruns,
            rows,
            new_rows_unlogged: self.new_rows_unlogged,
            suppressed: self.suppressed_in_period,
            busiest,
        };
        self.new_rows_logged = 0;
        self.new_rows_unlogged = 0;
        self.suppressed_in_period = 0;
        (packets > 0 || summary.suppressed > 0).then_some(summary)
    }

    /// The `/blocked` answer.
    pub fn report(&self, filter: &Filter) -> BlockedBody {
        BlockedBody {
            mode: self.mode,
            attempts: self.summary.attempts(filter, MAX_ROWS),
            suppressed: self.suppressed,
            attribution_error: self.error.clone(),
        }
    }
}

/// One period's summary line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodSummary {
    pub packets: u64,
    /// NFLOG socket overruns since the agent started.
    pub overruns: u64,
    pub rows: usize,
    pub new_rows_unlogged: u64,
    pub suppressed: u64,
    pub busiest: Option<Attempt>,
}

/// Body of `GET /blocked`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockedBody {
    pub mode: Mode,
    /// Most recently seen first, at most [`MAX_ROWS`].
    pub attempts: Vec<Attempt>,
    /// Matched packets not reported one by one (rate limit, or lost on the way), since start.
    pub suppressed: u64,
    /// Why nothing can be reported (the NFLOG group could not be bound); absent when fine.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attribution_error: Option<String>,
}

/// Shared handle: the NFLOG reader writes, the loop sets the policy, health reads. Every
/// holder keeps the lock for microseconds (no I/O under it).
#[derive(Debug, Clone, Default)]
pub struct SharedBlocked(Arc<Mutex<Blocked>>);

/// Refused DNS queries go into the same summary as blocked packets. Called on the DNS thread:
/// it never waits for the lock (the reconcile loop or a scrape may hold it); a refusal that
/// finds it busy is left out of `/blocked` (the log sink and the metrics still count it).
impl crate::dns::RefusalSink for SharedBlocked {
    fn refused(&self, refusal: &crate::dns::DnsRefusal) {
        let Ok(mut blocked) = self.0.try_lock() else {
            return;
        };
        if let Some(attempt) = blocked.ingest_dns(refusal) {
            drop(blocked);
            log_new(&attempt);
        }
    }
}

impl SharedBlocked {
    pub fn new(mode: Mode) -> SharedBlocked {
        SharedBlocked(Arc::new(Mutex::new(Blocked::new(mode))))
    }

    pub fn lock(&self) -> MutexGuard<'_, Blocked> {
        // Plain data: a panic while holding the lock leaves it usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Writes the log event for a new row: one structured event with the fields of `/blocked`
/// (`dst_port` absent when the protocol has none).
pub fn log_new(attempt: &Attempt) {
    let message = match attempt.action {
        Action::Rejected => "rejected egress attempt",
        Action::WouldReject => "egress attempt that enforce would reject (audit mode)",
    };
    macro_rules! event {
        ($($port:tt)*) => {
            tracing::warn!(
                target: "egress_guard::blocked",
                action = attempt.action.as_str(),
                handle = %attempt.handle,
                app_id = %attempt.app_id,
                space_id = %attempt.space_id,
                org_id = %attempt.org_id,
                workload = %attempt.workload,
                interface = %attempt.interface,
                src = %attempt.src,
                dst = %attempt.dst,
                protocol = %attempt.protocol,
                $($port)*
                first_seen = %attempt.first_seen,
                "{message}"
            )
        };
    }
    match attempt.dst_port {
        Some(port) => event!(dst_port = port,),
        None => event!(),
    }
}

/// Writes a period's summary line.
pub fn log_period(summary: &PeriodSummary) {
    let busiest = summary.busiest.as_ref();
    tracing::info!(
        target: "egress_guard::blocked",
        period_s = SUMMARY_PERIOD.as_secs(),
        packets = summary.packets,
        rows = summary.rows,
        new_rows_not_logged = summary.new_rows_unlogged,
        suppressed = summary.suppressed,
        socket_overruns = summary.overruns,
        busiest_app_id = busiest.map(|a| a.app_id.as_str()).unwrap_or(""),
        busiest_src = %busiest.map(|a| a.src.to_string()).unwrap_or_default(),
        busiest_dst = %busiest.map(|a| a.dst.to_string()).unwrap_or_default(),
        busiest_protocol = busiest.map(|a| a.protocol.as_str()).unwrap_or(""),
        busiest_dst_port = busiest.and_then(|a| a.dst_port).map(i64::from).unwrap_or(-1),
        busiest_count = busiest.map(|a| a.count).unwrap_or(0),
        "blocked attempts in the last period (see egress-guard blocked)"
    );
}

/// Give up on the NFLOG socket after this many receive errors in a row (other than overruns).
const MAX_CONSECUTIVE_ERRORS: u32 = 1000;

/// The attribution task (the edge): NFLOG -> [`Blocked::ingest`] -> log events, and the
/// summary line every [`SUMMARY_PERIOD`]. Runs until the socket fails for good; the lock is
/// never held across an await or a log write.
pub async fn read_reports(mut socket: NflogSocket, shared: SharedBlocked) {
    let mut ticker = tokio::time::interval(SUMMARY_PERIOD);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut consecutive_errors = 0u32;
    loop {
        tokio::select! {
            received = socket.recv() => match received {
                Ok(datagram) => {
                    consecutive_errors = 0;
                    let now = SystemTime::now();
                    let mut to_log = Vec::new();
                    {
                        let mut blocked = shared.lock();
                        for packet in nflog::parse(&datagram) {
                            match packet {
                                Some(packet) => {
                                    if let Ingested::New { attempt, log: true } =
                                        blocked.ingest(&packet, now)
                                    {
                                        to_log.push(attempt);
                                    }
                                }
                                None => blocked.ingest_unparsable(),
                            }
                        }
                    }
                    for attempt in &to_log {
                        log_new(attempt);
                    }
                }
                // The kernel dropped messages for a full buffer: the sequence numbers of the
                // next ones count them.
                // Not logged one by one (a hostile logger could make that a flood of its own).
                Err(err) if err.raw_os_error() == Some(nix::libc::ENOBUFS) => {
                    shared.lock().overruns += 1;
                }
                Err(err) => {
                    consecutive_errors += 1;
                    if consecutive_errors > MAX_CONSECUTIVE_ERRORS {
                        tracing::error!(error = %err,
                            "NFLOG socket keeps failing; blocked attempts are no longer reported \
                             (enforcement is unaffected)");
                        shared.lock().error = Some(format!("NFLOG socket failed: {err}"));
                        return;
                    }
                }
            },
            _ = ticker.tick() => {
                let period = shared.lock().take_period();
                if let Some(period) = period {
                    log_period(&period);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Verdict;
    use std::net::Ipv4Addr;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn decision(handle: Option<&str>, ip: [u8; 4], ifindex: u32, app: &str) -> Decision {
        Decision {
            ipv6: Vec::new(),
            handle: handle.map(Into::into),
            ip: Some(Ipv4Addr::from(ip)),
            host_ifindex: Some(ifindex),
            host_interface: Some(format!("veth{ifindex}")),
            workload: handle.map(|_| "app".into()),
            app_id: handle.map(|_| app.into()),
            space_id: handle.map(|_| format!("space-of-{app}").into()),
            org_id: handle.map(|_| "org-1".into()),
            verdict: Verdict::Restricted,
            reason: String::new(),
        }
    }

    #[test]
    fn policy_order_is_the_order_of_decision_keys() {
        let mut all = vec![
            decision(Some("b"), [10, 255, 0, 2], 5, "x"),
            decision(Some("a"), [10, 255, 0, 9], 5, "x"),
            decision(None, [10, 255, 0, 3], 6, ""),
            decision(None, [10, 255, 0, 1], 6, ""),
        ];
        for (handle, ifindex) in [(Some("a"), 0), (Some("0"), 0), (None, 9), (None, 3)] {
            let mut d = decision(handle, [0, 0, 0, 0], ifindex, "x");
            d.ip = None;
            d.host_ifindex = Some(ifindex);
            all.push(d);
        }
        let mut by_key = all.clone();
        by_key.sort_by_key(Decision::key);
        all.sort_by(|a, b| policy_order(a).cmp(&policy_order(b)));
        assert_eq!(all, by_key);
    }

    #[test]
    fn a_lookup_kept_from_changes_answers_as_one_built_afresh() {
        let a = Arc::new(decision(Some("a"), [10, 255, 0, 2], 5, "app-a"));
        let b = Arc::new(decision(Some("b"), [10, 255, 0, 2], 5, "app-b"));
        let c = Arc::new(decision(None, [10, 255, 0, 3], 6, ""));
        let moved = Arc::new(decision(Some("a"), [10, 255, 0, 2], 7, "app-a"));
        let add = |d: &Arc<Decision>| Change {
            before: None,
            after: Some(d.clone()),
        };
        let mut kept = Lookup::default();
        kept.apply(&[add(&a), add(&b), add(&c)]);
        let links = BTreeMap::from([(9, "s-other".to_string())]);
        kept.set_links(&links);
        kept.apply(&[
            Change {
                before: Some(b.clone()),
                after: None,
            },
            Change {
                before: Some(a.clone()),
                after: Some(moved.clone()),
            },
        ]);
        let fresh = Lookup::new(&[(*moved).clone(), (*c).clone()], &links);
        let x = IpAddr::V4(Ipv4Addr::new(10, 255, 0, 2));
        let y = IpAddr::V4(Ipv4Addr::new(10, 255, 0, 3));
        for (ifindex, src) in [
            (Some(5), x),
            (Some(7), x),
            (None, x),
            (Some(6), y),
            (Some(6), x),
            (Some(9), x),
            (None, y),
        ] {
            assert_eq!(
                kept.sender(ifindex, src),
                fresh.sender(ifindex, src),
                "{ifindex:?} {src}"
            );
        }
        assert_eq!(kept.sender(Some(7), x).app_id, "app-a");
        assert_eq!(kept.sender(Some(5), x).interface, "ifindex 5");
        assert_eq!(kept.sender(Some(9), x).interface, "s-other");
        // Two decisions for one source: the last in the policy's order, as a rebuild gives.
        let both = Lookup::new(&[(*a).clone(), (*b).clone()], &BTreeMap::new());
        assert_eq!(both.sender(Some(5), x).app_id, "app-b");
    }

    fn packet(table: AgentTable, ifindex: u32, src: [u8; 4], dst_port: u16, seq: u32) -> Packet {
        Packet {
            table: Some(table),
            ifindex: Some(ifindex),
            src: IpAddr::V4(Ipv4Addr::from(src)),
            dst: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
            protocol: 6,
            dst_port: Some(dst_port),
            seq: Some(seq),
        }
    }

    fn blocked(mode: Mode) -> Blocked {
        let mut b = Blocked::new(mode);
        b.set_policy(
            mode,
            &AgentTable::ALL,
            &[
                decision(Some("h-a"), [10, 255, 0, 2], 5, "app-a"),
                decision(Some("h-b"), [10, 255, 0, 3], 6, "app-b"),
                decision(None, [10, 255, 0, 4], 7, ""),
            ],
            &BTreeMap::from([(9, "s-010255000009".to_string())]),
        );
        b
    }

    #[test]
    fn packets_are_attributed_by_interface_and_source() {
        let mut b = blocked(Mode::Enforce);
        let owned = AgentTable::Owned;
        let Ingested::New { attempt, log } =
            b.ingest(&packet(owned, 5, [10, 255, 0, 2], 443, 1), at(0))
        else {
            panic!("a new row");
        };
        assert!(log);
        assert_eq!(
            (attempt.handle.as_str(), attempt.app_id.as_str()),
            ("h-a", "app-a")
        );
        assert_eq!(attempt.space_id, "space-of-app-a");
        assert_eq!(attempt.org_id, "org-1");
        assert_eq!(attempt.action, Action::Rejected);
        assert_eq!(
            (attempt.protocol.as_str(), attempt.dst_port),
            ("tcp", Some(443))
        );
        assert_eq!(attempt.first_seen, "2023-11-14T22:13:20.000Z");
        // A forged source is its interface's container; the store's unknowns have empty ids
        // and their interface; an interface nobody knows is named from the links.
        b.ingest(&packet(owned, 6, [10, 255, 0, 2], 80, 2), at(1));
        b.ingest(&packet(owned, 7, [10, 255, 0, 4], 80, 3), at(2));
        b.ingest(&packet(owned, 9, [10, 255, 0, 9], 80, 4), at(3));
        let rows = b.report(&Filter::default()).attempts;
        assert_eq!(rows.len(), 4);
        assert_eq!(
            (rows[0].handle.as_str(), rows[0].interface.as_str()),
            ("", "s-010255000009")
        );
        assert_eq!((rows[1].handle.as_str(), rows[1].app_id.as_str()), ("", ""));
        assert_eq!(rows[1].interface, "veth7");
        assert_eq!(rows[2].handle, "h-b");
        assert_eq!(rows[2].src, IpAddr::V4(Ipv4Addr::new(10, 255, 0, 2)));
    }

    #[test]
    fn repeats_count_and_move_to_the_front() {
        let mut b = blocked(Mode::Enforce);
        let t = AgentTable::Persistent;
        b.ingest(&packet(t, 5, [10, 255, 0, 2], 443, 1), at(0));
        b.ingest(&packet(t, 6, [10, 255, 0, 3], 443, 2), at(1));
        assert_eq!(
            b.ingest(&packet(t, 5, [10, 255, 0, 2], 443, 3), at(5)),
            Ingested::Repeat
        );
        let rows = b.report(&Filter::default()).attempts;
        assert_eq!(rows[0].handle, "h-a");
        assert_eq!(rows[0].count, 2);
        assert_eq!(rows[0].first_seen, "2023-11-14T22:13:20.000Z");
        assert_eq!(rows[0].last_seen, "2023-11-14T22:13:25.000Z");
        assert_eq!(rows[1].handle, "h-b");
        // Enforce: both tables' reports count (each packet is rejected by one of them).
        assert_eq!(b.reported[&Action::Rejected], 3);
    }

    #[test]
    fn audit_keeps_one_tables_copy() {
        let mut b = blocked(Mode::Audit);
        let p = packet(AgentTable::Persistent, 5, [10, 255, 0, 2], 443, 1);
        let o = packet(AgentTable::Owned, 5, [10, 255, 0, 2], 443, 2);
        assert_eq!(b.ingest(&p, at(0)), Ingested::Ignored);
        assert!(matches!(b.ingest(&o, at(0)), Ingested::New { .. }));
        let rows = b.report(&Filter::default()).attempts;
        assert_eq!((rows.len(), rows[0].count), (1, 1));
        assert_eq!(rows[0].action, Action::WouldReject);
        // Without the owned table, the persistent one is primary: its copy counts now.
        b.set_policy(
            Mode::Audit,
            &[AgentTable::Persistent],
            &[],
            &BTreeMap::new(),
        );
        let again = packet(AgentTable::Persistent, 5, [10, 255, 0, 2], 443, 3);
        assert_eq!(b.ingest(&again, at(1)), Ingested::Repeat);
        assert_eq!(b.report(&Filter::default()).attempts[0].count, 2);
        // A prefix that is not one of our tables is not counted.
        let mut foreign = p.clone();
        foreign.table = None;
        assert_eq!(b.ingest(&foreign, at(2)), Ingested::Ignored);
        assert_eq!(b.unparsable, 1);
    }

    #[test]
    fn the_summary_is_bounded_and_evicts_the_least_recent() {
        let mut b = blocked(Mode::Enforce);
        let t = AgentTable::Owned;
        let mut logged = 0;
        for port in 0..(MAX_ROWS as u16 + 250) {
            if let Ingested::New { log: true, .. } =
                b.ingest(&packet(t, 5, [10, 255, 0, 2], port, u32::from(port)), at(0))
            {
                logged += 1;
            }
        }
        assert_eq!(b.summary.len(), MAX_ROWS);
        assert_eq!(b.summary.evicted, 250);
        assert_eq!(logged, MAX_NEW_ROW_LOGS);
        let rows = b.report(&Filter::default()).attempts;
        assert_eq!(rows.len(), MAX_ROWS);
        // Most recent first; the first 250 ports were evicted.
        assert_eq!(rows[0].dst_port, Some(MAX_ROWS as u16 + 249));
        assert_eq!(rows[MAX_ROWS - 1].dst_port, Some(250));
        let period = b.take_period().expect("a busy period");
        assert_eq!(
            period.new_rows_unlogged,
            MAX_ROWS as u64 + 250 - MAX_NEW_ROW_LOGS
        );
        assert_eq!(period.rows, MAX_ROWS);
        // The next period logs new rows again and is silent when nothing happened.
        assert_eq!(b.take_period(), None);
        assert!(matches!(
            b.ingest(&packet(t, 6, [10, 255, 0, 3], 1, 5000), at(1)),
            Ingested::New { log: true, .. }
        ));
    }

    #[test]
    fn filters_match_ids_exactly() {
        let mut b = blocked(Mode::Enforce);
        let t = AgentTable::Owned;
        b.ingest(&packet(t, 5, [10, 255, 0, 2], 443, 1), at(0));
        b.ingest(&packet(t, 6, [10, 255, 0, 3], 443, 2), at(1));
        b.ingest(&packet(t, 7, [10, 255, 0, 4], 443, 3), at(2));
        let only = |f: Filter| -> Vec<String> {
            b.report(&f)
                .attempts
                .into_iter()
                .map(|a| a.handle)
                .collect()
        };
        assert_eq!(
            only(Filter {
                app_id: Some("app-a".into()),
                ..Filter::default()
            }),
            vec!["h-a"]
        );
        assert_eq!(
            only(Filter {
                space_id: Some("space-of-app-b".into()),
                ..Filter::default()
            }),
            vec!["h-b"]
        );
        assert_eq!(
            only(Filter {
                org_id: Some("org-1".into()),
                ..Filter::default()
            }),
            vec!["h-b", "h-a"]
        );
        assert_eq!(
            only(Filter {
                org_id: Some("org-1".into()),
                app_id: Some("app-b".into()),
                ..Filter::default()
            }),
            vec!["h-b"]
        );
        assert!(
            only(Filter {
                app_id: Some("app".into()),
                ..Filter::default()
            })
            .is_empty()
        );
        assert_eq!(only(Filter::default()).len(), 3);
    }

    #[test]
    fn suppression_is_counted_from_the_kernel_counters_and_sequence_gaps() {
        let mut b = blocked(Mode::Enforce);
        let c = |blocked, logged| BlockedCounters { blocked, logged };
        // The first reading of an adopted table is the baseline.
        assert_eq!(
            b.observe_counters(AgentTable::Persistent, c(500, 100)),
            CounterGrowth::default()
        );
        let g = b.observe_counters(AgentTable::Persistent, c(1500, 300));
        assert_eq!((g.blocked, g.suppressed), (1000, 800));
        assert_eq!(g.action, Some(Action::Rejected));
        // A table the agent created counts from zero; a reset counts all of the new value.
        b.table_recreated(AgentTable::Owned);
        let g = b.observe_counters(AgentTable::Owned, c(50, 50));
        assert_eq!((g.blocked, g.suppressed), (50, 0));
        let g = b.observe_counters(AgentTable::Persistent, c(40, 10));
        assert_eq!((g.blocked, g.suppressed), (40, 30));
        assert_eq!(b.suppressed, 830);
        // Audit: only the primary (owned) table's counters count.
        b.set_policy(Mode::Audit, &AgentTable::ALL, &[], &BTreeMap::new());
        assert_eq!(
            b.observe_counters(AgentTable::Persistent, c(140, 20)),
            CounterGrowth::default()
        );
        let g = b.observe_counters(AgentTable::Owned, c(150, 60));
        assert_eq!((g.blocked, g.suppressed), (100, 90));
        assert_eq!(g.action, Some(Action::WouldReject));
        assert_eq!(b.suppressed, 920);
        // Sequence gaps: messages lost on the socket (in audit, half were duplicates).
        let t = AgentTable::Owned;
        b.ingest(&packet(t, 5, [10, 255, 0, 2], 1, 10), at(0));
        b.ingest(&packet(t, 5, [10, 255, 0, 2], 1, 15), at(0));
        assert_eq!(b.suppressed, 920 + 2);
        b.set_policy(Mode::Enforce, &AgentTable::ALL, &[], &BTreeMap::new());
        b.ingest(&packet(t, 5, [10, 255, 0, 2], 1, 20), at(0));
        assert_eq!(b.suppressed, 922 + 4);
        // A restart of the numbering is not a loss.
        b.ingest(&packet(t, 5, [10, 255, 0, 2], 1, 1), at(0));
        assert_eq!(b.suppressed, 926);
        let period = b.take_period().expect("suppressed in the period");
        assert_eq!(period.suppressed, 926);
    }

    #[test]
    fn protocols_are_named() {
        assert_eq!(protocol_name(6), "tcp");
        assert_eq!(protocol_name(17), "udp");
        assert_eq!(protocol_name(1), "icmp");
        assert_eq!(protocol_name(99), "99");
    }

    #[test]
    fn the_body_has_the_issue_shape() {
        let mut b = blocked(Mode::Audit);
        b.ingest(
            &packet(AgentTable::Owned, 5, [10, 255, 0, 2], 443, 1),
            at(0),
        );
        let value = serde_json::to_value(b.report(&Filter::default())).expect("json");
        assert_eq!(value["mode"], "audit");
        assert_eq!(value["suppressed"], 0);
        let row = &value["attempts"][0];
        for key in [
            "action",
            "handle",
            "app_id",
            "space_id",
            "org_id",
            "workload",
            "src",
            "dst",
            "protocol",
            "dst_port",
            "count",
            "first_seen",
            "last_seen",
        ] {
            assert!(row.get(key).is_some(), "{key} missing in {row}");
        }
        assert_eq!(row["action"], "would_reject");
        assert_eq!(row["dst_port"], 443);
        assert!(value.get("attribution_error").is_none());
    }

    #[test]
    fn refused_dns_queries_are_rows_with_the_name_and_protocol_dns() {
        let mut b = blocked(Mode::Audit);
        let refusal = crate::dns::DnsRefusal {
            src: Ipv4Addr::new(10, 255, 0, 2),
            iif: None,
            name: "X.Attacker.Example.".into(),
            qtype: "TXT".into(),
            transport: "udp",
            at: at(0),
        };
        let first = b.ingest_dns(&refusal).expect("a new row, logged");
        assert_eq!(first.protocol, "dns");
        assert_eq!(first.dst, "x.attacker.example.");
        assert_eq!(first.dst_port, Some(53));
        // The filter refuses in either mode.
        assert_eq!(first.action, Action::Rejected);
        // Attributed by source address alone (the filter does not know the interface).
        assert_eq!(first.app_id, "app-a");
        assert!(
            b.ingest_dns(&refusal).is_none(),
            "a repeat is not a new row"
        );
        let rows = b.report(&Filter::default()).attempts;
        assert_eq!((rows.len(), rows[0].count), (1, 2));
    }
}
