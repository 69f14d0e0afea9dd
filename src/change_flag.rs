//! A change flag: "changed since last taken", and whether anyone watches for changes at all.
//!
//! Each event watcher (routes and links, the metadata store, the nf_tables ruleset) is handed
//! the flag of its own source and marks it; the reconcile loop takes it. A flag nobody watches
//! (no watcher running, or its socket failed) always reads as changed, so a pass without events
//! reads everything: events only ever save work, never correctness. Every flag starts
//! "changed" so the first pass reads it all.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug)]
pub struct ChangeFlag {
    changed: AtomicBool,
    watched: AtomicBool,
}

impl Default for ChangeFlag {
    fn default() -> Self {
        ChangeFlag {
            changed: AtomicBool::new(true),
            watched: AtomicBool::new(false),
        }
    }
}

impl ChangeFlag {
    /// Whether the source may have changed since the last call; clears the mark.
    pub fn take(&self) -> bool {
        let changed = self.changed.swap(false, Ordering::SeqCst);
        changed || !self.watched.load(Ordering::SeqCst)
    }

    /// What [`ChangeFlag::take`] would return, without clearing it.
    pub fn pending(&self) -> bool {
        self.changed.load(Ordering::SeqCst) || !self.watched.load(Ordering::SeqCst)
    }

    /// The watcher saw a change.
    pub fn mark(&self) {
        self.changed.store(true, Ordering::SeqCst);
    }

    /// The watcher started (true) or stopped (false) watching. Either way the source may have
    /// changed while nobody looked.
    pub fn watching(&self, watched: bool) {
        self.watched.store(watched, Ordering::SeqCst);
        self.mark();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwatched_always_changed_watched_only_when_marked() {
        let flag = ChangeFlag::default();
        assert!(flag.take(), "starts changed");
        assert!(flag.take(), "unwatched: always changed");
        flag.watching(true);
        assert!(flag.pending());
        assert!(flag.take(), "starting to watch marks it");
        assert!(!flag.pending());
        assert!(!flag.take());
        flag.mark();
        assert!(flag.pending(), "pending does not clear");
        assert!(flag.take());
        assert!(!flag.take());
        flag.watching(false);
        assert!(flag.take());
        assert!(flag.take(), "unwatched again: always changed");
    }
}
