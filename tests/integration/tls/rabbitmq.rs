//! The relay over RabbitMQ amqps (the RabbitMQ TLS node of the local stack).

use std::path::{Path, PathBuf};
use std::time::Duration;

use inventory_outbox::event::{DomainEvent, cloudevents};
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};

use super::{
    RelayProcess, assert_secret_absent, env_or, exposed_state, postgres_verify_full, relay_document, scratch_dir,
    secret_file, test_database_url, tls_file, write,
};
use crate::event_core::publisher;
use crate::relay::assert_delivered;
use crate::support::unique_name;

fn amqps_url() -> String {
    env_or("AMQPS_URL", "amqps://127.0.0.1:15676/%2f")
}
/// The TLS node's plain AMQP port, from which the tests read what arrived.
fn tls_node_plain_url() -> String {
    format!(
        "amqp://outbox:outbox@127.0.0.1:{}/%2f",
        env_or("AMQP_TLS_NODE_PORT", "15675")
    )
}

/// The TLS node's `relay` user's password file (`hack/components/rabbitmq.sh`).
fn password_file() -> PathBuf {
    let file = std::env::var("RABBITMQ_TLS_PASSWORD_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| super::state_dir().join("rabbitmq-tls/relay.password"));
    assert!(file.is_file(), "{} is missing: run `make env-up`", file.display());
    file
}

fn password() -> String {
    std::fs::read_to_string(password_file())
        .expect("password file")
        .trim()
        .to_owned()
}

/// The node presenting the local CA's expired certificate (`hack/components/rabbitmq.sh`).
fn expired_url() -> String {
    env_or("AMQPS_EXPIRED_CERT_URL", "amqps://127.0.0.1:15679/%2f")
}
/// The node presenting a certificate valid only for wrong-host.invalid.
fn wrong_host_url() -> String {
    env_or("AMQPS_WRONGHOST_CERT_URL", "amqps://127.0.0.1:15682/%2f")
}

fn amqps_broker(exchange: &str, queue: &str, ca: &Path, dir: &Path) -> Value {
    amqps_broker_at(&amqps_url(), exchange, queue, ca, dir)
}

fn amqps_broker_at(url: &str, exchange: &str, queue: &str, ca: &Path, dir: &Path) -> Value {
    json!({"rabbitmq": {
        "url": url, "exchange": exchange, "mode": "structured",
        "usernameFile": secret_file(dir, "amqp-username", &env_or("RABBITMQ_TLS_USERNAME", "relay")),
        "passwordFile": password_file(),
        "tls": {"caFile": ca, "certFile": tls_file("client.crt"), "keyFile": tls_file("client.key")},
        "queues": [{"name": queue, "bindingKey": "inventory.#"}],
    }})
}

fn per_event_type() -> Value {
    json!({"strategy": "perEventType", "template": "inventory.{eventType}"})
}

async fn drain(queue: &str, expected: usize) -> Vec<DomainEvent> {
    let conn = lapin::Connection::connect(&tls_node_plain_url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect to the TLS node's plain port");
    let channel = conn.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut quiet_since = None;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {expected} arrived in {queue}",
            received.len()
        );
        if channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        match channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            Some(m) => {
                let doc: Value = serde_json::from_slice(&m.delivery.data).expect("structured CloudEvent");
                received.push(cloudevents::from_structured(&doc).expect("CloudEvent"));
                quiet_since = None;
            }
            None if received.len() >= expected => {
                // A second of silence after the last one: no duplicates still coming.
                let since = *quiet_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > Duration::from_secs(1) {
                    return received;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_publishes_through_rabbitmq_amqps_with_a_client_certificate() {
    let (db, publisher) = publisher("tls_amqps").await;
    let dir = scratch_dir("tls-amqps");
    let exchange = unique_name("tls-amqps");
    let queue = format!("{exchange}-all");
    let broker = amqps_broker(&exchange, &queue, &tls_file("ca.crt"), &dir);
    let doc = relay_document("amqps", broker, per_event_type(), postgres_verify_full(), &dir);
    let mut relay = RelayProcess::start(&doc, &test_database_url(&db), &dir, "amqps");
    relay.wait_ready(Duration::from_secs(60)).await;
    let sent = write(&publisher, &db, 400).await;
    let received = drain(&queue, sent.len()).await;
    assert_delivered(&sent, &received, false);
    relay.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    db.drop().await;
}

/// One broken connection (`broken_url` with `ca`): the relay stays up and unready with one
/// reason naming the endpoint and `cause`, shows no secret, and once restarted against the
/// TLS node with the right CA delivers every event written meanwhile.
async fn broken_then_fixed(name: &str, broken_url: &str, ca: &Path, cause: &str) {
    let (db, publisher) = publisher(&format!("tls_amqps_{name}")).await;
    let dir = scratch_dir(&format!("tls-amqps-{name}"));
    let exchange = unique_name(&format!("tls-amqps-{name}"));
    let queue = format!("{exchange}-all");
    let broken = amqps_broker_at(broken_url, &exchange, &queue, ca, &dir);
    let doc = relay_document(name, broken, per_event_type(), postgres_verify_full(), &dir);
    let mut relay = RelayProcess::start(&doc, &test_database_url(&db), &dir, &format!("{name}-broken"));
    let sent = write(&publisher, &db, 100).await;
    let endpoint = broken_url
        .trim_start_matches("amqps://")
        .split('/')
        .next()
        .expect("host:port")
        .to_owned();
    let reason = relay
        .wait_unready_because(Duration::from_secs(60), |body| {
            body.contains(&endpoint) && body.to_lowercase().contains(cause)
        })
        .await;
    eprintln!("{name}: /readyz says: {reason:?}");
    assert!(reason.lines().count() <= 3, "{reason}");
    relay.stays_up_unready(Duration::from_secs(3)).await;
    let state = exposed_state(&relay, &db).await;
    let places: Vec<(&str, &str)> = state.iter().map(|(n, t)| (*n, t.as_str())).collect();
    assert_secret_absent(&password(), &places);
    let logs = relay.kill().await;
    assert!(
        logs.contains(&endpoint) && logs.to_lowercase().contains(cause),
        "the log names the endpoint and the cause:\n{logs}"
    );

    let fixed = amqps_broker(&exchange, &queue, &tls_file("ca.crt"), &dir);
    let doc = relay_document(name, fixed, per_event_type(), postgres_verify_full(), &dir);
    let mut relay = RelayProcess::start(&doc, &test_database_url(&db), &dir, &format!("{name}-fixed"));
    relay.wait_ready(Duration::from_secs(60)).await;
    let received = drain(&queue, sent.len()).await;
    assert_delivered(&sent, &received, true);
    relay.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_untrusted_rabbitmq_ca_keeps_the_relay_unready_naming_the_endpoint_and_loses_nothing() {
    broken_then_fixed("amqps-ca", &amqps_url(), &tls_file("other-ca.crt"), "unknownissuer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_rabbitmq_certificate_keeps_the_relay_unready_naming_the_endpoint_and_loses_nothing() {
    broken_then_fixed("amqps-expired", &expired_url(), &tls_file("ca.crt"), "expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rabbitmq_host_name_mismatch_keeps_the_relay_unready_naming_the_endpoint_and_loses_nothing() {
    broken_then_fixed(
        "amqps-wronghost",
        &wrong_host_url(),
        &tls_file("ca.crt"),
        "not valid for name",
    )
    .await;
}
