//! The store's own connections cannot hang for good: every session has a statement timeout,
//! an idle-in-transaction timeout and TCP keepalives, and migrations still run without the
//! statement timeout.

use inventory_outbox::store::{SESSION_SETTINGS, SchemaName, Store};

use crate::support::postgres::TestDatabase;

#[tokio::test]
async fn store_sessions_carry_a_statement_timeout_and_tcp_keepalives() {
    let db = TestDatabase::create("sessions").await;
    let url = {
        let admin = crate::support::database_url();
        let (base, _) = admin.rsplit_once('/').expect("database part");
        format!("{base}/{}", db.name)
    };
    let store = Store::connect(&url, SchemaName::default(), 2).await.expect("connect");
    store.migrate().await.expect("migrations run");
    for (name, expected) in SESSION_SETTINGS {
        let value: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {name}")))
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(value, expected, "{name} after migrating");
    }
    // A statement running past the timeout fails instead of holding the connection.
    // (Shortened on one connection so the test does not wait 30 s.)
    let mut conn = store.pool().acquire().await.unwrap();
    sqlx::query("SET statement_timeout = '200ms'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let err = sqlx::query("SELECT pg_sleep(5)")
        .execute(&mut *conn)
        .await
        .expect_err("the statement times out");
    assert!(err.to_string().contains("statement timeout"), "{err}");
    drop(conn);
    store.pool().close().await;
    db.drop().await;
}
