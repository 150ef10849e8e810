//! Unit tests of parsing and validation: defaults, and the exact problem lines `check` prints.

use super::*;

const VALID: &str = r#"
server:
  threads: 2
  grace_period: 30s
listeners:
  - address: 127.0.0.1:8080
admin:
  address: 127.0.0.1:9000
metrics:
  address: 127.0.0.1:9100
upstreams:
  blue:
    algorithm: weighted_round_robin
    backends:
      - address: 127.0.0.1:9001
      - address: 127.0.0.1:9002
        weight: 3
    health_check:
      type: http
      path: /healthz
      interval: 1s
      timeout: 500ms
      rise: 2
      fall: 2
  green:
    algorithm: least_connections
    backends:
      - address: 127.0.0.1:9003
routes:
  - name: web
    host: Example.com
    path_prefix: /
    split:
      blue: 90
      green: 10
"#;

fn problems(yaml: &str) -> Vec<String> {
    match Config::from_yaml(yaml) {
        Ok(_) => Vec::new(),
        Err(p) => p.0.iter().map(|p| p.to_string()).collect(),
    }
}

#[test]
fn the_contract_example_parses_with_defaults() {
    let config = Config::from_yaml(VALID).expect("valid");
    assert_eq!(config.server.threads, 2);
    assert_eq!(config.server.grace_period, Duration::from_secs(30));
    assert_eq!(
        config.server.upgrade_socket,
        PathBuf::from("/run/switchyard/upgrade.sock")
    );
    let blue = config.upstream("blue").unwrap();
    assert_eq!(blue.algorithm, Algorithm::WeightedRoundRobin);
    assert_eq!(blue.backends[0].weight, 1);
    assert_eq!(blue.backends[1].weight, 3);
    let hc = blue.health_check.as_ref().unwrap();
    assert_eq!(
        hc.probe,
        Probe::Http {
            path: "/healthz".into(),
            expect_status: 200,
            host: None
        }
    );
    assert_eq!(hc.timeout, Duration::from_millis(500));
    assert_eq!(blue.timeouts.connect, Duration::from_secs(5));
    let route = &config.routes[0];
    assert_eq!(route.host.as_deref(), Some("example.com"));
    assert_eq!(
        route.split,
        vec![
            SplitWeight {
                upstream: "blue".into(),
                weight: 90
            },
            SplitWeight {
                upstream: "green".into(),
                weight: 10
            }
        ]
    );
}

#[test]
fn every_semantic_problem_is_reported_with_its_path() {
    let yaml = r#"
server:
  threads: 0
listeners:
  - address: localhost
upstreams:
  green:
    backends:
      - address: 127.0.0.1:9003
      - address: 127.0.0.1:99999
      - address: 127.0.0.1:9003
        weight: 1001
    health_check:
      type: http
      path: healthz
      interval: 1s
      timeout: 1s
      rise: 0
      fall: 0
  empty:
    backends: []
routes:
  - name: web
    path_prefix: api
    split:
      green: 0
      purple: 5
  - name: web
    split:
      green: 0
"#;
    assert_eq!(
        problems(yaml),
        vec![
            "server.threads: must be at least 1",
            "listeners[0].address: \"localhost\" is not a valid address: expected IP:port, e.g. 127.0.0.1:9001",
            "upstreams.empty.backends: at least one backend is required",
            "upstreams.green.backends[1].address: \"127.0.0.1:99999\" is not a valid address: expected IP:port, e.g. 127.0.0.1:9001",
            "upstreams.green.backends[2].weight: 1001 is out of range 0..=1000",
            "upstreams.green.backends[2].address: 127.0.0.1:9003 is listed twice (also backends[0])",
            "upstreams.green.health_check.timeout: 1s must be shorter than interval (1s)",
            "upstreams.green.health_check.rise: must be at least 1",
            "upstreams.green.health_check.fall: must be at least 1",
            "upstreams.green.health_check.path: \"healthz\" must start with '/'",
            "routes[0].path_prefix: \"api\" must start with '/'",
            "routes[0].split.purple: unknown upstream \"purple\"",
            "routes[0].split: weights must not all be 0",
            "routes[1].name: route name \"web\" is used twice (also routes[0])",
            "routes[1].split: weights must not all be 0",
        ]
    );
}

#[test]
fn unknown_fields_are_errors_with_path_and_line() {
    let yaml = "listeners:\n  - address: 127.0.0.1:8080\n    wieght: 3\n";
    let lines = problems(yaml);
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].starts_with("listeners[0].wieght: unknown field; expected one of address,"),
        "{lines:?}"
    );
    assert!(lines[0].contains("(line 3, column 5)"), "{lines:?}");
}

#[test]
fn yaml_syntax_errors_give_line_and_column() {
    let lines = problems("listeners:\n  - address: 127.0.0.1:8080\n bad: [\n");
    assert_eq!(lines.len(), 1);
    assert!(lines[0].contains("(line 3, column 2)"), "{lines:?}");
}

#[test]
fn bad_durations_and_algorithms_name_the_field() {
    let lines = problems("server:\n  grace_period: 30 seconds\n");
    assert!(
        lines[0].starts_with("server.grace_period: invalid duration \"30 seconds\""),
        "{lines:?}"
    );
    let lines = problems("upstreams:\n  a:\n    algorithm: random\n");
    assert!(
        lines[0].starts_with(
            "upstreams.a.algorithm: unknown value \"random\"; expected one of round_robin,"
        ),
        "{lines:?}"
    );
}

#[test]
fn missing_sections_are_named() {
    assert_eq!(
        problems("server: {}\n"),
        vec![
            "listeners: at least one listener is required",
            "upstreams: at least one upstream is required",
            "routes: at least one route is required",
        ]
    );
}

#[test]
fn admin_beyond_loopback_needs_a_token_and_sockets_are_distinct() {
    let yaml = VALID
        .replace("address: 127.0.0.1:9000", "address: 0.0.0.0:9000")
        .replace("address: 127.0.0.1:9100", "address: 127.0.0.1:8080");
    assert_eq!(
        problems(&yaml),
        vec![
            "admin.address: 0.0.0.0:9000 is not a loopback address; set admin.token_file to expose the admin API beyond this machine",
            "metrics.address: 127.0.0.1:8080 is already used by listeners[0].address",
        ]
    );
}

#[test]
fn tcp_checks_refuse_http_fields_and_weights_are_bounded() {
    let yaml = VALID
        .replace("type: http", "type: tcp")
        .replace("green: 10", "green: 10001");
    assert_eq!(
        problems(&yaml),
        vec![
            "upstreams.blue.health_check.path: only applies to type: http, not type: tcp",
            "routes[0].split.green: 10001 is out of range 0..=10000",
        ]
    );
}

#[test]
fn hosts_must_be_bare() {
    let yaml = VALID.replace("host: Example.com", "host: example.com:8080");
    assert_eq!(
        problems(&yaml),
        vec!["routes[0].host: \"example.com:8080\" must be a bare host name, without port or path (the port is ignored when matching)"]
    );
}

#[test]
fn names_defined_twice_are_errors() {
    let twice = VALID.replace("  green:\n    algorithm", "  blue:\n    algorithm");
    let lines = problems(&twice);
    assert!(
        lines[0].starts_with("upstreams: \"blue\" is defined twice"),
        "{lines:?}"
    );
    let twice = VALID.replace("green: 10", "blue: 10");
    let lines = problems(&twice);
    assert!(
        lines[0].starts_with("routes[0].split: \"blue\" is defined twice"),
        "{lines:?}"
    );
}

#[test]
fn retire_timeout_is_for_hash_rings_nonzero_and_at_most_a_week() {
    let yaml = VALID.replace(
        "    algorithm: least_connections\n",
        "    algorithm: least_connections\n    retire_timeout: 5m\n",
    );
    assert_eq!(
        problems(&yaml),
        vec!["upstreams.green.retire_timeout: applies only to algorithms ip_hash and hash (a backend's users are its keys), not least_connections"]
    );
    let yaml = VALID.replace(
        "    algorithm: least_connections\n",
        "    algorithm: ip_hash\n    retire_timeout: 0s\n",
    );
    assert_eq!(
        problems(&yaml),
        vec!["upstreams.green.retire_timeout: must be longer than 0s"]
    );
    // A deadline a week away at most: one further off than the state file's times can hold
    // would set the whole file aside at the next start.
    let yaml = VALID.replace(
        "    algorithm: least_connections\n",
        "    algorithm: ip_hash\n    retire_timeout: 100000000h\n",
    );
    assert_eq!(
        problems(&yaml),
        vec![
            "upstreams.green.retire_timeout: 100000000h is longer than the limit of 168h (7 days)"
        ]
    );
    let yaml = VALID.replace(
        "    algorithm: least_connections\n",
        "    algorithm: ip_hash\n    retire_timeout: 168h\n",
    );
    assert_eq!(
        Config::from_yaml(&yaml)
            .expect("a week is allowed")
            .upstream("green")
            .unwrap()
            .retire_timeout,
        crate::MAX_RETIRE_TIMEOUT
    );
    let yaml = VALID.replace(
        "    algorithm: least_connections\n",
        "    algorithm: ip_hash\n    retire_timeout: 5m\n",
    );
    let config = Config::from_yaml(&yaml).expect("valid");
    assert_eq!(
        config.upstream("green").unwrap().retire_timeout,
        Duration::from_secs(300)
    );
    let yaml = VALID.replace(
        "    algorithm: least_connections\n",
        "    algorithm: ip_hash\n",
    );
    let config = Config::from_yaml(&yaml).expect("valid");
    assert_eq!(
        config.upstream("green").unwrap().retire_timeout,
        Duration::from_secs(600),
        "the default"
    );
}

#[test]
fn slow_start_needs_a_weighted_algorithm() {
    let yaml = VALID.replace(
        "    algorithm: least_connections\n",
        "    algorithm: ip_hash\n    slow_start: 30s\n",
    );
    assert_eq!(
        problems(&yaml),
        vec!["upstreams.green.slow_start: only applies to weighted_round_robin and least_connections, not ip_hash"]
    );
    let yaml = VALID.replace(
        "    algorithm: least_connections\n",
        "    algorithm: least_connections\n    slow_start: 30s\n",
    );
    let config = Config::from_yaml(&yaml).expect("valid");
    assert_eq!(
        config.upstream("green").unwrap().slow_start,
        Some(Duration::from_secs(30))
    );
}

#[test]
fn backends_no_host_can_have_are_refused_with_their_path() {
    let yaml = VALID
        .replace("127.0.0.1:9002", "0.0.0.0:9002")
        .replace("127.0.0.1:9003", "255.255.255.255:9003");
    assert_eq!(
        problems(&yaml),
        [
            "upstreams.blue.backends[1].address: 0.0.0.0:9002 is unspecified (0.0.0.0/8: this host), which no backend can have; give the backend's own address",
            "upstreams.green.backends[0].address: 255.255.255.255:9003 is the broadcast address, which no backend can have; give the backend's own address",
        ]
    );
    // Listeners may still bind every address.
    assert!(problems(&VALID.replace("127.0.0.1:8080", "0.0.0.0:8080")).is_empty());
}

/// `routes` routes, each splitting to `per_route` of `upstreams` upstreams of `backends`
/// backends each.
fn sized(upstreams: usize, backends: usize, routes: usize, per_route: usize) -> String {
    let mut yaml = String::from("listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n");
    let mut port = 10_000;
    for u in 0..upstreams {
        yaml.push_str(&format!("  u{u}:\n    backends:\n"));
        for _ in 0..backends {
            yaml.push_str(&format!(
                "      - address: 127.0.0.{}:{}\n",
                1 + port / 60_000,
                1 + port % 60_000
            ));
            port += 1;
        }
    }
    yaml.push_str("routes:\n");
    for r in 0..routes {
        yaml.push_str(&format!("  - name: r{r}\n    split:\n"));
        for u in 0..per_route {
            yaml.push_str(&format!("      u{}: 1\n", (r + u) % upstreams));
        }
    }
    yaml
}

#[test]
fn counts_beyond_the_limits_are_refused_naming_the_limit() {
    use crate::limits::*;
    assert!(problems(&sized(10, 2, 10, 10)).is_empty());
    assert_eq!(
        problems(&sized(MAX_UPSTREAMS + 1, 1, 1, 1)),
        ["upstreams: 1001 upstreams, over the limit of 1000 (see docs/configuration.md, \"Limits\")"]
    );
    assert_eq!(
        problems(&sized(1, MAX_BACKENDS_PER_UPSTREAM + 1, 1, 1)),
        ["upstreams.u0.backends: 1001 backends, over the limit of 1000 (see docs/configuration.md, \"Limits\")"]
    );
    assert_eq!(
        problems(&sized(11, 1000, 1, 1)),
        ["upstreams: 11000 backends in all upstreams, over the limit of 10000 (see docs/configuration.md, \"Limits\")"]
    );
    assert_eq!(
        problems(&sized(1, 1, MAX_ROUTES + 1, 1)),
        ["routes: 1001 routes, over the limit of 1000 (see docs/configuration.md, \"Limits\")"]
    );
    assert_eq!(
        problems(&sized(101, 1, 100, 101)),
        ["routes: 10100 route/upstream pairs (entries of all routes' splits), over the limit of 10000 (see docs/configuration.md, \"Limits\")"]
    );
}

#[test]
fn aliases_count_expanded_and_big_files_are_refused() {
    // One split of 200 upstreams used by 6 000 routes: 1.2 million pairs from 150 KB.
    let mut yaml = sized(200, 1, 1, 0).replace("    split:\n", "    split: &all\n");
    for u in 0..200 {
        yaml.push_str(&format!("      u{u}: 1\n"));
    }
    for r in 1..6000 {
        yaml.push_str(&format!("  - {{name: r{r}, split: *all}}\n"));
    }
    let started = std::time::Instant::now();
    let lines = problems(&yaml);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("limit of 1000000 YAML nodes"),
        "{lines:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    let big = format!(
        "{VALID}\n#{}\n",
        "x".repeat(crate::limits::MAX_CONFIG_BYTES)
    );
    assert!(problems(&big)[0].contains("over the limit of 4194304"));
}

#[test]
fn a_value_the_size_walk_cannot_read_is_refused_before_anything_is_built() {
    // A plain integer past u64 first, then one long string used many times: the walk must
    // not stop at the integer and leave the strings to the real parse.
    let long = "x".repeat(100_000);
    let uses: String = (0..200).map(|_| "  - {name: *s}\n").collect();
    let yaml =
        format!("state_file: 18446744073709551616\nroutes:\n  - {{name: &s {long}}}\n{uses}");
    let lines = problems(&yaml);
    assert!(lines[0].contains("YAML nodes or"), "{lines:?}");
    // A tag serde_yaml cannot read as its type: refused, with its line, not built.
    let lines = problems("state_file: !!int nope\n");
    assert!(lines[0].contains("line 1"), "{lines:?}");
}

/// `upstreams` upstreams of `backends` backends each, behind `routes` routes that each split to
/// all of them.
fn wide(routes: usize, upstreams: usize, backends: usize) -> String {
    use std::fmt::Write;
    let mut yaml = String::from(
        "listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  u0:\n    backends: &b\n",
    );
    for i in 0..backends {
        writeln!(
            yaml,
            "      - address: 127.0.{}.{}:80",
            1 + i / 250,
            1 + i % 250
        )
        .unwrap();
    }
    for u in 1..upstreams {
        writeln!(yaml, "  u{u}: {{backends: *b}}").unwrap();
    }
    yaml.push_str("routes:\n  - name: r0\n    split: &all\n");
    for u in 0..upstreams {
        writeln!(yaml, "      u{u}: 1").unwrap();
    }
    for r in 1..routes {
        writeln!(yaml, "  - {{name: r{r}, split: *all}}").unwrap();
    }
    yaml
}

#[test]
fn route_backend_pairs_are_bounded_as_they_bound_the_metrics() {
    // 10 upstreams of 1 000 backends: 10 routes over all of them are 100 000 route/backend
    // pairs, the limit; an eleventh route is over it.
    assert_eq!(problems(&wide(10, 10, 1000)), Vec::<String>::new());
    assert_eq!(
        problems(&wide(11, 10, 1000)),
        ["routes: 110000 route/backend pairs (for every route, the backends of the upstreams it splits to), over the limit of 100000 (see docs/configuration.md, \"Limits\")"]
    );
}

#[test]
fn hash_upstreams_need_their_key_and_routes_check_match_and_sticky() {
    let yaml = "listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  a:\n    algorithm: hash\n    backends:\n      - address: 127.0.0.1:9001\n  b:\n    hash_on: {header: X-User}\n    backends:\n      - address: 127.0.0.1:9002\n  c:\n    algorithm: hash\n    hash_on: {header: 'X User'}\n    backends:\n      - address: 127.0.0.1:9003\nroutes:\n  - name: web\n    match:\n      headers: {X-Group: ' beta'}\n      methods: [FETCH]\n    split: {a: 1}\n    sticky: {cookie: app_session, set_cookie: true}\n";
    let got = problems(yaml);
    let expected = [
        "upstreams.a.hash_on: is required with algorithm hash",
        "upstreams.b.hash_on: applies only to algorithm hash, not round_robin",
        "upstreams.c.hash_on.header: header name \"X User\" has ' '",
        "routes[0].match.headers.X-Group: header value \" beta\" starts or ends with a space",
        "routes[0].match.methods[0]: \"FETCH\" is not an HTTP method",
        "routes[0].sticky.cookie: \"app_session\": set_cookie issues cookies",
    ];
    assert_eq!(got.len(), expected.len(), "{got:#?}");
    for (got, want) in got.iter().zip(expected) {
        assert!(got.starts_with(want), "{got:?} should start with {want:?}");
    }
    let good = yaml
        .replace("algorithm: hash\n    backends:\n      - address: 127.0.0.1:9001", "algorithm: hash\n    hash_on: {cookie: uid}\n    backends:\n      - address: 127.0.0.1:9001")
        .replace("    hash_on: {header: X-User}\n", "")
        .replace("'X User'", "X-User")
        .replace("' beta'", "beta")
        .replace("FETCH", "get")
        .replace("app_session", "switchyard_user");
    let config = Config::from_yaml(&good).unwrap();
    assert_eq!(
        config.upstream("a").unwrap().hash_on,
        Some(crate::RequestKey::Cookie("uid".into()))
    );
    assert_eq!(config.routes[0].matching.methods, vec!["GET".to_string()]);
    assert!(config.routes[0].sticky.as_ref().unwrap().set_cookie);
}

#[test]
fn tls_listeners_and_upstream_protocols_parse_with_defaults() {
    let yaml = VALID
        .replace(
            "  - address: 127.0.0.1:8080\n",
            "  - address: 127.0.0.1:8443\n    tls:\n      certificates:\n        - cert: /c/a.crt\n          key: /c/a.key\n      hsts: {max_age: 365d, include_subdomains: true}\n  - address: 127.0.0.1:8080\n    redirect_https: true\n  - address: 127.0.0.1:8081\n    h2c: true\n",
        )
        .replace(
            "  green:\n    algorithm: least_connections\n",
            "  green:\n    algorithm: least_connections\n    protocol: h2\n    tls: {server_name: api.internal}\n",
        );
    let config = Config::from_yaml(&yaml).expect("valid");
    let tls = config.listeners[0].tls().expect("tls");
    assert_eq!(tls.certificates[0].cert, PathBuf::from("/c/a.crt"));
    assert_eq!(tls.min_version, TlsVersion::Tls12);
    assert!(tls.http2 && tls.session_tickets);
    assert_eq!(
        tls.hsts.as_ref().map(Hsts::header_value).as_deref(),
        Some("max-age=31536000; includeSubDomains")
    );
    assert_eq!(
        config.listeners[1].kind,
        ListenerKind::Plain {
            h2c: false,
            redirect_https: true
        }
    );
    assert_eq!(
        config.listeners[2].kind,
        ListenerKind::Plain {
            h2c: true,
            redirect_https: false
        }
    );
    let green = config.upstream("green").unwrap();
    assert_eq!(green.protocol, UpstreamProtocol::H2);
    let upstream_tls = green.tls.as_ref().expect("tls");
    assert!(upstream_tls.verify);
    assert_eq!(upstream_tls.server_name.as_deref(), Some("api.internal"));
    let blue = config.upstream("blue").unwrap();
    assert_eq!(
        (blue.protocol, blue.tls.is_none()),
        (UpstreamProtocol::Http1, true)
    );
}

#[test]
fn tls_mistakes_are_named() {
    let yaml = VALID
        .replace(
            "  - address: 127.0.0.1:8080\n",
            "  - address: 127.0.0.1:8443\n    h2c: true\n    redirect_https: true\n    tls:\n      certificates: []\n      min_version: \"1.1\"\n      hsts: {max_age: 1000d, preload: true}\n  - address: 127.0.0.1:8080\n    http2: true\n    h2c: true\n    redirect_https: true\n",
        )
        .replace(
            "  green:\n    algorithm: least_connections\n",
            "  green:\n    algorithm: least_connections\n    protocol: h2\n",
        )
        .replace(
            "    algorithm: weighted_round_robin\n",
            "    algorithm: weighted_round_robin\n    protocol: h2c\n    tls: {server_name: \"a b\"}\n",
        );
    assert_eq!(
        problems(&yaml),
        vec![
            "listeners[0].h2c: applies to plain listeners; a TLS listener offers HTTP/2 over ALPN (http2)",
            "listeners[0].redirect_https: applies to plain listeners; this one already is https",
            "listeners[0].tls.certificates: at least one certificate is required: [{cert: FILE, key: FILE}]",
            "listeners[0].tls.min_version: \"1.1\" is not a TLS version this listener offers; use \"1.2\" or \"1.3\"",
            "listeners[0].tls.hsts.max_age: 86400000 s is over the limit of 63072000 s (two years)",
            "listeners[0].tls.hsts.preload: the preload list requires include_subdomains: true and max_age of at least 365d",
            "listeners[1].http2: applies to TLS listeners (ALPN h2); for cleartext HTTP/2 by prior knowledge set h2c: true",
            "listeners[1].h2c: a listener with redirect_https answers every request with a redirect; it has nothing to serve over h2c",
            "upstreams.blue.tls: h2c is cleartext HTTP/2; for HTTP/2 over TLS use protocol: h2",
            "upstreams.blue.tls.server_name: \"a b\" is not a DNS name or IP address",
            "upstreams.green.protocol: h2 is HTTP/2 over TLS and needs tls: {...} (ca_file, server_name); for cleartext HTTP/2 use h2c",
        ]
    );
}
