//! Running `ip`, `nft`, `iptables-restore` and friends, and entering network namespaces.

use nix::sched::{CloneFlags, setns};

// The plain command runners are the integration tests' own (one copy for both).
pub use super::shared_cmd::{run, run_stdin, try_run};

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

pub use super::shared_cmd::ns_try_run;

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
