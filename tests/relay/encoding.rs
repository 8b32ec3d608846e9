//! Text and bytes the relay cannot pass on as they are: event types that an HTTP header cannot
//! carry, and upstream bodies in an encoding the relay does not decode.

use sse_relay_fixtures::emulator::{Api, Upstream, UpstreamOptions};
use sse_relay_fixtures::sink::Sink;

use crate::support::{
    DEADLINE, LoggedRelay, TestRelay, both_connected, both_streams, eventually, everything_to, quiet_upstream,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_type_a_header_cannot_carry_is_sent_percent_encoded() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let relay = TestRelay::start(&both_streams(&upstream, "", &everything_to(&sink, ""))).await;
    both_connected(&upstream).await;
    let cases = [
        (r#"{"eventType":"MESSAGE_SENT"}"#, "MESSAGE_SENT"),
        (r#"{"eventType":"MESSAGE\nSENT\u0001\u007f"}"#, "MESSAGE%0ASENT%01%7F"),
        (r#"{"eventType":"größe"}"#, "gr%C3%B6%C3%9Fe"),
        (r#"{"eventType":"50%"}"#, "50%25"),
    ];
    for (data, _) in cases {
        upstream.publish_event(Api::Participant, data);
    }
    let delivered = sink.wait_for_delivered("/hook", cases.len(), DEADLINE).await;
    assert_eq!(delivered.len(), cases.len());
    for (request, (data, expected)) in delivered.iter().zip(cases) {
        assert_eq!(&request.body[..], data.as_bytes());
        assert_eq!(request.header("x-relay-event-type"), Some(expected), "{data}");
        assert_eq!(request.header("x-relay-stream"), Some("participant"));
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_encoded_stream_is_refused_with_an_error_naming_the_stream() {
    let upstream = Upstream::start(UpstreamOptions {
        gzip: true,
        ..quiet_upstream()
    })
    .await
    .unwrap();
    let sink = Sink::start().await.unwrap();
    let yaml = format!(
        r#"
streams:
  chat:
    url: {chat}
    event_type: [/type]
    keepalive: [keepalive]
    reconnect: {{ initial_delay: 50ms, max_delay: 200ms }}
targets:
  hook: {{ url: "{hook}" }}
routes:
  - stream: chat
    targets: [hook]
"#,
        chat = upstream.chat_url("3f1c"),
        hook = sink.url("/hook"),
    );
    let relay = LoggedRelay::start(&yaml, &[]).await;
    let refused = relay
        .wait_for_log("stream chat: the server sent its body with Content-Encoding gzip")
        .await;
    assert!(refused.contains("\"reason\":\"connect_error\""), "{refused}");
    let requests = upstream.requests_seen(Api::Chat);
    assert_eq!(requests[0].header("accept-encoding"), Some("identity"));
    let labels = [("stream", "chat"), ("reason", "connect_error")];
    eventually("the refusals counted", DEADLINE, || async {
        relay.metric("sse_relay_stream_reconnects_total", &labels).await >= 2.0
    })
    .await;
    let (status, problems) = relay.get("/readyz").await;
    assert_eq!((status, problems.as_str()), (503, "stream chat is not connected\n"));
}
