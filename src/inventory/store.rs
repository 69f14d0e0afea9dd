//! silk's container metadata store: a locked read and a lenient-per-entry, strict-per-file parse.
//!
//! The writer (silk's cni-wrapper-plugin) rewrites `store.json` in place under an exclusive
//! `flock` on `store.json_lock`, so a reader must hold a shared lock on the same file or it can
//! see an empty or half-written document. A missing store means "no containers yet" (silk's
//! pre-start deletes the directory on every deploy). A document that does not parse is an error:
//! the caller keeps its last good snapshot. One bad entry is reported and skipped; it can never
//! be exempt, because only entries that parse are ever considered for exemption.
//!
//! This module only reads; it never creates, locks exclusively or writes anything.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use serde_json::value::RawValue;

/// Metadata key Cloud Controller sets to `app`, `task` or `staging`.
pub const WORKLOAD_KEY: &str = "container_workload";
/// Handle prefix of Garden's own health-check containers.
pub const HEALTHCHECK_HANDLE_PREFIX: &str = "check-";
/// Largest store accepted: far above 5,000 containers (~1 KiB each), small enough to bound memory.
pub const MAX_STORE_BYTES: u64 = 64 * 1024 * 1024;
/// Longest wait for silk's writer to release its exclusive lock (a write takes well under 1 ms).
pub const LOCK_WAIT: Duration = Duration::from_millis(200);
/// Poll period while waiting for the lock.
const LOCK_RETRY: Duration = Duration::from_millis(2);

/// One container as the store describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreEntry {
    /// Garden container handle (the store's key).
    pub handle: String,
    /// Overlay IP silk gave the container.
    pub ip: Ipv4Addr,
    /// `container_workload`, when present and a string.
    pub workload: Option<String>,
    /// Selected Cloud Controller ids, for operators (`status`, `explain`).
    pub app_id: Option<String>,
    pub space_id: Option<String>,
    pub org_id: Option<String>,
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

/// Why the store as a whole could not be read. Enforcement never loosens on these.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read metadata store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot take shared lock on {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} stayed locked by the store's writer for over {LOCK_WAIT:?}")]
    Busy { path: PathBuf },
    #[error("metadata store {path} is larger than {MAX_STORE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("metadata store {path} is not valid JSON: {message}")]
    Malformed { path: PathBuf, message: String },
    #[error("metadata store {path} is not a JSON object keyed by container handle (found {found})")]
    WrongShape { path: PathBuf, found: &'static str },
}

/// The lock file silk's writer holds exclusively while rewriting `store`.
pub fn lock_path(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push("_lock");
    PathBuf::from(name)
}

/// Reads the store under a shared flock on its `_lock` sibling.
///
/// The lock file is opened read-only and never created: if it does not exist no writer is
/// using the protocol (or the directory was just wiped), and the parse below still rejects a
/// torn document.
pub fn read_store(path: &Path) -> Result<StoreSnapshot, StoreError> {
    let lock_file = lock_path(path);
    let _guard = match File::open(&lock_file) {
        Ok(file) => Some(lock_shared_bounded(file, &lock_file)?),
        Err(err) if err.kind() == ErrorKind::NotFound => None,
        Err(source) => {
            return Err(StoreError::Lock {
                path: lock_file,
                source,
            });
        }
    };

    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(StoreSnapshot::default()),
        Err(source) => {
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_STORE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > MAX_STORE_BYTES {
        return Err(StoreError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    parse_store(path, &bytes)
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
    let text = |key: &str, value: Option<Value>| -> Result<Option<String>, String> {
        match value {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(format!(
                "metadata `{key}` is {}, not a string",
                json_kind(&other)
            )),
        }
    };
    Ok(StoreEntry {
        handle: handle.to_string(),
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
        let handles: Vec<_> = snapshot.entries.iter().map(|e| e.handle.as_str()).collect();
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
        let good: Vec<_> = snapshot.entries.iter().map(|e| e.handle.as_str()).collect();
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
    fn missing_store_is_empty_and_unreadable_store_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.json");
        assert_eq!(
            read_store(&store).expect("missing"),
            StoreSnapshot::default()
        );

        std::fs::create_dir(&store).expect("a directory where the file should be");
        assert!(matches!(read_store(&store), Err(StoreError::Io { .. })));
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

    #[test]
    fn oversized_store_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.json");
        let file = File::create(&store).expect("create");
        file.set_len(MAX_STORE_BYTES + 10).expect("sparse file");
        assert!(matches!(
            read_store(&store),
            Err(StoreError::TooLarge { .. })
        ));
    }
}
