//! `outbox.wakeUp`: writers notify unless every running worker on the schema polls, and a
//! polling relay or handler dispatcher still delivers every event, in order, without being
//! notified.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use inventory_outbox::delivery::WakeUp;
use inventory_outbox::event::EventType;
use inventory_outbox::event::{DomainEvent, cloudevents};
use inventory_outbox::publisher::{InventoryEventPublisher, PublisherConfig};
use inventory_outbox::store::leases::{HeartbeatReport, LeaseManager};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message as _};
use serde_json::json;
use sqlx::postgres::PgListener;
use uuid::Uuid;

use super::{assert_delivered, eventually, relay_config, start_relay, write_events};
use crate::event_core::{publisher, publisher_with, stock_changed};
use crate::support::postgres::TestDatabase;
use crate::support::{kafka_bootstrap, unique_name};

const CHANNEL: &str = "outbox_events";

/// Commits one event, then sends a marker on the channel from another session. A listener
/// receives notifications in commit order, so the insert notified exactly when its
/// notification comes before the marker: no timing involved.
async fn an_insert_notifies(db: &TestDatabase, publisher: &InventoryEventPublisher) -> bool {
    let mut listener = PgListener::connect_with(&db.pool).await.unwrap();
    listener.listen(CHANNEL).await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    publisher
        .publish_event(&mut tx, stock_changed(Uuid::now_v7(), 1))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    sqlx::query("SELECT pg_notify($1, 'marker')")
        .bind(CHANNEL)
        .execute(&db.pool)
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("the marker within 10 s")
        .unwrap();
    first.payload() != "marker"
}

fn report(polls: bool) -> HeartbeatReport {
    HeartbeatReport {
        circuit_state: "closed",
        polls,
        ..HeartbeatReport::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_skip_the_notify_only_while_every_running_worker_polls() {
    let (db, publisher) = publisher("wake_up_rule").await;
    let store = publisher.store().clone();
    assert!(
        an_insert_notifies(&db, &publisher).await,
        "no worker running: writers notify"
    );

    let poller = LeaseManager::new(store.clone(), "relay-a", "w-poll", Duration::from_secs(6));
    poller.tick(&report(true)).await.unwrap();
    assert!(
        !an_insert_notifies(&db, &publisher).await,
        "the only running worker polls: no NOTIFY"
    );

    // Another consumer on the schema (a handler dispatcher, say) that listens.
    let listener = LeaseManager::new(store.clone(), "handlers", "w-listen", Duration::from_secs(6));
    listener.tick(&report(false)).await.unwrap();
    assert!(
        an_insert_notifies(&db, &publisher).await,
        "one running worker listens: writers notify"
    );

    listener.release_all().await.unwrap();
    assert!(
        !an_insert_notifies(&db, &publisher).await,
        "the listening worker stopped, the poller runs on: no NOTIFY"
    );

    // The poller switches to notify (a rollout with `wakeUp: notify`).
    poller.tick(&report(false)).await.unwrap();
    assert!(
        an_insert_notifies(&db, &publisher).await,
        "the worker listens now: writers notify"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_polling_relay_is_not_notified_and_delivers_every_event_in_order() {
    let (db, publisher) = publisher("wake_up_poll").await;
    let topic = unique_name("poll");
    let broker = json!({"kafka": {"bootstrapServers": kafka_bootstrap(), "deadLetterTopic": format!("{topic}-dlq"),
                                  "partitions": 3, "mode": "structured"}});
    let mut config = relay_config(
        "kafka-poll",
        broker,
        json!({"strategy": "single", "destination": topic}),
    );
    config.outbox.wake_up = WakeUp::Poll;
    let relay = start_relay(&db, config, "w1").await;
    eventually(
        Duration::from_secs(30),
        "the relay's heartbeat says it polls",
        async || {
            sqlx::query_scalar::<_, bool>(
                "SELECT NOT wake_by_notify FROM outbox.worker_heartbeats WHERE worker_id = 'w1' AND stopped_at IS NULL",
            )
            .fetch_optional(&db.pool)
            .await
            .unwrap()
            .unwrap_or(false)
        },
    )
    .await;
    assert!(
        !an_insert_notifies(&db, &publisher).await,
        "a polling relay is the only worker: writers must not notify"
    );

    let mut sent = write_events(&publisher, &db, 4, 50, 20).await;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", unique_name("poll-test"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    // The event `an_insert_notifies` wrote is delivered too.
    let expected = sent.len() + 1;
    let mut received: Vec<DomainEvent> = Vec::new();
    let collect = async {
        while received.len() < expected {
            let m = crate::support::next_record(&consumer).await;
            let doc: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
            received.push(cloudevents::from_structured(&doc).unwrap());
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), collect).await.is_err() {
        panic!("only {} of {expected} events reached Kafka within 60 s", received.len());
    }
    let probe = received
        .iter()
        .position(|e| !sent.iter().any(|s| s.event_id == e.event_id))
        .expect("the probe event arrived");
    sent.push(received[probe].clone());
    assert_delivered(&sent, &received, false);
    relay.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polling_handler_dispatcher_gets_every_event_without_a_notify() {
    let config = PublisherConfig {
        handler_wake_up: WakeUp::Poll,
        ..PublisherConfig::default()
    };
    let (db, publisher) = publisher_with("wake_up_handlers", config).await;
    let seen = Arc::new(Mutex::new(Vec::<(String, i64)>::new()));
    {
        let seen = seen.clone();
        publisher.register_event_handler(
            EventType::StockLevelChanged,
            Arc::new(move |event: DomainEvent| {
                let seen = seen.clone();
                async move {
                    let sequence = event.payload["newQuantity"].as_i64().unwrap_or_default();
                    seen.lock().unwrap().push((event.aggregate_id.clone(), sequence));
                    Ok(())
                }
            }),
        );
    }
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let dispatcher = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            publisher
                .run_handlers(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        })
    };
    eventually(Duration::from_secs(30), "the dispatcher's heartbeat says it polls", async || {
        sqlx::query_scalar::<_, bool>(
            "SELECT NOT wake_by_notify FROM outbox.worker_heartbeats WHERE consumer = 'handlers' AND stopped_at IS NULL",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap()
        .unwrap_or(false)
    })
    .await;
    // The probe (sequence 1 of its own item) is handled too.
    assert!(
        !an_insert_notifies(&db, &publisher).await,
        "a polling dispatcher is the only worker: writers must not notify"
    );
    let item = Uuid::now_v7();
    for sequence in 1..=5 {
        let mut tx = db.pool.begin().await.unwrap();
        publisher
            .publish_event(&mut tx, stock_changed(item, sequence))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    eventually(Duration::from_secs(30), "all six events handled", async || {
        seen.lock().unwrap().len() >= 6
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    let of_item: Vec<i64> = seen
        .iter()
        .filter(|(aggregate, _)| *aggregate == item.to_string())
        .map(|(_, sequence)| *sequence)
        .collect();
    assert_eq!(
        of_item,
        vec![1, 2, 3, 4, 5],
        "the item's events once each, in order: {seen:?}"
    );
    assert_eq!(seen.len(), 6, "the probe once besides: {seen:?}");
    let _ = stop.send(true);
    dispatcher.await.unwrap().unwrap();
    db.drop().await;
}
