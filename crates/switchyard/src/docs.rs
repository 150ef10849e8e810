//! `switchyard completions SHELL` and `switchyard man`: written by clap_complete and
//! clap_mangen from the same declaration as the parser, so they never fall behind it.

use std::io::Write;

use clap::CommandFactory;

use crate::cli::{Cli, Shell};

/// The completion script for `shell`.
pub fn completions(shell: Shell) -> Vec<u8> {
    let mut command = Cli::command();
    let mut out = Vec::new();
    let generator = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(generator, &mut command, "switchyard", &mut out);
    out
}

/// The man page, roff: the commands, their options, exit codes.
pub fn man() -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut out)
        .map_err(|e| format!("cannot write the man page: {e}"))?;
    Ok(out)
}

/// Writes `bytes` to stdout; a closed pipe (`| head`) is no error worth a message.
pub fn print(bytes: &[u8]) -> Result<(), String> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(format!("cannot write to stdout: {e}"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMANDS: [&str; 12] = [
        "run", "check", "demo", "status", "rollout", "split", "backend", "upstream", "reload",
        "events", "state", "config",
    ];

    #[test]
    fn every_shell_completes_every_command() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = String::from_utf8(completions(shell)).expect("text");
            for command in COMMANDS {
                assert!(script.contains(command), "{shell:?}: {command}");
            }
            // Fish spells a long option `-l config`, the others `--config`.
            assert!(
                script.contains("--config") || script.contains("-l config"),
                "{shell:?}"
            );
        }
    }

    #[test]
    fn the_man_page_names_every_command() {
        let page = String::from_utf8(man().expect("man page")).expect("text");
        assert!(page.starts_with(".ie"), "{}", &page[..page.len().min(200)]);
        assert!(page.contains(".TH switchyard 1"), "{page}");
        for command in COMMANDS {
            assert!(page.contains(command), "{command}");
        }
    }
}
