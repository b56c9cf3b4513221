//! The fifteen inventory domain events of the specification, as typed payloads.
//!
//! Each payload knows its event type, aggregate and schema version; its JSON Schema is
//! generated from the type (see `event::schema`) and committed under `schemas/`.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use uuid::Uuid;

/// The event types this publisher knows, with their aggregate type and current schema version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    InventoryItemCreated,
    InventoryItemUpdated,
    InventoryItemDeactivated,
    StockLevelChanged,
    StockTransferred,
    LowStockThresholdReached,
    Stockout,
    AllocationCreated,
    AllocationConfirmed,
    AllocationCancelled,
    AllocationFulfilled,
    WarehouseCreated,
    WarehouseUpdated,
    WarehouseBinCreated,
    ItemAssignedToLocation,
}

/// Aggregate type names used in the envelope's `aggregateType`.
pub mod aggregate {
    pub const INVENTORY_ITEM: &str = "InventoryItem";
    pub const ALLOCATION: &str = "Allocation";
    pub const WAREHOUSE: &str = "Warehouse";
}

impl EventType {
    pub const ALL: [EventType; 15] = [
        EventType::InventoryItemCreated,
        EventType::InventoryItemUpdated,
        EventType::InventoryItemDeactivated,
        EventType::StockLevelChanged,
        EventType::StockTransferred,
        EventType::LowStockThresholdReached,
        EventType::Stockout,
        EventType::AllocationCreated,
        EventType::AllocationConfirmed,
        EventType::AllocationCancelled,
        EventType::AllocationFulfilled,
        EventType::WarehouseCreated,
        EventType::WarehouseUpdated,
        EventType::WarehouseBinCreated,
        EventType::ItemAssignedToLocation,
    ];

    /// The `eventType` string on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventType::InventoryItemCreated => "InventoryItemCreated",
            EventType::InventoryItemUpdated => "InventoryItemUpdated",
            EventType::InventoryItemDeactivated => "InventoryItemDeactivated",
            EventType::StockLevelChanged => "StockLevelChanged",
            EventType::StockTransferred => "StockTransferred",
            EventType::LowStockThresholdReached => "LowStockThresholdReached",
            EventType::Stockout => "Stockout",
            EventType::AllocationCreated => "AllocationCreated",
            EventType::AllocationConfirmed => "AllocationConfirmed",
            EventType::AllocationCancelled => "AllocationCancelled",
            EventType::AllocationFulfilled => "AllocationFulfilled",
            EventType::WarehouseCreated => "WarehouseCreated",
            EventType::WarehouseUpdated => "WarehouseUpdated",
            EventType::WarehouseBinCreated => "WarehouseBinCreated",
            EventType::ItemAssignedToLocation => "ItemAssignedToLocation",
        }
    }

    /// Stock and item events belong to the inventory item; allocation and warehouse events to theirs.
    pub const fn aggregate_type(self) -> &'static str {
        match self {
            EventType::InventoryItemCreated
            | EventType::InventoryItemUpdated
            | EventType::InventoryItemDeactivated
            | EventType::StockLevelChanged
            | EventType::StockTransferred
            | EventType::LowStockThresholdReached
            | EventType::Stockout
            | EventType::ItemAssignedToLocation => aggregate::INVENTORY_ITEM,
            EventType::AllocationCreated
            | EventType::AllocationConfirmed
            | EventType::AllocationCancelled
            | EventType::AllocationFulfilled => aggregate::ALLOCATION,
            EventType::WarehouseCreated | EventType::WarehouseUpdated | EventType::WarehouseBinCreated => {
                aggregate::WAREHOUSE
            }
        }
    }

    /// The schema version new events of this type are written with.
    pub const fn current_version(self) -> u32 {
        1
    }

    /// The generated JSON Schema of this type's current payload version.
    pub fn json_schema(self) -> serde_json::Value {
        fn of<T: JsonSchema>() -> serde_json::Value {
            schemars::SchemaGenerator::new(schemars::generate::SchemaSettings::draft2020_12())
                .into_root_schema_for::<T>()
                .to_value()
        }
        match self {
            EventType::InventoryItemCreated => of::<InventoryItemCreated>(),
            EventType::InventoryItemUpdated => of::<InventoryItemUpdated>(),
            EventType::InventoryItemDeactivated => of::<InventoryItemDeactivated>(),
            EventType::StockLevelChanged => of::<StockLevelChanged>(),
            EventType::StockTransferred => of::<StockTransferred>(),
            EventType::LowStockThresholdReached => of::<LowStockThresholdReached>(),
            EventType::Stockout => of::<Stockout>(),
            EventType::AllocationCreated => of::<AllocationCreated>(),
            EventType::AllocationConfirmed => of::<AllocationConfirmed>(),
            EventType::AllocationCancelled => of::<AllocationCancelled>(),
            EventType::AllocationFulfilled => of::<AllocationFulfilled>(),
            EventType::WarehouseCreated => of::<WarehouseCreated>(),
            EventType::WarehouseUpdated => of::<WarehouseUpdated>(),
            EventType::WarehouseBinCreated => of::<WarehouseBinCreated>(),
            EventType::ItemAssignedToLocation => of::<ItemAssignedToLocation>(),
        }
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The wire name is not one of the fifteen inventory event types.
#[derive(Debug, thiserror::Error)]
#[error("unknown event type {0:?}")]
pub struct UnknownEventType(pub String);

impl std::str::FromStr for EventType {
    type Err = UnknownEventType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownEventType(s.to_owned()))
    }
}

/// A typed inventory payload.
pub trait InventoryEventPayload: Serialize + DeserializeOwned + JsonSchema {
    const EVENT_TYPE: EventType;
    const VERSION: u32 = 1;
    /// The aggregate this event belongs to (its ordering key).
    fn aggregate_id(&self) -> String;
}

macro_rules! payload {
    ($ty:ident, $aggregate_field:ident) => {
        impl InventoryEventPayload for $ty {
            const EVENT_TYPE: EventType = EventType::$ty;
            fn aggregate_id(&self) -> String {
                self.$aggregate_field.to_string()
            }
        }
    };
}

/// Why a stock level moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StockChangeReason {
    ManualAdjustment,
    Receipt,
    Shipment,
    Return,
    Damage,
    CycleCount,
    Transfer,
    Allocation,
}

/// Lifecycle status of an item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ItemStatus {
    Active,
    Inactive,
    Discontinued,
}

/// A new inventory item (SKU) was created.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InventoryItemCreated {
    pub inventory_item_id: Uuid,
    /// Stock keeping unit, unique per tenant.
    pub sku: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Unit of measure, e.g. `EA`, `KG`.
    pub unit_of_measure: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Quantity at or below which `LowStockThresholdReached` is emitted.
    pub reorder_threshold: i64,
    pub status: ItemStatus,
}
payload!(InventoryItemCreated, inventory_item_id);

/// Descriptive fields of an item changed; only the changed fields are present.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InventoryItemUpdated {
    pub inventory_item_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_of_measure: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reorder_threshold: Option<i64>,
    /// Names of the fields that changed.
    pub changed_fields: Vec<String>,
}
payload!(InventoryItemUpdated, inventory_item_id);

/// An item was taken out of use.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InventoryItemDeactivated {
    pub inventory_item_id: Uuid,
    pub reason: String,
    pub deactivated_at: DateTime<Utc>,
}
payload!(InventoryItemDeactivated, inventory_item_id);

/// On-hand quantity of an item in a warehouse changed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StockLevelChanged {
    pub inventory_item_id: Uuid,
    pub warehouse_id: Uuid,
    pub previous_quantity: i64,
    pub new_quantity: i64,
    /// `newQuantity - previousQuantity`.
    pub change_amount: i64,
    pub change_reason: StockChangeReason,
    /// The stock transaction that caused the change.
    pub transaction_id: Uuid,
}
payload!(StockLevelChanged, inventory_item_id);

/// Stock moved between two warehouses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StockTransferred {
    pub inventory_item_id: Uuid,
    pub transfer_id: Uuid,
    pub source_warehouse_id: Uuid,
    pub destination_warehouse_id: Uuid,
    /// Units moved; always positive.
    pub quantity: i64,
}
payload!(StockTransferred, inventory_item_id);

/// Available quantity fell to or below the item's reorder threshold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LowStockThresholdReached {
    pub inventory_item_id: Uuid,
    pub warehouse_id: Uuid,
    pub current_quantity: i64,
    pub threshold: i64,
}
payload!(LowStockThresholdReached, inventory_item_id);

/// Available quantity reached zero.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Stockout {
    pub inventory_item_id: Uuid,
    pub warehouse_id: Uuid,
    /// Quantity requested but not available when the stockout was detected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unfulfilled_quantity: Option<i64>,
}
payload!(Stockout, inventory_item_id);

/// Stock was reserved for an order line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllocationCreated {
    pub allocation_id: Uuid,
    pub inventory_item_id: Uuid,
    pub warehouse_id: Uuid,
    pub order_id: String,
    pub quantity: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}
payload!(AllocationCreated, allocation_id);

/// A reservation was confirmed (the order was accepted).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllocationConfirmed {
    pub allocation_id: Uuid,
    pub order_id: String,
    pub confirmed_quantity: i64,
}
payload!(AllocationConfirmed, allocation_id);

/// A reservation was released without being fulfilled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllocationCancelled {
    pub allocation_id: Uuid,
    pub order_id: String,
    pub reason: String,
    pub released_quantity: i64,
}
payload!(AllocationCancelled, allocation_id);

/// Reserved stock left the warehouse.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllocationFulfilled {
    pub allocation_id: Uuid,
    pub order_id: String,
    pub fulfilled_quantity: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipment_id: Option<String>,
}
payload!(AllocationFulfilled, allocation_id);

/// A postal address of a warehouse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Address {
    pub line1: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    /// ISO 3166-1 alpha-2 country code.
    pub country: String,
}

/// A warehouse was opened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarehouseCreated {
    pub warehouse_id: Uuid,
    /// Short code, unique per tenant.
    pub code: String,
    pub name: String,
    pub address: Address,
}
payload!(WarehouseCreated, warehouse_id);

/// Warehouse details changed; only the changed fields are present.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarehouseUpdated {
    pub warehouse_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    pub changed_fields: Vec<String>,
}
payload!(WarehouseUpdated, warehouse_id);

/// A storage bin was added to a warehouse.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarehouseBinCreated {
    pub warehouse_id: Uuid,
    pub bin_id: Uuid,
    /// Human-readable location, e.g. `A-03-2`.
    pub bin_code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<i64>,
}
payload!(WarehouseBinCreated, warehouse_id);

/// An item was given a storage location (bin) in a warehouse.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ItemAssignedToLocation {
    pub inventory_item_id: Uuid,
    pub warehouse_id: Uuid,
    pub bin_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_bin_id: Option<Uuid>,
}
payload!(ItemAssignedToLocation, inventory_item_id);
