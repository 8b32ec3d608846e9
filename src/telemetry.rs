//! Logging setup, the metrics registry, and the internal events of streams and targets.
//!
//! Each internal event is one method here that emits both its log line and its metric, so a
//! metric and its log never disagree. Label values come from config (stream and target names,
//! event types that routes name) or from fixed sets (reasons, outcomes), never from input.

use std::collections::BTreeMap;
use std::fmt::{Display, Write as _};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use tracing::{debug, error, info, warn};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs go to stdout: text on a terminal, JSON lines otherwise (journald, containers).
/// `RUST_LOG` filters them; the default is `info`.
pub fn init_logging(format: Option<LogFormat>) {
    let format = format.unwrap_or(if std::io::stdout().is_terminal() {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(std::io::stdout().is_terminal());
    // A second initialisation (tests starting several relays) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
}

/// Every metric of one relay, in its own registry so that relays started side by side in one
/// process (tests) do not share counters.
pub struct Metrics {
    pub registry: Registry,
    stream_connected: IntGaugeVec,
    stream_reconnects: IntCounterVec,
    stream_rotations: IntCounterVec,
    duplicates_suppressed: IntCounterVec,
    events_received: IntCounterVec,
    keepalives: IntCounterVec,
    events_unrouted: IntCounterVec,
    events_dropped: IntCounterVec,
    upstream_errors: IntCounterVec,
    backpressure: IntCounterVec,
    deliveries: IntCounterVec,
    delivery_duration: HistogramVec,
    queue_depth: IntGaugeVec,
    in_flight: IntGaugeVec,
    dead_letters: IntCounterVec,
    oldest_pending: prometheus::GaugeVec,
    target_state: IntGaugeVec,
    config_reloads: IntCounterVec,
    pub storage: Arc<StorageTelemetry>,
    pub admin: AdminTelemetry,
    pub leases: LeaseTelemetry,
    /// What `GET /v1/tap` streams.
    pub tap: Arc<Tap>,
}

/// Events and delivery outcomes tapped for `GET /v1/tap` (`sse-relay tap`), in a bounded
/// broadcast channel: nothing is made or sent while nobody taps, and a reader that falls
/// behind loses the oldest for itself only, told how many (`sse_relay_tap_dropped_total`).
pub struct Tap {
    sender: tokio::sync::broadcast::Sender<Arc<Tapped>>,
    pub dropped: IntCounter,
}

/// Tapped items a reader may fall behind by before it loses some.
pub const TAP_CAPACITY: usize = 1024;

/// One tapped item.
#[derive(Debug, Clone)]
pub enum Tapped {
    /// A stream received an event, and queued it for these targets (none: unrouted).
    Event {
        stream: Arc<str>,
        event_type: Arc<str>,
        event_id: crate::event::EventId,
        targets: Vec<Arc<str>>,
        data: bytes::Bytes,
    },
    /// An attempt to deliver an event ended.
    Delivery {
        target: Arc<str>,
        stream: Arc<str>,
        event_type: Arc<str>,
        event_id: crate::event::EventId,
        /// `delivered`, `retry`, `dead_letter` or `gone`.
        outcome: &'static str,
        status: Option<u16>,
        duration: Duration,
        attempt: u32,
        error: Option<String>,
    },
}

impl Tap {
    /// Whether anyone taps: the only cost on the hot path while nobody does.
    pub fn is_watched(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    pub fn send(&self, tapped: Tapped) {
        // No receiver: nothing to do. A full channel never blocks; laggards lose the oldest.
        let _ = self.sender.send(Arc::new(tapped));
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<Tapped>> {
        self.sender.subscribe()
    }
}

/// The leases of a replica that shares a PostgreSQL store with others.
pub struct LeaseTelemetry {
    /// `sse_relay_leases_held{kind}`.
    pub held: IntGaugeVec,
    /// `sse_relay_lease_changes_total{kind, change}`.
    changes: IntCounterVec,
}

impl LeaseTelemetry {
    /// A lease was acquired, lost or released: counted, and logged at debug (with thousands of
    /// instances a rebalance moves many).
    pub fn changed(&self, kind: &str, name: &str, change: &str) {
        self.changes.with_label_values(&[kind, change]).inc();
        debug!(kind, name, change, "lease changed");
    }
}

/// The admin server's connections.
pub struct AdminTelemetry {
    connections_refused: IntCounter,
    refused_log: LogLimiter,
    accept_failed_log: LogLimiter,
}

impl AdminTelemetry {
    /// A connection beyond the limit, closed as soon as it was accepted.
    pub fn connection_refused(&self, limit: usize) {
        self.connections_refused.inc();
        if let Some(n_held_back) = self.refused_log.admit() {
            warn!(
                limit,
                n_held_back,
                "admin connection closed at once: the admin server serves {limit} at a time (logged at \
                 most every 10 s; the metric counts each)"
            );
        }
    }

    /// Accepting a connection failed, most likely for want of file descriptors; it waits in the
    /// listen queue meanwhile.
    pub fn accept_failed(&self, problem: &dyn Display) {
        if let Some(n_held_back) = self.accept_failed_log.admit() {
            warn!(error = %problem, n_held_back, "cannot accept an admin connection (logged at most every 10 s)");
        }
    }
}

/// The health of the store, for `/readyz` and the streams.
pub struct StorageTelemetry {
    pub errors: IntCounter,
    failing: std::sync::atomic::AtomicBool,
    last_error_at: std::sync::Mutex<Option<std::time::Instant>>,
    /// `sse_relay_deliveries_total`, for deliveries that never reached their target's outbox.
    deliveries: IntCounterVec,
}

/// A storage failure within this long of the last one logged as an error is part of the same
/// outage.
const STORAGE_OUTAGE_QUIET: Duration = Duration::from_secs(60);

impl StorageTelemetry {
    pub fn is_failing(&self) -> bool {
        self.failing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A write to the store failed (appends, results, reads or housekeeping); the writer keeps
    /// what it could not write and tries again, so nothing is lost, and the streams pause once
    /// its queue is full. Logged once per outage, not once per try; the metric counts each.
    pub fn write_failed(&self, problem: &dyn Display) {
        self.errors.inc();
        if self.failing.swap(true, std::sync::atomic::Ordering::Relaxed) {
            debug!(error = %problem, "storage is still failing");
            return;
        }
        // A disk that is nearly full recovers and fails again: one outage, one error line.
        let mut last_error_at = self
            .last_error_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last_error_at.is_some_and(|at| at.elapsed() < STORAGE_OUTAGE_QUIET) {
            warn!(error = %problem, "storage is failing again; streams pause until it recovers");
        } else {
            *last_error_at = Some(std::time::Instant::now());
            error!(error = %problem, "storage is failing; streams pause until it recovers (logged once per outage)");
        }
    }

    /// Deliveries the store took but could not hand to their target (the relay stopped, or a
    /// reload removed the target first): counted as abandoned, and logged.
    pub fn not_delivered(&self, target: &str, n_deliveries: u64, why: &dyn Display) {
        if n_deliveries == 0 {
            return;
        }
        self.deliveries
            .with_label_values(&[target, "abandoned"])
            .inc_by(n_deliveries);
        error!(webhook = %target, n_deliveries, "deliveries were not delivered: {why}");
    }

    /// Everything is written again.
    pub fn write_succeeded(&self) {
        if self.failing.swap(false, std::sync::atomic::Ordering::Relaxed) {
            info!("storage recovered; streams resume");
        }
    }

    /// The disk is full: the space held in reserve is given back, so that delivery results
    /// can be recorded and free space; appends wait until the reserve can be made again.
    pub fn reserve_released(&self) {
        warn!("the disk is full: the queue's reserved space was given up to record delivery results");
    }

    pub fn reserve_restored(&self) {
        info!("the disk has room again: the queue's reserved space is back, and events are stored again");
    }
}

/// The host and port of a URL, as errors may show it.
pub fn host_and_port(url: &reqwest::Url) -> String {
    match (url.host_str(), url.port_or_known_default()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_owned(),
        (None, _) => "an unknown host".to_owned(),
    }
}

/// Totals since the relay started, by stream or target name, that a summary counts from.
#[derive(Default)]
pub struct SummaryTotals {
    received: BTreeMap<String, u64>,
    delivered: BTreeMap<String, u64>,
    failed: BTreeMap<String, u64>,
}

fn separator(text: &str) -> &'static str {
    if text.is_empty() { "" } else { "; " }
}

/// A duration as logs show it: whole milliseconds (`1s 250ms`, not `1s 250ms 582us 774ns`).
pub fn to_millis(duration: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_millis(
        u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
    ))
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, collector: T) -> T {
    registry
        .register(Box::new(collector.clone()))
        .expect("metric names are unique and valid");
    collector
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let build_info = gauge("sse_relay_build_info", "Version of the running relay.", &["version"]);
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let deliveries = counter(
            "sse_relay_deliveries_total",
            "Deliveries by outcome: delivered, retried, failed, abandoned (not delivered at shutdown with \
             the memory store, or not stored before shutdown or a reload removed the target), dropped (the \
             target's queue_capacity was full, memory store).",
            &["target", "outcome"],
        );
        Arc::new(Metrics {
            stream_connected: gauge(
                "sse_relay_stream_connected",
                "1 while the stream's connection is open; for a template, how many of its instances are connected.",
                &["stream"],
            ),
            stream_reconnects: counter(
                "sse_relay_stream_reconnects_total",
                "Connections that ended, by why they ended.",
                &["stream", "reason"],
            ),
            stream_rotations: counter(
                "sse_relay_stream_rotations_total",
                "Make-before-break connection rotations, by result: completed, refused (the server \
                 allows one connection) or failed.",
                &["stream", "result"],
            ),
            duplicates_suppressed: counter(
                "sse_relay_duplicates_suppressed_total",
                "Events seen on both connections while a stream rotated, delivered once.",
                &["stream"],
            ),
            events_received: counter(
                "sse_relay_events_received_total",
                "Events received, keepalives excluded; types no route names are counted as other.",
                &["stream", "event_type"],
            ),
            keepalives: counter(
                "sse_relay_keepalives_total",
                "Keepalive messages received.",
                &["stream"],
            ),
            events_unrouted: counter(
                "sse_relay_events_unrouted_total",
                "Events that matched no route.",
                &["stream"],
            ),
            events_dropped: counter(
                "sse_relay_events_dropped_total",
                "Events the relay could not accept, by reason.",
                &["stream", "reason"],
            ),
            upstream_errors: counter(
                "sse_relay_upstream_errors_total",
                "Malformed input from the upstream that was repaired or passed on as text.",
                &["stream", "kind"],
            ),
            backpressure: counter(
                "sse_relay_backpressure_total",
                "Events a stream had to wait to queue (the store or a target's queue was full).",
                &["stream"],
            ),
            deliveries: deliveries.clone(),
            delivery_duration: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "sse_relay_delivery_duration_seconds",
                        "Duration of one delivery attempt, request to response.",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ]),
                    &["target"],
                )
                .expect("valid metric"),
            ),
            queue_depth: gauge(
                "sse_relay_queue_depth",
                "Deliveries waiting in the target's queue.",
                &["target"],
            ),
            in_flight: gauge(
                "sse_relay_deliveries_in_flight",
                "Delivery attempts in progress.",
                &["target"],
            ),
            dead_letters: counter(
                "sse_relay_dead_letters_total",
                "Deliveries that failed permanently or ran out of retries and became dead letters.",
                &["target"],
            ),
            oldest_pending: register(
                &registry,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "sse_relay_oldest_pending_seconds",
                        "Age of the oldest event with a delivery pending for the target.",
                    ),
                    &["target"],
                )
                .expect("valid metric"),
            ),
            target_state: gauge(
                "sse_relay_target_state",
                "Circuit breaker of the target: 0 closed, 1 open, 2 half-open, 3 gone (410).",
                &["target"],
            ),
            config_reloads: counter(
                "sse_relay_config_reloads_total",
                "Config reloads (SIGHUP) by result: ok or failed.",
                &["result"],
            ),
            tap: Arc::new(Tap {
                sender: tokio::sync::broadcast::Sender::new(TAP_CAPACITY),
                dropped: register(
                    &registry,
                    IntCounter::new(
                        "sse_relay_tap_dropped_total",
                        "Tapped events and outcomes a slow `sse-relay tap` reader lost (the relay never waits for it).",
                    )
                    .expect("valid metric"),
                ),
            }),
            leases: LeaseTelemetry {
                held: gauge(
                    "sse_relay_leases_held",
                    "Leases this replica holds, by kind (stream, target), with storage.mode postgres.",
                    &["kind"],
                ),
                changes: counter(
                    "sse_relay_lease_changes_total",
                    "Leases acquired, lost (taken over after this replica could not renew) or released, by kind.",
                    &["kind", "change"],
                ),
            },
            storage: Arc::new(StorageTelemetry {
                errors: register(
                    &registry,
                    IntCounter::new("sse_relay_storage_errors_total", "Failed writes to the queue database.")
                        .expect("valid metric"),
                ),
                failing: std::sync::atomic::AtomicBool::new(false),
                last_error_at: std::sync::Mutex::new(None),
                deliveries,
            }),
            admin: AdminTelemetry {
                connections_refused: register(
                    &registry,
                    IntCounter::new(
                        "sse_relay_admin_connections_refused_total",
                        "Admin connections closed as soon as they were accepted, because as many as \
                         the admin server serves at a time were open.",
                    )
                    .expect("valid metric"),
                ),
                refused_log: LogLimiter::default(),
                accept_failed_log: LogLimiter::default(),
            },
            registry,
        })
    }

    /// Logs what each stream received and each target delivered and failed since the last
    /// summary, and what each target has queued; `previous` holds the totals it counts from.
    pub fn log_summary(&self, previous: &mut SummaryTotals) {
        let mut totals = SummaryTotals::default();
        let mut queued: BTreeMap<String, i64> = BTreeMap::new();
        for family in self.registry.gather() {
            for metric in family.get_metric() {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|pair| pair.name() == name)
                        .map_or_else(String::new, |pair| pair.value().to_owned())
                };
                let count = metric.get_counter().get_value() as u64;
                match (family.name(), label("outcome").as_str()) {
                    ("sse_relay_events_received_total", _) => {
                        *totals.received.entry(label("stream")).or_default() += count
                    }
                    ("sse_relay_deliveries_total", "delivered") => {
                        *totals.delivered.entry(label("target")).or_default() += count
                    }
                    ("sse_relay_deliveries_total", "failed") => {
                        *totals.failed.entry(label("target")).or_default() += count
                    }
                    ("sse_relay_queue_depth", _) => {
                        queued.insert(label("target"), metric.get_gauge().get_value() as i64);
                    }
                    _ => {}
                }
            }
        }
        let since = |now: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>, name: &str| {
            let count = |totals: &BTreeMap<String, u64>| totals.get(name).copied().unwrap_or(0);
            count(now).saturating_sub(count(before))
        };
        let mut streams = String::new();
        for name in totals.received.keys() {
            let _ = write!(
                streams,
                "{}{name}: {} received",
                separator(&streams),
                since(&totals.received, &previous.received, name)
            );
        }
        let mut targets = String::new();
        for (name, n_queued) in &queued {
            let _ = write!(
                targets,
                "{}{name}: {} delivered, {} failed, {n_queued} queued",
                separator(&targets),
                since(&totals.delivered, &previous.delivered, name),
                since(&totals.failed, &previous.failed, name),
            );
        }
        info!(%streams, %targets, "summary since the last one (logging.summary_interval)");
        *previous = totals;
    }

    /// A reload was applied, or was refused and the running config stays.
    pub fn config_reloaded(&self, applied: bool, problem: &dyn Display) {
        if applied {
            self.config_reloads.with_label_values(&["ok"]).inc();
        } else {
            self.config_reloads.with_label_values(&["failed"]).inc();
            error!(error = %problem, "config reload failed; the running config stays");
        }
    }

    /// `sse_relay_events_received_total` handles for one stream's event type labels.
    pub fn events_received(&self, stream: &str, event_type_labels: &[Arc<str>]) -> Vec<IntCounter> {
        event_type_labels
            .iter()
            .map(|label| self.events_received.with_label_values(&[stream, label]))
            .collect()
    }

    pub fn stream(&self, name: &str) -> StreamTelemetry {
        self.stream_instance(name, name)
    }

    /// The telemetry of `name`, an instance of the template `label` (or a plain stream, with
    /// `label` its own name): logged by its own name, counted under the template's.
    pub fn stream_instance(&self, label: &str, name: &str) -> StreamTelemetry {
        StreamTelemetry {
            name: Arc::from(name),
            label: Arc::from(label),
            tap: Arc::clone(&self.tap),
            is_connected: std::sync::atomic::AtomicBool::new(false),
            status: StreamStatus::default(),
            connected: self.stream_connected.with_label_values(&[label]),
            reconnects: DisconnectReason::ALL
                .iter()
                .map(|reason| self.stream_reconnects.with_label_values(&[label, reason.label()]))
                .collect(),
            rotations: RotationResult::ALL
                .iter()
                .map(|result| self.stream_rotations.with_label_values(&[label, result.label()]))
                .collect(),
            duplicates_suppressed: self.duplicates_suppressed.with_label_values(&[label]),
            keepalives: self.keepalives.with_label_values(&[label]),
            unrouted: self.events_unrouted.with_label_values(&[label]),
            dropped: self.events_dropped.clone(),
            upstream_errors: self.upstream_errors.clone(),
            upstream_error_log: LogLimiter::default(),
            backpressure: self.backpressure.with_label_values(&[label]),
        }
    }

    pub fn target(&self, name: &str) -> TargetTelemetry {
        let outcome = |outcome: &str| self.deliveries.with_label_values(&[name, outcome]);
        TargetTelemetry {
            name: Arc::from(name),
            tap: Arc::clone(&self.tap),
            delivered: outcome("delivered"),
            retried: outcome("retried"),
            failed: outcome("failed"),
            abandoned: outcome("abandoned"),
            dropped: outcome("dropped"),
            duration: self.delivery_duration.with_label_values(&[name]),
            queue_depth: self.queue_depth.with_label_values(&[name]),
            in_flight: self.in_flight.with_label_values(&[name]),
            dead_letters: self.dead_letters.with_label_values(&[name]),
            oldest_pending: self.oldest_pending.with_label_values(&[name]),
            target_state: self.target_state.with_label_values(&[name]),
            retry_log: LogLimiter::default(),
            failure_log: LogLimiter::default(),
            dropped_log: LogLimiter::default(),
        }
    }
}

/// Why a stream's connection ended; the `reason` label of `sse_relay_stream_reconnects_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The server ended the response cleanly between events.
    Closed,
    /// The server ended the response in the middle of an event.
    ClosedMidEvent,
    IdleTimeout,
    AuthFailed,
    HttpError,
    ConnectError,
    ReadError,
}

impl DisconnectReason {
    const ALL: [DisconnectReason; 7] = [
        DisconnectReason::Closed,
        DisconnectReason::ClosedMidEvent,
        DisconnectReason::IdleTimeout,
        DisconnectReason::AuthFailed,
        DisconnectReason::HttpError,
        DisconnectReason::ConnectError,
        DisconnectReason::ReadError,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DisconnectReason::Closed => "closed",
            DisconnectReason::ClosedMidEvent => "closed_mid_event",
            DisconnectReason::IdleTimeout => "idle_timeout",
            DisconnectReason::AuthFailed => "auth_failed",
            DisconnectReason::HttpError => "http_error",
            DisconnectReason::ConnectError => "connect_error",
            DisconnectReason::ReadError => "read_error",
        }
    }
}

/// How a make-before-break rotation ended; the `result` label of
/// `sse_relay_stream_rotations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationResult {
    /// The new connection carried data and the old one was closed.
    Completed,
    /// The server refused a second connection (409); the stream tries again with its next connection.
    Refused,
    /// The new connection failed or stayed silent; the old one carries on until it closes.
    Failed,
}

impl RotationResult {
    const ALL: [RotationResult; 3] = [
        RotationResult::Completed,
        RotationResult::Refused,
        RotationResult::Failed,
    ];

    fn label(self) -> &'static str {
        match self {
            RotationResult::Completed => "completed",
            RotationResult::Refused => "refused",
            RotationResult::Failed => "failed",
        }
    }
}

/// Why an event the upstream sent was not accepted; the `reason` label of
/// `sse_relay_events_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    TooLarge,
    /// The relay stopped while the event waited for room in a full queue.
    Shutdown,
    /// Held on standby during a hand-over between replicas, beyond what a hand-over holds.
    HandoverOverflow,
}

impl DropReason {
    fn label(self) -> &'static str {
        match self {
            DropReason::TooLarge => "too_large",
            DropReason::Shutdown => "shutdown",
            DropReason::HandoverOverflow => "handover_overflow",
        }
    }
}

/// Metric handles and log lines of one stream, resolved once when the stream starts.
pub struct StreamTelemetry {
    /// The stream's name, or an instance's (`chat/8f1c`), as logs show it.
    pub name: Arc<str>,
    /// The name its metrics carry: the stream's, or the template's for an instance, so that
    /// labels stay bounded by the config.
    label: Arc<str>,
    pub tap: Arc<Tap>,
    /// How many of the streams under `label` are connected.
    connected: IntGauge,
    is_connected: std::sync::atomic::AtomicBool,
    /// This stream's own figures, which metrics do not carry (`GET /v1/streams`).
    status: StreamStatus,
    /// Indexed by `DisconnectReason as usize`.
    reconnects: Vec<IntCounter>,
    /// Indexed by `RotationResult as usize`.
    rotations: Vec<IntCounter>,
    duplicates_suppressed: IntCounter,
    pub(crate) keepalives: IntCounter,
    unrouted: IntCounter,
    dropped: IntCounterVec,
    upstream_errors: IntCounterVec,
    upstream_error_log: LogLimiter,
    backpressure: IntCounter,
}

/// One stream's (or instance's) own state, as `GET /v1/streams` shows it.
#[derive(Default)]
struct StreamStatus {
    /// Milliseconds since the Unix epoch; 0 for never.
    connected_since_ms: std::sync::atomic::AtomicU64,
    last_event_ms: std::sync::atomic::AtomicU64,
    n_events: std::sync::atomic::AtomicU64,
    n_reconnects: std::sync::atomic::AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
}

/// A stream's state at one moment.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamSnapshot {
    pub name: String,
    pub connected: bool,
    /// RFC 3339, while connected.
    pub connected_since: Option<String>,
    pub last_event_at: Option<String>,
    pub events_received: u64,
    pub reconnects: u64,
    pub last_error: Option<String>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

fn rfc3339_ms(ms: u64) -> Option<String> {
    (ms != 0).then(|| {
        humantime::format_rfc3339_millis(std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
    })
}

/// Lets a log line through at most once per `LOG_LIMIT_INTERVAL` and counts the ones held back,
/// so that an upstream sending bad input on every event cannot flood the journal. The metric
/// beside the line still counts every occurrence.
#[derive(Default)]
struct LogLimiter {
    /// Milliseconds since `LOG_LIMIT_EPOCH` of the last line let through, plus one; 0 for never.
    last_logged: std::sync::atomic::AtomicU64,
    n_held_back: std::sync::atomic::AtomicU64,
}

const LOG_LIMIT_INTERVAL: Duration = Duration::from_secs(10);

static LOG_LIMIT_EPOCH: std::sync::LazyLock<std::time::Instant> = std::sync::LazyLock::new(std::time::Instant::now);

impl LogLimiter {
    /// `Some(n)` when a line may be logged now, `n` being how many were held back before it.
    fn admit(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = LOG_LIMIT_EPOCH.elapsed().as_millis() as u64 + 1;
        let last = self.last_logged.load(Relaxed);
        let interval = LOG_LIMIT_INTERVAL.as_millis() as u64;
        if last != 0 && now < last + interval || self.last_logged.compare_exchange(last, now, Relaxed, Relaxed).is_err()
        {
            self.n_held_back.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.n_held_back.swap(0, Relaxed))
    }
}

impl StreamTelemetry {
    pub fn is_connected(&self) -> bool {
        self.is_connected.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What `GET /v1/streams` shows of this stream.
    pub fn snapshot(&self) -> StreamSnapshot {
        use std::sync::atomic::Ordering::Relaxed;
        let status = &self.status;
        StreamSnapshot {
            name: self.name.to_string(),
            connected: self.is_connected(),
            connected_since: rfc3339_ms(status.connected_since_ms.load(Relaxed)),
            last_event_at: rfc3339_ms(status.last_event_ms.load(Relaxed)),
            events_received: status.n_events.load(Relaxed),
            reconnects: status.n_reconnects.load(Relaxed),
            last_error: status
                .last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }

    /// An event arrived at `received_at` (keepalives are not events); the event's own time,
    /// so that counting it reads no clock.
    pub fn event_received(&self, received_at: std::time::SystemTime) {
        use std::sync::atomic::Ordering::Relaxed;
        self.status.n_events.fetch_add(1, Relaxed);
        let ms = received_at
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        self.status.last_event_ms.store(ms, Relaxed);
    }

    fn set_connected(&self, connected: bool) {
        self.status.connected_since_ms.store(
            if connected { now_ms() } else { 0 },
            std::sync::atomic::Ordering::Relaxed,
        );
        if self.is_connected.swap(connected, std::sync::atomic::Ordering::Relaxed) != connected {
            if connected {
                self.connected.inc();
            } else {
                self.connected.dec();
            }
        }
    }

    /// Logged at info for a stream of the config, at debug for a template's instance: a
    /// relay with thousands of instances would log thousands of lines at every start and after
    /// every upstream outage (`GET /v1/streams` shows each instance's state).
    pub fn connected(&self, resumed_from: Option<&str>) {
        self.set_connected(true);
        match (resumed_from, self.name == self.label) {
            (Some(last_event_id), true) => info!(stream = %self.name, %last_event_id, "stream connected"),
            (None, true) => info!(stream = %self.name, "stream connected"),
            (Some(last_event_id), false) => debug!(stream = %self.name, %last_event_id, "stream connected"),
            (None, false) => debug!(stream = %self.name, "stream connected"),
        }
    }

    pub fn disconnected(&self, reason: DisconnectReason, detail: &dyn Display, reconnect_in: Duration) {
        self.set_connected(false);
        self.reconnects[reason as usize].inc();
        self.status
            .n_reconnects
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self
            .status
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(format!("{}: {detail}", reason.label()));
        let reconnect_in = to_millis(reconnect_in);
        match reason {
            DisconnectReason::Closed => {
                info!(stream = %self.name, reason = reason.label(), %reconnect_in, "stream closed by the server")
            }
            DisconnectReason::AuthFailed => error!(
                stream = %self.name, reason = reason.label(), error = %detail, %reconnect_in,
                "stream authentication failed; check its credentials"
            ),
            _ => warn!(
                stream = %self.name, reason = reason.label(), error = %detail, %reconnect_in,
                "stream disconnected"
            ),
        }
    }

    /// The connection ended while its replacement, opened by a rotation, was already open: the
    /// stream carries on without a gap.
    pub fn handed_over(&self, reason: DisconnectReason, detail: &dyn Display) {
        self.reconnects[reason as usize].inc();
        info!(
            stream = %self.name, reason = reason.label(), error = %detail,
            "stream connection ended; its replacement carries on"
        );
    }

    pub fn rotation_started(&self) {
        debug!(stream = %self.name, "opening a replacement connection before the server closes this one");
    }

    /// `changed`: the server began refusing a second connection, or accepts one again.
    pub fn rotation_ended(&self, result: RotationResult, detail: &dyn Display, changed: bool) {
        self.rotations[result as usize].inc();
        match result {
            RotationResult::Completed if changed => info!(
                stream = %self.name,
                "the server accepts a second connection again; the stream rotates without gaps again"
            ),
            RotationResult::Completed => info!(stream = %self.name, "stream connection rotated"),
            RotationResult::Refused if changed => warn!(
                stream = %self.name, error = %detail,
                "the server refused a second connection, so this stream cannot rotate; it reconnects \
                 at once whenever the server closes it, and tries rotating again with each new connection"
            ),
            RotationResult::Refused => {
                debug!(stream = %self.name, error = %detail, "the server still refuses a second connection")
            }
            RotationResult::Failed => warn!(
                stream = %self.name, error = %detail,
                "stream rotation failed; the current connection carries on"
            ),
        }
    }

    pub fn duplicate_suppressed(&self) {
        self.duplicates_suppressed.inc();
    }

    pub fn disconnected_at_shutdown(&self) {
        self.set_connected(false);
        info!(stream = %self.name, "stream stopped");
    }

    /// A template's instance has done its work (`stop_when`) or lived its `ttl`: it ends, and
    /// is not connected again.
    pub fn finished(&self, why: &str) {
        self.set_connected(false);
        info!(stream = %self.name, why, "stream instance finished");
    }

    pub fn keepalive(&self) {
        self.keepalives.inc();
    }

    pub fn unrouted(&self, event_type: &str) {
        self.unrouted.inc();
        debug!(stream = %self.name, %event_type, "event matched no route");
    }

    pub fn dropped(&self, reason: DropReason, detail: &dyn Display) {
        self.dropped.with_label_values(&[&self.label, reason.label()]).inc();
        warn!(stream = %self.name, reason = reason.label(), error = %detail, "event dropped");
    }

    /// Input that was malformed but still used: `invalid_json` (routed as text) or
    /// `invalid_utf8` (invalid bytes replaced with U+FFFD, as browsers do).
    pub fn upstream_error(&self, kind: &'static str, detail: &dyn Display) {
        self.upstream_errors.with_label_values(&[&self.label, kind]).inc();
        if let Some(n_held_back) = self.upstream_error_log.admit() {
            warn!(
                stream = %self.name, kind, error = %detail, n_held_back,
                "malformed input from upstream (logged at most every 10 s; the metric counts each)"
            );
        }
    }

    pub fn backpressure(&self) {
        self.backpressure.inc();
        debug!(stream = %self.name, "the queue was full; the stream paused until it had room");
    }
}

/// Metric handles and log lines of one target.
pub struct TargetTelemetry {
    pub name: Arc<str>,
    pub tap: Arc<Tap>,
    delivered: IntCounter,
    retried: IntCounter,
    failed: IntCounter,
    abandoned: IntCounter,
    dropped: IntCounter,
    duration: Histogram,
    pub queue_depth: IntGauge,
    pub in_flight: IntGauge,
    dead_letters: IntCounter,
    pub oldest_pending: prometheus::Gauge,
    target_state: IntGauge,
    retry_log: LogLimiter,
    failure_log: LogLimiter,
    dropped_log: LogLimiter,
}

impl TargetTelemetry {
    pub fn attempt_finished(&self, duration: Duration) {
        self.duration.observe(duration.as_secs_f64());
    }

    pub fn delivered(&self, event_id: &dyn Display, n_attempts: u32, duration: Duration) {
        self.delivered.inc();
        debug!(webhook = %self.name, %event_id, n_attempts, duration = %to_millis(duration), "delivered");
    }

    /// Logged at most every 10 s per target, with how many were held back: a target that fails
    /// every request would otherwise log a line per event.
    pub fn retrying(&self, event_id: &dyn Display, n_attempts: u32, problem: &dyn Display, retry_in: Duration) {
        self.retried.inc();
        if let Some(n_held_back) = self.retry_log.admit() {
            warn!(
                webhook = %self.name, %event_id, n_attempts, error = %problem,
                retry_in = %to_millis(retry_in), n_held_back,
                "delivery failed; will retry (logged at most every 10 s per target; the metric counts each)"
            );
        }
    }

    /// A delivery failed permanently or ran out of retries. Logged at most every 10 s per
    /// target, as retries are: a target that answers 3xx or 4xx fails every event.
    pub fn dead_lettered(&self, event_id: &dyn Display, n_attempts: u32, problem: &dyn Display, kept: bool) {
        self.failed.inc();
        self.dead_letters.inc();
        let Some(n_held_back) = self.failure_log.admit() else {
            return;
        };
        if kept {
            error!(
                webhook = %self.name, %event_id, n_attempts, error = %problem, n_held_back,
                "delivery failed; it is kept as a dead letter (sse-relay dlq list; logged at most every 10 s \
                 per target; the metric counts each)"
            );
        } else {
            error!(
                webhook = %self.name, %event_id, n_attempts, error = %problem, n_held_back,
                "delivery failed; the in-memory store keeps no dead letters (logged at most every 10 s per \
                 target; the metric counts each)"
            );
        }
    }

    /// A paused target answered its probe: deliveries flow again.
    pub fn recovered(&self, from: &str) {
        info!(webhook = %self.name, from, "target recovered; its deliveries flow again");
    }

    /// The circuit breaker's state, as `sse_relay_target_state` shows it (0 closed, 1 open,
    /// 2 half-open, 3 gone).
    pub fn state(&self, metric_value: i64) {
        self.target_state.set(metric_value);
    }

    /// With the memory store, the target already holds `queue_capacity` deliveries: this one is
    /// dropped, for this target only, so that the stream and other targets go on.
    pub fn dropped_queue_full(&self, event_id: &dyn Display, queue_capacity: usize) {
        self.dropped.inc();
        if let Some(n_held_back) = self.dropped_log.admit() {
            error!(
                webhook = %self.name, %event_id, queue_capacity, n_held_back,
                "the target's queue is full, so this delivery was dropped; other targets are not held up \
                 (memory store; logged at most every 10 s per target; the metric counts each)"
            );
        }
    }

    pub fn abandoned(&self, n_deliveries: u64, why: &str) {
        if n_deliveries == 0 {
            return;
        }
        self.abandoned.inc_by(n_deliveries);
        error!(webhook = %self.name, n_deliveries, "{why}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_logged_in_whole_milliseconds() {
        assert_eq!(to_millis(Duration::from_nanos(305_582_774)).to_string(), "305ms");
        assert_eq!(to_millis(Duration::from_micros(1_250_999)).to_string(), "1s 250ms");
        assert_eq!(to_millis(Duration::ZERO).to_string(), "0s");
    }

    #[test]
    fn a_log_limiter_lets_one_line_through_and_counts_the_rest() {
        let limiter = LogLimiter::default();
        assert_eq!(limiter.admit(), Some(0));
        assert_eq!(limiter.admit(), None);
        assert_eq!(limiter.admit(), None);
        assert_eq!(limiter.n_held_back.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}
