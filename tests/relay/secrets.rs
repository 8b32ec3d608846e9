//! Secrets stay where they belong: a target that echoes its request puts none of the target's
//! secrets in the log or the dead-letter table, and an upstream redirect to another origin gets
//! none of the stream's.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64_STANDARD;

use sse_relay_fixtures::emulator::{Api, Upstream, UpstreamOptions};
use sse_relay_fixtures::sink::{Sink, SinkResponse};

use crate::support::{DEADLINE, LoggedRelay, eventually, quiet_upstream};

const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_echoing_its_request_gets_no_secret_into_logs_or_dead_letters() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let basic = BASE64_STANDARD.encode("relay-user:pa/ss-0011");
    let signing_key = SIGNING_SECRET.strip_prefix("whsec_").unwrap();
    sink.script(
        "/echo",
        vec![
            SinkResponse::status(400).echoing_request_headers(),
            SinkResponse::status(400).with_body(format!(
                "POST /echo?token=sekret-query-0012: token sekret-bearer-0014 expired; \
                 signatures need {SIGNING_SECRET} ({signing_key})"
            )),
            // A secret across the excerpt's 200-byte end is taken out whole, not cut short.
            SinkResponse::status(400).with_body(format!("{} sekret-api-key-0013 and more", "x".repeat(190))),
        ],
    );
    let yaml = format!(
        r#"
streams:
  chat:
    url: {chat}
    event_type: [/type]
    keepalive: [keepalive]
targets:
  echo:
    url: "http://relay-user:${{PASSWORD}}@{sink}/echo?token=${{QUERY_TOKEN}}"
    headers: {{ X-Api-Key: "${{API_KEY}}", X-Auth: "Bearer ${{BEARER}}" }}
    signing_secret: "${{SIGNING_SECRET}}"
routes:
  - stream: chat
    targets: [echo]
"#,
        chat = upstream.chat_url("3f1c"),
        sink = sink.addr(),
    );
    let env = [
        ("PASSWORD", "pa%2Fss-0011"),
        ("QUERY_TOKEN", "sekret-query-0012"),
        ("API_KEY", "sekret-api-key-0013"),
        ("BEARER", "sekret-bearer-0014"),
        ("SIGNING_SECRET", SIGNING_SECRET),
    ];
    let relay = LoggedRelay::start(&yaml, &env).await;
    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);
    upstream.publish_event(Api::Chat, r#"{"n":1}"#);
    upstream.publish_event(Api::Chat, r#"{"n":2}"#);
    upstream.publish_event(Api::Chat, r#"{"n":3}"#);
    eventually("three dead letters", DEADLINE, || async {
        relay.dlq(&["list"]).await.trim_end().ends_with("3 dead letter(s)")
    })
    .await;

    let echoed = sink.requests("/echo");
    assert_eq!(
        echoed[0].header("authorization"),
        Some(format!("Basic {basic}").as_str()),
        "the URL's user information went out as Basic authorization"
    );
    // "sekret" also finds what is left of a secret cut short.
    let secrets = [
        "sekret",
        "pa/ss-0011",
        "pa%2Fss-0011",
        basic.as_str(),
        SIGNING_SECRET,
        signing_key,
    ];
    let rows: serde_json::Value = serde_json::from_str(&relay.dlq(&["list", "--json"]).await).unwrap();
    let errors: Vec<&str> = (0..3).map(|n| rows[n]["last_error"].as_str().unwrap()).collect();
    // The excerpts are there, with the secrets taken out.
    assert!(
        errors.iter().any(|error| error.contains("authorization: Basic ***")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|error| error.contains("x-api-key: ***")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|error| error.contains("token *** expired")),
        "{errors:?}"
    );
    assert!(errors.iter().any(|error| error.contains("xxx *** and")), "{errors:?}");
    let failure_line = relay.wait_for_log("delivery failed").await;
    assert!(failure_line.contains("status 400: "), "{failure_line}");
    let table = relay.dlq(&["list"]).await;
    let logs = relay.log_lines().join("\n");
    for secret in secrets {
        for (place, text) in [
            ("dlq list --json", errors.join("\n")),
            ("dlq list", table.clone()),
            ("the log", logs.clone()),
        ] {
            assert!(!text.contains(secret), "{secret} is in {place}:\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_redirect_is_followed_within_its_origin_and_refused_beyond_it() {
    let upstream = Upstream::start(UpstreamOptions {
        bearer_token: Some("sekret-bearer-0021".to_owned()),
        api_key: Some("sekret-api-key-0022".to_owned()),
        ..quiet_upstream()
    })
    .await
    .unwrap();
    // Another port is another origin.
    let elsewhere = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    // First a redirect within the origin, relative as servers often send it.
    upstream.redirect_next(
        Api::Participant,
        307,
        "/participants/43/stream?access_token=sekret-query-0023",
        1,
    );
    let yaml = format!(
        r#"
streams:
  participant:
    url: "{url}?access_token=${{QUERY_TOKEN}}"
    headers: {{ Authorization: "Bearer ${{TOKEN}}", X-API-Key: "${{API_KEY}}" }}
    event_type: [/eventType]
    keepalive: [KEEP_ALIVE]
    reconnect: {{ initial_delay: 50ms, max_delay: 200ms }}
targets:
  hook: {{ url: "{hook}" }}
routes:
  - stream: participant
    targets: [hook]
"#,
        url = upstream.participant_url("42"),
        hook = sink.url("/hook"),
    );
    let env = [
        ("QUERY_TOKEN", "sekret-query-0023"),
        ("TOKEN", "sekret-bearer-0021"),
        ("API_KEY", "sekret-api-key-0022"),
    ];
    let relay = LoggedRelay::start(&yaml, &env).await;
    assert!(upstream.wait_for_clients(Api::Participant, 1, DEADLINE).await);
    let requests = upstream.requests_seen(Api::Participant);
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(
        requests[1].path,
        "/participants/43/stream?access_token=sekret-query-0023"
    );
    assert_eq!(requests[1].header("x-api-key"), Some("sekret-api-key-0022"));
    assert_eq!(requests[1].header("referer"), None, "{requests:?}");
    upstream.publish_event(Api::Participant, r#"{"eventType":"MESSAGE_SENT"}"#);
    assert_eq!(sink.wait_for_delivered("/hook", 1, DEADLINE).await.len(), 1);

    // Then, on the next connections, a redirect to the other origin: refused.
    let away = format!("{}?access_token=sekret-query-0023", elsewhere.participant_url("42"));
    upstream.redirect_next(Api::Participant, 302, &away, 1_000);
    upstream.close_all(Api::Participant);
    let refused = relay
        .wait_for_log("stream participant: the server redirected to another origin")
        .await;
    assert!(refused.contains(&format!("http://{}", elsewhere.addr())), "{refused}");
    eventually("a second refused redirect", DEADLINE, || async {
        upstream.requests_seen(Api::Participant).len() >= 4
    })
    .await;
    assert!(
        elsewhere.requests_seen(Api::Participant).is_empty(),
        "the other origin was asked: {:?}",
        elsewhere.requests_seen(Api::Participant)
    );
    assert!(!relay.log_lines().join("\n").contains("sekret"));
}
