//! The store's own connections cannot hang for good: every session has a statement timeout,
//! an idle-in-transaction timeout and TCP keepalives, and migrations still run without the
//! statement timeout. A read dropped mid-flight leaves no transaction behind on its connection.

use std::time::Duration;

use inventory_outbox::store::outbox::{OutboxReader, SHARDS};
use inventory_outbox::store::{SESSION_SETTINGS, SchemaName, Store};

use crate::support::postgres::TestDatabase;

#[tokio::test]
async fn store_sessions_carry_a_statement_timeout_and_tcp_keepalives() {
    let db = TestDatabase::create("sessions").await;
    let url = db.url();
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

/// A relay read dropped at any point (a relay shut down or aborted mid-round) must not hand
/// its pooled connection to the next user still inside the read's read-only transaction: with
/// one connection in the pool, every write after a dropped read must go through and commit.
#[tokio::test]
async fn a_read_dropped_at_any_point_leaves_no_transaction_behind_on_its_connection() {
    const READS: usize = 240;
    let db = TestDatabase::create("dropped_read").await;
    let url = db.url();
    let store = Store::connect(&url, SchemaName::default(), 1).await.expect("connect");
    store.migrate().await.expect("migrations run");
    let reader = OutboxReader::new(store.clone(), "dropped-read");
    let shards: Vec<i16> = (0..SHARDS).collect();
    reader.ensure_cursors(&shards).await.expect("cursors");
    sqlx::query("CREATE TABLE dropped_read_probe (n int PRIMARY KEY)")
        .execute(store.pool())
        .await
        .expect("probe table");
    let mut completed = 0;
    for n in 0..READS {
        // Dropped after a growing delay (the timer's granularity is 1 ms): across the loop the
        // drop lands before, during and after the connect, the BEGIN, the snapshot query and
        // the commit.
        let delay = Duration::from_micros(u64::try_from(n % 60).expect("small") * 250);
        if tokio::time::timeout(delay, reader.read(&shards, 10)).await.is_ok() {
            completed += 1;
        }
        let n = i32::try_from(n).expect("small");
        let in_read_only: String = sqlx::query_scalar("SELECT current_setting('transaction_read_only')")
            .fetch_one(store.pool())
            .await
            .expect("session state");
        assert_eq!(
            in_read_only, "off",
            "after dropped read {n}: the session is still in the read-only read"
        );
        sqlx::query("INSERT INTO dropped_read_probe VALUES ($1)")
            .bind(n)
            .execute(store.pool())
            .await
            .unwrap_or_else(|e| panic!("write after dropped read {n}: {e}"));
    }
    // Committed, not left open in a transaction nobody ends: another session sees every row.
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM dropped_read_probe")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(
        seen,
        i64::try_from(READS).expect("small"),
        "({completed} reads completed)"
    );
    assert!(
        completed > 0 && completed < READS,
        "the drops did not span the read: {completed} of {READS} completed"
    );
    store.pool().close().await;
    db.drop().await;
}
