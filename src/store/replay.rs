//! SQL of replays: the events (or dead letters) a ReplayJob selects, read in position order
//! below a fixed end, and the checkpoint rows in `replay_checkpoints` that the `replay` Job and
//! the library's `replay_events` resume from, with the aggregates they parked.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::events::{EVENT_COLUMNS, StoredEvent, row_to_stored};
use super::{SchemaName, StoreError, sql};

/// Which events a replay selects. Every bound is inclusive; empty lists match everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplaySelection {
    /// Lowest position replayed.
    pub from_position: Option<i64>,
    /// Highest position replayed (further capped by the replay's settled end).
    pub to_position: Option<i64>,
    /// Earliest `recorded_at` replayed.
    pub from_time: Option<DateTime<Utc>>,
    /// Latest `recorded_at` replayed.
    pub to_time: Option<DateTime<Utc>>,
    pub event_types: Vec<String>,
    pub aggregate_types: Vec<String>,
    pub aggregate_ids: Vec<String>,
    /// `Some(consumer)`: only the events that consumer dead-lettered (redrive).
    pub dead_lettered_by: Option<String>,
}

/// The filter shared by counting and reading: `$1` after-position (exclusive), `$2` end
/// (inclusive), `$3..$9` the selection. `e` is the events table, `f` the failed-event row.
fn where_clause() -> &'static str {
    "e.position > $1 AND e.position <= $2 \
     AND ($3::bigint IS NULL OR e.position >= $3) AND ($4::bigint IS NULL OR e.position <= $4) \
     AND ($5::timestamptz IS NULL OR e.recorded_at >= $5) AND ($6::timestamptz IS NULL OR e.recorded_at <= $6) \
     AND (cardinality($7::text[]) = 0 OR e.event_type = ANY($7)) \
     AND (cardinality($8::text[]) = 0 OR e.aggregate_type = ANY($8)) \
     AND (cardinality($9::text[]) = 0 OR e.aggregate_id = ANY($9)) \
     AND ($10::text IS NULL OR EXISTS (SELECT 1 FROM {schema}.failed_events f \
          WHERE f.consumer = $10 AND f.event_id = e.event_id AND f.status = 'dead_lettered'))"
}

fn statement(schema: &SchemaName, select: &str, tail: &str) -> String {
    let filter = where_clause().replace("{schema}", schema.as_str());
    format!("SELECT {select} FROM {schema}.events e WHERE {filter} {tail}")
}

macro_rules! bind_selection {
    ($query:expr, $after:expr, $end:expr, $s:expr) => {
        $query
            .bind($after)
            .bind($end)
            .bind($s.from_position)
            .bind($s.to_position)
            .bind($s.from_time)
            .bind($s.to_time)
            .bind(&$s.event_types)
            .bind(&$s.aggregate_types)
            .bind(&$s.aggregate_ids)
            .bind(&$s.dead_lettered_by)
    };
}

/// How many events above `after` and at or below `end` the selection matches.
pub async fn count(
    pool: &PgPool,
    schema: &SchemaName,
    selection: &ReplaySelection,
    after: i64,
    end: i64,
) -> Result<i64, StoreError> {
    let text = statement(schema, "count(*)", "");
    bind_selection!(sqlx::query_scalar(sql(text)), after, end, selection)
        .fetch_one(pool)
        .await
        .map_err(StoreError::query("count the events a replay selects"))
}

/// Up to `limit` selected events above `after` and at or below `end`, in position order.
pub async fn read(
    pool: &PgPool,
    schema: &SchemaName,
    selection: &ReplaySelection,
    after: i64,
    end: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, StoreError> {
    let columns = EVENT_COLUMNS
        .split(", ")
        .map(|c| format!("e.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ");
    let text = statement(schema, &columns, "ORDER BY e.position LIMIT $11");
    let rows = bind_selection!(sqlx::query(sql(text)), after, end, selection)
        .bind(limit)
        .fetch_all(pool)
        .await
        .map_err(StoreError::query("read the events a replay selects"))?;
    rows.iter()
        .map(row_to_stored)
        .collect::<Result<_, _>>()
        .map_err(StoreError::query("decode a replayed event"))
}

/// Marks redriven dead letters delivered. Only rows still `dead_lettered` move: a resolve or
/// a manual retry made meanwhile sticks.
pub async fn mark_redriven(
    pool: &PgPool,
    schema: &SchemaName,
    consumer: &str,
    event_ids: &[Uuid],
) -> Result<u64, StoreError> {
    if event_ids.is_empty() {
        return Ok(0);
    }
    let text = format!(
        "UPDATE {schema}.failed_events SET status = 'delivered', next_retry_at = NULL, resolved_at = now(), \
         resolution = 'redriven by a ReplayJob', updated_at = now() \
         WHERE consumer = $1 AND event_id = ANY($2) AND status = 'dead_lettered'"
    );
    let done = sqlx::query(sql(text))
        .bind(consumer)
        .bind(event_ids)
        .execute(pool)
        .await
        .map_err(StoreError::query("mark redriven dead letters delivered"))?;
    Ok(done.rows_affected())
}

/// Where a replay stands, as its checkpoint row says (fields named as its columns).
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Checkpoint {
    /// Every selected event at or below this position was handled (0 before the first batch).
    pub position: i64,
    pub matched: i64,
    pub replayed: i64,
    pub failed: i64,
    /// The settled end fixed by the first run.
    pub end_position: Option<i64>,
    /// `running`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// Pods that started on this replay, this one included.
    pub runs: i32,
    pub started_at: Option<DateTime<Utc>>,
    /// (aggregate type, aggregate id) of the aggregates earlier runs gave up on (see
    /// [`crate::delivery::resend`]); loaded by [`start`], not a column.
    #[sqlx(skip)]
    pub parked: Vec<(String, String)>,
}

/// Loads the checkpoint of `replay_id`, creating it when absent, and counts this run; with it
/// the aggregates earlier runs parked.
pub async fn start(pool: &PgPool, schema: &SchemaName, replay_id: &str) -> Result<Checkpoint, StoreError> {
    let text = format!(
        "INSERT INTO {schema}.replay_checkpoints (replay_id, runs) VALUES ($1, 1) \
         ON CONFLICT (replay_id) DO UPDATE SET runs = replay_checkpoints.runs + 1, updated_at = now() \
         RETURNING position, matched, replayed, failed, end_position, state, runs, started_at"
    );
    let mut checkpoint: Checkpoint = sqlx::query_as(sql(text))
        .bind(replay_id)
        .fetch_one(pool)
        .await
        .map_err(StoreError::query("load the replay checkpoint"))?;
    let text =
        format!("SELECT aggregate_type, aggregate_id FROM {schema}.replay_parked_aggregates WHERE replay_id = $1");
    checkpoint.parked = sqlx::query_as(sql(text))
        .bind(replay_id)
        .fetch_all(pool)
        .await
        .map_err(StoreError::query("load the aggregates a replay parked"))?;
    Ok(checkpoint)
}

/// Writes the checkpoint and, in the same transaction, the aggregates parked since the last
/// save (so a checkpoint past an event that was given up always comes with its aggregate
/// parked); the end is set once (a later run cannot move it).
pub async fn save(
    pool: &PgPool,
    schema: &SchemaName,
    replay_id: &str,
    checkpoint: &Checkpoint,
    newly_parked: &[(String, String)],
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.map_err(StoreError::Connect)?;
    let text = format!(
        "UPDATE {schema}.replay_checkpoints SET position = $2, matched = $3, replayed = $4, failed = $5, \
         state = $6, end_position = coalesce(end_position, $7), updated_at = now() WHERE replay_id = $1"
    );
    sqlx::query(sql(text))
        .bind(replay_id)
        .bind(checkpoint.position)
        .bind(checkpoint.matched)
        .bind(checkpoint.replayed)
        .bind(checkpoint.failed)
        .bind(&checkpoint.state)
        .bind(checkpoint.end_position)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::query("save the replay checkpoint"))?;
    if !newly_parked.is_empty() {
        let (types, ids): (Vec<&str>, Vec<&str>) = newly_parked.iter().map(|(t, i)| (t.as_str(), i.as_str())).unzip();
        let text = format!(
            "INSERT INTO {schema}.replay_parked_aggregates (replay_id, aggregate_type, aggregate_id) \
             SELECT $1, t, i FROM unnest($2::text[], $3::text[]) AS p(t, i) ON CONFLICT DO NOTHING"
        );
        sqlx::query(sql(text))
            .bind(replay_id)
            .bind(&types)
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::query("save the aggregates a replay parked"))?;
    }
    tx.commit()
        .await
        .map_err(StoreError::query("commit the replay checkpoint"))?;
    Ok(())
}
