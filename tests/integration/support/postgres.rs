//! Throw-away PostgreSQL databases: each test gets its own, dropped when the guard goes.

use sqlx::{Connection, PgConnection, PgPool, postgres::PgPoolOptions};

/// A database created for one test.
pub struct TestDatabase {
    pub name: String,
    pub pool: PgPool,
}

impl TestDatabase {
    pub async fn create(prefix: &str) -> Self {
        super::capture_logs();
        let admin_url = super::database_url();
        let name = super::unique_name(prefix).replace('-', "_");
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("connect to {admin_url}: {e} (is `make env-up` done?)"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("DATABASE_URL has no database part: {admin_url}"),
        };
        let pool = PgPoolOptions::new()
            .max_connections(32)
            .connect(&url)
            .await
            .expect("connect to test database");
        Self { name, pool }
    }

    /// The connection URL of this database.
    pub fn url(&self) -> String {
        let admin = super::database_url();
        match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{}", self.name),
            None => panic!("DATABASE_URL has no database part: {admin}"),
        }
    }

    /// Closes the pool and drops the database.
    pub async fn drop(self) {
        self.pool.close().await;
        let mut admin = PgConnection::connect(&super::database_url()).await.expect("connect");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut admin)
        .await
        .expect("drop test database");
    }
}
