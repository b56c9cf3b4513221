//! A large late transaction whose id was at or above the reader's xmax (so absent from the
//! snapshot's xip list) is read exactly once, in pages, and the reader then moves on.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use inventory_outbox::store::outbox::{OutboxReader, SHARDS};
use uuid::Uuid;

use super::{publisher, stock_changed};

/// One run of the scenario; returns whether T1's id was at or above the reader's xmax by
/// itself. Transaction ids are cluster-wide: any later transaction of another session that
/// commits between T0's commit and the read puts T1 into the snapshot's xip list instead.
/// Then the cursor is set to what that read would have left (T1 covered by `watch_from`,
/// not listed), so the case under test is exercised either way.
async fn late_transaction_is_read_once(late_events: i64, read_limit: usize) -> bool {
    let (db, publisher) = publisher("latescan").await;
    let pool = db.pool.clone();
    let reader = OutboxReader::new(publisher.store().clone(), "late-scan");
    let shards: Vec<i16> = (0..SHARDS).collect();
    reader.ensure_cursors(&shards).await.unwrap();

    // T0 takes an id, T1 a later one; T1 writes its events (low positions) and stays open.
    let mut t0 = pool.begin().await.unwrap();
    let t0_xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *t0)
        .await
        .unwrap();
    let mut t1 = pool.begin().await.unwrap();
    let t1_xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *t1)
        .await
        .unwrap();
    let late_item = Uuid::now_v7();
    let late = publisher
        .publish_events(
            &mut t1,
            (1..=late_events).map(|s| stock_changed(late_item, s)).collect(),
        )
        .await
        .unwrap();
    // T0 writes one event above T1's and commits; the reader reads it.
    let first = publisher
        .publish_event(&mut t0, stock_changed(Uuid::now_v7(), 1))
        .await
        .unwrap();
    t0.commit().await.unwrap();
    let mut copies: HashMap<Uuid, usize> = HashMap::new();
    let mut rounds = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !copies.contains_key(&first.event_id) {
        assert!(Instant::now() < deadline, "T0's event never read");
        let batch = reader.read(&shards, read_limit).await.unwrap();
        for e in &batch.events {
            *copies.entry(e.event.event_id).or_default() += 1;
        }
        reader.commit(batch.advance).await.unwrap();
        rounds += 1;
    }
    let (watched, watch_from): (Vec<String>, String) = sqlx::query_as(
        "SELECT watched_txids::text[], watch_from::text FROM outbox.relay_cursors \
         WHERE consumer = 'late-scan' AND shard = 0",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let t1_id: u64 = t1_xid.parse().unwrap();
    let above_xmax = !watched.contains(&t1_xid) && t1_id >= watch_from.parse::<u64>().unwrap();
    if !above_xmax {
        sqlx::query(
            "UPDATE outbox.relay_cursors SET watched_txids = array_remove(watched_txids, $1::text::xid8), \
                 watch_from = $1::text::xid8 WHERE consumer = 'late-scan'",
        )
        .bind(&t1_xid)
        .execute(&pool)
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    t1.commit().await.unwrap();

    // Read on: T1's events exactly once, then an event written afterwards must arrive.
    let mut later: Option<Uuid> = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let batch = reader.read(&shards, read_limit).await.unwrap();
        let n = batch.events.len();
        for e in &batch.events {
            *copies.entry(e.event.event_id).or_default() += 1;
        }
        reader.commit(batch.advance).await.unwrap();
        rounds += 1;
        let late_done = late.iter().all(|e| copies.contains_key(&e.event_id));
        if late_done && later.is_none() {
            let mut tx = pool.begin().await.unwrap();
            let e = publisher
                .publish_event(&mut tx, stock_changed(Uuid::now_v7(), 1))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            later = Some(e.event_id);
        }
        if let Some(id) = later
            && copies.contains_key(&id)
            && n == 0
        {
            break;
        }
        let repeated = copies.values().filter(|&&c| c > 1).count();
        let cursor: (i64, Vec<String>, String, Vec<String>, i64) = sqlx::query_as(
            "SELECT position, watched_txids::text[], watch_from::text, late_txids::text[], late_after \
             FROM outbox.relay_cursors WHERE consumer = 'late-scan' AND shard = 0",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(
            repeated == 0 && Instant::now() < deadline,
            "after {rounds} rounds (limit {read_limit}, T0 {t0_xid}, T1 {t1_xid}, above xmax {above_xmax}): \
             {repeated} events read more than once (max {} copies), later event read: {}; cursor {cursor:?}",
            copies.values().max().unwrap_or(&0),
            later.is_some_and(|id| copies.contains_key(&id)),
        );
    }
    let repeated: Vec<_> = copies.iter().filter(|(_, c)| **c > 1).collect();
    assert!(repeated.is_empty(), "read more than once: {repeated:?}");
    assert_eq!(
        copies.len(),
        late.len() + 2,
        "T0's, T1's and the later event, once each"
    );
    db.drop().await;
    above_xmax
}

#[tokio::test]
async fn a_paged_late_transaction_above_xmax_is_read_once_and_the_reader_moves_on() {
    // Small pages, and the default batch size with a T1 larger than one batch (as reported).
    for (late_events, limit) in [(250, 100), (1200, 1000), (40, 7)] {
        let natural = late_transaction_is_read_once(late_events, limit).await;
        eprintln!("limit {limit}: T1 above the reader's xmax by itself: {natural}");
    }
}
