//! Placeholder: replaced by the admin API client.
