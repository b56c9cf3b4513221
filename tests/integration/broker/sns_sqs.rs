//! Placeholder: replaced by the sns_sqs adapter tests.
