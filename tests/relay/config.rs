//! Config text in, a config or an error naming the place out.

use std::time::Instant;

use sse_relay::config::{Config, ConfigError};

use crate::support::{DEADLINE, example_line_of, make_fifo, parse_config};

/// `parse_config` on a thread of its own, so that a parse that hangs fails the test at the
/// deadline instead of hanging it.
fn parse_before_the_deadline(yaml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let (owned_yaml, env) = (
        yaml.to_owned(),
        env.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<Vec<_>>(),
    );
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let _ = sender.send(parse_config(&owned_yaml, &env));
    });
    receiver
        .recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("parsing took longer than {DEADLINE:?}:\n{yaml}"))
}

/// Config text in, an error naming the place out.
#[test]
fn config_errors_name_the_place() {
    let base = |routes: &str| {
        format!(
            "streams:\n  chat:\n    url: http://127.0.0.1:1/listen\ntargets:\n  n8n:\n    url: http://127.0.0.1:2/hook\n{routes}"
        )
    };
    let check = |yaml: &str, expected: &str| {
        let env = [
            ("SET", "value"),
            ("SECRET", "ENV-SECRET-31337"),
            ("NOT_A_URL", "admin:ENV-SECRET-31337@hooks.example.com/x"),
        ];
        let err = parse_config(yaml, &env).expect_err(yaml).to_string();
        assert_eq!(err, expected, "for:\n{yaml}");
    };
    check(
        &base("routes:\n  - stream: chat\n    targets: [zapier]\n"),
        "test.yaml:9:15: routes[0].targets[0]: unknown target `zapier`; configured targets: n8n",
    );
    check(
        &base("routes:\n  - stream: chta\n    targets: [n8n]\n"),
        "test.yaml:8:13: routes[0].stream: unknown stream `chta`; configured streams: chat",
    );
    check(
        &base("routes:\n  - stream: \"x*\"\n    targets: [n8n]\n"),
        "test.yaml:8:13: routes[0].stream: stream pattern `x*` matches no configured stream",
    );
    check(
        &base("routes:\n  - stream: chat\n    target: [n8n]\n"),
        "test.yaml:8:5: routes[0]: the required key `targets` is missing\n\
         test.yaml:9:5: routes[0]: unknown key `target`; expected one of `stream`, `events`, `where`, `targets`",
    );
    check(
        &base("colour: blue\n"),
        "test.yaml:7:1: unknown key `colour`; expected one of `admin`, `streams`, `targets`, `routes`, `shutdown`, `storage`, `logging`, `connections`",
    );
    check(
        &base("").replace(
            "url: http://127.0.0.1:2/hook",
            "url: http://127.0.0.1:2/hook\n    timeout: ten seconds",
        ),
        "test.yaml:7:14: targets.n8n.timeout: `ten seconds` is not a duration: write one like `30s`, `500ms` or `2m`",
    );
    check(
        &base("").replace("http://127.0.0.1:2/hook", "ftp://127.0.0.1:2/hook"),
        "test.yaml:6:10: targets.n8n.url: invalid url: the scheme must be http or https, not ftp",
    );
    check(
        &base("").replace("http://127.0.0.1:2/hook", "${MISSING}/hook"),
        "test.yaml:6:10: targets.n8n.url: environment variable MISSING is not set",
    );
    check(
        &base("").replace(
            "url: http://127.0.0.1:2/hook",
            "url: http://127.0.0.1:2/hook\n    body: payload",
        ),
        "test.yaml:7:11: targets.n8n.body: body `payload` is not one of data, envelope or a JSON pointer such as /payload",
    );
    check(
        &base("").replace(
            "url: http://127.0.0.1:2/hook",
            "url: http://127.0.0.1:2/hook\n    max_in_flight: 0",
        ),
        "test.yaml:7:20: targets.n8n.max_in_flight: must be at least 1",
    );
    check(
        &base("routes:\n  - stream: chat\n    where: { node/status: done }\n    targets: [n8n]\n"),
        "test.yaml:9:14: routes[0].where: `node/status` is not a JSON pointer: it must start with /, as in /eventType",
    );
    check("streams: {}\ntargets: {}\n", "test.yaml: no streams are configured");

    // A value from a reference may be a secret: errors name the reference, not the value.
    check(
        &base("routes:\n  - stream: ${SECRET}\n    targets: [n8n]\n"),
        "test.yaml:8:13: routes[0].stream: unknown stream from `${SECRET}`; configured streams: chat",
    );
    check(
        &base("routes:\n  - stream: \"x-${SECRET}*\"\n    targets: [n8n]\n"),
        "test.yaml:8:13: routes[0].stream: stream pattern from `x-${SECRET}*` matches no configured stream",
    );
    check(
        &base("").replace("http://127.0.0.1:2/hook", "FTP://127.0.0.1:2/hook"),
        "test.yaml:6:10: targets.n8n.url: invalid url: the scheme must be http or https, not ftp",
    );
    check(
        &base("").replace("http://127.0.0.1:2/hook", "${NOT_A_URL}"),
        "test.yaml:6:10: targets.n8n.url: invalid url: the scheme must be http or https",
    );
    check(
        &base("").replace("http://127.0.0.1:2/hook", "admin:literal@hooks.example.com/x"),
        "test.yaml:6:10: targets.n8n.url: invalid url: the scheme must be http or https",
    );
}

/// One run reports every problem of a file, each at its place: a new user learns all the
/// variables the example needs at once, and an error does not hide the ones after it.
#[test]
fn every_problem_of_a_file_is_reported_in_one_run() {
    let check = |yaml: &str, expected: &[&str]| {
        let err = parse_config(yaml, &[]).expect_err(yaml).to_string();
        assert_eq!(err, expected.join("\n"), "for:\n{yaml}");
    };
    let example_errors = [
        format!(
            "test.yaml:{}:10: streams.participant.url: environment variable PARTICIPANT_STREAM_URL is not set",
            example_line_of("PARTICIPANT_STREAM_URL")
        ),
        format!(
            "test.yaml:{}:22: streams.participant.headers.Authorization: environment variable PARTICIPANT_TOKEN is not set",
            example_line_of("PARTICIPANT_TOKEN")
        ),
        format!(
            "test.yaml:{}:18: streams.participant.headers.X-API-Key: environment variable PARTICIPANT_API_KEY is not set",
            example_line_of("PARTICIPANT_API_KEY")
        ),
        format!(
            "test.yaml:{}:10: streams.chat.url: environment variable SPLOX_CHAT_ID is not set",
            example_line_of("SPLOX_CHAT_ID")
        ),
        format!(
            "test.yaml:{}:31: streams.chat.headers.Authorization: environment variable SPLOX_TOKEN is not set",
            example_line_of("SPLOX_TOKEN")
        ),
        format!(
            "test.yaml:{}:10: targets.zapier.url: environment variable ZAPIER_HOOK_URL is not set",
            example_line_of("ZAPIER_HOOK_URL")
        ),
        format!(
            "test.yaml:{}:21: targets.n8n.signing_secret: environment variable N8N_SIGNING_SECRET is not set",
            example_line_of("N8N_SIGNING_SECRET")
        ),
    ];
    check(
        include_str!("../../relay.example.yaml"),
        &example_errors.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // Errors of every kind, several in one stream, before and after each other.
    check(
        "streams:\n  chat:\n    url: ${CHAT_URL}\n    idle_timeout: 30\n    colour: blue\n    headers: { Authorization: \"${TOKEN}\" }\n    \
         reconnect: { initial_delay: 0s, max_delay: soon }\n  bad: http://127.0.0.1:1/\n  \
         participant:\n    url: http://127.0.0.1:1/p\n    keepalive: KEEP_ALIVE\n    reconnect: { initial_delay: 0s }\n\
         targets:\n  n8n:\n    timeout: ten\n    body: payload\n  zapier: { url: \"${HOOK}\", max_in_flight: 0 }\n\
         routes:\n  - stream: chat\n    events: [\"\"]\n    targets: [n8n, slack]\n  - stream: nothing*\n    targets: [zapier]\n\
         storage: { mode: disk }\n",
        &[
            "test.yaml:3:10: streams.chat.url: environment variable CHAT_URL is not set",
            "test.yaml:4:19: streams.chat.idle_timeout: a duration needs a unit, like `30s`, `500ms` or `2m`",
            "test.yaml:5:5: streams.chat: unknown key `colour`; expected one of `url`, `headers`, `event_type`, `default_event_type`, `keepalive`, `idle_timeout`, `max_event_bytes`, `reconnect`, `rotate_after`, `tls`, `ids`, `ids_file`, `dynamic`, `stop_when`, `ttl`",
            "test.yaml:6:31: streams.chat.headers.Authorization: environment variable TOKEN is not set",
            "test.yaml:7:48: streams.chat.reconnect.max_delay: `soon` is not a duration: write one like `30s`, `500ms` or `2m`",
            "test.yaml:8:8: streams.bad: expected settings as `key: value` lines indented below it, found text",
            "test.yaml:11:16: streams.participant.keepalive: expected a list such as `[a, b]`, found text; a list of one is written `[item]`",
            "test.yaml:12:33: streams.participant.reconnect.initial_delay: must be at least 1ms, or a failing upstream is reconnected to in a hot loop",
            "test.yaml:15:5: targets.n8n: the required key `url` is missing",
            "test.yaml:15:14: targets.n8n.timeout: `ten` is not a duration: write one like `30s`, `500ms` or `2m`",
            "test.yaml:16:11: targets.n8n.body: body `payload` is not one of data, envelope or a JSON pointer such as /payload",
            "test.yaml:17:18: targets.zapier.url: environment variable HOOK is not set",
            "test.yaml:17:44: targets.zapier.max_in_flight: must be at least 1",
            "test.yaml:20:14: routes[0].events[0]: an empty pattern matches nothing",
            "test.yaml:21:20: routes[0].targets[1]: unknown target `slack`; configured targets: n8n, zapier",
            "test.yaml:22:13: routes[1].stream: stream pattern `nothing*` matches no configured stream",
            "test.yaml:24:18: storage.mode: unknown value `disk`, expected one of `sqlite`, `memory`, `postgres`",
        ],
    );
    // A relation between two values waits until both are valid: the default that stands in for
    // a value that failed is no reason for an error.
    check(
        "streams:\n  chat:\n    url: http://127.0.0.1:1/c\n    reconnect: { initial_delay: 1m, max_delay: later }\ntargets: {}\n",
        &[
            "test.yaml:4:48: streams.chat.reconnect.max_delay: `later` is not a duration: write one like `30s`, `500ms` or `2m`",
        ],
    );
    // Past 50 problems of any kind, the search stops, and says so.
    let streams: [fn(usize) -> String; 3] = [
        |n| format!("  s{n}: {{ url: \"${{UNSET_{n}}}\" }}\n"),
        |_| "  s: { url: \"http://127.0.0.1:1/s\" }\n".to_owned(),
        |n| format!("  s{n}: {{ url: \"http://127.0.0.1:1/s\", idle_timeout: 0s }}\n"),
    ];
    for stream in streams {
        let yaml = format!("streams:\n{}targets: {{}}\n", (0..60).map(stream).collect::<String>());
        let err = parse_config(&yaml, &[]).expect_err(&yaml);
        assert_eq!(err.problems.len(), 51, "{err}");
        assert_eq!(
            err.problems[50].to_string(),
            "test.yaml: stopped looking after 50 problems: fix these, then check again"
        );
    }
}

/// A key written twice in one mapping is an error at the second, naming the first: at any level,
/// in block and flow style; header names ignore case. Nothing is silently dropped.
#[test]
fn duplicate_keys_are_errors_at_any_level() {
    let check = |yaml: &str, expected: &[&str]| {
        let err = parse_config(yaml, &[]).expect_err(yaml).to_string();
        assert_eq!(err, expected.join("\n"), "for:\n{yaml}");
    };
    let streams = "streams:\n  chat:\n    url: http://127.0.0.1:1/c\n";
    let targets = "targets:\n  zapier:\n    url: http://127.0.0.1:2/z\n";
    check(
        &format!(
            "{streams}{targets}  n8n: {{ url: \"http://127.0.0.1:2/n\" }}\n  zapier:\n    url: http://127.0.0.1:2/other\n"
        ),
        &["test.yaml:8:3: targets: duplicate key `zapier` (first defined at line 5)"],
    );
    check(
        &format!(
            "{streams}  chat: {{ url: \"http://127.0.0.1:1/d\" }}\n  chat: {{ url: \"http://127.0.0.1:1/e\" }}\n{targets}"
        ),
        &[
            "test.yaml:4:3: streams: duplicate key `chat` (first defined at line 2)",
            "test.yaml:5:3: streams: duplicate key `chat` (first defined at line 2)",
        ],
    );
    check(
        &format!("{streams}    idle_timeout: 5s\n    url: http://127.0.0.1:1/d\n{targets}"),
        &["test.yaml:5:5: streams.chat: duplicate key `url` (first defined at line 3)"],
    );
    check(
        &format!("{streams}{targets}targets: {{}}\n"),
        &["test.yaml:7:1: duplicate key `targets` (first defined at line 4)"],
    );
    check(
        &format!("{streams}    headers:\n      X-Token: a\n      X-Token: b\n{targets}"),
        &["test.yaml:6:7: streams.chat.headers: duplicate key `X-Token` (first defined at line 5)"],
    );
    check(
        &format!("{streams}{targets}    headers: {{ Authorization: a, authorization: b }}\n"),
        &[
            "test.yaml:7:34: targets.zapier.headers: duplicate key `authorization` (first defined at line 7 as `Authorization`; header names ignore case)",
        ],
    );
    check(
        &format!(
            "{streams}{targets}routes:\n  - stream: chat\n    targets: [zapier]\n    where: {{ /a: 1, /b: 2, /a: 3 }}\n    stream: \"*\"\n"
        ),
        &[
            "test.yaml:10:28: routes[0].where: duplicate key `/a` (first defined at line 10)",
            "test.yaml:11:5: routes[0]: duplicate key `stream` (first defined at line 8)",
        ],
    );
    // With the other problems of the file.
    check(
        &format!("{streams}    url: ${{UNSET}}\n    idle_timeout: 0s\n{targets}"),
        &[
            "test.yaml:4:5: streams.chat: duplicate key `url` (first defined at line 3)",
            "test.yaml:5:19: streams.chat.idle_timeout: must be at least 1ms, or every connection is dropped before it can receive anything",
        ],
    );
    // Keys are compared as written, as the config reads them: these are all different.
    let config = parse_config(
        &format!("streams:\n  \"1\": {{ url: \"http://127.0.0.1:1/a\" }}\n  01: {{ url: \"http://127.0.0.1:1/b\" }}\n  null: {{ url: \"http://127.0.0.1:1/c\" }}\n  \"~\": {{ url: \"http://127.0.0.1:1/d\" }}\n{targets}"),
        &[],
    )
    .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(config.streams.keys().collect::<Vec<_>>(), ["01", "1", "null", "~"]);
}

/// What would fail when a stream or target starts is refused by the config, at its place: a
/// header value (or the admin token) that an HTTP header cannot carry, a URL that an HTTP
/// request cannot. So `check` refuses what `run` would, and `run` never starts half a relay.
#[test]
fn what_a_relay_cannot_start_with_is_refused_at_its_place() {
    let directory = tempfile::tempdir().unwrap();
    let file = |name: &str, contents: &str| {
        std::fs::write(directory.path().join(name), contents).unwrap();
        format!("${{file:{}}}", directory.path().join(name).display())
    };
    let two_lines = file("two-lines", "sekret-1\nsekret-2\n");
    let long = "x".repeat(70_000);
    let env = [
        ("TOKEN", "sekret\nX-Injected: 1"),
        ("ADMIN", "sekret\u{7f}"),
        ("LONG", long.as_str()),
    ];
    let check = |yaml: &str, expected: &str| {
        let err = parse_config(yaml, &env).expect_err(yaml).to_string();
        assert_eq!(err, expected, "for:\n{yaml}");
    };
    let streams = "streams:\n  chat:\n    url: http://127.0.0.1:1/c\n";
    check(
        &format!("{streams}    headers: {{ Authorization: \"Bearer ${{TOKEN}}\" }}\ntargets: {{}}\n"),
        "test.yaml:4:31: streams.chat.headers.Authorization: `Bearer ${TOKEN}` expands to a value with a line break or another control character, which an HTTP header cannot carry",
    );
    check(
        &format!("{streams}targets:\n  n8n:\n    url: http://127.0.0.1:2/n\n    headers: {{ X-Key: \"a\\x01b\" }}\n"),
        "test.yaml:7:23: targets.n8n.headers.X-Key: the value with a line break or another control character, which an HTTP header cannot carry",
    );
    check(
        &format!("admin: {{ token: \"${{ADMIN}}\" }}\n{streams}targets: {{}}\n"),
        "test.yaml:1:17: admin.token: `${ADMIN}` expands to a value with a line break or another control character, which an HTTP header cannot carry",
    );
    check(
        &format!("{streams}    headers: {{ X-Token: \"{two_lines}\" }}\ntargets: {{}}\n"),
        &format!(
            "test.yaml:4:25: streams.chat.headers.X-Token: `{two_lines}` expands to a value with a line break or another control character, which an HTTP header cannot carry"
        ),
    );
    check(
        &format!("{streams}targets:\n  n8n: {{ url: \"http://127.0.0.1:2/${{LONG}}\" }}\n"),
        "test.yaml:5:15: targets.n8n.url: invalid url: longer than 65534 bytes",
    );
    check(
        "streams:\n  chat:\n    url: http://127.0.0.1:1/${LONG}\ntargets: {}\n",
        "test.yaml:3:10: streams.chat.url: invalid url: longer than 65534 bytes",
    );

    // A secret file's last line break is not part of the secret, as `echo > file` and systemd
    // credentials write them.
    for contents in ["sekret\n", "sekret\r\n", "sekret"] {
        let reference = file("one-line", contents);
        let yaml = format!("{streams}    headers: {{ X-Token: \"{reference}\" }}\ntargets: {{}}\n");
        let config = parse_config(&yaml, &[]).unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(config.streams["chat"].headers.values().next().unwrap().0, "sekret");
    }
}

/// The mistakes a new user makes first read as sentences that say what to write, at the place of
/// the mistake (a key without its colon is reported on its own line, not the next one), with
/// the parser's own words kept after syntax errors.
#[test]
fn yaml_mistakes_are_explained() {
    let cases: &[(&str, &str)] = &[
        (
            "streams:\n  chat:\n    url: http://a/\n   idle_timeout: 10s\n",
            "test.yaml:4:4: this line is not lined up with the keys above it: the keys of one mapping start in the same column (YAML: did not find expected key)",
        ),
        (
            "streams:\n  chat:\n    url: http://a/\n      idle_timeout: 10s\n",
            "test.yaml:4:7: this line is indented deeper than the line above it, so it reads as part of that line's value: line it up with the keys above it (YAML: mapping values are not allowed in this context)",
        ),
        (
            "streams:\n  chat:\n    url http://a/\n    idle_timeout: 10s\n",
            "test.yaml:3:5: this line has no `:` after its key: write `key: value`, with a space after the colon (YAML: mapping values are not allowed in this context)",
        ),
        (
            "streams:\n  chat\n    url: http://a/\n",
            "test.yaml:2:3: this line has no `:` after its key: write `key: value`, with a space after the colon (YAML: mapping values are not allowed in this context)",
        ),
        (
            "streams:\n  chat:\n    url: http://a/\n    default_event_type: a: b\n",
            "test.yaml:4:26: a value cannot hold `: ` unless it is in quotes, as in `key: \"a: b\"` (YAML: mapping values are not allowed in this context)",
        ),
        (
            "streams:\n  chat:\n    url: http://a/\n    default_event_type: \"a\" b\n",
            "test.yaml:4:29: unexpected text after a value: a value in quotes ends at its closing quote, so put all of it inside the quotes (YAML: did not find expected key)",
        ),
        (
            "streams:\n  chat:\n    url:http://a/\ntargets: {}\n",
            "test.yaml:3:5: streams.chat: expected settings as `key: value` lines indented below it, found text; a key needs a space after its colon, as in `url: https://…`",
        ),
        (
            "streams:\n\tchat:\n    url: http://a/\n",
            "test.yaml:2:1: a tab: indent with spaces only (YAML: found character that cannot start any token)",
        ),
        (
            "streams:\n  chat:\n    url: http://a/\n\tidle_timeout: 10s\n",
            "test.yaml:4:1: a tab: indent with spaces only (YAML: found a tab character that violates indentation)",
        ),
        (
            "streams:\n  chat:\n    url: \"http://a/\n    idle_timeout: 10s\ntargets: {}\n",
            "test.yaml:3:10: this quoted value has no closing quote (YAML: found unexpected end of stream)",
        ),
        (
            "streams:\n  chat: { url: http://a/\ntargets: {}\n",
            "test.yaml:2:9: this `{` is not closed: write `{ key: value, key: value }`, with a `,` between entries and a `}` at the end (YAML: did not find expected ',' or '}')",
        ),
        (
            "streams:\n  chat:\n    keepalive: [a, b\n    url: http://a/\n",
            "test.yaml:3:16: this `[` is not closed: write `[a, b]`, with a `,` between items and a `]` at the end (YAML: did not find expected ',' or ']')",
        ),
        (
            "streams:\n  chat:\n    url: http://a/\nroutes:\n  - stream: chat\n   targets: []\n",
            "test.yaml:6:4: this line is not lined up with the list above it: the items of a list start with `- ` in the same column, and the keys of an item line up with its first key (YAML: did not find expected '-' indicator)",
        ),
        (
            "streams:\n  chat:\n    url: http://a/\n  - other\n",
            "test.yaml:4:3: a list item (`- `) where a key was expected: put the list under a key of its own, or line it up with the list it belongs to (YAML: did not find expected key)",
        ),
        (
            "streams:\n  chat:\n    url: http://a/\n    keepalive: - a\n",
            "test.yaml:4:16: a list cannot start on the line of its key: put each `- item` on a line of its own below the key, or write `[a, b]` (YAML: block sequence entries are not allowed in this context)",
        ),
        (
            "streams:\n  chat:\n    url: http://a/\nroutes:\n  - stream: *\n",
            "test.yaml:5:13: `*` and `&` start aliases and anchors in YAML: put a value that starts with one in quotes, as in \"*\" (YAML: did not find expected alphabetic or numeric character)",
        ),
        (
            "streams:\n  chat:\n    url: @chat\n",
            "test.yaml:3:10: a value cannot start with `@`: put it in quotes, as in \"@…\" (YAML: found character that cannot start any token)",
        ),
        (
            "streams:\n  chat:\n    url: \"http://a/\\q\"\n",
            "test.yaml:3:20: unknown escape in a double-quoted value: write `\\\\` for a backslash, or use single quotes (YAML: found unknown escape character)",
        ),
        (
            "streams:\n  chat:\n    url: *a\n",
            "test.yaml:3:10: a value that starts with `*` is a YAML alias, and no anchor (`&name`) above it has this name: put text that starts with `*` in quotes, as in \"*\" (YAML: unknown anchor)",
        ),
        (
            "streams:\n  chat:\n    url: http://a/\ntargets: {}\n---\nstreams: {}\n",
            "test.yaml: the file holds more than one YAML document (a `---` or `...` line), and a config is one document (YAML: deserializing from YAML containing more than one document is not supported)",
        ),
        (
            "streams: [\n",
            "test.yaml:2:1: a value is missing here, or a `[` or `{` before it is not closed (YAML: did not find expected node content)",
        ),
        (
            "streams:\n  chat:\n    url: http://a/\n    idle_timeout: 30\ntargets: {}\n",
            "test.yaml:4:19: streams.chat.idle_timeout: a duration needs a unit, like `30s`, `500ms` or `2m`",
        ),
        (
            "streams:\n  chat:\n    url: http://a/\n    idle_timeout: 1.5\ntargets: {}\n",
            "test.yaml:4:19: streams.chat.idle_timeout: a duration needs a unit, like `30s`, `500ms` or `2m`",
        ),
        (
            "streams:\n  chat:\n    url: http://a/\ntargets:\n  n8n:\n    url: http://b/\n    ordered: yes\n",
            "test.yaml:7:14: targets.n8n.ordered: expected true or false, found `yes`",
        ),
        (
            "streams:\n  chat:\n    url: http://a/\ntargets:\n  n8n:\n    url: http://b/\n    max_in_flight: ten\n",
            "test.yaml:7:20: targets.n8n.max_in_flight: expected a whole number of at least 1, found `ten`",
        ),
        (
            "streams:\n  chat:\n    url: http://a/\ntargets:\n  n8n:\n    url: http://b/\n    max_in_flight: -1\n",
            "test.yaml:7:20: targets.n8n.max_in_flight: expected a whole number of at least 1, found the number -1",
        ),
        (
            "streams: chat\ntargets: {}\n",
            "test.yaml:1:10: streams: expected `name: value` lines indented below it, found text",
        ),
        (
            "streams:\n  - chat\ntargets: {}\n",
            "test.yaml:2:3: streams: expected `name: value` lines indented below it, found a list",
        ),
        (
            "streams:\n  chat: http://a/\ntargets: {}\n",
            "test.yaml:2:9: streams.chat: expected settings as `key: value` lines indented below it, found text",
        ),
        (
            "streams:\n  chat:\n    url: http://a/\n    keepalive: KEEP_ALIVE\ntargets: {}\n",
            "test.yaml:4:16: streams.chat.keepalive: expected a list such as `[a, b]`, found text; a list of one is written `[item]`",
        ),
        (
            "streams:\n  chat:\n    url:\ntargets: {}\n",
            "test.yaml:3:9: streams.chat.url: invalid url: it is empty",
        ),
        (
            "streams:\n  chat:\n    url: [http://a/]\ntargets: {}\n",
            "test.yaml:3:10: streams.chat.url: expected text, found a list",
        ),
        (
            "admin: { listen: localhost:9464 }\nstreams:\n  chat:\n    url: http://a/\ntargets: {}\n",
            "test.yaml:1:18: admin.listen: expected an IP address and a port, such as `127.0.0.1:9464`",
        ),
        (
            "storage: { max_bytes: lots }\nstreams:\n  chat:\n    url: http://a/\ntargets: {}\n",
            "test.yaml:1:23: storage.max_bytes: expected a size such as `64KiB`, `512MiB` or `1GiB`",
        ),
        (
            "storage: { mode: disk }\nstreams:\n  chat:\n    url: http://a/\ntargets: {}\n",
            "test.yaml:1:18: storage.mode: unknown value `disk`, expected one of `sqlite`, `memory`, `postgres`",
        ),
        (
            "streams:\n  chat:\n    idle_timeout: 10s\ntargets: {}\n",
            "test.yaml:3:5: streams.chat: the required key `url` is missing",
        ),
        ("targets: {}\n", "test.yaml:1:1: the required key `streams` is missing"),
        // Text where settings belong may be a credential in the wrong place: it is not repeated.
        (
            "streams:\n  chat:\n    url: http://a/\n    headers: Bearer:sekret\ntargets: {}\n",
            "test.yaml:4:14: streams.chat.headers: expected `name: value` lines indented below it, found text; a key needs a space after its colon, as in `url: https://…`",
        ),
        (
            "admin: { token: [sekret] }\nstreams:\n  chat:\n    url: http://a/\ntargets: {}\n",
            "test.yaml:1:17: admin.token: expected text, found a list",
        ),
    ];
    let mut mismatches = String::new();
    for (yaml, expected) in cases {
        let err = parse_config(yaml, &[]).expect_err(yaml).to_string();
        if err != *expected {
            mismatches.push_str(&format!("{yaml:?}\n  got:      {err:?}\n  expected: {expected:?}\n"));
        }
    }
    assert!(mismatches.is_empty(), "{mismatches}");
}

#[test]
fn env_values_are_expanded_in_strings() {
    let yaml = "streams:\n  chat:\n    url: http://127.0.0.1:1/c/${CHAT}/listen\n    headers: { Authorization: \"Bearer ${TOKEN}\", X-Opt: \"${UNSET:-fallback}\" }\ntargets: {}\n";
    let config = parse_config(yaml, &[("CHAT", "3f1c"), ("TOKEN", "t0k")]).unwrap();
    let chat = &config.streams["chat"];
    assert_eq!(chat.url.0.as_str(), "http://127.0.0.1:1/c/3f1c/listen");
    let headers: Vec<(&str, &str)> = chat.headers.iter().map(|(k, v)| (k.0.as_str(), v.0.as_str())).collect();
    assert_eq!(headers, [("Authorization", "Bearer t0k"), ("X-Opt", "fallback")]);
}

#[test]
fn the_example_config_is_valid() {
    let example = include_str!("../../relay.example.yaml");
    let env = [
        (
            "PARTICIPANT_STREAM_URL",
            "https://api.example.com/participants/42/stream",
        ),
        ("PARTICIPANT_TOKEN", "token"),
        ("PARTICIPANT_API_KEY", "key"),
        ("SPLOX_CHAT_ID", "3f1c"),
        ("SPLOX_TOKEN", "token"),
        ("ZAPIER_HOOK_URL", "https://hooks.zapier.com/hooks/catch/1/abc"),
        ("N8N_SIGNING_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    ];
    let config = parse_config(example, &env).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(config.streams.len(), 2);
    assert_eq!(config.routes.len(), 3);
}

#[test]
fn secrets_can_come_from_files_and_systemd_credentials() {
    let directory = tempfile::tempdir().unwrap();
    std::fs::write(directory.path().join("token"), "from-a-file\n").unwrap();
    std::fs::write(directory.path().join("hook-url"), "http://127.0.0.1:9/hook\n").unwrap();
    let yaml = format!(
        "streams:\n  chat:\n    url: http://127.0.0.1:1/c\n    headers: {{ Authorization: \"Bearer ${{file:{}}}\" }}\ntargets:\n  n8n: {{ url: \"${{cred:hook-url}}\" }}\n",
        directory.path().join("token").display()
    );
    let credentials = directory.path().display().to_string();
    let config = parse_config(&yaml, &[("CREDENTIALS_DIRECTORY", &credentials)]).unwrap();
    let authorization = &config.streams["chat"].headers.values().next().unwrap().0;
    assert_eq!(authorization, "Bearer from-a-file");
    assert_eq!(config.targets["n8n"].url.0.as_str(), "http://127.0.0.1:9/hook");
    assert_eq!(config.n_literal_secrets, 0);

    let missing = parse_config(
        &yaml.replace("token", "absent"),
        &[("CREDENTIALS_DIRECTORY", &credentials)],
    )
    .unwrap_err()
    .to_string();
    assert!(missing.starts_with("test.yaml:4:"), "{missing}");
    assert!(
        missing.contains("cannot read the secret file") && missing.contains("absent"),
        "{missing}"
    );
}

/// `${file:...}` and `${cred:...}` read only regular files of at most 64 KiB: a device never
/// ends, a FIFO never opens, and neither may hang the relay or fill its memory.
#[test]
fn secret_files_are_small_regular_files() {
    let directory = tempfile::tempdir().unwrap();
    let path = |name: &str| directory.path().join(name).display().to_string();
    std::fs::write(path("largest"), "x".repeat(64 * 1024)).unwrap();
    std::fs::write(path("too-large"), "x".repeat(64 * 1024 + 1)).unwrap();
    std::fs::write(path("binary"), [0xff, 0xfe]).unwrap();
    make_fifo(directory.path().join("fifo").as_path());
    let credentials = path("");
    let yaml = |reference: &str| {
        format!(
            "streams:\n  chat:\n    url: http://127.0.0.1:1/c\n    headers: {{ X-Token: \"{reference}\" }}\ntargets: {{}}\n"
        )
    };
    let check = |reference: &str, expected: &str| {
        let started = Instant::now();
        let outcome = parse_before_the_deadline(&yaml(reference), &[("CREDENTIALS_DIRECTORY", &credentials)]);
        let err = outcome.expect_err(reference).to_string();
        assert_eq!(
            err,
            format!("test.yaml:4:25: streams.chat.headers.X-Token: {expected}"),
            "for {reference}"
        );
        assert!(
            started.elapsed() < DEADLINE / 3,
            "{reference} took {:?}",
            started.elapsed()
        );
    };
    check(
        "${file:/dev/zero}",
        "cannot read the secret file /dev/zero: not a regular file",
    );
    check(
        &format!("${{file:{}}}", path("fifo")),
        &format!("cannot read the secret file {}: not a regular file", path("fifo")),
    );
    check(
        "${cred:fifo}",
        &format!("cannot read the secret file {}: not a regular file", path("fifo")),
    );
    check(
        &format!("${{file:{}}}", path("too-large")),
        &format!("cannot read the secret file {}: larger than 64 KiB", path("too-large")),
    );
    check(
        &format!("${{file:{}}}", path("binary")),
        &format!("cannot read the secret file {}: not UTF-8 text", path("binary")),
    );
    check(
        &format!("${{file:{}}}", directory.path().display()),
        &format!(
            "cannot read the secret file {}: not a regular file",
            directory.path().display()
        ),
    );

    let config = parse_before_the_deadline(&yaml("${cred:largest}"), &[("CREDENTIALS_DIRECTORY", &credentials)])
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(
        config.streams["chat"].headers.values().next().unwrap().0.len(),
        64 * 1024
    );
}

/// The config file itself is read the same way, up to 1 MiB.
#[test]
fn the_config_file_is_a_regular_file_of_at_most_1_mib() {
    let directory = tempfile::tempdir().unwrap();
    let too_large = directory.path().join("too-large.yaml");
    std::fs::write(&too_large, format!("# {}\n", "x".repeat(1024 * 1024))).unwrap();
    let check = |path: &std::path::Path, expected: &str| {
        let started = Instant::now();
        let err = sse_relay::config::load(path).expect_err("refused").to_string();
        assert_eq!(err, format!("{}: cannot read the file: {expected}", path.display()));
        assert!(
            started.elapsed() < DEADLINE / 3,
            "{} took {:?}",
            path.display(),
            started.elapsed()
        );
    };
    check(&too_large, "larger than 1 MiB");
    check(std::path::Path::new("/dev/zero"), "not a regular file");
}

/// Flow collections nested more than 64 deep are refused before YAML parsing, whose time grows
/// with the square of the depth (128 KB of `[` took 15 s); brackets in quotes and comments do
/// not count.
#[test]
fn deep_nesting_is_refused_at_once() {
    let check = |yaml: &str, expected: Result<(), &str>| {
        let started = Instant::now();
        let outcome = parse_before_the_deadline(yaml, &[])
            .map(|_| ())
            .map_err(|err| err.to_string());
        assert_eq!(
            outcome,
            expected.map_err(str::to_owned),
            "for:\n{}",
            &yaml[..yaml.len().min(300)]
        );
        assert!(started.elapsed() < DEADLINE / 3, "took {:?}", started.elapsed());
    };
    let too_deep = Err("test.yaml:1:74: collections nested more than 64 levels deep");
    check(&format!("streams: {}", "[".repeat(128 * 1024)), too_deep);
    check(&format!("streams: {}", "[".repeat(65)), too_deep);
    check(
        &format!("streams:\n  chat: {}", "{a: ".repeat(32 * 1024)),
        Err("test.yaml:2:265: collections nested more than 64 levels deep"),
    );
    check(
        &format!("streams:\n{}", "  [\r\n".repeat(100)),
        Err("test.yaml:66:3: collections nested more than 64 levels deep"),
    );

    let valid = |where_value: &str, extra: &str| {
        format!(
            "streams:\n  chat:\n    url: http://127.0.0.1:1/c\n{extra}targets: {{ n8n: {{ url: \"http://127.0.0.1:2/h\" }} }}\nroutes:\n  - stream: chat\n    targets: [n8n]\n    where: {{ /a: {where_value} }}\n"
        )
    };
    // `where: {` is one level: 63 more make 64.
    let deepest = format!("{}1{}", "[".repeat(63), "]".repeat(63));
    check(&valid(&deepest, ""), Ok(()));
    check(
        &valid(&format!("[{deepest}]"), ""),
        Err("test.yaml:8:81: collections nested more than 64 levels deep"),
    );
    let brackets = "[{".repeat(100);
    let quoted = format!(
        "    keepalive: [\"{brackets}\", '{brackets}', \"\\\"{brackets}\", 'it''s {brackets}']\n    # {brackets}\n    default_event_type: a[{brackets}\n"
    );
    check(&valid(&deepest, &quoted), Ok(()));
}

/// Durations, sizes and their relations that parse but cannot work are refused at the place of
/// the value: zero delays are hot loops, a zero timeout fails every request, a cap below its
/// starting value contradicts it.
#[test]
fn values_that_cannot_work_are_refused_at_their_place() {
    let config = |stream_line: &str, target_line: &str, top_line: &str| {
        format!(
            "streams:\n  chat:\n    url: http://127.0.0.1:1/listen\n    {stream_line}\ntargets:\n  n8n:\n    url: http://127.0.0.1:2/hook\n    {target_line}\n{top_line}\n"
        )
    };
    let check = |yaml: String, expected: &str| {
        let err = parse_config(&yaml, &[]).expect_err(&yaml).to_string();
        assert_eq!(err, expected, "for:\n{yaml}");
    };
    let stream = |line: &str, expected: &str| check(config(line, "", ""), expected);
    let target = |line: &str, expected: &str| check(config("", line, ""), expected);
    let top = |line: &str, expected: &str| check(config("", "", line), expected);

    stream(
        "idle_timeout: 0s",
        "test.yaml:4:19: streams.chat.idle_timeout: must be at least 1ms, or every connection is dropped before it can receive anything",
    );
    stream(
        "idle_timeout: 999us",
        "test.yaml:4:19: streams.chat.idle_timeout: must be at least 1ms, or every connection is dropped before it can receive anything",
    );
    stream(
        "idle_timeout: 500000000000y",
        "test.yaml:4:19: streams.chat.idle_timeout: must be at most 100 years",
    );
    stream(
        "rotate_after: 100ms",
        "test.yaml:4:19: streams.chat.rotate_after: must be at least 500ms, or connections would overlap most of the time",
    );
    stream(
        "max_event_bytes: 0",
        "test.yaml:4:22: streams.chat.max_event_bytes: must be at least 1, or every event is skipped",
    );
    stream(
        "reconnect: { initial_delay: 0s }",
        "test.yaml:4:33: streams.chat.reconnect.initial_delay: must be at least 1ms, or a failing upstream is reconnected to in a hot loop",
    );
    stream(
        "reconnect: { auth_failure_delay: 0s }",
        "test.yaml:4:38: streams.chat.reconnect.auth_failure_delay: must be at least 1ms, or an upstream that refuses the credentials is reconnected to in a hot loop",
    );
    stream(
        "reconnect: { max_delay: 500ms, initial_delay: 1s }",
        "test.yaml:4:29: streams.chat.reconnect.max_delay: must not be shorter than initial_delay (1s)",
    );
    stream(
        "reconnect: { max_delay: 100ms }",
        "test.yaml:4:29: streams.chat.reconnect.max_delay: must not be shorter than initial_delay (500ms)",
    );
    stream(
        "reconnect: { initial_delay: 1m }",
        "test.yaml:4:33: streams.chat.reconnect.initial_delay: must not be longer than max_delay (30s)",
    );
    target(
        "timeout: 0s",
        "test.yaml:8:14: targets.n8n.timeout: must be at least 1ms, or every request times out at once",
    );
    target(
        "retry: { initial_delay: 0s }",
        "test.yaml:8:29: targets.n8n.retry.initial_delay: must be at least 1ms, or a failing target is retried in a hot loop",
    );
    target(
        "retry: { initial_delay: 2s, max_delay: 1s }",
        "test.yaml:8:44: targets.n8n.retry.max_delay: must not be shorter than initial_delay (2s)",
    );
    target(
        "retry: { max_elapsed: 0s }",
        "test.yaml:8:27: targets.n8n.retry.max_elapsed: must not be shorter than initial_delay (10ms): no retry could start in time; to never retry, set max_attempts: 1",
    );
    target(
        "circuit_breaker: { open_delay: 0s }",
        "test.yaml:8:36: targets.n8n.circuit_breaker.open_delay: must be at least 1ms, or a failing target is probed in a hot loop",
    );
    target(
        "circuit_breaker: { open_delay: 10m }",
        "test.yaml:8:36: targets.n8n.circuit_breaker.open_delay: must not be longer than max_open_delay (5m)",
    );
    top(
        "storage: { max_bytes: 0 }",
        "test.yaml:9:23: storage.max_bytes: must be at least 64 KiB",
    );
    top(
        "storage: { max_bytes: 63KiB }",
        "test.yaml:9:23: storage.max_bytes: must be at least 64 KiB",
    );
    top(
        "shutdown: { grace_period: 200y }",
        "test.yaml:9:27: shutdown.grace_period: must be at most 100 years",
    );

    // The smallest and largest workable values.
    let edges = "streams:\n  chat:\n    url: http://127.0.0.1:1/listen\n    idle_timeout: 1ms\n    rotate_after: 500ms\n    max_event_bytes: 1\n    \
        reconnect: { initial_delay: 1ms, max_delay: 1ms, auth_failure_delay: 36500d }\ntargets:\n  n8n:\n    url: http://127.0.0.1:2/hook\n    \
        timeout: 1ms\n    retry: { initial_delay: 1ms, max_delay: 1ms, max_elapsed: 1ms }\n    circuit_breaker: { open_delay: 1ms, max_open_delay: 1ms }\n\
        storage: { max_bytes: 64KiB, dead_letter_retention: 0s }\nshutdown: { grace_period: 0s }\n";
    parse_config(edges, &[]).unwrap_or_else(|err| panic!("{err}"));
}

#[test]
fn postgres_storage_needs_a_url_that_parses_and_a_workable_lease_ttl() {
    let with_storage =
        |storage: &str| format!("storage: {storage}\nstreams:\n  chat:\n    url: http://a/\ntargets: {{}}\n");
    let cases = [
        (
            "{ mode: postgres }",
            "storage.url: storage.mode postgres needs the database's url, e.g. url: ${DATABASE_URL}",
        ),
        (
            "{ mode: postgres, url: \"${DATABASE_URL}\", lease_ttl: 100ms }",
            "storage.lease_ttl: must be at least 1s",
        ),
        (
            "{ mode: postgres, url: \"${BAD_URL}\" }",
            "storage.url: is not a PostgreSQL connection url",
        ),
    ];
    let env = [
        ("DATABASE_URL", "postgres://relay:pg-secret@127.0.0.1:5432/relay"),
        ("BAD_URL", "postgres://relay:pg-secret@127.0.0.1:notaport/relay"),
    ];
    for (storage, expected) in cases {
        let err = parse_config(&with_storage(storage), &env)
            .expect_err(storage)
            .to_string();
        assert!(err.contains(expected), "{storage}: {err}");
        assert!(!err.contains("pg-secret"), "the password is shown: {err}");
    }
    let config = parse_config(
        &with_storage("{ mode: postgres, url: \"${DATABASE_URL}\", replica: relay-a }"),
        &env,
    )
    .unwrap();
    let shown = sse_relay::check::describe(&config);
    assert!(shown.contains("postgres 127.0.0.1:5432 database relay"), "{shown}");
    assert!(shown.contains("lease_ttl 10s"), "{shown}");
    assert!(!shown.contains("pg-secret"), "{shown}");
}
