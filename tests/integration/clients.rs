//! Hostile and broken clients against the real binary, with raw sockets: the head bytes exactly
//! as an attacker sends them. Client timeouts and limits, pipelining, host handling, and what
//! reaches the log.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::fixtures::*;

/// Upstreams `app` behind a catch-all route and `api` behind `api.example.com`, one backend,
/// with metrics and admin; `server` lines go under `server:`.
fn config(backend: SocketAddr, server: &str) -> String {
    config_with(backend, server, "")
}

/// [`config`] with `upstream` lines in each upstream.
fn config_with(backend: SocketAddr, server: &str, upstream: &str) -> String {
    format!(
        "server:\n  threads: 2\n  grace_period: 5s\n  upgrade_socket: {{upgrade_socket}}\n{server}listeners:\n  - address: {{listen}}\nmetrics:\n  address: {{metrics}}\nadmin:\n  address: {{admin}}\nupstreams:\n  app:\n{upstream}    backends:\n      - address: {backend}\n  api:\n{upstream}    backends:\n      - address: {backend}\nroutes:\n  - name: api\n    host: api.example.com\n    split:\n      api: 1\n  - name: web\n    split:\n      app: 1\n"
    )
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect")
}

/// Everything the server sends until it closes (or resets), within `limit`; `None` if the
/// connection is still open then.
async fn until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut buf = [0u8; 8192];
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends `bytes` on a new connection; everything the server sends until it closes.
async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = connect(addr).await;
    stream.write_all(bytes).await.expect("send");
    until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("closed")
}

fn status_of(answer: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(answer.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

fn rejected(sy: &Switchyard, reason: &str) -> f64 {
    sample(
        &sy.scrape(),
        &format!("switchyard_client_connections_rejected_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_keepalive_timeout_also_after_its_first_request() {
    let backend = TestBackend::start("app");
    let sy = Switchyard::start(&config(backend.addr, "  keepalive_timeout: 600ms\n"));
    block_on(async {
        let mut stream = connect(sy.addr).await;
        stream
            .write_all(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("send");
        let mut reader = BufReader::new(&mut stream);
        let first = read_response(&mut reader).await.expect("first answer");
        assert_eq!(first.status, 200);
        let answered = Instant::now();
        let rest = until_closed(&mut stream, Duration::from_secs(5))
            .await
            .expect("the idle connection is closed");
        let idle = answered.elapsed();
        assert!(rest.is_empty(), "closed silently, got {rest:?}");
        assert!(
            idle >= Duration::from_millis(300) && idle < Duration::from_secs(3),
            "closed after {idle:?}, keepalive_timeout is 600ms"
        );
        // A fresh connection that never sends: the header timeout (default 10 s) is longer,
        // so the keep-alive timeout is not what closes it... but its first request is still
        // served normally.
        let again = request_from(None, sy.addr, "GET", "/two", &[])
            .await
            .expect("answer");
        assert_eq!(again.status, 200);
    });
}

#[test]
fn a_head_trickled_in_a_byte_at_a_time_is_cut_off_first_silently_then_with_408() {
    let backend = TestBackend::start("app");
    let sy = Switchyard::start(&config(backend.addr, "  header_timeout: 700ms\n"));
    block_on(async {
        // First request of a connection: a byte every 100 ms never completes in 700 ms.
        let mut stream = connect(sy.addr).await;
        let started = Instant::now();
        let head =
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        // What the server sent before it closed; `None` while it is open.
        let mut closed_with = None;
        for byte in head {
            if stream.write_all(&[*byte]).await.is_err() {
                closed_with = Some(Vec::new());
                break;
            }
            let mut buf = [0u8; 4096];
            match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
                Ok(Ok(n)) => {
                    closed_with = Some(buf[..n].to_vec());
                    break;
                }
                Ok(Err(_)) => {
                    closed_with = Some(Vec::new());
                    break;
                }
                Err(_) => {}
            }
            assert!(started.elapsed() < Duration::from_secs(5), "never cut off");
        }
        // A new connection's first head: closed silently, 700 ms after the accept.
        let answer = closed_with.expect("closed before the head was complete");
        assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
        let cut = started.elapsed();
        assert!(
            cut >= Duration::from_millis(600) && cut < Duration::from_secs(3),
            "cut off after {cut:?}"
        );

        // A later request on a keep-alive connection: its own header_timeout from its first
        // byte, however long the connection was idle before.
        let mut stream = connect(sy.addr).await;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("send");
        let first = read_response(&mut BufReader::new(&mut stream))
            .await
            .expect("first answer");
        assert_eq!(first.status, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream.write_all(b"GET / HT").await.expect("part of a head");
        let began = Instant::now();
        let answer = until_closed(&mut stream, Duration::from_secs(5))
            .await
            .expect("closed");
        assert_eq!(status_of(&answer), Some(408), "{answer:?}");
        assert!(began.elapsed() >= Duration::from_millis(600));

        // A connection that sends nothing at all is closed silently.
        let mut silent = connect(sy.addr).await;
        let answer = until_closed(&mut silent, Duration::from_secs(5))
            .await
            .expect("closed");
        assert!(answer.is_empty(), "{answer:?}");
    });
    assert!(rejected(&sy, "header_timeout") >= 3.0);
}

#[test]
fn heads_over_max_request_header_bytes_get_431_and_long_request_lines_414() {
    let backend = TestBackend::start("app");
    let sy = Switchyard::start(&config(backend.addr, "  max_request_header_bytes: 4096\n"));
    block_on(async {
        let big_header = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
            "b".repeat(5000)
        );
        let long_line = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "p".repeat(5000));
        for (head, want) in [(big_header, 431), (long_line, 414)] {
            let mut stream = connect(sy.addr).await;
            // Sent in pieces, as a client whose head is still arriving.
            for piece in head.as_bytes().chunks(1000) {
                if stream.write_all(piece).await.is_err() {
                    break;
                }
            }
            let answer = until_closed(&mut stream, Duration::from_secs(5))
                .await
                .expect("closed");
            assert_eq!(
                status_of(&answer),
                Some(want),
                "{:?}",
                String::from_utf8_lossy(&answer)
            );
        }
        // A blank line before the request line (which the parser skips) is not the end of a
        // head: the limit still holds.
        let mut stream = connect(sy.addr).await;
        let sneaky = format!(
            "\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
            "b".repeat(50_000)
        );
        let _ = stream.write_all(sneaky.as_bytes()).await;
        let answer = until_closed(&mut stream, Duration::from_secs(5))
            .await
            .expect("closed");
        assert_eq!(
            status_of(&answer),
            Some(431),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
        // ... and a request behind one is served.
        let answer = send_raw(
            sy.addr,
            b"\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(
            status_of(&answer),
            Some(200),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );

        // Just under the limit, in pieces, with a body right behind it: served.
        let fits = format!(
            "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-Fill: {}\r\n\r\nhello",
            "f".repeat(3900)
        );
        let mut stream = connect(sy.addr).await;
        for piece in fits.as_bytes().chunks(700) {
            stream.write_all(piece).await.expect("send");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let answer = read_response(&mut BufReader::new(&mut stream))
            .await
            .expect("answer");
        assert_eq!(answer.status, 200);
        assert_eq!(answer.text(), "5");
    });
    assert_eq!(rejected(&sy, "header_too_large"), 3.0);
}

#[test]
fn past_max_connections_a_new_connection_is_closed_unread_and_the_others_go_on() {
    let backend = TestBackend::start("app");
    // One listening socket: its backlog is first in, first out, so once a request of ours is
    // answered every start-up probe's connection has been accepted (with two, a probe could
    // still wait in the backlog of a worker not yet accepting, and take a place later).
    let sy = Switchyard::start(
        &config(backend.addr, "  max_connections: 3\n").replace("  threads: 2\n", "  threads: 1\n"),
    );
    let ask = |stream: &mut TcpStream| {
        block_on(async {
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                .await
                .expect("send");
            read_response(&mut BufReader::new(stream))
                .await
                .expect("answer")
                .status
        })
    };
    assert_eq!(get(sy.addr, "/").status, 200);
    // The start-up probes' connections may still hold their places for a moment on a busy host.
    wait_until("no client connection open", Duration::from_secs(5), || {
        sample(&sy.scrape(), "switchyard_client_connections") == Some(0.0)
    });
    let mut open: Vec<TcpStream> = (0..3).map(|_| block_on(connect(sy.addr))).collect();
    for stream in &mut open {
        assert_eq!(ask(stream), 200);
    }
    // The scrape is a connection of the metrics listener, not of the proxy's.
    assert_eq!(
        sample(&sy.scrape(), "switchyard_client_connections"),
        Some(3.0)
    );
    let refused = block_on(async {
        let mut refused = connect(sy.addr).await;
        let _ = refused
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await;
        until_closed(&mut refused, Duration::from_secs(5)).await
    });
    assert_eq!(refused, Some(Vec::new()), "the fourth is closed unanswered");
    for stream in &mut open {
        assert_eq!(ask(stream), 200, "the three are unaffected");
    }
    drop(open.pop());
    wait_until(
        "the closed connection to be counted",
        Duration::from_secs(5),
        || sample(&sy.scrape(), "switchyard_client_connections") == Some(2.0),
    );
    assert_eq!(get(sy.addr, "/").status, 200, "a place is free again");
    assert_eq!(rejected(&sy, "limit"), 1.0);
}

#[test]
fn a_stalled_body_gets_408_and_an_oversized_one_413() {
    let backend = TestBackend::start("app");
    let sy = Switchyard::start(&config(
        backend.addr,
        "  body_timeout: 500ms\n  max_request_body_bytes: 1000\n",
    ));
    block_on(async {
        let mut stream = connect(sy.addr).await;
        stream
            .write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
            .await
            .expect("send");
        let started = Instant::now();
        let answer = until_closed(&mut stream, Duration::from_secs(5))
            .await
            .expect("closed");
        assert_eq!(
            status_of(&answer),
            Some(408),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
        assert!(started.elapsed() >= Duration::from_millis(400));

        let big = vec![b'x'; 2000];
        let answer = send(sy.addr, "POST", "/upload", &[], Some(&big))
            .await
            .expect("answer");
        assert_eq!(answer.status, 413);

        // A chunked body has no length to check up front: refused once it is over the limit.
        let mut stream = connect(sy.addr).await;
        let chunk = format!("{:x}\r\n{}\r\n", 600, "y".repeat(600));
        let head = "POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        stream.write_all(head.as_bytes()).await.expect("head");
        for _ in 0..2 {
            let _ = stream.write_all(chunk.as_bytes()).await;
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
        let answer = until_closed(&mut stream, Duration::from_secs(5))
            .await
            .expect("closed");
        assert_eq!(
            status_of(&answer),
            Some(413),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );

        let fits = vec![b'z'; 1000];
        let answer = send(sy.addr, "POST", "/upload", &[], Some(&fits))
            .await
            .expect("answer");
        assert_eq!(answer.status, 200);
        assert_eq!(answer.text(), "1000");
    });
    assert_eq!(rejected(&sy, "body_timeout"), 1.0);
    assert_eq!(rejected(&sy, "body_too_large"), 2.0);
}

#[test]
fn a_client_that_reads_nothing_of_the_answer_is_closed_after_send_timeout() {
    let backend = TestBackend::start("app");
    let sy = Switchyard::start(&config(backend.addr, "  send_timeout: 500ms\n"));
    let size = 256 * 1024 * 1024;
    let mut stream = block_on(async {
        let mut stream = connect(sy.addr).await;
        stream
            .write_all(format!("GET /download/{size} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .expect("send");
        stream
    });
    // Nothing is read while the balancer fills the socket buffers and then waits.
    wait_until("the send timeout", Duration::from_secs(10), || {
        rejected(&sy, "send_timeout") >= 1.0
    });
    let got = block_on(until_closed(&mut stream, Duration::from_secs(10))).expect("closed");
    assert!(got.len() < size, "all {} bytes arrived", got.len());
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let backend = TestBackend::start("app");
    let sy = Switchyard::start(&config(backend.addr, ""));
    block_on(async {
        let mut stream = connect(sy.addr).await;
        let burst = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nPOST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /c HTTP/1.1\r\nHost: api.example.com\r\n\r\n";
        stream.write_all(burst).await.expect("one write");
        let mut reader = BufReader::new(&mut stream);
        let mut answers = Vec::new();
        for _ in 0..3 {
            answers.push(read_response(&mut reader).await.expect("an answer"));
        }
        assert!(answers.iter().all(|a| a.status == 200));
        assert_eq!(answers[1].text(), "3", "the POST's body went to the POST");
        assert!(answers
            .iter()
            .all(|a| a.header("connection") != Some("close")));

        // Many at once, more than any one read takes, some with bodies, the first head split
        // across writes: every one answered, in order.
        let mut stream = connect(sy.addr).await;
        let mut burst = Vec::new();
        for i in 0..200 {
            if i % 10 == 3 {
                burst.extend_from_slice(
                    format!("POST /upload HTTP/1.1\r\nHost: a\r\nX-N: {i}\r\nContent-Length: {}\r\n\r\n{}", i, "u".repeat(i)).as_bytes(),
                );
            } else {
                burst.extend_from_slice(
                    format!(
                        "GET /{i} HTTP/1.1\r\nHost: a\r\nX-Pad: {}\r\n\r\n",
                        "p".repeat(i * 5)
                    )
                    .as_bytes(),
                );
            }
        }
        stream.write_all(&burst[..20]).await.expect("first part");
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream.write_all(&burst[20..]).await.expect("the rest");
        let mut reader = BufReader::new(&mut stream);
        for i in 0..200 {
            let answer = tokio::time::timeout(Duration::from_secs(5), read_response(&mut reader))
                .await
                .unwrap_or_else(|_| panic!("no answer {i} within 5 s"))
                .unwrap_or_else(|e| panic!("answer {i}: {e}"));
            assert_eq!(answer.status, 200, "answer {i}");
            if i % 10 == 3 {
                assert_eq!(answer.text(), i.to_string(), "answer {i} is the POST's");
            }
        }

        // The other direction: a request that asks to close ends the connection after its
        // answer, which says so; what was pipelined behind it is not processed.
        let mut stream = connect(sy.addr).await;
        let before = backend.requests();
        stream
            .write_all(b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("one write");
        let all = until_closed(&mut stream, Duration::from_secs(5))
            .await
            .expect("closed after the first answer");
        let text = String::from_utf8_lossy(&all);
        assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
        assert_eq!(backend.requests(), before + 1);
    });
}

/// A backend that answers every request with `answer`, as written, on keep-alive connections.
async fn raw_backend(answer: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut have = 0;
                loop {
                    match stream.read(&mut buf[have..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                    if buf[..have].windows(4).any(|w| w == b"\r\n\r\n") {
                        have = 0;
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn routing_and_the_forwarded_host_always_agree() {
    let backend = TestBackend::start("app");
    let sy = Switchyard::start(&config(backend.addr, ""));
    let raw = |bytes: &'static [u8]| {
        block_on(async {
            let mut stream = connect(sy.addr).await;
            stream.write_all(bytes).await.expect("send");
            until_closed(&mut stream, Duration::from_secs(5))
                .await
                .expect("closed")
        })
    };
    let header = |name: &str| {
        backend
            .last_headers()
            .into_iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect::<Vec<_>>()
    };

    // HTTP/1.1 without Host, with or without an absolute-form target: 400.
    for bad in [
        &b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
        b"GET http://api.example.com/ HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET http://api.example.com/ HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a/b\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a..b\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\nConnection: close\r\n\r\n",
    ] {
        let before = backend.requests();
        let answer = raw(bad);
        assert_eq!(
            status_of(&answer),
            Some(400),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
        assert_eq!(
            backend.requests(),
            before,
            "{:?} reached the backend",
            String::from_utf8_lossy(bad)
        );
    }

    // HTTP/1.0 with an absolute-form target and no Host: routed on the target's host, which
    // the backend gets as Host and X-Forwarded-Host; a client's own X-Forwarded-Host is gone.
    let answer =
        raw(b"GET http://api.example.com/x HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\n\r\n");
    assert_eq!(status_of(&answer), Some(200));
    assert_eq!(
        header("host"),
        ["api.example.com"],
        "{:?}",
        backend.last_headers()
    );
    assert_eq!(
        header("x-forwarded-host"),
        ["api.example.com"],
        "{:?}",
        backend.last_headers()
    );
    let routed = sample(
        &sy.scrape(),
        &format!("switchyard_requests_total{{backend=\"{}\",route=\"api\",status=\"200\",upstream=\"api\"}}", backend.addr),
    );
    assert_eq!(routed, Some(1.0));

    // HTTP/1.0 without any host: the default route, no Host, and no X-Forwarded-Host either.
    let answer = raw(
        b"GET /y HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n\r\n",
    );
    assert_eq!(status_of(&answer), Some(200));
    assert!(header("host").is_empty(), "{:?}", header("host"));
    assert!(header("x-forwarded-host").is_empty());
    assert_eq!(header("x-forwarded-proto"), ["http"]);

    // A trailing dot is the same host for routing; the client's Host goes on unchanged.
    let answer = raw(b"GET / HTTP/1.1\r\nHost: API.example.com.:8080\r\nX-Forwarded-For: 10.1.2.3\r\nConnection: close\r\n\r\n");
    assert_eq!(status_of(&answer), Some(200));
    assert_eq!(header("host"), ["API.example.com.:8080"]);
    assert_eq!(header("x-forwarded-host"), ["API.example.com.:8080"]);
    assert_eq!(header("x-forwarded-for"), ["10.1.2.3, 127.0.0.1"]);
    let routed = sample(
        &sy.scrape(),
        &format!("switchyard_requests_total{{backend=\"{}\",route=\"api\",status=\"200\",upstream=\"api\"}}", backend.addr),
    );
    assert_eq!(routed, Some(2.0));

    // The same Content-Length twice is one request body, and the backend gets it once.
    let answer = raw(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc");
    assert_eq!(status_of(&answer), Some(200));
    assert_eq!(header("content-length"), ["3"]);
}

#[test]
fn a_204_goes_out_without_content_length() {
    let backend = block_on(async {
        let addr =
            raw_backend(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-From: raw\r\n\r\n")
                .await;
        addr
    });
    let sy = Switchyard::start(&config(backend, ""));
    let answer = block_on(async {
        let mut stream = connect(sy.addr).await;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .expect("send");
        until_closed(&mut stream, Duration::from_secs(5))
            .await
            .expect("closed")
    });
    let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 204"), "{text}");
    assert!(text.contains("x-from: raw"), "{text}");
    assert!(!text.contains("content-length"), "{text}");
}

#[test]
fn credentials_in_a_malformed_head_never_reach_the_log() {
    let backend = TestBackend::start("app");
    let token = temp_path("admin.token");
    std::fs::write(&token, "adm1n-t0ken-s3cret\n").expect("token");
    let yaml = config(backend.addr, "").replace(
        "  address: {admin}\n",
        &format!("  address: {{admin}}\n  token_file: {}\n", token.display()),
    );
    let sy = Switchyard::start_with_env(&yaml, &[("RUST_LOG", "trace")]);
    block_on(async {
        for (addr, head) in [
            (
                sy.admin,
                "GET /api/v1/routes HTTP/1.1\r\nAuthorization: Bearer adm1n-t0ken-s3cret\r\nBad\x01Header: x\r\n\r\n",
            ),
            (
                sy.addr,
                "GET / HTTP/1.1\r\nHost: a\r\nCookie: session=c00kie-s3cret\r\nBad\x01Header: x\r\n\r\n",
            ),
            // A well-formed request too: its head is logged at trace by Pingora.
            (
                sy.addr,
                "GET / HTTP/1.1\r\nHost: a\r\nCookie: session=c00kie-s3cret\r\nAuthorization: Basic YXV0aC1zM2NyZXQ=\r\nConnection: close\r\n\r\n",
            ),
        ] {
            let mut stream = connect(addr).await;
            stream.write_all(head.as_bytes()).await.expect("send");
            // Answered (400 on the proxy port) or just closed (the admin port): either way
            // over before the log is read.
            until_closed(&mut stream, Duration::from_secs(5))
                .await
                .expect("closed");
        }
    });
    wait_until("the requests to be logged", Duration::from_secs(5), || {
        sy.log_text().contains("Fail to proxy") || sy.log_text().contains("fails to read")
    });
    let log = sy.log_text();
    for secret in ["adm1n-t0ken-s3cret", "c00kie-s3cret", "YXV0aC1zM2NyZXQ="] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

#[test]
fn running_out_of_file_descriptors_is_not_blamed_on_the_backend() {
    // Every request needs a new backend connection: none is kept for reuse.
    let backend = block_on(raw_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    ));
    // 20 connections need 2 * 20 + 256 descriptors, which is all the process gets.
    // A backend taken out would stay out for the whole test.
    let yaml = config_with(
        backend,
        "  max_connections: 20\n",
        "    failure_cooldown: 60s\n",
    );
    let sy = Switchyard::start_with_open_files(&yaml, 296);
    let healthy = || {
        let view: serde_json::Value =
            serde_json::from_str(&sy.api("GET", "/api/v1/upstreams/app", None).text())
                .expect("json");
        view["backends"][0]["healthy"] == serde_json::Value::Bool(true)
    };
    assert!(healthy());
    let mut clients: Vec<TcpStream> = (0..4).map(|_| block_on(connect(sy.addr))).collect();
    // The admin listener has no connection limit: idle connections to it use up every
    // descriptor the process has left, until its accept fails.
    let mut hogs = Vec::new();
    let exhausted = |hogs: &mut Vec<TcpStream>| {
        let failed_accepts = || sy.log_text().matches("Accept() failed").count();
        let before = failed_accepts();
        wait_until(
            "the descriptors to run out",
            Duration::from_secs(20),
            || {
                if hogs.len() < 1000 {
                    block_on(async {
                        for _ in 0..10 {
                            hogs.push(connect(sy.admin).await);
                        }
                    });
                }
                failed_accepts() > before
            },
        );
    };
    for client in &mut clients {
        // Each refused client closes, which frees a descriptor: use it up again first.
        exhausted(&mut hogs);
        let answer = block_on(async {
            client
                .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                .await
                .expect("send");
            read_response(&mut BufReader::new(client))
                .await
                .expect("answer")
        });
        assert_eq!(answer.status, 503);
        assert!(
            answer.text().contains("out of resources"),
            "{}",
            answer.text()
        );
    }
    drop(hogs);
    // Once the pressure is gone the backend serves at once: it was never taken out.
    wait_until(
        "requests to be served again",
        Duration::from_secs(10),
        || block_on(request_from(None, sy.addr, "GET", "/", &[])).is_ok_and(|a| a.status == 200),
    );
    assert!(healthy(), "the backend was taken out");
    let metrics = sy.scrape();
    let local = sample(
        &metrics,
        "switchyard_local_errors_total{kind=\"open_files\"}",
    );
    assert!(local.is_some_and(|n| n >= 4.0), "{local:?}");
    let blamed = sample(
        &metrics,
        &format!("switchyard_upstream_errors_total{{backend=\"{backend}\",kind=\"other\",upstream=\"app\"}}"),
    );
    assert_eq!(blamed.unwrap_or(0.0), 0.0);
    let lines = sy.log_text().matches("ran out of open_files").count();
    assert!(lines <= 2, "{lines} log lines for one burst");
}
