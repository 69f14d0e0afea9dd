//! `[[rules]]`: destinations restricted containers may reach beyond `allowed_networks`, in the
//! shape of Cloud Foundry's ASG rules, each scoped to orgs and spaces.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Longest org or space GUID accepted: it becomes part of a chain name (`org_<guid>`), which
/// nf_tables limits to 255 bytes; Cloud Foundry's GUIDs have 36.
pub const MAX_SCOPE_ID_LEN: usize = 64;
/// Most `[[rules]]` accepted: each is a few rules in the kernel, evaluated in order for the
/// packets of the containers it applies to.
pub const MAX_RULES: usize = 1000;

/// One `[[rules]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    #[serde(default)]
    description: String,
    destination: String,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    ports: Option<String>,
    #[serde(default)]
    orgs: Vec<String>,
    #[serde(default)]
    spaces: Vec<String>,
}

/// A validated rule: a restricted container in its scope may send what it matches. Read back
/// from `/status` by `explain` (the destination and ports as written there).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EgressRule {
    /// Free text, shown by `explain`, `status` and in reports.
    pub description: String,
    pub destination: Destination,
    pub protocol: Protocol,
    /// Destination port ranges (first, last), sorted; empty: every port. Only with tcp or udp.
    #[serde(
        serialize_with = "serialize_ports",
        deserialize_with = "deserialize_ports"
    )]
    pub ports: Vec<(u16, u16)>,
    /// The scope: a container whose org is in `orgs` or whose space is in `spaces`. Both
    /// empty: every restricted container.
    pub orgs: BTreeSet<String>,
    pub spaces: BTreeSet<String>,
}

impl EgressRule {
    /// Whether the rule applies to every restricted container.
    pub fn is_unscoped(&self) -> bool {
        self.orgs.is_empty() && self.spaces.is_empty()
    }

    /// Whether the rule applies to a container of `org` and `space`.
    pub fn applies_to(&self, org: Option<&str>, space: Option<&str>) -> bool {
        self.is_unscoped()
            || org.is_some_and(|o| self.orgs.contains(o))
            || space.is_some_and(|s| self.spaces.contains(s))
    }

    /// Whether the rule lets a packet to `ip` (protocol number `l4proto`, destination `port`
    /// when TCP or UDP) through.
    pub fn matches(&self, ip: IpAddr, l4proto: Option<u8>, port: Option<u16>) -> bool {
        let destination = match &self.destination {
            Destination::Network(net) => net.contains(&ip),
            Destination::Range(first, last) => match (first, last, ip) {
                (IpAddr::V4(a), IpAddr::V4(b), IpAddr::V4(ip)) => (*a..=*b).contains(&ip),
                (IpAddr::V6(a), IpAddr::V6(b), IpAddr::V6(ip)) => (*a..=*b).contains(&ip),
                _ => false,
            },
            // What a name resolved to is the DNS filter's to say, per container.
            Destination::Hostname(_) => false,
        };
        let protocol = match self.protocol {
            Protocol::All => true,
            other => l4proto == Some(other.number(ip.is_ipv6())),
        };
        let port = self.ports.is_empty()
            || port.is_some_and(|p| self.ports.iter().any(|(a, b)| (*a..=*b).contains(&p)));
        destination && protocol && port
    }

    /// The scope in words, for status and logs.
    pub fn scope_text(&self) -> String {
        if self.is_unscoped() {
            return "every restricted container".into();
        }
        let mut parts = Vec::new();
        if !self.orgs.is_empty() {
            parts.push(format!(
                "orgs {}",
                self.orgs.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        if !self.spaces.is_empty() {
            parts.push(format!(
                "spaces {}",
                self.spaces.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        parts.join(" or ")
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.destination, self.protocol)?;
        if !self.ports.is_empty() {
            write!(f, " ports {}", ports_text(&self.ports))?;
        }
        if !self.description.is_empty() {
            write!(f, " ({:?})", self.description)?;
        }
        Ok(())
    }
}

fn deserialize_ports<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(u16, u16)>, D::Error> {
    let text = String::deserialize(d)?;
    if text.is_empty() {
        return Ok(Vec::new());
    }
    parse_ports(&text).map_err(serde::de::Error::custom)
}

fn serialize_ports<S: serde::Serializer>(ports: &[(u16, u16)], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&ports_text(ports))
}

/// `5432,6379-6380`.
pub fn ports_text(ports: &[(u16, u16)]) -> String {
    ports
        .iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Where a rule lets packets go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    /// An address (a /32 or /128) or a CIDR. A range that is exactly a CIDR is kept as one.
    Network(IpNet),
    /// `first-last`, both of one family, first < last, not exactly a CIDR.
    Range(IpAddr, IpAddr),
    /// A name (`api.partner.example`) or every name below one (`*.partner.example`): the
    /// addresses the DNS filter's answers give for it, to the container that asked.
    Hostname(HostPattern),
}

/// A hostname destination: lowercase, without the trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPattern {
    /// `api.partner.example`, or `partner.example` for `*.partner.example`.
    pub name: String,
    /// `*.name`: names below `name`, not `name` itself.
    pub wildcard: bool,
}

/// Longest hostname (RFC 1035: 253 characters in text form).
const MAX_HOSTNAME_LEN: usize = 253;

impl HostPattern {
    /// Whether `qname` (any case, with or without the trailing dot) is this name, or for a
    /// wildcard a name below it at a label boundary.
    pub fn matches(&self, qname: &str) -> bool {
        let qname = qname.strip_suffix('.').unwrap_or(qname);
        if !self.wildcard {
            return qname.eq_ignore_ascii_case(&self.name);
        }
        let Some(cut) = qname.len().checked_sub(self.name.len() + 1) else {
            return false;
        };
        cut > 0
            && qname.as_bytes()[cut] == b'.'
            && qname[cut + 1..].eq_ignore_ascii_case(&self.name)
    }

    fn parse(text: &str) -> Result<HostPattern, String> {
        let lower = text.trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, lower.clone()),
        };
        if name.is_empty() || name.len() > MAX_HOSTNAME_LEN {
            return Err(format!(
                "{text:?} is not a hostname (1 to {MAX_HOSTNAME_LEN} characters)"
            ));
        }
        for label in name.split('.') {
            let valid = !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !valid {
                return Err(format!(
                    "{text:?}: {label:?} is not a DNS label (1 to 63 letters, digits, '-' or \
                     '_'; '*' only as the whole first label)"
                ));
            }
        }
        if wildcard && !name.contains('.') {
            return Err(format!(
                "{text:?} is every name in a top-level domain; name the domain below it"
            ));
        }
        if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(format!(
                "{text:?} is not an address, CIDR, range or hostname"
            ));
        }
        Ok(HostPattern { name, wildcard })
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)
    }
}

impl Destination {
    /// An IPv6 address, CIDR or range (a hostname is neither family: false).
    pub fn is_ipv6(&self) -> bool {
        match self {
            Destination::Network(net) => matches!(net, IpNet::V6(_)),
            Destination::Range(first, _) => first.is_ipv6(),
            Destination::Hostname(_) => false,
        }
    }

    /// The hostname pattern, for a hostname destination.
    pub fn hostname(&self) -> Option<&HostPattern> {
        match self {
            Destination::Hostname(pattern) => Some(pattern),
            _ => None,
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Network(net) if net.prefix_len() == net.max_prefix_len() => {
                write!(f, "{}", net.addr())
            }
            Destination::Network(net) => write!(f, "{net}"),
            Destination::Range(first, last) => write!(f, "{first}-{last}"),
            Destination::Hostname(pattern) => pattern.fmt(f),
        }
    }
}

impl Serialize for Destination {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_destination(&text).map_err(serde::de::Error::custom)
    }
}

/// A rule's protocol, as ASG rules name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    All,
    Tcp,
    Udp,
    /// ICMP, or ICMPv6 for an IPv6 destination.
    Icmp,
}

impl Protocol {
    /// The IP protocol number (`meta l4proto`); 0 for `all`, which matches none.
    pub fn number(self, ipv6: bool) -> u8 {
        match self {
            Protocol::All => 0,
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Icmp if ipv6 => 58,
            Protocol::Icmp => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::All => "all",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Validates every rule; errors name the rule by index (`rules[2].ports`).
pub(super) fn validate_rules(raw: Vec<RawRule>) -> Result<Vec<EgressRule>, ConfigError> {
    if raw.len() > MAX_RULES {
        return Err(ConfigError::invalid(
            "rules",
            format!("{} rules; at most {MAX_RULES} are accepted", raw.len()),
        ));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, rule)| rule.validate(i))
        .collect()
}

impl RawRule {
    fn validate(self, index: usize) -> Result<EgressRule, ConfigError> {
        let key = |field: &str| format!("rules[{index}].{field}");
        let destination = parse_destination(&self.destination)
            .map_err(|reason| ConfigError::invalid(key("destination"), reason))?;
        let protocol = match self.protocol.as_deref().map(str::to_ascii_lowercase) {
            None => Protocol::All,
            Some(p) => match p.as_str() {
                "all" => Protocol::All,
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                "icmp" => Protocol::Icmp,
                _ => {
                    return Err(ConfigError::invalid(
                        key("protocol"),
                        format!("{p:?} is not one of all, tcp, udp, icmp"),
                    ));
                }
            },
        };
        let ports = match &self.ports {
            None => Vec::new(),
            Some(text) => {
                if !matches!(protocol, Protocol::Tcp | Protocol::Udp) {
                    return Err(ConfigError::invalid(
                        key("ports"),
                        format!(
                            "ports need protocol \"tcp\" or \"udp\" (this rule's protocol is \
                             \"{protocol}\")"
                        ),
                    ));
                }
                parse_ports(text).map_err(|reason| ConfigError::invalid(key("ports"), reason))?
            }
        };
        let orgs =
            scope_ids(&self.orgs).map_err(|reason| ConfigError::invalid(key("orgs"), reason))?;
        let spaces = scope_ids(&self.spaces)
            .map_err(|reason| ConfigError::invalid(key("spaces"), reason))?;
        if self.description.len() > 256 || self.description.contains(['\n', '\r']) {
            return Err(ConfigError::invalid(
                key("description"),
                "must be one line of at most 256 bytes",
            ));
        }
        Ok(EgressRule {
            description: self.description,
            destination,
            protocol,
            ports,
            orgs,
            spaces,
        })
    }
}

/// An address, a CIDR without host bits, `first-last`, a hostname or `*.` and a domain.
fn parse_destination(text: &str) -> Result<Destination, String> {
    let text = text.trim();
    if let Some((first, last)) = text.split_once('-')
        && let (Ok(first), Ok(last)) = (
            first.trim().parse::<IpAddr>(),
            last.trim().parse::<IpAddr>(),
        )
    {
        return range(first, last).map_err(|reason| format!("{text:?}: {reason}"));
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(Destination::Network(IpNet::from(ip)));
    }
    if let Ok(net) = text.parse::<IpNet>() {
        if net.network() != net.addr() {
            return Err(format!(
                "{text:?} has host bits set; did you mean \"{}\"?",
                net.trunc()
            ));
        }
        if net.prefix_len() == 0 {
            return Err(format!(
                "{text:?} is every destination, which lifts restriction for the rule's scope; \
                 place those apps on a segment without egress-guard instead"
            ));
        }
        return Ok(Destination::Network(net));
    }
    let looks_like_name = text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.*".contains(&b))
        && text.bytes().any(|b| b.is_ascii_alphabetic());
    if looks_like_name {
        return HostPattern::parse(text).map(Destination::Hostname);
    }
    Err(format!(
        "{text:?} is not an IPv4 or IPv6 address, CIDR, \"first-last\" range or hostname"
    ))
}

/// A hostname rule is learned by the DNS filter: without `[dns] enabled` it would allow
/// nothing, silently.
pub(super) fn check_hostname_rules_have_dns(
    rules: &[EgressRule],
    dns: &super::DnsConfig,
) -> Result<(), ConfigError> {
    if dns.enabled {
        return Ok(());
    }
    match rules
        .iter()
        .position(|r| r.destination.hostname().is_some())
    {
        None => Ok(()),
        Some(index) => Err(ConfigError::invalid(
            format!("rules[{index}].destination"),
            format!(
                "{} is a hostname, which needs [dns] enabled = true (the DNS filter learns \
                 what it resolves to)",
                rules[index].destination
            ),
        )),
    }
}

fn range(first: IpAddr, last: IpAddr) -> Result<Destination, String> {
    let (a, b, bits) = match (first, last) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b)), 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return Err("the two ends are of different address families".into()),
    };
    if a > b {
        return Err("the first address is above the last".into());
    }
    let top = if bits == 32 {
        u128::from(u32::MAX)
    } else {
        u128::MAX
    };
    if a == 0 && b == top {
        return Err("the range is every destination".into());
    }
    // A range that is exactly one prefix is that prefix (nft lists it so).
    let size = b - a;
    let aligned = size.checked_add(1).is_some_and(|n| n.is_power_of_two()) && a & size == 0;
    if aligned {
        let prefix = (bits - (size.count_ones())) as u8;
        if prefix == 0 {
            return Err("the range is every destination".into());
        }
        let net = IpNet::new(first, prefix).map_err(|e| e.to_string())?;
        return Ok(Destination::Network(net));
    }
    Ok(Destination::Range(first, last))
}

/// `5432,6379-6380`: ports 1 to 65535, ranges first-last; sorted, duplicates merged.
fn parse_ports(text: &str) -> Result<Vec<(u16, u16)>, String> {
    let mut ports = Vec::new();
    for item in text.split(',') {
        let item = item.trim();
        let port = |p: &str| -> Result<u16, String> {
            match p.trim().parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{p:?} in {text:?} is not a port (1 to 65535)")),
            }
        };
        let (a, b) = match item.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(item)?;
                (p, p)
            }
        };
        if a > b {
            return Err(format!("{item:?} in {text:?} runs backwards"));
        }
        ports.push((a, b));
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// Org or space GUIDs: letters, digits, `-` and `_`, 1 to 64 characters each.
fn scope_ids(ids: &[String]) -> Result<BTreeSet<String>, String> {
    let mut out = BTreeSet::new();
    for id in ids {
        let valid = !id.is_empty()
            && id.len() <= MAX_SCOPE_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(format!(
                "{id:?} is not a GUID (1 to {MAX_SCOPE_ID_LEN} letters, digits, '-' or '_')"
            ));
        }
        out.insert(id.to_ascii_lowercase());
    }
    Ok(out)
}

#[cfg(test)]
mod hostname_tests {
    use super::*;

    #[test]
    fn a_wildcard_matches_names_below_its_domain_only() {
        let Destination::Hostname(wild) = parse_destination("*.Partner.example.").expect("valid")
        else {
            panic!("a hostname");
        };
        assert!(wild.matches("api.partner.example."));
        assert!(wild.matches("a.b.PARTNER.example"));
        assert!(!wild.matches("partner.example."));
        assert!(!wild.matches("evilpartner.example."));
        let Destination::Hostname(exact) = parse_destination("api.partner.example").expect("valid")
        else {
            panic!("a hostname");
        };
        assert!(exact.matches("API.partner.example."));
        assert!(!exact.matches("x.api.partner.example."));
        assert_eq!(exact.to_string(), "api.partner.example");
        assert_eq!(wild.to_string(), "*.partner.example");
    }

    #[test]
    fn a_hostname_rule_needs_the_dns_filter() {
        let rule = "[[rules]]\ndestination = \"api.partner.example\"\n";
        let err = crate::config::Config::parse(rule).expect_err("no [dns]");
        let text = err.to_string();
        assert!(text.contains("rules[0].destination"), "{text}");
        assert!(text.contains("[dns] enabled"), "{text}");
        let with_dns = format!("[dns]\nenabled = true\n{rule}");
        assert!(crate::config::Config::parse(&with_dns).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(toml_text: &str) -> Result<EgressRule, ConfigError> {
        let raw: RawRule = toml::from_str(toml_text).map_err(|e| ConfigError::Syntax {
            path: "<t>".into(),
            message: e.to_string(),
        })?;
        raw.validate(3)
    }

    fn error(toml_text: &str) -> String {
        match rule(toml_text) {
            Ok(r) => panic!("accepted: {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_full_rule_is_read_as_written() {
        let r = rule(
            r#"description = "tenant A's peered VPC"
               destination = "172.16.0.0/24"
               protocol = "tcp"
               ports = "6379-6380, 5432"
               orgs = ["ORG-1"]
               spaces = ["space-2"]"#,
        )
        .unwrap();
        assert_eq!(r.destination.to_string(), "172.16.0.0/24");
        assert_eq!(r.protocol, Protocol::Tcp);
        assert_eq!(r.ports, vec![(5432, 5432), (6379, 6380)]);
        assert_eq!(r.orgs, BTreeSet::from(["org-1".to_string()]));
        assert_eq!(r.spaces, BTreeSet::from(["space-2".to_string()]));
        assert!(r.applies_to(Some("org-1"), None));
        assert!(r.applies_to(Some("x"), Some("space-2")));
        assert!(!r.applies_to(Some("x"), Some("y")));
        assert!(!r.applies_to(None, None));
    }

    #[test]
    fn defaults_are_every_protocol_every_port_every_container() {
        let r = rule(r#"destination = "2001:db8::5""#).unwrap();
        assert_eq!(r.protocol, Protocol::All);
        assert!(r.ports.is_empty() && r.is_unscoped());
        assert!(r.applies_to(None, None));
        assert_eq!(r.destination.to_string(), "2001:db8::5");
    }

    #[test]
    fn ranges_that_are_prefixes_become_prefixes() {
        let r = rule(r#"destination = "10.1.0.0-10.1.0.255""#).unwrap();
        assert_eq!(
            r.destination,
            Destination::Network("10.1.0.0/24".parse().unwrap())
        );
        let r = rule(r#"destination = "10.1.0.1-10.1.0.9""#).unwrap();
        assert_eq!(r.destination.to_string(), "10.1.0.1-10.1.0.9");
        let r = rule(r#"destination = "10.1.0.7-10.1.0.7""#).unwrap();
        assert_eq!(r.destination.to_string(), "10.1.0.7");
    }

    #[test]
    fn matching_follows_destination_protocol_and_ports() {
        let r = rule(
            r#"destination = "198.51.100.10-198.51.100.20"
               protocol = "udp"
               ports = "53,100-200""#,
        )
        .unwrap();
        let ip: IpAddr = "198.51.100.15".parse().unwrap();
        assert!(r.matches(ip, Some(17), Some(53)));
        assert!(r.matches(ip, Some(17), Some(150)));
        assert!(!r.matches(ip, Some(17), Some(54)));
        assert!(!r.matches(ip, Some(6), Some(53)));
        assert!(!r.matches("198.51.100.21".parse().unwrap(), Some(17), Some(53)));
        let icmp6 = rule(
            r#"destination = "2001:db8::/32"
                            protocol = "icmp""#,
        )
        .unwrap();
        assert!(icmp6.matches("2001:db8::1".parse().unwrap(), Some(58), None));
        assert!(!icmp6.matches("2001:db8::1".parse().unwrap(), Some(1), None));
    }

    #[test]
    fn bad_rules_are_refused_naming_the_key() {
        for (text, key, words) in [
            (
                r#"destination = "10.0.0.1/8""#,
                "rules[3].destination",
                "host bits",
            ),
            (
                r#"destination = "0.0.0.0/0""#,
                "rules[3].destination",
                "every destination",
            ),
            (
                r#"destination = "10.0.0.9-10.0.0.1""#,
                "rules[3].destination",
                "above",
            ),
            (
                r#"destination = "10.0.0.1-fd00::1""#,
                "rules[3].destination",
                "families",
            ),
            (
                r#"destination = "*.example""#,
                "rules[3].destination",
                "top-level domain",
            ),
            (
                r#"destination = "api.*.example""#,
                "rules[3].destination",
                "is not a DNS label",
            ),
            (
                r#"destination = "nonsense!""#,
                "rules[3].destination",
                "not an IPv4",
            ),
            (
                r#"destination = "10.0.0.0/8"
                ports = "80""#,
                "rules[3].ports",
                "tcp",
            ),
            (
                r#"destination = "10.0.0.0/8"
                protocol = "icmp"
                ports = "80""#,
                "rules[3].ports",
                "icmp",
            ),
            (
                r#"destination = "10.0.0.0/8"
                protocol = "tcp"
                ports = "0""#,
                "rules[3].ports",
                "not a port",
            ),
            (
                r#"destination = "10.0.0.0/8"
                protocol = "tcp"
                ports = "90-80""#,
                "rules[3].ports",
                "backwards",
            ),
            (
                r#"destination = "10.0.0.0/8"
                protocol = "sctp""#,
                "rules[3].protocol",
                "sctp",
            ),
            (
                r#"destination = "10.0.0.0/8"
                orgs = ["a b"]"#,
                "rules[3].orgs",
                "GUID",
            ),
            (
                r#"destination = "10.0.0.0/8"
                spaces = [""]"#,
                "rules[3].spaces",
                "GUID",
            ),
        ] {
            let message = error(text);
            assert!(
                message.contains(key) && message.contains(words),
                "{text}: {message}"
            );
        }
        assert!(
            error(
                r#"destination = "10.0.0.0/8"
                         colour = "red""#
            )
            .contains("colour")
        );
    }

    #[test]
    fn a_rule_reads_back_from_its_json() {
        let r = rule(
            r#"destination = "10.1.0.1-10.1.0.9"
               protocol = "udp"
               ports = "53,100-200"
               spaces = ["s"]"#,
        )
        .unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""ports":"53,100-200""#), "{json}");
        let back: EgressRule = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        let all = rule(r#"destination = "10.1.0.0/16""#).unwrap();
        let back: EgressRule = serde_json::from_str(&serde_json::to_string(&all).unwrap()).unwrap();
        assert_eq!(back, all, "no ports: every port");
    }
}
