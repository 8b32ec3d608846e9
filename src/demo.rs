//! `sse-relay demo`: the relay end to end on this machine, with no credentials and no config.
//!
//! Starts the emulators of both upstream APIs and a webhook sink on 127.0.0.1, a relay running
//! `relay.example.yaml` pointed at them (in memory, admin on an ephemeral port), and a publisher
//! of sample events; prints every webhook the sink receives until Ctrl-C.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use tracing::info;

use crate::app;
use crate::config::{self, StorageMode};
use crate::emulator::{Api, Upstream, UpstreamOptions};
use crate::sink::Sink;

const EXAMPLE_CONFIG: &str = include_str!("../relay.example.yaml");

/// A throwaway Standard Webhooks secret for the demo's signed target.
const DEMO_SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

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

    // The demo runs the example config itself, pointed at the emulator and the sink.
    let env: HashMap<&str, String> = HashMap::from([
        ("PARTICIPANT_STREAM_URL", upstream.participant_url("40")),
        ("PARTICIPANT_TOKEN", "demo-token".to_owned()),
        ("PARTICIPANT_API_KEY", "demo-key".to_owned()),
        ("SPLOX_API_URL", format!("http://{}", upstream.addr())),
        ("SPLOX_CHAT_ID", "3f1c2a6e-0000-4000-8000-000000000001".to_owned()),
        ("SPLOX_TOKEN", "demo-token".to_owned()),
        ("ZAPIER_HOOK_URL", sink.url("/zapier")),
        ("N8N_WEBHOOK_URL", sink.url("/n8n")),
        ("N8N_SIGNING_SECRET", DEMO_SIGNING_SECRET.to_owned()),
    ]);
    let mut config = config::parse(
        EXAMPLE_CONFIG,
        "relay.example.yaml",
        Box::new(move |name| env.get(name).cloned()),
    )
    .context("the example config is invalid")?;
    // No fixed port and no files left behind.
    config.admin.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.storage.mode = StorageMode::Memory;
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
