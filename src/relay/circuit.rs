//! Placeholder: replaced by the circuit breaker.
