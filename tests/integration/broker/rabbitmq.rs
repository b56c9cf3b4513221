//! Placeholder: replaced by the rabbitmq adapter tests.
