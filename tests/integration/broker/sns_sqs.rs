//! The SNS/SQS adapter against moto: full batches that round-trip as CloudEvents, FIFO order
//! per aggregate with deduplication by event id, SNS fan-out to subscribed queues, size
//! refusals that are permanent, dead letters with their reason, redrive policies, and an
//! unreachable endpoint that is retriable.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use chrono::Utc;
use inventory_outbox::broker::sns_sqs::{SnsSqsBroker, SnsSqsConfig, SnsSqsTarget};
use inventory_outbox::broker::{Broker, CloudEventsMode, Message, SendError};
use inventory_outbox::event::cloudevents;
use inventory_outbox::event::validate::enrich;
use inventory_outbox::event::{DomainEvent, NewEvent};
use serde_json::json;

use crate::support::{aws_endpoint, unique_name};

/// Upper bound of any single step; every test stays well under 30 s.
const STEP: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {STEP:?}"))
}

fn config(target: SnsSqsTarget, fifo: bool) -> SnsSqsConfig {
    SnsSqsConfig {
        endpoint_url: Some(aws_endpoint()),
        fifo,
        // Static credentials from the environment written by `make env-up` (moto takes any).
        access_key_id_env: Some("AWS_ACCESS_KEY_ID".into()),
        secret_access_key_env: Some("AWS_SECRET_ACCESS_KEY".into()),
        ..SnsSqsConfig::new("us-east-1", target)
    }
}

async fn broker(config: SnsSqsConfig) -> SnsSqsBroker {
    inventory_outbox::tls::install_crypto_provider();
    SnsSqsBroker::connect(config)
        .await
        .expect("connect (is ~/.local/state/inventory-outbox/env.sh sourced?)")
}

/// Plain SDK clients for the test's own checks.
async fn clients() -> (aws_sdk_sns::Client, aws_sdk_sqs::Client) {
    let sdk = crate::support::aws_sdk_config().await;
    (aws_sdk_sns::Client::new(&sdk), aws_sdk_sqs::Client::new(&sdk))
}

fn event(aggregate: &str, n: usize) -> DomainEvent {
    enrich(
        NewEvent::raw(
            "StockLevelChanged",
            "InventoryItem",
            aggregate,
            1,
            json!({"itemId": aggregate, "newQuantity": n}),
        )
        .with_correlation_id(format!("corr-{n}")),
        "warehouse-svc",
        Utc::now(),
    )
}

fn messages(destination: &str, events: impl IntoIterator<Item = DomainEvent>) -> Vec<Message> {
    events
        .into_iter()
        .enumerate()
        .map(|(i, e)| Message {
            position: i as i64 + 1,
            destination: destination.to_owned(),
            event: Arc::new(e),
        })
        .collect()
}

fn assert_all_ok(results: &[Result<(), SendError>]) {
    let failures: Vec<_> = results.iter().enumerate().filter(|(_, r)| r.is_err()).collect();
    assert!(failures.is_empty(), "failed entries: {failures:?}");
}

async fn queue_url(sqs: &aws_sdk_sqs::Client, name: &str) -> String {
    sqs.get_queue_url()
        .queue_name(name)
        .send()
        .await
        .expect("queue exists")
        .queue_url
        .expect("queue url")
}

async fn queue_attribute(sqs: &aws_sdk_sqs::Client, url: &str, name: QueueAttributeName) -> Option<String> {
    sqs.get_queue_attributes()
        .queue_url(url)
        .attribute_names(name.clone())
        .send()
        .await
        .expect("queue attributes")
        .attributes
        .and_then(|mut a| a.remove(&name))
}

/// Receives (and deletes) until `expected` messages arrived; bounded by `STEP`.
async fn receive(sqs: &aws_sdk_sqs::Client, url: &str, expected: usize) -> Vec<aws_sdk_sqs::types::Message> {
    let mut received = Vec::new();
    within("receiving", async {
        while received.len() < expected {
            let out = sqs
                .receive_message()
                .queue_url(url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .message_attribute_names("All")
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send()
                .await
                .expect("receive");
            for message in out.messages.unwrap_or_default() {
                if let Some(handle) = &message.receipt_handle {
                    sqs.delete_message()
                        .queue_url(url)
                        .receipt_handle(handle)
                        .send()
                        .await
                        .expect("delete");
                }
                received.push(message);
            }
        }
    })
    .await;
    assert_eq!(received.len(), expected, "more messages than sent");
    received
}

fn attribute(message: &aws_sdk_sqs::types::Message, name: &str) -> Option<String> {
    message
        .message_attributes
        .as_ref()
        .and_then(|a| a.get(name))
        .and_then(|v| v.string_value.clone())
}

fn system_attribute(message: &aws_sdk_sqs::types::Message, name: MessageSystemAttributeName) -> Option<String> {
    message.attributes.as_ref().and_then(|a| a.get(&name)).cloned()
}

fn parse(message: &aws_sdk_sqs::types::Message) -> DomainEvent {
    let body: serde_json::Value = serde_json::from_str(message.body.as_deref().unwrap_or_default()).expect("JSON body");
    cloudevents::from_structured(&body).expect("a structured CloudEvent")
}

/// Checks that the received messages are exactly the sent events, with their attributes.
fn assert_round_trip(sent: &[Message], received: &[aws_sdk_sqs::types::Message]) {
    let by_id: HashMap<_, _> = sent.iter().map(|m| (m.event.event_id, &*m.event)).collect();
    for message in received {
        let event = parse(message);
        assert_eq!(by_id.get(&event.event_id), Some(&&event), "an unknown event arrived");
        assert_eq!(
            attribute(message, "eventType").as_deref(),
            Some(event.event_type.as_str())
        );
        assert_eq!(
            attribute(message, "aggregateId").as_deref(),
            Some(event.aggregate_id.as_str())
        );
        assert_eq!(attribute(message, "eventId"), Some(event.event_id.to_string()));
    }
    let mut ids: Vec<_> = received.iter().map(|m| parse(m).event_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), sent.len(), "duplicates or losses");
}

/// Event ids per message group (= aggregate), in receive order.
fn by_group(received: &[aws_sdk_sqs::types::Message]) -> BTreeMap<String, Vec<uuid::Uuid>> {
    let mut groups: BTreeMap<String, Vec<uuid::Uuid>> = BTreeMap::new();
    for message in received {
        let group = system_attribute(message, MessageSystemAttributeName::MessageGroupId).expect("MessageGroupId");
        groups.entry(group).or_default().push(parse(message).event_id);
    }
    groups
}

fn sent_by_aggregate(sent: &[Message]) -> BTreeMap<String, Vec<uuid::Uuid>> {
    let mut groups: BTreeMap<String, Vec<uuid::Uuid>> = BTreeMap::new();
    for message in sent {
        groups
            .entry(message.event.aggregate_id.clone())
            .or_default()
            .push(message.event.event_id);
    }
    groups
}

#[tokio::test]
async fn a_standard_queue_receives_every_message_of_a_batch_as_a_cloudevent_with_attributes() {
    let broker = broker(config(SnsSqsTarget::Sqs, false)).await;
    let (_, sqs) = clients().await;
    let queue = unique_name("sqs-std");
    within("ensure", broker.ensure_destinations(std::slice::from_ref(&queue)))
        .await
        .expect("ensure");
    let sent = messages(&queue, (0..35).map(|n| event(&format!("item-{}", n % 7), n)));

    let results = within("send", broker.send_batch(&sent)).await;
    assert_eq!(results.len(), 35);
    assert_all_ok(&results);

    let received = receive(&sqs, &queue_url(&sqs, &queue).await, 35).await;
    assert_round_trip(&sent, &received);
    assert_eq!(broker.kind(), "sqs");
}

#[tokio::test]
async fn a_fifo_queue_keeps_each_aggregate_in_order_and_deduplicates_by_event_id() {
    let broker = broker(config(SnsSqsTarget::Sqs, true)).await;
    let (_, sqs) = clients().await;
    // The adapter adds the .fifo suffix.
    let queue = unique_name("sqs-fifo");
    let sent = messages(&queue, (0..40).map(|n| event(&format!("item-{}", n % 4), n)));

    let results = within("send", broker.send_batch(&sent)).await;
    assert_all_ok(&results);
    // Sending some events again is deduplicated by event id (moto, like SQS within its
    // 5-minute window, drops them while the originals are queued).
    assert_all_ok(&within("resend", broker.send_batch(&sent[..5])).await);

    let url = queue_url(&sqs, &format!("{queue}.fifo")).await;
    let received = receive(&sqs, &url, 40).await;
    assert_round_trip(&sent, &received);
    assert_eq!(by_group(&received), sent_by_aggregate(&sent));
    for message in &received {
        assert_eq!(
            system_attribute(message, MessageSystemAttributeName::MessageDeduplicationId),
            Some(parse(message).event_id.to_string())
        );
    }
    let out = sqs
        .receive_message()
        .queue_url(&url)
        .wait_time_seconds(1)
        .send()
        .await
        .expect("receive");
    assert!(out.messages.unwrap_or_default().is_empty(), "a duplicate was delivered");
}

/// Creates a queue subscribed to the topic with raw message delivery; returns its URL.
async fn subscribed_queue(sns: &aws_sdk_sns::Client, sqs: &aws_sdk_sqs::Client, topic: &str, fifo: bool) -> String {
    let mut create_topic = sns.create_topic().name(topic);
    let mut create_queue = sqs
        .create_queue()
        .queue_name(unique_name("sub") + if fifo { ".fifo" } else { "" });
    if fifo {
        create_topic = create_topic
            .attributes("FifoTopic", "true")
            .attributes("ContentBasedDeduplication", "false");
        create_queue = create_queue.attributes(QueueAttributeName::FifoQueue, "true");
    }
    let topic_arn = create_topic
        .send()
        .await
        .expect("the topic (created by the adapter)")
        .topic_arn
        .expect("topic arn");
    let url = create_queue
        .send()
        .await
        .expect("create queue")
        .queue_url
        .expect("queue url");
    let queue_arn = queue_attribute(sqs, &url, QueueAttributeName::QueueArn)
        .await
        .expect("queue arn");
    sns.subscribe()
        .topic_arn(&topic_arn)
        .protocol("sqs")
        .endpoint(&queue_arn)
        .attributes("RawMessageDelivery", "true")
        .send()
        .await
        .expect("subscribe");
    url
}

#[tokio::test]
async fn a_topic_fans_out_to_a_subscribed_queue() {
    let broker = broker(config(SnsSqsTarget::Sns, false)).await;
    let (sns, sqs) = clients().await;
    let topic = unique_name("sns-std");
    within("ensure", broker.ensure_destinations(std::slice::from_ref(&topic)))
        .await
        .expect("ensure");
    let url = subscribed_queue(&sns, &sqs, &topic, false).await;
    let sent = messages(&topic, (0..12).map(|n| event(&format!("item-{n}"), n)));

    assert_all_ok(&within("publish", broker.send_batch(&sent)).await);

    let received = receive(&sqs, &url, 12).await;
    assert_round_trip(&sent, &received);
    assert_eq!(broker.kind(), "sns");
    assert_eq!(broker.stats().calls, 2, "12 messages take two PublishBatch calls");
}

#[tokio::test]
async fn a_hot_aggregate_goes_one_entry_per_call_in_order_while_the_calls_stay_full() {
    let broker = broker(config(SnsSqsTarget::Sqs, true)).await;
    let (_, sqs) = clients().await;
    let queue = unique_name("sqs-hot");
    // 10 events of one aggregate between 20 single-event aggregates, in one send_batch (as
    // the relay sends a batch now that the adapter keeps aggregate order).
    let mut events = Vec::new();
    for n in 0..20 {
        events.push(event(&format!("item-{n}"), n));
        if n % 2 == 0 {
            events.push(event("hot", 100 + n));
        }
    }
    let sent = messages(&queue, events);
    assert!(broker.keeps_aggregate_order());

    assert_all_ok(&within("send", broker.send_batch(&sent)).await);

    // No call carries two entries of "hot", so it takes at least 10 calls; the first two are
    // full (10 distinct aggregates were pending), the rest carry what is left.
    let stats = broker.stats();
    assert_eq!(stats.entries, 30, "{stats:?}");
    assert!(stats.calls >= 10 && stats.full_calls >= 2, "{stats:?}");
    let received = receive(&sqs, &queue_url(&sqs, &format!("{queue}.fifo")).await, 30).await;
    assert_round_trip(&sent, &received);
    assert_eq!(by_group(&received), sent_by_aggregate(&sent));
}

#[tokio::test]
async fn a_fifo_topic_delivers_each_aggregate_in_order_to_a_fifo_queue() {
    let broker = broker(config(SnsSqsTarget::Sns, true)).await;
    let (sns, sqs) = clients().await;
    let topic = unique_name("sns-fifo");
    within("ensure", broker.ensure_destinations(std::slice::from_ref(&topic)))
        .await
        .expect("ensure");
    let url = subscribed_queue(&sns, &sqs, &format!("{topic}.fifo"), true).await;
    let sent = messages(&topic, (0..12).map(|n| event(&format!("item-{}", n % 3), n)));

    assert_all_ok(&within("publish", broker.send_batch(&sent)).await);

    let received = receive(&sqs, &url, 12).await;
    assert_round_trip(&sent, &received);
    assert_eq!(by_group(&received), sent_by_aggregate(&sent));
}

#[tokio::test]
async fn batches_are_full_while_ten_or_more_messages_remain() {
    let broker = broker(config(SnsSqsTarget::Sqs, false)).await;
    let (_, sqs) = clients().await;
    let queue = unique_name("sqs-full");
    let sent = messages(&queue, (0..25).map(|n| event(&format!("item-{n}"), n)));

    assert_all_ok(&within("send", broker.send_batch(&sent)).await);

    // 3 calls, 25 entries, 2 of them full: exactly 10, 10 and 5.
    let stats = broker.stats();
    assert_eq!((stats.calls, stats.entries, stats.full_calls), (3, 25, 2), "{stats:?}");
    assert_eq!(stats.short_with_ten_pending, 0, "{stats:?}");
    receive(&sqs, &queue_url(&sqs, &queue).await, 25).await;
}

#[tokio::test]
async fn an_oversize_message_is_permanent_and_the_rest_of_the_batch_is_delivered() {
    let broker = broker(config(SnsSqsTarget::Sqs, false)).await;
    let (_, sqs) = clients().await;
    let queue = unique_name("sqs-big");
    let mut events: Vec<DomainEvent> = (0..5).map(|n| event(&format!("item-{n}"), n)).collect();
    events[2].payload = json!({"blob": "x".repeat(300 * 1024)});
    // A later event of the refused event's aggregate is held back, not sent ahead of it.
    events.push(event("item-2", 5));
    let sent = messages(&queue, events);

    let results = within("send", broker.send_batch(&sent)).await;

    assert!(
        matches!(&results[2], Err(SendError::Message(m)) if m.contains("bytes")),
        "{results:?}"
    );
    for i in [0, 1, 3, 4] {
        assert_eq!(results[i], Ok(()), "entry {i}");
    }
    assert!(matches!(&results[5], Err(SendError::Transient(_))), "{:?}", results[5]);
    let received = receive(&sqs, &queue_url(&sqs, &queue).await, 4).await;
    assert_round_trip(&[&sent[..2], &sent[3..5]].concat(), &received);
}

#[tokio::test]
async fn a_dead_letter_lands_in_the_dead_letter_queue_with_its_reason() {
    let dlq = unique_name("dlq");
    let broker = broker(SnsSqsConfig {
        dead_letter_queue: Some(dlq.clone()),
        mode: CloudEventsMode::Binary,
        ..config(SnsSqsTarget::Sns, false)
    })
    .await;
    let (_, sqs) = clients().await;
    let topic = unique_name("sns-dl");
    let message = messages(&topic, [event("item-9", 9)]).remove(0);

    within(
        "dead letter",
        broker.send_dead_letter(&message, "rejected by the broker 5 times"),
    )
    .await
    .expect("dead letter");

    let received = receive(&sqs, &queue_url(&sqs, &dlq).await, 1).await;
    assert_eq!(
        attribute(&received[0], "deadLetterReason").as_deref(),
        Some("rejected by the broker 5 times")
    );
    assert_eq!(attribute(&received[0], "originalDestination"), Some(topic));
    // Dead letters are structured even in binary mode, so the whole envelope is kept.
    assert_eq!(parse(&received[0]), *message.event);
}

#[tokio::test]
async fn ensuring_destinations_twice_creates_them_with_a_redrive_policy_to_the_dead_letter_queue() {
    let dlq = unique_name("dlq") + ".fifo";
    let broker = broker(SnsSqsConfig {
        dead_letter_queue: Some(dlq.clone()),
        max_receive_count: 3,
        ..config(SnsSqsTarget::Sqs, true)
    })
    .await;
    let (_, sqs) = clients().await;
    let queues = [unique_name("sqs-a"), unique_name("sqs-b")];

    for _ in 0..2 {
        within("ensure", broker.ensure_destinations(&queues))
            .await
            .expect("ensure is idempotent");
    }

    let dlq_url = queue_url(&sqs, &dlq).await;
    let dlq_arn = queue_attribute(&sqs, &dlq_url, QueueAttributeName::QueueArn)
        .await
        .expect("dlq arn");
    for queue in &queues {
        let url = queue_url(&sqs, &format!("{queue}.fifo")).await;
        assert_eq!(
            queue_attribute(&sqs, &url, QueueAttributeName::FifoQueue)
                .await
                .as_deref(),
            Some("true")
        );
        let policy = queue_attribute(&sqs, &url, QueueAttributeName::RedrivePolicy)
            .await
            .expect("a redrive policy");
        let policy: serde_json::Value = serde_json::from_str(&policy).expect("JSON policy");
        assert_eq!(policy["deadLetterTargetArn"], dlq_arn.as_str());
        assert_eq!(policy["maxReceiveCount"].to_string().trim_matches('"'), "3");
    }
}

#[tokio::test]
async fn an_unreachable_endpoint_is_retriable_for_health_sends_and_dead_letters() {
    for target in [SnsSqsTarget::Sns, SnsSqsTarget::Sqs] {
        let broker = broker(SnsSqsConfig {
            endpoint_url: Some("http://127.0.0.1:1".into()),
            dead_letter_queue: Some("dlq".into()),
            ..config(target, false)
        })
        .await;
        let sent = messages("nowhere", (0..12).map(|n| event("item-1", n)));

        let health = within("health", broker.check_health()).await;
        assert!(matches!(health, Err(SendError::Transient(_))), "{health:?}");
        let results = within("send", broker.send_batch(&sent)).await;
        assert_eq!(results.len(), 12);
        assert!(
            results.iter().all(|r| matches!(r, Err(SendError::Transient(_)))),
            "{results:?}"
        );
        let dead = within("dead letter", broker.send_dead_letter(&sent[0], "reason")).await;
        assert!(matches!(dead, Err(SendError::Transient(_))), "{dead:?}");
        let ensure = within("ensure", broker.ensure_destinations(&["nowhere".to_owned()])).await;
        assert!(matches!(ensure, Err(SendError::Transient(_))), "{ensure:?}");
    }
}
