//! SNS/SQS over HTTPS with a private CA (`snsSqs.caFile`), against the moto TLS instance that
//! presents the local CA's server certificate (`hack/components/moto.sh`).

use std::time::Duration;

use inventory_outbox::broker::Broker;
use inventory_outbox::broker::sns_sqs::{SnsSqsBroker, SnsSqsConfig, SnsSqsTarget};
use inventory_outbox::event::{DomainEvent, cloudevents};
use serde_json::{Value, json};

use super::{
    RelayProcess, env_or, postgres_verify_full, relay_document, scratch_dir, test_database_url, tls_file, write,
};
use crate::event_core::publisher;
use crate::relay::assert_delivered;
use crate::support::unique_name;

fn moto_tls() -> String {
    env_or("MOTO_TLS_ENDPOINT_URL", "https://127.0.0.1:15001")
}

fn sqs_broker(queue_dlq: &str, ca_file: Option<&std::path::Path>) -> Value {
    let mut broker = json!({
        "region": "us-east-1", "endpointUrl": moto_tls(), "target": "sqs", "fifo": true,
        "deadLetterQueue": format!("{queue_dlq}.fifo"),
        "accessKeyIdEnv": "AWS_ACCESS_KEY_ID", "secretAccessKeyEnv": "AWS_SECRET_ACCESS_KEY",
    });
    if let Some(ca) = ca_file {
        broker["caFile"] = json!(ca);
    }
    json!({"snsSqs": broker})
}

/// An SQS client of the test's own on the TLS instance, trusting the local CA.
async fn sqs_client() -> aws_sdk_sqs::Client {
    use aws_smithy_http_client::tls;
    inventory_outbox::tls::install_crypto_provider();
    let pem = std::fs::read(tls_file("ca.crt")).expect("CA file");
    let context = tls::TlsContext::builder()
        .with_trust_store(tls::TrustStore::empty().with_pem_certificate(pem))
        .build()
        .expect("TLS context");
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::AwsLc))
        .tls_context(context)
        .build_https();
    let sdk = aws_config::from_env()
        .endpoint_url(moto_tls())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .http_client(http)
        .load()
        .await;
    aws_sdk_sqs::Client::new(&sdk)
}

/// Receives and deletes until `expected` events arrived, then a little longer for duplicates.
async fn receive(queue: &str, expected: usize) -> Vec<DomainEvent> {
    let sqs = sqs_client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let url = loop {
        match sqs.get_queue_url().queue_name(queue).send().await {
            Ok(out) => break out.queue_url.expect("queue url"),
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "queue {queue} never appeared: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    let mut received = Vec::new();
    let mut quiet_rounds = 0;
    while received.len() < expected || quiet_rounds < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {expected} events arrived in {queue}",
            received.len()
        );
        let out = sqs
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .expect("receive");
        let messages = out.messages.unwrap_or_default();
        if messages.is_empty() && received.len() >= expected {
            quiet_rounds += 1;
        }
        for m in messages {
            let doc: Value = serde_json::from_str(m.body().unwrap_or_default()).expect("structured CloudEvent");
            received.push(cloudevents::from_structured(&doc).expect("CloudEvent"));
            // FIFO: the group's next message comes only once this one is gone.
            sqs.delete_message()
                .queue_url(&url)
                .receipt_handle(m.receipt_handle().unwrap_or_default())
                .send()
                .await
                .expect("delete");
        }
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_ca_bundle_the_https_endpoint_keeps_the_relay_unready_and_with_it_every_event_arrives() {
    let (db, publisher) = publisher("tls_sqs_ca").await;
    let dir = scratch_dir("tls-sqs-ca");
    let queue = unique_name("tls-sqs");
    let routing = json!({"strategy": "single", "destination": queue});
    let doc = relay_document(
        "sqs-ca",
        sqs_broker(&format!("{queue}-dlq"), None),
        routing.clone(),
        postgres_verify_full(),
        &dir,
    );
    let mut relay = RelayProcess::start(&doc, &test_database_url(&db), &dir, "sqs-no-ca");
    let sent = write(&publisher, &db, 100).await;
    let endpoint = moto_tls();
    let reason = relay
        .wait_unready_because(Duration::from_secs(60), |body| {
            body.contains(&endpoint) && body.contains("UnknownIssuer")
        })
        .await;
    eprintln!("no CA bundle: /readyz says: {reason:?}");
    relay.stays_up_unready(Duration::from_secs(3)).await;
    relay.kill().await;

    let doc = relay_document(
        "sqs-ca",
        sqs_broker(&format!("{queue}-dlq"), Some(&tls_file("ca.crt"))),
        routing,
        postgres_verify_full(),
        &dir,
    );
    let mut relay = RelayProcess::start(&doc, &test_database_url(&db), &dir, "sqs-with-ca");
    relay.wait_ready(Duration::from_secs(60)).await;
    let received = receive(&format!("{queue}.fifo"), sent.len()).await;
    assert_delivered(&sent, &received, true);
    relay.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    db.drop().await;
}

#[tokio::test]
async fn a_ca_file_without_certificates_is_a_configuration_error_naming_the_field() {
    inventory_outbox::tls::install_crypto_provider();
    let dir = scratch_dir("tls-sqs-bad-ca");
    let empty = dir.join("ca.crt");
    std::fs::write(&empty, "not a certificate\n").expect("write");
    let config = SnsSqsConfig {
        endpoint_url: Some(moto_tls()),
        ca_file: Some(empty.clone()),
        ..SnsSqsConfig::new("us-east-1", SnsSqsTarget::Sqs)
    };
    let error = SnsSqsBroker::connect(config)
        .await
        .err()
        .expect("a CA file without certificates is refused")
        .to_string();
    assert!(
        error.contains("snsSqs.caFile") && error.contains(&empty.display().to_string()),
        "{error}"
    );

    // The same endpoint with the right bundle answers.
    let config = SnsSqsConfig {
        endpoint_url: Some(moto_tls()),
        ca_file: Some(tls_file("ca.crt")),
        access_key_id_env: Some("AWS_ACCESS_KEY_ID".into()),
        secret_access_key_env: Some("AWS_SECRET_ACCESS_KEY".into()),
        ..SnsSqsConfig::new("us-east-1", SnsSqsTarget::Sqs)
    };
    let broker = SnsSqsBroker::connect(config).await.expect("client");
    if let Err(e) = broker.check_health().await {
        panic!("SQS over HTTPS with the CA bundle: {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
