//! What the relay writes to its log, read from a child process: lines that every event could
//! cause are rate-limited, and log lines are valid JSON with one `target` key.

use sse_relay_fixtures::emulator::{Api, Upstream};
use sse_relay_fixtures::sink::Sink;

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

/// What an operator reads from a healthy relay and from a failing one: a start-up line with
/// the version, the config and the storage; a periodic summary; durations in whole
/// milliseconds; and connection errors that name the host, never the path or query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_says_what_runs_sums_it_up_and_names_unreachable_hosts() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.script("/flaky", vec![sse_relay_fixtures::sink::SinkResponse::status(503)]);
    // Enough failures in a row to pause it; it answers the probe.
    sink.script("/paused", vec![sse_relay_fixtures::sink::SinkResponse::status(503); 5]);
    // Nothing listens on port 1.
    let yaml = format!(
        r#"
logging: {{ summary_interval: 300ms }}
streams:
  chat: {{ url: "{chat}", event_type: [/type] }}
  gone: {{ url: "http://127.0.0.1:1/stream/secret-path?token=secret-query", reconnect: {{ initial_delay: 1s, max_delay: 2s }} }}
targets:
  flaky: {{ url: "{flaky}", retry: {{ initial_delay: 30ms, max_delay: 60ms }} }}
  unreachable: {{ url: "http://127.0.0.1:1/hook/secret-path?token=secret-query", retry: {{ initial_delay: 1s }} }}
  paused:
    url: "{paused}"
    max_in_flight: 1
    retry: {{ initial_delay: 10ms, max_delay: 10ms }}
    circuit_breaker: {{ open_delay: 100ms }}
routes:
  - {{ stream: chat, targets: [flaky, unreachable, paused] }}
"#,
        chat = upstream.chat_url("3f1c"),
        flaky = sink.url("/flaky"),
        paused = sink.url("/paused"),
    );
    let relay = LoggedRelay::start(&yaml, &[]).await;
    let started = relay.wait_for_log("sse-relay started").await;
    assert!(
        started.contains(&format!("\"version\":\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{started}"
    );
    assert!(started.contains("relay.yaml") && started.contains("data"), "{started}");

    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);
    upstream.publish_event(Api::Chat, r#"{"type":"update"}"#);
    sink.wait_for_delivered("/flaky", 1, DEADLINE).await;

    let mut retrying = String::new();
    eventually("the flaky target's retry line", DEADLINE, || {
        let line = relay
            .log_lines()
            .into_iter()
            .find(|line| line.contains("will retry") && line.contains("\"webhook\":\"flaky\""));
        retrying = line.clone().unwrap_or_default();
        std::future::ready(line.is_some())
    })
    .await;
    let retry_in = serde_json::from_str::<serde_json::Value>(&retrying).unwrap()["retry_in"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        retry_in.ends_with("ms") && !retry_in.contains("us") && !retry_in.contains("ns"),
        "{retrying}"
    );

    for (webhook_or_stream, field) in [
        ("\"webhook\":\"unreachable\"", "target"),
        ("\"stream\":\"gone\"", "stream"),
    ] {
        eventually(&format!("the {field}'s connection error"), DEADLINE, || {
            std::future::ready(
                relay
                    .log_lines()
                    .iter()
                    .any(|line| line.contains(webhook_or_stream) && line.contains("cannot connect to 127.0.0.1:1")),
            )
        })
        .await;
    }
    let recovered = relay.wait_for_log("target recovered").await;
    assert!(recovered.contains("\"webhook\":\"paused\""), "{recovered}");
    let summary = relay.wait_for_log("flaky: 1 delivered").await;
    assert!(summary.contains("chat: 1 received"), "{summary}");
    for line in relay.log_lines() {
        assert!(
            !line.contains("secret-path") && !line.contains("secret-query"),
            "{line}"
        );
        // Valid JSON with unique keys: a second `target` key would hide the module or the field.
        serde_json::from_str::<serde_json::Value>(&line).expect("a log line is JSON");
        assert_eq!(line.matches("\"target\":").count(), 1, "one target key: {line}");
    }
}
