//! The relay's batch queries on `failed_events`: draining blocked aggregates chain by chain,
//! parking events whose destination's circuit is open, and recording outcomes in bulk, so a
//! backlog built up during an outage goes out at full speed instead of one event per aggregate
//! per round.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::events::StoredEvent;
use super::{Store, StoreError, sql};

/// One event of a blocked aggregate that may be sent now, with the attempts it already made.
#[derive(Clone, Debug)]
pub struct ChainEvent {
    pub stored: StoredEvent,
    pub attempts: i32,
}

/// Relay-side access to `failed_events`.
#[derive(Clone, Debug)]
pub struct RelayQueries {
    store: Store,
}

/// Statuses that block an aggregate: retrying and held always, dead-lettered when the
/// publisher keeps aggregates blocked behind their dead letters.
fn blocking_statuses(block_on_dead_letter: bool) -> &'static str {
    if block_on_dead_letter {
        "('retrying', 'held', 'dead_lettered')"
    } else {
        "('retrying', 'held')"
    }
}

impl RelayQueries {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Aggregates (type, id) whose new events must wait behind a failed event.
    pub async fn blocked_aggregates(
        &self,
        consumer: &str,
        block_on_dead_letter: bool,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let statement = format!(
            "SELECT DISTINCT aggregate_type, aggregate_id FROM {}.failed_events \
             WHERE consumer = $1 AND status IN {}",
            self.store.schema(),
            blocking_statuses(block_on_dead_letter)
        );
        sqlx::query_as(sql(statement))
            .bind(consumer)
            .fetch_all(self.store.pool())
            .await
            .map_err(StoreError::query("list blocked aggregates"))
    }

    /// For every blocked aggregate in `shards` whose head is due (held, or retrying with its
    /// retry time passed), the head followed by the held events directly behind it, ordered by
    /// the head's position and then by position; at most `limit` rows. A dead-lettered head
    /// (kept blocking by `block_on_dead_letter`) is never due: it waits for an operator.
    pub async fn due_chains(
        &self,
        consumer: &str,
        shards: &[i16],
        limit: i64,
        block_on_dead_letter: bool,
    ) -> Result<Vec<ChainEvent>, StoreError> {
        let schema = self.store.schema();
        let cols = super::events::EVENT_COLUMNS
            .split(", ")
            .map(|c| format!("e.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        // `blockers` counts the non-held rows up to each row: a chain is the head plus the held
        // rows before the next retrying (or dead-lettered) one.
        let statement = format!(
            "WITH pending AS ( \
                 SELECT event_id, status, attempts, position, \
                     first_value(status) OVER w AS head_status, \
                     first_value(next_retry_at) OVER w AS head_next, \
                     first_value(position) OVER w AS head_position, \
                     row_number() OVER w AS n, \
                     count(*) FILTER (WHERE status <> 'held') OVER w AS blockers \
                 FROM {schema}.failed_events WHERE consumer = $1 AND status IN {statuses} \
                 WINDOW w AS (PARTITION BY aggregate_type, aggregate_id ORDER BY position)) \
             SELECT {cols}, p.attempts FROM pending p JOIN {schema}.events e USING (event_id) \
             WHERE (p.head_status = 'held' OR (p.head_status = 'retrying' AND p.head_next <= now())) \
               AND (p.n = 1 OR (p.status = 'held' \
                    AND p.blockers = CASE WHEN p.head_status = 'held' THEN 0 ELSE 1 END)) \
               AND e.shard = ANY($3) \
             ORDER BY p.head_position, p.position LIMIT $2",
            statuses = blocking_statuses(block_on_dead_letter)
        );
        let rows = sqlx::query(sql(statement))
            .bind(consumer)
            .bind(limit)
            .bind(shards)
            .fetch_all(self.store.pool())
            .await
            .map_err(StoreError::query("read due failed-event chains"))?;
        rows.iter()
            .map(|row| {
                use sqlx::Row;
                Ok(ChainEvent {
                    stored: super::events::row_to_stored(row)?,
                    attempts: row.try_get("attempts")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::query("decode failed-event chain"))
    }

    /// Parks events behind an earlier failed event of their aggregate (`held`), or, with
    /// `retry_at`, as heads that wait without a counted attempt (their destination's circuit is
    /// open). Existing rows are left alone.
    pub async fn park(
        &self,
        consumer: &str,
        events: &[&StoredEvent],
        retry_at: Option<(DateTime<Utc>, &str)>,
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let (status, next, reason) = match retry_at {
            Some((at, reason)) => ("retrying", Some(at), Some(reason)),
            None => ("held", None, None),
        };
        let statement = format!(
            "INSERT INTO {schema}.failed_events (consumer, event_id, position, event_type, aggregate_type, \
                 aggregate_id, status, attempts, last_error, next_retry_at) \
             SELECT $1, u.event_id, u.position, u.event_type, u.aggregate_type, u.aggregate_id, $7, 0, $8, $9 \
             FROM UNNEST($2::uuid[], $3::bigint[], $4::text[], $5::text[], $6::text[]) \
                 AS u(event_id, position, event_type, aggregate_type, aggregate_id) \
             ON CONFLICT (consumer, event_id) DO NOTHING",
            schema = self.store.schema()
        );
        sqlx::query(sql(statement))
            .bind(consumer)
            .bind(events.iter().map(|e| e.event.event_id).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.position).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.event.event_type.clone()).collect::<Vec<_>>())
            .bind(
                events
                    .iter()
                    .map(|e| e.event.aggregate_type.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(events.iter().map(|e| e.event.aggregate_id.clone()).collect::<Vec<_>>())
            .bind(status)
            .bind(reason)
            .bind(next)
            .execute(self.store.pool())
            .await
            .map_err(StoreError::query("park events"))?;
        Ok(())
    }

    /// Records a failed send: `retrying` until `next_retry_at`, or `dead_lettered` when it is
    /// None. `count_attempt` is false when the destination, not the event, was at fault (its
    /// circuit was not closed, or a destination-level error). A row an operator resolved, or
    /// one already delivered, keeps its status. Returns the attempts now recorded.
    pub async fn record_failure(
        &self,
        consumer: &str,
        event: &StoredEvent,
        error: &str,
        next_retry_at: Option<DateTime<Utc>>,
        count_attempt: bool,
    ) -> Result<i32, StoreError> {
        let status = if next_retry_at.is_some() {
            "retrying"
        } else {
            "dead_lettered"
        };
        let statement = format!(
            "INSERT INTO {schema}.failed_events (consumer, event_id, position, event_type, aggregate_type, \
                 aggregate_id, status, attempts, last_error, last_attempt_at, next_retry_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $10::int, $8, now(), $9) \
             ON CONFLICT (consumer, event_id) DO UPDATE SET status = EXCLUDED.status, \
                 attempts = failed_events.attempts + $10::int, last_error = EXCLUDED.last_error, \
                 last_attempt_at = now(), next_retry_at = EXCLUDED.next_retry_at, updated_at = now() \
             WHERE failed_events.status IN ('retrying', 'held') \
             RETURNING attempts",
            schema = self.store.schema()
        );
        let attempts: Option<i32> = sqlx::query_scalar(sql(statement))
            .bind(consumer)
            .bind(event.event.event_id)
            .bind(event.position)
            .bind(&event.event.event_type)
            .bind(&event.event.aggregate_type)
            .bind(&event.event.aggregate_id)
            .bind(status)
            .bind(error)
            .bind(next_retry_at)
            .bind(i32::from(count_attempt))
            .fetch_optional(self.store.pool())
            .await
            .map_err(StoreError::query("record failed send"))?;
        Ok(attempts.unwrap_or(0))
    }

    /// Marks failed or held events as delivered; resolved rows stay resolved.
    pub async fn mark_delivered(&self, consumer: &str, event_ids: &[Uuid]) -> Result<(), StoreError> {
        if event_ids.is_empty() {
            return Ok(());
        }
        let statement = format!(
            "UPDATE {}.failed_events SET status = 'delivered', next_retry_at = NULL, resolved_at = now(), \
             updated_at = now() WHERE consumer = $1 AND event_id = ANY($2) AND status IN ('retrying', 'held')",
            self.store.schema()
        );
        sqlx::query(sql(statement))
            .bind(consumer)
            .bind(event_ids)
            .execute(self.store.pool())
            .await
            .map_err(StoreError::query("mark failed events delivered"))?;
        Ok(())
    }

    /// A cheap round trip proving the database answers, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(self.store.pool())
            .await
            .map_err(StoreError::query("check the database"))?;
        Ok(())
    }
}
