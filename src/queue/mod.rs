//! The delivery queue between routing and delivery: every routed (event, target) pair is
//! submitted to a [`Store`], which hands it to the target's dispatcher once stored; it leaves
//! the store only by success or dead letter.
//!
//! Two stores: SQLite (the default), where an append returns once its transaction is fsync'd,
//! and memory, which is faster and loses what it holds when the process dies. Both bound the
//! number of pending deliveries: at `max_pending`, appends wait, which pauses the streams.

pub mod directory;
pub mod lease;
pub mod memory;
pub mod outbox;
pub mod postgres;
pub mod postgres_connect;
pub mod schema;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{StorageConfig, StorageMode};
use crate::event::Event;
use crate::queue::outbox::{Backlog, Outbox, OutboxInput, Outboxes};
use crate::telemetry::{StorageTelemetry, TargetTelemetry};

/// Identifies a delivery in its store; increases in the order deliveries were appended.
pub type DeliveryId = i64;

/// One event on its way to one target, with its retry state.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: DeliveryId,
    pub event: Arc<Event>,
    pub n_attempts: u32,
    pub first_attempt_at: Option<SystemTime>,
    pub next_attempt_at: SystemTime,
}

impl Delivery {
    pub fn new(id: DeliveryId, event: Arc<Event>) -> Delivery {
        Delivery {
            id,
            event,
            n_attempts: 0,
            first_attempt_at: None,
            next_attempt_at: SystemTime::UNIX_EPOCH,
        }
    }
}

/// The result of an attempt, as the store records it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The target accepted it: the delivery leaves the store.
    Delivered,
    /// It is tried again at `next_attempt_at`.
    Retry {
        n_attempts: u32,
        first_attempt_at: Option<SystemTime>,
        next_attempt_at: SystemTime,
        last_error: String,
    },
    /// It failed for good: the delivery leaves the queue for the dead letters.
    DeadLetter {
        n_attempts: u32,
        last_status: Option<u16>,
        last_error: String,
    },
}

impl Outcome {
    /// The delivery is tried again at its `next_attempt_at`.
    pub fn retry(delivery: &Delivery, last_error: String) -> Outcome {
        Outcome::Retry {
            n_attempts: delivery.n_attempts,
            first_attempt_at: delivery.first_attempt_at,
            next_attempt_at: delivery.next_attempt_at,
            last_error,
        }
    }

    pub fn dead_letter(delivery: &Delivery, last_status: Option<u16>, last_error: String) -> Outcome {
        Outcome::DeadLetter {
            n_attempts: delivery.n_attempts,
            last_status,
            last_error,
        }
    }

    /// The delivery leaves the queue with this outcome (its space is freed).
    pub fn ends_delivery(&self) -> bool {
        matches!(self, Outcome::Delivered | Outcome::DeadLetter { .. })
    }
}

/// A change to the instances a store keeps.
pub enum InstanceChange {
    Save(SavedInstance),
    Forget { template: String, id: String, name: String },
}

/// A template instance added at run time, kept so that a restart brings it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedInstance {
    pub template: String,
    pub id: String,
    /// When its `ttl` runs out, if it has one.
    pub ends_at: Option<SystemTime>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("storage failed: {0}")]
    Failed(String),
    #[error("the storage writer has stopped")]
    Stopped,
    #[error("the relay stopped while the store could not take it (storage failing or full)")]
    NotTakenAtStop,
}

/// The store of every delivery not yet delivered or dead-lettered. Streams submit to it; each
/// target reads its deliveries from its [`Outbox`] and records what became of them there.
#[derive(Clone)]
pub enum Store {
    Memory(memory::MemoryStore),
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PostgresStore),
}

impl Store {
    /// Opens the store. It hands what it stores to the outboxes that `set_outboxes` names.
    pub async fn open(config: &StorageConfig, storage: Arc<StorageTelemetry>) -> anyhow::Result<Store> {
        Ok(match config.mode {
            StorageMode::Memory => Store::Memory(memory::MemoryStore::new(config.max_pending.0 as u64, storage)),
            StorageMode::Sqlite => Store::Sqlite(sqlite::SqliteStore::open(config, storage)?),
            StorageMode::Postgres => Store::Postgres(postgres::PostgresStore::open(config, storage).await?),
        })
    }

    /// The leases of a store that several replicas share.
    pub fn leases(&self) -> Option<&Arc<lease::Leases>> {
        match self {
            Store::Postgres(store) => Some(&store.leases),
            Store::Memory(_) | Store::Sqlite(_) => None,
        }
    }

    /// Takes one delivery per target, waiting while the store is at `max_pending` or its
    /// intake is full. `handover_key` (replicas only) is kept with the stream's position, so
    /// that the next replica to read the stream knows the last events taken. With SQLite the deliveries reach the outboxes once committed, with
    /// `last_event_id` as the stream's position; the caller goes on meanwhile. Returns whether
    /// it had to wait (backpressure).
    ///
    /// A stream that stops (`stop`) while its event waits for room, to hand the stream over or
    /// to shut down, stores the event past the limit: what was read is kept, not dropped, unless
    /// the store cannot write at all.
    pub async fn submit(
        &self,
        event: Arc<Event>,
        targets: Vec<Arc<str>>,
        last_event_id: Option<&str>,
        handover_key: Option<u64>,
        stop: &CancellationToken,
    ) -> Result<bool, StoreError> {
        let n_deliveries = targets.len() as u64;
        // A replica stores the event under the stream's lease as it was read: a stream handed
        // over meanwhile is still this replica's in the database until its events are written.
        let token = match self {
            Store::Postgres(store) => store.token(&event.stream_name),
            Store::Memory(_) | Store::Sqlite(_) => None,
        };
        // Waiting (and so watching `stop`) only when there is no room: the common case takes
        // no lock of the stop token.
        let mut waited_for_room = !self.limit().try_reserve(n_deliveries)
            && tokio::select! {
                waited = self.limit().reserve(n_deliveries) => waited,
                () = stop.cancelled() => {
                    self.limit().take_past_limit(n_deliveries);
                    true
                }
            };
        if let Store::Postgres(store) = self
            && store.is_full()
        {
            waited_for_room |= tokio::select! {
                waited = store.wait_for_room() => waited,
                () = stop.cancelled() => true,
            };
        }
        let submitted = async {
            match self {
                Store::Memory(store) => store.submit(&event, &targets).await,
                Store::Sqlite(store) => {
                    let append = sqlite::Append {
                        event,
                        targets,
                        last_event_id: last_event_id.map(Box::from),
                        intake: None,
                    };
                    store.submit(append).await
                }
                Store::Postgres(store) => {
                    let append = postgres::Append {
                        event,
                        targets,
                        last_event_id: last_event_id.map(Box::from),
                        token,
                        handover_key,
                    };
                    store.submit(append).await
                }
            }
        };
        // Past the limit, the store still takes it only as fast as it writes: a store that
        // cannot write (a full disk) does not hold up the stop.
        let submitted = tokio::select! {
            biased;
            submitted = submitted => submitted,
            () = stop.cancelled() => Err(StoreError::NotTakenAtStop),
        };
        match submitted {
            Ok(waited) => Ok(waited || waited_for_room),
            Err(err) => {
                self.limit().release(n_deliveries);
                Err(err)
            }
        }
    }

    /// The outbox of `target`: the dispatcher's end of what the store holds for it. Its input
    /// is handed to the store with `set_outboxes`, at the moment the caller chooses (a reload
    /// switches inputs before the old dispatcher stops and the new one starts).
    pub fn outbox(&self, target: &str, telemetry: Arc<TargetTelemetry>, capacity: usize) -> (OutboxInput, Outbox) {
        let (held_in, limit) = match self {
            Store::Memory(store) => (outbox::Keeping::Memory { capacity }, Arc::clone(&store.limit)),
            Store::Sqlite(store) => {
                let n_stored = store.take_initial_pending(target);
                telemetry.queue_depth.add(n_stored as i64);
                let backlog: Arc<dyn Backlog> = Arc::new(store.clone());
                (outbox::Keeping::Backlog(backlog), Arc::clone(&store.limit))
            }
            Store::Postgres(store) => {
                let backlog: Arc<dyn Backlog> = Arc::new(store.clone());
                (outbox::Keeping::Backlog(backlog), Arc::clone(&store.limit))
            }
        };
        outbox::channel(Arc::from(target), telemetry, limit, held_in)
    }

    /// The last SSE id a stream accepted, in this run or (with SQLite) the last one, to resume
    /// with `Last-Event-ID`.
    pub fn last_event_id(&self, stream: &str) -> Option<String> {
        self.positions().last_event_id(stream)
    }

    /// A stream accepted an event with this id. With SQLite the id reaches the database with
    /// the event's deliveries; this keeps it for a stream restarted in this run.
    pub fn remember_last_event_id(&self, stream: &str, id: &str) {
        self.positions().remember(stream, id);
    }

    fn positions(&self) -> &StreamPositions {
        match self {
            Store::Memory(store) => &store.positions,
            Store::Sqlite(store) => &store.positions,
            Store::Postgres(store) => &store.positions,
        }
    }

    /// The instances added at run time that the store kept (with SQLite; none in memory).
    pub fn saved_instances(&self) -> Vec<SavedInstance> {
        match self {
            Store::Memory(_) => Vec::new(),
            Store::Sqlite(store) => store.saved_instances(),
            Store::Postgres(store) => store.saved_instances(),
        }
    }

    /// Keeps an instance added at run time, so that a restart brings it back (with SQLite).
    pub async fn save_instance(&self, instance: SavedInstance) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Sqlite(store) => store.change_instance(InstanceChange::Save(instance)).await,
            Store::Postgres(store) => store.change_instance(InstanceChange::Save(instance)).await,
        }
    }

    /// Forgets an instance that ended, and its stream's last event id.
    pub async fn forget_instance(&self, template: &str, id: &str) -> Result<(), StoreError> {
        let name = format!("{template}/{id}");
        self.positions().forget(&name);
        let forget = InstanceChange::Forget {
            template: template.to_owned(),
            id: id.to_owned(),
            name,
        };
        match self {
            Store::Memory(_) => Ok(()),
            Store::Sqlite(store) => store.change_instance(forget).await,
            Store::Postgres(store) => store.change_instance(forget).await,
        }
    }

    /// Targets with deliveries in the store when it was opened.
    pub fn pending_targets(&self) -> Vec<String> {
        match self {
            Store::Memory(_) => Vec::new(),
            Store::Sqlite(store) => store.pending_targets(),
            Store::Postgres(store) => store.pending_targets(),
        }
    }

    /// True while submits wait for room (`max_pending` reached).
    pub fn is_full(&self) -> bool {
        match self {
            Store::Postgres(store) => store.is_full(),
            Store::Memory(_) | Store::Sqlite(_) => self.limit().is_full(),
        }
    }

    /// From now on, what the store takes goes to these outboxes (by target name).
    pub async fn set_outboxes(&self, outboxes: Outboxes) {
        match self {
            Store::Memory(store) => store.set_outboxes(outboxes),
            Store::Sqlite(store) => store.set_outboxes(outboxes).await,
            Store::Postgres(store) => store.set_outboxes(outboxes),
        }
    }

    /// A reload removed a target: its pending deliveries become dead letters (SQLite) and the
    /// count is returned; the memory store has none left by then.
    pub async fn retire_target(&self, target: Arc<str>) -> Result<usize, StoreError> {
        let retired = match self {
            Store::Memory(_) => Ok(0),
            Store::Sqlite(store) => store.retire_target(target).await,
            Store::Postgres(store) => store.retire_target(target).await,
        };
        if let Ok(n_retired) = retired {
            self.limit().release(n_retired as u64);
        }
        retired
    }

    /// After the streams stopped: stores what was submitted, hands it on, and then lets the
    /// outboxes' inputs close.
    pub async fn finish_submissions(&self) {
        match self {
            Store::Memory(store) => store.finish_submissions(),
            Store::Sqlite(store) => store.finish_appends().await,
            Store::Postgres(store) => store.finish_appends().await,
        }
    }

    /// Stops the SQLite writer after it has written everything sent to it.
    pub async fn close(&self) {
        match self {
            Store::Memory(_) => {}
            Store::Sqlite(store) => store.close().await,
            Store::Postgres(store) => store.close().await,
        }
    }

    fn limit(&self) -> &PendingLimit {
        match self {
            Store::Memory(store) => &store.limit,
            Store::Sqlite(store) => &store.limit,
            Store::Postgres(store) => &store.limit,
        }
    }
}

/// How a store's writer answers a command.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Hands `item` to a store's writer, at once when there is room; returns whether it had to
/// wait.
pub(crate) async fn send_or_wait<T>(sender: &mpsc::Sender<T>, item: T) -> Result<bool, StoreError> {
    match sender.try_send(item) {
        Ok(()) => Ok(false),
        Err(mpsc::error::TrySendError::Full(item)) => {
            sender.send(item).await.map_err(|_| StoreError::Stopped)?;
            Ok(true)
        }
        Err(mpsc::error::TrySendError::Closed(_)) => Err(StoreError::Stopped),
    }
}

/// Sends a store's writer a command and waits for its answer.
pub(crate) async fn ask<C, T>(sender: &mpsc::Sender<C>, command: impl FnOnce(Reply<T>) -> C) -> Result<T, StoreError> {
    let (reply, answer) = oneshot::channel();
    sender.send(command(reply)).await.map_err(|_| StoreError::Stopped)?;
    answer.await.map_err(|_| StoreError::Stopped)?
}

/// Counts pending deliveries against `max_pending`; appends wait for room.
pub struct PendingLimit {
    max_pending: u64,
    n_pending: Mutex<u64>,
    waiting: Mutex<bool>,
    room: Notify,
}

impl PendingLimit {
    pub fn new(max_pending: u64, n_pending: u64) -> PendingLimit {
        PendingLimit {
            max_pending,
            n_pending: Mutex::new(n_pending),
            waiting: Mutex::new(false),
            room: Notify::new(),
        }
    }

    /// Returns whether it had to wait.
    pub(crate) async fn reserve(&self, n: u64) -> bool {
        let mut waited = false;
        loop {
            let notified = self.room.notified();
            if self.try_reserve(n) {
                return waited;
            }
            *self.waiting.lock().unwrap_or_else(PoisonError::into_inner) = true;
            waited = true;
            // Rechecks now and then even without a wake-up, in case a release raced the wait.
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        }
    }

    /// Counts `n` more if there is room now (as `reserve` would take them); false otherwise.
    pub(crate) fn try_reserve(&self, n: u64) -> bool {
        let mut n_pending = self.n_pending.lock().unwrap_or_else(PoisonError::into_inner);
        // A single event with more targets than the limit still goes through alone.
        if *n_pending == 0 || *n_pending + n <= self.max_pending {
            *n_pending += n;
            *self.waiting.lock().unwrap_or_else(PoisonError::into_inner) = false;
            return true;
        }
        false
    }

    /// Counts `n` more without waiting for room.
    pub(crate) fn take_past_limit(&self, n: u64) {
        *self.n_pending.lock().unwrap_or_else(PoisonError::into_inner) += n;
    }

    pub(crate) fn release(&self, n: u64) {
        let mut n_pending = self.n_pending.lock().unwrap_or_else(PoisonError::into_inner);
        // Replayed dead letters were never reserved, so this saturates rather than underflows.
        *n_pending = n_pending.saturating_sub(n);
        drop(n_pending);
        self.room.notify_waiters();
    }

    fn is_full(&self) -> bool {
        *self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The last SSE id each stream accepted, by stream name.
#[derive(Default)]
pub struct StreamPositions {
    by_stream: Mutex<HashMap<String, String>>,
}

impl StreamPositions {
    pub fn new(by_stream: HashMap<String, String>) -> StreamPositions {
        StreamPositions {
            by_stream: Mutex::new(by_stream),
        }
    }

    fn last_event_id(&self, stream: &str) -> Option<String> {
        self.by_stream
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(stream)
            .cloned()
    }

    pub(crate) fn forget(&self, stream: &str) {
        self.by_stream
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(stream);
    }

    pub(crate) fn remember(&self, stream: &str, id: &str) {
        let mut by_stream = self.by_stream.lock().unwrap_or_else(PoisonError::into_inner);
        match by_stream.get_mut(stream) {
            // Reuses the allocation: this runs for every event with an id.
            Some(last) => {
                last.clear();
                last.push_str(id);
            }
            None => {
                by_stream.insert(stream.to_owned(), id.to_owned());
            }
        }
    }
}
