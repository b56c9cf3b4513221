//! Relay → SNS (moto, a standard topic): how full the `SendMessageBatch` calls are, with one `send_batch` per
//! relay batch next to the strict per-aggregate waves the relay sent before, in one process.
//!
//! The outbox gets its own schema with a skewed workload (a fifth of the events on a few hot
//! aggregates): with strict waves a hot aggregate splits a batch into many waves, and each
//! wave's last call is short; with one call per batch the hot aggregates ride along one entry
//! per call (no call carries two entries of one aggregate). moto is a Python process, so the rate says little
//! about SNS/SQS themselves; the calls-per-event figures are what the target is about. An SNS
//! topic, not an SQS queue: moto's `SendMessageBatch` slows with every message a queue holds
//! (FIFO: 40 ms per call at first, 1.3 s after 300 calls; a standard queue took 120 s for 2,000
//! events), while the adapter plans `PublishBatch` and `SendMessageBatch` calls the same way.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use inventory_outbox::broker::Broker;
use inventory_outbox::broker::BrokerConfig;
use inventory_outbox::broker::sns_sqs::{SendStats, SnsSqsBroker};
use inventory_outbox::publisher::{InventoryEventPublisher, PublisherConfig};
use inventory_outbox::store::{SchemaName, Store};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Env, ThroughputRun, TimedBroker, draft, relay_config, relay_until_in};

/// Events in the SQS outbox.
pub const SQS_EVENTS: usize = 10_000;
/// Every `HOT_EVERY`th event goes to one of `HOT_AGGREGATES`; the rest spread over `AGGREGATES`.
const HOT_EVERY: usize = 5;
const HOT_AGGREGATES: usize = 4;
const AGGREGATES: usize = 1000;
const BATCH: usize = 1000;
const SCHEMA: &str = "bench_sqs";

/// One relay run to SNS and the adapter's call counters over it.
pub struct SqsRun {
    pub run: ThroughputRun,
    pub stats: SendStats,
}

/// Both runs (one call per batch, then strict waves) against one topic each.
pub async fn sqs_runs(env: &Env, pool: &PgPool) -> anyhow::Result<Vec<SqsRun>> {
    let schema = SchemaName::new(SCHEMA)?;
    let store = Store::from_pool(pool.clone(), schema.clone());
    let publisher = InventoryEventPublisher::setup(store, PublisherConfig::default()).await?;
    let hot: Vec<Uuid> = (0..HOT_AGGREGATES).map(|_| Uuid::now_v7()).collect();
    let spread: Vec<Uuid> = (0..AGGREGATES).map(|_| Uuid::now_v7()).collect();
    for chunk in 0..SQS_EVENTS / BATCH {
        let drafts = (0..BATCH)
            .map(|i| {
                let n = chunk * BATCH + i;
                draft(if n.is_multiple_of(HOT_EVERY) {
                    hot[(n / HOT_EVERY) % HOT_AGGREGATES]
                } else {
                    spread[n % AGGREGATES]
                })
            })
            .collect();
        let mut tx = pool.begin().await?;
        publisher.publish_events(&mut tx, drafts).await?;
        tx.commit().await?;
    }
    let mut runs = Vec::new();
    for strict_waves in [false, true] {
        let suffix = if strict_waves { "strict" } else { "one-call" };
        let topic = format!("bench-sns-{}-{suffix}", env.tag);
        let broker = json!({"snsSqs": {"region": "us-east-1", "endpointUrl": env.aws_endpoint,
                                       "target": "sns", "fifo": false,
                                       "accessKeyIdEnv": "AWS_ACCESS_KEY_ID",
                                       "secretAccessKeyEnv": "AWS_SECRET_ACCESS_KEY",
                                       "deadLetterQueue": format!("{topic}-dlq")}});
        let publisher_name = format!("bench-sqs-{suffix}");
        let mut config = relay_config(&publisher_name, BATCH, broker, &topic);
        config.outbox.schema = SCHEMA.to_owned();
        let BrokerConfig::SnsSqs(sns_sqs) = &config.broker else {
            anyhow::bail!("not an SNS/SQS config");
        };
        let adapter = Arc::new(SnsSqsBroker::connect(sns_sqs.clone()).await?);
        adapter.ensure_destinations(std::slice::from_ref(&topic)).await?;
        let timed = TimedBroker::new(adapter.clone(), env.base, SQS_EVENTS as u64, false);
        timed.strict_waves.store(strict_waves, Ordering::SeqCst);
        let label = format!(
            "relay → SNS, batch {BATCH}, {}",
            if strict_waves { "strict waves" } else { "one call" }
        );
        let before = adapter.stats();
        let run = relay_until_in(env, schema.clone(), config, timed, label, SQS_EVENTS as u64).await?;
        let after = adapter.stats();
        eprintln!("{}", run.breakdown());
        runs.push(SqsRun {
            run,
            stats: SendStats {
                calls: after.calls - before.calls,
                entries: after.entries - before.entries,
                full_calls: after.full_calls - before.full_calls,
                short_with_ten_pending: after.short_with_ten_pending - before.short_with_ten_pending,
                short_with_ten_aggregates_pending: after.short_with_ten_aggregates_pending
                    - before.short_with_ten_aggregates_pending,
            },
        });
        delete_destinations(env, &topic, &format!("{topic}-dlq")).await;
    }
    Ok(runs)
}

/// Removes the bench's topic and dead-letter queue from moto (best effort: moto keeps
/// everything in memory).
async fn delete_destinations(env: &Env, topic: &str, dead_letter_queue: &str) {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&env.aws_endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .load()
        .await;
    let sns = aws_sdk_sns::Client::new(&sdk);
    // CreateTopic is idempotent and answers the existing topic's ARN.
    if let Ok(created) = sns.create_topic().name(topic).send().await
        && let Some(arn) = created.topic_arn
    {
        let _ = sns.delete_topic().topic_arn(arn).send().await;
    }
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    if let Ok(url) = sqs.get_queue_url().queue_name(dead_letter_queue).send().await
        && let Some(url) = url.queue_url
    {
        let _ = sqs.delete_queue().queue_url(url).send().await;
    }
}

/// The report's rows.
pub fn sqs_rows(runs: &[SqsRun], row: &dyn Fn(&str, String, &str, &str)) {
    for r in runs {
        let s = &r.stats;
        row(&r.run.label, format!("{:.0} ev/s", r.run.rate), "", "");
        row(
            "  PublishBatch calls, entries per call",
            format!("{}, {:.2}", s.calls, s.entries as f64 / s.calls.max(1) as f64),
            "",
            "",
        );
        row(
            "  calls with 10 entries",
            format!(
                "{} ({:.1} %)",
                s.full_calls,
                100.0 * s.full_calls as f64 / s.calls.max(1) as f64
            ),
            "",
            "",
        );
        row(
            "  calls under 10 while 10 or more were pending",
            format!("{}", s.short_with_ten_pending),
            "0",
            super::status(s.short_with_ten_pending == 0),
        );
        row(
            "  of which 10 or more aggregates were pending",
            format!("{}", s.short_with_ten_aggregates_pending),
            "",
            "",
        );
    }
}
