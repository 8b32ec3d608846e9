//! An emulator of the two upstream SSE APIs, for tests: the participant stream
//! (`GET /participants/{user_id}/stream`) and the chat listener
//! (`GET /api/v1/chat-internal-messages/{chat_id}/listen`).
//!
//! HTTP/1.1 is written by hand over a `TcpListener` so that tests control every byte: a stream
//! is a `200` head followed by raw SSE bytes, its body delimited by the connection close.
//!
//! Like the real APIs (Redis PubSub behind them), a frame published while no client of that API
//! is connected is lost. With `hold_while_disconnected` the emulator instead keeps such frames,
//! and the frames a closing connection had not yet written, and writes them first to the next
//! connection, so that tests can check that nothing is lost or reordered across reconnects.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

/// Large enough that a test never fills it; a full channel drops the frame for that client.
const FRAME_CHANNEL_CAPACITY: usize = 100_000;
const MAX_REQUEST_HEAD_BYTES: usize = 64 * 1024;
const PARTICIPANT_KEEPALIVE_FRAME: &[u8] = b"data: {\"eventType\":\"KEEP_ALIVE\"}\n\n";
const CHAT_KEEPALIVE_FRAME: &[u8] = b"data: keepalive\n\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Participant,
    Chat,
}

#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// When set, both APIs answer 401 unless the request has `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// When set, the participant API also answers 401 unless the request has `X-API-Key: <key>`.
    pub api_key: Option<String>,
    pub participant_keepalive: Duration,
    pub chat_keepalive: Duration,
    /// The chat API closes every connection cleanly once it is this old.
    pub chat_max_connection_age: Duration,
    pub participant_max_connection_age: Option<Duration>,
    pub hold_while_disconnected: bool,
    /// Like APIs that allow one stream per user: a second concurrent stream of an API is
    /// answered `409 Conflict`.
    pub one_connection_at_a_time: bool,
    /// Every stream's body is gzip-encoded, with `Content-Encoding: gzip`, whatever the
    /// request's `Accept-Encoding` says, as some servers and proxies do.
    pub gzip: bool,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            bearer_token: None,
            api_key: None,
            participant_keepalive: Duration::from_secs(15),
            chat_keepalive: Duration::from_secs(3),
            chat_max_connection_age: Duration::from_secs(30 * 60),
            participant_max_connection_age: None,
            hold_while_disconnected: false,
            one_connection_at_a_time: false,
            gzip: false,
        }
    }
}

/// The head of one request the emulator received, whatever it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    /// The request target as sent, including any query string.
    pub path: String,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
}

impl RecordedRequest {
    /// The value of the first header with this name (compared without regard to case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(header_name, _)| *header_name == name)
            .map(|(_, value)| value.as_str())
    }
}

/// A handle on a running emulator; clones share it. The server runs until [`Upstream::stop`] or
/// until the runtime shuts down, whichever comes first.
#[derive(Clone)]
pub struct Upstream {
    shared: Arc<UpstreamShared>,
}

struct UpstreamShared {
    addr: SocketAddr,
    participant: ApiShared,
    chat: ApiShared,
    gzip: bool,
    stop_sender: watch::Sender<bool>,
}

/// One API's settings, taken from the options at start, and its state.
struct ApiShared {
    /// Header names (lower case) and the exact values a stream request must carry.
    required_headers: Vec<(&'static str, String)>,
    keepalive_period: Duration,
    keepalive_frame: &'static [u8],
    max_connection_age: Option<Duration>,
    hold_while_disconnected: bool,
    /// Changes while the emulator runs: a server may start or stop allowing a second stream.
    one_connection_at_a_time: AtomicBool,
    /// One lock over subscribers and held frames: publishing, subscribing and unsubscribing
    /// each happen entirely under it, which is what keeps frames in order across connections.
    state: Mutex<ApiState>,
    counts_sender: watch::Sender<ConnectionCounts>,
}

#[derive(Default)]
struct ApiState {
    subscribers: Vec<Subscriber>,
    held_frames: VecDeque<Bytes>,
    scripted_failures: VecDeque<ScriptedFailure>,
    requests_seen: Vec<RecordedRequest>,
    next_connection_id: u64,
    /// Indexed by connection id.
    connection_spans: Vec<ConnectionSpan>,
}

/// When a stream connection was accepted (its request read, its 200 about to be written) and
/// when it was closed; for measuring reconnect gaps.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionSpan {
    pub accepted_at: std::time::Instant,
    pub closed_at: Option<std::time::Instant>,
}

struct Subscriber {
    connection_id: u64,
    frame_sender: mpsc::Sender<Bytes>,
    close_signal: Arc<Notify>,
}

#[derive(Debug, Clone, Copy, Default)]
struct ConnectionCounts {
    connected: usize,
    accepted: u64,
}

#[derive(Debug, Clone)]
struct ScriptedFailure {
    status: u16,
    retry_after: Option<Duration>,
    /// For a redirect: the `Location` header, as given.
    location: Option<String>,
}

impl ScriptedFailure {
    fn status(status: u16) -> ScriptedFailure {
        ScriptedFailure {
            status,
            retry_after: None,
            location: None,
        }
    }
}

impl Upstream {
    pub async fn start(options: UpstreamOptions) -> std::io::Result<Upstream> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let bearer_header = options
            .bearer_token
            .map(|token| ("authorization", format!("Bearer {token}")));
        let api_key_header = options.api_key.map(|key| ("x-api-key", key));
        let participant = ApiShared::new(
            bearer_header.iter().chain(&api_key_header).cloned().collect(),
            options.participant_keepalive,
            PARTICIPANT_KEEPALIVE_FRAME,
            options.participant_max_connection_age,
            options.hold_while_disconnected,
            options.one_connection_at_a_time,
        );
        let chat = ApiShared::new(
            bearer_header.into_iter().collect(),
            options.chat_keepalive,
            CHAT_KEEPALIVE_FRAME,
            Some(options.chat_max_connection_age),
            options.hold_while_disconnected,
            options.one_connection_at_a_time,
        );
        let shared = Arc::new(UpstreamShared {
            addr: listener.local_addr()?,
            participant,
            chat,
            gzip: options.gzip,
            stop_sender: watch::Sender::new(false),
        });
        tokio::spawn(accept_connections(shared.clone(), listener));
        Ok(Upstream { shared })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    pub fn participant_url(&self, user_id: &str) -> String {
        format!("http://{}/participants/{user_id}/stream", self.shared.addr)
    }

    pub fn chat_url(&self, chat_id: &str) -> String {
        format!(
            "http://{}/api/v1/chat-internal-messages/{chat_id}/listen",
            self.shared.addr
        )
    }

    /// Sends raw SSE bytes (one or more whole frames) to every connected client of `api` and
    /// returns how many clients got them.
    pub fn publish(&self, api: Api, frame: impl Into<Bytes>) -> usize {
        let api_shared = self.shared.api(api);
        let frame = frame.into();
        let mut state = api_shared.lock();
        if state.subscribers.is_empty() && api_shared.hold_while_disconnected {
            state.held_frames.push_back(frame);
            return 0;
        }
        let subscribers = state.subscribers.iter();
        subscribers
            .filter(|subscriber| subscriber.frame_sender.try_send(frame.clone()).is_ok())
            .count()
    }

    /// Publishes `data: {line}\n` for each line of `data`, then the blank line ending the event.
    pub fn publish_event(&self, api: Api, data: &str) -> usize {
        let mut frame = String::with_capacity(data.len() + 16);
        for line in data.split('\n') {
            frame.push_str("data: ");
            frame.push_str(line);
            frame.push('\n');
        }
        frame.push('\n');
        self.publish(api, frame)
    }

    /// How many `200` streams of `api` were ever opened.
    /// Every stream connection of that API so far, in order.
    pub fn connection_spans(&self, api: Api) -> Vec<ConnectionSpan> {
        self.shared.api(api).lock().connection_spans.clone()
    }

    pub fn connections_accepted(&self, api: Api) -> u64 {
        self.shared.api(api).counts_sender.borrow().accepted
    }

    pub fn connected_clients(&self, api: Api) -> usize {
        self.shared.api(api).counts_sender.borrow().connected
    }

    /// Waits until exactly `n` streams of `api` are open (so `n = 0` waits for a close);
    /// false if that did not happen within `deadline`.
    pub async fn wait_for_clients(&self, api: Api, n: usize, deadline: Duration) -> bool {
        let mut counts_receiver = self.shared.api(api).counts_sender.subscribe();
        let condition = counts_receiver.wait_for(|counts| counts.connected == n);
        matches!(tokio::time::timeout(deadline, condition).await, Ok(Ok(_)))
    }

    /// Waits until at least `n` streams of `api` were ever opened, which is how a test sees a
    /// reconnect; false if that did not happen within `deadline`.
    pub async fn wait_for_connections_accepted(&self, api: Api, n: u64, deadline: Duration) -> bool {
        let mut counts_receiver = self.shared.api(api).counts_sender.subscribe();
        let condition = counts_receiver.wait_for(|counts| counts.accepted >= n);
        matches!(tokio::time::timeout(deadline, condition).await, Ok(Ok(_)))
    }

    /// Every request head routed to `api`, in arrival order, including rejected ones.
    pub fn requests_seen(&self, api: Api) -> Vec<RecordedRequest> {
        self.shared.api(api).lock().requests_seen.clone()
    }

    /// The next `count` requests to `api` are answered `status`, before any auth check.
    pub fn fail_next(&self, api: Api, status: u16, count: usize) {
        self.script_failures(api, status, count, None);
    }

    /// Like [`Upstream::fail_next`], with a `Retry-After` header in whole seconds.
    pub fn fail_next_with_retry_after(&self, api: Api, status: u16, count: usize, retry_after: Duration) {
        self.script_failures(api, status, count, Some(retry_after));
    }

    /// The next `count` requests to `api` are answered `status` (a 3xx) with `Location:
    /// location`, before any auth check.
    pub fn redirect_next(&self, api: Api, status: u16, location: &str, count: usize) {
        assert!((300..=399).contains(&status), "status {status} is not a redirect");
        let redirect = ScriptedFailure {
            location: Some(location.to_owned()),
            ..ScriptedFailure::status(status)
        };
        self.shared
            .api(api)
            .lock()
            .scripted_failures
            .extend(std::iter::repeat_n(redirect, count));
    }

    fn script_failures(&self, api: Api, status: u16, count: usize, retry_after: Option<Duration>) {
        assert!(
            (100..=999).contains(&status),
            "status {status} is not a valid HTTP status"
        );
        let failure = ScriptedFailure {
            retry_after,
            ..ScriptedFailure::status(status)
        };
        self.shared
            .api(api)
            .lock()
            .scripted_failures
            .extend(std::iter::repeat_n(failure, count));
    }

    /// Closes every open stream of `api` cleanly, as the server does at the maximum age.
    pub fn close_all(&self, api: Api) {
        for subscriber in &self.shared.api(api).lock().subscribers {
            subscriber.close_signal.notify_one();
        }
    }

    /// Stops accepting connections and closes every open one.
    /// From now on, `api` answers a second concurrent stream `409 Conflict` (or stops doing so).
    pub fn set_one_connection_at_a_time(&self, api: Api, one: bool) {
        self.shared
            .api(api)
            .one_connection_at_a_time
            .store(one, Ordering::Relaxed);
    }

    pub fn stop(&self) {
        self.shared.stop_sender.send_replace(true);
    }
}

impl UpstreamShared {
    fn api(&self, api: Api) -> &ApiShared {
        match api {
            Api::Participant => &self.participant,
            Api::Chat => &self.chat,
        }
    }
}

impl ApiShared {
    fn new(
        required_headers: Vec<(&'static str, String)>,
        keepalive_period: Duration,
        keepalive_frame: &'static [u8],
        max_connection_age: Option<Duration>,
        hold_while_disconnected: bool,
        one_connection_at_a_time: bool,
    ) -> ApiShared {
        ApiShared {
            required_headers,
            keepalive_period,
            keepalive_frame,
            max_connection_age,
            hold_while_disconnected,
            one_connection_at_a_time: AtomicBool::new(one_connection_at_a_time),
            state: Mutex::new(ApiState::default()),
            counts_sender: watch::Sender::new(ConnectionCounts::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ApiState> {
        // A test that panicked while holding the lock has already failed; carry on for the rest.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new connection. Held frames go into its channel before publishers can see
    /// it, so they are written first; the capacity grows with them so that none is dropped.
    fn subscribe(&self, close_signal: Arc<Notify>) -> (u64, mpsc::Receiver<Bytes>) {
        let mut state = self.lock();
        let (frame_sender, frame_receiver) = mpsc::channel(FRAME_CHANNEL_CAPACITY + state.held_frames.len());
        for frame in state.held_frames.drain(..) {
            let _ = frame_sender.try_send(frame);
        }
        let connection_id = state.next_connection_id;
        state.next_connection_id += 1;
        state.connection_spans.push(ConnectionSpan {
            accepted_at: std::time::Instant::now(),
            closed_at: None,
        });
        state.subscribers.push(Subscriber {
            connection_id,
            frame_sender,
            close_signal,
        });
        self.publish_counts(&state, 1);
        (connection_id, frame_receiver)
    }

    /// Removes a closed connection. Publishers send only under the lock, so everything ever
    /// published to it is in its channel now. If another connection is open it has had every
    /// frame too; otherwise, when holding, the unwritten frames go back in front, in order.
    fn unsubscribe(&self, connection_id: u64, mut frame_receiver: mpsc::Receiver<Bytes>, unwritten: Option<Bytes>) {
        let mut state = self.lock();
        if let Some(span) = usize::try_from(connection_id)
            .ok()
            .and_then(|index| state.connection_spans.get_mut(index))
        {
            span.closed_at = Some(std::time::Instant::now());
        }
        state
            .subscribers
            .retain(|subscriber| subscriber.connection_id != connection_id);
        let mut unwritten_frames: Vec<Bytes> = unwritten.into_iter().collect();
        while let Ok(frame) = frame_receiver.try_recv() {
            unwritten_frames.push(frame);
        }
        if self.hold_while_disconnected && state.subscribers.is_empty() {
            for frame in unwritten_frames.into_iter().rev() {
                state.held_frames.push_front(frame);
            }
        }
        self.publish_counts(&state, 0);
    }

    fn publish_counts(&self, state: &ApiState, newly_accepted: u64) {
        self.counts_sender.send_modify(|counts| {
            counts.connected = state.subscribers.len();
            counts.accepted += newly_accepted;
        });
    }
}

async fn wait_for_stop(stop_receiver: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens once everything is being dropped.
    let _ = stop_receiver.wait_for(|stopped| *stopped).await;
}

async fn accept_connections(shared: Arc<UpstreamShared>, listener: TcpListener) {
    let mut stop_receiver = shared.stop_sender.subscribe();
    loop {
        tokio::select! {
            _ = wait_for_stop(&mut stop_receiver) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(shared.clone(), stream));
                }
                // Out of file descriptors, say: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

async fn serve_connection(shared: Arc<UpstreamShared>, mut stream: TcpStream) {
    let mut stop_receiver = shared.stop_sender.subscribe();
    let head = tokio::select! {
        _ = wait_for_stop(&mut stop_receiver) => return,
        head = read_request_head(&mut stream) => head,
    };
    let request = match head {
        Ok(Some(request)) => request,
        Ok(None) => return,
        Err(status) => return write_error_and_close(stream, &ScriptedFailure::status(status)).await,
    };
    let route_path = request.path.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = route_path.split('/').collect();
    let api = match segments.as_slice() {
        ["", "participants", user_id, "stream"] if !user_id.is_empty() => Api::Participant,
        ["", "api", "v1", "chat-internal-messages", chat_id, "listen"] if !chat_id.is_empty() => Api::Chat,
        _ => return write_error_and_close(stream, &ScriptedFailure::status(404)).await,
    };
    let api_shared = shared.api(api);
    let failure = {
        let mut state = api_shared.lock();
        state.requests_seen.push(request.clone());
        let busy = api_shared.one_connection_at_a_time.load(Ordering::Relaxed) && !state.subscribers.is_empty();
        let conflict = busy.then(|| ScriptedFailure::status(409));
        state.scripted_failures.pop_front().or(conflict)
    };
    if let Some(failure) = failure {
        return write_error_and_close(stream, &failure).await;
    }
    if request.method != "GET" {
        return write_error_and_close(stream, &ScriptedFailure::status(405)).await;
    }
    let mut required_headers = api_shared.required_headers.iter();
    if !required_headers.all(|(name, value)| request.header(name) == Some(value.as_str())) {
        return write_error_and_close(stream, &ScriptedFailure::status(401)).await;
    }
    let mut body_encoder = BodyEncoder::new(shared.gzip);
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n{}Connection: close\r\n\r\n",
        body_encoder.content_encoding_header()
    );
    if stream.write_all(head.as_bytes()).await.is_err() || stream.write_all(body_encoder.start()).await.is_err() {
        return;
    }
    let close_signal = Arc::new(Notify::new());
    let (connection_id, mut frame_receiver) = api_shared.subscribe(close_signal.clone());
    let unwritten_frame = write_frames_until_closed(
        api_shared,
        &mut stream,
        &mut body_encoder,
        &mut frame_receiver,
        &close_signal,
        stop_receiver,
    )
    .await;
    api_shared.unsubscribe(connection_id, frame_receiver, unwritten_frame);
    let _ = stream.write_all(&body_encoder.finish()).await;
    close_cleanly(stream).await;
}

/// Writes frames and keepalives until the stream must close; returns the frame whose write
/// failed, if that is why.
async fn write_frames_until_closed(
    api_shared: &ApiShared,
    stream: &mut TcpStream,
    body_encoder: &mut BodyEncoder,
    frame_receiver: &mut mpsc::Receiver<Bytes>,
    close_signal: &Notify,
    mut stop_receiver: watch::Receiver<bool>,
) -> Option<Bytes> {
    let period = api_shared.keepalive_period;
    let mut keepalive = tokio::time::interval_at(Instant::now() + period, period);
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let max_age = api_shared.max_connection_age;
    let mut max_age_reached = std::pin::pin!(async {
        match max_age {
            Some(max_age) => tokio::time::sleep(max_age).await,
            None => std::future::pending().await,
        }
    });
    let (mut reader, mut writer) = stream.split();
    let mut scratch = [0u8; 1024];
    // Closing takes priority over frames, or a busy publisher would keep a connection open
    // past its maximum age.
    loop {
        tokio::select! {
            biased;
            _ = wait_for_stop(&mut stop_receiver) => return None,
            _ = close_signal.notified() => return None,
            _ = &mut max_age_reached => return None,
            // The client sends nothing after its request, so a read returns only when it leaves.
            read = reader.read(&mut scratch) => if matches!(read, Ok(0) | Err(_)) { return None },
            Some(frame) = frame_receiver.recv() => if writer.write_all(&body_encoder.encode(&frame)).await.is_err() {
                return Some(frame);
            },
            _ = keepalive.tick() => {
                if writer.write_all(&body_encoder.encode(api_shared.keepalive_frame)).await.is_err() {
                    return None;
                }
            }
        }
    }
}

/// How a stream's body goes out: as it is, or gzip-encoded. The gzip stream uses stored
/// (uncompressed) deflate blocks, one per write: valid gzip that needs no compressor and is
/// written as frames come.
enum BodyEncoder {
    Identity,
    Gzip { crc: u32, n_bytes: u32 },
}

impl BodyEncoder {
    fn new(gzip: bool) -> BodyEncoder {
        if gzip {
            BodyEncoder::Gzip { crc: 0, n_bytes: 0 }
        } else {
            BodyEncoder::Identity
        }
    }

    fn content_encoding_header(&self) -> &'static str {
        match self {
            BodyEncoder::Identity => "",
            BodyEncoder::Gzip { .. } => "Content-Encoding: gzip\r\n",
        }
    }

    /// The bytes that open the body: gzip's header (deflate, no name, no time, unknown OS).
    fn start(&self) -> &'static [u8] {
        match self {
            BodyEncoder::Identity => b"",
            BodyEncoder::Gzip { .. } => &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff],
        }
    }

    fn encode<'a>(&mut self, bytes: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        let BodyEncoder::Gzip { crc, n_bytes } = self else {
            return std::borrow::Cow::Borrowed(bytes);
        };
        *crc = crc32(*crc, bytes);
        *n_bytes = n_bytes.wrapping_add(bytes.len() as u32);
        let mut out = Vec::with_capacity(bytes.len() + 5);
        for block in bytes.chunks(usize::from(u16::MAX)) {
            let length = block.len() as u16;
            out.push(0); // not the final block; stored
            out.extend_from_slice(&length.to_le_bytes());
            out.extend_from_slice(&(!length).to_le_bytes());
            out.extend_from_slice(block);
        }
        std::borrow::Cow::Owned(out)
    }

    /// The bytes that close the body: an empty final block, then gzip's CRC-32 and length.
    fn finish(&self) -> Vec<u8> {
        let BodyEncoder::Gzip { crc, n_bytes } = self else {
            return Vec::new();
        };
        let mut out = vec![1, 0, 0, 0xff, 0xff];
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&n_bytes.to_le_bytes());
        out
    }
}

/// CRC-32 (IEEE), continued from `crc`; bit by bit, which is fast enough for tests.
fn crc32(crc: u32, bytes: &[u8]) -> u32 {
    let mut crc = !crc;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Reads up to the blank line ending the request head. `Ok(None)` when the client left first;
/// `Err(status)` when the head is too large or malformed.
async fn read_request_head(stream: &mut TcpStream) -> Result<Option<RecordedRequest>, u16> {
    let mut buffer = Vec::with_capacity(4096);
    let head_length = loop {
        if let Some(position) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break position;
        }
        if buffer.len() > MAX_REQUEST_HEAD_BYTES {
            return Err(431);
        }
        match stream.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_length]);
    let mut lines = head.split("\r\n");
    let request_line: Vec<&str> = lines.next().unwrap_or_default().split(' ').collect();
    let [method, path, version] = request_line.as_slice() else {
        return Err(400);
    };
    if !version.starts_with("HTTP/1.") {
        return Err(400);
    }
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(400);
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Some(RecordedRequest {
        method: method.to_string(),
        path: path.to_string(),
        headers,
    }))
}

async fn write_error_and_close(mut stream: TcpStream, failure: &ScriptedFailure) {
    let status = failure.status;
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|status| status.canonical_reason())
        .unwrap_or("Error");
    let body = format!("{status} {reason}\n");
    let mut extra_headers = String::new();
    if let Some(delay) = failure.retry_after {
        extra_headers.push_str(&format!("Retry-After: {}\r\n", delay.as_secs()));
    }
    if let Some(location) = &failure.location {
        extra_headers.push_str(&format!("Location: {location}\r\n"));
    }
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(response.as_bytes()).await.is_ok() {
        close_cleanly(stream).await;
    }
}

/// Sends FIN, then reads until the client closes too: dropping a socket with unread input
/// makes the kernel send RST, which can destroy bytes the client has not read yet.
async fn close_cleanly(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut scratch = [0u8; 1024];
    let drain = async { while matches!(stream.read(&mut scratch).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Api, Upstream, UpstreamOptions};

    const TEST_DEADLINE: Duration = Duration::from_secs(10);

    fn test_client() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().expect("client builds")
    }

    /// An open stream read one SSE frame (up to and including the blank line) at a time.
    struct TestStream {
        response: reqwest::Response,
        buffer: Vec<u8>,
    }

    impl TestStream {
        async fn open(url: &str, token: Option<&str>) -> TestStream {
            let mut request = test_client().get(url);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.expect("stream request succeeds");
            assert_eq!(response.status(), 200);
            TestStream {
                response,
                buffer: Vec::new(),
            }
        }

        /// The next frame, or None once the server has closed the stream.
        async fn next_frame(&mut self) -> Option<String> {
            loop {
                if let Some(position) = self.buffer.windows(2).position(|window| window == b"\n\n") {
                    let frame: Vec<u8> = self.buffer.drain(..position + 2).collect();
                    return Some(String::from_utf8(frame).expect("frames are UTF-8"));
                }
                let chunk = tokio::time::timeout(TEST_DEADLINE, self.response.chunk())
                    .await
                    .expect("a frame or the end within the deadline");
                match chunk {
                    Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                    Ok(None) | Err(_) => return None,
                }
            }
        }

        /// The next frame that is not a chat keepalive.
        async fn next_data_frame(&mut self) -> Option<String> {
            loop {
                match self.next_frame().await {
                    Some(frame) if frame == "data: keepalive\n\n" => continue,
                    other => return other,
                }
            }
        }
    }

    async fn check_status(url: &str, headers: &[(&str, &str)], expected_status: u16) {
        let mut request = test_client().get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), expected_status, "{url} with {headers:?}");
        if expected_status == 200 {
            assert_eq!(response.headers()["content-type"], "text/event-stream");
        }
    }

    #[tokio::test]
    async fn answers_401_unless_the_bearer_token_and_api_key_match() {
        let options = UpstreamOptions {
            bearer_token: Some("secret".into()),
            api_key: Some("key".into()),
            ..Default::default()
        };
        let upstream = Upstream::start(options).await.unwrap();
        let participant_url = upstream.participant_url("40");
        let chat_url = upstream.chat_url("c0ffee");
        let bearer = ("authorization", "Bearer secret");
        let api_key = ("x-api-key", "key");
        check_status(&participant_url, &[], 401).await;
        check_status(&participant_url, &[bearer], 401).await;
        check_status(&participant_url, &[api_key], 401).await;
        check_status(&participant_url, &[bearer, api_key], 200).await;
        check_status(&chat_url, &[("authorization", "Bearer wrong")], 401).await;
        check_status(&chat_url, &[bearer], 200).await;
        let participant_requests = upstream.requests_seen(Api::Participant);
        assert_eq!(participant_requests.len(), 4);
        assert_eq!(participant_requests[3].path, "/participants/40/stream");
        assert_eq!(participant_requests[3].header("X-API-Key"), Some("key"));
        assert_eq!(upstream.connections_accepted(Api::Participant), 1);
        assert_eq!(upstream.connections_accepted(Api::Chat), 1);
    }

    #[tokio::test]
    async fn sends_keepalive_frames_in_each_apis_format() {
        let options = UpstreamOptions {
            participant_keepalive: Duration::from_millis(50),
            chat_keepalive: Duration::from_millis(50),
            ..Default::default()
        };
        let upstream = Upstream::start(options).await.unwrap();
        let mut participant_stream = TestStream::open(&upstream.participant_url("40"), None).await;
        let mut chat_stream = TestStream::open(&upstream.chat_url("c0ffee"), None).await;
        assert_eq!(
            participant_stream.next_frame().await.unwrap(),
            "data: {\"eventType\":\"KEEP_ALIVE\"}\n\n"
        );
        assert_eq!(chat_stream.next_frame().await.unwrap(), "data: keepalive\n\n");
        upstream.stop();
        assert_eq!(chat_stream.next_data_frame().await, None);
        assert!(upstream.wait_for_clients(Api::Participant, 0, TEST_DEADLINE).await);
    }

    #[tokio::test]
    async fn publish_reaches_connected_clients_and_close_all_ends_their_streams() {
        let upstream = Upstream::start(UpstreamOptions::default()).await.unwrap();
        assert_eq!(upstream.publish_event(Api::Chat, "lost"), 0, "nobody is connected yet");
        let mut chat_stream = TestStream::open(&upstream.chat_url("c0ffee"), None).await;
        assert!(upstream.wait_for_clients(Api::Chat, 1, TEST_DEADLINE).await);
        assert_eq!(
            upstream.publish_event(Api::Chat, r#"{"is_active":false,"type":"workflow_status"}"#),
            1
        );
        assert_eq!(upstream.publish_event(Api::Chat, "line one\nline two"), 1);
        assert_eq!(upstream.publish_event(Api::Participant, "nobody"), 0);
        assert_eq!(
            chat_stream.next_data_frame().await.unwrap(),
            "data: {\"is_active\":false,\"type\":\"workflow_status\"}\n\n"
        );
        assert_eq!(
            chat_stream.next_data_frame().await.unwrap(),
            "data: line one\ndata: line two\n\n"
        );
        upstream.close_all(Api::Chat);
        assert_eq!(chat_stream.next_data_frame().await, None);
        assert!(upstream.wait_for_clients(Api::Chat, 0, TEST_DEADLINE).await);
    }

    // On this single-threaded runtime no connection task runs until the test awaits, so the
    // frames published just before `close_all` are certainly still unwritten when it closes.
    #[tokio::test]
    async fn held_and_unwritten_frames_are_written_first_to_the_next_connection() {
        let upstream = Upstream::start(UpstreamOptions {
            hold_while_disconnected: true,
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(upstream.publish_event(Api::Chat, "1"), 0);
        assert_eq!(upstream.publish_event(Api::Chat, "2"), 0);
        let mut chat_stream = TestStream::open(&upstream.chat_url("c0ffee"), None).await;
        assert!(upstream.wait_for_clients(Api::Chat, 1, TEST_DEADLINE).await);
        assert_eq!(upstream.publish_event(Api::Chat, "3"), 1);
        for expected in ["1", "2", "3"] {
            assert_eq!(
                chat_stream.next_data_frame().await.unwrap(),
                format!("data: {expected}\n\n")
            );
        }
        assert_eq!(upstream.publish_event(Api::Chat, "4"), 1);
        assert_eq!(upstream.publish_event(Api::Chat, "5"), 1);
        upstream.close_all(Api::Chat);
        assert_eq!(chat_stream.next_data_frame().await, None);
        assert!(upstream.wait_for_clients(Api::Chat, 0, TEST_DEADLINE).await);
        assert_eq!(upstream.publish_event(Api::Chat, "6"), 0);
        let mut chat_stream = TestStream::open(&upstream.chat_url("c0ffee"), None).await;
        for expected in ["4", "5", "6"] {
            assert_eq!(
                chat_stream.next_data_frame().await.unwrap(),
                format!("data: {expected}\n\n")
            );
        }
    }

    // Two worker threads, so that publishing and closing really race.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_frame_arrives_once_and_in_order_across_max_age_closes() {
        let options = UpstreamOptions {
            chat_max_connection_age: Duration::from_millis(300),
            hold_while_disconnected: true,
            ..Default::default()
        };
        let upstream = Upstream::start(options).await.unwrap();
        let (frame_sender, mut frame_receiver) = tokio::sync::mpsc::channel(100_000);
        let chat_url = upstream.chat_url("c0ffee");
        let reconnecting_reader = tokio::spawn(async move {
            loop {
                let mut chat_stream = TestStream::open(&chat_url, None).await;
                while let Some(frame) = chat_stream.next_data_frame().await {
                    frame_sender.send(frame).await.unwrap();
                }
            }
        });
        // Publish bursts at a steady pace until the reader has been cut off three times, so
        // frames are published while connections are open, closing (with frames not yet
        // written), and absent.
        let mut publishing_pace = tokio::time::interval(Duration::from_millis(1));
        let publishing_deadline = tokio::time::Instant::now() + TEST_DEADLINE;
        let mut n_published = 0;
        while upstream.connections_accepted(Api::Chat) < 4 {
            assert!(
                tokio::time::Instant::now() < publishing_deadline,
                "the reader did not reconnect three times"
            );
            publishing_pace.tick().await;
            for _ in 0..20 {
                upstream.publish_event(Api::Chat, &n_published.to_string());
                n_published += 1;
            }
        }
        let mut received = Vec::new();
        while received.len() < n_published {
            let frame = tokio::time::timeout(TEST_DEADLINE, frame_receiver.recv()).await;
            received.push(frame.expect("every published frame arrives").unwrap());
        }
        let expected: Vec<String> = (0..n_published).map(|n| format!("data: {n}\n\n")).collect();
        assert_eq!(received, expected);
        reconnecting_reader.abort();
    }

    #[test]
    fn gzip_bodies_are_stored_deflate_blocks_with_the_right_crc() {
        assert_eq!(super::crc32(0, b"123456789"), 0xCBF4_3926, "the CRC-32 check value");
        assert_eq!(super::crc32(super::crc32(0, b"1234"), b"56789"), 0xCBF4_3926);
        let mut encoder = super::BodyEncoder::new(true);
        let mut body = encoder.start().to_vec();
        body.extend_from_slice(&encoder.encode(b"data: a\n\n"));
        body.extend_from_slice(&encoder.finish());
        let mut expected = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff, 0, 9, 0, 0xf6, 0xff];
        expected.extend_from_slice(b"data: a\n\n");
        expected.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
        expected.extend_from_slice(&super::crc32(0, b"data: a\n\n").to_le_bytes());
        expected.extend_from_slice(&[9, 0, 0, 0]);
        assert_eq!(body, expected);
    }

    #[tokio::test]
    async fn fail_next_answers_the_scripted_status_then_streams() {
        let upstream = Upstream::start(UpstreamOptions::default()).await.unwrap();
        upstream.fail_next(Api::Chat, 500, 1);
        upstream.fail_next_with_retry_after(Api::Participant, 429, 1, Duration::from_secs(7));
        let client = test_client();
        let failed = client.get(upstream.chat_url("c0ffee")).send().await.unwrap();
        assert_eq!(failed.status(), 500);
        assert_eq!(failed.text().await.unwrap(), "500 Internal Server Error\n");
        let _chat_stream = TestStream::open(&upstream.chat_url("c0ffee"), None).await;
        assert_eq!(upstream.connections_accepted(Api::Chat), 1);
        assert_eq!(upstream.requests_seen(Api::Chat).len(), 2);
        let throttled = client.get(upstream.participant_url("40")).send().await.unwrap();
        assert_eq!(throttled.status(), 429);
        assert_eq!(throttled.headers()["retry-after"], "7");
        upstream.redirect_next(Api::Chat, 307, "/elsewhere", 1);
        let no_redirects = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let redirected = no_redirects.get(upstream.chat_url("c0ffee")).send().await.unwrap();
        assert_eq!(redirected.status(), 307);
        assert_eq!(redirected.headers()["location"], "/elsewhere");
        let unknown = client
            .get(format!("http://{}/participants/40", upstream.addr()))
            .send()
            .await
            .unwrap();
        assert_eq!(unknown.status(), 404);
    }
}
