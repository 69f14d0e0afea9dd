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
//! last good read (see `store/incremental.rs`); [`read_store`] parses everything every time.

use std::collections::BTreeMap;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{ErrorKind, Read};
use std::net::Ipv4Addr;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use serde_json::value::RawValue;

mod blocks;
mod chunked;
mod incremental;
mod watcher;

use blocks::{BLOCK, Compared, DocHashes, Hashing};
pub use incremental::{Parsed, ReadKind, StoreDelta, StoreReader};
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

/// Reads the store's bytes into `buf` under the shared lock: true if there is a store (its bytes
/// are then all of `buf`), false if there is none (`buf` then holds nothing meaningful). `buf` is
/// reused as it is, see [`read_bounded_into`]. On error `buf` holds nothing meaningful either.
fn read_store_bytes_into(path: &Path, buf: &mut Vec<u8>) -> Result<bool, StoreError> {
    let read = read_locked(path, &|| {}, |file, size| {
        read_bounded_into(file, path, size, MAX_STORE_BYTES, READ_DEADLINE, buf)
    })?;
    Ok(read.is_some())
}

/// The store as read now, compared with the document `old` describes: see [`NewDoc`]. None if
/// there is no store. The file is read in chunks of [`READ_CHUNK`] through `chunk` and hashed
/// as it is read; `keep` then chooses, from how it compares with `old`, which span to read again
/// and keep (None: all of it, kept as it is first read). The same bounds as [`read_store`]; a
/// file whose length changes while it is read under silk's lock (a writer that ignores the lock)
/// is an error: the caller keeps its last good read and tries again. `caught_up`: see
/// [`read_locked`].
pub(crate) fn read_store_diff(
    path: &Path,
    old: &DocHashes,
    chunk: &mut Vec<u8>,
    keep: Keep<'_, impl FnOnce(Compared) -> (usize, usize)>,
    caught_up: &dyn Fn(),
) -> Result<Option<NewDoc>, StoreError> {
    read_locked(path, caught_up, |file, size| {
        diff_file(&file, path, size, old, chunk, keep, READ_DEADLINE)
    })
}

/// [`read_store_diff`]'s read of the open store, `size` bytes by `fstat` under the lock.
fn diff_file(
    file: &File,
    path: &Path,
    size: u64,
    old: &DocHashes,
    chunk: &mut Vec<u8>,
    keep: Keep<'_, impl FnOnce(Compared) -> (usize, usize)>,
    deadline: Duration,
) -> Result<NewDoc, StoreError> {
    let len = usize::try_from(size).map_err(|_| StoreError::TooLarge {
        path: path.to_path_buf(),
        size,
        limit: MAX_STORE_BYTES,
    })?;
    let mut pieces = FilePieces {
        file,
        path,
        len,
        chunk,
        started: Instant::now(),
        deadline,
        read: 0,
    };
    let new = split_doc(&mut pieces, old, keep)?;
    ensure_ends_at(file, path, size)?;
    Ok(new)
}

/// [`read_store_diff`] of a document held in memory (tests and benchmarks).
pub(crate) fn diff_bytes(
    bytes: &[u8],
    old: &DocHashes,
    keep: Keep<'_, impl FnOnce(Compared) -> (usize, usize)>,
) -> NewDoc {
    match split_doc(&mut BytePieces(bytes), old, keep) {
        Ok(new) => new,
        Err(never) => match never {},
    }
}

/// What a read keeps of the document besides its hashes.
pub(crate) enum Keep<'a, F> {
    /// The span this chooses from how the document compares with the old one: (bytes from the
    /// start, bytes from the end) left out, each at most what is common.
    Span(F),
    /// Every byte, given to the sink in order as it is read.
    Whole(&'a mut dyn Sink),
}

/// Takes a document's bytes in order, a piece at a time.
pub(crate) trait Sink {
    fn take(&mut self, piece: &[u8]);
}

impl Sink for Vec<u8> {
    fn take(&mut self, piece: &[u8]) {
        self.extend_from_slice(piece);
    }
}

/// A document as read: its hashes, and its bytes `prefix .. len - suffix`, the span
/// [`Keep::Span`] chose (with [`Keep::Whole`], none: the sink took them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewDoc {
    pub hashes: DocHashes,
    pub prefix: usize,
    pub suffix: usize,
    pub middle: Vec<u8>,
}

impl NewDoc {
    pub(crate) fn len(&self) -> usize {
        self.hashes.len
    }
}

/// A document's bytes, a piece at a time.
trait Pieces {
    type Error;
    fn len(&self) -> usize;
    /// Bytes `at .. at + n` (at most [`READ_CHUNK`]).
    fn piece(&mut self, at: usize, n: usize) -> Result<&[u8], Self::Error>;
}

struct BytePieces<'a>(&'a [u8]);

impl Pieces for BytePieces<'_> {
    type Error = std::convert::Infallible;
    fn len(&self) -> usize {
        self.0.len()
    }
    fn piece(&mut self, at: usize, n: usize) -> Result<&[u8], Self::Error> {
        Ok(&self.0[at..at + n])
    }
}

/// The store file under silk's lock, `len` bytes by `fstat`, read within `deadline`.
struct FilePieces<'a> {
    file: &'a File,
    path: &'a Path,
    len: usize,
    chunk: &'a mut Vec<u8>,
    started: Instant,
    deadline: Duration,
    read: u64,
}

impl Pieces for FilePieces<'_> {
    type Error = StoreError;
    fn len(&self) -> usize {
        self.len
    }
    fn piece(&mut self, at: usize, n: usize) -> Result<&[u8], StoreError> {
        if self.started.elapsed() > self.deadline {
            return Err(StoreError::ReadTimeout {
                path: self.path.to_path_buf(),
                deadline: self.deadline,
                read: self.read,
            });
        }
        self.chunk.resize(n.max(self.chunk.len()), 0);
        let buf = &mut self.chunk[..n];
        read_exact_at(self.file, buf, at as u64)
            .map_err(|source| changed_or_io(self.path, source))?;
        self.read += n as u64;
        Ok(buf)
    }
}

/// Hashes the whole document, compares it with `old`, and reads the span `keep` chooses (or
/// gives every byte to its sink as it is hashed).
fn split_doc<P: Pieces>(
    pieces: &mut P,
    old: &DocHashes,
    mut keep: Keep<'_, impl FnOnce(Compared) -> (usize, usize)>,
) -> Result<NewDoc, P::Error> {
    let len = pieces.len();
    let mut hashing = Hashing::new(len, old.block());
    let mut at = 0;
    while at < len {
        let n = READ_CHUNK.min(len - at);
        let piece = pieces.piece(at, n)?;
        hashing.feed(piece);
        if let Keep::Whole(sink) = &mut keep {
            sink.take(piece);
        }
        at += n;
    }
    let hashes = hashing.finish();
    let Keep::Span(keep) = keep else {
        return Ok(NewDoc {
            hashes,
            prefix: len,
            suffix: 0,
            middle: Vec::new(),
        });
    };
    let compared = hashes.compare(old);
    let (start, end_left) = keep(compared);
    let (prefix, suffix) = (start.min(compared.prefix), end_left.min(compared.suffix));
    let end = len - suffix;
    let mut middle = Vec::with_capacity(end - prefix);
    let mut at = prefix;
    while at < end {
        let n = READ_CHUNK.min(end - at);
        middle.extend_from_slice(pieces.piece(at, n)?);
        at += n;
    }
    Ok(NewDoc {
        hashes,
        prefix,
        suffix,
        middle,
    })
}

/// The file must end where `fstat` said under the lock: anything after is a write under it.
fn ensure_ends_at(file: &File, path: &Path, size: u64) -> Result<(), StoreError> {
    let mut probe = [0u8; 1];
    match file.read_at(&mut probe, size) {
        Ok(0) => Ok(()),
        Ok(_) => Err(StoreError::ChangedWhileRead {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(StoreError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Opens the store (refusing what is not one), takes silk's lock shared, runs `read` on the
/// file and its size, and releases the lock. None if there is no store.
///
/// `caught_up` is called once what is read next includes every write made so far: with the
/// lock held (or with no store at all), before the first byte is read, unless the path no
/// longer names the file opened (replaced meanwhile: the next read opens the new one).
fn read_locked<T>(
    path: &Path,
    caught_up: &dyn Fn(),
    read: impl FnOnce(File, u64) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let Some((file, _)) = open_store(path)? else {
        caught_up();
        return Ok(None);
    };
    // The lock is taken only now, and only around the read: a store refused above never
    // touches silk's lock.
    let lock_file = lock_path(path);
    let guard = match open_regular(&lock_file) {
        Ok(Some(file)) => Some(lock_shared_bounded(file, &lock_file)?),
        Ok(None) => None,
        Err(OpenFailure::NotRegular(kind)) => {
            return Err(StoreError::LockNotRegular {
                path: lock_file,
                kind,
            });
        }
        Err(OpenFailure::Stat(source) | OpenFailure::Open(source)) => {
            return Err(StoreError::Lock {
                path: lock_file,
                source,
            });
        }
    };
    if names_file(path, &file) {
        caught_up();
    }
    // The size again, now that the writer is done: the one taken before the lock (to refuse a
    // huge file without touching silk's lock) can be from the middle of a write.
    let result = locked_size(&file, path).and_then(|size| read(file, size));
    // Released before the caller parses what it kept.
    drop(guard);
    result.map(Some)
}

/// Whether `path` (symlinks followed) still names the open `file`.
fn names_file(path: &Path, file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), file.metadata()) {
        (Ok(named), Ok(open)) => (named.dev(), named.ino()) == (open.dev(), open.ino()),
        _ => false,
    }
}

/// The open store's size, by `fstat`.
fn size_of(file: &File, path: &Path) -> Result<u64, StoreError> {
    let meta = file.metadata().map_err(|source| StoreError::Stat {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(meta.len())
}

/// The store's size under the lock.
fn locked_size(file: &File, path: &Path) -> Result<u64, StoreError> {
    let size = size_of(file, path)?;
    if size > MAX_STORE_BYTES {
        return Err(StoreError::GrewTooLarge {
            path: path.to_path_buf(),
            limit: MAX_STORE_BYTES,
        });
    }
    Ok(size)
}

/// `pread` of exactly `buf.len()` bytes at `at`; a short file is `UnexpectedEof`.
fn read_exact_at(file: &File, mut buf: &mut [u8], mut at: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, at) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                at += n as u64;
            }
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn changed_or_io(path: &Path, source: std::io::Error) -> StoreError {
    if source.kind() == ErrorKind::UnexpectedEof {
        StoreError::ChangedWhileRead {
            path: path.to_path_buf(),
        }
    } else {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Opens the store if it is a regular file within the size limit: its descriptor and size.
fn open_store(path: &Path) -> Result<Option<(File, u64)>, StoreError> {
    let file = match open_regular(path) {
        Ok(Some(file)) => file,
        Ok(None) => return Ok(None),
        Err(OpenFailure::NotRegular(kind)) => {
            return Err(StoreError::NotRegular {
                path: path.to_path_buf(),
                kind,
            });
        }
        Err(OpenFailure::Stat(source)) => {
            return Err(StoreError::Stat {
                path: path.to_path_buf(),
                source,
            });
        }
        Err(OpenFailure::Open(source)) => {
            return Err(StoreError::Open {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let size = size_of(&file, path)?;
    if size > MAX_STORE_BYTES {
        return Err(StoreError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit: MAX_STORE_BYTES,
        });
    }
    Ok(Some((file, size)))
}

/// Why [`open_regular`] gave no file.
enum OpenFailure {
    NotRegular(&'static str),
    Stat(std::io::Error),
    Open(std::io::Error),
}

/// Opens `path` read-only without ever blocking, if (after following symlinks) it is a regular
/// file; None if it does not exist (a dangling symlink included).
///
/// The type is checked twice: with `stat` before opening, so that a FIFO, socket or device is
/// never opened at all (opening a device can have side effects), and with `fstat` on the open
/// descriptor, because the path can be replaced in between. `O_NONBLOCK` makes the open of a
/// FIFO that appears in that window return at once instead of waiting for a writer.
fn open_regular(path: &Path) -> Result<Option<File>, OpenFailure> {
    match std::fs::metadata(path) {
        Ok(meta) => ensure_regular(&meta)?,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(OpenFailure::Stat(err)),
    }
    let file = match open_nonblocking(path) {
        Ok(file) => file,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(OpenFailure::Open(err)),
    };
    let meta = file.metadata().map_err(OpenFailure::Stat)?;
    ensure_regular(&meta)?;
    Ok(Some(file))
}

/// `open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC)` (std adds `O_CLOEXEC`, so nft
/// children never inherit the descriptor or its lock). Never waits, whatever `path` is.
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
}

fn ensure_regular(meta: &Metadata) -> Result<(), OpenFailure> {
    let kind = meta.file_type();
    if kind.is_file() {
        return Ok(());
    }
    Err(OpenFailure::NotRegular(if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else {
        "of an unknown file type"
    }))
}

/// Reads all of `reader`, refusing more than `limit` bytes and giving up once `deadline` has
/// passed (checked between reads of at most [`READ_CHUNK`] bytes). `size_hint` (the size
/// `fstat` gave) only sizes the buffer. `path` is only used in error messages.
#[cfg(test)]
fn read_bounded(
    reader: impl Read,
    path: &Path,
    size_hint: u64,
    limit: u64,
    deadline: Duration,
) -> Result<Vec<u8>, StoreError> {
    let mut bytes = Vec::new();
    read_bounded_into(reader, path, size_hint, limit, deadline, &mut bytes)?;
    Ok(bytes)
}

/// [`read_bounded`] into `buf`, which on success holds exactly the bytes read.
///
/// Whatever `buf` holds on entry is overwritten in place, not cleared first: a buffer kept across
/// reads (the incremental reader's) is then neither reallocated nor zeroed again, only grown by
/// the difference. Reads go straight into it, with no intermediate chunk. On error its contents
/// are meaningless.
fn read_bounded_into(
    mut reader: impl Read,
    path: &Path,
    size_hint: u64,
    limit: u64,
    deadline: Duration,
    buf: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let started = Instant::now();
    // The whole file plus one byte, so that end of file is seen without growing.
    let wanted = usize::try_from(size_hint.min(limit).saturating_add(1)).unwrap_or(READ_CHUNK);
    if buf.len() < wanted {
        buf.resize(wanted, 0);
    }
    let mut filled = 0;
    loop {
        if started.elapsed() > deadline {
            return Err(StoreError::ReadTimeout {
                path: path.to_path_buf(),
                deadline,
                read: filled as u64,
            });
        }
        // Never read into an empty slice: its Ok(0) would look like end of file.
        if filled == buf.len() {
            buf.resize(filled + READ_CHUNK, 0);
        }
        let end = buf.len().min(filled + READ_CHUNK);
        match reader.read(&mut buf[filled..end]) {
            Ok(0) => {
                buf.truncate(filled);
                return Ok(());
            }
            Ok(n) => {
                filled += n;
                if filled as u64 > limit {
                    return Err(StoreError::GrewTooLarge {
                        path: path.to_path_buf(),
                        limit,
                    });
                }
            }
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(StoreError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}

/// Takes a shared flock, waiting at most [`LOCK_WAIT`]. A writer that holds the lock longer
/// (stuck or slow) must not stall the reconcile pass: the caller keeps its last good inventory
/// and still repairs the rules.
fn lock_shared_bounded(
    mut file: File,
    lock_file: &Path,
) -> Result<nix::fcntl::Flock<File>, StoreError> {
    use nix::errno::Errno;
    use nix::fcntl::{Flock, FlockArg};
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(guard) => return Ok(guard),
            Err((returned, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                file = returned;
                std::thread::sleep(LOCK_RETRY);
            }
            Err((_, Errno::EWOULDBLOCK)) => {
                return Err(StoreError::Busy {
                    path: lock_file.to_path_buf(),
                });
            }
            Err((_, errno)) => {
                return Err(StoreError::Lock {
                    path: lock_file.to_path_buf(),
                    source: std::io::Error::from(errno),
                });
            }
        }
    }
}

/// Parses the store's bytes. `path` is only used in error messages.
///
/// An empty (or all-whitespace) file is an empty store, as silk itself treats it. Entries are
/// first split off as raw JSON text, so one malformed entry is reported on its own; each entry
/// is then decoded into just the fields the agent uses (large values such as `log_config` are
/// skipped, not built).
pub fn parse_store(path: &Path, bytes: &[u8]) -> Result<StoreSnapshot, StoreError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(StoreSnapshot::default());
    }
    let malformed = |err: serde_json::Error| StoreError::Malformed {
        path: path.to_path_buf(),
        message: err.to_string(),
    };
    let map: BTreeMap<String, &RawValue> = match serde_json::from_slice(bytes) {
        Ok(map) => map,
        Err(err) if err.is_data() => {
            // Valid JSON of the wrong shape, or invalid JSON: tell them apart for the message.
            let document: Value = serde_json::from_slice(bytes).map_err(malformed)?;
            return Err(StoreError::WrongShape {
                path: path.to_path_buf(),
                found: json_kind(&document),
            });
        }
        Err(err) => return Err(malformed(err)),
    };

    let mut snapshot = StoreSnapshot::default();
    // The map is ordered by key, so entries come out sorted by handle.
    for (handle, raw) in map {
        match parse_entry(&handle, raw) {
            Ok(entry) => snapshot.entries.push(entry),
            Err(reason) => snapshot.problems.push(EntryProblem { handle, reason }),
        }
    }
    Ok(snapshot)
}

/// The fields of an entry the agent reads; every other key is skipped without being built.
#[derive(serde::Deserialize)]
struct RawEntry<'a> {
    ip: Option<Value>,
    #[serde(borrow)]
    metadata: Option<&'a RawValue>,
}

/// The metadata keys the agent reads.
#[derive(serde::Deserialize, Default)]
struct RawMetadata {
    container_workload: Option<Value>,
    app_id: Option<Value>,
    space_id: Option<Value>,
    org_id: Option<Value>,
}

fn parse_entry(handle: &str, raw: &RawValue) -> Result<StoreEntry, String> {
    let entry: RawEntry = serde_json::from_str(raw.get()).map_err(|_| {
        let kind = serde_json::from_str::<Value>(raw.get())
            .map(|v| json_kind(&v))
            .unwrap_or("malformed");
        format!("entry is {kind}, not an object")
    })?;
    let ip = match &entry.ip {
        Some(Value::String(text)) => text
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("`ip` {text:?} is not an IPv4 address"))?,
        Some(Value::Null) | None => return Err("entry has no `ip`".to_string()),
        Some(other) => return Err(format!("`ip` is {}, not a string", json_kind(other))),
    };
    let metadata: RawMetadata = match entry.metadata.map(RawValue::get) {
        None | Some("null") => RawMetadata::default(),
        Some(text) if text.starts_with('{') => {
            serde_json::from_str(text).map_err(|err| format!("`metadata` is unreadable: {err}"))?
        }
        Some(text) => {
            let kind = serde_json::from_str::<Value>(text)
                .map(|v| json_kind(&v))
                .unwrap_or("malformed");
            return Err(format!("`metadata` is {kind}, not an object"));
        }
    };
    let text = |key: &str, value: Option<Value>| -> Result<Option<Arc<str>>, String> {
        match value {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.into())),
            Some(other) => Err(format!(
                "metadata `{key}` is {}, not a string",
                json_kind(&other)
            )),
        }
    };
    Ok(StoreEntry {
        handle: handle.into(),
        ip,
        workload: text(WORKLOAD_KEY, metadata.container_workload)?,
        app_id: text("app_id", metadata.app_id)?,
        space_id: text("space_id", metadata.space_id)?,
        org_id: text("org_id", metadata.org_id)?,
    })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SILK_STORE: &str = r#"{
      "6f2c0a6e-6d5e-4b1f-7a3c-1d2e": {
        "handle": "6f2c0a6e-6d5e-4b1f-7a3c-1d2e",
        "ip": "10.255.12.3",
        "metadata": {
          "app_id": "a1", "space_id": "s1", "org_id": "o1", "policy_group_id": "a1",
          "ports": "8080,2222", "container_workload": "app", "log_config": "{\"guid\":\"a1\"}"
        }
      },
      "check-7c1d": {"handle": "check-7c1d", "ip": "10.255.12.4", "metadata": {"healthcheck": "true"}},
      "aaa-staging": {"handle": "aaa-staging", "ip": "10.255.12.5",
                      "metadata": {"container_workload": "staging", "app_id": "a2"}}
    }"#;

    fn parse(text: &str) -> Result<StoreSnapshot, StoreError> {
        parse_store(Path::new("/test/store.json"), text.as_bytes())
    }

    #[test]
    fn parses_silk_format_sorted_by_handle() {
        let snapshot = parse(SILK_STORE).expect("valid store");
        assert!(snapshot.problems.is_empty());
        let handles: Vec<_> = snapshot.entries.iter().map(|e| &*e.handle).collect();
        assert_eq!(
            handles,
            ["6f2c0a6e-6d5e-4b1f-7a3c-1d2e", "aaa-staging", "check-7c1d"]
        );
        let app = &snapshot.entries[0];
        assert_eq!(app.ip, Ipv4Addr::new(10, 255, 12, 3));
        assert_eq!(app.workload.as_deref(), Some("app"));
        assert_eq!(app.app_id.as_deref(), Some("a1"));
        assert_eq!(app.org_id.as_deref(), Some("o1"));
        assert_eq!(snapshot.entries[2].workload, None);
    }

    #[test]
    fn empty_file_and_empty_object_are_no_containers() {
        for text in ["", "  \n", "{}"] {
            assert_eq!(parse(text).expect("empty store"), StoreSnapshot::default());
        }
    }

    #[test]
    fn truncated_and_half_written_files_are_errors() {
        let half = &SILK_STORE[..SILK_STORE.len() / 2];
        for text in [
            half,
            "{",
            "{\"a\": {\"ip\": \"10.255.0.1\"",
            "\0\0\0\0",
            "nul",
        ] {
            let err = parse(text).expect_err("torn document must not parse");
            assert!(
                matches!(err, StoreError::Malformed { .. }),
                "{text:?}: {err}"
            );
            assert!(err.to_string().contains("/test/store.json"), "{err}");
        }
    }

    #[test]
    fn wrong_top_level_type_is_an_error() {
        for (text, found) in [("[]", "an array"), ("42", "a number"), ("null", "null")] {
            let err = parse(text).expect_err("not an object");
            assert!(err.to_string().contains(found), "{err}");
        }
    }

    #[test]
    fn bad_entries_are_reported_and_skipped() {
        let snapshot = parse(
            r#"{
              "no-ip": {"metadata": {"container_workload": "staging"}},
              "bad-ip": {"ip": "10.255.0.300", "metadata": {"container_workload": "staging"}},
              "v6": {"ip": "fd00::1", "metadata": {}},
              "num-ip": {"ip": 17},
              "not-object": "staging",
              "bad-meta": {"ip": "10.255.0.8", "metadata": ["staging"]},
              "bad-workload": {"ip": "10.255.0.9", "metadata": {"container_workload": true}},
              "good": {"ip": "10.255.0.10", "metadata": {"container_workload": "task"}},
              "no-meta": {"ip": "10.255.0.11"}
            }"#,
        )
        .expect("file parses");
        let good: Vec<_> = snapshot.entries.iter().map(|e| &*e.handle).collect();
        assert_eq!(good, ["good", "no-meta"]);
        let reasons: BTreeMap<_, _> = snapshot
            .problems
            .iter()
            .map(|p| (p.handle.as_str(), p.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 7);
        assert!(reasons["bad-ip"].contains("10.255.0.300"));
        assert!(reasons["bad-workload"].contains("container_workload"));
        assert!(reasons["not-object"].contains("not an object"));
    }

    #[test]
    fn missing_store_and_dangling_symlink_are_no_containers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.json");
        assert_eq!(
            read_store(&store).expect("missing"),
            StoreSnapshot::default()
        );
        std::os::unix::fs::symlink(dir.path().join("gone"), &store).expect("dangling symlink");
        assert_eq!(
            read_store(&store).expect("dangling symlink"),
            StoreSnapshot::default()
        );
    }

    #[test]
    fn reads_under_the_lock_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.json");
        std::fs::write(&store, SILK_STORE).expect("write");
        std::fs::write(lock_path(&store), "").expect("lock");
        assert_eq!(lock_path(&store), dir.path().join("store.json_lock"));
        let snapshot = read_store(&store).expect("readable");
        assert_eq!(snapshot.entries.len(), 3);
    }

    #[test]
    fn waits_for_the_writer_to_release_its_exclusive_lock() {
        use std::time::{Duration, Instant};
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.json");
        std::fs::write(&store, "{\"half").expect("torn write in progress");
        let lock = File::create(lock_path(&store)).expect("lock");
        let writer = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("exclusive");
        let store_for_writer = store.clone();
        let finisher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(60));
            std::fs::write(&store_for_writer, SILK_STORE).expect("complete write");
            drop(writer);
        });
        let started = Instant::now();
        let snapshot = read_store(&store).expect("reader sees the finished document");
        assert!(started.elapsed() >= Duration::from_millis(40));
        assert_eq!(snapshot.entries.len(), 3);
        finisher.join().expect("writer thread");
    }

    /// Reads `store` with [`read_locked`], recording what the writer had done when the read
    /// said it had caught up (None: it did not say so), and what it read.
    fn read_noting_catch_up(
        store: &Path,
        writer_done: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> (Option<bool>, Option<Vec<u8>>) {
        use std::sync::atomic::Ordering;
        let seen = std::sync::Mutex::new(None);
        let caught_up = || *seen.lock().expect("lock") = Some(writer_done.load(Ordering::SeqCst));
        let read = read_locked(store, &caught_up, |file, size| {
            let mut bytes = vec![0; usize::try_from(size).expect("small")];
            read_exact_at(&file, &mut bytes, 0).map_err(|e| changed_or_io(store, e))?;
            Ok(bytes)
        })
        .expect("readable");
        (seen.into_inner().expect("lock"), read)
    }

    /// silk's lock on `store`, held by a thread that after `delay` runs `write` on the store,
    /// marks the returned flag done and releases the lock.
    fn writer_that(
        store: &Path,
        delay: Duration,
        write: impl FnOnce(&Path) + Send + 'static,
    ) -> (
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<()>,
    ) {
        let lock = hold_writer_lock(store);
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (store, done_by_writer) = (store.to_path_buf(), done.clone());
        let writer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            write(&store);
            done_by_writer.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(lock);
        });
        (done, writer)
    }

    #[test]
    fn a_read_catches_up_only_once_the_writer_released_its_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.json");
        std::fs::write(&store, "{\"half").expect("torn write in progress");
        let (done, finisher) = writer_that(&store, Duration::from_millis(40), |store| {
            std::fs::write(store, SILK_STORE).expect("complete write");
        });
        let (seen, read) = read_noting_catch_up(&store, &done);
        assert_eq!(seen, Some(true), "caught up before the writer was done");
        assert_eq!(read.as_deref(), Some(SILK_STORE.as_bytes()));
        finisher.join().expect("writer thread");
        // Nothing to wait for, and no store at all: caught up at once.
        assert_eq!(read_noting_catch_up(&store, &done).0, Some(true));
        std::fs::remove_file(&store).expect("remove");
        assert_eq!(read_noting_catch_up(&store, &done), (Some(true), None));
    }

    #[test]
    fn a_store_replaced_while_the_read_waits_for_the_lock_is_not_caught_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.json");
        std::fs::write(&store, "{}").expect("old store");
        // By then the reader has opened the old file and waits for the lock.
        let (done, replacer) = writer_that(&store, Duration::from_millis(60), |store| {
            let new = store.with_extension("new");
            std::fs::write(&new, SILK_STORE).expect("new store");
            std::fs::rename(&new, store).expect("replace");
        });
        let (seen, read) = read_noting_catch_up(&store, &done);
        replacer.join().expect("replacer thread");
        assert_eq!(read.as_deref(), Some(&b"{}"[..]), "read the file it opened");
        assert_eq!(seen, None, "the new file is not what was read");
        let (seen, read) = read_noting_catch_up(&store, &done);
        assert_eq!(
            (seen, read.as_deref()),
            (Some(true), Some(SILK_STORE.as_bytes()))
        );
    }

    #[test]
    fn a_writer_that_never_releases_the_lock_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.json");
        std::fs::write(&store, SILK_STORE).expect("write");
        let lock = File::create(lock_path(&store)).expect("lock");
        let _writer = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("exclusive");
        let started = std::time::Instant::now();
        let err = read_store(&store).expect_err("busy");
        assert!(matches!(err, StoreError::Busy { .. }), "{err}");
        assert!(started.elapsed() < LOCK_WAIT * 5);
        assert!(err.to_string().contains("store.json_lock"), "{err}");
    }

    /// Runs `read_store` on a thread and fails the test (instead of hanging it) if the read
    /// does not return within 5 s. Returns the result and how long the read took.
    fn read_store_within_bound(store: &Path) -> (Result<StoreSnapshot, StoreError>, Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = store.to_path_buf();
        std::thread::spawn(move || {
            let started = Instant::now();
            let result = read_store(&path);
            let _ = tx.send((result, started.elapsed()));
        });
        rx.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("read_store({}) hung", store.display()))
    }

    /// silk's exclusive lock on the store's lock file, held by the test (as a stuck writer).
    fn hold_writer_lock(store: &Path) -> nix::fcntl::Flock<File> {
        let lock = File::create(lock_path(store)).expect("lock");
        nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("exclusive")
    }

    #[test]
    fn fifo_is_refused_at_once_without_taking_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.json");
        nix::unistd::mkfifo(&store, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        // A writer holds the lock: a reader that took it first would report Busy after 200 ms.
        let _writer = hold_writer_lock(&store);
        let (result, took) = read_store_within_bound(&store);
        let err = result.expect_err("a FIFO is not a store");
        assert!(matches!(err, StoreError::NotRegular { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains(&store.display().to_string()) && message.contains("FIFO"),
            "{message}"
        );
        assert!(took < LOCK_WAIT, "took {took:?}: the lock was waited for");
    }

    #[test]
    fn fifo_appearing_after_the_type_check_does_not_block_the_open() {
        // The window between stat and open: the open itself must not wait for a writer.
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let opened = open_nonblocking(&fifo).map(|file| {
                file.metadata()
                    .map_err(OpenFailure::Stat)
                    .and_then(|m| ensure_regular(&m))
            });
            let _ = tx.send(matches!(
                opened,
                Ok(Err(OpenFailure::NotRegular("a FIFO (named pipe)")))
            ));
        });
        let refused = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("opening a FIFO with the store's flags blocked");
        assert!(refused, "fstat of the opened FIFO was not refused");
    }

    #[test]
    fn directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.json");
        std::fs::create_dir(&store).expect("a directory where the file should be");
        let (result, _) = read_store_within_bound(&store);
        let err = result.expect_err("a directory is not a store");
        assert!(
            matches!(
                err,
                StoreError::NotRegular {
                    kind: "a directory",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains(&format!("{} is a directory", store.display())),
            "{err}"
        );
    }

    #[test]
    fn socket_and_device_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.json");
        let _listener = std::os::unix::net::UnixListener::bind(&store).expect("bind socket");
        let (result, _) = read_store_within_bound(&store);
        assert!(
            matches!(
                result,
                Err(StoreError::NotRegular {
                    kind: "a socket",
                    ..
                })
            ),
            "{result:?}"
        );
        // A symlink to /dev/zero (endless) is refused by what it resolves to.
        let other = dir.path().join("zero.json");
        std::os::unix::fs::symlink("/dev/zero", &other).expect("symlink");
        let (result, took) = read_store_within_bound(&other);
        assert!(
            matches!(
                result,
                Err(StoreError::NotRegular {
                    kind: "a character device",
                    ..
                })
            ),
            "{result:?}"
        );
        assert!(took < Duration::from_secs(1), "took {took:?}");
    }

    #[test]
    fn oversized_store_is_refused_naming_size_and_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.json");
        let file = File::create(&store).expect("create");
        file.set_len(70_000_000).expect("sparse 70 MB file");
        let _writer = hold_writer_lock(&store);
        let (result, took) = read_store_within_bound(&store);
        let err = result.expect_err("70 MB is over the limit");
        assert!(
            matches!(
                err,
                StoreError::TooLarge {
                    size: 70_000_000,
                    limit: MAX_STORE_BYTES,
                    ..
                }
            ),
            "{err}"
        );
        let message = err.to_string();
        for part in [
            store.display().to_string(),
            "70000000 bytes".to_string(),
            format!("limit of {MAX_STORE_BYTES} bytes"),
            "32.0 MiB".to_string(),
        ] {
            assert!(message.contains(&part), "{part:?} missing from: {message}");
        }
        assert!(took < LOCK_WAIT, "took {took:?}: the lock was waited for");
    }

    #[test]
    fn store_at_the_limit_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.json");
        // A valid store padded with whitespace to exactly the limit (silk's reader and ours
        // accept trailing whitespace).
        let mut bytes = SILK_STORE.as_bytes().to_vec();
        bytes.resize(usize::try_from(MAX_STORE_BYTES).expect("fits"), b' ');
        std::fs::write(&store, &bytes).expect("write");
        let (result, _) = read_store_within_bound(&store);
        assert_eq!(result.expect("at the limit").entries.len(), 3);
    }

    #[test]
    fn regular_file_and_symlink_to_it_read_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real-store.json");
        std::fs::write(&real, SILK_STORE).expect("write");
        let store = dir.path().join("store.json");
        std::os::unix::fs::symlink(&real, &store).expect("symlink");
        std::fs::write(lock_path(&store), "").expect("lock");
        let direct = read_store(&real).expect("regular file");
        assert_eq!(direct.entries.len(), 3);
        assert_eq!(read_store(&store).expect("through the symlink"), direct);
        // Through the link, silk's lock beside the link's path is the one taken.
        let _writer = hold_writer_lock(&store);
        assert!(matches!(read_store(&store), Err(StoreError::Busy { .. })));
    }

    #[test]
    fn lock_file_that_is_not_a_regular_file_is_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.json");
        std::fs::write(&store, SILK_STORE).expect("write");
        nix::unistd::mkfifo(
            &lock_path(&store),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .expect("mkfifo lock");
        let (result, _) = read_store_within_bound(&store);
        let err = result.expect_err("a FIFO is not a lock file");
        assert!(matches!(err, StoreError::LockNotRegular { .. }), "{err}");
        assert!(err.to_string().contains("store.json_lock"), "{err}");
    }

    /// Reads a few bytes per call, slowly: a store on a stalled disk.
    struct SlowReader;
    impl Read for SlowReader {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            std::thread::sleep(Duration::from_millis(20));
            let n = buf.len().min(4);
            buf[..n].fill(b' ');
            Ok(n)
        }
    }

    #[test]
    fn a_slow_read_gives_up_at_the_deadline() {
        let path = Path::new("/test/store.json");
        let started = Instant::now();
        let err = read_bounded(
            SlowReader,
            path,
            0,
            MAX_STORE_BYTES,
            Duration::from_millis(100),
        )
        .expect_err("endless slow read");
        let took = started.elapsed();
        assert!(
            matches!(err, StoreError::ReadTimeout { read, .. } if read > 0),
            "{err}"
        );
        assert!(took < Duration::from_millis(500), "took {took:?}");
        assert!(err.to_string().contains("/test/store.json"), "{err}");
    }

    #[test]
    fn a_file_that_grows_past_the_limit_while_read_is_refused() {
        let path = Path::new("/test/store.json");
        let err = read_bounded(std::io::repeat(b' '), path, 10, 1024 * 1024, READ_DEADLINE)
            .expect_err("endless data");
        assert!(
            matches!(
                err,
                StoreError::GrewTooLarge {
                    limit: 1_048_576,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("1048576 bytes"), "{err}");
        // Up to the limit is fine.
        let bytes = read_bounded(
            std::io::repeat(b' ').take(1024 * 1024),
            path,
            0,
            1024 * 1024,
            READ_DEADLINE,
        )
        .expect("exactly the limit");
        assert_eq!(bytes.len(), 1024 * 1024);
    }

    #[test]
    fn a_length_that_changes_while_read_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.json");
        std::fs::write(&store, SILK_STORE).expect("write");
        let file = File::open(&store).expect("open");
        let len = SILK_STORE.len() as u64;
        let mut chunk = Vec::new();
        let old = DocHashes::of(SILK_STORE.replace("10.255.12.3", "10.255.12.9").as_bytes());
        let span = || Keep::Span(|_: Compared| (0, 0));
        // `fstat` said less than there is (appended to), or more (truncated).
        for size in [len - 1, len + 1] {
            let err = diff_file(&file, &store, size, &old, &mut chunk, span(), READ_DEADLINE)
                .expect_err("length changed");
            assert!(matches!(err, StoreError::ChangedWhileRead { .. }), "{err}");
        }
        let read = diff_file(&file, &store, len, &old, &mut chunk, span(), READ_DEADLINE)
            .expect("consistent");
        assert_eq!(read, diff_bytes(SILK_STORE.as_bytes(), &old, span()));
        assert_eq!(read.middle, SILK_STORE.as_bytes());
    }

    #[test]
    fn the_lock_is_released_before_read_store_returns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.json");
        std::fs::write(&store, SILK_STORE).expect("write");
        std::fs::write(lock_path(&store), "").expect("lock");
        read_store(&store).expect("readable");
        let lock = File::open(lock_path(&store)).expect("lock");
        assert!(
            nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok(),
            "the shared lock outlived the read"
        );
    }
}
