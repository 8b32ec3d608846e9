//! The [`Event`] that flows from a stream through routing and the queue to every target.
//!
//! An event is built once per upstream message and shared behind an `Arc` by all the deliveries
//! made from it; its data is a `Bytes` so that every target sends the same bytes without a copy.

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;

/// A stable identifier for one accepted event: it is the `Idempotency-Key` of every delivery
/// made from the event, on every attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventId(pub uuid::Uuid);

impl EventId {
    /// A new, time-ordered id (UUID v7).
    pub fn new() -> EventId {
        EventId(uuid::Uuid::now_v7())
    }

    /// The id as lower-case hyphenated text, written into a stack buffer.
    pub fn encode<'buffer>(&self, buffer: &'buffer mut [u8; uuid::fmt::Hyphenated::LENGTH]) -> &'buffer str {
        self.0.hyphenated().encode_lower(buffer)
    }
}

impl Default for EventId {
    fn default() -> Self {
        EventId::new()
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.hyphenated().fmt(formatter)
    }
}

/// Index of a stream in the configuration (streams sorted by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub usize);

/// Index of a target in the configuration (targets sorted by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetId(pub usize);

#[derive(Debug)]
pub struct Event {
    pub id: EventId,
    /// The stream's configured name, shared by all its events.
    pub stream_name: Arc<str>,
    /// The SSE `id:` field, when the server sent one.
    pub sse_id: Option<Box<str>>,
    pub event_type: Arc<str>,
    /// The upstream's data bytes, unchanged.
    pub data: Bytes,
    /// Whether the data is JSON.
    pub is_json: bool,
    /// The data parsed as JSON, through [`Event::json`]. `classify` parses every event once and
    /// sets it; an event loaded back from the store is parsed on first use only (a `pointer`
    /// body needs it), and once whichever targets use it.
    pub json: OnceLock<Option<serde_json::Value>>,
    pub received_at: SystemTime,
}

impl Event {
    /// The data parsed as JSON, when it is JSON.
    pub fn json(&self) -> Option<&serde_json::Value> {
        if !self.is_json {
            return None;
        }
        self.json
            .get_or_init(|| serde_json::from_slice(&self.data).ok())
            .as_ref()
    }

    /// The id of the template instance that received the event (`chat/8f1c` has `8f1c`), if
    /// it came from an instance.
    pub fn instance_id(&self) -> Option<&str> {
        self.stream_name.split_once('/').map(|(_, id)| id)
    }

    pub fn content_type(&self) -> &'static str {
        if self.is_json {
            "application/json"
        } else {
            "text/plain; charset=utf-8"
        }
    }
}
