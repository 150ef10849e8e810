//! The process's logger: env_logger (`RUST_LOG`), with what clients send kept out of it.
//!
//! Pingora logs a malformed request head with its raw bytes (`buf: ...`, at ERROR on the admin
//! port, at debug on the proxy port), and the parsed head at trace; a bearer token or a session
//! cookie would land in the log with it. We cannot change Pingora's log lines, so every line
//! from a Pingora module passes through [`scrub`] on its way out: the raw head is cut, and a
//! line that still names a credential header is withheld whole. Our own lines never carry a
//! head.

use std::sync::atomic::{AtomicBool, Ordering};

use log::{Log, Metadata, Record};

/// Without `RUST_LOG`: our lines at `info`, Pingora's from `warn` (its start-up lines at
/// `info` say what ours say, at length), rustls's at `error` only: rustls warns once per
/// handshake about what a client did wrong (an IP address as SNI, an alert it sent), which
/// any client could turn into a flood of log lines. `RUST_LOG=info,pingora=info` brings
/// Pingora's lines back.
const DEFAULT_FILTER: &str = "info,pingora=warn,rustls=error";

/// Where Pingora waits for the sockets of an upgrade, saying `No incoming socket transfer` at
/// ERROR once a second until the old process sends them: the normal course of every upgrade.
const FD_TRANSFER: &str = "pingora_core::server::transfer_fd";

pub fn init() {
    let logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(DEFAULT_FILTER))
            .build();
    let max_level = logger.filter();
    if log::set_boxed_logger(Box::new(Scrubbed {
        logger,
        said_waiting: AtomicBool::new(false),
    }))
    .is_ok()
    {
        log::set_max_level(max_level);
    }
}

struct Scrubbed {
    logger: env_logger::Logger,
    /// The upgrade's wait for the sockets has been said.
    said_waiting: AtomicBool,
}

impl Log for Scrubbed {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.logger.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if record.target() == FD_TRANSFER {
            let text = record.args().to_string();
            if text.starts_with("No incoming socket transfer") {
                // Said once; Pingora asks again every second.
                let level = if self.said_waiting.swap(true, Ordering::Relaxed) {
                    log::Level::Debug
                } else {
                    log::Level::Info
                };
                let waiting = Record::builder()
                    .args(format_args!(
                        "upgrade: waiting for the running process to hand its listening sockets over (send it SIGQUIT)"
                    ))
                    .level(level)
                    .target("switchyard::upgrade")
                    .build();
                if self.logger.matches(&waiting) {
                    self.logger.log(&waiting);
                }
                return;
            }
        }
        if !self.logger.matches(record) {
            return;
        }
        if !record.target().starts_with("pingora") {
            return self.logger.log(record);
        }
        let text = record.args().to_string();
        if is_backstop_grace_line(&text) {
            return;
        }
        match scrub(&text) {
            None => self.logger.log(record),
            Some(clean) => self.logger.log(
                &Record::builder()
                    .args(format_args!("{clean}"))
                    .level(record.level())
                    .target(record.target())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
        }
    }

    fn flush(&self) {
        self.logger.flush()
    }
}

/// Pingora's `Graceful shutdown: grace period 31s starts`: its grace period is a backstop one
/// second past `server.grace_period` (see `launch`), and the operator would read it as the
/// configured one. Our drain says the configured one when it starts.
fn is_backstop_grace_line(text: &str) -> bool {
    text.starts_with("Graceful shutdown: grace period ") && text.ends_with(" starts")
}

/// Headers whose values are credentials.
const SECRET_HEADERS: [&str; 4] = [
    "authorization",
    "cookie",
    "proxy-authorization",
    "x-api-key",
];

/// The line with client bytes removed, or `None` when it carries none.
fn scrub(text: &str) -> Option<String> {
    let cut = match text.find("buf: ") {
        Some(at) => format!(
            "{}buf: <{} bytes of request head withheld>",
            &text[..at],
            text.len() - at - 5
        ),
        None => text.to_string(),
    };
    let lower = cut.to_ascii_lowercase();
    if SECRET_HEADERS.iter().any(|h| lower.contains(h)) {
        return Some("<a log line that carried request headers was withheld>".to_string());
    }
    (cut.len() != text.len()).then_some(cut)
}

#[cfg(test)]
mod tests {
    use super::{is_backstop_grace_line, scrub};

    #[test]
    fn pingoras_backstop_grace_period_is_not_logged() {
        assert!(is_backstop_grace_line(
            "Graceful shutdown: grace period 31s starts"
        ));
        assert!(!is_backstop_grace_line(
            "Graceful shutdown: grace period ends"
        ));
    }

    #[test]
    fn raw_heads_and_credentials_never_pass() {
        let line = "HTTP server fails to read from downstream:  InvalidHTTPHeader context: buf: GET / HTTP/1.1\\r\\nAuthorization: Bearer s3cret\\r\\n\\x00 cause: invalid token";
        let clean = scrub(line).expect("scrubbed");
        assert!(!clean.contains("s3cret"), "{clean}");
        assert!(
            clean.starts_with("HTTP server fails to read from downstream:"),
            "{clean}"
        );
        let trace = r#"Request header: RequestHeader { headers: {"cookie": "session=abc"} }"#;
        assert!(!scrub(trace).expect("withheld").contains("abc"));
        assert_eq!(scrub("Fail to proxy: ConnectRefused"), None);
    }
}
