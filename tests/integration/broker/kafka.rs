//! The Kafka adapter against the real Kafka (KRaft) of the local stack: pipelined batches keep
//! per-aggregate order and round-trip as CloudEvents, size refusals are permanent, dead letters
//! carry their reason, and an unreachable cluster is retriable.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use inventory_outbox::broker::kafka::{KafkaBroker, KafkaConfig};
use inventory_outbox::broker::{Broker, CloudEventsMode, Message, SendError};
use inventory_outbox::event::cloudevents::{self, KAFKA_PREFIX};
use inventory_outbox::event::validate::enrich;
use inventory_outbox::event::{DomainEvent, NewEvent};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use serde_json::json;

use crate::support::{kafka_bootstrap, unique_name};

/// Upper bound of any single step; every test stays well under 30 s.
const STEP: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {STEP:?}"))
}

fn config(dead_letter_topic: &str) -> KafkaConfig {
    KafkaConfig {
        bootstrap_servers: kafka_bootstrap(),
        dead_letter_topic: dead_letter_topic.to_owned(),
        partitions: 3,
        message_timeout_ms: 15_000,
        ..KafkaConfig::default()
    }
}

fn event(aggregate: &str, payload: serde_json::Value) -> Arc<DomainEvent> {
    let draft = NewEvent::raw("StockLevelChanged", "InventoryItem", aggregate, 1, payload);
    Arc::new(enrich(draft, "test", Utc::now()))
}

fn message(position: i64, destination: &str, event: Arc<DomainEvent>) -> Message {
    Message {
        position,
        destination: destination.to_owned(),
        event,
    }
}

fn headers_of(record: &OwnedMessage) -> Vec<(String, String)> {
    record
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| {
                    let value = String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned();
                    (h.key.to_owned(), value)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn header<'h>(headers: &'h [(String, String)], key: &str) -> Option<&'h str> {
    headers.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Reads `count` records of `topic` from the beginning of its partitions (no consumer group
/// rebalance, so it starts at once).
async fn read_back(topic: &str, partitions: i32, count: usize) -> Vec<OwnedMessage> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", unique_name("kafka-adapter-test"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .expect("partition offset");
    }
    consumer.assign(&assignment).expect("assign");
    within(&format!("reading {count} records of {topic}"), async {
        let mut records = Vec::with_capacity(count);
        while records.len() < count {
            records.push(consumer.recv().await.expect("consume").detach());
        }
        records
    })
    .await
}

async fn connected(config: &KafkaConfig, topics: &[String]) -> KafkaBroker {
    let broker = KafkaBroker::connect(config).expect("connect");
    within("ensure_destinations", broker.ensure_destinations(topics))
        .await
        .expect("topics created");
    broker
}

#[tokio::test]
async fn a_pipelined_batch_is_acknowledged_and_reads_back_in_order_per_aggregate() {
    let topic = unique_name("kafka-batch");
    let config = config(&unique_name("kafka-batch-dlq"));
    let broker = connected(&config, std::slice::from_ref(&topic)).await;
    assert_eq!(broker.kind(), "kafka");

    let messages: Vec<Message> = (0..500)
        .map(|i| {
            let aggregate = format!("item-{}", i % 20);
            let payload = json!({"sku": aggregate, "newQuantity": i, "delta": 1});
            message(i, &topic, event(&aggregate, payload))
        })
        .collect();
    let results = within("send_batch", broker.send_batch(&messages)).await;
    assert_eq!(results.len(), messages.len());
    assert!(
        results.iter().all(Result::is_ok),
        "{:?}",
        results.iter().find(|r| r.is_err())
    );

    let records = read_back(&topic, config.partitions, messages.len()).await;
    let mut sent: BTreeMap<&str, Vec<&DomainEvent>> = BTreeMap::new();
    for m in &messages {
        sent.entry(&m.event.aggregate_id).or_default().push(&m.event);
    }
    let mut received: BTreeMap<String, Vec<DomainEvent>> = BTreeMap::new();
    for record in &records {
        let headers = headers_of(record);
        let body = record.payload().expect("a body");
        let decoded = cloudevents::from_binary(&headers, body, KAFKA_PREFIX).expect("a binary CloudEvent");
        assert_eq!(header(&headers, "ce_id"), Some(decoded.event_id.to_string().as_str()));
        let key = String::from_utf8(record.key().expect("a key").to_vec()).expect("UTF-8 key");
        assert_eq!(key, decoded.aggregate_id);
        received.entry(key).or_default().push(decoded);
    }
    assert_eq!(received.len(), 20);
    for (aggregate, events) in &sent {
        let got: Vec<&DomainEvent> = received[*aggregate].iter().collect();
        assert_eq!(&got, events, "order or content of {aggregate}");
    }
}

#[tokio::test]
async fn a_trace_context_travels_as_the_w3c_traceparent_header() {
    let topic = unique_name("kafka-trace");
    let config = config(&unique_name("kafka-trace-dlq"));
    let broker = connected(&config, std::slice::from_ref(&topic)).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut traced = (*event("item-t", json!({"newQuantity": 1}))).clone();
    traced.metadata.traceparent = Some(traceparent.to_owned());
    let messages = vec![message(1, &topic, Arc::new(traced))];
    let results = within("send_batch", broker.send_batch(&messages)).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let records = read_back(&topic, config.partitions, 1).await;
    let headers = headers_of(&records[0]);
    assert_eq!(header(&headers, "traceparent"), Some(traceparent));
    assert_eq!(header(&headers, "ce_traceparent"), Some(traceparent));
}

#[tokio::test]
async fn structured_mode_puts_the_whole_cloudevent_in_the_body() {
    let topic = unique_name("kafka-structured");
    let config = KafkaConfig {
        mode: CloudEventsMode::Structured,
        ..config(&unique_name("kafka-structured-dlq"))
    };
    let broker = connected(&config, std::slice::from_ref(&topic)).await;
    let messages: Vec<Message> = (0..3)
        .map(|i| message(i, &topic, event("item-s", json!({"newQuantity": i}))))
        .collect();
    let results = within("send_batch", broker.send_batch(&messages)).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    let records = read_back(&topic, config.partitions, messages.len()).await;
    for (record, sent) in records.iter().zip(&messages) {
        let headers = headers_of(record);
        assert_eq!(header(&headers, "content-type"), Some("application/cloudevents+json"));
        assert_eq!(
            header(&headers, "ce_id"),
            Some(sent.event.event_id.to_string().as_str())
        );
        let document: serde_json::Value = serde_json::from_slice(record.payload().expect("a body")).expect("JSON");
        assert_eq!(
            cloudevents::from_structured(&document).expect("a structured CloudEvent"),
            *sent.event
        );
    }
}

#[tokio::test]
async fn a_message_over_the_topic_size_limit_is_permanent_while_a_small_one_in_the_same_batch_is_delivered() {
    let limited = unique_name("kafka-limited");
    let roomy = unique_name("kafka-roomy");
    let config = KafkaConfig {
        topic_config: BTreeMap::from([("max.message.bytes".to_owned(), "1024".to_owned())]),
        ..config(&unique_name("kafka-limited-dlq"))
    };
    // Both topics get the 1 KiB limit; the small record goes to its own topic because a
    // broker refuses a whole record batch, and records of one partition may share one.
    let broker = connected(&config, &[limited.clone(), roomy.clone()]).await;
    // 4 KiB of random hex: lz4 cannot squeeze it under the limit.
    let noise: String = (0..128).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect();
    let messages = [
        message(1, &limited, event("item-big", json!({"note": noise}))),
        message(2, &roomy, event("item-small", json!({"newQuantity": 1}))),
    ];
    let results = within("send_batch", broker.send_batch(&messages)).await;
    match &results[0] {
        Err(SendError::Message(reason)) => assert!(reason.contains("MessageSizeTooLarge"), "{reason}"),
        other => panic!("expected a permanent size error, got {other:?}"),
    }
    assert_eq!(results[1], Ok(()));

    // The refusal does not wedge the idempotent producer: the limited topic still takes a small record.
    let after = [message(3, &limited, event("item-big", json!({"newQuantity": 2})))];
    assert_eq!(within("send_batch", broker.send_batch(&after)).await, vec![Ok(())]);
}

#[tokio::test]
async fn a_dead_letter_lands_in_the_dead_letter_topic_with_its_reason() {
    let topic = unique_name("kafka-origin");
    let dead_letters = unique_name("kafka-dlq");
    let config = config(&dead_letters);
    let broker = connected(&config, std::slice::from_ref(&topic)).await;
    let dead = message(7, &topic, event("item-d", json!({"newQuantity": 0})));
    within("send_dead_letter", broker.send_dead_letter(&dead, "schema mismatch"))
        .await
        .expect("dead letter acknowledged");

    let records = read_back(&dead_letters, config.partitions, 1).await;
    let headers = headers_of(&records[0]);
    assert_eq!(header(&headers, "x-dead-letter-reason"), Some("schema mismatch"));
    assert_eq!(header(&headers, "x-original-topic"), Some(topic.as_str()));
    let body = records[0].payload().expect("a body");
    assert_eq!(
        cloudevents::from_binary(&headers, body, KAFKA_PREFIX).expect("a CloudEvent"),
        *dead.event
    );
}

#[tokio::test]
async fn ensuring_destinations_twice_succeeds_and_the_cluster_is_healthy() {
    let topics = [unique_name("kafka-ensure-a"), unique_name("kafka-ensure-b")];
    let broker = KafkaBroker::connect(&config(&unique_name("kafka-ensure-dlq"))).expect("connect");
    for round in ["first", "second"] {
        within("ensure_destinations", broker.ensure_destinations(&topics))
            .await
            .unwrap_or_else(|e| panic!("{round} ensure_destinations: {e}"));
    }
    within("check_health", broker.check_health()).await.expect("healthy");
}

#[tokio::test]
async fn an_unreachable_cluster_is_retriable_for_health_and_sends() {
    let config = KafkaConfig {
        bootstrap_servers: "127.0.0.1:1".to_owned(),
        message_timeout_ms: 2_000,
        ..config("unreachable-dlq")
    };
    let broker = KafkaBroker::connect(&config).expect("connect is lazy");
    let health = within("check_health", broker.check_health()).await;
    assert!(matches!(health, Err(SendError::Transient(_))), "{health:?}");

    let messages = [message(1, "unreachable", event("item-u", json!({"newQuantity": 1})))];
    let results = within("send_batch", broker.send_batch(&messages)).await;
    match &results[..] {
        [Err(SendError::Transient(reason))] => assert!(reason.contains("MessageTimedOut"), "{reason}"),
        other => panic!("expected one retriable timeout, got {other:?}"),
    }
}
