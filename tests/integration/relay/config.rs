//! Placeholder: replaced by relay config tests.
