//! Delivery: each target's workers take deliveries from its queue and POST them, retrying by
//! the target's policy. A target has `max_in_flight` workers, so a slow or dead target holds at
//! most that many requests and never touches another target's workers.

pub mod request;
pub mod retry;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{BodyConfig, RetryConfig, TargetConfig};
use crate::delivery::request::Problem;
use crate::delivery::retry::{Exhausted, RetrySchedule, Verdict};
use crate::event::TargetId;
use crate::queue::{Delivery, QueueReceiver};
use crate::telemetry::TargetTelemetry;

/// A target as the hot path uses it, built from its config.
pub struct TargetRuntime {
    pub id: TargetId,
    pub url: reqwest::Url,
    /// The URL as logs may show it: scheme and host only, unless the config marks it safe.
    pub display_url: String,
    pub headers: HeaderMap,
    /// `X-Relay-Stream` values, indexed by `StreamId`, built once.
    pub stream_header_values: Vec<HeaderValue>,
    pub timeout: Duration,
    pub max_in_flight: usize,
    pub body: BodyConfig,
    pub retry: RetryConfig,
    pub telemetry: TargetTelemetry,
}

impl TargetRuntime {
    pub fn new(
        id: TargetId,
        config: &TargetConfig,
        stream_names: &[Arc<str>],
        telemetry: TargetTelemetry,
    ) -> anyhow::Result<TargetRuntime> {
        let mut headers = HeaderMap::new();
        // An empty value (an unset `${VAR:-}`) leaves the header out.
        for (name, value) in config.headers.iter().filter(|(_, value)| !value.0.is_empty()) {
            let header_name = http::HeaderName::from_bytes(name.0.as_bytes())?;
            // The value may be a secret: the error names the header, never the value.
            let header_value = HeaderValue::from_str(&value.0).map_err(|_| {
                anyhow::anyhow!(
                    "target {}: header {} has a character that is not allowed in an HTTP header",
                    telemetry.name,
                    name.0
                )
            })?;
            headers.insert(header_name, header_value);
        }
        let stream_header_values = stream_names
            .iter()
            .map(|name| HeaderValue::from_str(name))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| anyhow::anyhow!("a stream name is not a valid HTTP header value"))?;
        Ok(TargetRuntime {
            id,
            url: config.url.0.clone(),
            display_url: display_url(&config.url.0, config.safe_url),
            headers,
            stream_header_values,
            timeout: config.timeout,
            max_in_flight: config.max_in_flight.0,
            body: config.body.clone(),
            retry: config.retry.clone(),
            telemetry,
        })
    }
}

/// Scheme and host (and port) only, unless `safe` says the whole URL may be shown.
pub fn display_url(url: &reqwest::Url, safe: bool) -> String {
    if safe {
        return url.to_string();
    }
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{}://{host}:{port}/…", url.scheme()),
        (Some(host), None) => format!("{}://{host}/…", url.scheme()),
        _ => format!("{}://…", url.scheme()),
    }
}

/// Starts the target's workers. They stop when the queue is closed and empty, or when `stop`
/// is cancelled (then a delivery waiting to retry, or mid-request, is abandoned and counted).
pub fn spawn_workers(
    target: &Arc<TargetRuntime>,
    client: &reqwest::Client,
    queue: &QueueReceiver,
    stop: &CancellationToken,
    workers: &mut JoinSet<()>,
) {
    for _ in 0..target.max_in_flight {
        let (target, client, queue, stop) = (Arc::clone(target), client.clone(), queue.clone(), stop.clone());
        workers.spawn(async move {
            loop {
                let delivery = tokio::select! {
                    biased;
                    () = stop.cancelled() => return,
                    delivery = queue.next() => match delivery {
                        Some(delivery) => delivery,
                        None => return,
                    },
                };
                target.telemetry.in_flight.inc();
                deliver(&client, &target, delivery, &stop).await;
                target.telemetry.in_flight.dec();
            }
        });
    }
}

/// Attempts one delivery until it succeeds, fails permanently, runs out of retries, or is
/// abandoned at shutdown.
async fn deliver(client: &reqwest::Client, target: &TargetRuntime, delivery: Delivery, stop: &CancellationToken) {
    let telemetry = &target.telemetry;
    let event = &delivery.event;
    let started = Instant::now();
    let mut schedule = RetrySchedule::new(&target.retry);
    let mut n_attempts = 0u32;
    loop {
        n_attempts += 1;
        let attempt_started = Instant::now();
        let outcome = tokio::select! {
            biased;
            () = stop.cancelled() => {
                telemetry.abandoned(1, "a delivery in progress was abandoned at shutdown");
                return;
            }
            outcome = request::attempt(client, target, event) => outcome,
        };
        telemetry.attempt_finished(attempt_started.elapsed());
        let (verdict, problem) = match outcome {
            Ok(()) => {
                telemetry.delivered();
                return;
            }
            Err(failure) => failure,
        };
        let retry_after = match verdict {
            Verdict::Retry { retry_after } => retry_after,
            Verdict::Delivered | Verdict::Permanent => {
                telemetry.failed(&event.id, n_attempts, &problem);
                return;
            }
        };
        let delay = match schedule.next_delay(n_attempts, started.elapsed(), retry_after) {
            Ok(delay) => delay,
            Err(exhausted) => {
                telemetry.failed(&event.id, n_attempts, &GaveUp { problem, exhausted });
                return;
            }
        };
        telemetry.retrying(&event.id, n_attempts, &problem, delay);
        tokio::select! {
            biased;
            () = stop.cancelled() => {
                telemetry.abandoned(1, "a delivery waiting to retry was abandoned at shutdown");
                return;
            }
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// The last problem of a delivery whose retries ran out, and which limit ended them.
struct GaveUp {
    problem: Problem,
    exhausted: Exhausted,
}

impl std::fmt::Display for GaveUp {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let limit = match self.exhausted {
            Exhausted::Attempts => "max_attempts",
            Exhausted::Elapsed => "max_elapsed",
        };
        write!(formatter, "{}; gave up after reaching {limit}", self.problem)
    }
}
