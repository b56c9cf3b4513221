//! Invalid relay configurations are refused with an error that names the offending field, both
//! through `RelayConfig::parse` and through the binary (one `error:` line on stderr).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use inventory_outbox::relay::config::RelayConfig;
use serde_json::{Value, json};

use crate::support::unique_name;

/// A complete, valid document; each case breaks one thing in it.
fn valid() -> Value {
    json!({
        "publisher": "orders",
        "outbox": {"batchSize": 200, "minPollIntervalMs": 5, "maxPollIntervalMs": 500},
        "broker": {"kafka": {"bootstrapServers": "127.0.0.1:19092", "deadLetterTopic": "orders-dlq"}},
        "routing": {"strategy": "perEventType", "template": "inventory.{eventType}"},
        "retry": {"initialIntervalMs": 100, "maxAttempts": 4},
        "circuitBreaker": {"failureThreshold": 5},
        "workers": {"heartbeatIntervalMs": 500, "leaseDurationMs": 2000},
        "http": {"listen": "127.0.0.1:0"},
    })
}

/// `valid()` changed by `edit`, as document text (JSON is YAML).
fn broken(edit: impl FnOnce(&mut Value)) -> String {
    let mut doc = valid();
    edit(&mut doc);
    serde_json::to_string_pretty(&doc).expect("serialize document")
}

fn object(value: &mut Value) -> &mut serde_json::Map<String, Value> {
    value.as_object_mut().expect("an object")
}

#[test]
fn the_valid_base_document_parses() {
    let text = broken(|_| {});
    let config = RelayConfig::parse(&text, Path::new("test.yaml")).expect("the base document is valid");
    assert_eq!(config.publisher, "orders");
    assert_eq!(config.outbox.batch_size, 200);
}

#[test]
fn invalid_configs_are_refused_with_an_error_naming_the_field() {
    let rabbitmq = |url: &str| json!({"rabbitmq": {"url": url, "exchange": "inventory"}});
    // (case, document, text the error must contain)
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "missing publisher",
            broken(|d| {
                object(d).remove("publisher");
            }),
            &["publisher"],
        ),
        (
            "publisher name with a space",
            broken(|d| d["publisher"] = json!("orders relay")),
            &["publisher"],
        ),
        (
            "publisher name too long",
            broken(|d| d["publisher"] = json!("p".repeat(64))),
            &["publisher"],
        ),
        (
            "unknown top-level field",
            broken(|d| d["brokers"] = json!({})),
            &["brokers"],
        ),
        (
            "unknown field in outbox",
            broken(|d| d["outbox"]["batchSise"] = json!(10)),
            &["batchSise"],
        ),
        (
            "unknown broker kind",
            broken(|d| d["broker"] = json!({"nats": {"url": "nats://localhost"}})),
            &["nats"],
        ),
        (
            "kafka without bootstrap servers",
            broken(|d| d["broker"]["kafka"]["bootstrapServers"] = json!("")),
            &["broker.kafka", "bootstrapServers"],
        ),
        (
            "kafka without a dead-letter topic",
            broken(|d| {
                object(&mut d["broker"]["kafka"]).remove("deadLetterTopic");
            }),
            &["deadLetterTopic"],
        ),
        (
            "rabbitmq url with a password",
            broken(|d| d["broker"] = rabbitmq("amqp://outbox:s3cret@localhost:5672/%2f")),
            &["rabbitmq.url", "urlEnv"],
        ),
        (
            "batchSize 0",
            broken(|d| d["outbox"]["batchSize"] = json!(0)),
            &["outbox.batchSize"],
        ),
        (
            "minPollIntervalMs above maxPollIntervalMs",
            broken(|d| d["outbox"]["minPollIntervalMs"] = json!(1000)),
            &["outbox.minPollIntervalMs"],
        ),
        (
            "negative batchSize",
            broken(|d| d["outbox"]["batchSize"] = json!(-1)),
            &["-1"],
        ),
        (
            "lease shorter than two heartbeats",
            broken(|d| d["workers"]["leaseDurationMs"] = json!(999)),
            &["workers.leaseDurationMs"],
        ),
        (
            "retry multiplier below 1",
            broken(|d| d["retry"]["multiplier"] = json!(0.5)),
            &["retry.multiplier"],
        ),
        (
            "retry maxAttempts 0",
            broken(|d| d["retry"]["maxAttempts"] = json!(0)),
            &["retry.maxAttempts"],
        ),
        (
            "routing template with an unknown placeholder",
            broken(|d| d["routing"]["template"] = json!("inventory.{eventName}")),
            &["routing", "{eventName}"],
        ),
        (
            "unknown routing strategy",
            broken(|d| d["routing"]["strategy"] = json!("perTenant")),
            &["perTenant"],
        ),
        (
            "circuit breaker failure rate above 1",
            broken(|d| d["circuitBreaker"]["failureRateThreshold"] = json!(2)),
            &["circuitBreaker.failureRateThreshold"],
        ),
        (
            "http.listen not an address",
            broken(|d| d["http"]["listen"] = json!("localhost")),
            &["localhost"],
        ),
    ];
    // Two brokers: serde names no field, only the position of the second broker key.
    let two = broken(|d| d["broker"]["rabbitmq"] = json!({"urlEnv": "AMQP_URL", "exchange": "inventory"}));
    let line = two
        .lines()
        .position(|l| l.contains("\"rabbitmq\""))
        .expect("rabbitmq key")
        + 1;
    let at_line = format!("line {line} ");
    let mut cases: Vec<(&str, String, Vec<&str>)> = cases
        .into_iter()
        .map(|(case, text, expected)| (case, text, expected.to_vec()))
        .collect();
    cases.push(("two brokers", two.clone(), vec![at_line.as_str()]));
    let mut failures = Vec::new();
    for (case, text, expected) in &cases {
        match RelayConfig::parse(text, Path::new("test.yaml")) {
            Ok(_) => failures.push(format!("{case}: accepted")),
            Err(e) => {
                let message = e.to_string();
                eprintln!("{case}: {message}");
                if let Some(missing) = expected.iter().find(|s| !message.contains(**s)) {
                    failures.push(format!("{case}: error does not name {missing:?}: {message}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn misspelt_fields_in_nested_sections_are_refused() {
    let yaml = "publisher: orders\noutbox: {batchSize: 10}\nbroker:\n  kafka:\n    bootstrapServers: k:9092\n    \
                deadLetterTopic: dlq\nrouting: {strategy: single, destination: orders}\nretry:\n  maxAtempts: 3\n";
    let cases = [
        ("retry.maxAtempts (YAML)", yaml.to_owned(), "maxAtempts"),
        (
            "circuitBreaker.openDuration",
            broken(|d| d["circuitBreaker"]["openDuration"] = json!(100)),
            "openDuration",
        ),
        (
            "broker.kafka.partiton",
            broken(|d| d["broker"]["kafka"]["partiton"] = json!(3)),
            "partiton",
        ),
        (
            "broker.rabbitmq.exchnage",
            broken(|d| {
                d["broker"] = json!({"rabbitmq": {"urlEnv": "AMQP_URL", "exchange": "inventory", "exchnage": "x"}})
            }),
            "exchnage",
        ),
        (
            "routing.destination with perEventType",
            broken(|d| d["routing"]["destination"] = json!("orders")),
            "destination",
        ),
    ];
    let mut failures = Vec::new();
    for (case, text, field) in &cases {
        match RelayConfig::parse(text, Path::new("relay.yaml")) {
            Ok(_) => failures.push(format!("{case}: accepted")),
            Err(e) if !e.to_string().contains(field) => failures.push(format!("{case}: {e}")),
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Writes `text` to a fresh file in the temp directory.
fn temp_file(text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}.yaml", unique_name("relay-config")));
    std::fs::write(&path, text).expect("write config file");
    path
}

/// Runs `inventory-outbox relay` on `config` with `DATABASE_URL` as given (removed when None).
fn run_relay(config: &Path, database_url: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_inventory-outbox"));
    command
        .args(["--log-format", "json", "relay", "--config"])
        .arg(config)
        .args(["--worker-id", "config-test"])
        .env_remove("RELAY_CONFIG")
        .stdin(Stdio::null());
    match database_url {
        Some(url) => command.env("DATABASE_URL", url),
        None => command.env_remove("DATABASE_URL"),
    };
    // A refused configuration ends the process at once; the wait is bounded by the test's
    // own timeout only in the worst case, so keep the child from outliving a panic.
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn relay");
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if finished.recv_timeout(std::time::Duration::from_secs(20)).is_err() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    });
    let output = child.wait_with_output().expect("wait for relay");
    let _ = done.send(());
    output
}

/// The first stderr line of a failed run, which must start with `error:`; with `one_line`,
/// stderr must hold nothing else.
fn error_line(output: &Output, one_line: bool) -> String {
    assert!(!output.status.success(), "the relay must fail: {output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "an error on stderr");
    if one_line {
        assert_eq!(lines.len(), 1, "exactly one line on stderr: {stderr}");
    }
    assert!(lines[0].starts_with("error:"), "{stderr}");
    lines[0].to_owned()
}

#[test]
fn the_binary_refuses_a_broken_config_and_a_missing_database_url_with_one_error_line() {
    let broken_file = temp_file(&broken(|d| d["outbox"]["batchSize"] = json!(0)));
    let output = run_relay(&broken_file, Some("postgres://unused@127.0.0.1:1/unused"));
    let line = error_line(&output, true);
    assert!(line.contains("outbox.batchSize"), "{line}");

    let unknown_file = temp_file("publisher: orders\npublisherr: typo\n");
    let output = run_relay(&unknown_file, Some("postgres://unused@127.0.0.1:1/unused"));
    // YAML errors come with a source snippet on the following lines (see the report).
    let line = error_line(&output, false);
    assert!(line.contains("publisherr"), "{line}");

    let missing = std::env::temp_dir().join(format!("{}.yaml", unique_name("absent")));
    let output = run_relay(&missing, Some("postgres://unused@127.0.0.1:1/unused"));
    let line = error_line(&output, true);
    assert!(line.contains(&missing.display().to_string()), "{line}");

    let valid_file = temp_file(&broken(|_| {}));
    let output = run_relay(&valid_file, None);
    let line = error_line(&output, true);
    assert!(
        line.contains("DATABASE_URL") && line.contains("outbox.databaseUrlEnv"),
        "{line}"
    );

    for file in [broken_file, unknown_file, valid_file] {
        let _ = std::fs::remove_file(file);
    }
}
