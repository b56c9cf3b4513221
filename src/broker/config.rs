//! Which broker a publisher uses, as its configuration file says (exactly one of Kafka,
//! RabbitMQ and SNS/SQS), and connecting that broker's adapter: the one place the three
//! adapters are chosen, for the relay, the replay Job and the benches alike.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::kafka::KafkaConfig;
use super::rabbitmq::RabbitMqConfig;
use super::sns_sqs::SnsSqsConfig;
use super::{AdapterConfig, Broker, build_adapter};
use crate::schema::registry::SchemaRegistry;
use crate::store::Store;

/// Exactly one broker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum BrokerConfig {
    /// Apache Kafka.
    Kafka(KafkaConfig),
    /// RabbitMQ.
    Rabbitmq(RabbitMqConfig),
    /// Amazon SNS or SQS.
    SnsSqs(SnsSqsConfig),
}

impl BrokerConfig {
    /// Checks that `name` is usable as a destination of this broker; the message names it.
    pub fn check_destination(&self, name: &str) -> Result<(), String> {
        match self {
            BrokerConfig::Kafka(_) => super::kafka::check_topic_name(name)
                .map_err(|reason| format!("Kafka topic name {name:?} is invalid: it {reason}")),
            BrokerConfig::Rabbitmq(_) => {
                if name.is_empty() || name.len() > 255 {
                    Err(format!(
                        "RabbitMQ routing key {name:?} must be 1 to 255 bytes (it is {})",
                        name.len()
                    ))
                } else {
                    Ok(())
                }
            }
            BrokerConfig::SnsSqs(c) => {
                if !c.fifo && name.ends_with(".fifo") {
                    return Err(format!(
                        "destination {name:?} names a FIFO topic or queue but snsSqs.fifo is false"
                    ));
                }
                c.physical_name(name).map(|_| ()).map_err(|e| e.message().to_owned())
            }
        }
    }
}

impl BrokerConfig {
    /// Connects the configured broker adapter. Kafka in the Confluent wire format needs the
    /// registry's ids: use [`connect_with_registry`](Self::connect_with_registry) for it.
    pub async fn connect(&self) -> anyhow::Result<Arc<dyn Broker>> {
        if let BrokerConfig::Kafka(c) = self
            && c.wire_format.is_confluent()
        {
            anyhow::bail!(
                "broker.kafka.wireFormat confluent needs the schema registry: connect with connect_with_registry"
            );
        }
        Ok(match self {
            BrokerConfig::Kafka(c) => build_adapter(c).await?,
            BrokerConfig::Rabbitmq(c) => build_adapter(c).await?,
            BrokerConfig::SnsSqs(c) => build_adapter(c).await?,
        })
    }

    /// Connects the configured broker adapter; Kafka in the Confluent wire format frames
    /// values with schema ids from the registry in `store`.
    pub async fn connect_with_registry(&self, store: &Store) -> anyhow::Result<Arc<dyn Broker>> {
        match self {
            BrokerConfig::Kafka(c) if c.wire_format.is_confluent() => {
                let registry = SchemaRegistry::new(store.clone());
                let framing = super::confluent::ConfluentFraming::new(c.mode, c.wire_format, registry)?;
                Ok(Arc::new(c.build().await?.with_confluent_framing(framing)))
            }
            _ => self.connect().await,
        }
    }
}
