//! A broker outage under load: the real Kafka process is stopped for 20 s while writers keep
//! committing. The circuit opens, nothing is lost, and it closes by itself once Kafka is back.
//!
//! The test runs its own Kafka (same cached jars, its own state directory and ports, started
//! and stopped by `hack/components/kafka.sh`), so stopping it disturbs no other test.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use inventory_outbox::event::{DomainEvent, cloudevents};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message as _};
use serde_json::json;
use tokio::sync::Mutex;
use uuid::Uuid;

use super::{assert_delivered, relay_config, start_relay};
use crate::event_core::{publisher, stock_changed};
use crate::support::unique_name;

const PORT: u16 = 29092;
const CONTROLLER_PORT: u16 = 29093;

/// A Kafka node of this test's own, controlled through the project's script.
struct DedicatedKafka {
    state: PathBuf,
}

impl DedicatedKafka {
    fn script(&self, action: &str) {
        let hack = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("hack/components/kafka.sh");
        let status = Command::new("bash")
            .arg(hack)
            .arg(action)
            .env("OUTBOX_STATE", &self.state)
            .env("KAFKA_PORT", PORT.to_string())
            .env("KAFKA_CONTROLLER_PORT", CONTROLLER_PORT.to_string())
            .status()
            .expect("run hack/components/kafka.sh");
        assert!(
            status.success(),
            "kafka.sh {action} failed; logs in {}/logs",
            self.state.display()
        );
    }

    fn start() -> Self {
        let base = std::env::var("OUTBOX_STATE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir());
        let kafka = Self {
            state: base.join("outage-test"),
        };
        kafka.script("start");
        kafka
    }
}

impl Drop for DedicatedKafka {
    fn drop(&mut self) {
        self.script("stop");
    }
}

fn bootstrap() -> String {
    format!("127.0.0.1:{PORT}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kafka_outage_opens_the_circuit_loses_nothing_and_recovers_by_itself() {
    let kafka = DedicatedKafka::start();
    let (db, publisher) = publisher("relay_outage").await;
    let topic = unique_name("outage");
    let broker = json!({"kafka": {"bootstrapServers": bootstrap(), "deadLetterTopic": format!("{topic}-dlq"),
                                  "partitions": 3, "mode": "structured", "messageTimeoutMs": 3000}});
    let mut config = relay_config("outage", broker, json!({"strategy": "single", "destination": topic}));
    // Enough attempts that no event is dead-lettered during a 20 s outage.
    config.retry.max_attempts = 100;
    let relay = start_relay(&db, config, "w1").await;

    // Writers commit steadily through the whole test.
    let sent: Arc<Mutex<Vec<DomainEvent>>> = Arc::default();
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (pool, publisher, sent, writing) = (db.pool.clone(), publisher.clone(), sent.clone(), writing.clone());
        tokio::spawn(async move {
            let items: Vec<Uuid> = (0..30).map(|_| Uuid::now_v7()).collect();
            let mut sequence = vec![0_i64; items.len()];
            let mut i = 0;
            while writing.load(Ordering::SeqCst) {
                let k = i % items.len();
                sequence[k] += 1;
                let mut tx = pool.begin().await.unwrap();
                let e = publisher
                    .publish_event(&mut tx, stock_changed(items[k], sequence[k]))
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                sent.lock().await.push(e);
                i += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };

    // Watch the circuit through the metric and the heartbeat row.
    let gauges: Arc<Mutex<Vec<i64>>> = Arc::default();
    let heartbeats: Arc<Mutex<Vec<String>>> = Arc::default();
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (metrics, pool, gauges, heartbeats, watching) = (
            relay.relay.metrics(),
            db.pool.clone(),
            gauges.clone(),
            heartbeats.clone(),
            watching.clone(),
        );
        let topic = topic.clone();
        tokio::spawn(async move {
            let needle = format!("outbox_relay_circuit_state{{publisher=\"outage\",destination=\"{topic}\"}} ");
            while watching.load(Ordering::SeqCst) {
                let text = metrics.encode();
                if let Some(v) = text.lines().find_map(|l| l.strip_prefix(needle.as_str())) {
                    let v: i64 = v.trim().parse().unwrap_or(-1);
                    let mut g = gauges.lock().await;
                    if g.last() != Some(&v) {
                        g.push(v);
                    }
                }
                let state: Option<String> = sqlx::query_scalar(
                    "SELECT circuit_state FROM outbox.worker_heartbeats WHERE consumer = 'outage' AND worker_id = 'w1'",
                )
                .fetch_optional(&pool)
                .await
                .unwrap();
                if let Some(state) = state {
                    let mut h = heartbeats.lock().await;
                    if h.last() != Some(&state) {
                        h.push(state);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(5)).await;
    kafka.script("stop");
    tokio::time::sleep(Duration::from_secs(20)).await;
    kafka.script("start");
    tokio::time::sleep(Duration::from_secs(5)).await;
    writing.store(false, Ordering::SeqCst);
    writer.await.unwrap();
    let sent = sent.lock().await.clone();

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique_name("outage"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut received = Vec::new();
    let expected: std::collections::HashSet<Uuid> = sent.iter().map(|e| e.event_id).collect();
    let mut seen = std::collections::HashSet::new();
    let collect = async {
        while !expected.is_subset(&seen) {
            let m = consumer.recv().await.expect("consume");
            let doc: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
            let e = cloudevents::from_structured(&doc).unwrap();
            seen.insert(e.event_id);
            received.push(e);
        }
    };
    tokio::time::timeout(Duration::from_secs(90), collect)
        .await
        .expect("every event delivered after the outage");
    // The circuit is closed again by itself.
    super::eventually(Duration::from_secs(30), "circuit closed in the heartbeat", async || {
        heartbeats.lock().await.last().map(String::as_str) == Some("closed")
    })
    .await;
    watching.store(false, Ordering::SeqCst);
    watcher.await.unwrap();

    let duplicates = assert_delivered(&sent, &received, true);
    eprintln!("outage: {} events committed, {duplicates} redelivered", sent.len());
    let gauges = gauges.lock().await.clone();
    let heartbeats = heartbeats.lock().await.clone();
    eprintln!("circuit gauge sequence {gauges:?}; heartbeat sequence {heartbeats:?}");
    // Metric: 2 = open, 1 = half-open, 0 = closed; it went open, half-open and closed in that order.
    let open = gauges.iter().position(|&g| g == 2).expect("circuit opened");
    let half_open = open
        + gauges[open..]
            .iter()
            .position(|&g| g == 1)
            .expect("circuit half-opened after opening");
    assert!(
        gauges[half_open..].contains(&0),
        "circuit closed after half-opening: {gauges:?}"
    );
    assert_eq!(gauges.last(), Some(&0), "circuit ends closed: {gauges:?}");
    let hb_open = heartbeats
        .iter()
        .position(|s| s == "open")
        .expect("heartbeat reported open");
    assert!(
        heartbeats[hb_open..].iter().any(|s| s == "half_open"),
        "heartbeat reported half_open: {heartbeats:?}"
    );
    assert_eq!(heartbeats.last().map(String::as_str), Some("closed"));

    relay.stop().await;
    db.drop().await;
    drop(kafka);
}
