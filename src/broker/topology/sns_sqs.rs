//! SNS/SQS topology: the destination topics or queues and the dead-letter queue with the
//! redrive policy. The relay's adapter creates them (one definition of their attributes); this
//! module first checks which exist, so the report names what it created.

use aws_config::BehaviorVersion;

use super::{CleanupReport, ProvisionReport, Resource, ResourceKind, TopologyError};
use crate::broker::Broker;
use crate::broker::sns_sqs::{SnsSqsBroker, SnsSqsConfig, SnsSqsTarget};

struct Clients {
    sns: aws_sdk_sns::Client,
    sqs: aws_sdk_sqs::Client,
}

async fn clients(config: &SnsSqsConfig) -> Result<Clients, TopologyError> {
    crate::tls::install_crypto_provider();
    let mut loader =
        aws_config::defaults(BehaviorVersion::latest()).region(aws_config::Region::new(config.region.clone()));
    if let Some(url) = &config.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if let (Some(key_var), Some(secret_var)) = (&config.access_key_id_env, &config.secret_access_key_env) {
        let read = |var: &String| {
            std::env::var(var).map_err(|_| TopologyError::Connect(format!("environment variable {var} is not set")))
        };
        loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
            read(key_var)?,
            read(secret_var)?,
            None,
            None,
            "inventory-outbox-env",
        ));
    }
    let sdk = loader.load().await;
    Ok(Clients {
        sns: aws_sdk_sns::Client::new(&sdk),
        sqs: aws_sdk_sqs::Client::new(&sdk),
    })
}

/// Every topic and queue of this publisher, by their AWS names.
pub fn resources(config: &SnsSqsConfig, destinations: &[String]) -> Result<Vec<Resource>, TopologyError> {
    let kind = match config.target {
        SnsSqsTarget::Sns => ResourceKind::SnsTopic,
        SnsSqsTarget::Sqs => ResourceKind::SqsQueue,
    };
    let mut out = Vec::new();
    for destination in destinations {
        let name = config.physical_name(destination).map_err(|e| TopologyError::Create {
            resource: format!("destination {destination}"),
            reason: e.to_string(),
        })?;
        let resource = Resource::new(kind, name);
        if !out.contains(&resource) {
            out.push(resource);
        }
    }
    if let Some(dlq) = &config.dead_letter_queue {
        let resource = Resource::new(ResourceKind::SqsQueue, dlq.clone());
        if !out.contains(&resource) {
            out.push(resource);
        }
    }
    Ok(out)
}

async fn topic_arn(clients: &Clients, name: &str) -> Result<Option<String>, TopologyError> {
    let mut pages = clients.sns.list_topics().into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| TopologyError::Connect(format!("list SNS topics: {e}")))?;
        for topic in page.topics() {
            if let Some(arn) = topic.topic_arn()
                && arn.rsplit(':').next() == Some(name)
            {
                return Ok(Some(arn.to_owned()));
            }
        }
    }
    Ok(None)
}

async fn queue_url(clients: &Clients, name: &str) -> Result<Option<String>, TopologyError> {
    match clients.sqs.get_queue_url().queue_name(name).send().await {
        Ok(out) => Ok(out.queue_url().map(str::to_owned)),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_queue_does_not_exist()) => Ok(None),
        Err(e) => Err(TopologyError::Connect(format!(
            "look up SQS queue {name}: {}",
            aws_sdk_sqs::error::DisplayErrorContext(&e)
        ))),
    }
}

async fn exists(clients: &Clients, resource: &Resource) -> Result<bool, TopologyError> {
    Ok(match resource.kind {
        ResourceKind::SnsTopic => topic_arn(clients, &resource.name).await?.is_some(),
        _ => queue_url(clients, &resource.name).await?.is_some(),
    })
}

pub async fn provision(config: &SnsSqsConfig, destinations: &[String]) -> Result<ProvisionReport, TopologyError> {
    let clients = clients(config).await?;
    let mut report = ProvisionReport::default();
    for resource in resources(config, destinations)? {
        if exists(&clients, &resource).await? {
            report.existing.push(resource);
        } else {
            report.created.push(resource);
        }
    }
    let broker = SnsSqsBroker::connect(config.clone())
        .await
        .map_err(|e| TopologyError::Connect(e.to_string()))?;
    broker
        .ensure_destinations(destinations)
        .await
        .map_err(|e| TopologyError::Create {
            resource: format!("SNS/SQS destinations {destinations:?}"),
            reason: e.to_string(),
        })?;
    Ok(report)
}

pub async fn cleanup(config: &SnsSqsConfig, resources: &[Resource]) -> Result<CleanupReport, TopologyError> {
    let clients = clients(config).await?;
    let mut report = CleanupReport::default();
    for resource in resources {
        match resource.kind {
            ResourceKind::SnsTopic => match topic_arn(&clients, &resource.name).await? {
                Some(arn) => {
                    clients
                        .sns
                        .delete_topic()
                        .topic_arn(arn)
                        .send()
                        .await
                        .map_err(|e| TopologyError::Delete {
                            resource: format!("SNS topic {}", resource.name),
                            reason: aws_sdk_sns::error::DisplayErrorContext(&e).to_string(),
                        })?;
                    report.deleted.push(resource.clone());
                }
                None => report.missing.push(resource.clone()),
            },
            ResourceKind::SqsQueue => match queue_url(&clients, &resource.name).await? {
                Some(url) => {
                    clients
                        .sqs
                        .delete_queue()
                        .queue_url(url)
                        .send()
                        .await
                        .map_err(|e| TopologyError::Delete {
                            resource: format!("SQS queue {}", resource.name),
                            reason: aws_sdk_sqs::error::DisplayErrorContext(&e).to_string(),
                        })?;
                    report.deleted.push(resource.clone());
                }
                None => report.missing.push(resource.clone()),
            },
            _ => {}
        }
    }
    Ok(report)
}
