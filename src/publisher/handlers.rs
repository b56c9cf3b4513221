//! In-process event handlers: delivered after the event is durably stored, at least once,
//! in per-aggregate order; failures are recorded in `failed_events` and retried with the
//! shared [`RetryPolicy`](crate::delivery::retry::RetryPolicy), later events of the same
//! aggregate waiting behind them.
//!
//! Every service replica may run a dispatcher: they share the consumer's 64 shards under the
//! store's leases (the relay's mechanism), so an event is handled by one replica and an
//! aggregate's events never run concurrently. Leases are renewed between rounds; a round
//! slower than the lease can lose its shards, and then its cursor move is refused (the new
//! owner handles those events again: at least once).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use chrono::Utc;
use uuid::Uuid;

use super::{InventoryEventPublisher, PublishError};
use crate::event::DomainEvent;
use crate::store::events::StoredEvent;
use crate::store::leases::{HeartbeatReport, LeaseManager};
use crate::store::outbox::{OutboxReader, SHARDS};

/// Why a handler failed; the message is stored as the failed event's last error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HandlerError(pub String);

/// An async callback for one event type.
pub trait EventHandler: Send + Sync {
    fn handle<'a>(
        &'a self,
        event: &'a DomainEvent,
    ) -> Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;
}

impl<F, Fut> EventHandler for F
where
    F: Fn(DomainEvent) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn handle<'a>(
        &'a self,
        event: &'a DomainEvent,
    ) -> Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>> {
        Box::pin(self(event.clone()))
    }
}

impl InventoryEventPublisher {
    /// Delivers stored events to the registered handlers until `shutdown` resolves, on the
    /// shards this dispatcher leases; gives its shards back when it stops.
    pub async fn run_handlers(&self, shutdown: impl Future<Output = ()>) -> Result<(), PublishError> {
        let consumer = self.config.handler_consumer.clone();
        let worker_id = format!("handlers-{}", Uuid::now_v7());
        let reader = OutboxReader::new(self.store.clone(), consumer.clone()).with_owner(&worker_id);
        let leases = LeaseManager::new(self.store.clone(), consumer, worker_id, self.config.handler_lease);
        let all: Vec<i16> = (0..SHARDS).collect();
        reader.ensure_cursors(&all).await?;
        let report = HeartbeatReport {
            circuit_state: "closed",
            ..HeartbeatReport::default()
        };
        let mut shards = leases.tick(&report).await?;
        let mut last_tick = Instant::now();
        let idle = Duration::from_millis(100).min(self.config.handler_heartbeat);
        tokio::pin!(shutdown);
        let result = loop {
            // Between rounds: nothing is in flight, so shards may be given back here.
            if last_tick.elapsed() >= self.config.handler_heartbeat {
                match leases.tick(&report).await {
                    Ok(owned) => shards = owned,
                    Err(e) => break Err(e.into()),
                }
                last_tick = Instant::now();
            }
            let handled = if shards.is_empty() {
                0
            } else {
                match self.dispatch_round(&reader, &shards).await {
                    Ok(n) => n,
                    Err(e) => break Err(e),
                }
            };
            if handled == 0 {
                tokio::select! {
                    () = &mut shutdown => break Ok(()),
                    () = tokio::time::sleep(idle) => {}
                }
            }
        };
        if let Err(e) = leases.release_all().await {
            tracing::warn!(error = %e, "handler dispatcher could not release its shards; they expire");
        }
        result
    }

    /// One round: due retries first, then new events. Returns how many events were handled.
    pub async fn dispatch_round(&self, reader: &OutboxReader, shards: &[i16]) -> Result<usize, PublishError> {
        let consumer = reader.consumer();
        let mut handled = 0;
        for event in self.failed.due_heads(consumer, shards, 100).await? {
            handled += 1;
            self.deliver_failed(consumer, &event).await?;
        }

        let batch = reader.read(shards, 500).await?;
        let mut blocked: HashSet<(String, String)> =
            self.failed.blocked_aggregates(consumer).await?.into_iter().collect();
        for event in &batch.events {
            handled += 1;
            let key = (event.event.aggregate_type.clone(), event.event.aggregate_id.clone());
            if blocked.contains(&key) {
                self.failed.hold(consumer, event).await?;
                continue;
            }
            if let Err(e) = self.invoke(&event.event).await {
                self.record_failure(consumer, event, &e, 0).await?;
                blocked.insert(key);
            }
        }
        reader.commit(batch.advance).await?;
        Ok(handled)
    }

    pub(super) async fn invoke(&self, event: &DomainEvent) -> Result<(), HandlerError> {
        for handler in self.handlers_for(&event.event_type) {
            handler.handle(event).await?;
        }
        Ok(())
    }

    async fn deliver_failed(&self, consumer: &str, event: &StoredEvent) -> Result<(), PublishError> {
        match self.invoke(&event.event).await {
            Ok(()) => {
                self.failed.mark_delivered(consumer, event.event.event_id).await?;
                tracing::info!(event_id = %event.event.event_id, consumer, "handler retry succeeded");
            }
            Err(e) => {
                let attempts = self.failed.attempts(consumer, event.event.event_id).await?;
                self.record_failure(consumer, event, &e, u32::try_from(attempts).unwrap_or(0))
                    .await?;
            }
        }
        Ok(())
    }

    async fn record_failure(
        &self,
        consumer: &str,
        event: &StoredEvent,
        error: &HandlerError,
        previous_attempts: u32,
    ) -> Result<(), PublishError> {
        let attempt = previous_attempts + 1;
        let next = self
            .config
            .handler_retry
            .next_delay(attempt)
            .and_then(|d| chrono::Duration::from_std(d).ok())
            .map(|d| Utc::now() + d);
        let Some(row) = self.failed.record_attempt(consumer, event, &error.0, next).await? else {
            return Ok(());
        };
        tracing::warn!(
            event_id = %event.event.event_id,
            aggregate_id = %event.event.aggregate_id,
            correlation_id = event.event.metadata.correlation_id.as_deref().unwrap_or_default(),
            attempts = row.attempts,
            status = row.status.as_str(),
            error = %error,
            "event handler failed"
        );
        Ok(())
    }
}
