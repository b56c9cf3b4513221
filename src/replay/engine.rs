//! The re-publishing replay: reads the selected events in position order below a settled end
//! (never the live relay's cursor, which it neither reads nor moves), sends them through the
//! relay's broker adapter wave by wave (an aggregate's later event only after its earlier one
//! was acknowledged), retries per the publisher's policy, paces to the rate limit and writes a
//! checkpoint after every batch.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use uuid::Uuid;

use super::plan::PublishPlan;
use super::report::{ReplayReport, ReportPhase};
use crate::broker::routing::Routing;
use crate::broker::{Broker, Message};
use crate::delivery::retry::{RetryDecision, RetryPolicy};
use crate::delivery::waves;
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

/// Paces sends to `rate` events/s on average since the start.
struct Pacer {
    rate: Option<u32>,
    start: Instant,
    sent: u64,
}

impl Pacer {
    fn delay_before(&self, now: Instant) -> Duration {
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        let due = self.start + Duration::from_secs_f64(self.sent as f64 / f64::from(rate.max(1)));
        due.saturating_duration_since(now)
    }
}

/// Resolves when `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
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
                sql_replay::save(pool, schema, &self.replay_id, &cp)
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
        let mut pacer = Pacer {
            rate: self.plan.rate_limit,
            start: Instant::now(),
            sent: 0,
        };
        // Aggregates whose event was given up: their later events are not sent either, so no
        // consumer sees them out of order (they count as failed).
        let mut given_up: HashSet<(String, String)> = HashSet::new();
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
            let mut delivered: Vec<Uuid> = Vec::new();
            let mut failed = 0_i64;
            // Strict waves whatever the broker: a given-up event stops its aggregate's later
            // events, which must not have gone out in the same call.
            for wave in waves(
                &batch,
                |e| (e.event.aggregate_type.as_str(), e.event.aggregate_id.as_str(), ""),
                false,
            ) {
                let mut messages = Vec::with_capacity(wave.len());
                for i in wave {
                    let stored = &batch[i];
                    let key = (stored.event.aggregate_type.clone(), stored.event.aggregate_id.clone());
                    if given_up.contains(&key) {
                        failed += 1;
                    } else {
                        messages.push(self.message(stored));
                    }
                }
                let Some(outcomes) = self.send_wave(&messages, &mut pacer, &mut shutdown).await else {
                    return Ok(self.stop(report));
                };
                for (message, ok) in messages.iter().zip(outcomes) {
                    if ok {
                        delivered.push(message.event.event_id);
                    } else {
                        failed += 1;
                        given_up.insert((message.event.aggregate_type.clone(), message.event.aggregate_id.clone()));
                    }
                }
                report.replayed = cp.replayed + i64::try_from(delivered.len()).unwrap_or(i64::MAX);
                report.failed = cp.failed + failed;
                self.publish(&report);
            }
            if self.plan.selection.dead_lettered_by.is_some() {
                sql_replay::mark_redriven(pool, schema, &self.publisher, &delivered)
                    .await
                    .map_err(ReplayError::MarkRedriven)?;
            }
            cp.position = last;
            cp.replayed = report.replayed;
            cp.failed = report.failed;
            sql_replay::save(pool, schema, &self.replay_id, &cp)
                .await
                .map_err(ReplayError::Checkpoint)?;
            report.checkpoint = last;
            self.publish(&report);
        }
        self.finish(cp, report).await
    }

    async fn finish(&self, mut cp: Checkpoint, mut report: ReplayReport) -> Result<ReplayReport, ReplayError> {
        cp.state = "succeeded".into();
        sql_replay::save(self.store.pool(), self.store.schema(), &self.replay_id, &cp)
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

    /// Sends one wave (in rate-limited chunks), retrying failed messages per the policy.
    /// Returns whether each was acknowledged, or None when shutdown came first.
    async fn send_wave(
        &self,
        messages: &[Message],
        pacer: &mut Pacer,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Vec<bool>> {
        let chunk = pacer.rate.map_or(messages.len().max(1), |r| {
            usize::try_from(r).unwrap_or(usize::MAX).max(1)
        });
        let mut outcomes = Vec::with_capacity(messages.len());
        for part in messages.chunks(chunk) {
            let wait = pacer.delay_before(Instant::now());
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stopped(shutdown) => return None,
                }
            }
            pacer.sent += part.len() as u64;
            outcomes.extend(self.send_with_retries(part, shutdown).await?);
        }
        Some(outcomes)
    }

    async fn send_with_retries(&self, messages: &[Message], shutdown: &mut watch::Receiver<bool>) -> Option<Vec<bool>> {
        let mut outcomes = vec![false; messages.len()];
        let mut pending: Vec<usize> = (0..messages.len()).collect();
        let mut attempt = 1_u32;
        while !pending.is_empty() {
            let batch: Vec<Message> = pending.iter().map(|&i| messages[i].clone()).collect();
            let results = self.broker.send_batch(&batch).await;
            let mut again = Vec::new();
            let mut delay = Duration::ZERO;
            for (&i, result) in pending.iter().zip(results) {
                match result {
                    Ok(()) => outcomes[i] = true,
                    Err(error) => match self.retry.decide(attempt, &error) {
                        RetryDecision::RetryAfter(d) => {
                            delay = delay.max(d);
                            again.push(i);
                        }
                        RetryDecision::DeadLetter { reason } => {
                            tracing::warn!(job = %self.job, event_id = %messages[i].event.event_id, reason, "replayed event given up");
                        }
                    },
                }
            }
            pending = again;
            if !pending.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stopped(shutdown) => return None,
                }
                attempt += 1;
            }
        }
        Some(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_spreads_sends_over_time() {
        let start = Instant::now();
        let mut p = Pacer {
            rate: Some(10),
            start,
            sent: 0,
        };
        assert_eq!(p.delay_before(start), Duration::ZERO);
        p.sent = 10;
        assert_eq!(p.delay_before(start), Duration::from_secs(1));
        assert_eq!(p.delay_before(start + Duration::from_secs(2)), Duration::ZERO);
        p.rate = None;
        assert_eq!(p.delay_before(start), Duration::ZERO);
    }
}
