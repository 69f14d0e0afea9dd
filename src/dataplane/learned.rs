//! What the DNS filter learned, as the agent keeps it: every address a hostname rule's answer
//! allowed a container, with its rule's mark and when it expires. The kernel expires the
//! elements itself; this copy exists so that a table the agent recreates (drift repair, an
//! upgrade, the owned table at every start) gets them back with the time they have left, and
//! so that a repeated answer refreshes an element (deleted and added again in one batch: the
//! stemcells' kernels cannot update an element's timeout in place).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::model::LearnedElement;

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

/// The addresses of one answer, split by what the store can take.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Admission {
    /// New to the store (added).
    pub new: Vec<IpAddr>,
    /// Live already: deleted and added again with the new timeout.
    pub refreshed: Vec<IpAddr>,
    /// Left out, and why.
    pub refused: Vec<(IpAddr, Bound)>,
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

    /// Splits `addresses` (for the container on `ifindex`) into new, refreshed and refused.
    pub fn admit(&self, ifindex: u32, addresses: &[IpAddr]) -> Admission {
        let mut admission = Admission::default();
        let mut held = self.per_container.get(&ifindex).copied().unwrap_or(0);
        let mut total = self.entries.len();
        for address in addresses {
            if self.entries.contains_key(&(ifindex, *address)) {
                admission.refreshed.push(*address);
            } else if held >= MAX_LEARNED_PER_CONTAINER {
                admission.refused.push((*address, Bound::Container));
            } else if total >= super::model::MAX_LEARNED_TOTAL {
                admission.refused.push((*address, Bound::Total));
            } else {
                held += 1;
                total += 1;
                admission.new.push(*address);
            }
        }
        admission
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

    #[test]
    fn a_container_gets_at_most_its_share_and_refreshes_what_it_holds() {
        let mut store = LearnedStore::default();
        let now = Instant::now();
        let many: Vec<IpAddr> = (0..MAX_LEARNED_PER_CONTAINER as u32 + 2)
            .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0xcb00_7100 + i)))
            .collect();
        let admission = store.admit(7, &many);
        assert_eq!(admission.new.len(), MAX_LEARNED_PER_CONTAINER);
        assert_eq!(admission.refused.len(), 2);
        assert!(
            admission
                .refused
                .iter()
                .all(|(_, b)| *b == Bound::Container)
        );
        store.record(7, &admission.new, 3, now + Duration::from_secs(30));
        let again = store.admit(7, &many[..2]);
        assert_eq!(again.refreshed, many[..2].to_vec());
        // Another container is not limited by the first one's share.
        assert_eq!(store.admit(8, &many[..1]).new, many[..1].to_vec());
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
        assert!(store.admit(1, &[ip("203.0.113.1")]).new.len() == 1);
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
