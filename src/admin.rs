//! The admin server: `/metrics` (Prometheus text format), `/healthz`, `/readyz`, and the
//! streams API (`/v1/streams`): list every stream, add and remove instances of dynamic
//! templates.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use futures_util::future::BoxFuture;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::{Encoder, TextEncoder};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::queue::Store;
use crate::telemetry::{Metrics, StreamSnapshot, StreamTelemetry};

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Totals taken every 10 s, for the per-minute rates of `/v1/status`.
    pub samples: std::sync::Mutex<std::collections::VecDeque<Sample>>,
    /// The streams `/readyz` checks, replaced as they change; `None` until the relay has
    /// started them.
    pub streams: Arc<std::sync::RwLock<Option<Vec<Arc<StreamTelemetry>>>>>,
    pub store: Store,
    /// When set, `/metrics` and `/v1/` require `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// The running streams, for `/v1/streams`.
    pub control: Arc<dyn StreamControl>,
}

/// What the streams API does with the running streams (the relay implements it).
pub trait StreamControl: Send + Sync {
    /// Starts an instance of a dynamic template; `Ok(false)` when it runs already.
    fn add(&self, template: String, id: String, ttl: Option<Duration>) -> BoxFuture<'_, Result<bool, ApiError>>;
    /// Stops an instance that was added through the API, and forgets it.
    fn remove(&self, template: String, id: String) -> BoxFuture<'_, Result<(), ApiError>>;
    fn list(&self) -> BoxFuture<'_, Vec<StreamState>>;
}

/// One running stream, as `GET /v1/streams` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamState {
    pub template: String,
    pub id: Option<String>,
    /// Added through the API (not from the config).
    pub dynamic: bool,
    /// With storage shared by replicas: the replica that holds the stream's lease, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(flatten)]
    pub state: StreamSnapshot,
}

/// A refused API request: its status and a message that says what was wrong, as JSON
/// `{"error": "..."}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::CONFLICT,
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

/// Admin connections served at a time. More are closed as soon as they are accepted, so that
/// clients that connect and idle cannot take the file descriptors that streams and deliveries
/// need (the relay raises its descriptor limit at start, but that limit is still finite).
pub const MAX_CONNECTIONS: usize = 64;

/// A connection must send a whole request head within this time, both when new and between
/// requests when kept alive; otherwise it is closed. So a half-sent request cannot hold a
/// connection, and neither can an idle one.
pub const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// At shutdown, how long requests in progress get to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves until `stop`, then lets requests in progress finish for up to [`SHUTDOWN_GRACE`].
/// A hand-written accept loop rather than `axum::serve`, which has neither a connection limit
/// nor a request head timeout.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) -> std::io::Result<()> {
    let telemetry = Arc::clone(&state.metrics);
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/streams", get(list_streams))
        .route("/v1/status", get(status))
        .route("/v1/tap", get(tap))
        .route("/v1/streams/{template}/{id}", put(add_stream).delete(remove_stream))
        .with_state(state);
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        match accepted {
            Ok((stream, _)) if connections.len() < MAX_CONNECTIONS => {
                connections.spawn(serve_connection(stream, router.clone(), stop.clone()));
            }
            Ok((stream, _)) => {
                drop(stream);
                telemetry.admin.connection_refused(MAX_CONNECTIONS);
            }
            Err(err) => {
                telemetry.admin.accept_failed(&err);
                // Out of descriptors, say: wait for some to be freed instead of spinning.
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    drop(listener);
    let all_finished = async { while connections.join_next().await.is_some() {} };
    // Those still running after the grace period are aborted as the set is dropped.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, all_finished).await;
    Ok(())
}

async fn serve_connection(stream: TcpStream, router: Router, stop: CancellationToken) {
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_HEAD_TIMEOUT)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = stop.cancelled() => {
            // Finishes the request in progress, if any, then closes.
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// Whether the request carries the admin token, when one is set.
fn authorized(state: &AdminState, headers: &axum::http::HeaderMap) -> bool {
    let Some(token) = &state.token else {
        return true;
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token)
        .unwrap_or("");
    same_secret(presented.as_bytes(), token.as_bytes())
}

fn unauthorized() -> ApiError {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: "the streams API needs Authorization: Bearer <admin.token>".to_owned(),
    }
}

/// The body of `PUT /v1/streams/{template}/{id}`, which may be empty.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AddStream {
    /// Ends the instance this long after it starts, like `2h`.
    ttl: Option<String>,
}

async fn add_stream(
    State(state): State<Arc<AdminState>>,
    Path((template, id)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    if !authorized(&state, &headers) {
        return Err(unauthorized());
    }
    let request: AddStream = if body.iter().all(u8::is_ascii_whitespace) {
        AddStream::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|err| ApiError::bad_request(format!("the body must be JSON such as {{\"ttl\": \"2h\"}}: {err}")))?
    };
    let ttl = match request.ttl.as_deref().map(humantime::parse_duration) {
        None => None,
        Some(Ok(ttl)) if ttl.is_zero() => return Err(ApiError::bad_request("ttl must be longer than 0s")),
        Some(Ok(ttl)) if ttl > crate::config::MAX_DURATION => {
            return Err(ApiError::bad_request("ttl is at most 100 years"));
        }
        Some(Ok(ttl)) => Some(ttl),
        Some(Err(err)) => {
            return Err(ApiError::bad_request(format!(
                "ttl is not a duration such as `2h` or `30m`: {err}"
            )));
        }
    };
    let name = format!("{template}/{id}");
    let created = state.control.add(template, id, ttl).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((
        status,
        axum::Json(serde_json::json!({ "stream": name, "created": created })),
    )
        .into_response())
}

async fn remove_stream(
    State(state): State<Arc<AdminState>>,
    Path((template, id)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> Result<StatusCode, ApiError> {
    if !authorized(&state, &headers) {
        return Err(unauthorized());
    }
    state.control.remove(template, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_streams(
    State(state): State<Arc<AdminState>>,
    headers: axum::http::HeaderMap,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    if !authorized(&state, &headers) {
        return Err(unauthorized());
    }
    let mut streams = state.control.list().await;
    let Store::Postgres(shared) = &state.store else {
        return Ok(axum::Json(serde_json::json!({ "streams": streams })));
    };
    // Every replica lists the same streams; the leases say which one reads each.
    let owners = shared
        .lease_owners(crate::queue::lease::Kind::Stream)
        .await
        .map_err(|err| ApiError::unavailable(format!("cannot read the leases: {err}")))?;
    for stream in &mut streams {
        stream.owner = owners.get(&stream.state.name).cloned();
    }
    let replica = shared.leases.replica();
    Ok(axum::Json(
        serde_json::json!({ "replica": &**replica, "streams": streams }),
    ))
}

/// Totals at one moment, for rates: events per stream, delivered and failed attempts per target.
pub struct Sample {
    at: std::time::Instant,
    events: std::collections::HashMap<String, u64>,
    delivered: std::collections::HashMap<String, f64>,
    failed: std::collections::HashMap<String, f64>,
}

/// How often totals are sampled, and how many samples are kept (a minute and a bit).
const SAMPLE_INTERVAL: Duration = Duration::from_secs(10);
const SAMPLES_KEPT: usize = 8;

/// One target, as `/v1/status` shows it; the values are those of `/metrics`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TargetStatus {
    pub name: String,
    /// `closed`, `open`, `half-open` or `gone` (the circuit breaker).
    pub state: String,
    pub queue_depth: f64,
    pub oldest_pending_seconds: f64,
    pub in_flight: f64,
    pub delivered_total: f64,
    /// Attempts that failed: retried, or given up.
    pub failed_total: f64,
    pub dead_letters_total: f64,
    pub delivered_per_minute: Option<f64>,
    pub failed_per_minute: Option<f64>,
}

/// One stream, as `/v1/status` shows it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct StreamStatus {
    pub name: String,
    pub connected: bool,
    /// With replicas: the replica that reads it.
    pub owner: Option<String>,
    pub last_event_age_seconds: Option<f64>,
    pub events_received: u64,
    pub events_per_minute: Option<f64>,
    pub reconnects: u64,
    pub last_error: Option<String>,
}

/// What `GET /v1/status` answers, and `sse-relay status` shows.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub replica: Option<String>,
    pub streams: Vec<StreamStatus>,
    pub targets: Vec<TargetStatus>,
}

/// The targets' figures, read from the metrics registry.
fn target_figures(metrics: &Metrics) -> std::collections::BTreeMap<String, TargetStatus> {
    let mut targets: std::collections::BTreeMap<String, TargetStatus> = std::collections::BTreeMap::new();
    for family in metrics.registry.gather() {
        for metric in family.get_metric() {
            let label = |name: &str| {
                metric
                    .get_label()
                    .iter()
                    .find(|pair| pair.name() == name)
                    .map(|pair| pair.value().to_owned())
            };
            let Some(target) = label("target") else { continue };
            let value = match family.get_field_type() {
                prometheus::proto::MetricType::GAUGE => metric.get_gauge().get_value(),
                prometheus::proto::MetricType::COUNTER => metric.get_counter().get_value(),
                _ => continue,
            };
            let entry = targets.entry(target.clone()).or_insert_with(|| TargetStatus {
                name: target,
                ..TargetStatus::default()
            });
            match family.name() {
                "sse_relay_target_state" => {
                    entry.state = match value as i64 {
                        1 => "open",
                        2 => "half-open",
                        3 => "gone",
                        _ => "closed",
                    }
                    .to_owned();
                }
                "sse_relay_queue_depth" => entry.queue_depth = value,
                "sse_relay_oldest_pending_seconds" => entry.oldest_pending_seconds = value,
                "sse_relay_deliveries_in_flight" => entry.in_flight = value,
                "sse_relay_dead_letters_total" => entry.dead_letters_total = value,
                "sse_relay_deliveries_total" => match label("outcome").as_deref() {
                    Some("delivered") => entry.delivered_total = value,
                    Some("retried" | "failed") => entry.failed_total += value,
                    _ => {}
                },
                _ => {}
            }
        }
    }
    for target in targets.values_mut().filter(|target| target.state.is_empty()) {
        target.state = "closed".to_owned();
    }
    targets
}

async fn take_sample(state: &AdminState) -> Sample {
    let events = state
        .control
        .list()
        .await
        .into_iter()
        .map(|stream| (stream.state.name, stream.state.events_received))
        .collect();
    let targets = target_figures(&state.metrics);
    Sample {
        at: std::time::Instant::now(),
        events,
        delivered: targets
            .iter()
            .map(|(name, t)| (name.clone(), t.delivered_total))
            .collect(),
        failed: targets.iter().map(|(name, t)| (name.clone(), t.failed_total)).collect(),
    }
}

/// Takes a sample every 10 s, until `stop`.
pub async fn sample_totals(state: Arc<AdminState>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sample = take_sample(&state).await;
        let mut samples = state.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if samples.len() == SAMPLES_KEPT {
            samples.pop_front();
        }
        samples.push_back(sample);
    }
}

/// Per minute, from the oldest sample at most a minute old (5 s old at least), to now.
fn per_minute(
    now: &Sample,
    samples: &std::collections::VecDeque<Sample>,
    value: impl Fn(&Sample) -> Option<f64>,
) -> Option<f64> {
    let old = samples
        .iter()
        .filter(|sample| now.at.duration_since(sample.at) <= Duration::from_secs(65))
        .find(|sample| now.at.duration_since(sample.at) >= Duration::from_secs(5))?;
    let elapsed = now.at.duration_since(old.at).as_secs_f64();
    Some((value(now)? - value(old).unwrap_or(0.0)).max(0.0) * 60.0 / elapsed)
}

async fn status(
    State(state): State<Arc<AdminState>>,
    headers: axum::http::HeaderMap,
) -> Result<axum::Json<Status>, ApiError> {
    if !authorized(&state, &headers) {
        return Err(unauthorized());
    }
    let now = take_sample(&state).await;
    let mut targets = target_figures(&state.metrics);
    let owners = match &state.store {
        Store::Postgres(shared) => Some(
            shared
                .lease_owners(crate::queue::lease::Kind::Stream)
                .await
                .map_err(|err| ApiError::unavailable(format!("cannot read the leases: {err}")))?,
        ),
        _ => None,
    };
    let listed = state.control.list().await;
    let samples = state.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let wall_now = std::time::SystemTime::now();
    let streams = listed
        .into_iter()
        .map(|stream| {
            let snapshot = stream.state;
            let name = snapshot.name.clone();
            StreamStatus {
                owner: owners.as_ref().and_then(|owners| owners.get(&name).cloned()),
                connected: snapshot.connected,
                last_event_age_seconds: snapshot
                    .last_event_at
                    .as_deref()
                    .and_then(|at| humantime::parse_rfc3339(at).ok())
                    .and_then(|at| wall_now.duration_since(at).ok())
                    .map(|age| age.as_secs_f64()),
                events_received: snapshot.events_received,
                events_per_minute: per_minute(&now, &samples, |sample| sample.events.get(&name).map(|n| *n as f64)),
                reconnects: snapshot.reconnects,
                last_error: snapshot.last_error,
                name,
            }
        })
        .collect();
    for target in targets.values_mut() {
        let name = target.name.clone();
        target.delivered_per_minute = per_minute(&now, &samples, |sample| sample.delivered.get(&name).copied());
        target.failed_per_minute = per_minute(&now, &samples, |sample| sample.failed.get(&name).copied());
    }
    drop(samples);
    Ok(axum::Json(Status {
        replica: state.store.leases().map(|leases| leases.replica().to_string()),
        streams,
        targets: targets.into_values().collect(),
    }))
}

async fn metrics(State(state): State<Arc<AdminState>>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    if !authorized(&state, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/plain".to_owned())],
            b"/metrics needs Authorization: Bearer <admin.token>\n".to_vec(),
        );
    }
    let encoder = TextEncoder::new();
    let mut body = Vec::with_capacity(16 * 1024);
    match encoder.encode(&state.metrics.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        ),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_owned())],
            format!("cannot encode metrics: {err}\n").into_bytes(),
        ),
    }
}

/// The token of an `Authorization: Bearer <token>` value. RFC 7235 makes the scheme
/// case-insensitive and lets one or more spaces follow it, so `bearer <token>` is as good.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

/// Compares without stopping at the first difference, so response times do not reveal how much
/// of a guessed token was right.
fn same_secret(presented: &[u8], expected: &[u8]) -> bool {
    presented.len() == expected.len() && presented.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// The process is up and serving: a supervisor restarts it when this fails.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Every stream has an open connection and the store takes new deliveries.
async fn readyz(State(state): State<Arc<AdminState>>) -> (StatusCode, String) {
    let mut problems = String::new();
    if state.metrics.storage.is_failing() {
        problems.push_str("storage is failing: streams are paused until it recovers\n");
    }
    if state.store.is_full() {
        problems.push_str("storage is full (max_pending): streams are paused until deliveries drain\n");
    }
    let leases = state.store.leases();
    if leases.is_some_and(|leases| !leases.is_valid()) {
        problems.push_str(
            "this replica cannot renew its leases in PostgreSQL: it reads no stream and serves no target until it can\n",
        );
    }
    let streams = state.streams.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    if streams.is_none() {
        problems.push_str("the relay is starting: its streams are not started yet\n");
    }
    // With replicas, a stream counts on the replica that holds it.
    let held_here = |stream: &&Arc<StreamTelemetry>| {
        leases.is_none_or(|leases| leases.token(crate::queue::lease::Kind::Stream, &stream.name).is_some())
    };
    for stream in streams
        .iter()
        .flatten()
        .filter(held_here)
        .filter(|stream| !stream.is_connected())
    {
        problems.push_str(&format!("stream {} is not connected\n", stream.name));
    }
    drop(streams);
    if problems.is_empty() {
        let ready = match leases {
            Some(leases) => format!(
                "ready: replica {} reads {} streams and serves {} targets\n",
                leases.replica(),
                leases.n_held(crate::queue::lease::Kind::Stream),
                leases.n_held(crate::queue::lease::Kind::Target)
            ),
            None => "ready\n".to_owned(),
        };
        (StatusCode::OK, ready)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems)
    }
}

/// What a tap reader asked for: `?stream=PATTERN&type=PATTERN&target=NAME&data=true`.
#[derive(Default)]
struct TapFilter {
    stream: Option<wildmatch::WildMatch>,
    event_type: Option<wildmatch::WildMatch>,
    target: Option<String>,
    data: bool,
}

impl TapFilter {
    fn from_query(query: Option<&str>) -> TapFilter {
        let mut filter = TapFilter::default();
        for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match &*key {
                "stream" => filter.stream = Some(wildmatch::WildMatch::new(&value)),
                "type" => filter.event_type = Some(wildmatch::WildMatch::new(&value)),
                "target" => filter.target = Some(value.into_owned()),
                "data" => filter.data = value == "true" || value == "1",
                _ => {}
            }
        }
        filter
    }

    /// The item as one SSE message, if the reader wants it.
    fn message(&self, tapped: &crate::telemetry::Tapped) -> Option<String> {
        use crate::telemetry::Tapped;
        let (stream, event_type) = match tapped {
            Tapped::Event { stream, event_type, .. } | Tapped::Delivery { stream, event_type, .. } => {
                (stream, event_type)
            }
        };
        if self.stream.as_ref().is_some_and(|pattern| !pattern.matches(stream))
            || self
                .event_type
                .as_ref()
                .is_some_and(|pattern| !pattern.matches(event_type))
        {
            return None;
        }
        let json = match tapped {
            Tapped::Event {
                event_id,
                targets,
                data,
                ..
            } => {
                if self
                    .target
                    .as_ref()
                    .is_some_and(|target| !targets.iter().any(|queued| **queued == **target))
                {
                    return None;
                }
                let mut json = serde_json::json!({
                    "kind": "event", "stream": &**stream, "event_type": &**event_type,
                    "event_id": event_id.to_string(),
                    "targets": targets.iter().map(|target| &**target).collect::<Vec<_>>(),
                });
                if self.data {
                    json["data"] = serde_json::Value::String(String::from_utf8_lossy(data).into_owned());
                }
                json
            }
            Tapped::Delivery {
                target,
                event_id,
                outcome,
                status,
                duration,
                attempt,
                error,
                ..
            } => {
                if self.target.as_ref().is_some_and(|wanted| **wanted != **target) {
                    return None;
                }
                serde_json::json!({
                    "kind": "delivery", "target": &**target, "stream": &**stream,
                    "event_type": &**event_type, "event_id": event_id.to_string(), "outcome": outcome,
                    "status": status, "duration_ms": duration.as_secs_f64() * 1000.0,
                    "attempt": attempt, "error": error,
                })
            }
        };
        Some(format!("data: {json}\n\n"))
    }
}

/// How often a quiet tap sends a comment, so that a reader that left is noticed.
const TAP_KEEPALIVE: Duration = Duration::from_secs(15);

/// The tap as SSE messages: each wanted item, a `dropped` event when this reader fell behind
/// (counted), and a comment when quiet.
fn tap_messages(
    tap: Arc<crate::telemetry::Tap>,
    filter: TapFilter,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::convert::Infallible>> {
    let receiver = tap.subscribe();
    let first = bytes::Bytes::from_static(b": tapping\n\n");
    let filter = Arc::new(filter);
    futures_util::stream::unfold((receiver, Some(first)), move |(mut receiver, first)| {
        let (tap, filter) = (Arc::clone(&tap), Arc::clone(&filter));
        async move {
            if let Some(first) = first {
                return Some((Ok(first), (receiver, None)));
            }
            loop {
                let message = match tokio::time::timeout(TAP_KEEPALIVE, receiver.recv()).await {
                    Err(_) => ": keepalive\n\n".to_owned(),
                    Ok(Ok(tapped)) => match filter.message(&tapped) {
                        Some(message) => message,
                        None => continue,
                    },
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(n))) => {
                        tap.dropped.inc_by(n);
                        format!("event: dropped\ndata: {{\"n\":{n}}}\n\n")
                    }
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return None,
                };
                return Some((Ok(bytes::Bytes::from(message)), (receiver, None)));
            }
        }
    })
}

async fn tap(State(state): State<Arc<AdminState>>, headers: axum::http::HeaderMap, uri: axum::http::Uri) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized().into_response();
    }
    let filter = TapFilter::from_query(uri.query());
    let body = axum::body::Body::from_stream(tap_messages(Arc::clone(&state.metrics.tap), filter));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `sse-relay tap`: prints what the relay at `base` taps, one line per item, until the
/// relay or the reader stops. `query` is `/v1/tap`'s query string.
pub async fn print_tap(base: &str, token: Option<&str>, query: &str) -> anyhow::Result<()> {
    use futures_util::StreamExt as _;
    use std::io::Write as _;
    // No overall timeout: the tap lasts until stopped.
    let response = admin_get(base, &format!("/v1/tap?{query}"), token, None).await?;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "tapping {base} (Ctrl-C to stop)");
    let _ = out.flush();
    let mut body = response.bytes_stream();
    let mut pending = Vec::new();
    let mut dropped_next = false;
    while let Some(chunk) = body.next().await {
        pending.extend_from_slice(&chunk.map_err(|err| anyhow::Error::new(err.without_url()))?);
        while let Some(end) = pending.iter().position(|byte| *byte == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end();
            if line == "event: dropped" {
                dropped_next = true;
            } else if let Some(json) = line.strip_prefix("data: ") {
                let item: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
                let text = if std::mem::take(&mut dropped_next) {
                    format!("({} tapped items dropped: this reader fell behind)", item["n"])
                } else {
                    tap_line(&item)
                };
                let _ = writeln!(out, "{text}");
                let _ = out.flush();
            }
        }
    }
    Ok(())
}

/// One tapped item as a line of `sse-relay tap`.
fn tap_line(item: &serde_json::Value) -> String {
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let time = now.get(11..23).unwrap_or(&now);
    let text = |key: &str| item[key].as_str().unwrap_or("").to_owned();
    match item["kind"].as_str() {
        Some("event") => {
            let targets: Vec<&str> = item["targets"]
                .as_array()
                .map(|targets| targets.iter().filter_map(|target| target.as_str()).collect())
                .unwrap_or_default();
            let to = if targets.is_empty() {
                "(unrouted)".to_owned()
            } else {
                targets.join(", ")
            };
            let mut line = format!("{time} event {} {} -> {to}", text("stream"), text("event_type"));
            if let Some(data) = item["data"].as_str() {
                line.push_str("\n    ");
                line.push_str(data);
            }
            line
        }
        Some("delivery") => {
            let status = item["status"]
                .as_u64()
                .map_or(String::new(), |status| format!(" {status}"));
            let error = item["error"]
                .as_str()
                .map_or(String::new(), |error| format!(": {error}"));
            format!(
                "{time} delivery {} <- {} {}: {}{status} in {:.0} ms (attempt {}){error}",
                text("target"),
                text("stream"),
                text("event_type"),
                text("outcome"),
                item["duration_ms"].as_f64().unwrap_or(0.0),
                item["attempt"]
            )
        }
        _ => item.to_string(),
    }
}

/// `sse-relay status`: `/v1/status` of the relay whose admin server is at `base`.
pub async fn fetch_status(base: &str, token: Option<&str>) -> anyhow::Result<Status> {
    let response = admin_get(base, "/v1/status", token, Some(Duration::from_secs(5))).await?;
    Ok(serde_json::from_slice(&response.bytes().await?)?)
}

/// A GET of the admin API at `base`, with `token` as bearer; an error says what to do about a
/// 401, and names only the address.
async fn admin_get(
    base: &str,
    path: &str,
    token: Option<&str>,
    timeout: Option<Duration>,
) -> anyhow::Result<reqwest::Response> {
    let mut client = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
    if let Some(timeout) = timeout {
        client = client.timeout(timeout);
    }
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let mut request = client.build()?.get(&url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|err| anyhow::Error::new(err.without_url()).context(format!("cannot reach {base}")))?;
    let status = response.status();
    let endpoint = path.split('?').next().unwrap_or(path);
    if status == StatusCode::UNAUTHORIZED {
        anyhow::bail!("{base}{endpoint} answered 401: give admin.token with --token or SSE_RELAY_ADMIN_TOKEN");
    }
    anyhow::ensure!(status.is_success(), "{base}{endpoint} answered {status}");
    Ok(response)
}

/// The status as two aligned tables, streams and targets.
pub fn status_table(status: &Status) -> String {
    use std::fmt::Write as _;
    let rate = |value: Option<f64>| value.map_or("-".to_owned(), |value| format!("{value:.1}"));
    let age = |seconds: Option<f64>| {
        seconds.map_or("-".to_owned(), |seconds| {
            humantime::format_duration(Duration::from_secs(seconds as u64)).to_string() + " ago"
        })
    };
    let mut out = String::new();
    if let Some(replica) = &status.replica {
        let _ = writeln!(
            out,
            "replica {replica}
"
        );
    }
    let _ = writeln!(
        out,
        "{:<28} {:<12} {:<14} {:>14} {:>10} {:>10}  last error",
        "stream", "state", "owner", "last event", "events/min", "reconnects"
    );
    for stream in &status.streams {
        let state = if stream.connected { "connected" } else { "disconnected" };
        let _ = writeln!(
            out,
            "{:<28} {:<12} {:<14} {:>14} {:>10} {:>10}  {}",
            stream.name,
            state,
            stream.owner.as_deref().unwrap_or("-"),
            age(stream.last_event_age_seconds),
            rate(stream.events_per_minute),
            stream.reconnects,
            stream.last_error.as_deref().unwrap_or("")
        );
    }
    let _ = writeln!(
        out,
        "\n{:<20} {:<10} {:>8} {:>10} {:>9} {:>13} {:>10} {:>12}",
        "target", "state", "queue", "oldest", "in flight", "delivered/min", "failed/min", "dead letters"
    );
    for target in &status.targets {
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:>8} {:>10} {:>9} {:>13} {:>10} {:>12}",
            target.name,
            target.state,
            target.queue_depth,
            humantime::format_duration(Duration::from_secs(target.oldest_pending_seconds as u64)).to_string(),
            target.in_flight,
            rate(target.delivered_per_minute),
            rate(target.failed_per_minute),
            target.dead_letters_total
        );
    }
    out
}

/// `sse-relay health`: succeeds when the admin endpoint at `url` answers 2xx within 5 s. For
/// container health checks, where images have no curl.
pub async fn probe(url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()?;
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|err| anyhow::Error::new(err.without_url()).context(format!("cannot reach {url}")))?;
    let status = response.status();
    anyhow::ensure!(status.is_success(), "{url} answered {status}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let check = |value: &str, expected: Option<&str>| assert_eq!(bearer_token(value), expected, "{value:?}");
        check("Bearer t0k", Some("t0k"));
        check("bearer t0k", Some("t0k"));
        check("BEARER t0k", Some("t0k"));
        check("Bearer   t0k", Some("t0k"));
        check("Basic t0k", None);
        check("Bearert0k", None);
        check("t0k", None);
    }
}

#[cfg(test)]
mod tap_tests {
    use futures_util::StreamExt as _;

    use super::*;
    use crate::telemetry::Tapped;

    fn event(n: usize) -> Tapped {
        Tapped::Event {
            stream: Arc::from("chat/1"),
            event_type: Arc::from("node_update"),
            event_id: crate::event::EventId::new(),
            targets: vec![Arc::from(format!("t{n}").as_str())],
            data: bytes::Bytes::from_static(b"{}"),
        }
    }

    #[tokio::test]
    async fn a_tap_reader_that_falls_behind_loses_the_oldest_is_told_and_they_are_counted() {
        let metrics = Metrics::new();
        let tap = Arc::clone(&metrics.tap);
        let mut messages = Box::pin(tap_messages(Arc::clone(&tap), TapFilter::default()));
        assert_eq!(messages.next().await.unwrap().unwrap(), ": tapping\n\n");
        assert!(tap.is_watched());
        // The relay sends without waiting, however far behind the reader is.
        for n in 0..crate::telemetry::TAP_CAPACITY + 500 {
            tap.send(event(n));
        }
        let told = messages.next().await.unwrap().unwrap();
        assert_eq!(told, "event: dropped\ndata: {\"n\":500}\n\n");
        assert_eq!(tap.dropped.get(), 500);
        let next = String::from_utf8(messages.next().await.unwrap().unwrap().to_vec()).unwrap();
        assert!(next.contains("\"targets\":[\"t500\"]"), "{next}");
        drop(messages);
        assert!(!tap.is_watched(), "a reader that left costs nothing");
    }

    #[test]
    fn a_tap_filter_takes_streams_types_and_targets_and_shows_data_only_when_asked() {
        let filter = TapFilter::from_query(Some("stream=chat%2F*&type=node_*&target=t1"));
        assert!(filter.message(&event(1)).is_some());
        assert!(filter.message(&event(2)).is_none(), "another target");
        assert!(!filter.message(&event(1)).unwrap().contains("\"data\""));
        let with_data = TapFilter::from_query(Some("data=true"));
        assert!(with_data.message(&event(1)).unwrap().contains("\"data\":\"{}\""));
        assert!(
            TapFilter::from_query(Some("stream=participant*"))
                .message(&event(1))
                .is_none()
        );
    }
}
