//! The names each broker accepts, as CEL expressions the API server evaluates, so a bad topic,
//! exchange or queue name is refused at `kubectl apply` instead of failing in a relay Pod.
//!
//! Each function takes the CEL expression of the name and returns a boolean CEL expression.

/// Kafka topic names: 1-249 of `[a-zA-Z0-9._-]`, and not `.` or `..`.
pub fn kafka_topic(name: &str) -> String {
    format!("({name}.matches('^[a-zA-Z0-9._-]{{1,249}}$') && {name} != '.' && {name} != '..')")
}

/// RabbitMQ exchange and queue names: 1-255 of `[a-zA-Z0-9._:-]`, not in the reserved `amq.`
/// namespace.
pub fn rabbitmq_name(name: &str) -> String {
    format!("({name}.matches('^[a-zA-Z0-9._:-]{{1,255}}$') && !{name}.startsWith('amq.'))")
}

/// RabbitMQ routing keys (a destination on the exchange): 1-255 of `[a-zA-Z0-9._:-]`.
pub fn rabbitmq_routing_key(name: &str) -> String {
    format!("{name}.matches('^[a-zA-Z0-9._:-]{{1,255}}$')")
}

/// SNS topic and SQS queue names: letters, digits, `-` and `_`, with an optional `.fifo`
/// suffix; at most 80 characters (the SQS limit, which SNS's 256 contains).
pub fn sns_sqs_name(name: &str) -> String {
    format!("{name}.matches('^[a-zA-Z0-9_-]{{1,75}}(\\\\.fifo)?$|^[a-zA-Z0-9_-]{{1,80}}$')")
}

/// A routing template with its placeholders filled by a sample word, so the name rules above
/// apply to what the template produces (the event types and aggregate types are letters).
pub fn filled_template(template: &str) -> String {
    format!("{template}.replace('{{eventType}}', 'X').replace('{{aggregateType}}', 'X').replace('{{version}}', '1')")
}
