//! `get_publisher_status`: backlog, failures and worker health of one consumer, read from
//! the store (the same figures the operator writes into the EventPublisher status).

use chrono::{DateTime, Utc};

use super::{InventoryEventPublisher, PublishError};
use crate::store::failed::FailedStatus;
use crate::store::{StoreError, sql};

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
    /// Stored events this consumer has not handled yet.
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
        let schema = self.store.schema();
        let pool = self.store.pool();
        let pending = format!(
            "SELECT count(e.position), min(e.recorded_at) FROM {schema}.relay_cursors c \
             JOIN {schema}.events e ON e.shard = c.shard AND e.position > c.position WHERE c.consumer = $1"
        );
        let (pending_events, oldest_pending_at): (i64, Option<DateTime<Utc>>) = sqlx::query_as(sql(pending))
            .bind(consumer)
            .fetch_one(pool)
            .await
            .map_err(StoreError::query("count pending events"))?;
        let counts = self.failed.counts(consumer).await?;
        let count = |s: FailedStatus| counts.iter().find(|(k, _)| *k == s).map_or(0, |(_, n)| *n);
        let workers_sql = format!(
            "SELECT worker_id, circuit_state, last_seen_at, published_total, failed_total \
             FROM {schema}.worker_heartbeats WHERE consumer = $1 ORDER BY worker_id"
        );
        let workers: Vec<(String, String, DateTime<Utc>, i64, i64)> = sqlx::query_as(sql(workers_sql))
            .bind(consumer)
            .fetch_all(pool)
            .await
            .map_err(StoreError::query("read worker heartbeats"))?;
        Ok(PublisherStatus {
            consumer: consumer.to_owned(),
            pending_events,
            oldest_pending_at,
            retrying_events: count(FailedStatus::Retrying),
            held_events: count(FailedStatus::Held),
            dead_lettered_events: count(FailedStatus::DeadLettered),
            workers: workers
                .into_iter()
                .map(
                    |(worker_id, circuit_state, last_seen_at, published_total, failed_total)| WorkerStatus {
                        worker_id,
                        circuit_state,
                        last_seen_at,
                        published_total,
                        failed_total,
                    },
                )
                .collect(),
        })
    }
}
