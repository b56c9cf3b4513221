//! Gap-free reading of unpublished events.
//!
//! Positions come from a sequence, so a transaction holding a lower position can commit after
//! one holding a higher position; a plain "position > cursor" reader would skip it forever.
//! Instead each (consumer, shard) cursor remembers which transactions were still in progress
//! (`pg_current_snapshot()`'s xip list) when the cursor last moved. Only those can still
//! commit rows at or below the cursor. Once one finishes, its rows ("late rows") are read in
//! position order together with the new rows above the cursor, so for every aggregate the
//! stream stays in commit order (the store's trigger makes position order equal commit order
//! per aggregate). A long-running transaction elsewhere only sits in the watch list; it never
//! holds the cursor back.
//!
//! State machine per cursor (C = position, W = watched, F = late txids being read, L = late_after):
//! - F empty: read late rows of F := {finished t in W} with L < position <= C, plus rows above C.
//!   If the batch ended at or below C, keep reading F from L := last position (mid-scan).
//!   Otherwise C := last position (if any) and W := in-progress txids of the snapshot.
//! - F not empty (mid-scan): read only late rows of F above L; no new rows until F is done,
//!   so a later event of an aggregate can never overtake a late one.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{Acquire, PgConnection};

use super::events::{EVENT_COLUMNS, StoredEvent, row_to_stored};
use super::{SchemaName, Store, StoreError, sql};

/// Number of shards events are spread over by aggregate hash (fixed by the schema).
pub const SHARDS: i16 = 64;

/// The persisted reading state of one cursor.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct CursorState {
    position: i64,
    watched: BTreeSet<u64>,
    late: BTreeSet<u64>,
    late_after: i64,
}

/// What committing a batch writes back: the new state of each shard read.
#[derive(Clone, Debug, Default)]
pub struct CursorAdvance {
    updates: Vec<(i16, CursorState)>,
}

impl CursorAdvance {
    pub fn is_empty(&self) -> bool {
        self.updates.is_empty()
    }
}

/// Events read in one round, in position order, and the cursor move that acknowledges them.
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub events: Vec<StoredEvent>,
    pub advance: CursorAdvance,
}

/// Reads unpublished events of one consumer from a set of shards.
#[derive(Clone, Debug)]
pub struct OutboxReader {
    store: Store,
    consumer: String,
}

impl OutboxReader {
    pub fn new(store: Store, consumer: impl Into<String>) -> Self {
        Self {
            store,
            consumer: consumer.into(),
        }
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Creates missing cursors for `shards`, starting at the beginning of the event store.
    pub async fn ensure_cursors(&self, shards: &[i16]) -> Result<(), StoreError> {
        let statement = format!(
            "INSERT INTO {}.relay_cursors (consumer, shard) SELECT $1, unnest($2::int2[]) \
             ON CONFLICT DO NOTHING",
            self.store.schema()
        );
        sqlx::query(sql(statement))
            .bind(&self.consumer)
            .bind(shards)
            .execute(self.store.pool())
            .await
            .map_err(StoreError::query("create relay cursors"))?;
        Ok(())
    }

    /// Reads up to `limit` events not yet handled by this consumer in `shards`, without moving
    /// any cursor: call [`OutboxReader::commit`] with the batch's advance once they are handled.
    pub async fn read(&self, shards: &[i16], limit: usize) -> Result<ReadBatch, StoreError> {
        let schema = self.store.schema();
        let mut conn = self.store.pool().acquire().await.map_err(StoreError::Connect)?;
        let mut tx = conn.begin().await.map_err(StoreError::query("begin read"))?;
        // One snapshot for the xip list and the rows: REPEATABLE READ fixes it at the first query.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(StoreError::query("set read snapshot"))?;
        let in_progress: Vec<String> = sqlx::query_scalar(
            "SELECT coalesce(array_agg(x::text), '{}') FROM pg_snapshot_xip(pg_current_snapshot()) x",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::query("read snapshot"))?;
        let in_progress: BTreeSet<u64> = in_progress.iter().filter_map(|t| t.parse().ok()).collect();

        let states = load_states(&mut tx, schema, &self.consumer, shards).await?;
        // Shards with identical state are read together (in steady state: all of them).
        let mut groups: BTreeMap<CursorState, Vec<i16>> = BTreeMap::new();
        for (shard, state) in states {
            groups.entry(state).or_default().push(shard);
        }

        let mut batch = ReadBatch::default();
        for (state, group) in groups {
            let remaining = limit.saturating_sub(batch.events.len());
            if remaining == 0 {
                break;
            }
            let (events, next) = read_group(&mut tx, schema, &state, &group, &in_progress, remaining).await?;
            if next != state {
                batch.advance.updates.extend(group.iter().map(|&s| (s, next.clone())));
            }
            batch.events.extend(events);
        }
        tx.commit().await.map_err(StoreError::query("end read"))?;
        batch.events.sort_by_key(|e| e.position);
        Ok(batch)
    }

    /// Persists a batch's cursor move; call only after every event of the batch is handled.
    pub async fn commit(&self, advance: CursorAdvance) -> Result<(), StoreError> {
        if advance.is_empty() {
            return Ok(());
        }
        let mut shards = Vec::new();
        let mut positions = Vec::new();
        let mut watched = Vec::new();
        let mut late = Vec::new();
        let mut late_after = Vec::new();
        for (shard, state) in advance.updates {
            shards.push(shard);
            positions.push(state.position);
            watched.push(txid_literal(&state.watched));
            late.push(txid_literal(&state.late));
            late_after.push(state.late_after);
        }
        let statement = format!(
            "UPDATE {schema}.relay_cursors c SET position = u.position, \
                 watched_txids = u.watched::xid8[], late_txids = u.late::xid8[], \
                 late_after = u.late_after, updated_at = now() \
             FROM UNNEST($2::int2[], $3::int8[], $4::text[], $5::text[], $6::int8[]) \
                  AS u(shard, position, watched, late, late_after) \
             WHERE c.consumer = $1 AND c.shard = u.shard",
            schema = self.store.schema()
        );
        sqlx::query(sql(statement))
            .bind(&self.consumer)
            .bind(&shards)
            .bind(&positions)
            .bind(&watched)
            .bind(&late)
            .bind(&late_after)
            .execute(self.store.pool())
            .await
            .map_err(StoreError::query("advance relay cursors"))?;
        Ok(())
    }
}

fn txid_literal(set: &BTreeSet<u64>) -> String {
    let items: Vec<String> = set.iter().map(u64::to_string).collect();
    format!("{{{}}}", items.join(","))
}

/// A `relay_cursors` row: shard, position, watched, late, late_after (txids as text).
type CursorRow = (i16, i64, Vec<String>, Vec<String>, i64);

async fn load_states(
    conn: &mut PgConnection,
    schema: &SchemaName,
    consumer: &str,
    shards: &[i16],
) -> Result<Vec<(i16, CursorState)>, StoreError> {
    let statement = format!(
        "SELECT shard, position, watched_txids::text[], late_txids::text[], late_after \
         FROM {schema}.relay_cursors WHERE consumer = $1 AND shard = ANY($2)"
    );
    let rows: Vec<CursorRow> = sqlx::query_as(sql(statement))
        .bind(consumer)
        .bind(shards)
        .fetch_all(&mut *conn)
        .await
        .map_err(StoreError::query("load relay cursors"))?;
    let parse = |v: &[String]| v.iter().filter_map(|t| t.parse().ok()).collect();
    Ok(rows
        .into_iter()
        .map(|(shard, position, watched, late, late_after)| {
            let state = CursorState {
                position,
                watched: parse(&watched),
                late: parse(&late),
                late_after,
            };
            (shard, state)
        })
        .collect())
}

async fn read_group(
    conn: &mut PgConnection,
    schema: &SchemaName,
    state: &CursorState,
    shards: &[i16],
    in_progress: &BTreeSet<u64>,
    limit: usize,
) -> Result<(Vec<StoredEvent>, CursorState), StoreError> {
    let mid_scan = !state.late.is_empty();
    let late: BTreeSet<u64> = if mid_scan {
        state.late.clone()
    } else {
        state.watched.difference(in_progress).copied().collect()
    };
    let late_after = if mid_scan { state.late_after } else { 0 };
    let late_vec: Vec<String> = late.iter().map(u64::to_string).collect();

    let late_part = format!(
        "SELECT {EVENT_COLUMNS} FROM {schema}.events \
         WHERE txid = ANY($1::text[]::xid8[]) AND position > $2 AND position <= $3 AND shard = ANY($4)"
    );
    let statement = if mid_scan {
        format!("{late_part} ORDER BY position LIMIT $5")
    } else {
        format!(
            "({late_part}) UNION ALL \
             (SELECT {EVENT_COLUMNS} FROM {schema}.events WHERE position > $3 AND shard = ANY($4) \
              ORDER BY position LIMIT $5) \
             ORDER BY position LIMIT $5"
        )
    };
    let limit_i64 = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = sqlx::query(sql(statement))
        .bind(&late_vec)
        .bind(late_after)
        .bind(state.position)
        .bind(shards)
        .bind(limit_i64)
        .fetch_all(&mut *conn)
        .await
        .map_err(StoreError::query("read outbox events"))?;
    let events: Vec<StoredEvent> = rows
        .iter()
        .map(row_to_stored)
        .collect::<Result<_, _>>()
        .map_err(StoreError::query("decode outbox event"))?;

    let full = events.len() == limit;
    let last = events.last().map(|e| e.position);
    let next = match last {
        // Stopped inside the late rows: continue them next round before anything newer.
        Some(last) if full && last <= state.position => CursorState {
            position: state.position,
            watched: state.watched.clone(),
            late,
            late_after: last,
        },
        // Late rows done (and, outside a mid-scan, new rows up to `last` read).
        _ => {
            let watched_left: BTreeSet<u64> = state.watched.difference(&late).copied().collect();
            match last {
                Some(last) if !mid_scan && last > state.position => CursorState {
                    position: last,
                    watched: in_progress.clone(),
                    late: BTreeSet::new(),
                    late_after: 0,
                },
                _ => CursorState {
                    position: state.position,
                    watched: watched_left,
                    late: BTreeSet::new(),
                    late_after: 0,
                },
            }
        }
    };
    Ok((events, next))
}
