use super::*;
use crate::inventory::store::StoreSnapshot;
use crate::inventory::{Inventory, KernelView};
use crate::policy::plan;

/// xorshift64*: a fixed, dependency-free source of test cases.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Inputs the planner reads, owned.
#[derive(Default, Clone)]
struct Cell {
    entries: BTreeMap<String, Result<StoreEntry, String>>,
    routes: BTreeMap<Ipv4Addr, u32>,
    routes6: BTreeMap<Ipv6Addr, u32>,
    links: BTreeMap<u32, String>,
}

impl Cell {
    fn inputs(&self) -> Inputs<'_> {
        Inputs {
            entries: &self.entries,
            routes: &self.routes,
            routes6: &self.routes6,
            links: &self.links,
        }
    }

    fn inventory(&self) -> Inventory {
        Inventory {
            store: StoreSnapshot::from_parsed(&self.entries),
            kernel: KernelView {
                routes: self.routes.clone(),
                routes6: self.routes6.clone(),
                links: self.links.clone(),
            },
        }
    }

    /// One random change, recorded in `dirty`. A small universe of handles, IPs and
    /// interfaces, so that claims collide, routes move and interfaces are shared.
    fn mutate(&mut self, rng: &mut Rng, dirty: &mut Dirty) {
        const HANDLES: [&str; 7] = ["a", "b", "c", "check-d", "e", "f", "g"];
        const WORKLOADS: [Option<&str>; 5] = [
            None,
            Some("app"),
            Some("task"),
            Some("staging"),
            Some("build"),
        ];
        let ip = |rng: &mut Rng| match rng.below(9) {
            8 => Ipv4Addr::new(192, 168, 0, 1),
            n => Ipv4Addr::new(10, 255, 0, n as u8 + 1),
        };
        let ifindex = |rng: &mut Rng| 10 + rng.below(5) as u32;
        match rng.below(8) {
            0..=2 => {
                let handle = rng.pick(&HANDLES).to_string();
                let parsed = match rng.below(6) {
                    0 => None,
                    1 => Some(Err(format!("reason {}", rng.below(3)))),
                    _ => Some(Ok(StoreEntry {
                        handle: handle.as_str().into(),
                        ip: ip(rng),
                        workload: rng.pick(&WORKLOADS).map(Into::into),
                        app_id: Some(format!("app-{}", rng.below(3)).into()),
                        space_id: rng
                            .pick(&[None, Some("s1"), Some("s2"), Some("s3")])
                            .map(Into::into),
                        org_id: rng
                            .pick(&[None, Some("o1"), Some("O1"), Some("o2")])
                            .map(Into::into),
                        log_index: None,
                    })),
                };
                match parsed {
                    Some(parsed) => self.entries.insert(handle.clone(), parsed),
                    None => self.entries.remove(&handle),
                };
                dirty.handles.insert(handle);
            }
            3 | 4 => {
                let ip = ip(rng);
                if rng.below(3) == 0 {
                    self.routes.remove(&ip);
                } else {
                    self.routes.insert(ip, ifindex(rng));
                }
                dirty.routes.insert(ip);
            }
            5 => {
                let ip = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, rng.below(6) as u16 + 1);
                if rng.below(3) == 0 {
                    self.routes6.remove(&ip);
                } else {
                    self.routes6.insert(ip, ifindex(rng));
                }
                dirty.routes6 = true;
            }
            6 => {
                let index = ifindex(rng);
                if rng.below(3) == 0 {
                    self.links.remove(&index);
                } else {
                    self.links.insert(index, format!("s-{}", rng.below(4)));
                }
                dirty.links.insert(index);
            }
            _ => dirty.all |= rng.below(4) == 0,
        }
    }
}

fn assert_matches_full_plan(planner: &Planner, cell: &Cell, config: &Config, context: &str) {
    let reference = plan(config, &cell.inventory());
    let decisions: Vec<Decision> = planner.decisions().map(|d| (**d).clone()).collect();
    assert_eq!(decisions, reference.decisions, "{context}");
    assert_eq!(planner.rules(), &reference.rules, "{context}");
    for verdict in [Verdict::Exempt, Verdict::Restricted] {
        assert_eq!(
            planner.count(verdict),
            reference.count(verdict),
            "{context}"
        );
    }
    for (key, decision) in &planner.decisions {
        assert_eq!(*key, decision.key(), "{context}");
    }
}

#[test]
fn incremental_updates_equal_a_full_evaluation_on_random_histories() {
    // Rules naming some of the orgs and spaces the histories use (and one they never do).
    let config = Config::parse(
        r#"
        [[rules]]
        destination = "192.0.2.1"
        [[rules]]
        destination = "192.0.2.2"
        orgs = ["o1", "o9"]
        [[rules]]
        destination = "192.0.2.3"
        spaces = ["s1", "s2"]
        "#,
    )
    .expect("valid rules");
    let mut exempt_seen = 0;
    let mut scopes_seen = 0;
    for seed in 1..=300u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut cell = Cell::default();
        let mut planner = Planner::new(&config);
        planner.update(cell.inputs(), &Dirty::everything());
        let mut previous: BTreeMap<DecisionKey, Decision> = BTreeMap::new();
        for step in 0..60 {
            let mut dirty = Dirty::default();
            for _ in 0..=rng.below(3) {
                cell.mutate(&mut rng, &mut dirty);
            }
            let changes = planner.update(cell.inputs(), &dirty);
            let context = format!("seed {seed} step {step} dirty {dirty:?}");
            assert_matches_full_plan(&planner, &cell, &config, &context);
            // The changes reported turn the previous decisions into the new ones.
            for change in &changes {
                assert_ne!(change.before, change.after, "{context}");
                if let Some(before) = &change.before {
                    assert_eq!(previous.remove(&before.key()).as_ref(), Some(&**before));
                }
                if let Some(after) = &change.after {
                    previous.insert(after.key(), (**after).clone());
                }
            }
            let now: BTreeMap<DecisionKey, Decision> = planner
                .decisions
                .iter()
                .map(|(k, d)| (k.clone(), (**d).clone()))
                .collect();
            assert_eq!(previous, now, "{context}: changes do not add up");
            exempt_seen += planner.count(Verdict::Exempt);
            scopes_seen += planner.rules().scopes.len();
        }
    }
    // The histories reach the interesting states, or the test proves little.
    assert!(exempt_seen > 1000, "only {exempt_seen} exemptions seen");
    assert!(scopes_seen > 1000, "only {scopes_seen} scope elements seen");
}

#[test]
fn a_change_to_one_entry_evaluates_only_what_depends_on_it() {
    let config = Config::default();
    let mut cell = Cell::default();
    for i in 1..=200u8 {
        let handle = format!("h{i:03}");
        let ip = Ipv4Addr::new(10, 255, 1, i);
        cell.entries.insert(
            handle.clone(),
            Ok(StoreEntry {
                handle: handle.into(),
                ip,
                workload: Some(if i % 20 == 0 { "staging" } else { "app" }.into()),
                app_id: None,
                space_id: None,
                org_id: None,
                log_index: None,
            }),
        );
        cell.routes.insert(ip, 100 + u32::from(i));
    }
    let mut planner = Planner::new(&config);
    let changes = planner.update(cell.inputs(), &Dirty::everything());
    assert_eq!(changes.len(), 200);
    assert_eq!(planner.count(Verdict::Exempt), 10);
    // A staging container's route goes: its decision alone changes, its exemption goes.
    let ip = Ipv4Addr::new(10, 255, 1, 40);
    cell.routes.remove(&ip);
    let dirty = Dirty {
        routes: BTreeSet::from([ip]),
        ..Dirty::default()
    };
    let changes = planner.update(cell.inputs(), &dirty);
    assert_eq!(changes.len(), 1);
    assert_eq!(planner.count(Verdict::Exempt), 9);
    assert!(!planner.rules().exempt.iter().any(|k| k.ip == ip));
    // Nothing changed: nothing reported.
    assert!(planner.update(cell.inputs(), &Dirty::default()).is_empty());
    assert_matches_full_plan(&planner, &cell, &config, "after the route went");
}
