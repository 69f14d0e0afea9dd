//! A whole-document parse of silk's store fed a piece at a time, as the file is read, so that a
//! full parse (the first read, a verifying pass) never holds the 3 MB document of a large cell:
//! it holds one region of about [`REGION`] bytes, the new index, and the entries that differ
//! from the ones it is compared with.
//!
//! A scan that follows strings and nesting finds the commas between top-level members; the text
//! between two such commas, cut about every [`REGION`] bytes, is parsed by serde_json as
//! `{` + region + `}`. Wherever the cuts fall, the document is then valid exactly when every
//! region is a non-empty list of members (the cut is a comma in the document and a `}` in the
//! synthetic one, and both end a number or literal alike), so a scan fooled by invalid text can
//! only make a region fail. Anything but the plain shape silk writes (whitespace, `{`, members
//! with keys in strictly increasing order, `}`, whitespace) makes the parse give up: the caller
//! then parses the whole document with [`super::parse_store`]'s rules, which decide every odd
//! case (duplicate keys, other top-level values, errors and their messages).

use super::diff::Sink;
use std::collections::BTreeMap;

use super::document::{Index, Member, Members, is_json_ws, value_end};
use super::entry::{Changed, Parsed, parse_entry};

/// Bytes of members parsed at once.
pub(super) const REGION: usize = 64 * 1024;

/// Where the scan is in the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the top-level `{`.
    Before,
    /// Inside the top-level object.
    Inside,
    /// After its `}`.
    After,
}

/// A parse in progress; `current` is what the entries are now (the result lists what differs).
pub(super) struct ChunkedParse<'a> {
    current: &'a BTreeMap<String, Parsed>,
    phase: Phase,
    /// Nesting inside the top-level object (1 = directly in it), and the string state.
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// Bytes fed so far.
    fed: usize,
    /// Unparsed member text, starting at document offset `pending_at`.
    pending: Vec<u8>,
    pending_at: usize,
    /// The last top-level comma in `pending` (an offset in it).
    last_comma: Option<usize>,
    open: usize,
    close: usize,
    members: Vec<Member>,
    /// Parsed entries that differ from `current`.
    differ: Vec<(String, Parsed)>,
    synthetic: Vec<u8>,
    failed: bool,
}

impl<'a> ChunkedParse<'a> {
    pub(super) fn new(current: &'a BTreeMap<String, Parsed>) -> ChunkedParse<'a> {
        ChunkedParse {
            current,
            phase: Phase::Before,
            depth: 0,
            in_string: false,
            escaped: false,
            fed: 0,
            pending: Vec::new(),
            pending_at: 0,
            last_comma: None,
            open: 0,
            close: 0,
            members: Vec::new(),
            differ: Vec::new(),
            synthetic: Vec::new(),
            failed: false,
        }
    }

    /// The next bytes of the document.
    fn feed(&mut self, piece: &[u8]) {
        let base = self.fed;
        self.fed += piece.len();
        if self.failed {
            return;
        }
        let mut inside = (self.phase == Phase::Inside).then_some(0);
        let mut inside_end = piece.len();
        for (i, &byte) in piece.iter().enumerate() {
            match self.phase {
                Phase::Before if byte == b'{' => {
                    self.phase = Phase::Inside;
                    self.depth = 1;
                    self.open = base + i;
                    self.pending_at = base + i + 1;
                    inside = Some(i + 1);
                }
                Phase::Before | Phase::After if is_json_ws(byte) => {}
                Phase::Before | Phase::After => {
                    self.failed = true;
                    return;
                }
                Phase::Inside => {
                    if self.scan(byte) {
                        if byte != b'}' {
                            self.failed = true;
                            return;
                        }
                        self.phase = Phase::After;
                        self.close = base + i;
                        inside_end = i;
                    } else if byte == b',' && self.depth == 1 && !self.in_string {
                        let start = inside.unwrap_or(0);
                        self.last_comma = Some(self.pending.len() + i - start);
                    }
                }
            }
        }
        if let Some(start) = inside {
            self.pending
                .extend_from_slice(&piece[start..inside_end.max(start)]);
        }
        if self.pending.len() >= REGION
            && let Some(comma) = self.last_comma.take()
        {
            let region = std::mem::take(&mut self.pending);
            self.parse_region(&region[..comma], self.pending_at);
            self.pending = region;
            self.pending.drain(..=comma);
            self.pending_at += comma + 1;
        }
    }
}

impl Sink for ChunkedParse<'_> {
    fn take(&mut self, piece: &[u8]) {
        self.feed(piece);
    }
}

impl ChunkedParse<'_> {
    /// Follows strings and nesting; true at the `}` that closes the top-level object.
    fn scan(&mut self, byte: u8) -> bool {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if byte == b'\\' {
                self.escaped = true;
            } else if byte == b'"' {
                self.in_string = false;
            }
            return false;
        }
        match byte {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                self.depth -= 1;
                return self.depth == 0;
            }
            _ => {}
        }
        false
    }

    /// Parses `region` (members between top-level commas, at document offset `at`).
    fn parse_region(&mut self, region: &[u8], at: usize) {
        if self.failed {
            return;
        }
        self.synthetic.clear();
        self.synthetic.push(b'{');
        self.synthetic.extend_from_slice(region);
        self.synthetic.push(b'}');
        let Ok(Members(parsed)) = serde_json::from_slice::<Members>(&self.synthetic) else {
            self.failed = true;
            return;
        };
        if parsed.is_empty() {
            self.failed = true;
            return;
        }
        for (handle, raw) in parsed {
            // Strictly increasing keys (as silk writes them): no duplicates to resolve here.
            let in_order = self.members.last().is_none_or(|m| *m.handle < *handle);
            let end = value_end(raw, &self.synthetic).map(|end| end - 1 + at);
            let (true, Some(end)) = (in_order, end) else {
                self.failed = true;
                return;
            };
            let parsed = parse_entry(&handle, raw);
            if self.current.get(&handle) != Some(&parsed) {
                self.differ.push((handle.clone(), parsed));
            }
            self.members.push(Member {
                handle: handle.into(),
                end,
            });
        }
    }

    /// What differs from `current` (sorted by handle, as [`super::StoreDelta::changed`]) and
    /// the document's index; None if the document is not of the plain shape or not valid.
    pub(super) fn finish(mut self) -> Option<(Changed, Index)> {
        if self.phase != Phase::After || self.failed {
            return None;
        }
        let region = std::mem::take(&mut self.pending);
        let empty_object = self.members.is_empty() && region.iter().all(|b| is_json_ws(*b));
        if !empty_object {
            self.parse_region(&region, self.pending_at);
        }
        if self.failed {
            return None;
        }
        let mut changed: Changed = self
            .differ
            .into_iter()
            .map(|(handle, parsed)| (handle, Some(parsed)))
            .collect();
        // Handles gone: in `current` but not among the members (both sorted).
        let mut members = self.members.iter().map(|m| &*m.handle).peekable();
        for handle in self.current.keys() {
            while members.next_if(|m| *m < handle.as_str()).is_some() {}
            if members.peek() != Some(&handle.as_str()) {
                changed.push((handle.clone(), None));
            }
        }
        changed.sort_by(|a, b| a.0.cmp(&b.0));
        Some((
            changed,
            Index {
                open: self.open,
                close: self.close,
                members: self.members,
            },
        ))
    }
}
