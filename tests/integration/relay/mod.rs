//! The relay worker end to end against the real brokers and PostgreSQL.

mod config;
mod crash;
mod destinations;
mod isolation;
mod ordering;
mod outage;
mod poison;
mod replicas;
mod scaling;
mod steady_state;
mod stop;
mod wake_up;

use std::sync::Arc;
use std::time::Duration;

use inventory_outbox::delivery::{Engine, EngineError};
use inventory_outbox::event::DomainEvent;
use inventory_outbox::publisher::InventoryEventPublisher;
use inventory_outbox::relay::config::RelayConfig;
use inventory_outbox::store::{SchemaName, Store};
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::event_core::stock_changed;
use crate::support::postgres::TestDatabase;

/// A relay worker running in this process.
pub struct RunningRelay {
    pub relay: Arc<Engine>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), EngineError>>,
}

impl RunningRelay {
    /// Graceful stop: the worker releases its shards.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.await.expect("relay task").expect("relay stopped cleanly");
    }

    /// Crash: the task is dropped mid-flight, leases are left to expire.
    pub fn crash(self) {
        self.task.abort();
    }
}

/// A relay config document for `publisher` with `broker` (the value of `broker:`) and
/// `routing`, with fast retries for tests and the default leases (so the replica and scaling
/// tests measure the takeover a deployment gets).
pub fn relay_config(publisher: &str, broker: Value, routing: Value) -> RelayConfig {
    let doc = json!({
        "publisher": publisher,
        "outbox": {"databaseUrlEnv": "UNUSED_IN_PROCESS", "batchSize": 500, "migrate": false},
        "broker": broker,
        "routing": routing,
        "retry": {"initialIntervalMs": 100, "maxIntervalMs": 1000, "maxAttempts": 4, "jitter": 0.1},
        "circuitBreaker": {"failureThreshold": 5, "openDurationMs": 2000},
    });
    let config: RelayConfig = serde_json::from_value(doc).expect("relay config");
    config.validate().expect("valid relay config");
    config
}

/// Starts a relay worker in-process on the test database.
pub async fn start_relay(db: &TestDatabase, config: RelayConfig, worker_id: &str) -> RunningRelay {
    inventory_outbox::tls::install_crypto_provider();
    let store = Store::from_pool(db.pool.clone(), SchemaName::default());
    let broker = config.broker.connect().await.expect("connect broker");
    let relay = Arc::new(Engine::new(config, store, broker, worker_id));
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(relay.clone().run(shutdown));
    RunningRelay { relay, stop, task }
}

/// Commits `per_writer` events from each of `writers` concurrent writers over `aggregates`
/// aggregates, each event in its own transaction; returns the committed events in commit order
/// per aggregate (the payload's `newQuantity` is the aggregate's sequence number).
pub async fn write_events(
    publisher: &InventoryEventPublisher,
    db: &TestDatabase,
    writers: usize,
    per_writer: usize,
    aggregates: usize,
) -> Vec<DomainEvent> {
    sqlx::query("CREATE TABLE IF NOT EXISTS relay_stock (item_id uuid PRIMARY KEY, version bigint NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let items: Vec<Uuid> = (0..aggregates).map(|_| Uuid::now_v7()).collect();
    for item in &items {
        sqlx::query("INSERT INTO relay_stock VALUES ($1, 0)")
            .bind(item)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (pool, publisher, items) = (db.pool.clone(), publisher.clone(), items.clone());
        tasks.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for _ in 0..per_writer {
                let item = items[rand::rng().random_range(0..items.len())];
                let mut tx = pool.begin().await.unwrap();
                let version: i64 = sqlx::query_scalar(
                    "UPDATE relay_stock SET version = version + 1 WHERE item_id = $1 RETURNING version",
                )
                .bind(item)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
                let event = publisher
                    .publish_event(&mut tx, stock_changed(item, version))
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                written.push(event);
            }
            written
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Checks that `received` holds every event of `sent` exactly once (returns the duplicates
/// count when `allow_duplicates`), and that per aggregate the sequence numbers are 1, 2, 3, …
/// in arrival order, ignoring redeliveries.
pub fn assert_delivered(sent: &[DomainEvent], received: &[DomainEvent], allow_duplicates: bool) -> usize {
    use std::collections::{HashMap, HashSet};
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    let mut per_aggregate: HashMap<&str, Vec<i64>> = HashMap::new();
    for e in received {
        if !seen.insert(e.event_id) {
            duplicates += 1;
            continue;
        }
        per_aggregate
            .entry(&e.aggregate_id)
            .or_default()
            .push(e.payload["newQuantity"].as_i64().unwrap_or(-1));
    }
    assert!(allow_duplicates || duplicates == 0, "{duplicates} duplicate deliveries");
    let expected: HashSet<Uuid> = sent.iter().map(|e| e.event_id).collect();
    let missing = expected.difference(&seen).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} committed events never arrived",
        expected.len()
    );
    for (aggregate, sequence) in per_aggregate {
        let in_order: Vec<i64> = (1..=sequence.len() as i64).collect();
        assert_eq!(sequence, in_order, "aggregate {aggregate} arrived out of commit order");
    }
    duplicates
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
