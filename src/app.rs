//! Wires the parts together, owns every task, applies reloads, and stops everything in order.
//!
//! A reload is applied as a difference: a stream or target whose config is unchanged keeps
//! running (an unchanged stream keeps its connection); a changed one is restarted; a removed one
//! stops (a removed target's pending deliveries become dead letters); a new one starts. The
//! routing table is swapped whole, and each stream uses the new one from its next event.
//!
//! Shutdown order: stop the streams (nothing new is accepted), let the store write and hand on
//! what was submitted, let the dispatchers finish for up to the grace period, stop what is left
//! (counted and logged; with SQLite it stays on disk for the next run), close the store, and stop
//! the admin server last.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use sd_notify::NotifyState;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

mod streams;

use crate::admin::{self, AdminState};
use crate::app::streams::{SharedStreams, Starter, StreamSet};
use crate::cluster::Cluster;
use crate::config::{self, Config, TargetConfig, TlsConfig};
use crate::delivery::{self, TargetRuntime};
use crate::event::TargetId;
use crate::queue::Store;
use crate::queue::lease::Kind;
use crate::queue::outbox::{Outbox, OutboxInput, Outboxes};
use crate::routing::RoutingTable;
use crate::source::{ConnectLimiter, Router};
use crate::telemetry::{Metrics, SummaryTotals};
use crate::tls::TrustedRoots;
use crate::transport::StreamClient;
use crate::transport::http1::Http1Client;

/// A running relay: its tasks and how to change or stop them.
pub struct Relay {
    config: Config,
    admin_addr: SocketAddr,
    metrics: Arc<Metrics>,
    store: Store,
    /// The certificate authorities every client trusts, read once at start.
    trusted_roots: TrustedRoots,
    /// Shared by the targets without a `tls` section of their own.
    delivery_client: reqwest::Client,
    router: watch::Sender<Arc<Router>>,
    /// Plain streams and template instances (`chat/8f1c`), shared with the admin API.
    streams: Arc<Mutex<StreamSet>>,
    /// Takes instances that ended on their own out of `streams`.
    finished_watcher: JoinHandle<()>,
    /// Each `ids_file` of the running config (by template), and how it looked when read.
    ids_files: BTreeMap<String, (PathBuf, Option<FileStamp>)>,
    targets: BTreeMap<String, RunningTarget>,
    stop_admin: CancellationToken,
    admin: JoinHandle<std::io::Result<()>>,
    /// Logs a summary every `logging.summary_interval`; none when it is 0.
    summary: Option<JoinHandle<()>>,
    /// With storage shared by replicas: this replica's membership and leases.
    cluster: Option<Cluster>,
}

struct RunningTarget {
    config: TargetConfig,
    input: OutboxInput,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// A target built from its config, with its outbox, not yet started.
struct PreparedTarget {
    name: String,
    config: TargetConfig,
    runtime: Arc<TargetRuntime>,
    client: reqwest::Client,
    input: OutboxInput,
    outbox: Outbox,
}

/// What a file looked like: changed when either differs.
type FileStamp = (std::time::SystemTime, u64);

fn file_stamp(path: &std::path::Path) -> Option<FileStamp> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

fn ids_files(config: &Config) -> BTreeMap<String, (PathBuf, Option<FileStamp>)> {
    config
        .streams
        .iter()
        .filter_map(|(name, stream)| {
            let path = stream.ids_file.as_ref()?.path.clone();
            let stamp = file_stamp(&path);
            Some((name.clone(), (path, stamp)))
        })
        .collect()
}

/// How often `ids_file`s are looked at for changes.
const IDS_FILE_INTERVAL: Duration = Duration::from_secs(2);

/// How often a replica reads the dynamic instances the replicas keep in PostgreSQL.
const INSTANCE_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the relay until `shutdown` completes, then stops it in order. Under systemd
/// (`Type=notify`) it reports READY=1 once started, WATCHDOG=1 while the runtime is alive, and
/// STOPPING=1 when it begins to stop.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with_reloads(config, None, shutdown).await
}

/// Like [`run`]; with `config_path`, SIGHUP re-reads the config from it and applies it. An
/// invalid config is logged and counted, and the running one stays.
pub async fn run_with_reloads(
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // Before the admin server answers: a SIGHUP sent once it does must not kill the process.
    let mut hangups = hangup_signals();
    let mut relay = start(config).await?;
    let storage = match relay.config.storage.mode {
        config::StorageMode::Sqlite => relay.config.storage.path.0.clone(),
        config::StorageMode::Memory => "memory (lost when the process stops)".to_owned(),
        config::StorageMode::Postgres => {
            let replica = relay
                .store
                .leases()
                .map(|leases| leases.replica().to_string())
                .unwrap_or_default();
            format!(
                "{} as replica {replica}",
                crate::queue::postgres::describe(&relay.config.storage)
            )
        }
    };
    info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %config_path.as_deref().map_or_else(|| "-".into(), |path| path.display().to_string()),
        %storage, admin = %relay.admin_addr, n_streams = relay.streams.lock().await.len(),
        n_targets = relay.config.targets.len(), n_routes = relay.config.routes.len(), "sse-relay started"
    );
    notify_service_manager(NotifyState::Ready);
    let watchdog = sd_notify::watchdog_enabled().map(|timeout| {
        tokio::spawn(async move {
            // Pinging at half the timeout tolerates one late tick.
            let mut ticks = tokio::time::interval(timeout / 2);
            loop {
                ticks.tick().await;
                notify_service_manager(NotifyState::Watchdog);
            }
        })
    });
    tokio::pin!(shutdown);
    let mut ids_file_checks = tokio::time::interval(IDS_FILE_INTERVAL);
    ids_file_checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut instance_checks = tokio::time::interval(INSTANCE_SYNC_INTERVAL);
    instance_checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ids_file_checks.tick(), if !relay.ids_files.is_empty() => relay.reload_changed_ids_files().await,
            _ = instance_checks.tick(), if relay.cluster.is_some() => relay.sync_dynamic_instances().await,
            Some(()) = hangups.recv(), if config_path.is_some() => {
                // systemd wants the time of the reload with RELOADING=1.
                if let Ok(now) = NotifyState::monotonic_usec_now()
                    && let Err(err) = sd_notify::notify(&[NotifyState::Reloading, now])
                {
                    warn!(error = %err, "cannot notify the service manager");
                }
                if let Some(path) = &config_path {
                    relay.reload_from(path).await;
                }
                notify_service_manager(NotifyState::Ready);
            }
        }
    }
    notify_service_manager(NotifyState::Stopping);
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    relay.shutdown().await
}

/// SIGHUP, as a channel; empty where there are no Unix signals.
fn hangup_signals() -> tokio::sync::mpsc::Receiver<()> {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    if let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                // A reload already waiting covers this one too.
                let _ = sender.try_send(());
            }
        });
    }
    #[cfg(not(unix))]
    drop(sender);
    receiver
}

/// Does nothing when not started by systemd (no `NOTIFY_SOCKET`).
fn notify_service_manager(state: NotifyState<'_>) {
    if let Err(err) = sd_notify::notify(&[state]) {
        warn!(error = %err, "cannot notify the service manager");
    }
}

/// Starts every task of the relay and returns once the admin port is bound.
pub async fn start(config: Config) -> anyhow::Result<Relay> {
    let listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("cannot listen on the admin address {}", config.admin.listen))?;
    let admin_addr = listener.local_addr()?;

    let metrics = Metrics::new();
    let trusted_roots = TrustedRoots::load();
    let delivery_client = delivery_client(&trusted_roots, None).context("cannot build the HTTP client")?;
    let stream_client = stream_client(&trusted_roots, None).context("cannot build the HTTP client")?;

    let store = Store::open(&config.storage, Arc::clone(&metrics.storage)).await?;
    let cluster = match &store {
        Store::Postgres(shared) => Some(Cluster::join(shared.clone(), Arc::clone(&metrics)).await?),
        Store::Memory(_) | Store::Sqlite(_) => None,
    };
    for orphan in store
        .pending_targets()
        .iter()
        .filter(|name| !config.targets.contains_key(*name))
    {
        retire_target(&store, orphan).await;
    }

    let table = RoutingTable::new(&config);
    let (router, router_receiver) = watch::channel(Arc::new(Router::new(table, store.clone(), &metrics)));
    let (finished_sender, finished_receiver) = mpsc::unbounded_channel();
    let ready_streams = Arc::new(RwLock::new(None));
    let starter = Starter {
        metrics: Arc::clone(&metrics),
        router: router_receiver,
        trusted_roots: trusted_roots.clone(),
        shared_client: stream_client.clone(),
        finished: finished_sender,
        store: store.clone(),
        connect_limiter: Arc::new(ConnectLimiter::new(config.connections.rate)),
        connect_rate: config.connections.rate,
    };
    let streams = Arc::new(Mutex::new(StreamSet::new(starter, Arc::clone(&ready_streams))));

    let stop_admin = CancellationToken::new();
    let admin_state = Arc::new(AdminState {
        metrics: Arc::clone(&metrics),
        streams: ready_streams,
        store: store.clone(),
        token: config.admin.token.as_ref().map(|token| token.0.clone()),
        control: Arc::new(SharedStreams(Arc::clone(&streams))),
        samples: std::sync::Mutex::default(),
    });
    tokio::spawn(admin::sample_totals(Arc::clone(&admin_state), stop_admin.clone()));
    let admin = tokio::spawn(admin::serve(listener, admin_state, stop_admin.clone()));

    let finished_watcher = streams::watch_finished(Arc::clone(&streams), finished_receiver);
    let mut relay = Relay {
        config: config.clone(),
        admin_addr,
        metrics,
        store,
        trusted_roots,
        delivery_client,
        router,
        streams,
        finished_watcher,
        ids_files: ids_files(&config),
        targets: BTreeMap::new(),
        stop_admin,
        admin,
        summary: None,
        cluster,
    };
    relay.start_summary();
    let mut targets = Vec::new();
    for (index, (name, target_config)) in config.targets.iter().enumerate() {
        targets.push(relay.prepare_target(index, name, target_config)?);
    }
    // The outboxes come first: the store hands them what it has stored.
    let outboxes = targets
        .iter()
        .map(|target| (Arc::from(target.name.as_str()), target.input.clone()))
        .collect();
    relay.store.set_outboxes(outboxes).await;
    for target in targets {
        relay.start_target(target);
    }
    {
        let router = Arc::clone(&relay.router.borrow());
        let mut streams = relay.streams.lock().await;
        let plan = streams.plan(&config, &router.table)?;
        streams.apply(plan).await;
        streams.restore(relay.store.saved_instances(), &router.table).await;
    }
    Ok(relay)
}

const USER_AGENT: &str = concat!("sse-relay/", env!("CARGO_PKG_VERSION"));

/// The client streams connect with: the lean HTTP/1.1 client, or reqwest (redirects within the
/// stream's origin only, no `Referer`, TCP keepalive) when an HTTP proxy is set in the
/// environment. Neither follows a redirect to another origin.
fn stream_client(roots: &TrustedRoots, tls: Option<&TlsConfig>) -> anyhow::Result<StreamClient> {
    if !crate::transport::proxy_in_environment() {
        let config = Arc::new(roots.client_config(tls)?);
        return Ok(StreamClient::Http1(Http1Client::new(config, USER_AGENT)));
    }
    Ok(StreamClient::Reqwest(
        reqwest::Client::builder()
            .use_preconfigured_tls(roots.client_config(tls)?)
            .user_agent(USER_AGENT)
            .redirect(crate::transport::redirect_policy())
            .referer(false)
            .connect_timeout(Duration::from_secs(10))
            .tcp_keepalive(Duration::from_secs(30))
            .build()?,
    ))
}

/// The client deliveries are made with.
fn delivery_client(roots: &TrustedRoots, tls: Option<&TlsConfig>) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(roots.client_config(tls)?)
        .user_agent(USER_AGENT)
        // A redirected POST would become a GET elsewhere, carrying the target's headers there:
        // a 3xx is a permanent failure instead (see delivery/retry.rs).
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()?)
}

async fn retire_target(store: &Store, target: &str) {
    match store.retire_target(Arc::from(target)).await {
        Ok(0) => {}
        Ok(n_deliveries) => warn!(
            webhook = %target, n_deliveries,
            "the target is no longer configured; its pending deliveries were kept as dead letters (sse-relay dlq list)"
        ),
        Err(err) => {
            error!(webhook = %target, error = %err, "cannot keep the deliveries of a removed target as dead letters")
        }
    }
}

impl Relay {
    /// Where `/metrics`, `/healthz` and `/readyz` are served (useful when configured on port 0).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The shared delivery client, or one of the target's own when it has a `tls` section.
    fn target_client(&self, name: &str, config: &TargetConfig) -> anyhow::Result<reqwest::Client> {
        match &config.tls {
            Some(tls) => delivery_client(&self.trusted_roots, Some(tls))
                .with_context(|| format!("target {name}: cannot set up its TLS client")),
            None => Ok(self.delivery_client.clone()),
        }
    }

    /// Builds a target and its outbox; nothing runs yet.
    fn prepare_target(&self, index: usize, name: &str, config: &TargetConfig) -> anyhow::Result<PreparedTarget> {
        let telemetry = Arc::new(self.metrics.target(name));
        let runtime = Arc::new(TargetRuntime::new(TargetId(index), config, Arc::clone(&telemetry))?);
        let client = self.target_client(name, config)?;
        let (input, outbox) = self.store.outbox(name, telemetry, runtime.queue_capacity);
        Ok(PreparedTarget {
            name: name.to_owned(),
            config: config.clone(),
            runtime,
            client,
            input,
            outbox,
        })
    }

    fn start_target(&mut self, target: PreparedTarget) {
        let PreparedTarget {
            name,
            config,
            runtime,
            client,
            input,
            outbox,
        } = target;
        let stop = CancellationToken::new();
        let lease = self.store.leases().map(|leases| leases.watch(Kind::Target, &name));
        let task = delivery::spawn_dispatcher(&runtime, outbox, &client, &stop, lease);
        info!(
            webhook = %runtime.telemetry.name, url = %runtime.display_url, max_in_flight = runtime.max_in_flight,
            "target ready"
        );
        let running = RunningTarget {
            config,
            input,
            stop,
            task,
        };
        self.targets.insert(name, running);
    }

    /// Reads each `ids_file` that changed since it was read and applies its ids: only the
    /// instances added or removed start or stop. A file that cannot be read is logged, and
    /// its instances stay as they are.
    /// With replicas: starts the dynamic instances another replica added, and stops those
    /// another replica removed (or that ended there), as the database keeps them.
    pub async fn sync_dynamic_instances(&mut self) {
        let Store::Postgres(shared) = &self.store else { return };
        // A failure is counted and logged by the store's telemetry; the next check tries again.
        let Ok(saved) = shared.current_instances().await else {
            return;
        };
        let table = Arc::clone(&self.router.borrow());
        self.streams.lock().await.sync_dynamic(saved, &table.table).await;
    }

    pub async fn reload_changed_ids_files(&mut self) {
        let mut config = self.config.clone();
        let mut changed = false;
        for (template, (path, stamp)) in &mut self.ids_files {
            let now = file_stamp(path);
            if now == *stamp {
                continue;
            }
            *stamp = now;
            match config::IdsFile::read(path) {
                Ok(ids_file) => {
                    if let Some(stream) = config.streams.get_mut(template) {
                        stream.ids_file = Some(ids_file);
                        changed = true;
                    }
                }
                Err(err) => error!(
                    stream = %template, error = %err,
                    "the ids file changed but cannot be used; the instances stay as they are"
                ),
            }
        }
        if changed && let Err(err) = self.reload(config).await {
            error!(error = %format!("{err:#}"), "cannot apply the changed ids file");
        }
    }

    /// Starts logging a summary every `logging.summary_interval`, replacing a running one.
    fn start_summary(&mut self) {
        if let Some(running) = self.summary.take() {
            running.abort();
        }
        let interval = self.config.logging.summary_interval;
        if interval.is_zero() {
            return;
        }
        let metrics = Arc::clone(&self.metrics);
        self.summary = Some(tokio::spawn(async move {
            let mut totals = SummaryTotals::default();
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            loop {
                ticks.tick().await;
                metrics.log_summary(&mut totals);
            }
        }));
    }

    /// Re-reads the config file and applies it; failures are logged and counted, and the
    /// running config stays.
    pub async fn reload_from(&mut self, path: &std::path::Path) {
        let applied = match config::load(path) {
            Ok(config) => self.reload(config).await,
            Err(err) => Err(anyhow::Error::new(err)),
        };
        match applied {
            Ok(()) => self.metrics.config_reloaded(true, &""),
            Err(err) => self.metrics.config_reloaded(false, &format_args!("{err:#}")),
        }
    }

    /// Applies a new config as a difference from the running one (see the module comment).
    /// `admin` and `storage` change only with a restart.
    pub async fn reload(&mut self, config: Config) -> anyhow::Result<()> {
        anyhow::ensure!(
            config.admin == self.config.admin && config.storage == self.config.storage,
            "admin and storage settings change only with a restart; nothing was changed"
        );

        // Everything that can fail comes first, while nothing has changed yet.
        let mut new_targets = Vec::new();
        for (index, (name, target_config)) in config.targets.iter().enumerate() {
            if self
                .targets
                .get(name)
                .is_none_or(|running| running.config != *target_config)
            {
                new_targets.push(self.prepare_target(index, name, target_config)?);
            }
        }
        let table = RoutingTable::new(&config);
        // Held to the end: the streams API waits while the streams change.
        let streams = Arc::clone(&self.streams);
        let mut streams = streams.lock().await;
        let plan = streams.plan(&config, &table)?;

        // The store switches to the new outboxes before the routing table names them, and
        // before the old dispatchers stop; a new outbox buffers (or, with SQLite, leaves on
        // disk) what arrives until its dispatcher starts, after the old one has stopped, so
        // that the two never attempt the same delivery.
        let mut outboxes: Outboxes = HashMap::new();
        for (name, running) in &self.targets {
            if config.targets.get(name) == Some(&running.config) {
                outboxes.insert(Arc::from(name.as_str()), running.input.clone());
            }
        }
        for target in &new_targets {
            outboxes.insert(Arc::from(target.name.as_str()), target.input.clone());
        }
        self.store.set_outboxes(outboxes).await;
        self.router
            .send_replace(Arc::new(Router::new(table, self.store.clone(), &self.metrics)));
        let mut replaced = Vec::new();
        for name in self.targets.keys().cloned().collect::<Vec<_>>() {
            if config.targets.get(&name) == Some(&self.targets[&name].config) {
                continue;
            }
            if let Some(old) = self.targets.remove(&name) {
                old.stop.cancel();
                let _ = old.task.await;
                replaced.push(name.clone());
            }
            if !config.targets.contains_key(&name) {
                retire_target(&self.store, &name).await;
            }
        }
        for target in new_targets {
            self.start_target(target);
        }

        // Streams: unchanged ones keep their connection.
        let restarted = streams.apply(plan).await;
        info!(
            streams_restarted_or_stopped = ?restarted, targets_restarted_or_stopped = ?replaced,
            n_streams = streams.len(), n_targets = config.targets.len(), n_routes = config.routes.len(),
            "config reloaded"
        );
        self.ids_files = ids_files(&config);
        let summary_changed = config.logging != self.config.logging;
        self.config = config;
        if summary_changed {
            self.start_summary();
        }
        Ok(())
    }

    /// Stops the streams, lets the dispatchers finish for up to the grace period (with the
    /// memory store, that means delivering what it holds), stops what is left, and closes the
    /// store.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        info!("shutting down: streams stop, deliveries in progress finish");
        // Other replicas take this one's streams over, make-before-break, before it stops them.
        if let Some(cluster) = &self.cluster {
            cluster.hand_over(self.config.storage.lease_ttl).await;
        }
        self.streams.lock().await.stop_all().await;
        self.finished_watcher.abort();
        // Bounded: with a full disk the store may never take what is still waiting.
        let grace_period = self.config.shutdown.grace_period;
        if tokio::time::timeout(grace_period, self.store.finish_submissions())
            .await
            .is_err()
        {
            warn!("events waiting for storage at shutdown were not stored");
        }

        let targets = std::mem::take(&mut self.targets);
        let stops: Vec<CancellationToken> = targets.values().map(|target| target.stop.clone()).collect();
        let mut tasks: Vec<JoinHandle<()>> = targets.into_values().map(|target| target.task).collect();
        let finished = tokio::time::timeout(self.config.shutdown.grace_period, async {
            for task in &mut tasks {
                let _ = task.await;
            }
        })
        .await;
        if finished.is_err() {
            for stop in &stops {
                stop.cancel();
            }
            for task in tasks.into_iter().filter(|task| !task.is_finished()) {
                let _ = task.await;
            }
        }
        if let Some(cluster) = self.cluster.take() {
            cluster.leave().await;
        }
        self.store.close().await;

        if let Some(summary) = self.summary.take() {
            summary.abort();
        }
        self.stop_admin.cancel();
        match self.admin.await {
            Ok(result) => result.context("the admin server failed")?,
            Err(err) => return Err(err).context("the admin server task failed"),
        }
        info!("relay stopped");
        Ok(())
    }
}
