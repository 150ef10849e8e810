//! Turns the raw file into a [`Config`]: applies defaults, parses addresses, resolves
//! references, and reports every problem with its field path.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::limits::{
    backend_address_problem, MAX_BACKENDS, MAX_BACKENDS_PER_UPSTREAM, MAX_ROUTES,
    MAX_ROUTE_BACKEND_PAIRS, MAX_ROUTE_UPSTREAM_PAIRS, MAX_UPSTREAMS,
};
use crate::matching;
use crate::raw::{self, Algorithm, HealthCheckType};
use crate::tls;
use crate::{
    format_duration, retire_timeout_problem, Admin, Backend, ClientLimits, Config, HealthCheck,
    Listener, Metrics, PassiveCheck, Probe, Problem, Problems, Route, Server, SplitWeight,
    Timeouts, Upstream, MAX_BACKEND_WEIGHT, MAX_CLIENT_CONNECTIONS, MAX_REQUEST_HEADER_BYTES,
    MAX_SPLIT_WEIGHT, MIN_REQUEST_HEADER_BYTES,
};

const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);
const DEFAULT_UPGRADE_SOCKET: &str = "/run/switchyard/upgrade.sock";
const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_RISE: u32 = 2;
const DEFAULT_MAX_CONNECT_FAILURES: u32 = 3;
const DEFAULT_FAILURE_COOLDOWN: Duration = Duration::from_secs(10);
/// nginx Plus's `sticky learn` keeps a session for as long as it is idle less than its
/// timeout; ten minutes covers a user between two clicks without holding a backend for long.
const DEFAULT_RETIRE_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_FALL: u32 = 3;
const DEFAULT_TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(5),
    read: Duration::from_secs(60),
    write: Duration::from_secs(60),
    idle: Duration::from_secs(60),
};

/// Collects problems while the typed config is built; a field with a problem is left out.
#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn address(&mut self, path: &str, text: &str) -> Option<SocketAddr> {
        match text.trim().parse::<SocketAddr>() {
            Ok(addr) if addr.port() == 0 => {
                self.problem(path, format!("{text:?} has port 0; give a real port"));
                None
            }
            Ok(addr) => Some(addr),
            Err(_) => {
                self.problem(
                    path,
                    format!(
                        "{text:?} is not a valid address: expected IP:port, e.g. 127.0.0.1:9001"
                    ),
                );
                None
            }
        }
    }

    /// A count beyond one of the [`crate::limits`].
    fn at_most(&mut self, path: &str, what: &str, count: usize, limit: usize) {
        if count > limit {
            self.problem(
                path,
                format!("{count} {what}, over the limit of {limit} (see docs/configuration.md, \"Limits\")"),
            );
        }
    }

    fn name(&mut self, path: &str, what: &str, name: &str) {
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !valid {
            self.problem(
                path,
                format!("{what} name {name:?} must be non-empty and use only letters, digits, '_', '.' and '-'"),
            );
        }
    }

    fn nonzero(&mut self, path: &str, value: Duration) -> Duration {
        if value.is_zero() {
            self.problem(path, "must be longer than 0s");
        }
        value
    }
}

pub fn validate(file: raw::File) -> Result<Config, Problems> {
    let mut c = Checker::default();
    let server = server(&mut c, file.server);
    let listeners = listeners(&mut c, file.listeners.unwrap_or_default());
    let admin = file.admin.and_then(|a| admin(&mut c, a));
    let metrics = file
        .metrics
        .and_then(|m| c.address("metrics.address", &m.address))
        .map(|address| Metrics { address });
    sockets_distinct(&mut c, &listeners, admin.as_ref(), metrics.as_ref());
    let access_log = file
        .access_log
        .and_then(|raw| crate::access_log::access_log(raw, &mut c.problems));
    let state_store = file
        .state_store
        .and_then(|raw| crate::state_store::state_store(raw, &mut c.problems));
    let upstreams = upstreams(&mut c, file.upstreams.map(|m| m.0).unwrap_or_default());
    let routes = routes(&mut c, file.routes.unwrap_or_default(), &upstreams);
    if c.problems.is_empty() {
        Ok(Config {
            server,
            listeners,
            admin,
            metrics,
            state_file: file.state_file,
            state_store,
            access_log,
            upstreams,
            routes,
        })
    } else {
        Err(Problems(c.problems))
    }
}

fn server(c: &mut Checker, raw: raw::Server) -> Server {
    let threads = raw.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if threads == 0 {
        c.problem("server.threads", "must be at least 1");
    }
    let clients = client_limits(c, &raw);
    Server {
        threads,
        grace_period: raw
            .grace_period
            .map(|d| d.0)
            .unwrap_or(DEFAULT_GRACE_PERIOD),
        upgrade_socket: raw
            .upgrade_socket
            .unwrap_or_else(|| PathBuf::from(DEFAULT_UPGRADE_SOCKET)),
        pid_file: raw.pid_file.filter(|p| pid_file(c, p)),
        debug_headers: raw.debug_headers.unwrap_or(false),
        clients,
    }
}

/// Whether `path` can be a pid file: written by a service started from `/` and read by scripts
/// from anywhere, so only an absolute path to a file means the same file to all of them.
fn pid_file(c: &mut Checker, path: &std::path::Path) -> bool {
    let text = path.display().to_string();
    let problem = if text.is_empty() {
        Some("must not be empty".to_string())
    } else if !path.is_absolute() {
        Some(format!(
            "{text:?} is relative; give an absolute path, e.g. /run/switchyard/switchyard.pid"
        ))
    } else if text.ends_with('/') || path.file_name().is_none() {
        Some(format!(
            "{text:?} names a directory; give the file's path, e.g. /run/switchyard/switchyard.pid"
        ))
    } else {
        None
    };
    match problem {
        Some(why) => {
            c.problem("server.pid_file", why);
            false
        }
        None => true,
    }
}

fn client_limits(c: &mut Checker, raw: &raw::Server) -> ClientLimits {
    let d = ClientLimits::DEFAULT;
    let mut duration = |field: &str, value: Option<&crate::duration::YamlDuration>, default| {
        value.map_or(default, |v| c.nonzero(&format!("server.{field}"), v.0))
    };
    let keepalive_timeout = duration(
        "keepalive_timeout",
        raw.keepalive_timeout.as_ref(),
        d.keepalive_timeout,
    );
    let header_timeout = duration(
        "header_timeout",
        raw.header_timeout.as_ref(),
        d.header_timeout,
    );
    let body_timeout = duration("body_timeout", raw.body_timeout.as_ref(), d.body_timeout);
    let send_timeout = duration("send_timeout", raw.send_timeout.as_ref(), d.send_timeout);
    let max_request_header_bytes = raw
        .max_request_header_bytes
        .unwrap_or(d.max_request_header_bytes);
    if !(MIN_REQUEST_HEADER_BYTES..=MAX_REQUEST_HEADER_BYTES).contains(&max_request_header_bytes) {
        c.problem(
            "server.max_request_header_bytes",
            format!("{max_request_header_bytes} is out of range: must be {MIN_REQUEST_HEADER_BYTES}..={MAX_REQUEST_HEADER_BYTES}"),
        );
    }
    let max_connections = raw.max_connections.unwrap_or(d.max_connections);
    if !(1..=MAX_CLIENT_CONNECTIONS).contains(&max_connections) {
        c.problem(
            "server.max_connections",
            format!("{max_connections} is out of range: must be 1..={MAX_CLIENT_CONNECTIONS}"),
        );
    }
    ClientLimits {
        keepalive_timeout,
        header_timeout,
        max_request_header_bytes,
        max_connections,
        body_timeout,
        send_timeout,
        max_request_body_bytes: raw.max_request_body_bytes.filter(|&n| n > 0),
    }
}

fn listeners(c: &mut Checker, raw: Vec<tls::RawListener>) -> Vec<Listener> {
    if raw.is_empty() {
        c.problem("listeners", "at least one listener is required");
    }
    raw.iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let path = format!("listeners[{i}]");
            let address = c.address(&format!("{path}.address"), &l.address);
            let kind = tls::listener_kind(l, &path, &mut c.problems);
            Some(Listener {
                address: address?,
                kind: kind?,
            })
        })
        .collect()
}

fn admin(c: &mut Checker, raw: raw::Admin) -> Option<Admin> {
    let address = c.address("admin.address", &raw.address)?;
    if raw.token_file.is_none() && !address.ip().is_loopback() {
        c.problem(
            "admin.address",
            format!("{address} is not a loopback address; set admin.token_file to expose the admin API beyond this machine"),
        );
    }
    Some(Admin {
        address,
        token_file: raw.token_file,
    })
}

fn sockets_distinct(
    c: &mut Checker,
    listeners: &[Listener],
    admin: Option<&Admin>,
    metrics: Option<&Metrics>,
) {
    let mut seen: HashMap<SocketAddr, String> = HashMap::new();
    let all = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("listeners[{i}].address"), l.address))
        .chain(admin.map(|a| ("admin.address".to_string(), a.address)))
        .chain(metrics.map(|m| ("metrics.address".to_string(), m.address)));
    for (path, addr) in all {
        if let Some(first) = seen.get(&addr) {
            c.problem(path, format!("{addr} is already used by {first}"));
        } else {
            seen.insert(addr, path);
        }
    }
}

fn upstreams(c: &mut Checker, raw: BTreeMap<String, raw::Upstream>) -> Vec<Upstream> {
    if raw.is_empty() {
        c.problem("upstreams", "at least one upstream is required");
    }
    c.at_most("upstreams", "upstreams", raw.len(), MAX_UPSTREAMS);
    let backends = raw
        .values()
        .map(|u| u.backends.as_ref().map_or(0, Vec::len))
        .sum();
    c.at_most(
        "upstreams",
        "backends in all upstreams",
        backends,
        MAX_BACKENDS,
    );
    raw.into_iter()
        .map(|(name, u)| upstream(c, name, u))
        .collect()
}

fn upstream(c: &mut Checker, name: String, raw: raw::Upstream) -> Upstream {
    let path = format!("upstreams.{name}");
    c.name(&path, "upstream", &name);
    let backends = backends(c, &path, raw.backends.unwrap_or_default());
    let health_check = raw
        .health_check
        .map(|h| health_check(c, &format!("{path}.health_check"), h));
    let t = raw.timeouts;
    let tp = format!("{path}.timeouts");
    let timeouts = Timeouts {
        connect: c.nonzero(
            &format!("{tp}.connect"),
            t.connect.map(|d| d.0).unwrap_or(DEFAULT_TIMEOUTS.connect),
        ),
        read: c.nonzero(
            &format!("{tp}.read"),
            t.read.map(|d| d.0).unwrap_or(DEFAULT_TIMEOUTS.read),
        ),
        write: c.nonzero(
            &format!("{tp}.write"),
            t.write.map(|d| d.0).unwrap_or(DEFAULT_TIMEOUTS.write),
        ),
        idle: c.nonzero(
            &format!("{tp}.idle"),
            t.idle.map(|d| d.0).unwrap_or(DEFAULT_TIMEOUTS.idle),
        ),
    };
    let passive = PassiveCheck {
        max_connect_failures: raw
            .max_connect_failures
            .unwrap_or(DEFAULT_MAX_CONNECT_FAILURES),
        cooldown: c.nonzero(
            &format!("{path}.failure_cooldown"),
            raw.failure_cooldown
                .map(|d| d.0)
                .unwrap_or(DEFAULT_FAILURE_COOLDOWN),
        ),
    };
    let slow_start = raw.slow_start.map(|d| d.0).filter(|d| !d.is_zero());
    if slow_start.is_some()
        && matches!(
            raw.algorithm,
            Algorithm::RoundRobin | Algorithm::IpHash | Algorithm::Hash
        )
    {
        c.problem(
            format!("{path}.slow_start"),
            format!(
                "only applies to weighted_round_robin and least_connections, not {}",
                raw.algorithm.as_str()
            ),
        );
    }
    let hash_on = match (raw.algorithm, raw.hash_on) {
        (Algorithm::Hash, Some(key)) => {
            matching::request_key(key, &format!("{path}.hash_on"), &mut c.problems)
        }
        (Algorithm::Hash, None) => {
            c.problem(
                format!("{path}.hash_on"),
                "is required with algorithm hash: {header: NAME}, {cookie: NAME} or {client_ip: true}",
            );
            None
        }
        (other, Some(_)) => {
            c.problem(
                format!("{path}.hash_on"),
                format!("applies only to algorithm hash, not {}", other.as_str()),
            );
            None
        }
        (_, None) => None,
    };
    let retire_path = format!("{path}.retire_timeout");
    let retire_timeout = match (raw.algorithm, raw.retire_timeout) {
        (ring, timeout) if ring.is_hash_ring() => {
            let timeout = timeout.map_or(DEFAULT_RETIRE_TIMEOUT, |d| d.0);
            if let Some(why) = retire_timeout_problem(timeout) {
                c.problem(retire_path, why);
            }
            timeout
        }
        (other, Some(_)) => {
            c.problem(
                retire_path,
                format!(
                    "applies only to algorithms ip_hash and hash (a backend's users are its keys), not {}",
                    other.as_str()
                ),
            );
            DEFAULT_RETIRE_TIMEOUT
        }
        (_, None) => DEFAULT_RETIRE_TIMEOUT,
    };
    let tls = tls::upstream_tls(raw.protocol, raw.tls, &path, &mut c.problems);
    Upstream {
        name,
        algorithm: raw.algorithm,
        backends,
        health_check,
        timeouts,
        passive,
        slow_start,
        hash_on,
        retire_timeout,
        protocol: raw.protocol,
        tls,
    }
}

fn backends(c: &mut Checker, upstream_path: &str, raw: Vec<raw::Backend>) -> Vec<Backend> {
    if raw.is_empty() {
        c.problem(
            format!("{upstream_path}.backends"),
            "at least one backend is required",
        );
    }
    c.at_most(
        &format!("{upstream_path}.backends"),
        "backends",
        raw.len(),
        MAX_BACKENDS_PER_UPSTREAM,
    );
    let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, b) in raw.iter().enumerate() {
        let path = format!("{upstream_path}.backends[{i}]");
        let weight = b.weight.unwrap_or(1);
        if weight > MAX_BACKEND_WEIGHT {
            c.problem(
                format!("{path}.weight"),
                format!("{weight} is out of range 0..={MAX_BACKEND_WEIGHT}"),
            );
        }
        let address_path = format!("{path}.address");
        let Some(address) = c.address(&address_path, &b.address) else {
            continue;
        };
        if let Some(why) = backend_address_problem(address) {
            c.problem(address_path, why);
            continue;
        }
        if let Some(first) = seen.insert(address, i) {
            c.problem(
                format!("{path}.address"),
                format!("{address} is listed twice (also backends[{first}])"),
            );
            continue;
        }
        out.push(Backend { address, weight });
    }
    out
}

fn health_check(c: &mut Checker, path: &str, raw: raw::HealthCheck) -> HealthCheck {
    let interval = c.nonzero(
        &format!("{path}.interval"),
        raw.interval.map(|d| d.0).unwrap_or(DEFAULT_CHECK_INTERVAL),
    );
    let timeout = match raw.timeout.map(|d| d.0) {
        Some(t) => c.nonzero(&format!("{path}.timeout"), t),
        None => DEFAULT_CHECK_TIMEOUT.min(interval / 2),
    };
    if !interval.is_zero() && timeout >= interval {
        c.problem(
            format!("{path}.timeout"),
            format!(
                "{} must be shorter than interval ({})",
                format_duration(timeout),
                format_duration(interval)
            ),
        );
    }
    let rise = raw.rise.unwrap_or(DEFAULT_RISE);
    let fall = raw.fall.unwrap_or(DEFAULT_FALL);
    for (field, value) in [("rise", rise), ("fall", fall)] {
        if value == 0 {
            c.problem(format!("{path}.{field}"), "must be at least 1");
        }
    }
    let probe = match raw.kind {
        HealthCheckType::Tcp => {
            for (field, set) in [
                ("path", raw.path.is_some()),
                ("expect_status", raw.expect_status.is_some()),
                ("host", raw.host.is_some()),
            ] {
                if set {
                    c.problem(
                        format!("{path}.{field}"),
                        "only applies to type: http, not type: tcp",
                    );
                }
            }
            Probe::Tcp
        }
        HealthCheckType::Http => {
            let probe_path = raw.path.unwrap_or_else(|| "/".to_string());
            if !probe_path.starts_with('/') {
                c.problem(
                    format!("{path}.path"),
                    format!("{probe_path:?} must start with '/'"),
                );
            }
            let expect_status = raw.expect_status.unwrap_or(200);
            if !(100..=599).contains(&expect_status) {
                c.problem(
                    format!("{path}.expect_status"),
                    format!("{expect_status} is not an HTTP status (100..=599)"),
                );
            }
            Probe::Http {
                path: probe_path,
                expect_status,
                host: raw.host,
            }
        }
    };
    HealthCheck {
        probe,
        interval,
        timeout,
        rise,
        fall,
    }
}

fn routes(c: &mut Checker, raw: Vec<raw::Route>, upstreams: &[Upstream]) -> Vec<Route> {
    if raw.is_empty() {
        c.problem("routes", "at least one route is required");
    }
    c.at_most("routes", "routes", raw.len(), MAX_ROUTES);
    let pairs = raw
        .iter()
        .map(|r| r.split.as_ref().map_or(0, |s| s.0.len()))
        .sum();
    c.at_most(
        "routes",
        "route/upstream pairs (entries of all routes' splits)",
        pairs,
        MAX_ROUTE_UPSTREAM_PAIRS,
    );
    let backends_of = |name: &str| {
        upstreams
            .iter()
            .find(|u| u.name == name)
            .map_or(0, |u| u.backends.len())
    };
    let route_backends = raw
        .iter()
        .filter_map(|r| r.split.as_ref())
        .flat_map(|s| s.0.keys())
        .map(|name| backends_of(name))
        .sum();
    c.at_most(
        "routes",
        "route/backend pairs (for every route, the backends of the upstreams it splits to)",
        route_backends,
        MAX_ROUTE_BACKEND_PAIRS,
    );
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let path = format!("routes[{i}]");
        let name = match r.name {
            Some(name) => {
                c.name(&format!("{path}.name"), "route", &name);
                if let Some(first) = names.insert(name.clone(), i) {
                    c.problem(
                        format!("{path}.name"),
                        format!("route name {name:?} is used twice (also routes[{first}])"),
                    );
                }
                name
            }
            None => {
                c.problem(format!("{path}.name"), "is required");
                String::new()
            }
        };
        let host = r.host.map(|h| {
            if h.is_empty() || h.contains(':') || h.contains('/') || h.contains(' ') {
                c.problem(
                    format!("{path}.host"),
                    format!("{h:?} must be a bare host name, without port or path (the port is ignored when matching)"),
                );
            }
            h.to_ascii_lowercase()
        });
        if let Some(prefix) = &r.path_prefix {
            if !prefix.starts_with('/') {
                c.problem(
                    format!("{path}.path_prefix"),
                    format!("{prefix:?} must start with '/'"),
                );
            }
        }
        let matching = r
            .matching
            .map(|m| matching::route_match(m, &format!("{path}.match"), &mut c.problems))
            .unwrap_or_default();
        let split = split(c, &format!("{path}.split"), r.split.map(|m| m.0), upstreams);
        let sticky = r
            .sticky
            .and_then(|s| matching::sticky(s, &format!("{path}.sticky"), &mut c.problems));
        out.push(Route {
            name,
            host,
            path_prefix: r.path_prefix,
            matching,
            split,
            sticky,
        });
    }
    out
}

/// Checks a route split against the known upstreams.
fn split(
    c: &mut Checker,
    path: &str,
    raw: Option<BTreeMap<String, u32>>,
    upstreams: &[Upstream],
) -> Vec<SplitWeight> {
    let raw = raw.unwrap_or_default();
    if raw.is_empty() {
        c.problem(path, "at least one upstream is required");
        return Vec::new();
    }
    let mut out = Vec::with_capacity(raw.len());
    for (upstream, weight) in raw {
        let field = format!("{path}.{upstream}");
        if !upstreams.iter().any(|u| u.name == upstream) {
            c.problem(field, format!("unknown upstream {upstream:?}"));
            continue;
        }
        if weight > MAX_SPLIT_WEIGHT {
            c.problem(
                field,
                format!("{weight} is out of range 0..={MAX_SPLIT_WEIGHT}"),
            );
            continue;
        }
        out.push(SplitWeight { upstream, weight });
    }
    if !out.is_empty() && out.iter().all(|s| s.weight == 0) {
        c.problem(path, "weights must not all be 0");
    }
    out
}
