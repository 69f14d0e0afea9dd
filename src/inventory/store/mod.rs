//! silk's container metadata store: a locked, bounded read and a lenient-per-entry,
//! strict-per-file parse.
//!
//! The writer (silk's cni-wrapper-plugin) rewrites `store.json` in place under an exclusive
//! `flock` on `store.json_lock`, so a reader must hold a shared lock on the same file or it can
//! see an empty or half-written document. A missing store means "no containers yet" (silk's
//! pre-start deletes the directory on every deploy). A document that does not parse is an error:
//! the caller keeps its last good snapshot. One bad entry is reported and skipped; it can never
//! be exempt, because only entries that parse are ever considered for exemption.
//!
//! Whatever sits at the store's path, a read ends quickly and never holds silk's lock across a
//! wait without a bound: anything but a regular file (a FIFO, a directory, a socket, a device)
//! is refused before it is opened for reading and before the lock is taken, the store and its
//! lock file are opened with `O_NONBLOCK`, the size is bounded ([`MAX_STORE_BYTES`]), the wait
//! for the lock is bounded ([`LOCK_WAIT`]) and so is the read under it ([`READ_DEADLINE`]). The
//! lock is held only around the read. [`read_store`] and a splice parse after it is released; a
//! full read of [`StoreReader`] parses its regions as they are read, under the lock (about 14
//! ms at 5,000 containers, on the first read and once a minute), so that it never holds the
//! whole document; [`READ_DEADLINE`] bounds both.
//!
//! Symbolic links are followed (no `O_NOFOLLOW`): silk itself opens the path with the usual
//! symlink resolution, so following links reads exactly what silk writes, and an operator's
//! link (a data directory moved to another disk) keeps working. Following a link grants
//! nothing: whoever can place a link in silk's directory can write the store itself, and every
//! check above applies to what the link resolves to (the open descriptor is `fstat`ed).
//!
//! This module only reads; it never creates, locks exclusively or writes anything.
//!
//! [`StoreReader`] reads the same way but re-parses only the entries that changed since its
//! last good read; [`read_store`] parses everything every time.
//!
//! - [`file`]: the locked, bounded read of the file (no JSON);
//! - [`blocks`]: block hashes of a document, to find the span that changed;
//! - [`diff`]: reading a document against the last one's hashes;
//! - [`document`]: the layout of a document (its top-level members and where each ends);
//! - [`entry`]: parsing the document and one entry;
//! - [`chunked`]: the whole-document parse fed a region at a time;
//! - [`incremental`]: [`StoreReader`], which re-parses only what changed;
//! - [`watcher`]: the directory watch that marks the store changed.

use file::read_store_bytes_into;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod blocks;
mod chunked;
mod diff;
mod document;
mod entry;
mod file;
mod incremental;
#[cfg(test)]
mod tests;
mod watcher;

pub use entry::{Parsed, parse_store};
pub use incremental::{ReadKind, StoreDelta, StoreReader};
pub use watcher::StoreWatcher;

/// Metadata key Cloud Controller sets to `app`, `task` or `staging`.
pub const WORKLOAD_KEY: &str = "container_workload";
/// Handle prefix of Garden's own health-check containers.
pub const HEALTHCHECK_HANDLE_PREFIX: &str = "check-";
/// Largest store accepted, 32 MiB: about ten times a real store at 5,000 containers (~3 MB),
/// small enough that a pass never allocates more than that for it.
pub const MAX_STORE_BYTES: u64 = 32 * 1024 * 1024;
/// Longest wait for silk's writer to release its exclusive lock (a write takes well under 1 ms).
pub const LOCK_WAIT: Duration = Duration::from_millis(200);
/// Longest the read of the store may take while it holds silk's lock. A real store (~3 MB at
/// 5,000 containers) reads in a few milliseconds from the page cache and well under 100 ms
/// from a cold disk; beyond this the read is abandoned, the lock released, and the caller keeps
/// its last good inventory. silk's next CNI ADD or DEL waits at most this long for the agent.
pub const READ_DEADLINE: Duration = Duration::from_millis(500);
/// Poll period while waiting for the lock. Short: a pass woken by the first write event waits
/// here for silk to finish the write (a few ms at thousands of containers), and every poll
/// period of overshoot adds to the time a new staging container waits for its exemption.
const LOCK_RETRY: Duration = Duration::from_micros(250);
/// Bytes read per `read` call; the read deadline is checked between calls.
const READ_CHUNK: usize = 256 * 1024;

/// One container as the store describes it. The strings are shared (`Arc<str>`) with the
/// policy's decision about the container, which repeats them: one copy of each at 5,000
/// containers, not two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreEntry {
    /// Garden container handle (the store's key).
    pub handle: Arc<str>,
    /// Overlay IP silk gave the container.
    pub ip: Ipv4Addr,
    /// `container_workload`, when present and a string.
    pub workload: Option<Arc<str>>,
    /// Selected Cloud Controller ids, for operators (`status`, `explain`).
    pub app_id: Option<Arc<str>>,
    pub space_id: Option<Arc<str>>,
    pub org_id: Option<Arc<str>>,
    /// The app instance's index, from the `index` of Diego's `log_config` (a JSON string in
    /// the metadata): the instance id of the app's log lines.
    pub log_index: Option<u32>,
}

/// An entry that could not be used, and why. It stays restricted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryProblem {
    pub handle: String,
    pub reason: String,
}

/// A parsed store: usable entries (sorted by handle) plus the entries that were skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreSnapshot {
    pub entries: Vec<StoreEntry>,
    pub problems: Vec<EntryProblem>,
}

impl StoreSnapshot {
    /// The snapshot of entries parsed one by one (usable ones, and problems, by handle).
    pub fn from_parsed(entries: &BTreeMap<String, Parsed>) -> StoreSnapshot {
        let mut snapshot = StoreSnapshot::default();
        for (handle, parsed) in entries {
            match parsed {
                Ok(entry) => snapshot.entries.push(entry.clone()),
                Err(reason) => snapshot.problems.push(EntryProblem {
                    handle: handle.clone(),
                    reason: reason.clone(),
                }),
            }
        }
        snapshot
    }
}

/// Why the store as a whole could not be read. Enforcement never loosens on these.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read metadata store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open metadata store {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot stat metadata store {path}: {source}")]
    Stat {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("metadata store {path} is {kind}, not a regular file; refusing to read it")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("cannot take shared lock on {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("metadata store lock {path} is {kind}, not a regular file; refusing to use it")]
    LockNotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} stayed locked by the store's writer for over {LOCK_WAIT:?}")]
    Busy { path: PathBuf },
    #[error(
        "metadata store {path} is {size} bytes ({}), over the limit of {limit} bytes ({}); \
         refusing to read it",
        mib(*size),
        mib(*limit)
    )]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error(
        "metadata store {path} grew past the limit of {limit} bytes ({}) while being read",
        mib(*limit)
    )]
    GrewTooLarge { path: PathBuf, limit: u64 },
    #[error(
        "reading metadata store {path} took over {deadline:?} ({read} bytes read); gave up and \
         released its lock"
    )]
    ReadTimeout {
        path: PathBuf,
        deadline: Duration,
        read: u64,
    },
    #[error(
        "metadata store {path} changed length while read under its lock (a writer that ignores \
         silk's lock?); keeping the last good read"
    )]
    ChangedWhileRead { path: PathBuf },
    #[error("metadata store {path} is not valid JSON: {message}")]
    Malformed { path: PathBuf, message: String },
    #[error("metadata store {path} is not a JSON object keyed by container handle (found {found})")]
    WrongShape { path: PathBuf, found: &'static str },
}

/// A byte count in MiB, for messages.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The lock file silk's writer holds exclusively while rewriting `store`.
pub fn lock_path(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push("_lock");
    PathBuf::from(name)
}

/// Reads and parses the store under a shared flock on its `_lock` sibling.
///
/// Blocking (call it off the async workers), but bounded: at most [`LOCK_WAIT`] for the lock
/// plus [`READ_DEADLINE`] for the read, whatever is at `path`. The lock file is opened
/// read-only and never created: if it does not exist no writer is using the protocol (or the
/// directory was just wiped), and the parse still rejects a torn document.
pub fn read_store(path: &Path) -> Result<StoreSnapshot, StoreError> {
    let mut bytes = Vec::new();
    if read_store_bytes_into(path, &mut bytes)? {
        parse_store(path, &bytes)
    } else {
        Ok(StoreSnapshot::default())
    }
}
