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

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Executor, PgConnection};

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

/// A connection pool bound to one outbox schema.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    schema: SchemaName,
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
        let options: PgConnectOptions = url.parse().map_err(StoreError::Connect)?;
        let options = options.options(SESSION_SETTINGS);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .test_before_acquire(true)
            .connect_with(options)
            .await
            .map_err(StoreError::Connect)?;
        Ok(Self { pool, schema })
    }

    /// Wraps an existing pool (e.g. the domain service's own).
    pub fn from_pool(pool: PgPool, schema: SchemaName) -> Self {
        Self { pool, schema }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
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
    fn schema_names_are_plain_identifiers() {
        assert!(SchemaName::new("outbox").is_ok());
        assert!(SchemaName::new("tenant_7").is_ok());
        for bad in ["", "7up", "Outbox", "out-box", "x; DROP TABLE events", &"a".repeat(64)] {
            let err = SchemaName::new(bad).unwrap_err().to_string();
            assert!(err.contains("invalid PostgreSQL schema name"), "{bad}: {err}");
        }
    }
}
