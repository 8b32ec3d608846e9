//! Streams: connecting, reading, classifying and routing what the emulated upstreams send.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use sse_relay_fixtures::emulator::{Api, Upstream, UpstreamOptions};
use sse_relay_fixtures::metrics::metric_value;
use sse_relay_fixtures::sink::{ReceivedRequest, Sink};

use crate::support::{
    DEADLINE, TestRelay, bodies, both_connected, both_streams, eventually, everything_to, quiet_upstream,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_event_type_wildcards_and_where() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let routes = format!(
        r#"
targets:
  zapier: {{ url: "{zapier}", max_in_flight: 1 }}
  n8n: {{ url: "{n8n}", max_in_flight: 1 }}
routes:
  - stream: participant
    events: [MESSAGE_SENT, ACTION_PLAN_CARD*]
    targets: [zapier]
  - stream: chat
    events: [workflow_update]
    where: {{ /node_execution/status: completed }}
    targets: [n8n]
  - stream: "*"
    events: [CHAT_SESSION_MEMBER_*, workflow_status, MARKER]
    targets: [n8n, zapier]
"#,
        zapier = sink.url("/zapier"),
        n8n = sink.url("/n8n"),
    );
    let relay = TestRelay::start(&both_streams(&upstream, "", &routes)).await;
    both_connected(&upstream).await;

    let message_sent = r#"{"eventType": "MESSAGE_SENT", "payload": {"id": "m1", "text": "hi"}}"#;
    let cards_added = r#"{"eventType":"ACTION_PLAN_CARDS_ADDED","payload":[{"id":"c1"},{"id":"c2"}]}"#;
    let extra_value = r#"{"eventType":"PARTICIPANT_EXTRA_VALUE_CHANGED","payload":{"id":"3"}}"#;
    let member_joined = r#"{"eventType":"CHAT_SESSION_MEMBER_JOINED","payload":{"sessionId":"s1"}}"#;
    let node_completed =
        r#"{"workflow_request":{"id":"w1","status":"in_progress"},"node_execution":{"id":"n1","status":"completed"}}"#;
    let node_running = r#"{"workflow_request":{"id":"w2"},"node_execution":{"id":"n2","status":"in_progress"}}"#;
    let workflow_status = r#"{"is_active":false,"type":"workflow_status"}"#;
    let participant_marker = r#"{"eventType":"MARKER"}"#;
    let chat_marker = r#"{"type":"MARKER"}"#;
    for data in [
        message_sent,
        cards_added,
        extra_value,
        member_joined,
        participant_marker,
    ] {
        assert_eq!(upstream.publish_event(Api::Participant, data), 1);
    }
    for data in [node_completed, node_running, workflow_status, chat_marker] {
        assert_eq!(upstream.publish_event(Api::Chat, data), 1);
    }

    // Each stream's marker comes last on its stream, and each target has one worker, so by
    // the time both markers arrived, anything wrongly routed would have arrived too.
    let has_markers = |requests: &[ReceivedRequest]| {
        let bodies = bodies(requests);
        bodies.iter().any(|b| b == participant_marker) && bodies.iter().any(|b| b == chat_marker)
    };
    for path in ["/zapier", "/n8n"] {
        eventually(&format!("both markers at {path}"), DEADLINE, || async {
            has_markers(&sink.delivered(path))
        })
        .await;
    }
    let set = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<String>>();
    let zapier = sink.delivered("/zapier");
    assert_eq!(
        bodies(&zapier).into_iter().collect::<BTreeSet<_>>(),
        set(&[
            message_sent,
            cards_added,
            member_joined,
            workflow_status,
            participant_marker,
            chat_marker
        ])
    );
    assert_eq!(
        zapier.len(),
        6,
        "each event reaches a target once: {:?}",
        bodies(&zapier)
    );
    let n8n = sink.delivered("/n8n");
    assert_eq!(
        bodies(&n8n).into_iter().collect::<BTreeSet<_>>(),
        set(&[
            member_joined,
            node_completed,
            workflow_status,
            participant_marker,
            chat_marker
        ])
    );
    assert_eq!(n8n.len(), 5, "each event reaches a target once: {:?}", bodies(&n8n));

    let first = zapier.iter().find(|r| r.body == message_sent.as_bytes()).unwrap();
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert_eq!(first.header("x-relay-stream"), Some("participant"));
    assert_eq!(first.header("x-relay-event-type"), Some("MESSAGE_SENT"));
    assert_eq!(first.header("idempotency-key").map(str::len), Some(36));

    let metrics = relay.get("/metrics").await.1;
    let count = |name: &str, labels: &[(&str, &str)]| metric_value(&metrics, name, labels);
    assert_eq!(
        count("sse_relay_events_received_total", &[("stream", "participant")]),
        5.0
    );
    assert_eq!(
        count(
            "sse_relay_events_received_total",
            &[("stream", "participant"), ("event_type", "ACTION_PLAN_CARD*")]
        ),
        1.0
    );
    assert_eq!(
        count(
            "sse_relay_events_received_total",
            &[("stream", "participant"), ("event_type", "other")]
        ),
        1.0,
        "an event type no route names is counted as other"
    );
    assert_eq!(
        count("sse_relay_events_unrouted_total", &[("stream", "participant")]),
        1.0
    );
    assert_eq!(count("sse_relay_events_unrouted_total", &[("stream", "chat")]), 1.0);
    assert_eq!(
        count(
            "sse_relay_deliveries_total",
            &[("target", "zapier"), ("outcome", "delivered")]
        ),
        6.0
    );
    assert_eq!(count("sse_relay_stream_connected", &[("stream", "chat")]), 1.0);
    for name in [
        "sse_relay_stream_reconnects_total",
        "sse_relay_keepalives_total",
        "sse_relay_delivery_duration_seconds_bucket",
        "sse_relay_queue_depth",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    assert_eq!(relay.get("/healthz").await.0, 200);
    assert_eq!(relay.get("/readyz").await.0, 200);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_are_counted_and_never_delivered() {
    let upstream = Upstream::start(UpstreamOptions {
        participant_keepalive: Duration::from_millis(30),
        chat_keepalive: Duration::from_millis(30),
        ..UpstreamOptions::default()
    })
    .await
    .unwrap();
    let sink = Sink::start().await.unwrap();
    let relay = TestRelay::start(&both_streams(&upstream, "", &everything_to(&sink, ""))).await;
    relay
        .wait_metric("sse_relay_keepalives_total", &[("stream", "participant")], 3.0)
        .await;
    relay
        .wait_metric("sse_relay_keepalives_total", &[("stream", "chat")], 3.0)
        .await;

    upstream.publish_event(Api::Participant, r#"{"eventType":"MESSAGE_SENT"}"#);
    upstream.publish_event(Api::Chat, r#"{"type":"workflow_status"}"#);
    let delivered = sink.wait_for_delivered("/hook", 2, DEADLINE).await;
    assert_eq!(delivered.len(), 2);
    // More keepalives after the events: still only the two events at the sink.
    let keepalives = relay.metric("sse_relay_keepalives_total", &[("stream", "chat")]).await;
    relay
        .wait_metric("sse_relay_keepalives_total", &[("stream", "chat")], keepalives + 3.0)
        .await;
    assert_eq!(sink.requests("/hook").len(), 2, "{:?}", bodies(&sink.requests("/hook")));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_closed_by_the_server_every_few_hundred_ms_loses_nothing() {
    let upstream = Upstream::start(UpstreamOptions {
        chat_max_connection_age: Duration::from_millis(400),
        chat_keepalive: Duration::from_millis(100),
        participant_keepalive: Duration::from_secs(3600),
        hold_while_disconnected: true,
        ..UpstreamOptions::default()
    })
    .await
    .unwrap();
    let sink = Sink::start().await.unwrap();
    let relay = TestRelay::start(&both_streams(&upstream, "", &everything_to(&sink, ""))).await;
    both_connected(&upstream).await;

    let n_events = 120;
    let expected: Vec<String> = (0..n_events)
        .map(|index| format!(r#"{{"workflow_request":{{"id":"w{index}"}}}}"#))
        .collect();
    for data in &expected {
        upstream.publish_event(Api::Chat, data);
        // Spread the events over several connection lifetimes; this paces, it does not wait.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let delivered = sink.wait_for_delivered("/hook", n_events, DEADLINE).await;
    assert_eq!(bodies(&delivered), expected, "every event once, in order");
    assert!(
        upstream.connections_accepted(Api::Chat) >= 4,
        "the server closed the stream several times"
    );
    let closes = relay
        .metric(
            "sse_relay_stream_reconnects_total",
            &[("stream", "chat"), ("reason", "closed")],
        )
        .await;
    assert!(closes >= 3.0, "clean closes are counted: {closes}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_auth_headers_and_handles_401() {
    let upstream = Upstream::start(UpstreamOptions {
        bearer_token: Some("good-token".to_owned()),
        api_key: Some("good-key".to_owned()),
        ..quiet_upstream()
    })
    .await
    .unwrap();
    let sink = Sink::start().await.unwrap();
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
streams:
  good:
    url: {good_url}
    headers:
      Authorization: Bearer ${{TOKEN}}
      X-API-Key: ${{API_KEY}}
    event_type: [/eventType]
  bad:
    url: {bad_url}
    headers: {{ Authorization: "Bearer wrong", X-API-Key: "${{API_KEY}}" }}
    reconnect: {{ auth_failure_delay: 100ms }}
{targets}
"#,
        good_url = upstream.participant_url("good"),
        bad_url = upstream.participant_url("bad"),
        targets = everything_to(&sink, ""),
    );
    let relay = TestRelay::start_with_env(&yaml, &[("TOKEN", "good-token"), ("API_KEY", "good-key")]).await;
    relay
        .wait_metric("sse_relay_stream_connected", &[("stream", "good")], 1.0)
        .await;
    relay
        .wait_metric(
            "sse_relay_stream_reconnects_total",
            &[("stream", "bad"), ("reason", "auth_failed")],
            2.0,
        )
        .await;

    let seen = upstream.requests_seen(Api::Participant);
    let good = seen
        .iter()
        .find(|r| r.path.contains("/good/"))
        .expect("the good stream connected");
    assert_eq!(good.header("authorization"), Some("Bearer good-token"));
    assert_eq!(good.header("x-api-key"), Some("good-key"));
    assert_eq!(good.header("accept"), Some("text/event-stream"));

    let (status, body) = relay.get("/readyz").await;
    assert_eq!((status, body.as_str()), (503, "stream bad is not connected\n"));

    upstream.publish_event(Api::Participant, r#"{"eventType":"MESSAGE_SENT"}"#);
    assert_eq!(sink.wait_for_delivered("/hook", 1, DEADLINE).await.len(), 1);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_back_off_then_recover() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    upstream.fail_next(Api::Chat, 500, 2);
    let sink = Sink::start().await.unwrap();
    let relay = TestRelay::start(&both_streams(
        &upstream,
        "reconnect: { initial_delay: 50ms, max_delay: 200ms }",
        &everything_to(&sink, ""),
    ))
    .await;
    both_connected(&upstream).await;
    let http_errors = relay
        .metric(
            "sse_relay_stream_reconnects_total",
            &[("stream", "chat"), ("reason", "http_error")],
        )
        .await;
    assert_eq!(http_errors, 2.0);
    upstream.publish_event(Api::Chat, r#"{"type":"workflow_status"}"#);
    assert_eq!(sink.wait_for_delivered("/hook", 1, DEADLINE).await.len(), 1);
    relay.stop().await;
}

/// A 429 or 503 with `Retry-After` is obeyed, however short the configured backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_retry_after_is_honoured() {
    for status in [429, 503] {
        let upstream = Upstream::start(quiet_upstream()).await.unwrap();
        upstream.fail_next_with_retry_after(Api::Chat, status, 1, Duration::from_secs(2));
        let sink = Sink::start().await.unwrap();
        let started = Instant::now();
        let relay = TestRelay::start(&both_streams(
            &upstream,
            "reconnect: { initial_delay: 20ms, max_delay: 100ms }",
            &everything_to(&sink, ""),
        ))
        .await;
        assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(2),
            "{status}: reconnected after {waited:?}"
        );
        assert_eq!(upstream.requests_seen(Api::Chat).len(), 2, "{status}");
        relay.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_closes_at_once_is_not_hammered() {
    let upstream = Upstream::start(UpstreamOptions {
        chat_max_connection_age: Duration::ZERO,
        ..quiet_upstream()
    })
    .await
    .unwrap();
    let sink = Sink::start().await.unwrap();
    let started = Instant::now();
    let relay = TestRelay::start(&both_streams(
        &upstream,
        "reconnect: { initial_delay: 100ms, max_delay: 400ms }",
        &everything_to(&sink, ""),
    ))
    .await;
    assert!(upstream.wait_for_connections_accepted(Api::Chat, 5, DEADLINE).await);
    // Four waits between five connections: at least 100 + 200 + 400 + 400 ms (jitter only adds).
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1100),
        "reconnected too fast: 5 connections in {elapsed:?}"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stream_is_dropped_after_idle_timeout() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let relay = TestRelay::start(&both_streams(
        &upstream,
        "idle_timeout: 300ms",
        &everything_to(&sink, ""),
    ))
    .await;
    relay
        .wait_metric(
            "sse_relay_stream_reconnects_total",
            &[("stream", "chat"), ("reason", "idle_timeout")],
            2.0,
        )
        .await;
    assert!(upstream.wait_for_connections_accepted(Api::Chat, 3, DEADLINE).await);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_is_sent_on_reconnect() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let relay = TestRelay::start(&both_streams(&upstream, "", &everything_to(&sink, ""))).await;
    both_connected(&upstream).await;
    upstream.publish(
        Api::Participant,
        "id: evt-41\ndata: {\"eventType\":\"MESSAGE_SENT\"}\n\n",
    );
    sink.wait_for_delivered("/hook", 1, DEADLINE).await;
    upstream.close_all(Api::Participant);
    assert!(
        upstream
            .wait_for_connections_accepted(Api::Participant, 2, DEADLINE)
            .await
    );
    let seen = upstream.requests_seen(Api::Participant);
    assert_eq!(seen.first().unwrap().header("last-event-id"), None);
    assert_eq!(seen.last().unwrap().header("last-event-id"), Some("evt-41"));
    relay.stop().await;
}

/// An id too long for a request head, or not ASCII, is delivered with its event but never sent
/// back as `Last-Event-ID` nor stored: the stream resumes from the last id it could use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_event_id_does_not_wedge_the_stream() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let relay = TestRelay::start(&both_streams(&upstream, "", &everything_to(&sink, ""))).await;
    both_connected(&upstream).await;
    upstream.publish(Api::Participant, "id: evt-1\ndata: {\"eventType\":\"A\"}\n\n");
    let huge_id = "x".repeat(100 * 1024);
    upstream.publish(
        Api::Participant,
        format!("id: {huge_id}\ndata: {{\"eventType\":\"B\"}}\n\n"),
    );
    // Not ASCII: a header could carry it only as obs-text, which servers may refuse.
    upstream.publish(Api::Participant, "id: évt-2\ndata: {\"eventType\":\"B\"}\n\n");
    sink.wait_for_delivered("/hook", 3, DEADLINE).await;
    relay
        .wait_metric(
            "sse_relay_upstream_errors_total",
            &[("stream", "participant"), ("kind", "invalid_id")],
            2.0,
        )
        .await;
    upstream.close_all(Api::Participant);
    assert!(
        upstream
            .wait_for_connections_accepted(Api::Participant, 2, DEADLINE)
            .await
    );
    let seen = upstream.requests_seen(Api::Participant);
    assert_eq!(seen.last().unwrap().header("last-event-id"), Some("evt-1"));
    // And the stream works on the new connection.
    assert!(upstream.wait_for_clients(Api::Participant, 1, DEADLINE).await);
    upstream.publish(Api::Participant, "id: evt-3\ndata: {\"eventType\":\"C\"}\n\n");
    sink.wait_for_delivered("/hook", 4, DEADLINE).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upstream_input_is_counted_and_the_stream_survives() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let relay = TestRelay::start(&both_streams(
        &upstream,
        "max_event_bytes: 200",
        &everything_to(&sink, ""),
    ))
    .await;
    both_connected(&upstream).await;

    upstream.publish(Api::Participant, &b"data: {\"eventType\":\"BAD_\xff\"}\n\n"[..]);
    upstream.publish(
        Api::Participant,
        format!("data: {{\"eventType\":\"BIG\",\"x\":\"{}\"}}\n\n", "y".repeat(300)),
    );
    upstream.publish(Api::Participant, format!("data: {}\n\n", "z".repeat(150)));
    upstream.publish(
        Api::Participant,
        format!("data: {}\ndata: {}\n\n", "z".repeat(150), "z".repeat(150)),
    );
    upstream.publish(Api::Participant, "data: {\"eventType\":\n\n");
    upstream.publish(Api::Participant, "\n\n\n\n\n\n");
    upstream.publish_event(Api::Participant, r#"{"eventType":"GOOD"}"#);

    let delivered = sink.wait_for_delivered("/hook", 4, DEADLINE).await;
    let bodies = bodies(&delivered);
    assert_eq!(
        bodies,
        vec![
            "{\"eventType\":\"BAD_\u{fffd}\"}".to_owned(),
            "z".repeat(150),
            "{\"eventType\":".to_owned(),
            r#"{"eventType":"GOOD"}"#.to_owned()
        ]
    );
    assert_eq!(delivered[2].header("content-type"), Some("text/plain; charset=utf-8"));
    let count = |labels: &'static [(&'static str, &'static str)], name: &'static str| relay.metric(name, labels);
    assert_eq!(
        count(&[("kind", "invalid_utf8")], "sse_relay_upstream_errors_total").await,
        1.0
    );
    assert_eq!(
        count(&[("kind", "invalid_json")], "sse_relay_upstream_errors_total").await,
        1.0
    );
    assert_eq!(
        count(&[("reason", "too_large")], "sse_relay_events_dropped_total").await,
        2.0
    );
    assert_eq!(
        count(&[("stream", "participant")], "sse_relay_stream_reconnects_total").await,
        0.0
    );
    assert_eq!(
        upstream.connections_accepted(Api::Participant),
        1,
        "the connection survived"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_token_guards_metrics_but_not_health() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let yaml = both_streams(&upstream, "", &everything_to(&sink, "")).replace(
        "admin: { listen: \"127.0.0.1:0\" }",
        "admin: { listen: \"127.0.0.1:0\", token: \"${ADMIN_TOKEN}\" }",
    );
    let relay = TestRelay::start_with_env(&yaml, &[("ADMIN_TOKEN", "admin-0007")]).await;
    let metrics_url = format!("http://{}/metrics", relay.admin);
    let client = reqwest::Client::new();
    let without = client.get(&metrics_url).send().await.unwrap();
    assert_eq!(without.status(), 401);
    let wrong = client.get(&metrics_url).bearer_auth("admin-0008").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let with = client.get(&metrics_url).bearer_auth("admin-0007").send().await.unwrap();
    assert_eq!(with.status(), 200);
    assert!(with.text().await.unwrap().contains("sse_relay_build_info"));
    assert_eq!(relay.get("/healthz").await.0, 200);
    relay.stop().await;
}
