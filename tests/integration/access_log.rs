//! The access log and request ids against the real binary: the fields of known requests, ids
//! kept, replaced and generated, SIGUSR1 after a rotation, a reload's new path and format,
//! drops when the writer is blocked; and the log hygiene around them (Pingora's start-up
//! lines, an upgrade, a retry).

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fixtures::*;

fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn wait_for_lines(path: &Path, n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    wait_until(
        &format!("{n} lines in {}", path.display()),
        Duration::from_secs(10),
        || {
            lines = std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect();
            lines.len() >= n
        },
    );
    lines
}

#[test]
fn every_request_gets_a_line_with_its_fields_and_one_request_id_end_to_end() {
    let a = TestBackend::start("a");
    let sy = Switchyard::start(&logged_yaml(
        a.addr,
        "  path: {dir}/access.log\n  format: json\n",
    ));
    let file = sy.dir.join("access.log");

    let kept = "trace-7 from the edge";
    let r = block_on(request_from(
        None,
        sy.addr,
        "GET",
        "/app/cart?id=1",
        &[
            ("Host", "shop.test"),
            ("X-Request-Id", kept),
            ("User-Agent", "probe/1.0"),
        ],
    ))
    .expect("request");
    assert_eq!(r.status, 200);
    let body_len = r.body.len() as u64;
    assert_eq!(r.header("x-request-id"), Some(kept));
    assert_eq!(
        r.header("x-switchyard-backend"),
        Some(a.addr.to_string().as_str())
    );
    let seen = a.last_headers();
    let backend_id = |seen: &[(String, String)]| {
        seen.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("x-request-id"))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(backend_id(&seen).as_deref(), Some(kept));

    // No id, and one that is too long: both get a new one, the same at the backend, in the
    // answer and in the log.
    let too_long = "x".repeat(129);
    let mut generated = Vec::new();
    for headers in [vec![], vec![("X-Request-Id", too_long.as_str())]] {
        let r = block_on(request_from(None, sy.addr, "GET", "/app/", &headers)).expect("request");
        let id = r.header("x-request-id").expect("an id").to_string();
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        assert_eq!(backend_id(&a.last_headers()).as_deref(), Some(id.as_str()));
        generated.push(id);
    }
    assert_ne!(generated[0], generated[1]);

    // Our own answer (no route) has an id and a line too.
    let r = get(sy.addr, "/elsewhere");
    assert_eq!(r.status, 404);
    let not_found_id = r.header("x-request-id").expect("an id").to_string();

    wait_for_lines(&file, 4);
    let lines = json_lines(&file);
    assert_eq!(lines.len(), 4, "one line per request: {lines:?}");
    // Found by request id: with two workers, a request's line may be written after the next
    // request's (each is handed to the writer once its answer has gone out).
    let line = |id: &str| {
        lines
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("no line for request {id}: {lines:?}"))
    };
    let first = line(kept);
    for field in [
        "time",
        "client",
        "method",
        "host",
        "path",
        "status",
        "bytes_sent",
        "duration_ms",
        "route",
        "upstream",
        "backend",
        "request_id",
        "protocol",
        "retries",
        "user_agent",
    ] {
        assert!(first.get(field).is_some(), "{field} missing in {first}");
    }
    assert_eq!(first["client"], "127.0.0.1");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["host"], "shop.test");
    assert_eq!(first["path"], "/app/cart");
    assert_eq!(first["query"], "id=1");
    assert_eq!(first["status"], 200);
    assert_eq!(first["bytes_sent"], body_len);
    assert!(first["duration_ms"].as_f64().is_some_and(|ms| ms > 0.0));
    assert_eq!(first["route"], "app");
    assert_eq!(first["upstream"], "pool");
    assert_eq!(first["backend"], a.addr.to_string());
    assert_eq!(first["request_id"], kept);
    assert_eq!(first["protocol"], "HTTP/1.1");
    assert_eq!(first["retries"], 0);
    assert_eq!(first["user_agent"], "probe/1.0");
    assert!(
        first["time"]
            .as_str()
            .is_some_and(|t| t.len() == 24 && t.ends_with('Z')),
        "{first}"
    );
    line(&generated[0]);
    line(&generated[1]);
    let not_found = line(&not_found_id);
    assert_eq!(not_found["status"], 404);
    assert_eq!(not_found["request_id"], not_found_id.as_str());
    assert_eq!(not_found["route"], Value::Null);
    assert_eq!(not_found["backend"], Value::Null);
}

fn logged_yaml(upstream: SocketAddr, access_log: &str) -> String {
    format!(
        "server:\n  threads: 2\n  grace_period: 5s\n  debug_headers: true\n  upgrade_socket: {{upgrade_socket}}\nlisteners:\n  - address: {{listen}}\nadmin:\n  address: {{admin}}\nmetrics:\n  address: {{metrics}}\naccess_log:\n{access_log}upstreams:\n  pool:\n    backends:\n      - address: {upstream}\nroutes:\n  - name: app\n    path_prefix: /app\n    split:\n      pool: 1\n"
    )
}

#[test]
fn sigusr1_reopens_after_rotation_and_a_reload_switches_path_and_format() {
    let a = TestBackend::start("a");
    let sy = Switchyard::start(&logged_yaml(a.addr, "  path: {dir}/access.log\n"));
    let file = sy.dir.join("access.log");
    assert_eq!(get(sy.addr, "/app/one").status, 200);
    wait_for_lines(&file, 1);

    // logrotate: move, then SIGUSR1 (postrotate); the next line is in a new file.
    let rotated = sy.dir.join("access.log.1");
    std::fs::rename(&file, &rotated).expect("rotate");
    sy.signal("USR1");
    // The reopen creates the file under its path again.
    wait_until("the access log reopened", Duration::from_secs(10), || {
        file.exists()
    });
    assert_eq!(get(sy.addr, "/app/two").status, 200);
    let new = wait_for_lines(&file, 1);
    assert!(new[0].contains("\"path\":\"/app/two\""), "{new:?}");
    assert_eq!(wait_for_lines(&rotated, 1).len(), 1);

    // A reload to another file in combined format.
    sy.write_config(&logged_yaml(
        a.addr,
        "  path: {dir}/combined.log\n  format: combined\n",
    ));
    let r = sy.api("POST", "/api/v1/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(sy.addr, "/app/three").status, 200);
    let combined = sy.dir.join("combined.log");
    let lines = wait_for_lines(&combined, 1);
    assert!(
        lines[0].starts_with("127.0.0.1 - - [")
            && lines[0].contains("] \"GET /app/three HTTP/1.1\" 200 "),
        "{lines:?}"
    );

    // A path that cannot be opened refuses the reload, and the log stays where it was.
    sy.write_config(&logged_yaml(a.addr, "  path: {dir}/no/such/dir/x.log\n"));
    let r = sy.api("POST", "/api/v1/reload", None);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("access_log.path") && r.text().contains("no/such/dir/x.log"),
        "{}",
        r.text()
    );
    assert_eq!(get(sy.addr, "/app/four").status, 200);
    let lines = wait_for_lines(&combined, 2);
    assert!(lines[1].contains("GET /app/four HTTP/1.1"), "{lines:?}");
}

#[test]
fn stdout_takes_the_log_when_asked() {
    let a = TestBackend::start("a");
    let sy = Switchyard::start(&logged_yaml(a.addr, "  path: stdout\n  format: combined\n"));
    assert_eq!(get(sy.addr, "/app/out").status, 200);
    let lines = wait_for_lines(&sy.dir.join("stdout.log"), 1);
    assert!(
        lines[0].contains("\"GET /app/out HTTP/1.1\" 200"),
        "{lines:?}"
    );
}

/// The log goes to a pipe that nobody reads: once the pipe and the small buffer are full,
/// lines are dropped and counted, and every request is still answered, promptly.
#[test]
fn a_blocked_writer_drops_and_counts_lines_and_never_delays_a_request() {
    let a = TestBackend::start("a");
    let fifo = temp_path("access.fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().expect("utf-8 path")).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    // A reader that never reads, so that the writer's open does not wait and its writes block.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("fifo reader");
    let sy = Switchyard::start(&logged_yaml(
        a.addr,
        &format!("  path: {}\n  buffer_lines: 4\n", fifo.display()),
    ));
    // ~2 KB lines: the 64 KiB pipe holds about 30 of them.
    let path = format!("/app/{}", "p".repeat(2000));
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for _ in 0..300 {
        let one = Instant::now();
        assert_eq!(get(sy.addr, &path).status, 200);
        slowest = slowest.max(one.elapsed());
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert!(
        slowest < Duration::from_secs(2),
        "slowest request {slowest:?}"
    );
    let dropped = sample(&sy.scrape(), "switchyard_access_log_dropped_total").unwrap_or(0.0);
    assert!(dropped >= 200.0, "{dropped} lines dropped");
}

#[test]
fn a_retry_that_succeeded_is_one_line_and_pingora_is_quiet_by_default() {
    let a = TestBackend::start("a");
    // Bound but not listening, and held: a connect is refused, and no other test can take
    // the port meanwhile.
    let (dead, _held) = refusing_address();
    let yaml = one_upstream("round_robin", &[(dead, 1), (a.addr, 1)], "").replace(
        "listeners:",
        "access_log:\n  path: {dir}/access.log\nlisteners:",
    );
    // RUST_LOG unset: the binary's own default filter.
    let sy = Switchyard::start_with_env(&yaml, &[("RUST_LOG", "")]);
    for _ in 0..4 {
        assert_eq!(get(sy.addr, "/").status, 200);
    }
    let lines = {
        wait_for_lines(&sy.dir.join("access.log"), 4);
        json_lines(&sy.dir.join("access.log"))
    };
    let retried = lines.iter().filter(|l| l["retries"] == 1).count();
    assert!(retried >= 1, "{lines:?}");
    assert!(lines
        .iter()
        .all(|l| l["status"] == 200 && l["backend"] == a.addr.to_string().as_str()));
    let log = sy.log_text();
    let ours = log.matches("retrying on").count();
    assert_eq!(ours, retried, "{log}");
    assert!(!log.contains("Fail to proxy"), "{log}");
    assert!(!log.contains("INFO  pingora"), "{log}");
    assert!(log.contains("INFO  switchyard"), "{log}");
}

#[test]
fn an_upgrade_logs_no_error_while_it_waits_for_the_sockets() {
    let a = TestBackend::start("a");
    // The binary's default log filter (RUST_LOG unset).
    let mut sy = Switchyard::start_with_env(
        &one_upstream("round_robin", &[(a.addr, 1)], ""),
        &[("RUST_LOG", "")],
    );
    sy.upgrade_after_waiting();
    assert_eq!(get(sy.addr, "/").status, 200);
    let log = sy.log_text();
    assert!(!log.contains(" ERROR "), "{log}");
    assert!(!log.contains("No incoming socket transfer"), "{log}");
    assert_eq!(
        log.matches("upgrade: waiting for the running process")
            .count(),
        1,
        "{log}"
    );
}

/// A socket bound to a loopback port without listening: connecting to it is refused. The
/// descriptor is closed when the returned guard is dropped.
fn refusing_address() -> (SocketAddr, Descriptor) {
    // SAFETY: plain socket calls on a descriptor this function creates and hands on.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let guard = Descriptor(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let bound = libc::bind(fd, std::ptr::addr_of!(addr).cast(), len);
        assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
        let mut len = len;
        let named = libc::getsockname(fd, std::ptr::addr_of_mut!(addr).cast(), &mut len);
        assert_eq!(named, 0, "getsockname: {}", std::io::Error::last_os_error());
        let port = u16::from_be(addr.sin_port);
        (SocketAddr::from(([127, 0, 0, 1], port)), guard)
    }
}

struct Descriptor(libc::c_int);

impl Drop for Descriptor {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe {
            libc::close(self.0);
        }
    }
}

#[test]
fn check_and_run_name_an_access_log_that_cannot_be_written() {
    let a = TestBackend::start("a");
    let dir = temp_path("access-check");
    std::fs::create_dir_all(&dir).expect("dir");
    let missing = dir.join("no-such-dir/access.log");
    let yaml = fill(
        &logged_yaml(a.addr, &format!("  path: {}\n", missing.display()))
            .replace("{admin}", "127.0.0.1:1")
            .replace("{metrics}", "127.0.0.1:2"),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let file = dir.join("switchyard.yaml");
    std::fs::write(&file, yaml).expect("write");
    let (code, _, err) = run_binary(&["check", "--config", file.to_str().expect("utf-8")]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.trim(),
        format!(
            "access_log.path: {}: directory {} does not exist",
            missing.display(),
            missing.parent().expect("parent").display()
        )
    );
    let (code, _, err) = run_binary(&["run", "--config", file.to_str().expect("utf-8")]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("access_log.path: ") && err.contains("cannot open for appending"),
        "{err}"
    );
}

/// A pipe nobody reads as the new path: the reload is refused at once (it would otherwise wait
/// in `open` for a reader), naming the pipe, and the process still stops on SIGTERM.
#[test]
fn a_pipe_without_a_reader_refuses_the_reload_and_blocks_nothing() {
    let a = TestBackend::start("a");
    let mut sy = Switchyard::start(&logged_yaml(a.addr, "  path: {dir}/access.log\n"));
    let fifo = sy.dir.join("nobody-reads.fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().expect("utf-8 path")).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    sy.write_config(&logged_yaml(
        a.addr,
        &format!("  path: {}\n", fifo.display()),
    ));
    let r = sy.api("POST", "/api/v1/reload", None);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("it is a pipe that no process reads"),
        "{}",
        r.text()
    );
    // SIGHUP takes the same way, off the signal task; SIGTERM is heard right after.
    sy.signal("HUP");
    assert_eq!(get(sy.addr, "/app/still").status, 200);
    sy.signal("TERM");
    let status = sy.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

/// logrotate's SIGUSR1 (or a SIGHUP) that arrives while the process is still starting (from
/// its first log line, before the server runs and listens for signals) does not end it.
#[test]
fn sigusr1_and_sighup_during_start_up_do_not_kill_the_process() {
    let a = TestBackend::start("a");
    let yaml = one_upstream("round_robin", &[(a.addr, 1)], "");
    let config = temp_path("early-signals.yaml");
    let log = config.with_file_name("early-signals.log");
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let text = fill(&yaml, listen).replace("threads: 2", "threads: 2\n  max_connections: 1000");
    std::fs::write(&config, text).expect("config");
    let mut child = ChildKiller(
        std::process::Command::new(BINARY)
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn"),
    );
    let pid = child.0.id() as libc::pid_t;
    let signal = || {
        // SAFETY: signalling the child this test started.
        unsafe {
            libc::kill(pid, libc::SIGUSR1);
            libc::kill(pid, libc::SIGHUP);
        }
    };
    wait_until("the first log line", Duration::from_secs(10), || {
        let started = !std::fs::read_to_string(&log).unwrap_or_default().is_empty();
        if started {
            signal();
        }
        started
    });
    // And on while it starts, until it listens.
    wait_until("the proxy to listen", Duration::from_secs(10), || {
        signal();
        std::net::TcpStream::connect(listen).is_ok()
    });
    assert!(
        child.0.try_wait().expect("wait").is_none(),
        "the process died of an early signal:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

struct ChildKiller(std::process::Child);

impl Drop for ChildKiller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Heads the connection refuses before Pingora parses them (`431`, `414`) are logged too,
/// without a request line (`"-"`, as nginx logs a request it could not read).
#[test]
fn heads_refused_unread_get_a_line_too() {
    let a = TestBackend::start("a");
    let yaml = logged_yaml(a.addr, "  path: {dir}/access.log\n  format: combined\n").replace(
        "  debug_headers: true\n",
        "  debug_headers: true\n  max_request_header_bytes: 4096\n",
    );
    let sy = Switchyard::start(&yaml);
    let big = "b".repeat(5000);
    let r = block_on(request_from(
        None,
        sy.addr,
        "GET",
        "/app/",
        &[("X-Big", &big)],
    ))
    .expect("431");
    assert_eq!(r.status, 431);
    let long = format!("/app/{}", "l".repeat(5000));
    let r = block_on(request_from(None, sy.addr, "GET", &long, &[])).expect("414");
    assert_eq!(r.status, 414);
    let lines = wait_for_lines(&sy.dir.join("access.log"), 2);
    assert_eq!(lines.len(), 2, "{lines:?}");
    // In either order: the two connections may be served by different workers.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("127.0.0.1 - - [") && l.contains("] \"-\" 431 ")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("] \"-\" 414 ")),
        "{lines:?}"
    );
}
