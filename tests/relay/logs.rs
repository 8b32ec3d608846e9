//! What the relay writes to its log, read from a child process: lines that every event could
//! cause are rate-limited, and log lines are valid JSON with one `target` key.

use sse_relay::emulator::{Api, Upstream};
use sse_relay::sink::Sink;

use crate::support::{DEADLINE, LoggedRelay, eventually, quiet_upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_answering_3xx_or_4xx_to_every_event_logs_a_line_per_10_s_not_per_event() {
    const N_EVENTS: usize = 40;
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.answer_by_default("/rejecting", 400);
    sink.answer_by_default("/moved", 301);
    let yaml = format!(
        r#"
streams:
  chat:
    url: {chat}
    event_type: [/type]
    keepalive: [keepalive]
targets:
  rejecting: {{ url: "{rejecting}" }}
  moved: {{ url: "{moved}" }}
routes:
  - stream: chat
    targets: [rejecting, moved]
"#,
        chat = upstream.chat_url("3f1c"),
        rejecting = sink.url("/rejecting"),
        moved = sink.url("/moved"),
    );
    let relay = LoggedRelay::start(&yaml, &[]).await;
    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);
    for n in 0..N_EVENTS {
        upstream.publish_event(Api::Chat, &format!(r#"{{"n":{n}}}"#));
    }
    for target in ["rejecting", "moved"] {
        let labels = [("target", target), ("outcome", "failed")];
        eventually(&format!("{N_EVENTS} failures of {target}"), DEADLINE, || async {
            relay.metric("sse_relay_deliveries_total", &labels).await >= N_EVENTS as f64
        })
        .await;
        let webhook_field = format!("\"webhook\":\"{target}\"");
        let failure_lines: Vec<String> = relay
            .log_lines()
            .into_iter()
            .filter(|line| line.contains("delivery failed") && line.contains(&webhook_field))
            .collect();
        // One line per 10 s: a second one only on a machine slow enough to take that long.
        assert!(
            (1..=2).contains(&failure_lines.len()),
            "{target}: {} lines for {N_EVENTS} failures:\n{}",
            failure_lines.len(),
            failure_lines.join("\n")
        );
        for line in &failure_lines {
            assert_eq!(line.matches("\"target\":").count(), 1, "one target key: {line}");
            serde_json::from_str::<serde_json::Value>(line).expect("a log line is JSON");
        }
    }
}
