//! Placeholder: replaced by the relay metrics.
