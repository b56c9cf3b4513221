//! The admin API client and the `admin` subcommand built on it: list, retry and resolve
//! failed events of a relay worker.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

pub use super::api::{
    ApiError, FailedEventRecord, FailedEventStatus, FailedPage, ResolveRequest, RetryManyRequest, RetryManyResult,
    RetryResult,
};

/// Errors of the admin client.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// The base URL is not an absolute http(s) URL.
    #[error("invalid admin API URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("build HTTP client: {0}")]
    Build(#[source] reqwest::Error),
    /// The request did not get an answer (connection refused, timeout, ...).
    #[error("{method} {url}: {source}")]
    Transport {
        /// The request method.
        method: Method,
        /// The request URL.
        url: Url,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status; `message` is its `error` field.
    #[error("admin API answered {status}: {message}")]
    Api {
        /// The HTTP status code.
        status: u16,
        /// The server's error message (or the raw body when it was not an API error).
        message: String,
        /// The offending parameter or field, when the server named one.
        field: Option<String>,
    },
    /// The server answered 2xx with a body this client does not understand.
    #[error("decode admin API answer from {url}: {reason}")]
    Decode {
        /// The request URL.
        url: Url,
        /// The decoding error.
        reason: String,
    },
}

impl AdminClientError {
    /// The HTTP status of an API error, if the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Filters and paging of [`AdminClient::list_failed`]; every field is optional.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListFailedParams {
    /// Only these statuses (all when empty).
    pub statuses: Vec<FailedEventStatus>,
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only this aggregate id.
    pub aggregate_id: Option<String>,
    /// Only events that first failed at or after this time.
    pub failed_after: Option<DateTime<Utc>>,
    /// Only events that first failed before this time.
    pub failed_before: Option<DateTime<Utc>>,
    /// The `nextCursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size (1 to 500; the server's default when None).
    pub limit: Option<u32>,
}

impl ListFailedParams {
    /// The query-string pairs of these parameters.
    fn query(&self) -> Vec<(&'static str, String)> {
        let time = |t: &DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
        let mut pairs = Vec::new();
        if !self.statuses.is_empty() {
            let statuses: Vec<&str> = self.statuses.iter().map(|s| s.as_str()).collect();
            pairs.push(("status", statuses.join(",")));
        }
        if let Some(v) = &self.event_type {
            pairs.push(("eventType", v.clone()));
        }
        if let Some(v) = &self.aggregate_id {
            pairs.push(("aggregateId", v.clone()));
        }
        if let Some(v) = &self.failed_after {
            pairs.push(("failedAfter", time(v)));
        }
        if let Some(v) = &self.failed_before {
            pairs.push(("failedBefore", time(v)));
        }
        if let Some(v) = &self.cursor {
            pairs.push(("cursor", v.clone()));
        }
        if let Some(v) = self.limit {
            pairs.push(("limit", v.to_string()));
        }
        pairs
    }
}

/// A client of one relay worker's admin API.
#[derive(Clone)]
pub struct AdminClient {
    /// The HTTP client (connection pool, timeouts).
    http: reqwest::Client,
    /// The API base URL, ending with a slash.
    base: Url,
    /// The bearer token; never logged.
    token: String,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token stays out of logs and panic messages.
        f.debug_struct("AdminClient")
            .field("base", &self.base.as_str())
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// Creates a client of the admin API at `base_url` (e.g. `http://relay:9090`), sending
    /// `token` as the bearer token.
    pub fn new(base_url: &str, token: String) -> Result<Self, AdminClientError> {
        let invalid = |reason: &str| AdminClientError::InvalidUrl {
            url: base_url.to_owned(),
            reason: reason.to_owned(),
        };
        let mut base = Url::parse(base_url).map_err(|e| invalid(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(invalid("use an http:// or https:// URL"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(invalid("the URL must not have a query or fragment"));
        }
        // Relative joins keep a path prefix only when the base ends with a slash.
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("inventory-outbox-admin/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(AdminClientError::Build)?;
        Ok(Self { http, base, token })
    }

    /// Lists one page of failed events.
    pub async fn list_failed(&self, params: &ListFailedParams) -> Result<FailedPage, AdminClientError> {
        self.send(Method::GET, "api/v1/failed-events", &params.query(), None::<&()>)
            .await
    }

    /// Lists every failed event matching `params`, following cursors from `params.cursor`.
    pub async fn list_all_failed(&self, params: &ListFailedParams) -> Result<Vec<FailedEventRecord>, AdminClientError> {
        let mut params = params.clone();
        let mut items = Vec::new();
        loop {
            let page = self.list_failed(&params).await?;
            items.extend(page.items);
            match page.next_cursor {
                Some(cursor) => params.cursor = Some(cursor),
                None => return Ok(items),
            }
        }
    }

    /// Schedules an immediate attempt of one dead-lettered or retrying event.
    pub async fn retry(&self, event_id: Uuid) -> Result<RetryResult, AdminClientError> {
        self.send(
            Method::POST,
            &format!("api/v1/failed-events/{event_id}/retry"),
            &[],
            None::<&()>,
        )
        .await
    }

    /// Retries up to 500 events; ids with no retryable failed event come back in `not_found`.
    pub async fn retry_many(&self, event_ids: &[Uuid]) -> Result<RetryManyResult, AdminClientError> {
        let body = RetryManyRequest {
            event_ids: event_ids.iter().map(Uuid::to_string).collect(),
        };
        self.send(Method::POST, "api/v1/failed-events/retry", &[], Some(&body))
            .await
    }

    /// Discards a failed event with `reason`; returns the event as it was before.
    pub async fn resolve(&self, event_id: Uuid, reason: &str) -> Result<FailedEventRecord, AdminClientError> {
        let body = ResolveRequest {
            reason: reason.to_owned(),
        };
        self.send(
            Method::POST,
            &format!("api/v1/failed-events/{event_id}/resolve"),
            &[],
            Some(&body),
        )
        .await
    }

    /// Sends one request and decodes a 2xx JSON answer; other statuses become [`AdminClientError::Api`].
    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&'static str, String)],
        body: Option<&impl Serialize>,
    ) -> Result<T, AdminClientError> {
        let url = self.base.join(path).map_err(|e| AdminClientError::InvalidUrl {
            url: format!("{}{path}", self.base),
            reason: e.to_string(),
        })?;
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .bearer_auth(&self.token)
            .query(query);
        if let Some(body) = body {
            request = request.json(body);
        }
        let transport = |source| AdminClientError::Transport {
            method: method.clone(),
            url: url.clone(),
            source,
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(transport)?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| AdminClientError::Decode {
            url,
            reason: e.to_string(),
        })
    }
}

/// Turns an error answer into [`AdminClientError::Api`], preferring the server's message.
fn api_error(status: StatusCode, body: &[u8]) -> AdminClientError {
    let (message, field) = match serde_json::from_slice::<ApiError>(body) {
        Ok(error) => (error.error, error.field),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            let message = if text.is_empty() {
                status.canonical_reason().unwrap_or("no message").to_owned()
            } else {
                text.chars().take(500).collect()
            };
            (message, None)
        }
    };
    AdminClientError::Api {
        status: status.as_u16(),
        message,
        field,
    }
}

// ---------------------------------------------------------------------------------------------
// The `admin` subcommand
// ---------------------------------------------------------------------------------------------

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    #[default]
    Table,
    /// The API's JSON, pretty-printed.
    Json,
}

/// Administer failed and dead-lettered events through a relay worker's admin API.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// Base URL of the relay worker's admin API, e.g. http://localhost:9090.
    #[arg(long, global = true, env = "ADMIN_URL")]
    pub url: Option<String>,
    /// File holding the admin bearer token (the token itself is never taken on the command line).
    #[arg(long, global = true, env = "ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// The admin actions.
#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// List failed events (oldest first).
    List(ListArgs),
    /// Retry dead-lettered or retrying events now (one request for several ids).
    Retry {
        /// The events to retry (up to 500).
        #[arg(required = true, num_args = 1..=500)]
        event_ids: Vec<Uuid>,
    },
    /// Discard a failed event with a reason; it will not be delivered.
    Resolve {
        /// The event to resolve.
        event_id: Uuid,
        /// Why it is discarded (kept on the failed event).
        #[arg(long)]
        reason: String,
    },
}

/// Filters of `admin list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only these statuses (comma-separated): retrying, held, dead_lettered, resolved, delivered.
    #[arg(long, value_delimiter = ',', value_parser = parse_status)]
    pub status: Vec<FailedEventStatus>,
    /// Only this event type.
    #[arg(long)]
    pub event_type: Option<String>,
    /// Only this aggregate id.
    #[arg(long)]
    pub aggregate_id: Option<String>,
    /// Only events that first failed at or after this RFC 3339 time.
    #[arg(long)]
    pub failed_after: Option<DateTime<Utc>>,
    /// Only events that first failed before this RFC 3339 time.
    #[arg(long)]
    pub failed_before: Option<DateTime<Utc>>,
    /// Page size (1 to 500).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub limit: u32,
    /// Continue after this cursor (printed after a page that has more).
    #[arg(long)]
    pub cursor: Option<String>,
    /// Follow cursors and print every matching event.
    #[arg(long)]
    pub all_pages: bool,
}

/// Parses one `--status` value.
fn parse_status(value: &str) -> Result<FailedEventStatus, String> {
    FailedEventStatus::parse(value.trim())
        .ok_or_else(|| format!("unknown status `{value}`; allowed: {}", FailedEventStatus::allowed()))
}

/// Reads the bearer token from a file (trailing whitespace trimmed). Never prints the token.
fn read_token(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("read admin token file {}: {e}", path.display()))?;
    let token = text.trim();
    anyhow::ensure!(!token.is_empty(), "admin token file {} is empty", path.display());
    anyhow::ensure!(
        !token.contains(char::is_whitespace),
        "admin token file {} must hold one token without whitespace",
        path.display()
    );
    Ok(token.to_owned())
}

/// Runs the `admin` subcommand, printing to stdout. Fails when the server refuses a request or
/// any requested event was not found.
pub async fn run_cli(args: AdminArgs) -> anyhow::Result<()> {
    let url = args
        .url
        .ok_or_else(|| anyhow::anyhow!("the admin API URL is required: pass --url or set ADMIN_URL"))?;
    let token_file = args
        .token_file
        .ok_or_else(|| anyhow::anyhow!("the admin token is required: pass --token-file or set ADMIN_TOKEN_FILE"))?;
    let client = AdminClient::new(&url, read_token(&token_file)?)?;
    let mut out = std::io::stdout().lock();
    match args.command {
        AdminCommand::List(list) => {
            let params = ListFailedParams {
                statuses: list.status,
                event_type: list.event_type,
                aggregate_id: list.aggregate_id,
                failed_after: list.failed_after,
                failed_before: list.failed_before,
                cursor: list.cursor,
                limit: Some(list.limit),
            };
            let page = if list.all_pages {
                FailedPage {
                    items: client.list_all_failed(&params).await?,
                    next_cursor: None,
                }
            } else {
                client.list_failed(&params).await?
            };
            match args.output {
                OutputFormat::Json => print_json(&mut out, &page)?,
                OutputFormat::Table => {
                    write!(out, "{}", failed_table(&page.items))?;
                    if let Some(cursor) = &page.next_cursor {
                        writeln!(out, "\nmore events: rerun with --cursor {cursor} (or --all-pages)")?;
                    }
                }
            }
        }
        AdminCommand::Retry { event_ids } => {
            let result = if let [event_id] = event_ids[..] {
                match client.retry(event_id).await {
                    Ok(retried) => RetryManyResult {
                        retried: vec![retried],
                        not_found: Vec::new(),
                    },
                    Err(AdminClientError::Api { status: 404, .. }) => RetryManyResult {
                        retried: Vec::new(),
                        not_found: vec![event_id],
                    },
                    Err(e) => return Err(e.into()),
                }
            } else {
                client.retry_many(&event_ids).await?
            };
            match args.output {
                OutputFormat::Json => print_json(&mut out, &result)?,
                OutputFormat::Table => {
                    for r in &result.retried {
                        writeln!(
                            out,
                            "scheduled {} (was {} after {} attempts)",
                            r.event_id, r.previous_status, r.previous_attempts
                        )?;
                    }
                    for id in &result.not_found {
                        writeln!(out, "not found {id}: no failed event in a retryable state")?;
                    }
                }
            }
            anyhow::ensure!(
                result.not_found.is_empty(),
                "{} of {} events had no failed event in a retryable state",
                result.not_found.len(),
                event_ids.len()
            );
        }
        AdminCommand::Resolve { event_id, reason } => {
            let previous = client.resolve(event_id, &reason).await?;
            match args.output {
                OutputFormat::Json => print_json(&mut out, &previous)?,
                OutputFormat::Table => writeln!(
                    out,
                    "resolved {event_id} (was {} after {} attempts)",
                    previous.status, previous.attempts
                )?,
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// Prints `value` as pretty JSON and a newline.
fn print_json(out: &mut impl std::io::Write, value: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Formats failed events as aligned columns (errors shortened to one line of 60 characters).
pub fn failed_table(items: &[FailedEventRecord]) -> String {
    /// Column titles.
    const HEADERS: [&str; 8] = [
        "EVENT ID",
        "POSITION",
        "STATUS",
        "ATTEMPTS",
        "EVENT TYPE",
        "AGGREGATE",
        "FIRST FAILED",
        "LAST ERROR / RESOLUTION",
    ];
    let rows: Vec<[String; 8]> = items
        .iter()
        .map(|f| {
            let note = f.resolution.as_deref().or(f.last_error.as_deref()).unwrap_or("-");
            let note: String = note.replace(['\n', '\r'], " ");
            let note = if note.chars().count() > 60 {
                format!("{}...", note.chars().take(57).collect::<String>())
            } else {
                note
            };
            [
                f.event_id.to_string(),
                f.position.to_string(),
                f.status.to_string(),
                f.attempts.to_string(),
                f.event_type.clone(),
                format!("{}/{}", f.aggregate_type, f.aggregate_id),
                f.first_failed_at.to_rfc3339_opts(SecondsFormat::Secs, true),
                note,
            ]
        })
        .collect();
    let mut widths = HEADERS.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: [&str; 8]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(padded.join("  ").trim_end());
        text.push('\n');
    };
    line(HEADERS);
    for row in &rows {
        line(row.each_ref().map(String::as_str));
    }
    if rows.is_empty() {
        text.push_str("(no failed events)\n");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_parameters_become_the_api_query() {
        let params = ListFailedParams {
            statuses: vec![FailedEventStatus::DeadLettered, FailedEventStatus::Retrying],
            event_type: Some("StockLevelChanged".into()),
            failed_after: Some("2025-01-31T12:00:00Z".parse().unwrap()),
            cursor: Some("abc".into()),
            limit: Some(10),
            ..Default::default()
        };
        assert_eq!(
            params.query(),
            vec![
                ("status", "dead_lettered,retrying".to_owned()),
                ("eventType", "StockLevelChanged".to_owned()),
                ("failedAfter", "2025-01-31T12:00:00Z".to_owned()),
                ("cursor", "abc".to_owned()),
                ("limit", "10".to_owned()),
            ]
        );
        assert!(ListFailedParams::default().query().is_empty());
    }

    #[test]
    fn error_answers_carry_the_status_and_the_server_message() {
        let err = api_error(
            StatusCode::BAD_REQUEST,
            br#"{"error": "limit must be between 1 and 500", "field": "limit"}"#,
        );
        assert!(
            matches!(&err, AdminClientError::Api { status: 400, message, field: Some(f) }
                if message == "limit must be between 1 and 500" && f == "limit"),
            "{err:?}"
        );
        let err = api_error(StatusCode::BAD_GATEWAY, b"");
        assert_eq!(err.to_string(), "admin API answered 502: Bad Gateway");
        assert_eq!(err.status(), Some(502));
    }

    #[test]
    fn base_urls_must_be_absolute_http_urls() {
        assert!(AdminClient::new("http://relay:9090", "t".into()).is_ok());
        let client = AdminClient::new("https://example.test/relay", "t".into()).unwrap();
        assert_eq!(client.base.as_str(), "https://example.test/relay/");
        for bad in ["relay:9090", "ftp://relay", "http://relay?x=1", "not a url"] {
            assert!(
                matches!(
                    AdminClient::new(bad, "t".into()),
                    Err(AdminClientError::InvalidUrl { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn token_files_are_trimmed_and_must_not_be_empty() {
        let dir = std::env::temp_dir().join(format!("admin-token-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(read_token(&file).unwrap(), "s3cret");
        std::fs::write(&file, " \n").unwrap();
        let err = read_token(&file).unwrap_err().to_string();
        assert!(err.contains("is empty"), "{err}");
        std::fs::write(&file, "two words").unwrap();
        let err = read_token(&file).unwrap_err().to_string();
        assert!(!err.contains("words"), "the token is never echoed: {err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_table_aligns_columns_and_shortens_errors() {
        let record = FailedEventRecord {
            consumer: "orders".into(),
            event_id: Uuid::nil(),
            position: 7,
            event_type: "StockLevelChanged".into(),
            aggregate_type: "InventoryItem".into(),
            aggregate_id: "item-1".into(),
            status: FailedEventStatus::DeadLettered,
            attempts: 5,
            last_error: Some(format!("broker said no\n{}", "x".repeat(100))),
            first_failed_at: "2025-01-31T12:00:00Z".parse().unwrap(),
            last_attempt_at: None,
            next_retry_at: None,
            resolution: None,
        };
        let table = failed_table(&[record]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2, "{table}");
        assert!(lines[0].starts_with("EVENT ID"), "{table}");
        assert_eq!(lines[0].find("STATUS"), lines[1].find("dead_lettered"), "{table}");
        assert!(
            lines[1].contains("broker said no x") && lines[1].ends_with("..."),
            "{table}"
        );
        assert!(failed_table(&[]).contains("(no failed events)"));
    }
}
