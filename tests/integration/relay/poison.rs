//! Poison events on RabbitMQ: an event no queue is bound for is retried, then dead-lettered,
//! while other aggregates keep flowing and the poison's own aggregate waits behind it; the
//! admin API lists, resolves and retries it. A message above `maxMessageBytes` is a permanent
//! failure: dead-lettered after one attempt.

use std::sync::Arc;
use std::time::Duration;

use inventory_outbox::admin::api::{AdminState, router, serve};
use inventory_outbox::admin::client::{AdminClient, FailedEventStatus, ListFailedParams};
use inventory_outbox::event::inventory::{LowStockThresholdReached, Stockout};
use inventory_outbox::event::{DomainEvent, NewEvent, cloudevents};
use inventory_outbox::publisher::InventoryEventPublisher;
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::time::Instant;
use uuid::Uuid;

use super::{RunningRelay, assert_delivered, eventually, relay_config, start_relay};
use crate::event_core::{publisher, stock_changed};
use crate::support::postgres::TestDatabase;
use crate::support::{amqp_url, unique_name};

const TOKEN: &str = "poison-test-admin-token-0123456789";

/// A test-side AMQP connection.
struct Rabbit {
    connection: lapin::Connection,
    channel: lapin::Channel,
}

impl Rabbit {
    async fn connect() -> Self {
        let connection = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.expect("channel");
        Self { connection, channel }
    }

    /// Waits until the relay declared `queue` (a passive declare on a throw-away channel, as a
    /// failing one closes its channel).
    async fn wait_for_queue(&self, queue: &str) {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        eventually(Duration::from_secs(15), &format!("queue {queue}"), async || {
            let Ok(channel) = self.connection.create_channel().await else {
                return false;
            };
            let found = channel
                .queue_declare(queue.into(), passive, FieldTable::default())
                .await
                .is_ok();
            if found {
                let _ = channel.close(200, "done".into()).await;
            }
            found
        })
        .await;
    }

    async fn get(&self, queue: &str) -> Option<BasicGetMessage> {
        self.channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
    }

    /// Every message now in `queue`, decoded.
    async fn drain(&self, queue: &str) -> Vec<DomainEvent> {
        let mut events = Vec::new();
        while let Some(m) = self.get(queue).await {
            events.push(decode(&m));
        }
        events
    }

    /// Collects from `queue` until `done` holds for what arrived so far, for at most `timeout`.
    async fn collect_until(
        &self,
        queue: &str,
        received: &mut Vec<DomainEvent>,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[DomainEvent]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !done(received) {
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            let more = self.drain(queue).await;
            if more.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            received.extend(more);
        }
    }

    /// Waits for the message of `event_id` in `queue`, skipping others.
    async fn wait_for_message(&self, queue: &str, event_id: Uuid, timeout: Duration) -> BasicGetMessage {
        let deadline = Instant::now() + timeout;
        loop {
            assert!(
                Instant::now() < deadline,
                "no message {event_id} in {queue} within {timeout:?}"
            );
            match self.get(queue).await {
                Some(m) if message_id(&m) == event_id.to_string() => return m,
                Some(_) => {}
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Removes what the relay and the test declared for `exchange` (RabbitMQ is shared).
    async fn delete(&self, exchange: &str, queues: &[&str]) {
        for queue in queues {
            let _ = self
                .channel
                .queue_delete((*queue).into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in [exchange.to_owned(), format!("{exchange}.dlx")] {
            let _ = self
                .channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}

fn decode(m: &BasicGetMessage) -> DomainEvent {
    let doc: Value = serde_json::from_slice(&m.delivery.data).expect("JSON body");
    cloudevents::from_structured(&doc).expect("a structured CloudEvent")
}

fn message_id(m: &BasicGetMessage) -> String {
    m.delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.to_string())
        .unwrap_or_default()
}

fn header(m: &BasicGetMessage, name: &str) -> Option<AMQPValue> {
    m.delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(&ShortString::from(name)).cloned())
}

/// A RabbitMQ relay config with per-event-type routing and one consumer queue.
fn rabbit_config(exchange: &str, queue: &str, binding_key: &str, extra: Value) -> Value {
    let mut broker = json!({"urlEnv": "AMQP_URL", "exchange": exchange, "mode": "structured",
                            "queues": [{"name": queue, "bindingKey": binding_key}]});
    if let (Some(broker), Some(extra)) = (broker.as_object_mut(), extra.as_object()) {
        broker.extend(extra.clone());
    }
    json!({"rabbitmq": broker})
}

/// Commits one event in its own transaction.
async fn publish(publisher: &InventoryEventPublisher, db: &TestDatabase, draft: NewEvent) -> DomainEvent {
    let mut tx = db.pool.begin().await.expect("begin");
    let event = publisher.publish_event(&mut tx, draft).await.expect("publish");
    tx.commit().await.expect("commit");
    event
}

/// (status, attempts, last_error) of an event's failed row, if any.
async fn failed_row(db: &TestDatabase, consumer: &str, event_id: Uuid) -> Option<(String, i32, Option<String>)> {
    sqlx::query_as(
        "SELECT status, attempts, last_error FROM outbox.failed_events WHERE consumer = $1 AND event_id = $2",
    )
    .bind(consumer)
    .bind(event_id)
    .fetch_optional(&db.pool)
    .await
    .expect("read failed event")
}

async fn wait_for_status(db: &TestDatabase, consumer: &str, event_id: Uuid, status: &str, timeout: Duration) {
    eventually(timeout, &format!("event {event_id} to be {status}"), async || {
        failed_row(db, consumer, event_id)
            .await
            .is_some_and(|(s, _, _)| s == status)
    })
    .await;
}

/// The value of the sample of `metric` whose labels include every one of `labels`.
fn metric(relay: &RunningRelay, metric: &str, labels: &[&str]) -> Option<f64> {
    relay
        .relay
        .metrics()
        .encode()
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn stockout(item: Uuid) -> NewEvent {
    NewEvent::from_payload(&Stockout {
        inventory_item_id: item,
        warehouse_id: Uuid::nil(),
        unfulfilled_quantity: Some(3),
    })
    .expect("serialize payload")
}

fn aggregate_of(events: &[DomainEvent], item: Uuid) -> Vec<i64> {
    events
        .iter()
        .filter(|e| e.aggregate_id == item.to_string())
        .map(|e| e.payload["newQuantity"].as_i64().unwrap_or(-1))
        .collect()
}

/// The admin API of `relay` on a free port, with an `AdminClient` for it.
async fn admin(relay: &RunningRelay, consumer: &str) -> (AdminClient, oneshot::Sender<()>) {
    let state = AdminState {
        failed: relay.relay.failed_events(),
        consumer: consumer.to_owned(),
        token: Arc::from(TOKEN),
        health: relay.relay.health(),
        metrics: relay.relay.metrics(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("local address"));
    let (shutdown, stop) = oneshot::channel::<()>();
    tokio::spawn(serve(listener, router(state), async {
        let _ = stop.await;
    }));
    let client = AdminClient::new(&base, TOKEN.to_owned()).expect("admin client");
    (client, shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_event_is_retried_then_dead_lettered_while_other_aggregates_keep_flowing_and_admin_can_retry_and_resolve_it()
 {
    const CONSUMER: &str = "rabbit-poison";
    let (db, publisher) = publisher("relay_poison").await;
    let exchange = unique_name("poison");
    let queue = format!("{exchange}-stock");
    let dlq = format!("{exchange}.dlq");
    let broker = rabbit_config(&exchange, &queue, "inventory.StockLevelChanged", json!({}));
    let routing = json!({"strategy": "perEventType", "template": "inventory.{eventType}"});
    let mut config = relay_config(CONSUMER, broker, routing);
    // maxAttempts 4 as in the harness; a 250 ms first delay (250, 500, 1000 ms) leaves a clear
    // window in which the poison is still retrying while other aggregates flow.
    config.retry.initial_interval_ms = 250;
    let relay = start_relay(&db, config, "p1").await;
    let rabbit = Rabbit::connect().await;
    rabbit.wait_for_queue(&queue).await;

    // The poison: a Stockout, a type no queue is bound for (mandatory: returned, retriable).
    let p = Uuid::now_v7();
    let poison = publish(&publisher, &db, stockout(p)).await;
    wait_for_status(&db, CONSUMER, poison.event_id, "retrying", Duration::from_secs(10)).await;

    // Then P's later events and other aggregates' events.
    let others: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let mut sent = Vec::new();
    for sequence in 1..=3 {
        sent.push(publish(&publisher, &db, stock_changed(p, sequence)).await);
        for item in &others {
            sent.push(publish(&publisher, &db, stock_changed(*item, sequence)).await);
        }
    }
    let written_at = Instant::now();
    let mut received = Vec::new();
    rabbit
        .collect_until(
            &queue,
            &mut received,
            Duration::from_secs(5),
            "the other aggregates' events",
            |r| r.iter().filter(|e| e.aggregate_id != p.to_string()).count() == 15,
        )
        .await;
    eprintln!(
        "other aggregates' 15 events arrived {:?} after writing",
        written_at.elapsed()
    );
    let (status, attempts, _) = failed_row(&db, CONSUMER, poison.event_id).await.expect("poison row");
    assert_eq!(
        status, "retrying",
        "others flowed while the poison was still retrying (attempt {attempts})"
    );
    assert!(
        aggregate_of(&received, p).is_empty(),
        "P's later events were held behind the poison"
    );

    // Dead-lettered after exactly maxAttempts attempts.
    wait_for_status(&db, CONSUMER, poison.event_id, "dead_lettered", Duration::from_secs(10)).await;
    let (_, attempts, last_error) = failed_row(&db, CONSUMER, poison.event_id).await.expect("poison row");
    assert_eq!(attempts, 4, "maxAttempts attempts");
    let last_error = last_error.unwrap_or_default();
    assert!(last_error.contains("no queue bound"), "{last_error}");
    let dead = rabbit
        .wait_for_message(&dlq, poison.event_id, Duration::from_secs(5))
        .await;
    assert_eq!(decode(&dead).event_id, poison.event_id);
    let reason = match header(&dead, "x-dead-letter-reason") {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("x-dead-letter-reason header: {other:?}"),
    };
    assert!(reason.contains("no queue bound"), "{reason}");
    let stockout_labels = ["event_type=\"Stockout\""];
    assert_eq!(
        metric(&relay, "outbox_relay_events_retried_total", &stockout_labels),
        Some(3.0)
    );
    assert_eq!(
        metric(&relay, "outbox_relay_events_dead_lettered_total", &stockout_labels),
        Some(1.0)
    );

    // Then P's held events, in order, after the dead-lettering.
    rabbit
        .collect_until(&queue, &mut received, Duration::from_secs(10), "P's held events", |r| {
            aggregate_of(r, p).len() == 3
        })
        .await;
    assert_delivered(&sent, &received, false);
    // The broker hands P's events to the queue before the relay records them as delivered:
    // wait for the rows before comparing their release times with the dead-lettering.
    eventually(
        Duration::from_secs(10),
        "P's held rows to be marked delivered",
        async || {
            let states: Vec<String> = sqlx::query_scalar(
                "SELECT status FROM outbox.failed_events WHERE consumer = $1 AND aggregate_id = $2 AND event_id <> $3",
            )
            .bind(CONSUMER)
            .bind(p.to_string())
            .bind(poison.event_id)
            .fetch_all(&db.pool)
            .await
            .expect("read P's held rows");
            eprintln!("P's held rows: {states:?}");
            states.len() == 3 && states.iter().all(|s| s == "delivered")
        },
    )
    .await;
    let released_early: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox.failed_events h, outbox.failed_events d \
         WHERE h.consumer = $1 AND d.consumer = $1 AND d.event_id = $2 AND h.aggregate_id = d.aggregate_id \
           AND h.event_id <> d.event_id AND (h.status <> 'delivered' OR h.resolved_at < d.last_attempt_at)",
    )
    .bind(CONSUMER)
    .bind(poison.event_id)
    .fetch_one(&db.pool)
    .await
    .expect("compare release times");
    let held: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox.failed_events WHERE consumer = $1 AND aggregate_id = $2")
            .bind(CONSUMER)
            .bind(p.to_string())
            .fetch_one(&db.pool)
            .await
            .expect("count P's rows");
    assert_eq!(held, 4, "the poison and P's three held events");
    assert_eq!(
        released_early, 0,
        "P's events were released after the poison was dead-lettered"
    );

    // The admin API lists the poison with its last error and resolves it.
    let (client, shutdown) = admin(&relay, CONSUMER).await;
    let dead_lettered = ListFailedParams {
        statuses: vec![FailedEventStatus::DeadLettered],
        ..Default::default()
    };
    let page = client.list_failed(&dead_lettered).await.expect("list");
    assert_eq!(page.items.len(), 1, "{:?}", page.items);
    let listed = &page.items[0];
    assert_eq!(
        (listed.event_id, listed.attempts, listed.event_type.as_str()),
        (poison.event_id, 4, "Stockout")
    );
    assert!(
        listed
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("no queue bound")),
        "{listed:?}"
    );
    let reason = "stockouts are not consumed from this exchange";
    let previous = client.resolve(poison.event_id, reason).await.expect("resolve");
    assert_eq!(previous.status, FailedEventStatus::DeadLettered);
    let resolved = client
        .list_failed(&ListFailedParams {
            statuses: vec![FailedEventStatus::Resolved],
            ..Default::default()
        })
        .await
        .expect("list resolved");
    assert_eq!(resolved.items.len(), 1);
    assert_eq!(resolved.items[0].event_id, poison.event_id);
    assert_eq!(resolved.items[0].resolution.as_deref(), Some(reason));

    // A second poison, dead-lettered, then retried by the admin once a queue is bound for it.
    let q = Uuid::now_v7();
    let low_stock = NewEvent::from_payload(&LowStockThresholdReached {
        inventory_item_id: q,
        warehouse_id: Uuid::nil(),
        current_quantity: 2,
        threshold: 5,
    })
    .expect("serialize payload");
    let second = publish(&publisher, &db, low_stock).await;
    wait_for_status(&db, CONSUMER, second.event_id, "dead_lettered", Duration::from_secs(10)).await;
    let low_queue = format!("{exchange}-low-stock");
    rabbit
        .channel
        .queue_declare(
            low_queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare queue");
    rabbit
        .channel
        .queue_bind(
            low_queue.as_str().into(),
            exchange.as_str().into(),
            "inventory.LowStockThresholdReached".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind queue");
    let retried = client.retry(second.event_id).await.expect("retry");
    assert_eq!(
        (retried.previous_status, retried.previous_attempts, retried.scheduled),
        (FailedEventStatus::DeadLettered, 4, true)
    );
    let delivered = rabbit
        .wait_for_message(&low_queue, second.event_id, Duration::from_secs(10))
        .await;
    assert_eq!(decode(&delivered).event_type, "LowStockThresholdReached");
    wait_for_status(&db, CONSUMER, second.event_id, "delivered", Duration::from_secs(5)).await;

    let _ = shutdown.send(());
    relay.stop().await;
    rabbit.delete(&exchange, &[&queue, &dlq, &low_queue]).await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_above_max_message_bytes_is_dead_lettered_after_one_attempt_while_others_flow() {
    const CONSUMER: &str = "rabbit-oversized";
    let (db, publisher) = publisher("relay_oversized").await;
    let exchange = unique_name("oversized");
    let queue = format!("{exchange}-all");
    let dlq = format!("{exchange}.dlq");
    let broker = rabbit_config(&exchange, &queue, "inventory.#", json!({"maxMessageBytes": 2048}));
    let routing = json!({"strategy": "perEventType", "template": "inventory.{eventType}"});
    let relay = start_relay(&db, relay_config(CONSUMER, broker, routing), "o1").await;
    let rabbit = Rabbit::connect().await;
    rabbit.wait_for_queue(&queue).await;

    let x = Uuid::now_v7();
    let mut big = stock_changed(x, 1);
    big.payload["note"] = json!("x".repeat(4096));
    let big = publish(&publisher, &db, big).await;
    let after_big = publish(&publisher, &db, stock_changed(x, 2)).await;
    let others: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let mut sent = Vec::new();
    for sequence in 1..=3 {
        for item in &others {
            sent.push(publish(&publisher, &db, stock_changed(*item, sequence)).await);
        }
    }

    wait_for_status(&db, CONSUMER, big.event_id, "dead_lettered", Duration::from_secs(10)).await;
    let (_, attempts, last_error) = failed_row(&db, CONSUMER, big.event_id).await.expect("row");
    assert_eq!(attempts, 1, "a permanent failure is not retried");
    let last_error = last_error.unwrap_or_default();
    assert!(last_error.contains("maxMessageBytes"), "{last_error}");
    let dead = rabbit
        .wait_for_message(&dlq, big.event_id, Duration::from_secs(5))
        .await;
    assert!(dead.delivery.data.is_empty(), "the oversized body is left out");
    assert_eq!(
        header(&dead, "x-dead-letter-body-omitted"),
        Some(AMQPValue::Boolean(true))
    );

    let mut received = Vec::new();
    rabbit
        .collect_until(
            &queue,
            &mut received,
            Duration::from_secs(10),
            "the other events",
            |r| r.len() == sent.len() + 1,
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    received.extend(rabbit.drain(&queue).await);
    // The aggregate is not blocked by a dead-lettered event: its next event flows.
    assert_eq!(aggregate_of(&received, x), vec![2]);
    assert!(received.iter().any(|e| e.event_id == after_big.event_id));
    let others_received: Vec<DomainEvent> = received
        .into_iter()
        .filter(|e| e.aggregate_id != x.to_string())
        .collect();
    assert_delivered(&sent, &others_received, false);
    let labels = ["event_type=\"StockLevelChanged\"", "kind=\"permanent\""];
    assert_eq!(metric(&relay, "outbox_relay_events_failed_total", &labels), Some(1.0));
    assert_eq!(
        metric(
            &relay,
            "outbox_relay_events_retried_total",
            &["event_type=\"StockLevelChanged\""]
        ),
        None,
        "no retries"
    );

    relay.stop().await;
    rabbit.delete(&exchange, &[&queue, &dlq]).await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poisons_successors_written_in_the_same_transaction_wait_behind_it() {
    const CONSUMER: &str = "rabbit-same-batch";
    let (db, publisher) = publisher("relay_same_batch").await;
    let exchange = unique_name("samebatch");
    let queue = format!("{exchange}-stock");
    let broker = rabbit_config(&exchange, &queue, "inventory.StockLevelChanged", json!({}));
    let routing = json!({"strategy": "perEventType", "template": "inventory.{eventType}"});
    let relay = start_relay(&db, relay_config(CONSUMER, broker, routing), "s1").await;
    let rabbit = Rabbit::connect().await;
    rabbit.wait_for_queue(&queue).await;

    let p = Uuid::now_v7();
    let mut tx = db.pool.begin().await.expect("begin");
    let events = publisher
        .publish_events(&mut tx, vec![stockout(p), stock_changed(p, 1), stock_changed(p, 2)])
        .await
        .expect("publish");
    tx.commit().await.expect("commit");
    wait_for_status(&db, CONSUMER, events[0].event_id, "retrying", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let early = rabbit.drain(&queue).await;
    let dead_lettered = failed_row(&db, CONSUMER, events[0].event_id)
        .await
        .is_some_and(|(s, _, _)| s == "dead_lettered");
    let result = if !dead_lettered && !early.is_empty() {
        Err(format!(
            "{} of P's later events arrived while the poison was still retrying",
            early.len()
        ))
    } else {
        Ok(())
    };

    relay.stop().await;
    rabbit.delete(&exchange, &[&queue, &format!("{exchange}.dlq")]).await;
    db.drop().await;
    result.unwrap();
}
