//! Watches the metadata store's directory and marks the store's change flag.

use crate::change_flag::ChangeFlag;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::Notify;

use notify::{RecursiveMode, Watcher};

/// Watches the store's directory (not the file: silk's pre-start deletes and recreates the
/// directory) and wakes the loop on any change to the store or its siblings.
pub struct StoreWatcher {
    dir: PathBuf,
    watcher: Option<notify::RecommendedWatcher>,
    /// Set by the callback when the directory itself went away and must be watched anew.
    lost: Arc<AtomicBool>,
    trigger: Arc<Notify>,
    changed: Arc<ChangeFlag>,
}

impl StoreWatcher {
    pub fn new(store: &Path, trigger: Arc<Notify>, changed: Arc<ChangeFlag>) -> StoreWatcher {
        let dir = match store.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        StoreWatcher {
            dir,
            watcher: None,
            lost: Arc::new(AtomicBool::new(false)),
            trigger,
            changed,
        }
    }

    /// (Re)establishes the watch if needed; cheap when already watching.
    pub fn ensure(&mut self) {
        if self.lost.swap(false, Ordering::SeqCst) {
            self.watcher = None;
            self.changed.watching(false);
        }
        if self.watcher.is_some() || !self.dir.is_dir() {
            return;
        }
        let trigger = self.trigger.clone();
        let lost = self.lost.clone();
        let dir = self.dir.clone();
        let changed = self.changed.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else {
                // Queue overflow or similar: the store may have changed; look again.
                changed.mark();
                trigger.notify_one();
                return;
            };
            // Our own reads (open, flock, close) show up as access events: ignore them or
            // every pass would trigger the next.
            if event.kind.is_access() || event.kind.is_other() {
                return;
            }
            if event.kind.is_remove() && event.paths.iter().any(|p| p == &dir) {
                lost.store(true, Ordering::SeqCst);
                changed.watching(false);
            }
            changed.mark();
            trigger.notify_one();
        });
        match watcher {
            Ok(mut watcher) => match watcher.watch(&self.dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    tracing::debug!(dir = %self.dir.display(), "watching metadata store directory");
                    self.watcher = Some(watcher);
                    // The store may have changed while unwatched.
                    self.changed.watching(true);
                    self.trigger.notify_one();
                }
                Err(err) => tracing::warn!(dir = %self.dir.display(), error = %err,
                    "cannot watch metadata store directory; relying on the periodic pass"),
            },
            Err(err) => tracing::warn!(error = %err, "cannot create file watcher"),
        }
    }
}
