//! What the relay checks before and around a send: every destination the routing can name is
//! created at start (with the configured `min.insync.replicas`, the broker's default
//! replication), and a payload that fails its registered schema is dead-lettered with the
//! validation error and never published.

use std::time::Duration;

use inventory_outbox::event::{DomainEvent, cloudevents};
use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{eventually, relay_config, start_relay};
use crate::event_core::{publisher, stock_changed};
use crate::support::{amqp_url, kafka_bootstrap, unique_name};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_event_type_routing_creates_every_destination_at_start_with_min_insync_replicas() {
    let (db, _publisher) = publisher("relay_destinations").await;
    let prefix = unique_name("dest");
    let broker = json!({"kafka": {"bootstrapServers": kafka_bootstrap(), "deadLetterTopic": format!("{prefix}-dlq"),
                                  "partitions": 1, "minInsyncReplicas": 1}});
    let routing = json!({"strategy": "perEventType", "template": format!("{prefix}.{{eventType}}.v{{version}}")});
    let config = relay_config("destinations", broker, routing);
    let expected = config.routing.known_destinations();
    assert!(expected.len() >= 15, "{expected:?}");
    let relay = start_relay(&db, config, "d1").await;
    eventually(Duration::from_secs(30), "relay ready", async || {
        relay.relay.health().ready().is_ok()
    })
    .await;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .expect("admin client");
    let specifiers: Vec<ResourceSpecifier> = expected.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let described = admin
        .describe_configs(
            &specifiers,
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("describe topic configs");
    for (topic, result) in expected.iter().zip(described) {
        let resource = result.unwrap_or_else(|e| panic!("topic {topic} was not created at start: {e:?}"));
        let entry = resource
            .get("min.insync.replicas")
            .unwrap_or_else(|| panic!("topic {topic} has no min.insync.replicas entry"));
        assert_eq!(entry.value.as_deref(), Some("1"), "{topic}");
        assert!(
            !entry.is_default,
            "topic {topic}: min.insync.replicas was not set on the topic"
        );
    }
    relay.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payload_that_fails_its_registered_schema_is_dead_lettered_and_never_published() {
    const CONSUMER: &str = "schema-check";
    let (db, publisher) = publisher("relay_schema_check").await;
    let exchange = unique_name("schema");
    let queue = format!("{exchange}-all");
    let broker = json!({"rabbitmq": {"urlEnv": "AMQP_URL", "exchange": exchange, "mode": "structured",
                                     "queues": [{"name": queue, "bindingKey": "#"}]}});
    let relay = start_relay(
        &db,
        relay_config(
            CONSUMER,
            broker,
            json!({"strategy": "single", "destination": "inventory.stock"}),
        ),
        "s1",
    )
    .await;
    eventually(Duration::from_secs(15), "relay ready", async || {
        relay.relay.health().ready().is_ok()
    })
    .await;

    // A raw SQL writer: the right type and version, but the payload misses required fields.
    let bad_id = Uuid::now_v7();
    let item = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO outbox.events (event_id, event_type, event_version, aggregate_type, aggregate_id, \
             occurred_at, payload) VALUES ($1, 'StockLevelChanged', 1, 'InventoryItem', $2, now(), $3)",
    )
    .bind(bad_id)
    .bind(item.to_string())
    .bind(json!({"inventoryItemId": item, "newQuantity": "many"}))
    .execute(&db.pool)
    .await
    .expect("raw insert");
    let mut tx = db.pool.begin().await.expect("begin");
    let good = publisher
        .publish_event(&mut tx, stock_changed(Uuid::now_v7(), 1))
        .await
        .expect("publish");
    tx.commit().await.expect("commit");

    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    let mut received: Vec<DomainEvent> = Vec::new();
    eventually(Duration::from_secs(10), "the valid event", async || {
        while let Ok(Some(m)) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
        {
            let doc: Value = serde_json::from_slice(&m.delivery.data).expect("JSON");
            received.push(cloudevents::from_structured(&doc).expect("CloudEvent"));
        }
        received.iter().any(|e| e.event_id == good.event_id)
    })
    .await;
    let row: Option<(String, Option<String>)> =
        sqlx::query_as("SELECT status, last_error FROM outbox.failed_events WHERE consumer = $1 AND event_id = $2")
            .bind(CONSUMER)
            .bind(bad_id)
            .fetch_optional(&db.pool)
            .await
            .expect("failed row");
    assert!(
        received.iter().all(|e| e.event_id != bad_id),
        "the invalid payload was published"
    );
    let (status, error) = row.expect("the invalid event has a failed_events row");
    assert_eq!(status, "dead_lettered");
    let error = error.unwrap_or_default();
    assert!(error.contains("registered schema"), "{error}");

    relay.stop().await;
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = channel
        .queue_delete(format!("{exchange}.dlq").as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    db.drop().await;
}
