//! Duplicate suppression while a stream rotates its connection (make-before-break).
//!
//! During the overlap, both connections carry every event published after the second one
//! subscribed, in the same order. Each connection's events are remembered, as keys, until the
//! other connection has shown them too; an event whose key the other connection already showed
//! is a duplicate. Matching is in order: when a key matches deep in the other connection's
//! list, the keys before it were events only that connection saw (published before the second
//! subscription, say), and they are forgotten so that a later event with the same content is
//! not mistaken for them.
//!
//! A key is the SSE id when the server sends ids, else a hash of the event type and the data.
//! Without ids, two distinct events with identical type and data that straddle the moment the
//! second connection subscribed cannot be told apart from one event seen twice; that is the
//! limit of content-based deduplication.
//!
//! Pure: no IO and no clock of its own; the caller passes the time.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash, Hasher};

use tokio::time::Instant;

/// Keys remembered per connection at most; an overlap of normal length holds far fewer. Past
/// it the oldest keys are forgotten, which can let a duplicate through but never drops an event.
const MAX_KEYS_PER_CONNECTION: usize = 65_536;

/// The key of one event for duplicate detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventKey(u64);

/// One connection's keys that the other connection has not shown yet.
struct Side {
    connection: u64,
    open: bool,
    keys: VecDeque<EventKey>,
}

pub struct OverlapDeduplicator {
    hasher: std::collections::hash_map::RandomState,
    sides: Vec<Side>,
    /// Set once only one connection is left: the remembered keys still catch the late copies
    /// of events the closed connection showed first, until this instant.
    expires_at: Option<Instant>,
    grace: std::time::Duration,
}

impl OverlapDeduplicator {
    pub fn new(grace: std::time::Duration) -> OverlapDeduplicator {
        OverlapDeduplicator {
            hasher: std::collections::hash_map::RandomState::new(),
            sides: Vec::new(),
            expires_at: None,
            grace,
        }
    }

    /// True while keys are needed: from the start of an overlap until its grace period ends.
    pub fn is_active(&mut self, now: Instant) -> bool {
        if self.expires_at.is_some_and(|expires_at| now >= expires_at) {
            self.clear();
        }
        !self.sides.is_empty()
    }

    pub fn key(&self, sse_id: Option<&str>, event_type: &str, data: &[u8]) -> EventKey {
        let mut hasher = self.hasher.build_hasher();
        match sse_id {
            Some(id) => {
                0u8.hash(&mut hasher);
                id.hash(&mut hasher);
            }
            None => {
                1u8.hash(&mut hasher);
                event_type.hash(&mut hasher);
                data.hash(&mut hasher);
            }
        }
        EventKey(hasher.finish())
    }

    /// A second connection opened beside `current`: from now on both are compared.
    pub fn begin(&mut self, current: u64, next: u64) {
        self.sides.clear();
        self.expires_at = None;
        for connection in [current, next] {
            self.sides.push(Side {
                connection,
                open: true,
                keys: VecDeque::new(),
            });
        }
    }

    /// True when `connection`'s event with `key` was already shown by the other connection.
    pub fn is_duplicate(&mut self, connection: u64, key: EventKey) -> bool {
        let others = self.sides.iter_mut().filter(|side| side.connection != connection);
        for other in others {
            if let Some(position) = other.keys.iter().position(|seen| *seen == key) {
                other.keys.drain(..=position);
                return true;
            }
        }
        let other_open = self.sides.iter().any(|side| side.connection != connection && side.open);
        if let Some(own) = self.sides.iter_mut().find(|side| side.connection == connection)
            && own.open
            && other_open
        {
            if own.keys.len() == MAX_KEYS_PER_CONNECTION {
                own.keys.pop_front();
            }
            own.keys.push_back(key);
        }
        false
    }

    /// `connection` closed: its keys are kept for the grace period, to match the events the
    /// remaining connection has yet to show.
    pub fn closed(&mut self, connection: u64, now: Instant) {
        if let Some(side) = self.sides.iter_mut().find(|side| side.connection == connection) {
            side.open = false;
        }
        // Nothing the remaining connection shows from now on needs remembering.
        for side in self.sides.iter_mut().filter(|side| side.open) {
            side.keys.clear();
        }
        self.expires_at = Some(now + self.grace);
    }

    /// The second connection failed before it carried anything: there is nothing to compare.
    pub fn clear(&mut self) {
        self.sides.clear();
        self.expires_at = None;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const OLD: u64 = 1;
    const NEW: u64 = 2;

    /// Feeds `(connection, content)` arrivals in order and returns the contents that pass.
    fn passed(arrivals: &[(u64, &str)]) -> Vec<String> {
        let mut dedup = OverlapDeduplicator::new(Duration::from_secs(5));
        dedup.begin(OLD, NEW);
        arrivals
            .iter()
            .filter(|(connection, content)| {
                let key = dedup.key(None, "message", content.as_bytes());
                !dedup.is_duplicate(*connection, key)
            })
            .map(|(_, content)| content.to_string())
            .collect()
    }

    #[test]
    fn each_event_passes_once_whichever_connection_shows_it_first() {
        let arrivals = [
            (OLD, "a"),
            (OLD, "b"),
            (NEW, "b"),
            (NEW, "c"),
            (OLD, "c"),
            (OLD, "d"),
            (NEW, "d"),
        ];
        assert_eq!(passed(&arrivals), ["a", "b", "c", "d"]);
    }

    #[test]
    fn repeated_identical_events_are_matched_one_for_one() {
        let status = r#"{"is_active":false,"type":"workflow_status"}"#;
        let arrivals = [
            (OLD, status),
            (OLD, status),
            (NEW, status),
            (NEW, status),
            (NEW, status),
        ];
        // Two copies on each connection are the same two events; the third on the new one is new.
        assert_eq!(passed(&arrivals), [status, status, status]);
    }

    #[test]
    fn events_only_the_old_connection_saw_are_not_matched_later() {
        // "x" was published before the new connection subscribed, so only the old one has it;
        // once "y" matches past it, a later "x" on the new connection is a new event.
        let arrivals = [(OLD, "x"), (OLD, "y"), (NEW, "y"), (NEW, "x")];
        assert_eq!(passed(&arrivals), ["x", "y", "x"]);
    }

    #[test]
    fn ids_are_keys_when_the_server_sends_them() {
        let dedup = OverlapDeduplicator::new(Duration::from_secs(5));
        assert_eq!(dedup.key(Some("7"), "a", b"one"), dedup.key(Some("7"), "b", b"two"));
        assert_ne!(dedup.key(Some("7"), "a", b"one"), dedup.key(Some("8"), "a", b"one"));
        assert_ne!(dedup.key(None, "a", b"one"), dedup.key(None, "b", b"one"));
    }

    #[test]
    fn late_copies_are_caught_until_the_grace_period_ends() {
        let start = Instant::now();
        let mut dedup = OverlapDeduplicator::new(Duration::from_secs(5));
        dedup.begin(OLD, NEW);
        let key = |dedup: &OverlapDeduplicator, content: &str| dedup.key(None, "t", content.as_bytes());
        let (a, b) = (key(&dedup, "a"), key(&dedup, "b"));
        assert!(!dedup.is_duplicate(OLD, a));
        assert!(!dedup.is_duplicate(OLD, b));
        dedup.closed(OLD, start);
        assert!(dedup.is_active(start + Duration::from_secs(4)));
        assert!(dedup.is_duplicate(NEW, a));
        assert!(!dedup.is_active(start + Duration::from_secs(5)));
        assert!(
            !dedup.is_duplicate(NEW, b),
            "after the grace period nothing is remembered"
        );
    }

    #[test]
    fn a_single_connection_remembers_nothing() {
        let mut dedup = OverlapDeduplicator::new(Duration::from_secs(5));
        dedup.begin(OLD, NEW);
        dedup.closed(NEW, Instant::now());
        let key = dedup.key(None, "t", b"same");
        assert!(!dedup.is_duplicate(OLD, key));
        assert!(!dedup.is_duplicate(OLD, key));
    }
}
