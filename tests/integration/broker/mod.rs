//! Broker adapters against the real brokers of the local stack.

mod kafka;
pub(crate) mod rabbitmq;
mod sns_sqs;
