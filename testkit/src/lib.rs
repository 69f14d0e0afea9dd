//! egress-guard's test support: a simulated Diego cell built from network namespaces, for the
//! root integration suite, the benches and the demo.
//!
//! Everything here needs root (network namespaces, veths, nftables, CNI plugins). All traffic
//! stays inside the namespaces a test creates; every namespace is deleted when the [`cell::Cell`]
//! is dropped, including on panic.
//!
//! Layout of one simulated cell (`<p>` = `egt-<owner>-<n>`, see [`netns`]):
//!
//! ```text
//!   <p>-vpc  10.0.0.10/24 eth0 ─── up-vpc  10.0.0.1/24 ─┐
//!                                                         <p>-cell  (ip_forward=1, no NAT)
//!   <p>-inet 203.0.113.10/24 eth0 ── up-inet 203.0.113.1/24 ┘   │ 10.0.0.0/8 via vpc, default via inet
//!                                                               │ ptp veths, /32 host routes
//!   <p>-<ctr> 10.255.7.x/24 eth0 ─────────────────────────────┘ (CNI ptp + host-local IPAM)
//! ```
//!
//! A dual-stack cell (`Cell::new_dual_stack`, for tests/ipv6.rs) adds IPv6 to the same layout:
//!
//! ```text
//!   <p>-vpc  + fd00:0:0:1::10/64 ──── up-vpc  (bridge; port upp-vpc)  + fd00:0:0:1::1/64 ──┐
//!   <p>-inet + 2001:db8:0:1::10/64 ── up-inet (bridge; port upp-inet) + 2001:db8:0:1::1/64 ┘
//!        both route 2001:db8:ff::/48 via the cell      <p>-cell: net.ipv6.conf.all.forwarding=1,
//!                                                      fd00::/8 via vpc, default via inet
//!   <p>-<ctr> + 2001:db8:ff:7::x/64 eth0, default via 2001:db8:ff:7::1 (ptp: that /128 on every
//!             host veth, and a /128 host route to the container through it); DAD off everywhere
//! ```
pub mod agent;
pub mod cell;
pub mod cmd;
pub mod http;
pub mod netns;
pub mod probe;
pub mod rng;
pub mod soak;
pub mod store;

use std::time::{Duration, Instant};

/// Panics with a clear message unless the test runs as root.
pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .unwrap_or("?");
    assert!(
        euid == "0",
        "this test needs root (network namespaces, nftables, CNI plugins); effective uid is {euid}. \
         Run as root: cargo test --test cell -- --include-ignored"
    );
}

/// Polls `cond` every 50ms until it is true or `timeout` passes. Returns the time it took, or
/// panics naming `what`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `cond` every 50ms until it is true (returns true) or `timeout` passes (returns false).
pub fn wait_until_or(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
