//! Placeholder: replaced by the retry policy.
