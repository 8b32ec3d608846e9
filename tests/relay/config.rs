//! Config text in, a config or an error naming the place out.

use crate::support::parse_config;

/// Config text in, an error naming the place out.
#[test]
fn config_errors_name_the_place() {
    let base = |routes: &str| {
        format!(
            "streams:\n  chat:\n    url: http://127.0.0.1:1/listen\ntargets:\n  n8n:\n    url: http://127.0.0.1:2/hook\n{routes}"
        )
    };
    let check = |yaml: &str, expected: &str| {
        let err = parse_config(yaml, &[("SET", "value")]).expect_err(yaml).to_string();
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
