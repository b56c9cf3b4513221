//! The REST API and the Rust API make the same compatibility decisions, case by case over the
//! checker's own table (`src/schema/compatibility_cases.rs`), and both match the table.

use reqwest::{Method, StatusCode};
use serde_json::Value;

use inventory_outbox::schema::registry::RegistryError;

use super::cases::{Expect, cases};
use super::{CompatibilityMode, RunningRegistry, TOKEN};
use crate::event_core::publisher;

#[tokio::test]
async fn rest_and_rust_compatibility_decisions_agree_over_the_case_table() {
    let (db, _publisher) = publisher("registry_table").await;
    let server = RunningRegistry::start(&db, false).await;
    let registry = &server.registry;
    let cases = cases();
    assert!(cases.len() >= 24, "the shared table has {} cases", cases.len());
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in &cases {
        let subject = format!("table-{}", case.name);
        // The history goes in under NONE (it need not be compatible with itself), then the
        // case's mode applies to the candidate.
        registry
            .set_compatibility(&subject, CompatibilityMode::None)
            .await
            .expect("set NONE");
        for schema in &case.history {
            registry
                .register(&subject, schema, None)
                .await
                .expect("register history");
        }
        registry.set_compatibility(&subject, case.mode).await.expect("set mode");

        let path = format!("/compatibility/subjects/{subject}/versions?verbose=true");
        let body = RunningRegistry::schema_body(&case.candidate);
        let (status, _, answer) = server.call(Method::POST, &path, Some(&body), None).await;
        let expected_compatible = matches!(case.expect, Expect::Compatible);
        let rust = match registry.check_compatibility(&subject, &case.candidate, None).await {
            Ok(found) => found,
            // A candidate the registry cannot compile is refused by both APIs alike.
            Err(RegistryError::InvalidSchema { reason, .. }) => {
                if status != StatusCode::UNPROCESSABLE_ENTITY || answer["error_code"] != 42201 || expected_compatible {
                    failures.push(format!(
                        "{}: Rust refused an invalid schema ({reason}), REST answered {status} {answer}",
                        case.name
                    ));
                }
                continue;
            }
            Err(other) => panic!("{}: rust check failed: {other}", case.name),
        };
        let rust_messages: Vec<String> = rust.iter().map(ToString::to_string).collect();
        let rest_compatible = answer["is_compatible"].as_bool();
        let rest_messages: Vec<String> = answer["messages"]
            .as_array()
            .map(|m| m.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default();

        if status != StatusCode::OK || rest_compatible != Some(rust.is_empty()) || rest_messages != rust_messages {
            failures.push(format!(
                "{}: REST {status} {answer} vs Rust {rust_messages:?}",
                case.name
            ));
        }
        if rust.is_empty() != expected_compatible {
            failures.push(format!(
                "{}: expected compatible={expected_compatible}, registry found {rust_messages:?}",
                case.name
            ));
        }
        // Registering decides the same way: 409 exactly when the check found a problem.
        let (status, _, answer) = server
            .call(
                Method::POST,
                &format!("/subjects/{subject}/versions"),
                Some(&body),
                Some(TOKEN),
            )
            .await;
        let expected_status = if rust.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::CONFLICT
        };
        if status != expected_status || (status == StatusCode::CONFLICT && answer["error_code"] != 409) {
            failures.push(format!(
                "{}: register answered {status} {answer}, expected {expected_status}",
                case.name
            ));
        }
        checked += 1;
    }
    assert!(
        checked + 1 >= cases.len(),
        "only {checked} cases were decided, not refused as invalid"
    );
    assert!(
        failures.is_empty(),
        "{} disagreement(s) over {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    server.stop().await;
    db.drop().await;
}
