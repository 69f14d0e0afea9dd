//! The loop's mailbox: what each event watcher saw change since the last pass.
//!
//! Each watcher is handed only its own part: the route and link watcher its
//! [`KernelChanges`] (flags and queues), the store watcher and the nf_tables watcher one
//! [`ChangeFlag`] each. A pass takes them all at its start (see `Reconciler::take_changes`).

use std::sync::Arc;

use crate::change_flag::ChangeFlag;
use crate::inventory::kernel::KernelChanges;

/// What changed since the loop last looked; unwatched sources always count as changed.
#[derive(Debug, Default)]
pub struct Changes {
    /// Links, IPv4 and IPv6 routes (the rtnetlink watcher's).
    pub kernel: Arc<KernelChanges>,
    /// Someone other than the agent committed an nf_tables transaction.
    pub ruleset: Arc<ChangeFlag>,
    /// The metadata store's directory changed.
    pub store: Arc<ChangeFlag>,
}
