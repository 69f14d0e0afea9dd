//! What the store reader remembers of the last document instead of the document itself: a
//! keyed hash of each block of it, counted once from its start and once from its end.
//!
//! silk rewrites the whole store on every CNI ADD or DEL, and a one-container change inserts
//! or removes a few hundred bytes somewhere in it, which moves everything after. Blocks counted
//! from the start find the unchanged prefix; blocks counted from the end stay aligned across the
//! move and find the unchanged suffix. The hashes of a 3 MB document take 25 KB where the
//! document took 3 MB, and computing them as the file is read touches only the file's pages,
//! where a byte comparison also had to pull the kept document back through the caches.
//!
//! The hash is XXH3-128 seeded with a per-process random seed. Two different blocks hash alike
//! with a probability of about 2^-128, and nobody can aim at a collision without the seed; even
//! if someone did, they could only hide a change until the next verifying pass, which parses
//! the whole document again. (Whoever can write silk's store can exempt a container outright
//! by writing a staging entry, so the hash guards against accident, not against that writer.)

use std::sync::OnceLock;
use xxhash_rust::xxh3::xxh3_128_with_seed;

/// Bytes per block: small enough that a change re-reads little, large enough that the hashes
/// of a document are a thousandth of it.
pub(crate) const BLOCK: usize = 4096;

/// The hashes of one document. Counted from the start, blocks start at 0, 1, 2, 4, 8, ... up
/// to `block` bytes, then every `block` bytes (the last one possibly shorter); counted from the
/// end, the same mirrored. The small blocks at the edges keep the document's `{` and `}` (and a
/// trailing newline) in the unchanged prefix and suffix when a container whose handle sorts
/// first or last changes: the splice anchors on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DocHashes {
    pub len: usize,
    /// Bytes per block, a power of two ([`BLOCK`]; smaller in tests, to splice small
    /// documents).
    block: usize,
    front: Vec<u128>,
    /// Counted from the end: `back[0]` is the last byte.
    back: Vec<u128>,
}

/// How a new document compares with the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Compared {
    /// The new document's length.
    pub len: usize,
    /// Its first `prefix` bytes are the old document's first `prefix` bytes.
    pub prefix: usize,
    /// Its last `suffix` bytes are the old document's last `suffix` bytes; `prefix + suffix`
    /// is at most the shorter length, so the two never overlap in either document.
    pub suffix: usize,
    /// The two documents are the same.
    pub same: bool,
}

impl DocHashes {
    /// The hashes of the empty document, in blocks of `block` bytes.
    pub(crate) fn empty(block: usize) -> DocHashes {
        Hashing::new(0, block).finish()
    }

    /// The hashes of a document held in memory.
    #[cfg(test)]
    pub(crate) fn of(bytes: &[u8]) -> DocHashes {
        Self::of_blocks(bytes, BLOCK)
    }

    #[cfg(test)]
    pub(crate) fn of_blocks(bytes: &[u8], block: usize) -> DocHashes {
        let mut hashing = Hashing::new(bytes.len(), block);
        hashing.feed(bytes);
        hashing.finish()
    }

    /// Bytes per block.
    pub(crate) fn block(&self) -> usize {
        self.block
    }

    /// Compares the document these hashes describe (new) with `old`'s, block by block.
    pub(crate) fn compare(&self, old: &DocHashes) -> Compared {
        let b = self.block;
        let comparable = b == old.block;
        let prefix = common_len(&self.front, &old.front, |k| {
            block_len(k, self.len, b)
                .filter(|len| comparable && block_len(k, old.len, b) == Some(*len))
        });
        let suffix = common_len(&self.back, &old.back, |j| {
            block_len(j, self.len, b)
                .filter(|len| comparable && block_len(j, old.len, b) == Some(*len))
        });
        let shorter = self.len.min(old.len);
        let prefix = prefix.min(shorter);
        Compared {
            len: self.len,
            prefix,
            suffix: suffix.min(shorter - prefix),
            same: self == old,
        }
    }
}

/// Bytes covered by the leading blocks that hash alike and are as long in both documents
/// (`both_len(k)`: the length of block `k` if it is the same in both).
fn common_len(new: &[u128], old: &[u128], both_len: impl Fn(usize) -> Option<usize>) -> usize {
    let mut covered = 0;
    for (k, (a, b)) in new.iter().zip(old).enumerate() {
        match both_len(k) {
            Some(len) if a == b => covered += len,
            _ => break,
        }
    }
    covered
}

/// Where block `k` starts, counted from either end of the document.
fn block_start(k: usize, block: usize) -> usize {
    let ramp = block.trailing_zeros() as usize;
    match k {
        0 => 0,
        k if k <= ramp + 1 => 1 << (k - 1),
        k => block.saturating_mul(k - ramp),
    }
}

/// Length of block `k` of a `len`-byte document, if there is one (counted from either end:
/// the two layouts mirror each other).
fn block_len(k: usize, len: usize, block: usize) -> Option<usize> {
    let start = block_start(k, block);
    (start < len).then(|| block_start(k + 1, block).min(len) - start)
}

/// The ends of the blocks of a `len`-byte document, in document order: counted from its start
/// (`from_end` false) or from its end.
fn block_ends(len: usize, block: usize, from_end: bool) -> Vec<usize> {
    let starts = (0..)
        .map(|k| block_start(k, block))
        .take_while(|at| *at < len);
    if from_end {
        // Block j counted from the end ends `block_start(j)` bytes before the end.
        let mut ends: Vec<usize> = starts.map(|at| len - at).collect();
        ends.reverse();
        ends
    } else {
        starts.skip(1).chain((len > 0).then_some(len)).collect()
    }
}

fn seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // std's RandomState is keyed from the OS's random source once per process.
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    })
}

fn hash(block: &[u8]) -> u128 {
    xxh3_128_with_seed(block, seed())
}

/// Hashes a document of known length fed in order, in pieces of any size.
pub(crate) struct Hashing {
    len: usize,
    block: usize,
    fed: usize,
    front: Splitter,
    back: Splitter,
}

impl Hashing {
    pub(crate) fn new(len: usize, block: usize) -> Hashing {
        assert!(block.is_power_of_two(), "block size {block}");
        Hashing {
            len,
            block,
            fed: 0,
            front: Splitter::new(block_ends(len, block, false)),
            back: Splitter::new(block_ends(len, block, true)),
        }
    }

    /// The next `bytes` of the document.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        let bytes = &bytes[..bytes.len().min(self.len - self.fed)];
        self.front.feed(self.fed, bytes);
        self.back.feed(self.fed, bytes);
        self.fed += bytes.len();
    }

    /// The hashes, once all `len` bytes were fed.
    pub(crate) fn finish(self) -> DocHashes {
        debug_assert_eq!(self.fed, self.len, "document fed in full");
        let mut back = self.back.hashes;
        back.reverse();
        DocHashes {
            len: self.len,
            block: self.block,
            front: self.front.hashes,
            back,
        }
    }
}

/// Cuts a stream into blocks at the given ends and hashes each; a block cut by a piece
/// boundary is carried.
struct Splitter {
    /// Block ends, in order; `next` is the block being filled.
    ends: Vec<usize>,
    next: usize,
    /// Its bytes so far, when it spans pieces.
    carry: Vec<u8>,
    hashes: Vec<u128>,
}

impl Splitter {
    fn new(ends: Vec<usize>) -> Splitter {
        Splitter {
            hashes: Vec::with_capacity(ends.len()),
            ends,
            next: 0,
            carry: Vec::new(),
        }
    }

    fn feed(&mut self, mut at: usize, mut bytes: &[u8]) {
        while let Some(&end) = self.ends.get(self.next)
            && !bytes.is_empty()
        {
            let take = (end - at).min(bytes.len());
            let (piece, rest) = bytes.split_at(take);
            let block_done = at + take == end;
            if self.carry.is_empty() && block_done {
                // The whole block is in this piece: no copy.
                self.hashes.push(hash(piece));
            } else {
                self.carry.extend_from_slice(piece);
                if block_done {
                    self.hashes.push(hash(&self.carry));
                    self.carry.clear();
                }
            }
            if block_done {
                self.next += 1;
            }
            at += take;
            bytes = rest;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egress_guard_testkit::rng::XorShift64;

    /// A document of `len` bytes of a few letters, from `seed`.
    fn doc(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = XorShift64::new(seed | 1);
        (0..len).map(|_| b'a' + rng.below(3) as u8).collect()
    }

    fn naive(old: &[u8], new: &[u8]) -> (usize, usize) {
        let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
        let max = old.len().min(new.len()) - prefix;
        let suffix = old
            .iter()
            .rev()
            .zip(new.iter().rev())
            .take(max)
            .take_while(|(a, b)| a == b)
            .count();
        (prefix, suffix)
    }

    #[test]
    fn fed_in_any_pieces_the_hashes_are_those_of_the_whole() {
        for len in [
            0,
            1,
            BLOCK - 1,
            BLOCK,
            BLOCK + 1,
            3 * BLOCK + 17,
            10 * BLOCK,
        ] {
            let bytes = doc(len, len as u64);
            let whole = DocHashes::of(&bytes);
            for piece in [1, 7, BLOCK - 1, BLOCK, BLOCK + 3, 5 * BLOCK] {
                let mut hashing = Hashing::new(len, BLOCK);
                for part in bytes.chunks(piece) {
                    hashing.feed(part);
                }
                assert_eq!(hashing.finish(), whole, "len {len}, pieces of {piece}");
            }
        }
    }

    #[test]
    fn the_common_span_is_never_more_than_what_is_common_and_close_to_it() {
        let mut seed = 1u64;
        for len in [0, 1, 100, BLOCK - 1, BLOCK, BLOCK + 1, 9 * BLOCK + 5] {
            let old = doc(len, seed);
            for edit in 0..40u64 {
                seed += 1;
                let mut new = old.clone();
                let at = (seed as usize * 7919) % (len + 1);
                match edit % 4 {
                    0 if !new.is_empty() => new[at.min(len - 1)] ^= 0x10,
                    1 => {
                        let extra = doc((seed as usize * 31) % (2 * BLOCK), seed);
                        new.splice(at..at, extra);
                    }
                    2 => {
                        let end = (at + (seed as usize * 13) % (2 * BLOCK)).min(len);
                        new.drain(at..end);
                    }
                    _ => {}
                }
                let got = DocHashes::of(&new).compare(&DocHashes::of(&old));
                let (prefix, suffix) = naive(&old, &new);
                assert_eq!(got.same, old == new);
                // Never more than what is common...
                let (p, s) = (got.prefix, got.suffix);
                assert!(p + s <= old.len().min(new.len()), "{got:?}");
                assert_eq!(old[..p], new[..p], "{got:?}");
                assert_eq!(old[old.len() - s..], new[new.len() - s..], "{got:?}");
                // ...and less than a block short of it at either end (blocks are found whole).
                assert!(
                    prefix + suffix - (p + s) < 2 * BLOCK,
                    "{got:?} vs {prefix}+{suffix}"
                );
                if old == new {
                    assert_eq!((p, s), (len, 0));
                }
            }
        }
    }

    #[test]
    fn the_same_length_with_a_different_byte_is_not_the_same() {
        let old = doc(3 * BLOCK + 9, 5);
        for at in [0, BLOCK - 1, BLOCK, 2 * BLOCK + 4, old.len() - 1] {
            let mut new = old.clone();
            new[at] ^= 1;
            let got = DocHashes::of(&new).compare(&DocHashes::of(&old));
            assert!(!got.same);
            assert!(
                got.prefix <= at && at < got.len - got.suffix,
                "{at}: {got:?}"
            );
        }
    }
}
