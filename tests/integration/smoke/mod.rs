//! Smoke tests: each real component of the local stack answers the crate the product uses.

mod kafka;
mod kube;
mod postgres;
mod rabbitmq;
mod sns_sqs;
