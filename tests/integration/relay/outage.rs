//! A broker outage under load: the real Kafka process is stopped for 20 s while writers keep
//! committing. The circuit opens, nothing is lost, and it closes by itself once Kafka is back.
//!
//! Each test runs its own broker (Kafka from the cached jars, or a RabbitMQ node, with their
//! own state directory and ports, started and stopped by the project's `hack/components`
//! scripts), so stopping it disturbs no other test.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use inventory_outbox::event::{DomainEvent, cloudevents};
use lapin::options::BasicGetOptions;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message as _};
use serde_json::json;
use tokio::sync::Mutex;
use uuid::Uuid;

use super::{assert_delivered, relay_config, start_relay};
use crate::event_core::{publisher, stock_changed};
use crate::support::unique_name;

const KAFKA_PORT: u16 = 29092;
const KAFKA_CONTROLLER_PORT: u16 = 29093;
const AMQP_PORT: u16 = 25674;

/// A broker node of this test's own, controlled through the project's script.
struct DedicatedBroker {
    script: &'static str,
    state: PathBuf,
    env: Vec<(&'static str, String)>,
}

impl DedicatedBroker {
    fn script(&self, action: &str) {
        let hack = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("hack/components")
            .join(self.script);
        let status = Command::new("bash")
            .arg(hack)
            .arg(action)
            .env("OUTBOX_STATE", &self.state)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .status()
            .expect("run a hack/components script");
        assert!(
            status.success(),
            "{} {action} failed; logs in {}/logs",
            self.script,
            self.state.display()
        );
    }

    fn start(script: &'static str, name: &str, env: Vec<(&'static str, String)>) -> Self {
        let base = std::env::var("OUTBOX_STATE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir());
        let broker = Self {
            script,
            state: base.join(name),
            env,
        };
        broker.script("start");
        broker
    }

    fn kafka() -> Self {
        Self::start(
            "kafka.sh",
            "outage-kafka",
            vec![
                ("KAFKA_PORT", KAFKA_PORT.to_string()),
                ("KAFKA_CONTROLLER_PORT", KAFKA_CONTROLLER_PORT.to_string()),
            ],
        )
    }

    fn rabbitmq() -> Self {
        Self::start(
            "rabbitmq.sh",
            "outage-rabbitmq",
            vec![
                ("RABBITMQ_NODE", "outage@localhost".to_owned()),
                ("AMQP_PORT", AMQP_PORT.to_string()),
                ("RABBITMQ_MGMT_PORT", (AMQP_PORT + 1).to_string()),
                ("RABBITMQ_DIST_PORT", (AMQP_PORT + 2).to_string()),
            ],
        )
    }
}

impl Drop for DedicatedBroker {
    fn drop(&mut self) {
        self.script("stop");
    }
}

/// What the outage run observed.
struct Observed {
    sent: Vec<DomainEvent>,
    gauges: Vec<i64>,
    heartbeats: Vec<String>,
}

/// Runs a relay for `broker_doc` under steady writes, stops `broker` for 20 s, restarts it,
/// and returns what was sent and how the circuit moved. `destination` is the single routing
/// destination; the caller then checks delivery on its own broker.
async fn run_outage(
    db: &crate::support::postgres::TestDatabase,
    publisher: &inventory_outbox::publisher::InventoryEventPublisher,
    broker: &DedicatedBroker,
    publisher_name: &str,
    broker_doc: serde_json::Value,
    destination: &str,
) -> Observed {
    let mut config = relay_config(
        publisher_name,
        broker_doc,
        json!({"strategy": "single", "destination": destination}),
    );
    // Enough attempts that no event is dead-lettered during a 20 s outage.
    config.retry.max_attempts = 100;
    let relay = start_relay(db, config, "w1").await;

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
        let needle =
            format!("outbox_relay_circuit_state{{publisher=\"{publisher_name}\",destination=\"{destination}\"}} ");
        let publisher_name = publisher_name.to_owned();
        tokio::spawn(async move {
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
                    "SELECT circuit_state FROM outbox.worker_heartbeats WHERE consumer = $1 AND worker_id = 'w1'",
                )
                .bind(&publisher_name)
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
    broker.script("stop");
    tokio::time::sleep(Duration::from_secs(20)).await;
    broker.script("start");
    tokio::time::sleep(Duration::from_secs(5)).await;
    writing.store(false, Ordering::SeqCst);
    writer.await.unwrap();
    // The circuit closes by itself once the broker is back and the backlog drains.
    super::eventually(Duration::from_secs(90), "circuit closed in the heartbeat", async || {
        heartbeats.lock().await.last().map(String::as_str) == Some("closed") && gauges.lock().await.last() == Some(&0)
    })
    .await;
    watching.store(false, Ordering::SeqCst);
    watcher.await.unwrap();
    relay.stop().await;

    let observed = Observed {
        sent: sent.lock().await.clone(),
        gauges: gauges.lock().await.clone(),
        heartbeats: heartbeats.lock().await.clone(),
    };
    eprintln!(
        "{publisher_name}: {} events; circuit gauge {:?}; heartbeat {:?}",
        observed.sent.len(),
        observed.gauges,
        observed.heartbeats
    );
    observed
}

/// The circuit went open, then half-open, then closed, in the metric and the heartbeat row.
fn assert_circuit_cycled(observed: &Observed) {
    let gauges = &observed.gauges;
    // Metric: 2 = open, 1 = half-open, 0 = closed.
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
    let heartbeats = &observed.heartbeats;
    let hb_open = heartbeats
        .iter()
        .position(|s| s == "open")
        .expect("heartbeat reported open");
    assert!(
        heartbeats[hb_open..].iter().any(|s| s == "half_open"),
        "heartbeat reported half_open: {heartbeats:?}"
    );
    assert_eq!(heartbeats.last().map(String::as_str), Some("closed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kafka_outage_opens_the_circuit_loses_nothing_and_recovers_by_itself() {
    let kafka = DedicatedBroker::kafka();
    let (db, publisher) = publisher("relay_outage_kafka").await;
    let topic = unique_name("outage");
    let bootstrap = format!("127.0.0.1:{KAFKA_PORT}");
    let broker = json!({"kafka": {"bootstrapServers": bootstrap, "deadLetterTopic": format!("{topic}-dlq"),
                                  "partitions": 3, "mode": "structured", "messageTimeoutMs": 3000}});
    let observed = run_outage(&db, &publisher, &kafka, "outage-kafka", broker, &topic).await;

    // Partitions assigned directly: no consumer-group coordination on the restarted node.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", unique_name("outage"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut partitions = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        partitions
            .add_partition_offset(&topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&partitions).unwrap();
    let expected: HashSet<Uuid> = observed.sent.iter().map(|e| e.event_id).collect();
    let (mut received, mut seen) = (Vec::new(), HashSet::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while !expected.is_subset(&seen) && tokio::time::Instant::now() < deadline {
        let Ok(m) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await else {
            continue;
        };
        let m = m.expect("consume");
        let doc: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
        let e = cloudevents::from_structured(&doc).unwrap();
        seen.insert(e.event_id);
        received.push(e);
    }
    let missing: Vec<Uuid> = expected.difference(&seen).copied().collect();
    if !missing.is_empty() {
        let states: Vec<(String, i32)> = sqlx::query_as(
            "SELECT status, attempts FROM outbox.failed_events WHERE consumer = 'outage-kafka' AND event_id = ANY($1)",
        )
        .bind(&missing)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        panic!(
            "{} of {} events not on the topic; their failed_events rows: {states:?}",
            missing.len(),
            expected.len()
        );
    }
    let duplicates = assert_delivered(&observed.sent, &received, true);
    eprintln!("kafka outage: {duplicates} redelivered");
    assert_circuit_cycled(&observed);
    db.drop().await;
    drop(kafka);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rabbitmq_outage_opens_the_circuit_loses_nothing_and_recovers_by_itself() {
    let rabbit = DedicatedBroker::rabbitmq();
    let (db, publisher) = publisher("relay_outage_rabbit").await;
    let exchange = unique_name("outage");
    let queue = format!("{exchange}-all");
    let url = format!("amqp://outbox:outbox@127.0.0.1:{AMQP_PORT}/%2f");
    // SAFETY of the test process environment: only this test reads this variable.
    unsafe { std::env::set_var("OUTAGE_AMQP_URL", &url) };
    let broker = json!({"rabbitmq": {"urlEnv": "OUTAGE_AMQP_URL", "exchange": exchange, "mode": "structured",
                                     "confirmTimeoutMs": 3000, "connectTimeoutMs": 2000,
                                     "queues": [{"name": queue, "bindingKey": "#"}]}});
    let observed = run_outage(&db, &publisher, &rabbit, "outage-rabbit", broker, "inventory.stock").await;

    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let expected: HashSet<Uuid> = observed.sent.iter().map(|e| e.event_id).collect();
    let (mut received, mut seen) = (Vec::new(), HashSet::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while !expected.is_subset(&seen) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {} arrived",
            seen.len(),
            expected.len()
        );
        match channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(m) => {
                let doc: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
                let e = cloudevents::from_structured(&doc).unwrap();
                seen.insert(e.event_id);
                received.push(e);
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let duplicates = assert_delivered(&observed.sent, &received, true);
    eprintln!("rabbitmq outage: {duplicates} redelivered");
    assert_circuit_cycled(&observed);
    db.drop().await;
    drop(rabbit);
}
