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
        .into_iter()
        .map(reflow_descriptions)
        .collect()
}

/// The schema's descriptions come from doc comments, wrapped at the source's line width;
/// `kubectl explain` wraps again and would break lines mid-sentence. Lines of a paragraph are
/// joined; blank lines and list items keep their breaks.
fn reflow_descriptions(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, child) in map.iter_mut() {
                    match child {
                        serde_json::Value::String(text) if key == "description" => *text = reflow(text),
                        _ => walk(child),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let Ok(mut value) = serde_json::to_value(&crd) else {
        return crd;
    };
    walk(&mut value);
    serde_json::from_value(value).unwrap_or(crd)
}

fn reflow(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, paragraph) in text.split("\n\n").enumerate() {
        if i > 0 {
            out.push_str("\n\n");
        }
        for (j, line) in paragraph.lines().map(str::trim).enumerate() {
            if j > 0 {
                let item = line.starts_with("- ") || line.starts_with("* ");
                out.push(if item { '\n' } else { ' ' });
            }
            out.push_str(line);
        }
    }
    out
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

    #[test]
    fn descriptions_are_reflowed_into_paragraphs() {
        assert_eq!(
            reflow("Secret key holding the token (failed and dead-lettered\nevents). Without it\nthe API is off."),
            "Secret key holding the token (failed and dead-lettered events). Without it the API is off."
        );
        assert_eq!(reflow("One.\n\nTwo\nlines:\n- a\n- b"), "One.\n\nTwo lines:\n- a\n- b");
        // The admin token's doc comment breaks after "dead-lettered" in the source.
        let json = serde_json::to_string(&definitions()[0]).expect("render");
        assert!(
            json.contains("(failed and dead-lettered events)"),
            "a description still breaks mid-sentence"
        );
    }

    /// `crds/` and the chart's `charts/inventory-outbox/crds/` are generated: regenerate both with
    /// `inventory-outbox crd --out crds` (and `--out charts/inventory-outbox/crds`) after a change.
    #[test]
    fn committed_crds_match_the_rust_types() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut stale = Vec::new();
        for dir in ["crds", "charts/inventory-outbox/crds"] {
            let expected = files().expect("CRDs render");
            for (file, text) in &expected {
                let committed = std::fs::read_to_string(root.join(dir).join(file)).unwrap_or_default();
                if committed != *text {
                    stale.push(format!("{dir}/{file}"));
                }
            }
            // A CRD file the types no longer produce would still be installed by Helm.
            let entries = std::fs::read_dir(root.join(dir)).unwrap_or_else(|e| panic!("read {dir}: {e}"));
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let yaml = name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json");
                if yaml && !expected.iter().any(|(file, _)| *file == name) {
                    stale.push(format!("{dir}/{name} (not generated by `inventory-outbox crd`)"));
                }
            }
        }
        assert!(
            stale.is_empty(),
            "out of date: {stale:?}; run `cargo run -- crd --out crds && cargo run -- crd --out charts/inventory-outbox/crds` and commit the result"
        );
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
