//! The stock Confluent Python client (`confluent-kafka` from PyPI, installed into a cached
//! venv by `hack/confluent-python.sh`) against the product: its SchemaRegistryClient and
//! JSONSerializer drive the registry API, and `examples/registry_consumer.py` (its
//! JSONDeserializer) reads 1,000 events the relay published in the Confluent wire format.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

use super::wire_format::FramedRelay;
use super::{RunningRegistry, TOKEN};
use crate::event_core::publisher;
use crate::relay::write_events;
use crate::support::{kafka_bootstrap, unique_name};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Installs the client when missing (cached per version) and returns the venv's python.
async fn confluent_python() -> PathBuf {
    let script = repo().join("hack/confluent-python.sh");
    let output = tokio::time::timeout(Duration::from_secs(300), Command::new(&script).arg("install").output())
        .await
        .expect("client install within 300 s")
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{} install failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let python = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(!python.is_empty(), "the installer printed no python path");
    PathBuf::from(python)
}

/// Runs a Python script to completion and returns its last stdout line as JSON.
async fn run_python(python: &Path, args: &[&str], timeout: Duration) -> Value {
    let output = tokio::time::timeout(timeout, Command::new(python).args(args).kill_on_drop(true).output())
        .await
        .unwrap_or_else(|_| panic!("python {args:?} did not finish within {timeout:?}"))
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python {args:?} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("python printed no JSON ({e}):\n{stdout}\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_confluent_python_client_registers_looks_up_and_is_refused_a_breaking_change() {
    let python = confluent_python().await;
    let (db, _publisher) = publisher("registry_python").await;
    let server = RunningRegistry::start(&db, false).await;
    let script = repo().join("tests/integration/registry/confluent_client.py");
    let prefix = unique_name("bins");
    let found = run_python(
        &python,
        &[&script.to_string_lossy(), &server.url, TOKEN, &prefix],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(found["anonymousRegister"]["code"], 40101, "{found:#}");
    assert_eq!(found["breakingChange"]["status"], 409, "{found:#}");
    assert_eq!(found["breakingChange"]["code"], 409, "{found:#}");
    let message = found["breakingChange"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("field `quantity` changed type"), "{message}");
    assert_eq!(found["afterDelete"]["code"], 40401, "{found:#}");
    // The serializer's TopicNameStrategy subject holds the same document under the same id.
    let id = found["registeredId"].as_u64().expect("id");
    let serialized = server
        .registry
        .versions(&format!("{prefix}-serialized-value"))
        .await
        .expect("serializer subject");
    assert_eq!(serialized.iter().map(|v| u64::from(v.id)).collect::<Vec<_>>(), vec![id]);
    server.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_json_deserializer_reads_1000_relay_events_in_the_confluent_wire_format() {
    let python = confluent_python().await;
    let (db, publisher) = publisher("registry_consumer").await;
    let server = RunningRegistry::start(&db, false).await;
    let topic = unique_name("confluent-wire");
    // TopicNameStrategy: the relay registers the event type's schema under `{topic}-value`.
    let relay = FramedRelay::start(&db, &topic, "topicName").await;
    let sent = write_events(&publisher, &db, 4, 250, 100).await;
    assert_eq!(sent.len(), 1000);

    let example = repo().join("examples/registry_consumer.py");
    let group = unique_name("registry-example");
    let summary = run_python(
        &python,
        &[
            &example.to_string_lossy(),
            "--registry-url",
            &server.url,
            "--bootstrap-servers",
            &kafka_bootstrap(),
            "--topic",
            &topic,
            "--group-id",
            &group,
            "--max-messages",
            "1000",
            "--timeout-seconds",
            "120",
            "--summary",
        ],
        Duration::from_secs(180),
    )
    .await;
    relay.stop().await;

    let failures = summary["failures"].as_array().map(Vec::len).unwrap_or(usize::MAX);
    assert_eq!(failures, 0, "payloads failed validation: {:#}", summary["failures"]);
    let consumed: HashSet<&str> = summary["eventIds"]
        .as_array()
        .expect("eventIds")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let expected: HashSet<String> = sent.iter().map(|e| e.event_id.to_string()).collect();
    let missing: Vec<&String> = expected.iter().filter(|id| !consumed.contains(id.as_str())).collect();
    assert!(
        missing.is_empty() && summary["consumed"] == 1000,
        "consumed {} ({} distinct); {} of 1000 missing, e.g. {:?}",
        summary["consumed"],
        consumed.len(),
        missing.len(),
        missing.first()
    );
    // The id on the wire is the registry's id of StockLevelChanged v1, and the topic subject
    // holds the same document under that id.
    let record_id = publisher
        .registry()
        .schema_id("StockLevelChanged", 1)
        .await
        .expect("id")
        .expect("registered");
    assert_eq!(summary["schemaIds"], serde_json::json!([record_id]), "{summary:#}");
    let topic_versions = server
        .registry
        .versions(&format!("{topic}-value"))
        .await
        .expect("topic subject");
    assert_eq!(topic_versions.iter().map(|v| v.id).collect::<Vec<_>>(), vec![record_id]);
    server.stop().await;
    db.drop().await;
}
