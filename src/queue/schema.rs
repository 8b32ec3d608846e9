//! The SQLite database's tables, the column lists every statement uses, and the mapping of a
//! row to a [`Delivery`] or a [`DeadLetterRow`]: one place for the store (`sqlite.rs`) and the
//! `dlq` command alike. Statements are put together at compile time.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::event::{Event, EventId};
use crate::queue::Delivery;

pub const SCHEMA: &str = "
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
CREATE TABLE IF NOT EXISTS stream_instances (
    template TEXT NOT NULL,
    id TEXT NOT NULL,
    ends_at_ms INTEGER,
    PRIMARY KEY (template, id)
);
";

/// Instances added through the admin API, to start again after a restart.
pub const LOAD_INSTANCES: &str = "SELECT template, id, ends_at_ms FROM stream_instances ORDER BY template, id";

/// Keeps an instance (`?1` template, `?2` id, `?3` when it ends, if it does).
pub const SAVE_INSTANCE: &str =
    "INSERT OR REPLACE INTO stream_instances (template, id, ends_at_ms) VALUES (?1, ?2, ?3)";

/// Forgets an instance (`?1` template, `?2` id) and its stream's position (`?3`, its name).
pub const FORGET_INSTANCE: &str = "DELETE FROM stream_instances WHERE template = ?1 AND id = ?2";
pub const FORGET_POSITION: &str = "DELETE FROM stream_positions WHERE stream = ?1";

/// The columns a delivery and a dead letter share: the event and its target. A statement
/// that moves rows between the two tables names them through this.
macro_rules! event_columns {
    () => {
        "target, event_id, stream, sse_id, event_type, data, is_json, received_at_ms"
    };
}

/// Adds a delivery: the event columns, in order.
pub const INSERT_DELIVERY: &str = concat!(
    "INSERT INTO deliveries (",
    event_columns!(),
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
);

/// Moves the delivery `?1` to the dead letters, with `?2` attempts, `?3` the last status, `?4`
/// the last error and `?5` when.
pub const DEAD_LETTER_ONE: &str = concat!(
    "INSERT OR REPLACE INTO dead_letters (id, ",
    event_columns!(),
    ", n_attempts, last_status, last_error, dead_at_ms) SELECT id, ",
    event_columns!(),
    ", ?2, ?3, ?4, ?5 FROM deliveries WHERE id = ?1"
);

/// Moves every delivery of a target (`?1`) to the dead letters, with `?2` as when.
pub const DEAD_LETTER_ALL_OF_TARGET: &str = concat!(
    "INSERT OR REPLACE INTO dead_letters (id, ",
    event_columns!(),
    ", n_attempts, last_status, last_error, dead_at_ms) SELECT id, ",
    event_columns!(),
    ", n_attempts, NULL, 'the target was removed from the config', ?2 FROM deliveries WHERE target = ?1"
);

/// Puts dead letters back in the queue, with their attempts reset and their event ids kept;
/// the `WHERE` clause that selects them follows.
pub const REPLAY_DEAD_LETTERS: &str = concat!(
    "INSERT INTO deliveries (",
    event_columns!(),
    ") SELECT ",
    event_columns!(),
    " FROM dead_letters WHERE "
);

/// A delivery's columns, in the order `delivery_from_row` reads them.
macro_rules! delivery_columns {
    () => {
        "id, event_id, stream, sse_id, event_type, data, is_json, received_at_ms, n_attempts, \
         first_attempt_at_ms, next_attempt_at_ms"
    };
}

/// Deliveries of a target (`?1`) with ids above `?2`, oldest first, at most `?3`.
pub const LOAD_DELIVERIES: &str = concat!(
    "SELECT ",
    delivery_columns!(),
    " FROM deliveries WHERE target = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
);

/// Reads a row selected by `LOAD_DELIVERIES`. The data is not parsed: an event loaded back
/// is parsed on first use, if a target needs its JSON value (see `Event::json`).
pub fn delivery_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Delivery> {
    let event_id: Vec<u8> = row.get(1)?;
    let stream: String = row.get(2)?;
    let event_type: String = row.get(4)?;
    let data: Vec<u8> = row.get(5)?;
    let event = Event {
        id: EventId(uuid::Uuid::from_slice(&event_id).unwrap_or_default()),
        stream_name: Arc::from(stream),
        sse_id: row.get::<_, Option<String>>(3)?.map(String::into_boxed_str),
        event_type: Arc::from(event_type),
        data: Bytes::from(data),
        is_json: row.get(6)?,
        json: OnceLock::new(),
        received_at: from_millis(row.get(7)?),
    };
    Ok(Delivery {
        id: row.get(0)?,
        event: Arc::new(event),
        n_attempts: row.get(8)?,
        first_attempt_at: row.get::<_, Option<i64>>(9)?.map(from_millis),
        next_attempt_at: from_millis(row.get(10)?),
    })
}

/// A dead letter as `sse-relay dlq list` shows it.
#[derive(Debug, serde::Serialize)]
pub struct DeadLetterRow {
    pub id: i64,
    pub target: String,
    pub stream: String,
    pub event_type: String,
    pub event_id: String,
    pub n_attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: String,
    pub dead_at: String,
    pub data_bytes: usize,
}

/// Dead letters, in the order `dead_letter_from_row` reads them; the `WHERE` clause follows.
pub const LIST_DEAD_LETTERS: &str = "SELECT id, target, stream, event_type, event_id, n_attempts, last_status, \
                                     last_error, dead_at_ms, length(data) FROM dead_letters WHERE ";

pub fn dead_letter_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetterRow> {
    let event_id: Vec<u8> = row.get(4)?;
    Ok(DeadLetterRow {
        id: row.get(0)?,
        target: row.get(1)?,
        stream: row.get(2)?,
        event_type: row.get(3)?,
        event_id: uuid::Uuid::from_slice(&event_id).unwrap_or_default().to_string(),
        n_attempts: row.get(5)?,
        last_status: row.get(6)?,
        last_error: row.get(7)?,
        dead_at: humantime::format_rfc3339_seconds(from_millis(row.get(8)?)).to_string(),
        data_bytes: row.get::<_, i64>(9)? as usize,
    })
}

/// A time as the database keeps it: milliseconds since the Unix epoch.
pub fn millis(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|since| since.as_millis() as i64)
        .unwrap_or(0)
}

pub fn from_millis(millis: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(millis.max(0) as u64)
}
