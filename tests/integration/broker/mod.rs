//! Broker adapters against the real brokers of the local stack.

mod kafka;
mod rabbitmq;
mod sns_sqs;
