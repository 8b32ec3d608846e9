//! Several replicas on one PostgreSQL store: which replica reads each stream instance and
//! serves each target.
//!
//! Every replica runs the same config. Each registers in `sse_relay.replicas` with a heartbeat
//! and, every quarter of `lease_ttl`, does one round:
//!
//! 1. **Renew.** It pushes out the expiry of every lease it holds, in one statement. A lease
//!    missing from the answer was taken by another replica: it is lost at once. While no
//!    renewal succeeds, the leases stay valid by this process's clock for three quarters of
//!    `lease_ttl` after the last renewal started, then the replica steps down (it stops its
//!    streams and dispatchers) before any other replica can take them.
//! 2. **Spread.** For each stream instance and target its config wants, the owner is chosen by
//!    rendezvous hashing over the live replicas (highest `sha256(replica, kind, name)`), so a
//!    replica joining or leaving moves only its share.
//! 3. **Acquire** what falls to it and is free or expired (the fencing token grows when a lease
//!    changes hands), and **release** what it holds but no longer should: first locally (the
//!    task stops), then, once the store wrote what the task handed it, in the database.
//!
//! A replica leaving on purpose marks itself so first: the others take its share on their
//! next round, and it releases each lease as its task stops.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::queue::lease::{Grant, Kind, Leases};
use crate::queue::postgres::PostgresStore;

/// The replica's membership and leases, kept up by a background task.
pub struct Cluster {
    store: PostgresStore,
    leases: Arc<Leases>,
    leaving: Arc<std::sync::atomic::AtomicBool>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// What one round decided to change.
#[derive(Default)]
struct Changes {
    acquire: Vec<(Kind, Arc<str>)>,
    /// Held in the database, and to be given up once its task stopped.
    release: Vec<(Kind, Arc<str>)>,
}

struct Round {
    store: PostgresStore,
    leases: Arc<Leases>,
    telemetry: Arc<crate::telemetry::Metrics>,
    leaving: Arc<std::sync::atomic::AtomicBool>,
    /// Leases released locally in the last round, given up in the database in this one.
    releasing: Vec<(Kind, Arc<str>)>,
    stepped_down: bool,
}

impl Cluster {
    /// Joins the replicas and starts the rounds; returns after the first round, so that the
    /// replica starts with its share.
    pub async fn join(store: PostgresStore, metrics: Arc<crate::telemetry::Metrics>) -> anyhow::Result<Cluster> {
        let leases = Arc::clone(&store.leases);
        let leaving = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut round = Round {
            store: store.clone(),
            leases: Arc::clone(&leases),
            telemetry: metrics,
            leaving: Arc::clone(&leaving),
            releasing: Vec::new(),
            stepped_down: false,
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
                let mut tick = tokio::time::interval(leases_tick(round.leases.ttl()));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        _ = tick.tick() => round.run().await,
                    }
                }
                round.leave().await;
            }
        });
        Ok(Cluster {
            store,
            leases,
            leaving,
            stop,
            task: Some(task),
        })
    }

    pub fn leases(&self) -> &Arc<Leases> {
        &self.leases
    }

    /// Marks this replica as leaving, so that the others take its share; its leases are
    /// released as their tasks stop (`release_all` at the end).
    pub async fn mark_leaving(&self) {
        self.leaving.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Ok(client) = self.store.pool().get().await {
            let _ = client
                .execute(
                    "UPDATE sse_relay.replicas SET leaving = true WHERE name = $1",
                    &[&&**self.leases.replica()],
                )
                .await;
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

/// How often a replica renews: four times per `lease_ttl`.
fn leases_tick(ttl: Duration) -> Duration {
    ttl / 4
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

impl Round {
    fn call_timeout(&self) -> Duration {
        leases_tick(self.leases.ttl()).max(Duration::from_millis(500))
    }

    async fn heartbeat(&self) -> Result<(), String> {
        let client = self.store.pool().get().await.map_err(|err| err.to_string())?;
        let ttl_ms = self.leases.ttl().as_millis() as f64;
        let leaving = self.leaving.load(std::sync::atomic::Ordering::Relaxed);
        client
            .execute(
                "INSERT INTO sse_relay.replicas (name, expires_at, leaving)
                 VALUES ($1, now() + $2 * interval '1 millisecond', $3)
                 ON CONFLICT (name) DO UPDATE SET expires_at = EXCLUDED.expires_at,
                     leaving = sse_relay.replicas.leaving OR EXCLUDED.leaving",
                &[&&**self.leases.replica(), &ttl_ms, &leaving],
            )
            .await
            .map_err(|err| err.to_string())?;
        Ok(())
    }

    /// One round: heartbeat and renew, then spread, acquire and release.
    async fn run(&mut self) {
        let started = Instant::now();
        let renewed = tokio::time::timeout(self.call_timeout(), self.renew()).await;
        let held = match renewed {
            Ok(Ok(held)) => {
                self.leases.renewed(started);
                if self.stepped_down {
                    self.stepped_down = false;
                    info!("PostgreSQL answers again: this replica takes its share of the leases again");
                }
                held
            }
            Ok(Err(err)) => return self.renewal_failed(&err),
            Err(_) => return self.renewal_failed(&"PostgreSQL did not answer in time"),
        };
        let changes = self.plan(&held).await;
        let changes = match changes {
            Ok(changes) => changes,
            Err(err) => return warn!(error = %err, "cannot read the live replicas; leases stay as they are"),
        };
        self.apply(changes, &held).await;
        self.count();
    }

    fn renewal_failed(&mut self, err: &dyn std::fmt::Display) {
        self.telemetry.storage.write_failed(&format_args!("lease renewal: {err}"));
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

    /// Heartbeat, then renews every lease this replica holds; returns them with their tokens.
    async fn renew(&self) -> Result<HashMap<(Kind, Arc<str>), i64>, String> {
        self.heartbeat().await?;
        let client = self.store.pool().get().await.map_err(|err| err.to_string())?;
        let ttl_ms = self.leases.ttl().as_millis() as f64;
        let rows = client
            .query(
                "UPDATE sse_relay.leases SET expires_at = now() + $2 * interval '1 millisecond'
                 WHERE owner = $1 RETURNING kind, name, token",
                &[&&**self.leases.replica(), &ttl_ms],
            )
            .await
            .map_err(|err| err.to_string())?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let kind = Kind::of_label(row.get(0))?;
                let name: &str = row.get(1);
                Some(((kind, Arc::from(name)), row.get(2)))
            })
            .collect())
    }

    /// Decides what to acquire and release, from the live replicas and what is registered.
    async fn plan(&mut self, held: &HashMap<(Kind, Arc<str>), i64>) -> Result<Changes, String> {
        let client = self.store.pool().get().await.map_err(|err| err.to_string())?;
        let mut replicas: Vec<String> = client
            .query(
                "SELECT name FROM sse_relay.replicas WHERE expires_at > now() AND NOT leaving ORDER BY name",
                &[],
            )
            .await
            .map_err(|err| err.to_string())?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let me = self.leases.replica();
        let leaving = self.leaving.load(std::sync::atomic::Ordering::Relaxed);
        replicas.retain(|replica| replica != &**me);
        if !leaving {
            replicas.push(me.to_string());
        }
        let mut changes = Changes::default();
        let mut registered = HashSet::new();
        for (kind, name, local) in self.leases.registered() {
            let mine = owner(&replicas, kind, &name) == Some(&**me);
            let key = (kind, Arc::clone(&name));
            match (held.get(&key), mine) {
                (Some(&token), true) => {
                    if local != Some(token) {
                        self.grant(kind, &name, token).await;
                    }
                }
                (Some(_), false) => {
                    // It belongs to another replica now: the task stops first.
                    if self.leases.set(kind, &name, Grant::NotHeld) {
                        self.telemetry.leases.changed(kind.label(), &name, "released");
                    }
                    changes.release.push(key.clone());
                }
                (None, true) => changes.acquire.push(key.clone()),
                (None, false) => {
                    if self.leases.set(kind, &name, Grant::NotHeld) {
                        self.telemetry.leases.changed(kind.label(), &name, "lost");
                    }
                }
            }
            registered.insert(key);
        }
        // Held in the database, but nothing here wants it any more (a reload removed it).
        for key in held.keys().filter(|key| !registered.contains(*key)) {
            changes.release.push(key.clone());
        }
        Ok(changes)
    }

    /// A lease is held: a stream's Last-Event-ID is read first (another replica may have moved
    /// it), then its task hears it may run.
    async fn grant(&self, kind: Kind, name: &Arc<str>, token: i64) {
        if kind == Kind::Stream
            && let Err(err) = self.store.refresh_last_event_id(name).await
        {
            warn!(stream = %name, error = %err, "cannot read the stream's Last-Event-ID; it starts without");
        }
        if self.leases.set(kind, name, Grant::Held { token }) {
            self.telemetry.leases.changed(kind.label(), name, "acquired");
        }
    }

    async fn apply(&mut self, changes: Changes, held: &HashMap<(Kind, Arc<str>), i64>) {
        // What was released locally in the last round: its task has stopped since, and the
        // store wrote what it handed over; only then may another replica take it.
        let releasing: Vec<(Kind, Arc<str>)> = std::mem::take(&mut self.releasing)
            .into_iter()
            .filter(|key| held.contains_key(key) && changes.release.contains(key))
            .collect();
        if !releasing.is_empty() {
            self.store.flush().await;
            if let Err(err) = self.delete(&releasing).await {
                warn!(error = %err, "cannot release leases; they expire on their own");
            }
        }
        self.releasing = changes
            .release
            .into_iter()
            .filter(|key| !releasing.contains(key))
            .collect();
        if changes.acquire.is_empty() {
            return;
        }
        match self.acquire(&changes.acquire).await {
            Ok(acquired) => {
                for (kind, name, token) in acquired {
                    self.grant(kind, &name, token).await;
                }
            }
            Err(err) => warn!(error = %err, "cannot acquire leases; trying again in the next round"),
        }
    }

    /// Takes the leases that are free or expired; keeps the token when this replica takes back
    /// its own (what it queued under it may still be written).
    async fn acquire(&self, wanted: &[(Kind, Arc<str>)]) -> Result<Vec<(Kind, Arc<str>, i64)>, String> {
        let client = self.store.pool().get().await.map_err(|err| err.to_string())?;
        let kinds: Vec<&str> = wanted.iter().map(|(kind, _)| kind.label()).collect();
        let names: Vec<&str> = wanted.iter().map(|(_, name)| &**name).collect();
        let ttl_ms = self.leases.ttl().as_millis() as f64;
        let rows = client
            .query(
                "INSERT INTO sse_relay.leases (kind, name, owner, token, expires_at)
                 SELECT kind, name, $1, 1, now() + $4 * interval '1 millisecond'
                 FROM UNNEST($2::text[], $3::text[]) AS wanted(kind, name)
                 ON CONFLICT (kind, name) DO UPDATE SET
                     owner = EXCLUDED.owner,
                     token = CASE WHEN sse_relay.leases.owner = EXCLUDED.owner
                                  THEN sse_relay.leases.token ELSE sse_relay.leases.token + 1 END,
                     expires_at = EXCLUDED.expires_at
                 WHERE sse_relay.leases.expires_at < now() OR sse_relay.leases.owner = EXCLUDED.owner
                 RETURNING kind, name, token",
                &[&&**self.leases.replica(), &kinds, &names, &ttl_ms],
            )
            .await
            .map_err(|err| err.to_string())?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let kind = Kind::of_label(row.get(0))?;
                let name: &str = row.get(1);
                Some((kind, Arc::from(name), row.get(2)))
            })
            .collect())
    }

    async fn delete(&self, leases: &[(Kind, Arc<str>)]) -> Result<(), String> {
        let client = self.store.pool().get().await.map_err(|err| err.to_string())?;
        let kinds: Vec<&str> = leases.iter().map(|(kind, _)| kind.label()).collect();
        let names: Vec<&str> = leases.iter().map(|(_, name)| &**name).collect();
        client
            .execute(
                "DELETE FROM sse_relay.leases
                 WHERE owner = $1 AND (kind, name) IN (SELECT * FROM UNNEST($2::text[], $3::text[]))",
                &[&&**self.leases.replica(), &kinds, &names],
            )
            .await
            .map_err(|err| err.to_string())?;
        Ok(())
    }

    fn count(&self) {
        for kind in [Kind::Stream, Kind::Target] {
            self.telemetry
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
        let replica = &**self.leases.replica();
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
