//! The relay over Kafka's TLS listeners (the Kafka TLS node of the local stack).

use std::path::Path;
use std::time::Duration;

use inventory_outbox::broker::Broker;
use inventory_outbox::broker::kafka::{KafkaBroker, KafkaConfig};
use inventory_outbox::event::{DomainEvent, cloudevents};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message as _};
use serde_json::{Value, json};

use super::{
    RelayProcess, assert_secret_absent, env_or, exposed_state, postgres_verify_full, relay_document, scratch_dir,
    secret_file, test_database_url, tls_file, write,
};
use crate::event_core::publisher;
use crate::relay::assert_delivered;
use crate::support::unique_name;

fn sasl_ssl() -> String {
    env_or("KAFKA_SASL_SSL_BOOTSTRAP_SERVERS", "127.0.0.1:19094")
}
fn mtls() -> String {
    env_or("KAFKA_MTLS_BOOTSTRAP_SERVERS", "127.0.0.1:19095")
}
fn expired_listener() -> String {
    env_or("KAFKA_EXPIRED_CERT_BOOTSTRAP_SERVERS", "127.0.0.1:19096")
}
fn wrong_host_listener() -> String {
    env_or("KAFKA_WRONG_HOST_BOOTSTRAP_SERVERS", "127.0.0.1:19097")
}
/// The TLS node's own plaintext listener, from which the tests read what arrived.
pub(super) fn tls_node_plaintext() -> String {
    env_or("KAFKA_TLS_NODE_PLAINTEXT_BOOTSTRAP_SERVERS", "127.0.0.1:19098")
}
fn sasl_user() -> String {
    env_or("KAFKA_SASL_USERNAME", "relay")
}
fn sasl_password() -> String {
    let file = std::env::var("KAFKA_SASL_PASSWORD_FILE").unwrap_or_else(|_| {
        super::state_dir()
            .join("kafka-tls/relay.password")
            .display()
            .to_string()
    });
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{file}: {e} (run `make env-up`: the Kafka TLS node makes it)"))
        .trim()
        .to_owned()
}

/// `broker.kafka` for SASL_SSL with `mechanism` on `bootstrap`, credentials and CA from files.
fn sasl_ssl_broker(topic: &str, bootstrap: &str, mechanism: &str, password: &str, ca: &Path, dir: &Path) -> Value {
    json!({"kafka": {
        "bootstrapServers": bootstrap, "deadLetterTopic": format!("{topic}-dlq"), "partitions": 3,
        "mode": "structured", "securityProtocol": "sasl_ssl", "saslMechanism": mechanism,
        "saslUsernameFile": secret_file(dir, "kafka-username", &sasl_user()),
        "saslPasswordFile": secret_file(dir, &format!("kafka-password-{}", unique_name("p")), password),
        "tls": {"caFile": ca},
    }})
}

fn single(topic: &str) -> Value {
    json!({"strategy": "single", "destination": topic})
}

/// Reads `expected` events from `topic` (structured mode), then a short while more for
/// duplicates.
pub(super) async fn consume(topic: &str, expected: usize) -> Vec<DomainEvent> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", tls_node_plaintext())
        .set("group.id", unique_name("tls-test"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut received = Vec::new();
    let decode = |payload: &[u8]| {
        let doc: Value = serde_json::from_slice(payload).expect("structured CloudEvent");
        cloudevents::from_structured(&doc).expect("CloudEvent")
    };
    let collect = async {
        while received.len() < expected {
            let m = crate::support::next_record(&consumer).await;
            received.push(decode(m.payload().unwrap_or_default()));
        }
    };
    if tokio::time::timeout(Duration::from_secs(90), collect).await.is_err() {
        panic!(
            "only {} of {expected} events arrived in {topic} within 90 s",
            received.len()
        );
    }
    while let Ok(m) = tokio::time::timeout(Duration::from_secs(2), crate::support::next_record(&consumer)).await {
        received.push(decode(m.payload().unwrap_or_default()));
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_publishes_through_kafka_sasl_ssl_scram_sha_512_reading_postgres_over_verify_full() {
    let (db, publisher) = publisher("tls_kafka_scram").await;
    let dir = scratch_dir("tls-kafka-scram");
    let topic = unique_name("tls-scram");
    let broker = sasl_ssl_broker(
        &topic,
        &sasl_ssl(),
        "SCRAM-SHA-512",
        &sasl_password(),
        &tls_file("ca.crt"),
        &dir,
    );
    let doc = relay_document("kafka-scram", broker, single(&topic), postgres_verify_full(), &dir);
    let mut relay = RelayProcess::start(&doc, &test_database_url(&db), &dir, "scram");
    relay.wait_ready(Duration::from_secs(60)).await;
    super::postgres::assert_only_tls_sessions(&db).await;
    let sent = write(&publisher, &db, 400).await;
    let received = consume(&topic, sent.len()).await;
    assert_delivered(&sent, &received, false);
    let state = exposed_state(&relay, &db).await;
    let places: Vec<(&str, &str)> = state.iter().map(|(n, t)| (*n, t.as_str())).collect();
    assert_secret_absent(&sasl_password(), &places);
    relay.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_publishes_through_kafka_mtls_with_zstd_compression() {
    let (db, publisher) = publisher("tls_kafka_mtls").await;
    let dir = scratch_dir("tls-kafka-mtls");
    let topic = unique_name("tls-mtls");
    let broker = json!({"kafka": {
        "bootstrapServers": mtls(), "deadLetterTopic": format!("{topic}-dlq"), "partitions": 3,
        "mode": "structured", "securityProtocol": "ssl", "compression": "zstd",
        "tls": {"caFile": tls_file("ca.crt"), "certFile": tls_file("client.crt"), "keyFile": tls_file("client.key")},
    }});
    let doc = relay_document("kafka-mtls", broker, single(&topic), postgres_verify_full(), &dir);
    let mut relay = RelayProcess::start(&doc, &test_database_url(&db), &dir, "mtls");
    relay.wait_ready(Duration::from_secs(60)).await;
    let sent = write(&publisher, &db, 400).await;
    let received = consume(&topic, sent.len()).await;
    assert_delivered(&sent, &received, false);
    relay.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_mtls_listener_refuses_a_relay_without_a_client_certificate() {
    let config: KafkaConfig = serde_json::from_value(json!({
        "bootstrapServers": mtls(), "deadLetterTopic": "unused-dlq", "securityProtocol": "ssl",
        "tls": {"caFile": tls_file("ca.crt")},
    }))
    .expect("config");
    inventory_outbox::tls::install_crypto_provider();
    let broker = KafkaBroker::connect(&config).expect("client");
    let error = broker
        .check_health()
        .await
        .expect_err("no client certificate, no connection");
    let message = error.message().to_owned();
    assert!(message.contains(&mtls()), "names the endpoint: {message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_sasl_mechanism_authenticates_over_tls() {
    inventory_outbox::tls::install_crypto_provider();
    let dir = scratch_dir("tls-kafka-mechanisms");
    for mechanism in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] {
        let broker = sasl_ssl_broker(
            "unused",
            &sasl_ssl(),
            mechanism,
            &sasl_password(),
            &tls_file("ca.crt"),
            &dir,
        );
        let config: KafkaConfig = serde_json::from_value(broker["kafka"].clone()).expect("config");
        let kafka = KafkaBroker::connect(&config).expect("client");
        if let Err(e) = kafka.check_health().await {
            panic!("{mechanism} over SASL_SSL: {e}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// One broken setting: the relay stays up and unready with one reason naming the endpoint and
/// the cause, shows no secret anywhere, and once restarted with the fixed setting delivers
/// every event written meanwhile.
async fn broken_then_fixed(name: &str, broken: impl Fn(&str, &Path) -> Value, cause: &[&str], endpoint: &str) {
    let (db, publisher) = publisher(&format!("tls_kafka_{}", name.replace('-', "_"))).await;
    let dir = scratch_dir(&format!("tls-kafka-{name}"));
    let topic = unique_name(&format!("tls-{name}"));
    let doc = relay_document(name, broken(&topic, &dir), single(&topic), postgres_verify_full(), &dir);
    let mut relay = RelayProcess::start(&doc, &test_database_url(&db), &dir, &format!("{name}-broken"));
    let sent = write(&publisher, &db, 100).await;
    let reason = relay
        .wait_unready_because(Duration::from_secs(60), |body| {
            let body = body.to_lowercase();
            body.contains(endpoint) && cause.iter().any(|c| body.contains(c))
        })
        .await;
    eprintln!("{name}: /readyz says: {reason:?}");
    // The reason is one line of the body, not a wall of librdkafka noise.
    assert!(reason.lines().count() <= 3, "{reason}");
    relay.stays_up_unready(Duration::from_secs(3)).await;
    let state = exposed_state(&relay, &db).await;
    let places: Vec<(&str, &str)> = state.iter().map(|(n, t)| (*n, t.as_str())).collect();
    assert_secret_absent(&sasl_password(), &places);
    assert_secret_absent(WRONG_PASSWORD, &places);
    let logs = relay.kill().await;
    let lowered = logs.to_lowercase();
    // One line per distinct failure, not one per reconnect.
    let librdkafka_lines = logs.lines().filter(|l| l.contains("librdkafka")).count();
    eprintln!("{name}: {librdkafka_lines} librdkafka log lines");
    assert!(librdkafka_lines <= 10, "librdkafka repeats itself:\n{logs}");
    assert!(
        lowered.contains(endpoint) && cause.iter().any(|c| lowered.contains(c)),
        "the log names the endpoint and the cause:\n{logs}"
    );

    let fixed = sasl_ssl_broker(
        &topic,
        &sasl_ssl(),
        "SCRAM-SHA-512",
        &sasl_password(),
        &tls_file("ca.crt"),
        &dir,
    );
    let doc = relay_document(name, fixed, single(&topic), postgres_verify_full(), &dir);
    let mut relay = RelayProcess::start(&doc, &test_database_url(&db), &dir, &format!("{name}-fixed"));
    relay.wait_ready(Duration::from_secs(60)).await;
    let received = consume(&topic, sent.len()).await;
    assert_delivered(&sent, &received, true);
    relay.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    db.drop().await;
}

/// The known wrong password the secret grep looks for.
const WRONG_PASSWORD: &str = "wrong-Pa55word-7f3c91";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_kafka_password_keeps_the_relay_unready_naming_the_endpoint_and_loses_nothing() {
    let endpoint = sasl_ssl();
    broken_then_fixed(
        "wrong-password",
        |topic, dir| {
            sasl_ssl_broker(
                topic,
                &sasl_ssl(),
                "SCRAM-SHA-512",
                WRONG_PASSWORD,
                &tls_file("ca.crt"),
                dir,
            )
        },
        &["authentication failed", "invalid credentials"],
        &endpoint,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_untrusted_kafka_ca_keeps_the_relay_unready_naming_the_endpoint_and_loses_nothing() {
    let endpoint = sasl_ssl();
    broken_then_fixed(
        "untrusted-ca",
        |topic, dir| {
            sasl_ssl_broker(
                topic,
                &sasl_ssl(),
                "SCRAM-SHA-512",
                &sasl_password(),
                &tls_file("other-ca.crt"),
                dir,
            )
        },
        &["unknown issuer", "unable to get local issuer", "untrusted"],
        &endpoint,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kafka_host_name_mismatch_keeps_the_relay_unready_naming_the_endpoint_and_loses_nothing() {
    let endpoint = wrong_host_listener();
    broken_then_fixed(
        "wrong-host",
        |topic, dir| {
            sasl_ssl_broker(
                topic,
                &wrong_host_listener(),
                "SCRAM-SHA-512",
                &sasl_password(),
                &tls_file("ca.crt"),
                dir,
            )
        },
        &["hostname mismatch", "not valid for name", "host name"],
        &endpoint,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_kafka_certificate_keeps_the_relay_unready_naming_the_endpoint_and_loses_nothing() {
    let endpoint = expired_listener();
    broken_then_fixed(
        "expired",
        |topic, dir| {
            sasl_ssl_broker(
                topic,
                &expired_listener(),
                "SCRAM-SHA-512",
                &sasl_password(),
                &tls_file("ca.crt"),
                dir,
            )
        },
        &["expired"],
        &endpoint,
    )
    .await;
}
