//! `sse-relay route test`: what the relay would do with one sample message of a stream. It
//! classifies the message as the stream would (type, keepalive or not), lists the routes that
//! match, and shows, per target, the request that would be sent: headers (the target's own
//! masked, a signature as it would be computed now) and the exact body. No request is sent.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::SystemTime;

use crate::classify::{Classified, Classifier, SseMessage};
use crate::config::{Config, InstanceId, StreamInstance};
use crate::delivery::{TargetRuntime, request};
use crate::event::TargetId;
use crate::routing::RoutingTable;
use crate::telemetry::Metrics;

/// What a sample came to: the report to print, and whether any route matched.
pub struct Outcome {
    pub report: String,
    pub routed: bool,
}

/// A sample is either an SSE message (`event:`, `data:` and `id:` lines) or, when it has no
/// `data:` line, the data itself. `event_type` sets the SSE `event:` field.
pub fn parse_sample(text: &str, event_type: Option<&str>) -> SseMessage {
    let text = text.strip_suffix('\n').unwrap_or(text);
    let is_sse = text.lines().any(|line| line.starts_with("data:") || line == "data");
    let mut message = SseMessage {
        event: String::new(),
        data: String::new(),
        id: None,
    };
    if is_sse {
        let mut data_lines = Vec::new();
        for line in text.lines() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "data" => data_lines.push(value),
                "event" => message.event = value.to_owned(),
                "id" => message.id = Some(value.to_owned()),
                _ => {}
            }
        }
        message.data = data_lines.join("\n");
    } else {
        message.data = text.to_owned();
    }
    if let Some(event_type) = event_type {
        message.event = event_type.to_owned();
    }
    message
}

/// Runs one sample through `stream` (a stream's name, or an instance's: `chat/8f1c`).
pub fn run(config: &Config, stream: &str, sample: SseMessage) -> Result<Outcome, String> {
    let (template, id) = match stream.split_once('/') {
        Some((template, id)) => (template, Some(id)),
        None => (stream, None),
    };
    let Some(stream_config) = config.streams.get(template) else {
        let names: Vec<&str> = config.streams.keys().map(String::as_str).collect();
        return Err(format!(
            "no stream named `{template}` in the config; its streams: {}",
            names.join(", ")
        ));
    };
    let instance_name = match id {
        Some(id) => {
            let id = InstanceId::new(id).map_err(|err| format!("instance id `{id}`: {err}"))?;
            if !stream_config.is_template() {
                return Err(format!(
                    "`{template}` is not a template (its url has no {{id}}), so it has no instances"
                ));
            }
            StreamInstance::of(template, stream_config, id, None).name
        }
        None if stream_config.is_template() => {
            return Err(format!(
                "`{template}` is a template: name an instance, such as `{template}/ID`"
            ));
        }
        None => template.to_owned(),
    };
    let table = RoutingTable::new(config);
    let stream_id = table.stream_id(template).expect("every configured stream has an id");
    let classifier = Classifier::new(
        Arc::from(instance_name.as_str()),
        stream_config,
        table.exact_event_types(stream_id),
    );
    let mut report = String::new();
    let _ = writeln!(report, "stream {instance_name}");
    let (event, malformed_json) = match classifier.classify(sample, SystemTime::now()) {
        Classified::Keepalive => {
            let _ = writeln!(report, "  a keepalive: counted, never routed");
            return Ok(Outcome { report, routed: false });
        }
        Classified::Event { event, malformed_json } => (event, malformed_json),
    };
    let form = match (&malformed_json, event.is_json) {
        (Some(err), _) => format!("text (it looks like JSON but is not: {err})"),
        (None, true) => "JSON".to_owned(),
        (None, false) => "text".to_owned(),
    };
    let _ = writeln!(report, "  event type: {}", event.event_type);
    let _ = writeln!(report, "  data: {form}, {} bytes", event.data.len());
    if let Some(id) = &event.sse_id {
        let _ = writeln!(report, "  id: {id}");
    }
    let matched = table.matching_routes(stream_id, &event);
    if matched.is_empty() {
        let _ = writeln!(report, "\nno route matches: the event would be counted as unrouted");
        return Ok(Outcome { report, routed: false });
    }
    let _ = writeln!(report, "\nroutes that match");
    for (index, targets) in &matched {
        let route = &config.routes[*index];
        let events: Vec<&str> = route.events.iter().map(|pattern| pattern.0.as_str()).collect();
        let names: Vec<&str> = targets.iter().map(|target| &**table.target_name(*target)).collect();
        let _ = writeln!(
            report,
            "  routes[{index}]: stream {}, events [{}] -> {}",
            route.stream.0.0,
            events.join(", "),
            names.join(", ")
        );
    }
    let mut targets: Vec<TargetId> = Vec::new();
    table.route(stream_id, &event, &mut targets);
    let metrics = Metrics::new();
    for target in targets {
        let name = table.target_name(target);
        let target_config = &config.targets[&**name];
        let runtime = TargetRuntime::new(target, target_config, Arc::new(metrics.target(name)))
            .map_err(|err| format!("target {name}: {err:#}"))?;
        let _ = writeln!(report, "\ntarget {name}: POST {}", runtime.display_url);
        let (body, content_type) = match request::body_for(&runtime.body, &event) {
            Ok(body) => body,
            Err(problem) => {
                let _ = writeln!(report, "  not sent: {problem} (a dead letter at once)");
                continue;
            }
        };
        let own = runtime.headers.current();
        let headers = request::request_headers(&runtime, &event, &body, content_type, &own);
        let from_url = !runtime.url.username().is_empty() || runtime.url.password().is_some();
        if from_url && !headers.contains_key(http::header::AUTHORIZATION) {
            let _ = writeln!(report, "  authorization: *** (Basic, from the url)");
        }
        for (header, value) in &headers {
            // The target's own headers are usually credentials: never shown.
            let shown = if own.map.contains_key(header) {
                "*** (from the config)".to_owned()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            let _ = writeln!(report, "  {header}: {shown}");
        }
        let _ = writeln!(report, "  body ({} bytes):", body.len());
        let _ = writeln!(report, "{}", String::from_utf8_lossy(&body));
    }
    Ok(Outcome { report, routed: true })
}

#[cfg(test)]
mod tests {
    use super::parse_sample;

    #[test]
    fn a_sample_is_an_sse_message_or_its_data_alone() {
        let sse = parse_sample("event: update\nid: 7\ndata: {\"a\":1}\ndata: {\"b\":2}\n", None);
        assert_eq!((sse.event.as_str(), sse.id.as_deref()), ("update", Some("7")));
        assert_eq!(sse.data, "{\"a\":1}\n{\"b\":2}");
        let data = parse_sample("{\"type\":\"node_update\"}\n", Some("message"));
        assert_eq!(
            (data.event.as_str(), data.data.as_str(), data.id),
            ("message", "{\"type\":\"node_update\"}", None)
        );
    }
}
