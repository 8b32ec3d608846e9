//! `sse-relay dlq list | replay | purge`: the dead letters in the SQLite or PostgreSQL store,
//! read and changed from the command line. Safe while the relay runs: the database serializes
//! the writes, and the relay's dispatchers notice replayed deliveries within a second (with
//! PostgreSQL, at once: the replay notifies them).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rusqlite::types::Value;

use crate::config::{StorageConfig, StorageMode};
use crate::queue::schema::{self, millis};
use crate::queue::sqlite;

pub use crate::queue::schema::DeadLetterRow;

/// Which dead letters a command applies to.
#[derive(Debug, Default, Clone)]
pub struct Selection {
    pub target: Option<String>,
    pub id: Option<i64>,
    pub older_than: Option<Duration>,
}

impl Selection {
    fn is_empty(&self) -> bool {
        self.target.is_none() && self.id.is_none() && self.older_than.is_none()
    }

    /// A WHERE clause and its parameters.
    fn filter(&self) -> (String, Vec<Value>) {
        let mut conditions = vec!["1 = 1".to_owned()];
        let mut parameters = Vec::new();
        if let Some(target) = &self.target {
            parameters.push(Value::Text(target.clone()));
            conditions.push(format!("target = ?{}", parameters.len()));
        }
        if let Some(id) = self.id {
            parameters.push(Value::Integer(id));
            conditions.push(format!("id = ?{}", parameters.len()));
        }
        if let Some(older_than) = self.older_than {
            let cutoff = SystemTime::now()
                .checked_sub(older_than)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            parameters.push(Value::Integer(millis(cutoff)));
            conditions.push(format!("dead_at_ms < ?{}", parameters.len()));
        }
        (conditions.join(" AND "), parameters)
    }
}

fn open(config: &StorageConfig) -> anyhow::Result<rusqlite::Connection> {
    anyhow::ensure!(
        config.mode != StorageMode::Memory,
        "storage.mode is memory: dead letters are logged and counted, not kept"
    );
    let path = sqlite::database_path(config);
    anyhow::ensure!(
        path.exists(),
        "no queue database at {}: the relay has not run with this storage.path",
        path.display()
    );
    sqlite::connect_checked(&path)
}

pub fn list(config: &StorageConfig, selection: &Selection) -> anyhow::Result<Vec<DeadLetterRow>> {
    if config.mode == StorageMode::Postgres {
        return on_postgres(config, |pool| async move { postgres::list(&pool, selection).await });
    }
    list_rows(config, selection).with_context(|| {
        format!(
            "cannot read the dead letters in {}",
            sqlite::database_path(config).display()
        )
    })
}

fn list_rows(config: &StorageConfig, selection: &Selection) -> anyhow::Result<Vec<DeadLetterRow>> {
    let connection = open(config)?;
    let (filter, parameters) = selection.filter();
    let mut statement = connection.prepare(&format!("{}{filter} ORDER BY id", schema::LIST_DEAD_LETTERS))?;
    let rows = statement
        .query_map(rusqlite::params_from_iter(parameters), schema::dead_letter_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Moves the selected dead letters back to the queue, with their attempts reset and their
/// event ids (and so their idempotency keys) unchanged. Returns how many.
pub fn replay(config: &StorageConfig, selection: &Selection, all: bool) -> anyhow::Result<usize> {
    anyhow::ensure!(
        all || !selection.is_empty(),
        "say which dead letters to replay: --id ID, --target NAME, or --all"
    );
    if config.mode == StorageMode::Postgres {
        return on_postgres(config, |pool| async move { postgres::replay(&pool, selection).await });
    }
    replay_rows(config, selection).with_context(|| {
        format!(
            "cannot replay dead letters in {}",
            sqlite::database_path(config).display()
        )
    })
}

fn replay_rows(config: &StorageConfig, selection: &Selection) -> anyhow::Result<usize> {
    let mut connection = open(config)?;
    let (filter, parameters) = selection.filter();
    let transaction = connection.transaction()?;
    let n_replayed = transaction.execute(
        &format!("{}{filter} ORDER BY id", schema::REPLAY_DEAD_LETTERS),
        rusqlite::params_from_iter(parameters.clone()),
    )?;
    transaction.execute(
        &format!("DELETE FROM dead_letters WHERE {filter}"),
        rusqlite::params_from_iter(parameters),
    )?;
    transaction.commit()?;
    Ok(n_replayed)
}

/// Deletes the selected dead letters for good. Returns how many.
pub fn purge(config: &StorageConfig, selection: &Selection, all: bool) -> anyhow::Result<usize> {
    anyhow::ensure!(
        all || !selection.is_empty(),
        "say which dead letters to purge: --target NAME, --older-than DURATION, --id ID, or --all"
    );
    if config.mode == StorageMode::Postgres {
        return on_postgres(config, |pool| async move { postgres::purge(&pool, selection).await });
    }
    purge_rows(config, selection).with_context(|| {
        format!(
            "cannot purge dead letters in {}",
            sqlite::database_path(config).display()
        )
    })
}

fn purge_rows(config: &StorageConfig, selection: &Selection) -> anyhow::Result<usize> {
    let connection = open(config)?;
    let (filter, parameters) = selection.filter();
    Ok(connection.execute(
        &format!("DELETE FROM dead_letters WHERE {filter}"),
        rusqlite::params_from_iter(parameters),
    )?)
}

/// Runs a dead-letter command on the PostgreSQL store, on a runtime of its own; errors name
/// the database by host and port.
fn on_postgres<'a, T, F: Future<Output = anyhow::Result<T>> + 'a>(
    config: &StorageConfig,
    work: impl FnOnce(deadpool_postgres::Pool) -> F,
) -> anyhow::Result<T> {
    let url = config.url.as_ref().map(|url| url.0.as_str()).unwrap_or_default();
    let place = crate::queue::postgres::describe(config);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime
        .block_on(async {
            let pool = crate::queue::postgres::pool(url, config.tls.as_ref(), config.lease_ttl)?;
            crate::queue::postgres::migrate(&pool).await?;
            work(pool).await
        })
        .with_context(|| format!("dead letters in {place}"))
}

/// The dead-letter commands on PostgreSQL.
mod postgres {
    use tokio_postgres::types::ToSql;

    use super::{DeadLetterRow, Selection, millis};

    /// A WHERE clause and its parameters.
    fn filter(selection: &Selection) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
        let mut conditions = vec!["true".to_owned()];
        let mut parameters: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        if let Some(target) = &selection.target {
            parameters.push(Box::new(target.clone()));
            conditions.push(format!("target = ${}", parameters.len()));
        }
        if let Some(id) = selection.id {
            parameters.push(Box::new(id));
            conditions.push(format!("id = ${}", parameters.len()));
        }
        if let Some(older_than) = selection.older_than {
            let cutoff = std::time::SystemTime::now()
                .checked_sub(older_than)
                .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            parameters.push(Box::new(millis(cutoff)));
            conditions.push(format!("dead_at_ms < ${}", parameters.len()));
        }
        (conditions.join(" AND "), parameters)
    }

    fn references(parameters: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
        parameters
            .iter()
            .map(|parameter| &**parameter as &(dyn ToSql + Sync))
            .collect()
    }

    pub async fn list(pool: &deadpool_postgres::Pool, selection: &Selection) -> anyhow::Result<Vec<DeadLetterRow>> {
        let client = pool.get().await?;
        let (filter, parameters) = filter(selection);
        let rows = client
            .query(
                &format!(
                    "SELECT id, target, stream, event_type, event_id, n_attempts, last_status, last_error,
                            dead_at_ms, octet_length(data)
                     FROM sse_relay.dead_letters WHERE {filter} ORDER BY id"
                ),
                &references(&parameters),
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| DeadLetterRow {
                id: row.get(0),
                target: row.get(1),
                stream: row.get(2),
                event_type: row.get(3),
                event_id: uuid::Uuid::from_slice(row.get(4)).unwrap_or_default().to_string(),
                n_attempts: row.get::<_, i32>(5) as u32,
                last_status: row
                    .get::<_, Option<i32>>(6)
                    .and_then(|status| u16::try_from(status).ok()),
                last_error: row.get(7),
                dead_at: humantime::format_rfc3339_seconds(crate::queue::schema::from_millis(row.get(8))).to_string(),
                data_bytes: row.get::<_, i32>(9) as usize,
            })
            .collect())
    }

    /// Moves dead letters back to the queue with new ids drawn in commit order (see
    /// `queue::postgres`), attempts reset, event ids kept; the dispatchers are notified.
    pub async fn replay(pool: &deadpool_postgres::Pool, selection: &Selection) -> anyhow::Result<usize> {
        let mut client = pool.get().await?;
        let (filter, parameters) = filter(selection);
        let transaction = client.transaction().await?;
        transaction
            .execute(
                "SELECT pg_advisory_xact_lock($1)",
                &[&crate::queue::postgres::APPEND_LOCK],
            )
            .await?;
        let targets: Vec<String> = transaction
            .query(
                &format!(
                    "WITH moved AS (DELETE FROM sse_relay.dead_letters WHERE {filter} RETURNING *),
                     replayed AS (
                         INSERT INTO sse_relay.deliveries
                             (id, target, event_id, stream, sse_id, event_type, data, is_json, received_at_ms)
                         SELECT nextval('sse_relay.delivery_ids'), target, event_id, stream, sse_id, event_type,
                                data, is_json, received_at_ms
                         FROM (SELECT * FROM moved ORDER BY id) AS ordered
                         RETURNING target
                     )
                     SELECT target FROM replayed"
                ),
                &references(&parameters),
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let mut notified = targets.clone();
        notified.sort_unstable();
        notified.dedup();
        transaction
            .execute(
                "SELECT pg_notify('sse_relay_deliveries', target) FROM UNNEST($1::text[]) AS target",
                &[&notified],
            )
            .await?;
        transaction.commit().await?;
        Ok(targets.len())
    }

    pub async fn purge(pool: &deadpool_postgres::Pool, selection: &Selection) -> anyhow::Result<usize> {
        let client = pool.get().await?;
        let (filter, parameters) = filter(selection);
        let n = client
            .execute(
                &format!("DELETE FROM sse_relay.dead_letters WHERE {filter}"),
                &references(&parameters),
            )
            .await?;
        Ok(n as usize)
    }
}

/// The rows as an aligned table.
pub fn table(rows: &[DeadLetterRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6}  {:<12} {:<12} {:<28} {:>8} {:>6}  {:<20}  last error",
        "id", "target", "stream", "event type", "attempts", "status", "dead since"
    );
    for row in rows {
        let status = row.last_status.map_or("-".to_owned(), |status| status.to_string());
        let _ = writeln!(
            out,
            "{:>6}  {:<12} {:<12} {:<28} {:>8} {:>6}  {:<20}  {}",
            row.id, row.target, row.stream, row.event_type, row.n_attempts, status, row.dead_at, row.last_error
        );
    }
    let _ = write!(out, "{} dead letter(s)", rows.len());
    out
}
