//! Placeholder: replaced by the kafka adapter tests.
