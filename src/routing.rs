//! The routing table: which targets an event goes to. Built once from validated config; pure,
//! no IO.

use std::sync::Arc;

use wildmatch::WildMatch;

use crate::config::Config;
use crate::event::{Event, StreamId, TargetId};

/// The metric label for event types that no route names.
pub const OTHER_EVENT_TYPE: &str = "other";

pub struct RoutingTable {
    /// Streams by name; a stream's task finds its id here, since a reload renumbers them.
    stream_ids: std::collections::HashMap<Arc<str>, StreamId>,
    /// Indexed by `TargetId`.
    target_names: Vec<Arc<str>>,
    /// Routes that apply to each stream, indexed by `StreamId`.
    routes_by_stream: Vec<Vec<Route>>,
    /// Bounded metric labels for event types, per stream; index 0 is `other`.
    event_type_labels: Vec<Vec<Arc<str>>>,
}

struct Route {
    /// Its place in the config's `routes`, from 0.
    index: usize,
    filter: EventFilter,
    /// For an instance pattern (`chat/8f1c*`): what the instance's id must match.
    instance_id: Option<WildMatch>,
    targets: Vec<TargetId>,
}

/// Which events a route (or a template's `stop_when`) takes: their types, and values at JSON
/// pointers in their data.
pub struct EventFilter {
    events: Vec<EventMatcher>,
    where_equal: Vec<(String, serde_json::Value)>,
}

impl EventFilter {
    pub fn new(
        events: &[crate::config::Pattern],
        where_equal: &std::collections::BTreeMap<crate::config::JsonPointer, serde_json::Value>,
    ) -> EventFilter {
        EventFilter {
            events: events
                .iter()
                .map(|pattern| {
                    let text: Arc<str> = Arc::from(pattern.0.as_str());
                    if pattern.is_wildcard() {
                        EventMatcher::Wildcard {
                            matcher: WildMatch::new(&pattern.0),
                            pattern: text,
                        }
                    } else {
                        EventMatcher::Exact(text)
                    }
                })
                .collect(),
            where_equal: where_equal
                .iter()
                .map(|(pointer, value)| (pointer.0.clone(), value.clone()))
                .collect(),
        }
    }

    pub fn matches(&self, event: &Event) -> bool {
        self.events.iter().any(|matcher| matcher.matches(&event.event_type))
            && self
                .where_equal
                .iter()
                .all(|(pointer, expected)| event.json().and_then(|json| json.pointer(pointer)) == Some(expected))
    }
}

enum EventMatcher {
    Exact(Arc<str>),
    Wildcard { pattern: Arc<str>, matcher: WildMatch },
}

impl EventMatcher {
    fn matches(&self, event_type: &str) -> bool {
        match self {
            EventMatcher::Exact(name) => **name == *event_type,
            EventMatcher::Wildcard { matcher, .. } => matcher.matches(event_type),
        }
    }

    fn label(&self) -> &Arc<str> {
        match self {
            EventMatcher::Exact(name) => name,
            EventMatcher::Wildcard { pattern, .. } => pattern,
        }
    }
}

impl Route {
    fn matches(&self, event: &Event) -> bool {
        self.instance_id
            .as_ref()
            .is_none_or(|pattern| event.instance_id().is_some_and(|id| pattern.matches(id)))
            && self.filter.matches(event)
    }
}

impl RoutingTable {
    pub fn new(config: &Config) -> RoutingTable {
        let target_ids = |names: &[crate::config::TargetName]| -> Vec<TargetId> {
            let mut ids: Vec<TargetId> = names
                .iter()
                .filter_map(|name| config.targets.keys().position(|key| *key == name.0))
                .map(TargetId)
                .collect();
            ids.dedup();
            ids
        };

        let mut routes_by_stream = Vec::with_capacity(config.streams.len());
        let mut event_type_labels = Vec::with_capacity(config.streams.len());
        for stream_name in config.streams.keys() {
            let routes: Vec<Route> = config
                .routes
                .iter()
                .enumerate()
                .filter(|(_, route)| route.stream.stream_part().matches(stream_name))
                .map(|(index, route)| Route {
                    index,
                    filter: EventFilter::new(&route.events, &route.where_equal),
                    instance_id: route.stream.id_part().map(|pattern| WildMatch::new(&pattern.0)),
                    targets: target_ids(&route.targets),
                })
                .collect();

            let mut labels: Vec<Arc<str>> = vec![Arc::from(OTHER_EVENT_TYPE)];
            for matcher in routes.iter().flat_map(|route| &route.filter.events) {
                if !labels.iter().any(|label| label == matcher.label()) {
                    labels.push(Arc::clone(matcher.label()));
                }
            }
            routes_by_stream.push(routes);
            event_type_labels.push(labels);
        }
        RoutingTable {
            stream_ids: config
                .streams
                .keys()
                .enumerate()
                .map(|(index, name)| (Arc::from(name.as_str()), StreamId(index)))
                .collect(),
            target_names: config.targets.keys().map(|name| Arc::from(name.as_str())).collect(),
            routes_by_stream,
            event_type_labels,
        }
    }

    pub fn stream_id(&self, stream: &str) -> Option<StreamId> {
        self.stream_ids.get(stream).copied()
    }

    pub fn target_name(&self, target: TargetId) -> &Arc<str> {
        &self.target_names[target.0]
    }

    /// Stream names with their ids, in id order.
    pub fn streams(&self) -> impl Iterator<Item = (&Arc<str>, StreamId)> {
        let mut streams: Vec<_> = self.stream_ids.iter().map(|(name, id)| (name, *id)).collect();
        streams.sort_by_key(|(_, id)| *id);
        streams.into_iter()
    }

    /// Fills `targets` with every target of every route that `stream`'s event matches, each once.
    pub fn route(&self, stream: StreamId, event: &Event, targets: &mut Vec<TargetId>) {
        targets.clear();
        for route in &self.routes_by_stream[stream.0] {
            if route.matches(event) {
                for target in &route.targets {
                    if !targets.contains(target) {
                        targets.push(*target);
                    }
                }
            }
        }
    }

    /// The routes (by their place in the config's `routes`, from 0) that `stream`'s event
    /// matches, each with its targets: what `route` merges, for `sse-relay route test`.
    pub fn matching_routes(&self, stream: StreamId, event: &Event) -> Vec<(usize, Vec<TargetId>)> {
        self.routes_by_stream[stream.0]
            .iter()
            .filter(|route| route.matches(event))
            .map(|route| (route.index, route.targets.clone()))
            .collect()
    }

    /// The metric labels this stream's event types are counted under; index 0 is `other`.
    pub fn event_type_labels(&self, stream: StreamId) -> &[Arc<str>] {
        &self.event_type_labels[stream.0]
    }

    /// Event types that routes of this stream name exactly.
    pub fn exact_event_types(&self, stream: StreamId) -> impl Iterator<Item = Arc<str>> + '_ {
        self.routes_by_stream[stream.0]
            .iter()
            .flat_map(|route| &route.filter.events)
            .filter_map(|matcher| match matcher {
                EventMatcher::Exact(name) => Some(Arc::clone(name)),
                EventMatcher::Wildcard { .. } => None,
            })
    }

    /// Index into `event_type_labels`: the type itself when a route names it, else the first
    /// wildcard pattern that matches it, else `other`. Keeps metric labels bounded by config.
    pub fn event_type_label_index(&self, stream: StreamId, event_type: &str) -> usize {
        let labels = &self.event_type_labels[stream.0];
        if let Some(index) = labels.iter().position(|label| **label == *event_type) {
            return index;
        }
        let routes = &self.routes_by_stream[stream.0];
        routes
            .iter()
            .flat_map(|route| &route.filter.events)
            .find(|matcher| matches!(matcher, EventMatcher::Wildcard { .. }) && matcher.matches(event_type))
            .and_then(|matcher| labels.iter().position(|label| label == matcher.label()))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use bytes::Bytes;

    use super::*;
    use crate::config;
    use crate::event::EventId;

    const CONFIG: &str = r#"
streams:
  participant: { url: "http://127.0.0.1:1/p" }
  chat: { url: "http://127.0.0.1:1/c" }
targets:
  zapier: { url: "http://127.0.0.1:1/z" }
  n8n: { url: "http://127.0.0.1:1/n" }
  audit: { url: "http://127.0.0.1:1/a" }
routes:
  - stream: participant
    events: [MESSAGE_SENT, ACTION_PLAN_CARD*]
    targets: [zapier]
  - stream: chat
    events: [workflow_update]
    where: { /node_execution/status: completed }
    targets: [n8n]
  - stream: "*"
    events: [CHAT_SESSION_MEMBER_*, workflow_status]
    targets: [n8n, zapier]
  - stream: "*"
    targets: [audit, n8n]
"#;

    fn table() -> (RoutingTable, config::Config) {
        let config = config::parse(CONFIG, "test.yaml", Box::new(|_| None)).unwrap();
        (RoutingTable::new(&config), config)
    }

    fn event(stream: &str, event_type: &str, data: &str) -> Event {
        Event {
            id: EventId::new(),
            stream_name: Arc::from(stream),
            sse_id: None,
            event_type: Arc::from(event_type),
            data: Bytes::copy_from_slice(data.as_bytes()),
            is_json: serde_json::from_str::<serde_json::Value>(data).is_ok(),
            json: std::sync::OnceLock::new(),
            received_at: SystemTime::now(),
        }
    }

    /// Checks which target names an event is routed to, in order.
    fn check(stream: &str, event_type: &str, data: &str, expected: &[&str]) {
        let (table, config) = table();
        let names: Vec<&String> = config.targets.keys().collect();
        let mut targets = Vec::new();
        let stream_id = StreamId(config.streams.keys().position(|name| name == stream).unwrap());
        table.route(stream_id, &event(stream, event_type, data), &mut targets);
        let routed: Vec<&str> = targets.iter().map(|id| names[id.0].as_str()).collect();
        assert_eq!(routed, expected, "{stream}/{event_type} {data}");
    }

    #[test]
    fn routes_by_type_wildcard_and_where() {
        check("participant", "MESSAGE_SENT", "{}", &["zapier", "audit", "n8n"]);
        check(
            "participant",
            "ACTION_PLAN_CARDS_ADDED",
            "{}",
            &["zapier", "audit", "n8n"],
        );
        check(
            "participant",
            "CHAT_SESSION_MEMBER_LEFT",
            "{}",
            &["n8n", "zapier", "audit"],
        );
        check(
            "chat",
            "workflow_update",
            r#"{"node_execution":{"status":"completed"}}"#,
            &["n8n", "audit"],
        );
        check(
            "chat",
            "workflow_update",
            r#"{"node_execution":{"status":"running"}}"#,
            &["audit", "n8n"],
        );
        check("chat", "workflow_update", "not json", &["audit", "n8n"]);
        check("chat", "workflow_status", "{}", &["n8n", "zapier", "audit"]);
        check("chat", "MESSAGE_SENT", "{}", &["audit", "n8n"]);
    }

    #[test]
    fn metric_labels_are_bounded_by_config() {
        let (table, config) = table();
        let participant = StreamId(config.streams.keys().position(|n| n == "participant").unwrap());
        let label = |event_type: &str| {
            let index = table.event_type_label_index(participant, event_type);
            table.event_type_labels(participant)[index].to_string()
        };
        assert_eq!(label("MESSAGE_SENT"), "MESSAGE_SENT");
        assert_eq!(label("ACTION_PLAN_CARD_RESPONDED"), "ACTION_PLAN_CARD*");
        // The catch-all route's `*` bounds every other type to one label.
        assert_eq!(label("SOMETHING_NEW"), "*");
    }
}
