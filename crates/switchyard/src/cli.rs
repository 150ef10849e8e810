//! The command line, declared with clap's derive: every subcommand gets its own `--help`, and
//! usage errors exit 2 with clap's message naming the argument. What the commands do lives in
//! `main.rs` (run, check, demo), `remote.rs` (status, rollout), `steer.rs` (split, backend,
//! upstream, reload, events, state), `effective.rs` (config) and `docs.rs` (completions, man).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;

/// Where `status` and `rollout` look for the config when neither `--config` nor
/// `SWITCHYARD_CONFIG` names one: the path the systemd unit in `deploy/` runs with.
pub const DEFAULT_CONFIG: &str = "/etc/switchyard/switchyard.yaml";

#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about = "A programmable L7 load balancer for zero-downtime deploys",
    after_help = "The log level comes from RUST_LOG. Exit codes: 0 success, 1 invalid config, start-up error or refused API call, 2 usage error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the load balancer in the foreground
    Run {
        #[command(flatten)]
        config: ConfigFile,
        /// Take the listening sockets over from the running instance (graceful binary upgrade)
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config: exit 0 if valid, else 1 and one line per problem
    Check {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Run two demo backends and a load balancer in front of them; needs no file
    Demo,
    /// Routes, splits, rollouts and backends, from the admin API the config names
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Start, watch and steer a route's rollout (canary with analysis)
    #[command(subcommand)]
    Rollout(Rollout),
    /// Replace a route's split: `switchyard split web blue=90 green=10`
    Split(SplitArgs),
    /// Drain, disable, enable, reweight, add or remove one backend of an upstream
    #[command(subcommand)]
    Backend(Backend),
    /// Drain, disable or enable every backend of an upstream at once
    #[command(subcommand)]
    Upstream(Upstream),
    /// Re-read the config file of the running instance (as SIGHUP does)
    Reload {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// What changed, oldest first: admin changes, reloads, health, rollouts
    Events(EventsArgs),
    /// The runtime state on top of the config file (splits, backend changes)
    #[command(subcommand)]
    State(State),
    /// Print the effective config (the file, its defaults and the runtime state), as nginx -T
    Config {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print a shell completion script: `switchyard completions bash > /etc/bash_completion.d/switchyard`
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the man page (roff): `switchyard man | man -l -`
    Man,
    /// Print the version (as --version does)
    #[command(hide = true)]
    Version,
}

/// The shells `completions` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Args)]
pub struct SplitArgs {
    /// The route's name
    pub route: String,
    /// The whole new split, UPSTREAM=WEIGHT each (weights 0..=10000, relative)
    #[arg(value_name = "UPSTREAM=WEIGHT", required = true, value_parser = upstream_weight)]
    pub weights: Vec<(String, u32)>,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Subcommand)]
pub enum Backend {
    /// No new requests; those in flight finish (state draining)
    Drain(OnBackend),
    /// No requests at all, kept in the list (state disabled)
    Disable(OnBackend),
    /// Take traffic again (state active)
    Enable(OnBackend),
    /// Set the backend's weight (0..=1000; 0 takes no new requests)
    Weight(BackendWeight),
    /// Add a backend (health-checked first when the upstream has a check)
    Add(AddBackend),
    /// Remove a backend; it must be draining or disabled, with nothing in flight
    Remove(OnBackend),
}

#[derive(Debug, Args)]
pub struct OnBackend {
    /// The upstream's name
    pub upstream: String,
    /// The backend's address, IP:port
    pub address: SocketAddr,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct BackendWeight {
    /// The upstream's name
    pub upstream: String,
    /// The backend's address, IP:port
    pub address: SocketAddr,
    /// The new weight, 0..=1000
    pub weight: u32,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct AddBackend {
    /// The upstream's name
    pub upstream: String,
    /// The new backend's address, IP:port
    pub address: SocketAddr,
    /// Its weight, 0..=1000 (default: the config file's for a backend it lists, else 1)
    #[arg(long, value_name = "N")]
    pub weight: Option<u32>,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Subcommand)]
pub enum Upstream {
    /// Drain every backend: no new requests, those in flight finish
    Drain(OnUpstream),
    /// Disable every backend
    Disable(OnUpstream),
    /// Make every backend active again
    Enable(OnUpstream),
}

#[derive(Debug, Args)]
pub struct OnUpstream {
    /// The upstream's name
    pub upstream: String,
    /// Do it even when a route is left with no upstream to serve it (it answers 503)
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only the events after this id (follow the log by passing the last id seen)
    #[arg(long, value_name = "ID")]
    pub since: Option<u64>,
    /// At most this many (1..=1000; without --since, the newest)
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Subcommand)]
pub enum State {
    /// The runtime changes on top of the config file, as the state file holds them
    Show {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Drop every runtime change (splits, weights, states, added and removed backends): the
    /// config file alone rules again
    Reset {
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// The config file of `run` and `check`: required, from the flag or the environment.
#[derive(Debug, Args)]
pub struct ConfigFile {
    /// The config file
    #[arg(
        short = 'c',
        long = "config",
        value_name = "FILE",
        env = "SWITCHYARD_CONFIG"
    )]
    pub path: PathBuf,
}

/// How the commands that talk to a running instance find its admin API (and `config` its
/// state file), and how they print what it says.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The config file naming the admin API (its address and token file)
    #[arg(
        short = 'c',
        long = "config",
        value_name = "FILE",
        env = "SWITCHYARD_CONFIG",
        default_value = DEFAULT_CONFIG
    )]
    pub config: PathBuf,
    /// Print the API's JSON instead of tables (for status: one object holding routes,
    /// rollouts and upstreams)
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Rollout {
    /// Start a rollout on ROUTE toward --to; fields not given take the server's defaults
    Start(Box<Start>),
    /// The route's current or last rollout: step, weight and the last analysis windows
    Status(OnRoute),
    /// Hold at the current weight (analysis keeps running and can still fail it)
    Pause(OnRoute),
    /// Go on from where the rollout was held
    Resume(OnRoute),
    /// Skip the remaining steps: --to gets its full share now
    Promote(OnRoute),
    /// Give --from the whole share back now
    Abort(OnRoute),
}

#[derive(Debug, Args)]
pub struct OnRoute {
    /// The route's name
    pub route: String,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct Start {
    /// The route's name
    pub route: String,
    /// The upstream that gets the traffic step by step
    #[arg(long, value_name = "UPSTREAM")]
    pub to: String,
    /// The upstream that gives it up (default: the other one with the largest weight)
    #[arg(long, value_name = "UPSTREAM")]
    pub from: Option<String>,
    /// Percentages of the route's share for --to, increasing, ending at 100
    #[arg(long, value_name = "1,5,25,50,100", value_delimiter = ',', value_parser = percentage)]
    pub steps: Option<Vec<f64>>,
    /// How long each step holds before the next (step_interval)
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub every: Option<String>,
    /// How often the analysis judges --to (analysis.interval)
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub analysis_interval: Option<String>,
    /// Fewer requests to --to in a window make it inconclusive (analysis.min_requests)
    #[arg(long, value_name = "N")]
    pub min_requests: Option<u64>,
    /// The highest error rate of a passing window, 0..1 (analysis.max_error_rate)
    #[arg(long, value_name = "RATE")]
    pub max_error_rate: Option<f64>,
    /// The highest p99 latency of a passing window (analysis.max_p99_latency)
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub max_p99: Option<String>,
    /// The highest p99 of --to over the p99 of --from (analysis.max_latency_ratio)
    #[arg(long, value_name = "RATIO")]
    pub max_latency_ratio: Option<f64>,
    /// A URL fetched before every step; a failing answer fails the rollout (repeatable)
    #[arg(long = "check", value_name = "URL")]
    pub checks: Vec<String>,
    /// What a failed window or check does
    #[arg(long, value_enum, value_name = "ACTION")]
    pub on_failure: Option<OnFailure>,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnFailure {
    /// Give --from the whole share back at once (state rolled_back)
    Rollback,
    /// Hold where it is, with the reason (state paused)
    Pause,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Rollback => "rollback",
            OnFailure::Pause => "pause",
        }
    }
}

/// A duration as the config spells it (`500ms`, `1m`); kept as text, the API reads the same.
fn duration(text: &str) -> Result<String, String> {
    switchyard_config::parse_duration(text).map(|_| text.trim().to_string())
}

/// `blue=90`: an upstream and its split weight.
fn upstream_weight(text: &str) -> Result<(String, u32), String> {
    let (upstream, weight) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not UPSTREAM=WEIGHT (e.g. blue=90)"))?;
    if upstream.is_empty() {
        return Err(format!("{text:?} names no upstream (e.g. blue=90)"));
    }
    let weight = weight
        .trim()
        .parse::<u32>()
        .map_err(|_| format!("{text:?}: the weight must be a whole number (e.g. blue=90)"))?;
    Ok((upstream.to_string(), weight))
}

/// A step percentage: a number, fractions allowed. Order and range are the API's to judge.
fn percentage(text: &str) -> Result<f64, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|p| p.is_finite())
        .ok_or_else(|| format!("{text:?} is not a percentage (e.g. 5 or 0.5)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &str) -> Result<Command, clap::Error> {
        Cli::try_parse_from(std::iter::once("switchyard").chain(args.split_whitespace()))
            .map(|cli| cli.command)
    }

    /// One test touches the environment, so none runs while another reads it.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn without_env<T>(f: impl FnOnce() -> T) -> T {
        let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
        std::env::remove_var("SWITCHYARD_CONFIG");
        f()
    }

    #[test]
    fn run_check_and_demo_parse_as_before() {
        without_env(|| {
            match parse("run --config a.yaml --upgrade") {
                Ok(Command::Run { config, upgrade }) => {
                    assert_eq!(config.path, PathBuf::from("a.yaml"));
                    assert!(upgrade);
                }
                other => panic!("{other:?}"),
            }
            match parse("check --config=b.yaml") {
                Ok(Command::Check { config }) => assert_eq!(config.path, PathBuf::from("b.yaml")),
                other => panic!("{other:?}"),
            }
            match parse("run -c c.yaml") {
                Ok(Command::Run { config, upgrade }) => {
                    assert_eq!(config.path, PathBuf::from("c.yaml"));
                    assert!(!upgrade);
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(parse("demo"), Ok(Command::Demo)));
            assert!(matches!(parse("version"), Ok(Command::Version)));
        });
    }

    #[test]
    fn version_and_help_are_not_errors_to_exit_2() {
        for args in ["--version", "-V"] {
            let e = parse(args).expect_err("clap answers --version itself");
            assert_eq!(e.kind(), ErrorKind::DisplayVersion);
            assert_eq!(e.exit_code(), 0);
            assert_eq!(
                e.to_string(),
                format!("switchyard {}\n", env!("CARGO_PKG_VERSION"))
            );
        }
        for args in [
            "--help",
            "run --help",
            "status --help",
            "rollout start --help",
        ] {
            let e = parse(args).expect_err("clap answers --help itself");
            assert_eq!(e.kind(), ErrorKind::DisplayHelp, "{args}");
            assert_eq!(e.exit_code(), 0);
        }
    }

    #[test]
    fn usage_errors_exit_2_and_name_what_is_wrong() {
        without_env(|| {
            let cases = [
                ("", "subcommand"),
                ("launch", "'launch'"),
                ("check --upgrade --config a", "'--upgrade'"),
                ("run --config", "--config <FILE>"),
                ("check", "--config <FILE>"),
                ("demo --config a.yaml", "'--config'"),
                ("rollout start web", "--to <UPSTREAM>"),
                (
                    "rollout start web --to g --every 1x",
                    "invalid duration \"1x\"",
                ),
                (
                    "rollout start web --to g --steps 1,x",
                    "\"x\" is not a percentage",
                ),
                ("rollout start web --to g --on-failure retry", "'retry'"),
                ("rollout pause", "<ROUTE>"),
            ];
            for (args, names) in cases {
                let e = parse(args).expect_err(args);
                assert_eq!(e.exit_code(), 2, "{args}");
                assert!(e.to_string().contains(names), "{args}: {e}");
            }
        });
    }

    #[test]
    fn the_config_may_come_from_the_environment() {
        let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
        std::env::set_var("SWITCHYARD_CONFIG", "/from/env.yaml");
        let check = parse("check");
        let flag_wins = parse("status --config x.yaml");
        let rollout = parse("rollout status web");
        std::env::remove_var("SWITCHYARD_CONFIG");
        match check {
            Ok(Command::Check { config }) => {
                assert_eq!(config.path, PathBuf::from("/from/env.yaml"))
            }
            other => panic!("{other:?}"),
        }
        match flag_wins {
            Ok(Command::Status { api }) => assert_eq!(api.config, PathBuf::from("x.yaml")),
            other => panic!("{other:?}"),
        }
        match rollout {
            Ok(Command::Rollout(Rollout::Status(on))) => {
                assert_eq!(on.route, "web");
                assert_eq!(on.api.config, PathBuf::from("/from/env.yaml"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn status_without_a_config_uses_the_default_path() {
        without_env(|| match parse("status --json") {
            Ok(Command::Status { api }) => {
                assert_eq!(api.config, PathBuf::from(DEFAULT_CONFIG));
                assert!(api.json);
            }
            other => panic!("{other:?}"),
        });
    }

    #[test]
    fn rollout_start_takes_every_option() {
        let args = "rollout start web --to green --from blue --steps 1,5,0.5,100 --every 1m \
                    --max-error-rate 0.02 --check http://a/v --check http://b/v \
                    --analysis-interval 10s --min-requests 50 --max-p99 500ms \
                    --max-latency-ratio 1.5 --on-failure pause --json";
        let start = match without_env(|| parse(args)) {
            Ok(Command::Rollout(Rollout::Start(start))) => start,
            other => panic!("{other:?}"),
        };
        assert_eq!(start.route, "web");
        assert_eq!(start.to, "green");
        assert_eq!(start.from.as_deref(), Some("blue"));
        assert_eq!(start.steps, Some(vec![1.0, 5.0, 0.5, 100.0]));
        assert_eq!(start.every.as_deref(), Some("1m"));
        assert_eq!(start.max_error_rate, Some(0.02));
        assert_eq!(start.checks, ["http://a/v", "http://b/v"]);
        assert_eq!(start.analysis_interval.as_deref(), Some("10s"));
        assert_eq!(start.min_requests, Some(50));
        assert_eq!(start.max_p99.as_deref(), Some("500ms"));
        assert_eq!(start.max_latency_ratio, Some(1.5));
        assert_eq!(start.on_failure, Some(OnFailure::Pause));
        assert!(start.api.json);
    }

    /// Every subcommand, nested ones too, answers `--help` with its usage and exit 0.
    #[test]
    fn every_subcommand_has_help() {
        use clap::CommandFactory;
        fn walk(command: &clap::Command, path: Vec<String>, out: &mut Vec<Vec<String>>) {
            for sub in command.get_subcommands() {
                let mut path = path.clone();
                path.push(sub.get_name().to_string());
                out.push(path.clone());
                walk(sub, path, out);
            }
        }
        let mut all = Vec::new();
        walk(&Cli::command(), Vec::new(), &mut all);
        assert!(all.len() > 25, "{all:?}");
        for path in all {
            let mut argv = vec!["switchyard".to_string()];
            argv.extend(path.iter().cloned());
            argv.push("--help".into());
            let e = Cli::try_parse_from(&argv).expect_err("clap answers --help itself");
            assert_eq!(e.kind(), ErrorKind::DisplayHelp, "{path:?}");
            assert_eq!(e.exit_code(), 0, "{path:?}");
            let usage = format!("Usage: switchyard {}", path.join(" "));
            assert!(e.to_string().contains(&usage), "{path:?}: {e}");
        }
    }

    #[test]
    fn the_new_commands_parse() {
        without_env(|| {
            match parse("split web blue=90 green=10 --json") {
                Ok(Command::Split(split)) => {
                    assert_eq!(split.route, "web");
                    assert_eq!(split.weights, [("blue".into(), 90), ("green".into(), 10)]);
                    assert!(split.api.json);
                }
                other => panic!("{other:?}"),
            }
            match parse("backend weight blue 127.0.0.1:9001 5") {
                Ok(Command::Backend(Backend::Weight(w))) => {
                    assert_eq!((w.upstream.as_str(), w.weight), ("blue", 5));
                    assert_eq!(w.address.to_string(), "127.0.0.1:9001");
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(
                parse("upstream drain green --force"),
                Ok(Command::Upstream(Upstream::Drain(OnUpstream {
                    force: true,
                    ..
                })))
            ));
            match parse("events --since 4 --limit 10") {
                Ok(Command::Events(e)) => assert_eq!((e.since, e.limit), (Some(4), Some(10))),
                other => panic!("{other:?}"),
            }
            assert!(matches!(
                parse("state reset"),
                Ok(Command::State(State::Reset { .. }))
            ));
            assert!(matches!(
                parse("completions zsh"),
                Ok(Command::Completions { shell: Shell::Zsh })
            ));
            for (args, names) in [
                ("split web", "<UPSTREAM=WEIGHT>"),
                ("split web blue", "\"blue\" is not UPSTREAM=WEIGHT"),
                ("split web blue=x", "the weight must be a whole number"),
                ("backend drain blue localhost", "invalid value 'localhost'"),
                ("completions tcsh", "'tcsh'"),
            ] {
                let e = parse(args).expect_err(args);
                assert_eq!(e.exit_code(), 2, "{args}");
                assert!(e.to_string().contains(names), "{args}: {e}");
            }
        });
    }

    #[test]
    fn the_derive_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
