//! The command line, declared with clap's derive: every subcommand gets its own `--help`, and
//! usage errors exit 2 with clap's message naming the argument. What the commands do lives in
//! `main.rs` (run, check, demo) and `remote.rs` (status, rollout).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    /// Print the version (as --version does)
    #[command(hide = true)]
    Version,
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

/// How `status` and `rollout` find the admin API, and how they print what it says.
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

    #[test]
    fn the_derive_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
