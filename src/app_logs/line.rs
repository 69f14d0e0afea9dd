//! The words of an app log line (pure): what happened, and what this app may reach instead,
//! so that a developer understands it without our documentation.

use std::fmt::Write as _;

use crate::attribution::{Action, AppAttempt, Destination};

/// Said at the end of every line: who is speaking.
const WHO: &str = "(egress-guard on isolation segment cells)";

/// `egress to 203.0.113.10:443/tcp rejected: this space's apps may reach only 10.0.0.0/8
/// (egress-guard on isolation segment cells)`; in audit mode `would be rejected`; a refused
/// DNS query names the query and what may be resolved.
pub fn line(attempt: &AppAttempt, allowed: &Allowed) -> String {
    let what = subject(attempt);
    match attempt.destination {
        Destination::Name(_) => format!(
            "{what} refused: this space's apps may resolve only names under {} {WHO}",
            allowed.names
        ),
        Destination::Address(_) if attempt.reachable_by_rule.is_empty() => format!(
            "{what} {}: this space's apps may reach only {} {WHO}",
            verb(attempt.action),
            allowed.networks
        ),
        Destination::Address(_) => format!(
            "{what} {}: this app may reach only {} and, by the rules for its org or space, {} \
             {WHO}",
            verb(attempt.action),
            allowed.networks,
            attempt.reachable_by_rule.join(", ")
        ),
    }
}

/// The line for attempts the per-minute limit held back.
pub fn summary(attempt: &AppAttempt, more: u64, per_minute: u32) -> String {
    let what = subject(attempt);
    let verb = match attempt.destination {
        Destination::Name(_) => "refused",
        Destination::Address(_) => verb(attempt.action),
    };
    format!(
        "{what}: {more} more attempt{} {verb} in the last minute, not logged one by one \
         (at most {per_minute} lines a minute per destination) {WHO}",
        if more == 1 { "" } else { "s" }
    )
}

/// `egress to 203.0.113.10:443/tcp`, `egress to 2001:db8::1 (icmp)`, `DNS lookup of x.example`.
pub fn subject(attempt: &AppAttempt) -> String {
    match &attempt.destination {
        Destination::Name(name) => format!("DNS lookup of {name}"),
        Destination::Address(address) => {
            let mut text = String::from("egress to ");
            let protocol = attempt.protocol.name();
            match (address, attempt.dst_port) {
                (std::net::IpAddr::V6(v6), Some(port)) => {
                    let _ = write!(text, "[{v6}]:{port}/{protocol}");
                }
                (ip, Some(port)) => {
                    let _ = write!(text, "{ip}:{port}/{protocol}");
                }
                (ip, None) => {
                    let _ = write!(text, "{ip} ({protocol})");
                }
            }
            text
        }
    }
}

fn verb(action: Action) -> &'static str {
    match action {
        Action::Rejected => "rejected",
        Action::WouldReject => "would be rejected (audit mode: let through for now)",
    }
}

/// What the lines say the app may reach: the segment's `allowed_networks` and the DNS
/// filter's allowed names, as the operator wrote them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub networks: String,
    pub names: String,
}

impl Allowed {
    pub fn new(networks: &[impl ToString], names: &[impl ToString]) -> Allowed {
        let join = |items: Vec<String>| {
            if items.is_empty() {
                "nothing outside this cell".to_string()
            } else {
                items.join(", ")
            }
        };
        Allowed {
            networks: join(networks.iter().map(ToString::to_string).collect()),
            names: join(names.iter().map(ToString::to_string).collect()),
        }
    }
}

/// The key a line is limited by: the app and what it tried to reach.
pub fn destination_key(attempt: &AppAttempt) -> (String, String) {
    (attempt.app_id.clone(), subject(attempt))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::Protocol;
    use std::time::SystemTime;

    fn attempt(destination: Destination, protocol: Protocol, port: Option<u16>) -> AppAttempt {
        AppAttempt {
            app_id: "app-guid".into(),
            instance_index: Some(2),
            action: Action::Rejected,
            destination,
            protocol,
            dst_port: port,
            reachable_by_rule: Vec::new(),
            at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_line_names_what_the_apps_rules_let_it_reach() {
        let allowed = Allowed::new(&["10.0.0.0/8"], &["apps.internal."]);
        let mut tcp = attempt(
            Destination::Address("203.0.113.10".parse().expect("literal")),
            Protocol::Ip(6),
            Some(443),
        );
        tcp.reachable_by_rule = vec!["172.16.0.0/24 tcp port 5432".into()];
        assert_eq!(
            line(&tcp, &allowed),
            "egress to 203.0.113.10:443/tcp rejected: this app may reach only 10.0.0.0/8 and, \
             by the rules for its org or space, 172.16.0.0/24 tcp port 5432 (egress-guard on \
             isolation segment cells)"
        );
    }

    #[test]
    fn lines_say_what_was_blocked_and_what_is_allowed() {
        let allowed = Allowed::new(&["10.0.0.0/8"], &["apps.internal."]);
        let tcp = attempt(
            Destination::Address("203.0.113.10".parse().expect("literal")),
            Protocol::Ip(6),
            Some(443),
        );
        assert_eq!(
            line(&tcp, &allowed),
            "egress to 203.0.113.10:443/tcp rejected: this space's apps may reach only \
             10.0.0.0/8 (egress-guard on isolation segment cells)"
        );
        let audit = AppAttempt {
            action: Action::WouldReject,
            ..tcp.clone()
        };
        assert!(line(&audit, &allowed).contains("443/tcp would be rejected"));
        let v6 = attempt(
            Destination::Address("2001:db8::1".parse().expect("literal")),
            Protocol::Ip(17),
            Some(53),
        );
        assert!(line(&v6, &allowed).starts_with("egress to [2001:db8::1]:53/udp rejected"));
        let ping = attempt(
            Destination::Address("192.0.2.1".parse().expect("literal")),
            Protocol::Ip(1),
            None,
        );
        assert!(line(&ping, &allowed).starts_with("egress to 192.0.2.1 (icmp) rejected"));
        let dns = attempt(
            Destination::Name("x.attacker.example".into()),
            Protocol::Dns,
            Some(53),
        );
        assert_eq!(
            line(&dns, &allowed),
            "DNS lookup of x.attacker.example refused: this space's apps may resolve only names \
             under apps.internal. (egress-guard on isolation segment cells)"
        );
        assert_eq!(
            summary(&tcp, 37, 5),
            "egress to 203.0.113.10:443/tcp: 37 more attempts rejected in the last minute, not \
             logged one by one (at most 5 lines a minute per destination) (egress-guard on \
             isolation segment cells)"
        );
    }
}
