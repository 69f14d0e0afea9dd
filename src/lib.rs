//! egress-guard: keeps app containers on a Cloud Foundry cell from reaching the internet.
//!
//! # Layout
//! Data flows one way: events -> inventory -> policy -> dataplane.
//!
//! - [`config`]: TOML -> validated [`config::Config`] (no system access).
//! - [`inventory`]: what containers exist: silk's metadata store ([`inventory::store`]) joined
//!   with the kernel's host routes ([`inventory::kernel`]).
//! - [`policy`]: pure function (config, inventory) -> desired rules + a decision per container.
//! - [`dataplane`]: the agent's two nf_tables tables: typed description
//!   ([`dataplane::model`]), the smallest change ([`dataplane::plan`]), nf_tables netlink
//!   messages and the agent's socket ([`dataplane::netlink`]), nft notation for people
//!   ([`dataplane::render`]).
//! - [`dns`]: the DNS filter for restricted containers (`[dns]`): UDP/TCP listener on a
//!   thread of its own, allowed suffixes forwarded upstream, everything else refused.
//! - [`reconcile`]: the loop: events + timer -> one pass -> at most one nf_tables batch.
//! - [`status`]: what the loop reports, read by health and metrics.
//! - [`metrics`]: Prometheus metrics the loop updates.
//! - [`health`]: the read-only HTTP endpoint (liveness, readiness, status, metrics).
//! - [`blocked`]: blocked-attempt attribution: NFLOG reports -> a bounded summary per
//!   (container, destination, protocol, port), suppression counts, log pacing.
//! - [`cli`]: command line (clap) and the commands' implementations.
//! - [`client`]: `status` and `explain`, which ask a running agent over HTTP.

pub mod app_logs;
pub mod attribution;
pub mod change_flag;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod dns;
pub mod health;
pub mod inventory;
pub mod metrics;
pub mod policy;
pub mod reconcile;
pub mod status;
pub mod wire;
