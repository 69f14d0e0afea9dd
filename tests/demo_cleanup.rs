//! Root: the demo removes everything it made however it is ended, and returns only when that
//! is done; a later run removes what a run that is gone (SIGKILL) left, and never touches a
//! live run's namespaces.
//!
//! Each way runs the README's command (`scripts/demo`, with the demo already built by this
//! test run) until its first round is on screen, ends it, and then looks for what it made:
//! its namespaces in `/run/netns`, its temporary directories, and any process still running
//! with its files (the agent). Ways: SIGINT (Ctrl-C), SIGTERM, SIGHUP, a closed terminal (the
//! demo under a pty made by `script`, whose master end goes away), and a reader of its output
//! that goes away (a broken pipe, nothing else).
//!
//! `cargo test --test demo_cleanup -- --include-ignored`

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egress_guard_testkit as support;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::netns::{self, Owner};

/// The first round's header: the cell is built and the agent runs.
const READY: &str = "=== round 1";
/// The demo's last line once everything is removed.
const DONE: &str = "removed; nothing of this demo is left.";
const START_TIMEOUT: Duration = Duration::from_secs(90);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The demo executable this test run built (the newest `demo-<hash>` beside this test).
fn demo_bin() -> PathBuf {
    let deps = std::env::current_exe()
        .expect("test executable")
        .parent()
        .expect("deps dir")
        .to_path_buf();
    std::fs::read_dir(&deps)
        .expect("list deps")
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("demo-") && !name.contains('.')
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
        .expect("the demo is built with the suite (tests/demo.rs)")
}

fn namespaces() -> BTreeSet<String> {
    std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The demo's `scripts/demo` command line, with the demo already built.
fn demo_command() -> Command {
    let mut command = Command::new(repo().join("scripts/demo"));
    command
        .args(["--rounds", "1000"])
        .env("EGRESS_GUARD_DEMO_BIN", demo_bin())
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// Everything the demo printed so far, collected by a thread.
type Output = Arc<Mutex<String>>;

fn collect(mut from: impl Read + Send + 'static) -> Output {
    let output = Output::default();
    let sink = output.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            sink.lock().expect("output lock").push_str(&text);
        }
    });
    output
}

fn wait_for(output: &Output, text: &str, timeout: Duration) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if output.lock().expect("output lock").contains(text) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The owner of the demo's cell namespace, which appeared since `before`.
fn demo_owner(before: &BTreeSet<String>) -> (Owner, String) {
    let me = Owner::me();
    namespaces()
        .difference(before)
        .filter(|name| name.ends_with("-cell"))
        .find_map(|name| {
            let owner = netns::owner_of(name, &["egt"])?;
            (owner != me).then(|| {
                let tag = name.split('-').nth(1).unwrap_or_default().to_string();
                (owner, tag)
            })
        })
        .expect("the demo's cell namespace")
}

/// Waits for the demo process to be gone.
fn wait_gone(owner: Owner) {
    let until = Instant::now() + EXIT_TIMEOUT;
    while owner.is_alive() {
        assert!(
            Instant::now() < until,
            "the demo (pid {}) still runs {EXIT_TIMEOUT:?} after it was ended",
            owner.pid
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What is left of the run tagged `tag`: namespaces, temporary directories, processes that
/// name its files.
fn leftovers(tag: &str) -> Vec<String> {
    let marker = format!("egt-{tag}-");
    let mut left: Vec<String> = namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&marker))
        .map(|n| format!("namespace {n}"))
        .collect();
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        left.extend(
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&marker))
                .map(|e| format!("directory {}", e.path().display())),
        );
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&marker) {
                left.push(format!(
                    "process {} ({})",
                    entry.file_name().to_string_lossy(),
                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                ));
            }
        }
    }
    left
}

/// Runs the demo, ends it with `end` once its first round is on screen, and checks that it
/// left nothing. `end` gets the demo's child process and its output pipe's reader.
fn ended_by(way: &str, piped_through_pty: bool, end: impl FnOnce(&mut Child, Owner)) {
    let before = namespaces();
    let mut command = if piped_through_pty {
        // `script` gives the demo a terminal of its own; killing `script` closes its master
        // end, and the kernel hangs the terminal up: the demo gets SIGHUP, its writes EIO.
        let inner = demo_command();
        let line = format!(
            "EGRESS_GUARD_DEMO_BIN={} {} --rounds 1000",
            demo_bin().display(),
            repo().join("scripts/demo").display()
        );
        drop(inner);
        let mut script = Command::new("script");
        script
            .args(["-qfec", &line, "/dev/null"])
            .stdin(Stdio::piped())
            .stderr(Stdio::null());
        script
    } else {
        demo_command()
    };
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{way}: start the demo: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let output = if way == "a broken pipe" {
        // Read up to the first round ourselves, then close the pipe.
        let mut reader = BufReader::new(stdout);
        let until = Instant::now() + START_TIMEOUT;
        let mut line = String::new();
        while !line.contains(READY) {
            line.clear();
            assert!(
                reader.read_line(&mut line).expect("read demo output") > 0
                    && Instant::now() < until,
                "{way}: the demo ended before its first round"
            );
        }
        drop(reader);
        None
    } else {
        let output = collect(stdout);
        assert!(
            wait_for(&output, READY, START_TIMEOUT),
            "{way}: no first round within {START_TIMEOUT:?}:\n{}",
            output.lock().expect("output lock")
        );
        Some(output)
    };
    let (owner, tag) = demo_owner(&before);
    assert!(
        !leftovers(&tag).is_empty(),
        "{way}: the demo's cell is found"
    );
    end(&mut child, owner);
    wait_gone(owner);
    let _ = child.wait();
    let left = leftovers(&tag);
    assert!(left.is_empty(), "{way}: the demo left {left:#?}");
    if let Some(output) = output
        && !piped_through_pty
    {
        let text = output.lock().expect("output lock").clone();
        assert!(
            text.contains(DONE),
            "{way}: the demo did not say it was done:\n{text}"
        );
    }
}

fn signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(i32::try_from(pid).expect("pid")), signal).expect("send the signal");
}

#[test]
#[ignore = "root: runs the demo (network namespaces, nftables)"]
fn the_demo_cleans_up_however_it_is_ended() {
    support::require_root();
    ended_by("SIGINT (Ctrl-C)", false, |_, demo| {
        signal(demo.pid, Signal::SIGINT)
    });
    ended_by("SIGTERM", false, |_, demo| {
        signal(demo.pid, Signal::SIGTERM)
    });
    ended_by("SIGHUP", false, |_, demo| signal(demo.pid, Signal::SIGHUP));
    ended_by("a closed terminal", true, |script, _| {
        let _ = script.kill();
    });
    ended_by("a broken pipe", false, |_, _| {});
}

#[test]
#[ignore = "root: makes network namespaces"]
fn a_later_run_removes_what_a_gone_run_left_and_never_a_live_runs() {
    support::require_root();
    // A run that is gone: a process that existed, with its start time, and ended.
    let mut sleeper = Command::new("sleep").arg("30").spawn().expect("sleep");
    let pid = sleeper.id();
    let gone = Owner {
        pid,
        start: netns::start_time(pid),
    };
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(!gone.is_alive());
    let stale = format!("egt-{}-0-sweep-cell", gone.tag());
    netns::add(&stale);
    let stale_dir = std::env::temp_dir().join(format!("egt-{}-0-sweep-dir", gone.tag()));
    std::fs::create_dir_all(&stale_dir).expect("stale dir");
    // Something still running inside the stale namespace keeps it alive until killed.
    let inside = Command::new("ip")
        .args(["netns", "exec", &stale, "sleep", "60"])
        .spawn()
        .expect("a process inside the stale namespace");
    // A live run: this test process.
    let live = format!("egt-{}-sweep-live", netns::my_tag());
    netns::add(&live);
    // A reused pid: the same pid as a live process, another start time, is a gone run too.
    let reused = Owner {
        pid: std::process::id(),
        start: Owner::me().start.map(|s| s.saturating_sub(1)),
    };
    let reused_ns = format!("egt-{}-0-sweep-reused", reused.tag());
    netns::add(&reused_ns);

    let removed = netns::sweep_stale(&["egt"]);

    let now = namespaces();
    assert!(!now.contains(&stale), "the gone run's namespace is removed");
    assert!(
        !now.contains(&reused_ns),
        "a reused pid's namespace is removed"
    );
    assert!(!stale_dir.exists(), "the gone run's directory is removed");
    assert!(now.contains(&live), "a live run's namespace is kept");
    assert!(removed.iter().any(|r| r.ends_with(&stale)), "{removed:?}");
    assert!(
        removed.iter().any(|r| r.ends_with(&reused_ns)),
        "{removed:?}"
    );
    let inside_pid = Pid::from_raw(i32::try_from(inside.id()).expect("pid"));
    let mut inside = inside;
    let until = Instant::now() + Duration::from_secs(5);
    while inside.try_wait().expect("wait").is_none() {
        assert!(
            Instant::now() < until,
            "the process inside the stale namespace was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(inside_pid, None);
    netns::delete(&live).expect("remove the live namespace");
}
