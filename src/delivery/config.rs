//! What the delivery engine needs to know, independent of where it came from: the relay's
//! configuration file, the replay Job's, or the in-process handler settings of the library.

use super::circuit::CircuitBreakerConfig;
use super::retry::RetryPolicy;
use crate::broker::routing::Routing;

/// How an idle engine learns that events were written.
///
/// PostgreSQL serializes the commits of transactions that notify (their notifications are
/// queued under one database-wide lock held through the commit), which costs many concurrent
/// small writers a large share of their throughput (BENCHMARKS.md: 20-40 % for 16 writers of
/// one event per transaction). Polling costs them nothing and costs the database one
/// outbox read per `minPollIntervalMs` per idle worker instead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WakeUp {
    /// Writers notify (one NOTIFY per inserting statement); an idle worker backs off from
    /// `minPollIntervalMs` to `maxPollIntervalMs` between polls and is woken at once. The
    /// default: the lowest latency at idle.
    #[default]
    Notify,
    /// Workers poll every `minPollIntervalMs`, and writers skip the NOTIFY while every
    /// running worker on the schema polls: for write-heavy workloads of many small
    /// transactions.
    Poll,
}

/// Settings of one [`Engine`](super::Engine). Each caller translates its own configuration
/// into this, so the engine never depends on a caller's file format.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// The outbox consumer whose cursors, leases and failed events the engine owns.
    pub consumer: String,
    /// Events read from the outbox per round.
    pub batch_size: usize,
    /// Fastest poll when the outbox keeps returning full batches.
    pub min_poll_interval_ms: u64,
    /// Slowest poll when idle (a NOTIFY wakes the engine earlier).
    pub max_poll_interval_ms: u64,
    /// Read the next batch while the current one is being delivered.
    pub read_ahead: bool,
    /// How an idle engine learns of new events.
    pub wake_up: WakeUp,
    /// How often the engine renews its shard leases and reports its totals.
    pub heartbeat_interval_ms: u64,
    /// How long a lease lasts without renewal before another worker may take the shard.
    pub lease_duration_ms: u64,
    /// Retrying plus dead-lettered events above which the engine reports itself degraded.
    pub failed_event_threshold: i64,
    /// Hold an aggregate's later events behind a dead-lettered one until it is resolved.
    pub block_aggregate_after_dead_letter: bool,
    /// When a destination that keeps failing stops receiving messages.
    pub circuit_breaker: CircuitBreakerConfig,
    /// Backoff between attempts and when an event is given up.
    pub retry: RetryPolicy,
    /// Which destination each event goes to.
    pub routing: Routing,
}
