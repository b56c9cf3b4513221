//! Ordered delivery: the one engine that sends stored events to a broker so an aggregate's
//! later event never overtakes the outcome of its earlier one. The relay runs it against the
//! configured broker; the library runs it against the in-process handlers.
//!
//! - [`engine`]: the pipelined loop (read, send, record outcomes, move the cursor), with holds,
//!   retries, circuits and dead letters;
//! - [`config`]: what the engine needs, whatever the caller's configuration looks like;
//! - [`waves`]: how a batch is cut into broker calls for brokers that do not keep order;
//! - [`resend`]: the replays' loop over a fixed range (waves, retries, parked aggregates);
//! - [`retry`]: backoff between attempts and when an event is given up (dead-lettered);
//! - [`circuit`]: when to stop sending to a destination that keeps failing;
//! - [`health`] and [`metrics`]: what the engine reports to probes and to Prometheus.

pub mod circuit;
pub mod config;
pub mod engine;
pub mod health;
pub mod metrics;
pub mod resend;
pub mod retry;
mod waves;

pub use config::{DeliveryConfig, WakeUp};
pub use engine::{Engine, EngineError};
pub use waves::waves;
