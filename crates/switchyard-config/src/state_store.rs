//! `state_store`: where the runtime state is shared between several balancers (etcd). The
//! client itself is `switchyard-etcd`; this module parses and checks the settings, so that
//! `check`, start and reload agree on them. Files are named here and read at start (a
//! password or key is never written into the YAML itself).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::duration::YamlDuration;
use crate::Problem;

/// How long one request to the store may take before the store counts as unreachable.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The rollout driver's lease: a dead driver is replaced this long after its last keep-alive.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateStoreConfig {
    Etcd(EtcdConfig),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port`, one per cluster member.
    pub endpoints: Vec<String>,
    /// Every key lives under it; ends without `/`.
    pub prefix: String,
    /// This instance's name among the others (reports, audit entries, the driver's lease);
    /// `None`: the host name and the admin (or first listener) address, filled in at start.
    pub name: Option<String>,
    pub username: Option<String>,
    /// The password's file: read at start, its trailing newline dropped.
    pub password_file: Option<PathBuf>,
    pub tls: Option<EtcdTls>,
    pub request_timeout: Duration,
    pub lease_ttl: Duration,
}

/// TLS to etcd: the CA that signed its certificates, and a client certificate when etcd asks
/// for one (`--client-cert-auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStateStore {
    etcd: Option<RawEtcd>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    endpoints: Option<Vec<String>>,
    prefix: Option<String>,
    name: Option<String>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    tls: Option<RawEtcdTls>,
    request_timeout: Option<YamlDuration>,
    lease_ttl: Option<YamlDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcdTls {
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

pub(crate) fn state_store(
    raw: RawStateStore,
    problems: &mut Vec<Problem>,
) -> Option<StateStoreConfig> {
    let mut problem = |field: &str, message: String| {
        problems.push(Problem {
            path: format!("state_store{field}"),
            message,
        })
    };
    let Some(etcd) = raw.etcd else {
        problem("", "name the store: etcd".into());
        return None;
    };
    let endpoints = etcd.endpoints.unwrap_or_default();
    if endpoints.is_empty() {
        problem(
            ".etcd.endpoints",
            "at least one endpoint is needed, e.g. [\"http://127.0.0.1:2379\"]".into(),
        );
    }
    let tls = etcd.tls.map(|t| EtcdTls {
        ca_file: t.ca_file,
        cert_file: t.cert_file,
        key_file: t.key_file,
    });
    for (i, endpoint) in endpoints.iter().enumerate() {
        let field = format!(".etcd.endpoints[{i}]");
        match endpoint_problem(endpoint) {
            Some(message) => problem(&field, message),
            None if endpoint.starts_with("https://") && tls.is_none() => problem(
                &field,
                format!("{endpoint:?} is https: give state_store.etcd.tls (at least ca_file)"),
            ),
            None if endpoint.starts_with("http://") && tls.is_some() => problem(
                &field,
                format!(
                    "{endpoint:?} is plain http while state_store.etcd.tls is set: use https://"
                ),
            ),
            None => {}
        }
    }
    let prefix = etcd.prefix.unwrap_or_default();
    if !prefix.starts_with('/') || prefix.len() < 2 || prefix.contains("//") {
        problem(
            ".etcd.prefix",
            format!("{prefix:?} must start with '/' and name a key path, e.g. /switchyard/prod"),
        );
    }
    if let Some(name) = &etcd.name {
        let valid = !name.is_empty()
            && name.len() <= 128
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-:".contains(c));
        if !valid {
            problem(
                ".etcd.name",
                format!("{name:?} must be 1 to 128 letters, digits, '_', '.', '-' or ':'"),
            );
        }
    }
    if etcd.password_file.is_some() != etcd.username.is_some() {
        problem(
            ".etcd.password_file",
            "username and password_file go together".into(),
        );
    }
    if let Some(t) = &tls {
        if t.ca_file.is_none() {
            problem(
                ".etcd.tls.ca_file",
                "needed: the CA that signed etcd's certificates (no system CAs are trusted for etcd)".into(),
            );
        }
        if t.cert_file.is_some() != t.key_file.is_some() {
            problem(
                ".etcd.tls.key_file",
                "cert_file and key_file go together (the client certificate and its key)".into(),
            );
        }
    }
    let request_timeout = etcd
        .request_timeout
        .map_or(DEFAULT_REQUEST_TIMEOUT, |d| d.0);
    if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&request_timeout) {
        problem(
            ".etcd.request_timeout",
            "must be between 100ms and 60s".into(),
        );
    }
    let lease_ttl = etcd.lease_ttl.map_or(DEFAULT_LEASE_TTL, |d| d.0);
    if !(Duration::from_secs(2)..=Duration::from_secs(60)).contains(&lease_ttl)
        || lease_ttl.subsec_nanos() != 0
    {
        problem(
            ".etcd.lease_ttl",
            "must be whole seconds between 2s and 60s (etcd leases count in seconds)".into(),
        );
    }
    Some(StateStoreConfig::Etcd(EtcdConfig {
        endpoints,
        prefix: prefix.trim_end_matches('/').to_string(),
        name: etcd.name,
        username: etcd.username,
        password_file: etcd.password_file,
        tls,
        request_timeout,
        lease_ttl,
    }))
}

/// What is wrong with an endpoint, or `None`: `http(s)://host:port`, nothing after the port.
fn endpoint_problem(endpoint: &str) -> Option<String> {
    let Some(rest) = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
    else {
        return Some(format!(
            "{endpoint:?} must start with http:// or https://, e.g. http://127.0.0.1:2379"
        ));
    };
    let valid = rest
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !valid || rest.contains('/') {
        return Some(format!(
            "{endpoint:?} must be scheme://host:port with nothing after the port"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use crate::Config;

    const REST: &str = "listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  app:\n    backends:\n      - address: 127.0.0.1:9001\nroutes:\n  - name: web\n    split:\n      app: 1\n";

    fn parse(yaml: &str) -> Result<Config, crate::Problems> {
        Config::from_yaml(&format!("{yaml}{REST}"))
    }

    fn problems(yaml: &str) -> Vec<String> {
        match parse(yaml) {
            Ok(_) => Vec::new(),
            Err(p) => p.0.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn a_good_etcd_store_parses_with_defaults() {
        let config = parse(
            "state_store:\n  etcd:\n    endpoints: [\"http://127.0.0.1:2379\", \"http://127.0.0.2:2379\"]\n    prefix: /switchyard/prod/\n",
        )
        .expect("valid");
        let Some(super::StateStoreConfig::Etcd(etcd)) = config.state_store else {
            panic!("no store");
        };
        assert_eq!(etcd.prefix, "/switchyard/prod");
        assert_eq!(etcd.endpoints.len(), 2);
        assert_eq!(etcd.lease_ttl, super::DEFAULT_LEASE_TTL);
    }

    #[test]
    fn every_bad_field_is_named() {
        let lines = problems(
            "state_store:\n  etcd:\n    endpoints: [\"127.0.0.1:2379\", \"https://a:1\", \"http://a:2379/x\"]\n    prefix: prod\n    name: \"a b\"\n    username: root\n    lease_ttl: 1500ms\n",
        )
        .join("\n");
        for want in [
            "state_store.etcd.endpoints[0]: \"127.0.0.1:2379\" must start with http://",
            "state_store.etcd.endpoints[1]: \"https://a:1\" is https: give state_store.etcd.tls",
            "state_store.etcd.endpoints[2]: \"http://a:2379/x\" must be scheme://host:port",
            "state_store.etcd.prefix: \"prod\" must start with '/'",
            "state_store.etcd.name: \"a b\" must be",
            "state_store.etcd.password_file: username and password_file go together",
            "state_store.etcd.lease_ttl: must be whole seconds",
        ] {
            assert!(lines.contains(want), "{want:?} not in:\n{lines}");
        }
        assert!(problems("state_store: {}\n")
            .join("\n")
            .contains("state_store: name the store: etcd"));
    }
}
