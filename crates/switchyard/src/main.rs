//! The `switchyard` binary: command line, and the Pingora server assembled from a config.

mod admin_client;
mod alloc;
mod cli;
mod demo;
mod docs;
mod effective;
mod http_client;
mod launch;
mod limits;
mod logging;
mod pid_file;
mod remote;
mod signals;
mod steer;
mod store;
mod systemd;
mod tables;
mod upgrade_socket;
mod workers;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command};
use switchyard_admin::Token;
use switchyard_config::{Config, Problems};

fn main() -> ExitCode {
    let command = match Cli::try_parse() {
        Ok(cli) => cli.command,
        // Usage errors go to stderr and exit 2; --help and --version to stdout, exit 0.
        Err(answer) => {
            let _ = answer.print();
            return ExitCode::from(u8::try_from(answer.exit_code()).unwrap_or(2));
        }
    };
    match command {
        Command::Version => {
            println!("switchyard {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Check {
            config: cli::ConfigFile { path: config },
        } => match Config::load(&config) {
            Ok(loaded) => {
                let token = loaded.admin.as_ref().and_then(|a| a.token_file.as_deref());
                // A field path first, as every problem line of `check`.
                if let Some(Err(problem)) = token.map(Token::read) {
                    eprintln!("{problem}");
                    return ExitCode::from(1);
                }
                // The certificate files as a start reads them: what would stop it is a
                // problem, an expired or expiring certificate only a warning. The upstreams'
                // CA files too, as the pool reads them at start and at each reload.
                let tls = switchyard_tls::check(&loaded);
                for warning in &tls.warnings {
                    eprintln!("warning: {warning}");
                }
                let mut errors = tls.errors;
                if let Err(problems) = switchyard_pool::load_upstream_tls(&loaded) {
                    errors.extend(problems);
                }
                errors.extend(switchyard_access_log::check(&loaded));
                if !errors.is_empty() {
                    eprintln!("{}", errors.join("\n"));
                    return ExitCode::from(1);
                }
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(problems) => {
                print_problems(&problems);
                ExitCode::from(1)
            }
        },
        Command::Run {
            config: cli::ConfigFile { path: config },
            upgrade,
        } => {
            init_logging();
            let loaded = match Config::load(&config) {
                Ok(loaded) => loaded,
                Err(problems) => {
                    print_problems(&problems);
                    return ExitCode::from(1);
                }
            };
            alloc::start_live_report();
            exit_on_error(launch::run(loaded, Some(config), upgrade, Vec::new()))
        }
        Command::Demo => {
            init_logging();
            exit_on_error(demo::run())
        }
        Command::Status { api } => exit_on_error(remote::status(&api)),
        Command::Rollout(rollout) => exit_on_error(remote::rollout(&rollout)),
        Command::Split(split) => exit_on_error(steer::split(&split)),
        Command::Backend(backend) => exit_on_error(steer::backend(&backend)),
        Command::Upstream(upstream) => exit_on_error(steer::upstream(&upstream)),
        Command::Reload { api } => exit_on_error(steer::reload(&api)),
        Command::Events(events) => exit_on_error(steer::events(&events)),
        Command::State(state) => exit_on_error(steer::state(&state)),
        Command::Config { api } => exit_on_error(effective::print(&api)),
        Command::Completions { shell } => exit_on_error(docs::print(&docs::completions(shell))),
        Command::Man => exit_on_error(docs::man().and_then(|page| docs::print(&page))),
    }
}

/// A config's problems, one line each: a problem of a field starts with its path (the
/// contract's `check` lines), one about the whole file (unreadable, YAML syntax) with
/// `switchyard:` as every other error line of the binary.
fn print_problems(problems: &Problems) {
    for problem in &problems.0 {
        if problem.path.is_empty() {
            eprintln!("switchyard: {problem}");
        } else {
            eprintln!("{problem}");
        }
    }
}

fn init_logging() {
    logging::init();
}

fn exit_on_error(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(cause) => {
            eprintln!("switchyard: {cause}");
            ExitCode::from(1)
        }
    }
}
