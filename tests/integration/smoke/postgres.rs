//! The real PostgreSQL: connect, migrate with the product's migrations, round-trip a row.

use crate::support::postgres::TestDatabase;

#[tokio::test]
async fn migrations_apply_and_a_row_round_trips() {
    let db = TestDatabase::create("smoke_pg").await;
    sqlx::migrate!("./migrations")
        .run(&db.pool)
        .await
        .expect("apply migrations");

    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(applied >= 1, "at least one migration applied");

    sqlx::query("CREATE TABLE smoke (id bigint PRIMARY KEY, note text NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO smoke (id, note) VALUES ($1, $2)")
        .bind(7_i64)
        .bind("round trip")
        .execute(&db.pool)
        .await
        .unwrap();
    let note: String = sqlx::query_scalar("SELECT note FROM smoke WHERE id = $1")
        .bind(7_i64)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(note, "round trip");
    db.drop().await;
}
