//! Delivery: what the webhook sink receives, retries, and isolation between targets.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::net::TcpListener;

use sse_relay_fixtures::emulator::{Api, Upstream};
use sse_relay_fixtures::metrics::metric_value;
use sse_relay_fixtures::sink::{Sink, SinkResponse};

use crate::support::{
    DEADLINE, TestRelay, bodies, both_connected, both_streams, everything_to, parse_config, quiet_upstream,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_with_one_idempotency_key() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.script(
        "/hook",
        vec![
            SinkResponse::status(500),
            SinkResponse::status(503),
            SinkResponse::status(200),
        ],
    );
    let relay = TestRelay::start(&both_streams(&upstream, "", &everything_to(&sink, ""))).await;
    both_connected(&upstream).await;
    let data = r#"{"eventType":"MESSAGE_SENT","payload":{"id":"m1"}}"#;
    upstream.publish_event(Api::Participant, data);

    assert_eq!(sink.wait_for_delivered("/hook", 1, DEADLINE).await.len(), 1);
    let attempts = sink.requests("/hook");
    let statuses: Vec<u16> = attempts.iter().map(|r| r.status_sent).collect();
    assert_eq!(statuses, [500, 503, 200]);
    let keys: BTreeSet<Option<&str>> = attempts.iter().map(|r| r.header("idempotency-key")).collect();
    assert_eq!(keys.len(), 1, "one key across retries: {keys:?}");
    assert!(attempts.iter().all(|r| r.body == data.as_bytes()));
    // The sink has answered; the relay counts the delivery once it has read that answer.
    relay
        .wait_metric(
            "sse_relay_deliveries_total",
            &[("target", "hook"), ("outcome", "delivered")],
            1.0,
        )
        .await;
    let metrics = relay.get("/metrics").await.1;
    let outcome = |outcome| {
        metric_value(
            &metrics,
            "sse_relay_deliveries_total",
            &[("target", "hook"), ("outcome", outcome)],
        )
    };
    assert_eq!(outcome("retried"), 2.0);
    assert_eq!(outcome("delivered"), 1.0);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_of_a_429_is_honoured() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.script("/hook", vec![SinkResponse::status(429).with_header("Retry-After", "1")]);
    let relay = TestRelay::start(&both_streams(&upstream, "", &everything_to(&sink, ""))).await;
    both_connected(&upstream).await;
    upstream.publish_event(Api::Chat, r#"{"type":"workflow_status"}"#);

    sink.wait_for_delivered("/hook", 1, DEADLINE).await;
    let attempts = sink.requests("/hook");
    assert_eq!(attempts.len(), 2);
    let waited = attempts[1].received_at - attempts[0].received_at;
    assert!(
        waited >= Duration::from_secs(1),
        "retried after {waited:?}, before Retry-After: 1"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_not_retried() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.script("/hook", vec![SinkResponse::status(400)]);
    let relay = TestRelay::start(&both_streams(&upstream, "", &everything_to(&sink, ""))).await;
    both_connected(&upstream).await;
    upstream.publish_event(Api::Chat, r#"{"type":"rejected"}"#);
    relay
        .wait_metric(
            "sse_relay_deliveries_total",
            &[("target", "hook"), ("outcome", "failed")],
            1.0,
        )
        .await;
    upstream.publish_event(Api::Chat, r#"{"type":"accepted"}"#);
    sink.wait_for_delivered("/hook", 1, DEADLINE).await;
    let statuses: Vec<u16> = sink.requests("/hook").iter().map(|r| r.status_sent).collect();
    assert_eq!(statuses, [400, 200], "the rejected event was sent once");
    assert_eq!(
        relay
            .metric(
                "sse_relay_deliveries_total",
                &[("target", "hook"), ("outcome", "retried")]
            )
            .await,
        0.0
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_target_does_not_delay_another() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    // Accepts connections and never answers: every request to it hangs until its timeout.
    let black_hole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let black_hole_addr = black_hole.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((socket, _)) = black_hole.accept().await {
            connections.push(socket);
        }
    });
    let routes = format!(
        r#"
targets:
  dead: {{ url: "http://{black_hole_addr}/hook", timeout: 60s, max_in_flight: 2 }}
  live: {{ url: "{live}", max_in_flight: 1 }}
routes:
  - stream: "*"
    targets: [dead, live]
"#,
        live = sink.url("/live"),
    );
    let relay = TestRelay::start(&both_streams(&upstream, "", &routes)).await;
    both_connected(&upstream).await;
    let n_events = 30;
    for index in 0..n_events {
        upstream.publish_event(Api::Participant, &format!(r#"{{"eventType":"E","n":{index}}}"#));
    }
    assert_eq!(
        sink.wait_for_delivered("/live", n_events, DEADLINE).await.len(),
        n_events
    );
    assert_eq!(
        relay
            .metric("sse_relay_deliveries_in_flight", &[("target", "dead")])
            .await,
        2.0
    );
    assert_eq!(relay.metric("sse_relay_queue_depth", &[("target", "dead")]).await, 30.0);
    relay.stop().await;
    held.abort();
}

/// With the memory store, a target that fails holds exactly `queue_capacity` deliveries and
/// drops the rest, counted; the stream and the other target never wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_a_failing_target_drops_beyond_its_capacity_and_holds_up_nothing() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.answer_by_default("/dead", 503);
    let routes = format!(
        r#"
storage: {{ mode: memory }}
targets:
  dead:
    url: "{dead}"
    queue_capacity: 100
    retry: {{ initial_delay: 1s, max_delay: 10s, max_attempts: 1000 }}
  live: {{ url: "{live}", max_in_flight: 4 }}
routes:
  - stream: "*"
    targets: [dead, live]
"#,
        dead = sink.url("/dead"),
        live = sink.url("/live"),
    );
    let relay = TestRelay::start(&both_streams(&upstream, "", &routes)).await;
    both_connected(&upstream).await;
    let n_events = 3000;
    for index in 0..n_events {
        upstream.publish_event(Api::Participant, &format!(r#"{{"eventType":"E","n":{index}}}"#));
    }
    assert_eq!(
        sink.wait_for_delivered("/live", n_events, DEADLINE).await.len(),
        n_events
    );
    let dropped = [("target", "dead"), ("outcome", "dropped")];
    relay
        .wait_metric("sse_relay_deliveries_total", &dropped, (n_events - 100) as f64)
        .await;
    assert_eq!(
        relay.metric("sse_relay_deliveries_total", &dropped).await,
        (n_events - 100) as f64
    );
    assert_eq!(
        relay.metric("sse_relay_queue_depth", &[("target", "dead")]).await,
        100.0
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_can_be_envelopes_or_parts_of_the_data() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let routes = format!(
        r#"
targets:
  envelope: {{ url: "{envelope}", body: envelope }}
  payload: {{ url: "{payload}", body: /payload }}
routes:
  - stream: participant
    targets: [envelope, payload]
"#,
        envelope = sink.url("/envelope"),
        payload = sink.url("/payload"),
    );
    let relay = TestRelay::start(&both_streams(&upstream, "", &routes)).await;
    both_connected(&upstream).await;
    upstream.publish_event(
        Api::Participant,
        r#"{"eventType":"MESSAGE_SENT","payload":{"text":"hi"}}"#,
    );

    let envelope = sink.wait_for_delivered("/envelope", 1, DEADLINE).await;
    let value: serde_json::Value = serde_json::from_slice(&envelope[0].body).unwrap();
    assert_eq!(value["stream"], "participant");
    assert_eq!(value["event_type"], "MESSAGE_SENT");
    assert_eq!(value["data"]["payload"]["text"], "hi");
    assert_eq!(value["id"].as_str(), envelope[0].header("idempotency-key"));
    let payload = sink.wait_for_delivered("/payload", 1, DEADLINE).await;
    assert_eq!(&payload[0].body[..], br#"{"text":"hi"}"#);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhooks_follow_standard_webhooks() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.script("/hook", vec![SinkResponse::status(500)]);
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let relay = TestRelay::start_with_env(
        &both_streams(&upstream, "", &everything_to(&sink, "signing_secret: ${HOOK_SECRET}")),
        &[("HOOK_SECRET", secret)],
    )
    .await;
    both_connected(&upstream).await;
    upstream.publish_event(Api::Chat, r#"{"type":"workflow_status","is_active":false}"#);
    sink.wait_for_delivered("/hook", 1, DEADLINE).await;

    let key = sse_relay::signing::SigningKey::parse(secret).unwrap();
    let attempts = sink.requests("/hook");
    assert_eq!(attempts.len(), 2);
    for attempt in &attempts {
        let id = attempt.header("webhook-id").expect("webhook-id");
        let timestamp: u64 = attempt
            .header("webhook-timestamp")
            .expect("webhook-timestamp")
            .parse()
            .unwrap();
        assert_eq!(Some(id), attempt.header("idempotency-key"));
        assert_eq!(
            attempt.header("webhook-signature"),
            Some(key.sign(id, timestamp, &attempt.body).as_str())
        );
    }
    assert_eq!(
        attempts[0].header("webhook-id"),
        attempts[1].header("webhook-id"),
        "one id across retries"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_target_keeps_each_streams_order_through_retries() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    // The third request fails twice; without ordering, later events would overtake it.
    sink.script(
        "/hook",
        vec![
            SinkResponse::status(200),
            SinkResponse::status(200),
            SinkResponse::status(503),
            SinkResponse::status(503),
        ],
    );
    let relay = TestRelay::start(&both_streams(
        &upstream,
        "",
        &everything_to(&sink, "ordered: true").replace("max_in_flight: 1", "max_in_flight: 8"),
    ))
    .await;
    both_connected(&upstream).await;
    let expected: Vec<String> = (0..30).map(|n| format!(r#"{{"eventType":"E","n":{n}}}"#)).collect();
    for data in &expected {
        upstream.publish_event(Api::Participant, data);
    }
    let delivered = sink.wait_for_delivered("/hook", expected.len(), DEADLINE).await;
    assert_eq!(crate::support::bodies(&delivered), expected);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_smooths_a_burst() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let relay = TestRelay::start(&both_streams(
        &upstream,
        "",
        &everything_to(&sink, "rate_limit: 20/s").replace("max_in_flight: 1", "max_in_flight: 8"),
    ))
    .await;
    both_connected(&upstream).await;
    for n in 0..30 {
        upstream.publish_event(Api::Participant, &format!(r#"{{"eventType":"E","n":{n}}}"#));
    }
    let delivered = sink.wait_for_delivered("/hook", 30, DEADLINE).await;
    // A burst of 20 may pass at once; the other 10 come one per 50 ms.
    let spread = delivered[29].received_at - delivered[0].received_at;
    assert!(
        spread >= Duration::from_millis(450),
        "30 requests in {spread:?} at 20/s"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_target_is_paused_and_keeps_its_deliveries() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.answer_by_default("/hook", 410);
    let relay = TestRelay::start(&both_streams(&upstream, "", &everything_to(&sink, ""))).await;
    both_connected(&upstream).await;
    for n in 0..3 {
        upstream.publish_event(Api::Chat, &format!(r#"{{"type":"update","n":{n}}}"#));
    }
    relay
        .wait_metric("sse_relay_target_state", &[("target", "hook")], 3.0)
        .await;
    relay
        .wait_metric("sse_relay_queue_depth", &[("target", "hook")], 3.0)
        .await;
    assert_eq!(sink.requests("/hook").len(), 1, "nothing more is sent to a gone target");
    assert_eq!(
        relay
            .metric("sse_relay_dead_letters_total", &[("target", "hook")])
            .await,
        0.0
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_target_is_paused_probed_and_resumed() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.answer_by_default("/hook", 503);
    let relay = TestRelay::start(&both_streams(
        &upstream,
        "",
        &everything_to(
            &sink,
            "circuit_breaker: { min_attempts: 3, open_delay: 300ms, max_open_delay: 300ms }",
        )
        .replace("initial_delay: 20ms", "initial_delay: 10ms, max_attempts: 1000"),
    ))
    .await;
    both_connected(&upstream).await;
    for n in 0..10 {
        upstream.publish_event(Api::Chat, &format!(r#"{{"type":"update","n":{n}}}"#));
    }
    relay
        .wait_metric("sse_relay_target_state", &[("target", "hook")], 1.0)
        .await;
    let when_opened = sink.requests("/hook").len();
    assert_eq!(when_opened, 3, "the breaker opens once 3 attempts, all of them, failed");
    // While open, only one probe per open_delay reaches the target.
    let probe = sink.wait_for_requests("/hook", when_opened + 1, DEADLINE).await;
    assert_eq!(probe.len(), when_opened + 1);
    assert!(probe[when_opened].received_at - probe[when_opened - 1].received_at >= Duration::from_millis(300));

    sink.answer_by_default("/hook", 200);
    let delivered = sink.wait_for_delivered("/hook", 10, DEADLINE).await;
    assert_eq!(delivered.len(), 10);
    relay
        .wait_metric("sse_relay_target_state", &[("target", "hook")], 0.0)
        .await;
    assert_eq!(relay.metric("sse_relay_target_state", &[("target", "hook")]).await, 0.0);
    relay.stop().await;
}

/// n8n answers 404 for a moment after it starts listening, before it has registered its
/// webhooks again (issue #11: one restart dead-lettered 93 of 600 events, and their replay
/// came after newer events). A backlog sent then is retried, stays in order, and nothing
/// becomes a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_answering_404_while_it_starts_loses_nothing_and_keeps_the_order() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.start_like_n8n("/hook", Duration::from_millis(500));
    let targets = everything_to(
        &sink,
        "ordered: true\n    circuit_breaker: { open_delay: 50ms, max_open_delay: 100ms }",
    )
    .replace("max_in_flight: 1", "max_in_flight: 8");
    let relay = TestRelay::start(&both_streams(&upstream, "", &targets)).await;
    both_connected(&upstream).await;
    let participant: Vec<String> = (0..40).map(|n| format!(r#"{{"eventType":"E","n":{n}}}"#)).collect();
    let chat: Vec<String> = (0..40).map(|n| format!(r#"{{"type":"update","n":{n}}}"#)).collect();
    for (participant, chat) in participant.iter().zip(&chat) {
        upstream.publish_event(Api::Participant, participant);
        upstream.publish_event(Api::Chat, chat);
    }

    let delivered = bodies(&sink.wait_for_delivered("/hook", 80, DEADLINE).await);
    assert_eq!(sink.requests("/hook")[0].status_sent, 404, "n8n was starting");
    let of_stream =
        |events: &[String]| -> Vec<String> { delivered.iter().filter(|body| events.contains(body)).cloned().collect() };
    assert_eq!(of_stream(&participant), participant);
    assert_eq!(of_stream(&chat), chat);
    assert_eq!(
        relay
            .metric("sse_relay_dead_letters_total", &[("target", "hook")])
            .await,
        0.0
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_can_retry_or_give_up_on_any_error_status() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.script("/hook", [409, 200, 404, 503].map(SinkResponse::status).to_vec());
    let targets = everything_to(&sink, "").replace(
        "max_delay: 100ms }",
        "max_delay: 100ms, retry_statuses: [409], permanent_statuses: [404, 503] }",
    );
    let relay = TestRelay::start(&both_streams(&upstream, "", &targets)).await;
    both_connected(&upstream).await;
    let dead_letters = [("target", "hook")];

    upstream.publish_event(Api::Chat, r#"{"type":"conflict_then_ok"}"#);
    sink.wait_for_delivered("/hook", 1, DEADLINE).await;
    upstream.publish_event(Api::Chat, r#"{"type":"not_found"}"#);
    relay
        .wait_metric("sse_relay_dead_letters_total", &dead_letters, 1.0)
        .await;
    upstream.publish_event(Api::Chat, r#"{"type":"unavailable"}"#);
    relay
        .wait_metric("sse_relay_dead_letters_total", &dead_letters, 2.0)
        .await;
    upstream.publish_event(Api::Chat, r#"{"type":"fine"}"#);
    sink.wait_for_delivered("/hook", 2, DEADLINE).await;

    let statuses: Vec<u16> = sink.requests("/hook").iter().map(|r| r.status_sent).collect();
    assert_eq!(statuses, [409, 200, 404, 503, 200]);
    assert_eq!(relay.metric("sse_relay_dead_letters_total", &dead_letters).await, 2.0);
    relay.stop().await;
}

/// The statuses a target lists, its circuit breaker's failure rate and window, and the old
/// name of `min_attempts`.
#[test]
fn retry_statuses_and_the_breaker_are_checked_at_their_place() {
    let config = |target_line: &str| {
        format!(
            "streams:\n  chat:\n    url: http://127.0.0.1:1/listen\ntargets:\n  n8n:\n    url: http://127.0.0.1:2/hook\n    {target_line}\n"
        )
    };
    let check = |target_line: &str, expected: &str| {
        let yaml = config(target_line);
        let err = parse_config(&yaml, &[]).expect_err(&yaml).to_string();
        assert_eq!(err, expected, "for: {target_line}");
    };
    check(
        "retry: { retry_statuses: [409, 204] }",
        "test.yaml:7:36: targets.n8n.retry.retry_statuses[1]: 204 is a success, and a 2xx answer is always delivered",
    );
    check(
        "retry: { permanent_statuses: [404, 600] }",
        "test.yaml:7:40: targets.n8n.retry.permanent_statuses[1]: `600` is not an HTTP error status (300 to 599)",
    );
    check(
        "retry: { retry_statuses: [four] }",
        "test.yaml:7:31: targets.n8n.retry.retry_statuses[0]: `four` is not an HTTP error status (300 to 599)",
    );
    check(
        "retry: { retry_statuses: [409, 404], permanent_statuses: [400, 404] }",
        "test.yaml:7:62: targets.n8n.retry.permanent_statuses: 404 is also in retry_statuses; a status is either retried or not",
    );
    check(
        "circuit_breaker: { failure_rate: 0% }",
        "test.yaml:7:38: targets.n8n.circuit_breaker.failure_rate: `0%` is not a percentage from 1% to 100%",
    );
    check(
        "circuit_breaker: { failure_rate: 101 }",
        "test.yaml:7:38: targets.n8n.circuit_breaker.failure_rate: `101` is not a percentage from 1% to 100%",
    );
    check(
        "circuit_breaker: { window: 0s }",
        "test.yaml:7:32: targets.n8n.circuit_breaker.window: must be at least 1ms, or no attempt is ever recent enough to pause the target",
    );
    check(
        "circuit_breaker: { failure_threshold: 3, min_attempts: 3 }",
        "test.yaml:7:22: targets.n8n.circuit_breaker: duplicate field `min_attempts`",
    );

    let parsed = |target_line: &str| {
        let yaml = config(target_line);
        let config = parse_config(&yaml, &[]).unwrap_or_else(|err| panic!("{err}"));
        config.targets["n8n"].clone()
    };
    let target = parsed(
        "retry: { retry_statuses: [409, \"425\"], permanent_statuses: [404] }\n    circuit_breaker: { failure_rate: 80%, window: 10s }",
    );
    let statuses = |list: &[sse_relay::config::HttpStatus]| list.iter().map(|status| status.0).collect::<Vec<_>>();
    assert_eq!(statuses(&target.retry.retry_statuses), [409, 425]);
    assert_eq!(statuses(&target.retry.permanent_statuses), [404]);
    assert_eq!(target.circuit_breaker.failure_rate.0, 80);
    assert_eq!(target.circuit_breaker.window, Duration::from_secs(10));
    assert_eq!(
        parsed("circuit_breaker: { failure_rate: 95 }")
            .circuit_breaker
            .failure_rate
            .0,
        95
    );
    // `failure_threshold` counted consecutive failures; a target failing that many in a row
    // with nothing else recent is still paused, so old configs keep working.
    assert_eq!(
        parsed("circuit_breaker: { failure_threshold: 3 }")
            .circuit_breaker
            .min_attempts
            .0,
        3
    );
}
