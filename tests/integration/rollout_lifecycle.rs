//! Rollouts across the life of the process and around it: a restart and a binary upgrade in
//! the middle of one (same step, hold time kept, one driver at a time), reloads that do and do
//! not take the route's split, the progress deadline when `to` has nothing healthy, the events
//! and metrics of a known sequence, notifications to a hook, and the `rollout` commands of the
//! CLI. Every wait has a deadline.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::events::kinds;
use crate::fixtures::{
    block_on, blue_green, free_port, run_binary, runtime, sample, wait_until, Switchyard,
    TestBackend,
};
use crate::load::{assert_no_failures, Load};
use crate::rollouts::{
    json, rollout, split, start, start_blue_green, state, wait_for_state, CLIENTS, FAST,
};

const STATE: &str = "state_file: {dir}/state.json\n";
/// Steps that hold 2 s, judged every 250 ms: long enough to stop a process in the middle of
/// one, and a fresh hold (8 windows) tells apart from one that went on.
const SLOW_HOLD: &str =
    r#""step_interval": "2s", "analysis": {"interval": "250ms", "min_requests": 5}"#;
/// Windows a fresh 2 s hold at 250 ms takes.
const WINDOWS_PER_HOLD: usize = 8;
/// Green's health check: one failed check takes it out.
const CHECK: &str = "    health_check:\n      type: http\n      path: /healthz\n      interval: 200ms\n      timeout: 100ms\n      rise: 1\n      fall: 1\n";

fn windows(status: &Value) -> Vec<Value> {
    status["windows"].as_array().cloned().unwrap_or_default()
}

fn at(window: &Value) -> String {
    window["at"].as_str().unwrap_or_default().to_string()
}

/// The rollout of route `web` as the state file has it (`step` is an index there).
fn saved_rollout(dir: &Path) -> Value {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let state: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    state["rollouts"]["web"].clone()
}

fn u64_of(value: &Value, field: &str) -> u64 {
    value[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {value:#}"))
}

fn wait_for(sy: &Switchyard, what: &str, limit: Duration, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let r = rollout(sy);
        if f(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}: {r:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What stays the same for one rollout whichever process runs it.
fn identity(status: &Value) -> Value {
    serde_json::json!({
        "from": status["from"], "to": status["to"], "spec": status["spec"],
        "steps": status["steps"], "started_at": status["started_at"],
    })
}

/// Blue 1, green 0 (with `extra`) under load.
fn under_load(extra: &str) -> (TestBackend, TestBackend, Switchyard, Load) {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = start_blue_green(&blue, &green, extra);
    let load = Load::start(sy.addr, CLIENTS);
    (blue, green, sy, load)
}

/// Waits until the rollout has held step 1 for `ms`; its status then.
fn held_at_step_1(sy: &Switchyard, ms: u64) -> Value {
    wait_for(
        sy,
        &format!("{ms} ms held at step 1"),
        Duration::from_secs(10),
        |r| r["step"] == 1 && r["held_ms"].as_u64().unwrap_or(0) >= ms,
    )
}

/// The rollout `started` as the next process has it: the same one, still at step 1, with at
/// least the `held` ms it had spent there.
fn goes_on_at_step_1(sy: &Switchyard, started: &Value, held: u64) -> Value {
    let after = rollout(sy);
    assert_eq!(identity(&after), identity(started));
    assert_eq!(
        (after["state"].as_str(), after["step"].as_u64()),
        (Some("progressing"), Some(1)),
        "{after:#}"
    );
    let held_after = u64_of(&after, "held_ms");
    assert!(
        held_after >= held,
        "held {held} ms before, {held_after} ms after: {after:#}"
    );
    after
}

#[test]
fn a_restart_mid_rollout_goes_on_at_the_same_step_with_the_hold_time_spent() {
    let (_blue, _green, mut sy, load) = under_load(STATE);
    let started = start(
        &sy,
        &format!(r#"{{"to": "green", "steps": [20, 50], {SLOW_HOLD}}}"#),
    );
    held_at_step_1(&sy, 1000);
    sy.signal("TERM");
    let status = sy.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", sy.log_text());
    // What the stopped process left: the last word the next one starts from.
    let saved = saved_rollout(&sy.dir);
    assert_eq!(saved["step"], 0, "index of step 1: {saved:#}");
    let held = u64_of(&saved, "held_ms");
    assert!((1000..2000).contains(&held), "{saved:#}");
    let last_before = windows(&saved).last().map(at).expect("windows saved");
    let revision = u64_of(&saved, "revision");
    let down = Instant::now();
    sy.restart_stopped();

    let after = goes_on_at_step_1(&sy, &started, held);
    // The time the process was down does not count.
    let held_after = u64_of(&after, "held_ms");
    assert!(
        held_after < held + 1000,
        "held {held} ms before, {held_after} ms after: {after:#}"
    );
    assert_eq!(split(&sy), (8000, 2000));

    let next = wait_for(&sy, "step 2", Duration::from_secs(10), |r| r["step"] == 2);
    let took = down.elapsed();
    assert_eq!(split(&sy), (5000, 5000));
    let at_step_1: Vec<Value> = windows(&next)
        .into_iter()
        .filter(|w| at(w) > last_before && w["step"] == 1)
        .collect();
    assert!(
        at_step_1.iter().any(|w| w["verdict"] == "passed"),
        "step 2 came without a passing window in the new process: {at_step_1:#?}"
    );
    // A hold started afresh would have taken WINDOWS_PER_HOLD windows.
    assert!(
        at_step_1.len() < WINDOWS_PER_HOLD,
        "{} windows at step 1 after the restart: {at_step_1:#?}",
        at_step_1.len()
    );
    assert!(u64_of(&saved_rollout(&sy.dir), "revision") > revision);
    drop(load.stop());
    eprintln!(
        "restart: held {held} ms carried over, step 2 {took:?} after the stop, {} windows at step 1 in the new process",
        at_step_1.len()
    );
}

fn upgrade_mid_rollout(extra: &str) {
    let (_blue, _green, mut sy, load) = under_load(extra);
    // Pingora's old process keeps its listeners for 5 s after handing them over, and
    // `upgrade` returns when it has exited: step 1 holds long enough to still be in force.
    let started = start(
        &sy,
        r#"{"to": "green", "steps": [{"weight": 20, "pause": "10s"}, 50], "step_interval": "1s", "analysis": {"interval": "500ms", "min_requests": 5}}"#,
    );
    let before = held_at_step_1(&sy, 1000);
    let saved_revision = (!extra.is_empty()).then(|| u64_of(&saved_rollout(&sy.dir), "revision"));
    let upgrading = Instant::now();
    sy.upgrade();
    let took = upgrading.elapsed();

    let after = goes_on_at_step_1(&sy, &started, u64_of(&before, "held_ms"));
    // The new process has every window the old one judged, in order.
    let (old, new) = (windows(&before), windows(&after));
    assert!(new.len() < 30, "{new:#?}");
    assert_eq!(&new[..old.len()], &old[..], "windows lost or rewritten");
    if let Some(revision) = saved_revision {
        assert!(u64_of(&saved_rollout(&sy.dir), "revision") >= revision);
    }

    let done = wait_for_state(&sy, "succeeded", Duration::from_secs(20));
    assert_eq!(identity(&done), identity(&started));
    assert_eq!(split(&sy), (0, 10_000));
    let ats: Vec<String> = windows(&done).iter().map(at).collect();
    assert!(
        ats.windows(2).all(|w| w[0] < w[1]),
        "windows not in order: {ats:#?}"
    );
    load.run_for(50, Duration::from_secs(10));
    let report = load.stop();
    assert_no_failures("upgrade mid-rollout", &report);

    // One driver at a time: the old engine stopped before the state went over, the new one
    // took over after, and each step was made once across both processes.
    let log = sy.log_text();
    let stopped = log
        .find("rollout engine stopped")
        .unwrap_or_else(|| panic!("the old engine did not stop:\n{log}"));
    let handed = log
        .find("[upgrade handed_over]")
        .unwrap_or_else(|| panic!("nothing handed over:\n{log}"));
    assert!(stopped < handed, "{log}");
    let driving: Vec<usize> = log.match_indices("): driving").map(|(i, _)| i).collect();
    assert_eq!(driving.len(), 2, "{log}");
    assert!(driving[0] < stopped && driving[1] > handed, "{log}");
    let took_over = log[..driving[1]].rsplit('\n').next().unwrap_or_default();
    assert!(
        took_over.ends_with("rollout web (blue → green, step 1/3, progressing"),
        "{took_over}"
    );
    assert_eq!(log.matches("[rollout rollout_step]").count(), 3, "{log}");
    assert_eq!(
        log.matches("[rollout rollout_succeeded]").count(),
        1,
        "{log}"
    );
    eprintln!(
        "upgrade mid-rollout: {took:?}, {} windows kept across it",
        old.len()
    );
}

#[test]
fn an_upgrade_mid_rollout_hands_it_to_the_new_process_through_the_state_file() {
    upgrade_mid_rollout(STATE);
}

#[test]
fn an_upgrade_mid_rollout_hands_it_to_the_new_process_without_a_state_file() {
    upgrade_mid_rollout("");
}

/// `blue_green` with one more upstream, `amber`, that no route uses.
fn with_amber(yaml: &str, amber: SocketAddr) -> String {
    yaml.replace(
        "routes:\n",
        &format!("  amber:\n    backends:\n      - address: {amber}\nroutes:\n"),
    )
}

/// A POST that must answer 200; its JSON.
fn post(sy: &Switchyard, path: &str) -> Value {
    let r = sy.api("POST", path, None);
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    json(&r)
}

fn reload(sy: &Switchyard) -> Value {
    post(sy, "/api/v1/reload")
}

#[test]
fn a_reload_ends_a_rollout_failed_only_when_it_changes_the_routes_split() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let amber = TestBackend::start("amber");
    let sy = start_blue_green(&blue, &green, "");
    let load = Load::start(sy.addr, CLIENTS);
    start(
        &sy,
        r#"{"to": "green", "steps": [20, {"weight": 50, "pause": "manual"}], "step_interval": "1s", "analysis": {"interval": "250ms", "min_requests": 5}}"#,
    );
    wait_until("step 1", Duration::from_secs(5), || {
        split(&sy) == (8000, 2000)
    });

    // Something else changes: the rollout goes on, and on to its next step.
    let file = with_amber(
        &blue_green(blue.addr, green.addr, (1, 0), "", ""),
        amber.addr,
    );
    sy.write_config(&file);
    let report = reload(&sy);
    assert_eq!(report["dropped_state"], serde_json::json!([]), "{report:#}");
    let r = rollout(&sy);
    assert_eq!(
        (r["state"].as_str(), r["step"].as_u64()),
        (Some("progressing"), Some(1))
    );
    assert_eq!(split(&sy), (8000, 2000));
    let held = wait_for_state(&sy, "paused", Duration::from_secs(10));
    assert_eq!(held["step"], 2, "{held:#}");
    assert_eq!(split(&sy), (5000, 5000));

    // The route's split changes in the file: the file wins, the rollout ends failed.
    let file = with_amber(
        &blue_green(blue.addr, green.addr, (3, 1), "", ""),
        amber.addr,
    );
    sy.write_config(&file);
    let report = reload(&sy);
    let dropped = report["dropped_state"].to_string();
    assert!(
        dropped.contains(
            "rollout web (blue → green, step 2/3, paused) is failed: ended by the config file"
        ),
        "{report:#}"
    );
    let ended = rollout(&sy);
    assert_eq!(ended["state"], "failed", "{ended:#}");
    let reason = ended["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("the config file changed the route's split")
            && reason.contains("the file's split applies"),
        "{reason}"
    );
    let route = json(&sy.api("GET", "/api/v1/routes/web", None));
    assert_eq!(route["split"], serde_json::json!({"blue": 3, "green": 1}));
    // Ended, so the split is the operator's again, and the engine leaves it alone.
    let put = sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(r#"{"blue": 1, "green": 1}"#),
    );
    assert_eq!(put.status, 200, "{}", put.text());
    load.run_for(100, Duration::from_secs(10));
    let report = load.stop();
    assert_no_failures("reloads mid-rollout", &report);
    assert_eq!(state(&sy), "failed");
    let route = json(&sy.api("GET", "/api/v1/routes/web", None));
    assert_eq!(route["split"], serde_json::json!({"blue": 1, "green": 1}));
    let events = json(&sy.api("GET", "/api/v1/events", None));
    let failed: Vec<&Value> = events
        .as_array()
        .map(|e| e.iter().filter(|e| e["kind"] == "rollout_failed").collect())
        .unwrap_or_default();
    assert_eq!(failed.len(), 1, "{events:#}");
    assert_eq!(failed[0]["source"], "reload");
    assert_eq!(rollout_metric(&sy, "state", "failed"), Some(1.0));
}

#[test]
fn a_rollout_to_an_upstream_with_no_healthy_backend_is_rolled_back_at_its_progress_deadline() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    green.set_sick(true);
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (1, 0), CHECK, ""));
    wait_until("green unhealthy", Duration::from_secs(5), || {
        let up = json(&sy.api("GET", "/api/v1/upstreams/green", None));
        up["backends"][0]["healthy"] == false
    });
    let load = Load::start(sy.addr, CLIENTS);
    let started = Instant::now();
    start(
        &sy,
        r#"{"to": "green", "steps": [20, 50], "step_interval": "500ms", "analysis": {"interval": "250ms", "min_requests": 5}, "progress_deadline": "2s"}"#,
    );
    let done = wait_for_state(&sy, "rolled_back", Duration::from_secs(8));
    let took = started.elapsed();
    load.run_for(50, Duration::from_secs(10));
    let report = load.stop();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let reason = done["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("no passing window for 2s at step 1/3 (progress_deadline)"),
        "{reason}"
    );
    let windows = windows(&done);
    assert!(windows.len() >= 6, "{windows:#?}");
    for w in &windows {
        assert_eq!(w["verdict"], "inconclusive", "{w:#}");
        assert_eq!(w["requests"], 0, "{w:#}");
    }
    assert_eq!(split(&sy), (10_000, 0));
    assert_eq!(green.requests(), 0);
    // Green's share went to blue while it had nothing healthy: no request failed.
    assert_no_failures("to without a healthy backend", &report);
}

/// `switchyard_rollout_weight` of route web (`label` unused) or its
/// `switchyard_rollout_state` for state `label`.
fn rollout_metric(sy: &Switchyard, metric: &str, label: &str) -> Option<f64> {
    let series = match metric {
        "weight" => r#"switchyard_rollout_weight{from="blue",route="web",to="green"}"#.to_string(),
        _ => format!(r#"switchyard_rollout_state{{route="web",state="{label}"}}"#),
    };
    sample(&sy.scrape(), &series)
}

fn events_since(sy: &Switchyard, since: u64) -> Vec<Value> {
    let r = sy.api("GET", &format!("/api/v1/events?since={since}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    json(&r).as_array().cloned().unwrap_or_default()
}

fn command(sy: &Switchyard, name: &str) -> Value {
    post(sy, &format!("/api/v1/routes/web/rollout/{name}"))
}

#[test]
fn a_known_rollout_sequence_reads_back_as_its_events_and_metrics() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = start_blue_green(&blue, &green, "");
    let load = Load::start(sy.addr, CLIENTS);
    let last = events_since(&sy, 0)
        .last()
        .and_then(|e| e["id"].as_u64())
        .expect("the startup event");
    start(
        &sy,
        r#"{"to": "green", "steps": [20, 50], "step_interval": "1m", "analysis": {"interval": "250ms", "min_requests": 5}}"#,
    );
    wait_for(
        &sy,
        "a passing window at step 1",
        Duration::from_secs(10),
        |r| r["step"] == 1 && windows(r).iter().any(|w| w["verdict"] == "passed"),
    );
    assert_eq!(rollout_metric(&sy, "weight", ""), Some(20.0));
    assert_eq!(command(&sy, "pause")["state"], "paused");
    assert_eq!(rollout_metric(&sy, "state", "paused"), Some(1.0));
    assert_eq!(command(&sy, "resume")["state"], "progressing");
    let done = command(&sy, "promote");
    assert_eq!(done["state"], "succeeded");
    load.run_for(50, Duration::from_secs(10));
    let report = load.stop();
    assert_no_failures("events sequence", &report);

    let events = events_since(&sy, last);
    assert_eq!(
        kinds(&events),
        [
            "api rollout_started",
            "rollout rollout_step",
            "api rollout_paused",
            "api rollout_resumed",
            "api rollout_succeeded",
        ],
        "{events:#?}"
    );
    let ids: Vec<u64> = events.iter().filter_map(|e| e["id"].as_u64()).collect();
    assert_eq!(ids, (last + 1..=last + 5).collect::<Vec<u64>>());
    for e in &events {
        assert_eq!(
            (e["route"].as_str(), e["upstream"].as_str()),
            (Some("web"), Some("green")),
            "{e:#}"
        );
    }
    let step = &events[1];
    assert_eq!(step["before"]["step"], 0, "{step:#}");
    assert_eq!(step["after"]["step"], 1, "{step:#}");
    assert_eq!(
        step["after"]["split"],
        serde_json::json!({"blue": 8000, "green": 2000})
    );
    let promoted = &events[4];
    assert!(
        promoted["message"]
            .as_str()
            .unwrap_or_default()
            .contains("promoted by an operator at step 1/3"),
        "{promoted:#}"
    );
    let log = sy.log_text();
    // Each event once, as `event ID [SOURCE KIND] <names the message lacks>: MESSAGE`.
    for e in &events {
        let head = format!(
            "event {} [{} {}]",
            e["id"],
            e["source"].as_str().unwrap_or_default(),
            e["kind"].as_str().unwrap_or_default(),
        );
        let message = format!(": {}", e["message"].as_str().unwrap_or_default());
        let lines = log
            .lines()
            .filter(|l| l.contains(&head) && l.ends_with(&message))
            .count();
        assert_eq!(lines, 1, "{head} ... {message} in:\n{log}");
    }

    assert_eq!(rollout_metric(&sy, "weight", ""), Some(100.0));
    for state in [
        "progressing",
        "paused",
        "succeeded",
        "failed",
        "rolled_back",
        "aborted",
    ] {
        let want = if state == "succeeded" { 1.0 } else { 0.0 };
        assert_eq!(rollout_metric(&sy, "state", state), Some(want), "{state}");
    }
    let metrics = sy.scrape();
    let judged = windows(&done);
    assert!(judged.len() < 30, "{judged:#?}");
    for verdict in ["passed", "failed", "inconclusive"] {
        let series =
            format!(r#"switchyard_rollout_windows_total{{route="web",verdict="{verdict}"}}"#);
        let counted = sample(&metrics, &series).unwrap_or(0.0);
        let listed = judged.iter().filter(|w| w["verdict"] == verdict).count();
        assert_eq!(counted, listed as f64, "{series}: {judged:#?}");
    }
    let passed = judged.iter().filter(|w| w["verdict"] == "passed").count();
    assert!(passed >= 1);
    assert_eq!(
        judged.iter().filter(|w| w["verdict"] == "failed").count(),
        0
    );
}

/// A notification hook: records each request's body (as JSON) and answers 204.
struct Hook {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<(String, Value)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Hook {
    fn start() -> Hook {
        let listener = block_on(TcpListener::bind("127.0.0.1:0")).expect("bind hook");
        let addr = listener.local_addr().expect("hook addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        let task = runtime().spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sink = Arc::clone(&sink);
                tokio::spawn(async move {
                    if let Some(request) = read_request(stream).await {
                        sink.lock().expect("hook lock").push(request);
                    }
                });
            }
        });
        Hook {
            addr,
            received,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// `METHOD path content-type` and the body of every request so far.
    fn received(&self) -> Vec<(String, Value)> {
        self.received.lock().expect("hook lock").clone()
    }

    fn kinds(&self) -> Vec<String> {
        self.received()
            .iter()
            .map(|(_, body)| body["kind"].as_str().unwrap_or("?").to_string())
            .collect()
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request off `stream`, answered 204.
async fn read_request(stream: TcpStream) -> Option<(String, Value)> {
    let mut reader = BufReader::new(stream);
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            break;
        }
        head.push(line);
    }
    let header = |name: &str| {
        head.iter().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let length: usize = header("content-length")?.parse().ok()?;
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await.ok()?;
    let mut stream = reader.into_inner();
    let _ = stream
        .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        .await;
    let _ = stream.shutdown().await;
    let mut parts = head[0].split_whitespace();
    let what = format!(
        "{} {} {}",
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        header("content-type").unwrap_or_default()
    );
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    Some((what, body))
}

#[test]
fn rollout_events_are_posted_to_the_notify_hook_and_a_dead_hook_holds_nothing_back() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = start_blue_green(&blue, &green, "");
    let load = Load::start(sy.addr, CLIENTS);
    let hook = Hook::start();
    start(
        &sy,
        &format!(
            r#"{{"to": "green", "steps": [50], {FAST}, "notify": "{}"}}"#,
            hook.url()
        ),
    );
    wait_for_state(&sy, "succeeded", Duration::from_secs(15));
    // What the event log has for the rollout is what the hook gets (each POST goes on its
    // own, so not necessarily in order).
    let logged: Vec<Value> = json(&sy.api("GET", "/api/v1/events", None))
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|e| {
                    e["kind"]
                        .as_str()
                        .is_some_and(|k| k.starts_with("rollout_"))
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    wait_until("every notification", Duration::from_secs(5), || {
        hook.received().len() >= logged.len()
    });
    let mut got: Vec<Value> = hook.received().into_iter().map(|(_, b)| b).collect();
    got.sort_by_key(|e| e["id"].as_u64());
    assert_eq!(got, logged);
    let kinds = hook.kinds();
    for kind in ["rollout_started", "rollout_succeeded"] {
        assert_eq!(kinds.iter().filter(|k| *k == kind).count(), 1, "{kinds:?}");
    }
    assert_eq!(
        kinds.iter().filter(|k| *k == "rollout_step").count(),
        2,
        "{kinds:?}"
    );
    for (what, body) in hook.received() {
        assert_eq!(what, "POST /hook application/json");
        assert_eq!(body["route"], "web", "{body:#}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body:#}"
        );
    }

    // A hook nobody listens on: the rollout goes on as if there were none.
    let put = sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(r#"{"blue": 1, "green": 0}"#),
    );
    assert_eq!(put.status, 200, "{}", put.text());
    let dead = format!("http://127.0.0.1:{}/hook", free_port());
    let started = Instant::now();
    start(
        &sy,
        &format!(r#"{{"to": "green", "steps": [50], {FAST}, "notify": "{dead}"}}"#),
    );
    wait_for_state(&sy, "succeeded", Duration::from_secs(15));
    let took = started.elapsed();
    load.run_for(50, Duration::from_secs(10));
    let report = load.stop();
    assert_no_failures("notify", &report);
    wait_until(
        "the failed notification logged",
        Duration::from_secs(5),
        || {
            sy.log_text()
                .contains(&format!("rollout notification to {dead} failed"))
        },
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    eprintln!("dead hook: succeeded in {took:?}");
}

/// `switchyard <args> --config <config>`: exit code, stdout, stderr.
fn cli(sy: &Switchyard, args: &[&str]) -> (i32, String, String) {
    let config = sy.config.display().to_string();
    let mut all = args.to_vec();
    all.extend(["--config", &config]);
    run_binary(&all)
}

/// The `label:` line of `rollout status` output.
fn field<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{label}:")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {label}: line in\n{out}"))
}

/// The cells of `switchyard status`'s rollout row for route web.
fn rollout_row(out: &str) -> Vec<String> {
    let section = out
        .split("\n\n")
        .find(|s| s.starts_with("Rollouts\n"))
        .unwrap_or_else(|| panic!("no Rollouts section:\n{out}"));
    let row = section
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("no row for web:\n{out}"));
    row.split_whitespace().map(str::to_string).collect()
}

#[test]
fn the_rollout_commands_start_show_and_abort_a_rollout() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = start_blue_green(&blue, &green, "");
    let (code, out, err) = cli(
        &sy,
        &[
            "rollout",
            "start",
            "web",
            "--to",
            "green",
            "--steps",
            "20,50",
            "--every",
            "500ms",
            "--analysis-interval",
            "250ms",
            "--min-requests",
            "5",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(field(&out, "route"), "web");
    assert_eq!(field(&out, "rollout"), "blue → green");
    assert_eq!(field(&out, "state"), "progressing");
    assert_eq!(field(&out, "steps"), "20, 50, 100");
    let spec = &rollout(&sy)["spec"];
    assert_eq!(spec["step_interval"], "500ms", "{spec:#}");
    assert_eq!(spec["analysis"]["interval"], "250ms", "{spec:#}");
    assert_eq!(spec["analysis"]["min_requests"], 5, "{spec:#}");

    // Without traffic it holds at step 1 with inconclusive windows.
    wait_for(&sy, "two windows at step 1", Duration::from_secs(5), |r| {
        r["step"] == 1 && windows(r).len() >= 2
    });
    let (code, out, err) = cli(&sy, &["rollout", "status", "web"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(field(&out, "state"), "progressing");
    assert_eq!(field(&out, "step"), "1/3");
    assert_eq!(field(&out, "weight"), "20%");
    let table: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("analysis windows (newest "))
        .skip(1)
        .collect();
    assert!(
        table
            .first()
            .is_some_and(|h| h.split_whitespace().collect::<Vec<_>>().join(" ")
                == "AT REQUESTS ERRORS ERROR_RATE P99_MS BASELINE_P99_MS VERDICT"),
        "{out}"
    );
    assert!(table.len() >= 3, "{out}");
    for row in &table[1..] {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells.get(1..),
            Some(&["0", "0", "0", "-", "-", "inconclusive"][..]),
            "{out}"
        );
    }
    let (code, out, err) = cli(&sy, &["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        rollout_row(&out),
        [
            "web",
            "blue",
            "→",
            "green",
            "progressing",
            "1/3",
            "20%",
            "inconclusive"
        ],
        "{out}"
    );

    let (code, out, err) = cli(&sy, &["rollout", "abort", "web"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(field(&out, "state"), "aborted");
    assert_eq!(field(&out, "weight"), "0%");
    assert!(
        field(&out, "reason").starts_with("aborted by an operator at step 1/3"),
        "{out}"
    );
    assert_eq!(split(&sy), (10_000, 0));
    let (code, out, err) = cli(&sy, &["status"]);
    assert_eq!(code, 0, "{out}{err}");
    let row = rollout_row(&out);
    assert_eq!(
        row[..7],
        ["web", "blue", "→", "green", "aborted", "1/3", "0%"],
        "{out}"
    );
    // Ended: a second abort is refused, exit 1 with the API's reason.
    let (code, out, err) = cli(&sy, &["rollout", "abort", "web"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("has ended (aborted)"), "{err}");
}
