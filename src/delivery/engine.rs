//! The delivery engine's loop. Each round, for the shards this worker leases:
//! 1. due chains: for each blocked aggregate whose head is due, the head and the held events
//!    behind it, sent in waves so a backlog built up during an outage drains at full speed in
//!    order instead of one event per aggregate per round;
//! 2. new events: a gap-free batch from the outbox; events of aggregates with a failed event
//!    wait behind it ("held"); the rest go to the broker in pipelined waves;
//! 3. outcomes: acked → published; a failure → `failed_events` with the next retry time (later
//!    events of the aggregate held), or dead-lettered for a message-level error or after
//!    `maxAttempts` counted attempts;
//! 4. only then the cursor moves, so a crash at any point re-sends, never skips.
//!
//! While a batch is being delivered the next one is read ahead from where the current
//! batch's cursor move leaves the cursors, so the database read overlaps the broker round
//! trip; at most two batches are in memory. With a broker that keeps order across calls
//! (Kafka) the read-ahead is handed over as soon as the current batch is queued, within the
//! same round; otherwise it is used by the next round, on the same shards, after the current
//! move was committed for every shard, or dropped (nothing of it was sent, no cursor moved).
//!
//! Each destination has its own circuit: an open one holds only its own events (parked as
//! retrying heads without a counted attempt, or, with a single destination, left in the
//! outbox), a half-open one lets single probe messages through. Attempts are counted only
//! while the circuit is closed and never for destination-level errors, so an outage cannot
//! dead-letter events that did nothing wrong.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{Notify, RwLock, watch};

use super::circuit::{CircuitBreaker, CircuitState, Permit};
use super::config::{DeliveryConfig, WakeUp};
use super::health::HealthState;
use super::metrics::DeliveryMetrics;
use super::retry::RetryDecision;
use super::waves;
use crate::broker::routing::Routing;
use crate::broker::{BoxFuture, Broker, Message, SendError};
use crate::schema::registry::{RegistryError, SchemaRegistry};
use crate::store::events::StoredEvent;
use crate::store::failed::{FailedEvents, FailedStatus};
use crate::store::leases::{HeartbeatReport, LeaseManager};
use crate::store::outbox::{CursorAdvance, OutboxReader, ReadBatch, SHARDS};
use crate::store::{Store, StoreError};

/// Errors that stop a delivery engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
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

/// One delivery worker: owns some shards of a consumer and delivers their events in order.
pub struct Engine {
    config: DeliveryConfig,
    store: Store,
    reader: OutboxReader,
    failed: FailedEvents,
    /// Registered schemas: a payload that fails its (type, version) schema is never published.
    registry: SchemaRegistry,
    broker: Arc<dyn Broker>,
    /// Destinations already created (or found) on the broker by `ensure_destinations`.
    ensured: Mutex<HashSet<String>>,
    leases: LeaseManager,
    circuits: Mutex<HashMap<String, CircuitBreaker>>,
    metrics: Arc<DeliveryMetrics>,
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

impl Engine {
    /// A worker for `config` on an already migrated store.
    pub fn new(config: impl Into<DeliveryConfig>, store: Store, broker: Arc<dyn Broker>, worker_id: &str) -> Self {
        let config = config.into();
        let consumer = config.consumer.clone();
        let reader = OutboxReader::new(store.clone(), consumer.clone()).with_owner(worker_id);
        let lease = Duration::from_millis(config.lease_duration_ms);
        let leases = LeaseManager::new(store.clone(), consumer.clone(), worker_id, lease);
        // Outside broker calls a round takes a few store round trips; broker calls are bounded by
        // the adapter's own timeout and tracked separately, so an outage never fails liveness.
        let stall_after = Duration::from_millis(config.max_poll_interval_ms * 4 + 30_000);
        let health = Arc::new(HealthState::new(stall_after, broker.send_budget()));
        Self {
            reader,
            failed: FailedEvents::new(store.clone()),
            registry: SchemaRegistry::new(store.clone()),
            ensured: Mutex::new(HashSet::new()),
            broker,
            leases,
            circuits: Mutex::new(HashMap::new()),
            metrics: Arc::new(DeliveryMetrics::new(&consumer)),
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

    pub fn metrics(&self) -> Arc<DeliveryMetrics> {
        self.metrics.clone()
    }

    pub fn failed_events(&self) -> FailedEvents {
        self.failed.clone()
    }

    /// Runs until `shutdown` turns true, then releases its shards.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) -> Result<(), EngineError> {
        let all: Vec<i16> = (0..SHARDS).collect();
        self.reader.ensure_cursors(&all).await?;
        // Every destination the routing can name, plus the dead-letter destination and the
        // configured consumer queues. A failure is an error, and those destinations are created
        // again before their first send (whose events wait, never dead-lettered, until then).
        let destinations = self.config.routing.known_destinations();
        match self.broker.ensure_destinations(&destinations).await {
            Ok(()) => {
                if let Ok(mut ensured) = self.ensured.lock() {
                    ensured.extend(destinations);
                }
            }
            Err(e) => tracing::error!(
                error = %e,
                broker = self.broker.kind(),
                "could not create destinations at start; they are created before their first send"
            ),
        }
        *self.owned.write().await = self.leases.tick(&self.report()).await?;
        self.health.set_database_reachable(true);
        let background = tokio::spawn(self.clone().background(shutdown.clone()));
        let broker_watch = tokio::spawn(self.clone().watch_broker(shutdown.clone()));
        let backlog_watch = tokio::spawn(self.clone().watch_backlog(shutdown.clone()));
        // A polling worker never listens: its heartbeat tells writers not to notify.
        let listener = (self.config.wake_up == WakeUp::Notify).then(|| tokio::spawn(self.clone().listen_for_inserts()));

        let min_poll = Duration::from_millis(self.config.min_poll_interval_ms);
        let max_poll = Duration::from_millis(self.config.max_poll_interval_ms);
        let mut idle_wait = min_poll;
        let mut ahead: Option<ReadAhead> = None;
        let result = loop {
            if *shutdown.borrow() {
                break Ok(());
            }
            let outcome = match self.round(ahead.take()).await {
                Ok((o, next)) => {
                    ahead = next;
                    o
                }
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
            } else if outcome.full || ahead.is_some() {
                idle_wait = min_poll;
                continue;
            } else if outcome.read > 0 {
                idle_wait = min_poll;
                min_poll
            } else if self.config.wake_up == WakeUp::Poll {
                // Nothing wakes a polling worker earlier, so it does not back off.
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
        broker_watch.abort();
        backlog_watch.abort();
        if let Some(listener) = listener {
            listener.abort();
        }
        self.leases.release_all().await?;
        tracing::info!(
            worker = self.leases.worker_id(),
            "relay stopped and released its shards"
        );
        result
    }

    /// Wakes the loop on the store's coalesced NOTIFY (one per inserting transaction).
    async fn listen_for_inserts(self: Arc<Self>) -> Result<(), EngineError> {
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

    /// Heartbeats and leases, nothing else: a lease renewed late hands shards to another
    /// worker mid-batch, so slower work (backlog figures, broker checks) has its own tasks.
    async fn background(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        // Fixed rate from tick start to tick start: a slow tick shortens the next wait instead
        // of adding to it, so a renewal is never later than one slow statement.
        let mut every = tokio::time::interval(Duration::from_millis(self.config.heartbeat_interval_ms));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await; // the first tick is immediate, and `run` has just ticked
        let lease = Duration::from_millis(self.config.lease_duration_ms);
        let mut renewed_at = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = every.tick() => {}
            }
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
            // The heartbeat is the database round trip readiness relies on.
            self.health.set_database_reachable(outcome.is_ok());
            match outcome {
                Ok(()) => {
                    // Said before it costs anything: past the lease, another worker may take
                    // these shards mid-batch and send that batch again.
                    let gap = renewed_at.elapsed();
                    if gap > lease / 2 {
                        tracing::warn!(
                            worker = self.leases.worker_id(),
                            since_last_renewal_ms = gap.as_millis(),
                            lease_ms = lease.as_millis(),
                            "shard leases renewed late (a slow database or an overloaded node)"
                        );
                    }
                    renewed_at = tokio::time::Instant::now();
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    }

    /// Backlog and failed-event figures every five heartbeats; their queries scan the pending
    /// events, which after an outage can take a while.
    async fn watch_backlog(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let every = Duration::from_millis(self.config.heartbeat_interval_ms.saturating_mul(5));
        loop {
            if let Err(e) = self.refresh_backlog().await {
                tracing::warn!(error = %e, "backlog figures failed");
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Checks the broker every second while it is unreachable (so readiness returns within a
    /// second of the broker) and every 5 s otherwise, in its own task so a slow check never
    /// delays lease renewal.
    async fn watch_broker(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let reachable = self.broker.check_health().await;
            if let Err(e) = &reachable {
                tracing::warn!(error = %e, broker = self.broker.kind(), "broker health check failed");
            }
            self.health
                .set_broker_health(reachable.as_ref().map(|_| ()).map_err(|e| e.message().to_owned()));
            let wait = if reachable.is_ok() {
                Duration::from_secs(5)
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(wait) => {}
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
            polls: self.config.wake_up == WakeUp::Poll,
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
        let backlog =
            crate::store::status::backlog(&self.store, &self.config.consumer, Some(self.leases.worker_id())).await?;
        self.metrics.set_backlog(backlog.events, backlog.oldest_age_seconds);
        let counts = self.failed.counts(&self.config.consumer).await?;
        let count = |s: FailedStatus| counts.iter().find(|(k, _)| *k == s).map_or(0, |(_, n)| *n);
        let (retrying, dead) = (
            count(FailedStatus::Retrying) + count(FailedStatus::Held),
            count(FailedStatus::DeadLettered),
        );
        self.metrics.set_failed_events(retrying, dead);
        if retrying + dead > self.config.failed_event_threshold {
            tracing::warn!(
                retrying,
                dead_lettered = dead,
                threshold = self.config.failed_event_threshold,
                "failed events exceed health.failedEventThreshold"
            );
        }
        Ok(())
    }

    /// One read-send-commit round over the owned shards, using `ahead` when it was read on
    /// them; returns the next batch when it was read ahead during this one.
    async fn round(&self, ahead: Option<ReadAhead>) -> Result<(RoundOutcome, Option<ReadAhead>), StoreError> {
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
            return Ok((RoundOutcome::default(), None));
        }
        let consumer = &self.config.consumer;
        let block = self.config.block_aggregate_after_dead_letter;
        let limit = i64::try_from(self.config.batch_size).unwrap_or(1000);

        // 1. Blocked aggregates whose head is due: the head and the held events behind it.
        let chains = self.failed.due_chains(consumer, &owned, limit, block).await?;
        let chain_rows = chains.len();
        let mut pending = Vec::with_capacity(chain_rows);
        for chain in &chains {
            pending.push(Pending {
                stored: &chain.stored,
                message: self.message(&chain.stored),
                attempts: Some(chain.attempts),
            });
        }
        let retried = self.deliver(pending, &mut HashSet::new(), Pipeline::default()).await?;

        // 2. New events. With one destination whose circuit is open nothing could be sent:
        // leave them in the outbox (cursor unchanged) rather than park every one of them.
        if let Routing::Single { destination } = &self.config.routing
            && let Some(wait) = self.open_for(destination)
        {
            let outcome = RoundOutcome {
                read: retried.delivered,
                full: retried.delivered > 0,
                blocked_by_circuit: (retried.delivered == 0).then_some(wait),
            };
            return Ok((outcome, None));
        }
        let batch = match ahead {
            Some(ahead) if ahead.shards == *owned => ahead.batch,
            _ => self.reader.read(&owned, self.config.batch_size).await?,
        };
        let read = batch.events.len();
        let full = read == self.config.batch_size;
        if read == 0 {
            self.commit_round(batch.advance, &owned).await?;
            let outcome = RoundOutcome {
                read: retried.delivered,
                full: retried.delivered > 0 || chain_rows as i64 == limit,
                blocked_by_circuit: retried.rejected_for.filter(|_| retried.delivered == 0),
            };
            return Ok((outcome, None));
        }
        let mut blocked: HashSet<(String, String)> = self
            .failed
            .blocked_aggregates_for(consumer, block)
            .await?
            .into_iter()
            .collect();
        let started = Instant::now();
        let mut batch = batch;
        let mut handed: Option<Handed> = None;
        let (mut read_total, mut delivered_fresh) = (0, 0);
        let mut rejected_for: Option<Duration> = None;
        // Each pass delivers one batch; when the broker keeps order across calls, the next
        // batch is read and handed over while this one's acknowledgements are outstanding, and
        // the pass after it starts with that batch already on its way. Nothing is in flight
        // when the round ends, which is what lets shards change hands between rounds.
        let (ahead, all_moved) = loop {
            read_total += batch.events.len();
            self.metrics.observe_batch(batch.events.len());
            // A batch handed over already brings its messages along: built once per event.
            let messages: Vec<Message> = match handed.as_mut() {
                Some(handed) => std::mem::take(&mut handed.messages),
                None => batch.events.iter().map(|e| self.message(e)).collect(),
            };
            let pending: Vec<Pending> = batch
                .events
                .iter()
                .zip(messages)
                .map(|(stored, message)| Pending {
                    stored,
                    message,
                    attempts: None,
                })
                .collect();
            let pipeline = Pipeline {
                handed: handed.take(),
                queued: None,
            };
            let (fresh, next) = if self.config.read_ahead {
                // Read the next batch while this one is on its way to the broker: with a
                // backlog the read overlaps the broker round trip, and under a steady load the
                // events committed during this send are in hand when it ends.
                let follow = self.may_follow(started);
                let (queued, on_queued) = tokio::sync::oneshot::channel();
                let pipeline = Pipeline {
                    queued: follow.then_some(queued),
                    ..pipeline
                };
                let blocked_before = if follow { blocked.clone() } else { HashSet::new() };
                let (fresh, next) = tokio::join!(
                    self.deliver(pending, &mut blocked, pipeline),
                    self.read_next(&owned, &batch.advance, follow.then_some((on_queued, blocked_before)))
                );
                match fresh {
                    Ok(fresh) => (fresh, next),
                    Err(e) => {
                        self.drain(next).await;
                        return Err(e);
                    }
                }
            } else {
                (self.deliver(pending, &mut blocked, pipeline).await?, None)
            };
            delivered_fresh += fresh.delivered;
            rejected_for = rejected_for.or(fresh.rejected_for);
            let all_moved = match self.commit_round(batch.advance, &owned).await {
                Ok(all_moved) => all_moved,
                Err(e) => {
                    self.drain(next).await;
                    return Err(e);
                }
            };
            match next {
                Some((next, Some(next_handed))) if all_moved => {
                    batch = next;
                    handed = Some(next_handed);
                }
                handed @ Some((_, Some(_))) => {
                    // Shards lost since the read: their new owner sends these events again.
                    self.drain(handed).await;
                    break (None, false);
                }
                Some((next, None)) => break (Some(next), all_moved),
                None => break (None, all_moved),
            }
        };
        let delivered = retried.delivered + delivered_fresh;
        let outcome = RoundOutcome {
            read: read_total + retried.delivered,
            full: full || retried.delivered > 0 || chain_rows as i64 == limit,
            blocked_by_circuit: None
                .or(retried.rejected_for)
                .or(rejected_for)
                .filter(|_| delivered == 0),
        };
        // An empty read-ahead is dropped rather than kept: by the next round it is stale, and
        // it moved nothing (its watch-list update is read again).
        let ahead = ahead
            .filter(|b| all_moved && !b.events.is_empty())
            .map(|batch| ReadAhead {
                shards: owned.clone(),
                batch,
            });
        Ok((outcome, ahead))
    }

    /// Waits for the acknowledgements of a batch handed over that will not be delivered (its
    /// events are read and sent again), so nothing is in flight once the round ends.
    async fn drain(&self, next: Option<(ReadBatch, Option<Handed>)>) {
        if let Some((_, Some(handed))) = next {
            handed.acks.await;
            self.health.send_finished();
        }
    }

    /// Whether the batch being delivered may be followed by the next before its outcome is
    /// known: the broker keeps order across calls (so a successor handed over behind a failed
    /// event is the case of a successor behind it in the same call: failed with it, or counted
    /// when the broker wrote it anyway), the round is young (due retries and lease changes
    /// wait for the round's end) and no shard change waits.
    fn may_follow(&self, round_started: Instant) -> bool {
        self.broker.orders_across_calls()
            && round_started.elapsed() < Duration::from_millis(self.config.heartbeat_interval_ms)
            && !self.leases.has_pending_release()
            && self.next_owned.lock().is_ok_and(|n| n.is_none())
    }

    /// Reads the batch after the one being delivered and, when `follow` is given, hands it
    /// over as soon as the current one is queued at the broker, provided nothing in it could
    /// need the current batch's outcome first ([`Engine::can_follow`]).
    async fn read_next(
        &self,
        owned: &[i16],
        previous: &CursorAdvance,
        follow: Option<(OnQueued, HashSet<(String, String)>)>,
    ) -> Option<(ReadBatch, Option<Handed>)> {
        let next = self
            .reader
            .read_after(owned, self.config.batch_size, previous)
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "reading ahead failed; the next round reads again"))
            .ok()?;
        let Some((on_queued, blocked)) = follow.filter(|_| !next.events.is_empty()) else {
            return Some((next, None));
        };
        // The current batch's stopped aggregates once it is queued; None: it cannot be followed.
        let Ok(Some(stopped)) = on_queued.await else {
            return Some((next, None));
        };
        let Some((messages, wave)) = self.can_follow(&next, &blocked, &stopped).await else {
            return Some((next, None));
        };
        self.health.send_started();
        self.metrics.batch_followed();
        let handed = self.broker.hand_over(&wave).await;
        let refused = refused_aggregates(&wave, &handed.refused);
        Some((
            next,
            Some(Handed {
                refused,
                acks: handed.acks,
                messages,
            }),
        ))
    }

    /// The messages of `next` in batch order and in the order [`Engine::deliver`] sends its
    /// one wave (the same `Arc`ed events), when all of it can go out now: one wave, no event of a stopped or blocked aggregate, every payload
    /// valid against its schema, every destination created and its circuit closed. Anything
    /// else waits for the normal path, which sees the current batch's outcome.
    async fn can_follow(
        &self,
        next: &ReadBatch,
        blocked: &HashSet<(String, String)>,
        stopped: &HashSet<(String, String)>,
    ) -> Option<(Vec<Message>, Vec<Message>)> {
        let messages: Vec<Message> = next.events.iter().map(|e| self.message(e)).collect();
        let plan = waves(
            &messages,
            |m| {
                (
                    m.event.aggregate_type.as_str(),
                    m.event.aggregate_id.as_str(),
                    m.destination.as_str(),
                )
            },
            self.broker.keeps_aggregate_order(),
        );
        let [wave] = plan.as_slice() else { return None };
        for event in &next.events {
            let aggregate = aggregate_key(event);
            if blocked.contains(&aggregate) || stopped.contains(&aggregate) {
                return None;
            }
            if !matches!(self.check_schema(event).await, Ok(Ok(()))) {
                return None;
            }
        }
        let ensured = self.ensured.lock().ok()?;
        let now = Instant::now();
        let circuits = self.circuits.lock().ok()?;
        let ready =
            |d: &str| ensured.contains(d) && circuits.get(d).is_none_or(|c| c.state(now) == CircuitState::Closed);
        if !messages.iter().all(|m| ready(&m.destination)) {
            return None;
        }
        drop((ensured, circuits));
        let in_wave = wave.iter().filter_map(|&i| messages.get(i).cloned()).collect();
        Some((messages, in_wave))
    }

    /// Sends events in waves, asking each destination's circuit per wave. A wave never holds
    /// an event whose predecessor's outcome could still stop it: with a broker that keeps
    /// aggregate order within a call (Kafka) an aggregate's run of events to one destination
    /// shares a wave, so a batch to one topic is one call; otherwise wave k carries the k-th
    /// event of every aggregate. `stopped` holds the aggregates that must not go on: those
    /// blocked before, and those whose event failed here. An event read fresh from the outbox
    /// behind a stopped aggregate is parked as held; an event of a chain already has its row.
    /// Events the adapter withheld behind a failure of their aggregate in the same call go
    /// again in a wave of their own when the failure does not stop the aggregate (a dead
    /// letter without `deadLetter.blockAggregate`).
    ///
    /// With `pipeline.handed` the batch is already on its way as one wave (see
    /// [`Engine::can_follow`]); an event whose aggregate was stopped after it was handed over is
    /// treated like one sent behind a failure in the same call. `pipeline.queued` is told when
    /// the batch is queued at the broker, so the next batch may follow it.
    async fn deliver(
        &self,
        events: Vec<Pending<'_>>,
        stopped: &mut HashSet<(String, String)>,
        mut pipeline: Pipeline,
    ) -> Result<Delivered, StoreError> {
        let consumer = &self.config.consumer;
        let mut outcome = Delivered::default();
        let mut delivered_ids = Vec::new();
        let together = self.broker.keeps_aggregate_order();
        let mut queue: VecDeque<Vec<usize>> = waves(
            &events,
            |p| {
                let e = &p.stored.event;
                (
                    e.aggregate_type.as_str(),
                    e.aggregate_id.as_str(),
                    p.message.destination.as_str(),
                )
            },
            together,
        )
        .into();
        while let Some(wave) = queue.pop_front() {
            let mut hold = Vec::new();
            let mut park: Vec<(&StoredEvent, Duration, &str)> = Vec::new();
            let mut sending: Vec<(&Pending, Gate)> = Vec::with_capacity(wave.len());
            // `sending[k]` is `events[sending_index[k]]`.
            let mut sending_index: Vec<usize> = Vec::with_capacity(wave.len());
            let mut hold_behind: Vec<&StoredEvent> = Vec::new();
            let pre_sent = pipeline.handed.is_some();
            let results = if let Some(handed) = pipeline.handed.take() {
                sending = wave.iter().map(|&i| (&events[i], Gate::Allowed)).collect();
                sending_index.clone_from(&wave);
                // Queued already: the next batch may follow at once, behind what is stopped so
                // far and what this one had refused before the broker.
                if let Some(queued) = pipeline.queued.take() {
                    tell_queued(queued, stopped, handed.refused);
                }
                let results = handed.acks.await;
                self.health.send_finished();
                if results.iter().any(Result::is_ok) {
                    self.health.set_broker_reachable(true);
                }
                results
            } else {
                let mut gates: HashMap<&str, Gate> = HashMap::new();
                for &i in &wave {
                    let item = &events[i];
                    if stopped.contains(&aggregate_key(item.stored)) {
                        if item.attempts.is_none() {
                            hold.push(item.stored);
                        }
                        continue;
                    }
                    if let Err(error) = self.check_schema(item.stored).await? {
                        // At once, not after the loop: the aggregate's next event may be in this wave.
                        let attempts = u32::try_from(item.attempts.unwrap_or(0)).unwrap_or(0);
                        if self
                            .on_failed(item.stored, &item.message, &error, attempts, true)
                            .await?
                        {
                            stopped.insert(aggregate_key(item.stored));
                        }
                        continue;
                    }
                    let destination = item.message.destination.as_str();
                    let gate = match gates.get(destination) {
                        Some(gate @ (Gate::Allowed | Gate::Rejected(_))) => *gate,
                        _ => {
                            let gate = self.acquire(destination);
                            if !matches!(gate, Gate::Probe) {
                                gates.insert(destination, gate);
                            }
                            gate
                        }
                    };
                    match gate {
                        Gate::Rejected(retry_in) => {
                            outcome.rejected_for = Some(outcome.rejected_for.map_or(retry_in, |r| r.min(retry_in)));
                            stopped.insert(aggregate_key(item.stored));
                            if item.attempts.is_none() {
                                park.push((item.stored, retry_in, destination));
                            }
                        }
                        Gate::Allowed | Gate::Probe => {
                            sending.push((item, gate));
                            sending_index.push(i);
                        }
                    }
                }
                self.failed.park(consumer, &hold, None).await?;
                let mut parked: HashMap<&str, (Duration, Vec<&StoredEvent>)> = HashMap::new();
                for (event, retry_in, destination) in park {
                    parked
                        .entry(destination)
                        .or_insert((retry_in, Vec::new()))
                        .1
                        .push(event);
                }
                for (destination, (retry_in, events)) in parked {
                    let at = Utc::now() + chrono::Duration::from_std(retry_in).unwrap_or_default();
                    let reason = format!("circuit of destination {destination} is open");
                    self.failed.park(consumer, &events, Some((at, reason.as_str()))).await?;
                }
                if sending.is_empty() {
                    continue;
                }
                // Only a batch sent in one wave can be followed before its outcome is known.
                let queued = pipeline.queued.take().filter(|_| queue.is_empty());
                self.send(&sending, queued.map(|tx| (tx, &*stopped))).await
            };
            // One outcome per permit: a closed circuit's permit covers every message of the wave
            // to that destination; each probe reports its own.
            let mut wave_outcome: HashMap<&str, bool> = HashMap::new();
            // Aggregates with a failed event earlier in this wave, and what stays to resend.
            let mut failed_here: HashSet<(&str, &str)> = HashSet::new();
            let mut withheld: Vec<usize> = Vec::new();
            for ((index, (item, gate)), result) in sending.iter().enumerate().zip(results) {
                let destination = item.message.destination.as_str();
                let event = &item.stored.event;
                let borrowed = (event.aggregate_type.as_str(), event.aggregate_id.as_str());
                if failed_here.contains(&borrowed) || (pre_sent && stopped.contains(&aggregate_key(item.stored))) {
                    let aggregate = aggregate_key(item.stored);
                    match &result {
                        // Not this event's failure: it was not handed over behind the first one.
                        Err(_) if stopped.contains(&aggregate) => {
                            if item.attempts.is_none() {
                                hold_behind.push(item.stored);
                            }
                            continue;
                        }
                        Err(_) => {
                            withheld.push(sending_index[index]);
                            continue;
                        }
                        // Acknowledged while its aggregate waits behind the failed event: the
                        // broker wrote it first (librdkafka's timeout gap). Said, and counted.
                        Ok(()) if stopped.contains(&aggregate) => {
                            self.metrics.aggregate_order_broken();
                            tracing::error!(
                                event_id = %item.stored.event.event_id,
                                aggregate_id = %item.stored.event.aggregate_id,
                                destination,
                                "the broker acknowledged an event after an earlier event of its aggregate failed in the same batch"
                            );
                        }
                        // The failed one was dead-lettered and does not block: in order anyway.
                        Ok(()) => {}
                    }
                }
                match &result {
                    Ok(()) => {
                        self.on_published(item.stored, &item.message);
                        outcome.delivered += 1;
                        if item.attempts.is_some() {
                            delivered_ids.push(item.stored.event.event_id);
                        }
                    }
                    Err(error) => {
                        failed_here.insert(borrowed);
                        let attempts = u32::try_from(item.attempts.unwrap_or(0)).unwrap_or(0);
                        let counted = matches!(gate, Gate::Allowed);
                        if self
                            .on_failed(item.stored, &item.message, error, attempts, counted)
                            .await?
                        {
                            stopped.insert(aggregate_key(item.stored));
                        }
                    }
                }
                let health = match &result {
                    Ok(()) => Some(true),
                    Err(e) if e.is_retriable() => Some(false),
                    Err(_) => None,
                };
                match (gate, health) {
                    (Gate::Probe, Some(ok)) => self.record_circuit(destination, ok),
                    (Gate::Allowed, Some(ok)) => {
                        let all_ok = wave_outcome.entry(destination).or_insert(true);
                        *all_ok &= ok;
                    }
                    _ => {}
                }
            }
            for (destination, ok) in wave_outcome {
                self.record_circuit(destination, ok);
            }
            self.failed.park(consumer, &hold_behind, None).await?;
            if !withheld.is_empty() {
                // Before any later wave: those may hold these aggregates' next events.
                queue.push_front(withheld);
            }
        }
        self.failed.mark_all_delivered(consumer, &delivered_ids).await?;
        Ok(outcome)
    }

    /// One pipelined broker call, creating destinations seen for the first time before it.
    /// A destination that cannot be created fails its messages (a destination-level error: the
    /// circuit and retries take over, nothing is dead-lettered for it). With `queued`, the
    /// batch is handed over first and the sender told, once it is queued, which aggregates a
    /// following batch must not be sent behind: `stopped` and those refused before the broker.
    async fn send(
        &self,
        sending: &[(&Pending<'_>, Gate)],
        queued: Option<(Queued, &HashSet<(String, String)>)>,
    ) -> Vec<Result<(), SendError>> {
        let mut unknown: Vec<String> = Vec::new();
        if let Ok(ensured) = self.ensured.lock() {
            for (item, _) in sending {
                let d = &item.message.destination;
                if !ensured.contains(d) && !unknown.contains(d) {
                    unknown.push(d.clone());
                }
            }
        }
        let mut refused: Option<SendError> = None;
        if !unknown.is_empty() {
            self.health.send_started();
            match self.broker.ensure_destinations(&unknown).await {
                Ok(()) => {
                    if let Ok(mut ensured) = self.ensured.lock() {
                        ensured.extend(unknown.iter().cloned());
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, destinations = ?unknown, "could not create destinations; their events wait");
                    refused = Some(match e {
                        SendError::Transient(m) => SendError::Transient(m),
                        SendError::Destination(m) | SendError::Message(m) => SendError::Destination(m),
                    });
                }
            }
            self.health.send_finished();
        }
        let (to_send, positions): (Vec<Message>, Vec<usize>) = sending
            .iter()
            .enumerate()
            .filter(|(_, (item, _))| refused.is_none() || !unknown.contains(&item.message.destination))
            .map(|(i, (item, _))| (item.message.clone(), i))
            .unzip();
        let mut results: Vec<Result<(), SendError>> = match &refused {
            Some(e) => vec![Err(e.clone()); sending.len()],
            None => Vec::new(),
        };
        if to_send.is_empty() {
            return results;
        }
        self.health.send_started();
        let sent = match queued.filter(|_| refused.is_none()) {
            Some((queued, stopped)) => {
                let handed = self.broker.hand_over(&to_send).await;
                tell_queued(queued, stopped, refused_aggregates(&to_send, &handed.refused));
                handed.acks.await
            }
            None => self.broker.send_batch(&to_send).await,
        };
        self.health.send_finished();
        if sent.iter().any(Result::is_ok) {
            self.health.set_broker_reachable(true);
        }
        if refused.is_none() {
            return sent;
        }
        for (i, result) in positions.into_iter().zip(sent) {
            results[i] = result;
        }
        results
    }

    /// Checks the payload against the schema registered for its (type, version): Ok(Err) is a
    /// message-level failure (dead-letter with the validation error), Err a store failure.
    async fn check_schema(&self, event: &StoredEvent) -> Result<Result<(), SendError>, StoreError> {
        let e = &event.event;
        match self.registry.validator(&e.event_type, e.version).await {
            Ok(validator) => Ok(crate::event::validate::check_payload(e, &validator)
                .map_err(|v| SendError::Message(format!("payload fails its registered schema: {v}")))),
            Err(RegistryError::Store(error)) => Err(error),
            Err(error) => Ok(Err(SendError::Message(format!(
                "payload cannot be checked against a registered schema: {error}"
            )))),
        }
    }

    /// Moves the cursors; shards whose move was refused were lost to another worker since
    /// the read (its lease epoch changed): they are dropped, and their events count once.
    /// Returns whether every shard's move went through.
    async fn commit_round(&self, advance: CursorAdvance, owned: &[i16]) -> Result<bool, StoreError> {
        let refused = self.reader.commit(advance).await?.refused;
        let all_moved = refused.is_empty();
        if !refused.is_empty() {
            tracing::warn!(worker = self.leases.worker_id(), lost = ?refused, "shards lost during the round; dropping them");
            if let Ok(mut next) = self.next_owned.lock() {
                next.get_or_insert_with(|| owned.to_vec())
                    .retain(|s| !refused.contains(s));
            }
        }
        Ok(all_moved)
    }

    fn message(&self, event: &StoredEvent) -> Message {
        Message {
            position: event.position,
            destination: self.config.routing.destination(&event.event),
            event: Arc::new(event.event.clone()),
        }
    }

    /// Asks a destination's circuit for one permit.
    fn acquire(&self, destination: &str) -> Gate {
        let now = Instant::now();
        let Ok(mut circuits) = self.circuits.lock() else {
            return Gate::Allowed;
        };
        let circuit = circuits
            .entry(destination.to_owned())
            .or_insert_with(|| CircuitBreaker::new(self.config.circuit_breaker.clone()));
        let permit = circuit.try_acquire(now);
        self.report_transitions(destination, circuit);
        match permit {
            Permit::Allowed => Gate::Allowed,
            Permit::Probe => Gate::Probe,
            Permit::Rejected { retry_in } => Gate::Rejected(retry_in),
        }
    }

    /// How long a destination's circuit stays open, when it is open (not half-open).
    fn open_for(&self, destination: &str) -> Option<Duration> {
        let now = Instant::now();
        let circuits = self.circuits.lock().ok()?;
        match circuits.get(destination)?.state(now) {
            CircuitState::Open { until } => Some(until.saturating_duration_since(now)),
            CircuitState::Closed | CircuitState::HalfOpen => None,
        }
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
            self.metrics.record_circuit_transition(destination, t.to.as_str());
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
        tracing::debug!(
            event_id = %event.event.event_id,
            aggregate_id = %event.event.aggregate_id,
            correlation_id = event.event.metadata.correlation_id.as_deref().unwrap_or_default(),
            destination = %message.destination,
            "published"
        );
    }

    /// Records a failed send; returns true when the event's aggregate must now wait (the event
    /// waits for a retry, or was dead-lettered with `deadLetter.blockAggregate` on). `counted`
    /// is false for a probe of a half-open circuit: the destination was at fault, not the event.
    async fn on_failed(
        &self,
        event: &StoredEvent,
        message: &Message,
        error: &SendError,
        previous_attempts: u32,
        counted: bool,
    ) -> Result<bool, StoreError> {
        let consumer = &self.config.consumer;
        let event_type = &event.event.event_type;
        self.metrics
            .failed(event_type, &message.destination, error.is_retriable());
        self.totals.failed.fetch_add(1, Ordering::Relaxed);
        let (decision, counts) = self.config.retry.decide_after(previous_attempts, error, counted);
        let span = tracing::warn_span!(
            "delivery_failed",
            event_id = %event.event.event_id,
            aggregate_id = %event.event.aggregate_id,
            correlation_id = event.event.metadata.correlation_id.as_deref().unwrap_or_default(),
            destination = %message.destination,
            attempt = previous_attempts + u32::from(counts),
            class = error.class(),
        );
        let _entered = span.enter();
        match decision {
            RetryDecision::RetryAfter(delay) => {
                let next = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                self.failed
                    .record_failure(consumer, event, error.message(), Some(next), counts)
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
                self.failed.record_failure(consumer, event, &reason, None, true).await?;
                self.metrics.dead_lettered(event_type, &message.destination);
                self.totals.dead_lettered.fetch_add(1, Ordering::Relaxed);
                tracing::error!(reason = %reason, "event dead-lettered");
                Ok(self.config.block_aggregate_after_dead_letter)
            }
        }
    }
}

/// The acknowledgements of a batch already handed to the broker.
type Acks = BoxFuture<'static, Vec<Result<(), SendError>>>;

/// Told once a batch is queued at the broker: the aggregates a following batch must not be
/// sent behind, or None when the batch cannot be followed before its outcome.
type Queued = tokio::sync::oneshot::Sender<Option<HashSet<(String, String)>>>;
type OnQueued = tokio::sync::oneshot::Receiver<Option<HashSet<(String, String)>>>;

/// A batch handed over behind the one being delivered.
struct Handed {
    /// Aggregates with a message refused before the broker: nothing may follow behind them.
    refused: HashSet<(String, String)>,
    acks: Acks,
    /// The batch's messages in batch order, taken by the pass that delivers it.
    messages: Vec<Message>,
}

/// How one [`Engine::deliver`] call takes part in the pipeline.
#[derive(Default)]
struct Pipeline {
    /// The batch was handed over already, as one wave with every event allowed.
    handed: Option<Handed>,
    /// Told when this batch is queued, so the next may follow it.
    queued: Option<Queued>,
}

/// A batch read ahead during the previous round, and the shards it was read on.
struct ReadAhead {
    shards: Vec<i16>,
    batch: ReadBatch,
}

/// One event on its way, with what the store knows of its past.
struct Pending<'a> {
    stored: &'a StoredEvent,
    message: Message,
    /// Counted attempts so far; None for an event read fresh from the outbox (no row yet).
    attempts: Option<i32>,
}

/// What a destination's circuit allows for one message of a wave.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Gate {
    /// Closed: every message of the wave to this destination, one outcome for all.
    Allowed,
    /// Half-open: this one message is a probe.
    Probe,
    /// Open, or every probe in flight: ask again after this long.
    Rejected(Duration),
}

/// What [`Engine::deliver`] did.
#[derive(Debug, Default)]
struct Delivered {
    delivered: usize,
    /// The shortest wait of a circuit that refused a message.
    rejected_for: Option<Duration>,
}

fn aggregate_key(event: &StoredEvent) -> (String, String) {
    (event.event.aggregate_type.clone(), event.event.aggregate_id.clone())
}

/// The aggregates of the messages at `positions` (those refused before the broker).
fn refused_aggregates(messages: &[Message], positions: &[usize]) -> HashSet<(String, String)> {
    positions
        .iter()
        .filter_map(|&i| messages.get(i))
        .map(|m| (m.event.aggregate_type.clone(), m.event.aggregate_id.clone()))
        .collect()
}

/// Tells the batch waiting to follow which aggregates it must not be sent behind: those
/// stopped so far and those whose message was refused before the broker.
fn tell_queued(queued: Queued, stopped: &HashSet<(String, String)>, refused: HashSet<(String, String)>) {
    let mut not_behind = stopped.clone();
    not_behind.extend(refused);
    // The reader may have given up on following (its read failed): nobody to tell.
    let _ = queued.send(Some(not_behind));
}
