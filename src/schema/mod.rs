//! Schema management: compatibility rules between schema versions, the registry of versioned
//! schemas with global ids, and the registry's Confluent-compatible REST API.

pub mod api;
pub mod compatibility;
pub mod registry;
pub mod server;
