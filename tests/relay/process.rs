//! The binary as a child process: `check`, and `run` under a stand-in for systemd.

use std::process::{Output, Stdio};

use tokio::net::UnixDatagram;
use tokio::process::Command;

use sse_relay_fixtures::emulator::{Api, Upstream};
use sse_relay_fixtures::metrics::read_metric;
use sse_relay_fixtures::process::free_port;
use sse_relay_fixtures::sink::Sink;

use crate::support::{DEADLINE, eventually, example_line_of, make_fifo, quiet_upstream, relay_binary};

const BINARY: &str = env!("CARGO_BIN_EXE_sse-relay");

fn write_config(directory: &tempfile::TempDir, name: &str, yaml: &str) -> std::path::PathBuf {
    let path = directory.path().join(name);
    std::fs::write(&path, yaml).unwrap();
    path
}

/// `sse-relay check`, killed and failed at the deadline if it hangs.
async fn check(config: &std::path::Path, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BINARY);
    command
        .arg("check")
        .arg("--config")
        .arg(config)
        .env_clear()
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    tokio::time::timeout(DEADLINE, command.output())
        .await
        .unwrap_or_else(|_| panic!("check --config {} still runs after {DEADLINE:?}", config.display()))
        .expect("the binary runs")
}

#[tokio::test]
async fn check_reports_errors_with_their_place() {
    let directory = tempfile::tempdir().unwrap();
    let valid = "streams:\n  chat:\n    url: http://127.0.0.1:1/listen\n    idle_timeout: 10s\ntargets:\n  n8n:\n    url: http://127.0.0.1:2/hook\nroutes:\n  - stream: chat\n    targets: [n8n]\n";
    let cases = [
        (
            valid.replace("    idle_timeout", "    colour: blue\n    idle_timeout"),
            ":4:5: streams.chat: unknown key `colour`",
        ),
        (
            valid.replace("[n8n]", "[zapier]"),
            ":10:15: routes[0].targets[0]: unknown target `zapier`; configured targets: n8n",
        ),
        (
            valid.replace(
                "\ntargets:",
                "\n  chat: { url: \"http://127.0.0.1:1/other\" }\ntargets:",
            ),
            ":5:3: streams: duplicate key `chat` (first defined at line 2)",
        ),
        (
            valid.replace(
                "idle_timeout: 10s",
                "idle_timeout: 10s\n    headers: { X-Key: \"a\\x01b\" }",
            ),
            ":5:23: streams.chat.headers.X-Key: the value with a line break or another control character, which an HTTP header cannot carry",
        ),
        (
            valid.replace("10s", "10 parsecs"),
            ":4:19: streams.chat.idle_timeout: `10 parsecs` is not a duration: write one like `30s`, `500ms` or `2m`",
        ),
    ];
    for (yaml, expected) in cases {
        let path = write_config(&directory, "bad.yaml", &yaml);
        let output = check(&path, &[]).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "check accepted:\n{yaml}");
        assert!(
            stderr.starts_with(&format!("error: {}{expected}", path.display())),
            "stderr: {stderr}"
        );
    }
    let path = write_config(&directory, "good.yaml", valid);
    let output = check(&path, &[]).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

/// `check` prints every problem of the file, one `error:` line each, and fails: a new user sees
/// all the variables the example needs in one run.
#[tokio::test]
async fn check_reports_every_problem_one_per_line() {
    let directory = tempfile::tempdir().unwrap();
    let path = write_config(&directory, "relay.yaml", include_str!("../../relay.example.yaml"));
    let output = check(
        &path,
        &[("ZAPIER_HOOK_URL", "https://hooks.zapier.com/hooks/catch/1/a")],
    )
    .await;
    assert!(!output.status.success());
    let expected: String = [
        format!(
            ":{}:10: streams.participant.url: environment variable PARTICIPANT_STREAM_URL is not set",
            example_line_of("PARTICIPANT_STREAM_URL")
        ),
        format!(
            ":{}:22: streams.participant.headers.Authorization: environment variable PARTICIPANT_TOKEN is not set",
            example_line_of("PARTICIPANT_TOKEN")
        ),
        format!(
            ":{}:18: streams.participant.headers.X-API-Key: environment variable PARTICIPANT_API_KEY is not set",
            example_line_of("PARTICIPANT_API_KEY")
        ),
        format!(
            ":{}:10: streams.chat.url: environment variable SPLOX_CHAT_ID is not set",
            example_line_of("SPLOX_CHAT_ID")
        ),
        format!(
            ":{}:31: streams.chat.headers.Authorization: environment variable SPLOX_TOKEN is not set",
            example_line_of("SPLOX_TOKEN")
        ),
        format!(
            ":{}:21: targets.n8n.signing_secret: environment variable N8N_SIGNING_SECRET is not set",
            example_line_of("N8N_SIGNING_SECRET")
        ),
    ]
    .iter()
    .map(|line| format!("error: {}{line}\n", path.display()))
    .collect();
    assert_eq!(String::from_utf8_lossy(&output.stderr), expected);
    assert!(output.stdout.is_empty());
}

/// `run` refuses an invalid config as `check` does, every problem on a line of its own, before it
/// starts anything: no log line, no storage directory.
#[tokio::test]
async fn run_reports_every_problem_before_starting_anything() {
    let directory = tempfile::tempdir().unwrap();
    let storage = directory.path().join("data");
    let yaml = format!(
        "storage: {{ path: \"{}\" }}\nstreams:\n  chat:\n    url: http://127.0.0.1:1/c\n    headers: {{ X-Key: \"a\\x01b\" }}\n\
         targets:\n  n8n: {{ url: \"${{N8N_URL}}\" }}\n",
        storage.display()
    );
    let path = write_config(&directory, "relay.yaml", &yaml);
    let output = tokio::time::timeout(
        DEADLINE,
        Command::new(BINARY)
            .args(["run", "--config"])
            .arg(&path)
            .env_clear()
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run exits before the deadline")
    .unwrap();
    assert!(!output.status.success());
    let expected: String = [
        ":5:23: streams.chat.headers.X-Key: the value with a line break or another control character, which an HTTP header cannot carry",
        ":7:15: targets.n8n.url: environment variable N8N_URL is not set",
    ]
    .iter()
    .map(|line| format!("error: {}{line}\n", path.display()))
    .collect();
    assert_eq!(String::from_utf8_lossy(&output.stderr), expected);
    assert!(output.stdout.is_empty(), "{}", String::from_utf8_lossy(&output.stdout));
    assert!(!storage.exists(), "run made its storage directory");
}

/// A FIFO as a secret file or as the config file is refused at once, naming it: opening one
/// would wait for a writer forever.
#[tokio::test]
async fn check_refuses_a_fifo_at_once() {
    let directory = tempfile::tempdir().unwrap();
    let fifo = directory.path().join("fifo");
    make_fifo(&fifo);
    let yaml = format!(
        "streams:\n  chat:\n    url: http://127.0.0.1:1/listen\n    headers: {{ Authorization: \"${{file:{}}}\" }}\ntargets: {{}}\n",
        fifo.display()
    );
    let cases = [
        (
            write_config(&directory, "relay.yaml", &yaml),
            format!(
                ":4:31: streams.chat.headers.Authorization: cannot read the secret file {}: not a regular file",
                fifo.display()
            ),
        ),
        (fifo.clone(), ": cannot read the file: not a regular file".to_owned()),
    ];
    for (path, expected) in cases {
        let output = check(&path, &[]).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "check accepted {}", path.display());
        assert_eq!(stderr, format!("error: {}{expected}\n", path.display()));
    }
}

#[tokio::test]
async fn dlq_needs_only_the_storage_section() {
    let directory = tempfile::tempdir().unwrap();
    let storage = directory.path().join("data");
    let yaml = "storage: { path: \"${STATE_DIRECTORY}\" }\nstreams:\n  chat:\n    url: ${CHAT_URL}\n    headers: { Authorization: \"Bearer ${CHAT_TOKEN}\" }\ntargets:\n  n8n: { url: \"${N8N_URL}\" }\nroutes:\n  - stream: chat\n    targets: [n8n]\n";
    let path = write_config(&directory, "relay.yaml", yaml);
    let state = ("STATE_DIRECTORY", storage.to_str().unwrap());
    let output = Command::new(BINARY)
        .args(["dlq", "list", "--config"])
        .arg(&path)
        .env_clear()
        .env(state.0, state.1)
        .output()
        .await
        .unwrap();
    // It gets as far as the database, which does not exist yet: the unset variables of the
    // streams and targets did not stop it.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("no queue database at {}", storage.join("relay.db").display())),
        "{stderr}"
    );
    // The whole config still needs them.
    let output = check(&path, &[state]).await;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("CHAT_URL"));
}

#[tokio::test]
async fn check_masks_secrets() {
    let directory = tempfile::tempdir().unwrap();
    let yaml = r#"
streams:
  participant:
    url: http://127.0.0.1:1/participants/42/stream?access_token=${QUERY_TOKEN}
    headers: { Authorization: "Bearer ${TOKEN}", X-API-Key: "${API_KEY}" }
targets:
  zapier: { url: "${ZAPIER_HOOK_URL}", headers: { X-Signature-Key: "${TOKEN}" } }
routes:
  - stream: participant
    targets: [zapier]
"#;
    let secrets = [
        ("TOKEN", "sekret-bearer-0001"),
        ("API_KEY", "sekret-api-key-0002"),
        ("QUERY_TOKEN", "sekret-query-0003"),
        (
            "ZAPIER_HOOK_URL",
            "https://hooks.zapier.com/hooks/catch/123/sekret-hook-0004/",
        ),
    ];
    let output = check(&write_config(&directory, "relay.yaml", yaml), &secrets).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!stdout.contains("sekret"), "a secret leaked:\n{stdout}");
    assert!(stdout.contains("url https://hooks.zapier.com/…"), "{stdout}");
    assert!(stdout.contains("header Authorization: ***"), "{stdout}");
    assert!(
        stdout.contains("url http://127.0.0.1:1/participants/42/stream?***"),
        "{stdout}"
    );
}

/// What `${file:...}` and `${cred:...}` read is never shown, even in fields that are not
/// secrets: `check` shows the reference. A stream URL whose path comes from any reference shows
/// only its scheme and host.
#[tokio::test]
async fn check_shows_references_to_secret_files_not_their_contents() {
    let directory = tempfile::tempdir().unwrap();
    let secret = |name: &str, contents: &str| {
        std::fs::write(directory.path().join(name), contents).unwrap();
        format!("${{file:{}}}", directory.path().join(name).display())
    };
    let storage = secret("storage", "/tmp/sekret-path-0007");
    let event_type = secret("event-type", "sekret-type-0008\n");
    let pattern = secret("pattern", "sekret-pattern-0009*");
    std::fs::write(directory.path().join("keepalive"), "sekret-keepalive-0010").unwrap();
    let yaml = format!(
        r#"
storage: {{ path: "{storage}" }}
streams:
  chat:
    url: http://127.0.0.1:1/c/${{CHAT_ID}}/listen
    default_event_type: "{event_type}"
    keepalive: ["${{cred:keepalive}}", literal-keepalive]
targets:
  n8n: {{ url: "http://127.0.0.1:2/hook" }}
routes:
  - stream: chat
    events: ["{pattern}", literal-event]
    targets: [n8n]
"#
    );
    let credentials = directory.path().display().to_string();
    let output = check(
        &write_config(&directory, "relay.yaml", &yaml),
        &[("CHAT_ID", "sekret-chat-0011"), ("CREDENTIALS_DIRECTORY", &credentials)],
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!stdout.contains("sekret"), "a secret leaked:\n{stdout}");
    for expected in [
        format!("sqlite {storage}/relay.db"),
        "url http://127.0.0.1:1/…".to_owned(),
        format!("else {event_type}\n"),
        "keepalive ${cred:keepalive}, literal-keepalive".to_owned(),
        format!("events {pattern}, literal-event"),
    ] {
        assert!(stdout.contains(&expected), "no {expected:?} in:\n{stdout}");
    }
}

/// `check` shows each stream's timers: idle_timeout, the reconnect delays and rotate_after.
#[tokio::test]
async fn check_shows_each_stream_s_idle_reconnect_and_rotation_settings() {
    let directory = tempfile::tempdir().unwrap();
    let yaml = "streams:\n  chat:\n    url: http://127.0.0.1:1/c\n    idle_timeout: 10s\n    rotate_after: 29m\n    \
        reconnect: { initial_delay: 1s, max_delay: 1m, auth_failure_delay: 5m }\n  participant:\n    url: http://127.0.0.1:1/p\n\
        targets: {}\n";
    let output = check(&write_config(&directory, "relay.yaml", yaml), &[]).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "    idle_timeout 10s, max_event_bytes 1048576\n    \
         reconnect initial_delay 1s doubling to max_delay 1m, auth_failure_delay 5m\n    rotate_after 29m\n",
        "    idle_timeout 45s, max_event_bytes 1048576\n    \
         reconnect initial_delay 500ms doubling to max_delay 30s, auth_failure_delay 1m\n    rotate_after off\n",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
}

/// With `storage.mode: memory`, `check` warns that a restart loses each stream's Last-Event-ID,
/// so an upstream that replays its buffer gets those events delivered again; not with SQLite.
#[tokio::test]
async fn check_warns_that_memory_storage_forgets_the_last_event_id() {
    let directory = tempfile::tempdir().unwrap();
    let yaml = "storage: { mode: memory }\nstreams:\n  chat: { url: \"http://127.0.0.1:1/c\" }\ntargets: {}\n";
    let output = check(&write_config(&directory, "memory.yaml", yaml), &[]).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "warning: storage.mode is memory: a restart loses the queued deliveries and each stream's Last-Event-ID, \
         so an upstream that replays its buffer to a new connection (Nchan does by default) has those \
         events delivered again, under new Idempotency-Keys; storage.mode: sqlite keeps both\n"
    );
    let sqlite = write_config(&directory, "sqlite.yaml", &yaml.replace("memory", "sqlite"));
    let output = check(&sqlite, &[]).await;
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stderr), "");
}

/// Receives one sd_notify datagram, or panics at the deadline.
async fn notification(socket: &UnixDatagram) -> String {
    let mut buffer = [0u8; 512];
    let n = tokio::time::timeout(DEADLINE, socket.recv(&mut buffer))
        .await
        .expect("a notification before the deadline")
        .unwrap();
    String::from_utf8_lossy(&buffer[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_under_a_service_manager_and_exits_0_on_sigterm() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let admin_port = free_port().await;
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin_port}" }}
shutdown: {{ grace_period: 2s }}
storage: {{ path: "{storage}" }}
streams:
  chat:
    url: {chat}
    headers: {{ Authorization: "Bearer ${{SPLOX_TOKEN}}" }}
    event_type: [/type]
    keepalive: [keepalive]
targets:
  n8n: {{ url: "{hook}" }}
routes:
  - stream: chat
    targets: [n8n]
"#,
        chat = upstream.chat_url("3f1c"),
        hook = sink.url("/hook"),
        storage = directory.path().join("data").display(),
    );
    let config = write_config(&directory, "relay.yaml", &yaml);
    let notify_path = directory.path().join("notify.sock");
    let notify_socket = UnixDatagram::bind(&notify_path).unwrap();

    let mut relay = Command::new(BINARY)
        .args(["run", "--config"])
        .arg(&config)
        .env("SPLOX_TOKEN", "sekret-token-0005")
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    assert_eq!(notification(&notify_socket).await, "READY=1\n");
    let health = sse_relay::admin::probe(&format!("http://127.0.0.1:{admin_port}/healthz")).await;
    assert!(health.is_ok(), "{health:?}");
    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);
    upstream.publish_event(Api::Chat, r#"{"type":"workflow_status","is_active":false}"#);
    assert_eq!(sink.wait_for_delivered("/hook", 1, DEADLINE).await.len(), 1);
    assert_eq!(notification(&notify_socket).await, "WATCHDOG=1\n");

    let pid = i32::try_from(relay.id().unwrap()).unwrap();
    // SAFETY: sends a signal to the child this test started and still owns.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let mut notifications = Vec::new();
    while notifications.last().is_none_or(|last| last != "STOPPING=1\n") {
        notifications.push(notification(&notify_socket).await);
    }
    let status = tokio::time::timeout(DEADLINE, relay.wait())
        .await
        .expect("exits before the deadline")
        .unwrap();
    assert!(status.success(), "exit status {status}");

    let output = relay.wait_with_output().await.unwrap();
    let logs = String::from_utf8_lossy(&output.stdout);
    assert!(!logs.contains("sekret"), "a secret leaked into the logs:\n{logs}");
    for line in logs.lines() {
        let record: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not a JSON log line ({err}): {line}"));
        assert!(record["level"].is_string() && record["message"].is_string(), "{line}");
    }
    assert!(logs.contains(r#""message":"relay stopped""#), "{logs}");
}

#[tokio::test]
async fn check_warns_about_literal_secrets_in_a_world_readable_file() {
    use std::os::unix::fs::PermissionsExt as _;
    let directory = tempfile::tempdir().unwrap();
    let literal = "streams:\n  chat:\n    url: http://127.0.0.1:1/c\n    headers: { Authorization: \"Bearer literal-0006\" }\ntargets: {}\n";
    let path = write_config(&directory, "relay.yaml", literal);
    let stderr_of = |output: Output| String::from_utf8_lossy(&output.stderr).into_owned();

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let warned = stderr_of(check(&path, &[]).await);
    assert!(
        warned.contains("is readable by every user and holds 1 credential(s) written literally"),
        "{warned}"
    );
    assert!(!warned.contains("literal-0006"), "{warned}");

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(stderr_of(check(&path, &[]).await), "");

    let referenced = write_config(
        &directory,
        "referenced.yaml",
        &literal.replace("literal-0006", "${TOKEN}"),
    );
    std::fs::set_permissions(&referenced, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(stderr_of(check(&referenced, &[("TOKEN", "t")]).await), "");
}

/// A reload that names a FIFO fails at once and is counted; the relay still stops on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_names_a_fifo_fails_without_stopping_the_relay() {
    let directory = tempfile::tempdir().unwrap();
    let fifo = directory.path().join("token");
    make_fifo(&fifo);
    let admin_port = free_port().await;
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:{admin_port}\" }}\nstorage: {{ path: \"{}\" }}\nstreams:\n  chat:\n    url: http://127.0.0.1:1/listen\n    headers: {{ Authorization: \"TOKEN\" }}\ntargets: {{}}\n",
        directory.path().join("data").display()
    );
    let config = write_config(&directory, "relay.yaml", &yaml);
    let mut relay = relay_binary().spawn_run(&config, &[]);
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
    let failed_reloads = || async {
        read_metric(admin, "sse_relay_config_reloads_total", &[("result", "failed")])
            .await
            .unwrap_or(-1.0)
    };
    eventually("the relay serves metrics", DEADLINE, || async {
        failed_reloads().await == 0.0
    })
    .await;

    let pid = i32::try_from(relay.id().unwrap()).unwrap();
    write_config(
        &directory,
        "relay.yaml",
        &yaml.replace("TOKEN", &format!("${{file:{}}}", fifo.display())),
    );
    // SAFETY: signals the child this test started and still owns.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    eventually("the failed reload counted", DEADLINE, || async {
        failed_reloads().await == 1.0
    })
    .await;

    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(DEADLINE, relay.wait())
        .await
        .expect("exits before the deadline")
        .unwrap();
    assert!(status.success(), "exit status {status}");
}
