//! The configuration file: the only serde types in the crate.
//!
//! `parse` turns YAML text into a validated [`Config`], or into every problem of the text. Every
//! check that can point at a place in the file runs during deserialization, so serde_yaml
//! attaches the line and column of the offending node to the error; after an error, the text is
//! deserialized again with the failed entry hidden (`yaml::Recovery`), so one run finds them
//! all. Checks that need to know the names of all streams and targets (a route naming an
//! unknown target, say) read them from a per-thread [`ParseContext`] that `parse` fills in a
//! first, lenient pass over the same text.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny};
use url::Url;
use wildmatch::WildMatch;

use crate::yaml;

/// Looks up an environment variable by name; tests pass their own.
pub type EnvLookup = dyn Fn(&str) -> Option<String>;

pub mod postgres_url;
mod templates;

pub use templates::{Descriptors, ID_PLACEHOLDER, IdsFile, InstanceId, MAX_ID_BYTES, StopWhen, StreamInstance};

/// Everything wrong with a config: each problem on a line of its own, in the order of the file.
#[derive(Debug)]
pub struct ConfigError {
    /// Never empty.
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.problems.iter().enumerate() {
            if index > 0 {
                formatter.write_str("\n")?;
            }
            write!(formatter, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl From<ConfigProblem> for ConfigError {
    fn from(problem: ConfigProblem) -> ConfigError {
        ConfigError {
            problems: vec![problem],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigProblem {
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
    #[serde(default)]
    pub logging: LoggingConfig,
    #[serde(default)]
    pub connections: ConnectionsConfig,
    /// Credentials written literally in the file, not as `${...}` references.
    #[serde(skip)]
    pub n_literal_secrets: usize,
    /// Values that `check` shows (names, patterns, the storage path) but that were read from
    /// `${file:...}` or `${cred:...}`, each with the text it was written as: a file or a
    /// credential may hold a secret, so `check` shows that text instead.
    #[serde(skip)]
    pub written_as: BTreeMap<String, String>,
    /// URLs with a `${...}` reference before their query: their path may hold a secret, so
    /// `check` shows only their scheme and host.
    #[serde(skip)]
    pub urls_from_references: BTreeSet<String>,
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
    /// With `mode: postgres`: the database, `postgres://user:password@host:port/database`.
    /// Usually `${DATABASE_URL}`; its password is never shown.
    #[serde(default)]
    pub url: Option<SecretText>,
    /// With `mode: postgres`: how long a replica's streams and targets stay its own without
    /// a renewal, and so how long a dead replica's work waits before another takes it.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// With `mode: postgres`: this replica's name, unique among the replicas (default: the
    /// host name and a random suffix).
    #[serde(default)]
    pub replica: Option<Text>,
    /// With `mode: postgres`: authorities trusted for the database's certificate besides the
    /// system's, and a client certificate (see `sslmode` in the url).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            mode: StorageMode::default(),
            path: default_storage_path(),
            max_pending: default_max_pending(),
            max_bytes: default_max_bytes(),
            dead_letter_retention: default_dead_letter_retention(),
            url: None,
            lease_ttl: default_lease_ttl(),
            replica: None,
            tls: None,
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
    /// Deliveries live in a PostgreSQL database that several replicas share; each stream is
    /// read, and each target served, by one replica at a time.
    Postgres,
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
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

/// Upstream connections, across all streams.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// New upstream connections (first ones and reconnections) are opened at most this often,
    /// each after a little jitter: thousands of instances start without a thundering herd, and
    /// an upstream outage does not end in a storm of reconnections.
    #[serde(default = "default_connect_rate")]
    pub rate: RateLimit,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            rate: default_connect_rate(),
        }
    }
}

/// 10,000 instances connect within 20 s.
fn default_connect_rate() -> RateLimit {
    RateLimit {
        n_requests: 500,
        per: Duration::from_secs(1),
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    /// How often an info line sums up what each stream received and each target delivered;
    /// 0 turns it off.
    #[serde(default = "default_summary_interval", with = "humantime_serde")]
    pub summary_interval: Duration,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            summary_interval: default_summary_interval(),
        }
    }
}

fn default_summary_interval() -> Duration {
    Duration::from_secs(300)
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
    /// Certificate authorities to trust besides the system's, and a client certificate.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// A template's fixed instances (the url has `{id}`).
    #[serde(default)]
    pub ids: Vec<InstanceId>,
    /// A file of a template's ids, one per line; read again on SIGHUP and when it changes.
    #[serde(default)]
    pub ids_file: Option<IdsFile>,
    /// Instances are added and removed at run time, through the admin API.
    #[serde(default)]
    pub dynamic: bool,
    /// An instance ends after an event that matches is queued for delivery.
    #[serde(default)]
    pub stop_when: Option<StopWhen>,
    /// An instance that nobody stopped ends this long after it started.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
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
    /// Certificate authorities to trust besides the system's, and a client certificate (mTLS).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// When a target is paused: once at least `failure_rate` of its recent attempts failed, and it
/// made at least `min_attempts` of them. Recent means the last 50 attempts within `window`. A
/// flaky target (a share of its requests failing at random) keeps its traffic; a target that is
/// down is paused, and probed once per `open_delay`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    #[serde(default = "default_failure_rate")]
    pub failure_rate: Percentage,
    /// `failure_threshold`, the consecutive failures that paused a target before the failure
    /// rate did, is read as this: a target that fails that many attempts in a row, with nothing
    /// else within the window, is still paused.
    #[serde(default = "default_min_attempts", alias = "failure_threshold")]
    pub min_attempts: PositiveCount,
    #[serde(default = "default_breaker_window", with = "humantime_serde")]
    pub window: Duration,
    /// First pause before a probe; it doubles after each failed probe, up to `max_open_delay`.
    #[serde(default = "default_open_delay", with = "humantime_serde")]
    pub open_delay: Duration,
    #[serde(default = "default_max_open_delay", with = "humantime_serde")]
    pub max_open_delay: Duration,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            failure_rate: default_failure_rate(),
            min_attempts: default_min_attempts(),
            window: default_breaker_window(),
            open_delay: default_open_delay(),
            max_open_delay: default_max_open_delay(),
        }
    }
}

fn default_failure_rate() -> Percentage {
    Percentage(90)
}

fn default_min_attempts() -> PositiveCount {
    PositiveCount(5)
}

/// Longer than `min_attempts` attempts that each time out after the default 10 s, so that a
/// target that hangs is paused even with one request in flight.
fn default_breaker_window() -> Duration {
    Duration::from_secs(60)
}

fn default_open_delay() -> Duration {
    Duration::from_secs(5)
}

fn default_max_open_delay() -> Duration {
    Duration::from_secs(300)
}

/// A share from 1% to 100%, written `90%` or `90`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percentage(pub u8);

impl<'de> Deserialize<'de> for Percentage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |text| {
            let number = text.trim().strip_suffix('%').unwrap_or(text).trim();
            match number.parse::<u8>() {
                Ok(percent @ 1..=100) => Ok(Percentage(percent)),
                _ => Err(format!("`{text}` is not a percentage from 1% to 100%")),
            }
        })
    }
}

/// An HTTP status that a retry policy names: 300 to 599, since a 2xx answer is always delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HttpStatus(pub u16);

impl<'de> Deserialize<'de> for HttpStatus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |text| match text.trim().parse::<u16>() {
            Ok(status @ 200..=299) => Err(format!("{status} is a success, and a 2xx answer is always delivered")),
            Ok(status @ 300..=599) => Ok(HttpStatus(status)),
            _ => Err(format!("`{text}` is not an HTTP error status (300 to 599)")),
        })
    }
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
            let problem = || format!("`{text}` is not a rate such as 30/s, 100/m or 1000/h");
            let (count, unit) = text.split_once('/').ok_or_else(problem)?;
            let n_requests: u32 = count.trim().parse().map_err(|_| problem())?;
            let per = match unit.trim() {
                "s" => Duration::from_secs(1),
                "m" => Duration::from_secs(60),
                "h" => Duration::from_secs(3600),
                _ => return Err(problem()),
            };
            if n_requests == 0 {
                return Err("a rate must allow at least 1 a second, minute or hour".to_owned());
            }
            Ok(RateLimit { n_requests, per })
        })
    }
}

/// A parsed Standard Webhooks signing secret; never printed. Two are equal when their secret
/// text is (a reload with a new secret restarts the target).
#[derive(Clone)]
pub struct SigningSecret(pub std::sync::Arc<crate::signing::SigningKey>, String);

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
            crate::signing::SigningKey::parse(&secret)
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
    /// Statuses retried although they are permanent failures by default.
    #[serde(default)]
    pub retry_statuses: Vec<HttpStatus>,
    /// Statuses that are permanent failures although they are retried by default.
    #[serde(default)]
    pub permanent_statuses: Vec<HttpStatus>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: default_max_attempts(),
            initial_delay: default_retry_initial(),
            max_delay: default_retry_max(),
            max_elapsed: default_max_elapsed(),
            retry_statuses: Vec::new(),
            permanent_statuses: Vec::new(),
        }
    }
}

/// With the first retries this quick, 20 attempts make the default schedule span about half
/// an hour (5 min apart from the 16th), where 10 attempts from 1 s spanned 9 to 17 minutes.
fn default_max_attempts() -> PositiveCount {
    PositiveCount(20)
}

/// A target that fails a share of its requests at random is best retried at once; one that
/// fails them all is paused by its circuit breaker, not by this delay (BENCHMARKS.md, flaky).
fn default_retry_initial() -> Duration {
    Duration::from_millis(10)
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

/// The `tls` section of a stream or target. Its files are read and checked as the config is
/// loaded: the certificates parse, and the client key belongs to the client certificate. A
/// reload reads them again, and a stream or target whose files changed restarts.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// Certificate authorities trusted besides the system's store and the bundled roots.
    pub ca_file: Option<PemCertificates>,
    /// A certificate (chain) and its key, shown to servers that ask for one (mTLS).
    pub client_identity: Option<ClientIdentity>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClientIdentity {
    pub certificates: PemCertificates,
    pub key: PemPrivateKey,
}

/// The certificates of a PEM file, with the file's path.
#[derive(Debug, Clone, PartialEq)]
pub struct PemCertificates {
    pub path: String,
    pub certificates: Vec<rustls_pki_types::CertificateDer<'static>>,
}

/// The private key of a PEM file, with the file's path. The key is never printed.
#[derive(Clone)]
pub struct PemPrivateKey {
    pub path: String,
    key: std::sync::Arc<rustls_pki_types::PrivateKeyDer<'static>>,
}

impl PemPrivateKey {
    pub fn der(&self) -> rustls_pki_types::PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

impl PartialEq for PemPrivateKey {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.key.secret_der() == other.key.secret_der()
    }
}

impl fmt::Debug for PemPrivateKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "PemPrivateKey({}, ***)", self.path)
    }
}

/// The most a `tls` file may hold; README.md names it. A bundle of a few hundred certificates
/// fits.
const MAX_PEM_FILE_BYTES: u64 = 1024 * 1024;

/// The kind and DER bytes of each block of a PEM file.
type PemSections = Vec<(rustls_pki_types::pem::SectionKind, Vec<u8>)>;

/// A `tls` file's path (expanded) and PEM blocks. Errors name the file, never a byte of what it
/// holds.
fn read_pem_sections(raw_path: &str) -> Result<(String, PemSections), String> {
    use rustls_pki_types::pem::{self, PemObject as _};

    let path = expand(raw_path)?;
    let text =
        read_regular_file(Path::new(&path), MAX_PEM_FILE_BYTES).map_err(|err| format!("cannot read {path}: {err}"))?;
    let sections = <(pem::SectionKind, Vec<u8>)>::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| {
            let problem = match err {
                pem::Error::MissingSectionEnd { .. } => "a PEM block has no END line",
                pem::Error::Base64Decode(_) => "a PEM block is not valid base64",
                _ => "it is not valid PEM",
            };
            format!("{path} cannot be read as PEM: {problem}")
        })?;
    Ok((path, sections))
}

impl<'de> Deserialize<'de> for PemCertificates {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |raw| {
            let (path, sections) = read_pem_sections(raw)?;
            let certificates: Vec<_> = sections
                .into_iter()
                .filter(|(kind, _)| *kind == rustls_pki_types::pem::SectionKind::Certificate)
                .map(|(_, der)| rustls_pki_types::CertificateDer::from(der))
                .collect();
            if certificates.is_empty() {
                return Err(format!(
                    "{path} holds no certificate (a PEM block -----BEGIN CERTIFICATE-----)"
                ));
            }
            for (index, certificate) in certificates.iter().enumerate() {
                rustls::RootCertStore::empty().add(certificate.clone()).map_err(|err| {
                    format!(
                        "{path}: certificate {} is not a valid X.509 certificate ({err})",
                        index + 1
                    )
                })?;
            }
            Ok(PemCertificates { path, certificates })
        })
    }
}

impl<'de> Deserialize<'de> for PemPrivateKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use rustls_pki_types::pem::SectionKind;
        use rustls_pki_types::{PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer};

        from_text(deserializer, |raw| {
            let (path, sections) = read_pem_sections(raw)?;
            let mut keys = sections.into_iter().filter_map(|(kind, der)| match kind {
                SectionKind::PrivateKey => Some(PrivatePkcs8KeyDer::from(der).into()),
                SectionKind::RsaPrivateKey => Some(PrivatePkcs1KeyDer::from(der).into()),
                SectionKind::EcPrivateKey => Some(PrivateSec1KeyDer::from(der).into()),
                _ => None,
            });
            match (keys.next(), keys.next()) {
                (Some(key), None) => Ok(PemPrivateKey {
                    path,
                    key: std::sync::Arc::new(key),
                }),
                (None, _) => Err(format!(
                    "{path} holds no private key (a PEM block -----BEGIN PRIVATE KEY-----, or RSA or EC \
                     PRIVATE KEY)"
                )),
                (Some(_), Some(_)) => Err(format!("{path} holds more than one private key")),
            }
        })
    }
}

impl<'de> Deserialize<'de> for TlsConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// A visitor of its own rather than a derive, so that an error about two fields together
        /// is reported at the `tls` section's place, not its stream's or target's.
        struct TlsVisitor;

        #[derive(Deserialize)]
        #[serde(field_identifier, rename_all = "snake_case")]
        enum Field {
            CaFile,
            ClientCert,
            ClientKey,
        }

        impl<'de> de::Visitor<'de> for TlsVisitor {
            type Value = TlsConfig;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a tls section: ca_file, client_cert, client_key")
            }

            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<TlsConfig, A::Error> {
                let (mut ca_file, mut client_cert, mut client_key) = (None, None, None);
                while let Some(field) = map.next_key::<Field>()? {
                    let duplicate = match field {
                        Field::CaFile => ca_file.replace(map.next_value::<PemCertificates>()?).is_some(),
                        Field::ClientCert => client_cert.replace(map.next_value::<PemCertificates>()?).is_some(),
                        Field::ClientKey => client_key.replace(map.next_value::<PemPrivateKey>()?).is_some(),
                    };
                    if duplicate {
                        return Err(de::Error::custom("a field is given twice"));
                    }
                }
                let client_identity = match (client_cert, client_key) {
                    (None, None) => None,
                    (Some(_), None) => {
                        return Err(de::Error::custom(
                            "client_cert needs `client_key`, the certificate's private key",
                        ));
                    }
                    (None, Some(_)) => {
                        return Err(de::Error::custom(
                            "client_key needs `client_cert`, the key's certificate",
                        ));
                    }
                    (Some(certificates), Some(key)) => {
                        check_key_belongs_to_certificate(&certificates, &key).map_err(de::Error::custom)?;
                        Some(ClientIdentity { certificates, key })
                    }
                };
                Ok(TlsConfig {
                    ca_file,
                    client_identity,
                })
            }
        }

        deserializer.deserialize_map(TlsVisitor)
    }
}

/// The key must be one TLS can sign with, and the public key of the first certificate its own.
fn check_key_belongs_to_certificate(certificates: &PemCertificates, key: &PemPrivateKey) -> Result<(), String> {
    let provider = rustls::crypto::ring::default_provider();
    let signing_key = provider.key_provider.load_private_key(key.der()).map_err(|_| {
        format!(
            "client_key {}: the private key is not of a kind TLS can use (RSA, ECDSA P-256 or P-384, Ed25519)",
            key.path
        )
    })?;
    let certified = rustls::sign::CertifiedKey::new(certificates.certificates.clone(), signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(rustls::Error::InconsistentKeys(_)) => Err(format!(
            "the private key in client_key {} does not belong to the first certificate in client_cert {}",
            key.path, certificates.path
        )),
        Err(err) => Err(format!(
            "client_cert {}: the first certificate is not a valid X.509 certificate ({err})",
            certificates.path
        )),
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
        from_text(deserializer, |raw| expand_shown(raw).map(Text))
    }
}

impl fmt::Display for Text {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// A string value that is usually a credential (a header value, a signing secret, a token),
/// after expansion, and how to make it again when it read files (see [`SecretRecipe`]).
/// Written literally in the file rather than as a `${...}` reference, it is counted, so that
/// `check` can warn when the file is readable by everyone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretText(pub String, pub Option<SecretRecipe>);

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |raw| {
            note_if_literal_secret(raw);
            let (value, recipe) = with_context(|context| expand_with_recipe(raw, &*context.env))?;
            // Each travels in an HTTP header: one that a header cannot carry is refused here, at
            // its place, rather than when its stream or target starts. The error names the
            // reference the value came from, never the value.
            if !value.is_empty() && http::HeaderValue::from_str(&value).is_err() {
                let named = if raw.contains("${") {
                    format!("`{raw}` expands to a value")
                } else {
                    "the value".to_owned()
                };
                return Err(format!(
                    "{named} with a line break or another control character, which an HTTP header cannot carry"
                ));
            }
            Ok(SecretText(value, recipe))
        })
    }
}

/// How a value that read `${file:...}` or `${cred:...}` references was made: the text around
/// them (variables already expanded) and the files they read, so that it can be made again
/// after an agent outside the relay rotates a file. Never printed: its text may hold a
/// variable's secret.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretRecipe {
    parts: Vec<RecipePart>,
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
enum RecipePart {
    Text(String),
    File(std::path::PathBuf),
}

impl SecretRecipe {
    /// The value made again from the files as they are now. The error names the file, never
    /// what it holds.
    pub fn make(&self) -> Result<String, String> {
        let mut value = String::new();
        for part in &self.parts {
            match part {
                RecipePart::Text(text) => value.push_str(text),
                RecipePart::File(path) => value.push_str(&read_secret_file(path)?),
            }
        }
        Ok(value)
    }

    /// The same recipe with `{id}` replaced in its text.
    fn with_id(&self, id: &str) -> SecretRecipe {
        let parts = self
            .parts
            .iter()
            .map(|part| match part {
                RecipePart::Text(text) => RecipePart::Text(text.replace(ID_PLACEHOLDER, id)),
                RecipePart::File(path) => RecipePart::File(path.clone()),
            })
            .collect();
        SecretRecipe { parts }
    }

    /// The files the value is made from.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.parts.iter().filter_map(|part| match part {
            RecipePart::File(path) => Some(path.as_path()),
            RecipePart::Text(_) => None,
        })
    }
}

impl fmt::Debug for SecretRecipe {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_tuple("SecretRecipe")
            .field(&self.files().collect::<Vec<_>>())
            .finish()
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
            let text = expand(raw)?;
            let url = Url::parse(&text).map_err(|err| match err {
                _ if text.trim().is_empty() => "invalid url: it is empty".to_owned(),
                url::ParseError::RelativeUrlWithoutBase => {
                    "invalid url: it needs a scheme and a host, as in https://api.example.com/stream".to_owned()
                }
                _ => format!("invalid url: {err}"),
            })?;
            match url.scheme() {
                "http" | "https" if url.host().is_some() => {
                    // What an HTTP request cannot carry would fail every connection or request.
                    if let Err(err) = http::Uri::try_from(url.as_str()) {
                        return Err(if url.as_str().len() > MAX_URL_BYTES {
                            format!("invalid url: longer than {MAX_URL_BYTES} bytes")
                        } else {
                            format!("invalid url: an HTTP request cannot carry it ({err})")
                        });
                    }
                    if raw
                        .split('?')
                        .next()
                        .is_some_and(|before_query| before_query.contains("${"))
                    {
                        with_context(|context| {
                            context.urls_from_references.borrow_mut().insert(url.to_string());
                        });
                    }
                    Ok(HttpUrl(url))
                }
                "http" | "https" => Err("invalid url: it has no host".to_owned()),
                // What parses as the scheme of `user:password@host` is a user name, and a value
                // from a reference may be anything: the scheme is named only when it was written
                // as one.
                scheme
                    if text == raw
                        && raw
                            .get(..scheme.len() + 3)
                            .is_some_and(|start| start.eq_ignore_ascii_case(&format!("{scheme}://"))) =>
                {
                    Err(format!("invalid url: the scheme must be http or https, not {scheme}"))
                }
                _ => Err("invalid url: the scheme must be http or https".to_owned()),
            }
        })
    }
}

/// The longest URL the `http` crate takes (`http::Uri`), which both HTTP clients use.
const MAX_URL_BYTES: usize = u16::MAX as usize - 1;

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
    let text = expand_shown(raw)?;
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

/// A stream pattern in a route; it must match at least one configured stream. After a `/`, a
/// pattern for the ids of a template's instances (`chat/8f1c*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPattern(pub Pattern);

impl StreamPattern {
    /// What the stream's name (a template's, for an instance) must match.
    pub fn stream_part(&self) -> Pattern {
        match self.0.0.split_once('/') {
            Some((stream, _)) => Pattern(stream.to_owned()),
            None => self.0.clone(),
        }
    }

    /// What an instance's id must match, if the pattern says.
    pub fn id_part(&self) -> Option<Pattern> {
        let (_, id) = self.0.0.split_once('/')?;
        (id != "*").then(|| Pattern(id.to_owned()))
    }
}

impl<'de> Deserialize<'de> for StreamPattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |raw| {
            let pattern = parse_pattern(raw)?;
            // A value from a `${...}` reference may be a secret: the error names the reference.
            let named = if pattern.0 == raw {
                format!("`{raw}`")
            } else {
                format!("from `{raw}`")
            };
            let streams = StreamPattern(pattern.clone()).stream_part();
            with_context(|context| {
                if context.stream_names.iter().any(|name| streams.matches(name)) {
                    Ok(())
                } else if pattern.is_wildcard() {
                    Err(format!("stream pattern {named} matches no configured stream"))
                } else {
                    Err(format!(
                        "unknown stream {named}; configured streams: {}",
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

/// Expands a value that `check` shows, noting one read from a file or a credential (see
/// `Config::written_as`).
fn expand_shown(raw: &str) -> Result<String, String> {
    let value = expand(raw)?;
    if raw.contains("${file:") || raw.contains("${cred:") {
        with_context(|context| context.written_as.borrow_mut().insert(value.clone(), raw.to_owned()));
    }
    Ok(value)
}

fn name_list(names: &BTreeSet<String>) -> String {
    if names.is_empty() {
        return "none".to_owned();
    }
    names.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
}

/// Reads and parses a config file with the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read_config_file(path)?;
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
    let text = read_config_file(path)?;
    #[derive(Deserialize)]
    struct StorageOnly {
        #[serde(default)]
        storage: StorageConfig,
    }
    refuse_deep_nesting(&text, &origin)?;
    let parsed: StorageOnly =
        serde_yaml::from_str(&text).map_err(|err| ConfigError::from(locate(&origin, &text, &err)))?;
    Ok(parsed.storage)
}

/// The config file's text. Like a secret file, it must be a regular file: SIGHUP re-reads it
/// while the relay runs, and a FIFO or a device there must not stop the relay.
fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    read_regular_file(path, MAX_CONFIG_FILE_BYTES).map_err(|source| {
        ConfigError::from(ConfigProblem::Read {
            path: path.display().to_string(),
            source,
        })
    })
}

/// `err`, explained, at its place in `text`.
fn locate(origin: &str, text: &str, err: &serde_yaml::Error) -> ConfigProblem {
    let explained = yaml::explain(err, text);
    match explained.location {
        Some((line, column)) => ConfigProblem::Located {
            origin: origin.to_owned(),
            line,
            column,
            message: explained.message,
        },
        None => ConfigProblem::Unlocated {
            origin: origin.to_owned(),
            message: explained.message,
        },
    }
}

/// Parses config text; `origin` names it in errors (usually the file path). An invalid text
/// gives every problem it has, up to `MAX_PROBLEMS`.
pub fn parse(text: &str, origin: &str, env: Box<EnvLookup>) -> Result<Config, ConfigError> {
    let locate = |err: serde_yaml::Error| ConfigError::from(locate(origin, text, &err));
    refuse_deep_nesting(text, origin)?;

    // First pass: every mapping's keys. Repeated keys are errors, and hidden from the
    // deserialization; the names of streams and targets let routes be checked against them
    // wherever they stand in the file.
    let scan = yaml::scan_keys(text).map_err(locate)?;
    let mut search = Search::new(text, origin);
    for repeated in &scan.repeated {
        // Placing a repeat and its first definition takes two parses.
        if !search.may_parse(2) {
            break;
        }
        if let Some(err) = yaml::repeated_key_error(text, repeated) {
            search.found(&err);
        }
    }
    let hidden = scan.repeated.iter().map(|repeated| repeated.path.clone()).collect();
    let section = |name: &str| scan.sections.get(name).cloned().unwrap_or_default();
    let (stream_names, target_names) = (section("streams"), section("targets"));
    let env: Rc<EnvLookup> = Rc::from(env);
    let new_context = || ParseContext {
        env: Rc::clone(&env),
        stream_names: stream_names.clone(),
        target_names: target_names.clone(),
        n_literal_secrets: std::cell::Cell::new(0),
        written_as: RefCell::default(),
        urls_from_references: RefCell::default(),
    };

    let parsed = deserialize_every_part(&mut search, new_context, hidden);
    if let Some((config, _)) = &parsed {
        if search.problems.is_empty() && config.streams.is_empty() {
            search.problems.push(ConfigProblem::Unlocated {
                origin: origin.to_owned(),
                message: "no streams are configured".to_owned(),
            });
        }
        // A relation between two values is checked once both are valid: a value that failed
        // was hidden, and its default stands in for it.
        let check_relations = search.problems.is_empty();
        for unworkable in unworkable_values(config, check_relations) {
            // Each of its places may take a parse.
            if !search.may_parse(unworkable.places.len()) {
                break;
            }
            search.problems.push(unworkable.locate(text, origin));
        }
    }
    match (parsed, search.into_error()) {
        (_, Some(err)) => Err(err),
        (Some((mut config, context)), None) => {
            config.n_literal_secrets = context.n_literal_secrets.get();
            config.written_as = context.written_as.into_inner();
            config.urls_from_references = context.urls_from_references.into_inner();
            Ok(config)
        }
        // A run fails only with a problem, or with one hidden key missing, and keys are hidden
        // only with a problem; this is for safety's sake.
        (None, None) => Err(ConfigError::from(ConfigProblem::Unlocated {
            origin: origin.to_owned(),
            message: "the config cannot be read".to_owned(),
        })),
    }
}

/// More problems than this are not looked for.
const MAX_PROBLEMS: usize = 50;

/// Nor is more text parsed than this (32 parses of a 1 MiB file, and at least 4 parses of any
/// text) to find and place them: each problem takes a parse of the whole text, and a long text
/// with thousands of errors must not take minutes.
const MAX_PARSED_BYTES: usize = 32 * 1024 * 1024;

/// The problems of a text found so far, and what may still be spent on finding more.
struct Search<'t> {
    text: &'t str,
    origin: &'t str,
    problems: Vec<ConfigProblem>,
    n_bytes_left: usize,
    /// Whether something was left unlooked-for.
    stopped: bool,
}

impl<'t> Search<'t> {
    fn new(text: &'t str, origin: &'t str) -> Search<'t> {
        Search {
            text,
            origin,
            problems: Vec::new(),
            n_bytes_left: MAX_PARSED_BYTES.max(text.len().saturating_mul(4)),
            stopped: false,
        }
    }

    /// Whether `n_parses` more parses of the text are allowed; once one is not, none is.
    fn may_parse(&mut self, n_parses: usize) -> bool {
        let cost = self.text.len().saturating_mul(n_parses);
        if self.stopped || self.problems.len() >= MAX_PROBLEMS || cost > self.n_bytes_left {
            self.stopped = true;
            return false;
        }
        self.n_bytes_left -= cost;
        true
    }

    fn found(&mut self, err: &serde_yaml::Error) {
        self.problems.push(locate(self.origin, self.text, err));
    }

    /// Every problem found, with a last line when the search stopped early; none without one.
    fn into_error(mut self) -> Option<ConfigError> {
        if self.problems.is_empty() {
            return None;
        }
        if self.stopped {
            self.problems.push(ConfigProblem::Unlocated {
                origin: self.origin.to_owned(),
                message: format!(
                    "stopped looking after {} problems: fix these, then check again",
                    self.problems.len()
                ),
            });
        }
        Some(in_file_order(self.problems))
    }
}

/// Deserializes the config, and after each error again, with the entry or list item that failed
/// hidden, until a run gets through or the error is in no entry (a top-level key is missing, or
/// the text is no mapping). Each error is a problem, except one that only says a hidden key is
/// missing. Returns the last run's config and context, if it got through.
fn deserialize_every_part(
    search: &mut Search,
    new_context: impl Fn() -> ParseContext,
    mut hidden: BTreeSet<yaml::NodePath>,
) -> Option<(Config, ParseContext)> {
    while search.may_parse(1) {
        let recovery = yaml::Recovery::new(hidden.clone());
        CONTEXT.with(|cell| *cell.borrow_mut() = Some(new_context()));
        let deserializer = recovery.deserializer(serde_yaml::Deserializer::from_str(search.text));
        let parsed = Config::deserialize(deserializer);
        let context = CONTEXT
            .with(|cell| cell.borrow_mut().take())
            .expect("the context was set above");
        let err = match parsed {
            Ok(config) => return Some((config, context)),
            Err(err) => err,
        };
        if !recovery.is_consequence(&err.to_string()) {
            search.found(&err);
        }
        // A failure inside no entry, or in one already hidden, leaves nothing more to hide.
        if !recovery.failed().is_some_and(|failed| hidden.insert(failed)) {
            return None;
        }
    }
    None
}

/// Located problems by their place, then the others; each once.
fn in_file_order(mut problems: Vec<ConfigProblem>) -> ConfigError {
    problems.sort_by_key(|problem| match problem {
        ConfigProblem::Located { line, column, .. } => (0, *line, *column),
        ConfigProblem::Unlocated { .. } | ConfigProblem::Read { .. } => (1, 0, 0),
    });
    let mut seen = BTreeSet::new();
    problems.retain(|problem| seen.insert(problem.to_string()));
    ConfigError { problems }
}

/// Delays and timeouts shorter than this are refused: tokio's timers count milliseconds, so a
/// shorter one is zero, and a zero delay is a hot loop (`reconnect.initial_delay: 0s` made 13,048
/// requests in 5 s to a failing upstream).
const MIN_DELAY: Duration = Duration::from_millis(1);

/// Longer durations are refused: added to the time now, they would overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A shorter `rotate_after` would spend most of the time in overlaps; `source.rs` refuses the
/// same when a stream starts.
pub const MIN_ROTATE_AFTER: Duration = Duration::from_millis(500);

/// SQLite's store never gets smaller than 16 pages of 4 KiB; a smaller `max_bytes` would be
/// silently raised to it.
const MIN_STORAGE_BYTES: u64 = 64 * 1024;

/// The shortest `storage.lease_ttl`.
const MIN_LEASE_TTL: Duration = Duration::from_secs(1);

/// A value that parses but cannot work. Some depend on another field, and either may be the one
/// written in the file (the other a default), so it has a message for each place it can be
/// reported at, best first.
struct Unworkable {
    places: Vec<(Vec<String>, String)>,
}

impl Unworkable {
    /// The error at the first of its places that the file has.
    fn locate(self, text: &str, origin: &str) -> ConfigProblem {
        for (place, message) in &self.places {
            if let Some(err) = fail_at(text, place, message) {
                return locate(origin, text, &err);
            }
        }
        let (place, message) = &self.places[0];
        ConfigProblem::Unlocated {
            origin: origin.to_owned(),
            message: format!("{}: {message}", place.join(".")),
        }
    }
}

/// Durations, sizes and (with `check_relations`) their relations that cannot work, in the order
/// of the config reference.
fn unworkable_values(config: &Config, check_relations: bool) -> Vec<Unworkable> {
    let mut found = Found {
        unworkable: Vec::new(),
        check_relations,
    };
    found.duration(&["shutdown", "grace_period"], config.shutdown.grace_period, None);
    let storage = &config.storage;
    if storage.max_bytes.as_u64() < MIN_STORAGE_BYTES {
        found.push(&["storage", "max_bytes"], "must be at least 64 KiB".to_owned());
    }
    found.duration(
        &["storage", "dead_letter_retention"],
        storage.dead_letter_retention,
        None,
    );
    found.duration(
        &["storage", "lease_ttl"],
        storage.lease_ttl,
        Some((
            MIN_LEASE_TTL,
            "a replica renews its leases a few times per lease_ttl, and a database round trip must fit",
        )),
    );
    if storage.mode == StorageMode::Postgres && storage.url.as_ref().is_none_or(|url| url.0.is_empty()) {
        found.push(
            &["storage", "url"],
            "storage.mode postgres needs the database's url, e.g. url: ${DATABASE_URL}".to_owned(),
        );
    }
    if let Some(url) = &storage.url
        && !url.0.is_empty()
    {
        let has_ca_file = storage.tls.as_ref().is_some_and(|tls| tls.ca_file.is_some());
        if let Err(err) = postgres_url::parse_url(&url.0, has_ca_file) {
            found.push(&["storage", "url"], err);
        }
    }

    let hot_loop = |what: &'static str| Some((MIN_DELAY, what));
    for (name, stream) in &config.streams {
        let at = |keys: &[&'static str]| [&["streams", name.as_str()], keys].concat();
        found.duration(
            &at(&["idle_timeout"]),
            stream.idle_timeout,
            Some((MIN_DELAY, "every connection is dropped before it can receive anything")),
        );
        if let Some(rotate_after) = stream.rotate_after {
            found.duration(
                &at(&["rotate_after"]),
                rotate_after,
                Some((MIN_ROTATE_AFTER, "connections would overlap most of the time")),
            );
        }
        if let Some(ttl) = stream.ttl {
            found.duration(
                &at(&["ttl"]),
                ttl,
                Some((MIN_DELAY, "every instance would end as soon as it started")),
            );
        }
        let template_keys = stream.template_keys_set();
        if !stream.is_template() && !template_keys.is_empty() {
            found.push(
                &at(&[template_keys[0]]),
                format!(
                    "only a stream template takes {}: put {ID_PLACEHOLDER} in the url where the id goes, as in \
                     https://api.example.com/participants/{ID_PLACEHOLDER}/stream",
                    template_keys.join(", ")
                ),
            );
        }
        if stream.dynamic && stream.is_template() && config.admin.token.is_none() {
            found.push(
                &at(&["dynamic"]),
                "a dynamic template needs admin.token: the streams API that adds its instances must not be \
                 open to whoever reaches the admin port"
                    .to_owned(),
            );
        }
        if stream.is_template() && stream.ids.is_empty() && stream.ids_file.is_none() && !stream.dynamic {
            found.push(
                &at(&["url"]),
                format!(
                    "the url has {ID_PLACEHOLDER}, so this stream is a template: give it ids, an ids_file, or \
                     dynamic: true"
                ),
            );
        }
        if stream.max_event_bytes == 0 {
            found.push(
                &at(&["max_event_bytes"]),
                "must be at least 1, or every event is skipped".to_owned(),
            );
        }
        let reconnect = &stream.reconnect;
        found.duration(
            &at(&["reconnect", "initial_delay"]),
            reconnect.initial_delay,
            hot_loop("a failing upstream is reconnected to in a hot loop"),
        );
        found.duration(&at(&["reconnect", "max_delay"]), reconnect.max_delay, None);
        found.no_shorter(
            &at(&["reconnect"]),
            ("max_delay", reconnect.max_delay),
            ("initial_delay", reconnect.initial_delay),
            "",
        );
        found.duration(
            &at(&["reconnect", "auth_failure_delay"]),
            reconnect.auth_failure_delay,
            hot_loop("an upstream that refuses the credentials is reconnected to in a hot loop"),
        );
    }

    for (name, target) in &config.targets {
        let at = |keys: &[&'static str]| [&["targets", name.as_str()], keys].concat();
        found.duration(
            &at(&["timeout"]),
            target.timeout,
            Some((MIN_DELAY, "every request times out at once")),
        );
        let breaker = &target.circuit_breaker;
        found.duration(
            &at(&["circuit_breaker", "open_delay"]),
            breaker.open_delay,
            hot_loop("a failing target is probed in a hot loop"),
        );
        found.duration(
            &at(&["circuit_breaker", "max_open_delay"]),
            breaker.max_open_delay,
            None,
        );
        found.no_shorter(
            &at(&["circuit_breaker"]),
            ("max_open_delay", breaker.max_open_delay),
            ("open_delay", breaker.open_delay),
            "",
        );
        found.duration(
            &at(&["circuit_breaker", "window"]),
            breaker.window,
            Some((MIN_DELAY, "no attempt is ever recent enough to pause the target")),
        );
        let retry = &target.retry;
        found.duration(
            &at(&["retry", "initial_delay"]),
            retry.initial_delay,
            hot_loop("a failing target is retried in a hot loop"),
        );
        found.duration(&at(&["retry", "max_delay"]), retry.max_delay, None);
        found.no_shorter(
            &at(&["retry"]),
            ("max_delay", retry.max_delay),
            ("initial_delay", retry.initial_delay),
            "",
        );
        found.duration(&at(&["retry", "max_elapsed"]), retry.max_elapsed, None);
        found.no_shorter(
            &at(&["retry"]),
            ("max_elapsed", retry.max_elapsed),
            ("initial_delay", retry.initial_delay),
            ": no retry could start in time; to never retry, set max_attempts: 1",
        );
        if let Some(status) = retry
            .permanent_statuses
            .iter()
            .find(|status| retry.retry_statuses.contains(status))
        {
            found.push(
                &at(&["retry", "permanent_statuses"]),
                format!(
                    "{} is also in retry_statuses; a status is either retried or not",
                    status.0
                ),
            );
        }
    }
    found.unworkable
}

/// What `unworkable_values` has found so far.
struct Found {
    unworkable: Vec<Unworkable>,
    check_relations: bool,
}

impl Found {
    fn push(&mut self, place: &[&str], message: String) {
        self.unworkable.push(Unworkable {
            places: vec![(owned_keys(place), message)],
        });
    }

    /// A duration from `minimum` (with what goes wrong below it) up to `MAX_DURATION`.
    fn duration(&mut self, place: &[&str], value: Duration, minimum: Option<(Duration, &str)>) {
        match minimum {
            Some((minimum, or_else)) if value < minimum => {
                let minimum = humantime::format_duration(minimum);
                self.push(place, format!("must be at least {minimum}, or {or_else}"));
            }
            _ if value > MAX_DURATION => self.push(place, "must be at most 100 years".to_owned()),
            _ => {}
        }
    }

    /// `cap` must be no shorter than `start`, both fields of `section`: reported at `cap`, or at
    /// `start` when the file leaves `cap` at its default.
    fn no_shorter(
        &mut self,
        section: &[&str],
        (cap, cap_value): (&str, Duration),
        (start, start_value): (&str, Duration),
        consequence: &str,
    ) {
        if cap_value >= start_value || !self.check_relations {
            return;
        }
        let (cap_shown, start_shown) = (
            humantime::format_duration(cap_value),
            humantime::format_duration(start_value),
        );
        self.unworkable.push(Unworkable {
            places: vec![
                (
                    owned_keys(&[section, &[cap]].concat()),
                    format!("must not be shorter than {start} ({start_shown}){consequence}"),
                ),
                (
                    owned_keys(&[section, &[start]].concat()),
                    format!("must not be longer than {cap} ({cap_shown}){consequence}"),
                ),
            ],
        });
    }
}

fn owned_keys(keys: &[&str]) -> Vec<String> {
    keys.iter().map(|key| (*key).to_owned()).collect()
}

/// Deserializes `text` again down `path`, a list of mapping keys, and fails at the node found
/// there with `message`, so that serde_yaml attaches that node's line, column and path to it.
/// None when the file has no such node (the value is a default).
fn fail_at(text: &str, path: &[String], message: &str) -> Option<serde_yaml::Error> {
    struct FailAt<'a> {
        path: &'a [String],
        message: &'a str,
    }

    impl<'de> de::DeserializeSeed<'de> for FailAt<'_> {
        /// Whether the node was found (and the error is therefore never `Ok`).
        type Value = bool;

        fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
            if self.path.is_empty() {
                deserializer.deserialize_any(self)
            } else {
                deserializer.deserialize_map(self)
            }
        }
    }

    impl<'de> de::Visitor<'de> for FailAt<'_> {
        type Value = bool;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("any value")
        }

        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let Some((key, rest)) = self.path.split_first() else {
                return Err(de::Error::custom(self.message));
            };
            let mut found = false;
            while let Some(candidate) = map.next_key::<String>()? {
                if !found && candidate == *key {
                    found = map.next_value_seed(FailAt {
                        path: rest,
                        message: self.message,
                    })?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<bool, A::Error> {
            Err(de::Error::custom(self.message))
        }

        fn visit_str<E: de::Error>(self, _: &str) -> Result<bool, E> {
            Err(E::custom(self.message))
        }

        fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
            Err(E::custom(self.message))
        }

        fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
            Err(E::custom(self.message))
        }

        fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
            Err(E::custom(self.message))
        }

        fn visit_i128<E: de::Error>(self, _: i128) -> Result<bool, E> {
            Err(E::custom(self.message))
        }

        fn visit_u128<E: de::Error>(self, _: u128) -> Result<bool, E> {
            Err(E::custom(self.message))
        }

        fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
            Err(E::custom(self.message))
        }

        fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
            Err(E::custom(self.message))
        }
    }

    let seed = FailAt { path, message };
    de::DeserializeSeed::deserialize(seed, serde_yaml::Deserializer::from_str(text)).err()
}

/// Flow collections (`[...]`, `{...}`) nested deeper than this are refused before the YAML
/// parser sees them: its scanner takes time quadratic in their depth (128 KB of `[` took 15 s).
/// A config needs a handful of levels.
const MAX_FLOW_NESTING: usize = 64;

fn refuse_deep_nesting(text: &str, origin: &str) -> Result<(), ConfigError> {
    match find_deep_nesting(text) {
        Some((line, column)) => Err(ConfigError::from(ConfigProblem::Located {
            origin: origin.to_owned(),
            line,
            column,
            message: format!("collections nested more than {MAX_FLOW_NESTING} levels deep"),
        })),
        None => Ok(()),
    }
}

/// The line and column of the first `[` or `{` that opens a flow collection more than
/// `MAX_FLOW_NESTING` levels deep. A linear scan, not a YAML parser: it skips comments and quoted
/// scalars, and can be wrong only about brackets inside plain or block scalars, which no config
/// nests that deep. Lines and columns are counted as serde_yaml counts them.
fn find_deep_nesting(text: &str) -> Option<(usize, usize)> {
    #[derive(PartialEq)]
    enum Inside {
        Nothing,
        Comment,
        SingleQuoted,
        DoubleQuoted,
        DoubleQuotedEscape,
    }
    let mut inside = Inside::Nothing;
    let mut depth = 0;
    let (mut line, mut column) = (1, 1);
    // The character before, a line break as '\n'; none at the start of the text.
    let mut previous: Option<char> = None;
    let mut chars = text.strip_prefix('\u{feff}').unwrap_or(text).chars().peekable();
    while let Some(c) = chars.next() {
        let at = (line, column);
        let is_break = match c {
            '\r' => {
                chars.next_if_eq(&'\n');
                true
            }
            '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => true,
            _ => false,
        };
        if is_break {
            (line, column) = (line + 1, 1);
        } else {
            column += 1;
        }
        // Where a scalar or a comment may start: after a space or a line break, and inside a
        // flow collection also after an indicator, as in `["a","b"]` or `{"a":1}`.
        let after_space = previous.is_none_or(char::is_whitespace);
        let starts_node = after_space || (depth > 0 && previous.is_some_and(|p| "[{,:".contains(p)));
        inside = match inside {
            Inside::Comment if is_break => Inside::Nothing,
            // `''` is a quote inside the scalar.
            Inside::SingleQuoted if c == '\'' && chars.next_if_eq(&'\'').is_some() => {
                column += 1;
                Inside::SingleQuoted
            }
            Inside::SingleQuoted if c == '\'' => Inside::Nothing,
            Inside::DoubleQuoted if c == '\\' => Inside::DoubleQuotedEscape,
            Inside::DoubleQuoted if c == '"' => Inside::Nothing,
            Inside::DoubleQuotedEscape => Inside::DoubleQuoted,
            Inside::Nothing => match c {
                '#' if after_space => Inside::Comment,
                '\'' if starts_node => Inside::SingleQuoted,
                '"' if starts_node => Inside::DoubleQuoted,
                // Outside a flow collection, a bracket opens one only where a node starts;
                // `a[b` is plain text.
                '[' | '{' if depth > 0 || after_space => {
                    depth += 1;
                    if depth > MAX_FLOW_NESTING {
                        return Some(at);
                    }
                    Inside::Nothing
                }
                ']' | '}' => {
                    depth = usize::saturating_sub(depth, 1);
                    Inside::Nothing
                }
                _ => Inside::Nothing,
            },
            unchanged => unchanged,
        };
        previous = Some(if is_break { '\n' } else { c });
    }
    None
}

struct ParseContext {
    env: Rc<EnvLookup>,
    stream_names: BTreeSet<String>,
    target_names: BTreeSet<String>,
    n_literal_secrets: std::cell::Cell<usize>,
    written_as: RefCell<BTreeMap<String, String>>,
    urls_from_references: RefCell<BTreeSet<String>>,
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
                env: Rc::new(|name| std::env::var(name).ok()),
                stream_names: BTreeSet::new(),
                target_names: BTreeSet::new(),
                n_literal_secrets: std::cell::Cell::new(0),
                written_as: RefCell::default(),
                urls_from_references: RefCell::default(),
            }),
        }
    })
}

/// Expands `${VAR}`, `${VAR:-default}`, `${file:/path}`, `${cred:NAME}` and `$$` (a literal
/// `$`); any other `$` stays as it is.
pub fn expand_env(raw: &str, env: &EnvLookup) -> Result<String, String> {
    expand_with_recipe(raw, env).map(|(expanded, _)| expanded)
}

/// Like [`expand_env`], with the recipe to make the value again when it read files.
fn expand_with_recipe(raw: &str, env: &EnvLookup) -> Result<(String, Option<SecretRecipe>), String> {
    if !raw.contains('$') {
        return Ok((raw.to_owned(), None));
    }
    let mut expanded = String::with_capacity(raw.len());
    // The recipe's parts before the text expanded since the last file.
    let mut parts = Vec::new();
    let mut text_since_file = 0;
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
            let reference = &body[..close];
            match secret_file_path(reference, env)? {
                Some(path) => {
                    parts.push(RecipePart::Text(expanded[text_since_file..].to_owned()));
                    expanded.push_str(&read_secret_file(&path)?);
                    text_since_file = expanded.len();
                    parts.push(RecipePart::File(path));
                }
                None => expanded.push_str(&resolve_variable(reference, env)?),
            }
            rest = &body[close + 1..];
        } else {
            expanded.push('$');
            rest = after;
        }
    }
    expanded.push_str(rest);
    if parts.is_empty() {
        return Ok((expanded, None));
    }
    parts.push(RecipePart::Text(expanded[text_since_file..].to_owned()));
    parts.retain(|part| !matches!(part, RecipePart::Text(text) if text.is_empty()));
    Ok((expanded, Some(SecretRecipe { parts })))
}

/// The file a `${file:...}` or `${cred:...}` reference reads; none for a variable.
fn secret_file_path(reference: &str, env: &EnvLookup) -> Result<Option<std::path::PathBuf>, String> {
    if let Some(path) = reference.strip_prefix("file:") {
        return Ok(Some(Path::new(path).to_owned()));
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
        return Ok(Some(Path::new(&directory).join(name)));
    }
    Ok(None)
}

/// The value of a `${VAR}` or `${VAR:-default}` reference.
fn resolve_variable(reference: &str, env: &EnvLookup) -> Result<String, String> {
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
    let contents = read_regular_file(path, MAX_SECRET_FILE_BYTES)
        .map_err(|err| format!("cannot read the secret file {}: {err}", path.display()))?;
    Ok(contents.trim_end_matches(['\n', '\r']).to_owned())
}

/// The most a `${file:...}` or `${cred:...}` reference reads; README.md names it.
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// The largest config file that is read; README.md names it.
const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

/// Reads a regular file of at most `max_bytes` as text. Anything else is refused before a byte is
/// read: a device such as /dev/zero never ends, and a FIFO blocks until someone writes to it.
/// The file is opened without blocking (opening a FIFO waits for a writer otherwise) and checked
/// through the opened handle, so it cannot be swapped for another between the check and the read.
fn read_regular_file(path: &Path, max_bytes: u64) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read as _};

    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path)?;
    let metadata = file.metadata()?;
    let too_large = || {
        Error::new(
            ErrorKind::FileTooLarge,
            format!("larger than {}", bytes_for_people(max_bytes)),
        )
    };
    if !metadata.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    if metadata.len() > max_bytes {
        return Err(too_large());
    }
    // The file may grow after the check: one byte more than the limit tells.
    let mut contents = Vec::new();
    file.take(max_bytes + 1).read_to_end(&mut contents)?;
    if contents.len() as u64 > max_bytes {
        return Err(too_large());
    }
    String::from_utf8(contents).map_err(|_| Error::new(ErrorKind::InvalidData, "not UTF-8 text"))
}

/// `64 KiB`, `1 MiB`: the limits above as README.md writes them.
fn bytes_for_people(n_bytes: u64) -> String {
    match n_bytes {
        n if n >= 1024 * 1024 && n % (1024 * 1024) == 0 => format!("{} MiB", n / (1024 * 1024)),
        n if n >= 1024 && n % 1024 == 0 => format!("{} KiB", n / 1024),
        n => format!("{n} bytes"),
    }
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
    fn a_secret_that_read_files_is_made_again_from_them() {
        let directory = tempfile::tempdir().unwrap();
        let token = directory.path().join("token");
        std::fs::write(&token, "first\n").unwrap();
        let credentials = directory.path().display().to_string();
        let env: Box<EnvLookup> = Box::new(move |name| match name {
            "CREDENTIALS_DIRECTORY" => Some(credentials.clone()),
            "USER" => Some("relay".to_owned()),
            _ => None,
        });
        let raw = format!("${{USER}}:${{file:{}}}/$$/${{cred:token}}!", token.display());
        let (value, recipe) = expand_with_recipe(&raw, &*env).unwrap();
        assert_eq!(value, "relay:first/$/first!");
        let recipe = recipe.expect("the value read files");
        std::fs::write(&token, "second").unwrap();
        assert_eq!(recipe.make().unwrap(), "relay:second/$/second!");
        assert_eq!(recipe.files().count(), 2);
        assert!(!format!("{recipe:?}").contains("relay:"), "{recipe:?}");
        std::fs::remove_file(&token).unwrap();
        let err = recipe.make().unwrap_err();
        assert!(
            err.starts_with("cannot read the secret file ") && !err.contains("second"),
            "{err}"
        );
        // Without files there is nothing to make again.
        assert_eq!(
            expand_with_recipe("${USER}", &*env).unwrap(),
            ("relay".to_owned(), None)
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
