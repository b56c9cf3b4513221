//! The outbox relay worker: claims unpublished events shard by shard, publishes them through a
//! broker adapter, and moves the cursor only after the broker acknowledged them. Failures go
//! through one shared retry policy and circuit breaker; exhausted events are dead-lettered.

pub mod circuit;
pub mod health;
pub mod metrics;
pub mod retry;
