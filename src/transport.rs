//! The HTTP transport eventsource-client reads streams through: the lean HTTP/1.1 client of
//! [`http1`] (a few KiB per idle stream), or reqwest when the stream must go through an HTTP
//! proxy (`HTTPS_PROXY` and the like, which reqwest honours).
//!
//! The response body passes through [`EventFramer`] before the SSE parser sees it. The framer
//! hands the parser whole events only, which lets it guard the parser against input it handles
//! badly: a line or event without end (the parser would buffer it without limit) is cut off at
//! `max_event_bytes` and skipped to the next event, and invalid UTF-8 (which would make the
//! parser fail the whole connection) is replaced with U+FFFD, as the SSE specification decodes.
//!
//! Before that, a response is refused if the parser could not read it: a body in an encoding
//! other than identity (which the request asks for), or a redirect that the client's
//! [`redirect_policy`] did not follow, which eventsource-client would otherwise follow with the
//! stream's headers to any origin.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use launchdarkly_sdk_transport::{ByteStream, HttpTransport, ResponseFuture, TransportError};
use sync_wrapper::{SyncFuture, SyncStream};

use crate::telemetry::{DropReason, StreamTelemetry, host_and_port};

pub mod http1;

/// What a stream connects with.
#[derive(Clone)]
pub enum StreamClient {
    Http1(http1::Http1Client),
    /// Through reqwest, for streams behind an HTTP proxy.
    Reqwest(reqwest::Client),
}

/// Whether the environment names an HTTP proxy, which reqwest would use for streams.
pub fn proxy_in_environment() -> bool {
    [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()))
}

#[derive(Clone)]
pub struct StreamTransport {
    client: StreamClient,
    max_event_bytes: usize,
    telemetry: Arc<StreamTelemetry>,
    /// Bytes received on the connection this transport serves, whole events or not: any byte
    /// from the upstream is a sign of life, for the idle watchdog.
    activity: Arc<AtomicU64>,
}

impl StreamTransport {
    pub fn new(client: StreamClient, max_event_bytes: usize, telemetry: Arc<StreamTelemetry>) -> StreamTransport {
        StreamTransport {
            client,
            max_event_bytes,
            telemetry,
            activity: Arc::default(),
        }
    }

    /// A transport for one connection, and the count of bytes it receives.
    pub fn for_connection(&self) -> (StreamTransport, Arc<AtomicU64>) {
        let activity = Arc::new(AtomicU64::new(0));
        let transport = StreamTransport {
            activity: Arc::clone(&activity),
            ..self.clone()
        };
        (transport, activity)
    }
}

/// Redirects a stream follows, all within the origin of its URL.
const MAX_REDIRECTS: usize = 5;

/// The stream client's redirect policy: follow redirects within the origin (scheme, host and
/// port) of the stream's URL, up to [`MAX_REDIRECTS`], and refuse any other. A stream's headers
/// (an API key, a token) and its URL's query are meant for its server, and on the way to another
/// one reqwest would strip only `Authorization` and cookies.
pub fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let same_origin = attempt
            .previous()
            .first()
            .is_some_and(|first| first.origin() == attempt.url().origin());
        if !same_origin {
            let to = attempt.url().origin().ascii_serialization();
            attempt.error(RedirectRefused::OtherOrigin { to })
        } else if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error(RedirectRefused::TooMany)
        } else {
            attempt.follow()
        }
    })
}

/// Why a stream did not follow a redirect. Names the other server by its origin only, which
/// holds no secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedirectRefused {
    #[error(
        "the server redirected to another origin, {to}; a stream follows redirects only within its \
         URL's origin, so that its headers reach no other server"
    )]
    OtherOrigin { to: String },
    #[error("the server redirected more than {MAX_REDIRECTS} times")]
    TooMany,
    #[error("the server answered {status} without a Location that the relay can follow")]
    Unfollowed { status: u16 },
}

/// A redirect a stream did not follow, with the stream's name.
#[derive(Debug, thiserror::Error)]
#[error("stream {stream}: {reason}")]
pub struct StreamRedirectRefused {
    stream: Arc<str>,
    reason: RedirectRefused,
}

/// A response body in an encoding other than identity, which the relay asks for and reads.
#[derive(Debug, thiserror::Error)]
#[error(
    "stream {stream}: the server sent its body with Content-Encoding {encoding}, though the relay \
     asked for identity; the relay does not decode it, so it closed the connection"
)]
pub struct UnsupportedContentEncoding {
    stream: Arc<str>,
    encoding: String,
}

/// `identity` or nothing, possibly as a list: the body is as sent.
fn is_identity(content_encoding: &http::HeaderValue) -> bool {
    String::from_utf8_lossy(content_encoding.as_bytes())
        .split(',')
        .map(str::trim)
        .all(|coding| coding.is_empty() || coding.eq_ignore_ascii_case("identity"))
}

/// A header value from the server, safe and short enough for a log line.
fn printable_excerpt(value: &[u8]) -> String {
    String::from_utf8_lossy(value)
        .chars()
        .filter(|c| !c.is_control())
        .take(40)
        .collect()
}

/// The connection could not be made (DNS, refused, TLS). Named by host and port, so that a
/// mistyped host shows in the log, but never by path or query, which may hold a token.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {host}")]
pub struct Unreachable {
    host: String,
    #[source]
    source: reqwest::Error,
}

/// The response ended in the middle of an event.
#[derive(Debug, thiserror::Error)]
#[error("the server closed the stream in the middle of an event")]
pub struct ClosedMidEvent;

impl HttpTransport for StreamTransport {
    fn request(&self, request: http::Request<Option<Bytes>>) -> ResponseFuture {
        let (mut parts, body) = request.into_parts();
        // The body goes to the SSE parser as it comes, and the relay decodes no compression.
        parts.headers.insert(
            http::header::ACCEPT_ENCODING,
            http::HeaderValue::from_static("identity"),
        );
        let client = match &self.client {
            StreamClient::Http1(client) => client,
            StreamClient::Reqwest(client) => return self.request_with_reqwest(client, parts, body),
        };
        let (client, connection) = (client.clone(), self.clone());
        Box::pin(SyncFuture::new(async move {
            let refused = |reason| connection.redirect_refused(reason);
            let mut uri = parts.uri;
            let mut n_redirects = 0;
            let response = loop {
                let response = client.get(&uri, &parts.headers).await.map_err(TransportError::new)?;
                if !response.head.status.is_redirection() {
                    break response;
                }
                let status = response.head.status.as_u16();
                let Some(next) = redirect_target(&uri, &response.head.headers) else {
                    return Err(refused(RedirectRefused::Unfollowed { status }));
                };
                if next.scheme() != uri.scheme() || next.authority() != uri.authority() {
                    let to = url::Url::parse(&next.to_string()).map_or_else(
                        |_| "another server".to_owned(),
                        |url| url.origin().ascii_serialization(),
                    );
                    return Err(refused(RedirectRefused::OtherOrigin { to }));
                }
                n_redirects += 1;
                if n_redirects > MAX_REDIRECTS {
                    return Err(refused(RedirectRefused::TooMany));
                }
                uri = next;
            };
            let http1::Http1Response { head, body } = response;
            let body = connection.framed(&head, body.map(|chunk| chunk.map_err(TransportError::new)))?;
            Ok(http::Response::from_parts(head, body))
        }))
    }
}

/// Where a redirect's `Location` points, resolved against the request's URI.
fn redirect_target(uri: &http::Uri, headers: &http::HeaderMap) -> Option<http::Uri> {
    let location = headers.get(http::header::LOCATION)?.to_str().ok()?;
    let base = url::Url::parse(&uri.to_string()).ok()?;
    base.join(location).ok()?.as_str().parse().ok()
}

impl StreamTransport {
    fn redirect_refused(&self, reason: RedirectRefused) -> TransportError {
        TransportError::new(StreamRedirectRefused {
            stream: Arc::clone(&self.telemetry.name),
            reason,
        })
    }

    /// A response's body as the SSE parser reads it, whichever client read it: refused in an
    /// encoding other than identity, counted as a sign of life, and framed.
    fn framed(
        &self,
        head: &http::response::Parts,
        body: impl Stream<Item = Result<Bytes, TransportError>> + Send + Unpin + 'static,
    ) -> Result<ByteStream, TransportError> {
        // Only a stream's body is read; an error answer is judged by its status.
        if let Some(encoding) = head.headers.get(http::header::CONTENT_ENCODING)
            && head.status.is_success()
            && !is_identity(encoding)
        {
            return Err(TransportError::new(UnsupportedContentEncoding {
                stream: Arc::clone(&self.telemetry.name),
                encoding: printable_excerpt(encoding.as_bytes()),
            }));
        }
        let activity = Arc::clone(&self.activity);
        let body = body.map(move |chunk| {
            let chunk = chunk?;
            activity.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            Ok(chunk)
        });
        let framed = EventFramer::new(body, self.max_event_bytes, Arc::clone(&self.telemetry));
        Ok(Box::pin(SyncStream::new(framed)))
    }

    fn request_with_reqwest(
        &self,
        client: &reqwest::Client,
        parts: http::request::Parts,
        body: Option<Bytes>,
    ) -> ResponseFuture {
        let mut builder = client
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers);
        if let Some(body) = body {
            builder = builder.body(body);
        }
        let connection = self.clone();
        Box::pin(SyncFuture::new(async move {
            let refused = |reason| connection.redirect_refused(reason);
            // Errors lose the URL: a stream URL can carry a token in its query.
            let response = builder.send().await.map_err(|err| {
                let redirect_refused = std::error::Error::source(&err)
                    .and_then(|source| source.downcast_ref::<RedirectRefused>())
                    .cloned();
                match redirect_refused {
                    Some(reason) => refused(reason),
                    None if err.is_connect() => TransportError::new(Unreachable {
                        host: err.url().map_or_else(|| "an unknown host".to_owned(), host_and_port),
                        source: err.without_url(),
                    }),
                    None => TransportError::new(err.without_url()),
                }
            })?;
            // What reqwest did not follow, eventsource-client would, with the stream's headers
            // and to any origin: 301 and 307 without a usable Location, say.
            if response.status().is_redirection() {
                return Err(refused(RedirectRefused::Unfollowed {
                    status: response.status().as_u16(),
                }));
            }
            let mut head = http::Response::builder()
                .status(response.status())
                .body(())
                .map_err(TransportError::new)?
                .into_parts()
                .0;
            head.headers = response.headers().clone();
            let body = response
                .bytes_stream()
                .map(|chunk| chunk.map_err(|err| TransportError::new(err.without_url())));
            let body = connection.framed(&head, body)?;
            Ok(http::Response::from_parts(head, body))
        }))
    }
}

/// Passes on whole SSE events only; see the module documentation.
const DATA_FIELD: &[u8] = b"data";

pub struct EventFramer<S> {
    inner: S,
    max_event_bytes: usize,
    telemetry: Arc<StreamTelemetry>,
    /// Bytes of the event being received; complete events are split off and passed on.
    pending: BytesMut,
    /// Length of the prefix of `pending` that holds complete events.
    n_complete: usize,
    /// Bytes of the current event so far, terminators included.
    n_event_bytes: usize,
    at_line_start: bool,
    previous_was_cr: bool,
    /// Where the current line is, to tell whether it is a `data` field.
    line_column: usize,
    line_may_be_data: bool,
    /// The current event has a field other than a comment, and whether one is `data`: a block
    /// with fields and no data (Nchan's `event: ping`) is a keepalive the SSE parser never
    /// shows.
    event_has_fields: bool,
    event_has_data: bool,
    /// Skipping the rest of an oversized event, up to its blank line.
    skipping: bool,
    finished: bool,
}

impl<S> EventFramer<S> {
    pub fn new(inner: S, max_event_bytes: usize, telemetry: Arc<StreamTelemetry>) -> EventFramer<S> {
        EventFramer {
            inner,
            max_event_bytes,
            telemetry,
            pending: BytesMut::new(),
            n_complete: 0,
            n_event_bytes: 0,
            at_line_start: true,
            previous_was_cr: false,
            line_column: 0,
            line_may_be_data: false,
            event_has_fields: false,
            event_has_data: false,
            skipping: false,
            finished: false,
        }
    }

    /// Follows the first bytes of a line, enough to tell a `data` field.
    fn note_field_name(&mut self, byte: u8) {
        if self.line_may_be_data {
            match DATA_FIELD.get(self.line_column) {
                Some(expected) => self.line_may_be_data = byte == *expected,
                None => {
                    self.event_has_data |= byte == b':';
                    self.line_may_be_data = false;
                }
            }
        }
        self.line_column += 1;
    }

    /// Takes a chunk in and returns the complete events it finished, if any.
    fn feed(&mut self, chunk: &[u8]) -> Option<Bytes> {
        // Start of the run of `chunk` not yet copied to `pending`; `None` while skipping.
        let mut run_start = (!self.skipping).then_some(0);
        for (index, &byte) in chunk.iter().enumerate() {
            if self.previous_was_cr && byte == b'\n' {
                // The LF of a CRLF pair: part of the line end already counted.
                self.previous_was_cr = false;
                self.n_event_bytes += 1;
                continue;
            }
            self.previous_was_cr = byte == b'\r';
            if byte == b'\n' || byte == b'\r' {
                if self.at_line_start {
                    // A blank line: the event is complete.
                    match run_start {
                        Some(start) => {
                            self.pending.extend_from_slice(&chunk[start..=index]);
                            self.n_complete = self.pending.len();
                        }
                        None => self.skipping = false,
                    }
                    run_start = Some(index + 1);
                    self.n_event_bytes = 0;
                    if self.event_has_fields && !self.event_has_data {
                        self.telemetry.keepalive();
                    }
                    self.event_has_fields = false;
                    self.event_has_data = false;
                    continue;
                }
                // `data` alone on its line is a data field too.
                self.event_has_data |= self.line_may_be_data && self.line_column == DATA_FIELD.len();
                self.at_line_start = true;
            } else {
                if self.at_line_start {
                    self.line_column = 0;
                    self.line_may_be_data = true;
                    self.event_has_fields |= byte != b':';
                }
                self.note_field_name(byte);
                self.at_line_start = false;
            }
            self.n_event_bytes += 1;
            if self.n_event_bytes > self.max_event_bytes && !self.skipping {
                self.skipping = true;
                self.pending.truncate(self.n_complete);
                run_start = None;
                self.telemetry.dropped(
                    DropReason::TooLarge,
                    &format_args!(
                        "an event exceeds max_event_bytes ({} bytes); it is skipped",
                        self.max_event_bytes
                    ),
                );
            }
        }
        if let Some(start) = run_start {
            self.pending.extend_from_slice(&chunk[start..]);
        }
        if self.n_complete == 0 {
            return None;
        }
        let complete = self.pending.split_to(self.n_complete).freeze();
        self.n_complete = 0;
        Some(self.repair_utf8(complete))
    }

    /// Whole events end at an ASCII line break, so no character is split between two outputs.
    fn repair_utf8(&self, events: Bytes) -> Bytes {
        match std::str::from_utf8(&events) {
            Ok(_) => events,
            Err(err) => {
                self.telemetry.upstream_error(
                    "invalid_utf8",
                    &format_args!("invalid UTF-8 at byte {} replaced with U+FFFD", err.valid_up_to()),
                );
                Bytes::from(String::from_utf8_lossy(&events).into_owned())
            }
        }
    }
}

impl<S> Stream for EventFramer<S>
where
    S: Stream<Item = Result<Bytes, TransportError>> + Unpin,
{
    type Item = Result<Bytes, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.finished {
                return Poll::Ready(None);
            }
            match ready!(self.inner.poll_next_unpin(context)) {
                Some(Ok(chunk)) => {
                    if let Some(events) = self.feed(&chunk) {
                        return Poll::Ready(Some(Ok(events)));
                    }
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => {
                    self.finished = true;
                    // Bytes after the last blank line are an event the server never finished,
                    // and so is an oversized event still being skipped.
                    let mid_event = self.skipping
                        || (!self.pending.is_empty() && !self.pending.iter().all(|b| *b == b'\n' || *b == b'\r'));
                    if mid_event {
                        return Poll::Ready(Some(Err(TransportError::new(ClosedMidEvent))));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Metrics;

    fn framer(max_event_bytes: usize) -> EventFramer<futures_util::stream::Empty<Result<Bytes, TransportError>>> {
        let metrics = Metrics::new();
        let telemetry = Arc::new(metrics.stream("s"));
        EventFramer::new(futures_util::stream::empty(), max_event_bytes, telemetry)
    }

    /// Feeds the chunks in order and returns everything passed on, as text.
    fn run(max_event_bytes: usize, chunks: &[&[u8]]) -> String {
        let mut framer = framer(max_event_bytes);
        let mut out = Vec::new();
        for chunk in chunks {
            if let Some(events) = framer.feed(chunk) {
                out.extend_from_slice(&events);
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn passes_only_whole_events() {
        assert_eq!(run(100, &[b"data: a\n\ndata: b"]), "data: a\n\n");
        assert_eq!(run(100, &[b"data: a\n", b"\n"]), "data: a\n\n");
        // The LF of the last CRLF waits for the next chunk; the parser pairs it with its CR.
        assert_eq!(
            run(100, &[b"data: a\r\n\r\ndata: b\r\n", b"\r\n"]),
            "data: a\r\n\r\ndata: b\r\n\r"
        );
        assert_eq!(run(100, &[b"data: a\r\r"]), "data: a\r\r");
        assert_eq!(run(100, &[b": comment\n\n"]), ": comment\n\n");
    }

    #[test]
    fn skips_events_over_the_limit_and_keeps_the_rest() {
        let long = format!("data: {}\n\n", "x".repeat(50));
        let input = format!("data: a\n\n{long}data: b\n\n");
        assert_eq!(run(20, &[input.as_bytes()]), "data: a\n\ndata: b\n\n");
        // An endless line split over chunks is cut off without being buffered.
        let piece = "y".repeat(15);
        assert_eq!(
            run(20, &[b"data: ", piece.as_bytes(), piece.as_bytes(), b"\n\ndata: c\n\n"]),
            "data: c\n\n"
        );
    }

    #[test]
    fn only_identity_is_read_as_it_is() {
        let check = |value: &str, expected: bool| {
            assert_eq!(
                is_identity(&http::HeaderValue::from_str(value).unwrap()),
                expected,
                "{value:?}"
            );
        };
        check("identity", true);
        check("Identity", true);
        check("", true);
        check("identity, identity", true);
        check("gzip", false);
        check("identity, br", false);
    }

    #[test]
    fn counts_blocks_with_fields_and_no_data_as_keepalives() {
        let check = |input: &[&[u8]], expected: u64| {
            let mut framer = framer(1000);
            for chunk in input {
                framer.feed(chunk);
            }
            assert_eq!(framer.telemetry.keepalives.get(), expected, "{input:?}");
        };
        check(&[b"event: ping\n\n"], 1);
        check(&[b"event: ping\r\n\r\nevent: ping\n\n"], 2);
        check(&[b"eve", b"nt: ping\n", b"\n"], 1);
        check(&[b"id: 4\nevent: ping\n\n"], 1);
        check(&[b"event: x\ndata: 1\n\n"], 0);
        check(&[b"event: x\ndata\n\n"], 0);
        check(&[b"event: x\nda", b"ta:1\n\n"], 0);
        // A comment alone is shown by the parser, and counted there.
        check(&[b": ping\n\n"], 0);
        check(&[b"event: x\ndatum: 1\n\n"], 1);
    }

    #[test]
    fn replaces_invalid_utf8() {
        let mut framer = framer(100);
        let events = framer.feed(b"data: a\xff\xfeb\n\n").unwrap();
        assert_eq!(std::str::from_utf8(&events).unwrap(), "data: a\u{fffd}\u{fffd}b\n\n");
    }
}
