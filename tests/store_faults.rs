//! Root integration tests: whatever is put in place of silk's metadata store, the reconcile
//! loop never stalls. A FIFO, a directory or a 70 MB file at `store.json` while the real agent
//! runs in the simulated cell (see tests/cell.rs): readiness turns 503 naming the problem, the
//! rules from the last good store stay (real probes), a deleted table is still repaired, silk's
//! lock is never held past a bound, SIGTERM still stops the agent within 2 s, a restart with the
//! fault still in place fails closed, and a good store makes it ready again.
//!
//! Run (as root): `cargo test --test store_faults -- --include-ignored`

use egress_guard_testkit as support;

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::cell::{Cell, INET_HOST};
use support::http::{self, Response};
use support::store::Kind;

/// How long the agent may take to start and complete its first passes.
const READY: Duration = Duration::from_secs(10);
/// How long a change may take to show (reconcile_interval is 1 s in these tests).
const SOON: Duration = Duration::from_secs(5);
/// A deleted table must be back within this (an nf_tables event triggers the repair at once;
/// the 1 s periodic pass is the fallback).
const REPAIR: Duration = Duration::from_secs(3);
/// SIGTERM must end the agent within this, in every state.
const STOP: Duration = Duration::from_secs(2);
/// silk's writer must get its exclusive lock within this while the store is broken.
const LOCK_BOUND: Duration = Duration::from_millis(500);
/// How many times the lock is taken, spread over several reconcile passes.
const LOCK_ROUNDS: usize = 12;

/// What is put in place of `store.json`.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Fifo,
    Directory,
    /// A sparse 70,000,000-byte regular file (over the 32 MiB limit).
    Huge,
}

impl Fault {
    /// Creates the fault at `path`.
    fn create(self, path: &Path) {
        match self {
            Fault::Fifo => {
                nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .expect("mkfifo");
            }
            Fault::Directory => {
                std::fs::create_dir(path).expect("mkdir");
                std::fs::write(path.join("inside"), "{}").expect("a file inside");
            }
            Fault::Huge => {
                let file = std::fs::File::create(path).expect("create");
                file.set_len(70_000_000).expect("sparse 70 MB");
            }
        }
    }

    /// What `/readyz`'s reason must say (besides the store's path).
    fn expected(self) -> &'static [&'static str] {
        match self {
            Fault::Fifo => &["is a FIFO (named pipe), not a regular file"],
            Fault::Directory => &["is a directory, not a regular file"],
            Fault::Huge => &["70000000 bytes", "over the limit of 33554432 bytes"],
        }
    }
}

// ------------------------------------------------------------------ helpers

fn port(cell: &Cell) -> u16 {
    cell.agent_config().health_port
}

/// Polls `GET path` until `cond` holds (connection errors count as "not yet").
#[track_caller]
fn wait_for(
    cell: &Cell,
    path: &str,
    timeout: Duration,
    what: &str,
    cond: impl FnMut(&Response) -> bool,
) -> Response {
    http::wait_for(&cell.cell, port(cell), path, timeout, what, cond)
}

fn reason(r: &Response) -> String {
    r.json()["reason"].as_str().unwrap_or_default().to_string()
}

/// Waits for `/readyz` 503 with a reason that names the store and the fault; returns it.
#[track_caller]
fn wait_not_ready_for(cell: &Cell, fault: Fault) -> String {
    let store = cell.store.path().display().to_string();
    let r = wait_for(
        cell,
        "/readyz",
        SOON,
        &format!("/readyz 503 naming the {fault:?} at {store}"),
        |r| {
            let why = reason(r);
            r.code == 503
                && why.contains(&store)
                && fault.expected().iter().all(|part| why.contains(part))
        },
    );
    reason(&r)
}

/// Puts `fault` at the store's path in one step (`renameat2(RENAME_EXCHANGE)`), so the agent
/// never sees a missing store (which would mean "no containers") in between, and removes the
/// good store that it swapped out.
fn put_in_place(cell: &Cell, fault: Fault) {
    let store = cell.store.path();
    let staged = store.with_file_name("store.json.fault");
    fault.create(&staged);
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &staged,
        nix::fcntl::AT_FDCWD,
        &store,
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
    .expect("swap the fault in place of store.json");
    std::fs::remove_file(&staged).expect("remove the swapped-out store");
}

/// Removes the fault and writes the cell's store the way silk does.
fn restore(cell: &Cell) {
    let store = cell.store.path();
    if store.is_dir() {
        std::fs::remove_dir_all(&store).expect("remove directory");
    } else {
        std::fs::remove_file(&store).expect("remove fault");
    }
    cell.store.write();
}

/// Takes silk's exclusive lock [`LOCK_ROUNDS`] times, 250 ms apart (several reconcile passes
/// and store retries), each within [`LOCK_BOUND`], holding it 5 ms like a write. Returns the
/// longest wait.
#[track_caller]
fn assert_lock_never_held_long(cell: &Cell, when: &str) -> Duration {
    let mut longest = Duration::ZERO;
    for round in 0..LOCK_ROUNDS {
        match cell.store.lock_within(LOCK_BOUND) {
            Ok((lock, waited)) => {
                longest = longest.max(waited);
                std::thread::sleep(Duration::from_millis(5));
                drop(lock);
            }
            Err(waited) => panic!(
                "{when}: silk's exclusive lock on store.json_lock not obtained within \
                 {waited:?} (round {round})"
            ),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    longest
}

/// Sends SIGTERM and asserts the agent exits successfully within [`STOP`].
#[track_caller]
fn assert_sigterm_stops_in_time(cell: &mut Cell, when: &str) -> Duration {
    let agent = cell.agent();
    let log = agent.log.clone();
    match agent.stop_within(Signal::SIGTERM, STOP) {
        Some((took, status)) => {
            assert!(
                status.contains("exit status: 0"),
                "{when}: agent exited with {status}"
            );
            took
        }
        None => panic!(
            "{when}: the agent did not exit within {STOP:?} of SIGTERM (killed)\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    }
}

// ------------------------------------------------------------------ store faults

fn store_fault(fault: Fault) {
    support::require_root();
    let mut cell = Cell::new();
    cell.add_container("app1", Kind::App);
    cell.add_container("stg1", Kind::Staging);
    let stg = cell.ctr("stg1").ip;
    cell.start_agent();
    cell.wait_exempt(&[stg], READY);
    wait_for(&cell, "/readyz", READY, "/readyz 200", |r| r.code == 200);
    let installed = cell.fingerprint().expect("table installed");

    // The fault: not ready, naming the path and what is wrong; still live.
    put_in_place(&cell, fault);
    let why = wait_not_ready_for(&cell, fault);
    eprintln!("{fault:?}: /readyz 503: {why}");
    assert_eq!(http::get(&cell.cell, port(&cell), "/healthz").code, 200);

    // The rules of the last good store stay: app rejected, staging still open.
    cell.assert_rejected("app1", INET_HOST, "app while the store is broken");
    cell.assert_open("stg1", INET_HOST, "staging kept from the last good store");
    assert_eq!(cell.exempt_ips(), Some(vec![stg]), "exemptions changed");

    // silk's lock is never held long, over several passes that retry the store.
    let longest = assert_lock_never_held_long(&cell, &format!("{fault:?} in place"));
    eprintln!("{fault:?}: silk's exclusive lock obtained within {longest:?} every time");

    // Drift is repaired from the last good desired rules, whatever the store is doing.
    cell.nft(&["delete", "table", "inet", "egress_guard"]);
    let deleted = Instant::now();
    cell.wait_table(REPAIR);
    cell.wait_exempt(&[stg], REPAIR);
    eprintln!(
        "{fault:?}: table repaired {:?} after deletion",
        deleted.elapsed()
    );
    assert_eq!(
        cell.fingerprint(),
        Some(installed.clone()),
        "repaired table"
    );
    cell.assert_rejected("app1", INET_HOST, "app after the repair");
    cell.assert_open("stg1", INET_HOST, "staging after the repair");
    let why = wait_not_ready_for(&cell, fault);
    assert!(why.contains("metadata store"), "{why}");
    cell.agent().assert_running();

    // SIGTERM with the fault in place: exits in time, rules stay.
    let took = assert_sigterm_stops_in_time(&mut cell, &format!("{fault:?} in place"));
    eprintln!("{fault:?}: agent exited {took:?} after SIGTERM");
    assert_eq!(
        cell.fingerprint(),
        Some(installed),
        "SIGTERM changed the table"
    );
    cell.assert_rejected("app1", INET_HOST, "app after SIGTERM");

    // Started with the fault still there: no good store ever read, so nothing is exempt.
    cell.start_agent();
    let why = wait_not_ready_for(&cell, fault);
    eprintln!("{fault:?}: restarted, /readyz 503: {why}");
    cell.wait_exempt(&[], READY);
    cell.assert_rejected("app1", INET_HOST, "app, started on a broken store");
    cell.assert_rejected("stg1", INET_HOST, "staging, started on a broken store");
    assert_lock_never_held_long(&cell, &format!("{fault:?} in place after a restart"));

    // A good store: exempt and ready again.
    restore(&cell);
    cell.wait_exempt(&[stg], SOON);
    wait_for(
        &cell,
        "/readyz",
        SOON,
        "/readyz 200 after the store is restored",
        |r| r.code == 200,
    );
    cell.assert_open("stg1", INET_HOST, "staging after the store is restored");
    cell.assert_rejected("app1", INET_HOST, "app after the store is restored");
    cell.agent().assert_running();
    assert_sigterm_stops_in_time(&mut cell, "store restored");
}

#[test]
#[ignore = "needs root: run with --include-ignored"]
fn fifo_in_place_of_the_store() {
    store_fault(Fault::Fifo);
}

#[test]
#[ignore = "needs root: run with --include-ignored"]
fn directory_in_place_of_the_store() {
    store_fault(Fault::Directory);
}

#[test]
#[ignore = "needs root: run with --include-ignored"]
fn seventy_megabyte_file_in_place_of_the_store() {
    store_fault(Fault::Huge);
}
