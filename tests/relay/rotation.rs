//! Make-before-break rotation: a stream opens its next connection before the server closes the
//! current one, so that an upstream without history (Redis PubSub behind it) loses nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sse_relay_fixtures::emulator::{Api, Upstream, UpstreamOptions};
use sse_relay_fixtures::sink::Sink;

use crate::support::{DEADLINE, TestRelay, bodies, both_connected, both_streams, eventually};

/// Two hooks, one per stream, so that each stream's deliveries can be checked on their own.
fn hook_per_stream(sink: &Sink) -> String {
    format!(
        r#"
targets:
  participant-hook:
    url: {participant}
    retry: {{ initial_delay: 20ms, max_delay: 100ms }}
  chat-hook:
    url: {chat}
    retry: {{ initial_delay: 20ms, max_delay: 100ms }}
routes:
  - stream: participant
    targets: [participant-hook]
  - stream: chat
    targets: [chat-hook]
"#,
        participant = sink.url("/participant"),
        chat = sink.url("/chat"),
    )
}

/// The first few bodies delivered more than once, or expected and never delivered, and how many
/// such bodies there are in all.
fn delivery_mismatches(expected: &[String], delivered: &[String]) -> (Vec<(String, usize)>, usize) {
    let mut counts: BTreeMap<&str, usize> = expected.iter().map(|body| (body.as_str(), 0)).collect();
    for body in delivered {
        *counts.entry(body.as_str()).or_default() += 1;
    }
    let mismatches: Vec<(String, usize)> = counts
        .into_iter()
        .filter(|(_, count)| *count != 1)
        .map(|(body, count)| (body.to_owned(), count))
        .collect();
    let n_mismatches = mismatches.len();
    (mismatches.into_iter().take(5).collect(), n_mismatches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_loses_nothing_and_delivers_once_while_the_server_closes_every_connection() {
    // Both APIs close every connection at 1.5 s and keep no history: a frame published while
    // no connection is open is lost, as with the real chat API.
    let upstream = Upstream::start(UpstreamOptions {
        chat_max_connection_age: Duration::from_millis(1500),
        participant_max_connection_age: Some(Duration::from_millis(1500)),
        chat_keepalive: Duration::from_millis(100),
        participant_keepalive: Duration::from_millis(100),
        ..UpstreamOptions::default()
    })
    .await
    .unwrap();
    let sink = Sink::start().await.unwrap();
    let relay = TestRelay::start(&both_streams(&upstream, "rotate_after: 800ms", &hook_per_stream(&sink))).await;
    both_connected(&upstream).await;

    // Events go out every 2 ms, through at least four rotations, including the instants at
    // which connections open and close. Some participant events carry SSE ids (duplicates are
    // recognised by id), the chat events do not (recognised by type and data).
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn({
        let upstream = upstream.clone();
        let stop_publishing = Arc::clone(&stop_publishing);
        async move {
            let mut published = Vec::new();
            let mut n_unheard = 0;
            let mut index = 0;
            while !stop_publishing.load(Ordering::Relaxed) {
                let participant = format!(r#"{{"eventType":"MESSAGE_SENT","payload":{{"n":{index}}}}}"#);
                let chat = format!(r#"{{"type":"node_update","n":{index}}}"#);
                // Only every third event has an id; the parser gives the others the last id
                // their connection saw, which differs between the two connections.
                let participant_frame = if index % 3 == 0 {
                    format!("id: {index}\ndata: {participant}\n\n")
                } else {
                    format!("data: {participant}\n\n")
                };
                if upstream.publish(Api::Participant, participant_frame) == 0 {
                    n_unheard += 1;
                }
                if upstream.publish_event(Api::Chat, &chat) == 0 {
                    n_unheard += 1;
                }
                published.push((participant, chat));
                index += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (published, n_unheard)
        }
    });
    let rotations = |stream: &'static str| {
        let relay = &relay;
        async move {
            relay
                .metric(
                    "sse_relay_stream_rotations_total",
                    &[("stream", stream), ("result", "completed")],
                )
                .await
        }
    };
    eventually("four rotations of each stream", Duration::from_secs(30), || async {
        rotations("participant").await >= 4.0 && rotations("chat").await >= 4.0
    })
    .await;
    stop_publishing.store(true, Ordering::Relaxed);
    let (published, n_unheard) = publisher.await.unwrap();
    assert_eq!(
        n_unheard, 0,
        "an event was published while the stream had no connection open"
    );

    let (expected_participant, expected_chat): (Vec<String>, Vec<String>) = published.into_iter().unzip();
    let participant = sink
        .wait_for_delivered("/participant", expected_participant.len(), DEADLINE)
        .await;
    let chat = sink.wait_for_delivered("/chat", expected_chat.len(), DEADLINE).await;
    // Copies of the last events, if any were let through, would still be arriving.
    eventually("the queues to drain", DEADLINE, || async {
        relay.metric("sse_relay_queue_depth", &[]).await == 0.0
    })
    .await;
    assert_eq!(
        delivery_mismatches(&expected_participant, &bodies(&sink.requests("/participant"))),
        (vec![], 0),
        "participant events, a third with ids: each delivered exactly once ({} delivered)",
        participant.len()
    );
    assert_eq!(
        delivery_mismatches(&expected_chat, &bodies(&sink.requests("/chat"))),
        (vec![], 0),
        "chat events without ids: each delivered exactly once ({} delivered)",
        chat.len()
    );

    for stream in ["participant", "chat"] {
        let suppressed = relay
            .metric("sse_relay_duplicates_suppressed_total", &[("stream", stream)])
            .await;
        assert!(
            suppressed > 0.0,
            "{stream}: the connections overlapped, so copies were seen and suppressed"
        );
        // The relay closed each old connection itself, before the server's 1.5 s.
        let closed_by_server = relay
            .metric(
                "sse_relay_stream_reconnects_total",
                &[("stream", stream), ("reason", "closed")],
            )
            .await;
        assert_eq!(
            closed_by_server, 0.0,
            "{stream}: no connection lived to the server's close"
        );
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_a_second_connection_makes_the_stream_reconnect_instead() {
    let upstream = Upstream::start(UpstreamOptions {
        one_connection_at_a_time: true,
        chat_max_connection_age: Duration::from_millis(1000),
        chat_keepalive: Duration::from_millis(100),
        participant_keepalive: Duration::from_secs(3600),
        ..UpstreamOptions::default()
    })
    .await
    .unwrap();
    let sink = Sink::start().await.unwrap();
    let relay = TestRelay::start(&both_streams(&upstream, "rotate_after: 600ms", &hook_per_stream(&sink))).await;
    both_connected(&upstream).await;

    relay
        .wait_metric(
            "sse_relay_stream_rotations_total",
            &[("stream", "chat"), ("result", "refused")],
            1.0,
        )
        .await;
    // Each connection stays until the server closes it, and the stream reconnects at once after
    // each close; rotation is tried again once per connection, at its `rotate_after` age.
    assert!(
        upstream.wait_for_connections_accepted(Api::Chat, 4, DEADLINE).await,
        "the stream reconnects after each close"
    );
    let refusals = [("stream", "chat"), ("result", "refused")];
    relay
        .wait_metric("sse_relay_stream_rotations_total", &refusals, 3.0)
        .await;
    let n_refused = upstream.requests_seen(Api::Chat).len() as u64 - upstream.connections_accepted(Api::Chat);
    let n_counted = relay.metric("sse_relay_stream_rotations_total", &refusals).await as u64;
    assert!(
        n_counted.abs_diff(n_refused) <= 1,
        "one refused request per connection: {n_refused} refused, {n_counted} counted"
    );
    assert!(
        n_refused <= upstream.connections_accepted(Api::Chat),
        "at most one try per connection: {n_refused} refused"
    );

    // The server allows two connections again: rotation resumes.
    upstream.set_one_connection_at_a_time(Api::Chat, false);
    relay
        .wait_metric(
            "sse_relay_stream_rotations_total",
            &[("stream", "chat"), ("result", "completed")],
            1.0,
        )
        .await;

    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);
    upstream.publish_event(Api::Chat, r#"{"type":"workflow_status","is_active":true}"#);
    let delivered = sink.wait_for_delivered("/chat", 1, DEADLINE).await;
    assert_eq!(bodies(&delivered), [r#"{"type":"workflow_status","is_active":true}"#]);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_close_still_reconnects_at_once_when_rotation_is_on() {
    let upstream = Upstream::start(UpstreamOptions {
        participant_keepalive: Duration::from_secs(3600),
        chat_keepalive: Duration::from_millis(100),
        ..UpstreamOptions::default()
    })
    .await
    .unwrap();
    let sink = Sink::start().await.unwrap();
    let relay = TestRelay::start(&both_streams(&upstream, "rotate_after: 29m", &hook_per_stream(&sink))).await;
    both_connected(&upstream).await;
    // Wait for a keepalive, so that the connection counts as healthy when it closes.
    relay
        .wait_metric("sse_relay_keepalives_total", &[("stream", "chat")], 1.0)
        .await;

    upstream.close_all(Api::Chat);
    assert!(upstream.wait_for_connections_accepted(Api::Chat, 2, DEADLINE).await);
    relay
        .wait_metric(
            "sse_relay_stream_reconnects_total",
            &[("stream", "chat"), ("reason", "closed")],
            1.0,
        )
        .await;
    let spans = upstream.connection_spans(Api::Chat);
    let gap = spans[1].accepted_at - spans[0].closed_at.expect("the first connection closed");
    assert!(
        gap < Duration::from_secs(1),
        "reconnected without a backoff delay: {gap:?}"
    );
    assert_eq!(
        relay
            .metric("sse_relay_stream_rotations_total", &[("stream", "chat")])
            .await,
        0.0
    );
    relay.stop().await;
}
