//! Command-line parsing. Small enough that a parser crate would cost more than it saves.

use std::path::PathBuf;

pub const USAGE: &str = "\
usage:
  switchyard run --config FILE [--upgrade]   run the load balancer in the foreground
  switchyard check --config FILE             validate a config: exit 0 if valid, else 1
  switchyard demo                            run two demo backends and a load balancer
  switchyard --version

--config may also come from SWITCHYARD_CONFIG; the log level from RUST_LOG.";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run { config: PathBuf, upgrade: bool },
    Check { config: PathBuf },
    Demo,
    Version,
    Help,
}

pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut args = args.into_iter();
    let Some(sub) = args.next() else {
        return Err("a command is required".into());
    };
    let mut config: Option<PathBuf> = None;
    let mut upgrade = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => match args.next() {
                Some(path) => config = Some(PathBuf::from(path)),
                None => return Err("--config needs a file".into()),
            },
            "--upgrade" if sub == "run" => upgrade = true,
            other => match other.strip_prefix("--config=") {
                Some(path) => config = Some(PathBuf::from(path)),
                None => return Err(format!("unexpected argument {other:?} for {sub:?}")),
            },
        }
    }
    let config_path = || {
        config
            .clone()
            .or_else(|| std::env::var_os("SWITCHYARD_CONFIG").map(PathBuf::from))
            .ok_or_else(|| format!("{sub} needs --config FILE (or SWITCHYARD_CONFIG)"))
    };
    match sub.as_str() {
        "run" => Ok(Command::Run {
            config: config_path()?,
            upgrade,
        }),
        "check" => Ok(Command::Check {
            config: config_path()?,
        }),
        "demo" if config.is_none() => Ok(Command::Demo),
        "demo" => Err("demo takes no --config; it embeds its own".into()),
        "--version" | "-V" | "version" => Ok(Command::Version),
        "--help" | "-h" | "help" => Ok(Command::Help),
        other => Err(format!("unknown command {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(args: &str) -> Result<Command, String> {
        parse(args.split_whitespace().map(String::from))
    }

    #[test]
    fn commands_parse() {
        assert_eq!(
            parse_str("run --config a.yaml --upgrade"),
            Ok(Command::Run {
                config: "a.yaml".into(),
                upgrade: true
            })
        );
        assert_eq!(
            parse_str("check --config=b.yaml"),
            Ok(Command::Check {
                config: "b.yaml".into()
            })
        );
        assert_eq!(parse_str("demo"), Ok(Command::Demo));
        assert_eq!(parse_str("--version"), Ok(Command::Version));
    }

    #[test]
    fn usage_errors_say_what_is_wrong() {
        assert!(parse_str("").is_err());
        assert_eq!(
            parse_str("launch"),
            Err("unknown command \"launch\"".into())
        );
        assert_eq!(
            parse_str("check --upgrade --config a"),
            Err("unexpected argument \"--upgrade\" for \"check\"".into())
        );
        assert_eq!(
            parse_str("run --config"),
            Err("--config needs a file".into())
        );
    }
}
