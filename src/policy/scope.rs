//! Which `[[rules]]` apply to which container: a rule scoped to orgs or spaces reaches a
//! container through the org or space it is in. The kernel keeps that as two verdict maps
//! from the container's host interface to the chain of its org and of its space, so a
//! container coming or going changes at most one element in each.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use super::{Decision, Verdict};
use crate::config::EgressRule;

/// The two ways a rule names its scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeKind {
    Org,
    Space,
}

impl ScopeKind {
    pub const ALL: [ScopeKind; 2] = [ScopeKind::Org, ScopeKind::Space];

    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Org => "org",
            ScopeKind::Space => "space",
        }
    }
}

impl fmt::Display for ScopeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The scope elements: (kind, host ifindex) -> the org or space GUID whose chain the
/// container's packets jump to.
pub type ScopeElements = BTreeMap<(ScopeKind, u32), Arc<str>>;

/// The rules, grouped as the kernel holds them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuleSet {
    /// Every rule, in the order written (its index names it).
    pub rules: Vec<EgressRule>,
    /// Every org and every space some rule names (looked up once per container).
    named_orgs: BTreeSet<String>,
    named_spaces: BTreeSet<String>,
    /// The hostname rules (their indices), each with the connection mark its connections get
    /// ([`host_marks`]), in the order written.
    host_marks: Vec<(usize, u16)>,
}

/// Connection mark values of hostname rules: 1 to this (12 bits of the ct mark).
pub const MAX_HOST_MARK: u16 = 0x0fff;

/// A mark for each hostname rule among `rules`, derived from the rule's content so that a
/// reload keeps an unchanged rule's mark (its connections stay open) and a removed rule's mark
/// goes (its connections are rejected); rules whose hashes collide take the next free value
/// in the order written.
fn host_marks(rules: &[EgressRule]) -> Vec<(usize, u16)> {
    let mut taken = BTreeSet::new();
    let mut out = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        if rule.destination.hostname().is_none() {
            continue;
        }
        let identity = format!(
            "{}|{}|{}|{:?}|{:?}",
            rule.destination,
            rule.protocol,
            crate::config::ports_text(&rule.ports),
            rule.orgs,
            rule.spaces
        );
        let hash = xxhash_rust::xxh3::xxh3_64(identity.as_bytes());
        let mut mark = (hash % u64::from(MAX_HOST_MARK)) as u16 + 1;
        while !taken.insert(mark) {
            mark = mark % MAX_HOST_MARK + 1;
        }
        out.push((index, mark));
    }
    out
}

impl RuleSet {
    pub fn new(rules: Vec<EgressRule>) -> RuleSet {
        // Scope chains hold address rules only: hostname rules are scoped when the DNS filter
        // learns an answer, and a container's learned addresses lead to the rule's own chain.
        let address_rules = || rules.iter().filter(|r| r.destination.hostname().is_none());
        let named_orgs = address_rules()
            .flat_map(|r| r.orgs.iter().cloned())
            .collect();
        let named_spaces = address_rules()
            .flat_map(|r| r.spaces.iter().cloned())
            .collect();
        let host_marks = host_marks(&rules);
        RuleSet {
            rules,
            named_orgs,
            named_spaces,
            host_marks,
        }
    }

    /// The hostname rules' indices with their connection marks, in the order written.
    pub fn host_marks(&self) -> &[(usize, u16)] {
        &self.host_marks
    }

    /// The hostname rules' connection marks.
    pub fn mark_set(&self) -> std::collections::BTreeSet<u16> {
        self.host_marks.iter().map(|(_, mark)| *mark).collect()
    }

    /// The hostname rule with connection mark `mark`.
    pub fn host_rule(&self, mark: u16) -> Option<&EgressRule> {
        self.host_marks
            .iter()
            .find(|(_, m)| *m == mark)
            .map(|(i, _)| &self.rules[*i])
    }

    /// Whether rule `index` is an address rule (kept in the scope chains).
    fn is_address_rule(&self, index: usize) -> bool {
        self.rules[index].destination.hostname().is_none()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Indices of the address rules that apply to every restricted container.
    pub fn unscoped(&self) -> Vec<usize> {
        (0..self.rules.len())
            .filter(|i| self.rules[*i].is_unscoped() && self.is_address_rule(*i))
            .collect()
    }

    /// Every org or space an address rule names, with the indices of its address rules, in
    /// GUID order.
    pub fn scopes(&self, kind: ScopeKind) -> BTreeMap<&str, Vec<usize>> {
        let mut scopes: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if !self.is_address_rule(i) {
                continue;
            }
            let ids = match kind {
                ScopeKind::Org => &rule.orgs,
                ScopeKind::Space => &rule.spaces,
            };
            for id in ids {
                scopes.entry(id.as_str()).or_default().push(i);
            }
        }
        scopes
    }

    /// Whether a rule names `id` as an org (or space).
    pub fn names(&self, kind: ScopeKind, id: &str) -> bool {
        match kind {
            ScopeKind::Org => self.named_orgs.contains(id),
            ScopeKind::Space => self.named_spaces.contains(id),
        }
    }

    /// Indices of the rules that apply to a container of `org` and `space`, in order.
    pub fn applicable(&self, org: Option<&str>, space: Option<&str>) -> Vec<usize> {
        let org = org.map(lowercase);
        let space = space.map(lowercase);
        (0..self.rules.len())
            .filter(|i| self.rules[*i].applies_to(org.as_deref(), space.as_deref()))
            .collect()
    }

    /// The scope elements `decision` asks for: its org's and its space's, when a rule names
    /// them and the container is restricted and reached through a known host interface.
    pub fn candidates(&self, decision: &Decision) -> Vec<(ScopeKind, u32, Arc<str>)> {
        let (Verdict::Restricted, Some(ifindex), Some(_)) =
            (decision.verdict, decision.host_ifindex, decision.ip)
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (kind, id) in [
            (ScopeKind::Org, &decision.org_id),
            (ScopeKind::Space, &decision.space_id),
        ] {
            let Some(id) = id else { continue };
            if self.is_empty() {
                break;
            }
            let id: Arc<str> = if id.bytes().any(|b| b.is_ascii_uppercase()) {
                lowercase(id).into()
            } else {
                id.clone()
            };
            if self.names(kind, &id) {
                out.push((kind, ifindex, id));
            }
        }
        out
    }
}

fn lowercase(s: &str) -> String {
    s.to_ascii_lowercase()
}

/// The scope elements of a whole plan: an interface claimed for two different orgs (or
/// spaces), by two entries, gets none (fail closed: only unscoped rules apply to it).
pub fn scope_elements<'a>(
    rules: &RuleSet,
    decisions: impl Iterator<Item = &'a Decision>,
) -> ScopeElements {
    let mut claims: BTreeMap<(ScopeKind, u32), BTreeSet<Arc<str>>> = BTreeMap::new();
    for decision in decisions {
        for (kind, ifindex, id) in rules.candidates(decision) {
            claims.entry((kind, ifindex)).or_default().insert(id);
        }
    }
    claims
        .into_iter()
        .filter_map(|(key, ids)| match ids.len() {
            1 => ids.into_iter().next().map(|id| (key, id)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn decision(
        ifindex: u32,
        org: Option<&str>,
        space: Option<&str>,
        verdict: Verdict,
    ) -> Decision {
        Decision {
            handle: Some("h".into()),
            ip: Some(std::net::Ipv4Addr::new(10, 255, 0, 1)),
            ipv6: Vec::new(),
            host_ifindex: Some(ifindex),
            host_interface: None,
            workload: Some("app".into()),
            app_id: None,
            space_id: space.map(Into::into),
            org_id: org.map(Into::into),
            log_index: None,
            verdict,
            reason: String::new(),
        }
    }

    fn rule_set() -> RuleSet {
        let config = Config::parse(
            r#"
            [[rules]]
            destination = "192.0.2.1"
            orgs = ["org-a", "org-b"]
            [[rules]]
            destination = "192.0.2.2"
            spaces = ["space-a"]
            [[rules]]
            destination = "192.0.2.3"
            "#,
        )
        .expect("valid");
        RuleSet::new(config.rules)
    }

    #[test]
    fn a_restricted_container_gets_the_chains_of_the_org_and_space_a_rule_names() {
        let rules = rule_set();
        let decisions = [
            decision(10, Some("org-a"), Some("space-a"), Verdict::Restricted),
            decision(11, Some("ORG-B"), Some("space-z"), Verdict::Restricted),
            decision(12, Some("org-z"), None, Verdict::Restricted),
            decision(13, Some("org-a"), None, Verdict::Exempt),
        ];
        let elements = scope_elements(&rules, decisions.iter());
        let expected: ScopeElements = [
            ((ScopeKind::Org, 10), "org-a".into()),
            ((ScopeKind::Space, 10), "space-a".into()),
            ((ScopeKind::Org, 11), "org-b".into()),
        ]
        .into_iter()
        .collect();
        assert_eq!(elements, expected);
        assert_eq!(rules.applicable(Some("ORG-B"), None), vec![0, 2]);
        assert_eq!(rules.applicable(None, None), vec![2]);
        assert_eq!(rules.applicable(Some("x"), Some("space-a")), vec![1, 2]);
    }

    #[test]
    fn an_interface_claimed_for_two_orgs_gets_neither() {
        let rules = rule_set();
        let decisions = [
            decision(10, Some("org-a"), None, Verdict::Restricted),
            decision(10, Some("org-b"), None, Verdict::Restricted),
        ];
        assert!(scope_elements(&rules, decisions.iter()).is_empty());
    }
}
