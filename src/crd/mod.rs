//! The API of the product: the `EventPublisher` and `ReplayJob` custom resources
//! (`outbox.inventory.io/v1alpha1`), their validation (OpenAPI bounds plus CEL rules the API
//! server enforces) and the generator behind `inventory-outbox crd` and `crds/`.

pub mod common;
pub mod event_publisher;
pub mod names;
pub mod replay_job;

pub use common::SecretKeyRef;
pub use event_publisher::{EventPublisher, EventPublisherSpec, EventPublisherStatus};
pub use replay_job::{ReplayJob, ReplayJobSpec, ReplayJobStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of both kinds.
pub const GROUP: &str = "outbox.inventory.io";
/// API version of both kinds.
pub const VERSION: &str = "v1alpha1";

/// Both CRDs, in the order they are printed.
pub fn definitions() -> Vec<CustomResourceDefinition> {
    vec![EventPublisher::crd(), ReplayJob::crd()]
}

/// A CRD that cannot be rendered as YAML.
#[derive(Debug, thiserror::Error)]
#[error("render CRD {name} as YAML: {source}")]
pub struct RenderError {
    name: String,
    #[source]
    source: serde_saphyr::ser::Error,
}

/// One YAML document per CRD, each preceded by `---`, as `inventory-outbox crd` prints them.
pub fn render_yaml() -> Result<String, RenderError> {
    let mut out = String::new();
    for crd in definitions() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let text = serde_saphyr::to_string(&crd).map_err(|source| RenderError { name, source })?;
        out.push_str("---\n");
        out.push_str(&text);
        if !text.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

/// The committed file of each CRD under `crds/`, named after the CRD.
pub fn files() -> Result<Vec<(String, String)>, RenderError> {
    definitions()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let text = serde_saphyr::to_string(&crd).map_err(|source| RenderError {
                name: name.clone(),
                source,
            })?;
            Ok((format!("{name}.yaml"), text))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `crds/` is generated: regenerate with `inventory-outbox crd --out crds` after a change.
    #[test]
    fn committed_crds_match_the_rust_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
        for (file, text) in files().expect("CRDs render") {
            let committed = std::fs::read_to_string(dir.join(&file)).unwrap_or_default();
            assert!(
                committed == text,
                "crds/{file} is out of date; run `cargo run -- crd --out crds` and commit the result"
            );
        }
    }

    #[test]
    fn both_kinds_share_group_version_and_have_status_subresources() {
        for crd in definitions() {
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(crd.spec.scope, "Namespaced");
            let version = &crd.spec.versions[0];
            assert_eq!(version.name, VERSION);
            assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        }
    }

    #[test]
    fn every_schema_property_has_a_description() {
        fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
            if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
                for (name, sub) in props {
                    let here = format!("{path}.{name}");
                    // metadata, apiVersion and kind come from Kubernetes itself.
                    let builtin = path.is_empty() && matches!(name.as_str(), "metadata" | "apiVersion" | "kind");
                    if !builtin && sub.get("description").is_none() {
                        missing.push(here.clone());
                    }
                    walk(&here, sub, missing);
                }
            }
            if let Some(items) = schema.get("items") {
                walk(&format!("{path}[]"), items, missing);
            }
        }
        let mut missing = Vec::new();
        for crd in definitions() {
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema json");
            walk("", &schema["openAPIV3Schema"], &mut missing);
        }
        assert!(missing.is_empty(), "fields without a doc comment: {missing:?}");
    }
}
