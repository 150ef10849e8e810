//! Shared fixtures: test backends, an HTTP/1.1 client, and a running `switchyard`.
//!
//! Backends run on one shared tokio runtime and can be killed (every socket closed at once)
//! and restarted on the same port. Every wait has a deadline.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

pub const BINARY: &str = env!("CARGO_BIN_EXE_switchyard");

pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("test runtime")
    })
}

pub fn block_on<F: Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// Polls `condition` until it holds or `limit` passes; panics with `what` on timeout.
pub fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port on 127.0.0.1 that nothing listens on, never handed out twice by this process.
///
/// Ports come from below the kernel's ephemeral range (32768 and up by default), so no
/// `bind(0)` or outgoing connection of a test can be given one between our check and the
/// moment `switchyard` binds it; a counter keeps two calls from returning the same port.
pub fn free_port() -> u16 {
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let next = NEXT.get_or_init(|| AtomicU32::new(std::process::id() % SPAN));
    for _ in 0..SPAN {
        let port = (FIRST + next.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {FIRST} and {}", FIRST + SPAN)
}

/// A path `name` in a directory of its own, under one directory per test run
/// (`switchyard-test-<pid>`). The first call removes what earlier runs left (their process is
/// gone), so files do not pile up run after run; the last run's stay for a look after a failure.
pub fn temp_path(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let root = ROOT.get_or_init(|| {
        remove_earlier_runs();
        std::env::temp_dir().join(format!("switchyard-test-{}", std::process::id()))
    });
    let dir = root.join(N.fetch_add(1, Ordering::Relaxed).to_string());
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// `switchyard-test-<pid>[-<n>]` directories of processes that no longer run.
fn remove_earlier_runs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix("switchyard-test-"))
        else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

// ---------------------------------------------------------------- backends

struct BackendShared {
    name: String,
    requests: AtomicUsize,
    connections: AtomicUsize,
    sick: AtomicBool,
    close_silently: AtomicBool,
    delay_ms: AtomicU64,
    failing_percent: AtomicU64,
    last_headers: Mutex<Vec<(String, String)>>,
}

/// A test backend (optionally slow, see `set_delay`). Paths: `/healthz` (503 when sick), `/slow/<ms>`, `/download/<bytes>`,
/// `/upload` (POST; answers the byte count), `/ws` (101 after 20 ms, then echoes bytes), `/ws-now`
/// (the same, 101 at once), `/reset` (closes without answering); anything else answers its name. Every answer has `X-Backend: <name>`;
/// a share of them can be made 500 (`set_failing_percent`).
pub struct TestBackend {
    pub addr: SocketAddr,
    shared: Arc<BackendShared>,
    tasks: Option<JoinSet<()>>,
}

impl TestBackend {
    pub fn start(name: &str) -> TestBackend {
        TestBackend::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// A backend on a given address (port 0: any free port).
    pub fn start_on(name: &str, address: SocketAddr) -> TestBackend {
        let shared = Arc::new(BackendShared {
            name: name.to_string(),
            requests: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            sick: AtomicBool::new(false),
            close_silently: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            failing_percent: AtomicU64::new(0),
            last_headers: Mutex::new(Vec::new()),
        });
        let listener = block_on(TcpListener::bind(address)).expect("bind backend");
        let addr = listener.local_addr().expect("backend addr");
        let mut backend = TestBackend {
            addr,
            shared,
            tasks: None,
        };
        backend.serve(listener);
        backend
    }

    fn serve(&mut self, listener: TcpListener) {
        let _guard = runtime().enter();
        let mut tasks = JoinSet::new();
        let shared = Arc::clone(&self.shared);
        let (conn_tx, mut conn_rx) = tokio::sync::mpsc::unbounded_channel::<TcpStream>();
        tasks.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if conn_tx.send(stream).is_err() {
                    break;
                }
            }
        });
        // Connections run inside the same JoinSet so that kill() closes them all.
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Some(stream) = conn_rx.recv().await {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                connections.spawn(serve_connection(stream, Arc::clone(&shared)));
            }
        });
        self.tasks = Some(tasks);
    }

    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    pub fn set_sick(&self, sick: bool) {
        self.shared.sick.store(sick, Ordering::SeqCst);
    }

    /// Connections accepted so far (health checks included).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Answers only the first request of each connection and closes the connection when the
    /// next one arrives, as a backend whose keep-alive timeout fires just then.
    pub fn set_close_silently(&self, close: bool) {
        self.shared.close_silently.store(close, Ordering::SeqCst);
    }

    /// Holds every answer (but health checks) this long.
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Answers `percent` of the requests (but health checks) with 500, spread evenly: of every
    /// ten requests, the same three at 30.
    pub fn set_failing_percent(&self, percent: u64) {
        self.shared.failing_percent.store(percent, Ordering::SeqCst);
    }

    /// Headers of the last request that was not a health check.
    pub fn last_headers(&self) -> Vec<(String, String)> {
        self.shared
            .last_headers
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default()
    }

    /// Closes the listener and every open connection.
    pub fn kill(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.abort_all();
            block_on(async { while tasks.join_next().await.is_some() {} });
        }
    }

    /// Listens again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let listener = block_on(TcpListener::bind(self.addr)).expect("rebind backend");
        self.serve(listener);
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        if let Some(tasks) = self.tasks.as_mut() {
            tasks.abort_all();
        }
    }
}

struct Request {
    path: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn read_head<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> Option<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            return (!lines.is_empty()).then_some(lines);
        }
        lines.push(line);
    }
}

fn parse_headers(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect()
}

async fn serve_connection(stream: TcpStream, shared: Arc<BackendShared>) {
    // An answer is written as head, then body: with Nagle's algorithm the body would wait for
    // the proxy's delayed ACK of the head, 40 ms per request on a reused connection.
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut served = 0;
    loop {
        let Some(head) = read_head(&mut reader).await else {
            return;
        };
        served += 1;
        if served > 1 && shared.close_silently.load(Ordering::SeqCst) {
            return;
        }
        let mut parts = head[0].split_whitespace();
        let request = Request {
            path: parts.nth(1).unwrap_or_default().to_string(),
            headers: parse_headers(&head[1..]),
        };
        let length: u64 = request
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // The whole body first, as an application does: a chunked one too, so that an answer
        // never races the rest of its request.
        if request
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
            && read_chunked(&mut reader).await.is_err()
        {
            return;
        }
        let mut received = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        while received < length {
            let want = buf.len().min((length - received) as usize);
            match reader.read(&mut buf[..want]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n as u64,
            }
        }
        let mut failing = false;
        if request.path != "/healthz" {
            let k = shared.requests.fetch_add(1, Ordering::SeqCst) as u64 + 1;
            let percent = shared.failing_percent.load(Ordering::SeqCst);
            failing = (k * percent) % 100 < percent;
            if let Ok(mut last) = shared.last_headers.lock() {
                *last = request.headers.clone();
            }
        }
        let name = &shared.name;
        let path = request.path.as_str();
        let delay = shared.delay_ms.load(Ordering::SeqCst);
        if delay > 0 && path != "/healthz" {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let result = if failing {
            respond(&mut write, name, 500, b"injected failure\n").await
        } else if path == "/healthz" {
            let sick = shared.sick.load(Ordering::SeqCst);
            respond(&mut write, name, if sick { 503 } else { 200 }, b"ok\n").await
        } else if let Some(ms) = path.strip_prefix("/slow/") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            respond(&mut write, name, 200, name.as_bytes()).await
        } else if let Some(bytes) = path.strip_prefix("/download/") {
            download(&mut write, name, bytes.parse().unwrap_or(0)).await
        } else if path == "/upload" {
            respond(&mut write, name, 200, received.to_string().as_bytes()).await
        } else if path == "/reset" {
            return;
        } else if (path == "/ws" || path == "/ws-now")
            && request.header("upgrade") == Some("websocket")
        {
            // `/ws` answers the handshake 20 ms late, as it did before Switchyard worked
            // around cloudflare/pingora#946 (a `101` read before the upgrade request's empty
            // body had been passed on ended the tunnel); the tests that use it are about what
            // happens after the handshake. `/ws-now` answers at once, which is what made the
            // race show: tests/integration/websocket.rs uses it.
            if path == "/ws" {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
            if write.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let mut reader = reader;
            let _ = tokio::io::copy(&mut reader, &mut write).await;
            return;
        } else {
            respond(&mut write, name, 200, name.as_bytes()).await
        };
        if result.is_err() {
            return;
        }
    }
}

async fn respond<W: AsyncWrite + Unpin>(
    write: &mut W,
    name: &str,
    status: u16,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nX-Backend: {name}\r\n\r\n",
        body.len()
    );
    write.write_all(head.as_bytes()).await?;
    write.write_all(body).await
}

async fn download<W: AsyncWrite + Unpin>(
    write: &mut W,
    name: &str,
    bytes: u64,
) -> std::io::Result<()> {
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {bytes}\r\nX-Backend: {name}\r\n\r\n");
    write.write_all(head.as_bytes()).await?;
    let chunk = vec![b'x'; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        write.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

// ---------------------------------------------------------------- client

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request on a fresh connection, optionally from a given local IP (127.0.0.x).
pub async fn request_from(
    from: Option<IpAddr>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    exchange(from, addr, method, path, headers, None).await
}

/// One request with a body on a fresh connection.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Response> {
    exchange(None, addr, method, path, headers, body).await
}

async fn exchange(
    from: Option<IpAddr>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Response> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = from {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let mut stream = socket.connect(addr).await?;
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    if let Some(body) = body {
        stream.write_all(body).await?;
    }
    read_answer(&mut BufReader::new(stream), method == "HEAD").await
}

pub async fn read_response<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
) -> std::io::Result<Response> {
    read_answer(reader, false).await
}

/// A response; to a HEAD request (`head_request`) it has no body, whatever its `Content-Length` says.
async fn read_answer<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    head_request: bool,
) -> std::io::Result<Response> {
    let head = read_head(reader).await.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        )
    })?;
    let status = head[0]
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {:?}", head[0])))?;
    let headers: HashMap<String, String> = parse_headers(&head[1..])
        .into_iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v))
        .collect();
    let mut body = Vec::new();
    if head_request {
        // No body follows.
    } else if let Some(length) = headers
        .get("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        body.resize(length, 0);
        reader.read_exact(&mut body).await?;
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        body = read_chunked(reader).await?;
    } else if status != 101 && status != 204 && status != 304 {
        reader.read_to_end(&mut body).await?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// A chunked body (without trailers), chunk by chunk up to the last.
async fn read_chunked<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size).await?;
        let size = usize::from_str_radix(size.trim(), 16)
            .map_err(|_| std::io::Error::other("bad chunk size"))?;
        let mut chunk = vec![0u8; size + 2];
        reader.read_exact(&mut chunk).await?;
        body.extend_from_slice(&chunk[..size]);
        if size == 0 {
            return Ok(body);
        }
    }
}

/// The body `times` GETs of `/` from client `ip` all get, which must be the same each time:
/// what a key-hashed upstream (`ip_hash`, `hash` without its key) keeps for one client.
pub fn same_answer_for_client(addr: SocketAddr, ip: IpAddr, times: usize) -> String {
    let answers: Vec<String> = (0..times)
        .map(|_| {
            block_on(request_from(Some(ip), addr, "GET", "/", &[]))
                .expect("request")
                .text()
        })
        .collect();
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "{ip}: {answers:?}"
    );
    answers[0].clone()
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    block_on(request_from(None, addr, "GET", path, &[]))
        .unwrap_or_else(|e| panic!("GET {path} via {addr}: {e}"))
}

// ---------------------------------------------------------------- switchyard

/// Fills the `{listen}` and `{upgrade_socket}` placeholders of a test config.
pub fn fill(yaml: &str, listen: SocketAddr) -> String {
    yaml.replace("{listen}", &listen.to_string()).replace(
        "{upgrade_socket}",
        &temp_path("upgrade.sock").display().to_string(),
    )
}

/// Test machines may have a hard open-file limit below what the default `max_connections`
/// (10 000) needs, which `run` then refuses; a test that does not set it gets 1 000. Text that
/// is not a YAML mapping (a test of a broken config) is left as it is.
fn with_test_limits(text: &str) -> String {
    let Ok(serde_yaml::Value::Mapping(mut config)) = serde_yaml::from_str(text) else {
        return text.to_string();
    };
    let server = config
        .entry("server".into())
        .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
    match server {
        serde_yaml::Value::Mapping(server) if !server.contains_key("max_connections") => {
            server.insert("max_connections".into(), 1000.into());
        }
        _ => return text.to_string(),
    }
    serde_yaml::to_string(&config).unwrap_or_else(|_| text.to_string())
}

/// A running `switchyard run`, killed when dropped. Its config may use the placeholders
/// `{listen}`, `{admin}`, `{metrics}` (free ports) and `{dir}` (its own temp directory).
pub struct Switchyard {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub child: Child,
    pub log: PathBuf,
    /// Extra environment for the process (and its restarts).
    env: Vec<(String, String)>,
    /// An open-file limit (soft and hard) set in the child before it runs, when given.
    open_files: Option<u64>,
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

impl Switchyard {
    /// Starts switchyard with `yaml` and waits until the proxy accepts connections.
    pub fn start(yaml: &str) -> Switchyard {
        Switchyard::start_with_env(yaml, &[])
    }

    pub fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Switchyard {
        Switchyard::start_with(yaml, env, None)
    }

    /// Starts switchyard with at most `open_files` descriptors (soft and hard limit).
    pub fn start_with_open_files(yaml: &str, open_files: u64) -> Switchyard {
        Switchyard::start_with(yaml, &[], Some(open_files))
    }

    fn start_with(yaml: &str, env: &[(&str, &str)], open_files: Option<u64>) -> Switchyard {
        let config = temp_path("switchyard.yaml");
        let dir = config.parent().expect("temp dir").to_path_buf();
        let log = dir.join("switchyard.log");
        let mut sy = Switchyard {
            addr: free_addr(),
            admin: free_addr(),
            metrics: free_addr(),
            dir,
            config,
            child: Command::new("true").spawn().expect("placeholder process"),
            log,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            open_files,
        };
        let _ = sy.child.wait();
        sy.write_config(yaml);
        sy.spawn();
        sy
    }

    /// Replaces the config file (placeholders filled), e.g. before a reload.
    pub fn write_config(&self, yaml: &str) {
        let socket = self.dir.join("upgrade.sock");
        let yaml = yaml.replace("{upgrade_socket}", &socket.display().to_string());
        let text = fill(&yaml, self.addr)
            .replace("{admin}", &self.admin.to_string())
            .replace("{metrics}", &self.metrics.to_string())
            .replace("{dir}", &self.dir.display().to_string());
        std::fs::write(&self.config, with_test_limits(&text)).expect("write config");
    }

    fn spawn(&mut self) {
        self.child = self.launch(&[]);
        // The proxy, and the admin API and metrics when configured: Pingora starts its
        // services one after the other.
        let config = std::fs::read_to_string(&self.config).unwrap_or_default();
        let mut sockets = vec![self.addr];
        sockets.extend(
            [self.admin, self.metrics]
                .into_iter()
                .filter(|a| config.contains(&a.to_string())),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while sockets
            .iter()
            .any(|a| std::net::TcpStream::connect(a).is_err())
        {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "switchyard exited with {status} before listening:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "switchyard did not listen:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `switchyard run --config <ours> <extra>`, logging to our log file.
    fn launch(&self, extra: &[&str]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        // The access log may go to stdout.
        let stdout = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.log"))
            .expect("stdout file");
        let mut command = Command::new(BINARY);
        command
            .args(["run", "--config"])
            .arg(&self.config)
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(stdout)
            .stderr(log);
        // An empty `RUST_LOG` given: none at all, for the binary's own default.
        if self
            .env
            .iter()
            .any(|(k, v)| k == "RUST_LOG" && v.is_empty())
        {
            command.env_remove("RUST_LOG");
        }
        if let Some(limit) = self.open_files {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: setrlimit is async-signal-safe and touches only the child's own limits.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        command.spawn().expect("spawn switchyard")
    }

    /// Stops with SIGTERM and starts again with the same config file and ports.
    pub fn restart(&mut self) {
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(0));
        self.spawn();
    }

    /// A graceful binary upgrade, as an operator does it: start `run --upgrade`, wait until it
    /// waits for the sockets, send SIGQUIT to the running process, wait for it to exit.
    pub fn upgrade(&mut self) {
        self.upgrade_when_waiting(false)
    }

    /// An upgrade whose new process has said it waits for the sockets (Pingora polls for them
    /// once a second) before the old one gets SIGQUIT.
    pub fn upgrade_after_waiting(&mut self) {
        self.upgrade_when_waiting(true)
    }

    fn upgrade_when_waiting(&mut self, said_waiting: bool) {
        let socket = self.dir.join("upgrade.sock");
        let _ = std::fs::remove_file(&socket);
        let logged_before = self.log_text().len();
        let next = self.launch(&["--upgrade"]);
        // From here on both processes are owned: the new one by `self` (killed on drop), the
        // old one by the guard, so a failed assertion leaves neither running.
        let mut old = ChildGuard(std::mem::replace(&mut self.child, next));
        wait_until(
            "the new process to wait for sockets",
            Duration::from_secs(10),
            || socket.exists(),
        );
        if said_waiting {
            wait_until(
                "the new process to say it waits for the sockets",
                Duration::from_secs(10),
                || {
                    self.log_text()
                        .get(logged_before..)
                        .is_some_and(|new| new.contains("upgrade: waiting for the running process"))
                },
            );
        }
        let status = Command::new("kill")
            .args(["-QUIT", &old.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = old.0.try_wait() {
                assert_eq!(status.code(), Some(0), "old process after upgrade");
                break;
            }
            assert!(Instant::now() < deadline, "old process still running");
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("new process exited with {status}:\n{}", self.log_text());
        }
    }

    /// Starts again after the process was stopped (files may have been changed meanwhile).
    pub fn restart_stopped(&mut self) {
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "switchyard still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// An admin API call; `body` is sent as is.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        self.api_with(method, path, body, &[])
    }

    pub fn api_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Response {
        block_on(send(
            self.admin,
            method,
            path,
            headers,
            body.map(str::as_bytes),
        ))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// The metrics text.
    pub fn scrape(&self) -> String {
        get(self.metrics, "/metrics").text()
    }
}

/// The value of one sample line of the metrics text, e.g.
/// `switchyard_requests_total{backend="…",route="web",status="200",upstream="blue"}`.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Kills and reaps a child process when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Switchyard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion with `args`; returns exit code, stdout and stderr.
pub fn run_binary(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BINARY)
        .args(args)
        .env_remove("SWITCHYARD_CONFIG")
        .output()
        .expect("run switchyard");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// YAML for one upstream `pool` with `backends` (address, weight) behind a catch-all route.
pub fn one_upstream(algorithm: &str, backends: &[(SocketAddr, u32)], extra: &str) -> String {
    let list: String = backends
        .iter()
        .map(|(a, w)| format!("      - address: {a}\n        weight: {w}\n"))
        .collect();
    format!(
        "server:\n  threads: 2\n  grace_period: 5s\n  upgrade_socket: {{upgrade_socket}}\nlisteners:\n  - address: {{listen}}\nupstreams:\n  pool:\n    algorithm: {algorithm}\n    backends:\n{list}{extra}routes:\n  - name: all\n    split:\n      pool: 1\n"
    )
}

/// The runtime state the restart and upgrade tests expect to survive: a 70/30 canary split
/// and green draining.
pub fn canary_and_drain(sy: &Switchyard, green: &TestBackend) {
    let r = sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(r#"{"blue": 70, "green": 30}"#),
    );
    assert_eq!(r.status, 200);
    let path = format!("/api/v1/upstreams/green/backends/{}", green.addr);
    let r = sy.api("PATCH", &path, Some(r#"{"state": "draining"}"#));
    assert_eq!(r.status, 200);
}

/// Blue and green upstreams (one backend each, optional `check` YAML for both) behind route
/// `web` split `split_blue`/`split_green`, with admin, metrics and a state file. `extra` goes
/// at the top level.
pub fn blue_green(
    blue: SocketAddr,
    green: SocketAddr,
    split: (u32, u32),
    check: &str,
    extra: &str,
) -> String {
    format!(
        "server:\n  threads: 2\n  grace_period: 5s\n  upgrade_socket: {{upgrade_socket}}\nlisteners:\n  - address: {{listen}}\nadmin:\n  address: {{admin}}\nmetrics:\n  address: {{metrics}}\n{extra}upstreams:\n  blue:\n    backends:\n      - address: {blue}\n{check}  green:\n    backends:\n      - address: {green}\n{check}routes:\n  - name: web\n    split:\n      blue: {}\n      green: {}\n",
        split.0, split.1
    )
}

// ---------------------------------------------------------------- backends of their own process

/// Test certificates made with the `openssl` command, once per test run: a CA, a server
/// certificate it signed for `backend.test` and 127.0.0.1 (with its key), and a second CA
/// with a server certificate of its own for the same names.
pub struct TestCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub other_ca: PathBuf,
    pub other_cert: PathBuf,
    pub other_key: PathBuf,
}

/// The name in the server certificate's SANs (with the address 127.0.0.1).
pub const BACKEND_NAME: &str = "backend.test";

pub fn test_certs() -> &'static TestCerts {
    static CERTS: OnceLock<TestCerts> = OnceLock::new();
    CERTS.get_or_init(|| {
        let dir = temp_path("certs").parent().expect("temp dir").to_path_buf();
        let path = |name: &str| dir.join(name);
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl (make test-deps installs it)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for (name, subject) in [("ca", "/CN=Switchyard test CA"), ("other-ca", "/CN=Another CA")] {
            let (key, cert) = (format!("{name}.key"), format!("{name}.pem"));
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend([
                "-keyout",
                &key,
                "-out",
                &cert,
                "-days",
                "3",
                "-subj",
                subject,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            openssl(&args);
        }
        std::fs::write(
            path("server.ext"),
            format!("subjectAltName=DNS:{BACKEND_NAME},IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
        )
        .expect("extensions file");
        for (ca, server) in [("ca", "server"), ("other-ca", "other-server")] {
            let (key, csr, cert) = (
                format!("{server}.key"),
                format!("{server}.csr"),
                format!("{server}.pem"),
            );
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=backend.test"]);
            openssl(&args);
            let (ca_cert, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
            openssl(&[
                "x509", "-req", "-in", &csr, "-CA", &ca_cert, "-CAkey", &ca_key,
                "-CAcreateserial", "-out", &cert, "-days", "3", "-extfile", "server.ext",
            ]);
        }
        TestCerts {
            ca: path("ca.pem"),
            cert: path("server.pem"),
            key: path("server.key"),
            other_ca: path("other-ca.pem"),
            other_cert: path("other-server.pem"),
            other_key: path("other-server.key"),
        }
    })
}

/// A test backend script of `tests/integration/backends/`.
pub fn backend_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../tests/integration/backends/{name}"))
}

/// A program the tests need, from `PATH` or `/usr/sbin` (Debian puts servers there).
pub fn program(name: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("{name} not found: `make test-deps` installs it (Debian package {package})")
    })
}

/// A backend that runs as its own process (Python's TLS server, nghttpd, a gRPC server):
/// closer to a real one than a task of ours. Killed when dropped; its output is kept in `log`.
pub struct BackendProcess {
    pub addr: SocketAddr,
    child: Child,
    pub log: PathBuf,
}

impl BackendProcess {
    /// Starts `program` with `args`; it prints the port it listens on (127.0.0.1) as the first
    /// line of its output once it serves.
    pub fn printing_port(program: &std::path::Path, args: &[&std::ffi::OsStr]) -> BackendProcess {
        let log = temp_path("backend.log");
        let mut child = Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("backend log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
            let _ = tx.send(line);
        });
        let mut process = BackendProcess {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            child,
            log,
        };
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let port: u16 = line.trim().parse().unwrap_or_else(|_| {
            panic!(
                "{} printed {line:?} instead of its port:\n{}",
                program.display(),
                process.log_text()
            )
        });
        process.addr.set_port(port);
        process
    }

    /// Starts `program` with `args`, which make it listen on `addr`; waits until it accepts.
    pub fn listening_on(
        program: &std::path::Path,
        args: &[&std::ffi::OsStr],
        addr: SocketAddr,
    ) -> BackendProcess {
        let log = temp_path("backend.log");
        let output = std::fs::File::create(&log).expect("backend log");
        let child = Command::new(program)
            .args(args)
            .stdout(output.try_clone().expect("log handle"))
            .stderr(output)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let mut process = BackendProcess { addr, child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!(
                    "{} exited with {status}:\n{}",
                    program.display(),
                    process.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} does not listen on {addr}",
                program.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        process
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
