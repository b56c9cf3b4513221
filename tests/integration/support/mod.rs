//! Where the local stack listens. Values come from the environment written by `make env-up`
//! (`hack/env-up.sh`); the defaults are the stack's fixed loopback ports.

use std::path::PathBuf;

/// Sends the product's warnings and librdkafka's (and anything `TEST_LOG` selects, e.g.
/// `inventory_outbox=debug`) to the test's captured output, so a failing test shows what its
/// in-process relays, stores and Kafka clients complained about; a passing one prints nothing.
pub fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("TEST_LOG").unwrap_or_else(|_| "inventory_outbox=warn,librdkafka=warn".to_owned());
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .try_init();
    });
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

pub fn state_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("OUTBOX_STATE") {
        return dir.into();
    }
    let base = std::env::var("XDG_STATE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").expect("HOME is set")).join(".local/state"));
    base.join("inventory-outbox")
}

pub fn database_url() -> String {
    env_or("DATABASE_URL", "postgres://outbox:outbox@127.0.0.1:15432/outbox")
}

pub fn kafka_bootstrap() -> String {
    env_or("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
}

pub fn amqp_url() -> String {
    env_or("AMQP_URL", "amqp://outbox:outbox@127.0.0.1:15673/%2f")
}

pub fn aws_endpoint() -> String {
    env_or("AWS_ENDPOINT_URL", "http://127.0.0.1:15000")
}

/// SDK settings for moto: its endpoint, us-east-1 and static test credentials.
pub async fn aws_sdk_config() -> aws_config::SdkConfig {
    inventory_outbox::tls::install_crypto_provider();
    aws_config::from_env()
        .endpoint_url(aws_endpoint())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .load()
        .await
}

pub fn kubeconfig_path() -> PathBuf {
    std::env::var("KUBECONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|_| state_dir().join("kubernetes/admin.kubeconfig"))
}

/// A name unique to this test run, safe for topics, queues, namespaces and databases.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        uuid::Uuid::new_v4().simple().to_string().get(..12).unwrap_or_default()
    )
}

/// The next record of a subscribed consumer. A subscription made before the relay creates its
/// topic (or before the broker's metadata has it) reports "unknown topic or partition" and then
/// delivers once the topic appears, so that error is waited out; any other error fails the test.
pub async fn next_record(consumer: &rdkafka::consumer::StreamConsumer) -> rdkafka::message::BorrowedMessage<'_> {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    loop {
        match consumer.recv().await {
            Ok(m) => return m,
            Err(KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopicOrPartition)) => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("consume: {e}"),
        }
    }
}

pub mod cluster;
pub mod kube;
pub mod postgres;
