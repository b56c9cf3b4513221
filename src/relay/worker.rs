//! The relay worker loop. Each round, for the shards this worker leases:
//! 1. due retries: the head failed event of each blocked aggregate whose backoff elapsed;
//! 2. new events: a gap-free batch from the outbox; events of aggregates with a failed event
//!    wait behind it ("held"); the rest go to the broker in one pipelined batch;
//! 3. outcomes: acked → published; retriable → `failed_events` with the next retry time
//!    (later events of the aggregate held); exhausted or permanent → dead-letter;
//! 4. only then the cursor moves, so a crash at any point re-sends, never skips.
//!
//! A destination whose circuit is open gets no send attempts: the batch is not read further
//! and stays in the outbox until the circuit lets a probe through.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{Notify, RwLock, watch};

use super::circuit::{CircuitBreaker, CircuitState, Permit};
use super::config::RelayConfig;
use super::health::HealthState;
use super::leases::{HeartbeatReport, LeaseManager};
use super::metrics::RelayMetrics;
use super::retry::RetryDecision;
use crate::broker::routing::Routing;
use crate::broker::{Broker, Message, SendError};
use crate::store::events::StoredEvent;
use crate::store::failed::{FailedEvents, FailedStatus};
use crate::store::outbox::{CursorAdvance, OutboxReader, SHARDS};
use crate::store::{Store, StoreError, sql};

/// Errors that stop a relay worker.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("listen for outbox notifications: {0}")]
    Listen(#[source] sqlx::Error),
}

/// Counters reported in the heartbeat row (the operator reads them into the CR status).
#[derive(Debug, Default)]
struct Totals {
    published: AtomicI64,
    failed: AtomicI64,
    dead_lettered: AtomicI64,
    last_published_ms: AtomicI64,
}

/// One relay worker.
pub struct Relay {
    config: RelayConfig,
    store: Store,
    reader: OutboxReader,
    failed: FailedEvents,
    broker: Arc<dyn Broker>,
    leases: LeaseManager,
    circuits: Mutex<HashMap<String, CircuitBreaker>>,
    metrics: Arc<RelayMetrics>,
    health: Arc<HealthState>,
    /// Shards owned for the current round; the lease task swaps it between rounds.
    owned: RwLock<Vec<i16>>,
    /// Ownership computed while a round held `owned`; applied at the next round.
    next_owned: Mutex<Option<Vec<i16>>>,
    totals: Totals,
    wake: Notify,
}

/// What a round did, for the polling rhythm.
#[derive(Debug, Default, PartialEq)]
struct RoundOutcome {
    read: usize,
    full: bool,
    blocked_by_circuit: Option<Duration>,
}

impl Relay {
    /// A worker for `config` on an already migrated store.
    pub fn new(config: RelayConfig, store: Store, broker: Arc<dyn Broker>, worker_id: &str) -> Self {
        let consumer = config.publisher.clone();
        let reader = OutboxReader::new(store.clone(), consumer.clone()).with_owner(worker_id);
        let lease = Duration::from_millis(config.workers.lease_duration_ms);
        let leases = LeaseManager::new(store.clone(), consumer.clone(), worker_id, lease);
        let stall_after = Duration::from_millis(config.outbox.max_poll_interval_ms * 4 + 30_000);
        let health = Arc::new(HealthState::new(config.health.failed_event_threshold, stall_after));
        Self {
            reader,
            failed: FailedEvents::new(store.clone()),
            broker,
            leases,
            circuits: Mutex::new(HashMap::new()),
            metrics: Arc::new(RelayMetrics::new(&consumer)),
            health,
            owned: RwLock::new(Vec::new()),
            next_owned: Mutex::new(None),
            totals: Totals::default(),
            wake: Notify::new(),
            store,
            config,
        }
    }

    pub fn health(&self) -> Arc<HealthState> {
        self.health.clone()
    }

    pub fn metrics(&self) -> Arc<RelayMetrics> {
        self.metrics.clone()
    }

    pub fn failed_events(&self) -> FailedEvents {
        self.failed.clone()
    }

    /// Runs until `shutdown` turns true, then releases its shards.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) -> Result<(), RelayError> {
        let all: Vec<i16> = (0..SHARDS).collect();
        self.reader.ensure_cursors(&all).await?;
        let destinations = match &self.config.routing {
            Routing::Single { destination } => vec![destination.clone()],
            // Per-type destinations are created on first use by the adapters or by the operator.
            _ => Vec::new(),
        };
        // Also creates the dead-letter destination and configured consumer queues.
        if let Err(e) = self.broker.ensure_destinations(&destinations).await {
            tracing::warn!(error = %e, "could not create destinations yet; sends will retry");
        }
        *self.owned.write().await = self.leases.tick(&self.report()).await?;
        let background = tokio::spawn(self.clone().background(shutdown.clone()));
        let listener = tokio::spawn(self.clone().listen_for_inserts());

        let min_poll = Duration::from_millis(self.config.outbox.min_poll_interval_ms);
        let max_poll = Duration::from_millis(self.config.outbox.max_poll_interval_ms);
        let mut idle_wait = min_poll;
        let result = loop {
            if *shutdown.borrow() {
                break Ok(());
            }
            let outcome = match self.round().await {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(error = %e, "relay round failed; retrying");
                    RoundOutcome {
                        blocked_by_circuit: Some(max_poll),
                        ..Default::default()
                    }
                }
            };
            self.health.loop_ran();
            let wait = if let Some(retry_in) = outcome.blocked_by_circuit {
                retry_in.clamp(min_poll, max_poll)
            } else if outcome.full {
                idle_wait = min_poll;
                continue;
            } else if outcome.read > 0 {
                idle_wait = min_poll;
                min_poll
            } else {
                let wait = idle_wait;
                idle_wait = (idle_wait * 2).min(max_poll);
                wait
            };
            tokio::select! {
                _ = shutdown.changed() => {}
                () = self.wake.notified() => idle_wait = min_poll,
                () = tokio::time::sleep(wait) => {}
            }
        };
        background.abort();
        listener.abort();
        self.leases.release_all().await?;
        tracing::info!(
            worker = self.leases.worker_id(),
            "relay stopped and released its shards"
        );
        result
    }

    /// Wakes the loop on the store's coalesced NOTIFY (one per inserting transaction).
    async fn listen_for_inserts(self: Arc<Self>) -> Result<(), RelayError> {
        loop {
            let mut listener = match sqlx::postgres::PgListener::connect_with(self.store.pool()).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for outbox notifications; polling only");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
            };
            if let Err(e) = listener.listen("outbox_events").await {
                tracing::warn!(error = %e, "LISTEN outbox_events failed; polling only");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
            while listener.recv().await.is_ok() {
                self.wake.notify_one();
            }
        }
    }

    /// Heartbeats, leases, broker health and backlog figures.
    async fn background(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let interval = Duration::from_millis(self.config.workers.heartbeat_interval_ms);
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(interval) => {}
            }
            ticks += 1;
            let report = self.report();
            let outcome = match self.owned.try_write() {
                Ok(mut owned) => self.leases.tick(&report).await.map(|shards| {
                    // Anything computed during an earlier round is older than this.
                    if let Ok(mut next) = self.next_owned.lock() {
                        *next = None;
                    }
                    *owned = shards;
                }),
                // A round is running on the current shards: renew and claim now, apply later;
                // shards above the fair share are released only between rounds.
                Err(_) => self.leases.tick_during_round(&report).await.map(|shards| {
                    if let Ok(mut next) = self.next_owned.lock() {
                        *next = Some(shards);
                    }
                }),
            };
            if let Err(e) = outcome {
                tracing::warn!(error = %e, "heartbeat failed");
            }
            if ticks % 5 == 1 {
                let reachable = self.broker.check_health().await;
                if let Err(e) = &reachable {
                    tracing::warn!(error = %e, broker = self.broker.kind(), "broker health check failed");
                }
                self.health
                    .set_broker_health(reachable.as_ref().map(|_| ()).map_err(|e| e.message().to_owned()));
                if let Err(e) = self.refresh_backlog().await {
                    tracing::warn!(error = %e, "backlog figures failed");
                }
            }
        }
    }

    fn report(&self) -> HeartbeatReport {
        let worst = self.worst_circuit();
        let last_ms = self.totals.last_published_ms.load(Ordering::Relaxed);
        HeartbeatReport {
            circuit_state: worst.as_str(),
            published_total: self.totals.published.load(Ordering::Relaxed),
            failed_total: self.totals.failed.load(Ordering::Relaxed),
            dead_lettered_total: self.totals.dead_lettered.load(Ordering::Relaxed),
            last_published_at: (last_ms > 0)
                .then(|| chrono::DateTime::from_timestamp_millis(last_ms))
                .flatten(),
        }
    }

    fn worst_circuit(&self) -> CircuitState {
        let now = Instant::now();
        let Ok(circuits) = self.circuits.lock() else {
            return CircuitState::Closed;
        };
        circuits
            .values()
            .map(|c| c.state(now))
            .max_by_key(|s| s.as_gauge())
            .unwrap_or(CircuitState::Closed)
    }

    async fn refresh_backlog(&self) -> Result<(), StoreError> {
        let schema = self.store.schema();
        let statement = format!(
            "SELECT count(e.position), extract(epoch FROM now() - min(e.recorded_at))::float8 \
             FROM {schema}.relay_cursors c JOIN {schema}.events e ON e.shard = c.shard AND e.position > c.position \
             WHERE c.consumer = $1 AND c.owner = $2"
        );
        let (pending, oldest): (i64, Option<f64>) = sqlx::query_as(sql(statement))
            .bind(&self.config.publisher)
            .bind(self.leases.worker_id())
            .fetch_one(self.store.pool())
            .await
            .map_err(StoreError::query("measure backlog"))?;
        self.metrics.set_backlog(pending, oldest.unwrap_or(0.0));
        let counts = self.failed.counts(&self.config.publisher).await?;
        let count = |s: FailedStatus| counts.iter().find(|(k, _)| *k == s).map_or(0, |(_, n)| *n);
        let (retrying, dead) = (
            count(FailedStatus::Retrying) + count(FailedStatus::Held),
            count(FailedStatus::DeadLettered),
        );
        self.metrics.set_failed_events(retrying, dead);
        self.health.set_failed_events(retrying + dead);
        Ok(())
    }

    /// One read-send-commit round over the owned shards.
    async fn round(&self) -> Result<RoundOutcome, StoreError> {
        let next = self.next_owned.lock().ok().and_then(|mut n| n.take());
        if let Some(next) = next {
            *self.owned.write().await = next;
        }
        // No batch is in flight here: the only safe moment to give shards back.
        let released = self.leases.release_pending().await?;
        if !released.is_empty() {
            self.owned.write().await.retain(|s| !released.contains(s));
        }
        let owned = self.owned.read().await;
        if owned.is_empty() {
            return Ok(RoundOutcome::default());
        }
        let retried = self.retry_due(&owned).await?;

        let batch = self.reader.read(&owned, self.config.outbox.batch_size).await?;
        let read = batch.events.len();
        let full = read == self.config.outbox.batch_size;
        if read == 0 {
            self.commit_round(batch.advance, &owned).await?;
            return Ok(RoundOutcome {
                read: retried,
                ..Default::default()
            });
        }
        let messages: Vec<Message> = batch.events.iter().map(|e| self.message(e)).collect();
        if let Some(retry_in) = self.circuits_reject(&messages) {
            // Nothing sent, cursor unchanged: the events stay in the outbox.
            return Ok(RoundOutcome {
                read: 0,
                full: false,
                blocked_by_circuit: Some(retry_in),
            });
        }

        let mut blocked: HashSet<(String, String)> = self
            .failed
            .blocked_aggregates(&self.config.publisher)
            .await?
            .into_iter()
            .collect();
        let mut to_send = Vec::with_capacity(read);
        let mut stored = Vec::with_capacity(read);
        for (event, message) in batch.events.iter().zip(messages) {
            if blocked.contains(&aggregate_key(event)) {
                self.failed.hold(&self.config.publisher, event).await?;
            } else {
                to_send.push(message);
                stored.push(event);
            }
        }
        self.metrics.observe_batch(to_send.len());
        // Waves: the k-th event of every aggregate goes in wave k, so when an event fails its
        // successors in this batch have not been sent yet and are held behind it.
        for wave in waves(&stored) {
            let mut sending = Vec::with_capacity(wave.len());
            let mut messages = Vec::with_capacity(wave.len());
            for i in wave {
                if blocked.contains(&aggregate_key(stored[i])) {
                    self.failed.hold(&self.config.publisher, stored[i]).await?;
                } else {
                    sending.push(stored[i]);
                    messages.push(to_send[i].clone());
                }
            }
            if messages.is_empty() {
                continue;
            }
            let results = self.broker.send_batch(&messages).await;
            for ((event, message), result) in sending.into_iter().zip(&messages).zip(results) {
                match result {
                    Ok(()) => self.on_published(event, message),
                    Err(error) => {
                        if self.on_failed(event, message, &error, 0).await? {
                            blocked.insert(aggregate_key(event));
                        }
                    }
                }
            }
        }
        self.commit_round(batch.advance, &owned).await?;
        Ok(RoundOutcome {
            read: read + retried,
            full,
            blocked_by_circuit: None,
        })
    }

    /// Moves the cursors; shards whose move was refused were lost to another worker since
    /// the read (its lease epoch changed): they are dropped, and their events count once.
    async fn commit_round(&self, advance: CursorAdvance, owned: &[i16]) -> Result<(), StoreError> {
        let refused = self.reader.commit(advance).await?.refused;
        if !refused.is_empty() {
            tracing::warn!(worker = self.leases.worker_id(), lost = ?refused, "shards lost during the round; dropping them");
            if let Ok(mut next) = self.next_owned.lock() {
                next.get_or_insert_with(|| owned.to_vec())
                    .retain(|s| !refused.contains(s));
            }
        }
        Ok(())
    }

    fn message(&self, event: &StoredEvent) -> Message {
        Message {
            position: event.position,
            destination: self.config.routing.destination(&event.event),
            event: Arc::new(event.event.clone()),
        }
    }

    /// Asks every destination's circuit for a permit; Some(wait) when one refuses.
    fn circuits_reject(&self, messages: &[Message]) -> Option<Duration> {
        let now = Instant::now();
        let destinations: HashSet<&str> = messages.iter().map(|m| m.destination.as_str()).collect();
        let mut circuits = self.circuits.lock().ok()?;
        for destination in destinations {
            let circuit = circuits
                .entry(destination.to_owned())
                .or_insert_with(|| CircuitBreaker::new(self.config.circuit_breaker.clone()));
            let permit = circuit.try_acquire(now);
            self.report_transitions(destination, circuit);
            if let Permit::Rejected { retry_in } = permit {
                return Some(retry_in);
            }
        }
        None
    }

    fn record_circuit(&self, destination: &str, success: bool) {
        let now = Instant::now();
        let Ok(mut circuits) = self.circuits.lock() else { return };
        let circuit = circuits
            .entry(destination.to_owned())
            .or_insert_with(|| CircuitBreaker::new(self.config.circuit_breaker.clone()));
        if success {
            circuit.record_success(now);
        } else {
            circuit.record_failure(now);
        }
        self.report_transitions(destination, circuit);
    }

    /// Logs and exports every state change of a destination's circuit exactly once.
    fn report_transitions(&self, destination: &str, circuit: &mut CircuitBreaker) {
        for t in circuit.take_transitions() {
            tracing::warn!(
                destination,
                from = t.from.as_str(),
                to = t.to.as_str(),
                "circuit state changed"
            );
            self.metrics.set_circuit_state(destination, t.to.as_gauge());
        }
    }

    fn on_published(&self, event: &StoredEvent, message: &Message) {
        let now = Utc::now();
        let latency = (now - event.recorded_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
        self.metrics.published(&event.event.event_type, &message.destination, 1);
        self.metrics.observe_commit_to_ack(latency.max(0.0));
        self.totals.published.fetch_add(1, Ordering::Relaxed);
        self.totals
            .last_published_ms
            .store(now.timestamp_millis(), Ordering::Relaxed);
        self.record_circuit(&message.destination, true);
        tracing::debug!(
            event_id = %event.event.event_id,
            aggregate_id = %event.event.aggregate_id,
            correlation_id = event.event.metadata.correlation_id.as_deref().unwrap_or_default(),
            destination = %message.destination,
            "published"
        );
    }

    /// Records a failed attempt; returns true when the event now waits for a retry (its
    /// aggregate is blocked), false when it was dead-lettered.
    async fn on_failed(
        &self,
        event: &StoredEvent,
        message: &Message,
        error: &SendError,
        previous_attempts: u32,
    ) -> Result<bool, StoreError> {
        let consumer = &self.config.publisher;
        let event_type = &event.event.event_type;
        self.metrics
            .failed(event_type, &message.destination, error.is_retriable());
        self.totals.failed.fetch_add(1, Ordering::Relaxed);
        if error.is_retriable() {
            self.record_circuit(&message.destination, false);
        }
        let attempt = previous_attempts + 1;
        let span = tracing::warn_span!(
            "delivery_failed",
            event_id = %event.event.event_id,
            aggregate_id = %event.event.aggregate_id,
            correlation_id = event.event.metadata.correlation_id.as_deref().unwrap_or_default(),
            destination = %message.destination,
            attempt,
        );
        let _entered = span.enter();
        match self.config.retry.decide(attempt, error) {
            RetryDecision::RetryAfter(delay) => {
                let next = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                self.failed
                    .record_attempt(consumer, event, error.message(), Some(next))
                    .await?;
                self.metrics.retried(event_type, &message.destination);
                tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "delivery failed; will retry");
                Ok(true)
            }
            RetryDecision::DeadLetter { reason } => {
                if let Err(e) = self.broker.send_dead_letter(message, &reason).await {
                    // The failed_events row below is the durable dead letter either way.
                    tracing::error!(error = %e, "dead-letter destination refused the event");
                }
                self.failed.record_attempt(consumer, event, &reason, None).await?;
                self.metrics.dead_lettered(event_type, &message.destination);
                self.totals.dead_lettered.fetch_add(1, Ordering::Relaxed);
                tracing::error!(reason = %reason, "event dead-lettered");
                Ok(false)
            }
        }
    }

    /// Sends the due head of each blocked aggregate (one per aggregate keeps order).
    async fn retry_due(&self, owned: &[i16]) -> Result<usize, StoreError> {
        let consumer = &self.config.publisher;
        let heads = self.failed.due_heads(consumer, owned, 100).await?;
        if heads.is_empty() {
            return Ok(0);
        }
        let messages: Vec<Message> = heads.iter().map(|e| self.message(e)).collect();
        if self.circuits_reject(&messages).is_some() {
            return Ok(0);
        }
        let results = self.broker.send_batch(&messages).await;
        for ((event, message), result) in heads.iter().zip(&messages).zip(results) {
            match result {
                Ok(()) => {
                    self.failed.mark_delivered(consumer, event.event.event_id).await?;
                    self.on_published(event, message);
                }
                Err(error) => {
                    let attempts = self.failed.attempts(consumer, event.event.event_id).await?;
                    self.on_failed(event, message, &error, u32::try_from(attempts).unwrap_or(0))
                        .await?;
                }
            }
        }
        Ok(heads.len())
    }
}

/// Splits a batch (in position order) into waves: wave k holds the k-th event of each
/// aggregate, in position order. Returns indexes into `events`.
fn waves(events: &[&StoredEvent]) -> Vec<Vec<usize>> {
    let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
    let mut waves: Vec<Vec<usize>> = Vec::new();
    for (i, event) in events.iter().enumerate() {
        let n = seen
            .entry((&event.event.aggregate_type, &event.event.aggregate_id))
            .or_insert(0);
        if waves.len() <= *n {
            waves.push(Vec::new());
        }
        waves[*n].push(i);
        *n += 1;
    }
    waves
}

fn aggregate_key(event: &StoredEvent) -> (String, String) {
    (event.event.aggregate_type.clone(), event.event.aggregate_id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{NewEvent, validate::enrich};

    fn stored(position: i64, aggregate: &str) -> StoredEvent {
        let draft = NewEvent::raw("Stockout", "InventoryItem", aggregate, 1, serde_json::json!({}));
        StoredEvent {
            position,
            shard: 0,
            recorded_at: Utc::now(),
            event: enrich(draft, "", Utc::now()),
        }
    }

    #[test]
    fn waves_hold_the_kth_event_of_each_aggregate_in_position_order() {
        let events = [
            stored(1, "a"),
            stored(2, "b"),
            stored(3, "a"),
            stored(4, "c"),
            stored(5, "a"),
            stored(6, "b"),
        ];
        let refs: Vec<&StoredEvent> = events.iter().collect();
        assert_eq!(waves(&refs), vec![vec![0, 1, 3], vec![2, 5], vec![4]]);
        assert!(waves(&[]).is_empty());
    }
}
