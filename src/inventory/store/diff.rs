//! Reading a document against the block hashes of the last one: the span that differs, or
//! every byte handed to a [`Sink`] as it is read (a full parse in regions).

use super::blocks::{Compared, DocHashes, Hashing};
use super::file::{changed_or_io, ensure_ends_at, read_exact_at, read_locked};
use super::{MAX_STORE_BYTES, READ_CHUNK, READ_DEADLINE, StoreError};
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

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
pub(super) fn diff_file(
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
pub(super) trait Pieces {
    type Error;
    fn len(&self) -> usize;
    /// Bytes `at .. at + n` (at most [`READ_CHUNK`]).
    fn piece(&mut self, at: usize, n: usize) -> Result<&[u8], Self::Error>;
}

pub(super) struct BytePieces<'a>(&'a [u8]);

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
pub(super) struct FilePieces<'a> {
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
pub(super) fn split_doc<P: Pieces>(
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
