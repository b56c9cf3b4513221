//! In-process handlers of several service replicas share the work: each event is handled by
//! one replica, and an aggregate's events in commit order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use inventory_outbox::event::{DomainEvent, EventType};
use inventory_outbox::publisher::{InventoryEventPublisher, PublisherConfig};
use inventory_outbox::store::{SchemaName, Store};
use rand::Rng;
use tokio::sync::{Mutex, watch};
use uuid::Uuid;

use super::{publisher, stock_changed};
use crate::relay::eventually;

/// (replica, event id, aggregate, sequence) for every handler call.
type Calls = Arc<Mutex<Vec<(usize, Uuid, String, i64)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_service_replicas_handle_each_event_once_in_aggregate_order() {
    const REPLICAS: usize = 3;
    let (db, writer) = publisher("handlerreplicas").await;
    let calls: Calls = Arc::default();
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    for replica in 0..REPLICAS {
        let config = PublisherConfig {
            handler_lease: Duration::from_secs(3),
            handler_heartbeat: Duration::from_millis(200),
            ..PublisherConfig::default()
        };
        let store = Store::from_pool(db.pool.clone(), SchemaName::default());
        let service = InventoryEventPublisher::setup(store, config).await.unwrap();
        let calls = calls.clone();
        service.register_event_handler(
            EventType::StockLevelChanged,
            Arc::new(move |event: DomainEvent| {
                let calls = calls.clone();
                async move {
                    let sequence = event.payload["newQuantity"].as_i64().unwrap_or_default();
                    calls
                        .lock()
                        .await
                        .push((replica, event.event_id, event.aggregate_id.clone(), sequence));
                    Ok(())
                }
            }),
        );
        let mut stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            service
                .run_handlers(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        }));
    }
    eventually(
        Duration::from_secs(15),
        "the replicas to split the shards",
        async || {
            let owners: Vec<(String, i64)> = sqlx::query_as(
                "SELECT owner, count(*) FROM outbox.relay_cursors WHERE consumer = 'handlers' AND owner IS NOT NULL \
             GROUP BY owner",
            )
            .fetch_all(&db.pool)
            .await
            .unwrap();
            owners.len() == REPLICAS && owners.iter().map(|(_, n)| n).sum::<i64>() == 64
        },
    )
    .await;

    // 30 aggregates, each with a run of events, written in many small transactions.
    let items: Vec<Uuid> = (0..30).map(|_| Uuid::now_v7()).collect();
    let mut next: HashMap<Uuid, i64> = HashMap::new();
    let mut expected = 0;
    for _ in 0..150 {
        let mut tx = db.pool.begin().await.unwrap();
        let mut batch = Vec::new();
        for _ in 0..4 {
            let item = items[rand::rng().random_range(0..items.len())];
            let n = next.entry(item).or_insert(0);
            *n += 1;
            batch.push(stock_changed(item, *n));
        }
        expected += batch.len();
        writer.publish_events(&mut tx, batch).await.unwrap();
        tx.commit().await.unwrap();
    }
    eventually(Duration::from_secs(30), "every event to be handled", async || {
        calls.lock().await.len() >= expected
    })
    .await;
    let _ = stop.send(true);
    for t in tasks {
        t.await.unwrap().expect("handler dispatcher stopped cleanly");
    }

    let calls = calls.lock().await;
    let mut per_event: HashMap<Uuid, usize> = HashMap::new();
    for (_, id, _, _) in calls.iter() {
        *per_event.entry(*id).or_default() += 1;
    }
    let twice = per_event.values().filter(|&&n| n > 1).count();
    assert_eq!(per_event.len(), expected, "every event handled");
    assert_eq!(
        twice,
        0,
        "{twice} events handled more than once ({} calls)",
        calls.len()
    );
    let mut per_aggregate: HashMap<&str, Vec<i64>> = HashMap::new();
    let mut per_replica = [0usize; REPLICAS];
    for (replica, _, aggregate, sequence) in calls.iter() {
        per_aggregate.entry(aggregate).or_default().push(*sequence);
        per_replica[*replica] += 1;
    }
    for (aggregate, sequence) in per_aggregate {
        let in_order: Vec<i64> = (1..=sequence.len() as i64).collect();
        assert_eq!(sequence, in_order, "aggregate {aggregate} out of commit order");
    }
    assert!(
        per_replica.iter().all(|&n| n > 0),
        "a replica handled nothing: {per_replica:?}"
    );
    let owned: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox.relay_cursors WHERE consumer = 'handlers' AND owner IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(owned, 0, "stopped dispatchers gave their shards back");
    db.drop().await;
}
