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

const TOKEN: &str = "s3cret-admin-token";

/// A dynamic chat template and a fixed participant one, every event to `/hook`.
fn dynamic_chats(upstream: &Upstream, sink: &Sink) -> String {
    format!(
        r#"
streams:
  chat:
    url: {chat}
    headers: {{ Authorization: "Bearer chat-{{id}}" }}
    event_type: [/type]
    default_event_type: workflow_update
    keepalive: [keepalive]
    dynamic: true
    stop_when: {{ events: [workflow_status], where: {{ /is_active: false }} }}
  participant:
    url: {participant}
    ids: ["40"]
targets:
  hook: {{ url: "{hook}" }}
routes:
  - stream: "*"
    targets: [hook]
"#,
        chat = upstream.chat_url("{id}"),
        participant = upstream.participant_url("{id}"),
        hook = sink.url("/hook"),
    )
}

struct StreamsApi {
    base: String,
    http: reqwest::Client,
}

impl StreamsApi {
    fn new(admin: std::net::SocketAddr) -> StreamsApi {
        StreamsApi {
            base: format!("http://{admin}/v1/streams"),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder, token: Option<&str>) -> (u16, serde_json::Value) {
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.expect("the admin server answers");
        let status = response.status().as_u16();
        let body = response.bytes().await.unwrap_or_default();
        (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
    }

    async fn put(&self, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let mut request = self.http.put(format!("{}/{path}", self.base));
        if let Some(body) = body {
            request = request.body(body.to_owned());
        }
        self.send(request, Some(TOKEN)).await
    }

    async fn delete(&self, path: &str) -> (u16, serde_json::Value) {
        self.send(self.http.delete(format!("{}/{path}", self.base)), Some(TOKEN))
            .await
    }

    async fn list(&self) -> Vec<serde_json::Value> {
        let (status, body) = self.send(self.http.get(&self.base), Some(TOKEN)).await;
        assert_eq!(status, 200, "{body}");
        body["streams"].as_array().cloned().unwrap_or_default()
    }
}

/// The relay in this process on `dynamic_chats`, with the admin token, and its streams API.
async fn with_dynamic_chats() -> (Upstream, Sink, TestRelay, StreamsApi) {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\", token: \"{TOKEN}\" }}\n{}",
        dynamic_chats(&upstream, &sink)
    );
    let relay = TestRelay::start(&yaml).await;
    let api = StreamsApi::new(relay.admin);
    (upstream, sink, relay, api)
}

fn names(streams: &[serde_json::Value]) -> Vec<String> {
    streams
        .iter()
        .map(|stream| stream["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_adds_lists_and_removes_instances_of_a_dynamic_template() {
    let (upstream, sink, relay, api) = with_dynamic_chats().await;
    assert_eq!(names(&api.list().await), ["participant/40"]);

    let (status, body) = api.put("chat/8f1c", None).await;
    assert_eq!(
        (status, &body["stream"]),
        (201, &serde_json::json!("chat/8f1c")),
        "{body}"
    );
    assert_eq!(
        api.put("chat/8f1c", None).await.0,
        200,
        "adding a running instance again"
    );
    assert_eq!(api.put("chat/77", Some(r#"{"ttl": "2h"}"#)).await.0, 201);
    wait_for_entities(&upstream, Api::Chat, &["77", "8f1c"]).await;
    let request = upstream
        .requests_seen(Api::Chat)
        .into_iter()
        .find(|request| request.path.contains("/8f1c/"))
        .unwrap();
    assert_eq!(request.header("authorization"), Some("Bearer chat-8f1c"));

    upstream.publish_event_to(Api::Chat, "8f1c", r#"{"type":"node_update"}"#);
    sink.wait_for_delivered("/hook", 1, DEADLINE).await;
    eventually("the list shows the instance's event", DEADLINE, || async {
        api.list().await.iter().any(|stream| {
            stream["name"] == "chat/8f1c"
                && stream["connected"] == true
                && stream["events_received"] == 1
                && stream["dynamic"] == true
                && stream["id"] == "8f1c"
                && stream["template"] == "chat"
                && stream["last_event_at"].is_string()
        })
    })
    .await;

    assert_eq!(api.delete("chat/77").await.0, 204);
    wait_for_entities(&upstream, Api::Chat, &["8f1c"]).await;
    assert_eq!(names(&api.list().await), ["chat/8f1c", "participant/40"]);
    // The event that ends the workflow ends the instance.
    upstream.publish_event_to(Api::Chat, "8f1c", r#"{"type":"workflow_status","is_active":false}"#);
    sink.wait_for_delivered("/hook", 2, DEADLINE).await;
    eventually("the finished instance leaves the list", DEADLINE, || async {
        names(&api.list().await) == ["participant/40"]
    })
    .await;
    assert!(upstream.connected_entities(Api::Chat).is_empty());
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_the_token_and_says_what_is_wrong() {
    let (upstream, _sink, relay, api) = with_dynamic_chats().await;
    for (request, what) in [
        (api.http.get(&api.base), "list"),
        (api.http.put(format!("{}/chat/1", api.base)), "add"),
        (api.http.delete(format!("{}/chat/1", api.base)), "remove"),
    ] {
        let (status, body) = api.send(request, None).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert!(body["error"].as_str().unwrap().contains("admin.token"), "{body}");
    }
    let (status, _) = api.send(api.http.get(&api.base), Some("wrong")).await;
    assert_eq!(status, 401);

    let check = |(status, body): (u16, serde_json::Value), expected_status: u16, expected: &str| {
        assert_eq!(status, expected_status, "{body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{error:?} does not say {expected:?}");
        assert!(!error.contains(TOKEN));
    };
    check(
        api.put("nothing/1", None).await,
        404,
        "no stream template named `nothing`; dynamic templates: chat",
    );
    check(
        api.put("participant/41", None).await,
        409,
        "`participant` is not a dynamic template",
    );
    check(api.delete("participant/40").await, 409, "not a dynamic template");
    check(api.put("chat/a%20b", None).await, 400, "cannot contain a space");
    check(
        api.put(&format!("chat/{}", "x".repeat(200)), None).await,
        400,
        "at most 128 bytes",
    );
    check(
        api.put("chat/1", Some(r#"{"ttl": "soon"}"#)).await,
        400,
        "ttl is not a duration",
    );
    check(api.put("chat/1", Some("{not json")).await, 400, "must be JSON");
    check(
        api.put("chat/1", Some(r#"{"ttl": "300000000000y"}"#)).await,
        400,
        "at most 100 years",
    );
    check(api.delete("chat/1").await, 404, "no instance chat/1 runs");
    assert!(upstream.connected_entities(Api::Chat).is_empty());
    relay.stop().await;
}

#[test]
fn a_dynamic_template_needs_an_admin_token() {
    let yaml = r#"
streams:
  chat:
    url: http://127.0.0.1:1/chats/{id}/listen
    dynamic: true
targets:
  hook: { url: "http://127.0.0.1:1/hook" }
"#;
    let err = parse_config(yaml, &[]).unwrap_err().to_string();
    assert!(
        err.contains("test.yaml:5:14: streams.chat.dynamic: a dynamic template needs admin.token"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_instances_come_back_after_kill_9_with_their_last_event_id() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let yaml = dynamic_chats(&upstream, &sink);
    let token_env = [("ADMIN_TOKEN", TOKEN)];
    let relay = crate::support::LoggedRelay::start_with_admin_token(&yaml, &token_env).await;
    let api = StreamsApi::new(relay.admin);
    assert_eq!(api.put("chat/a1", None).await.0, 201);
    assert_eq!(api.put("chat/b2", Some(r#"{"ttl": "1h"}"#)).await.0, 201);
    wait_for_entities(&upstream, Api::Chat, &["a1", "b2"]).await;
    upstream.publish(Api::Chat, "id: 7\ndata: {\"type\":\"node_update\"}\n\n");
    sink.wait_for_delivered("/hook", 2, DEADLINE).await;

    let directory = relay.kill_keeping_storage().await;
    wait_for_entities(&upstream, Api::Chat, &[]).await;
    let relay = crate::support::LoggedRelay::restart_in(directory, &yaml, &token_env).await;
    wait_for_entities(&upstream, Api::Chat, &["a1", "b2"]).await;
    let resumed: Vec<Option<String>> = upstream
        .requests_seen(Api::Chat)
        .iter()
        .skip(2)
        .map(|request| request.header("last-event-id").map(str::to_owned))
        .collect();
    assert_eq!(resumed, [Some("7".to_owned()), Some("7".to_owned())]);
    let api = StreamsApi::new(relay.admin);
    let mut listed = names(&api.list().await);
    listed.sort();
    assert_eq!(listed, ["chat/a1", "chat/b2", "participant/40"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_spread_at_the_connect_rate_at_start_and_after_an_outage() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let ids: Vec<String> = (0..60).map(|n| format!("\"{n}\"")).collect();
    let yaml = format!(
        r#"{IN_PROCESS}
connections: {{ rate: 20/s }}
streams:
  chat:
    url: {url}
    ids: [{ids}]
targets:
  hook: {{ url: "{hook}" }}
routes:
  - stream: chat
    targets: [hook]
"#,
        url = upstream.chat_url("{id}"),
        ids = ids.join(", "),
        hook = sink.url("/hook"),
    );
    let relay = TestRelay::start(&yaml).await;
    assert!(upstream.wait_for_clients(Api::Chat, 60, DEADLINE).await);
    // A burst of 20, then 20 a second: the last 40 take 2 s.
    let spread = |spans: &[sse_relay_fixtures::emulator::ConnectionSpan]| {
        let first = spans.iter().map(|span| span.accepted_at).min().unwrap();
        let last = spans.iter().map(|span| span.accepted_at).max().unwrap();
        last - first
    };
    let at_start = spread(&upstream.connection_spans(Api::Chat));
    assert!(
        at_start >= std::time::Duration::from_millis(1800),
        "60 connections at 20/s came within {at_start:?}"
    );
    // An outage: every connection fails at once; they come back at the same rate.
    upstream.close_all(Api::Chat);
    assert!(upstream.wait_for_connections_accepted(Api::Chat, 120, DEADLINE).await);
    let again = spread(&upstream.connection_spans(Api::Chat)[60..]);
    assert!(
        again >= std::time::Duration::from_millis(1800),
        "60 reconnections at 20/s came within {again:?}"
    );
    relay.stop().await;
}

#[test]
fn check_shows_a_template_and_its_instances_without_secrets() {
    let directory = tempfile::tempdir().unwrap();
    let ids_file = directory.path().join("chats.txt");
    std::fs::write(&ids_file, "c1\n").unwrap();
    let yaml = format!(
        r#"
admin: {{ token: "${{ADMIN_TOKEN}}" }}
streams:
  chat:
    url: "https://chat.example.com/chats/{{id}}/listen?token=${{CHAT_TOKEN}}"
    headers: {{ Authorization: "Bearer ${{CHAT_TOKEN}}" }}
    ids: [a1, b2]
    ids_file: {ids_file}
    dynamic: true
    stop_when: {{ events: [workflow_status], where: {{ /is_active: false }} }}
    ttl: 2h
targets:
  hook: {{ url: "http://127.0.0.1:1/hook" }}
routes:
  - stream: chat/a*
    targets: [hook]
"#,
        ids_file = ids_file.display(),
    );
    let config = parse_config(&yaml, &[("ADMIN_TOKEN", "t0p"), ("CHAT_TOKEN", "s3cr3t")]).unwrap();
    let described = sse_relay::check::describe(&config);
    for expected in [
        "url https://chat.example.com/chats/{id}/listen?***",
        "template: 3 instances named chat/ID: 2 from ids, 1 from",
        "more through the streams API (dynamic)",
        "an instance ends after an event that matches: events workflow_status where /is_active = false",
        "an instance ends 2h after it started (ttl)",
        "streams chat (instances with ids a*)",
    ] {
        assert!(described.contains(expected), "{expected:?} in:\n{described}");
    }
    assert!(
        !described.contains("s3cr3t") && !described.contains("t0p"),
        "{described}"
    );
}
