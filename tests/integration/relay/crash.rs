//! A relay process killed with SIGKILL in the middle of its work: once its leases expire a
//! second process takes the shards over; every committed event arrives, in per-aggregate
//! order, and the only duplicates are the events of the batch that was in flight.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use inventory_outbox::event::{DomainEvent, cloudevents};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message as _};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use super::{assert_delivered, eventually, write_events};
use crate::event_core::publisher;
use crate::support::postgres::TestDatabase;
use crate::support::{database_url, kafka_bootstrap, unique_name};

const PUBLISHER: &str = "kafka-crash";
const BATCH_SIZE: usize = 200;

/// Consumes a Kafka topic (structured CloudEvents) in the background from its beginning.
pub(super) struct TopicCollector {
    received: Arc<Mutex<Vec<DomainEvent>>>,
    task: JoinHandle<()>,
}

impl TopicCollector {
    pub(super) fn start(topic: &str) -> Self {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka_bootstrap())
            .set("group.id", unique_name("relay-test"))
            .set("auto.offset.reset", "earliest")
            // The relay may create the topic after the subscription: notice it quickly.
            .set("topic.metadata.refresh.interval.ms", "1000")
            .create()
            .expect("kafka consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let task = tokio::spawn(async move {
            loop {
                match consumer.recv().await {
                    Ok(m) => {
                        let doc: serde_json::Value =
                            serde_json::from_slice(m.payload().unwrap_or_default()).expect("JSON body");
                        let event = cloudevents::from_structured(&doc).expect("a structured CloudEvent");
                        assert_eq!(m.key(), Some(event.aggregate_id.as_bytes()), "key is the aggregate id");
                        sink.lock().expect("received").push(event);
                    }
                    // E.g. the topic does not exist yet.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Self { received, task }
    }

    /// Messages received so far, duplicates included.
    pub(super) fn len(&self) -> usize {
        self.received.lock().expect("received").len()
    }

    /// Everything received so far, in arrival order.
    pub(super) fn received(&self) -> Vec<DomainEvent> {
        self.received.lock().expect("received").clone()
    }

    /// Waits until every event of `sent` arrived, then `settle` longer for stragglers
    /// (duplicates); returns what arrived of `sent`, in arrival order.
    pub(super) async fn wait_for(&self, sent: &[DomainEvent], timeout: Duration, settle: Duration) -> Vec<DomainEvent> {
        let ids: HashSet<Uuid> = sent.iter().map(|e| e.event_id).collect();
        let arrived = || {
            self.received()
                .into_iter()
                .filter(|e| ids.contains(&e.event_id))
                .collect::<Vec<_>>()
        };
        let deadline = Instant::now() + timeout;
        loop {
            let unique: HashSet<Uuid> = arrived().iter().map(|e| e.event_id).collect();
            if unique.len() == ids.len() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {} events arrived within {timeout:?}",
                unique.len(),
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(settle).await;
        arrived()
    }
}

impl Drop for TopicCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A relay child process, killed (SIGKILL) when dropped, on every path.
struct RelayProcess {
    child: Child,
    port: u16,
    config: PathBuf,
    log: PathBuf,
}

impl RelayProcess {
    /// Starts `inventory-outbox relay` for `worker_id` on the test database.
    fn spawn(db: &TestDatabase, topic: &str, worker_id: &str) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir();
        let config = dir.join(format!("{}.yaml", unique_name("relay-crash")));
        let doc = json!({
            "publisher": PUBLISHER,
            "outbox": {"migrate": true, "batchSize": BATCH_SIZE},
            "broker": {"kafka": {"bootstrapServers": kafka_bootstrap(), "deadLetterTopic": format!("{topic}-dlq"),
                                 "partitions": 6, "mode": "structured"}},
            "routing": {"strategy": "single", "destination": topic},
            "retry": {"initialIntervalMs": 100, "maxIntervalMs": 1000, "maxAttempts": 4, "jitter": 0.1},
            "workers": {"heartbeatIntervalMs": 500, "leaseDurationMs": 2000},
            "http": {"listen": format!("127.0.0.1:{port}")},
        });
        std::fs::write(&config, serde_json::to_string_pretty(&doc).expect("config text")).expect("write config");
        let log = dir.join(format!("{}.log", unique_name(worker_id)));
        let out = std::fs::File::create(&log).expect("create log file");
        let err = out.try_clone().expect("log file handle");
        let child = Command::new(env!("CARGO_BIN_EXE_inventory-outbox"))
            .args(["--log-format", "json", "relay", "--config"])
            .arg(&config)
            .args(["--worker-id", worker_id])
            .env("DATABASE_URL", url_of(db))
            .env_remove("RELAY_CONFIG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn the relay binary");
        Self {
            child,
            port,
            config,
            log,
        }
    }

    /// `outbox_relay_events_published_total` summed over its labels; None while not serving.
    async fn published(&self, http: &reqwest::Client) -> Option<u64> {
        let text = http
            .get(format!("http://127.0.0.1:{}/metrics", self.port))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let total: f64 = text
            .lines()
            .filter(|l| l.starts_with("outbox_relay_events_published_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        Some(total as u64)
    }

    /// SIGKILL: no shutdown handler runs, leases and heartbeat stay behind.
    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the relay");
        self.child.wait().expect("reap the relay");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(&self.log);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The connection URL of the test database.
fn url_of(db: &TestDatabase) -> String {
    let admin = database_url();
    let (base, _) = admin.rsplit_once('/').expect("DATABASE_URL has a database part");
    format!("{base}/{}", db.name)
}

/// Shards per owner with a live lease.
pub(super) async fn owners(db: &TestDatabase, consumer: &str) -> std::collections::HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT owner, count(*) FROM outbox.relay_cursors \
         WHERE consumer = $1 AND owner IS NOT NULL AND lease_expires_at > now() GROUP BY owner",
    )
    .bind(consumer)
    .fetch_all(&db.pool)
    .await
    .expect("read shard owners")
    .into_iter()
    .collect()
}

fn assert_running(process: &mut RelayProcess) {
    if let Ok(Some(status)) = process.child.try_wait() {
        panic!("the relay exited early ({status}):\n{}", process.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_killed_with_sigkill_mid_batch_loses_nothing_and_duplicates_stay_within_the_batch() {
    inventory_outbox::tls::install_crypto_provider();
    let (db, publisher) = publisher("relay_crash").await;
    let topic = unique_name("crash");
    let sent = write_events(&publisher, &db, 8, 375, 200).await;
    assert_eq!(sent.len(), 3000);
    let collector = TopicCollector::start(&topic);
    let http = reqwest::Client::new();

    // First relay: kill it once it published some, but far from all, of the backlog.
    let mut first = RelayProcess::spawn(&db, &topic, "crash-1");
    let deadline = Instant::now() + Duration::from_secs(30);
    let published_at_kill = loop {
        assert_running(&mut first);
        assert!(
            Instant::now() < deadline,
            "crash-1 published nothing within 30 s:\n{}",
            first.log()
        );
        match first.published(&http).await {
            Some(n) if n >= 2 * BATCH_SIZE as u64 => {
                first.kill();
                break n;
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    eprintln!(
        "crash-1 killed after publishing {published_at_kill} of {} events",
        sent.len()
    );
    assert!(
        published_at_kill < sent.len() as u64,
        "crash-1 finished before it could be killed"
    );
    let heartbeat: Option<String> = sqlx::query_scalar(
        "SELECT worker_id FROM outbox.worker_heartbeats WHERE consumer = $1 AND worker_id = 'crash-1'",
    )
    .bind(PUBLISHER)
    .fetch_optional(&db.pool)
    .await
    .expect("read heartbeats");
    assert!(heartbeat.is_some(), "a killed relay leaves its heartbeat behind");

    // Second relay: takes over once crash-1's leases expire, re-sends from the cursors.
    let mut second = RelayProcess::spawn(&db, &topic, "crash-2");
    eventually(Duration::from_secs(15), "crash-2 owns all 64 shards", async || {
        assert_running(&mut second);
        owners(&db, PUBLISHER).await.get("crash-2") == Some(&64)
    })
    .await;
    let received = collector
        .wait_for(&sent, Duration::from_secs(40), Duration::from_secs(2))
        .await;
    let duplicates = assert_delivered(&sent, &received, true);
    eprintln!(
        "SIGKILL takeover: {} events, {duplicates} duplicates (batchSize {BATCH_SIZE}, killed at {published_at_kill} published)",
        sent.len()
    );
    assert!(
        duplicates <= 2 * BATCH_SIZE,
        "{duplicates} duplicates exceed two in-flight batches of {BATCH_SIZE}"
    );
    assert!(collector.len() >= sent.len());

    drop(second);
    drop(first);
    db.drop().await;
}
