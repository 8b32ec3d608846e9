//! Delivery: one dispatcher per target takes its pending deliveries and POSTs them, retrying by
//! the target's policy, within its `max_in_flight`, rate limit and circuit breaker. A slow or
//! dead target holds at most `max_in_flight` requests and never touches another target.

pub mod breaker;
pub mod dispatcher;
pub mod request;
pub mod retry;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64_STANDARD;

use percent_encoding::percent_decode_str;
use tokio_util::sync::CancellationToken;

use crate::config::{BodyConfig, RateLimit, RetryConfig, TargetConfig};
use crate::delivery::breaker::BreakerConfig;
use crate::delivery::dispatcher::Dispatcher;
use crate::delivery::request::Secrets;
use crate::event::TargetId;
use crate::queue::outbox::Outbox;
use crate::secret_headers::{Owner, SecretHeaders};
use crate::signing::SigningKey;
use crate::telemetry::TargetTelemetry;

/// A target as the hot path uses it, built from its config.
pub struct TargetRuntime {
    pub id: TargetId,
    pub url: reqwest::Url,
    /// The URL as logs may show it: scheme and host only, unless the config marks it safe.
    pub display_url: String,
    /// Its configured headers; those from secret files are made again after a 401 or 403.
    pub headers: SecretHeaders,
    pub timeout: Duration,
    pub max_in_flight: usize,
    /// Deliveries held in memory with the memory store; beyond it they are dropped for this target.
    pub queue_capacity: usize,
    pub body: BodyConfig,
    pub retry: RetryConfig,
    pub rate_limit: Option<RateLimit>,
    pub ordered: bool,
    pub signing_key: Option<Arc<SigningKey>>,
    pub breaker: BreakerConfig,
    pub telemetry: Arc<TargetTelemetry>,
    /// Removed from response excerpts before they are logged or stored.
    pub secrets: Secrets,
}

impl TargetRuntime {
    pub fn new(id: TargetId, config: &TargetConfig, telemetry: Arc<TargetTelemetry>) -> anyhow::Result<TargetRuntime> {
        let headers = SecretHeaders::new(Owner::Target(Arc::clone(&telemetry.name)), &config.headers)?;
        Ok(TargetRuntime {
            id,
            url: config.url.0.clone(),
            display_url: display_url(&config.url.0, config.safe_url),
            headers,
            timeout: config.timeout,
            max_in_flight: config.max_in_flight.0,
            queue_capacity: config.queue_capacity.0,
            body: config.body.clone(),
            retry: config.retry.clone(),
            rate_limit: config.rate_limit,
            ordered: config.ordered,
            signing_key: config.signing_secret.as_ref().map(|secret| Arc::clone(&secret.0)),
            breaker: BreakerConfig {
                failure_percent: config.circuit_breaker.failure_rate.0,
                min_attempts: u32::try_from(config.circuit_breaker.min_attempts.0).unwrap_or(u32::MAX),
                window: config.circuit_breaker.window,
                open_delay: config.circuit_breaker.open_delay,
                max_open_delay: config.circuit_breaker.max_open_delay,
                ..BreakerConfig::default()
            },
            telemetry,
            secrets: secrets_of(config),
        })
    }
}

/// A header value, and the credentials after a scheme such as `Bearer`.
pub fn header_secrets(value: &str) -> impl Iterator<Item = String> {
    let credentials = value
        .trim()
        .split_once(' ')
        .map(|(_scheme, credentials)| credentials.trim().to_owned());
    std::iter::once(value.to_owned()).chain(credentials)
}

/// Every secret value of a target: header values (and the credentials after a scheme such as
/// `Bearer`), the URL's user information (also as the Basic authorization made of it), the
/// URL's path and query unless `safe_url` (a catch-hook URL is its own credential), and the
/// signing secret.
fn secrets_of(config: &TargetConfig) -> Secrets {
    // (Values that a secret file holds later are added as they are read: see request.rs.)
    let mut values = Vec::new();
    for value in config.headers.values() {
        values.extend(header_secrets(&value.0));
    }
    let url = &config.url.0;
    let decode = |text: &str| percent_decode_str(text).decode_utf8_lossy().into_owned();
    if !url.username().is_empty() || url.password().is_some() {
        let (username, password) = (decode(url.username()), url.password().map(decode));
        // As reqwest sends it: `Authorization: Basic base64(user:password)`.
        values.push(BASE64_STANDARD.encode(format!("{username}:{}", password.as_deref().unwrap_or(""))));
        match (url.password(), password) {
            (Some(raw), Some(decoded)) => values.extend([raw.to_owned(), decoded]),
            // Without a password, the user name is the credential.
            _ => values.extend([url.username().to_owned(), username]),
        }
    }
    if !config.safe_url {
        if url.path() != "/" {
            values.push(url.path().to_owned());
        }
        if let Some(query) = url.query() {
            values.push(query.to_owned());
            values.extend(url.query_pairs().map(|(_, value)| value.into_owned()));
        }
    }
    if let Some(secret) = &config.signing_secret {
        values.push(secret.text().to_owned());
        values.extend(secret.text().strip_prefix("whsec_").map(str::to_owned));
    }
    Secrets::new(values)
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

/// Starts the target's dispatcher on its outbox.
pub fn spawn_dispatcher(
    target: &Arc<TargetRuntime>,
    outbox: Outbox,
    client: &reqwest::Client,
    stop: &CancellationToken,
    lease: Option<crate::queue::lease::LeaseWatch>,
) -> tokio::task::JoinHandle<()> {
    let dispatcher = Dispatcher::new(Arc::clone(target), outbox, client.clone(), lease);
    tokio::spawn(dispatcher.run(stop.clone()))
}
