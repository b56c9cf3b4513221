//! Prints CloudEvents arriving on a Kafka topic, one line each, until N new ones arrived.
//! `cargo run --example watch_topic -- TOPIC N` (used by `make demo`). With
//! `WATCH_FROM=earliest` it reads the topic from its start instead (the demo counts what arrived).

use std::time::Duration;

use inventory_outbox::event::cloudevents;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let topic = args.next().unwrap_or_else(|| "inventory-events".into());
    let wanted: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(10);
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", format!("demo-{}", uuid::Uuid::new_v4().simple()))
        .set(
            "auto.offset.reset",
            if std::env::var("WATCH_FROM").as_deref() == Ok("earliest") {
                "earliest"
            } else {
                "latest"
            },
        )
        .create()?;
    consumer.subscribe(&[&topic])?;
    for _ in 0..wanted {
        let message = tokio::time::timeout(Duration::from_secs(60), consumer.recv()).await??;
        let headers: Vec<(String, String)> = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let event = cloudevents::from_binary(
            &headers,
            message.payload().unwrap_or_default(),
            cloudevents::KAFKA_PREFIX,
        )?;
        println!(
            "kafka {topic}[{}]@{}  {:<26} aggregate={} correlation={}",
            message.partition(),
            message.offset(),
            event.event_type,
            event.aggregate_id,
            event.metadata.correlation_id.unwrap_or_default()
        );
        // The CloudEvents attributes as they travel: binary mode puts them in ce_* headers.
        let ce: Vec<String> = headers
            .iter()
            .filter(|(k, _)| k.starts_with(cloudevents::KAFKA_PREFIX))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("    {}", ce.join(" "));
    }
    Ok(())
}
