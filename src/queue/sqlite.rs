//! The SQLite store: one writer task owns the database and applies what it is sent in groups,
//! one transaction (and one fsync) per group, so that durability costs one disk flush for many
//! deliveries rather than one each.
//!
//! Streams submit appends and go on reading; the writer hands each delivery to its target's
//! outbox only after the transaction holding it has committed, so nothing is attempted
//! before it is on disk. Appends and the outboxes' results (delivered, retry, dead
//! letter) travel on separate channels: when appends cannot be written (a full disk), updates
//! still can, and they are what frees the space.
//!
//! Only this module touches the database file while the relay runs; `dlq.rs` opens it from the
//! command line, which SQLite's WAL mode and busy timeout allow alongside the running relay.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use futures_util::future::BoxFuture;
use rusqlite::{Connection, OptionalExtension as _, params};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::sleep_until as tokio_sleep_until;
use tracing::warn;

use crate::config::StorageConfig;
use crate::event::Event;
use crate::queue::directory::{Reserve, StorageLock};
use crate::queue::outbox::{Backlog, LoadFuture, Outboxes};
use crate::queue::schema::{self, SCHEMA, millis};
use crate::queue::{
    Delivery, DeliveryId, InstanceChange, Outcome, PendingLimit, Reply, SavedInstance, StoreError, StreamPositions,
};
use crate::telemetry::StorageTelemetry;

/// The database file inside `storage.path`.
pub const DATABASE_FILE: &str = "relay.db";

/// Appends (or updates) taken into one transaction at most.
const MAX_GROUP: usize = 4096;

/// Shortest and longest wait between two tries to write what failed.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// How often the writer looks for rows that another process wrote (`sse-relay dlq replay`).
/// The writer looks only when it has work; the outboxes give it some every second.
const EXTERNAL_CHANGE_INTERVAL: Duration = Duration::from_secs(1);

/// How often, at most, the writer tries to make the reserve again because results freed space;
/// it also tries at every retry after a failure.
const RESTORE_INTERVAL: Duration = Duration::from_secs(1);

/// How often dead letters past their retention are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(600);

/// One event's deliveries, one per target (by name), and the stream's Last-Event-ID with it.
pub struct Append {
    pub event: Arc<Event>,
    pub targets: Vec<Arc<str>>,
    pub last_event_id: Option<Box<str>>,
    /// The event's share of the bytes that may wait for the writer; given back once written.
    pub intake: Option<OwnedSemaphorePermit>,
}

/// What outboxes (and shutdown) send the writer.
enum Command {
    Record {
        id: DeliveryId,
        outcome: Outcome,
    },
    Read(Read),
    /// Write what was submitted, hand it on, then let go of the outboxes.
    FinishAppends {
        reply: oneshot::Sender<()>,
    },
    /// Hand deliveries to these outboxes from now on.
    SetOutboxes {
        outboxes: Outboxes,
        reply: oneshot::Sender<()>,
    },
    /// An instance added at run time is kept, or one that ended is forgotten.
    ChangeInstance {
        change: InstanceChange,
        reply: Reply<()>,
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

/// A read the writer answers after it has written what came before it.
enum Read {
    /// Deliveries of `target` with ids above `after`, oldest first.
    Load {
        target: Arc<str>,
        after: DeliveryId,
        limit: usize,
        reply: Reply<Vec<Delivery>>,
    },
    /// When the oldest delivery of `target` with an id above `after` arrived.
    Oldest {
        target: Arc<str>,
        after: DeliveryId,
        reply: Reply<Option<SystemTime>>,
    },
}

/// Bytes of event data that may wait for the writer, in KiB: a failing or full store holds
/// this much in memory at most, however large the events, before the streams pause.
const INTAKE_KIB: u32 = 32 * 1024;

#[derive(Clone)]
pub struct SqliteStore {
    appends: mpsc::Sender<Append>,
    commands: mpsc::Sender<Command>,
    intake: Arc<Semaphore>,
    pub(super) limit: Arc<PendingLimit>,
    pub(super) positions: Arc<StreamPositions>,
    /// Deliveries of each target in the store when it was opened, until its first outbox
    /// counts them.
    initial_pending: Arc<Mutex<HashMap<String, u64>>>,
    pending_targets: Arc<[String]>,
    /// The instances kept when the store was opened.
    saved_instances: Arc<[SavedInstance]>,
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

/// Opens an existing database and checks it (`PRAGMA quick_check`): a damaged one is refused
/// with a message that names the file and what to do.
pub fn connect_checked(path: &Path) -> anyhow::Result<Connection> {
    let damaged = |detail: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "the queue database {} is damaged ({detail}); sse-relay will not use it. Stop every relay using it, \
             move the file aside (`sqlite3 FILE .recover` may save its rows) and start again with an empty \
             queue, or restore it from a backup",
            path.display()
        )
    };
    let connection = match connect(path) {
        Ok(connection) => connection,
        Err(err) if is_damage(&err) => return Err(damaged(&err)),
        Err(err) => return Err(err).with_context(|| format!("cannot open the queue database {}", path.display())),
    };
    let problems = connection
        .prepare("PRAGMA quick_check")
        .and_then(|mut statement| {
            statement
                .query_map([], |row| row.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<String>>>()
        })
        .map_err(|err| damaged(&err))?;
    if problems != ["ok"] {
        let shown: Vec<&str> = problems.iter().take(3).map(String::as_str).collect();
        return Err(damaged(&shown.join("; ")));
    }
    Ok(connection)
}

/// Makes the database give the pages that deliveries leave behind back to the filesystem when
/// asked (`PRAGMA incremental_vacuum`), so that after a full disk the space they took can be
/// reserved again. A database made before this setting existed is rebuilt once (`VACUUM`).
fn give_freed_pages_back(connection: &Connection, path: &Path) {
    let incremental = connection
        .pragma_query_value(None, "auto_vacuum", |row| row.get::<_, i64>(0))
        .is_ok_and(|mode| mode == 2);
    if incremental {
        return;
    }
    let rebuilt = connection
        .pragma_update(None, "auto_vacuum", "INCREMENTAL")
        .and_then(|()| connection.execute_batch("VACUUM"));
    if let Err(err) = rebuilt {
        warn!(
            database = %path.display(), error = %err,
            "cannot set the queue database to give freed space back; after a full disk it may need more room \
             to recover"
        );
    }
}

/// Gives the pages that deliveries left behind back to the filesystem: in rounds of at most
/// `pages_per_round`, each folded into the database and its log truncated before the next, so
/// that a nearly full disk has room for each round. The vacuum pragma frees one page per step,
/// so it is stepped to its end.
fn give_back_free_pages(connection: &Connection, pages_per_round: i64) -> rusqlite::Result<()> {
    loop {
        connection.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        let n_free: i64 = connection.pragma_query_value(None, "freelist_count", |row| row.get(0))?;
        if n_free == 0 {
            return Ok(());
        }
        let mut statement = connection.prepare_cached(&format!("PRAGMA incremental_vacuum({pages_per_round})"))?;
        let mut steps = statement.raw_query();
        while steps.next()?.is_some() {}
    }
}

fn is_damage(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

/// The disk (or the store's own `max_bytes`) has no room: worth another try once space is
/// freed, unlike an error of the statement itself.
fn is_out_of_space(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DiskFull | rusqlite::ErrorCode::SystemIoFailure)
    )
}

impl SqliteStore {
    /// Opens (or creates) the database and starts the writer, which hands committed deliveries
    /// to the outboxes it is given.
    pub fn open(config: &StorageConfig, storage: Arc<StorageTelemetry>) -> anyhow::Result<SqliteStore> {
        let directory = Path::new(&config.path.0);
        let mut lock = StorageLock::acquire(directory)?;
        let path = database_path(config);
        let database_bytes = std::fs::metadata(&path).map_or(0, |metadata| metadata.len());
        anyhow::ensure!(
            database_bytes > 0 || !lock.database_created(),
            "the queue database {} is missing or empty, but this storage directory held one before (as {} \
             records): its queued deliveries and stream positions are gone. Restore it from a backup, or \
             delete {} to start with an empty queue",
            path.display(),
            lock.path().display(),
            lock.path().display()
        );
        let connection = connect_checked(&path)?;
        give_freed_pages_back(&connection, &path);
        let page_size: i64 = connection
            .execute_batch(SCHEMA)
            .and_then(|()| connection.pragma_query_value(None, "page_size", |row| row.get(0)))
            .with_context(|| format!("cannot set up the queue database {}", path.display()))?;
        lock.mark_database_created()?;
        let max_pages = (config.max_bytes.as_u64() as i64 / page_size).max(16);

        let positions = connection
            .prepare("SELECT stream, last_event_id FROM stream_positions")?
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<HashMap<String, String>>>()?;
        let initial_pending = connection
            .prepare("SELECT target, count(*) FROM deliveries GROUP BY target")?
            .query_map([], |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64)))?
            .collect::<rusqlite::Result<HashMap<String, u64>>>()?;
        let n_pending = initial_pending.values().sum();
        let saved_instances = connection
            .prepare(schema::LOAD_INSTANCES)?
            .query_map([], |row| {
                Ok(SavedInstance {
                    template: row.get(0)?,
                    id: row.get(1)?,
                    ends_at: row.get::<_, Option<i64>>(2)?.map(schema::from_millis),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;

        let data_version = data_version(&connection)?;
        let external_changes = Arc::new(AtomicU64::new(0));
        let (appends, append_receiver) = mpsc::channel(MAX_GROUP);
        let (commands, command_receiver) = mpsc::channel(MAX_GROUP);
        let reserve = Reserve::new(directory);
        // The write-ahead log is folded into the database (and truncated) once it holds a
        // quarter of the reserve, so that on a full disk the reserve has room for a checkpoint.
        let max_group_bytes = (reserve.n_bytes() / 4) as usize;
        connection
            .pragma_update(None, "wal_autocheckpoint", (max_group_bytes as i64 / page_size).max(16))
            .and_then(|()| connection.pragma_update(None, "journal_size_limit", reserve.n_bytes() as i64))
            .with_context(|| format!("cannot set up the queue database {}", path.display()))?;
        if !reserve.is_present() {
            storage.write_failed(&"the disk is full: no room for the space the store keeps in reserve");
        }
        let writer = Writer {
            data_version,
            last_version_check: Instant::now(),
            external_changes: Arc::clone(&external_changes),
            connection: Some(connection),
            max_pages,
            max_group_bytes,
            outboxes: Outboxes::new(),
            unrecorded: BTreeMap::new(),
            reserve,
            last_restore_try: Instant::now(),
            page_size,
            lock: Some(lock),
            storage,
            retention: config.dead_letter_retention,
            last_purge: Instant::now() - PURGE_INTERVAL,
            unwritten: Vec::new(),
            retry_at: None,
            retry_delay: MIN_RETRY_DELAY,
            finished_appends: None,
        };
        tokio::spawn(writer.run(append_receiver, command_receiver));
        Ok(SqliteStore {
            appends,
            commands,
            intake: Arc::new(Semaphore::new(INTAKE_KIB as usize)),
            limit: Arc::new(PendingLimit::new(config.max_pending.0 as u64, n_pending)),
            positions: Arc::new(StreamPositions::new(positions)),
            pending_targets: initial_pending.keys().cloned().collect(),
            saved_instances: saved_instances.into(),
            initial_pending: Arc::new(Mutex::new(initial_pending)),
            external_changes,
        })
    }

    /// Queues the append for the writer; returns whether it had to wait for room, in the
    /// writer's queue or in the bytes that may wait for it.
    pub async fn submit(&self, mut append: Append) -> Result<bool, StoreError> {
        let kib = u32::try_from(append.event.data.len() / 1024)
            .unwrap_or(u32::MAX)
            .clamp(1, INTAKE_KIB);
        let mut waited = false;
        let permit = match Arc::clone(&self.intake).try_acquire_many_owned(kib) {
            Ok(permit) => permit,
            Err(_) => {
                waited = true;
                Arc::clone(&self.intake)
                    .acquire_many_owned(kib)
                    .await
                    .map_err(|_| StoreError::Stopped)?
            }
        };
        append.intake = Some(permit);
        Ok(crate::queue::send_or_wait(&self.appends, append).await? || waited)
    }

    async fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        crate::queue::ask(&self.commands, command).await
    }

    pub fn saved_instances(&self) -> Vec<SavedInstance> {
        self.saved_instances.to_vec()
    }

    pub async fn change_instance(&self, change: InstanceChange) -> Result<(), StoreError> {
        self.ask(|reply| Command::ChangeInstance { change, reply }).await
    }

    pub fn pending_targets(&self) -> Vec<String> {
        self.pending_targets.to_vec()
    }

    /// How many deliveries of `target` the store held when it was opened; counted by the
    /// target's first outbox only.
    pub fn take_initial_pending(&self, target: &str) -> u64 {
        self.initial_pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(target)
            .unwrap_or(0)
    }

    /// Sends a command that only acknowledges, and waits for the acknowledgement.
    async fn acknowledged(&self, command: impl FnOnce(oneshot::Sender<()>) -> Command) {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(command(reply)).await.is_ok() {
            let _ = answer.await;
        }
    }

    pub async fn set_outboxes(&self, outboxes: Outboxes) {
        self.acknowledged(|reply| Command::SetOutboxes { outboxes, reply })
            .await;
    }

    pub async fn retire_target(&self, target: Arc<str>) -> Result<usize, StoreError> {
        self.ask(|reply| Command::RetireTarget { target, reply }).await
    }

    pub async fn finish_appends(&self) {
        self.acknowledged(|reply| Command::FinishAppends { reply }).await;
    }

    pub async fn close(&self) {
        self.acknowledged(|reply| Command::Close { reply }).await;
    }
}

impl Backlog for SqliteStore {
    fn load(&self, target: &Arc<str>, after: DeliveryId, limit: usize) -> LoadFuture {
        let (store, target) = (self.clone(), Arc::clone(target));
        Box::pin(async move {
            store
                .ask(|reply| {
                    Command::Read(Read::Load {
                        target,
                        after,
                        limit,
                        reply,
                    })
                })
                .await
        })
    }

    fn oldest(
        &self,
        target: &Arc<str>,
        after: DeliveryId,
    ) -> BoxFuture<'static, Result<Option<SystemTime>, StoreError>> {
        let (store, target) = (self.clone(), Arc::clone(target));
        Box::pin(async move {
            store
                .ask(|reply| Command::Read(Read::Oldest { target, after, reply }))
                .await
        })
    }

    fn record(&self, _: &Arc<str>, id: DeliveryId, outcome: Outcome) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.commands.send(Command::Record { id, outcome }).await;
        })
    }

    fn external_changes(&self) -> u64 {
        self.external_changes.load(Ordering::Relaxed)
    }
}

struct Writer {
    /// Lent to a blocking thread for each transaction.
    connection: Option<Connection>,
    /// `max_bytes` in pages: appends may not grow the database beyond it. Recording results
    /// may, a little (a dead letter is written before its delivery is deleted).
    max_pages: i64,
    /// The most bytes of events one transaction writes: with the write-ahead log checkpointed
    /// at the same size, what a checkpoint must add to the database file always fits in the
    /// reserve.
    max_group_bytes: usize,
    /// By target name; emptied at shutdown so the outboxes' inputs close.
    outboxes: Outboxes,
    /// Results that could not be written yet (a full disk), by delivery id; written with the
    /// next results. A delivery that left the queue here is not loaded again meanwhile.
    unrecorded: BTreeMap<DeliveryId, Outcome>,
    reserve: Reserve,
    last_restore_try: Instant,
    page_size: i64,
    /// Held while the writer runs; let go before `close` answers.
    lock: Option<StorageLock>,
    storage: Arc<StorageTelemetry>,
    retention: Duration,
    last_purge: Instant,
    /// SQLite's `data_version` of the writer's connection: it changes only when another
    /// connection commits, which is how rows written by `sse-relay dlq` are noticed.
    data_version: i64,
    last_version_check: Instant,
    external_changes: Arc<AtomicU64>,
    /// Appends received but not yet committed, in order.
    unwritten: Vec<Append>,
    /// After a failure, when to try everything that failed again, and the wait after that.
    retry_at: Option<tokio::time::Instant>,
    retry_delay: Duration,
    /// Set once the streams have stopped: answered when what they submitted is written.
    finished_appends: Option<oneshot::Sender<()>>,
}

/// What one turn of the writer records, reads, and whether it closes.
#[derive(Default)]
struct Turn {
    results: Vec<(DeliveryId, Outcome)>,
    reads: Vec<Read>,
    close: Option<oneshot::Sender<()>>,
    /// Time to try again what failed.
    retry_due: bool,
}

impl Writer {
    async fn run(mut self, mut appends: mpsc::Receiver<Append>, mut commands: mpsc::Receiver<Command>) {
        loop {
            let Some((batch, retry_due)) = self.take(&mut appends, &mut commands).await else {
                return;
            };
            let mut turn = self.sort(batch, &mut appends).await;
            turn.retry_due |= retry_due;
            self.record_results(&mut turn).await;
            if turn.retry_due && !self.reserve.is_present() {
                self.restore_reserve().await;
            }
            if !turn.reads.is_empty() {
                self.answer(std::mem::take(&mut turn.reads)).await;
            }
            self.write_unwritten().await;
            if let Some(reply) = self
                .finished_appends
                .take_if(|_| self.unwritten.is_empty() || turn.close.is_some())
            {
                self.not_stored_at_shutdown(&self.unwritten);
                // The outboxes see their input close once nothing more can come.
                self.outboxes.clear();
                let _ = reply.send(());
            }
            if let Some(reply) = turn.close {
                self.close(reply);
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

    /// Waits for work: commands, appends (unless they must wait), or the time to try again
    /// what failed; then takes what else is there, up to a group. `None` once every store
    /// handle is gone.
    async fn take(
        &mut self,
        appends: &mut mpsc::Receiver<Append>,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Option<(Vec<Command>, bool)> {
        let mut batch = Vec::new();
        let mut retry_due = false;
        // Appends wait while the reserve is given up: the space is for recording results.
        let take_appends = self.retry_at.is_none()
            && self.reserve.is_present()
            && self.unwritten.len() < MAX_GROUP
            && self.finished_appends.is_none();
        tokio::select! {
            biased;
            command = commands.recv() => batch.push(command?),
            Some(append) = appends.recv(), if take_appends => self.unwritten.push(append),
            () = sleep_until(self.retry_at) => {
                self.retry_at = None;
                retry_due = true;
            }
        }
        while batch.len() < MAX_GROUP
            && let Ok(command) = commands.try_recv()
        {
            batch.push(command);
        }
        while take_appends
            && self.unwritten.len() < MAX_GROUP
            && let Ok(append) = appends.try_recv()
        {
            self.unwritten.push(append);
        }
        Some((batch, retry_due))
    }

    /// Sorts the commands into what this turn records, reads and whether it closes; the
    /// others are carried out at once, in order.
    async fn sort(&mut self, batch: Vec<Command>, appends: &mut mpsc::Receiver<Append>) -> Turn {
        let mut turn = Turn::default();
        for command in batch {
            match command {
                Command::Record { id, outcome } => turn.results.push((id, outcome)),
                Command::Read(read) => turn.reads.push(read),
                Command::FinishAppends { reply } => {
                    // Take what was submitted before this, then no more.
                    while let Ok(append) = appends.try_recv() {
                        self.unwritten.push(append);
                    }
                    self.finished_appends = Some(reply);
                }
                Command::Close { reply } => turn.close = Some(reply),
                Command::SetOutboxes { outboxes, reply } => {
                    // Appends taken so far were routed with the old targets: hand them on first.
                    if self.reserve.is_present() {
                        self.write_taken_appends().await;
                    }
                    self.outboxes = outboxes;
                    let _ = reply.send(());
                }
                Command::ChangeInstance { change, reply } => {
                    let changed = self
                        .with_connection(move |connection| change_instance(connection, &change))
                        .await;
                    if let Err(err) = &changed {
                        self.storage
                            .write_failed(&format_args!("cannot keep a change to the stream instances: {err}"));
                    }
                    let _ = reply.send(changed.map_err(|err| StoreError::Failed(err.to_string())));
                }
                Command::RetireTarget { target, reply } => {
                    let retired = self
                        .with_connection(move |connection| retire_target(connection, &target))
                        .await;
                    if let Err(err) = &retired {
                        self.storage.write_failed(&format_args!(
                            "cannot dead-letter the deliveries of a removed target: {err}"
                        ));
                    }
                    let _ = reply.send(retired.map_err(|err| StoreError::Failed(err.to_string())));
                }
            }
        }
        turn
    }

    /// Records the turn's results, with those that failed before when it is time to try them
    /// again. A delivery that left the queue frees space: appends waiting on a full store are
    /// worth another try at once, and so is the reserve (once a second).
    async fn record_results(&mut self, turn: &mut Turn) {
        let try_unrecorded = (turn.retry_due || turn.close.is_some()) && !self.unrecorded.is_empty();
        if turn.results.is_empty() && !try_unrecorded {
            return;
        }
        let results = std::mem::take(&mut turn.results);
        let frees_space = results.iter().any(|(_, outcome)| outcome.ends_delivery());
        if self.record(results).await && frees_space {
            self.retry_at = None;
            turn.retry_due |= self.last_restore_try.elapsed() >= RESTORE_INTERVAL;
        }
    }

    /// Writes the appends taken, unless it is not yet time to try again after a failure, and
    /// decides when to try again what failed (appends, results or the reserve).
    async fn write_unwritten(&mut self) {
        let appends_failed = self.retry_at.is_none() && self.reserve.is_present() && !self.write_taken_appends().await;
        if appends_failed || !self.unrecorded.is_empty() || !self.reserve.is_present() {
            if self.retry_at.is_none() {
                self.retry_at = Some(tokio::time::Instant::now() + self.retry_delay);
                self.retry_delay = (self.retry_delay * 2).min(MAX_RETRY_DELAY);
            }
        } else if self.retry_at.is_none() {
            self.retry_delay = MIN_RETRY_DELAY;
            self.storage.write_succeeded();
        }
    }

    /// Writes the appends taken so far; those that fail stay, in order. Returns whether all
    /// were written.
    async fn write_taken_appends(&mut self) -> bool {
        if self.unwritten.is_empty() {
            return true;
        }
        let taken = std::mem::take(&mut self.unwritten);
        match self.write_appends(taken).await {
            Ok(()) => true,
            Err(failed) => {
                self.unwritten = failed;
                false
            }
        }
    }

    /// Lets go of the storage directory and answers `close`.
    fn close(&mut self, reply: oneshot::Sender<()>) {
        if !self.unrecorded.is_empty() {
            warn!(
                n_deliveries = self.unrecorded.len(),
                "results that storage could not record at shutdown are lost: those deliveries are \
                 sent again after a restart, with the same idempotency keys"
            );
        }
        // The next relay on this directory may start as soon as this one answers.
        self.lock = None;
        let _ = reply.send(());
    }

    /// Appends that could not be stored before shutdown: counted per target, and logged.
    fn not_stored_at_shutdown(&self, unwritten: &[Append]) {
        let mut by_target: BTreeMap<&str, u64> = BTreeMap::new();
        for append in unwritten {
            for target in &append.targets {
                *by_target.entry(target).or_default() += 1;
            }
        }
        for (target, n_deliveries) in by_target {
            self.storage.not_delivered(
                target,
                n_deliveries,
                &"storage could not take the events before shutdown, so they were not stored",
            );
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

    /// Commits the appends in groups of at most `max_group_bytes` and hands each delivery on.
    /// Those that fail are returned, in order, to be tried again.
    async fn write_appends(&mut self, batch: Vec<Append>) -> Result<(), Vec<Append>> {
        let mut remaining = batch.into_iter().peekable();
        while remaining.peek().is_some() {
            let mut group = Vec::new();
            let mut n_bytes = 0;
            while let Some(append) =
                remaining.next_if(|append| group.is_empty() || n_bytes + append_bytes(append) <= self.max_group_bytes)
            {
                n_bytes += append_bytes(&append);
                group.push(append);
            }
            if let Err(mut unwritten) = self.write_group(group).await {
                unwritten.extend(remaining);
                return Err(unwritten);
            }
        }
        Ok(())
    }

    /// Commits the appends in one transaction and hands each delivery to its outbox. If the
    /// group fails, the appends are tried one at a time, so that a store with room for some but
    /// not all of them (a nearly full disk) still makes progress; those that fail are returned,
    /// in order, to be tried again.
    async fn write_group(&mut self, batch: Vec<Append>) -> Result<(), Vec<Append>> {
        let max_pages = self.max_pages;
        let (batch, written) = self
            .with_connection(move |connection| {
                let written = insert_appends(connection, &batch, max_pages);
                (batch, written)
            })
            .await;
        let failure = match written {
            Ok(ids) => {
                self.hand_on(&batch, ids);
                return Ok(());
            }
            // As text: the error is not Send, and this function waits after it.
            Err(err) => err.to_string(),
        };
        self.storage
            .write_failed(&format_args!("cannot store events: {failure}"));
        let mut remaining = batch.into_iter();
        while let Some(append) = remaining.next() {
            let (append, written) = self
                .with_connection(move |connection| {
                    let written = insert_appends(connection, std::slice::from_ref(&append), max_pages);
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
        Ok(())
    }

    /// Gives each committed delivery to its target's outbox; `ids` follow the appends'
    /// targets in order. Never waits: see `OutboxInput::offer`. A target with no outbox (a
    /// reload is removing it) keeps the row, which becomes a dead letter when it is retired.
    fn hand_on(&self, appends: &[Append], ids: Vec<DeliveryId>) {
        let mut ids = ids.into_iter();
        for append in appends {
            for target in &append.targets {
                let Some(id) = ids.next() else { return };
                if let Some(outbox) = self.outboxes.get(target) {
                    outbox.offer(Delivery::new(id, Arc::clone(&append.event)));
                }
            }
        }
    }

    /// Records the results, with any that could not be recorded before, in one transaction;
    /// returns whether everything is recorded. On a failure the reserve is given up (a full
    /// disk) and the results are tried again one at a time, so that one bad result cannot hold
    /// back the others; what still fails stays in `unrecorded`, to be tried again, and is not
    /// attempted again meanwhile.
    async fn record(&mut self, results: Vec<(DeliveryId, Outcome)>) -> bool {
        self.unrecorded.extend(results);
        let mut batch = std::mem::take(&mut self.unrecorded);
        let max_pages = self.max_pages;
        let (returned, recorded) = self
            .with_connection(move |connection| {
                let recorded = apply_outcomes(connection, &batch, max_pages);
                (batch, recorded)
            })
            .await;
        batch = returned;
        let Err(err) = recorded else {
            return true;
        };
        self.storage
            .write_failed(&format_args!("cannot record delivery results: {err}"));
        if self.reserve.release() {
            self.storage.reserve_released();
        }
        let mut remaining = std::mem::take(&mut batch).into_iter();
        while let Some((id, outcome)) = remaining.next() {
            let single = BTreeMap::from([(id, outcome)]);
            let (single, recorded) = self
                .with_connection(move |connection| {
                    let recorded = apply_outcomes(connection, &single, max_pages);
                    (single, recorded)
                })
                .await;
            if let Err(err) = recorded {
                let out_of_space = is_out_of_space(&err);
                self.unrecorded.extend(single);
                if out_of_space {
                    // The rest would fail the same way.
                    self.unrecorded.extend(remaining);
                    break;
                }
            }
        }
        self.checkpoint().await;
        self.unrecorded.is_empty()
    }

    /// Answers loads and oldest-delivery questions, leaving out deliveries whose end is not
    /// recorded yet: they were delivered (or dead-lettered) and must not be attempted again.
    async fn answer(&mut self, reads: Vec<Read>) {
        let ended: HashSet<DeliveryId> = self
            .unrecorded
            .iter()
            .filter(|(_, outcome)| outcome.ends_delivery())
            .map(|(id, _)| *id)
            .collect();
        let failures = self
            .with_connection(move |connection| {
                let mut failures = Vec::new();
                for read in reads {
                    match read {
                        Read::Load {
                            target,
                            after,
                            limit,
                            reply,
                        } => {
                            let loaded = load(connection, &target, after, limit, &ended);
                            let _ = reply.send(answer_of(loaded, &mut failures));
                        }
                        Read::Oldest { target, after, reply } => {
                            let oldest = oldest(connection, &target, after);
                            let _ = reply.send(answer_of(oldest, &mut failures));
                        }
                    }
                }
                failures
            })
            .await;
        for failure in failures {
            self.storage
                .write_failed(&format_args!("cannot read the queue database: {failure}"));
        }
    }

    /// Moves the write-ahead log into the database and truncates it, so that the space it
    /// took goes back to the filesystem.
    async fn checkpoint(&mut self) {
        let checkpointed = self
            .with_connection(|connection| {
                connection.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get::<_, i64>(0))
            })
            .await;
        if let Err(err) = checkpointed {
            self.storage
                .write_failed(&format_args!("cannot checkpoint the queue database: {err}"));
        }
    }

    /// After the reserve was given up: once the recorded results' space is back on the
    /// filesystem (the pages they freed are cut off the database file, and the write-ahead log
    /// is emptied) and the reserve can be made again, appends resume.
    async fn restore_reserve(&mut self) {
        self.last_restore_try = Instant::now();
        if self.unrecorded.is_empty() {
            let pages_per_round = (self.max_group_bytes as i64 / self.page_size).max(1);
            let shrunk = self
                .with_connection(move |connection| give_back_free_pages(connection, pages_per_round))
                .await;
            if let Err(err) = shrunk {
                self.storage
                    .write_failed(&format_args!("cannot shrink the queue database: {err}"));
            }
        }
        let mut reserve = self.reserve.clone();
        let (reserve, restored) = tokio::task::spawn_blocking(move || {
            let restored = reserve.restore();
            (reserve, restored)
        })
        .await
        .expect("making the reserve does not panic");
        self.reserve = reserve;
        if restored.is_ok() {
            self.storage.reserve_restored();
        }
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
                self.storage
                    .write_failed(&format_args!("cannot read the queue database's data version: {err}"));
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
            self.storage
                .write_failed(&format_args!("cannot purge old dead letters: {err}"));
        }
    }
}

/// What an append adds to the database, roughly.
fn append_bytes(append: &Append) -> usize {
    (append.event.data.len() + 256) * append.targets.len().max(1)
}

fn insert_appends(connection: &mut Connection, batch: &[Append], max_pages: i64) -> rusqlite::Result<Vec<DeliveryId>> {
    connection.pragma_update(None, "max_page_count", max_pages)?;
    let transaction = connection.transaction()?;
    let mut ids = Vec::with_capacity(batch.len());
    {
        let mut insert = transaction.prepare_cached(schema::INSERT_DELIVERY)?;
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
                    event.is_json,
                    millis(event.received_at),
                ])?;
                ids.push(transaction.last_insert_rowid());
            }
            if let Some(last_event_id) = &append.last_event_id {
                save_position.execute(params![&*event.stream_name, &**last_event_id])?;
            }
        }
    }
    transaction.commit()?;
    Ok(ids)
}

/// Records results in one transaction. Past `max_bytes` by a sixteenth at most: a dead letter
/// is written before its delivery is deleted, and must not wait for room that only results
/// can free.
fn apply_outcomes(
    connection: &mut Connection,
    batch: &BTreeMap<DeliveryId, Outcome>,
    max_pages: i64,
) -> rusqlite::Result<()> {
    connection.pragma_update(None, "max_page_count", max_pages + max_pages / 16 + 64)?;
    let transaction = connection.transaction()?;
    for (id, outcome) in batch {
        apply_outcome(&transaction, *id, outcome)?;
    }
    transaction.commit()
}

fn apply_outcome(transaction: &rusqlite::Transaction<'_>, id: DeliveryId, outcome: &Outcome) -> rusqlite::Result<()> {
    match outcome {
        Outcome::Delivered => {
            transaction
                .prepare_cached("DELETE FROM deliveries WHERE id = ?1")?
                .execute([id])?;
        }
        Outcome::Retry {
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
                    millis(*next_attempt_at),
                    last_error
                ])?;
        }
        Outcome::DeadLetter {
            n_attempts,
            last_status,
            last_error,
        } => {
            transaction.prepare_cached(schema::DEAD_LETTER_ONE)?.execute(params![
                id,
                n_attempts,
                last_status,
                last_error,
                millis(SystemTime::now())
            ])?;
            transaction
                .prepare_cached("DELETE FROM deliveries WHERE id = ?1")?
                .execute([id])?;
        }
    }
    Ok(())
}

fn change_instance(connection: &mut Connection, change: &InstanceChange) -> rusqlite::Result<()> {
    match change {
        InstanceChange::Save(instance) => {
            connection.execute(
                schema::SAVE_INSTANCE,
                params![instance.template, instance.id, instance.ends_at.map(millis)],
            )?;
        }
        InstanceChange::Forget { template, id, name } => {
            let transaction = connection.transaction()?;
            transaction.execute(schema::FORGET_INSTANCE, params![template, id])?;
            transaction.execute(schema::FORGET_POSITION, params![name])?;
            transaction.commit()?;
        }
    }
    Ok(())
}

/// Moves every pending delivery of a removed target to the dead letters; returns how many.
fn retire_target(connection: &mut Connection, target: &str) -> rusqlite::Result<usize> {
    let transaction = connection.transaction()?;
    let n_retired = transaction.execute(
        schema::DEAD_LETTER_ALL_OF_TARGET,
        params![target, millis(SystemTime::now())],
    )?;
    transaction.execute("DELETE FROM deliveries WHERE target = ?1", [target])?;
    transaction.commit()?;
    Ok(n_retired)
}

fn data_version(connection: &Connection) -> rusqlite::Result<i64> {
    connection.pragma_query_value(None, "data_version", |row| row.get(0))
}

fn answer_of<T>(read: rusqlite::Result<T>, failures: &mut Vec<String>) -> Result<T, StoreError> {
    read.map_err(|err| {
        failures.push(err.to_string());
        StoreError::Failed(err.to_string())
    })
}

/// Deliveries of `target` with ids above `after`, oldest first, without those in `ended`.
/// Rows left out are made up for, so that a short answer still means there are no more.
fn load(
    connection: &Connection,
    target: &str,
    after: DeliveryId,
    limit: usize,
    ended: &HashSet<DeliveryId>,
) -> rusqlite::Result<Vec<Delivery>> {
    connection
        .prepare_cached(schema::LOAD_DELIVERIES)?
        .query_map(
            params![target, after, (limit + ended.len()) as i64],
            schema::delivery_from_row,
        )?
        .filter(|pending| pending.as_ref().map_or(true, |pending| !ended.contains(&pending.id)))
        .take(limit)
        .collect()
}

/// When the first delivery of `target` with an id above `after` arrived.
fn oldest(connection: &Connection, target: &str, after: DeliveryId) -> rusqlite::Result<Option<SystemTime>> {
    let oldest = connection
        .prepare_cached("SELECT received_at_ms FROM deliveries WHERE target = ?1 AND id > ?2 ORDER BY id LIMIT 1")?
        .query_row(params![target, after], |row| row.get::<_, i64>(0))
        .optional()?;
    Ok(oldest.map(schema::from_millis))
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio_sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_pages_go_back_to_the_filesystem() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join(DATABASE_FILE);
        let connection = connect(&path).unwrap();
        give_freed_pages_back(&connection, &path);
        connection
            .execute_batch(
                "CREATE TABLE t (x BLOB);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
                 INSERT INTO t SELECT randomblob(1000) FROM n;
                 PRAGMA wal_checkpoint(TRUNCATE);",
            )
            .unwrap();
        let full = std::fs::metadata(&path).unwrap().len();
        connection.execute_batch("DELETE FROM t").unwrap();
        give_back_free_pages(&connection, 100).unwrap();
        let emptied = std::fs::metadata(&path).unwrap().len();
        assert!(emptied < full / 10, "{full} -> {emptied} bytes");
    }
}
