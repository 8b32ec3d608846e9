//! Properties of the pure parts over generated inputs: config text in, a config or an error
//! naming the place out; one SSE message in, a keepalive or its targets out. The fuzz targets in
//! fuzz/ run the same boundaries for longer; these run with every `cargo test`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use proptest::prelude::{Just, ProptestConfig, Strategy, any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest};
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use sse_relay::classify::{Classified, Classifier, SseMessage};
use sse_relay::config::{Config, ConfigError, ConfigProblem, StreamConfig};
use sse_relay::delivery::TargetRuntime;
use sse_relay::event::{Event, EventId, TargetId};
use sse_relay::routing::RoutingTable;
use sse_relay::source::StreamRuntime;

use crate::support::parse_config;

/// Proptest's default of 256 cases finds the shallow bugs in a second or two; PROPTEST_CASES
/// raises it for a longer search. Failures are not written to disk: a failing case belongs in a
/// data-driven test next to its kind.
fn proptest_config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// Config text in, a config or an error out.

const ENV: &[(&str, &str)] = &[("TOKEN", "t0k"), ("SIGNING", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")];

const VALID_CONFIG: &str = r#"
streams:
  participant:
    url: http://127.0.0.1:1/participants/42/stream
    headers: { Authorization: "Bearer ${TOKEN}" }
    event_type: [/eventType]
    keepalive: [KEEP_ALIVE]
  chat:
    url: ${CHAT_URL:-http://127.0.0.1:1/chat}/listen
    event_type: [/type]
    default_event_type: workflow_update
    reconnect: { initial_delay: 500ms, max_delay: 30s }
targets:
  zapier:
    url: http://127.0.0.1:2/zapier
    rate_limit: 30/s
    retry: { max_attempts: 10, initial_delay: 1s }
  n8n:
    url: http://127.0.0.1:2/n8n
    body: envelope
    signing_secret: ${SIGNING}
routes:
  - stream: participant
    events: [MESSAGE_SENT, ACTION_PLAN_CARD*]
    targets: [zapier]
  - stream: "*"
    events: [workflow_status]
    where: { /node_execution/status: completed }
    targets: [n8n]
"#;

/// Pieces of config text, valid and not, that the loader's branches look for.
const FRAGMENTS: &[&str] = &[
    "streams:",
    "targets:",
    "routes:",
    "admin:",
    "storage:",
    "\n  chat:",
    "\n    url: ",
    "http://127.0.0.1:1/x",
    "ftp://x",
    "${TOKEN}",
    "${UNSET:-fallback}",
    "${UNSET}",
    "${1X}",
    "${",
    "$$",
    "${cred:token}",
    "${file:/nonexistent/secret}",
    "\n  - stream: ",
    "\n    events: [\"*\", MESSAGE_SENT]",
    "\n    targets: [n8n]",
    "\n    where: { /a/b: 1 }",
    "max_in_flight: 0",
    "timeout: 5s",
    "rate_limit: 30/s",
    "body: /payload",
    "keepalive: [keepalive]",
    "event_type: [/type]",
    "- ",
    ": ",
    "{",
    "}",
    "[",
    "]",
    "\"",
    "'",
    "# ",
    "&anchor ",
    "*anchor",
    "<<: ",
    "!!str ",
    "|\n  ",
    "\n",
    "\r\n",
    "\t",
    "\u{feff}",
    "\u{85}",
];

/// Checks what the loader promises about any text: a config with at least one stream whose
/// routes name configured targets, or errors that name the origin and, when they have one, a
/// 1-based place inside the text.
fn check_parse_outcome(text: &str, outcome: Result<Config, ConfigError>) -> Result<(), TestCaseError> {
    let problems = match outcome {
        Ok(config) => {
            prop_assert!(!config.streams.is_empty());
            for route in &config.routes {
                prop_assert!(config.streams.keys().any(|name| route.stream.0.matches(name)));
                for target in &route.targets {
                    prop_assert!(config.targets.contains_key(&target.0), "unknown target {:?}", target.0);
                }
            }
            return Ok(());
        }
        Err(err) => err.problems,
    };
    prop_assert!(!problems.is_empty());
    for problem in problems {
        let message = problem.to_string();
        match problem {
            ConfigProblem::Located { line, column, .. } => {
                prop_assert!(line >= 1 && column >= 1, "{}", message);
                prop_assert!(
                    line <= count_yaml_lines(text) + 1,
                    "{} is past the end of the text",
                    message
                );
                let prefix = format!("test.yaml:{line}:{column}: ");
                prop_assert!(message.starts_with(&prefix), "{}", message);
            }
            ConfigProblem::Unlocated { .. } => prop_assert!(message.starts_with("test.yaml: "), "{}", message),
            ConfigProblem::Read { .. } => prop_assert!(false, "parse read a file: {message}"),
        }
    }
    Ok(())
}

/// Lines as YAML counts them: `\r\n`, `\r`, `\n`, NEL, LS and PS each end one.
fn count_yaml_lines(text: &str) -> usize {
    let mut n_lines = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                chars.next_if_eq(&'\n');
                n_lines += 1;
            }
            '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => n_lines += 1,
            _ => {}
        }
    }
    n_lines
}

/// Text made of loader-relevant fragments and short arbitrary strings.
fn fragment_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => prop::sample::select(FRAGMENTS).prop_map(str::to_owned),
        1 => "\\PC{0,6}",
    ];
    prop::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
}

/// The valid config with a few fragments inserted and a few ranges cut out.
fn mutated_config() -> impl Strategy<Value = String> {
    let insertion = (any::<Index>(), prop::sample::select(FRAGMENTS));
    let cut = (any::<Index>(), 1..20usize);
    (prop::collection::vec(insertion, 0..4), prop::collection::vec(cut, 0..3)).prop_map(|(insertions, cuts)| {
        let mut text = VALID_CONFIG.to_owned();
        for (at, fragment) in insertions {
            let at = char_boundary(&text, at.index(text.len() + 1));
            text.insert_str(at, fragment);
        }
        for (at, length) in cuts {
            let start = char_boundary(&text, at.index(text.len() + 1));
            let end = char_boundary(&text, (start + length).min(text.len()));
            text.replace_range(start..end, "");
        }
        text
    })
}

fn char_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// A field that breaks validation, written on one line at four spaces of indent, with where
/// in the line the error points and what its message says.
struct InvalidField {
    line: &'static str,
    error_offset: usize,
    message: &'static str,
}

const INVALID_STREAM_FIELDS: &[InvalidField] = &[
    InvalidField {
        line: "event_type: [eventType]",
        error_offset: 13,
        message: "`eventType` is not a JSON pointer",
    },
    InvalidField {
        line: "idle_timeout: soon",
        error_offset: 14,
        message: "is not a duration: write one like `30s`, `500ms` or `2m`",
    },
    InvalidField {
        line: "default_event_type: ${MISSING}",
        error_offset: 20,
        message: "environment variable MISSING is not set",
    },
    InvalidField {
        line: "headers: { Authorization: \"${1X}\" }",
        error_offset: 26,
        message: "`${1X}` is not a variable reference",
    },
    InvalidField {
        line: "reconnect: { max_delay: 5 parsecs }",
        error_offset: 24,
        message: "is not a duration: write one like `30s`, `500ms` or `2m`",
    },
    InvalidField {
        line: "colour: blue",
        error_offset: 0,
        message: "unknown key `colour`",
    },
    InvalidField {
        line: "idle_timeout: 0s",
        error_offset: 14,
        message: "must be at least 1ms",
    },
    InvalidField {
        line: "reconnect: { initial_delay: 2s, max_delay: 1s }",
        error_offset: 43,
        message: "must not be shorter than initial_delay (2s)",
    },
];

const INVALID_TARGET_FIELDS: &[InvalidField] = &[
    InvalidField {
        line: "max_in_flight: 0",
        error_offset: 15,
        message: "must be at least 1",
    },
    InvalidField {
        line: "timeout: ten seconds",
        error_offset: 9,
        message: "is not a duration: write one like `30s`, `500ms` or `2m`",
    },
    InvalidField {
        line: "body: payload",
        error_offset: 6,
        message: "body `payload` is not one of data, envelope or a JSON pointer",
    },
    InvalidField {
        line: "rate_limit: 0/s",
        error_offset: 12,
        message: "a rate must allow at least 1 a second, minute or hour",
    },
    InvalidField {
        line: "retry: { max_attempts: 0 }",
        error_offset: 23,
        message: "must be at least 1",
    },
    InvalidField {
        line: "headers: { X-Token: \"${MISSING}\" }",
        error_offset: 20,
        message: "environment variable MISSING is not set",
    },
    InvalidField {
        line: "ordered: maybe",
        error_offset: 9,
        message: "expected true or false, found `maybe`",
    },
    InvalidField {
        line: "timeout: 0s",
        error_offset: 9,
        message: "must be at least 1ms",
    },
    InvalidField {
        line: "circuit_breaker: { open_delay: 1h }",
        error_offset: 31,
        message: "must not be longer than max_open_delay (5m)",
    },
];

const VALID_STREAM_FIELDS: &[&str] = &[
    "headers: { Authorization: \"Bearer ${TOKEN}\" }",
    "event_type: [/eventType, /type]",
    "default_event_type: update",
    "keepalive: [KEEP_ALIVE, keepalive]",
    "idle_timeout: 10s",
    "max_event_bytes: 4096",
    "reconnect: { initial_delay: 1s }",
];

const VALID_TARGET_FIELDS: &[&str] = &[
    "headers: { X-Token: \"${TOKEN:-none}\" }",
    "safe_url: true",
    "timeout: 5s",
    "max_in_flight: 4",
    "body: envelope",
    "rate_limit: 30/s",
    "ordered: true",
    "retry: { max_attempts: 3, max_delay: 1m }",
    "signing_secret: ${SIGNING}",
];

fn field_key(line: &str) -> &str {
    line.split(':').next().unwrap()
}

/// Stream or target names: as people write them, and plain scalars that YAML could read as
/// something other than a string.
fn names() -> impl Strategy<Value = BTreeSet<String>> {
    let name = prop_oneof![
        3 => "[a-z][a-z0-9_-]{0,8}",
        1 => prop::sample::select(&["null", "~", "true", "no", "1", "1.5", "0x1f", ".inf", "<<"][..])
            .prop_map(str::to_owned),
    ];
    prop::collection::btree_set(name, 1..4)
}

/// A config of generated streams and targets, each with some valid fields in any order.
#[derive(Debug, Clone)]
struct GeneratedConfig {
    streams: Vec<(String, Vec<&'static str>)>,
    targets: Vec<(String, Vec<&'static str>)>,
}

impl GeneratedConfig {
    /// The text, one line per field.
    fn lines(&self) -> Vec<String> {
        let mut lines = vec!["streams:".to_owned()];
        for (name, fields) in &self.streams {
            lines.push(format!("  {name}:"));
            lines.push(format!("    url: http://127.0.0.1:1/{name}"));
            lines.extend(fields.iter().map(|field| format!("    {field}")));
        }
        lines.push("targets:".to_owned());
        for (name, fields) in &self.targets {
            lines.push(format!("  {name}:"));
            lines.push(format!("    url: http://127.0.0.1:2/{name}"));
            lines.extend(fields.iter().map(|field| format!("    {field}")));
        }
        lines
    }
}

fn entities(
    names: impl Strategy<Value = BTreeSet<String>>,
    fields: &'static [&'static str],
) -> impl Strategy<Value = Vec<(String, Vec<&'static str>)>> {
    names.prop_flat_map(move |names| {
        let n_names = names.len();
        let field_sets = prop::collection::vec(
            prop::sample::subsequence(fields, 0..=fields.len()).prop_shuffle(),
            n_names,
        );
        (Just(names), field_sets).prop_map(|(names, field_sets)| names.into_iter().zip(field_sets).collect())
    })
}

fn generated_config() -> impl Strategy<Value = GeneratedConfig> {
    (
        entities(names(), VALID_STREAM_FIELDS),
        entities(names(), VALID_TARGET_FIELDS),
    )
        .prop_map(|(streams, targets)| GeneratedConfig { streams, targets })
}

/// Escapes any string for the inside of a YAML double-quoted scalar.
fn yaml_escaped(text: &str) -> String {
    let mut escaped = String::new();
    for c in text.chars() {
        match c {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            ' '..='~' => escaped.push(c),
            c if u32::from(c) <= 0xffff => escaped.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => escaped.push_str(&format!("\\U{:08x}", u32::from(c))),
        }
    }
    escaped
}

proptest! {
    #![proptest_config(proptest_config())]

    /// Any bytes: a config, or an error that names the origin and a place inside the text.
    #[test]
    fn the_loader_survives_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        check_parse_outcome(&text, parse_config(&text, ENV))?;
    }

    /// Text that gets past YAML more often: loader-relevant fragments, and the valid config
    /// with fragments inserted and pieces cut out.
    #[test]
    fn the_loader_survives_config_like_text(text in prop_oneof![fragment_text(), mutated_config()]) {
        check_parse_outcome(&text, parse_config(&text, ENV))?;
    }

    /// Generated valid configs load, with every stream and target under its own name.
    #[test]
    fn generated_configs_load_with_their_names(generated in generated_config()) {
        let text = generated.lines().join("\n");
        let config = parse_config(&text, ENV).map_err(|err| TestCaseError::fail(format!("{err}\n{text}")))?;
        let stream_names: Vec<&String> = config.streams.keys().collect();
        let expected: Vec<&String> = generated.streams.iter().map(|(name, _)| name).collect();
        prop_assert_eq!(stream_names, expected);
        let target_names: Vec<&String> = config.targets.keys().collect();
        let expected: Vec<&String> = generated.targets.iter().map(|(name, _)| name).collect();
        prop_assert_eq!(target_names, expected);
    }

    /// One invalid field anywhere in a generated config is reported at its own line and column,
    /// with its own message.
    #[test]
    fn an_invalid_field_is_reported_at_its_place(
        generated in generated_config(),
        in_a_stream in any::<bool>(),
        which_entity in any::<Index>(),
        which_field in any::<Index>(),
        position in any::<Index>(),
    ) {
        let mut generated = generated;
        let (entities, invalid_fields) = if in_a_stream {
            (&mut generated.streams, INVALID_STREAM_FIELDS)
        } else {
            (&mut generated.targets, INVALID_TARGET_FIELDS)
        };
        let invalid = which_field.get(invalid_fields);
        let entity_index = which_entity.index(entities.len());
        let fields = &mut entities[entity_index].1;
        // A second field of the same name would be an error of its own.
        fields.retain(|field| field_key(field) != field_key(invalid.line));
        fields.insert(position.index(fields.len() + 1), invalid.line);
        let lines = generated.lines();
        let expected_line = 1 + lines.iter().position(|line| line.trim_start() == invalid.line).unwrap();
        let text = lines.join("\n");

        let err = parse_config(&text, ENV).expect_err(&text);
        let message = err.to_string();
        let [ConfigProblem::Located { line, column, .. }] = err.problems[..] else {
            return Err(TestCaseError::fail(format!("not one located problem: {message}")));
        };
        prop_assert_eq!((line, column), (expected_line, 4 + invalid.error_offset + 1), "{}\n{}", message, text);
        prop_assert!(message.contains(invalid.message), "{}", message);
    }

    /// A stream or target defined twice is an error at the second definition that names the
    /// first, whatever the name; neither is silently dropped.
    #[test]
    fn a_name_defined_twice_is_reported_with_both_lines(
        generated in generated_config(),
        in_a_stream in any::<bool>(),
        which_entity in any::<Index>(),
    ) {
        let mut generated = generated;
        let entities = if in_a_stream { &mut generated.streams } else { &mut generated.targets };
        let repeated = which_entity.get(entities).clone();
        entities.push(repeated.clone());
        let lines = generated.lines();
        let section = if in_a_stream { "streams" } else { "targets" };
        let definition = format!("  {}:", repeated.0);
        // The section's lines: streams come first, then targets.
        let targets_line = lines.iter().position(|line| line == "targets:").unwrap();
        let (start, end) = if in_a_stream { (0, targets_line) } else { (targets_line, lines.len()) };
        let definitions: Vec<usize> = (start..end).filter(|&index| lines[index] == definition).collect();
        let (first_line, repeat_line) = (1 + definitions[0], 1 + definitions[definitions.len() - 1]);
        let text = lines.join("\n");

        let err = parse_config(&text, ENV).expect_err(&text);
        prop_assert_eq!(
            err.to_string(),
            format!("test.yaml:{repeat_line}:3: {section}: duplicate key `{}` (first defined at line {first_line})", repeated.0),
            "{}",
            text
        );
    }

    /// A `${VAR}` value reaches the config exactly as the environment has it, whatever it
    /// holds: it is not read as YAML, and not expanded again.
    #[test]
    fn env_values_reach_the_config_unchanged(value in any::<String>()) {
        let text = "streams:\n  chat:\n    url: http://127.0.0.1:1/chat\n    \
            default_event_type: ${VALUE}\n    keepalive: [\"<${VALUE}>\"]\ntargets: {}\n";
        let config = parse_config(text, &[("VALUE", &value)]).map_err(|err| TestCaseError::fail(err.to_string()))?;
        let chat = &config.streams["chat"];
        prop_assert_eq!(&chat.default_event_type.0, &value);
        prop_assert_eq!(&chat.keepalive[0].0, &format!("<{value}>"));
    }

    /// What the config accepts, a stream and a target can start with: any header value and URL
    /// path from the environment either builds both, unchanged, or is refused at its place,
    /// naming its reference and not its value.
    #[test]
    fn what_the_config_accepts_a_relay_can_start_with(value in env_value(), path in env_value()) {
        let text = "streams:\n  chat:\n    url: http://127.0.0.1:1/${PATH}\n    headers: { X-Value: \"${VALUE}\" }\n\
            targets:\n  n8n:\n    url: http://127.0.0.1:2/${PATH}\n    headers: { X-Value: \"${VALUE}\" }\n";
        let err = match parse_config(text, &[("VALUE", &value), ("PATH", &path)]) {
            Ok(config) => return can_start(&config, &value),
            Err(err) => err,
        };
        for problem in err.problems {
            let message = problem.to_string();
            let ConfigProblem::Located { line, .. } = problem else {
                return Err(TestCaseError::fail(format!("not located: {message}")));
            };
            let reference = if [3, 7].contains(&line) { "${PATH}" } else { "${VALUE}" };
            prop_assert!([3, 4, 7, 8].contains(&line), "{}", message);
            prop_assert!(message.contains(reference) || message.contains("invalid url"), "{}", message);
            prop_assert!(value.chars().count() < 4 || !message.contains(&value), "{}", message);
        }
    }
    /// A default is used as written when the variable is unset; `$$` is a literal `$`.
    #[test]
    fn defaults_and_escaped_dollars_are_taken_literally(default in "[^}]*", literal in any::<String>()) {
        let text = format!(
            "streams:\n  chat:\n    url: http://127.0.0.1:1/chat\n    \
             default_event_type: \"${{UNSET:-{}}}\"\n    keepalive: [\"{}\"]\ntargets: {{}}\n",
            yaml_escaped(&default),
            yaml_escaped(&literal.replace('$', "$$")),
        );
        let config = parse_config(&text, &[]).map_err(|err| TestCaseError::fail(format!("{err}\n{text}")))?;
        let chat = &config.streams["chat"];
        prop_assert_eq!(&chat.default_event_type.0, &default);
        prop_assert_eq!(&chat.keepalive[0].0, &literal);
    }
}

/// Any text, often ASCII with control characters, which HTTP headers and URLs cannot carry.
fn env_value() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[\\x00-\\x7f]{0,16}"]
}

/// Builds the stream's and the target's runtimes, and their HTTP requests, as `run` does.
fn can_start(config: &Config, value: &str) -> Result<(), TestCaseError> {
    let metrics = sse_relay::telemetry::Metrics::new();
    let (chat, n8n) = (&config.streams["chat"], &config.targets["n8n"]);
    let table = RoutingTable::new(config);
    let client = reqwest::Client::new();
    let instance = &config.stream_instances()["chat"];
    let limiter = Arc::new(sse_relay::source::ConnectLimiter::new(config.connections.rate));
    let stream = StreamRuntime::new(
        instance,
        &table,
        Arc::new(metrics.stream("chat")),
        &sse_relay::transport::StreamClient::Reqwest(client.clone()),
        None,
        limiter,
    );
    prop_assert!(stream.is_ok(), "{:?}", stream.err());
    let mut events = eventsource_client::ClientBuilder::for_url(chat.url.0.as_str())
        .map_err(|err| TestCaseError::fail(err.to_string()))?;
    for (name, header) in &chat.headers {
        prop_assert_eq!(&header.0, value);
        if !header.0.is_empty() {
            events = events
                .header(&name.0, &header.0)
                .map_err(|err| TestCaseError::fail(err.to_string()))?;
        }
    }
    let target = TargetRuntime::new(TargetId(0), n8n, std::sync::Arc::new(metrics.target("n8n")));
    let target = target.map_err(|err| TestCaseError::fail(err.to_string()))?;
    let request = client
        .post(target.url.clone())
        .headers(target.headers.current().map.clone())
        .build();
    prop_assert!(request.is_ok(), "{:?}", request.err());
    Ok(())
}

// One SSE message in, a keepalive or its targets out.

const ROUTING_CONFIG: &str = r#"
streams:
  participant:
    url: http://127.0.0.1:1/participants/42/stream
    event_type: [/eventType]
    keepalive: [KEEP_ALIVE]
  chat:
    url: http://127.0.0.1:1/api/v1/chat-internal-messages/3f1c/listen
    event_type: [/type, /event/type]
    default_event_type: workflow_update
    keepalive: [keepalive, ""]
  audit-log:
    url: http://127.0.0.1:1/audit
targets:
  zapier: { url: "http://127.0.0.1:2/zapier" }
  n8n: { url: "http://127.0.0.1:2/n8n" }
  archive: { url: "http://127.0.0.1:2/archive" }
  alerts: { url: "http://127.0.0.1:2/alerts" }
routes:
  - stream: participant
    events: [MESSAGE_SENT, ACTION_PLAN_CARD*]
    targets: [zapier]
  - stream: chat
    events: [workflow_update]
    where: { /node_execution/status: completed }
    targets: [n8n]
  - stream: "*"
    events: [CHAT_SESSION_MEMBER_*, workflow_status, "?RROR"]
    targets: [n8n, zapier]
  - stream: "audit*"
    targets: [archive]
  - stream: "c?at"
    events: ["*"]
    where: { /priority: 1, /flags/urgent: true, /owner: null }
    targets: [alerts, alerts]
  - stream: participant
    events: [message]
    where: { "/a~1b/~0c": [1, "x"] }
    targets: [archive, zapier]
"#;

/// Event types that the routing config names or nearly names.
const EVENT_TYPES: &[&str] = &[
    "",
    "message",
    "MESSAGE_SENT",
    "MESSAGE_SENT_2",
    "ACTION_PLAN_CARD",
    "ACTION_PLAN_CARDS_ADDED",
    "CHAT_SESSION_MEMBER_JOINED",
    "CHAT_SESSION_MEMBER",
    "workflow_update",
    "workflow_status",
    "ERROR",
    "ERRROR",
    "KEEP_ALIVE",
    "keepalive",
    "é",
];

struct Routing {
    config: Config,
    table: RoutingTable,
    /// In `StreamId` order, which is the config's (sorted) stream order.
    classifiers: Vec<Classifier>,
}

impl Routing {
    fn new(text: &str) -> Routing {
        let config = parse_config(text, &[]).unwrap_or_else(|err| panic!("{err}"));
        let table = RoutingTable::new(&config);
        let classifiers = config
            .streams
            .iter()
            .map(|(name, stream)| {
                let stream_id = table.stream_id(name).unwrap();
                Classifier::new(Arc::from(name.as_str()), stream, table.exact_event_types(stream_id))
            })
            .collect();
        Routing {
            config,
            table,
            classifiers,
        }
    }

    fn stream(&self, index: usize) -> (&String, &StreamConfig) {
        self.config.streams.iter().nth(index).unwrap()
    }

    /// Classifies the message on the stream and routes it: `None` for a keepalive, else the
    /// event and the names of its targets.
    fn accept(&self, stream_index: usize, message: SseMessage) -> Option<(Event, Vec<String>)> {
        let (name, _) = self.stream(stream_index);
        match self.classifiers[stream_index].classify(message, SystemTime::now()) {
            Classified::Keepalive => None,
            Classified::Event { event, .. } => {
                let targets = self.route(name, &event);
                Some((event, targets))
            }
        }
    }

    fn route(&self, stream_name: &str, event: &Event) -> Vec<String> {
        let mut targets = Vec::new();
        self.table
            .route(self.table.stream_id(stream_name).unwrap(), event, &mut targets);
        targets
            .iter()
            .map(|id| self.table.target_name(*id).to_string())
            .collect()
    }
}

/// The targets of every route whose stream pattern, event patterns and `where` values match,
/// each once, in route order: the config read plainly, with a matcher of its own.
fn expected_targets(
    config: &Config,
    stream_name: &str,
    event_type: &str,
    json: Option<&serde_json::Value>,
) -> Vec<String> {
    let mut expected: Vec<String> = Vec::new();
    for route in &config.routes {
        let matches = glob_matches(&route.stream.0.0, stream_name)
            && route.events.iter().any(|pattern| glob_matches(&pattern.0, event_type))
            && route
                .where_equal
                .iter()
                .all(|(pointer, value)| json.and_then(|json| json.pointer(&pointer.0)) == Some(value));
        if matches {
            for target in &route.targets {
                if !expected.contains(&target.0) {
                    expected.push(target.0.clone());
                }
            }
        }
    }
    expected
}

/// `*` matches any run of characters, `?` exactly one.
fn glob_matches(pattern: &str, name: &str) -> bool {
    fn matches(pattern: &[char], name: &[char]) -> bool {
        match pattern.split_first() {
            None => name.is_empty(),
            Some(('*', rest)) => (0..=name.len()).any(|skip| matches(rest, &name[skip..])),
            Some(('?', rest)) => !name.is_empty() && matches(rest, &name[1..]),
            Some((c, rest)) => name.first() == Some(c) && matches(rest, &name[1..]),
        }
    }
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    matches(&pattern, &name)
}

/// The SSE `event:` field unless empty or `message`; else the first JSON pointer that yields a
/// string; else the stream's default.
fn expected_event_type(stream: &StreamConfig, sse_event: &str, json: Option<&serde_json::Value>) -> String {
    if !sse_event.is_empty() && sse_event != "message" {
        return sse_event.to_owned();
    }
    json.and_then(|json| {
        stream
            .event_type
            .iter()
            .find_map(|pointer| json.pointer(&pointer.0).and_then(serde_json::Value::as_str))
    })
    .unwrap_or(&stream.default_event_type.0)
    .to_owned()
}

fn event_type() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(EVENT_TYPES).prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

/// JSON objects with the fields that the routing config's pointers and `where` filters read.
fn json_data() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        Just(serde_json::json!(1)),
        Just(serde_json::json!(1.0)),
        Just(serde_json::json!("1")),
        Just(serde_json::json!(true)),
        Just(serde_json::json!(null)),
        Just(serde_json::json!("completed")),
        Just(serde_json::json!([1, "x"])),
        event_type().prop_map(serde_json::Value::from),
    ];
    let keys = prop::sample::select(
        &[
            "/eventType",
            "/type",
            "/event/type",
            "/node_execution/status",
            "/priority",
            "/flags/urgent",
            "/owner",
            "/a~1b/~0c",
        ][..],
    );
    prop::collection::vec((keys, scalar), 0..6).prop_map(|fields| {
        let mut object = serde_json::json!({});
        for (pointer, value) in fields {
            set_pointer(&mut object, pointer, value);
        }
        object.to_string()
    })
}

/// Sets the value at a JSON pointer, making objects on the way.
fn set_pointer(json: &mut serde_json::Value, pointer: &str, value: serde_json::Value) {
    let mut here = json;
    let tokens: Vec<String> = pointer[1..]
        .split('/')
        .map(|token| token.replace("~1", "/").replace("~0", "~"))
        .collect();
    for (index, token) in tokens.iter().enumerate() {
        if !here.is_object() {
            *here = serde_json::json!({});
        }
        let object = here.as_object_mut().unwrap();
        if index + 1 == tokens.len() {
            object.insert(token.clone(), value);
            return;
        }
        here = object.entry(token.clone()).or_insert_with(|| serde_json::json!({}));
    }
}

fn data() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => json_data(),
        1 => prop::sample::select(&["keepalive", "KEEP_ALIVE", "", " {", "[1,2]", "not json"][..])
            .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

proptest! {
    #![proptest_config(proptest_config())]

    /// Classification and routing agree with a plain reading of the config: keepalives are never
    /// routed, the type comes from the SSE field, then the pointers, then the default,
    /// the data is kept byte for byte, and the targets are exactly the matching routes' targets.
    #[test]
    fn classify_and_route_follow_the_config(
        stream_index in 0..3usize,
        sse_event in event_type(),
        data in data(),
        id in prop::option::of(any::<String>()),
    ) {
        let routing = Routing::new(ROUTING_CONFIG);
        let (stream_name, stream) = routing.stream(stream_index);
        let is_keepalive = |text: &str| stream.keepalive.iter().any(|keepalive| keepalive.0 == text);
        // Empty data is no event in SSE; the classifier counts it with the keepalives.
        let is_noise = |data: &str, event_type: &str| is_keepalive(data) || is_keepalive(event_type);
        let json: Option<serde_json::Value> = matches!(data.trim_start().chars().next(), Some('{' | '['))
            .then(|| serde_json::from_str(&data).ok())
            .flatten();
        let event_type = expected_event_type(stream, &sse_event, json.as_ref());
        let message = SseMessage { event: sse_event.clone(), data: data.clone(), id: id.clone() };

        match routing.accept(stream_index, message) {
            None => prop_assert!(is_noise(&data, &event_type), "{:?} {:?}", sse_event, data),
            Some((event, targets)) => {
                prop_assert!(!is_noise(&data, &event_type), "a keepalive was routed: {:?}", data);
                prop_assert_eq!(&*event.event_type, event_type.as_str());
                prop_assert_eq!(&event.data[..], data.as_bytes());
                prop_assert_eq!(event.sse_id.as_deref(), id.as_deref());
                prop_assert_eq!(event.json(), json.as_ref());
                prop_assert_eq!(targets, expected_targets(&routing.config, stream_name, &event_type, json.as_ref()));
            }
        }
    }

    /// Data that is a stream's keepalive is never routed, whatever the event type and id.
    #[test]
    fn keepalive_data_is_never_routed(
        which_stream in any::<Index>(),
        which_keepalive in any::<Index>(),
        sse_event in event_type(),
        id in prop::option::of(any::<String>()),
    ) {
        let routing = Routing::new(ROUTING_CONFIG);
        let with_keepalive: Vec<usize> = (0..routing.config.streams.len())
            .filter(|index| !routing.stream(*index).1.keepalive.is_empty())
            .collect();
        prop_assert_eq!(with_keepalive.len(), 2, "the config's streams with keepalives");
        let stream_index = *which_stream.get(&with_keepalive);
        let (_, stream) = routing.stream(stream_index);
        let data = which_keepalive.get(&stream.keepalive).0.clone();
        let outcome = routing.accept(stream_index, SseMessage { event: sse_event, data, id });
        prop_assert!(outcome.is_none(), "routed: {:?}", outcome.map(|(_, targets)| targets));
    }

    /// An event whose type a route names exactly, on a stream the route covers, reaches the
    /// route's targets, whether the type comes from the SSE field or the data, and whatever
    /// else the data holds.
    #[test]
    fn an_exact_route_always_reaches_its_targets(
        which_case in any::<Index>(),
        from_the_data in any::<bool>(),
        extra in json_data(),
        text in any::<String>(),
        id in prop::option::of(any::<String>()),
    ) {
        let routing = Routing::new(ROUTING_CONFIG);
        // (stream index, event type, targets) for every exact event name of a route without
        // `where`, on every stream the route covers.
        let mut cases: Vec<(usize, String, Vec<String>)> = Vec::new();
        for route in routing.config.routes.iter().filter(|route| route.where_equal.is_empty()) {
            for (stream_index, stream_name) in routing.config.streams.keys().enumerate() {
                for pattern in route.events.iter().filter(|pattern| !pattern.is_wildcard()) {
                    if route.stream.0.matches(stream_name) {
                        let targets = route.targets.iter().map(|target| target.0.clone()).collect();
                        cases.push((stream_index, pattern.0.clone(), targets));
                    }
                }
            }
        }
        prop_assert!(cases.len() >= 4, "the config has too few exact routes: {}", cases.len());
        let (stream_index, event_type, route_targets) = which_case.get(&cases).clone();
        let (_, stream) = routing.stream(stream_index);

        let (sse_event, data) = match stream.event_type.first() {
            Some(pointer) if from_the_data => {
                let mut json: serde_json::Value = serde_json::from_str(&extra).unwrap();
                set_pointer(&mut json, &pointer.0, serde_json::Value::from(event_type.clone()));
                ("message".to_owned(), json.to_string())
            }
            _ => (event_type.clone(), text),
        };
        reject_noise(stream, &data)?;
        let outcome = routing.accept(stream_index, SseMessage { event: sse_event, data: data.clone(), id });
        let Some((event, targets)) = outcome else {
            let problem = format!("{event_type} was taken for a keepalive: {data:?}");
            return Err(TestCaseError::fail(problem));
        };
        prop_assert_eq!(&*event.event_type, event_type.as_str());
        for target in &route_targets {
            prop_assert!(
                targets.contains(target),
                "{} on stream {} did not reach {}: {:?}",
                event_type, stream_index, target, targets
            );
        }
    }

    /// The routing table of any generated config routes as the config reads, and a config is
    /// accepted exactly when every route's stream pattern matches a configured stream.
    #[test]
    fn routing_tables_of_generated_configs_follow_their_routes(
        streams in prop::sample::subsequence(&["a", "b", "ab", "ba"][..], 1..=4),
        routes in prop::collection::vec(generated_route(), 0..6),
        event_type in prop::sample::select(&["", "X", "Y", "XY", "XX", "YX", "Z"][..]),
        json in prop_oneof![
            Just(None),
            Just(Some(serde_json::json!({"k": 1}))),
            Just(Some(serde_json::json!({"k": "1"}))),
        ],
    ) {
        let mut text = String::from("streams:\n");
        for stream in &streams {
            text.push_str(&format!("  {stream}: {{ url: \"http://127.0.0.1:1/{stream}\" }}\n"));
        }
        text.push_str("targets:\n");
        for target in TARGET_NAMES {
            text.push_str(&format!("  {target}: {{ url: \"http://127.0.0.1:2/{target}\" }}\n"));
        }
        text.push_str("routes:\n");
        for route in &routes {
            text.push_str(&route.to_yaml());
        }
        let outcome = parse_config(&text, &[]);
        let all_streams_covered = routes
            .iter()
            .all(|route| streams.iter().any(|stream| glob_matches(route.stream, stream)));
        let config = match outcome {
            Ok(config) => {
                prop_assert!(all_streams_covered, "accepted a route that covers no stream:\n{}", text);
                config
            }
            Err(err) => {
                prop_assert!(!all_streams_covered, "rejected: {}\n{}", err, text);
                let message = err.to_string();
                prop_assert!(
                    message.contains("matches no configured stream") || message.contains("unknown stream"),
                    "{}",
                    message
                );
                return Ok(());
            }
        };
        let table = RoutingTable::new(&config);
        for stream in &streams {
            let event = Event {
                id: EventId::new(),
                stream_name: Arc::from(*stream),
                sse_id: None,
                event_type: Arc::from(event_type),
                data: Bytes::from(json.as_ref().map(serde_json::Value::to_string).unwrap_or_default()),
                is_json: json.is_some(),
                json: std::sync::OnceLock::from(json.clone()),
                received_at: SystemTime::now(),
            };
            let mut targets = Vec::new();
            table.route(table.stream_id(stream).unwrap(), &event, &mut targets);
            let routed: Vec<String> = targets.iter().map(|id| table.target_name(*id).to_string()).collect();
            let expected = expected_targets(&config, stream, event_type, json.as_ref());
            prop_assert_eq!(routed, expected, "stream {}\n{}", stream, text);
            let label = table.event_type_label_index(table.stream_id(stream).unwrap(), event_type);
            prop_assert!(label < table.event_type_labels(table.stream_id(stream).unwrap()).len());
        }
    }
}

/// Rejects a case whose data is noise (a keepalive of the stream) rather than an event.
fn reject_noise(stream: &StreamConfig, data: &str) -> Result<(), TestCaseError> {
    if stream.keepalive.iter().any(|keepalive| keepalive.0 == data) {
        return Err(TestCaseError::reject("keepalive data"));
    }
    Ok(())
}

const TARGET_NAMES: &[&str] = &["t0", "t1", "t2"];

#[derive(Debug, Clone)]
struct GeneratedRoute {
    stream: &'static str,
    events: Option<Vec<&'static str>>,
    where_k_is_1: bool,
    targets: Vec<&'static str>,
}

impl GeneratedRoute {
    fn to_yaml(&self) -> String {
        let mut yaml = format!("  - stream: \"{}\"\n", self.stream);
        if let Some(events) = &self.events {
            let quoted: Vec<String> = events.iter().map(|event| format!("\"{event}\"")).collect();
            yaml.push_str(&format!("    events: [{}]\n", quoted.join(", ")));
        }
        if self.where_k_is_1 {
            yaml.push_str("    where: { /k: 1 }\n");
        }
        yaml.push_str(&format!("    targets: [{}]\n", self.targets.join(", ")));
        yaml
    }
}

fn generated_route() -> impl Strategy<Value = GeneratedRoute> {
    (
        prop::sample::select(&["a", "b", "ab", "*", "a*", "?", "?b", "b?", "c*"][..]),
        prop::option::of(prop::collection::vec(
            prop::sample::select(&["X", "Y", "X*", "*", "?", "XY", "?X", "*Y*"][..]),
            0..3,
        )),
        any::<bool>(),
        prop::collection::vec(prop::sample::select(TARGET_NAMES), 0..4),
    )
        .prop_map(|(stream, events, where_k_is_1, targets)| GeneratedRoute {
            stream,
            events,
            where_k_is_1,
            targets,
        })
}
