//! The event core against the real PostgreSQL: transactional publishing, gap-free reading,
//! validation, the schema registry, handlers and replay.

mod failed_decisions;
mod gap_free_reading;
mod handler_ownership;
mod late_scan;
mod leases;
mod lock_order;
mod publishing;
mod registry;
mod replay_visibility;
mod sql_contract;
mod store_sessions;

use inventory_outbox::event::NewEvent;
use inventory_outbox::event::inventory::{StockChangeReason, StockLevelChanged};
use inventory_outbox::publisher::{InventoryEventPublisher, PublisherConfig};
use inventory_outbox::store::{SchemaName, Store};
use uuid::Uuid;

use crate::support::postgres::TestDatabase;

/// A fresh database with the outbox schema migrated and the built-in schemas registered.
pub async fn publisher(prefix: &str) -> (TestDatabase, InventoryEventPublisher) {
    publisher_with(prefix, PublisherConfig::default()).await
}

/// [`publisher`] with its own settings.
pub async fn publisher_with(prefix: &str, config: PublisherConfig) -> (TestDatabase, InventoryEventPublisher) {
    let db = TestDatabase::create(prefix).await;
    let store = Store::from_pool(db.pool.clone(), SchemaName::default());
    let publisher = InventoryEventPublisher::setup(store, config)
        .await
        .expect("set up publisher");
    (db, publisher)
}

/// A StockLevelChanged draft for `item` whose `newQuantity` carries `sequence`.
pub fn stock_changed(item: Uuid, sequence: i64) -> NewEvent {
    NewEvent::from_payload(&StockLevelChanged {
        inventory_item_id: item,
        warehouse_id: Uuid::nil(),
        previous_quantity: sequence - 1,
        new_quantity: sequence,
        change_amount: 1,
        change_reason: StockChangeReason::Receipt,
        transaction_id: Uuid::now_v7(),
    })
    .expect("serialize payload")
}
