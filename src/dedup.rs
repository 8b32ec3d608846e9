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
    /// Set once the connection closed: its keys are kept until then, to catch the copies that
    /// the remaining connection shows late.
    expires_at: Option<Instant>,
    keys: VecDeque<EventKey>,
}

impl Side {
    fn is_open(&self) -> bool {
        self.expires_at.is_none()
    }
}

pub struct OverlapDeduplicator {
    hasher: std::collections::hash_map::RandomState,
    sides: Vec<Side>,
    grace: std::time::Duration,
}

impl OverlapDeduplicator {
    pub fn new(grace: std::time::Duration) -> OverlapDeduplicator {
        OverlapDeduplicator {
            hasher: std::collections::hash_map::RandomState::new(),
            sides: Vec::new(),
            grace,
        }
    }

    /// True while keys are needed: from the start of an overlap until the grace period of the
    /// last closed connection ends.
    pub fn is_active(&mut self, now: Instant) -> bool {
        self.sides
            .retain(|side| side.expires_at.is_none_or(|expires_at| now < expires_at));
        if self.sides.iter().all(Side::is_open) && self.sides.len() < 2 {
            self.sides.clear();
        }
        !self.sides.is_empty()
    }

    /// The key of an event. `fresh_id` says whether the SSE id is the event's own: a parser
    /// gives events without an `id:` field the last id seen on their connection, and two
    /// connections can have seen different last ids, so such events are keyed by content.
    pub fn key(&self, sse_id: Option<&str>, fresh_id: bool, event_type: &str, data: &[u8]) -> EventKey {
        let mut hasher = self.hasher.build_hasher();
        match sse_id.filter(|_| fresh_id) {
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

    /// A hash of an SSE id, to tell whether the next event's id is its own or carried on.
    pub fn id_hash(&self, sse_id: &str) -> u64 {
        self.hasher.hash_one(sse_id)
    }

    /// A second connection opened beside `current`: from now on both are compared. The keys of
    /// an earlier overlap's closed connection stay until their grace period ends.
    pub fn begin(&mut self, current: u64, next: u64) {
        self.sides
            .retain(|side| !side.is_open() && side.connection != current && side.connection != next);
        for connection in [current, next] {
            self.sides.push(Side {
                connection,
                expires_at: None,
                keys: VecDeque::new(),
            });
        }
    }

    /// True when `connection`'s event with `key` was already shown by another connection.
    pub fn is_duplicate(&mut self, connection: u64, key: EventKey) -> bool {
        let others = self.sides.iter_mut().filter(|side| side.connection != connection);
        for other in others {
            if let Some(position) = other.keys.iter().position(|seen| *seen == key) {
                other.keys.drain(..=position);
                return true;
            }
        }
        let other_open = self
            .sides
            .iter()
            .any(|side| side.connection != connection && side.is_open());
        if let Some(own) = self.sides.iter_mut().find(|side| side.connection == connection)
            && own.is_open()
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
        let expires_at = now + self.grace;
        if let Some(side) = self.sides.iter_mut().find(|side| side.connection == connection) {
            side.expires_at = Some(expires_at);
        }
        // Nothing the remaining connection shows from now on needs remembering.
        for side in self.sides.iter_mut().filter(|side| side.is_open()) {
            side.keys.clear();
        }
    }

    /// `connection` ended before it carried anything: there is nothing to compare with it, and
    /// what the other connection showed meanwhile need not be remembered.
    pub fn forget(&mut self, connection: u64) {
        self.sides.retain(|side| side.connection != connection);
        for side in self.sides.iter_mut().filter(|side| side.is_open()) {
            side.keys.clear();
        }
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
                let key = dedup.key(None, false, "message", content.as_bytes());
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
        assert_eq!(
            dedup.key(Some("7"), true, "a", b"one"),
            dedup.key(Some("7"), true, "b", b"two")
        );
        assert_ne!(
            dedup.key(Some("7"), true, "a", b"one"),
            dedup.key(Some("8"), true, "a", b"one")
        );
        assert_ne!(dedup.key(None, false, "a", b"one"), dedup.key(None, false, "b", b"one"));
        // An id carried on from an earlier event is not the event's own: content decides.
        assert_eq!(
            dedup.key(Some("7"), false, "a", b"one"),
            dedup.key(None, false, "a", b"one")
        );
        assert_ne!(
            dedup.key(Some("7"), false, "a", b"one"),
            dedup.key(Some("7"), false, "a", b"two")
        );
    }

    #[test]
    fn late_copies_are_caught_until_the_grace_period_ends() {
        let start = Instant::now();
        let mut dedup = OverlapDeduplicator::new(Duration::from_secs(5));
        dedup.begin(OLD, NEW);
        let key = |dedup: &OverlapDeduplicator, content: &str| dedup.key(None, false, "t", content.as_bytes());
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
    fn a_new_overlap_keeps_the_last_ones_late_copies() {
        let start = Instant::now();
        let mut dedup = OverlapDeduplicator::new(Duration::from_secs(5));
        dedup.begin(OLD, NEW);
        let late = dedup.key(None, false, "t", b"late");
        assert!(!dedup.is_duplicate(OLD, late));
        dedup.closed(OLD, start);
        // The next rotation starts at once: NEW is current, 3 is its replacement.
        dedup.begin(NEW, 3);
        assert!(dedup.is_active(start + Duration::from_secs(1)));
        assert!(dedup.is_duplicate(NEW, late), "OLD's late copy is still caught");
    }

    #[test]
    fn a_single_connection_remembers_nothing() {
        let mut dedup = OverlapDeduplicator::new(Duration::from_secs(5));
        dedup.begin(OLD, NEW);
        dedup.forget(NEW);
        let key = dedup.key(None, false, "t", b"same");
        assert!(!dedup.is_duplicate(OLD, key));
        assert!(!dedup.is_duplicate(OLD, key));
    }
}
