//! `replay_events`: re-delivers a selected range of the event store to the registered
//! handlers (or only counts it, in a dry run), checkpointed so an interrupted replay resumes.
//!
//! A replay reads by position, so it first fixes its end and waits for the writers that may
//! still commit below it ([`events::settled_end`]): a checkpoint never passes a position whose
//! transaction was still in flight, which would skip that event for good.

use chrono::{DateTime, Utc};

use super::{InventoryEventPublisher, PublishError};
use crate::store::events::{self, EventRange};
use crate::store::{StoreError, sql};

/// What to replay.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplayOptions {
    /// Checkpoint key: a replay with the same id resumes after its last checkpoint.
    pub replay_id: String,
    pub range: EventRange,
    /// Count matching events without delivering them.
    pub dry_run: bool,
    /// Events read per round (and per checkpoint).
    pub batch_size: i64,
}

/// Outcome of a replay.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayResult {
    pub matched: u64,
    pub replayed: u64,
    pub failed: u64,
    pub last_position: Option<i64>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl InventoryEventPublisher {
    /// Replays the selected events in position order to the registered handlers.
    pub async fn replay_events(&self, options: &ReplayOptions) -> Result<ReplayResult, PublishError> {
        let schema = self.store.schema();
        let pool = self.store.pool();
        let started_at = Utc::now();
        let upsert = format!(
            "INSERT INTO {schema}.replay_checkpoints (replay_id) VALUES ($1) ON CONFLICT (replay_id) DO UPDATE \
             SET updated_at = now() RETURNING position, matched, replayed, failed"
        );
        let (resume_at, matched, replayed, failed): (i64, i64, i64, i64) = sqlx::query_as(sql(upsert))
            .bind(&options.replay_id)
            .fetch_one(pool)
            .await
            .map_err(StoreError::query("load replay checkpoint"))?;
        let mut result = ReplayResult {
            matched: matched.unsigned_abs(),
            replayed: replayed.unsigned_abs(),
            failed: failed.unsigned_abs(),
            last_position: (resume_at > 0).then_some(resume_at),
            started_at: Some(started_at),
            completed_at: None,
        };
        let mut range = options.range.clone();
        range.after_position = Some(range.after_position.unwrap_or(0).max(resume_at));
        range.to_position = Some(events::settled_end(pool, schema, range.to_position).await?);
        let batch_size = options.batch_size.clamp(1, 10_000);
        loop {
            let mut conn = pool.acquire().await.map_err(StoreError::Connect)?;
            let batch = events::read_range(&mut conn, schema, &range, batch_size).await?;
            drop(conn);
            let Some(last) = batch.last().map(|e| e.position) else {
                break;
            };
            for stored in &batch {
                result.matched += 1;
                if options.dry_run {
                    continue;
                }
                match self.invoke(&stored.event).await {
                    Ok(()) => result.replayed += 1,
                    Err(e) => {
                        result.failed += 1;
                        tracing::warn!(event_id = %stored.event.event_id, error = %e, "replay delivery failed");
                    }
                }
            }
            range.after_position = Some(last);
            result.last_position = Some(last);
            self.checkpoint(options, &result, "running").await?;
        }
        result.completed_at = Some(Utc::now());
        self.checkpoint(options, &result, "succeeded").await?;
        Ok(result)
    }

    async fn checkpoint(
        &self,
        options: &ReplayOptions,
        result: &ReplayResult,
        state: &str,
    ) -> Result<(), PublishError> {
        let statement = format!(
            "UPDATE {}.replay_checkpoints SET position = $2, matched = $3, replayed = $4, failed = $5, \
             state = $6, updated_at = now() WHERE replay_id = $1",
            self.store.schema()
        );
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        sqlx::query(sql(statement))
            .bind(&options.replay_id)
            .bind(result.last_position.unwrap_or(0))
            .bind(count(result.matched))
            .bind(count(result.replayed))
            .bind(count(result.failed))
            .bind(state)
            .execute(self.store.pool())
            .await
            .map_err(StoreError::query("save replay checkpoint"))?;
        Ok(())
    }
}
