//! `ReplayJob`: replay a range of stored events (or a publisher's dead letters) to the broker,
//! or rewind a Kafka consumer group, run once as a batch Job. The spec cannot change after
//! creation: a different replay is a new ReplayJob.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::LocalObjectRef;

/// A one-off replay of events through an EventPublisher's database and broker.
// clippy reads the repeated `type_` keys of separate printcolumn(...) entries as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "outbox.inventory.io",
    version = "v1alpha1",
    kind = "ReplayJob",
    namespaced,
    status = "ReplayJobStatus",
    shortname = "rpj",
    category = "outbox",
    printcolumn(
        name = "Publisher",
        type_ = "string",
        json_path = ".spec.publisherRef.name",
        description = "The EventPublisher replayed through"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Running, Succeeded, Failed or Cancelled"
    ),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress",
        description = "Share of the matched events replayed"
    ),
    printcolumn(
        name = "Replayed",
        type_ = "integer",
        json_path = ".status.replayed",
        description = "Events sent and acknowledged"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self == oldSelf")
        .message("a ReplayJob's spec is immutable once created: create a new ReplayJob for a different replay"),
    validation = Rule::new("!has(self.from) || !has(self.to) || !has(self.from.time) || !has(self.to.time) || self.from.time <= self.to.time")
        .message("from.time must not be after to.time"),
    validation = Rule::new("!has(self.from) || !has(self.to) || !has(self.from.position) || !has(self.to.position) || self.from.position <= self.to.position")
        .message("from.position must not be greater than to.position"),
    validation = Rule::new("!has(self.consumerGroupRewind) || (has(self.from) && has(self.from.time))")
        .message("consumerGroupRewind needs from.time: the group is rewound to the first offset at or after it"),
    validation = Rule::new("!has(self.consumerGroupRewind) || (self.source == 'eventStore' && !has(self.target) && !has(self.rateLimit))")
        .message("consumerGroupRewind re-publishes nothing: it cannot be combined with source deadLetters, target or rateLimit"),
)]
pub struct ReplayJobSpec {
    /// The EventPublisher (same namespace) whose database, broker and routing are used.
    pub publisher_ref: LocalObjectRef,
    /// Where the replay starts (inclusive); the beginning of the history when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<ReplayBound>,
    /// Where the replay ends (inclusive); the events committed when the replay starts when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<ReplayBound>,
    /// Which events of the range are replayed; all of them when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<ReplayFilter>,
    /// Where replayed events go; the publisher's own routing when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<ReplayTarget>,
    /// Most events sent per second; unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0 && self <= 1000000").message("rateLimit must be a positive number of events per second, at most 1000000"))]
    pub rate_limit: Option<i64>,
    /// Count the matching events without sending anything.
    #[serde(default)]
    pub dry_run: bool,
    /// `eventStore`: the stored history; `deadLetters`: re-send the publisher's dead-lettered
    /// events matching the filter and mark them delivered on success.
    #[serde(default)]
    pub source: ReplaySource,
    /// Kafka only: instead of re-publishing, rewind this consumer group on the publisher's
    /// topics to the first offset at or after `from.time`. Refused while the group has members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_group_rewind: Option<ConsumerGroupRewind>,
}

/// One end of a replay range: a commit time or an outbox position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.time) != has(self.position)")
        .message("a replay bound sets exactly one of time or position")
)]
pub struct ReplayBound {
    /// An RFC 3339 time: events stored at or after (`from`) / at or before (`to`) it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<DateTime<Utc>>,
    /// An outbox position (the events table's global position).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("a replay position must not be negative"))]
    pub position: Option<i64>,
}

/// Event filters; an event must match every list that is set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplayFilter {
    /// Event types, e.g. `StockLevelChanged`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(min = 1, max = 255)))]
    pub event_types: Vec<String>,
    /// Aggregate types, e.g. `InventoryItem`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(min = 1, max = 255)))]
    pub aggregate_types: Vec<String>,
    /// Aggregate ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(min = 1, max = 255)))]
    pub aggregate_ids: Vec<String>,
}

/// An override of the publisher's routing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplayTarget {
    /// The one destination every replayed event goes to: a Kafka topic, a RabbitMQ routing key
    /// on the publisher's exchange, or an SNS topic / SQS queue.
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[a-zA-Z0-9._:-]+$"))]
    pub destination: String,
}

/// What is replayed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ReplaySource {
    /// The stored event history.
    #[default]
    EventStore,
    /// The publisher's dead-lettered events (redrive).
    DeadLetters,
}

/// A Kafka consumer group to rewind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerGroupRewind {
    /// The consumer group id.
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub group: String,
}

/// Progress of the replay, mirrored from its Pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplayJobStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where the replay is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ReplayPhase>,
    /// Events in the range that match the filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched: Option<i64>,
    /// Events sent and acknowledged by the broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed: Option<i64>,
    /// Events that could not be sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<i64>,
    /// `replayed / matched` as a percentage, e.g. `42%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Outbox position of the last checkpoint; a restarted Pod resumes after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<i64>,
    /// When the replay Pod started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the replay ended (succeeded, failed or was cancelled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Consumer-group offsets before and after a rewind, per partition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offsets: Vec<PartitionOffsets>,
    /// Ready, PublisherFound and Complete, with reasons and messages.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// Lifecycle of a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ReplayPhase {
    /// Accepted; the Job has not started yet (or the publisher is missing).
    Pending,
    /// The replay Pod is sending.
    Running,
    /// Every matched event was sent.
    Succeeded,
    /// The Job gave up.
    Failed,
    /// The ReplayJob was deleted while running.
    Cancelled,
}

/// One partition's consumer-group offset, before and after a rewind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionOffsets {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
    /// Committed offset before the rewind (absent when the group had none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<i64>,
    /// Offset set by the rewind (or that a dry run would set).
    pub after: i64,
}
