//! `replay_events`: re-delivers a selected range of the event store to the registered
//! handlers (or only counts it, in a dry run), checkpointed so an interrupted replay resumes.
//! A failing handler is retried with the handlers' backoff; once an event is given up, its
//! aggregate's later events are skipped for the rest of the run, so order holds per aggregate.
//!
//! A replay reads by position, so it first fixes its end and waits for the writers that may
//! still commit below it ([`events::settled_end`]): a checkpoint never passes a position whose
//! transaction was still in flight, which would skip that event for good.

use std::collections::HashSet;

use chrono::{DateTime, Utc};

use super::{InventoryEventPublisher, PublishError};
use crate::broker::SendError;
use crate::delivery::retry::RetryDecision;
use crate::event::DomainEvent;
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
        // Aggregates whose event was given up: their later events are not handed to the
        // handlers either (they count as failed), so no handler sees them out of order. As in
        // the replay Job, the set lasts one run: a resumed run starts with it empty.
        let mut given_up: HashSet<(String, String)> = HashSet::new();
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
                let aggregate = (stored.event.aggregate_type.clone(), stored.event.aggregate_id.clone());
                if given_up.contains(&aggregate) {
                    result.failed += 1;
                    continue;
                }
                match self.invoke_retrying(&stored.event).await {
                    Ok(()) => result.replayed += 1,
                    Err(reason) => {
                        result.failed += 1;
                        tracing::warn!(
                            event_id = %stored.event.event_id,
                            reason,
                            "replayed event given up; its aggregate's later events in this run are skipped"
                        );
                        given_up.insert(aggregate);
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

    /// Calls the handlers for one replayed event, retrying a failure with the handlers'
    /// backoff ([`PublisherConfig::handler_retry`](super::PublisherConfig::handler_retry))
    /// until it gives up; the reason when it does.
    async fn invoke_retrying(&self, event: &DomainEvent) -> Result<(), String> {
        let mut attempt = 1_u32;
        loop {
            let Err(e) = self.invoke(event).await else {
                return Ok(());
            };
            match self
                .config
                .handler_retry
                .decide(attempt, &SendError::Transient(e.to_string()))
            {
                RetryDecision::RetryAfter(delay) => tokio::time::sleep(delay).await,
                RetryDecision::DeadLetter { reason } => return Err(reason),
            }
            attempt += 1;
        }
    }

    /// Saves where the replay stands. The library's replay fixes its end per run (a later run
    /// with the same id also covers what was committed since), so no end is stored.
    async fn checkpoint(
        &self,
        options: &ReplayOptions,
        result: &ReplayResult,
        state: &str,
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
        replay::save(self.store.pool(), self.store.schema(), &options.replay_id, &checkpoint).await?;
        Ok(())
    }
}
