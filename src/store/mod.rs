//! PostgreSQL storage: the append-only event store, publication cursors, failed events,
//! worker heartbeats, the schema registry tables and replay checkpoints.
//!
//! All tables live in one PostgreSQL schema per deployment (default `outbox`). Queries are
//! schema-qualified because domain services write events on their own connections, whose
//! `search_path` we do not control.

pub mod events;
pub mod failed;
pub mod leases;
pub mod outbox;
pub mod registry;
pub mod replay;
pub mod status;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use sqlx::{Executor, PgConnection, Postgres, Transaction};

/// Migrations shipped with the binary (`migrations/`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "invalid PostgreSQL schema name {0:?}: use 1-63 lowercase letters, digits or '_', not starting with a digit"
    )]
    InvalidSchemaName(String),
    #[error("connect to PostgreSQL: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("connect to PostgreSQL at {endpoint} (sslmode {ssl_mode}): {cause}")]
    ConnectTo {
        /// `host:port/database`; never the user or password.
        endpoint: String,
        ssl_mode: &'static str,
        /// `source` in words (a refused certificate says why).
        cause: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("outbox.tls: {0}")]
    InvalidTls(&'static str),
    #[error("apply migrations to schema {schema}: {source}")]
    Migrate {
        schema: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("read a transaction id from PostgreSQL: {0:?} is not an xid8")]
    InvalidTxid(String),
    #[error("{action}: {source}")]
    Query {
        action: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

impl StoreError {
    /// Whether the same connect may succeed later: the server may come up, get a valid
    /// certificate or learn the password. A malformed URL or TLS setting never heals.
    pub fn is_retryable_connect(&self) -> bool {
        matches!(self, StoreError::ConnectTo { .. })
    }

    /// Wraps a query error with the action that failed.
    pub fn query(action: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| StoreError::Query { action, source }
    }
}

/// A validated PostgreSQL schema name; safe to splice into SQL as an identifier.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

impl SchemaName {
    pub const DEFAULT: &'static str = "outbox";

    pub fn new(name: &str) -> Result<Self, StoreError> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if valid {
            Ok(Self(name.to_owned()))
        } else {
            Err(StoreError::InvalidSchemaName(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for SchemaName {
    fn default() -> Self {
        Self(Self::DEFAULT.to_owned())
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Builds schema-qualified SQL. Only validated identifiers are spliced in, never values.
pub(crate) fn sql(text: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(text)
}

/// Session settings of the store's own connections (see [`Store::connect`]).
pub const SESSION_SETTINGS: [(&str, &str); 5] = [
    ("statement_timeout", "30s"),
    ("idle_in_transaction_session_timeout", "1min"),
    ("tcp_keepalives_idle", "15"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
];

/// The first and the longest wait of [`Store::connect_retrying`].
const CONNECT_RETRY_FIRST: Duration = Duration::from_millis(500);
const CONNECT_RETRY_MAX: Duration = Duration::from_secs(10);

/// How strictly the server's certificate is checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PostgresTlsMode {
    /// The certificate must chain to a trusted CA and name the host of the URL (libpq
    /// `verify-full`).
    #[default]
    VerifyFull,
    /// The certificate must chain to a trusted CA; the host name is not checked (libpq
    /// `verify-ca`), for servers reached by an address their certificate does not name.
    VerifyCa,
}

/// TLS towards PostgreSQL. When set it overrides `sslmode`, `sslrootcert`, `sslcert` and
/// `sslkey` of the connection URL, so a URL from a platform's Secret cannot weaken it; when
/// absent the URL alone decides (libpq's default, `prefer`, encrypts without verifying).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresTls {
    /// `verifyFull` (default) or `verifyCa`.
    #[serde(default)]
    pub mode: PostgresTlsMode,
    /// PEM file with the CA certificate(s) the server's certificate must chain to (a mounted
    /// Secret or ConfigMap). Without it the bundled Mozilla roots are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for servers that require one (`hostssl ... cert`); needs
    /// `keyFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `certFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Encrypt but accept any server certificate (libpq `require`). Only for throwaway test
    /// setups; connecting this way logs a warning.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

impl PostgresTls {
    /// Checks the combination of settings without reading the files.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(StoreError::InvalidTls("certFile and keyFile go together"));
        }
        if self.insecure_skip_verify && self.ca_file.is_some() {
            return Err(StoreError::InvalidTls(
                "insecureSkipVerify skips the check caFile is for; set only one",
            ));
        }
        Ok(())
    }

    /// The URL's options with these TLS settings on top.
    pub fn apply(&self, options: PgConnectOptions) -> PgConnectOptions {
        let mode = match (self.insecure_skip_verify, self.mode) {
            (true, _) => PgSslMode::Require,
            (false, PostgresTlsMode::VerifyFull) => PgSslMode::VerifyFull,
            (false, PostgresTlsMode::VerifyCa) => PgSslMode::VerifyCa,
        };
        let mut options = options.ssl_mode(mode);
        if let Some(ca) = &self.ca_file {
            options = options.ssl_root_cert(ca);
        }
        if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
            options = options.ssl_client_cert(cert).ssl_client_key(key);
        }
        options
    }
}

/// libpq's name of an sslmode, for messages.
fn ssl_mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

/// Parses a connection URL and puts `tls` on top of it (see [`PostgresTls`]).
pub fn connect_options(url: &str, tls: Option<&PostgresTls>) -> Result<PgConnectOptions, StoreError> {
    let options: PgConnectOptions = url.parse().map_err(StoreError::Connect)?;
    Ok(match tls {
        Some(tls) => {
            tls.validate()?;
            tls.apply(options)
        }
        None => options,
    })
}

/// A connection pool bound to one outbox schema.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    schema: SchemaName,
}

/// `pool.begin()` (or `begin_with(statement)`) in a task of its own, so that dropping the
/// caller cannot interrupt it.
/// sqlx counts a transaction only once its BEGIN has answered: a future dropped while BEGIN is
/// in flight (an HTTP handler whose client went away, a process shutting down) returns its
/// connection to the pool still inside the transaction, and the next user's autocommit
/// statements would then run in it and never commit. Run to completion, the transaction is
/// dropped as sqlx knows it and its rollback goes out before the connection is reused.
pub async fn begin_detached(
    pool: &PgPool,
    statement: Option<&'static str>,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let pool = pool.clone();
    tokio::spawn(async move {
        match statement {
            Some(statement) => pool.begin_with(statement).await,
            None => pool.begin().await,
        }
    })
    .await
    .map_err(|e| sqlx::Error::Io(std::io::Error::other(format!("beginning a transaction: {e}"))))?
}

impl Store {
    /// Connects with a pool of `max_connections`.
    ///
    /// Every connection gets a `statement_timeout` (a statement stuck behind a lock or a
    /// broken plan fails instead of stalling the relay for good), an
    /// `idle_in_transaction_session_timeout`, and TCP keepalives on the server's side of the
    /// socket, so PostgreSQL drops the session (and any lock it holds) of a relay that
    /// vanished from the network. sqlx offers no client-side keepalive; the pool tests a
    /// connection before handing it out and times acquisition out instead.
    pub async fn connect(url: &str, schema: SchemaName, max_connections: u32) -> Result<Self, StoreError> {
        Self::connect_with_tls(url, None, schema, max_connections).await
    }

    /// Like [`connect`](Self::connect), with `tls` on top of the URL's own TLS parameters.
    /// A failure names the endpoint and sslmode (never the credentials).
    pub async fn connect_with_tls(
        url: &str,
        tls: Option<&PostgresTls>,
        schema: SchemaName,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let options = connect_options(url, tls)?.options(SESSION_SETTINGS);
        let endpoint = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("")
        );
        let ssl_mode = ssl_mode_name(options.get_ssl_mode());
        let trusted = match tls.and_then(|t| t.ca_file.as_ref()) {
            Some(ca) => format!("outbox.tls.caFile {}", ca.display()),
            None => "the trusted roots (the URL's sslrootcert, or the bundled Mozilla roots)".to_owned(),
        };
        if tls.is_some_and(|t| t.insecure_skip_verify) {
            tracing::warn!(
                endpoint,
                "outbox.tls.insecureSkipVerify is set: the PostgreSQL server's certificate is NOT verified"
            );
        }
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .test_before_acquire(true)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::ConnectTo {
                endpoint,
                ssl_mode,
                cause: match crate::tls::certificate_error_in(&source) {
                    Some(refused) => crate::tls::describe_certificate_error(refused, &trusted),
                    None => source.to_string(),
                },
                source,
            })?;
        Ok(Self { pool, schema })
    }

    /// Like [`connect_with_tls`](Self::connect_with_tls), but a failed connect is retried
    /// with backoff (0.5 s doubling to 10 s) until it succeeds, so a process can wait for a
    /// database that is down, presents a bad certificate or refuses the password until someone
    /// fixes it. Each distinct failure is logged once as an error and handed to `failed` (for a
    /// readiness probe); settings that cannot work are returned at once.
    pub async fn connect_retrying(
        url: &str,
        tls: Option<&PostgresTls>,
        schema: SchemaName,
        max_connections: u32,
        mut failed: impl FnMut(&StoreError),
    ) -> Result<Self, StoreError> {
        let mut delay = CONNECT_RETRY_FIRST;
        let mut failures = 0u32;
        let mut logged: Option<String> = None;
        loop {
            match Self::connect_with_tls(url, tls, schema.clone(), max_connections).await {
                Ok(store) => {
                    if failures > 0 {
                        tracing::info!(failures, "connected to PostgreSQL after failed attempts");
                    }
                    return Ok(store);
                }
                Err(error) if error.is_retryable_connect() => {
                    failures += 1;
                    let message = error.to_string();
                    // Messages differ in timestamps (an expired certificate's "verification
                    // time"): compare them without digits so one failure logs once.
                    let kind: String = message.chars().filter(|c| !c.is_ascii_digit()).collect();
                    if logged.as_ref() != Some(&kind) {
                        tracing::error!(error = %message, "PostgreSQL refused the connection; retrying with backoff until it works");
                        logged = Some(kind);
                    } else {
                        tracing::debug!(error = %message, failures, "PostgreSQL still refuses the connection");
                    }
                    failed(&error);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(CONNECT_RETRY_MAX);
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Wraps an existing pool (e.g. the domain service's own).
    pub fn from_pool(pool: PgPool, schema: SchemaName) -> Self {
        Self { pool, schema }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Begins a transaction on a pooled connection; a caller dropped meanwhile leaves nothing
    /// open (see [`begin_detached`]).
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        begin_detached(&self.pool, None).await
    }

    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// Creates the schema if needed and applies pending migrations inside it.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(StoreError::Connect)?;
        migrate_connection(&mut conn, &self.schema).await?;
        // Leave the pooled connection as we found it.
        conn.execute("RESET search_path; RESET statement_timeout")
            .await
            .map_err(StoreError::query("reset search_path"))?;
        Ok(())
    }
}

async fn migrate_connection(conn: &mut PgConnection, schema: &SchemaName) -> Result<(), StoreError> {
    // Migrations may rewrite or index large tables: no statement timeout for them (`migrate`
    // resets both settings afterwards).
    let ddl = format!("SET statement_timeout = 0; CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}");
    conn.execute(sql(ddl))
        .await
        .map_err(StoreError::query("create schema"))?;
    MIGRATOR.run(conn).await.map_err(|source| StoreError::Migrate {
        schema: schema.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_settings_override_the_url() {
        let tls = PostgresTls {
            ca_file: Some("/etc/outbox/ca.crt".into()),
            ..PostgresTls::default()
        };
        let options = connect_options("postgres://u:p@db:5432/app?sslmode=disable", Some(&tls)).unwrap();
        assert!(matches!(options.get_ssl_mode(), PgSslMode::VerifyFull));
        let plain = connect_options("postgres://u:p@db:5432/app?sslmode=verify-ca", None).unwrap();
        assert!(
            matches!(plain.get_ssl_mode(), PgSslMode::VerifyCa),
            "without outbox.tls the URL decides"
        );
        let insecure = PostgresTls {
            insecure_skip_verify: true,
            ..PostgresTls::default()
        };
        let options = connect_options("postgres://u:p@db/app", Some(&insecure)).unwrap();
        assert!(matches!(options.get_ssl_mode(), PgSslMode::Require));
        let contradictory = PostgresTls {
            insecure_skip_verify: true,
            ..tls
        };
        assert!(connect_options("postgres://db/app", Some(&contradictory)).is_err());
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(SchemaName::new("outbox").is_ok());
        assert!(SchemaName::new("tenant_7").is_ok());
        for bad in ["", "7up", "Outbox", "out-box", "x; DROP TABLE events", &"a".repeat(64)] {
            let err = SchemaName::new(bad).unwrap_err().to_string();
            assert!(err.contains("invalid PostgreSQL schema name"), "{bad}: {err}");
        }
    }
}
