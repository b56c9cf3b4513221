//! The encode step the three adapters share: an event in the publisher's CloudEvents mode
//! (body, content type, the context attributes that travel beside the body), before each
//! adapter maps it to its wire form (Kafka record headers, AMQP properties and headers, SNS/SQS
//! message attributes). Keeping the mode's rules here means a consumer reads the same envelope
//! whichever broker it sits behind; what stays per adapter is only what its protocol binding
//! dictates (header prefixes, size limits, attribute counts).

use super::{CloudEventsMode, SendError};
use crate::event::DomainEvent;
use crate::event::cloudevents;

/// One event in its CloudEvents mode, not yet in any broker's wire form.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    /// The value of the binding's content type (Kafka `content-type` header, AMQP
    /// `content-type` property): the payload's type in binary mode, the CloudEvents JSON
    /// format in structured mode.
    pub content_type: &'static str,
    /// Context attributes and extensions carried beside the body, unprefixed (`id`, `type`,
    /// …) and in the stable order of [`cloudevents::attributes`]: every one of them in binary
    /// mode except `datacontenttype` (that is [`Encoded::content_type`]); none in structured
    /// mode, where they are in the body.
    pub attributes: Vec<(&'static str, String)>,
    /// W3C trace context, for the plain `traceparent` header that OpenTelemetry propagators
    /// read (the CloudEvents extension of the same name is among the binary attributes).
    pub traceparent: Option<String>,
    /// The JSON payload in binary mode; the whole CloudEvent document in structured mode.
    pub body: String,
}

impl Encoded {
    /// Encodes `event` in `mode`. The only failure is a payload that does not serialize, which
    /// fails the same way on every attempt: a [`SendError::Message`].
    pub fn new(event: &DomainEvent, mode: CloudEventsMode) -> Result<Self, SendError> {
        let failed =
            |e: serde_json::Error| SendError::Message(format!("cannot encode event {} as JSON: {e}", event.event_id));
        let traceparent = event.metadata.traceparent.clone();
        Ok(match mode {
            CloudEventsMode::Binary => Encoded {
                content_type: cloudevents::CONTENT_TYPE,
                attributes: cloudevents::attributes(event)
                    .into_iter()
                    .filter(|(name, _)| *name != "datacontenttype")
                    .collect(),
                traceparent,
                body: serde_json::to_string(&event.payload).map_err(failed)?,
            },
            CloudEventsMode::Structured => Encoded {
                content_type: cloudevents::STRUCTURED_CONTENT_TYPE,
                attributes: Vec::new(),
                traceparent,
                body: serde_json::to_string(&cloudevents::to_structured(event)).map_err(failed)?,
            },
        })
    }

    /// The attributes with a protocol binding's prefix (`ce_id`, `cloudEvents:id`, …).
    pub fn prefixed<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (String, &'a str)> + 'a {
        self.attributes
            .iter()
            .map(move |(name, value)| (format!("{prefix}{name}"), value.as_str()))
    }

    /// The value of one attribute, if carried beside the body.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;
    use crate::event::validate::enrich;

    fn event() -> DomainEvent {
        let mut e = enrich(
            NewEvent::raw(
                "StockLevelChanged",
                "InventoryItem",
                "item-7",
                2,
                serde_json::json!({"newQuantity": 3}),
            ),
            "warehouse-svc",
            chrono::Utc::now(),
        );
        e.metadata.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        e
    }

    #[test]
    fn binary_mode_carries_every_attribute_beside_the_payload() {
        let e = event();
        let encoded = Encoded::new(&e, CloudEventsMode::Binary).unwrap();
        assert_eq!(encoded.body, r#"{"newQuantity":3}"#);
        assert_eq!(encoded.content_type, "application/json");
        assert_eq!(encoded.attribute("datacontenttype"), None);
        assert_eq!(encoded.attribute("id"), Some(e.event_id.to_string().as_str()));
        assert_eq!(encoded.attribute("subject"), Some("item-7"));
        assert_eq!(encoded.traceparent, e.metadata.traceparent);
        // Reading the attributes back through a binding gives the same event.
        let mut headers: Vec<(String, String)> = encoded
            .prefixed(cloudevents::KAFKA_PREFIX)
            .map(|(k, v)| (k, v.to_owned()))
            .collect();
        headers.push(("content-type".to_owned(), encoded.content_type.to_owned()));
        let back = cloudevents::from_binary(&headers, encoded.body.as_bytes(), cloudevents::KAFKA_PREFIX).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn structured_mode_puts_the_whole_envelope_in_the_body() {
        let e = event();
        let encoded = Encoded::new(&e, CloudEventsMode::Structured).unwrap();
        assert_eq!(encoded.content_type, "application/cloudevents+json");
        assert!(encoded.attributes.is_empty());
        assert_eq!(encoded.traceparent, e.metadata.traceparent);
        let doc: serde_json::Value = serde_json::from_str(&encoded.body).unwrap();
        assert_eq!(cloudevents::from_structured(&doc).unwrap(), e);
    }
}
