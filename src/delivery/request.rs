//! One delivery attempt: build the request for a target, send it, and judge the response.

use std::fmt;
use std::time::SystemTime;

use bytes::Bytes;
use http::HeaderValue;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::config::BodyConfig;
use crate::delivery::retry::{Verdict, parse_retry_after, verdict_for_status, verdict_for_transport_error};
use crate::delivery::{TargetRuntime, signing};
use crate::event::Event;

/// How much of an error response's body is kept for the log line.
const EXCERPT_BYTES: usize = 200;

/// How much of a success response's body is read so that the connection can be reused.
const DRAIN_BYTES: usize = 64 * 1024;

/// What went wrong with an attempt, for the log line. Never holds the target's URL.
#[derive(Debug)]
pub enum Problem {
    Status {
        status: u16,
        excerpt: String,
    },
    Transport(reqwest::Error),
    Body(String),
    /// The attempt panicked: a bug in the relay, not the target's fault. Retried.
    Panicked,
}

impl fmt::Display for Problem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Panicked => write!(formatter, "the attempt failed inside the relay (a bug; see the log)"),
            Problem::Status { status, excerpt } if excerpt.is_empty() => write!(formatter, "status {status}"),
            Problem::Status { status, excerpt } => write!(formatter, "status {status}: {excerpt}"),
            Problem::Transport(err) if err.is_timeout() => write!(formatter, "timed out"),
            Problem::Transport(err) => {
                write!(formatter, "{err}")?;
                let mut source = std::error::Error::source(err);
                while let Some(cause) = source {
                    write!(formatter, ": {cause}")?;
                    source = cause.source();
                }
                Ok(())
            }
            Problem::Body(message) => formatter.write_str(message),
        }
    }
}

/// An attempt that did not deliver: what it means, the status if there was a response, and
/// what went wrong.
#[derive(Debug)]
pub struct Failure {
    pub verdict: Verdict,
    pub status: Option<u16>,
    pub problem: Problem,
}

/// Sends one attempt and says what it means.
pub async fn attempt(client: &reqwest::Client, target: &TargetRuntime, event: &Event) -> Result<(), Failure> {
    let (body, content_type) = body_for(&target.body, event).map_err(|message| Failure {
        verdict: Verdict::Permanent,
        status: None,
        problem: Problem::Body(message),
    })?;

    let mut id_buffer = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let event_id = event.id.encode(&mut id_buffer);
    let mut request = client.post(target.url.clone()).timeout(target.timeout);
    // Most targets have no headers of their own; copying an empty map still allocates.
    if !target.headers.is_empty() {
        request = request.headers(target.headers.clone());
    }
    request = request
        .header(CONTENT_TYPE, HeaderValue::from_static(content_type))
        .header("idempotency-key", event_id);
    request = request
        .header("x-relay-stream", header_text(&event.stream_name))
        .header("x-relay-event-type", header_text(&event.event_type));
    if let Some(key) = &target.signing_key {
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|since| since.as_secs())
            .unwrap_or(0);
        request = request
            .header(signing::WEBHOOK_ID_HEADER, event_id)
            .header(signing::WEBHOOK_TIMESTAMP_HEADER, timestamp)
            .header(signing::WEBHOOK_SIGNATURE_HEADER, key.sign(event_id, timestamp, &body));
    }

    let mut response = match request.body(body).send().await {
        Ok(response) => response,
        Err(err) => {
            return Err(Failure {
                verdict: verdict_for_transport_error(),
                status: None,
                problem: Problem::Transport(err.without_url()),
            });
        }
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| parse_retry_after(value, SystemTime::now()));
    let verdict = verdict_for_status(status, retry_after);

    if verdict == Verdict::Delivered {
        let mut n_read = 0;
        while let Ok(Some(chunk)) = response.chunk().await {
            n_read += chunk.len();
            if n_read > DRAIN_BYTES {
                break;
            }
        }
        return Ok(());
    }

    let mut excerpt = Vec::new();
    while excerpt.len() < EXCERPT_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => excerpt.extend_from_slice(&chunk),
            _ => break,
        }
    }
    excerpt.truncate(EXCERPT_BYTES);
    let excerpt: String = String::from_utf8_lossy(&excerpt)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    Err(Failure {
        verdict,
        status: Some(status),
        problem: Problem::Status {
            status,
            excerpt: excerpt.trim().to_owned(),
        },
    })
}

/// What [`header_text`] percent-encodes: control characters, which a header cannot carry, and
/// `%` itself, so that a receiver can always percent-decode the value. Everything beyond ASCII
/// is encoded too (as UTF-8), which `utf8_percent_encode` always does.
const HEADER_TEXT_ENCODED: &AsciiSet = &CONTROLS.add(b'%');

/// A stream name or event type as a header value, percent-encoded where HTTP cannot carry it
/// as it is. An event type comes from the upstream, so it may hold anything; leaving the header
/// out instead would lose it without a word.
pub fn header_text(text: &str) -> HeaderValue {
    let encoded = utf8_percent_encode(text, HEADER_TEXT_ENCODED).to_string();
    HeaderValue::try_from(encoded).expect("percent-encoded text is printable ASCII, which a header value may hold")
}

/// The body a target receives, and its content type.
pub fn body_for(body: &BodyConfig, event: &Event) -> Result<(Bytes, &'static str), String> {
    match body {
        BodyConfig::Data => Ok((event.data.clone(), event.content_type())),
        BodyConfig::Envelope => Ok((envelope(event), "application/json")),
        BodyConfig::Pointer(pointer) => {
            let part = event
                .json
                .as_ref()
                .and_then(|json| json.pointer(&pointer.0))
                .ok_or_else(|| format!("the event's data has no JSON value at {}", pointer.0))?;
            let bytes =
                serde_json::to_vec(part).map_err(|err| format!("cannot encode the value at {}: {err}", pointer.0))?;
            Ok((Bytes::from(bytes), "application/json"))
        }
    }
}

/// `{"id","stream","event_type","received_at","data"}`, with JSON data embedded as the upstream
/// sent it and any other data as a JSON string.
fn envelope(event: &Event) -> Bytes {
    let mut id_buffer = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let received_at = humantime::format_rfc3339_millis(event.received_at).to_string();
    let mut out = Vec::with_capacity(event.data.len() + 160);
    out.extend_from_slice(b"{\"id\":\"");
    out.extend_from_slice(event.id.encode(&mut id_buffer).as_bytes());
    out.extend_from_slice(b"\",\"stream\":");
    write_json_string(&mut out, &event.stream_name);
    out.extend_from_slice(b",\"event_type\":");
    write_json_string(&mut out, &event.event_type);
    out.extend_from_slice(b",\"received_at\":\"");
    out.extend_from_slice(received_at.as_bytes());
    out.extend_from_slice(b"\",\"data\":");
    if event.json.is_some() {
        out.extend_from_slice(&event.data);
    } else {
        write_json_string(&mut out, &String::from_utf8_lossy(&event.data));
    }
    out.push(b'}');
    Bytes::from(out)
}

fn write_json_string(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(out, text).expect("writing a string to a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::JsonPointer;
    use crate::event::EventId;

    fn event(data: &str) -> Event {
        Event {
            id: EventId::new(),
            stream_name: Arc::from("chat"),
            sse_id: None,
            event_type: Arc::from("workflow_status"),
            data: Bytes::copy_from_slice(data.as_bytes()),
            json: serde_json::from_str(data).ok(),
            received_at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn data_body_is_the_upstream_bytes() {
        let event = event("{ \"a\" : 1.50 }");
        let (body, content_type) = body_for(&BodyConfig::Data, &event).unwrap();
        assert_eq!(&body[..], b"{ \"a\" : 1.50 }");
        assert_eq!(content_type, "application/json");
        let (body, content_type) = body_for(&BodyConfig::Data, &self::event("keep going")).unwrap();
        assert_eq!(&body[..], b"keep going");
        assert_eq!(content_type, "text/plain; charset=utf-8");
    }

    #[test]
    fn envelope_wraps_json_and_text() {
        let json_event = event(r#"{"is_active":false}"#);
        let (body, _) = body_for(&BodyConfig::Envelope, &json_event).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["id"], json_event.id.to_string());
        assert_eq!(value["stream"], "chat");
        assert_eq!(value["event_type"], "workflow_status");
        assert_eq!(value["received_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(value["data"]["is_active"], false);

        let (body, _) = body_for(&BodyConfig::Envelope, &event("say \"hi\"\n")).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["data"], "say \"hi\"\n");
    }

    #[test]
    fn header_text_is_percent_encoded_only_where_http_cannot_carry_it() {
        let check = |text: &str, expected: &str| assert_eq!(header_text(text), expected, "{text:?}");
        check("MESSAGE_SENT", "MESSAGE_SENT");
        check("workflow update: 1/2 (ok)", "workflow update: 1/2 (ok)");
        check("a\nb\tc\u{1}\u{7f}", "a%0Ab%09c%01%7F");
        check("größe", "gr%C3%B6%C3%9Fe");
        check("100%", "100%25");
        check("", "");
    }

    #[test]
    fn pointer_body_sends_part_of_the_data() {
        let pointer = BodyConfig::Pointer(JsonPointer("/payload".to_owned()));
        let (body, _) = body_for(&pointer, &event(r#"{"eventType":"X","payload":[1,2]}"#)).unwrap();
        assert_eq!(&body[..], b"[1,2]");
        let missing = body_for(&pointer, &event(r#"{"eventType":"X"}"#)).unwrap_err();
        assert_eq!(missing, "the event's data has no JSON value at /payload");
    }
}
