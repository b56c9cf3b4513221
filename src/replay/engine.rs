//! The re-publishing replay: reads the selected events in position order below a settled end
//! (never the live relay's cursor, which it neither reads nor moves), sends them through the
//! relay's broker adapter through the replays' ordered re-send ([`crate::delivery::resend`]:
//! waves, retries per the publisher's policy, an aggregate parked once one of its events is
//! given up), paces to the rate limit and writes a checkpoint, with the newly parked
//! aggregates, after every batch.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::plan::PublishPlan;
use super::report::{ReplayReport, ReportPhase};
use crate::broker::routing::Routing;
use crate::broker::{Broker, Message};
use crate::delivery::resend::{Pacer, Resender, Resent};
use crate::delivery::retry::RetryPolicy;
use crate::store::replay::{self as sql_replay, Checkpoint};
use crate::store::{Store, StoreError, events::StoredEvent};

/// Why a replay could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("load or save the replay checkpoint: {0}")]
    Checkpoint(#[source] StoreError),
    #[error("wait for the writers in flight below the replay's end: {0}")]
    SettleEnd(#[source] StoreError),
    #[error("count the selected events: {0}")]
    Count(#[source] StoreError),
    #[error("read the selected events: {0}")]
    Read(#[source] StoreError),
    #[error("mark redriven dead letters delivered: {0}")]
    MarkRedriven(#[source] StoreError),
}

/// Everything one re-publishing run needs.
pub struct Engine {
    pub store: Store,
    pub broker: Arc<dyn Broker>,
    pub routing: Routing,
    pub retry: RetryPolicy,
    pub plan: PublishPlan,
    /// Checkpoint key (the ReplayJob's uid: a new ReplayJob of the same name starts afresh).
    pub replay_id: String,
    /// `namespace/name` of the ReplayJob, carried on every message (`replayjob` extension).
    pub job: String,
    /// The publisher whose dead letters a redrive marks delivered.
    pub publisher: String,
    /// Events per batch from the relay config, before the rate limit's cap.
    pub batch_size: usize,
    /// Shared with the status endpoint.
    pub progress: Arc<Mutex<ReplayReport>>,
}

impl Engine {
    fn publish(&self, report: &ReplayReport) {
        if let Ok(mut shared) = self.progress.lock() {
            *shared = report.clone();
        }
    }

    /// Runs the replay until the range is done or `shutdown` turns true (then it stops at
    /// its last checkpoint, phase `Stopped`).
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> Result<ReplayReport, ReplayError> {
        let pool = self.store.pool();
        let schema = self.store.schema();
        let mut cp = sql_replay::start(pool, schema, &self.replay_id)
            .await
            .map_err(ReplayError::Checkpoint)?;
        let mut report = ReplayReport {
            phase: ReportPhase::Running,
            matched: cp.matched,
            replayed: cp.replayed,
            failed: cp.failed,
            checkpoint: cp.position,
            end_position: cp.end_position,
            runs: cp.runs,
            resumed_from: (cp.runs > 1).then_some(cp.position),
            dry_run: self.plan.dry_run,
            started_at: cp.started_at,
            ..Default::default()
        };
        if cp.state == "succeeded" {
            // A Pod restarted after it finished (or a retried Job): report, send nothing.
            report.phase = ReportPhase::Completed;
            self.publish(&report);
            return Ok(report);
        }
        let end = match cp.end_position {
            Some(end) => end,
            None => {
                let end = crate::store::events::settled_end(pool, schema, self.plan.selection.to_position)
                    .await
                    .map_err(ReplayError::SettleEnd)?;
                cp.matched = sql_replay::count(pool, schema, &self.plan.selection, 0, end)
                    .await
                    .map_err(ReplayError::Count)?;
                cp.end_position = Some(end);
                sql_replay::save(pool, schema, &self.replay_id, &cp, &[])
                    .await
                    .map_err(ReplayError::Checkpoint)?;
                end
            }
        };
        report.matched = cp.matched;
        report.end_position = Some(end);
        tracing::info!(job = %self.job, matched = cp.matched, end, resume_after = cp.position, "replay starting");
        self.publish(&report);

        if self.plan.dry_run {
            return self.finish(cp, report).await;
        }

        if let Some(target) = &self.plan.target {
            // An override destination is not part of the publisher's provisioned topology.
            if let Err(e) = self.broker.ensure_destinations(std::slice::from_ref(target)).await {
                tracing::warn!(job = %self.job, target, error = %e, "could not create the override destination; sending anyway");
            }
        }
        let batch_size = self.plan.batch_size(self.batch_size);
        let mut pacer = Pacer::new(self.plan.rate_limit);
        let mut resender = Resender {
            destination: self.broker.as_ref(),
            retry: &self.retry,
            parked: std::mem::take(&mut cp.parked).into_iter().collect(),
            replay: &self.job,
        };
        loop {
            if *shutdown.borrow() {
                return Ok(self.stop(report));
            }
            let batch = sql_replay::read(pool, schema, &self.plan.selection, cp.position, end, batch_size)
                .await
                .map_err(ReplayError::Read)?;
            let Some(last) = batch.last().map(|e| e.position) else {
                break;
            };
            let messages: Vec<Message> = batch.iter().map(|stored| self.message(stored)).collect();
            // The status endpoint shows progress within a batch too (what a kill would re-send).
            let mut progress = |so_far: &Resent| {
                let mut report = report.clone();
                report.replayed = cp.replayed + i64::try_from(so_far.delivered.len()).unwrap_or(i64::MAX);
                report.failed = cp.failed + so_far.failed;
                self.publish(&report);
            };
            let sent = resender.send(&messages, &mut pacer, &mut shutdown, &mut progress).await;
            let Some(resent) = sent else {
                return Ok(self.stop(report));
            };
            if self.plan.selection.dead_lettered_by.is_some() {
                sql_replay::mark_redriven(pool, schema, &self.publisher, &resent.delivered)
                    .await
                    .map_err(ReplayError::MarkRedriven)?;
            }
            cp.position = last;
            cp.replayed += i64::try_from(resent.delivered.len()).unwrap_or(i64::MAX);
            cp.failed += resent.failed;
            sql_replay::save(pool, schema, &self.replay_id, &cp, &resent.parked)
                .await
                .map_err(ReplayError::Checkpoint)?;
            report.replayed = cp.replayed;
            report.failed = cp.failed;
            report.checkpoint = last;
            self.publish(&report);
        }
        self.finish(cp, report).await
    }

    async fn finish(&self, mut cp: Checkpoint, mut report: ReplayReport) -> Result<ReplayReport, ReplayError> {
        cp.state = "succeeded".into();
        sql_replay::save(self.store.pool(), self.store.schema(), &self.replay_id, &cp, &[])
            .await
            .map_err(ReplayError::Checkpoint)?;
        report.phase = ReportPhase::Completed;
        report.completed_at = Some(chrono::Utc::now());
        self.publish(&report);
        tracing::info!(job = %self.job, matched = report.matched, replayed = report.replayed, failed = report.failed, "replay finished");
        Ok(report)
    }

    /// The counts as of the last checkpoint: what a resumed run starts from.
    fn stop(&self, mut report: ReplayReport) -> ReplayReport {
        report.phase = ReportPhase::Stopped;
        self.publish(&report);
        tracing::info!(job = %self.job, checkpoint = report.checkpoint, "replay stopped at its checkpoint");
        report
    }

    fn message(&self, stored: &StoredEvent) -> Message {
        let mut event = stored.event.clone();
        event.metadata.replay_job = Some(self.job.clone());
        Message {
            position: stored.position,
            destination: self.plan.destination(&self.routing, &stored.event),
            event: Arc::new(event),
        }
    }
}
