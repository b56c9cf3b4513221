//! Appending to and reading from the event store.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{SchemaName, StoreError, sql};
use crate::event::{DomainEvent, EventMetadata};

/// An event as stored: the envelope plus its global position.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    pub position: i64,
    pub shard: i16,
    pub recorded_at: DateTime<Utc>,
    pub event: DomainEvent,
}

/// Columns selected wherever a `StoredEvent` is read; keep in step with `row_to_stored`.
pub(crate) const EVENT_COLUMNS: &str = "position, shard, recorded_at, event_id, event_type, event_version, \
     aggregate_type, aggregate_id, occurred_at, correlation_id, causation_id, user_id, source, \
     traceparent, payload";

pub(crate) fn row_to_stored(row: &sqlx::postgres::PgRow) -> Result<StoredEvent, sqlx::Error> {
    use sqlx::Row;
    let version: i32 = row.try_get("event_version")?;
    Ok(StoredEvent {
        position: row.try_get("position")?,
        shard: row.try_get("shard")?,
        recorded_at: row.try_get("recorded_at")?,
        event: DomainEvent {
            event_id: row.try_get("event_id")?,
            event_type: row.try_get("event_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            aggregate_type: row.try_get("aggregate_type")?,
            timestamp: row.try_get("occurred_at")?,
            version: u32::try_from(version).unwrap_or_default(),
            metadata: EventMetadata {
                correlation_id: row.try_get("correlation_id")?,
                causation_id: row.try_get("causation_id")?,
                user_id: row.try_get("user_id")?,
                source: row.try_get("source")?,
                traceparent: row.try_get("traceparent")?,
                replay_job: None,
            },
            payload: row.try_get("payload")?,
        },
    })
}

/// Inserts validated events on the caller's connection (normally inside the caller's
/// transaction) with one statement, and returns their positions in input order.
///
/// Rows are inserted sorted by the key of the trigger's per-aggregate lock (a hash of the
/// aggregate, so different aggregates can share one), keeping each aggregate's events in
/// input order: concurrent batches take those locks in one global order and cannot deadlock
/// each other. Sorting by the aggregate itself did not: two aggregates whose hashes collide
/// are one lock, and the aggregate order and the lock order disagree.
pub async fn append(
    conn: &mut PgConnection,
    schema: &SchemaName,
    events: &[DomainEvent],
) -> Result<Vec<i64>, StoreError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let n = events.len();
    let mut ids = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    let mut aggregate_types = Vec::with_capacity(n);
    let mut aggregate_ids = Vec::with_capacity(n);
    let mut occurred = Vec::with_capacity(n);
    let mut correlation = Vec::with_capacity(n);
    let mut causation = Vec::with_capacity(n);
    let mut users = Vec::with_capacity(n);
    let mut sources = Vec::with_capacity(n);
    let mut traceparents = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    for e in events {
        ids.push(e.event_id);
        types.push(e.event_type.as_str());
        versions.push(i32::try_from(e.version).unwrap_or(i32::MAX));
        aggregate_types.push(e.aggregate_type.as_str());
        aggregate_ids.push(e.aggregate_id.as_str());
        occurred.push(e.timestamp);
        correlation.push(e.metadata.correlation_id.as_deref());
        causation.push(e.metadata.causation_id.as_deref());
        users.push(e.metadata.user_id.as_deref());
        sources.push(e.metadata.source.as_deref());
        traceparents.push(e.metadata.traceparent.as_deref());
        payloads.push(&e.payload);
    }

    // The lock key is computed exactly as the trigger does; WITH ORDINALITY keeps each
    // aggregate's events in input order (and so in position order).
    let statement = format!(
        "INSERT INTO {schema}.events (event_id, event_type, event_version, aggregate_type, aggregate_id, \
         occurred_at, correlation_id, causation_id, user_id, source, traceparent, payload) \
         SELECT event_id, event_type, event_version, aggregate_type, aggregate_id, occurred_at, \
                correlation_id, causation_id, user_id, source, traceparent, payload \
         FROM UNNEST($1::uuid[], $2::text[], $3::int4[], $4::text[], $5::text[], $6::timestamptz[], \
                     $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::jsonb[]) \
              WITH ORDINALITY AS t(event_id, event_type, event_version, aggregate_type, aggregate_id, \
                   occurred_at, correlation_id, causation_id, user_id, source, traceparent, payload, n) \
         ORDER BY hashtext(aggregate_type || '/' || aggregate_id), n \
         RETURNING event_id, position"
    );
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(sql(statement))
        .bind(&ids)
        .bind(&types)
        .bind(&versions)
        .bind(&aggregate_types)
        .bind(&aggregate_ids)
        .bind(&occurred)
        .bind(&correlation)
        .bind(&causation)
        .bind(&users)
        .bind(&sources)
        .bind(&traceparents)
        .bind(&payloads)
        .fetch_all(&mut *conn)
        .await
        .map_err(StoreError::query("insert events"))?;

    let positions: std::collections::HashMap<Uuid, i64> = rows.into_iter().collect();
    Ok(events
        .iter()
        .map(|e| positions.get(&e.event_id).copied().unwrap_or_default())
        .collect())
}

/// Filters for reading a range of the event store (replay, audits).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventRange {
    /// Exclusive lower bound on position.
    pub after_position: Option<i64>,
    /// Inclusive upper bound on position.
    pub to_position: Option<i64>,
    /// Inclusive lower bound on the event's timestamp.
    pub from_time: Option<DateTime<Utc>>,
    /// Exclusive upper bound on the event's timestamp.
    pub to_time: Option<DateTime<Utc>>,
    pub event_types: Vec<String>,
    pub aggregate_types: Vec<String>,
    pub aggregate_ids: Vec<String>,
}

/// Reads up to `limit` committed events matching `range`, in position order.
pub async fn read_range(
    conn: &mut PgConnection,
    schema: &SchemaName,
    range: &EventRange,
    limit: i64,
) -> Result<Vec<StoredEvent>, StoreError> {
    let statement = format!(
        "SELECT {EVENT_COLUMNS} FROM {schema}.events \
         WHERE position > $1 AND ($2::bigint IS NULL OR position <= $2) \
           AND ($3::timestamptz IS NULL OR occurred_at >= $3) \
           AND ($4::timestamptz IS NULL OR occurred_at < $4) \
           AND (cardinality($5::text[]) = 0 OR event_type = ANY($5)) \
           AND (cardinality($6::text[]) = 0 OR aggregate_type = ANY($6)) \
           AND (cardinality($7::text[]) = 0 OR aggregate_id = ANY($7)) \
         ORDER BY position LIMIT $8"
    );
    let rows = sqlx::query(sql(statement))
        .bind(range.after_position.unwrap_or(0))
        .bind(range.to_position)
        .bind(range.from_time)
        .bind(range.to_time)
        .bind(&range.event_types)
        .bind(&range.aggregate_types)
        .bind(&range.aggregate_ids)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await
        .map_err(StoreError::query("read event range"))?;
    rows.iter()
        .map(row_to_stored)
        .collect::<Result<_, _>>()
        .map_err(StoreError::query("decode event"))
}

/// The class of the trigger's per-aggregate advisory locks ('outr'; see the migrations).
const AGGREGATE_LOCK_CLASS: i32 = 1_869_574_770;

/// The last position a replay starting now reads (at most `to_position`), once every writer
/// that could still commit a row at or below it has finished: after this returns, a plain
/// position-ordered read up to it sees every committed event, with no gap left by a
/// transaction still in flight.
///
/// Positions are drawn from a sequence after the trigger takes the writer's aggregate lock,
/// which it holds until its transaction ends. So a writer that drew a position at or below
/// the sequence value read first, and is still running, holds such a lock; waiting for each
/// of those locks (shared, one statement at a time, so the replay never holds one while it
/// waits for another) waits for exactly those writers, and not for unrelated long
/// transactions elsewhere in the database.
pub async fn settled_end(pool: &PgPool, schema: &SchemaName, to_position: Option<i64>) -> Result<i64, StoreError> {
    let statement = format!("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {schema}.event_position_seq");
    let handed_out: i64 = sqlx::query_scalar(sql(statement))
        .fetch_one(pool)
        .await
        .map_err(StoreError::query("read the last position handed out"))?;
    let end = to_position.map_or(handed_out, |to| to.min(handed_out));
    let keys: Vec<i32> = sqlx::query_scalar(
        "SELECT DISTINCT (CASE WHEN objid::int8 > 2147483647 THEN objid::int8 - 4294967296 \
                               ELSE objid::int8 END)::int4 \
         FROM pg_locks \
         WHERE locktype = 'advisory' AND classid = $1::int8::oid AND objsubid = 2 AND granted \
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND pid <> pg_backend_pid()",
    )
    .bind(i64::from(AGGREGATE_LOCK_CLASS))
    .fetch_all(pool)
    .await
    .map_err(StoreError::query("list writers in flight"))?;
    for key in keys {
        // A writer may legitimately stay open longer than the store's statement timeout.
        let mut tx = super::begin_detached(pool, None)
            .await
            .map_err(StoreError::query("begin wait for writers"))?;
        sqlx::query("SET LOCAL statement_timeout = 0")
            .execute(&mut *tx)
            .await
            .map_err(StoreError::query("lift the statement timeout"))?;
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1, $2)")
            .bind(AGGREGATE_LOCK_CLASS)
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::query("wait for a writer in flight"))?;
        tx.commit().await.map_err(StoreError::query("end wait for writers"))?;
    }
    Ok(end)
}
