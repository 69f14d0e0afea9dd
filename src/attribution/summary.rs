//! The bounded summary behind `/blocked`: one row per (action, container, destination,
//! protocol, port), the least recently seen row making room.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::SystemTime;

use super::{
    attempt::{Action, Destination, Protocol},
    lookup::Sender,
};
use serde::{Deserialize, Serialize};

/// Rows kept, and the most `/blocked` answers with.
pub const MAX_ROWS: usize = 1000;
/// Rows one container may hold: a container spraying destinations replaces its own oldest
/// rows, never another container's, so `/blocked` always has room for the others.
pub const MAX_ROWS_PER_CONTAINER: usize = 100;
/// What makes a row: one container instance (its interface index and address), destination,
/// protocol and port, and what the rules did.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub action: Action,
    pub ifindex: u32,
    pub src: IpAddr,
    pub dst: Destination,
    pub protocol: Protocol,
    pub dst_port: Option<u16>,
}

#[derive(Debug, Clone)]
struct Row {
    sender: Sender,
    count: u64,
    first_seen: SystemTime,
    last_seen: SystemTime,
    /// Position in [`Summary::recency`].
    touched: u64,
    /// Packets since the last summary line.
    in_period: u64,
}

/// One row of `/blocked`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub action: Action,
    pub handle: String,
    pub app_id: String,
    pub space_id: String,
    pub org_id: String,
    pub workload: String,
    pub interface: String,
    pub src: IpAddr,
    /// An address, or the query name of a refused DNS query.
    pub dst: String,
    pub protocol: String,
    pub dst_port: Option<u16>,
    /// The `[[rules]]` that applied to the sender (indices into `/status` `rules`): none of
    /// them matched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules_in_scope: Vec<usize>,
    pub count: u64,
    /// RFC 3339.
    pub first_seen: String,
    pub last_seen: String,
}

/// `?app_id=&space_id=&org_id=`: every given field must match exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub app_id: Option<String>,
    pub space_id: Option<String>,
    pub org_id: Option<String>,
}

impl Filter {
    fn accepts(&self, sender: &Sender) -> bool {
        let ok = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        ok(&self.app_id, &sender.app_id)
            && ok(&self.space_id, &sender.space_id)
            && ok(&self.org_id, &sender.org_id)
    }
}

/// The bounded summary of reported packets.
#[derive(Debug, Default)]
pub struct Summary {
    rows: HashMap<Key, Row>,
    /// touched -> key, oldest first: eviction and "most recent first" in O(log n).
    recency: BTreeMap<u64, Key>,
    tick: u64,
    /// Rows per container (host interface, source address).
    per_container: HashMap<(u32, IpAddr), usize>,
    /// Rows dropped to make room.
    pub evicted: u64,
}

impl Summary {
    /// Counts one packet; true when it opened a new row.
    pub fn record(&mut self, key: Key, sender: impl FnOnce() -> Sender, now: SystemTime) -> bool {
        self.tick += 1;
        let tick = self.tick;
        if let Some(row) = self.rows.get_mut(&key) {
            self.recency.remove(&row.touched);
            row.touched = tick;
            row.count += 1;
            row.in_period += 1;
            row.last_seen = row.last_seen.max(now);
            self.recency.insert(tick, key);
            return false;
        }
        let container = (key.ifindex, key.src);
        if self.per_container.get(&container).copied().unwrap_or(0) >= MAX_ROWS_PER_CONTAINER {
            let own_oldest = self
                .recency
                .iter()
                .find(|(_, k)| (k.ifindex, k.src) == container)
                .map(|(tick, _)| *tick);
            if let Some(tick) = own_oldest {
                self.evict(tick);
            }
        }
        while self.rows.len() >= MAX_ROWS {
            let Some(&oldest) = self.recency.keys().next() else {
                break;
            };
            self.evict(oldest);
        }
        *self.per_container.entry(container).or_default() += 1;
        self.rows.insert(
            key.clone(),
            Row {
                sender: sender(),
                count: 1,
                first_seen: now,
                last_seen: now,
                touched: tick,
                in_period: 1,
            },
        );
        self.recency.insert(tick, key);
        true
    }

    /// Drops the row last touched at `tick`.
    fn evict(&mut self, tick: u64) {
        let Some(key) = self.recency.remove(&tick) else {
            return;
        };
        self.rows.remove(&key);
        let container = (key.ifindex, key.src);
        if let Some(count) = self.per_container.get_mut(&container) {
            *count -= 1;
            if *count == 0 {
                self.per_container.remove(&container);
            }
        }
        self.evicted += 1;
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Rows of the container at (host interface, source address).
    pub fn rows_of(&self, ifindex: u32, src: IpAddr) -> usize {
        self.per_container
            .get(&(ifindex, src))
            .copied()
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows `filter` accepts, most recently seen first, at most `limit`.
    pub fn attempts(&self, filter: &Filter, limit: usize) -> Vec<Attempt> {
        self.recency
            .values()
            .rev()
            .filter_map(|key| Some((key, self.rows.get(key)?)))
            .filter(|(_, row)| filter.accepts(&row.sender))
            .take(limit)
            .map(|(key, row)| attempt(key, row))
            .collect()
    }

    /// (packets, rows with packets, busiest row) since the last call; resets the period.
    pub(super) fn take_period(&mut self) -> (u64, usize, Option<Attempt>) {
        let mut packets = 0;
        let mut rows = 0;
        let mut busiest: Option<(&Key, &Row)> = None;
        for (key, row) in &self.rows {
            if row.in_period == 0 {
                continue;
            }
            packets += row.in_period;
            rows += 1;
            if busiest.is_none_or(|(_, b)| row.in_period > b.in_period) {
                busiest = Some((key, row));
            }
        }
        let busiest = busiest.map(|(key, row)| {
            let mut a = attempt(key, row);
            a.count = row.in_period;
            a
        });
        for row in self.rows.values_mut() {
            row.in_period = 0;
        }
        (packets, rows, busiest)
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

fn attempt(key: &Key, row: &Row) -> Attempt {
    Attempt {
        action: key.action,
        handle: row.sender.handle.clone(),
        app_id: row.sender.app_id.clone(),
        space_id: row.sender.space_id.clone(),
        org_id: row.sender.org_id.clone(),
        workload: row.sender.workload.clone(),
        interface: row.sender.interface.clone(),
        src: key.src,
        dst: key.dst.to_string(),
        protocol: key.protocol.name(),
        dst_port: key.dst_port,
        rules_in_scope: row.sender.rules_in_scope.clone(),
        count: row.count,
        first_seen: rfc3339(row.first_seen),
        last_seen: rfc3339(row.last_seen),
    }
}
