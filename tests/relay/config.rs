//! Config text in, a config or an error naming the place out.

use std::time::Instant;

use sse_relay::config::{Config, ConfigError};

use crate::support::{DEADLINE, make_fifo, parse_config};

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
        "test.yaml:9:5: routes[0]: unknown field `target`, expected one of `stream`, `events`, `where`, `targets`",
    );
    check(
        &base("colour: blue\n"),
        "test.yaml:7:1: unknown field `colour`, expected one of `admin`, `streams`, `targets`, `routes`, `shutdown`, `storage`",
    );
    check(
        &base("").replace(
            "url: http://127.0.0.1:2/hook",
            "url: http://127.0.0.1:2/hook\n    timeout: ten seconds",
        ),
        "test.yaml:7:14: targets.n8n.timeout: invalid value: string \"ten seconds\", expected a duration",
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
