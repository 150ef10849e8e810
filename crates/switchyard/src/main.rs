//! The `switchyard` binary: command line, and the Pingora server assembled from a config.

mod alloc;
mod cli;
mod demo;
mod launch;
mod limits;
mod logging;
mod signals;
mod systemd;
mod upgrade_socket;

use std::process::ExitCode;

use cli::Command;
use switchyard_admin::Token;
use switchyard_config::Config;

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args().skip(1)) {
        Ok(command) => command,
        Err(usage_error) => {
            eprintln!("switchyard: {usage_error}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => {
            println!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("switchyard {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(loaded) => {
                let token = loaded.admin.as_ref().and_then(|a| a.token_file.as_deref());
                if let Some(Err(problem)) = token.map(Token::read) {
                    eprintln!("{problem}");
                    return ExitCode::from(1);
                }
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(problems) => {
                eprintln!("{problems}");
                ExitCode::from(1)
            }
        },
        Command::Run { config, upgrade } => {
            init_logging();
            let loaded = match Config::load(&config) {
                Ok(loaded) => loaded,
                Err(problems) => {
                    eprintln!("{problems}");
                    return ExitCode::from(1);
                }
            };
            exit_on_error(launch::run(loaded, Some(config), upgrade, Vec::new()))
        }
        Command::Demo => {
            init_logging();
            exit_on_error(demo::run())
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
