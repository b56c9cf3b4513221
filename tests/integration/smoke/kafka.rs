//! The real Kafka (KRaft): create a topic, produce with acks=all and idempotence, consume it.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};

use crate::support::{kafka_bootstrap, unique_name};

#[tokio::test]
async fn an_idempotent_message_is_produced_and_consumed() {
    let topic = unique_name("smoke");
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", kafka_bootstrap());

    let admin: AdminClient<DefaultClientContext> = config.create().expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topic (is `make env-up` done?)");
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    let producer: FutureProducer = config
        .clone()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let delivery = producer
        .send(
            FutureRecord::to(&topic)
                .key("item-42")
                .payload("stock changed")
                .headers(OwnedHeaders::new().insert(Header {
                    key: "ce_id",
                    value: Some("evt-1"),
                })),
            Duration::from_secs(10),
        )
        .await
        .expect("delivered");

    let consumer: StreamConsumer = config
        .clone()
        .set("group.id", unique_name("smoke-group"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).unwrap();
    let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("a message within 30 s")
        .expect("consume");
    assert_eq!(message.partition(), delivery.partition);
    assert_eq!(message.key(), Some(&b"item-42"[..]));
    assert_eq!(message.payload(), Some(&b"stock changed"[..]));
    let header = message.headers().expect("headers").get(0);
    assert_eq!((header.key, header.value), ("ce_id", Some(&b"evt-1"[..])));
}
