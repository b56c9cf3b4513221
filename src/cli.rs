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
    /// Run the Kubernetes operator (reconciles EventPublisher and ReplayJob resources).
    Operator,
    /// Run an outbox relay worker that publishes stored events to the broker.
    Relay(RelayArgs),
    /// Run one replay of historical events (started by the operator as a Job).
    Replay,
    /// Print the CustomResourceDefinitions as YAML (or write one file per CRD).
    Crd(CrdArgs),
    /// Administer failed and dead-lettered events through a relay's admin API.
    Admin(crate::admin::client::AdminArgs),
    /// Apply the database migrations (event store, outbox state, schema registry) and
    /// register the built-in event schemas.
    Migrate(MigrateArgs),
    /// Write the JSON Schema of every event type (the contract for producers in any language).
    Schemas(SchemasArgs),
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
            Command::Operator => not_implemented("operator"),
            Command::Relay(args) => relay(args).await,
            Command::Replay => not_implemented("replay"),
            Command::Crd(args) => write_crds(args),
            Command::Admin(args) => crate::admin::client::run_cli(args).await,
            Command::Migrate(args) => migrate(args).await,
            Command::Schemas(args) => write_schemas(args),
        }
    }
}

async fn relay(args: RelayArgs) -> anyhow::Result<()> {
    let config = crate::relay::config::RelayConfig::load(&args.config)?;
    let worker_id = args
        .worker_id
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("worker-{}", uuid::Uuid::new_v4().simple()));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested");
        let _ = stop.send(true);
    });
    crate::relay::run(config, &worker_id, shutdown).await
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

/// Subcommands whose issue has not landed say so plainly and fail, instead of pretending.
fn not_implemented(name: &str) -> anyhow::Result<()> {
    anyhow::bail!("the `{name}` subcommand is not implemented yet")
}
