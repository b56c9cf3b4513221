//! The outbox relay process: its configuration file (whose broker part, and connecting it, is
//! [`crate::broker::BrokerConfig`]), start-up (store, broker, registry), the Secret-file watch
//! and the status it reports. Its loop is the delivery engine
//! ([`crate::delivery::Engine`]) driving the configured broker adapter; the process around it
//! (HTTP server, admin API) is composed in `app`.

pub mod config;
pub mod secret_watch;
pub mod startup;
pub mod status;
