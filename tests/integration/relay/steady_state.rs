//! Steady state on each broker: many writers, hundreds of aggregates, thousands of events;
//! every committed event arrives exactly once and in per-aggregate commit order.

use std::time::Duration;

use inventory_outbox::event::{DomainEvent, cloudevents};
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message as _};
use serde_json::json;

use super::{assert_delivered, relay_config, start_relay, write_events};
use crate::event_core::publisher;
use crate::support::{amqp_url, aws_endpoint, kafka_bootstrap, unique_name};

const WRITERS: usize = 8;
const PER_WRITER: usize = 250;
const AGGREGATES: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_receives_every_committed_event_once_in_aggregate_order() {
    let (db, publisher) = publisher("relay_kafka").await;
    let topic = unique_name("relay");
    let broker = json!({"kafka": {"bootstrapServers": kafka_bootstrap(), "deadLetterTopic": format!("{topic}-dlq"),
                                  "partitions": 6, "mode": "structured"}});
    let config = relay_config(
        "kafka-steady",
        broker,
        json!({"strategy": "single", "destination": topic}),
    );
    let relay = start_relay(&db, config, "w1").await;
    let sent = write_events(&publisher, &db, WRITERS, PER_WRITER, AGGREGATES).await;

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", unique_name("relay-test"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut received: Vec<DomainEvent> = Vec::new();
    let collect = async {
        while received.len() < sent.len() {
            let m = crate::support::next_record(&consumer).await;
            let doc: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
            let event = cloudevents::from_structured(&doc).unwrap();
            assert_eq!(m.key(), Some(event.aggregate_id.as_bytes()), "key is the aggregate id");
            received.push(event);
        }
    };
    tokio::time::timeout(Duration::from_secs(90), collect)
        .await
        .expect("all events within 90 s");
    // Anything beyond what was sent would be a duplicate; give stragglers a moment.
    if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await {
        let doc: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
        received.push(cloudevents::from_structured(&doc).unwrap());
    }
    assert_delivered(&sent, &received, false);
    relay.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_receives_every_committed_event_once_in_aggregate_order() {
    let (db, publisher) = publisher("relay_rabbit").await;
    let exchange = unique_name("relay");
    let queue = format!("{exchange}-all");
    let broker = json!({"rabbitmq": {"urlEnv": "AMQP_URL", "exchange": exchange, "mode": "structured",
                                     "queues": [{"name": queue, "bindingKey": "inventory.#"}]}});
    let routing = json!({"strategy": "perEventType", "template": "inventory.{eventType}"});
    let relay = start_relay(&db, relay_config("rabbit-steady", broker, routing), "w1").await;
    let sent = write_events(&publisher, &db, WRITERS, PER_WRITER, AGGREGATES).await;

    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while received.len() < sent.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {} arrived",
            received.len(),
            sent.len()
        );
        // The relay declares the queue on start; wait for it.
        if channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        match channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(m) => {
                let doc: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
                received.push(cloudevents::from_structured(&doc).unwrap());
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    while let Some(m) = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let doc: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
        received.push(cloudevents::from_structured(&doc).unwrap());
    }
    assert_delivered(&sent, &received, false);
    relay.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sqs_fifo_queue_receives_every_committed_event_once_in_aggregate_order() {
    let (db, publisher) = publisher("relay_sqs").await;
    let queue = unique_name("relay");
    let broker = json!({"snsSqs": {"region": "us-east-1", "endpointUrl": aws_endpoint(),
                                   "target": "sqs", "fifo": true, "deadLetterQueue": format!("{queue}-dlq.fifo"),
                                   "accessKeyIdEnv": "AWS_ACCESS_KEY_ID", "secretAccessKeyEnv": "AWS_SECRET_ACCESS_KEY"}});
    let relay = start_relay(
        &db,
        relay_config(
            "sqs-steady",
            broker,
            json!({"strategy": "single", "destination": queue}),
        ),
        "w1",
    )
    .await;
    // Fewer events: moto answers one call at a time.
    let sent = write_events(&publisher, &db, 4, 150, 60).await;

    let config = crate::support::aws_sdk_config().await;
    let sqs = aws_sdk_sqs::Client::new(&config);
    let mut received = Vec::new();
    // moto's speed follows the machine's load: the test fails when delivery stalls (nothing
    // new for 45 s) or takes unreasonably long, not when a loaded machine is merely slow.
    let started = tokio::time::Instant::now();
    let mut progress = (0, started);
    let mut url = None;
    while received.len() < sent.len() {
        if received.len() > progress.0 {
            progress = (received.len(), tokio::time::Instant::now());
        }
        assert!(
            progress.1.elapsed() < Duration::from_secs(45) && started.elapsed() < Duration::from_secs(600),
            "only {} of {} arrived after {:?} ({:?} since the last one)",
            received.len(),
            sent.len(),
            started.elapsed(),
            progress.1.elapsed()
        );
        let Some(queue_url) = url.clone() else {
            url = sqs
                .get_queue_url()
                .queue_name(format!("{queue}.fifo"))
                .send()
                .await
                .ok()
                .and_then(|o| o.queue_url);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let out = sqs
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        // One delete call per receive (not per message) keeps the load on moto small.
        let mut deletes = sqs.delete_message_batch().queue_url(&queue_url);
        let messages = out.messages.unwrap_or_default();
        for (i, m) in messages.iter().enumerate() {
            let doc: serde_json::Value = serde_json::from_str(m.body.as_deref().unwrap_or_default()).unwrap();
            received.push(cloudevents::from_structured(&doc).unwrap());
            deletes = deletes.entries(
                aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(m.receipt_handle.clone().unwrap_or_default())
                    .build()
                    .unwrap(),
            );
        }
        if !messages.is_empty() {
            let out = deletes.send().await.unwrap();
            assert!(out.failed.is_empty(), "deletes failed: {:?}", out.failed);
        }
    }
    assert_delivered(&sent, &received, false);
    relay.stop().await;
    db.drop().await;
}
