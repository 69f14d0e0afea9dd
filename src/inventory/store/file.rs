//! The locked, bounded read of silk's store file: a regular file only (refused before it is
//! opened for reading), opened `O_NONBLOCK`, a shared `flock` on its lock file taken within
//! [`LOCK_WAIT`](super::LOCK_WAIT), the read done within [`READ_DEADLINE`](super::READ_DEADLINE)
//! and at most [`MAX_STORE_BYTES`](super::MAX_STORE_BYTES). It knows nothing of JSON.

use super::{
    LOCK_RETRY, LOCK_WAIT, MAX_STORE_BYTES, READ_CHUNK, READ_DEADLINE, StoreError, lock_path,
};
use std::fs::{File, Metadata, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// Reads the store's bytes into `buf` under the shared lock: true if there is a store (its bytes
/// are then all of `buf`), false if there is none (`buf` then holds nothing meaningful). `buf` is
/// reused as it is, see [`read_bounded_into`]. On error `buf` holds nothing meaningful either.
pub(super) fn read_store_bytes_into(path: &Path, buf: &mut Vec<u8>) -> Result<bool, StoreError> {
    let read = read_locked(path, &|| {}, |file, size| {
        read_bounded_into(file, path, size, MAX_STORE_BYTES, READ_DEADLINE, buf)
    })?;
    Ok(read.is_some())
}

/// The file must end where `fstat` said under the lock: anything after is a write under it.
pub(super) fn ensure_ends_at(file: &File, path: &Path, size: u64) -> Result<(), StoreError> {
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
pub(super) fn read_locked<T>(
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
pub(super) fn names_file(path: &Path, file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), file.metadata()) {
        (Ok(named), Ok(open)) => (named.dev(), named.ino()) == (open.dev(), open.ino()),
        _ => false,
    }
}

/// The open store's size, by `fstat`.
pub(super) fn size_of(file: &File, path: &Path) -> Result<u64, StoreError> {
    let meta = file.metadata().map_err(|source| StoreError::Stat {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(meta.len())
}

/// The store's size under the lock.
pub(super) fn locked_size(file: &File, path: &Path) -> Result<u64, StoreError> {
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
pub(super) fn read_exact_at(file: &File, mut buf: &mut [u8], mut at: u64) -> std::io::Result<()> {
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

pub(super) fn changed_or_io(path: &Path, source: std::io::Error) -> StoreError {
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
pub(super) fn open_store(path: &Path) -> Result<Option<(File, u64)>, StoreError> {
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
pub(super) enum OpenFailure {
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
pub(super) fn open_regular(path: &Path) -> Result<Option<File>, OpenFailure> {
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
pub(super) fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
}

pub(super) fn ensure_regular(meta: &Metadata) -> Result<(), OpenFailure> {
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
pub(super) fn read_bounded(
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
pub(super) fn read_bounded_into(
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
pub(super) fn lock_shared_bounded(
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
