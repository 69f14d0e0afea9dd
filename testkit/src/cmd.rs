//! Running helper commands (`ip`, `nft`, `iptables`, CNI plugins) with readable failures.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

/// Runs `program args...`, feeding `stdin` if given, and returns its output whatever the status.
pub fn try_run(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A process group of its own: Ctrl-C or a terminal's hang-up reaches the test or demo
        // process, which cleans up, and never kills a helper in the middle of that.
        .process_group(0);
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program} {args:?}: {e} (is it installed?)"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("child stdin is piped");
        pipe.write_all(input)
            .unwrap_or_else(|e| panic!("writing stdin of {program} {args:?}: {e}"));
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {program} {args:?}: {e}"))
}

/// Runs the command and panics with its stderr unless it succeeds. Returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    run_stdin(program, args, None)
}

/// Like [`run`], feeding `stdin`.
pub fn run_stdin(program: &str, args: &[&str], stdin: Option<&[u8]>) -> String {
    let out = try_run(program, args, stdin);
    assert!(
        out.status.success(),
        "command failed ({}): {program} {}\nstdout: {}\nstderr: {}",
        out.status,
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip netns exec <ns> program args...`, panicking on failure. Returns stdout.
pub fn ns_run(ns: &str, program: &str, args: &[&str]) -> String {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// `ip netns exec <ns> program args...`, whatever the status.
pub fn ns_try_run(ns: &str, program: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    try_run("ip", &full, stdin)
}

/// Packets counted so far by the named nft counter `inet <table> <name>` in namespace `ns`.
pub fn ns_counter_packets(ns: &str, table: &str, name: &str) -> u64 {
    let out = ns_run(ns, "nft", &["-j", "list", "counter", "inet", table, name]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("nft -j counter output is JSON");
    v["nftables"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find_map(|o| o.get("counter")?.get("packets")?.as_u64())
        })
        .expect("counter has packets")
}
