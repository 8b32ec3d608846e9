//! The admin server: who may read `/metrics`, and what it does with clients that misbehave.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use sse_relay::admin::{MAX_CONNECTIONS, REQUEST_HEAD_TIMEOUT};
use sse_relay_fixtures::emulator::{Api, Upstream};
use sse_relay_fixtures::sink::Sink;

use crate::support::{DEADLINE, LoggedRelay, TestRelay, both_streams, eventually, everything_to, quiet_upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_of_the_admin_token_is_case_insensitive() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let yaml = both_streams(&upstream, "", &everything_to(&sink, "")).replace(
        "admin: { listen: \"127.0.0.1:0\" }",
        "admin: { listen: \"127.0.0.1:0\", token: \"${ADMIN_TOKEN}\" }",
    );
    let relay = TestRelay::start_with_env(&yaml, &[("ADMIN_TOKEN", "admin-0009")]).await;
    let client = reqwest::Client::new();
    let metrics_url = format!("http://{}/metrics", relay.admin);
    for (authorization, expected_status) in [
        ("Bearer admin-0009", 200),
        ("bearer admin-0009", 200),
        ("BEARER admin-0009", 200),
        ("Bearer  admin-0009", 200),
        ("Basic admin-0009", 401),
        ("bearer admin-0010", 401),
    ] {
        let response = client
            .get(&metrics_url)
            .header("authorization", authorization)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected_status, "Authorization: {authorization}");
    }
    relay.stop().await;
}

/// Runs the relay binary with these soft and hard limits on open files.
fn with_open_file_limit(soft: u64, hard: u64) -> impl FnOnce(&mut tokio::process::Command) {
    move |command| {
        // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
        unsafe {
            command.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard));
        }
    }
}

fn chat_to_hook(upstream: &Upstream, sink: &Sink) -> String {
    format!(
        r#"
streams:
  chat:
    url: {chat}
    event_type: [/type]
    keepalive: [keepalive]
targets:
  hook: {{ url: "{hook}", retry: {{ initial_delay: 20ms, max_delay: 100ms }} }}
routes:
  - stream: chat
    targets: [hook]
"#,
        chat = upstream.chat_url("3f1c"),
        hook = sink.url("/hook"),
    )
}

/// Waits until the server closes `stream` (end of file or reset); false if it has not by `until`.
async fn closed_by_server(stream: &mut TcpStream, until: tokio::time::Instant) -> bool {
    let mut buffer = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(until, stream.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // A response to a request the test sent; the close comes after it.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_cannot_take_the_descriptors_deliveries_need() {
    const N_IDLE: usize = 300;
    // This test holds N_IDLE sockets of its own.
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    // Fewer descriptors than idle clients: without a connection limit the admin server would
    // take them all.
    let relay = LoggedRelay::start_with(&chat_to_hook(&upstream, &sink), &[], with_open_file_limit(200, 200)).await;
    eventually("the relay is ready", DEADLINE, || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;

    let connected_at = tokio::time::Instant::now();
    let mut idle = Vec::new();
    for _ in 0..N_IDLE {
        idle.push(TcpStream::connect(relay.admin).await.unwrap());
    }
    upstream.publish_event(Api::Chat, r#"{"n":1}"#);

    // All but MAX_CONNECTIONS are closed at once, long before the request head timeout could
    // have closed them.
    let mut n_closed = 0;
    for stream in &mut idle {
        if closed_by_server(stream, connected_at + REQUEST_HEAD_TIMEOUT).await {
            n_closed += 1;
        }
    }
    assert!(
        n_closed >= N_IDLE - MAX_CONNECTIONS,
        "{n_closed} of {N_IDLE} idle connections were closed before the head timeout"
    );
    let got = sink.wait_for_delivered("/hook", 1, DEADLINE).await.len();
    if got != 1 {
        let (_, metrics) = relay.get("/metrics").await;
        for line in metrics.lines().filter(|line| !line.starts_with('#')) {
            eprintln!("METRIC {line}");
        }
        eprintln!("SINK requests {:?}", sink.requests("/hook").len());
        eprintln!("EMULATOR connected {:?}", upstream.connected_entities(Api::Chat));
    }
    assert_eq!(got, 1);
    // The rest are closed by the head timeout, and readiness answers again.
    for stream in &mut idle {
        assert!(closed_by_server(stream, tokio::time::Instant::now() + DEADLINE).await);
    }
    let (status, body) = relay.get("/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    upstream.publish_event(Api::Chat, r#"{"n":2}"#);
    assert_eq!(sink.wait_for_delivered("/hook", 2, DEADLINE).await.len(), 2);
    let refused = relay.metric("sse_relay_admin_connections_refused_total", &[]).await;
    assert!(refused >= (N_IDLE - MAX_CONNECTIONS) as f64, "{refused}");
    assert!(
        relay
            .log_lines()
            .iter()
            .all(|line| !line.contains("Too many open files"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_head_and_an_idle_kept_alive_connection_are_closed() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let relay = TestRelay::start(&both_streams(&upstream, "", &everything_to(&sink, ""))).await;
    let mut half_sent = TcpStream::connect(relay.admin).await.unwrap();
    half_sent
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n")
        .await
        .unwrap();
    let mut kept_alive = TcpStream::connect(relay.admin).await.unwrap();
    kept_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await
        .unwrap();
    let mut response = [0u8; 1024];
    let n_read = kept_alive.read(&mut response).await.unwrap();
    assert!(response[..n_read].starts_with(b"HTTP/1.1 200 OK\r\n"));
    let started = tokio::time::Instant::now();
    for stream in [&mut half_sent, &mut kept_alive] {
        assert!(closed_by_server(stream, started + DEADLINE).await);
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_raises_its_soft_open_file_limit_to_the_hard_one() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let relay = LoggedRelay::start_with(&chat_to_hook(&upstream, &sink), &[], with_open_file_limit(100, 3000)).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", relay.pid())).unwrap();
    let open_files = limits.lines().find(|line| line.starts_with("Max open files")).unwrap();
    assert_eq!(
        open_files.split_whitespace().collect::<Vec<_>>()[3..5],
        ["3000", "3000"],
        "{open_files}"
    );
    let logged = relay.wait_for_log("open file limit").await;
    assert!(logged.contains("\"limit\":3000"), "{logged}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_says_when_the_open_file_limit_cannot_hold_its_streams() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let ids: Vec<String> = (0..300).map(|n| n.to_string()).collect();
    let yaml = format!(
        r#"
streams:
  chat:
    url: {chat}
    rotate_after: 29m
    ids: [{ids}]
targets:
  hook: {{ url: "{hook}", max_in_flight: 50 }}
routes:
  - stream: chat
    targets: [hook]
"#,
        chat = upstream.chat_url("{id}"),
        ids = ids.join(", "),
        hook = sink.url("/hook"),
    );
    let relay = LoggedRelay::start_with(&yaml, &[], with_open_file_limit(500, 500)).await;
    let logged = relay
        .wait_for_log("the open file limit cannot hold the configured streams and targets")
        .await;
    for expected in [
        "\"limit\":500",
        "\"needed\":778",
        "\"stream_connections\":600",
        "\"target_connections\":50",
        "LimitNOFILE",
    ] {
        assert!(logged.contains(expected), "{expected} in {logged}");
    }
}
