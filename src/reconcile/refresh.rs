//! The first step of a pass: which inputs changed, and reading those that did (the store,
//! keeping the last good one on error; link names; routes).

use std::collections::BTreeMap;

use super::{Reads, Reconciler, VERIFY_EVERY};
use crate::inventory::store::{self, StoreDelta, StoreReader};
use crate::policy::Dirty;

impl Reconciler {
    /// Which inputs to read. A *verifying* pass reads everything: the first pass, any pass
    /// after a failure, and one every [`VERIFY_EVERY`] intervals, so that even a lost event
    /// costs at most that long. Every flag is taken now, before reading, so changes made while
    /// the pass reads are seen by the next one.
    pub(super) fn take_changes(&mut self) -> Reads {
        let verify = self.last_written.is_none()
            || !self.last_pass_ok
            || self
                .last_verified
                .is_none_or(|at| at.elapsed() >= self.config.reconcile_interval * VERIFY_EVERY);
        // Routes take their own flag in `refresh_routes` (after draining their queue), the
        // store reader the store's once it holds silk's lock.
        Reads {
            store: self.changes.store.pending() || verify,
            links: self.changes.kernel.take_links() || verify,
            ruleset: self.changes.ruleset.take() || verify,
            verify,
        }
    }

    /// Re-reads the store when it changed (all of it on a verifying pass, otherwise what
    /// differs from the last read); on error keeps the last good one. Returns whether the read
    /// failed.
    pub(super) async fn refresh_store(
        &mut self,
        reads: Reads,
        dirty: &mut Dirty,
        errors: &mut Vec<String>,
    ) -> bool {
        if !reads.store {
            return false;
        }
        let had_read = self.store.last_read().is_some();
        let placeholder = self.new_store_reader();
        // Parsing a store of thousands of containers takes milliseconds on another thread:
        // answers of hostname rules are served meanwhile.
        let reading = read_store_blocking(
            std::mem::replace(&mut self.store, placeholder),
            reads.verify,
        );
        let (reader, result) = self.serving_learns(reading).await;
        match reader {
            Some(reader) => self.store = reader,
            // The reader was lost with its thread: start again from nothing (restrictive; the
            // next read parses the whole store), and evaluate every decision again.
            None => dirty.all |= had_read,
        }
        match result {
            Ok(delta) => {
                note_store_changes(delta, dirty);
                false
            }
            Err(err) => {
                tracing::error!(error = %err, entries_kept = self.store.entries().len(),
                    "metadata store unreadable; keeping last good inventory, rules unchanged in strictness");
                errors.push(err.to_string());
                true
            }
        }
    }

    /// Link names and host routes into the overlay: each a dump when its cache cannot be
    /// trusted (a verifying pass, an overrun), otherwise the events queued since the last pass.
    /// What changed goes into `dirty`.
    pub(super) async fn refresh_kernel(
        &mut self,
        reads: Reads,
        dirty: &mut Dirty,
        errors: &mut Vec<String>,
    ) {
        self.refresh_links(reads.links, dirty, errors).await;
        self.refresh_routes(reads.verify, dirty, errors).await;
        if self.changes.kernel.take_routes6() || reads.verify {
            self.ipv6_in_use = crate::inventory::kernel::ipv6_in_use();
            let routes6 = match self.kernel.routes6().await {
                Ok(routes6) => routes6,
                Err(err) => {
                    // Fail closed: no IPv6 exemption until a dump succeeds.
                    tracing::error!(error = %err, "cannot list IPv6 routes; no container is exempt over IPv6 this pass");
                    errors.push(err.to_string());
                    BTreeMap::new()
                }
            };
            dirty.routes6 |= routes6 != self.routes6;
            self.routes6 = routes6;
        }
    }

    pub(super) async fn refresh_links(
        &mut self,
        dump: bool,
        dirty: &mut Dirty,
        errors: &mut Vec<String>,
    ) {
        if dump {
            match self.kernel.links().await {
                Ok(links) => {
                    dirty.links.extend(changed_keys(&self.links, &links));
                    self.links = links;
                }
                Err(err) => {
                    tracing::error!(error = %err, "cannot list links");
                    errors.push(err.to_string());
                }
            }
        }
        // Link events since then, in order (after a dump too: replaying converges).
        for (index, name) in self.changes.kernel.drain_link_updates() {
            let changed = match name {
                Some(name) => self.links.insert(index, name.clone()).as_ref() != Some(&name),
                None => self.links.remove(&index).is_some(),
            };
            if changed {
                dirty.links.insert(index);
            }
        }
    }

    pub(super) async fn refresh_routes(
        &mut self,
        dump: bool,
        dirty: &mut Dirty,
        errors: &mut Vec<String>,
    ) {
        let overlay = self.config.overlay_network;
        let dumped = match self
            .kernel
            .refresh_routes(&mut self.routes, &self.changes.kernel, dump)
            .await
        {
            Ok(dumped) => dumped,
            Err(err) => {
                // The table is now empty (fail closed) and the next pass dumps.
                tracing::error!(error = %err, "cannot list routes; no container is exempt this pass");
                errors.push(err.to_string());
                true
            }
        };
        let touched = self.routes.take_touched();
        if dumped {
            let routes = self.routes.containers(overlay);
            dirty
                .routes
                .extend(changed_keys(&self.container_routes, &routes));
            self.container_routes = routes;
            return;
        }
        for ip in touched {
            let now = self.routes.container(ip, overlay);
            let before = match now {
                Some(ifindex) => self.container_routes.insert(ip, ifindex),
                None => self.container_routes.remove(&ip),
            };
            if before != now {
                dirty.routes.insert(ip);
            }
        }
    }
}

/// The keys whose values differ between `before` and `after` (present in one only, or with
/// another value).
fn changed_keys<'a, K: Ord + Copy, V: PartialEq>(
    before: &'a BTreeMap<K, V>,
    after: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = K> + 'a {
    let gone = before.keys().filter(|k| !after.contains_key(k));
    let new_or_changed = after
        .iter()
        .filter(|(k, v)| before.get(k) != Some(v))
        .map(|(k, _)| k);
    gone.chain(new_or_changed).copied()
}

/// Logs entries that became unusable and marks every changed handle for the planner.
fn note_store_changes(delta: StoreDelta, dirty: &mut Dirty) {
    for (handle, parsed) in delta.changed {
        if let Some(Err(reason)) = &parsed {
            tracing::warn!(handle = %handle, reason = %reason,
                "metadata store entry is unusable; container stays restricted");
        }
        dirty.handles.insert(handle);
    }
}

/// Reads the store on a blocking thread (flock can wait while silk writes, bounded; keep it off
/// the async workers) and hands the reader back with the result (None: lost with its thread).
async fn read_store_blocking(
    mut reader: StoreReader,
    full: bool,
) -> (Option<StoreReader>, Result<StoreDelta, store::StoreError>) {
    let path = reader.path().to_path_buf();
    match tokio::task::spawn_blocking(move || {
        let result = reader.read(full);
        (reader, result)
    })
    .await
    {
        Ok((reader, result)) => (Some(reader), result),
        Err(join) => (
            None,
            Err(store::StoreError::Io {
                path,
                source: std::io::Error::other(join.to_string()),
            }),
        ),
    }
}
