//! A replay reads only committed events and skips none: a transaction still in flight below
//! the replay's end is waited for, not passed.

use std::sync::Arc;
use std::time::Duration;

use inventory_outbox::event::{DomainEvent, EventType};
use inventory_outbox::publisher::ReplayOptions;
use tokio::sync::Mutex;
use uuid::Uuid;

use super::{publisher, stock_changed};
use crate::relay::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_waits_for_a_transaction_in_flight_below_its_end_and_replays_it() {
    let (db, publisher) = publisher("replayinflight").await;
    let seen = Arc::new(Mutex::new(Vec::<Uuid>::new()));
    {
        let seen = seen.clone();
        publisher.register_event_handler(
            EventType::StockLevelChanged,
            Arc::new(move |event: DomainEvent| {
                let seen = seen.clone();
                async move {
                    seen.lock().await.push(event.event_id);
                    Ok(())
                }
            }),
        );
    }
    // The slow transaction takes the lowest position and stays open.
    let mut slow = db.pool.begin().await.unwrap();
    let in_flight = publisher
        .publish_event(&mut slow, stock_changed(Uuid::now_v7(), 1))
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let committed = publisher
        .publish_events(&mut tx, (1..=5).map(|s| stock_changed(Uuid::now_v7(), s)).collect())
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let replay = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            publisher
                .replay_events(&ReplayOptions {
                    replay_id: "in-flight".into(),
                    batch_size: 2,
                    ..ReplayOptions::default()
                })
                .await
        })
    };
    // The replay must still be running (waiting for the slow writer), not done without it.
    eventually(
        Duration::from_secs(10),
        "the replay to wait for the open writer",
        async || {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            waiting > 0 || replay.is_finished()
        },
    )
    .await;
    assert!(
        !replay.is_finished(),
        "the replay finished while a transaction below its end was open: replayed {:?}",
        seen.lock().await.len()
    );
    slow.commit().await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(20), replay)
        .await
        .expect("replay finishes once the writer committed")
        .unwrap()
        .unwrap();
    let seen = seen.lock().await.clone();
    // Position order: the in-flight event first, then the batch (ordered by lock key).
    let expected: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM outbox.events ORDER BY position")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(expected.len(), 1 + committed.len());
    assert_eq!(expected[0], in_flight.event_id);
    assert_eq!(seen, expected, "every committed event once, in position order");
    assert_eq!(result.replayed, 6);
    db.drop().await;
}
