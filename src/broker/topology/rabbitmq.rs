//! RabbitMQ topology: the topic exchange, the dead-letter exchange and queue, and the consumer
//! queues with their bindings. The relay's adapter declares them (one definition of their
//! arguments); this module first checks which exist, so the report names what it created.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

use super::{CleanupReport, ProvisionReport, Resource, ResourceKind, TopologyError};
use crate::broker::Broker;
use crate::broker::rabbitmq::{RabbitMqBroker, RabbitMqConfig};

const TIMEOUT: Duration = Duration::from_secs(15);

/// Every exchange and queue of this publisher.
pub fn resources(config: &RabbitMqConfig) -> Vec<Resource> {
    let mut out = vec![
        Resource::new(ResourceKind::RabbitmqExchange, config.exchange.clone()),
        Resource::new(ResourceKind::RabbitmqExchange, config.dead_letter_exchange()),
        Resource::new(ResourceKind::RabbitmqQueue, config.dead_letter_queue()),
    ];
    for q in &config.queues {
        let queue = Resource::new(ResourceKind::RabbitmqQueue, q.name.clone());
        if !out.contains(&queue) {
            out.push(queue);
        }
    }
    out
}

async fn connect(config: &RabbitMqConfig) -> Result<Connection, TopologyError> {
    let url = match (&config.url_env, &config.url) {
        (Some(var), _) => std::env::var(var)
            .map_err(|_| TopologyError::Connect(format!("environment variable {var} (rabbitmq.urlEnv) is not set")))?,
        (None, Some(url)) => url.clone(),
        (None, None) => return Err(TopologyError::Connect("rabbitmq.urlEnv is missing".into())),
    };
    // The URL carries credentials: errors name the server's answer, never the URL.
    match tokio::time::timeout(
        TIMEOUT,
        Connection::connect(url.trim(), ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(TopologyError::Connect(format!("connect to RabbitMQ: {e}"))),
        Err(_) => Err(TopologyError::Connect(format!(
            "connect to RabbitMQ: no answer within {TIMEOUT:?}"
        ))),
    }
}

/// Whether the resource exists: a passive declare on its own channel (a missing resource
/// closes the channel with 404).
async fn exists(connection: &Connection, resource: &Resource) -> Result<bool, TopologyError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| TopologyError::Connect(format!("open a RabbitMQ channel: {e}")))?;
    let check = async {
        match resource.kind {
            ResourceKind::RabbitmqExchange => channel
                .exchange_declare(
                    resource.name.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|_| ()),
            _ => channel
                .queue_declare(
                    resource.name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|_| ()),
        }
    };
    let result = tokio::time::timeout(TIMEOUT, check).await;
    let _ = channel.close(200, "topology check done".into()).await;
    match result {
        Ok(Ok(())) => Ok(true),
        Ok(Err(e)) if e.to_string().contains("NOT_FOUND") || e.to_string().contains("404") => Ok(false),
        Ok(Err(e)) => Err(TopologyError::DescribeTopic {
            topic: format!("RabbitMQ {:?} {}", resource.kind, resource.name),
            reason: e.to_string(),
        }),
        Err(_) => Err(TopologyError::Connect(format!(
            "RabbitMQ passive declare: no answer within {TIMEOUT:?}"
        ))),
    }
}

pub async fn provision(config: &RabbitMqConfig, _destinations: &[String]) -> Result<ProvisionReport, TopologyError> {
    // Routing keys need no declaration: the exchange routes them to the bound queues.
    let connection = connect(config).await?;
    let mut missing = Vec::new();
    let mut present = Vec::new();
    for resource in resources(config) {
        if exists(&connection, &resource).await? {
            present.push(resource);
        } else {
            missing.push(resource);
        }
    }
    let _ = connection.close(200, "topology checked".into()).await;
    let broker = RabbitMqBroker::new(config.clone()).map_err(|e| TopologyError::Connect(e.to_string()))?;
    broker
        .ensure_destinations(&[])
        .await
        .map_err(|e| TopologyError::Create {
            resource: format!("RabbitMQ exchange {} and its queues", config.exchange),
            reason: e.to_string(),
        })?;
    Ok(ProvisionReport {
        created: missing,
        corrected: Vec::new(),
        existing: present,
    })
}

pub async fn cleanup(config: &RabbitMqConfig, resources: &[Resource]) -> Result<CleanupReport, TopologyError> {
    let ours: Vec<&Resource> = resources
        .iter()
        .filter(|r| matches!(r.kind, ResourceKind::RabbitmqExchange | ResourceKind::RabbitmqQueue))
        .collect();
    let mut report = CleanupReport::default();
    if ours.is_empty() {
        return Ok(report);
    }
    let connection = connect(config).await?;
    for resource in ours {
        if !exists(&connection, resource).await? {
            report.missing.push(resource.clone());
            continue;
        }
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| TopologyError::Connect(format!("open a RabbitMQ channel: {e}")))?;
        let deleted = match resource.kind {
            ResourceKind::RabbitmqExchange => channel
                .exchange_delete(resource.name.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .map(|_| ()),
            _ => channel
                .queue_delete(resource.name.as_str().into(), QueueDeleteOptions::default())
                .await
                .map(|_| ()),
        };
        deleted.map_err(|e| TopologyError::Delete {
            resource: format!("RabbitMQ {:?} {}", resource.kind, resource.name),
            reason: e.to_string(),
        })?;
        let _ = channel.close(200, "deleted".into()).await;
        report.deleted.push(resource.clone());
    }
    let _ = connection.close(200, "cleanup done".into()).await;
    Ok(report)
}
