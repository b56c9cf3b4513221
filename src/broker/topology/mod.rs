//! Broker topology: the topics, exchanges and queues a publisher needs, created (and their
//! drift corrected) by the `provision` step before the relays start, and removed by `cleanup`
//! when the EventPublisher is deleted with `deletionPolicy: Delete`.
//!
//! Every broker module has the same shape: `provision(config, destinations)` returns a
//! [`ProvisionReport`] naming what it created, changed or found; `cleanup(config, resources)`
//! removes exactly the listed resources (the ones an earlier provision reported as created),
//! so a topic or queue that existed before the publisher is never deleted. The operator learns
//! the report from the provision container's termination message and keeps the created list
//! in the EventPublisher status; it never talks to the broker itself.

pub mod kafka;
pub mod rabbitmq;
pub mod sns_sqs;

use serde::{Deserialize, Serialize};

use crate::broker::BrokerConfig;

/// Kinds of broker resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ResourceKind {
    KafkaTopic,
    RabbitmqExchange,
    RabbitmqQueue,
    SnsTopic,
    SqsQueue,
}

/// One topic, exchange or queue.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    pub kind: ResourceKind,
    pub name: String,
}

impl Resource {
    pub fn new(kind: ResourceKind, name: impl Into<String>) -> Self {
        Self {
            kind,
            name: name.into(),
        }
    }
}

/// What one provision run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProvisionReport {
    /// Resources that did not exist and were created by this run.
    pub created: Vec<Resource>,
    /// Resources that existed and were changed to match the spec (drift corrected), with what
    /// changed.
    pub corrected: Vec<String>,
    /// Resources that existed and already matched.
    pub existing: Vec<Resource>,
}

/// What one cleanup run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CleanupReport {
    /// Resources deleted.
    pub deleted: Vec<Resource>,
    /// Resources that were already gone.
    pub missing: Vec<Resource>,
}

/// A topology that could not be provisioned or removed; each variant names the action.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("connect to the broker: {0}")]
    Connect(String),
    #[error("read the metadata of Kafka topic {topic}: {reason}")]
    DescribeTopic { topic: String, reason: String },
    #[error("create {resource}: {reason}")]
    Create { resource: String, reason: String },
    #[error(
        "Kafka topic {topic} has {current} partitions and the spec asks for {desired}: Kafka cannot remove partitions; raise topology.kafka.partitions back to at least {current} (or recreate the topic)"
    )]
    PartitionDecrease { topic: String, current: i32, desired: i32 },
    #[error("add partitions to Kafka topic {topic}: {reason}")]
    AddPartitions { topic: String, reason: String },
    #[error("correct the configuration of {resource}: {reason}")]
    AlterConfig { resource: String, reason: String },
    #[error("delete {resource}: {reason}")]
    Delete { resource: String, reason: String },
}

impl TopologyError {
    /// A stable label for metrics, conditions and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            TopologyError::Connect(_) => "BrokerUnreachable",
            TopologyError::DescribeTopic { .. } => "DescribeFailed",
            TopologyError::Create { .. } => "CreateFailed",
            TopologyError::PartitionDecrease { .. } => "PartitionDecreaseRefused",
            TopologyError::AddPartitions { .. } => "AddPartitionsFailed",
            TopologyError::AlterConfig { .. } => "AlterConfigFailed",
            TopologyError::Delete { .. } => "DeleteFailed",
        }
    }
}

/// Creates or corrects the topology of `broker`: `destinations` plus the dead-letter
/// destination and the broker's own fixed resources (exchange, queues).
pub async fn provision(broker: &BrokerConfig, destinations: &[String]) -> Result<ProvisionReport, TopologyError> {
    match broker {
        BrokerConfig::Kafka(c) => kafka::provision(c, destinations).await,
        BrokerConfig::Rabbitmq(c) => rabbitmq::provision(c, destinations).await,
        BrokerConfig::SnsSqs(c) => sns_sqs::provision(c, destinations).await,
    }
}

/// Deletes exactly `resources` (those of this broker's kinds).
pub async fn cleanup(broker: &BrokerConfig, resources: &[Resource]) -> Result<CleanupReport, TopologyError> {
    match broker {
        BrokerConfig::Kafka(c) => kafka::cleanup(c, resources).await,
        BrokerConfig::Rabbitmq(c) => rabbitmq::cleanup(c, resources).await,
        BrokerConfig::SnsSqs(c) => sns_sqs::cleanup(c, resources).await,
    }
}
