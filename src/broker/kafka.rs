//! Kafka adapter: an idempotent `acks=all` producer (rdkafka `FutureProducer`) that pipelines a
//! batch (enqueue every record, then await every delivery report), CloudEvents binary or
//! structured encoding with the Kafka binding's `ce_` headers, and an admin client for topics.
//!
//! Records are keyed by `aggregateId`, so the events of one aggregate share a partition; with
//! idempotence and at most 5 requests in flight, librdkafka keeps them in order across retries.
//! Credentials never appear in the configuration: it names files (mounted Secrets) or
//! environment variables read at connect time. TLS (`ssl`, `sasl_ssl`) always verifies the
//! brokers' certificates and host names unless `tls.insecureSkipVerify` says otherwise.
//!
//! librdkafka connects lazily and reports refused connections only through its log and error
//! callbacks, once per reconnect. [`KafkaClientContext`] keeps the last such error (logged
//! once per change, not per reconnect) so the health check can say which endpoint refused
//! and why; a certificate failure, which librdkafka words the same way for every cause, is
//! named by a handshake of our own (`tls::diagnose_server_certificate`).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer as RdFutureProducer, FutureRecord, Producer};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::confluent::{self, ConfluentFraming, WireFormat};
use super::encode::Encoded;
use super::{BoxFuture, Broker, CloudEventsMode, HandedOver, Message, SendError};
use crate::event::cloudevents::KAFKA_PREFIX;
use crate::tls::{TlsConfigError, TlsFiles};

/// The producer type of this adapter: librdkafka's callbacks go to [`KafkaClientContext`].
type FutureProducer = RdFutureProducer<KafkaClientContext>;

/// Header carrying why a record was dead-lettered.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-dead-letter-reason";
/// Header carrying the topic a dead-lettered record was meant for.
pub const ORIGINAL_TOPIC_HEADER: &str = "x-original-topic";

/// How long `check_health` waits for cluster metadata.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the admin client waits for the controller to create topics.
const ADMIN_OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the admin client waits for a response at all.
const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause before retrying an enqueue refused because librdkafka's local queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(10);
/// Slack over `messageTimeoutMs` before a missing delivery report counts as lost.
const DELIVERY_REPORT_GRACE: Duration = Duration::from_secs(5);
/// Longest topic name Kafka accepts.
const MAX_TOPIC_NAME_LEN: usize = 249;

fn default_client_id() -> String {
    "inventory-outbox".to_owned()
}

fn default_partitions() -> i32 {
    6
}

fn default_message_timeout_ms() -> u32 {
    30_000
}

/// 1 ms: the relay already hands whole waves to the producer, so waiting longer for a fuller
/// batch mostly adds latency (measured in BENCHMARKS.md).
fn default_linger_ms() -> u32 {
    1
}

/// Connection, producer and topic settings of the Kafka adapter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list of brokers to bootstrap from, e.g.
    /// `kafka-0.kafka:9092,kafka-1.kafka:9092`.
    pub bootstrap_servers: String,
    /// Client id the brokers see in request logs and quotas.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// CloudEvents content mode: `binary` (attributes as `ce_` headers, JSON payload as body) or
    /// `structured` (one `application/cloudevents+json` document as body).
    #[serde(default)]
    pub mode: CloudEventsMode,
    /// Record value layout: CloudEvents as `mode` says (default), or the Confluent wire format
    /// (magic byte, schema id, JSON payload) that Confluent deserializers read with the
    /// schema registry API; see `broker::confluent`.
    #[serde(default)]
    pub wire_format: WireFormat,
    /// Topic receiving events that exhausted their retries or were refused permanently; created
    /// with the other topics.
    pub dead_letter_topic: String,
    /// Partition count of topics the publisher creates. Existing topics are left as they are.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor of topics the publisher creates; unset uses the broker's
    /// `default.replication.factor` (a production cluster's choice, not 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<i32>,
    /// `min.insync.replicas` of topics the publisher creates (with acks=all, how many replicas
    /// must have a record before it counts as published); unset uses the broker's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_insync_replicas: Option<i32>,
    /// Topic-level configuration of topics the publisher creates, e.g. `retention.ms`,
    /// `min.insync.replicas`, `max.message.bytes`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub topic_config: BTreeMap<String, String>,
    /// How long a record may wait for its acknowledgement, retries included, before it fails
    /// as retriable (librdkafka `message.timeout.ms`).
    #[serde(default = "default_message_timeout_ms")]
    pub message_timeout_ms: u32,
    /// How long the producer waits to fill a batch before sending it (librdkafka `linger.ms`).
    /// Must be less than `messageTimeoutMs`.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u32,
    /// Compression of record batches: `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    #[serde(default)]
    pub compression: KafkaCompression,
    /// Protocol to talk to the brokers: `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    #[serde(default)]
    pub security_protocol: KafkaSecurityProtocol,
    /// SASL mechanism (`PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`); required with
    /// `sasl_plaintext` and `sasl_ssl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<KafkaSaslMechanism>,
    /// Name of the environment variable holding the SASL username (for example one filled from
    /// a Secret); required with SASL. The value itself never goes in this document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_username_env: Option<String>,
    /// Name of the environment variable holding the SASL password (for example one filled from
    /// a Secret); required with SASL. The value itself never goes in this document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_password_env: Option<String>,
    /// File holding the SASL username (e.g. a mounted Secret key); with SASL, set this or
    /// `saslUsernameEnv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_username_file: Option<PathBuf>,
    /// File holding the SASL password (e.g. a mounted Secret key); with SASL, set this or
    /// `saslPasswordEnv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_password_file: Option<PathBuf>,
    /// TLS towards the brokers, for `ssl` and `sasl_ssl`: the CA file their certificates must
    /// chain to (default: the system's roots) and a client certificate for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// Extra librdkafka producer properties, e.g. `batch.size` or `ssl.ca.location`. `acks`,
    /// `enable.idempotence` and `bootstrap.servers` cannot be overridden, settings with a field
    /// of their own must use it, and secrets are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub producer_overrides: BTreeMap<String, String>,
}

/// Everything at its default; `bootstrapServers` and `deadLetterTopic` are empty and must be set.
impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: String::new(),
            client_id: default_client_id(),
            mode: CloudEventsMode::default(),
            wire_format: WireFormat::default(),
            dead_letter_topic: String::new(),
            partitions: default_partitions(),
            replication_factor: None,
            min_insync_replicas: None,
            topic_config: BTreeMap::new(),
            message_timeout_ms: default_message_timeout_ms(),
            linger_ms: default_linger_ms(),
            compression: KafkaCompression::default(),
            security_protocol: KafkaSecurityProtocol::default(),
            sasl_mechanism: None,
            sasl_username_env: None,
            sasl_password_env: None,
            sasl_username_file: None,
            sasl_password_file: None,
            tls: None,
            producer_overrides: BTreeMap::new(),
        }
    }
}

/// Compression codec of record batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KafkaCompression {
    /// Uncompressed.
    None,
    /// gzip: small, CPU-heavy.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4: fast, the default.
    #[default]
    Lz4,
    /// Zstandard.
    Zstd,
}

impl KafkaCompression {
    /// The librdkafka `compression.type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaCompression::None => "none",
            KafkaCompression::Gzip => "gzip",
            KafkaCompression::Snappy => "snappy",
            KafkaCompression::Lz4 => "lz4",
            KafkaCompression::Zstd => "zstd",
        }
    }
}

/// Transport security towards the brokers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum KafkaSecurityProtocol {
    /// No TLS, no authentication.
    #[default]
    Plaintext,
    /// TLS without SASL.
    Ssl,
    /// SASL authentication without TLS.
    SaslPlaintext,
    /// SASL authentication over TLS.
    SaslSsl,
}

impl KafkaSecurityProtocol {
    /// The librdkafka `security.protocol` value.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaSecurityProtocol::Plaintext => "plaintext",
            KafkaSecurityProtocol::Ssl => "ssl",
            KafkaSecurityProtocol::SaslPlaintext => "sasl_plaintext",
            KafkaSecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    /// True for the protocols that encrypt with TLS.
    pub fn uses_tls(self) -> bool {
        matches!(self, KafkaSecurityProtocol::Ssl | KafkaSecurityProtocol::SaslSsl)
    }

    /// True for the protocols that authenticate with SASL.
    pub fn uses_sasl(self) -> bool {
        matches!(
            self,
            KafkaSecurityProtocol::SaslPlaintext | KafkaSecurityProtocol::SaslSsl
        )
    }
}

impl fmt::Display for KafkaSecurityProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// SASL mechanism for username/password authentication.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum KafkaSaslMechanism {
    /// Username and password in clear (use with `sasl_ssl`).
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM with SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl KafkaSaslMechanism {
    /// The librdkafka `sasl.mechanism` value.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaSaslMechanism::Plain => "PLAIN",
            KafkaSaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            KafkaSaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// A configuration the adapter refuses; every message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KafkaConfigError {
    #[error("kafka.{field} is empty")]
    Empty { field: &'static str },
    #[error("kafka.{field} {name:?} is not a valid Kafka topic name: it {reason}")]
    InvalidTopicName {
        field: &'static str,
        name: String,
        reason: &'static str,
    },
    #[error("kafka.{field} is {value}; it must be at least {min}")]
    TooSmall { field: &'static str, value: i64, min: i64 },
    #[error("kafka.lingerMs ({linger_ms}) must be less than kafka.messageTimeoutMs ({message_timeout_ms})")]
    LingerNotBelowTimeout { linger_ms: u32, message_timeout_ms: u32 },
    #[error("kafka.{field} is required when kafka.securityProtocol is {protocol}")]
    SaslSettingMissing {
        field: &'static str,
        protocol: KafkaSecurityProtocol,
    },
    #[error("kafka.{field} is set but kafka.securityProtocol is {protocol}; SASL needs sasl_plaintext or sasl_ssl")]
    SaslSettingUnused {
        field: &'static str,
        protocol: KafkaSecurityProtocol,
    },
    #[error("kafka.{env} and kafka.{file} are both set; use one")]
    SaslSourceTwice { env: &'static str, file: &'static str },
    #[error("kafka.tls is set but kafka.securityProtocol is {protocol}; TLS needs ssl or sasl_ssl")]
    TlsUnused { protocol: KafkaSecurityProtocol },
    #[error("kafka.{0}")]
    Tls(#[from] TlsConfigError),
    #[error("kafka.{field} {name:?} is not a valid environment variable name")]
    InvalidEnvName { field: &'static str, name: String },
    #[error("kafka.topicConfig has an empty key")]
    EmptyTopicConfigKey,
    #[error("kafka.producerOverrides may not set {key:?}: {reason}")]
    ForbiddenOverride { key: String, reason: String },
}

/// Overrides that would break the delivery guarantees or the connection settings.
const PROTECTED_OVERRIDES: &[(&str, &str)] = &[
    ("acks", "the adapter always produces with acks=all"),
    ("request.required.acks", "the adapter always produces with acks=all"),
    (
        "enable.idempotence",
        "the adapter always enables idempotence (no duplicates, per-partition order)",
    ),
    ("bootstrap.servers", "set kafka.bootstrapServers instead"),
    ("metadata.broker.list", "set kafka.bootstrapServers instead"),
];

/// Properties (and their librdkafka aliases) that have a field of their own.
const DEDICATED_OVERRIDES: &[(&str, &str)] = &[
    ("client.id", "clientId"),
    ("linger.ms", "lingerMs"),
    ("queue.buffering.max.ms", "lingerMs"),
    ("compression.type", "compression"),
    ("compression.codec", "compression"),
    ("message.timeout.ms", "messageTimeoutMs"),
    ("delivery.timeout.ms", "messageTimeoutMs"),
    ("security.protocol", "securityProtocol"),
    ("sasl.mechanism", "saslMechanism"),
    ("sasl.mechanisms", "saslMechanism"),
    ("sasl.username", "saslUsernameFile"),
    ("sasl.password", "saslPasswordFile"),
    ("ssl.ca.location", "tls.caFile"),
    ("ssl.certificate.location", "tls.certFile"),
    ("ssl.key.location", "tls.keyFile"),
    ("ssl.key.password", "tls.keyPasswordFile"),
    ("enable.ssl.certificate.verification", "tls.insecureSkipVerify"),
    ("ssl.endpoint.identification.algorithm", "tls.insecureSkipVerify"),
];

/// Properties holding secrets, which never go in the configuration document.
const SECRET_PROPERTIES: &[&str] = &[
    "sasl.username",
    "sasl.password",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl.keystore.password",
    "sasl.oauthbearer.client.secret",
];

impl KafkaConfig {
    /// Checks the configuration without contacting Kafka.
    pub fn validate(&self) -> Result<(), KafkaConfigError> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(KafkaConfigError::Empty {
                field: "bootstrapServers",
            });
        }
        if self.client_id.trim().is_empty() {
            return Err(KafkaConfigError::Empty { field: "clientId" });
        }
        check_topic_name(&self.dead_letter_topic).map_err(|reason| {
            if self.dead_letter_topic.is_empty() {
                KafkaConfigError::Empty {
                    field: "deadLetterTopic",
                }
            } else {
                KafkaConfigError::InvalidTopicName {
                    field: "deadLetterTopic",
                    name: self.dead_letter_topic.clone(),
                    reason,
                }
            }
        })?;
        at_least("partitions", self.partitions.into(), 1)?;
        if let Some(factor) = self.replication_factor {
            at_least("replicationFactor", factor.into(), 1)?;
        }
        if let Some(replicas) = self.min_insync_replicas {
            at_least("minInsyncReplicas", replicas.into(), 1)?;
        }
        at_least("messageTimeoutMs", self.message_timeout_ms.into(), 1)?;
        if self.linger_ms >= self.message_timeout_ms {
            return Err(KafkaConfigError::LingerNotBelowTimeout {
                linger_ms: self.linger_ms,
                message_timeout_ms: self.message_timeout_ms,
            });
        }
        if self.topic_config.keys().any(|k| k.trim().is_empty()) {
            return Err(KafkaConfigError::EmptyTopicConfigKey);
        }
        self.validate_sasl()?;
        for key in self.producer_overrides.keys() {
            check_override(key)?;
        }
        Ok(())
    }

    fn validate_sasl(&self) -> Result<(), KafkaConfigError> {
        let protocol = self.security_protocol;
        if let Some(tls) = &self.tls {
            if !protocol.uses_tls() {
                return Err(KafkaConfigError::TlsUnused { protocol });
            }
            tls.validate()?;
        }
        let pairs = [
            (
                "saslUsernameEnv",
                self.sasl_username_env.is_some(),
                "saslUsernameFile",
                self.sasl_username_file.is_some(),
            ),
            (
                "saslPasswordEnv",
                self.sasl_password_env.is_some(),
                "saslPasswordFile",
                self.sasl_password_file.is_some(),
            ),
        ];
        for (env, env_set, file, file_set) in pairs {
            if env_set && file_set {
                return Err(KafkaConfigError::SaslSourceTwice { env, file });
            }
        }
        let settings = [
            ("saslMechanism", self.sasl_mechanism.map(|_| "")),
            (
                "saslUsernameFile (or saslUsernameEnv)",
                (self.sasl_username_env.is_some() || self.sasl_username_file.is_some()).then_some(""),
            ),
            (
                "saslPasswordFile (or saslPasswordEnv)",
                (self.sasl_password_env.is_some() || self.sasl_password_file.is_some()).then_some(""),
            ),
        ];
        for (field, value) in settings {
            match (protocol.uses_sasl(), value) {
                (true, None) => return Err(KafkaConfigError::SaslSettingMissing { field, protocol }),
                (false, Some(_)) => return Err(KafkaConfigError::SaslSettingUnused { field, protocol }),
                _ => {}
            }
        }
        for (field, name) in [
            ("saslUsernameEnv", &self.sasl_username_env),
            ("saslPasswordEnv", &self.sasl_password_env),
        ] {
            if let Some(name) = name
                && (name.is_empty() || name.contains(['=', '\0']))
            {
                return Err(KafkaConfigError::InvalidEnvName {
                    field,
                    name: name.clone(),
                });
            }
        }
        Ok(())
    }

    fn message_timeout(&self) -> Duration {
        Duration::from_millis(self.message_timeout_ms.into())
    }

    /// Connection settings shared by the producer and the admin client, credentials included.
    pub(crate) fn client_config(&self) -> Result<ClientConfig, KafkaConnectError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.bootstrap_servers.trim())
            .set("client.id", &self.client_id)
            .set("security.protocol", self.security_protocol.as_str())
            // librdkafka backs reconnects off up to 10 s by default: after a long outage the
            // returning broker then waits up to 10 s for the relay, holding every event
            // committed meanwhile. One connection attempt a second costs a broker nothing.
            .set("reconnect.backoff.max.ms", "1000");
        if let Some(mechanism) = self.sasl_mechanism {
            config.set("sasl.mechanism", mechanism.as_str());
        }
        if let Some(variable) = &self.sasl_username_env {
            config.set("sasl.username", read_env("saslUsernameEnv", variable)?);
        }
        if let Some(variable) = &self.sasl_password_env {
            config.set("sasl.password", read_env("saslPasswordEnv", variable)?);
        }
        if let Some(file) = &self.sasl_username_file {
            config.set("sasl.username", read_file("kafka.saslUsernameFile", file)?);
        }
        if let Some(file) = &self.sasl_password_file {
            config.set("sasl.password", read_file("kafka.saslPasswordFile", file)?);
        }
        if self.security_protocol.uses_tls() {
            // librdkafka's default since 2.0, set so no override or older build can drop it.
            config.set("ssl.endpoint.identification.algorithm", "https");
            if let Some(tls) = &self.tls {
                if let Some(ca) = &tls.ca_file {
                    config.set("ssl.ca.location", ca.to_string_lossy());
                }
                if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                    config
                        .set("ssl.certificate.location", cert.to_string_lossy())
                        .set("ssl.key.location", key.to_string_lossy());
                }
                if let Some(file) = &tls.key_password_file {
                    config.set("ssl.key.password", read_file("kafka.tls.keyPasswordFile", file)?);
                }
                if tls.insecure_skip_verify {
                    config
                        .set("enable.ssl.certificate.verification", "false")
                        .set("ssl.endpoint.identification.algorithm", "none");
                }
            }
        }
        for (key, value) in &self.producer_overrides {
            config.set(key.trim(), value);
        }
        Ok(config)
    }
}

fn at_least(field: &'static str, value: i64, min: i64) -> Result<(), KafkaConfigError> {
    if value < min {
        return Err(KafkaConfigError::TooSmall { field, value, min });
    }
    Ok(())
}

/// Kafka's topic name rule; the error completes "topic name ... it".
/// Kafka's topic name rules (length, characters, not `.` or `..`); the error completes "it ...".
pub(crate) fn check_topic_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name == "." || name == ".." {
        return Err("may not be \".\" or \"..\"");
    }
    if name.len() > MAX_TOPIC_NAME_LEN {
        return Err("is longer than 249 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err("may contain only ASCII letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

fn check_override(key: &str) -> Result<(), KafkaConfigError> {
    let key = key.trim();
    let forbidden = |reason: String| KafkaConfigError::ForbiddenOverride {
        key: key.to_owned(),
        reason,
    };
    if key.is_empty() {
        return Err(forbidden("the key is empty".to_owned()));
    }
    if let Some((_, reason)) = PROTECTED_OVERRIDES.iter().find(|(k, _)| *k == key) {
        return Err(forbidden((*reason).to_owned()));
    }
    if let Some((_, field)) = DEDICATED_OVERRIDES.iter().find(|(k, _)| *k == key) {
        return Err(forbidden(format!("set kafka.{field} instead")));
    }
    if SECRET_PROPERTIES.contains(&key) {
        return Err(forbidden(
            "it holds a secret, and secrets never go in the configuration document".to_owned(),
        ));
    }
    Ok(())
}

fn read_env(field: &'static str, variable: &str) -> Result<String, KafkaConnectError> {
    let problem = match std::env::var(variable) {
        Ok(value) if !value.is_empty() => return Ok(value),
        Ok(_) => "is empty",
        Err(std::env::VarError::NotPresent) => "is not set",
        Err(std::env::VarError::NotUnicode(_)) => "is not valid UTF-8",
    };
    Err(KafkaConnectError::Credential {
        field,
        variable: variable.to_owned(),
        problem,
    })
}

fn read_file(field: &'static str, path: &std::path::Path) -> Result<String, KafkaConnectError> {
    crate::tls::read_secret_file(field, path).map_err(|e| KafkaConnectError::SecretFile(e.to_string()))
}

/// Why `KafkaBroker::connect` failed. Nothing here carries a credential.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KafkaConnectError {
    #[error(transparent)]
    Config(#[from] KafkaConfigError),
    #[error("environment variable {variable} (named by kafka.{field}) {problem}")]
    Credential {
        field: &'static str,
        variable: String,
        problem: &'static str,
    },
    /// A secret file could not be read (the message names the field and the path).
    #[error("{0}")]
    SecretFile(String),
    #[error("cannot create the Kafka {client}: {reason}")]
    Client { client: &'static str, reason: String },
}

/// Describes a client error without echoing a secret property's value.
fn describe_client_error(error: &KafkaError) -> String {
    match error {
        KafkaError::ClientConfig(_, description, key, value) => {
            if SECRET_PROPERTIES.contains(&key.as_str()) {
                let description = if value.is_empty() {
                    description.clone()
                } else {
                    description.replace(value.as_str(), "<redacted>")
                };
                format!("invalid property {key}: {description}")
            } else {
                format!("invalid property {key}={value}: {description}")
            }
        }
        other => other.to_string(),
    }
}

/// librdkafka's log lines and client errors for one adapter (shared by its producer and its
/// admin client). It keeps the last connection error for the health check and logs each
/// distinct error once, where librdkafka would repeat it on every reconnect.
#[derive(Clone, Default)]
pub struct KafkaClientContext {
    state: Arc<Mutex<ContextState>>,
}

#[derive(Default)]
struct ContextState {
    /// The last error librdkafka reported, cleared when a health check gets through.
    last_error: Option<String>,
    /// When each distinct warning or error was last logged, to drop repeats.
    logged: std::collections::HashMap<String, std::time::Instant>,
}

/// A repeated librdkafka warning or error is logged again after this long.
const LOG_REPEAT_AFTER: Duration = Duration::from_secs(60);
/// Distinct messages remembered for deduplication (librdkafka has a bounded vocabulary; this
/// only bounds memory if a broker sends ever-changing text).
const LOG_MEMORY: usize = 64;

/// librdkafka appends " (after 12ms in state SSL_HANDSHAKE)" and the like; without it, repeats
/// of one failure compare equal.
fn without_timing(message: &str) -> &str {
    match message.rfind(" (after ") {
        Some(at) if message.ends_with(')') => &message[..at],
        _ => message,
    }
}

impl KafkaClientContext {
    fn state(&self) -> std::sync::MutexGuard<'_, ContextState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The last connection error librdkafka reported since the last successful health check.
    pub fn last_error(&self) -> Option<String> {
        self.state().last_error.clone()
    }

    fn clear_error(&self) {
        let mut state = self.state();
        state.last_error = None;
        state.logged.clear();
    }

    /// Records `message`; true when it was not logged within the last minute.
    fn record(&self, message: &str, as_error: bool) -> bool {
        let message = without_timing(message);
        let mut state = self.state();
        if as_error {
            state.last_error = Some(message.to_owned());
        }
        let now = std::time::Instant::now();
        if let Some(at) = state.logged.get(message)
            && now.duration_since(*at) < LOG_REPEAT_AFTER
        {
            return false;
        }
        if state.logged.len() >= LOG_MEMORY {
            state.logged.retain(|_, at| now.duration_since(*at) < LOG_REPEAT_AFTER);
        }
        state.logged.insert(message.to_owned(), now);
        true
    }
}

impl ClientContext for KafkaClientContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                if self.record(message, false) {
                    tracing::warn!(target: "librdkafka", facility, "{message}");
                }
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility, "{message}");
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // "1/1 brokers are down" follows every refused connection and says less than it.
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::AllBrokersDown))
            && self.state().last_error.is_some()
        {
            return;
        }
        if self.record(reason, true) {
            tracing::error!(target: "librdkafka", error = %error, "kafka connection failed: {reason}");
        }
    }
}

/// The `host:port` a librdkafka message is about (`sasl_ssl://host:port/bootstrap: …`).
fn endpoint_in(message: &str) -> Option<&str> {
    let rest = &message[message.find("://")? + 3..];
    let end = rest.find(['/', ' ']).unwrap_or(rest.len());
    let endpoint = rest[..end].trim_end_matches(':');
    (!endpoint.is_empty()).then_some(endpoint)
}

/// Refusals of this one record that will repeat on every retry.
fn is_message_level(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::MessageBatchTooLarge
    )
}

/// Refusals of the whole topic: no record can go there until the topic is created or access
/// granted, and the events are not at fault.
fn is_destination_level(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::InvalidTopic
            // librdkafka reports these only once metadata shows the topic missing after
            // `topic.metadata.propagation.max.ms`, i.e. the broker did not auto-create it.
            | RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
    )
}

/// Classifies a produce error; the message names the librdkafka error code and the topic.
fn classify(error: &KafkaError, topic: &str) -> SendError {
    match error.rdkafka_error_code() {
        Some(code) if is_message_level(code) => SendError::Message(format!("Kafka {code:?} on topic {topic}: {code}")),
        Some(code) if is_destination_level(code) => {
            SendError::Destination(format!("Kafka {code:?} on topic {topic}: {code}"))
        }
        Some(code) => SendError::Transient(format!("Kafka {code:?} on topic {topic}: {code}")),
        None => SendError::Transient(format!(
            "Kafka error on topic {topic}: {}",
            describe_client_error(error)
        )),
    }
}

/// Topic-creation refusals that will repeat on every retry.
fn is_permanent_admin(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidPartitions
            | RDKafkaErrorCode::InvalidReplicationFactor
            | RDKafkaErrorCode::InvalidReplicaAssignment
            | RDKafkaErrorCode::InvalidConfig
            | RDKafkaErrorCode::PolicyViolation
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
    )
}

/// One record ready for the producer.
struct Outgoing {
    topic: String,
    key: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Outgoing {
    fn record(&self) -> FutureRecord<'_, str, [u8]> {
        let headers = self.headers.iter().fold(
            OwnedHeaders::new_with_capacity(self.headers.len()),
            |h, (key, value)| {
                h.insert(Header {
                    key: key.as_str(),
                    value: Some(value.as_bytes()),
                })
            },
        );
        FutureRecord::to(&self.topic)
            .key(self.key.as_str())
            .payload(self.body.as_slice())
            .headers(headers)
    }
}

/// Where one record of a batch stands after the enqueue phase.
enum Enqueued {
    Failed(SendError),
    Pending { topic: String, delivery: DeliveryFuture },
}

/// The topic this publisher creates under `name`: its partitions, its replication factor
/// (-1, the broker's default, when unset: KIP-464), `min.insync.replicas` (`min_insync`, the
/// setting as text) and the configured topic entries. Shared by the relay and `provision`.
pub(crate) fn new_topic<'a>(config: &'a KafkaConfig, name: &'a str, min_insync: Option<&'a str>) -> NewTopic<'a> {
    let topic = NewTopic::new(
        name,
        config.partitions,
        TopicReplication::Fixed(config.replication_factor.unwrap_or(-1)),
    );
    let topic = match min_insync {
        Some(replicas) => topic.set("min.insync.replicas", replicas),
        None => topic,
    };
    config
        .topic_config
        .iter()
        .fold(topic, |topic, (key, value)| topic.set(key.trim(), value))
}

/// The Kafka adapter: one idempotent producer and one admin client.
pub struct KafkaBroker {
    /// Replaced after a fatal error (an idempotent producer that lost its sequence state
    /// refuses every further record); in-flight records of the old one fail, never "publish".
    producer: std::sync::RwLock<FutureProducer>,
    producer_config: ClientConfig,
    admin: AdminClient<KafkaClientContext>,
    /// Receives librdkafka's callbacks of both clients; holds the last connection error.
    context: KafkaClientContext,
    config: KafkaConfig,
    framing: Option<ConfluentFraming>,
}

impl fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBroker")
            .field("bootstrap_servers", &self.config.bootstrap_servers)
            .field("client_id", &self.config.client_id)
            .field("mode", &self.config.mode)
            .finish_non_exhaustive()
    }
}

impl super::AdapterConfig for KafkaConfig {
    type Adapter = KafkaBroker;
    type Error = KafkaConnectError;

    fn build(&self) -> super::BoxFuture<'_, Result<KafkaBroker, KafkaConnectError>> {
        Box::pin(std::future::ready(KafkaBroker::connect(self)))
    }
}

impl KafkaBroker {
    /// Validates the configuration, reads the credentials from the environment and creates the
    /// producer and admin client. Connections are made lazily: an unreachable cluster shows in
    /// `check_health` and in sends, not here.
    pub fn connect(config: &KafkaConfig) -> Result<KafkaBroker, KafkaConnectError> {
        config.validate()?;
        let base = config.client_config()?;
        let context = KafkaClientContext::default();
        if let Some(tls) = &config.tls {
            tls.warn_if_insecure(&config.bootstrap_servers);
        }
        let admin: AdminClient<KafkaClientContext> =
            base.create_with_context(context.clone())
                .map_err(|e| KafkaConnectError::Client {
                    client: "admin client",
                    reason: describe_client_error(&e),
                })?;
        let mut producer_config = base;
        // Java-compatible key hashing, so other producers agree on an aggregate's partition.
        if !config.producer_overrides.contains_key("partitioner") {
            producer_config.set("partitioner", "murmur2_random");
        }
        producer_config
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("max.in.flight.requests.per.connection", "5")
            .set("linger.ms", config.linger_ms.to_string())
            .set("compression.type", config.compression.as_str())
            .set("message.timeout.ms", config.message_timeout_ms.to_string());
        let producer: FutureProducer =
            producer_config
                .create_with_context(context.clone())
                .map_err(|e| KafkaConnectError::Client {
                    client: "producer",
                    reason: describe_client_error(&e),
                })?;
        tracing::info!(
            bootstrap_servers = %config.bootstrap_servers,
            client_id = %config.client_id,
            security_protocol = %config.security_protocol,
            mode = ?config.mode,
            "kafka producer created"
        );
        Ok(KafkaBroker {
            producer: std::sync::RwLock::new(producer),
            producer_config,
            admin,
            context,
            config: config.clone(),
            framing: None,
        })
    }

    /// Frames record values in the Confluent wire format with ids from `framing`
    /// (`wireFormat.format: confluent`); dead letters stay plain CloudEvents.
    pub fn with_confluent_framing(mut self, framing: ConfluentFraming) -> Self {
        self.framing = Some(framing);
        self
    }

    /// The configuration the broker was created with.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// The current producer (cheap to clone: a handle).
    fn producer(&self) -> FutureProducer {
        self.producer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The producer currently in use, so a test can inject a librdkafka fatal error into it
    /// (`rd_kafka_test_fatal_error`). For tests only; not part of the adapter's interface.
    #[doc(hidden)]
    pub fn producer_for_tests(&self) -> FutureProducer {
        self.producer()
    }

    /// Recreates the producer when librdkafka reports a fatal error (e.g. an idempotence
    /// sequence gap), so the next retry goes through a working one.
    fn recover_from_fatal_error(&self) {
        let Some((code, reason)) = self.producer().client().fatal_error() else {
            return;
        };
        match self
            .producer_config
            .create_with_context::<_, FutureProducer>(self.context.clone())
        {
            Ok(fresh) => {
                tracing::error!(?code, reason, "kafka producer hit a fatal error; recreated it");
                *self.producer.write().unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
            }
            Err(e) => tracing::error!(
                ?code,
                reason,
                error = %describe_client_error(&e),
                "kafka producer hit a fatal error and could not be recreated"
            ),
        }
    }

    /// One event's record: the shared encode step mapped to the Kafka binding (`ce_`-prefixed
    /// headers, `content-type`; in structured mode `ce_id` too, so consumers can deduplicate
    /// without parsing the body), keyed by aggregate so one partition keeps its order.
    fn encode(&self, message: &Message, topic: &str, extra: &[(&str, &str)]) -> Result<Outgoing, SendError> {
        let event = &message.event;
        let encoded = Encoded::new(event, self.config.mode)?;
        let mut headers = Vec::with_capacity(encoded.attributes.len() + 3 + extra.len());
        headers.push(("content-type".to_owned(), encoded.content_type.to_owned()));
        headers.extend(encoded.prefixed(KAFKA_PREFIX).map(|(k, v)| (k, v.to_owned())));
        if self.config.mode == CloudEventsMode::Structured {
            headers.push((format!("{KAFKA_PREFIX}id"), event.event_id.to_string()));
        }
        if let Some(traceparent) = encoded.traceparent {
            headers.push(("traceparent".to_owned(), traceparent));
        }
        headers.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        Ok(Outgoing {
            topic: topic.to_owned(),
            key: event.aggregate_id.clone(),
            headers,
            body: encoded.body.into_bytes(),
        })
    }

    /// Hands one record to librdkafka, waiting while its local queue is full (at most until
    /// `deadline`).
    async fn enqueue(&self, outgoing: &Outgoing, deadline: Instant) -> Enqueued {
        let mut record = outgoing.record();
        let producer = self.producer();
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    return Enqueued::Pending {
                        topic: outgoing.topic.clone(),
                        delivery,
                    };
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned))
                    if Instant::now() < deadline =>
                {
                    record = returned;
                }
                Err((error, _)) => return Enqueued::Failed(classify(&error, &outgoing.topic)),
            }
            tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
        }
    }

    /// Enqueues every record first (so they pipeline into batches), then awaits every delivery
    /// report. Results are in input order; `records[i]` encodes `messages[i]`.
    async fn deliver(
        &self,
        records: Vec<Result<Outgoing, SendError>>,
        messages: &[Message],
    ) -> Vec<Result<(), SendError>> {
        let (enqueued, _) = self.queue_all(records, messages).await;
        let results = self.reports(enqueued).await;
        if results.iter().any(Result::is_err) {
            self.recover_from_fatal_error();
        }
        results
    }

    /// Hands every record to librdkafka in input order; returns each record's state and the
    /// positions refused before reaching the producer.
    ///
    /// Once a record of an aggregate cannot be encoded or enqueued, that aggregate's later
    /// records of the call are not handed to librdkafka (they fail as withheld), so the relay
    /// may send several events of one aggregate in one call (`keeps_aggregate_order`). A
    /// record refused later, in its delivery report, has its successors already enqueued:
    /// librdkafka's idempotent producer writes one partition in enqueue order and fails the
    /// queued successors of a timed-out record with it, except when a successor's own
    /// timeout falls after the broker is back (librdkafka's documented gap); the relay checks
    /// every call's results for that and counts it.
    async fn queue_all(
        &self,
        records: Vec<Result<Outgoing, SendError>>,
        messages: &[Message],
    ) -> (Vec<Enqueued>, Vec<usize>) {
        let enqueue_deadline = Instant::now() + self.config.message_timeout();
        let mut enqueued = Vec::with_capacity(records.len());
        let mut refused_at = Vec::new();
        // (topic, aggregate type, aggregate id) of every aggregate with a refused record here.
        let mut refused: HashSet<(&str, &str, &str)> = HashSet::new();
        for (i, (record, message)) in records.iter().zip(messages).enumerate() {
            let aggregate = (
                message.destination.as_str(),
                message.event.aggregate_type.as_str(),
                message.event.aggregate_id.as_str(),
            );
            if !refused.is_empty() && refused.contains(&aggregate) {
                enqueued.push(Enqueued::Failed(SendError::Transient(format!(
                    "withheld: an earlier event of aggregate {} {} failed in the same batch",
                    aggregate.1, aggregate.2
                ))));
                refused_at.push(i);
                continue;
            }
            let state = match record {
                Ok(outgoing) => self.enqueue(outgoing, enqueue_deadline).await,
                Err(error) => Enqueued::Failed(error.clone()),
            };
            if matches!(state, Enqueued::Failed(_)) {
                refused.insert(aggregate);
                refused_at.push(i);
            }
            enqueued.push(state);
        }
        (enqueued, refused_at)
    }

    /// Awaits the delivery report of every enqueued record; owns everything it needs, so the
    /// caller may hand the next batch over meanwhile.
    fn reports(&self, enqueued: Vec<Enqueued>) -> impl Future<Output = Vec<Result<(), SendError>>> + Send + 'static {
        let timeout = self.config.message_timeout();
        // librdkafka reports every record within message.timeout.ms of its enqueue; the grace
        // only guards against a report that never comes.
        let report_deadline = Instant::now() + timeout + DELIVERY_REPORT_GRACE;
        join_all(enqueued.into_iter().map(move |state| async move {
            let (topic, delivery) = match state {
                Enqueued::Failed(error) => return Err(error),
                Enqueued::Pending { topic, delivery } => (topic, delivery),
            };
            match tokio::time::timeout_at(report_deadline, delivery).await {
                Ok(Ok(Ok(_))) => Ok(()),
                Ok(Ok(Err((error, _)))) => Err(classify(&error, &topic)),
                Ok(Err(_canceled)) => Err(SendError::Transient(format!(
                    "delivery report for topic {topic} was canceled (producer shut down)"
                ))),
                Err(_elapsed) => Err(SendError::Transient(format!(
                    "no delivery report for topic {topic} within {} ms",
                    timeout.as_millis() + DELIVERY_REPORT_GRACE.as_millis()
                ))),
            }
        }))
    }

    /// The records of one `send_batch` call, Confluent-framed when the registry integration is on.
    async fn records(&self, messages: &[Message]) -> Vec<Result<Outgoing, SendError>> {
        match &self.framing {
            None => messages.iter().map(|m| self.encode(m, &m.destination, &[])).collect(),
            Some(framing) => (framing.schema_ids(messages).await.into_iter().zip(messages))
                .map(|(id, m)| -> Result<Outgoing, SendError> {
                    let mut record = self.encode(m, &m.destination, &[])?;
                    record.body = confluent::frame(id?, &record.body);
                    Ok(record)
                })
                .collect(),
        }
    }

    async fn create_topics(&self, destinations: &[String]) -> Result<(), SendError> {
        let names: BTreeSet<&str> = destinations
            .iter()
            .map(String::as_str)
            .chain([self.config.dead_letter_topic.as_str()])
            .collect();
        for name in &names {
            check_topic_name(name)
                .map_err(|reason| SendError::Message(format!("topic name {name:?} is invalid: it {reason}")))?;
        }
        let min_insync = self.config.min_insync_replicas.map(|r| r.to_string());
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|name| new_topic(&self.config, name, min_insync.as_deref()))
            .collect();
        let options = AdminOptions::new()
            .operation_timeout(Some(ADMIN_OPERATION_TIMEOUT))
            .request_timeout(Some(ADMIN_REQUEST_TIMEOUT));
        let results = self.admin.create_topics(&topics, &options).await.map_err(|e| {
            SendError::Transient(format!(
                "creating Kafka topics {names:?} failed: {}",
                describe_client_error(&e)
            ))
        })?;
        for result in results {
            match result {
                Ok(name) => tracing::info!(topic = %name, "kafka topic created"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    let message = format!("creating Kafka topic {name} failed with {code:?}: {code}");
                    return Err(if is_permanent_admin(code) {
                        SendError::Message(message)
                    } else {
                        SendError::Transient(message)
                    });
                }
            }
        }
        Ok(())
    }

    async fn fetch_cluster_metadata(&self) -> Result<(), SendError> {
        let producer = self.producer();
        let fetched = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, HEALTH_TIMEOUT)
                .map(|metadata| metadata.brokers().len())
        })
        .await
        .map_err(|e| SendError::Transient(format!("Kafka metadata request did not complete: {e}")))?;
        match fetched {
            Ok(0) => Err(SendError::Transient("Kafka metadata lists no brokers".to_owned())),
            Ok(_) => {
                self.context.clear_error();
                Ok(())
            }
            Err(error) => Err(SendError::Transient(self.unreachable_reason(&error).await)),
        }
    }

    /// Why the cluster did not answer, naming the endpoint: librdkafka's last connection error
    /// (SASL refusal, TLS failure, refused connection) rather than the generic metadata
    /// timeout, with the certificate problem spelled out when librdkafka only says "certificate
    /// verify failed".
    async fn unreachable_reason(&self, error: &KafkaError) -> String {
        let protocol = self.config.security_protocol;
        let bootstrap = self.config.bootstrap_servers.trim();
        let Some(cause) = self.context.last_error() else {
            return format!(
                "Kafka cluster metadata unavailable from {bootstrap} ({protocol}): {}",
                describe_client_error(error)
            );
        };
        let ca_file = self.config.tls.as_ref().and_then(|t| t.ca_file.clone());
        let diagnosis = match ca_file {
            Some(ca_file) if cause.contains("certificate verify failed") => {
                let endpoint = endpoint_in(&cause)
                    .or_else(|| bootstrap.split(',').next())
                    .unwrap_or(bootstrap)
                    .trim()
                    .to_owned();
                tokio::task::spawn_blocking(move || crate::tls::diagnose_server_certificate(&endpoint, &ca_file))
                    .await
                    .ok()
                    .flatten()
            }
            _ => None,
        };
        match diagnosis {
            Some(why) => format!("Kafka {bootstrap} ({protocol}): TLS handshake refused: {why} (librdkafka: {cause})"),
            None => format!("Kafka {bootstrap} ({protocol}): {cause}"),
        }
    }
}

impl Broker for KafkaBroker {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn send_batch<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Vec<Result<(), SendError>>> {
        Box::pin(async move {
            let records = self.records(messages).await;
            self.deliver(records, messages).await
        })
    }

    fn orders_across_calls(&self) -> bool {
        true
    }

    /// Queues the batch and returns; the delivery reports come with `acks`. A producer left
    /// unusable by a fatal error in an earlier batch is replaced before queueing (the earlier
    /// batch's reports may still be outstanding, so this is where the next call learns of it).
    fn hand_over<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, HandedOver> {
        Box::pin(async move {
            self.recover_from_fatal_error();
            let records = self.records(messages).await;
            let (enqueued, refused) = self.queue_all(records, messages).await;
            HandedOver {
                refused,
                acks: Box::pin(self.reports(enqueued)),
            }
        })
    }

    fn send_dead_letter<'a>(&'a self, message: &'a Message, reason: &'a str) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async move {
            let extra = [
                (DEAD_LETTER_REASON_HEADER, reason),
                (ORIGINAL_TOPIC_HEADER, message.destination.as_str()),
            ];
            let record = self.encode(message, &self.config.dead_letter_topic, &extra);
            self.deliver(vec![record], std::slice::from_ref(message))
                .await
                .pop()
                .unwrap_or_else(|| {
                    Err(SendError::Transient(
                        "no delivery result for the dead letter".to_owned(),
                    ))
                })
        })
    }

    fn ensure_destinations<'a>(&'a self, destinations: &'a [String]) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(self.create_topics(destinations))
    }

    fn check_health(&self) -> BoxFuture<'_, Result<(), SendError>> {
        Box::pin(self.fetch_cluster_metadata())
    }

    /// Records are keyed by aggregate id, so one aggregate's records share a partition, which
    /// the idempotent producer writes in enqueue order; `deliver` withholds an aggregate's
    /// records after one of them was refused.
    fn keeps_aggregate_order(&self) -> bool {
        true
    }

    fn send_budget(&self) -> Duration {
        // Every record of a call is bounded by messageTimeoutMs; the margin covers the wait
        // for the delivery reports after it.
        self.config.message_timeout() + Duration::from_secs(10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> KafkaConfig {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            dead_letter_topic: "inventory.dead-letter".into(),
            ..KafkaConfig::default()
        }
    }

    fn error_of(config: KafkaConfig) -> String {
        config.validate().expect_err("invalid").to_string()
    }

    #[test]
    fn a_minimal_document_gets_the_documented_defaults() {
        let config: KafkaConfig = serde_json::from_value(serde_json::json!({
            "bootstrapServers": "kafka:9092",
            "deadLetterTopic": "dlq",
        }))
        .unwrap();
        assert_eq!(config.client_id, "inventory-outbox");
        assert_eq!(config.mode, CloudEventsMode::Binary);
        assert_eq!((config.partitions, config.replication_factor), (6, None));
        assert_eq!((config.message_timeout_ms, config.linger_ms), (30_000, 1));
        assert_eq!(config.compression, KafkaCompression::Lz4);
        assert_eq!(config.security_protocol, KafkaSecurityProtocol::Plaintext);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn the_document_uses_camel_case_and_the_librdkafka_spellings() {
        let config: KafkaConfig = serde_json::from_value(serde_json::json!({
            "bootstrapServers": "kafka:9092",
            "deadLetterTopic": "dlq",
            "mode": "structured",
            "compression": "zstd",
            "securityProtocol": "sasl_ssl",
            "saslMechanism": "SCRAM-SHA-512",
            "saslUsernameEnv": "KAFKA_USER",
            "saslPasswordEnv": "KAFKA_PASSWORD",
            "topicConfig": {"retention.ms": "604800000"},
            "producerOverrides": {"batch.size": "65536"},
        }))
        .unwrap();
        assert_eq!(config.compression.as_str(), "zstd");
        assert_eq!(config.security_protocol.as_str(), "sasl_ssl");
        assert_eq!(
            config.sasl_mechanism.map(KafkaSaslMechanism::as_str),
            Some("SCRAM-SHA-512")
        );
        assert_eq!(config.validate(), Ok(()));
        let round_trip: KafkaConfig = serde_json::from_value(serde_json::to_value(&config).unwrap()).unwrap();
        assert_eq!(round_trip, config);
    }

    #[test]
    fn required_strings_are_named_when_empty() {
        let mut config = valid();
        config.bootstrap_servers = " ".into();
        assert_eq!(error_of(config), "kafka.bootstrapServers is empty");
        let mut config = valid();
        config.client_id = String::new();
        assert_eq!(error_of(config), "kafka.clientId is empty");
        let mut config = valid();
        config.dead_letter_topic = String::new();
        assert_eq!(error_of(config), "kafka.deadLetterTopic is empty");
    }

    #[test]
    fn the_dead_letter_topic_must_be_a_kafka_topic_name() {
        let mut config = valid();
        config.dead_letter_topic = "dead letters".into();
        assert_eq!(
            error_of(config),
            "kafka.deadLetterTopic \"dead letters\" is not a valid Kafka topic name: it may contain only ASCII letters, digits, '.', '_' and '-'"
        );
        let mut config = valid();
        config.dead_letter_topic = "x".repeat(250);
        assert!(error_of(config).contains("longer than 249 characters"));
    }

    #[test]
    fn counts_and_timeouts_are_bounded() {
        let mut config = valid();
        config.partitions = 0;
        assert_eq!(error_of(config), "kafka.partitions is 0; it must be at least 1");
        let mut config = valid();
        config.replication_factor = Some(-1);
        assert_eq!(error_of(config), "kafka.replicationFactor is -1; it must be at least 1");
        let mut config = valid();
        config.message_timeout_ms = 0;
        assert_eq!(error_of(config), "kafka.messageTimeoutMs is 0; it must be at least 1");
        let mut config = valid();
        config.linger_ms = 30_000;
        assert_eq!(
            error_of(config),
            "kafka.lingerMs (30000) must be less than kafka.messageTimeoutMs (30000)"
        );
        let mut config = valid();
        config.topic_config.insert(String::new(), "1".into());
        assert_eq!(error_of(config), "kafka.topicConfig has an empty key");
    }

    #[test]
    fn sasl_needs_a_mechanism_and_both_variable_names_and_nothing_else_takes_them() {
        let mut config = valid();
        config.security_protocol = KafkaSecurityProtocol::SaslSsl;
        assert_eq!(
            error_of(config.clone()),
            "kafka.saslMechanism is required when kafka.securityProtocol is sasl_ssl"
        );
        config.sasl_mechanism = Some(KafkaSaslMechanism::Plain);
        config.sasl_username_env = Some("KAFKA_USER".into());
        assert_eq!(
            error_of(config.clone()),
            "kafka.saslPasswordFile (or saslPasswordEnv) is required when kafka.securityProtocol is sasl_ssl"
        );
        config.sasl_password_env = Some("KAFKA=PASSWORD".into());
        assert_eq!(
            error_of(config.clone()),
            "kafka.saslPasswordEnv \"KAFKA=PASSWORD\" is not a valid environment variable name"
        );
        config.sasl_password_env = Some("KAFKA_PASSWORD".into());
        assert_eq!(config.validate(), Ok(()));
        config.security_protocol = KafkaSecurityProtocol::Ssl;
        assert_eq!(
            error_of(config),
            "kafka.saslMechanism is set but kafka.securityProtocol is ssl; SASL needs sasl_plaintext or sasl_ssl"
        );
    }

    #[test]
    fn tls_needs_a_tls_protocol_and_sasl_takes_a_file_or_a_variable_not_both() {
        let mut config = valid();
        config.tls = Some(TlsFiles {
            ca_file: Some("/etc/kafka-ca/ca.crt".into()),
            ..TlsFiles::default()
        });
        assert_eq!(
            error_of(config.clone()),
            "kafka.tls is set but kafka.securityProtocol is plaintext; TLS needs ssl or sasl_ssl"
        );
        config.security_protocol = KafkaSecurityProtocol::SaslSsl;
        config.sasl_mechanism = Some(KafkaSaslMechanism::ScramSha512);
        config.sasl_username_file = Some("/etc/kafka/username".into());
        config.sasl_password_file = Some("/etc/kafka/password".into());
        assert_eq!(config.validate(), Ok(()));
        config.sasl_password_env = Some("KAFKA_PASSWORD".into());
        assert_eq!(
            error_of(config.clone()),
            "kafka.saslPasswordEnv and kafka.saslPasswordFile are both set; use one"
        );
        config.sasl_password_env = None;
        config.tls = Some(TlsFiles {
            cert_file: Some("/etc/kafka-client/tls.crt".into()),
            ..TlsFiles::default()
        });
        assert_eq!(
            error_of(config),
            "kafka.tls.certFile and tls.keyFile go together: keyFile is missing"
        );
    }

    #[test]
    fn tls_settings_become_librdkafka_properties_that_always_check_the_host_name() {
        let dir = std::env::temp_dir().join(format!("kafka-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("password"), "scram-secret\n").unwrap();
        let config = KafkaConfig {
            security_protocol: KafkaSecurityProtocol::SaslSsl,
            sasl_mechanism: Some(KafkaSaslMechanism::ScramSha256),
            sasl_username_file: Some(dir.join("password")),
            sasl_password_file: Some(dir.join("password")),
            tls: Some(TlsFiles {
                ca_file: Some("/etc/kafka-ca/ca.crt".into()),
                ..TlsFiles::default()
            }),
            ..valid()
        };
        let client = config.client_config().unwrap();
        assert_eq!(client.get("ssl.ca.location"), Some("/etc/kafka-ca/ca.crt"));
        assert_eq!(client.get("ssl.endpoint.identification.algorithm"), Some("https"));
        assert_eq!(
            client.get("sasl.password"),
            Some("scram-secret"),
            "the trailing newline is dropped"
        );
        assert_eq!(client.get("enable.ssl.certificate.verification"), None);
        let insecure = KafkaConfig {
            tls: Some(TlsFiles {
                insecure_skip_verify: true,
                ..TlsFiles::default()
            }),
            ..config
        };
        let client = insecure.client_config().unwrap();
        assert_eq!(client.get("enable.ssl.certificate.verification"), Some("false"));
        assert_eq!(client.get("ssl.endpoint.identification.algorithm"), Some("none"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn connection_errors_name_their_endpoint_and_repeat_without_their_timing() {
        let message = "sasl_ssl://kafka-0.kafka:9093/bootstrap: SASL authentication error: Authentication failed (after 309ms in state AUTH_REQ)";
        assert_eq!(endpoint_in(message), Some("kafka-0.kafka:9093"));
        assert_eq!(
            without_timing(message),
            "sasl_ssl://kafka-0.kafka:9093/bootstrap: SASL authentication error: Authentication failed"
        );
        let context = KafkaClientContext::default();
        assert!(context.record(message, true));
        assert!(
            !context.record(&message.replace("309ms", "311ms"), true),
            "a repeat is not logged again"
        );
        assert_eq!(context.last_error().as_deref(), Some(without_timing(message)));
        context.clear_error();
        assert_eq!(context.last_error(), None);
    }

    #[test]
    fn overrides_may_not_weaken_delivery_bypass_fields_or_hold_secrets() {
        let refused = |key: &str| {
            let mut config = valid();
            config.producer_overrides.insert(key.into(), "x".into());
            error_of(config)
        };
        assert_eq!(
            refused("acks"),
            "kafka.producerOverrides may not set \"acks\": the adapter always produces with acks=all"
        );
        assert!(
            refused("enable.idempotence").starts_with("kafka.producerOverrides may not set \"enable.idempotence\"")
        );
        assert_eq!(
            refused("bootstrap.servers"),
            "kafka.producerOverrides may not set \"bootstrap.servers\": set kafka.bootstrapServers instead"
        );
        assert_eq!(
            refused("request.required.acks"),
            "kafka.producerOverrides may not set \"request.required.acks\": the adapter always produces with acks=all"
        );
        assert_eq!(
            refused("linger.ms"),
            "kafka.producerOverrides may not set \"linger.ms\": set kafka.lingerMs instead"
        );
        assert!(refused("ssl.keystore.password").contains("secrets never go in the configuration document"));
        assert!(refused("ssl.key.password").ends_with("set kafka.tls.keyPasswordFile instead"));
        assert!(refused("enable.ssl.certificate.verification").ends_with("set kafka.tls.insecureSkipVerify instead"));
        let mut config = valid();
        config.producer_overrides.insert("batch.size".into(), "65536".into());
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn reconnects_back_off_at_most_a_second_unless_overridden() {
        let config = valid();
        let client = config.client_config().unwrap();
        assert_eq!(client.get("reconnect.backoff.max.ms"), Some("1000"));
        let mut config = valid();
        config
            .producer_overrides
            .insert("reconnect.backoff.max.ms".into(), "5000".into());
        assert_eq!(config.validate(), Ok(()));
        let client = config.client_config().unwrap();
        assert_eq!(client.get("reconnect.backoff.max.ms"), Some("5000"));
    }

    #[test]
    fn connect_names_an_unset_credential_variable() {
        let mut config = valid();
        config.security_protocol = KafkaSecurityProtocol::SaslPlaintext;
        config.sasl_mechanism = Some(KafkaSaslMechanism::Plain);
        config.sasl_username_env = Some("INVENTORY_OUTBOX_TEST_SURELY_UNSET_USER".into());
        config.sasl_password_env = Some("INVENTORY_OUTBOX_TEST_SURELY_UNSET_PASSWORD".into());
        let error = KafkaBroker::connect(&config).expect_err("unset variable");
        assert_eq!(
            error.to_string(),
            "environment variable INVENTORY_OUTBOX_TEST_SURELY_UNSET_USER (named by kafka.saslUsernameEnv) is not set"
        );
    }

    #[test]
    fn secret_values_are_redacted_from_client_errors() {
        let error = KafkaError::ClientConfig(
            rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            "Invalid value \"hunter2\"".into(),
            "sasl.password".into(),
            "hunter2".into(),
        );
        let described = describe_client_error(&error);
        assert!(!described.contains("hunter2"), "{described}");
        assert!(described.contains("sasl.password"), "{described}");
    }

    #[test]
    fn errors_are_classified_by_code_and_name_it() {
        let permanent = classify(
            &KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
            "t",
        );
        assert!(matches!(&permanent, SendError::Message(m) if m.contains("MessageSizeTooLarge")));
        for code in [RDKafkaErrorCode::InvalidRecord, RDKafkaErrorCode::MessageBatchTooLarge] {
            assert!(
                !classify(&KafkaError::MessageProduction(code), "t").is_retriable(),
                "{code:?}"
            );
        }
        // A missing or forbidden topic is the destination's fault: never dead-letter for it.
        for code in [
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::InvalidTopic,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::UnknownTopic,
        ] {
            assert!(
                classify(&KafkaError::MessageProduction(code), "t").is_destination(),
                "{code:?}"
            );
        }
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
        ] {
            assert!(
                classify(&KafkaError::MessageProduction(code), "t").is_retriable(),
                "{code:?}"
            );
        }
        assert!(classify(&KafkaError::Canceled, "t").is_retriable());
    }
}
