//! Reading back: `nft -j list table inet egress_guard` -> what the kernel really has, in the
//! same canonical form `render::skeleton` produces, so that drift is a structural comparison.
//!
//! Handles and counter values are dropped; only the keys the agent writes are compared, so a
//! newer nft that prints extra informational keys is not mistaken for drift. Anything the agent
//! would not have written (another chain, rule, set or object in its table) is drift.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde_json::{Map, Value};

use super::render::{COUNTER_OTHER, COUNTER_TCP, EXEMPT_SET, Skeleton, TABLE};
use crate::inventory::KernelView;
use crate::policy::ExemptKey;

/// The agent's table as listed by nft.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedTable {
    /// Every object except set elements, canonicalised.
    pub skeleton: Skeleton,
    /// The exempt set's elements, or None when one could not be mapped back to an ifindex
    /// (the caller then does a full sync rather than trust a partial picture).
    pub exempt: Option<BTreeSet<ExemptKey>>,
    /// Packets and bytes the reject rules counted since the table was (re)created.
    pub rejected: RejectCounters,
}

/// Values of the named reject counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RejectCounters {
    pub tcp_packets: u64,
    pub tcp_bytes: u64,
    pub other_packets: u64,
    pub other_bytes: u64,
}

impl RejectCounters {
    pub fn packets(&self) -> u64 {
        self.tcp_packets + self.other_packets
    }

    pub fn bytes(&self) -> u64 {
        self.tcp_bytes + self.other_bytes
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unexpected `nft -j list` output: {0}")]
pub struct ObserveError(String);

/// Parses a listing of the agent's table. `kernel` resolves interface names nft prints for
/// `iface_index` set elements back to indexes.
pub fn parse_listing(listing: &Value, kernel: &KernelView) -> Result<ObservedTable, ObserveError> {
    let objects = listing
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| ObserveError("no top-level `nftables` array".into()))?;

    let mut table = Value::Null;
    let mut counters = Vec::new();
    let mut set = Value::Null;
    let mut extra_sets = 0usize;
    let mut chains = Vec::new();
    let mut rules = Vec::new();
    let mut exempt = Some(BTreeSet::new());

    for object in objects {
        let Some((kind, body)) = object.as_object().and_then(|o| o.iter().next()) else {
            return Err(ObserveError(format!("not an object: {object}")));
        };
        match kind.as_str() {
            "metainfo" => {}
            "table" => table = project(body, &["family", "name"]),
            "counter" => counters.push(project(body, &["family", "table", "name"])),
            "set" if body.get("name").and_then(Value::as_str) == Some(EXEMPT_SET) => {
                set = project(
                    body,
                    &["family", "table", "name", "type", "flags", "timeout"],
                );
                exempt = parse_elements(body.get("elem"), kernel);
            }
            "set" => extra_sets += 1,
            "chain" => chains.push(project(
                body,
                &["family", "table", "name", "type", "hook", "prio", "policy"],
            )),
            "rule" => {
                let chain = body
                    .get("chain")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let expr = body.get("expr").cloned().unwrap_or(Value::Null);
                rules.push((chain.to_string(), expr));
            }
            // Any other object (map, flowtable, quota, …) is not ours: make it show as drift.
            other => chains.push(Value::String(format!("unexpected {other}"))),
        }
    }
    if extra_sets > 0 {
        chains.push(Value::String(format!("{extra_sets} unexpected set(s)")));
    }
    if table.is_null() {
        return Err(ObserveError(format!("listing has no table {TABLE}")));
    }
    Ok(ObservedTable {
        skeleton: Skeleton {
            table,
            counters,
            set,
            chains,
            rules,
        },
        exempt,
        rejected: parse_counters(listing),
    })
}

/// The named reject counters in any nft listing (a whole table, or `list counters`).
pub fn parse_counters(listing: &Value) -> RejectCounters {
    let mut counters = RejectCounters::default();
    let objects = listing.get("nftables").and_then(Value::as_array);
    for body in objects
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("counter"))
    {
        let packets = body.get("packets").and_then(Value::as_u64).unwrap_or(0);
        let bytes = body.get("bytes").and_then(Value::as_u64).unwrap_or(0);
        match body.get("name").and_then(Value::as_str) {
            Some(COUNTER_TCP) => {
                counters.tcp_packets = packets;
                counters.tcp_bytes = bytes;
            }
            Some(COUNTER_OTHER) => {
                counters.other_packets = packets;
                counters.other_bytes = bytes;
            }
            _ => {}
        }
    }
    counters
}

/// Keeps only `keys` of an object (those present), dropping handles and values.
fn project(body: &Value, keys: &[&str]) -> Value {
    let mut out = Map::new();
    for key in keys {
        if let Some(value) = body.get(*key) {
            out.insert((*key).to_string(), value.clone());
        }
    }
    Value::Object(out)
}

/// Elements print as `{"concat": [iface, "a.b.c.d"]}` where iface is the interface's name
/// when it exists and its index (as a string or number) when it does not.
fn parse_elements(elem: Option<&Value>, kernel: &KernelView) -> Option<BTreeSet<ExemptKey>> {
    let mut keys = BTreeSet::new();
    let Some(elem) = elem else {
        return Some(keys);
    };
    let by_name: std::collections::HashMap<&str, u32> = kernel
        .links
        .iter()
        .map(|(index, name)| (name.as_str(), *index))
        .collect();
    for item in elem.as_array()? {
        let parts = item.get("concat")?.as_array()?;
        let [iface, ip] = parts.as_slice() else {
            return None;
        };
        let ifindex = match iface {
            Value::Number(n) => u32::try_from(n.as_u64()?).ok()?,
            Value::String(s) => match s.parse::<u32>() {
                Ok(index) => index,
                Err(_) => *by_name.get(s.as_str())?,
            },
            _ => return None,
        };
        let ip: Ipv4Addr = ip.as_str()?.parse().ok()?;
        keys.insert(ExemptKey { ifindex, ip });
    }
    Some(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::render::skeleton;
    use crate::policy::DesiredRules;
    use std::collections::BTreeMap;

    /// What nft 1.0.6 printed for a table the agent had written (captured from a real kernel),
    /// with one element whose interface exists (printed by name) and one whose does not.
    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "egress_guard", "handle": 2}}, {"counter": {"family": "inet", "name": "rejected_tcp", "table": "egress_guard", "handle": 1, "packets": 3, "bytes": 180}}, {"counter": {"family": "inet", "name": "rejected_other", "table": "egress_guard", "handle": 2, "packets": 5000000000, "bytes": 7000000000}}, {"set": {"family": "inet", "name": "exempt", "table": "egress_guard", "type": ["iface_index", "ipv4_addr"], "handle": 3, "elem": [{"concat": ["s-010255001004", "10.255.1.4"]}, {"concat": ["77", "10.255.1.6"]}]}}, {"chain": {"family": "inet", "table": "egress_guard", "name": "forward", "handle": 4, "type": "filter", "hook": "forward", "prio": -10, "policy": "accept"}}, {"chain": {"family": "inet", "table": "egress_guard", "name": "overlay_egress", "handle": 5}}, {"rule": {"family": "inet", "table": "egress_guard", "chain": "forward", "handle": 6, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.255.0.0", "len": 16}}}}, {"jump": {"target": "overlay_egress"}}]}}, {"rule": {"family": "inet", "table": "egress_guard", "chain": "overlay_egress", "handle": 7, "expr": [{"match": {"op": "==", "left": {"concat": [{"meta": {"key": "iif"}}, {"payload": {"protocol": "ip", "field": "saddr"}}]}, "right": "@exempt"}}, {"return": null}]}}, {"rule": {"family": "inet", "table": "egress_guard", "chain": "overlay_egress", "handle": 8, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "10.0.0.0", "len": 8}}}}, {"return": null}]}}, {"rule": {"family": "inet", "table": "egress_guard", "chain": "overlay_egress", "handle": 9, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}, {"counter": "rejected_tcp"}, {"reject": {"type": "tcp reset"}}]}}, {"rule": {"family": "inet", "table": "egress_guard", "chain": "overlay_egress", "handle": 10, "expr": [{"counter": "rejected_other"}, {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}]}}]}"#;

    fn kernel() -> KernelView {
        KernelView {
            routes: BTreeMap::new(),
            links: BTreeMap::from([(12, "s-010255001004".to_string())]),
        }
    }

    fn desired() -> DesiredRules {
        DesiredRules {
            overlay: "10.255.0.0/16".parse().expect("literal"),
            // The overlay is inside 10.0.0.0/8, so aggregation leaves just that.
            allowed: vec!["10.0.0.0/8".parse().expect("literal")],
            exempt: BTreeSet::new(),
        }
    }

    fn listing() -> Value {
        serde_json::from_str(LISTING).expect("fixture is JSON")
    }

    #[test]
    fn real_listing_matches_the_rendered_skeleton() {
        let observed = parse_listing(&listing(), &kernel()).expect("parses");
        assert_eq!(observed.skeleton, skeleton(&desired()));
    }

    #[test]
    fn elements_resolve_names_and_numbers() {
        let observed = parse_listing(&listing(), &kernel()).expect("parses");
        let expected: BTreeSet<ExemptKey> = [
            ExemptKey {
                ifindex: 12,
                ip: Ipv4Addr::new(10, 255, 1, 4),
            },
            ExemptKey {
                ifindex: 77,
                ip: Ipv4Addr::new(10, 255, 1, 6),
            },
        ]
        .into();
        assert_eq!(observed.exempt, Some(expected));
    }

    #[test]
    fn counters_are_read_as_u64() {
        let observed = parse_listing(&listing(), &kernel()).expect("parses");
        assert_eq!(observed.rejected.tcp_packets, 3);
        assert_eq!(observed.rejected.packets(), 5_000_000_003);
        assert_eq!(observed.rejected.bytes(), 7_000_000_180);
    }

    #[test]
    fn unknown_interface_name_makes_elements_unknown() {
        let observed = parse_listing(&listing(), &KernelView::default()).expect("parses");
        assert_eq!(observed.exempt, None);
    }

    fn drifted(edit: impl FnOnce(&mut Vec<Value>)) -> bool {
        let mut value = listing();
        let objects = value["nftables"].as_array_mut().expect("array");
        edit(objects);
        match parse_listing(&value, &kernel()) {
            Ok(observed) => observed.skeleton != skeleton(&desired()),
            Err(_) => true,
        }
    }

    #[test]
    fn every_kind_of_tampering_is_drift() {
        // A rule removed.
        assert!(drifted(|o| {
            o.remove(9);
        }));
        // A rule added in front (e.g. someone inserts an accept).
        assert!(drifted(|o| {
            let mut rule = o[7].clone();
            rule["rule"]["expr"] = serde_json::json!([{ "accept": null }]);
            o.insert(7, rule);
        }));
        // The base chain's priority changed.
        assert!(drifted(|o| o[5]["chain"]["prio"] = 10.into()));
        // The policy changed.
        assert!(drifted(|o| o[5]["chain"]["policy"] = "drop".into()));
        // A chain removed with its rules.
        assert!(drifted(|o| {
            o.retain(|x| x.get("chain").is_none_or(|c| c["name"] != "overlay_egress"));
            o.retain(|x| x.get("rule").is_none_or(|r| r["chain"] != "overlay_egress"));
        }));
        // A foreign object in our table.
        assert!(drifted(
            |o| o.push(serde_json::json!({"map": {"name": "m"}}))
        ));
        assert!(drifted(|o| o.push(
            serde_json::json!({"set": {"name": "other", "type": "ipv4_addr"}})
        )));
        // The table itself gone from the listing.
        assert!(drifted(|o| o.retain(|x| x.get("table").is_none())));
        // Handles and counter values changing is NOT drift.
        assert!(!drifted(|o| {
            o[1]["table"]["handle"] = 99.into();
            o[2]["counter"]["packets"] = 12345.into();
        }));
    }
}
