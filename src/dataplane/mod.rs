//! The dataplane: nftables rendering, reading back, and the choice of the smallest
//! transaction that makes the kernel match the desired rules.
//!
//! At most one nft write per pass, built completely before it is applied. The default is a
//! partial sync (set elements only) when the table's structure is intact; anything surprising
//! (table missing, a rule changed, an element nft cannot map back, a partial sync rejected)
//! falls back to a full sync that recreates the table atomically.

pub mod nft;
pub mod observe;
pub mod render;

use std::collections::BTreeSet;

pub use nft::{Nft, NftError};
pub use observe::{ObservedTable, RejectCounters};
pub use render::Batch;

use crate::policy::{DesiredRules, ExemptKey};

/// Why a full sync is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullSyncReason {
    TableMissing,
    StructureDiffers,
    ElementsUnreadable,
    PartialSyncFailed,
}

impl FullSyncReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FullSyncReason::TableMissing => "table missing",
            FullSyncReason::StructureDiffers => "chains, rules, set or counters differ",
            FullSyncReason::ElementsUnreadable => "set elements could not be read back",
            FullSyncReason::PartialSyncFailed => "element update was rejected",
        }
    }
}

/// The one transaction a pass should apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncAction {
    /// The kernel already matches.
    Nothing,
    /// Only the exempt set's elements differ.
    Elements {
        add: Vec<ExemptKey>,
        remove: Vec<ExemptKey>,
    },
    /// Recreate the whole table in one transaction.
    Full(FullSyncReason),
    /// enabled = false and the table exists.
    DeleteTable,
}

impl SyncAction {
    /// The nft batch for this action.
    pub fn batch(&self, desired: Option<&DesiredRules>) -> Batch {
        match (self, desired) {
            (SyncAction::Elements { add, remove }, _) => render::element_update(add, remove),
            (SyncAction::Full(_), Some(rules)) => render::full_sync(rules),
            (SyncAction::DeleteTable, _) => render::delete_table(),
            (SyncAction::Nothing, _) | (SyncAction::Full(_), None) => Batch::default(),
        }
    }
}

/// Chooses the action that makes `observed` match `desired` (None: enforcement disabled).
pub fn choose_action(
    desired: Option<&DesiredRules>,
    observed: Option<&ObservedTable>,
) -> SyncAction {
    let Some(rules) = desired else {
        return match observed {
            Some(_) => SyncAction::DeleteTable,
            None => SyncAction::Nothing,
        };
    };
    let Some(observed) = observed else {
        return SyncAction::Full(FullSyncReason::TableMissing);
    };
    if observed.skeleton != render::skeleton(rules) {
        return SyncAction::Full(FullSyncReason::StructureDiffers);
    }
    let Some(present) = &observed.exempt else {
        return SyncAction::Full(FullSyncReason::ElementsUnreadable);
    };
    let add: Vec<ExemptKey> = rules.exempt.difference(present).copied().collect();
    let remove: Vec<ExemptKey> = present.difference(&rules.exempt).copied().collect();
    if add.is_empty() && remove.is_empty() {
        SyncAction::Nothing
    } else {
        SyncAction::Elements { add, remove }
    }
}

/// The table as the agent last wrote it, standing in for a listing when nobody else has
/// committed a transaction since (counters unknown: zero).
pub fn assume_written(rules: &DesiredRules) -> ObservedTable {
    ObservedTable {
        skeleton: render::skeleton(rules),
        exempt: Some(rules.exempt.clone()),
        rejected: RejectCounters::default(),
    }
}

/// Whether the kernel's table is exactly `expected` (None: the table should be absent).
pub fn matches(expected: Option<&DesiredRules>, observed: Option<&ObservedTable>) -> bool {
    choose_action(expected, observed) == SyncAction::Nothing
}

/// The exempt elements an observation holds, empty when unknown.
pub fn observed_exempt(observed: Option<&ObservedTable>) -> BTreeSet<ExemptKey> {
    observed.and_then(|o| o.exempt.clone()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn key(ifindex: u32, last: u8) -> ExemptKey {
        ExemptKey {
            ifindex,
            ip: Ipv4Addr::new(10, 255, 0, last),
        }
    }

    fn rules(exempt: &[ExemptKey]) -> DesiredRules {
        DesiredRules {
            overlay: "10.255.0.0/16".parse().expect("literal"),
            allowed: vec!["10.0.0.0/8".parse().expect("literal")],
            exempt: exempt.iter().copied().collect(),
        }
    }

    fn observed(rules: &DesiredRules, exempt: Option<&[ExemptKey]>) -> ObservedTable {
        ObservedTable {
            skeleton: render::skeleton(rules),
            exempt: exempt.map(|e| e.iter().copied().collect()),
            rejected: RejectCounters::default(),
        }
    }

    #[test]
    fn an_assumed_table_is_the_written_one() {
        let written = rules(&[key(3, 3)]);
        assert!(matches(Some(&written), Some(&assume_written(&written))));
        let next = rules(&[key(3, 3), key(4, 4)]);
        assert_eq!(
            choose_action(Some(&next), Some(&assume_written(&written))),
            SyncAction::Elements {
                add: vec![key(4, 4)],
                remove: vec![]
            }
        );
    }

    #[test]
    fn identical_state_needs_nothing() {
        let desired = rules(&[key(3, 3)]);
        let seen = observed(&desired, Some(&[key(3, 3)]));
        assert_eq!(
            choose_action(Some(&desired), Some(&seen)),
            SyncAction::Nothing
        );
        assert!(matches(Some(&desired), Some(&seen)));
        assert!(SyncAction::Nothing.batch(Some(&desired)).is_empty());
    }

    #[test]
    fn element_changes_are_a_partial_sync() {
        let desired = rules(&[key(3, 3), key(4, 4)]);
        let seen = observed(&desired, Some(&[key(2, 2), key(3, 3)]));
        assert_eq!(
            choose_action(Some(&desired), Some(&seen)),
            SyncAction::Elements {
                add: vec![key(4, 4)],
                remove: vec![key(2, 2)]
            }
        );
    }

    #[test]
    fn missing_or_changed_structure_is_a_full_sync() {
        let desired = rules(&[]);
        assert_eq!(
            choose_action(Some(&desired), None),
            SyncAction::Full(FullSyncReason::TableMissing)
        );
        let mut seen = observed(&desired, Some(&[]));
        seen.skeleton.rules.pop();
        assert_eq!(
            choose_action(Some(&desired), Some(&seen)),
            SyncAction::Full(FullSyncReason::StructureDiffers)
        );
        let unreadable = observed(&desired, None);
        assert_eq!(
            choose_action(Some(&desired), Some(&unreadable)),
            SyncAction::Full(FullSyncReason::ElementsUnreadable)
        );
        let batch = SyncAction::Full(FullSyncReason::TableMissing).batch(Some(&desired));
        assert_eq!(batch, render::full_sync(&desired));
    }

    #[test]
    fn a_config_change_is_a_full_sync() {
        let before = rules(&[]);
        let mut after = rules(&[]);
        after
            .allowed
            .push("172.16.0.0/12".parse().expect("literal"));
        let seen = observed(&before, Some(&[]));
        assert_eq!(
            choose_action(Some(&after), Some(&seen)),
            SyncAction::Full(FullSyncReason::StructureDiffers)
        );
    }

    #[test]
    fn disabled_deletes_an_existing_table_only() {
        let seen = observed(&rules(&[]), Some(&[]));
        assert_eq!(choose_action(None, Some(&seen)), SyncAction::DeleteTable);
        assert_eq!(choose_action(None, None), SyncAction::Nothing);
        assert!(matches(None, None));
        assert!(!matches(None, Some(&seen)));
    }
}
