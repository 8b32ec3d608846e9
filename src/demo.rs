//! `sse-relay demo`: the relay end to end on this machine, with no credentials and no config.
//!
//! Starts the emulators of both upstream APIs and a webhook sink on 127.0.0.1, a relay routing
//! between them as `relay.example.yaml` does, and a publisher of sample events; prints every
//! webhook the sink receives until Ctrl-C.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use tracing::info;

use crate::app;
use crate::config;
use crate::emulator::{Api, Upstream, UpstreamOptions};
use crate::sink::Sink;

/// Sample events in the formats of the two upstream APIs, published in turn.
const SAMPLES: &[(Api, &str)] = &[
    (
        Api::Participant,
        r#"{"eventType":"MESSAGE_SENT","payload":{"id":"m1","text":"Hello from the participant stream"}}"#,
    ),
    (
        Api::Chat,
        r#"{"workflow_request":{"id":"w1","status":"in_progress"},"node_execution":{"id":"n1","status":"completed"}}"#,
    ),
    (
        Api::Participant,
        r#"{"eventType":"ACTION_PLAN_CARDS_ADDED","payload":[{"id":"c1","title":"Walk 10 minutes"}]}"#,
    ),
    (
        Api::Chat,
        r#"{"workflow_request":{"id":"w1","status":"in_progress"},"node_execution":{"id":"n2","status":"running"}}"#,
    ),
    (
        Api::Participant,
        r#"{"eventType":"CHAT_SESSION_MEMBER_JOINED","payload":{"sessionId":"s1","participantId":"40","memberId":"7","memberType":"COACH","memberName":"Sam","photoUrl":null}}"#,
    ),
    (
        Api::Participant,
        r#"{"eventType":"PARTICIPANT_EXTRA_VALUE_CHANGED","payload":{"id":"3","extraCode":"EXTRA_A","extraValue":"x"}}"#,
    ),
    (Api::Chat, r#"{"is_active":false,"type":"workflow_status"}"#),
];

pub async fn run(shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let upstream = Upstream::start(UpstreamOptions {
        bearer_token: Some("demo-token".to_owned()),
        api_key: Some("demo-key".to_owned()),
        // The real chat API closes every 30 minutes; the demo shows the reconnect sooner.
        chat_max_connection_age: Duration::from_secs(20),
        ..UpstreamOptions::default()
    })
    .await
    .context("cannot start the upstream emulator")?;
    let sink = Sink::start().await.context("cannot start the webhook sink")?;
    sink.on_request(|request| {
        println!(
            "webhook {} {} <- {} {}: {}",
            request.path,
            request.status_sent,
            request.header("x-relay-stream").unwrap_or("-"),
            request.header("x-relay-event-type").unwrap_or("-"),
            String::from_utf8_lossy(&request.body)
        );
    });

    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
streams:
  participant:
    url: {participant}
    headers: {{ Authorization: "Bearer demo-token", X-API-Key: demo-key }}
    event_type: [/eventType]
    keepalive: [KEEP_ALIVE]
  chat:
    url: {chat}
    headers: {{ Authorization: "Bearer demo-token" }}
    event_type: [/type]
    default_event_type: workflow_update
    keepalive: [keepalive]
    idle_timeout: 10s
targets:
  zapier: {{ url: "{zapier}", max_in_flight: 4 }}
  n8n: {{ url: "{n8n}", safe_url: true, body: envelope }}
routes:
  - stream: participant
    events: [MESSAGE_SENT, ACTION_PLAN_CARD*]
    targets: [zapier]
  - stream: chat
    events: [workflow_update]
    where: {{ /node_execution/status: completed }}
    targets: [n8n]
  - stream: "*"
    events: [CHAT_SESSION_MEMBER_*, workflow_status]
    targets: [n8n]
"#,
        participant = upstream.participant_url("40"),
        chat = upstream.chat_url("3f1c2a6e-0000-4000-8000-000000000001"),
        zapier = sink.url("/zapier"),
        n8n = sink.url("/n8n"),
    );
    let config = config::parse(&yaml, "demo", Box::new(|_| None)).context("the demo config is invalid")?;
    let relay = app::start(config).await?;
    info!(
        metrics = %format!("http://{}/metrics", relay.admin_addr()),
        "demo running: sample events every second; unrouted and filtered ones do not reach the sink; Ctrl-C stops"
    );

    let publisher = tokio::spawn(async move {
        for (api, data) in SAMPLES.iter().cycle() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            upstream.publish_event(*api, data);
        }
    });
    shutdown.await;
    publisher.abort();
    relay.shutdown().await
}
