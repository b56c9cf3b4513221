//! The outbox relay process: its configuration file, start-up (store, broker, registry), the
//! Secret-file watch and the status it reports. Its loop is the delivery engine
//! ([`crate::delivery::Engine`]) driving the configured broker adapter; the process around it
//! (HTTP server, admin API) is composed in `app`.

pub mod config;
pub mod secret_watch;
pub mod startup;
pub mod status;

use std::sync::Arc;

use crate::broker::Broker;
use config::BrokerConfig;

/// Connects the configured broker adapter. Kafka in the Confluent wire format needs the
/// registry's ids: use [`connect_broker_with_registry`] for it.
pub async fn connect_broker(config: &BrokerConfig) -> anyhow::Result<Arc<dyn Broker>> {
    if let BrokerConfig::Kafka(c) = config
        && c.wire_format.is_confluent()
    {
        anyhow::bail!(
            "broker.kafka.wireFormat confluent needs the schema registry: connect with connect_broker_with_registry"
        );
    }
    use crate::broker::build_adapter;
    Ok(match config {
        BrokerConfig::Kafka(c) => build_adapter(c).await?,
        BrokerConfig::Rabbitmq(c) => build_adapter(c).await?,
        BrokerConfig::SnsSqs(c) => build_adapter(c).await?,
    })
}

/// Connects the configured broker adapter; Kafka in the Confluent wire format frames values
/// with schema ids from the registry in `store`.
pub async fn connect_broker_with_registry(
    config: &BrokerConfig,
    store: &crate::store::Store,
) -> anyhow::Result<Arc<dyn Broker>> {
    match config {
        BrokerConfig::Kafka(c) if c.wire_format.is_confluent() => {
            let registry = crate::schema::registry::SchemaRegistry::new(store.clone());
            let framing = crate::broker::confluent::ConfluentFraming::new(c.mode, c.wire_format, registry)?;
            Ok(Arc::new(
                crate::broker::AdapterConfig::build(c)
                    .await?
                    .with_confluent_framing(framing),
            ))
        }
        _ => connect_broker(config).await,
    }
}
