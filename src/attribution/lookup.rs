//! Who sent a packet: (host interface, source address) -> the container the policy knows.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::policy::{Change, Decision, RuleSet};

/// Who sent it, as the policy knew the sender when its first packet of a row arrived. Ids are
/// empty strings for a container the metadata store does not know.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Sender {
    pub handle: String,
    pub app_id: String,
    pub space_id: String,
    pub org_id: String,
    pub workload: String,
    /// Host-side interface (name, or `ifindex N` when the agent does not know its name).
    pub interface: String,
    /// The app instance's index (`log_config`), for app log lines.
    #[serde(skip)]
    pub log_index: Option<u32>,
    /// The `[[rules]]` in the sender's scope (their indices), and what they let it reach, in
    /// words: which scope applied to the attempt.
    #[serde(skip)]
    pub rules_in_scope: Vec<usize>,
    #[serde(skip)]
    pub reachable_by_rule: Vec<String>,
}

impl Sender {
    fn of(decision: &Decision, rules: &RuleSet) -> Sender {
        let text = |v: &Option<Arc<str>>| v.as_deref().unwrap_or_default().to_string();
        let rules_in_scope = if rules.is_empty() {
            Vec::new()
        } else {
            rules.applicable(decision.org_id.as_deref(), decision.space_id.as_deref())
        };
        let reachable_by_rule = rules_in_scope
            .iter()
            .map(|i| {
                let rule = &rules.rules[*i];
                let mut text = format!("{} {}", rule.destination, rule.protocol);
                if !rule.ports.is_empty() {
                    text.push_str(&format!(" port {}", crate::config::ports_text(&rule.ports)));
                }
                text
            })
            .collect();
        Sender {
            rules_in_scope,
            reachable_by_rule,
            handle: text(&decision.handle),
            app_id: text(&decision.app_id),
            space_id: text(&decision.space_id),
            org_id: text(&decision.org_id),
            workload: text(&decision.workload),
            interface: decision
                .host_interface
                .clone()
                .or_else(|| decision.host_ifindex.map(|i| format!("ifindex {i}")))
                .unwrap_or_default(),
            log_index: decision.log_index,
        }
    }

    fn unknown(interface: String) -> Sender {
        // Unknown to the store: only unscoped rules could apply, and it is not an app.
        Sender {
            interface,
            ..Sender::default()
        }
    }
}

/// (host ifindex, source) -> the container, from the policy's decisions, kept current with the
/// decisions each pass changed. A packet whose source does not belong to its interface (a
/// forged source) is attributed to the interface's container; one from an interface the policy
/// does not know is reported as unknown.
///
/// Where several decisions share a key (two store entries claiming one IP), the lookup resolves
/// it as a full rebuild in the policy's order would: the last decision for a source or an
/// address, the first for an interface.
#[derive(Debug, Default)]
pub struct Lookup {
    /// By source address (IPv4 and IPv6); a packet's interface picks among them.
    by_address: HashMap<IpAddr, Candidates>,
    by_ifindex: HashMap<u32, Candidates>,
    links: HashMap<u32, String>,
    /// The `[[rules]]`, to say which applied to a sender.
    rules: Arc<RuleSet>,
}

/// The decisions sharing one key, in the policy's order: almost always one, kept without a
/// vector then (5,000 containers, two keys each).
#[derive(Debug)]
enum Candidates {
    One(Arc<Decision>),
    Many(Vec<Arc<Decision>>),
}

/// A decision's place in the policy's order ([`DecisionKey`]'s), without allocating.
pub(super) fn policy_order(d: &Decision) -> (u8, &str, Option<std::net::Ipv4Addr>, u32) {
    match (&d.handle, d.ip) {
        (Some(handle), Some(_)) => (0, handle, None, 0),
        (None, Some(ip)) => (1, "", Some(ip), 0),
        (None, None) => (2, "", None, d.host_ifindex.unwrap_or_default()),
        (Some(handle), None) => (3, handle, None, 0),
    }
}

impl Candidates {
    fn as_slice(&self) -> &[Arc<Decision>] {
        match self {
            Candidates::One(one) => std::slice::from_ref(one),
            Candidates::Many(many) => many,
        }
    }

    /// Adds `decision`, replacing one with the same key.
    fn insert(&mut self, decision: &Arc<Decision>) {
        let order = policy_order(decision);
        self.edit(
            |all| match all.binary_search_by(|d| policy_order(d).cmp(&order)) {
                Ok(at) => all[at] = decision.clone(),
                Err(at) => all.insert(at, decision.clone()),
            },
        );
    }

    /// Removes the decision with `decision`'s key; false when none is left.
    fn remove(&mut self, decision: &Decision) -> bool {
        let order = policy_order(decision);
        self.edit(|all| all.retain(|d| policy_order(d) != order));
        !self.as_slice().is_empty()
    }

    /// Changes the candidates as a vector, then keeps them in their compact form.
    fn edit(&mut self, change: impl FnOnce(&mut Vec<Arc<Decision>>)) {
        let mut all = match std::mem::replace(self, Candidates::Many(Vec::new())) {
            Candidates::One(one) => vec![one],
            Candidates::Many(many) => many,
        };
        change(&mut all);
        *self = Candidates::from(all);
    }
}

impl From<Vec<Arc<Decision>>> for Candidates {
    fn from(mut all: Vec<Arc<Decision>>) -> Candidates {
        match all.len() {
            1 => Candidates::One(all.remove(0)),
            _ => Candidates::Many(all),
        }
    }
}

/// Adds (`add`) or removes `decision` under `key` in `map`.
fn index<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Candidates>,
    key: K,
    decision: &Arc<Decision>,
    add: bool,
) {
    if add {
        match map.get_mut(&key) {
            Some(candidates) => candidates.insert(decision),
            None => {
                map.insert(key, Candidates::One(decision.clone()));
            }
        }
    } else if let Some(candidates) = map.get_mut(&key)
        && !candidates.remove(decision)
    {
        map.remove(&key);
    }
}

impl Lookup {
    /// A lookup of `decisions` (as a full policy evaluation lists them).
    pub fn new(decisions: &[Decision], links: &BTreeMap<u32, String>) -> Lookup {
        let mut lookup = Lookup::default();
        lookup.set_links(links);
        let changes: Vec<Change> = decisions
            .iter()
            .map(|d| Change {
                before: None,
                after: Some(Arc::new(d.clone())),
            })
            .collect();
        lookup.apply(&changes);
        lookup
    }

    /// Follows the decisions a pass changed.
    pub fn apply(&mut self, changes: &[Change]) {
        for change in changes {
            if let Some(before) = &change.before {
                self.index(before, false);
            }
            if let Some(after) = &change.after {
                self.index(after, true);
            }
        }
    }

    fn index(&mut self, decision: &Arc<Decision>, add: bool) {
        let Some(ifindex) = decision.host_ifindex else {
            return;
        };
        let addresses = decision
            .ip
            .map(IpAddr::V4)
            .into_iter()
            .chain(decision.ipv6.iter().copied().map(IpAddr::V6));
        for ip in addresses {
            index(&mut self.by_address, ip, decision, add);
        }
        index(&mut self.by_ifindex, ifindex, decision, add);
    }

    /// The `[[rules]]` in force (after each pass: a reload may change them).
    pub fn set_rules(&mut self, rules: Arc<RuleSet>) {
        self.rules = rules;
    }

    /// Replaces every interface name (after a link dump).
    pub fn set_links(&mut self, links: &BTreeMap<u32, String>) {
        self.links = links.iter().map(|(i, n)| (*i, n.clone())).collect();
    }

    /// One interface's name changed (`None`: the interface went).
    pub fn set_link(&mut self, ifindex: u32, name: Option<&str>) {
        match name {
            Some(name) => self.links.insert(ifindex, name.to_string()),
            None => self.links.remove(&ifindex),
        };
    }

    /// The restricted container that owns `src` and the host interface it is reached through,
    /// as the last pass decided (the last decision for the address, as attribution takes it).
    pub fn restricted_owner(&self, src: IpAddr) -> Option<&Decision> {
        let decision = self.by_address.get(&src)?.as_slice().last()?;
        (decision.verdict == crate::policy::Verdict::Restricted && decision.host_ifindex.is_some())
            .then_some(&**decision)
    }

    pub fn sender(&self, ifindex: Option<u32>, src: IpAddr) -> Sender {
        let by_address = self.by_address.get(&src).map(Candidates::as_slice);
        let Some(ifindex) = ifindex else {
            return by_address
                .and_then(<[_]>::last)
                .map(|d| Sender::of(d, &self.rules))
                .unwrap_or_else(|| Sender::unknown(String::new()));
        };
        let from_interface = by_address
            .and_then(|all| all.iter().rev().find(|d| d.host_ifindex == Some(ifindex)))
            .or_else(|| {
                self.by_ifindex
                    .get(&ifindex)
                    .and_then(|c| c.as_slice().first())
            });
        match from_interface {
            Some(decision) => Sender::of(decision, &self.rules),
            None => Sender::unknown(
                self.links
                    .get(&ifindex)
                    .cloned()
                    .unwrap_or_else(|| format!("ifindex {ifindex}")),
            ),
        }
    }
}
