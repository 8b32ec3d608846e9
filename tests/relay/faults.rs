//! Faults: upstreams that close mid-event, stall, fail or send garbage, and targets that flap,
//! hang, reset connections, answer too late or stay down for thousands of events. Each case
//! compares what was delivered with what was emitted, then checks that the relay still relays.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use sse_relay_fixtures::emulator::{Api, Upstream, UpstreamOptions};
use sse_relay_fixtures::metrics::metric_value;
use sse_relay_fixtures::process::free_port;
use sse_relay_fixtures::sink::{ReceivedRequest, Sink, SinkResponse};

use crate::support::{
    DEADLINE, TestRelay, bodies, both_connected, both_streams, eventually, everything_to, quiet_upstream,
};

/// Stream settings that make reconnects quick, so that a test sees many of them.
const FAST_RECONNECT: &str = "reconnect: { initial_delay: 20ms, max_delay: 100ms, auth_failure_delay: 50ms }";

/// Target settings for the target faults: a short timeout, and a breaker that never pauses for long.
const IMPATIENT_TARGET: &str = "timeout: 300ms\n    circuit_breaker: { open_delay: 50ms, max_open_delay: 100ms }";

fn reconnects(stream: &'static str, reason: &'static str) -> [(&'static str, &'static str); 2] {
    [("stream", stream), ("reason", reason)]
}

/// The relay survived the fault: `/healthz` answers, and an event published on `api` now
/// reaches the sink's `/hook`. Returns the event's body.
async fn assert_relays_a_fresh_event(relay: &TestRelay, upstream: &Upstream, sink: &Sink, api: Api) -> String {
    assert_eq!(relay.get("/healthz").await.0, 200, "/healthz after the fault");
    assert!(
        upstream.wait_for_clients(api, 1, DEADLINE).await,
        "the {api:?} stream is connected after the fault"
    );
    let fresh = match api {
        Api::Participant => r#"{"eventType":"FRESH_AFTER_THE_FAULT"}"#,
        Api::Chat => r#"{"type":"fresh_after_the_fault"}"#,
    };
    upstream.publish_event(api, fresh);
    eventually("an event published after the fault delivered", DEADLINE, || async {
        sink.delivered("/hook")
            .iter()
            .any(|request| request.body == fresh.as_bytes())
    })
    .await;
    fresh.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_mid_event_loses_only_the_unfinished_event() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let relay = TestRelay::start(&both_streams(&upstream, FAST_RECONNECT, &everything_to(&sink, ""))).await;
    both_connected(&upstream).await;

    let event = |phase: &str, n: usize| format!(r#"{{"eventType":"{phase}","n":{n}}}"#);
    let before: Vec<String> = (0..3).map(|n| event("BEFORE", n)).collect();
    let after: Vec<String> = (0..3).map(|n| event("AFTER", n)).collect();
    for data in &before[..2] {
        assert_eq!(upstream.publish_event(Api::Participant, data), 1);
    }
    // The last whole event and half of the next go out in one write: once the whole one is
    // delivered, the half one has reached the relay too.
    let last_and_half = format!("data: {}\n\ndata: {{\"eventType\":\"HALF\",\"n\":", before[2]);
    assert_eq!(upstream.publish(Api::Participant, last_and_half), 1);
    assert_eq!(sink.wait_for_delivered("/hook", 3, DEADLINE).await.len(), 3);
    upstream.close_all(Api::Participant);

    relay
        .wait_metric(
            "sse_relay_stream_reconnects_total",
            &reconnects("participant", "closed_mid_event"),
            1.0,
        )
        .await;
    assert!(
        upstream
            .wait_for_connections_accepted(Api::Participant, 2, DEADLINE)
            .await
    );
    assert!(upstream.wait_for_clients(Api::Participant, 1, DEADLINE).await);
    for data in &after {
        assert_eq!(upstream.publish_event(Api::Participant, data), 1);
    }
    sink.wait_for_delivered("/hook", before.len() + after.len(), DEADLINE)
        .await;
    let fresh = assert_relays_a_fresh_event(&relay, &upstream, &sink, Api::Participant).await;

    let expected: Vec<String> = before.iter().chain(&after).chain([&fresh]).cloned().collect();
    assert_eq!(
        bodies(&sink.requests("/hook")),
        expected,
        "each whole event once, in order, and not the half one"
    );
    let metrics = relay.get("/metrics").await.1;
    let count = |labels: &[(&str, &str)]| metric_value(&metrics, "sse_relay_stream_reconnects_total", labels);
    assert_eq!(count(&reconnects("participant", "closed_mid_event")), 1.0);
    assert_eq!(count(&[("stream", "participant")]), 1.0, "one reconnect in all");
    assert_eq!(upstream.connections_accepted(Api::Participant), 2);
    eventually("/readyz answers 200", DEADLINE, || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_is_dropped_by_the_idle_watchdog_and_reconnected() {
    // The chat stream's keepalives keep it alive; the participant stream sends nothing unless
    // told to. Frames published between its connections are held for the next one.
    let upstream = Upstream::start(UpstreamOptions {
        chat_keepalive: Duration::from_millis(100),
        hold_while_disconnected: true,
        ..quiet_upstream()
    })
    .await
    .unwrap();
    let sink = Sink::start().await.unwrap();
    let idle_timeout = Duration::from_millis(500);
    let relay = TestRelay::start(&both_streams(
        &upstream,
        &format!("idle_timeout: {}ms\n    {FAST_RECONNECT}", idle_timeout.as_millis()),
        &everything_to(&sink, ""),
    ))
    .await;
    both_connected(&upstream).await;

    // A whole event, then the stall in the middle of the next one.
    let before = r#"{"eventType":"BEFORE_THE_STALL"}"#;
    let stalled_at = Instant::now();
    assert_eq!(
        upstream.publish(
            Api::Participant,
            format!("data: {before}\n\ndata: {{\"eventType\":\"STALLED\""),
        ),
        1
    );
    assert_eq!(sink.wait_for_delivered("/hook", 1, DEADLINE).await.len(), 1);
    relay
        .wait_metric(
            "sse_relay_stream_reconnects_total",
            &reconnects("participant", "idle_timeout"),
            1.0,
        )
        .await;
    assert!(
        upstream
            .wait_for_connections_accepted(Api::Participant, 2, DEADLINE)
            .await
    );
    let stalled_connection = upstream.connection_spans(Api::Participant)[0];
    let dropped_after = stalled_connection.closed_at.expect("the stalled connection was closed") - stalled_at;
    assert!(
        dropped_after >= idle_timeout,
        "the watchdog dropped the stream {dropped_after:?} after its last bytes, before idle_timeout"
    );

    let after = r#"{"eventType":"AFTER_THE_STALL"}"#;
    upstream.publish_event(Api::Participant, after);
    sink.wait_for_delivered("/hook", 2, DEADLINE).await;
    let fresh = assert_relays_a_fresh_event(&relay, &upstream, &sink, Api::Participant).await;
    assert_eq!(
        bodies(&sink.requests("/hook")),
        [before, after, &fresh],
        "each whole event once, and not the stalled one"
    );
    assert_eq!(
        relay
            .metric("sse_relay_stream_reconnects_total", &reconnects("chat", "idle_timeout"))
            .await,
        0.0,
        "keepalives keep a quiet stream alive"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_the_request_is_abandoned_after_idle_timeout() {
    // Accepts connections and never writes a byte, not even a response head.
    let black_hole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let black_hole_addr = black_hole.local_addr().unwrap();
    let n_accepted = Arc::new(AtomicUsize::new(0));
    let held = tokio::spawn({
        let n_accepted = Arc::clone(&n_accepted);
        async move {
            let mut connections = Vec::new();
            while let Ok((socket, _)) = black_hole.accept().await {
                n_accepted.fetch_add(1, Ordering::Relaxed);
                connections.push(socket);
            }
        }
    });
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
shutdown: {{ grace_period: 2s }}
streams:
  silent:
    url: http://{black_hole_addr}/participants/42/stream
    idle_timeout: 300ms
    {FAST_RECONNECT}
  chat:
    url: {chat}
    event_type: [/type]
    keepalive: [keepalive]
{targets}
"#,
        chat = upstream.chat_url("3f1c"),
        targets = everything_to(&sink, ""),
    );
    let relay = TestRelay::start(&yaml).await;
    relay
        .wait_metric(
            "sse_relay_stream_reconnects_total",
            &reconnects("silent", "idle_timeout"),
            2.0,
        )
        .await;
    eventually("a third connection to the silent server", DEADLINE, || async {
        n_accepted.load(Ordering::Relaxed) >= 3
    })
    .await;
    relay
        .wait_metric("sse_relay_stream_connected", &[("stream", "chat")], 1.0)
        .await;
    let (status, body) = relay.get("/readyz").await;
    assert_eq!((status, body.as_str()), (503, "stream silent is not connected\n"));
    let fresh = assert_relays_a_fresh_event(&relay, &upstream, &sink, Api::Chat).await;
    assert_eq!(
        bodies(&sink.requests("/hook")),
        [fresh],
        "the stuck stream delays no other"
    );
    relay.stop().await;
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answering_errors_for_a_while_is_retried_until_it_recovers() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let failures = [(500, 3), (401, 2), (409, 2), (429, 2), (503, 1)];
    for (status, count) in failures {
        upstream.fail_next(Api::Participant, status, count);
    }
    let n_failures: usize = failures.iter().map(|(_, count)| count).sum();
    let sink = Sink::start().await.unwrap();
    let relay = TestRelay::start(&both_streams(&upstream, FAST_RECONNECT, &everything_to(&sink, ""))).await;
    both_connected(&upstream).await;
    // The emulator counts the stream once its head is written; the relay, once it has read it.
    relay
        .wait_metric("sse_relay_stream_connected", &[("stream", "participant")], 1.0)
        .await;

    let seen = upstream.requests_seen(Api::Participant);
    assert_eq!(seen.len(), n_failures + 1, "every failure, then the stream");
    assert_eq!(upstream.connections_accepted(Api::Participant), 1);
    let metrics = relay.get("/metrics").await.1;
    let count = |reason: &'static str| {
        metric_value(
            &metrics,
            "sse_relay_stream_reconnects_total",
            &reconnects("participant", reason),
        )
    };
    assert_eq!(count("http_error"), 8.0, "500, 409, 429 and 503 answers");
    assert_eq!(count("auth_failed"), 2.0, "401 answers");

    let after: Vec<String> = (0..3)
        .map(|n| format!(r#"{{"eventType":"AFTER_RECOVERY","n":{n}}}"#))
        .collect();
    for data in &after {
        assert_eq!(upstream.publish_event(Api::Participant, data), 1);
    }
    sink.wait_for_delivered("/hook", after.len(), DEADLINE).await;
    let fresh = assert_relays_a_fresh_event(&relay, &upstream, &sink, Api::Participant).await;
    let expected: Vec<String> = after.iter().chain([&fresh]).cloned().collect();
    assert_eq!(bodies(&sink.requests("/hook")), expected);
    eventually("/readyz answers 200", DEADLINE, || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_the_upstream_is_dropped_and_counted_and_good_events_still_flow() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let max_event_bytes = 64 * 1024;
    let relay = TestRelay::start(&both_streams(
        &upstream,
        &format!("max_event_bytes: {max_event_bytes}\n    {FAST_RECONNECT}"),
        &everything_to(&sink, ""),
    ))
    .await;
    both_connected(&upstream).await;
    let good = |n: usize| format!(r#"{{"eventType":"GOOD","n":{n}}}"#);
    let publish = |frame: Vec<u8>| assert_eq!(upstream.publish(Api::Participant, frame), 1);

    publish(format!("id: good-0\ndata: {}\n\n", good(0)).into_bytes());
    // Binary noise with invalid UTF-8: the line names no field, so it makes no event.
    publish(b"\xff\xfe\x00\x80\xc3 binary noise\n\n".to_vec());
    // Ids that cannot be sent back as Last-Event-ID: one with a control character (the relay
    // ignores it) and one with NUL (the SSE parser ignores it). Their events are delivered.
    // Events without an id field inherit the last id, so a good one comes between.
    publish(format!("id: bad-\u{1}\ndata: {}\n\n", good(1)).into_bytes());
    publish(format!("id: good-2\ndata: {}\n\n", good(2)).into_bytes());
    publish(format!("id: bad-\u{0}\ndata: {}\n\n", good(3)).into_bytes());
    // A 10 MiB line, ended properly.
    let mut huge = b"data: ".to_vec();
    huge.resize(10 * 1024 * 1024, b'x');
    huge.extend_from_slice(b"\n\n");
    publish(huge);
    // Thousands of events that carry nothing: blank lines, comments, fields without data.
    publish(b"\n\n".repeat(3000));
    publish(b": comment\n\n".repeat(1000));
    publish(b"event: EMPTY\n\n".repeat(1000));
    publish(b"retry: 1\n\n".repeat(1000));
    publish(format!("data: {}\n\n", good(4)).into_bytes());
    let delivered = sink.wait_for_delivered("/hook", 5, DEADLINE).await;
    assert_eq!(bodies(&delivered), [good(0), good(1), good(2), good(3), good(4)]);

    // A line that never ends: the relay skips it once it passes max_event_bytes, and the next
    // connection carries events again.
    publish(b"data: ".to_vec());
    let too_large_before = relay
        .metric("sse_relay_events_dropped_total", &[("reason", "too_large")])
        .await;
    let chunk = vec![b'y'; 16 * 1024];
    for _ in 0..(2 * max_event_bytes / chunk.len()) {
        publish(chunk.clone());
    }
    relay
        .wait_metric(
            "sse_relay_events_dropped_total",
            &[("reason", "too_large")],
            too_large_before + 1.0,
        )
        .await;
    // Still no newline; more bytes of the same line change nothing.
    for _ in 0..16 {
        publish(chunk.clone());
    }
    upstream.close_all(Api::Participant);
    assert!(
        upstream
            .wait_for_connections_accepted(Api::Participant, 2, DEADLINE)
            .await
    );
    let seen = upstream.requests_seen(Api::Participant);
    assert_eq!(
        seen.last().unwrap().header("last-event-id"),
        Some("good-2"),
        "the last id that can be sent back"
    );
    assert!(upstream.wait_for_clients(Api::Participant, 1, DEADLINE).await);
    assert_eq!(upstream.publish_event(Api::Participant, &good(5)), 1);
    sink.wait_for_delivered("/hook", 6, DEADLINE).await;
    let fresh = assert_relays_a_fresh_event(&relay, &upstream, &sink, Api::Participant).await;

    let expected = [good(0), good(1), good(2), good(3), good(4), good(5), fresh];
    assert_eq!(bodies(&sink.requests("/hook")), expected, "nothing bogus delivered");
    let metrics = relay.get("/metrics").await.1;
    let count = |name: &str, labels: &[(&str, &str)]| metric_value(&metrics, name, labels);
    let participant = ("stream", "participant");
    assert_eq!(
        count(
            "sse_relay_events_dropped_total",
            &[participant, ("reason", "too_large")]
        ),
        2.0,
        "the 10 MiB line and the endless one"
    );
    assert_eq!(
        count(
            "sse_relay_upstream_errors_total",
            &[participant, ("kind", "invalid_utf8")]
        ),
        1.0
    );
    assert_eq!(
        count(
            "sse_relay_upstream_errors_total",
            &[participant, ("kind", "invalid_id")]
        ),
        1.0,
        "the id with a control character (the one with NUL never reaches the relay)"
    );
    assert_eq!(
        count("sse_relay_events_received_total", &[participant]),
        7.0,
        "the good events only"
    );
    assert_eq!(count("sse_relay_stream_reconnects_total", &[participant]), 1.0);
    assert_eq!(
        count(
            "sse_relay_stream_reconnects_total",
            &[participant, ("reason", "closed_mid_event")]
        ),
        1.0,
        "the server closed while an event was being skipped"
    );
    relay.stop().await;
}

/// A relay whose target `hook` (timeout 300ms) answers `script` first and then 200, after
/// `n_events` chat events were published and each was delivered (answered 2xx) at least once.
/// Checks what is common to every target fault: the sink saw only published bodies, every
/// attempt at an event carried that event's one idempotency key, and distinct events had
/// distinct keys.
async fn deliver_through_a_target_fault(
    script: Vec<SinkResponse>,
    max_in_flight: usize,
    n_events: usize,
) -> (TestRelay, Upstream, Sink, Vec<String>) {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.script("/hook", script);
    let targets =
        everything_to(&sink, IMPATIENT_TARGET).replace("max_in_flight: 1", &format!("max_in_flight: {max_in_flight}"));
    let relay = TestRelay::start(&both_streams(&upstream, "", &targets)).await;
    both_connected(&upstream).await;
    let events: Vec<String> = (0..n_events)
        .map(|n| format!(r#"{{"type":"update","n":{n}}}"#))
        .collect();
    for data in &events {
        assert_eq!(upstream.publish_event(Api::Chat, data), 1);
    }
    eventually("every event delivered at least once", DEADLINE, || async {
        let delivered: BTreeSet<String> = bodies(&sink.delivered("/hook")).into_iter().collect();
        events.iter().all(|data| delivered.contains(data))
    })
    .await;
    assert_one_key_per_event(&sink.requests("/hook"), &events);
    (relay, upstream, sink, events)
}

/// Every request is an attempt at one of `events`, each event's attempts share one
/// idempotency key, and no two events share one.
fn assert_one_key_per_event(requests: &[ReceivedRequest], events: &[String]) {
    let mut keys_by_body: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for request in requests {
        let body = String::from_utf8_lossy(&request.body).into_owned();
        assert!(
            events.contains(&body),
            "the sink got {body:?}, which was never published"
        );
        let key = request.header("idempotency-key").expect("every attempt has a key");
        keys_by_body.entry(body).or_default().insert(key.to_owned());
    }
    for (body, keys) in &keys_by_body {
        assert_eq!(keys.len(), 1, "{body} was sent with the keys {keys:?}");
    }
    let distinct_keys: BTreeSet<&String> = keys_by_body.values().flatten().collect();
    assert_eq!(distinct_keys.len(), keys_by_body.len(), "two events shared a key");
}

/// How many times each body was answered 2xx.
fn deliveries_per_body(sink: &Sink) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for body in bodies(&sink.delivered("/hook")) {
        *counts.entry(body).or_default() += 1;
    }
    counts
}

async fn deliveries(relay: &TestRelay, outcome: &str) -> f64 {
    relay
        .metric(
            "sse_relay_deliveries_total",
            &[("target", "hook"), ("outcome", outcome)],
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_target_gets_every_event_once() {
    let n_events = 20;
    let flapping: Vec<SinkResponse> = (0..2 * n_events)
        .map(|n| SinkResponse::status(if n % 2 == 0 { 500 } else { 200 }))
        .collect();
    let (relay, upstream, sink, events) = deliver_through_a_target_fault(flapping, 4, n_events).await;
    // Every other answer is a 500, and only a 2xx ends an event's attempts: the script runs
    // out exactly as the last event is delivered.
    assert!(deliveries_per_body(&sink).values().all(|count| *count == 1));
    assert_eq!(sink.requests("/hook").len(), 2 * n_events);
    assert_eq!(deliveries(&relay, "retried").await, n_events as f64);
    assert_eq!(deliveries(&relay, "delivered").await, n_events as f64);
    assert_relays_a_fresh_event(&relay, &upstream, &sink, Api::Chat).await;
    assert_eq!(sink.delivered("/hook").len(), events.len() + 1);
    relay.stop().await;
}

/// A target that fails half its requests at random keeps its traffic (issue #11: five failures
/// in a row paused it, for longer after each unlucky probe). Were it paused here, its hour-long
/// open_delay would hold the deliveries past the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_failing_half_its_requests_at_random_is_never_paused() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let targets = everything_to(&sink, "circuit_breaker: { open_delay: 1h, max_open_delay: 1h }")
        .replace("max_in_flight: 1", "max_in_flight: 8")
        .replace(
            "retry: { initial_delay: 20ms, max_delay: 100ms }",
            "retry: { initial_delay: 1ms, max_delay: 20ms, max_attempts: 1000 }",
        );
    let relay = TestRelay::start(&both_streams(&upstream, "", &targets)).await;
    both_connected(&upstream).await;
    let event = |n: usize| format!(r#"{{"type":"update","n":{n}}}"#);
    // A healthy target first, as targets usually are before they turn flaky.
    let n_healthy = 60;
    for n in 0..n_healthy {
        upstream.publish_event(Api::Chat, &event(n));
    }
    assert_eq!(
        sink.wait_for_delivered("/hook", n_healthy, DEADLINE).await.len(),
        n_healthy
    );

    sink.fail_at_random("/hook", 0.5, 503);
    let n_flaky = 300;
    for n in n_healthy..n_healthy + n_flaky {
        upstream.publish_event(Api::Chat, &event(n));
    }
    let delivered = sink.wait_for_delivered("/hook", n_healthy + n_flaky, DEADLINE).await;
    assert_eq!(delivered.len(), n_healthy + n_flaky, "the target was paused");
    let n_failed = sink.requests("/hook").iter().filter(|r| r.status_sent == 503).count();
    assert!(n_failed >= n_flaky / 2, "only {n_failed} requests failed");
    assert_eq!(relay.metric("sse_relay_target_state", &[("target", "hook")]).await, 0.0);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_slower_than_its_timeout_is_retried_without_waiting_for_it() {
    let slow = || SinkResponse::status(200).with_delay(Duration::from_secs(3));
    let ok = || SinkResponse::status(200);
    let script = vec![slow(), ok(), slow(), slow(), ok(), ok(), slow()];
    let slow_positions: Vec<usize> = (0..script.len()).filter(|at| !script[*at].delay.is_zero()).collect();
    let n_slow = slow_positions.len();
    // One request at a time, so the n-th request got the n-th scripted response.
    let (relay, upstream, sink, events) = deliver_through_a_target_fault(script, 1, 10).await;
    let requests = sink.requests("/hook");
    assert_eq!(requests.len(), events.len() + n_slow);
    // Each timed-out attempt is followed by a retry of the same event, after the timeout and
    // long before the slow answer would have come.
    for (index, slow_attempt) in requests
        .iter()
        .enumerate()
        .filter(|(at, _)| slow_positions.contains(at))
    {
        let retry = requests[index + 1..]
            .iter()
            .find(|request| request.body == slow_attempt.body)
            .expect("a timed-out attempt is retried");
        let waited = retry.received_at - slow_attempt.received_at;
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
            "retried {waited:?} after an attempt that timed out after 300ms"
        );
    }
    assert_eq!(deliveries(&relay, "retried").await, n_slow as f64);
    assert_eq!(deliveries(&relay, "delivered").await, events.len() as f64);
    assert_relays_a_fresh_event(&relay, &upstream, &sink, Api::Chat).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_resets_connections_gets_every_event_once() {
    let script = vec![
        SinkResponse::reset(),
        SinkResponse::status(200),
        SinkResponse::reset(),
        SinkResponse::reset(),
        SinkResponse::status(200),
        SinkResponse::reset(),
    ];
    let n_resets = 4;
    let (relay, upstream, sink, events) = deliver_through_a_target_fault(script, 1, 10).await;
    assert!(deliveries_per_body(&sink).values().all(|count| *count == 1));
    let requests = sink.requests("/hook");
    assert_eq!(requests.len(), events.len() + n_resets);
    let never_answered = requests.iter().filter(|request| request.status_sent == 0).count();
    assert_eq!(
        never_answered, n_resets,
        "each reset attempt is the only unanswered one"
    );
    assert_eq!(deliveries(&relay, "retried").await, n_resets as f64);
    assert_eq!(deliveries(&relay, "delivered").await, events.len() as f64);
    assert_relays_a_fresh_event(&relay, &upstream, &sink, Api::Chat).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_after_the_timeout_counts_as_failed_and_the_event_is_sent_again_with_its_key() {
    let late = || {
        SinkResponse::status(200)
            .with_delay(Duration::from_millis(700))
            .answered_even_if_client_left()
    };
    let ok = || SinkResponse::status(200);
    let script = vec![late(), ok(), late(), ok(), late()];
    let n_late = 3;
    let n_events = 10;
    let (relay, upstream, sink, events) = deliver_through_a_target_fault(script, 1, n_events).await;
    // The late answers land too: the target accepted some events more than once, each time
    // with that event's one key. (Which events depends on which attempts met a late answer.)
    let delivered = sink.wait_for_delivered("/hook", n_events + n_late, DEADLINE).await;
    assert_eq!(delivered.len(), n_events + n_late);
    let per_body = deliveries_per_body(&sink);
    assert_eq!(per_body.len(), n_events, "every event arrived");
    assert!(
        per_body.values().any(|count| *count > 1),
        "at least once, not exactly once"
    );
    assert_one_key_per_event(&sink.requests("/hook"), &events);
    assert_eq!(
        deliveries(&relay, "retried").await,
        n_late as f64,
        "a late 200 is a failed attempt"
    );
    assert_eq!(deliveries(&relay, "delivered").await, n_events as f64);
    assert_relays_a_fresh_event(&relay, &upstream, &sink, Api::Chat).await;
    relay.stop().await;
}

/// The `n` fields of JSON bodies in arrival order, as runs: "0-319, 1010-1499, 320-1009".
fn arrival_ranges(bodies: &[String]) -> String {
    let numbers = bodies.iter().map(|body| {
        serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|value| value["n"].as_i64())
            .unwrap_or(-1)
    });
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for n in numbers {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == n => *last = n,
            _ => runs.push((n, n)),
        }
    }
    let runs: Vec<String> = runs
        .iter()
        .map(|(first, last)| {
            if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            }
        })
        .collect();
    runs.join(", ")
}

/// Long enough for thousands of deliveries on a loaded 2-core machine; a passing test never
/// waits for it.
const LONG_OUTAGE_DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_of_an_ordered_target_delivers_everything_once_in_order() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.answer_by_default("/hook", 503);
    let targets = format!(
        r#"
storage: {{ mode: sqlite }}
targets:
  hook:
    url: {hook}
    ordered: true
    max_in_flight: 8
    retry: {{ initial_delay: 10ms, max_delay: 50ms, max_attempts: 100000 }}
    circuit_breaker: {{ open_delay: 50ms, max_open_delay: 100ms }}
routes:
  - stream: "*"
    targets: [hook]
"#,
        hook = sink.url("/hook"),
    );
    let relay = TestRelay::start(&both_streams(&upstream, "", &targets)).await;
    both_connected(&upstream).await;

    // Far more than a dispatcher holds in memory (1,024), so most wait on disk only.
    let n_per_stream = 1500;
    let participant: Vec<String> = (0..n_per_stream)
        .map(|n| format!(r#"{{"eventType":"E","n":{n}}}"#))
        .collect();
    let chat: Vec<String> = (0..n_per_stream)
        .map(|n| format!(r#"{{"type":"update","n":{n}}}"#))
        .collect();
    for (participant_data, chat_data) in participant.iter().zip(&chat) {
        assert_eq!(upstream.publish_event(Api::Participant, participant_data), 1);
        assert_eq!(upstream.publish_event(Api::Chat, chat_data), 1);
    }
    let n_events = 2 * n_per_stream;
    relay
        .wait_metric("sse_relay_queue_depth", &[("target", "hook")], n_events as f64)
        .await;
    assert!(sink.delivered("/hook").is_empty(), "the target was down");

    let recovered_at = Instant::now();
    sink.answer_by_default("/hook", 200);
    let delivered = sink.wait_for_delivered("/hook", n_events, LONG_OUTAGE_DEADLINE).await;
    assert!(
        delivered.len() >= n_events,
        "{} of {n_events} delivered within {LONG_OUTAGE_DEADLINE:?}",
        delivered.len()
    );
    let drained_in = recovered_at.elapsed();
    eventually("an empty queue", DEADLINE, || async {
        relay.metric("sse_relay_queue_depth", &[("target", "hook")]).await == 0.0
    })
    .await;
    let fresh = assert_relays_a_fresh_event(&relay, &upstream, &sink, Api::Chat).await;

    let delivered = sink.delivered("/hook");
    let mut per_body: BTreeMap<&[u8], usize> = BTreeMap::new();
    for request in &delivered {
        *per_body.entry(&request.body[..]).or_default() += 1;
    }
    let duplicates: Vec<String> = per_body
        .iter()
        .filter(|(_, count)| **count > 1)
        .map(|(body, count)| format!("{} x{count}", String::from_utf8_lossy(body)))
        .collect();
    assert!(duplicates.is_empty(), "delivered more than once: {duplicates:?}");
    assert_eq!(delivered.len(), n_events + 1, "every event once, and the fresh one");
    for (stream, published) in [("participant", &participant), ("chat", &chat)] {
        let mut in_order: Vec<String> = published.clone();
        if stream == "chat" {
            in_order.push(fresh.clone());
        }
        let arrived: Vec<String> = delivered
            .iter()
            .filter(|request| request.header("x-relay-stream") == Some(stream))
            .map(|request| String::from_utf8_lossy(&request.body).into_owned())
            .collect();
        assert!(
            arrived == in_order,
            "{stream}: delivered out of order; the events' n in arrival order: {}",
            arrival_ranges(&arrived)
        );
    }
    assert_eq!(
        relay
            .metric("sse_relay_dead_letters_total", &[("target", "hook")])
            .await,
        0.0
    );
    eprintln!("long outage: {n_events} deliveries drained in {drained_in:?}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_paused_by_backpressure_longer_than_its_idle_timeout_keeps_its_connection() {
    // The participant stream sends a keepalive every 100 ms, but while the full queue pauses
    // the stream nothing is read for longer than its idle timeout.
    let upstream = Upstream::start(UpstreamOptions {
        participant_keepalive: Duration::from_millis(100),
        chat_keepalive: Duration::from_secs(3600),
        ..UpstreamOptions::default()
    })
    .await
    .unwrap();
    let sink = Sink::start().await.unwrap();
    let slow = Duration::from_millis(800);
    sink.script(
        "/hook",
        (0..3).map(|_| SinkResponse::status(200).with_delay(slow)).collect(),
    );
    let relay = TestRelay::start(&format!(
        "storage: {{ mode: memory, max_pending: 1 }}\n{}",
        both_streams(&upstream, "idle_timeout: 500ms", &everything_to(&sink, "timeout: 5s"))
    ))
    .await;
    both_connected(&upstream).await;
    let events: Vec<String> = (0..3)
        .map(|n| format!(r#"{{"eventType":"MESSAGE_SENT","n":{n}}}"#))
        .collect();
    for data in &events {
        assert_eq!(upstream.publish_event(Api::Participant, data), 1);
    }
    let delivered = sink.wait_for_delivered("/hook", 3, DEADLINE).await;
    assert_eq!(bodies(&delivered), events);
    relay
        .wait_metric("sse_relay_backpressure_total", &[("stream", "participant")], 1.0)
        .await;
    assert_eq!(
        relay
            .metric("sse_relay_stream_reconnects_total", &[("stream", "participant")])
            .await,
        0.0,
        "waiting for room in the queue is not an idle connection"
    );
    assert_eq!(upstream.connections_accepted(Api::Participant), 1);
    relay.stop().await;
}

/// A tmpfs of `size` mounted for the test, unmounted when dropped; `None` (and the test is
/// skipped with a message) when this process may not mount one, as when not running as root.
struct SmallFilesystem {
    mount_point: tempfile::TempDir,
}

impl SmallFilesystem {
    fn mount(size: &str) -> Option<SmallFilesystem> {
        let mount_point = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(mount_point.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here (this test needs root); the disk-full case was not run");
            return None;
        }
        Some(SmallFilesystem { mount_point })
    }

    fn path(&self) -> &std::path::Path {
        self.mount_point.path()
    }

    /// Fills what is left of the filesystem with one file, and returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write as _;
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 4096];
        while file.write_all(&block).is_ok() {}
        path
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.mount_point.path())
            .status();
    }
}

/// The disk under the queue fills up, first with the queue itself while the target is down,
/// then with another file while it is down again: each time every event is delivered exactly once when there is room
/// again, the queue-depth gauge never goes below zero, and each outage logs one error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_recovers_and_delivers_every_event_once() {
    let Some(filesystem) = SmallFilesystem::mount("4m") else {
        return;
    };
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.answer_by_default("/hook", 503);
    let directory = tempfile::tempdir().unwrap();
    let admin_port = free_port().await;
    let config = directory.path().join("relay.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
admin: {{ listen: "127.0.0.1:{admin_port}" }}
shutdown: {{ grace_period: 1s }}
storage: {{ path: "{storage}" }}
streams:
  chat: {{ url: "{chat}", event_type: [/type], keepalive: [keepalive] }}
targets:
  hook:
    url: {hook}
    max_in_flight: 8
    retry: {{ initial_delay: 50ms, max_delay: 200ms, max_attempts: 1000000 }}
    circuit_breaker: {{ open_delay: 100ms, max_open_delay: 200ms }}
routes:
  - {{ stream: chat, targets: [hook] }}
"#,
            storage = filesystem.path().display(),
            chat = upstream.chat_url("3f1c"),
            hook = sink.url("/hook"),
        ),
    )
    .unwrap();
    let log_path = directory.path().join("relay.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let _relay = tokio::process::Command::new(env!("CARGO_BIN_EXE_sse-relay"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let ready_http = http.clone();
    let metrics = move || {
        let http = http.clone();
        async move {
            let url = format!("http://127.0.0.1:{admin_port}/metrics");
            match http.get(&url).send().await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            }
        }
    };
    let ready = || {
        let http = ready_http.clone();
        async move {
            let url = format!("http://127.0.0.1:{admin_port}/readyz");
            http.get(&url)
                .send()
                .await
                .is_ok_and(|response| response.status() == 200)
        }
    };
    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);
    // Sampled throughout: the gauge must never read below zero.
    let lowest_depth = Arc::new(std::sync::Mutex::new(0.0_f64));
    let sampler = tokio::spawn({
        let (lowest_depth, metrics) = (Arc::clone(&lowest_depth), metrics.clone());
        async move {
            loop {
                let depth = metric_value(&metrics().await, "sse_relay_queue_depth", &[("target", "hook")]);
                {
                    let mut lowest = lowest_depth.lock().unwrap();
                    *lowest = lowest.min(depth);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });

    // The queue fills the disk while the target is down.
    let padding = "x".repeat(1000);
    let first: Vec<String> = (0..5000)
        .map(|n| format!(r#"{{"type":"update","n":{n},"p":"{padding}"}}"#))
        .collect();
    for data in &first {
        upstream.publish_event(Api::Chat, data);
    }
    eventually("storage errors", DEADLINE, || async {
        metric_value(&metrics().await, "sse_relay_storage_errors_total", &[]) >= 1.0
    })
    .await;
    assert!(!ready().await, "not ready while the disk is full");
    sink.answer_by_default("/hook", 200);
    let long = Duration::from_secs(90);
    sink.wait_for_delivered("/hook", first.len(), long).await;
    eventually("the queue to drain", long, || async {
        metric_value(&metrics().await, "sse_relay_queue_depth", &[("target", "hook")]) == 0.0
    })
    .await;
    eventually("ready again", DEADLINE, || async { ready().await }).await;

    // Another file fills the disk while the target is down again, with more events than the
    // whole filesystem holds (the database may still have room inside it for some); the
    // stream waits until the file is deleted and the target is back.
    sink.answer_by_default("/hook", 503);
    let filler = filesystem.fill();
    let errors_before = metric_value(&metrics().await, "sse_relay_storage_errors_total", &[]);
    let second: Vec<String> = (0..4000)
        .map(|n| format!(r#"{{"type":"later","n":{n},"p":"{padding}"}}"#))
        .collect();
    for data in &second {
        upstream.publish_event(Api::Chat, data);
    }
    eventually("storage errors from the filler", DEADLINE, || async {
        metric_value(&metrics().await, "sse_relay_storage_errors_total", &[]) > errors_before
    })
    .await;
    std::fs::remove_file(filler).unwrap();
    sink.answer_by_default("/hook", 200);
    sink.wait_for_delivered("/hook", first.len() + second.len(), long).await;
    eventually("the queue to drain again", long, || async {
        metric_value(&metrics().await, "sse_relay_queue_depth", &[("target", "hook")]) == 0.0
    })
    .await;
    eventually("ready after the filler went", DEADLINE, || async { ready().await }).await;
    sampler.abort();

    let delivered = bodies(&sink.delivered("/hook"));
    let expected: BTreeSet<&String> = first.iter().chain(&second).collect();
    let mut seen = BTreeSet::new();
    let repeated: Vec<&String> = delivered.iter().filter(|body| !seen.insert(*body)).collect();
    assert!(repeated.is_empty(), "{} deliveries made twice", repeated.len());
    assert_eq!(seen, expected, "every event delivered");
    assert!(*lowest_depth.lock().unwrap() >= 0.0, "the queue depth went negative");
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let n_errors = logs.lines().filter(|line| line.contains("ERROR")).count();
    assert!(n_errors <= 2, "one error line per outage, not {n_errors}:\n{logs}");
}

/// Bytes arriving are life: an event that takes longer than `idle_timeout` to arrive, and a
/// ping with no data (nginx-Nchan's `event: ping`), keep the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_arriving_slower_than_the_idle_timeout_is_delivered_on_one_connection() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let relay = TestRelay::start(&both_streams(&upstream, "idle_timeout: 1s", &everything_to(&sink, ""))).await;
    both_connected(&upstream).await;
    let padding = "y".repeat(40_000);
    let frame = format!("data: {{\"type\":\"big\",\"padding\":\"{padding}\"}}\n\n");
    // 3 s in all, a piece every 250 ms: no whole event for three idle timeouts.
    for piece in frame.as_bytes().chunks(frame.len() / 12 + 1) {
        upstream.publish(Api::Chat, piece.to_vec());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Nchan's pings have no data; others send comments. Both are keepalives.
    for n in 0..6 {
        upstream.publish(Api::Chat, if n % 2 == 0 { "event: ping\n\n" } else { ": ping\n\n" });
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let delivered = sink.wait_for_delivered("/hook", 1, DEADLINE).await;
    relay
        .wait_metric("sse_relay_keepalives_total", &[("stream", "chat")], 6.0)
        .await;
    assert_eq!(delivered[0].body.len(), frame.len() - "data: \n\n".len());
    assert_eq!(
        upstream.connections_accepted(Api::Chat),
        1,
        "the chat stream kept its connection"
    );
    assert_eq!(
        relay
            .metric("sse_relay_stream_reconnects_total", &reconnects("chat", "idle_timeout"))
            .await,
        0.0
    );
    relay.stop().await;
}
