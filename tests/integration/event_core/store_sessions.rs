//! The store's own connections cannot hang for good: every session has a statement timeout,
//! an idle-in-transaction timeout and TCP keepalives, and migrations still run without the
//! statement timeout. A read or BEGIN dropped mid-flight leaves no transaction behind on its
//! connection.

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

/// A relay read or a `Store::begin` dropped at any point (a relay shut down or aborted
/// mid-round, an HTTP handler whose client went away) must not hand its pooled connection to
/// the next user still inside its transaction: with one connection in the pool, every write
/// after a dropped call must go through and commit.
#[tokio::test]
async fn a_transaction_dropped_at_any_point_leaves_nothing_open_on_its_connection() {
    let db = TestDatabase::create("dropped_begin").await;
    let store = Store::connect(&db.url(), SchemaName::default(), 1)
        .await
        .expect("connect");
    store.migrate().await.expect("migrations run");
    let reader = OutboxReader::new(store.clone(), "dropped-read");
    let shards: Vec<i16> = (0..SHARDS).collect();
    reader.ensure_cursors(&shards).await.expect("cursors");
    sqlx::query("CREATE TABLE dropped_probe (what text, n int, PRIMARY KEY (what, n))")
        .execute(store.pool())
        .await
        .expect("probe table");
    writes_commit_after_each_drop(&store, &db, "relay read", || reader.read(&shards, 10)).await;
    writes_commit_after_each_drop(&store, &db, "Store::begin", || store.begin()).await;
    store.pool().close().await;
    db.drop().await;
}

/// Drops `call()` part-way, later and later across the loop (see [`dropped_after`]), so the
/// drop lands before, during and after the connect, the BEGIN and what follows; after each,
/// checks the session is out of any transaction and that a write commits.
async fn writes_commit_after_each_drop<T, F: Future<Output = T>>(
    store: &Store,
    db: &TestDatabase,
    what: &str,
    call: impl Fn() -> F,
) {
    const CALLS: usize = 240;
    let mut completed = 0;
    for n in 0..CALLS {
        if dropped_after(n, call()).await {
            completed += 1;
        }
        let n = i32::try_from(n).expect("small");
        // SAVEPOINT outside a transaction block fails with no_active_sql_transaction (25P01);
        // inside a leftover transaction it would succeed.
        let savepoint = sqlx::query("SAVEPOINT dropped_probe").execute(store.pool()).await;
        let code = savepoint
            .as_ref()
            .err()
            .and_then(|e| e.as_database_error())
            .and_then(|e| e.code());
        assert_eq!(
            code.as_deref(),
            Some("25P01"),
            "after dropped {what} {n}: the session is still in a transaction ({savepoint:?})"
        );
        sqlx::query("INSERT INTO dropped_probe VALUES ($1, $2)")
            .bind(what)
            .bind(n)
            .execute(store.pool())
            .await
            .unwrap_or_else(|e| panic!("write after dropped {what} {n}: {e}"));
    }
    // Committed, not left open in a transaction nobody ends: another session sees every row.
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM dropped_probe WHERE what = $1")
        .bind(what)
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(
        seen,
        i64::try_from(CALLS).expect("small"),
        "{what}: {completed} calls completed"
    );
    assert!(
        completed > 0 && completed < CALLS,
        "{what}: the drops did not span the call: {completed} of {CALLS} completed"
    );
}

/// Runs `call` for the `n`-th time and drops it unless it finished first; returns whether it
/// finished. Even `n`: after a growing number of polls with a yield in between (each lets the
/// runtime deliver socket readiness, finer than any timer); odd `n`: after a growing delay
/// (the timer's granularity is 1 ms).
async fn dropped_after<T>(n: usize, call: impl Future<Output = T>) -> bool {
    let mut call = std::pin::pin!(call);
    if n.is_multiple_of(2) {
        for _ in 0..(n / 2) % 40 {
            if futures::poll!(call.as_mut()).is_ready() {
                return true;
            }
            tokio::task::yield_now().await;
        }
        false
    } else {
        let delay = Duration::from_micros(u64::try_from((n / 2) % 60).expect("small") * 250);
        tokio::time::timeout(delay, call).await.is_ok()
    }
}
