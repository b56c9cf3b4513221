//! Concurrent batches cannot deadlock on the trigger's per-aggregate locks, even when two
//! aggregates' lock keys collide (the lock is a hash of the aggregate, not the aggregate).

use std::time::Duration;

use inventory_outbox::event::NewEvent;
use uuid::Uuid;

use super::{publisher, stock_changed};
use crate::relay::eventually;

fn on_aggregate(id: &str) -> NewEvent {
    let mut event = stock_changed(Uuid::now_v7(), 1);
    event.aggregate_id = id.to_owned();
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_whose_aggregates_share_lock_keys_do_not_deadlock() {
    let (db, publisher) = publisher("lockorder").await;
    // Aggregate ids whose lock keys collide, found by brute force: groups of ids per key.
    let groups: Vec<(i32, Vec<String>)> = sqlx::query_as(
        "SELECT hashtext('InventoryItem/' || id), array_agg(id) FROM \
             (SELECT 'item-' || g AS id FROM generate_series(1, 300000) g) s \
         GROUP BY 1 HAVING count(*) > 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut pairs: Vec<(i32, String, String)> = groups
        .into_iter()
        .map(|(key, mut ids)| {
            ids.sort();
            (key, ids[0].clone(), ids[1].clone())
        })
        .collect();
    pairs.sort();
    // Two colliding pairs, keys kmin < kmax, interleaved in id order so that each batch below,
    // sorted by aggregate id, takes the other batch's first lock second:
    // batch 1 = {m1, M2} (m1 first), batch 2 = {M1, m2} (M1 first).
    let (low, high) = pairs
        .iter()
        .flat_map(|lo| pairs.iter().map(move |hi| (lo, hi)))
        .find(|(lo, hi)| lo.0 < hi.0 && lo.1 < hi.2 && hi.1 < lo.2)
        .expect("an interleaved pair of lock-key collisions among 300000 ids");
    let (m1, m2, big1, big2) = (&low.1, &low.2, &high.1, &high.2);
    eprintln!("keys {} ({m1}, {m2}) and {} ({big1}, {big2})", low.0, high.0);

    // T1 is batch 1 caught between its two rows: it holds kmin (m1's lock).
    let mut t1 = db.pool.begin().await.unwrap();
    publisher.publish_event(&mut t1, on_aggregate(m1)).await.unwrap();
    // T2 writes batch 2 in one statement and has to wait for kmin.
    let t2 = {
        let (pool, publisher) = (db.pool.clone(), publisher.clone());
        let batch = vec![on_aggregate(big1), on_aggregate(m2)];
        tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            publisher
                .publish_events(&mut tx, batch)
                .await
                .map_err(|e| e.to_string())?;
            tx.commit().await.map_err(|e| e.to_string())
        })
    };
    eventually(Duration::from_secs(10), "batch 2 to wait for a lock", async || {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        waiting > 0
    })
    .await;
    // T1 finishes batch 1 with kmax. Had T2 taken kmax first (aggregate-id order), this
    // would deadlock and PostgreSQL would abort one of them.
    let second = publisher.publish_event(&mut t1, on_aggregate(big2)).await;
    let first_result = second.map_err(|e| e.to_string());
    let committed = match &first_result {
        Ok(_) => t1.commit().await.map_err(|e| e.to_string()),
        Err(_) => t1.rollback().await.map_err(|e| e.to_string()),
    };
    let second_result = t2.await.unwrap();
    assert!(
        first_result.is_ok() && committed.is_ok() && second_result.is_ok(),
        "batch 1: {first_result:?} / commit {committed:?}; batch 2: {second_result:?}"
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 4);
    db.drop().await;
}
