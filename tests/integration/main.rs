//! Integration tests against the real local stack (`make env-up`): PostgreSQL, Kafka, RabbitMQ,
//! moto (SNS/SQS) and a real kube-apiserver. One test binary keeps link time down.

mod admin_api;
mod broker;
mod cluster;
mod event_core;
mod operator;
mod registry;
mod relay;
mod smoke;
mod support;
mod tls;
