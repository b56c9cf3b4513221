//! The `replay` Job process: one ReplayJob's replay, run in the publisher's namespace with the
//! publisher's Secrets. It reads the publisher's relay config document (the ConfigMap the
//! operator renders for the relay) plus the ReplayJob spec, then either re-publishes the
//! selected history or dead letters (`engine`) or rewinds a Kafka consumer group (`rewind`).
//! Progress is served on the Pod IP (`status`) and the final counts go to the termination
//! message (`report`): the operator learns them without database or broker credentials.

pub mod engine;
pub mod plan;
pub mod report;
pub mod rewind;
pub mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::sync::watch;

use crate::broker::BrokerConfig;
use crate::relay::config::RelayConfig;
use plan::{Mode, ReplayPlan};
use report::{ReplayReport, ReportPhase};

/// What the `replay` subcommand was given.
#[derive(Clone, Debug)]
pub struct ReplaySettings {
    /// The publisher's relay config document.
    pub config: RelayConfig,
    /// The ReplayJob spec as JSON.
    pub spec: String,
    /// Checkpoint key (the ReplayJob's uid).
    pub replay_id: String,
    /// `namespace/name` of the ReplayJob, carried on every replayed message.
    pub job: String,
    /// Where the status endpoint listens (the Pod IP in a cluster).
    pub listen: SocketAddr,
    /// The container's terminationMessagePath.
    pub report_file: Option<PathBuf>,
}

/// Runs one replay to its end (or to SIGTERM, via `shutdown`) and writes the report. A failure
/// or a stop before the end is returned as an error after the report was written, so the
/// process exits non-zero and the Job starts another Pod (which resumes at the checkpoint).
pub async fn run(settings: ReplaySettings, shutdown: watch::Receiver<bool>) -> anyhow::Result<ReplayReport> {
    let config = &settings.config;
    let plan = ReplayPlan::parse(&settings.spec, &config.publisher)?;
    let progress = Arc::new(Mutex::new(ReplayReport {
        dry_run: plan.dry_run,
        ..Default::default()
    }));
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listen on {}", settings.listen))?;
    let mut http_stop = shutdown.clone();
    let server = tokio::spawn(
        axum::serve(listener, status::router(progress.clone()))
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|stop| *stop).await;
            })
            .into_future(),
    );
    let result = execute(&settings, plan, progress.clone(), shutdown).await;
    let report = match &result {
        Ok(report) => report.clone(),
        Err((reason, error)) => {
            let mut report = progress.lock().map(|r| r.clone()).unwrap_or_default();
            report.phase = ReportPhase::Failed;
            report.reason = Some((*reason).to_owned());
            report.message = Some(format!("{error:#}"));
            report
        }
    };
    if let Ok(mut shared) = progress.lock() {
        *shared = report.clone();
    }
    let text = report.termination_message();
    println!("{text}");
    if let Some(path) = &settings.report_file {
        std::fs::write(path, &text).with_context(|| format!("write the report to {}", path.display()))?;
    }
    server.abort();
    match result {
        // A stop is not a success: the Job must start another Pod, which resumes.
        Ok(report) if report.phase == ReportPhase::Stopped => Err(anyhow::anyhow!(
            "stopped at checkpoint {} before the end; a new Pod resumes after it",
            report.checkpoint
        )),
        Ok(report) => Ok(report),
        Err((_, error)) => Err(error),
    }
}

type Failure = (&'static str, anyhow::Error);

async fn execute(
    settings: &ReplaySettings,
    plan: ReplayPlan,
    progress: Arc<Mutex<ReplayReport>>,
    shutdown: watch::Receiver<bool>,
) -> Result<ReplayReport, Failure> {
    let config = &settings.config;
    match plan.mode {
        Mode::RewindGroup { group, from } => {
            let BrokerConfig::Kafka(kafka) = &config.broker else {
                return Err((
                    "NotKafka",
                    anyhow::anyhow!("consumerGroupRewind needs a Kafka publisher"),
                ));
            };
            let offsets = rewind::rewind(kafka, &config.routing, &group, from, plan.dry_run)
                .await
                .map_err(|e| (e.reason(), anyhow::Error::new(e)))?;
            Ok(ReplayReport {
                phase: ReportPhase::Completed,
                runs: 1,
                dry_run: plan.dry_run,
                started_at: Some(chrono::Utc::now()),
                completed_at: Some(chrono::Utc::now()),
                offsets,
                ..Default::default()
            })
        }
        Mode::Publish(publish) => {
            let url_env = &config.outbox.database_url_env;
            let url = std::env::var(url_env).map_err(|_| {
                (
                    "DatabaseUrlMissing",
                    anyhow::anyhow!("environment variable {url_env} (outbox.databaseUrlEnv) is not set"),
                )
            })?;
            let store =
                crate::store::Store::connect_with_tls(&url, config.outbox.tls.as_ref(), config.schema_name(), 4)
                    .await
                    .map_err(|e| ("DatabaseUnreachable", anyhow::Error::new(e)))?;
            // The replay's own table change (0004) may be newer than the relay's last start.
            store
                .migrate()
                .await
                .map_err(|e| ("MigrationFailed", anyhow::Error::new(e)))?;
            let broker = config
                .broker
                .connect_with_registry(&store)
                .await
                .map_err(|e| ("BrokerUnreachable", e))?;
            let engine = engine::Engine {
                store,
                broker,
                routing: config.routing.clone(),
                retry: config.retry.clone(),
                plan: publish,
                replay_id: settings.replay_id.clone(),
                job: settings.job.clone(),
                publisher: config.publisher.clone(),
                batch_size: config.outbox.batch_size,
                progress,
            };
            engine
                .run(shutdown)
                .await
                .map_err(|e| ("ReplayFailed", anyhow::Error::new(e)))
        }
    }
}
