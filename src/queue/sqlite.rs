//! The SQLite store: one writer task owns the database and applies what it is sent in groups,
//! one transaction (and one fsync) per group, so that durability costs one disk flush for many
//! deliveries rather than one each.
//!
//! Streams submit appends and go on reading; the writer hands each delivery to its target's
//! dispatcher only after the transaction holding it has committed, so nothing is attempted
//! before it is on disk. Appends and the dispatchers' updates (complete, reschedule, dead
//! letter) travel on separate channels: when appends cannot be written (a full disk), updates
//! still can, and they are what frees the space.
//!
//! Only this module touches the database file while the relay runs; `dlq.rs` opens it from the
//! command line, which SQLite's WAL mode and busy timeout allow alongside the running relay.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use rusqlite::{Connection, params};
use tokio::sync::{mpsc, oneshot};
use tokio::time::sleep_until as tokio_sleep_until;
use tracing::{error, warn};

use crate::config::StorageConfig;
use crate::delivery::DispatcherInput;
use crate::event::{Event, EventId};
use crate::queue::{DeadLetter, DeliveryId, Pending, PendingLimit, StoreError, StreamPositions};
use crate::telemetry::StorageTelemetry;

/// The database file inside `storage.path`.
pub const DATABASE_FILE: &str = "relay.db";

/// Appends (or updates) taken into one transaction at most.
const MAX_GROUP: usize = 4096;

/// Longest wait between two tries to write appends that failed.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// How often the writer looks for rows that another process wrote (`sse-relay dlq replay`).
/// The writer looks only when it has work; the dispatchers give it some every second.
const EXTERNAL_CHANGE_INTERVAL: Duration = Duration::from_secs(1);

/// How often dead letters past their retention are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(600);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    target TEXT NOT NULL,
    event_id BLOB NOT NULL,
    stream TEXT NOT NULL,
    sse_id TEXT,
    event_type TEXT NOT NULL,
    data BLOB NOT NULL,
    is_json INTEGER NOT NULL,
    received_at_ms INTEGER NOT NULL,
    n_attempts INTEGER NOT NULL DEFAULT 0,
    first_attempt_at_ms INTEGER,
    next_attempt_at_ms INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_by_target ON deliveries (target, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    target TEXT NOT NULL,
    event_id BLOB NOT NULL,
    stream TEXT NOT NULL,
    sse_id TEXT,
    event_type TEXT NOT NULL,
    data BLOB NOT NULL,
    is_json INTEGER NOT NULL,
    received_at_ms INTEGER NOT NULL,
    n_attempts INTEGER NOT NULL,
    last_status INTEGER,
    last_error TEXT NOT NULL,
    dead_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_target ON dead_letters (target, id);
CREATE TABLE IF NOT EXISTS stream_positions (
    stream TEXT PRIMARY KEY,
    last_event_id TEXT NOT NULL
);
";

/// Columns of a delivery, in the order `pending_from_row` reads them.
pub const DELIVERY_COLUMNS: &str = "id, event_id, stream, sse_id, event_type, data, is_json, received_at_ms, \
                                    n_attempts, first_attempt_at_ms, next_attempt_at_ms";

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One event's deliveries, one per target (by name), and the stream position it brings.
pub struct Append {
    pub event: Arc<Event>,
    pub targets: Vec<Arc<str>>,
    pub position: Option<Box<str>>,
}

/// What dispatchers (and shutdown) send the writer.
enum Update {
    Complete {
        id: DeliveryId,
    },
    Reschedule {
        id: DeliveryId,
        n_attempts: u32,
        first_attempt_at: Option<SystemTime>,
        next_attempt_at: SystemTime,
        last_error: String,
    },
    DeadLetter {
        id: DeliveryId,
        n_attempts: u32,
        dead_letter: DeadLetter,
    },
    Load {
        target: String,
        after: DeliveryId,
        limit: usize,
        reply: Reply<Vec<Pending>>,
    },
    /// Write what was submitted, hand it on, then let go of the dispatchers.
    FinishAppends {
        reply: oneshot::Sender<()>,
    },
    /// A reload changed the targets: hand deliveries to these dispatchers from now on.
    SetDispatchers {
        dispatchers: Dispatchers,
        reply: oneshot::Sender<()>,
    },
    /// A reload removed a target: its pending deliveries become dead letters.
    RetireTarget {
        target: Arc<str>,
        reply: Reply<usize>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// Each target's dispatcher input, by target name.
pub type Dispatchers = HashMap<Arc<str>, DispatcherInput>;

#[derive(Clone)]
pub struct SqliteStore {
    appends: mpsc::Sender<Append>,
    updates: mpsc::Sender<Update>,
    pub(super) limit: Arc<PendingLimit>,
    pub(super) positions: Arc<StreamPositions>,
    initial_pending: Arc<HashMap<String, u64>>,
    external_changes: Arc<AtomicU64>,
}

pub fn database_path(config: &StorageConfig) -> PathBuf {
    Path::new(&config.path.0).join(DATABASE_FILE)
}

/// Opens the database with the pragmas every connection to it needs.
pub fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let connection = Connection::open(path)?;
    connection.busy_timeout(Duration::from_secs(5))?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a commit is on disk (fsync'd) before it returns.
    connection.pragma_update(None, "synchronous", "FULL")?;
    Ok(connection)
}

impl SqliteStore {
    /// Opens (or creates) the database and starts the writer, which hands committed deliveries
    /// to `dispatchers`.
    pub fn open(
        config: &StorageConfig,
        storage: Arc<StorageTelemetry>,
        dispatchers: Dispatchers,
    ) -> anyhow::Result<SqliteStore> {
        let directory = Path::new(&config.path.0);
        std::fs::create_dir_all(directory)
            .with_context(|| format!("cannot create the storage directory {}", directory.display()))?;
        let path = database_path(config);
        let connection = connect(&path)
            .and_then(|connection| {
                connection.execute_batch(SCHEMA)?;
                let page_size: i64 = connection.pragma_query_value(None, "page_size", |row| row.get(0))?;
                let max_pages = (config.max_bytes.as_u64() as i64 / page_size).max(16);
                connection.pragma_update(None, "max_page_count", max_pages)?;
                Ok(connection)
            })
            .with_context(|| format!("cannot open the queue database {}", path.display()))?;

        let positions = connection
            .prepare("SELECT stream, last_event_id FROM stream_positions")?
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<HashMap<String, String>>>()?;
        let initial_pending = connection
            .prepare("SELECT target, count(*) FROM deliveries GROUP BY target")?
            .query_map([], |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64)))?
            .collect::<rusqlite::Result<HashMap<String, u64>>>()?;
        let n_pending = initial_pending.values().sum();

        let data_version = data_version(&connection)?;
        let external_changes = Arc::new(AtomicU64::new(0));
        let (appends, append_receiver) = mpsc::channel(MAX_GROUP);
        let (updates, update_receiver) = mpsc::channel(MAX_GROUP);
        let writer = Writer {
            data_version,
            last_version_check: Instant::now(),
            external_changes: Arc::clone(&external_changes),
            connection: Some(connection),
            dispatchers,
            storage,
            retention: config.dead_letter_retention,
            last_purge: Instant::now() - PURGE_INTERVAL,
        };
        tokio::spawn(writer.run(append_receiver, update_receiver));
        Ok(SqliteStore {
            appends,
            updates,
            limit: Arc::new(PendingLimit::new(config.max_pending.0 as u64, n_pending)),
            positions: Arc::new(StreamPositions::new(positions)),
            initial_pending: Arc::new(initial_pending),
            external_changes,
        })
    }

    /// How many times another process (`sse-relay dlq replay` or `purge`) changed the database
    /// since the relay started, as far as the writer has looked.
    pub fn external_changes(&self) -> u64 {
        self.external_changes.load(Ordering::Relaxed)
    }

    /// Queues the append for the writer; returns whether it had to wait for room.
    pub async fn submit(&self, append: Append) -> Result<bool, StoreError> {
        match self.appends.try_send(append) {
            Ok(()) => Ok(false),
            Err(mpsc::error::TrySendError::Full(append)) => {
                self.appends.send(append).await.map_err(|_| StoreError::Stopped)?;
                Ok(true)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(StoreError::Stopped),
        }
    }

    pub async fn complete(&self, id: DeliveryId) {
        let _ = self.updates.send(Update::Complete { id }).await;
    }

    pub async fn reschedule(&self, pending: &Pending, last_error: &str) {
        let update = Update::Reschedule {
            id: pending.id,
            n_attempts: pending.n_attempts,
            first_attempt_at: pending.first_attempt_at,
            next_attempt_at: pending.next_attempt_at,
            last_error: last_error.to_owned(),
        };
        let _ = self.updates.send(update).await;
    }

    pub async fn dead_letter(&self, pending: &Pending, dead_letter: DeadLetter) {
        let update = Update::DeadLetter {
            id: pending.id,
            n_attempts: pending.n_attempts,
            dead_letter,
        };
        let _ = self.updates.send(update).await;
    }

    pub async fn load(&self, target: &str, after: DeliveryId, limit: usize) -> Result<Vec<Pending>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let update = Update::Load {
            target: target.to_owned(),
            after,
            limit,
            reply,
        };
        self.updates.send(update).await.map_err(|_| StoreError::Stopped)?;
        answer.await.map_err(|_| StoreError::Stopped)?
    }

    pub fn pending_targets(&self) -> impl Iterator<Item = &str> {
        self.initial_pending.keys().map(String::as_str)
    }

    pub fn initial_pending(&self, target: &str) -> u64 {
        self.initial_pending.get(target).copied().unwrap_or(0)
    }

    pub async fn set_dispatchers(&self, dispatchers: Dispatchers) {
        let (reply, answer) = oneshot::channel();
        if self
            .updates
            .send(Update::SetDispatchers { dispatchers, reply })
            .await
            .is_ok()
        {
            let _ = answer.await;
        }
    }

    pub async fn retire_target(&self, target: Arc<str>) -> Result<usize, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.updates
            .send(Update::RetireTarget { target, reply })
            .await
            .map_err(|_| StoreError::Stopped)?;
        answer.await.map_err(|_| StoreError::Stopped)?
    }

    pub async fn finish_appends(&self) {
        let (reply, answer) = oneshot::channel();
        if self.updates.send(Update::FinishAppends { reply }).await.is_ok() {
            let _ = answer.await;
        }
    }

    pub async fn close(&self) {
        let (reply, answer) = oneshot::channel();
        if self.updates.send(Update::Close { reply }).await.is_ok() {
            let _ = answer.await;
        }
    }
}

struct Writer {
    /// Lent to a blocking thread for each transaction.
    connection: Option<Connection>,
    /// By target name; emptied at shutdown so the dispatchers' inputs close.
    dispatchers: Dispatchers,
    storage: Arc<StorageTelemetry>,
    retention: Duration,
    last_purge: Instant,
    /// SQLite's `data_version` of the writer's connection: it changes only when another
    /// connection commits, which is how rows written by `sse-relay dlq` are noticed.
    data_version: i64,
    last_version_check: Instant,
    external_changes: Arc<AtomicU64>,
}

impl Writer {
    async fn run(mut self, mut appends: mpsc::Receiver<Append>, mut updates: mpsc::Receiver<Update>) {
        // Appends received but not yet committed, in order; after a failure, when to try them
        // again.
        let mut unwritten: Vec<Append> = Vec::new();
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut retry_delay = Duration::from_millis(100);
        let mut finished_appends: Option<oneshot::Sender<()>> = None;
        loop {
            let mut batch = Vec::new();
            let take_appends = retry_at.is_none() && unwritten.len() < MAX_GROUP && finished_appends.is_none();
            tokio::select! {
                biased;
                update = updates.recv() => match update {
                    Some(update) => batch.push(update),
                    None => return,
                },
                Some(append) = appends.recv(), if take_appends => unwritten.push(append),
                () = sleep_until(retry_at) => retry_at = None,
            }
            while batch.len() < MAX_GROUP
                && let Ok(update) = updates.try_recv()
            {
                batch.push(update);
            }
            while retry_at.is_none()
                && finished_appends.is_none()
                && unwritten.len() < MAX_GROUP
                && let Ok(append) = appends.try_recv()
            {
                unwritten.push(append);
            }

            let mut close = None;
            let mut writes = Vec::with_capacity(batch.len());
            for update in batch {
                match update {
                    Update::FinishAppends { reply } => {
                        // Take what was submitted before this, then no more.
                        while let Ok(append) = appends.try_recv() {
                            unwritten.push(append);
                        }
                        finished_appends = Some(reply);
                    }
                    Update::Close { reply } => close = Some(reply),
                    Update::SetDispatchers { dispatchers, reply } => {
                        // Appends taken so far were routed with the old targets: hand them on first.
                        if !unwritten.is_empty()
                            && let Err(failed) = self.write_appends(std::mem::take(&mut unwritten)).await
                        {
                            unwritten = failed;
                        }
                        self.dispatchers = dispatchers;
                        let _ = reply.send(());
                    }
                    Update::RetireTarget { target, reply } => {
                        let retired = self
                            .with_connection(move |connection| retire_target(connection, &target))
                            .await;
                        if let Err(err) = &retired {
                            self.storage.errors.inc();
                            error!(error = %err, "cannot dead-letter the deliveries of a removed target");
                        }
                        let _ = reply.send(retired.map_err(|err| StoreError::Failed(err.to_string())));
                    }
                    update => writes.push(update),
                }
            }
            if !writes.is_empty() {
                // A completion or dead letter frees space: appends waiting on a full store are
                // worth another try at once.
                let frees_space = writes
                    .iter()
                    .any(|update| matches!(update, Update::Complete { .. } | Update::DeadLetter { .. }));
                if self.write_updates(writes).await && frees_space {
                    retry_at = None;
                }
            }
            if retry_at.is_none() && !unwritten.is_empty() {
                match self.write_appends(std::mem::take(&mut unwritten)).await {
                    Ok(()) => retry_delay = Duration::from_millis(100),
                    Err(failed) => {
                        unwritten = failed;
                        retry_at = Some(tokio::time::Instant::now() + retry_delay);
                        retry_delay = (retry_delay * 2).min(MAX_RETRY_DELAY);
                    }
                }
            }
            if let Some(reply) = finished_appends.take_if(|_| unwritten.is_empty() || close.is_some()) {
                if !unwritten.is_empty() {
                    warn!(
                        n_events = unwritten.len(),
                        "events that storage could not take at shutdown were not stored"
                    );
                }
                // The dispatchers see their input close once nothing more can come.
                self.dispatchers.clear();
                let _ = reply.send(());
            }
            if let Some(reply) = close {
                let _ = reply.send(());
                return;
            }
            if self.last_purge.elapsed() >= PURGE_INTERVAL {
                self.purge_dead_letters().await;
            }
            if self.last_version_check.elapsed() >= EXTERNAL_CHANGE_INTERVAL {
                self.look_for_external_changes().await;
            }
        }
    }

    /// Runs `work` on a blocking thread with the connection.
    async fn with_connection<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&mut Connection) -> T + Send + 'static,
    ) -> T {
        let mut connection = self
            .connection
            .take()
            .expect("the writer owns the connection between transactions");
        let (connection, result) = tokio::task::spawn_blocking(move || {
            let result = work(&mut connection);
            (connection, result)
        })
        .await
        .expect("a storage transaction does not panic");
        self.connection = Some(connection);
        result
    }

    /// Commits the appends in one transaction and hands each delivery to its dispatcher. If the
    /// group fails, the appends are tried one at a time, so that a store with room for some but
    /// not all of them (a nearly full disk) still makes progress; those that fail are returned,
    /// in order, to be tried again.
    async fn write_appends(&mut self, batch: Vec<Append>) -> Result<(), Vec<Append>> {
        let (batch, written) = self
            .with_connection(move |connection| {
                let written = insert_appends(connection, &batch);
                (batch, written)
            })
            .await;
        let failure = match written {
            Ok(ids) => {
                self.storage.append_succeeded();
                self.hand_on(&batch, ids);
                return Ok(());
            }
            // As text: the error is not Send, and this function waits after it.
            Err(err) => err.to_string(),
        };
        self.storage.errors.inc();
        self.storage.append_failed(&failure);
        let mut remaining = batch.into_iter();
        while let Some(append) = remaining.next() {
            let (append, written) = self
                .with_connection(move |connection| {
                    let written = insert_appends(connection, std::slice::from_ref(&append));
                    (append, written)
                })
                .await;
            match written {
                Ok(ids) => self.hand_on(std::slice::from_ref(&append), ids),
                Err(_) => {
                    let mut unwritten = vec![append];
                    unwritten.extend(remaining);
                    return Err(unwritten);
                }
            }
        }
        self.storage.append_succeeded();
        Ok(())
    }

    /// Gives each committed delivery to its target's dispatcher; `ids` follow the appends'
    /// targets in order. Never waits: see `DispatcherInput::offer`.
    fn hand_on(&self, appends: &[Append], ids: Vec<DeliveryId>) {
        let mut ids = ids.into_iter();
        for append in appends {
            for target in &append.targets {
                let Some(id) = ids.next() else { return };
                if let Some(dispatcher) = self.dispatchers.get(target) {
                    dispatcher.offer(Pending::new(id, Arc::clone(&append.event)));
                }
            }
        }
    }

    /// Applies the dispatchers' updates in one transaction; returns whether it committed.
    /// Loads are answered either way;
    /// other updates that fail are logged and counted: the delivery stays as it was on disk
    /// (a completed one is sent again after a restart, with the same idempotency key).
    async fn write_updates(&mut self, batch: Vec<Update>) -> bool {
        let outcome = self
            .with_connection(move |connection| {
                let mut replies = Vec::new();
                let applied = apply_updates(connection, batch, &mut replies);
                (replies, applied)
            })
            .await;
        let (replies, applied) = outcome;
        if let Err(err) = &applied {
            self.storage.errors.inc();
            error!(error = %err, "cannot record delivery results in the queue database");
        }
        for (reply, loaded) in replies {
            let _ = reply.send(match &applied {
                Ok(()) => Ok(loaded),
                Err(err) => Err(StoreError::Failed(err.to_string())),
            });
        }
        applied.is_ok()
    }

    async fn look_for_external_changes(&mut self) {
        self.last_version_check = Instant::now();
        match self.with_connection(|connection| data_version(connection)).await {
            Ok(version) if version != self.data_version => {
                self.data_version = version;
                self.external_changes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(err) => {
                self.storage.errors.inc();
                warn!(error = %err, "cannot read the queue database's data version");
            }
        }
    }

    async fn purge_dead_letters(&mut self) {
        self.last_purge = Instant::now();
        let cutoff = millis(
            SystemTime::now()
                .checked_sub(self.retention)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        );
        let purged = self
            .with_connection(move |connection| {
                connection.execute("DELETE FROM dead_letters WHERE dead_at_ms < ?1", [cutoff])
            })
            .await;
        if let Err(err) = purged {
            self.storage.errors.inc();
            error!(error = %err, "cannot purge old dead letters");
        }
    }
}

fn insert_appends(connection: &mut Connection, batch: &[Append]) -> rusqlite::Result<Vec<DeliveryId>> {
    let transaction = connection.transaction()?;
    let mut ids = Vec::with_capacity(batch.len());
    {
        let mut insert = transaction.prepare_cached(
            "INSERT INTO deliveries (target, event_id, stream, sse_id, event_type, data, is_json, received_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        let mut save_position = transaction.prepare_cached(
            "INSERT INTO stream_positions (stream, last_event_id) VALUES (?1, ?2)
             ON CONFLICT (stream) DO UPDATE SET last_event_id = excluded.last_event_id",
        )?;
        for append in batch {
            let event = &append.event;
            for target in &append.targets {
                insert.execute(params![
                    &**target,
                    event.id.0.as_bytes().as_slice(),
                    &*event.stream_name,
                    event.sse_id.as_deref(),
                    &*event.event_type,
                    &event.data[..],
                    event.json.is_some(),
                    millis(event.received_at),
                ])?;
                ids.push(transaction.last_insert_rowid());
            }
            if let Some(last_event_id) = &append.position {
                save_position.execute(params![&*event.stream_name, &**last_event_id])?;
            }
        }
    }
    transaction.commit()?;
    Ok(ids)
}

fn apply_updates(
    connection: &mut Connection,
    batch: Vec<Update>,
    replies: &mut Vec<(Reply<Vec<Pending>>, Vec<Pending>)>,
) -> rusqlite::Result<()> {
    let transaction = connection.transaction()?;
    let mut outcome = Ok(());
    for update in batch {
        match update {
            Update::Load {
                target,
                after,
                limit,
                reply,
            } => {
                let loaded = match &outcome {
                    Ok(()) => load(&transaction, &target, after, limit),
                    Err(_) => Ok(Vec::new()),
                };
                match loaded {
                    Ok(loaded) => replies.push((reply, loaded)),
                    Err(err) => {
                        replies.push((reply, Vec::new()));
                        outcome = Err(err);
                    }
                }
            }
            update if outcome.is_ok() => outcome = apply_update(&transaction, update),
            _ => {}
        }
    }
    outcome?;
    transaction.commit()
}

fn apply_update(transaction: &rusqlite::Transaction<'_>, update: Update) -> rusqlite::Result<()> {
    match update {
        Update::Complete { id } => {
            transaction
                .prepare_cached("DELETE FROM deliveries WHERE id = ?1")?
                .execute([id])?;
        }
        Update::Reschedule {
            id,
            n_attempts,
            first_attempt_at,
            next_attempt_at,
            last_error,
        } => {
            transaction
                .prepare_cached(
                    "UPDATE deliveries SET n_attempts = ?2, first_attempt_at_ms = ?3, next_attempt_at_ms = ?4,
                     last_error = ?5 WHERE id = ?1",
                )?
                .execute(params![
                    id,
                    n_attempts,
                    first_attempt_at.map(millis),
                    millis(next_attempt_at),
                    last_error
                ])?;
        }
        Update::DeadLetter {
            id,
            n_attempts,
            dead_letter,
        } => {
            transaction
                .prepare_cached(
                    "INSERT OR REPLACE INTO dead_letters (id, target, event_id, stream, sse_id, event_type, data,
                     is_json, received_at_ms, n_attempts, last_status, last_error, dead_at_ms)
                     SELECT id, target, event_id, stream, sse_id, event_type, data, is_json, received_at_ms,
                     ?2, ?3, ?4, ?5 FROM deliveries WHERE id = ?1",
                )?
                .execute(params![
                    id,
                    n_attempts,
                    dead_letter.last_status,
                    dead_letter.last_error,
                    millis(SystemTime::now())
                ])?;
            transaction
                .prepare_cached("DELETE FROM deliveries WHERE id = ?1")?
                .execute([id])?;
        }
        Update::Load { .. }
        | Update::FinishAppends { .. }
        | Update::Close { .. }
        | Update::SetDispatchers { .. }
        | Update::RetireTarget { .. } => {}
    }
    Ok(())
}

/// Moves every pending delivery of a removed target to the dead letters; returns how many.
fn retire_target(connection: &mut Connection, target: &str) -> rusqlite::Result<usize> {
    let transaction = connection.transaction()?;
    let n_retired = transaction.execute(
        "INSERT OR REPLACE INTO dead_letters (id, target, event_id, stream, sse_id, event_type, data, is_json,
         received_at_ms, n_attempts, last_status, last_error, dead_at_ms)
         SELECT id, target, event_id, stream, sse_id, event_type, data, is_json, received_at_ms, n_attempts,
         NULL, 'the target was removed from the config', ?2 FROM deliveries WHERE target = ?1",
        params![target, millis(SystemTime::now())],
    )?;
    transaction.execute("DELETE FROM deliveries WHERE target = ?1", [target])?;
    transaction.commit()?;
    Ok(n_retired)
}

fn data_version(connection: &Connection) -> rusqlite::Result<i64> {
    connection.pragma_query_value(None, "data_version", |row| row.get(0))
}

fn load(
    transaction: &rusqlite::Transaction<'_>,
    target: &str,
    after: DeliveryId,
    limit: usize,
) -> rusqlite::Result<Vec<Pending>> {
    transaction
        .prepare_cached(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE target = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
        ))?
        .query_map(params![target, after, limit as i64], pending_from_row)?
        .collect()
}

/// Reads a row selected with `DELIVERY_COLUMNS`.
pub fn pending_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Pending> {
    let event_id: Vec<u8> = row.get(1)?;
    let data: Vec<u8> = row.get(5)?;
    let is_json: bool = row.get(6)?;
    let json = if is_json {
        serde_json::from_slice(&data).ok()
    } else {
        None
    };
    let stream: String = row.get(2)?;
    let event_type: String = row.get(4)?;
    let event = Event {
        id: EventId(uuid::Uuid::from_slice(&event_id).unwrap_or_default()),
        stream_name: Arc::from(stream),
        sse_id: row.get::<_, Option<String>>(3)?.map(String::into_boxed_str),
        event_type: Arc::from(event_type),
        data: Bytes::from(data),
        json,
        received_at: from_millis(row.get(7)?),
    };
    Ok(Pending {
        id: row.get(0)?,
        event: Arc::new(event),
        n_attempts: row.get(8)?,
        first_attempt_at: row.get::<_, Option<i64>>(9)?.map(from_millis),
        next_attempt_at: from_millis(row.get(10)?),
    })
}

pub fn millis(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|since| since.as_millis() as i64)
        .unwrap_or(0)
}

pub fn from_millis(millis: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(millis.max(0) as u64)
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio_sleep_until(at).await,
        None => std::future::pending().await,
    }
}
