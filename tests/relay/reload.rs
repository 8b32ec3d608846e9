//! Reloading the config while the relay runs: in-process with `Relay::reload`, and with SIGHUP
//! on the binary.

use tokio::process::Command;

use sse_relay_fixtures::emulator::{Api, Upstream};
use sse_relay_fixtures::metrics::read_metric;
use sse_relay_fixtures::process::free_port;
use sse_relay_fixtures::sink::Sink;

use crate::support::{DEADLINE, TestRelay, both_connected, both_streams, eventually, quiet_upstream, relay_binary};

fn routes_to(sink: &Sink, targets: &[&str]) -> String {
    let mut yaml = String::from("targets:\n");
    for target in targets {
        yaml.push_str(&format!(
            "  {target}: {{ url: \"{}\" }}\n",
            sink.url(&format!("/{target}"))
        ));
    }
    yaml.push_str(&format!(
        "routes:\n  - stream: \"*\"\n    targets: [{}]\n",
        targets.join(", ")
    ));
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_unchanged_streams_connected_and_adds_a_route() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let mut relay = TestRelay::start(&both_streams(&upstream, "", &routes_to(&sink, &["first"]))).await;
    both_connected(&upstream).await;
    upstream.publish_event(Api::Chat, r#"{"type":"before"}"#);
    sink.wait_for_delivered("/first", 1, DEADLINE).await;

    relay
        .reload(&both_streams(&upstream, "", &routes_to(&sink, &["first", "second"])))
        .await
        .expect("the new config applies");
    upstream.publish_event(Api::Chat, r#"{"type":"after"}"#);
    upstream.publish_event(Api::Participant, r#"{"eventType":"AFTER"}"#);
    assert_eq!(sink.wait_for_delivered("/second", 2, DEADLINE).await.len(), 2);
    assert_eq!(sink.wait_for_delivered("/first", 3, DEADLINE).await.len(), 3);
    assert_eq!(
        upstream.connections_accepted(Api::Chat),
        1,
        "an unchanged stream keeps its connection"
    );
    assert_eq!(upstream.connections_accepted(Api::Participant), 1);

    // Changing one stream reconnects that one only.
    relay
        .reload(&both_streams(
            &upstream,
            "idle_timeout: 30s",
            &routes_to(&sink, &["first", "second"]),
        ))
        .await
        .unwrap();
    assert!(upstream.wait_for_connections_accepted(Api::Chat, 2, DEADLINE).await);
    let refused = relay
        .reload(
            &both_streams(&upstream, "idle_timeout: 30s", &routes_to(&sink, &["first"])).replace(
                "admin: { listen: \"127.0.0.1:0\" }",
                "admin: { listen: \"127.0.0.1:1\" }",
            ),
        )
        .await;
    assert!(refused.unwrap_err().to_string().contains("change only with a restart"));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_config_and_keeps_the_old_one_when_invalid() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.answer_by_default("/doomed", 503);
    let directory = tempfile::tempdir().unwrap();
    let admin_port = free_port().await;
    let config = |targets: &[&str]| {
        format!(
            "admin: {{ listen: \"127.0.0.1:{admin_port}\" }}\nstorage: {{ path: \"{}\" }}\nstreams:\n  chat:\n    url: {}\n    event_type: [/type]\n{}",
            directory.path().join("data").display(),
            upstream.chat_url("3f1c"),
            routes_to(&sink, targets)
        )
    };
    let path = directory.path().join("relay.yaml");
    std::fs::write(&path, config(&["kept", "doomed"])).unwrap();
    let relay = relay_binary().spawn_run(&path, &[]);
    let pid = i32::try_from(relay.id().unwrap()).unwrap();
    let hang_up = || {
        // SAFETY: signals the child this test started and still owns.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    };
    let metric = |name: &'static str, labels: &'static [(&'static str, &'static str)]| async move {
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
        read_metric(admin, name, labels).await.unwrap_or(0.0)
    };
    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);
    upstream.publish_event(Api::Chat, r#"{"type":"one"}"#);
    sink.wait_for_delivered("/kept", 1, DEADLINE).await;
    eventually("a delivery queued for the doomed target", DEADLINE, || async {
        metric("sse_relay_queue_depth", &[("target", "doomed")]).await >= 1.0
    })
    .await;

    std::fs::write(&path, "streams: [this is not a map]\n").unwrap();
    hang_up();
    eventually("the failed reload counted", DEADLINE, || async {
        metric("sse_relay_config_reloads_total", &[("result", "failed")]).await == 1.0
    })
    .await;
    upstream.publish_event(Api::Chat, r#"{"type":"two"}"#);
    sink.wait_for_delivered("/kept", 2, DEADLINE).await;

    std::fs::write(&path, config(&["kept", "added"])).unwrap();
    hang_up();
    eventually("the reload applied", DEADLINE, || async {
        metric("sse_relay_config_reloads_total", &[("result", "ok")]).await == 1.0
    })
    .await;
    upstream.publish_event(Api::Chat, r#"{"type":"three"}"#);
    assert_eq!(sink.wait_for_delivered("/added", 1, DEADLINE).await.len(), 1);
    assert_eq!(sink.wait_for_delivered("/kept", 3, DEADLINE).await.len(), 3);
    assert_eq!(
        upstream.connections_accepted(Api::Chat),
        1,
        "the stream was not reconnected"
    );

    let listed = Command::new(env!("CARGO_BIN_EXE_sse-relay"))
        .args(["dlq", "list", "--json", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(rows[0]["target"], "doomed");
    assert_eq!(rows[0]["last_error"], "the target was removed from the config");
    drop(relay);
}

/// A changed stream is restarted; it resumes from the last id it accepted in this run, with
/// the memory store (nothing on disk) and with SQLite (where the id loaded at start is stale).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_stream_resumes_from_the_last_id_it_accepted() {
    for storage in ["storage: { mode: memory }", "storage: { mode: sqlite }"] {
        let upstream = Upstream::start(quiet_upstream()).await.unwrap();
        let sink = Sink::start().await.unwrap();
        let config = |stream_extra: &str| {
            format!(
                "{}\n{storage}\n",
                both_streams(&upstream, stream_extra, &routes_to(&sink, &["first"]))
            )
        };
        let mut relay = TestRelay::start(&config("")).await;
        both_connected(&upstream).await;
        for n in 1..=5 {
            upstream.publish(
                Api::Chat,
                format!("id: evt-{n}\ndata: {{\"type\":\"update\",\"n\":{n}}}\n\n"),
            );
        }
        // An event no route takes still moves the stream's position.
        upstream.publish(Api::Participant, "id: p-1\ndata: {\"eventType\":\"MESSAGE_SENT\"}\n\n");
        sink.wait_for_delivered("/first", 6, DEADLINE).await;

        relay.reload(&config("idle_timeout: 30s")).await.unwrap();
        assert!(upstream.wait_for_connections_accepted(Api::Chat, 2, DEADLINE).await);
        assert!(
            upstream
                .wait_for_connections_accepted(Api::Participant, 2, DEADLINE)
                .await
        );
        let chat = upstream.requests_seen(Api::Chat);
        assert_eq!(chat.last().unwrap().header("last-event-id"), Some("evt-5"), "{storage}");
        let participant = upstream.requests_seen(Api::Participant);
        assert_eq!(
            participant.last().unwrap().header("last-event-id"),
            Some("p-1"),
            "{storage}"
        );
        relay.stop().await;
    }
}
