//! A target's outbox: the one owner of where the target's deliveries are. The store writes
//! into it (`OutboxInput`); the target's dispatcher takes deliveries from it and records what
//! became of them there (`Outbox`).
//!
//! A delivery of the target is in one of three places: in the hand-off channel, held by the
//! dispatcher (ready, waiting to retry or in flight), or only in the store's backlog (on disk).
//! The outbox alone moves deliveries between them and keeps the count: `held`, the queue-depth
//! gauge, the `max_pending` limit, and which ids may be on disk only.
//!
//! **Spill and load.** The dispatcher may hold `capacity` deliveries. A store with a backlog
//! (SQLite) offers each committed delivery without waiting; one that finds the channel full, or
//! arrives while the outbox holds `capacity`, stays on disk only, and the outbox notes the first
//! id it missed (`on_disk_after`). While the dispatcher has few ready, `refill` loads from disk
//! in id order, after taking what is already in the channel (it was offered before anything on
//! disk beyond it). A load can run ahead of the channel: the writer offers in id order, so a
//! channel copy of an id at or below the highest seen (`high_water`) was loaded already and is
//! skipped. Nothing is held twice, and each stream's order is kept. `refill` is awaited outside
//! any `select!`, so that no result is recorded while a load is under way: the store answers a
//! load after writing every result sent before it, and a load never brings back a delivery
//! that ended.
//!
//! **Without a backlog** (the memory store) there is nowhere to spill: beyond `capacity` the
//! outbox drops the delivery for this target only, counted and logged, so a dead target holds
//! up neither the stream nor the other targets.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::SystemTime;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tracing::info;

use crate::queue::{Delivery, DeliveryId, Outcome, PendingLimit, StoreError};
use crate::telemetry::TargetTelemetry;

/// Appended deliveries on their way from the streams to a target's dispatcher.
const CHANNEL_CAPACITY: usize = 1024;

/// Deliveries held in memory per target when the store keeps the rest in its backlog.
pub const BACKLOG_CAPACITY: usize = 1024;

/// Rows loaded from the backlog at a time.
const LOAD_BATCH: usize = 256;

/// Each target's outbox input, by target name.
pub type Outboxes = HashMap<Arc<str>, OutboxInput>;

/// What a store keeps beyond what its outboxes hold in memory: the SQLite database (or, later,
/// a database that several relays share). Loads are rare (a batch at a time), so their futures
/// are boxed; so is `record`, which is one small allocation per result.
pub trait Backlog: Send + Sync {
    /// Deliveries of `target` with ids above `after`, oldest first, without any whose end is
    /// recorded (or waiting to be).
    fn load(&self, target: &Arc<str>, after: DeliveryId, limit: usize) -> LoadFuture;

    /// When the oldest delivery of `target` with an id above `after` arrived.
    fn oldest(
        &self,
        target: &Arc<str>,
        after: DeliveryId,
    ) -> BoxFuture<'static, Result<Option<SystemTime>, StoreError>>;

    /// Records what became of a delivery. A load sent after this returns is answered with it
    /// applied.
    fn record(&self, target: &Arc<str>, id: DeliveryId, outcome: Outcome) -> BoxFuture<'_, ()>;

    /// Counts changes made by another process (`sse-relay dlq replay`): when it moves, the
    /// outbox looks through the whole backlog for rows it has not seen.
    fn external_changes(&self) -> u64;

    /// Whether other processes append to it too (replicas on PostgreSQL). Then the outbox
    /// takes every delivery from loads, in id order, which is commit order; what the store
    /// hands it only says that there is something to load (see `OutboxInput::poke`).
    fn is_shared(&self) -> bool {
        false
    }

    /// How many deliveries of `target` it holds, when it counts them itself (a shared
    /// backlog: the gauge is set from it).
    fn count(&self, _target: &Arc<str>) -> BoxFuture<'static, Result<Option<u64>, StoreError>> {
        Box::pin(std::future::ready(Ok(None)))
    }
}

pub type LoadFuture = BoxFuture<'static, Result<Vec<Delivery>, StoreError>>;

/// Where a target's deliveries stay beyond what its dispatcher holds.
pub enum Keeping {
    /// Nowhere: beyond `capacity`, deliveries are dropped for this target.
    Memory { capacity: usize },
    /// In the store's backlog, loaded back as room frees up.
    Backlog(Arc<dyn Backlog>),
}

/// How the store hands a target's outbox its deliveries.
#[derive(Clone)]
pub struct OutboxInput {
    sender: mpsc::Sender<Delivery>,
    /// The smallest id offered but not taken (`i64::MAX` when none): it is on disk, and the
    /// outbox loads it from there.
    overflow: Arc<AtomicI64>,
    /// Counts every stored delivery of the target; the outbox counts them out.
    queue_depth: prometheus::IntGauge,
    /// Wakes the outbox to load from a shared backlog.
    poke: Arc<tokio::sync::Notify>,
}

impl OutboxInput {
    /// For a store with a backlog, whose writer must never wait on a dispatcher (the
    /// dispatcher may be waiting on it): a stored delivery that does not fit is left on disk
    /// and noted.
    pub fn offer(&self, delivery: Delivery) {
        self.queue_depth.inc();
        if let Err(mpsc::error::TrySendError::Full(delivery)) = self.sender.try_send(delivery) {
            // Ordered after the sends before it: an outbox that sees the overflow also sees
            // every delivery offered before it in the channel.
            self.overflow.fetch_min(delivery.id, Ordering::SeqCst);
        }
    }

    /// For the memory store: waits for room, which pauses the stream. Returns whether it
    /// waited, or the delivery back once the outbox is gone.
    pub async fn send(&self, delivery: Delivery) -> Result<bool, Delivery> {
        let sent = match self.sender.try_send(delivery) {
            Ok(()) => Ok(false),
            Err(mpsc::error::TrySendError::Full(delivery)) => self
                .sender
                .send(delivery)
                .await
                .map(|()| true)
                .map_err(|mpsc::error::SendError(delivery)| delivery),
            Err(mpsc::error::TrySendError::Closed(delivery)) => Err(delivery),
        };
        if sent.is_ok() {
            self.queue_depth.inc();
        }
        sent
    }

    /// Tells the outbox that its shared backlog has new deliveries (committed here, or by
    /// another replica): it loads them, in order, with the next refill.
    pub fn poke(&self) {
        self.poke.notify_one();
    }

    /// Whether both are the same outbox's input.
    pub fn same_outbox(&self, other: &OutboxInput) -> bool {
        self.sender.same_channel(&other.sender)
    }
}

/// What the outbox knows of the backlog.
struct Disk {
    backlog: Arc<dyn Backlog>,
    /// While set, deliveries with ids above it may be on disk and not held.
    on_disk_after: Option<DeliveryId>,
    /// The highest id seen, offered or loaded.
    high_water: DeliveryId,
    /// The backlog's count of changes by other processes, when last looked at.
    seen_external_changes: u64,
    /// Other processes append to it too: deliveries come from loads only.
    shared: bool,
}

/// The dispatcher's end: every delivery of the target that the dispatcher holds came from
/// here, and goes back here with its outcome.
pub struct Outbox {
    target: Arc<str>,
    receiver: mpsc::Receiver<Delivery>,
    overflow: Arc<AtomicI64>,
    telemetry: Arc<TargetTelemetry>,
    limit: Arc<PendingLimit>,
    capacity: usize,
    /// Every delivery the dispatcher holds, with when its event arrived.
    held: HashMap<DeliveryId, SystemTime>,
    /// Admitted but not yet handed to the dispatcher, in order.
    staged: VecDeque<Delivery>,
    disk: Option<Disk>,
    input_closed: bool,
    poke: Arc<tokio::sync::Notify>,
}

/// A target's outbox and the input the store hands deliveries to.
pub fn channel(
    target: Arc<str>,
    telemetry: Arc<TargetTelemetry>,
    limit: Arc<PendingLimit>,
    keeping: Keeping,
) -> (OutboxInput, Outbox) {
    let (sender, receiver) = mpsc::channel(CHANNEL_CAPACITY);
    let overflow = Arc::new(AtomicI64::new(i64::MAX));
    let poke = Arc::new(tokio::sync::Notify::new());
    let input = OutboxInput {
        sender,
        overflow: Arc::clone(&overflow),
        queue_depth: telemetry.queue_depth.clone(),
        poke: Arc::clone(&poke),
    };
    let (capacity, disk) = match keeping {
        Keeping::Memory { capacity } => (capacity, None),
        Keeping::Backlog(backlog) => {
            let disk = Disk {
                seen_external_changes: backlog.external_changes(),
                shared: backlog.is_shared(),
                backlog,
                // What the store held when it was opened is loaded first.
                on_disk_after: Some(0),
                high_water: 0,
            };
            (BACKLOG_CAPACITY, Some(disk))
        }
    };
    let outbox = Outbox {
        target,
        receiver,
        overflow,
        telemetry,
        limit,
        capacity,
        held: HashMap::new(),
        staged: VecDeque::new(),
        disk,
        input_closed: false,
        poke,
    };
    (input, outbox)
}

impl Outbox {
    /// The next delivery for the dispatcher: staged first, then the channel. Cancel-safe, for
    /// `select!`. `None` when what came was not for the dispatcher now (it waits on disk, to be
    /// loaded by the next `refill`, or was dropped), or once the input is closed (`is_open`).
    pub async fn next(&mut self) -> Option<Delivery> {
        if let Some(delivery) = self.staged.pop_front() {
            return Some(delivery);
        }
        if self.input_closed {
            return None;
        }
        let received = tokio::select! {
            received = self.receiver.recv() => received,
            () = self.poke.notified() => {
                self.load_new();
                return None;
            }
        };
        match received {
            Some(delivery) => {
                // The store notes an overflow before it sends anything later, so checking
                // after each receive sees every delivery left on disk before this one;
                // otherwise this one could overtake it.
                self.note_overflow();
                self.admit(delivery);
                self.staged.pop_front()
            }
            None => {
                self.input_closed = true;
                None
            }
        }
    }

    /// Whether more can come from `next`: the store still holds the input, or some are staged.
    pub fn is_open(&self) -> bool {
        !self.input_closed || !self.staged.is_empty()
    }

    /// What is ready without waiting: staged deliveries, then the channel's.
    pub fn try_next(&mut self) -> Option<Delivery> {
        loop {
            if let Some(delivery) = self.staged.pop_front() {
                return Some(delivery);
            }
            if self.input_closed {
                return None;
            }
            match self.receiver.try_recv() {
                Ok(delivery) => {
                    self.note_overflow();
                    self.admit(delivery);
                }
                Err(mpsc::error::TryRecvError::Empty) => return None,
                Err(mpsc::error::TryRecvError::Disconnected) => self.input_closed = true,
            }
        }
    }

    /// Loads deliveries waiting in the backlog while the dispatcher has few ready
    /// (`n_ready`). Fresh deliveries are loaded even with retries waiting (a few poison
    /// deliveries must not hold back the rest), but never beyond twice the capacity in all:
    /// when a target fails for long, what does not fit waits on disk. Await it outside any
    /// `select!` (see the module comment).
    pub async fn refill(&mut self, n_ready: usize) {
        self.note_overflow();
        let wanted = self.disk.as_ref().is_some_and(|disk| disk.on_disk_after.is_some())
            && n_ready < self.capacity / 2
            && self.held.len() < 2 * self.capacity
            && !self.input_closed;
        if !wanted {
            return;
        }
        // Deliveries offered before an overflow may still be in the channel; they come before
        // anything on disk beyond them, so they are staged first.
        while let Ok(delivery) = self.receiver.try_recv() {
            self.note_overflow();
            self.admit(delivery);
        }
        let Some(disk) = &mut self.disk else { return };
        let Some(after) = disk.on_disk_after else { return };
        let loaded = match disk.backlog.load(&self.target, after, LOAD_BATCH).await {
            Ok(loaded) => loaded,
            // The store logged and counted it; the next refill tries again.
            Err(_) => return,
        };
        let caught_up = loaded.len() < LOAD_BATCH;
        let mut last = after;
        for delivery in loaded {
            last = delivery.id;
            disk.high_water = disk.high_water.max(delivery.id);
            if let std::collections::hash_map::Entry::Vacant(entry) = self.held.entry(delivery.id) {
                entry.insert(delivery.event.received_at);
                self.staged.push_back(delivery);
            }
        }
        disk.on_disk_after = if caught_up { None } else { Some(last) };
    }

    /// The next refill loads what is new in the backlog.
    fn load_new(&mut self) {
        if let Some(disk) = &mut self.disk {
            disk.on_disk_after.get_or_insert(disk.high_water);
        }
    }

    /// Takes a delivery from the channel: staged to be handed on, left on disk, or (without a
    /// backlog, beyond `capacity`) dropped.
    fn admit(&mut self, delivery: Delivery) {
        match &mut self.disk {
            Some(disk) if disk.shared => {
                // A shared backlog's deliveries come from loads only, in commit order.
                self.telemetry.queue_depth.dec();
                disk.on_disk_after.get_or_insert(disk.high_water);
                return;
            }
            Some(disk) => {
                // Offered in id order: one at or below the high-water mark was loaded already.
                if delivery.id <= disk.high_water {
                    return;
                }
                disk.high_water = delivery.id;
                if let Some(after) = disk.on_disk_after {
                    // It is on disk; a later load brings it in, in order.
                    disk.on_disk_after = Some(after.min(delivery.id - 1));
                    return;
                }
                if self.held.len() >= self.capacity {
                    disk.on_disk_after = Some(delivery.id - 1);
                    return;
                }
            }
            None if self.held.len() >= self.capacity => {
                self.telemetry.dropped_queue_full(&delivery.event.id, self.capacity);
                self.count_out(1);
                return;
            }
            None => {}
        }
        if self.held.insert(delivery.id, delivery.event.received_at).is_none() {
            self.staged.push_back(delivery);
        }
    }

    /// Deliveries the store could not hand over stay on disk: load from before the first.
    fn note_overflow(&mut self) {
        let Some(disk) = &mut self.disk else { return };
        if let Some(overflow) = match self.overflow.swap(i64::MAX, Ordering::SeqCst) {
            i64::MAX => None,
            id => Some(id),
        } {
            let after = overflow - 1;
            disk.on_disk_after = Some(disk.on_disk_after.map_or(after, |known| known.min(after)));
        }
    }

    /// Records what became of a held delivery. One that ends (delivered, dead letter) is no
    /// longer held or counted; a dead letter is logged and counted here, as kept or not.
    pub async fn record(&mut self, delivery: &Delivery, outcome: Outcome) {
        if let Outcome::DeadLetter {
            n_attempts, last_error, ..
        } = &outcome
        {
            self.telemetry
                .dead_lettered(&delivery.event.id, *n_attempts, last_error, self.disk.is_some());
        }
        if outcome.ends_delivery() && self.held.remove(&delivery.id).is_some() {
            self.count_out(1);
        }
        if let Some(disk) = &self.disk {
            disk.backlog.record(&self.target, delivery.id, outcome).await;
        }
    }

    /// Deliveries that left the queue no longer count against `max_pending` or the gauge.
    fn count_out(&self, n_deliveries: u64) {
        self.limit.release(n_deliveries);
        self.telemetry.queue_depth.sub(n_deliveries as i64);
    }

    /// How many deliveries the dispatcher holds.
    pub fn n_held(&self) -> usize {
        self.held.len()
    }

    /// Whether the dispatcher may start attempts: always, except after the store let go of the
    /// input when what is held is stored, and stays for the next run.
    pub fn may_start_attempts(&self) -> bool {
        !(self.input_closed && self.disk.is_some())
    }

    /// Whether the dispatcher is done after the input closed: with a backlog, once the
    /// attempts in flight ended (the rest is on disk); without, once nothing is held.
    pub fn is_done(&self, n_in_flight: usize) -> bool {
        self.input_closed
            && self.staged.is_empty()
            && match self.disk {
                Some(_) => n_in_flight == 0,
                None => self.held.is_empty(),
            }
    }

    /// Refreshes the oldest-pending gauge (what waits on disk only is older than anything
    /// loaded after it), and has the next refill look for rows this outbox did not append
    /// itself: after another process changed the backlog (`sse-relay dlq replay`), through all
    /// of it, since such rows may have ids below ones taken since; otherwise from the
    /// high-water mark, which is cheap when there is nothing new.
    pub async fn housekeeping(&mut self) {
        let oldest_on_disk = match self.disk.as_ref().and_then(|disk| Some((disk, disk.on_disk_after?))) {
            Some((disk, after)) => disk.backlog.oldest(&self.target, after).await.ok().flatten(),
            None => None,
        };
        let oldest = self.held.values().copied().chain(oldest_on_disk).min();
        let age = oldest
            .and_then(|received_at| SystemTime::now().duration_since(received_at).ok())
            .unwrap_or_default();
        self.telemetry.oldest_pending.set(age.as_secs_f64());
        if let Some(disk) = self.disk.as_ref().filter(|disk| disk.shared)
            && let Ok(Some(n_pending)) = disk.backlog.count(&self.target).await
        {
            self.telemetry.queue_depth.set(n_pending as i64);
        }
        if self.input_closed {
            return;
        }
        if let Some(disk) = &mut self.disk {
            let external_changes = disk.backlog.external_changes();
            if external_changes != disk.seen_external_changes {
                disk.seen_external_changes = external_changes;
                disk.on_disk_after = Some(0);
            } else if disk.on_disk_after.is_none() {
                disk.on_disk_after = Some(disk.high_water);
            }
        }
    }

    /// Starts over from the backlog, holding nothing: the dispatcher serves the target anew
    /// after another replica served it (storage shared by replicas). What was held stays in
    /// the backlog for whichever replica serves the target.
    pub fn start_over(&mut self) {
        let n_held = self.held.len() as u64;
        self.held.clear();
        self.staged.clear();
        self.telemetry.queue_depth.sub(n_held as i64);
        while self.receiver.try_recv().is_ok() {
            self.telemetry.queue_depth.dec();
        }
        self.overflow.store(i64::MAX, Ordering::SeqCst);
        if let Some(disk) = &mut self.disk {
            disk.on_disk_after = Some(0);
            disk.high_water = 0;
            disk.seen_external_changes = disk.backlog.external_changes();
            if disk.shared {
                // The replica that serves the target reports its queue from now on.
                self.telemetry.queue_depth.set(0);
                self.telemetry.oldest_pending.set(0.0);
            }
        }
    }

    /// The dispatcher stopped with `n_in_flight` attempts cut short. With a backlog, what it
    /// held stays there for the next run; without, it is lost, and counted.
    pub fn close(self, n_in_flight: usize) {
        if self.disk.is_some() {
            if n_in_flight > 0 {
                info!(
                    webhook = %self.target, n_in_flight,
                    "attempts in progress were stopped; they stay queued on disk for the next run"
                );
            }
            return;
        }
        let n_held = self.held.len() as u64;
        self.count_out(n_held);
        self.telemetry.abandoned(
            n_held,
            "deliveries still queued at shutdown were not delivered (the in-memory store does not survive a restart)",
        );
    }
}

#[cfg(test)]
mod tests {
    //! The outbox against both stores, as a dispatcher uses it: `refill`, then `try_next` and
    //! `next`, and every result recorded.

    use std::path::Path;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config::{StorageConfig, StorageMode, Text};
    use crate::event::Event;
    use crate::queue::Store;
    use crate::telemetry::Metrics;

    const TARGET: &str = "hook";

    struct Relay {
        store: Store,
        metrics: Arc<Metrics>,
        config: StorageConfig,
    }

    async fn open(mode: StorageMode, directory: &Path) -> Relay {
        let config = StorageConfig {
            mode,
            path: Text(directory.display().to_string()),
            ..StorageConfig::default()
        };
        let metrics = Metrics::new();
        let store = Store::open(&config, Arc::clone(&metrics.storage)).await.unwrap();
        Relay { store, metrics, config }
    }

    impl Relay {
        /// A new outbox of the target, handed to the store as its only one.
        async fn outbox(&self, capacity: usize) -> Outbox {
            self.outbox_and_input(capacity).await.1
        }

        async fn outbox_and_input(&self, capacity: usize) -> (OutboxInput, Outbox) {
            let telemetry = Arc::new(self.metrics.target(TARGET));
            let (input, outbox) = self.store.outbox(TARGET, telemetry, capacity);
            self.store
                .set_outboxes(Outboxes::from([(Arc::from(TARGET), input.clone())]))
                .await;
            (input, outbox)
        }

        async fn submit(&self, first: usize, n: usize) {
            submit(&self.store, first, n).await;
        }

        fn metric(&self, name: &str, outcome: Option<&str>) -> f64 {
            let families = self.metrics.registry.gather();
            let Some(family) = families.iter().find(|family| family.name() == name) else {
                return 0.0;
            };
            family
                .get_metric()
                .iter()
                .filter(|metric| {
                    metric.get_label().iter().all(|label| match label.name() {
                        "target" => label.value() == TARGET,
                        "outcome" => Some(label.value()) == outcome,
                        _ => true,
                    })
                })
                .map(|metric| metric.get_counter().get_value() + metric.get_gauge().get_value())
                .sum()
        }
    }

    /// Events `first..first + n`, one delivery each, with `{"n": i}` as data.
    async fn submit(store: &Store, first: usize, n: usize) {
        for i in first..first + n {
            let event = Event {
                id: crate::event::EventId::new(),
                stream_name: Arc::from("chat"),
                sse_id: None,
                event_type: Arc::from("update"),
                data: bytes::Bytes::from(format!("{{\"n\":{i}}}")),
                is_json: true,
                json: std::sync::OnceLock::new(),
                received_at: SystemTime::now(),
            };
            store
                .submit(
                    Arc::new(event),
                    vec![Arc::from(TARGET)],
                    None,
                    None,
                    &tokio_util::sync::CancellationToken::new(),
                )
                .await
                .unwrap();
        }
    }

    /// What the event's data says it is.
    fn n_of(delivery: &Delivery) -> usize {
        delivery.event.json().unwrap()["n"].as_u64().unwrap() as usize
    }

    /// Takes deliveries as a dispatcher does until none comes for 300 ms (or `max` came),
    /// recording each with what `outcome` says (nothing: it stays held).
    async fn take(outbox: &mut Outbox, max: usize, outcome: impl Fn(&Delivery) -> Option<Outcome>) -> Vec<Delivery> {
        let mut taken = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while taken.len() < max {
            assert!(
                Instant::now() < deadline,
                "still taking after 30 s: {} taken",
                taken.len()
            );
            outbox.refill(0).await;
            let delivery = match outbox.try_next() {
                Some(delivery) => delivery,
                None => match tokio::time::timeout(Duration::from_millis(300), outbox.next()).await {
                    Ok(Some(delivery)) => delivery,
                    // Left on disk for the next refill.
                    Ok(None) if outbox.is_open() => continue,
                    Ok(None) | Err(_) => break,
                },
            };
            if let Some(outcome) = outcome(&delivery) {
                outbox.record(&delivery, outcome).await;
            }
            taken.push(delivery);
        }
        taken
    }

    fn delivered(_: &Delivery) -> Option<Outcome> {
        Some(Outcome::Delivered)
    }

    fn assert_in_order(taken: &[Delivery], expected: std::ops::Range<usize>) {
        let ns: Vec<usize> = taken.iter().map(n_of).collect();
        assert_eq!(ns, expected.collect::<Vec<_>>());
        assert!(taken.windows(2).all(|pair| pair[0].id < pair[1].id), "ids out of order");
    }

    #[tokio::test]
    async fn deliveries_come_out_once_in_order_from_both_stores() {
        for mode in [StorageMode::Memory, StorageMode::Sqlite] {
            let directory = tempfile::tempdir().unwrap();
            let relay = open(mode, directory.path()).await;
            let mut outbox = relay.outbox(100).await;
            relay.submit(0, 100).await;
            let taken = take(&mut outbox, usize::MAX, delivered).await;
            assert_in_order(&taken, 0..100);
            assert_eq!(relay.metric("sse_relay_queue_depth", None), 0.0, "{mode:?}");
            // Housekeeping looks through the backlog again: nothing comes back twice.
            outbox.housekeeping().await;
            assert!(take(&mut outbox, usize::MAX, delivered).await.is_empty(), "{mode:?}");
        }
    }

    #[tokio::test]
    async fn what_does_not_fit_waits_on_disk_and_comes_back_in_order_once() {
        let directory = tempfile::tempdir().unwrap();
        let relay = open(StorageMode::Sqlite, directory.path()).await;
        let mut outbox = relay.outbox(0).await;
        // More than the channel holds, before anything is taken: the rest stays on disk.
        relay.submit(0, 5000).await;
        // Held without results: the outbox stops at twice its capacity.
        let held = take(&mut outbox, usize::MAX, |_| None).await;
        assert_eq!(held.len(), 2 * BACKLOG_CAPACITY);
        assert_in_order(&held, 0..2 * BACKLOG_CAPACITY);
        for delivery in &held {
            outbox.record(delivery, Outcome::Delivered).await;
        }
        // Appends arrive while loads run: a load runs ahead of the channel, whose copies of
        // what it loaded are skipped.
        let store = relay.store.clone();
        let submitter = tokio::spawn(async move { submit(&store, 5000, 5000).await });
        let rest = take(&mut outbox, 10_000 - 2 * BACKLOG_CAPACITY, delivered).await;
        submitter.await.unwrap();
        assert_in_order(&rest, 2 * BACKLOG_CAPACITY..10_000);
        assert!(take(&mut outbox, usize::MAX, delivered).await.is_empty());
        assert_eq!(relay.metric("sse_relay_queue_depth", None), 0.0);
    }

    #[tokio::test]
    async fn a_burst_that_overflows_the_channel_keeps_its_order() {
        let directory = tempfile::tempdir().unwrap();
        let relay = open(StorageMode::Sqlite, directory.path()).await;
        let mut outbox = relay.outbox(0).await;
        relay.submit(0, 10).await;
        assert_in_order(&take(&mut outbox, usize::MAX, delivered).await, 0..10);
        // Caught up; then more than the channel holds arrives at once. What the channel holds
        // was offered before the overflow and comes first.
        relay.submit(10, 3000).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while relay.metric("sse_relay_queue_depth", None) < 3000.0 {
            assert!(Instant::now() < deadline, "the store did not take the burst");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_in_order(&take(&mut outbox, usize::MAX, delivered).await, 10..3010);
    }

    #[tokio::test]
    async fn a_channel_copy_of_a_delivery_a_load_brought_in_is_skipped() {
        let directory = tempfile::tempdir().unwrap();
        let relay = open(StorageMode::Sqlite, directory.path()).await;
        let (input, mut outbox) = relay.outbox_and_input(0).await;
        relay.submit(0, 3).await;
        // The first refill loads what the store holds, before the channel's copies.
        outbox.refill(0).await;
        let taken = take(&mut outbox, usize::MAX, delivered).await;
        assert_in_order(&taken, 0..3);
        // The writer's copy of a delivery that a load already brought in comes late (a load
        // can run ahead of the channel): it must not be handed out again.
        input.offer(taken[2].clone());
        assert!(take(&mut outbox, usize::MAX, delivered).await.is_empty());
    }

    #[tokio::test]
    async fn without_a_backlog_what_is_beyond_capacity_is_dropped_and_counted() {
        let directory = tempfile::tempdir().unwrap();
        let relay = open(StorageMode::Memory, directory.path()).await;
        let mut outbox = relay.outbox(10).await;
        relay.submit(0, 30).await;
        let held = take(&mut outbox, usize::MAX, |_| None).await;
        assert_in_order(&held, 0..10);
        assert_eq!(relay.metric("sse_relay_deliveries_total", Some("dropped")), 20.0);
        assert_eq!(relay.metric("sse_relay_queue_depth", None), 10.0);
    }

    #[tokio::test]
    async fn a_dead_letter_replayed_while_running_comes_back_with_its_event_id() {
        let directory = tempfile::tempdir().unwrap();
        let relay = open(StorageMode::Sqlite, directory.path()).await;
        let mut outbox = relay.outbox(0).await;
        relay.submit(0, 3).await;
        let taken = take(&mut outbox, usize::MAX, |delivery| match n_of(delivery) {
            1 => Some(Outcome::dead_letter(delivery, Some(400), "refused".to_owned())),
            _ => Some(Outcome::Delivered),
        })
        .await;
        assert_in_order(&taken, 0..3);
        let selection = crate::dlq::Selection {
            id: Some(taken[1].id),
            ..crate::dlq::Selection::default()
        };
        assert_eq!(crate::dlq::replay(&relay.config, &selection, false).unwrap(), 1);
        // The store notices another process's change within a second or two of having work.
        let deadline = Instant::now() + Duration::from_secs(10);
        let replayed = loop {
            assert!(Instant::now() < deadline, "the replayed delivery never came back");
            outbox.housekeeping().await;
            if let Some(delivery) = take(&mut outbox, 1, delivered).await.pop() {
                break delivery;
            }
        };
        assert_eq!(replayed.event.id, taken[1].event.id);
        assert_eq!((n_of(&replayed), replayed.n_attempts), (1, 0));
        outbox.housekeeping().await;
        assert!(take(&mut outbox, usize::MAX, delivered).await.is_empty());
    }

    #[tokio::test]
    async fn a_new_outbox_takes_over_what_the_old_one_held() {
        for mode in [StorageMode::Memory, StorageMode::Sqlite] {
            let directory = tempfile::tempdir().unwrap();
            let relay = open(mode, directory.path()).await;
            let mut old = relay.outbox(100).await;
            relay.submit(0, 10).await;
            let taken = take(&mut old, usize::MAX, |delivery| {
                (n_of(delivery) < 4).then_some(Outcome::Delivered)
            })
            .await;
            assert_in_order(&taken, 0..10);
            // A reload: the store switches to the new outbox, then the old one stops.
            let mut new = relay.outbox(100).await;
            old.close(0);
            relay.submit(10, 5).await;
            let taken = take(&mut new, usize::MAX, delivered).await;
            match mode {
                // What the old one held and did not finish is on disk: it comes first.
                StorageMode::Sqlite => assert_in_order(&taken, 4..15),
                // Lost with the old one, and counted.
                StorageMode::Memory => {
                    assert_in_order(&taken, 10..15);
                    assert_eq!(relay.metric("sse_relay_deliveries_total", Some("abandoned")), 6.0);
                }
                StorageMode::Postgres => unreachable!("not among the modes tested here"),
            }
            assert_eq!(relay.metric("sse_relay_queue_depth", None), 0.0, "{mode:?}");
        }
    }

    #[tokio::test]
    async fn at_shutdown_a_backlog_keeps_what_is_held_and_memory_delivers_it() {
        for mode in [StorageMode::Memory, StorageMode::Sqlite] {
            let directory = tempfile::tempdir().unwrap();
            let relay = open(mode, directory.path()).await;
            let mut outbox = relay.outbox(100).await;
            relay.submit(0, 3).await;
            relay.store.finish_submissions().await;
            let held = take(&mut outbox, usize::MAX, |_| None).await;
            assert_in_order(&held, 0..3);
            assert!(outbox.next().await.is_none(), "the input is closed");
            match mode {
                StorageMode::Sqlite => {
                    assert!(!outbox.may_start_attempts());
                    assert!(!outbox.is_done(1), "an attempt is still in flight");
                    assert!(outbox.is_done(0));
                }
                StorageMode::Memory => {
                    assert!(outbox.may_start_attempts());
                    assert!(!outbox.is_done(0), "three are held");
                    for delivery in &held {
                        outbox.record(delivery, Outcome::Delivered).await;
                    }
                    assert!(outbox.is_done(0));
                }
                StorageMode::Postgres => unreachable!("not among the modes tested here"),
            }
            relay.store.close().await;
        }
    }
}
