//! The incremental reader against `parse_store`, the reference: seeded random sequences of
//! silk-like and hostile documents, the usual one-container changes, and reads through the
//! filesystem.

use super::super::READ_CHUNK;
use super::super::blocks::{BLOCK, DocHashes};
use super::super::diff::read_store_diff;

/// Blocks this small splice documents of a few entries (the reader's code is the same for any
/// block size; production's 4 KiB is tested on larger documents below).
const SMALL_BLOCK: usize = 32;
use super::*;
use egress_guard_testkit::rng::XorShift64;
use serde_json::{Value, json};

const PATH: &str = "/test/store.json";

/// The test support's generator, seeded as these tests always were.
type Rng = XorShift64;

fn seeded(seed: u64) -> Rng {
    XorShift64::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
}

type Model = BTreeMap<String, Value>;

/// A handle from a small pool, so that handles come back after removal and share long prefixes
/// (as GUIDs from one cell do not, but the comparison must not care).
fn handle(rng: &mut Rng) -> String {
    let i = rng.index(48);
    match i % 8 {
        0 => format!("check-{i:04x}"),
        1 => format!("6f2c0a6e-6d5e-4b1f-7a3c-{i:012x}"),
        _ => format!(
            "{:08x}-6d5e-4b1f-7a3c-1d2e3f4a5b6c",
            (i as u32).wrapping_mul(0x9e37_79b1)
        ),
    }
}

/// An entry as silk writes it, now and then one the agent cannot use.
fn silk_entry(rng: &mut Rng, handle: &str) -> Value {
    if handle.starts_with("check-") {
        return json!({"handle": handle, "ip": format!("10.255.1.{}", rng.index(256)),
                      "metadata": {"healthcheck": "true"}});
    }
    let app = format!("{:016x}", rng.next_u64());
    let workload = *rng.pick(&["app", "app", "task", "staging"]);
    let mut metadata = json!({
        "app_id": app,
        "space_id": "3d2b7f61-5c4e-4a7b-9d0e-2f6a1b8c9d0e",
        "org_id": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
        "policy_group_id": app,
        "ports": "8080,2222",
        "container_workload": workload,
        "log_config": format!(
            "{{\"guid\":\"{app}\",\"index\":{},\"tags\":{{\"app_name\":\"a<b&c>\",\"space_name\":\"é\"}}}}",
            rng.index(3)
        ),
    });
    let mut ip = Value::from(format!("10.255.0.{}", rng.index(256)));
    match rng.index(40) {
        0 => metadata = Value::Null,
        1 => ip = Value::from("10.255.0.300"),
        2 => ip = Value::from("fd00::1"),
        3 => ip = Value::from(17),
        4 => metadata["container_workload"] = Value::from(true),
        5 => metadata = json!(["staging"]),
        6 => {
            if let Some(m) = metadata.as_object_mut() {
                m.remove("container_workload");
            }
        }
        _ => {}
    }
    json!({"handle": handle, "ip": ip, "metadata": metadata})
}

/// As silk's Go writer: compact, keys sorted, `<` `>` `&` escaped, one trailing newline.
fn silk_bytes(model: &Model) -> Vec<u8> {
    let text = serde_json::to_string(model).expect("serialise");
    let text = text
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026");
    let mut bytes = text.into_bytes();
    bytes.push(b'\n');
    bytes
}

/// Valid JSON silk would not write: whitespace anywhere, members shuffled or repeated, values of
/// any type, escaped keys.
fn unusual_bytes(rng: &mut Rng, model: &Model) -> Vec<u8> {
    const WS: [&str; 5] = [" ", "\n", "\t", "\r\n  ", "  "];
    let ws = |rng: &mut Rng| {
        if rng.percent(70) {
            ""
        } else {
            WS[rng.index(WS.len())]
        }
    };
    let mut members: Vec<(String, String)> = model
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::to_string(v).expect("value")))
        .collect();
    if !members.is_empty() && rng.percent(30) {
        let i = rng.index(members.len());
        let j = rng.index(members.len());
        members.swap(i, j);
    }
    if !members.is_empty() && rng.percent(30) {
        let copy = members[rng.index(members.len())].clone();
        let at = rng.index(members.len() + 1);
        members.insert(at, copy);
    }
    if !members.is_empty() && rng.percent(30) {
        let i = rng.index(members.len());
        members[i].1 = rng
            .pick(&[
                "0", "-1.5e3", "12", "true", "false", "null", "\"x\"", "[]", "{}",
            ])
            .to_string();
    }
    let mut out = String::new();
    out.push_str(ws(rng));
    out.push('{');
    for (n, (key, value)) in members.iter().enumerate() {
        if n > 0 {
            out.push_str(ws(rng));
            out.push(',');
        }
        out.push_str(ws(rng));
        let key = serde_json::to_string(key).expect("key");
        if rng.percent(10) {
            // The same key, its first character as a \u escape.
            let first = key.chars().nth(1).unwrap_or('a');
            out.push_str(&format!(
                "\"\\u{:04x}{}",
                first as u32,
                &key[1 + first.len_utf8()..]
            ));
        } else {
            out.push_str(&key);
        }
        out.push_str(ws(rng));
        out.push(':');
        out.push_str(ws(rng));
        out.push_str(value);
    }
    out.push_str(ws(rng));
    out.push('}');
    out.push_str(ws(rng));
    out.into_bytes()
}

/// Changes the model as silk would: add, remove or change one or several entries.
fn mutate_model(rng: &mut Rng, model: &mut Model) {
    let edits = if rng.percent(75) { 1 } else { 2 + rng.index(4) };
    for _ in 0..edits {
        match rng.index(5) {
            0 | 1 => {
                let h = handle(rng);
                let e = silk_entry(rng, &h);
                model.insert(h, e);
            }
            2 => {
                if let Some(h) = model.keys().nth(rng.index(model.len().max(1))).cloned() {
                    model.remove(&h);
                }
            }
            3 => {
                let len = model.len();
                if let Some((h, v)) = model.iter_mut().nth(rng.index(len.max(1))) {
                    *v = silk_entry(rng, h);
                }
            }
            _ => {
                // The first or the last, re-created.
                let h = if rng.percent(50) {
                    model.keys().next()
                } else {
                    model.keys().next_back()
                };
                if let Some(h) = h.cloned() {
                    let e = silk_entry(rng, &h);
                    model.insert(h, e);
                }
            }
        }
    }
    if rng.percent(2) {
        model.clear();
    }
}

/// A hostile edit of `bytes`: bytes flipped, inserted, deleted; truncation; garbage; or
/// something else altogether.
fn hostile(rng: &mut Rng, bytes: &[u8]) -> Vec<u8> {
    const ALPHABET: &[u8] = b"{}[],:\"\\ \n\t\r\x0c0123456789-.eE+truefalsnxu\xff\xc3\xa9\x00";
    let mut out = bytes.to_vec();
    let at = |rng: &mut Rng, len: usize| rng.index(len + 1);
    match rng.index(10) {
        0 if !out.is_empty() => {
            let i = rng.index(out.len());
            out[i] = *rng.pick(ALPHABET);
        }
        1 => {
            let i = at(rng, out.len());
            for _ in 0..1 + rng.index(3) {
                out.insert(i, *rng.pick(ALPHABET));
            }
        }
        2 if !out.is_empty() => {
            let i = rng.index(out.len());
            let n = (1 + rng.index(40)).min(out.len() - i);
            out.drain(i..i + n);
        }
        3 => out.truncate(at(rng, bytes.len())),
        4 => {
            let garbage = *rng.pick(&[&b"x"[..], b"{}", b",", b"\x0c", b"0", b" ", b"}"]);
            out.extend_from_slice(garbage);
        }
        5 => {
            // Whitespace, or what is not JSON whitespace, often right after a value (before
            // `,` or `}`), where the changed span then starts.
            let ends: Vec<usize> = (0..out.len())
                .filter(|&i| out[i] == b',' || out[i] == b'}')
                .collect();
            let i = if !ends.is_empty() && rng.percent(70) {
                *rng.pick(&ends)
            } else {
                at(rng, out.len())
            };
            let ws = *rng.pick(&[&b" "[..], b"\n", b"\t\r", b"\x0c", b" \x0c", b"\x0b"]);
            out.splice(i..i, ws.iter().copied());
        }
        6 => {
            // A member's text copied elsewhere: duplicate keys, or nonsense.
            let starts: Vec<usize> = (0..out.len()).filter(|&i| out[i] == b',').collect();
            if starts.len() >= 2 {
                let a = *rng.pick(&starts);
                let b = starts
                    .iter()
                    .copied()
                    .find(|&b| b > a)
                    .unwrap_or(out.len() - 1);
                let piece = out[a..b].to_vec();
                let i = *rng.pick(&starts);
                out.splice(i..i, piece);
            }
        }
        7 => {
            out = rng
                .pick(&[
                    &b""[..],
                    b"  \n",
                    b"\x0c",
                    b"{}",
                    b"{}\n",
                    b" { } ",
                    b"[]",
                    b"42",
                    b"null",
                    b"\"store\"",
                    b"{\"a\":1}",
                    b"{\"a\":1,\"a\":{\"ip\":\"10.255.0.1\"}}",
                    b"{\"\\u0061\":{\"ip\":\"10.255.0.2\"},\"a\":7}",
                    b"{\"\\ud83d\\ude00\":{\"ip\":\"10.255.0.3\"}}",
                    b"{\"\\ud800\":1}",
                    b"{,}",
                    b"{\"a\":1,}",
                ])
                .to_vec();
        }
        8 => {
            // A value replaced by a number or literal, next to the unchanged suffix.
            if let Some(i) = out.iter().rposition(|&b| b == b':') {
                let end = out[i..].iter().position(|&b| b == b',' || b == b'}');
                let end = end.map_or(out.len(), |e| i + e);
                let v = *rng.pick(&[&b"1"[..], b"12e", b"tru", b"true", b"-", b"0.5", b"nul"]);
                out.splice(i + 1..end, v.iter().copied());
            }
        }
        _ => {
            if !out.is_empty() {
                let i = rng.index(out.len());
                out[i] ^= 1 << rng.index(8);
            }
        }
    }
    out
}

fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(600)]).into_owned()
}

/// Applies `bytes` and checks the reader against `parse_store` and its own previous state.
/// Returns how it read them (None: the bytes were refused, as parse_store refuses them).
fn check_step(reader: &mut StoreReader, bytes: &[u8], full: bool) -> Option<ReadKind> {
    let before_entries = reader.entries.clone();
    let before_hashes = reader.hashes.clone();
    let before_last = reader.last_read;
    let expected = parse_store(Path::new(PATH), bytes);
    let got = reader.apply_bytes(bytes, full);
    match (expected, got) {
        (Ok(snapshot), Ok(delta)) => {
            assert_eq!(reader.snapshot(), snapshot, "doc {:?}", printable(bytes));
            // The delta, applied to what was there, gives what is there now; it is sorted,
            // lists each handle once, and only real changes.
            let mut model = before_entries.clone();
            for pair in delta.changed.windows(2) {
                assert!(pair[0].0 < pair[1].0, "delta not sorted: {delta:?}");
            }
            for (handle, now) in &delta.changed {
                assert_ne!(
                    before_entries.get(handle),
                    now.as_ref(),
                    "not a change: {handle}"
                );
                match now {
                    Some(parsed) => model.insert(handle.clone(), parsed.clone()),
                    None => model.remove(handle),
                };
            }
            assert_eq!(&model, reader.entries(), "doc {:?}", printable(bytes));
            assert_eq!(
                reader.hashes,
                DocHashes::of_blocks(bytes, reader.hashes.block())
            );
            // The index kept up to date equals the one a full parse builds.
            let (_, fresh) = parse_full(Path::new(PATH), bytes).expect("parses");
            assert_eq!(reader.index, fresh, "doc {:?}", printable(bytes));
            let kind = reader.last_read().expect("read");
            if full {
                assert_eq!(kind, ReadKind::Full);
            }
            Some(kind)
        }
        (Err(want), Err(got)) => {
            assert_eq!(
                std::mem::discriminant(&want),
                std::mem::discriminant(&got),
                "{want} vs {got}"
            );
            assert_eq!(want.to_string(), got.to_string());
            // The last good entries stay; the refused document is what the next read is
            // compared with, and it will be parsed in full.
            assert_eq!(reader.entries, before_entries);
            assert_eq!(
                reader.hashes,
                DocHashes::of_blocks(bytes, reader.hashes.block())
            );
            assert!(!reader.doc_good);
            assert_eq!(reader.index, None);
            assert_eq!(reader.last_read, before_last);
            None
        }
        (want, got) => panic!(
            "parse_store gave {want:?}, the reader {got:?}, for {:?} after {before_hashes:?}",
            printable(bytes),
        ),
    }
}

#[derive(Default, Debug)]
struct Tally {
    unchanged: usize,
    incremental: usize,
    full: usize,
    refused: usize,
}

impl Tally {
    fn count(&mut self, kind: Option<ReadKind>) {
        match kind {
            Some(ReadKind::Unchanged) => self.unchanged += 1,
            Some(ReadKind::Incremental { .. }) => self.incremental += 1,
            Some(ReadKind::Full) => self.full += 1,
            None => self.refused += 1,
        }
    }
}

// Two halves of the seeds, so that the harness runs them in parallel.
#[test]
fn random_sequences_match_parse_store_1() {
    random_sequences(1..=1_000);
}

#[test]
fn random_sequences_match_parse_store_2() {
    random_sequences(1_001..=2_000);
}

/// 12 reads after a first one per seed, each checked by [`check_step`].
fn random_sequences(seeds: std::ops::RangeInclusive<u64>) {
    let mut tally = Tally::default();
    // Unusual or hostile documents that were accepted, and of those, how many were spliced.
    let (mut odd_accepted, mut odd_spliced) = (0, 0);
    for seed in seeds {
        let mut rng = seeded(seed);
        let mut reader = StoreReader::with_block(PathBuf::from(PATH), SMALL_BLOCK);
        let mut model = Model::new();
        for _ in 0..rng.index(12) {
            let h = handle(&mut rng);
            let e = silk_entry(&mut rng, &h);
            model.insert(h, e);
        }
        // The last document given to the reader (which keeps only its hashes).
        let mut last = silk_bytes(&model);
        tally.count(check_step(&mut reader, &last, false));
        for _ in 0..12 {
            let full = rng.percent(5);
            let (bytes, odd) = match rng.index(10) {
                0..=4 => {
                    mutate_model(&mut rng, &mut model);
                    (silk_bytes(&model), false)
                }
                5 => {
                    mutate_model(&mut rng, &mut model);
                    (unusual_bytes(&mut rng, &model), true)
                }
                6 => (silk_bytes(&model), false),
                _ => (hostile(&mut rng, &last), true),
            };
            let kind = check_step(&mut reader, &bytes, full);
            last = bytes;
            if odd && kind.is_some() {
                odd_accepted += 1;
                if matches!(kind, Some(ReadKind::Incremental { .. })) {
                    odd_spliced += 1;
                }
            }
            tally.count(kind);
        }
    }
    // Every path must actually have been exercised, the incremental one on odd input too.
    assert!(tally.incremental > 4_000, "{tally:?}");
    assert!(tally.full > 1_000, "{tally:?}");
    assert!(tally.unchanged > 500, "{tally:?}");
    assert!(tally.refused > 1_000, "{tally:?}");
    assert!(
        odd_accepted > 1_000 && odd_spliced > 500,
        "{odd_accepted} odd documents accepted, {odd_spliced} spliced; {tally:?}"
    );
}

/// A silk store of `n` entries, all usable, handles spread across the range.
fn silk_store(n: usize) -> Model {
    let mut rng = seeded(7);
    (0..n)
        .map(|i| {
            let h = format!(
                "{:08x}-6d5e-4b1f-7a3c-1d2e3f4a5b6c",
                (i as u32 + 1).wrapping_mul(0x0147_ae14)
            );
            let mut e = silk_entry(&mut rng, &h);
            e["ip"] = Value::from(format!("10.255.{}.{}", i / 250, i % 250 + 2));
            e["metadata"] = json!({"app_id": format!("a{i}"), "container_workload": "app",
                                   "log_config": "{\"guid\":\"x\"}", "ports": "8080"});
            (h, e)
        })
        .collect()
}

#[test]
fn one_container_changes_are_incremental() {
    one_container_changes(SMALL_BLOCK, 2);
}

/// The production block size on a store of 200 entries (40 KB): a change re-parses the entries
/// of the blocks around it, a block's worth (4 KiB, 20 entries of ~200 bytes) on each side at
/// most, whichever container changes, the first and the last included.
#[test]
fn one_container_changes_are_incremental_with_production_blocks() {
    one_container_changes(BLOCK, 2 + 2 * BLOCK.div_ceil(190));
}

fn one_container_changes(block: usize, max_reparsed: usize) {
    let base = silk_store(200);
    let handles: Vec<String> = base.keys().cloned().collect();
    let staging = |h: &str| {
        json!({"handle": h, "ip": "10.255.9.9",
               "metadata": {"app_id": "s", "container_workload": "staging"}})
    };
    let middle = handles[100].clone();
    let (first, last) = (handles[0].clone(), handles[199].clone());
    let mut cases: Vec<(&str, Model, Vec<String>)> = Vec::new();
    for (name, h) in [
        (
            "add first",
            "00000000-0000-4000-8000-000000000000".to_string(),
        ),
        ("add middle", format!("{}0", &middle[..middle.len() - 1])),
        (
            "add last",
            "ffffffff-ffff-4fff-8fff-ffffffffffff".to_string(),
        ),
    ] {
        let mut m = base.clone();
        m.insert(h.clone(), staging(&h));
        cases.push((name, m, vec![h]));
    }
    for (name, h) in [
        ("remove first", &first),
        ("remove middle", &middle),
        ("remove last", &last),
    ] {
        let mut m = base.clone();
        m.remove(h);
        cases.push((name, m, vec![h.clone()]));
    }
    for (name, h) in [
        ("modify first", &first),
        ("modify middle", &middle),
        ("modify last", &last),
    ] {
        let mut m = base.clone();
        m.insert(h.clone(), staging(h));
        cases.push((name, m, vec![h.clone()]));
    }
    // Rewritten with a field the agent does not read: bytes differ, nothing changed.
    let mut m = base.clone();
    m.get_mut(&middle).expect("middle")["metadata"]["ports"] = Value::from("9090");
    cases.push(("modify unread field", m, vec![]));

    for (name, changed, handles) in cases {
        for (from, to, listed) in [(&base, &changed, &handles), (&changed, &base, &handles)] {
            let mut reader = StoreReader::with_block(PathBuf::from(PATH), block);
            check_step(&mut reader, &silk_bytes(from), false);
            assert_eq!(reader.last_read(), Some(ReadKind::Full));
            let kind = check_step(&mut reader, &silk_bytes(to), false);
            assert!(
                matches!(kind, Some(ReadKind::Incremental { reparsed }) if reparsed <= max_reparsed),
                "{name}: {kind:?}"
            );
            let delta = reader
                .apply_bytes(&silk_bytes(to), false)
                .expect("same again");
            assert_eq!(reader.last_read(), Some(ReadKind::Unchanged), "{name}");
            assert!(delta.changed.is_empty());
            // Against the first read, the delta names just the handles touched.
            let mut reader = StoreReader::with_block(PathBuf::from(PATH), block);
            reader.apply_bytes(&silk_bytes(from), false).expect("base");
            let delta = reader.apply_bytes(&silk_bytes(to), false).expect("change");
            let got: Vec<&String> = delta.changed.iter().map(|(h, _)| h).collect();
            assert_eq!(got, listed.iter().collect::<Vec<_>>(), "{name}");
        }
    }
}

#[test]
fn duplicate_keys_go_to_the_full_parse() {
    let entry = |ip: &str| format!("{{\"ip\":\"{ip}\",\"metadata\":null}}");
    let (a1, a2, b, c) = (
        entry("10.255.0.1"),
        entry("10.255.0.2"),
        entry("10.255.0.3"),
        entry("10.255.0.4"),
    );
    let base = format!("{{\"a\":{a1},\"b\":{b},\"c\":{c}}}");
    // A second "a" in the changed span, kept "a" before it: the last one wins.
    let dup = format!("{{\"a\":{a1},\"b\":{b},\"a\":{a2},\"c\":{c}}}");
    let mut reader = StoreReader::with_block(PathBuf::from(PATH), SMALL_BLOCK);
    check_step(&mut reader, base.as_bytes(), false);
    assert_eq!(
        check_step(&mut reader, dup.as_bytes(), false),
        Some(ReadKind::Full)
    );
    assert_eq!(reader.index, None);
    let ip = |r: &StoreReader| match &r.entries()["a"] {
        Ok(entry) => entry.ip.to_string(),
        Err(reason) => reason.clone(),
    };
    assert_eq!(ip(&reader), "10.255.0.2");
    // A key twice in the changed span.
    let dup_span = base.replace(
        &format!(",\"c\":{c}"),
        &format!(",\"z\":{a1},\"z\":{a2},\"c\":{c}"),
    );
    let mut fresh = StoreReader::with_block(PathBuf::from(PATH), SMALL_BLOCK);
    check_step(&mut fresh, base.as_bytes(), false);
    assert_eq!(
        check_step(&mut fresh, dup_span.as_bytes(), false),
        Some(ReadKind::Full)
    );
    // From a document with duplicates, the next change is parsed in full too.
    let dup_changed = dup.replace("10.255.0.4", "10.255.0.5");
    assert_eq!(
        check_step(&mut reader, dup_changed.as_bytes(), false),
        Some(ReadKind::Full)
    );
    // Back to distinct keys: indexed again, and splicing resumes.
    check_step(&mut reader, base.as_bytes(), false);
    assert!(reader.index.is_some());
    let escaped = base.replace("\"b\"", "\"\\u0062\"");
    assert!(matches!(
        check_step(&mut reader, escaped.as_bytes(), false),
        Some(ReadKind::Incremental { .. })
    ));
    assert!(reader.entries().contains_key("b"));
    // An escaped spelling of a kept key is still that key.
    let dup_escaped = base.replace(&format!(",\"c\":{c}"), &format!(",\"\\u0061\":{c}"));
    assert_eq!(
        check_step(&mut reader, dup_escaped.as_bytes(), false),
        Some(ReadKind::Full)
    );
}

#[test]
fn numbers_and_literals_next_to_the_unchanged_text() {
    let mut reader = StoreReader::with_block(PathBuf::from(PATH), SMALL_BLOCK);
    for doc in [
        r#"{"a":1,"b":2}"#,
        r#"{"a":12,"b":2}"#,
        r#"{"a":12,"b":23}"#,
        r#"{"a":12,"b":2 }"#,
        r#"{"a":1 ,"b":2}"#,
        r#"{"a":1,"b":2}"#,
        r#"{"a":1,"b":2,"c":true}"#,
        r#"{"a":1,"b":2,"c":truee}"#,
        r#"{"a":1,"b":2,"c":tru}"#,
        r#"{"a":1,"b":2,"c":true,}"#,
        r#"{"a":1,"b":2 "c":true}"#,
        r#"{"a":1,"b":2,"c":-0.5e+3}"#,
        r#"{"a":1,,"b":2}"#,
        r#"{"a":1}"#,
        r#"{"a":1,}"#,
        r#"{,"a":1}"#,
        r#"{}"#,
        r#"{"a":1}"#,
        r#"{"a":1}x"#,
        r#"{"a":1}{}"#,
        r#"{"a":1} "#,
        "{\"a\":1}\u{c}",
        "{\"a\":1,\"b\":2}",
        "{\"a\":1\u{c},\"b\":2}",
        "{\"a\":1\u{c}\u{c},\"b\":2}",
        "{\"a\":1,\"b\":2\u{c}}",
        "{\u{c}\"a\":1,\"b\":2}",
        r#"{"a":{"ip":"10.255.0.1"}}"#,
        r#"{"a":{"ip":"10.255.0.1"},"é":{"ip":"10.255.0.2"}}"#,
        r#"{"a":{"ip":"10.255.0.1"},"\u00e9":{"ip":"10.255.0.3"}}"#,
        r#"{"a":{"ip":"10.255.0.1"},"\u00e9":{"ip":"10.255.0.3"},"\ud800":1}"#,
    ] {
        check_step(&mut reader, doc.as_bytes(), false);
    }
}

#[test]
fn full_reads_give_the_same_entries_and_only_real_differences() {
    let base = silk_store(30);
    let mut reader = StoreReader::with_block(PathBuf::from(PATH), SMALL_BLOCK);
    let delta = reader.apply_bytes(&silk_bytes(&base), true).expect("base");
    assert_eq!(delta.changed.len(), 30);
    assert!(delta.changed.iter().all(|(_, now)| now.is_some()));
    let entries = reader.entries().clone();
    let delta = reader.apply_bytes(&silk_bytes(&base), true).expect("again");
    assert_eq!(reader.last_read(), Some(ReadKind::Full));
    assert!(delta.changed.is_empty());
    assert_eq!(reader.entries(), &entries);
    let mut changed = base.clone();
    let h = base.keys().nth(3).cloned().expect("3");
    changed.get_mut(&h).expect("h")["ip"] = Value::from("10.255.7.7");
    let delta = reader
        .apply_bytes(&silk_bytes(&changed), true)
        .expect("one");
    assert_eq!(reader.last_read(), Some(ReadKind::Full));
    assert_eq!(delta.changed.len(), 1);
    assert_eq!(delta.changed[0].0, h);
    assert_eq!(
        delta.changed[0]
            .1
            .as_ref()
            .map(|p| p.as_ref().map(|e| e.ip.to_string())),
        Some(Ok("10.255.7.7".to_string()))
    );
}

#[test]
fn reads_through_the_filesystem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store.json");
    let mut reader = StoreReader::new(store.clone());
    assert_eq!(reader.path(), store);
    assert_eq!(reader.last_read(), None);
    // Missing: no containers.
    assert!(reader.read(false).expect("missing").changed.is_empty());
    assert!(reader.entries().is_empty());

    let base = silk_store(20);
    std::fs::write(&store, silk_bytes(&base)).expect("write");
    std::fs::write(super::super::lock_path(&store), "").expect("lock");
    let delta = reader.read(false).expect("created");
    assert_eq!(delta.changed.len(), 20);
    assert_eq!(reader.last_read(), Some(ReadKind::Full));
    let mut changed = base.clone();
    changed.remove(&base.keys().nth(5).cloned().expect("5"));
    std::fs::write(&store, silk_bytes(&changed)).expect("rewrite");
    assert_eq!(reader.read(false).expect("changed").changed.len(), 1);
    assert!(matches!(
        reader.last_read(),
        Some(ReadKind::Incremental { .. })
    ));
    assert_eq!(
        reader.snapshot(),
        super::super::read_store(&store).expect("read_store")
    );
    let good = reader.entries().clone();

    // Replaced by a FIFO, then a directory: refused, exactly as read_store refuses them; the
    // last good document stays.
    std::fs::remove_file(&store).expect("remove");
    nix::unistd::mkfifo(&store, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("fifo");
    for _ in 0..2 {
        let err = reader.read(false).expect_err("a FIFO");
        let want = super::super::read_store(&store).expect_err("a FIFO");
        assert_eq!(err.to_string(), want.to_string());
        assert!(matches!(err, StoreError::NotRegular { .. }), "{err}");
        assert_eq!(reader.entries(), &good);
        std::fs::remove_file(&store).expect("remove fifo");
        std::fs::create_dir(&store).expect("directory");
        let err = reader.read(false).expect_err("a directory");
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
        assert_eq!(reader.entries(), &good);
        std::fs::remove_dir(&store).expect("remove dir");
        nix::unistd::mkfifo(&store, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("fifo");
    }
    std::fs::remove_file(&store).expect("remove fifo");
    // A torn document: the parse error read_store gives; state kept.
    std::fs::write(&store, b"{\"half").expect("torn");
    let err = reader.read(false).expect_err("torn");
    let want = super::super::read_store(&store).expect_err("torn");
    assert_eq!(err.to_string(), want.to_string());
    assert_eq!(reader.entries(), &good);

    // Removed: every entry goes. Recreated: every entry comes back.
    std::fs::remove_file(&store).expect("remove");
    let delta = reader.read(false).expect("removed");
    assert_eq!(delta.changed.len(), 19);
    assert!(delta.changed.iter().all(|(_, now)| now.is_none()));
    assert!(reader.entries().is_empty());
    std::fs::write(&store, silk_bytes(&changed)).expect("recreate");
    assert_eq!(reader.read(false).expect("recreated").changed.len(), 19);
    assert_eq!(reader.entries(), &good);
    // An all-whitespace store is no containers, as read_store says.
    std::fs::write(&store, b"\n \x0c").expect("blank");
    assert_eq!(reader.read(false).expect("blank").changed.len(), 19);
    assert!(reader.entries().is_empty());
}

#[test]
fn a_refused_document_is_compared_with_and_parsed_in_full_next_time() {
    let base = silk_store(100);
    let mut changed = base.clone();
    changed.remove(&base.keys().nth(50).cloned().expect("50"));
    let (a, b) = (silk_bytes(&base), silk_bytes(&changed));
    let mut reader = StoreReader::with_block(PathBuf::from(PATH), SMALL_BLOCK);
    check_step(&mut reader, &a, false);
    check_step(&mut reader, &b, false);
    let junk = vec![b'x'; 4 * READ_CHUNK];
    assert_eq!(check_step(&mut reader, &junk, false), None);
    // The same refused bytes again: refused again, not "unchanged".
    assert_eq!(check_step(&mut reader, &junk, false), None);
    assert_eq!(check_step(&mut reader, &a, false), Some(ReadKind::Full));
    assert!(matches!(
        check_step(&mut reader, &b, false),
        Some(ReadKind::Incremental { .. })
    ));
}

/// silk's writer holds its lock while it truncates and rewrites the store: the reader, which
/// saw the file before the lock, must read the document the writer leaves, whatever its length.
#[test]
fn a_write_finished_while_waiting_for_the_lock_is_read_whole() {
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.json");
    let (small, large) = (silk_store(3), silk_store(40));
    std::fs::write(&path, silk_bytes(&small)).expect("write");
    let lock = std::fs::File::create(super::super::lock_path(&path)).expect("lock");
    let mut reader = StoreReader::new(path.clone());
    reader.read(false).expect("first read");
    let writer = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("exclusive");
    std::fs::write(&path, b"{\"half").expect("torn write in progress");
    let (bytes, writing) = (silk_bytes(&large), path.clone());
    let finisher = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(60));
        std::fs::write(&writing, bytes).expect("complete write");
        drop(writer);
    });
    reader.read(false).expect("the finished document");
    finisher.join().expect("writer");
    assert_eq!(
        reader.snapshot(),
        parse_store(&path, &silk_bytes(&large)).expect("parses")
    );
}

/// What `read_store_diff` reads from a file equals what the same read of the bytes in memory
/// gives, across chunk and block boundaries, for growth, shrinking, and changes at either end,
/// and the span it keeps is the new document's.
#[test]
fn reading_the_difference_from_a_file_equals_the_difference_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.json");
    let mut rng = seeded(7);
    let mut chunk = Vec::new();
    for len in [
        0,
        1,
        100,
        READ_CHUNK - 1,
        READ_CHUNK,
        READ_CHUNK + 1,
        3 * READ_CHUNK + 17,
    ] {
        let old: Vec<u8> = (0..len).map(|_| b'a' + rng.index(3) as u8).collect();
        let old_hashes = DocHashes::of(&old);
        for _ in 0..12 {
            let mut new = old.clone();
            match rng.index(4) {
                0 if !new.is_empty() => {
                    let at = rng.index(new.len());
                    new[at] = b'z';
                }
                1 => {
                    let at = rng.index(new.len() + 1);
                    let extra: Vec<u8> = (0..rng.index(3 * READ_CHUNK)).map(|_| b'q').collect();
                    new.splice(at..at, extra);
                }
                2 if !new.is_empty() => {
                    let at = rng.index(new.len());
                    let end = (at + rng.index(READ_CHUNK * 2)).min(new.len());
                    new.drain(at..end);
                }
                _ => {}
            }
            std::fs::write(&path, &new).expect("write");
            // Keep everything that differs, and a little of what does not.
            let keep = |c: Compared| (c.prefix.saturating_sub(5), c.suffix.saturating_sub(3));
            let read = read_store_diff(&path, &old_hashes, &mut chunk, Keep::Span(keep), &|| {})
                .expect("readable")
                .expect("present");
            assert_eq!(
                read,
                diff_bytes(&new, &old_hashes, Keep::Span(keep)),
                "len {len}"
            );
            assert_eq!(read.hashes, DocHashes::of(&new));
            assert_eq!(read.middle, new[read.prefix..new.len() - read.suffix]);
            assert_eq!(old[..read.prefix], new[..read.prefix]);
            assert_eq!(
                old[old.len() - read.suffix..],
                new[new.len() - read.suffix..]
            );
            let mut all = Vec::new();
            let whole = read_store_diff(&path, &old_hashes, &mut chunk, whole(&mut all), &|| {})
                .expect("readable")
                .expect("present");
            assert_eq!(whole.hashes, read.hashes);
            assert_eq!(all, new);
        }
    }
}

/// A full read of a store several regions long (`chunked.rs` parses ~64 KiB at a time) gives
/// parse_store's result, for silk's documents and for hostile edits of them, and keeps no
/// second copy of the document: the entries are updated in place from what differs.
#[test]
fn full_reads_of_large_stores_are_parsed_in_regions_exactly_as_parse_store() {
    let base = silk_store(1500);
    let bytes = silk_bytes(&base);
    assert!(
        bytes.len() > 4 * super::super::chunked::REGION,
        "{}",
        bytes.len()
    );
    let mut rng = seeded(42);
    let mut reader = StoreReader::new(PathBuf::from(PATH));
    assert_eq!(check_step(&mut reader, &bytes, true), Some(ReadKind::Full));
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..30 {
        let edited = hostile(&mut rng, &bytes);
        match check_step(&mut reader, &edited, true) {
            Some(_) => accepted += 1,
            None => refused += 1,
        }
        // Back to silk's document: every region parses, the index is rebuilt.
        assert_eq!(check_step(&mut reader, &bytes, true), Some(ReadKind::Full));
        assert!(reader.index.is_some());
    }
    assert!(
        accepted > 5 && refused > 5,
        "{accepted} accepted, {refused} refused"
    );
}

/// The parse in regions itself, fed in pieces of any size: silk's document gives every entry
/// and the index a full parse builds; a document of another shape gives up (the reader then
/// parses it whole).
#[test]
fn the_region_parse_takes_any_pieces_and_gives_up_on_other_shapes() {
    use super::super::chunked::ChunkedParse;
    use super::super::diff::Sink;
    let bytes = silk_bytes(&silk_store(800));
    let (entries, index) = parse_full(Path::new(PATH), &bytes).expect("parses");
    let none = BTreeMap::new();
    for piece in [1, 7, 4096, 65_537, bytes.len()] {
        let mut parse = ChunkedParse::new(&none);
        for part in bytes.chunks(piece) {
            parse.take(part);
        }
        let (changed, got) = parse.finish().expect("silk's shape");
        assert_eq!(Some(got), index, "pieces of {piece}");
        let got: BTreeMap<String, Parsed> = changed
            .into_iter()
            .map(|(h, p)| (h, p.expect("present")))
            .collect();
        assert_eq!(got, entries);
    }
    // Against the entries it already has, nothing differs.
    let mut parse = ChunkedParse::new(&entries);
    parse.take(&bytes);
    assert_eq!(parse.finish().expect("parses").0, Vec::new());
    let text = String::from_utf8(bytes.clone()).expect("utf-8");
    let first = text[2..].find('"').expect("key") + 2;
    for other in [
        "[]".to_string(),
        "{\"b\":{},\"a\":{}}".to_string(),
        "{\"a\":{},\"a\":{}}".to_string(),
        format!("{}]", &text[..text.len() - 2]),
        format!("{}, {}", &text[..first + 1], &text[first + 1..]),
        text.replacen(",", ",,", 1),
    ] {
        let mut parse = ChunkedParse::new(&none);
        parse.take(other.as_bytes());
        assert!(parse.finish().is_none(), "{}", printable(other.as_bytes()));
    }
}
