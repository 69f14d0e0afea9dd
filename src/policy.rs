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
use std::sync::Arc;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

mod explain;
mod planner;
mod scope;

pub use explain::{Outcome, Probe, containers_per_rule, explain_destination};
pub use planner::{Change, Dirty, Inputs, Planner};
pub use scope::{MAX_HOST_MARK, RuleSet, ScopeElements, ScopeKind, scope_elements};

use crate::config::{Config, Mode};
use crate::inventory::Inventory;
use crate::inventory::store::{HEALTHCHECK_HANDLE_PREFIX, StoreEntry};

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
    /// aggregated and sorted.
    pub allowed6: Vec<Ipv6Net>,
    /// The IPv6 addresses of this cell's containers, which stay reachable from the others
    /// (container-to-container): every /128 the cell routes to the host interface of a known
    /// container (one an IPv4 container route goes through). Recognised by what the agent
    /// knows, not by an interface's kind: on a cell whose own uplink is a veth (BOSH-lite, a
    /// cell in a container) "leaves through a veth" would also mean "leaves the cell".
    pub containers6: BTreeSet<Ipv6Addr>,
    /// (ifindex, IPv6) pairs that bypass the IPv6 reject rule.
    pub exempt6: BTreeSet<Exempt6Key>,
    /// Reject (enforce) or only report (audit) what the rules match: part of the tables'
    /// structure, so a mode change is a full sync of both tables in one batch.
    pub mode: Mode,
    /// The DNS filter's kernel side (`[dns] enabled`); None leaves DNS untouched.
    pub dns: Option<DnsRules>,
    /// `[[rules]]`: structure (a chain per org and space they name, and one for unscoped
    /// rules), so a change is a full sync of both tables in one batch.
    pub rule_set: Arc<RuleSet>,
    /// Which restricted container (host interface) jumps to which org's and space's chain.
    /// Shared: a pass's copy of the rules and what was last written point at the same map
    /// until the planner changes it (every restricted container has up to two entries).
    pub scopes: Arc<ScopeElements>,
}

/// What the kernel does with restricted containers' DNS when the DNS filter is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsRules {
    /// The filter's port: restricted containers' queries are redirected to it.
    pub port: u16,
    /// Each container's DNS rate (queries a second) and burst, limited before conntrack.
    pub per_container_qps: u32,
    pub per_container_burst: u32,
    /// Whether the kernel enforces a limit per element of a dynamic set (the start-up probe,
    /// [`crate::dataplane::probe`]). When it does not, every restricted container's DNS shares
    /// one cell-wide budget instead ([`DNS_FALLBACK_SHARE`] containers' worth).
    pub per_element_limits: bool,
}

/// With per-element limits unavailable, the cell-wide DNS budget is this many containers'
/// `per_container_qps` (and burst): a bound that holds for the conntrack table, the filter and
/// the upstream, but that one container can use up (the filter's per-container share of
/// `max_inflight` still divides what reaches it).
pub const DNS_FALLBACK_SHARE: u32 = 16;

impl DnsRules {
    /// The rules for the listener's `port`, with the default rate (tests).
    #[cfg(test)]
    pub fn on_port(port: u16) -> DnsRules {
        DnsRules {
            port,
            per_container_qps: 200,
            per_container_burst: 400,
            per_element_limits: true,
        }
    }
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
    /// Garden handle; None for an IP the kernel routes but the store does not know. This and
    /// the workload and ids are the store entry's own strings, shared.
    pub handle: Option<Arc<str>>,
    /// None for a store entry whose `ip` did not parse.
    pub ip: Option<Ipv4Addr>,
    /// IPv6 addresses the cell routes to the container's interface (a /128 each).
    #[serde(default)]
    pub ipv6: Vec<Ipv6Addr>,
    pub host_ifindex: Option<u32>,
    pub host_interface: Option<String>,
    pub workload: Option<Arc<str>>,
    pub app_id: Option<Arc<str>>,
    pub space_id: Option<Arc<str>>,
    pub org_id: Option<Arc<str>>,
    /// The app instance's index (`log_config`), for app log lines; not shown.
    #[serde(skip)]
    pub log_index: Option<u32>,
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

/// Evaluates the policy. Pure: reads nothing but its arguments. [`Planner`] gives the same
/// result incrementally; this is the reference it is tested against, and what `explain` runs.
pub fn plan(config: &Config, inventory: &Inventory) -> Plan {
    let policy = Policy::new(config);
    // A container's IPv6 addresses: the /128 routes through its host interface.
    let ipv6_of = ipv6_by_interface(&inventory.kernel.routes6);
    let ipv6 = |ifindex: Option<u32>| -> Vec<Ipv6Addr> {
        ifindex
            .and_then(|i| ipv6_of.get(&i).cloned())
            .unwrap_or_default()
    };
    let link = |ifindex: Option<u32>| ifindex.and_then(|i| inventory.kernel.links.get(&i).cloned());

    // An IP that any non-exempt entry claims stays restricted, whatever else claims it.
    let mut claims: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for entry in &inventory.store.entries {
        *claims.entry(entry.ip).or_default() += 1;
    }

    let mut decisions = Vec::with_capacity(inventory.store.entries.len());
    for entry in &inventory.store.entries {
        let ifindex = inventory.kernel.routes.get(&entry.ip).copied();
        let claimed = claims.get(&entry.ip).copied().unwrap_or(0);
        decisions.push(policy.decide_entry(entry, claimed, ifindex, link(ifindex), ipv6(ifindex)));
    }
    for (ip, ifindex) in &inventory.kernel.routes {
        if !claims.contains_key(ip) {
            let ifindex = Some(*ifindex);
            decisions.push(decide_unclaimed_route(
                *ip,
                ifindex,
                link(ifindex),
                ipv6(ifindex),
            ));
        }
    }
    // IPv6 routed to an interface that no IPv4 container route goes through.
    let ipv4_interfaces: BTreeSet<u32> = inventory.kernel.routes.values().copied().collect();
    for (ifindex, addresses) in &ipv6_of {
        if !ipv4_interfaces.contains(ifindex) {
            let ifindex = Some(*ifindex);
            decisions.push(decide_ipv6_only(ifindex, link(ifindex), addresses.clone()));
        }
    }
    for problem in &inventory.store.problems {
        decisions.push(decide_problem(&problem.handle, &problem.reason));
    }
    // The store hands its entries over sorted; sorting here makes the documented order a
    // property of the plan, whatever order its input comes in (stable: nothing else moves).
    decisions.sort_by_key(Decision::key);

    let mut rules = policy.rules();
    for decision in &decisions {
        rules.exempt.extend(decision.exempt_key());
        rules.exempt6.extend(decision.exempt6_keys());
        rules.containers6.extend(decision.container6_addresses());
    }
    rules.scopes = Arc::new(scope_elements(&rules.rule_set, decisions.iter()));
    Plan { rules, decisions }
}

/// What the policy takes from the config.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    overlay: Ipv4Net,
    exempt_workloads: BTreeSet<String>,
    /// The rules without exemptions.
    rules: DesiredRules,
}

impl Policy {
    pub(crate) fn new(config: &Config) -> Policy {
        let overlay = config.overlay_network;
        let mut allowed = config.allowed_v4();
        allowed.push(overlay);
        Policy {
            overlay,
            exempt_workloads: config.exempt_workloads.clone(),
            rules: DesiredRules {
                overlay,
                allowed: Ipv4Net::aggregate(&allowed),
                exempt: BTreeSet::new(),
                allowed6: Ipv6Net::aggregate(&config.allowed_v6()),
                exempt6: BTreeSet::new(),
                containers6: BTreeSet::new(),
                mode: config.mode,
                dns: config.dns.enabled.then_some(DnsRules {
                    port: config.dns.listen.port(),
                    per_container_qps: config.dns.per_container_qps,
                    per_container_burst: config.dns.per_container_burst,
                    per_element_limits: true,
                }),
                rule_set: Arc::new(RuleSet::new(config.rules.clone())),
                scopes: Arc::default(),
            },
        }
    }

    /// The rules with no container exempt.
    pub(crate) fn rules(&self) -> DesiredRules {
        self.rules.clone()
    }

    /// Records what the start-up probe found about per-element limits.
    pub(crate) fn set_per_element_limits(&mut self, enforced: bool) {
        if let Some(dns) = &mut self.rules.dns {
            dns.per_element_limits = enforced;
        }
    }

    /// A store entry's decision. `claims`: how many usable entries claim its IP; `ifindex`:
    /// the host interface the kernel routes its IP to.
    pub(crate) fn decide_entry(
        &self,
        entry: &StoreEntry,
        claims: usize,
        ifindex: Option<u32>,
        interface: Option<String>,
        ipv6: Vec<Ipv6Addr>,
    ) -> Decision {
        let overlay = self.overlay;
        let workload_is_exempt = entry
            .workload
            .as_ref()
            .is_some_and(|w| self.exempt_workloads.contains(&**w));
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
        } else if claims > 1 {
            (
                Verdict::Restricted,
                format!("IP {} is claimed by more than one store entry", entry.ip),
            )
        } else if let Some(ifindex) = ifindex {
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
        Decision {
            handle: Some(entry.handle.clone()),
            ip: Some(entry.ip),
            ipv6,
            host_ifindex: ifindex,
            host_interface: interface,
            workload: entry.workload.clone(),
            app_id: entry.app_id.clone(),
            space_id: entry.space_id.clone(),
            org_id: entry.org_id.clone(),
            log_index: entry.log_index,
            verdict,
            reason,
        }
    }
}

/// IPv6 addresses by the interface their /128 route goes through, each list sorted.
pub(crate) fn ipv6_by_interface(routes6: &BTreeMap<Ipv6Addr, u32>) -> BTreeMap<u32, Vec<Ipv6Addr>> {
    let mut ipv6_of: BTreeMap<u32, Vec<Ipv6Addr>> = BTreeMap::new();
    for (ip, ifindex) in routes6 {
        ipv6_of.entry(*ifindex).or_default().push(*ip);
    }
    ipv6_of
}

/// A restricted decision with nothing known from the store.
fn restricted_unknown(
    ip: Option<Ipv4Addr>,
    ipv6: Vec<Ipv6Addr>,
    ifindex: Option<u32>,
    interface: Option<String>,
    reason: &str,
) -> Decision {
    Decision {
        handle: None,
        ip,
        ipv6,
        host_ifindex: ifindex,
        host_interface: interface,
        workload: None,
        app_id: None,
        space_id: None,
        org_id: None,
        log_index: None,
        verdict: Verdict::Restricted,
        reason: reason.to_string(),
    }
}

/// An IP the kernel routes to a container interface that no usable store entry claims.
pub(crate) fn decide_unclaimed_route(
    ip: Ipv4Addr,
    ifindex: Option<u32>,
    interface: Option<String>,
    ipv6: Vec<Ipv6Addr>,
) -> Decision {
    restricted_unknown(
        Some(ip),
        ipv6,
        ifindex,
        interface,
        "routed to a container interface but not in the metadata store",
    )
}

/// IPv6 routed to an interface that no IPv4 container route goes through.
pub(crate) fn decide_ipv6_only(
    ifindex: Option<u32>,
    interface: Option<String>,
    addresses: Vec<Ipv6Addr>,
) -> Decision {
    restricted_unknown(
        None,
        addresses,
        ifindex,
        interface,
        "IPv6 routed to an interface that no known container uses",
    )
}

/// A store entry that could not be used.
pub(crate) fn decide_problem(handle: &str, reason: &str) -> Decision {
    Decision {
        handle: Some(handle.into()),
        reason: format!("unusable store entry: {reason}"),
        ..restricted_unknown(None, Vec::new(), None, None, "")
    }
}

impl Decision {
    /// Where this decision sits in a plan's order, and what identifies it.
    pub fn key(&self) -> DecisionKey {
        match (&self.handle, self.ip) {
            (Some(handle), Some(_)) => DecisionKey::Entry(handle.clone()),
            (Some(handle), None) => DecisionKey::Problem(handle.clone()),
            (None, Some(ip)) => DecisionKey::UnclaimedRoute(ip),
            (None, None) => DecisionKey::Ipv6Only(self.host_ifindex.unwrap_or_default()),
        }
    }

    /// The IPv4 exemption this decision adds to the rules.
    pub fn exempt_key(&self) -> Option<ExemptKey> {
        match (self.verdict, self.host_ifindex, self.ip) {
            (Verdict::Exempt, Some(ifindex), Some(ip)) => Some(ExemptKey { ifindex, ip }),
            _ => None,
        }
    }

    /// The container addresses this decision adds to the rules' `containers6`: the IPv6
    /// addresses of an interface that this decision's IPv4 container route goes through,
    /// whatever the verdict (reaching a restricted container is container-to-container too).
    /// An interface with IPv6 routes but no IPv4 container route adds nothing: unknown stays
    /// restricted.
    pub fn container6_addresses(&self) -> impl Iterator<Item = Ipv6Addr> + '_ {
        let known = self.ip.is_some() && self.host_ifindex.is_some();
        self.ipv6.iter().copied().filter(move |_| known)
    }

    /// The IPv6 exemptions this decision adds to the rules.
    pub fn exempt6_keys(&self) -> impl Iterator<Item = Exempt6Key> + '_ {
        let ifindex = match (self.verdict, self.host_ifindex) {
            (Verdict::Exempt, Some(ifindex)) => Some(ifindex),
            _ => None,
        };
        ifindex.into_iter().flat_map(|ifindex| {
            self.ipv6
                .iter()
                .map(move |ip| Exempt6Key { ifindex, ip: *ip })
        })
    }
}

/// Identifies a decision and orders a plan: store entries by handle, then routed IPs the store
/// does not claim, then IPv6-only interfaces, then unusable entries.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DecisionKey {
    Entry(Arc<str>),
    UnclaimedRoute(Ipv4Addr),
    Ipv6Only(u32),
    Problem(Arc<str>),
}

#[cfg(test)]
mod tests;
