//! Placeholder: replaced by the admin HTTP API.
