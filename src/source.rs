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
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::classify::{Classified, Classifier, SseMessage};
use crate::config::{ReconnectConfig, StreamInstance};
use crate::dedup::OverlapDeduplicator;
use crate::event::{Event, TargetId};
use crate::queue::Store;
use crate::queue::lease::{Grant, LeaseWatch};
use crate::retry_after;
use crate::routing::{EventFilter, RoutingTable};
use crate::secret_headers::{HeaderSet, Owner, SecretHeaders};
use crate::telemetry::{DisconnectReason, DropReason, Metrics, RotationResult, StreamTelemetry};
use crate::transport::{ClosedMidEvent, StreamClient, StreamTransport};

/// A connection that lasted this long was healthy, even if it carried no event.
const HEALTHY_CONNECTION_AGE: Duration = Duration::from_secs(1);

/// The longest `Retry-After` an upstream is obeyed for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How long the old connection is still read after its replacement carried data, unless it
/// catches up sooner: events published before the replacement subscribed may be in flight on it.
/// (`rotate_after` is at least `config::MIN_ROTATE_AFTER`, so overlaps stay a small part.)
const ROTATION_DRAIN: Duration = Duration::from_secs(2);

/// The longest SSE id kept for `Last-Event-ID`. Servers commonly refuse request heads over
/// 8 KiB; a longer id would make every reconnect fail, for good once stored.
pub const MAX_EVENT_ID_BYTES: usize = 1024;

/// How long after an overlap ends the events of the closed connection are still remembered, to
/// catch the copies that the remaining connection shows late.
const DUPLICATE_GRACE: Duration = Duration::from_secs(5);

/// What streams hand events to: the routing table and the store. A reload replaces it whole,
/// and each stream picks up the new one with its next event.
pub struct Router {
    pub table: RoutingTable,
    pub store: Store,
    /// `sse_relay_events_received_total` handles, by `StreamId` and event type label index.
    received: Vec<Vec<prometheus::IntCounter>>,
}

impl Router {
    pub fn new(table: RoutingTable, store: Store, metrics: &Metrics) -> Router {
        let received = table
            .streams()
            .map(|(name, id)| metrics.events_received(name, table.event_type_labels(id)))
            .collect();
        Router { table, store, received }
    }
}

/// A stream as its task uses it, built from its config.
pub struct StreamRuntime {
    /// The name routes and metrics know it by: its own, or its template's.
    template: Arc<str>,
    url: String,
    headers: SecretHeaders,
    idle_timeout: Duration,
    rotate_after: Option<Duration>,
    reconnect: ReconnectConfig,
    classifier: Classifier,
    pub telemetry: Arc<StreamTelemetry>,
    transport: StreamTransport,
    /// An instance ends after an event that matches is queued.
    stop_when: Option<EventFilter>,
    /// An instance ends this long after it started.
    ttl: Option<Duration>,
    /// Where an instance that ended on its own says so, by its name.
    finished: Option<mpsc::UnboundedSender<Arc<str>>>,
    /// Every new connection of every stream waits its turn here (`connections.rate`).
    connect_limiter: Arc<ConnectLimiter>,
    /// With storage shared by replicas: the stream's side of a hand-over between them.
    handover: Option<Arc<Handover>>,
}

/// Events held on standby at most; beyond, the oldest are given up (counted): a hand-over
/// normally completes within a few lease rounds.
const MAX_HELD_ON_STANDBY: usize = 65_536;

/// How long a new owner holds on after the lease is granted, for the previous owner's last
/// event to arrive on its own connection too; past it, it takes all it held (at worst an
/// event twice, never one lost).
const HANDOVER_CATCH_UP: Duration = Duration::from_secs(2);

/// A stream's side of a hand-over between replicas (make-before-break). The new owner reads
/// the stream on standby before it holds the lease, and holds what arrives; the old owner
/// stops once that connection is open. Each stored event's key is written with the stream's
/// position, in the same transaction, so the new owner takes from what it holds only what
/// comes after the last event stored, whoever stored it: no event is lost or taken twice,
/// even from an upstream that keeps no history, and even when the old owner died first.
#[derive(Default)]
pub struct Handover {
    inner: std::sync::Mutex<HandoverState>,
    activated: tokio::sync::Notify,
}

#[derive(Default)]
struct HandoverState {
    standby: bool,
    /// With each event's key, and whether its SSE id was its own.
    held: std::collections::VecDeque<(Event, u64, bool)>,
    /// Set when the lease is granted after a standby: the keys of the last events stored
    /// from the stream, if any, and until when to wait for the last of them to arrive here.
    activation: Option<(Option<Arc<[u64]>>, Instant)>,
}

impl Handover {
    fn lock(&self) -> std::sync::MutexGuard<'_, HandoverState> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The stream reads on standby: it holds what arrives.
    pub fn stand_by(&self) {
        let mut state = self.lock();
        state.standby = true;
        state.held.clear();
        state.activation = None;
    }

    /// The lease is granted: what was held after the previous owner's last event is taken,
    /// once that event arrived here too (or after `HANDOVER_CATCH_UP`).
    pub fn activate(&self, handed_over: Option<Arc<[u64]>>) {
        let mut state = self.lock();
        if !state.standby || state.activation.is_some() {
            return;
        }
        state.activation = Some((handed_over, Instant::now() + HANDOVER_CATCH_UP));
        drop(state);
        self.activated.notify_one();
    }

    /// Wakes the stream when its catch-up time ran out.
    pub fn check_catch_up(&self) {
        let due = self
            .lock()
            .activation
            .as_ref()
            .is_some_and(|(_, until)| Instant::now() >= *until);
        if due {
            self.activated.notify_one();
        }
    }

    /// Holds the event while on standby; hands it back when live.
    fn hold(&self, event: Event, fresh_id: bool, telemetry: &StreamTelemetry) -> Option<Event> {
        let mut state = self.lock();
        if !state.standby {
            return Some(event);
        }
        if state.held.len() == MAX_HELD_ON_STANDBY {
            state.held.pop_front();
            telemetry.dropped(
                DropReason::HandoverOverflow,
                &"more events than a hand-over holds arrived before the lease was granted",
            );
        }
        let key = handover_key(&event, fresh_id);
        state.held.push_back((event, key, fresh_id));
        let caught_up = state
            .activation
            .as_ref()
            .and_then(|(keys, _)| keys.as_ref()?.last().copied())
            == Some(key);
        drop(state);
        if caught_up {
            self.activated.notify_one();
        }
        None
    }

    /// What was held and is to be taken, once activated.
    fn take_activation(&self) -> Option<Vec<(Event, bool)>> {
        let mut state = self.lock();
        let (handed_over, until) = state.activation.clone()?;
        let skip = match handed_over {
            Some(keys) => match already_taken(state.held.make_contiguous(), &keys) {
                Some(skip) => skip,
                // The previous owner's last event has not arrived here yet.
                None if Instant::now() < until => return None,
                None => 0,
            },
            None => 0,
        };
        state.activation = None;
        state.standby = false;
        let held: Vec<(Event, u64, bool)> = state.held.drain(..).collect();
        drop(state);
        Some(
            held.into_iter()
                .skip(skip)
                .map(|(event, _, fresh_id)| (event, fresh_id))
                .collect(),
        )
    }
}

/// How many of the held events the previous owner took already: through the earliest place
/// where the held keys end with the previous owner's last keys (as many as both have). `None`
/// when its last event is not among them (yet).
fn already_taken(held: &[(Event, u64, bool)], previous: &[u64]) -> Option<usize> {
    let Some(&last) = previous.last() else { return Some(0) };
    (0..held.len())
        .find(|&end| {
            held[end].1 == last
                && held[..=end]
                    .iter()
                    .rev()
                    .zip(previous.iter().rev())
                    .all(|((_, held, _), previous)| held == previous)
        })
        .map(|end| end + 1)
}

/// An event's key across replicas: its SSE id when it is its own, else its type and data.
/// The same on every replica (unlike the rotation's keys, whose hasher is random).
fn handover_key(event: &Event, fresh_id: bool) -> u64 {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    match event.sse_id.as_deref().filter(|_| fresh_id) {
        Some(id) => {
            hasher.update([0]);
            hasher.update(id.as_bytes());
        }
        None => {
            hasher.update([1]);
            hasher.update(event.event_type.as_bytes());
            hasher.update([0]);
            hasher.update(&event.data);
        }
    }
    let digest = hasher.finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("a sha256 digest has 32 bytes"))
}

/// Spreads new upstream connections over time: a token bucket at `connections.rate`, so that
/// thousands of streams starting together, or reconnecting after an upstream outage, do not
/// arrive at once; and up to 100 ms of jitter before a stream's first connection, so that
/// streams started together do not stay in step. (A reconnection after a failure waits a
/// backoff that has its own jitter; one after a productive connection waits for nothing but
/// the bucket, since the chat API keeps no history and every millisecond without a connection
/// can lose events.)
pub struct ConnectLimiter {
    /// One connection's share of the rate.
    period: Duration,
    /// How far ahead of its turn a connection may go: a burst of `rate` connections.
    tolerance: Duration,
    /// The theoretical arrival time of the next connection (GCRA): each connection reserves
    /// its turn at once and sleeps until then, so thousands waiting cost one timer each, not a
    /// wake-up each time a turn frees.
    next_turn: std::sync::Mutex<Instant>,
}

/// The most a connection waits beyond its turn.
const CONNECT_JITTER: Duration = Duration::from_millis(100);

impl ConnectLimiter {
    pub fn new(rate: crate::config::RateLimit) -> ConnectLimiter {
        let period = (rate.per / rate.n_requests).max(Duration::from_nanos(1));
        ConnectLimiter {
            period,
            tolerance: period * (rate.n_requests - 1),
            next_turn: std::sync::Mutex::new(Instant::now()),
        }
    }

    /// When a connection asking now may go, reserving that turn.
    fn reserve(&self) -> Instant {
        let mut next_turn = self.next_turn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let base = (*next_turn).max(now);
        *next_turn = base + self.period;
        base.checked_sub(self.tolerance).map_or(now, |turn| turn.max(now))
    }

    /// Waits for this connection's turn; a stream's first connection also waits its jitter.
    async fn turn(&self, first: bool) {
        if first {
            let jitter = fastrand::u64(..CONNECT_JITTER.as_millis() as u64);
            tokio::time::sleep(Duration::from_millis(jitter)).await;
        }
        tokio::time::sleep_until(self.reserve()).await;
    }
}

impl StreamRuntime {
    /// `finished` hears of an instance that ended on its own (`stop_when`, `ttl`).
    pub fn new(
        instance: &StreamInstance,
        table: &RoutingTable,
        telemetry: Arc<StreamTelemetry>,
        client: &StreamClient,
        finished: Option<mpsc::UnboundedSender<Arc<str>>>,
        connect_limiter: Arc<ConnectLimiter>,
    ) -> anyhow::Result<StreamRuntime> {
        let config = &instance.config;
        let headers = SecretHeaders::new(Owner::Stream(Arc::clone(&telemetry.name)), &config.headers)?;
        let known_event_types: Vec<Arc<str>> = table
            .stream_id(&instance.template)
            .map(|id| table.exact_event_types(id).collect())
            .unwrap_or_default();
        Ok(StreamRuntime {
            template: Arc::from(instance.template.as_str()),
            stop_when: config
                .stop_when
                .as_ref()
                .map(|stop_when| EventFilter::new(&stop_when.events, &stop_when.where_equal)),
            ttl: config.ttl,
            finished,
            connect_limiter,
            url: config.url.0.to_string(),
            headers,
            idle_timeout: config.idle_timeout,
            rotate_after: config.rotate_after,
            reconnect: config.reconnect.clone(),
            classifier: Classifier::new(Arc::clone(&telemetry.name), config, known_event_types),
            transport: StreamTransport::new(client.clone(), config.max_event_bytes, Arc::clone(&telemetry)),
            telemetry,
            handover: None,
        })
    }

    /// For storage shared by replicas: the stream can be handed over between them.
    pub fn with_handover(mut self) -> StreamRuntime {
        self.handover = Some(Arc::default());
        self
    }

    fn error_backoff(&self) -> ExponentialBackoff {
        error_backoff(&self.reconnect)
    }

    /// What an event that was queued (or matched no route) comes to: it may end the instance.
    fn accepted(&self, event: &Event) -> Accepted {
        match &self.stop_when {
            Some(stop_when) if stop_when.matches(event) => Accepted::Finished,
            _ => Accepted::Event,
        }
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

/// Runs the stream until `stop` is cancelled; `router` holds the current routing table and store.
pub async fn run_stream(stream: Arc<StreamRuntime>, router: watch::Receiver<Arc<Router>>, stop: CancellationToken) {
    // Resumes where the last run stopped, for servers that replay from Last-Event-ID.
    // The store knows the last id this stream accepted, whether in this run (a reload that
    // restarted the stream) or the last one.
    let mut state = StreamState::new(
        router
            .borrow()
            .store
            .last_event_id(&stream.telemetry.name)
            .filter(|id| can_resume_from(id)),
    );
    let mut backoff = stream.error_backoff();
    let ends_at = stream.ttl.map(|ttl| Instant::now() + ttl);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = sleep_until(ends_at) => {
                state.finished = Some(Finished::Ttl);
                break;
            }
            () = stream.connect_limiter.turn(state.n_connections == 0) => {}
        }
        let Some(end) = read_connections(&stream, &router, &mut state, &stop, ends_at).await else {
            break;
        };
        let delay = reconnect_delay(&end, &stream.reconnect, &mut backoff, || stream.error_backoff());
        stream.telemetry.disconnected(end.reason, &end.detail, delay);
        if !delay.is_zero() {
            tokio::select! {
                () = stop.cancelled() => break,
                () = sleep_until(ends_at) => {
                    state.finished = Some(Finished::Ttl);
                    break;
                }
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
    match state.finished {
        Some(finished) => {
            stream.telemetry.finished(finished.why());
            if let Some(notice) = &stream.finished {
                let _ = notice.send(Arc::clone(&stream.telemetry.name));
            }
        }
        None => stream.telemetry.disconnected_at_shutdown(),
    }
}

/// Runs a stream while this replica holds its lease (storage shared by replicas), or reads it
/// on standby while another replica hands it over (see [`Handover`]): it starts when the lease
/// is granted, stops when the lease is lost or handed on, and starts again if it comes back.
/// The cluster reads the stream's Last-Event-ID before it grants the lease or the standby, so
/// the stream resumes where the last replica stopped.
pub async fn run_leased_stream(
    stream: Arc<StreamRuntime>,
    router: watch::Receiver<Arc<Router>>,
    stop: CancellationToken,
    mut lease: LeaseWatch,
) {
    let Some(handover) = stream.handover.clone() else {
        return run_stream(stream, router, stop).await;
    };
    let handoff = Arc::clone(lease.handoff());
    let ttl = lease.leases().ttl();
    loop {
        let standby = loop {
            match lease.grant() {
                Grant::Standby => break true,
                Grant::Held { .. } if lease.token().is_some() => break false,
                Grant::Held { .. } | Grant::NotHeld => {}
            }
            // A grant that is held but not yet valid becomes valid with the next renewal.
            tokio::select! {
                () = stop.cancelled() => return,
                () = lease.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        };
        if standby {
            handover.stand_by();
        }
        handoff.running.store(true, std::sync::atomic::Ordering::SeqCst);
        let run_stop = stop.child_token();
        let run = tokio::spawn(run_stream(Arc::clone(&stream), router.clone(), run_stop.clone()));
        tokio::pin!(run);
        // The lease's validity can run out without a change of grant (the process was
        // paused), and a standby connection opens without one: both are checked often.
        let mut check = tokio::time::interval((ttl / 8).min(Duration::from_millis(50)));
        let finished = loop {
            tokio::select! {
                _ = &mut run => break !run_stop.is_cancelled(),
                () = lease.changed() => {}
                _ = check.tick() => {}
            }
            match lease.grant() {
                Grant::Standby => {
                    if stream.telemetry.is_connected() {
                        handoff.ready.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                Grant::Held { handed_over, .. } if lease.token().is_some() => {
                    handover.activate(handed_over);
                    handover.check_catch_up();
                }
                Grant::Held { .. } | Grant::NotHeld => run_stop.cancel(),
            }
        };
        handoff.ready.store(false, std::sync::atomic::Ordering::SeqCst);
        handoff.running.store(false, std::sync::atomic::Ordering::SeqCst);
        // Ended on its own (stop_when, ttl), or the relay stops.
        if finished || stop.is_cancelled() {
            return;
        }
    }
}

/// Why an instance ended on its own.
#[derive(Debug, Clone, Copy)]
enum Finished {
    StopWhen,
    Ttl,
}

impl Finished {
    fn why(self) -> &'static str {
        match self {
            Finished::StopWhen => "an event matched stop_when",
            Finished::Ttl => "its ttl ran out",
        }
    }
}

/// What a stream keeps from one connection to the next.
struct StreamState {
    /// Set when an instance ended on its own.
    finished: Option<Finished>,
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

impl StreamState {
    /// A stream's state before its first connection, resuming from `last_event_id`.
    fn new(last_event_id: Option<String>) -> StreamState {
        StreamState {
            last_event_id,
            rejected_event_id: None,
            targets: Vec::new(),
            rotation_refused: false,
            auth_failed_with: None,
            n_connections: 0,
            duplicates: OverlapDeduplicator::new(DUPLICATE_GRACE),
            finished: None,
        }
    }
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
    /// The lease was granted after a standby: what was held is taken.
    HandedOver,
}

/// The make-before-break rotation of a stream's connection: whether a replacement is open
/// beside the current connection, and every transition of the overlap, with the duplicate
/// suppression and the rotation telemetry that go with it. The current connection itself stays
/// with the caller, which hands it in where a transition replaces it.
enum Rotation {
    /// One connection carries the stream. A rotation is tried once per connection (`tried`):
    /// after a failure the connection carries on until it ends.
    Single { tried: bool },
    /// A replacement is open beside the current connection, and both are read. `drain_until`
    /// is set once the replacement carried its first message (it is live): events published
    /// before it subscribed may still be on their way on the current connection, which is read
    /// until then, or until it catches up.
    Overlapping {
        replacement: Connection,
        drain_until: Option<Instant>,
    },
}

impl Rotation {
    /// When the current connection is to be rotated: at its `rotate_after` age, unless a
    /// rotation was tried for it already.
    fn due_at(&self, current: &Connection, rotate_after: Option<Duration>) -> Option<Instant> {
        match (self, rotate_after) {
            (Rotation::Single { tried: false }, Some(rotate_after)) => Some(current.started + rotate_after),
            _ => None,
        }
    }

    fn drain_until(&self) -> Option<Instant> {
        match self {
            Rotation::Single { .. } => None,
            Rotation::Overlapping { drain_until, .. } => *drain_until,
        }
    }

    fn replacement_mut(&mut self) -> Option<&mut Connection> {
        match self {
            Rotation::Single { .. } => None,
            Rotation::Overlapping { replacement, .. } => Some(replacement),
        }
    }

    /// The rotation is due: opens the replacement beside `current`.
    fn start(
        &mut self,
        current: &Connection,
        state: &mut StreamState,
        telemetry: &StreamTelemetry,
        open: impl FnOnce(&mut StreamState) -> Result<Connection, es::Error>,
    ) {
        *self = Rotation::Single { tried: true };
        telemetry.rotation_started();
        match open(state) {
            Ok(mut replacement) => {
                replacement.is_replacement = true;
                state.duplicates.begin(current.serial, replacement.serial);
                *self = Rotation::Overlapping {
                    replacement,
                    drain_until: None,
                };
            }
            Err(err) => Rotation::record_end(state, telemetry, RotationResult::Failed, &err),
        }
    }

    /// Something arrived on `which`: the replacement's first message, an event or a comment,
    /// makes it live, and starts the drain of the current connection.
    fn item_arrived(&mut self, which: Which, item: &Option<es::Result<es::SSE>>) {
        let is_message = matches!(item, Some(Ok(es::SSE::Event(_) | es::SSE::Comment(_))));
        if which == Which::Replacement
            && is_message
            && let Rotation::Overlapping { drain_until, .. } = self
            && drain_until.is_none()
        {
            *drain_until = Some(Instant::now() + ROTATION_DRAIN);
        }
    }

    /// An event on `which` was accepted, or found to be a copy.
    fn event_accepted(&mut self, which: Which, accepted: &Accepted) {
        // The old connection caught up with what the live replacement already showed: everything
        // after this on it is a copy, so stop reading it.
        if which == Which::Current
            && matches!(accepted, Accepted::Duplicate)
            && let Rotation::Overlapping { drain_until, .. } = self
            && drain_until.is_some()
        {
            *drain_until = Some(Instant::now());
        }
    }

    /// The drain is over: the replacement takes over, and the old connection is dropped, which
    /// closes its socket.
    fn drain_over(&mut self, current: &mut Connection, state: &mut StreamState, telemetry: &StreamTelemetry) {
        let Some((replacement, _)) = self.end_overlap(false) else {
            return;
        };
        state.duplicates.closed(current.serial, Instant::now());
        *current = replacement;
        Rotation::record_end(state, telemetry, RotationResult::Completed, &"");
    }

    /// A connection ended: during an overlap the other one carries on; otherwise the stream's
    /// connection ended, and that is returned.
    fn connection_ended(
        &mut self,
        current: &mut Connection,
        ended: Ended,
        state: &mut StreamState,
        telemetry: &StreamTelemetry,
    ) -> Option<ConnectionEnd> {
        match ended.which {
            Which::Current => self.current_ended(current, ended, state, telemetry),
            Which::Replacement => {
                self.replacement_ended(ended, state, telemetry);
                None
            }
        }
    }

    fn current_ended(
        &mut self,
        current: &mut Connection,
        ended: Ended,
        state: &mut StreamState,
        telemetry: &StreamTelemetry,
    ) -> Option<ConnectionEnd> {
        if ended.refused && current.is_replacement {
            // A replacement that took over before its answer came: the server allows one
            // connection at a time after all.
            Rotation::record_end(state, telemetry, RotationResult::Refused, &ended.detail);
        }
        let end = current.end(ended.reason, ended.detail, ended.retry_after);
        let Some((mut replacement, live)) = self.end_overlap(false) else {
            return Some(end);
        };
        // The replacement carries on, without a gap.
        if live {
            state.duplicates.closed(current.serial, Instant::now());
        } else {
            // It has shown nothing yet, so nothing of the old connection's is known to be coming
            // again; keeping its keys could only hide new events.
            state.duplicates.forget(current.serial);
        }
        replacement.follows_productive = end.productive;
        *current = replacement;
        telemetry.handed_over(end.reason, &end.detail);
        if current.connected {
            Rotation::record_end(state, telemetry, RotationResult::Completed, &"");
            telemetry.connected(state.last_event_id.as_deref());
        }
        None
    }

    /// The replacement ended: the current connection carries on, and is not rotated again.
    fn replacement_ended(&mut self, ended: Ended, state: &mut StreamState, telemetry: &StreamTelemetry) {
        let result = if ended.refused {
            RotationResult::Refused
        } else {
            RotationResult::Failed
        };
        if let Some((dropped, live)) = self.end_overlap(true) {
            // Events it carried were delivered already; what the current connection shows next
            // must still be compared with them for a while.
            if live {
                state.duplicates.closed(dropped.serial, Instant::now());
            } else {
                state.duplicates.forget(dropped.serial);
            }
        }
        Rotation::record_end(state, telemetry, result, &ended.detail);
    }

    /// Ends an overlap, if there is one, for a single connection that has `tried` a rotation or
    /// not: the replacement, and whether it was live.
    fn end_overlap(&mut self, tried: bool) -> Option<(Connection, bool)> {
        match std::mem::replace(self, Rotation::Single { tried }) {
            Rotation::Overlapping {
                replacement,
                drain_until,
            } => Some((replacement, drain_until.is_some())),
            single => {
                *self = single;
                None
            }
        }
    }

    /// Counts a rotation's end, and logs a refusal only when the server starts refusing, and
    /// once it accepts a second connection again.
    fn record_end(
        state: &mut StreamState,
        telemetry: &StreamTelemetry,
        result: RotationResult,
        detail: &dyn std::fmt::Display,
    ) {
        let was_refused = state.rotation_refused;
        state.rotation_refused = match result {
            RotationResult::Refused => true,
            RotationResult::Completed => false,
            RotationResult::Failed => was_refused,
        };
        telemetry.rotation_ended(result, detail, was_refused != state.rotation_refused);
    }
}

/// Reads a connection to its end, rotating it for a replacement when `rotate_after` says so;
/// `None` when `stop` ended it, or the instance finished (`ends_at`, `stop_when`).
async fn read_connections(
    stream: &StreamRuntime,
    router: &watch::Receiver<Arc<Router>>,
    state: &mut StreamState,
    stop: &CancellationToken,
    ends_at: Option<Instant>,
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
    let mut rotation = Rotation::Single { tried: false };
    let telemetry = &stream.telemetry;

    loop {
        let drain_until = rotation.drain_until();
        let rotate_at = rotation.due_at(&current, stream.rotate_after);
        let step = tokio::select! {
            biased;
            () = stop.cancelled() => return None,
            () = sleep_until(ends_at) => {
                state.finished = Some(Finished::Ttl);
                return None;
            }
            () = current.idle.as_mut() => Step::Idle(Which::Current),
            item = current.events.next() => Step::Item(Which::Current, item),
            step = replacement_step(rotation.replacement_mut()) => step,
            () = sleep_until(drain_until) => Step::DrainOver,
            () = sleep_until(rotate_at) => Step::Rotate,
            () = handed_over(stream.handover.as_deref()) => Step::HandedOver,
        };
        let ended = match step {
            Step::HandedOver => {
                let Some(held) = stream.handover.as_ref().and_then(|handover| handover.take_activation()) else {
                    continue;
                };
                let current_router = Arc::clone(&router.borrow());
                for (event, fresh_id) in held {
                    match deliver(stream, &current_router, event, fresh_id, state, stop).await {
                        Accepted::Stopped => return None,
                        Accepted::Finished => {
                            state.finished = Some(Finished::StopWhen);
                            return None;
                        }
                        Accepted::Event | Accepted::Noise | Accepted::Duplicate => {}
                    }
                }
                None
            }
            Step::Rotate => {
                rotation.start(&current, state, telemetry, |state| Connection::open(stream, state));
                None
            }
            Step::DrainOver => {
                rotation.drain_over(&mut current, state, telemetry);
                None
            }
            Step::Idle(which) => idle(stream, connection_mut(&mut current, &mut rotation, which), which),
            Step::Item(which, item) => {
                rotation.item_arrived(which, &item);
                let Some(connection) = connection_mut(&mut current, &mut rotation, which) else {
                    continue;
                };
                match read_item(stream, router, state, stop, connection, which, item).await {
                    Read::Nothing => None,
                    Read::Ended(ended) => Some(ended),
                    Read::Stopped => return None,
                    Read::Finished => {
                        state.finished = Some(Finished::StopWhen);
                        return None;
                    }
                    Read::Accepted(accepted) => {
                        read_on(stream, &mut current, &mut rotation);
                        rotation.event_accepted(which, &accepted);
                        None
                    }
                }
            }
        };
        if let Some(ended) = ended
            && let Some(end) = rotation.connection_ended(&mut current, ended, state, telemetry)
        {
            return Some(end);
        }
    }
}

/// The idle timer of a connection went off: it ended, unless bytes still arrive.
fn idle(stream: &StreamRuntime, connection: Option<&mut Connection>, which: Which) -> Option<Ended> {
    if let Some(connection) = connection
        && connection.received_bytes()
    {
        connection.idle.as_mut().reset(Instant::now() + stream.idle_timeout);
        return None;
    }
    let idle_for = crate::telemetry::to_millis(stream.idle_timeout);
    let detail = format!("nothing received for {idle_for}");
    Some(Ended::new(which, DisconnectReason::IdleTimeout, detail))
}

/// Restarts the idle timers after an event was accepted. Time spent waiting for room in the
/// queue (backpressure) is not silence on the connections: what they sent meanwhile is waiting
/// in their sockets, to be read now.
fn read_on(stream: &StreamRuntime, current: &mut Connection, rotation: &mut Rotation) {
    let read_on_until = Instant::now() + stream.idle_timeout;
    current.idle.as_mut().reset(read_on_until);
    if let Some(replacement) = rotation.replacement_mut() {
        replacement.idle.as_mut().reset(read_on_until);
    }
}

/// What an item read from a connection came to.
enum Read {
    /// The response head or a comment.
    Nothing,
    /// An event, and what `accept` made of it.
    Accepted(Accepted),
    Ended(Ended),
    /// The relay stopped before the event could be queued.
    Stopped,
    /// The event was queued, and it ends the instance (`stop_when`).
    Finished,
}

/// Takes one item from `connection`: an event goes to `accept`, the response head and comments
/// are noted, an error or the end of the response ends the connection.
async fn read_item(
    stream: &StreamRuntime,
    router: &watch::Receiver<Arc<Router>>,
    state: &mut StreamState,
    stop: &CancellationToken,
    connection: &mut Connection,
    which: Which,
    item: Option<es::Result<es::SSE>>,
) -> Read {
    connection.idle.as_mut().reset(Instant::now() + stream.idle_timeout);
    connection.received_bytes();
    match item {
        Some(Ok(es::SSE::Event(message))) => {
            let fresh_id = message.id.as_deref().is_some_and(|id| {
                let id_hash = state.duplicates.id_hash(id);
                connection.last_id_hash.replace(id_hash) != Some(id_hash)
            });
            let origin = Origin {
                connection: connection.serial,
                fresh_id,
            };
            let current_router = Arc::clone(&router.borrow());
            match accept(stream, &current_router, message, origin, state, stop).await {
                Accepted::Stopped => Read::Stopped,
                Accepted::Finished => Read::Finished,
                accepted => {
                    if let Accepted::Event = accepted {
                        connection.n_events += 1;
                    }
                    Read::Accepted(accepted)
                }
            }
        }
        Some(Ok(es::SSE::Connected(_))) => {
            connection.connected = true;
            if which == Which::Current {
                stream.telemetry.connected(state.last_event_id.as_deref());
            }
            Read::Nothing
        }
        Some(Ok(es::SSE::Comment(_))) => {
            stream.telemetry.keepalive();
            Read::Nothing
        }
        Some(Err(err)) => {
            let (reason, detail) = describe_error(&err, connection.connected);
            if reason == DisconnectReason::AuthFailed {
                state.auth_failed_with = Some(Arc::clone(&connection.headers));
            }
            let refused = matches!(&err, es::Error::UnexpectedResponse(response, _) if response.status() == 409);
            Read::Ended(Ended {
                which,
                reason,
                detail,
                refused,
                retry_after: retry_after(&err),
            })
        }
        None => Read::Ended(Ended::new(
            which,
            DisconnectReason::Closed,
            "the stream ended".to_owned(),
        )),
    }
}

fn connection_mut<'a>(
    current: &'a mut Connection,
    rotation: &'a mut Rotation,
    which: Which,
) -> Option<&'a mut Connection> {
    match which {
        Which::Current => Some(current),
        Which::Replacement => rotation.replacement_mut(),
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

/// Waits until a hand-over grants the lease; never, without one.
async fn handed_over(handover: Option<&Handover>) {
    match handover {
        Some(handover) => handover.activated.notified().await,
        None => std::future::pending().await,
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
    transport: StreamTransport,
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
    /// Queued, and it ends the instance (`stop_when`).
    Finished,
}

/// Classifies one message, routes it, and submits a delivery per target to the store. When the
/// store cannot take more (full, failing, or a target's outbox with no room), this waits, which
/// pauses the stream on purpose, rather than drop anything.
async fn accept(
    stream: &StreamRuntime,
    router: &Router,
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
    let event = match &stream.handover {
        Some(handover) => match handover.hold(event, origin.fresh_id, telemetry) {
            None => return Accepted::Noise,
            Some(event) => event,
        },
        None => event,
    };
    deliver(stream, router, event, origin.fresh_id, state, stop).await
}

/// Routes a classified event and submits a delivery per target to the store.
async fn deliver(
    stream: &StreamRuntime,
    router: &Router,
    event: Event,
    fresh_id: bool,
    state: &mut StreamState,
    stop: &CancellationToken,
) -> Accepted {
    let key = stream.handover.as_ref().map(|_| handover_key(&event, fresh_id));
    route_and_submit(stream, router, event, key, state, stop).await
}

async fn route_and_submit(
    stream: &StreamRuntime,
    router: &Router,
    event: Event,
    handover_key: Option<u64>,
    state: &mut StreamState,
    stop: &CancellationToken,
) -> Accepted {
    let telemetry = &stream.telemetry;
    // A reload removed this stream; its task is about to stop.
    let Some(stream_id) = router.table.stream_id(&stream.template) else {
        return Accepted::Noise;
    };
    router.received[stream_id.0][router.table.event_type_label_index(stream_id, &event.event_type)].inc();
    telemetry.event_received(event.received_at);
    let targets = &mut state.targets;
    router.table.route(stream_id, &event, targets);
    if telemetry.tap.is_watched() {
        telemetry.tap.send(crate::telemetry::Tapped::Event {
            stream: Arc::clone(&event.stream_name),
            event_type: Arc::clone(&event.event_type),
            event_id: event.id,
            targets: targets
                .iter()
                .map(|target| Arc::clone(router.table.target_name(*target)))
                .collect(),
            data: event.data.clone(),
        });
    }
    if targets.is_empty() {
        telemetry.unrouted(&event.event_type);
        // Only an event that is not a copy moves Last-Event-ID (a lagging old connection's
        // copies would move it back), and only once it is accepted: an event dropped at
        // shutdown is sent again after a resume.
        if let Some(id) = &event.sse_id {
            remember_event_id(stream, &router.store, state, id);
        }
        return stream.accepted(&event);
    }

    let event = Arc::new(event);
    // Only an id that can be sent back as Last-Event-ID is worth storing for the next run.
    let last_event_id = event.sse_id.as_deref().filter(|id| can_resume_from(id));
    let target_names: Vec<Arc<str>> = targets
        .iter()
        .map(|target| Arc::clone(router.table.target_name(*target)))
        .collect();
    let submitted = router
        .store
        .submit(Arc::clone(&event), target_names, last_event_id, handover_key, stop)
        .await;
    match submitted {
        Ok(waited) => {
            if waited {
                telemetry.backpressure();
            }
            if let Some(id) = &event.sse_id {
                remember_event_id(stream, &router.store, state, id);
            }
            stream.accepted(&event)
        }
        Err(err) => {
            telemetry.dropped(
                DropReason::Shutdown,
                &format_args!("the store did not take the event: {err}"),
            );
            Accepted::Stopped
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(keys: &[u64]) -> Vec<(Event, u64, bool)> {
        keys.iter()
            .map(|key| {
                let event = Event {
                    id: crate::event::EventId::new(),
                    stream_name: Arc::from("chat/1"),
                    sse_id: None,
                    event_type: Arc::from("message"),
                    data: bytes::Bytes::new(),
                    is_json: false,
                    json: std::sync::OnceLock::new(),
                    received_at: SystemTime::now(),
                };
                (event, *key, false)
            })
            .collect()
    }

    #[test]
    fn a_new_owner_takes_what_it_held_after_the_last_event_stored() {
        // The old owner stored ..., 4, 5, 6; the standby connection held 5, 6, 7, 8.
        assert_eq!(already_taken(&held(&[5, 6, 7, 8]), &[1, 2, 3, 4, 5, 6]), Some(2));
        // Subscribed after the last event stored: everything held is new.
        assert_eq!(already_taken(&held(&[7, 8]), &[4, 5, 6]), None);
        assert_eq!(already_taken(&held(&[7, 8]), &[]), Some(0));
        // Matched where the keys before it agree too, as far as both go.
        assert_eq!(already_taken(&held(&[6, 7]), &[4, 5, 6]), Some(1));
        assert_eq!(already_taken(&held(&[4, 6, 5, 6, 7]), &[3, 4, 6, 5, 6]), Some(4));
        // Not the old owner's sequence here: nothing matches.
        assert_eq!(already_taken(&held(&[3, 6, 5, 6, 7]), &[4, 5, 6]), None);
        // The same content twice cannot be told apart: the earliest match is taken, so that an
        // event may be taken twice but never lost.
        assert_eq!(already_taken(&held(&[5, 6, 5, 6, 7]), &[4, 5, 6]), Some(2));
    }

    #[test]
    fn the_connect_limiter_lets_a_burst_through_then_spaces_turns_at_the_rate() {
        let limiter = ConnectLimiter::new(crate::config::RateLimit {
            n_requests: 10,
            per: Duration::from_secs(1),
        });
        let start = Instant::now();
        let turns: Vec<Duration> = (0..25).map(|_| limiter.reserve().duration_since(start)).collect();
        let slack = Duration::from_millis(50);
        assert!(turns[..10].iter().all(|turn| *turn < slack), "{turns:?}");
        for (n, turn) in turns.iter().enumerate().skip(10) {
            let due = Duration::from_millis(100) * (n as u32 - 9);
            assert!(*turn >= due && *turn < due + slack, "turn {n} at {turn:?}, due {due:?}");
        }
    }

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

    /// A stream's rotation as `read_connections` drives it, on connections that read nothing,
    /// with the telemetry it reports to.
    struct Rotating {
        metrics: Arc<Metrics>,
        telemetry: StreamTelemetry,
        state: StreamState,
        current: Connection,
        rotation: Rotation,
    }

    impl Rotating {
        fn new() -> Rotating {
            let metrics = Metrics::new();
            let telemetry = metrics.stream("chat");
            let mut state = StreamState::new(None);
            let current = Rotating::connection(&mut state);
            Rotating {
                metrics,
                telemetry,
                state,
                current,
                rotation: Rotation::Single { tried: false },
            }
        }

        /// A connection as `Connection::open` makes it, answered 200, without IO.
        fn connection(state: &mut StreamState) -> Connection {
            state.n_connections += 1;
            Connection {
                serial: state.n_connections,
                headers: Arc::new(HeaderSet {
                    version: 0,
                    pairs: Vec::new(),
                    map: http::HeaderMap::new(),
                }),
                events: Box::pin(futures_util::stream::pending()),
                started: Instant::now(),
                connected: true,
                n_events: 0,
                is_replacement: false,
                follows_productive: false,
                last_id_hash: None,
                activity: Arc::new(AtomicU64::new(0)),
                activity_seen: 0,
                idle: Box::pin(tokio::time::sleep(Duration::from_secs(60))),
            }
        }

        /// Starts a rotation whose replacement opens; its serial.
        fn overlap(&mut self) -> u64 {
            self.rotation
                .start(&self.current, &mut self.state, &self.telemetry, |state| {
                    Ok(Rotating::connection(state))
                });
            self.rotation.replacement_mut().expect("the replacement opened").serial
        }

        /// The replacement shows its first message.
        fn replacement_live(&mut self) {
            self.rotation.item_arrived(Which::Replacement, &comment());
        }

        fn end(&mut self, which: Which, reason: DisconnectReason, refused: bool) -> Option<ConnectionEnd> {
            let ended = Ended {
                which,
                reason,
                detail: "the server answered".to_owned(),
                refused,
                retry_after: None,
            };
            self.rotation
                .connection_ended(&mut self.current, ended, &mut self.state, &self.telemetry)
        }

        fn counter(&self, name: &str, label: (&str, &str)) -> u64 {
            let families = self.metrics.registry.gather();
            let family = families.iter().find(|family| family.name() == name);
            family.map_or(0, |family| {
                family
                    .get_metric()
                    .iter()
                    .filter(|metric| {
                        metric
                            .get_label()
                            .iter()
                            .any(|pair| pair.name() == label.0 && pair.value() == label.1)
                    })
                    .map(|metric| metric.get_counter().get_value() as u64)
                    .sum()
            })
        }

        fn rotations(&self, result: &str) -> u64 {
            self.counter("sse_relay_stream_rotations_total", ("result", result))
        }

        fn reconnects(&self, reason: &str) -> u64 {
            self.counter("sse_relay_stream_reconnects_total", ("reason", reason))
        }

        fn is_deduplicating(&mut self) -> bool {
            self.state.duplicates.is_active(Instant::now())
        }
    }

    fn comment() -> Option<es::Result<es::SSE>> {
        Some(Ok(es::SSE::Comment(String::new())))
    }

    fn event() -> Option<es::Result<es::SSE>> {
        Some(Ok(es::SSE::Event(es::Event {
            event_type: "message".to_owned(),
            data: "{}".to_owned(),
            id: None,
            retry: None,
        })))
    }

    #[tokio::test]
    async fn a_rotation_is_tried_once_per_connection_at_its_rotate_after_age() {
        let mut rotating = Rotating::new();
        let rotate_after = Some(Duration::from_secs(60));
        assert_eq!(
            rotating.rotation.due_at(&rotating.current, None),
            None,
            "rotation is off"
        );
        assert_eq!(
            rotating.rotation.due_at(&rotating.current, rotate_after),
            Some(rotating.current.started + Duration::from_secs(60))
        );

        rotating
            .rotation
            .start(&rotating.current, &mut rotating.state, &rotating.telemetry, |_| {
                Err(es::Error::TimedOut)
            });
        assert!(matches!(rotating.rotation, Rotation::Single { tried: true }));
        assert_eq!(rotating.rotation.due_at(&rotating.current, rotate_after), None);
        assert_eq!(rotating.rotations("failed"), 1);
        assert!(!rotating.state.rotation_refused);
        assert!(!rotating.is_deduplicating());
    }

    #[tokio::test]
    async fn a_replacement_that_opens_is_read_beside_the_current_connection() {
        let mut rotating = Rotating::new();
        let current = rotating.current.serial;
        let replacement = rotating.overlap();
        assert_ne!(replacement, current);
        assert!(rotating.rotation.replacement_mut().unwrap().is_replacement);
        assert_eq!(rotating.rotation.due_at(&rotating.current, Some(Duration::ZERO)), None);
        assert_eq!(
            rotating.rotation.drain_until(),
            None,
            "nothing is drained before the replacement shows a message"
        );
        assert!(rotating.is_deduplicating(), "the two connections' events are compared");
        assert_eq!(rotating.rotations("completed") + rotating.rotations("failed"), 0);
    }

    #[tokio::test]
    async fn the_replacements_first_message_starts_the_drain() {
        let check = |which: Which, item: Option<es::Result<es::SSE>>, drains: bool| {
            let mut rotating = Rotating::new();
            rotating.overlap();
            let before = Instant::now();
            rotating.rotation.item_arrived(which, &item);
            match rotating.rotation.drain_until() {
                Some(drain_until) => {
                    assert!(drains, "{which:?} {item:?} started the drain");
                    assert!(drain_until >= before + ROTATION_DRAIN && drain_until <= Instant::now() + ROTATION_DRAIN);
                }
                None => assert!(!drains, "{which:?} {item:?} did not start the drain"),
            }
        };
        check(Which::Replacement, comment(), true);
        check(Which::Replacement, event(), true);
        check(Which::Replacement, Some(Err(es::Error::TimedOut)), false);
        check(Which::Replacement, None, false);
        check(Which::Current, comment(), false);
        check(Which::Current, event(), false);

        // Later messages do not put the end of the drain off.
        let mut rotating = Rotating::new();
        rotating.overlap();
        rotating.replacement_live();
        let drain_until = rotating.rotation.drain_until();
        rotating.rotation.item_arrived(Which::Replacement, &event());
        assert_eq!(rotating.rotation.drain_until(), drain_until);
    }

    #[tokio::test]
    async fn the_current_connection_catching_up_ends_the_drain_at_once() {
        let mut rotating = Rotating::new();
        rotating.overlap();
        rotating.rotation.event_accepted(Which::Current, &Accepted::Duplicate);
        assert_eq!(
            rotating.rotation.drain_until(),
            None,
            "a copy before the replacement is live starts nothing"
        );

        rotating.replacement_live();
        let drain_until = rotating.rotation.drain_until();
        for (which, accepted) in [
            (Which::Current, Accepted::Event),
            (Which::Current, Accepted::Noise),
            (Which::Replacement, Accepted::Duplicate),
            (Which::Replacement, Accepted::Event),
        ] {
            rotating.rotation.event_accepted(which, &accepted);
            assert_eq!(rotating.rotation.drain_until(), drain_until);
        }
        rotating.rotation.event_accepted(Which::Current, &Accepted::Duplicate);
        assert!(rotating.rotation.drain_until().unwrap() <= Instant::now());
    }

    #[tokio::test]
    async fn after_the_drain_the_replacement_carries_on_alone() {
        let mut rotating = Rotating::new();
        rotating.state.rotation_refused = true;
        let replacement = rotating.overlap();
        rotating.replacement_live();
        rotating
            .rotation
            .drain_over(&mut rotating.current, &mut rotating.state, &rotating.telemetry);
        assert_eq!(rotating.current.serial, replacement);
        assert!(
            matches!(rotating.rotation, Rotation::Single { tried: false }),
            "the new connection rotates in its turn"
        );
        assert_eq!(rotating.rotations("completed"), 1);
        assert!(!rotating.state.rotation_refused, "a completed rotation ends a refusal");
        assert!(
            rotating.is_deduplicating(),
            "the old connection's events are remembered, for late copies"
        );
        assert_eq!(rotating.reconnects("closed"), 0, "the relay closed the old one");

        // A drain deadline without an overlap, should one fire, changes nothing.
        rotating
            .rotation
            .drain_over(&mut rotating.current, &mut rotating.state, &rotating.telemetry);
        assert_eq!(rotating.current.serial, replacement);
        assert_eq!(rotating.rotations("completed"), 1);
    }

    #[tokio::test]
    async fn a_current_connection_that_ends_during_an_overlap_hands_over_without_a_gap() {
        // (the replacement showed a message, it was answered 200, the old one was productive)
        for (live, answered, productive) in [
            (false, false, false),
            (false, true, true),
            (true, false, true),
            (true, true, false),
        ] {
            let case = format!("live {live}, answered {answered}, productive {productive}");
            let mut rotating = Rotating::new();
            rotating.current.n_events = u64::from(productive);
            let replacement = rotating.overlap();
            rotating.rotation.replacement_mut().unwrap().connected = answered;
            if live {
                rotating.replacement_live();
            }
            let end = rotating.end(Which::Current, DisconnectReason::Closed, false);
            assert!(end.is_none(), "{case}: the replacement carries on");
            assert_eq!(rotating.current.serial, replacement, "{case}");
            assert_eq!(rotating.current.follows_productive, productive, "{case}");
            assert!(matches!(rotating.rotation, Rotation::Single { tried: false }), "{case}");
            assert_eq!(rotating.reconnects("closed"), 1, "{case}: the close is counted");
            assert_eq!(
                rotating.rotations("completed"),
                u64::from(answered),
                "{case}: completed once the replacement was answered"
            );
            assert_eq!(
                rotating.is_deduplicating(),
                live,
                "{case}: the old connection's events are remembered only if the replacement showed any"
            );
        }
    }

    #[tokio::test]
    async fn a_current_connection_that_ends_alone_ends_the_streams_connection() {
        let mut rotating = Rotating::new();
        rotating.current.is_replacement = true;
        let current = rotating.current.serial;
        let end = rotating
            .end(Which::Current, DisconnectReason::IdleTimeout, false)
            .expect("nothing carries on");
        assert_eq!(end.reason, DisconnectReason::IdleTimeout);
        assert!(!end.productive);
        assert_eq!(rotating.current.serial, current);
        assert_eq!(
            rotating.reconnects("idle_timeout"),
            0,
            "run_stream counts it, with the delay it chose"
        );
        let n_rotations: u64 = ["completed", "refused", "failed"]
            .map(|result| rotating.rotations(result))
            .iter()
            .sum();
        assert_eq!(n_rotations, 0);
    }

    #[tokio::test]
    async fn a_replacement_that_ends_is_dropped_and_the_current_connection_carries_on() {
        // (the replacement showed a message, it was refused, the result counted)
        for (live, refused, result) in [
            (false, false, "failed"),
            (true, false, "failed"),
            (false, true, "refused"),
        ] {
            let case = format!("live {live}, refused {refused}");
            let mut rotating = Rotating::new();
            let current = rotating.current.serial;
            rotating.overlap();
            if live {
                rotating.replacement_live();
            }
            let end = rotating.end(Which::Replacement, DisconnectReason::HttpError, refused);
            assert!(end.is_none(), "{case}: the current connection carries on");
            assert_eq!(rotating.current.serial, current, "{case}");
            assert!(
                matches!(rotating.rotation, Rotation::Single { tried: true }),
                "{case}: not rotated again"
            );
            assert_eq!(rotating.rotation.drain_until(), None, "{case}");
            assert_eq!(rotating.rotations(result), 1, "{case}");
            assert_eq!(rotating.state.rotation_refused, refused, "{case}");
            assert_eq!(rotating.reconnects("http_error"), 0, "{case}: no reconnect");
            assert_eq!(
                rotating.is_deduplicating(),
                live,
                "{case}: the replacement's events are remembered only if it showed any"
            );
        }
    }

    #[tokio::test]
    async fn a_refusal_is_remembered_until_a_rotation_completes() {
        let mut rotating = Rotating::new();
        rotating.overlap();
        rotating.end(Which::Replacement, DisconnectReason::HttpError, true);
        assert!(rotating.state.rotation_refused);

        // The next connections try again: a failure leaves the refusal, a completion ends it.
        rotating.rotation = Rotation::Single { tried: false };
        rotating.overlap();
        rotating.end(Which::Replacement, DisconnectReason::ConnectError, false);
        assert!(rotating.state.rotation_refused);
        rotating.rotation = Rotation::Single { tried: false };
        rotating.overlap();
        rotating.replacement_live();
        rotating
            .rotation
            .drain_over(&mut rotating.current, &mut rotating.state, &rotating.telemetry);
        assert!(!rotating.state.rotation_refused);
        let counts = ["refused", "failed", "completed"].map(|result| rotating.rotations(result));
        assert_eq!(counts, [1, 1, 1]);
    }

    #[tokio::test]
    async fn a_replacement_refused_after_it_took_over_counts_as_a_refusal() {
        let mut rotating = Rotating::new();
        rotating.overlap();
        rotating.rotation.replacement_mut().unwrap().connected = false;
        // The old connection closes before the replacement's answer comes.
        assert!(rotating.end(Which::Current, DisconnectReason::Closed, false).is_none());
        let end = rotating.end(Which::Current, DisconnectReason::HttpError, true);
        assert_eq!(end.map(|end| end.reason), Some(DisconnectReason::HttpError));
        assert_eq!(rotating.rotations("refused"), 1);
        assert_eq!(rotating.rotations("completed"), 0);
        assert!(rotating.state.rotation_refused);

        // A 409 to a connection that no rotation opened is no rotation's.
        let mut rotating = Rotating::new();
        rotating.end(Which::Current, DisconnectReason::HttpError, true);
        assert_eq!(rotating.rotations("refused"), 0);
        assert!(!rotating.state.rotation_refused);
    }
}
