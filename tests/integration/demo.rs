//! `switchyard demo` as a newcomer starts it: blue takes everything until a rollout, the
//! printed lines work as printed (the CLI's config file among them), and green's `/chaos`
//! makes its answers fail and recover. The demo has fixed ports: its tests take turns.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::fixtures::*;

/// One demo at a time: every test here listens on the same ports.
static PORTS: Mutex<()> = Mutex::new(());

const LB: &str = "127.0.0.1:8080";
const ADMIN: &str = "127.0.0.1:9000";
const GREEN: &str = "127.0.0.1:9002";

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("addr")
}

/// The demo, killed if a failed assertion unwinds past it. Its stdout stays open: a demo
/// whose reader left would fail on a broken pipe.
struct Demo {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the demo; returns it with what it printed up to "Stop with", once it serves.
fn start_demo() -> (Demo, String) {
    let log = temp_path("demo.log");
    let mut child = Command::new(BINARY)
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("demo log"))
        .spawn()
        .expect("spawn demo");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut demo = Demo { child, stdout };
    let mut printed = String::new();
    for line in (&mut demo.stdout).lines().take(80).map_while(Result::ok) {
        printed.push_str(&line);
        printed.push('\n');
        if line.starts_with("Stop with") {
            break;
        }
    }
    wait_until("the demo to listen", Duration::from_secs(30), || {
        if let Ok(Some(status)) = demo.child.try_wait() {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("the demo exited ({status}) before it listened:\n{log}");
        }
        [LB, ADMIN, GREEN]
            .iter()
            .all(|a| std::net::TcpStream::connect(addr(a)).is_ok())
    });
    // Both demo upstreams are health-checked: a backend serves once its first check passed,
    // which on a loaded machine can come after the sockets listen.
    wait_until(
        "the demo's backends to pass their checks",
        Duration::from_secs(30),
        || {
            ["blue", "green"].iter().all(|upstream| {
                let view = get(addr(ADMIN), &format!("/api/v1/upstreams/{upstream}"));
                serde_json::from_str::<serde_json::Value>(&view.text()).is_ok_and(|v| {
                    v["backends"]
                        .as_array()
                        .is_some_and(|b| b.iter().all(|b| b["healthy"] == true))
                })
            })
        },
    );
    (demo, printed)
}

/// SIGTERM, and the demo exits 0 within 10 s.
fn stop(mut demo: Demo) {
    let _ = Command::new("kill")
        .args(["-TERM", &demo.child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Ok(Some(status)) = demo.child.try_wait() {
            break status;
        }
        assert!(Instant::now() < deadline, "demo did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

fn post(to: &str, path: &str, body: Option<&[u8]>) -> Response {
    block_on(send(addr(to), "POST", path, &[], body))
        .unwrap_or_else(|e| panic!("POST {path} to {to}: {e}"))
}

#[test]
fn the_demo_serves_blue_until_a_rollout_and_prints_how_to_run_one() {
    let _turn = PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let (demo, printed) = start_demo();
    for line in [
        "curl -i http://127.0.0.1:8080/",
        "rollout start web --to green --steps 10,50,100 --every 10s --analysis-interval 5s --min-requests 10 --check http://127.0.0.1:9002/version",
        "curl -s -X POST http://127.0.0.1:9000/api/v1/routes/web/rollout",
        "curl -s -X POST 'http://127.0.0.1:9002/chaos?errors=30'",
        "curl -s http://127.0.0.1:9000/api/v1/events",
        "curl -s -X PUT http://127.0.0.1:9000/api/v1/routes/web/split",
    ] {
        assert!(printed.contains(line), "{line:?} not in:\n{printed}");
    }
    let answers: Vec<String> = (0..20).map(|_| get(addr(LB), "/").text()).collect();
    assert!(
        answers.iter().all(|a| a == "hello from blue (v1)\n"),
        "{answers:?}"
    );
    assert!(get(addr(LB), "/").header("x-switchyard-upstream").is_some());

    // The config file it printed points the CLI at the demo's admin API.
    let config = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("export SWITCHYARD_CONFIG="))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no config file in:\n{printed}"));
    let (code, stdout, stderr) = run_binary(&["status", "--config", config]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("green=0 (0%)"), "{stdout}");

    let r = block_on(send(
        addr(ADMIN),
        "PUT",
        "/api/v1/routes/web/split",
        &[],
        Some(br#"{"blue": 0, "green": 1}"#),
    ))
    .expect("admin");
    assert_eq!(r.status, 200, "{}", r.text());
    // Under the whole suite's load a demo health check can time out twice in a row and take
    // green out for a moment (503 with blue at 0): wait for it to answer, with a deadline.
    wait_until("green to answer", Duration::from_secs(10), || {
        get(addr(LB), "/").text() == "hello from green (v2)\n"
    });
    let metrics = get(addr("127.0.0.1:9100"), "/metrics").text();
    assert!(metrics.contains("switchyard_requests_total{backend=\"127.0.0.1:9001\",route=\"web\",status=\"200\",upstream=\"blue\"} 21"), "{metrics}");
    stop(demo);
}

#[test]
fn greens_chaos_makes_answers_fail_and_slow_and_recover_and_bad_params_are_400() {
    let _turn = PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let (demo, _) = start_demo();
    let green = addr(GREEN);
    let version = get(green, "/version");
    assert_eq!(
        (version.status, version.text()),
        (
            200,
            "{\"name\": \"green\", \"version\": \"v2\"}\n".to_string()
        )
    );

    let set = post(GREEN, "/chaos?errors=30&delay=200ms", None);
    assert_eq!(
        (set.status, set.text()),
        (200, "green: errors=30% delay=200ms\n".to_string())
    );
    let started = Instant::now();
    let statuses: Vec<u16> = (0..10).map(|_| get(green, "/").status).collect();
    // Spread evenly: exactly 3 of every 10, each answer 200 ms late.
    assert_eq!(
        statuses.iter().filter(|s| **s == 500).count(),
        3,
        "{statuses:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Health checks stay green: the rollout's analysis is what should see the failures.
    assert_eq!(get(green, "/healthz").status, 200);

    for (query, named) in [
        ("errors=abc", "/chaos: errors: \"abc\""),
        ("errors=101", "/chaos: errors: \"101\""),
        ("delay=fast", "/chaos: delay: invalid duration \"fast\""),
        ("delay=1m", "/chaos: delay: 1m is over"),
        ("blast=1", "/chaos: blast: unknown parameter"),
    ] {
        let r = post(GREEN, &format!("/chaos?{query}"), None);
        assert_eq!(r.status, 400, "{query}: {}", r.text());
        assert!(r.text().starts_with(named), "{query}: {}", r.text());
    }
    // A refused request changed nothing.
    assert_eq!(
        get(green, "/chaos").text(),
        "green: errors=30% delay=200ms\n"
    );

    let healed = post(GREEN, "/chaos", None);
    assert_eq!(healed.text(), "green: errors=0% delay=0ms\n");
    let started = Instant::now();
    let statuses: Vec<u16> = (0..10).map(|_| get(green, "/").status).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    stop(demo);
}

#[test]
fn reloading_the_demo_says_it_has_no_file_and_counts_no_failure() {
    let _turn = PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let (demo, _) = start_demo();
    let answer = post(ADMIN, "/api/v1/reload", None);
    assert_eq!(answer.status, 409, "{}", answer.text());
    let body: serde_json::Value = serde_json::from_slice(&answer.body).expect("JSON");
    assert_eq!(body["error"], "the demo has no config file to reload");
    // SIGHUP asks the same.
    let _ = Command::new("kill")
        .args(["-HUP", &demo.child.id().to_string()])
        .status();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(addr(LB), "/").status, 200);
    let metrics = get(addr("127.0.0.1:9100"), "/metrics").text();
    let failed = sample(
        &metrics,
        "switchyard_config_reloads_total{result=\"failure\"}",
    );
    assert!(failed.unwrap_or(0.0) == 0.0, "{metrics}");
    // Nothing about an invalid config in the event log either.
    let events = get(addr(ADMIN), "/api/v1/events").text();
    assert!(!events.contains("reload_refused"), "{events}");
    stop(demo);
}
