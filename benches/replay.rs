//! Replay throughput next to the relay's, on the same outbox in the same run.
//!
//! `source ~/.local/state/inventory-outbox/env.sh && cargo bench --bench replay`
//!
//! A fresh database is pre-filled (untimed) with `EVENTS` 1 KiB events over `AGGREGATES`
//! aggregates. Then, each on its own topic and with the same Kafka adapter settings (acks=all,
//! idempotence, lz4, linger 5 ms, 6 partitions, binary mode):
//! 1. the relay (in process, batch 1000) publishes the whole outbox, timed from its start
//!    until the broker acknowledged every event;
//! 2. the replay engine (in process, batch 1000, no rate limit) replays the whole history to a
//!    topic override, timed from its start to its final checkpoint (it counts the range first,
//!    waits for writers in flight, then reads and sends wave by wave, one checkpoint per batch).
//!
//! Everything it creates (database, topics) is dropped at the end. Figures: BENCHMARKS.md.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use inventory_outbox::broker::{BoxFuture, Broker, Message, SendError};
use inventory_outbox::delivery;
use inventory_outbox::publisher::{InventoryEventPublisher, PublisherConfig};
use inventory_outbox::relay::config::RelayConfig;
use inventory_outbox::replay::engine::Engine;
use inventory_outbox::replay::plan::PublishPlan;
use inventory_outbox::replay::report::ReplayReport;
use inventory_outbox::store::replay::ReplaySelection;
use inventory_outbox::store::{SchemaName, Store};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use serde_json::json;
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;
use uuid::Uuid;

/// Events pre-filled into the outbox (a multiple of 4 writers x `PREFILL_BATCH`).
const EVENTS: usize = 48_000;
/// Aggregates the events are spread over.
const AGGREGATES: usize = 1000;
/// Events per pre-fill transaction.
const PREFILL_BATCH: usize = 1000;
/// Batch size of both the relay and the replay.
const BATCH: usize = 1000;

/// Counts acknowledged messages and notes when `goal` were reached.
struct Counting {
    inner: Arc<dyn Broker>,
    acked: AtomicU64,
    goal: u64,
    reached: Mutex<Option<Instant>>,
}

impl Broker for Counting {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn send_batch<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Vec<Result<(), SendError>>> {
        Box::pin(async move {
            let results = self.inner.send_batch(messages).await;
            let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
            if self.acked.fetch_add(ok, Ordering::SeqCst) + ok >= self.goal
                && let Ok(mut reached) = self.reached.lock()
            {
                reached.get_or_insert_with(Instant::now);
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

fn config(publisher: &str, kafka: &str, topic: &str) -> RelayConfig {
    let doc = json!({
        "publisher": publisher,
        "outbox": {"databaseUrlEnv": "DATABASE_URL", "batchSize": BATCH, "migrate": false},
        "broker": {"kafka": {"bootstrapServers": kafka, "deadLetterTopic": format!("{topic}-dlq"),
                             "partitions": 6, "clientId": "outbox-bench", "lingerMs": 5}},
        "routing": {"strategy": "single", "destination": topic},
    });
    let config: RelayConfig = serde_json::from_value(doc).expect("relay config");
    config.validate().expect("valid relay config");
    config
}

async fn prefill(publisher: &InventoryEventPublisher, pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let aggregates: Vec<Uuid> = (0..AGGREGATES).map(|_| Uuid::now_v7()).collect();
    let mut tasks = Vec::new();
    for part in 0..4 {
        let (publisher, pool) = (publisher.clone(), pool.clone());
        let mine: Vec<Uuid> = aggregates.iter().skip(part).step_by(4).copied().collect();
        tasks.push(tokio::spawn(async move {
            for round in 0..EVENTS / (PREFILL_BATCH * 4) {
                let drafts = (0..PREFILL_BATCH)
                    .map(|i| support::kib_draft(mine[(round * PREFILL_BATCH + i) % mine.len()]))
                    .collect();
                let mut tx = pool.begin().await?;
                publisher.publish_events(&mut tx, drafts).await?;
                tx.commit().await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn relay_rate(url: &str, config: RelayConfig, goal: u64) -> anyhow::Result<f64> {
    let store = Store::connect(url, SchemaName::default(), config.outbox.max_connections).await?;
    let broker = Arc::new(Counting {
        inner: config.broker.connect().await?,
        acked: AtomicU64::new(0),
        goal,
        reached: Mutex::new(None),
    });
    let relay = Arc::new(delivery::Engine::new(config, store, broker.clone(), "bench-relay"));
    let (stop, shutdown) = watch::channel(false);
    let start = Instant::now();
    let task = tokio::spawn(relay.clone().run(shutdown));
    let deadline = start + Duration::from_secs(300);
    let end = loop {
        if let Some(at) = broker.reached.lock().ok().and_then(|r| *r) {
            break at;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "relay: {} of {goal} acknowledged after 300 s",
            broker.acked.load(Ordering::SeqCst)
        );
        anyhow::ensure!(!task.is_finished(), "relay stopped early");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let _ = stop.send(true);
    task.await??;
    Ok(goal as f64 / (end - start).as_secs_f64())
}

async fn replay_rate(url: &str, config: &RelayConfig, target: &str) -> anyhow::Result<(f64, ReplayReport)> {
    let store = Store::connect(url, SchemaName::default(), 4).await?;
    let broker = config.broker.connect().await?;
    let engine = Engine {
        store,
        broker,
        routing: config.routing.clone(),
        retry: config.retry.clone(),
        plan: PublishPlan {
            selection: ReplaySelection::default(),
            target: Some(target.to_owned()),
            rate_limit: None,
            dry_run: false,
        },
        replay_id: Uuid::new_v4().to_string(),
        job: "bench/replay".into(),
        publisher: config.publisher.clone(),
        batch_size: BATCH,
        progress: Arc::default(),
    };
    let (_stop, shutdown) = watch::channel(false);
    let start = Instant::now();
    let report = engine.run(shutdown).await?;
    let elapsed = start.elapsed();
    anyhow::ensure!(
        report.replayed == EVENTS as i64,
        "replayed {} of {EVENTS}",
        report.replayed
    );
    Ok((report.replayed as f64 / elapsed.as_secs_f64(), report))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    inventory_outbox::tls::install_crypto_provider();
    let admin_url = std::env::var("DATABASE_URL").map_err(|_| anyhow::anyhow!("set DATABASE_URL (make env-up)"))?;
    let kafka = std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let tag = Uuid::now_v7().simple().to_string()[20..].to_owned();
    let db = format!("bench_replay_{tag}");
    let url = format!(
        "{}/{db}",
        admin_url.rsplit_once('/').map_or(admin_url.as_str(), |(b, _)| b)
    );
    let mut admin = PgConnection::connect(&admin_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut admin)
        .await?;
    let live = format!("bench-replay-live-{tag}");
    let replayed = format!("bench-replay-target-{tag}");
    let result = run(&url, &kafka, &live, &replayed).await;
    let kafka_admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &kafka).create()?;
    let dlq = format!("{live}-dlq");
    if let Err(e) = kafka_admin
        .delete_topics(&[&live, &replayed, &dlq], &AdminOptions::new())
        .await
    {
        eprintln!("deleting topics: {e}");
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {db} WITH (FORCE)")))
        .execute(&mut admin)
        .await?;
    result
}

async fn run(url: &str, kafka: &str, live: &str, replayed: &str) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(url)
        .await?;
    let publisher = InventoryEventPublisher::setup(
        Store::from_pool(pool.clone(), SchemaName::default()),
        PublisherConfig::default(),
    )
    .await?;
    let fill = Instant::now();
    prefill(&publisher, &pool).await?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.events")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(stored == EVENTS as i64, "pre-fill stored {stored} events, not {EVENTS}");
    println!(
        "pre-filled {EVENTS} events of 1 KiB over {AGGREGATES} aggregates in {:.1} s",
        fill.elapsed().as_secs_f64()
    );
    let config = config("bench-replay", kafka, live);
    let relay = relay_rate(url, config.clone(), EVENTS as u64).await?;
    let (replay, report) = replay_rate(url, &config, replayed).await?;
    println!();
    println!("| path (1 KiB events, Kafka acks=all, batch {BATCH}) | events/s |");
    println!("| --- | ---: |");
    println!("| relay: outbox -> Kafka | {relay:.0} |");
    println!("| replay: event store -> Kafka (topic override) | {replay:.0} |");
    println!("| replay / relay | {:.2} |", replay / relay);
    println!(
        "replay report: matched {}, replayed {}, failed {}, checkpoint {}",
        report.matched, report.replayed, report.failed, report.checkpoint
    );
    Ok(())
}
