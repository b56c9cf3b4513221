//! Failed and dead-lettered events, per consumer: what could not be delivered, why, and what
//! happens next. One implementation for the relay (bulk forms: whole chains of a blocked
//! aggregate, parking and settling many events per round), the in-process handler dispatcher
//! and the admin API.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use super::events::StoredEvent;
use super::{Store, StoreError, sql};

/// Where a failed event stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailedStatus {
    /// Waiting for its next attempt.
    Retrying,
    /// Waiting behind an earlier failed event of the same aggregate.
    Held,
    /// Gave up after the retry policy; needs a manual retry or resolve.
    DeadLettered,
    /// Discarded by an operator, with a reason.
    Resolved,
    /// Delivered on a later attempt.
    Delivered,
}

impl FailedStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            FailedStatus::Retrying => "retrying",
            FailedStatus::Held => "held",
            FailedStatus::DeadLettered => "dead_lettered",
            FailedStatus::Resolved => "resolved",
            FailedStatus::Delivered => "delivered",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Retrying,
            Self::Held,
            Self::DeadLettered,
            Self::Resolved,
            Self::Delivered,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// One failed event as listed by the admin interface.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailedEvent {
    pub consumer: String,
    pub event_id: Uuid,
    pub position: i64,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub status: FailedStatus,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub first_failed_at: DateTime<Utc>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub next_retry_at: Option<DateTime<Utc>>,
    pub resolution: Option<String>,
}

/// Filters for listing failed events; results are ordered by position, after `after_position`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FailedEventQuery {
    pub consumer: Option<String>,
    pub statuses: Vec<FailedStatus>,
    pub event_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub failed_after: Option<DateTime<Utc>>,
    pub failed_before: Option<DateTime<Utc>>,
    pub after_position: Option<i64>,
    pub limit: i64,
}

const COLUMNS: &str = "consumer, event_id, position, event_type, aggregate_type, aggregate_id, status, attempts, \
     last_error, first_failed_at, last_attempt_at, next_retry_at, resolution";

type Row = (
    String,
    Uuid,
    i64,
    String,
    String,
    String,
    String,
    i32,
    Option<String>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<String>,
);

fn from_row(r: Row) -> FailedEvent {
    FailedEvent {
        consumer: r.0,
        event_id: r.1,
        position: r.2,
        event_type: r.3,
        aggregate_type: r.4,
        aggregate_id: r.5,
        status: FailedStatus::parse(&r.6).unwrap_or(FailedStatus::Retrying),
        attempts: r.7,
        last_error: r.8,
        first_failed_at: r.9,
        last_attempt_at: r.10,
        next_retry_at: r.11,
        resolution: r.12,
    }
}

/// One event of a blocked aggregate that may be sent now, with the attempts it already made.
#[derive(Clone, Debug)]
pub struct ChainEvent {
    pub stored: StoredEvent,
    pub attempts: i32,
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

/// Access to the `failed_events` table.
#[derive(Clone, Debug)]
pub struct FailedEvents {
    store: Store,
}

impl FailedEvents {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Records a failed attempt: `retrying` until `next_retry_at`, or `dead_lettered` when it is None.
    /// See [`record_failure`](Self::record_failure); every call counts an attempt.
    pub async fn record_attempt(
        &self,
        consumer: &str,
        event: &StoredEvent,
        error: &str,
        next_retry_at: Option<DateTime<Utc>>,
    ) -> Result<Option<FailedEvent>, StoreError> {
        self.record_failure(consumer, event, error, next_retry_at, true).await
    }

    /// Records a failed send: `retrying` until `next_retry_at`, or `dead_lettered` when it is
    /// None. `count_attempt` is false when the destination, not the event, was at fault (its
    /// circuit was not closed, or a destination-level error).
    ///
    /// Only a row still waiting for delivery (`retrying`, `held`) takes the failure. A row an
    /// operator resolved, or that was delivered, while this attempt was in flight keeps its
    /// status; so does a dead letter (a late failure must not revive it). Returns None then.
    pub async fn record_failure(
        &self,
        consumer: &str,
        event: &StoredEvent,
        error: &str,
        next_retry_at: Option<DateTime<Utc>>,
        count_attempt: bool,
    ) -> Result<Option<FailedEvent>, StoreError> {
        let status = if next_retry_at.is_some() {
            FailedStatus::Retrying
        } else {
            FailedStatus::DeadLettered
        };
        let statement = format!(
            "INSERT INTO {schema}.failed_events (consumer, event_id, position, event_type, aggregate_type, \
                 aggregate_id, status, attempts, last_error, last_attempt_at, next_retry_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $10::int, $8, now(), $9) \
             ON CONFLICT (consumer, event_id) DO UPDATE SET status = EXCLUDED.status, \
                 attempts = failed_events.attempts + $10::int, last_error = EXCLUDED.last_error, \
                 last_attempt_at = now(), next_retry_at = EXCLUDED.next_retry_at, updated_at = now() \
             WHERE failed_events.status IN ('retrying', 'held') \
             RETURNING {COLUMNS}",
            schema = self.store.schema()
        );
        let row: Option<Row> = sqlx::query_as(sql(statement))
            .bind(consumer)
            .bind(event.event.event_id)
            .bind(event.position)
            .bind(&event.event.event_type)
            .bind(&event.event.aggregate_type)
            .bind(&event.event.aggregate_id)
            .bind(status.as_str())
            .bind(error)
            .bind(next_retry_at)
            .bind(i32::from(count_attempt))
            .fetch_optional(self.store.pool())
            .await
            .map_err(StoreError::query("record failed event"))?;
        if row.is_none() {
            tracing::info!(consumer, event_id = %event.event.event_id, "failed attempt not recorded: the event was settled meanwhile");
        }
        Ok(row.map(from_row))
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
            Some((at, reason)) => (FailedStatus::Retrying, Some(at), Some(reason)),
            None => (FailedStatus::Held, None, None),
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
            .bind(status.as_str())
            .bind(reason)
            .bind(next)
            .execute(self.store.pool())
            .await
            .map_err(StoreError::query("park events"))?;
        Ok(())
    }

    /// Aggregates (type, id) that have a retrying or held event: new events of them must wait.
    pub async fn blocked_aggregates(&self, consumer: &str) -> Result<Vec<(String, String)>, StoreError> {
        self.blocked_aggregates_for(consumer, false).await
    }

    /// Aggregates (type, id) whose new events must wait behind a failed event: retrying and
    /// held always, dead-lettered too when `block_on_dead_letter`.
    pub async fn blocked_aggregates_for(
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

    /// The next event to deliver for each blocked aggregate (retrying or held) whose head is
    /// due, ordered by position.
    pub async fn due_heads(&self, consumer: &str, shards: &[i16], limit: i64) -> Result<Vec<StoredEvent>, StoreError> {
        let heads = self.due(consumer, shards, limit, false, false).await?;
        Ok(heads.into_iter().map(|h| h.stored).collect())
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
        self.due(consumer, shards, limit, block_on_dead_letter, true).await
    }

    /// Due heads, each followed by its chain of held events when `chains`.
    async fn due(
        &self,
        consumer: &str,
        shards: &[i16],
        limit: i64,
        block_on_dead_letter: bool,
        chains: bool,
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
               AND (p.n = 1 OR ($4 AND p.status = 'held' \
                    AND p.blockers = CASE WHEN p.head_status = 'held' THEN 0 ELSE 1 END)) \
               AND e.shard = ANY($3) \
             ORDER BY p.head_position, p.position LIMIT $2",
            statuses = blocking_statuses(block_on_dead_letter)
        );
        let rows = sqlx::query(sql(statement))
            .bind(consumer)
            .bind(limit)
            .bind(shards)
            .bind(chains)
            .fetch_all(self.store.pool())
            .await
            .map_err(StoreError::query("read due failed events"))?;
        rows.iter()
            .map(|row| {
                use sqlx::Row;
                Ok(ChainEvent {
                    stored: super::events::row_to_stored(row)?,
                    attempts: row.try_get("attempts")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::query("decode failed events"))
    }

    /// Marks a previously failed or held event as delivered, unless an operator settled it
    /// meanwhile (a resolve sticks).
    pub async fn mark_delivered(&self, consumer: &str, event_id: Uuid) -> Result<(), StoreError> {
        self.mark_all_delivered(consumer, &[event_id]).await
    }

    /// Marks failed or held events as delivered; resolved rows stay resolved.
    pub async fn mark_all_delivered(&self, consumer: &str, event_ids: &[Uuid]) -> Result<(), StoreError> {
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

    /// Lists failed events by the query's filters.
    pub async fn list(&self, q: &FailedEventQuery) -> Result<Vec<FailedEvent>, StoreError> {
        let statuses: Vec<&str> = q.statuses.iter().map(|s| s.as_str()).collect();
        let statement = format!(
            "SELECT {COLUMNS} FROM {}.failed_events \
             WHERE ($1::text IS NULL OR consumer = $1) AND (cardinality($2::text[]) = 0 OR status = ANY($2)) \
               AND ($3::text IS NULL OR event_type = $3) AND ($4::text IS NULL OR aggregate_id = $4) \
               AND ($5::timestamptz IS NULL OR first_failed_at >= $5) \
               AND ($6::timestamptz IS NULL OR first_failed_at < $6) AND position > $7 \
             ORDER BY position, consumer LIMIT $8",
            self.store.schema()
        );
        let rows: Vec<Row> = sqlx::query_as(sql(statement))
            .bind(&q.consumer)
            .bind(&statuses)
            .bind(&q.event_type)
            .bind(&q.aggregate_id)
            .bind(q.failed_after)
            .bind(q.failed_before)
            .bind(q.after_position.unwrap_or(0))
            .bind(q.limit)
            .fetch_all(self.store.pool())
            .await
            .map_err(StoreError::query("list failed events"))?;
        Ok(rows.into_iter().map(from_row).collect())
    }

    /// Counts per status for one consumer.
    pub async fn counts(&self, consumer: &str) -> Result<Vec<(FailedStatus, i64)>, StoreError> {
        let statement = format!(
            "SELECT status, count(*) FROM {}.failed_events WHERE consumer = $1 GROUP BY status",
            self.store.schema()
        );
        let rows: Vec<(String, i64)> = sqlx::query_as(sql(statement))
            .bind(consumer)
            .fetch_all(self.store.pool())
            .await
            .map_err(StoreError::query("count failed events"))?;
        Ok(rows
            .into_iter()
            .filter_map(|(s, n)| FailedStatus::parse(&s).map(|s| (s, n)))
            .collect())
    }

    /// Schedules an immediate new attempt of a dead-lettered or retrying event. Returns the
    /// row before the change, or None when no such failed event exists.
    pub async fn retry_now(&self, consumer: &str, event_id: Uuid) -> Result<Option<FailedEvent>, StoreError> {
        self.transition(
            consumer,
            event_id,
            "status = 'retrying', next_retry_at = now(), attempts = 0, resolution = coalesce($3::text, f.resolution)",
            &["dead_lettered", "retrying"],
        )
        .await
    }

    /// Discards a failed event with a reason; it will not be delivered.
    pub async fn resolve(
        &self,
        consumer: &str,
        event_id: Uuid,
        reason: &str,
    ) -> Result<Option<FailedEvent>, StoreError> {
        let mut conn = self.store.pool().acquire().await.map_err(StoreError::Connect)?;
        transition_on(
            &mut conn,
            &self.store,
            consumer,
            event_id,
            "status = 'resolved', next_retry_at = NULL, resolved_at = now(), resolution = $3",
            &["dead_lettered", "retrying", "held"],
            Some(reason),
        )
        .await
    }

    async fn transition(
        &self,
        consumer: &str,
        event_id: Uuid,
        set: &str,
        from: &[&str],
    ) -> Result<Option<FailedEvent>, StoreError> {
        let mut conn = self.store.pool().acquire().await.map_err(StoreError::Connect)?;
        transition_on(&mut conn, &self.store, consumer, event_id, set, from, None).await
    }
}

async fn transition_on(
    conn: &mut PgConnection,
    store: &Store,
    consumer: &str,
    event_id: Uuid,
    set: &str,
    from: &[&str],
    reason: Option<&str>,
) -> Result<Option<FailedEvent>, StoreError> {
    let schema = store.schema();
    // Return the row as it was before the update (self-join on the old version).
    let statement = format!(
        "WITH old AS (SELECT {COLUMNS} FROM {schema}.failed_events \
                      WHERE consumer = $1 AND event_id = $2 AND status = ANY($4) FOR UPDATE), \
              upd AS (UPDATE {schema}.failed_events f SET {set}, updated_at = now() FROM old \
                      WHERE f.consumer = old.consumer AND f.event_id = old.event_id) \
         SELECT * FROM old"
    );
    let from: Vec<&str> = from.to_vec();
    let row: Option<Row> = sqlx::query_as(sql(statement))
        .bind(consumer)
        .bind(event_id)
        .bind(reason)
        .bind(&from)
        .fetch_optional(&mut *conn)
        .await
        .map_err(StoreError::query("update failed event"))?;
    Ok(row.map(from_row))
}
