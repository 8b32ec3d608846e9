//! The delivery queue between routing and delivery: every routed (event, target) pair is
//! submitted to a [`Store`], which hands it to the target's dispatcher once stored; it leaves
//! the store only by success or dead letter.
//!
//! Two stores: SQLite (the default), where an append returns once its transaction is fsync'd,
//! and memory, which is faster and loses what it holds when the process dies. Both bound the
//! number of pending deliveries: at `max_pending`, appends wait, which pauses the streams.

pub mod directory;
pub mod memory;
pub mod outbox;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use crate::config::{StorageConfig, StorageMode};
use crate::event::Event;
use crate::queue::outbox::Outboxes;
use crate::telemetry::StorageTelemetry;

/// Identifies a delivery in its store; increases in the order deliveries were appended.
pub type DeliveryId = i64;

/// A delivery waiting for its target, with its retry state.
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: DeliveryId,
    pub event: Arc<Event>,
    pub n_attempts: u32,
    pub first_attempt_at: Option<SystemTime>,
    pub next_attempt_at: SystemTime,
}

impl Pending {
    pub fn new(id: DeliveryId, event: Arc<Event>) -> Pending {
        Pending {
            id,
            event,
            n_attempts: 0,
            first_attempt_at: None,
            next_attempt_at: SystemTime::UNIX_EPOCH,
        }
    }
}

/// Why a delivery became a dead letter.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub last_status: Option<u16>,
    pub last_error: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("storage failed: {0}")]
    Failed(String),
    #[error("the storage writer has stopped")]
    Stopped,
}

#[derive(Clone)]
pub enum Store {
    Memory(memory::MemoryStore),
    Sqlite(sqlite::SqliteStore),
}

impl Store {
    /// Opens the store; it hands every delivery it takes to its target's dispatcher in
    /// `dispatchers`, once the delivery is stored.
    pub fn open(
        config: &StorageConfig,
        storage: Arc<StorageTelemetry>,
        dispatchers: Outboxes,
    ) -> anyhow::Result<Store> {
        Ok(match config.mode {
            StorageMode::Memory => Store::Memory(memory::MemoryStore::new(config.max_pending.0 as u64, dispatchers)),
            StorageMode::Sqlite => Store::Sqlite(sqlite::SqliteStore::open(config, storage, dispatchers)?),
        })
    }

    pub fn is_durable(&self) -> bool {
        matches!(self, Store::Sqlite(_))
    }

    /// Takes one delivery per target, waiting while the store is at `max_pending` or its
    /// intake is full. With SQLite the deliveries reach the dispatchers once committed; the
    /// caller goes on meanwhile. Returns whether it had to wait (backpressure).
    pub async fn submit(
        &self,
        event: Arc<Event>,
        targets: Vec<Arc<str>>,
        position: Option<&str>,
    ) -> Result<bool, StoreError> {
        let n_deliveries = targets.len() as u64;
        let waited_for_room = self.limit().reserve(n_deliveries).await;
        let submitted = match self {
            Store::Memory(store) => store.submit(&event, &targets).await,
            Store::Sqlite(store) => {
                let append = sqlite::Append {
                    event,
                    targets,
                    position: position.map(Box::from),
                    intake: None,
                };
                store.submit(append).await
            }
        };
        match submitted {
            Ok(waited) => Ok(waited || waited_for_room),
            Err(err) => {
                self.limit().release(n_deliveries);
                Err(err)
            }
        }
    }

    /// The target accepted the delivery.
    pub async fn complete(&self, id: DeliveryId) {
        self.limit().release(1);
        if let Store::Sqlite(store) = self {
            store.complete(id).await;
        }
    }

    /// Records an attempt that will be retried at `pending.next_attempt_at`.
    pub async fn reschedule(&self, pending: &Pending, last_error: &str) {
        if let Store::Sqlite(store) = self {
            store.reschedule(pending, last_error).await;
        }
    }

    /// Moves the delivery to the dead letters (SQLite), or only counts it (memory).
    pub async fn dead_letter(&self, pending: &Pending, dead_letter: DeadLetter) {
        self.limit().release(1);
        if let Store::Sqlite(store) = self {
            store.dead_letter(pending, dead_letter).await;
        }
    }

    /// Deliveries of `target` with ids above `after`, oldest first; always empty in memory.
    pub async fn load(&self, target: &str, after: DeliveryId, limit: usize) -> Result<Vec<Pending>, StoreError> {
        match self {
            Store::Memory(_) => Ok(Vec::new()),
            Store::Sqlite(store) => store.load(target, after, limit).await,
        }
    }

    /// When the oldest delivery of `target` with an id above `after` arrived, if the store
    /// holds one on disk; always `None` in memory.
    pub async fn oldest_on_disk(&self, target: &str, after: DeliveryId) -> Result<Option<SystemTime>, StoreError> {
        match self {
            Store::Memory(_) => Ok(None),
            Store::Sqlite(store) => store.oldest(target, after).await,
        }
    }

    /// Counts changes made to the store by another process (`sse-relay dlq replay`); a
    /// dispatcher that sees it move looks through the whole store for rows it has not seen.
    pub fn external_changes(&self) -> u64 {
        match self {
            Store::Memory(_) => 0,
            Store::Sqlite(store) => store.external_changes(),
        }
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
        }
    }

    /// How many deliveries of `target` the store held when it was opened.
    pub fn initial_pending(&self, target: &str) -> u64 {
        match self {
            Store::Memory(_) => 0,
            Store::Sqlite(store) => store.initial_pending(target),
        }
    }

    /// Targets with deliveries in the store when it was opened.
    pub fn pending_targets(&self) -> impl Iterator<Item = &str> {
        let names: Vec<&str> = match self {
            Store::Memory(_) => Vec::new(),
            Store::Sqlite(store) => store.pending_targets().collect(),
        };
        names.into_iter()
    }

    /// True while submits wait for room (`max_pending` reached).
    pub fn is_full(&self) -> bool {
        self.limit().is_full()
    }

    /// A reload changed the targets: from now on, deliveries go to these dispatchers.
    pub async fn set_dispatchers(&self, dispatchers: Outboxes) {
        match self {
            Store::Memory(store) => store.set_dispatchers(dispatchers),
            Store::Sqlite(store) => store.set_dispatchers(dispatchers).await,
        }
    }

    /// A reload removed a target: its pending deliveries become dead letters (SQLite) and the
    /// count is returned; the memory store has none left by then.
    pub async fn retire_target(&self, target: Arc<str>) -> Result<usize, StoreError> {
        let retired = match self {
            Store::Memory(_) => Ok(0),
            Store::Sqlite(store) => store.retire_target(target).await,
        };
        if let Ok(n_retired) = retired {
            self.limit().release(n_retired as u64);
        }
        retired
    }

    /// Deliveries a stopped memory dispatcher dropped no longer count against `max_pending`.
    pub fn release_abandoned(&self, n_deliveries: u64) {
        self.limit().release(n_deliveries);
    }

    /// After the streams stopped: stores what was submitted, hands it on, and then lets the
    /// dispatchers' inputs close.
    pub async fn finish_submissions(&self) {
        match self {
            Store::Memory(store) => store.finish_submissions(),
            Store::Sqlite(store) => store.finish_appends().await,
        }
    }

    /// Stops the SQLite writer after it has written everything sent to it.
    pub async fn close(&self) {
        if let Store::Sqlite(store) = self {
            store.close().await;
        }
    }

    fn limit(&self) -> &PendingLimit {
        match self {
            Store::Memory(store) => &store.limit,
            Store::Sqlite(store) => &store.limit,
        }
    }
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
    async fn reserve(&self, n: u64) -> bool {
        let mut waited = false;
        loop {
            let notified = self.room.notified();
            {
                let mut n_pending = self.n_pending.lock().unwrap_or_else(PoisonError::into_inner);
                // A single event with more targets than the limit still goes through alone.
                if *n_pending == 0 || *n_pending + n <= self.max_pending {
                    *n_pending += n;
                    *self.waiting.lock().unwrap_or_else(PoisonError::into_inner) = false;
                    return waited;
                }
                *self.waiting.lock().unwrap_or_else(PoisonError::into_inner) = true;
            }
            waited = true;
            // Rechecks now and then even without a wake-up, in case a release raced the wait.
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        }
    }

    fn release(&self, n: u64) {
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

    fn remember(&self, stream: &str, id: &str) {
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
