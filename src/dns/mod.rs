//! The DNS filter for restricted containers (`[dns]`).
//!
//! The agent's nftables rules ([`crate::dataplane::model::dns_rules`]) redirect every DNS
//! query (UDP and TCP port 53, to any address) from a restricted container to this listener;
//! staging (exempt) containers are not redirected. The listener forwards names under
//! `dns.allowed_suffixes` to `dns.upstream` and relays the answer unchanged; it answers every
//! other name itself (REFUSED or NXDOMAIN) and sends nothing anywhere for it.
//!
//! - [`filter`]: pure: one query's bytes -> forward, refuse (with the answer) or drop;
//! - [`server`]: the UDP and TCP listeners and the upstream exchanges, every one bounded;
//! - here: what the filter reports: refused names ([`RefusalSink`]), and its health and counts
//!   ([`DnsHealth`]), which the metrics read when scraped.
//!
//! It runs on a thread and runtime of its own ([`spawn`]): a flood of queries costs that thread,
//! never the reconcile loop. It must not touch the dataplane: while it is down, the persistent
//! table keeps redirecting to its port and restricted containers' DNS gets no answer.

pub mod answer;
pub mod filter;
pub mod server;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// Who asks: the container behind a query's source address, as the agent's last pass knew
/// it (restricted, with its host interface), or None. Wired by the daemon; called on the DNS
/// thread for queries that may match a hostname rule, so it must be quick and never block
/// for long.
pub trait Askers: Send + Sync + 'static {
    fn asker(&self, src: Ipv4Addr) -> Option<filter::Asker>;
}

/// Nobody is known (no hostname rule can match).
pub struct NoAskers;

impl Askers for NoAskers {
    fn asker(&self, _: Ipv4Addr) -> Option<filter::Asker> {
        None
    }
}

/// A request to allow what one answer gave one container, to the reconcile loop (which owns
/// the socket that may write the owned table). Answered before the answer is relayed.
#[derive(Debug)]
pub struct LearnRequest {
    pub ifindex: u32,
    /// The hostname rule's connection mark (its chain is `host_<mark>`).
    pub mark: u16,
    pub addresses: Vec<std::net::IpAddr>,
    /// How long the elements stay.
    pub timeout: Duration,
    pub reply: tokio::sync::oneshot::Sender<Result<LearnReply, String>>,
}

/// Takes how long an answer of a hostname rule waited, from the filter having it to the
/// kernel allowing its addresses (the metrics' histogram, in the daemon).
pub type LearnTimer = Arc<dyn Fn(Duration) + Send + Sync>;

/// What the filter needs for hostname rules: who asks, the way to the reconcile loop, and
/// where to report how long answers waited for the kernel.
pub struct Learning {
    pub askers: Arc<dyn Askers>,
    pub learner: tokio::sync::mpsc::Sender<LearnRequest>,
    pub waited: LearnTimer,
}

/// What the kernel now allows of a [`LearnRequest`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LearnReply {
    pub allowed: Vec<std::net::IpAddr>,
    /// Left out because the container holds its bound of learned addresses already.
    pub refused_container: usize,
    /// Left out because the cell holds its bound already.
    pub refused_total: usize,
}

/// Which bound left an answer's address out, as counted in
/// `egress_guard_dns_learn_bound_total{bound}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LearnBound {
    Answer,
    Container,
    Total,
}

impl LearnBound {
    pub const ALL: [LearnBound; 3] = [LearnBound::Answer, LearnBound::Container, LearnBound::Total];

    pub fn as_str(self) -> &'static str {
        match self {
            LearnBound::Answer => "answer",
            LearnBound::Container => "container",
            LearnBound::Total => "total",
        }
    }
}

/// The protocol name refusals are attributed with (as `tcp`/`udp`/`icmp` for packets).
pub const PROTOCOL: &str = "dns";

/// One refused query: who asked what. Handed to a [`RefusalSink`] as it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRefusal {
    /// The container's overlay address (the query's source; the redirect keeps it).
    pub src: Ipv4Addr,
    /// The query name as asked (case kept, trailing dot).
    pub name: String,
    /// The query type (`A`, `TXT`, …).
    pub qtype: String,
    /// `udp` or `tcp`.
    pub transport: &'static str,
    pub at: SystemTime,
}

/// Where refusals go: the log ([`LogRefusals`]) and, wired by the daemon, attribution's
/// `/blocked` summary. Called on the DNS thread for every refusal, so it must be cheap, bounded
/// and must never block (count and drop rather than wait).
pub trait RefusalSink: Send + Sync + 'static {
    fn refused(&self, refusal: &DnsRefusal);
}

/// Logs refusals, at most [`LOG_REFUSALS_PER_SECOND`] a second; the rest are counted and the
/// count is logged with the next line that gets through.
#[derive(Default)]
pub struct LogRefusals {
    pacer: Mutex<LogPacer>,
}

/// Refusal log lines per second (a flood of refused names must not flood the log).
pub const LOG_REFUSALS_PER_SECOND: u32 = 10;

/// One-second windows of at most [`LOG_REFUSALS_PER_SECOND`] lines; pure, the time handed in.
#[derive(Debug, Default)]
struct LogPacer {
    window_start: Option<Instant>,
    logged_in_window: u32,
    not_logged: u64,
}

impl LogPacer {
    /// Whether a line may be written at `now`: `Some(lines held back since the last one)`, or
    /// None when this one is held back (and counted).
    fn admit(&mut self, now: Instant) -> Option<u64> {
        let window_over = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1));
        if window_over {
            self.window_start = Some(now);
            self.logged_in_window = 0;
        }
        if self.logged_in_window >= LOG_REFUSALS_PER_SECOND {
            self.not_logged += 1;
            return None;
        }
        self.logged_in_window += 1;
        Some(std::mem::take(&mut self.not_logged))
    }
}

impl RefusalSink for LogRefusals {
    fn refused(&self, refusal: &DnsRefusal) {
        let admitted = self
            .pacer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(Instant::now());
        let Some(not_logged) = admitted else {
            return;
        };
        tracing::info!(src = %refusal.src, name = %refusal.name, qtype = %refusal.qtype,
            transport = refusal.transport, protocol = PROTOCOL, not_logged,
            "refused a DNS query from a restricted container");
    }
}

/// Several sinks at once (the log and `/blocked`).
pub struct Sinks(pub Vec<Arc<dyn RefusalSink>>);

impl RefusalSink for Sinks {
    fn refused(&self, refusal: &DnsRefusal) {
        for sink in &self.0 {
            sink.refused(refusal);
        }
    }
}

/// How a query ended, as counted in `egress_guard_dns_queries_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryResult {
    /// An allowed name: forwarded, and the answer relayed.
    Forwarded,
    /// Another name: answered REFUSED (or NXDOMAIN), sent nowhere.
    Refused,
    /// An allowed name the upstream did not answer (timeout, error), or one beyond
    /// `max_inflight`: answered SERVFAIL.
    Error,
    /// Not a well-formed query: dropped without an answer.
    Malformed,
    /// From outside the overlay (the listener is not a resolver for anyone else): dropped.
    Ignored,
}

impl QueryResult {
    pub const ALL: [QueryResult; 5] = [
        QueryResult::Forwarded,
        QueryResult::Refused,
        QueryResult::Error,
        QueryResult::Malformed,
        QueryResult::Ignored,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            QueryResult::Forwarded => "forwarded",
            QueryResult::Refused => "refused",
            QueryResult::Error => "error",
            QueryResult::Malformed => "malformed",
            QueryResult::Ignored => "ignored",
        }
    }
}

/// After this many upstream failures in a row (and no success since), readiness turns red.
pub const UPSTREAM_FAILING_AFTER: u64 = 3;

/// What the filter reports about itself, read by `/healthz`, `/readyz` and the tests. The DNS
/// thread writes it; readers copy under short locks.
pub struct DnsHealth {
    upstream: SocketAddr,
    max_inflight: usize,
    /// Ok(bound address) once listening; Err(why) while it cannot; None before it tried.
    listener: Mutex<Option<Result<SocketAddr, String>>>,
    upstream_failures: AtomicU64,
    last_upstream_error: Mutex<Option<String>>,
    inflight: AtomicUsize,
    overloaded: AtomicU64,
    /// TCP connections closed because their container held its limit already.
    tcp_refused: AtomicU64,
    counts: [AtomicU64; 5],
    /// Addresses hostname rules' answers allowed (added or refreshed).
    learned: AtomicU64,
    /// Answers of hostname rules that could not be learned (the agent's loop did not answer,
    /// the kernel refused): answered SERVFAIL.
    learn_failed: AtomicU64,
    learn_bounds: [AtomicU64; 3],
}

pub type SharedDnsHealth = Arc<DnsHealth>;

/// The `dns` object of `/healthz` and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsHealthBody {
    /// The listener's address, or null while it is not listening.
    pub listening: Option<String>,
    pub upstream: String,
    /// Upstream queries that failed (timeout, error) since the last one that was answered.
    pub upstream_failures_in_a_row: u64,
    pub last_upstream_error: Option<String>,
    pub inflight: usize,
    pub max_inflight: usize,
    /// Allowed queries answered SERVFAIL because `max_inflight` were in flight, or their
    /// container's share of them.
    pub overloaded: u64,
    /// TCP connections closed because their container held its limit
    /// (`per_container_tcp_connections`).
    #[serde(default)]
    pub tcp_connections_refused: u64,
    /// Queries by result, as in `egress_guard_dns_queries_total`.
    pub queries: std::collections::BTreeMap<String, u64>,
    /// What is wrong, if anything (also the `/readyz` reason).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub problem: Option<String>,
}

impl DnsHealth {
    pub fn new(config: &Config) -> DnsHealth {
        DnsHealth {
            upstream: config.dns.upstream,
            max_inflight: config.dns.max_inflight,
            listener: Mutex::new(None),
            upstream_failures: AtomicU64::new(0),
            last_upstream_error: Mutex::new(None),
            inflight: AtomicUsize::new(0),
            overloaded: AtomicU64::new(0),
            tcp_refused: AtomicU64::new(0),
            learned: AtomicU64::new(0),
            learn_failed: AtomicU64::new(0),
            learn_bounds: Default::default(),
            counts: Default::default(),
        }
    }

    pub fn count(&self, result: QueryResult) {
        let index = QueryResult::ALL
            .iter()
            .position(|r| *r == result)
            .unwrap_or(0);
        self.counts[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Queries counted with `result` so far.
    pub fn counted(&self, result: QueryResult) -> u64 {
        QueryResult::ALL
            .iter()
            .position(|r| *r == result)
            .map_or(0, |i| self.counts[i].load(Ordering::Relaxed))
    }

    pub fn overloaded(&self) {
        self.overloaded.fetch_add(1, Ordering::Relaxed);
    }

    /// A TCP connection was closed: its container held `dns.per_container_tcp_connections`.
    pub fn learned(&self, addresses: usize) {
        self.learned.fetch_add(addresses as u64, Ordering::Relaxed);
    }

    pub fn learn_failed(&self) {
        self.learn_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn learn_bound(&self, bound: LearnBound, addresses: usize) {
        self.learn_bounds[bound as usize].fetch_add(addresses as u64, Ordering::Relaxed);
    }

    /// (addresses learned, answers that failed to be learned, addresses left out by each
    /// bound in [`LearnBound::ALL`] order).
    pub fn learn_counts(&self) -> (u64, u64, [u64; 3]) {
        (
            self.learned.load(Ordering::Relaxed),
            self.learn_failed.load(Ordering::Relaxed),
            [0, 1, 2].map(|i| self.learn_bounds[i].load(Ordering::Relaxed)),
        )
    }

    pub fn tcp_connection_refused(&self) {
        self.tcp_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// TCP connections closed so far because their container was at its limit.
    pub fn tcp_connections_refused(&self) -> u64 {
        self.tcp_refused.load(Ordering::Relaxed)
    }

    pub fn listening(&self, result: Result<SocketAddr, String>) {
        *self.listener.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
    }

    pub fn upstream_answered(&self) {
        self.upstream_failures.store(0, Ordering::Relaxed);
    }

    pub fn upstream_failed(&self, error: String) {
        self.upstream_failures.fetch_add(1, Ordering::Relaxed);
        *self
            .last_upstream_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(error);
    }

    pub fn set_inflight(&self, inflight: usize) {
        self.inflight.store(inflight, Ordering::Relaxed);
    }

    /// Upstream queries in flight now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// What is wrong: the listener is not listening, or the upstream stopped answering.
    pub fn problem(&self) -> Option<String> {
        match &*self.listener.lock().unwrap_or_else(|p| p.into_inner()) {
            None => return Some("dns filter: listener not started yet".into()),
            Some(Err(err)) => return Some(format!("dns filter: not listening: {err}")),
            Some(Ok(_)) => {}
        }
        let failures = self.upstream_failures.load(Ordering::Relaxed);
        if failures >= UPSTREAM_FAILING_AFTER {
            let last = self
                .last_upstream_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default();
            return Some(format!(
                "dns filter: upstream {} failed the last {failures} queries ({last}); allowed \
                 names get SERVFAIL",
                self.upstream
            ));
        }
        None
    }

    pub fn body(&self) -> DnsHealthBody {
        // Each lock is taken and released in its own statement: `problem` takes them again.
        let listening = match &*self.listener.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(Ok(addr)) => Some(addr.to_string()),
            _ => None,
        };
        let last_upstream_error = self
            .last_upstream_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let problem = self.problem();
        DnsHealthBody {
            listening,
            upstream: self.upstream.to_string(),
            upstream_failures_in_a_row: self.upstream_failures.load(Ordering::Relaxed),
            last_upstream_error,
            inflight: self.inflight.load(Ordering::Relaxed),
            max_inflight: self.max_inflight,
            overloaded: self.overloaded.load(Ordering::Relaxed),
            tcp_connections_refused: self.tcp_connections_refused(),
            queries: QueryResult::ALL
                .iter()
                .map(|r| (r.as_str().to_string(), self.counted(*r)))
                .collect(),
            problem,
        }
    }
}

/// Starts the filter on a thread of its own with its own single-threaded runtime, listening on
/// `dns.listen` (retrying while the address is unavailable) until the process exits.
/// Returns the server, whose names a reload can change ([`server::Server::set_names`]).
pub fn spawn(
    config: &Config,
    health: SharedDnsHealth,
    sink: Arc<dyn RefusalSink>,
    learning: Option<Learning>,
) -> std::io::Result<Arc<server::Server>> {
    let mut server = server::Server::new(config, health.clone(), sink);
    if let Some(learning) = learning {
        server = server.with_learning(learning);
    }
    let server = Arc::new(server);
    let listen = config.dns.listen;
    let running = server.clone();
    std::thread::Builder::new()
        .name("dns".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    tracing::error!(error = %err, "cannot start the DNS filter's runtime");
                    health.listening(Err(format!("no runtime: {err}")));
                    return;
                }
            };
            runtime.block_on(running.run(listen));
        })?;
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> DnsHealth {
        let config = Config::parse("[dns]\nenabled = true").expect("valid");
        DnsHealth::new(&config)
    }

    #[test]
    fn health_says_what_is_wrong() {
        let h = health();
        assert!(h.problem().expect("not started").contains("not started"));
        h.listening(Err("Address in use".into()));
        assert!(h.problem().expect("problem").contains("Address in use"));
        h.listening(Ok("0.0.0.0:9853".parse().expect("literal")));
        assert_eq!(h.problem(), None);
        for _ in 0..UPSTREAM_FAILING_AFTER {
            h.upstream_failed("no answer within 2s".into());
        }
        let problem = h.problem().expect("upstream failing");
        assert!(problem.contains("169.254.0.2:53"), "{problem}");
        assert!(problem.contains("no answer within 2s"), "{problem}");
        // The body while failing (it takes every lock `problem` takes).
        let body = h.body();
        assert_eq!(body.problem.as_deref(), Some(problem.as_str()));
        assert_eq!(body.upstream_failures_in_a_row, UPSTREAM_FAILING_AFTER);
        h.upstream_answered();
        assert_eq!(h.problem(), None);
        h.count(QueryResult::Refused);
        h.count(QueryResult::Malformed);
        let body = h.body();
        assert_eq!(body.queries["refused"], 1);
        assert_eq!(body.queries["malformed"], 1);
        assert_eq!(body.queries["forwarded"], 0);
        assert_eq!(body.listening.as_deref(), Some("0.0.0.0:9853"));
    }

    #[test]
    fn refusal_log_is_rate_limited() {
        let mut pacer = LogPacer::default();
        let start = Instant::now();
        let admitted_at = |pacer: &mut LogPacer, at: Instant, n: usize| -> Vec<Option<u64>> {
            (0..n).map(|_| pacer.admit(at)).collect()
        };
        // A burst: the first LOG_REFUSALS_PER_SECOND lines, nothing held back before them.
        let burst = admitted_at(&mut pacer, start, 1000);
        let limit = LOG_REFUSALS_PER_SECOND as usize;
        assert!(
            burst[..limit].iter().all(|a| *a == Some(0)),
            "{:?}",
            &burst[..limit]
        );
        assert!(burst[limit..].iter().all(Option::is_none));
        // Still the same window just before the second is over.
        let late = start + Duration::from_millis(999);
        assert_eq!(pacer.admit(late), None);
        // The next window's first line carries the count of every line held back.
        let next = start + Duration::from_secs(1);
        assert_eq!(pacer.admit(next), Some(1000 - limit as u64 + 1));
        assert_eq!(pacer.admit(next), Some(0));
        // The sink itself writes through the same pacer.
        let sink = LogRefusals::default();
        let refusal = DnsRefusal {
            src: Ipv4Addr::new(10, 255, 7, 2),
            name: "x.attacker.example.".into(),
            qtype: "A".into(),
            transport: "udp",
            at: SystemTime::now(),
        };
        for _ in 0..=limit {
            sink.refused(&refusal);
        }
        let pacer = sink.pacer.lock().expect("lock");
        assert_eq!(pacer.logged_in_window, LOG_REFUSALS_PER_SECOND);
        assert!(pacer.not_logged >= 1, "{pacer:?}");
    }
}
