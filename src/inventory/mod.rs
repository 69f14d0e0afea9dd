//! What containers exist on this cell and what they are: the metadata store joined with the
//! kernel's host routes. Owns no policy: deciding who is restricted is `policy`'s job.

pub mod kernel;
pub mod routes;
pub mod store;

pub use kernel::{KernelReader, KernelView};
pub use routes::{RouteTable, RouteUpdate};
pub use store::{StoreEntry, StoreSnapshot};

/// One consistent view of the cell, the only input (with the config) of `policy::plan`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// The last metadata store that parsed (kept across later parse failures).
    pub store: StoreSnapshot,
    /// Host routes and interfaces as of this pass.
    pub kernel: KernelView,
}
