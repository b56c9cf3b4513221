//! Bad requests get Confluent's status, `error_code` and a message naming the problem; the
//! soft-then-permanent delete protocol and the token rules hold.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::{RunningRegistry, TOKEN};
use crate::event_core::publisher;

/// Asserts a Confluent error answer.
fn assert_error(answer: (StatusCode, String, Value), status: StatusCode, code: u64, names: &str) {
    let (got_status, content_type, body) = answer;
    assert_eq!(got_status, status, "{body}");
    assert_eq!(body["error_code"], json!(code), "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains(names), "message {message:?} should name {names:?}");
    assert_eq!(content_type, "application/vnd.schemaregistry.v1+json");
}

fn object(required: &[&str]) -> Value {
    json!({
        "type": "object",
        "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer"}},
        "required": required,
    })
}

#[tokio::test]
async fn bad_requests_get_confluent_error_codes_and_messages_naming_the_problem() {
    let (db, _publisher) = publisher("registry_errors").await;
    let server = RunningRegistry::start(&db, false).await;
    let body = RunningRegistry::schema_body(&object(&["sku"]));
    let post = Method::POST;

    // Unknown subject, bad version, unknown version, unknown id.
    assert_error(
        server
            .call(Method::GET, "/subjects/nope-value/versions", None, None)
            .await,
        StatusCode::NOT_FOUND,
        40401,
        "Subject 'nope-value' not found",
    );
    let (status, _, registered) = server
        .call(post.clone(), "/subjects/bins-value/versions", Some(&body), Some(TOKEN))
        .await;
    assert_eq!(status, StatusCode::OK, "{registered}");
    let id = registered["id"].as_u64().expect("id");
    assert_error(
        server
            .call(Method::GET, "/subjects/bins-value/versions/zero", None, None)
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        42202,
        "'zero' is not a valid version",
    );
    assert_error(
        server
            .call(Method::GET, "/subjects/bins-value/versions/0", None, None)
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        42202,
        "'0'",
    );
    assert_error(
        server
            .call(Method::GET, "/subjects/bins-value/versions/7", None, None)
            .await,
        StatusCode::NOT_FOUND,
        40402,
        "Version 7 not found",
    );
    assert_error(
        server.call(Method::GET, "/schemas/ids/999999", None, None).await,
        StatusCode::NOT_FOUND,
        40403,
        "Schema 999999 not found",
    );
    // Look-up of a schema the subject does not hold.
    assert_error(
        server
            .call(
                post.clone(),
                "/subjects/bins-value",
                Some(&RunningRegistry::schema_body(&object(&[]))),
                None,
            )
            .await,
        StatusCode::NOT_FOUND,
        40403,
        "Schema not found under subject 'bins-value'",
    );

    // Malformed schemas.
    let malformed = [
        (
            json!({"schemaType": "JSON", "schema": "{\"type\": 12}"}),
            "Invalid schema",
        ),
        (
            json!({"schemaType": "JSON", "schema": "{not json"}),
            "the schema is not JSON",
        ),
        (json!({"schema": "{}"}), "schemaType AVRO is not supported"),
        (json!({"schemaType": "JSON"}), "no \"schema\" field"),
    ];
    for (request, names) in malformed {
        assert_error(
            server
                .call(
                    post.clone(),
                    "/subjects/bins-value/versions",
                    Some(&request),
                    Some(TOKEN),
                )
                .await,
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            names,
        );
    }
    assert_error(
        server
            .call(
                Method::PUT,
                "/config/bins-value",
                Some(&json!({"compatibility": "SIDEWAYS"})),
                Some(TOKEN),
            )
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        42203,
        "'SIDEWAYS'",
    );
    assert_error(
        server.call(Method::GET, "/config/bins-value", None, None).await,
        StatusCode::NOT_FOUND,
        40408,
        "does not have subject-level compatibility",
    );

    // Writes need the token; reads are open on this server.
    assert_error(
        server
            .call(post.clone(), "/subjects/other-value/versions", Some(&body), None)
            .await,
        StatusCode::UNAUTHORIZED,
        40101,
        "needs the admin token",
    );
    assert_error(
        server
            .call(
                Method::PUT,
                "/config",
                Some(&json!({"compatibility": "NONE"})),
                Some("wrong-token-wrong-token"),
            )
            .await,
        StatusCode::UNAUTHORIZED,
        40101,
        "invalid admin token",
    );
    assert_error(
        server.call(Method::DELETE, "/subjects/bins-value", None, None).await,
        StatusCode::UNAUTHORIZED,
        40101,
        "needs the admin token",
    );

    // An incompatible registration: 409 naming the field.
    let (status, _, _) = server
        .call(
            Method::PUT,
            "/config/bins-value",
            Some(&json!({"compatibility": "BACKWARD"})),
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_error(
        server
            .call(
                post.clone(),
                "/subjects/bins-value/versions",
                Some(&RunningRegistry::schema_body(&object(&["sku", "quantity"]))),
                Some(TOKEN),
            )
            .await,
        StatusCode::CONFLICT,
        409,
        "field `quantity` is required by the reader",
    );

    // Soft, then permanent delete of a version.
    assert_error(
        server
            .call(
                Method::DELETE,
                "/subjects/bins-value/versions/1?permanent=true",
                None,
                Some(TOKEN),
            )
            .await,
        StatusCode::NOT_FOUND,
        40407,
        "Version 1 was not deleted first",
    );
    let (status, _, deleted) = server
        .call(Method::DELETE, "/subjects/bins-value/versions/1", None, Some(TOKEN))
        .await;
    assert_eq!((status, deleted), (StatusCode::OK, json!(1)));
    assert_error(
        server
            .call(Method::DELETE, "/subjects/bins-value/versions/1", None, Some(TOKEN))
            .await,
        StatusCode::NOT_FOUND,
        40406,
        "Version 1 was soft deleted",
    );
    // Old messages stay readable by id while the version is only soft-deleted.
    let (status, _, by_id) = server
        .call(Method::GET, &format!("/schemas/ids/{id}"), None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{by_id}");
    assert_eq!(by_id["schemaType"], "JSON");
    assert_error(
        server
            .call(Method::GET, "/subjects/bins-value/versions", None, None)
            .await,
        StatusCode::NOT_FOUND,
        40401,
        "bins-value",
    );
    let (status, _, listed) = server
        .call(Method::GET, "/subjects/bins-value/versions?deleted=true", None, None)
        .await;
    assert_eq!((status, listed), (StatusCode::OK, json!([1])));

    // Subjects: permanent needs soft first; soft twice is refused.
    let (status, _, _) = server
        .call(post.clone(), "/subjects/bins-value/versions", Some(&body), Some(TOKEN))
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "re-registering after a soft delete is a new version"
    );
    let (_, _, versions) = server
        .call(Method::GET, "/subjects/bins-value/versions", None, None)
        .await;
    assert_eq!(versions, json!([2]), "numbers are not reused");
    assert_error(
        server
            .call(Method::DELETE, "/subjects/bins-value?permanent=true", None, Some(TOKEN))
            .await,
        StatusCode::NOT_FOUND,
        40405,
        "was not deleted first",
    );
    let (status, _, deleted) = server
        .call(Method::DELETE, "/subjects/bins-value", None, Some(TOKEN))
        .await;
    assert_eq!((status, deleted), (StatusCode::OK, json!([2])));
    assert_error(
        server
            .call(Method::DELETE, "/subjects/bins-value", None, Some(TOKEN))
            .await,
        StatusCode::NOT_FOUND,
        40404,
        "was soft deleted",
    );
    let (status, _, deleted) = server
        .call(Method::DELETE, "/subjects/bins-value?permanent=true", None, Some(TOKEN))
        .await;
    assert_eq!((status, deleted), (StatusCode::OK, json!([1, 2])));
    assert_error(
        server
            .call(Method::GET, &format!("/schemas/ids/{id}"), None, None)
            .await,
        StatusCode::NOT_FOUND,
        40403,
        "not found",
    );
    assert_error(
        server.call(Method::GET, "/no/such/route", None, None).await,
        StatusCode::NOT_FOUND,
        404,
        "no route for GET /no/such/route",
    );
    server.stop().await;
    db.drop().await;
}

#[tokio::test]
async fn protected_reads_need_the_token_and_the_built_in_subjects_are_served() {
    let (db, _publisher) = publisher("registry_reads").await;
    let server = RunningRegistry::start(&db, true).await;
    assert_error(
        server.call(Method::GET, "/subjects", None, None).await,
        StatusCode::UNAUTHORIZED,
        40101,
        "reading this registry needs the admin token",
    );
    let (status, content_type, subjects) = server.call(Method::GET, "/subjects", None, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "application/vnd.schemaregistry.v1+json");
    let subjects: Vec<&str> = subjects
        .as_array()
        .expect("list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(subjects.len(), 15, "{subjects:?}");
    assert!(subjects.contains(&"StockLevelChanged"));
    let (status, _, latest) = server
        .call(
            Method::GET,
            "/subjects/StockLevelChanged/versions/latest",
            None,
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{latest}");
    let schema: Value = serde_json::from_str(latest["schema"].as_str().expect("schema string")).expect("schema JSON");
    assert_eq!(
        schema,
        inventory_outbox::event::EventType::StockLevelChanged.json_schema()
    );
    let (_, _, raw) = server
        .call(
            Method::GET,
            &format!("/schemas/ids/{}/schema", latest["id"]),
            None,
            Some(TOKEN),
        )
        .await;
    assert_eq!(raw, schema);
    // The built-ins keep the level `migrate` gave them; the global level is Confluent's default.
    let (_, _, level) = server
        .call(Method::GET, "/config/StockLevelChanged", None, Some(TOKEN))
        .await;
    assert_eq!(level, json!({"compatibilityLevel": "BACKWARD"}));
    let (_, _, global) = server.call(Method::GET, "/config", None, Some(TOKEN)).await;
    assert_eq!(global, json!({"compatibilityLevel": "BACKWARD"}));
    server.stop().await;
    db.drop().await;
}
