//! Running `ip`, `nft`, `iptables-restore` and friends, and entering network namespaces.

// The plain command runners and namespace entry are the test support's (one copy for all).
pub use egress_guard_testkit::cmd::{ns_try_run, run, run_stdin, try_run};
pub use egress_guard_testkit::probe::{enter_netns, in_netns};

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
