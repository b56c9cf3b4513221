//! RabbitMQ adapter: publishes to a durable topic exchange with publisher confirms.
//!
//! One AMQP connection carries one publishing channel in confirm mode. Both live behind a
//! mutex; when the broker restarts or closes the connection, the next call reconnects
//! (connection failures are [`SendError::Transient`]). A channel closed by the broker (e.g. a
//! publish to a deleted exchange) is reopened on the same connection.
//!
//! # Ordering
//!
//! All messages go through the one channel and batches are serialized on it, so RabbitMQ
//! enqueues them in publish order: for every queue, the queue order is the order of the
//! messages in the batch (and of the batches). `send_batch` publishes the whole batch first
//! (pipelined), then awaits every publisher confirm. Confirms may arrive out of order across
//! messages and may be coalesced (`multiple`), but each result is mapped back to its own
//! message, and results are returned in input order. Unroutable messages (with `mandatory`)
//! are recognised by their returned `message-id` and routing key, not by confirm order.
//!
//! Delivery is at least once: a message whose confirm was lost (timeout, connection drop)
//! may already be in its queue when it is retried, so consumers deduplicate by `message-id`
//! (the eventId). A retried message may also land after later messages of the same
//! aggregate that succeeded; keeping per-aggregate order across failures is the relay's job.
//!
//! # Wire format
//!
//! Binary mode (default): the JSON payload is the body, `content-type` is
//! `application/json`, and the CloudEvents attributes are `cloudEvents:`-prefixed headers
//! (long strings), as the CloudEvents AMQP binding describes. Structured mode: the body is
//! the CloudEvents JSON document with content type `application/cloudevents+json`. In both
//! modes messages are persistent (`delivery-mode` 2), `message-id` is the eventId, `type` is
//! the eventType and `timestamp` the event time (seconds).
//!
//! # TLS
//!
//! An `amqps` URL connects through lapin's rustls backend: the server's certificate must chain
//! to the platform's roots or to `tls.caFile` and name the URL's host. `tls.certFile` and
//! `tls.keyFile` add a client certificate. Credentials can come from files (`usernameFile`,
//! `passwordFile`), replacing any in the URL.
//!
//! # Errors
//!
//! Retriable: unreachable broker, connect timeout, channel or connection error, NACK,
//! confirm timeout, unroutable message (no queue bound for the routing key). Permanent: a
//! message larger than `maxMessageBytes`, a routing key or event type longer than the AMQP
//! limit of 255 bytes, and, in `ensure_destinations`, a declaration the broker refuses
//! (`PRECONDITION_FAILED`, e.g. an existing exchange of another type, or `ACCESS_REFUSED`).

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use lapin::message::BasicReturnMessage;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind, ExchangeKind};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::{Instant, timeout, timeout_at};

use super::encode::Encoded;
use super::{BoxFuture, Broker, CloudEventsMode, Message, SendError};
use crate::event::cloudevents::AMQP_PREFIX;
use crate::tls::TlsFiles;

/// Header carrying why a message was dead-lettered.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-dead-letter-reason";
/// Header carrying the routing key the dead-lettered message was meant for.
pub const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-original-routing-key";
/// Header carrying the exchange the dead-lettered message was meant for.
pub const ORIGINAL_EXCHANGE_HEADER: &str = "x-original-exchange";
/// Header set to `true` on a dead letter whose body was left out because it exceeds `maxMessageBytes`.
pub const BODY_OMITTED_HEADER: &str = "x-dead-letter-body-omitted";

/// RabbitMQ's default `max_message_size` (16 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 16 * 1024 * 1024;
/// RabbitMQ's hard upper limit for `max_message_size` (512 MiB).
pub const RABBITMQ_MESSAGE_SIZE_LIMIT: u64 = 512 * 1024 * 1024;
const MAX_SHORT_STRING: usize = 255;

fn default_confirm_timeout_ms() -> u64 {
    10_000
}

fn default_connect_timeout_ms() -> u64 {
    10_000
}

fn default_mandatory() -> bool {
    true
}

fn default_max_message_bytes() -> u64 {
    DEFAULT_MAX_MESSAGE_BYTES
}

/// Where the relay publishes in RabbitMQ and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RabbitMqConfig {
    /// Name of the environment variable holding the AMQP URL, credentials included
    /// (e.g. `AMQP_URL`, filled from a Secret). Credentials never go in this document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_env: Option<String>,
    /// AMQP URL without credentials, for local use only (e.g. `amqp://localhost:5672/%2f`).
    /// A URL with a password is rejected: use `urlEnv`. Exactly one of `url` and `urlEnv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// File holding the user name (e.g. a mounted Secret key); replaces the URL's. Set together
    /// with `passwordFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_file: Option<PathBuf>,
    /// File holding the password (e.g. a mounted Secret key); replaces the URL's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// TLS for an `amqps` URL: the CA file the server's certificate must chain to (in
    /// addition to the platform's roots) and an optional client certificate (PKCS#8 key).
    /// `insecureSkipVerify` and `keyPasswordFile` are not supported for RabbitMQ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// Durable topic exchange the events are published to; the routing key is the
    /// destination chosen by routing (e.g. `inventory.StockLevelChanged`).
    pub exchange: String,
    /// Exchange for dead letters, both those of the relay and those rejected by consumers of
    /// `queues`. Default: `<exchange>.dlx`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_exchange: Option<String>,
    /// Queue bound to the dead-letter exchange with `#`, holding every dead letter.
    /// Default: `<exchange>.dlq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_queue: Option<String>,
    /// CloudEvents mode: `binary` (attributes as `cloudEvents:` headers, payload as body) or
    /// `structured` (one `application/cloudevents+json` document).
    #[serde(default)]
    pub mode: CloudEventsMode,
    /// How long to wait for the broker's publisher confirms of a batch, in milliseconds
    /// (also bounds writing each message to the connection).
    #[serde(default = "default_confirm_timeout_ms")]
    pub confirm_timeout_ms: u64,
    /// How long to wait for connecting and for each declaration round trip (destinations,
    /// health check), in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Publish with the `mandatory` flag: a message no queue is bound for is returned by the
    /// broker and counts as a (retriable) failure instead of being dropped silently.
    #[serde(default = "default_mandatory")]
    pub mandatory: bool,
    /// Largest message body sent, in bytes; larger messages fail permanently without being
    /// sent. Default 16 MiB, RabbitMQ's default `max_message_size`.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u64,
    /// Consumer queues to declare (durable, dead-lettering to `deadLetterExchange`) and bind
    /// to `exchange`. A queue listed twice gets both binding keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<QueueBinding>,
}

/// A consumer queue and the binding key that routes events to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueueBinding {
    /// Queue name.
    pub name: String,
    /// Topic binding key, e.g. `inventory.#` or `inventory.StockLevelChanged`.
    pub binding_key: String,
}

/// A configuration RabbitMQ cannot work with; each message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RabbitMqConfigError {
    #[error("rabbitmq.{0} is empty")]
    Empty(String),
    #[error("rabbitmq.{field} is {len} bytes; AMQP names are at most 255 bytes")]
    TooLong { field: String, len: usize },
    #[error("rabbitmq.{0} starts with \"amq.\", which RabbitMQ reserves")]
    Reserved(String),
    #[error("rabbitmq.{0} must be greater than 0")]
    NotPositive(&'static str),
    #[error("rabbitmq.maxMessageBytes is {0}; RabbitMQ accepts at most {RABBITMQ_MESSAGE_SIZE_LIMIT}")]
    MessageSizeAboveLimit(u64),
    #[error("rabbitmq.deadLetterExchange must differ from rabbitmq.exchange")]
    DeadLetterExchangeIsExchange,
    #[error("rabbitmq.queues[{0}].name is the dead-letter queue; consumer queues must differ from it")]
    QueueIsDeadLetterQueue(usize),
    #[error(
        "rabbitmq.urlEnv is missing: name the environment variable holding the AMQP URL (or set rabbitmq.url without credentials for local use)"
    )]
    MissingUrl,
    #[error("rabbitmq.url and rabbitmq.urlEnv are both set; use only one")]
    BothUrls,
    #[error(
        "rabbitmq.url contains a password; keep the URL in a Secret and name its environment variable in rabbitmq.urlEnv"
    )]
    PasswordInUrl,
    #[error("rabbitmq.url is not a valid AMQP URL: {0}")]
    InvalidUrl(String),
    #[error("environment variable {0} (rabbitmq.urlEnv) is not set")]
    UrlEnvUnset(String),
    #[error("environment variable {name} (rabbitmq.urlEnv) is not a valid AMQP URL: {reason}")]
    UrlEnvInvalid { name: String, reason: String },
    #[error("rabbitmq.usernameFile and rabbitmq.passwordFile go together")]
    HalfCredentials,
    #[error("rabbitmq.tls is set but the URL is not amqps://")]
    TlsWithoutAmqps,
    #[error("rabbitmq.tls.{0} is not supported for RabbitMQ")]
    TlsUnsupported(&'static str),
    #[error("rabbitmq.{0}")]
    Tls(String),
    /// A secret or certificate file could not be read (names the field and path).
    #[error("{0}")]
    File(String),
}

/// Why [`RabbitMqBroker::connect`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The configuration is unusable; fix it, retrying will not help.
    #[error(transparent)]
    Config(#[from] RabbitMqConfigError),
    /// The broker could not be reached (always [`SendError::Transient`]).
    #[error("rabbitmq {0}")]
    Broker(#[from] SendError),
}

impl ConnectError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, ConnectError::Broker(e) if e.is_retriable())
    }
}

fn check_name(field: &str, value: &str) -> Result<(), RabbitMqConfigError> {
    if value.trim().is_empty() {
        return Err(RabbitMqConfigError::Empty(field.to_owned()));
    }
    if value.len() > MAX_SHORT_STRING {
        return Err(RabbitMqConfigError::TooLong {
            field: field.to_owned(),
            len: value.len(),
        });
    }
    if value.starts_with("amq.") {
        return Err(RabbitMqConfigError::Reserved(field.to_owned()));
    }
    Ok(())
}

/// True when the URL's user info has a non-empty password (`user:secret@host`).
fn url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .is_some_and(|(_, password)| !password.is_empty())
}

impl RabbitMqConfig {
    /// A configuration with the defaults, reading the URL from the environment variable `url_env`.
    pub fn new(url_env: impl Into<String>, exchange: impl Into<String>) -> Self {
        Self {
            url_env: Some(url_env.into()),
            url: None,
            username_file: None,
            password_file: None,
            tls: None,
            exchange: exchange.into(),
            dead_letter_exchange: None,
            dead_letter_queue: None,
            mode: CloudEventsMode::default(),
            confirm_timeout_ms: default_confirm_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            mandatory: default_mandatory(),
            max_message_bytes: default_max_message_bytes(),
            queues: Vec::new(),
        }
    }

    /// `deadLetterExchange`, or `<exchange>.dlx`.
    pub fn dead_letter_exchange(&self) -> String {
        self.dead_letter_exchange
            .clone()
            .unwrap_or_else(|| format!("{}.dlx", self.exchange))
    }

    /// `deadLetterQueue`, or `<exchange>.dlq`.
    pub fn dead_letter_queue(&self) -> String {
        self.dead_letter_queue
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.exchange))
    }

    /// Checks everything that can be checked without the broker or the environment.
    pub fn validate(&self) -> Result<(), RabbitMqConfigError> {
        match (&self.url_env, &self.url) {
            (None, None) => return Err(RabbitMqConfigError::MissingUrl),
            (Some(_), Some(_)) => return Err(RabbitMqConfigError::BothUrls),
            (Some(name), None) if name.trim().is_empty() => {
                return Err(RabbitMqConfigError::Empty("urlEnv".to_owned()));
            }
            (None, Some(url)) => {
                if url.trim().is_empty() {
                    return Err(RabbitMqConfigError::Empty("url".to_owned()));
                }
                if url_has_password(url) {
                    return Err(RabbitMqConfigError::PasswordInUrl);
                }
                AMQPUri::from_str(url).map_err(RabbitMqConfigError::InvalidUrl)?;
            }
            (Some(_), None) => {}
        }
        if self.username_file.is_some() != self.password_file.is_some() {
            return Err(RabbitMqConfigError::HalfCredentials);
        }
        if let Some(tls) = &self.tls {
            tls.validate().map_err(|e| RabbitMqConfigError::Tls(e.to_string()))?;
            if tls.insecure_skip_verify {
                return Err(RabbitMqConfigError::TlsUnsupported("insecureSkipVerify"));
            }
            if tls.key_password_file.is_some() {
                return Err(RabbitMqConfigError::TlsUnsupported("keyPasswordFile"));
            }
            if let Some(url) = &self.url
                && !url.trim_start().to_ascii_lowercase().starts_with("amqps://")
            {
                return Err(RabbitMqConfigError::TlsWithoutAmqps);
            }
        }
        check_name("exchange", &self.exchange)?;
        if let Some(dlx) = &self.dead_letter_exchange {
            check_name("deadLetterExchange", dlx)?;
        }
        if let Some(dlq) = &self.dead_letter_queue {
            check_name("deadLetterQueue", dlq)?;
        }
        // The defaults add 4 bytes to the exchange name.
        check_name("deadLetterExchange", &self.dead_letter_exchange())?;
        check_name("deadLetterQueue", &self.dead_letter_queue())?;
        if self.dead_letter_exchange() == self.exchange {
            return Err(RabbitMqConfigError::DeadLetterExchangeIsExchange);
        }
        if self.confirm_timeout_ms == 0 {
            return Err(RabbitMqConfigError::NotPositive("confirmTimeoutMs"));
        }
        if self.connect_timeout_ms == 0 {
            return Err(RabbitMqConfigError::NotPositive("connectTimeoutMs"));
        }
        if self.max_message_bytes == 0 {
            return Err(RabbitMqConfigError::NotPositive("maxMessageBytes"));
        }
        if self.max_message_bytes > RABBITMQ_MESSAGE_SIZE_LIMIT {
            return Err(RabbitMqConfigError::MessageSizeAboveLimit(self.max_message_bytes));
        }
        let dlq = self.dead_letter_queue();
        for (i, queue) in self.queues.iter().enumerate() {
            check_name(&format!("queues[{i}].name"), &queue.name)?;
            if queue.name == dlq {
                return Err(RabbitMqConfigError::QueueIsDeadLetterQueue(i));
            }
            let key_field = format!("queues[{i}].bindingKey");
            if queue.binding_key.trim().is_empty() {
                return Err(RabbitMqConfigError::Empty(key_field));
            }
            if queue.binding_key.len() > MAX_SHORT_STRING {
                return Err(RabbitMqConfigError::TooLong {
                    field: key_field,
                    len: queue.binding_key.len(),
                });
            }
        }
        Ok(())
    }

    /// The AMQP URL to connect to, reading `urlEnv` through `env`. Error messages never
    /// contain the URL itself.
    fn resolve_uri(&self, env: impl Fn(&str) -> Option<String>) -> Result<AMQPUri, RabbitMqConfigError> {
        let mut uri = self.parse_uri(env)?;
        if self.tls.is_some() && uri.scheme != AMQPScheme::AMQPS {
            return Err(RabbitMqConfigError::TlsWithoutAmqps);
        }
        if let (Some(user), Some(password)) = (&self.username_file, &self.password_file) {
            uri.authority.userinfo.username = read_file("rabbitmq.usernameFile", user)?;
            uri.authority.userinfo.password = read_file("rabbitmq.passwordFile", password)?;
        }
        Ok(uri)
    }

    /// The TLS settings lapin connects with: the CA file and client certificate, read now.
    fn tls_config(&self) -> Result<OwnedTLSConfig, RabbitMqConfigError> {
        let Some(tls) = &self.tls else {
            return Ok(OwnedTLSConfig::default());
        };
        let read = |field: &'static str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| RabbitMqConfigError::File(format!("read {field} {}: {e}", path.display())))
        };
        let cert_chain = match &tls.ca_file {
            Some(ca) => Some(String::from_utf8(read("rabbitmq.tls.caFile", ca)?).map_err(|_| {
                RabbitMqConfigError::File(format!("rabbitmq.tls.caFile {} is not PEM text", ca.display()))
            })?),
            None => None,
        };
        let identity = match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
                pem: read("rabbitmq.tls.certFile", cert)?,
                key: read("rabbitmq.tls.keyFile", key)?,
            }),
            _ => None,
        };
        Ok(OwnedTLSConfig { identity, cert_chain })
    }

    fn parse_uri(&self, env: impl Fn(&str) -> Option<String>) -> Result<AMQPUri, RabbitMqConfigError> {
        self.validate()?;
        match (&self.url_env, &self.url) {
            (Some(name), _) => {
                let value = env(name).ok_or_else(|| RabbitMqConfigError::UrlEnvUnset(name.clone()))?;
                AMQPUri::from_str(value.trim()).map_err(|reason| RabbitMqConfigError::UrlEnvInvalid {
                    name: name.clone(),
                    reason,
                })
            }
            (None, Some(url)) => AMQPUri::from_str(url).map_err(RabbitMqConfigError::InvalidUrl),
            (None, None) => Err(RabbitMqConfigError::MissingUrl),
        }
    }
}

fn read_file(field: &'static str, path: &std::path::Path) -> Result<String, RabbitMqConfigError> {
    crate::tls::read_secret_file(field, path).map_err(|e| RabbitMqConfigError::File(e.to_string()))
}

/// A message ready for `basic.publish`.
struct AmqpMessage {
    routing_key: ShortString,
    message_id: String,
    body: Vec<u8>,
    properties: BasicProperties,
}

fn short(what: &str, value: &str) -> Result<ShortString, SendError> {
    ShortString::try_new(value).map_err(|_| {
        SendError::Message(format!(
            "{what} is {} bytes; AMQP allows at most {MAX_SHORT_STRING}",
            value.len()
        ))
    })
}

fn long(value: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.into()))
}

/// The shared encode step mapped to an AMQP message, with `extra` headers added.
/// With `omit_large_body`, a body above the limit is replaced by an empty one (and the header
/// [`BODY_OMITTED_HEADER`]) instead of failing.
fn encode(
    config: &RabbitMqConfig,
    message: &Message,
    extra: &[(&str, String)],
    omit_large_body: bool,
) -> Result<AmqpMessage, SendError> {
    let event = &*message.event;
    let routing_key = short("routing key", &message.destination)?;
    let encoded = Encoded::new(event, config.mode)?;
    let mut headers = FieldTable::default();
    // The AMQP binding carries datacontenttype as the content-type property, the other
    // attributes as `cloudEvents:`-prefixed application properties.
    for (key, value) in encoded.prefixed(AMQP_PREFIX) {
        headers.insert(short("header name", &key)?, long(value));
    }
    // OpenTelemetry propagators read the plain W3C header, not the CloudEvents one.
    if let Some(traceparent) = encoded.traceparent {
        headers.insert("traceparent".into(), long(traceparent));
    }
    let content_type = encoded.content_type;
    let mut body = encoded.body.into_bytes();
    let size = body.len() as u64;
    if size > config.max_message_bytes {
        if !omit_large_body {
            return Err(SendError::Message(format!(
                "message of {size} bytes for routing key {} exceeds rabbitmq.maxMessageBytes ({})",
                message.destination, config.max_message_bytes
            )));
        }
        body.clear();
        headers.insert(BODY_OMITTED_HEADER.into(), AMQPValue::Boolean(true));
    }
    for (key, value) in extra {
        headers.insert(short("header name", key)?, long(value.clone()));
    }
    let message_id = event.event_id.to_string();
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(content_type.into())
        .with_message_id(message_id.as_str().into())
        .with_type(short("event type", &event.event_type)?)
        .with_app_id("inventory-outbox".into())
        .with_headers(headers);
    if let Ok(seconds) = u64::try_from(event.timestamp.timestamp()) {
        properties = properties.with_timestamp(seconds);
    }
    if let Some(correlation_id) = event.metadata.correlation_id.as_deref()
        && let Ok(correlation_id) = ShortString::try_new(correlation_id)
    {
        properties = properties.with_correlation_id(correlation_id);
    }
    Ok(AmqpMessage {
        routing_key,
        message_id,
        body,
        properties,
    })
}

/// The reply code of a broker (protocol) error, e.g. 404 or 406.
fn reply_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

fn is_refusal(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::ProtocolError(e) if matches!(
            e.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::ACCESSREFUSED)
        )
    )
}

/// The exchange is missing or this user may not publish to it: no message can go there until
/// an operator fixes the broker, and the events are not at fault.
fn is_destination_refusal(error: &lapin::Error) -> bool {
    matches!(
        reply_code(error),
        Some(code) if code == AMQPSoftError::NOTFOUND.get_id() || code == AMQPSoftError::ACCESSREFUSED.get_id()
    )
}

/// A proper AMQP close of `session` (channel, then connection), each step bounded, so the
/// broker frees it at once instead of waiting for a heartbeat timeout. Already closed ones are
/// skipped.
async fn close_gracefully(session: Session) {
    let bound = Duration::from_secs(2);
    if session.channel.status().connected() {
        let _ = timeout(bound, session.channel.close(200, "replaced".into())).await;
    }
    if session.connection.status().connected() {
        let _ = timeout(bound, session.connection.close(200, "replaced".into())).await;
    }
}

/// Closes a session the adapter replaced, in the background: the caller is on the publishing
/// path and must not wait for a stalled peer.
fn close_session(session: Session) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(close_gracefully(session));
}

impl Drop for RabbitMqBroker {
    fn drop(&mut self) {
        let Some(session) = self.session.get_mut().take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // A relay drops its adapter just before the process exits, and a spawned close would
        // die with the runtime (the broker then logs "client unexpectedly closed TCP
        // connection"), so wait for it where the runtime allows blocking a worker thread. A
        // current-thread runtime cannot block here; there the close runs in the background.
        if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            // Wait for a task, not `block_on`: while the runtime shuts down nothing drives its
            // I/O and timers, and a `block_on` here never returned (a test hung in CI). A task
            // the runtime drops unrun drops `done`, which ends the wait at once.
            let (done, finished) = std::sync::mpsc::channel::<()>();
            runtime.spawn(async move {
                close_gracefully(session).await;
                let _ = done.send(());
            });
            tokio::task::block_in_place(|| {
                let _ = finished.recv_timeout(Duration::from_secs(5));
            });
        } else {
            runtime.spawn(close_gracefully(session));
        }
    }
}

/// The connection and its publishing channel (confirm mode).
#[derive(Clone)]
struct Session {
    connection: Arc<Connection>,
    channel: Channel,
}

/// Publishes to RabbitMQ; see the module documentation.
pub struct RabbitMqBroker {
    config: RabbitMqConfig,
    /// Holds credentials: never logged, never in `Debug`.
    uri: AMQPUri,
    /// CA and client certificate for `amqps` (empty otherwise).
    tls: OwnedTLSConfig,
    exchange: ShortString,
    dead_letter_exchange: ShortString,
    connection_name: String,
    session: Mutex<Option<Session>>,
    /// Serializes batches on the one channel, so every confirm and returned message seen
    /// while a batch is in flight belongs to that batch.
    publishing: Mutex<()>,
}

impl fmt::Debug for RabbitMqBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqBroker")
            .field("exchange", &self.config.exchange)
            .field("host", &self.uri.authority.host)
            .field("port", &self.uri.authority.port)
            .field("connection_name", &self.connection_name)
            .finish_non_exhaustive()
    }
}

impl super::AdapterConfig for RabbitMqConfig {
    type Adapter = RabbitMqBroker;
    type Error = RabbitMqConfigError;

    fn build(&self) -> super::BoxFuture<'_, Result<RabbitMqBroker, RabbitMqConfigError>> {
        Box::pin(std::future::ready(RabbitMqBroker::new(self.clone())))
    }
}

impl RabbitMqBroker {
    /// Validates the configuration and resolves the URL, without connecting; the first call
    /// connects.
    pub fn new(config: RabbitMqConfig) -> Result<Self, RabbitMqConfigError> {
        Self::new_with_env(config, |name| std::env::var(name).ok())
    }

    /// Like [`new`](Self::new), reading `urlEnv` through `env` instead of the process environment.
    pub fn new_with_env(
        config: RabbitMqConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, RabbitMqConfigError> {
        let uri = config.resolve_uri(env)?;
        let tls = config.tls_config()?;
        // validate() checked both names against the AMQP limit.
        let exchange = ShortString::try_new(config.exchange.as_str())
            .map_err(|_| RabbitMqConfigError::Empty("exchange".to_owned()))?;
        let dead_letter_exchange = ShortString::try_new(config.dead_letter_exchange())
            .map_err(|_| RabbitMqConfigError::Empty("deadLetterExchange".to_owned()))?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        Ok(Self {
            connection_name: format!("inventory-outbox-{}", id.get(..12).unwrap_or(&id)),
            config,
            uri,
            tls,
            exchange,
            dead_letter_exchange,
            session: Mutex::new(None),
            publishing: Mutex::new(()),
        })
    }

    /// Validates the configuration and opens the connection and its confirm-mode channel.
    pub async fn connect(config: RabbitMqConfig) -> Result<Self, ConnectError> {
        let broker = Self::new(config)?;
        broker.session().await?;
        Ok(broker)
    }

    pub fn config(&self) -> &RabbitMqConfig {
        &self.config
    }

    /// The `connection_name` client property, as shown by the management UI and API.
    pub fn connection_name(&self) -> &str {
        &self.connection_name
    }

    fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.config.confirm_timeout_ms)
    }

    fn rpc_timeout(&self) -> Duration {
        Duration::from_millis(self.config.connect_timeout_ms)
    }

    fn target(&self) -> String {
        format!("{}:{}", self.uri.authority.host, self.uri.authority.port)
    }

    async fn open_channel(&self, connection: &Connection, confirm: bool) -> Result<Channel, SendError> {
        let open = async {
            let channel = connection.create_channel().await?;
            if confirm {
                channel.confirm_select(ConfirmSelectOptions::default()).await?;
            }
            Ok::<_, lapin::Error>(channel)
        };
        match timeout(self.rpc_timeout(), open).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(e)) => Err(SendError::Transient(format!("opening a channel failed: {e}"))),
            Err(_) => Err(SendError::Transient(format!(
                "opening a channel took longer than {} ms",
                self.config.connect_timeout_ms
            ))),
        }
    }

    async fn open_session(&self) -> Result<Session, SendError> {
        let properties = ConnectionProperties::default().with_connection_name(self.connection_name.as_str().into());
        let connection = match timeout(self.rpc_timeout(), self.connect_connection(properties)).await {
            Ok(Ok(connection)) => Arc::new(connection),
            Ok(Err(e)) => {
                return Err(SendError::Transient(format!(
                    "connecting to {} failed: {e}",
                    self.target()
                )));
            }
            Err(_) => {
                return Err(SendError::Transient(format!(
                    "connecting to {} took longer than {} ms",
                    self.target(),
                    self.config.connect_timeout_ms
                )));
            }
        };
        let channel = self.open_channel(&connection, true).await?;
        tracing::info!(target = %self.target(), connection = %self.connection_name, "connected to RabbitMQ");
        Ok(Session { connection, channel })
    }

    /// Opens the AMQP connection, over TLS for `amqps`.
    async fn connect_connection(&self, properties: ConnectionProperties) -> lapin::Result<Connection> {
        lapin::DefaultConnectionBuilder::new()?
            .with_uri(self.uri.clone())
            .with_properties(properties)
            .with_tls_config(self.tls.clone())
            .connect()
            .await
    }

    /// The current session, reopening the channel or reconnecting when needed.
    async fn session(&self) -> Result<Session, SendError> {
        let mut current = self.session.lock().await;
        if let Some(session) = current.as_ref() {
            if session.connection.status().connected() {
                if session.channel.status().connected() {
                    return Ok(session.clone());
                }
                tracing::warn!(connection = %self.connection_name, "RabbitMQ channel closed; reopening it");
                match self.open_channel(&session.connection, true).await {
                    Ok(channel) => {
                        let session = Session {
                            connection: session.connection.clone(),
                            channel,
                        };
                        *current = Some(session.clone());
                        return Ok(session);
                    }
                    Err(e) => tracing::warn!(error = %e, "reopening the RabbitMQ channel failed; reconnecting"),
                }
            } else {
                tracing::warn!(connection = %self.connection_name, "RabbitMQ connection lost; reconnecting");
            }
        }
        if let Some(old) = current.take() {
            close_session(old);
        }
        let session = self.open_session().await?;
        *current = Some(session.clone());
        Ok(session)
    }

    /// Forgets `session` (if still current), so the next call reconnects.
    async fn invalidate(&self, session: &Session) {
        let mut current = self.session.lock().await;
        if current
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(&s.connection, &session.connection))
            && let Some(old) = current.take()
        {
            close_session(old);
        }
    }

    /// Closes the adapter's connection, as a broker restart would. For tests.
    #[doc(hidden)]
    pub async fn close_connection_for_test(&self) {
        if let Some(session) = self.session.lock().await.as_ref() {
            let _ = session.connection.close(320, "closed for a test".into()).await;
        }
    }

    fn blocked_hint(&self, session: &Session) -> &'static str {
        if session.connection.status().blocked() {
            " (the broker blocked the connection, e.g. a memory or disk alarm)"
        } else {
            ""
        }
    }

    /// Publishes `items` (index into `results`, message) to `exchange` on the session's
    /// channel, then awaits every confirm and fills `results`.
    async fn publish_confirmed(
        &self,
        exchange: &ShortString,
        items: Vec<(usize, AmqpMessage)>,
        results: &mut [Option<Result<(), SendError>>],
    ) {
        if items.is_empty() {
            return;
        }
        let _serial = self.publishing.lock().await;
        let session = match self.session().await {
            Ok(session) => session,
            Err(e) => {
                for (i, _) in items {
                    results[i] = Some(Err(e.clone()));
                }
                return;
            }
        };
        let options = BasicPublishOptions {
            mandatory: self.config.mandatory,
            immediate: false,
        };
        let mut broken = false;
        let mut pending = Vec::with_capacity(items.len());
        // Queue the whole batch, then wait for the writes. lapin's `basic_publish` registers the
        // delivery tag and queues the frames on the channel on its first poll, and only then
        // waits for its I/O thread to write them; awaiting each publish in turn paid that
        // cross-thread handshake per message (about 110 µs, most of a batch's time). Polling each
        // publish once, in batch order, keeps the channel order and lets the writes overlap.
        let write_deadline = Instant::now() + self.confirm_timeout();
        let mut items = items;
        let properties: Vec<BasicProperties> = items
            .iter_mut()
            .map(|(_, encoded)| std::mem::take(&mut encoded.properties))
            .collect();
        let mut writes = Vec::with_capacity(items.len());
        for ((i, encoded), properties) in items.iter().zip(properties) {
            let mut publish = Box::pin(session.channel.basic_publish(
                exchange.clone(),
                encoded.routing_key.clone(),
                options,
                &encoded.body,
                properties,
            ));
            let first_poll = futures::poll!(publish.as_mut());
            let queued = !matches!(first_poll, std::task::Poll::Ready(Err(_)));
            writes.push((*i, encoded, first_poll, publish));
            if !queued {
                // Refused before queueing (the channel is closed): nothing after it is queued.
                break;
            }
        }
        let queued = writes.len();
        let mut writes = writes.into_iter();
        for (i, encoded, first_poll, publish) in writes.by_ref() {
            let written = match first_poll {
                std::task::Poll::Ready(result) => Ok(result),
                std::task::Poll::Pending => timeout_at(write_deadline, publish).await,
            };
            match written {
                Ok(Ok(confirm)) => pending.push((i, encoded.routing_key.clone(), encoded.message_id.clone(), confirm)),
                Ok(Err(e)) => {
                    let text = format!("publishing to routing key {} failed: {e}", encoded.routing_key);
                    results[i] = Some(Err(if is_destination_refusal(&e) {
                        SendError::Destination(text)
                    } else {
                        SendError::Transient(text)
                    }));
                    broken = true;
                    break;
                }
                Err(_) => {
                    results[i] = Some(Err(SendError::Transient(format!(
                        "writing the message for routing key {} took longer than {} ms{}",
                        encoded.routing_key,
                        self.config.confirm_timeout_ms,
                        self.blocked_hint(&session)
                    ))));
                    broken = true;
                    break;
                }
            }
        }
        // After a failed write, later messages count as failed even if queued (the session is
        // replaced below, which drops them, or they may land and be redelivered on retry: at
        // least once), so a message never counts as published behind one that failed.
        let unqueued = items.iter().skip(queued).map(|(i, encoded)| (*i, encoded));
        for (i, encoded) in writes.map(|(i, encoded, _, _)| (i, encoded)).chain(unqueued) {
            results[i] = Some(Err(SendError::Transient(format!(
                "not published (routing key {}): an earlier message of the batch failed",
                encoded.routing_key
            ))));
        }

        let deadline = Instant::now() + self.confirm_timeout();
        let mut confirmed = Vec::with_capacity(pending.len());
        let mut returned: HashSet<(String, String)> = HashSet::new();
        let mut return_reasons: Vec<(String, String, String)> = Vec::new();
        let mut note_return = |message: BasicReturnMessage| {
            let id = message
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default();
            let key = message.delivery.routing_key.to_string();
            return_reasons.push((
                id.clone(),
                key.clone(),
                format!("{} {}", message.reply_code, message.reply_text),
            ));
            returned.insert((id, key));
        };
        for (i, routing_key, message_id, confirm) in pending {
            let outcome = match timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(message))) => {
                    if let Some(message) = message {
                        note_return(message);
                    }
                    Ok(true)
                }
                Ok(Ok(Confirmation::Nack(message))) => {
                    if let Some(message) = message {
                        note_return(message);
                    }
                    Ok(false)
                }
                Ok(Ok(Confirmation::NotRequested)) => {
                    broken = true;
                    Err(SendError::Transient(
                        "the channel is not in confirm mode; no publisher confirm".to_owned(),
                    ))
                }
                Ok(Err(e)) => {
                    broken = true;
                    Err(SendError::Transient(format!(
                        "channel failed before the publisher confirm for routing key {routing_key}: {e}"
                    )))
                }
                Err(_) => {
                    broken = true;
                    Err(SendError::Transient(format!(
                        "no publisher confirm for routing key {routing_key} within {} ms{}",
                        self.config.confirm_timeout_ms,
                        self.blocked_hint(&session)
                    )))
                }
            };
            confirmed.push((i, routing_key, message_id, outcome));
        }
        for (i, routing_key, message_id, outcome) in confirmed {
            let key = (message_id, routing_key.to_string());
            results[i] = Some(match outcome {
                Ok(_) if returned.contains(&key) => {
                    let reply = return_reasons
                        .iter()
                        .find(|(id, rk, _)| (id, rk) == (&key.0, &key.1))
                        .map(|(_, _, reply)| reply.as_str())
                        .unwrap_or("unroutable");
                    Err(SendError::Transient(format!(
                        "no queue bound for routing key {routing_key} on exchange {exchange} (broker returned the message: {reply})"
                    )))
                }
                Ok(true) => Ok(()),
                Ok(false) => Err(SendError::Transient(format!(
                    "broker NACKed the message for routing key {routing_key}"
                ))),
                Err(e) => Err(e),
            });
        }
        if broken {
            // The channel or connection failed or stalled: start afresh next time.
            self.invalidate(&session).await;
        }
    }

    /// Runs `op` on a short-lived channel, so a broker refusal (which closes the channel)
    /// leaves the publishing channel alone.
    async fn with_admin_channel<T>(
        &self,
        op: impl AsyncFnOnce(&Channel) -> Result<T, SendError>,
    ) -> Result<T, SendError> {
        let session = self.session().await?;
        let channel = self.open_channel(&session.connection, false).await?;
        let result = op(&channel).await;
        if channel.status().connected() {
            let _ = timeout(self.rpc_timeout(), channel.close(200, "done".into())).await;
        }
        result
    }

    /// One declaration round trip, bounded by `connectTimeoutMs` and classified.
    async fn declare<T>(&self, what: &str, op: impl Future<Output = Result<T, lapin::Error>>) -> Result<T, SendError> {
        match timeout(self.rpc_timeout(), op).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if is_refusal(&e) => Err(SendError::Message(format!("{what} refused by the broker: {e}"))),
            Ok(Err(e)) => Err(SendError::Transient(format!("{what} failed: {e}"))),
            Err(_) => Err(SendError::Transient(format!(
                "{what} took longer than {} ms",
                self.config.connect_timeout_ms
            ))),
        }
    }

    async fn send_batch_impl(&self, messages: &[Message]) -> Vec<Result<(), SendError>> {
        let mut results: Vec<Option<Result<(), SendError>>> = vec![None; messages.len()];
        let mut items = Vec::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            match encode(&self.config, message, &[], false) {
                Ok(encoded) => items.push((i, encoded)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        self.publish_confirmed(&self.exchange, items, &mut results).await;
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(SendError::Transient("message was not published".to_owned()))))
            .collect()
    }

    async fn send_dead_letter_impl(&self, message: &Message, reason: &str) -> Result<(), SendError> {
        let extra = [
            (DEAD_LETTER_REASON_HEADER, reason.to_owned()),
            (ORIGINAL_ROUTING_KEY_HEADER, message.destination.clone()),
            (ORIGINAL_EXCHANGE_HEADER, self.config.exchange.clone()),
        ];
        let encoded = encode(&self.config, message, &extra, true)?;
        let mut results = [None];
        self.publish_confirmed(&self.dead_letter_exchange, vec![(0, encoded)], &mut results)
            .await;
        let [result] = results;
        result.unwrap_or_else(|| Err(SendError::Transient("dead letter was not published".to_owned())))
    }

    async fn ensure_destinations_impl(&self) -> Result<(), SendError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let exchange = self.exchange.clone();
        let dlx = self.dead_letter_exchange.clone();
        let dlq = short("rabbitmq.deadLetterQueue", &self.config.dead_letter_queue())?;
        let mut queues = Vec::with_capacity(self.config.queues.len());
        for q in &self.config.queues {
            queues.push((
                short("rabbitmq queue name", &q.name)?,
                short("rabbitmq binding key", &q.binding_key)?,
            ));
        }
        self.with_admin_channel(async |channel| {
            self.declare(
                &format!("declaring topic exchange {exchange}"),
                channel.exchange_declare(exchange.clone(), ExchangeKind::Topic, durable, FieldTable::default()),
            )
            .await?;
            self.declare(
                &format!("declaring dead-letter exchange {dlx}"),
                channel.exchange_declare(dlx.clone(), ExchangeKind::Topic, durable, FieldTable::default()),
            )
            .await?;
            self.declare(
                &format!("declaring dead-letter queue {dlq}"),
                channel.queue_declare(dlq.clone(), durable_queue, FieldTable::default()),
            )
            .await?;
            self.declare(
                &format!("binding dead-letter queue {dlq} to {dlx}"),
                channel.queue_bind(
                    dlq.clone(),
                    dlx.clone(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
            let mut arguments = FieldTable::default();
            arguments.insert("x-dead-letter-exchange".into(), long(dlx.to_string()));
            for (name, key) in queues {
                self.declare(
                    &format!("declaring queue {name}"),
                    channel.queue_declare(name.clone(), durable_queue, arguments.clone()),
                )
                .await?;
                self.declare(
                    &format!("binding queue {name} to {exchange} with {key}"),
                    channel.queue_bind(
                        name.clone(),
                        exchange.clone(),
                        key.clone(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    ),
                )
                .await?;
            }
            Ok(())
        })
        .await
    }

    async fn check_health_impl(&self) -> Result<(), SendError> {
        let exchange = self.exchange.clone();
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        self.with_admin_channel(async |channel| {
            let check = channel.exchange_declare(exchange.clone(), ExchangeKind::Topic, passive, FieldTable::default());
            match timeout(self.rpc_timeout(), check).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) if reply_code(&e) == Some(AMQPSoftError::NOTFOUND.get_id()) => Err(SendError::Transient(
                    format!("exchange {exchange} does not exist (ensure_destinations declares it)"),
                )),
                Ok(Err(e)) => Err(SendError::Transient(format!(
                    "checking exchange {exchange} failed: {e}"
                ))),
                Err(_) => Err(SendError::Transient(format!(
                    "checking exchange {exchange} took longer than {} ms",
                    self.config.connect_timeout_ms
                ))),
            }
        })
        .await
    }
}

impl Broker for RabbitMqBroker {
    fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    fn send_batch<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Vec<Result<(), SendError>>> {
        Box::pin(self.send_batch_impl(messages))
    }

    fn send_dead_letter<'a>(&'a self, message: &'a Message, reason: &'a str) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(self.send_dead_letter_impl(message, reason))
    }

    /// Declares the exchange, the dead-letter exchange and queue and the consumer queues. The
    /// destinations are routing keys: RabbitMQ needs nothing per key.
    fn ensure_destinations<'a>(&'a self, _destinations: &'a [String]) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(self.ensure_destinations_impl())
    }

    fn check_health(&self) -> BoxFuture<'_, Result<(), SendError>> {
        Box::pin(self.check_health_impl())
    }

    fn send_budget(&self) -> Duration {
        // Connecting, writing and waiting for the confirms are each bounded.
        self.rpc_timeout() * 2 + self.confirm_timeout() * 2 + Duration::from_secs(5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;
    use crate::event::cloudevents::{self, STRUCTURED_CONTENT_TYPE};
    use crate::event::validate::enrich;

    fn config() -> RabbitMqConfig {
        RabbitMqConfig::new("AMQP_URL", "inventory")
    }

    fn invalid(change: impl FnOnce(&mut RabbitMqConfig)) -> String {
        let mut c = config();
        change(&mut c);
        c.validate().expect_err("configuration should be rejected").to_string()
    }

    fn message(destination: &str, payload: serde_json::Value) -> Message {
        let draft = NewEvent::raw("StockLevelChanged", "InventoryItem", "item-1", 1, payload);
        Message {
            position: 1,
            destination: destination.to_owned(),
            event: Arc::new(enrich(draft, "warehouse-svc", chrono::Utc::now())),
        }
    }

    #[test]
    fn a_minimal_document_gets_the_defaults() {
        let c: RabbitMqConfig = serde_json::from_value(serde_json::json!({
            "urlEnv": "AMQP_URL",
            "exchange": "inventory"
        }))
        .unwrap();
        assert_eq!(c, config());
        assert_eq!(c.dead_letter_exchange(), "inventory.dlx");
        assert_eq!(c.dead_letter_queue(), "inventory.dlq");
        assert_eq!(c.mode, CloudEventsMode::Binary);
        assert_eq!(c.confirm_timeout_ms, 10_000);
        assert!(c.mandatory);
        assert_eq!(c.max_message_bytes, 16 * 1024 * 1024);
        c.validate().unwrap();
    }

    #[test]
    fn the_schema_documents_every_field() {
        let schema = serde_json::to_value(schemars::schema_for!(RabbitMqConfig)).unwrap();
        let properties = schema["properties"].as_object().unwrap();
        for (name, property) in properties {
            assert!(property.get("description").is_some(), "{name} has no description");
        }
        assert_eq!(schema["required"], serde_json::json!(["exchange"]));
    }

    #[test]
    fn validation_names_the_field() {
        assert_eq!(invalid(|c| c.exchange = " ".into()), "rabbitmq.exchange is empty");
        assert!(invalid(|c| c.exchange = "amq.topic".into()).starts_with("rabbitmq.exchange starts with \"amq.\""));
        assert!(invalid(|c| c.exchange = "x".repeat(256)).starts_with("rabbitmq.exchange is 256 bytes"));
        assert!(invalid(|c| c.exchange = "x".repeat(253)).starts_with("rabbitmq.deadLetterExchange is 257 bytes"));
        assert_eq!(
            invalid(|c| c.dead_letter_exchange = Some(String::new())),
            "rabbitmq.deadLetterExchange is empty"
        );
        assert_eq!(
            invalid(|c| c.dead_letter_exchange = Some("inventory".into())),
            "rabbitmq.deadLetterExchange must differ from rabbitmq.exchange"
        );
        assert_eq!(
            invalid(|c| c.dead_letter_queue = Some(String::new())),
            "rabbitmq.deadLetterQueue is empty"
        );
        assert_eq!(
            invalid(|c| c.confirm_timeout_ms = 0),
            "rabbitmq.confirmTimeoutMs must be greater than 0"
        );
        assert_eq!(
            invalid(|c| c.connect_timeout_ms = 0),
            "rabbitmq.connectTimeoutMs must be greater than 0"
        );
        assert_eq!(
            invalid(|c| c.max_message_bytes = 0),
            "rabbitmq.maxMessageBytes must be greater than 0"
        );
        assert!(
            invalid(|c| c.max_message_bytes = RABBITMQ_MESSAGE_SIZE_LIMIT + 1)
                .starts_with("rabbitmq.maxMessageBytes is")
        );
    }

    #[test]
    fn queue_bindings_are_checked_by_index() {
        let binding = |name: &str, key: &str| QueueBinding {
            name: name.into(),
            binding_key: key.into(),
        };
        assert_eq!(
            invalid(|c| c.queues = vec![binding("stock", "inventory.#"), binding("", "inventory.#")]),
            "rabbitmq.queues[1].name is empty"
        );
        assert_eq!(
            invalid(|c| c.queues = vec![binding("stock", "")]),
            "rabbitmq.queues[0].bindingKey is empty"
        );
        assert!(
            invalid(|c| c.queues = vec![binding("inventory.dlq", "#")])
                .starts_with("rabbitmq.queues[0].name is the dead-letter queue")
        );
        let mut c = config();
        c.queues = vec![binding("stock", "inventory.#"), binding("stock", "audit.#")];
        c.validate().unwrap();
    }

    #[test]
    fn credentials_stay_out_of_the_document() {
        assert!(invalid(|c| c.url_env = None).starts_with("rabbitmq.urlEnv is missing"));
        assert_eq!(invalid(|c| c.url_env = Some(String::new())), "rabbitmq.urlEnv is empty");
        assert_eq!(
            invalid(|c| c.url = Some("amqp://localhost/%2f".into())),
            "rabbitmq.url and rabbitmq.urlEnv are both set; use only one"
        );
        let with_url = |url: &str| {
            let mut c = config();
            c.url_env = None;
            c.url = Some(url.into());
            c
        };
        let err = with_url("amqp://outbox:s3cret@rabbit:5672/%2f").validate().unwrap_err();
        assert_eq!(err, RabbitMqConfigError::PasswordInUrl);
        assert!(err.to_string().contains("rabbitmq.urlEnv"));
        assert!(!err.to_string().contains("s3cret"));
        with_url("amqp://localhost:5672/%2f").validate().unwrap();
        with_url("amqp://guest@localhost:5672/%2f").validate().unwrap();
        assert!(
            with_url("http://[::1")
                .validate()
                .unwrap_err()
                .to_string()
                .starts_with("rabbitmq.url is not a valid AMQP URL")
        );
    }

    #[test]
    fn an_unset_url_variable_is_named_and_the_url_never_leaks() {
        let c = RabbitMqConfig::new("OUTBOX_TEST_UNSET_AMQP_URL", "inventory");
        assert_eq!(
            c.resolve_uri(|_| None).unwrap_err().to_string(),
            "environment variable OUTBOX_TEST_UNSET_AMQP_URL (rabbitmq.urlEnv) is not set"
        );
        let uri = c
            .resolve_uri(|name| (name == "OUTBOX_TEST_UNSET_AMQP_URL").then(|| "amqp://u:p@rabbit:5673/v".to_owned()))
            .unwrap();
        assert_eq!(uri.authority.userinfo.password, "p");
        assert_eq!(uri.authority.port, 5673);
        let err = c
            .resolve_uri(|_| Some("amqp://u:p@rabbit:notaport/v".to_owned()))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "environment variable OUTBOX_TEST_UNSET_AMQP_URL (rabbitmq.urlEnv) is not a valid AMQP URL"
            )
        );
        assert!(!err.contains("u:p"), "{err}");
    }

    #[test]
    fn tls_needs_amqps_and_credentials_from_files_replace_the_urls() {
        assert_eq!(
            invalid(|c| c.username_file = Some("/etc/amqp/username".into())),
            "rabbitmq.usernameFile and rabbitmq.passwordFile go together"
        );
        assert_eq!(
            invalid(|c| {
                c.url_env = None;
                c.url = Some("amqp://rabbit:5672/%2f".into());
                c.tls = Some(TlsFiles::default());
            }),
            "rabbitmq.tls is set but the URL is not amqps://"
        );
        assert_eq!(
            invalid(|c| {
                c.tls = Some(TlsFiles {
                    insecure_skip_verify: true,
                    ..TlsFiles::default()
                })
            }),
            "rabbitmq.tls.insecureSkipVerify is not supported for RabbitMQ"
        );
        let dir = std::env::temp_dir().join(format!("amqp-files-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("username"), "relay\n").unwrap();
        std::fs::write(dir.join("password"), "from-a-file\n").unwrap();
        let mut c = config();
        c.username_file = Some(dir.join("username"));
        c.password_file = Some(dir.join("password"));
        c.tls = Some(TlsFiles::default());
        let from_env = |_: &str| Some("amqps://u:p@rabbit:5671/v".to_owned());
        let uri = c.resolve_uri(from_env).unwrap();
        assert_eq!(uri.authority.userinfo.username, "relay");
        assert_eq!(uri.authority.userinfo.password, "from-a-file");
        let plain = |_: &str| Some("amqp://u:p@rabbit:5672/v".to_owned());
        assert_eq!(
            c.resolve_uri(plain).unwrap_err().to_string(),
            "rabbitmq.tls is set but the URL is not amqps://"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn binary_mode_puts_attributes_in_headers_and_content_type_in_the_properties() {
        let m = message("inventory.StockLevelChanged", serde_json::json!({"newQuantity": 3}));
        let e = encode(&config(), &m, &[], false).unwrap();
        assert_eq!(e.routing_key.as_str(), "inventory.StockLevelChanged");
        assert_eq!(e.body, br#"{"newQuantity":3}"#);
        let p = &e.properties;
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(p.content_type().as_ref().unwrap().as_str(), "application/json");
        assert_eq!(
            p.message_id().as_ref().unwrap().to_string(),
            m.event.event_id.to_string()
        );
        assert_eq!(p.kind().as_ref().unwrap().as_str(), "StockLevelChanged");
        let headers = p.headers().as_ref().unwrap();
        assert!(!headers.contains_key("content-type"));
        assert_eq!(
            headers.inner().get("cloudEvents:id"),
            Some(&long(m.event.event_id.to_string()))
        );
        assert_eq!(headers.inner().get("cloudEvents:specversion"), Some(&long("1.0")));
    }

    #[test]
    fn structured_mode_sends_one_document() {
        let mut c = config();
        c.mode = CloudEventsMode::Structured;
        let m = message("inventory.StockLevelChanged", serde_json::json!({"newQuantity": 3}));
        let e = encode(&c, &m, &[], false).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&e.body).unwrap();
        assert_eq!(cloudevents::from_structured(&doc).unwrap(), *m.event);
        assert_eq!(
            e.properties.content_type().as_ref().unwrap().as_str(),
            STRUCTURED_CONTENT_TYPE
        );
    }

    #[test]
    fn oversized_bodies_and_long_routing_keys_fail_permanently() {
        let mut c = config();
        c.max_message_bytes = 64;
        let big = message("inventory.x", serde_json::json!({"blob": "x".repeat(100)}));
        let err = encode(&c, &big, &[], false).err().unwrap();
        assert!(!err.is_retriable());
        assert!(err.message().contains("exceeds rabbitmq.maxMessageBytes (64)"), "{err}");
        // A dead letter keeps its headers but leaves the body out.
        let dead = encode(&c, &big, &[(DEAD_LETTER_REASON_HEADER, "too large".into())], true).unwrap();
        assert!(dead.body.is_empty());
        assert!(
            dead.properties
                .headers()
                .as_ref()
                .unwrap()
                .contains_key(BODY_OMITTED_HEADER)
        );
        let long_key = message(&"k".repeat(256), serde_json::json!({}));
        let err = encode(&config(), &long_key, &[], false).err().unwrap();
        assert_eq!(
            err,
            SendError::Message("routing key is 256 bytes; AMQP allows at most 255".into())
        );
    }

    #[test]
    fn passwords_are_recognised_in_urls() {
        assert!(url_has_password("amqp://u:p@h/v"));
        assert!(url_has_password("amqps://u:p%40x@h:5671"));
        assert!(!url_has_password("amqp://u@h/v"));
        assert!(!url_has_password("amqp://u:@h/v"));
        assert!(!url_has_password("amqp://h:5672/v"));
        assert!(!url_has_password("amqp://h/v?x=a:b@c"));
    }
}
