//! Support for the root `cell` bench: scratch namespaces, the real daemon, probes, the
//! silk-style iptables baseline and the measurements themselves.

pub mod cell;
pub mod cmd;
pub mod daemon;
pub mod measure;
pub mod probe;
pub mod silk;
pub mod usage;
