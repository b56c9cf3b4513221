//! Kafka topology: the routing destinations and the dead-letter topic, with the asked
//! partitions (increase only), replication factor and topic configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, NewPartitions, NewTopic, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use super::{CleanupReport, ProvisionReport, Resource, ResourceKind, TopologyError};
use crate::broker::kafka::KafkaConfig;

const TIMEOUT: Duration = Duration::from_secs(15);

fn options() -> AdminOptions {
    AdminOptions::new()
        .operation_timeout(Some(TIMEOUT))
        .request_timeout(Some(TIMEOUT))
}

fn admin(config: &KafkaConfig) -> Result<Arc<AdminClient<DefaultClientContext>>, TopologyError> {
    let client = config
        .client_config()
        .map_err(|e| TopologyError::Connect(e.to_string()))?
        .create()
        .map_err(|e| TopologyError::Connect(format!("create the Kafka admin client: {e}")))?;
    Ok(Arc::new(client))
}

/// Partition count of every existing topic. Asks for all topics: a metadata request naming a
/// missing topic could auto-create it on brokers with `auto.create.topics.enable`.
async fn partition_counts(
    admin: &Arc<AdminClient<DefaultClientContext>>,
) -> Result<BTreeMap<String, i32>, TopologyError> {
    let admin = admin.clone();
    tokio::task::spawn_blocking(move || {
        admin.inner().fetch_metadata(None, TIMEOUT).map(|m| {
            m.topics()
                .iter()
                .map(|t| {
                    (
                        t.name().to_owned(),
                        i32::try_from(t.partitions().len()).unwrap_or(i32::MAX),
                    )
                })
                .collect()
        })
    })
    .await
    .map_err(|e| TopologyError::Connect(format!("metadata task: {e}")))?
    .map_err(|e| TopologyError::Connect(format!("fetch Kafka cluster metadata: {e}")))
}

/// The topics of this publisher: `destinations` and the dead-letter topic.
pub fn topics(config: &KafkaConfig, destinations: &[String]) -> BTreeSet<String> {
    destinations
        .iter()
        .cloned()
        .chain([config.dead_letter_topic.clone()])
        .filter(|t| !t.is_empty())
        .collect()
}

pub async fn provision(config: &KafkaConfig, destinations: &[String]) -> Result<ProvisionReport, TopologyError> {
    let admin = admin(config)?;
    let wanted = topics(config, destinations);
    let current = partition_counts(&admin).await?;
    let mut report = ProvisionReport::default();

    // Refuse before changing anything: a decrease is a spec error, not a partial rollout.
    for topic in &wanted {
        if let Some(&have) = current.get(topic)
            && have > config.partitions
        {
            return Err(TopologyError::PartitionDecrease {
                topic: topic.clone(),
                current: have,
                desired: config.partitions,
            });
        }
    }

    let missing: Vec<&String> = wanted.iter().filter(|t| !current.contains_key(*t)).collect();
    if !missing.is_empty() {
        let min_insync = config.min_insync_replicas.map(|r| r.to_string());
        let new_topics: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|name| crate::broker::kafka::new_topic(config, name, min_insync.as_deref()))
            .collect();
        let results = admin
            .create_topics(&new_topics, &options())
            .await
            .map_err(|e| TopologyError::Create {
                resource: format!("Kafka topics {missing:?}"),
                reason: e.to_string(),
            })?;
        for result in results {
            match result {
                Ok(name) => report.created.push(Resource::new(ResourceKind::KafkaTopic, name)),
                // Created by someone else in between: not ours to delete later.
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    report.existing.push(Resource::new(ResourceKind::KafkaTopic, name))
                }
                Err((name, code)) => {
                    return Err(TopologyError::Create {
                        resource: format!("Kafka topic {name}"),
                        reason: code.to_string(),
                    });
                }
            }
        }
    }

    let existing: Vec<&String> = wanted.iter().filter(|t| current.contains_key(*t)).collect();
    for topic in &existing {
        let have = current.get(*topic).copied().unwrap_or_default();
        if have < config.partitions {
            let count = usize::try_from(config.partitions).unwrap_or_default();
            let results = admin
                .create_partitions(&[NewPartitions::new(topic, count)], &options())
                .await
                .map_err(|e| TopologyError::AddPartitions {
                    topic: (*topic).clone(),
                    reason: e.to_string(),
                })?;
            for result in results {
                if let Err((name, code)) = result {
                    return Err(TopologyError::AddPartitions {
                        topic: name,
                        reason: code.to_string(),
                    });
                }
            }
            report.corrected.push(format!(
                "Kafka topic {topic}: partitions {have} -> {}",
                config.partitions
            ));
        }
    }

    if !config.topic_config.is_empty() && !existing.is_empty() {
        correct_configs(&admin, config, &existing, &mut report).await?;
    }
    for topic in existing {
        if !report
            .corrected
            .iter()
            .any(|c| c.starts_with(&format!("Kafka topic {topic}:")))
        {
            report
                .existing
                .push(Resource::new(ResourceKind::KafkaTopic, topic.clone()));
        }
    }
    Ok(report)
}

/// Sets the configured entries on topics where they differ. Kafka's AlterConfigs replaces the
/// topic's whole dynamic configuration, so entries not in the spec return to their defaults:
/// the spec is the topic's configuration.
async fn correct_configs(
    admin: &AdminClient<DefaultClientContext>,
    config: &KafkaConfig,
    topics: &[&String],
    report: &mut ProvisionReport,
) -> Result<(), TopologyError> {
    let specifiers: Vec<ResourceSpecifier<'_>> = topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let described =
        admin
            .describe_configs(&specifiers, &options())
            .await
            .map_err(|e| TopologyError::DescribeTopic {
                topic: format!("{topics:?}"),
                reason: e.to_string(),
            })?;
    for (topic, result) in topics.iter().zip(described) {
        let resource = result.map_err(|code| TopologyError::DescribeTopic {
            topic: (*topic).clone(),
            reason: code.to_string(),
        })?;
        let entries = resource.entry_map();
        let drift: Vec<String> = config
            .topic_config
            .iter()
            .filter(|(k, v)| entries.get(k.as_str()).and_then(|e| e.value.as_deref()) != Some(v.as_str()))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if drift.is_empty() {
            continue;
        }
        let alter = config
            .topic_config
            .iter()
            .fold(AlterConfig::new(ResourceSpecifier::Topic(topic)), |a, (k, v)| {
                a.set(k, v)
            });
        let results = admin
            .alter_configs(&[alter], &options())
            .await
            .map_err(|e| TopologyError::AlterConfig {
                resource: format!("Kafka topic {topic}"),
                reason: e.to_string(),
            })?;
        for result in results {
            if let Err((_, code)) = result {
                return Err(TopologyError::AlterConfig {
                    resource: format!("Kafka topic {topic}"),
                    reason: code.to_string(),
                });
            }
        }
        report
            .corrected
            .push(format!("Kafka topic {topic}: config {}", drift.join(", ")));
    }
    Ok(())
}

pub async fn cleanup(config: &KafkaConfig, resources: &[Resource]) -> Result<CleanupReport, TopologyError> {
    let names: Vec<&str> = resources
        .iter()
        .filter(|r| r.kind == ResourceKind::KafkaTopic)
        .map(|r| r.name.as_str())
        .collect();
    let mut report = CleanupReport::default();
    if names.is_empty() {
        return Ok(report);
    }
    let admin = admin(config)?;
    let results = admin
        .delete_topics(&names, &options())
        .await
        .map_err(|e| TopologyError::Delete {
            resource: format!("Kafka topics {names:?}"),
            reason: e.to_string(),
        })?;
    for result in results {
        match result {
            Ok(name) => report.deleted.push(Resource::new(ResourceKind::KafkaTopic, name)),
            Err((name, RDKafkaErrorCode::UnknownTopicOrPartition)) => {
                report.missing.push(Resource::new(ResourceKind::KafkaTopic, name))
            }
            Err((name, code)) => {
                return Err(TopologyError::Delete {
                    resource: format!("Kafka topic {name}"),
                    reason: code.to_string(),
                });
            }
        }
    }
    Ok(report)
}
