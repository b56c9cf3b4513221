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

use sqlx::PgConnection;

use super::events::{EVENT_COLUMNS, StoredEvent, row_to_stored};
use super::{SchemaName, Store, StoreError, begin_detached, sql};

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

/// What committing a batch writes back: the new state of each shard read, with the lease
/// epoch the shard was read under.
#[derive(Clone, Debug, Default)]
pub struct CursorAdvance {
    updates: Vec<(i16, CursorState, i64)>,
}

/// What a commit did. A refused shard was lost to another worker (or released) after it was
/// read: its cursor stays where the new owner has it, and this worker must stop reading it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitOutcome {
    pub refused: Vec<i16>,
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
        self.read_with(shards, limit, None).await
    }

    /// Reads the batch that follows `previous` (read but not yet committed) while `previous`
    /// is still being delivered: the cursors of the shards it moves start where its advance
    /// leaves them. Commit `previous` first, then this batch's advance, which carries the
    /// lease epochs `previous` was read under, so a shard lost in between is refused for both.
    pub async fn read_after(
        &self,
        shards: &[i16],
        limit: usize,
        previous: &CursorAdvance,
    ) -> Result<ReadBatch, StoreError> {
        self.read_with(shards, limit, Some(previous)).await
    }

    async fn read_with(
        &self,
        shards: &[i16],
        limit: usize,
        previous: Option<&CursorAdvance>,
    ) -> Result<ReadBatch, StoreError> {
        let schema = self.store.schema();
        // One snapshot for the xip list and the rows: REPEATABLE READ fixes it at the first
        // query. Set in BEGIN itself rather than by a SET after it: each statement here is a
        // round trip every relay round pays, idle or not (the commit → ack floor).
        let mut tx = begin_detached(
            self.store.pool(),
            Some("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"),
        )
        .await
        .map_err(StoreError::query("begin read"))?;
        let (snapshot, mut states) =
            snapshot_and_cursors(&mut tx, schema, &self.consumer, shards, self.owner.as_deref()).await?;
        if let Some(previous) = previous {
            for (shard, state, epoch) in &mut states {
                if let Some((_, moved, read_under)) = previous.updates.iter().find(|(s, _, _)| s == shard) {
                    *state = moved.clone();
                    *epoch = *read_under;
                }
            }
        }
        // Shards with identical state are read together (in steady state: all of them).
        let mut groups: BTreeMap<CursorState, Vec<(i16, i64)>> = BTreeMap::new();
        for (shard, state, epoch) in states {
            groups.entry(state).or_default().push((shard, epoch));
        }

        let mut batch = ReadBatch::default();
        for (state, group) in groups {
            let remaining = limit.saturating_sub(batch.events.len());
            if remaining == 0 {
                break;
            }
            let group_shards: Vec<i16> = group.iter().map(|&(s, _)| s).collect();
            let (events, next) = read_group(&mut tx, schema, &state, &group_shards, &snapshot, remaining).await?;
            if next != state {
                batch
                    .advance
                    .updates
                    .extend(group.iter().map(|&(s, epoch)| (s, next.clone(), epoch)));
            }
            batch.events.extend(events);
        }
        tx.commit().await.map_err(StoreError::query("end read"))?;
        batch.events.sort_by_key(|e| e.position);
        Ok(batch)
    }

    /// Persists a batch's cursor move; call only after every event of the batch is handled.
    /// With an owner, a shard's move is refused unless this worker still holds the lease it
    /// read the shard under (same owner, same epoch).
    pub async fn commit(&self, advance: CursorAdvance) -> Result<CommitOutcome, StoreError> {
        if advance.is_empty() {
            return Ok(CommitOutcome::default());
        }
        let mut shards = Vec::new();
        let mut positions = Vec::new();
        let mut watched = Vec::new();
        let mut watch_from = Vec::new();
        let mut late = Vec::new();
        let mut late_after = Vec::new();
        let mut epochs = Vec::new();
        for (shard, state, epoch) in advance.updates {
            epochs.push(epoch);
            shards.push(shard);
            positions.push(state.position);
            watched.push(txid_literal(&state.watched));
            watch_from.push(state.watch_from.to_string());
            late.push(txid_literal(&state.late));
            late_after.push(state.late_after);
        }
        // Rows are locked in shard order first, as lease renewal does (`store::leases`): two
        // statements locking the same cursor rows in different orders deadlock.
        let statement = format!(
            "WITH u AS MATERIALIZED ( \
                 SELECT * FROM UNNEST($2::int2[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::int8[], \
                                      $9::int8[]) AS u(shard, position, watched, watch_from, late, late_after, epoch)), \
             locked AS MATERIALIZED ( \
                 SELECT c.shard FROM {schema}.relay_cursors c JOIN u ON u.shard = c.shard \
                 WHERE c.consumer = $1 AND ($8::text IS NULL OR c.owner = $8) AND c.lease_epoch = u.epoch \
                 ORDER BY c.shard FOR UPDATE OF c) \
             UPDATE {schema}.relay_cursors c SET position = u.position, \
                 watched_txids = u.watched::xid8[], watch_from = u.watch_from::xid8, \
                 late_txids = u.late::xid8[], late_after = u.late_after, updated_at = now() \
             FROM u JOIN locked USING (shard) \
             WHERE c.consumer = $1 AND c.shard = u.shard \
             RETURNING c.shard",
            schema = self.store.schema()
        );
        let moved: Vec<i16> = sqlx::query_scalar(sql(statement))
            .bind(&self.consumer)
            .bind(&shards)
            .bind(&positions)
            .bind(&watched)
            .bind(&watch_from)
            .bind(&late)
            .bind(&late_after)
            .bind(&self.owner)
            .bind(&epochs)
            .fetch_all(self.store.pool())
            .await
            .map_err(StoreError::query("advance relay cursors"))?;
        let refused: Vec<i16> = shards.into_iter().filter(|s| !moved.contains(s)).collect();
        if !refused.is_empty() {
            tracing::warn!(consumer = %self.consumer, ?refused, "cursor move refused: shards no longer leased by this worker");
        }
        Ok(CommitOutcome { refused })
    }
}

fn txid_literal(set: &BTreeSet<u64>) -> String {
    let items: Vec<String> = set.iter().map(u64::to_string).collect();
    format!("{{{}}}", items.join(","))
}

/// The snapshot's xmax and xip list (as text), then a `relay_cursors` row — shard, position,
/// watched, watch_from, late, late_after (txids as text), lease epoch — or NULLs when the
/// worker holds none of the shards.
type SnapshotCursorRow = (
    String,
    String,
    Vec<String>,
    Option<i16>,
    Option<i64>,
    Option<Vec<String>>,
    Option<String>,
    Option<Vec<String>>,
    Option<i64>,
    Option<i64>,
);

/// What the reading transaction's snapshot says about other transactions.
struct Snapshot {
    /// Transaction ids at or above this had not finished.
    xmax: u64,
    /// Transaction ids below `xmax` still running.
    in_progress: BTreeSet<u64>,
}

/// Takes the read's snapshot and loads the cursors in one statement (each statement of the
/// read is a round trip every relay round pays, idle or not: the commit → ack floor). It also
/// plans the rest of the transaction per execution: a generic plan for the range queries
/// cannot see that the late set is small and scans the history up to the cursor
/// (`set_config(.., true)` is `SET LOCAL`). With an owner, only shards this worker leases now
/// are loaded: a shard lost since the caller last looked is not read at all.
async fn snapshot_and_cursors(
    conn: &mut PgConnection,
    schema: &SchemaName,
    consumer: &str,
    shards: &[i16],
    owner: Option<&str>,
) -> Result<(Snapshot, Vec<(i16, CursorState, i64)>), StoreError> {
    let statement = format!(
        "SELECT set_config('plan_cache_mode', 'force_custom_plan', true), \
                pg_snapshot_xmax(q.s)::text, \
                coalesce((SELECT array_agg(x::text) FROM pg_snapshot_xip(q.s) x), '{{}}'), \
                c.shard, c.position, c.watched_txids::text[], c.watch_from::text, c.late_txids::text[], \
                c.late_after, c.lease_epoch \
         FROM (SELECT pg_current_snapshot() AS s) q \
         LEFT JOIN {schema}.relay_cursors c \
           ON c.consumer = $1 AND c.shard = ANY($2) AND ($3::text IS NULL OR c.owner = $3)"
    );
    let rows: Vec<SnapshotCursorRow> = sqlx::query_as(sql(statement))
        .bind(consumer)
        .bind(shards)
        .bind(owner)
        .fetch_all(&mut *conn)
        .await
        .map_err(StoreError::query("read snapshot and relay cursors"))?;
    let Some((_, xmax, in_progress, ..)) = rows.first() else {
        // Cannot happen (the LEFT JOIN keeps the one snapshot row), but never guess a snapshot.
        return Err(StoreError::Query {
            action: "read snapshot and relay cursors",
            source: sqlx::Error::RowNotFound,
        });
    };
    let snapshot = Snapshot {
        xmax: parse_txid(xmax)?,
        in_progress: parse_txids(in_progress)?,
    };
    let mut states = Vec::with_capacity(rows.len());
    for (_, _, _, shard, position, watched, watch_from, late, late_after, epoch) in rows {
        let (Some(shard), Some(position), Some(watched), Some(watch_from), Some(late), Some(late_after), Some(epoch)) =
            (shard, position, watched, watch_from, late, late_after, epoch)
        else {
            continue; // the LEFT JOIN's row when no cursor matched
        };
        let state = CursorState {
            position,
            watched: parse_txids(&watched)?,
            watch_from: parse_txid(&watch_from)?,
            late: parse_txids(&late)?,
            late_after,
        };
        states.push((shard, state, epoch));
    }
    Ok((snapshot, states))
}

/// A transaction id as PostgreSQL prints an `xid8`. Anything else means we misread the
/// snapshot or a cursor: guessing a value there could skip or repeat events, so it is an error.
fn parse_txid(text: &str) -> Result<u64, StoreError> {
    text.parse().map_err(|_| StoreError::InvalidTxid(text.to_owned()))
}

fn parse_txids(texts: &[String]) -> Result<BTreeSet<u64>, StoreError> {
    texts.iter().map(|t| parse_txid(t)).collect()
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
        // Entering the scan settles what this snapshot knows, exactly as finishing the late
        // rows at once would: the late transactions leave the watch list and `watch_from`
        // moves to xmax. Keeping the old `watch_from` here found the same finished
        // transactions again after the scan and restarted it forever.
        Some(last) if full && last <= state.position => {
            let (watched, watch_from) = if mid_scan {
                (state.watched.clone(), state.watch_from)
            } else {
                still_watched(state, &late, snapshot)
            };
            CursorState {
                position: state.position,
                watched,
                watch_from,
                late,
                late_after: last,
            }
        }
        // New rows up to `last` read: whatever was running at this snapshot is watched now.
        Some(last) if !mid_scan && last > state.position => CursorState {
            position: last,
            watched: snapshot.in_progress.clone(),
            watch_from: snapshot.xmax,
            late: BTreeSet::new(),
            late_after: 0,
        },
        // Late rows done, cursor unchanged: keep watching only what still runs. A mid-scan
        // settled its watch list when it started.
        _ => {
            let (watched, watch_from) = if mid_scan {
                (state.watched.difference(&late).copied().collect(), state.watch_from)
            } else {
                still_watched(state, &late, snapshot)
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

/// What stays watched once `late` is being read: the watched transactions `snapshot` still
/// sees running, and every transaction from the new xmax up.
fn still_watched(state: &CursorState, late: &BTreeSet<u64>, snapshot: &Snapshot) -> (BTreeSet<u64>, u64) {
    let mut watched: BTreeSet<u64> = state
        .watched
        .iter()
        .filter(|t| !late.contains(t) && snapshot.in_progress.contains(t))
        .copied()
        .collect();
    watched.extend(snapshot.in_progress.iter().filter(|&&t| t >= state.watch_from));
    (watched, snapshot.xmax.max(state.watch_from))
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
        finished.extend(parse_txids(&txids)?);
    }
    Ok(finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_id_that_does_not_parse_is_an_error_not_a_guess() {
        assert_eq!(parse_txid("742").unwrap(), 742);
        for bad in ["", "-1", "7x", "18446744073709551616"] {
            let err = parse_txid(bad).unwrap_err().to_string();
            assert!(err.contains("is not an xid8"), "{bad}: {err}");
        }
        assert!(parse_txids(&["1".into(), "oops".into()]).is_err());
    }

    #[test]
    fn starting_a_late_scan_settles_the_watch_list_at_the_snapshots_xmax() {
        let state = CursorState {
            position: 100,
            watched: [10, 11, 12].into(),
            watch_from: 20,
            ..CursorState::default()
        };
        // 11 finished (late), 12 and 25 still run, xmax moved on to 30; 22 finished.
        let snapshot = Snapshot {
            xmax: 30,
            in_progress: [12, 25].into(),
        };
        let late: BTreeSet<u64> = [11, 22].into();
        let (watched, watch_from) = still_watched(&state, &late, &snapshot);
        assert_eq!(watched, [12, 25].into(), "10 is gone (not running), 25 newly watched");
        assert_eq!(watch_from, 30, "finished ids below xmax are never looked up again");
    }
}
