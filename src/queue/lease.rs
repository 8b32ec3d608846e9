//! What this replica holds when several share a PostgreSQL store: a lease per stream instance
//! and per target, each with its fencing token. The cluster module acquires,
//! renews and gives them up in the database; this is its record in memory, which the streams,
//! the dispatchers and the store's writer read.
//!
//! Who wants a lease registers for it ([`Leases::watch`]) and hears when it is granted or
//! lost. A lease counts as held only until `valid_until`: a renewal pushes that forward, and
//! a replica that cannot renew (the database is unreachable, or the process was paused) stops
//! using its leases before another replica can take them. The database refuses a write under
//! a token that is no longer the lease's (the store's writer checks it in the same
//! transaction), so a replica that resumes after a pause cannot store or record anything stale.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// What a lease is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Stream,
    Target,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Stream => "stream",
            Kind::Target => "target",
        }
    }

    pub fn of_label(label: &str) -> Option<Kind> {
        match label {
            "stream" => Some(Kind::Stream),
            "target" => Some(Kind::Target),
            _ => None,
        }
    }
}

/// Whether this replica may use a lease now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Another replica has it, or nobody does yet.
    NotHeld,
    /// Another replica hands the stream over to this one: connect, and hold what arrives
    /// until the lease is granted (make-before-break).
    Standby,
    /// This replica holds it, under this fencing token. For a stream, `handed_over` has the
    /// keys of the last events stored from it, oldest first: what a standby connection held
    /// up to the last of them was taken already.
    Held {
        token: i64,
        handed_over: Option<Arc<[u64]>>,
    },
}

/// What the two sides of a stream's hand-over tell the cluster.
#[derive(Default)]
pub struct Handoff {
    /// The new owner's standby connection is open.
    pub ready: AtomicBool,
    /// The stream's task runs; the old owner waits for it to stop before it hands over.
    pub running: AtomicBool,
}

struct Entry {
    /// How many tasks want it (a reload can start a target's new dispatcher before the old
    /// one has stopped).
    n_registered: usize,
    /// How many of those stand for an instance that ended on its own (`watch_finished`).
    n_finished: usize,
    grant: watch::Sender<Grant>,
    handoff: Arc<Handoff>,
}

impl Entry {
    /// Every registration stands for an instance that ended on its own.
    fn is_finished(&self) -> bool {
        self.n_finished > 0 && self.n_finished == self.n_registered
    }
}

pub struct Leases {
    replica: Arc<str>,
    ttl: Duration,
    /// By kind (`Kind as usize`), then by name.
    entries: Mutex<[HashMap<Arc<str>, Entry>; 2]>,
    /// Until when the last renewal keeps the held leases valid, by this process's clock.
    valid_until: Mutex<Option<Instant>>,
}

impl Leases {
    pub fn new(replica: Arc<str>, ttl: Duration) -> Arc<Leases> {
        Arc::new(Leases {
            replica,
            ttl,
            entries: Mutex::new([HashMap::new(), HashMap::new()]),
            valid_until: Mutex::new(None),
        })
    }

    /// This replica's name.
    pub fn replica(&self) -> &Arc<str> {
        &self.replica
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Registers interest in a lease: the cluster tries to acquire it when it falls to this
    /// replica, and the watch says when it is held.
    pub fn watch(self: &Arc<Self>, kind: Kind, name: &str) -> LeaseWatch {
        self.register(kind, name, false)
    }

    /// Registers a stream instance that ended on its own (`stop_when`, `ttl`) and is not read
    /// again while its config stays the same: while the watch lives, this replica keeps the
    /// lease it holds, never hands it over and never takes it, so that no other replica reads
    /// the instance again.
    pub fn watch_finished(self: &Arc<Self>, kind: Kind, name: &str) -> LeaseWatch {
        self.register(kind, name, true)
    }

    fn register(self: &Arc<Self>, kind: Kind, name: &str, finished: bool) -> LeaseWatch {
        let mut entries = self.lock();
        let entry = entries[kind as usize].entry(Arc::from(name)).or_insert_with(|| Entry {
            n_registered: 0,
            n_finished: 0,
            grant: watch::Sender::new(Grant::NotHeld),
            handoff: Arc::default(),
        });
        entry.n_registered += 1;
        entry.n_finished += usize::from(finished);
        LeaseWatch {
            leases: Arc::clone(self),
            kind,
            name: Arc::from(name),
            finished,
            grant: entry.grant.subscribe(),
            handoff: Arc::clone(&entry.handoff),
        }
    }

    /// Every registered lease, with whether it stands only for an instance that ended on its
    /// own (`watch_finished`).
    pub fn registered(&self) -> Vec<(Kind, Arc<str>, bool)> {
        let entries = self.lock();
        [Kind::Stream, Kind::Target]
            .into_iter()
            .flat_map(|kind| {
                entries[kind as usize]
                    .iter()
                    .map(move |(name, entry)| (kind, Arc::clone(name), entry.is_finished()))
            })
            .collect()
    }

    /// The token of a lease this replica holds and may use now.
    pub fn token(&self, kind: Kind, name: &str) -> Option<i64> {
        if !self.is_valid() {
            return None;
        }
        let entries = self.lock();
        let entry = entries[kind as usize].get(name)?;
        match &*entry.grant.borrow() {
            Grant::Held { token, .. } => Some(*token),
            Grant::NotHeld | Grant::Standby => None,
        }
    }

    /// The current grant of a registered lease.
    pub fn grant(&self, kind: Kind, name: &str) -> Option<Grant> {
        let entries = self.lock();
        Some(entries[kind as usize].get(name)?.grant.borrow().clone())
    }

    /// The hand-over state of a registered lease.
    pub fn handoff(&self, kind: Kind, name: &str) -> Option<Arc<Handoff>> {
        let entries = self.lock();
        Some(Arc::clone(&entries[kind as usize].get(name)?.handoff))
    }

    /// Whether the held leases are still valid by this process's clock.
    pub fn is_valid(&self) -> bool {
        self.valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|until| Instant::now() < until)
    }

    /// A renewal that started at `started` succeeded: the leases stay valid for most of a
    /// `ttl` from then (the rest is a margin for clocks that run at different rates).
    pub fn renewed(&self, started: Instant) {
        *self.valid_until.lock().unwrap_or_else(PoisonError::into_inner) = Some(started + self.ttl * 3 / 4);
    }

    /// Sets whether a lease is held; returns whether that changed. A lease nobody registered
    /// for any longer is not recorded.
    pub fn set(&self, kind: Kind, name: &str, grant: Grant) -> bool {
        let entries = self.lock();
        let Some(entry) = entries[kind as usize].get(name) else {
            return false;
        };
        entry.grant.send_if_modified(|current| {
            if *current == grant {
                return false;
            }
            *current = grant;
            true
        })
    }

    /// Every lease is given up in memory (the replica steps down: it could not renew in time).
    pub fn lose_all(&self) -> usize {
        *self.valid_until.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let entries = self.lock();
        entries
            .iter()
            .flat_map(HashMap::values)
            .filter(|entry| {
                entry.grant.send_if_modified(|current| {
                    let was_held = !matches!(current, Grant::NotHeld);
                    *current = Grant::NotHeld;
                    was_held
                })
            })
            .count()
    }

    /// How many leases of `kind` this replica holds.
    /// How many leases of `kind` this replica holds to work under: a lease kept for an
    /// instance that ended on its own is not counted (nothing reads it, nothing hands it over).
    pub fn n_held(&self, kind: Kind) -> usize {
        self.lock()[kind as usize]
            .values()
            .filter(|entry| !entry.is_finished())
            .filter(|entry| matches!(*entry.grant.borrow(), Grant::Held { .. }))
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [HashMap<Arc<str>, Entry>; 2]> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One task's registration for a lease; dropping it gives the interest up (the cluster then
/// releases the lease if nobody else here wants it).
pub struct LeaseWatch {
    leases: Arc<Leases>,
    kind: Kind,
    name: Arc<str>,
    /// It stands for an instance that ended on its own.
    finished: bool,
    grant: watch::Receiver<Grant>,
    handoff: Arc<Handoff>,
}

impl LeaseWatch {
    /// The token, while the lease is held and valid.
    pub fn token(&self) -> Option<i64> {
        match &*self.grant.borrow() {
            Grant::Held { token, .. } if self.leases.is_valid() => Some(*token),
            _ => None,
        }
    }

    /// The grant as it is now.
    pub fn grant(&self) -> Grant {
        self.grant.borrow().clone()
    }

    pub fn handoff(&self) -> &Arc<Handoff> {
        &self.handoff
    }

    /// Waits until the grant changes (held, lost).
    pub async fn changed(&mut self) {
        if self.grant.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Waits until the lease is held and valid.
    pub async fn held(&mut self) -> i64 {
        loop {
            if let Some(token) = self.token() {
                return token;
            }
            // A grant that is held but not yet valid becomes valid with the next renewal.
            let _ = tokio::time::timeout(Duration::from_millis(100), self.changed()).await;
        }
    }

    pub fn leases(&self) -> &Arc<Leases> {
        &self.leases
    }
}

impl Drop for LeaseWatch {
    fn drop(&mut self) {
        let mut entries = self.leases.lock();
        let by_name = &mut entries[self.kind as usize];
        if let Some(entry) = by_name.get_mut(&self.name) {
            entry.n_registered -= 1;
            entry.n_finished -= usize::from(self.finished);
            if entry.n_registered == 0 {
                by_name.remove(&self.name);
            }
        }
    }
}
