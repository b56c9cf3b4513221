//! The admin interface for failed and dead-lettered events: an authenticated HTTP API served
//! by each relay worker, and the client the `admin` subcommand uses.

pub mod api;
pub mod client;
