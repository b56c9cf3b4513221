//! `replay_events`: re-delivers a selected range of the event store to the registered
//! handlers (or only counts it, in a dry run), checkpointed so an interrupted replay resumes.
//! The handlers are the destination of the replays' ordered re-send ([`crate::delivery::resend`],
//! the replay Job's loop too): a failing handler is retried with the handlers' backoff; once an
//! event is given up its aggregate is parked, and its later events are skipped for the rest of
//! the replay (a later call with the same id included), so order holds per aggregate.
//!
//! A replay reads by position, so it first fixes its end and waits for the writers that may
//! still commit below it ([`events::settled_end`]): a checkpoint never passes a position whose
//! transaction was still in flight, which would skip that event for good.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::handlers::HandlerSink;
use super::{InventoryEventPublisher, PublishError};
use crate::broker::Message;
use crate::delivery::resend::{Pacer, Resender};
use crate::store::events::{self, EventRange};
use crate::store::{StoreError, replay};

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
        let checkpoint = replay::start(pool, schema, &options.replay_id).await?;
        let resume_at = checkpoint.position;
        let mut result = ReplayResult {
            matched: checkpoint.matched.unsigned_abs(),
            replayed: checkpoint.replayed.unsigned_abs(),
            failed: checkpoint.failed.unsigned_abs(),
            last_position: (resume_at > 0).then_some(resume_at),
            started_at: Some(started_at),
            completed_at: None,
        };
        let mut range = options.range.clone();
        range.after_position = Some(range.after_position.unwrap_or(0).max(resume_at));
        range.to_position = Some(events::settled_end(pool, schema, range.to_position).await?);
        let batch_size = options.batch_size.clamp(1, 10_000);
        let sink = HandlerSink::new(self.handlers.clone());
        let mut resender = Resender {
            destination: &sink,
            retry: &self.config.handler_retry,
            parked: checkpoint.parked.into_iter().collect(),
            replay: &options.replay_id,
        };
        let mut pacer = Pacer::new(None);
        // Nothing stops a library replay but dropping its future.
        let (_running, mut shutdown) = watch::channel(false);
        loop {
            let mut conn = pool.acquire().await.map_err(StoreError::Connect)?;
            let batch = events::read_range(&mut conn, schema, &range, batch_size).await?;
            drop(conn);
            let Some(last) = batch.last().map(|e| e.position) else {
                break;
            };
            result.matched += batch.len() as u64;
            let mut parked = Vec::new();
            if !options.dry_run {
                let messages: Vec<Message> = batch
                    .into_iter()
                    .map(|stored| Message {
                        position: stored.position,
                        destination: stored.event.event_type.clone(),
                        event: Arc::new(stored.event),
                    })
                    .collect();
                let resent = resender
                    .send(&messages, &mut pacer, &mut shutdown, &mut |_| {})
                    .await
                    .expect("the shutdown sender lives as long as the replay");
                result.replayed += resent.delivered.len() as u64;
                result.failed += resent.failed.unsigned_abs();
                parked = resent.parked;
            }
            range.after_position = Some(last);
            result.last_position = Some(last);
            self.checkpoint(options, &result, "running", &parked).await?;
        }
        result.completed_at = Some(Utc::now());
        self.checkpoint(options, &result, "succeeded", &[]).await?;
        Ok(result)
    }

    /// Saves where the replay stands. The library's replay fixes its end per run (a later run
    /// with the same id also covers what was committed since), so no end is stored.
    async fn checkpoint(
        &self,
        options: &ReplayOptions,
        result: &ReplayResult,
        state: &str,
        newly_parked: &[(String, String)],
    ) -> Result<(), PublishError> {
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let checkpoint = replay::Checkpoint {
            position: result.last_position.unwrap_or(0),
            matched: count(result.matched),
            replayed: count(result.replayed),
            failed: count(result.failed),
            end_position: None,
            state: state.to_owned(),
            ..Default::default()
        };
        replay::save(
            self.store.pool(),
            self.store.schema(),
            &options.replay_id,
            &checkpoint,
            newly_parked,
        )
        .await?;
        Ok(())
    }
}
