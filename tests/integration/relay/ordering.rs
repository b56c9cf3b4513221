//! Per-aggregate order when a batch goes to Kafka in one call: an event in the middle of a hot
//! aggregate's run fails (above the producer's `message.max.bytes`) while its successors sit in
//! the same batch. None of them reaches the topic before the failure is settled: held behind
//! it while it blocks (`deadLetter.blockAggregate`) and released in order when it is resolved,
//! or sent after its dead letter when it does not block; every other aggregate flows.

use std::collections::HashMap;
use std::time::Duration;

use inventory_outbox::event::{DomainEvent, NewEvent, cloudevents};
use inventory_outbox::publisher::InventoryEventPublisher;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message as _};
use serde_json::json;
use uuid::Uuid;

use super::{RunningRelay, eventually, relay_config, start_relay};
use crate::event_core::{publisher, stock_changed};
use crate::support::postgres::TestDatabase;
use crate::support::{kafka_bootstrap, unique_name};

/// Events of the hot aggregate; the one at `POISON` (0-based) is too large for the producer.
const HOT_RUN: usize = 10;
const POISON: usize = 4;
const OTHERS: usize = 20;

/// One record read back: the event and the record's CreateTime (ms).
struct Received {
    event: DomainEvent,
    timestamp_ms: i64,
}

/// Reads `topic` from the start into `into` until `done` holds, for at most `timeout`.
async fn read_until(
    consumer: &StreamConsumer,
    into: &mut Vec<Received>,
    timeout: Duration,
    what: &str,
    done: impl Fn(&[Received]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(into) {
        let Ok(next) = tokio::time::timeout_at(deadline, consumer.recv()).await else {
            let ids: Vec<String> = into
                .iter()
                .map(|r| format!("{}#{}", r.event.aggregate_id, r.event.payload["newQuantity"]))
                .collect();
            panic!("{what}: not within {timeout:?}; read {} records: {ids:?}", into.len());
        };
        let m = match next {
            Ok(m) => m,
            // Subscribed before the relay created the topic: the consumer finds it shortly.
            Err(rdkafka::error::KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
            )) => continue,
            Err(e) => panic!("consume {what}: {e}"),
        };
        let doc: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default()).expect("JSON body");
        into.push(Received {
            event: cloudevents::from_structured(&doc).expect("structured CloudEvent"),
            timestamp_ms: m.timestamp().to_millis().unwrap_or_default(),
        });
    }
}

fn consumer(topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", unique_name("ordering-test"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}

/// The `newQuantity` sequence of `item`'s events, in topic order.
fn run_of(received: &[Received], item: Uuid) -> Vec<i64> {
    received
        .iter()
        .filter(|r| r.event.aggregate_id == item.to_string())
        .map(|r| r.event.payload["newQuantity"].as_i64().unwrap_or(-1))
        .collect()
}

/// The hot aggregate's run (its `POISON`-th event oversized) interleaved with single events
/// of `OTHERS` other aggregates, committed in one transaction so that one read batch holds
/// them all. Returns the events in commit order and the hot aggregate.
async fn commit_one_batch(publisher: &InventoryEventPublisher, db: &TestDatabase) -> (Vec<DomainEvent>, Uuid) {
    let hot = Uuid::now_v7();
    let others: Vec<Uuid> = (0..OTHERS).map(|_| Uuid::now_v7()).collect();
    let mut drafts: Vec<NewEvent> = Vec::new();
    for n in 0..HOT_RUN {
        let mut draft = stock_changed(hot, i64::try_from(n).expect("small") + 1);
        if n == POISON {
            // Random hex, so compression cannot bring it under the limit either.
            let noise: String = (0..256).map(|_| Uuid::new_v4().simple().to_string()).collect();
            draft.payload["note"] = json!(noise);
        }
        drafts.push(draft);
        drafts.extend(others[n * 2..n * 2 + 2].iter().map(|o| stock_changed(*o, 1)));
    }
    let mut tx = db.pool.begin().await.expect("begin");
    let events = publisher.publish_events(&mut tx, drafts).await.expect("publish");
    tx.commit().await.expect("commit");
    (events, hot)
}

/// A Kafka relay whose producer refuses records above 4 KiB, with `blockAggregate` as given.
async fn kafka_relay(db: &TestDatabase, consumer_name: &str, topic: &str, block: bool) -> RunningRelay {
    let broker = json!({"kafka": {
        "bootstrapServers": kafka_bootstrap(),
        "deadLetterTopic": format!("{topic}-dlq"),
        "partitions": 3,
        "mode": "structured",
        "producerOverrides": {"message.max.bytes": "4096"}
    }});
    let mut config = relay_config(
        consumer_name,
        broker,
        json!({"strategy": "single", "destination": topic}),
    );
    config.dead_letter.block_aggregate = block;
    start_relay(db, config, "ordering-1").await
}

/// Every committed event but `except` was read exactly once, and nothing else.
fn assert_each_once_but(committed: &[DomainEvent], received: &[Received], except: Uuid) {
    let mut want: Vec<Uuid> = committed
        .iter()
        .map(|e| e.event_id)
        .filter(|id| *id != except)
        .collect();
    let mut got: Vec<Uuid> = received.iter().map(|r| r.event.event_id).collect();
    want.sort();
    got.sort();
    assert_eq!(
        got,
        want,
        "read {} records for {} expected events",
        got.len(),
        want.len()
    );
}

async fn failed_status(db: &TestDatabase, consumer: &str) -> HashMap<Uuid, String> {
    sqlx::query_as::<_, (Uuid, String)>("SELECT event_id, status FROM outbox.failed_events WHERE consumer = $1")
        .bind(consumer)
        .fetch_all(&db.pool)
        .await
        .expect("read failed events")
        .into_iter()
        .collect()
}

fn order_broken(relay: &RunningRelay) -> Option<String> {
    relay
        .relay
        .metrics()
        .encode()
        .lines()
        .find(|l| l.starts_with("outbox_relay_aggregate_order_broken_total"))
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocking_failure_mid_run_in_one_kafka_batch_holds_every_successor_until_resolved() {
    const CONSUMER: &str = "kafka-mid-run-block";
    let (db, publisher) = publisher("relay_mid_run_block").await;
    let topic = unique_name("mid-run-block");
    let relay = kafka_relay(&db, CONSUMER, &topic, true).await;
    let reader = consumer(&topic);
    let (events, hot) = commit_one_batch(&publisher, &db).await;
    let poison = &events[POISON * 3];
    assert_eq!(
        poison.aggregate_id,
        hot.to_string(),
        "the poison is the hot aggregate's"
    );
    let successors: Vec<&DomainEvent> = events[POISON * 3 + 1..]
        .iter()
        .filter(|e| e.aggregate_id == hot.to_string())
        .collect();
    assert_eq!(successors.len(), HOT_RUN - POISON - 1);

    // Everything but the poison and its successors arrives: the others and the run before it.
    let expected = events.len() - (HOT_RUN - POISON);
    let mut received = Vec::new();
    read_until(
        &reader,
        &mut received,
        Duration::from_secs(60),
        "the unblocked events",
        |r| r.len() >= expected,
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "poison dead-lettered, successors held",
        async || {
            let status = failed_status(&db, CONSUMER).await;
            status.get(&poison.event_id).map(String::as_str) == Some("dead_lettered")
                && successors
                    .iter()
                    .all(|s| status.get(&s.event_id).map(String::as_str) == Some("held"))
        },
    )
    .await;
    assert_eq!(
        run_of(&received, hot),
        vec![1, 2, 3, 4],
        "only the run before the poison"
    );

    // Resolving the poison releases the successors, in order.
    relay
        .relay
        .failed_events()
        .resolve(CONSUMER, poison.event_id, "too large; dropped by the test")
        .await
        .expect("resolve")
        .expect("the poison has a row");
    read_until(&reader, &mut received, Duration::from_secs(60), "the successors", |r| {
        r.len() >= events.len() - 1
    })
    .await;
    assert_eq!(run_of(&received, hot), vec![1, 2, 3, 4, 6, 7, 8, 9, 10]);
    assert_each_once_but(&events, &received, poison.event_id);
    assert_eq!(
        order_broken(&relay).as_deref(),
        Some("outbox_relay_aggregate_order_broken_total{publisher=\"kafka-mid-run-block\"} 0")
    );
    relay.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_mid_run_in_one_kafka_batch_goes_out_before_any_successor() {
    const CONSUMER: &str = "kafka-mid-run-pass";
    let (db, publisher) = publisher("relay_mid_run_pass").await;
    let topic = unique_name("mid-run-pass");
    let relay = kafka_relay(&db, CONSUMER, &topic, false).await;
    let reader = consumer(&topic);
    let (events, hot) = commit_one_batch(&publisher, &db).await;
    let poison = events[POISON * 3].clone();

    let mut received = Vec::new();
    read_until(
        &reader,
        &mut received,
        Duration::from_secs(60),
        "every event but the poison",
        |r| r.len() >= events.len() - 1,
    )
    .await;
    assert_eq!(run_of(&received, hot), vec![1, 2, 3, 4, 6, 7, 8, 9, 10]);
    let status = failed_status(&db, CONSUMER).await;
    assert_eq!(
        status.get(&poison.event_id).map(String::as_str),
        Some("dead_lettered"),
        "{status:?}"
    );
    assert_eq!(status.len(), 1, "only the poison failed: {status:?}");

    // Kafka's dead letter is the record itself, as large as the original, so the producer
    // refuses it too and the failed row is the durable dead letter. What must hold is that
    // every successor was produced after the poison's fate was recorded.
    let decided_ms: i64 = sqlx::query_scalar(
        "SELECT (extract(epoch FROM updated_at) * 1000)::bigint FROM outbox.failed_events WHERE consumer = $1 AND event_id = $2",
    )
    .bind(CONSUMER)
    .bind(poison.event_id)
    .fetch_one(&db.pool)
    .await
    .expect("failed row time");
    let first_successor_ms = received
        .iter()
        .filter(|r| r.event.aggregate_id == hot.to_string())
        .filter(|r| r.event.payload["newQuantity"].as_i64() > Some(i64::try_from(POISON).expect("small") + 1))
        .map(|r| r.timestamp_ms)
        .min()
        .expect("successors read");
    assert!(
        first_successor_ms >= decided_ms,
        "a successor was produced at {first_successor_ms} ms, before the poison was dead-lettered at {decided_ms} ms"
    );
    assert_each_once_but(&events, &received, poison.event_id);
    relay.stop().await;
    db.drop().await;
}
