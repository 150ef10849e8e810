//! What the commands that talk to a running instance print for a person: the admin API's JSON as plain text tables
//! with aligned columns (scripts take `--json`). Rendering reads the JSON loosely: a field that
//! is missing or `null` shows as `-`, so an older or newer server still gives a readable page.

use serde_json::Value;

/// How many of a rollout's analysis windows `rollout status` shows: the newest ones.
const WINDOWS_SHOWN: usize = 10;

/// Columns padded to their widest cell, two spaces apart; no trailing spaces.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// A row; missing cells at the end are blank, extra ones are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        fn cell(row: &[String], i: usize) -> &str {
            row.get(i).map(String::as_str).unwrap_or("")
        }
        let columns = self.header.len();
        let widths: Vec<usize> = (0..columns)
            .map(|i| {
                std::iter::once(&self.header)
                    .chain(&self.rows)
                    .map(|row| cell(row, i).chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let text = cell(row, i);
                line.push_str(text);
                if i + 1 < columns {
                    let pad = width - text.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `switchyard status`: routes, rollouts (when the server has the endpoint), upstreams, and
/// a shared state store's instances.
pub fn status(
    routes: &Value,
    rollouts: Option<&Value>,
    upstreams: &Value,
    store: Option<&Value>,
) -> String {
    let mut sections = vec![format!("Routes\n{}", routes_table(routes).render())];
    if let Some(rollouts) = rollouts {
        let rollouts = items(rollouts);
        sections.push(if rollouts.is_empty() {
            "Rollouts\nnone\n".to_string()
        } else {
            format!("Rollouts\n{}", rollouts_table(rollouts).render())
        });
    }
    sections.push(format!(
        "Upstreams\n{}",
        upstreams_table(upstreams).render()
    ));
    if let Some(store) = store.filter(|s| s["shared"] == true) {
        let mut table = Table::new(&["INSTANCE", "PID", "REVISION", "DRIVER"]);
        for instance in items(&store["instances"]) {
            table.row(vec![
                text(instance, "name"),
                text(instance, "pid"),
                text(instance, "revision"),
                text(instance, "driver"),
            ]);
        }
        let up = if store["up"] == true { "up" } else { "DOWN" };
        sections.push(format!(
            "State store {} ({up}), this instance {} at revision {}\n{}",
            text(store, "name"),
            text(store, "instance"),
            text(store, "revision"),
            table.render()
        ));
    }
    sections.join("\n")
}

/// Routes as `status` shows them (`split` prints the one it changed).
pub fn routes(routes: &[Value]) -> String {
    routes_rows(routes).render()
}

/// Upstreams with a row per backend, as `status` shows them.
pub fn upstreams(upstreams: &[Value]) -> String {
    upstreams_rows(upstreams).render()
}

/// One backend as `backend ...` answers it.
pub fn backend(upstream: &str, backend: &Value) -> String {
    let mut table = Table::new(&[
        "UPSTREAM",
        "BACKEND",
        "HEALTHY",
        "STATE",
        "WEIGHT",
        "EFFECTIVE_WEIGHT",
        "IN_FLIGHT",
    ]);
    table.row(vec![
        upstream.to_string(),
        text(backend, "address"),
        text(backend, "healthy"),
        text(backend, "state"),
        text(backend, "weight"),
        text(backend, "effective_weight"),
        text(backend, "in_flight"),
    ]);
    table.render()
}

/// `reload`'s answer: done, and what it could not apply or dropped.
pub fn reload(answer: &Value) -> String {
    let mut out = String::from(
        "config reloaded
",
    );
    for (field, label) in [
        ("needs_restart", "needs a restart or upgrade"),
        ("dropped_state", "runtime state dropped"),
        ("warnings", "warning"),
    ] {
        for line in items(answer.get(field).unwrap_or(&Value::Null)) {
            out.push_str(&format!("{label}: {}\n", plain(line)));
        }
    }
    out
}

/// `events`: one row per event, oldest first.
pub fn events(events: &Value) -> String {
    let events = items(events);
    if events.is_empty() {
        return "no events\n".into();
    }
    let mut table = Table::new(&["ID", "TIME", "SOURCE", "KIND", "MESSAGE"]);
    for event in events {
        table.row(
            ["id", "time", "source", "kind", "message"]
                .iter()
                .map(|field| text(event, field))
                .collect(),
        );
    }
    table.render()
}

/// A titled list of runtime changes (`state show`, `state reset`), or that there are none.
pub fn overrides(title: &str, lines: &[String]) -> String {
    if lines.is_empty() {
        return "no runtime changes: the config file rules\n".into();
    }
    let mut out = format!("{title}:\n");
    for line in lines {
        out.push_str(&format!("  {line}\n"));
    }
    out
}

fn routes_table(routes: &Value) -> Table {
    routes_rows(items(routes))
}

fn routes_rows(routes: &[Value]) -> Table {
    let mut table = Table::new(&["ROUTE", "HOST", "PATH", "MATCH", "STICKY", "SPLIT"]);
    for route in routes {
        table.row(vec![
            text(route, "name"),
            text(route, "host"),
            text(route, "path_prefix"),
            conditions(route.get("match")),
            sticky(route.get("sticky")),
            split(route.get("split")),
        ]);
    }
    table
}

/// `header:x-user-group=beta cookie:group=beta method:GET,HEAD`: a route's `match` on one line,
/// `-` for none.
fn conditions(spec: Option<&Value>) -> String {
    let Some(Value::Object(kinds)) = spec else {
        return "-".into();
    };
    let mut parts = Vec::new();
    for (field, kind) in [
        ("headers", "header"),
        ("cookies", "cookie"),
        ("query", "query"),
    ] {
        if let Some(Value::Object(entries)) = kinds.get(field) {
            parts.extend(
                entries
                    .iter()
                    .map(|(name, value)| format!("{kind}:{name}={}", plain(value))),
            );
        }
    }
    if let Some(Value::Array(methods)) = kinds.get("methods") {
        let methods: Vec<String> = methods.iter().map(plain).collect();
        parts.push(format!("method:{}", methods.join(",")));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

/// `header:x-user-id`, `cookie:switchyard_user (set_cookie)`, `client_ip`; `-` when not sticky.
fn sticky(spec: Option<&Value>) -> String {
    let Some(Value::Object(fields)) = spec else {
        return "-".into();
    };
    let key = ["cookie", "header"]
        .iter()
        .find_map(|kind| Some(format!("{kind}:{}", plain(fields.get(*kind)?))))
        .or_else(|| fields.contains_key("client_ip").then(|| "client_ip".into()))
        .unwrap_or_else(|| "-".into());
    if fields.get("set_cookie") == Some(&Value::Bool(true)) {
        format!("{key} (set_cookie)")
    } else {
        key
    }
}

/// `blue=90 (90%) green=10 (10%)`: the weights as the API has them, and what they come to.
fn split(split: Option<&Value>) -> String {
    let Some(Value::Object(weights)) = split else {
        return "-".into();
    };
    let total: f64 = weights.values().filter_map(Value::as_f64).sum();
    let parts: Vec<String> = weights
        .iter()
        .map(|(upstream, weight)| match weight.as_f64() {
            Some(w) if total > 0.0 => {
                format!(
                    "{upstream}={} ({}%)",
                    decimal(w),
                    decimal(w * 100.0 / total)
                )
            }
            _ => format!("{upstream}={}", plain(weight)),
        })
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

fn rollouts_table(rollouts: &[Value]) -> Table {
    let mut table = Table::new(&[
        "ROUTE",
        "FROM → TO",
        "STATE",
        "STEP",
        "WEIGHT",
        "LAST_VERDICT",
    ]);
    for rollout in rollouts {
        table.row(vec![
            text(rollout, "route"),
            from_to(rollout),
            text(rollout, "state"),
            step(rollout),
            percent(rollout.get("weight")),
            windows(rollout)
                .last()
                .map_or_else(|| "-".into(), |w| text(w, "verdict")),
        ]);
    }
    table
}

fn upstreams_table(upstreams: &Value) -> Table {
    upstreams_rows(items(upstreams))
}

fn upstreams_rows(upstreams: &[Value]) -> Table {
    let mut table = Table::new(&[
        "UPSTREAM",
        "ALGORITHM",
        "BACKEND",
        "HEALTHY",
        "STATE",
        "WEIGHT",
        "IN_FLIGHT",
    ]);
    for upstream in upstreams {
        let name = text(upstream, "name");
        let algorithm = text(upstream, "algorithm");
        let backends = upstream
            .get("backends")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if backends.is_empty() {
            table.row(vec![
                name.clone(),
                algorithm.clone(),
                "(no backends)".into(),
            ]);
        }
        for backend in backends {
            table.row(vec![
                name.clone(),
                algorithm.clone(),
                text(backend, "address"),
                text(backend, "healthy"),
                text(backend, "state"),
                text(backend, "weight"),
                text(backend, "in_flight"),
            ]);
        }
    }
    table
}

/// One rollout's status (`rollout status`, and the answer to start, pause, resume, promote
/// and abort): a header block, then its newest analysis windows.
pub fn rollout(status: &Value) -> String {
    let mut lines = vec![
        ("route", text(status, "route")),
        ("rollout", from_to(status)),
        ("state", text(status, "state")),
        ("step", step(status)),
        ("weight", percent(status.get("weight"))),
    ];
    if let Some(steps) = status.get("steps").and_then(Value::as_array) {
        let steps: Vec<String> = steps.iter().map(step_spec).collect();
        lines.push(("steps", steps.join(", ")));
    }
    match status.get("reason") {
        None | Some(Value::Null) => {}
        Some(Value::String(r)) if r.is_empty() => {}
        Some(_) => lines.push(("reason", text(status, "reason"))),
    }
    lines.push(("started", text(status, "started_at")));
    lines.push(("updated", text(status, "updated_at")));
    let mut out: String = lines
        .iter()
        .map(|(label, value)| format!("{:<9}{value}\n", format!("{label}:")))
        .collect();
    out.push('\n');
    let windows = windows(status);
    if windows.is_empty() {
        out.push_str("no analysis windows yet\n");
        return out;
    }
    let newest = &windows[windows.len().saturating_sub(WINDOWS_SHOWN)..];
    out.push_str(&format!(
        "analysis windows (newest {} of {}):\n",
        newest.len(),
        windows.len()
    ));
    let mut table = Table::new(&[
        "AT",
        "REQUESTS",
        "ERRORS",
        "ERROR_RATE",
        "P99_MS",
        "BASELINE_P99_MS",
        "VERDICT",
    ]);
    for window in newest {
        table.row(
            [
                "at",
                "requests",
                "errors",
                "error_rate",
                "p99_ms",
                "baseline_p99_ms",
                "verdict",
            ]
            .iter()
            .map(|field| text(window, field))
            .collect(),
        );
    }
    out.push_str(&table.render());
    out
}

fn from_to(rollout: &Value) -> String {
    format!("{} → {}", text(rollout, "from"), text(rollout, "to"))
}

/// `2/5`: the step as the API numbers it, of how many there are.
fn step(rollout: &Value) -> String {
    let step = text(rollout, "step");
    match rollout.get("steps").and_then(Value::as_array) {
        Some(steps) => format!("{step}/{}", steps.len()),
        None => step,
    }
}

/// A step as the start body spells it: `25`, `50 (pause 2m)`, `match (pause 5m)`.
fn step_spec(step: &Value) -> String {
    let Value::Object(fields) = step else {
        return plain(step);
    };
    let what = match (fields.get("weight"), fields.get("match")) {
        (_, Some(_)) => "match".to_string(),
        (Some(weight), None) => plain(weight),
        (None, None) => step.to_string(),
    };
    match fields.get("pause") {
        Some(pause) => format!("{what} (pause {})", plain(pause)),
        None => what,
    }
}

fn windows(rollout: &Value) -> &[Value] {
    rollout
        .get("windows")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The elements of a JSON array; anything else is none.
fn items(list: &Value) -> &[Value] {
    list.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// A field for a cell: `-` when missing or null.
fn text(object: &Value, field: &str) -> String {
    object.get(field).map_or_else(|| "-".into(), plain)
}

fn plain(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_f64().map_or_else(|| n.to_string(), decimal),
        other => other.to_string(),
    }
}

fn percent(value: Option<&Value>) -> String {
    match value.and_then(Value::as_f64) {
        Some(p) => format!("{}%", decimal(p)),
        None => "-".into(),
    }
}

/// At most four decimals, without trailing zeros: `5`, `0.5`, `33.3333`, `0.0125`.
fn decimal(x: f64) -> String {
    let text = format!("{x:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    match text {
        "-0" => "0".into(),
        text => text.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn columns_line_up_without_trailing_spaces() {
        let mut table = Table::new(&["NAME", "WEIGHT", "NOTE"]);
        table.row(vec!["blue".into(), "1".into(), "".into()]);
        table.row(vec!["green-canary".into(), "10000".into(), "→ new".into()]);
        table.row(vec!["short".into()]);
        assert_eq!(
            table.render(),
            "NAME          WEIGHT  NOTE\n\
             blue          1\n\
             green-canary  10000   → new\n\
             short\n"
        );
    }

    #[test]
    fn events_backends_and_reloads_read_as_lines() {
        let events = json!([
            {"id": 7, "time": "2026-12-01T10:00:00.123Z", "source": "api", "kind": "backend_changed",
             "message": "upstream blue backend 127.0.0.1:9001 set to weight 1 draining (was weight 1 active)"},
            {"id": 8, "time": "2026-12-01T10:00:01.000Z", "source": "reload", "kind": "reloaded", "message": "config reloaded: no route or upstream changed"}
        ]);
        assert_eq!(
            super::events(&events),
            "ID  TIME                      SOURCE  KIND             MESSAGE\n\
             7   2026-12-01T10:00:00.123Z  api     backend_changed  upstream blue backend 127.0.0.1:9001 set to weight 1 draining (was weight 1 active)\n\
             8   2026-12-01T10:00:01.000Z  reload  reloaded         config reloaded: no route or upstream changed\n"
        );
        assert_eq!(super::events(&json!([])), "no events\n");
        let b = json!({"address": "127.0.0.1:9001", "weight": 5, "effective_weight": 5, "healthy": true, "state": "draining", "in_flight": 0});
        assert_eq!(
            backend("blue", &b),
            "UPSTREAM  BACKEND         HEALTHY  STATE     WEIGHT  EFFECTIVE_WEIGHT  IN_FLIGHT\n\
             blue      127.0.0.1:9001  true     draining  5       5                 0\n"
        );
        assert_eq!(
            reload(&json!({"reloaded": true, "needs_restart": ["server.threads: changed in the file; needs restart or upgrade"], "dropped_state": [], "warnings": []})),
            "config reloaded\nneeds a restart or upgrade: server.threads: changed in the file; needs restart or upgrade\n"
        );
        assert_eq!(
            overrides("x", &[]),
            "no runtime changes: the config file rules\n"
        );
        assert_eq!(
            overrides("dropped", &["route web split blue 1".into()]),
            "dropped:\n  route web split blue 1\n"
        );
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(decimal(5.0), "5");
        assert_eq!(decimal(0.5), "0.5");
        assert_eq!(decimal(100.0 / 3.0), "33.3333");
        assert_eq!(decimal(0.0125), "0.0125");
        assert_eq!(decimal(-0.00001), "0");
    }

    #[test]
    fn status_shows_routes_rollouts_and_every_backend() {
        let routes = json!([
            {"name": "web", "host": null, "path_prefix": "/", "match": {}, "sticky": {"cookie": "switchyard_user", "set_cookie": true}, "split": {"blue": 9500, "green": 500}},
            {"name": "api", "host": "api.example.com", "path_prefix": null, "split": {"blue": 1}},
            {"name": "beta", "host": null, "path_prefix": null, "sticky": {"client_ip": true, "set_cookie": false},
             "match": {"headers": {"x-user-group": "beta"}, "cookies": {"group": "*"}, "methods": ["GET", "HEAD"]}, "split": {"green": 1}}
        ]);
        let rollouts = json!([{
            "route": "web", "from": "blue", "to": "green", "state": "progressing",
            "step": 2, "weight": 5, "steps": [1, 5, 25, 50, 100],
            "windows": [{"verdict": "inconclusive"}, {"verdict": "passed"}]
        }]);
        let upstreams = json!([
            {"name": "blue", "algorithm": "round_robin", "backends": [
                {"address": "127.0.0.1:9001", "weight": 1, "healthy": true, "state": "active", "in_flight": 0},
                {"address": "127.0.0.1:9003", "weight": 5, "healthy": false, "state": "draining", "in_flight": 12}
            ]},
            {"name": "green", "algorithm": "least_conn", "backends": []}
        ]);
        assert_eq!(
            status(&routes, Some(&rollouts), &upstreams, None),
            "Routes\n\
             ROUTE  HOST             PATH  MATCH                                                    STICKY                               SPLIT\n\
             web    -                /     -                                                        cookie:switchyard_user (set_cookie)  blue=9500 (95%) green=500 (5%)\n\
             api    api.example.com  -     -                                                        -                                    blue=1 (100%)\n\
             beta   -                -     header:x-user-group=beta cookie:group=* method:GET,HEAD  client_ip                            green=1 (100%)\n\
             \n\
             Rollouts\n\
             ROUTE  FROM → TO     STATE        STEP  WEIGHT  LAST_VERDICT\n\
             web    blue → green  progressing  2/5   5%      passed\n\
             \n\
             Upstreams\n\
             UPSTREAM  ALGORITHM    BACKEND         HEALTHY  STATE     WEIGHT  IN_FLIGHT\n\
             blue      round_robin  127.0.0.1:9001  true     active    1       0\n\
             blue      round_robin  127.0.0.1:9003  false    draining  5       12\n\
             green     least_conn   (no backends)\n"
        );
    }

    #[test]
    fn status_without_the_rollouts_endpoint_has_no_rollouts_section() {
        let text = status(&json!([]), None, &json!([]), None);
        assert_eq!(text, "Routes\nROUTE  HOST  PATH  MATCH  STICKY  SPLIT\n\nUpstreams\nUPSTREAM  ALGORITHM  BACKEND  HEALTHY  STATE  WEIGHT  IN_FLIGHT\n");
        assert!(status(&json!([]), Some(&json!([])), &json!([]), None).contains("Rollouts\nnone\n"));
        // A shared store: its instances, which one drives.
        let store = json!({"shared": true, "name": "etcd http://a:2379 /p", "up": true, "instance": "lb-1", "revision": 7,
            "instances": [{"name": "lb-1", "pid": 10, "revision": 7, "driver": true}, {"name": "lb-2", "pid": 11, "revision": 6, "driver": false}]});
        let shown = status(&json!([]), None, &json!([]), Some(&store));
        assert!(
            shown.contains(
                "State store etcd http://a:2379 /p (up), this instance lb-1 at revision 7"
            ),
            "{shown}"
        );
        assert!(shown.contains("lb-2"), "{shown}");
        // One node: nothing about a store.
        let single = json!({"shared": false, "kind": "file"});
        assert!(!status(&json!([]), None, &json!([]), Some(&single)).contains("State store"));
    }

    #[test]
    fn a_rollout_shows_its_header_and_newest_windows() {
        let windows: Vec<Value> = (0..12)
            .map(|i| {
                json!({
                    "at": format!("2026-12-01T10:{i:02}:00Z"), "requests": 100 + i, "errors": i % 3,
                    "error_rate": f64::from(i % 3) / f64::from(100 + i),
                    "p99_ms": 40 + i, "baseline_p99_ms": null,
                    "verdict": if i == 11 { "failed" } else { "passed" }
                })
            })
            .collect();
        let status = json!({
            "route": "web", "from": "blue", "to": "green", "state": "rolled_back",
            "step": 3, "weight": 0, "steps": [1, {"weight": 5, "pause": "2m"},
                {"match": {"headers": {"X-User-Group": "beta"}}, "pause": "5m"}, 100],
            "reason": "window at 10:11: error rate 0.0182 > max_error_rate 0.01",
            "started_at": "2026-12-01T10:00:00Z", "updated_at": "2026-12-01T10:11:00Z",
            "windows": windows
        });
        let text = rollout(&status);
        let want_head = "\
route:   web
rollout: blue → green
state:   rolled_back
step:    3/4
weight:  0%
steps:   1, 5 (pause 2m), match (pause 5m), 100
reason:  window at 10:11: error rate 0.0182 > max_error_rate 0.01
started: 2026-12-01T10:00:00Z
updated: 2026-12-01T10:11:00Z

analysis windows (newest 10 of 12):
AT                    REQUESTS  ERRORS  ERROR_RATE  P99_MS  BASELINE_P99_MS  VERDICT
2026-12-01T10:02:00Z  102       2       0.0196      42      -                passed
";
        assert!(text.starts_with(want_head), "{text}");
        assert!(text.ends_with(
            "2026-12-01T10:11:00Z  111       2       0.018       51      -                failed\n"
        ), "{text}");
        assert_eq!(text.lines().count(), want_head.lines().count() + 9);
    }

    #[test]
    fn a_sparse_rollout_still_reads() {
        let text = rollout(
            &json!({"route": "web", "to": "green", "state": "progressing", "reason": null}),
        );
        assert_eq!(
            text,
            "route:   web\nrollout: - → green\nstate:   progressing\nstep:    -\nweight:  -\n\
             started: -\nupdated: -\n\nno analysis windows yet\n"
        );
    }
}
