//! Placeholder: replaced by relay poison tests.
