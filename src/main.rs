//! `inventory-outbox` binary: one executable, one subcommand per role (operator, relay, replay,
//! admin CLI, CRD generator, migrations). All logic lives in the library crate.

use clap::Parser;
use inventory_outbox::cli::Cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    inventory_outbox::tls::install_crypto_provider();
    inventory_outbox::telemetry::init(cli.log_format)?;
    cli.run().await
}
