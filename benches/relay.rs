//! Relay throughput and latency against the real services, in one run.
//!
//! `source ~/.local/state/inventory-outbox/env.sh && cargo bench --bench relay`
//!
//! 1. Throughput outbox → Kafka: a fresh database is pre-filled (untimed) with `EVENTS` 1 KiB
//!    events over `AGGREGATES` aggregates; an in-process relay (acks=all, idempotence, lz4,
//!    linger 5 ms, 6 partitions, binary mode) is started per batch size in `BATCH_SIZES`, each
//!    under its own publisher name so each reads the whole outbox from the start, and timed
//!    from its start until the broker acknowledged every event.
//! 2. Baseline: a raw rdkafka `FutureProducer` with the adapter's settings sends the same
//!    records (same keys, bodies and `ce_` headers) to another topic, all enqueued then awaited;
//!    a second figure awaits them per batch of the relay's best batch size, as the relay does.
//! 3. Throughput outbox → RabbitMQ with publisher confirms (exchange + one bound queue).
//! 4. Commit → ack latency: writers commit small transactions at a steady rate (half the best
//!    relay rate, or what they sustain) while the caught-up relay publishes them. Commit time
//!    is taken right after `COMMIT` returns; ack time when the adapter's `send_batch` returns
//!    (the moment the relay counts the event as published, seen through a timing wrapper
//!    around the broker); consume time when a Kafka consumer in this process receives it.
//!
//! Everything it creates (database, topics, exchanges, queues) is dropped at the end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use inventory_outbox::broker::{BoxFuture, Broker, Message, SendError};
use inventory_outbox::event::cloudevents::{self, KAFKA_PREFIX};
use inventory_outbox::event::{NewEvent, inventory::StockChangeReason, inventory::StockLevelChanged};
use inventory_outbox::publisher::{InventoryEventPublisher, PublisherConfig};
use inventory_outbox::relay::config::RelayConfig;
use inventory_outbox::relay::worker::Relay;
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
    let mut event = NewEvent::from_payload(&StockLevelChanged {
        inventory_item_id: aggregate,
        warehouse_id: Uuid::now_v7(),
        previous_quantity: 10,
        new_quantity: 11,
        change_amount: 1,
        change_reason: StockChangeReason::Receipt,
        transaction_id: Uuid::now_v7(),
    })
    .expect("payload");
    // Pad to 1 KiB with an optional field (schemas are open for additive evolution).
    let size = event.payload.to_string().len();
    event.payload["note"] = "x".repeat(1024usize.saturating_sub(size + 10)).into();
    event
}

/// One Kafka record as the adapter encodes it in binary mode.
struct Record {
    key: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// One `send_batch` call as seen from outside the adapter (µs since the bench started).
#[derive(Clone, Copy)]
struct Round {
    start_us: u64,
    end_us: u64,
    size: usize,
}

/// Wraps the relay's broker adapter: counts acknowledged messages, times every `send_batch`
/// and, when asked, records the moment each event was acknowledged.
struct TimedBroker {
    inner: Arc<dyn Broker>,
    base: Instant,
    acked: AtomicU64,
    goal: AtomicU64,
    goal_reached_us: AtomicU64,
    rounds: Mutex<Vec<Round>>,
    acks: Option<Mutex<Vec<(Uuid, u64)>>>,
}

impl TimedBroker {
    fn new(inner: Arc<dyn Broker>, base: Instant, goal: u64, record_acks: bool) -> Arc<Self> {
        Arc::new(Self {
            inner,
            base,
            acked: AtomicU64::new(0),
            goal: AtomicU64::new(goal),
            goal_reached_us: AtomicU64::new(0),
            rounds: Mutex::new(Vec::new()),
            acks: record_acks.then(|| Mutex::new(Vec::new())),
        })
    }

    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
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
            let end_us = self.now_us();
            let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
            if let Some(acks) = &self.acks {
                let mut acks = acks.lock().unwrap();
                for (m, r) in messages.iter().zip(&results) {
                    if r.is_ok() {
                        acks.push((m.event.event_id, end_us));
                    }
                }
            }
            self.rounds.lock().unwrap().push(Round {
                start_us,
                end_us,
                size: messages.len(),
            });
            let before = self.acked.fetch_add(ok, Ordering::SeqCst);
            let goal = self.goal.load(Ordering::SeqCst);
            if before < goal && before + ok >= goal {
                self.goal_reached_us.store(end_us, Ordering::SeqCst);
            }
            results
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
}

/// What a throughput run measured.
struct ThroughputRun {
    label: String,
    batch: usize,
    rate: f64,
    elapsed: Duration,
    rounds: Vec<Round>,
    start_us: u64,
}

impl ThroughputRun {
    /// "rounds, mean batch, mean send_batch ms, mean time between sends ms, startup ms".
    fn breakdown(&self) -> String {
        let n = self.rounds.len().max(1) as f64;
        let sent: usize = self.rounds.iter().map(|r| r.size).sum();
        let send_ms: f64 = self.rounds.iter().map(|r| (r.end_us - r.start_us) as f64).sum::<f64>() / 1000.0;
        let gaps_ms: f64 = self
            .rounds
            .windows(2)
            .map(|w| w[1].start_us.saturating_sub(w[0].end_us) as f64)
            .sum::<f64>()
            / 1000.0;
        let startup_ms = self
            .rounds
            .first()
            .map_or(0.0, |r| r.start_us.saturating_sub(self.start_us) as f64 / 1000.0);
        format!(
            "{:<28} {:>6.0} ev/s: {:>4} rounds, {:>5.0} events/round, send_batch {:>6.1} ms/round ({:>4.0} % of {:.2} s), \
             between sends {:>5.1} ms/round (read + cursor commit + bookkeeping), first send after {:.0} ms",
            self.label,
            self.rate,
            self.rounds.len(),
            sent as f64 / n,
            send_ms / n,
            100.0 * send_ms / (self.elapsed.as_secs_f64() * 1000.0),
            self.elapsed.as_secs_f64(),
            gaps_ms / (n - 1.0).max(1.0),
            startup_ms,
        )
    }
}

struct Env {
    admin_url: String,
    url: String,
    kafka: String,
    amqp: String,
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

fn kafka_broker_doc(env: &Env, topic: &str) -> serde_json::Value {
    json!({"kafka": {"bootstrapServers": env.kafka, "deadLetterTopic": format!("{topic}-dlq"),
                     "partitions": PARTITIONS, "clientId": "outbox-bench"}})
}

/// Starts a relay on a store of its own, waits until `goal` events are acknowledged, stops it.
async fn relay_until(
    env: &Env,
    config: RelayConfig,
    timed: Arc<TimedBroker>,
    label: String,
    goal: u64,
) -> anyhow::Result<ThroughputRun> {
    let store = Store::connect(&env.url, SchemaName::default(), config.outbox.max_connections).await?;
    let batch = config.outbox.batch_size;
    let relay = Arc::new(Relay::new(config, store, timed.clone(), "bench-worker"));
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
    let rounds = timed.rounds.lock().unwrap().clone();
    Ok(ThroughputRun {
        label,
        batch,
        rate: goal as f64 / elapsed.as_secs_f64(),
        elapsed,
        rounds,
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
struct Latency {
    rate_asked: f64,
    rate_reached: f64,
    per_tx: usize,
    samples: usize,
    ack: (f64, f64, f64),
    consume: (f64, f64, f64),
    histogram: (String, String),
    rounds: usize,
    mean_round_events: f64,
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

/// Writers commit `rate` events/s for `LATENCY_SECS` while a caught-up relay publishes them.
async fn latency(
    env: &Env,
    pool: &PgPool,
    publisher: &InventoryEventPublisher,
    relay_publisher: &str,
    batch: usize,
    rate: f64,
    aggregates: &[Uuid],
) -> anyhow::Result<Latency> {
    let topic = format!("bench-latency-{}", env.tag);
    let config = relay_config(relay_publisher, batch, kafka_broker_doc(env, &topic), &topic);
    let inner = inventory_outbox::relay::connect_broker(&config.broker).await?;
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
    let relay = Arc::new(Relay::new(config, store, timed.clone(), "bench-worker"));
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(relay.clone().run(shutdown));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let per_writer = rate / LATENCY_WRITERS as f64;
    let per_tx = (per_writer / TXNS_PER_WRITER).ceil().max(1.0) as usize;
    let interval = Duration::from_secs_f64(per_tx as f64 / per_writer);
    let started = Instant::now();
    let end = started + Duration::from_secs(LATENCY_SECS);
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
    let rounds = timed.rounds.lock().unwrap().clone();
    let busy: Vec<&Round> = rounds.iter().filter(|r| r.size > 0).collect();
    let n = busy.len().max(1) as f64;
    Ok(Latency {
        rate_asked: rate,
        rate_reached: total as f64 / wrote_for.as_secs_f64(),
        per_tx,
        samples: ack.len(),
        ack: percentiles(ack),
        consume: percentiles(consume),
        histogram,
        rounds: busy.len(),
        mean_round_events: busy.iter().map(|r| r.size).sum::<usize>() as f64 / n,
        mean_send_ms: busy.iter().map(|r| (r.end_us - r.start_us) as f64).sum::<f64>() / n / 1000.0,
    })
}

/// Time one `OutboxReader::read` of `limit` events and one cursor commit take on this outbox.
async fn probe_reader(env: &Env, limit: usize) -> anyhow::Result<(f64, f64)> {
    let store = Store::connect(&env.url, SchemaName::default(), 2).await?;
    let reader = OutboxReader::new(store, "bench-probe");
    let shards: Vec<i16> = (0..SHARDS).collect();
    reader.ensure_cursors(&shards).await?;
    let mut read_ms = Vec::new();
    let mut commit_ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let batch = reader.read(&shards, limit).await?;
        read_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        reader.commit(batch.advance).await?;
        commit_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(read_ms), median(commit_ms)))
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

    // 1. Relay → Kafka, per batch size.
    let mut kafka_runs = Vec::new();
    for batch in BATCH_SIZES {
        let topic = format!("bench-relay-{}-b{batch}", env.tag);
        topics.push(topic.clone());
        let config = relay_config(
            &format!("bench-kafka-b{batch}"),
            batch,
            kafka_broker_doc(env, &topic),
            &topic,
        );
        let inner = inventory_outbox::relay::connect_broker(&config.broker).await?;
        inner.ensure_destinations(std::slice::from_ref(&topic)).await?;
        let timed = TimedBroker::new(inner, env.base, goal, false);
        let run = relay_until(env, config, timed, format!("relay → Kafka, batch {batch}"), goal).await?;
        check_cursors(&pool, &format!("bench-kafka-b{batch}")).await?;
        eprintln!("{}", run.breakdown());
        kafka_runs.push(run);
    }
    let best = kafka_runs
        .iter()
        .max_by(|a, b| a.rate.total_cmp(&b.rate))
        .expect("a run");

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
    drop(records);

    // Where the relay's time goes, outside the broker: one read and one cursor commit.
    let (read_ms, commit_ms) = probe_reader(env, best.batch).await?;

    // 3. Relay → RabbitMQ with publisher confirms.
    let mut rabbit_runs = Vec::new();
    for batch in BATCH_SIZES {
        let broker = json!({"rabbitmq": {"urlEnv": "AMQP_URL", "exchange": exchange,
                                         "queues": [{"name": queue, "bindingKey": "#"}]}});
        let publisher_name = format!("bench-rabbit-b{batch}");
        let config = relay_config(&publisher_name, batch, broker, "inventory.stock");
        let inner = inventory_outbox::relay::connect_broker(&config.broker).await?;
        inner.ensure_destinations(&["inventory.stock".to_owned()]).await?;
        let timed = TimedBroker::new(inner, env.base, goal, false);
        let run = relay_until(env, config, timed, format!("relay → RabbitMQ, batch {batch}"), goal).await?;
        check_cursors(&pool, &publisher_name).await?;
        eprintln!("{}", run.breakdown());
        amqp_cleanup(env, exchange, queue, true).await?;
        rabbit_runs.push(run);
    }
    let best_rabbit = rabbit_runs
        .iter()
        .max_by(|a, b| a.rate.total_cmp(&b.rate))
        .expect("a run");
    // 4. Latency at half the best relay rate, on the caught-up publisher of the best run; last,
    //    as it appends events the throughput runs must not see.
    let lat_topic = format!("bench-latency-{}", env.tag);
    topics.push(lat_topic);
    let best_publisher = format!("bench-kafka-b{}", best.batch);
    let lat = latency(
        env,
        &pool,
        &publisher,
        &best_publisher,
        best.batch,
        best.rate * 0.5,
        &aggregates,
    )
    .await?;

    pool.close().await;

    // Report.
    println!();
    println!(
        "{:<52} {:>16} {:>12} {:>8}",
        "measurement", "figure", "target", "status"
    );
    let row = |name: &str, figure: String, target: &str, st: &str| {
        println!("{name:<52} {figure:>16} {target:>12} {st:>8}");
    };
    for r in &kafka_runs {
        let mark = if std::ptr::eq(r, best) { " (best)" } else { "" };
        row(
            &format!("{}{mark}", r.label),
            format!("{:.0} ev/s", r.rate),
            "≥ 50000",
            status(r.rate >= TARGET_RELAY_KAFKA),
        );
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
    let lat_title = format!(
        "@ {:.0} ev/s asked, {:.0} reached, {}/txn",
        lat.rate_asked, lat.rate_reached, lat.per_tx
    );
    row(
        &format!("commit → ack p50 {lat_title}"),
        format!("{:.1} ms", lat.ack.0),
        "≤ 5 ms",
        status(lat.ack.0 <= TARGET_P50_MS),
    );
    row(
        "commit → ack p99",
        format!("{:.1} ms", lat.ack.1),
        "≤ 25 ms",
        status(lat.ack.1 <= TARGET_P99_MS),
    );
    row("commit → ack mean", format!("{:.1} ms", lat.ack.2), "", "");
    row(
        "commit → consume p50 / p99 (upper bound of ack)",
        format!("{:.1} / {:.1} ms", lat.consume.0, lat.consume.1),
        "",
        "",
    );
    row(
        "relay commit_to_ack_seconds histogram p50 / p99",
        format!("{} / {}", lat.histogram.0, lat.histogram.1),
        "",
        "",
    );
    for r in &rabbit_runs {
        let mark = if std::ptr::eq(r, best_rabbit) { " (best)" } else { "" };
        row(
            &format!("{}{mark}", r.label),
            format!("{:.0} ev/s", r.rate),
            "≥ 30000",
            status(r.rate >= TARGET_RABBIT),
        );
    }
    println!();
    println!("where the time goes (send_batch = encode + enqueue + wait for every ack/confirm):");
    for r in kafka_runs.iter().chain(&rabbit_runs) {
        println!("  {}", r.breakdown());
    }
    println!(
        "  OutboxReader::read of {} events: {read_ms:.1} ms; cursor commit: {commit_ms:.1} ms (median of 5, alone)",
        best.batch
    );
    println!(
        "  latency run: {} samples, {} non-empty rounds, {:.1} events/round, send_batch {:.1} ms/round",
        lat.samples, lat.rounds, lat.mean_round_events, lat.mean_send_ms
    );
    Ok(())
}
