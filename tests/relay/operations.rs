//! The operator's files: the Grafana dashboard and the Prometheus alert rules use only metrics
//! the relay exports and the README documents. (`promtool check rules` and `promtool test
//! rules` run in CI, from `.ci/run`.)

use std::collections::BTreeSet;
use std::path::Path;

fn read(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

/// Every `sse_relay_…` name in `text`, a histogram's series named by their histogram.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("sse_relay_") {
        let name: String = rest[start..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[start + name.len()..];
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| base.ends_with("_seconds"))
            .map_or(name.clone(), str::to_owned);
        names.insert(name);
    }
    names
}

#[test]
fn the_dashboard_and_the_alerts_use_only_metrics_the_relay_exports_and_documents() {
    // The names the relay registers are string literals in telemetry.rs.
    let registered: BTreeSet<String> = metric_names(&read("src/telemetry.rs"))
        .into_iter()
        .filter(|name| read("src/telemetry.rs").contains(&format!("\"{name}\"")))
        .collect();
    let readme = read("README.md");
    let documented: BTreeSet<String> = readme
        .lines()
        .filter(|line| line.starts_with("| `sse_relay_"))
        .flat_map(metric_names)
        .collect();
    let dashboard = read("deploy/grafana/sse-relay.json");
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    let alerts = read("deploy/prometheus/alerts.yaml");
    for (file, text) in [("dashboard", &dashboard), ("alerts", &alerts)] {
        let used = metric_names(text);
        assert!(used.len() >= 7, "{file} uses {used:?}");
        let unknown: Vec<&String> = used.difference(&registered).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics the relay does not export: {unknown:?}"
        );
        let undocumented: Vec<&String> = used.difference(&documented).collect();
        assert!(
            undocumented.is_empty(),
            "{file} uses metrics the README's table does not document: {undocumented:?}"
        );
    }
    // And the README documents every metric the relay exports.
    let missing: Vec<&String> = registered.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "exported but not in the README's table: {missing:?}"
    );
}

#[test]
fn a_misspelt_metric_would_be_caught() {
    let names = metric_names("rate(sse_relay_delivery_duration_seconds_bucket[5m]) + sse_relay_queue_dept");
    assert_eq!(
        names,
        BTreeSet::from([
            "sse_relay_delivery_duration_seconds".to_owned(),
            "sse_relay_queue_dept".to_owned()
        ])
    );
}

/// The request `route test` shows for one target: header names and values, and the body.
struct Shown {
    headers: std::collections::BTreeMap<String, String>,
    body: String,
}

/// Reads `route test`'s report: per target, its headers and body.
fn shown_requests(report: &str) -> std::collections::BTreeMap<String, Shown> {
    let mut requests = std::collections::BTreeMap::new();
    let mut lines = report.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("target ") else {
            continue;
        };
        let name = rest.split(':').next().unwrap().to_owned();
        let mut headers = std::collections::BTreeMap::new();
        let mut body = String::new();
        while let Some(line) = lines.next() {
            if line.starts_with("  body (") {
                body = lines.next().unwrap_or_default().to_owned();
                break;
            }
            let (header, value) = line.trim().split_once(": ").unwrap();
            headers.insert(header.to_owned(), value.to_owned());
        }
        requests.insert(name, Shown { headers, body });
    }
    requests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_test_shows_the_request_the_relay_sends_for_the_same_message() {
    use sse_relay_fixtures::emulator::{Api, Upstream};
    use sse_relay_fixtures::sink::Sink;

    use crate::support::{DEADLINE, LoggedRelay, quiet_upstream};

    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let yaml = format!(
        r#"
streams:
  chat:
    url: {chat}
    event_type: [/type]
    default_event_type: workflow_update
    keepalive: [keepalive]
    ids: ["8f1c"]
targets:
  n8n:
    url: {n8n}
    headers: {{ Authorization: "Bearer ${{HOOK_TOKEN}}" }}
    signing_secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body: envelope
  zapier: {{ url: "{zapier}" }}
  slack: {{ url: "{slack}" }}
routes:
  - stream: chat
    events: [node_*]
    targets: [n8n]
  - stream: chat/8f*
    targets: [zapier]
  - stream: chat
    events: [workflow_status]
    targets: [slack]
"#,
        chat = upstream.chat_url("{id}"),
        n8n = sink.url("/n8n"),
        zapier = sink.url("/zapier"),
        slack = sink.url("/slack"),
    );
    let env = [("HOOK_TOKEN", "sekret-hook-token")];
    let relay = LoggedRelay::start(&yaml, &env).await;
    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);
    let sample = r#"{"type":"node_update","node":{"id":7,"status":"done"}}"#;
    assert_eq!(upstream.publish_event_to(Api::Chat, "8f1c", sample), 1);
    let n8n = sink.wait_for_delivered("/n8n", 1, DEADLINE).await;
    let zapier = sink.wait_for_delivered("/zapier", 1, DEADLINE).await;

    let samples = tempfile::tempdir().unwrap();
    let sample_path = samples.path().join("sample.json");
    std::fs::write(&sample_path, sample).unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_sse-relay"))
        .args(["route", "test", "--stream", "chat/8f1c", "--config"])
        .arg(relay.config_path())
        .arg(&sample_path)
        .envs(env)
        .output()
        .await
        .unwrap();
    let report = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{report}");
    assert!(!report.contains("sekret-hook-token"), "a secret is shown: {report}");
    assert!(
        report.contains("routes[0]") && report.contains("routes[1]") && !report.contains("routes[2]"),
        "{report}"
    );
    let shown = shown_requests(&report);
    assert_eq!(shown.keys().collect::<Vec<_>>(), ["n8n", "zapier"], "{report}");

    // What changes from one event to the next: its id, when it arrived, the signature's time.
    let volatile = [
        "idempotency-key",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    ];
    let comparable_body = |body: &str| {
        let mut value: serde_json::Value = serde_json::from_str(body).unwrap();
        if let Some(object) = value.as_object_mut() {
            object.remove("id");
            object.remove("received_at");
        }
        value
    };
    for (name, delivered) in [("n8n", &n8n[0]), ("zapier", &zapier[0])] {
        let shown = &shown[name];
        let sent: std::collections::BTreeMap<String, String> = delivered
            .headers
            .iter()
            .filter(|(header, _)| {
                !["host", "accept", "content-length", "user-agent", "accept-encoding"].contains(&header.as_str())
            })
            .map(|(header, value)| (header.to_string(), value.to_str().unwrap().to_owned()))
            .collect();
        assert_eq!(
            sent.keys().collect::<Vec<_>>(),
            shown.headers.keys().collect::<Vec<_>>(),
            "{name}: the same headers"
        );
        for (header, value) in &shown.headers {
            if header == "authorization" {
                assert_eq!(value, "*** (from the config)");
                assert_eq!(sent[header], "Bearer sekret-hook-token");
            } else if !volatile.contains(&header.as_str()) {
                assert_eq!(&sent[header], value, "{name}: {header}");
            }
        }
        assert_eq!(
            comparable_body(&String::from_utf8_lossy(&delivered.body)),
            comparable_body(&shown.body),
            "{name}: the same body"
        );
    }

    // A message no route takes fails the command, so that it can guard a config in CI.
    let ping = samples.path().join("ping.json");
    std::fs::write(&ping, r#"{"type":"ping"}"#).unwrap();
    let unrouted = tokio::process::Command::new(env!("CARGO_BIN_EXE_sse-relay"))
        .args(["route", "test", "--stream", "chat/99", "--config"])
        .arg(relay.config_path())
        .arg(&ping)
        .envs(env)
        .output()
        .await
        .unwrap();
    assert!(!unrouted.status.success());
    assert!(String::from_utf8_lossy(&unrouted.stdout).contains("no route matches"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_streams_and_targets_as_the_metrics_count_them() {
    use sse_relay_fixtures::emulator::{Api, Upstream};
    use sse_relay_fixtures::metrics::metric_value;
    use sse_relay_fixtures::sink::Sink;

    use crate::support::{DEADLINE, LoggedRelay, eventually, quiet_upstream};

    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.answer_by_default("/bad", 400);
    let yaml = participant_to_ok_and_bad(&upstream, &sink, "");
    let token = "status-token";
    let relay = LoggedRelay::start_with_admin_token(&yaml, &[("ADMIN_TOKEN", token)]).await;
    assert!(upstream.wait_for_clients(Api::Participant, 1, DEADLINE).await);
    for n in 0..3 {
        upstream.publish_event(Api::Participant, &format!(r#"{{"eventType":"MESSAGE_SENT","n":{n}}}"#));
    }
    eventually("delivered and dead-lettered", DEADLINE, || async {
        relay.metric("sse_relay_dead_letters_total", &[("target", "bad")]).await == 3.0
            && relay
                .metric(
                    "sse_relay_deliveries_total",
                    &[("target", "ok"), ("outcome", "delivered")],
                )
                .await
                == 3.0
    })
    .await;

    assert_eq!(relay.get("/v1/status").await.0, 401, "the admin token is required");
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_sse-relay"))
        .args(["status", "--json", "--url"])
        .arg(format!("http://{}", relay.admin))
        .env("SSE_RELAY_ADMIN_TOKEN", token)
        .output()
        .await
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let metrics = relay.get_with_token("/metrics", token).await.1;
    let streams = status["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 1);
    assert_eq!(streams[0]["name"], "participant");
    assert_eq!(streams[0]["connected"], true);
    assert_eq!(streams[0]["events_received"], 3);
    assert!(streams[0]["last_event_age_seconds"].as_f64().unwrap() < 60.0);
    for target in status["targets"].as_array().unwrap() {
        let name = target["name"].as_str().unwrap();
        let metric = |metric: &str, extra: &[(&str, &str)]| {
            let mut labels = vec![("target", name)];
            labels.extend_from_slice(extra);
            metric_value(&metrics, metric, &labels)
        };
        assert_eq!(target["queue_depth"], metric("sse_relay_queue_depth", &[]), "{name}");
        assert_eq!(
            target["dead_letters_total"],
            metric("sse_relay_dead_letters_total", &[]),
            "{name}"
        );
        assert_eq!(
            target["delivered_total"],
            metric("sse_relay_deliveries_total", &[("outcome", "delivered")]),
            "{name}"
        );
        assert_eq!(target["state"], "closed", "{name}");
    }
    let by_name = |name: &str| {
        status["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|target| target["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_name("ok")["delivered_total"], 3.0);
    assert_eq!(by_name("bad")["dead_letters_total"], 3.0);

    let table = tokio::process::Command::new(env!("CARGO_BIN_EXE_sse-relay"))
        .args(["status", "--url"])
        .arg(format!("http://{}", relay.admin))
        .args(["--token", token])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("participant") && table.contains("connected"), "{table}");
    assert!(
        table
            .lines()
            .any(|line| line.starts_with("bad ") && line.trim_end().ends_with('3')),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_prints_each_event_with_its_targets_and_each_delivery_outcome() {
    use sse_relay_fixtures::emulator::{Api, Upstream};
    use sse_relay_fixtures::sink::Sink;
    use tokio::io::AsyncBufReadExt as _;

    use crate::support::{DEADLINE, LoggedRelay, eventually, quiet_upstream};

    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    // `bad` fails with a status worth retrying, and has no retry left: the attempt made a
    // dead letter, and the tap says so.
    sink.answer_by_default("/bad", 503);
    let yaml = participant_to_ok_and_bad(
        &upstream,
        &sink,
        ", headers: { Authorization: \"Bearer tap-secret-7\" }",
    )
    .replace("/bad\" }", "/bad\", retry: { max_attempts: 1 } }");
    assert!(yaml.contains("max_attempts: 1"));
    let token = "tap-token";
    let relay = LoggedRelay::start_with_admin_token(&yaml, &[("ADMIN_TOKEN", token)]).await;
    assert!(upstream.wait_for_clients(Api::Participant, 1, DEADLINE).await);

    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut taps = Vec::new();
    for extra in [&["--data"][..], &["--target", "ok"][..]] {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sse-relay"))
            .args(["tap", "--url"])
            .arg(format!("http://{}", relay.admin))
            .args(extra)
            .env("SSE_RELAY_ADMIN_TOKEN", token)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let (lines, tag) = (std::sync::Arc::clone(&lines), extra.join(" "));
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                lines.lock().unwrap().push(format!("[{tag}] {line}"));
            }
        });
        taps.push(child);
    }
    let seen = |needle: &'static str| {
        let lines = std::sync::Arc::clone(&lines);
        move || std::future::ready(lines.lock().unwrap().iter().any(|line| line.contains(needle)))
    };
    eventually("both taps connected", DEADLINE, || async {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains("tapping"))
            .count()
            == 2
    })
    .await;
    upstream.publish_event(Api::Participant, r#"{"eventType":"MESSAGE_SENT","text":"hello tap"}"#);
    for needle in [
        "[--data] ",
        "event participant MESSAGE_SENT -> ",
        "hello tap",
        "delivery ok <- participant MESSAGE_SENT: delivered",
        "delivery bad <- participant MESSAGE_SENT: dead_letter 503",
    ] {
        eventually(&format!("the tap shows {needle:?}"), DEADLINE, seen(needle)).await;
    }
    eventually(
        "the filtered tap shows the ok delivery",
        DEADLINE,
        seen("[--target ok] "),
    )
    .await;
    eventually("…", DEADLINE, || async {
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.starts_with("[--target ok]") && line.contains("delivery ok <-"))
    })
    .await;
    let lines = lines.lock().unwrap().clone();
    assert!(
        lines
            .iter()
            .any(|line| line.contains("-> bad, ok") || line.contains("-> ok, bad")),
        "{lines:#?}"
    );
    for line in &lines {
        assert!(!line.contains("tap-secret-7"), "a secret in the tap: {line}");
        if line.starts_with("[--target ok]") {
            assert!(
                !line.contains("delivery bad"),
                "the filter let another target through: {line}"
            );
            assert!(!line.contains("hello tap"), "data shown without --data: {line}");
        }
    }
    drop(taps);
}

/// The participant stream, every event to `ok` (with `ok_extra` in its settings) and to `bad`.
fn participant_to_ok_and_bad(
    upstream: &sse_relay_fixtures::emulator::Upstream,
    sink: &sse_relay_fixtures::sink::Sink,
    ok_extra: &str,
) -> String {
    format!(
        r#"
streams:
  participant:
    url: {participant}
    event_type: [/eventType]
    keepalive: [KEEP_ALIVE]
targets:
  ok: {{ url: "{ok}"{ok_extra} }}
  bad: {{ url: "{bad}" }}
routes:
  - stream: participant
    targets: [ok, bad]
"#,
        participant = upstream.participant_url("42"),
        ok = sink.url("/ok"),
        bad = sink.url("/bad"),
    )
}
