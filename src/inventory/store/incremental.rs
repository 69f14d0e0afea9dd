//! Incremental reading of silk's store: after a one-container change, re-parse one or two
//! entries instead of all of them.
//!
//! The reader keeps, of the last document, keyed hashes of its blocks (`store/blocks.rs`) and,
//! when it parsed, an index of its top-level members (where each value ends); not the document
//! itself. The file is hashed as it is read, which tells how much of its start and of its end is
//! unchanged; only the span between the members that end nearest to those points is read again
//! and kept, and only the members in it are parsed again, after checking that the new text of
//! the span, between the unchanged prefix and suffix, makes a valid document. After a refused
//! document (no index) the next read parses in full.
//!
//! Why splicing is sound. The old document was valid JSON: ws `{` ws [member (ws `,` ws member)*]
//! ws `}` ws. The left anchor L is just after `{` or just after a member's value; the right
//! anchor R is just after a member's value or at the closing `}`; both lie in the common prefix
//! and suffix respectively, so the new document is old[..L] + region + old[R..]. Because
//! everything before L and from R on is text of a valid document cut at those grammar points,
//! the new document is valid exactly when the region is, in the grammar slot between them:
//! after a value, zero or more `, member` (then whitespace); after `{`, members separated by
//! commas, at least one unless R is the `}`. That is checked by parsing `{` + region (less its
//! leading comma) + `}` with serde_json and counting members. A value is not changed by what
//! follows it: strings, objects, arrays and literals end at a fixed character, and a number ends
//! at the first character that cannot continue it, which is `}` in the synthetic document and,
//! in the real one, the byte after a value end of the old valid document (whitespace, `,` or
//! `}`). The bytes at the anchors are ASCII, so UTF-8 cannot straddle them. Members outside the
//! region keep their text, hence their parse. Duplicate keys (which serde resolves last-wins)
//! are never spliced: they force a full parse, as does anything else unexpected, and the full
//! parse defers to [`parse_store`] for every failure, so results and errors are always exactly
//! [`parse_store`]'s.

#[cfg(doc)]
use super::READ_CHUNK;
use super::chunked::ChunkedParse;
use serde_json::value::RawValue;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::blocks::{BLOCK, Compared, DocHashes};
use super::diff::{Keep, NewDoc, Sink, diff_bytes, read_store_diff};
use super::document::{Index, Member, Members, index_of, is_json_ws, value_end};
use super::entry::{Changed, Parsed, parse_entry, parse_store};
use super::{StoreError, StoreSnapshot};

/// What a read changed since the previous good read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreDelta {
    /// Handles whose parse result differs from the previous good read (added, changed or
    /// removed), sorted by handle, each once, with the result now (None: no longer in the store).
    /// An entry rewritten with identical parse result is NOT listed.
    pub changed: Changed,
}

/// How the last successful read was done (for tests, logs and benchmarks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadKind {
    /// Same bytes as before: nothing parsed.
    Unchanged,
    /// Only the members in the differing span were parsed.
    Incremental { reparsed: usize },
    /// The whole document was parsed.
    Full,
}

/// Reads silk's store like [`super::read_store`], re-parsing only what changed since its last
/// good read. Results are always exactly what [`parse_store`] gives for the bytes read.
pub struct StoreReader {
    path: PathBuf,
    /// The hashes of the document last read, which the next read is compared with (25 KB where
    /// the document is 3 MB at 5,000 containers); a read keeps just the span that differs.
    hashes: DocHashes,
    /// Whether that document parsed (false after a refused one, whose entries were not taken).
    doc_good: bool,
    /// The file is read through this, [`READ_CHUNK`] bytes at a time.
    chunk: Vec<u8>,
    /// `{` + changed span + `}`, reused.
    synthetic: Vec<u8>,
    /// Where the document's members are; None when it cannot be spliced (no object, or duplicate
    /// keys): the next changed read is then a full parse.
    index: Option<Index>,
    entries: BTreeMap<String, Parsed>,
    last_read: Option<ReadKind>,
    /// Called when a read of the file has caught up with every write made so far.
    caught_up: Option<CaughtUp>,
}

/// See [`StoreReader::on_caught_up`].
pub type CaughtUp = Arc<dyn Fn() + Send + Sync>;

/// What replaces what in an incremental read.
struct Splice {
    /// Old members `replaced` (indices into `Index::members`) give way to `added`.
    replaced: std::ops::Range<usize>,
    /// Handle, value end in the new document, parse.
    added: Vec<(String, usize, Parsed)>,
}

impl fmt::Debug for StoreReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreReader")
            .field("path", &self.path)
            .field("bytes", &self.hashes.len)
            .field("entries", &self.entries.len())
            .field("indexed", &self.index.is_some())
            .field("last_read", &self.last_read)
            .finish()
    }
}

impl StoreReader {
    /// A reader that has read nothing yet: empty store, no entries.
    pub fn new(path: PathBuf) -> StoreReader {
        Self::with_block(path, BLOCK)
    }

    /// A reader that hashes in blocks of `block` bytes (tests: small blocks splice small
    /// documents).
    fn with_block(path: PathBuf, block: usize) -> StoreReader {
        StoreReader {
            path,
            hashes: DocHashes::empty(block),
            doc_good: true,
            chunk: Vec::new(),
            synthetic: Vec::new(),
            index: None,
            entries: BTreeMap::new(),
            last_read: None,
            caught_up: None,
        }
    }

    /// Calls `caught_up` whenever a read is sure to include every write made before the call:
    /// with silk's lock held, before the first byte is read. The agent clears its "store
    /// changed" flag there rather than when a pass starts: the events of a write that the pass
    /// waited out under the lock are then not taken for another change.
    pub fn on_caught_up(&mut self, caught_up: CaughtUp) {
        self.caught_up = Some(caught_up);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the store with exactly the bounds and checks of `read_store` (non-regular refused,
    /// size cap, bounded lock wait, bounded read, lock released before parsing, missing store =
    /// no containers, all-whitespace = no containers). `full = true` forces a full parse (the
    /// agent's periodic verifying pass; defence in depth). On error the entries stay those of
    /// the last good read and the error is what read_store would return for the same file,
    /// except for a file whose length changes while it is read under silk's lock
    /// ([`StoreError::ChangedWhileRead`]).
    pub fn read(&mut self, full: bool) -> Result<StoreDelta, StoreError> {
        let caught_up = self.caught_up.clone();
        let caught_up: &dyn Fn() = match &caught_up {
            Some(f) => f.as_ref(),
            None => &|| {},
        };
        self.read_from(Source::File(caught_up), full)
    }

    /// [`StoreReader::read`] of `bytes` instead of the file (benchmarks and tests).
    #[doc(hidden)]
    pub fn apply_bytes(&mut self, bytes: &[u8], full: bool) -> Result<StoreDelta, StoreError> {
        self.read_from(Source::Bytes(bytes), full)
    }

    /// The span around what changed, spliced in; else the whole document, parsed as it is
    /// read; else (not the plain shape silk writes, or not valid) the whole document in memory,
    /// parsed by parse_store's rules.
    fn read_from(&mut self, source: Source<'_>, full: bool) -> Result<StoreDelta, StoreError> {
        if !full && let Some(index) = &self.index {
            let keep = keep_span(index, self.doc_good, self.hashes.len);
            let new = source.read(&self.path, &self.hashes, &mut self.chunk, Keep::Span(keep))?;
            if let Some(delta) = self.try_incremental(new) {
                return Ok(delta);
            }
        }
        let mut chunked = ChunkedParse::new(&self.entries);
        let new = source.read(
            &self.path,
            &self.hashes,
            &mut self.chunk,
            whole(&mut chunked),
        )?;
        if let Some((changed, index)) = chunked.finish() {
            for (handle, now) in &changed {
                match now {
                    Some(parsed) => self.entries.insert(handle.clone(), parsed.clone()),
                    None => self.entries.remove(handle),
                };
            }
            self.hashes = new.hashes;
            self.index = Some(index);
            self.doc_good = true;
            self.last_read = Some(ReadKind::Full);
            return Ok(StoreDelta { changed });
        }
        let mut bytes = Vec::new();
        let new = source.read(&self.path, &self.hashes, &mut self.chunk, whole(&mut bytes))?;
        self.parse_whole(new.hashes, &bytes)
    }

    /// Every entry of the last good read, by handle.
    pub fn entries(&self) -> &BTreeMap<String, Parsed> {
        &self.entries
    }

    /// How the last successful read was done.
    pub fn last_read(&self) -> Option<ReadKind> {
        self.last_read
    }

    /// The last good read as a StoreSnapshot, exactly what parse_store returns for those bytes
    /// (O(n); for tests and `explain`).
    pub fn snapshot(&self) -> StoreSnapshot {
        StoreSnapshot::from_parsed(&self.entries)
    }

    /// Brings `hashes`, `entries`, `index` and `last_read` up to `new` without parsing the
    /// whole document: it is unchanged, or its changed span splices. None: it does not.
    fn try_incremental(&mut self, new: NewDoc) -> Option<StoreDelta> {
        if self.doc_good && new.hashes == self.hashes {
            self.last_read = Some(ReadKind::Unchanged);
            return Some(StoreDelta::default());
        }
        let old_len = self.hashes.len;
        let index = self.index.as_mut()?;
        let splice = plan_splice(index, &self.entries, &new, old_len, &mut self.synthetic)?;
        let reparsed = splice.added.len();
        let delta = apply_splice(index, &mut self.entries, splice, old_len, new.len());
        self.hashes = new.hashes;
        self.last_read = Some(ReadKind::Incremental { reparsed });
        Some(delta)
    }

    /// Parses the whole document `bytes` (hashed as `hashes`). On error the entries are those
    /// of the last good read; the hashes are the refused document's (so that the next read
    /// compares with what is on disk), marked bad, and the next read parses in full.
    fn parse_whole(&mut self, hashes: DocHashes, bytes: &[u8]) -> Result<StoreDelta, StoreError> {
        self.hashes = hashes;
        self.index = None;
        self.doc_good = false;
        let (changed, index) = parse_full_into(&self.path, bytes, &mut self.entries)?;
        self.index = index;
        self.doc_good = true;
        self.last_read = Some(ReadKind::Full);
        Ok(StoreDelta { changed })
    }
}

/// Where a read takes the document from.
#[derive(Clone, Copy)]
enum Source<'b> {
    /// The store file, under silk's lock (no store: an empty document), with what to call once
    /// the read has caught up with its writers ([`StoreReader::on_caught_up`]).
    File(&'b dyn Fn()),
    Bytes(&'b [u8]),
}

impl Source<'_> {
    /// Reads the document and compares it with `old`.
    fn read(
        self,
        path: &Path,
        old: &DocHashes,
        chunk: &mut Vec<u8>,
        keep: Keep<'_, impl FnOnce(Compared) -> (usize, usize)>,
    ) -> Result<NewDoc, StoreError> {
        match self {
            Source::Bytes(bytes) => Ok(diff_bytes(bytes, old, keep)),
            Source::File(caught_up) => match read_store_diff(path, old, chunk, keep, caught_up)? {
                Some(new) => Ok(new),
                None => Ok(diff_bytes(&[], old, whole(&mut Vec::new()))),
            },
        }
    }
}

/// Every byte to `sink`.
fn whole(sink: &mut dyn Sink) -> Keep<'_, fn(Compared) -> (usize, usize)> {
    Keep::Whole(sink)
}

/// Which span of the new document a read keeps (see [`Keep::Span`]): none when it is the last
/// good one; from the left anchor to the right anchor of the members around what changed; all
/// of it when there are no anchors (then it is not spliced).
fn keep_span(
    index: &Index,
    doc_good: bool,
    old_len: usize,
) -> impl FnOnce(Compared) -> (usize, usize) {
    move |compared: Compared| {
        if compared.same && doc_good {
            return (compared.len, 0);
        }
        match anchors(index, compared.prefix, old_len - compared.suffix) {
            Some(a) => (a.left, old_len - a.right),
            None => (0, 0),
        }
    }
}

/// Commits a checked splice to the index and entries of a document `old_len` bytes long, now
/// `new`. Cannot fail.
fn apply_splice(
    index: &mut Index,
    entries: &mut BTreeMap<String, Parsed>,
    splice: Splice,
    old_len: usize,
    new_len: usize,
) -> StoreDelta {
    // What each touched handle parsed to before (None: absent).
    let mut before: BTreeMap<String, Option<Parsed>> = BTreeMap::new();
    for member in &index.members[splice.replaced.clone()] {
        let old = entries.remove(&*member.handle);
        before.insert(member.handle.to_string(), old);
    }
    let mut inserted = Vec::with_capacity(splice.added.len());
    for (handle, end, parsed) in splice.added {
        inserted.push(Member {
            handle: handle.as_str().into(),
            end,
        });
        before.entry(handle.clone()).or_insert(None);
        entries.insert(handle, parsed);
    }
    let after = splice.replaced.start + inserted.len();
    index.members.splice(splice.replaced, inserted);
    // Members after the span moved with the end of the document (all lie at or after
    // `old_len` - common suffix, so this does not underflow).
    let shift = |at: usize| at + new_len - old_len;
    for member in &mut index.members[after..] {
        member.end = shift(member.end);
    }
    index.close = shift(index.close);
    let changed = before
        .into_iter()
        .filter_map(|(handle, old)| {
            let now = entries.get(&handle).cloned();
            (now != old).then_some((handle, now))
        })
        .collect();
    StoreDelta { changed }
}

/// Where a splice cuts the old document: the members between the anchors are replaced.
struct Anchors {
    /// Just after `{` or after a member's value, at or before the unchanged prefix's end.
    left: usize,
    /// Whether `left` is after a value (rather than after `{`).
    after_value: bool,
    /// Just after a member's value or at the closing `}`, at or after the unchanged suffix's
    /// start (old offsets).
    right: usize,
    right_is_close: bool,
    /// Old members (indices into `Index::members`) replaced.
    replaced: std::ops::Range<usize>,
}

/// The anchors around a change that left the old document's `..prefix` and `tail..` as they
/// were; None if there are none (the change reaches past `{` or `}`).
fn anchors(index: &Index, prefix: usize, tail: usize) -> Option<Anchors> {
    let members = &index.members;
    // Left anchor: just after the last value that ends inside the common prefix, else just
    // after `{` if that is inside it.
    let kept_before = members.partition_point(|m| m.end <= prefix);
    let (left, after_value) = match kept_before.checked_sub(1) {
        Some(i) => (members[i].end, true),
        None if index.open < prefix => (index.open + 1, false),
        None => return None,
    };
    // Right anchor: just after the first value that ends inside the common suffix, else the
    // `}` if that is inside it.
    let first_in_tail = members.partition_point(|m| m.end < tail);
    let (right, replaced_end, right_is_close) = match members.get(first_in_tail) {
        Some(m) => (m.end, first_in_tail + 1, false),
        None if index.close >= tail => (index.close, members.len(), true),
        None => return None,
    };
    if replaced_end < kept_before || right < left {
        return None;
    }
    Some(Anchors {
        left,
        after_value,
        right,
        right_is_close,
        replaced: kept_before..replaced_end,
    })
}

/// Plans an incremental read of `new` against the old document (`old_len` bytes, valid,
/// described by `index`, parsed into `entries`). `new` must hold exactly the span between the
/// anchors of its unchanged prefix and suffix (as [`keep_span`] chooses it). None: parse in
/// full instead.
fn plan_splice(
    index: &Index,
    entries: &BTreeMap<String, Parsed>,
    new: &NewDoc,
    old_len: usize,
    synthetic: &mut Vec<u8>,
) -> Option<Splice> {
    let tail = old_len.checked_sub(new.suffix)?;
    let Anchors {
        left,
        after_value,
        right,
        right_is_close,
        replaced,
    } = anchors(index, new.prefix, tail)?;
    // old[..left] == new[..left] and old[right..] == new[right_new..]: the region between the
    // anchors is what was read.
    if left != new.prefix || right != tail {
        return None;
    }
    let region = new.middle.as_slice();
    let members = &index.members;

    // The region's members: after a value, `, member` repeated (or nothing); after `{`,
    // members separated by commas, at least one unless the right anchor is the `}`.
    let first = region.iter().position(|b| !is_json_ws(*b));
    let (body_at, need_member) = match (after_value, first) {
        (true, None) => (region.len(), false),
        (true, Some(at)) if region[at] == b',' => (at + 1, true),
        (true, Some(_)) => return None,
        (false, _) => (0, !right_is_close),
    };
    let body = &region[body_at..];
    let mut added = Vec::new();
    if !(after_value && first.is_none()) {
        synthetic.clear();
        synthetic.push(b'{');
        synthetic.extend_from_slice(body);
        synthetic.push(b'}');
        let Ok(Members(parsed)) = serde_json::from_slice::<Members>(synthetic) else {
            return None;
        };
        if need_member && parsed.is_empty() {
            return None;
        }
        let replaced: BTreeSet<&str> = members[replaced.clone()]
            .iter()
            .map(|m| &*m.handle)
            .collect();
        let mut seen = BTreeSet::new();
        for (handle, raw) in parsed {
            // A key twice in the region, or also in a member kept: serde's last-wins would
            // decide, so let the full parse decide.
            let kept = entries.contains_key(&handle) && !replaced.contains(handle.as_str());
            if kept || !seen.insert(handle.clone()) {
                return None;
            }
            // Offset in `synthetic` less its `{`, plus where the body starts in `new`.
            let end = value_end(raw, synthetic)?.checked_sub(1)? + left + body_at;
            let parsed = parse_entry(&handle, raw);
            added.push((handle, end, parsed));
        }
    }
    Some(Splice { replaced, added })
}

/// Parses a whole document: its entries exactly as [`parse_store`] gives them, and its index
/// when it can be spliced later.
#[cfg(test)]
fn parse_full(
    path: &Path,
    bytes: &[u8],
) -> Result<(BTreeMap<String, Parsed>, Option<Index>), StoreError> {
    let mut entries = BTreeMap::new();
    let (_, index) = parse_full_into(path, bytes, &mut entries)?;
    Ok((entries, index))
}

/// [`parse_full`] into `entries`, in place (a second map of every entry is what a verifying
/// pass would otherwise hold at its peak): returns the handles that changed, as
/// [`StoreDelta::changed`], and the index. On error `entries` is untouched.
fn parse_full_into(
    path: &Path,
    bytes: &[u8],
    entries: &mut BTreeMap<String, Parsed>,
) -> Result<(Changed, Option<Index>), StoreError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        let gone = std::mem::take(entries);
        return Ok((gone.into_keys().map(|h| (h, None)).collect(), None));
    }
    let Ok(Members(members)) = serde_json::from_slice::<Members>(bytes) else {
        // parse_store is the reference for every failure (Malformed or WrongShape, message).
        // Should it ever accept what the ordered parse refused, its result stands, unindexed.
        let now = entries_of(parse_store(path, bytes)?);
        let changed = replace_entries(
            entries,
            |handle| now.contains_key(handle),
            now.iter().map(|(h, p)| (h.as_str(), p.clone())),
        );
        return Ok((changed, None));
    };
    let mut index = index_of(bytes, &members);
    // As serde's BTreeMap does: the last of a repeated key wins.
    let mut raws: BTreeMap<&str, &RawValue> = BTreeMap::new();
    for (handle, raw) in &members {
        if raws.insert(handle.as_str(), *raw).is_some() {
            index = None;
        }
    }
    let now = raws
        .iter()
        .map(|(handle, raw)| (*handle, parse_entry(handle, raw)));
    let changed = replace_entries(entries, |handle| raws.contains_key(handle), now);
    Ok((changed, index))
}

/// Makes `entries` hold exactly `now` (each handle once; `in_now` tells whether a handle is
/// among them), in place: only what differs is written. Returns the handles that changed,
/// sorted, as [`StoreDelta::changed`].
fn replace_entries<'a>(
    entries: &mut BTreeMap<String, Parsed>,
    in_now: impl Fn(&str) -> bool,
    now: impl Iterator<Item = (&'a str, Parsed)>,
) -> Changed {
    let gone: Vec<String> = entries
        .keys()
        .filter(|handle| !in_now(handle))
        .cloned()
        .collect();
    let mut changed = Vec::new();
    for handle in gone {
        entries.remove(&handle);
        changed.push((handle, None));
    }
    for (handle, parsed) in now {
        match entries.get_mut(handle) {
            Some(old) if *old == parsed => {}
            Some(old) => {
                *old = parsed.clone();
                changed.push((handle.to_string(), Some(parsed)));
            }
            None => {
                entries.insert(handle.to_string(), parsed.clone());
                changed.push((handle.to_string(), Some(parsed)));
            }
        }
    }
    changed.sort_by(|a, b| a.0.cmp(&b.0));
    changed
}

fn entries_of(snapshot: StoreSnapshot) -> BTreeMap<String, Parsed> {
    let usable = snapshot
        .entries
        .into_iter()
        .map(|entry| (entry.handle.to_string(), Ok(entry)));
    let problems = snapshot
        .problems
        .into_iter()
        .map(|problem| (problem.handle, Err(problem.reason)));
    usable.chain(problems).collect()
}

#[cfg(test)]
mod tests;
