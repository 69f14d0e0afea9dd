//! The middle of a pass: plan (the policy), observe the kernel's tables, choose the smallest
//! action, apply it as one batch, and remember what the kernel now holds.

use std::time::Instant;

use super::{Observation, Outcome, Reads, Reconciler};
use crate::dataplane::{FullSyncReason, SyncAction, TableAction, plan};
use crate::policy::{Change, DesiredRules, Dirty, Inputs};

impl Reconciler {
    /// Brings the policy's decisions up to date; returns those that changed.
    pub(super) fn plan(&mut self, dirty: &Dirty) -> Vec<Change> {
        let inputs = Inputs {
            entries: self.store.entries(),
            routes: &self.container_routes,
            routes6: &self.routes6,
            links: &self.links,
        };
        self.planner.update(inputs, dirty)
    }

    /// Lists the tables when someone else may have changed them; otherwise assumes they hold
    /// what the agent last wrote (a wrong assumption can only make an element update fail,
    /// which falls back to a full sync).
    pub(super) async fn observe(&mut self, list: bool) -> Observation {
        if let (Some(written), false) = (&self.last_written, list) {
            return Observation::Assumed {
                exempt: written.as_ref().map_or(0, |rules| rules.exempt.len()),
            };
        }
        // The chains of the rules wanted now and of those written last (after a reload they
        // differ), asked for by name.
        let wanted = self.planner.rules().rule_set.clone();
        let written = match &self.last_written {
            Some(Some(written)) => written.rule_set.clone(),
            _ => wanted.clone(),
        };
        match self.dataplane.observe(&[&wanted, &written]).await {
            Ok(tables) => Observation::Listed(tables),
            Err(err) => Observation::Unreadable(err.to_string()),
        }
    }

    /// The action that makes the kernel match, and whether it had drifted from what the agent
    /// last wrote.
    pub(super) fn choose(
        &self,
        desired: Option<&DesiredRules>,
        observation: &Observation,
    ) -> (SyncAction, bool) {
        let managed = self.dataplane.managed();
        let port = self.dataplane.port_id();
        match observation {
            Observation::Assumed { .. } => {
                let written = self.last_written.as_ref().and_then(Option::as_ref);
                (
                    plan::choose_from_written(desired, written, managed, port),
                    false,
                )
            }
            Observation::Listed(tables) => {
                let drift = self
                    .last_written
                    .as_ref()
                    .is_some_and(|written| !plan::matches(written.as_ref(), managed, tables, port));
                (plan::choose(desired, managed, tables, port), drift)
            }
            Observation::Unreadable(err) => {
                // Cannot see the tables: rewrite them whole (idempotent, never looser).
                tracing::warn!(error = %err, "cannot read back the tables; doing a full sync");
                let action = match desired {
                    Some(_) => TableAction::Full(FullSyncReason::StructureDiffers),
                    None => TableAction::Delete,
                };
                let tables = managed.iter().map(|t| (*t, action.clone())).collect();
                (SyncAction { tables }, false)
            }
        }
    }

    /// Applies `action` as one batch; a rejected element update falls back to a full sync in
    /// the same pass.
    pub(super) async fn apply(
        &mut self,
        action: SyncAction,
        desired: Option<&DesiredRules>,
        errors: &mut Vec<String>,
    ) -> Outcome {
        if action.is_nothing() {
            return Outcome {
                action,
                applied: true,
                bytes: 0,
            };
        }
        let err = match self.dataplane.apply(&action, desired).await {
            Ok(applied) => {
                return Outcome {
                    action,
                    applied: true,
                    bytes: applied.bytes,
                };
            }
            Err(err) => err,
        };
        let escalated = action.escalated();
        if escalated == action {
            tracing::error!(error = %err, action = action.kind(),
                "nf_tables batch failed; kernel keeps its previous rules");
            errors.push(err.to_string());
            return Outcome {
                action,
                applied: false,
                bytes: 0,
            };
        }
        tracing::warn!(error = %err, "element update rejected; falling back to a full sync");
        match self.dataplane.apply(&escalated, desired).await {
            Ok(applied) => Outcome {
                action: escalated,
                applied: true,
                bytes: applied.bytes,
            },
            Err(err) => {
                tracing::error!(error = %err, "full sync failed; kernel keeps its previous rules");
                errors.push(err.to_string());
                Outcome {
                    action: escalated,
                    applied: false,
                    bytes: 0,
                }
            }
        }
    }

    /// Remembers what the kernel now holds and whether this pass verified it.
    pub(super) fn record(
        &mut self,
        desired: Option<DesiredRules>,
        reads: Reads,
        outcome: &Outcome,
        errors: &[String],
    ) {
        if outcome.applied {
            self.last_written = Some(desired);
            // A recreated table's report counters start from zero.
            let mut blocked = self.blocked.lock();
            for (table, action) in &outcome.action.tables {
                if matches!(action, TableAction::Full(_)) {
                    blocked.table_recreated(*table);
                }
            }
        }
        if reads.ruleset && outcome.applied && errors.is_empty() {
            self.last_verified = Some(Instant::now());
        }
        self.last_pass_ok = errors.is_empty();
    }
}
