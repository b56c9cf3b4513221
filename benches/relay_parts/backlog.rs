//! Relay memory with a large backlog: the `inventory-outbox relay` binary, as a process of its
//! own, drains `BACKLOG_EVENTS` 1 KiB events to Kafka while its resident set is sampled; the
//! peak (the kernel's `VmHWM`) is the figure. A separate process, so the bench's own buffers do
//! not count; its own schema, so the other runs' outbox is untouched.

use std::time::{Duration, Instant};

use inventory_outbox::publisher::{InventoryEventPublisher, PublisherConfig};
use inventory_outbox::store::{SchemaName, Store};
use rdkafka::ClientConfig;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Env, create_topic, draft, kafka_broker_doc};

/// Events in the backlog.
pub const BACKLOG_EVENTS: usize = 1_000_000;
const WRITERS: usize = 4;
const PER_TRANSACTION: usize = 5000;
const AGGREGATES: usize = 1000;
/// The largest batch size the other runs use: the most a relay holds at once.
const BATCH: usize = 5000;
const SCHEMA: &str = "bench_backlog";

/// What the backlog run measured.
pub struct BacklogRun {
    pub fill: Duration,
    pub drain: Duration,
    pub rss_start_kib: u64,
    pub peak_kib: u64,
}

fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub async fn backlog_run(env: &Env, pool: &PgPool, topics: &mut Vec<String>) -> anyhow::Result<BacklogRun> {
    let schema = SchemaName::new(SCHEMA)?;
    let publisher = InventoryEventPublisher::setup(
        Store::from_pool(pool.clone(), schema.clone()),
        PublisherConfig::default(),
    )
    .await?;
    let aggregates: Vec<Uuid> = (0..AGGREGATES).map(|_| Uuid::now_v7()).collect();
    let fill_start = Instant::now();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (pool, publisher, aggregates) = (pool.clone(), publisher.clone(), aggregates.clone());
        writers.push(tokio::spawn(async move {
            for t in 0..BACKLOG_EVENTS / WRITERS / PER_TRANSACTION {
                let drafts = (0..PER_TRANSACTION)
                    .map(|i| draft(aggregates[(w + t * PER_TRANSACTION + i) % AGGREGATES]))
                    .collect();
                let mut tx = pool.begin().await?;
                publisher.publish_events(&mut tx, drafts).await?;
                tx.commit().await?;
            }
            anyhow::Ok(())
        }));
    }
    for w in writers {
        w.await??;
    }
    let fill = fill_start.elapsed();
    eprintln!(
        "backlog: {BACKLOG_EVENTS} events written in {:.1} s",
        fill.as_secs_f64()
    );
    sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE {SCHEMA}.events")))
        .execute(pool)
        .await?;

    let topic = format!("bench-backlog-{}", env.tag);
    topics.push(topic.clone());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", &env.kafka).create()?;
    create_topic(&admin, &topic).await?;
    let publisher_name = "bench-backlog";
    let doc = json!({
        "publisher": publisher_name,
        "outbox": {"databaseUrlEnv": "BENCH_BACKLOG_DATABASE_URL", "schema": SCHEMA,
                   "batchSize": BATCH, "migrate": false},
        "broker": kafka_broker_doc(env, &topic),
        "routing": {"strategy": "single", "destination": topic},
    });
    let config_path = std::env::temp_dir().join(format!("bench-backlog-{}.json", env.tag));
    std::fs::write(&config_path, serde_json::to_vec(&doc)?)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut relay = tokio::process::Command::new(env!("CARGO_BIN_EXE_inventory-outbox"))
        .arg("relay")
        .arg("--config")
        .arg(&config_path)
        .args(["--worker-id", "bench-backlog"])
        .args(["--http-listen", &format!("127.0.0.1:{port}")])
        .env("BENCH_BACKLOG_DATABASE_URL", &env.url)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let pid = relay.id().ok_or_else(|| anyhow::anyhow!("the relay exited at once"))?;
    let started = Instant::now();
    let mut rss_start_kib = 0;
    let deadline = started + Duration::from_secs(900);
    let last: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT max(position) FROM {SCHEMA}.events"
    )))
    .fetch_one(pool)
    .await?;
    let drain = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if rss_start_kib == 0 {
            rss_start_kib = proc_kib(pid, "VmRSS:").unwrap_or(0);
        }
        if let Some(status) = relay.try_wait()? {
            anyhow::bail!("the backlog relay exited with {status}");
        }
        // Drained once the publisher's slowest cursor is at the last position.
        let slowest: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT min(position) FROM {SCHEMA}.relay_cursors WHERE consumer = $1"
        )))
        .bind(publisher_name)
        .fetch_one(pool)
        .await?;
        if slowest.is_some() && slowest == last {
            break started.elapsed();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "backlog: cursor at {slowest:?} of {last:?} after 900 s"
        );
    };
    let peak_kib = proc_kib(pid, "VmHWM:").unwrap_or(0);
    let _ = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(15), relay.wait()).await;
    let _ = std::fs::remove_file(&config_path);
    Ok(BacklogRun {
        fill,
        drain,
        rss_start_kib,
        peak_kib,
    })
}

/// "`secs` s, `rate` ev/s" for the whole backlog in `elapsed`.
fn took(elapsed: Duration) -> String {
    format!(
        "{:.1} s, {:.0} ev/s",
        elapsed.as_secs_f64(),
        BACKLOG_EVENTS as f64 / elapsed.as_secs_f64()
    )
}

/// The report's rows.
pub fn backlog_rows(run: &BacklogRun, row: &dyn Fn(&str, String, &str, &str)) {
    let peak_mib = run.peak_kib as f64 / 1024.0;
    row(
        &format!("relay peak RSS draining a {BACKLOG_EVENTS}-event backlog (batch {BATCH})"),
        format!("{peak_mib:.1} MiB"),
        "≤ 256 MiB",
        super::status(peak_mib <= 256.0),
    );
    row(
        "  RSS a quarter second after start",
        format!("{:.1} MiB", run.rss_start_kib as f64 / 1024.0),
        "",
        "",
    );
    row(
        "  drained in (relay process start to last cursor)",
        took(run.drain),
        "",
        "",
    );
    row(
        &format!("  backlog written ({WRITERS} writers, {PER_TRANSACTION}/transaction)"),
        took(run.fill),
        "",
        "",
    );
}
