//! A small inventory service using the library API: each stock adjustment updates the stock
//! row and writes `StockLevelChanged` (plus `LowStockThresholdReached` / `Stockout` when they
//! apply) in the same transaction, so the events exist if and only if the change committed.
//!
//! Run against the local stack: `source ~/.local/state/inventory-outbox/env.sh &&
//! cargo run --example inventory_service`.

use inventory_outbox::event::NewEvent;
use inventory_outbox::event::inventory::{LowStockThresholdReached, StockChangeReason, StockLevelChanged, Stockout};
use inventory_outbox::publisher::{InventoryEventPublisher, PublisherConfig};
use inventory_outbox::store::{SchemaName, Store};
use sqlx::PgPool;
use uuid::Uuid;

/// The service's own state, next to the outbox.
async fn create_stock_table(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS example_stock (
             item_id uuid NOT NULL, warehouse_id uuid NOT NULL,
             quantity bigint NOT NULL CHECK (quantity >= 0), reorder_threshold bigint NOT NULL,
             PRIMARY KEY (item_id, warehouse_id))",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Adjusts stock by `change` and records the events of the change in the same transaction.
async fn adjust_stock(
    pool: &PgPool,
    publisher: &InventoryEventPublisher,
    item: Uuid,
    warehouse: Uuid,
    change: i64,
    reason: StockChangeReason,
) -> anyhow::Result<Vec<String>> {
    let mut tx = pool.begin().await?;
    let (previous, threshold): (i64, i64) = sqlx::query_as(
        "SELECT quantity, reorder_threshold FROM example_stock WHERE item_id = $1 AND warehouse_id = $2 FOR UPDATE",
    )
    .bind(item)
    .bind(warehouse)
    .fetch_one(&mut *tx)
    .await?;
    let new = previous + change;
    anyhow::ensure!(new >= 0, "cannot remove {} units: only {previous} in stock", -change);
    sqlx::query("UPDATE example_stock SET quantity = $3 WHERE item_id = $1 AND warehouse_id = $2")
        .bind(item)
        .bind(warehouse)
        .bind(new)
        .execute(&mut *tx)
        .await?;

    let correlation = Uuid::now_v7().to_string();
    let mut events = vec![NewEvent::from_payload(&StockLevelChanged {
        inventory_item_id: item,
        warehouse_id: warehouse,
        previous_quantity: previous,
        new_quantity: new,
        change_amount: change,
        change_reason: reason,
        transaction_id: Uuid::now_v7(),
    })?];
    if new == 0 {
        events.push(NewEvent::from_payload(&Stockout {
            inventory_item_id: item,
            warehouse_id: warehouse,
            unfulfilled_quantity: None,
        })?);
    } else if new <= threshold && previous > threshold {
        events.push(NewEvent::from_payload(&LowStockThresholdReached {
            inventory_item_id: item,
            warehouse_id: warehouse,
            current_quantity: new,
            threshold,
        })?);
    }
    let events = events
        .into_iter()
        .map(|e| e.with_correlation_id(correlation.clone()).with_user_id("example"))
        .collect();
    let stored = publisher.publish_events(&mut tx, events).await?;
    tx.commit().await?;
    Ok(stored.into_iter().map(|e| e.event_type).collect())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").map_err(|_| anyhow::anyhow!("set DATABASE_URL (see the README)"))?;
    let pool = PgPool::connect(&url).await?;
    let store = Store::from_pool(pool.clone(), SchemaName::default());
    let config = PublisherConfig {
        source: "example-inventory-service".into(),
        ..Default::default()
    };
    let publisher = InventoryEventPublisher::setup(store, config).await?;
    create_stock_table(&pool).await?;

    let (item, warehouse) = (Uuid::now_v7(), Uuid::now_v7());
    sqlx::query("INSERT INTO example_stock VALUES ($1, $2, 0, 5)")
        .bind(item)
        .bind(warehouse)
        .execute(&pool)
        .await?;
    let steps = [
        (20, StockChangeReason::Receipt),
        (-12, StockChangeReason::Shipment),
        (-4, StockChangeReason::Shipment),
        (-4, StockChangeReason::Shipment),
        (-1, StockChangeReason::Shipment),
    ];
    for (change, reason) in steps {
        match adjust_stock(&pool, &publisher, item, warehouse, change, reason).await {
            Ok(events) => println!("adjusted by {change:+}: wrote {}", events.join(", ")),
            Err(e) => println!("adjusted by {change:+}: refused ({e}); no event written"),
        }
    }
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM outbox.events WHERE aggregate_id = $1")
        .bind(item.to_string())
        .fetch_one(&pool)
        .await?;
    println!("item {item}: {count} events in the outbox");
    Ok(())
}
