//! The CRD reference under `docs/reference/`, generated from the CRDs the Rust types produce
//! (every field with its type, default, bounds and CEL rules), and the test that fails when the
//! committed pages drift. Regenerate with
//! `UPDATE_REFERENCE_DOCS=1 cargo test --test integration chart::reference`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/reference")
}

/// One table cell: newlines folded (Markdown tables are one line per row), pipes escaped.
fn cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// Inline code for a cell; a backtick inside would end the span, so such text gets a longer
/// fence.
fn code(text: &str) -> String {
    let folded = cell(text);
    if folded.contains('`') {
        format!("`` {folded} ``")
    } else {
        format!("`{folded}`")
    }
}

fn type_of(schema: &Value) -> String {
    if schema.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true) {
        return "integer or string".to_owned();
    }
    let base = schema.get("type").and_then(Value::as_str).unwrap_or("any");
    match base {
        "array" => format!(
            "array of {}",
            schema.get("items").map(type_of).unwrap_or_else(|| "any".into())
        ),
        "object" if schema.get("properties").is_none() => match schema.get("additionalProperties") {
            Some(values) if values.is_object() => format!("map of string to {}", type_of(values)),
            _ => "object".to_owned(),
        },
        _ => match schema.get("format").and_then(Value::as_str) {
            Some(format) => format!("{base} ({format})"),
            None => base.to_owned(),
        },
    }
}

/// Bounds, patterns, enums and CEL rules of one schema node, as list items.
fn validation_of(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let num = |key: &str| schema.get(key).map(Value::to_string);
    if let Some(v) = schema.get("enum").and_then(Value::as_array) {
        let values: Vec<String> = v.iter().map(|x| code(x.as_str().unwrap_or(&x.to_string()))).collect();
        out.push(format!("one of {}", values.join(", ")));
    }
    for (key, label) in [
        ("minimum", "minimum"),
        ("maximum", "maximum"),
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
        ("minProperties", "min properties"),
        ("maxProperties", "max properties"),
    ] {
        if let Some(v) = num(key) {
            out.push(format!("{label} {v}"));
        }
    }
    if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
        out.push(format!("pattern {}", code(p)));
    }
    if let Some(t) = schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        let keys = schema
            .get("x-kubernetes-list-map-keys")
            .and_then(Value::as_array)
            .map(|k| {
                k.iter()
                    .filter_map(Value::as_str)
                    .map(code)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        out.push(if keys.is_empty() {
            format!("list type {}", code(t))
        } else {
            format!("list type {} keyed by {keys}", code(t))
        });
    }
    for rule in schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let expr = rule.get("rule").and_then(Value::as_str).unwrap_or_default();
        let message = rule.get("message").and_then(Value::as_str).unwrap_or_default();
        let mut line = format!("CEL {}", code(expr));
        if !message.is_empty() {
            let _ = write!(line, " (\"{}\")", cell(message));
        }
        if expr.contains("oldSelf") {
            line.push_str(" [on update]");
        }
        out.push(line);
    }
    out
}

/// Writes a section for `schema` at `path` (a table of its fields), then one for each field
/// that is itself an object with fields, depth first in field order.
fn object_section(out: &mut String, path: &str, schema: &Value) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let _ = writeln!(out, "### `{path}`\n");
    if let Some(d) = schema.get("description").and_then(Value::as_str) {
        let _ = writeln!(out, "{}\n", cell(d));
    }
    let own = validation_of(schema);
    if !own.is_empty() {
        let _ = writeln!(out, "Rules on `{path}` as a whole:\n");
        for v in &own {
            // Outside a table a pipe needs no escape (and GFM would show the backslash).
            let _ = writeln!(out, "- {}", v.replace("\\|", "|"));
        }
        out.push('\n');
    }
    out.push_str("| field | type | required | default | validation | description |\n");
    out.push_str("| --- | --- | --- | --- | --- | --- |\n");
    let mut nested = Vec::new();
    for (name, sub) in props {
        let default = sub.get("default").map(|d| code(&d.to_string())).unwrap_or_default();
        let mut rules = validation_of(sub);
        // Item-level rules matter as much as the array's own.
        if let Some(items) = sub.get("items") {
            rules.extend(validation_of(items).into_iter().map(|r| format!("each item: {r}")));
        }
        let _ = writeln!(
            out,
            "| `{name}` | {} | {} | {default} | {} | {} |",
            type_of(sub),
            if required.contains(&name.as_str()) { "yes" } else { "" },
            rules.join("; "),
            cell(sub.get("description").and_then(Value::as_str).unwrap_or_default()),
        );
        let child = format!("{path}.{name}");
        if sub.get("properties").is_some() {
            nested.push((child, sub.clone()));
        } else if let Some(items) = sub.get("items").filter(|i| i.get("properties").is_some()) {
            nested.push((format!("{child}[]"), items.clone()));
        } else if let Some(values) = sub
            .get("additionalProperties")
            .filter(|v| v.get("properties").is_some())
        {
            nested.push((format!("{child}.*"), values.clone()));
        }
    }
    out.push('\n');
    for (child, sub) in nested {
        object_section(out, &child, &sub);
    }
}

/// The whole reference page of one CRD.
pub fn render(crd: &CustomResourceDefinition) -> String {
    let spec = &crd.spec;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<!-- Generated from the Rust types by tests/integration/chart/reference.rs; do not edit.\n     Regenerate: UPDATE_REFERENCE_DOCS=1 cargo test --test integration chart::reference -->\n"
    );
    let _ = writeln!(out, "# {}\n", spec.names.kind);
    let short = spec.names.short_names.clone().unwrap_or_default();
    let _ = writeln!(out, "| | |\n| --- | --- |");
    let _ = writeln!(out, "| API version | `{}/{}` |", spec.group, spec.versions[0].name);
    let _ = writeln!(out, "| kind | `{}` |", spec.names.kind);
    let _ = writeln!(out, "| scope | {} |", spec.scope);
    let _ = writeln!(out, "| plural | `{}` |", spec.names.plural);
    if !short.is_empty() {
        let _ = writeln!(
            out,
            "| short names | {} |",
            short.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
        );
    }
    let _ = writeln!(out, "| CRD | `{}` |\n", crd.metadata.name.clone().unwrap_or_default());
    for version in &spec.versions {
        let columns = version.additional_printer_columns.clone().unwrap_or_default();
        if !columns.is_empty() {
            let _ = writeln!(out, "## `kubectl get` columns\n");
            out.push_str("| column | type | from | description |\n| --- | --- | --- | --- |\n");
            for c in columns {
                let _ = writeln!(
                    out,
                    "| {} | {} | `{}` | {} |",
                    c.name,
                    c.type_,
                    c.json_path,
                    cell(c.description.as_deref().unwrap_or_default())
                );
            }
            out.push('\n');
        }
        let schema = serde_json::to_value(&version.schema).expect("CRD schema serialises");
        let root = &schema["openAPIV3Schema"];
        for part in ["spec", "status"] {
            if let Some(sub) = root.get("properties").and_then(|p| p.get(part)) {
                let _ = writeln!(out, "## {part}\n");
                object_section(&mut out, part, sub);
            }
        }
    }
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}

/// `docs/reference/<plural>.md` for each CRD.
pub fn pages() -> Vec<(String, String)> {
    inventory_outbox::crd::definitions()
        .iter()
        .map(|crd| (format!("{}.md", crd.spec.names.plural), render(crd)))
        .collect()
}

#[test]
fn crd_reference_docs_match_the_rust_types() {
    let dir = reference_dir();
    let update = std::env::var_os("UPDATE_REFERENCE_DOCS").is_some();
    let mut stale = Vec::new();
    for (file, text) in pages() {
        let path = dir.join(&file);
        if update {
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
            std::fs::write(&path, &text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        } else if std::fs::read_to_string(&path).unwrap_or_default() != text {
            stale.push(format!("docs/reference/{file}"));
        }
    }
    assert!(
        stale.is_empty(),
        "out of date: {stale:?}; regenerate with `UPDATE_REFERENCE_DOCS=1 cargo test --test integration chart::reference` and commit"
    );
}

#[test]
fn crd_reference_lists_every_field_and_every_cel_rule() {
    fn walk(schema: &Value, fields: &mut Vec<String>, rules: &mut Vec<String>) {
        for rule in schema
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            rules.push(rule["rule"].as_str().unwrap_or_default().to_owned());
        }
        for (name, sub) in schema
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            fields.push(name.clone());
            walk(sub, fields, rules);
        }
        for key in ["items", "additionalProperties"] {
            if let Some(sub) = schema.get(key).filter(|s| s.is_object()) {
                walk(sub, fields, rules);
            }
        }
    }
    for crd in inventory_outbox::crd::definitions() {
        let page = render(&crd);
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema json");
        let (mut fields, mut rules) = (Vec::new(), Vec::new());
        for part in ["spec", "status"] {
            walk(&schema["openAPIV3Schema"]["properties"][part], &mut fields, &mut rules);
        }
        let missing_fields: Vec<_> = fields
            .iter()
            .filter(|f| !page.contains(&format!("| `{f}` |")))
            .collect();
        let missing_rules: Vec<_> = rules
            .iter()
            .filter(|r| !page.contains(&cell(r)) && !page.contains(&cell(r).replace("\\|", "|")))
            .collect();
        assert!(
            missing_fields.is_empty() && missing_rules.is_empty(),
            "{}: fields missing from the reference: {missing_fields:?}; CEL rules missing: {missing_rules:?}",
            crd.spec.names.kind
        );
        assert!(!rules.is_empty(), "{} has CEL rules to document", crd.spec.names.kind);
    }
}
