//! What the proxy does to a request: headers, retries, timeouts, resets, streaming bodies and
//! WebSocket upgrades.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::fixtures::*;

fn header(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

#[test]
fn forwarding_headers_are_added_and_host_is_kept() {
    let a = TestBackend::start("a");
    let sy = Switchyard::start(&one_upstream("round_robin", &[(a.addr, 1)], ""));
    let r = block_on(request_from(
        None,
        sy.addr,
        "GET",
        "/",
        &[
            ("Host", "example.org:1234"),
            ("X-Forwarded-For", "10.1.1.1"),
        ],
    ))
    .expect("request");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-switchyard-upstream"),
        None,
        "debug header is off by default"
    );
    let seen = a.last_headers();
    assert_eq!(header(&seen, "host").as_deref(), Some("example.org:1234"));
    assert_eq!(
        header(&seen, "x-forwarded-for").as_deref(),
        Some("10.1.1.1, 127.0.0.1")
    );
    assert_eq!(header(&seen, "x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        header(&seen, "x-forwarded-host").as_deref(),
        Some("example.org:1234")
    );
}

#[test]
fn backend_connections_are_kept_alive_and_reused() {
    let a = TestBackend::start("a");
    let sy = Switchyard::start(&one_upstream("round_robin", &[(a.addr, 1)], ""));
    for _ in 0..30 {
        assert_eq!(get(sy.addr, "/").status, 200);
    }
    // 30 client connections, sequential: the proxy reuses its one idle backend connection
    // (two worker threads may each open one).
    assert_eq!(a.requests(), 30);
    assert!(
        a.connections() <= 2,
        "{} backend connections",
        a.connections()
    );
}

#[test]
fn a_refused_connect_is_retried_on_another_backend() {
    let a = TestBackend::start("a");
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    // No health check: only the retry can save the requests that pick the dead backend.
    let sy = Switchyard::start(&one_upstream("round_robin", &[(dead, 1), (a.addr, 1)], ""));
    for _ in 0..20 {
        let r = get(sy.addr, "/");
        assert_eq!((r.status, r.text()), (200, "a".to_string()));
    }
    assert_eq!(a.requests(), 20);
    assert!(
        sy.log_text().contains(&format!("connect to {dead}")),
        "{}",
        sy.log_text()
    );
}

#[test]
fn a_backend_that_keeps_refusing_is_taken_out_passively_and_tried_again_later() {
    let a = TestBackend::start("a");
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let passive = "    max_connect_failures: 2\n    failure_cooldown: 1s\n";
    let sy = Switchyard::start(&one_upstream(
        "round_robin",
        &[(dead, 1), (a.addr, 1)],
        passive,
    ));
    for _ in 0..20 {
        assert_eq!(get(sy.addr, "/").status, 200);
    }
    let log = sy.log_text();
    assert!(
        log.contains(&format!(
            "backend {dead} taken out after 2 failed connects in a row (passive check), for 1s"
        )),
        "{log}"
    );
    assert_eq!(
        log.matches(&format!("connect to {dead}")).count(),
        2,
        "no attempt once out"
    );
    wait_until("the cooldown to end", Duration::from_secs(5), || {
        sy.log_text()
            .contains(&format!("backend {dead} back in after its cooldown"))
    });
    for _ in 0..4 {
        assert_eq!(get(sy.addr, "/").status, 200);
    }
    assert!(
        sy.log_text().matches(&format!("connect to {dead}")).count() > 2,
        "tried again"
    );
}

#[test]
fn a_post_without_body_is_retried_when_a_reused_connection_was_closed() {
    // The backend closes every connection after its answer without saying so, which makes
    // the proxy's next reuse of it fail before any response byte: the keep-alive race.
    let a = TestBackend::start("a");
    a.set_close_silently(true);
    let sy = Switchyard::start(&one_upstream(
        "round_robin",
        &[(a.addr, 1)],
        "metrics:\n  address: {metrics}\n",
    ));
    let methods = ["GET", "POST", "DELETE", "POST", "GET", "POST"];
    for method in methods {
        let r = block_on(send(sy.addr, method, "/", &[], None)).expect("request");
        assert_eq!(r.status, 200, "{method}: {}", r.text());
    }
    // Pingora pools the backend connection after the answer has gone out and before the
    // request is counted: once counted, the next request is sure to reuse it.
    let series = format!(
        "switchyard_requests_total{{backend=\"{}\",route=\"all\",status=\"200\",upstream=\"pool\"}}",
        a.addr
    );
    wait_until("the last answer counted", Duration::from_secs(5), || {
        sample(&sy.scrape(), &series) == Some(methods.len() as f64)
    });
    // A body may have been consumed: not sent twice.
    let r = block_on(send(sy.addr, "POST", "/upload", &[], Some(b"payload"))).expect("request");
    assert_eq!(r.status, 502);
}

#[test]
fn the_retry_happens_once_and_all_refused_is_502() {
    let a = TestBackend::start("a");
    let dead1: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let dead2: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let sy = Switchyard::start(&one_upstream(
        "round_robin",
        &[(dead1, 1), (dead2, 1), (a.addr, 1)],
        "",
    ));
    let statuses: Vec<u16> = (0..30).map(|_| get(sy.addr, "/").status).collect();
    // A request whose first pick and single retry both meet a dead backend fails: proof that
    // there is one retry, not a walk over the whole pool.
    assert!(
        statuses.contains(&200) && statuses.contains(&502),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 502),
        "{statuses:?}"
    );

    let sy = Switchyard::start(&one_upstream("round_robin", &[(dead1, 1), (dead2, 1)], ""));
    let r = get(sy.addr, "/");
    assert_eq!(r.status, 502);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.text(), "502 Bad Gateway: the backend failed to answer\n");
}

#[test]
fn a_backend_that_is_too_slow_gives_504_and_one_that_resets_gives_502() {
    let a = TestBackend::start("a");
    let timeouts = "    timeouts:\n      read: 300ms\n";
    let sy = Switchyard::start(&one_upstream("round_robin", &[(a.addr, 1)], timeouts));
    let started = Instant::now();
    let r = get(sy.addr, "/slow/3000");
    assert_eq!(r.status, 504);
    assert_eq!(
        r.text(),
        "504 Gateway Timeout: the backend did not answer in time\n"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let r = get(sy.addr, "/reset");
    assert_eq!(r.status, 502);
    assert_eq!(r.text(), "502 Bad Gateway: the backend failed to answer\n");
    assert_eq!(
        get(sy.addr, "/").text(),
        "a",
        "the proxy still serves afterwards"
    );
}

const GIB: u64 = 1 << 30;

/// Peak resident memory of a process, from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_gibibyte_streams_both_ways_with_flat_memory() {
    let a = TestBackend::start("a");
    let sy = Switchyard::start(&one_upstream("round_robin", &[(a.addr, 1)], ""));
    let addr = sy.addr;
    let (downloaded, uploaded_answer) = block_on(async move {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let head = format!("GET /download/{GIB} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.expect("send");
        let mut total = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }

        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {GIB}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.expect("send");
        let chunk = vec![b'u'; 256 * 1024];
        let mut sent = 0u64;
        while sent < GIB {
            stream.write_all(&chunk).await.expect("upload");
            sent += chunk.len() as u64;
        }
        let answer = read_response(&mut BufReader::new(stream))
            .await
            .expect("answer");
        (total, answer.text())
    });
    assert!(
        downloaded > GIB,
        "downloaded {downloaded} bytes (body plus head)"
    );
    assert_eq!(uploaded_answer, GIB.to_string());
    let peak = peak_rss_kib(sy.child.id());
    assert!(
        peak > 0 && peak < 200 * 1024,
        "switchyard peaked at {peak} KiB"
    );
}

#[test]
fn websocket_upgrades_pass_through() {
    let a = TestBackend::start("a");
    let sy = Switchyard::start(&one_upstream("round_robin", &[(a.addr, 1)], ""));
    let addr = sy.addr;
    let echoed = block_on(async move {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut reader = BufReader::new(stream);
        let head = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        reader
            .get_mut()
            .write_all(head.as_bytes())
            .await
            .expect("send");
        let response = read_response(&mut reader).await.expect("101");
        assert_eq!(response.status, 101);
        let mut echoed = Vec::new();
        for message in ["hello", "switchyard"] {
            reader
                .get_mut()
                .write_all(message.as_bytes())
                .await
                .expect("send frame");
            let mut buf = vec![0u8; message.len()];
            tokio::time::timeout(Duration::from_secs(5), reader.read_exact(&mut buf))
                .await
                .expect("echo in time")
                .expect("echo");
            echoed.push(String::from_utf8_lossy(&buf).into_owned());
        }
        echoed
    });
    assert_eq!(echoed, ["hello", "switchyard"]);
}
