//! The `replay` subcommand as its Job runs it (a child process with the relay config file, the
//! ReplayJob spec and the database URL from a Secret file) against the real PostgreSQL and
//! Kafka, next to a live relay; and the ReplayJob reconciler against the real API server.

pub mod consumer_group;
pub mod kafka;
mod reconciler;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use inventory_outbox::event::inventory::Stockout;
use inventory_outbox::event::{DomainEvent, NewEvent, cloudevents};
use inventory_outbox::publisher::InventoryEventPublisher;
use inventory_outbox::replay::report::ReplayReport;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message as _};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::support::postgres::TestDatabase;
use crate::support::{database_url, kafka_bootstrap, unique_name};

const BIN: &str = env!("CARGO_BIN_EXE_inventory-outbox");

/// A replay child process's files: config, secret, report and logs.
pub struct ReplayFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub secret: PathBuf,
    pub report: PathBuf,
}

impl ReplayFiles {
    /// Writes the relay config document `config` and the test database's URL as a secret file.
    pub fn new(db: &TestDatabase, config: &Value) -> Self {
        let dir = std::env::temp_dir().join(unique_name("replay"));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let base = database_url();
        let (server, _) = base.rsplit_once('/').expect("DATABASE_URL has a database part");
        let secret = dir.join("database-url");
        std::fs::write(&secret, format!("{server}/{}\n", db.name)).expect("secret file");
        let path = dir.join("relay.json");
        std::fs::write(&path, config.to_string()).expect("config file");
        Self {
            report: dir.join("termination-log"),
            config: path,
            secret,
            dir,
        }
    }

    /// Starts `inventory-outbox replay` for `spec`; its logs go to `<log>.out/.err`.
    pub fn spawn(&self, spec: &Value, replay_id: &str, job: &str, port: u16, log: &str) -> Child {
        let _ = std::fs::remove_file(&self.report);
        Command::new(BIN)
            .args(["replay", "--config"])
            .arg(&self.config)
            .arg("--spec")
            .arg(spec.to_string())
            .args(["--replay-id", replay_id, "--job", job])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--report-file")
            .arg(&self.report)
            .arg("--secret-env")
            .arg(format!("DATABASE_URL={}", self.secret.display()))
            .env_remove("DATABASE_URL")
            .env("LOG_FORMAT", "json")
            .stdout(Stdio::from(
                std::fs::File::create(self.dir.join(format!("{log}.out"))).expect("log file"),
            ))
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.join(format!("{log}.err"))).expect("log file"),
            ))
            .kill_on_drop(true)
            .spawn()
            .expect("start replay")
    }

    pub fn logs(&self, log: &str) -> String {
        let read = |ext: &str| std::fs::read_to_string(self.dir.join(format!("{log}.{ext}"))).unwrap_or_default();
        format!(
            "--- {log} stdout ---\n{}\n--- {log} stderr ---\n{}",
            read("out"),
            read("err")
        )
    }

    /// Waits for the child to exit and returns its exit status and termination report.
    pub async fn finish(
        &self,
        child: &mut Child,
        within: Duration,
        log: &str,
    ) -> (std::process::ExitStatus, ReplayReport) {
        let status = match tokio::time::timeout(within, child.wait()).await {
            Ok(status) => status.expect("wait for replay"),
            Err(_) => panic!("replay did not exit within {within:?}\n{}", self.logs(log)),
        };
        let text = std::fs::read_to_string(&self.report)
            .unwrap_or_else(|e| panic!("no termination report ({e})\n{}", self.logs(log)));
        let report = serde_json::from_str(&text).unwrap_or_else(|e| panic!("report {text}: {e}"));
        (status, report)
    }
}

/// The relay config document of a Kafka publisher routing everything to `topic`.
pub fn kafka_config(publisher: &str, topic: &str, extra: Value) -> Value {
    let mut kafka =
        json!({"bootstrapServers": kafka_bootstrap(), "deadLetterTopic": format!("{topic}.dlq"), "partitions": 3});
    if let (Some(k), Some(e)) = (kafka.as_object_mut(), extra.as_object()) {
        k.extend(e.clone());
    }
    json!({
        "publisher": publisher,
        "outbox": {"databaseUrlEnv": "DATABASE_URL", "batchSize": 200, "migrate": false},
        "broker": {"kafka": kafka},
        "routing": {"strategy": "single", "destination": topic},
        "retry": {"initialIntervalMs": 100, "maxIntervalMs": 1000, "maxAttempts": 4, "jitter": 0.1},
        "workers": {"heartbeatIntervalMs": 500, "leaseDurationMs": 3000},
    })
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn stockout(item: Uuid) -> NewEvent {
    NewEvent::from_payload(&Stockout {
        inventory_item_id: item,
        warehouse_id: Uuid::nil(),
        unfulfilled_quantity: Some(1),
    })
    .expect("serialize payload")
}

pub async fn publish_one(publisher: &InventoryEventPublisher, db: &TestDatabase, draft: NewEvent) -> DomainEvent {
    let mut tx = db.pool.begin().await.expect("begin");
    let event = publisher.publish_event(&mut tx, draft).await.expect("publish");
    tx.commit().await.expect("commit");
    event
}

/// One record read back: the event, and the ReplayJob that sent it (None for live traffic).
#[derive(Clone, Debug)]
pub struct Received {
    pub event: DomainEvent,
    pub replay_job: Option<String>,
}

/// A consumer reading `topic` from the beginning.
pub fn consumer(topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", unique_name("replay-test"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}

/// Reads binary-mode CloudEvents from `consumer` until `done` holds or `within` passes, then
/// keeps reading for `linger` to catch anything extra (duplicates, strays).
pub async fn collect(
    consumer: &StreamConsumer,
    within: Duration,
    linger: Duration,
    mut done: impl FnMut(&[Received]) -> bool,
) -> Vec<Received> {
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut linger_until: Option<tokio::time::Instant> = None;
    loop {
        let now = tokio::time::Instant::now();
        let until = linger_until.unwrap_or(deadline);
        if now >= until {
            break;
        }
        match tokio::time::timeout(until - now, crate::support::next_record(consumer)).await {
            Ok(m) => {
                let headers: Vec<(String, String)> = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let event =
                    cloudevents::from_binary(&headers, m.payload().unwrap_or_default(), cloudevents::KAFKA_PREFIX)
                        .expect("a binary-mode CloudEvent");
                let replay_job = headers
                    .iter()
                    .find(|(k, _)| k == "ce_replayjob")
                    .map(|(_, v)| v.clone());
                received.push(Received { event, replay_job });
            }
            Err(_) => break,
        }
        if linger_until.is_none() && done(&received) {
            linger_until = Some(tokio::time::Instant::now() + linger);
        }
    }
    received
}

/// Polls `f` until it returns true, failing with `what` (and `explain()`) after `timeout`.
pub async fn wait_until(timeout: Duration, what: &str, mut f: impl AsyncFnMut() -> bool, explain: impl Fn() -> String) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}\n{}",
            explain()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `GET /api/v1/status` document of a replay child.
pub async fn status_of(port: u16) -> Option<ReplayReport> {
    inventory_outbox::tls::install_crypto_provider();
    let client = reqwest::Client::new();
    let response = client
        .get(format!("http://127.0.0.1:{port}/api/v1/status"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    response.json().await.ok()
}

/// Each aggregate's `newQuantity` sequence among `events`, in arrival order.
pub fn sequences(events: &[&DomainEvent]) -> std::collections::HashMap<String, Vec<i64>> {
    let mut map: std::collections::HashMap<String, Vec<i64>> = std::collections::HashMap::new();
    for e in events {
        map.entry(e.aggregate_id.clone())
            .or_default()
            .push(e.payload["newQuantity"].as_i64().unwrap_or(-1));
    }
    map
}

/// The checkpoint row of `replay_id`: (position, state, runs).
pub async fn checkpoint(db: &TestDatabase, replay_id: &str) -> Option<(i64, String, i32)> {
    sqlx::query_as("SELECT position, state, runs FROM outbox.replay_checkpoints WHERE replay_id = $1")
        .bind(replay_id)
        .fetch_optional(&db.pool)
        .await
        .expect("read checkpoint")
}
