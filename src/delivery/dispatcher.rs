//! One dispatcher task per target: it decides which pending delivery is attempted next and
//! records every result in the store.
//!
//! It holds at most `capacity` deliveries in memory. With the SQLite store, deliveries beyond
//! that stay on disk only ("spilled") and are loaded back as room frees up, so a target that is
//! down for hours costs disk, not memory, and the streams keep flowing. With the memory store
//! there is nowhere to spill: a dispatcher that holds `queue_capacity` deliveries drops the next
//! ones for its target (counted and logged), so a slow or dead target never holds up the stream
//! or the other targets.
//!
//! Before an attempt starts, three gates must open: the circuit breaker (a failing target is
//! paused and probed), the rate limiter (bursts are smoothed), and, for `ordered` targets, the
//! rule of one delivery in flight per stream.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use governor::clock::{Clock, DefaultClock};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::delivery::TargetRuntime;
use crate::delivery::breaker::{AttemptPermit, AttemptResult, Breaker, TargetState};
use crate::delivery::request::{self, Failure};
use crate::delivery::retry::{self, Verdict};
use crate::queue::outbox::Outbox;
use crate::queue::{DeadLetter, DeliveryId, Pending, Store};

/// Deliveries held in memory per target when the store can hold the rest on disk.
const DURABLE_CAPACITY: usize = 1024;

/// Rows loaded from disk at a time.
const LOAD_BATCH: usize = 256;

/// How often the dispatcher looks for rows it did not append itself (`sse-relay dlq replay`),
/// refreshes its gauges, and repeats the log line of a gone target.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// One finished attempt, handed back to the dispatcher.
struct Attempted {
    pending: Pending,
    permit: AttemptPermit,
    started_at: SystemTime,
    duration: Duration,
    outcome: Result<(), Failure>,
}

pub struct Dispatcher {
    target: Arc<TargetRuntime>,
    store: Store,
    client: reqwest::Client,
    capacity: usize,
    /// Deliveries due now, in the order they should go.
    ready: VecDeque<Pending>,
    /// Deliveries waiting to retry, by when.
    waiting: BTreeMap<(SystemTime, DeliveryId), Pending>,
    /// Every delivery in memory (ready, waiting or in flight), with when its event arrived.
    in_memory: HashMap<DeliveryId, SystemTime>,
    /// While set, deliveries with ids above it may be on disk and not in memory.
    on_disk_after: Option<DeliveryId>,
    /// The highest id this dispatcher has seen, appended or loaded.
    high_water: DeliveryId,
    in_flight: JoinSet<Attempted>,
    /// Streams with a delivery in flight or waiting to retry, for `ordered` targets.
    busy_streams: HashSet<Arc<str>>,
    breaker: Breaker,
    rate_limiter: Option<governor::DefaultDirectRateLimiter>,
    input_closed: bool,
    /// The store's count of changes by other processes, when this dispatcher last looked.
    seen_external_changes: u64,
}

impl Dispatcher {
    pub fn new(target: Arc<TargetRuntime>, store: Store, client: reqwest::Client) -> Dispatcher {
        let durable = store.is_durable();
        let seen_external_changes = store.external_changes();
        let rate_limiter = target.rate_limit.map(|limit| {
            let period = limit.per / limit.n_requests;
            let quota = governor::Quota::with_period(period.max(Duration::from_nanos(1)))
                .expect("the period is positive")
                .allow_burst(std::num::NonZeroU32::new(limit.n_requests).expect("at least 1 request"));
            governor::RateLimiter::direct(quota)
        });
        Dispatcher {
            capacity: if durable {
                DURABLE_CAPACITY
            } else {
                target.queue_capacity
            },
            breaker: Breaker::new(target.breaker),
            target,
            store,
            client,
            ready: VecDeque::new(),
            waiting: BTreeMap::new(),
            in_memory: HashMap::new(),
            // What the store held when the relay started is loaded from disk first.
            on_disk_after: durable.then_some(0),
            high_water: 0,
            in_flight: JoinSet::new(),
            busy_streams: HashSet::new(),
            rate_limiter,
            input_closed: false,
            seen_external_changes,
        }
    }

    /// Runs until `stop` is cancelled, or until the input is closed and the work is done: with
    /// the memory store, everything it holds; with SQLite, the attempts in flight (the rest
    /// stays on disk for the next run).
    pub async fn run(mut self, mut input: Outbox, stop: CancellationToken) {
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.input_closed && self.is_finished() {
                break;
            }
            self.note_overflow(&input);
            // Fresh deliveries are loaded while few are ready, even with retries waiting (a
            // few poison deliveries must not hold back the rest), but never beyond twice the
            // capacity in all: when a target fails for long, what does not fit waits on disk.
            if self.on_disk_after.is_some()
                && self.ready.len() < self.capacity / 2
                && self.in_memory.len() < 2 * self.capacity
            {
                // Deliveries offered before an overflow may still be in the channel; they come
                // before anything on disk beyond them, so they are taken first.
                self.drain_input(&mut input);
                self.load_from_disk().await;
            }
            let wake_at = self.start_attempts();
            // Input is always taken: what does not fit waits on disk, or with the memory
            // store is dropped for this target, so the store never waits on a slow target.
            let take_input = !self.input_closed;
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                Some(joined) = self.in_flight.join_next(), if !self.in_flight.is_empty() => match joined {
                    Ok(attempted) => self.finish(attempted).await,
                    Err(err) => error!(webhook = %self.target.telemetry.name, error = %err, "a delivery attempt panicked"),
                },
                received = input.receiver.recv(), if take_input => match received {
                    Some(pending) => {
                        // The store notes an overflow before it sends anything later, so checking
                        // here, after each receive, sees every delivery left on disk before this
                        // one; otherwise this one could overtake it.
                        self.note_overflow(&input);
                        self.accept(pending);
                    }
                    None => self.input_closed = true,
                },
                () = sleep_until(wake_at) => {}
                _ = housekeeping.tick() => self.housekeeping().await,
            }
        }
        self.abandon_the_rest();
    }

    /// Accepts every delivery already waiting in the channel, without waiting for more.
    fn drain_input(&mut self, input: &mut Outbox) {
        while !self.input_closed {
            match input.receiver.try_recv() {
                Ok(pending) => {
                    self.note_overflow(input);
                    self.accept(pending);
                }
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => self.input_closed = true,
            }
        }
    }

    fn is_finished(&self) -> bool {
        if self.store.is_durable() {
            self.in_flight.is_empty()
        } else {
            self.in_memory.is_empty()
        }
    }

    /// Deliveries the store could not hand over stay on disk: load from before the first.
    fn note_overflow(&mut self, input: &Outbox) {
        if let Some(overflow) = input.take_overflow() {
            let after = overflow - 1;
            self.on_disk_after = Some(self.on_disk_after.map_or(after, |known| known.min(after)));
        }
    }

    /// A delivery the stream just appended.
    fn accept(&mut self, pending: Pending) {
        // The SQLite writer hands over deliveries in id order, so one at or below the
        // high-water mark was loaded from disk already (a load can run ahead of the channel):
        // it is held, or it was delivered, and taking it again would deliver it twice, out of
        // order. (Memory-store ids can arrive out of order, and are never loaded.)
        if self.store.is_durable() && pending.id <= self.high_water {
            return;
        }
        self.high_water = self.high_water.max(pending.id);
        if self.in_memory.contains_key(&pending.id) {
            return;
        }
        if let Some(after) = self.on_disk_after {
            // It is on disk; a later load brings it in, in order.
            self.on_disk_after = Some(after.min(pending.id - 1));
            return;
        }
        if self.in_memory.len() >= self.capacity {
            if self.store.is_durable() {
                self.on_disk_after = Some(pending.id - 1);
            } else {
                self.target
                    .telemetry
                    .dropped_queue_full(&pending.event.id, self.capacity);
                self.target.telemetry.queue_depth.dec();
                self.store.release_abandoned(1);
            }
            return;
        }
        self.hold(pending);
    }

    fn hold(&mut self, pending: Pending) {
        self.in_memory.insert(pending.id, pending.event.received_at);
        if pending.next_attempt_at > SystemTime::now() {
            if self.target.ordered {
                self.busy_streams.insert(Arc::clone(&pending.event.stream_name));
            }
            self.waiting.insert((pending.next_attempt_at, pending.id), pending);
        } else {
            self.ready.push_back(pending);
        }
    }

    async fn load_from_disk(&mut self) {
        let Some(after) = self.on_disk_after else { return };
        let loaded = match self.store.load(&self.target.telemetry.name, after, LOAD_BATCH).await {
            Ok(loaded) => loaded,
            // The writer logged and counted it; try again at the next turn of the loop.
            Err(_) => return,
        };
        let caught_up = loaded.len() < LOAD_BATCH;
        let mut last = after;
        for pending in loaded {
            last = pending.id;
            self.high_water = self.high_water.max(pending.id);
            if !self.in_memory.contains_key(&pending.id) {
                self.hold(pending);
            }
        }
        self.on_disk_after = if caught_up { None } else { Some(last) };
    }

    /// Starts every attempt the gates allow; returns when something next could start.
    fn start_attempts(&mut self) -> Option<Instant> {
        // Shutting down with a durable store: what has not started stays on disk for next time.
        if self.input_closed && self.store.is_durable() {
            return None;
        }
        let now = Instant::now();
        let wall_now = SystemTime::now();
        // Retries that are due go first, ahead of fresh deliveries.
        let due: Vec<(SystemTime, DeliveryId)> = self
            .waiting
            .range(..=(wall_now, DeliveryId::MAX))
            .map(|(key, _)| *key)
            .collect();
        for key in due.into_iter().rev() {
            if let Some(pending) = self.waiting.remove(&key) {
                self.busy_streams.remove(&pending.event.stream_name);
                self.ready.push_front(pending);
            }
        }
        let retry_wake = self
            .waiting
            .keys()
            .next()
            .map(|(at, _)| now + at.duration_since(wall_now).unwrap_or(Duration::ZERO));

        while self.in_flight.len() < self.target.max_in_flight {
            let Some(position) = self.next_ready_position() else {
                break;
            };
            match self.breaker.state(now) {
                TargetState::Open => return earliest(retry_wake, self.breaker.next_probe_at()),
                TargetState::Gone => return retry_wake,
                TargetState::Closed | TargetState::HalfOpen => {}
            }
            if let Some(limiter) = &self.rate_limiter
                && let Err(not_until) = limiter.check()
            {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                return earliest(retry_wake, Some(now + wait));
            }
            let Some(permit) = self.breaker.try_start(now) else {
                // Half-open with its probe already out: the probe's result wakes the loop.
                break;
            };
            self.target.telemetry.state(self.breaker.state(now).metric_value());
            let pending = self.ready.remove(position).expect("the position is in range");
            if self.target.ordered {
                self.busy_streams.insert(Arc::clone(&pending.event.stream_name));
            }
            let (target, client) = (Arc::clone(&self.target), self.client.clone());
            self.target.telemetry.in_flight.inc();
            self.in_flight.spawn(async move {
                let started = Instant::now();
                let started_at = SystemTime::now();
                // A panic here must not lose the delivery or its breaker permit: it comes back
                // as a failed attempt, to be retried.
                let attempt = std::panic::AssertUnwindSafe(request::attempt(&client, &target, &pending.event));
                let outcome = attempt.catch_unwind().await.unwrap_or_else(|_| {
                    Err(Failure {
                        verdict: Verdict::Retry { retry_after: None },
                        status: None,
                        problem: request::Problem::Panicked,
                    })
                });
                Attempted {
                    pending,
                    permit,
                    started_at,
                    duration: started.elapsed(),
                    outcome,
                }
            });
        }
        retry_wake
    }

    /// The first ready delivery that may go now: the front, or for `ordered` targets the first
    /// whose stream has nothing in flight or waiting.
    fn next_ready_position(&self) -> Option<usize> {
        if !self.target.ordered {
            return (!self.ready.is_empty()).then_some(0);
        }
        self.ready
            .iter()
            .position(|pending| !self.busy_streams.contains(&pending.event.stream_name))
    }

    async fn finish(&mut self, attempted: Attempted) {
        let Attempted {
            mut pending,
            permit,
            started_at,
            duration,
            outcome,
        } = attempted;
        let telemetry = &self.target.telemetry;
        telemetry.in_flight.dec();
        telemetry.attempt_finished(duration);
        pending.n_attempts += 1;
        pending.first_attempt_at.get_or_insert(started_at);
        let now = Instant::now();

        let failure = match outcome {
            Ok(()) => {
                self.record_answer(permit, AttemptResult::Success, now);
                let telemetry = &self.target.telemetry;
                telemetry.delivered(&pending.event.id, pending.n_attempts, duration);
                self.store.complete(pending.id).await;
                self.forget(&pending);
                return;
            }
            Err(failure) => failure,
        };
        if failure.verdict == Verdict::Gone {
            // The target says it is gone for good: pause it and keep the delivery for when
            // the config changes.
            if self.breaker.record(permit, AttemptResult::Gone, now).is_some() {
                error!(
                    webhook = %telemetry.name, url = %self.target.display_url,
                    "the target answered 410 Gone; it is paused and its deliveries are kept until the config changes"
                );
            }
            pending.n_attempts -= 1;
            self.busy_streams.remove(&pending.event.stream_name);
            self.ready.push_front(pending);
            telemetry.state(self.breaker.state(now).metric_value());
            return;
        }
        let retry_after = match failure.verdict {
            Verdict::Retry { retry_after } => retry_after,
            Verdict::Delivered | Verdict::Permanent | Verdict::Gone => {
                self.record_answer(permit, AttemptResult::Rejected, now);
                let problem = failure.problem.to_string();
                self.dead_letter(pending, failure.status, problem).await;
                return;
            }
        };
        if let Some(transition) = self.breaker.record(permit, AttemptResult::Failure, now) {
            warn!(
                webhook = %telemetry.name, from = transition.from.label(), to = transition.to.label(),
                "target keeps failing; its deliveries stay queued while it is paused and probed"
            );
        }
        telemetry.state(self.breaker.state(now).metric_value());
        let elapsed = pending
            .first_attempt_at
            .and_then(|first| SystemTime::now().duration_since(first).ok())
            .unwrap_or(Duration::ZERO);
        match retry::next_delay(&self.target.retry, pending.n_attempts, elapsed, retry_after) {
            Ok(delay) => {
                telemetry.retrying(&pending.event.id, pending.n_attempts, &failure.problem, delay);
                pending.next_attempt_at = SystemTime::now() + delay;
                self.store.reschedule(&pending, &failure.problem.to_string()).await;
                if self.target.ordered {
                    self.busy_streams.insert(Arc::clone(&pending.event.stream_name));
                }
                self.waiting.insert((pending.next_attempt_at, pending.id), pending);
            }
            Err(exhausted) => {
                let problem = format!("{}; gave up after reaching {}", failure.problem, exhausted.limit());
                self.dead_letter(pending, failure.status, problem).await;
            }
        }
    }

    /// Records an answer from the target in the breaker; one that ends a pause is logged.
    fn record_answer(&mut self, permit: AttemptPermit, result: AttemptResult, now: Instant) {
        if let Some(transition) = self.breaker.record(permit, result, now)
            && transition.to == TargetState::Closed
        {
            self.target.telemetry.recovered(transition.from.label());
        }
    }

    async fn dead_letter(&mut self, pending: Pending, last_status: Option<u16>, last_error: String) {
        self.target.telemetry.dead_lettered(
            &pending.event.id,
            pending.n_attempts,
            &last_error,
            self.store.is_durable(),
        );
        self.store
            .dead_letter(
                &pending,
                DeadLetter {
                    last_status,
                    last_error,
                },
            )
            .await;
        self.forget(&pending);
    }

    fn forget(&mut self, pending: &Pending) {
        self.in_memory.remove(&pending.id);
        self.busy_streams.remove(&pending.event.stream_name);
        self.target.telemetry.queue_depth.dec();
    }

    async fn housekeeping(&mut self) {
        let now = Instant::now();
        // Deliveries waiting on disk only are older than any loaded after them.
        let oldest_on_disk = match self.on_disk_after {
            Some(after) => self
                .store
                .oldest_on_disk(&self.target.telemetry.name, after)
                .await
                .ok()
                .flatten(),
            None => None,
        };
        let oldest = self.in_memory.values().copied().chain(oldest_on_disk).min();
        let age = oldest
            .and_then(|received_at| SystemTime::now().duration_since(received_at).ok())
            .unwrap_or(Duration::ZERO);
        self.target.telemetry.oldest_pending.set(age.as_secs_f64());
        let state = self.breaker.state(now);
        self.target.telemetry.state(state.metric_value());
        if state == TargetState::Gone && self.breaker.should_log_gone(now) {
            error!(
                webhook = %self.target.telemetry.name, n_pending = self.in_memory.len(),
                "the target answered 410 Gone and stays paused until the config changes"
            );
        }
        // Rows appended by another process (`sse-relay dlq replay`) have ids this dispatcher
        // never saw, possibly below ones it took since: once the store reports such a change,
        // everything is looked through again (rows already held are skipped). Otherwise a load
        // from the high-water mark is cheap when there is nothing new.
        if self.store.is_durable() && !self.input_closed {
            let external_changes = self.store.external_changes();
            if external_changes != self.seen_external_changes {
                self.seen_external_changes = external_changes;
                self.on_disk_after = Some(0);
            } else if self.on_disk_after.is_none() {
                self.on_disk_after = Some(self.high_water);
            }
        }
    }

    fn abandon_the_rest(&mut self) {
        let n_in_flight = self.in_flight.len() as u64;
        self.in_flight.abort_all();
        if self.store.is_durable() {
            if n_in_flight > 0 {
                info!(
                    webhook = %self.target.telemetry.name, n_in_flight,
                    "attempts in progress were stopped; they stay queued on disk for the next run"
                );
            }
            return;
        }
        let n_held = self.in_memory.len() as u64;
        self.store.release_abandoned(n_held);
        self.target.telemetry.abandoned(
            n_held,
            "deliveries still queued at shutdown were not delivered (the in-memory store does not survive a restart)",
        );
    }
}

fn earliest(first: Option<Instant>, second: Option<Instant>) -> Option<Instant> {
    match (first, second) {
        (Some(first), Some(second)) => Some(first.min(second)),
        (first, second) => first.or(second),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
