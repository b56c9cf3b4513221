//! The schema registry over the Confluent Schema Registry REST API (JSON Schema only), so
//! Kafka consumers' stock deserializers (Confluent's Java, Python, Go, .NET clients and
//! compatible ones) find the schema of each message by the id it carries.
//!
//! Every route is a thin translation of [`SchemaRegistry`]: compatibility decisions, ids and
//! deletion rules are the Rust API's. Responses use `application/vnd.schemaregistry.v1+json`;
//! errors answer Confluent's body `{"error_code": ..., "message": ...}` with its codes
//! (40401 subject not found, 40402 version not found, 40403 schema not found, 409
//! incompatible, 42201 invalid schema, 42202 invalid version, 42203 invalid compatibility
//! level, 40101 unauthenticated, ...). Writes need the admin token (`Authorization: Bearer
//! <token>`, or HTTP Basic with the token as password, which is what `basic.auth.user.info`
//! sends); reads need it only when the server is configured so.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use super::compatibility::CompatibilityMode;
use super::registry::{RegistryError, SchemaRegistry, SchemaVersion, VersionSelector};

/// The content type of every response (and the preferred one of requests).
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";
/// The only schema type this registry holds.
pub const SCHEMA_TYPE: &str = "JSON";
/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Requests taking longer than this are answered with `408 Request Timeout`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the registry server needs; cheap to clone (one per request).
#[derive(Clone, Debug)]
pub struct RegistryApiState {
    /// The store-backed registry.
    pub registry: SchemaRegistry,
    /// The admin token writes need.
    pub token: Arc<str>,
    /// Whether reads need the token too.
    pub protect_reads: bool,
}

/// A Confluent error response.
#[derive(Debug, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// Confluent's `error_code` (the status, or the status followed by a detail digit pair).
    pub code: u32,
    /// Names the problem.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn subject_not_found(subject: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, 40401, format!("Subject '{subject}' not found."))
    }

    fn invalid_schema(reason: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            format!("Invalid schema: {reason}"),
        )
    }

    fn invalid_version(text: &str) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42202,
            format!(
                "The specified version '{}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\"",
                echo(text)
            ),
        )
    }

    fn invalid_compatibility(text: &str) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42203,
            format!(
                "Invalid compatibility level '{}'. Valid values are none, backward, forward, full, backward_transitive, forward_transitive, and full_transitive",
                echo(text)
            ),
        )
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, 400, message)
    }

    fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, 40101, message)
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        use RegistryError as E;
        match error {
            E::InvalidSchema { reason, .. } => Self::invalid_schema(reason),
            E::Incompatible { subject, mode, reasons } => {
                let details: Vec<String> = reasons.iter().map(ToString::to_string).collect();
                Self::new(
                    StatusCode::CONFLICT,
                    409,
                    format!(
                        "Schema being registered is incompatible with an earlier schema for subject \"{subject}\" under {mode}, details: [{}]",
                        details.join("; ")
                    ),
                )
            }
            E::SubjectNotFound { subject } => Self::subject_not_found(&subject),
            E::UnknownVersion { version: 0, .. } => {
                Self::new(StatusCode::NOT_FOUND, 40402, "Version latest not found.")
            }
            E::UnknownVersion { version, .. } => {
                Self::new(StatusCode::NOT_FOUND, 40402, format!("Version {version} not found."))
            }
            E::SchemaNotFound { subject } => Self::new(
                StatusCode::NOT_FOUND,
                40403,
                format!("Schema not found under subject '{subject}'."),
            ),
            E::SchemaIdNotFound { id } => Self::new(StatusCode::NOT_FOUND, 40403, format!("Schema {id} not found")),
            E::SubjectSoftDeleted { subject } => Self::new(
                StatusCode::NOT_FOUND,
                40404,
                format!("Subject '{subject}' was soft deleted.Set permanent=true to delete permanently"),
            ),
            E::SubjectNotSoftDeleted { subject } => Self::new(
                StatusCode::NOT_FOUND,
                40405,
                format!("Subject '{subject}' was not deleted first before being permanently deleted"),
            ),
            E::VersionSoftDeleted { subject, version } => Self::new(
                StatusCode::NOT_FOUND,
                40406,
                format!(
                    "Subject '{subject}' Version {version} was soft deleted.Set permanent=true to delete permanently"
                ),
            ),
            E::VersionNotSoftDeleted { subject, version } => Self::new(
                StatusCode::NOT_FOUND,
                40407,
                format!("Subject '{subject}' Version {version} was not deleted first before being permanently deleted"),
            ),
            e @ (E::StoredMode { .. } | E::Store(_)) => {
                tracing::error!(error = %e, "schema registry store error");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    50001,
                    "Error in the backend data store; see the registry logs",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = reply(self.status, &json!({"error_code": self.code, "message": self.message}));
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer, Basic realm=\"schema-registry\""),
            );
        }
        response
    }
}

/// A JSON response in the registry's content type.
fn reply(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

fn ok(body: Value) -> Result<Response, ApiError> {
    Ok(reply(StatusCode::OK, &body))
}

/// Shortens a client-supplied value before it is echoed in a message.
fn echo(value: &str) -> String {
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

/// Builds the registry server with a body size limit and a request timeout.
pub fn router(state: RegistryApiState) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/schemas/types", get(schema_types))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(raw_schema_by_id))
        .route("/schemas/ids/{id}/subjects", get(subjects_of_id))
        .route("/schemas/ids/{id}/versions", get(versions_of_id))
        .route("/subjects", get(list_subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route("/subjects/{subject}/versions", get(list_versions).post(register))
        .route(
            "/subjects/{subject}/versions/{version}",
            get(get_version).delete(delete_version),
        )
        .route("/subjects/{subject}/versions/{version}/schema", get(raw_version))
        .route("/config", get(get_global_config).put(put_global_config))
        .route(
            "/config/{subject}",
            get(get_subject_config)
                .put(put_subject_config)
                .delete(delete_subject_config),
        )
        .route("/compatibility/subjects/{subject}/versions", post(check_all))
        .route("/compatibility/subjects/{subject}/versions/{version}", post(check_one))
        .route("/mode", get(mode))
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
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        404,
        format!(
            "HTTP 404 Not Found: no route for {} {}",
            request.method(),
            echo(request.uri().path())
        ),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        405,
        format!(
            "HTTP 405 Method Not Allowed: {} is not allowed on {}",
            request.method(),
            echo(request.uri().path())
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------------

/// Whether a request is a write (always needs the token) or a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

/// Lets the request through when it carries the admin token, or is a read on an open server.
fn authorize(state: &RegistryApiState, headers: &HeaderMap, access: Access) -> Result<(), ApiError> {
    if access == Access::Read && !state.protect_reads {
        return Ok(());
    }
    let what = match access {
        Access::Read => "reading this registry",
        Access::Write => "changing the registry",
    };
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(&format!(
            "{what} needs the admin token: send `Authorization: Bearer <token>` or HTTP Basic with the token as password"
        )));
    };
    match presented_token(value) {
        Some(token) if !state.token.is_empty() && constant_time_eq(token.as_bytes(), state.token.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::unauthorized("invalid admin token")),
        None => Err(ApiError::unauthorized(
            "malformed Authorization header: expected `Bearer <token>` or `Basic <base64 user:token>`",
        )),
    }
}

/// The token of a `Bearer` header, or the password of a `Basic` one.
fn presented_token(value: &HeaderValue) -> Option<String> {
    let (scheme, rest) = value.to_str().ok()?.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        return Some(rest.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = String::from_utf8(base64_decode(rest)?).ok()?;
        let (_, password) = decoded.split_once(':')?;
        return (!password.is_empty()).then(|| password.to_owned());
    }
    None
}

/// Standard base64 with padding (what HTTP Basic uses); `None` on anything else.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    }
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let [_, a, b, c] = n.to_be_bytes();
        out.extend_from_slice(&[a, b, c][..3 - pad]);
    }
    Some(out)
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    std::hint::black_box(diff) == 0
}

// ---------------------------------------------------------------------------------------------
// Request parsing
// ---------------------------------------------------------------------------------------------

type Params = Query<Vec<(String, String)>>;

/// A boolean query parameter; clients send `true`, `True`, `false`, ...
fn flag(params: &[(String, String)], name: &str) -> Result<bool, ApiError> {
    match params.iter().rev().find(|(k, _)| k == name) {
        None => Ok(false),
        Some((_, v)) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some((_, v)) if v.eq_ignore_ascii_case("false") || v.is_empty() => Ok(false),
        Some((_, v)) => Err(ApiError::bad_request(format!(
            "query parameter {name} must be true or false, not '{}'",
            echo(v)
        ))),
    }
}

fn param<'p>(params: &'p [(String, String)], name: &str) -> Option<&'p str> {
    params.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Applies `offset` and `limit` (-1 = no limit) to a listing.
fn page<T>(items: Vec<T>, params: &[(String, String)]) -> Result<Vec<T>, ApiError> {
    let number = |name: &str, default: i64| match param(params, name) {
        None => Ok(default),
        Some(v) => v.parse::<i64>().map_err(|_| {
            ApiError::bad_request(format!("query parameter {name} must be an integer, not '{}'", echo(v)))
        }),
    };
    let offset = usize::try_from(number("offset", 0)?.max(0)).unwrap_or(usize::MAX);
    let limit = number("limit", -1)?;
    let items = items.into_iter().skip(offset);
    Ok(match usize::try_from(limit) {
        Ok(limit) if limit > 0 => items.take(limit).collect(),
        _ => items.collect(),
    })
}

fn subject_of(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(subject) = path.map_err(|e| ApiError::bad_request(format!("bad subject in path: {e}")))?;
    if subject.trim().is_empty() {
        return Err(ApiError::bad_request("the subject name is empty"));
    }
    Ok(subject)
}

fn subject_and_version(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(String, VersionSelector), ApiError> {
    let Path((subject, version)) = path.map_err(|e| ApiError::bad_request(format!("bad path: {e}")))?;
    Ok((subject, parse_version(&version)?))
}

/// `latest`, `-1` (Confluent's alias of latest) or a number in [1, 2^31-1].
pub fn parse_version(text: &str) -> Result<VersionSelector, ApiError> {
    if text.eq_ignore_ascii_case("latest") || text == "-1" {
        return Ok(VersionSelector::Latest);
    }
    match text.parse::<u32>() {
        Ok(n) if (1..=i32::MAX as u32).contains(&n) => Ok(VersionSelector::Number(n)),
        _ => Err(ApiError::invalid_version(text)),
    }
}

fn schema_id_of(path: Result<Path<String>, PathRejection>) -> Result<u32, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::bad_request(format!("bad schema id in path: {e}")))?;
    match id.parse::<u32>() {
        Ok(n) if (1..=i32::MAX as u32).contains(&n) => Ok(n),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            40403,
            format!("Schema {} not found", echo(&id)),
        )),
    }
}

/// The schema of a register / lookup / compatibility request body.
pub fn parse_schema_request(body: &[u8]) -> Result<Value, ApiError> {
    let request: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            422,
            format!("Unprocessable request body: {e}"),
        )
    })?;
    let Some(fields) = request.as_object() else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            422,
            "Unprocessable request body: expected a JSON object with a \"schema\" field",
        ));
    };
    // Confluent's protocol: a missing schemaType means AVRO.
    let schema_type = fields.get("schemaType").and_then(Value::as_str).unwrap_or("AVRO");
    if !schema_type.eq_ignore_ascii_case(SCHEMA_TYPE) {
        return Err(ApiError::invalid_schema(format!(
            "schemaType {} is not supported; this registry holds JSON Schema only (send \"schemaType\": \"JSON\")",
            echo(schema_type)
        )));
    }
    if fields
        .get("references")
        .and_then(Value::as_array)
        .is_some_and(|r| !r.is_empty())
    {
        return Err(ApiError::invalid_schema(
            "schema references are not supported; send a self-contained schema ($defs within the document)",
        ));
    }
    let text = match fields.get("schema") {
        Some(Value::String(text)) => text,
        Some(_) => {
            return Err(ApiError::invalid_schema(
                "\"schema\" must be a string holding the JSON Schema",
            ));
        }
        None => return Err(ApiError::invalid_schema("the request has no \"schema\" field")),
    };
    let schema: Value =
        serde_json::from_str(text).map_err(|e| ApiError::invalid_schema(format!("the schema is not JSON: {e}")))?;
    if !matches!(schema, Value::Object(_) | Value::Bool(_)) {
        return Err(ApiError::invalid_schema("a JSON Schema must be an object or a boolean"));
    }
    Ok(schema)
}

/// The compatibility level of a `PUT /config` body (`compatibility` or `compatibilityLevel`).
fn parse_config_request(body: &[u8]) -> Result<CompatibilityMode, ApiError> {
    let request: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            422,
            format!("Unprocessable request body: {e}"),
        )
    })?;
    let level = request
        .get("compatibility")
        .or_else(|| request.get("compatibilityLevel"))
        .ok_or_else(|| ApiError::invalid_compatibility("(missing: send {\"compatibility\": \"BACKWARD\"})"))?;
    let text = level.as_str().unwrap_or_default();
    text.parse().map_err(|_| ApiError::invalid_compatibility(text))
}

fn version_body(v: &SchemaVersion) -> Value {
    json!({
        "subject": v.subject,
        "version": v.version,
        "id": v.id,
        "schemaType": SCHEMA_TYPE,
        "schema": v.schema.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------------

async fn root(State(state): State<RegistryApiState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Read)?;
    ok(json!({}))
}

async fn mode(State(state): State<RegistryApiState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Read)?;
    ok(json!({"mode": "READWRITE"}))
}

async fn schema_types(State(state): State<RegistryApiState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Read)?;
    ok(json!([SCHEMA_TYPE]))
}

async fn schema_by_id(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Read)?;
    let id = schema_id_of(path)?;
    let schema = state.registry.schema_by_id(id).await?;
    ok(json!({"schemaType": SCHEMA_TYPE, "schema": schema.to_string()}))
}

async fn raw_schema_by_id(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Read)?;
    let id = schema_id_of(path)?;
    ok(state.registry.schema_by_id(id).await?)
}

async fn subjects_of_id(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Read)?;
    let id = schema_id_of(path)?;
    let deleted = flag(&params, "deleted")?;
    let subjects: BTreeSet<String> = state
        .registry
        .versions_of_id(id, deleted)
        .await?
        .into_iter()
        .map(|v| v.subject)
        .collect();
    ok(json!(page(subjects.into_iter().collect(), &params)?))
}

async fn versions_of_id(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Read)?;
    let id = schema_id_of(path)?;
    let deleted = flag(&params, "deleted")?;
    let pairs: Vec<Value> = state
        .registry
        .versions_of_id(id, deleted)
        .await?
        .into_iter()
        .map(|v| json!({"subject": v.subject, "version": v.version}))
        .collect();
    ok(json!(page(pairs, &params)?))
}

async fn list_subjects(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    Query(params): Params,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Read)?;
    let mut subjects = if flag(&params, "deleted_only")? {
        state.registry.deleted_subjects().await?
    } else {
        state.registry.subjects(flag(&params, "deleted")?).await?
    };
    if let Some(prefix) = param(&params, "subjectPrefix").filter(|p| !p.is_empty() && *p != ":*:") {
        subjects.retain(|s| s.starts_with(prefix));
    }
    ok(json!(page(subjects, &params)?))
}

async fn list_versions(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Read)?;
    let subject = subject_of(path)?;
    let deleted = flag(&params, "deleted")? || flag(&params, "deleted_only")?;
    let mut versions = state.registry.all_versions(&subject, deleted).await?;
    if flag(&params, "deleted_only")? {
        versions.retain(|v| v.deleted);
    }
    if versions.is_empty() {
        return Err(ApiError::subject_not_found(&subject));
    }
    let numbers: Vec<u32> = versions.iter().map(|v| v.version).collect();
    ok(json!(page(numbers, &params)?))
}

async fn get_version(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Read)?;
    let (subject, selector) = subject_and_version(path)?;
    let version = state
        .registry
        .version(&subject, selector, flag(&params, "deleted")?)
        .await?;
    ok(version_body(&version))
}

async fn raw_version(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Read)?;
    let (subject, selector) = subject_and_version(path)?;
    let version = state
        .registry
        .version(&subject, selector, flag(&params, "deleted")?)
        .await?;
    ok(version.schema)
}

async fn register(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Write)?;
    let subject = subject_of(path)?;
    let schema = parse_schema_request(&body)?;
    let registered = state.registry.register_version(&subject, &schema, None).await?;
    tracing::info!(subject = %subject, version = registered.version, id = registered.id, "schema registered");
    ok(json!({"id": registered.id, "version": registered.version, "subject": subject}))
}

async fn lookup(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    Query(params): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Read)?;
    let subject = subject_of(path)?;
    let schema = parse_schema_request(&body)?;
    let found = state
        .registry
        .lookup(&subject, &schema, flag(&params, "deleted")?)
        .await?;
    ok(version_body(&found))
}

async fn delete_subject(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Write)?;
    let subject = subject_of(path)?;
    let permanent = flag(&params, "permanent")?;
    let versions = state.registry.delete_subject(&subject, permanent).await?;
    tracing::info!(subject = %subject, permanent, ?versions, "subject deleted");
    ok(json!(versions))
}

async fn delete_version(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Write)?;
    let (subject, selector) = subject_and_version(path)?;
    let permanent = flag(&params, "permanent")?;
    let version = state.registry.delete_version(&subject, selector, permanent).await?;
    tracing::info!(subject = %subject, version, permanent, "schema version deleted");
    ok(json!(version))
}

async fn get_global_config(State(state): State<RegistryApiState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Read)?;
    let mode = state.registry.global_compatibility().await?;
    ok(json!({"compatibilityLevel": mode}))
}

async fn put_global_config(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Write)?;
    let mode = parse_config_request(&body)?;
    state.registry.set_global_compatibility(mode).await?;
    tracing::info!(%mode, "global compatibility level set");
    ok(json!({"compatibility": mode}))
}

async fn get_subject_config(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Read)?;
    let subject = subject_of(path)?;
    match state.registry.subject_compatibility(&subject).await? {
        Some(mode) => ok(json!({"compatibilityLevel": mode})),
        None if flag(&params, "defaultToGlobal")? => {
            ok(json!({"compatibilityLevel": state.registry.global_compatibility().await?}))
        }
        None => Err(no_subject_config(&subject)),
    }
}

fn no_subject_config(subject: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        40408,
        format!("Subject '{subject}' does not have subject-level compatibility configured"),
    )
}

async fn put_subject_config(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Write)?;
    let subject = subject_of(path)?;
    let mode = parse_config_request(&body)?;
    state.registry.set_compatibility(&subject, mode).await?;
    tracing::info!(subject = %subject, %mode, "subject compatibility level set");
    ok(json!({"compatibility": mode}))
}

async fn delete_subject_config(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Write)?;
    let subject = subject_of(path)?;
    match state.registry.clear_compatibility(&subject).await? {
        Some(previous) => ok(json!({"compatibilityLevel": previous})),
        None => Err(no_subject_config(&subject)),
    }
}

async fn check_all(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    Query(params): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Read)?;
    let subject = subject_of(path)?;
    check(&state, &subject, None, &params, &body).await
}

async fn check_one(
    State(state): State<RegistryApiState>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    Query(params): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::Read)?;
    let (subject, selector) = subject_and_version(path)?;
    check(&state, &subject, Some(selector), &params, &body).await
}

async fn check(
    state: &RegistryApiState,
    subject: &str,
    against: Option<VersionSelector>,
    params: &[(String, String)],
    body: &[u8],
) -> Result<Response, ApiError> {
    let schema = parse_schema_request(body)?;
    let found = state.registry.check_compatibility(subject, &schema, against).await?;
    let mut answer = json!({"is_compatible": found.is_empty()});
    if flag(params, "verbose")? {
        answer["messages"] = json!(found.iter().map(ToString::to_string).collect::<Vec<_>>());
    }
    ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(value: &str) -> HeaderValue {
        HeaderValue::from_str(value).expect("header")
    }

    #[test]
    fn tokens_come_from_bearer_or_the_basic_password() {
        assert_eq!(
            presented_token(&header("Bearer s3cret-token")).as_deref(),
            Some("s3cret-token")
        );
        // "admin:s3cret-token"
        assert_eq!(
            presented_token(&header("Basic YWRtaW46czNjcmV0LXRva2Vu")).as_deref(),
            Some("s3cret-token")
        );
        assert_eq!(presented_token(&header("Basic !!!")), None);
        assert_eq!(presented_token(&header("Basic YWRtaW4=")), None, "no password");
        assert_eq!(presented_token(&header("Digest x")), None);
        assert_eq!(base64_decode("YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(base64_decode("YWI=").as_deref(), Some(&b"ab"[..]));
        assert_eq!(base64_decode("YWJj").as_deref(), Some(&b"abc"[..]));
    }

    #[test]
    fn versions_are_latest_or_a_positive_32_bit_number() {
        assert_eq!(parse_version("latest"), Ok(VersionSelector::Latest));
        assert_eq!(parse_version("-1"), Ok(VersionSelector::Latest));
        assert_eq!(parse_version("7"), Ok(VersionSelector::Number(7)));
        for bad in ["0", "-2", "2147483648", "one", ""] {
            let error = parse_version(bad).expect_err(bad);
            assert_eq!(
                (error.status, error.code),
                (StatusCode::UNPROCESSABLE_ENTITY, 42202),
                "{bad}"
            );
            assert!(error.message.contains(&format!("'{bad}'")), "{}", error.message);
        }
    }

    #[test]
    fn schema_requests_must_be_self_contained_json_schema() {
        let ok = parse_schema_request(br#"{"schemaType":"JSON","schema":"{\"type\":\"object\"}"}"#);
        assert_eq!(ok, Ok(json!({"type": "object"})));
        let cases: [(&[u8], u32, &str); 6] = [
            (br#"{"schema":"{}"}"#, 42201, "schemaType AVRO is not supported"),
            (br#"{"schemaType":"PROTOBUF","schema":"{}"}"#, 42201, "PROTOBUF"),
            (
                br#"{"schemaType":"JSON","schema":"{not json"}"#,
                42201,
                "the schema is not JSON",
            ),
            (br#"{"schemaType":"JSON"}"#, 42201, "no \"schema\" field"),
            (
                br#"{"schemaType":"JSON","schema":"{}","references":[{"name":"a","subject":"b","version":1}]}"#,
                42201,
                "references are not supported",
            ),
            (b"[", 422, "Unprocessable request body"),
        ];
        for (body, code, text) in cases {
            let error = parse_schema_request(body).expect_err(text);
            assert_eq!(error.code, code, "{}", error.message);
            assert!(error.message.contains(text), "{}", error.message);
        }
    }

    #[test]
    fn config_bodies_name_a_known_level() {
        assert_eq!(
            parse_config_request(br#"{"compatibility":"full_transitive"}"#),
            Ok(CompatibilityMode::FullTransitive)
        );
        assert_eq!(
            parse_config_request(br#"{"compatibilityLevel":"NONE"}"#),
            Ok(CompatibilityMode::None)
        );
        let error = parse_config_request(br#"{"compatibility":"SIDEWAYS"}"#).expect_err("unknown");
        assert_eq!(error.code, 42203);
        assert!(error.message.contains("'SIDEWAYS'"), "{}", error.message);
    }

    #[test]
    fn registry_errors_map_to_confluent_codes() {
        let code = |e: RegistryError| ApiError::from(e).code;
        let s = || "orders-value".to_owned();
        assert_eq!(code(RegistryError::SubjectNotFound { subject: s() }), 40401);
        assert_eq!(
            code(RegistryError::UnknownVersion {
                subject: s(),
                version: 3
            }),
            40402
        );
        assert_eq!(code(RegistryError::SchemaNotFound { subject: s() }), 40403);
        assert_eq!(code(RegistryError::SchemaIdNotFound { id: 9 }), 40403);
        assert_eq!(code(RegistryError::SubjectSoftDeleted { subject: s() }), 40404);
        assert_eq!(code(RegistryError::SubjectNotSoftDeleted { subject: s() }), 40405);
        assert_eq!(
            code(RegistryError::VersionSoftDeleted {
                subject: s(),
                version: 1
            }),
            40406
        );
        assert_eq!(
            code(RegistryError::VersionNotSoftDeleted {
                subject: s(),
                version: 1
            }),
            40407
        );
        let conflict = ApiError::from(RegistryError::Incompatible {
            subject: s(),
            mode: CompatibilityMode::Backward,
            reasons: vec![],
        });
        assert_eq!((conflict.status, conflict.code), (StatusCode::CONFLICT, 409));
        assert!(conflict.message.contains("\"orders-value\""), "{}", conflict.message);
    }
}
