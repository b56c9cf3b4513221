//! Shard leases and heartbeats: workers of one consumer (relay replicas of a publisher, or
//! in-process handler dispatchers of several service replicas) split the 64 shards evenly,
//! each renewing its leases every heartbeat; a dead worker's leases expire and live workers
//! take its shards over. Only the owner of a shard reads it and moves its cursor.
//!
//! Every claim bumps the shard's `lease_epoch`; the outbox reader fences cursor writes by
//! owner and epoch, so a worker that lost a shard mid-round cannot move its cursor. Shards
//! above the fair share are given back only between rounds (never while a round may still
//! be sending them), and every statement that locks several cursor rows locks them in shard
//! order, as the reader's commit does, so they cannot deadlock each other.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::outbox::SHARDS;
use super::{Store, StoreError, sql};

/// Counters and state a worker reports in its heartbeat row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeartbeatReport {
    pub circuit_state: &'static str,
    pub published_total: i64,
    pub failed_total: i64,
    pub dead_lettered_total: i64,
    pub last_published_at: Option<DateTime<Utc>>,
    /// Polls instead of listening: writers skip the NOTIFY while every running worker of the
    /// schema polls (migration 0008).
    pub polls: bool,
}

/// One worker's view of the lease table.
#[derive(Debug)]
pub struct LeaseManager {
    store: Store,
    consumer: String,
    worker_id: String,
    lease: Duration,
    /// Shards above the fair share found by a tick during a round; given back by
    /// [`LeaseManager::release_pending`] before the next round starts.
    pending_release: Mutex<Vec<i16>>,
    /// The shard list last written to the heartbeat row, so an unchanged one costs no write.
    recorded: Mutex<Option<Vec<i16>>>,
}

/// Heartbeat rows of workers stopped or silent this long are removed by a live worker.
const STALE_ROWS_AFTER: &str = "10 minutes";

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl LeaseManager {
    pub fn new(store: Store, consumer: impl Into<String>, worker_id: impl Into<String>, lease: Duration) -> Self {
        Self {
            store,
            consumer: consumer.into(),
            worker_id: worker_id.into(),
            lease,
            pending_release: Mutex::new(Vec::new()),
            recorded: Mutex::new(None),
        }
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Between rounds: writes the heartbeat, renews owned leases, releases shards above the
    /// fair share and claims free or expired ones up to it. Returns the shards owned
    /// afterwards, sorted.
    pub async fn tick(&self, report: &HeartbeatReport) -> Result<Vec<i16>, StoreError> {
        self.tick_inner(report, true).await
    }

    /// While a round may be sending: like [`LeaseManager::tick`], but shards above the fair
    /// share are kept (and returned) until [`LeaseManager::release_pending`] runs between rounds.
    pub async fn tick_during_round(&self, report: &HeartbeatReport) -> Result<Vec<i16>, StoreError> {
        self.tick_inner(report, false).await
    }

    /// Whether a tick during a round left shards to give back ([`LeaseManager::release_pending`]).
    pub fn has_pending_release(&self) -> bool {
        self.pending_release.lock().is_ok_and(|p| !p.is_empty())
    }

    /// Gives back the shards a tick during a round found above the fair share. Call between
    /// rounds; returns the shards released.
    pub async fn release_pending(&self) -> Result<Vec<i16>, StoreError> {
        let pending = match self.pending_release.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => return Ok(Vec::new()),
        };
        if pending.is_empty() {
            return Ok(pending);
        }
        self.release(&pending).await
    }

    async fn release(&self, shards: &[i16]) -> Result<Vec<i16>, StoreError> {
        let schema = self.store.schema();
        let statement = format!(
            "WITH mine AS MATERIALIZED ( \
                 SELECT shard FROM {schema}.relay_cursors WHERE consumer = $1 AND owner = $2 AND shard = ANY($3) \
                 ORDER BY shard FOR UPDATE) \
             UPDATE {schema}.relay_cursors c SET owner = NULL, lease_expires_at = NULL FROM mine \
             WHERE c.consumer = $1 AND c.shard = mine.shard RETURNING c.shard"
        );
        let mut released: Vec<i16> = sqlx::query_scalar(sql(statement))
            .bind(&self.consumer)
            .bind(&self.worker_id)
            .bind(shards)
            .fetch_all(self.store.pool())
            .await
            .map_err(StoreError::query("release shard leases"))?;
        released.sort_unstable();
        if !released.is_empty() {
            tracing::info!(worker = %self.worker_id, released = ?released, "released shards above fair share");
        }
        Ok(released)
    }

    async fn tick_inner(&self, report: &HeartbeatReport, may_release: bool) -> Result<Vec<i16>, StoreError> {
        let schema = self.store.schema();
        let pool = self.store.pool();
        let lease_ms = millis(self.lease);

        // One round trip renews the leases, writes the heartbeat and counts the live workers,
        // so a slow database delays a renewal by one statement, not four. The renewal needs no
        // earlier result, and a lease that runs out while its holder is merely slow hands the
        // shards to another worker mid-batch (re-sends), so it comes first. The live count reads
        // the snapshot before this statement's own heartbeat write, hence "others + 1".
        let renew = format!(
            "WITH mine AS MATERIALIZED ( \
                 SELECT shard FROM {schema}.relay_cursors WHERE consumer = $1 AND owner = $2 \
                 ORDER BY shard FOR UPDATE), \
             renewed AS ( \
                 UPDATE {schema}.relay_cursors c \
                 SET lease_expires_at = now() + make_interval(secs => $3::float8 / 1000) \
                 FROM mine WHERE c.consumer = $1 AND c.shard = mine.shard RETURNING c.shard), \
             gone AS ( \
                 DELETE FROM {schema}.worker_heartbeats WHERE consumer = $1 AND worker_id <> $2 \
                     AND coalesce(stopped_at, last_seen_at) < now() - interval '{STALE_ROWS_AFTER}' \
                 RETURNING last_published_at), \
             beat AS ( \
                 INSERT INTO {schema}.worker_heartbeats (consumer, worker_id, circuit_state, published_total, \
                     failed_total, dead_lettered_total, last_published_at, wake_by_notify) \
                 VALUES ($1, $2, $4, $5, $6, $7, greatest($8, (SELECT max(last_published_at) FROM gone)), NOT $9) \
                 ON CONFLICT (consumer, worker_id) DO UPDATE SET last_seen_at = now(), stopped_at = NULL, \
                     wake_by_notify = EXCLUDED.wake_by_notify, \
                     circuit_state = EXCLUDED.circuit_state, published_total = EXCLUDED.published_total, \
                     failed_total = EXCLUDED.failed_total, dead_lettered_total = EXCLUDED.dead_lettered_total, \
                     last_published_at = greatest(EXCLUDED.last_published_at, worker_heartbeats.last_published_at) \
                 RETURNING 1) \
             SELECT (SELECT count(*) FROM {schema}.worker_heartbeats \
                     WHERE consumer = $1 AND worker_id <> $2 AND stopped_at IS NULL \
                       AND last_seen_at > now() - make_interval(secs => $3::float8 / 1000)) \
                    + (SELECT count(*) FROM beat), \
                    coalesce((SELECT array_agg(shard ORDER BY shard) FROM renewed), '{{}}'::smallint[])"
        );
        let (live_workers, mut owned): (i64, Vec<i16>) = sqlx::query_as(sql(renew))
            .bind(&self.consumer)
            .bind(&self.worker_id)
            .bind(lease_ms as f64)
            .bind(report.circuit_state)
            .bind(report.published_total)
            .bind(report.failed_total)
            .bind(report.dead_lettered_total)
            .bind(report.last_published_at)
            .bind(report.polls)
            .fetch_one(pool)
            .await
            .map_err(StoreError::query("renew shard leases and write heartbeat"))?;
        let share = (i64::from(SHARDS) + live_workers.max(1) - 1) / live_workers.max(1);

        let owned_count = i64::try_from(owned.len()).unwrap_or(i64::MAX);
        let surplus: Vec<i16> = if owned_count > share {
            owned[usize::try_from(share).unwrap_or(0)..].to_vec()
        } else {
            Vec::new()
        };
        if may_release {
            // A stale surplus noted during an earlier round is replaced by this one.
            if let Ok(mut p) = self.pending_release.lock() {
                p.clear();
            }
            if !surplus.is_empty() {
                let released = self.release(&surplus).await?;
                owned.retain(|s| !released.contains(s));
            }
        } else if let Ok(mut p) = self.pending_release.lock() {
            *p = surplus;
        }
        if owned_count < share {
            let claim = format!(
                "UPDATE {schema}.relay_cursors SET owner = $2, lease_epoch = lease_epoch + 1, \
                     lease_expires_at = now() + make_interval(secs => $3::float8 / 1000) \
                 WHERE consumer = $1 AND shard IN ( \
                     SELECT shard FROM {schema}.relay_cursors \
                     WHERE consumer = $1 AND (owner IS NULL OR lease_expires_at < now()) \
                     ORDER BY shard LIMIT $4 FOR UPDATE SKIP LOCKED) \
                 RETURNING shard"
            );
            let claimed: Vec<i16> = sqlx::query_scalar(sql(claim))
                .bind(&self.consumer)
                .bind(&self.worker_id)
                .bind(lease_ms as f64)
                .bind(share - owned_count)
                .fetch_all(pool)
                .await
                .map_err(StoreError::query("claim shard leases"))?;
            if !claimed.is_empty() {
                tracing::info!(worker = %self.worker_id, claimed = ?claimed, "claimed shards");
            }
            owned.extend(claimed);
            owned.sort_unstable();
        }

        if self
            .recorded
            .lock()
            .is_ok_and(|r| r.as_deref() == Some(owned.as_slice()))
        {
            return Ok(owned);
        }
        let record =
            format!("UPDATE {schema}.worker_heartbeats SET owned_shards = $3 WHERE consumer = $1 AND worker_id = $2");
        sqlx::query(sql(record))
            .bind(&self.consumer)
            .bind(&self.worker_id)
            .bind(&owned)
            .execute(pool)
            .await
            .map_err(StoreError::query("record owned shards"))?;
        if let Ok(mut r) = self.recorded.lock() {
            *r = Some(owned.clone());
        }
        Ok(owned)
    }

    /// Gives every shard back and marks the heartbeat stopped, so others take over at once.
    pub async fn release_all(&self) -> Result<(), StoreError> {
        let schema = self.store.schema();
        let statement = format!(
            "WITH mine AS MATERIALIZED ( \
                 SELECT shard FROM {schema}.relay_cursors WHERE consumer = $1 AND owner = $2 \
                 ORDER BY shard FOR UPDATE) \
             UPDATE {schema}.relay_cursors c SET owner = NULL, lease_expires_at = NULL FROM mine \
             WHERE c.consumer = $1 AND c.shard = mine.shard"
        );
        sqlx::query(sql(statement))
            .bind(&self.consumer)
            .bind(&self.worker_id)
            .execute(self.store.pool())
            .await
            .map_err(StoreError::query("release shard leases"))?;
        // Marked stopped rather than deleted: it no longer counts as live, and its last publish
        // time stays for the status until a live worker's heartbeat folds it in (see `tick`).
        let statement = format!(
            "UPDATE {schema}.worker_heartbeats SET stopped_at = now(), owned_shards = '{{}}' \
             WHERE consumer = $1 AND worker_id = $2"
        );
        sqlx::query(sql(statement))
            .bind(&self.consumer)
            .bind(&self.worker_id)
            .execute(self.store.pool())
            .await
            .map_err(StoreError::query("mark heartbeat stopped"))?;
        if let Ok(mut r) = self.recorded.lock() {
            *r = None;
        }
        Ok(())
    }
}
