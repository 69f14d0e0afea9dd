//! The attribution task (the edge): NFLOG -> [`Blocked::ingest`](super::Blocked::ingest) -> log
//! events, and the summary line every period.

use std::time::SystemTime;

use super::nflog::{self, NflogSocket};
use super::{
    log::{log_new, log_period},
    state::{Ingested, SUMMARY_PERIOD, SharedBlocked},
};

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
