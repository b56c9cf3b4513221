//! Inventory event publisher: a transactional outbox relayed to Kafka, RabbitMQ or SNS/SQS,
//! driven by a Kubernetes operator.
//!
//! ```text
//!  domain service ──(same sqlx transaction)──▶ PostgreSQL event store / outbox
//!                                                   │ claim (gap-free), mark after ack
//!                                                   ▼
//!                        relay workers ──▶ broker adapters ──▶ Kafka | RabbitMQ | SNS/SQS
//!                              │ heartbeats, failed events, lag (rows in PostgreSQL)
//!                              ▼
//!  kubectl ◀── status ── operator ──▶ Deployments, ConfigMaps, topics, replay Jobs
//! ```
//!
//! The folder layout follows the picture: `event` (envelope and inventory payloads),
//! `store` (PostgreSQL), `broker` (one adapter per broker), `relay`, `operator`, `crd`.

pub mod admin;
pub mod app;
pub mod broker;
pub mod cli;
pub mod crd;
pub mod delivery;
pub mod event;
pub mod operator;
pub mod publisher;
pub mod relay;
pub mod replay;
pub mod schema;
pub mod store;
pub mod telemetry;
pub mod tls;
