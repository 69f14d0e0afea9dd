//! What the reconcile loop reports about itself, for health, readiness, status and metrics.
//!
//! The loop is the only writer; readers (the HTTP endpoint) take short read locks and copy
//! what they need, so a slow client can never stall a pass.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;

use crate::config::Mode;
use crate::policy::{Decision, DecisionKey, RuleSet};

/// The loop's state as of its last pass.
#[derive(Debug, Clone)]
pub struct Status {
    /// `enabled` from the config.
    pub enabled: bool,
    /// Reconcile interval, for the liveness deadline.
    pub reconcile_interval: Duration,
    /// When the last pass (successful or not) completed.
    pub last_pass: Option<Instant>,
    pub last_pass_wall: Option<SystemTime>,
    /// When the last fully successful pass completed.
    pub last_success_wall: Option<SystemTime>,
    /// Why the last pass was not fully successful; None when it was.
    pub last_error: Option<String>,
    /// After the last pass, the kernel's table matched the desired rules (or was absent when
    /// disabled).
    pub in_sync: bool,
    /// Whether the owned table guards the rules (None until the kernel was asked).
    pub tamper_protection: Option<bool>,
    /// Whether IPv6 is enabled in the cell's network namespace.
    pub ipv6_in_use: bool,
    /// Whether the kernel enforces per-container limits (a limit per element of a dynamic
    /// set), as the start-up probe found; None when the probe could not run.
    pub per_container_limits: Option<bool>,
    /// Every container known, with its verdict and reason.
    /// Every container known, in the policy's order, with its verdict and reason. Shared with
    /// the policy's planner and kept from the decisions each pass changed.
    pub decisions: BTreeMap<DecisionKey, Arc<Decision>>,
    pub restricted: usize,
    pub exempt: usize,
    /// Passes that found the kernel changed by someone else and repaired it.
    pub drift_repairs: u64,
    pub reconciles_ok: u64,
    pub reconciles_failed: u64,
    pub store_errors: u64,
    // Audit mode.
    /// The mode of the rules the agent keeps (the configured one once a pass has applied it).
    pub mode: Mode,
    /// The destinations every restricted container may reach (`allowed_networks` and the
    /// overlay), and the `[[rules]]`, as of the last pass.
    pub allowed: Vec<IpNet>,
    pub rule_set: Arc<RuleSet>,
    /// Addresses hostname rules' answers allow now, by rule mark (all containers).
    pub learned_per_mark: BTreeMap<u16, usize>,
    /// The last configuration reload (SIGHUP), if any.
    pub last_reload: Option<ReloadReport>,
}

/// What the last reload did, for `/status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReloadReport {
    /// When (RFC 3339).
    pub at: String,
    /// `ok`, or `invalid` (the running configuration stays).
    pub result: String,
    /// Why the file was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Keys whose new value waits for a restart (they keep their running value).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restart_needed: Vec<String>,
}

impl Status {
    pub fn new(enabled: bool, reconcile_interval: Duration) -> Status {
        Status {
            learned_per_mark: BTreeMap::new(),
            enabled,
            reconcile_interval,
            last_pass: None,
            last_pass_wall: None,
            last_success_wall: None,
            last_error: None,
            in_sync: false,
            tamper_protection: None,
            ipv6_in_use: false,
            per_container_limits: None,
            decisions: BTreeMap::new(),
            restricted: 0,
            exempt: 0,
            drift_repairs: 0,
            reconciles_ok: 0,
            reconciles_failed: 0,
            store_errors: 0,
            mode: Mode::default(),
            allowed: Vec::new(),
            rule_set: Arc::default(),
            last_reload: None,
        }
    }

    /// Liveness: a pass completed within 3 × the interval (or the loop has only just started).
    pub fn live(&self, now: Instant, started: Instant) -> bool {
        let deadline = self.reconcile_interval * 3;
        match self.last_pass {
            Some(at) => now.duration_since(at) <= deadline,
            None => now.duration_since(started) <= deadline,
        }
    }

    /// Readiness: why not ready, or None when ready.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.last_pass.is_none() {
            return Some("first reconcile has not completed".into());
        }
        if let Some(err) = &self.last_error {
            return Some(format!("last reconcile failed: {err}"));
        }
        if !self.in_sync {
            return Some("kernel table does not match the desired rules".into());
        }
        None
    }
}

/// Shared handle to the status.
#[derive(Debug, Clone)]
pub struct SharedStatus(Arc<RwLock<Status>>);

impl SharedStatus {
    pub fn new(status: Status) -> SharedStatus {
        SharedStatus(Arc::new(RwLock::new(status)))
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Status> {
        // A panic while holding the lock leaves consistent plain data; keep serving it.
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut guard = self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_turns_red_after_three_intervals() {
        let started = Instant::now();
        let mut status = Status::new(true, Duration::from_secs(1));
        assert!(status.live(started, started));
        assert!(!status.live(started + Duration::from_secs(4), started));
        status.last_pass = Some(started + Duration::from_secs(2));
        assert!(status.live(started + Duration::from_secs(4), started));
        assert!(!status.live(started + Duration::from_secs(6), started));
    }

    #[test]
    fn readiness_needs_a_clean_matching_pass() {
        let mut status = Status::new(true, Duration::from_secs(1));
        assert!(
            status
                .not_ready_reason()
                .expect("not ready")
                .contains("first")
        );
        status.last_pass = Some(Instant::now());
        assert!(
            status
                .not_ready_reason()
                .expect("not ready")
                .contains("does not match")
        );
        status.in_sync = true;
        assert_eq!(status.not_ready_reason(), None);
        status.last_error = Some("store corrupt".into());
        assert!(
            status
                .not_ready_reason()
                .expect("not ready")
                .contains("store corrupt")
        );
    }
}
