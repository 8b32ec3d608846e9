//! Config text in, a config or an error out, never a panic: arbitrary bytes are read as YAML and
//! parsed with a fixed environment, so `${VAR}`, `${VAR:-default}`, `${file:...}` and
//! `${cred:...}` references all resolve to something.
//!
//! Beyond "no panic", a parsed config must keep what validation promises (routes name configured
//! streams and targets), build a routing table and a `check` description, and parse the same
//! way twice (the loader keeps per-thread state between its two passes).

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use sse_relay::classify::Classifier;
use sse_relay::config::{self, Config, ConfigError, ConfigProblem, EnvLookup};
use sse_relay::routing::{OTHER_EVENT_TYPE, RoutingTable};

/// Where `${file:...}` and `${cred:...}` references can find something; the seeds name it.
const SECRETS_DIRECTORY: &str = "/tmp/sse-relay-fuzz-secrets";

fuzz_target!(|bytes: &[u8]| {
    // `${file:/dev/zero}`, `${file:/dev/stdin}` and the like are refused without reading them,
    // so the fuzzer may name any file.
    let text = String::from_utf8_lossy(bytes);
    secrets_directory();
    let first = config::parse(&text, "fuzz.yaml", environment());
    let second = config::parse(&text, "fuzz.yaml", environment());
    match (&first, &second) {
        (Ok(first), Ok(second)) => assert_eq!(first, second, "the same text parsed differently"),
        (Err(first), Err(second)) => assert_eq!(first.to_string(), second.to_string()),
        _ => panic!("the same text parsed once and failed once: {first:?} / {second:?}"),
    }
    match first {
        Ok(config) => check_config(&config),
        Err(err) => check_error(&text, &err),
    }
});

fn check_config(config: &Config) {
    assert!(!config.streams.is_empty(), "a config without streams was accepted");
    for (index, route) in config.routes.iter().enumerate() {
        assert!(
            config.streams.keys().any(|name| route.stream.0.matches(name)),
            "routes[{index}].stream matches no stream but was accepted"
        );
        for target in &route.targets {
            assert!(
                config.targets.contains_key(&target.0),
                "routes[{index}] names unknown target {:?} but was accepted",
                target.0
            );
        }
    }
    let table = RoutingTable::new(config);
    for (name, stream) in &config.streams {
        let stream_id = table.stream_id(name).expect("every configured stream has an id");
        assert_eq!(&*table.event_type_labels(stream_id)[0], OTHER_EVENT_TYPE);
        Classifier::new(Arc::from(name.as_str()), stream, table.exact_event_types(stream_id));
    }
    let description = sse_relay::check::describe(config);
    assert!(!description.is_empty());
}

fn check_error(text: &str, err: &ConfigError) {
    assert!(!err.problems.is_empty(), "an error without problems");
    for problem in &err.problems {
        let message = problem.to_string();
        match problem {
            ConfigProblem::Located { line, column, .. } => {
                assert!(*line >= 1 && *column >= 1, "location is not 1-based: {message}");
                // The location must point into the text (or just past its end).
                let n_lines = count_yaml_lines(text);
                assert!(*line <= n_lines + 1, "line {line} of a {n_lines}-line text: {message}");
            }
            ConfigProblem::Unlocated { .. } => {}
            ConfigProblem::Read { .. } => panic!("parse read a file of its own: {message}"),
        }
        assert!(
            message.starts_with("fuzz.yaml:"),
            "the error does not name its origin: {message}"
        );
    }
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

fn environment() -> Box<EnvLookup> {
    Box::new(|name| {
        let value = match name {
            "TOKEN" => "t0k",
            "HOST" => "127.0.0.1:9",
            "URL" => "http://127.0.0.1:9/hook",
            "EMPTY" => "",
            // Values are not expanded again.
            "REFERENCE" => "${TOKEN}",
            "SIGNING" => "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "CREDENTIALS_DIRECTORY" => SECRETS_DIRECTORY,
            _ => return None,
        };
        Some(value.to_owned())
    })
}

fn secrets_directory() -> &'static Path {
    static DIRECTORY: OnceLock<PathBuf> = OnceLock::new();
    DIRECTORY.get_or_init(|| {
        let directory = PathBuf::from(SECRETS_DIRECTORY);
        std::fs::create_dir_all(&directory).expect("create the secrets directory");
        for (name, contents) in [
            ("token", "from-a-file\n"),
            ("hook-url", "http://127.0.0.1:9/hook\r\n"),
            ("signing", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            ("empty", ""),
        ] {
            std::fs::write(directory.join(name), contents).expect("write a secret file");
        }
        directory
    })
}
