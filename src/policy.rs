//! Policy: a pure function from (config, inventory) to the desired rules and, for operators,
//! a decision with a reason for every container. Same input, byte-identical output.
//!
//! Fail closed by construction: the reject rule covers the whole overlay, and the only way out
//! is an exemption keyed on (host ifindex, IP). A container is exempt only when its store entry
//! names an exempt workload AND the kernel has a host route to its IP through one interface.
//! Everything else (app, task, unknown or missing workload, health checks, containers the
//! store does not know, store entries that do not parse) is restricted.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Mode};
use crate::inventory::Inventory;
use crate::inventory::store::HEALTHCHECK_HANDLE_PREFIX;

/// An exemption as the kernel matches it: packets entering on `ifindex` with source `ip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ExemptKey {
    pub ifindex: u32,
    pub ip: Ipv4Addr,
}

/// An IPv6 exemption: packets entering on `ifindex` with source `ip` (an address the cell
/// routes to that interface, which an exempt container's IPv4 route also goes through).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Exempt6Key {
    pub ifindex: u32,
    pub ip: Ipv6Addr,
}

/// What the dataplane must install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredRules {
    /// Sources subject to the reject rule.
    pub overlay: Ipv4Net,
    /// Destinations that stay reachable: `allowed_networks` plus the overlay itself
    /// (container-to-container), aggregated and sorted.
    pub allowed: Vec<Ipv4Net>,
    /// (ifindex, ip) pairs that bypass the reject rule.
    pub exempt: BTreeSet<ExemptKey>,
    /// IPv6 destinations that stay reachable: the IPv6 entries of `allowed_networks`,
    /// aggregated and sorted. (Container-to-container IPv6 on the cell is allowed by the rules:
    /// it leaves through another container's veth.)
    pub allowed6: Vec<Ipv6Net>,
    /// (ifindex, IPv6) pairs that bypass the IPv6 reject rule.
    pub exempt6: BTreeSet<Exempt6Key>,
    /// Reject (enforce) or only report (audit) what the rules match: part of the tables'
    /// structure, so a mode change is a full sync of both tables in one batch.
    pub mode: Mode,
}

/// Whether a container can reach destinations outside `allowed_networks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Restricted,
    Exempt,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Restricted => "restricted",
            Verdict::Exempt => "exempt",
        })
    }
}

/// One container's verdict and why, for `/status` and `explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Garden handle; None for an IP the kernel routes but the store does not know.
    pub handle: Option<String>,
    /// None for a store entry whose `ip` did not parse.
    pub ip: Option<Ipv4Addr>,
    /// IPv6 addresses the cell routes to the container's interface (a /128 each).
    #[serde(default)]
    pub ipv6: Vec<Ipv6Addr>,
    pub host_ifindex: Option<u32>,
    pub host_interface: Option<String>,
    pub workload: Option<String>,
    pub app_id: Option<String>,
    pub space_id: Option<String>,
    pub org_id: Option<String>,
    pub verdict: Verdict,
    pub reason: String,
}

/// The full result of one policy evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub rules: DesiredRules,
    /// Sorted: store entries by handle, then kernel-only IPs, then unusable entries.
    pub decisions: Vec<Decision>,
}

impl Plan {
    pub fn count(&self, verdict: Verdict) -> usize {
        self.decisions
            .iter()
            .filter(|d| d.verdict == verdict)
            .count()
    }
}

/// Evaluates the policy. Pure: reads nothing but its arguments.
pub fn plan(config: &Config, inventory: &Inventory) -> Plan {
    let overlay = config.overlay_network;
    let mut allowed = config.allowed_v4();
    allowed.push(overlay);
    let allowed = Ipv4Net::aggregate(&allowed);
    let allowed6 = Ipv6Net::aggregate(&config.allowed_v6());
    // A container's IPv6 addresses: the /128 routes through its host interface.
    let mut ipv6_of: BTreeMap<u32, Vec<Ipv6Addr>> = BTreeMap::new();
    for (ip, ifindex) in &inventory.kernel.routes6 {
        ipv6_of.entry(*ifindex).or_default().push(*ip);
    }
    let ipv6 = |ifindex: Option<u32>| -> Vec<Ipv6Addr> {
        ifindex
            .and_then(|i| ipv6_of.get(&i).cloned())
            .unwrap_or_default()
    };
    let mut exempt6 = BTreeSet::new();

    // An IP that any non-exempt entry claims stays restricted, whatever else claims it.
    let mut claims: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for entry in &inventory.store.entries {
        *claims.entry(entry.ip).or_default() += 1;
    }

    let mut exempt = BTreeSet::new();
    let mut decisions = Vec::with_capacity(inventory.store.entries.len());
    for entry in &inventory.store.entries {
        let ifindex = inventory.kernel.routes.get(&entry.ip).copied();
        let interface = ifindex.and_then(|i| inventory.kernel.links.get(&i).cloned());
        let workload_is_exempt = entry
            .workload
            .as_ref()
            .is_some_and(|w| config.exempt_workloads.contains(w));
        let (verdict, reason) = if !overlay.contains(&entry.ip) {
            (
                Verdict::Restricted,
                format!("IP {} is outside the overlay {overlay}", entry.ip),
            )
        } else if entry.handle.starts_with(HEALTHCHECK_HANDLE_PREFIX) {
            (
                Verdict::Restricted,
                "Garden health-check container".to_string(),
            )
        } else if !workload_is_exempt {
            let why = match entry.workload.as_deref() {
                None => "no container_workload in the metadata store (unknown workload)".into(),
                Some(w @ ("app" | "task")) => format!("running {w} container"),
                Some(w) => format!("workload {w:?} is not in exempt_workloads"),
            };
            (Verdict::Restricted, why)
        } else if claims.get(&entry.ip).copied().unwrap_or(0) > 1 {
            (
                Verdict::Restricted,
                format!("IP {} is claimed by more than one store entry", entry.ip),
            )
        } else if let Some(ifindex) = ifindex {
            exempt.insert(ExemptKey {
                ifindex,
                ip: entry.ip,
            });
            for ip in ipv6(Some(ifindex)) {
                exempt6.insert(Exempt6Key { ifindex, ip });
            }
            let workload = entry.workload.as_deref().unwrap_or_default();
            (
                Verdict::Exempt,
                format!(
                    "workload {workload:?} is exempt; traffic from {} entering on {} (ifindex {ifindex})",
                    entry.ip,
                    interface.as_deref().unwrap_or("?")
                ),
            )
        } else {
            (
                Verdict::Restricted,
                format!(
                    "workload {:?} is exempt, but the cell has no host route to {} (not wired yet, or gone)",
                    entry.workload.as_deref().unwrap_or_default(),
                    entry.ip
                ),
            )
        };
        decisions.push(Decision {
            handle: Some(entry.handle.clone()),
            ip: Some(entry.ip),
            ipv6: ipv6(ifindex),
            host_ifindex: ifindex,
            host_interface: interface,
            workload: entry.workload.clone(),
            app_id: entry.app_id.clone(),
            space_id: entry.space_id.clone(),
            org_id: entry.org_id.clone(),
            verdict,
            reason,
        });
    }

    for (ip, ifindex) in &inventory.kernel.routes {
        if claims.contains_key(ip) {
            continue;
        }
        decisions.push(Decision {
            handle: None,
            ip: Some(*ip),
            ipv6: ipv6(Some(*ifindex)),
            host_ifindex: Some(*ifindex),
            host_interface: inventory.kernel.links.get(ifindex).cloned(),
            workload: None,
            app_id: None,
            space_id: None,
            org_id: None,
            verdict: Verdict::Restricted,
            reason: "routed to a container interface but not in the metadata store".to_string(),
        });
    }

    // IPv6 routed to an interface that no IPv4 container route goes through.
    let ipv4_interfaces: BTreeSet<u32> = inventory.kernel.routes.values().copied().collect();
    for (ifindex, addresses) in &ipv6_of {
        if ipv4_interfaces.contains(ifindex) {
            continue;
        }
        decisions.push(Decision {
            handle: None,
            ip: None,
            ipv6: addresses.clone(),
            host_ifindex: Some(*ifindex),
            host_interface: inventory.kernel.links.get(ifindex).cloned(),
            workload: None,
            app_id: None,
            space_id: None,
            org_id: None,
            verdict: Verdict::Restricted,
            reason: "IPv6 routed to an interface that no known container uses".to_string(),
        });
    }

    for problem in &inventory.store.problems {
        decisions.push(Decision {
            handle: Some(problem.handle.clone()),
            ip: None,
            ipv6: Vec::new(),
            host_ifindex: None,
            host_interface: None,
            workload: None,
            app_id: None,
            space_id: None,
            org_id: None,
            verdict: Verdict::Restricted,
            reason: format!("unusable store entry: {}", problem.reason),
        });
    }

    Plan {
        rules: DesiredRules {
            overlay,
            allowed,
            exempt,
            allowed6,
            exempt6,
            mode: config.mode,
        },
        decisions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::store::{EntryProblem, StoreEntry};
    use crate::inventory::{KernelView, StoreSnapshot};

    fn entry(handle: &str, ip: [u8; 4], workload: Option<&str>) -> StoreEntry {
        StoreEntry {
            handle: handle.to_string(),
            ip: Ipv4Addr::from(ip),
            workload: workload.map(str::to_string),
            app_id: Some(format!("app-of-{handle}")),
            space_id: None,
            org_id: None,
        }
    }

    fn inventory(entries: Vec<StoreEntry>, routes: &[([u8; 4], u32)]) -> Inventory {
        Inventory {
            store: StoreSnapshot {
                entries,
                problems: vec![],
            },
            kernel: KernelView {
                routes6: BTreeMap::new(),
                routes: routes
                    .iter()
                    .map(|(ip, i)| (Ipv4Addr::from(*ip), *i))
                    .collect(),
                links: routes
                    .iter()
                    .map(|(_, i)| (*i, format!("veth{i}")))
                    .collect(),
            },
        }
    }

    fn verdict_of(plan: &Plan, handle: &str) -> (Verdict, String) {
        let d = plan
            .decisions
            .iter()
            .find(|d| d.handle.as_deref() == Some(handle))
            .expect("decision for handle");
        (d.verdict, d.reason.clone())
    }

    fn key(ifindex: u32, ip: [u8; 4]) -> ExemptKey {
        ExemptKey {
            ifindex,
            ip: Ipv4Addr::from(ip),
        }
    }

    #[test]
    fn only_routed_staging_is_exempt() {
        let inv = inventory(
            vec![
                entry("app", [10, 255, 1, 2], Some("app")),
                entry("task", [10, 255, 1, 3], Some("task")),
                entry("staging", [10, 255, 1, 4], Some("staging")),
                entry("staging-unrouted", [10, 255, 1, 5], Some("staging")),
                entry("old-platform", [10, 255, 1, 6], None),
                entry("custom", [10, 255, 1, 7], Some("build")),
            ],
            &[
                ([10, 255, 1, 2], 10),
                ([10, 255, 1, 3], 11),
                ([10, 255, 1, 4], 12),
                ([10, 255, 1, 6], 14),
                ([10, 255, 1, 7], 15),
            ],
        );
        let plan = plan(&Config::default(), &inv);
        assert_eq!(
            plan.rules.exempt,
            BTreeSet::from([key(12, [10, 255, 1, 4])])
        );
        assert_eq!(verdict_of(&plan, "staging").0, Verdict::Exempt);
        for handle in ["app", "task", "staging-unrouted", "old-platform", "custom"] {
            assert_eq!(verdict_of(&plan, handle).0, Verdict::Restricted, "{handle}");
        }
        assert!(
            verdict_of(&plan, "staging-unrouted")
                .1
                .contains("no host route")
        );
        assert!(
            verdict_of(&plan, "old-platform")
                .1
                .contains("unknown workload")
        );
        assert!(verdict_of(&plan, "app").1.contains("running app"));
        assert_eq!(plan.count(Verdict::Exempt), 1);
        assert_eq!(plan.count(Verdict::Restricted), 5);
    }

    #[test]
    fn health_checks_are_restricted_even_if_labelled_staging() {
        let inv = inventory(
            vec![entry("check-1234", [10, 255, 1, 2], Some("staging"))],
            &[([10, 255, 1, 2], 10)],
        );
        let plan = plan(&Config::default(), &inv);
        assert!(plan.rules.exempt.is_empty());
        assert!(verdict_of(&plan, "check-1234").1.contains("health-check"));
    }

    #[test]
    fn kernel_only_containers_are_restricted_and_listed() {
        let inv = inventory(vec![], &[([10, 255, 1, 9], 20)]);
        let plan = plan(&Config::default(), &inv);
        assert!(plan.rules.exempt.is_empty());
        let d = &plan.decisions[0];
        assert_eq!(d.handle, None);
        assert_eq!(d.ip, Some(Ipv4Addr::new(10, 255, 1, 9)));
        assert_eq!(d.verdict, Verdict::Restricted);
        assert!(d.reason.contains("not in the metadata store"));
    }

    #[test]
    fn an_ip_claimed_twice_is_never_exempt() {
        let inv = inventory(
            vec![
                entry("old-staging", [10, 255, 1, 4], Some("staging")),
                entry("new-app", [10, 255, 1, 4], Some("app")),
            ],
            &[([10, 255, 1, 4], 12)],
        );
        let plan = plan(&Config::default(), &inv);
        assert!(plan.rules.exempt.is_empty());
        assert!(verdict_of(&plan, "old-staging").1.contains("more than one"));
    }

    #[test]
    fn exempt_workloads_come_from_config() {
        let config = Config::parse("exempt_workloads = [\"task\"]").expect("valid");
        let inv = inventory(
            vec![
                entry("task", [10, 255, 1, 3], Some("task")),
                entry("staging", [10, 255, 1, 4], Some("staging")),
            ],
            &[([10, 255, 1, 3], 11), ([10, 255, 1, 4], 12)],
        );
        let plan = plan(&config, &inv);
        assert_eq!(
            plan.rules.exempt,
            BTreeSet::from([key(11, [10, 255, 1, 3])])
        );
        assert!(
            verdict_of(&plan, "staging")
                .1
                .contains("not in exempt_workloads")
        );
    }

    #[test]
    fn entries_outside_the_overlay_are_not_exempt() {
        let inv = inventory(
            vec![entry("odd", [192, 168, 1, 4], Some("staging"))],
            &[([192, 168, 1, 4], 12)],
        );
        let plan = plan(&Config::default(), &inv);
        assert!(plan.rules.exempt.is_empty());
    }

    #[test]
    fn unusable_entries_are_listed_as_restricted() {
        let mut inv = inventory(vec![], &[]);
        inv.store.problems.push(EntryProblem {
            handle: "broken".into(),
            reason: "`ip` \"x\" is not an IPv4 address".into(),
        });
        let plan = plan(&Config::default(), &inv);
        assert_eq!(verdict_of(&plan, "broken").0, Verdict::Restricted);
    }

    #[test]
    fn allowed_networks_include_the_overlay_and_are_aggregated() {
        let config = Config::parse(
            "overlay_network = \"100.96.0.0/16\"\n\
             allowed_networks = [\"172.16.5.0/24\", \"10.0.0.0/8\", \"10.1.0.0/16\", \"172.16.4.0/24\"]",
        )
        .expect("valid");
        let plan = plan(&config, &Inventory::default());
        let allowed: Vec<String> = plan.rules.allowed.iter().map(|n| n.to_string()).collect();
        assert_eq!(allowed, ["10.0.0.0/8", "100.96.0.0/16", "172.16.4.0/23"]);
    }

    #[test]
    fn plan_is_deterministic() {
        let inv = inventory(
            vec![
                entry("b", [10, 255, 1, 3], Some("staging")),
                entry("a", [10, 255, 1, 2], Some("staging")),
            ],
            &[([10, 255, 1, 2], 10), ([10, 255, 1, 3], 11)],
        );
        let config = Config::default();
        assert_eq!(plan(&config, &inv), plan(&config, &inv));
    }
}
