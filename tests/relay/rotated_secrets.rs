//! Secrets read from files that an agent outside the relay rotates: after a 401 or 403, a
//! stream's next connection and a target's attempt use what the file holds now, without a
//! reload.

use sse_relay_fixtures::emulator::{Api, Upstream, UpstreamOptions};
use sse_relay_fixtures::sink::Sink;

use crate::support::{DEADLINE, LoggedRelay, TestRelay, eventually, quiet_upstream};

#[tokio::test]
async fn a_stream_reads_its_token_file_again_after_a_401_and_connects_once_it_was_rotated() {
    let directory = tempfile::tempdir().unwrap();
    let token_file = directory.path().join("token");
    std::fs::write(&token_file, "wrong-token\n").unwrap();
    let upstream = Upstream::start(UpstreamOptions {
        bearer_token: Some("right-token".to_owned()),
        ..quiet_upstream()
    })
    .await
    .unwrap();
    let sink = Sink::start().await.unwrap();
    let yaml = format!(
        r#"
streams:
  chat:
    url: {url}
    headers: {{ Authorization: "Bearer ${{file:{token}}}" }}
    event_type: [/type]
    reconnect: {{ initial_delay: 50ms, max_delay: 200ms, auth_failure_delay: 50ms }}
targets:
  hook: {{ url: {hook} }}
routes:
  - stream: chat
    targets: [hook]
"#,
        url = upstream.chat_url("3f1c"),
        token = token_file.display(),
        hook = sink.url("/hook"),
    );
    let relay = LoggedRelay::start(&yaml, &[]).await;
    relay.wait_for_log("stream authentication failed").await;

    // A file that cannot be read keeps the old value; that is logged once, naming the file.
    std::fs::remove_file(&token_file).unwrap();
    let line = relay.wait_for_log("cannot make a header again").await;
    assert!(line.contains(&token_file.display().to_string()), "{line}");
    let n_refused = upstream.requests_seen(Api::Chat).len();
    eventually("three more refused connections", DEADLINE, || async {
        upstream.requests_seen(Api::Chat).len() >= n_refused + 3
    })
    .await;
    let n_lines = |text: &str| relay.log_lines().iter().filter(|line| line.contains(text)).count();
    assert_eq!(
        n_lines("cannot make a header again"),
        1,
        "logged once while it stays unreadable"
    );

    std::fs::write(&token_file, "right-token\n").unwrap();
    assert!(
        upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await,
        "the stream connects with the rotated token"
    );
    let seen = upstream.requests_seen(Api::Chat);
    assert_eq!(seen.last().unwrap().header("authorization"), Some("Bearer right-token"));
    let line = relay.wait_for_log("a header's secret file changed").await;
    assert!(
        line.contains("\"header\":\"Authorization\"") && line.contains(&token_file.display().to_string()),
        "{line}"
    );
    upstream.publish_event(Api::Chat, r#"{"type":"workflow_update","n":1}"#);
    assert_eq!(sink.wait_for_delivered("/hook", 1, DEADLINE).await.len(), 1);
    assert!(
        !relay
            .log_lines()
            .iter()
            .any(|line| line.contains("right-token") || line.contains("wrong-token")),
        "no token is logged"
    );
}

#[tokio::test]
async fn a_target_resends_once_with_its_token_file_read_again_after_a_401() {
    let directory = tempfile::tempdir().unwrap();
    let token_file = directory.path().join("token");
    std::fs::write(&token_file, "wrong-token\n").unwrap();
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.require_header("/hook", "authorization", "Bearer right-token");
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
streams:
  chat:
    url: {url}
    event_type: [/type]
targets:
  hook:
    url: {hook}
    headers: {{ Authorization: "Bearer ${{file:{token}}}" }}
    max_in_flight: 1
routes:
  - stream: chat
    targets: [hook]
"#,
        url = upstream.chat_url("3f1c"),
        token = token_file.display(),
        hook = sink.url("/hook"),
    );
    let relay = TestRelay::start(&yaml).await;
    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);
    let authorizations = || {
        sink.requests("/hook")
            .iter()
            .map(|request| {
                (
                    request.header("authorization").unwrap_or("").to_owned(),
                    request.status_sent,
                )
            })
            .collect::<Vec<_>>()
    };
    let pair = |token: &str, status: u16| (format!("Bearer {token}"), status);

    // Rotated after the relay read it: the first request is refused, the second carries it.
    std::fs::write(&token_file, "right-token\n").unwrap();
    upstream.publish_event(Api::Chat, r#"{"type":"workflow_update","n":1}"#);
    sink.wait_for_delivered("/hook", 1, DEADLINE).await;
    assert_eq!(authorizations(), [pair("wrong-token", 401), pair("right-token", 200)]);

    // The file is not read for every request: a change alone is not seen...
    std::fs::write(&token_file, "next-token\n").unwrap();
    upstream.publish_event(Api::Chat, r#"{"type":"workflow_update","n":2}"#);
    sink.wait_for_delivered("/hook", 2, DEADLINE).await;
    assert_eq!(authorizations()[2..], [pair("right-token", 200)]);
    // ... until the target refuses the old token.
    sink.require_header("/hook", "authorization", "Bearer next-token");
    upstream.publish_event(Api::Chat, r#"{"type":"workflow_update","n":3}"#);
    sink.wait_for_delivered("/hook", 3, DEADLINE).await;
    assert_eq!(
        authorizations()[3..],
        [pair("right-token", 401), pair("next-token", 200)]
    );

    // A 401 that a new read of the file does not change stays a permanent failure: one request,
    // then a dead letter.
    sink.require_header("/hook", "authorization", "Bearer revoked");
    upstream.publish_event(Api::Chat, r#"{"type":"workflow_update","n":4}"#);
    relay
        .wait_metric("sse_relay_dead_letters_total", &[("target", "hook")], 1.0)
        .await;
    assert_eq!(authorizations()[5..], [pair("next-token", 401)]);
    relay.stop().await;
}
