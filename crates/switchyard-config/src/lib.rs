//! Switchyard's configuration: the YAML file format, its defaults, and its validation.
//!
//! A config is read in two steps. [`raw`] mirrors the YAML exactly (serde with
//! `deny_unknown_fields`), so type errors name the field and the line. [`validate`] then turns
//! the raw file into the typed [`Config`] of this module, collecting every semantic problem with
//! its field path instead of stopping at the first. Nothing here knows about Pingora.

pub mod access_log;
mod document;
mod duration;
pub mod limits;
pub mod matching;
mod raw;
pub mod rollout;
pub mod state_store;
pub mod tls;
mod validate;
mod yaml_errors;

use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use access_log::{AccessLog, LogFormat, LogTarget};
pub use duration::{format_duration, parse_duration};
pub use matching::{RequestKey, RouteMatch, Sticky, ValueMatch};
pub use raw::{Algorithm, HealthCheckType};
pub use state_store::{EtcdConfig, EtcdTls, StateStoreConfig};
pub use tls::{
    CertificateFiles, Hsts, ListenerKind, ListenerTls, TlsVersion, UpstreamProtocol, UpstreamTls,
};
pub(crate) use yaml_errors::yaml_problem;
pub use yaml_errors::NOT_CHECKED_FURTHER;

/// A validated configuration: every address parsed, every reference resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: Server,
    pub listeners: Vec<Listener>,
    pub admin: Option<Admin>,
    pub metrics: Option<Metrics>,
    pub state_file: Option<PathBuf>,
    /// The store shared with other instances; `None`: the state file (or memory) alone.
    pub state_store: Option<StateStoreConfig>,
    /// One line per request, off the request path; `None`: no access log.
    pub access_log: Option<AccessLog>,
    /// Sorted by name.
    pub upstreams: Vec<Upstream>,
    /// In file order: the first match wins.
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub threads: usize,
    pub grace_period: Duration,
    pub upgrade_socket: PathBuf,
    /// Written by `run` once it serves (and by the new process of a binary upgrade), removed
    /// at exit; what `deploy/upgrade.sh` reads when it is given no PID.
    pub pid_file: Option<PathBuf>,
    pub debug_headers: bool,
    pub clients: ClientLimits,
}

/// What one client connection may hold and for how long (the contract's "Client connection
/// limits"): the bounds that keep slow, idle and oversized clients from holding the process's
/// memory and file descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// An idle keep-alive connection is closed after this, before and between requests.
    pub keepalive_timeout: Duration,
    /// A request head must be complete this long after its first byte (a new connection: after
    /// it was accepted).
    pub header_timeout: Duration,
    /// A bigger request head is answered `431` (`414` when the request line alone is over it).
    pub max_request_header_bytes: usize,
    /// Client connections open at once, over all proxy listeners of the process.
    pub max_connections: usize,
    /// A request body that sends nothing for this long: `408` and close.
    pub body_timeout: Duration,
    /// A client that takes nothing of the response for this long is closed.
    pub send_timeout: Duration,
    /// Bigger request bodies are answered `413`; `None`: no limit.
    pub max_request_body_bytes: Option<u64>,
}

impl ClientLimits {
    /// The contract's defaults.
    pub const DEFAULT: ClientLimits = ClientLimits {
        keepalive_timeout: Duration::from_secs(60),
        header_timeout: Duration::from_secs(10),
        max_request_header_bytes: 65_536,
        max_connections: 10_000,
        body_timeout: Duration::from_secs(60),
        send_timeout: Duration::from_secs(60),
        max_request_body_bytes: None,
    };
}

/// Smallest `max_request_header_bytes`: a request line and a few ordinary headers.
pub const MIN_REQUEST_HEADER_BYTES: usize = 1024;
/// Largest `max_request_header_bytes`: Pingora's own fixed limit on a request head.
pub const MAX_REQUEST_HEADER_BYTES: usize = 1024 * 1024;
/// Largest `max_connections` of one process (two descriptors each, and the kernel's usual
/// `nr_open` ceiling of 1 048 576 descriptors).
pub const MAX_CLIENT_CONNECTIONS: usize = 500_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub address: SocketAddr,
    pub kind: ListenerKind,
}

impl Listener {
    pub fn tls(&self) -> Option<&ListenerTls> {
        match &self.kind {
            ListenerKind::Tls(tls) => Some(tls),
            ListenerKind::Plain { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub address: SocketAddr,
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    pub address: SocketAddr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    pub algorithm: Algorithm,
    pub backends: Vec<Backend>,
    pub health_check: Option<HealthCheck>,
    pub timeouts: Timeouts,
    pub passive: PassiveCheck,
    /// A backend that becomes healthy or is added ramps its weight from ~0 to full over this
    /// time (weighted algorithms only). `None`: full weight at once.
    pub slow_start: Option<Duration>,
    /// `hash`: the request key hashed onto the ring; a request without it hashes its client
    /// IP instead, as `ip_hash` does.
    pub hash_on: Option<RequestKey>,
    /// `ip_hash` and `hash`: how long a backend set to `retiring` keeps the users it has when
    /// the admin change names no timeout, and how recently a user must have been seen on a
    /// backend to count as one of them (see docs/configuration.md, "Retiring a backend").
    pub retire_timeout: Duration,
    /// What the backends speak; `h2` needs `tls`.
    pub protocol: UpstreamProtocol,
    pub tls: Option<UpstreamTls>,
}

/// Passive failure detection: taking out a backend that keeps refusing connections between
/// two active checks (or when there are none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveCheck {
    /// Consecutive failed connects that take a backend out; 0 turns passive detection off.
    pub max_connect_failures: u32,
    /// Without an active health check: how long a backend stays out before it is tried again.
    /// With one, the check brings it back.
    pub cooldown: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    pub address: SocketAddr,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

/// What a health check sends and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Tcp,
    Http {
        path: String,
        expect_status: u16,
        /// `Host` header of the probe; `None` sends the backend's address.
        host: Option<String>,
    },
}

/// Per-upstream timeouts towards backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing a TCP connection to a backend.
    pub connect: Duration,
    /// Waiting for the next byte from a backend once the request is sent.
    pub read: Duration,
    /// Waiting for a backend to accept the next bytes of a request.
    pub write: Duration,
    /// How long an unused keep-alive connection to a backend is kept for reuse.
    pub idle: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    /// Lower-cased, without a port.
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    /// Conditions beyond host and path; empty: none.
    pub matching: RouteMatch,
    /// Sorted by upstream name.
    pub split: Vec<SplitWeight>,
    /// `None`: each request follows the smooth split.
    pub sticky: Option<Sticky>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitWeight {
    pub upstream: String,
    pub weight: u32,
}

/// Largest backend weight the contract allows.
pub const MAX_BACKEND_WEIGHT: u32 = 1000;
/// Largest route split weight the contract allows.
pub const MAX_SPLIT_WEIGHT: u32 = 10_000;

/// Longest `retire_timeout`, in the file and the admin API: a week outlasts any session a
/// backend keeps for its users, and keeps every deadline a time the state file can hold.
pub const MAX_RETIRE_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why `timeout` cannot be a `retire_timeout`, if it cannot.
pub fn retire_timeout_problem(timeout: Duration) -> Option<String> {
    if timeout.is_zero() {
        Some("must be longer than 0s".into())
    } else if timeout > MAX_RETIRE_TIMEOUT {
        Some(format!(
            "{} is longer than the limit of {} (7 days)",
            format_duration(timeout),
            format_duration(MAX_RETIRE_TIMEOUT)
        ))
    } else {
        None
    }
}

/// One thing wrong with a config, about one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where in the file, e.g. `upstreams.green.backends[1].address`; empty for the whole file.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a config, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

impl Problems {
    fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        Problems(vec![Problem {
            path: path.into(),
            message: message.into(),
        }])
    }
}

impl Config {
    /// Parses and validates YAML text.
    pub fn from_yaml(text: &str) -> Result<Config, Problems> {
        if text.len() > limits::MAX_CONFIG_BYTES {
            return Err(Problems::one("", too_big(text.len())));
        }
        limits::check_expanded_size(text)?;
        let raw: raw::File = serde_yaml::from_str(text).map_err(yaml_problem)?;
        validate::validate(raw)
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, Problems> {
        let cannot =
            |e: std::io::Error| Problems::one("", format!("cannot read {}: {e}", path.display()));
        // One byte past the limit is enough to refuse, whatever the file (or device) holds.
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| {
                f.take(limits::MAX_CONFIG_BYTES as u64 + 1)
                    .read_to_end(&mut bytes)
            })
            .map_err(cannot)?;
        // The size first: a cut at the limit may fall inside a multi-byte character.
        if bytes.len() > limits::MAX_CONFIG_BYTES {
            return Err(Problems::one("", too_big(bytes.len())));
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            Problems::one(
                "",
                format!("cannot read {}: not UTF-8 text ({e})", path.display()),
            )
        })?;
        Config::from_yaml(&text)
    }

    pub fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

fn too_big(bytes: usize) -> String {
    format!(
        "the config file has {bytes} bytes or more, over the limit of {} (see docs/configuration.md, \"Limits\")",
        limits::MAX_CONFIG_BYTES
    )
}

#[cfg(test)]
mod tests;
