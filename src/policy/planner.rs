//! The policy, kept up to date incrementally: after a change to one container, only the
//! decisions that can depend on it are evaluated again.
//!
//! A decision depends on its store entry, on how many usable entries claim its IP, on the
//! kernel's route for that IP, and on the name and IPv6 routes of that route's interface; an
//! unclaimed route's decision on whether an entry claims it; an IPv6-only interface's on
//! whether an IPv4 route goes through it. [`Planner::update`] follows those dependencies from
//! what changed (handles, IPs, interfaces) to the decisions to evaluate again, and evaluates
//! them with the same functions as [`super::plan`], so that its result is always exactly what a
//! full evaluation of the same inputs gives (a property the tests check on random histories).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use super::{
    Decision, DecisionKey, DesiredRules, Exempt6Key, ExemptKey, Policy, ScopeKind, Verdict,
    decide_ipv6_only, decide_problem, decide_unclaimed_route, ipv6_by_interface,
};
use crate::config::Config;
use crate::inventory::store::{Parsed, StoreEntry};

/// The planner's inputs, as of this update.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The store's entries by handle: usable, or why not.
    pub entries: &'a BTreeMap<String, Parsed>,
    /// Container IP -> host ifindex of its /32 route.
    pub routes: &'a BTreeMap<Ipv4Addr, u32>,
    /// Container IPv6 -> host ifindex of its /128 route.
    pub routes6: &'a BTreeMap<Ipv6Addr, u32>,
    /// ifindex -> interface name.
    pub links: &'a BTreeMap<u32, String>,
}

/// What changed in the inputs since the previous update.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Everything may have changed (the first update, or after a full read).
    pub all: bool,
    /// Store entries added, changed or removed.
    pub handles: BTreeSet<String>,
    /// IPs whose container route appeared, changed or went.
    pub routes: BTreeSet<Ipv4Addr>,
    /// The IPv6 routes (any of them).
    pub routes6: bool,
    /// Interfaces whose name appeared, changed or went.
    pub links: BTreeSet<u32>,
}

impl Dirty {
    pub fn everything() -> Dirty {
        Dirty {
            all: true,
            ..Dirty::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.all
            && self.handles.is_empty()
            && self.routes.is_empty()
            && !self.routes6
            && self.links.is_empty()
    }
}

/// One decision that an update added, changed or removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub before: Option<Arc<Decision>>,
    pub after: Option<Arc<Decision>>,
}

/// The policy's result, kept current.
#[derive(Debug, Clone)]
pub struct Planner {
    policy: Policy,
    rules: DesiredRules,
    /// Decisions adding each exemption: within an update, the decision that takes over an
    /// exemption can be evaluated before the one that gives it up; and an interface with two
    /// exempt IPv4 routes adds its IPv6 addresses twice.
    exempt_refs: BTreeMap<ExemptKey, usize>,
    exempt6_refs: BTreeMap<Exempt6Key, usize>,
    /// Likewise for container addresses: every decision with an IPv4 route through an
    /// interface adds that interface's IPv6 addresses.
    containers6_refs: BTreeMap<Ipv6Addr, usize>,
    decisions: BTreeMap<DecisionKey, Arc<Decision>>,
    exempt: usize,
    /// Usable store entries by the IP they claim.
    /// (One flat set rather than a set per IP: a set per IP costs a B-tree node, ~300 bytes,
    /// for each of thousands of IPs claimed once.)
    claimants: BTreeSet<(Ipv4Addr, String)>,
    /// Container routes as of the last update, and the same by interface.
    routes: BTreeMap<Ipv4Addr, u32>,
    routed_via: BTreeSet<(u32, Ipv4Addr)>,
    /// IPv6 addresses by interface as of the last update.
    ipv6_of: BTreeMap<u32, Vec<Ipv6Addr>>,
}

/// The decisions an update evaluates again.
#[derive(Default)]
struct Affected {
    handles: BTreeSet<String>,
    ips: BTreeSet<Ipv4Addr>,
    interfaces: BTreeSet<u32>,
}

impl Planner {
    /// A planner with no container known (call [`Planner::update`] with [`Dirty::everything`]).
    pub fn new(config: &Config) -> Planner {
        let policy = Policy::new(config);
        Planner {
            rules: policy.rules(),
            policy,
            exempt_refs: BTreeMap::new(),
            exempt6_refs: BTreeMap::new(),
            containers6_refs: BTreeMap::new(),
            decisions: BTreeMap::new(),
            exempt: 0,
            claimants: BTreeSet::new(),
            routes: BTreeMap::new(),
            routed_via: BTreeSet::new(),
            ipv6_of: BTreeMap::new(),
        }
    }

    /// Records what the start-up probe found: without per-element limits the DNS guard falls
    /// back to a cell-wide budget ([`super::DNS_FALLBACK_SHARE`]).
    pub fn set_per_element_limits(&mut self, enforced: bool) {
        self.policy.set_per_element_limits(enforced);
        if let Some(dns) = &mut self.rules.dns {
            dns.per_element_limits = enforced;
        }
    }

    /// What the dataplane must install.
    pub fn rules(&self) -> &DesiredRules {
        &self.rules
    }

    /// Every decision, in [`super::plan`]'s order.
    pub fn decisions(&self) -> impl ExactSizeIterator<Item = &Arc<Decision>> {
        self.decisions.values()
    }

    pub fn count(&self, verdict: Verdict) -> usize {
        match verdict {
            Verdict::Exempt => self.exempt,
            Verdict::Restricted => self.decisions.len() - self.exempt,
        }
    }

    /// Brings the decisions up to date with `inputs`, given what changed; returns the decisions
    /// that changed.
    pub fn update(&mut self, inputs: Inputs<'_>, dirty: &Dirty) -> Vec<Change> {
        let dirty = self.expand_all(inputs, dirty);
        let mut affected = Affected::default();
        self.note_entries(inputs, &dirty.handles, &mut affected);
        self.note_routes(inputs, &dirty.routes, &mut affected);
        if dirty.routes6 {
            self.note_routes6(inputs, &mut affected);
        }
        affected.interfaces.extend(dirty.links.iter().copied());
        self.spread(&mut affected);
        self.evaluate(inputs, affected)
    }

    /// `Dirty::all` as the explicit handles, routes and interfaces it covers: before and now.
    fn expand_all(&self, inputs: Inputs<'_>, dirty: &Dirty) -> Dirty {
        if !dirty.all {
            return dirty.clone();
        }
        let mut handles: BTreeSet<String> = inputs.entries.keys().cloned().collect();
        for key in self.decisions.keys() {
            if let DecisionKey::Entry(handle) | DecisionKey::Problem(handle) = key {
                handles.insert(handle.to_string());
            }
        }
        Dirty {
            all: false,
            handles,
            routes: self
                .routes
                .keys()
                .chain(inputs.routes.keys())
                .copied()
                .collect(),
            routes6: true,
            links: self
                .ipv6_of
                .keys()
                .chain(self.routed_via.iter().map(|(ifindex, _)| ifindex))
                .chain(inputs.links.keys())
                .copied()
                .collect(),
        }
    }

    /// Store entries: their own decisions, and everything claiming the IPs they left or took.
    fn note_entries(
        &mut self,
        inputs: Inputs<'_>,
        handles: &BTreeSet<String>,
        affected: &mut Affected,
    ) {
        for handle in handles {
            let before = self
                .decisions
                .get(&DecisionKey::Entry(handle.as_str().into()))
                .and_then(|d| d.ip);
            let now = match inputs.entries.get(handle) {
                Some(Ok(entry)) => Some(entry.ip),
                _ => None,
            };
            if let Some(ip) = before {
                self.claimants.remove(&(ip, handle.clone()));
                affected.ips.insert(ip);
            }
            if let Some(ip) = now {
                self.claimants.insert((ip, handle.clone()));
                affected.ips.insert(ip);
            }
            affected.handles.insert(handle.clone());
        }
    }

    /// Container routes: the IPs and both interfaces (an interface's IPv4 routes decide whether
    /// its IPv6 addresses are a container's).
    fn note_routes(
        &mut self,
        inputs: Inputs<'_>,
        ips: &BTreeSet<Ipv4Addr>,
        affected: &mut Affected,
    ) {
        for ip in ips {
            let now = inputs.routes.get(ip).copied();
            let before = match now {
                Some(ifindex) => self.routes.insert(*ip, ifindex),
                None => self.routes.remove(ip),
            };
            if before == now {
                continue;
            }
            if let Some(ifindex) = before {
                self.routed_via.remove(&(ifindex, *ip));
                affected.interfaces.insert(ifindex);
            }
            if let Some(ifindex) = now {
                self.routed_via.insert((ifindex, *ip));
                affected.interfaces.insert(ifindex);
            }
            affected.ips.insert(*ip);
        }
    }

    /// IPv6 routes: the interfaces whose addresses changed.
    fn note_routes6(&mut self, inputs: Inputs<'_>, affected: &mut Affected) {
        let now = ipv6_by_interface(inputs.routes6);
        for ifindex in self.ipv6_of.keys().chain(now.keys()) {
            if self.ipv6_of.get(ifindex) != now.get(ifindex) {
                affected.interfaces.insert(*ifindex);
            }
        }
        self.ipv6_of = now;
    }

    /// Follows dependencies: an interface to the IPs routed through it, an IP to the entries
    /// claiming it.
    fn spread(&self, affected: &mut Affected) {
        for ifindex in &affected.interfaces {
            affected.ips.extend(routed_via(&self.routed_via, *ifindex));
        }
        for ip in &affected.ips {
            affected
                .handles
                .extend(claimants(&self.claimants, *ip).cloned());
        }
    }

    /// Evaluates the affected decisions again, keeping the ones that did not change.
    fn evaluate(&mut self, inputs: Inputs<'_>, affected: Affected) -> Vec<Change> {
        let mut changes = Vec::new();
        for handle in affected.handles {
            // The entry's own handle string, shared by its key and its decision.
            let (key, entry, problem) = match inputs.entries.get(&handle) {
                Some(Ok(entry)) => (
                    entry.handle.clone(),
                    Some(self.decide_entry(inputs, entry)),
                    None,
                ),
                Some(Err(reason)) => {
                    let problem = decide_problem(&handle, reason);
                    let key = problem
                        .handle
                        .clone()
                        .unwrap_or_else(|| handle.as_str().into());
                    (key, None, Some(problem))
                }
                None => (handle.as_str().into(), None, None),
            };
            self.replace(DecisionKey::Problem(key.clone()), problem, &mut changes);
            self.replace(DecisionKey::Entry(key), entry, &mut changes);
        }
        for ip in affected.ips {
            let decision = match self.routes.get(&ip) {
                Some(ifindex) if claimants(&self.claimants, ip).next().is_none() => {
                    let ifindex = Some(*ifindex);
                    Some(decide_unclaimed_route(
                        ip,
                        ifindex,
                        self.link(inputs, ifindex),
                        self.ipv6(ifindex),
                    ))
                }
                _ => None,
            };
            self.replace(DecisionKey::UnclaimedRoute(ip), decision, &mut changes);
        }
        for ifindex in affected.interfaces {
            let decision = match self.ipv6_of.get(&ifindex) {
                Some(addresses) if routed_via(&self.routed_via, ifindex).next().is_none() => {
                    let ifindex = Some(ifindex);
                    Some(decide_ipv6_only(
                        ifindex,
                        self.link(inputs, ifindex),
                        addresses.clone(),
                    ))
                }
                _ => None,
            };
            self.replace(DecisionKey::Ipv6Only(ifindex), decision, &mut changes);
        }
        changes
    }

    fn decide_entry(&self, inputs: Inputs<'_>, entry: &StoreEntry) -> Decision {
        let ifindex = self.routes.get(&entry.ip).copied();
        let claims = claimants(&self.claimants, entry.ip).count();
        self.policy.decide_entry(
            entry,
            claims,
            ifindex,
            self.link(inputs, ifindex),
            self.ipv6(ifindex),
        )
    }

    fn link(&self, inputs: Inputs<'_>, ifindex: Option<u32>) -> Option<String> {
        ifindex.and_then(|i| inputs.links.get(&i).cloned())
    }

    fn ipv6(&self, ifindex: Option<u32>) -> Vec<Ipv6Addr> {
        ifindex
            .and_then(|i| self.ipv6_of.get(&i).cloned())
            .unwrap_or_default()
    }

    /// Puts `decision` (or nothing) at `key`, keeping the rules and the count in step.
    fn replace(&mut self, key: DecisionKey, decision: Option<Decision>, changes: &mut Vec<Change>) {
        if let Some(decision) = &decision
            && self
                .decisions
                .get(&key)
                .is_some_and(|before| **before == *decision)
        {
            return;
        }
        let after = decision.map(Arc::new);
        let before = match &after {
            Some(after) => self.decisions.insert(key, after.clone()),
            None => self.decisions.remove(&key),
        };
        if before.is_none() && after.is_none() {
            return;
        }
        if let Some(before) = &before {
            self.withdraw(before);
        }
        if let Some(after) = &after {
            self.contribute(after);
        }
        for decision in before.iter().chain(after.iter()) {
            self.refresh_scopes(decision);
        }
        changes.push(Change { before, after });
    }

    fn contribute(&mut self, decision: &Decision) {
        if decision.verdict == Verdict::Exempt {
            self.exempt += 1;
        }
        if let Some(key) = decision.exempt_key() {
            *self.exempt_refs.entry(key).or_default() += 1;
            self.rules.exempt.insert(key);
        }
        for key in decision.exempt6_keys() {
            *self.exempt6_refs.entry(key).or_default() += 1;
            self.rules.exempt6.insert(key);
        }
        for ip in decision.container6_addresses() {
            *self.containers6_refs.entry(ip).or_default() += 1;
            self.rules.containers6.insert(ip);
        }
    }

    fn withdraw(&mut self, decision: &Decision) {
        if decision.verdict == Verdict::Exempt {
            self.exempt -= 1;
        }
        if let Some(key) = decision.exempt_key()
            && release(&mut self.exempt_refs, &key)
        {
            self.rules.exempt.remove(&key);
        }
        for key in decision.exempt6_keys() {
            if release(&mut self.exempt6_refs, &key) {
                self.rules.exempt6.remove(&key);
            }
        }
        for ip in decision.container6_addresses() {
            if release(&mut self.containers6_refs, &ip) {
                self.rules.containers6.remove(&ip);
            }
        }
    }

    /// Brings the scope elements of the interfaces `decision` claims an org or space for up to
    /// date with the decisions now held (called for a decision going and for one coming).
    fn refresh_scopes(&mut self, decision: &Decision) {
        if self.rules.rule_set.is_empty() {
            return;
        }
        let rule_set = self.rules.rule_set.clone();
        for (kind, ifindex, _) in rule_set.candidates(decision) {
            self.refresh_scope(&rule_set, kind, ifindex);
        }
    }

    /// One interface's element of `kind`: the org (or space) every decision reached through
    /// it claims, or none when they claim different ones (fail closed: unscoped rules only).
    /// Found from the decisions themselves (an interface has one container, rarely two), so
    /// the planner keeps no count per interface.
    fn refresh_scope(&mut self, rule_set: &super::RuleSet, kind: ScopeKind, ifindex: u32) {
        let mut ids: Vec<Arc<str>> = Vec::new();
        for ip in routed_via(&self.routed_via, ifindex) {
            for handle in claimants(&self.claimants, ip) {
                let key = DecisionKey::Entry(handle.as_str().into());
                let Some(decision) = self.decisions.get(&key) else {
                    continue;
                };
                for (k, i, id) in rule_set.candidates(decision) {
                    if (k, i) == (kind, ifindex) && !ids.contains(&id) {
                        ids.push(id);
                    }
                }
            }
        }
        let wanted = match ids.as_slice() {
            [only] => Some(only.clone()),
            _ => None,
        };
        let key = (kind, ifindex);
        if self.rules.scopes.get(&key) != wanted.as_ref() {
            let map = Arc::make_mut(&mut self.rules.scopes);
            match wanted {
                Some(id) => map.insert(key, id),
                None => map.remove(&key),
            };
        }
    }
}

/// The handles of the usable entries claiming `ip`.
fn claimants(set: &BTreeSet<(Ipv4Addr, String)>, ip: Ipv4Addr) -> impl Iterator<Item = &String> {
    set.range((ip, String::new())..)
        .take_while(move |(claimed, _)| *claimed == ip)
        .map(|(_, handle)| handle)
}

/// The IPs whose container route goes through `ifindex`.
fn routed_via(
    set: &BTreeSet<(u32, Ipv4Addr)>,
    ifindex: u32,
) -> impl Iterator<Item = Ipv4Addr> + '_ {
    set.range((ifindex, Ipv4Addr::UNSPECIFIED)..)
        .take_while(move |(via, _)| *via == ifindex)
        .map(|(_, ip)| *ip)
}

/// Drops one reference to `key`; true when it was the last.
fn release<K: Ord>(refs: &mut BTreeMap<K, usize>, key: &K) -> bool {
    match refs.get_mut(key) {
        Some(count) if *count > 1 => {
            *count -= 1;
            false
        }
        Some(_) => {
            refs.remove(key);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests;
