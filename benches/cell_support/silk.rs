//! The static control platforms use today, for comparison: silk-cni's `deny_networks.running`.
//!
//! Every container gets its own `netout--<handle>` chain in the filter table, jumped to from
//! FORWARD by source address; a running app or task container's chain holds one REJECT per deny
//! CIDR: the eight (GOV.UK PaaS's list) that cover everything but 10.0.0.0/8. Staging containers
//! get the chain with no deny rules. silk's other rules (ESTABLISHED accept, ASG chains, logging)
//! are left out so that what is measured is the cost of the deny rules themselves.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::cmd::{ns_run, ns_try_run};
use crate::common::{self, Workload};

/// silk's `deny_networks.running` as GOV.UK PaaS set it.
pub const DENY_CIDRS: [&str; 8] = [
    "0.0.0.0/5",
    "8.0.0.0/7",
    "11.0.0.0/8",
    "12.0.0.0/6",
    "16.0.0.0/4",
    "32.0.0.0/3",
    "64.0.0.0/2",
    "128.0.0.0/1",
];

/// silk names chains `netout--` + the handle, cut to iptables' 28-character limit.
pub fn chain_name(handle: &str) -> String {
    format!("netout--{}", &handle[..20])
}

/// iptables-restore input for `n` fillers plus the measured container (`measured`: handle,
/// IP, workload), whose FORWARD jump sits in the middle of the list: an average container.
pub fn rules(n: usize, measured: (&str, Ipv4Addr, Workload)) -> String {
    let mut containers: Vec<(String, Ipv4Addr, Workload)> = (0..n)
        .map(|i| {
            (
                common::handle(0, i),
                common::container_ip(i),
                common::workload(i),
            )
        })
        .collect();
    containers.insert(n / 2, (measured.0.to_string(), measured.1, measured.2));
    let mut chains = String::new();
    let mut jumps = String::new();
    let mut body = String::new();
    for (handle, ip, workload) in &containers {
        let chain = chain_name(handle);
        let _ = writeln!(chains, ":{chain} - [0:0]");
        let _ = writeln!(jumps, "-A FORWARD -s {ip}/32 -j {chain}");
        if *workload != Workload::Staging {
            for cidr in DENY_CIDRS {
                let _ = writeln!(
                    body,
                    "-A {chain} -d {cidr} -j REJECT --reject-with icmp-port-unreachable"
                );
            }
        }
    }
    format!("*filter\n{chains}{jumps}{body}COMMIT\n")
}

/// Loads `text` with `<tool>-restore` (tool: `iptables-nft` or `iptables-legacy`) in `ns`.
pub fn load(ns: &str, tool: &str, text: &str) {
    ns_run(
        ns,
        &format!("{tool}-restore"),
        &["--noflush"],
        Some(text.as_bytes()),
    );
}

/// Empties the filter table again (FORWARD and every user chain).
pub fn flush(ns: &str, tool: &str) {
    let _ = ns_try_run(ns, tool, &["-F"], None);
    let _ = ns_try_run(ns, tool, &["-X"], None);
}

/// Rules in the filter table, as `<tool> -S` counts them (chains and policies excluded).
pub fn rule_count(ns: &str, tool: &str) -> usize {
    ns_run(ns, tool, &["-S"], None)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .count()
}
