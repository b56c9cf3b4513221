//! Shared by the benchmark programs: the 1 KiB event they all write.

use inventory_outbox::event::NewEvent;
use inventory_outbox::event::inventory::{StockChangeReason, StockLevelChanged};
use uuid::Uuid;

/// A StockLevelChanged draft for `aggregate`, padded to about 1 KiB with an optional field
/// (payload schemas are open for additive evolution).
pub fn kib_draft(aggregate: Uuid) -> NewEvent {
    let mut event = NewEvent::from_payload(&StockLevelChanged {
        inventory_item_id: aggregate,
        warehouse_id: Uuid::now_v7(),
        previous_quantity: 10,
        new_quantity: 11,
        change_amount: 1,
        change_reason: StockChangeReason::Receipt,
        transaction_id: Uuid::now_v7(),
    })
    .expect("payload");
    let size = event.payload.to_string().len();
    event.payload["note"] = "x".repeat(1024usize.saturating_sub(size + 10)).into();
    event
}
