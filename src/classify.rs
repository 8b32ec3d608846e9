//! Classification: one SSE message from a stream becomes a keepalive or an [`Event`]. Size
//! limits are enforced earlier, by the transport's framer, before a message is even parsed.
//!
//! This is the only place event data is parsed. It is pure: no IO, no metrics; the stream task
//! reports what the result says.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;

use crate::config::StreamConfig;
use crate::event::{Event, EventId};

/// The SSE field values of one message, as the parser produced them.
pub struct SseMessage {
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

#[derive(Debug)]
pub enum Classified {
    /// Connection noise: counted, never routed.
    Keepalive,
    Event {
        event: Event,
        /// The data looked like JSON but did not parse; the event stays routable as text.
        malformed_json: Option<serde_json::Error>,
    },
}

pub struct Classifier {
    stream_name: Arc<str>,
    type_pointers: Vec<String>,
    default_event_type: Arc<str>,
    keepalive: Vec<Box<str>>,
    /// Event types that routes name, shared so that most events need no allocation for their type.
    known_event_types: HashSet<Arc<str>>,
}

impl Classifier {
    pub fn new(
        stream_name: Arc<str>,
        config: &StreamConfig,
        known_event_types: impl IntoIterator<Item = Arc<str>>,
    ) -> Classifier {
        Classifier {
            stream_name,
            type_pointers: config.event_type.iter().map(|pointer| pointer.0.clone()).collect(),
            default_event_type: Arc::from(config.default_event_type.0.as_str()),
            keepalive: config.keepalive.iter().map(|text| Box::from(text.0.as_str())).collect(),
            known_event_types: known_event_types.into_iter().collect(),
        }
    }

    pub fn classify(&self, message: SseMessage, received_at: SystemTime) -> Classified {
        let SseMessage { event, data, id } = message;
        // `data:` with no value is an event with empty data under the SSE spec (a type-only
        // signal, say); it is routed like any other. `keepalive: [""]` makes such events noise.
        if self.is_keepalive(&data) {
            return Classified::Keepalive;
        }

        let (json, malformed_json) = if looks_like_json(&data) {
            match serde_json::from_str::<serde_json::Value>(&data) {
                Ok(value) => (Some(value), None),
                Err(err) => (None, Some(err)),
            }
        } else {
            (None, None)
        };

        let event_type = self.event_type(&event, json.as_ref());
        if self.is_keepalive(&event_type) {
            return Classified::Keepalive;
        }

        Classified::Event {
            event: Event {
                id: EventId::new(),
                stream_name: Arc::clone(&self.stream_name),
                sse_id: id.map(String::into_boxed_str),
                event_type,
                data: Bytes::from(data),
                is_json: json.is_some(),
                json: OnceLock::from(json),
                received_at,
            },
            malformed_json,
        }
    }

    /// The SSE `event:` field when it is set and not `message`; else the first pointer that
    /// yields a string; else the stream's default.
    fn event_type(&self, sse_event: &str, json: Option<&serde_json::Value>) -> Arc<str> {
        if !sse_event.is_empty() && sse_event != "message" {
            return self.intern(sse_event);
        }
        if let Some(json) = json {
            for pointer in &self.type_pointers {
                if let Some(found) = json.pointer(pointer).and_then(serde_json::Value::as_str) {
                    return self.intern(found);
                }
            }
        }
        Arc::clone(&self.default_event_type)
    }

    fn intern(&self, event_type: &str) -> Arc<str> {
        match self.known_event_types.get(event_type) {
            Some(known) => Arc::clone(known),
            None => Arc::from(event_type),
        }
    }

    fn is_keepalive(&self, text: &str) -> bool {
        self.keepalive.iter().any(|keepalive| **keepalive == *text)
    }
}

/// Only objects and arrays are treated as JSON: a bare word such as `keepalive` is text.
fn looks_like_json(data: &str) -> bool {
    matches!(data.trim_start().as_bytes().first(), Some(b'{' | b'['))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{JsonPointer, Text};

    fn classifier(pointers: &[&str], default: &str, keepalive: &[&str]) -> Classifier {
        let yaml = "url: http://127.0.0.1:1/stream\n";
        let mut config: StreamConfig = serde_yaml::from_str(yaml).unwrap();
        config.event_type = pointers.iter().map(|p| JsonPointer((*p).to_owned())).collect();
        config.default_event_type = Text(default.to_owned());
        config.keepalive = keepalive.iter().map(|k| Text((*k).to_owned())).collect();
        Classifier::new(Arc::from("s"), &config, [Arc::from("MESSAGE_SENT")])
    }

    fn message(event: &str, data: &str) -> SseMessage {
        SseMessage {
            event: event.to_owned(),
            data: data.to_owned(),
            id: None,
        }
    }

    /// `expected` is the event type, or "keepalive" or "malformed:<type>".
    fn check(classifier: &Classifier, event: &str, data: &str, expected: &str) {
        let outcome = match classifier.classify(message(event, data), SystemTime::now()) {
            Classified::Keepalive => "keepalive".to_owned(),
            Classified::Event {
                event,
                malformed_json: Some(_),
            } => format!("malformed:{}", event.event_type),
            Classified::Event { event, .. } => event.event_type.to_string(),
        };
        assert_eq!(outcome, expected, "event={event:?} data={data:?}");
    }

    #[test]
    fn participant_stream_types_come_from_the_event_type_field() {
        let participant = classifier(&["/eventType"], "message", &["KEEP_ALIVE"]);
        check(
            &participant,
            "message",
            r#"{"eventType":"MESSAGE_SENT","payload":{}}"#,
            "MESSAGE_SENT",
        );
        check(&participant, "message", r#"{"eventType":"KEEP_ALIVE"}"#, "keepalive");
        check(&participant, "message", r#"{"payload":1}"#, "message");
        check(&participant, "custom", r#"{"eventType":"MESSAGE_SENT"}"#, "custom");
        check(&participant, "", "plain text", "message");
        check(&participant, "message", r#"{"eventType": 5}"#, "message");
        check(&participant, "message", r#"{"eventType":"#, "malformed:message");
        check(&participant, "message", "", "message");
        check(&participant, "MESSAGE_SENT", "", "MESSAGE_SENT");
    }

    #[test]
    fn chat_stream_keepalive_is_literal_data() {
        let chat = classifier(&["/type"], "workflow_update", &["keepalive"]);
        check(&chat, "message", "keepalive", "keepalive");
        check(
            &chat,
            "message",
            r#"{"is_active":false,"type":"workflow_status"}"#,
            "workflow_status",
        );
        check(
            &chat,
            "message",
            r#"{"workflow_request":{"id":"1"}}"#,
            "workflow_update",
        );
    }

    #[test]
    fn data_bytes_are_kept_unchanged() {
        let chat = classifier(&["/type"], "workflow_update", &[]);
        let data = "{ \"type\" : \"x\",\n \"n\": 1.50 }";
        match chat.classify(message("message", data), SystemTime::now()) {
            Classified::Event { event, .. } => {
                assert_eq!(&event.data[..], data.as_bytes());
                assert_eq!(event.content_type(), "application/json");
            }
            other => panic!("expected an event, got {other:?}"),
        }
    }
}
