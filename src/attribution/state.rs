//! Everything attribution keeps between reports: the summary, the lookup, the kernel's
//! counters and log pacing; and the handle the NFLOG task, the loop and health share.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::attempt::{AppAttempt, AttemptSink};
use super::{
    attempt::{Action, Destination, Packet, Protocol, RefusedQuery},
    log::log_new,
    lookup::Lookup,
    summary::{Attempt, Filter, Key, MAX_ROWS, Summary},
};
use crate::config::Mode;
use crate::dataplane::{AgentTable, BlockedCounters};
use crate::policy::Decision;

/// New rows logged one by one per [`SUMMARY_PERIOD`]; the rest are counted in the summary line.
pub const MAX_NEW_ROW_LOGS: u64 = 50;
/// How often the summary line for repeats is logged (when anything was reported).
pub const SUMMARY_PERIOD: Duration = Duration::from_secs(60);

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
    /// Where reported attempts of known apps also go (app log lines), if anywhere.
    sink: Sink,
}

/// An optional [`AttemptSink`] (Debug for [`Blocked`]).
#[derive(Default)]
struct Sink(Option<Arc<dyn AttemptSink>>);

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Sink(set)"
        } else {
            "Sink(none)"
        })
    }
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
            sink: Sink::default(),
        }
    }

    /// Sends every reported attempt of a known app to `sink` as well.
    pub fn set_sink(&mut self, sink: Arc<dyn AttemptSink>) {
        self.sink = Sink(Some(sink));
    }

    /// Hands the attempt to the sink when its sender is an app the store names.
    fn to_sink(&self, key: &Key, ifindex: Option<u32>, at: SystemTime) {
        let Some(sink) = &self.sink.0 else { return };
        let sender = self.lookup.sender(ifindex, key.src);
        if sender.app_id.is_empty() {
            return;
        }
        sink.attempt(AppAttempt {
            app_id: sender.app_id,
            instance_index: sender.log_index,
            action: key.action,
            destination: key.dst.clone(),
            protocol: key.protocol,
            dst_port: key.dst_port,
            reachable_by_rule: sender.reachable_by_rule,
            at,
        });
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

    /// The lookup, to read.
    pub fn lookup(&self) -> &Lookup {
        &self.lookup
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
        self.to_sink(&key, packet.ifindex, now);
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
    pub fn ingest_dns(&mut self, refusal: &RefusedQuery) -> Option<Attempt> {
        let src = IpAddr::V4(refusal.src);
        let key = Key {
            action: Action::Rejected,
            // The filter sees the query after the redirect, without the interface it came in on.
            ifindex: 0,
            src,
            dst: Destination::Name(refusal.name.to_ascii_lowercase().into()),
            protocol: Protocol::Dns,
            dst_port: Some(53),
        };
        self.to_sink(&key, None, refusal.at);
        let lookup = &self.lookup;
        if !self
            .summary
            .record(key, || lookup.sender(None, src), refusal.at)
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

impl SharedBlocked {
    pub fn new(mode: Mode) -> SharedBlocked {
        SharedBlocked(Arc::new(Mutex::new(Blocked::new(mode))))
    }

    /// Records a refused DNS query in the same summary as blocked packets. Called on the DNS
    /// thread: it never waits for the lock (the reconcile loop or a scrape may hold it); a
    /// refusal that finds it busy is left out of `/blocked` (the DNS filter's own log and
    /// counters still count it).
    pub fn record_refusal(&self, query: &RefusedQuery) {
        let Ok(mut blocked) = self.0.try_lock() else {
            return;
        };
        if let Some(attempt) = blocked.ingest_dns(query) {
            drop(blocked);
            log_new(&attempt);
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Blocked> {
        // Plain data: a panic while holding the lock leaves it usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
