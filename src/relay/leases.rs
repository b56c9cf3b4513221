//! Shard leases and heartbeats: replicas of one publisher split the 64 shards evenly, each
//! renewing its leases every heartbeat; a dead worker's leases expire and live workers take
//! its shards over. Only the owner of a shard reads it and moves its cursor.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::store::outbox::SHARDS;
use crate::store::{Store, StoreError, sql};

/// Counters and state a worker reports in its heartbeat row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeartbeatReport {
    pub circuit_state: &'static str,
    pub published_total: i64,
    pub failed_total: i64,
    pub dead_lettered_total: i64,
    pub last_published_at: Option<DateTime<Utc>>,
}

/// One worker's view of the lease table.
#[derive(Clone, Debug)]
pub struct LeaseManager {
    store: Store,
    consumer: String,
    worker_id: String,
    lease: Duration,
}

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
        }
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Writes the heartbeat, renews owned leases, releases shards above the fair share and
    /// claims free or expired ones up to it. Returns the shards owned afterwards, sorted.
    pub async fn tick(&self, report: &HeartbeatReport) -> Result<Vec<i16>, StoreError> {
        let schema = self.store.schema();
        let pool = self.store.pool();
        let lease_ms = millis(self.lease);

        let heartbeat = format!(
            "INSERT INTO {schema}.worker_heartbeats (consumer, worker_id, circuit_state, published_total, \
                 failed_total, dead_lettered_total, last_published_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (consumer, worker_id) DO UPDATE SET last_seen_at = now(), \
                 circuit_state = EXCLUDED.circuit_state, published_total = EXCLUDED.published_total, \
                 failed_total = EXCLUDED.failed_total, dead_lettered_total = EXCLUDED.dead_lettered_total, \
                 last_published_at = coalesce(EXCLUDED.last_published_at, worker_heartbeats.last_published_at)"
        );
        sqlx::query(sql(heartbeat))
            .bind(&self.consumer)
            .bind(&self.worker_id)
            .bind(report.circuit_state)
            .bind(report.published_total)
            .bind(report.failed_total)
            .bind(report.dead_lettered_total)
            .bind(report.last_published_at)
            .execute(pool)
            .await
            .map_err(StoreError::query("write heartbeat"))?;

        let live = format!(
            "SELECT count(*) FROM {schema}.worker_heartbeats \
             WHERE consumer = $1 AND last_seen_at > now() - make_interval(secs => $2::float8 / 1000)"
        );
        let live_workers: i64 = sqlx::query_scalar(sql(live))
            .bind(&self.consumer)
            .bind(lease_ms as f64)
            .fetch_one(pool)
            .await
            .map_err(StoreError::query("count live workers"))?;
        let share = (i64::from(SHARDS) + live_workers.max(1) - 1) / live_workers.max(1);

        let renew = format!(
            "UPDATE {schema}.relay_cursors SET lease_expires_at = now() + make_interval(secs => $3::float8 / 1000) \
             WHERE consumer = $1 AND owner = $2 RETURNING shard"
        );
        let mut owned: Vec<i16> = sqlx::query_scalar(sql(renew))
            .bind(&self.consumer)
            .bind(&self.worker_id)
            .bind(lease_ms as f64)
            .fetch_all(pool)
            .await
            .map_err(StoreError::query("renew shard leases"))?;
        owned.sort_unstable();

        let owned_count = i64::try_from(owned.len()).unwrap_or(i64::MAX);
        if owned_count > share {
            let release: Vec<i16> = owned.split_off(usize::try_from(share).unwrap_or(0));
            let statement = format!(
                "UPDATE {schema}.relay_cursors SET owner = NULL, lease_expires_at = NULL \
                 WHERE consumer = $1 AND owner = $2 AND shard = ANY($3)"
            );
            sqlx::query(sql(statement))
                .bind(&self.consumer)
                .bind(&self.worker_id)
                .bind(&release)
                .execute(pool)
                .await
                .map_err(StoreError::query("release shard leases"))?;
            tracing::info!(worker = %self.worker_id, released = ?release, "released shards above fair share");
        } else if owned_count < share {
            let claim = format!(
                "UPDATE {schema}.relay_cursors SET owner = $2, \
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

        let record =
            format!("UPDATE {schema}.worker_heartbeats SET owned_shards = $3 WHERE consumer = $1 AND worker_id = $2");
        sqlx::query(sql(record))
            .bind(&self.consumer)
            .bind(&self.worker_id)
            .bind(&owned)
            .execute(pool)
            .await
            .map_err(StoreError::query("record owned shards"))?;
        Ok(owned)
    }

    /// Gives every shard back and removes the heartbeat, so others take over at once.
    pub async fn release_all(&self) -> Result<(), StoreError> {
        let schema = self.store.schema();
        let statement = format!(
            "UPDATE {schema}.relay_cursors SET owner = NULL, lease_expires_at = NULL WHERE consumer = $1 AND owner = $2"
        );
        sqlx::query(sql(statement))
            .bind(&self.consumer)
            .bind(&self.worker_id)
            .execute(self.store.pool())
            .await
            .map_err(StoreError::query("release shard leases"))?;
        let statement = format!("DELETE FROM {schema}.worker_heartbeats WHERE consumer = $1 AND worker_id = $2");
        sqlx::query(sql(statement))
            .bind(&self.consumer)
            .bind(&self.worker_id)
            .execute(self.store.pool())
            .await
            .map_err(StoreError::query("remove heartbeat"))?;
        Ok(())
    }
}
