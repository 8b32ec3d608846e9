//! The SQLite store: what survives kill -9 and restarts, dead letters and replay, and a full
//! store. The relay runs as a child process where the test kills it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::process::{Child, Command};

use sse_relay_fixtures::emulator::{Api, Upstream};
use sse_relay_fixtures::metrics::read_metric;
use sse_relay_fixtures::process::free_port;
use sse_relay_fixtures::sink::{ReceivedRequest, Sink, SinkResponse};

use crate::support::{
    DEADLINE, TestRelay, bodies, both_connected, both_streams, eventually, quiet_upstream, relay_binary,
};

const BINARY: &str = env!("CARGO_BIN_EXE_sse-relay");
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A relay config file in a temporary directory, with its SQLite store beside it.
struct ChildRelay {
    directory: tempfile::TempDir,
    admin_port: u16,
}

impl ChildRelay {
    async fn new(upstream: &Upstream, sink: &Sink, target_extra: &str) -> ChildRelay {
        let directory = tempfile::tempdir().unwrap();
        let admin_port = free_port().await;
        let yaml = format!(
            r#"
admin: {{ listen: "127.0.0.1:{admin_port}" }}
shutdown: {{ grace_period: 1s }}
storage: {{ path: "{storage}" }}
streams:
  chat:
    url: {chat}
    event_type: [/type]
    keepalive: [keepalive]
targets:
  hook:
    url: {hook}
    signing_secret: {SECRET}
    {target_extra}
routes:
  - stream: chat
    targets: [hook]
"#,
            storage = directory.path().join("data").display(),
            chat = upstream.chat_url("3f1c"),
            hook = sink.url("/hook"),
        );
        std::fs::write(directory.path().join("relay.yaml"), yaml).unwrap();
        ChildRelay { directory, admin_port }
    }

    fn config_path(&self) -> PathBuf {
        self.directory.path().join("relay.yaml")
    }

    fn database(&self) -> rusqlite::Connection {
        sse_relay::queue::sqlite::connect(&self.directory.path().join("data").join("relay.db")).unwrap()
    }

    fn spawn(&self) -> Child {
        relay_binary().spawn_run(&self.config_path(), &[])
    }

    async fn dlq(&self, args: &[&str]) -> String {
        let output = Command::new(BINARY)
            .arg("dlq")
            .args(args)
            .arg("--config")
            .arg(self.config_path())
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "dlq {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], self.admin_port));
        read_metric(admin, name, labels).await.unwrap_or(0.0)
    }
}

/// Kills the relay with SIGKILL and waits until it is gone, so that a restart does not find
/// its port or its database still held.
async fn kill_9(child: &mut Child) {
    let pid = i32::try_from(child.id().expect("still running")).unwrap();
    // SAFETY: signals the child this test started and still owns.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let _ = child.wait().await;
}

/// Bodies of the deliveries waiting in the store, with their attempt counts.
fn stored_deliveries(database: &rusqlite::Connection) -> BTreeMap<String, u32> {
    let mut statement = database.prepare("SELECT data, n_attempts FROM deliveries").unwrap();
    statement
        .query_map([], |row| {
            Ok((String::from_utf8(row.get::<_, Vec<u8>>(0)?).unwrap(), row.get(1)?))
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

/// Every attempt at the same body carries the same idempotency key and webhook id.
fn assert_one_identity_per_event(requests: &[ReceivedRequest]) {
    /// The idempotency key and the webhook id of one attempt.
    type Identity<'a> = (Option<&'a str>, Option<&'a str>);
    let mut identities: BTreeMap<&[u8], BTreeSet<Identity<'_>>> = BTreeMap::new();
    for request in requests {
        identities
            .entry(&request.body[..])
            .or_default()
            .insert((request.header("idempotency-key"), request.header("webhook-id")));
    }
    for (body, identity) in identities {
        assert_eq!(
            identity.len(),
            1,
            "{} was sent with {identity:?}",
            String::from_utf8_lossy(body)
        );
        let (key, webhook_id) = identity.into_iter().next().unwrap();
        assert!(key.is_some() && key == webhook_id, "{key:?} vs {webhook_id:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_burst_loses_no_accepted_event() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.answer_by_default("/hook", 503);
    let relay = ChildRelay::new(
        &upstream,
        &sink,
        "retry: { initial_delay: 50ms, max_delay: 200ms, max_attempts: 1000 }\n    circuit_breaker: { open_delay: 100ms, max_open_delay: 200ms }",
    )
    .await;
    let mut first_run = relay.spawn();
    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);

    let n_events = 400;
    for index in 0..n_events {
        upstream.publish_event(Api::Chat, &format!(r#"{{"type":"burst","n":{index}}}"#));
        if index == n_events / 2 {
            eventually("the relay stored part of the burst", DEADLINE, || async {
                relay.metric("sse_relay_queue_depth", &[("target", "hook")]).await >= 50.0
            })
            .await;
            kill_9(&mut first_run).await;
        }
    }
    let accepted = stored_deliveries(&relay.database());
    assert!(
        accepted.len() >= 50,
        "only {} events were stored before the kill",
        accepted.len()
    );
    assert!(sink.delivered("/hook").is_empty(), "the target was down");

    sink.answer_by_default("/hook", 200);
    let _second_run = relay.spawn();
    eventually("every stored event delivered after the restart", DEADLINE, || async {
        let delivered: BTreeSet<String> = bodies(&sink.delivered("/hook")).into_iter().collect();
        accepted.keys().all(|body| delivered.contains(body))
    })
    .await;
    assert_one_identity_per_event(&sink.requests("/hook"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_continues_the_retry_schedule() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.answer_by_default("/hook", 503);
    let relay = ChildRelay::new(
        &upstream,
        &sink,
        "retry: { initial_delay: 200ms, max_delay: 200ms, max_attempts: 3 }\n    circuit_breaker: { failure_threshold: 100 }",
    )
    .await;
    let mut first_run = relay.spawn();
    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);
    upstream.publish_event(Api::Chat, r#"{"type":"workflow_status","is_active":false}"#);

    let database = relay.database();
    eventually("two attempts recorded in the store", DEADLINE, || async {
        stored_deliveries(&database).values().next() == Some(&2)
    })
    .await;
    kill_9(&mut first_run).await;
    assert_eq!(sink.requests("/hook").len(), 2);

    let _second_run = relay.spawn();
    // The metric counts the dead letter before the store has written it: wait for the row.
    eventually("the third attempt made it a dead letter", DEADLINE, || async {
        relay.dlq(&["list", "--json"]).await.contains("\"n_attempts\": 3")
    })
    .await;
    assert_eq!(
        sink.requests("/hook").len(),
        3,
        "the attempt count survived the restart"
    );
    assert!(stored_deliveries(&database).is_empty());
}

/// A relay child process whose first delivery, of `data`, the sink rejects with a 422, once
/// that delivery is a dead letter. The child runs until the returned handle is dropped.
async fn with_one_dead_letter(data: &str) -> (Upstream, Sink, ChildRelay, Child) {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.script("/hook", vec![SinkResponse::status(422)]);
    let relay = ChildRelay::new(&upstream, &sink, "").await;
    let running = relay.spawn();
    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);
    upstream.publish_event(Api::Chat, data);
    eventually("a dead letter", DEADLINE, || async {
        relay.dlq(&["list"]).await.trim_end().ends_with("1 dead letter(s)")
    })
    .await;
    (upstream, sink, relay, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_delivery_is_a_dead_letter_until_replayed() {
    let data = r#"{"type":"workflow_status","is_active":false}"#;
    let (_upstream, sink, relay, _running) = with_one_dead_letter(data).await;
    let listed = relay.dlq(&["list"]).await;
    assert!(
        listed.contains("hook") && listed.contains("workflow_status") && listed.contains(" 422 "),
        "{listed}"
    );
    let rows: serde_json::Value =
        serde_json::from_str(&relay.dlq(&["list", "--json", "--target", "hook"]).await).unwrap();
    assert_eq!(rows[0]["last_status"], 422);
    assert_eq!(rows[0]["n_attempts"], 1);
    assert_eq!(sink.requests("/hook").len(), 1, "a 422 is not retried");

    assert_eq!(
        relay.dlq(&["replay", "--all"]).await.trim(),
        "replayed 1 dead letter(s)"
    );
    let delivered = sink.wait_for_delivered("/hook", 1, DEADLINE).await;
    assert_eq!(&delivered[0].body[..], data.as_bytes());
    assert_one_identity_per_event(&sink.requests("/hook"));
    assert!(relay.dlq(&["list"]).await.trim_end().ends_with("0 dead letter(s)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_replayed_while_events_flow_is_delivered() {
    let rejected = r#"{"type":"workflow_status","rejected":true}"#;
    let (upstream, sink, relay, _running) = with_one_dead_letter(rejected).await;

    // Events keep arriving for the same target while the replay is written by another process:
    // the relay's dispatcher sees newer deliveries than the replayed one.
    let flowing = Arc::new(AtomicBool::new(true));
    let publisher = tokio::spawn({
        let (upstream, flowing) = (upstream.clone(), Arc::clone(&flowing));
        async move {
            let mut n = 0;
            while flowing.load(Ordering::Relaxed) {
                upstream.publish_event(Api::Chat, &format!(r#"{{"type":"update","n":{n}}}"#));
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    assert_eq!(
        relay.dlq(&["replay", "--all"]).await.trim(),
        "replayed 1 dead letter(s)"
    );
    eventually("the replayed event delivered", DEADLINE, || async {
        sink.delivered("/hook")
            .iter()
            .any(|request| &request.body[..] == rejected.as_bytes())
    })
    .await;
    flowing.store(false, Ordering::Relaxed);
    publisher.await.unwrap();
    assert_one_identity_per_event(&sink.requests("/hook"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_pauses_the_streams_until_there_is_room() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.answer_by_default("/hook", 503);
    let hold = format!(
        "{}\nstorage: {{ max_bytes: 64KiB }}",
        crate::support::everything_to(&sink, "circuit_breaker: { open_delay: 100ms, max_open_delay: 100ms }")
    );
    let relay = TestRelay::start(&both_streams(&upstream, "", &hold)).await;
    both_connected(&upstream).await;

    let padding = "x".repeat(2000);
    let expected: Vec<String> = (0..100)
        .map(|index| format!(r#"{{"type":"big","n":{index},"padding":"{padding}"}}"#))
        .collect();
    for data in &expected {
        upstream.publish_event(Api::Chat, data);
    }
    relay.wait_metric("sse_relay_storage_errors_total", &[], 1.0).await;
    let (status, body) = relay.get("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("storage is failing"), "{body}");
    assert!(sink.delivered("/hook").is_empty());

    sink.answer_by_default("/hook", 200);
    let delivered: BTreeSet<String> = bodies(&sink.wait_for_delivered("/hook", expected.len(), DEADLINE).await)
        .into_iter()
        .collect();
    let missing: Vec<usize> = (0..expected.len())
        .filter(|n| !delivered.contains(&expected[*n]))
        .collect();
    assert!(missing.is_empty(), "events never delivered: {missing:?}");
    eventually("ready again", DEADLINE, || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;
    relay.stop().await;
}

/// While storage cannot take large events, what waits for it is bounded by bytes (32 MiB), not
/// only by count: the stream stops reading long before thousands of events are held in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_waiting_for_a_full_store_are_bounded_by_bytes() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let hold = format!(
        "{}\nstorage: {{ max_bytes: 64KiB }}",
        crate::support::everything_to(&sink, "")
    );
    let relay = TestRelay::start(&both_streams(&upstream, "", &hold)).await;
    both_connected(&upstream).await;
    let padding = "z".repeat(50_000);
    for n in 0..1500 {
        upstream.publish_event(Api::Chat, &format!(r#"{{"type":"big","n":{n},"p":"{padding}"}}"#));
    }
    relay.wait_metric("sse_relay_storage_errors_total", &[], 1.0).await;
    let received = [("stream", "chat")];
    relay
        .wait_metric("sse_relay_events_received_total", &received, 600.0)
        .await;
    // 32 MiB of 50 KB events is 671; the stream may hold a few more in hand. Without the
    // bound, all 1,500 are read within this second.
    let read_on = relay.wait_metric("sse_relay_events_received_total", &received, 701.0);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), read_on).await.is_err(),
        "more than 700 events read while storage was full"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_spills_to_disk_and_delivers_everything_once_in_order() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.answer_by_default("/hook", 503);
    let target = "ordered: true\n    retry: { initial_delay: 10ms, max_delay: 50ms, max_attempts: 100000 }\n    circuit_breaker: { open_delay: 50ms, max_open_delay: 100ms }";
    let relay = TestRelay::start(&both_streams(
        &upstream,
        "",
        &crate::support::everything_to(&sink, target)
            .replace("max_in_flight: 1", "max_in_flight: 8")
            .replace("retry: { initial_delay: 20ms, max_delay: 100ms }", ""),
    ))
    .await;
    both_connected(&upstream).await;
    // Far more than a dispatcher holds in memory, so most wait on disk only.
    let expected: Vec<String> = (0..5000).map(|n| format!(r#"{{"type":"update","n":{n}}}"#)).collect();
    for data in &expected {
        upstream.publish_event(Api::Chat, data);
    }
    relay
        .wait_metric("sse_relay_queue_depth", &[("target", "hook")], expected.len() as f64)
        .await;
    sink.answer_by_default("/hook", 200);
    let delivered = sink.wait_for_delivered("/hook", expected.len(), DEADLINE).await;
    // One stream and an ordered target: exactly the published sequence, although most of it
    // was loaded back from disk while the stream's channel to the dispatcher overflowed.
    assert_eq!(bodies(&delivered), expected, "every event exactly once, in order");
    // Nothing arrives twice later either.
    eventually("the queue to drain", DEADLINE, || async {
        relay.metric("sse_relay_queue_depth", &[("target", "hook")]).await == 0.0
    })
    .await;
    assert_eq!(sink.delivered("/hook").len(), expected.len());
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_event_id_survives_a_restart() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let relay = ChildRelay::new(&upstream, &sink, "").await;
    let mut first_run = relay.spawn();
    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);
    upstream.publish(Api::Chat, "id: evt-7\ndata: {\"type\":\"workflow_status\"}\n\n");
    sink.wait_for_delivered("/hook", 1, DEADLINE).await;
    kill_9(&mut first_run).await;

    let _second_run = relay.spawn();
    assert!(upstream.wait_for_connections_accepted(Api::Chat, 2, DEADLINE).await);
    let seen = upstream.requests_seen(Api::Chat);
    assert_eq!(seen.first().unwrap().header("last-event-id"), None);
    assert_eq!(seen.last().unwrap().header("last-event-id"), Some("evt-7"));
}

/// Runs `sse-relay <args> --config <config>` to its end, within the deadline.
async fn run_to_end(args: &[&str], config: &std::path::Path) -> std::process::Output {
    let output = Command::new(BINARY)
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(DEADLINE, output)
        .await
        .expect("the command ends at once")
        .unwrap()
}

/// Stops the relay with SIGTERM, so that its write-ahead log is folded into the database.
async fn sigterm(child: &mut Child) {
    let pid = i32::try_from(child.id().expect("still running")).unwrap();
    // SAFETY: signals the child this test started and still owns.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert!(child.wait().await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_on_the_same_storage_exits_at_once_naming_the_first() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let relay = ChildRelay::new(&upstream, &sink, "").await;
    let first = relay.spawn();
    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);

    // Another admin port, as two containers sharing a volume would have.
    let second_config = relay.directory.path().join("second.yaml");
    let yaml = std::fs::read_to_string(relay.config_path()).unwrap().replace(
        &format!("127.0.0.1:{}", relay.admin_port),
        &format!("127.0.0.1:{}", free_port().await),
    );
    std::fs::write(&second_config, yaml).unwrap();
    let second = run_to_end(&["run"], &second_config).await;
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    let storage = relay.directory.path().join("data");
    assert!(stderr.contains(&storage.display().to_string()), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", first.id().unwrap())), "{stderr}");
    assert_eq!(
        upstream.connections_accepted(Api::Chat),
        1,
        "the second relay never connected"
    );

    // The dead-letter commands work beside the running relay.
    assert!(relay.dlq(&["list"]).await.contains("0 dead letter(s)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_lost_database_is_refused_with_what_to_do() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.answer_by_default("/hook", 503);
    let relay = ChildRelay::new(&upstream, &sink, "").await;
    let mut first_run = relay.spawn();
    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);
    let padding = "x".repeat(2000);
    for n in 0..200 {
        upstream.publish_event(Api::Chat, &format!(r#"{{"type":"update","n":{n},"p":"{padding}"}}"#));
    }
    eventually("200 stored deliveries", DEADLINE, || async {
        relay.metric("sse_relay_queue_depth", &[("target", "hook")]).await >= 200.0
    })
    .await;
    sigterm(&mut first_run).await;
    let database = relay.directory.path().join("data").join("relay.db");
    let intact = std::fs::read(&database).unwrap();
    assert!(intact.len() > 100 * 4096, "{} bytes", intact.len());

    let refused = |output: &std::process::Output, expected: &str| {
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!output.status.success(), "{stderr}");
        assert!(stderr.contains(expected), "{expected:?} in {stderr}");
        assert!(stderr.contains(&database.display().to_string()), "{stderr}");
    };
    // Garbage in the middle pages, then in the schema page: both are refused, by `dlq` too.
    for (from, to) in [(intact.len() / 3, 2 * intact.len() / 3), (100, 4096)] {
        let mut damaged = intact.clone();
        damaged[from..to].fill(0xAB);
        std::fs::write(&database, &damaged).unwrap();
        refused(&run_to_end(&["run"], &relay.config_path()).await, "is damaged");
        refused(&run_to_end(&["dlq", "list"], &relay.config_path()).await, "is damaged");
    }
    // Emptied, then missing: not taken for a first start.
    std::fs::write(&database, b"").unwrap();
    refused(&run_to_end(&["run"], &relay.config_path()).await, "is missing or empty");
    std::fs::remove_file(&database).unwrap();
    refused(&run_to_end(&["run"], &relay.config_path()).await, "is missing or empty");

    // Restored, it runs and delivers what it held.
    std::fs::write(&database, &intact).unwrap();
    sink.answer_by_default("/hook", 200);
    let _second_run = relay.spawn();
    assert_eq!(sink.wait_for_delivered("/hook", 200, DEADLINE).await.len(), 200);
}

/// An event read while the store is full waits for room; when the relay stops meanwhile, it
/// is stored past `max_pending` rather than dropped: the upstream (chat, no history) would not
/// send it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_waiting_for_room_at_shutdown_is_stored_not_dropped() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.answer_by_default("/hook", 503);
    let relay = ChildRelay::new(&upstream, &sink, "").await;
    let yaml = std::fs::read_to_string(relay.config_path()).unwrap();
    let limited = yaml.replacen("\" }\nstreams:", "\", max_pending: 3 }\nstreams:", 1);
    assert_ne!(limited, yaml);
    std::fs::write(relay.config_path(), limited).unwrap();
    let mut child = relay.spawn();
    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);
    let events: Vec<String> = (0..4).map(|n| format!(r#"{{"type":"update","n":{n}}}"#)).collect();
    for data in &events {
        assert_eq!(upstream.publish_event(Api::Chat, data), 1);
    }
    // Three are stored; the fourth was read and waits for room.
    eventually("the fourth event waiting for room", DEADLINE, || async {
        relay.metric("sse_relay_events_received_total", &[]).await == 4.0
            && relay.metric("sse_relay_queue_depth", &[]).await == 3.0
    })
    .await;
    sigterm(&mut child).await;

    sink.answer_by_default("/hook", 200);
    let mut child = relay.spawn();
    let delivered = sink.wait_for_delivered("/hook", events.len(), DEADLINE).await;
    let delivered: BTreeSet<String> = bodies(&delivered).into_iter().collect();
    assert_eq!(
        delivered,
        events.iter().cloned().collect(),
        "every event read was delivered"
    );
    sigterm(&mut child).await;
}
