//! Blocked attempts as lines in the app's own log stream (`cf logs APP`, its syslog drains),
//! through the cell's Loggregator forwarder agent: one envelope per reported attempt of a known
//! app (`source_id` = the app's guid, `instance_id` = its index, tag `source_type` = `EGRESS`,
//! a `Log` on stdout), at most `[loggregator] lines_per_minute` per app and destination and then
//! one summary line.
//!
//! Never in the way: attribution hands attempts over without waiting (a bounded queue that
//! drops, and counts, when full); the sender runs on its own task, reconnects with backoff, and
//! a missing, slow or hostile forwarder agent touches neither enforcement, the reconcile loop
//! nor readiness (a flag in `/healthz` and the counters say so).

mod client;
mod limit;
mod line;
mod message;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use crate::attribution::{AppAttempt, AttemptSink};
use crate::config::Config;

pub use limit::{Admit, Limiter};
pub use line::{Allowed, line, summary};
pub use message::{Envelope, EnvelopeBatch, Log, LogType, Message};

/// Attempts waiting for the sender; more are dropped and counted.
pub const QUEUE: usize = 1024;
/// Envelopes sent in one call at most.
pub const MAX_BATCH: usize = 100;
/// The `source_type` tag of the lines (`[EGRESS/<index>]` in `cf logs`).
pub const SOURCE_TYPE: &str = "EGRESS";

/// What happened to the lines, since start (`egress_guard_app_logs_total{result}`).
#[derive(Debug, Default)]
pub struct AppLogCounts {
    pub sent: AtomicU64,
    /// Not queued: the queue was full.
    pub dropped: AtomicU64,
    /// Queued, but the forwarder agent could not be reached or refused them.
    pub failed: AtomicU64,
    /// Whether the last send reached the forwarder agent.
    pub connected: AtomicBool,
}

impl AppLogCounts {
    /// (sent, dropped, failed).
    pub fn totals(&self) -> [(&'static str, u64); 3] {
        [
            ("sent", self.sent.load(Ordering::Relaxed)),
            ("dropped", self.dropped.load(Ordering::Relaxed)),
            ("failed", self.failed.load(Ordering::Relaxed)),
        ]
    }
}

/// The attribution side: queues attempts for the sender, never waits.
pub struct AppLogSink {
    queue: mpsc::Sender<AppAttempt>,
    counts: Arc<AppLogCounts>,
}

impl AttemptSink for AppLogSink {
    fn attempt(&self, attempt: AppAttempt) {
        if self.queue.try_send(attempt).is_err() {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Starts the sender when `[loggregator] enabled`; the sink to give attribution and the
/// counts to show. Must be called inside the runtime.
pub fn start(config: &Config) -> Option<(Arc<AppLogSink>, Arc<AppLogCounts>)> {
    if !config.loggregator.enabled {
        return None;
    }
    let counts = Arc::new(AppLogCounts::default());
    let (queue, attempts) = mpsc::channel(QUEUE);
    let allowed = Allowed::new(&config.allowed_networks, &config.dns.allowed_suffixes);
    let lines = Lines::new(allowed, config.loggregator.lines_per_minute);
    tokio::spawn(client::run(
        config.loggregator.clone(),
        attempts,
        lines,
        counts.clone(),
    ));
    tracing::info!(address = %config.loggregator.address,
        per_minute = config.loggregator.lines_per_minute,
        "sending blocked attempts to the apps' log streams");
    Some((
        Arc::new(AppLogSink {
            queue,
            counts: counts.clone(),
        }),
        counts,
    ))
}

/// Attempts -> envelopes, with the per-minute limit (pure apart from the clock it is given).
pub struct Lines {
    allowed: Allowed,
    limiter: Limiter<(String, String), AppAttempt>,
    per_minute: u32,
}

impl Lines {
    pub fn new(allowed: Allowed, per_minute: u32) -> Lines {
        Lines {
            allowed,
            limiter: Limiter::new(per_minute),
            per_minute,
        }
    }

    /// The envelopes one attempt makes now: its line, or nothing while its minute is full
    /// (plus the summary of a window forgotten to make room).
    pub fn attempt(&mut self, attempt: &AppAttempt, now: SystemTime) -> Vec<Envelope> {
        let key = line::destination_key(attempt);
        let (admit, forgotten) = self.limiter.admit(key, attempt, now);
        let mut out: Vec<Envelope> = forgotten
            .iter()
            .map(|(last, more)| envelope(last, summary(last, *more, self.per_minute), now))
            .collect();
        if admit == Admit::Line {
            out.push(envelope(attempt, line(attempt, &self.allowed), attempt.at));
        }
        out
    }

    /// Summary lines of the minutes that are over.
    pub fn due(&mut self, now: SystemTime) -> Vec<Envelope> {
        self.limiter
            .due(now)
            .iter()
            .map(|(last, more)| envelope(last, summary(last, *more, self.per_minute), now))
            .collect()
    }
}

/// The envelope of one line of `attempt`'s app.
pub fn envelope(attempt: &AppAttempt, text: String, at: SystemTime) -> Envelope {
    let nanos = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos();
    Envelope {
        timestamp: i64::try_from(nanos).unwrap_or(i64::MAX),
        source_id: attempt.app_id.clone(),
        instance_id: attempt.instance_index.unwrap_or(0).to_string(),
        tags: HashMap::from([("source_type".to_string(), SOURCE_TYPE.to_string())]),
        message: Some(Message::Log(Log {
            payload: text.into_bytes(),
            r#type: LogType::Out as i32,
        })),
    }
}

#[cfg(test)]
mod tests;
