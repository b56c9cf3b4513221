//! In-process event handlers: delivered after the event is durably stored, at least once,
//! in per-aggregate order, by the product's one delivery engine ([`crate::delivery::Engine`])
//! with the handlers as its destination. Failures are recorded in `failed_events` and
//! retried with [`PublisherConfig::handler_retry`](super::PublisherConfig::handler_retry), later
//! events of the same aggregate held behind them; each event type has its own circuit, so a
//! downstream that keeps failing stops being called for a while without counting attempts.
//!
//! Every service replica may run a dispatcher: they share the consumer's 64 shards under the
//! store's leases (the relay's mechanism), so an event is handled by one replica and an
//! aggregate's events never run concurrently. A dispatcher that lost a shard mid-batch has its
//! cursor move refused (the new owner handles those events again: at least once).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;
use uuid::Uuid;

use super::{HandlerMap, InventoryEventPublisher, PublishError};
use crate::broker::routing::Routing;
use crate::broker::{BoxFuture, Broker, Message, SendError};
use crate::delivery::circuit::CircuitBreakerConfig;
use crate::delivery::{DeliveryConfig, Engine};
use crate::event::DomainEvent;

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
        let worker_id = format!("handlers-{}", Uuid::now_v7());
        let sink = Arc::new(HandlerSink::new(self.handlers.clone()));
        let engine = Arc::new(Engine::new(
            self.handler_delivery(),
            self.store.clone(),
            sink,
            &worker_id,
        ));
        let (stop, stopped) = watch::channel(false);
        let run = engine.run(stopped);
        tokio::pin!(run);
        tokio::select! {
            result = &mut run => return Ok(result?),
            () = shutdown => {}
        }
        // The engine finishes the batch in hand, then releases its shards.
        let _ = stop.send(true);
        Ok(run.await?)
    }

    /// The engine settings of the handler dispatcher.
    fn handler_delivery(&self) -> DeliveryConfig {
        let config = &self.config;
        let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        DeliveryConfig {
            consumer: config.handler_consumer.clone(),
            batch_size: 500,
            // With NOTIFY the poll only covers a missed wake-up; polling, it is the interval.
            min_poll_interval_ms: 10,
            max_poll_interval_ms: 1_000,
            read_ahead: false,
            wake_up: config.handler_wake_up,
            heartbeat_interval_ms: millis(config.handler_heartbeat),
            lease_duration_ms: millis(config.handler_lease),
            // Handler failures are logged one by one; the library has no readiness of its own to degrade.
            failed_event_threshold: i64::MAX,
            // A handler's later event assumes the earlier one took effect, also after a dead letter.
            block_aggregate_after_dead_letter: true,
            circuit_breaker: CircuitBreakerConfig::default(),
            retry: config.handler_retry.clone(),
            // One "destination" (and so one circuit) per event type: its handlers.
            routing: Routing::PerEventType {
                template: "{eventType}".to_owned(),
            },
        }
    }
}

/// Runs every handler registered for the event's type, in registration order, until one fails.
async fn invoke(handlers: &HandlerMap, event: &DomainEvent) -> Result<(), HandlerError> {
    let registered = handlers
        .read()
        .ok()
        .and_then(|h| h.get(&event.event_type).cloned())
        .unwrap_or_default();
    for handler in registered {
        handler.handle(event).await?;
    }
    Ok(())
}

/// The registered handlers seen as a destination: of the delivery engine, and of the replays'
/// re-send in `replay_events`. A handler failure is transient (retried with backoff, feeding
/// the event type's circuit); the engine's dead letter is the `failed_events` row, so there is
/// nothing else to send it to.
pub(super) struct HandlerSink {
    handlers: HandlerMap,
}

impl HandlerSink {
    pub(super) fn new(handlers: HandlerMap) -> Self {
        Self { handlers }
    }
}

impl Broker for HandlerSink {
    fn kind(&self) -> &'static str {
        "handlers"
    }

    /// Handles the batch one event at a time, in order; after an aggregate's event failed, its
    /// later events in the call are withheld (never handed to a handler), as the engine expects
    /// from a destination that keeps aggregate order.
    fn send_batch<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Vec<Result<(), SendError>>> {
        Box::pin(async move {
            let mut failed: HashSet<(&str, &str)> = HashSet::new();
            let mut results = Vec::with_capacity(messages.len());
            for message in messages {
                let event = &message.event;
                let aggregate = (event.aggregate_type.as_str(), event.aggregate_id.as_str());
                if failed.contains(&aggregate) {
                    results.push(Err(SendError::Transient(
                        "withheld behind an earlier failed event of its aggregate".to_owned(),
                    )));
                    continue;
                }
                let result = invoke(&self.handlers, event).await;
                if result.is_err() {
                    failed.insert(aggregate);
                }
                results.push(result.map_err(|e| SendError::Transient(e.0)));
            }
            results
        })
    }

    fn send_dead_letter<'a>(&'a self, _message: &'a Message, _reason: &'a str) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn ensure_destinations<'a>(&'a self, _destinations: &'a [String]) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn keeps_aggregate_order(&self) -> bool {
        true
    }

    fn check_health(&self) -> BoxFuture<'_, Result<(), SendError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}
