//! A webhook sink for tests: an HTTP server that accepts any method on any path, records every
//! request, and answers each path from a script of responses (then `200` with an empty body).
//!
//! A request is recorded as soon as its body has arrived, before any scripted delay, so a test
//! can see a delivery attempt that is still waiting for its answer; its `status_sent` is filled
//! in when the answer goes out.
//!
//! Besides answering, a scripted response can misbehave the way real webhooks do: answer after
//! the client has given up (the work was done, the answer goes nowhere), or reset the
//! connection (TCP RST) instead of answering. Once its script is used up, a path can also fail
//! a fraction of its requests at random (a flaky webhook) or answer 404 for a while after its
//! first request (n8n starting up), before it falls back to its default answer.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::Response;
use axum::serve::{IncomingStream, Listener};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Well above any webhook body a test sends; a larger one is answered 400 and not recorded.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// What the sink answers to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkResponse {
    /// Unused (0) when `action` is [`SinkAction::Reset`].
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// How long the sink waits before answering, to make a client time out, say.
    pub delay: Duration,
    pub action: SinkAction,
    pub body: String,
    /// The body starts with the request's headers, a `name: value` line each, as some servers'
    /// error pages and debugging endpoints echo them.
    pub echo_request_headers: bool,
}

/// What the sink does once a response's delay is over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SinkAction {
    /// Answers. A client that leaves during the delay gets nothing, and the request stays
    /// unanswered (`status_sent` 0).
    #[default]
    Answer,
    /// Answers even when the client left during the delay, as a slow webhook that finishes its
    /// work anyway: the request is recorded as answered though nobody reads the answer.
    AnswerEvenIfClientLeft,
    /// Resets the connection (TCP RST) instead of answering; `status_sent` stays 0.
    Reset,
}

impl SinkResponse {
    pub fn status(status: u16) -> SinkResponse {
        SinkResponse {
            status,
            headers: Vec::new(),
            delay: Duration::ZERO,
            action: SinkAction::Answer,
            body: String::new(),
            echo_request_headers: false,
        }
    }

    /// Resets the connection instead of answering, as a crashing server or a middlebox does.
    pub fn reset() -> SinkResponse {
        SinkResponse {
            status: 0,
            action: SinkAction::Reset,
            ..SinkResponse::status(200)
        }
    }

    /// Records the answer as sent even if the client left during the delay: with
    /// [`SinkResponse::with_delay`] beyond the client's timeout, the sink has accepted a request
    /// that the client counts as failed.
    pub fn answered_even_if_client_left(mut self) -> SinkResponse {
        self.action = SinkAction::AnswerEvenIfClientLeft;
        self
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> SinkResponse {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn with_body(mut self, body: impl Into<String>) -> SinkResponse {
        self.body = body.into();
        self
    }

    /// Answers with the request's headers in the body, before any body set with
    /// [`SinkResponse::with_body`].
    pub fn echoing_request_headers(mut self) -> SinkResponse {
        self.echo_request_headers = true;
        self
    }

    pub fn with_delay(mut self, delay: Duration) -> SinkResponse {
        self.delay = delay;
        self
    }

    /// What n8n answers to a webhook it has not registered yet, as it does for a moment after it
    /// starts listening.
    pub fn n8n_not_registered() -> SinkResponse {
        SinkResponse::status(404).with_body(
            r#"{"code":404,"message":"The requested webhook \"POST sse-relay\" is not registered.","hint":"The workflow must be active for a production URL to run successfully."}"#,
        )
    }
}

#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    pub method: Method,
    /// The path without any query string.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub received_at: Instant,
    /// The status answered; 0 until the answer goes out, which is while a scripted delay runs,
    /// and for good if the server dropped the request because its client left during the delay,
    /// or if the sink reset the connection.
    pub status_sent: u16,
}

impl ReceivedRequest {
    /// The header's value, when present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    pub fn was_delivered(&self) -> bool {
        (200..300).contains(&self.status_sent)
    }
}

type RequestCallback = Arc<dyn Fn(&ReceivedRequest) + Send + Sync>;

/// A handle on a running sink; clones share it. The server runs until [`Sink::stop`] or until
/// the runtime shuts down, whichever comes first.
#[derive(Clone)]
pub struct Sink {
    shared: Arc<SinkShared>,
}

struct SinkShared {
    addr: SocketAddr,
    state: Mutex<SinkState>,
    /// Bumped whenever a request is recorded or answered, to wake the waiting functions.
    change_counter: watch::Sender<u64>,
    stop_sender: watch::Sender<bool>,
}

#[derive(Default)]
struct SinkState {
    /// Every path's requests together, in arrival order.
    requests: Vec<ReceivedRequest>,
    scripts: HashMap<String, VecDeque<SinkResponse>>,
    /// The answer once a path's script is used up; 200 when unset.
    defaults: HashMap<String, u16>,
    /// Per path: a header (name, value) that requests must carry, or be answered 401.
    required_headers: HashMap<String, (String, String)>,
    callbacks: Vec<RequestCallback>,
    /// Per path: requests received and requests answered 2xx, so that waiting for a count
    /// does not copy every request each time one arrives.
    counts: HashMap<String, (usize, usize)>,
    /// Per path: how long after its first request it answers as n8n does while starting, and
    /// when that first request came.
    starting: HashMap<String, (Duration, Option<Instant>)>,
    /// Per path: the fraction of requests failed at random, and with which status.
    random_failures: HashMap<String, (f64, u16)>,
    /// The state of a SplitMix64 generator for `random_failures`: fixed, so that a run's
    /// sequence of draws is the same every time (which request draws which still varies).
    random_state: u64,
}

impl Sink {
    pub async fn start() -> std::io::Result<Sink> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let shared = Arc::new(SinkShared {
            addr: listener.local_addr()?,
            state: Mutex::new(SinkState::default()),
            change_counter: watch::Sender::new(0),
            stop_sender: watch::Sender::new(false),
        });
        let router = Router::new()
            .fallback(record_and_answer)
            .with_state(shared.clone())
            .into_make_service_with_connect_info::<ResetSwitch>();
        let mut stop_receiver = shared.stop_sender.subscribe();
        let stopped = async move {
            let _ = stop_receiver.wait_for(|stopped| *stopped).await;
        };
        tokio::spawn(async move {
            let _ = axum::serve(ResettableListener(listener), router)
                .with_graceful_shutdown(stopped)
                .await;
        });
        Ok(Sink { shared })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.shared.addr)
    }

    /// Queues responses for the next requests to `path`, after any already queued.
    ///
    /// # Panics
    /// If a status or header is not valid HTTP, so that the mistake shows in the test that made it.
    pub fn script(&self, path: &str, responses: Vec<SinkResponse>) {
        for response in &responses {
            assert!(
                response.action == SinkAction::Reset || StatusCode::from_u16(response.status).is_ok(),
                "status {} is not valid HTTP",
                response.status
            );
            for (name, value) in &response.headers {
                assert!(
                    HeaderName::try_from(name.as_str()).is_ok(),
                    "header name {name:?} is not valid HTTP"
                );
                assert!(
                    HeaderValue::try_from(value.as_str()).is_ok(),
                    "header value {value:?} is not valid HTTP"
                );
            }
        }
        self.shared
            .lock()
            .scripts
            .entry(path.to_string())
            .or_default()
            .extend(responses);
    }

    /// Every request to `path`, in arrival order, whatever it was answered.
    /// Answers `status` to requests for `path` once its script is used up (a target that is
    /// down, say), until set again.
    pub fn answer_by_default(&self, path: &str, status: u16) {
        self.shared.lock().defaults.insert(path.to_string(), status);
    }

    /// Answers 401 to requests for `path` that do not carry header `name` with exactly `value`,
    /// as a webhook that checks a token does, before any script; until set again.
    pub fn require_header(&self, path: &str, name: &str, value: &str) {
        self.shared
            .lock()
            .required_headers
            .insert(path.to_string(), (name.to_owned(), value.to_owned()));
    }

    /// Answers `status` to `fraction` (0 to 1) of the requests to `path` at random, once its
    /// script is used up, as a webhook behind a load balancer with a bad backend does; the others
    /// get the default answer. A fraction of 0 turns it off.
    ///
    /// # Panics
    /// If the fraction is not between 0 and 1 or the status is not valid HTTP.
    pub fn fail_at_random(&self, path: &str, fraction: f64, status: u16) {
        assert!(
            (0.0..=1.0).contains(&fraction),
            "fraction {fraction} is not between 0 and 1"
        );
        assert!(
            StatusCode::from_u16(status).is_ok(),
            "status {status} is not valid HTTP"
        );
        self.shared
            .lock()
            .random_failures
            .insert(path.to_string(), (fraction, status));
    }

    /// Answers [`SinkResponse::n8n_not_registered`] (404) to the requests to `path` that arrive
    /// within `duration` of its first request, once its script is used up: n8n listens for a
    /// moment before it has registered its webhooks again after a restart.
    pub fn start_like_n8n(&self, path: &str, duration: Duration) {
        self.shared.lock().starting.insert(path.to_string(), (duration, None));
    }

    pub fn requests(&self, path: &str) -> Vec<ReceivedRequest> {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|request| request.path == path)
            .cloned()
            .collect()
    }

    /// The requests to `path` that were answered 2xx.
    pub fn delivered(&self, path: &str) -> Vec<ReceivedRequest> {
        let state = self.shared.lock();
        state
            .requests
            .iter()
            .filter(|request| request.path == path && request.was_delivered())
            .cloned()
            .collect()
    }

    /// Waits until at least `count` requests to `path` were answered 2xx and returns them, or
    /// returns those there are once `deadline` has passed.
    pub async fn wait_for_delivered(&self, path: &str, count: usize, deadline: Duration) -> Vec<ReceivedRequest> {
        self.wait_until(deadline, || self.counts(path).1 >= count).await;
        self.delivered(path)
    }

    /// Like [`Sink::wait_for_delivered`], counting every request to `path`, answered or not.
    pub async fn wait_for_requests(&self, path: &str, count: usize, deadline: Duration) -> Vec<ReceivedRequest> {
        self.wait_until(deadline, || self.counts(path).0 >= count).await;
        self.requests(path)
    }

    /// Requests received and requests answered 2xx for `path`.
    fn counts(&self, path: &str) -> (usize, usize) {
        self.shared.lock().counts.get(path).copied().unwrap_or_default()
    }

    /// Calls `callback` with each request once it has been answered.
    pub fn on_request(&self, callback: impl Fn(&ReceivedRequest) + Send + Sync + 'static) {
        self.shared.lock().callbacks.push(Arc::new(callback));
    }

    /// Stops accepting connections; requests in progress are still answered.
    pub fn stop(&self) {
        self.shared.stop_sender.send_replace(true);
    }

    async fn wait_until(&self, deadline: Duration, mut condition: impl FnMut() -> bool) {
        let give_up_at = tokio::time::Instant::now() + deadline;
        // Subscribing before checking means a change between the check and the wait still wakes us.
        let mut change_receiver = self.shared.change_counter.subscribe();
        while !condition() {
            if !matches!(
                tokio::time::timeout_at(give_up_at, change_receiver.changed()).await,
                Ok(Ok(()))
            ) {
                return;
            }
        }
    }
}

impl SinkState {
    /// The answer once the path's script is used up: n8n starting, a random failure, or the
    /// default, in that order.
    fn unscripted_response(&mut self, path: &str, received_at: Instant) -> SinkResponse {
        if let Some((duration, first_at)) = self.starting.get_mut(path) {
            let first_at = *first_at.get_or_insert(received_at);
            if received_at.duration_since(first_at) < *duration {
                return SinkResponse::n8n_not_registered();
            }
        }
        if let Some(&(fraction, status)) = self.random_failures.get(path)
            && self.next_random_fraction() < fraction
        {
            return SinkResponse::status(status);
        }
        SinkResponse::status(self.defaults.get(path).copied().unwrap_or(200))
    }

    /// A number in [0, 1) from SplitMix64.
    fn next_random_fraction(&mut self) -> f64 {
        self.random_state = self.random_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.random_state;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^= mixed >> 31;
        // The top 53 bits, as many as an f64 holds exactly.
        (mixed >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl SinkShared {
    fn lock(&self) -> MutexGuard<'_, SinkState> {
        // A test that panicked while holding the lock has already failed; carry on for the rest.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

async fn record_and_answer(
    State(shared): State<Arc<SinkShared>>,
    ConnectInfo(reset_switch): ConnectInfo<ResetSwitch>,
    request: Request,
) -> Response {
    let received_at = Instant::now();
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return response_with_status(StatusCode::BAD_REQUEST);
    };
    let path = parts.uri.path().to_string();
    // One lock for taking the scripted response and recording the request, so that the script
    // is used in arrival order even when requests arrive concurrently.
    let (response, index) = {
        let mut state = shared.lock();
        let refused = state.required_headers.get(&path).is_some_and(|(name, value)| {
            parts.headers.get(name.as_str()).and_then(|given| given.to_str().ok()) != Some(value.as_str())
        });
        let scripted = if refused {
            None
        } else {
            state.scripts.get_mut(&path).and_then(VecDeque::pop_front)
        };
        let response = match (refused, scripted) {
            (true, _) => SinkResponse::status(401),
            (false, Some(scripted)) => scripted,
            (false, None) => state.unscripted_response(&path, received_at),
        };
        let request = ReceivedRequest {
            method: parts.method,
            path,
            headers: parts.headers,
            body,
            received_at,
            status_sent: 0,
        };
        state.counts.entry(request.path.clone()).or_default().0 += 1;
        state.requests.push(request);
        (response, state.requests.len() - 1)
    };
    shared.change_counter.send_modify(|counter| *counter += 1);
    match response.action {
        SinkAction::Answer => answer_after_delay(shared, index, response).await,
        // The server drops this handler when the client leaves; a task of its own lives on.
        SinkAction::AnswerEvenIfClientLeft => tokio::spawn(answer_after_delay(shared, index, response))
            .await
            .unwrap_or_else(|_| response_with_status(StatusCode::INTERNAL_SERVER_ERROR)),
        SinkAction::Reset => {
            if !response.delay.is_zero() {
                tokio::time::sleep(response.delay).await;
            }
            // The connection fails as the server writes this response, before any byte of it.
            reset_switch.0.store(true, Ordering::Release);
            response_with_status(StatusCode::INTERNAL_SERVER_ERROR)
        }
    }
}

/// Waits for the response's delay, records the answer, and builds it.
async fn answer_after_delay(shared: Arc<SinkShared>, index: usize, response: SinkResponse) -> Response {
    if !response.delay.is_zero() {
        tokio::time::sleep(response.delay).await;
    }
    let (answered, callbacks, body) = {
        let mut state = shared.lock();
        state.requests[index].status_sent = response.status;
        let mut body = String::new();
        if response.echo_request_headers {
            for (name, value) in &state.requests[index].headers {
                body.push_str(&format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes())));
            }
        }
        body.push_str(&response.body);
        if (200..300).contains(&response.status) {
            let path = state.requests[index].path.clone();
            state.counts.entry(path).or_default().1 += 1;
        }
        let answered = (!state.callbacks.is_empty()).then(|| state.requests[index].clone());
        (answered, state.callbacks.clone(), body)
    };
    shared.change_counter.send_modify(|counter| *counter += 1);
    if let Some(answered) = answered {
        for callback in callbacks {
            callback(&answered);
        }
    }
    let mut http_response = response_with_status(StatusCode::from_u16(response.status).expect("checked by script"));
    *http_response.body_mut() = Body::from(body);
    for (name, value) in response.headers {
        let name = HeaderName::try_from(name).expect("checked by script");
        let value = HeaderValue::try_from(value).expect("checked by script");
        http_response.headers_mut().append(name, value);
    }
    http_response
}

fn response_with_status(status: StatusCode) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status;
    response
}

/// The sink's listener: every connection comes with a switch that resets it.
struct ResettableListener(TcpListener);

impl Listener for ResettableListener {
    type Io = ResettableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (ResettableStream, SocketAddr) {
        let (stream, remote_addr) = Listener::accept(&mut self.0).await;
        let stream = ResettableStream {
            stream,
            reset_requested: Arc::new(AtomicBool::new(false)),
        };
        (stream, remote_addr)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// Handed to every request of a connection, so that its handler can have the connection reset.
#[derive(Clone)]
struct ResetSwitch(Arc<AtomicBool>);

impl Connected<IncomingStream<'_, ResettableListener>> for ResetSwitch {
    fn connect_info(stream: IncomingStream<'_, ResettableListener>) -> ResetSwitch {
        ResetSwitch(Arc::clone(&stream.io().reset_requested))
    }
}

/// A TCP stream that, once a reset is requested, fails its next read or write; the server then
/// drops it, and with a zero linger time the kernel sends RST instead of FIN.
struct ResettableStream {
    stream: TcpStream,
    reset_requested: Arc<AtomicBool>,
}

impl ResettableStream {
    fn check_reset(&self) -> std::io::Result<()> {
        if !self.reset_requested.load(Ordering::Acquire) {
            return Ok(());
        }
        self.stream.set_zero_linger()?;
        Err(std::io::ErrorKind::ConnectionReset.into())
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check_reset()?;
        Pin::new(&mut self.stream).poll_read(context, buffer)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(mut self: Pin<&mut Self>, context: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        self.check_reset()?;
        Pin::new(&mut self.stream).poll_write(context, bytes)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.check_reset()?;
        Pin::new(&mut self.stream).poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check_reset()?;
        Pin::new(&mut self.stream).poll_flush(context)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check_reset()?;
        Pin::new(&mut self.stream).poll_shutdown(context)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::{Sink, SinkResponse};

    const TEST_DEADLINE: Duration = Duration::from_secs(10);

    fn test_client() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().expect("client builds")
    }

    #[tokio::test]
    async fn answers_the_script_in_order_then_200_and_records_every_request() {
        let sink = Sink::start().await.unwrap();
        sink.script("/hook", vec![SinkResponse::status(500), SinkResponse::status(503)]);
        let statuses_seen_by_callback = Arc::new(Mutex::new(Vec::new()));
        let callback_statuses = statuses_seen_by_callback.clone();
        sink.on_request(move |request| callback_statuses.lock().unwrap().push(request.status_sent));
        let client = test_client();
        for (attempt, expected_status) in [500, 503, 200].into_iter().enumerate() {
            let response = client
                .post(sink.url("/hook"))
                .body(format!("attempt {attempt}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), expected_status);
        }
        assert_eq!(
            client.get(sink.url("/other?query=1")).send().await.unwrap().status(),
            200
        );

        let requests = sink.requests("/hook");
        let statuses: Vec<u16> = requests.iter().map(|request| request.status_sent).collect();
        assert_eq!(statuses, [500, 503, 200]);
        assert_eq!(requests[1].body, "attempt 1");
        assert_eq!(requests[1].method, http::Method::POST);
        assert!(requests[0].received_at <= requests[1].received_at);
        let delivered = sink.delivered("/hook");
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].body, "attempt 2");
        assert_eq!(sink.requests("/other").len(), 1);
        assert_eq!(*statuses_seen_by_callback.lock().unwrap(), [500, 503, 200, 200]);
    }

    #[tokio::test]
    async fn sends_scripted_headers_such_as_retry_after() {
        let sink = Sink::start().await.unwrap();
        sink.script("/hook", vec![SinkResponse::status(429).with_header("Retry-After", "7")]);
        let response = test_client().post(sink.url("/hook")).send().await.unwrap();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "7");
    }

    #[tokio::test]
    async fn echoes_the_request_headers_before_the_scripted_body() {
        let sink = Sink::start().await.unwrap();
        sink.script(
            "/hook",
            vec![
                SinkResponse::status(400)
                    .echoing_request_headers()
                    .with_body("bad request\n"),
            ],
        );
        let response = test_client()
            .post(sink.url("/hook"))
            .header("x-api-key", "k3y")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let body = response.text().await.unwrap();
        assert!(body.contains("x-api-key: k3y\n"), "{body}");
        assert!(body.ends_with("\nbad request\n"), "{body}");
    }

    #[tokio::test]
    async fn records_a_delayed_request_on_arrival_and_counts_it_delivered_once_answered() {
        let sink = Sink::start().await.unwrap();
        sink.script(
            "/slow",
            vec![SinkResponse::status(204).with_delay(Duration::from_secs(1))],
        );
        let url = sink.url("/slow");
        let client_task = tokio::spawn(async move { test_client().post(url).send().await.unwrap().status() });
        let arrived = sink.wait_for_requests("/slow", 1, TEST_DEADLINE).await;
        assert_eq!(arrived.len(), 1);
        assert_eq!(arrived[0].status_sent, 0, "the scripted delay is still running");
        assert!(sink.delivered("/slow").is_empty());
        let delivered = sink.wait_for_delivered("/slow", 1, TEST_DEADLINE).await;
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].status_sent, 204);
        assert_eq!(client_task.await.unwrap(), 204);
    }

    #[tokio::test]
    async fn a_reset_response_resets_the_connection_and_later_requests_are_answered() {
        let sink = Sink::start().await.unwrap();
        sink.script("/hook", vec![SinkResponse::reset()]);
        let client = test_client();
        let err = client.post(sink.url("/hook")).body("first").send().await.unwrap_err();
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        let mut io_error_kinds = Vec::new();
        while let Some(cause) = source {
            if let Some(io_error) = cause.downcast_ref::<std::io::Error>() {
                io_error_kinds.push(io_error.kind());
            }
            source = cause.source();
        }
        assert_eq!(io_error_kinds, [std::io::ErrorKind::ConnectionReset], "{err:?}");
        let response = client.post(sink.url("/hook")).body("second").send().await.unwrap();
        assert_eq!(response.status(), 200);
        let statuses: Vec<u16> = sink.requests("/hook").iter().map(|r| r.status_sent).collect();
        assert_eq!(statuses, [0, 200], "a reset request is recorded but never answered");
    }

    #[tokio::test]
    async fn an_answer_even_if_the_client_left_is_recorded_after_it_gave_up() {
        let sink = Sink::start().await.unwrap();
        let late = SinkResponse::status(200)
            .with_delay(Duration::from_millis(300))
            .answered_even_if_client_left();
        sink.script("/late", vec![late]);
        let impatient_client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_millis(50))
            .build()
            .unwrap();
        let err = impatient_client.post(sink.url("/late")).send().await.unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
        assert!(sink.delivered("/late").is_empty(), "the answer is not out yet");
        let delivered = sink.wait_for_delivered("/late", 1, TEST_DEADLINE).await;
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].status_sent, 200);
    }

    #[tokio::test]
    async fn fails_the_given_fraction_at_random_after_the_script() {
        let sink = Sink::start().await.unwrap();
        sink.script("/flaky", vec![SinkResponse::status(201)]);
        sink.fail_at_random("/flaky", 0.3, 503);
        let client = test_client();
        for _ in 0..1_001 {
            client.post(sink.url("/flaky")).send().await.unwrap();
        }
        let statuses: Vec<u16> = sink.requests("/flaky").iter().map(|r| r.status_sent).collect();
        assert_eq!(statuses[0], 201, "the script goes first");
        let n_failed = statuses.iter().filter(|&&status| status == 503).count();
        let n_delivered = statuses.iter().filter(|&&status| status == 200).count();
        assert_eq!(n_failed + n_delivered, 1_000);
        // The draws are the same every run: this is not a matter of luck.
        assert!((250..=350).contains(&n_failed), "{n_failed} of 1000 failed");

        sink.fail_at_random("/flaky", 0.0, 503);
        assert_eq!(client.post(sink.url("/flaky")).send().await.unwrap().status(), 200);
    }

    #[tokio::test]
    async fn answers_404_like_n8n_for_a_while_after_the_first_request() {
        let sink = Sink::start().await.unwrap();
        let starting_for = Duration::from_millis(300);
        sink.start_like_n8n("/n8n", starting_for);
        let client = test_client();
        let first = client.post(sink.url("/n8n")).send().await.unwrap();
        assert_eq!(first.status(), 404);
        assert!(first.text().await.unwrap().contains("is not registered"));
        let give_up_at = std::time::Instant::now() + TEST_DEADLINE;
        while client.post(sink.url("/n8n")).send().await.unwrap().status() == 404 {
            assert!(std::time::Instant::now() < give_up_at, "still starting");
        }
        let requests = sink.requests("/n8n");
        let (last, not_registered) = requests.split_last().unwrap();
        let first_at = requests[0].received_at;
        assert_eq!(last.status_sent, 200);
        assert!(last.received_at - first_at >= starting_for);
        assert!(
            not_registered
                .iter()
                .all(|r| r.status_sent == 404 && r.received_at - first_at < starting_for)
        );
    }

    #[tokio::test]
    async fn wait_for_delivered_returns_what_there_is_at_the_deadline() {
        let sink = Sink::start().await.unwrap();
        let url = sink.url("/hook");
        let client_task = tokio::spawn(async move {
            for n in 0..3 {
                test_client().post(&url).body(n.to_string()).send().await.unwrap();
            }
        });
        let delivered = sink.wait_for_delivered("/hook", 3, TEST_DEADLINE).await;
        let bodies: Vec<&[u8]> = delivered.iter().map(|request| &request.body[..]).collect();
        assert_eq!(bodies, [b"0", b"1", b"2"]);
        client_task.await.unwrap();

        let deadline = Duration::from_millis(100);
        let started = std::time::Instant::now();
        assert_eq!(sink.wait_for_delivered("/hook", 4, deadline).await.len(), 3);
        assert!(started.elapsed() >= deadline);
    }
}
