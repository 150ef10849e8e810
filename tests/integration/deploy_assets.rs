//! The operator's assets under `deploy/`, each checked by the tool that consumes it: promtool
//! on the alert rules and their unit tests, a real Prometheus scraping a real Switchyard for
//! every Grafana panel query and alert expression, `systemd-analyze verify` on the unit,
//! `check` on the example config, and the Debian package installed with dpkg, run, and purged.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fixtures::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs a command to completion: whether it succeeded, and stdout followed by stderr.
fn output(command: &mut Command) -> (bool, String) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn must_succeed(command: &mut Command) -> String {
    let described = format!("{command:?}");
    let (ok, text) = output(command);
    assert!(ok, "{described} failed:\n{text}");
    text
}

/// Every `switchyard_…` metric name an expression names (a histogram's `_bucket` included).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut names = BTreeSet::new();
    let mut at = 0;
    while let Some(found) = expr[at..].find("switchyard_") {
        let start = at + found;
        let mut end = start;
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        // Only a token of its own, not the tail of a longer identifier.
        if start == 0 || !word(bytes[start - 1]) {
            names.insert(expr[start..end].to_string());
        }
        at = end;
    }
    names
}

#[test]
fn metric_names_are_found_whole_and_only_whole() {
    let names = metric_names(
        "histogram_quantile(0.9, sum by (le) (rate(switchyard_request_duration_seconds_bucket{route=~\"$route\"}[1m]))) / on() xswitchyard_nothing + switchyard_up",
    );
    let want: BTreeSet<String> = [
        "switchyard_request_duration_seconds_bucket",
        "switchyard_up",
    ]
    .map(String::from)
    .into();
    assert_eq!(names, want);
}

// ---------------------------------------------------------------- promtool

fn yaml(path: &Path) -> serde_yaml::Value {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The alerting rules of the rules file: name -> the rule.
fn alert_rules() -> BTreeMap<String, serde_yaml::Value> {
    let rules = yaml(&repo().join("deploy/prometheus/switchyard.rules.yml"));
    let mut alerts = BTreeMap::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            if let Some(name) = rule["alert"].as_str() {
                assert!(
                    alerts.insert(name.to_string(), rule.clone()).is_none(),
                    "alert {name} defined twice"
                );
            }
        }
    }
    alerts
}

#[test]
fn promtool_accepts_the_rules_and_the_unit_tests_cover_every_alert_firing_and_not() {
    let dir = repo().join("deploy/prometheus");
    let promtool = program("promtool", "prometheus");
    for args in [
        ["check", "rules", "switchyard.rules.yml"],
        ["test", "rules", "switchyard.rules.test.yml"],
        ["check", "config", "prometheus.yml"],
    ] {
        must_succeed(Command::new(&promtool).args(args).current_dir(&dir));
    }

    let alerts = alert_rules();
    for (name, rule) in &alerts {
        assert!(
            rule["labels"]["severity"].as_str().is_some(),
            "{name}: no severity label"
        );
        for annotation in ["summary", "description"] {
            assert!(
                rule["annotations"][annotation]
                    .as_str()
                    .is_some_and(|t| t.len() > 20),
                "{name}: no {annotation} annotation"
            );
        }
    }
    // promtool passes a test file that forgets an alert: every alert needs a case where it
    // fires and one where it is expected silent.
    let tests = yaml(&dir.join("switchyard.rules.test.yml"));
    let (mut firing, mut silent) = (BTreeSet::new(), BTreeSet::new());
    for test in tests["tests"].as_sequence().expect("tests") {
        for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            let expected = case["exp_alerts"].as_sequence().map_or(0, Vec::len);
            if expected > 0 {
                firing.insert(name);
            } else {
                silent.insert(name);
            }
        }
    }
    for name in alerts.keys() {
        assert!(firing.contains(name), "no unit test where {name} fires");
        assert!(
            silent.contains(name),
            "no unit test where {name} stays silent"
        );
    }
    let unknown: Vec<_> = firing
        .union(&silent)
        .filter(|n| !alerts.contains_key(*n))
        .collect();
    assert!(
        unknown.is_empty(),
        "tests of alerts that do not exist: {unknown:?}"
    );
}

// ---------------------------------------------------------------- systemd

/// `systemd-analyze verify UNIT`: whether it exited 0, and the lines it printed about the
/// unit (unknown keys it ignores, commands that are not executable, bad values).
fn verify_unit(unit: &Path) -> (bool, Vec<String>) {
    let name = unit
        .file_name()
        .and_then(|n| n.to_str())
        .expect("unit name")
        .to_string();
    let (ok, text) = output(
        Command::new(program("systemd-analyze", "systemd"))
            .arg("verify")
            .arg(unit),
    );
    let about: Vec<String> = text
        .lines()
        .filter(|l| l.contains(&name))
        .map(String::from)
        .collect();
    (ok, about)
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = read(&repo().join("deploy/switchyard.service"));
    for line in [
        "Type=notify",
        "NotifyAccess=all",
        "User=switchyard",
        "ExecStart=/usr/bin/switchyard run --config ${CONFIG}",
        "ExecReload=/usr/lib/switchyard/upgrade.sh ${CONFIG} $MAINPID /usr/bin/switchyard",
        "RuntimeDirectory=switchyard",
        "StateDirectory=switchyard",
        "LogsDirectory=switchyard",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "LimitNOFILE=1048576",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "deploy/switchyard.service has no line {line}"
        );
    }
    // verify resolves ExecStart and friends: a copy pointing at this build and this tree's
    // upgrade.sh (the .deb test verifies the unit at its installed paths).
    let upgrade = repo().join("deploy/upgrade.sh");
    let copy = |text: &str| {
        let path = temp_path("switchyard.service");
        let text = text.replace("/usr/bin/switchyard", BINARY).replace(
            "/usr/lib/switchyard/upgrade.sh",
            &upgrade.display().to_string(),
        );
        std::fs::write(&path, text).expect("write unit");
        path
    };
    let (ok, problems) = verify_unit(&copy(&unit));
    assert!(
        ok && problems.is_empty(),
        "systemd-analyze verify: {problems:#?}"
    );

    // The check catches what it is there for: a key this systemd ignores, a missing binary.
    let unknown_key = unit.replace("[Service]\n", "[Service]\nTimeoutReloadSec=150\n");
    let (_, problems) = verify_unit(&copy(&unknown_key));
    assert!(
        problems.iter().any(|l| l.contains("TimeoutReloadSec")),
        "an unknown key went unnoticed: {problems:?}"
    );
    let missing_binary = unit.replace(
        "ExecStart=/usr/bin/switchyard",
        "ExecStart=/nonexistent/switchyard",
    );
    let (ok, problems) = verify_unit(&copy(&missing_binary));
    assert!(
        !ok && problems
            .iter()
            .any(|l| l.contains("/nonexistent/switchyard")),
        "a missing ExecStart binary went unnoticed: {problems:?}"
    );
}

// ---------------------------------------------------------------- the example config

#[test]
fn the_example_config_has_the_production_shape_and_passes_check() {
    let path = repo().join("examples/switchyard.yaml");
    let text = read(&path);
    let config: serde_yaml::Value = serde_yaml::from_str(&text).expect("example YAML");
    assert_eq!(config["admin"]["address"].as_str(), Some("127.0.0.1:9000"));
    assert_eq!(
        config["admin"]["token_file"].as_str(),
        Some("/etc/switchyard/admin.token")
    );
    assert_eq!(
        config["metrics"]["address"].as_str(),
        Some("127.0.0.1:9210")
    );
    assert!(config["state_file"]
        .as_str()
        .is_some_and(|p| p.starts_with("/var/lib/switchyard/")));
    assert!(config["server"]["grace_period"].as_str().is_some());
    let upstreams = config["upstreams"].as_mapping().expect("upstreams");
    assert!(upstreams.values().all(|u| u["health_check"].is_mapping()));
    assert!(
        config["routes"]
            .as_sequence()
            .expect("routes")
            .iter()
            .any(|r| r["split"].as_mapping().is_some_and(|s| s.len() >= 2)),
        "no canary split"
    );
    assert_eq!(
        config["access_log"]["path"].as_str(),
        Some("/var/log/switchyard/access.log"),
        "the example's access log"
    );

    // `check` reads the token file: the .deb makes /etc/switchyard/admin.token, here a copy
    // names one of its own.
    let token = temp_path("admin.token");
    std::fs::write(&token, "example-token\n").expect("token");
    let copy = token.with_file_name("switchyard.yaml");
    // The access log's directory too (`check` wants it to exist; the .deb makes it).
    let logs = token.parent().expect("temp dir").display().to_string();
    let text = text
        .replace("/etc/switchyard/admin.token", &token.display().to_string())
        .replace("/var/log/switchyard/", &format!("{logs}/"));
    std::fs::write(&copy, text).expect("config copy");
    let (code, out, err) = run_binary(&["check", "--config", &copy.display().to_string()]);
    assert_eq!(code, 0, "check of the example: {out}{err}");
}

// ---------------------------------------------------------------- a real Prometheus

/// `application/x-www-form-urlencoded` value.
fn form_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus on 127.0.0.1 with a storage dir of its own, killed when dropped.
struct Prometheus {
    addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl Prometheus {
    /// Runs deploy/prometheus/prometheus.yml (and the rules beside it), with its target
    /// replaced by `metrics` and every interval by 1 s.
    fn start(metrics: SocketAddr) -> Prometheus {
        let dir = temp_path("prometheus");
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let shipped = read(&repo().join("deploy/prometheus/prometheus.yml"));
        assert!(shipped.contains("127.0.0.1:9210") && shipped.contains("15s"));
        let config = shipped
            .replace("127.0.0.1:9210", &metrics.to_string())
            .replace("15s", "1s");
        std::fs::write(dir.join("prometheus.yml"), config).expect("prometheus.yml");
        std::fs::copy(
            repo().join("deploy/prometheus/switchyard.rules.yml"),
            dir.join("switchyard.rules.yml"),
        )
        .expect("rules");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = dir.join("prometheus.log");
        let file = std::fs::File::create(&log).expect("prometheus log");
        let child = Command::new(program("prometheus", "prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("start prometheus (make test-deps installs the Debian package prometheus)");
        let mut prometheus = Prometheus { addr, child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = block_on(send(addr, "GET", "/-/ready", &[], None)) {
                if r.status == 200 {
                    break;
                }
            }
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                panic!(
                    "prometheus exited with {status}:\n{}",
                    read(&prometheus.log)
                );
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                read(&prometheus.log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        prometheus
    }

    /// An API GET; the `data` of a `success` answer, or what went wrong.
    fn get(&self, path: &str) -> Result<Value, String> {
        let r = block_on(send(self.addr, "GET", path, &[], None)).map_err(|e| e.to_string())?;
        Self::data(r)
    }

    /// An instant query at the current time: the result vector.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let body = format!("query={}", form_encode(expr));
        let r = block_on(send(
            self.addr,
            "POST",
            "/api/v1/query",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            Some(body.as_bytes()),
        ))
        .map_err(|e| e.to_string())?;
        let data = Self::data(r)?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    fn data(r: Response) -> Result<Value, String> {
        let answer: Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("{} {e}: {}", r.status, r.text()))?;
        if r.status == 200 && answer["status"] == "success" {
            Ok(answer["data"].clone())
        } else {
            Err(format!("{}: {}", r.status, r.text()))
        }
    }

    /// The first sample's value of a query, if it has one.
    fn value(&self, expr: &str) -> Option<f64> {
        let result = self.query(expr).ok()?;
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Grafana's variables in `expr` replaced by `values` (`$name`, `${name}`, `${name:format}`,
/// `[[name]]`); an unknown one panics, so a new variable cannot go untested.
fn substitute(expr: &str, values: &BTreeMap<&str, String>) -> String {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let lookup = |name: &str| {
        values
            .get(name)
            .unwrap_or_else(|| panic!("unknown Grafana variable ${name} in {expr}"))
            .clone()
    };
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find(['$', '[']) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(inner) = tail.strip_prefix("${") {
            let end = inner.find('}').expect("unclosed ${");
            let name = inner[..end].split(':').next().unwrap_or_default();
            out.push_str(&lookup(name));
            rest = &inner[end + 1..];
        } else if let Some(inner) = tail.strip_prefix("[[") {
            let end = inner.find("]]").expect("unclosed [[");
            out.push_str(&lookup(inner[..end].split(':').next().unwrap_or_default()));
            rest = &inner[end + 2..];
        } else if let Some(inner) = tail.strip_prefix('$') {
            let end = inner.find(|c: char| !ident(c)).unwrap_or(inner.len());
            if end == 0 {
                out.push('$');
            } else {
                out.push_str(&lookup(&inner[..end]));
            }
            rest = &inner[end..];
        } else {
            out.push('[');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

#[test]
fn grafana_variables_are_substituted_in_every_form() {
    let values: BTreeMap<&str, String> = [("route", "web"), ("__rate_interval", "1m")]
        .map(|(k, v)| (k, v.to_string()))
        .into();
    assert_eq!(
        substitute(
            "rate(x{route=~\"$route\",r=\"${route}\",q=\"${route:regex}\",o=\"[[route]]\"}[$__rate_interval])[5m:]",
            &values
        ),
        "rate(x{route=~\"web\",r=\"web\",q=\"web\",o=\"web\"}[1m])[5m:]"
    );
}

/// Every (panel title, expression) of a dashboard, rows and nested panels included.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(value: &Value, title: &str, out: &mut Vec<(String, String)>) {
        match value {
            Value::Object(map) => {
                let title = map.get("title").and_then(Value::as_str).unwrap_or(title);
                if let Some(expr) = map.get("expr").and_then(Value::as_str) {
                    out.push((title.to_string(), expr.to_string()));
                }
                for (key, v) in map {
                    // Variable queries are Grafana's, not PromQL: checked on their own.
                    if key != "templating" {
                        walk(v, title, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, title, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], "", &mut out);
    out
}

/// The dashboard is importable as it is: its data source is a variable every query uses.
fn check_dashboard_shape(dashboard: &Value) {
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 39));
    assert_eq!(dashboard["uid"], "switchyard");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let variable = |name: &str| variables.iter().find(|v| v["name"] == name);
    assert_eq!(
        variable("datasource").map(|v| (&v["type"], &v["query"])),
        Some((&Value::from("datasource"), &Value::from("prometheus")))
    );
    for name in ["instance", "route", "upstream"] {
        assert!(variable(name).is_some(), "no variable {name}");
    }
    let mut ids = BTreeSet::new();
    fn panels(list: &Value) -> Vec<&Value> {
        let mut out = Vec::new();
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            out.extend(panels(&p["panels"]));
        }
        out
    }
    for panel in panels(&dashboard["panels"]) {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "{title}: id twice"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64(), grid["w"].as_u64());
        assert!(
            x.zip(w).is_some_and(|(x, w)| x + w <= 24),
            "{title}: gridPos {grid}"
        );
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
            for target in panel["targets"].as_array().expect("targets") {
                assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            }
        }
    }
}

#[test]
fn every_dashboard_query_and_alert_expression_works_against_a_real_prometheus() {
    let dashboard: Value =
        serde_json::from_str(&read(&repo().join("deploy/grafana/switchyard.json")))
            .expect("dashboard JSON");
    check_dashboard_shape(&dashboard);

    // Traffic of every kind the panels show: 200s and 500s (blue fails a fifth), the
    // balancer's own 503 (route `closed` has only a weight-0 backend), health checks, a TLS
    // listener (certificate expiry) and a rollout in progress (weight, state, windows).
    let blue = TestBackend::start("blue");
    blue.set_failing_percent(20);
    let green = TestBackend::start("green");
    let spare = TestBackend::start("spare");
    let certs = test_certs();
    let check = "    health_check:\n      type: http\n      path: /healthz\n      interval: 500ms\n      timeout: 200ms\n";
    let yaml = format!(
        "server:\n  threads: 2\n  grace_period: 1s\n  upgrade_socket: {{upgrade_socket}}\nlisteners:\n  - address: {{listen}}\n  - address: 127.0.0.1:{tls}\n    tls:\n      certificates:\n        - cert: {cert}\n          key: {key}\nadmin:\n  address: {{admin}}\nmetrics:\n  address: {{metrics}}\nupstreams:\n  blue:\n    backends:\n      - address: {blue}\n{check}  green:\n    backends:\n      - address: {green}\n{check}  spare:\n    backends:\n      - address: {spare}\n        weight: 0\nroutes:\n  - name: closed\n    host: closed.test\n    split:\n      spare: 1\n  - name: web\n    split:\n      blue: 90\n      green: 10\n",
        tls = free_port(),
        cert = certs.cert.display(),
        key = certs.key.display(),
        blue = blue.addr,
        green = green.addr,
        spare = spare.addr,
    );
    let sy = Switchyard::start(&yaml);
    let r = sy.api(
        "POST",
        "/api/v1/routes/web/rollout",
        Some(r#"{"to": "green", "steps": [50, 100], "step_interval": "1h", "analysis": {"interval": "1s", "min_requests": 1000000}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    for _ in 0..60 {
        let status = get(sy.addr, "/").status;
        assert!(status == 200 || status == 500, "{status}");
    }
    for _ in 0..3 {
        let r = block_on(request_from(
            None,
            sy.addr,
            "GET",
            "/",
            &[("Host", "closed.test")],
        ))
        .expect("request");
        assert_eq!(r.status, 503);
    }

    let prometheus = Prometheus::start(sy.metrics);
    let instance = sy.metrics.to_string();
    // Three scrapes of the job the shipped config names, so that every rate() has samples,
    // and every rule evaluated once.
    let job_scraped = format!(
        "count_over_time(up{{job=\"switchyard\", instance=\"{instance}\"}}[1m]) >= 3 and up == 1"
    );
    let mut rules = Vec::new();
    wait_until(
        "three scrapes and a rule evaluation",
        Duration::from_secs(60),
        || {
            if prometheus.value(&job_scraped).is_none() {
                return false;
            }
            let Ok(data) = prometheus.get("/api/v1/rules") else {
                return false;
            };
            rules = data["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok")
        },
    );
    let names: BTreeSet<String> = prometheus
        .get("/api/v1/label/__name__/values")
        .expect("metric names")
        .as_array()
        .expect("names")
        .iter()
        .filter_map(|n| n.as_str().map(String::from))
        .collect();
    let mut problems = Vec::new();
    let mut checked = 0;
    let mut check = |what: &str, expr: &str, want_data: bool| {
        checked += 1;
        let referenced = metric_names(expr);
        for name in &referenced {
            if !names.contains(name) {
                problems.push(format!("{what}: no metric {name} in Prometheus: {expr}"));
            }
        }
        match prometheus.query(expr) {
            Err(e) => problems.push(format!("{what}: {expr}: {e}")),
            Ok(result) if result.is_empty() && want_data => {
                problems.push(format!("{what}: no data: {expr}"))
            }
            Ok(_) => {}
        }
    };

    // Every panel query, with the variables set to one value each and to All.
    let builtins = [
        ("__rate_interval", "1m"),
        ("__interval", "15s"),
        ("__interval_ms", "15000"),
        ("__range", "5m"),
        ("__range_s", "300"),
    ];
    let one: BTreeMap<&str, String> = builtins
        .into_iter()
        .chain([
            ("instance", instance.as_str()),
            ("route", "web"),
            ("upstream", "blue"),
        ])
        .map(|(k, v)| (k, v.to_string()))
        .collect();
    let all: BTreeMap<&str, String> = builtins
        .into_iter()
        .chain([("instance", ".*"), ("route", ".*"), ("upstream", ".*")])
        .map(|(k, v)| (k, v.to_string()))
        .collect();
    let queries = panel_queries(&dashboard);
    assert!(queries.len() >= 30, "only {} panel queries", queries.len());
    for (title, expr) in &queries {
        check(&format!("panel {title:?}"), &substitute(expr, &one), true);
        check(
            &format!("panel {title:?} (All)"),
            &substitute(expr, &all),
            true,
        );
    }

    // Every alert expression, as Prometheus loaded it from the shipped rules file.
    let alerts = alert_rules();
    let loaded: BTreeSet<String> = rules
        .iter()
        .filter(|r| r["type"] == "alerting")
        .filter_map(|r| r["name"].as_str().map(String::from))
        .collect();
    assert_eq!(loaded, alerts.keys().cloned().collect::<BTreeSet<_>>());
    for rule in &rules {
        let name = rule["name"].as_str().unwrap_or_default();
        check(
            &format!("alert {name}"),
            rule["query"].as_str().expect("query"),
            false,
        );
    }

    // The variables' own queries (`label_values(SELECTOR, LABEL)`) find what the config has.
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let expected = [
        ("instance", vec![instance.as_str()]),
        ("route", vec!["web", "closed"]),
        ("upstream", vec!["blue", "green", "spare"]),
    ];
    for (name, want) in expected {
        let variable = variables
            .iter()
            .find(|v| v["name"] == name)
            .expect("variable");
        let definition = variable["query"]["query"].as_str().expect("variable query");
        let inner = definition
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{name}: {definition} is not label_values(SELECTOR, LABEL)"));
        let (selector, label) = inner
            .rsplit_once(',')
            .expect("label_values(SELECTOR, LABEL)");
        let selector = substitute(selector.trim(), &one);
        let series = prometheus
            .get(&format!(
                "/api/v1/series?match[]={}",
                form_encode(&selector)
            ))
            .unwrap_or_else(|e| panic!("{name}: {selector}: {e}"));
        let values: BTreeSet<&str> = series
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s[label.trim()].as_str())
            .collect();
        for value in want {
            assert!(
                values.contains(value),
                "variable {name} lacks {value}: {values:?}"
            );
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {checked} queries failed:\n{}\nPrometheus has: {names:?}",
        problems.len(),
        problems.join("\n")
    );
}

// ---------------------------------------------------------------- the Debian package

/// An exclusive lock on a file, held until dropped: the .deb test against itself in other
/// test processes (it installs into system paths), nothing else.
struct FileLock(#[allow(dead_code)] std::fs::File);

impl FileLock {
    fn take(path: &Path) -> FileLock {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .expect("lock file");
        // SAFETY: flock on a descriptor this function owns; released when the file closes.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(locked, 0, "flock {}", path.display());
        FileLock(file)
    }
}

/// Written before the test's `dpkg -i`, removed once its package is purged. A run that was
/// killed (SIGKILL, a CI timeout) gets no drop and leaves the package installed, which made
/// every later run refuse to start; the mark tells the next run that the installed package
/// is a test's, not an admin's: it names the SHA-256 of the binary in the test's package
/// (the installed `/usr/bin/switchyard` must still be that one), whether the test made the
/// user, and the PID of the switchyard it started.
const TEST_INSTALL_MARK: &str = "/var/lib/switchyard-test-installed";

/// The mark's `NAME value` line.
fn mark_field<'a>(mark: &'a str, name: &str) -> Option<&'a str> {
    mark.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(str::trim)
}

fn sha256_of(path: &str) -> Option<String> {
    let (ok, text) = output(Command::new("sha256sum").arg(path));
    ok.then(|| text.split_whitespace().next().map(String::from))
        .flatten()
}

/// Undoes what a killed earlier run of the .deb test left: its switchyard process, its
/// package and its user, as its mark names them. A package the mark does not vouch for
/// stays (the test then refuses to run).
fn clean_up_a_killed_run() {
    let Ok(mark) = std::fs::read_to_string(TEST_INSTALL_MARK) else {
        return;
    };
    if let Some(pid) = mark_field(&mark, "pid").and_then(|p| p.parse::<libc::pid_t>().ok()) {
        // Only while that PID still runs the installed binary (" (deleted)" once purged):
        // a PID the kernel has reused since is someone else's.
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe.to_string_lossy().starts_with("/usr/bin/switchyard") {
            // SAFETY: kill(2) on the one PID the mark names, checked just above to be the
            // binary that run started.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            wait_until(
                "the killed run's switchyard to exit",
                Duration::from_secs(10),
                || !Path::new(&format!("/proc/{pid}")).exists(),
            );
        }
    }
    let ours = mark_field(&mark, "sha256").is_some()
        && sha256_of("/usr/bin/switchyard").as_deref() == mark_field(&mark, "sha256");
    let (installed, _) = output(Command::new("dpkg").args(["-s", "switchyard"]));
    if installed && !ours {
        return;
    }
    if installed {
        eprintln!("purging the switchyard package a killed run of this test installed");
        let (ok, text) = output(Command::new("dpkg").args(["--purge", "switchyard"]));
        assert!(ok, "dpkg --purge of a killed run's package: {text}");
    }
    if mark_field(&mark, "user_existed") == Some("false") {
        let _ = Command::new("userdel").arg("switchyard").output();
        let _ = Command::new("groupdel").arg("switchyard").output();
    }
    let _ = std::fs::remove_file(TEST_INSTALL_MARK);
}

/// The installed package: on drop, the process started from it is killed, the package
/// purged, and the `switchyard` user removed if the test made it, so a failed test leaves
/// the machine as it found it.
struct Installed {
    user_existed: bool,
    child: Option<Child>,
    purged: bool,
}

impl Installed {
    /// Marks the install of `deb` as this test's (see [`TEST_INSTALL_MARK`]) before it
    /// happens.
    fn mark(deb: &Path) -> Installed {
        let user_existed = getent("passwd", "switchyard").is_some();
        // The packed binary, as dpkg will install it (build.sh strips it).
        let packed = must_succeed(
            Command::new("sh")
                .args([
                    "-c",
                    "dpkg-deb --fsys-tarfile \"$1\" | tar -xO ./usr/bin/switchyard | sha256sum",
                    "sh",
                ])
                .arg(deb),
        );
        let sha = packed.split_whitespace().next().expect("sha256sum");
        std::fs::write(
            TEST_INSTALL_MARK,
            format!("sha256 {sha}\nuser_existed {user_existed}\n"),
        )
        .expect("the test's install mark");
        Installed {
            user_existed,
            child: None,
            purged: false,
        }
    }

    /// Keeps the started switchyard and names it in the mark.
    fn started(&mut self, child: Child) {
        use std::io::Write;
        let pid = child.id();
        self.child = Some(child);
        let mut mark = std::fs::OpenOptions::new()
            .append(true)
            .open(TEST_INSTALL_MARK)
            .expect("the test's install mark");
        writeln!(mark, "pid {pid}").expect("the test's install mark");
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn purge(&mut self) -> (bool, String) {
        self.stop();
        let (ok, text) = output(Command::new("dpkg").args(["--purge", "switchyard"]));
        self.purged = ok;
        (ok, text)
    }

    fn remove_user(&self) {
        if !self.user_existed {
            let _ = Command::new("userdel").arg("switchyard").output();
            let _ = Command::new("groupdel").arg("switchyard").output();
        }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.purged {
            let _ = self.purge();
        }
        // A package that would not purge keeps its mark: the next run tries again.
        if self.purged {
            self.remove_user();
            let _ = std::fs::remove_file(TEST_INSTALL_MARK);
        }
    }
}

/// `getent passwd|group NAME` fields, if it exists.
fn getent(database: &str, name: &str) -> Option<Vec<String>> {
    let (ok, text) = output(Command::new("getent").args([database, name]));
    ok.then(|| text.trim().split(':').map(String::from).collect())
}

fn as_switchyard(binary: &str) -> Command {
    let mut command = Command::new(program("setpriv", "util-linux"));
    command.args([
        "--reuid=switchyard",
        "--regid=switchyard",
        "--init-groups",
        "--",
        binary,
    ]);
    command
}

#[test]
fn the_debian_package_installs_runs_as_its_user_and_purges() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIPPED the_debian_package_installs_runs_as_its_user_and_purges: dpkg -i needs root (CI runs the tests as root)"
        );
        return;
    }
    let _lock = FileLock::take(&std::env::temp_dir().join("switchyard-deb-test.lock"));
    clean_up_a_killed_run();
    let (installed_before, _) = output(Command::new("dpkg").args(["-s", "switchyard"]));
    assert!(
        !installed_before,
        "a switchyard package is installed on this machine; this test installs and purges its own: remove it first (and {TEST_INSTALL_MARK}, if a killed run of this test left it)"
    );

    let out_dir = temp_path("deb");
    let deb = must_succeed(
        Command::new(repo().join("deploy/deb/build.sh"))
            .args([BINARY, env!("CARGO_PKG_VERSION")])
            .arg(&out_dir)
            // Packing 200 MB of debug build is the slow part; compression is make deb's.
            .env("DEB_COMPRESSION", "none"),
    );
    let deb = PathBuf::from(deb.trim());
    let architecture = must_succeed(Command::new("dpkg").arg("--print-architecture"));
    let fields = must_succeed(Command::new("dpkg-deb").args(["--field"]).arg(&deb).args([
        "Package",
        "Version",
        "Architecture",
        "Depends",
        "Maintainer",
    ]));
    assert!(fields.contains("Package: switchyard\n"), "{fields}");
    assert!(
        fields.contains(&format!("Version: {}\n", env!("CARGO_PKG_VERSION"))),
        "{fields}"
    );
    assert!(
        fields.contains(&format!("Architecture: {}", architecture.trim())),
        "{fields}"
    );
    assert!(fields.contains("libc6 (>= 2."), "{fields}");

    let mut installed = Installed::mark(&deb);
    must_succeed(Command::new("dpkg").arg("-i").arg(&deb));

    // The system user and group.
    let user = getent("passwd", "switchyard").expect("user switchyard");
    let group = getent("group", "switchyard").expect("group switchyard");
    let (uid, gid): (u32, u32) = (
        user[2].parse().expect("uid"),
        group[2].parse().expect("gid"),
    );
    assert!(uid < 1000, "not a system user: {user:?}");
    assert_eq!(user[3], group[2], "primary group: {user:?}");
    assert_eq!(user[5], "/var/lib/switchyard");
    assert_eq!(user[6], "/usr/sbin/nologin");

    // Files, owners and modes.
    for (path, mode, owner, group) in [
        ("/usr/bin/switchyard", 0o755, 0, 0),
        ("/usr/lib/switchyard/upgrade.sh", 0o755, 0, 0),
        ("/lib/systemd/system/switchyard.service", 0o644, 0, 0),
        ("/etc/logrotate.d/switchyard", 0o644, 0, 0),
        ("/etc/switchyard", 0o750, 0, gid),
        ("/etc/switchyard/switchyard.yaml", 0o640, 0, gid),
        ("/etc/switchyard/admin.token", 0o640, 0, gid),
        ("/var/lib/switchyard", 0o750, uid, gid),
        ("/var/log/switchyard", 0o750, uid, gid),
        ("/usr/share/switchyard/grafana/switchyard.json", 0o644, 0, 0),
        (
            "/usr/share/switchyard/prometheus/switchyard.rules.yml",
            0o644,
            0,
            0,
        ),
        ("/usr/share/doc/switchyard/copyright", 0o644, 0, 0),
        ("/usr/share/man/man1/switchyard.1.gz", 0o644, 0, 0),
        (
            "/usr/share/bash-completion/completions/switchyard",
            0o644,
            0,
            0,
        ),
    ] {
        let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid(), meta.gid()),
            (mode, owner, group),
            "{path}: mode, owner, group"
        );
    }
    assert_eq!(
        read(Path::new("/etc/switchyard/switchyard.yaml")),
        read(&repo().join("examples/switchyard.yaml"))
    );
    assert_eq!(
        read(Path::new("/lib/systemd/system/switchyard.service")),
        read(&repo().join("deploy/switchyard.service"))
    );
    let token = read(Path::new("/etc/switchyard/admin.token"));
    let token = token.trim();
    assert!(
        token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "admin token {token:?}"
    );
    let conffiles =
        must_succeed(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "switchyard"]));
    for conffile in [
        "/etc/switchyard/switchyard.yaml",
        "/etc/logrotate.d/switchyard",
    ] {
        assert!(
            conffiles.contains(conffile),
            "not a conffile: {conffile}: {conffiles}"
        );
    }
    let wants = Path::new("/etc/systemd/system/multi-user.target.wants/switchyard.service");
    assert_eq!(
        std::fs::read_link(wants).ok(),
        Some(PathBuf::from("/lib/systemd/system/switchyard.service")),
        "the unit is not enabled"
    );

    // The unit at its installed paths, logrotate's snippet, the installed config.
    let (ok, problems) = verify_unit(Path::new("/lib/systemd/system/switchyard.service"));
    assert!(
        ok && problems.is_empty(),
        "systemd-analyze verify: {problems:#?}"
    );
    must_succeed(
        Command::new(program("logrotate", "logrotate")).args(["-d", "/etc/logrotate.d/switchyard"]),
    );
    let checked = must_succeed(as_switchyard("/usr/bin/switchyard").args([
        "check",
        "--config",
        "/etc/switchyard/switchyard.yaml",
    ]));
    assert!(checked.contains(": ok"), "{checked}");

    // The installed binary, as its user (no systemd here to start the unit), with the
    // installed token and the state file in the package's state directory.
    let backend = TestBackend::start("app");
    let dir = temp_path("installed");
    std::fs::create_dir_all(&dir).expect("dir");
    let run = dir.join("run");
    std::fs::create_dir(&run).expect("run dir");
    std::os::unix::fs::chown(&run, Some(uid), Some(gid)).expect("chown run dir");
    std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("chmod run dir");
    let [listen, admin, metrics] = [(); 3].map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())));
    let config = dir.join("switchyard.yaml");
    std::fs::write(
        &config,
        format!(
            "server:\n  threads: 1\n  grace_period: 1s\n  max_connections: 1000\n  upgrade_socket: {}/upgrade.sock\nlisteners:\n  - address: {listen}\nadmin:\n  address: {admin}\n  token_file: /etc/switchyard/admin.token\nmetrics:\n  address: {metrics}\nstate_file: /var/lib/switchyard/state.json\nupstreams:\n  app:\n    backends:\n      - address: {}\nroutes:\n  - name: web\n    split:\n      app: 1\n",
            run.display(),
            backend.addr
        ),
    )
    .expect("config");
    let log = dir.join("switchyard.log");
    let child = as_switchyard("/usr/bin/switchyard")
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start the installed switchyard");
    let pid = child.id();
    installed.started(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while [listen, admin, metrics]
        .iter()
        .any(|a| std::net::TcpStream::connect(a).is_err())
    {
        if let Some(Ok(Some(status))) = installed.child.as_mut().map(Child::try_wait) {
            panic!(
                "the installed switchyard exited with {status}:\n{}",
                read(&log)
            );
        }
        assert!(Instant::now() < deadline, "not listening:\n{}", read(&log));
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = read(Path::new(&format!("/proc/{pid}/status")));
    let uids = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    assert_eq!(
        uids.split_whitespace().skip(1).collect::<Vec<_>>(),
        vec![uid.to_string(); 4],
        "runs as {uids}"
    );
    let r = get(listen, "/");
    assert_eq!((r.status, r.text()), (200, "app".to_string()));
    assert_eq!(get(admin, "/healthz").status, 200);
    let no_token = block_on(send(admin, "GET", "/api/v1/routes", &[], None)).expect("admin");
    assert_eq!(no_token.status, 401);
    let bearer = format!("Bearer {token}");
    let auth = [("Authorization", bearer.as_str())];
    let routes = block_on(send(admin, "GET", "/api/v1/routes", &auth, None)).expect("admin");
    assert_eq!(routes.status, 200, "{}", routes.text());
    let put = block_on(send(
        admin,
        "PUT",
        "/api/v1/routes/web/split",
        &auth,
        Some(br#"{"app": 2}"#),
    ))
    .expect("admin");
    assert_eq!(put.status, 200, "{}", put.text());
    let state = std::fs::metadata("/var/lib/switchyard/state.json").expect("state file written");
    assert_eq!((state.uid(), state.gid()), (uid, gid));
    assert!(get(metrics, "/metrics")
        .text()
        .contains("switchyard_build_info"));
    // SAFETY: kill on the PID of a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    let mut child = installed.child.take().expect("child");
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running after SIGTERM:\n{}",
            read(&log)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(exit.code(), Some(0), "{}", read(&log));

    // Purge: everything the package and the service made goes, the user stays (Debian).
    let (ok, text) = installed.purge();
    assert!(ok, "dpkg --purge: {text}");
    for path in [
        "/usr/bin/switchyard",
        "/usr/lib/switchyard",
        "/lib/systemd/system/switchyard.service",
        "/etc/switchyard",
        "/etc/logrotate.d/switchyard",
        "/var/lib/switchyard",
        "/var/log/switchyard",
        "/etc/systemd/system/switchyard.service",
        "/etc/systemd/system/multi-user.target.wants/switchyard.service",
        "/usr/share/switchyard",
    ] {
        assert!(
            std::fs::symlink_metadata(path).is_err(),
            "{path} is left after purge"
        );
    }
    assert!(
        getent("passwd", "switchyard").is_some(),
        "purge removed the user"
    );
}
