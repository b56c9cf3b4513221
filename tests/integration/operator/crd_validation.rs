//! The API server itself refuses invalid EventPublishers and ReplayJobs, with messages that
//! name the problem: the CRDs' OpenAPI bounds and CEL rules, applied to the real apiserver.

use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::core::Resource;
use serde_json::{Value, json};

use inventory_outbox::crd::{EventPublisher, ReplayJob};

use super::install_crds;
use crate::support::kube::{admin_client, create_namespace};

fn kafka_publisher() -> Value {
    json!({
        "outbox": {"databaseUrlSecretRef": {"name": "orders-db", "key": "url"}},
        "broker": {"kafka": {"bootstrapServers": "kafka-0.kafka:9092,kafka-1.kafka:9092"}},
        "routing": {"strategy": "single", "destination": "inventory.events"}
    })
}

fn rabbitmq_publisher() -> Value {
    json!({
        "outbox": {"databaseUrlSecretRef": {"name": "orders-db", "key": "url"}},
        "broker": {"rabbitmq": {"urlSecretRef": {"name": "amqp", "key": "url"}, "exchange": "inventory"}},
        "routing": {"strategy": "perEventType", "template": "inventory.{eventType}"}
    })
}

fn sqs_publisher() -> Value {
    json!({
        "outbox": {"databaseUrlSecretRef": {"name": "orders-db", "key": "url"}},
        "broker": {"snsSqs": {"region": "us-east-1", "target": "sqs", "endpointUrl": "http://moto:5000"}},
        "routing": {"strategy": "single", "destination": "inventory-events"}
    })
}

/// Sets `path` (dot-separated) in `value` to `new`, creating objects on the way; `Null` removes.
fn with(mut value: Value, path: &str, new: Value) -> Value {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().expect("non-empty path");
    let mut node = &mut value;
    for part in parts {
        node = node
            .as_object_mut()
            .expect("object on the path")
            .entry(part)
            .or_insert_with(|| json!({}));
    }
    let map = node.as_object_mut().expect("object at the end of the path");
    if new.is_null() {
        map.remove(last);
    } else {
        map.insert(last.to_owned(), new);
    }
    value
}

async fn create(
    api: &Api<DynamicObject>,
    resource: &ApiResource,
    name: &str,
    spec: Value,
) -> Result<DynamicObject, kube::Error> {
    let object = DynamicObject::new(name, resource).data(json!({ "spec": spec }));
    api.create(&PostParams::default(), &object).await
}

/// Checks that every case is refused with 422 and a message containing its expected text;
/// reports all mismatches at once.
async fn expect_refused(api: &Api<DynamicObject>, resource: &ApiResource, cases: Vec<(&str, Value, &str)>) {
    let mut problems = Vec::new();
    for (i, (what, spec, expected)) in cases.iter().enumerate() {
        match create(api, resource, &format!("invalid-{i}"), spec.clone()).await {
            Err(kube::Error::Api(status)) if status.code == 422 && status.message.contains(expected) => {}
            Err(kube::Error::Api(status)) => problems.push(format!(
                "{what}: refused with code {} but the message does not contain {expected:?}: {}",
                status.code, status.message
            )),
            Err(e) => problems.push(format!("{what}: unexpected error {e}")),
            Ok(_) => problems.push(format!("{what}: was accepted: {spec}")),
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} cases wrong:\n{}",
        problems.len(),
        cases.len(),
        problems.join("\n")
    );
}

#[tokio::test]
async fn valid_event_publishers_for_each_broker_are_accepted_with_defaults_filled_in() {
    let client = admin_client().await;
    install_crds(&client).await;
    let ns = create_namespace(&client, "crd-valid").await;
    let resource = ApiResource::erase::<EventPublisher>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
    let fifo = with(
        with(sqs_publisher(), "broker.snsSqs.fifo", json!(true)),
        "deadLetter.destination",
        json!("inventory-dlq.fifo"),
    );
    for (name, spec) in [
        ("kafka", kafka_publisher()),
        ("rabbitmq", rabbitmq_publisher()),
        ("sqs", sqs_publisher()),
        ("sqs-fifo", fifo),
    ] {
        let created = create(&api, &resource, name, spec.clone())
            .await
            .unwrap_or_else(|e| panic!("valid {name} publisher refused: {e}\nspec: {spec}"));
        let spec = &created.data["spec"];
        assert_eq!(spec["outbox"]["batchSize"], 1000, "default batch size: {spec}");
        assert_eq!(spec["replicas"], 1, "default replicas: {spec}");
        assert_eq!(spec["deletionPolicy"], "Retain", "default deletion policy: {spec}");
        assert_eq!(spec["retry"]["multiplier"], 2.0, "default retry: {spec}");
        assert_eq!(spec["paused"], false, "{spec}");
    }
    // The typed client reads back what the API server stored, defaults included.
    let typed: Api<EventPublisher> = Api::namespaced(client, &ns);
    let kafka = typed.get("kafka").await.expect("read typed EventPublisher");
    assert_eq!(kafka.spec.outbox.schema, "outbox");
    assert_eq!(EventPublisher::kind(&()), "EventPublisher");
}

#[tokio::test]
async fn the_api_server_refuses_invalid_event_publishers_naming_the_problem() {
    let client = admin_client().await;
    install_crds(&client).await;
    let ns = create_namespace(&client, "crd-invalid-ep").await;
    let resource = ApiResource::erase::<EventPublisher>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &resource);
    let k = kafka_publisher;
    let cases = vec![
        (
            "no broker",
            with(k(), "broker", json!({})),
            "exactly one of kafka, rabbitmq or snsSqs",
        ),
        (
            "two brokers",
            with(k(), "broker.snsSqs", json!({"region": "us-east-1", "target": "sqs"})),
            "exactly one of kafka, rabbitmq or snsSqs",
        ),
        (
            "batch size 0",
            with(k(), "outbox.batchSize", json!(0)),
            "outbox.batchSize must be between 1 and 10000",
        ),
        (
            "batch size too big",
            with(k(), "outbox.batchSize", json!(20000)),
            "outbox.batchSize must be between 1 and 10000",
        ),
        (
            "no replicas",
            with(k(), "replicas", json!(0)),
            "replicas must be between 1 and 32",
        ),
        (
            "multiplier below 1",
            with(k(), "retry.multiplier", json!(0.5)),
            "retry.multiplier must be between 1 and 100",
        ),
        (
            "jitter above 1",
            with(k(), "retry.jitter", json!(1.5)),
            "retry.jitter must be between 0 and 1",
        ),
        (
            "max interval below initial",
            with(
                with(k(), "retry.initialIntervalMs", json!(5000)),
                "retry.maxIntervalMs",
                json!(100),
            ),
            "retry.maxIntervalMs must be at least retry.initialIntervalMs",
        ),
        (
            "poll intervals reversed",
            with(
                with(k(), "outbox.minPollIntervalMs", json!(900)),
                "outbox.maxPollIntervalMs",
                json!(100),
            ),
            "outbox.minPollIntervalMs must not be greater than outbox.maxPollIntervalMs",
        ),
        (
            "lease shorter than two heartbeats",
            with(
                with(k(), "leases.durationMs", json!(1000)),
                "leases.heartbeatIntervalMs",
                json!(600),
            ),
            "leases.durationMs must be at least twice leases.heartbeatIntervalMs",
        ),
        (
            "open duration too short",
            with(k(), "circuitBreaker.openDurationMs", json!(10)),
            "circuitBreaker.openDurationMs must be between",
        ),
        (
            "failure rate 0",
            with(k(), "circuitBreaker.failureRateThreshold", json!(0)),
            "failureRateThreshold must be greater than 0",
        ),
        (
            "bad Kafka topic",
            with(k(), "routing.destination", json!("inventory events!")),
            "Kafka topic names",
        ),
        (
            "Kafka topic '..'",
            with(k(), "deadLetter.destination", json!("..")),
            "Kafka topic names",
        ),
        (
            "partitions 0",
            with(k(), "topology.kafka.partitions", json!(0)),
            "topology.kafka.partitions must be between 1 and 10000",
        ),
        (
            "SASL without credentials",
            with(k(), "broker.kafka.securityProtocol", json!("sasl_ssl")),
            "credentialsSecretRef is required with securityProtocol",
        ),
        (
            "bad bootstrap servers",
            with(k(), "broker.kafka.bootstrapServers", json!("kafka without port")),
            "bootstrapServers must be a comma-separated list of host:port",
        ),
        (
            "database Secret missing",
            with(k(), "outbox.databaseUrlSecretRef", Value::Null),
            "spec.outbox.databaseUrlSecretRef: Required value",
        ),
        (
            "database Secret name invalid",
            with(k(), "outbox.databaseUrlSecretRef.name", json!("Orders_DB")),
            "spec.outbox.databaseUrlSecretRef.name",
        ),
        (
            "bad outbox schema",
            with(k(), "outbox.schema", json!("Outbox-1")),
            "outbox.schema must start with",
        ),
        (
            "single without destination",
            with(k(), "routing.destination", Value::Null),
            "strategy single needs destination",
        ),
        (
            "unknown template placeholder",
            with(
                with(
                    with(k(), "routing.destination", Value::Null),
                    "routing.strategy",
                    json!("perEventType"),
                ),
                "routing.template",
                json!("inv.{eventName}"),
            ),
            "may only use the placeholders",
        ),
        (
            "unknown wake-up mode",
            with(k(), "outbox.wakeUp", json!("listen")),
            "spec.outbox.wakeUp: Unsupported value: \"listen\"",
        ),
        (
            "unknown deletion policy",
            with(k(), "deletionPolicy", json!("Destroy")),
            "spec.deletionPolicy: Unsupported value",
        ),
        (
            "RabbitMQ topology with Kafka",
            with(
                k(),
                "topology.rabbitmq",
                json!({"queues": [{"name": "q", "bindingKey": "#"}]}),
            ),
            "topology.rabbitmq is only allowed with broker.rabbitmq",
        ),
        (
            "reserved exchange",
            with(rabbitmq_publisher(), "broker.rabbitmq.exchange", json!("amq.inventory")),
            "must not start with 'amq.'",
        ),
        (
            "reserved queue",
            with(
                rabbitmq_publisher(),
                "topology.rabbitmq.queues",
                json!([{"name": "amq.q", "bindingKey": "#"}]),
            ),
            "RabbitMQ exchange and queue names",
        ),
        (
            "RabbitMQ without URL Secret",
            with(rabbitmq_publisher(), "broker.rabbitmq.urlSecretRef", Value::Null),
            "urlSecretRef: Required value",
        ),
        (
            ".fifo without fifo",
            with(sqs_publisher(), "routing.destination", json!("inventory.fifo")),
            "set broker.snsSqs.fifo: true",
        ),
        (
            "FIFO with a standard dead-letter queue",
            with(
                with(sqs_publisher(), "broker.snsSqs.fifo", json!(true)),
                "deadLetter.destination",
                json!("inventory-dlq"),
            ),
            "must be a FIFO queue whose name ends in '.fifo'",
        ),
        (
            "SQS name with dots",
            with(sqs_publisher(), "routing.destination", json!("inventory.events")),
            "SNS topic and SQS queue names",
        ),
        (
            "SQS name too long",
            with(sqs_publisher(), "routing.destination", json!("q".repeat(81))),
            "SNS topic and SQS queue names",
        ),
        (
            "bad region",
            with(sqs_publisher(), "broker.snsSqs.region", json!("mars")),
            "spec.broker.snsSqs.region",
        ),
    ];
    assert!(cases.len() >= 12);
    expect_refused(&api, &resource, cases).await;
}

fn replay(publisher: &str) -> Value {
    json!({
        "publisherRef": {"name": publisher},
        "from": {"time": "2026-01-01T00:00:00Z"},
        "to": {"time": "2026-02-01T00:00:00Z"},
        "filter": {"eventTypes": ["StockLevelChanged"]}
    })
}

#[tokio::test]
async fn the_api_server_refuses_invalid_replay_jobs_and_spec_changes() {
    let client = admin_client().await;
    install_crds(&client).await;
    let ns = create_namespace(&client, "crd-invalid-rj").await;
    let resource = ApiResource::erase::<ReplayJob>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &resource);
    let r = || replay("orders");
    let cases = vec![
        (
            "from after to",
            with(
                with(r(), "from.time", json!("2026-03-01T00:00:00Z")),
                "to.time",
                json!("2026-02-01T00:00:00Z"),
            ),
            "from.time must not be after to.time",
        ),
        (
            "positions reversed",
            with(
                with(r(), "from", json!({"position": 50})),
                "to",
                json!({"position": 10}),
            ),
            "from.position must not be greater than to.position",
        ),
        (
            "unknown source",
            with(r(), "source", json!("kafka")),
            "spec.source: Unsupported value: \"kafka\"",
        ),
        (
            "negative rate",
            with(r(), "rateLimit", json!(-5)),
            "rateLimit must be a positive number",
        ),
        (
            "zero rate",
            with(r(), "rateLimit", json!(0)),
            "rateLimit must be a positive number",
        ),
        (
            "missing publisherRef",
            with(r(), "publisherRef", Value::Null),
            "spec.publisherRef: Required value",
        ),
        (
            "bound with time and position",
            with(r(), "from", json!({"time": "2026-01-01T00:00:00Z", "position": 3})),
            "exactly one of time or position",
        ),
        (
            "negative position",
            with(r(), "from", json!({"position": -1})),
            "must not be negative",
        ),
        (
            "rewind without from.time",
            with(
                with(r(), "from", Value::Null),
                "consumerGroupRewind",
                json!({"group": "billing"}),
            ),
            "consumerGroupRewind needs from.time",
        ),
        (
            "rewind with a target",
            with(
                with(r(), "consumerGroupRewind", json!({"group": "billing"})),
                "target",
                json!({"destination": "x"}),
            ),
            "consumerGroupRewind re-publishes nothing",
        ),
    ];
    expect_refused(&api, &resource, cases).await;

    // A valid ReplayJob is accepted, and then its spec cannot change.
    let created = create(&api, &resource, "window", r())
        .await
        .unwrap_or_else(|e| panic!("valid ReplayJob refused: {e}"));
    assert_eq!(created.data["spec"]["source"], "eventStore", "{}", created.data);
    assert_eq!(created.data["spec"]["dryRun"], false, "{}", created.data);
    let mut changed = created.clone();
    changed.data["spec"]["rateLimit"] = json!(100);
    match api.replace("window", &PostParams::default(), &changed).await {
        Err(kube::Error::Api(status)) if status.code == 422 => assert!(
            status
                .message
                .contains("immutable once created: create a new ReplayJob"),
            "{}",
            status.message
        ),
        other => panic!("a spec change must be refused, got {other:?}"),
    }
    // Metadata may still change (labels, finalizers): only the spec is frozen.
    let mut labelled = api.get("window").await.expect("read ReplayJob");
    labelled
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("team".into(), "inventory".into());
    api.replace("window", &PostParams::default(), &labelled)
        .await
        .expect("a label change is allowed");
}
