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
    Relay,
    /// Run one replay of historical events (started by the operator as a Job).
    Replay,
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Administer failed and dead-lettered events through a relay's admin API.
    Admin,
    /// Apply the database migrations (event store, outbox state, schema registry).
    Migrate,
}

impl Cli {
    /// Runs the selected subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Operator => not_implemented("operator"),
            Command::Relay => not_implemented("relay"),
            Command::Replay => not_implemented("replay"),
            Command::Crd => not_implemented("crd"),
            Command::Admin => not_implemented("admin"),
            Command::Migrate => not_implemented("migrate"),
        }
    }
}

/// Subcommands whose issue has not landed say so plainly and fail, instead of pretending.
fn not_implemented(name: &str) -> anyhow::Result<()> {
    anyhow::bail!("the `{name}` subcommand is not implemented yet")
}
