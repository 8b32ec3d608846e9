//! `sse-relay dlq list | replay | purge`: the dead letters in the SQLite store, read and changed
//! from the command line. Safe while the relay runs: SQLite serializes the writes, and the
//! relay's dispatchers notice replayed deliveries within a second.

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
        config.mode == StorageMode::Sqlite,
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
    replay_rows(config, selection, all).with_context(|| {
        format!(
            "cannot replay dead letters in {}",
            sqlite::database_path(config).display()
        )
    })
}

fn replay_rows(config: &StorageConfig, selection: &Selection, all: bool) -> anyhow::Result<usize> {
    anyhow::ensure!(
        all || !selection.is_empty(),
        "say which dead letters to replay: --id ID, --target NAME, or --all"
    );
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
    purge_rows(config, selection, all).with_context(|| {
        format!(
            "cannot purge dead letters in {}",
            sqlite::database_path(config).display()
        )
    })
}

fn purge_rows(config: &StorageConfig, selection: &Selection, all: bool) -> anyhow::Result<usize> {
    anyhow::ensure!(
        all || !selection.is_empty(),
        "say which dead letters to purge: --target NAME, --older-than DURATION, --id ID, or --all"
    );
    let connection = open(config)?;
    let (filter, parameters) = selection.filter();
    Ok(connection.execute(
        &format!("DELETE FROM dead_letters WHERE {filter}"),
        rusqlite::params_from_iter(parameters),
    )?)
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
