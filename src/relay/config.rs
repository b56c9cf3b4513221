//! The relay's one typed configuration document. The operator renders it into a ConfigMap;
//! locally it is a YAML or JSON file. Secrets never appear in it: fields ending in `Env` or
//! `File` name where the secret is.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::broker::BrokerConfig;
use crate::broker::routing::Routing;
use crate::delivery::circuit::CircuitBreakerConfig;
use crate::delivery::retry::RetryPolicy;
use crate::delivery::{DeliveryConfig, WakeUp};
use crate::store::{PostgresTls, SchemaName};

/// Everything a relay worker needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayConfig {
    /// Publisher name: the key of this publisher's cursors, failed events and heartbeats.
    pub publisher: String,
    /// Where the outbox is and how it is read.
    pub outbox: OutboxConfig,
    /// Exactly one broker.
    pub broker: BrokerConfig,
    /// Which destination each event goes to.
    pub routing: Routing,
    /// Backoff for failed deliveries before dead-lettering.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// When to stop sending to an unhealthy destination.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    /// How replicas share the work.
    #[serde(default)]
    pub workers: WorkersConfig,
    /// Health thresholds.
    #[serde(default)]
    pub health: HealthConfig,
    /// The HTTP server for probes, metrics and the admin API.
    #[serde(default)]
    pub http: HttpConfig,
    /// What a dead letter means for the rest of its aggregate.
    #[serde(default)]
    pub dead_letter: DeadLetterConfig,
}

/// Dead-letter behaviour.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Keep an aggregate blocked behind its dead-lettered event until an operator retries or
    /// resolves it, for consumers that need strict per-aggregate order with no gaps. Off by
    /// default: the aggregate's later events go on and consumers see a gap. Default false.
    #[serde(default)]
    pub block_aggregate: bool,
}

/// The PostgreSQL outbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboxConfig {
    /// Environment variable holding the PostgreSQL connection URL.
    #[serde(default = "default_database_url_env")]
    pub database_url_env: String,
    /// PostgreSQL schema of the outbox tables.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Shortest wait between polls while idle (a NOTIFY wakes the relay earlier), in ms.
    #[serde(default = "default_min_poll")]
    pub min_poll_interval_ms: u64,
    /// Longest wait between polls while idle, in ms.
    #[serde(default = "default_max_poll")]
    pub max_poll_interval_ms: u64,
    /// Most events read and sent in one round.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Database connections of one worker.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Apply migrations at start (off when an init step runs `inventory-outbox migrate`).
    #[serde(default = "default_true")]
    pub migrate: bool,
    /// Read the next batch while one is on its way to the broker, so the database read
    /// overlaps the broker round trip: with a backlog for throughput, under a steady load for
    /// latency (at most two batches in memory). Off: strictly read, send, commit (the
    /// benchmark's same-run baseline).
    #[serde(default = "default_true")]
    pub read_ahead: bool,
    /// How an idle worker learns of new events: `notify` (writers notify, the default) or
    /// `poll` (every `minPollIntervalMs`; writers skip the NOTIFY while every running worker
    /// on the schema polls).
    #[serde(default)]
    pub wake_up: WakeUp,
    /// TLS towards PostgreSQL (verify-full by default, CA and client certificate as files).
    /// When set it overrides `sslmode`, `sslrootcert`, `sslcert` and `sslkey` of the URL;
    /// when absent the URL decides (see docs/CONNECTIVITY.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<PostgresTls>,
}

/// Work sharing between replicas: each owns a share of the 64 shards under a lease.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkersConfig {
    /// How often a worker renews its leases and heartbeat, in ms.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_ms: u64,
    /// How long a lease lasts without renewal; a dead worker's shards move after this, in ms.
    #[serde(default = "default_lease")]
    pub lease_duration_ms: u64,
}

/// Health thresholds. Readiness never depends on them: it means "this worker can do its job"
/// (database and broker reachable, loop running); failed events are counted in metrics and the
/// publisher's status instead.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthConfig {
    /// Retrying plus dead-lettered events above which the worker logs a warning once per
    /// backlog refresh; the counts themselves are the `outbox_relay_failed_events` gauge.
    /// Never affects readiness. Default 1000.
    #[serde(default = "default_failed_threshold")]
    pub failed_event_threshold: i64,
}

/// The HTTP server.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address for probes, metrics and the admin API. When unset, the relay listens on
    /// port 8080 of the address in the `POD_IP` environment variable (set from the downward
    /// API `status.podIP`, so kubelet probes and the operator reach it), or on 127.0.0.1:8080
    /// outside a Pod.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// File holding the admin API bearer token (mounted from a Secret). No admin API without it.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
}

fn default_database_url_env() -> String {
    "DATABASE_URL".into()
}
fn default_schema() -> String {
    SchemaName::DEFAULT.into()
}
fn default_min_poll() -> u64 {
    5
}
fn default_max_poll() -> u64 {
    500
}
fn default_batch_size() -> usize {
    1000
}
fn default_max_connections() -> u32 {
    8
}
fn default_true() -> bool {
    true
}
// A crashed worker's shards move within lease + one heartbeat (<= 2.5 s); four missed
// renewals in a row are needed to lose a lease spuriously.
fn default_heartbeat() -> u64 {
    500
}
fn default_lease() -> u64 {
    2000
}
fn default_failed_threshold() -> i64 {
    1000
}
/// Port of the HTTP server when `http.listen` is unset.
pub const DEFAULT_HTTP_PORT: u16 = 8080;

impl HttpConfig {
    /// The address to bind: `listen`, else `POD_IP`:8080, else 127.0.0.1:8080.
    pub fn listen_address(&self) -> Result<SocketAddr, ConfigError> {
        if let Some(listen) = self.listen {
            return Ok(listen);
        }
        match std::env::var("POD_IP") {
            Ok(ip) if !ip.trim().is_empty() => ip
                .trim()
                .parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, DEFAULT_HTTP_PORT))
                .map_err(|e| {
                    invalid(
                        "http.listen",
                        format!("unset, and POD_IP {ip:?} is not an IP address: {e}"),
                    )
                }),
            _ => Ok(SocketAddr::from(([127, 0, 0, 1], DEFAULT_HTTP_PORT))),
        }
    }
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: default_heartbeat(),
            lease_duration_ms: default_lease(),
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            failed_event_threshold: default_failed_threshold(),
        }
    }
}

/// A configuration that cannot be used; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read relay config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("relay config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("relay config field {field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: &str, message: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_owned(),
        message: message.to_string(),
    }
}

impl From<RelayConfig> for DeliveryConfig {
    /// The relay delivers for its publisher (the outbox consumer named after it).
    fn from(config: RelayConfig) -> Self {
        DeliveryConfig {
            consumer: config.publisher,
            batch_size: config.outbox.batch_size,
            min_poll_interval_ms: config.outbox.min_poll_interval_ms,
            max_poll_interval_ms: config.outbox.max_poll_interval_ms,
            read_ahead: config.outbox.read_ahead,
            wake_up: config.outbox.wake_up,
            heartbeat_interval_ms: config.workers.heartbeat_interval_ms,
            lease_duration_ms: config.workers.lease_duration_ms,
            failed_event_threshold: config.health.failed_event_threshold,
            block_aggregate_after_dead_letter: config.dead_letter.block_aggregate,
            circuit_breaker: config.circuit_breaker,
            retry: config.retry,
            routing: config.routing,
        }
    }
}

impl RelayConfig {
    /// Reads a YAML (or JSON, which is YAML) file and validates it.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates a document; `origin` only names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let config: RelayConfig = serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.into(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every field that serde's types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name_ok = !self.publisher.is_empty()
            && self.publisher.len() <= 63
            && self
                .publisher
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !name_ok {
            return Err(invalid(
                "publisher",
                "must be 1-63 characters of letters, digits, '-', '_' or '.'",
            ));
        }
        SchemaName::new(&self.outbox.schema).map_err(|e| invalid("outbox.schema", e))?;
        if let Some(tls) = &self.outbox.tls {
            tls.validate().map_err(|e| invalid("outbox.tls", e))?;
        }
        if self.outbox.database_url_env.is_empty() {
            return Err(invalid("outbox.databaseUrlEnv", "is empty"));
        }
        if self.outbox.min_poll_interval_ms == 0 || self.outbox.min_poll_interval_ms > self.outbox.max_poll_interval_ms
        {
            return Err(invalid(
                "outbox.minPollIntervalMs",
                "must be at least 1 and at most maxPollIntervalMs",
            ));
        }
        if !(1..=10_000).contains(&self.outbox.batch_size) {
            return Err(invalid("outbox.batchSize", "must be between 1 and 10000"));
        }
        if self.outbox.max_connections < 2 {
            return Err(invalid(
                "outbox.maxConnections",
                "must be at least 2 (reading and listening)",
            ));
        }
        match &self.broker {
            BrokerConfig::Kafka(k) => k.validate().map_err(|e| invalid("broker.kafka", e))?,
            BrokerConfig::Rabbitmq(r) => r.validate().map_err(|e| invalid("broker.rabbitmq", e))?,
            BrokerConfig::SnsSqs(s) => s.validate().map_err(|e| invalid("broker.snsSqs", e))?,
        }
        self.routing.validate().map_err(|e| invalid("routing", e))?;
        // A bad destination must fail the start, not make a ready relay that refuses every event.
        for destination in self.routing.known_destinations() {
            self.broker
                .check_destination(&destination)
                .map_err(|e| invalid(self.routing.field(), e))?;
        }
        self.retry.validate().map_err(|e| invalid("retry", e))?;
        self.circuit_breaker
            .validate()
            .map_err(|e| invalid("circuitBreaker", e))?;
        let w = &self.workers;
        if w.heartbeat_interval_ms == 0 || w.lease_duration_ms < 2 * w.heartbeat_interval_ms {
            return Err(invalid(
                "workers.leaseDurationMs",
                "must be at least twice heartbeatIntervalMs",
            ));
        }
        if self.health.failed_event_threshold < 0 {
            return Err(invalid("health.failedEventThreshold", "must not be negative"));
        }
        Ok(())
    }

    pub fn schema_name(&self) -> SchemaName {
        SchemaName::new(&self.outbox.schema).unwrap_or_default()
    }
}
