//! Shared helpers of the integration tests: a relay started in-process, metric reads from its
//! admin server, the relay binary as a child process with its JSON log read, and waiting on
//! conditions with deadlines.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sse_relay::app::{self, Relay};
use sse_relay::config::{self, Config};
use sse_relay_fixtures::emulator::{Api, Upstream, UpstreamOptions};
use sse_relay_fixtures::metrics::metric_value;
use sse_relay_fixtures::process::{self, RelayBinary};
use sse_relay_fixtures::sink::{ReceivedRequest, Sink};

/// Long enough for a loaded 2-core CI machine; a passing test never waits for it.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// Parses test config text; `env` pairs stand in for the environment.
pub fn parse_config(yaml: &str, env: &[(&str, &str)]) -> Result<Config, config::ConfigError> {
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    config::parse(
        yaml,
        "test.yaml",
        Box::new(move |name| env.iter().find(|(key, _)| key == name).map(|(_, value)| value.clone())),
    )
}

/// The relay binary, as the tests start it: `TEST_RELAY_LOGS=1` shows a child's logs, for a
/// failing test.
pub fn relay_binary() -> RelayBinary {
    RelayBinary::new(env!("CARGO_BIN_EXE_sse-relay"), "TEST_RELAY_LOGS")
}

/// Waits until `check` holds, polling every 10 ms; panics naming `what` at the deadline.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A relay running in this process, with its admin server on an ephemeral port.
pub struct TestRelay {
    relay: Option<Relay>,
    pub admin: SocketAddr,
    http: reqwest::Client,
    /// The SQLite store's directory, removed when the relay is dropped.
    _storage: tempfile::TempDir,
}

impl TestRelay {
    pub async fn start(yaml: &str) -> TestRelay {
        Self::start_with_env(yaml, &[]).await
    }

    pub async fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> TestRelay {
        let mut config = parse_config(yaml, env).unwrap_or_else(|err| panic!("test config is invalid: {err}\n{yaml}"));
        let storage = tempfile::tempdir().unwrap();
        config.storage.path = config::Text(storage.path().display().to_string());
        let relay = app::start(config).await.expect("the relay starts");
        TestRelay {
            admin: relay.admin_addr(),
            relay: Some(relay),
            http: reqwest::Client::new(),
            _storage: storage,
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await
            .expect("the admin server answers");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    /// The value of one sample, e.g. `metric("sse_relay_deliveries_total", &[("target", "a"),
    /// ("outcome", "delivered")])`; 0 when the sample does not exist yet.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (_, text) = self.get("/metrics").await;
        metric_value(&text, name, labels)
    }

    /// Waits until the sample reaches at least `minimum`, and returns it.
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], minimum: f64) -> f64 {
        let started = Instant::now();
        loop {
            let value = self.metric(name, labels).await;
            if value >= minimum {
                return value;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "timed out waiting for {name}{labels:?} >= {minimum}; it is {value}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Applies a new config, as SIGHUP does; the storage path stays the running one's.
    pub async fn reload(&mut self, yaml: &str) -> anyhow::Result<()> {
        let mut config = parse_config(yaml, &[]).map_err(anyhow::Error::new)?;
        config.storage.path = config::Text(self._storage.path().display().to_string());
        self.relay.as_mut().expect("running").reload(config).await
    }

    pub async fn stop(mut self) {
        if let Some(relay) = self.relay.take() {
            relay.shutdown().await.expect("the relay stops cleanly");
        }
    }
}

/// Keepalives slow enough to stay out of the way unless a test wants them.
pub fn quiet_upstream() -> UpstreamOptions {
    UpstreamOptions {
        participant_keepalive: Duration::from_secs(3600),
        chat_keepalive: Duration::from_secs(3600),
        ..UpstreamOptions::default()
    }
}

/// A relay config with both upstreams as streams `participant` and `chat`, configured as the
/// example config does, plus `targets` and `routes` YAML written by the test.
pub fn both_streams(upstream: &Upstream, stream_extra: &str, targets_and_routes: &str) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
shutdown: {{ grace_period: 2s }}
streams:
  participant:
    url: {participant}
    event_type: [/eventType]
    keepalive: [KEEP_ALIVE]
    {stream_extra}
  chat:
    url: {chat}
    event_type: [/type]
    default_event_type: workflow_update
    keepalive: [keepalive]
    {stream_extra}
{targets_and_routes}
"#,
        participant = upstream.participant_url("42"),
        chat = upstream.chat_url("3f1c"),
    )
}

/// One target `hook` at the sink's `/hook` that receives every event of every stream.
pub fn everything_to(sink: &Sink, target_extra: &str) -> String {
    format!(
        r#"
targets:
  hook:
    url: {url}
    max_in_flight: 1
    retry: {{ initial_delay: 20ms, max_delay: 100ms }}
    {target_extra}
routes:
  - stream: "*"
    targets: [hook]
"#,
        url = sink.url("/hook"),
    )
}

pub async fn both_connected(upstream: &Upstream) {
    assert!(
        upstream.wait_for_clients(Api::Participant, 1, DEADLINE).await,
        "participant stream connects"
    );
    assert!(
        upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await,
        "chat stream connects"
    );
}

pub fn bodies(requests: &[ReceivedRequest]) -> Vec<String> {
    requests
        .iter()
        .map(|request| String::from_utf8_lossy(&request.body).into_owned())
        .collect()
}

/// The line of `relay.example.yaml` (from 1) that first names `${variable`: where an error
/// about that variable is placed, however the example's comments above it change.
pub fn example_line_of(variable: &str) -> usize {
    let needle = format!("${{{variable}");
    include_str!("../../relay.example.yaml")
        .lines()
        .position(|line| line.contains(&needle))
        .map(|index| index + 1)
        .unwrap_or_else(|| panic!("relay.example.yaml names no {needle}"))
}

/// Makes a FIFO at `path`: opening it for reading waits for a writer, and reading it waits for
/// data, so whatever reads one by mistake hangs.
pub fn make_fifo(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c_path` is a valid NUL-terminated path that outlives the call.
    assert_eq!(
        unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) },
        0,
        "mkfifo {}",
        path.display()
    );
}

/// The relay binary as a child process whose JSON log lines, at `info`, the test reads. Its
/// config is the test's YAML after an `admin` section on a free port and a `storage` section in
/// a temporary directory.
pub struct LoggedRelay {
    /// Killed when dropped.
    child: tokio::process::Child,
    pub admin: SocketAddr,
    /// The config and the store, removed when dropped.
    directory: tempfile::TempDir,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    http: reqwest::Client,
    /// `${ADMIN_TOKEN}` from the environment given, when the config sets `admin.token`: metrics
    /// are read with it.
    admin_token: Option<String>,
    /// The environment it was started with, for `dlq`.
    env: Vec<(String, String)>,
    /// The config's admin, storage and shutdown sections, kept by `reload`.
    header: String,
}

impl LoggedRelay {
    /// Starts the relay and waits until its admin server answers.
    pub async fn start(yaml: &str, env: &[(&str, &str)]) -> LoggedRelay {
        Self::start_with(yaml, env, |_| {}).await
    }

    /// Like [`LoggedRelay::start`], with `adjust` applied to the command first (to set resource
    /// limits, say).
    pub async fn start_with(
        yaml: &str,
        env: &[(&str, &str)],
        adjust: impl FnOnce(&mut tokio::process::Command),
    ) -> LoggedRelay {
        Self::launch(tempfile::tempdir().unwrap(), yaml, env, None, adjust).await
    }

    /// A replica: the relay with `storage` as its storage section (PostgreSQL), and
    /// `admin.token` set to `${ADMIN_TOKEN}`.
    pub async fn start_replica(storage: &str, yaml: &str, env: &[(&str, &str)]) -> LoggedRelay {
        let yaml = format!("storage: {storage}\n{yaml}");
        Self::launch(tempfile::tempdir().unwrap(), &yaml, env, Some("${ADMIN_TOKEN}"), |_| {}).await
    }

    /// Rewrites the config with `yaml` after the same admin, storage and shutdown sections,
    /// sends SIGHUP, and waits until the reload is logged as applied.
    pub async fn reload(&self, yaml: &str) {
        let n_reloads = self
            .log_lines()
            .iter()
            .filter(|line| line.contains("config reloaded"))
            .count();
        std::fs::write(
            self.directory.path().join("relay.yaml"),
            format!("{}{yaml}", self.header),
        )
        .unwrap();
        self.signal(libc::SIGHUP);
        eventually("the reload applied", DEADLINE, || {
            let n = self
                .log_lines()
                .iter()
                .filter(|line| line.contains("config reloaded"))
                .count();
            std::future::ready(n > n_reloads)
        })
        .await;
    }

    /// The config file it runs.
    pub fn config_path(&self) -> std::path::PathBuf {
        self.directory.path().join("relay.yaml")
    }

    /// Sends the relay a signal (SIGSTOP, SIGCONT, SIGTERM).
    pub fn signal(&self, signal: i32) {
        // SAFETY: signals the child this test started and still owns.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Waits until the relay exits (after SIGTERM, say).
    pub async fn wait_exit(&mut self) {
        let _ = tokio::time::timeout(DEADLINE, self.child.wait()).await;
    }

    /// Like [`LoggedRelay::start`], with `admin.token` set to `${ADMIN_TOKEN}`.
    pub async fn start_with_admin_token(yaml: &str, env: &[(&str, &str)]) -> LoggedRelay {
        Self::launch(tempfile::tempdir().unwrap(), yaml, env, Some("${ADMIN_TOKEN}"), |_| {}).await
    }

    /// Kills the relay with SIGKILL and hands back its directory, store included.
    pub async fn kill_keeping_storage(mut self) -> tempfile::TempDir {
        self.child.start_kill().expect("the relay can be killed");
        let _ = self.child.wait().await;
        self.directory
    }

    /// Starts a relay on the store that `directory` kept (see `kill_keeping_storage`), with
    /// `admin.token` set to `${ADMIN_TOKEN}`.
    pub async fn restart_in(directory: tempfile::TempDir, yaml: &str, env: &[(&str, &str)]) -> LoggedRelay {
        Self::launch(directory, yaml, env, Some("${ADMIN_TOKEN}"), |_| {}).await
    }

    async fn launch(
        directory: tempfile::TempDir,
        yaml: &str,
        env: &[(&str, &str)],
        admin_token: Option<&str>,
        adjust: impl FnOnce(&mut tokio::process::Command),
    ) -> LoggedRelay {
        use tokio::io::AsyncBufReadExt;

        let admin = SocketAddr::from(([127, 0, 0, 1], process::free_port().await));
        let token = admin_token.map_or(String::new(), |token| format!(", token: \"{token}\""));
        let storage = if yaml.starts_with("storage:") {
            String::new()
        } else {
            format!("storage: {{ path: \"{}\" }}\n", directory.path().join("data").display())
        };
        let header = format!("admin: {{ listen: \"{admin}\"{token} }}\n{storage}shutdown: {{ grace_period: 1s }}\n");
        // A replica's storage section comes first in `yaml`, and stays with a reload.
        let (storage_line, yaml) = match yaml.strip_prefix("storage:") {
            Some(rest) => {
                let (line, yaml) = rest.split_once('\n').unwrap_or((rest, ""));
                (format!("storage:{line}\n"), yaml)
            }
            None => (String::new(), yaml),
        };
        let header = format!("{header}{storage_line}");
        let config_path = directory.path().join("relay.yaml");
        std::fs::write(&config_path, format!("{header}{yaml}")).unwrap();
        let mut command = relay_binary().run_command(&config_path);
        command
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .envs(env.iter().copied());
        adjust(&mut command);
        let mut child = command.spawn().expect("the relay binary starts");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let collected = std::sync::Arc::clone(&lines);
        let pid = child.id().unwrap_or_default();
        tokio::spawn(async move {
            let echo = std::env::var_os("TEST_RELAY_LOGS").is_some();
            while let Ok(Some(line)) = stdout.next_line().await {
                if echo {
                    println!("relay[{pid}]: {line}");
                }
                collected.lock().unwrap().push(line);
            }
        });
        let relay = LoggedRelay {
            child,
            admin,
            directory,
            lines,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            header,
            env: env
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
            admin_token: admin_token.and_then(|_| {
                env.iter()
                    .find(|(name, _)| *name == "ADMIN_TOKEN")
                    .map(|(_, token)| (*token).to_owned())
            }),
        };
        eventually("the relay's admin server answers", DEADLINE, || async {
            relay.get("/healthz").await.0 == 200
        })
        .await;
        relay
    }

    /// The status and body of a GET on the admin server; status 0 when it does not answer.
    pub async fn get(&self, path: &str) -> (u16, String) {
        self.get_as(path, None).await
    }

    /// Like [`LoggedRelay::get`], with `Authorization: Bearer <token>`.
    pub async fn get_with_token(&self, path: &str, token: &str) -> (u16, String) {
        self.get_as(path, Some(token)).await
    }

    async fn get_as(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let mut request = self
            .http
            .get(format!("http://{}{path}", self.admin))
            .timeout(Duration::from_secs(5));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await;
        match response {
            Ok(response) => (response.status().as_u16(), response.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(
            &self.get_as("/metrics", self.admin_token.as_deref()).await.1,
            name,
            labels,
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the relay is running")
    }

    /// Every log line so far, as written.
    pub fn log_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until a log line contains `text`, and returns that line.
    pub async fn wait_for_log(&self, text: &str) -> String {
        let mut found = None;
        eventually(&format!("a log line with {text:?}"), DEADLINE, || {
            found = self.log_lines().into_iter().find(|line| line.contains(text));
            std::future::ready(found.is_some())
        })
        .await;
        found.expect("found")
    }

    /// `sse-relay dlq <args>` on this relay's store; its standard output.
    pub async fn dlq(&self, args: &[&str]) -> String {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_sse-relay"))
            .arg("dlq")
            .args(args)
            .arg("--config")
            .arg(self.directory.path().join("relay.yaml"))
            .envs(self.env.iter().map(|(name, value)| (name.as_str(), value.as_str())))
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
}
