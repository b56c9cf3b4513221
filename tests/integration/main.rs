//! Integration tests against the real local stack (`make env-up`): PostgreSQL, Kafka, RabbitMQ,
//! moto (SNS/SQS) and a real kube-apiserver. One test binary keeps link time down.

mod admin_api;
mod broker;
mod chart;
mod cluster;
mod event_core;
mod examples;
mod operator;
mod registry;
mod relay;
mod replay;
mod smoke;
mod support;
mod tls;
