//! Process life: graceful stop on SIGTERM and SIGINT, the grace period as an upper bound, and
//! a binary upgrade's hand-over (the demo has its own file, `demo.rs`).

use std::io::Write;
use std::time::{Duration, Instant};

use crate::fixtures::*;

fn stop_with_request_in_flight(signal: &str) {
    let a = TestBackend::start("a");
    let mut sy = Switchyard::start(&one_upstream("round_robin", &[(a.addr, 1)], ""));
    let addr = sy.addr;
    let in_flight =
        runtime().spawn(async move { request_from(None, addr, "GET", "/slow/1000", &[]).await });
    wait_until(
        "the slow request reaches the backend",
        Duration::from_secs(5),
        || a.requests() == 1,
    );
    let signalled = Instant::now();
    sy.signal(signal);
    wait_until("the listener to close", Duration::from_secs(5), || {
        std::net::TcpStream::connect(addr).is_err()
    });
    let response = block_on(in_flight)
        .expect("join")
        .expect("in-flight request");
    assert_eq!((response.status, response.text()), (200, "a".to_string()));
    let status = sy.wait_exit(Duration::from_secs(4));
    assert_eq!(status.code(), Some(0), "{}", sy.log_text());
    // Exits when the request is done, not after the whole 5 s grace period.
    assert!(
        signalled.elapsed() < Duration::from_secs(4),
        "{:?}",
        signalled.elapsed()
    );
}

#[test]
fn sigterm_stops_accepting_finishes_in_flight_requests_and_exits_0() {
    stop_with_request_in_flight("TERM");
}

#[test]
fn sigint_is_as_graceful_as_sigterm() {
    stop_with_request_in_flight("INT");
}

#[test]
fn the_grace_period_bounds_the_wait() {
    let a = TestBackend::start("a");
    let yaml = one_upstream("round_robin", &[(a.addr, 1)], "")
        .replace("grace_period: 5s", "grace_period: 1s");
    let mut sy = Switchyard::start(&yaml);
    let addr = sy.addr;
    let _stuck =
        runtime().spawn(async move { request_from(None, addr, "GET", "/slow/30000", &[]).await });
    wait_until(
        "the stuck request reaches the backend",
        Duration::from_secs(5),
        || a.requests() == 1,
    );
    let signalled = Instant::now();
    sy.signal("TERM");
    let status = sy.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let log = sy.log_text();
    assert!(log.contains("grace period of 1s over with 1 requests in flight"));
    // The grace period as configured, not Pingora's backstop a second later.
    assert!(
        log.contains("draining: up to 1s (server.grace_period) for 1 requests in flight"),
        "{log}"
    );
    assert!(!log.contains("grace period 2s"), "{log}");
}

#[test]
fn the_pid_file_holds_the_serving_pid_through_an_upgrade_and_goes_at_sigterm() {
    let a = TestBackend::start("a");
    let yaml = one_upstream("round_robin", &[(a.addr, 1)], "").replace(
        "  grace_period: 5s\n",
        "  grace_period: 5s\n  pid_file: {dir}/switchyard.pid\n",
    );
    let mut sy = Switchyard::start(&yaml);
    let pid_file = sy.dir.join("switchyard.pid");
    let holds = |pid: u32| std::fs::read_to_string(&pid_file).ok() == Some(format!("{pid}\n"));
    let first = sy.child.id();
    wait_until("the pid file", Duration::from_secs(10), || holds(first));
    sy.upgrade();
    let second = sy.child.id();
    assert_ne!(first, second);
    // The new process wrote its own; the old one, exiting after it, left it alone.
    wait_until("the new pid", Duration::from_secs(10), || holds(second));
    sy.signal("TERM");
    assert_eq!(sy.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(!pid_file.exists(), "removed at exit");
    // A directory that does not exist stops the start before any socket is taken.
    let missing = one_upstream("round_robin", &[(a.addr, 1)], "").replace(
        "  grace_period: 5s\n",
        "  grace_period: 5s\n  pid_file: /nonexistent/switchyard/switchyard.pid\n",
    );
    let path = temp_path("pid.yaml");
    std::fs::write(
        &path,
        fill(&missing, "127.0.0.1:1".parse().expect("address")),
    )
    .expect("write");
    let (code, _, stderr) = run_binary(&["run", "--config", &path.display().to_string()]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with(
            "switchyard: server.pid_file: its directory /nonexistent/switchyard cannot be used: "
        ),
        "{stderr}"
    );
}

#[test]
fn once_handing_over_responses_close_connections_and_admin_changes_wait() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let mut sy = Switchyard::start(&blue_green(blue.addr, green.addr, (1, 0), "", ""));
    let keep_alive_get = |addr| {
        block_on(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            tokio::io::AsyncWriteExt::write_all(&mut stream, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await?;
            read_response(&mut tokio::io::BufReader::new(stream)).await
        })
    };
    let r = keep_alive_get(sy.addr).expect("request");
    assert_ne!(r.header("connection"), Some("close"), "keep-alive before");
    // SIGQUIT with no new process waiting: Pingora keeps accepting for 5 s, then stops.
    sy.signal("QUIT");
    wait_until("the handover mode", Duration::from_secs(5), || {
        let r = block_on(send(
            sy.addr,
            "GET",
            "/",
            &[("Connection", "keep-alive")],
            None,
        ));
        r.is_ok_and(|r| r.header("connection") == Some("close"))
    });
    let r = sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(r#"{"blue": 1, "green": 1}"#),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(sy.api("GET", "/api/v1/routes/web", None).status, 200);
    assert_eq!(sy.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

#[test]
fn a_request_head_still_arriving_when_the_listener_stops_is_answered() {
    let a = TestBackend::start("a");
    let mut sy = Switchyard::start(&one_upstream("round_robin", &[(a.addr, 1)], ""));
    // SIGQUIT with no new process waiting: Pingora tries to hand the sockets over for 5 s,
    // keeps accepting for 5 s more, then stops its listener and drops every connection whose
    // request head it has not read in full.
    sy.signal("QUIT");
    let mut halves: Vec<(Instant, std::net::TcpStream)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(25);
    while !sy.log_text().contains("Broadcasting graceful shutdown") {
        assert!(Instant::now() < deadline, "{}", sy.log_text());
        let mut half = std::net::TcpStream::connect(sy.addr).expect("connect");
        half.write_all(b"GET / HTTP/1.1\r\n").expect("first half");
        halves.push((Instant::now(), half));
        // Pacing of the probe: a new half-sent request every 50 ms until the listener stops.
        std::thread::sleep(Duration::from_millis(50));
    }
    // Connections opened well before the stop (so surely accepted) but within the time a
    // closing process gives a head to arrive.
    let stopped = Instant::now();
    let mut late: Vec<std::net::TcpStream> = halves
        .into_iter()
        .filter(|(opened, _)| {
            let age = stopped - *opened;
            age > Duration::from_millis(300) && age < Duration::from_millis(1200)
        })
        .map(|(_, s)| s)
        .collect();
    assert!(!late.is_empty(), "no connection in the window");
    for stream in &mut late {
        stream.write_all(b"Host: x\r\n\r\n").expect("second half");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut answer = String::new();
        let _ = std::io::Read::read_to_string(stream, &mut answer);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with('a'),
            "answer: {answer:?}"
        );
    }
    assert_eq!(sy.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

#[test]
fn systemd_is_told_when_the_proxy_serves_and_which_pid_is_main() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let socket_path = temp_path("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let sy = Switchyard::start_with_env(
        &blue_green(blue.addr, green.addr, (1, 0), "", ""),
        &[("NOTIFY_SOCKET", &socket_path.display().to_string())],
    );
    let mut message = [0u8; 256];
    let n = socket.recv(&mut message).expect("a notification");
    assert_eq!(
        String::from_utf8_lossy(&message[..n]),
        format!("READY=1\nMAINPID={}\n", sy.child.id())
    );
}

#[test]
fn an_open_websocket_keeps_working_through_sigterm_until_it_closes() {
    let a = TestBackend::start("a");
    let mut sy = Switchyard::start(&one_upstream("round_robin", &[(a.addr, 1)], ""));
    let addr = sy.addr;
    let mut ws = block_on(async move {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut reader = tokio::io::BufReader::new(stream);
        let head = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        tokio::io::AsyncWriteExt::write_all(reader.get_mut(), head.as_bytes())
            .await
            .expect("send");
        assert_eq!(read_response(&mut reader).await.expect("101").status, 101);
        reader
    });
    let echo = |ws: &mut tokio::io::BufReader<tokio::net::TcpStream>, text: &str| {
        block_on(async {
            tokio::io::AsyncWriteExt::write_all(ws.get_mut(), text.as_bytes()).await?;
            let mut buf = vec![0u8; text.len()];
            tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::AsyncReadExt::read_exact(ws, &mut buf),
            )
            .await
            .map_err(std::io::Error::other)??;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
        })
    };
    assert_eq!(echo(&mut ws, "before").expect("echo"), "before");
    sy.signal("TERM");
    wait_until("the listener to close", Duration::from_secs(5), || {
        std::net::TcpStream::connect(addr).is_err()
    });
    assert_eq!(
        echo(&mut ws, "during").expect("echo during the drain"),
        "during"
    );
    let closed = Instant::now();
    drop(ws);
    assert_eq!(sy.wait_exit(Duration::from_secs(5)).code(), Some(0));
    assert!(
        closed.elapsed() < Duration::from_secs(3),
        "exits when the socket closes, not at the grace period"
    );
}

#[test]
fn the_upgrade_script_reads_the_old_pid_from_the_pid_file() {
    let a = TestBackend::start("a");
    let yaml = one_upstream("round_robin", &[(a.addr, 1)], "").replace(
        "  grace_period: 5s\n",
        "  grace_period: 1s\n  pid_file: {dir}/switchyard.pid\n",
    );
    let sy = Switchyard::start(&yaml);
    let pid_file = sy.dir.join("switchyard.pid");
    let old = sy.child.id();
    wait_until("the pid file", Duration::from_secs(10), || {
        std::fs::read_to_string(&pid_file).ok() == Some(format!("{old}\n"))
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/upgrade.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg(&sy.config)
        .arg(BINARY)
        .env("SWITCHYARD_UPGRADE_LOG", &sy.log)
        .output()
        .expect("run upgrade.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let new_pid: u32 = stdout
        .trim()
        .strip_prefix("new pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "{stdout}{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                sy.log_text()
            )
        });
    // Stopped however the test ends: this test started it, through the script.
    struct Stop(u32);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill")
                .arg(self.0.to_string())
                .status();
        }
    }
    let _new = Stop(new_pid);
    assert_ne!(new_pid, old);
    wait_until("the new pid in the file", Duration::from_secs(10), || {
        std::fs::read_to_string(&pid_file).ok() == Some(format!("{new_pid}\n"))
    });
    assert_eq!(get(sy.addr, "/").text(), "a");
}
