//! `egress-guard status` and `explain`: ask a running agent's health endpoint and print
//! what an operator needs, sized for a terminal. Exit codes are for scripts and monit.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use crate::attribution::{Attempt, BlockedBody, Filter};
use crate::health::{HealthBody, StatusBody};
use crate::policy::{Decision, Verdict};
use crate::policy::{Outcome, Probe, RuleSet, explain_destination};

/// Connect, send and receive timeout for each request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response read (a status listing of 5,000 containers is ~2 MiB).
const MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;

/// Exit code when the agent cannot be reached or answers nonsense.
const EXIT_UNREACHABLE: u8 = 3;

/// One HTTP GET; returns (status code, body).
fn get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let socket = addr
        .to_socket_addrs()
        .map_err(|err| format!("bad address {addr}: {err}"))?
        .next()
        .ok_or_else(|| format!("address {addr} resolves to nothing"))?;
    let mut stream = TcpStream::connect_timeout(&socket, CLIENT_TIMEOUT)
        .map_err(|err| format!("cannot reach egress-guard at {addr}: {err}"))?;
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(CLIENT_TIMEOUT)))
        .map_err(|err| err.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|err| format!("cannot send request to {addr}: {err}"))?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE_BYTES)
        .read_to_end(&mut raw)
        .map_err(|err| format!("cannot read answer from {addr}: {err}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr} answered something that is not HTTP"))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr} answered without a status code"))?;
    Ok((code, body.to_string()))
}

fn get_json<T: serde::de::DeserializeOwned>(
    addr: &str,
    path: &str,
) -> Result<(u16, T, String), String> {
    let (code, body) = get(addr, path)?;
    let parsed = serde_json::from_str(&body)
        .map_err(|err| format!("{path} on {addr} is not the expected JSON: {err}"))?;
    Ok((code, parsed, body))
}

fn unreachable(message: String) -> ExitCode {
    eprintln!("egress-guard: {message}");
    ExitCode::from(EXIT_UNREACHABLE)
}

/// `egress-guard status`.
pub fn status(addr: &str, json: bool) -> ExitCode {
    let (code, ready, ready_raw) = match get_json::<HealthBody>(addr, "/readyz") {
        Ok(answer) => answer,
        Err(message) => return unreachable(message),
    };
    let (_, listing, listing_raw) = match get_json::<StatusBody>(addr, "/status") {
        Ok(answer) => answer,
        Err(message) => return unreachable(message),
    };
    if json {
        println!(
            "{{\"readyz\": {}, \"status\": {}}}",
            ready_raw.trim(),
            listing_raw.trim()
        );
    } else {
        print!("{}", format_status(addr, code == 200, &ready, &listing));
    }
    if code == 200 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The human-readable summary and table.
pub fn format_status(addr: &str, ready: bool, health: &HealthBody, listing: &StatusBody) -> String {
    let mut out = String::new();
    let state = if ready {
        "READY".to_string()
    } else {
        format!(
            "NOT READY: {}",
            health.reason.as_deref().unwrap_or("unknown")
        )
    };
    let enabled = match (health.enabled, health.mode) {
        (false, _) => "disabled (enabled = false)",
        (true, crate::config::Mode::Enforce) => "enforcing",
        (true, crate::config::Mode::Audit) => {
            "AUDIT mode: nothing is rejected; see egress-guard blocked"
        }
    };
    out.push_str(&format!("egress-guard at {addr}: {state}; {enabled}\n"));
    out.push_str(&format!(
        "last reconcile: {}   drift repairs: {}   last error: {}\n",
        health.last_reconcile.as_deref().unwrap_or("never"),
        health.drift_repairs,
        health.last_error.as_deref().unwrap_or("none")
    ));
    out.push_str(&format!(
        "containers: {} restricted, {} exempt\n",
        health.containers.restricted, health.containers.exempt
    ));
    let protection = match health.tamper_protection {
        Some(true) => "on (table inet egress_guard_owned, owned by the agent)",
        Some(false) => "OFF: the kernel refuses owned tables; only inet egress_guard enforces",
        None => "not known yet",
    };
    out.push_str(&format!("tamper protection: {protection}\n"));
    let limits = match health.per_container_limits {
        Some(true) => "in the kernel (DNS rate, report budget)",
        Some(false) => {
            "NOT enforced by this kernel (before Linux 5.19 / 5.15.148): DNS has one cell-wide budget"
        }
        None => "not known (the start-up probe could not run)",
    };
    out.push_str(&format!("per-container limits: {limits}\n"));
    out.push_str(if health.ipv6_in_use {
        "IPv6: in use (restricted the same way)\n"
    } else {
        "IPv6: not in use on this cell\n"
    });
    if let Some(dns) = &health.dns {
        let count = |result: &str| dns.queries.get(result).copied().unwrap_or(0);
        out.push_str(&format!(
            "dns filter: {} -> {}; {} forwarded, {} refused, {} errors, {} malformed{}\n",
            dns.listening.as_deref().unwrap_or("NOT LISTENING"),
            dns.upstream,
            count("forwarded"),
            count("refused"),
            count("error"),
            count("malformed"),
            dns.problem
                .as_deref()
                .map(|p| format!("; {p}"))
                .unwrap_or_default()
        ));
    }
    if !listing.rules.is_empty() {
        out.push_str(&format!("\nrules ({}):\n", listing.rules.len()));
        for rule in &listing.rules {
            let learned = rule
                .learned_addresses
                .map(|n| format!("; {n} address(es) allowed by its answers now"))
                .unwrap_or_default();
            out.push_str(&format!(
                "  [{}] {}; for {}; applies to {} container(s){learned}\n",
                rule.index, rule.rule, rule.scope, rule.containers
            ));
        }
    }
    if listing.containers.is_empty() {
        return out;
    }
    out.push_str(&format!(
        "\n{:<15} {:<10} {:<9} {:<16} {}\n",
        "IP", "VERDICT", "WORKLOAD", "INTERFACE", "HANDLE"
    ));
    for d in &listing.containers {
        // The IPv4 address, or the first IPv6 one for a container routed over IPv6 only.
        let ip = match (d.ip, d.ipv6.first()) {
            (Some(ip), _) => ip.to_string(),
            (None, Some(ip6)) => ip6.to_string(),
            (None, None) => "-".into(),
        };
        out.push_str(&format!(
            "{:<15} {:<10} {:<9} {:<16} {}\n",
            ip,
            d.verdict.to_string(),
            fit(d.workload.as_deref().unwrap_or("-"), 9),
            fit(d.host_interface.as_deref().unwrap_or("-"), 16),
            fit(d.handle.as_deref().unwrap_or("(not in store)"), 36),
        ));
    }
    out
}

fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// `egress-guard explain`.
pub fn explain(addr: &str, container: &str, destination: Option<&str>, json: bool) -> ExitCode {
    let probe = match destination.map(Probe::parse).transpose() {
        Ok(probe) => probe,
        Err(message) => {
            eprintln!("egress-guard: {message}");
            return ExitCode::from(2);
        }
    };
    let (_, listing, _) = match get_json::<StatusBody>(addr, "/status") {
        Ok(answer) => answer,
        Err(message) => return unreachable(message),
    };
    match find(&listing.containers, container) {
        Found::One(decision) => {
            let outcome = probe.map(|p| (p, destination_outcome(&listing, decision, &p)));
            if json {
                let mut value = serde_json::to_value(decision).unwrap_or_default();
                if let Some((probe, outcome)) = &outcome {
                    value["destination"] = serde_json::Value::String(probe.to_string());
                    value["destination_outcome"] =
                        serde_json::to_value(outcome).unwrap_or_default();
                }
                println!(
                    "{}",
                    serde_json::to_string_pretty(&value).unwrap_or_default()
                );
            } else {
                print!("{}", format_explanation(decision, listing.enabled));
                if let Some((probe, outcome)) = &outcome {
                    print!("{}", format_outcome(&listing, probe, outcome));
                }
            }
            ExitCode::SUCCESS
        }
        Found::Many(count) => {
            eprintln!(
                "egress-guard: {container:?} matches {count} containers; give more of the handle"
            );
            ExitCode::FAILURE
        }
        Found::None => {
            println!(
                "{container} is not known to egress-guard on this cell. A container IP in the overlay \
                 that the agent does not know is restricted (fail closed)."
            );
            ExitCode::FAILURE
        }
    }
}

/// `egress-guard blocked`.
pub fn blocked(addr: &str, filter: &Filter, json: bool) -> ExitCode {
    let path = blocked_path(filter);
    let (code, body, raw) = match get_json::<BlockedBody>(addr, &path) {
        Ok(answer) => answer,
        Err(message) => return unreachable(message),
    };
    if code != 200 {
        return unreachable(format!("{path} on {addr} answered {code}: {}", raw.trim()));
    }
    if json {
        println!("{}", raw.trim());
    } else {
        print!("{}", format_blocked(&body));
    }
    ExitCode::SUCCESS
}

/// `/blocked` with the filter's query (ids are GUIDs; anything else is percent-encoded).
fn blocked_path(filter: &Filter) -> String {
    let encode = |value: &str| -> String {
        value
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    char::from(b).to_string()
                }
                other => format!("%{other:02X}"),
            })
            .collect()
    };
    let query: Vec<String> = [
        ("app_id", &filter.app_id),
        ("space_id", &filter.space_id),
        ("org_id", &filter.org_id),
    ]
    .into_iter()
    .filter_map(|(name, value)| Some(format!("{name}={}", encode(value.as_deref()?))))
    .collect();
    if query.is_empty() {
        "/blocked".into()
    } else {
        format!("/blocked?{}", query.join("&"))
    }
}

/// The attempts as a table a person reads: when, what, who.
pub fn format_blocked(body: &BlockedBody) -> String {
    let mut out = format!(
        "mode: {}   attempts: {}   suppressed by the rate limit: {}\n",
        body.mode,
        body.attempts.len(),
        body.suppressed
    );
    if let Some(err) = &body.attribution_error {
        out.push_str(&format!("ATTRIBUTION UNAVAILABLE: {err}\n"));
    }
    if body.attempts.is_empty() {
        out.push_str("no blocked attempts recorded since the agent started\n");
        return out;
    }
    out.push_str(&format!(
        "\n{:<20} {:<12} {:<15} {:<21} {:>8} {:<36} {:<36} {}\n",
        "LAST SEEN", "ACTION", "SRC", "DESTINATION", "COUNT", "APP", "SPACE", "ORG / HANDLE"
    ));
    for a in &body.attempts {
        out.push_str(&format!(
            "{:<20} {:<12} {:<15} {:<21} {:>8} {:<36} {:<36} {}\n",
            fit(a.last_seen.get(..19).unwrap_or(&a.last_seen), 20),
            a.action.as_str(),
            a.src.to_string(),
            fit(&destination(a), 21),
            a.count,
            fit(or_unknown(&a.app_id), 36),
            fit(or_unknown(&a.space_id), 36),
            who(a),
        ));
    }
    out
}

fn or_unknown(id: &str) -> &str {
    if id.is_empty() { "-" } else { id }
}

fn destination(a: &Attempt) -> String {
    match a.dst_port {
        Some(port) => format!("{}:{port}/{}", a.dst, a.protocol),
        None => format!("{}/{}", a.dst, a.protocol),
    }
}

fn who(a: &Attempt) -> String {
    if a.handle.is_empty() {
        format!("(not in the metadata store; {})", a.interface)
    } else {
        format!("{} / {}", or_unknown(&a.org_id), fit(&a.handle, 36))
    }
}

enum Found<'a> {
    One(&'a Decision),
    Many(usize),
    None,
}

/// Exact IP or handle first, then a unique handle prefix.
fn find<'a>(containers: &'a [Decision], key: &str) -> Found<'a> {
    let exact: Vec<&Decision> = containers
        .iter()
        .filter(|d| {
            d.handle.as_deref() == Some(key)
                || d.ip.is_some_and(|ip| ip.to_string() == key)
                || key
                    .parse::<std::net::Ipv6Addr>()
                    .is_ok_and(|key| d.ipv6.contains(&key))
        })
        .collect();
    let candidates = if exact.is_empty() {
        containers
            .iter()
            .filter(|d| d.handle.as_deref().is_some_and(|h| h.starts_with(key)))
            .collect()
    } else {
        exact
    };
    match candidates.as_slice() {
        [] => Found::None,
        [one] => Found::One(one),
        many => Found::Many(many.len()),
    }
}

/// What the agent's rules (as `/status` lists them) do with `decision` sending `probe`.
fn destination_outcome(listing: &StatusBody, decision: &Decision, probe: &Probe) -> Outcome {
    let rules = RuleSet::new(listing.rules.iter().map(|r| r.rule.clone()).collect());
    explain_destination(decision, &listing.allowed_networks, &rules, probe)
}

/// The outcome in words.
pub fn format_outcome(listing: &StatusBody, probe: &Probe, outcome: &Outcome) -> String {
    let audit = listing.mode == crate::config::Mode::Audit;
    let line = match outcome {
        Outcome::Exempt => "ALLOWED: the container is exempt".to_string(),
        Outcome::AllowedNetwork { network } => {
            format!("ALLOWED by allowed_networks ({network})")
        }
        Outcome::AllowedByRule {
            index,
            description,
            scope,
        } => {
            let rule = &listing.rules[*index].rule;
            let named = if description.is_empty() {
                String::new()
            } else {
                format!(" {description:?}")
            };
            format!("ALLOWED by rules[{index}]{named}: {rule}, for {scope}")
        }
        Outcome::Rejected {
            reason,
            rules_in_scope,
        } => {
            let verdict = if audit {
                "WOULD BE REJECTED (audit mode: reported, not rejected)"
            } else {
                "REJECTED"
            };
            let scope = if rules_in_scope.is_empty() {
                String::new()
            } else {
                let names: Vec<String> = rules_in_scope
                    .iter()
                    .map(|i| format!("rules[{i}]"))
                    .collect();
                format!(" (in scope: {})", names.join(", "))
            };
            format!("{verdict}: {reason}{scope}")
        }
    };
    format!("  to {probe}: {line}\n")
}

/// The explanation of one decision.
pub fn format_explanation(d: &Decision, enabled: bool) -> String {
    let ip =
        d.ip.map(|ip| ip.to_string())
            .unwrap_or_else(|| "(no valid IP)".into());
    let verdict = match d.verdict {
        Verdict::Restricted => "RESTRICTED",
        Verdict::Exempt => "EXEMPT",
    };
    let mut out = format!("{ip} is {verdict}\n");
    out.push_str(&format!("  reason:    {}\n", d.reason));
    out.push_str(&format!(
        "  handle:    {}\n",
        d.handle.as_deref().unwrap_or("(not in the metadata store)")
    ));
    out.push_str(&format!(
        "  workload:  {}\n",
        d.workload.as_deref().unwrap_or("(none)")
    ));
    let interface = match (&d.host_interface, d.host_ifindex) {
        (Some(name), Some(index)) => format!("{name} (ifindex {index})"),
        (None, Some(index)) => format!("ifindex {index}"),
        _ => "(no host route)".into(),
    };
    out.push_str(&format!("  interface: {interface}\n"));
    if !d.ipv6.is_empty() {
        let addresses: Vec<String> = d.ipv6.iter().map(|a| a.to_string()).collect();
        out.push_str(&format!("  ipv6:      {}\n", addresses.join(", ")));
    }
    for (label, value) in [
        ("app_id", &d.app_id),
        ("space_id", &d.space_id),
        ("org_id", &d.org_id),
    ] {
        if let Some(value) = value {
            out.push_str(&format!("  {label:<9}  {value}\n"));
        }
    }
    let effect = match (enabled, d.verdict) {
        (false, _) => "enforcement is disabled on this cell (enabled = false): nothing is blocked",
        (true, Verdict::Restricted) => "it cannot reach destinations outside allowed_networks",
        (true, Verdict::Exempt) => "it can reach the internet",
    };
    out.push_str(&format!("  effect:    {effect}\n"));
    out
}

#[cfg(test)]
mod tests;
