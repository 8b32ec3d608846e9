//! The PostgreSQL store: one durable queue that several replicas share.
//!
//! **Schema.** Everything lives in the schema `sse_relay`, created and migrated at start by
//! versioned migrations under an advisory lock, so that replicas starting together do not
//! race. The tables mirror SQLite's (deliveries, dead letters, stream positions, kept
//! instances) and add the replicas and their leases (see the cluster module).
//!
//! **One writer per replica.** A task takes appends, results and reads in order and writes
//! each run of them in one transaction, as the SQLite writer does: a load is answered after
//! every result sent before it is applied. While the database is unreachable it keeps what it
//! holds and tries again; its queue fills and the streams pause, so nothing accepted is lost.
//!
//! **Fencing.** An append is stored only if its stream's lease is still this replica's, under
//! the token it was read with; a result is recorded only under the target's lease. Both checks
//! lock the lease row (`FOR SHARE`) in the writing transaction, so a replica that was paused
//! past its lease, and whose work another replica took, can neither store nor record anything.
//!
//! **Ids in commit order.** Appends take a transaction-level advisory lock before they draw
//! their ids, so a delivery with a higher id is never visible before one with a lower id.
//! That lets a target's dispatcher, on whichever replica, load new rows from its high-water
//! mark, as with SQLite.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{info, warn};

use crate::config::postgres_url;
use crate::config::{StorageConfig, TlsConfig};
use crate::event::Event;
use crate::queue::lease::{Kind, Leases};
use crate::queue::outbox::{Backlog, LoadFuture, Outboxes};
use crate::queue::postgres_connect;
use crate::queue::schema::{from_millis, millis};
use crate::queue::{
    Delivery, DeliveryId, InstanceChange, Outcome, PendingLimit, Reply, SavedInstance, StoreError, StreamPositions,
};
use crate::telemetry::StorageTelemetry;

/// The migrations, in order; the database records which it applied. Never edit one that was
/// released: add the next.
const MIGRATIONS: &[&str] = &[
    // 1: the queue, the dead letters, positions and kept instances; replicas and leases.
    "
    CREATE TABLE sse_relay.deliveries (
        id bigint PRIMARY KEY,
        target text NOT NULL,
        event_id bytea NOT NULL,
        stream text NOT NULL,
        sse_id text,
        event_type text NOT NULL,
        data bytea NOT NULL,
        is_json boolean NOT NULL,
        received_at_ms bigint NOT NULL,
        n_attempts integer NOT NULL DEFAULT 0,
        first_attempt_at_ms bigint,
        next_attempt_at_ms bigint NOT NULL DEFAULT 0,
        last_error text
    );
    CREATE SEQUENCE sse_relay.delivery_ids;
    CREATE INDEX deliveries_by_target ON sse_relay.deliveries (target, id);
    CREATE TABLE sse_relay.dead_letters (
        id bigint PRIMARY KEY,
        target text NOT NULL,
        event_id bytea NOT NULL,
        stream text NOT NULL,
        sse_id text,
        event_type text NOT NULL,
        data bytea NOT NULL,
        is_json boolean NOT NULL,
        received_at_ms bigint NOT NULL,
        n_attempts integer NOT NULL,
        last_status integer,
        last_error text NOT NULL,
        dead_at_ms bigint NOT NULL
    );
    CREATE INDEX dead_letters_by_target ON sse_relay.dead_letters (target, id);
    CREATE TABLE sse_relay.stream_positions (
        stream text PRIMARY KEY,
        last_event_id text NOT NULL
    );
    CREATE TABLE sse_relay.stream_instances (
        template text NOT NULL,
        id text NOT NULL,
        ends_at_ms bigint,
        PRIMARY KEY (template, id)
    );
    CREATE TABLE sse_relay.replicas (
        name text PRIMARY KEY,
        started_at timestamptz NOT NULL DEFAULT now(),
        expires_at timestamptz NOT NULL,
        leaving boolean NOT NULL DEFAULT false
    );
    CREATE TABLE sse_relay.leases (
        kind text NOT NULL,
        name text NOT NULL,
        owner text NOT NULL,
        token bigint NOT NULL,
        expires_at timestamptz NOT NULL,
        PRIMARY KEY (kind, name)
    );
    CREATE INDEX leases_by_owner ON sse_relay.leases (owner);
    ",
    // 2: a stream handed over between replicas (make-before-break): the replica asked to take
    // it and whether its standby connection is open; with each stream's position, the keys of
    // the last events stored (8 bytes each, the last 64), written with the events.
    "
    ALTER TABLE sse_relay.leases
        ADD COLUMN handover_to text,
        ADD COLUMN handover_ready boolean NOT NULL DEFAULT false;
    CREATE INDEX leases_by_handover_to ON sse_relay.leases (handover_to) WHERE handover_to IS NOT NULL;
    ALTER TABLE sse_relay.stream_positions
        ALTER COLUMN last_event_id DROP NOT NULL,
        ADD COLUMN recent_keys bytea NOT NULL DEFAULT '';
    CREATE FUNCTION sse_relay.last_keys(keys bytea) RETURNS bytea
        LANGUAGE sql IMMUTABLE
        AS $$ SELECT substring(keys FROM greatest(1, octet_length(keys) - 511)) $$;
    ",
];

/// The advisory lock key of migrations, and of drawing delivery ids (commit order).
const MIGRATION_LOCK: i64 = 0x5353_4552_454c_4159; // "SSERELAY"
pub const APPEND_LOCK: i64 = 0x5353_4552_454c_4141;

/// Commands the writer takes at a time, in one transaction where they are of a kind.
const BATCH: usize = 512;

/// Commands that may wait for the writer; beyond it, submits wait (the streams pause).
const QUEUE: usize = 4096;

/// How long a database call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// What the writer takes, in order.
enum Command {
    Append(Append),
    Record {
        target: Arc<str>,
        /// The target's lease token when the result came (`None`: not held).
        token: Option<i64>,
        id: DeliveryId,
        outcome: Outcome,
    },
    Load {
        target: Arc<str>,
        after: DeliveryId,
        limit: usize,
        reply: Reply<Vec<Delivery>>,
    },
    Oldest {
        target: Arc<str>,
        after: DeliveryId,
        reply: Reply<Option<SystemTime>>,
    },
    /// Answered once everything before it is written.
    Flush(oneshot::Sender<()>),
    ChangeInstance {
        change: InstanceChange,
        reply: Reply<()>,
    },
    RetireTarget {
        target: Arc<str>,
        reply: Reply<usize>,
    },
}

/// One event's deliveries, one per target, and its stream's Last-Event-ID.
pub struct Append {
    pub event: Arc<Event>,
    pub targets: Vec<Arc<str>>,
    pub last_event_id: Option<Box<str>>,
    /// The stream's lease token when the event was read (`None`: not held).
    pub token: Option<i64>,
    /// The event's key for a hand-over (`source::Handover`), kept with the position.
    pub handover_key: Option<u64>,
}

#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    commands: mpsc::Sender<Command>,
    pub(super) limit: Arc<PendingLimit>,
    pub(super) positions: Arc<StreamPositions>,
    pub leases: Arc<Leases>,
    outboxes: Arc<Mutex<Outboxes>>,
    saved_instances: Arc<[SavedInstance]>,
    pending_targets: Arc<[String]>,
    external_changes: Arc<AtomicU64>,
    writer: Arc<Mutex<Option<JoinHandle<()>>>>,
    /// The database holds `max_pending` deliveries or more, all replicas together, as counted
    /// each second: submits wait (the streams pause).
    full: Arc<AtomicBool>,
}

/// The connection pool of a store or a `dlq` command; the url's password is never shown.
///
/// A transaction left open by a replica that stopped mid-way (paused, frozen, cut off) holds
/// the lock that orders appends and its fence's row locks, and so would hold up every other
/// replica's appends and lease changes: the server ends such a session after a quarter of
/// `lease_ttl` idle in a transaction (the replica has stepped down by then anyway).
pub fn pool(url: &str, tls: Option<&TlsConfig>, lease_ttl: Duration) -> anyhow::Result<Pool> {
    let (mut config, connector) = database(url, tls)?;
    config.connect_timeout(CALL_TIMEOUT);
    config.application_name("sse-relay");
    let manager = Manager::from_config(
        config,
        connector,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    // Set on each new session rather than as a startup option, which poolers such as
    // PgBouncer refuse.
    let idle_in_transaction = format!(
        "SET idle_in_transaction_session_timeout = {}",
        idle_in_transaction_timeout(lease_ttl).as_millis()
    );
    let on_connect = deadpool_postgres::Hook::async_fn(move |client, _| {
        let setting = idle_in_transaction.clone();
        Box::pin(async move {
            client
                .batch_execute(&setting)
                .await
                .map_err(deadpool_postgres::HookError::Backend)
        })
    });
    Pool::builder(manager)
        .post_create(on_connect)
        .max_size(8)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(CALL_TIMEOUT))
        .create_timeout(Some(CALL_TIMEOUT))
        .recycle_timeout(Some(CALL_TIMEOUT))
        .build()
        .context("cannot set up the PostgreSQL connection pool")
}

/// `storage.url` and the TLS connector its `sslmode` asks for; errors never hold the url.
fn database(url: &str, tls: Option<&TlsConfig>) -> anyhow::Result<(tokio_postgres::Config, MakeRustlsConnect)> {
    let has_ca_file = tls.is_some_and(|tls| tls.ca_file.is_some());
    let url = postgres_url::parse_url(url, has_ca_file).map_err(|err| anyhow::anyhow!("storage.url {err}"))?;
    let connector = postgres_connect::connector(url.verify, tls)
        .map_err(|err| anyhow::anyhow!("storage.tls: cannot set up TLS: {err}"))?;
    Ok((url.config, connector))
}

/// How long a relay's session may sit idle inside a transaction before the server ends it.
fn idle_in_transaction_timeout(lease_ttl: Duration) -> Duration {
    (lease_ttl / 4).max(Duration::from_millis(250))
}

/// Where the database is, for messages: host and port, never the user or password.
pub fn describe(storage: &StorageConfig) -> String {
    let url = storage.url.as_ref().map(|url| url.0.as_str()).unwrap_or_default();
    let has_ca_file = storage.tls.as_ref().is_some_and(|tls| tls.ca_file.is_some());
    let Ok(postgres_url::DatabaseUrl { config, verify }) = postgres_url::parse_url(url, has_ca_file) else {
        return "postgres (an unreadable url)".to_owned();
    };
    let tls = match (config.get_ssl_mode(), verify) {
        (tokio_postgres::config::SslMode::Disable, _) => "without TLS",
        (_, postgres_url::Verify::Full) => "over TLS (certificate and host name checked)",
        (_, postgres_url::Verify::Authority) => "over TLS (certificate checked)",
        (tokio_postgres::config::SslMode::Require, _) => "over TLS (certificate not checked)",
        _ => "over TLS if the server offers it (certificate not checked)",
    };
    let host = config
        .get_hosts()
        .first()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".to_owned());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let database = config.get_dbname().unwrap_or("(the user's)");
    format!("postgres {host}:{port} database {database} {tls}")
}

/// A database or pool error with its causes (the server's message, say); it never holds the
/// url.
pub fn problem(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A pool error with its causes: what the server or TLS said, which the pool's own text
/// leaves out ("Error occurred while creating a new object: db error").
pub fn pool_problem(err: &deadpool_postgres::PoolError) -> String {
    match err {
        deadpool_postgres::PoolError::Backend(err) => problem(err),
        other => problem(other),
    }
}

/// Creates the schema or brings it up to date; replicas starting together take turns.
pub async fn migrate(pool: &Pool) -> anyhow::Result<()> {
    let mut client = pool
        .get()
        .await
        .map_err(|err| anyhow::anyhow!("cannot connect: {}", pool_problem(&err)))?;
    let transaction = client.transaction().await?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    transaction
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS sse_relay;
             CREATE TABLE IF NOT EXISTS sse_relay.migrations (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await?;
    let applied: i32 = transaction
        .query_one("SELECT coalesce(max(version), 0) FROM sse_relay.migrations", &[])
        .await?
        .get(0);
    let known = MIGRATIONS.len() as i32;
    if applied > known {
        anyhow::bail!(
            "the database's sse_relay schema is at version {applied}, from a newer sse-relay; this one knows up to {known}: upgrade this replica"
        );
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let version = index as i32 + 1;
        transaction
            .batch_execute(migration)
            .await
            .with_context(|| format!("migration {version} failed"))?;
        transaction
            .execute("INSERT INTO sse_relay.migrations (version) VALUES ($1)", &[&version])
            .await?;
        info!(version, "database schema migrated");
    }
    transaction.commit().await?;
    Ok(())
}

impl PostgresStore {
    pub async fn open(config: &StorageConfig, storage: Arc<StorageTelemetry>) -> anyhow::Result<PostgresStore> {
        let url = config.url.as_ref().map(|url| url.0.as_str()).unwrap_or_default();
        let place = describe(config);
        let pool = pool(url, config.tls.as_ref(), config.lease_ttl)?;
        migrate(&pool)
            .await
            .map_err(|err| anyhow::anyhow!("storage {place}: {err:#}"))?;
        let client = pool
            .get()
            .await
            .map_err(|err| anyhow::anyhow!("storage {place}: cannot connect: {}", pool_problem(&err)))?;
        let positions = client
            // A stream without ids keeps only the keys of its last events (for a hand-over).
            .query(
                "SELECT stream, last_event_id FROM sse_relay.stream_positions WHERE last_event_id IS NOT NULL",
                &[],
            )
            .await?
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let saved_instances = client
            .query(
                "SELECT template, id, ends_at_ms FROM sse_relay.stream_instances ORDER BY template, id",
                &[],
            )
            .await?
            .into_iter()
            .map(|row| SavedInstance {
                template: row.get(0),
                id: row.get(1),
                ends_at: row.get::<_, Option<i64>>(2).map(from_millis),
            })
            .collect();
        let pending_targets = client
            .query("SELECT DISTINCT target FROM sse_relay.deliveries ORDER BY target", &[])
            .await?
            .into_iter()
            .map(|row| row.get(0))
            .collect();
        drop(client);
        let replica: Arc<str> = match &config.replica {
            Some(name) if !name.0.trim().is_empty() => Arc::from(name.0.trim()),
            // Unset, or `${POD_NAME:-}` with the variable unset.
            Some(_) | None => Arc::from(default_replica_name()),
        };
        let leases = Leases::new(replica, config.lease_ttl);
        let (commands, receiver) = mpsc::channel(QUEUE);
        let outboxes = Arc::new(Mutex::new(Outboxes::new()));
        let store = PostgresStore {
            // What one replica submits is delivered by whichever serves the target, so
            // `max_pending` is checked against the database's count (`full`), not counted here.
            limit: Arc::new(PendingLimit::new(u64::MAX, 0)),
            full: Arc::new(AtomicBool::new(false)),
            positions: Arc::new(StreamPositions::new(positions)),
            leases: Arc::clone(&leases),
            outboxes: Arc::clone(&outboxes),
            saved_instances,
            pending_targets,
            external_changes: Arc::new(AtomicU64::new(0)),
            writer: Arc::new(Mutex::new(None)),
            commands,
            pool: pool.clone(),
        };
        let writer = Writer {
            pool,
            leases,
            outboxes,
            storage,
            dead_letter_retention: config.dead_letter_retention,
        };
        *store.writer.lock().unwrap_or_else(PoisonError::into_inner) = Some(tokio::spawn(writer.run(receiver)));
        tokio::spawn(listen(
            database(url, config.tls.as_ref())?,
            Arc::downgrade(&store.outboxes),
        ));
        tokio::spawn(count_pending(
            store.pool.clone(),
            Arc::downgrade(&store.full),
            config.max_pending.0 as i64,
        ));
        Ok(store)
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The deliveries in the database reached `max_pending`: the streams pause.
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// The stream's lease token as it is now: `None` unless this replica holds the stream.
    pub fn token(&self, stream: &str) -> Option<i64> {
        self.leases.token(Kind::Stream, stream)
    }

    /// Waits while the database holds `max_pending` deliveries; returns whether it waited.
    pub async fn wait_for_room(&self) -> bool {
        let mut waited = false;
        while self.full.load(Ordering::Relaxed) {
            waited = true;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        waited
    }

    /// Queues the append, under the token it carries; returns whether it had to wait for room
    /// in the writer's queue.
    pub async fn submit(&self, append: Append) -> Result<bool, StoreError> {
        crate::queue::send_or_wait(&self.commands, Command::Append(append)).await
    }

    async fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        crate::queue::ask(&self.commands, command).await
    }

    /// Waits until everything queued before it is written (or given up under a lost lease).
    pub async fn flush(&self) {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Flush(reply)).await.is_ok() {
            let _ = answer.await;
        }
    }

    pub fn saved_instances(&self) -> Vec<SavedInstance> {
        self.saved_instances.to_vec()
    }

    /// The instances kept in the database now (another replica may have added some).
    pub async fn current_instances(&self) -> Result<Vec<SavedInstance>, StoreError> {
        let client = self.pool.get().await.map_err(failed)?;
        let rows = client
            .query(
                "SELECT template, id, ends_at_ms FROM sse_relay.stream_instances ORDER BY template, id",
                &[],
            )
            .await
            .map_err(failed)?;
        Ok(rows
            .into_iter()
            .map(|row| SavedInstance {
                template: row.get(0),
                id: row.get(1),
                ends_at: row.get::<_, Option<i64>>(2).map(from_millis),
            })
            .collect())
    }

    pub async fn change_instance(&self, change: InstanceChange) -> Result<(), StoreError> {
        self.ask(|reply| Command::ChangeInstance { change, reply }).await
    }

    pub fn pending_targets(&self) -> Vec<String> {
        self.pending_targets.to_vec()
    }

    /// Reads a stream's position from the database: its Last-Event-ID into memory (another
    /// replica may have read the stream since this one last did), and the keys of the last
    /// events stored, oldest first.
    pub async fn refresh_position(&self, stream: &str) -> Result<Arc<[u64]>, StoreError> {
        let client = self.pool.get().await.map_err(failed)?;
        let row = client
            .query_opt(
                "SELECT last_event_id, recent_keys FROM sse_relay.stream_positions WHERE stream = $1",
                &[&stream],
            )
            .await
            .map_err(failed)?;
        let Some(row) = row else {
            self.positions.forget(stream);
            return Ok(Arc::from([]));
        };
        match row.get::<_, Option<&str>>(0) {
            Some(id) => self.positions.remember(stream, id),
            None => self.positions.forget(stream),
        }
        let keys: &[u8] = row.get(1);
        Ok(keys
            .chunks_exact(8)
            .map(|chunk| u64::from_be_bytes(chunk.try_into().expect("8 bytes")))
            .collect())
    }

    /// Who holds each lease of `kind`, by name.
    pub async fn lease_owners(&self, kind: Kind) -> Result<HashMap<String, String>, StoreError> {
        let client = self.pool.get().await.map_err(failed)?;
        let rows = client
            .query(
                "SELECT name, owner FROM sse_relay.leases WHERE kind = $1 AND expires_at > now()",
                &[&kind.label()],
            )
            .await
            .map_err(failed)?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    pub fn set_outboxes(&self, outboxes: Outboxes) {
        *self.outboxes.lock().unwrap_or_else(PoisonError::into_inner) = outboxes;
    }

    pub async fn retire_target(&self, target: Arc<str>) -> Result<usize, StoreError> {
        self.ask(|reply| Command::RetireTarget { target, reply }).await
    }

    /// Writes what was submitted, then lets the outboxes' inputs close.
    pub async fn finish_appends(&self) {
        self.flush().await;
        self.outboxes.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// Stops the writer after it has written everything sent to it.
    pub async fn close(&self) {
        self.flush().await;
        let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(writer) = writer {
            writer.abort();
            let _ = writer.await;
        }
    }
}

impl Backlog for PostgresStore {
    fn load(&self, target: &Arc<str>, after: DeliveryId, limit: usize) -> LoadFuture {
        let (store, target) = (self.clone(), Arc::clone(target));
        Box::pin(async move {
            store
                .ask(|reply| Command::Load {
                    target,
                    after,
                    limit,
                    reply,
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
        Box::pin(async move { store.ask(|reply| Command::Oldest { target, after, reply }).await })
    }

    fn record(&self, target: &Arc<str>, id: DeliveryId, outcome: Outcome) -> BoxFuture<'_, ()> {
        let target = Arc::clone(target);
        let token = self.leases.token(Kind::Target, &target);
        Box::pin(async move {
            let record = Command::Record {
                target,
                token,
                id,
                outcome,
            };
            let _ = self.commands.send(record).await;
        })
    }

    fn external_changes(&self) -> u64 {
        self.external_changes.load(Ordering::Relaxed)
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn count(&self, target: &Arc<str>) -> BoxFuture<'static, Result<Option<u64>, StoreError>> {
        let (pool, target) = (self.pool.clone(), Arc::clone(target));
        Box::pin(async move {
            let client = pool.get().await.map_err(failed)?;
            let row = client
                .query_one(
                    "SELECT count(*) FROM sse_relay.deliveries WHERE target = $1",
                    &[&&*target],
                )
                .await
                .map_err(failed)?;
            Ok(Some(row.get::<_, i64>(0) as u64))
        })
    }
}

/// A database or pool error, as text (it never holds the url).
struct DbError(String);

impl From<tokio_postgres::Error> for DbError {
    fn from(err: tokio_postgres::Error) -> DbError {
        DbError(problem(&err))
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(err: deadpool_postgres::PoolError) -> DbError {
        DbError(pool_problem(&err))
    }
}

/// Hears of deliveries committed by any replica (`NOTIFY sse_relay_deliveries`, the target's
/// name) and wakes the target's outbox, if this replica has it; polling each second is the
/// backstop. Reconnects after a failure, and then wakes every outbox (a notification may have
/// been missed). Ends with the store.
async fn listen(
    (mut config, connector): (tokio_postgres::Config, MakeRustlsConnect),
    outboxes: std::sync::Weak<Mutex<Outboxes>>,
) {
    config.connect_timeout(CALL_TIMEOUT);
    config.application_name("sse-relay listen");
    let poke = |target: Option<&str>| -> bool {
        let Some(outboxes) = outboxes.upgrade() else {
            return false;
        };
        let outboxes = outboxes.lock().unwrap_or_else(PoisonError::into_inner);
        match target {
            Some(target) => {
                if let Some(outbox) = outboxes.get(target) {
                    outbox.poke();
                }
            }
            None => outboxes.values().for_each(crate::queue::outbox::OutboxInput::poke),
        }
        true
    };
    loop {
        if let Ok((client, mut connection)) = config.connect(connector.clone()).await {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            let listening = client.batch_execute("LISTEN sse_relay_deliveries");
            let mut listening = std::pin::pin!(listening);
            let mut listened = false;
            loop {
                tokio::select! {
                    done = &mut listening, if !listened => {
                        if done.is_err() {
                            break;
                        }
                        listened = true;
                        if !poke(None) {
                            return;
                        }
                    }
                    message = futures_util::StreamExt::next(&mut messages) => match message {
                        Some(Ok(tokio_postgres::AsyncMessage::Notification(notification))) => {
                            if !poke(Some(notification.payload())) {
                                return;
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    },
                }
            }
        }
        if outboxes.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Counts the deliveries in the database each second, all replicas together, against
/// `max_pending`. Ends with the store.
async fn count_pending(pool: Pool, full: std::sync::Weak<AtomicBool>, max_pending: i64) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(full) = full.upgrade() else { return };
        let counted = async {
            let client = pool.get().await.ok()?;
            let row = client
                .query_one("SELECT count(*) FROM sse_relay.deliveries", &[])
                .await
                .ok()?;
            Some(row.get::<_, i64>(0))
        };
        // Unknown while the database is away: the writer's queue bounds what waits meanwhile.
        if let Ok(Some(n_pending)) = tokio::time::timeout(CALL_TIMEOUT, counted).await {
            full.store(n_pending >= max_pending, Ordering::Relaxed);
        }
    }
}

fn failed(err: impl std::fmt::Display) -> StoreError {
    StoreError::Failed(err.to_string())
}

/// The host name and a random suffix: unique among replicas, and readable in `GET /v1/streams`.
fn default_replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "relay".to_owned());
    format!("{host}-{:04x}", fastrand::u16(..))
}

struct Writer {
    pool: Pool,
    leases: Arc<Leases>,
    outboxes: Arc<Mutex<Outboxes>>,
    storage: Arc<StorageTelemetry>,
    dead_letter_retention: Duration,
}

/// A result: the target, its lease token when it came, the delivery and its outcome.
type Record = (Arc<str>, Option<i64>, DeliveryId, Outcome);

/// Whether an append's stream lease was found valid, under the token it was read with.
/// The leases of one kind that this replica holds under the tokens asked about, by name, as
/// the writing transaction found (and locked) them.
type Fence = HashMap<String, i64>;

/// Finds which of `names` this replica holds under `tokens`, and locks those rows until the
/// transaction ends, so that no other replica can take them meanwhile.
async fn fence(
    transaction: &deadpool_postgres::Transaction<'_>,
    kind: Kind,
    replica: &str,
    names: &[&str],
    tokens: &[i64],
) -> Result<Fence, tokio_postgres::Error> {
    let rows = transaction
        .query(
            "SELECT name, token FROM sse_relay.leases
             WHERE kind = $1 AND owner = $2
               AND (name, token) IN (SELECT * FROM UNNEST($3::text[], $4::bigint[]))
             FOR SHARE",
            &[&kind.label(), &replica, &names, &tokens],
        )
        .await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// Whether the fence let through work done under `token` for `name` (no allocation: this runs
/// per append and per result).
fn holds(fence: &Fence, name: &str, token: Option<i64>) -> bool {
    token.is_some_and(|token| fence.get(name) == Some(&token))
}

/// A run of commands of one kind, written together.
enum Run {
    Appends(Vec<Append>),
    Records(Vec<Record>),
    Other(Command),
}

impl Writer {
    async fn run(self, mut receiver: mpsc::Receiver<Command>) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut purge = tokio::time::interval(Duration::from_secs(600));
        loop {
            tokio::select! {
                n = receiver.recv_many(&mut batch, BATCH) => if n == 0 { break },
                _ = purge.tick() => {
                    self.purge_dead_letters().await;
                    continue;
                }
            }
            for run in runs(std::mem::take(&mut batch)) {
                match run {
                    Run::Appends(appends) => self.write_appends(appends).await,
                    Run::Records(records) => self.write_records(records).await,
                    Run::Other(command) => self.answer(command).await,
                }
            }
        }
    }

    /// Runs `work` until it succeeds; a failure is counted, logged once per outage, and tried
    /// again after a pause that grows to 2 s.
    async fn until_written<T, F: Future<Output = Result<T, DbError>>>(&self, mut work: impl FnMut() -> F) -> T {
        let mut pause = Duration::from_millis(50);
        loop {
            match tokio::time::timeout(CALL_TIMEOUT, work()).await {
                Ok(Ok(value)) => {
                    self.storage.write_succeeded();
                    return value;
                }
                Ok(Err(DbError(err))) => self.storage.write_failed(&format_args!("PostgreSQL: {err}")),
                Err(_) => self.storage.write_failed(&"PostgreSQL did not answer within 5s"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Stores appends whose streams this replica still holds, under their tokens; hands each
    /// stored delivery to its target's outbox when this replica serves the target.
    async fn write_appends(&self, appends: Vec<Append>) {
        // Each stream's token as its events were read: the database refuses them once another
        // replica holds the stream, however long the database was away meanwhile.
        let tokens: HashSet<(&str, i64)> = appends
            .iter()
            .filter_map(|append| Some((&*append.event.stream_name, append.token?)))
            .collect();
        let (names, token_values): (Vec<&str>, Vec<i64>) = tokens.into_iter().unzip();
        let replica = Arc::clone(self.leases.replica());
        let (appends_ref, names_ref, tokens_ref, replica_ref) = (&appends, &names, &token_values, &replica);
        let written = self
            .until_written(|| async move {
                let (appends, names, token_values, replica) = (appends_ref, names_ref, tokens_ref, replica_ref);
                let mut client = self.pool.get().await?;
                let transaction = client.transaction().await?;
                // The lock that keeps ids in commit order, the fence, and ids for every
                // delivery, sent together (pipelined) and run in that order; ids of refused
                // ones are left unused. The lock comes first: a transaction waiting for it
                // holds no lease row, so this replica's renewal never waits behind it.
                let n_all = appends.iter().map(|append| append.targets.len()).sum::<usize>() as i64;
                let lock_parameters: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&APPEND_LOCK];
                let lock = transaction.execute("SELECT pg_advisory_xact_lock($1)", &lock_parameters);
                let fenced = fence(&transaction, Kind::Stream, replica, names, token_values);
                let n_parameters: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&n_all];
                let draw = transaction.query(
                    "SELECT nextval('sse_relay.delivery_ids') FROM generate_series(1, $1::bigint)",
                    &n_parameters,
                );
                let (_, valid, drawn) = futures_util::future::try_join3(lock, fenced, draw).await?;
                let kept: Vec<&Append> = appends
                    .iter()
                    .filter(|append| holds(&valid, &append.event.stream_name, append.token))
                    .collect();
                let n_kept: usize = kept.iter().map(|append| append.targets.len()).sum();
                if n_kept == 0 {
                    transaction.commit().await?;
                    return Ok((valid, Vec::new()));
                }
                let mut ids: Vec<i64> = drawn.into_iter().map(|row| row.get(0)).collect();
                ids.sort_unstable();
                let mut columns = Columns::with_capacity(n_kept);
                // Per stream: the last id, and the keys of its events in order.
                let mut positions: HashMap<&str, (Option<&str>, Vec<u8>)> = HashMap::new();
                let mut next_id = ids.iter();
                for append in &kept {
                    for target in &append.targets {
                        columns.push(*next_id.next().expect("one id per delivery"), target, &append.event);
                    }
                    if append.last_event_id.is_some() || append.handover_key.is_some() {
                        let position = positions.entry(&append.event.stream_name).or_default();
                        if let Some(id) = &append.last_event_id {
                            position.0 = Some(id);
                        }
                        if let Some(key) = append.handover_key {
                            position.1.extend_from_slice(&key.to_be_bytes());
                        }
                    }
                }
                let insert_parameters: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
                    &columns.ids,
                    &columns.targets,
                    &columns.event_ids,
                    &columns.streams,
                    &columns.sse_ids,
                    &columns.event_types,
                    &columns.data,
                    &columns.is_json,
                    &columns.received_at,
                ];
                let insert = transaction.execute(
                    "INSERT INTO sse_relay.deliveries
                         (id, target, event_id, stream, sse_id, event_type, data, is_json, received_at_ms)
                     SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::bytea[], $4::text[], $5::text[],
                                          $6::text[], $7::bytea[], $8::bool[], $9::bigint[])",
                    &insert_parameters,
                );
                // Wakes the dispatchers of these targets, on whichever replica, at commit.
                let mut targets: Vec<&str> = columns.targets.clone();
                targets.sort_unstable();
                targets.dedup();
                let notify_parameters: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&targets];
                let notify = transaction.execute(
                    "SELECT pg_notify('sse_relay_deliveries', target) FROM UNNEST($1::text[]) AS target",
                    &notify_parameters,
                );
                let mut streams = Vec::with_capacity(positions.len());
                let mut last_ids = Vec::with_capacity(positions.len());
                let mut keys = Vec::with_capacity(positions.len());
                for (stream, (last_id, stream_keys)) in positions {
                    streams.push(stream);
                    last_ids.push(last_id);
                    keys.push(stream_keys);
                }
                let positions = async {
                    if streams.is_empty() {
                        return Ok(0);
                    }
                    transaction
                        .execute(
                            "INSERT INTO sse_relay.stream_positions AS kept (stream, last_event_id, recent_keys)
                             SELECT stream, last_id, sse_relay.last_keys(keys)
                             FROM UNNEST($1::text[], $2::text[], $3::bytea[]) AS new(stream, last_id, keys)
                             ON CONFLICT (stream) DO UPDATE SET
                                 last_event_id = coalesce(EXCLUDED.last_event_id, kept.last_event_id),
                                 recent_keys = sse_relay.last_keys(kept.recent_keys || EXCLUDED.recent_keys)",
                            &[&streams, &last_ids, &keys],
                        )
                        .await
                };
                // Sent together (pipelined): one round trip for the three.
                futures_util::future::try_join3(insert, notify, positions).await?;
                transaction.commit().await?;
                Ok((valid, ids))
            })
            .await;
        let (valid, _ids) = written;
        let outboxes = self.outboxes.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let mut refused: HashMap<&str, u64> = HashMap::new();
        for append in &appends {
            let stored = holds(&valid, &append.event.stream_name, append.token);
            for target in &append.targets {
                if !stored {
                    *refused.entry(target).or_default() += 1;
                } else if let Some(outbox) = outboxes.get(target) {
                    // The replica that serves the target hears of it by NOTIFY; this one may.
                    outbox.poke();
                }
            }
        }
        for (target, n) in refused {
            self.storage.not_delivered(
                target,
                n,
                &"the stream's lease was lost before they were stored (another replica reads the stream now)",
            );
        }
    }

    /// Records results under each target's lease; those of a target whose lease this replica
    /// lost are not recorded (the replica that holds it now attempts them again).
    async fn write_records(&self, records: Vec<Record>) {
        let (records, unheld): (Vec<Record>, Vec<Record>) =
            records.into_iter().partition(|(_, token, _, _)| token.is_some());
        for (target, _, _, _) in &unheld {
            warn!(webhook = %target, "a result not recorded: this replica no longer serves the target");
        }
        if records.is_empty() {
            return;
        }
        let leases: HashSet<(&str, i64)> = records
            .iter()
            .filter_map(|(target, token, _, _)| Some((&**target, (*token)?)))
            .collect();
        let (names, tokens): (Vec<&str>, Vec<i64>) = leases.iter().copied().unzip();
        let replica = Arc::clone(self.leases.replica());
        let (records_ref, names_ref, tokens_ref, replica_ref) = (&records, &names, &tokens, &replica);
        let valid = self
            .until_written(|| async move {
                let (records, names, tokens, replica) = (records_ref, names_ref, tokens_ref, replica_ref);
                let mut client = self.pool.get().await?;
                let transaction = client.transaction().await?;
                let valid = fence(&transaction, Kind::Target, replica, names, tokens).await?;
                let recorded = |(target, token, _, _): &&Record| holds(&valid, target, *token);
                // Deliveries that succeeded, the common case, go in one statement; the other
                // results are sent together (pipelined).
                let delivered: Vec<DeliveryId> = records
                    .iter()
                    .filter(recorded)
                    .filter(|(_, _, _, outcome)| *outcome == Outcome::Delivered)
                    .map(|(_, _, id, _)| *id)
                    .collect();
                let now = millis(SystemTime::now());
                let others = records
                    .iter()
                    .filter(recorded)
                    .filter(|(_, _, _, outcome)| *outcome != Outcome::Delivered)
                    .map(|(_, _, id, outcome)| apply_outcome(&transaction, *id, outcome, now));
                let delete = async {
                    if !delivered.is_empty() {
                        transaction
                            .execute("DELETE FROM sse_relay.deliveries WHERE id = ANY($1)", &[&delivered])
                            .await?;
                    }
                    Ok::<(), tokio_postgres::Error>(())
                };
                futures_util::future::try_join(delete, futures_util::future::try_join_all(others)).await?;
                transaction.commit().await?;
                Ok(valid)
            })
            .await;
        for (target, token) in leases {
            if !holds(&valid, target, Some(token)) {
                warn!(
                    webhook = %target,
                    "results not recorded: the target's lease passed to another replica, which attempts them again"
                );
                self.leases
                    .set(Kind::Target, target, crate::queue::lease::Grant::NotHeld);
            }
        }
    }

    async fn answer(&self, command: Command) {
        match command {
            Command::Load {
                target,
                after,
                limit,
                reply,
            } => {
                let loaded = if self.leases.token(Kind::Target, &target).is_none() {
                    Ok(Vec::new())
                } else {
                    self.read(async {
                        let client = self.pool.get().await?;
                        Ok(load(&client, &target, after, limit).await?)
                    })
                    .await
                };
                let _ = reply.send(loaded);
            }
            Command::Oldest { target, after, reply } => {
                let oldest = self
                    .read(async {
                        let client = self.pool.get().await?;
                        let row = client
                            .query_one(
                                "SELECT min(received_at_ms) FROM sse_relay.deliveries WHERE target = $1 AND id > $2",
                                &[&&*target, &after],
                            )
                            .await?;
                        Ok(row.get::<_, Option<i64>>(0).map(from_millis))
                    })
                    .await;
                let _ = reply.send(oldest);
            }
            Command::Flush(reply) => {
                let _ = reply.send(());
            }
            Command::ChangeInstance { change, reply } => {
                let changed = self
                    .read(async {
                        let client = self.pool.get().await?;
                        match &change {
                            InstanceChange::Save(instance) => {
                                client
                                    .execute(
                                        "INSERT INTO sse_relay.stream_instances (template, id, ends_at_ms)
                                         VALUES ($1, $2, $3)
                                         ON CONFLICT (template, id) DO UPDATE SET ends_at_ms = EXCLUDED.ends_at_ms",
                                        &[&instance.template, &instance.id, &instance.ends_at.map(millis)],
                                    )
                                    .await?;
                            }
                            InstanceChange::Forget { template, id, name } => {
                                client
                                    .execute(
                                        "DELETE FROM sse_relay.stream_instances WHERE template = $1 AND id = $2",
                                        &[template, id],
                                    )
                                    .await?;
                                client
                                    .execute("DELETE FROM sse_relay.stream_positions WHERE stream = $1", &[name])
                                    .await?;
                            }
                        }
                        Ok(())
                    })
                    .await;
                let _ = reply.send(changed);
            }
            Command::RetireTarget { target, reply } => {
                let retired = self
                    .read(async {
                        let mut client = self.pool.get().await?;
                        let transaction = client.transaction().await?;
                        transaction
                            .execute(
                                "INSERT INTO sse_relay.dead_letters
                                     (id, target, event_id, stream, sse_id, event_type, data, is_json, received_at_ms,
                                      n_attempts, last_status, last_error, dead_at_ms)
                                 SELECT id, target, event_id, stream, sse_id, event_type, data, is_json, received_at_ms,
                                        n_attempts, NULL, 'the target was removed from the config', $2
                                 FROM sse_relay.deliveries WHERE target = $1
                                 ON CONFLICT (id) DO NOTHING",
                                &[&&*target, &millis(SystemTime::now())],
                            )
                            .await?;
                        let n = transaction
                            .execute("DELETE FROM sse_relay.deliveries WHERE target = $1", &[&&*target])
                            .await?;
                        transaction.commit().await?;
                        Ok(n as usize)
                    })
                    .await;
                let _ = reply.send(retired);
            }
            Command::Append(_) | Command::Record { .. } => unreachable!("runs take appends and records"),
        }
    }

    /// One try of a read (or a change whose caller hears of its failure).
    async fn read<T>(&self, work: impl Future<Output = Result<T, DbError>>) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(CALL_TIMEOUT, work).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(DbError(err))) => Err(StoreError::Failed(err)),
            Err(_) => Err(StoreError::Failed("PostgreSQL did not answer within 5s".to_owned())),
        };
        if let Err(err) = &result {
            self.storage.write_failed(&format_args!("PostgreSQL: {err}"));
        }
        result
    }

    async fn purge_dead_letters(&self) {
        let before = millis(SystemTime::now() - self.dead_letter_retention);
        let purged = self
            .read(async {
                let client = self.pool.get().await?;
                Ok(client
                    .execute("DELETE FROM sse_relay.dead_letters WHERE dead_at_ms < $1", &[&before])
                    .await?)
            })
            .await;
        match purged {
            Ok(0) | Err(_) => {}
            Ok(n) => info!(n_purged = n, "dead letters past their retention were purged"),
        }
    }
}

/// Splits commands into runs: consecutive appends, consecutive results, and the rest alone.
fn runs(commands: Vec<Command>) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for command in commands {
        match (command, runs.last_mut()) {
            (Command::Append(append), Some(Run::Appends(appends))) => appends.push(append),
            (Command::Append(append), _) => runs.push(Run::Appends(vec![append])),
            (
                Command::Record {
                    target,
                    token,
                    id,
                    outcome,
                },
                last,
            ) => match last {
                Some(Run::Records(records)) => records.push((target, token, id, outcome)),
                _ => runs.push(Run::Records(vec![(target, token, id, outcome)])),
            },
            (other, _) => runs.push(Run::Other(other)),
        }
    }
    runs
}

/// The deliveries of one insert, column by column.
struct Columns<'a> {
    ids: Vec<i64>,
    targets: Vec<&'a str>,
    event_ids: Vec<&'a [u8]>,
    streams: Vec<&'a str>,
    sse_ids: Vec<Option<&'a str>>,
    event_types: Vec<&'a str>,
    data: Vec<&'a [u8]>,
    is_json: Vec<bool>,
    received_at: Vec<i64>,
}

impl<'a> Columns<'a> {
    fn with_capacity(n: usize) -> Columns<'a> {
        Columns {
            ids: Vec::with_capacity(n),
            targets: Vec::with_capacity(n),
            event_ids: Vec::with_capacity(n),
            streams: Vec::with_capacity(n),
            sse_ids: Vec::with_capacity(n),
            event_types: Vec::with_capacity(n),
            data: Vec::with_capacity(n),
            is_json: Vec::with_capacity(n),
            received_at: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, id: i64, target: &'a str, event: &'a Event) {
        self.ids.push(id);
        self.targets.push(target);
        self.event_ids.push(event.id.0.as_bytes());
        self.streams.push(&event.stream_name);
        self.sse_ids.push(event.sse_id.as_deref());
        self.event_types.push(&event.event_type);
        self.data.push(&event.data);
        self.is_json.push(event.is_json);
        self.received_at.push(millis(event.received_at));
    }
}

async fn apply_outcome(
    transaction: &deadpool_postgres::Transaction<'_>,
    id: DeliveryId,
    outcome: &Outcome,
    now: i64,
) -> Result<(), tokio_postgres::Error> {
    match outcome {
        Outcome::Delivered => {
            transaction
                .execute("DELETE FROM sse_relay.deliveries WHERE id = $1", &[&id])
                .await?;
        }
        Outcome::Retry {
            n_attempts,
            first_attempt_at,
            next_attempt_at,
            last_error,
        } => {
            transaction
                .execute(
                    "UPDATE sse_relay.deliveries
                     SET n_attempts = $2, first_attempt_at_ms = $3, next_attempt_at_ms = $4, last_error = $5
                     WHERE id = $1",
                    &[
                        &id,
                        &(*n_attempts as i32),
                        &first_attempt_at.map(millis),
                        &millis(*next_attempt_at),
                        last_error,
                    ],
                )
                .await?;
        }
        Outcome::DeadLetter {
            n_attempts,
            last_status,
            last_error,
        } => {
            transaction
                .execute(
                    "INSERT INTO sse_relay.dead_letters
                         (id, target, event_id, stream, sse_id, event_type, data, is_json, received_at_ms,
                          n_attempts, last_status, last_error, dead_at_ms)
                     SELECT id, target, event_id, stream, sse_id, event_type, data, is_json, received_at_ms,
                            $2, $3, $4, $5
                     FROM sse_relay.deliveries WHERE id = $1
                     ON CONFLICT (id) DO NOTHING",
                    &[
                        &id,
                        &(*n_attempts as i32),
                        &last_status.map(i32::from),
                        last_error,
                        &now,
                    ],
                )
                .await?;
            transaction
                .execute("DELETE FROM sse_relay.deliveries WHERE id = $1", &[&id])
                .await?;
        }
    }
    Ok(())
}

async fn load(
    client: &deadpool_postgres::Object,
    target: &str,
    after: DeliveryId,
    limit: usize,
) -> Result<Vec<Delivery>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT id, event_id, stream, sse_id, event_type, data, is_json, received_at_ms, n_attempts,
                    first_attempt_at_ms, next_attempt_at_ms
             FROM sse_relay.deliveries WHERE target = $1 AND id > $2 ORDER BY id LIMIT $3",
            &[&target, &after, &(limit as i64)],
        )
        .await?;
    Ok(rows.iter().map(delivery_from_row).collect())
}

fn delivery_from_row(row: &tokio_postgres::Row) -> Delivery {
    let event_id: &[u8] = row.get(1);
    let stream: &str = row.get(2);
    let event_type: &str = row.get(4);
    let data: &[u8] = row.get(5);
    let event = Event {
        id: crate::event::EventId(uuid::Uuid::from_slice(event_id).unwrap_or_default()),
        stream_name: Arc::from(stream),
        sse_id: row.get::<_, Option<&str>>(3).map(Box::from),
        event_type: Arc::from(event_type),
        data: bytes::Bytes::copy_from_slice(data),
        is_json: row.get(6),
        json: std::sync::OnceLock::new(),
        received_at: from_millis(row.get(7)),
    };
    Delivery {
        id: row.get(0),
        event: Arc::new(event),
        n_attempts: row.get::<_, i32>(8) as u32,
        first_attempt_at: row.get::<_, Option<i64>>(9).map(from_millis),
        next_attempt_at: from_millis(row.get(10)),
    }
}
