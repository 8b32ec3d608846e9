//! One SSE message in, a keepalive or a list of targets out, never a panic.
//!
//! The input is `[stream selector byte] event type \0 data \0 id`: a message on one of the
//! fixed config's streams. It is classified and routed as the stream task does it, and the
//! outcome is checked against a plain reading of the config: keepalives are never routed, the event type comes from the SSE field, then the stream's JSON pointers, then
//! its default, and the targets are exactly those of the matching routes, each once, in route
//! order.

#![no_main]

use std::sync::{Arc, LazyLock};
use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use sse_relay::classify::{Classified, Classifier, SseMessage};
use sse_relay::config::{self, Config};
use sse_relay::event::{Event, StreamId};
use sse_relay::routing::RoutingTable;

const CONFIG: &str = r#"
streams:
  participant:
    url: http://127.0.0.1:1/participants/42/stream
    event_type: [/eventType]
    keepalive: [KEEP_ALIVE]
  chat:
    url: http://127.0.0.1:1/api/v1/chat-internal-messages/3f1c/listen
    event_type: [/type, /event/type, ""]
    default_event_type: workflow_update
    keepalive: [keepalive, ""]
  audit-log:
    url: http://127.0.0.1:1/audit
targets:
  zapier: { url: "http://127.0.0.1:2/zapier" }
  n8n: { url: "http://127.0.0.1:2/n8n" }
  archive: { url: "http://127.0.0.1:2/archive" }
  alerts: { url: "http://127.0.0.1:2/alerts" }
routes:
  - stream: participant
    events: [MESSAGE_SENT, ACTION_PLAN_CARD*]
    targets: [zapier]
  - stream: chat
    events: [workflow_update]
    where: { /node_execution/status: completed }
    targets: [n8n]
  - stream: "*"
    events: [CHAT_SESSION_MEMBER_*, workflow_status, "?RROR"]
    targets: [n8n, zapier]
  - stream: "audit*"
    targets: [archive]
  - stream: "c?at"
    events: ["*"]
    where: { /priority: 1, /flags/urgent: true, /owner: null }
    targets: [alerts, alerts]
  - stream: participant
    events: [message]
    where: { "/a~1b/~0c": [1, "x"] }
    targets: [archive, zapier]
"#;

struct Relay {
    config: Config,
    table: RoutingTable,
    /// One per stream, in `StreamId` order.
    classifiers: Vec<Classifier>,
}

static RELAY: LazyLock<Relay> = LazyLock::new(|| {
    let config = config::parse(CONFIG, "route.yaml", Box::new(|_| None)).expect("the fixed config is valid");
    let table = RoutingTable::new(&config);
    let classifiers = config
        .streams
        .iter()
        .map(|(name, stream)| {
            let stream_id = table.stream_id(name).expect("every stream has an id");
            Classifier::new(Arc::from(name.as_str()), stream, table.exact_event_types(stream_id))
        })
        .collect();
    Relay {
        config,
        table,
        classifiers,
    }
});

fuzz_target!(|bytes: &[u8]| {
    let Some((&selector, rest)) = bytes.split_first() else {
        return;
    };
    let relay = &*RELAY;
    let stream_index = usize::from(selector) % relay.config.streams.len();
    let (stream_name, stream) = relay.config.streams.iter().nth(stream_index).unwrap();
    let mut pieces = rest.splitn(3, |&byte| byte == 0);
    let event = String::from_utf8_lossy(pieces.next().unwrap_or_default()).into_owned();
    let data = String::from_utf8_lossy(pieces.next().unwrap_or_default()).into_owned();
    let id = pieces.next().map(|id| String::from_utf8_lossy(id).into_owned());

    let message = SseMessage {
        event: event.clone(),
        data: data.clone(),
        id: id.clone(),
    };
    let stream_id = relay.table.stream_id(stream_name).unwrap();
    let is_keepalive = |text: &str| stream.keepalive.iter().any(|keepalive| keepalive.0 == text);
    let is_noise = is_keepalive(&data);
    let json = looks_like_json(&data)
        .then(|| serde_json::from_str::<serde_json::Value>(&data).ok())
        .flatten();
    let expected_type = expected_event_type(stream, &event, json.as_ref());

    match relay.classifiers[stream_index].classify(message, SystemTime::now()) {
        Classified::Keepalive => assert!(
            is_noise || is_keepalive(&expected_type),
            "not a keepalive: event {event:?}, data {data:?}"
        ),
        Classified::Event { event: classified, .. } => {
            assert!(!is_noise, "keepalive data became an event: {data:?}");
            assert_eq!(*classified.event_type, *expected_type, "event {event:?}, data {data:?}");
            assert!(
                !is_keepalive(&classified.event_type),
                "a keepalive type became an event"
            );
            assert_eq!(&classified.data[..], data.as_bytes(), "the data bytes changed");
            assert_eq!(classified.sse_id.as_deref(), id.as_deref());
            assert_eq!(classified.json, json);
            assert_eq!(&*classified.stream_name, stream_name.as_str());
            check_route(relay, stream_id, stream_name, &classified);
        }
    }
});

fn check_route(relay: &Relay, stream_id: StreamId, stream_name: &str, event: &Event) {
    let mut targets = Vec::new();
    relay.table.route(stream_id, event, &mut targets);
    let routed: Vec<&str> = targets.iter().map(|id| &**relay.table.target_name(*id)).collect();

    let mut expected: Vec<&str> = Vec::new();
    for route in &relay.config.routes {
        let matches = route.stream.0.matches(stream_name)
            && route.events.iter().any(|pattern| pattern.matches(&event.event_type))
            && route
                .where_equal
                .iter()
                .all(|(pointer, value)| event.json.as_ref().and_then(|json| json.pointer(&pointer.0)) == Some(value));
        if matches {
            for target in &route.targets {
                if !expected.contains(&target.0.as_str()) {
                    expected.push(&target.0);
                }
            }
        }
    }
    assert_eq!(routed, expected, "stream {stream_name}, type {:?}", event.event_type);

    let labels = relay.table.event_type_labels(stream_id);
    let label = relay.table.event_type_label_index(stream_id, &event.event_type);
    assert!(label < labels.len());
}

/// The SSE `event:` field unless empty or `message`; else the first JSON pointer that yields a
/// string; else the stream's default.
fn expected_event_type(stream: &config::StreamConfig, event: &str, json: Option<&serde_json::Value>) -> String {
    if !event.is_empty() && event != "message" {
        return event.to_owned();
    }
    json.and_then(|json| {
        stream
            .event_type
            .iter()
            .find_map(|pointer| json.pointer(&pointer.0).and_then(serde_json::Value::as_str))
    })
    .unwrap_or(&stream.default_event_type.0)
    .to_owned()
}

fn looks_like_json(data: &str) -> bool {
    matches!(data.trim_start().as_bytes().first(), Some(b'{' | b'['))
}
