//! Why a container may, or may not, send to a destination: the same order of checks the
//! kernel rules make (exemption, allowed networks, rules in the container's scope), in words.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use super::{Decision, RuleSet, Verdict};

/// A destination as `explain` takes it: `ip[:port][/proto]` (IPv6 in brackets with a port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub ip: IpAddr,
    pub port: Option<u16>,
    /// The IP protocol number: 6 (tcp), 17 (udp), 1 or 58 (icmp); None: any.
    pub l4proto: Option<u8>,
}

impl Probe {
    /// `198.51.100.7`, `198.51.100.7:443`, `198.51.100.7:53/udp`, `[2001:db8::1]:443/tcp`,
    /// `2001:db8::1`, `198.51.100.7/icmp`. A port without a protocol means TCP.
    pub fn parse(text: &str) -> Result<Probe, String> {
        let (rest, proto) = match text.rsplit_once('/') {
            Some((rest, proto)) => (rest, Some(proto.to_ascii_lowercase())),
            None => (text, None),
        };
        let (host, port) = if let Ok(ip) = rest.parse::<IpAddr>() {
            (ip, None)
        } else if let Ok(addr) = rest.parse::<std::net::SocketAddr>() {
            (addr.ip(), Some(addr.port()))
        } else {
            return Err(format!(
                "{text:?} is not IP[:PORT][/tcp|udp|icmp] (IPv6 with a port: [ADDR]:PORT)"
            ));
        };
        let l4proto = match proto.as_deref() {
            None if port.is_some() => Some(6),
            None => None,
            Some("tcp") => Some(6),
            Some("udp") => Some(17),
            Some("icmp") if port.is_none() => Some(if host.is_ipv6() { 58 } else { 1 }),
            Some(other) => {
                return Err(format!(
                    "{other:?} in {text:?}: the protocol is tcp or udp (with a port) or icmp"
                ));
            }
        };
        Ok(Probe {
            ip: host,
            port,
            l4proto,
        })
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.l4proto {
            Some(6) => "/tcp",
            Some(17) => "/udp",
            Some(1) | Some(58) => "/icmp",
            _ => "",
        };
        match (self.port, self.ip) {
            (Some(port), IpAddr::V6(ip)) => write!(f, "[{ip}]:{port}{proto}"),
            (Some(port), ip) => write!(f, "{ip}:{port}{proto}"),
            (None, ip) => write!(f, "{ip}{proto}"),
        }
    }
}

/// What the rules do with a packet from a container to a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The container is exempt (staging): nothing of egress-guard's applies.
    Exempt,
    /// The destination is in `allowed_networks` (or the overlay).
    AllowedNetwork { network: IpNet },
    /// A rule in the container's scope lets it through.
    AllowedByRule {
        index: usize,
        description: String,
        scope: String,
    },
    /// Rejected (reported in audit mode): why, and which rules were in scope.
    Rejected {
        reason: String,
        rules_in_scope: Vec<usize>,
    },
}

/// The outcome for `decision` sending `probe`. `allowed`: `allowed_networks` with the overlay.
/// (IPv6 to another container of the cell is also let through by the kernel; that set is not
/// part of this answer.)
pub fn explain_destination(
    decision: &Decision,
    allowed: &[IpNet],
    rules: &RuleSet,
    probe: &Probe,
) -> Outcome {
    if decision.verdict == Verdict::Exempt {
        return Outcome::Exempt;
    }
    if let Some(network) = allowed.iter().find(|n| n.contains(&probe.ip)) {
        return Outcome::AllowedNetwork { network: *network };
    }
    let in_scope = rules.applicable(decision.org_id.as_deref(), decision.space_id.as_deref());
    for index in &in_scope {
        let rule = &rules.rules[*index];
        // Without a protocol in the probe, a rule for one protocol answers "maybe": only a
        // rule for every protocol (and port) lets every packet through.
        let matches = match probe.l4proto {
            Some(_) => rule.matches(probe.ip, probe.l4proto, probe.port),
            None => {
                rule.ports.is_empty()
                    && rule.protocol == crate::config::Protocol::All
                    && rule.matches(probe.ip, None, None)
            }
        };
        if matches {
            return Outcome::AllowedByRule {
                index: *index,
                description: rule.description.clone(),
                scope: rule.scope_text(),
            };
        }
    }
    let mut reason = if in_scope.is_empty() {
        "outside allowed_networks, and no rule applies to this container".to_string()
    } else {
        format!(
            "outside allowed_networks, and none of the {} rule(s) in this container's scope \
             matches",
            in_scope.len()
        )
    };
    let hostnames: Vec<String> = in_scope
        .iter()
        .filter_map(|i| rules.rules[*i].destination.hostname())
        .map(ToString::to_string)
        .collect();
    if !hostnames.is_empty() {
        reason.push_str(&format!(
            " (hostname rules in scope, {}, allow an address only once this container's own \
             DNS query for the name answered it, until the answer's TTL runs out)",
            hostnames.join(", ")
        ));
    }
    Outcome::Rejected {
        reason,
        rules_in_scope: in_scope,
    }
}

/// How many restricted containers (reached through a host interface) each rule applies to.
pub fn containers_per_rule<'a>(
    rules: &RuleSet,
    decisions: impl Iterator<Item = &'a Decision>,
) -> Vec<usize> {
    let mut counts = vec![0; rules.rules.len()];
    for decision in decisions {
        if decision.verdict != Verdict::Restricted || decision.host_ifindex.is_none() {
            continue;
        }
        for index in rules.applicable(decision.org_id.as_deref(), decision.space_id.as_deref()) {
            counts[index] += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::sync::Arc;

    fn decision(org: &str, verdict: Verdict) -> Decision {
        Decision {
            handle: Some("h".into()),
            ip: Some(std::net::Ipv4Addr::new(10, 255, 0, 1)),
            ipv6: Vec::new(),
            host_ifindex: Some(9),
            host_interface: None,
            workload: None,
            app_id: None,
            space_id: Some(Arc::from("space-1")),
            org_id: Some(Arc::from(org)),
            log_index: None,
            verdict,
            reason: String::new(),
        }
    }

    fn rules() -> RuleSet {
        let config = Config::parse(
            r#"
            [[rules]]
            description = "peered"
            destination = "172.16.0.0/24"
            protocol = "tcp"
            ports = "5432"
            orgs = ["org-a"]
            [[rules]]
            destination = "198.51.100.0/24"
            "#,
        )
        .expect("valid");
        RuleSet::new(config.rules)
    }

    #[test]
    fn destinations_are_explained_in_the_kernel_order() {
        let allowed: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let rules = rules();
        let a = decision("org-a", Verdict::Restricted);
        let b = decision("org-b", Verdict::Restricted);
        let probe = |t: &str| Probe::parse(t).unwrap();
        assert_eq!(
            explain_destination(&a, &allowed, &rules, &probe("10.1.2.3:443")),
            Outcome::AllowedNetwork {
                network: "10.0.0.0/8".parse().unwrap()
            }
        );
        assert!(matches!(
            explain_destination(&a, &allowed, &rules, &probe("172.16.0.9:5432")),
            Outcome::AllowedByRule { index: 0, .. }
        ));
        assert!(matches!(
            explain_destination(&a, &allowed, &rules, &probe("172.16.0.9:5433")),
            Outcome::Rejected { ref rules_in_scope, .. } if rules_in_scope == &vec![0, 1]
        ));
        assert!(matches!(
            explain_destination(&b, &allowed, &rules, &probe("172.16.0.9:5432")),
            Outcome::Rejected { ref rules_in_scope, .. } if rules_in_scope == &vec![1]
        ));
        assert!(matches!(
            explain_destination(&b, &allowed, &rules, &probe("198.51.100.4/icmp")),
            Outcome::AllowedByRule { index: 1, .. }
        ));
        let staging = decision("org-b", Verdict::Exempt);
        assert_eq!(
            explain_destination(&staging, &allowed, &rules, &probe("203.0.113.1")),
            Outcome::Exempt
        );
        assert_eq!(
            containers_per_rule(&rules, [a, b, staging].iter()),
            vec![1, 2]
        );
    }

    #[test]
    fn probes_parse_and_print() {
        for (text, printed) in [
            ("198.51.100.7", "198.51.100.7"),
            ("198.51.100.7:443", "198.51.100.7:443/tcp"),
            ("198.51.100.7:53/UDP", "198.51.100.7:53/udp"),
            ("[2001:db8::1]:443/tcp", "[2001:db8::1]:443/tcp"),
            ("2001:db8::1/icmp", "2001:db8::1/icmp"),
        ] {
            assert_eq!(Probe::parse(text).unwrap().to_string(), printed);
        }
        for bad in [
            "nowhere",
            "198.51.100.7:99999",
            "198.51.100.7:53/sctp",
            "1.2.3.4:5/icmp",
        ] {
            assert!(Probe::parse(bad).is_err(), "{bad}");
        }
    }
}
