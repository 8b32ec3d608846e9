//! Stream templates: one stream per participant or chat, from `ids` and `ids_file`; routes by
//! template and by instance pattern; `stop_when` and `ttl` ending an instance.

use sse_relay_fixtures::emulator::{Api, Upstream};
use sse_relay_fixtures::sink::Sink;

use crate::support::{DEADLINE, TestRelay, eventually, parse_config, quiet_upstream};

/// For a relay in this process: the admin server on an ephemeral port.
const IN_PROCESS: &str = "admin: { listen: \"127.0.0.1:0\" }\nshutdown: { grace_period: 2s }\n";

/// Participants from `ids` and from an ids file, every event to `/all`; the participants whose
/// ids start with 4 also to `/forties`.
fn participants(upstream: &Upstream, sink: &Sink, ids_file: &std::path::Path) -> String {
    format!(
        r#"
streams:
  participant:
    url: {url}
    headers: {{ X-Participant: "user-{{id}}" }}
    event_type: [/eventType]
    keepalive: [KEEP_ALIVE]
    ids: ["40", "51"]
    ids_file: {ids_file}
targets:
  all: {{ url: "{all}", body: envelope }}
  forties: {{ url: "{forties}" }}
routes:
  - stream: participant
    targets: [all]
  - stream: participant/4*
    targets: [forties]
"#,
        url = upstream.participant_url("{id}"),
        ids_file = ids_file.display(),
        all = sink.url("/all"),
        forties = sink.url("/forties"),
    )
}

async fn wait_for_entities(upstream: &Upstream, api: Api, expected: &[&str]) {
    eventually(&format!("connections for {expected:?}"), DEADLINE, || async {
        let mut entities = upstream.connected_entities(api);
        entities.sort();
        entities == expected
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_runs_one_instance_per_id_and_routes_by_template_or_instance() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let ids_file = directory.path().join("participants.txt");
    std::fs::write(&ids_file, "# from the CRM\n41\n40\n").unwrap();
    let relay = TestRelay::start(&format!("{IN_PROCESS}{}", participants(&upstream, &sink, &ids_file))).await;
    wait_for_entities(&upstream, Api::Participant, &["40", "41", "51"]).await;
    // The id is in the path and in the header that has {id}.
    let requests = upstream.requests_seen(Api::Participant);
    let request_41 = requests
        .iter()
        .find(|request| request.path == "/participants/41/stream")
        .expect("instance 41 connected");
    assert_eq!(request_41.header("x-participant"), Some("user-41"));

    for id in ["40", "41", "51"] {
        assert_eq!(
            upstream.publish_event_to(
                Api::Participant,
                id,
                &format!(r#"{{"eventType":"MESSAGE_SENT","from":"{id}"}}"#)
            ),
            1
        );
    }
    let all = sink.wait_for_delivered("/all", 3, DEADLINE).await;
    let mut streams: Vec<&str> = all
        .iter()
        .map(|request| request.header("x-relay-stream").unwrap())
        .collect();
    streams.sort();
    assert_eq!(streams, ["participant/40", "participant/41", "participant/51"]);
    let envelope: serde_json::Value = serde_json::from_slice(&all[0].body).unwrap();
    let stream = envelope["stream"].as_str().unwrap();
    assert_eq!(Some(stream), all[0].header("x-relay-stream"));
    assert_eq!(envelope["instance_id"].as_str(), stream.strip_prefix("participant/"));
    let forties = sink.wait_for_delivered("/forties", 2, DEADLINE).await;
    let mut from: Vec<&str> = forties
        .iter()
        .map(|request| request.header("x-relay-stream").unwrap())
        .collect();
    from.sort();
    assert_eq!(from, ["participant/40", "participant/41"]);

    // Metrics carry the template, never the instance.
    assert_eq!(
        relay
            .metric("sse_relay_stream_connected", &[("stream", "participant")])
            .await,
        3.0
    );
    let (_, metrics) = relay.get("/metrics").await;
    assert!(!metrics.contains("participant/"), "an instance name in the metrics");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_ids_file_starts_and_stops_only_those_instances() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let ids_file = directory.path().join("participants.txt");
    std::fs::write(&ids_file, "41\n42\n").unwrap();
    // The binary: the relay's own loop watches the file.
    let relay = crate::support::LoggedRelay::start(&participants(&upstream, &sink, &ids_file), &[]).await;
    wait_for_entities(&upstream, Api::Participant, &["40", "41", "42", "51"]).await;
    let accepted_before = upstream.connections_accepted(Api::Participant);

    std::fs::write(&ids_file, "42\n43\n").unwrap();
    wait_for_entities(&upstream, Api::Participant, &["40", "42", "43", "51"]).await;
    assert_eq!(
        upstream.connections_accepted(Api::Participant),
        accepted_before + 1,
        "only 43 connected anew; the others kept their connections"
    );
    relay.wait_for_log("config reloaded").await;

    // A bad line leaves the instances as they are, and says where.
    std::fs::write(&ids_file, "42\nno/slash\n").unwrap();
    let line = relay.wait_for_log("the ids file changed but cannot be used").await;
    assert!(line.contains("participants.txt:2"), "{line}");
    assert_eq!(upstream.connected_entities(Api::Participant).len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_when_ends_an_instance_after_its_last_event_is_delivered() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let yaml = format!(
        r#"{IN_PROCESS}
streams:
  chat:
    url: {url}
    event_type: [/type]
    default_event_type: workflow_update
    keepalive: [keepalive]
    ids: [a1, b2]
    stop_when: {{ events: [workflow_status], where: {{ /is_active: false }} }}
targets:
  hook: {{ url: "{hook}" }}
routes:
  - stream: chat
    targets: [hook]
"#,
        url = upstream.chat_url("{id}"),
        hook = sink.url("/hook"),
    );
    let mut relay = TestRelay::start(&yaml).await;
    wait_for_entities(&upstream, Api::Chat, &["a1", "b2"]).await;
    upstream.publish_event_to(Api::Chat, "a1", r#"{"type":"workflow_status","is_active":true}"#);
    upstream.publish_event_to(Api::Chat, "a1", r#"{"type":"node_update","node":"n1"}"#);
    upstream.publish_event_to(Api::Chat, "a1", r#"{"type":"workflow_status","is_active":false}"#);
    let delivered = crate::support::bodies(&sink.wait_for_delivered("/hook", 3, DEADLINE).await);
    assert!(
        delivered.iter().any(|body| body.contains(r#""is_active":false"#)),
        "the event that ends the instance is delivered: {delivered:?}"
    );
    // a1 ended and is not connected again; b2 runs on. (A stream whose connection carried
    // events reconnects at once, so a reconnection would be there by the time b2's next event
    // is delivered.)
    wait_for_entities(&upstream, Api::Chat, &["b2"]).await;
    assert_eq!(
        upstream.publish_event_to(Api::Chat, "b2", r#"{"type":"node_update"}"#),
        1
    );
    sink.wait_for_delivered("/hook", 4, DEADLINE).await;
    assert_eq!(upstream.connected_entities(Api::Chat), ["b2"], "a1 is not reconnected");
    assert_eq!(upstream.connections_accepted(Api::Chat), 2);
    // A reload with the same template does not bring a1 back.
    relay.reload(&yaml).await.unwrap();
    assert_eq!(
        upstream.publish_event_to(Api::Chat, "b2", r#"{"type":"node_update"}"#),
        1
    );
    sink.wait_for_delivered("/hook", 5, DEADLINE).await;
    assert_eq!(upstream.connections_accepted(Api::Chat), 2);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_ends_after_its_ttl() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let yaml = format!(
        r#"{IN_PROCESS}
streams:
  chat:
    url: {url}
    ids: [a1]
    ttl: 500ms
targets:
  hook: {{ url: "{hook}" }}
routes:
  - stream: chat
    targets: [hook]
"#,
        url = upstream.chat_url("{id}"),
        hook = sink.url("/hook"),
    );
    let relay = TestRelay::start(&yaml).await;
    wait_for_entities(&upstream, Api::Chat, &["a1"]).await;
    wait_for_entities(&upstream, Api::Chat, &[]).await;
    relay.stop().await;
}

#[test]
fn template_mistakes_are_named_at_their_place() {
    let yaml = r#"
streams:
  plain:
    url: http://127.0.0.1:1/stream
    ids: ["1"]
  chat:
    url: http://127.0.0.1:1/chats/{id}/listen
  participant:
    url: http://127.0.0.1:1/participants/{id}/stream
    ids: ["ok", "not/ok", "not ok"]
    ttl: 0s
targets:
  hook: { url: "http://127.0.0.1:1/hook" }
routes:
  - stream: nothing/*
    targets: [hook]
"#;
    let err = parse_config(yaml, &[]).unwrap_err().to_string();
    for expected in [
        "test.yaml:5:10: streams.plain.ids: only a stream template takes ids: put {id} in the url",
        "test.yaml:7:10: streams.chat.url: the url has {id}, so this stream is a template: give it ids, an \
         ids_file, or dynamic: true",
        "test.yaml:10:17: streams.participant.ids[1]: an instance id cannot contain `/`",
        "test.yaml:10:27: streams.participant.ids[2]: an instance id cannot contain a space",
        "test.yaml:11:10: streams.participant.ttl: ",
        "test.yaml:15:13: routes[0].stream: stream pattern `nothing/*` matches no configured stream",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}
