//! One dispatcher task per target: it decides which delivery is attempted next, and when.
//!
//! It schedules only. Its deliveries come from the target's [`Outbox`], which owns where each
//! one is (spilled to disk, loaded back, dropped when the memory store's `queue_capacity` is
//! full) and takes every result back; the dispatcher keeps what it holds in two sets, ready
//! and waiting to retry, and the attempts in flight.
//!
//! Before an attempt starts, three gates must open: the circuit breaker (a failing target is
//! paused and probed), the rate limiter (bursts are smoothed), and, for `ordered` targets, the
//! rule of one delivery in flight per stream.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use governor::clock::{Clock, DefaultClock};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::delivery::TargetRuntime;
use crate::delivery::breaker::{AttemptPermit, AttemptResult, Breaker, TargetState};
use crate::delivery::request::{self, Failure};
use crate::delivery::retry::{self, Failed};
use crate::queue::lease::LeaseWatch;
use crate::queue::outbox::Outbox;
use crate::queue::{Delivery, DeliveryId, Outcome};

/// How often the dispatcher refreshes its gauges, has its outbox look for rows it did not
/// append itself (`sse-relay dlq replay`), and repeats the log line of a gone target.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// One finished attempt, handed back to the dispatcher.
struct Attempted {
    delivery: Delivery,
    permit: AttemptPermit,
    started_at: SystemTime,
    duration: Duration,
    outcome: Result<(), Failure>,
}

pub struct Dispatcher {
    target: Arc<TargetRuntime>,
    outbox: Outbox,
    client: reqwest::Client,
    /// Deliveries due now, in the order they should go.
    ready: VecDeque<Delivery>,
    /// Deliveries waiting to retry, by when.
    waiting: BTreeMap<(SystemTime, DeliveryId), Delivery>,
    in_flight: JoinSet<Attempted>,
    /// Streams with a delivery in flight or waiting to retry, for `ordered` targets.
    busy_streams: HashSet<Arc<str>>,
    breaker: Breaker,
    rate_limiter: Option<governor::DefaultDirectRateLimiter>,
    /// With storage shared by replicas: the target's lease. The dispatcher serves the target
    /// only while this replica holds it.
    lease: Option<LeaseWatch>,
}

/// Why the dispatcher's loop ended.
enum Served {
    /// Stopped, or done with what the store handed it.
    Ended,
    /// The target's lease went to another replica (or could not be renewed in time).
    LeaseLost,
}

impl Dispatcher {
    pub fn new(
        target: Arc<TargetRuntime>,
        outbox: Outbox,
        client: reqwest::Client,
        lease: Option<LeaseWatch>,
    ) -> Dispatcher {
        let rate_limiter = target.rate_limit.map(|limit| {
            let period = limit.per / limit.n_requests;
            let quota = governor::Quota::with_period(period.max(Duration::from_nanos(1)))
                .expect("the period is positive")
                .allow_burst(std::num::NonZeroU32::new(limit.n_requests).expect("at least 1 request"));
            governor::RateLimiter::direct(quota)
        });
        Dispatcher {
            breaker: Breaker::new(target.breaker),
            target,
            outbox,
            client,
            ready: VecDeque::new(),
            waiting: BTreeMap::new(),
            in_flight: JoinSet::new(),
            busy_streams: HashSet::new(),
            rate_limiter,
            lease,
        }
    }

    /// Runs until `stop` is cancelled, or until the store let go of the outbox's input and
    /// the outbox says the work is done (with SQLite, the attempts in flight; with memory,
    /// everything held).
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            if let Some(lease) = &mut self.lease {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = lease.held() => {}
                }
                self.outbox.start_over();
            }
            match self.serve(&stop).await {
                Served::Ended => break,
                Served::LeaseLost => self.let_go(),
            }
        }
        let n_in_flight = self.in_flight.len();
        self.in_flight.abort_all();
        self.outbox.close(n_in_flight);
    }

    /// The lease was lost: attempts in flight are cut short, and nothing held is kept; the
    /// replica that holds the lease now attempts it all again, with the same keys.
    fn let_go(&mut self) {
        let n_in_flight = self.in_flight.len();
        self.in_flight.abort_all();
        self.target.telemetry.in_flight.sub(n_in_flight as i64);
        self.ready.clear();
        self.waiting.clear();
        self.busy_streams.clear();
        self.outbox.start_over();
        // The replica that serves the target now reports its state; what this one learnt of
        // the target is stale by the time it serves it again.
        self.breaker = Breaker::new(self.target.breaker);
        self.target.telemetry.state(TargetState::Closed.metric_value());
        warn!(
            webhook = %self.target.telemetry.name, n_in_flight,
            "this replica no longer serves the target: another replica holds its lease"
        );
    }

    /// Whether the target's lease, if there is one, is no longer this replica's to use.
    fn lease_lost(&self) -> bool {
        self.lease.as_ref().is_some_and(|lease| lease.token().is_none())
    }

    async fn serve(&mut self, stop: &CancellationToken) -> Served {
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.outbox.is_done(self.in_flight.len()) {
                return Served::Ended;
            }
            if self.lease_lost() {
                return Served::LeaseLost;
            }
            // Outside the select: no result is recorded while a load is under way.
            self.outbox.refill(self.ready.len()).await;
            while let Some(delivery) = self.outbox.try_next() {
                self.schedule(delivery);
            }
            let wake_at = self.start_attempts();
            tokio::select! {
                biased;
                () = stop.cancelled() => return Served::Ended,
                () = lease_changed(self.lease.as_mut()) => {}
                Some(joined) = self.in_flight.join_next(), if !self.in_flight.is_empty() => match joined {
                    Ok(attempted) => self.finish(attempted).await,
                    Err(err) => error!(webhook = %self.target.telemetry.name, error = %err, "a delivery attempt panicked"),
                },
                // Always taken while open: what does not fit waits on disk, or with the memory
                // store is dropped for this target, so the store never waits on a slow target.
                next = self.outbox.next(), if self.outbox.is_open() => {
                    if let Some(delivery) = next {
                        self.schedule(delivery);
                    }
                }
                () = sleep_until(wake_at) => {}
                _ = housekeeping.tick() => self.housekeeping().await,
            }
        }
    }

    /// A delivery from the outbox: ready now, or waiting for its next attempt.
    fn schedule(&mut self, delivery: Delivery) {
        if delivery.next_attempt_at > SystemTime::now() {
            if self.target.ordered {
                self.busy_streams.insert(Arc::clone(&delivery.event.stream_name));
            }
            self.waiting.insert((delivery.next_attempt_at, delivery.id), delivery);
        } else {
            self.ready.push_back(delivery);
        }
    }

    /// Starts every attempt the gates allow; returns when something next could start.
    fn start_attempts(&mut self) -> Option<Instant> {
        // Shutting down, with what is held stored for the next run; or (replicas) the lease
        // could not be renewed in time, and another replica may serve the target any moment.
        if !self.outbox.may_start_attempts() || self.lease_lost() {
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
            if let Some(delivery) = self.waiting.remove(&key) {
                self.busy_streams.remove(&delivery.event.stream_name);
                self.ready.push_front(delivery);
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
            let delivery = self.ready.remove(position).expect("the position is in range");
            if self.target.ordered {
                self.busy_streams.insert(Arc::clone(&delivery.event.stream_name));
            }
            let (target, client) = (Arc::clone(&self.target), self.client.clone());
            self.target.telemetry.in_flight.inc();
            self.in_flight.spawn(async move {
                let started = Instant::now();
                let started_at = SystemTime::now();
                // A panic here must not lose the delivery or its breaker permit: it comes back
                // as a failed attempt, to be retried.
                let attempt = std::panic::AssertUnwindSafe(request::attempt(&client, &target, &delivery.event));
                let outcome = attempt.catch_unwind().await.unwrap_or_else(|_| {
                    Err(Failure {
                        verdict: Failed::Retry { retry_after: None },
                        status: None,
                        problem: request::Problem::Panicked,
                    })
                });
                Attempted {
                    delivery,
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
            .position(|delivery| !self.busy_streams.contains(&delivery.event.stream_name))
    }

    async fn finish(&mut self, attempted: Attempted) {
        let Attempted {
            mut delivery,
            permit,
            started_at,
            duration,
            outcome,
        } = attempted;
        let telemetry = &self.target.telemetry;
        telemetry.in_flight.dec();
        telemetry.attempt_finished(duration);
        delivery.n_attempts += 1;
        delivery.first_attempt_at.get_or_insert(started_at);
        let now = Instant::now();

        let failure = match outcome {
            Ok(()) => {
                tap_outcome(&self.target, &delivery, "delivered", None, duration);
                self.record_answer(permit, AttemptResult::Success, now);
                self.target
                    .telemetry
                    .delivered(&delivery.event.id, delivery.n_attempts, duration);
                self.end(&delivery, Outcome::Delivered).await;
                return;
            }
            Err(failure) => failure,
        };
        let retry_after = match failure.verdict {
            Failed::Retry { retry_after } => retry_after,
            Failed::Permanent => {
                tap_outcome(&self.target, &delivery, "dead_letter", Some(&failure), duration);
                self.record_answer(permit, AttemptResult::Rejected, now);
                let outcome = Outcome::dead_letter(&delivery, failure.status, failure.problem.to_string());
                self.end(&delivery, outcome).await;
                return;
            }
            Failed::Gone => {
                tap_outcome(&self.target, &delivery, "gone", Some(&failure), duration);
                // The target says it is gone for good: it is paused, and the delivery kept for
                // when the config changes, as if it had not been attempted.
                if self.breaker.record(permit, AttemptResult::Gone, now).is_some() {
                    error!(
                        webhook = %telemetry.name, url = %self.target.display_url,
                        "the target answered 410 Gone; it is paused and its deliveries are kept until the config changes"
                    );
                }
                delivery.n_attempts -= 1;
                self.busy_streams.remove(&delivery.event.stream_name);
                self.ready.push_front(delivery);
                telemetry.state(self.breaker.state(now).metric_value());
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
        let elapsed = delivery
            .first_attempt_at
            .and_then(|first| SystemTime::now().duration_since(first).ok())
            .unwrap_or(Duration::ZERO);
        match retry::next_delay(&self.target.retry, delivery.n_attempts, elapsed, retry_after) {
            Ok(delay) => {
                tap_outcome(&self.target, &delivery, "retry", Some(&failure), duration);
                telemetry.retrying(&delivery.event.id, delivery.n_attempts, &failure.problem, delay);
                delivery.next_attempt_at = SystemTime::now() + delay;
                let outcome = Outcome::retry(&delivery, failure.problem.to_string());
                self.outbox.record(&delivery, outcome).await;
                if self.target.ordered {
                    self.busy_streams.insert(Arc::clone(&delivery.event.stream_name));
                }
                self.waiting.insert((delivery.next_attempt_at, delivery.id), delivery);
            }
            Err(exhausted) => {
                // Its retries ran out: the attempt made a dead letter.
                tap_outcome(&self.target, &delivery, "dead_letter", Some(&failure), duration);
                let problem = format!("{}; gave up after reaching {}", failure.problem, exhausted.limit());
                let outcome = Outcome::dead_letter(&delivery, failure.status, problem);
                self.end(&delivery, outcome).await;
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

    /// The delivery is done with (delivered or dead-lettered): the outbox records it.
    async fn end(&mut self, delivery: &Delivery, outcome: Outcome) {
        self.busy_streams.remove(&delivery.event.stream_name);
        self.outbox.record(delivery, outcome).await;
    }

    async fn housekeeping(&mut self) {
        let now = Instant::now();
        self.outbox.housekeeping().await;
        let state = self.breaker.state(now);
        self.target.telemetry.state(state.metric_value());
        if state == TargetState::Gone && self.breaker.should_log_gone(now) {
            error!(
                webhook = %self.target.telemetry.name, n_held = self.outbox.n_held(),
                "the target answered 410 Gone and stays paused until the config changes"
            );
        }
    }
}

fn earliest(first: Option<Instant>, second: Option<Instant>) -> Option<Instant> {
    match (first, second) {
        (Some(first), Some(second)) => Some(first.min(second)),
        (first, second) => first.or(second),
    }
}

/// Tells `sse-relay tap` how an attempt ended (`outcome`: delivered, retry, dead_letter, gone),
/// when someone watches.
fn tap_outcome(
    target: &TargetRuntime,
    delivery: &Delivery,
    outcome: &'static str,
    failure: Option<&Failure>,
    duration: Duration,
) {
    if !target.telemetry.tap.is_watched() {
        return;
    }
    let status = failure.and_then(|failure| failure.status);
    let error = failure.map(|failure| failure.problem.to_string());
    let event = &delivery.event;
    target.telemetry.tap.send(crate::telemetry::Tapped::Delivery {
        target: Arc::clone(&target.telemetry.name),
        stream: Arc::clone(&event.stream_name),
        event_type: Arc::clone(&event.event_type),
        event_id: event.id,
        outcome,
        status,
        duration,
        attempt: delivery.n_attempts,
        error,
    });
}

/// Waits for a change of the lease's grant; never, without a lease.
async fn lease_changed(lease: Option<&mut LeaseWatch>) {
    match lease {
        Some(lease) => lease.changed().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
