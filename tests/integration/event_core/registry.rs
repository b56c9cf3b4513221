//! The schema registry on the real PostgreSQL: versions, compatibility, validation by version.

use inventory_outbox::event::EventType;
use inventory_outbox::schema::compatibility::CompatibilityMode;
use inventory_outbox::schema::registry::RegistryError;
use serde_json::json;
use uuid::Uuid;

use super::{publisher, stock_changed};

#[tokio::test]
async fn compatible_versions_register_and_incompatible_ones_are_refused_with_the_reason() {
    let (db, publisher) = publisher("registry").await;
    let registry = publisher.registry();
    let subject = EventType::StockLevelChanged.as_str();
    let v1 = EventType::StockLevelChanged.json_schema();
    // Built-ins are registered as version 1; registering the same schema is idempotent.
    assert_eq!(registry.register(subject, &v1, None).await.unwrap(), 1);
    assert_eq!(
        registry.compatibility(subject).await.unwrap(),
        Some(CompatibilityMode::Backward)
    );

    // Adding an optional field is compatible: version 2.
    let mut v2 = v1.clone();
    v2["properties"]["note"] = json!({"type": "string"});
    assert_eq!(registry.register(subject, &v2, None).await.unwrap(), 2);

    // Adding a required field breaks BACKWARD: refused, naming the field.
    let mut v3 = v2.clone();
    v3["properties"]["binId"] = json!({"type": "string"});
    v3["required"].as_array_mut().unwrap().push(json!("binId"));
    let err = registry.register(subject, &v3, None).await.unwrap_err();
    assert!(matches!(err, RegistryError::Incompatible { .. }));
    assert!(err.to_string().contains("binId"), "{err}");
    assert_eq!(registry.versions(subject).await.unwrap().len(), 2);

    // Under NONE the same change is accepted.
    registry
        .set_compatibility(subject, CompatibilityMode::None)
        .await
        .unwrap();
    assert_eq!(registry.register(subject, &v3, None).await.unwrap(), 3);

    // Events are validated against the schema of their own version.
    let mut event = stock_changed(Uuid::now_v7(), 1);
    event.version = 3;
    let mut tx = db.pool.begin().await.unwrap();
    let err = publisher
        .publish_event(&mut tx, event.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"binId\" is a required property"), "{err}");
    event.payload["binId"] = json!("A-01");
    publisher.publish_event(&mut tx, event).await.unwrap();
    tx.commit().await.unwrap();

    // Not a JSON Schema at all.
    let err = registry
        .register("Custom", &json!({"type": 12}), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a valid JSON Schema"), "{err}");
    db.drop().await;
}
