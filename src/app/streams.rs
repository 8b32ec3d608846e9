//! The streams a relay runs, by name: plain streams, the fixed instances of templates (`ids`,
//! `ids_file`), and the dynamic ones added through the admin API. Shared by the relay (start,
//! reload, shutdown), the admin API and the task that hears of instances ending on their own,
//! behind one lock.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use futures_util::future::BoxFuture;
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::{ApiError, StreamControl, StreamState};
use crate::config::{Config, InstanceId, RateLimit, StreamConfig, StreamInstance};
use crate::queue::lease::{Kind, LeaseWatch};
use crate::queue::{SavedInstance, Store};
use crate::routing::RoutingTable;
use crate::source::{self, ConnectLimiter, Router, StreamRuntime};
use crate::telemetry::{Metrics, StreamTelemetry};
use crate::tls::TrustedRoots;
use crate::transport::StreamClient;

/// What starting a stream takes.
pub(super) struct Starter {
    pub metrics: Arc<Metrics>,
    pub router: watch::Receiver<Arc<Router>>,
    pub trusted_roots: TrustedRoots,
    /// Shared by the streams without a `tls` section.
    pub shared_client: StreamClient,
    pub finished: mpsc::UnboundedSender<Arc<str>>,
    pub store: Store,
    /// Shared by every stream started with the current `connections.rate`.
    pub connect_limiter: Arc<ConnectLimiter>,
    pub connect_rate: RateLimit,
}

struct RunningStream {
    instance: StreamInstance,
    /// Added through the admin API.
    dynamic: bool,
    telemetry: Arc<StreamTelemetry>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// A stream built from its config, not yet started.
pub(super) struct PreparedStream {
    instance: StreamInstance,
    dynamic: bool,
    runtime: StreamRuntime,
    telemetry: Arc<StreamTelemetry>,
}

/// What a new config changes in the streams, prepared before anything changes.
pub(super) struct StreamPlan {
    /// Every stream the new config runs, by name, with the dynamic instances it keeps.
    wanted: BTreeMap<String, (StreamInstance, bool)>,
    new: Vec<PreparedStream>,
    streams: BTreeMap<String, StreamConfig>,
    clients: BTreeMap<String, StreamClient>,
}

pub(super) struct StreamSet {
    running: BTreeMap<String, RunningStream>,
    /// Fixed instances that ended on their own, with the config they ended with: not started
    /// again while it stays the same.
    /// Fixed instances that ended on their own, with (replicas) the lease kept for them.
    finished: BTreeMap<String, (StreamInstance, Option<LeaseWatch>)>,
    /// The config's streams and templates, by name.
    streams: BTreeMap<String, StreamConfig>,
    /// The client of each stream or template with a `tls` section of its own.
    clients: BTreeMap<String, StreamClient>,
    starter: Starter,
    /// The streams `/readyz` checks: all but dynamic instances; `None` until first published.
    ready_streams: Arc<RwLock<Option<Vec<Arc<StreamTelemetry>>>>>,
}

impl StreamSet {
    pub fn new(starter: Starter, ready_streams: Arc<RwLock<Option<Vec<Arc<StreamTelemetry>>>>>) -> StreamSet {
        StreamSet {
            running: BTreeMap::new(),
            finished: BTreeMap::new(),
            streams: BTreeMap::new(),
            clients: BTreeMap::new(),
            starter,
            ready_streams,
        }
    }

    /// How many streams run.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Builds what the new config runs that does not run yet; nothing changes.
    pub fn plan(&mut self, config: &Config, table: &RoutingTable) -> anyhow::Result<StreamPlan> {
        // A changed `connections.rate` applies to the streams started from now on.
        if config.connections.rate != self.starter.connect_rate {
            self.starter.connect_rate = config.connections.rate;
            self.starter.connect_limiter = Arc::new(ConnectLimiter::new(config.connections.rate));
        }
        let mut clients = BTreeMap::new();
        for (name, stream) in &config.streams {
            if let Some(tls) = &stream.tls {
                let client = super::stream_client(&self.starter.trusted_roots, Some(tls))
                    .with_context(|| format!("stream {name}: cannot set up its TLS client"))?;
                clients.insert(name.clone(), client);
            }
        }
        let mut wanted: BTreeMap<String, (StreamInstance, bool)> = config
            .stream_instances()
            .into_iter()
            .map(|(name, instance)| (name, (instance, false)))
            .collect();
        for running in self.running.values().filter(|running| running.dynamic) {
            let instance = &running.instance;
            if let Some(template) = config.streams.get(&instance.template).filter(|stream| stream.dynamic)
                && let Some(id) = &instance.id
            {
                let kept = StreamInstance::of(&instance.template, template, id.clone(), instance.config.ttl);
                wanted.insert(kept.name.clone(), (kept, true));
            }
        }
        let mut new = Vec::new();
        for (name, (instance, dynamic)) in &wanted {
            // A changed `tls` section changes the instance's config, and so restarts it.
            let running = self.running.get(name).map(|running| &running.instance);
            let finished = self.finished.get(name).map(|(instance, _)| instance);
            if running != Some(instance) && finished != Some(instance) {
                new.push(self.prepare(instance.clone(), *dynamic, table, &clients)?);
            }
        }
        Ok(StreamPlan {
            wanted,
            new,
            streams: config.streams.clone(),
            clients,
        })
    }

    /// Stops what the plan no longer runs or runs changed, starts what it prepared; returns
    /// the names of the streams stopped or restarted.
    pub async fn apply(&mut self, plan: StreamPlan) -> Vec<String> {
        let StreamPlan {
            wanted,
            new,
            streams,
            clients,
        } = plan;
        let restarting: std::collections::BTreeSet<&str> =
            new.iter().map(|prepared| prepared.instance.name.as_str()).collect();
        let mut stopped = Vec::new();
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            if wanted.contains_key(&name) && !restarting.contains(name.as_str()) {
                continue;
            }
            if let Some(old) = self.stop(&name).await {
                if old.dynamic && !wanted.contains_key(&name) {
                    warn!(stream = %name, "the template is no longer dynamic or is gone: its instance was removed");
                    self.forget(&old.instance).await;
                }
                stopped.push(name);
            }
        }
        self.finished
            .retain(|name, (instance, _)| wanted.get(name).is_some_and(|(wanted, _)| wanted == instance));
        self.streams = streams;
        self.clients = clients;
        for prepared in new {
            self.start(prepared);
        }
        self.publish();
        stopped
    }

    fn prepare(
        &self,
        instance: StreamInstance,
        dynamic: bool,
        table: &RoutingTable,
        clients: &BTreeMap<String, StreamClient>,
    ) -> anyhow::Result<PreparedStream> {
        let starter = &self.starter;
        let telemetry = Arc::new(starter.metrics.stream_instance(&instance.template, &instance.name));
        let client = clients.get(&instance.template).unwrap_or(&starter.shared_client);
        let finished = instance.id.is_some().then(|| starter.finished.clone());
        let runtime = StreamRuntime::new(
            &instance,
            table,
            Arc::clone(&telemetry),
            client,
            finished,
            Arc::clone(&starter.connect_limiter),
        )?;
        Ok(PreparedStream {
            instance,
            dynamic,
            runtime,
            telemetry,
        })
    }

    fn start(&mut self, prepared: PreparedStream) {
        let PreparedStream {
            instance,
            dynamic,
            runtime,
            telemetry,
        } = prepared;
        let stop = CancellationToken::new();
        let router = self.starter.router.clone();
        let task = match self.starter.store.leases() {
            Some(leases) => {
                let lease = leases.watch(Kind::Stream, &instance.name);
                let runtime = Arc::new(runtime.with_handover());
                tokio::spawn(source::run_leased_stream(runtime, router, stop.clone(), lease))
            }
            None => tokio::spawn(source::run_stream(Arc::new(runtime), router, stop.clone())),
        };
        let name = instance.name.clone();
        let running = RunningStream {
            instance,
            dynamic,
            telemetry,
            stop,
            task,
        };
        self.running.insert(name, running);
    }

    async fn stop(&mut self, name: &str) -> Option<RunningStream> {
        let mut running = self.running.remove(name)?;
        running.stop.cancel();
        let _ = (&mut running.task).await;
        Some(running)
    }

    /// Stops every stream (at shutdown), all at once.
    pub async fn stop_all(&mut self) {
        for stream in self.running.values() {
            stream.stop.cancel();
        }
        for (_, stream) in std::mem::take(&mut self.running) {
            let _ = stream.task.await;
        }
    }

    /// An instance ended on its own: a dynamic one is forgotten; a fixed one is not started
    /// again while its config stays the same.
    pub async fn instance_finished(&mut self, name: &str) {
        let Some(running) = self.running.remove(name) else {
            return;
        };
        let _ = running.task.await;
        if running.dynamic {
            self.forget(&running.instance).await;
        } else {
            // With replicas, its lease stays here, so that no other replica reads it again.
            let lease = self
                .starter
                .store
                .leases()
                .map(|leases| leases.watch_finished(Kind::Stream, name));
            self.finished.insert(name.to_owned(), (running.instance, lease));
        }
        self.publish();
    }

    async fn forget(&self, instance: &StreamInstance) {
        let Some(id) = &instance.id else { return };
        if let Err(err) = self
            .starter
            .store
            .forget_instance(&instance.template, id.as_str())
            .await
        {
            error!(stream = %instance.name, error = %err, "cannot forget the instance in the store");
        }
    }

    /// Starts the dynamic instances the store kept, with what is left of their ttl; those of
    /// templates that are gone or no longer dynamic, or whose ttl ran out, are forgotten.
    pub async fn restore(&mut self, saved: Vec<SavedInstance>, table: &RoutingTable) {
        let now = SystemTime::now();
        for kept in saved {
            let template = self.streams.get(&kept.template).filter(|stream| stream.dynamic);
            let ttl = kept
                .ends_at
                .map(|ends_at| ends_at.duration_since(now).unwrap_or_default());
            let id = InstanceId::new(&kept.id);
            match (template, id) {
                (Some(template), Ok(id)) if ttl.is_none_or(|ttl| !ttl.is_zero()) => {
                    let instance = StreamInstance::of(&kept.template, template, id, ttl);
                    match self.prepare(instance, true, table, &self.clients) {
                        Ok(prepared) => self.start(prepared),
                        Err(err) => error!(
                            stream = %kept.template, id = %kept.id, error = %format!("{err:#}"),
                            "cannot start a kept instance"
                        ),
                    }
                }
                _ => {
                    info!(
                        stream = %kept.template, id = %kept.id,
                        "a kept instance is not started again: its ttl ran out, or its template is gone or not dynamic"
                    );
                    if let Err(err) = self.starter.store.forget_instance(&kept.template, &kept.id).await {
                        error!(stream = %kept.template, error = %err, "cannot forget the instance in the store");
                    }
                }
            }
        }
        self.publish();
    }

    /// Makes the dynamic instances those kept in the shared store (replicas): another replica
    /// may have added some, or removed some.
    pub async fn sync_dynamic(&mut self, saved: Vec<SavedInstance>, table: &RoutingTable) {
        let kept: std::collections::HashSet<String> = saved
            .iter()
            .map(|instance| format!("{}/{}", instance.template, instance.id))
            .collect();
        let gone: Vec<String> = self
            .running
            .iter()
            .filter(|(name, running)| running.dynamic && !kept.contains(*name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &gone {
            if let Some(stopped) = self.stop(name).await {
                stopped.telemetry.disconnected_at_shutdown();
                info!(stream = %name, "stream instance removed on another replica");
            }
        }
        let new: Vec<SavedInstance> = saved
            .into_iter()
            .filter(|instance| {
                let name = format!("{}/{}", instance.template, instance.id);
                !self.running.contains_key(&name)
            })
            .collect();
        if !new.is_empty() || !gone.is_empty() {
            self.restore(new, table).await;
        }
    }

    /// Starts an instance of a dynamic template; `Ok(false)` when it runs already.
    async fn add(&mut self, template: &str, id: &str, ttl: Option<Duration>) -> Result<bool, ApiError> {
        let config = self.dynamic_template(template)?;
        let id = InstanceId::new(id).map_err(ApiError::bad_request)?;
        let name = format!("{template}/{id}");
        if self.running.contains_key(&name) {
            return Ok(false);
        }
        let ttl = ttl.or(config.ttl);
        let instance = StreamInstance::of(template, config, id.clone(), ttl);
        let table = Arc::clone(&self.starter.router.borrow());
        let prepared = self
            .prepare(instance, true, &table.table, &self.clients)
            .map_err(|err| ApiError::unavailable(format!("cannot start the instance: {err:#}")))?;
        let saved = SavedInstance {
            template: template.to_owned(),
            id: id.to_string(),
            ends_at: ttl.map(|ttl| SystemTime::now() + ttl),
        };
        self.starter
            .store
            .save_instance(saved)
            .await
            .map_err(|err| ApiError::unavailable(format!("cannot keep the instance in the store: {err}")))?;
        self.start(prepared);
        info!(stream = %name, ttl = ?ttl, "stream instance added");
        Ok(true)
    }

    /// Stops an instance that was added through the API.
    async fn remove(&mut self, template: &str, id: &str) -> Result<(), ApiError> {
        self.dynamic_template(template)?;
        let name = format!("{template}/{id}");
        match self.running.get(&name) {
            None => return Err(ApiError::not_found(format!("no instance {name} runs"))),
            Some(running) if !running.dynamic => {
                return Err(ApiError::conflict(format!(
                    "{name} comes from the config's ids or ids_file; remove it there"
                )));
            }
            Some(_) => {}
        }
        if let Some(stopped) = self.stop(&name).await {
            self.forget(&stopped.instance).await;
            stopped.telemetry.disconnected_at_shutdown();
        }
        info!(stream = %name, "stream instance removed");
        self.publish();
        Ok(())
    }

    fn dynamic_template(&self, template: &str) -> Result<&StreamConfig, ApiError> {
        let Some(config) = self.streams.get(template) else {
            let templates: Vec<&str> = self
                .streams
                .iter()
                .filter(|(_, stream)| stream.dynamic)
                .map(|(name, _)| name.as_str())
                .collect();
            return Err(ApiError::not_found(format!(
                "no stream template named `{template}`; dynamic templates: {}",
                if templates.is_empty() {
                    "none".to_owned()
                } else {
                    templates.join(", ")
                }
            )));
        };
        if !config.dynamic {
            return Err(ApiError::conflict(format!(
                "the stream `{template}` is not a dynamic template: give it a url with {{id}} and dynamic: true"
            )));
        }
        Ok(config)
    }

    fn list(&self) -> Vec<StreamState> {
        self.running
            .values()
            .map(|running| StreamState {
                template: running.instance.template.clone(),
                id: running.instance.id.as_ref().map(ToString::to_string),
                dynamic: running.dynamic,
                owner: None,
                state: running.telemetry.snapshot(),
            })
            .collect()
    }

    fn publish(&self) {
        let streams = self
            .running
            .values()
            .filter(|running| !running.dynamic)
            .map(|running| Arc::clone(&running.telemetry))
            .collect();
        *self
            .ready_streams
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(streams);
    }
}

/// The admin API's hold on the streams.
pub(super) struct SharedStreams(pub Arc<Mutex<StreamSet>>);

impl StreamControl for SharedStreams {
    fn add(&self, template: String, id: String, ttl: Option<Duration>) -> BoxFuture<'_, Result<bool, ApiError>> {
        Box::pin(async move { self.0.lock().await.add(&template, &id, ttl).await })
    }

    fn remove(&self, template: String, id: String) -> BoxFuture<'_, Result<(), ApiError>> {
        Box::pin(async move { self.0.lock().await.remove(&template, &id).await })
    }

    fn list(&self) -> BoxFuture<'_, Vec<StreamState>> {
        Box::pin(async move { self.0.lock().await.list() })
    }
}

/// Hears of instances that end on their own and takes them out of the set.
pub(super) fn watch_finished(
    streams: Arc<Mutex<StreamSet>>,
    mut finished: mpsc::UnboundedReceiver<Arc<str>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(name) = finished.recv().await {
            streams.lock().await.instance_finished(&name).await;
        }
    })
}
