//! Topic routing: which destination an event goes to (one topic, one per aggregate type, or
//! one per event type), from a template with `{eventType}`, `{aggregateType}` and `{version}`.

use serde::{Deserialize, Serialize};

use crate::event::DomainEvent;

/// How events are spread over destinations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", tag = "strategy", deny_unknown_fields)]
pub enum Routing {
    /// Every event to one destination.
    Single { destination: String },
    /// One destination per aggregate type, e.g. template `inventory.{aggregateType}`.
    PerAggregateType { template: String },
    /// One destination per event type, e.g. template `inventory.{eventType}.v{version}`.
    PerEventType { template: String },
}

/// A template placeholder that routing does not know.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "routing template {template:?} uses unknown placeholder {{{placeholder}}}; use {{eventType}}, {{aggregateType}} or {{version}}"
)]
pub struct TemplateError {
    pub template: String,
    pub placeholder: String,
}

const PLACEHOLDERS: [&str; 3] = ["eventType", "aggregateType", "version"];

impl Routing {
    /// Checks the template's placeholders once, at configuration time.
    pub fn validate(&self) -> Result<(), TemplateError> {
        let template = match self {
            Routing::Single { .. } => return Ok(()),
            Routing::PerAggregateType { template } | Routing::PerEventType { template } => template,
        };
        let mut rest = template.as_str();
        while let Some(start) = rest.find('{') {
            let after = &rest[start + 1..];
            let end = after.find('}').unwrap_or(after.len());
            let placeholder = &after[..end];
            if !PLACEHOLDERS.contains(&placeholder) {
                return Err(TemplateError {
                    template: template.clone(),
                    placeholder: placeholder.to_owned(),
                });
            }
            rest = after.get(end + 1..).unwrap_or_default();
        }
        Ok(())
    }

    /// Every destination this routing can name for the event types the library knows, at
    /// every registered version up to the current one; for start-up validation and for creating
    /// destinations ahead of the first send.
    pub fn known_destinations(&self) -> Vec<String> {
        let template = match self {
            Routing::Single { destination } => return vec![destination.clone()],
            Routing::PerAggregateType { template } | Routing::PerEventType { template } => template,
        };
        let mut names = Vec::new();
        for event_type in crate::event::EventType::ALL {
            for version in 1..=event_type.current_version() {
                let name = template
                    .replace("{eventType}", event_type.as_str())
                    .replace("{aggregateType}", event_type.aggregate_type())
                    .replace("{version}", &version.to_string());
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        names
    }

    /// The field a bad destination came from, for error messages.
    pub fn field(&self) -> &'static str {
        match self {
            Routing::Single { .. } => "routing.destination",
            Routing::PerAggregateType { .. } | Routing::PerEventType { .. } => "routing.template",
        }
    }

    /// The destination of one event.
    pub fn destination(&self, event: &DomainEvent) -> String {
        match self {
            Routing::Single { destination } => destination.clone(),
            Routing::PerAggregateType { template } | Routing::PerEventType { template } => template
                .replace("{eventType}", &event.event_type)
                .replace("{aggregateType}", &event.aggregate_type)
                .replace("{version}", &event.version.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;
    use crate::event::validate::enrich;

    #[test]
    fn templates_fill_placeholders_and_reject_unknown_ones() {
        let e = enrich(
            NewEvent::raw("Stockout", "InventoryItem", "i-1", 2, serde_json::json!({})),
            "",
            chrono::Utc::now(),
        );
        let per_type = Routing::PerEventType {
            template: "inventory.{eventType}.v{version}".into(),
        };
        assert_eq!(per_type.destination(&e), "inventory.Stockout.v2");
        let per_aggregate = Routing::PerAggregateType {
            template: "inv-{aggregateType}".into(),
        };
        assert_eq!(per_aggregate.destination(&e), "inv-InventoryItem");
        assert_eq!(
            Routing::Single {
                destination: "all".into()
            }
            .destination(&e),
            "all"
        );
        let bad = Routing::PerEventType {
            template: "x.{eventName}".into(),
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("unknown placeholder {eventName}")
        );
        per_type.validate().unwrap();
    }
}
