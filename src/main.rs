//! The `sse-relay` command line: parse arguments, load config, start telemetry, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use sse_relay::telemetry::{self, LogFormat};
use sse_relay::{admin, app, check, config, dlq};

#[derive(Parser)]
#[command(
    name = "sse-relay",
    version,
    about = "Relays Server-Sent-Events streams to HTTP webhooks",
    after_help = "Example:\n  sse-relay check --config relay.yaml\n  sse-relay run --config relay.yaml"
)]
struct Cli {
    /// Log format; text on a terminal and JSON otherwise by default. RUST_LOG filters.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay until SIGTERM or SIGINT.
    #[command(after_help = "Example:\n  sse-relay run --config /etc/sse-relay/relay.yaml\n  \
                            SSE_RELAY_CONFIG=relay.yaml sse-relay run --log-format json")]
    Run {
        /// The config file (YAML). SIGHUP re-reads it.
        #[arg(long, env = "SSE_RELAY_CONFIG", default_value = "relay.yaml")]
        config: PathBuf,
    },
    /// Validate the config and print the resolved routing table, secrets masked.
    #[command(after_help = "Example:\n  sse-relay check --config relay.yaml && systemctl reload sse-relay")]
    Check {
        /// The config file (YAML) to check; every problem in it is reported in one run.
        #[arg(long, env = "SSE_RELAY_CONFIG", default_value = "relay.yaml")]
        config: PathBuf,
    },
    /// Dead letters: deliveries that failed permanently or ran out of retries.
    #[command(after_help = "Examples:\n  sse-relay dlq list --target n8n\n  \
                            sse-relay dlq replay --id 42\n  \
                            sse-relay dlq purge --older-than 7d")]
    Dlq {
        /// The config file whose `storage` section names the store (SQLite or PostgreSQL).
        #[arg(long, env = "SSE_RELAY_CONFIG", default_value = "relay.yaml", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Test routes: what the relay would do with one sample message of a stream.
    #[command(after_help = "Example:\n  echo '{\"type\":\"node_update\"}' | sse-relay route test --stream chat/8f1c -")]
    Route {
        #[command(subcommand)]
        command: RouteCommand,
    },
    /// Print events live as a running relay receives them, with the targets they were queued
    /// for, and each delivery's outcome. A slow reader loses items (told how many); the relay
    /// never waits for it.
    #[command(after_help = "Examples:\n  sse-relay tap\n  \
                            sse-relay tap --stream 'chat/*' --type 'node_*' --data\n  \
                            SSE_RELAY_ADMIN_TOKEN=... sse-relay tap --url http://10.0.0.5:9464 --target n8n")]
    Tap {
        /// The relay's admin address (admin.listen).
        #[arg(long, default_value = "http://127.0.0.1:9464")]
        url: String,
        /// admin.token, when the relay sets one.
        #[arg(long, env = "SSE_RELAY_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Only streams (or instances, `chat/8f1c`) matching this pattern (`*`, `?`).
        #[arg(long)]
        stream: Option<String>,
        /// Only event types matching this pattern.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only events queued for this target, and its deliveries.
        #[arg(long)]
        target: Option<String>,
        /// Show each event's data too (it may hold personal data; secrets are never shown).
        #[arg(long)]
        data: bool,
    },
    /// Streams and targets of a running relay at a glance, from its admin API (/v1/status).
    #[command(after_help = "Examples:\n  sse-relay status\n  \
                            SSE_RELAY_ADMIN_TOKEN=... sse-relay status --url http://10.0.0.5:9464 --watch\n  \
                            sse-relay status --json | jq '.targets[] | select(.queue_depth > 0)'")]
    Status {
        /// The relay's admin address (admin.listen).
        #[arg(long, default_value = "http://127.0.0.1:9464")]
        url: String,
        /// admin.token, when the relay sets one.
        #[arg(long, env = "SSE_RELAY_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Print /v1/status as JSON, for scripts.
        #[arg(long)]
        json: bool,
        /// Refresh every interval (2s when given alone) until interrupted.
        #[arg(long, num_args = 0..=1, default_missing_value = "2s", value_parser = humantime::parse_duration)]
        watch: Option<std::time::Duration>,
    },
    /// Exit 0 when the relay's admin endpoint answers; for container health checks.
    #[command(after_help = "Example:\n  sse-relay health --url http://127.0.0.1:9464/readyz")]
    Health {
        /// The admin URL to probe: /healthz (alive) or /readyz (ready).
        #[arg(long, default_value = "http://127.0.0.1:9464/healthz")]
        url: String,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters.
    #[command(after_help = "Example:\n  sse-relay dlq list --target zapier --json")]
    List {
        /// Only the dead letters of this target.
        #[arg(long)]
        target: Option<String>,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back to the queue; works while the relay runs.
    #[command(after_help = "Examples:\n  sse-relay dlq replay --id 42\n  sse-relay dlq replay --target n8n")]
    Replay {
        /// Only the dead letters of this target.
        #[arg(long)]
        target: Option<String>,
        /// Only the dead letter with this id (from `dlq list`).
        #[arg(long)]
        id: Option<i64>,
        /// Every dead letter; needed when no other selection is given.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead letters for good.
    #[command(
        after_help = "Examples:\n  sse-relay dlq purge --older-than 7d\n  sse-relay dlq purge --target old-hook --all"
    )]
    Purge {
        /// Only the dead letters of this target.
        #[arg(long)]
        target: Option<String>,
        /// Only those older than this, e.g. 7d.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
        /// Only the dead letter with this id (from `dlq list`).
        #[arg(long)]
        id: Option<i64>,
        /// Every dead letter; needed when no other selection is given.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum RouteCommand {
    /// Classify a sample message as the stream would, list the routes that match, and show per
    /// target the request that would be sent (its own headers masked, a signature computed
    /// now). Sends nothing. Exits 1 when no route matches, so it can guard a config in CI.
    #[command(
        after_help = "Examples:\n  sse-relay route test --config relay.yaml --stream participant/42 sample.json\n  \
                            printf 'event: message\\ndata: {\"x\":1}\\n' | sse-relay route test --stream chat/1 -"
    )]
    Test {
        /// The config file (YAML) whose streams, routes and targets are tested.
        #[arg(long, env = "SSE_RELAY_CONFIG", default_value = "relay.yaml")]
        config: PathBuf,
        /// The stream the message comes from: its name, or an instance's (`chat/8f1c`).
        #[arg(long)]
        stream: String,
        /// The SSE `event:` field of the message, if it has one.
        #[arg(long)]
        event_type: Option<String>,
        /// The sample: an SSE message (`event:`, `data:`, `id:` lines) or its data alone; `-`
        /// reads standard input.
        input: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(loaded) => {
                let warnings = check::config_warnings(&loaded).into_iter();
                for warning in warnings.chain(check::file_warnings(&config, &loaded)) {
                    eprintln!("warning: {warning}");
                }
                println!("{}: ok\n\n{}", config.display(), check::describe(&loaded));
                ExitCode::SUCCESS
            }
            Err(err) => fail_config(&err),
        },
        Command::Run { config } => {
            let loaded = match config::load(&config) {
                Ok(loaded) => loaded,
                Err(err) => return fail_config(&err),
            };
            telemetry::init_logging(cli.log_format);
            raise_open_file_limit(loaded.descriptors());
            let run = async {
                // Installed before anything starts: a SIGTERM during start-up stops the relay
                // cleanly instead of killing it.
                let shutdown = shutdown_signal();
                app::run_with_reloads(loaded, Some(config), shutdown).await
            };
            match runtime().block_on(run) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => fail(&format!("{err:#}")),
            }
        }
        Command::Dlq { config, command } => match config::load_storage(&config)
            .map_err(anyhow::Error::from)
            .and_then(|storage| dead_letters(&storage, command))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => fail(&format!("{err:#}")),
        },
        Command::Route {
            command:
                RouteCommand::Test {
                    config,
                    stream,
                    event_type,
                    input,
                },
        } => route_test(&config, &stream, event_type.as_deref(), &input),
        Command::Tap {
            url,
            token,
            stream,
            event_type,
            target,
            data,
        } => {
            let mut query = url::form_urlencoded::Serializer::new(String::new());
            for (key, value) in [("stream", stream), ("type", event_type), ("target", target)] {
                if let Some(value) = value {
                    query.append_pair(key, &value);
                }
            }
            if data {
                query.append_pair("data", "true");
            }
            match runtime().block_on(admin::print_tap(&url, token.as_deref(), &query.finish())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => fail(&format!("{err:#}")),
            }
        }
        Command::Status {
            url,
            token,
            json,
            watch,
        } => runtime().block_on(async {
            loop {
                match admin::fetch_status(&url, token.as_deref()).await {
                    Ok(status) if json => match serde_json::to_string_pretty(&status) {
                        Ok(text) => println!("{text}"),
                        Err(err) => return fail(&format!("{err}")),
                    },
                    Ok(status) => {
                        if watch.is_some() {
                            // Clears the terminal, as watch(1) does.
                            print!("\x1b[2J\x1b[H");
                        }
                        print!("{}", admin::status_table(&status));
                    }
                    Err(err) => return fail(&format!("{err:#}")),
                }
                let Some(every) = watch else { return ExitCode::SUCCESS };
                tokio::time::sleep(every).await;
            }
        }),
        Command::Health { url } => match runtime().block_on(admin::probe(&url)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => fail(&format!("{err:#}")),
        },
    }
}

fn route_test(config: &std::path::Path, stream: &str, event_type: Option<&str>, input: &std::path::Path) -> ExitCode {
    let loaded = match config::load(config) {
        Ok(loaded) => loaded,
        Err(err) => return fail_config(&err),
    };
    let sample = if input.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map(|_| text)
    } else {
        std::fs::read_to_string(input)
    };
    let sample = match sample {
        Ok(sample) => sample,
        Err(err) => return fail(&format!("cannot read the sample {}: {err}", input.display())),
    };
    match sse_relay::route_test::run(
        &loaded,
        stream,
        sse_relay::route_test::parse_sample(&sample, event_type),
    ) {
        Ok(outcome) => {
            print!("{}", outcome.report);
            if outcome.routed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => fail(&err),
    }
}

fn dead_letters(storage: &config::StorageConfig, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { target, json } => {
            let rows = dlq::list(
                storage,
                &dlq::Selection {
                    target,
                    ..dlq::Selection::default()
                },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{}", dlq::table(&rows));
            }
        }
        DlqCommand::Replay { target, id, all } => {
            let n = dlq::replay(
                storage,
                &dlq::Selection {
                    target,
                    id,
                    older_than: None,
                },
                all,
            )?;
            println!("replayed {n} dead letter(s)");
        }
        DlqCommand::Purge {
            target,
            older_than,
            id,
            all,
        } => {
            let n = dlq::purge(storage, &dlq::Selection { target, id, older_than }, all)?;
            println!("purged {n} dead letter(s)");
        }
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard one. Services often start with a soft
/// limit of 1,024, which streams, deliveries, the store and admin clients can reach together.
/// Says so when even the raised limit cannot hold what the config can open at once.
fn raise_open_file_limit(needed: config::Descriptors) {
    // The hard limit can be "unlimited", which Linux refuses as a soft limit; 2^20 is its
    // usual ceiling (fs.nr_open).
    let limit = match rlimit::increase_nofile_limit(u64::MAX).or_else(|_| rlimit::increase_nofile_limit(1 << 20)) {
        Ok(limit) => {
            tracing::info!(limit, "open file limit");
            limit
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot raise the open file limit; it stays as it was");
            match rlimit::getrlimit(rlimit::Resource::NOFILE) {
                Ok((soft, _)) => soft,
                Err(_) => return,
            }
        }
    };
    if limit < needed.total() {
        tracing::error!(
            limit,
            needed = needed.total(),
            stream_connections = needed.streams,
            target_connections = needed.targets,
            "the open file limit cannot hold the configured streams and targets: connections will fail with \
             \"too many open files\"; raise the hard limit (systemd LimitNOFILE=, docker --ulimit nofile=, \
             ulimit -Hn)"
        );
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
}

fn fail(err: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {err}");
    ExitCode::FAILURE
}

/// Every problem of the config, one `error:` line each.
fn fail_config(err: &config::ConfigError) -> ExitCode {
    for problem in &err.problems {
        eprintln!("error: {problem}");
    }
    ExitCode::FAILURE
}

/// Installs the handlers of SIGTERM (systemd, containers) and SIGINT (Ctrl-C) now; the
/// future completes on either. Call it within the runtime.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).expect("a SIGTERM handler can be installed");
        let mut interrupt = signal(SignalKind::interrupt()).expect("a SIGINT handler can be installed");
        async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every flag says what it is for, and every command shows an example.
    #[test]
    fn every_flag_has_help_and_every_command_an_example() {
        fn walk(command: &clap::Command, path: &str, problems: &mut Vec<String>) {
            let path = format!("{path} {}", command.get_name());
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if !["help", "version"].contains(&id) && arg.get_help().is_none() {
                    problems.push(format!("{path}: --{id} has no help text"));
                }
            }
            let example = command
                .get_after_help()
                .is_some_and(|after| after.to_string().contains("sse-relay "));
            if !example {
                problems.push(format!("{path}: no example"));
            }
            for subcommand in command.get_subcommands().filter(|sub| sub.get_name() != "help") {
                walk(subcommand, &path, problems);
            }
        }
        let mut problems = Vec::new();
        walk(&Cli::command(), "", &mut problems);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
