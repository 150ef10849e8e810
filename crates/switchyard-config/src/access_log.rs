//! `access_log`: where the one line per request goes and in which format. The writer itself
//! is `switchyard-access-log`; this module only parses and checks the settings, so that
//! `check`, start and reload agree on what a valid access log is.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Problem;

/// Lines the request path may hand over before the writer has written them: beyond this, a
/// line is dropped and counted instead of delaying a request. At ~300 bytes a line, 16 384
/// hold about 5 MB, over half a second at 30 000 requests/s.
pub const DEFAULT_BUFFER_LINES: usize = 16_384;
/// A bound on what a typo can make the process hold.
pub const MAX_BUFFER_LINES: usize = 1_048_576;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLog {
    pub target: LogTarget,
    pub format: LogFormat,
    /// Capacity of the channel between the request path and the writer, in lines.
    pub buffer_lines: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// The process's standard output (a container's or the journal's log).
    Stdout,
    /// A file, appended to; SIGUSR1 reopens it (after logrotate has moved it).
    File(PathBuf),
}

impl LogTarget {
    /// As the config spells it.
    pub fn display(&self) -> String {
        match self {
            LogTarget::Stdout => "stdout".into(),
            LogTarget::File(path) => path.display().to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// nginx's and Apache's `combined`, which every log tool reads.
    Combined,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Json => "json",
            LogFormat::Combined => "combined",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAccessLog {
    path: Option<PathBuf>,
    format: Option<LogFormat>,
    buffer_lines: Option<usize>,
}

pub(crate) fn access_log(raw: RawAccessLog, problems: &mut Vec<Problem>) -> Option<AccessLog> {
    let mut problem = |field: &str, message: String| {
        problems.push(Problem {
            path: format!("access_log.{field}"),
            message,
        })
    };
    let buffer_lines = raw.buffer_lines.unwrap_or(DEFAULT_BUFFER_LINES);
    if !(1..=MAX_BUFFER_LINES).contains(&buffer_lines) {
        problem(
            "buffer_lines",
            format!("{buffer_lines} is out of range: must be 1..={MAX_BUFFER_LINES}"),
        );
    }
    let Some(path) = raw.path else {
        problem(
            "path",
            "missing: give a file (e.g. /var/log/switchyard/access.log) or \"stdout\"".into(),
        );
        return None;
    };
    let target = if path == Path::new("stdout") {
        LogTarget::Stdout
    } else if !path.is_absolute() {
        problem(
            "path",
            format!(
                "{} is relative: give an absolute path (the process may run from any directory), or \"stdout\"",
                path.display()
            ),
        );
        return None;
    } else {
        LogTarget::File(path)
    };
    Some(AccessLog {
        target,
        format: raw.format.unwrap_or_default(),
        buffer_lines,
    })
}

#[cfg(test)]
mod tests {
    use crate::{AccessLog, Config, LogFormat, LogTarget};

    fn config(access_log: &str) -> Result<Config, String> {
        let yaml = format!(
            "listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  a:\n    backends:\n      - address: 127.0.0.1:9001\nroutes:\n  - name: web\n    split: {{a: 1}}\n{access_log}"
        );
        Config::from_yaml(&yaml).map_err(|p| p.to_string())
    }

    #[test]
    fn defaults_are_json_and_a_bounded_buffer() {
        let c = config("access_log:\n  path: /var/log/switchyard/access.log\n").expect("valid");
        assert_eq!(
            c.access_log,
            Some(AccessLog {
                target: LogTarget::File("/var/log/switchyard/access.log".into()),
                format: LogFormat::Json,
                buffer_lines: super::DEFAULT_BUFFER_LINES,
            })
        );
        let c = config("access_log: {path: stdout, format: combined}\n").expect("valid");
        let log = c.access_log.expect("access log");
        assert_eq!(
            (log.target, log.format),
            (LogTarget::Stdout, LogFormat::Combined)
        );
        assert_eq!(config("").expect("valid").access_log, None);
    }

    #[test]
    fn problems_name_the_field() {
        let e = config("access_log: {path: logs/access.log, buffer_lines: 0}\n").unwrap_err();
        assert!(
            e.contains("access_log.path: logs/access.log is relative"),
            "{e}"
        );
        assert!(
            e.contains("access_log.buffer_lines: 0 is out of range: must be 1..=1048576"),
            "{e}"
        );
        let e = config("access_log: {format: json}\n").unwrap_err();
        assert!(e.contains("access_log.path: missing"), "{e}");
        let e = config("access_log: {path: stdout, format: clf}\n").unwrap_err();
        assert!(e.contains("access_log.format"), "{e}");
    }
}
