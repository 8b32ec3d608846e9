//! `sse-relay check`: the resolved configuration as a reader can check it, secrets masked.
//!
//! Header values are never shown (they are mostly credentials), target URLs show only scheme
//! and host unless marked `safe_url`, and stream URLs hide their query string, and their path
//! too when it came from a `${...}` reference. A value read from `${file:...}` or `${cred:...}`
//! is shown as it was written, never as what the file holds.

use std::fmt::Write as _;

use url::Url;

use crate::config::{Config, StreamConfig, TargetConfig, Text, TlsConfig};
use crate::delivery::display_url;

const MASK: &str = "***";

pub fn describe(config: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "admin\n  listen {}", config.admin.listen);
    describe_storage(&mut out, config);
    out.push_str("\nstreams\n");
    for (name, stream) in &config.streams {
        describe_stream(&mut out, config, name, stream);
    }
    out.push_str("\ntargets\n");
    for (name, target) in &config.targets {
        describe_target(&mut out, name, target);
    }
    describe_routes(&mut out, config);
    out
}

fn duration(duration: std::time::Duration) -> String {
    humantime::format_duration(duration).to_string()
}

fn describe_storage(out: &mut String, config: &Config) {
    let storage = &config.storage;
    match storage.mode {
        crate::config::StorageMode::Sqlite => {
            let _ = writeln!(
                out,
                "\nstorage\n  sqlite {} (nothing accepted is lost)\n  max_pending {}, max_bytes {}, dead letters kept {}",
                crate::queue::sqlite::database_path(&crate::config::StorageConfig {
                    path: Text(shown(config, &storage.path.0).to_owned()),
                    ..storage.clone()
                })
                .display(),
                storage.max_pending.0,
                storage.max_bytes,
                duration(storage.dead_letter_retention),
            );
        }
        crate::config::StorageMode::Memory => {
            let _ = writeln!(
                out,
                "\nstorage\n  memory (a crash or restart loses queued deliveries and each stream's Last-Event-ID; dead letters are not kept)\n  max_pending {}",
                storage.max_pending.0
            );
        }
        crate::config::StorageMode::Postgres => {
            let _ = writeln!(
                out,
                "\nstorage\n  {} (shared by the replicas; nothing accepted is lost)\n  lease_ttl {}, dead letters kept {}",
                crate::queue::postgres::describe(storage),
                duration(storage.lease_ttl),
                duration(storage.dead_letter_retention),
            );
            describe_tls(out, storage.tls.as_ref());
        }
    }
}

fn describe_stream(out: &mut String, config: &Config, name: &str, stream: &StreamConfig) {
    let url = if config.urls_from_references.contains(stream.url.0.as_str()) {
        display_url(&stream.url.0, false)
    } else {
        stream_display_url(&stream.url.0)
    };
    let url = url.replace("%7Bid%7D", crate::config::ID_PLACEHOLDER);
    let _ = writeln!(out, "  {name}\n    url {url}");
    for header in stream.headers.keys() {
        let _ = writeln!(out, "    header {}: {MASK}", header.0);
    }
    if stream.is_template() {
        describe_template(out, name, stream);
    }
    let pointers: Vec<&str> = stream.event_type.iter().map(|p| p.0.as_str()).collect();
    let keepalive: Vec<&str> = stream.keepalive.iter().map(|k| shown(config, &k.0)).collect();
    let reconnect = &stream.reconnect;
    let _ = writeln!(
        out,
        "    event type from {} else {}\n    keepalive {}\n    idle_timeout {}, max_event_bytes {}\n    \
         reconnect initial_delay {} doubling to max_delay {}, auth_failure_delay {}\n    rotate_after {}",
        if pointers.is_empty() {
            "the SSE event field".to_owned()
        } else {
            format!("the SSE event field, {}", pointers.join(", "))
        },
        shown(config, &stream.default_event_type.0),
        if keepalive.is_empty() {
            "none".to_owned()
        } else {
            keepalive.join(", ")
        },
        duration(stream.idle_timeout),
        stream.max_event_bytes,
        duration(reconnect.initial_delay),
        duration(reconnect.max_delay),
        duration(reconnect.auth_failure_delay),
        stream.rotate_after.map_or("off".to_owned(), duration),
    );
    describe_tls(out, stream.tls.as_ref());
}

/// A template's instances: how many from the config, whether the API adds more, and how one
/// ends.
fn describe_template(out: &mut String, name: &str, stream: &StreamConfig) {
    let mut sources = vec![format!("{} from ids", stream.ids.len())];
    if let Some(ids_file) = &stream.ids_file {
        sources.push(format!("{} from {}", ids_file.ids.len(), ids_file.path.display()));
    }
    if stream.dynamic {
        sources.push("more through the streams API (dynamic)".to_owned());
    }
    let _ = writeln!(
        out,
        "    template: {} instances named {name}/ID: {}",
        stream.fixed_ids().len(),
        sources.join(", ")
    );
    if let Some(stop_when) = &stream.stop_when {
        let events: Vec<&str> = stop_when.events.iter().map(|event| event.0.as_str()).collect();
        let mut condition = format!("events {}", events.join(", "));
        for (pointer, value) in &stop_when.where_equal {
            let _ = write!(condition, " where {} = {value}", pointer.0);
        }
        let _ = writeln!(out, "    an instance ends after an event that matches: {condition}");
    }
    if let Some(ttl) = stream.ttl {
        let _ = writeln!(out, "    an instance ends {} after it started (ttl)", duration(ttl));
    }
}

fn describe_target(out: &mut String, name: &str, target: &TargetConfig) {
    let _ = writeln!(out, "  {name}\n    url {}", display_url(&target.url.0, target.safe_url));
    for header in target.headers.keys() {
        let _ = writeln!(out, "    header {}: {MASK}", header.0);
    }
    let retry = &target.retry;
    let body = match &target.body {
        crate::config::BodyConfig::Data => "data".to_owned(),
        crate::config::BodyConfig::Envelope => "envelope".to_owned(),
        crate::config::BodyConfig::Pointer(pointer) => pointer.0.clone(),
    };
    let _ = writeln!(
        out,
        "    body {body}, timeout {}, max_in_flight {}, queue_capacity {}\n    retry up to {} attempts, {} doubling to {}, within {}",
        duration(target.timeout),
        target.max_in_flight.0,
        target.queue_capacity.0,
        retry.max_attempts.0,
        duration(retry.initial_delay),
        duration(retry.max_delay),
        duration(retry.max_elapsed),
    );
    let statuses = |statuses: &[crate::config::HttpStatus]| {
        let statuses: Vec<String> = statuses.iter().map(|status| status.0.to_string()).collect();
        statuses.join(", ")
    };
    if !retry.retry_statuses.is_empty() {
        let _ = writeln!(out, "    also retried: {}", statuses(&retry.retry_statuses));
    }
    if !retry.permanent_statuses.is_empty() {
        let _ = writeln!(out, "    not retried: {}", statuses(&retry.permanent_statuses));
    }
    let breaker = &target.circuit_breaker;
    let _ = writeln!(
        out,
        "    paused when {}% of at least {} attempts within {} failed, probe after {} doubling to {}",
        breaker.failure_rate.0,
        breaker.min_attempts.0,
        duration(breaker.window),
        duration(breaker.open_delay),
        duration(breaker.max_open_delay),
    );
    if let Some(limit) = target.rate_limit {
        let _ = writeln!(out, "    rate limit {} per {}", limit.n_requests, duration(limit.per));
    }
    if target.ordered {
        out.push_str("    ordered: one delivery in flight per stream\n");
    }
    if target.signing_secret.is_some() {
        let _ = writeln!(out, "    signed (Standard Webhooks), secret {MASK}");
    }
    describe_tls(out, target.tls.as_ref());
}

fn describe_routes(out: &mut String, config: &Config) {
    out.push_str("\nroutes (every matching route delivers; a target gets an event once)\n");
    if config.routes.is_empty() {
        out.push_str("  none: every event is counted as unrouted\n");
    }
    for (index, route) in config.routes.iter().enumerate() {
        let streams: Vec<String> = config
            .streams
            .keys()
            .filter(|name| route.stream.stream_part().matches(name))
            .map(|name| match route.stream.id_part() {
                Some(ids) => format!("{name} (instances with ids {})", ids.0),
                None => name.clone(),
            })
            .collect();
        let events: Vec<&str> = route.events.iter().map(|e| shown(config, &e.0)).collect();
        let targets: Vec<&str> = route.targets.iter().map(|t| t.0.as_str()).collect();
        let _ = write!(
            out,
            "  {}. streams {} | events {}",
            index + 1,
            streams.join(", "),
            events.join(", ")
        );
        for (pointer, value) in &route.where_equal {
            let _ = write!(out, " | where {} = {value}", pointer.0);
        }
        let _ = writeln!(out, " -> {}", targets.join(", "));
    }
}

/// A `tls` section: the files it names (never what a key file holds). Without one, only the
/// system's store and the bundled roots are trusted, which is said once, in the header.
fn describe_tls(out: &mut String, tls: Option<&TlsConfig>) {
    let Some(tls) = tls else {
        return;
    };
    if let Some(ca_file) = &tls.ca_file {
        let _ = writeln!(
            out,
            "    tls trusts {} ({} certificates) besides the system's store",
            ca_file.path,
            ca_file.certificates.len()
        );
    }
    if let Some(identity) = &tls.client_identity {
        let _ = writeln!(
            out,
            "    tls client certificate {}, key {}",
            identity.certificates.path, identity.key.path
        );
    }
}

/// A value as `check` shows it: one read from a file or a credential as it was written.
fn shown<'a>(config: &'a Config, value: &'a str) -> &'a str {
    config.written_as.get(value).map_or(value, String::as_str)
}

/// Scheme, host, port and path; a query string may hold a token, so it is masked.
fn stream_display_url(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.query().is_some() {
        shown.set_query(Some(MASK));
    }
    let _ = shown.set_password(None);
    if !shown.username().is_empty() {
        let _ = shown.set_username(MASK);
    }
    shown.to_string()
}

/// Warnings about settings that work but can surprise: memory storage forgets where each stream
/// was, so an upstream that replays its buffer delivers the same events again after a restart.
pub fn config_warnings(config: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    if config.storage.mode == crate::config::StorageMode::Memory {
        warnings.push(
            "storage.mode is memory: a restart loses the queued deliveries and each stream's Last-Event-ID, \
             so an upstream that replays its buffer to a new connection (Nchan does by default) has those \
             events delivered again, under new Idempotency-Keys; storage.mode: sqlite keeps both"
                .to_owned(),
        );
    }
    warnings
}

/// Warnings about the config file itself: literal credentials in a file every user can read.
pub fn file_warnings(path: &std::path::Path, config: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let world_readable = std::fs::metadata(path).is_ok_and(|metadata| metadata.permissions().mode() & 0o004 != 0);
        if world_readable && config.n_literal_secrets > 0 {
            warnings.push(format!(
                "{} is readable by every user and holds {} credential(s) written literally; \
                 chmod 600 it, or read them with ${{VAR}}, ${{file:/path}} or ${{cred:NAME}}",
                path.display(),
                config.n_literal_secrets
            ));
        }
    }
    warnings
}
