//! The retry policy: which responses are worth another attempt, and when. Pure: no IO.

use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::config::RetryConfig;

/// What one attempt's result means for the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Worth another attempt; `retry_after` is the server's own request, if it made one.
    Retry {
        retry_after: Option<Duration>,
    },
    Permanent,
}

/// 2xx is delivered. 408, 429 and 5xx other than 501 are retried; every other status is a
/// permanent failure (a 3xx is not followed: a webhook that redirects a POST is misconfigured).
pub fn verdict_for_status(status: u16, retry_after: Option<Duration>) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        408 | 429 => Verdict::Retry { retry_after },
        501 => Verdict::Permanent,
        500..=599 => Verdict::Retry { retry_after },
        _ => Verdict::Permanent,
    }
}

/// Transport errors (refused, reset, timed out) are always worth another attempt.
pub fn verdict_for_transport_error() -> Verdict {
    Verdict::Retry { retry_after: None }
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Why a delivery's retries ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    Attempts,
    Elapsed,
}

impl Exhausted {
    pub fn limit(self) -> &'static str {
        match self {
            Exhausted::Attempts => "max_attempts",
            Exhausted::Elapsed => "max_elapsed",
        }
    }
}

/// The delay before the next attempt of a delivery that has had `n_attempts` attempts, the
/// first of them `elapsed` ago, or why there is none. The schedule is exponential from
/// `initial_delay`, doubling to `max_delay`, each delay plus up to the same again of random
/// jitter; a server's `Retry-After` replaces the computed delay. It depends only on the attempt
/// count, which the store keeps, so a restart resumes the schedule where it was.
pub fn next_delay(
    config: &RetryConfig,
    n_attempts: u32,
    elapsed: Duration,
    retry_after: Option<Duration>,
) -> Result<Duration, Exhausted> {
    if n_attempts as usize >= config.max_attempts.0 {
        return Err(Exhausted::Attempts);
    }
    let delay = match retry_after {
        Some(retry_after) => retry_after,
        None => ExponentialBuilder::new()
            .with_min_delay(config.initial_delay)
            .with_max_delay(config.max_delay)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(n_attempts.saturating_sub(1) as usize)
            .unwrap_or(config.max_delay)
            // backon adds its jitter on top of the delay, beyond the maximum.
            .min(config.max_delay),
    };
    if elapsed.saturating_add(delay) > config.max_elapsed {
        return Err(Exhausted::Elapsed);
    }
    Ok(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_delay_exceeds_max_delay_jitter_included() {
        let config = RetryConfig {
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(2),
            ..RetryConfig::default()
        };
        for n_attempts in 1..config.max_attempts.0 as u32 {
            let delay = next_delay(&config, n_attempts, Duration::ZERO, None).unwrap();
            assert!(delay <= config.max_delay, "attempt {n_attempts}: {delay:?}");
        }
    }
    use crate::config::PositiveCount;

    #[test]
    fn statuses_are_classified() {
        let check = |status: u16, expected: Verdict| {
            assert_eq!(verdict_for_status(status, None), expected, "{status}");
        };
        let retry = Verdict::Retry { retry_after: None };
        for status in [200, 201, 202, 204, 299] {
            check(status, Verdict::Delivered);
        }
        for status in [408, 429, 500, 502, 503, 504, 599] {
            check(status, retry);
        }
        for status in [301, 302, 400, 401, 403, 404, 409, 410, 413, 422, 501] {
            check(status, Verdict::Permanent);
        }
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(30)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    fn config(max_attempts: usize, max_elapsed_secs: u64) -> RetryConfig {
        RetryConfig {
            max_attempts: PositiveCount(max_attempts),
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
            max_elapsed: Duration::from_secs(max_elapsed_secs),
        }
    }

    #[test]
    fn delays_grow_with_jitter_up_to_the_cap() {
        let config = config(100, 100_000);
        let bases = [1, 2, 4, 8, 8, 8];
        for (attempt, base) in bases.iter().enumerate() {
            let delay = next_delay(&config, attempt as u32 + 1, Duration::ZERO, None).unwrap();
            let base = Duration::from_secs(*base);
            assert!(
                delay >= base && delay <= base * 2,
                "attempt {attempt}: {delay:?} vs base {base:?}"
            );
        }
    }

    #[test]
    fn attempts_and_elapsed_time_end_the_schedule() {
        let three_attempts = config(3, 100_000);
        assert!(next_delay(&three_attempts, 1, Duration::ZERO, None).is_ok());
        assert!(next_delay(&three_attempts, 2, Duration::ZERO, None).is_ok());
        assert_eq!(
            next_delay(&three_attempts, 3, Duration::ZERO, None),
            Err(Exhausted::Attempts)
        );

        let one_minute = config(100, 60);
        assert_eq!(
            next_delay(&one_minute, 1, Duration::from_secs(59), None),
            Err(Exhausted::Elapsed)
        );
    }

    #[test]
    fn retry_after_replaces_the_computed_delay() {
        let delay = next_delay(&config(100, 100_000), 1, Duration::ZERO, Some(Duration::from_secs(42)));
        assert_eq!(delay, Ok(Duration::from_secs(42)));
    }
}
