//! Blocked-attempt attribution: which container tried to reach what, when and how
//! often; pure apart from the clock values handed in, so it is unit-tested without root.
//!
//! The rules hand every packet they reject (enforce) or would reject (audit) to an NFLOG group,
//! at most [`LOG_RATE_PER_SECOND`](crate::dataplane::model::LOG_RATE_PER_SECOND) a second per
//! table; [`crate::dataplane::netlink::nflog`] reads them and [`Blocked::ingest`] attributes
//! each one by host interface index and source address to the container the policy knows,
//! through a lookup the reconcile loop replaces after every pass ([`Blocked::set_policy`]).
//! The [`Summary`] keeps one row per (action, container, destination, protocol, port):
//! count, first and last seen. It is bounded: [`MAX_ROWS`] in all, where the least recently
//! seen row makes room, and [`MAX_ROWS_PER_CONTAINER`] for any one container, whose own
//! oldest row makes room for its next (one container's flood never pushes out another's
//! rows). So is the log: one event per new row, at most [`MAX_NEW_ROW_LOGS`] per
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

mod attempt;
mod log;
mod lookup;
pub mod nflog;
mod state;
mod summary;
mod task;
#[cfg(test)]
mod tests;

pub use attempt::{
    Action, AppAttempt, AttemptSink, DNS_PROTOCOL, Destination, Packet, Protocol, RefusedQuery,
    protocol_name,
};
pub use log::{log_new, log_period};
pub use lookup::{Lookup, Sender};
pub use state::{
    Blocked, BlockedBody, CounterGrowth, Ingested, MAX_NEW_ROW_LOGS, PeriodSummary, SUMMARY_PERIOD,
    SharedBlocked,
};
pub use summary::{Attempt, Filter, Key, MAX_ROWS, MAX_ROWS_PER_CONTAINER, Summary};
pub use task::read_reports;
