//! Incremental reading of silk's store: after a one-container change, re-parse one or two
//! entries instead of all of them.
//!
//! The reader keeps the last good document's bytes and an index of its top-level members (where
//! each value ends). A new document is compared with the old one byte for byte from both ends;
//! only the members in the span that differs are parsed again, and only after checking that the
//! new text of that span, between the unchanged prefix and suffix, makes a valid document.
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

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{
    EntryProblem, READ_CHUNK, StoreEntry, StoreError, StoreSnapshot, parse_entry, parse_store,
    read_store_bytes_into,
};

/// One entry of the store as parsed: usable, or why not (the same reason text parse_store puts
/// in EntryProblem::reason).
pub type Parsed = Result<StoreEntry, String>;

/// What a read changed since the previous good read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreDelta {
    /// Handles whose parse result differs from the previous good read (added, changed or
    /// removed), sorted by handle, each once, with the result now (None: no longer in the store).
    /// An entry rewritten with identical parse result is NOT listed.
    pub changed: Vec<(String, Option<Parsed>)>,
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
    /// The last good document.
    doc: Vec<u8>,
    /// The next read goes here; swapped with `doc` on success, so neither is reallocated.
    scratch: Vec<u8>,
    /// `{` + changed span + `}`, reused.
    synthetic: Vec<u8>,
    /// Where `doc`'s members are; None when `doc` cannot be spliced (no object, or duplicate
    /// keys): the next changed read is then a full parse.
    index: Option<Index>,
    entries: BTreeMap<String, Parsed>,
    last_read: Option<ReadKind>,
}

/// The layout of a valid document whose keys are all distinct.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Index {
    /// Offset of the top-level `{`.
    open: usize,
    /// Offset of the closing `}`.
    close: usize,
    /// In document order, so `end` is strictly increasing.
    members: Vec<Member>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    handle: Box<str>,
    /// Offset just past the end of the member's value.
    end: usize,
}

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
            .field("bytes", &self.doc.len())
            .field("entries", &self.entries.len())
            .field("indexed", &self.index.is_some())
            .field("last_read", &self.last_read)
            .finish()
    }
}

impl StoreReader {
    /// A reader that has read nothing yet: empty store, no entries.
    pub fn new(path: PathBuf) -> StoreReader {
        StoreReader {
            path,
            doc: Vec::new(),
            scratch: Vec::new(),
            synthetic: Vec::new(),
            index: None,
            entries: BTreeMap::new(),
            last_read: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the store with exactly the bounds and checks of `read_store` (non-regular refused,
    /// size cap, bounded lock wait, bounded read, lock released before parsing, missing store =
    /// no containers, all-whitespace = no containers). `full = true` forces a full parse (the
    /// agent's periodic verifying pass; defence in depth). On error the reader's state is
    /// unchanged (last good document kept) and the error is exactly what read_store would
    /// return for the same file.
    pub fn read(&mut self, full: bool) -> Result<StoreDelta, StoreError> {
        let mut bytes = std::mem::take(&mut self.scratch);
        match read_store_bytes_into(&self.path, &mut bytes) {
            Ok(true) => {}
            // No store: the same as an empty one.
            Ok(false) => bytes.clear(),
            Err(err) => {
                self.scratch = bytes;
                return Err(err);
            }
        }
        self.apply_owned(bytes, full)
    }

    /// [`StoreReader::read`] of `bytes` instead of the file (benchmarks and tests).
    #[doc(hidden)]
    pub fn apply_bytes(&mut self, bytes: &[u8], full: bool) -> Result<StoreDelta, StoreError> {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf.extend_from_slice(bytes);
        self.apply_owned(buf, full)
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
        let mut snapshot = StoreSnapshot::default();
        for (handle, parsed) in &self.entries {
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

    /// Takes `bytes` as the new document; keeps them (and gives the old buffer back to
    /// `scratch`) on success, leaves every bit of state as it was on error.
    fn apply_owned(&mut self, bytes: Vec<u8>, full: bool) -> Result<StoreDelta, StoreError> {
        let result = self.update(&bytes, full);
        if result.is_ok() {
            self.scratch = std::mem::replace(&mut self.doc, bytes);
        } else {
            self.scratch = bytes;
        }
        // A buffer grown by a huge or refused file, or by a store that has since shrunk, is not
        // kept for the daemon's lifetime: the next read allocates what it needs once.
        if self.scratch.capacity() > 2 * self.doc.len() + READ_CHUNK {
            self.scratch = Vec::new();
        }
        if self.synthetic.capacity() > READ_CHUNK {
            self.synthetic = Vec::new();
        }
        result
    }

    /// Brings `entries`, `index` and `last_read` up to `new`; on error changes nothing.
    fn update(&mut self, new: &[u8], full: bool) -> Result<StoreDelta, StoreError> {
        if !full {
            let prefix = common_prefix(&self.doc, new);
            if prefix == self.doc.len() && prefix == new.len() {
                self.last_read = Some(ReadKind::Unchanged);
                return Ok(StoreDelta::default());
            }
            if let Some(index) = &mut self.index
                && let Some(splice) = plan_splice(
                    &self.doc,
                    index,
                    &self.entries,
                    new,
                    prefix,
                    &mut self.synthetic,
                )
            {
                let reparsed = splice.added.len();
                let delta = apply_splice(index, &mut self.entries, splice, self.doc.len(), new);
                self.last_read = Some(ReadKind::Incremental { reparsed });
                return Ok(delta);
            }
        }
        let (entries, index) = parse_full(&self.path, new)?;
        let delta = StoreDelta {
            changed: diff(&self.entries, &entries),
        };
        self.entries = entries;
        self.index = index;
        self.last_read = Some(ReadKind::Full);
        Ok(delta)
    }
}

/// Commits a checked splice to the index and entries of a document `old_len` bytes long, now
/// `new`. Cannot fail.
fn apply_splice(
    index: &mut Index,
    entries: &mut BTreeMap<String, Parsed>,
    splice: Splice,
    old_len: usize,
    new: &[u8],
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
    let shift = |at: usize| at + new.len() - old_len;
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

/// Plans an incremental read of `new` against `old` (valid, described by `index`, parsed into
/// `entries`), `prefix` bytes of which are common. None: parse in full instead.
fn plan_splice(
    old: &[u8],
    index: &Index,
    entries: &BTreeMap<String, Parsed>,
    new: &[u8],
    prefix: usize,
    synthetic: &mut Vec<u8>,
) -> Option<Splice> {
    let suffix = common_suffix(old, new, old.len().min(new.len()) - prefix);
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
    let tail = old.len() - suffix;
    let first_in_tail = members.partition_point(|m| m.end < tail);
    let (right, replaced_end, right_is_close) = match members.get(first_in_tail) {
        Some(m) => (m.end, first_in_tail + 1, false),
        None if index.close >= tail => (index.close, members.len(), true),
        None => return None,
    };
    if replaced_end < kept_before {
        return None;
    }
    // old[..left] == new[..left] and old[right..] == new[right_new..].
    let right_new = (right + new.len()).checked_sub(old.len())?;
    let region = new.get(left..right_new)?;

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
        let replaced: BTreeSet<&str> = members[kept_before..replaced_end]
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
    Some(Splice {
        replaced: kept_before..replaced_end,
        added,
    })
}

/// Parses a whole document: its entries exactly as [`parse_store`] gives them, and its index
/// when it can be spliced later.
fn parse_full(
    path: &Path,
    bytes: &[u8],
) -> Result<(BTreeMap<String, Parsed>, Option<Index>), StoreError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok((BTreeMap::new(), None));
    }
    let Ok(Members(members)) = serde_json::from_slice::<Members>(bytes) else {
        // parse_store is the reference for every failure (Malformed or WrongShape, message).
        // Should it ever accept what the ordered parse refused, its result stands, unindexed.
        let snapshot = parse_store(path, bytes)?;
        return Ok((entries_of(snapshot), None));
    };
    let mut index = index_of(bytes, &members);
    // As serde's BTreeMap does: the last of a repeated key wins.
    let mut raws: BTreeMap<&str, &RawValue> = BTreeMap::new();
    for (handle, raw) in &members {
        if raws.insert(handle.as_str(), *raw).is_some() {
            index = None;
        }
    }
    let entries = raws
        .into_iter()
        .map(|(handle, raw)| (handle.to_string(), parse_entry(handle, raw)))
        .collect();
    Ok((entries, index))
}

/// The index of a document that parsed into `members`; None if it is not laid out as expected.
fn index_of(bytes: &[u8], members: &[(String, &RawValue)]) -> Option<Index> {
    let open = bytes.iter().position(|b| !is_json_ws(*b))?;
    let close = bytes.iter().rposition(|b| !is_json_ws(*b))?;
    if bytes[open] != b'{' || bytes[close] != b'}' {
        return None;
    }
    let members = members
        .iter()
        .map(|(handle, raw)| {
            Some(Member {
                handle: handle.as_str().into(),
                end: value_end(raw, bytes)?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Index {
        open,
        close,
        members,
    })
}

/// The offset in `base` just past `raw`, which must borrow from `base`.
fn value_end(raw: &RawValue, base: &[u8]) -> Option<usize> {
    let text = raw.get();
    let start = (text.as_ptr() as usize).checked_sub(base.as_ptr() as usize)?;
    let end = start.checked_add(text.len())?;
    (end <= base.len()).then_some(end)
}

fn entries_of(snapshot: StoreSnapshot) -> BTreeMap<String, Parsed> {
    let usable = snapshot
        .entries
        .into_iter()
        .map(|entry| (entry.handle.clone(), Ok(entry)));
    let problems = snapshot
        .problems
        .into_iter()
        .map(|problem| (problem.handle, Err(problem.reason)));
    usable.chain(problems).collect()
}

/// Handles whose parse differs between `old` and `new`, sorted, with the parse in `new`.
fn diff(
    old: &BTreeMap<String, Parsed>,
    new: &BTreeMap<String, Parsed>,
) -> Vec<(String, Option<Parsed>)> {
    let mut changed = Vec::new();
    let mut old = old.iter().peekable();
    let mut new = new.iter().peekable();
    loop {
        let order = match (old.peek(), new.peek()) {
            (None, None) => return changed,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((a, _)), Some((b, _))) => a.cmp(b),
        };
        match order {
            Ordering::Less => {
                if let Some((handle, _)) = old.next() {
                    changed.push((handle.clone(), None));
                }
            }
            Ordering::Greater => {
                if let Some((handle, now)) = new.next() {
                    changed.push((handle.clone(), Some(now.clone())));
                }
            }
            Ordering::Equal => {
                if let (Some((_, was)), Some((handle, now))) = (old.next(), new.next())
                    && was != now
                {
                    changed.push((handle.clone(), Some(now.clone())));
                }
            }
        }
    }
}

/// JSON's whitespace (RFC 8259), which is what serde_json skips; narrower than
/// `u8::is_ascii_whitespace` (no form feed).
fn is_json_ws(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

/// Block sizes for the comparisons: slice equality is a vectorised `memcmp`, so compare big
/// blocks first and narrow down only inside the first block that differs.
const BLOCKS: [usize; 3] = [4096, 64, 1];

/// Length of the common prefix of `a` and `b`.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let len = a.len().min(b.len());
    let mut at = 0;
    for block in BLOCKS {
        while at + block <= len && a[at..at + block] == b[at..at + block] {
            at += block;
        }
    }
    at
}

/// Length of the common suffix of `a` and `b`, at most `max`.
fn common_suffix(a: &[u8], b: &[u8], max: usize) -> usize {
    let max = max.min(a.len()).min(b.len());
    let (a, b) = (&a[a.len() - max..], &b[b.len() - max..]);
    let mut len = 0;
    for block in BLOCKS {
        while len + block <= max
            && a[max - len - block..max - len] == b[max - len - block..max - len]
        {
            len += block;
        }
    }
    len
}

/// A JSON object's members in document order, repeated keys included: what serde's BTreeMap
/// sees before it keeps the last of each key. The same deserializer calls as
/// `BTreeMap<String, &RawValue>`, so it accepts exactly the same documents.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

#[cfg(test)]
mod tests;
