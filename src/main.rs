//! `inventory-outbox` binary: one executable, one subcommand per role (operator, relay, replay,
//! admin CLI, CRD generator, migrations). All logic lives in the library crate.

use std::process::ExitCode;

use clap::Parser;
use inventory_outbox::cli::Cli;

// glibc's malloc was about 40 % of the relay's CPU under perf (malloc_consolidate and
// unlink_chunk: every batch builds and drops thousands of short-lived JSON trees); the
// `cargo bench --bench relay` row "of which mimalloc" measures the switch in one process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    inventory_outbox::tls::install_crypto_provider();
    let result = match inventory_outbox::telemetry::init(cli.log_format) {
        Ok(()) => cli.run().await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain, one line, without a backtrace: this is for operators.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
