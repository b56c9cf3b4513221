//! Shard leases and heartbeats of relay replicas: the store's lease mechanism
//! ([`crate::store::leases`]), shared with the in-process handler dispatcher.

pub use crate::store::leases::{HeartbeatReport, LeaseManager};
