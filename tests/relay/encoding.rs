//! Text and bytes the relay cannot pass on as they are: event types that an HTTP header cannot
//! carry, and upstream bodies in an encoding the relay does not decode.

use sse_relay::emulator::{Api, Upstream};
use sse_relay::sink::Sink;

use crate::support::{DEADLINE, TestRelay, both_connected, both_streams, everything_to, quiet_upstream};

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
