//! `get_publisher_status`: backlog, failures and worker health of one consumer, read from
//! the store (the same figures the operator writes into the EventPublisher status).

use chrono::{DateTime, Utc};

use super::{InventoryEventPublisher, PublishError};
use crate::store::failed::FailedStatus;

/// One relay worker as its last heartbeat describes it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    pub worker_id: String,
    pub circuit_state: String,
    pub last_seen_at: DateTime<Utc>,
    pub published_total: i64,
    pub failed_total: i64,
}

/// Health of one consumer of the event store.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PublisherStatus {
    pub consumer: String,
    /// Stored events this consumer has not handled yet, parked (retrying or held) ones
    /// included (see [`crate::store::status::backlog`]).
    pub pending_events: i64,
    pub oldest_pending_at: Option<DateTime<Utc>>,
    pub retrying_events: i64,
    pub held_events: i64,
    pub dead_lettered_events: i64,
    pub workers: Vec<WorkerStatus>,
}

impl InventoryEventPublisher {
    /// Status of `consumer` (a publisher name, or the handler consumer).
    pub async fn get_publisher_status(&self, consumer: &str) -> Result<PublisherStatus, PublishError> {
        let backlog = crate::store::status::backlog(&self.store, consumer, None).await?;
        let counts = self.failed.counts(consumer).await?;
        let count = |s: FailedStatus| counts.iter().find(|(k, _)| *k == s).map_or(0, |(_, n)| *n);
        let workers = crate::store::status::worker_heartbeats(&self.store, consumer, None).await?;
        Ok(PublisherStatus {
            consumer: consumer.to_owned(),
            pending_events: backlog.events,
            oldest_pending_at: backlog.oldest_at,
            retrying_events: count(FailedStatus::Retrying),
            held_events: count(FailedStatus::Held),
            dead_lettered_events: count(FailedStatus::DeadLettered),
            workers: workers
                .into_iter()
                .map(|w| WorkerStatus {
                    worker_id: w.worker_id,
                    circuit_state: w.circuit_state,
                    last_seen_at: w.last_seen_at,
                    published_total: w.published_total,
                    failed_total: w.failed_total,
                })
                .collect(),
        })
    }
}
