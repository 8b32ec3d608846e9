//! Wires the parts together, owns every task, and stops them in order.
//!
//! Shutdown order: stop the streams (nothing new is accepted), let the dispatchers finish for up
//! to the grace period, stop what is left (counted and logged; with SQLite it stays on disk for
//! the next run), close the store, and stop the admin server last.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sd_notify::NotifyState;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::delivery::{self, TargetRuntime};
use crate::event::{StreamId, TargetId};
use crate::queue::Store;
use crate::routing::RoutingTable;
use crate::source::{self, Dispatch, StreamRuntime};
use crate::telemetry::Metrics;

/// A running relay: its tasks and how to stop them.
pub struct Relay {
    admin_addr: SocketAddr,
    grace_period: Duration,
    stop_streams: CancellationToken,
    stop_deliveries: CancellationToken,
    stop_admin: CancellationToken,
    streams: JoinSet<()>,
    dispatchers: JoinSet<()>,
    admin: JoinHandle<std::io::Result<()>>,
    store: Store,
    metrics: Arc<Metrics>,
}

/// Runs the relay until `shutdown` completes, then stops it in order. Under systemd
/// (`Type=notify`) it reports READY=1 once started, WATCHDOG=1 while the runtime is alive, and
/// STOPPING=1 when it begins to stop.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let relay = start(config).await?;
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
    shutdown.await;
    notify_service_manager(NotifyState::Stopping);
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    relay.shutdown().await
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
    let table = RoutingTable::new(&config);
    let target_names: Vec<Arc<str>> = config.targets.keys().map(|name| Arc::from(name.as_str())).collect();
    let user_agent = concat!("sse-relay/", env!("CARGO_PKG_VERSION"));
    let delivery_client = reqwest::Client::builder()
        .user_agent(user_agent)
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .context("cannot build the HTTP client")?;
    let stream_client = reqwest::Client::builder()
        .user_agent(user_agent)
        .connect_timeout(Duration::from_secs(10))
        .tcp_keepalive(Duration::from_secs(30))
        .build()
        .context("cannot build the HTTP client")?;

    // The dispatchers' inputs come first: the store hands them what it has stored.
    let target_telemetry: Vec<_> = config.targets.keys().map(|name| metrics.target(name)).collect();
    let (dispatcher_inputs, dispatcher_outputs): (Vec<_>, Vec<_>) = target_telemetry
        .iter()
        .map(|telemetry| delivery::dispatcher_input(telemetry.queue_depth.clone()))
        .unzip();
    let store = Store::open(
        &config.storage,
        Arc::clone(&metrics.storage),
        target_names.iter().cloned().zip(dispatcher_inputs).collect(),
    )?;
    let stop_deliveries = CancellationToken::new();
    let mut dispatchers = JoinSet::new();
    let targets = config
        .targets
        .iter()
        .zip(target_telemetry)
        .zip(dispatcher_outputs)
        .enumerate();
    for (index, (((name, target_config), telemetry), input)) in targets {
        telemetry.queue_depth.set(store.initial_pending(name) as i64);
        let target = Arc::new(TargetRuntime::new(TargetId(index), target_config, telemetry)?);
        let task = delivery::spawn_dispatcher(&target, input, &store, &delivery_client, &stop_deliveries);
        dispatchers.spawn(async move {
            let _ = task.await;
        });
        info!(target = %name, url = %target.display_url, max_in_flight = target.max_in_flight, "target ready");
    }

    let dispatch = Arc::new(Dispatch {
        table,
        store: store.clone(),
    });
    let stop_streams = CancellationToken::new();
    let mut streams = JoinSet::new();
    let mut stream_telemetry = Vec::with_capacity(config.streams.len());
    for (index, (name, stream_config)) in config.streams.iter().enumerate() {
        let id = StreamId(index);
        let telemetry = Arc::new(metrics.stream(name, dispatch.table.event_type_labels(id)));
        let stream = StreamRuntime::new(
            id,
            stream_config,
            &dispatch.table,
            Arc::clone(&telemetry),
            &stream_client,
        )?;
        stream_telemetry.push(telemetry);
        streams.spawn(source::run_stream(
            Arc::new(stream),
            Arc::clone(&dispatch),
            stop_streams.clone(),
        ));
    }
    drop(dispatch);

    let stop_admin = CancellationToken::new();
    let admin_state = Arc::new(AdminState {
        metrics: Arc::clone(&metrics),
        streams: stream_telemetry,
        store: store.clone(),
    });
    let admin = tokio::spawn(admin::serve(listener, admin_state, stop_admin.clone()));
    info!(
        admin = %admin_addr, n_streams = config.streams.len(), n_targets = config.targets.len(),
        n_routes = config.routes.len(), "relay started"
    );

    Ok(Relay {
        admin_addr,
        grace_period: config.shutdown.grace_period,
        stop_streams,
        stop_deliveries,
        stop_admin,
        streams,
        dispatchers,
        admin,
        store,
        metrics,
    })
}

impl Relay {
    /// Where `/metrics`, `/healthz` and `/readyz` are served (useful when configured on port 0).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops the streams, lets the dispatchers finish for up to the grace period (with the
    /// memory store, that means delivering what it holds), stops what is left, and closes the
    /// store.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        info!("shutting down: streams stop, deliveries in progress finish");
        self.stop_streams.cancel();
        while self.streams.join_next().await.is_some() {}
        self.store.finish_submissions().await;

        let finished = tokio::time::timeout(self.grace_period, async {
            while self.dispatchers.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            self.stop_deliveries.cancel();
            while self.dispatchers.join_next().await.is_some() {}
        }
        self.store.close().await;

        self.stop_admin.cancel();
        match self.admin.await {
            Ok(result) => result.context("the admin server failed")?,
            Err(err) => return Err(err).context("the admin server task failed"),
        }
        info!("relay stopped");
        Ok(())
    }
}
