//! Relay throughput and latency against the real services, in one run.
//!
//! `source ~/.local/state/inventory-outbox/env.sh && cargo bench --bench relay`
//!
//! 1. Throughput outbox → Kafka: a fresh database is pre-filled (untimed) with `EVENTS` 1 KiB
//!    events over `AGGREGATES` aggregates; an in-process relay (acks=all, idempotence, lz4,
//!    linger 5 ms, 6 partitions, binary mode) is started per batch size in `BATCH_SIZES`, each
//!    under its own publisher name so each reads the whole outbox from the start, and timed
//!    from its start until the broker acknowledged every event.
//!    The best batch size is run once more with `kafka.lingerMs` 0, for information, once as
//!    the loop was before (strict per-aggregate waves, the adapter's `keeps_aggregate_order`
//!    hidden, and `outbox.readAhead` off), once with one call per batch but no read-ahead, once
//!    with read-ahead but not pipelined, and once as shipped but with glibc's malloc instead of
//!    mimalloc (`relay_parts/alloc.rs`): the same-run "before" of each change. `RELAY_BENCH_KAFKA_ONLY=1`
//!    stops after these runs and the raw baseline.
//! 2. Baseline: a raw rdkafka `FutureProducer` with the adapter's settings sends the same
//!    records (same keys, bodies and `ce_` headers) to another topic, all enqueued then awaited;
//!    a second figure awaits them per batch of the relay's best batch size, as the relay does.
//! 3. Throughput outbox → RabbitMQ with publisher confirms (exchange + one bound queue).
//! 4. Commit → ack latency: writers commit small transactions at a steady rate (half the best
//!    relay rate, or what they sustain) while the caught-up relay publishes them. Commit time
//!    is taken right after `COMMIT` returns; ack time when the adapter's `send_batch` returns
//!    (the moment the relay counts the event as published, seen through a timing wrapper
//!    around the broker); consume time when a Kafka consumer in this process receives it.
//!    The same load with `outbox.readAhead` off (the loop before: it read ahead only after a
//!    full batch), then 1,000 single-event transactions/s show the floor with read-ahead on
//!    and off, and with `kafka.lingerMs` 0. The other runs use the shipped `lingerMs`.
//! 5. Relay → SNS (moto) on a skewed workload of its own: how full the `PublishBatch` calls
//!    are (planned as `SendMessageBatch` calls are), one call per batch next to strict waves (`relay_parts/sqs.rs`;
//!    `RELAY_BENCH_SQS_ONLY=1` runs only this).
//! 6. Relay peak RSS: the relay binary drains a 1,000,000-event backlog to Kafka
//!    (`relay_parts/backlog.rs`; `RELAY_BENCH_BACKLOG_ONLY=1` runs only this).
//!    `RELAY_BENCH_LATENCY_ONLY=1` runs one throughput run (to catch up) and section 4.
//!
//! Diagnostics after the table: per run, the `send_batch` calls (one per wave: a round's batch
//! to one Kafka topic is one wave, to RabbitMQ one per event of the hottest aggregate) and the
//! wall time inside and outside them; one relay
//! round replayed step by step with the same public APIs; `BENCH_DEBUG=1` also prints every
//! call's size and start time. Everything it creates (database, topics, exchanges, queues) is
//! dropped at the end. See BENCHMARKS.md for measured figures.

#[path = "relay_parts/alloc.rs"]
mod allocator;
#[path = "relay_parts/backlog.rs"]
mod backlog;
#[path = "relay_parts/sqs.rs"]
mod sqs;
mod support;

/// mimalloc as shipped, switchable to glibc's malloc for one same-run comparison.
#[global_allocator]
static ALLOCATOR: allocator::Switchable = allocator::Switchable;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use inventory_outbox::broker::{BoxFuture, Broker, HandedOver, Message, SendError};
use inventory_outbox::delivery::metrics::DeliveryMetrics;
use inventory_outbox::delivery::{Engine, WakeUp};
use inventory_outbox::event::NewEvent;
use inventory_outbox::event::cloudevents::{self, KAFKA_PREFIX};
use inventory_outbox::publisher::{InventoryEventPublisher, PublisherConfig};
use inventory_outbox::relay::config::RelayConfig;
use inventory_outbox::store::failed::FailedEvents;
use inventory_outbox::store::outbox::{OutboxReader, SHARDS};
use inventory_outbox::store::{SchemaName, Store};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::watch;
use uuid::Uuid;

/// Events pre-filled into the outbox and relayed per throughput measurement.
const EVENTS: usize = 100_000;
/// Aggregates the events are spread over.
const AGGREGATES: usize = 1000;
/// Concurrent pre-fill writers (each on its own aggregates, so their advisory locks never meet).
const PREFILL_TASKS: usize = 4;
/// Events per pre-fill transaction.
const PREFILL_BATCH: usize = 1000;
/// Relay batch sizes tried for Kafka and RabbitMQ; the best Kafka one is kept.
const BATCH_SIZES: [usize; 2] = [1000, 5000];
/// Partitions of every topic (the adapter's default).
const PARTITIONS: i32 = 6;
/// Length of the latency measurement.
const LATENCY_SECS: u64 = 20;
/// The later latency runs: a low steady rate of single-event transactions, for the floor
/// (read-ahead on and off, and `kafka.lingerMs` 0).
const LOW_RATE: f64 = 1000.0;
const LOW_RATE_SECS: u64 = 10;
/// Latency samples of events committed in the first second are dropped (warm-up).
const LATENCY_WARMUP: Duration = Duration::from_secs(1);
/// Concurrent latency writers, each on its own connection and aggregates.
const LATENCY_WRITERS: usize = 4;
/// Most single-event transactions per second asked of one writer connection; above that the
/// writers put several events in one transaction (commit round trip and WAL flush per commit).
const TXNS_PER_WRITER: f64 = 750.0;

const TARGET_RELAY_KAFKA: f64 = 50_000.0;
const TARGET_RATIO: f64 = 0.7;
const TARGET_P50_MS: f64 = 5.0;
const TARGET_P99_MS: f64 = 25.0;
const TARGET_RABBIT: f64 = 30_000.0;

fn draft(aggregate: Uuid) -> NewEvent {
    support::kib_draft(aggregate)
}

/// One Kafka record as the adapter encodes it in binary mode.
struct Record {
    key: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// One `send_batch` call (one wave of a relay round) as seen from outside the adapter (µs since the bench started).
#[derive(Clone, Copy)]
struct SendCall {
    start_us: u64,
    end_us: u64,
    size: usize,
}

/// Wraps the relay's broker adapter: counts acknowledged messages, times every `send_batch`
/// (and every batch handed over, until its acknowledgements are in) and, when asked, records
/// the moment each event was acknowledged.
struct TimedBroker {
    inner: Arc<dyn Broker>,
    tally: Arc<Tally>,
    /// Hides the adapter's `keeps_aggregate_order`, so the relay sends strict per-aggregate
    /// waves as it did for every broker before: the same-run "before" figure.
    strict_waves: std::sync::atomic::AtomicBool,
    /// Hides the adapter's `orders_across_calls`: the relay then awaits each batch's
    /// acknowledgements before handing the next over (the loop before pipelining).
    no_pipeline: std::sync::atomic::AtomicBool,
}

impl std::ops::Deref for TimedBroker {
    type Target = Tally;
    fn deref(&self) -> &Tally {
        &self.tally
    }
}

/// What [`TimedBroker`] counts; shared with the acknowledgement futures of handed-over batches.
struct Tally {
    base: Instant,
    acked: AtomicU64,
    goal: AtomicU64,
    goal_reached_us: AtomicU64,
    calls: Mutex<Vec<SendCall>>,
    acks: Option<Mutex<Vec<(Uuid, u64)>>>,
}

impl Tally {
    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    /// Records one call's outcome: `ids[i]` is the event of `results[i]`.
    fn record(&self, start_us: u64, ids: &[Uuid], results: &[Result<(), SendError>]) {
        let end_us = self.now_us();
        let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
        if let Some(acks) = &self.acks {
            let mut acks = acks.lock().unwrap();
            for (id, r) in ids.iter().zip(results) {
                if r.is_ok() {
                    acks.push((*id, end_us));
                }
            }
        }
        self.calls.lock().unwrap().push(SendCall {
            start_us,
            end_us,
            size: ids.len(),
        });
        let before = self.acked.fetch_add(ok, Ordering::SeqCst);
        let goal = self.goal.load(Ordering::SeqCst);
        if before < goal && before + ok >= goal {
            self.goal_reached_us.store(end_us, Ordering::SeqCst);
        }
    }
}

impl TimedBroker {
    fn new(inner: Arc<dyn Broker>, base: Instant, goal: u64, record_acks: bool) -> Arc<Self> {
        Arc::new(Self {
            inner,
            tally: Arc::new(Tally {
                base,
                acked: AtomicU64::new(0),
                goal: AtomicU64::new(goal),
                goal_reached_us: AtomicU64::new(0),
                calls: Mutex::new(Vec::new()),
                acks: record_acks.then(|| Mutex::new(Vec::new())),
            }),
            strict_waves: std::sync::atomic::AtomicBool::new(false),
            no_pipeline: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

impl Broker for TimedBroker {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn send_batch<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Vec<Result<(), SendError>>> {
        Box::pin(async move {
            let start_us = self.now_us();
            let results = self.inner.send_batch(messages).await;
            let ids: Vec<Uuid> = messages.iter().map(|m| m.event.event_id).collect();
            self.tally.record(start_us, &ids, &results);
            results
        })
    }

    fn orders_across_calls(&self) -> bool {
        !self.no_pipeline.load(Ordering::SeqCst) && self.inner.orders_across_calls()
    }

    fn hand_over<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, HandedOver> {
        Box::pin(async move {
            let start_us = self.now_us();
            let handed = self.inner.hand_over(messages).await;
            let ids: Vec<Uuid> = messages.iter().map(|m| m.event.event_id).collect();
            let tally = self.tally.clone();
            let inner_acks = handed.acks;
            HandedOver {
                refused: handed.refused,
                acks: Box::pin(async move {
                    let results = inner_acks.await;
                    tally.record(start_us, &ids, &results);
                    results
                }),
            }
        })
    }

    fn send_dead_letter<'a>(&'a self, message: &'a Message, reason: &'a str) -> BoxFuture<'a, Result<(), SendError>> {
        self.inner.send_dead_letter(message, reason)
    }

    fn ensure_destinations<'a>(&'a self, destinations: &'a [String]) -> BoxFuture<'a, Result<(), SendError>> {
        self.inner.ensure_destinations(destinations)
    }

    fn check_health(&self) -> BoxFuture<'_, Result<(), SendError>> {
        self.inner.check_health()
    }

    fn keeps_aggregate_order(&self) -> bool {
        !self.strict_waves.load(Ordering::SeqCst) && self.inner.keeps_aggregate_order()
    }
}

/// What a throughput run measured.
struct ThroughputRun {
    label: String,
    batch: usize,
    rate: f64,
    elapsed: Duration,
    calls: Vec<SendCall>,
    start_us: u64,
}

impl ThroughputRun {
    /// Calls, waves per round and where the wall time went: inside `send_batch` (encode,
    /// enqueue, wait for every ack or confirm) or outside it (read, cursor commit, bookkeeping).
    fn breakdown(&self) -> String {
        let calls = self.calls.len();
        let sent: usize = self.calls.iter().map(|r| r.size).sum();
        let rounds = sent.div_ceil(self.batch).max(1);
        let send_s: f64 = self.calls.iter().map(|r| (r.end_us - r.start_us) as f64).sum::<f64>() / 1e6;
        let total_s = self.elapsed.as_secs_f64();
        let startup_ms = self
            .calls
            .first()
            .map_or(0.0, |r| r.start_us.saturating_sub(self.start_us) as f64 / 1000.0);
        // Rounds: consecutive calls adding up to a full batch. Time outside send_batch per round,
        // early and late in the run (the read's cost grows with the cursor position when
        // PostgreSQL picks a generic plan for it).
        let mut spans: Vec<(u64, u64)> = Vec::new();
        let (mut filled, mut start, mut send) = (0usize, None, 0u64);
        for r in &self.calls {
            start.get_or_insert(r.start_us);
            send += r.end_us - r.start_us;
            filled += r.size;
            if filled >= self.batch {
                spans.push((start.take().unwrap_or(r.start_us), send));
                (filled, send) = (0, 0);
            }
        }
        let outside: Vec<f64> = spans
            .windows(2)
            .map(|w| (w[1].0 - w[0].0).saturating_sub(w[0].1) as f64 / 1000.0)
            .collect();
        let tenth = (outside.len() / 10).max(1).min(outside.len());
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let (early, late) = (mean(&outside[..tenth]), mean(&outside[outside.len() - tenth..]));
        format!(
            "{:<28} {:>6.0} ev/s in {total_s:.2} s: {rounds} rounds, {calls} send_batch calls ({:.1} per round, \
             {:.0} events each); in send_batch {send_s:.2} s ({:.0} %), outside {:.2} s ({:.0} %; \
             {:.1} ms per round: first tenth {early:.1} ms, last tenth {late:.1} ms); first send after \
             {startup_ms:.0} ms",
            self.label,
            self.rate,
            calls as f64 / rounds as f64,
            sent as f64 / calls.max(1) as f64,
            100.0 * send_s / total_s,
            total_s - send_s,
            100.0 * (total_s - send_s) / total_s,
            (total_s - send_s) * 1000.0 / rounds as f64,
        )
    }
}

struct Env {
    admin_url: String,
    url: String,
    kafka: String,
    amqp: String,
    aws_endpoint: String,
    base: Instant,
    tag: String,
}

fn relay_config(publisher: &str, batch: usize, broker: serde_json::Value, destination: &str) -> RelayConfig {
    let doc = json!({
        "publisher": publisher,
        "outbox": {"databaseUrlEnv": "DATABASE_URL", "batchSize": batch, "migrate": false},
        "broker": broker,
        "routing": {"strategy": "single", "destination": destination},
    });
    let config: RelayConfig = serde_json::from_value(doc).expect("relay config");
    config.validate().expect("valid relay config");
    config
}

/// The adapter's settings as shipped (`lingerMs` included), plus the bench's topic layout.
fn kafka_broker_doc(env: &Env, topic: &str) -> serde_json::Value {
    kafka_broker_doc_linger(env, topic, default_linger_ms())
}

fn default_linger_ms() -> u32 {
    inventory_outbox::broker::kafka::KafkaConfig::default().linger_ms
}

fn kafka_broker_doc_linger(env: &Env, topic: &str, linger_ms: u32) -> serde_json::Value {
    json!({"kafka": {"bootstrapServers": env.kafka, "deadLetterTopic": format!("{topic}-dlq"),
                     "partitions": PARTITIONS, "clientId": "outbox-bench", "lingerMs": linger_ms}})
}

/// The local Kafka TLS node (hack/components/kafka.sh): its plaintext and SASL_SSL listeners.
struct TlsNode {
    plaintext: String,
    sasl_ssl: String,
    password_file: String,
    ca_file: String,
}

impl TlsNode {
    fn from_env() -> Option<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        // The username is read through saslUsernameEnv, so it must be set too.
        var("KAFKA_SASL_USERNAME")?;
        Some(Self {
            plaintext: var("KAFKA_TLS_NODE_PLAINTEXT_BOOTSTRAP_SERVERS")?,
            sasl_ssl: var("KAFKA_SASL_SSL_BOOTSTRAP_SERVERS")?,
            password_file: var("KAFKA_SASL_PASSWORD_FILE")?,
            ca_file: var("OUTBOX_TLS_CA_FILE")?,
        })
    }
}

/// Relay → Kafka on the TLS node, plaintext then SASL_SSL, batch 1000; prints both and the ratio.
async fn tls_comparison(env: &Env, pool: &sqlx::PgPool, node: &TlsNode, goal: u64) -> anyhow::Result<()> {
    const BATCH: usize = 1000;
    let mut rates = Vec::new();
    let mut created = Vec::new();
    for (name, secure) in [("plaintext", false), ("sasl-ssl", true)] {
        let topic = format!("bench-relay-{}-tls-{name}", env.tag);
        created.push(topic.clone());
        let mut kafka = json!({"bootstrapServers": node.plaintext, "deadLetterTopic": format!("{topic}-dlq"),
                               "partitions": PARTITIONS, "clientId": "outbox-bench", "lingerMs": 5});
        if secure {
            kafka["bootstrapServers"] = json!(node.sasl_ssl);
            kafka["securityProtocol"] = json!("sasl_ssl");
            kafka["saslMechanism"] = json!("SCRAM-SHA-512");
            kafka["saslUsernameEnv"] = json!("KAFKA_SASL_USERNAME");
            kafka["saslPasswordFile"] = json!(node.password_file);
            kafka["tls"] = json!({"caFile": node.ca_file});
        }
        let publisher = format!("bench-kafka-tls-{name}");
        let config = relay_config(&publisher, BATCH, json!({ "kafka": kafka }), &topic);
        let inner = config.broker.connect().await?;
        inner.ensure_destinations(std::slice::from_ref(&topic)).await?;
        let timed = TimedBroker::new(inner, env.base, goal, false);
        let run = relay_until(env, config, timed, format!("relay → Kafka TLS node, {name}"), goal).await?;
        check_cursors(pool, &publisher).await?;
        eprintln!("{}", run.breakdown());
        rates.push(run.rate);
    }
    println!(
        "relay → Kafka TLS node, batch {BATCH}: plaintext {:.0} events/s, SASL_SSL SCRAM-SHA-512 {:.0} events/s ({:.2}× plaintext)",
        rates[0],
        rates[1],
        rates[1] / rates[0]
    );
    // The TLS node is another cluster: its topics are deleted here, not with the others.
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &node.plaintext).create()?;
    let mut names: Vec<String> = created.iter().map(|t| format!("{t}-dlq")).collect();
    names.extend(created);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    if let Err(e) = admin.delete_topics(&names, &AdminOptions::new()).await {
        eprintln!("deleting TLS node topics {names:?}: {e}");
    }
    Ok(())
}

/// Starts a relay on a store of its own, waits until `goal` events are acknowledged, stops it.
async fn relay_until(
    env: &Env,
    config: RelayConfig,
    timed: Arc<TimedBroker>,
    label: String,
    goal: u64,
) -> anyhow::Result<ThroughputRun> {
    relay_until_in(env, SchemaName::default(), config, timed, label, goal).await
}

/// [`relay_until`] on the outbox in `schema`.
async fn relay_until_in(
    env: &Env,
    schema: SchemaName,
    config: RelayConfig,
    timed: Arc<TimedBroker>,
    label: String,
    goal: u64,
) -> anyhow::Result<ThroughputRun> {
    let store = Store::connect(&env.url, schema, config.outbox.max_connections).await?;
    let batch = config.outbox.batch_size;
    let relay = Arc::new(Engine::new(config, store, timed.clone(), "bench-worker"));
    let (stop, shutdown) = watch::channel(false);
    let start_us = timed.now_us();
    let task = tokio::spawn(relay.clone().run(shutdown));
    let deadline = Instant::now() + Duration::from_secs(120);
    while timed.acked.load(Ordering::SeqCst) < goal {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{label}: only {} of {goal} acknowledged after 120 s",
            timed.acked.load(Ordering::SeqCst)
        );
        anyhow::ensure!(!task.is_finished(), "{label}: relay stopped early");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let end_us = timed.goal_reached_us.load(Ordering::SeqCst);
    let _ = stop.send(true);
    task.await??;
    let elapsed = Duration::from_micros(end_us - start_us);
    let calls = timed.calls.lock().unwrap().clone();
    if std::env::var_os("BENCH_DEBUG").is_some() {
        let sizes: Vec<String> = calls
            .iter()
            .map(|r| format!("{}@{}", r.size, r.start_us / 1000))
            .collect();
        eprintln!("{label} round sizes: {}", sizes.join(" "));
    }
    Ok(ThroughputRun {
        label,
        batch,
        rate: goal as f64 / elapsed.as_secs_f64(),
        elapsed,
        calls,
        start_us,
    })
}

/// Every event is published once the publisher's slowest cursor is at the last position.
async fn check_cursors(pool: &PgPool, publisher: &str) -> anyhow::Result<()> {
    let (min, max): (Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT min(position) FROM outbox.relay_cursors WHERE consumer = $1), \
                (SELECT max(position) FROM outbox.events)",
    )
    .bind(publisher)
    .fetch_one(pool)
    .await?;
    anyhow::ensure!(min == max, "{publisher}: cursor at {min:?}, last event at {max:?}");
    Ok(())
}

fn producer(env: &Env) -> anyhow::Result<FutureProducer> {
    // The adapter's producer settings (src/broker/kafka.rs, KafkaBroker::connect).
    Ok(ClientConfig::new()
        .set("bootstrap.servers", &env.kafka)
        .set("client.id", "outbox-bench-raw")
        .set("partitioner", "murmur2_random")
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("max.in.flight.requests.per.connection", "5")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("message.timeout.ms", "30000")
        .create()?)
}

async fn create_topic(admin: &AdminClient<DefaultClientContext>, topic: &str) -> anyhow::Result<()> {
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in results {
        if let Err((name, code)) = r {
            anyhow::bail!("create topic {name}: {code}");
        }
    }
    Ok(())
}

/// Sends every record with a raw producer, `chunk` records enqueued then awaited at a time.
async fn raw_kafka(producer: &FutureProducer, topic: &str, records: &[Record], chunk: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    for part in records.chunks(chunk) {
        let mut pending = Vec::with_capacity(part.len());
        for r in part {
            let headers = r
                .headers
                .iter()
                .fold(OwnedHeaders::new_with_capacity(r.headers.len()), |h, (key, value)| {
                    h.insert(Header {
                        key: key.as_str(),
                        value: Some(value.as_bytes()),
                    })
                });
            let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
                .key(r.key.as_str())
                .payload(r.body.as_slice())
                .headers(headers);
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                        record = returned;
                        // The adapter's QUEUE_FULL_BACKOFF.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err((e, _)) => anyhow::bail!("enqueue: {e}"),
                }
            }
        }
        for result in join_all(pending).await {
            if let Err((e, _)) = result? {
                anyhow::bail!("delivery: {e}");
            }
        }
    }
    Ok(records.len() as f64 / start.elapsed().as_secs_f64())
}

/// Latency figures of one run, in ms.
/// A latency run: events/s asked of the writers, for how long, with which `kafka.lingerMs`
/// and `outbox.readAhead`.
#[derive(Clone, Copy)]
struct Load {
    rate: f64,
    secs: u64,
    linger_ms: u32,
    read_ahead: bool,
    wake_up: WakeUp,
}

struct Latency {
    linger_ms: u32,
    read_ahead: bool,
    wake_up: WakeUp,
    rate_asked: f64,
    rate_reached: f64,
    per_tx: usize,
    samples: usize,
    ack: (f64, f64, f64),
    consume: (f64, f64, f64),
    histogram: (String, String),
    calls: usize,
    mean_call_events: f64,
    mean_send_ms: f64,
}

fn percentiles(mut v: Vec<u64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    (
        at(0.5),
        at(0.99),
        v.iter().sum::<u64>() as f64 / v.len() as f64 / 1000.0,
    )
}

/// Bucket bounds holding the p50 and p99 of the relay's `commit_to_ack_seconds` histogram.
fn histogram_quantiles(text: &str) -> (String, String) {
    let mut buckets: Vec<(String, f64)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("outbox_relay_commit_to_ack_seconds_bucket{")
            && let Some((labels, count)) = rest.rsplit_once("} ")
            && let Some(le) = labels.split("le=\"").nth(1).and_then(|s| s.split('"').next())
        {
            buckets.push((le.to_owned(), count.trim().parse().unwrap_or(0.0)));
        }
    }
    let total = buckets.last().map_or(0.0, |b| b.1);
    let find = |q: f64| {
        buckets
            .iter()
            .find(|(_, c)| *c >= q * total)
            .map_or("?".to_owned(), |(le, _)| match le.parse::<f64>() {
                Ok(s) => format!("≤ {} ms", s * 1000.0),
                Err(_) => format!("> {le}"),
            })
    };
    (find(0.5), find(0.99))
}

/// One relay → Kafka throughput run of publisher `bench-kafka-b{batch}` as shipped.
async fn kafka_run(env: &Env, topics: &mut Vec<String>, batch: usize, goal: u64) -> anyhow::Result<ThroughputRun> {
    let topic = format!("bench-relay-{}-b{batch}", env.tag);
    topics.push(topic.clone());
    let config = relay_config(
        &format!("bench-kafka-b{batch}"),
        batch,
        kafka_broker_doc(env, &topic),
        &topic,
    );
    let inner = config.broker.connect().await?;
    inner.ensure_destinations(std::slice::from_ref(&topic)).await?;
    let timed = TimedBroker::new(inner, env.base, goal, false);
    relay_until(env, config, timed, format!("relay → Kafka, batch {batch}"), goal).await
}

/// Section 4's runs: commit → ack latency at half the best Kafka rate and at a low steady rate,
/// on the publisher the best throughput run caught up.
async fn latency_runs(
    env: &Env,
    pool: &PgPool,
    publisher: &InventoryEventPublisher,
    best: &ThroughputRun,
    topics: &mut Vec<String>,
    aggregates: &[Uuid],
) -> anyhow::Result<Vec<Latency>> {
    let mut latencies = Vec::new();
    // The first is the target's (the shipped configuration); the second is the same load
    // without reading ahead, the loop before (it read ahead only after a full batch, which a
    // caught-up relay at half load never reads), same process.
    let half = best.rate * 0.5;
    let shipped = default_linger_ms();
    let loads = [
        Load {
            rate: half,
            secs: LATENCY_SECS,
            linger_ms: shipped,
            read_ahead: true,
            wake_up: WakeUp::Notify,
        },
        Load {
            rate: half,
            secs: LATENCY_SECS,
            linger_ms: shipped,
            read_ahead: false,
            wake_up: WakeUp::Notify,
        },
        Load {
            rate: LOW_RATE,
            secs: LOW_RATE_SECS,
            linger_ms: shipped,
            read_ahead: true,
            wake_up: WakeUp::Notify,
        },
        Load {
            rate: LOW_RATE,
            secs: LOW_RATE_SECS,
            linger_ms: shipped,
            read_ahead: false,
            wake_up: WakeUp::Notify,
        },
        Load {
            rate: LOW_RATE,
            secs: LOW_RATE_SECS,
            linger_ms: 0,
            read_ahead: true,
            wake_up: WakeUp::Notify,
        },
        // `outbox.wakeUp: poll`: no NOTIFY from the writers, a poll every minPollIntervalMs.
        Load {
            rate: half,
            secs: LATENCY_SECS,
            linger_ms: shipped,
            read_ahead: true,
            wake_up: WakeUp::Poll,
        },
        Load {
            rate: LOW_RATE,
            secs: LOW_RATE_SECS,
            linger_ms: shipped,
            read_ahead: true,
            wake_up: WakeUp::Poll,
        },
    ];
    for (i, load) in loads.into_iter().enumerate() {
        let topic = format!("bench-latency-{}-{i}", env.tag);
        topics.push(topic.clone());
        let lat = latency(env, pool, publisher, best.batch, load, &topic, aggregates).await?;
        eprintln!(
            "latency @ {:.0}/{:.0} ev/s: ack p50 {:.1} p99 {:.1} ms",
            lat.rate_asked, lat.rate_reached, lat.ack.0, lat.ack.1
        );
        latencies.push(lat);
    }

    Ok(latencies)
}

fn latency_rows(latencies: &[Latency], row: &impl Fn(&str, String, &str, &str)) {
    for (i, lat) in latencies.iter().enumerate() {
        // The targets apply to the default configuration at half the maximum rate.
        let targets = i == 0;
        row(
            &format!(
                "commit → ack p50 @ {:.0} ev/s ({:.0} asked, {}/txn), linger {} ms, read-ahead {}{}",
                lat.rate_reached,
                lat.rate_asked,
                lat.per_tx,
                lat.linger_ms,
                if lat.read_ahead { "on" } else { "off" },
                if lat.wake_up == WakeUp::Poll {
                    ", wakeUp poll"
                } else {
                    ""
                }
            ),
            format!("{:.1} ms", lat.ack.0),
            if targets { "≤ 5 ms" } else { "" },
            if targets {
                status(lat.ack.0 <= TARGET_P50_MS)
            } else {
                ""
            },
        );
        row(
            "  commit → ack p99",
            format!("{:.1} ms", lat.ack.1),
            if targets { "≤ 25 ms" } else { "" },
            if targets {
                status(lat.ack.1 <= TARGET_P99_MS)
            } else {
                ""
            },
        );
        row("  commit → ack mean", format!("{:.1} ms", lat.ack.2), "", "");
        row(
            "  commit → consume p50 / p99 (upper bound of ack)",
            format!("{:.1} / {:.1} ms", lat.consume.0, lat.consume.1),
            "",
            "",
        );
        row(
            "  relay commit_to_ack_seconds histogram p50 / p99",
            format!("{} / {}", lat.histogram.0, lat.histogram.1),
            "",
            "",
        );
    }
}

/// Writers commit `rate` events/s for `secs` while a caught-up relay publishes them.
async fn latency(
    env: &Env,
    pool: &PgPool,
    publisher: &InventoryEventPublisher,
    batch: usize,
    Load {
        rate,
        secs,
        linger_ms,
        read_ahead,
        wake_up,
    }: Load,
    topic: &str,
    aggregates: &[Uuid],
) -> anyhow::Result<Latency> {
    // The publisher of the throughput run with this batch size: caught up, so it starts idle.
    let relay_publisher = format!("bench-kafka-b{batch}");
    let topic = topic.to_owned();
    let mut config = relay_config(
        &relay_publisher,
        batch,
        kafka_broker_doc_linger(env, &topic, linger_ms),
        &topic,
    );
    config.outbox.read_ahead = read_ahead;
    config.outbox.wake_up = wake_up;
    let inner = config.broker.connect().await?;
    inner.ensure_destinations(std::slice::from_ref(&topic)).await?;
    let timed = TimedBroker::new(inner, env.base, u64::MAX, true);

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.kafka)
        .set("group.id", format!("bench-latency-{}", env.tag))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let (stop_consumer, mut consumer_stop) = watch::channel(false);
    let base = env.base;
    let consumed = tokio::spawn(async move {
        let mut seen: Vec<(Uuid, u64)> = Vec::new();
        loop {
            tokio::select! {
                _ = consumer_stop.changed() => break,
                m = consumer.recv() => {
                    let now = base.elapsed().as_micros() as u64;
                    let Ok(m) = m else { continue };
                    let id = m.headers().and_then(|h| {
                        h.iter()
                            .find(|h| h.key == "ce_id")
                            .and_then(|h| h.value)
                            .and_then(|v| std::str::from_utf8(v).ok())
                            .and_then(|v| v.parse::<Uuid>().ok())
                    });
                    if let Some(id) = id {
                        seen.push((id, now));
                    }
                }
            }
        }
        seen
    });

    // The relay's publisher is caught up (an earlier throughput run), so it starts idle.
    let store = Store::connect(&env.url, SchemaName::default(), config.outbox.max_connections).await?;
    let relay = Arc::new(Engine::new(config, store, timed.clone(), "bench-worker"));
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(relay.clone().run(shutdown));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let per_writer = rate / LATENCY_WRITERS as f64;
    let per_tx = (per_writer / TXNS_PER_WRITER).ceil().max(1.0) as usize;
    let interval = Duration::from_secs_f64(per_tx as f64 / per_writer);
    let started = Instant::now();
    let end = started + Duration::from_secs(secs);
    let mut writers = Vec::new();
    let share = aggregates.len() / LATENCY_WRITERS;
    for w in 0..LATENCY_WRITERS {
        let (pool, publisher) = (pool.clone(), publisher.clone());
        let mine: Vec<Uuid> = aggregates[w * share..(w + 1) * share].to_vec();
        writers.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            let mut committed: Vec<(Uuid, u64)> = Vec::new();
            let mut next = tokio::time::Instant::now();
            let mut i = 0usize;
            while Instant::now() < end {
                let drafts = (0..per_tx).map(|k| draft(mine[(i + k) % mine.len()])).collect();
                i += per_tx;
                let mut tx = conn.begin().await?;
                let events = publisher.publish_events(&mut tx, drafts).await?;
                tx.commit().await?;
                let now = base.elapsed().as_micros() as u64;
                committed.extend(events.iter().map(|e| (e.event_id, now)));
                next += interval;
                let now = tokio::time::Instant::now();
                if next > now {
                    tokio::time::sleep_until(next).await;
                } else if now - next > Duration::from_millis(100) {
                    // Too far behind to catch up: this is the writers' ceiling, not a burst.
                    next = now;
                }
            }
            anyhow::Ok(committed)
        }));
    }
    let mut committed: HashMap<Uuid, u64> = HashMap::new();
    for w in writers {
        committed.extend(w.await??);
    }
    let wrote_for = started.elapsed();
    let total = committed.len() as u64;

    // Wait for the tail to be acknowledged and consumed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while timed.acked.load(Ordering::SeqCst) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let histogram = histogram_quantiles(&relay.metrics().encode());
    let _ = stop.send(true);
    task.await??;
    let _ = stop_consumer.send(true);
    let consumed = consumed.await?;

    let warm_from = committed.values().min().copied().unwrap_or(0) + LATENCY_WARMUP.as_micros() as u64;
    let gaps = |seen: &[(Uuid, u64)]| -> Vec<u64> {
        let mut first: HashMap<Uuid, u64> = HashMap::new();
        for (id, t) in seen {
            first.entry(*id).or_insert(*t);
        }
        first
            .iter()
            .filter_map(|(id, t)| {
                committed
                    .get(id)
                    .filter(|&&c| c >= warm_from)
                    .map(|c| t.saturating_sub(*c))
            })
            .collect()
    };
    let acks = timed
        .acks
        .as_ref()
        .map(|a| a.lock().unwrap().clone())
        .unwrap_or_default();
    let ack = gaps(&acks);
    let consume = gaps(&consumed);
    let calls = timed.calls.lock().unwrap().clone();
    let busy: Vec<&SendCall> = calls.iter().filter(|r| r.size > 0).collect();
    let n = busy.len().max(1) as f64;
    Ok(Latency {
        linger_ms,
        read_ahead,
        wake_up,
        rate_asked: rate,
        rate_reached: total as f64 / wrote_for.as_secs_f64(),
        per_tx,
        samples: ack.len(),
        ack: percentiles(ack),
        consume: percentiles(consume),
        histogram,
        calls: busy.len(),
        mean_call_events: busy.iter().map(|r| r.size).sum::<usize>() as f64 / n,
        mean_send_ms: busy.iter().map(|r| (r.end_us - r.start_us) as f64).sum::<f64>() / n / 1000.0,
    })
}

/// Median ms of each step of a relay round, replayed step by step with the public APIs the
/// worker uses (`Engine::round` in src/delivery/engine.rs, including its waves), on a consumer of
/// its own reading the pre-filled outbox from the start, `batch` events per round.
struct RoundSteps {
    batch: usize,
    waves: f64,
    /// `OutboxReader::read` time of every round, in order.
    reads: Vec<f64>,
    due_heads: f64,
    read: f64,
    fetch_only: f64,
    blocked: f64,
    messages: f64,
    send: f64,
    bookkeeping: f64,
    commit: f64,
}

async fn probe_round(env: &Env, batch: usize, topic: &str) -> anyhow::Result<RoundSteps> {
    // PostgreSQL plans a prepared statement afresh for its first 5 executions on a connection,
    // then may switch to a generic plan: the medians are of rounds 1-5, and every round's read
    // time is kept to show the switch. One connection, so every read runs on the same one.
    const ROUNDS: usize = 10;
    let store = Store::connect(&env.url, SchemaName::default(), 1).await?;
    let consumer = format!("bench-probe-{batch}");
    let reader = OutboxReader::new(store.clone(), consumer.clone());
    let failed = FailedEvents::new(store.clone());
    let shards: Vec<i16> = (0..SHARDS).collect();
    reader.ensure_cursors(&shards).await?;
    let config = relay_config(&consumer, batch, kafka_broker_doc(env, topic), topic);
    let broker = config.broker.connect().await?;
    let metrics = DeliveryMetrics::new(&consumer);
    let mut steps: Vec<[f64; 8]> = Vec::new();
    let mut wave_counts: Vec<f64> = Vec::new();
    let mut after = 0i64;
    for _ in 0..ROUNDS {
        let mut t = Instant::now();
        let mut lap = || {
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            t = Instant::now();
            ms
        };
        failed.due_heads(&consumer, &shards, 100).await?;
        let due_heads = lap();
        let read = reader.read(&shards, batch).await?;
        let read_ms = lap();
        // The same rows fetched without `StoredEvent` decoding (payload left as jsonb text).
        let rows = sqlx::query(
            "SELECT position, shard, recorded_at, event_id, event_type, event_version, aggregate_type, \
             aggregate_id, occurred_at, correlation_id, causation_id, user_id, source, traceparent, \
             payload::text FROM outbox.events WHERE position > $1 ORDER BY position LIMIT $2",
        )
        .bind(after)
        .bind(batch as i64)
        .fetch_all(store.pool())
        .await?;
        let fetch_only = lap();
        drop(rows);
        failed.blocked_aggregates(&consumer).await?;
        let blocked = lap();
        let messages: Vec<Message> = read
            .events
            .iter()
            .map(|e| Message {
                position: e.position,
                destination: config.routing.destination(&e.event),
                event: Arc::new(e.event.clone()),
            })
            .collect();
        let messages_ms = lap();
        // The worker's waves (one for a batch to one Kafka topic).
        let waves: Vec<Vec<Message>> = inventory_outbox::delivery::waves(
            &messages,
            |m| {
                (
                    m.event.aggregate_type.as_str(),
                    m.event.aggregate_id.as_str(),
                    m.destination.as_str(),
                )
            },
            broker.keeps_aggregate_order(),
        )
        .into_iter()
        .map(|wave| wave.into_iter().map(|i| messages[i].clone()).collect())
        .collect();
        wave_counts.push(waves.len() as f64);
        for wave in &waves {
            let results = broker.send_batch(wave).await;
            anyhow::ensure!(results.iter().all(Result::is_ok), "probe send failed");
        }
        let send = lap();
        // `on_published` without the circuit-breaker mutex and the debug event.
        for (e, m) in read.events.iter().zip(&messages) {
            let now = chrono::Utc::now();
            metrics.published(&e.event.event_type, &m.destination, 1);
            metrics.observe_commit_to_ack((now - e.recorded_at).num_microseconds().unwrap_or(0) as f64 / 1e6);
        }
        let bookkeeping = lap();
        after = read.events.last().map_or(after, |e| e.position);
        reader.commit(read.advance).await?;
        let commit = lap();
        steps.push([
            due_heads,
            read_ms,
            fetch_only,
            blocked,
            messages_ms,
            send,
            bookkeeping,
            commit,
        ]);
    }
    let median = |i: usize| {
        let mut v: Vec<f64> = steps.iter().take(5).map(|s| s[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(RoundSteps {
        batch,
        waves: wave_counts.iter().sum::<f64>() / wave_counts.len().max(1) as f64,
        reads: steps.iter().map(|s| s[1]).collect(),
        due_heads: median(0),
        read: median(1),
        fetch_only: median(2),
        blocked: median(3),
        messages: median(4),
        send: median(5),
        bookkeeping: median(6),
        commit: median(7),
    })
}

/// Raw lapin baseline: the same bodies and headers published to the relay's exchange and
/// queue with the relay's settings (persistent, `mandatory`, publisher confirms), `chunk`
/// messages queued at once and then their confirms awaited, as a hand-written publisher would.
/// `one_at_a_time` awaits each publish before the next instead (the adapter's former loop),
/// which shows what a handshake with lapin's I/O thread per message costs.
async fn raw_rabbitmq(
    env: &Env,
    exchange: &str,
    queue: &str,
    records: &[Record],
    chunk: usize,
    one_at_a_time: bool,
) -> anyhow::Result<f64> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let conn = lapin::Connection::connect(&env.amqp, lapin::ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let start = Instant::now();
    for part in records.chunks(chunk) {
        let publishes = part.iter().map(|r| {
            let mut headers = FieldTable::default();
            for (key, value) in &r.headers {
                headers.insert(
                    key.as_str().into(),
                    AMQPValue::LongString(LongString::from(value.as_str())),
                );
            }
            let properties = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_headers(headers);
            channel.basic_publish(exchange.into(), "inventory.stock".into(), options, &r.body, properties)
        });
        let confirms = if one_at_a_time {
            let mut confirms = Vec::with_capacity(part.len());
            for publish in publishes {
                confirms.push(publish.await);
            }
            confirms
        } else {
            join_all(publishes).await
        };
        for confirm in confirms {
            let confirmation = confirm?.await?;
            anyhow::ensure!(confirmation.is_ack(), "raw RabbitMQ publish was not acknowledged");
        }
    }
    let rate = records.len() as f64 / start.elapsed().as_secs_f64();
    conn.close(200, "bye".into()).await?;
    amqp_cleanup(env, exchange, queue, true).await?;
    Ok(rate)
}

/// Relay → RabbitMQ with publisher confirms, one run per batch size, each under a fresh
/// publisher name over the same pre-filled outbox; the queue is purged after each run.
async fn rabbitmq_runs(
    env: &Env,
    pool: &PgPool,
    exchange: &str,
    queue: &str,
    goal: u64,
) -> anyhow::Result<Vec<ThroughputRun>> {
    let mut runs = Vec::new();
    for batch in BATCH_SIZES {
        let broker = json!({"rabbitmq": {"urlEnv": "AMQP_URL", "exchange": exchange,
                                         "queues": [{"name": queue, "bindingKey": "#"}]}});
        let publisher_name = format!("bench-rabbit-b{batch}");
        let config = relay_config(&publisher_name, batch, broker, "inventory.stock");
        let inner = config.broker.connect().await?;
        inner.ensure_destinations(&["inventory.stock".to_owned()]).await?;
        let timed = TimedBroker::new(inner, env.base, goal, false);
        let run = relay_until(env, config, timed, format!("relay → RabbitMQ, batch {batch}"), goal).await?;
        check_cursors(pool, &publisher_name).await?;
        eprintln!("{}", run.breakdown());
        amqp_cleanup(env, exchange, queue, true).await?;
        runs.push(run);
    }
    Ok(runs)
}

/// Prints the RabbitMQ rows: each relay run, the raw lapin baseline, the ratio of the best run
/// to it, and the one-publish-at-a-time variant of the baseline.
fn rabbitmq_rows(runs: &[ThroughputRun], raw: f64, raw_serial: f64, row: &dyn Fn(&str, String, &str, &str)) {
    let best = runs.iter().max_by(|a, b| a.rate.total_cmp(&b.rate)).expect("a run");
    for r in runs {
        let mark = if std::ptr::eq(r, best) { " (best)" } else { "" };
        row(
            &format!("{}{mark}", r.label),
            format!("{:.0} ev/s", r.rate),
            "≥ 30000",
            status(r.rate >= TARGET_RABBIT),
        );
    }
    row(
        &format!("raw lapin, confirms, {} queued at a time", best.batch),
        format!("{raw:.0} msg/s"),
        "",
        "",
    );
    row(
        "ratio relay → RabbitMQ / raw lapin",
        format!("{:.2}", best.rate / raw),
        "",
        "",
    );
    row(
        "raw lapin, confirms, each publish awaited before the next",
        format!("{raw_serial:.0} msg/s"),
        "",
        "",
    );
}

async fn amqp_cleanup(env: &Env, exchange: &str, queue: &str, purge_only: bool) -> anyhow::Result<()> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions, QueuePurgeOptions};
    let conn = lapin::Connection::connect(&env.amqp, lapin::ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    if purge_only {
        channel.queue_purge(queue.into(), QueuePurgeOptions::default()).await?;
    } else {
        for q in [queue.to_owned(), format!("{exchange}.dlq")] {
            channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        for x in [exchange.to_owned(), format!("{exchange}.dlx")] {
            channel
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
    }
    conn.close(200, "bye".into()).await?;
    Ok(())
}

fn status(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    inventory_outbox::tls::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let admin_url = std::env::var("DATABASE_URL").map_err(|_| anyhow::anyhow!("set DATABASE_URL (make env-up)"))?;
    let tag = Uuid::now_v7().simple().to_string()[20..].to_owned();
    let db = format!("bench_relay_{tag}");
    let url = format!(
        "{}/{db}",
        admin_url.rsplit_once('/').map_or(admin_url.as_str(), |(base, _)| base)
    );
    let env = Env {
        admin_url: admin_url.clone(),
        url: url.clone(),
        kafka: std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:19092".into()),
        amqp: std::env::var("AMQP_URL").map_err(|_| anyhow::anyhow!("set AMQP_URL (make env-up)"))?,
        aws_endpoint: std::env::var("AWS_ENDPOINT_URL")
            .map_err(|_| anyhow::anyhow!("set AWS_ENDPOINT_URL (make env-up)"))?,
        base: Instant::now(),
        tag: tag.clone(),
    };
    let mut admin = PgConnection::connect(&env.admin_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut admin)
        .await?;
    // The relay reads DATABASE_URL only through outbox.databaseUrlEnv, which in-process runs ignore.
    let kafka_admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &env.kafka).create()?;
    let mut topics: Vec<String> = Vec::new();
    let exchange = format!("bench-relay-{tag}");
    let queue = format!("{exchange}-all");

    let result = run(&env, &mut topics, &exchange, &queue).await;

    // Cleanup whatever happened.
    let mut all_topics: Vec<String> = topics.clone();
    all_topics.extend(topics.iter().map(|t| format!("{t}-dlq")));
    let names: Vec<&str> = all_topics.iter().map(String::as_str).collect();
    if !names.is_empty()
        && let Err(e) = kafka_admin.delete_topics(&names, &AdminOptions::new()).await
    {
        eprintln!("deleting topics {names:?}: {e}");
    }
    if let Err(e) = amqp_cleanup(&env, &exchange, &queue, false).await {
        eprintln!("deleting RabbitMQ exchange {exchange}: {e}");
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {db} WITH (FORCE)")))
        .execute(&mut admin)
        .await?;
    result
}

async fn run(env: &Env, topics: &mut Vec<String>, exchange: &str, queue: &str) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&env.url)
        .await?;
    let store = Store::from_pool(pool.clone(), SchemaName::default());
    let publisher = InventoryEventPublisher::setup(store, PublisherConfig::default()).await?;
    let aggregates: Vec<Uuid> = (0..AGGREGATES).map(|_| Uuid::now_v7()).collect();
    // RELAY_BENCH_SQS_ONLY=1 / RELAY_BENCH_BACKLOG_ONLY=1: only that section (each writes its
    // own outbox, so the main pre-fill is skipped).
    let only = |section: &str| std::env::var(section).is_ok_and(|v| v == "1");
    if only("RELAY_BENCH_SQS_ONLY") || only("RELAY_BENCH_BACKLOG_ONLY") {
        let row = |name: &str, figure: String, target: &str, st: &str| {
            println!("{name:<64} {figure:>18} {target:>10} {st:>7}");
        };
        if only("RELAY_BENCH_SQS_ONLY") {
            let runs = sqs::sqs_runs(env, &pool).await?;
            println!();
            sqs::sqs_rows(&runs, &row);
        } else {
            let run = backlog::backlog_run(env, &pool, topics).await?;
            println!();
            backlog::backlog_rows(&run, &row);
        }
        return Ok(());
    }

    // Pre-fill (untimed for the relay figures).
    let fill_start = Instant::now();
    let mut tasks = Vec::new();
    let share = AGGREGATES / PREFILL_TASKS;
    for t in 0..PREFILL_TASKS {
        let (pool, publisher) = (pool.clone(), publisher.clone());
        let mine: Vec<Uuid> = aggregates[t * share..(t + 1) * share].to_vec();
        tasks.push(tokio::spawn(async move {
            let mut records = Vec::with_capacity(EVENTS / PREFILL_TASKS);
            for round in 0..EVENTS / PREFILL_TASKS / PREFILL_BATCH {
                let drafts = (0..PREFILL_BATCH)
                    .map(|i| draft(mine[(round * PREFILL_BATCH + i) % mine.len()]))
                    .collect();
                let mut tx = pool.begin().await?;
                let events = publisher.publish_events(&mut tx, drafts).await?;
                tx.commit().await?;
                for e in events {
                    records.push(Record {
                        key: e.aggregate_id.clone(),
                        headers: cloudevents::binary_headers(&e, KAFKA_PREFIX),
                        body: serde_json::to_vec(&e.payload)?,
                    });
                }
            }
            anyhow::Ok(records)
        }));
    }
    let mut records = Vec::with_capacity(EVENTS);
    for t in tasks {
        records.extend(t.await??);
    }
    let fill = fill_start.elapsed();
    sqlx::query("VACUUM ANALYZE outbox.events").execute(&pool).await?;
    let body_mean = records.iter().map(|r| r.body.len()).sum::<usize>() / records.len();
    println!(
        "relay benchmark: {EVENTS} events, {body_mean} B bodies, {} ce_ headers, over {AGGREGATES} aggregates; \
         pre-filled in {:.1} s ({:.0} events/s, {PREFILL_TASKS} writers, {PREFILL_BATCH}/transaction)",
        records[0].headers.len(),
        fill.as_secs_f64(),
        EVENTS as f64 / fill.as_secs_f64()
    );
    let goal = EVENTS as u64;

    // 0. TLS cost: relay → Kafka over SASL_SSL (SCRAM-SHA-512) next to plaintext, both on the
    // local Kafka TLS node, so TLS and SASL are the only difference. Runs when the TLS node is
    // in the environment (`make env-up`); RELAY_BENCH_TLS_ONLY=1 stops after it.
    if let Some(node) = TlsNode::from_env() {
        tls_comparison(env, &pool, &node, goal).await?;
        if std::env::var("RELAY_BENCH_TLS_ONLY").is_ok_and(|v| v == "1") {
            return Ok(());
        }
    }

    // RELAY_BENCH_RABBITMQ_ONLY=1: only the RabbitMQ runs and their raw lapin baseline.
    if std::env::var("RELAY_BENCH_RABBITMQ_ONLY").is_ok_and(|v| v == "1") {
        let runs = rabbitmq_runs(env, &pool, exchange, queue, goal).await?;
        let best = runs
            .iter()
            .max_by(|a, b| a.rate.total_cmp(&b.rate))
            .map_or(BATCH_SIZES[0], |r| r.batch);
        let raw = raw_rabbitmq(env, exchange, queue, &records, best, false).await?;
        let raw_serial = raw_rabbitmq(env, exchange, queue, &records, best, true).await?;
        pool.close().await;
        println!();
        let row = |name: &str, figure: String, target: &str, st: &str| {
            println!("{name:<64} {figure:>18} {target:>10} {st:>7}");
        };
        rabbitmq_rows(&runs, raw, raw_serial, &row);
        println!();
        for r in &runs {
            println!("  {}", r.breakdown());
        }
        return Ok(());
    }

    let row = |name: &str, figure: String, target: &str, st: &str| {
        println!("{name:<64} {figure:>18} {target:>10} {st:>7}");
    };

    // RELAY_BENCH_LATENCY_ONLY=1: one throughput run at the largest batch (it catches its
    // publisher up, as the latency runs need), then only the latency runs.
    if only("RELAY_BENCH_LATENCY_ONLY") {
        let run = kafka_run(env, topics, BATCH_SIZES[BATCH_SIZES.len() - 1], goal).await?;
        let latencies = latency_runs(env, &pool, &publisher, &run, topics, &aggregates).await?;
        pool.close().await;
        println!();
        row(&run.label, format!("{:.0} events/s", run.rate), "", "");
        latency_rows(&latencies, &row);
        for lat in &latencies {
            println!(
                "  latency run @ {:.0} ev/s: {} samples, {} send_batch calls, {:.1} events/call, {:.1} ms/call",
                lat.rate_reached, lat.samples, lat.calls, lat.mean_call_events, lat.mean_send_ms
            );
        }
        return Ok(());
    }

    // 1. Relay → Kafka, per batch size.
    let mut kafka_runs = Vec::new();
    for batch in BATCH_SIZES {
        let run = kafka_run(env, topics, batch, goal).await?;
        check_cursors(&pool, &format!("bench-kafka-b{batch}")).await?;
        eprintln!("{}", run.breakdown());
        kafka_runs.push(run);
    }
    let best = kafka_runs
        .iter()
        .max_by(|a, b| a.rate.total_cmp(&b.rate))
        .expect("a run");
    // For information only (not a candidate for "best"): the best batch size with lingerMs 0.
    let linger0 = {
        let batch = best.batch;
        let topic = format!("bench-relay-{}-b{batch}-l0", env.tag);
        topics.push(topic.clone());
        let publisher_name = format!("bench-kafka-b{batch}-l0");
        let config = relay_config(&publisher_name, batch, kafka_broker_doc_linger(env, &topic, 0), &topic);
        let inner = config.broker.connect().await?;
        inner.ensure_destinations(std::slice::from_ref(&topic)).await?;
        let timed = TimedBroker::new(inner, env.base, goal, false);
        let label = format!("relay → Kafka, batch {batch}, lingerMs 0");
        let run = relay_until(env, config, timed, label, goal).await?;
        check_cursors(&pool, &publisher_name).await?;
        eprintln!("{}", run.breakdown());
        run
    };

    // The best batch size again without this round's two changes, same process: strict
    // per-aggregate waves and no read-ahead (the loop as it was), then one call per batch but
    // no read-ahead, so each change has its own before/after.
    // Last, read-ahead on but each batch's acknowledgements awaited before the next is handed
    // over: the loop before pipelining.
    // And the shipped loop with glibc's malloc instead of mimalloc.
    let mut variant = async |suffix: &str,
                             strict_waves: bool,
                             read_ahead: bool,
                             pipelined: bool,
                             glibc: bool|
           -> anyhow::Result<ThroughputRun> {
        let batch = best.batch;
        let topic = format!("bench-relay-{}-b{batch}-{suffix}", env.tag);
        topics.push(topic.clone());
        let publisher_name = format!("bench-kafka-b{batch}-{suffix}");
        let mut config = relay_config(&publisher_name, batch, kafka_broker_doc(env, &topic), &topic);
        config.outbox.read_ahead = read_ahead;
        let inner = config.broker.connect().await?;
        inner.ensure_destinations(std::slice::from_ref(&topic)).await?;
        let timed = TimedBroker::new(inner, env.base, goal, false);
        timed.strict_waves.store(strict_waves, Ordering::SeqCst);
        timed.no_pipeline.store(!pipelined, Ordering::SeqCst);
        let label = format!(
            "relay → Kafka, batch {batch}, {}, {}{}{}",
            if strict_waves { "strict waves" } else { "one call" },
            if read_ahead { "read-ahead" } else { "no read-ahead" },
            if read_ahead && !pipelined {
                ", not pipelined"
            } else {
                ""
            },
            if glibc { ", glibc malloc" } else { "" }
        );
        allocator::use_system_malloc(glibc);
        let run = relay_until(env, config, timed, label, goal).await;
        allocator::use_system_malloc(false);
        let run = run?;
        check_cursors(&pool, &publisher_name).await?;
        eprintln!("{}", run.breakdown());
        Ok(run)
    };
    let strict = variant("strict", true, false, false, false).await?;
    let no_read_ahead = variant("one-call", false, false, false, false).await?;
    let not_pipelined = variant("no-pipeline", false, true, false, false).await?;
    let glibc = variant("glibc", false, true, true, true).await?;

    // 2. Raw producer baseline, same records.
    let kafka_admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &env.kafka).create()?;
    let raw_topic = format!("bench-raw-{}", env.tag);
    topics.push(raw_topic.clone());
    create_topic(&kafka_admin, &raw_topic).await?;
    let raw_producer = producer(env)?;
    {
        let p = raw_producer.clone();
        let t = raw_topic.clone();
        tokio::task::spawn_blocking(move || {
            use rdkafka::producer::Producer;
            p.client().fetch_metadata(Some(&t), Duration::from_secs(10))
        })
        .await??;
    }
    let raw_all = raw_kafka(&raw_producer, &raw_topic, &records, records.len()).await?;
    let raw_batched = raw_kafka(&raw_producer, &raw_topic, &records, best.batch).await?;
    let kafka_rows = |row: &dyn Fn(&str, String, &str, &str)| {
        for r in &kafka_runs {
            let mark = if std::ptr::eq(r, best) { " (best)" } else { "" };
            row(
                &format!("{}{mark}", r.label),
                format!("{:.0} ev/s", r.rate),
                "≥ 50000",
                status(r.rate >= TARGET_RELAY_KAFKA),
            );
        }
        for r in [&linger0, &strict, &no_read_ahead, &not_pipelined, &glibc] {
            row(
                &format!("{} (information)", r.label),
                format!("{:.0} ev/s", r.rate),
                "",
                "",
            );
        }
        for (name, ratio) in [
            (
                "best / strict waves, no read-ahead (the loop before)",
                best.rate / strict.rate,
            ),
            (
                "  of which one call per batch (one call / strict waves)",
                no_read_ahead.rate / strict.rate,
            ),
            (
                "  of which read-ahead (not pipelined / one call, no read-ahead)",
                not_pipelined.rate / no_read_ahead.rate,
            ),
            (
                "  of which pipelining (best / read-ahead, not pipelined)",
                best.rate / not_pipelined.rate,
            ),
            ("mimalloc (best / glibc malloc, same loop)", best.rate / glibc.rate),
        ] {
            row(name, format!("{ratio:.2}"), "", "");
        }
        row(
            "raw FutureProducer, all enqueued then awaited",
            format!("{raw_all:.0} msg/s"),
            "",
            "",
        );
        row(
            &format!("raw FutureProducer, awaited per {}", best.batch),
            format!("{raw_batched:.0} msg/s"),
            "",
            "",
        );
        row(
            "ratio relay (best) / raw (all enqueued)",
            format!("{:.2}", best.rate / raw_all),
            "≥ 0.70",
            status(best.rate / raw_all >= TARGET_RATIO),
        );
        row(
            &format!("ratio relay (best) / raw (per {})", best.batch),
            format!("{:.2}", best.rate / raw_batched),
            "",
            "",
        );
    };
    // RELAY_BENCH_KAFKA_ONLY=1: only the Kafka throughput runs and the raw producer baseline.
    if std::env::var("RELAY_BENCH_KAFKA_ONLY").is_ok_and(|v| v == "1") {
        pool.close().await;
        println!();
        kafka_rows(&|name: &str, figure: String, target: &str, st: &str| {
            println!("{name:<64} {figure:>18} {target:>10} {st:>7}");
        });
        println!();
        for r in kafka_runs
            .iter()
            .chain([&linger0, &strict, &no_read_ahead, &not_pipelined, &glibc])
        {
            println!("  {}", r.breakdown());
        }
        return Ok(());
    }

    // Where a round's time goes, step by step (sends to the raw topic).
    let mut steps = Vec::new();
    for batch in BATCH_SIZES {
        steps.push(probe_round(env, batch, &raw_topic).await?);
    }

    // 3. Relay → RabbitMQ with publisher confirms, and the raw lapin baseline.
    let rabbit_runs = rabbitmq_runs(env, &pool, exchange, queue, goal).await?;
    let best_rabbit_batch = rabbit_runs
        .iter()
        .max_by(|a, b| a.rate.total_cmp(&b.rate))
        .map_or(BATCH_SIZES[0], |r| r.batch);
    let raw_rabbit = raw_rabbitmq(env, exchange, queue, &records, best_rabbit_batch, false).await?;
    let raw_rabbit_serial = raw_rabbitmq(env, exchange, queue, &records, best_rabbit_batch, true).await?;
    drop(records);
    // 5. Relay → SNS/SQS: how full the batch calls are. 6. Relay memory with a 1,000,000-event backlog.
    let sqs_runs = sqs::sqs_runs(env, &pool).await?;
    let backlog = backlog::backlog_run(env, &pool, topics).await?;
    // 4. Latency at half the best relay rate, on the caught-up publisher of the best run; last,
    //    as it appends events the throughput runs must not see.
    let latencies = latency_runs(env, &pool, &publisher, best, topics, &aggregates).await?;
    pool.close().await;

    // Report.
    println!();
    println!(
        "{:<64} {:>18} {:>10} {:>7}",
        "measurement", "figure", "target", "status"
    );
    kafka_rows(&row);
    latency_rows(&latencies, &row);
    rabbitmq_rows(&rabbit_runs, raw_rabbit, raw_rabbit_serial, &row);
    sqs::sqs_rows(&sqs_runs, &row);
    backlog::backlog_rows(&backlog, &row);
    println!();
    println!("where the time goes (one send_batch call per wave; to one Kafka topic a round is one wave):");
    for r in kafka_runs
        .iter()
        .chain([&linger0, &strict, &no_read_ahead, &not_pipelined, &glibc])
        .chain(&rabbit_runs)
        .chain(sqs_runs.iter().map(|r| &r.run))
    {
        println!("  {}", r.breakdown());
    }
    println!("one relay round replayed step by step (median ms of rounds 1-5; src/delivery/engine.rs Engine::round):");
    println!(
        "  {:>6} {:>9} {:>8} {:>11} {:>8} {:>9} {:>6} {:>8} {:>12} {:>8} {:>8}",
        "batch",
        "due_heads",
        "read",
        "(rows only)",
        "blocked",
        "messages",
        "waves",
        "send",
        "on_published",
        "commit",
        "total"
    );
    for s in &steps {
        let total = s.due_heads + s.read + s.blocked + s.messages + s.send + s.bookkeeping + s.commit;
        println!(
            "  {:>6} {:>9.1} {:>8.1} {:>11.1} {:>8.1} {:>9.1} {:>6.1} {:>8.1} {:>12.1} {:>8.1} {:>8.1}",
            s.batch,
            s.due_heads,
            s.read,
            s.fetch_only,
            s.blocked,
            s.messages,
            s.waves,
            s.send,
            s.bookkeeping,
            s.commit,
            total
        );
    }
    for s in &steps {
        let reads: Vec<String> = s.reads.iter().map(|r| format!("{r:.1}")).collect();
        println!(
            "  batch {}: OutboxReader::read ms by round (cursor moving up by {} each; executions 6+ may use a generic plan): {}",
            s.batch,
            s.batch,
            reads.join(" ")
        );
    }
    for lat in &latencies {
        println!(
            "  latency run @ {:.0} ev/s: {} samples, {} send_batch calls, {:.1} events/call, {:.1} ms/call",
            lat.rate_reached, lat.samples, lat.calls, lat.mean_call_events, lat.mean_send_ms
        );
    }
    Ok(())
}
