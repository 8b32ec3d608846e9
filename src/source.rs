//! One task per stream: connect, read, classify, route, queue; reconnect when the connection
//! ends, for as long as the relay runs.
//!
//! eventsource-client parses the stream, but its own reconnect logic is switched off: it does
//! not retry a failed first connection, a server's `retry: 0` or an instant EOF can make it
//! reconnect in a tight loop, and it can only be told one backoff for every kind of failure.
//! Each connection here is one client, and [`reconnect_delay`] decides what comes after it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use eventsource_client::{self as es, Client as _};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::classify::{Classified, Classifier, SseMessage};
use crate::config::{ReconnectConfig, StreamConfig};
use crate::event::TargetId;
use crate::queue::Store;
use crate::routing::RoutingTable;
use crate::telemetry::{DisconnectReason, DropReason, Metrics, StreamTelemetry};
use crate::transport::{ClosedMidEvent, ReqwestTransport};

/// A connection that lasted this long was healthy, even if it carried no event.
const HEALTHY_CONNECTION_AGE: Duration = Duration::from_secs(1);

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
    headers: Vec<(String, String)>,
    idle_timeout: Duration,
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
        let mut headers = Vec::with_capacity(config.headers.len());
        // An empty value (an unset `${VAR:-}`) leaves the header out.
        for (name, value) in config.headers.iter().filter(|(_, value)| !value.0.is_empty()) {
            // The value may be a secret: the error names the header, never the value.
            if http::HeaderValue::from_str(&value.0).is_err() {
                anyhow::bail!(
                    "stream {}: header {} has a character that is not allowed in an HTTP header",
                    telemetry.name,
                    name.0
                );
            }
            headers.push((name.0.clone(), value.0.clone()));
        }
        let known_event_types: Vec<Arc<str>> = table
            .stream_id(&telemetry.name)
            .map(|id| table.exact_event_types(id).collect())
            .unwrap_or_default();
        Ok(StreamRuntime {
            url: config.url.0.to_string(),
            headers,
            idle_timeout: config.idle_timeout,
            reconnect: config.reconnect.clone(),
            classifier: Classifier::new(Arc::clone(&telemetry.name), config, known_event_types),
            transport: ReqwestTransport::new(client.clone(), config.max_event_bytes, Arc::clone(&telemetry)),
            telemetry,
        })
    }

    fn error_backoff(&self) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(self.reconnect.initial_delay)
            .with_max_delay(self.reconnect.max_delay)
            .with_jitter()
            .without_max_times()
            .build()
    }
}

/// How one connection ended.
#[derive(Debug)]
pub struct ConnectionEnd {
    pub reason: DisconnectReason,
    pub detail: String,
    /// The connection opened and then carried an event or lasted a healthy while; after a
    /// productive connection, a close is normal (the chat API closes every 30 minutes).
    pub productive: bool,
}

/// The delay before the next connection. A productive connection that ended reconnects at
/// once; authentication failures wait `auth_failure_delay`; anything else backs off
/// exponentially with jitter, so a server that closes right after accepting costs no hot loop.
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
        _ => backoff.next().unwrap_or(config.max_delay),
    }
}

/// Runs the stream until `stop` is cancelled; `dispatch` is the current routing table and store.
pub async fn run_stream(stream: Arc<StreamRuntime>, dispatch: watch::Receiver<Arc<Dispatch>>, stop: CancellationToken) {
    // Resumes where the last run stopped, for servers that replay from Last-Event-ID.
    let mut last_event_id: Option<String> = dispatch
        .borrow()
        .store
        .last_event_id(&stream.telemetry.name)
        .filter(|id| http::HeaderValue::from_str(id).is_ok());
    let mut backoff = stream.error_backoff();
    let mut targets = Vec::new();
    while let Some(end) = read_connection(&stream, &dispatch, &mut last_event_id, &mut targets, &stop).await {
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

/// Opens one connection and reads it to its end; `None` when `stop` ended it.
async fn read_connection(
    stream: &StreamRuntime,
    dispatch: &watch::Receiver<Arc<Dispatch>>,
    last_event_id: &mut Option<String>,
    targets: &mut Vec<TargetId>,
    stop: &CancellationToken,
) -> Option<ConnectionEnd> {
    let mut events = match connect(stream, last_event_id.as_deref()) {
        Ok(events) => events,
        Err(err) => {
            return Some(ConnectionEnd {
                reason: DisconnectReason::ConnectError,
                detail: err.to_string(),
                productive: false,
            });
        }
    };
    let started = Instant::now();
    let mut connected = false;
    let mut n_events = 0u64;
    let idle = tokio::time::sleep(stream.idle_timeout);
    tokio::pin!(idle);

    let (reason, detail) = loop {
        let item = tokio::select! {
            biased;
            () = stop.cancelled() => return None,
            () = &mut idle => break (
                DisconnectReason::IdleTimeout,
                format!("nothing received for {}", humantime::format_duration(stream.idle_timeout)),
            ),
            item = events.next() => item,
        };
        idle.as_mut().reset(Instant::now() + stream.idle_timeout);
        match item {
            Some(Ok(es::SSE::Event(message))) => {
                if let Some(id) = &message.id {
                    remember_event_id(stream, last_event_id, id);
                }
                let current = Arc::clone(&dispatch.borrow());
                match accept(stream, &current, message, targets, stop).await {
                    Accepted::Event => n_events += 1,
                    Accepted::Noise => {}
                    Accepted::Stopped => return None,
                }
            }
            Some(Ok(es::SSE::Connected(_))) => {
                connected = true;
                stream.telemetry.connected(last_event_id.as_deref());
            }
            Some(Ok(es::SSE::Comment(_))) => {}
            Some(Err(err)) => break describe_error(&err, connected),
            None => break (DisconnectReason::Closed, "the stream ended".to_owned()),
        }
    };
    Some(ConnectionEnd {
        reason,
        detail,
        productive: connected && (n_events > 0 || started.elapsed() >= HEALTHY_CONNECTION_AGE),
    })
}

fn connect(
    stream: &StreamRuntime,
    last_event_id: Option<&str>,
) -> Result<es::BoxStream<es::Result<es::SSE>>, es::Error> {
    let mut builder = es::ClientBuilder::for_url(&stream.url)?
        .reconnect(es::ReconnectOptions::reconnect(false).retry_initial(false).build())
        .redirect_limit(5);
    for (name, value) in &stream.headers {
        builder = builder.header(name, value)?;
    }
    if let Some(id) = last_event_id {
        builder = builder.last_event_id(id.to_owned());
    }
    Ok(builder.build_with_transport(stream.transport.clone()).stream())
}

/// Keeps the id for `Last-Event-ID` unless it cannot be sent as a header, which would make
/// every later connection fail.
fn remember_event_id(stream: &StreamRuntime, last_event_id: &mut Option<String>, id: &str) {
    if last_event_id.as_deref() == Some(id) {
        return;
    }
    if http::HeaderValue::from_str(id).is_ok() {
        *last_event_id = Some(id.to_owned());
    } else {
        stream.telemetry.upstream_error(
            "invalid_id",
            &"an event id that cannot be sent back as Last-Event-ID was ignored",
        );
    }
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
        es::Error::Transport(transport) => error_chain(transport.inner()),
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

enum Accepted {
    Event,
    Noise,
    Stopped,
}

/// Classifies one message, routes it, and submits a delivery per target to the store. When the
/// store cannot take more (full, failing, or a dispatcher with no room), this waits, which
/// pauses the stream on purpose, rather than drop anything.
async fn accept(
    stream: &StreamRuntime,
    dispatch: &Dispatch,
    message: es::Event,
    targets: &mut Vec<TargetId>,
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
    dispatch.table.route(stream_id, &event, targets);
    if targets.is_empty() {
        telemetry.unrouted(&event.event_type);
        return Accepted::Event;
    }

    let event = Arc::new(event);
    // Only an id that can be sent back as Last-Event-ID is worth storing for the next run.
    let position = event
        .sse_id
        .as_deref()
        .filter(|id| http::HeaderValue::from_str(id).is_ok());
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
            Ok(false) => Accepted::Event,
            Ok(true) => {
                telemetry.backpressure();
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
