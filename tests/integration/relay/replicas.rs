//! Placeholder: replaced by relay replicas tests.
