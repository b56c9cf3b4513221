//! The `registry` subcommand: serves the Confluent-compatible registry API (`schema::api`)
//! over one publisher's PostgreSQL registry, as its own process so consumers' schema lookups
//! do not depend on relay replicas (see docs/ARCHITECTURE.md).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use super::api::{RegistryApiState, router, serve};
use super::compatibility::CompatibilityMode;
use super::registry::SchemaRegistry;
use crate::store::{SchemaName, Store};

/// The shortest admin token accepted.
const MIN_TOKEN_LEN: usize = 16;

/// How to serve the registry.
#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    /// PostgreSQL connection URL (keep credentials out of shell history: prefer the variable).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// PostgreSQL schema holding the outbox and registry tables.
    #[arg(long, env = "OUTBOX_SCHEMA", default_value = SchemaName::DEFAULT)]
    pub schema: String,
    /// Listen address of the REST API (Confluent's default port is 8081).
    #[arg(long, env = "REGISTRY_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// File holding the admin token that writes (register, config, delete) need, mounted
    /// from a Secret. Without it the API is read-only.
    #[arg(long, env = "REGISTRY_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Require the admin token for reads too (consumers then send it as HTTP Basic password
    /// or bearer token).
    #[arg(long, env = "REGISTRY_PROTECT_READS", default_value_t = false)]
    pub protect_reads: bool,
    /// Apply the migrations and register the built-in event schemas before serving.
    #[arg(long, env = "REGISTRY_MIGRATE", default_value_t = false)]
    pub migrate: bool,
    /// Compatibility level given to built-in subjects created by `--migrate`.
    #[arg(long, default_value = "BACKWARD")]
    pub compatibility: CompatibilityMode,
    /// Database connections of the server.
    #[arg(long, default_value_t = 4)]
    pub max_connections: u32,
}

/// Reads the admin token, or makes an unguessable one nobody knows (read-only server).
fn admin_token(path: Option<&PathBuf>) -> anyhow::Result<Arc<str>> {
    let Some(path) = path else {
        tracing::warn!("no admin token file: the registry API refuses every write");
        return Ok(uuid::Uuid::new_v4().to_string().into());
    };
    let token =
        std::fs::read_to_string(path).with_context(|| format!("read the admin token file {}", path.display()))?;
    let token = token.trim();
    if token.len() < MIN_TOKEN_LEN {
        anyhow::bail!(
            "the admin token in {} must be at least {MIN_TOKEN_LEN} characters",
            path.display()
        );
    }
    Ok(token.into())
}

/// Runs the registry server until SIGTERM or Ctrl-C.
pub async fn run(
    args: RegistryArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if args.protect_reads && args.admin_token_file.is_none() {
        anyhow::bail!("--protect-reads needs --admin-token-file: nobody could read the registry");
    }
    let token = admin_token(args.admin_token_file.as_ref())?;
    let schema = SchemaName::new(&args.schema)?;
    let store = Store::connect(&args.database_url, schema.clone(), args.max_connections.max(1)).await?;
    let registry = SchemaRegistry::new(store.clone());
    if args.migrate {
        store.migrate().await?;
        registry.register_builtin(args.compatibility).await?;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, schema = %schema, protect_reads = args.protect_reads, "schema registry API serving");
    let app = router(RegistryApiState {
        registry,
        token,
        protect_reads: args.protect_reads,
    });
    serve(listener, app, shutdown).await.context("serve the registry API")
}
