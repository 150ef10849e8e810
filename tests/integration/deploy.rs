//! The deploy suite: every operation of a deploy under continuous load from 16 clients (half
//! keep-alive, half a connection per request), counting failed requests. The target is zero.
//! Scenarios run one at a time (they load both cores).

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fixtures::*;
use crate::load::{assert_no_failures, Load};

const CLIENTS: usize = 16;
const PHASE: usize = 600;
const LIMIT: Duration = Duration::from_secs(30);

/// Taken by every scenario of the deploy suites (this one and `deploy_tls`).
pub(crate) fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SUITE: Mutex<()> = Mutex::new(());
    SUITE.lock().unwrap_or_else(|p| p.into_inner())
}

fn json(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

fn put_split(sy: &Switchyard, blue: u32, green: u32) {
    let body = format!(r#"{{"blue": {blue}, "green": {green}}}"#);
    let r = sy.api("PUT", "/api/v1/routes/web/split", Some(&body));
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Blue with backends `a` and `b`, green with `other`, all health-checked every 200 ms
/// (rise and fall 1); all traffic to blue.
fn blue_pair(a: SocketAddr, b: SocketAddr, other: SocketAddr) -> String {
    let check = "    health_check:\n      type: http\n      path: /healthz\n      interval: 200ms\n      timeout: 100ms\n      rise: 1\n      fall: 1\n";
    blue_green(a, other, (1, 0), check, "").replacen(
        &format!("      - address: {a}\n"),
        &format!("      - address: {a}\n      - address: {b}\n"),
        1,
    )
}

#[test]
fn blue_green_switch_and_rollback() {
    let _one = one_at_a_time();
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (100, 0), "", ""));
    let load = Load::start(sy.addr, CLIENTS);
    load.run_for(PHASE, LIMIT);
    put_split(&sy, 0, 100);
    let switched = Instant::now();
    // Requests sent shortly before the rollback PUT, or while it is under way, may go either
    // way: one sent before it can still be waiting to be read when it lands (a loaded CI
    // machine: 2 of 1 826 went to blue). Green's window ends `settle` before it is sent,
    // blue's begins `settle` after it has answered.
    let rollback_sent = load.run_for(2 * PHASE, LIMIT);
    put_split(&sy, 100, 0);
    let rolled_back = Instant::now();
    let end = load.run_for(PHASE, LIMIT);
    let report = load.stop();
    assert_no_failures("blue-green", &report);
    // Requests that were already routed when the PUT answered may still finish on blue.
    let settle = Duration::from_millis(100);
    let (green_share, green_window) =
        report.share("green", switched + settle, rollback_sent - settle);
    assert!(
        green_window > 100,
        "{green_window} requests in green's window"
    );
    assert_eq!(green_share, 1.0);
    assert_eq!(report.share("blue", rolled_back + settle, end).0, 1.0);
}

#[test]
fn canary_steps_hold_their_share() {
    let _one = one_at_a_time();
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (100, 0), "", ""));
    let load = Load::start(sy.addr, CLIENTS);
    let mut phases = Vec::new();
    for (b, g) in [(100, 0), (99, 1), (90, 10), (50, 50), (0, 100)] {
        put_split(&sy, b, g);
        let from = Instant::now() + Duration::from_millis(100);
        let to = load.run_for(2 * PHASE, LIMIT);
        phases.push((g, from, to));
    }
    let report = load.stop();
    assert_no_failures("canary", &report);
    for (g, from, to) in phases {
        let (share, n) = report.share("green", from, to);
        let want = f64::from(g) / 100.0;
        eprintln!("canary {g}%: green share {:.3} of {n}", share);
        assert!(
            (share - want).abs() <= 0.02 && (g == 0) == (share == 0.0),
            "step {g}%: green share {share:.3} of {n}"
        );
    }
}

#[test]
fn rolling_replacement_of_every_backend() {
    let _one = one_at_a_time();
    let old_a = TestBackend::start("v1");
    let old_b = TestBackend::start("v1");
    let other = TestBackend::start("other");
    let sy = Switchyard::start(&blue_pair(old_a.addr, old_b.addr, other.addr));
    let load = Load::start(sy.addr, CLIENTS);
    load.run_for(PHASE, LIMIT);
    let mut replacements = Vec::new();
    for old in [&old_a, &old_b] {
        let new = TestBackend::start("v2");
        let r = sy.api(
            "POST",
            "/api/v1/upstreams/blue/backends",
            Some(&format!(r#"{{"address": "{}"}}"#, new.addr)),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        let backend = |addr: SocketAddr| {
            let view = json(&sy.api("GET", "/api/v1/upstreams/blue", None));
            view["backends"]
                .as_array()
                .and_then(|b| b.iter().find(|b| b["address"] == addr.to_string()).cloned())
                .unwrap_or(Value::Null)
        };
        wait_until("the new backend healthy", LIMIT, || {
            backend(new.addr)["healthy"] == true
        });
        let path = format!("/api/v1/upstreams/blue/backends/{}", old.addr);
        assert_eq!(
            sy.api("PATCH", &path, Some(r#"{"state": "draining"}"#))
                .status,
            200
        );
        wait_until("the old backend idle", LIMIT, || {
            backend(old.addr)["in_flight"] == 0
        });
        let r = sy.api("DELETE", &path, None);
        assert_eq!(r.status, 200, "{}", r.text());
        load.run_for(PHASE, LIMIT);
        replacements.push(new);
    }
    let done = Instant::now();
    let end = load.run_for(PHASE, LIMIT);
    let report = load.stop();
    assert_no_failures("rolling", &report);
    assert_eq!(
        report.share("v2", done, end).0,
        1.0,
        "only the new version after the roll"
    );
}

#[test]
fn reloads_with_changing_splits() {
    let _one = one_at_a_time();
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let base = blue_green(blue.addr, green.addr, (1, 1), "", "");
    let sy = Switchyard::start(&base);
    let load = Load::start(sy.addr, CLIENTS);
    for i in 1..=20u32 {
        let (b, g) = (i, 21 - i);
        sy.write_config(
            &base
                .replace("blue: 1\n", &format!("blue: {b}\n"))
                .replace("green: 1\n", &format!("green: {g}\n")),
        );
        if i % 2 == 0 {
            sy.signal("HUP");
        } else {
            assert_eq!(sy.api("POST", "/api/v1/reload", None).status, 200);
        }
        wait_until("the reload applied", LIMIT, || {
            json(&sy.api("GET", "/api/v1/routes/web", None))["split"]["blue"] == b
        });
        load.run_for(PHASE / 4, LIMIT);
    }
    let report = load.stop();
    assert_no_failures("20 reloads", &report);
}

#[test]
fn five_binary_upgrades_in_a_row_keep_state_and_fail_nothing() {
    let _one = one_at_a_time();
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let mut sy = Switchyard::start(&blue_green(
        blue.addr,
        green.addr,
        (100, 0),
        "",
        "state_file: {dir}/state.json\n",
    ));
    put_split(&sy, 70, 30);
    let load = Load::start(sy.addr, CLIENTS);
    load.run_for(PHASE, LIMIT);
    for _ in 0..5 {
        let before = sy.child.id();
        sy.upgrade();
        assert_ne!(sy.child.id(), before);
        load.run_for(PHASE, LIMIT);
        let split = json(&sy.api("GET", "/api/v1/routes/web", None))["split"].clone();
        assert_eq!(
            split,
            serde_json::json!({"blue": 70, "green": 30}),
            "state carried over"
        );
    }
    let report = load.stop();
    assert_no_failures("5 upgrades", &report);
}

/// The listening sockets on `port`, counted by the kernel (each socket once, however many
/// processes hold it).
fn listening_sockets(port: u16) -> usize {
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields
                .get(1)
                .and_then(|local| local.rsplit_once(':'))
                .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok());
            // State 0A is LISTEN.
            if local_port == Some(port) && fields.get(3) == Some(&"0A") {
                count += 1;
            }
        }
    }
    count
}

#[test]
fn upgrades_that_change_the_thread_count_keep_every_socket_and_fail_nothing() {
    let _one = one_at_a_time();
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let base = blue_green(blue.addr, green.addr, (1, 1), "", "");
    let mut sy = Switchyard::start(&base);
    let port = sy.addr.port();
    // One socket per worker thread, bound with SO_REUSEPORT (the workers start in parallel:
    // the first may answer before the second has bound).
    wait_until("a socket per worker", LIMIT, || {
        listening_sockets(port) == 2
    });
    let load = Load::start(sy.addr, CLIENTS);
    load.run_for(PHASE, LIMIT);
    // Fewer threads keep serving every inherited socket (closing one would reset the
    // connections queued in it); more threads bind more.
    for (threads, sockets) in [(1, 2), (3, 3), (2, 3), (1, 3)] {
        sy.write_config(&base.replace("threads: 2", &format!("threads: {threads}")));
        sy.upgrade();
        wait_until(
            &format!("{sockets} listening sockets after the upgrade to {threads} thread(s)"),
            LIMIT,
            || listening_sockets(port) == sockets,
        );
        load.run_for(PHASE, LIMIT);
    }
    let report = load.stop();
    assert_no_failures("4 upgrades changing threads", &report);
    // Every socket is accepted on: a new connection per request from one client lands on
    // each of them (the kernel hashes each new source port), and none waits in a queue.
    let before = blue.requests() + green.requests();
    for _ in 0..60 {
        assert_eq!(get(sy.addr, "/").status, 200);
    }
    assert_eq!(blue.requests() + green.requests(), before + 60);
}

#[test]
fn more_threads_than_one_hand_over_can_carry_sockets_for_still_upgrade() {
    let _one = one_at_a_time();
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let base =
        blue_green(blue.addr, green.addr, (1, 1), "", "").replace("threads: 2", "threads: 40");
    let mut sy = Switchyard::start(&base);
    let port = sy.addr.port();
    // Pingora hands over at most 32 sockets: beside admin and metrics, 30 for the listener,
    // its 40 threads shared out among 30 workers.
    wait_until("30 sockets", LIMIT, || listening_sockets(port) == 30);
    let load = Load::start(sy.addr, CLIENTS);
    load.run_for(PHASE, LIMIT);
    sy.upgrade();
    assert_eq!(listening_sockets(port), 30);
    load.run_for(PHASE, LIMIT);
    let report = load.stop();
    assert_no_failures("an upgrade at 40 threads", &report);
}

#[test]
fn a_backend_killed_mid_load_only_fails_what_it_had_in_flight() {
    let _one = one_at_a_time();
    let a = TestBackend::start("a");
    let mut b = TestBackend::start("b");
    let green = TestBackend::start("green");
    let sy = Switchyard::start(&blue_pair(a.addr, b.addr, green.addr));
    let started = Instant::now();
    let load = Load::start(sy.addr, CLIENTS);
    load.run_for(PHASE, LIMIT);
    b.kill();
    let killed = Instant::now();
    // Whichever comes first: passive detection (refused connects) or the active check.
    wait_until("b marked down", LIMIT, || {
        let log = sy.log_text();
        log.contains(&format!("backend {} is now unhealthy", b.addr))
            || log.contains(&format!("backend {} taken out", b.addr))
    });
    let marked = Instant::now();
    let end = load.run_for(PHASE, LIMIT);
    let report = load.stop();
    let failed = report.failures().len();
    eprintln!(
        "kill: {} requests, {failed} failed (killed backend had at most {CLIENTS} in flight)",
        report.total()
    );
    assert!(
        failed <= CLIENTS,
        "{failed} failed: {:?}",
        report.failures()
    );
    assert_eq!(report.share("a", marked, end).0, 1.0);
    assert!(
        report.share("b", started, killed).0 > 0.3,
        "b served before the kill"
    );
}

#[test]
fn sigterm_lets_every_slow_request_in_flight_complete() {
    let _one = one_at_a_time();
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let mut sy = Switchyard::start(&blue_green(blue.addr, green.addr, (1, 0), "", ""));
    let addr = sy.addr;
    let in_flight = runtime().spawn(async move {
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..CLIENTS {
            clients.spawn(async move { request_from(None, addr, "GET", "/slow/800", &[]).await });
        }
        let mut answers = Vec::new();
        while let Some(answer) = clients.join_next().await {
            answers.push(match answer {
                Ok(Ok(r)) => (r.status, r.text()),
                Ok(Err(e)) => (0, e.to_string()),
                Err(e) => (0, e.to_string()),
            });
        }
        answers
    });
    wait_until("every slow request at the backend", LIMIT, || {
        blue.requests() == CLIENTS
    });
    sy.signal("TERM");
    let answers = block_on(in_flight).expect("join");
    eprintln!(
        "sigterm: {} slow requests in flight, {} completed",
        CLIENTS,
        answers.iter().filter(|a| a.0 == 200).count()
    );
    assert!(
        answers.iter().all(|a| *a == (200, "blue".to_string())),
        "{answers:?}"
    );
    assert_eq!(sy.wait_exit(LIMIT).code(), Some(0));
}

#[test]
fn the_upgrade_script_hands_over_under_load() {
    let _one = one_at_a_time();
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let mut sy = Switchyard::start(&blue_green(
        blue.addr,
        green.addr,
        (1, 0),
        "",
        "state_file: {dir}/state.json\n",
    ));
    let load = Load::start(sy.addr, CLIENTS);
    load.run_for(PHASE, LIMIT);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/upgrade.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(&sy.config)
        .arg(sy.child.id().to_string())
        .arg(BINARY)
        // Without it the new process would inherit this test's stdout pipe and `output()`
        // would wait for it to end.
        .env("SWITCHYARD_UPGRADE_LOG", &sy.log)
        .output()
        .expect("run upgrade.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_pid: u32 = stdout
        .trim()
        .strip_prefix("new pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    let _new = StopOnDrop(new_pid);
    load.run_for(PHASE, LIMIT);
    let report = load.stop();
    let old = sy.child.try_wait().expect("old status");
    assert_eq!(
        old.and_then(|s| s.code()),
        Some(0),
        "the old process exited cleanly"
    );
    assert_eq!(get(sy.addr, "/").status, 200);
    assert_no_failures("upgrade.sh", &report);
}

/// Stops (SIGTERM) a process this test started indirectly, however the test ends.
struct StopOnDrop(u32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.to_string()).status();
    }
}
