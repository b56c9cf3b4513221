//! The relay worker's HTTP server: health probes, Prometheus metrics, an OpenAPI document, and
//! the bearer-token protected admin API for listing, retrying and resolving failed events.
//!
//! | Route | Auth | Purpose |
//! |---|---|---|
//! | `GET /livez`, `GET /readyz` | no | probes (`503` with one reason per line) |
//! | `GET /metrics` | no | OpenMetrics text |
//! | `GET /api/v1/openapi.json` | no | this API as OpenAPI 3.1 |
//! | `GET /api/v1/failed-events` | bearer | filtered, cursor-paginated list |
//! | `POST /api/v1/failed-events/{eventId}/retry` | bearer | schedule an immediate attempt |
//! | `POST /api/v1/failed-events/retry` | bearer | retry up to 500 events |
//! | `POST /api/v1/failed-events/{eventId}/resolve` | bearer | discard with a reason |
//!
//! Every error answers `{"error": "...", "field": "..."}` (`field` names the offending
//! parameter, when there is one).

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use uuid::Uuid;

use crate::delivery::health::{HealthState, NotReady};
use crate::delivery::metrics::DeliveryMetrics;
use crate::store::failed::{FailedEvent, FailedEventQuery, FailedEvents, FailedStatus};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Requests taking longer than this are answered with `408 Request Timeout`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Page size when the `limit` parameter is absent.
pub const DEFAULT_LIMIT: i64 = 100;
/// Largest page size, and the most ids one bulk retry accepts.
pub const MAX_LIMIT: i64 = 500;
/// Longest accepted `eventType` or `aggregateId` filter, in bytes.
pub const MAX_FILTER_BYTES: usize = 256;
/// Longest accepted resolution reason, in characters.
pub const MAX_REASON_CHARS: usize = 1000;
/// The content type of `/metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Everything the admin server needs; cheap to clone (one per request).
#[derive(Clone, Debug)]
pub struct AdminState {
    /// Access to the failed-events table.
    pub failed: FailedEvents,
    /// The publisher (consumer) whose failed events this worker administers.
    pub consumer: String,
    /// The bearer token the admin endpoints require.
    pub token: Arc<str>,
    /// Liveness and readiness, updated by the relay loop.
    pub health: Arc<HealthState>,
    /// The relay's metrics, served on `/metrics`.
    pub metrics: Arc<DeliveryMetrics>,
}

// ---------------------------------------------------------------------------------------------
// Wire types, shared with the client.
// ---------------------------------------------------------------------------------------------

/// Where a failed event stands (the wire form of [`FailedStatus`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailedEventStatus {
    /// Waiting for its next attempt.
    Retrying,
    /// Waiting behind an earlier failed event of the same aggregate.
    Held,
    /// Gave up after the retry policy; needs a manual retry or resolve.
    DeadLettered,
    /// Discarded by an operator, with a reason.
    Resolved,
    /// Delivered on a later attempt.
    Delivered,
}

impl FailedEventStatus {
    /// Every status, in the order they are listed in messages.
    pub const ALL: [FailedEventStatus; 5] = [
        Self::Retrying,
        Self::Held,
        Self::DeadLettered,
        Self::Resolved,
        Self::Delivered,
    ];

    /// The status as written on the wire and in the database.
    pub const fn as_str(self) -> &'static str {
        self.store().as_str()
    }

    /// The status as the store knows it.
    pub const fn store(self) -> FailedStatus {
        match self {
            Self::Retrying => FailedStatus::Retrying,
            Self::Held => FailedStatus::Held,
            Self::DeadLettered => FailedStatus::DeadLettered,
            Self::Resolved => FailedStatus::Resolved,
            Self::Delivered => FailedStatus::Delivered,
        }
    }

    /// Parses the wire form (`dead_lettered`, ...).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// The allowed values, comma-separated, for error messages.
    pub fn allowed() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }
}

impl From<FailedStatus> for FailedEventStatus {
    fn from(status: FailedStatus) -> Self {
        match status {
            FailedStatus::Retrying => Self::Retrying,
            FailedStatus::Held => Self::Held,
            FailedStatus::DeadLettered => Self::DeadLettered,
            FailedStatus::Resolved => Self::Resolved,
            FailedStatus::Delivered => Self::Delivered,
        }
    }
}

impl std::fmt::Display for FailedEventStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One failed event as the API lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailedEventRecord {
    /// The publisher (consumer) that failed to deliver the event.
    pub consumer: String,
    /// The event's id.
    pub event_id: Uuid,
    /// The event's position in the event store.
    pub position: i64,
    /// The event type, e.g. `StockLevelChanged`.
    pub event_type: String,
    /// The aggregate type, e.g. `InventoryItem`.
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// Where the failed event stands.
    pub status: FailedEventStatus,
    /// Attempts since the last manual retry.
    pub attempts: i32,
    /// The last delivery error.
    pub last_error: Option<String>,
    /// When the event first failed.
    pub first_failed_at: DateTime<Utc>,
    /// When the event was last attempted.
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// When the next attempt is due (retrying events only).
    pub next_retry_at: Option<DateTime<Utc>>,
    /// Why an operator resolved the event.
    pub resolution: Option<String>,
}

impl From<FailedEvent> for FailedEventRecord {
    fn from(f: FailedEvent) -> Self {
        Self {
            consumer: f.consumer,
            event_id: f.event_id,
            position: f.position,
            event_type: f.event_type,
            aggregate_type: f.aggregate_type,
            aggregate_id: f.aggregate_id,
            status: f.status.into(),
            attempts: f.attempts,
            last_error: f.last_error,
            first_failed_at: f.first_failed_at,
            last_attempt_at: f.last_attempt_at,
            next_retry_at: f.next_retry_at,
            resolution: f.resolution,
        }
    }
}

/// One page of failed events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailedPage {
    /// The events, in event-store order.
    pub items: Vec<FailedEventRecord>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// The outcome of retrying one failed event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryResult {
    /// The retried event.
    pub event_id: Uuid,
    /// Its status before the retry.
    pub previous_status: FailedEventStatus,
    /// Its attempts before the retry (the count restarts at 0).
    pub previous_attempts: i32,
    /// Always true: the event is due for an attempt now.
    pub scheduled: bool,
}

impl RetryResult {
    /// Describes a scheduled retry from the row as it was before.
    fn from_previous(previous: &FailedEvent) -> Self {
        Self {
            event_id: previous.event_id,
            previous_status: previous.status.into(),
            previous_attempts: previous.attempts,
            scheduled: true,
        }
    }
}

/// Body of `POST /api/v1/failed-events/retry`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryManyRequest {
    /// The events to retry: 1 to 500 distinct UUIDs.
    #[schemars(with = "Vec<Uuid>", length(min = 1, max = 500))]
    pub event_ids: Vec<String>,
}

/// Answer of `POST /api/v1/failed-events/retry`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryManyResult {
    /// The events scheduled for an attempt now.
    pub retried: Vec<RetryResult>,
    /// Ids with no failed event in a retryable state.
    pub not_found: Vec<Uuid>,
}

/// Body of `POST /api/v1/failed-events/{eventId}/resolve`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    /// Why the event is discarded (1 to 1000 characters); kept on the failed event.
    #[schemars(length(min = 1, max = 1000))]
    pub reason: String,
}

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ApiError {
    /// What went wrong, readable by a person.
    pub error: String,
    /// The offending parameter or body field, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// An error answer: a status and an [`ApiError`] body.
#[derive(Debug)]
struct Problem {
    /// The answer's status code.
    status: StatusCode,
    /// The message for people.
    error: String,
    /// The offending parameter or body field.
    field: Option<String>,
}

impl Problem {
    /// A problem without a field.
    fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
            field: None,
        }
    }

    /// A 400 naming the offending parameter or field.
    fn bad_request(field: &str, error: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error: error.into(),
            field: Some(field.to_owned()),
        }
    }

    /// A 401 (the response adds `WWW-Authenticate: Bearer`).
    fn unauthorized(error: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, error)
    }

    /// The 404 of a retry whose event has no retryable failed row.
    fn not_retryable(event_id: Uuid) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("no failed event {event_id} in a retryable state"),
        )
    }

    /// A 500 for a store error; the details go to the log, not to the client.
    fn store(action: &str, error: &crate::store::StoreError) -> Self {
        tracing::error!(action, %error, "admin API store error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the event store failed; see the relay logs",
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = ApiError {
            error: self.error,
            field: self.field,
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Shortens a client-supplied value before it is echoed in a message.
fn echo(value: &str) -> String {
    /// Longest echo, in bytes.
    const MAX: usize = 64;
    if value.len() <= MAX {
        return value.to_owned();
    }
    let mut end = MAX;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &value[..end])
}

// ---------------------------------------------------------------------------------------------
// Router
// ---------------------------------------------------------------------------------------------

/// Builds the admin server: public probes, metrics and OpenAPI document, and the
/// authenticated failed-event routes, with a body size limit and a request timeout.
pub fn router(state: AdminState) -> Router {
    let admin = Router::new()
        .route("/api/v1/failed-events", get(list_failed))
        .route("/api/v1/failed-events/retry", post(retry_many))
        .route("/api/v1/failed-events/{eventId}/retry", post(retry_one))
        .route("/api/v1/failed-events/{eventId}/resolve", post(resolve))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi))
        .merge(admin)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(TraceLayer::new_for_http())
}

/// Serves `router` on `listener` until `shutdown` completes, then drains open requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

/// A JSON 404 for unknown routes.
async fn not_found(request: Request) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        format!("no route for {} {}", request.method(), echo(request.uri().path())),
    )
}

/// A JSON 405 for known routes with the wrong method.
async fn method_not_allowed(request: Request) -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {}", request.method(), echo(request.uri().path())),
    )
}

// ---------------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------------

/// Why a request failed authentication (logged; never includes the token).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AuthFailure {
    /// No `Authorization` header.
    Missing,
    /// Not `Bearer <token>`.
    Malformed,
    /// A token other than the configured one.
    Wrong,
}

/// Checks an `Authorization` header value against the expected token.
fn check_bearer(header: Option<&HeaderValue>, expected: &str) -> Result<(), AuthFailure> {
    let header = header.ok_or(AuthFailure::Missing)?;
    let value = header.to_str().map_err(|_| AuthFailure::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthFailure::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthFailure::Malformed);
    }
    // An unset token must never let an empty or any other token in.
    if !expected.is_empty() && constant_time_eq(token.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(AuthFailure::Wrong)
    }
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// Middleware letting only requests with the configured bearer token through.
async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    match check_bearer(request.headers().get(header::AUTHORIZATION), &state.token) {
        Ok(()) => next.run(request).await,
        Err(failure) => {
            tracing::warn!(
                method = %request.method(),
                path = %request.uri().path(),
                reason = ?failure,
                "admin API request rejected: not authenticated"
            );
            Problem::unauthorized(match failure {
                AuthFailure::Missing => "missing bearer token: send `Authorization: Bearer <token>`",
                AuthFailure::Malformed => "malformed Authorization header: expected `Bearer <token>`",
                AuthFailure::Wrong => "invalid bearer token",
            })
            .into_response()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Probes, metrics, OpenAPI
// ---------------------------------------------------------------------------------------------

/// `GET /livez`: 200 while the claim loop runs.
async fn livez(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.health.live() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "claim loop has not run recently\n")
    }
}

/// `GET /readyz`: 200 when ready, else 503 with one reason per line.
async fn readyz(State(state): State<AdminState>) -> (StatusCode, String) {
    match state.health.ready() {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(NotReady(reasons)) => {
            let mut body = reasons.join("\n");
            body.push('\n');
            (StatusCode::SERVICE_UNAVAILABLE, body)
        }
    }
}

/// `GET /metrics`: the relay metrics as OpenMetrics text.
async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        state.metrics.encode(),
    )
        .into_response()
}

/// `GET /api/v1/openapi.json`: the OpenAPI document, built once.
async fn openapi() -> Json<&'static serde_json::Value> {
    /// Built on first use; the document never changes while the process runs.
    static DOCUMENT: LazyLock<serde_json::Value> = LazyLock::new(openapi_document);
    Json(&DOCUMENT)
}

// ---------------------------------------------------------------------------------------------
// Failed events
// ---------------------------------------------------------------------------------------------

/// The query parameters `GET /api/v1/failed-events` accepts.
const LIST_PARAMETERS: [&str; 7] = [
    "status",
    "eventType",
    "aggregateId",
    "failedAfter",
    "failedBefore",
    "cursor",
    "limit",
];

/// Validates the raw query pairs of a list request into a store query (without consumer),
/// asking for one extra row to learn whether another page follows.
fn parse_list_query(pairs: &[(String, String)]) -> Result<FailedEventQuery, Problem> {
    let mut seen = HashSet::new();
    let mut query = FailedEventQuery {
        limit: DEFAULT_LIMIT,
        ..Default::default()
    };
    for (name, value) in pairs {
        let name = name.as_str();
        // `status` may repeat (values add up); every other parameter must be given once.
        if name != "status" && LIST_PARAMETERS.contains(&name) && !seen.insert(name) {
            return Err(Problem::bad_request(
                name,
                format!("query parameter `{name}` is given more than once"),
            ));
        }
        match name {
            "status" => {
                for item in value.split(',').map(str::trim) {
                    let status = FailedEventStatus::parse(item).ok_or_else(|| {
                        Problem::bad_request(
                            "status",
                            format!(
                                "unknown status `{}`; allowed: {}",
                                echo(item),
                                FailedEventStatus::allowed()
                            ),
                        )
                    })?;
                    if !query.statuses.contains(&status.store()) {
                        query.statuses.push(status.store());
                    }
                }
            }
            "eventType" => query.event_type = Some(filter_value(name, value)?),
            "aggregateId" => query.aggregate_id = Some(filter_value(name, value)?),
            "failedAfter" => query.failed_after = Some(timestamp(name, value)?),
            "failedBefore" => query.failed_before = Some(timestamp(name, value)?),
            "cursor" => query.after_position = Some(decode_cursor(value)?),
            "limit" => {
                query.limit = value
                    .trim()
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        Problem::bad_request(
                            "limit",
                            format!("limit must be between 1 and {MAX_LIMIT} (got `{}`)", echo(value)),
                        )
                    })?;
            }
            unknown => {
                return Err(Problem::bad_request(
                    &echo(unknown),
                    format!(
                        "unknown query parameter `{}`; allowed: {}",
                        echo(unknown),
                        LIST_PARAMETERS.join(", ")
                    ),
                ));
            }
        }
    }
    if let (Some(after), Some(before)) = (query.failed_after, query.failed_before)
        && after >= before
    {
        return Err(Problem::bad_request(
            "failedAfter",
            "failedAfter must be earlier than failedBefore",
        ));
    }
    Ok(query)
}

/// Validates an `eventType` or `aggregateId` filter: non-empty, at most 256 bytes.
fn filter_value(name: &str, value: &str) -> Result<String, Problem> {
    if value.is_empty() {
        return Err(Problem::bad_request(name, format!("{name} must not be empty")));
    }
    if value.len() > MAX_FILTER_BYTES {
        return Err(Problem::bad_request(
            name,
            format!("{name} must be at most {MAX_FILTER_BYTES} bytes long"),
        ));
    }
    Ok(value.to_owned())
}

/// Parses an RFC 3339 timestamp parameter.
fn timestamp(name: &str, value: &str) -> Result<DateTime<Utc>, Problem> {
    DateTime::parse_from_rfc3339(value.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            Problem::bad_request(
                name,
                format!(
                    "{name} must be an RFC 3339 timestamp such as 2025-01-31T12:00:00Z (got `{}`)",
                    echo(value)
                ),
            )
        })
}

/// Cursor format version; bumped if the cursor ever carries more than a position.
const CURSOR_PREFIX: &str = "p1:";

/// Encodes a page position as an opaque cursor (hex of `p1:<position>`).
fn encode_cursor(position: i64) -> String {
    format!("{CURSOR_PREFIX}{position}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Decodes a cursor made by [`encode_cursor`].
fn decode_cursor(cursor: &str) -> Result<i64, Problem> {
    let malformed = || Problem::bad_request("cursor", "cursor is malformed; pass the nextCursor of a previous page");
    if cursor.is_empty() || !cursor.len().is_multiple_of(2) || cursor.len() > 64 {
        return Err(malformed());
    }
    let bytes = (0..cursor.len())
        .step_by(2)
        .map(|i| cursor.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(malformed)?;
    let text = String::from_utf8(bytes).map_err(|_| malformed())?;
    text.strip_prefix(CURSOR_PREFIX)
        .and_then(|p| p.parse::<i64>().ok())
        .filter(|p| *p >= 0)
        .ok_or_else(malformed)
}

/// `GET /api/v1/failed-events`: one page of this consumer's failed events.
async fn list_failed(
    State(state): State<AdminState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<FailedPage>, Problem> {
    let Query(pairs) = query.map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            format!("invalid query string: {}", e.body_text()),
        )
    })?;
    let mut query = parse_list_query(&pairs)?;
    let page_size = query.limit;
    query.consumer = Some(state.consumer.clone());
    query.limit = page_size + 1;
    let mut rows = state
        .failed
        .list(&query)
        .await
        .map_err(|e| Problem::store("list failed events", &e))?;
    let more = rows.len() > usize::try_from(page_size).unwrap_or(usize::MAX);
    rows.truncate(usize::try_from(page_size).unwrap_or(usize::MAX));
    let next_cursor = if more {
        rows.last().map(|r| encode_cursor(r.position))
    } else {
        None
    };
    Ok(Json(FailedPage {
        items: rows.into_iter().map(FailedEventRecord::from).collect(),
        next_cursor,
    }))
}

/// The `eventId` path segment as a UUID.
fn parse_event_id(path: Result<Path<String>, PathRejection>) -> Result<Uuid, Problem> {
    let invalid = || Problem::bad_request("eventId", "eventId must be a UUID");
    let Path(raw) = path.map_err(|_| invalid())?;
    Uuid::parse_str(&raw).map_err(|_| invalid())
}

/// Parses a JSON body, mapping serde's message to a 400 that names the field when it can.
fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    example: &str,
) -> Result<T, Problem> {
    let body = body.map_err(|e| Problem::new(e.status(), e.body_text()))?;
    serde_json::from_slice(&body).map_err(|e| {
        let message = e.to_string();
        let field = ["missing field `", "unknown field `"].iter().find_map(|marker| {
            let rest = &message[message.find(marker)? + marker.len()..];
            Some(rest[..rest.find('`')?].to_owned())
        });
        Problem {
            status: StatusCode::BAD_REQUEST,
            error: format!("invalid request body (expected {example}): {message}"),
            field,
        }
    })
}

/// `POST /api/v1/failed-events/{eventId}/retry`.
async fn retry_one(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<RetryResult>, Problem> {
    let event_id = parse_event_id(path)?;
    let previous = state
        .failed
        .retry_now(&state.consumer, event_id)
        .await
        .map_err(|e| Problem::store("retry failed event", &e))?;
    match previous {
        Some(previous) => {
            tracing::info!(action = "retry", %event_id, previous_status = previous.status.as_str(),
                outcome = "scheduled", "admin retried failed event");
            Ok(Json(RetryResult::from_previous(&previous)))
        }
        None => {
            tracing::info!(action = "retry", %event_id, outcome = "not_found", "admin retry found no retryable event");
            Err(Problem::not_retryable(event_id))
        }
    }
}

/// `POST /api/v1/failed-events/retry`: retries each id in turn (not atomically: a store
/// error part-way answers 500 after the earlier ids were scheduled).
async fn retry_many(
    State(state): State<AdminState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RetryManyResult>, Problem> {
    let request: RetryManyRequest = parse_body(body, r#"{"eventIds": ["<uuid>", ...]}"#)?;
    let count = request.event_ids.len();
    if !(1..=usize::try_from(MAX_LIMIT).unwrap_or(500)).contains(&count) {
        return Err(Problem::bad_request(
            "eventIds",
            format!("eventIds must list between 1 and {MAX_LIMIT} ids (got {count})"),
        ));
    }
    let mut ids = Vec::with_capacity(count);
    let mut seen = HashSet::with_capacity(count);
    for (i, raw) in request.event_ids.iter().enumerate() {
        let id = Uuid::parse_str(raw).map_err(|_| {
            Problem::bad_request(
                "eventIds",
                format!("eventIds[{i}] must be a UUID (got `{}`)", echo(raw)),
            )
        })?;
        if !seen.insert(id) {
            return Err(Problem::bad_request(
                "eventIds",
                format!("eventIds lists {id} more than once"),
            ));
        }
        ids.push(id);
    }
    let mut result = RetryManyResult {
        retried: Vec::new(),
        not_found: Vec::new(),
    };
    for event_id in ids {
        let previous = state
            .failed
            .retry_now(&state.consumer, event_id)
            .await
            .map_err(|e| Problem::store("retry failed event", &e))?;
        match previous {
            Some(previous) => {
                tracing::info!(action = "retry", %event_id, previous_status = previous.status.as_str(),
                    outcome = "scheduled", "admin retried failed event");
                result.retried.push(RetryResult::from_previous(&previous));
            }
            None => {
                tracing::info!(action = "retry", %event_id, outcome = "not_found", "admin retry found no retryable event");
                result.not_found.push(event_id);
            }
        }
    }
    Ok(Json(result))
}

/// `POST /api/v1/failed-events/{eventId}/resolve`.
async fn resolve(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<FailedEventRecord>, Problem> {
    let event_id = parse_event_id(path)?;
    let request: ResolveRequest = parse_body(body, r#"{"reason": "..."}"#)?;
    let reason = request.reason.trim();
    if reason.is_empty() {
        return Err(Problem::bad_request("reason", "reason must not be empty"));
    }
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(Problem::bad_request(
            "reason",
            format!("reason must be at most {MAX_REASON_CHARS} characters long"),
        ));
    }
    let previous = state
        .failed
        .resolve(&state.consumer, event_id, reason)
        .await
        .map_err(|e| Problem::store("resolve failed event", &e))?;
    match previous {
        Some(previous) => {
            tracing::info!(action = "resolve", %event_id, previous_status = previous.status.as_str(),
                outcome = "resolved", "admin resolved failed event");
            Ok(Json(previous.into()))
        }
        None => {
            tracing::info!(action = "resolve", %event_id, outcome = "not_found", "admin resolve found no open event");
            Err(Problem::new(
                StatusCode::NOT_FOUND,
                format!("no failed event {event_id} in a resolvable state"),
            ))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// OpenAPI
// ---------------------------------------------------------------------------------------------

/// The OpenAPI 3.1 description of this server; component schemas come from the wire types.
pub fn openapi_document() -> serde_json::Value {
    use schemars::generate::SchemaSettings;
    use serde_json::json;

    let settings = |s: SchemaSettings| {
        s.with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
    };
    let mut requests = settings(SchemaSettings::draft2020_12().for_deserialize()).into_generator();
    let retry_many_request = requests.subschema_for::<RetryManyRequest>();
    let resolve_request = requests.subschema_for::<ResolveRequest>();
    let mut responses = settings(SchemaSettings::draft2020_12().for_serialize()).into_generator();
    let page = responses.subschema_for::<FailedPage>();
    let record = responses.subschema_for::<FailedEventRecord>();
    let retry_result = responses.subschema_for::<RetryResult>();
    let retry_many_result = responses.subschema_for::<RetryManyResult>();
    let error = responses.subschema_for::<ApiError>();
    let mut schemas = requests.take_definitions(true);
    schemas.extend(responses.take_definitions(true));

    let error_response =
        |description: &str| json!({"description": description, "content": {"application/json": {"schema": error}}});
    let json_response = |description: &str, schema: &schemars::Schema| json!({"description": description, "content": {"application/json": {"schema": schema}}});
    let event_id = json!({
        "name": "eventId", "in": "path", "required": true, "description": "The failed event's id.",
        "schema": {"type": "string", "format": "uuid"}
    });
    let query = |name: &str, description: &str, schema: serde_json::Value| json!({"name": name, "in": "query", "required": false, "description": description, "schema": schema});
    let statuses: Vec<&str> = FailedEventStatus::ALL.iter().map(|s| s.as_str()).collect();
    let auth_errors = |mut responses: serde_json::Value| {
        responses["401"] = error_response("Missing, malformed or wrong bearer token.");
        responses["500"] = error_response("The event store failed.");
        responses
    };
    let text = |description: &str| json!({"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}});

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "inventory-outbox relay admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Health, metrics and failed-event administration of one relay worker. \
                Failed events are per publisher: each worker administers its own publisher's events."
        },
        "security": [{"bearerAuth": []}],
        "paths": {
            "/livez": {"get": {
                "summary": "Liveness: the claim loop runs.", "security": [], "operationId": "livez",
                "responses": {"200": text("Alive (`ok`)."), "503": text("The claim loop has not run recently.")}
            }},
            "/readyz": {"get": {
                "summary": "Readiness: the loop runs and the database and the broker answer (failed-event counts never affect it).",
                "security": [], "operationId": "readyz",
                "responses": {"200": text("Ready (`ok`)."), "503": text("Not ready: one reason per line.")}
            }},
            "/metrics": {"get": {
                "summary": "Prometheus metrics.", "security": [], "operationId": "metrics",
                "responses": {"200": {"description": "OpenMetrics text.",
                    "content": {OPENMETRICS_CONTENT_TYPE: {"schema": {"type": "string"}}}}}
            }},
            "/api/v1/openapi.json": {"get": {
                "summary": "This document.", "security": [], "operationId": "openapi",
                "responses": {"200": {"description": "OpenAPI 3.1 document.",
                    "content": {"application/json": {"schema": {"type": "object"}}}}}
            }},
            "/api/v1/failed-events": {"get": {
                "summary": "List failed events, oldest position first, in pages.",
                "operationId": "listFailedEvents",
                "parameters": [
                    query("status", "Comma-separated statuses (or repeat the parameter); all when absent.",
                        json!({"type": "array", "items": {"type": "string", "enum": statuses}})),
                    query("eventType", "Only this event type.", json!({"type": "string", "minLength": 1, "maxLength": MAX_FILTER_BYTES})),
                    query("aggregateId", "Only this aggregate id.", json!({"type": "string", "minLength": 1, "maxLength": MAX_FILTER_BYTES})),
                    query("failedAfter", "First failed at or after this RFC 3339 time.", json!({"type": "string", "format": "date-time"})),
                    query("failedBefore", "First failed before this RFC 3339 time (after failedAfter).", json!({"type": "string", "format": "date-time"})),
                    query("cursor", "The nextCursor of the previous page.", json!({"type": "string"})),
                    query("limit", "Page size.", json!({"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT})),
                ],
                "responses": auth_errors(json!({
                    "200": json_response("One page of failed events.", &page),
                    "400": error_response("An invalid or unknown query parameter; `field` names it."),
                }))
            }},
            "/api/v1/failed-events/retry": {"post": {
                "summary": "Retry up to 500 dead-lettered or retrying events now.",
                "operationId": "retryFailedEvents",
                "requestBody": {"required": true, "content": {"application/json": {"schema": retry_many_request}}},
                "responses": auth_errors(json!({
                    "200": json_response("Which events were scheduled and which were not found.", &retry_many_result),
                    "400": error_response("Invalid body: not 1 to 500 distinct UUIDs, or unknown fields."),
                    "413": error_response("The body is larger than 64 KiB."),
                }))
            }},
            "/api/v1/failed-events/{eventId}/retry": {"post": {
                "summary": "Retry one dead-lettered or retrying event now (its attempts restart at 0).",
                "operationId": "retryFailedEvent",
                "parameters": [event_id],
                "responses": auth_errors(json!({
                    "200": json_response("The event is scheduled; the answer describes it before the retry.", &retry_result),
                    "400": error_response("eventId is not a UUID."),
                    "404": error_response("No failed event with this id in a retryable state."),
                }))
            }},
            "/api/v1/failed-events/{eventId}/resolve": {"post": {
                "summary": "Discard a failed event with a reason; it will not be delivered.",
                "operationId": "resolveFailedEvent",
                "parameters": [event_id],
                "requestBody": {"required": true, "content": {"application/json": {"schema": resolve_request}}},
                "responses": auth_errors(json!({
                    "200": json_response("The failed event as it was before it was resolved.", &record),
                    "400": error_response("eventId is not a UUID, or the reason is missing, empty or too long."),
                    "404": error_response("No failed event with this id that can be resolved."),
                    "413": error_response("The body is larger than 64 KiB."),
                }))
            }},
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(query: &[(&str, &str)]) -> Vec<(String, String)> {
        query.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn rejection(query: &[(&str, &str)]) -> Problem {
        parse_list_query(&pairs(query)).expect_err("query should be rejected")
    }

    #[test]
    fn a_full_list_query_becomes_a_store_query() {
        let cursor = encode_cursor(41);
        let query = parse_list_query(&pairs(&[
            ("status", "dead_lettered,retrying"),
            ("status", "retrying"),
            ("eventType", "StockLevelChanged"),
            ("aggregateId", "item-1"),
            ("failedAfter", "2025-01-01T00:00:00Z"),
            ("failedBefore", "2025-01-02T00:00:00+01:00"),
            ("cursor", &cursor),
            ("limit", "10"),
        ]))
        .unwrap();
        assert_eq!(query.statuses, vec![FailedStatus::DeadLettered, FailedStatus::Retrying]);
        assert_eq!(query.event_type.as_deref(), Some("StockLevelChanged"));
        assert_eq!(query.aggregate_id.as_deref(), Some("item-1"));
        assert_eq!(query.failed_before.unwrap().to_rfc3339(), "2025-01-01T23:00:00+00:00");
        assert_eq!((query.after_position, query.limit), (Some(41), 10));
        assert_eq!(parse_list_query(&[]).unwrap().limit, DEFAULT_LIMIT);
    }

    #[test]
    fn bad_list_parameters_are_named_in_the_message() {
        for (query, field, message) in [
            (
                vec![("status", "bogus")],
                "status",
                "allowed: retrying, held, dead_lettered, resolved, delivered",
            ),
            (vec![("limit", "0")], "limit", "limit must be between 1 and 500"),
            (vec![("limit", "ten")], "limit", "limit must be between 1 and 500"),
            (vec![("limit", "501")], "limit", "limit must be between 1 and 500"),
            (
                vec![("failedAfter", "yesterday")],
                "failedAfter",
                "failedAfter must be an RFC 3339 timestamp",
            ),
            (
                vec![
                    ("failedAfter", "2025-01-02T00:00:00Z"),
                    ("failedBefore", "2025-01-02T00:00:00Z"),
                ],
                "failedAfter",
                "failedAfter must be earlier than failedBefore",
            ),
            (vec![("cursor", "zz")], "cursor", "cursor is malformed"),
            (vec![("cursor", "7031")], "cursor", "cursor is malformed"),
            (vec![("foo", "1")], "foo", "unknown query parameter `foo`"),
            (
                vec![("limit", "1"), ("limit", "2")],
                "limit",
                "`limit` is given more than once",
            ),
            (vec![("eventType", "")], "eventType", "eventType must not be empty"),
        ] {
            let problem = rejection(&query);
            assert_eq!(problem.status, StatusCode::BAD_REQUEST);
            assert_eq!(problem.field.as_deref(), Some(field), "{query:?}");
            assert!(problem.error.contains(message), "{query:?}: {}", problem.error);
        }
        let long = "x".repeat(257);
        assert!(rejection(&[("aggregateId", &long)]).error.contains("at most 256 bytes"));
    }

    #[test]
    fn cursors_round_trip_and_reject_tampering() {
        for position in [0, 1, 4_200, i64::MAX] {
            assert_eq!(decode_cursor(&encode_cursor(position)).unwrap(), position);
        }
        let negative: String = "p1:-5".bytes().map(|b| format!("{b:02x}")).collect();
        assert!(decode_cursor(&negative).is_err());
        assert!(decode_cursor("").is_err());
        assert!(decode_cursor("é1").is_err());
    }

    #[test]
    fn bearer_tokens_are_checked_exactly() {
        let header = |v: &str| HeaderValue::from_str(v).unwrap();
        assert_eq!(check_bearer(Some(&header("Bearer s3cret")), "s3cret"), Ok(()));
        assert_eq!(check_bearer(Some(&header("bearer s3cret")), "s3cret"), Ok(()));
        assert_eq!(check_bearer(None, "s3cret"), Err(AuthFailure::Missing));
        assert_eq!(
            check_bearer(Some(&header("Basic s3cret")), "s3cret"),
            Err(AuthFailure::Malformed)
        );
        assert_eq!(
            check_bearer(Some(&header("Bearer")), "s3cret"),
            Err(AuthFailure::Malformed)
        );
        assert_eq!(
            check_bearer(Some(&header("Bearer s3cre")), "s3cret"),
            Err(AuthFailure::Wrong)
        );
        assert_eq!(
            check_bearer(Some(&header("Bearer s3cretx")), "s3cret"),
            Err(AuthFailure::Wrong)
        );
        assert_eq!(check_bearer(Some(&header("Bearer x")), ""), Err(AuthFailure::Wrong));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn the_openapi_document_describes_every_route_and_schema() {
        let doc = openapi_document();
        assert_eq!(doc["openapi"], "3.1.0");
        for path in [
            "/livez",
            "/readyz",
            "/metrics",
            "/api/v1/openapi.json",
            "/api/v1/failed-events",
            "/api/v1/failed-events/retry",
            "/api/v1/failed-events/{eventId}/retry",
            "/api/v1/failed-events/{eventId}/resolve",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
        for schema in [
            "FailedPage",
            "FailedEventRecord",
            "FailedEventStatus",
            "RetryResult",
            "RetryManyRequest",
            "RetryManyResult",
            "ResolveRequest",
            "ApiError",
        ] {
            assert!(doc["components"]["schemas"][schema].is_object(), "{schema} missing");
        }
        let text = doc.to_string();
        assert!(
            !text.contains("#/$defs"),
            "all references point into components: {text}"
        );
        assert_eq!(
            doc["paths"]["/api/v1/failed-events"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/FailedPage"
        );
    }

    #[test]
    fn long_values_are_shortened_before_they_are_echoed() {
        assert_eq!(echo("short"), "short");
        let long = "é".repeat(40);
        let shown = echo(&long);
        assert!(shown.ends_with("...") && shown.len() <= 67, "{shown}");
    }
}
