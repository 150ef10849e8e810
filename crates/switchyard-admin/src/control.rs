//! What the admin API and SIGHUP share: config reload and the admin token.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwapOption;
use log::{info, warn};
use switchyard_access_log::AccessLog;
use switchyard_config::access_log::DEFAULT_BUFFER_LINES;
use switchyard_config::{Config, Listener, ListenerKind};
use switchyard_pool::{Draft, Pool, Source};
use switchyard_tls::TlsFronts;

/// The admin bearer token, compared in constant time.
pub struct Token(Vec<u8>);

impl Token {
    /// Reads a token file: surrounding whitespace is ignored; missing or empty is an error.
    pub fn read(path: &Path) -> Result<Token, String> {
        Token::read_text(path).map(|token| Token(token.into_bytes()))
    }

    /// The token text a file holds, as [`Token::read`] reads it: for a client (the `status`
    /// and `rollout` commands) that sends it rather than compares it.
    pub fn read_text(path: &Path) -> Result<String, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("admin.token_file: cannot read {}: {e}", path.display()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(format!("admin.token_file: {} is empty", path.display()));
        }
        Ok(token.to_string())
    }

    /// Whether `given` is this token; the time taken does not depend on where they differ.
    fn matches(&self, given: &[u8]) -> bool {
        let mut diff = self.0.len() ^ given.len();
        for (i, want) in self.0.iter().enumerate() {
            diff |= usize::from(want ^ given.get(i).copied().unwrap_or(0));
        }
        diff == 0
    }
}

/// The outcome of a successful reload.
#[derive(Debug, Default)]
pub struct ReloadReport {
    /// Settings that changed in the file but take a restart or upgrade to apply.
    pub needs_restart: Vec<String>,
    /// Runtime state dropped because it no longer fits the config.
    pub dropped_state: Vec<String>,
    /// Certificates now served that are expired, expire soon or are not valid yet.
    pub warnings: Vec<String>,
}

/// Why a reload ran nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadRefused {
    /// The instance runs an embedded config (the demo): there is no file to re-read. Not a
    /// failed reload: nothing is wrong with any config.
    NoConfigFile,
    /// The file has problems, one line each; the running config stays.
    Invalid(Vec<String>),
}

impl ReloadRefused {
    /// What `switchyard demo` answers to a reload.
    pub const NO_CONFIG_FILE: &'static str = "the demo has no config file to reload";
}

pub struct Control {
    pool: Arc<Pool>,
    /// `None` for the demo, which has no file to re-read.
    config_path: Option<PathBuf>,
    token: ArcSwapOption<Token>,
    /// The config at start: what sockets and threads were made from.
    started: Config,
    /// The certificates of the TLS listeners, re-read by every reload.
    tls: Arc<TlsFronts>,
    /// Its path and format follow a reload.
    access_log: Arc<AccessLog>,
    /// One reload at a time (SIGHUP and the API may ask at once): the TLS side is prepared
    /// before the pool reloads and committed after it, and two interleaved reloads could
    /// leave the certificates of one file beside the routes of the other.
    reloading: Mutex<()>,
}

impl Control {
    /// Reads the admin token the config names, if any.
    pub fn new(
        pool: Arc<Pool>,
        tls: Arc<TlsFronts>,
        access_log: Arc<AccessLog>,
        config_path: Option<PathBuf>,
    ) -> Result<Control, String> {
        let started = pool.config();
        let token = read_token(&started)?;
        Ok(Control {
            pool,
            config_path,
            token: ArcSwapOption::new(token.map(Arc::new)),
            started,
            tls,
            access_log,
            reloading: Mutex::new(()),
        })
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Whether `/api/` needs a token (`admin.token_file`).
    pub fn has_token(&self) -> bool {
        self.token.load().is_some()
    }

    /// Whether an `Authorization` header value lets a request into `/api/`.
    pub fn authorized(&self, authorization: Option<&[u8]>) -> bool {
        let token = self.token.load();
        let Some(token) = token.as_deref() else {
            return true;
        };
        // The scheme is case-insensitive (RFC 9110 11.1); the token is not.
        authorization
            .filter(|h| h.len() > 7 && h[..7].eq_ignore_ascii_case(b"bearer "))
            .is_some_and(|h| token.matches(h[7..].trim_ascii()))
    }

    /// Re-reads the config file and runs it; on `Err` nothing changed. Either way the
    /// outcome is recorded as an event (the pool records a reload it ran), and counted in
    /// the reload metric unless there is no file to reload.
    pub fn reload(&self) -> Result<ReloadReport, ReloadRefused> {
        let Some(path) = &self.config_path else {
            info!("reload asked for: {}", ReloadRefused::NO_CONFIG_FILE);
            return Err(ReloadRefused::NoConfigFile);
        };
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let result = self.try_reload(path);
        let metrics = self.pool.metrics();
        match &result {
            Ok(report) => {
                metrics.reload_succeeded();
                if !report.needs_restart.is_empty() {
                    warn!(
                        "config reloaded, but these need a restart or upgrade: {}",
                        report.needs_restart.join(", ")
                    );
                }
            }
            Err(problems) => {
                metrics.reload_failed();
                self.pool.events().record(
                    Draft::new(
                        Source::Reload,
                        "reload_refused",
                        format!(
                            "config reload refused, the running config stays: {}",
                            problems.join("; ")
                        ),
                    )
                    .warning(),
                );
            }
        }
        result.map_err(ReloadRefused::Invalid)
    }

    fn try_reload(&self, path: &Path) -> Result<ReloadReport, Vec<String>> {
        let config = Config::load(path).map_err(|problems| {
            problems
                .0
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        })?;
        let token = read_token(&config).map_err(|e| vec![e])?;
        if let Some(admin) = self.started.admin.as_ref() {
            if token.is_none() && !admin.address.ip().is_loopback() {
                return Err(vec![format!(
                    "admin.token_file: the admin API listens on {} (beyond loopback) until a restart; a reload cannot remove its token",
                    admin.address
                )]);
            }
        }
        // Every certificate and key is read and checked before anything changes: a bad file
        // refuses the reload like a config problem, and the old certificates stay.
        let tls = self.tls.prepare(&config)?;
        let access_log = self
            .access_log
            .prepare(config.access_log.as_ref())
            .map_err(|e| vec![e])?;
        let needs_restart = needs_restart(&self.started, &config);
        let upstream_cas = switchyard_pool::load_upstream_tls(&config)?;
        // The pool records the reload and each warning as events (and so logs them).
        let dropped_state = self.pool.reload(config, upstream_cas);
        self.token.store(token.map(Arc::new));
        let warnings = tls.commit();
        access_log.commit();
        for warning in &warnings {
            self.pool.events().record(
                Draft::new(Source::Reload, "certificate_warning", warning.clone()).warning(),
            );
        }
        Ok(ReloadReport {
            needs_restart,
            dropped_state,
            warnings,
        })
    }
}

fn read_token(config: &Config) -> Result<Option<Token>, String> {
    config
        .admin
        .as_ref()
        .and_then(|a| a.token_file.as_deref())
        .map(Token::read)
        .transpose()
}

/// Settings bound to sockets or threads at start: a reload reports them instead of pretending.
fn needs_restart(running: &Config, next: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut differs = |field: &str, changed: bool| {
        if changed {
            out.push(format!(
                "{field}: changed in the file; needs restart or upgrade"
            ));
        }
    };
    differs(
        "listeners",
        !running
            .listeners
            .iter()
            .map(bound_at_start)
            .eq(next.listeners.iter().map(bound_at_start)),
    );
    differs(
        "admin.address",
        running.admin.as_ref().map(|a| a.address) != next.admin.as_ref().map(|a| a.address),
    );
    differs("metrics", running.metrics != next.metrics);
    differs(
        "server.threads",
        running.server.threads != next.server.threads,
    );
    differs(
        "server.upgrade_socket",
        running.server.upgrade_socket != next.server.upgrade_socket,
    );
    differs(
        "server.pid_file",
        running.server.pid_file != next.server.pid_file,
    );
    differs(
        "server.grace_period",
        running.server.grace_period != next.server.grace_period,
    );
    let (was, now) = (&running.server.clients, &next.server.clients);
    differs(
        "server.keepalive_timeout",
        was.keepalive_timeout != now.keepalive_timeout,
    );
    differs(
        "server.header_timeout",
        was.header_timeout != now.header_timeout,
    );
    differs(
        "server.max_request_header_bytes",
        was.max_request_header_bytes != now.max_request_header_bytes,
    );
    differs(
        "server.max_connections",
        was.max_connections != now.max_connections,
    );
    differs("server.body_timeout", was.body_timeout != now.body_timeout);
    // The channel between requests and the writer is sized once, at start.
    let buffer_lines = |c: &Config| {
        c.access_log
            .as_ref()
            .map_or(DEFAULT_BUFFER_LINES, |a| a.buffer_lines)
    };
    differs(
        "access_log.buffer_lines",
        buffer_lines(running) != buffer_lines(next),
    );
    differs("server.send_timeout", was.send_timeout != now.send_timeout);
    differs(
        "server.max_request_body_bytes",
        was.max_request_body_bytes != now.max_request_body_bytes,
    );
    differs("state_file", running.state_file != next.state_file);
    // The store's connection, lease and name are made once, at start.
    differs("state_store", running.state_store != next.state_store);
    out
}

/// What of a listener is fixed when its socket and service are made: its address, plain or
/// TLS, and a plain one's h2c and redirect. A TLS listener's certificates, versions, ALPN,
/// tickets and HSTS are in the `ServerConfig` a reload swaps, so they are left out.
fn bound_at_start(listener: &Listener) -> (std::net::SocketAddr, Option<(bool, bool)>) {
    let plain = match listener.kind {
        ListenerKind::Plain {
            h2c,
            redirect_https,
        } => Some((h2c, redirect_https)),
        ListenerKind::Tls(_) => None,
    };
    (listener.address, plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_listeners(listeners: &str) -> Config {
        let yaml = format!(
            "listeners:\n{listeners}upstreams:\n  a:\n    backends:\n      - address: 127.0.0.1:9001\n\
             routes:\n  - name: r\n    path_prefix: /\n    split: {{a: 100}}\n"
        );
        match Config::from_yaml(&yaml) {
            Ok(config) => config,
            Err(problems) => panic!("{problems}\n{yaml}"),
        }
    }

    #[test]
    fn tls_settings_reload_and_listener_shapes_need_a_restart() {
        // A TLS listener on 8443: `listener` and `tls` are extra lines at those levels.
        let tls = |listener: &str, tls: &str| {
            format!(
                "  - address: 127.0.0.1:8443\n{listener}    tls:\n{tls}      certificates:\n        - {{cert: /a.crt, key: /a.key}}\n"
            )
        };
        let plain = "  - address: 127.0.0.1:8080\n";
        let running = with_listeners(&format!("{}{plain}", tls("", "")));
        let reloadable = with_listeners(&format!(
            "{}        - {{cert: /b.crt, key: /b.key}}\n{plain}",
            tls(
                "    http2: false\n",
                "      min_version: \"1.3\"\n      session_tickets: false\n      hsts: {max_age: 1h}\n"
            )
        ));
        assert_ne!(running.listeners, reloadable.listeners);
        assert!(needs_restart(&running, &reloadable).is_empty());
        let restart = ["listeners: changed in the file; needs restart or upgrade"];
        for changed in [
            format!(
                "{}  - address: 127.0.0.1:8080\n    h2c: true\n",
                tls("", "")
            ),
            format!(
                "{}  - address: 127.0.0.1:8080\n    redirect_https: true\n",
                tls("", "")
            ),
            format!("{}  - address: 127.0.0.1:8081\n", tls("", "")),
            tls("", ""),
            format!("  - address: 127.0.0.1:8443\n{plain}"),
        ] {
            assert_eq!(
                needs_restart(&running, &with_listeners(&changed)),
                restart,
                "{changed}"
            );
        }
    }

    #[test]
    fn tokens_match_exactly() {
        let token = Token(b"s3cret".to_vec());
        assert!(token.matches(b"s3cret"));
        for wrong in [&b"s3cre"[..], b"s3cret!", b"S3cret", b""] {
            assert!(!token.matches(wrong));
        }
    }
}
