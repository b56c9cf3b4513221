//! Gap-free reading of unpublished events.
//!
//! Positions come from a sequence, so a transaction holding a lower position can commit after
//! one holding a higher position; a plain "position > cursor" reader would skip it forever.
//! Instead each (consumer, shard) cursor remembers which transactions were still in progress
//! when the cursor last moved: the snapshot's xip list, plus every transaction id at or above
//! the snapshot's xmax (running transactions there are not listed in xip). Only those can still
//! commit rows at or below the cursor. Once one finishes, its rows ("late rows") are read in
//! position order together with the new rows above the cursor, so for every aggregate the
//! stream stays in commit order (the store's trigger makes position order equal commit order
//! per aggregate). A long-running transaction elsewhere only sits in the watch list; it never
//! holds the cursor back.
//!
//! State machine per cursor (C = position, W = watched txids and all txids >= watch_from,
//! F = late txids being read, L = late_after):
//! - F empty: F := finished members of W (explicit ones not in xip; in [watch_from, xmax) those
//!   not in xip that own rows at or below C); read late rows of F with position <= C, plus rows above C.
//!   If the batch ended at or below C, keep reading F from L := last position (mid-scan).
//!   Otherwise C := last position (if any) and W := (xip, xmax) of the snapshot.
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
    watch_from: u64,
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
    /// When set, cursors are only moved for shards this worker still leases.
    owner: Option<String>,
}

impl OutboxReader {
    pub fn new(store: Store, consumer: impl Into<String>) -> Self {
        Self {
            store,
            consumer: consumer.into(),
            owner: None,
        }
    }

    /// Guards cursor moves by shard ownership (relay replicas sharing the shards).
    pub fn with_owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
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
        // A generic plan for the range queries below cannot see that the late set is small and
        // scans the history up to the cursor; plan every read for its own parameters.
        sqlx::query("SET LOCAL plan_cache_mode = force_custom_plan")
            .execute(&mut *tx)
            .await
            .map_err(StoreError::query("set plan cache mode"))?;
        let (xmax, in_progress): (String, Vec<String>) = sqlx::query_as(
            "SELECT pg_snapshot_xmax(s)::text, \
                    coalesce((SELECT array_agg(x::text) FROM pg_snapshot_xip(s) x), '{}') \
             FROM (SELECT pg_current_snapshot() AS s) q",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::query("read snapshot"))?;
        let snapshot = Snapshot {
            xmax: xmax.parse().unwrap_or(u64::MAX),
            in_progress: in_progress.iter().filter_map(|t| t.parse().ok()).collect(),
        };

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
            let (events, next) = read_group(&mut tx, schema, &state, &group, &snapshot, remaining).await?;
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
        let mut watch_from = Vec::new();
        let mut late = Vec::new();
        let mut late_after = Vec::new();
        for (shard, state) in advance.updates {
            shards.push(shard);
            positions.push(state.position);
            watched.push(txid_literal(&state.watched));
            watch_from.push(state.watch_from.to_string());
            late.push(txid_literal(&state.late));
            late_after.push(state.late_after);
        }
        let statement = format!(
            "UPDATE {schema}.relay_cursors c SET position = u.position, \
                 watched_txids = u.watched::xid8[], watch_from = u.watch_from::xid8, \
                 late_txids = u.late::xid8[], late_after = u.late_after, updated_at = now() \
             FROM UNNEST($2::int2[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::int8[]) \
                  AS u(shard, position, watched, watch_from, late, late_after) \
             WHERE c.consumer = $1 AND c.shard = u.shard AND ($8::text IS NULL OR c.owner = $8)",
            schema = self.store.schema()
        );
        sqlx::query(sql(statement))
            .bind(&self.consumer)
            .bind(&shards)
            .bind(&positions)
            .bind(&watched)
            .bind(&watch_from)
            .bind(&late)
            .bind(&late_after)
            .bind(&self.owner)
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

/// A `relay_cursors` row: shard, position, watched, watch_from, late, late_after (txids as text).
type CursorRow = (i16, i64, Vec<String>, String, Vec<String>, i64);

/// What the reading transaction's snapshot says about other transactions.
struct Snapshot {
    /// Transaction ids at or above this had not finished.
    xmax: u64,
    /// Transaction ids below `xmax` still running.
    in_progress: BTreeSet<u64>,
}

async fn load_states(
    conn: &mut PgConnection,
    schema: &SchemaName,
    consumer: &str,
    shards: &[i16],
) -> Result<Vec<(i16, CursorState)>, StoreError> {
    let statement = format!(
        "SELECT shard, position, watched_txids::text[], watch_from::text, late_txids::text[], late_after \
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
        .map(|(shard, position, watched, watch_from, late, late_after)| {
            let state = CursorState {
                position,
                watched: parse(&watched),
                watch_from: watch_from.parse().unwrap_or(0),
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
    snapshot: &Snapshot,
    limit: usize,
) -> Result<(Vec<StoredEvent>, CursorState), StoreError> {
    let mid_scan = !state.late.is_empty();
    let late: BTreeSet<u64> = if mid_scan {
        state.late.clone()
    } else {
        finished_watched(conn, schema, state, shards, snapshot).await?
    };
    let late_after = if mid_scan { state.late_after } else { 0 };
    let late_vec: Vec<String> = late.iter().map(u64::to_string).collect();

    let late_part = format!(
        "SELECT {EVENT_COLUMNS} FROM {schema}.events \
         WHERE txid = ANY($1::text[]::xid8[]) AND position > $2 AND position <= $3 AND shard = ANY($4)"
    );
    let statement = if mid_scan {
        format!("{late_part} ORDER BY position LIMIT $5")
    } else if late.is_empty() {
        // The common case: nothing late, only rows above the cursor ($1 and $2 unused).
        format!(
            "SELECT {EVENT_COLUMNS} FROM {schema}.events \
             WHERE position > $3 AND shard = ANY($4) AND cardinality($1::text[]) = 0 AND $2::int8 >= 0 \
             ORDER BY position LIMIT $5"
        )
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
            late,
            late_after: last,
            ..state.clone()
        },
        // New rows up to `last` read: whatever was running at this snapshot is watched now.
        Some(last) if !mid_scan && last > state.position => CursorState {
            position: last,
            watched: snapshot.in_progress.clone(),
            watch_from: snapshot.xmax,
            late: BTreeSet::new(),
            late_after: 0,
        },
        // Late rows done, cursor unchanged: keep watching only what still runs.
        _ => {
            let mut watched: BTreeSet<u64> = state.watched.difference(&late).copied().collect();
            if !mid_scan {
                watched.retain(|t| snapshot.in_progress.contains(t));
                watched.extend(snapshot.in_progress.iter().filter(|&&t| t >= state.watch_from));
            }
            let watch_from = if mid_scan {
                state.watch_from
            } else {
                snapshot.xmax.max(state.watch_from)
            };
            CursorState {
                position: state.position,
                watched,
                watch_from,
                late: BTreeSet::new(),
                late_after: 0,
            }
        }
    };
    Ok((events, next))
}

/// Watched transactions that have finished by `snapshot` and may own rows at or below the cursor.
async fn finished_watched(
    conn: &mut PgConnection,
    schema: &SchemaName,
    state: &CursorState,
    shards: &[i16],
    snapshot: &Snapshot,
) -> Result<BTreeSet<u64>, StoreError> {
    let mut finished: BTreeSet<u64> = state
        .watched
        .iter()
        .filter(|t| !snapshot.in_progress.contains(t) && **t < snapshot.xmax)
        .copied()
        .collect();
    if state.position > 0 && state.watch_from < snapshot.xmax {
        // Transactions in [watch_from, xmax) that finished; only committed ones have visible rows.
        let statement = format!(
            "SELECT DISTINCT txid::text FROM {schema}.events \
             WHERE txid >= $1::text::xid8 AND txid < $2::text::xid8 AND position <= $3 AND shard = ANY($4)"
        );
        let txids: Vec<String> = sqlx::query_scalar(sql(statement))
            .bind(state.watch_from.to_string())
            .bind(snapshot.xmax.to_string())
            .bind(state.position)
            .bind(shards)
            .fetch_all(&mut *conn)
            .await
            .map_err(StoreError::query("find late transactions"))?;
        finished.extend(txids.iter().filter_map(|t| t.parse::<u64>().ok()));
    }
    Ok(finished)
}
