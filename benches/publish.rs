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
//! - the registered-schema check once per statement (as shipped) against migration 0002's
//!   per-row lookup, batches of 100 and 1,000 on one connection.
//!
//! Each pair runs twice, alternating, and the table shows both rounds.
//!
//! Last, where `publish_events` spends its time, same run: the same prepared rows (validation
//! outside the timed part, as in the plain INSERT) appended by the store into the product's
//! outbox and into variants that each remove one cost: the trigger's contract checks, the row
//! trigger altogether (positions from a column default: measurement only, it drops the lock
//! that makes position order commit order), and the six secondary indexes.

mod support;

use std::time::Instant;

use inventory_outbox::event::{DomainEvent, NewEvent};
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

/// The rows of one measurement, validated and enveloped up front: the plain INSERT and the
/// store's append then time only the database, as the payload building is not timed either.
async fn prepared(publisher: &InventoryEventPublisher, batch: usize, aggregates: &[Uuid]) -> Vec<Vec<DomainEvent>> {
    let mut batches = Vec::with_capacity(EVENTS_PER_RUN / batch);
    for round in 0..EVENTS_PER_RUN / batch {
        let drafts = (0..batch)
            .map(|i| draft(aggregates[(round * batch + i) % aggregates.len()]))
            .collect();
        batches.push(publisher.prepare(drafts).await.expect("prepare"));
    }
    batches
}

async fn plain_insert(pool: &PgPool, publisher: &InventoryEventPublisher, batch: usize, aggregates: &[Uuid]) -> f64 {
    let batches = prepared(publisher, batch, aggregates).await;
    let start = Instant::now();
    for events in &batches {
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
    EVENTS_PER_RUN as f64 / start.elapsed().as_secs_f64()
}

/// Appends the same prepared rows as `plain_insert` through the store (the product's INSERT,
/// trigger and indexes of `publisher`'s schema).
async fn append_prepared(publisher: &InventoryEventPublisher, pool: &PgPool, batch: usize, aggregates: &[Uuid]) -> f64 {
    let batches = prepared(publisher, batch, aggregates).await;
    let start = Instant::now();
    for events in &batches {
        let mut tx = pool.begin().await.expect("begin");
        inventory_outbox::store::events::append(&mut tx, publisher.store().schema(), events)
            .await
            .expect("append");
        tx.commit().await.expect("commit");
    }
    EVENTS_PER_RUN as f64 / start.elapsed().as_secs_f64()
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

/// `publish_events`/s of two outboxes, same run: a warm-up of the second, then two rounds
/// alternating them at batches of 100 and 1,000; the ratio is first / second.
async fn alternate(
    pool: &PgPool,
    aggregates: &[Uuid],
    title: &str,
    (first_name, first): (&str, &InventoryEventPublisher),
    (second_name, second): (&str, &InventoryEventPublisher),
) {
    publish(second, pool, 1000, aggregates).await;
    println!();
    println!("{title}, publish_events/s, same run, two rounds");
    println!(
        "{:>6} {:>6} {first_name:>14} {second_name:>14} {:>7}",
        "batch", "round", "ratio"
    );
    for round in 1..=2 {
        for batch in [100, 1000] {
            let a = publish(first, pool, batch, aggregates).await;
            let b = publish(second, pool, batch, aggregates).await;
            println!("{batch:>6} {round:>6} {a:>14.0} {b:>14.0} {:>7.2}", a / b);
        }
    }
}

/// Puts migration 0002's row trigger (its text, taken from the migration itself) back into
/// `schema`: the function pins the search_path it is created under, hence one connection.
async fn restore_per_row_schema_check(pool: &PgPool, schema: &str) -> anyhow::Result<()> {
    const MIGRATION: &str = include_str!("../migrations/0002_contract_and_lease_epochs.sql");
    let start = MIGRATION
        .find("CREATE OR REPLACE FUNCTION events_before_insert()")
        .ok_or_else(|| anyhow::anyhow!("0002 has no events_before_insert"))?;
    let end = start
        + MIGRATION[start..]
            .find("$$;")
            .ok_or_else(|| anyhow::anyhow!("0002: unterminated function"))?
        + 3;
    let mut conn = pool.acquire().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("SET search_path TO {schema}")))
        .execute(&mut *conn)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(&MIGRATION[start..end]))
        .execute(&mut *conn)
        .await?;
    sqlx::query("RESET search_path").execute(&mut *conn).await?;
    Ok(())
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

/// Where `publish_events` spends its time: each variant removes one cost from the product's
/// outbox; every figure is the same prepared rows appended by the store, same run, two rounds.
async fn breakdown(pool: &PgPool, publisher: &InventoryEventPublisher, aggregates: &[Uuid]) -> anyhow::Result<()> {
    // The 0001 trigger body: transaction id, advisory lock, position, shard; no contract checks.
    let unchecked = variant(
        pool,
        "bench_unchecked",
        &[
            "DROP TRIGGER events_check_schema_versions ON {s}.events",
            "CREATE OR REPLACE FUNCTION {s}.events_before_insert() RETURNS trigger LANGUAGE plpgsql AS $f$ \
           DECLARE aggregate_key integer := hashtext(NEW.aggregate_type || '/' || NEW.aggregate_id); \
           BEGIN NEW.txid := pg_current_xact_id(); \
             PERFORM pg_advisory_xact_lock(1869574770, aggregate_key); \
             NEW.position := nextval('{s}.event_position_seq'); \
             NEW.shard := (aggregate_key & 63)::smallint; RETURN NEW; END $f$",
        ],
    )
    .await?;
    let untriggered = variant(
        pool,
        "bench_untriggered",
        &[
            "DROP TRIGGER events_before_insert ON {s}.events",
            "ALTER TABLE {s}.events ALTER position SET DEFAULT nextval('{s}.event_position_seq'), \
             ALTER shard SET DEFAULT 0, ALTER txid SET DEFAULT pg_current_xact_id()",
        ],
    )
    .await?;
    let unindexed = variant(
        pool,
        "bench_unindexed",
        &[
            "DROP INDEX {s}.events_shard_position, {s}.events_txid, {s}.events_recorded_at, \
             {s}.events_occurred_at, {s}.events_type_position, {s}.events_aggregate_position",
        ],
    )
    .await?;
    let variants = [
        ("as shipped", publisher),
        ("no contract checks", &unchecked),
        ("no row trigger", &untriggered),
        ("2 indexes, not 8", &unindexed),
    ];
    for (_, v) in &variants {
        append_prepared(v, pool, 1000, aggregates).await;
    }
    println!();
    println!("where publish_events spends its time: prepared rows appended by the store, events/s, same run");
    print!(
        "{:>6} {:>6} {:>16} {:>16}",
        "batch", "round", "publish_events", "plain INSERT"
    );
    for (name, _) in &variants {
        print!(" {name:>20}");
    }
    println!();
    for round in 1..=2 {
        for batch in [100, 1000] {
            let full = publish(publisher, pool, batch, aggregates).await;
            let plain = plain_insert(pool, publisher, batch, aggregates).await;
            print!("{batch:>6} {round:>6} {full:>16.0} {plain:>16.0}");
            for (_, v) in &variants {
                print!(" {:>20.0}", append_prepared(v, pool, batch, aggregates).await);
            }
            println!();
        }
    }
    Ok(())
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

    // The registered-schema check per statement (as shipped since migration 0006) against the
    // same outbox with 0002's row trigger put back, which looked the version up per row.
    let per_row = variant(
        &pool,
        "bench_per_row",
        &["DROP TRIGGER events_check_schema_versions ON {s}.events"],
    )
    .await?;
    restore_per_row_schema_check(&pool, "bench_per_row").await?;
    alternate(
        &pool,
        &aggregates,
        "schema version checked per statement (as shipped) vs per row (migration 0002)",
        ("per statement", &publisher),
        ("per row", &per_row),
    )
    .await;

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
    alternate(
        &pool,
        &aggregates,
        "time-range indexes BRIN vs B-tree (as shipped)",
        ("BRIN", &brin),
        ("B-tree", &publisher),
    )
    .await;

    // One NOTIFY per inserting statement, with 16 concurrent writers of single-event
    // transactions, against the same outbox without the trigger; a listener drains the
    // channel meanwhile, as an idle relay would.
    let quiet = variant(&pool, "bench_nonotify", &["DROP TRIGGER events_notify ON {s}.events"]).await?;
    // `outbox.wakeUp: poll` (migration 0008): the trigger stays and finds only a polling
    // worker's heartbeat, so it skips the NOTIFY; what is left is its check.
    let polled = variant(
        &pool,
        "bench_polled",
        &["INSERT INTO {s}.worker_heartbeats (consumer, worker_id, wake_by_notify) VALUES ('bench', 'poller', false)"],
    )
    .await?;
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
    concurrent_single_events(&polled, &pool, &aggregates).await;
    let warm_up_notifications = drained.load(std::sync::atomic::Ordering::Relaxed);
    println!();
    println!(
        "{WRITERS} writers, {} single-event transactions per measurement, a listener on the channel: \
         transactions/s with the NOTIFY trigger (as shipped, a listening worker), with it while \
         the only worker polls (wakeUp: poll), and without the trigger; same run, two rounds",
        WRITERS * TXNS_PER_WRITER
    );
    println!(
        "{:>6} {:>14} {:>14} {:>14} {:>14} {:>14}",
        "round", "NOTIFY", "polled", "no trigger", "NOTIFY/none", "polled/none"
    );
    for round in 1..=2 {
        let notify = concurrent_single_events(&publisher, &pool, &aggregates).await;
        let poll = concurrent_single_events(&polled, &pool, &aggregates).await;
        let silent = concurrent_single_events(&quiet, &pool, &aggregates).await;
        println!(
            "{round:>6} {notify:>14.0} {poll:>14.0} {silent:>14.0} {:>14.2} {:>14.2}",
            notify / silent,
            poll / silent
        );
    }
    drain.abort();
    println!(
        "notifications received by the listener in the rounds: {} (one per NOTIFY-column transaction: {}; \
         the polled outbox sent {} in its warm-up)",
        drained.load(std::sync::atomic::Ordering::Relaxed) - warm_up_notifications,
        2 * WRITERS * TXNS_PER_WRITER,
        warm_up_notifications
    );

    breakdown(&pool, &publisher, &aggregates).await?;
    pool.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {db} WITH (FORCE)")))
        .execute(&mut admin)
        .await?;
    Ok(())
}
