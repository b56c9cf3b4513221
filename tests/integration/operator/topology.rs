//! The `provision` and `cleanup` steps against the real brokers: what they create, correct,
//! refuse and remove, and that a resource that existed before is never removed.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

use inventory_outbox::broker::kafka::KafkaConfig;
use inventory_outbox::broker::rabbitmq::{QueueBinding, RabbitMqConfig};
use inventory_outbox::broker::sns_sqs::{SnsSqsConfig, SnsSqsTarget};
use inventory_outbox::broker::topology::{self, Resource, ResourceKind, TopologyError};

use crate::support::{amqp_url, aws_endpoint, aws_sdk_config, kafka_bootstrap, unique_name};

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .expect("admin client")
}

fn partitions(admin: &AdminClient<DefaultClientContext>) -> BTreeMap<String, usize> {
    admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata")
        .topics()
        .iter()
        .map(|t| (t.name().to_owned(), t.partitions().len()))
        .collect()
}

/// Waits until `check` holds for the cluster's topic map (topic creation and deletion reach
/// the metadata asynchronously).
async fn until_topics(what: &str, check: impl Fn(&BTreeMap<String, usize>) -> bool) {
    let admin = admin();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = partitions(&admin);
        if check(&now) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within 20 s; topics now: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn kafka_provision_creates_grows_refuses_shrinking_and_cleanup_removes_only_its_topics() {
    let stem = unique_name("topo");
    let topic = format!("{stem}.events");
    let dlq = format!("{stem}.dlq");
    let foreign = format!("{stem}.foreign");
    // A topic that exists before the publisher: provision reports it, cleanup leaves it.
    admin()
        .create_topics(
            &[NewTopic::new(&foreign, 2, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create foreign topic");
    until_topics("foreign topic visible", |t| t.contains_key(&foreign)).await;

    let mut config = KafkaConfig {
        bootstrap_servers: kafka_bootstrap(),
        dead_letter_topic: dlq.clone(),
        partitions: 2,
        ..KafkaConfig::default()
    };
    let destinations = vec![topic.clone(), foreign.clone()];
    let report = topology::kafka::provision(&config, &destinations)
        .await
        .expect("first provision");
    let mut created: Vec<&str> = report.created.iter().map(|r| r.name.as_str()).collect();
    created.sort();
    assert_eq!(created, vec![dlq.as_str(), topic.as_str()], "{report:?}");
    assert_eq!(
        report.existing,
        vec![Resource::new(ResourceKind::KafkaTopic, foreign.clone())],
        "{report:?}"
    );
    until_topics("created topics with 2 partitions", |t| {
        t.get(&topic) == Some(&2) && t.get(&dlq) == Some(&2)
    })
    .await;

    // Growing partitions and adding configuration corrects the existing topics.
    config.partitions = 4;
    config.topic_config.insert("retention.ms".into(), "3600000".into());
    let grown = topology::kafka::provision(&config, &destinations)
        .await
        .expect("second provision");
    assert!(grown.created.is_empty(), "{grown:?}");
    for t in [&topic, &dlq, &foreign] {
        assert!(
            grown
                .corrected
                .iter()
                .any(|c| c.contains(t.as_str()) && c.contains("partitions")),
            "{t} partitions corrected: {grown:?}"
        );
    }
    until_topics("topics grown to 4 partitions", |t| {
        [&topic, &dlq, &foreign].iter().all(|n| t.get(*n) == Some(&4))
    })
    .await;
    let again = topology::kafka::provision(&config, &destinations)
        .await
        .expect("third provision");
    assert!(
        again.corrected.is_empty() && again.created.is_empty(),
        "no drift left: {again:?}"
    );

    // Kafka cannot remove partitions: the step refuses and says what to do.
    config.partitions = 1;
    match topology::kafka::provision(&config, &destinations).await {
        Err(e @ TopologyError::PartitionDecrease { .. }) => {
            let message = e.to_string();
            assert!(message.contains("cannot remove partitions"), "{message}");
            assert!(
                message.contains("has 4 partitions and the spec asks for 1"),
                "{message}"
            );
            assert_eq!(e.reason(), "PartitionDecreaseRefused");
        }
        other => panic!("a partition decrease must be refused, got {other:?}"),
    }

    let cleaned = topology::kafka::cleanup(&config, &report.created)
        .await
        .expect("cleanup");
    assert_eq!(cleaned.deleted.len(), 2, "{cleaned:?}");
    until_topics("own topics deleted, foreign one kept", |t| {
        !t.contains_key(&topic) && !t.contains_key(&dlq) && t.contains_key(&foreign)
    })
    .await;
    let twice = topology::kafka::cleanup(&config, &report.created)
        .await
        .expect("second cleanup");
    assert_eq!(twice.missing.len(), 2, "already gone: {twice:?}");
    let _ = admin().delete_topics(&[foreign.as_str()], &AdminOptions::new()).await;
}

async fn rabbit_exists(connection: &Connection, resource: &Resource) -> bool {
    let channel = connection.create_channel().await.expect("channel");
    let passive_exchange = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let passive_queue = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let name = resource.name.as_str().into();
    match resource.kind {
        ResourceKind::RabbitmqExchange => channel
            .exchange_declare(name, ExchangeKind::Topic, passive_exchange, FieldTable::default())
            .await
            .is_ok(),
        _ => channel
            .queue_declare(name, passive_queue, FieldTable::default())
            .await
            .is_ok(),
    }
}

#[tokio::test]
async fn rabbitmq_provision_declares_exchanges_and_queues_and_cleanup_removes_them() {
    let exchange = unique_name("topo-x");
    let config = RabbitMqConfig {
        queues: vec![QueueBinding {
            name: format!("{exchange}.billing"),
            binding_key: "inventory.#".into(),
        }],
        ..RabbitMqConfig::new("AMQP_URL", exchange.clone())
    };
    let report = topology::rabbitmq::provision(&config, &[]).await.expect("provision");
    let names: Vec<String> = report.created.iter().map(|r| r.name.clone()).collect();
    assert_eq!(
        names,
        vec![
            exchange.clone(),
            format!("{exchange}.dlx"),
            format!("{exchange}.dlq"),
            format!("{exchange}.billing")
        ],
        "{report:?}"
    );
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    for resource in &report.created {
        assert!(
            rabbit_exists(&connection, resource).await,
            "{resource:?} exists after provision"
        );
    }
    let again = topology::rabbitmq::provision(&config, &[])
        .await
        .expect("second provision");
    assert!(again.created.is_empty() && again.existing.len() == 4, "{again:?}");

    let cleaned = topology::rabbitmq::cleanup(&config, &report.created)
        .await
        .expect("cleanup");
    assert_eq!(cleaned.deleted.len(), 4, "{cleaned:?}");
    for resource in &report.created {
        assert!(
            !rabbit_exists(&connection, resource).await,
            "{resource:?} is gone after cleanup"
        );
    }
}

#[tokio::test]
async fn sqs_provision_creates_queues_with_redrive_and_cleanup_removes_them() {
    let stem = unique_name("topo-q");
    let queue = format!("{stem}-events");
    let dlq = format!("{stem}-dlq");
    let config = SnsSqsConfig {
        endpoint_url: Some(aws_endpoint()),
        access_key_id_env: Some("AWS_ACCESS_KEY_ID".into()),
        secret_access_key_env: Some("AWS_SECRET_ACCESS_KEY".into()),
        dead_letter_queue: Some(dlq.clone()),
        ..SnsSqsConfig::new("us-east-1", SnsSqsTarget::Sqs)
    };
    let report = topology::sns_sqs::provision(&config, std::slice::from_ref(&queue))
        .await
        .expect("provision");
    assert_eq!(
        report.created,
        vec![
            Resource::new(ResourceKind::SqsQueue, queue.clone()),
            Resource::new(ResourceKind::SqsQueue, dlq.clone())
        ],
        "{report:?}"
    );
    let sqs = aws_sdk_sqs::Client::new(&aws_sdk_config().await);
    let url = sqs
        .get_queue_url()
        .queue_name(&queue)
        .send()
        .await
        .expect("queue exists")
        .queue_url()
        .map(str::to_owned)
        .expect("queue url");
    let attributes = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy)
        .send()
        .await
        .expect("queue attributes");
    let redrive = attributes
        .attributes()
        .and_then(|a| a.get(&aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy))
        .cloned()
        .unwrap_or_default();
    assert!(
        redrive.contains(&dlq),
        "redrive policy names the dead-letter queue: {redrive:?}"
    );

    let cleaned = topology::sns_sqs::cleanup(&config, &report.created)
        .await
        .expect("cleanup");
    assert_eq!(cleaned.deleted.len(), 2, "{cleaned:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = sqs.get_queue_url().queue_name(&queue).send().await.is_ok()
            || sqs.get_queue_url().queue_name(&dlq).send().await.is_ok();
        if !left {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queues still there 10 s after cleanup"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
