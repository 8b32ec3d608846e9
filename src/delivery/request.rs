//! One delivery attempt: build the request for a target, send it, and judge the response.

use std::fmt;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::config::BodyConfig;
use crate::delivery::TargetRuntime;
use crate::delivery::retry::{Failed, Verdict, verdict_for_status, verdict_for_transport_error};
use crate::event::Event;
use crate::retry_after;
use crate::secret_headers::HeaderSet;
use crate::signing;

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
    /// The connection could not be made (DNS, refused, TLS): named by host and port, so that a
    /// mistyped host shows in the log, but never by path, query or credentials.
    Unreachable {
        host: String,
        error: reqwest::Error,
    },
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
            Problem::Transport(err) => write_chain(formatter, err),
            Problem::Unreachable { host, error } => {
                write!(formatter, "cannot connect to {host}: ")?;
                write_chain(formatter, error)
            }
            Problem::Body(message) => formatter.write_str(message),
        }
    }
}

/// The error and its causes, and what would fix a TLS failure.
fn write_chain(formatter: &mut fmt::Formatter<'_>, err: &reqwest::Error) -> fmt::Result {
    write!(formatter, "{err}")?;
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        write!(formatter, ": {cause}")?;
        source = cause.source();
    }
    match crate::tls::hint(err) {
        Some(hint) => write!(formatter, " ({hint})"),
        None => Ok(()),
    }
}

/// An attempt that did not deliver: what it means, the status if there was a response, and
/// what went wrong.
#[derive(Debug)]
pub struct Failure {
    pub verdict: Failed,
    pub status: Option<u16>,
    pub problem: Problem,
}

/// Sends one attempt and says what it means.
///
/// A 401 or 403 makes the target's header values from secret files again (an agent outside the
/// relay may have rotated a token); if that changed them, the request is sent once more with
/// the new values, within the same attempt, and its answer is the attempt's.
pub async fn attempt(client: &reqwest::Client, target: &TargetRuntime, event: &Event) -> Result<(), Failure> {
    let (body, content_type) = body_for(&target.body, event).map_err(|message| Failure {
        verdict: Failed::Permanent,
        status: None,
        problem: Problem::Body(message),
    })?;
    let headers = target.headers.current();
    let sent = send(client, target, event, body.clone(), content_type, &headers).await;
    let Err(Failure {
        status: Some(401 | 403),
        ..
    }) = &sent
    else {
        return sent;
    };
    match target.headers.after_auth_failure(&headers) {
        Some(fresh) => {
            // A target that echoes its request must not show the new values either.
            target
                .secrets
                .add(fresh.pairs.iter().flat_map(|(_, value)| super::header_secrets(value)));
            send(client, target, event, body, content_type, &fresh).await
        }
        None => sent,
    }
}

/// Sends the request once, with `headers`, and judges the response.
async fn send(
    client: &reqwest::Client,
    target: &TargetRuntime,
    event: &Event,
    body: Bytes,
    content_type: &'static str,
    headers: &HeaderSet,
) -> Result<(), Failure> {
    // The builder takes a URL's user information as Basic authorization.
    let request = client
        .post(target.url.clone())
        .timeout(target.timeout)
        .headers(request_headers(target, event, &body, content_type, headers));

    let mut response = match request.body(body).send().await {
        Ok(response) => response,
        Err(err) => {
            return Err(Failure {
                verdict: verdict_for_transport_error(),
                status: None,
                problem: if err.is_connect() {
                    Problem::Unreachable {
                        host: crate::telemetry::host_and_port(&target.url),
                        error: err.without_url(),
                    }
                } else {
                    Problem::Transport(err.without_url())
                },
            });
        }
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| retry_after::parse(value, SystemTime::now()));
    let verdict = match verdict_for_status(&target.retry, status, retry_after) {
        Verdict::Delivered => {
            let mut n_read = 0;
            while let Ok(Some(chunk)) = response.chunk().await {
                n_read += chunk.len();
                if n_read > DRAIN_BYTES {
                    break;
                }
            }
            return Ok(());
        }
        Verdict::Failed(failed) => failed,
    };

    // Read past the excerpt's end by the longest secret, so that a secret starting inside the
    // excerpt is seen whole and removed, not cut into a prefix that stays.
    let mut body = Vec::new();
    while body.len() < EXCERPT_BYTES + target.secrets.longest() {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let excerpt = target.secrets.redact(&printable(&String::from_utf8_lossy(&body)));
    Err(Failure {
        verdict,
        status: Some(status),
        problem: Problem::Status {
            status,
            excerpt: truncate_to_char_boundary(excerpt.trim(), EXCERPT_BYTES)
                .trim_end()
                .to_owned(),
        },
    })
}

/// Every header of a delivery's request: the target's own (`headers`), the content type, the
/// `Idempotency-Key`, the stream and event type, and with a signing key the Standard Webhooks
/// signature of `body`, made now. `sse-relay route test` shows the same.
pub fn request_headers(
    target: &TargetRuntime,
    event: &Event,
    body: &[u8],
    content_type: &'static str,
    headers: &HeaderSet,
) -> HeaderMap {
    let mut id_buffer = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let event_id = event.id.encode(&mut id_buffer);
    // Most targets have no headers of their own; copying an empty map still allocates.
    let mut map = if headers.map.is_empty() {
        HeaderMap::with_capacity(8)
    } else {
        headers.map.clone()
    };
    map.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    map.insert("idempotency-key", header_text(event_id));
    map.insert("x-relay-stream", header_text(&event.stream_name));
    map.insert("x-relay-event-type", header_text(&event.event_type));
    if let Some(key) = &target.signing_key {
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|since| since.as_secs())
            .unwrap_or(0);
        map.insert(signing::WEBHOOK_ID_HEADER, header_text(event_id));
        map.insert(signing::WEBHOOK_TIMESTAMP_HEADER, HeaderValue::from(timestamp));
        map.insert(
            signing::WEBHOOK_SIGNATURE_HEADER,
            header_text(&key.sign(event_id, timestamp, body)),
        );
    }
    map
}

/// Control characters as spaces, so that an excerpt is one line in a log.
fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

fn truncate_to_char_boundary(text: &str, max_bytes: usize) -> &str {
    let mut end = text.len().min(max_bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The secret values of one target, found once when it is built: a target that echoes its
/// request in an error body would otherwise put them in the log and the dead-letter table
/// through the response excerpt. Used only on that failure path.
pub struct Secrets {
    /// Longest first, so that a secret that contains another is replaced whole. Values read
    /// again from secret files are added (the old ones stay: a late answer may echo them).
    values: std::sync::RwLock<Vec<String>>,
}

impl Secrets {
    /// Each value as an excerpt would show it (control characters as spaces), and as a JSON
    /// string escapes it when that differs; empty values are left out.
    pub fn new(values: impl IntoIterator<Item = String>) -> Secrets {
        let secrets = Secrets {
            values: std::sync::RwLock::default(),
        };
        secrets.add(values);
        secrets
    }

    /// Adds values, as [`Secrets::new`] takes them.
    pub fn add(&self, values: impl IntoIterator<Item = String>) {
        let mut forms = self.values.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        for value in values.into_iter().filter(|value| !value.trim().is_empty()) {
            let json = serde_json::to_string(&value).expect("a string can be written as JSON");
            forms.push(json[1..json.len() - 1].to_owned());
            forms.push(printable(&value));
        }
        forms.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        forms.dedup();
    }

    fn longest(&self) -> usize {
        self.read().first().map_or(0, String::len)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<String>> {
        self.values.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `text` with every secret value replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for value in self.read().iter() {
            if text.contains(value.as_str()) {
                text = text.replace(value.as_str(), "***");
            }
        }
        text
    }
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
                .json()
                .and_then(|json| json.pointer(&pointer.0))
                .ok_or_else(|| format!("the event's data has no JSON value at {}", pointer.0))?;
            let bytes =
                serde_json::to_vec(part).map_err(|err| format!("cannot encode the value at {}: {err}", pointer.0))?;
            Ok((Bytes::from(bytes), "application/json"))
        }
    }
}

/// `{"id","stream","event_type","received_at","data"}`, with JSON data embedded as the upstream
/// sent it and any other data as a JSON string; from a template's instance, `stream` is the
/// instance's name (`chat/8f1c`) and `instance_id` its id.
fn envelope(event: &Event) -> Bytes {
    let mut id_buffer = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let received_at = humantime::format_rfc3339_millis(event.received_at).to_string();
    let mut out = Vec::with_capacity(event.data.len() + 160);
    out.extend_from_slice(b"{\"id\":\"");
    out.extend_from_slice(event.id.encode(&mut id_buffer).as_bytes());
    out.extend_from_slice(b"\",\"stream\":");
    write_json_string(&mut out, &event.stream_name);
    if let Some(instance_id) = event.instance_id() {
        out.extend_from_slice(b",\"instance_id\":");
        write_json_string(&mut out, instance_id);
    }
    out.extend_from_slice(b",\"event_type\":");
    write_json_string(&mut out, &event.event_type);
    out.extend_from_slice(b",\"received_at\":\"");
    out.extend_from_slice(received_at.as_bytes());
    out.extend_from_slice(b"\",\"data\":");
    if event.is_json {
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
            is_json: serde_json::from_str::<serde_json::Value>(data).is_ok(),
            json: std::sync::OnceLock::new(),
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
    fn secrets_are_redacted_whole_and_in_their_json_form() {
        let secrets = Secrets::new([
            "sekret".to_owned(),
            "sekret-longer".to_owned(),
            "a\"b".to_owned(),
            " ".to_owned(),
        ]);
        let check = |text: &str, expected: &str| assert_eq!(secrets.redact(text), expected, "{text:?}");
        check("key sekret-longer, and sekret", "key ***, and ***");
        check(r#"{"echo":"a\"b"}"#, r#"{"echo":"***"}"#);
        check("nothing here", "nothing here");
        assert_eq!(Secrets::new(Vec::new()).redact("as is"), "as is");
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
