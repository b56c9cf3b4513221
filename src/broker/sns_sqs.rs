//! The SNS/SQS adapter: publishes to SNS topics (`PublishBatch`) or sends to SQS queues
//! (`SendMessageBatch`), standard or FIFO, with an SQS dead-letter queue.
//!
//! # Encoding
//!
//! Structured mode (the default here) puts the whole CloudEvent JSON document in the body.
//! Binary mode puts the JSON payload in the body and CloudEvents attributes in message
//! attributes. SNS and SQS allow at most 10 message attributes, so every message carries
//! exactly these (empty values are left out, as SNS/SQS refuse them):
//!
//! | attribute | value | mode |
//! | --- | --- | --- |
//! | `eventType`, `aggregateId`, `eventId` | envelope fields, for subscription filter policies | both |
//! | `ce_specversion`, `ce_id`, `ce_source`, `ce_type` | the required CloudEvents attributes | binary |
//! | `ce_time`, `ce_subject`, `ce_eventversion` | occurrence time, aggregate id, payload schema version | binary |
//!
//! The other CloudEvents attributes do not fit in binary mode: `datacontenttype` (always
//! `application/json`), `dataschema` (follows from `ce_type` and `ce_eventversion`),
//! `partitionkey` (equals `ce_subject`), `aggregatetype`, `correlationid`, `causationid`,
//! `userid` and `traceparent`. Consumers that need them use structured mode.
//!
//! # Destinations
//!
//! `Message::destination` is a topic or queue *name*. SNS and SQS names allow only letters,
//! digits, `-` and `_`, so every other character is mapped to `-` (the routing template
//! `inventory.{eventType}` becomes `inventory-StockLevelChanged`); with `fifo` the name gets the
//! `.fifo` suffix when missing. Names resolve to a topic ARN (`CreateTopic`, idempotent) or a
//! queue URL (`GetQueueUrl`, creating the queue when missing) once, and are cached.
//!
//! # Batching and ordering
//!
//! `send_batch` groups messages by destination (in order of first appearance, destinations in
//! parallel) and sends each group in consecutive calls of at most 10 entries and 256 KiB,
//! carrying **at most one entry per aggregate**, the aggregates with the most entries left
//! first (see `next_call`): a call is full whenever 10 aggregates have entries left and they
//! fit. One destination's calls go one after the other, so an aggregate's next entry is sent
//! only once the call carrying its previous one has answered.
//!
//! Per-aggregate order: SNS and SQS FIFO deliver a message group (= aggregate) in send order.
//! Once an entry of an aggregate fails (or is refused before sending), that aggregate's later
//! entries to the same destination are not sent and are reported retriable, and the relay
//! holds them behind the failure. Because no call carries two entries of one aggregate, a
//! per-entry failure can never leave a successor accepted in the same call; this is what lets
//! the adapter say [`Broker::keeps_aggregate_order`] and take a whole relay batch in one
//! `send_batch` instead of one wave per event of the hottest aggregate (which made most calls
//! short: a wave's tail, and the waves of the few hot aggregates).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::QueueAttributeName;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::encode::Encoded;
use super::{BoxFuture, Broker, CloudEventsMode, Message, SendError};
use crate::event::DomainEvent;
use crate::event::cloudevents;

/// Most entries SNS `PublishBatch` and SQS `SendMessageBatch` take in one call.
pub const MAX_BATCH_ENTRIES: usize = 10;
/// Largest message, and largest sum of the messages of one call: 256 KiB (body plus attributes).
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Most message attributes SNS and SQS accept per message.
pub const MAX_MESSAGE_ATTRIBUTES: usize = 10;

const FIFO_SUFFIX: &str = ".fifo";
const MAX_QUEUE_NAME: usize = 80;
const MAX_TOPIC_NAME: usize = 256;
/// Dead letters are kept as long as SQS allows (14 days).
const DEAD_LETTER_RETENTION_SECONDS: &str = "1209600";
/// The relay owns retries and the overall timeout; these only bound a hung connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest dead-letter reason kept in the `deadLetterReason` attribute.
const MAX_REASON_BYTES: usize = 4096;

/// CloudEvents attributes sent as message attributes in binary mode, in priority order.
const BINARY_ATTRIBUTES: [(&str, &str); 7] = [
    ("specversion", "ce_specversion"),
    ("id", "ce_id"),
    ("source", "ce_source"),
    ("type", "ce_type"),
    ("time", "ce_time"),
    ("subject", "ce_subject"),
    ("eventversion", "ce_eventversion"),
];

/// Where the adapter publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SnsSqsTarget {
    /// Publish to SNS topics; the destination is the topic name (created when missing).
    Sns,
    /// Send to SQS queues; the destination is the queue name (created when missing).
    Sqs,
}

/// Connection and delivery settings for SNS or SQS.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnsSqsConfig {
    /// AWS region of the topics and queues, e.g. `eu-west-1`.
    pub region: String,
    /// Endpoint override for SNS and SQS (e.g. `http://localstack:4566` for localstack or moto);
    /// when absent the regular AWS endpoints (or `AWS_ENDPOINT_URL`) are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// PEM file with CA certificates trusted for HTTPS besides the system roots, for an
    /// `endpointUrl` whose certificate a private CA signed (a mounted Secret or ConfigMap).
    /// The AWS SDK for Rust does not read `AWS_CA_BUNDLE`; this takes its place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// `sns`: the destination is an SNS topic name; `sqs`: the destination is an SQS queue name.
    /// Characters other than letters, digits, `-` and `_` in destinations become `-`.
    pub target: SnsSqsTarget,
    /// Use FIFO topics or queues: names get the `.fifo` suffix when missing, the message group
    /// is the aggregate id (per-aggregate order) and the deduplication id is the event id.
    #[serde(default)]
    pub fifo: bool,
    /// CloudEvents mode: `structured` (default; the body is the CloudEvent JSON document) or
    /// `binary` (the body is the payload JSON; the main CloudEvents attributes become message
    /// attributes, as many as fit in the limit of 10).
    #[serde(default = "default_mode")]
    pub mode: CloudEventsMode,
    /// Name of the SQS queue receiving dead letters (always SQS, also with target `sns`); it is
    /// the redrive target of the queues the adapter manages. Must end in `.fifo` exactly when
    /// `fifo` is true. Without it, dead-lettered events are only recorded in the event store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_queue: Option<String>,
    /// Receives of a message before SQS moves it to the dead-letter queue (the redrive policy
    /// of the queues the adapter manages with target `sqs`), 1 to 1000. Default 5.
    #[serde(default = "default_max_receive_count")]
    pub max_receive_count: u32,
    /// Name of the environment variable holding a static access key id. Set together with
    /// `secretAccessKeyEnv`; when both are absent the default AWS credential chain is used
    /// (IRSA / pod identity, environment, profile). Secrets never appear in this document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id_env: Option<String>,
    /// Name of the environment variable holding the static secret access key; see
    /// `accessKeyIdEnv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_env: Option<String>,
}

fn default_mode() -> CloudEventsMode {
    CloudEventsMode::Structured
}

fn default_max_receive_count() -> u32 {
    5
}

/// A configuration the adapter cannot work with; the message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnsSqsConfigError {
    #[error("snsSqs.{field} {problem}")]
    Invalid { field: &'static str, problem: String },
    #[error("snsSqs.{field} names environment variable {variable:?}, which is not set")]
    MissingEnv { field: &'static str, variable: String },
}

fn invalid(field: &'static str, problem: impl Into<String>) -> SnsSqsConfigError {
    SnsSqsConfigError::Invalid {
        field,
        problem: problem.into(),
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

impl SnsSqsConfig {
    /// A configuration with the defaults: standard destinations, structured mode, no
    /// dead-letter queue, the default credential chain.
    pub fn new(region: impl Into<String>, target: SnsSqsTarget) -> Self {
        Self {
            region: region.into(),
            endpoint_url: None,
            ca_file: None,
            target,
            fifo: false,
            mode: default_mode(),
            dead_letter_queue: None,
            max_receive_count: default_max_receive_count(),
            access_key_id_env: None,
            secret_access_key_env: None,
        }
    }

    /// Checks the configuration without contacting AWS.
    pub fn validate(&self) -> Result<(), SnsSqsConfigError> {
        if self.region.trim().is_empty() {
            return Err(invalid("region", "is empty"));
        }
        if let Some(url) = &self.endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "endpointUrl",
                format!("{url:?} is not an http:// or https:// URL"),
            ));
        }
        if self.ca_file.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(invalid("caFile", "is an empty path"));
        }
        if let Some(dlq) = &self.dead_letter_queue {
            let stem = dlq.strip_suffix(FIFO_SUFFIX).unwrap_or(dlq);
            if dlq.is_empty() {
                return Err(invalid("deadLetterQueue", "is empty"));
            }
            if stem.is_empty() || !stem.chars().all(is_name_char) || dlq.len() > MAX_QUEUE_NAME {
                return Err(invalid(
                    "deadLetterQueue",
                    format!(
                        "{dlq:?} is not a valid SQS queue name (letters, digits, '-' and '_', at most {MAX_QUEUE_NAME} characters including .fifo)"
                    ),
                ));
            }
            match (self.fifo, dlq.ends_with(FIFO_SUFFIX)) {
                (true, false) => return Err(invalid("deadLetterQueue", "must end in .fifo when fifo is true")),
                (false, true) => return Err(invalid("deadLetterQueue", "must not end in .fifo when fifo is false")),
                _ => {}
            }
        }
        if !(1..=1000).contains(&self.max_receive_count) {
            return Err(invalid("maxReceiveCount", "must be between 1 and 1000"));
        }
        for (field, value) in [
            ("accessKeyIdEnv", &self.access_key_id_env),
            ("secretAccessKeyEnv", &self.secret_access_key_env),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(invalid(field, "is empty"));
            }
        }
        if self.access_key_id_env.is_some() != self.secret_access_key_env.is_some() {
            return Err(invalid(
                "accessKeyIdEnv",
                "and snsSqs.secretAccessKeyEnv must be set together",
            ));
        }
        Ok(())
    }

    /// The topic or queue name a destination maps to: characters SNS/SQS refuse become `-`,
    /// and with `fifo` the `.fifo` suffix is added when missing.
    pub fn physical_name(&self, destination: &str) -> Result<String, SendError> {
        let stem = if self.fifo {
            destination.strip_suffix(FIFO_SUFFIX).unwrap_or(destination)
        } else {
            destination
        };
        if stem.is_empty() {
            return Err(SendError::Message(format!(
                "destination {destination:?} is not a usable topic or queue name"
            )));
        }
        let mut name: String = stem.chars().map(|c| if is_name_char(c) { c } else { '-' }).collect();
        if self.fifo {
            name.push_str(FIFO_SUFFIX);
        }
        let limit = match self.target {
            SnsSqsTarget::Sns => MAX_TOPIC_NAME,
            SnsSqsTarget::Sqs => MAX_QUEUE_NAME,
        };
        if name.len() > limit {
            return Err(SendError::Message(format!(
                "destination {destination:?} is longer than the {limit} characters of an {} name",
                match self.target {
                    SnsSqsTarget::Sns => "SNS topic",
                    SnsSqsTarget::Sqs => "SQS queue",
                }
            )));
        }
        Ok(name)
    }

    fn kind(&self) -> &'static str {
        match self.target {
            SnsSqsTarget::Sns => "sns",
            SnsSqsTarget::Sqs => "sqs",
        }
    }
}

/// The lanes (one per aggregate, each given as its entries left and the size of its next
/// entry) whose next entry goes in the next call: at most [`MAX_BATCH_ENTRIES`] entries and
/// [`MAX_BATCH_BYTES`] bytes, one per lane, the lanes with the most entries left first (ties in
/// lane order). An aggregate with k entries left needs k more calls, so serving the longest
/// lanes first keeps every call full for as long as 10 lanes have entries (highest-level-first
/// scheduling of chains, which needs the fewest calls); taking entries in batch order instead
/// left a hot aggregate's run for the end, one entry per call. The longest lane always goes,
/// even with an entry larger than the limit (the caller refuses those before planning).
fn next_call(lanes: &[(usize, usize)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lanes.len()).filter(|&l| lanes[l].0 > 0).collect();
    order.sort_by_key(|&l| std::cmp::Reverse(lanes[l].0));
    let mut picked = Vec::with_capacity(MAX_BATCH_ENTRIES);
    let mut total = 0;
    for lane in order {
        if picked.len() == MAX_BATCH_ENTRIES {
            break;
        }
        let size = lanes[lane].1;
        if !picked.is_empty() && total + size > MAX_BATCH_BYTES {
            continue;
        }
        total += size;
        picked.push(lane);
    }
    picked.sort_unstable();
    picked
}

/// One destination's entries still to send, one lane per aggregate (lanes in order of first
/// appearance, each lane in batch order), cut into calls by [`next_call`].
struct Lanes<T> {
    lanes: Vec<VecDeque<T>>,
}

/// The next call taken from [`Lanes`].
struct Call<T> {
    /// The lanes the entries came from, ascending, one entry each.
    lanes: Vec<usize>,
    entries: Vec<T>,
    /// Entries, and lanes with entries, left before this call was taken (its own included).
    pending: usize,
    pending_lanes: usize,
}

impl<T> Lanes<T> {
    fn new<'a>(items: impl IntoIterator<Item = (&'a str, T)>) -> Self {
        let mut lanes: Vec<VecDeque<T>> = Vec::new();
        let mut lane_of: HashMap<&str, usize> = HashMap::new();
        for (aggregate, item) in items {
            let lane = *lane_of.entry(aggregate).or_insert_with(|| {
                lanes.push(VecDeque::new());
                lanes.len() - 1
            });
            lanes[lane].push_back(item);
        }
        Self { lanes }
    }

    /// Takes the next call, `size` giving an entry's bytes; `None` once every lane is empty.
    fn next_call(&mut self, size: impl Fn(&T) -> usize) -> Option<Call<T>> {
        let shape: Vec<(usize, usize)> = self
            .lanes
            .iter()
            .map(|lane| (lane.len(), lane.front().map_or(0, &size)))
            .collect();
        let lanes = next_call(&shape);
        if lanes.is_empty() {
            return None;
        }
        let entries = lanes.iter().filter_map(|&l| self.lanes[l].pop_front()).collect();
        Some(Call {
            lanes,
            entries,
            pending: shape.iter().map(|(n, _)| n).sum(),
            pending_lanes: shape.iter().filter(|(n, _)| *n > 0).count(),
        })
    }

    /// Empties `lane`, returning what it held.
    fn drain(&mut self, lane: usize) -> impl Iterator<Item = T> + '_ {
        self.lanes[lane].drain(..)
    }

    /// Empties every lane, returning what they held.
    fn drain_all(&mut self) -> impl Iterator<Item = T> + '_ {
        self.lanes.iter_mut().flat_map(|lane| lane.drain(..))
    }
}

/// Counters of the batch calls made (`PublishBatch` / `SendMessageBatch`), for metrics and
/// tests. Calls are counted when attempted, whatever their outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendStats {
    /// Batch calls attempted.
    pub calls: u64,
    /// Entries carried by those calls.
    pub entries: u64,
    /// Calls that carried the maximum of 10 entries.
    pub full_calls: u64,
    /// Calls that carried fewer than 10 entries while 10 or more of their destination were
    /// pending: fewer than 10 aggregates among them (one entry per aggregate per call), or the
    /// 256 KiB limit.
    pub short_with_ten_pending: u64,
    /// Of those, the calls made while 10 or more aggregates had entries pending: only the
    /// 256 KiB limit can cut those short.
    pub short_with_ten_aggregates_pending: u64,
}

#[derive(Default)]
struct Stats {
    calls: AtomicU64,
    entries: AtomicU64,
    full_calls: AtomicU64,
    short_with_ten_pending: AtomicU64,
    short_with_ten_aggregates_pending: AtomicU64,
}

impl Stats {
    /// One call of `entries` made while `pending` entries of `aggregates` aggregates (these
    /// included) were left to send.
    fn record(&self, entries: usize, pending: usize, aggregates: usize) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.entries.fetch_add(entries as u64, Ordering::Relaxed);
        if entries == MAX_BATCH_ENTRIES {
            self.full_calls.fetch_add(1, Ordering::Relaxed);
        } else if pending >= MAX_BATCH_ENTRIES {
            self.short_with_ten_pending.fetch_add(1, Ordering::Relaxed);
            if aggregates >= MAX_BATCH_ENTRIES {
                self.short_with_ten_aggregates_pending.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn snapshot(&self) -> SendStats {
        SendStats {
            calls: self.calls.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed),
            full_calls: self.full_calls.load(Ordering::Relaxed),
            short_with_ten_pending: self.short_with_ten_pending.load(Ordering::Relaxed),
            short_with_ten_aggregates_pending: self.short_with_ten_aggregates_pending.load(Ordering::Relaxed),
        }
    }
}

/// The SQS dead-letter queue, resolved once.
#[derive(Clone, Debug)]
struct DeadLetterQueue {
    name: String,
    url: String,
    arn: String,
}

/// A batch entry ready to send.
enum Entry {
    Sns(aws_sdk_sns::types::PublishBatchRequestEntry),
    Sqs(aws_sdk_sqs::types::SendMessageBatchRequestEntry),
}

struct Pending<'m> {
    index: usize,
    message: &'m Message,
    size: usize,
    entry: Entry,
}

/// A failed batch entry, as SNS and SQS report it.
struct EntryFailure {
    sender_fault: bool,
    code: String,
    message: Option<String>,
}

/// Maps the per-entry results of one batch call back to its entries (`(index, event id)`, the
/// entry id being the index), in call order: a failure with `sender_fault` is permanent (too
/// large, invalid), any other failure and a missing result are retriable.
fn entry_outcomes(
    target: &str,
    call: &[(usize, uuid::Uuid)],
    successes: &HashSet<String>,
    mut failures: HashMap<String, EntryFailure>,
) -> Vec<Result<(), SendError>> {
    call.iter()
        .map(|(index, event_id)| {
            let id = index.to_string();
            if let Some(failure) = failures.remove(&id) {
                let text = format!(
                    "{target} refused event {event_id}: {}: {}",
                    failure.code,
                    failure.message.unwrap_or_default()
                );
                Err(if failure.sender_fault {
                    SendError::Message(text)
                } else {
                    SendError::Transient(text)
                })
            } else if successes.contains(&id) {
                Ok(())
            } else {
                Err(SendError::Transient(format!(
                    "{target} returned no result for event {event_id}"
                )))
            }
        })
        .collect()
}

/// Publishes to SNS topics or SQS queues. Cheap to share (`Arc<dyn Broker>`).
pub struct SnsSqsBroker {
    config: SnsSqsConfig,
    sns: aws_sdk_sns::Client,
    sqs: aws_sdk_sqs::Client,
    /// Destination (as routed) → topic ARN or queue URL.
    resolved: Mutex<HashMap<String, String>>,
    dead_letter: tokio::sync::OnceCell<DeadLetterQueue>,
    stats: Stats,
}

/// Classifies a failed SNS/SQS call: a missing topic or queue and an authorization failure are
/// the destination's fault (circuit and retry, never dead-letter); everything else is transient.
fn retriable(context: &str, error: impl std::error::Error + aws_sdk_sqs::error::ProvideErrorMetadata) -> SendError {
    let destination_level = matches!(
        error.code(),
        Some(
            "NotFound"
                | "NotFoundException"
                | "AWS.SimpleQueueService.NonExistentQueue"
                | "QueueDoesNotExist"
                | "AuthorizationError"
                | "AccessDenied"
                | "AccessDeniedException"
                | "InvalidClientTokenId"
        )
    );
    let text = format!("{context}: {}", DisplayErrorContext(error));
    if destination_level {
        SendError::Destination(text)
    } else {
        SendError::Transient(text)
    }
}

/// The message attributes of one event: the three a subscription filter policy needs, then (in
/// binary mode, where `encoded` carries the context attributes) as many CloudEvents attributes
/// as the limit of ten leaves room for.
fn message_attributes(event: &DomainEvent, encoded: &Encoded) -> Vec<(&'static str, String)> {
    let mut attributes = vec![
        ("eventType", event.event_type.clone()),
        ("aggregateId", event.aggregate_id.clone()),
        ("eventId", event.event_id.to_string()),
    ];
    for (ce_name, attribute) in BINARY_ATTRIBUTES {
        if let Some(value) = encoded.attribute(ce_name) {
            attributes.push((attribute, value.to_owned()));
        }
    }
    attributes.retain(|(_, value)| !value.is_empty());
    attributes.truncate(MAX_MESSAGE_ATTRIBUTES);
    attributes
}

/// Bytes SNS/SQS count for a message: the body plus attribute names, types and values.
fn message_size(body: &str, attributes: &[(&str, String)]) -> usize {
    body.len()
        + attributes
            .iter()
            .map(|(name, value)| name.len() + "String".len() + value.len())
            .sum::<usize>()
}

fn truncate_to(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn sqs_attribute(value: &str) -> Result<aws_sdk_sqs::types::MessageAttributeValue, aws_sdk_sqs::error::BuildError> {
    aws_sdk_sqs::types::MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
}

fn sns_attribute(value: &str) -> Result<aws_sdk_sns::types::MessageAttributeValue, aws_sdk_sns::error::BuildError> {
    aws_sdk_sns::types::MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
}

fn is_missing_queue<R>(
    error: &aws_sdk_sqs::error::SdkError<aws_sdk_sqs::operation::get_queue_url::GetQueueUrlError, R>,
) -> bool {
    error.as_service_error().is_some_and(|e| {
        e.is_queue_does_not_exist()
            || aws_sdk_sqs::error::ProvideErrorMetadata::code(e).is_some_and(|c| c.contains("NonExistentQueue"))
    })
}

/// The SDK's HTTPS client trusting the CA certificates in `ca_file` besides the system roots
/// (the credential providers use it too, so STS and the metadata endpoints keep working).
fn https_client_trusting(
    ca_file: &std::path::Path,
) -> Result<aws_sdk_sqs::config::SharedHttpClient, SnsSqsConfigError> {
    use aws_smithy_http_client::tls;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(ca_file).map_err(|e| invalid("caFile", format!("{}: {e}", ca_file.display())))?;
    // The SDK only parses the file at the first connection: check it now, so a wrong file is a
    // configuration error rather than a refused handshake.
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("caFile", format!("{}: not PEM certificates: {e}", ca_file.display())))?;
    if certificates.is_empty() {
        return Err(invalid(
            "caFile",
            format!("{} holds no PEM certificate", ca_file.display()),
        ));
    }
    let context = tls::TlsContext::builder()
        .with_trust_store(tls::TrustStore::default().with_pem_certificate(pem))
        .build()
        .map_err(|e| invalid("caFile", e.to_string()))?;
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::AwsLc))
        .tls_context(context)
        .build_https())
}

impl super::AdapterConfig for SnsSqsConfig {
    type Adapter = SnsSqsBroker;
    type Error = SnsSqsConfigError;

    fn build(&self) -> super::BoxFuture<'_, Result<SnsSqsBroker, SnsSqsConfigError>> {
        Box::pin(SnsSqsBroker::connect(self.clone()))
    }
}

impl SnsSqsBroker {
    /// Builds the SDK clients (no network round trip; use `check_health` for that). SDK retries
    /// are disabled because the relay retries; connections time out after 3 s and calls
    /// after 10 s.
    pub async fn connect(config: SnsSqsConfig) -> Result<Self, SnsSqsConfigError> {
        config.validate()?;
        crate::tls::install_crypto_provider();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(config.region.clone()))
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            );
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        if let Some(ca_file) = &config.ca_file {
            loader = loader.http_client(https_client_trusting(ca_file)?);
        }
        if let (Some(key_var), Some(secret_var)) = (&config.access_key_id_env, &config.secret_access_key_env) {
            let read = |field: &'static str, variable: &String| {
                std::env::var(variable).map_err(|_| SnsSqsConfigError::MissingEnv {
                    field,
                    variable: variable.clone(),
                })
            };
            let key = read("accessKeyIdEnv", key_var)?;
            let secret = read("secretAccessKeyEnv", secret_var)?;
            loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
                key,
                secret,
                None,
                None,
                "inventory-outbox-env",
            ));
        }
        let sdk = loader.load().await;
        Ok(Self {
            sns: aws_sdk_sns::Client::new(&sdk),
            sqs: aws_sdk_sqs::Client::new(&sdk),
            config,
            resolved: Mutex::new(HashMap::new()),
            dead_letter: tokio::sync::OnceCell::new(),
            stats: Stats::default(),
        })
    }

    /// The configuration the broker runs with.
    pub fn config(&self) -> &SnsSqsConfig {
        &self.config
    }

    /// Batch calls made so far.
    pub fn stats(&self) -> SendStats {
        self.stats.snapshot()
    }

    fn cached(&self, destination: &str) -> Option<String> {
        self.resolved
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(destination)
            .cloned()
    }

    fn remember(&self, destination: &str, target: &str) {
        self.resolved
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(destination.to_owned(), target.to_owned());
    }

    fn forget(&self, destination: &str) {
        self.resolved
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(destination);
    }

    /// The topic ARN or queue URL of a destination, creating the topic or queue when missing.
    async fn resolve(&self, destination: &str) -> Result<String, SendError> {
        if let Some(target) = self.cached(destination) {
            return Ok(target);
        }
        let name = self.config.physical_name(destination)?;
        let target = match self.config.target {
            SnsSqsTarget::Sns => self.create_topic(&name).await?,
            SnsSqsTarget::Sqs => self.ensure_queue(&name, false).await?,
        };
        self.remember(destination, &target);
        Ok(target)
    }

    /// Creates the topic (idempotent) and returns its ARN.
    async fn create_topic(&self, name: &str) -> Result<String, SendError> {
        let mut request = self.sns.create_topic().name(name);
        if self.config.fifo {
            request = request
                .attributes("FifoTopic", "true")
                .attributes("ContentBasedDeduplication", "false");
        }
        let out = request
            .send()
            .await
            .map_err(|e| retriable(&format!("creating SNS topic {name}"), e))?;
        out.topic_arn
            .ok_or_else(|| SendError::Transient(format!("creating SNS topic {name}: no topic ARN in the response")))
    }

    /// The URL of a queue, creating it when missing (FIFO attributes, redrive policy to the
    /// dead-letter queue). With `update_existing`, an existing queue gets the redrive policy.
    async fn ensure_queue(&self, name: &str, update_existing: bool) -> Result<String, SendError> {
        let wants_redrive = self.config.dead_letter_queue.as_deref().is_some_and(|dlq| dlq != name);
        match self.sqs.get_queue_url().queue_name(name).send().await {
            Ok(out) => {
                let url = out.queue_url.ok_or_else(|| {
                    SendError::Transient(format!("looking up SQS queue {name}: no queue URL in the response"))
                })?;
                if update_existing && wants_redrive {
                    let policy = self.redrive_policy().await?;
                    self.sqs
                        .set_queue_attributes()
                        .queue_url(&url)
                        .attributes(QueueAttributeName::RedrivePolicy, policy)
                        .send()
                        .await
                        .map_err(|e| retriable(&format!("setting the redrive policy of SQS queue {name}"), e))?;
                }
                Ok(url)
            }
            Err(e) if is_missing_queue(&e) => {
                let mut attributes = self.queue_attributes();
                if wants_redrive {
                    attributes.insert(QueueAttributeName::RedrivePolicy, self.redrive_policy().await?);
                }
                self.create_queue(name, attributes).await
            }
            Err(e) => Err(retriable(&format!("looking up SQS queue {name}"), e)),
        }
    }

    fn queue_attributes(&self) -> HashMap<QueueAttributeName, String> {
        let mut attributes = HashMap::new();
        if self.config.fifo {
            attributes.insert(QueueAttributeName::FifoQueue, "true".to_owned());
            attributes.insert(QueueAttributeName::ContentBasedDeduplication, "false".to_owned());
        }
        attributes
    }

    async fn create_queue(
        &self,
        name: &str,
        attributes: HashMap<QueueAttributeName, String>,
    ) -> Result<String, SendError> {
        let out = self
            .sqs
            .create_queue()
            .queue_name(name)
            .set_attributes(Some(attributes))
            .send()
            .await
            .map_err(|e| retriable(&format!("creating SQS queue {name}"), e))?;
        out.queue_url
            .ok_or_else(|| SendError::Transient(format!("creating SQS queue {name}: no queue URL in the response")))
    }

    async fn redrive_policy(&self) -> Result<String, SendError> {
        let dlq = self.dead_letter_queue().await?;
        Ok(serde_json::json!({
            "deadLetterTargetArn": dlq.arn,
            "maxReceiveCount": self.config.max_receive_count,
        })
        .to_string())
    }

    /// The dead-letter queue, created when missing; resolved once.
    async fn dead_letter_queue(&self) -> Result<&DeadLetterQueue, SendError> {
        let Some(name) = self.config.dead_letter_queue.as_deref() else {
            return Err(SendError::Message(
                "snsSqs.deadLetterQueue is not configured; the event stays recorded as dead-lettered in the store"
                    .to_owned(),
            ));
        };
        self.dead_letter
            .get_or_try_init(|| async move {
                let url = match self.sqs.get_queue_url().queue_name(name).send().await {
                    Ok(out) => out.queue_url.ok_or_else(|| {
                        SendError::Transient(format!("looking up SQS queue {name}: no queue URL in the response"))
                    })?,
                    Err(e) if is_missing_queue(&e) => {
                        let mut attributes = self.queue_attributes();
                        attributes.insert(
                            QueueAttributeName::MessageRetentionPeriod,
                            DEAD_LETTER_RETENTION_SECONDS.to_owned(),
                        );
                        self.create_queue(name, attributes).await?
                    }
                    Err(e) => return Err(retriable(&format!("looking up SQS queue {name}"), e)),
                };
                let arn = self
                    .sqs
                    .get_queue_attributes()
                    .queue_url(&url)
                    .attribute_names(QueueAttributeName::QueueArn)
                    .send()
                    .await
                    .map_err(|e| retriable(&format!("reading the ARN of SQS queue {name}"), e))?
                    .attributes
                    .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
                    .ok_or_else(|| SendError::Transient(format!("SQS queue {name} reports no QueueArn")))?;
                Ok(DeadLetterQueue {
                    name: name.to_owned(),
                    url,
                    arn,
                })
            })
            .await
    }

    /// Encodes one message as a batch entry with id `index`; refuses messages over 256 KiB.
    fn encode(&self, index: usize, message: &Message) -> Result<(usize, Entry), SendError> {
        let event = &*message.event;
        let encoded = Encoded::new(event, self.config.mode)?;
        let attributes = message_attributes(event, &encoded);
        let body = encoded.body;
        let size = message_size(&body, &attributes);
        if size > MAX_BATCH_BYTES {
            return Err(SendError::Message(format!(
                "event {} is {size} bytes, over the {MAX_BATCH_BYTES}-byte {} message limit",
                event.event_id,
                self.kind()
            )));
        }
        let id = index.to_string();
        let (group, dedup) = if self.config.fifo {
            (Some(event.aggregate_id.clone()), Some(event.event_id.to_string()))
        } else {
            (None, None)
        };
        let build_error = |e: &dyn std::fmt::Display| {
            SendError::Message(format!("event {} cannot be put in a batch entry: {e}", event.event_id))
        };
        let entry = match self.config.target {
            SnsSqsTarget::Sns => {
                let mut builder = aws_sdk_sns::types::PublishBatchRequestEntry::builder()
                    .id(id)
                    .message(body)
                    .set_message_group_id(group)
                    .set_message_deduplication_id(dedup);
                for (name, value) in &attributes {
                    builder = builder.message_attributes(*name, sns_attribute(value).map_err(|e| build_error(&e))?);
                }
                Entry::Sns(builder.build().map_err(|e| build_error(&e))?)
            }
            SnsSqsTarget::Sqs => {
                let mut builder = aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                    .id(id)
                    .message_body(body)
                    .set_message_group_id(group)
                    .set_message_deduplication_id(dedup);
                for (name, value) in &attributes {
                    builder = builder.message_attributes(*name, sqs_attribute(value).map_err(|e| build_error(&e))?);
                }
                Entry::Sqs(builder.build().map_err(|e| build_error(&e))?)
            }
        };
        Ok((size, entry))
    }

    /// Sends the messages of one destination (indices into `messages`, in order).
    async fn send_destination(
        &self,
        destination: &str,
        messages: &[Message],
        indices: &[usize],
    ) -> Vec<(usize, Result<(), SendError>)> {
        let mut results = Vec::with_capacity(indices.len());
        let target = match self.resolve(destination).await {
            Ok(target) => target,
            Err(e) => {
                warn!(destination, error = %e, "cannot resolve the destination");
                return indices.iter().map(|&i| (i, Err(e.clone()))).collect();
            }
        };
        // Aggregates with a failed entry: their later entries are held back.
        let mut failed: HashSet<&str> = HashSet::new();
        let held = |aggregate: &str| {
            SendError::Transient(format!(
                "not sent: an earlier event of aggregate {aggregate} to {destination} failed in this batch"
            ))
        };
        let mut encoded: Vec<(&str, Pending<'_>)> = Vec::with_capacity(indices.len());
        for &index in indices {
            let message = &messages[index];
            let aggregate = message.event.aggregate_id.as_str();
            if failed.contains(aggregate) {
                results.push((index, Err(held(aggregate))));
                continue;
            }
            match self.encode(index, message) {
                Ok((size, entry)) => encoded.push((
                    aggregate,
                    Pending {
                        index,
                        message,
                        size,
                        entry,
                    },
                )),
                Err(e) => {
                    failed.insert(aggregate);
                    results.push((index, Err(e)));
                }
            }
        }
        let mut lanes = Lanes::new(encoded);
        while let Some(call) = lanes.next_call(|p| p.size) {
            self.stats.record(call.entries.len(), call.pending, call.pending_lanes);
            match self.send_call(&target, &call.entries).await {
                Ok(outcomes) => {
                    for ((sent, outcome), &lane) in call.entries.iter().zip(outcomes).zip(&call.lanes) {
                        if outcome.is_err() {
                            // The aggregate's later entries wait behind the failed one.
                            let aggregate = sent.message.event.aggregate_id.as_str();
                            results.extend(lanes.drain(lane).map(|p| (p.index, Err(held(aggregate)))));
                        }
                        results.push((sent.index, outcome));
                    }
                }
                Err(e) => {
                    warn!(destination, entries = call.entries.len(), error = %e, "batch call failed");
                    // The topic or queue may be gone: resolve it again next time.
                    self.forget(destination);
                    results.extend(call.entries.iter().map(|p| (p.index, Err(e.clone()))));
                    let skipped =
                        SendError::Transient(format!("not sent: an earlier call to {destination} failed: {e}"));
                    results.extend(lanes.drain_all().map(|p| (p.index, Err(skipped.clone()))));
                }
            }
        }
        results
    }

    /// One `PublishBatch` / `SendMessageBatch`: per-entry outcomes in call order, or the error
    /// of the whole call (always retriable).
    async fn send_call(&self, target: &str, call: &[Pending<'_>]) -> Result<Vec<Result<(), SendError>>, SendError> {
        debug!(target, entries = call.len(), "sending batch");
        // Entry id → failure, and the ids of accepted entries.
        let mut failures: HashMap<String, EntryFailure> = HashMap::new();
        let mut successes: HashSet<String> = HashSet::new();
        match self.config.target {
            SnsSqsTarget::Sns => {
                let entries = call
                    .iter()
                    .filter_map(|p| match &p.entry {
                        Entry::Sns(entry) => Some(entry.clone()),
                        Entry::Sqs(_) => None,
                    })
                    .collect();
                let out = self
                    .sns
                    .publish_batch()
                    .topic_arn(target)
                    .set_publish_batch_request_entries(Some(entries))
                    .send()
                    .await
                    .map_err(|e| retriable(&format!("PublishBatch to {target}"), e))?;
                successes.extend(out.successful.unwrap_or_default().into_iter().filter_map(|s| s.id));
                failures.extend(out.failed.unwrap_or_default().into_iter().map(|f| {
                    (
                        f.id,
                        EntryFailure {
                            sender_fault: f.sender_fault,
                            code: f.code,
                            message: f.message,
                        },
                    )
                }));
            }
            SnsSqsTarget::Sqs => {
                let entries = call
                    .iter()
                    .filter_map(|p| match &p.entry {
                        Entry::Sqs(entry) => Some(entry.clone()),
                        Entry::Sns(_) => None,
                    })
                    .collect();
                let out = self
                    .sqs
                    .send_message_batch()
                    .queue_url(target)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(|e| retriable(&format!("SendMessageBatch to {target}"), e))?;
                successes.extend(out.successful.into_iter().map(|s| s.id));
                failures.extend(out.failed.into_iter().map(|f| {
                    (
                        f.id,
                        EntryFailure {
                            sender_fault: f.sender_fault,
                            code: f.code,
                            message: f.message,
                        },
                    )
                }));
            }
        }
        let ids: Vec<(usize, uuid::Uuid)> = call.iter().map(|p| (p.index, p.message.event.event_id)).collect();
        Ok(entry_outcomes(target, &ids, &successes, failures))
    }

    async fn dead_letter(&self, message: &Message, reason: &str) -> Result<(), SendError> {
        let dlq = self.dead_letter_queue().await?;
        let event = &*message.event;
        // Dead letters are always structured, so the whole envelope can be inspected and replayed.
        let encoded = Encoded::new(event, CloudEventsMode::Structured)?;
        let mut attributes = message_attributes(event, &encoded);
        let reason = truncate_to(reason, MAX_REASON_BYTES);
        attributes.push((
            "deadLetterReason",
            if reason.is_empty() { "unspecified" } else { reason }.to_owned(),
        ));
        attributes.push(("originalDestination", message.destination.clone()));
        attributes.retain(|(_, value)| !value.is_empty());
        let mut body = encoded.body;
        if message_size(&body, &attributes) > MAX_BATCH_BYTES {
            // Too large for SQS: keep the envelope, drop the payload, and say so.
            let mut doc = cloudevents::to_structured(event);
            doc["data"] = serde_json::Value::Null;
            body = doc.to_string();
            attributes.push((
                "payloadOmitted",
                format!("the payload made the message exceed {MAX_BATCH_BYTES} bytes"),
            ));
        }
        let mut request = self.sqs.send_message().queue_url(&dlq.url).message_body(body);
        for (name, value) in &attributes {
            let value = sqs_attribute(value)
                .map_err(|e| SendError::Message(format!("dead letter of event {}: {e}", event.event_id)))?;
            request = request.message_attributes(*name, value);
        }
        if self.config.fifo {
            request = request
                .message_group_id(&event.aggregate_id)
                .message_deduplication_id(event.event_id.to_string());
        }
        request.send().await.map_err(|e| {
            retriable(
                &format!("sending event {} to dead-letter queue {}", event.event_id, dlq.name),
                e,
            )
        })?;
        Ok(())
    }

    async fn ensure(&self, destinations: &[String]) -> Result<(), SendError> {
        if self.config.dead_letter_queue.is_some() {
            self.dead_letter_queue().await?;
        }
        let mut seen = HashSet::new();
        for destination in destinations.iter().filter(|d| seen.insert(d.as_str())) {
            let name = self.config.physical_name(destination)?;
            let target = match self.config.target {
                SnsSqsTarget::Sns => self.create_topic(&name).await?,
                SnsSqsTarget::Sqs => self.ensure_queue(&name, true).await?,
            };
            self.remember(destination, &target);
        }
        Ok(())
    }

    async fn health(&self) -> Result<(), SendError> {
        // Named in the error, so a refused certificate or a dead endpoint says where.
        let at = self.config.endpoint_url.as_deref().unwrap_or("the AWS endpoint");
        match self.config.target {
            SnsSqsTarget::Sns => self
                .sns
                .list_topics()
                .send()
                .await
                .map(drop)
                .map_err(|e| retriable(&format!("SNS ListTopics at {at}"), e)),
            SnsSqsTarget::Sqs => self
                .sqs
                .list_queues()
                .max_results(1)
                .send()
                .await
                .map(drop)
                .map_err(|e| retriable(&format!("SQS ListQueues at {at}"), e)),
        }
    }
}

impl Broker for SnsSqsBroker {
    fn kind(&self) -> &'static str {
        self.config.kind()
    }

    fn send_batch<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Vec<Result<(), SendError>>> {
        Box::pin(async move {
            let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
            let mut group_of: HashMap<&str, usize> = HashMap::new();
            for (index, message) in messages.iter().enumerate() {
                let destination = message.destination.as_str();
                let group = *group_of.entry(destination).or_insert_with(|| {
                    groups.push((destination, Vec::new()));
                    groups.len() - 1
                });
                groups[group].1.push(index);
            }
            let sends = groups
                .iter()
                .map(|(destination, indices)| self.send_destination(destination, messages, indices));
            let mut results: Vec<Option<Result<(), SendError>>> = vec![None; messages.len()];
            for (index, outcome) in futures::future::join_all(sends).await.into_iter().flatten() {
                results[index] = Some(outcome);
            }
            results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(SendError::Transient("no outcome recorded".to_owned()))))
                .collect()
        })
    }

    fn send_dead_letter<'a>(&'a self, message: &'a Message, reason: &'a str) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(self.dead_letter(message, reason))
    }

    fn ensure_destinations<'a>(&'a self, destinations: &'a [String]) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(self.ensure(destinations))
    }

    fn check_health(&self) -> BoxFuture<'_, Result<(), SendError>> {
        Box::pin(self.health())
    }

    /// One destination's calls are sequential and carry one entry per aggregate, and a failed
    /// entry's later entries are withheld (`send_destination`), so a whole batch can be one call.
    fn keeps_aggregate_order(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use super::*;
    use crate::event::NewEvent;
    use crate::event::validate::enrich;

    fn config() -> SnsSqsConfig {
        SnsSqsConfig::new("us-east-1", SnsSqsTarget::Sqs)
    }

    fn problem(config: &SnsSqsConfig) -> String {
        config.validate().expect_err("invalid").to_string()
    }

    #[test]
    fn the_config_document_is_camel_case_with_defaults() {
        let config: SnsSqsConfig =
            serde_json::from_value(serde_json::json!({"region": "eu-west-1", "target": "sns"})).unwrap();
        assert_eq!(config, SnsSqsConfig::new("eu-west-1", SnsSqsTarget::Sns));
        assert_eq!(config.mode, CloudEventsMode::Structured);
        assert_eq!(config.max_receive_count, 5);
        let full: SnsSqsConfig = serde_json::from_value(serde_json::json!({
            "region": "us-east-1", "endpointUrl": "http://moto:5000", "target": "sqs", "fifo": true,
            "mode": "binary", "deadLetterQueue": "dead.fifo", "maxReceiveCount": 3,
            "accessKeyIdEnv": "KEY", "secretAccessKeyEnv": "SECRET"
        }))
        .unwrap();
        assert_eq!(full.validate(), Ok(()));
        assert_eq!(full.dead_letter_queue.as_deref(), Some("dead.fifo"));
        let schema = serde_json::to_value(schemars::schema_for!(SnsSqsConfig)).unwrap();
        assert!(schema["properties"]["deadLetterQueue"]["description"].is_string());
    }

    #[test]
    fn validation_names_the_offending_field() {
        assert_eq!(config().validate(), Ok(()));
        let mut c = config();
        c.region = " ".into();
        assert_eq!(problem(&c), "snsSqs.region is empty");
        let mut c = config();
        c.endpoint_url = Some("localhost:4566".into());
        assert!(problem(&c).starts_with("snsSqs.endpointUrl"));
        let mut c = config();
        c.fifo = true;
        c.dead_letter_queue = Some("dead".into());
        assert_eq!(
            problem(&c),
            "snsSqs.deadLetterQueue must end in .fifo when fifo is true"
        );
        c.fifo = false;
        c.dead_letter_queue = Some("dead.fifo".into());
        assert_eq!(
            problem(&c),
            "snsSqs.deadLetterQueue must not end in .fifo when fifo is false"
        );
        c.dead_letter_queue = Some("dead letters".into());
        assert!(problem(&c).starts_with("snsSqs.deadLetterQueue \"dead letters\" is not a valid SQS queue name"));
        let mut c = config();
        c.max_receive_count = 0;
        assert_eq!(problem(&c), "snsSqs.maxReceiveCount must be between 1 and 1000");
        let mut c = config();
        c.access_key_id_env = Some("KEY".into());
        assert_eq!(
            problem(&c),
            "snsSqs.accessKeyIdEnv and snsSqs.secretAccessKeyEnv must be set together"
        );
        c.secret_access_key_env = Some(String::new());
        assert_eq!(problem(&c), "snsSqs.secretAccessKeyEnv is empty");
    }

    #[test]
    fn destinations_map_to_valid_names_with_the_fifo_suffix() {
        let mut c = config();
        assert_eq!(
            c.physical_name("inventory.StockLevelChanged").unwrap(),
            "inventory-StockLevelChanged"
        );
        c.fifo = true;
        assert_eq!(c.physical_name("orders").unwrap(), "orders.fifo");
        assert_eq!(c.physical_name("orders.fifo").unwrap(), "orders.fifo");
        assert!(matches!(c.physical_name(""), Err(SendError::Message(_))));
        assert!(matches!(c.physical_name(&"q".repeat(80)), Err(SendError::Message(_))));
        c.target = SnsSqsTarget::Sns;
        assert!(c.physical_name(&"t".repeat(200)).is_ok());
    }

    /// Every call of a batch, as `send_destination` forms them when no entry fails.
    fn plan_calls(entries: &[(usize, &str)]) -> Vec<Vec<usize>> {
        let mut lanes = Lanes::new(
            entries
                .iter()
                .enumerate()
                .map(|(index, &(_, aggregate))| (aggregate, index)),
        );
        let mut calls = Vec::new();
        while let Some(call) = lanes.next_call(|&index| entries[index].0) {
            let mut indices = call.entries;
            indices.sort_unstable();
            calls.push(indices);
        }
        calls
    }

    /// Entries of distinct aggregates with the given sizes.
    fn distinct(sizes: &[usize]) -> Vec<(usize, String)> {
        sizes.iter().enumerate().map(|(i, &s)| (s, format!("a{i}"))).collect()
    }

    fn plan(entries: &[(usize, String)]) -> Vec<Vec<usize>> {
        let keys: Vec<(usize, &str)> = entries.iter().map(|(s, a)| (*s, a.as_str())).collect();
        plan_calls(&keys)
    }

    fn ranges(calls: Vec<Vec<usize>>) -> Vec<Range<usize>> {
        calls
            .into_iter()
            .map(|c| {
                let range = c[0]..c[c.len() - 1] + 1;
                assert_eq!(c, range.clone().collect::<Vec<_>>(), "not contiguous");
                range
            })
            .collect()
    }

    #[test]
    fn calls_are_full_while_ten_or_more_remain() {
        assert_eq!(plan(&[]), Vec::<Vec<usize>>::new());
        assert_eq!(ranges(plan(&distinct(&[100; 25]))), vec![0..10, 10..20, 20..25]);
        assert_eq!(ranges(plan(&distinct(&[100; 10]))), vec![0..10]);
        assert_eq!(ranges(plan(&distinct(&[100; 11]))), vec![0..10, 10..11]);
        assert_eq!(ranges(plan(&distinct(&[100; 3]))), vec![0..3]);
    }

    #[test]
    fn hot_aggregates_at_the_end_of_a_batch_ride_along_so_every_call_is_full() {
        // 80 single-event aggregates, then 4 aggregates of 5 events each (as a shard-ordered
        // read puts them): 100 entries fit in exactly 10 full calls.
        let mut entries: Vec<(usize, String)> = (0..80).map(|i| (100, format!("a{i}"))).collect();
        for h in 0..4 {
            entries.extend((0..5).map(|_| (100, format!("h{h}"))));
        }
        let calls = plan(&entries);
        assert_eq!(calls.len(), 10, "{calls:?}");
        assert!(calls.iter().all(|c| c.len() == MAX_BATCH_ENTRIES), "{calls:?}");
    }

    #[test]
    fn calls_stay_within_256_kib() {
        let kib = 1024;
        // 30 KiB each: 8 fit (240 KiB), the 9th would exceed 256 KiB.
        assert_eq!(ranges(plan(&distinct(&[30 * kib; 12]))), vec![0..8, 8..12]);
        // Exactly at the limit is fine.
        assert_eq!(ranges(plan(&distinct(&[128 * kib, 128 * kib, 1]))), vec![0..2, 2..3]);
        assert_eq!(
            ranges(plan(&distinct(&[MAX_BATCH_BYTES, 1, MAX_BATCH_BYTES]))),
            vec![0..1, 1..2, 2..3]
        );
        // A large entry that does not fit is passed over by smaller ones of other aggregates.
        let mixed = distinct(&[200 * kib, 10, 10, 60 * kib, 10]);
        let calls = plan(&mixed);
        assert_eq!(calls, vec![vec![0, 1, 2, 4], vec![3]]);
        for call in calls {
            assert!(call.iter().map(|&i| mixed[i].0).sum::<usize>() <= MAX_BATCH_BYTES);
        }
    }

    #[test]
    fn a_call_carries_one_entry_per_aggregate_and_keeps_each_aggregates_order() {
        // A hot aggregate "h" between 20 others: each call takes h's next entry only.
        let mut entries = Vec::new();
        for i in 0..20 {
            entries.push((100, format!("a{i}")));
            if i % 2 == 0 {
                entries.push((100, "h".to_owned()));
            }
        }
        let calls = plan(&entries);
        let mut sent = Vec::new();
        for call in &calls {
            assert!(call.len() <= MAX_BATCH_ENTRIES);
            let aggregates: HashSet<&str> = call.iter().map(|&i| entries[i].1.as_str()).collect();
            assert_eq!(aggregates.len(), call.len(), "two entries of one aggregate in {call:?}");
            sent.extend(call.iter().copied());
        }
        let order =
            |aggregate: &str| -> Vec<usize> { sent.iter().copied().filter(|&i| entries[i].1 == aggregate).collect() };
        let hot = order("h");
        assert_eq!(hot.len(), 10);
        assert!(hot.windows(2).all(|w| w[0] < w[1]), "h out of order: {hot:?}");
        assert_eq!(sent.len(), entries.len());
        // 30 entries: the hot lane rides along in every call, so the calls are full while 10
        // aggregates have entries (2 calls), and it takes the 10 calls its run needs, no more.
        assert_eq!(calls[0].len(), 10);
        assert_eq!(calls[1].len(), 10);
        assert_eq!(calls.len(), 10);
        assert!(calls.iter().all(|c| c.iter().any(|&i| entries[i].1 == "h")));
        // A size skip also keeps the skipped aggregate's later entry back.
        let blocked = vec![
            (200 * 1024, "x".to_owned()),
            (100 * 1024, "x".to_owned()),
            (100 * 1024, "y".to_owned()),
        ];
        assert_eq!(plan(&blocked), vec![vec![0], vec![1, 2]]);
        // The longer lane (y, 2 left) goes first; x's large entry then no longer fits.
        let skipped = vec![
            (200 * 1024, "x".to_owned()),
            (100 * 1024, "y".to_owned()),
            (10, "y".to_owned()),
        ];
        assert_eq!(plan(&skipped), vec![vec![1], vec![0, 2]]);
    }

    fn full_event() -> DomainEvent {
        let mut e = enrich(
            NewEvent::raw(
                "StockLevelChanged",
                "InventoryItem",
                "item-7",
                2,
                serde_json::json!({"q": 1}),
            )
            .with_user_id("u-1")
            .with_causation_id("cmd-9"),
            "warehouse-svc",
            chrono::Utc::now(),
        );
        e.metadata.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        e
    }

    #[test]
    fn message_attributes_stay_within_the_limit_of_ten() {
        let e = full_event();
        let structured = message_attributes(&e, &Encoded::new(&e, CloudEventsMode::Structured).unwrap());
        let names: Vec<_> = structured.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["eventType", "aggregateId", "eventId"]);
        let binary = message_attributes(&e, &Encoded::new(&e, CloudEventsMode::Binary).unwrap());
        assert_eq!(binary.len(), MAX_MESSAGE_ATTRIBUTES);
        let get = |name: &str| binary.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());
        assert_eq!(get("ce_specversion"), Some("1.0"));
        assert_eq!(get("ce_id"), Some(e.event_id.to_string().as_str()));
        assert_eq!(get("ce_source"), Some("warehouse-svc"));
        assert_eq!(get("ce_subject"), Some("item-7"));
        assert_eq!(get("ce_eventversion"), Some("2"));
        assert!(get("ce_time").is_some());
    }

    #[test]
    fn entry_failures_are_permanent_only_when_the_sender_is_at_fault() {
        let ids: Vec<(usize, uuid::Uuid)> = (0..4).map(|i| (i, uuid::Uuid::now_v7())).collect();
        let successes: HashSet<String> = ["0".to_owned()].into();
        let failure = |sender_fault| EntryFailure {
            sender_fault,
            code: "Code".into(),
            message: Some("why".into()),
        };
        let failures = HashMap::from([("1".to_owned(), failure(true)), ("2".to_owned(), failure(false))]);
        let outcomes = entry_outcomes("q", &ids, &successes, failures);
        assert_eq!(outcomes[0], Ok(()));
        assert!(matches!(&outcomes[1], Err(SendError::Message(m)) if m.contains("Code: why")));
        assert!(matches!(&outcomes[2], Err(SendError::Transient(_))));
        assert!(matches!(&outcomes[3], Err(SendError::Transient(m)) if m.contains("no result")));
    }

    #[test]
    fn message_size_counts_body_and_attributes() {
        let attributes = vec![("eventId", "abc".to_owned())];
        assert_eq!(message_size("{}", &attributes), 2 + 7 + 6 + 3);
        assert_eq!(truncate_to("héllo", 2), "h");
        assert_eq!(truncate_to("héllo", 3), "hé");
    }
}
