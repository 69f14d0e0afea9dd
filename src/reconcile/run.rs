//! The loop itself: a pass on start, on every event and every `reconcile_interval`, until the
//! caller's shutdown signal. What it reads from is wired by the daemon.

use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::Notify;

use super::Reconciler;
use crate::config::Config;
use crate::inventory::store::StoreWatcher;

/// How often free heap memory is handed back to the kernel.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Runs passes until `shutdown` resolves: on every wake of `trigger` (the event watchers'),
/// every `reconcile_interval`, and once at start. Stopping leaves the persistent table in
/// place; the owned table goes with the reconciler's socket when it is dropped.
/// A configuration from `reloads` (a SIGHUP's, validated) takes effect with the next pass,
/// which runs at once.
pub async fn run_until_stopped(
    reconciler: &mut Reconciler,
    trigger: &Notify,
    store_watcher: &mut StoreWatcher,
    reloads: &mut tokio::sync::mpsc::Receiver<Config>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut ticker = tokio::time::interval(reconciler.config.reconcile_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut last_trim = Instant::now();
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            // An answer waits for this: ahead of everything else, and no pass after it unless
            // one is due (an event or the timer), so that a flood of answers cannot hold up
            // passes (a staging container's exemption) for long.
            Some(request) = reconciler.next_learn() => {
                reconciler.learn(request).await;
                let due = trigger.notified().now_or_never().is_some()
                    || ticker.tick().now_or_never().is_some();
                if !due {
                    continue;
                }
            }
            _ = ticker.tick() => {}
            // No wait for the rest of a burst: it would add to the time a new staging
            // container waits for its exemption. Events that arrive during a pass are taken
            // together by the next, and a store write's own events by the read that waited
            // for it under silk's lock (see `Reconciler::new_store_reader`). The yield lets
            // the watchers take what is already queued.
            () = trigger.notified() => tokio::task::yield_now().await,
            Some(config) = reloads.recv() => reconciler.reload(config),
        }
        store_watcher.ensure();
        // Every wait inside a pass is bounded, but stopping need not wait for one: a batch is
        // atomic in the kernel whether or not its answer is read.
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            _ = reconciler.pass() => {}
        }
        if last_trim.elapsed() >= TRIM_EVERY {
            release_free_memory();
            last_trim = Instant::now();
        }
    }
}

/// Returns freed heap pages to the kernel: a pass at thousands of containers allocates a few
/// MB of temporaries, which glibc would otherwise keep resident.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
