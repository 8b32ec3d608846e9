//! One task per stream: connect, read, classify, route, queue; reconnect when the connection
//! ends, for as long as the relay runs.
//!
//! eventsource-client parses the stream, but its own reconnect logic is switched off: it does
//! not retry a failed first connection, a server's `retry: 0` or an instant EOF can make it
//! reconnect in a tight loop, and it can only be told one backoff for every kind of failure.
//! Each connection here is one client, and [`reconnect_delay`] decides what comes after it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use eventsource_client::{self as es, Client as _};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::classify::{Classified, Classifier, SseMessage};
use crate::config::{ReconnectConfig, StreamConfig};
use crate::dedup::OverlapDeduplicator;
use crate::event::TargetId;
use crate::queue::Store;
use crate::retry_after;
use crate::routing::RoutingTable;
use crate::secret_headers::{HeaderSet, Owner, SecretHeaders};
use crate::telemetry::{DisconnectReason, DropReason, Metrics, RotationResult, StreamTelemetry};
use crate::transport::{ClosedMidEvent, ReqwestTransport};

/// A connection that lasted this long was healthy, even if it carried no event.
const HEALTHY_CONNECTION_AGE: Duration = Duration::from_secs(1);

/// How long the old connection is still read after its replacement carried data, unless it
/// catches up sooner: events published before the replacement subscribed may be in flight on it.
/// (`rotate_after` is at least `config::MIN_ROTATE_AFTER`, so overlaps stay a small part.)
/// The longest `Retry-After` an upstream is obeyed for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

const ROTATION_DRAIN: Duration = Duration::from_secs(2);

/// The longest SSE id kept for `Last-Event-ID`. Servers commonly refuse request heads over
/// 8 KiB; a longer id would make every reconnect fail, for good once stored.
pub const MAX_EVENT_ID_BYTES: usize = 1024;

/// How long after an overlap ends the events of the closed connection are still remembered, to
/// catch the copies that the remaining connection shows late.
const DUPLICATE_GRACE: Duration = Duration::from_secs(5);

/// What streams hand events to: the routing table and the store. A reload replaces it whole,
/// and each stream picks up the new one with its next event.
pub struct Dispatch {
    pub table: RoutingTable,
    pub store: Store,
    /// `sse_relay_events_received_total` handles, by `StreamId` and event type label index.
    received: Vec<Vec<prometheus::IntCounter>>,
}

impl Dispatch {
    pub fn new(table: RoutingTable, store: Store, metrics: &Metrics) -> Dispatch {
        let received = table
            .streams()
            .map(|(name, id)| metrics.events_received(name, table.event_type_labels(id)))
            .collect();
        Dispatch { table, store, received }
    }
}

/// A stream as its task uses it, built from its config.
pub struct StreamRuntime {
    url: String,
    headers: SecretHeaders,
    idle_timeout: Duration,
    rotate_after: Option<Duration>,
    reconnect: ReconnectConfig,
    classifier: Classifier,
    pub telemetry: Arc<StreamTelemetry>,
    transport: ReqwestTransport,
}

impl StreamRuntime {
    pub fn new(
        config: &StreamConfig,
        table: &RoutingTable,
        telemetry: Arc<StreamTelemetry>,
        client: &reqwest::Client,
    ) -> anyhow::Result<StreamRuntime> {
        let headers = SecretHeaders::new(Owner::Stream(Arc::clone(&telemetry.name)), &config.headers)?;
        let known_event_types: Vec<Arc<str>> = table
            .stream_id(&telemetry.name)
            .map(|id| table.exact_event_types(id).collect())
            .unwrap_or_default();
        Ok(StreamRuntime {
            url: config.url.0.to_string(),
            headers,
            idle_timeout: config.idle_timeout,
            rotate_after: config.rotate_after,
            reconnect: config.reconnect.clone(),
            classifier: Classifier::new(Arc::clone(&telemetry.name), config, known_event_types),
            transport: ReqwestTransport::new(client.clone(), config.max_event_bytes, Arc::clone(&telemetry)),
            telemetry,
        })
    }

    fn error_backoff(&self) -> ExponentialBackoff {
        error_backoff(&self.reconnect)
    }
}

/// The backoff after failed connections: exponential from `initial_delay`, with jitter.
fn error_backoff(config: &ReconnectConfig) -> ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(config.initial_delay)
        .with_max_delay(config.max_delay)
        .with_jitter()
        .without_max_times()
        .build()
}

/// How one connection ended.
#[derive(Debug)]
pub struct ConnectionEnd {
    pub reason: DisconnectReason,
    pub detail: String,
    /// The connection opened and then carried an event or lasted a healthy while; after a
    /// productive connection, a close is normal (the chat API closes every 30 minutes).
    pub productive: bool,
    /// The server's `Retry-After` with a 429 or 503.
    pub retry_after: Option<Duration>,
}

/// The delay before the next connection. A productive connection that ended reconnects at
/// once; authentication failures wait `auth_failure_delay`; anything else backs off
/// exponentially with jitter, so a server that closes right after accepting costs no hot loop,
/// or waits as long as the server's `Retry-After` asks, if that is longer.
pub fn reconnect_delay(
    end: &ConnectionEnd,
    config: &ReconnectConfig,
    backoff: &mut ExponentialBackoff,
    new_backoff: impl FnOnce() -> ExponentialBackoff,
) -> Duration {
    match end.reason {
        DisconnectReason::AuthFailed => config.auth_failure_delay,
        DisconnectReason::Closed
        | DisconnectReason::ClosedMidEvent
        | DisconnectReason::IdleTimeout
        | DisconnectReason::ReadError
            if end.productive =>
        {
            *backoff = new_backoff();
            Duration::ZERO
        }
        _ => {
            // backon adds its jitter on top of the delay, beyond the maximum.
            let delay = backoff.next().unwrap_or(config.max_delay).min(config.max_delay);
            end.retry_after.map_or(delay, |retry_after| retry_after.max(delay))
        }
    }
}

/// Runs the stream until `stop` is cancelled; `dispatch` is the current routing table and store.
pub async fn run_stream(stream: Arc<StreamRuntime>, dispatch: watch::Receiver<Arc<Dispatch>>, stop: CancellationToken) {
    // Resumes where the last run stopped, for servers that replay from Last-Event-ID.
    // The store knows the last id this stream accepted, whether in this run (a reload that
    // restarted the stream) or the last one.
    let mut state = StreamState {
        last_event_id: dispatch
            .borrow()
            .store
            .last_event_id(&stream.telemetry.name)
            .filter(|id| can_resume_from(id)),
        rejected_event_id: None,
        targets: Vec::new(),
        rotation_refused: false,
        auth_failed_with: None,
        n_connections: 0,
        duplicates: OverlapDeduplicator::new(DUPLICATE_GRACE),
    };
    let mut backoff = stream.error_backoff();
    while let Some(end) = read_connections(&stream, &dispatch, &mut state, &stop).await {
        let delay = reconnect_delay(&end, &stream.reconnect, &mut backoff, || stream.error_backoff());
        stream.telemetry.disconnected(end.reason, &end.detail, delay);
        if !delay.is_zero() {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
    stream.telemetry.disconnected_at_shutdown();
}

/// What a stream keeps from one connection to the next.
struct StreamState {
    last_event_id: Option<String>,
    /// The last id that could not be kept as `Last-Event-ID`, so that it is reported once.
    rejected_event_id: Option<String>,
    /// Scratch space for routing, reused for every event.
    targets: Vec<TargetId>,
    /// The server answered 409 to the last second connection. Rotation is tried again with the
    /// next connection, at its `rotate_after` age; meanwhile the stream reconnects after a close.
    rotation_refused: bool,
    /// The headers of a connection that the server answered 401 or 403: the next connection
    /// makes those from secret files again first.
    auth_failed_with: Option<Arc<HeaderSet>>,
    n_connections: u64,
    duplicates: OverlapDeduplicator,
}

/// One open connection of a stream.
struct Connection {
    /// Distinguishes the two connections of an overlap.
    serial: u64,
    /// The headers it was opened with.
    headers: Arc<HeaderSet>,
    events: es::BoxStream<es::Result<es::SSE>>,
    started: Instant,
    /// The server answered 200.
    connected: bool,
    /// The connection carried its first message after the response head.
    live: bool,
    n_events: u64,
    /// Opened by a rotation, beside the connection it replaces.
    is_replacement: bool,
    /// It took over from a productive connection: if it fails at once, the stream reconnects
    /// at once, as it would have after that connection's close.
    follows_productive: bool,
    /// A hash of the SSE id of the last event on this connection: an event that repeats it has
    /// no id of its own (the parser carries the last one on).
    last_id_hash: Option<u64>,
    /// Bytes received so far, whole events or not, and as of the last look: bytes that keep
    /// coming (a large event arriving slowly, a ping without data) keep the connection alive.
    activity: Arc<AtomicU64>,
    activity_seen: u64,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Connection {
    /// Whether bytes arrived since the last look.
    fn received_bytes(&mut self) -> bool {
        let activity = self.activity.load(Ordering::Relaxed);
        std::mem::replace(&mut self.activity_seen, activity) != activity
    }
}

impl Connection {
    fn open(stream: &StreamRuntime, state: &mut StreamState) -> Result<Connection, es::Error> {
        if let Some(used) = state.auth_failed_with.take() {
            stream.headers.after_auth_failure(&used);
        }
        let headers = stream.headers.current();
        let (transport, activity) = stream.transport.for_connection();
        let events = connect(stream, transport, &headers, state.last_event_id.as_deref())?;
        state.n_connections += 1;
        Ok(Connection {
            serial: state.n_connections,
            headers,
            events,
            started: Instant::now(),
            connected: false,
            live: false,
            n_events: 0,
            is_replacement: false,
            follows_productive: false,
            last_id_hash: None,
            activity,
            activity_seen: 0,
            idle: Box::pin(tokio::time::sleep(stream.idle_timeout)),
        })
    }

    fn end(&self, reason: DisconnectReason, detail: String, retry_after: Option<Duration>) -> ConnectionEnd {
        ConnectionEnd {
            reason,
            detail,
            retry_after,
            productive: self.follows_productive
                || self.connected && (self.n_events > 0 || self.started.elapsed() >= HEALTHY_CONNECTION_AGE),
        }
    }
}

/// Which connection something happened on: the one carrying the stream, or the replacement a
/// rotation opened beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Current,
    Replacement,
}

/// A connection that ended, and how.
struct Ended {
    which: Which,
    reason: DisconnectReason,
    detail: String,
    /// The server answered 409: it allows one connection at a time.
    refused: bool,
    retry_after: Option<Duration>,
}

impl Ended {
    fn new(which: Which, reason: DisconnectReason, detail: String) -> Ended {
        Ended {
            which,
            reason,
            detail,
            refused: false,
            retry_after: None,
        }
    }
}

enum Step {
    Idle(Which),
    Item(Which, Option<es::Result<es::SSE>>),
    Rotate,
    DrainOver,
}

/// Reads a connection to its end, rotating it for a replacement when `rotate_after` says so;
/// `None` when `stop` ended it.
async fn read_connections(
    stream: &StreamRuntime,
    dispatch: &watch::Receiver<Arc<Dispatch>>,
    state: &mut StreamState,
    stop: &CancellationToken,
) -> Option<ConnectionEnd> {
    let mut current = match Connection::open(stream, state) {
        Ok(connection) => connection,
        Err(err) => {
            return Some(ConnectionEnd {
                reason: DisconnectReason::ConnectError,
                detail: err.to_string(),
                productive: false,
                retry_after: None,
            });
        }
    };
    let mut replacement: Option<Connection> = None;
    // A rotation is tried once per connection: after a failure the connection carries on.
    let mut rotation_tried = false;
    // Once the replacement carries data, the current connection is still read for a moment:
    // events published before the replacement subscribed may still be on their way on it.
    let mut drain_until: Option<Instant> = None;

    loop {
        let rotate_at = match stream.rotate_after {
            Some(rotate_after) if !rotation_tried => Some(current.started + rotate_after),
            _ => None,
        };
        let step = tokio::select! {
            biased;
            () = stop.cancelled() => return None,
            () = current.idle.as_mut() => Step::Idle(Which::Current),
            item = current.events.next() => Step::Item(Which::Current, item),
            step = replacement_step(replacement.as_mut()) => step,
            () = sleep_until(drain_until) => Step::DrainOver,
            () = sleep_until(rotate_at) => Step::Rotate,
        };
        let ended = match step {
            Step::Rotate => {
                rotation_tried = true;
                stream.telemetry.rotation_started();
                match Connection::open(stream, state) {
                    Ok(mut connection) => {
                        connection.is_replacement = true;
                        state.duplicates.begin(current.serial, connection.serial);
                        replacement = Some(connection);
                    }
                    Err(err) => rotation_ended(stream, state, RotationResult::Failed, &err),
                }
                None
            }
            Step::DrainOver => {
                drain_until = None;
                if let Some(next) = replacement.take() {
                    state.duplicates.closed(current.serial, Instant::now());
                    // Dropping the old connection's stream closes its socket.
                    current = next;
                    rotation_tried = false;
                    rotation_ended(stream, state, RotationResult::Completed, &"");
                }
                None
            }
            Step::Idle(which) => {
                if let Some(connection) = connection_mut(&mut current, &mut replacement, which)
                    && connection.received_bytes()
                {
                    connection.idle.as_mut().reset(Instant::now() + stream.idle_timeout);
                    continue;
                }
                let idle_for = crate::telemetry::to_millis(stream.idle_timeout);
                let detail = format!("nothing received for {idle_for}");
                Some(Ended::new(which, DisconnectReason::IdleTimeout, detail))
            }
            Step::Item(which, item) => {
                let Some(connection) = connection_mut(&mut current, &mut replacement, which) else {
                    continue;
                };
                connection.idle.as_mut().reset(Instant::now() + stream.idle_timeout);
                connection.received_bytes();
                match item {
                    Some(Ok(es::SSE::Event(message))) => {
                        if which == Which::Replacement && !connection.live {
                            connection.live = true;
                            drain_until = Some(Instant::now() + ROTATION_DRAIN);
                        }
                        let fresh_id = message.id.as_deref().is_some_and(|id| {
                            let id_hash = state.duplicates.id_hash(id);
                            connection.last_id_hash.replace(id_hash) != Some(id_hash)
                        });
                        let origin = Origin {
                            connection: connection.serial,
                            fresh_id,
                        };
                        let current_dispatch = Arc::clone(&dispatch.borrow());
                        let accepted = accept(stream, &current_dispatch, message, origin, state, stop).await;
                        // Time spent waiting for room in the queue (backpressure) is not
                        // silence on the connections: what they sent meanwhile is waiting in
                        // their sockets, to be read now.
                        let read_on_until = Instant::now() + stream.idle_timeout;
                        current.idle.as_mut().reset(read_on_until);
                        if let Some(next) = replacement.as_mut() {
                            next.idle.as_mut().reset(read_on_until);
                        }
                        match accepted {
                            Accepted::Event => {
                                if let Some(connection) = connection_mut(&mut current, &mut replacement, which) {
                                    connection.n_events += 1;
                                }
                            }
                            // The old connection caught up with what the replacement already
                            // showed: everything after this on it is a copy, so stop reading it.
                            Accepted::Duplicate
                                if which == Which::Current && replacement.as_ref().is_some_and(|next| next.live) =>
                            {
                                drain_until = Some(Instant::now());
                            }
                            Accepted::Noise | Accepted::Duplicate => {}
                            Accepted::Stopped => return None,
                        }
                        None
                    }
                    Some(Ok(es::SSE::Connected(_))) => {
                        connection.connected = true;
                        if which == Which::Current {
                            stream.telemetry.connected(state.last_event_id.as_deref());
                        }
                        None
                    }
                    Some(Ok(es::SSE::Comment(_))) => {
                        stream.telemetry.keepalive();
                        if which == Which::Replacement && !connection.live {
                            connection.live = true;
                            drain_until = Some(Instant::now() + ROTATION_DRAIN);
                        }
                        None
                    }
                    Some(Err(err)) => {
                        let (reason, detail) = describe_error(&err, connection.connected);
                        if reason == DisconnectReason::AuthFailed {
                            state.auth_failed_with = Some(Arc::clone(&connection.headers));
                        }
                        let refused =
                            matches!(&err, es::Error::UnexpectedResponse(response, _) if response.status() == 409);
                        Some(Ended {
                            which,
                            reason,
                            detail,
                            refused,
                            retry_after: retry_after(&err),
                        })
                    }
                    None => Some(Ended::new(
                        which,
                        DisconnectReason::Closed,
                        "the stream ended".to_owned(),
                    )),
                }
            }
        };
        match ended {
            Some(Ended {
                which: Which::Current,
                reason,
                detail,
                refused,
                retry_after,
            }) => {
                if refused && current.is_replacement {
                    // A replacement that took over before its answer came: the server allows one
                    // connection at a time after all.
                    rotation_ended(stream, state, RotationResult::Refused, &detail);
                }
                let end = current.end(reason, detail, retry_after);
                let Some(mut next) = replacement.take() else {
                    return Some(end);
                };
                // The replacement carries on, without a gap.
                if next.live {
                    state.duplicates.closed(current.serial, Instant::now());
                } else {
                    // It has shown nothing yet, so nothing of the old connection's is known to
                    // be coming again; keeping its keys could only hide new events.
                    state.duplicates.forget(current.serial);
                }
                next.follows_productive = end.productive;
                current = next;
                drain_until = None;
                rotation_tried = false;
                stream.telemetry.handed_over(end.reason, &end.detail);
                if current.connected {
                    rotation_ended(stream, state, RotationResult::Completed, &"");
                    stream.telemetry.connected(state.last_event_id.as_deref());
                }
            }
            Some(Ended {
                which: Which::Replacement,
                detail,
                refused,
                ..
            }) => {
                let result = if refused {
                    RotationResult::Refused
                } else {
                    RotationResult::Failed
                };
                if let Some(dropped) = replacement.take() {
                    // Events it carried were delivered already; what the current connection
                    // shows next must still be compared with them for a while.
                    if dropped.live {
                        state.duplicates.closed(dropped.serial, Instant::now());
                    } else {
                        state.duplicates.forget(dropped.serial);
                    }
                }
                drain_until = None;
                rotation_ended(stream, state, result, &detail);
            }
            None => {}
        }
    }
}

/// Counts a rotation's end, and logs a refusal only when the server starts refusing, and once
/// it accepts a second connection again.
fn rotation_ended(
    stream: &StreamRuntime,
    state: &mut StreamState,
    result: RotationResult,
    detail: &dyn std::fmt::Display,
) {
    let was_refused = state.rotation_refused;
    state.rotation_refused = match result {
        RotationResult::Refused => true,
        RotationResult::Completed => false,
        RotationResult::Failed => was_refused,
    };
    stream
        .telemetry
        .rotation_ended(result, detail, was_refused != state.rotation_refused);
}

fn connection_mut<'a>(
    current: &'a mut Connection,
    replacement: &'a mut Option<Connection>,
    which: Which,
) -> Option<&'a mut Connection> {
    match which {
        Which::Current => Some(current),
        Which::Replacement => replacement.as_mut(),
    }
}

/// The next thing that happens on the replacement connection; never, when there is none.
async fn replacement_step(replacement: Option<&mut Connection>) -> Step {
    let Some(connection) = replacement else {
        return std::future::pending().await;
    };
    tokio::select! {
        () = connection.idle.as_mut() => Step::Idle(Which::Replacement),
        item = connection.events.next() => Step::Item(Which::Replacement, item),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn connect(
    stream: &StreamRuntime,
    transport: ReqwestTransport,
    headers: &HeaderSet,
    last_event_id: Option<&str>,
) -> Result<es::BoxStream<es::Result<es::SSE>>, es::Error> {
    let mut builder = es::ClientBuilder::for_url(&stream.url)?
        .reconnect(es::ReconnectOptions::reconnect(false).retry_initial(false).build())
        .redirect_limit(5);
    for (name, value) in &headers.pairs {
        builder = builder.header(name, value)?;
    }
    if let Some(id) = last_event_id {
        builder = builder.last_event_id(id.to_owned());
    }
    Ok(builder.build_with_transport(transport).stream())
}

/// Whether an SSE id can be sent back as `Last-Event-ID`: a valid header value, short enough
/// for any server's header limit. An id that cannot would make every later connection fail.
pub fn can_resume_from(id: &str) -> bool {
    // `HeaderValue` takes bytes above 0x7f (obs-text), which servers are free to refuse.
    id.len() <= MAX_EVENT_ID_BYTES && id.is_ascii() && http::HeaderValue::from_str(id).is_ok()
}

/// Keeps the id for `Last-Event-ID`, here and in the store, once its event was accepted;
/// unless it cannot be sent back.
fn remember_event_id(stream: &StreamRuntime, store: &Store, state: &mut StreamState, id: &str) {
    if state.last_event_id.as_deref() == Some(id) || state.rejected_event_id.as_deref() == Some(id) {
        return;
    }
    if can_resume_from(id) {
        state.last_event_id = Some(id.to_owned());
        state.rejected_event_id = None;
        store.remember_last_event_id(&stream.telemetry.name, id);
    } else {
        // Events without an `id:` field carry the last id on, as the SSE spec says; one
        // warning per bad id is enough.
        state.rejected_event_id = Some(id.to_owned());
        stream.telemetry.upstream_error(
            "invalid_id",
            &format_args!(
                "an event id that cannot be sent back as Last-Event-ID (not printable ASCII, or over \
                 {MAX_EVENT_ID_BYTES} bytes) was ignored; the stream resumes from the last usable id"
            ),
        );
    }
}

/// The delay a 429 or 503 answer asks for, at most an hour (a server's mistake must not stop
/// the stream for good).
fn retry_after(err: &es::Error) -> Option<Duration> {
    let es::Error::UnexpectedResponse(response, _) = err else {
        return None;
    };
    if !matches!(response.status(), 429 | 503) {
        return None;
    }
    let value = response.get_header_value("retry-after").ok().flatten()?;
    retry_after::parse(value, SystemTime::now()).map(|delay| delay.min(MAX_RETRY_AFTER))
}

fn describe_error(err: &es::Error, connected: bool) -> (DisconnectReason, String) {
    let reason = match err {
        es::Error::Eof => DisconnectReason::Closed,
        es::Error::UnexpectedEof => DisconnectReason::ClosedMidEvent,
        es::Error::UnexpectedResponse(response, _) if matches!(response.status(), 401 | 403) => {
            DisconnectReason::AuthFailed
        }
        es::Error::UnexpectedResponse(..)
        | es::Error::MaxRedirectLimitReached(_)
        | es::Error::MalformedLocationHeader(_)
        | es::Error::InvalidParameter(_) => DisconnectReason::HttpError,
        es::Error::Transport(transport) if transport.inner().downcast_ref::<ClosedMidEvent>().is_some() => {
            DisconnectReason::ClosedMidEvent
        }
        _ if connected => DisconnectReason::ReadError,
        _ => DisconnectReason::ConnectError,
    };
    let detail = match err {
        es::Error::UnexpectedResponse(response, _) => format!("the server answered {}", response.status()),
        es::Error::Transport(transport) => match crate::tls::hint(transport.inner()) {
            Some(hint) => format!("{} ({hint})", error_chain(transport.inner())),
            None => error_chain(transport.inner()),
        },
        other => other.to_string(),
    };
    (reason, detail)
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Which connection an event came on, and whether its SSE id is its own.
#[derive(Clone, Copy)]
struct Origin {
    connection: u64,
    fresh_id: bool,
}

enum Accepted {
    Event,
    Noise,
    /// The other connection of a rotation already showed this event.
    Duplicate,
    Stopped,
}

/// Classifies one message, routes it, and submits a delivery per target to the store. When the
/// store cannot take more (full, failing, or a dispatcher with no room), this waits, which
/// pauses the stream on purpose, rather than drop anything.
async fn accept(
    stream: &StreamRuntime,
    dispatch: &Dispatch,
    message: es::Event,
    origin: Origin,
    state: &mut StreamState,
    stop: &CancellationToken,
) -> Accepted {
    let telemetry = &stream.telemetry;
    let message = SseMessage {
        event: message.event_type,
        data: message.data,
        id: message.id,
    };
    let (event, malformed_json) = match stream.classifier.classify(message, SystemTime::now()) {
        Classified::Keepalive => {
            telemetry.keepalive();
            return Accepted::Noise;
        }
        Classified::Event { event, malformed_json } => (event, malformed_json),
    };
    if state.duplicates.is_active(Instant::now()) {
        let key = state
            .duplicates
            .key(event.sse_id.as_deref(), origin.fresh_id, &event.event_type, &event.data);
        if state.duplicates.is_duplicate(origin.connection, key) {
            telemetry.duplicate_suppressed();
            return Accepted::Duplicate;
        }
    }
    if let Some(err) = malformed_json {
        telemetry.upstream_error(
            "invalid_json",
            &format_args!("data is not valid JSON ({err}); routed as text"),
        );
    }
    // A reload removed this stream; its task is about to stop.
    let Some(stream_id) = dispatch.table.stream_id(&telemetry.name) else {
        return Accepted::Noise;
    };
    dispatch.received[stream_id.0][dispatch.table.event_type_label_index(stream_id, &event.event_type)].inc();
    let targets = &mut state.targets;
    dispatch.table.route(stream_id, &event, targets);
    if targets.is_empty() {
        telemetry.unrouted(&event.event_type);
        // Only an event that is not a copy moves Last-Event-ID (a lagging old connection's
        // copies would move it back), and only once it is accepted: an event dropped at
        // shutdown is sent again after a resume.
        if let Some(id) = &event.sse_id {
            remember_event_id(stream, &dispatch.store, state, id);
        }
        return Accepted::Event;
    }

    let event = Arc::new(event);
    // Only an id that can be sent back as Last-Event-ID is worth storing for the next run.
    let position = event.sse_id.as_deref().filter(|id| can_resume_from(id));
    let target_names: Vec<Arc<str>> = targets
        .iter()
        .map(|target| Arc::clone(dispatch.table.target_name(*target)))
        .collect();
    tokio::select! {
        () = stop.cancelled() => {
            telemetry.dropped(DropReason::Shutdown, &"the relay stopped while the event waited for room in the queue");
            Accepted::Stopped
        }
        submitted = dispatch.store.submit(Arc::clone(&event), target_names, position) => match submitted {
            Ok(waited) => {
                if waited {
                    telemetry.backpressure();
                }
                if let Some(id) = &event.sse_id {
                    remember_event_id(stream, &dispatch.store, state, id);
                }
                Accepted::Event
            }
            Err(_) => Accepted::Stopped,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(reason: DisconnectReason, productive: bool) -> ConnectionEnd {
        ConnectionEnd {
            reason,
            detail: String::new(),
            productive,
            retry_after: None,
        }
    }

    #[test]
    fn no_reconnect_delay_exceeds_max_delay_jitter_included() {
        let config = ReconnectConfig {
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(2),
            auth_failure_delay: Duration::from_secs(60),
        };
        let new_backoff = || error_backoff(&config);
        let mut backoff = new_backoff();
        for _ in 0..200 {
            let delay = reconnect_delay(
                &end(DisconnectReason::HttpError, false),
                &config,
                &mut backoff,
                new_backoff,
            );
            assert!(delay <= config.max_delay, "{delay:?}");
        }
    }

    #[test]
    fn reconnects_at_once_only_after_a_productive_connection() {
        let config = ReconnectConfig {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            auth_failure_delay: Duration::from_secs(60),
        };
        let new_backoff = || {
            ExponentialBuilder::new()
                .with_min_delay(config.initial_delay)
                .with_max_delay(config.max_delay)
                .without_max_times()
                .build()
        };
        let mut backoff = new_backoff();
        // backon computes in f32, so compare whole milliseconds.
        let mut delay = |reason, productive| {
            let exact = reconnect_delay(&end(reason, productive), &config, &mut backoff, new_backoff);
            Duration::from_millis(exact.as_millis() as u64)
        };

        assert_eq!(delay(DisconnectReason::Closed, true), Duration::ZERO);
        // A server that closes right after accepting backs off, doubling up to the cap.
        assert_eq!(delay(DisconnectReason::Closed, false), Duration::from_millis(100));
        assert_eq!(delay(DisconnectReason::Closed, false), Duration::from_millis(200));
        assert_eq!(delay(DisconnectReason::ConnectError, false), Duration::from_millis(400));
        for _ in 0..10 {
            delay(DisconnectReason::HttpError, false);
        }
        assert_eq!(delay(DisconnectReason::HttpError, false), Duration::from_secs(2));
        assert_eq!(delay(DisconnectReason::AuthFailed, false), Duration::from_secs(60));
        // A productive connection resets the backoff.
        assert_eq!(delay(DisconnectReason::IdleTimeout, true), Duration::ZERO);
        assert_eq!(delay(DisconnectReason::ConnectError, false), Duration::from_millis(100));
    }
}
