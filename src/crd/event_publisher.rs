//! `EventPublisher`: one outbox relayed to one broker. The spec is what a service team
//! declares; the status is what the operator learned from the relay Pods and the Deployment.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{AwsCredentialsRef, SecretKeyRef, TlsSecretRefs, UsernamePasswordRef};
use super::names;
use crate::broker::CloudEventsMode;
use crate::broker::kafka::{KafkaCompression, KafkaSaslMechanism, KafkaSecurityProtocol};
use crate::broker::sns_sqs::SnsSqsTarget;
use crate::delivery::WakeUp;
use crate::schema::compatibility::CompatibilityMode;

/// An outbox in PostgreSQL relayed to exactly one broker by relay workers the operator runs.
// clippy reads the repeated `type_` keys of separate printcolumn(...) entries as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "outbox.inventory.io",
    version = "v1alpha1",
    kind = "EventPublisher",
    namespaced,
    status = "EventPublisherStatus",
    shortname = "evp",
    category = "outbox",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether events flow to the broker"
    ),
    printcolumn(
        name = "Broker",
        type_ = "string",
        json_path = ".status.broker",
        description = "Broker kind"
    ),
    printcolumn(
        name = "Circuit",
        type_ = "string",
        json_path = ".status.circuitState",
        description = "Worst circuit state over the destinations"
    ),
    printcolumn(
        name = "Workers",
        type_ = "string",
        json_path = ".status.workers",
        description = "Ready / desired relay workers"
    ),
    printcolumn(
        name = "Pending",
        type_ = "integer",
        json_path = ".status.pendingEvents",
        description = "Events not yet published"
    ),
    printcolumn(
        name = "Failed",
        type_ = "integer",
        json_path = ".status.failedEventCount",
        description = "Events retrying or dead-lettered"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(format!(
        "!has(self.broker.kafka) || ({}) && ({}) && ({}) && (!has(self.deadLetter.destination) || {})",
        "!has(self.routing.destination) || ".to_owned() + &names::kafka_topic("self.routing.destination"),
        "!has(self.routing.template) || ".to_owned() + &names::kafka_topic(&names::filled_template("self.routing.template")),
        "self.topology.destinations.all(d, ".to_owned() + &names::kafka_topic("d") + ")",
        names::kafka_topic("self.deadLetter.destination"),
    )).message("Kafka topic names (routing destination or template, topology.destinations, deadLetter.destination) must be 1-249 characters of letters, digits, '.', '_' or '-'"),
    validation = Rule::new(format!(
        "!has(self.broker.rabbitmq) || ({}) && ({}) && ({})",
        "!has(self.routing.destination) || ".to_owned() + &names::rabbitmq_routing_key("self.routing.destination"),
        "!has(self.routing.template) || ".to_owned() + &names::rabbitmq_routing_key(&names::filled_template("self.routing.template")),
        "self.topology.destinations.all(d, ".to_owned() + &names::rabbitmq_routing_key("d") + ")",
    )).message("RabbitMQ routing keys (routing destination or template, topology.destinations) must be 1-255 characters of letters, digits, '.', '_', ':' or '-'"),
    validation = Rule::new(format!(
        "!has(self.broker.rabbitmq) || ((!has(self.deadLetter.destination) || {}) && (!has(self.deadLetter.queue) || {}) && (!has(self.topology.rabbitmq) || self.topology.rabbitmq.queues.all(q, {})))",
        names::rabbitmq_name("self.deadLetter.destination"),
        names::rabbitmq_name("self.deadLetter.queue"),
        names::rabbitmq_name("q.name"),
    )).message("RabbitMQ exchange and queue names (deadLetter.destination, deadLetter.queue, topology.rabbitmq.queues[].name) must be 1-255 characters of letters, digits, '.', '_', ':' or '-' and must not start with 'amq.'"),
    validation = Rule::new(format!(
        "!has(self.broker.snsSqs) || ({}) && ({}) && ({}) && (!has(self.deadLetter.destination) || {})",
        "!has(self.routing.destination) || ".to_owned() + &names::sns_sqs_name("self.routing.destination"),
        "!has(self.routing.template) || ".to_owned() + &names::sns_sqs_name(&names::filled_template("self.routing.template")),
        "self.topology.destinations.all(d, ".to_owned() + &names::sns_sqs_name("d") + ")",
        names::sns_sqs_name("self.deadLetter.destination"),
    )).message("SNS topic and SQS queue names (routing destination or template, topology.destinations, deadLetter.destination) must be at most 80 characters of letters, digits, '_' or '-', optionally ending in '.fifo'"),
    validation = Rule::new(
        "!has(self.broker.snsSqs) || self.broker.snsSqs.fifo || ((!has(self.routing.destination) || !self.routing.destination.endsWith('.fifo')) && self.topology.destinations.all(d, !d.endsWith('.fifo')) && (!has(self.deadLetter.destination) || !self.deadLetter.destination.endsWith('.fifo')))"
    ).message("names ending in '.fifo' are FIFO topics or queues: set broker.snsSqs.fifo: true or drop the suffix"),
    validation = Rule::new(
        "!has(self.broker.snsSqs) || !self.broker.snsSqs.fifo || !has(self.deadLetter.destination) || self.deadLetter.destination.endsWith('.fifo')"
    ).message("with broker.snsSqs.fifo: true the dead-letter queue (deadLetter.destination) must be a FIFO queue whose name ends in '.fifo'"),
    validation = Rule::new("!has(self.deadLetter.queue) || has(self.broker.rabbitmq)")
        .message("deadLetter.queue is a RabbitMQ queue: it is only allowed with broker.rabbitmq"),
    validation = Rule::new("!has(self.topology.kafka) || has(self.broker.kafka)")
        .message("topology.kafka is only allowed with broker.kafka"),
    validation = Rule::new("!has(self.topology.rabbitmq) || has(self.broker.rabbitmq)")
        .message("topology.rabbitmq is only allowed with broker.rabbitmq"),
    validation = Rule::new("!has(self.topology.snsSqs) || has(self.broker.snsSqs)")
        .message("topology.snsSqs is only allowed with broker.snsSqs"),
)]
pub struct EventPublisherSpec {
    /// The PostgreSQL outbox the relays read.
    pub outbox: OutboxSpec,
    /// The broker events are published to: exactly one of `kafka`, `rabbitmq` or `snsSqs`.
    pub broker: BrokerSpec,
    /// Which destination (topic, routing key or queue) each event goes to.
    pub routing: RoutingSpec,
    /// Broker resources created before the relays start (and removed on deletion with
    /// `deletionPolicy: Delete`).
    #[serde(default)]
    pub topology: TopologySpec,
    /// Where events go that exhausted their retries or were refused permanently.
    #[serde(default)]
    pub dead_letter: DeadLetterSpec,
    /// Backoff of failed deliveries before an event is dead-lettered.
    #[serde(default)]
    pub retry: RetrySpec,
    /// When a relay stops sending to an unhealthy destination, and how it probes it again.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerSpec,
    /// How relay replicas hold their shares of the outbox's shards.
    #[serde(default)]
    pub leases: LeaseSpec,
    /// Event schema registration.
    #[serde(default)]
    pub schema: SchemaSpec,
    /// Number of relay workers; they share the outbox's 64 shards under leases.
    #[serde(default = "default_replicas")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 32").message("replicas must be between 1 and 32 (use paused: true to stop the relays)"))]
    pub replicas: i32,
    /// Compute resources of each relay container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// What happens to broker resources (topics, exchanges, queues) when the EventPublisher is
    /// deleted: `Retain` (the default) leaves them, `Delete` removes those this publisher
    /// created, from a cleanup Job that mounts the publisher's Secrets.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Stop the relays (the Deployment scales to zero); events keep accumulating in the outbox
    /// and are published when the publisher resumes. Nothing is lost.
    #[serde(default)]
    pub paused: bool,
    /// Secret key holding the bearer token of the relays' admin API (failed and dead-lettered
    /// events). Without it the admin API is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_secret_ref: Option<SecretKeyRef>,
}

fn default_replicas() -> i32 {
    1
}

/// The PostgreSQL outbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.minPollIntervalMs <= self.maxPollIntervalMs")
        .message("outbox.minPollIntervalMs must not be greater than outbox.maxPollIntervalMs")
)]
pub struct OutboxSpec {
    /// Secret key holding the PostgreSQL connection URL, credentials included
    /// (`postgres://user:password@host:5432/db`). Mounted as a file into the relay Pods; a
    /// changed Secret restarts the relays.
    pub database_url_secret_ref: SecretKeyRef,
    /// PostgreSQL schema of the outbox tables (created by the provision step).
    #[serde(default = "default_schema")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z_][a-z0-9_]*$')").message("outbox.schema must start with a lowercase letter or '_' and contain only lowercase letters, digits and '_'"))]
    pub schema: String,
    /// Shortest wait between polls while idle, in milliseconds (a NOTIFY wakes a relay earlier);
    /// with `wakeUp: poll`, the interval at which an idle relay polls.
    #[serde(default = "default_min_poll")]
    #[schemars(range(min = 1, max = 60000))]
    pub min_poll_interval_ms: i64,
    /// Longest wait between polls while idle, in milliseconds.
    #[serde(default = "default_max_poll")]
    #[schemars(range(min = 1, max = 300000))]
    pub max_poll_interval_ms: i64,
    /// How an idle relay learns of new events: `notify` (the default: writers send one NOTIFY
    /// per inserting statement and an idle relay is woken at once) or `poll` (relays poll
    /// every `minPollIntervalMs`, and writers skip the NOTIFY while every running relay and
    /// handler dispatcher on the schema polls). PostgreSQL commits notifying transactions one
    /// at a time, so `poll` suits many concurrent small writers.
    #[serde(default)]
    pub wake_up: WakeUp,
    /// Most events a relay reads and sends in one round.
    #[serde(default = "default_batch_size")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 10000").message("outbox.batchSize must be between 1 and 10000"))]
    pub batch_size: i32,
    /// Database connections of one relay worker (one listens for NOTIFY).
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 2, max = 64))]
    pub max_connections: i32,
    /// TLS towards PostgreSQL: verify-full against the CA from `caSecretRef` (overriding the
    /// URL's `sslmode`), optionally with a client certificate. Absent: the URL decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSecretRefs>,
}

fn default_schema() -> String {
    crate::store::SchemaName::DEFAULT.into()
}
fn default_min_poll() -> i64 {
    5
}
fn default_max_poll() -> i64 {
    500
}
fn default_batch_size() -> i32 {
    1000
}
fn default_max_connections() -> i32 {
    8
}

/// Exactly one broker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("[has(self.kafka), has(self.rabbitmq), has(self.snsSqs)].filter(x, x).size() == 1")
        .message("broker must set exactly one of kafka, rabbitmq or snsSqs")
)]
pub struct BrokerSpec {
    /// Apache Kafka.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaBrokerSpec>,
    /// RabbitMQ (AMQP 0-9-1) with publisher confirms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<RabbitMqBrokerSpec>,
    /// Amazon SNS topics or SQS queues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sns_sqs: Option<SnsSqsBrokerSpec>,
}

/// Apache Kafka connection and producer settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("(self.securityProtocol == 'sasl_plaintext' || self.securityProtocol == 'sasl_ssl') == has(self.credentialsSecretRef)")
        .message("broker.kafka.credentialsSecretRef is required with securityProtocol sasl_plaintext or sasl_ssl, and only allowed with them"),
    validation = Rule::new("!has(self.credentialsSecretRef) || has(self.saslMechanism)")
        .message("broker.kafka.saslMechanism is required with credentialsSecretRef"),
    validation = Rule::new("self.lingerMs < self.messageTimeoutMs")
        .message("broker.kafka.lingerMs must be less than messageTimeoutMs"),
)]
pub struct KafkaBrokerSpec {
    /// Comma-separated `host:port` list of brokers to bootstrap from.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^[a-zA-Z0-9.-]+:[0-9]{1,5}(, *[a-zA-Z0-9.-]+:[0-9]{1,5})*$')").message("broker.kafka.bootstrapServers must be a comma-separated list of host:port"))]
    pub bootstrap_servers: String,
    /// Client id the brokers see in request logs and quotas.
    #[serde(default = "default_client_id")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub client_id: String,
    /// CloudEvents content mode: `binary` (attributes as `ce_` headers) or `structured` (one
    /// `application/cloudevents+json` document).
    #[serde(default)]
    pub mode: CloudEventsMode,
    /// Compression of record batches.
    #[serde(default)]
    pub compression: KafkaCompression,
    /// Protocol towards the brokers.
    #[serde(default)]
    pub security_protocol: KafkaSecurityProtocol,
    /// SASL mechanism; required with the SASL protocols.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<KafkaSaslMechanism>,
    /// Secret holding the SASL username and password; required with the SASL protocols.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<UsernamePasswordRef>,
    /// TLS with `ssl` and `sasl_ssl`: the brokers' CA and a client certificate for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSecretRefs>,
    /// How long a record may wait for its acknowledgement, retries included, in milliseconds.
    #[serde(default = "default_message_timeout_ms")]
    #[schemars(range(min = 1000, max = 600000))]
    pub message_timeout_ms: i64,
    /// How long the producer waits to fill a batch, in milliseconds.
    #[serde(default = "default_linger_ms")]
    #[schemars(range(min = 0, max = 1000))]
    pub linger_ms: i64,
}

fn default_client_id() -> String {
    "inventory-outbox".into()
}
fn default_message_timeout_ms() -> i64 {
    30_000
}
fn default_linger_ms() -> i64 {
    1
}

/// RabbitMQ connection and publishing settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RabbitMqBrokerSpec {
    /// Secret key holding the AMQP URL, credentials included (`amqp://user:password@host:5672/vhost`).
    pub url_secret_ref: SecretKeyRef,
    /// Durable topic exchange the events are published to; the routing key is the destination.
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new(names::rabbitmq_name("self")).message("broker.rabbitmq.exchange must be 1-255 characters of letters, digits, '.', '_', ':' or '-' and must not start with 'amq.'"))]
    pub exchange: String,
    /// How long to wait for publisher confirms of a batch, in milliseconds.
    #[serde(default = "default_confirm_timeout_ms")]
    #[schemars(range(min = 100, max = 600000))]
    pub confirm_timeout_ms: i64,
    /// How long to wait for connecting and for each declaration, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    #[schemars(range(min = 100, max = 600000))]
    pub connect_timeout_ms: i64,
    /// Publish with the `mandatory` flag, so a message no queue is bound for counts as a
    /// failure instead of being dropped.
    #[serde(default = "default_true")]
    pub mandatory: bool,
    /// TLS for an `amqps` URL: the broker's CA and an optional client certificate.
    /// `insecureSkipVerify` is not supported for RabbitMQ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSecretRefs>,
}

fn default_confirm_timeout_ms() -> i64 {
    10_000
}
fn default_connect_timeout_ms() -> i64 {
    10_000
}
fn default_true() -> bool {
    true
}

/// Amazon SNS or SQS settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnsSqsBrokerSpec {
    /// AWS region of the topics and queues, e.g. `eu-west-1`.
    #[schemars(length(min = 1, max = 32), regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"))]
    pub region: String,
    /// Endpoint override for SNS and SQS (an SNS/SQS-compatible service); the AWS endpoints
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^ ]+$')").message("broker.snsSqs.endpointUrl must be an http:// or https:// URL"))]
    pub endpoint_url: Option<String>,
    /// Secret key holding a PEM CA bundle trusted for HTTPS besides the system roots, for an
    /// `endpointUrl` whose certificate a private CA signed (the AWS SDK for Rust does not read
    /// `AWS_CA_BUNDLE`). Mounted as a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// `sns`: destinations are SNS topics; `sqs`: destinations are SQS queues.
    pub target: SnsSqsTarget,
    /// FIFO topics or queues: per-aggregate order (the message group is the aggregate id) and
    /// deduplication by event id. Names get the `.fifo` suffix when missing.
    #[serde(default)]
    pub fifo: bool,
    /// CloudEvents content mode; `structured` by default.
    #[serde(default = "default_sns_sqs_mode")]
    pub mode: CloudEventsMode,
    /// Secret holding a static access key pair; the default AWS credential chain (workload
    /// identity) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<AwsCredentialsRef>,
}

fn default_sns_sqs_mode() -> CloudEventsMode {
    CloudEventsMode::Structured
}

/// How events are spread over destinations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.strategy == 'single' ? (has(self.destination) && !has(self.template)) : (has(self.template) && !has(self.destination))")
        .message("routing: strategy single needs destination (and no template); perAggregateType and perEventType need template (and no destination)"),
    validation = Rule::new("!has(self.template) || self.template.replace('{eventType}', '').replace('{aggregateType}', '').replace('{version}', '').matches('^[^{}]*$')")
        .message("routing.template may only use the placeholders {eventType}, {aggregateType} and {version}"),
)]
pub struct RoutingSpec {
    /// `single` (every event to `destination`), `perAggregateType` or `perEventType`
    /// (destinations from `template`).
    #[serde(default)]
    pub strategy: RoutingStrategy,
    /// The one destination of strategy `single`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub destination: Option<String>,
    /// Destination template with `{eventType}`, `{aggregateType}` and `{version}`, e.g.
    /// `inventory.{eventType}.v{version}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200))]
    pub template: Option<String>,
}

/// Routing strategies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RoutingStrategy {
    /// Every event to one destination.
    #[default]
    Single,
    /// One destination per aggregate type.
    PerAggregateType,
    /// One destination per event type.
    PerEventType,
}

/// Broker resources the provision step creates and keeps in shape.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopologySpec {
    /// Destinations to create ahead of the first event (templates cannot be listed in advance);
    /// the single routing destination and the dead-letter destination are always created.
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(min = 1, max = 255)))]
    pub destinations: Vec<String>,
    /// Kafka topic settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaTopologySpec>,
    /// RabbitMQ queues and bindings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<RabbitMqTopologySpec>,
    /// SQS queue settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sns_sqs: Option<SnsSqsTopologySpec>,
}

/// Kafka topic settings of the topics this publisher creates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaTopologySpec {
    /// Partitions of each topic. Can be increased later, never decreased (Kafka cannot).
    #[serde(default = "default_partitions")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 10000").message("topology.kafka.partitions must be between 1 and 10000"))]
    pub partitions: i32,
    /// Replication factor of each topic; unset uses the broker's `default.replication.factor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 32").message("topology.kafka.replicationFactor must be between 1 and 32"))]
    pub replication_factor: Option<i32>,
    /// `min.insync.replicas` of each topic (with acks=all, the replicas that must hold a record
    /// before it counts as published); unset uses the broker's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 32").message("topology.kafka.minInsyncReplicas must be between 1 and 32"))]
    pub min_insync_replicas: Option<i32>,
    /// Topic configuration entries, e.g. `retention.ms`, `min.insync.replicas`.
    #[serde(default)]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["name".into()]))]
    pub config_entries: Vec<ConfigEntry>,
}

fn default_partitions() -> i32 {
    6
}

/// One topic configuration entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigEntry {
    /// Configuration name, e.g. `retention.ms`.
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[a-z0-9]+([._][a-z0-9]+)*$"))]
    pub name: String,
    /// Configuration value.
    #[schemars(length(max = 1024))]
    pub value: String,
}

/// RabbitMQ consumer queues bound to the exchange.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RabbitMqTopologySpec {
    /// Durable queues (dead-lettering to the dead-letter exchange) bound to the exchange.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub queues: Vec<QueueBindingSpec>,
}

/// One queue and its binding key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueBindingSpec {
    /// Queue name.
    #[schemars(length(min = 1, max = 255))]
    pub name: String,
    /// Topic binding key, e.g. `inventory.#`.
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[a-zA-Z0-9._:*#-]+$"))]
    pub binding_key: String,
}

/// SQS settings of the queues this publisher creates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnsSqsTopologySpec {
    /// Receives of a message before SQS moves it to the dead-letter queue (redrive policy).
    #[serde(default = "default_max_receive_count")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_receive_count: i32,
}

fn default_max_receive_count() -> i32 {
    5
}

/// Dead-letter destination.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterSpec {
    /// Kafka: the dead-letter topic (default `<name>.dlq`); RabbitMQ: the dead-letter exchange
    /// (default `<exchange>.dlx`); SNS/SQS: the dead-letter SQS queue (none by default: dead
    /// letters are then only recorded in the outbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub destination: Option<String>,
    /// RabbitMQ only: the queue bound to the dead-letter exchange (default `<exchange>.dlq`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub queue: Option<String>,
    /// Keep an aggregate blocked behind its dead-lettered event until it is retried or
    /// resolved, for consumers that need strict per-aggregate order with no gaps. Off by
    /// default: the aggregate's later events go on and consumers see a gap.
    #[serde(default)]
    pub block_aggregate: bool,
}

/// Exponential backoff of failed deliveries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.maxIntervalMs >= self.initialIntervalMs")
        .message("retry.maxIntervalMs must be at least retry.initialIntervalMs")
)]
pub struct RetrySpec {
    /// Delay after the first failed attempt, in milliseconds.
    #[serde(default = "default_initial_interval")]
    #[schemars(range(min = 1, max = 3600000))]
    pub initial_interval_ms: i64,
    /// Factor by which the delay grows after each further failure; at least 1.
    #[serde(default = "default_multiplier")]
    #[x_kube(validation = Rule::new("self >= 1.0 && self <= 100.0").message("retry.multiplier must be between 1 and 100"))]
    pub multiplier: f64,
    /// Upper bound of the delay, in milliseconds.
    #[serde(default = "default_max_interval")]
    #[schemars(range(min = 1, max = 86400000))]
    pub max_interval_ms: i64,
    /// Send attempts (the first included) before an event is dead-lettered.
    #[serde(default = "default_max_attempts")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("retry.maxAttempts must be between 1 and 1000"))]
    pub max_attempts: i32,
    /// Random spread of each delay, between 0 and 1 (0 disables jitter).
    #[serde(default = "default_jitter")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 1.0").message("retry.jitter must be between 0 and 1"))]
    pub jitter: f64,
}

fn default_initial_interval() -> i64 {
    500
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_max_interval() -> i64 {
    60_000
}
fn default_max_attempts() -> i32 {
    10
}
fn default_jitter() -> f64 {
    0.2
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            initial_interval_ms: default_initial_interval(),
            multiplier: default_multiplier(),
            max_interval_ms: default_max_interval(),
            max_attempts: default_max_attempts(),
            jitter: default_jitter(),
        }
    }
}

/// Shard leases of the relay replicas: each renews its leases every heartbeat, and a replica
/// silent for a whole lease loses its shards to the others.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.durationMs >= 2 * self.heartbeatIntervalMs")
        .message("leases.durationMs must be at least twice leases.heartbeatIntervalMs")
)]
pub struct LeaseSpec {
    /// How long a lease lasts without renewal, in milliseconds. A crashed replica's shards move
    /// after about this plus one heartbeat; a replica stalled longer (an overloaded node, a slow
    /// database) loses its shards mid-batch, and that batch is sent again by the new holder.
    #[serde(default = "default_lease_duration")]
    #[schemars(range(min = 200, max = 600000))]
    pub duration_ms: i64,
    /// How often a replica renews its leases and writes its heartbeat, in milliseconds.
    #[serde(default = "default_lease_heartbeat")]
    #[schemars(range(min = 100, max = 300000))]
    pub heartbeat_interval_ms: i64,
}

fn default_lease_duration() -> i64 {
    2000
}
fn default_lease_heartbeat() -> i64 {
    500
}

impl Default for LeaseSpec {
    fn default() -> Self {
        Self {
            duration_ms: default_lease_duration(),
            heartbeat_interval_ms: default_lease_heartbeat(),
        }
    }
}

/// Circuit breaker per destination.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    /// Consecutive retriable failures that open the circuit.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 10000))]
    pub failure_threshold: i32,
    /// Share of failed sends within `windowMs` that opens the circuit (greater than 0, at most 1).
    #[serde(default = "default_failure_rate")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("circuitBreaker.failureRateThreshold must be greater than 0 and at most 1"))]
    pub failure_rate_threshold: f64,
    /// Sends within the window before `failureRateThreshold` applies.
    #[serde(default = "default_minimum_calls")]
    #[schemars(range(min = 1, max = 100000))]
    pub minimum_calls: i32,
    /// Sliding window of `failureRateThreshold`, in milliseconds.
    #[serde(default = "default_window")]
    #[schemars(range(min = 100, max = 3600000))]
    pub window_ms: i64,
    /// How long an open circuit rejects sends before probing, in milliseconds.
    #[serde(default = "default_open_duration")]
    #[x_kube(validation = Rule::new("self >= 100 && self <= 3600000").message("circuitBreaker.openDurationMs must be between 100 and 3600000"))]
    pub open_duration_ms: i64,
    /// Probe sends while half-open; all must succeed to close the circuit.
    #[serde(default = "default_half_open_probes")]
    #[schemars(range(min = 1, max = 100))]
    pub half_open_probes: i32,
}

fn default_failure_threshold() -> i32 {
    5
}
fn default_failure_rate() -> f64 {
    0.5
}
fn default_minimum_calls() -> i32 {
    20
}
fn default_window() -> i64 {
    30_000
}
fn default_open_duration() -> i64 {
    10_000
}
fn default_half_open_probes() -> i32 {
    1
}

impl Default for CircuitBreakerSpec {
    fn default() -> Self {
        Self {
            failure_threshold: default_failure_threshold(),
            failure_rate_threshold: default_failure_rate(),
            minimum_calls: default_minimum_calls(),
            window_ms: default_window(),
            open_duration_ms: default_open_duration(),
            half_open_probes: default_half_open_probes(),
        }
    }
}

/// Event schema registration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchemaSpec {
    /// Compatibility mode of event schema subjects created by the provision step.
    #[serde(default)]
    pub compatibility: CompatibilityMode,
}

/// What deletion does to broker resources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// Leave every topic, exchange and queue in place.
    #[default]
    Retain,
    /// Remove the topics, exchanges and queues this publisher created.
    Delete,
}

/// What the operator observed, from the relay Pods and the Deployment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventPublisherStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, BrokerReady, OutboxReady, CircuitClosed, WorkersAvailable, TopologyProvisioned,
    /// Paused, Deleting and DeadLettering (True while events are being dead-lettered), each
    /// with a reason and a message saying what is wrong.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Broker kind: `kafka`, `rabbitmq` or `snsSqs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// Worst circuit state over all destinations and relays: `Closed`, `HalfOpen`, `Open`, or
    /// `Unknown` when no relay answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_state: Option<String>,
    /// Circuit state of each destination that is not closed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub circuits: Vec<DestinationCircuit>,
    /// Events retrying or dead-lettered (failed-event rows not yet delivered or resolved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_event_count: Option<i64>,
    /// Events dead-lettered and not yet redelivered or resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_lettered_count: Option<i64>,
    /// Events committed but not yet published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_events: Option<i64>,
    /// Age of the oldest unpublished event, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age_seconds: Option<i64>,
    /// Events published since the outbox was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_total: Option<i64>,
    /// When an event was last acknowledged by the broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_published_time: Option<Time>,
    /// Relay workers ready.
    #[serde(default)]
    pub ready_workers: i32,
    /// Relay workers wanted (0 while paused).
    #[serde(default)]
    pub desired_workers: i32,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<String>,
    /// Broker resources the provision step created for this publisher (not those that existed
    /// before it): what `deletionPolicy: Delete` removes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provisioned_resources: Vec<ProvisionedResource>,
}

/// A topic, exchange or queue this publisher created.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProvisionedResource {
    /// `kafkaTopic`, `rabbitmqExchange`, `rabbitmqQueue`, `snsTopic` or `sqsQueue`.
    pub kind: String,
    /// Name of the resource on the broker.
    pub name: String,
}

/// The circuit of one destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationCircuit {
    /// Topic, routing key or queue.
    pub destination: String,
    /// `Closed`, `HalfOpen` or `Open`.
    pub state: String,
}
