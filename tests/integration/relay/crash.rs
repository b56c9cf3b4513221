//! Placeholder: replaced by relay crash tests.
