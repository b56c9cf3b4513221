//! Out-of-order commits must never be skipped, and each aggregate's events must come out in
//! commit order, even with a long-running transaction holding low positions, and with large
//! transactions whose ids are at or above the reader's xmax (absent from its xip list) that
//! commit after the reader passed them and must be read in several pages.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use inventory_outbox::store::outbox::{OutboxReader, SHARDS};
use rand::Rng;
use tokio::sync::Mutex;
use uuid::Uuid;

use super::{publisher, stock_changed};

const WRITERS: usize = 20;
const TRANSACTIONS_PER_WRITER: usize = 60;
const AGGREGATES: usize = 40;
const LONG_TRANSACTION_EVENTS: i64 = 150;
/// Writers of "late pairs": T0 takes an id, T1 a later one and writes many events, T0
/// writes one and commits, T1 commits a little later.
const PAIR_WRITERS: usize = 3;
const PAIRS_PER_WRITER: usize = 4;

#[derive(Default)]
struct Committed {
    /// (aggregate, sequence) -> event id, for every committed event.
    events: HashMap<(String, i64), Uuid>,
}

/// One late pair; returns whether T1's id was at or above xmax of a snapshot taken after T0
/// committed (then it is in no reader's xip list), and records what T1 committed.
async fn late_pair(
    pool: &sqlx::PgPool,
    publisher: &inventory_outbox::publisher::InventoryEventPublisher,
    committed: &Mutex<Committed>,
    events: i64,
) -> bool {
    let mut t0 = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *t0)
        .await
        .unwrap();
    let mut t1 = pool.begin().await.unwrap();
    let t1_xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *t1)
        .await
        .unwrap();
    let item = Uuid::now_v7();
    let late = publisher
        .publish_events(&mut t1, (1..=events).map(|s| stock_changed(item, s)).collect())
        .await
        .unwrap();
    let t0_item = Uuid::now_v7();
    let first = publisher
        .publish_event(&mut t0, stock_changed(t0_item, 1))
        .await
        .unwrap();
    t0.commit().await.unwrap();
    committed
        .lock()
        .await
        .events
        .insert((t0_item.to_string(), 1), first.event_id);
    let xmax: String = sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
        .fetch_one(pool)
        .await
        .unwrap();
    let above_xmax = t1_xid.parse::<u64>().unwrap() >= xmax.parse::<u64>().unwrap();
    // Long enough for the reader to pass T0's event first.
    let delay = rand::rng().random_range(5..40);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    t1.commit().await.unwrap();
    let mut c = committed.lock().await;
    for (i, e) in late.iter().enumerate() {
        c.events.insert((item.to_string(), i as i64 + 1), e.event_id);
    }
    above_xmax
}

/// With `read_ahead`, the reader reads each full batch's successor from the batch's cursor move
/// before committing it (`OutboxReader::read_after`), as the relay does with a backlog.
async fn run_scenario(read_limit: usize, read_ahead: bool) -> usize {
    let (db, publisher) = publisher("gapfree").await;
    let pool = db.pool.clone();
    // The domain's own state: one row per aggregate, its version bumped with every event,
    // like a real service updating stock in the same transaction.
    sqlx::query("CREATE TABLE stock (item_id uuid PRIMARY KEY, version bigint NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let items: Vec<Uuid> = (0..AGGREGATES).map(|_| Uuid::now_v7()).collect();
    for item in &items {
        sqlx::query("INSERT INTO stock VALUES ($1, 0)")
            .bind(item)
            .execute(&pool)
            .await
            .unwrap();
    }
    let committed = Arc::new(Mutex::new(Committed::default()));

    // A long transaction takes low positions first and commits only after every writer.
    let long_item = Uuid::now_v7();
    let mut long_tx = pool.begin().await.unwrap();
    let long_events: Vec<_> = (1..=LONG_TRANSACTION_EVENTS)
        .map(|s| stock_changed(long_item, s))
        .collect();
    let long_stored = publisher.publish_events(&mut long_tx, long_events).await.unwrap();

    let reader = OutboxReader::new(publisher.store().clone(), "test-reader");
    let shards: Vec<i16> = (0..SHARDS).collect();
    reader.ensure_cursors(&shards).await.unwrap();
    let read_log = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader_task = {
        let (reader, shards, read_log, stop) = (reader.clone(), shards.clone(), read_log.clone(), stop.clone());
        tokio::spawn(async move {
            let mut empty_rounds_after_stop = 0;
            let mut ahead = None;
            loop {
                let batch = match ahead.take() {
                    Some(batch) => batch,
                    None => reader.read(&shards, read_limit).await.unwrap(),
                };
                let n = batch.events.len();
                if read_ahead && n == read_limit {
                    ahead = Some(reader.read_after(&shards, read_limit, &batch.advance).await.unwrap());
                }
                read_log.lock().await.extend(batch.events.into_iter().map(|e| e.event));
                reader.commit(batch.advance).await.unwrap();
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    empty_rounds_after_stop = if n == 0 { empty_rounds_after_stop + 1 } else { 0 };
                    if empty_rounds_after_stop >= 3 {
                        break;
                    }
                }
                if n == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };

    let mut pair_writers = Vec::new();
    for _ in 0..PAIR_WRITERS {
        let (pool, publisher, committed) = (pool.clone(), publisher.clone(), committed.clone());
        pair_writers.push(tokio::spawn(async move {
            let mut above_xmax = 0;
            for _ in 0..PAIRS_PER_WRITER {
                // Larger than the read limit, so late scans run in pages.
                let events = rand::rng().random_range(read_limit as i64 + 1..=(read_limit as i64 * 4).min(700));
                if late_pair(&pool, &publisher, &committed, events).await {
                    above_xmax += 1;
                }
            }
            above_xmax
        }));
    }

    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let (pool, publisher, items, committed) = (pool.clone(), publisher.clone(), items.clone(), committed.clone());
        writers.push(tokio::spawn(async move {
            for _ in 0..TRANSACTIONS_PER_WRITER {
                let (item, delay_ms, rollback) = {
                    let mut rng = rand::rng();
                    (
                        items[rng.random_range(0..items.len())],
                        rng.random_range(0..15),
                        rng.random_bool(0.1),
                    )
                };
                let mut tx = pool.begin().await.unwrap();
                let version: i64 =
                    sqlx::query_scalar("UPDATE stock SET version = version + 1 WHERE item_id = $1 RETURNING version")
                        .bind(item)
                        .fetch_one(&mut *tx)
                        .await
                        .unwrap();
                let event = publisher
                    .publish_event(&mut tx, stock_changed(item, version))
                    .await
                    .unwrap();
                // Commit late and in random order relative to the positions taken.
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                if rollback {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                    committed
                        .lock()
                        .await
                        .events
                        .insert((item.to_string(), version), event.event_id);
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let mut pairs_above_xmax = 0;
    for w in pair_writers {
        pairs_above_xmax += w.await.unwrap();
    }
    eprintln!(
        "limit {read_limit}: {pairs_above_xmax} of {} late transactions had ids at or above xmax",
        PAIR_WRITERS * PAIRS_PER_WRITER
    );
    // The open long transaction, holding the lowest positions, does not hold the reader back:
    // everything else committed is delivered while it is still open.
    let others: HashSet<Uuid> = committed.lock().await.events.values().copied().collect();
    let caught_up = async {
        loop {
            let read: HashSet<Uuid> = read_log.lock().await.iter().map(|e| e.event_id).collect();
            if others.is_subset(&read) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), caught_up)
        .await
        .expect("reader delivers other transactions' events while a long transaction is open");
    long_tx.commit().await.unwrap();
    {
        let mut c = committed.lock().await;
        for (i, e) in long_stored.iter().enumerate() {
            c.events.insert((long_item.to_string(), i as i64 + 1), e.event_id);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    reader_task.await.unwrap();

    let read = read_log.lock().await;
    let committed = committed.lock().await;
    // Exactly once: no duplicates, nothing missing, nothing rolled back.
    let mut seen = HashSet::new();
    for e in read.iter() {
        assert!(seen.insert(e.event_id), "event {} read twice", e.event_id);
    }
    let expected: HashSet<Uuid> = committed.events.values().copied().collect();
    if seen != expected {
        for missing in expected.difference(&seen) {
            let row: (i64, String, i64) = sqlx::query_as(
                "SELECT position, txid::text, (payload->>'newQuantity')::bigint FROM outbox.events WHERE event_id = $1",
            )
            .bind(missing)
            .fetch_one(&pool)
            .await
            .unwrap();
            eprintln!("MISSING {missing}: {row:?} limit {read_limit}");
        }
    }
    assert_eq!(
        seen.len(),
        expected.len(),
        "read {} events, committed {}",
        seen.len(),
        expected.len()
    );
    assert_eq!(seen, expected, "read set differs from committed set");
    assert!(expected.len() > 1000, "scenario too small: {}", expected.len());
    // Per aggregate, the sequence numbers come out as 1, 2, 3, ... (commit order).
    let mut per_aggregate: HashMap<&str, Vec<i64>> = HashMap::new();
    for e in read.iter() {
        per_aggregate
            .entry(&e.aggregate_id)
            .or_default()
            .push(e.payload["newQuantity"].as_i64().unwrap());
    }
    for (aggregate, sequence) in per_aggregate {
        let in_order: Vec<i64> = (1..=sequence.len() as i64).collect();
        assert_eq!(sequence, in_order, "aggregate {aggregate} out of commit order");
    }
    drop(read);
    db.drop().await;
    pairs_above_xmax
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_order_commits_are_read_exactly_once_in_aggregate_commit_order() {
    // Several rounds with different batch sizes: small ones force multi-round late scans.
    // How many late transactions really had ids at or above xmax depends on what other
    // sessions commit meanwhile (ids are cluster-wide): reported, not asserted. The late-scan
    // test forces that case.
    let mut above_xmax = 0;
    for limit in [37, 500, 7] {
        above_xmax += run_scenario(limit, false).await;
    }
    eprintln!("{above_xmax} late transactions at or above xmax in all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reading_each_batch_ahead_of_its_predecessors_commit_still_reads_exactly_once_in_commit_order() {
    let mut above_xmax = 0;
    for limit in [37, 7] {
        above_xmax += run_scenario(limit, true).await;
    }
    eprintln!("{above_xmax} late transactions at or above xmax in all");
}
