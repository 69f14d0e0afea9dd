//! The last step of a pass: log what it did, and publish status, metrics and attribution's
//! lookup.

use std::time::{Instant, SystemTime};

use super::{Observation, Outcome, PassResult, Reconciler};
use crate::dataplane::{AgentTable, TableAction};
use crate::metrics::PassRecord;
use crate::policy::{Change, Dirty, Verdict};

impl Reconciler {
    pub(super) fn log_pass(&self, outcome: &Outcome, drift: bool, observation: &Observation) {
        let restricted = self.planner.count(Verdict::Restricted);
        let exempt = self.planner.count(Verdict::Exempt);
        if drift && outcome.applied {
            tracing::warn!(
                action = outcome.action.kind(),
                restricted,
                exempt,
                "repaired drift: a table had been changed by someone else"
            );
        }
        if !outcome.applied {
            return;
        }
        for (table, action) in &outcome.action.tables {
            let table = table.name();
            match action {
                TableAction::Nothing => {}
                TableAction::Elements {
                    add,
                    remove,
                    add6,
                    remove6,
                    add_containers6,
                    remove_containers6,
                    add_scopes,
                    remove_scopes,
                } => tracing::info!(
                    table,
                    added = add.len() + add6.len(),
                    removed = remove.len() + remove6.len(),
                    containers6_added = add_containers6.len(),
                    containers6_removed = remove_containers6.len(),
                    scopes_added = add_scopes.len(),
                    scopes_removed = remove_scopes.len(),
                    restricted,
                    exempt,
                    "updated exemptions"
                ),
                TableAction::Restructure {
                    chains, intervals, ..
                } => tracing::info!(
                    table,
                    chains_before = chains.len(),
                    allowed_changes = intervals.len(),
                    restricted,
                    exempt,
                    "replaced chains and rules in place (configuration change)"
                ),
                TableAction::Full(reason) => tracing::info!(
                    table,
                    reason = reason.as_str(),
                    restricted,
                    exempt,
                    exempt_before = match observation {
                        Observation::Assumed { exempt } => *exempt,
                        _ => observation
                            .tables()
                            .and_then(|t| t.get(&AgentTable::from_name(table)?))
                            .and_then(|o| o.exempt.as_ref())
                            .map_or(0, |e| e.len()),
                    },
                    "installed full ruleset"
                ),
                TableAction::Delete => {
                    tracing::info!(table, "enforcement disabled: removed table")
                }
            }
        }
        if outcome.action.is_nothing() {
            tracing::debug!(restricted, exempt, "in sync; nothing written");
        }
    }

    /// Publishes what the pass did: the kernel's counters (when listed) to metrics and
    /// attribution, the changed decisions and the pass's result to status and metrics, and the
    /// changes to attribution's lookup.
    pub(super) fn publish(&mut self, changes: &[Change], dirty: &Dirty, pass: &PassResult) {
        let PassResult {
            observation,
            repaired,
            store_failed,
            in_sync,
            errors,
            started,
        } = pass;
        let (repaired, store_failed, in_sync) = (*repaired, *store_failed, *in_sync);
        // Counters are only known when the tables were listed this pass.
        if let Observation::Listed(tables) = observation {
            for (table, observed) in tables {
                self.metrics.observe_rejected(*table, observed.rejected);
                let (growth, suppressed) = {
                    let mut blocked = self.blocked.lock();
                    (
                        blocked.observe_counters(*table, observed.blocked),
                        blocked.suppressed,
                    )
                };
                self.metrics.record_blocked(growth, suppressed);
            }
        }
        let tamper_protection = self.dataplane.tamper_protection();
        let duration = started.elapsed();
        let mode = self.config.mode;
        let mut allowed = self.config.allowed_networks.clone();
        allowed.push(self.config.overlay_network.into());
        let rule_set = self.planner.rules().rule_set.clone();
        let (restricted, exempt) = (
            self.planner.count(Verdict::Restricted),
            self.planner.count(Verdict::Exempt),
        );
        self.status.update(|status| {
            // The decisions that changed, nothing else: the work is the size of the change.
            for change in changes {
                if let Some(before) = &change.before {
                    status.decisions.remove(&before.key());
                }
                if let Some(after) = &change.after {
                    status.decisions.insert(after.key(), after.clone());
                }
            }
            status.mode = mode;
            status.allowed = allowed;
            status.rule_set = rule_set;
            status.enabled = self.config.enabled;
            status.last_pass = Some(Instant::now());
            status.last_pass_wall = Some(SystemTime::now());
            status.in_sync = in_sync;
            status.tamper_protection = tamper_protection;
            status.ipv6_in_use = self.ipv6_in_use;
            status.restricted = restricted;
            status.exempt = exempt;
            if repaired {
                status.drift_repairs += 1;
            }
            if store_failed {
                status.store_errors += 1;
            }
            if errors.is_empty() {
                status.reconciles_ok += 1;
                status.last_error = None;
                status.last_success_wall = status.last_pass_wall;
            } else {
                status.reconciles_failed += 1;
                status.last_error = Some(errors.join("; "));
            }
        });
        self.metrics.record_pass(&PassRecord {
            enabled: self.config.enabled,
            restricted,
            exempt,
            duration,
            success: errors.is_empty(),
            drift_repaired: repaired,
            store_error: store_failed,
        });
        self.metrics.set_tamper_protection(tamper_protection);
        self.metrics.set_mode(mode);
        // A pass can put learned addresses back or remove a rule's: only with hostname rules
        // (or what is left of removed ones) is there anything to count.
        if self.dataplane.learned_count() > 0
            || !self.planner.rules().rule_set.host_marks().is_empty()
        {
            self.publish_learned();
        }
        self.publish_attribution(changes, dirty);
    }

    /// Hands the attribution the mode, the tables kept, and the decisions and interface names
    /// that changed (the lookup follows them under the lock: the work is the size of the
    /// change).
    pub(super) fn publish_attribution(&self, changes: &[Change], dirty: &Dirty) {
        let mut blocked = self.blocked.lock();
        blocked.set_mode(self.config.mode, self.dataplane.managed());
        let lookup = blocked.lookup_mut();
        lookup.set_rules(self.planner.rules().rule_set.clone());
        lookup.apply(changes);
        for ifindex in &dirty.links {
            lookup.set_link(*ifindex, self.links.get(ifindex).map(String::as_str));
        }
    }
}
