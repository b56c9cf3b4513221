//! Schema management: compatibility rules between schema versions and the registry of
//! versioned schemas per event type.

pub mod compatibility;
pub mod registry;
