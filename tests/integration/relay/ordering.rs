//! Per-aggregate order when a batch goes to Kafka in one call: an event in the middle of a hot
//! aggregate's run fails (above the producer's `message.max.bytes`) while its successors sit in
//! the same batch. None of them reaches the topic before the failure is settled: held behind
//! it while it blocks (`deadLetter.blockAggregate`) and released in order when it is resolved,
//! or sent after its dead letter when it does not block; every other aggregate flows. The
//! same holds when the run goes on into the next batch while batches are pipelined.

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

/// One read batch: the hot aggregate's run (its `POISON`-th event oversized) interleaved
/// with single events of other aggregates.
const ONE_BATCH: &str = "hoo hoo hoo hoo Hoo hoo hoo hoo hoo hoo";

/// Four batches of ten: the run starts in the second batch, whose ninth event is the poison,
/// and goes on into the third; the first and last hold other aggregates only.
const ACROSS_BATCHES: &str = "oooooooooo oohohohhHh hohohohooo oooooooooo";
const ACROSS_BATCH_SIZE: usize = 10;

/// Commits, in one transaction, an event per letter of `layout` (spaces ignored): `h` the hot
/// aggregate's next event, `H` its oversized one, `o` a single event of a new aggregate.
/// Returns the events in commit order, the hot aggregate and the poison's index.
async fn commit_layout(
    publisher: &InventoryEventPublisher,
    db: &TestDatabase,
    layout: &str,
) -> (Vec<DomainEvent>, Uuid, usize) {
    let hot = Uuid::now_v7();
    let (mut drafts, mut run, mut poison) = (Vec::<NewEvent>::new(), 0, None);
    for slot in layout.chars().filter(|c| !c.is_whitespace()) {
        let draft = match slot {
            'o' => stock_changed(Uuid::now_v7(), 1),
            'h' | 'H' => {
                run += 1;
                let mut draft = stock_changed(hot, run);
                if slot == 'H' {
                    // Random hex, so compression cannot bring it under the limit either.
                    let noise: String = (0..256).map(|_| Uuid::new_v4().simple().to_string()).collect();
                    draft.payload["note"] = json!(noise);
                    poison = Some(drafts.len());
                }
                draft
            }
            other => panic!("layout letter {other:?}"),
        };
        drafts.push(draft);
    }
    assert_eq!(run, i64::try_from(HOT_RUN).expect("small"), "layout {layout:?}");
    let poison = poison.expect("the layout has a poison");
    let mut tx = db.pool.begin().await.expect("begin");
    let events = publisher.publish_events(&mut tx, drafts).await.expect("publish");
    tx.commit().await.expect("commit");
    assert_eq!(
        events[poison].aggregate_id,
        hot.to_string(),
        "the poison is the hot aggregate's"
    );
    (events, hot, poison)
}

/// A Kafka relay whose producer refuses records above 4 KiB, with `blockAggregate` as given.
async fn kafka_relay(
    db: &TestDatabase,
    consumer_name: &str,
    topic: &str,
    block: bool,
    batch_size: Option<usize>,
) -> RunningRelay {
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
    if let Some(size) = batch_size {
        config.outbox.batch_size = size;
    }
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

/// The sample line of the relay's counter `name` (without its `outbox_relay_` prefix).
fn counter(relay: &RunningRelay, name: &str) -> Option<String> {
    let prefix = format!("outbox_relay_{name}_total");
    relay
        .relay
        .metrics()
        .encode()
        .lines()
        .find(|l| l.starts_with(&prefix))
        .map(str::to_owned)
}

/// One ordering scenario: a relay of `consumer` over `db`, fed `layout` ([`commit_layout`]).
struct Scenario<'a> {
    consumer: &'a str,
    db: &'a TestDatabase,
    publisher: &'a InventoryEventPublisher,
    layout: &'a str,
    batch_size: Option<usize>,
}

impl Scenario<'_> {
    /// Starts the relay (`blockAggregate` as given) to a new topic and a reader of that topic,
    /// then commits the layout.
    async fn start(&self, block: bool) -> (RunningRelay, StreamConsumer, (Vec<DomainEvent>, Uuid, usize)) {
        let topic = unique_name(self.consumer);
        let relay = kafka_relay(self.db, self.consumer, &topic, block, self.batch_size).await;
        let reader = consumer(&topic);
        let committed = commit_layout(self.publisher, self.db, self.layout).await;
        (relay, reader, committed)
    }
}

/// Commits `layout`, relays it with `blockAggregate` and checks: everything but the poison's
/// run arrives, the poison is dead-lettered and its successors held; resolving it releases
/// them in order; nothing arrives twice or out of order. Returns the running relay.
async fn a_blocking_failure_holds_its_successors(scenario: Scenario<'_>) -> RunningRelay {
    let Scenario {
        consumer: consumer_name,
        db,
        ..
    } = scenario;
    let (relay, reader, (events, hot, poison_at)) = scenario.start(true).await;
    let poison = &events[poison_at];
    let successors: Vec<&DomainEvent> = events[poison_at + 1..]
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
            let status = failed_status(db, consumer_name).await;
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
        .resolve(consumer_name, poison.event_id, "too large; dropped by the test")
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
        counter(&relay, "aggregate_order_broken"),
        Some(format!(
            "outbox_relay_aggregate_order_broken_total{{publisher=\"{consumer_name}\"}} 0"
        ))
    );
    relay
}

/// Batches handed over behind another (`outbox_relay_batches_followed_total`). With
/// `ACROSS_BATCHES` the first batch is followed by the poison's, the third (successors) is
/// not, the fourth follows the third.
fn followed(relay: &RunningRelay) -> u64 {
    let line = counter(relay, "batches_followed").unwrap_or_default();
    line.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocking_failure_mid_run_in_one_kafka_batch_holds_every_successor_until_resolved() {
    let (db, publisher) = publisher("relay_mid_run_block").await;
    let relay = a_blocking_failure_holds_its_successors(Scenario {
        consumer: "kafka-mid-run-block",
        db: &db,
        publisher: &publisher,
        layout: ONE_BATCH,
        batch_size: None,
    })
    .await;
    relay.stop().await;
    db.drop().await;
}

/// The pipelined case: batches are handed to the producer while the previous one's
/// acknowledgements are outstanding, and the poison's run crosses from its batch into the
/// next. The batch after the poison's must not follow it (it holds a successor), the batches
/// of other aggregates still do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocking_failure_whose_run_goes_on_in_the_next_batch_holds_it_there_too() {
    const CONSUMER: &str = "kafka-across-batches";
    let (db, publisher) = publisher("relay_across_batches").await;
    let relay = a_blocking_failure_holds_its_successors(Scenario {
        consumer: CONSUMER,
        db: &db,
        publisher: &publisher,
        layout: ACROSS_BATCHES,
        batch_size: Some(ACROSS_BATCH_SIZE),
    })
    .await;
    assert!(followed(&relay) >= 2, "the pipelined path was not exercised");
    relay.stop().await;
    db.drop().await;
}

/// Commits `layout`, relays it without `blockAggregate` and checks: every event but the
/// poison arrives once, the poison is the only failed row (dead-lettered), and every successor
/// of the poison was produced after its fate was recorded. Returns the running relay.
async fn a_dead_letter_goes_out_before_its_successors(scenario: Scenario<'_>) -> RunningRelay {
    let Scenario {
        consumer: consumer_name,
        db,
        ..
    } = scenario;
    let (relay, reader, (events, hot, poison_at)) = scenario.start(false).await;
    let poison = events[poison_at].clone();

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
    let status = failed_status(db, consumer_name).await;
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
    .bind(consumer_name)
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
    relay
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_mid_run_in_one_kafka_batch_goes_out_before_any_successor() {
    let (db, publisher) = publisher("relay_mid_run_pass").await;
    let relay = a_dead_letter_goes_out_before_its_successors(Scenario {
        consumer: "kafka-mid-run-pass",
        db: &db,
        publisher: &publisher,
        layout: ONE_BATCH,
        batch_size: None,
    })
    .await;
    relay.stop().await;
    db.drop().await;
}

/// The pipelined case without `blockAggregate`: the batch after the poison's holds its
/// successors, so it waits for the poison's outcome instead of following.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_whose_run_goes_on_in_the_next_batch_goes_out_before_it() {
    let (db, publisher) = publisher("relay_across_batches_pass").await;
    let relay = a_dead_letter_goes_out_before_its_successors(Scenario {
        consumer: "kafka-across-batches-pass",
        db: &db,
        publisher: &publisher,
        layout: ACROSS_BATCHES,
        batch_size: Some(ACROSS_BATCH_SIZE),
    })
    .await;
    assert!(followed(&relay) >= 2, "the pipelined path was not exercised");
    relay.stop().await;
    db.drop().await;
}
