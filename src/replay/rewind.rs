//! Consumer-group rewind: replays without re-publishing by moving a Kafka consumer group's
//! committed offsets on the publisher's topics back to the first offset at or after a time
//! (Kafka's offsets-for-times, which compares the records' timestamps: the time the relay
//! produced them). Refused while the group has members, who would overwrite the offsets.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::broker::kafka::KafkaConfig;
use crate::broker::routing::Routing;
use crate::crd::replay_job::PartitionOffsets;
use crate::event::inventory::EventType;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a rewind did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RewindError {
    #[error("connect a Kafka client for consumer group {group}: {message}")]
    Connect { group: String, message: String },
    #[error("describe consumer group {group}: {message}")]
    DescribeGroup { group: String, message: String },
    #[error("consumer group {group} has {members} active member(s): stop its consumers before rewinding it")]
    ActiveMembers { group: String, members: usize },
    #[error("read topic metadata: {0}")]
    Metadata(String),
    #[error("none of the publisher's topics exists ({0})")]
    NoTopics(String),
    #[error("look up offsets for {time} on {topic}: {message}")]
    OffsetsForTimes {
        topic: String,
        time: DateTime<Utc>,
        message: String,
    },
    #[error("read the committed offsets of consumer group {group}: {message}")]
    Committed { group: String, message: String },
    #[error("commit the rewound offsets of consumer group {group}: {message}")]
    Commit { group: String, message: String },
    #[error("the rewind task ended abnormally: {0}")]
    Task(String),
}

impl RewindError {
    /// A stable reason for the ReplayJob's condition.
    pub fn reason(&self) -> &'static str {
        match self {
            RewindError::ActiveMembers { .. } => "GroupHasActiveMembers",
            RewindError::NoTopics(_) => "NoTopics",
            _ => "RewindFailed",
        }
    }
}

/// Every topic the publisher's routing can send to (the templates filled with each known event
/// type, aggregate type and schema version), before checking which exist.
pub fn candidate_topics(routing: &Routing) -> Vec<String> {
    let mut topics: Vec<String> = match routing {
        Routing::Single { destination } => vec![destination.clone()],
        Routing::PerAggregateType { .. } | Routing::PerEventType { .. } => EventType::ALL
            .iter()
            .flat_map(|t| {
                (1..=t.current_version()).map(move |version| {
                    let event = crate::event::DomainEvent {
                        event_id: uuid::Uuid::nil(),
                        event_type: t.as_str().to_owned(),
                        aggregate_id: String::new(),
                        aggregate_type: t.aggregate_type().to_owned(),
                        timestamp: DateTime::<Utc>::UNIX_EPOCH,
                        version,
                        metadata: Default::default(),
                        payload: serde_json::Value::Null,
                    };
                    routing.destination(&event)
                })
            })
            .collect(),
    };
    topics.sort();
    topics.dedup();
    topics
}

/// Rewinds (or, on a dry run, computes the rewind of) `group` on the publisher's topics.
pub async fn rewind(
    config: &KafkaConfig,
    routing: &Routing,
    group: &str,
    from: DateTime<Utc>,
    dry_run: bool,
) -> Result<Vec<PartitionOffsets>, RewindError> {
    let config = config.clone();
    let candidates = candidate_topics(routing);
    let group = group.to_owned();
    tokio::task::spawn_blocking(move || rewind_blocking(&config, &candidates, &group, from, dry_run))
        .await
        .map_err(|e| RewindError::Task(e.to_string()))?
}

fn rewind_blocking(
    config: &KafkaConfig,
    candidates: &[String],
    group: &str,
    from: DateTime<Utc>,
    dry_run: bool,
) -> Result<Vec<PartitionOffsets>, RewindError> {
    let connect = |message: String| RewindError::Connect {
        group: group.to_owned(),
        message,
    };
    let mut client = config.client_config().map_err(|e| connect(e.to_string()))?;
    // The producer's tuning means nothing to a consumer.
    for key in config.producer_overrides.keys() {
        client.remove(key.trim());
    }
    let consumer: BaseConsumer = client
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| connect(e.to_string()))?;

    let groups = consumer
        .fetch_group_list(Some(group), TIMEOUT)
        .map_err(|e| RewindError::DescribeGroup {
            group: group.to_owned(),
            message: e.to_string(),
        })?;
    let members = groups
        .groups()
        .iter()
        .filter(|g| g.name() == group)
        .map(|g| g.members().len())
        .sum::<usize>();
    if members > 0 {
        return Err(RewindError::ActiveMembers {
            group: group.to_owned(),
            members,
        });
    }

    let metadata = consumer
        .fetch_metadata(None, TIMEOUT)
        .map_err(|e| RewindError::Metadata(e.to_string()))?;
    let mut wanted = TopicPartitionList::new();
    let mut plain = TopicPartitionList::new();
    for topic in metadata
        .topics()
        .iter()
        .filter(|t| candidates.iter().any(|c| c == t.name()))
    {
        for partition in topic.partitions() {
            wanted
                .add_partition_offset(topic.name(), partition.id(), Offset::Offset(from.timestamp_millis()))
                .map_err(|e| RewindError::Metadata(e.to_string()))?;
            plain.add_partition(topic.name(), partition.id());
        }
    }
    if wanted.count() == 0 {
        return Err(RewindError::NoTopics(candidates.join(", ")));
    }
    let found = consumer
        .offsets_for_times(wanted, TIMEOUT)
        .map_err(|e| RewindError::OffsetsForTimes {
            topic: candidates.join(","),
            time: from,
            message: e.to_string(),
        })?;
    let before = consumer
        .committed_offsets(plain, TIMEOUT)
        .map_err(|e| RewindError::Committed {
            group: group.to_owned(),
            message: e.to_string(),
        })?;

    let mut target = TopicPartitionList::new();
    let mut offsets = Vec::new();
    for element in found.elements() {
        let (topic, partition) = (element.topic().to_owned(), element.partition());
        // No record at or after the time: the group resumes at the end, receiving only new ones.
        let after = match element.offset() {
            Offset::Offset(o) => o,
            _ => {
                consumer
                    .fetch_watermarks(&topic, partition, TIMEOUT)
                    .map_err(|e| RewindError::OffsetsForTimes {
                        topic: topic.clone(),
                        time: from,
                        message: e.to_string(),
                    })?
                    .1
            }
        };
        let before = before.find_partition(&topic, partition).and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        });
        target
            .add_partition_offset(&topic, partition, Offset::Offset(after))
            .map_err(|e| RewindError::Metadata(e.to_string()))?;
        offsets.push(PartitionOffsets {
            topic,
            partition,
            before,
            after,
        });
    }
    offsets.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    if !dry_run {
        consumer
            .commit(&target, CommitMode::Sync)
            .map_err(|e| RewindError::Commit {
                group: group.to_owned(),
                message: e.to_string(),
            })?;
    }
    Ok(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_topics_follow_the_routing() {
        let single = Routing::Single {
            destination: "inventory".into(),
        };
        assert_eq!(candidate_topics(&single), ["inventory"]);
        let per_aggregate = Routing::PerAggregateType {
            template: "inv.{aggregateType}".into(),
        };
        let topics = candidate_topics(&per_aggregate);
        assert!(topics.contains(&"inv.InventoryItem".to_owned()), "{topics:?}");
        assert!(
            topics.len() < EventType::ALL.len(),
            "one per aggregate type: {topics:?}"
        );
    }
}
