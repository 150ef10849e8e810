//! A validated [`Config`] written back as the YAML file it stands for, every default spelled
//! out: what `switchyard config` prints (as `nginx -T` does), and what `check` must accept
//! again. Built by hand from the typed config rather than by deriving `Serialize` on it,
//! because the file's shape is not the typed one (a listener's kind is its `tls` section,
//! a passive check is two upstream fields, `max_request_body_bytes: 0` means no limit), and
//! the round-trip test below keeps the two in step.

use serde_yaml::{Mapping, Value};

use crate::{
    format_duration, Config, HealthCheck, Listener, ListenerKind, Probe, Route, Server, Upstream,
};

/// A mapping built in the order the fields are documented (serde_yaml keeps it).
struct Fields(Mapping);

impl Fields {
    fn new() -> Fields {
        Fields(Mapping::new())
    }

    fn put(&mut self, key: &str, value: impl Into<Value>) -> &mut Fields {
        self.0.insert(Value::from(key), value.into());
        self
    }

    fn put_some(&mut self, key: &str, value: Option<impl Into<Value>>) -> &mut Fields {
        if let Some(value) = value {
            self.put(key, value);
        }
        self
    }

    fn duration(&mut self, key: &str, value: std::time::Duration) -> &mut Fields {
        self.put(key, format_duration(value))
    }

    fn done(&mut self) -> Value {
        Value::Mapping(std::mem::take(&mut self.0))
    }
}

/// Any serializable part of the config (matchers, keys) in its written shape.
fn written(value: &impl serde::Serialize) -> Value {
    // Our own types into serde_yaml's value: a map of strings, never an error.
    serde_yaml::to_value(value).unwrap_or(Value::Null)
}

impl Config {
    /// The config as a YAML document, defaults filled in.
    pub fn to_document(&self) -> Value {
        let mut top = Fields::new();
        top.put("server", server(&self.server));
        top.put(
            "listeners",
            Value::Sequence(self.listeners.iter().map(listener).collect()),
        );
        if let Some(admin) = &self.admin {
            top.put(
                "admin",
                Fields::new()
                    .put("address", admin.address.to_string())
                    .put_some(
                        "token_file",
                        admin.token_file.as_ref().map(|p| p.display().to_string()),
                    )
                    .done(),
            );
        }
        if let Some(metrics) = &self.metrics {
            top.put(
                "metrics",
                Fields::new()
                    .put("address", metrics.address.to_string())
                    .done(),
            );
        }
        top.put_some(
            "state_file",
            self.state_file.as_ref().map(|p| p.display().to_string()),
        );
        if let Some(crate::StateStoreConfig::Etcd(etcd)) = &self.state_store {
            top.put("state_store", state_store(etcd));
        }
        if let Some(log) = &self.access_log {
            top.put(
                "access_log",
                Fields::new()
                    .put("path", log.target.display())
                    .put("format", log.format.as_str())
                    .put("buffer_lines", log.buffer_lines as u64)
                    .done(),
            );
        }
        let mut upstreams = Mapping::new();
        for u in &self.upstreams {
            upstreams.insert(Value::from(u.name.as_str()), upstream(u));
        }
        top.put("upstreams", Value::Mapping(upstreams));
        top.put(
            "routes",
            Value::Sequence(self.routes.iter().map(route).collect()),
        );
        top.done()
    }

    /// [`Config::to_document`] as YAML text.
    pub fn to_yaml(&self) -> String {
        // A mapping of strings, numbers and booleans always serializes.
        serde_yaml::to_string(&self.to_document()).unwrap_or_default()
    }
}

/// The store's settings as written; the password file is named, never read here.
fn state_store(etcd: &crate::EtcdConfig) -> Value {
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let tls = etcd.tls.as_ref().map(|t| {
        Fields::new()
            .put_some("ca_file", path(&t.ca_file))
            .put_some("cert_file", path(&t.cert_file))
            .put_some("key_file", path(&t.key_file))
            .done()
    });
    let mut fields = Fields::new();
    fields
        .put(
            "endpoints",
            Value::Sequence(
                etcd.endpoints
                    .iter()
                    .map(|e| Value::from(e.as_str()))
                    .collect(),
            ),
        )
        .put("prefix", etcd.prefix.as_str())
        .put_some("name", etcd.name.clone())
        .put_some("username", etcd.username.clone())
        .put_some("password_file", path(&etcd.password_file));
    if let Some(tls) = tls {
        fields.put("tls", tls);
    }
    fields
        .duration("request_timeout", etcd.request_timeout)
        .duration("lease_ttl", etcd.lease_ttl);
    Fields::new().put("etcd", fields.done()).done()
}

fn server(s: &Server) -> Value {
    let c = &s.clients;
    Fields::new()
        .put("threads", s.threads as u64)
        .duration("grace_period", s.grace_period)
        .put("upgrade_socket", s.upgrade_socket.display().to_string())
        .put_some(
            "pid_file",
            s.pid_file.as_ref().map(|p| p.display().to_string()),
        )
        .put("debug_headers", s.debug_headers)
        .duration("keepalive_timeout", c.keepalive_timeout)
        .duration("header_timeout", c.header_timeout)
        .put(
            "max_request_header_bytes",
            c.max_request_header_bytes as u64,
        )
        .put("max_connections", c.max_connections as u64)
        .duration("body_timeout", c.body_timeout)
        .duration("send_timeout", c.send_timeout)
        // 0 is how the file says "no limit".
        .put(
            "max_request_body_bytes",
            c.max_request_body_bytes.unwrap_or(0),
        )
        .done()
}

fn listener(l: &Listener) -> Value {
    let mut fields = Fields::new();
    fields.put("address", l.address.to_string());
    match &l.kind {
        ListenerKind::Plain {
            h2c,
            redirect_https,
        } => {
            fields
                .put("h2c", *h2c)
                .put("redirect_https", *redirect_https);
        }
        ListenerKind::Tls(tls) => {
            let certificates = tls
                .certificates
                .iter()
                .map(|c| {
                    Fields::new()
                        .put("cert", c.cert.display().to_string())
                        .put("key", c.key.display().to_string())
                        .done()
                })
                .collect();
            let mut section = Fields::new();
            section
                .put("certificates", Value::Sequence(certificates))
                .put("min_version", tls.min_version.as_str())
                .put("session_tickets", tls.session_tickets);
            if let Some(hsts) = &tls.hsts {
                section.put(
                    "hsts",
                    Fields::new()
                        .duration("max_age", hsts.max_age)
                        .put("include_subdomains", hsts.include_subdomains)
                        .put("preload", hsts.preload)
                        .done(),
                );
            }
            fields.put("tls", section.done()).put("http2", tls.http2);
        }
    }
    fields.done()
}

fn upstream(u: &Upstream) -> Value {
    let mut fields = Fields::new();
    fields.put("algorithm", u.algorithm.as_str());
    if let Some(key) = &u.hash_on {
        fields.put("hash_on", written(key));
    }
    fields.put(
        "backends",
        Value::Sequence(
            u.backends
                .iter()
                .map(|b| {
                    Fields::new()
                        .put("address", b.address.to_string())
                        .put("weight", u64::from(b.weight))
                        .done()
                })
                .collect(),
        ),
    );
    if let Some(check) = &u.health_check {
        fields.put("health_check", health_check(check));
    }
    fields.put(
        "timeouts",
        Fields::new()
            .duration("connect", u.timeouts.connect)
            .duration("read", u.timeouts.read)
            .duration("write", u.timeouts.write)
            .duration("idle", u.timeouts.idle)
            .done(),
    );
    fields
        .put(
            "max_connect_failures",
            u64::from(u.passive.max_connect_failures),
        )
        .duration("failure_cooldown", u.passive.cooldown);
    if let Some(ramp) = u.slow_start {
        fields.duration("slow_start", ramp);
    }
    // The file refuses a retire_timeout on an upstream that hashes no key.
    if u.algorithm.is_hash_ring() {
        fields.duration("retire_timeout", u.retire_timeout);
    }
    fields.put("protocol", u.protocol.as_str());
    if let Some(tls) = &u.tls {
        fields.put(
            "tls",
            Fields::new()
                .put_some(
                    "ca_file",
                    tls.ca_file.as_ref().map(|p| p.display().to_string()),
                )
                .put_some("server_name", tls.server_name.clone())
                .put("verify", tls.verify)
                .done(),
        );
    }
    fields.done()
}

fn health_check(h: &HealthCheck) -> Value {
    let mut fields = Fields::new();
    match &h.probe {
        Probe::Tcp => {
            fields.put("type", "tcp");
        }
        Probe::Http {
            path,
            expect_status,
            host,
        } => {
            fields
                .put("type", "http")
                .put("path", path.as_str())
                .put("expect_status", u64::from(*expect_status))
                .put_some("host", host.clone());
        }
    }
    fields
        .duration("interval", h.interval)
        .duration("timeout", h.timeout)
        .put("rise", u64::from(h.rise))
        .put("fall", u64::from(h.fall))
        .done()
}

fn route(r: &Route) -> Value {
    let mut fields = Fields::new();
    fields
        .put("name", r.name.as_str())
        .put_some("host", r.host.clone())
        .put_some("path_prefix", r.path_prefix.clone());
    if !r.matching.is_empty() {
        fields.put("match", written(&r.matching));
    }
    let mut split = Mapping::new();
    for s in &r.split {
        split.insert(Value::from(s.upstream.as_str()), Value::from(s.weight));
    }
    fields.put("split", Value::Mapping(split));
    if let Some(sticky) = &r.sticky {
        fields.put("sticky", written(sticky));
    }
    fields.done()
}

#[cfg(test)]
mod tests {
    use crate::Config;

    /// Every section and optional field the file has, away from its default: what the
    /// document leaves out or misspells does not come back the same.
    const RICH: &str = r#"
server:
  threads: 3
  grace_period: 1500ms
  upgrade_socket: /tmp/sy/upgrade.sock
  pid_file: /tmp/sy/switchyard.pid
  debug_headers: true
  keepalive_timeout: 5s
  header_timeout: 2s
  max_request_header_bytes: 4096
  max_connections: 100
  body_timeout: 7s
  send_timeout: 8s
  max_request_body_bytes: 1048576
listeners:
  - address: 127.0.0.1:8080
    h2c: true
  - address: 127.0.0.1:8081
    redirect_https: true
  - address: 127.0.0.1:8443
    http2: false
    tls:
      certificates:
        - {cert: /etc/a.crt, key: /etc/a.key}
      min_version: "1.3"
      session_tickets: false
      hsts: {max_age: 1h, include_subdomains: true, preload: false}
admin:
  address: 127.0.0.1:9000
  token_file: /etc/switchyard/admin.token
metrics:
  address: 127.0.0.1:9100
state_file: /var/lib/switchyard/state.json
access_log: {path: /var/log/switchyard/access.log, format: combined, buffer_lines: 4096}
upstreams:
  blue:
    algorithm: weighted_round_robin
    backends:
      - address: 127.0.0.1:9001
        weight: 3
      - address: "[::1]:9002"
    health_check: {type: http, path: /healthz, expect_status: 204, host: blue.internal, interval: 2s, timeout: 500ms, rise: 3, fall: 4}
    timeouts: {connect: 1s, read: 2s, write: 3s, idle: 4s}
    max_connect_failures: 0
    failure_cooldown: 1m
    slow_start: 30s
    protocol: h2
    tls: {ca_file: /etc/ca.pem, server_name: api.internal, verify: true}
  green:
    algorithm: hash
    hash_on: {header: X-User-Id}
    retire_timeout: 5m
    backends:
      - address: 127.0.0.1:9003
    health_check: {type: tcp}
  red:
    algorithm: ip_hash
    backends:
      - address: 127.0.0.1:9004
routes:
  - name: beta
    host: example.com
    path_prefix: /app
    match:
      headers: {X-User-Group: beta}
      cookies: {group: "*"}
      query: {preview: "1"}
      methods: [GET, HEAD]
    split: {green: 1}
  - name: web
    split: {blue: 90, green: 10, red: 0}
    sticky: {cookie: switchyard_user, set_cookie: true}
"#;

    #[test]
    fn the_document_reads_back_as_the_same_config() {
        let config = Config::from_yaml(RICH).unwrap_or_else(|p| panic!("{p}"));
        let yaml = config.to_yaml();
        let again = Config::from_yaml(&yaml).unwrap_or_else(|p| panic!("{p}\n{yaml}"));
        assert_eq!(again, config, "{yaml}");
    }

    #[test]
    fn defaults_are_spelled_out() {
        let config = Config::from_yaml(
            "listeners: [{address: 127.0.0.1:8080}]\nupstreams:\n  a:\n    backends: [{address: 127.0.0.1:9001}]\nroutes: [{name: r, split: {a: 1}}]\n",
        )
        .unwrap_or_else(|p| panic!("{p}"));
        let yaml = config.to_yaml();
        for line in [
            "grace_period: 30s",
            "upgrade_socket: /run/switchyard/upgrade.sock",
            "keepalive_timeout: 1m",
            "max_request_body_bytes: 0",
            "algorithm: round_robin",
            "weight: 1",
            "connect: 5s",
            "max_connect_failures: 3",
            "protocol: http1",
        ] {
            assert!(yaml.contains(line), "{line}:\n{yaml}");
        }
        assert_eq!(Config::from_yaml(&yaml), Ok(config));
    }
}
