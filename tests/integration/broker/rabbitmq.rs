//! The RabbitMQ adapter against the real broker: order, CloudEvents encoding both ways,
//! unroutable messages, dead letters, size limit, unreachable broker and reconnection.

use std::sync::Arc;
use std::time::Duration;

use inventory_outbox::broker::rabbitmq::{
    DEAD_LETTER_REASON_HEADER, ORIGINAL_ROUTING_KEY_HEADER, QueueBinding, RabbitMqBroker, RabbitMqConfig,
};
use inventory_outbox::broker::{Broker, CloudEventsMode, Message, SendError};
use inventory_outbox::event::cloudevents::{self, AMQP_PREFIX};
use inventory_outbox::event::validate::enrich;
use inventory_outbox::event::{DomainEvent, NewEvent};
use lapin::message::Delivery;
use lapin::options::{
    BasicGetOptions, BasicRejectOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::time::{Instant, sleep, timeout};

use crate::support::{amqp_url, unique_name};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

fn event(aggregate: &str, seq: u32) -> Arc<DomainEvent> {
    let draft = NewEvent::raw(
        "StockLevelChanged",
        "InventoryItem",
        aggregate,
        1,
        serde_json::json!({"sku": aggregate, "newQuantity": seq}),
    )
    .with_user_id("u-7");
    Arc::new(enrich(draft, "warehouse-svc", chrono::Utc::now()))
}

fn message(destination: &str, event: Arc<DomainEvent>) -> Message {
    Message {
        position: 0,
        destination: destination.to_owned(),
        event,
    }
}

/// A config for a fresh exchange, reading the URL from `AMQP_URL` (or the stack's default).
fn config(prefix: &str) -> RabbitMqConfig {
    RabbitMqConfig::new("AMQP_URL", unique_name(prefix))
}

fn broker(config: RabbitMqConfig) -> RabbitMqBroker {
    RabbitMqBroker::new_with_env(config, |name| (name == "AMQP_URL").then(amqp_url)).expect("valid configuration")
}

/// A config with one consumer queue bound with `inventory.#`; returns it and the queue name.
fn config_with_queue(prefix: &str) -> (RabbitMqConfig, String) {
    let mut config = config(prefix);
    let queue = format!("{}.stock", config.exchange);
    config.queues = vec![QueueBinding {
        name: queue.clone(),
        binding_key: "inventory.#".to_owned(),
    }];
    (config, queue)
}

/// The test's own consumer connection.
struct Consumer {
    connection: Connection,
    channel: Channel,
}

impl Consumer {
    async fn open() -> Self {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ (is `make env-up` done?)");
        let channel = connection.create_channel().await.unwrap();
        Self { connection, channel }
    }

    /// Gets `n` messages from `queue`, waiting at most 10 s for them.
    async fn get(&self, queue: &str, n: usize, no_ack: bool) -> Vec<Delivery> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack })
                .await
                .unwrap()
            {
                Some(message) => got.push(message.delivery),
                None if Instant::now() < deadline => sleep(Duration::from_millis(50)).await,
                None => panic!("only {} of {n} messages arrived in {queue}", got.len()),
            }
        }
        got
    }

    async fn assert_empty(&self, queue: &str) {
        let extra = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        assert!(extra.is_none(), "unexpected message in {queue}");
    }

    /// Removes what the adapter declared for `config`.
    async fn clean_up(self, config: &RabbitMqConfig) {
        let mut queues: Vec<String> = config.queues.iter().map(|q| q.name.clone()).collect();
        queues.push(config.dead_letter_queue());
        for queue in queues {
            let _ = self
                .channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in [config.exchange.clone(), config.dead_letter_exchange()] {
            let _ = self
                .channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = self.connection.close(200, "done".into()).await;
    }
}

fn header<'a>(delivery: &'a Delivery, name: &str) -> Option<&'a AMQPValue> {
    delivery.properties.headers().as_ref()?.inner().get(name)
}

fn header_str(delivery: &Delivery, name: &str) -> Option<String> {
    match header(delivery, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// AMQP headers as the `(name, value)` pairs `cloudevents::from_binary` reads; the AMQP
/// binding carries `datacontenttype` in the content-type property, added back here.
fn binary_headers(delivery: &Delivery) -> Vec<(String, String)> {
    let table = delivery.properties.headers().clone().unwrap_or_default();
    let mut pairs: Vec<(String, String)> = table
        .inner()
        .iter()
        .filter_map(|(k, v)| match v {
            AMQPValue::LongString(s) => Some((k.to_string(), String::from_utf8_lossy(s.as_bytes()).into_owned())),
            _ => None,
        })
        .collect();
    if let Some(content_type) = delivery.properties.content_type() {
        pairs.push(("content-type".to_owned(), content_type.to_string()));
    }
    pairs
}

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    timeout(TEST_TIMEOUT, test).await.expect("test finished in time")
}

#[tokio::test]
async fn a_batch_over_many_aggregates_arrives_in_send_order_and_decodes_back_to_its_events() {
    bounded(async {
        let (config, queue) = config_with_queue("rmq-order");
        let broker = broker(config.clone());
        assert_eq!(broker.kind(), "rabbitmq");
        broker.ensure_destinations(&[]).await.unwrap();
        broker
            .ensure_destinations(&["inventory.StockLevelChanged".to_owned()])
            .await
            .unwrap();
        broker.check_health().await.unwrap();

        let destinations = ["inventory.StockLevelChanged", "inventory.InventoryItem"];
        let messages: Vec<Message> = (0..300u32)
            .map(|i| {
                let aggregate = format!("item-{}", i % 15);
                message(destinations[i as usize % 2], event(&aggregate, i))
            })
            .collect();
        let results = broker.send_batch(&messages).await;
        assert_eq!(results.len(), messages.len());
        for (i, result) in results.iter().enumerate() {
            assert_eq!(result, &Ok(()), "message {i}");
        }

        let consumer = Consumer::open().await;
        let got = consumer.get(&queue, messages.len(), true).await;
        for (sent, delivery) in messages.iter().zip(&got) {
            let e = &sent.event;
            assert_eq!(
                delivery.properties.message_id().as_ref().map(|id| id.to_string()),
                Some(e.event_id.to_string()),
                "messages arrive in send order"
            );
            assert_eq!(delivery.routing_key.as_str(), sent.destination);
            assert_eq!(*delivery.properties.delivery_mode(), Some(2), "persistent");
            assert_eq!(
                delivery.properties.content_type().as_ref().map(|c| c.to_string()),
                Some("application/json".to_owned())
            );
            assert_eq!(
                delivery.properties.kind().as_ref().map(|t| t.to_string()),
                Some("StockLevelChanged".to_owned())
            );
            assert_eq!(
                *delivery.properties.timestamp(),
                u64::try_from(e.timestamp.timestamp()).ok()
            );
            let headers = binary_headers(delivery);
            let decoded = cloudevents::from_binary(&headers, &delivery.data, AMQP_PREFIX).unwrap();
            assert_eq!(&decoded, e.as_ref());
        }
        // Per aggregate, the positions came back strictly increasing.
        for aggregate in 0..15u32 {
            let seqs: Vec<u64> = got
                .iter()
                .filter(|d| header_str(d, "cloudEvents:subject") == Some(format!("item-{aggregate}")))
                .map(|d| {
                    serde_json::from_slice::<serde_json::Value>(&d.data).unwrap()["newQuantity"]
                        .as_u64()
                        .unwrap()
                })
                .collect();
            assert_eq!(seqs.len(), 20);
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "item-{aggregate}: {seqs:?}");
        }
        consumer.assert_empty(&queue).await;
        consumer.clean_up(&config).await;
    })
    .await;
}

#[tokio::test]
async fn structured_mode_sends_a_cloudevents_document_that_reads_back_as_the_event() {
    bounded(async {
        let (mut config, queue) = config_with_queue("rmq-structured");
        config.mode = CloudEventsMode::Structured;
        let broker = broker(config.clone());
        broker.ensure_destinations(&[]).await.unwrap();

        let sent = message("inventory.StockLevelChanged", event("item-1", 1));
        assert_eq!(broker.send_batch(std::slice::from_ref(&sent)).await, vec![Ok(())]);

        let consumer = Consumer::open().await;
        let got = consumer.get(&queue, 1, true).await;
        let delivery = &got[0];
        assert_eq!(
            delivery.properties.content_type().as_ref().map(|c| c.to_string()),
            Some("application/cloudevents+json".to_owned())
        );
        assert_eq!(*delivery.properties.delivery_mode(), Some(2));
        assert_eq!(
            delivery.properties.message_id().as_ref().map(|id| id.to_string()),
            Some(sent.event.event_id.to_string())
        );
        let doc: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
        assert_eq!(doc["specversion"], "1.0");
        assert_eq!(cloudevents::from_structured(&doc).unwrap(), *sent.event);
        consumer.clean_up(&config).await;
    })
    .await;
}

#[tokio::test]
async fn a_routing_key_without_a_bound_queue_fails_retriably_while_routable_messages_succeed() {
    bounded(async {
        let (config, queue) = config_with_queue("rmq-unroutable");
        assert!(config.mandatory, "mandatory is the default");
        let broker = broker(config.clone());
        broker.ensure_destinations(&[]).await.unwrap();

        let batch = vec![
            message("inventory.StockLevelChanged", event("item-1", 1)),
            message("nowhere.StockLevelChanged", event("item-2", 1)),
            message("inventory.StockLevelChanged", event("item-1", 2)),
            message("elsewhere.StockReserved", event("item-3", 1)),
            message("inventory.StockLevelChanged", event("item-1", 3)),
        ];
        let results = broker.send_batch(&batch).await;
        for i in [0, 2, 4] {
            assert_eq!(results[i], Ok(()), "routable message {i}");
        }
        for (i, key) in [(1, "nowhere.StockLevelChanged"), (3, "elsewhere.StockReserved")] {
            match &results[i] {
                Err(SendError::Transient(m)) => {
                    assert!(m.contains(&format!("no queue bound for routing key {key}")), "{m}")
                }
                other => panic!("message {i}: expected a retriable error, got {other:?}"),
            }
        }

        let consumer = Consumer::open().await;
        let got = consumer.get(&queue, 3, true).await;
        let ids: Vec<String> = got
            .iter()
            .filter_map(|d| d.properties.message_id().as_ref().map(|id| id.to_string()))
            .collect();
        let expected: Vec<String> = [0, 2, 4].iter().map(|&i| batch[i].event.event_id.to_string()).collect();
        assert_eq!(ids, expected);
        consumer.assert_empty(&queue).await;
        consumer.clean_up(&config).await;
    })
    .await;
}

/// With the whole batch queued on the channel before any confirm is awaited, a NACK still
/// fails exactly its own message: a full queue that rejects publishes (`x-overflow:
/// reject-publish`) NACKs the messages over its limit, and the messages around them, to
/// another queue, are confirmed and arrive in order.
#[tokio::test]
async fn a_full_queue_nacks_exactly_the_messages_over_its_limit_in_a_pipelined_batch() {
    bounded(async {
        let config = config("rmq-nack");
        let broker = broker(config.clone());
        broker.ensure_destinations(&[]).await.unwrap();
        let consumer = Consumer::open().await;
        let full = format!("{}.full", config.exchange);
        let open = format!("{}.open", config.exchange);
        for (queue, key, limited) in [(&full, "full.#", true), (&open, "open.#", false)] {
            let mut args = FieldTable::default();
            if limited {
                args.insert("x-max-length".into(), AMQPValue::LongInt(1));
                args.insert(
                    "x-overflow".into(),
                    AMQPValue::LongString(LongString::from("reject-publish")),
                );
            }
            consumer
                .channel
                .queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args)
                .await
                .unwrap();
            consumer
                .channel
                .queue_bind(
                    queue.as_str().into(),
                    config.exchange.as_str().into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }

        // 0 fills the limited queue; 2, 4 and 6 overflow it; the others go to the open queue.
        let batch: Vec<Message> = (0..8u32)
            .map(|i| {
                let key = if i % 2 == 0 {
                    "full.StockLevelChanged"
                } else {
                    "open.StockLevelChanged"
                };
                message(key, event(&format!("item-{i}"), i))
            })
            .collect();
        let results = broker.send_batch(&batch).await;
        for (i, result) in results.iter().enumerate() {
            match (i, result) {
                (0, Ok(())) => {}
                (i, Ok(())) if i % 2 == 1 => {}
                (i, Err(SendError::Transient(m))) if i % 2 == 0 => {
                    assert!(m.contains("NACKed"), "message {i}: {m}")
                }
                (i, other) => panic!("message {i}: unexpected result {other:?}; all: {results:?}"),
            }
        }
        let ids = |got: &[Delivery]| -> Vec<String> {
            got.iter()
                .filter_map(|d| d.properties.message_id().as_ref().map(|id| id.to_string()))
                .collect()
        };
        let expected_open: Vec<String> = [1, 3, 5, 7]
            .iter()
            .map(|&i| batch[i].event.event_id.to_string())
            .collect();
        assert_eq!(ids(&consumer.get(&open, 4, true).await), expected_open);
        assert_eq!(
            ids(&consumer.get(&full, 1, true).await),
            vec![batch[0].event.event_id.to_string()]
        );
        consumer.assert_empty(&full).await;
        for queue in [&full, &open] {
            let _ = consumer
                .channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        consumer.clean_up(&config).await;
    })
    .await;
}

#[tokio::test]
async fn a_dead_letter_lands_in_the_dead_letter_queue_with_its_reason() {
    bounded(async {
        let config = config("rmq-dlq");
        let broker = broker(config.clone());
        broker.ensure_destinations(&[]).await.unwrap();

        let dead = message("inventory.StockLevelChanged", event("item-9", 4));
        let reason = "retries exhausted: schema mismatch";
        broker.send_dead_letter(&dead, reason).await.unwrap();

        let consumer = Consumer::open().await;
        let got = consumer.get(&config.dead_letter_queue(), 1, true).await;
        let delivery = &got[0];
        assert_eq!(delivery.exchange.as_str(), config.dead_letter_exchange());
        assert_eq!(delivery.routing_key.as_str(), "inventory.StockLevelChanged");
        assert_eq!(header_str(delivery, DEAD_LETTER_REASON_HEADER).as_deref(), Some(reason));
        assert_eq!(
            header_str(delivery, ORIGINAL_ROUTING_KEY_HEADER).as_deref(),
            Some("inventory.StockLevelChanged")
        );
        let decoded = cloudevents::from_binary(&binary_headers(delivery), &delivery.data, AMQP_PREFIX).unwrap();
        assert_eq!(decoded, *dead.event);
        consumer.clean_up(&config).await;
    })
    .await;
}

#[tokio::test]
async fn a_message_a_consumer_rejects_is_dead_lettered_by_the_broker() {
    bounded(async {
        let (config, queue) = config_with_queue("rmq-reject");
        let broker = broker(config.clone());
        broker.ensure_destinations(&[]).await.unwrap();
        let sent = message("inventory.StockLevelChanged", event("item-5", 1));
        assert_eq!(broker.send_batch(std::slice::from_ref(&sent)).await, vec![Ok(())]);

        let consumer = Consumer::open().await;
        let got = consumer.get(&queue, 1, false).await;
        got[0].reject(BasicRejectOptions { requeue: false }).await.unwrap();
        let dead = consumer.get(&config.dead_letter_queue(), 1, true).await;
        assert_eq!(
            dead[0].properties.message_id().as_ref().map(|id| id.to_string()),
            Some(sent.event.event_id.to_string())
        );
        assert!(header(&dead[0], "x-death").is_some(), "the broker records why");
        consumer.clean_up(&config).await;
    })
    .await;
}

#[tokio::test]
async fn a_message_above_max_message_bytes_fails_permanently_without_being_sent() {
    bounded(async {
        let (mut config, queue) = config_with_queue("rmq-size");
        config.max_message_bytes = 1024;
        let broker = broker(config.clone());
        broker.ensure_destinations(&[]).await.unwrap();

        let big = NewEvent::raw(
            "StockLevelChanged",
            "InventoryItem",
            "item-1",
            1,
            serde_json::json!({"note": "x".repeat(2048)}),
        );
        let batch = vec![
            message(
                "inventory.StockLevelChanged",
                Arc::new(enrich(big, "svc", chrono::Utc::now())),
            ),
            message("inventory.StockLevelChanged", event("item-2", 1)),
        ];
        let results = broker.send_batch(&batch).await;
        match &results[0] {
            Err(SendError::Message(m)) => assert!(m.contains("exceeds rabbitmq.maxMessageBytes (1024)"), "{m}"),
            other => panic!("expected a permanent error, got {other:?}"),
        }
        assert_eq!(results[1], Ok(()));

        let consumer = Consumer::open().await;
        let got = consumer.get(&queue, 1, true).await;
        assert_eq!(
            got[0].properties.message_id().as_ref().map(|id| id.to_string()),
            Some(batch[1].event.event_id.to_string())
        );
        consumer.assert_empty(&queue).await;
        consumer.clean_up(&config).await;
    })
    .await;
}

#[tokio::test]
async fn a_broker_at_a_closed_port_is_a_retriable_failure() {
    bounded(async {
        let mut config = config("rmq-closed");
        config.url_env = None;
        config.url = Some("amqp://127.0.0.1:1/%2f".to_owned());
        config.connect_timeout_ms = 2_000;

        let err = RabbitMqBroker::connect(config.clone()).await.unwrap_err();
        assert!(err.is_retriable(), "{err}");
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");

        let broker = RabbitMqBroker::new(config).unwrap();
        assert!(broker.check_health().await.unwrap_err().is_retriable());
        assert!(broker.ensure_destinations(&[]).await.unwrap_err().is_retriable());
        let results = broker
            .send_batch(&[
                message("inventory.StockLevelChanged", event("item-1", 1)),
                message("inventory.StockLevelChanged", event("item-1", 2)),
            ])
            .await;
        assert_eq!(results.len(), 2);
        assert!(
            results.iter().all(|r| r.as_ref().is_err_and(SendError::is_retriable)),
            "{results:?}"
        );
        let dead = message("inventory.StockLevelChanged", event("item-1", 3));
        assert!(broker.send_dead_letter(&dead, "x").await.unwrap_err().is_retriable());
    })
    .await;
}

#[tokio::test]
async fn an_unset_url_variable_is_named_when_connecting() {
    let config = RabbitMqConfig::new("OUTBOX_TEST_NEVER_SET_AMQP_URL", unique_name("rmq-env"));
    let err = RabbitMqBroker::connect(config).await.unwrap_err();
    assert!(!err.is_retriable());
    assert_eq!(
        err.to_string(),
        "environment variable OUTBOX_TEST_NEVER_SET_AMQP_URL (rabbitmq.urlEnv) is not set"
    );
}

fn management_url() -> String {
    std::env::var("RABBITMQ_MANAGEMENT_URL").unwrap_or_else(|_| "http://127.0.0.1:15674".to_owned())
}

async fn management(method: &str, path: &str) -> String {
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "5", "-u", "outbox:outbox", "-X", method])
        .arg(format!("{}{path}", management_url()))
        .output()
        .await
        .expect("curl runs");
    assert!(
        output.status.success(),
        "{method} {path}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The management API's name of the connection whose client named itself `client_name`.
async fn server_connection_name(client_name: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let body = management("GET", "/api/connections").await;
        let connections: serde_json::Value = serde_json::from_str(&body).unwrap();
        let found = connections.as_array().into_iter().flatten().find_map(|c| {
            let name = c["name"].as_str()?;
            (c["client_properties"]["connection_name"] == client_name).then(|| name.to_owned())
        });
        match found {
            Some(name) => return name,
            None if Instant::now() < deadline => sleep(Duration::from_millis(200)).await,
            None => panic!("connection {client_name} not listed by the management API"),
        }
    }
}

#[tokio::test]
async fn the_adapter_reconnects_after_the_broker_closes_its_connection() {
    bounded(async {
        let (config, queue) = config_with_queue("rmq-reconnect");
        let broker = broker(config.clone());
        broker.ensure_destinations(&[]).await.unwrap();
        let first = message("inventory.StockLevelChanged", event("item-1", 1));
        assert_eq!(broker.send_batch(std::slice::from_ref(&first)).await, vec![Ok(())]);

        let server_name = server_connection_name(broker.connection_name()).await;
        management("DELETE", &format!("/api/connections/{}", percent_encode(&server_name))).await;

        // The next sends reconnect; at most a few fail (retriably) while the close lands.
        let second = message("inventory.StockLevelChanged", event("item-1", 2));
        let mut attempts = 0;
        loop {
            attempts += 1;
            match broker.send_batch(std::slice::from_ref(&second)).await.remove(0) {
                Ok(()) => break,
                Err(e) => {
                    assert!(e.is_retriable(), "{e}");
                    assert!(attempts < 10, "still failing after {attempts} attempts: {e}");
                    sleep(Duration::from_millis(200)).await;
                }
            }
        }
        broker.check_health().await.unwrap();

        let consumer = Consumer::open().await;
        let got = consumer.get(&queue, 2, true).await;
        let ids: Vec<String> = got
            .iter()
            .filter_map(|d| d.properties.message_id().as_ref().map(|id| id.to_string()))
            .collect();
        // A failed attempt may have reached the queue before its confirm was lost: at least once.
        assert_eq!(ids[0], first.event.event_id.to_string());
        assert_eq!(ids[1], second.event.event_id.to_string());
        consumer.clean_up(&config).await;
    })
    .await;
}

/// Whether the management API lists a connection whose client named itself `client_name`.
pub(crate) async fn connection_listed(client_name: &str) -> bool {
    let body = management("GET", "/api/connections").await;
    let connections: serde_json::Value = serde_json::from_str(&body).expect("the management API answers JSON");
    connections
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["client_properties"]["connection_name"] == client_name)
}

/// The local broker's log lines (`make env-up` sends its stdout to `logs/rabbitmq.log`).
pub(crate) fn broker_log() -> String {
    let path = crate::support::state_dir().join("logs/rabbitmq.log");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read the RabbitMQ log {}: {e}", path.display()))
}

/// How the broker logged the end of the connection named `client_name`: `Some(true)` for an
/// AMQP close, `Some(false)` for a dropped socket, `None` while it has not ended yet.
pub(crate) fn logged_close(log: &str, client_name: &str) -> Option<bool> {
    let marker = format!(" - {client_name},");
    let line = log
        .lines()
        .find(|l| l.contains("closing AMQP connection") && l.contains(&marker))?;
    // The Erlang process id after the level, e.g. `<0.8732.0>`, ties the follow-up line to it.
    let pid = line.split_whitespace().find(|w| w.starts_with("<0."))?;
    let abrupt = log
        .lines()
        .any(|l| l.contains(pid) && (l.contains("unexpectedly closed") || l.contains("missed heartbeats")));
    Some(!abrupt)
}

#[tokio::test]
async fn dropping_the_adapter_closes_its_connection_cleanly_so_the_broker_frees_it_at_once() {
    bounded(async {
        let (config, queue) = config_with_queue("rmq-close");
        let broker = broker(config.clone());
        broker.ensure_destinations(&[]).await.unwrap();
        let sent = message("inventory.StockLevelChanged", event("item-1", 1));
        assert_eq!(broker.send_batch(std::slice::from_ref(&sent)).await, vec![Ok(())]);
        let name = broker.connection_name().to_owned();
        server_connection_name(&name).await;

        // What a relay does when it stops or rebuilds its broker.
        drop(broker);

        // Well under the 60 s heartbeat timeout a leaked or half-open connection would take.
        let deadline = Instant::now() + Duration::from_secs(10);
        while connection_listed(&name).await {
            assert!(
                Instant::now() < deadline,
                "connection {name} still listed by the management API 10 s after the adapter was dropped"
            );
            sleep(Duration::from_millis(200)).await;
        }
        let clean = loop {
            let log = broker_log();
            match logged_close(&log, &name) {
                Some(clean) => break clean,
                None if Instant::now() < deadline => sleep(Duration::from_millis(200)).await,
                None => {
                    let tail: Vec<&str> = log.lines().rev().take(20).collect();
                    panic!("the broker logged no close of {name}; last lines: {tail:#?}");
                }
            }
        };
        let log = broker_log();
        let context: Vec<&str> = log.lines().filter(|l| l.contains(&name)).map(str::trim).collect();
        assert!(clean, "the broker saw {name} end without an AMQP close: {context:#?}");

        let consumer = Consumer::open().await;
        assert_eq!(consumer.get(&queue, 1, true).await.len(), 1);
        consumer.clean_up(&config).await;
    })
    .await;
}
