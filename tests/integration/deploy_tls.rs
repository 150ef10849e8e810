//! The deploy suite under TLS and HTTP/2: binary upgrades, a certificate reload and SIGTERM
//! under load from clients that speak HTTP/1.1 over TLS (half keep-alive, half a connection and
//! a handshake per request, full or resumed), HTTP/2 over TLS (ALPN h2) and h2c, counting
//! failed requests. The target is zero, as in `deploy.rs`, with whose scenarios these take
//! turns.
//!
//! The HTTP/2 load is h2load (Debian's nghttp2-client), run as a user would run it. What it
//! does when a connection gets a GOAWAY, measured with nghttp2 1.52 against this proxy across
//! an upgrade (frames logged by a relay): it never reconnects. It stops sending on the first
//! GOAWAY and counts every request it had not sent yet as `failed` and `errored` ("Process
//! Request Failure"), while every stream it had sent was answered and none was reset
//! (`30000 total, 7440 started, 7440 done, 7440 succeeded, 22560 failed`; the backend saw
//! 7440). A long h2load run across an upgrade therefore reports as failures requests that never
//! left it. The HTTP/2 scenarios run many short h2load runs in a loop instead, each opening its
//! connections and sending all its requests at once (`-n` = clients × streams, so a GOAWAY can
//! find no request unsent): every request of every run must succeed with a 2xx, and runs keep
//! starting before, during and after the handover, on the old process and on the new one. What
//! a reconnecting client sees of the GOAWAY itself is checked on a connection of our own
//! (`idle_h2`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::certs::{served_serial, Cert, KeyKind};
use crate::deploy::one_at_a_time;
use crate::fixtures::*;
use crate::load::{assert_no_failures, cert_file_id, tls_request, Load, Report, TlsClient};

const CLIENTS: usize = 16;
const PHASE: usize = 400;
const LIMIT: Duration = Duration::from_secs(30);
/// The name every test certificate carries (with 127.0.0.1), sent as SNI by our clients.
const NAME: &str = "localhost";
/// One h2load run: 8 connections with 8 streams each, every request sent at once.
const H2LOAD_RUN: [&str; 6] = ["-c", "8", "-m", "8", "-n", "64"];

/// An ECDSA certificate for `NAME` and 127.0.0.1 in `dir`, as `<stem>.crt` and `<stem>.key`.
fn certificate(dir: &Path, stem: &str) -> Cert {
    certificate_of(dir, stem, KeyKind::EcdsaP256)
}

fn certificate_of(dir: &Path, stem: &str, kind: KeyKind) -> Cert {
    Cert::self_signed(dir, stem, &[NAME, "127.0.0.1"], kind, 30)
}

/// One upstream `web` with `backend` behind a TLS listener on `{listen}` serving `cert` (ALPN
/// h2 and http/1.1), and an h2c listener on `h2c` when given; admin API on `{admin}`.
fn tls_site(backend: SocketAddr, cert: &Cert, h2c: Option<SocketAddr>) -> String {
    let h2c = h2c
        .map(|a| format!("  - address: {a}\n    h2c: true\n"))
        .unwrap_or_default();
    format!(
        "server:\n  threads: 2\n  grace_period: 5s\n  upgrade_socket: {{upgrade_socket}}\n\
         listeners:\n  - address: {{listen}}\n    tls:\n      certificates:\n        - cert: {}\n          key: {}\n    http2: true\n{h2c}\
         admin:\n  address: {{admin}}\n\
         upstreams:\n  web:\n    backends:\n      - address: {backend}\n\
         routes:\n  - name: web\n    split:\n      web: 1\n",
        cert.cert.display(),
        cert.key.display(),
    )
}

/// A directory of its own for a test's certificates.
fn cert_dir() -> PathBuf {
    temp_path("certs")
}

/// Starts Switchyard over TLS and waits until a TLS request gets through: the proxy listens
/// before it may have finished starting every listener.
fn start_tls(yaml: &str, tls: &TlsClient) -> Switchyard {
    let sy = Switchyard::start(yaml);
    let addr = sy.addr;
    wait_until("a TLS request answered", LIMIT, || {
        block_on(tls_request(tls, addr, "/")).is_ok_and(|(r, _)| r.status == 200)
    });
    sy
}

/// How many requests went over connections of their own, and how many reused one.
fn halves(report: &Report) -> (usize, usize) {
    let new = report.samples.iter().filter(|s| s.new_connection).count();
    (new, report.total() - new)
}

#[test]
fn five_binary_upgrades_under_tls_load_fail_nothing() {
    let _one = one_at_a_time();
    let backend = TestBackend::start("blue");
    let cert = certificate(&cert_dir(), "site");
    let tls = TlsClient::trusting(&[&cert.cert], NAME, &[]);
    let mut sy = start_tls(&tls_site(backend.addr, &cert, None), &tls);
    // Half the clients make a full handshake on every new connection, half resume their
    // sessions; a new process knows none of the old one's sessions and must fall back to full
    // handshakes for them.
    let resuming = tls.clone().resuming();
    let loads = [
        Load::start_tls(sy.addr, CLIENTS / 2, &tls),
        Load::start_tls(sy.addr, CLIENTS / 2, &resuming),
    ];
    let run = |loads: &[Load; 2]| {
        for load in loads {
            load.run_for(PHASE / 2, LIMIT);
        }
    };
    run(&loads);
    for _ in 0..5 {
        let before = sy.child.id();
        sy.upgrade();
        assert_ne!(sy.child.id(), before);
        run(&loads);
    }
    let mut new_connections = Vec::new();
    for (name, load) in ["full handshakes", "resumed sessions"].iter().zip(loads) {
        let report = load.stop();
        let (new, reused) = halves(&report);
        eprintln!(
            "5 TLS upgrades, {name}: {new} requests on new connections, {reused} on reused ones"
        );
        assert_no_failures(&format!("5 TLS upgrades, {name}"), &report);
        assert!(
            new > PHASE / 4 && reused > PHASE / 4,
            "{new} new, {reused} reused"
        );
        new_connections.push(new);
    }
    // The resuming clients resumed most of their sessions, and fell back to full handshakes
    // with each new process (at least once per client and process). While two processes
    // accept on the same socket, a session of one is unknown to the other.
    let full = resuming.full_handshakes();
    eprintln!(
        "5 TLS upgrades, resuming clients: {full} full handshakes for {} new connections",
        new_connections[1]
    );
    assert!(full >= 6 * CLIENTS / 2, "{full} full handshakes");
    assert!(
        2 * full < new_connections[1],
        "{full} full handshakes: sessions were not resumed"
    );
}

#[test]
fn a_certificate_reload_mid_tls_load_fails_nothing() {
    let _one = one_at_a_time();
    let backend = TestBackend::start("blue");
    let dir = cert_dir();
    let old = certificate(&dir, "site");
    // Made ahead so that the clients trust it from the start, as a browser trusts a renewed
    // certificate of the same CA; it replaces the served files mid-load. Its key is RSA: a
    // renewal may change the key type, and the files are re-read whatever they hold.
    let renewed = certificate_of(&dir, "renewed", KeyKind::Rsa2048);
    assert_ne!(old.serial, renewed.serial);
    let tls = TlsClient::trusting(&[&old.cert, &renewed.cert], NAME, &[]);
    let sy = start_tls(&tls_site(backend.addr, &old, None), &tls);
    assert_eq!(served_serial(sy.addr, Some(NAME)), old.serial);
    let load = Load::start_tls(sy.addr, CLIENTS, &tls);
    load.run_for(PHASE, LIMIT);
    // The operator's renewal: new files under the configured names, then a reload.
    for (from, to) in [(&renewed.key, &old.key), (&renewed.cert, &old.cert)] {
        std::fs::copy(from, to).expect("replace a certificate file");
    }
    let r = sy.api("POST", "/api/v1/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let reloaded = Instant::now();
    assert_eq!(served_serial(sy.addr, Some(NAME)), renewed.serial);
    assert_eq!(served_serial(sy.addr, None), renewed.serial);
    load.run_for(2 * PHASE, LIMIT);
    let report = load.stop();
    assert_no_failures("certificate reload", &report);
    assert_eq!(
        cert_file_id(&old.cert),
        cert_file_id(&renewed.cert),
        "the configured file holds the renewed certificate"
    );
    // Every handshake made after the reload answered got the renewed certificate.
    let after: Vec<_> = report
        .samples
        .iter()
        .filter(|s| s.new_connection && s.at >= reloaded)
        .collect();
    let renewed_id = cert_file_id(&renewed.cert);
    let stale = after.iter().filter(|s| s.cert != Some(renewed_id)).count();
    eprintln!(
        "certificate reload: {} handshakes after the reload, {stale} with the old certificate",
        after.len()
    );
    assert!(after.len() > PHASE / 2, "{} handshakes", after.len());
    assert_eq!(stale, 0);
}

#[test]
fn sigterm_lets_every_slow_tls_request_in_flight_complete() {
    let _one = one_at_a_time();
    let backend = TestBackend::start("blue");
    let cert = certificate(&cert_dir(), "site");
    let tls = TlsClient::trusting(&[&cert.cert], NAME, &[]);
    let mut sy = start_tls(&tls_site(backend.addr, &cert, None), &tls);
    let addr = sy.addr;
    let warm = backend.requests();
    let in_flight = runtime().spawn(async move {
        let mut clients = tokio::task::JoinSet::new();
        for i in 0..CLIENTS {
            let tls = tls.clone();
            clients.spawn(async move {
                if i % 2 == 0 {
                    slow_on_a_reused_connection(&tls, addr).await
                } else {
                    tls_request(&tls, addr, "/slow/800")
                        .await
                        .map(|(r, _)| (r.status, r.text()))
                }
            });
        }
        let mut answers = Vec::new();
        while let Some(answer) = clients.join_next().await {
            answers.push(match answer {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => (0, e),
                Err(e) => (0, e.to_string()),
            });
        }
        answers
    });
    // The keep-alive half sends one quick request first, then the slow one.
    wait_until("every slow request at the backend", LIMIT, || {
        backend.requests() == warm + CLIENTS + CLIENTS / 2
    });
    sy.signal("TERM");
    let answers = block_on(in_flight).expect("join");
    eprintln!(
        "TLS sigterm: {CLIENTS} slow requests in flight ({} on reused connections), {} completed",
        CLIENTS / 2,
        answers.iter().filter(|a| a.0 == 200).count()
    );
    assert!(
        answers.iter().all(|a| *a == (200, "blue".to_string())),
        "{answers:?}"
    );
    assert_eq!(sy.wait_exit(LIMIT).code(), Some(0));
}

/// `GET /` on a new TLS connection, then `GET /slow/800` on the same connection.
async fn slow_on_a_reused_connection(
    tls: &TlsClient,
    addr: SocketAddr,
) -> Result<(u16, String), String> {
    let stream = tls
        .connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut stream = tokio::io::BufReader::new(stream);
    let mut answers = Vec::new();
    for path in ["/", "/slow/800"] {
        let head = format!("GET {path} HTTP/1.1\r\nHost: load\r\n\r\n");
        stream
            .get_mut()
            .write_all(head.as_bytes())
            .await
            .map_err(|e| format!("write {path}: {e}"))?;
        let r = read_response(&mut stream)
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        answers.push((r.status, r.text()));
    }
    Ok(answers.pop().unwrap_or_default())
}

#[test]
fn h2_over_tls_and_h2c_across_an_upgrade_fail_nothing() {
    let _one = one_at_a_time();
    let backend = TestBackend::start("blue");
    let cert = certificate(&cert_dir(), "site");
    let h2c = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let h1 = TlsClient::trusting(&[&cert.cert], NAME, &[]);
    let mut sy = start_tls(&tls_site(backend.addr, &cert, Some(h2c)), &h1);
    let tls = TlsClient::trusting(&[&cert.cert], NAME, &[b"h2"]);
    wait_until("the h2c listener", LIMIT, || {
        std::net::TcpStream::connect(h2c).is_ok()
    });
    // A connection of each kind that makes one request, then stays idle through the upgrade.
    let idle_tls = {
        let (tls, addr) = (tls.clone(), sy.addr);
        Idle::start(async move {
            let stream = tls.connect(addr).await?;
            let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            if alpn.as_deref() != Some(b"h2".as_slice()) {
                return Err(std::io::Error::other(format!("ALPN {alpn:?}, not h2")));
            }
            Ok(stream)
        })
    };
    let idle_h2c = Idle::start(async move { TcpStream::connect(h2c).await });
    let loops = [
        H2loadLoop::start(&format!("https://{}/", sy.addr)),
        H2loadLoop::start(&format!("http://{h2c}/")),
    ];
    for l in &loops {
        l.wait_for_runs(3);
    }
    idle_tls.wait_answered();
    idle_h2c.wait_answered();
    let before = sy.child.id();
    let quit = Instant::now();
    sy.upgrade();
    let old_gone = Instant::now();
    assert_ne!(sy.child.id(), before);
    for l in &loops {
        l.wait_for_runs(l.runs() + 3);
    }
    let runs: Vec<_> = loops.into_iter().map(H2loadLoop::stop).collect();
    for (name, runs) in ["h2 over TLS", "h2c"].iter().zip(&runs) {
        let requests: u64 = runs.iter().map(|r| r.total).sum();
        let failed: Vec<_> = runs.iter().filter(|r| !r.all_succeeded()).collect();
        // Runs that began while the old process was handing over: connections to either
        // process, GOAWAYs with streams in flight.
        let during = runs
            .iter()
            .filter(|r| r.at.is_some_and(|at| at >= quit && at < old_gone))
            .count();
        eprintln!(
            "{name} across an upgrade: {} h2load runs ({during} begun during the handover), {requests} requests, {} runs with failures",
            runs.len(),
            failed.len()
        );
        assert!(failed.is_empty(), "{name}: {failed:#?}");
        assert!(during >= 3, "{name}: {during} runs during the handover");
    }
    for (name, idle) in [("TLS", idle_tls), ("h2c", idle_h2c)] {
        let ending = idle.ending();
        eprintln!("idle h2 connection ({name}) across the upgrade: {ending:?}");
        assert_eq!(ending.status, Some(200), "{name}: {ending:?}");
        assert!(
            ending.goaway.iter().all(|g| g.1 == 0) && !ending.goaway.is_empty(),
            "{name}: a GOAWAY with NO_ERROR: {ending:?}"
        );
        assert!(
            ending.resets.is_empty(),
            "{name}: no stream reset: {ending:?}"
        );
        assert!(ending.clean, "{name}: a clean close: {ending:?}");
    }
}

#[test]
fn sigterm_lets_every_slow_h2_stream_in_flight_complete() {
    let _one = one_at_a_time();
    let backend = TestBackend::start("blue");
    let cert = certificate(&cert_dir(), "site");
    let h2c = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let tls = TlsClient::trusting(&[&cert.cert], NAME, &[]);
    let mut sy = start_tls(&tls_site(backend.addr, &cert, Some(h2c)), &tls);
    wait_until("the h2c listener", LIMIT, || {
        std::net::TcpStream::connect(h2c).is_ok()
    });
    let warm = backend.requests();
    // 2 connections × 4 streams on each listener, every one sent at once.
    let runs: Vec<_> = [
        format!("https://{}/slow/800", sy.addr),
        format!("http://{h2c}/slow/800"),
    ]
    .into_iter()
    .map(|url| std::thread::spawn(move || h2load(&url, &["-c", "2", "-m", "4", "-n", "8"])))
    .collect();
    wait_until("every slow stream at the backend", LIMIT, || {
        backend.requests() == warm + 16
    });
    sy.signal("TERM");
    for (name, run) in ["h2 over TLS", "h2c"].iter().zip(runs) {
        let run = run.join().expect("h2load thread");
        eprintln!(
            "{name} sigterm: {} slow streams in flight, {} succeeded with 2xx",
            run.total, run.status_2xx
        );
        assert!(run.all_succeeded() && run.total == 8, "{name}: {run:#?}");
    }
    assert_eq!(sy.wait_exit(LIMIT).code(), Some(0));
}

// ---------------------------------------------------------------- h2load

/// What one h2load run reports in its summary.
#[derive(Debug, Default, Clone)]
struct H2loadRun {
    /// When h2load was started.
    at: Option<Instant>,
    total: u64,
    started: u64,
    done: u64,
    succeeded: u64,
    failed: u64,
    errored: u64,
    timeout: u64,
    status_2xx: u64,
    /// The whole output, for the assertion message.
    output: String,
}

impl H2loadRun {
    fn all_succeeded(&self) -> bool {
        self.total > 0
            && self.failed == 0
            && self.errored == 0
            && self.timeout == 0
            && [self.started, self.done, self.succeeded, self.status_2xx]
                .iter()
                .all(|n| *n == self.total)
    }
}

/// Runs h2load with `args` against `url` (bounded: killed after 30 s) and parses its summary:
/// `requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout` and
/// `status codes: N 2xx, N 3xx, N 4xx, N 5xx`.
fn h2load(url: &str, args: &[&str]) -> H2loadRun {
    let at = Some(Instant::now());
    let out = temp_path("h2load.out");
    let file = std::fs::File::create(&out).expect("h2load output file");
    let mut child = Command::new("h2load")
        .args(args)
        .arg(url)
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .expect("run h2load (Debian package nghttp2-client; `make test-deps` installs it)");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("h2load status").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let output = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    let mut run = H2loadRun {
        at,
        ..H2loadRun::default()
    };
    let counts = |line: &str, prefix: &str| -> Vec<(String, u64)> {
        line.strip_prefix(prefix)
            .unwrap_or_default()
            .split(',')
            .filter_map(|part| {
                let (n, what) = part.trim().split_once(' ')?;
                Some((what.to_string(), n.parse().ok()?))
            })
            .collect()
    };
    for line in output.lines() {
        for (what, n) in counts(line, "requests: ") {
            match what.as_str() {
                "total" => run.total = n,
                "started" => run.started = n,
                "done" => run.done = n,
                "succeeded" => run.succeeded = n,
                "failed" => run.failed = n,
                "errored" => run.errored = n,
                "timeout" => run.timeout = n,
                _ => {}
            }
        }
        for (what, n) in counts(line, "status codes: ") {
            if what == "2xx" {
                run.status_2xx = n;
            }
        }
    }
    run.output = output;
    run
}

/// Short h2load runs one after the other against one URL, until stopped.
struct H2loadLoop {
    stop: Arc<AtomicBool>,
    runs: Arc<Mutex<Vec<H2loadRun>>>,
    thread: std::thread::JoinHandle<()>,
}

impl H2loadLoop {
    fn start(url: &str) -> H2loadLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let runs = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, runs, url) = (Arc::clone(&stop), Arc::clone(&runs), url.to_string());
            std::thread::spawn(move || {
                // Bounded whatever the test does: at most 2 000 runs or two minutes.
                let started = Instant::now();
                for _ in 0..2_000 {
                    if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(120) {
                        break;
                    }
                    let run = h2load(&url, &H2LOAD_RUN);
                    runs.lock().unwrap_or_else(|p| p.into_inner()).push(run);
                }
            })
        };
        H2loadLoop { stop, runs, thread }
    }

    fn runs(&self) -> usize {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn wait_for_runs(&self, n: usize) {
        wait_until("h2load runs", LIMIT, || self.runs() >= n);
    }

    fn stop(self) -> Vec<H2loadRun> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("h2load loop");
        let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.clone()
    }
}

// ---------------------------------------------------------------- an idle HTTP/2 connection

/// How an HTTP/2 connection that made one request and then stayed idle ended.
#[derive(Debug, Default)]
struct H2Ending {
    /// The answer to its one request (`None`: no answer, or a status not in HPACK's static
    /// table).
    status: Option<u16>,
    /// Every GOAWAY it got: (last stream id, error code).
    goaway: Vec<(u32, u32)>,
    /// RST_STREAM frames it got: (stream, error code).
    resets: Vec<(u32, u32)>,
    /// The connection's end: read 0 bytes at a frame boundary (after a TLS close_notify, on
    /// TLS), not an error such as a reset or a TCP close without close_notify.
    clean: bool,
    end: String,
}

/// An HTTP/2 client connection run in the background by [`idle_h2`].
struct Idle {
    answered: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<H2Ending>,
}

impl Idle {
    fn start<S, F>(connect: F) -> Idle
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: std::future::Future<Output = std::io::Result<S>> + Send + 'static,
    {
        let answered = Arc::new(AtomicBool::new(false));
        let task = {
            let answered = Arc::clone(&answered);
            runtime().spawn(async move {
                let limit = Duration::from_secs(60);
                let run = async {
                    match connect.await {
                        Ok(stream) => idle_h2(stream, &answered).await,
                        Err(e) => H2Ending {
                            end: format!("connect: {e}"),
                            ..H2Ending::default()
                        },
                    }
                };
                tokio::time::timeout(limit, run)
                    .await
                    .unwrap_or_else(|_| H2Ending {
                        end: format!("still open after {limit:?}"),
                        ..H2Ending::default()
                    })
            })
        };
        Idle { answered, task }
    }

    fn wait_answered(&self) {
        wait_until("the idle connection's request answered", LIMIT, || {
            self.answered.load(Ordering::SeqCst) || self.task.is_finished()
        });
    }

    fn ending(self) -> H2Ending {
        block_on(self.task).expect("idle connection task")
    }
}

const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_PING: u8 = 0x6;
const FRAME_GOAWAY: u8 = 0x7;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Speaks just enough HTTP/2, frame by frame, to see what a reconnecting client sees: the
/// preface and SETTINGS, `GET /` on stream 1, then nothing but the acknowledgements a client
/// owes (SETTINGS, PING) until the server ends the connection. Hand-written so that every
/// frame and the way the connection closes are seen as they come.
async fn idle_h2<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, answered: &AtomicBool) -> H2Ending {
    let mut ending = H2Ending::default();
    // HPACK without Huffman: :method GET, :scheme http, :path / (static table 2, 6, 4) and
    // :authority as a literal without indexing on static name 1. The scheme does not matter
    // to the proxy's routing.
    let authority = b"localhost";
    let mut block = vec![0x82, 0x86, 0x84, 0x01, authority.len() as u8];
    block.extend_from_slice(authority);
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(FRAME_SETTINGS, 0, 0, &[]));
    hello.extend(frame(
        FRAME_HEADERS,
        FLAG_END_STREAM | FLAG_END_HEADERS,
        1,
        &block,
    ));
    if let Err(e) = io.write_all(&hello).await {
        ending.end = format!("write: {e}");
        return ending;
    }
    loop {
        let mut head = [0u8; 9];
        match io.read(&mut head).await {
            Ok(0) => {
                ending.clean = true;
                ending.end = "closed cleanly".into();
                return ending;
            }
            Ok(n) => {
                if let Err(e) = io.read_exact(&mut head[n..]).await {
                    ending.end = format!("inside a frame header: {e}");
                    return ending;
                }
            }
            Err(e) => {
                ending.end = format!("{:?}: {e}", e.kind());
                return ending;
            }
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        if let Err(e) = io.read_exact(&mut payload).await {
            ending.end = format!("inside a frame: {e}");
            return ending;
        }
        let reply = match kind {
            FRAME_HEADERS if stream == 1 => {
                let mut block = &payload[..];
                if flags & FLAG_PADDED != 0 {
                    let pad = block.first().copied().unwrap_or(0) as usize;
                    block = &block[1..block.len().saturating_sub(pad)];
                }
                if flags & FLAG_PRIORITY != 0 {
                    block = block.get(5..).unwrap_or_default();
                }
                // `:status` comes first; the common ones are indexed in the static table.
                ending.status = match block.first() {
                    Some(0x88) => Some(200),
                    Some(0x89) => Some(204),
                    Some(0x8b) => Some(304),
                    Some(0x8c) => Some(400),
                    Some(0x8d) => Some(404),
                    Some(0x8e) => Some(500),
                    _ => None,
                };
                if flags & FLAG_END_STREAM != 0 {
                    answered.store(true, Ordering::SeqCst);
                }
                None
            }
            FRAME_DATA if stream == 1 && flags & FLAG_END_STREAM != 0 => {
                answered.store(true, Ordering::SeqCst);
                None
            }
            FRAME_RST_STREAM => {
                let code = payload
                    .get(..4)
                    .map_or(0, |c| u32::from_be_bytes(c.try_into().unwrap_or_default()));
                ending.resets.push((stream, code));
                None
            }
            FRAME_SETTINGS if flags & FLAG_ACK == 0 => {
                Some(frame(FRAME_SETTINGS, FLAG_ACK, 0, &[]))
            }
            FRAME_PING if flags & FLAG_ACK == 0 => Some(frame(FRAME_PING, FLAG_ACK, 0, &payload)),
            FRAME_GOAWAY if payload.len() >= 8 => {
                let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                    & 0x7fff_ffff;
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                ending.goaway.push((last, code));
                None
            }
            _ => None,
        };
        if let Some(reply) = reply {
            if let Err(e) = io.write_all(&reply).await {
                ending.end = format!("write: {e}");
                return ending;
            }
        }
    }
}
