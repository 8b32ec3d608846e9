//! The SQLite store: one writer thread owns the database and applies commands in groups, one
//! transaction (and one fsync) per group, so that durability costs one disk flush for many
//! deliveries rather than one each.
//!
//! Only this module touches the database file while the relay runs; `dlq.rs` opens it from the
//! command line, which SQLite's WAL mode and busy timeout allow alongside the running relay.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};
use tracing::error;

use crate::config::StorageConfig;
use crate::event::{Event, EventId};
use crate::queue::{DeadLetter, DeliveryId, Pending, PendingLimit, StoreError};

/// The database file inside `storage.path`.
pub const DATABASE_FILE: &str = "relay.db";

/// Commands taken into one transaction at most.
const MAX_GROUP: usize = 4096;

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

enum Command {
    Append {
        event: Arc<Event>,
        targets: Vec<Arc<str>>,
        position: Option<(Box<str>, Box<str>)>,
        reply: Reply<Vec<DeliveryId>>,
    },
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
    Close {
        reply: oneshot::Sender<()>,
    },
}

#[derive(Clone)]
pub struct SqliteStore {
    commands: mpsc::Sender<Command>,
    pub(super) limit: Arc<PendingLimit>,
    positions: Arc<HashMap<String, String>>,
    initial_pending: Arc<HashMap<String, u64>>,
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
    pub fn open(config: &StorageConfig, storage_errors: prometheus::IntCounter) -> anyhow::Result<SqliteStore> {
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

        let (commands, receiver) = mpsc::channel(MAX_GROUP);
        let retention = config.dead_letter_retention;
        std::thread::Builder::new()
            .name("sse-relay-store".to_owned())
            .spawn(move || Writer::new(connection, storage_errors, retention).run(receiver))
            .context("cannot start the storage thread")?;
        Ok(SqliteStore {
            commands,
            limit: Arc::new(PendingLimit::new(config.max_pending.0 as u64, n_pending)),
            positions: Arc::new(positions),
            initial_pending: Arc::new(initial_pending),
        })
    }

    pub async fn append(
        &self,
        event: &Arc<Event>,
        targets: &[Arc<str>],
        position: Option<(&str, &str)>,
    ) -> Result<Vec<DeliveryId>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Append {
            event: Arc::clone(event),
            targets: targets.to_vec(),
            position: position.map(|(stream, id)| (Box::from(stream), Box::from(id))),
            reply,
        };
        self.commands.send(command).await.map_err(|_| StoreError::Stopped)?;
        answer.await.map_err(|_| StoreError::Stopped)?
    }

    pub async fn complete(&self, id: DeliveryId) {
        let _ = self.commands.send(Command::Complete { id }).await;
    }

    pub async fn reschedule(&self, pending: &Pending, last_error: &str) {
        let command = Command::Reschedule {
            id: pending.id,
            n_attempts: pending.n_attempts,
            first_attempt_at: pending.first_attempt_at,
            next_attempt_at: pending.next_attempt_at,
            last_error: last_error.to_owned(),
        };
        let _ = self.commands.send(command).await;
    }

    pub async fn dead_letter(&self, pending: &Pending, dead_letter: DeadLetter) {
        let command = Command::DeadLetter {
            id: pending.id,
            n_attempts: pending.n_attempts,
            dead_letter,
        };
        let _ = self.commands.send(command).await;
    }

    pub async fn load(&self, target: &str, after: DeliveryId, limit: usize) -> Result<Vec<Pending>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Load {
            target: target.to_owned(),
            after,
            limit,
            reply,
        };
        self.commands.send(command).await.map_err(|_| StoreError::Stopped)?;
        answer.await.map_err(|_| StoreError::Stopped)?
    }

    pub fn last_event_id(&self, stream: &str) -> Option<String> {
        self.positions.get(stream).cloned()
    }

    pub fn initial_pending(&self, target: &str) -> u64 {
        self.initial_pending.get(target).copied().unwrap_or(0)
    }

    pub async fn close(&self) {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Close { reply }).await.is_ok() {
            let _ = answer.await;
        }
    }
}

struct Writer {
    connection: Connection,
    storage_errors: prometheus::IntCounter,
    retention: Duration,
    last_purge: Instant,
}

/// Answers owed for one group, sent once its transaction has committed or failed.
#[derive(Default)]
struct Replies {
    appends: Vec<(Reply<Vec<DeliveryId>>, Vec<DeliveryId>)>,
    loads: Vec<(Reply<Vec<Pending>>, Vec<Pending>)>,
    close: Option<oneshot::Sender<()>>,
}

impl Writer {
    fn new(connection: Connection, storage_errors: prometheus::IntCounter, retention: Duration) -> Writer {
        Writer {
            connection,
            storage_errors,
            retention,
            last_purge: Instant::now() - PURGE_INTERVAL,
        }
    }

    fn run(mut self, mut receiver: mpsc::Receiver<Command>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        while let Some(first) = receiver.blocking_recv() {
            group.push(first);
            while group.len() < MAX_GROUP {
                match receiver.try_recv() {
                    Ok(command) => group.push(command),
                    Err(_) => break,
                }
            }
            let mut replies = Replies::default();
            let applied = self.apply_group(&mut group, &mut replies);
            match applied {
                Ok(()) => {
                    for (reply, ids) in replies.appends {
                        let _ = reply.send(Ok(ids));
                    }
                    for (reply, loaded) in replies.loads {
                        let _ = reply.send(Ok(loaded));
                    }
                }
                Err(err) => {
                    self.storage_errors.inc();
                    error!(error = %err, "the queue database failed to write; streams pause until it recovers");
                    let failure = StoreError::Failed(err.to_string());
                    for (reply, _) in replies.appends {
                        let _ = reply.send(Err(failure.clone()));
                    }
                    for (reply, _) in replies.loads {
                        let _ = reply.send(Err(failure.clone()));
                    }
                }
            }
            if let Some(reply) = replies.close {
                let _ = reply.send(());
                return;
            }
            if self.last_purge.elapsed() >= PURGE_INTERVAL {
                self.purge_dead_letters();
            }
        }
    }

    fn apply_group(&mut self, group: &mut Vec<Command>, replies: &mut Replies) -> rusqlite::Result<()> {
        let transaction = self.connection.transaction()?;
        let mut outcome = Ok(());
        for command in group.drain(..) {
            // After a failure the rest of the group is only answered, not applied: the
            // transaction rolls back as a whole.
            if outcome.is_err() {
                Self::answer_unapplied(command, replies);
                continue;
            }
            outcome = Self::apply(&transaction, command, replies);
        }
        outcome?;
        transaction.commit()
    }

    fn answer_unapplied(command: Command, replies: &mut Replies) {
        match command {
            Command::Append { reply, .. } => replies.appends.push((reply, Vec::new())),
            Command::Load { reply, .. } => replies.loads.push((reply, Vec::new())),
            Command::Close { reply } => replies.close = Some(reply),
            Command::Complete { .. } | Command::Reschedule { .. } | Command::DeadLetter { .. } => {}
        }
    }

    fn apply(transaction: &rusqlite::Transaction<'_>, command: Command, replies: &mut Replies) -> rusqlite::Result<()> {
        match command {
            Command::Append {
                event,
                targets,
                position,
                reply,
            } => {
                let mut insert = transaction.prepare_cached(
                    "INSERT INTO deliveries (target, event_id, stream, sse_id, event_type, data, is_json, received_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                let mut ids = Vec::with_capacity(targets.len());
                let mut appended = Ok(());
                for target in &targets {
                    let inserted = insert.execute(params![
                        &**target,
                        event.id.0.as_bytes().as_slice(),
                        &*event.stream_name,
                        event.sse_id.as_deref(),
                        &*event.event_type,
                        &event.data[..],
                        event.json.is_some(),
                        millis(event.received_at),
                    ]);
                    if let Err(err) = inserted {
                        appended = Err(err);
                        break;
                    }
                    ids.push(transaction.last_insert_rowid());
                }
                if appended.is_ok()
                    && let Some((stream, last_event_id)) = position
                {
                    appended = transaction
                        .prepare_cached(
                            "INSERT INTO stream_positions (stream, last_event_id) VALUES (?1, ?2)
                             ON CONFLICT (stream) DO UPDATE SET last_event_id = excluded.last_event_id",
                        )?
                        .execute(params![&*stream, &*last_event_id])
                        .map(drop);
                }
                replies.appends.push((reply, ids));
                appended
            }
            Command::Complete { id } => transaction
                .prepare_cached("DELETE FROM deliveries WHERE id = ?1")?
                .execute([id])
                .map(drop),
            Command::Reschedule {
                id,
                n_attempts,
                first_attempt_at,
                next_attempt_at,
                last_error,
            } => transaction
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
                ])
                .map(drop),
            Command::DeadLetter {
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
                    .execute([id])
                    .map(drop)
            }
            Command::Load {
                target,
                after,
                limit,
                reply,
            } => {
                let loaded = transaction
                    .prepare_cached(&format!(
                        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE target = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
                    ))?
                    .query_map(params![target, after, limit as i64], pending_from_row)?
                    .collect::<rusqlite::Result<Vec<Pending>>>();
                match loaded {
                    Ok(loaded) => {
                        replies.loads.push((reply, loaded));
                        Ok(())
                    }
                    Err(err) => {
                        replies.loads.push((reply, Vec::new()));
                        Err(err)
                    }
                }
            }
            Command::Close { reply } => {
                replies.close = Some(reply);
                Ok(())
            }
        }
    }

    fn purge_dead_letters(&mut self) {
        self.last_purge = Instant::now();
        let cutoff = millis(
            SystemTime::now()
                .checked_sub(self.retention)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        );
        if let Err(err) = self
            .connection
            .execute("DELETE FROM dead_letters WHERE dead_at_ms < ?1", [cutoff])
        {
            self.storage_errors.inc();
            error!(error = %err, "cannot purge old dead letters");
        }
    }
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

/// The stored last event id of a stream, for tests and tools.
pub fn stored_position(connection: &Connection, stream: &str) -> rusqlite::Result<Option<String>> {
    connection
        .query_row(
            "SELECT last_event_id FROM stream_positions WHERE stream = ?1",
            [stream],
            |row| row.get(0),
        )
        .optional()
}
