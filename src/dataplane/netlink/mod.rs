//! nf_tables over netlink: pure message building ([`batch`]) and parsing ([`dump`]), the
//! socket at the edge ([`socket`]) and the ruleset event watcher ([`events`]).

pub mod batch;
pub mod dump;
pub mod events;
pub mod socket;

pub use batch::{Batch, Op};
pub use dump::{DumpKind, Listing};
pub use socket::{NetlinkError, NetlinkSocket, Transport};
