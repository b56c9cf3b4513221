//! Process composition: each subcommand's long-running parts put together here, above the
//! parts themselves, so the relay never builds the admin API that reads the relay's health
//! and metrics (the lower parts do not import upward).

use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;

use crate::broker::BrokerConfig;
use crate::relay::config::RelayConfig;

/// Runs one relay worker with its HTTP server until `shutdown` turns true.
pub async fn run_relay(config: RelayConfig, worker_id: &str, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let url_env = &config.outbox.database_url_env;
    let url = std::env::var(url_env)
        .with_context(|| format!("environment variable {url_env} (outbox.databaseUrlEnv) is not set"))?;
    // Bound first: the probes answer while the database connect is retried.
    let listen = config.http.listen_address()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen} (http.listen, or POD_IP:8080 when unset)"))?;
    let Some(store) = crate::relay::startup::connect_store(&config, &url, &listener, shutdown.clone()).await? else {
        return Ok(());
    };
    if config.outbox.migrate {
        store.migrate().await?;
        // The relay validates every payload against its registered schema before sending, so a
        // relay that owns its schema also registers the built-in ones (idempotent; the mode
        // applies only to subjects that do not exist yet).
        crate::schema::registry::SchemaRegistry::new(store.clone())
            .register_builtin(crate::schema::compatibility::CompatibilityMode::Backward)
            .await?;
    }
    let broker = config.broker.connect_with_registry(&store).await?;
    let token: Arc<str> = match &config.http.admin_token_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("read http.adminTokenFile {}", path.display()))?
            .trim()
            .into(),
        None => {
            tracing::warn!("http.adminTokenFile not set: the admin API refuses every request");
            uuid::Uuid::new_v4().to_string().into()
        }
    };
    if token.len() < 16 {
        anyhow::bail!("the admin token in http.adminTokenFile must be at least 16 characters");
    }

    let status_store = store.clone();
    let relay = Arc::new(crate::delivery::Engine::new(config.clone(), store, broker, worker_id));
    let router = crate::admin::api::router(crate::admin::api::AdminState {
        failed: relay.failed_events(),
        consumer: config.publisher.clone(),
        token,
        health: relay.health(),
        metrics: relay.metrics(),
    })
    .merge(crate::relay::status::router(crate::relay::status::StatusState {
        store: status_store,
        publisher: config.publisher.clone(),
        worker_id: worker_id.to_owned(),
        health: relay.health(),
        metrics: relay.metrics(),
        alive_within: std::time::Duration::from_millis(config.workers.lease_duration_ms),
    }));
    tracing::info!(
        publisher = %config.publisher,
        worker = worker_id,
        listen = %listen,
        broker = relay_kind(&config.broker),
        "relay starting"
    );
    let mut http_shutdown = shutdown.clone();
    let server = tokio::spawn(crate::admin::api::serve(listener, router, async move {
        let _ = http_shutdown.wait_for(|stop| *stop).await;
    }));
    let result = relay.run(shutdown).await;
    server.abort();
    Ok(result?)
}

fn relay_kind(config: &BrokerConfig) -> &'static str {
    match config {
        BrokerConfig::Kafka(_) => "kafka",
        BrokerConfig::Rabbitmq(_) => "rabbitmq",
        BrokerConfig::SnsSqs(_) => "sns_sqs",
    }
}
