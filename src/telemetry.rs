//! Structured logging setup shared by every subcommand: JSON lines in clusters, readable text
//! on a terminal, filtered by `RUST_LOG` (default `info`).

use clap::ValueEnum;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How log lines are rendered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log pipelines.
    #[default]
    Json,
    /// Human-readable text, for terminals.
    Text,
}

/// Installs the global tracing subscriber.
pub fn init(format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_current_span(true))
            .try_init()?,
        LogFormat::Text => registry.with(fmt::layer().with_target(false)).try_init()?,
    }
    Ok(())
}
