//! Issue 9's acceptance for RabbitMQ and SNS/SQS (moto), end to end under the in-cluster
//! operator: topology provisioned by the relay Pods, committed events delivered, status Ready
//! with the database's counts, and `deletionPolicy: Delete` removing what the publisher created.

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::options::{BasicGetOptions, ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::json;

use super::e2e::E2e;
use crate::support::{amqp_url, aws_endpoint, aws_sdk_config, unique_name};

const EVENTS: i64 = 30;

async fn amqp_channel() -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = conn.create_channel().await.expect("channel");
    (conn, channel)
}

/// Whether the queue and the exchange exist (a failed passive declare closes its channel, so
/// each check gets a fresh one).
async fn rabbit_exists(queue: &str, exchange: &str) -> (bool, bool) {
    let (conn, ch) = amqp_channel().await;
    let passive_queue = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let queue_exists = ch
        .queue_declare(queue.into(), passive_queue, FieldTable::default())
        .await
        .is_ok();
    let ch = conn.create_channel().await.expect("channel");
    let passive_exchange = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let exchange_exists = ch
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            passive_exchange,
            FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = conn.close(0, "done".into()).await;
    (queue_exists, exchange_exists)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_publisher_under_the_in_cluster_operator_delivers_reports_and_deletes_its_topology() {
    let e2e = E2e::start("op-rabbit", 1).await;
    e2e.secret("orders-amqp", json!({"url": amqp_url()})).await;
    let exchange = unique_name("op-e2e");
    let queue = format!("{exchange}.all");
    e2e.create_publisher(
        "orders",
        json!({
            "broker": {"rabbitmq": {"urlSecretRef": {"name": "orders-amqp", "key": "url"}, "exchange": exchange}},
            "routing": {"strategy": "single", "destination": "inventory.stock"},
            "topology": {"rabbitmq": {"queues": [{"name": queue, "bindingKey": "inventory.#"}]}},
            "deletionPolicy": "Delete",
            "replicas": 1
        }),
    )
    .await;
    e2e.relays_ready("orders", 1).await;
    assert_eq!(
        rabbit_exists(&queue, &exchange).await,
        (true, true),
        "provisioned queue and exchange"
    );

    let sent = e2e.commit_events(EVENTS).await;
    let (_conn, ch) = amqp_channel().await;
    let mut received = BTreeSet::new();
    e2e.eventually(Duration::from_secs(90), "every event in the bound queue", async || {
        while let Some(m) = ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .map_err(|e| e.to_string())?
        {
            if let Some(id) = m.delivery.properties.message_id() {
                received.insert(id.to_string());
            }
        }
        if sent.is_subset(&received) {
            Ok(())
        } else {
            Err(format!(
                "{} of {} received",
                sent.intersection(&received).count(),
                sent.len()
            ))
        }
    })
    .await;
    assert_eq!(e2e.database_counts().await, (EVENTS, 0, 0));
    let status = e2e.ready_matching_database("orders", 1).await;
    let provisioned: BTreeSet<(String, String)> = status
        .provisioned_resources
        .iter()
        .map(|r| (r.kind.clone(), r.name.clone()))
        .collect();
    assert!(
        provisioned.contains(&("rabbitmqQueue".to_owned(), queue.clone()))
            && provisioned.contains(&("rabbitmqExchange".to_owned(), exchange.clone())),
        "{status:?}"
    );
    e2e.assert_row("orders", ["True", "rabbitmq", "Closed", "1/1", "0", "0"])
        .await;

    // Delete: the cleanup Job removes the exchange and the queue, then the finalizer lets go.
    e2e.delete_publisher("orders", Duration::from_secs(120)).await;
    assert_eq!(
        rabbit_exists(&queue, &exchange).await,
        (false, false),
        "deletionPolicy Delete removes the queue and the exchange"
    );
    e2e.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqs_publisher_under_the_in_cluster_operator_delivers_reports_and_deletes_its_queues() {
    let e2e = E2e::start("op-sqs", 1).await;
    e2e.secret("orders-aws", json!({"accessKeyId": "test", "secretAccessKey": "test"}))
        .await;
    let queue = unique_name("op-e2e");
    let dlq = format!("{queue}-dlq");
    e2e.create_publisher(
        "orders",
        json!({
            "broker": {"snsSqs": {"region": "us-east-1", "endpointUrl": aws_endpoint(), "target": "sqs",
                                  "credentialsSecretRef": {"name": "orders-aws"}}},
            "routing": {"strategy": "single", "destination": queue},
            "deadLetter": {"destination": dlq},
            "deletionPolicy": "Delete",
            "replicas": 1
        }),
    )
    .await;
    e2e.relays_ready("orders", 1).await;
    let sqs = aws_sdk_sqs::Client::new(&aws_sdk_config().await);
    let queue_url = |name: String| {
        let sqs = sqs.clone();
        async move {
            sqs.get_queue_url()
                .queue_name(name)
                .send()
                .await
                .ok()
                .and_then(|o| o.queue_url)
        }
    };
    let url = queue_url(queue.clone()).await.expect("provisioned queue");
    assert!(queue_url(dlq.clone()).await.is_some(), "provisioned dead-letter queue");

    let sent = e2e.commit_events(EVENTS).await;
    let mut received = BTreeSet::new();
    e2e.eventually(Duration::from_secs(90), "every event in the queue", async || {
        let out = sqs
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        for m in out.messages.unwrap_or_default() {
            let doc: serde_json::Value =
                serde_json::from_str(m.body.as_deref().unwrap_or_default()).unwrap_or_default();
            if let Some(id) = doc["id"].as_str() {
                received.insert(id.to_owned());
            }
            if let Some(handle) = m.receipt_handle {
                let _ = sqs.delete_message().queue_url(&url).receipt_handle(handle).send().await;
            }
        }
        if sent.is_subset(&received) {
            Ok(())
        } else {
            Err(format!(
                "{} of {} received",
                sent.intersection(&received).count(),
                sent.len()
            ))
        }
    })
    .await;
    assert_eq!(e2e.database_counts().await, (EVENTS, 0, 0));
    let status = e2e.ready_matching_database("orders", 1).await;
    let provisioned: BTreeSet<String> = status.provisioned_resources.iter().map(|r| r.name.clone()).collect();
    assert!(provisioned.contains(&queue) && provisioned.contains(&dlq), "{status:?}");
    e2e.assert_row("orders", ["True", "snsSqs", "Closed", "1/1", "0", "0"])
        .await;

    e2e.delete_publisher("orders", Duration::from_secs(120)).await;
    e2e.eventually(
        Duration::from_secs(30),
        "queues gone after deletionPolicy Delete",
        async || match (queue_url(queue.clone()).await, queue_url(dlq.clone()).await) {
            (None, None) => Ok(()),
            other => Err(format!("still there: {other:?}")),
        },
    )
    .await;
    e2e.finish().await;
}

fn stockout(item: uuid::Uuid) -> inventory_outbox::event::NewEvent {
    inventory_outbox::event::NewEvent::from_payload(&inventory_outbox::event::inventory::Stockout {
        inventory_item_id: item,
        warehouse_id: uuid::Uuid::nil(),
        unfulfilled_quantity: Some(3),
    })
    .expect("serialize payload")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_events_show_failed_and_dead_lettered_counts_matching_the_database() {
    const POISON: usize = 3;
    let e2e = E2e::start("op-poison", 1).await;
    e2e.secret("orders-amqp", json!({"url": amqp_url()})).await;
    let exchange = unique_name("op-poison");
    let queue = format!("{exchange}.stock");
    e2e.create_publisher(
        "orders",
        json!({
            "broker": {"rabbitmq": {"urlSecretRef": {"name": "orders-amqp", "key": "url"}, "exchange": exchange}},
            // Only stock changes have a queue: a Stockout is returned unroutable (mandatory),
            // retried, then dead-lettered.
            "routing": {"strategy": "perEventType", "template": "inventory.{eventType}"},
            "topology": {"rabbitmq": {"queues": [{"name": queue, "bindingKey": "inventory.StockLevelChanged"}]}},
            "deadLetter": {"destination": format!("{exchange}.dlx"), "queue": format!("{exchange}.dlq")},
            "retry": {"initialIntervalMs": 200, "maxIntervalMs": 1000, "maxAttempts": 2},
            "deletionPolicy": "Delete",
            "replicas": 1
        }),
    )
    .await;
    e2e.relays_ready("orders", 1).await;
    e2e.commit_events(10).await;
    let store = inventory_outbox::store::Store::from_pool(e2e.db.pool.clone(), Default::default());
    let publisher = inventory_outbox::publisher::InventoryEventPublisher::setup(store, Default::default())
        .await
        .expect("publisher");
    for _ in 0..POISON {
        let mut tx = e2e.db.pool.begin().await.expect("begin");
        publisher
            .publish_event(&mut tx, stockout(uuid::Uuid::now_v7()))
            .await
            .expect("publish poison");
        tx.commit().await.expect("commit");
    }
    e2e.eventually(
        Duration::from_secs(90),
        "poison events dead-lettered in the database",
        async || {
            let (_, failed, dead) = e2e.database_counts().await;
            if dead == POISON as i64 {
                Ok(())
            } else {
                Err(format!("{failed} failed, {dead} dead-lettered"))
            }
        },
    )
    .await;
    let status = e2e
        .eventually(
            Duration::from_secs(60),
            "status counts equal the database's",
            async || {
                let (_, failed, dead) = e2e.database_counts().await;
                let s = e2e
                    .publishers
                    .get("orders")
                    .await
                    .map_err(|e| e.to_string())?
                    .status
                    .unwrap_or_default();
                if s.failed_event_count == Some(failed)
                    && s.dead_lettered_count == Some(dead)
                    && s.pending_events == Some(0)
                {
                    Ok(s)
                } else {
                    Err(format!("database {failed} failed / {dead} dead-lettered; status {s:?}"))
                }
            },
        )
        .await;
    assert_eq!(status.dead_lettered_count, Some(POISON as i64), "{status:?}");
    // The start of dead-lettering is told once, as a Warning; once no more arrive the
    // condition says so, and the reconciles since have told nothing more.
    let settled = e2e
        .eventually(
            Duration::from_secs(60),
            "DeadLettering False once no more events are dead-lettered",
            async || {
                let p = e2e.publishers.get("orders").await.map_err(|e| e.to_string())?;
                match super::e2e::condition(&p, "DeadLettering").as_deref() {
                    Some("False") => Ok(p),
                    other => Err(format!("DeadLettering {other:?}; status {:?}", p.status)),
                }
            },
        )
        .await;
    let events: kube::Api<k8s_openapi::api::events::v1::Event> = kube::Api::namespaced(e2e.admin.clone(), &e2e.tenant);
    let started: Vec<_> = events
        .list(&Default::default())
        .await
        .expect("list Events")
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("orders")
                && e.reason.as_deref() == Some("DeadLetteringStarted")
        })
        .collect();
    assert_eq!(
        started.len(),
        1,
        "one DeadLetteringStarted Event: {started:?}; {:?}",
        settled.status
    );
    let event = &started[0];
    assert_eq!(event.type_.as_deref(), Some("Warning"), "{event:?}");
    assert!(
        event.series.is_none() && event.deprecated_count.unwrap_or(1) <= 1,
        "told once, not once per reconcile: {event:?}"
    );
    assert!(
        event.note.as_deref().is_some_and(|n| n.contains("dead-lettered")),
        "{event:?}"
    );
    // The operator's queue gauges are served next to the reconcile counters.
    let metrics = e2e.operator.metrics(&e2e.admin).await;
    for name in [
        "outbox_operator_reconcile_queue_depth{kind=\"EventPublisher\"}",
        "outbox_operator_reconciles_in_flight{kind=\"EventPublisher\"}",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from the operator's /metrics:\n{metrics}"
        );
    }
    let (rows, table) = e2e.kubectl_table().await;
    assert!(
        rows.iter()
            .any(|r| r.first().map(String::as_str) == Some("orders") && r.get(6).map(String::as_str) == Some("3")),
        "FAILED column shows the 3 dead-lettered events: {table}"
    );
    e2e.delete_publisher("orders", Duration::from_secs(120)).await;
    e2e.finish().await;
}
