//! What the DNS filter learned, as the agent keeps it: every address a hostname rule's answer
//! allowed a container, with its rule's mark and when it expires. The kernel expires the
//! elements itself; this copy exists so that a table the agent recreates (drift repair, an
//! upgrade, the owned table at every start) gets them back with the time they have left, and
//! so that a repeated answer refreshes an element (deleted and added again in one batch: the
//! stemcells' kernels cannot update an element's timeout in place).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::model::{AgentTable, LearnedElement};
use super::netlink::{Batch, Op};

/// Learned addresses one container may hold at once.
pub const MAX_LEARNED_PER_CONTAINER: usize = 256;

/// One learned address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Learned {
    mark: u16,
    expires: Instant,
}

/// The learned addresses, by (host interface, address).
#[derive(Debug, Default)]
pub struct LearnedStore {
    entries: BTreeMap<(u32, IpAddr), Learned>,
    per_container: HashMap<u32, usize>,
}

/// Which bound kept an address from being learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The container holds [`MAX_LEARNED_PER_CONTAINER`] already.
    Container,
    /// The cell holds [`super::model::MAX_LEARNED_TOTAL`] already.
    Total,
}

impl LearnedStore {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets what expired by `now`.
    pub fn prune(&mut self, now: Instant) {
        let expired: Vec<(u32, IpAddr)> = self
            .entries
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.remove(key);
        }
    }

    fn remove(&mut self, key: (u32, IpAddr)) {
        if self.entries.remove(&key).is_some()
            && let Some(count) = self.per_container.get_mut(&key.0)
        {
            *count -= 1;
            if *count == 0 {
                self.per_container.remove(&key.0);
            }
        }
    }

    /// How many live addresses each mark (hostname rule) has allowed, over all containers.
    pub fn per_mark(&self, now: Instant) -> BTreeMap<u16, usize> {
        let mut counts = BTreeMap::new();
        for learned in self.entries.values().filter(|l| l.expires > now) {
            *counts.entry(learned.mark).or_default() += 1;
        }
        counts
    }

    /// Records `addresses` for `ifindex` under `mark`, expiring at `expires`.
    pub fn record(&mut self, ifindex: u32, addresses: &[IpAddr], mark: u16, expires: Instant) {
        for address in addresses {
            let learned = Learned { mark, expires };
            if self.entries.insert((ifindex, *address), learned).is_none() {
                *self.per_container.entry(ifindex).or_default() += 1;
            }
        }
    }

    /// Takes elements read back from the kernel (their remaining time as `timeout_ms`).
    pub fn restore(&mut self, elements: &[LearnedElement], now: Instant) {
        for element in elements {
            let expires = now + Duration::from_millis(element.timeout_ms);
            self.record(element.ifindex, &[element.address], element.mark, expires);
        }
    }

    /// Every live element with the time it has left (at least a second: an element due to
    /// expire in a moment is not worth a failed batch), for `marks` only.
    pub fn live(&self, now: Instant, marks: &BTreeSet<u16>) -> Vec<LearnedElement> {
        self.entries
            .iter()
            .filter(|(_, l)| l.expires > now && marks.contains(&l.mark))
            .map(|((ifindex, address), l)| LearnedElement {
                ifindex: *ifindex,
                address: *address,
                mark: l.mark,
                timeout_ms: duration_ms(l.expires.saturating_duration_since(now)).max(1000),
            })
            .collect()
    }

    /// Removes and returns the live elements whose mark is not in `marks` (their rule went).
    pub fn take_unmarked(&mut self, now: Instant, marks: &BTreeSet<u16>) -> Vec<LearnedElement> {
        let gone: Vec<((u32, IpAddr), Learned)> = self
            .entries
            .iter()
            .filter(|(_, l)| !marks.contains(&l.mark))
            .map(|(k, l)| (*k, *l))
            .collect();
        let mut out = Vec::new();
        for (key, learned) in gone {
            self.remove(key);
            if learned.expires > now {
                out.push(LearnedElement {
                    ifindex: key.0,
                    address: key.1,
                    mark: learned.mark,
                    timeout_ms: 0,
                });
            }
        }
        out
    }

    /// The mark `address` is learned under for `ifindex`, if it is.
    pub fn mark_of(&self, ifindex: u32, address: IpAddr) -> Option<u16> {
        self.entries.get(&(ifindex, address)).map(|l| l.mark)
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.per_container.clear();
    }
}

/// One answer's addresses to allow for one container, through one hostname rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learn {
    pub ifindex: u32,
    /// The hostname rule's connection mark.
    pub mark: u16,
    pub addresses: Vec<IpAddr>,
    /// How long the elements stay.
    pub timeout: Duration,
}

/// What became of one [`Learn`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LearnOutcome {
    /// Allowed now (added or refreshed in every table).
    pub allowed: Vec<IpAddr>,
    /// Left out by a bound.
    pub refused: Vec<(IpAddr, Bound)>,
}

/// The elements one batch of [`Learn`]s writes, and each request's outcome if it succeeds.
#[derive(Debug, Default)]
pub struct LearnPlan {
    /// Each (interface, address) once, with the longest timeout asked for it; `refresh`: it
    /// is live in the kernel already (deleted before it is added again).
    pub elements: Vec<LearnedElement>,
    refresh: Vec<bool>,
    pub outcomes: Vec<LearnOutcome>,
}

impl LearnPlan {
    /// Whether the batch deletes elements before adding them again.
    pub fn refreshes(&self) -> bool {
        self.refresh.iter().any(|r| *r)
    }

    /// The batch that writes the plan's elements into every table of `tables`: those live
    /// already deleted first (with `with_deletions`), then all added, a map's in one
    /// operation.
    pub fn batch(&self, tables: &[AgentTable], with_deletions: bool) -> Batch {
        let refreshed: Vec<LearnedElement> = self
            .elements
            .iter()
            .zip(&self.refresh)
            .filter(|(_, live)| **live)
            .map(|(e, _)| e.clone())
            .collect();
        let mut batch = Batch::default();
        for table in tables {
            if with_deletions {
                for family in by_family(refreshed.clone()) {
                    if !family.is_empty() {
                        batch.push(Op::DeleteLearned {
                            table: *table,
                            elements: family,
                        });
                    }
                }
            }
            for family in by_family(self.elements.clone()) {
                if !family.is_empty() {
                    batch.push(Op::AddLearned {
                        table: *table,
                        elements: family,
                    });
                }
            }
        }
        batch
    }
}

/// Plans `requests` against `store`: the bounds are checked against what the store holds
/// before the batch plus what earlier requests of the batch take; an address asked twice is
/// written once, with the longer timeout.
pub fn plan(store: &LearnedStore, requests: &[Learn]) -> LearnPlan {
    let mut plan = LearnPlan::default();
    let mut index: BTreeMap<(u32, IpAddr), usize> = BTreeMap::new();
    let mut taken_by_container: HashMap<u32, usize> = HashMap::new();
    let mut taken_total = 0usize;
    for request in requests {
        let mut outcome = LearnOutcome::default();
        let held = store
            .per_container
            .get(&request.ifindex)
            .copied()
            .unwrap_or(0);
        for address in &request.addresses {
            let key = (request.ifindex, *address);
            let timeout_ms = duration_ms(request.timeout);
            if let Some(at) = index.get(&key) {
                let element = &mut plan.elements[*at];
                if timeout_ms > element.timeout_ms {
                    element.timeout_ms = timeout_ms;
                    element.mark = request.mark;
                }
                outcome.allowed.push(*address);
                continue;
            }
            let live = store.entries.contains_key(&key);
            let taken = taken_by_container.entry(request.ifindex).or_default();
            if !live {
                if held + *taken >= MAX_LEARNED_PER_CONTAINER {
                    outcome.refused.push((*address, Bound::Container));
                    continue;
                }
                if store.entries.len() + taken_total >= super::model::MAX_LEARNED_TOTAL {
                    outcome.refused.push((*address, Bound::Total));
                    continue;
                }
                *taken += 1;
                taken_total += 1;
            }
            index.insert(key, plan.elements.len());
            plan.elements.push(LearnedElement {
                ifindex: request.ifindex,
                address: *address,
                mark: request.mark,
                timeout_ms,
            });
            plan.refresh.push(live);
            outcome.allowed.push(*address);
        }
        plan.outcomes.push(outcome);
    }
    plan
}

/// Whole milliseconds, saturating.
pub fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Elements of `elements` split by family (an operation holds one map's).
pub fn by_family(elements: Vec<LearnedElement>) -> [Vec<LearnedElement>; 2] {
    let (v6, v4): (Vec<_>, Vec<_>) = elements.into_iter().partition(|e| e.address.is_ipv6());
    [v4, v6]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("literal")
    }

    fn learn(ifindex: u32, mark: u16, addresses: &[IpAddr], secs: u64) -> Learn {
        Learn {
            ifindex,
            mark,
            addresses: addresses.to_vec(),
            timeout: Duration::from_secs(secs),
        }
    }

    #[test]
    fn a_container_gets_at_most_its_share_and_refreshes_what_it_holds() {
        let mut store = LearnedStore::default();
        let now = Instant::now();
        let many: Vec<IpAddr> = (0..MAX_LEARNED_PER_CONTAINER as u32 + 2)
            .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0xcb00_7100 + i)))
            .collect();
        let first = plan(&store, &[learn(7, 3, &many, 30)]);
        assert_eq!(first.outcomes[0].allowed.len(), MAX_LEARNED_PER_CONTAINER);
        assert_eq!(first.outcomes[0].refused.len(), 2);
        assert!(
            first.outcomes[0]
                .refused
                .iter()
                .all(|(_, b)| *b == Bound::Container)
        );
        assert!(!first.refreshes());
        for e in &first.elements {
            store.record(
                e.ifindex,
                &[e.address],
                e.mark,
                now + Duration::from_secs(30),
            );
        }
        // Asked again: refreshed (deleted and added), not refused.
        let again = plan(&store, &[learn(7, 3, &many[..2], 30)]);
        assert!(again.refreshes());
        assert_eq!(again.outcomes[0].allowed, many[..2].to_vec());
        let ops = again
            .batch(&[AgentTable::Persistent, AgentTable::Owned], true)
            .ops;
        assert!(matches!(ops[0], Op::DeleteLearned { .. }));
        assert!(matches!(ops[1], Op::AddLearned { .. }));
        assert_eq!(ops.len(), 4, "both tables: delete, then add");
        // Another container is not limited by the first one's share.
        let other = plan(&store, &[learn(8, 3, &many[..1], 30)]);
        assert_eq!(other.outcomes[0].allowed, many[..1].to_vec());
    }

    #[test]
    fn one_batch_writes_an_address_asked_twice_once_with_the_longer_timeout() {
        let store = LearnedStore::default();
        let a = ip("203.0.113.5");
        let batch = plan(&store, &[learn(7, 3, &[a], 30), learn(7, 3, &[a], 90)]);
        assert_eq!(batch.elements.len(), 1);
        assert_eq!(batch.elements[0].timeout_ms, 90_000);
        assert_eq!(batch.outcomes.len(), 2);
        assert!(batch.outcomes.iter().all(|o| o.allowed == vec![a]));
    }

    #[test]
    fn per_mark_counts_live_addresses_of_every_container() {
        let mut store = LearnedStore::default();
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        store.record(1, &[ip("203.0.113.1"), ip("2001:db8::1")], 3, later);
        store.record(2, &[ip("203.0.113.1")], 3, later);
        store.record(2, &[ip("203.0.113.2")], 9, later);
        store.record(2, &[ip("203.0.113.3")], 9, now);
        assert_eq!(
            store.per_mark(now),
            BTreeMap::from([(3, 3), (9, 1)]),
            "an expired address is not counted"
        );
    }

    #[test]
    fn expired_and_unmarked_elements_go() {
        let mut store = LearnedStore::default();
        let now = Instant::now();
        store.record(1, &[ip("203.0.113.1")], 3, now + Duration::from_secs(1));
        store.record(1, &[ip("2001:db8::1")], 4, now + Duration::from_secs(60));
        let marks: BTreeSet<u16> = [3, 4].into();
        assert_eq!(store.live(now, &marks).len(), 2);
        store.prune(now + Duration::from_secs(2));
        assert_eq!(store.len(), 1);
        let gone = store.take_unmarked(now, &[3].into());
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].address, ip("2001:db8::1"));
        assert!(store.is_empty());
        assert_eq!(
            plan(&store, &[learn(1, 3, &[ip("203.0.113.1")], 5)])
                .elements
                .len(),
            1
        );
    }

    #[test]
    fn restored_elements_keep_the_time_they_had_left() {
        let mut store = LearnedStore::default();
        let now = Instant::now();
        let element = LearnedElement {
            ifindex: 9,
            address: ip("198.51.100.7"),
            mark: 0x12,
            timeout_ms: 12_000,
        };
        store.restore(std::slice::from_ref(&element), now);
        let live = store.live(now, &[0x12].into());
        assert_eq!(live, vec![element]);
        assert_eq!(store.mark_of(9, ip("198.51.100.7")), Some(0x12));
    }
}
