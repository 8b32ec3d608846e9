//! The configuration file: the only serde types in the crate.
//!
//! `parse` turns YAML text into a validated [`Config`]. Every check that can point at a place in
//! the file runs during deserialization, so serde_yaml attaches the line and column of the
//! offending node to the error. Checks that need to know the names of all streams and targets
//! (a route naming an unknown target, say) read them from a per-thread [`ParseContext`] that
//! `parse` fills in a first, lenient pass over the same text.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny};
use url::Url;
use wildmatch::WildMatch;

/// Looks up an environment variable by name; tests pass their own.
pub type EnvLookup = dyn Fn(&str) -> Option<String>;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the file: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{origin}:{line}:{column}: {message}")]
    Located {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{origin}: {message}")]
    Unlocated { origin: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub admin: AdminConfig,
    pub streams: BTreeMap<String, StreamConfig>,
    pub targets: BTreeMap<String, TargetConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    /// Credentials written literally in the file, not as `${...}` references.
    #[serde(skip)]
    pub n_literal_secrets: usize,
}

/// Where deliveries wait until their target accepts them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default)]
    pub mode: StorageMode,
    /// The directory of the SQLite database (`relay.db`), created when missing.
    #[serde(default = "default_storage_path")]
    pub path: Text,
    /// At most this many deliveries wait; at the limit the streams pause.
    #[serde(default = "default_max_pending")]
    pub max_pending: PositiveCount,
    /// The database file grows to at most this size; at the limit the streams pause, as they do
    /// when the disk is full.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: bytesize::ByteSize,
    /// Dead letters older than this are purged.
    #[serde(default = "default_dead_letter_retention", with = "humantime_serde")]
    pub dead_letter_retention: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            mode: StorageMode::default(),
            path: default_storage_path(),
            max_pending: default_max_pending(),
            max_bytes: default_max_bytes(),
            dead_letter_retention: default_dead_letter_retention(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    /// Every delivery is committed to SQLite before it is attempted: nothing accepted is lost.
    #[default]
    Sqlite,
    /// Deliveries live in memory only: faster, but a crash loses what was queued.
    Memory,
}

fn default_storage_path() -> Text {
    Text("./data".to_owned())
}

fn default_max_pending() -> PositiveCount {
    PositiveCount(1_000_000)
}

fn default_max_bytes() -> bytesize::ByteSize {
    bytesize::ByteSize::gib(1)
}

fn default_dead_letter_retention() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// When set, `/metrics` requires `Authorization: Bearer <token>`.
    #[serde(default)]
    pub token: Option<SecretText>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            token: None,
        }
    }
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long in-flight deliveries may take to finish after SIGTERM.
    #[serde(default = "default_grace_period", with = "humantime_serde")]
    pub grace_period: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace_period: default_grace_period(),
        }
    }
}

fn default_grace_period() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub url: HttpUrl,
    #[serde(default)]
    pub headers: BTreeMap<HeaderName, SecretText>,
    /// JSON pointers tried in order to find the event type in the data.
    #[serde(default)]
    pub event_type: Vec<JsonPointer>,
    #[serde(default = "default_event_type")]
    pub default_event_type: Text,
    /// Event types, or literal data, that are connection noise and never routed.
    #[serde(default)]
    pub keepalive: Vec<Text>,
    /// With nothing at all received for this long, the connection is dropped and remade.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Events whose data is larger than this are dropped and counted.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    /// Make-before-break: once a connection is this old, a second one is opened, and the first
    /// is closed once the second carries data. For servers that close connections at a fixed
    /// age and keep no history (the chat API closes after 30 minutes); off when unset.
    #[serde(default, with = "humantime_serde")]
    pub rotate_after: Option<Duration>,
}

fn default_event_type() -> Text {
    Text("message".to_owned())
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(45)
}

fn default_max_event_bytes() -> usize {
    1024 * 1024
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectConfig {
    /// First delay after a failed connection; it doubles, with jitter, up to `max_delay`.
    #[serde(default = "default_reconnect_initial", with = "humantime_serde")]
    pub initial_delay: Duration,
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub max_delay: Duration,
    /// Delay after a 401 or 403: credentials rarely fix themselves within seconds.
    #[serde(default = "default_auth_delay", with = "humantime_serde")]
    pub auth_failure_delay: Duration,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            initial_delay: default_reconnect_initial(),
            max_delay: default_reconnect_max(),
            auth_failure_delay: default_auth_delay(),
        }
    }
}

fn default_reconnect_initial() -> Duration {
    Duration::from_millis(500)
}

fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

fn default_auth_delay() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub url: HttpUrl,
    /// Show the whole URL in logs and `check`; by default only scheme and host are shown,
    /// because a catch-hook URL is its own credential.
    #[serde(default)]
    pub safe_url: bool,
    #[serde(default)]
    pub headers: BTreeMap<HeaderName, SecretText>,
    #[serde(default = "default_target_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: PositiveCount,
    /// Deliveries waiting for this target; when full, the streams feeding it pause.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: PositiveCount,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub body: BodyConfig,
    /// Requests per interval, smoothed by a token bucket: `30/s`, `100/m`, `1000/h`.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Deliver each stream's events in order: one in flight per stream, retries included.
    #[serde(default)]
    pub ordered: bool,
    /// A Standard Webhooks secret (`whsec_...`): requests get webhook-id, webhook-timestamp and
    /// webhook-signature headers.
    #[serde(default)]
    pub signing_secret: Option<SigningSecret>,
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Consecutive failed attempts that pause the target.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: PositiveCount,
    /// First pause before a probe; it doubles after each failed probe, up to `max_open_delay`.
    #[serde(default = "default_open_delay", with = "humantime_serde")]
    pub open_delay: Duration,
    #[serde(default = "default_max_open_delay", with = "humantime_serde")]
    pub max_open_delay: Duration,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            failure_threshold: default_failure_threshold(),
            open_delay: default_open_delay(),
            max_open_delay: default_max_open_delay(),
        }
    }
}

fn default_failure_threshold() -> PositiveCount {
    PositiveCount(5)
}

fn default_open_delay() -> Duration {
    Duration::from_secs(5)
}

fn default_max_open_delay() -> Duration {
    Duration::from_secs(300)
}

/// `N/s`, `N/m` or `N/h`: at most N requests per second, minute or hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub n_requests: u32,
    pub per: Duration,
}

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |text| {
            let problem = || format!("rate_limit `{text}` is not a rate such as 30/s, 100/m or 1000/h");
            let (count, unit) = text.split_once('/').ok_or_else(problem)?;
            let n_requests: u32 = count.trim().parse().map_err(|_| problem())?;
            let per = match unit.trim() {
                "s" => Duration::from_secs(1),
                "m" => Duration::from_secs(60),
                "h" => Duration::from_secs(3600),
                _ => return Err(problem()),
            };
            if n_requests == 0 {
                return Err("rate_limit must allow at least 1 request".to_owned());
            }
            Ok(RateLimit { n_requests, per })
        })
    }
}

/// A parsed Standard Webhooks signing secret; never printed. Two are equal when their secret
/// text is (a reload with a new secret restarts the target).
#[derive(Clone)]
pub struct SigningSecret(pub std::sync::Arc<crate::delivery::signing::SigningKey>, String);

impl PartialEq for SigningSecret {
    fn eq(&self, other: &Self) -> bool {
        self.1 == other.1
    }
}

impl SigningSecret {
    /// The secret as configured, so that response excerpts can be cleaned of it; never shown.
    pub fn text(&self) -> &str {
        &self.1
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("SigningSecret(***)")
    }
}

impl<'de> Deserialize<'de> for SigningSecret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |raw| {
            note_if_literal_secret(raw);
            let secret = expand(raw)?;
            crate::delivery::signing::SigningKey::parse(&secret)
                .map(|key| SigningSecret(std::sync::Arc::new(key), secret.clone()))
                .map_err(|err| err.to_string())
        })
    }
}

fn default_target_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_in_flight() -> PositiveCount {
    PositiveCount(16)
}

fn default_queue_capacity() -> PositiveCount {
    PositiveCount(10_000)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default = "default_max_attempts")]
    pub max_attempts: PositiveCount,
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub initial_delay: Duration,
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub max_delay: Duration,
    #[serde(default = "default_max_elapsed", with = "humantime_serde")]
    pub max_elapsed: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: default_max_attempts(),
            initial_delay: default_retry_initial(),
            max_delay: default_retry_max(),
            max_elapsed: default_max_elapsed(),
        }
    }
}

fn default_max_attempts() -> PositiveCount {
    PositiveCount(10)
}

fn default_retry_initial() -> Duration {
    Duration::from_secs(1)
}

fn default_retry_max() -> Duration {
    Duration::from_secs(300)
}

fn default_max_elapsed() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// What a target receives as the request body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BodyConfig {
    /// The upstream's data bytes, unchanged.
    #[default]
    Data,
    /// `{"id","stream","event_type","received_at","data"}`.
    Envelope,
    /// The part of the JSON data at this pointer.
    Pointer(JsonPointer),
}

impl<'de> Deserialize<'de> for BodyConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |text| match text {
            "data" => Ok(BodyConfig::Data),
            "envelope" => Ok(BodyConfig::Envelope),
            _ if text.starts_with('/') => Ok(BodyConfig::Pointer(JsonPointer(text.to_owned()))),
            _ => Err(format!(
                "body `{text}` is not one of data, envelope or a JSON pointer such as /payload"
            )),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A stream name, or a pattern with `*` and `?` wildcards.
    pub stream: StreamPattern,
    /// Event types or patterns; a route without `events` takes every event.
    #[serde(default = "match_everything")]
    pub events: Vec<Pattern>,
    /// JSON pointers whose values must all equal the given ones.
    #[serde(default, rename = "where")]
    pub where_equal: BTreeMap<JsonPointer, serde_json::Value>,
    pub targets: Vec<TargetName>,
}

fn match_everything() -> Vec<Pattern> {
    vec![Pattern("*".to_owned())]
}

/// A string value after `${VAR}` expansion.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |raw| expand(raw).map(Text))
    }
}

impl fmt::Display for Text {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// A string value that is usually a credential (a header value, a signing secret, a token),
/// after expansion. Written literally in the file rather than as a `${...}` reference, it is
/// counted, so that `check` can warn when the file is readable by everyone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretText(pub String);

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |raw| {
            note_if_literal_secret(raw);
            expand(raw).map(SecretText)
        })
    }
}

fn note_if_literal_secret(raw: &str) {
    if !raw.trim().is_empty() && !raw.contains("${") {
        with_context(|context| context.n_literal_secrets.set(context.n_literal_secrets.get() + 1));
    }
}

/// An http or https URL, after `${VAR}` expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(pub Url);

impl<'de> Deserialize<'de> for HttpUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |raw| {
            // The URL may hold a credential, so errors describe the problem without repeating it.
            let url = Url::parse(&expand(raw)?).map_err(|err| format!("invalid url: {err}"))?;
            match url.scheme() {
                "http" | "https" if url.host().is_some() => Ok(HttpUrl(url)),
                "http" | "https" => Err("invalid url: it has no host".to_owned()),
                scheme => Err(format!("invalid url: the scheme must be http or https, not {scheme}")),
            }
        })
    }
}

/// A valid HTTP header name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HeaderName(pub String);

impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |name| {
            match http::HeaderName::from_bytes(name.as_bytes()) {
                Ok(_) => Ok(HeaderName(name.to_owned())),
                Err(_) => Err(format!("`{name}` is not a valid HTTP header name")),
            }
        })
    }
}

/// An RFC 6901 JSON pointer such as `/payload/id`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct JsonPointer(pub String);

impl<'de> Deserialize<'de> for JsonPointer {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |pointer| {
            if pointer.is_empty() || pointer.starts_with('/') {
                Ok(JsonPointer(pointer.to_owned()))
            } else {
                Err(format!(
                    "`{pointer}` is not a JSON pointer: it must start with /, as in /eventType"
                ))
            }
        })
    }
}

/// An exact name, or a pattern where `*` matches any run of characters and `?` one character.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(pub String);

impl Pattern {
    pub fn is_wildcard(&self) -> bool {
        self.0.contains(['*', '?'])
    }

    pub fn matches(&self, name: &str) -> bool {
        if self.is_wildcard() {
            WildMatch::new(&self.0).matches(name)
        } else {
            self.0 == name
        }
    }
}

fn parse_pattern(raw: &str) -> Result<Pattern, String> {
    let text = expand(raw)?;
    if text.is_empty() {
        return Err("an empty pattern matches nothing".to_owned());
    }
    Ok(Pattern(text))
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, parse_pattern)
    }
}

/// A stream pattern in a route; it must match at least one configured stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPattern(pub Pattern);

impl<'de> Deserialize<'de> for StreamPattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |raw| {
            let pattern = parse_pattern(raw)?;
            with_context(|context| {
                if context.stream_names.iter().any(|name| pattern.matches(name)) {
                    Ok(())
                } else if pattern.is_wildcard() {
                    Err(format!("stream pattern `{}` matches no configured stream", pattern.0))
                } else {
                    Err(format!(
                        "unknown stream `{}`; configured streams: {}",
                        pattern.0,
                        name_list(&context.stream_names)
                    ))
                }
            })?;
            Ok(StreamPattern(pattern))
        })
    }
}

/// A target name in a route; it must name a configured target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetName(pub String);

impl<'de> Deserialize<'de> for TargetName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |name| {
            with_context(|context| {
                if context.target_names.contains(name) {
                    Ok(TargetName(name.to_owned()))
                } else {
                    Err(format!(
                        "unknown target `{name}`; configured targets: {}",
                        name_list(&context.target_names)
                    ))
                }
            })
        })
    }
}

/// A whole number of at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PositiveCount(pub usize);

impl<'de> Deserialize<'de> for PositiveCount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CountVisitor;

        impl de::Visitor<'_> for CountVisitor {
            type Value = PositiveCount;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a whole number of at least 1")
            }

            fn visit_u64<E: de::Error>(self, count: u64) -> Result<PositiveCount, E> {
                match usize::try_from(count) {
                    Ok(0) => Err(E::custom("must be at least 1")),
                    Ok(count) => Ok(PositiveCount(count)),
                    Err(_) => Err(E::custom("is too large")),
                }
            }

            fn visit_i64<E: de::Error>(self, count: i64) -> Result<PositiveCount, E> {
                match u64::try_from(count) {
                    Ok(count) => self.visit_u64(count),
                    Err(_) => Err(E::custom("must be at least 1")),
                }
            }
        }

        deserializer.deserialize_u64(CountVisitor)
    }
}

/// Deserializes a scalar as text and converts it with `parse`. The conversion runs inside the
/// visitor, so serde_yaml attaches the scalar's own line, column and path to its error.
fn from_text<'de, D, T>(deserializer: D, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct TextVisitor<F>(F);

    impl<T, F: FnOnce(&str) -> Result<T, String>> de::Visitor<'_> for TextVisitor<F> {
        type Value = T;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("a string")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
            (self.0)(text).map_err(E::custom)
        }

        // Unquoted numbers and booleans are text too, as in `X-Count: 5`.
        fn visit_u64<E: de::Error>(self, number: u64) -> Result<T, E> {
            self.visit_str(&number.to_string())
        }

        fn visit_i64<E: de::Error>(self, number: i64) -> Result<T, E> {
            self.visit_str(&number.to_string())
        }

        fn visit_f64<E: de::Error>(self, number: f64) -> Result<T, E> {
            self.visit_str(&number.to_string())
        }

        fn visit_bool<E: de::Error>(self, value: bool) -> Result<T, E> {
            self.visit_str(if value { "true" } else { "false" })
        }
    }

    deserializer.deserialize_str(TextVisitor(parse))
}

fn expand(raw: &str) -> Result<String, String> {
    with_context(|context| expand_env(raw, &*context.env))
}

fn name_list(names: &BTreeSet<String>) -> String {
    if names.is_empty() {
        return "none".to_owned();
    }
    names.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
}

/// Reads and parses a config file with the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(
        &text,
        &path.display().to_string(),
        Box::new(|name| std::env::var(name).ok()),
    )
}

/// Reads only the `storage` section of a config file, for `sse-relay dlq`: the variables that
/// streams and targets use (tokens, URLs) need not be set to manage dead letters.
pub fn load_storage(path: &Path) -> Result<StorageConfig, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: origin.clone(),
        source,
    })?;
    #[derive(Deserialize)]
    struct StorageOnly {
        #[serde(default)]
        storage: StorageConfig,
    }
    let parsed: StorageOnly = serde_yaml::from_str(&text).map_err(|err| locate(&origin, err))?;
    Ok(parsed.storage)
}

fn locate(origin: &str, err: serde_yaml::Error) -> ConfigError {
    match err.location() {
        Some(location) => ConfigError::Located {
            origin: origin.to_owned(),
            line: location.line(),
            column: location.column(),
            message: strip_location_suffix(&err.to_string()),
        },
        None => ConfigError::Unlocated {
            origin: origin.to_owned(),
            message: err.to_string(),
        },
    }
}

/// Parses config text; `origin` names it in errors (usually the file path).
pub fn parse(text: &str, origin: &str, env: Box<EnvLookup>) -> Result<Config, ConfigError> {
    let locate = |err: serde_yaml::Error| locate(origin, err);

    // First pass: only the names of streams and targets, so that routes can be checked against
    // them wherever they stand in the file.
    #[derive(Deserialize)]
    struct Names {
        #[serde(default)]
        streams: BTreeMap<String, IgnoredAny>,
        #[serde(default)]
        targets: BTreeMap<String, IgnoredAny>,
    }
    let names: Names = serde_yaml::from_str(text).map_err(locate)?;

    let context = ParseContext {
        env,
        stream_names: names.streams.into_keys().collect(),
        target_names: names.targets.into_keys().collect(),
        n_literal_secrets: std::cell::Cell::new(0),
    };
    CONTEXT.with(|cell| *cell.borrow_mut() = Some(context));
    let parsed = serde_yaml::from_str::<Config>(text);
    let context = CONTEXT.with(|cell| cell.borrow_mut().take());
    let mut config = parsed.map_err(locate)?;
    config.n_literal_secrets = context.map_or(0, |context| context.n_literal_secrets.get());

    if config.streams.is_empty() {
        return Err(ConfigError::Unlocated {
            origin: origin.to_owned(),
            message: "no streams are configured".to_owned(),
        });
    }
    Ok(config)
}

/// serde_yaml appends " at line L column C" to messages; the location is reported up front.
fn strip_location_suffix(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(index) => message[..index].to_owned(),
        None => message.to_owned(),
    }
}

struct ParseContext {
    env: Box<EnvLookup>,
    stream_names: BTreeSet<String>,
    target_names: BTreeSet<String>,
    n_literal_secrets: std::cell::Cell<usize>,
}

thread_local! {
    static CONTEXT: RefCell<Option<ParseContext>> = const { RefCell::new(None) };
}

fn with_context<T>(action: impl FnOnce(&ParseContext) -> T) -> T {
    CONTEXT.with(|cell| {
        let borrowed = cell.borrow();
        match borrowed.as_ref() {
            Some(context) => action(context),
            // Outside `parse` (a type deserialized on its own), use the process environment.
            None => action(&ParseContext {
                env: Box::new(|name| std::env::var(name).ok()),
                stream_names: BTreeSet::new(),
                target_names: BTreeSet::new(),
                n_literal_secrets: std::cell::Cell::new(0),
            }),
        }
    })
}

/// Expands `${VAR}`, `${VAR:-default}`, `${file:/path}`, `${cred:NAME}` and `$$` (a literal
/// `$`); any other `$` stays as it is.
pub fn expand_env(raw: &str, env: &EnvLookup) -> Result<String, String> {
    if !raw.contains('$') {
        return Ok(raw.to_owned());
    }
    let mut expanded = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(dollar) = rest.find('$') {
        expanded.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            expanded.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let close = body
                .find('}')
                .ok_or_else(|| "unclosed `${`: a variable reference is written ${NAME}".to_owned())?;
            expanded.push_str(&resolve_reference(&body[..close], env)?);
            rest = &body[close + 1..];
        } else {
            expanded.push('$');
            rest = after;
        }
    }
    expanded.push_str(rest);
    Ok(expanded)
}

/// The value of one `${...}` reference.
fn resolve_reference(reference: &str, env: &EnvLookup) -> Result<String, String> {
    if let Some(path) = reference.strip_prefix("file:") {
        return read_secret_file(Path::new(path));
    }
    if let Some(name) = reference.strip_prefix("cred:") {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(format!(
                "`${{cred:{name}}}` must name one credential, as in ${{cred:zapier-hook-url}}"
            ));
        }
        let directory = env("CREDENTIALS_DIRECTORY").ok_or_else(|| {
            format!("`${{cred:{name}}}` needs CREDENTIALS_DIRECTORY, which systemd sets for LoadCredential=")
        })?;
        return read_secret_file(&Path::new(&directory).join(name));
    }
    let (name, default) = match reference.split_once(":-") {
        Some((name, default)) => (name, Some(default)),
        None => (reference, None),
    };
    if !is_variable_name(name) {
        return Err(format!(
            "`${{{reference}}}` is not a variable reference such as ${{NAME}}"
        ));
    }
    match (env(name), default) {
        (Some(value), _) => Ok(value),
        (None, Some(default)) => Ok(default.to_owned()),
        (None, None) => Err(format!("environment variable {name} is not set")),
    }
}

/// A secret kept in a file, without its trailing newline. The error names the file, never its
/// contents.
fn read_secret_file(path: &Path) -> Result<String, String> {
    let contents = std::fs::read_to_string(path)
        .map_err(|err| format!("cannot read the secret file {}: {err}", path.display()))?;
    Ok(contents.trim_end_matches(['\n', '\r']).to_owned())
}

fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(first) if first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> Box<EnvLookup> {
        Box::new(move |name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        })
    }

    #[test]
    fn expands_variables_and_defaults() {
        let env = env_of(&[("A", "one"), ("EMPTY", "")]);
        let check = |raw: &str, expected: Result<&str, &str>| {
            assert_eq!(
                expand_env(raw, &*env),
                expected.map(str::to_owned).map_err(str::to_owned),
                "{raw}"
            );
        };
        check("plain", Ok("plain"));
        check("${A}", Ok("one"));
        check("x-${A}-y", Ok("x-one-y"));
        check("${MISSING:-fallback}", Ok("fallback"));
        check("${MISSING:-}", Ok(""));
        check("${EMPTY:-fallback}", Ok(""));
        check("$$A", Ok("$A"));
        check("cost $5", Ok("cost $5"));
        check("${MISSING}", Err("environment variable MISSING is not set"));
        check("${A", Err("unclosed `${`: a variable reference is written ${NAME}"));
        check("${1X}", Err("`${1X}` is not a variable reference such as ${NAME}"));
        check(
            "${cred:hook}",
            Err("`${cred:hook}` needs CREDENTIALS_DIRECTORY, which systemd sets for LoadCredential="),
        );
        check(
            "${cred:../x}",
            Err("`${cred:../x}` must name one credential, as in ${cred:zapier-hook-url}"),
        );
    }

    #[test]
    fn reads_secrets_from_files_and_credentials() {
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(directory.path().join("token"), "s3cret\n").unwrap();
        let credentials = directory.path().display().to_string();
        let env: Box<EnvLookup> = Box::new(move |name| (name == "CREDENTIALS_DIRECTORY").then(|| credentials.clone()));
        let file_reference = format!("Bearer ${{file:{}}}", directory.path().join("token").display());
        assert_eq!(expand_env(&file_reference, &*env).unwrap(), "Bearer s3cret");
        assert_eq!(expand_env("${cred:token}", &*env).unwrap(), "s3cret");
        let missing = expand_env("${cred:absent}", &*env).unwrap_err();
        assert!(
            missing.starts_with("cannot read the secret file ") && missing.contains("absent"),
            "{missing}"
        );
    }

    #[test]
    fn patterns_match_exact_names_and_wildcards() {
        let pattern = |text: &str| Pattern(text.to_owned());
        assert!(pattern("MESSAGE_SENT").matches("MESSAGE_SENT"));
        assert!(!pattern("MESSAGE_SENT").matches("MESSAGE_SENT_2"));
        assert!(pattern("ACTION_PLAN_CARD*").matches("ACTION_PLAN_CARDS_ADDED"));
        assert!(pattern("*").matches("anything"));
        assert!(!pattern("CHAT_*").matches("MESSAGE_SENT"));
    }
}
