//! A target's health as the dispatcher sees it: a circuit breaker that stops attempts to a target
//! that is down, and a pause for a target that answered 410 Gone. Pure: no IO, and no clock is
//! read here; every method that depends on time takes the caller's `now`.
//!
//! The breaker is closed while the target answers, and it tells a target that is down from one
//! that is flaky by the failure rate of its recent attempts (resilience4j's failure-rate window):
//! it opens once at least `failure_percent` of them failed and there were at least
//! `min_attempts` of them. Recent means the last `WINDOW_ATTEMPTS` whose result came within
//! `window`: the count keeps a busy target's rate current, the time keeps a quiet target's old
//! successes from hiding that it is down now. A target that fails 30% or 50% of its requests at
//! random keeps its traffic, and its deliveries are retried. Five consecutive failures, which
//! opened the breaker before, come every few hundred requests to such a target, and each failed
//! probe doubled the pause: 2,000 events at 1,000/s with 30% failing took 87 s instead of 2 s
//! (issue #11; BENCHMARKS.md, flaky).
//!
//! While open, no attempt starts, so the target's deliveries wait in its queue instead of
//! spending their retries on a target that is down. Once the open delay has passed the breaker
//! is half-open and lets exactly one attempt, the probe, start. The probe's success closes the
//! breaker and forgets the failures before it; its failure opens it again for twice the delay,
//! up to `max_open_delay`.
//!
//! A 410 Gone says the webhook was removed on purpose, so the target is paused for good, whatever
//! the breaker's state: only a config reload, which builds a new `Breaker`, resumes it.
//!
//! Each attempt is started with `try_start`, which hands out an `AttemptPermit`, and ends with
//! `record` (or `abandon`), which takes the permit back. The permit is how the breaker tells the
//! probe's result apart from the late results of attempts that were already in flight when it
//! opened, which `max_in_flight > 1` makes common.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A target's state, as `sse_relay_target_state{target}` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    Closed,
    Open,
    HalfOpen,
    Gone,
}

impl TargetState {
    /// The gauge value: 0 closed, 1 open, 2 half-open, 3 gone.
    pub fn metric_value(self) -> i64 {
        match self {
            TargetState::Closed => 0,
            TargetState::Open => 1,
            TargetState::HalfOpen => 2,
            TargetState::Gone => 3,
        }
    }

    /// The state as log lines name it.
    pub fn label(self) -> &'static str {
        match self {
            TargetState::Closed => "closed",
            TargetState::Open => "open",
            TargetState::HalfOpen => "half_open",
            TargetState::Gone => "gone",
        }
    }
}

/// The most recent attempts the failure rate is computed over. Enough that a target failing
/// half its requests at random never shows 90% failed (the chance is below one in 10^8 per
/// attempt), few enough that a busy target that goes down is paused within 45 failures.
pub const WINDOW_ATTEMPTS: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// The share of recent attempts, in percent, that must have failed for the breaker to open;
    /// taken as 1 to 100.
    pub failure_percent: u8,
    /// Recent attempts needed before their failure rate counts. Zero is treated as one, since a
    /// breaker that opens without any failure would never let an attempt start.
    pub min_attempts: u32,
    /// How long an attempt's result stays recent.
    pub window: Duration,
    /// How long the breaker stays open the first time, before its first probe.
    pub open_delay: Duration,
    /// The cap on the open delay, which doubles after each failed probe.
    pub max_open_delay: Duration,
    /// How often `should_log_gone` allows the "target is gone" error to be logged again.
    pub gone_log_interval: Duration,
}

impl Default for BreakerConfig {
    fn default() -> BreakerConfig {
        BreakerConfig {
            failure_percent: 90,
            min_attempts: 5,
            window: Duration::from_secs(60),
            open_delay: Duration::from_secs(5),
            max_open_delay: Duration::from_secs(5 * 60),
            gone_log_interval: Duration::from_secs(10 * 60),
        }
    }
}

/// What an attempt's result was, from the breaker's point of view. The dispatcher maps the
/// retry policy's verdict: `Delivered` is `Success`, `Retry` is `Failure`, `Permanent` is
/// `Rejected` and `Gone` is `Gone`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    Success,
    Failure,
    /// The target answered but refused the payload for good (a permanent 4xx): the target is
    /// healthy, so this counts as an answer, not as a failure.
    Rejected,
    /// 410 Gone: the webhook no longer exists.
    Gone,
}

/// A change of state, returned so the dispatcher can log it and update the gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: TargetState,
    pub to: TargetState,
}

/// Leave to start one attempt, given by `Breaker::try_start` and given back to `record` or
/// `abandon`. It is neither `Clone` nor `Copy`, so an attempt's result is recorded at most once.
#[derive(Debug)]
#[must_use = "give the permit back to `Breaker::record` or `Breaker::abandon`, or a probe is never finished"]
pub struct AttemptPermit {
    /// The breaker's period when the attempt started; see `Breaker::period`.
    period: u64,
}

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    circuit: Circuit,
    /// While closed, the results that decide whether it opens; empty otherwise.
    recent: RecentResults,
    /// How long the breaker stays open this time (it is only read while open). Opening from closed
    /// sets it to `config.open_delay`, which is how a close resets it; a failed probe doubles it.
    open_delay: Duration,
    /// Counts the breaker's openings and closings. An attempt's result counts only if the
    /// breaker has neither opened nor closed since the attempt started, so results of attempts
    /// that were in flight when the breaker opened (or that outlived a whole open spell) are
    /// stale and cannot be mistaken for the probe's, nor count against a target that recovered.
    period: u64,
    /// Once gone, always gone: a config reload builds a new breaker.
    gone: bool,
    gone_last_logged_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
enum Circuit {
    Closed,
    /// Half-open, too, once `open_delay` has passed since `opened_at`: the state depends on the
    /// caller's clock, so it is computed, not stored.
    Open {
        opened_at: Instant,
        probe_in_flight: bool,
    },
}

/// The results of the last attempts (at most `WINDOW_ATTEMPTS`, none older than the window),
/// oldest first, with how many of them failed.
#[derive(Debug, Default)]
struct RecentResults {
    results: VecDeque<(Instant, bool)>,
    n_failed: usize,
}

impl RecentResults {
    fn push(&mut self, at: Instant, failed: bool, window: Duration) {
        self.results.push_back((at, failed));
        self.n_failed += usize::from(failed);
        while let Some(&(oldest_at, oldest_failed)) = self.results.front() {
            if self.results.len() <= WINDOW_ATTEMPTS && at.saturating_duration_since(oldest_at) <= window {
                break;
            }
            self.results.pop_front();
            self.n_failed -= usize::from(oldest_failed);
        }
    }

    /// Whether at least `min_attempts` results are recent and at least `failure_percent` of
    /// them failures.
    fn is_failing(&self, config: &BreakerConfig) -> bool {
        let n_recent = self.results.len();
        let failure_percent = usize::from(config.failure_percent.clamp(1, 100));
        n_recent >= config.min_attempts.max(1) as usize && self.n_failed * 100 >= failure_percent * n_recent
    }

    fn clear(&mut self) {
        self.results.clear();
        self.n_failed = 0;
    }
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Breaker {
        Breaker {
            config,
            circuit: Circuit::Closed,
            recent: RecentResults::default(),
            open_delay: config.open_delay.min(config.max_open_delay),
            period: 0,
            gone: false,
            gone_last_logged_at: None,
        }
    }

    /// Open turns into HalfOpen by itself once the open delay has passed, so the gauge should be
    /// set from this (after `try_start`, say), not only from the transitions `record` returns.
    pub fn state(&self, now: Instant) -> TargetState {
        if self.gone {
            return TargetState::Gone;
        }
        match self.circuit {
            Circuit::Closed => TargetState::Closed,
            Circuit::Open { opened_at, .. } => {
                if now.saturating_duration_since(opened_at) >= self.open_delay {
                    TargetState::HalfOpen
                } else {
                    TargetState::Open
                }
            }
        }
    }

    /// Leave to start an attempt now, or `None` when none may start: while gone, while open, and
    /// while half-open once the one probe has started, until its result is recorded.
    pub fn try_start(&mut self, now: Instant) -> Option<AttemptPermit> {
        let state = self.state(now);
        match (&mut self.circuit, state) {
            (_, TargetState::Gone) => None,
            (Circuit::Closed, _) => Some(AttemptPermit { period: self.period }),
            (Circuit::Open { probe_in_flight, .. }, TargetState::HalfOpen) if !*probe_in_flight => {
                *probe_in_flight = true;
                Some(AttemptPermit { period: self.period })
            }
            (Circuit::Open { .. }, _) => None,
        }
    }

    /// Records an attempt's result; returns the change of state, if there was one.
    ///
    /// While open, only the probe's result counts; results of attempts that started before the
    /// breaker opened are ignored, a success included. Such an attempt can only end soon after
    /// the breaker opened (within the request timeout), when the delay is at its shortest
    /// (`open_delay`, since closing resets it), so ignoring its success costs at most that
    /// delay, whereas closing on it would let a flapping target reopen the breaker over and over.
    ///
    /// `Gone` counts whenever the attempt started: a removed webhook stays removed.
    pub fn record(&mut self, permit: AttemptPermit, result: AttemptResult, now: Instant) -> Option<Transition> {
        let from = self.state(now);
        if from == TargetState::Gone {
            return None;
        }
        if result == AttemptResult::Gone {
            self.gone = true;
            return Some(Transition {
                from,
                to: TargetState::Gone,
            });
        }
        if permit.period != self.period {
            return None;
        }
        let to = match (self.circuit, result) {
            (Circuit::Closed, AttemptResult::Failure) => {
                self.recent.push(now, true, self.config.window);
                if !self.recent.is_failing(&self.config) {
                    return None;
                }
                self.open_delay = self.config.open_delay.min(self.config.max_open_delay);
                self.open(now);
                TargetState::Open
            }
            // A rejected payload still shows the target answering.
            (Circuit::Closed, _) => {
                self.recent.push(now, false, self.config.window);
                return None;
            }
            // The permit is from this open period, so it is the probe's.
            (Circuit::Open { .. }, AttemptResult::Failure) => {
                self.open_delay = self.open_delay.saturating_mul(2).min(self.config.max_open_delay);
                self.open(now);
                TargetState::Open
            }
            // A rejected payload still shows the target answering, so it closes the breaker too.
            (Circuit::Open { .. }, _) => {
                self.circuit = Circuit::Closed;
                self.period += 1;
                TargetState::Closed
            }
        };
        Some(Transition { from, to })
    }

    /// Gives back the permit of an attempt that ended without a result (cancelled), so that an
    /// abandoned probe does not leave the breaker waiting for a result that never comes.
    pub fn abandon(&mut self, permit: AttemptPermit) {
        if permit.period != self.period {
            return;
        }
        if let Circuit::Open { probe_in_flight, .. } = &mut self.circuit {
            *probe_in_flight = false;
        }
    }

    /// When, while open, the probe may start (possibly already past: then it may start now), so
    /// the dispatcher can sleep until then instead of polling. `None` when closed, gone, or while
    /// the probe is in flight: then only a recorded result changes anything.
    pub fn next_probe_at(&self) -> Option<Instant> {
        match self.circuit {
            Circuit::Open {
                opened_at,
                probe_in_flight: false,
            } if !self.gone => opened_at.checked_add(self.open_delay),
            _ => None,
        }
    }

    /// While gone, true at most once per `gone_log_interval`, the first call included, so the
    /// dispatcher can repeat its error about the target without flooding the log.
    pub fn should_log_gone(&mut self, now: Instant) -> bool {
        if !self.gone {
            return false;
        }
        let due = match self.gone_last_logged_at {
            None => true,
            Some(logged_at) => now.saturating_duration_since(logged_at) >= self.config.gone_log_interval,
        };
        if due {
            self.gone_last_logged_at = Some(now);
        }
        due
    }

    /// Opens (again); the failures that opened it are forgotten, so that after the probe's
    /// success the target starts afresh.
    fn open(&mut self, now: Instant) {
        self.circuit = Circuit::Open {
            opened_at: now,
            probe_in_flight: false,
        };
        self.recent.clear();
        self.period += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AttemptResult::{Failure, Rejected, Success};
    use Step::{Abandon, Finish, Refused, Start, Wait};
    use TargetState::{Closed, HalfOpen, Open};

    /// One step of a script: what the dispatcher does, at `offset_ms` after the script's start.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// `try_start` must give a permit; permits are numbered from 0 in the order given.
        Start,
        /// `try_start` must refuse.
        Refused,
        /// Records the result of the numbered attempt.
        Finish(usize, AttemptResult),
        /// Abandons the numbered attempt.
        Abandon(usize),
        /// Does nothing, to check the state at a later time.
        Wait,
    }

    /// The window is long enough that the scripts below, which span seconds, stay within it.
    fn test_config() -> BreakerConfig {
        BreakerConfig {
            failure_percent: 90,
            min_attempts: 3,
            window: Duration::from_millis(60_000),
            open_delay: Duration::from_millis(1_000),
            max_open_delay: Duration::from_millis(4_000),
            gone_log_interval: Duration::from_millis(10_000),
        }
    }

    /// Runs the script against a new breaker, checking the state after each step, and returns
    /// the breaker, the script's start, and the transitions as `(offset_ms, from, to)`.
    fn run(
        config: BreakerConfig,
        script: &[(u64, Step, TargetState)],
    ) -> (Breaker, Instant, Vec<(u64, TargetState, TargetState)>) {
        let start = Instant::now();
        let mut breaker = Breaker::new(config);
        let mut permits: Vec<Option<AttemptPermit>> = Vec::new();
        let mut transitions = Vec::new();
        for (line, &(offset_ms, step, expected)) in script.iter().enumerate() {
            let now = start + Duration::from_millis(offset_ms);
            match step {
                Start => {
                    let permit = breaker.try_start(now);
                    assert!(permit.is_some(), "line {line}: {step:?} at {offset_ms} ms was refused");
                    permits.push(permit);
                }
                Refused => {
                    let permit = breaker.try_start(now);
                    assert!(permit.is_none(), "line {line}: {step:?} at {offset_ms} ms was allowed");
                }
                Finish(attempt, result) => {
                    let permit = permits[attempt].take().expect("each attempt is finished once");
                    if let Some(transition) = breaker.record(permit, result, now) {
                        transitions.push((offset_ms, transition.from, transition.to));
                    }
                }
                Abandon(attempt) => {
                    breaker.abandon(permits[attempt].take().expect("each attempt is finished once"));
                }
                Wait => {}
            }
            assert_eq!(
                breaker.state(now),
                expected,
                "line {line}: state after {step:?} at {offset_ms} ms"
            );
        }
        (breaker, start, transitions)
    }

    fn check(script: &[(u64, Step, TargetState)], expected_transitions: &[(u64, TargetState, TargetState)]) {
        let (_, _, transitions) = run(test_config(), script);
        assert_eq!(transitions, expected_transitions);
    }

    /// The script that opens the breaker at 0 ms: attempts 0, 1 and 2 fail.
    const OPEN_AT_ZERO: [(u64, Step, TargetState); 6] = [
        (0, Start, Closed),
        (0, Finish(0, Failure), Closed),
        (0, Start, Closed),
        (0, Finish(1, Failure), Closed),
        (0, Start, Closed),
        (0, Finish(2, Failure), Open),
    ];

    fn after_opening(rest: &[(u64, Step, TargetState)]) -> Vec<(u64, Step, TargetState)> {
        OPEN_AT_ZERO.iter().chain(rest).copied().collect()
    }

    /// A script of attempts made one at a time, numbered from `first`, the i-th at `at_ms(i)`:
    /// the state is closed after each result but the last, and `last` after it.
    fn one_by_one(
        first: usize,
        at_ms: impl Fn(usize) -> u64,
        results: &[AttemptResult],
        last: TargetState,
    ) -> Vec<(u64, Step, TargetState)> {
        let mut script = Vec::new();
        for (index, &result) in results.iter().enumerate() {
            let after = if index + 1 == results.len() { last } else { Closed };
            script.push((at_ms(index), Start, Closed));
            script.push((at_ms(index), Finish(first + index, result), after));
        }
        script
    }

    /// The index of the result that opened a new breaker, the i-th attempt made and finished at
    /// i ms, one at a time.
    fn first_opening(config: BreakerConfig, results: &[AttemptResult]) -> Option<usize> {
        let start = Instant::now();
        let mut breaker = Breaker::new(config);
        results.iter().enumerate().position(|(index, &result)| {
            let at = start + Duration::from_millis(index as u64);
            let permit = breaker.try_start(at).expect("closed");
            breaker.record(permit, result, at).is_some()
        })
    }

    /// `n` results from a repeating pattern, `F` for a failure and `S` for a success.
    fn repeat(pattern: &str, n: usize) -> Vec<AttemptResult> {
        pattern
            .chars()
            .cycle()
            .take(n)
            .map(|c| if c == 'F' { Failure } else { Success })
            .collect()
    }

    /// `n` results, each a failure with probability `fraction`, from a fixed seed: the same
    /// every run, as random as a flaky target.
    fn random_failures(fraction: f64, n: usize) -> Vec<AttemptResult> {
        let mut state: u64 = 0x5EED;
        (0..n)
            .map(|_| {
                // SplitMix64.
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut mixed = state;
                mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                mixed ^= mixed >> 31;
                let draw = (mixed >> 11) as f64 / (1u64 << 53) as f64;
                if draw < fraction { Failure } else { Success }
            })
            .collect()
    }

    #[test]
    fn states_have_metric_values_and_labels() {
        let expected = [
            (Closed, 0, "closed"),
            (Open, 1, "open"),
            (HalfOpen, 2, "half_open"),
            (TargetState::Gone, 3, "gone"),
        ];
        for (state, value, label) in expected {
            assert_eq!((state.metric_value(), state.label()), (value, label));
        }
    }

    #[test]
    fn default_config_is_documented() {
        let config = BreakerConfig::default();
        assert_eq!(config.failure_percent, 90);
        assert_eq!(config.min_attempts, 5);
        assert_eq!(config.window, Duration::from_secs(60));
        assert_eq!(config.open_delay, Duration::from_secs(5));
        assert_eq!(config.max_open_delay, Duration::from_secs(300));
        assert_eq!(config.gone_log_interval, Duration::from_secs(600));
    }

    #[test]
    fn opens_once_min_attempts_all_failed() {
        check(&OPEN_AT_ZERO, &[(0, Closed, Open)]);
        // With attempts in flight together, it is the third failure that opens, not the third
        // start, and later starts are refused.
        check(
            &[
                (0, Start, Closed),
                (0, Start, Closed),
                (0, Start, Closed),
                (10, Finish(0, Failure), Closed),
                (20, Finish(1, Failure), Closed),
                (30, Start, Closed),
                (40, Finish(2, Failure), Open),
                (50, Refused, Open),
            ],
            &[(40, Closed, Open)],
        );
    }

    #[test]
    fn a_success_counts_against_the_failure_rate() {
        // After a success, 9 failures make 90% of 10 attempts.
        let mut results = vec![Failure, Failure, Success];
        results.extend([Failure; 6]);
        check(&one_by_one(0, |_| 0, &results, Closed), &[]);
        results.push(Failure);
        check(&one_by_one(0, |_| 0, &results, Open), &[(0, Closed, Open)]);
    }

    #[test]
    fn a_rejected_payload_counts_as_an_answer_and_never_opens() {
        let results = [Failure, Failure, Rejected, Failure, Failure];
        check(&one_by_one(0, |_| 0, &results, Closed), &[]);
        check(&one_by_one(0, |_| 0, &[Rejected; 10], Closed), &[]);
    }

    #[test]
    fn a_flaky_target_is_never_paused() {
        let config = BreakerConfig {
            min_attempts: 5,
            ..test_config()
        };
        // A healthy target turns flaky; attempts finish a millisecond apart, as under load.
        for (name, flaky) in [
            ("30% at random", random_failures(0.3, 20_000)),
            ("50% at random", random_failures(0.5, 20_000)),
            ("80%, every fifth succeeds", repeat("FFFFS", 20_000)),
        ] {
            let mut results = vec![Success; 100];
            results.extend(flaky);
            assert_eq!(first_opening(config, &results), None, "{name}");
        }
    }

    #[test]
    fn a_busy_target_that_goes_down_is_paused_at_the_failure_rate() {
        // The window holds the last 50 attempts: after 50 successes, the 45th failure makes 90%.
        let mut results = vec![Success; 50];
        results.extend([Failure; 44]);
        check(&one_by_one(0, |_| 0, &results, Closed), &[]);
        results.push(Failure);
        check(&one_by_one(0, |_| 0, &results, Open), &[(0, Closed, Open)]);
        // One success in 20 still opens it, within the window's 50 attempts.
        let mut results = vec![Success; 50];
        results.extend(repeat("FFFFFFFFFFFFFFFFFFFS", 200));
        let opened_at = first_opening(test_config(), &results);
        assert!(opened_at.is_some_and(|index| index < 100), "{opened_at:?}");
    }

    #[test]
    fn results_older_than_the_window_are_forgotten() {
        let config = test_config();
        let window_ms = config.window.as_millis() as u64;
        // Successes a window ago no longer hide that the target is down now.
        let mut script = one_by_one(0, |_| 0, &[Success; 50], Closed);
        script.extend(one_by_one(50, |_| window_ms + 1, &[Failure; 3], Open));
        check(&script, &[(window_ms + 1, Closed, Open)]);
        // Nor do failures a window ago count towards min_attempts.
        let mut script = one_by_one(0, |_| 0, &[Failure; 2], Closed);
        script.extend(one_by_one(2, |_| window_ms + 1, &[Failure; 2], Closed));
        script.extend(one_by_one(4, |_| window_ms + 2, &[Failure], Open));
        check(&script, &[(window_ms + 2, Closed, Open)]);
    }

    #[test]
    fn turns_half_open_once_the_delay_has_passed() {
        check(
            &after_opening(&[
                (1, Refused, Open),
                (999, Refused, Open),
                (1_000, Wait, HalfOpen),
                (5_000, Wait, HalfOpen),
            ]),
            &[(0, Closed, Open)],
        );
    }

    #[test]
    fn lets_one_probe_start_while_half_open() {
        check(
            &after_opening(&[
                (1_000, Start, HalfOpen),
                (1_000, Refused, HalfOpen),
                (2_000, Refused, HalfOpen),
                (60_000, Refused, HalfOpen),
            ]),
            &[(0, Closed, Open)],
        );
    }

    #[test]
    fn a_probe_that_succeeds_closes_the_breaker_and_resets_the_delay() {
        check(
            &after_opening(&[
                // A failed probe first doubles the delay to 2 s.
                (1_000, Start, HalfOpen),
                (1_000, Finish(3, Failure), Open),
                (3_000, Start, HalfOpen),
                (3_100, Finish(4, Success), Closed),
                (3_100, Start, Closed),
                (3_100, Start, Closed),
                // The count starts again from zero: two failures do not open.
                (3_200, Finish(5, Failure), Closed),
                (3_200, Finish(6, Failure), Closed),
                (3_200, Start, Closed),
                (3_300, Finish(7, Failure), Open),
                // The delay is back to the first one.
                (4_299, Refused, Open),
                (4_300, Start, HalfOpen),
            ]),
            &[
                (0, Closed, Open),
                (1_000, HalfOpen, Open),
                (3_100, HalfOpen, Closed),
                (3_300, Closed, Open),
            ],
        );
    }

    #[test]
    fn a_probe_whose_payload_is_rejected_closes_the_breaker() {
        check(
            &after_opening(&[(1_000, Start, HalfOpen), (1_100, Finish(3, Rejected), Closed)]),
            &[(0, Closed, Open), (1_100, HalfOpen, Closed)],
        );
    }

    #[test]
    fn a_probe_that_fails_reopens_with_the_delay_doubled_up_to_the_cap() {
        check(
            &after_opening(&[
                (1_000, Start, HalfOpen),
                (1_000, Finish(3, Failure), Open),
                (2_999, Refused, Open),
                (3_000, Start, HalfOpen),
                (3_000, Finish(4, Failure), Open),
                (6_999, Refused, Open),
                (7_000, Start, HalfOpen),
                (7_000, Finish(5, Failure), Open),
                // 8 s would be next, but the cap is 4 s.
                (10_999, Refused, Open),
                (11_000, Start, HalfOpen),
                (11_500, Finish(6, Failure), Open),
                (15_499, Refused, Open),
                (15_500, Start, HalfOpen),
            ]),
            &[
                (0, Closed, Open),
                (1_000, HalfOpen, Open),
                (3_000, HalfOpen, Open),
                (7_000, HalfOpen, Open),
                (11_500, HalfOpen, Open),
            ],
        );
    }

    #[test]
    fn an_abandoned_probe_lets_another_probe_start() {
        check(
            &after_opening(&[
                (1_000, Start, HalfOpen),
                (1_000, Refused, HalfOpen),
                (1_100, Abandon(3), HalfOpen),
                (1_100, Start, HalfOpen),
                (1_200, Finish(4, Success), Closed),
            ]),
            &[(0, Closed, Open), (1_200, HalfOpen, Closed)],
        );
    }

    #[test]
    fn abandoning_a_stray_attempt_does_not_free_the_probe() {
        check(
            &[
                (0, Start, Closed),
                (0, Start, Closed),
                (0, Start, Closed),
                (0, Start, Closed),
                (0, Finish(0, Failure), Closed),
                (0, Finish(1, Failure), Closed),
                (0, Finish(2, Failure), Open),
                (1_000, Start, HalfOpen),
                (1_100, Abandon(3), HalfOpen),
                (1_100, Refused, HalfOpen),
            ],
            &[(0, Closed, Open)],
        );
    }

    #[test]
    fn next_probe_at_says_when_the_probe_may_start() {
        let (mut breaker, start, _) = run(test_config(), &[(0, Start, Closed)]);
        assert_eq!(breaker.next_probe_at(), None, "closed");

        let at = |offset_ms: u64| start + Duration::from_millis(offset_ms);
        let fail_one = |breaker: &mut Breaker, offset_ms: u64| {
            let permit = breaker.try_start(at(offset_ms)).expect("an attempt may start");
            breaker.record(permit, Failure, at(offset_ms))
        };
        for offset_ms in [100, 200, 300] {
            fail_one(&mut breaker, offset_ms);
        }
        assert_eq!(breaker.next_probe_at(), Some(at(1_300)), "open");
        assert_eq!(breaker.state(at(1_400)), HalfOpen);
        assert_eq!(breaker.next_probe_at(), Some(at(1_300)), "half-open, probe not started");

        let probe = breaker.try_start(at(1_400)).expect("the probe may start");
        assert_eq!(breaker.next_probe_at(), None, "probe in flight");
        breaker.record(probe, Failure, at(1_500));
        assert_eq!(breaker.next_probe_at(), Some(at(3_500)), "reopened for twice the delay");

        fail_one(&mut breaker, 3_500);
        fail_one(&mut breaker, 7_500);
        assert_eq!(
            breaker.next_probe_at(),
            Some(at(11_500)),
            "reopened for the capped delay"
        );

        let probe = breaker.try_start(at(11_500)).expect("the probe may start");
        breaker.record(probe, AttemptResult::Gone, at(11_600));
        assert_eq!(breaker.next_probe_at(), None, "gone");
    }

    #[test]
    fn gone_pauses_the_target_for_good() {
        use TargetState::Gone;
        let gone = AttemptResult::Gone;
        check(
            &[
                (0, Start, Closed),
                (0, Start, Closed),
                (10, Finish(0, gone), Gone),
                (20, Refused, Gone),
                // Nothing that arrives later revives it.
                (30, Finish(1, Success), Gone),
                (1_000_000, Refused, Gone),
            ],
            &[(10, Closed, Gone)],
        );
        check(
            &after_opening(&[
                (1_000, Start, HalfOpen),
                (1_100, Finish(3, gone), Gone),
                (9_000, Refused, Gone),
            ]),
            &[(0, Closed, Open), (1_100, HalfOpen, Gone)],
        );
        // A 410 from an attempt that started before the breaker opened counts all the same.
        check(
            &[
                (0, Start, Closed),
                (0, Start, Closed),
                (0, Start, Closed),
                (0, Start, Closed),
                (0, Finish(0, Failure), Closed),
                (0, Finish(1, Failure), Closed),
                (0, Finish(2, Failure), Open),
                (500, Finish(3, gone), Gone),
            ],
            &[(0, Closed, Open), (500, Open, Gone)],
        );
    }

    #[test]
    fn gone_is_logged_once_per_interval() {
        let (mut breaker, start, _) = run(test_config(), &[(0, Start, Closed)]);
        let at = |offset_ms: u64| start + Duration::from_millis(offset_ms);
        assert!(!breaker.should_log_gone(at(0)), "not gone yet");

        let permit = breaker.try_start(at(0)).expect("an attempt may start");
        breaker.record(permit, AttemptResult::Gone, at(100));
        let expected = [
            (100, true),
            (100, false),
            (5_000, false),
            (10_099, false),
            (10_100, true),
            (10_200, false),
            (20_099, false),
            (25_000, true),
        ];
        for (offset_ms, should_log) in expected {
            assert_eq!(breaker.should_log_gone(at(offset_ms)), should_log, "at {offset_ms} ms");
        }
    }

    #[test]
    fn results_of_attempts_started_before_opening_are_ignored() {
        // Attempts 3 to 6 were in flight when the breaker opened.
        let in_flight_when_opened = [
            (0, Start, Closed),
            (0, Start, Closed),
            (0, Start, Closed),
            (0, Start, Closed),
            (0, Start, Closed),
            (0, Start, Closed),
            (0, Start, Closed),
            (0, Finish(0, Failure), Closed),
            (0, Finish(1, Failure), Closed),
            (0, Finish(2, Failure), Open),
        ];
        let script = |rest: &[(u64, Step, TargetState)]| -> Vec<(u64, Step, TargetState)> {
            in_flight_when_opened.iter().chain(rest).copied().collect()
        };
        // While open, a late success does not close the breaker and a late failure does not
        // extend the delay.
        check(
            &script(&[
                (100, Finish(3, Success), Open),
                (200, Finish(4, Failure), Open),
                (300, Finish(5, Rejected), Open),
                (1_000, Start, HalfOpen),
            ]),
            &[(0, Closed, Open)],
        );
        // While the probe is in flight, late results neither decide nor free the probe.
        check(
            &script(&[
                (1_000, Start, HalfOpen),
                (1_100, Finish(3, Success), HalfOpen),
                (1_100, Refused, HalfOpen),
                (1_200, Finish(4, Failure), HalfOpen),
                (1_200, Refused, HalfOpen),
                (1_300, Finish(7, Success), Closed),
            ]),
            &[(0, Closed, Open), (1_300, HalfOpen, Closed)],
        );
        // After the probe closed the breaker, late failures do not count against the target.
        check(
            &script(&[
                (1_000, Start, HalfOpen),
                (1_100, Finish(7, Success), Closed),
                (1_200, Finish(3, Failure), Closed),
                (1_200, Finish(4, Failure), Closed),
                (1_200, Finish(5, Failure), Closed),
                (1_200, Finish(6, Failure), Closed),
                (1_300, Start, Closed),
                (1_300, Finish(8, Failure), Closed),
            ]),
            &[(0, Closed, Open), (1_100, HalfOpen, Closed)],
        );
    }

    #[test]
    fn zero_min_attempts_opens_on_the_first_failure() {
        let config = BreakerConfig {
            min_attempts: 0,
            ..test_config()
        };
        let (_, _, transitions) = run(config, &[(0, Start, Closed), (0, Finish(0, Failure), Open)]);
        assert_eq!(transitions, [(0, Closed, Open)]);
    }
}
