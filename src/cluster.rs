//! Several replicas on one PostgreSQL store: which replica reads each stream instance and
//! serves each target.
//!
//! Every replica runs the same config. Each registers in `sse_relay.replicas` with a heartbeat
//! and, four times per `lease_ttl` (more often while a hand-over is under way), does a round:
//!
//! 1. **Renew.** It pushes out the expiry of every lease it holds, in one statement. A lease
//!    missing from the answer was taken by another replica: it is lost at once. While no
//!    renewal succeeds, the leases stay valid by this process's clock for three quarters of
//!    `lease_ttl` after the last renewal started; then the replica steps down (it stops its
//!    streams and dispatchers) before any other replica can take them.
//! 2. **Spread.** For each stream instance and target its config wants, the owner is chosen by
//!    rendezvous hashing over the live replicas (highest `sha256(replica, kind, name)`), so a
//!    replica joining or leaving moves only its share.
//! 3. **Acquire** what falls to it and is free or expired (the fencing token grows when a lease
//!    changes hands), and give up what it holds but no longer should.
//!
//! **Giving a target up** takes two rounds: its dispatcher stops in the first, and the lease
//! is deleted in the next, once the store wrote what the dispatcher recorded.
//!
//! **Handing a stream over** is make-before-break, so that an upstream without history loses
//! nothing: the owner names the new owner in the lease (`handover_to`); the new owner reads
//! the stream on standby, holding what arrives, and says so once its connection is open
//! (`handover_ready`); the owner then stops its stream, waits for the store to write what it
//! took, and passes the lease on in one statement, with a new token and the keys of the last
//! events it accepted (`handed_over`). The new owner takes what it held after the last of
//! them (`source::Handover`). If the owner dies meanwhile, the lease expires and the new
//! owner takes it as after any crash, with what it held on standby.
//!
//! A replica that stops marks itself as leaving, hands its streams over this way, and at the
//! end deletes its leases and its row.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::queue::lease::{Grant, Kind, Leases};
use crate::queue::postgres::PostgresStore;
use crate::telemetry::Metrics;

/// The replica's membership and leases, kept up by a background task.
pub struct Cluster {
    store: PostgresStore,
    leases: Arc<Leases>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// What the rounds and the relay's shutdown share.
#[derive(Default)]
struct Shared {
    leaving: AtomicBool,
    /// Another replica was live at the last round: there is someone to hand streams to.
    others_live: AtomicBool,
    /// Stopping, and out of time: streams are passed on whether or not the new owner's
    /// standby connection is open (it resumes from the Last-Event-ID, with the keys).
    pass_on_now: AtomicBool,
}

/// A lease this replica holds in the database, as the renewal returned it.
struct Held {
    token: i64,
    handover_to: Option<String>,
    handover_ready: bool,
}

type Key = (Kind, Arc<str>);

/// What one round decided to change.
#[derive(Default)]
struct Changes {
    acquire: Vec<Key>,
    /// Targets held in the database whose dispatcher stopped (or stops now); the lease is
    /// deleted once it stopped.
    release: Vec<Key>,
    /// Streams to hand over, and to whom.
    ask: Vec<(Arc<str>, String)>,
    /// Streams whose new owner is ready: passed on now.
    pass_on: Vec<Arc<str>>,
    /// Streams another replica hands to this one whose standby connection is open.
    ready: Vec<Arc<str>>,
}

struct Round {
    store: PostgresStore,
    leases: Arc<Leases>,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    /// Targets whose dispatcher was stopped in the last round, deleted in this one.
    releasing: Vec<Key>,
    stepped_down: bool,
    /// The store wrote everything queued before this round's first stream grant.
    flushed: AtomicBool,
}

impl Cluster {
    /// Joins the replicas and starts the rounds.
    pub async fn join(store: PostgresStore, metrics: Arc<Metrics>) -> anyhow::Result<Cluster> {
        let leases = Arc::clone(&store.leases);
        let shared = Arc::new(Shared::default());
        let mut round = Round {
            store: store.clone(),
            leases: Arc::clone(&leases),
            metrics,
            shared: Arc::clone(&shared),
            releasing: Vec::new(),
            stepped_down: false,
            flushed: AtomicBool::new(false),
        };
        round
            .heartbeat()
            .await
            .map_err(|err| anyhow::anyhow!("cannot register this replica in PostgreSQL: {err}"))?;
        info!(replica = %leases.replica(), lease_ttl = ?leases.ttl(), "joined the replicas");
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let tick = round.leases.ttl() / 4;
                loop {
                    let busy = round.run().await;
                    let pause = if busy {
                        tick.min(Duration::from_millis(100))
                    } else {
                        tick
                    };
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
                round.leave().await;
            }
        });
        Ok(Cluster {
            store,
            leases,
            shared,
            stop,
            task: Some(task),
        })
    }

    pub fn leases(&self) -> &Arc<Leases> {
        &self.leases
    }

    /// Marks this replica as leaving and hands its streams to the others, make-before-break;
    /// returns once it holds none, when no other replica is live, or after `deadline`.
    pub async fn hand_over(&self, deadline: Duration) {
        self.shared.leaving.store(true, Ordering::SeqCst);
        if let Ok(client) = self.store.pool().get().await {
            let _ = client
                .execute(
                    "UPDATE sse_relay.replicas SET leaving = true WHERE name = $1",
                    &[&&**self.leases.replica()],
                )
                .await;
        }
        let started = Instant::now();
        let handing_over = || self.leases.n_held(Kind::Stream) > 0 && self.shared.others_live.load(Ordering::SeqCst);
        while handing_over() && started.elapsed() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.shared.pass_on_now.store(true, Ordering::SeqCst);
        while handing_over() && started.elapsed() < deadline + self.leases.ttl() / 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let n_kept = self.leases.n_held(Kind::Stream);
        if n_kept > 0 {
            info!(
                n_kept,
                "streams not handed over at shutdown; another replica takes them once their lease expires"
            );
        }
    }

    /// Stops the rounds, releases every lease and leaves the replicas.
    pub async fn leave(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// The rendezvous score of a replica for a lease: the replica with the highest owns it.
fn score(replica: &str, kind: Kind, name: &str) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(replica.as_bytes());
    hasher.update([0]);
    hasher.update(kind.label().as_bytes());
    hasher.update([0]);
    hasher.update(name.as_bytes());
    let digest = hasher.finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("a sha256 digest has 32 bytes"))
}

/// The live replica that should hold a lease.
pub fn owner<'a>(replicas: &'a [String], kind: Kind, name: &str) -> Option<&'a str> {
    replicas
        .iter()
        .max_by_key(|replica| score(replica, kind, name))
        .map(String::as_str)
}

/// The kind and name of a lease row, from its first two columns.
fn lease_key(row: &tokio_postgres::Row) -> Option<Key> {
    let kind = Kind::of_label(row.get(0))?;
    let name: &str = row.get(1);
    Some((kind, Arc::from(name)))
}

/// A database or pool error with its causes, as the store says them.
fn text(err: impl std::error::Error + 'static) -> String {
    crate::queue::postgres::problem(&err)
}

impl Round {
    fn call_timeout(&self) -> Duration {
        (self.leases.ttl() / 4).max(Duration::from_millis(500))
    }

    fn replica(&self) -> &str {
        self.leases.replica()
    }

    fn ttl_ms(&self) -> f64 {
        self.leases.ttl().as_millis() as f64
    }

    async fn heartbeat(&self) -> Result<(), String> {
        let client = self.store.pool().get().await.map_err(text)?;
        let leaving = self.shared.leaving.load(Ordering::SeqCst);
        client
            .execute(
                "INSERT INTO sse_relay.replicas (name, expires_at, leaving)
                 VALUES ($1, now() + $2 * interval '1 millisecond', $3)
                 ON CONFLICT (name) DO UPDATE SET expires_at = EXCLUDED.expires_at,
                     leaving = sse_relay.replicas.leaving OR EXCLUDED.leaving",
                &[&self.replica(), &self.ttl_ms(), &leaving],
            )
            .await
            .map_err(text)?;
        Ok(())
    }

    /// One round: renew, spread, acquire and give up. Returns whether a hand-over is under
    /// way (the next round comes sooner).
    async fn run(&mut self) -> bool {
        self.flushed.store(false, Ordering::SeqCst);
        let started = Instant::now();
        let held = match tokio::time::timeout(self.call_timeout(), self.renew()).await {
            Ok(Ok(held)) => held,
            Ok(Err(err)) => {
                self.renewal_failed(&err);
                return false;
            }
            Err(_) => {
                self.renewal_failed(&"PostgreSQL did not answer in time");
                return false;
            }
        };
        self.leases.renewed(started);
        if self.stepped_down {
            self.stepped_down = false;
            info!("PostgreSQL answers again: this replica takes its share of the leases again");
        }
        let planned = tokio::time::timeout(self.call_timeout(), self.plan(&held)).await;
        let changes = match planned {
            Ok(Ok(changes)) => changes,
            Ok(Err(err)) => {
                warn!(error = %err, "cannot read the live replicas; leases stay as they are");
                return false;
            }
            Err(_) => return false,
        };
        let busy = !(changes.ask.is_empty() && changes.pass_on.is_empty() && changes.ready.is_empty());
        // Bounded, so that a connection that hangs cannot stop the rounds (and the renewals);
        // what a cut-short apply did not do, the next round plans again.
        let ttl = self.leases.ttl();
        match tokio::time::timeout(ttl, self.apply(changes, &held)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(error = %err, "cannot change leases; trying again in the next round"),
            Err(_) => warn!("changing leases took longer than lease_ttl; trying again in the next round"),
        }
        self.count();
        busy || self
            .leases
            .registered()
            .iter()
            .any(|(kind, name, _)| *kind == Kind::Stream && self.leases.grant(*kind, name) == Some(Grant::Standby))
    }

    fn renewal_failed(&mut self, err: &dyn std::fmt::Display) {
        self.metrics.storage.write_failed(&format_args!("lease renewal: {err}"));
        if !self.leases.is_valid() && !self.stepped_down {
            self.stepped_down = true;
            let n_lost = self.leases.lose_all();
            error!(
                error = %err, n_lost,
                "cannot renew this replica's leases in time: it stops reading its streams and serving its targets until PostgreSQL answers, so that another replica can take them safely"
            );
            self.count();
        }
    }

    /// Heartbeat, then renews every lease this replica holds; returns them.
    async fn renew(&self) -> Result<HashMap<Key, Held>, String> {
        self.heartbeat().await?;
        let client = self.store.pool().get().await.map_err(text)?;
        let rows = client
            .query(
                "UPDATE sse_relay.leases SET expires_at = now() + $2 * interval '1 millisecond'
                 WHERE owner = $1 RETURNING kind, name, token, handover_to, handover_ready",
                &[&self.replica(), &self.ttl_ms()],
            )
            .await
            .map_err(text)?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let key = lease_key(row)?;
                let held = Held {
                    token: row.get(2),
                    handover_to: row.get(3),
                    handover_ready: row.get(4),
                };
                Some((key, held))
            })
            .collect())
    }

    /// Decides what to acquire, give up and hand over, from the live replicas and what is
    /// registered here.
    async fn plan(&mut self, held: &HashMap<Key, Held>) -> Result<Changes, String> {
        let client = self.store.pool().get().await.map_err(text)?;
        let mut replicas: Vec<String> = client
            .query(
                "SELECT name FROM sse_relay.replicas WHERE expires_at > now() AND NOT leaving ORDER BY name",
                &[],
            )
            .await
            .map_err(text)?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let asked: HashSet<String> = client
            .query(
                "SELECT name FROM sse_relay.leases
                 WHERE kind = 'stream' AND handover_to = $1 AND owner <> $1 AND expires_at > now()",
                &[&self.replica()],
            )
            .await
            .map_err(text)?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let me = Arc::clone(self.leases.replica());
        replicas.retain(|replica| replica != &*me);
        self.shared.others_live.store(!replicas.is_empty(), Ordering::SeqCst);
        if !self.shared.leaving.load(Ordering::SeqCst) {
            replicas.push(me.to_string());
        }
        let mut changes = Changes::default();
        let mut registered = HashSet::new();
        for (kind, name, finished) in self.leases.registered() {
            let owner = owner(&replicas, kind, &name);
            let key = (kind, Arc::clone(&name));
            // `finished`: an instance that ended on its own here. Its lease stays here while
            // this replica runs (no other replica reads it again), and is never taken.
            match held.get(&key) {
                Some(lease) if finished || owner == Some(&*me) || owner.is_none() => {
                    let grant = Grant::Held {
                        token: lease.token,
                        handed_over: None,
                    };
                    self.grant(kind, &name, grant).await;
                }
                Some(_) if kind == Kind::Target => {
                    // Another replica serves it from now on: the dispatcher stops first.
                    self.lose(kind, &name, "released");
                    changes.release.push(key.clone());
                }
                Some(lease) => {
                    let owner = owner.expect("matched above").to_owned();
                    if lease.handover_to.as_deref() != Some(&owner) {
                        changes.ask.push((Arc::clone(&name), owner));
                    } else if lease.handover_ready || self.shared.pass_on_now.load(Ordering::SeqCst) {
                        changes.pass_on.push(Arc::clone(&name));
                    }
                }
                None if finished => {}
                None if kind == Kind::Stream && asked.contains(&*name) => {
                    let handoff = self.leases.handoff(kind, &name);
                    if self.leases.grant(kind, &name) == Some(Grant::Standby) {
                        if handoff.is_some_and(|handoff| handoff.ready.load(Ordering::SeqCst)) {
                            changes.ready.push(Arc::clone(&name));
                        }
                    } else {
                        self.grant(kind, &name, Grant::Standby).await;
                    }
                }
                None if owner == Some(&*me) => changes.acquire.push(key.clone()),
                None => self.lose(kind, &name, "lost"),
            }
            registered.insert(key);
        }
        // Held in the database, but nothing here wants it any more (a reload removed it).
        for key in held.keys().filter(|key| !registered.contains(*key)) {
            changes.release.push(key.clone());
        }
        Ok(changes)
    }

    /// The lease is not (or no longer) this replica's to use.
    fn lose(&self, kind: Kind, name: &str, change: &str) {
        let was = self.leases.grant(kind, name);
        if self.leases.set(kind, name, Grant::NotHeld) && matches!(was, Some(Grant::Held { .. })) {
            self.metrics.leases.changed(kind.label(), name, change);
        }
    }

    /// A stream's position is read first (another replica may have moved it), then its task
    /// hears it may run (or read on standby), with the keys of the last events stored.
    async fn grant(&self, kind: Kind, name: &Arc<str>, mut grant: Grant) {
        let current = self.leases.grant(kind, name);
        let same = match (&current, &grant) {
            (Some(Grant::Held { token: was, .. }), Grant::Held { token, .. }) => was == token,
            (current, grant) => current.as_ref() == Some(grant),
        };
        if same {
            return;
        }
        if kind == Kind::Stream {
            // What this replica read of the stream before (it stepped down, say) is written
            // first, with its position, so that the stream resumes after it, not before.
            if !self.flushed.swap(true, Ordering::SeqCst) {
                self.store.flush().await;
            }
            match self.store.refresh_position(name).await {
                Ok(keys) => {
                    if let Grant::Held { handed_over, .. } = &mut grant {
                        *handed_over = Some(keys);
                    }
                }
                Err(err) => {
                    warn!(stream = %name, error = %err, "cannot read the stream's Last-Event-ID; it starts without")
                }
            }
        }
        let acquired = matches!(grant, Grant::Held { .. });
        if self.leases.set(kind, name, grant) && acquired {
            self.metrics.leases.changed(kind.label(), name, "acquired");
        }
    }

    async fn apply(&mut self, changes: Changes, held: &HashMap<Key, Held>) -> Result<(), String> {
        // Targets whose dispatcher stopped in the last round: the store has written what it
        // recorded; only then may another replica take them.
        let releasing: Vec<Key> = std::mem::take(&mut self.releasing)
            .into_iter()
            .filter(|key| held.contains_key(key) && changes.release.contains(key))
            .collect();
        if !releasing.is_empty() {
            self.store.flush().await;
            self.delete(&releasing).await?;
        }
        self.releasing = changes
            .release
            .into_iter()
            .filter(|key| !releasing.contains(key))
            .collect();
        if !changes.ask.is_empty() {
            self.ask(&changes.ask).await?;
        }
        if !changes.ready.is_empty() {
            self.ready(&changes.ready).await?;
        }
        if !changes.pass_on.is_empty() {
            self.pass_on(&changes.pass_on).await?;
        }
        if !changes.acquire.is_empty() {
            for (kind, name, token) in self.acquire(&changes.acquire).await? {
                let grant = Grant::Held {
                    token,
                    handed_over: None,
                };
                self.grant(kind, &name, grant).await;
            }
        }
        Ok(())
    }

    /// Names the replica each stream goes to; it reads on standby and says when it is ready.
    async fn ask(&self, streams: &[(Arc<str>, String)]) -> Result<(), String> {
        let client = self.store.pool().get().await.map_err(text)?;
        let names: Vec<&str> = streams.iter().map(|(name, _)| &**name).collect();
        let owners: Vec<&str> = streams.iter().map(|(_, owner)| owner.as_str()).collect();
        client
            .execute(
                "UPDATE sse_relay.leases SET handover_to = asked.owner, handover_ready = false
                 FROM UNNEST($2::text[], $3::text[]) AS asked(name, owner)
                 WHERE kind = 'stream' AND leases.name = asked.name AND leases.owner = $1",
                &[&self.replica(), &names, &owners],
            )
            .await
            .map_err(text)?;
        Ok(())
    }

    async fn ready(&self, streams: &[Arc<str>]) -> Result<(), String> {
        let client = self.store.pool().get().await.map_err(text)?;
        let names: Vec<&str> = streams.iter().map(|name| &**name).collect();
        client
            .execute(
                "UPDATE sse_relay.leases SET handover_ready = true
                 WHERE kind = 'stream' AND name = ANY($2) AND handover_to = $1",
                &[&self.replica(), &names],
            )
            .await
            .map_err(text)?;
        Ok(())
    }

    /// Stops the streams, waits for the store to write what they took (with the keys of the
    /// last events), and passes each lease to the replica that reads it on standby.
    async fn pass_on(&self, streams: &[Arc<str>]) -> Result<(), String> {
        for name in streams {
            self.lose(Kind::Stream, name, "handed_over");
        }
        let handoffs: Vec<_> = streams
            .iter()
            .filter_map(|name| self.leases.handoff(Kind::Stream, name))
            .collect();
        let started = Instant::now();
        while handoffs.iter().any(|handoff| handoff.running.load(Ordering::SeqCst))
            && started.elapsed() < self.leases.ttl() / 2
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.store.flush().await;
        let names: Vec<&str> = streams.iter().map(|name| &**name).collect();
        let client = self.store.pool().get().await.map_err(text)?;
        let n_passed = client
            .execute(
                "UPDATE sse_relay.leases SET owner = handover_to, token = token + 1,
                     expires_at = now() + $3 * interval '1 millisecond',
                     handover_to = NULL, handover_ready = false
                 WHERE kind = 'stream' AND name = ANY($2) AND owner = $1
                   AND handover_to IS NOT NULL AND (handover_ready OR $4)",
                &[
                    &self.replica(),
                    &names,
                    &self.ttl_ms(),
                    &self.shared.pass_on_now.load(Ordering::SeqCst),
                ],
            )
            .await
            .map_err(text)?;
        info!(n_streams = n_passed, "streams handed over to other replicas");
        Ok(())
    }

    /// Takes the leases that are free or expired; keeps the token when this replica takes back
    /// its own (what it queued under it may still be written).
    async fn acquire(&self, wanted: &[Key]) -> Result<Vec<(Kind, Arc<str>, i64)>, String> {
        let client = self.store.pool().get().await.map_err(text)?;
        let kinds: Vec<&str> = wanted.iter().map(|(kind, _)| kind.label()).collect();
        let names: Vec<&str> = wanted.iter().map(|(_, name)| &**name).collect();
        let rows = client
            .query(
                "INSERT INTO sse_relay.leases (kind, name, owner, token, expires_at)
                 SELECT kind, name, $1, 1, now() + $4 * interval '1 millisecond'
                 FROM UNNEST($2::text[], $3::text[]) AS wanted(kind, name)
                 ON CONFLICT (kind, name) DO UPDATE SET
                     owner = EXCLUDED.owner,
                     token = CASE WHEN sse_relay.leases.owner = EXCLUDED.owner
                                  THEN sse_relay.leases.token ELSE sse_relay.leases.token + 1 END,
                     expires_at = EXCLUDED.expires_at,
                     handover_to = NULL, handover_ready = false
                 WHERE sse_relay.leases.expires_at < now() OR sse_relay.leases.owner = EXCLUDED.owner
                 RETURNING kind, name, token",
                &[&self.replica(), &kinds, &names, &self.ttl_ms()],
            )
            .await
            .map_err(text)?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let (kind, name) = lease_key(row)?;
                Some((kind, name, row.get(2)))
            })
            .collect())
    }

    async fn delete(&self, leases: &[Key]) -> Result<(), String> {
        let client = self.store.pool().get().await.map_err(text)?;
        let kinds: Vec<&str> = leases.iter().map(|(kind, _)| kind.label()).collect();
        let names: Vec<&str> = leases.iter().map(|(_, name)| &**name).collect();
        client
            .execute(
                "DELETE FROM sse_relay.leases
                 WHERE owner = $1 AND (kind, name) IN (SELECT * FROM UNNEST($2::text[], $3::text[]))",
                &[&self.replica(), &kinds, &names],
            )
            .await
            .map_err(text)?;
        Ok(())
    }

    fn count(&self) {
        for kind in [Kind::Stream, Kind::Target] {
            self.metrics
                .leases
                .held
                .with_label_values(&[kind.label()])
                .set(self.leases.n_held(kind) as i64);
        }
    }

    /// At shutdown, after the streams and dispatchers stopped: every lease and the replica's
    /// row go, so that the others need not wait for them to expire.
    async fn leave(&mut self) {
        self.leases.lose_all();
        self.store.flush().await;
        let Ok(client) = self.store.pool().get().await else {
            return warn!("cannot release this replica's leases at shutdown; they expire after lease_ttl");
        };
        let replica = self.replica();
        let released = client
            .execute("DELETE FROM sse_relay.leases WHERE owner = $1", &[&replica])
            .await;
        let left = client
            .execute("DELETE FROM sse_relay.replicas WHERE name = $1", &[&replica])
            .await;
        if let Err(err) = released.and(left) {
            warn!(error = %err, "cannot release this replica's leases at shutdown; they expire after lease_ttl");
        }
        self.count();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        (0..3000).map(|n| format!("chat/{n}")).collect()
    }

    #[test]
    fn rendezvous_hashing_spreads_evenly_and_a_leaving_replica_moves_only_its_share() {
        let three: Vec<String> = ["r1", "r2", "r3"].map(str::to_owned).to_vec();
        let two: Vec<String> = ["r1", "r3"].map(str::to_owned).to_vec();
        let mut shares: HashMap<&str, usize> = HashMap::new();
        for name in names() {
            let before = owner(&three, Kind::Stream, &name).unwrap();
            *shares.entry(before).or_default() += 1;
            let after = owner(&two, Kind::Stream, &name).unwrap();
            if before != "r2" {
                assert_eq!(before, after, "{name} moved, though its replica stayed");
            }
        }
        for (replica, share) in shares {
            assert!((900..1100).contains(&share), "{replica} owns {share} of 3000");
        }
        assert_eq!(owner(&[], Kind::Target, "hook"), None);
    }
}
