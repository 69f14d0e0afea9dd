use super::blocks::{Compared, DocHashes};
use super::diff::{Keep, diff_bytes, diff_file};
use super::file::{
    OpenFailure, changed_or_io, ensure_regular, open_nonblocking, read_bounded, read_exact_at,
    read_locked,
};
use super::*;
use std::fs::File;
use std::io::Read;
use std::time::Instant;

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
    nix::unistd::mkfifo(&store, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
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
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
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
    let read =
        diff_file(&file, &store, len, &old, &mut chunk, span(), READ_DEADLINE).expect("consistent");
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

/// The instance index of Diego's `log_config` (a JSON string): read when it is there, and
/// never a reason to refuse an entry when it is not readable.
#[test]
fn the_instance_index_comes_from_log_config() {
    let snapshot = parse(
        r#"{
          "a": {"handle": "a", "ip": "10.255.0.2", "metadata": {"log_config": "{\"guid\":\"g\",\"index\":3}"}},
          "b": {"handle": "b", "ip": "10.255.0.3", "metadata": {"log_config": "not json"}},
          "c": {"handle": "c", "ip": "10.255.0.4", "metadata": {"log_config": {"index": 1}}}
        }"#,
    )
    .expect("parses");
    let index: Vec<Option<u32>> = snapshot.entries.iter().map(|e| e.log_index).collect();
    assert_eq!(index, [Some(3), None, None]);
    assert!(snapshot.problems.is_empty());
}
