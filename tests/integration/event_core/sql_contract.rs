//! The SQL contract of docs/EVENTS.md holds for raw SQL writers too: the database refuses a
//! row the library would refuse (what it can check cheaply), names the problem, and writes
//! nothing.

use inventory_outbox::event::EventType;
use serde_json::{Value, json};
use uuid::Uuid;

use super::publisher;

/// One raw insert as a service in another language would write it.
struct Row {
    event_type: &'static str,
    aggregate_type: &'static str,
    aggregate_id: String,
    version: i32,
    user_id: Option<String>,
    payload: Value,
}

fn valid() -> Row {
    Row {
        event_type: "StockLevelChanged",
        aggregate_type: "InventoryItem",
        aggregate_id: Uuid::now_v7().to_string(),
        version: 1,
        user_id: None,
        payload: json!({
            "inventoryItemId": Uuid::now_v7(), "warehouseId": Uuid::nil(), "previousQuantity": 0,
            "newQuantity": 1, "changeAmount": 1, "changeReason": "Receipt", "transactionId": Uuid::now_v7()
        }),
    }
}

async fn insert(pool: &sqlx::PgPool, row: &Row) -> Result<(), String> {
    sqlx::query(
        "INSERT INTO outbox.events (event_id, event_type, event_version, aggregate_type, aggregate_id, \
         occurred_at, user_id, source, payload) VALUES ($1, $2, $3, $4, $5, now(), $6, 'raw-sql', $7)",
    )
    .bind(Uuid::now_v7())
    .bind(row.event_type)
    .bind(row.version)
    .bind(row.aggregate_type)
    .bind(&row.aggregate_id)
    .bind(&row.user_id)
    .bind(&row.payload)
    .execute(pool)
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_raw_sql_insert_that_breaks_the_contract_is_refused_with_the_reason_and_writes_nothing() {
    let (db, _publisher) = publisher("sqlcontract").await;
    let cases: Vec<(&str, Row, &str)> = vec![
        (
            "unknown type",
            Row {
                event_type: "StockLevelExploded",
                ..valid()
            },
            "unknown event type 'StockLevelExploded'",
        ),
        (
            "wrong aggregate",
            Row {
                aggregate_type: "Warehouse",
                ..valid()
            },
            "StockLevelChanged belongs to aggregate type InventoryItem, not 'Warehouse'",
        ),
        (
            "long aggregate id",
            Row {
                aggregate_id: "x".repeat(10_000),
                ..valid()
            },
            "aggregate_id is 10000 bytes long; the limit is 256",
        ),
        (
            "blank aggregate id",
            Row {
                aggregate_id: "   ".to_owned(),
                ..valid()
            },
            "aggregate_id is empty",
        ),
        (
            "control characters",
            Row {
                aggregate_id: "item\n1".to_owned(),
                ..valid()
            },
            "aggregate_id contains control characters",
        ),
        (
            "long metadata",
            Row {
                user_id: Some("u".repeat(300)),
                ..valid()
            },
            "user_id is 300 bytes long",
        ),
        (
            "array payload",
            Row {
                payload: json!([1, 2]),
                ..valid()
            },
            "payload must be a JSON object, not array",
        ),
        (
            "null payload",
            Row {
                payload: Value::Null,
                ..valid()
            },
            "payload must be a JSON object, not null",
        ),
        (
            "string payload",
            Row {
                payload: json!("stock"),
                ..valid()
            },
            "payload must be a JSON object, not string",
        ),
    ];
    for (case, row, expected) in &cases {
        let err = insert(&db.pool, row).await.expect_err(case);
        assert!(err.contains(expected), "{case}: {err}");
        assert!(err.contains("invalid event"), "{case}: {err}");
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 0, "a refused insert wrote rows");
    // A refused row takes no position either (checked before the sequence is drawn).
    let drawn: bool = sqlx::query_scalar("SELECT is_called FROM outbox.event_position_seq")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!drawn, "a refused insert drew a position");

    // The schema version is checked once per statement, after the rows went in: the refused
    // row draws a position, and the failed statement still writes nothing.
    let err = insert(&db.pool, &Row { version: 99, ..valid() })
        .await
        .expect_err("an unregistered version is refused");
    assert!(
        err.contains("invalid event: no schema registered for StockLevelChanged version 99"),
        "{err}"
    );
    let mut tx = db.pool.begin().await.unwrap();
    let refused = sqlx::query(
        "INSERT INTO outbox.events (event_id, event_type, event_version, aggregate_type, aggregate_id, \
         occurred_at, payload) \
         SELECT gen_random_uuid(), 'StockLevelChanged', v, 'InventoryItem', 'item-' || v, now(), '{}' \
         FROM unnest(ARRAY[1, 1, 42, 1]) AS v",
    )
    .execute(&mut *tx)
    .await
    .expect_err("one unregistered version refuses the whole statement")
    .to_string();
    assert!(
        refused.contains("no schema registered for StockLevelChanged version 42"),
        "{refused}"
    );
    tx.rollback().await.unwrap();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 0, "a statement refused for its schema version wrote rows");

    insert(&db.pool, &valid())
        .await
        .expect("a row that keeps the contract is stored");
    // 256 bytes is still allowed, as in the library.
    insert(
        &db.pool,
        &Row {
            aggregate_id: "é".repeat(128),
            ..valid()
        },
    )
    .await
    .expect("a 256-byte aggregate id is allowed");
    db.drop().await;
}

#[tokio::test]
async fn the_database_accepts_every_library_event_type_with_its_aggregate_and_no_other() {
    let (db, _publisher) = publisher("eventtypes").await;
    let aggregates = ["InventoryItem", "Allocation", "Warehouse"];
    for t in EventType::ALL {
        for aggregate in aggregates {
            let result = sqlx::query(
                "INSERT INTO outbox.events (event_id, event_type, event_version, aggregate_type, aggregate_id, \
                 occurred_at, payload) VALUES ($1, $2, $3, $4, 'a-1', now(), '{}')",
            )
            .bind(Uuid::now_v7())
            .bind(t.as_str())
            .bind(i32::try_from(t.current_version()).unwrap())
            .bind(aggregate)
            .execute(&db.pool)
            .await;
            if aggregate == t.aggregate_type() {
                result.unwrap_or_else(|e| panic!("{} on {aggregate} refused: {e}", t.as_str()));
            } else {
                let err = result.expect_err(t.as_str()).to_string();
                assert!(err.contains("belongs to aggregate type"), "{}: {err}", t.as_str());
            }
        }
    }
    db.drop().await;
}

/// The grants docs/EVENTS.md names for a writing role are enough, with a polling relay's
/// heartbeat present (the NOTIFY trigger reads it with its owner's rights), and one fewer is
/// refused with the object it lacks.
#[tokio::test]
async fn a_role_with_the_documented_grants_can_append_events() {
    let (db, _publisher) = publisher("sql_contract_grants").await;
    let role = format!("writer_{}", Uuid::new_v4().simple());
    for statement in [
        format!("CREATE ROLE {role}"),
        format!("GRANT USAGE ON SCHEMA outbox TO {role}"),
        format!("GRANT INSERT ON outbox.events TO {role}"),
        format!("GRANT USAGE ON SEQUENCE outbox.event_position_seq TO {role}"),
        "INSERT INTO outbox.worker_heartbeats (consumer, worker_id, wake_by_notify) VALUES ('relay', 'w1', false)"
            .to_owned(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let insert_as_writer = async || -> Result<(), String> {
        let mut tx = db.pool.begin().await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL ROLE {role}")))
            .execute(&mut *tx)
            .await
            .unwrap();
        let row = valid();
        let result = sqlx::query(
            "INSERT INTO outbox.events (event_id, event_type, event_version, aggregate_type, aggregate_id, \
             occurred_at, payload) VALUES ($1, $2, $3, $4, $5, now(), $6)",
        )
        .bind(Uuid::now_v7())
        .bind(row.event_type)
        .bind(row.version)
        .bind(row.aggregate_type)
        .bind(&row.aggregate_id)
        .bind(&row.payload)
        .execute(&mut *tx)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
        tx.rollback().await.unwrap();
        result
    };
    let without = insert_as_writer().await;
    let refused = without.expect_err("no SELECT on schema_versions yet");
    assert!(refused.contains("schema_versions"), "{refused}");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "GRANT SELECT ON outbox.schema_versions TO {role}"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let with_grants = insert_as_writer().await;
    for statement in [
        format!("REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM {role}"),
        format!("REVOKE ALL ON ALL SEQUENCES IN SCHEMA outbox FROM {role}"),
        format!("REVOKE ALL ON SCHEMA outbox FROM {role}"),
        format!("DROP ROLE {role}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    with_grants.expect("the documented grants are enough");
    db.drop().await;
}
