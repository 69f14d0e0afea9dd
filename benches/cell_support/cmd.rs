//! Running `ip`, `nft`, `iptables-restore` and friends, and entering network namespaces.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use nix::sched::{CloneFlags, setns};

/// Runs `program args...` with `stdin` (if any) and returns its output whatever the status.
pub fn try_run(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program} {args:?}: {e} (is it installed?)"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input)
            .unwrap_or_else(|e| panic!("writing stdin of {program}: {e}"));
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {program}: {e}"))
}

/// Runs the command, panicking with its stderr unless it succeeds. Returns stdout.
pub fn run_stdin(program: &str, args: &[&str], stdin: Option<&[u8]>) -> String {
    let out = try_run(program, args, stdin);
    assert!(
        out.status.success(),
        "command failed ({}): {program} {}\nstderr: {}",
        out.status,
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn run(program: &str, args: &[&str]) -> String {
    run_stdin(program, args, None)
}

/// `ip -n <ns> -batch -` with `lines` (one `ip` command per line, without the leading `ip`).
pub fn ip_batch(ns: &str, lines: &str) {
    if !lines.trim().is_empty() {
        run_stdin("ip", &["-n", ns, "-batch", "-"], Some(lines.as_bytes()));
    }
}

/// `ip netns exec <ns> program args...` with optional stdin; panics on failure.
pub fn ns_run(ns: &str, program: &str, args: &[&str], stdin: Option<&[u8]>) -> String {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    run_stdin("ip", &full, stdin)
}

/// Like [`ns_run`], whatever the status.
pub fn ns_try_run(ns: &str, program: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    try_run("ip", &full, stdin)
}

/// Moves the calling thread into network namespace `ns` for good. Sockets it creates, and
/// processes it spawns, live there.
pub fn enter_netns(ns: &str) {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
}

/// Runs `f` on a short-lived thread inside namespace `ns`.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(ns);
            f()
        })
        .join()
        .unwrap_or_else(|_| panic!("thread inside netns {ns} panicked"))
    })
}
