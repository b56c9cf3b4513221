//! Command-line surface: parses arguments and hands each subcommand to its module.

use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;

/// Transactional-outbox event publisher for inventory systems, run by a Kubernetes operator.
#[derive(Debug, Parser)]
#[command(name = "inventory-outbox", version, about)]
pub struct Cli {
    /// Log line format.
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// The roles this binary can play.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the Kubernetes operator (reconciles EventPublisher resources).
    Operator(OperatorArgs),
    /// Run an outbox relay worker that publishes stored events to the broker.
    Relay(RelayArgs),
    /// Run one ReplayJob's replay of stored events or dead letters, or its consumer-group
    /// rewind (started by the operator as a Job).
    Replay(ReplayArgs),
    /// Print the CustomResourceDefinitions as YAML (or write one file per CRD).
    Crd(CrdArgs),
    /// Administer failed and dead-lettered events through a relay's admin API.
    Admin(crate::admin::client::AdminArgs),
    /// Apply the database migrations (event store, outbox state, schema registry) and
    /// register the built-in event schemas.
    Migrate(MigrateArgs),
    /// Write the JSON Schema of every event type (the contract for producers in any language).
    Schemas(SchemasArgs),
    /// Serve the schema registry over the Confluent-compatible REST API (for Kafka consumers'
    /// deserializers).
    Registry(crate::schema::server::RegistryArgs),
    /// Migrate the outbox schema and create or correct the broker topology (topics, exchanges,
    /// queues, dead-letter destinations) of one publisher; run before its relays start.
    Provision(ProvisionArgs),
    /// Remove broker resources a provision run created (EventPublisher deletionPolicy Delete).
    Cleanup(CleanupArgs),
}

/// Secret values mounted as files, each read into an environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct SecretFileArgs {
    /// `NAME=PATH`: set environment variable NAME to the content of PATH (a mounted Secret
    /// key) before starting. Repeatable, or comma-separated in the variable.
    #[arg(long = "secret-env", env = "SECRET_ENV_FILES", value_delimiter = ',')]
    pub secret_files: Vec<crate::relay::secret_watch::SecretFile>,
}

/// How to provision one publisher.
#[derive(Debug, clap::Args)]
pub struct ProvisionArgs {
    /// The publisher's relay configuration document (YAML or JSON).
    #[arg(long, env = "RELAY_CONFIG")]
    pub config: std::path::PathBuf,
    /// Destinations to create besides the dead-letter destination. Repeatable.
    #[arg(long = "destination", env = "PROVISION_DESTINATIONS", value_delimiter = ',')]
    pub destinations: Vec<String>,
    /// Compatibility mode given to built-in event schema subjects that do not exist yet.
    #[arg(long, default_value = "BACKWARD")]
    pub compatibility: crate::schema::compatibility::CompatibilityMode,
    /// File to write the JSON report to (the container's termination message, which the
    /// operator reads: it has no access to the broker itself).
    #[arg(long, env = "PROVISION_REPORT_FILE")]
    pub report_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub secrets: SecretFileArgs,
}

/// What to remove.
#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    /// The publisher's relay configuration document (YAML or JSON).
    #[arg(long, env = "RELAY_CONFIG")]
    pub config: std::path::PathBuf,
    /// JSON list of `{kind, name}` resources to delete, as provision reported them created.
    #[arg(long, env = "CLEANUP_RESOURCES")]
    pub resources: String,
    /// File to write the JSON report to (the container's termination message).
    #[arg(long, env = "CLEANUP_REPORT_FILE")]
    pub report_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub secrets: SecretFileArgs,
}

/// One replay.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The publisher's relay configuration document (YAML or JSON): database, broker, routing
    /// and retry policy.
    #[arg(long, env = "RELAY_CONFIG")]
    pub config: std::path::PathBuf,
    /// The ReplayJob spec as JSON.
    #[arg(long, env = "REPLAY_SPEC")]
    pub spec: String,
    /// Checkpoint key; the operator passes the ReplayJob's uid.
    #[arg(long, env = "REPLAY_ID")]
    pub replay_id: String,
    /// `namespace/name` of the ReplayJob, sent with every replayed message (CloudEvents
    /// extension `replayjob`).
    #[arg(long, env = "REPLAY_JOB")]
    pub job: String,
    /// Listen address of the status endpoint (the operator passes the Pod IP).
    #[arg(long, env = "REPLAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// File to write the final report to (the container's terminationMessagePath).
    #[arg(long, env = "REPLAY_REPORT_FILE")]
    pub report_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub secrets: SecretFileArgs,
}

/// How to run the operator. The chart's Deployment passes exactly these flags
/// (charts/inventory-outbox/templates/deployment.yaml).
#[derive(Debug, clap::Args)]
pub struct OperatorArgs {
    /// Image of the relay, provision and cleanup containers; defaults to this release's image.
    #[arg(long, env = "RELAY_IMAGE")]
    pub relay_image: Option<String>,
    /// Watch only these namespaces (comma-separated; the chart then binds Roles in each)
    /// instead of the whole cluster.
    #[arg(long, env = "WATCH_NAMESPACES", value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,
    /// Seconds between reconciles of an unchanged EventPublisher (keeps the status fresh).
    #[arg(long, env = "REQUEUE_SECONDS", default_value_t = 15)]
    pub requeue_seconds: u64,
    /// Seconds a deletionPolicy Delete cleanup Job may run before the deletion goes on and
    /// leaves the rest behind.
    #[arg(long, env = "CLEANUP_DEADLINE_SECONDS", default_value_t = 300)]
    pub cleanup_deadline_seconds: u64,
    /// Reconciles in flight at once (each is a few requests to the API server). Higher
    /// settles a burst of new EventPublishers sooner when the API server has room.
    #[arg(long, env = "RECONCILE_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// Listen address of /metrics, /livez and /readyz (the chart passes the Pod IP).
    #[arg(long, env = "OPERATOR_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: std::net::SocketAddr,
    /// Reconcile only while holding a `coordination.k8s.io` Lease, so several replicas are
    /// safe. Without it the process reconciles at once and must be the only replica.
    #[arg(long)]
    pub leader_election: bool,
    /// Namespace of the leader-election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "inventory-outbox-operator")]
    pub lease_name: String,
    /// Seconds after which a holder that stopped renewing loses the lease.
    #[arg(long, env = "LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// This replica's name in the Lease and in Events (defaults to POD_NAME, then a random
    /// id); each process appends its own run id.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

/// How to run a relay worker.
#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// Relay configuration document (YAML or JSON).
    #[arg(long, env = "RELAY_CONFIG")]
    pub config: std::path::PathBuf,
    /// Worker id, unique among the publisher's replicas (defaults to POD_NAME, then the host name).
    #[arg(long, env = "POD_NAME")]
    pub worker_id: Option<String>,
    /// Listen address of the HTTP server, overriding `http.listen` (the operator passes the
    /// Pod IP here, so the relay is reachable on its Pod IP only).
    #[arg(long, env = "RELAY_HTTP_LISTEN")]
    pub http_listen: Option<std::net::SocketAddr>,
    /// How often the secret files are compared with their content at start; a change stops
    /// the relay so the container restarts with the new value, in milliseconds.
    #[arg(long, env = "SECRET_CHECK_INTERVAL_MS", default_value_t = 2000)]
    pub secret_check_interval_ms: u64,
    #[command(flatten)]
    pub secrets: SecretFileArgs,
}

/// Where the outbox lives.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// PostgreSQL connection URL (keep credentials out of shell history: prefer the variable).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// PostgreSQL schema holding the outbox tables.
    #[arg(long, env = "OUTBOX_SCHEMA", default_value = crate::store::SchemaName::DEFAULT)]
    pub schema: String,
    /// Compatibility mode given to built-in subjects that do not exist yet.
    #[arg(long, default_value = "BACKWARD")]
    pub compatibility: crate::schema::compatibility::CompatibilityMode,
}

/// Where the CRDs go.
#[derive(Debug, clap::Args)]
pub struct CrdArgs {
    /// Directory to write `<crd name>.yaml` files into (the repository's `crds/`); prints all
    /// CRDs as one multi-document YAML stream when absent.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

/// Where to write the schema files.
#[derive(Debug, clap::Args)]
pub struct SchemasArgs {
    /// Directory to write `{EventType}/v{version}.json` into; prints one JSON object when absent.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

impl Cli {
    /// Runs the selected subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Operator(args) => operator(args).await,
            Command::Relay(args) => relay(args).await,
            Command::Replay(args) => replay(args).await,
            Command::Crd(args) => write_crds(args),
            Command::Admin(args) => crate::admin::client::run_cli(args).await,
            Command::Migrate(args) => migrate(args).await,
            Command::Schemas(args) => write_schemas(args),
            Command::Registry(args) => crate::schema::server::run(args, shutdown_signal()).await,
            Command::Provision(args) => provision(args).await,
            Command::Cleanup(args) => cleanup(args).await,
        }
    }
}

async fn relay(args: RelayArgs) -> anyhow::Result<()> {
    let secrets = crate::relay::secret_watch::load(&args.secrets.secret_files)?;
    let mut config = crate::relay::config::RelayConfig::load(&args.config)?;
    if let Some(listen) = args.http_listen {
        config.http.listen = Some(listen);
    }
    let worker_id = args
        .worker_id
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("worker-{}", uuid::Uuid::new_v4().simple()));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let every = std::time::Duration::from_millis(args.secret_check_interval_ms.max(100));
    let watch_secrets = !args.secrets.secret_files.is_empty();
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown_signal() => tracing::info!("shutdown requested"),
            variable = crate::relay::secret_watch::changed(secrets, every), if watch_secrets => {
                tracing::info!(variable, "a mounted secret changed; stopping so the container restarts with it");
            }
        }
        let _ = stop.send(true);
    });
    crate::app::run_relay(config, &worker_id, shutdown).await
}

async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    crate::relay::secret_watch::load(&args.secrets.secret_files)?;
    let config = crate::relay::config::RelayConfig::load(&args.config)?;
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested; stopping at the next checkpoint");
        let _ = stop.send(true);
    });
    let settings = crate::replay::ReplaySettings {
        config,
        spec: args.spec,
        replay_id: args.replay_id,
        job: args.job,
        listen: args.listen,
        report_file: args.report_file,
    };
    crate::replay::run(settings, shutdown).await?;
    Ok(())
}

async fn operator(args: OperatorArgs) -> anyhow::Result<()> {
    // In-cluster configuration inside a Pod, the kubeconfig elsewhere.
    let client = kube::Client::try_default().await?;
    // Unique per process, as client-go does: a container restarted after kill -9 keeps its
    // Pod name but must not take the dead process's lease as its own.
    let run = uuid::Uuid::new_v4().simple().to_string();
    let identity = match args.identity {
        Some(pod) => format!("{pod}_{}", &run[..8]),
        None => format!("operator-{run}"),
    };
    let mut settings = crate::operator::reconcile::Settings {
        requeue_after: std::time::Duration::from_secs(args.requeue_seconds.max(1)),
        cleanup_deadline: std::time::Duration::from_secs(args.cleanup_deadline_seconds.max(1)),
        concurrency: args.concurrency,
        instance: Some(identity.clone()),
        ..Default::default()
    };
    if let Some(image) = args.relay_image {
        settings.build.image = image;
    }
    let namespaces = args
        .watch_namespaces
        .into_iter()
        .filter(|n| !n.is_empty())
        .collect::<Vec<_>>();
    tracing::info!(image = %settings.build.image, namespaces = ?namespaces, identity, leader_election = args.leader_election, "operator starting");
    let lease_duration = std::time::Duration::from_secs(args.lease_duration_seconds.max(2));
    let leader_election = args.leader_election.then(|| crate::operator::process::LeaderElection {
        lease_namespace: args.lease_namespace,
        lease_name: args.lease_name,
        identity,
        lease_duration,
        lease_grace: (lease_duration / 3).max(std::time::Duration::from_secs(1)),
    });
    let process = crate::operator::process::ProcessSettings {
        controller: settings,
        namespaces,
        leader_election,
        listen: args.listen,
    };
    crate::operator::process::run(client, process, shutdown_signal()).await?;
    tracing::info!("operator stopped");
    Ok(())
}

async fn provision(args: ProvisionArgs) -> anyhow::Result<()> {
    crate::relay::secret_watch::load(&args.secrets.secret_files)?;
    let config = crate::relay::config::RelayConfig::load(&args.config)?;
    let url_env = &config.outbox.database_url_env;
    let url = std::env::var(url_env)
        .map_err(|_| anyhow::anyhow!("environment variable {url_env} (outbox.databaseUrlEnv) is not set"))?;
    let store =
        crate::store::Store::connect_with_tls(&url, config.outbox.tls.as_ref(), config.schema_name(), 2).await?;
    store.migrate().await?;
    crate::schema::registry::SchemaRegistry::new(store)
        .register_builtin(args.compatibility)
        .await?;
    // An empty PROVISION_DESTINATIONS (no extra destinations) parses as one empty name.
    let mut destinations: Vec<String> = args.destinations.iter().filter(|d| !d.is_empty()).cloned().collect();
    if let crate::broker::routing::Routing::Single { destination } = &config.routing {
        destinations.push(destination.clone());
    }
    destinations.sort();
    destinations.dedup();
    let result = crate::broker::topology::provision(&config.broker, &destinations).await;
    let document = match &result {
        Ok(report) => serde_json::json!({"outcome": "provisioned", "report": report}),
        Err(e) => serde_json::json!({"outcome": "failed", "reason": e.reason(), "message": e.to_string()}),
    };
    write_report(args.report_file.as_deref(), &document)?;
    let report = result?;
    tracing::info!(
        publisher = %config.publisher,
        created = report.created.len(),
        corrected = report.corrected.len(),
        existing = report.existing.len(),
        "outbox migrated and broker topology provisioned"
    );
    Ok(())
}

async fn cleanup(args: CleanupArgs) -> anyhow::Result<()> {
    crate::relay::secret_watch::load(&args.secrets.secret_files)?;
    let config = crate::relay::config::RelayConfig::load(&args.config)?;
    let resources: Vec<crate::broker::topology::Resource> = serde_json::from_str(&args.resources)
        .map_err(|e| anyhow::anyhow!("--resources is not a JSON list of {{kind, name}}: {e}"))?;
    let result = crate::broker::topology::cleanup(&config.broker, &resources).await;
    let document = match &result {
        Ok(report) => serde_json::json!({"outcome": "cleaned", "report": report}),
        Err(e) => serde_json::json!({"outcome": "failed", "reason": e.reason(), "message": e.to_string()}),
    };
    write_report(args.report_file.as_deref(), &document)?;
    let report = result?;
    tracing::info!(
        publisher = %config.publisher,
        deleted = report.deleted.len(),
        missing = report.missing.len(),
        "broker resources removed"
    );
    Ok(())
}

/// Writes the step's outcome where Kubernetes takes the termination message from; kubelet
/// caps the message at 4 KiB, so a long report is cut rather than lost.
fn write_report(path: Option<&std::path::Path>, document: &serde_json::Value) -> anyhow::Result<()> {
    let text = document.to_string();
    println!("{text}");
    if let Some(path) = path {
        let mut end = text.len().min(4096);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        std::fs::write(path, &text[..end])?;
    }
    Ok(())
}

/// SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let schema = crate::store::SchemaName::new(&args.schema)?;
    let store = crate::store::Store::connect(&args.database_url, schema.clone(), 2).await?;
    store.migrate().await?;
    crate::schema::registry::SchemaRegistry::new(store)
        .register_builtin(args.compatibility)
        .await?;
    tracing::info!(schema = %schema, "migrations applied and built-in schemas registered");
    Ok(())
}

fn write_crds(args: CrdArgs) -> anyhow::Result<()> {
    match args.out {
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            for (file, text) in crate::crd::files()? {
                std::fs::write(dir.join(file), text)?;
            }
        }
        None => print!("{}", crate::crd::render_yaml()?),
    }
    Ok(())
}

fn write_schemas(args: SchemasArgs) -> anyhow::Result<()> {
    let files = crate::event::schemas::schema_files();
    match args.out {
        Some(dir) => {
            for (path, text) in files {
                let target = dir.join(path);
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&target, text)?;
            }
        }
        None => {
            let all: serde_json::Map<String, serde_json::Value> = files
                .into_iter()
                .map(|(path, text)| (path, serde_json::from_str(&text).unwrap_or_default()))
                .collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
    }
    Ok(())
}
