//! The relay in the Confluent wire format on the real Kafka: magic byte, the registry's id for
//! exactly the event's type and version, the JSON payload, CloudEvents attributes in headers.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use inventory_outbox::broker::confluent;
use inventory_outbox::delivery::{Engine, EngineError};
use inventory_outbox::relay::config::RelayConfig;
use inventory_outbox::schema::compatibility::CompatibilityMode;
use inventory_outbox::schema::registry::VersionSelector;
use inventory_outbox::store::{SchemaName, Store};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message as _};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::relay::{relay_config, write_events};
use crate::support::postgres::TestDatabase;
use crate::support::{kafka_bootstrap, unique_name};

/// A relay publishing in the Confluent wire format, in this process.
pub struct FramedRelay {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), EngineError>>,
}

impl FramedRelay {
    /// Starts a relay for `topic` with the given subject name strategy.
    pub async fn start(db: &TestDatabase, topic: &str, strategy: &str) -> Self {
        let config = framed_config(topic, strategy, "binary");
        inventory_outbox::tls::install_crypto_provider();
        let store = Store::from_pool(db.pool.clone(), SchemaName::default());
        let broker = config
            .broker
            .connect_with_registry(&store)
            .await
            .expect("connect framed broker");
        let relay = Arc::new(Engine::new(config, store, broker, "framed-w1"));
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(relay.run(shutdown));
        Self { stop, task }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.await.expect("relay task").expect("relay stopped cleanly");
    }
}

fn framed_config(topic: &str, strategy: &str, mode: &str) -> RelayConfig {
    let broker = json!({"kafka": {
        "bootstrapServers": kafka_bootstrap(),
        "deadLetterTopic": format!("{topic}-dlq"),
        "partitions": 3,
        "mode": mode,
        "wireFormat": {"format": "confluent", "subjectNameStrategy": strategy},
    }});
    relay_config(
        &format!("framed-{strategy}"),
        broker,
        json!({"strategy": "single", "destination": topic}),
    )
}

/// One consumed record: schema id, payload and headers.
struct Framed {
    schema_id: u32,
    payload: Value,
    headers: Vec<(String, String)>,
}

async fn consume(topic: &str, count: usize) -> Vec<Framed> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", unique_name("framed-test"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let collect = async {
        while out.len() < count {
            let m = crate::support::next_record(&consumer).await;
            let value = m.payload().unwrap_or_default();
            let (schema_id, body) = confluent::unframe(value).unwrap_or_else(|e| panic!("record {}: {e}", m.offset()));
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            let value = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                            (h.key.to_owned(), value.unwrap_or_default())
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Framed {
                schema_id,
                payload: serde_json::from_slice(body).expect("JSON payload after the header"),
                headers,
            });
        }
    };
    let received = tokio::time::timeout(Duration::from_secs(60), collect).await;
    assert!(
        received.is_ok(),
        "only {} of {count} framed records within 60 s",
        out.len()
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_frames_values_with_the_registry_id_of_the_event_type_and_version() {
    let (db, publisher) = crate::event_core::publisher("registry_wire").await;
    let topic = unique_name("framed");
    // A soft-deleted version keeps its id: events written with it still get framed.
    let deleted = publisher
        .registry()
        .delete_version("StockLevelChanged", VersionSelector::Number(1), false)
        .await
        .expect("soft delete");
    assert_eq!(deleted, 1);
    let relay = FramedRelay::start(&db, &topic, "recordName").await;
    let sent = write_events(&publisher, &db, 2, 25, 10).await;
    let records = consume(&topic, sent.len()).await;
    relay.stop().await;

    let expected_id = publisher
        .registry()
        .schema_id("StockLevelChanged", 1)
        .await
        .expect("schema id")
        .expect("StockLevelChanged v1 is registered");
    let sent_ids: HashSet<String> = sent.iter().map(|e| e.event_id.to_string()).collect();
    let mut seen = HashSet::new();
    for record in &records {
        assert_eq!(record.schema_id, expected_id, "headers {:?}", record.headers);
        let header = |name: &str| record.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        assert_eq!(header("ce_type").as_deref(), Some("StockLevelChanged"));
        assert_eq!(header("ce_eventversion").as_deref(), Some("1"));
        let id = header("ce_id").expect("ce_id header");
        let event = sent
            .iter()
            .find(|e| e.event_id.to_string() == id)
            .expect("a sent event");
        assert_eq!(
            record.payload, event.payload,
            "the payload after the header is the event's"
        );
        seen.insert(id);
    }
    assert_eq!(seen, sent_ids, "every event once");
    db.drop().await;
}

#[tokio::test]
async fn the_confluent_wire_format_needs_binary_mode_and_the_registry() {
    let (db, _publisher) = crate::event_core::publisher("registry_wire_cfg").await;
    let store = Store::from_pool(db.pool.clone(), SchemaName::default());
    let structured = framed_config("framed-structured", "recordName", "structured");
    let error = structured
        .broker
        .connect_with_registry(&store)
        .await
        .err()
        .expect("structured mode refused");
    assert!(error.to_string().contains("kafka.mode must be binary"), "{error}");
    let binary = framed_config("framed-binary", "recordName", "binary");
    let error = binary.broker.connect().await.err().expect("no registry refused");
    assert!(error.to_string().contains("needs the schema registry"), "{error}");
    db.drop().await;
}

#[test]
fn the_example_relay_config_selects_the_confluent_wire_format() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/relay/kafka-confluent.yaml");
    let config = RelayConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let inventory_outbox::relay::config::BrokerConfig::Kafka(kafka) = &config.broker else {
        panic!("the example configures Kafka: {:?}", config.broker);
    };
    assert!(kafka.wire_format.is_confluent());
    assert_eq!(
        kafka.wire_format.subject_name_strategy,
        confluent::SubjectNameStrategy::RecordName
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_topic_name_strategy_an_event_type_the_topic_subject_refuses_is_dead_lettered_with_the_reason() {
    use inventory_outbox::event::NewEvent;
    use inventory_outbox::event::inventory::Stockout;
    use inventory_outbox::store::failed::{FailedEventQuery, FailedStatus};

    let (db, publisher) = crate::event_core::publisher("registry_topic_subject").await;
    let topic = unique_name("framed-topic");
    let relay = FramedRelay::start(&db, &topic, "topicName").await;
    // StockLevelChanged first: its schema becomes `{topic}-value` version 1.
    let first = write_events(&publisher, &db, 1, 5, 1).await;
    let records = consume(&topic, first.len()).await;
    // Stockout's open schema reads StockLevelChanged data (BACKWARD holds), but not the other
    // way round: under FULL the topic subject refuses it.
    publisher
        .registry()
        .set_compatibility(&format!("{topic}-value"), CompatibilityMode::Full)
        .await
        .expect("set FULL");
    let mut tx = db.pool.begin().await.expect("begin");
    let stockout = publisher
        .publish_event(
            &mut tx,
            NewEvent::from_payload(&Stockout {
                inventory_item_id: uuid::Uuid::now_v7(),
                warehouse_id: uuid::Uuid::nil(),
                unfulfilled_quantity: Some(3),
            })
            .expect("payload"),
        )
        .await
        .expect("publish stockout");
    tx.commit().await.expect("commit");

    let query = FailedEventQuery {
        statuses: vec![FailedStatus::DeadLettered],
        limit: 10,
        ..FailedEventQuery::default()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let failed = publisher.get_failed_events(&query).await.expect("failed events");
        if let Some(dead) = failed.into_iter().find(|f| f.event_id == stockout.event_id) {
            break dead;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Stockout event was not dead-lettered within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    relay.stop().await;
    let reason = dead.last_error.unwrap_or_default();
    assert!(
        reason.contains(&format!("\"{topic}-value\"")) && reason.contains("TopicNameStrategy"),
        "{reason}"
    );
    // The topic subject still holds only StockLevelChanged, under the shared id.
    let record_id = publisher
        .registry()
        .schema_id("StockLevelChanged", 1)
        .await
        .expect("id")
        .expect("registered");
    assert!(records.iter().all(|r| r.schema_id == record_id));
    let topic_subject = publisher
        .registry()
        .versions(&format!("{topic}-value"))
        .await
        .expect("topic subject");
    assert_eq!(topic_subject.iter().map(|v| v.id).collect::<Vec<_>>(), vec![record_id]);
    db.drop().await;
}
