//! Rollouts against the real binary: real backends under load, the engine judging them on
//! the balancer's own counters, with short windows (200–300 ms) so each scenario takes a few
//! seconds. Every wait has a deadline.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fixtures::{
    block_on, blue_green, request_from, sample, wait_until, Switchyard, TestBackend,
};
use crate::load::Load;

/// Fast analysis for tests: 250 ms windows, a few requests are enough (a debug build under
/// the test load serves a few hundred requests a second).
pub const FAST: &str =
    r#""step_interval": "500ms", "analysis": {"interval": "250ms", "min_requests": 5}"#;
/// Load clients: enough for several requests to a 20% share in each window.
pub const CLIENTS: usize = 12;

pub fn json(response: &crate::fixtures::Response) -> Value {
    serde_json::from_slice(&response.body).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {} {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        )
    })
}

/// Blue 1, green 0 on route `web`, with admin and metrics.
pub fn start_blue_green(blue: &TestBackend, green: &TestBackend, extra: &str) -> Switchyard {
    Switchyard::start(&blue_green(blue.addr, green.addr, (1, 0), "", extra))
}

pub fn rollout(sy: &Switchyard) -> Value {
    let r = sy.api("GET", "/api/v1/routes/web/rollout", None);
    assert_eq!(r.status, 200, "{}", r.text());
    json(&r)
}

pub fn state(sy: &Switchyard) -> String {
    rollout(sy)["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

pub fn start(sy: &Switchyard, body: &str) -> Value {
    let r = sy.api("POST", "/api/v1/routes/web/rollout", Some(body));
    assert_eq!(r.status, 201, "{}", r.text());
    json(&r)
}

/// Waits for the rollout to reach `want`, naming where it stands on timeout.
pub fn wait_for_state(sy: &Switchyard, want: &str, limit: Duration) -> Value {
    let mut last = Value::Null;
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        last = rollout(sy);
        if last["state"] == want {
            return last;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("rollout not {want} after {limit:?}: {last:#}");
}

pub fn split(sy: &Switchyard) -> (u64, u64) {
    let r = json(&sy.api("GET", "/api/v1/routes/web", None));
    (
        r["split"]["blue"].as_u64().unwrap_or(u64::MAX),
        r["split"]["green"].as_u64().unwrap_or(u64::MAX),
    )
}

#[test]
fn a_healthy_version_is_promoted_step_by_step_with_no_failed_request() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = start_blue_green(&blue, &green, "");
    let load = Load::start(sy.addr, CLIENTS);
    load.run_for(50, Duration::from_secs(10));
    start(
        &sy,
        &format!(r#"{{"to": "green", "steps": [20, 50], {FAST}}}"#),
    );
    // Every step shows in the split as the contract's integers, in order.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while state(&sy) == "progressing" && Instant::now() < deadline {
        let s = split(&sy);
        if seen.last() != Some(&s) {
            seen.push(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let done = rollout(&sy);
    assert_eq!(done["state"], "succeeded", "{done:#}");
    assert_eq!(split(&sy), (0, 10_000));
    assert!(seen.contains(&(8000, 2000)), "{seen:?}");
    assert!(seen.contains(&(5000, 5000)), "{seen:?}");
    load.run_for(100, Duration::from_secs(10));
    let report = load.stop();
    assert!(report.failures().is_empty(), "{:?}", report.failures());
    let windows = done["windows"].as_array().expect("windows");
    assert!(
        windows.iter().all(|w| w["verdict"] == "passed"),
        "{windows:#?}"
    );
    assert!(green.requests() > 100, "{}", green.requests());
}

#[test]
fn a_version_answering_500_to_30_percent_is_rolled_back_within_one_window() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = start_blue_green(&blue, &green, "");
    let load = Load::start(sy.addr, CLIENTS);
    start(
        &sy,
        &format!(r#"{{"to": "green", "steps": [20, 50], {FAST}}}"#),
    );
    wait_until("step 1 with green serving", Duration::from_secs(10), || {
        split(&sy) == (8000, 2000) && green.requests() > 20
    });
    let bad_from = Instant::now();
    green.set_failing_percent(30);
    let done = wait_for_state(&sy, "rolled_back", Duration::from_secs(5));
    let took = bad_from.elapsed();
    assert_eq!(split(&sy), (10_000, 0));
    load.run_for(50, Duration::from_secs(10));
    let report = load.stop();
    // One window is 250 ms; the first bad answer may fall anywhere in one, so the verdict
    // comes at most two window lengths after it (plus scheduling).
    assert!(took < Duration::from_millis(900), "took {took:?}");
    let failed: Vec<_> = report
        .failures()
        .into_iter()
        .filter(|f| f.contains("injected failure"))
        .collect();
    assert_eq!(
        failed.len(),
        report.failures().len(),
        "{:?}",
        report.failures()
    );
    let reason = done["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("error rate") && reason.contains("max_error_rate 1.00%"),
        "{reason}"
    );
    let last = done["windows"].as_array().and_then(|w| w.last()).cloned();
    let last = last.expect("a window");
    assert_eq!(last["verdict"], "failed", "{last:#}");
    assert!(last["errors"].as_u64().unwrap_or(0) > 0, "{last:#}");
    assert!(
        last["error_rate"].as_f64().unwrap_or(0.0) > 0.01,
        "{last:#}"
    );
    // No failure after the rollback reached 0%.
    let after = report
        .samples
        .iter()
        .filter(|s| s.at > bad_from + took + Duration::from_millis(50))
        .filter(|s| s.outcome.is_err())
        .count();
    assert_eq!(after, 0);
    eprintln!(
        "rollback: {took:?} from the first bad answer to 0%, {} failed requests to green",
        failed.len()
    );
}

#[test]
fn a_version_300ms_slower_is_rolled_back_by_the_latency_ratio() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    green.set_delay(Duration::from_millis(300));
    let sy = start_blue_green(&blue, &green, "");
    let load = Load::start(sy.addr, 20);
    start(
        &sy,
        r#"{"to": "green", "steps": [50], "step_interval": "5s", "analysis": {"interval": "1s", "min_requests": 3, "max_latency_ratio": 1.5}}"#,
    );
    let done = wait_for_state(&sy, "rolled_back", Duration::from_secs(10));
    drop(load.stop());
    let reason = done["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("max_latency_ratio 1.5"), "{reason}");
    let last = done["windows"].as_array().and_then(|w| w.last()).cloned();
    let last = last.expect("a window");
    assert!(last["p99_ms"].as_f64().unwrap_or(0.0) >= 300.0, "{last:#}");
    assert!(
        last["baseline_p99_ms"].as_f64().unwrap_or(1e9) < 100.0,
        "{last:#}"
    );
    assert_eq!(split(&sy), (10_000, 0));
}

#[test]
fn without_traffic_it_stays_at_its_first_step_with_inconclusive_windows() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = start_blue_green(&blue, &green, "");
    start(
        &sy,
        &format!(r#"{{"to": "green", "steps": [10, 50], {FAST}}}"#),
    );
    wait_until("five windows", Duration::from_secs(10), || {
        rollout(&sy)["windows"].as_array().map_or(0, Vec::len) >= 5
    });
    let r = rollout(&sy);
    assert_eq!(
        (r["state"].as_str(), r["step"].as_u64()),
        (Some("progressing"), Some(1))
    );
    assert_eq!(split(&sy), (9000, 1000));
    for w in r["windows"].as_array().expect("windows") {
        assert_eq!(w["verdict"], "inconclusive", "{w:#}");
        assert_eq!(w["requests"], 0);
    }
}

#[test]
fn a_failing_check_stops_it_before_the_weight_moves() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = start_blue_green(&blue, &green, "");
    // Under load, so that green getting no request says the weight never moved.
    let load = Load::start(sy.addr, 4);
    load.run_for(20, Duration::from_secs(10));
    // green's /healthz answers 503 when sick: the deploy's own "does it work" probe.
    green.set_sick(true);
    let body = format!(
        r#"{{"to": "green", {FAST}, "checks": [{{"url": "http://{}/healthz", "expect_status": 200, "timeout": "1s"}}]}}"#,
        green.addr
    );
    start(&sy, &body);
    let done = wait_for_state(&sy, "rolled_back", Duration::from_secs(5));
    assert_eq!(done["step"], 0, "{done:#}");
    let reason = done["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!(
            "check http://{}/healthz failed: status 503, expected 200",
            green.addr
        )),
        "{reason}"
    );
    assert_eq!(split(&sy), (10_000, 0));
    load.run_for(20, Duration::from_secs(10));
    drop(load.stop());
    assert_eq!(green.requests(), 0, "green got traffic");
    // A body check too: green answers its name, not "v2".
    green.set_sick(false);
    let body = format!(
        r#"{{"to": "green", {FAST}, "checks": [{{"url": "http://{}/version", "expect_body": "v2"}}]}}"#,
        green.addr
    );
    start(&sy, &body);
    let done = wait_for_state(&sy, "rolled_back", Duration::from_secs(5));
    let reason = done["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("does not contain \"v2\""), "{reason}");
}

#[test]
fn pause_resume_promote_and_abort_do_what_they_say() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = start_blue_green(&blue, &green, "");
    let load = Load::start(sy.addr, 4);
    start(
        &sy,
        r#"{"to": "green", "steps": [10, 50], "step_interval": "1s", "analysis": {"interval": "250ms", "min_requests": 3}}"#,
    );
    wait_until("step 1", Duration::from_secs(5), || {
        split(&sy) == (9000, 1000)
    });
    let paused = sy.api("POST", "/api/v1/routes/web/rollout/pause", None);
    assert_eq!(paused.status, 200, "{}", paused.text());
    let paused = json(&paused);
    assert_eq!(paused["state"], "paused");
    // Held: analysis goes on (windows keep coming), the weight and the hold time do not,
    // though the step's 1 s hold would long be over.
    let windows = |r: &Value| r["windows"].as_array().map_or(0, Vec::len);
    let held = paused["held_ms"].as_u64().unwrap_or(0);
    wait_until("windows while paused", Duration::from_secs(10), || {
        windows(&rollout(&sy)) >= windows(&paused) + 8
    });
    let still = rollout(&sy);
    assert_eq!(
        (still["state"].as_str(), still["step"].as_u64()),
        (Some("paused"), Some(1))
    );
    assert_eq!(split(&sy), (9000, 1000));
    assert!(
        still["held_ms"].as_u64().unwrap_or(u64::MAX) <= held + 300,
        "{held} then {still:#}"
    );
    // A manual split change is refused while the rollout owns the route.
    let put = sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(r#"{"blue": 1, "green": 1}"#),
    );
    assert_eq!(put.status, 409, "{}", put.text());
    assert!(
        put.text()
            .contains("rollout running: web (blue → green, step 1/3, paused)"),
        "{}",
        put.text()
    );
    let resumed = sy.api("POST", "/api/v1/routes/web/rollout/resume", None);
    assert_eq!(json(&resumed)["state"], "progressing");
    wait_until("step 2 after resume", Duration::from_secs(10), || {
        split(&sy) == (5000, 5000)
    });
    let promoted = sy.api("POST", "/api/v1/routes/web/rollout/promote", None);
    assert_eq!(promoted.status, 200);
    assert_eq!(json(&promoted)["state"], "succeeded");
    assert_eq!(split(&sy), (0, 10_000));
    // Ended: commands conflict, the split is the operator's again.
    let again = sy.api("POST", "/api/v1/routes/web/rollout/abort", None);
    assert_eq!(again.status, 409, "{}", again.text());
    let put = sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(r#"{"blue": 1, "green": 0}"#),
    );
    assert_eq!(put.status, 200, "{}", put.text());
    start(
        &sy,
        r#"{"to": "green", "steps": [25], "step_interval": "1m", "analysis": {"interval": "250ms"}}"#,
    );
    wait_until("step 1", Duration::from_secs(5), || {
        split(&sy) == (7500, 2500)
    });
    let aborted = sy.api("POST", "/api/v1/routes/web/rollout/abort", None);
    assert_eq!(json(&aborted)["state"], "aborted");
    assert_eq!(split(&sy), (10_000, 0));
    load.run_for(40, Duration::from_secs(10));
    let report = load.stop();
    assert!(report.failures().is_empty(), "{:?}", report.failures());
    // Both the ended rollouts' last is listed.
    let all = json(&sy.api("GET", "/api/v1/rollouts", None));
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all:#}");
    assert_eq!(all[0]["state"], "aborted");
    let metrics = sy.scrape();
    assert_eq!(
        sample(
            &metrics,
            r#"switchyard_rollout_state{route="web",state="aborted"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            r#"switchyard_rollout_weight{from="blue",route="web",to="green"}"#
        ),
        Some(0.0)
    );
}

#[test]
fn bad_rollout_requests_are_400_or_404_naming_what_is_wrong_and_change_nothing() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = start_blue_green(&blue, &green, "");
    for (body, status, want) in [
        (
            r#"{"to": "green", "steps": [50, 10]}"#,
            400,
            "steps[1]: 10 does not increase",
        ),
        (
            r#"{"to": "green", "steps": [120]}"#,
            400,
            "steps[0]: 120 is not a percentage in (0, 100]",
        ),
        (
            r#"{"to": "green", "from": "green"}"#,
            400,
            "from: \"green\" is also \"to\"",
        ),
        (r#"{"to": "amber"}"#, 400, "to: no upstream named \"amber\""),
        (
            r#"{"to": "green", "checks": [{"url": "file:///etc/passwd"}]}"#,
            400,
            "checks[0].url: \"file:///etc/passwd\" is not an http:// URL",
        ),
        (
            r#"{"to": "green", "analysis": {"interval": "1x"}}"#,
            400,
            "analysis.interval: invalid duration",
        ),
        (
            r#"{"to": "green", "surprise": 1}"#,
            400,
            "surprise: unknown field",
        ),
        (
            r#"{"to": "green", "steps": [{"match": {}}]}"#,
            400,
            "steps[0].match: must hold at least one condition",
        ),
        (
            r#"{"to": "green", "steps": [{"match": {"headers": {"": "beta"}}}]}"#,
            400,
            "steps[0].match.headers.: header name must not be empty",
        ),
        ("not json", 400, "must be a JSON object"),
    ] {
        let r = sy.api("POST", "/api/v1/routes/web/rollout", Some(body));
        assert_eq!(r.status, status, "{body}: {}", r.text());
        let error = json(&r)["error"].as_str().unwrap_or_default().to_string();
        assert!(error.contains(want), "{body}: {error}");
    }
    let r = sy.api(
        "POST",
        "/api/v1/routes/nope/rollout",
        Some(r#"{"to": "green"}"#),
    );
    assert_eq!(r.status, 404, "{}", r.text());
    let r = sy.api("GET", "/api/v1/routes/web/rollout", None);
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().contains("has had no rollout"));
    let r = sy.api("POST", "/api/v1/routes/web/rollout/pause", None);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(split(&sy), (1, 0));
}

/// The backend (its `X-Backend`) that answered one `GET /` with `headers`.
fn answered_by(sy: &Switchyard, headers: &[(&str, &str)]) -> String {
    let r = block_on(request_from(None, sy.addr, "GET", "/", headers))
        .unwrap_or_else(|e| panic!("GET / with {headers:?}: {e}"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.header("x-backend").unwrap_or_default().to_string()
}

fn rollout_matched(sy: &Switchyard) -> f64 {
    sample(
        &sy.scrape(),
        r#"switchyard_route_routing_total{route="web",routing="rollout_match"}"#,
    )
    .unwrap_or(0.0)
}

#[test]
fn a_beta_first_rollout_sends_only_the_beta_group_to_green_until_it_is_aborted() {
    const BETA: [(&str, &str); 1] = [("X-User-Group", "beta")];
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let mut sy = start_blue_green(&blue, &green, "state_file: {dir}/state.json\n");
    let started = start(
        &sy,
        r#"{"to": "green", "steps": [{"match": {"headers": {"X-User-Group": "beta"}}, "pause": "1s"}, {"weight": 50, "pause": "manual"}, 100],
            "step_interval": "500ms", "analysis": {"interval": "400ms", "min_requests": 3}}"#,
    );
    // The status shows the steps as they were asked for.
    assert_eq!(
        started["steps"],
        serde_json::json!([{"match": {"headers": {"x-user-group": "beta"}}, "pause": "1s"}, {"weight": 50.0, "pause": "manual"}, 100.0])
    );
    wait_until("the match step", Duration::from_secs(5), || {
        rollout(&sy)["step"] == 1
    });
    // At the match step, with weight 0: the beta group reaches green, everyone else blue. (A
    // request counts for the match step only if the step is still 1 after its answer.)
    let mut rounds = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert_eq!(answered_by(&sy, &BETA), "green");
        let other = answered_by(&sy, &[("X-User-Group", "staff")]);
        let now = rollout(&sy);
        if now["step"] != 1 {
            break;
        }
        assert_eq!(
            (other.as_str(), now["weight"].as_f64()),
            ("blue", Some(0.0))
        );
        rounds += 1;
        assert!(
            Instant::now() < deadline,
            "still at the match step: {now:#}"
        );
    }
    // It held for its pause and advanced after a passing window (the beta group's requests
    // are green's counters).
    let held = wait_for_state(&sy, "paused", Duration::from_secs(5));
    assert_eq!((held["step"].as_u64(), split(&sy)), (Some(2), (5000, 5000)));
    let windows = held["windows"].as_array().expect("windows");
    assert!(
        windows
            .iter()
            .any(|w| w["step"] == 1 && w["verdict"] == "passed"),
        "{windows:#?}"
    );
    assert!(rounds >= 5, "{rounds} rounds at the match step");
    // At 50% as well, and after a restart (the state file holds the match step), every beta
    // request goes to green.
    sy.restart();
    let back = rollout(&sy);
    assert_eq!(
        (back["state"].as_str(), back["step"].as_u64()),
        (Some("paused"), Some(2))
    );
    for _ in 0..10 {
        assert_eq!(answered_by(&sy, &BETA), "green");
    }
    let matched = rollout_matched(&sy);
    assert_eq!(matched, 10.0, "counted since the restart");
    // An abort sends the beta group back to blue at once.
    let aborted = sy.api("POST", "/api/v1/routes/web/rollout/abort", None);
    assert_eq!(json(&aborted)["state"], "aborted");
    for _ in 0..10 {
        assert_eq!(answered_by(&sy, &BETA), "blue");
    }
    assert_eq!(rollout_matched(&sy), matched);
}
