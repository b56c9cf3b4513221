//! `publish_events` throughput against a plain multi-row INSERT of the same rows, in one run.
//!
//! `source ~/.local/state/inventory-outbox/env.sh && cargo bench --bench publish`
//! Each measurement writes 1 KiB payloads in batches of 100 and 1,000 on one connection, one
//! transaction per batch. The baseline inserts the same rows with one UNNEST statement into a
//! table with the same columns, a bigserial key and a unique event id, without validation,
//! trigger or extra indexes: what a naive outbox costs.
//!
//! Then the same-run before/after of write-path changes, each on a second outbox (its own
//! schema, set up by the product and then altered here) next to the product's:
//! - the two time-range indexes (`recorded_at`, `occurred_at`, used by replay filters) as BRIN
//!   instead of B-tree, batches of 100 and 1,000 on one connection;
//! - the statement-level NOTIFY trigger dropped, with 16 writers committing one event per
//!   transaction while a listener drains the channel (as an idle relay listens).
//!
//! Each pair runs twice, alternating, and the table shows both rounds.

mod support;

use std::time::Instant;

use inventory_outbox::event::NewEvent;
use inventory_outbox::publisher::{InventoryEventPublisher, PublisherConfig};
use inventory_outbox::store::{SchemaName, Store};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

const EVENTS_PER_RUN: usize = 20_000;
/// Concurrent writers in the NOTIFY measurement, and the single-event transactions each commits.
const WRITERS: usize = 16;
const TXNS_PER_WRITER: usize = 400;

fn draft(aggregate: Uuid) -> NewEvent {
    support::kib_draft(aggregate)
}

async fn publish(publisher: &InventoryEventPublisher, pool: &PgPool, batch: usize, aggregates: &[Uuid]) -> f64 {
    let start = Instant::now();
    for round in 0..EVENTS_PER_RUN / batch {
        let drafts = (0..batch)
            .map(|i| draft(aggregates[(round * batch + i) % aggregates.len()]))
            .collect();
        let mut tx = pool.begin().await.expect("begin");
        publisher.publish_events(&mut tx, drafts).await.expect("publish");
        tx.commit().await.expect("commit");
    }
    EVENTS_PER_RUN as f64 / start.elapsed().as_secs_f64()
}

async fn plain_insert(pool: &PgPool, publisher: &InventoryEventPublisher, batch: usize, aggregates: &[Uuid]) -> f64 {
    // Same rows as `publish` (prepared outside the timed part, as the payload building is).
    let start_total = Instant::now();
    let mut spent_preparing = std::time::Duration::ZERO;
    for round in 0..EVENTS_PER_RUN / batch {
        let prep = Instant::now();
        let drafts = (0..batch)
            .map(|i| draft(aggregates[(round * batch + i) % aggregates.len()]))
            .collect();
        let events = publisher.prepare(drafts).await.expect("prepare");
        spent_preparing += prep.elapsed();
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let agg: Vec<&str> = events.iter().map(|e| e.aggregate_id.as_str()).collect();
        let times: Vec<_> = events.iter().map(|e| e.timestamp).collect();
        let payloads: Vec<&serde_json::Value> = events.iter().map(|e| &e.payload).collect();
        let mut tx = pool.begin().await.expect("begin");
        sqlx::query(
            "INSERT INTO bench_plain (event_id, event_type, aggregate_id, occurred_at, payload) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::jsonb[])",
        )
        .bind(&ids)
        .bind(&types)
        .bind(&agg)
        .bind(&times)
        .bind(&payloads)
        .execute(&mut *tx)
        .await
        .expect("insert");
        tx.commit().await.expect("commit");
    }
    EVENTS_PER_RUN as f64 / (start_total.elapsed() - spent_preparing).as_secs_f64()
}

/// A second outbox in `schema`, set up by the product, then changed by `alter` (bench-only
/// DDL; `{s}` stands for the schema).
async fn variant(pool: &PgPool, schema: &str, alter: &[&str]) -> anyhow::Result<InventoryEventPublisher> {
    let store = Store::from_pool(pool.clone(), SchemaName::new(schema)?);
    let publisher = InventoryEventPublisher::setup(store, PublisherConfig::default()).await?;
    for statement in alter {
        sqlx::query(sqlx::AssertSqlSafe(statement.replace("{s}", schema)))
            .execute(pool)
            .await?;
    }
    Ok(publisher)
}

/// `WRITERS` tasks commit `TXNS_PER_WRITER` single-event transactions each; transactions/s.
async fn concurrent_single_events(publisher: &InventoryEventPublisher, pool: &PgPool, aggregates: &[Uuid]) -> f64 {
    let start = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (publisher, pool, aggregates) = (publisher.clone(), pool.clone(), aggregates.to_vec());
            tokio::spawn(async move {
                for t in 0..TXNS_PER_WRITER {
                    let mut tx = pool.begin().await.expect("begin");
                    publisher
                        .publish_event(&mut tx, draft(aggregates[(w * TXNS_PER_WRITER + t) % aggregates.len()]))
                        .await
                        .expect("publish");
                    tx.commit().await.expect("commit");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    (WRITERS * TXNS_PER_WRITER) as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    inventory_outbox::tls::install_crypto_provider();
    let admin_url = std::env::var("DATABASE_URL").map_err(|_| anyhow::anyhow!("set DATABASE_URL (make env-up)"))?;
    let db = format!("bench_{}", Uuid::now_v7().simple());
    let mut admin = PgConnection::connect(&admin_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut admin)
        .await?;
    let url = format!(
        "{}/{db}",
        admin_url.rsplit_once('/').map_or(admin_url.as_str(), |(base, _)| base)
    );
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(WRITERS as u32 + 4)
        .connect(&url)
        .await?;
    sqlx::query(
        "CREATE TABLE bench_plain (position bigserial PRIMARY KEY, event_id uuid NOT NULL UNIQUE, \
         event_type text NOT NULL, aggregate_id text NOT NULL, occurred_at timestamptz NOT NULL, payload jsonb NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let store = Store::from_pool(pool.clone(), SchemaName::default());
    let publisher = InventoryEventPublisher::setup(store, PublisherConfig::default()).await?;
    let aggregates: Vec<Uuid> = (0..500).map(|_| Uuid::now_v7()).collect();

    // Warm up caches and the schema validator once.
    publish(&publisher, &pool, 1000, &aggregates).await;
    println!("publish_events vs plain multi-row INSERT, 1 KiB payloads, {EVENTS_PER_RUN} events per measurement");
    println!(
        "{:>6} {:>18} {:>18} {:>7}",
        "batch", "publish_events/s", "plain INSERT/s", "ratio"
    );
    for batch in [100, 1000] {
        let ours = publish(&publisher, &pool, batch, &aggregates).await;
        let plain = plain_insert(&pool, &publisher, batch, &aggregates).await;
        println!("{batch:>6} {ours:>18.0} {plain:>18.0} {:>7.2}", ours / plain);
    }

    // Time-range indexes as BRIN: the rows arrive in (nearly) time order, so a BRIN summary
    // of each block range serves the replay's range filters at a fraction of a B-tree's
    // per-insert cost. Same run, alternating.
    let brin = variant(
        &pool,
        "bench_brin",
        &[
            "DROP INDEX {s}.events_recorded_at",
            "DROP INDEX {s}.events_occurred_at",
            "CREATE INDEX events_recorded_at ON {s}.events USING brin (recorded_at)",
            "CREATE INDEX events_occurred_at ON {s}.events USING brin (occurred_at)",
        ],
    )
    .await?;
    publish(&brin, &pool, 1000, &aggregates).await;
    println!();
    println!("time-range indexes B-tree (as shipped) vs BRIN, publish_events/s, same run, two rounds");
    println!(
        "{:>6} {:>6} {:>14} {:>14} {:>7}",
        "batch", "round", "B-tree", "BRIN", "ratio"
    );
    for round in 1..=2 {
        for batch in [100, 1000] {
            let btree = publish(&publisher, &pool, batch, &aggregates).await;
            let brin = publish(&brin, &pool, batch, &aggregates).await;
            println!("{batch:>6} {round:>6} {btree:>14.0} {brin:>14.0} {:>7.2}", brin / btree);
        }
    }

    // One NOTIFY per inserting statement, with 16 concurrent writers of single-event
    // transactions, against the same outbox without the trigger; a listener drains the
    // channel meanwhile, as an idle relay would.
    let quiet = variant(&pool, "bench_nonotify", &["DROP TRIGGER events_notify ON {s}.events"]).await?;
    let mut listener = sqlx::postgres::PgListener::connect(&url).await?;
    listener.listen("outbox_events").await?;
    let drained = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = drained.clone();
    let drain = tokio::spawn(async move {
        while listener.recv().await.is_ok() {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    concurrent_single_events(&quiet, &pool, &aggregates).await;
    println!();
    println!(
        "{WRITERS} writers, {} single-event transactions per measurement, a listener on the channel: \
         transactions/s with the NOTIFY trigger (as shipped) and without, same run, two rounds",
        WRITERS * TXNS_PER_WRITER
    );
    println!("{:>6} {:>14} {:>14} {:>7}", "round", "NOTIFY", "no NOTIFY", "ratio");
    for round in 1..=2 {
        let notify = concurrent_single_events(&publisher, &pool, &aggregates).await;
        let silent = concurrent_single_events(&quiet, &pool, &aggregates).await;
        println!("{round:>6} {notify:>14.0} {silent:>14.0} {:>7.2}", notify / silent);
    }
    drain.abort();
    println!(
        "notifications received by the listener: {}",
        drained.load(std::sync::atomic::Ordering::Relaxed)
    );
    pool.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {db} WITH (FORCE)")))
        .execute(&mut admin)
        .await?;
    Ok(())
}
