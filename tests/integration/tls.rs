//! TLS listeners, HTTP/2 to clients and the redirect to https, with real clients: curl,
//! `openssl s_client` for the certificate served to a name, and Python's `ssl` for
//! resumption. Certificates are made by `openssl` for each test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::certs::{served_serial, Cert, KeyKind};
use crate::fixtures::*;

/// A config with one TLS listener (`{listen}`) with `certs` and `tls_extra` under `tls:`,
/// `listener_extra` beside it, admin and metrics, one upstream `app` on `backend`.
fn tls_config(
    certs: &[&Cert],
    tls_extra: &str,
    listener_extra: &str,
    backend: SocketAddr,
) -> String {
    let certificates: String = certs
        .iter()
        .map(|c| {
            format!(
                "        - cert: {}\n          key: {}\n",
                c.cert.display(),
                c.key.display()
            )
        })
        .collect();
    format!(
        "server:\n  grace_period: 2s\n  header_timeout: 1s\n  upgrade_socket: {{upgrade_socket}}\nlisteners:\n  - address: {{listen}}\n    tls:\n      certificates:\n{certificates}{tls_extra}{listener_extra}admin:\n  address: {{admin}}\nmetrics:\n  address: {{metrics}}\nupstreams:\n  app:\n    backends:\n      - address: {backend}\nroutes:\n  - name: web\n    split:\n      app: 1\n"
    )
}

/// `curl -sS` with `args`, returning exit code, stdout and stderr.
fn curl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("run curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--resolve NAME:PORT:127.0.0.1` and the https URL for `name` on the test's listener.
fn https(name: &str, addr: SocketAddr, path: &str) -> (String, String) {
    (
        format!("{name}:{}:127.0.0.1", addr.port()),
        format!("https://{name}:{}{path}", addr.port()),
    )
}

fn cert_dir() -> std::path::PathBuf {
    temp_path("certs")
}

#[test]
fn each_name_gets_its_certificate_and_others_the_first() {
    let dir = cert_dir();
    let main = Cert::self_signed(&dir, "main", &["a.example.com"], KeyKind::EcdsaP256, 30);
    let wild = Cert::self_signed(&dir, "wild", &["*.w.example.com"], KeyKind::EcdsaP256, 30);
    let backend = TestBackend::start("app");
    let sy = Switchyard::start(&tls_config(&[&main, &wild], "", "", backend.addr));
    assert_eq!(served_serial(sy.addr, Some("a.example.com")), main.serial);
    assert_eq!(served_serial(sy.addr, Some("A.Example.COM")), main.serial);
    assert_eq!(served_serial(sy.addr, Some("x.w.example.com")), wild.serial);
    // A wildcard covers one label only; an unknown name and no SNI get the first.
    assert_eq!(
        served_serial(sy.addr, Some("b.x.w.example.com")),
        main.serial
    );
    assert_eq!(served_serial(sy.addr, Some("w.example.com")), main.serial);
    assert_eq!(served_serial(sy.addr, None), main.serial);

    // A verifying client through to the backend, which learns the request was https.
    let (resolve, url) = https("x.w.example.com", sy.addr, "/hello");
    let cacert = wild.cert.display().to_string();
    let (code, body, err) = curl(&["--cacert", &cacert, "--resolve", &resolve, &url]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(body, "app");
    let headers = backend.last_headers();
    let proto = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-proto"))
        .map(|(_, v)| v.as_str());
    assert_eq!(proto, Some("https"), "{headers:?}");
}

#[test]
fn http2_is_offered_by_alpn_unless_switched_off() {
    let dir = cert_dir();
    let cert = Cert::self_signed(&dir, "c", &["h2.example.com"], KeyKind::EcdsaP256, 30);
    let cacert = cert.cert.display().to_string();
    let backend = TestBackend::start("app");
    let hsts = "      hsts:\n        max_age: 365d\n        include_subdomains: true\n";
    // With the access log on: it tells the protocol and the TLS version of each request.
    let logged = format!(
        "{}access_log:\n  path: {{dir}}/access.log\n",
        tls_config(&[&cert], hsts, "", backend.addr)
    );
    let sy = Switchyard::start(&logged);
    let (resolve, url) = https("h2.example.com", sy.addr, "/");
    let (code, out, err) = curl(&[
        "--cacert",
        &cacert,
        "--resolve",
        &resolve,
        "--http2",
        "-i",
        &url,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("strict-transport-security: max-age=31536000; includesubdomains"),
        "{out}"
    );
    // HTTP/1.1 on the same listener, when the client asks for it.
    let (code, out, err) = curl(&[
        "--cacert",
        &cacert,
        "--resolve",
        &resolve,
        "--http1.1",
        "-i",
        &url,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let log = sy.dir.join("access.log");
    let mut lines: Vec<serde_json::Value> = Vec::new();
    wait_until("two access log lines", Duration::from_secs(10), || {
        lines = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        lines.len() >= 2
    });
    assert_eq!(lines[0]["protocol"], "HTTP/2.0", "{lines:?}");
    assert_eq!(lines[1]["protocol"], "HTTP/1.1", "{lines:?}");
    for line in &lines {
        assert_eq!(line["tls_version"], "TLSv1_3", "{line}");
        assert_eq!(
            line["host"],
            format!("h2.example.com:{}", sy.addr.port()),
            "{line}"
        );
        assert!(
            line["tls_cipher"]
                .as_str()
                .is_some_and(|c| c.starts_with("TLS13_")),
            "{line}"
        );
    }
    drop(sy);

    let sy = Switchyard::start(&tls_config(
        &[&cert],
        "",
        "    http2: false\n",
        backend.addr,
    ));
    let (resolve, url) = https("h2.example.com", sy.addr, "/");
    let (code, out, err) = curl(&[
        "--cacert",
        &cacert,
        "--resolve",
        &resolve,
        "--http2",
        "-i",
        &url,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[test]
fn h2c_speaks_http2_by_prior_knowledge_and_http1_beside_it() {
    let backend = TestBackend::start("app");
    let yaml = one_upstream("round_robin", &[(backend.addr, 1)], "").replace(
        "  - address: {listen}\n",
        "  - address: {listen}\n    h2c: true\n",
    );
    let sy = Switchyard::start(&yaml);
    let url = format!("http://{}/", sy.addr);
    let (code, out, err) = curl(&["--http2-prior-knowledge", "-i", &url]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.ends_with("app"), "{out}");
    let (code, out, err) = curl(&["-i", &url]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // A request shorter than the 24-byte preface (a load balancer's health check) is
    // answered at once, not after header_timeout.
    let started = Instant::now();
    let mut conn = TcpStream::connect(sy.addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    conn.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("write");
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn http2_clients_meet_the_same_limits_as_http1_ones() {
    let backend = TestBackend::start("app");
    let yaml = one_upstream("round_robin", &[(backend.addr, 1)], "")
        .replace("  - address: {listen}\n", "  - address: {listen}\n    h2c: true\n")
        .replace(
            "  grace_period: 5s\n",
            "  grace_period: 5s\n  max_request_header_bytes: 4096\n  keepalive_timeout: 1s\n  header_timeout: 1s\n",
        );
    let sy = Switchyard::start(&yaml);
    let url = format!("http://{}/", sy.addr);
    let big = format!("X-Big: {}", "a".repeat(6000));
    let (code, out, err) = curl(&["--http2-prior-knowledge", "-i", "-H", &big, &url]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/2 431"), "{out}");
    // A connection with no stream open is closed after keepalive_timeout; one that never
    // completes its preface, after header_timeout.
    let script = r#"
import socket, sys, time
port = int(sys.argv[1])
for hello in (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]), b"PRI * HTTP/2.0\r\n"):
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    s.sendall(hello)
    started = time.time()
    while s.recv(4096):
        pass
    print("%.1f" % (time.time() - started))
"#;
    let out = Command::new("python3")
        .args(["-c", script, &sy.addr.port().to_string()])
        .output()
        .expect("run python3");
    let text = String::from_utf8_lossy(&out.stdout);
    let waited: Vec<f64> = text.lines().filter_map(|l| l.parse().ok()).collect();
    assert_eq!(
        waited.len(),
        2,
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for w in waited {
        assert!((0.9..3.0).contains(&w), "closed after {w} s: {text}");
    }
}

#[test]
fn redirect_https_keeps_host_path_and_query_but_serves_acme_challenges() {
    let backend = TestBackend::start("app");
    let yaml = one_upstream("round_robin", &[(backend.addr, 1)], "").replace(
        "  - address: {listen}\n",
        "  - address: {listen}\n    redirect_https: true\n",
    );
    let sy = Switchyard::start(&yaml);
    let url = format!("http://{}/a/b?x=1&y=2", sy.addr);
    let (code, out, err) = curl(&["-i", "-H", "Host: shop.example.com:8080", &url]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/1.1 308"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("location: https://shop.example.com/a/b?x=1&y=2\r\n"),
        "{out}"
    );
    assert_eq!(backend.requests(), 0);
    let acme = format!("http://{}/.well-known/acme-challenge/token123", sy.addr);
    let (code, out, err) = curl(&["-i", &acme]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(backend.requests(), 1);
}

#[test]
fn certificates_reload_without_a_restart_and_a_bad_file_changes_nothing() {
    let dir = cert_dir();
    let first = Cert::self_signed(&dir, "site", &["r.example.com"], KeyKind::EcdsaP256, 30);
    let backend = TestBackend::start("app");
    let sy = Switchyard::start(&tls_config(&[&first], "", "", backend.addr));
    assert_eq!(served_serial(sy.addr, Some("r.example.com")), first.serial);
    // A keep-alive connection made before the reload goes on after it.
    let mut open = tls_client(sy.addr, "r.example.com", &first.cert);
    assert!(open.get("/").starts_with("HTTP/1.1 200"));

    // The same files, new contents (an RSA certificate this time): new handshakes get it.
    let second = Cert::self_signed(&dir, "site", &["r.example.com"], KeyKind::Rsa2048, 30);
    assert_ne!(first.serial, second.serial);
    let r = sy.api("POST", "/api/v1/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(served_serial(sy.addr, Some("r.example.com")), second.serial);
    assert!(open.get("/").starts_with("HTTP/1.1 200"));

    // A key that is not PEM, then a key of another certificate: refused, naming the file; the
    // running certificate stays.
    std::fs::write(&second.key, "not a key\n").expect("write key");
    let r = sy.api("POST", "/api/v1/reload", None);
    assert_eq!(r.status, 400, "{}", r.text());
    let key = second.key.display().to_string();
    assert!(
        r.text().contains(&format!(
            "listeners[0].tls.certificates[0].key: {key}: no PEM private key in it"
        )),
        "{}",
        r.text()
    );
    let other = Cert::self_signed(&dir, "other", &["o.example.com"], KeyKind::EcdsaP256, 30);
    std::fs::copy(&other.key, &second.key).expect("copy key");
    let r = sy.api("POST", "/api/v1/reload", None);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains(&format!(
            "listeners[0].tls.certificates[0]: {key} does not match the certificate in {}",
            second.cert.display()
        )),
        "{}",
        r.text()
    );
    assert_eq!(served_serial(sy.addr, Some("r.example.com")), second.serial);
    assert!(open.get("/").starts_with("HTTP/1.1 200"));
}

#[test]
fn check_and_start_name_a_bad_certificate_file_and_warn_of_one_expiring() {
    let dir = cert_dir();
    let backend = TestBackend::start("app");
    let missing = Cert {
        cert: dir.join("missing.crt"),
        key: dir.join("missing.key"),
        serial: String::new(),
    };
    let config = temp_path("bad.yaml");
    let yaml = fill(&tls_config(&[&missing], "", "", backend.addr), free_addr())
        .replace("{admin}", &free_addr().to_string())
        .replace("{metrics}", &free_addr().to_string());
    std::fs::write(&config, &yaml).expect("write config");
    let path = config.display().to_string();
    let (code, _, stderr) = run_binary(&["check", "--config", &path]);
    assert_eq!(code, 1, "{stderr}");
    let expected = format!(
        "listeners[0].tls.certificates[0].cert: {}: cannot read: No such file or directory (os error 2)",
        missing.cert.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    let (code, _, stderr) = run_binary(&["run", "--config", &path]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&expected), "{stderr}");

    // Expiring in 3 days: a warning from check, a start, and the expiry in the metric.
    let soon = Cert::self_signed(&dir, "soon", &["soon.example.com"], KeyKind::EcdsaP256, 3);
    let yaml = tls_config(&[&soon], "", "", backend.addr);
    let filled = fill(&yaml, free_addr())
        .replace("{admin}", &free_addr().to_string())
        .replace("{metrics}", &free_addr().to_string());
    std::fs::write(&config, &filled).expect("write config");
    let (code, stdout, stderr) = run_binary(&["check", "--config", &path]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("expires in"),
        "{stdout}{stderr}"
    );
    let sy = Switchyard::start(&yaml);
    let metrics = sy.scrape();
    let series = format!(
        "switchyard_tls_certificate_expiry_timestamp_seconds{{listener=\"{}\",name=\"soon.example.com\"}}",
        sy.addr
    );
    let expiry = sample(&metrics, &series).unwrap_or_else(|| panic!("{series} in\n{metrics}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let days = (expiry - now) / 86_400.0;
    assert!((2.9..3.1).contains(&days), "{days} days");
}

#[test]
fn a_tls_handshake_is_bounded_by_header_timeout_and_max_connections() {
    let dir = cert_dir();
    let cert = Cert::self_signed(&dir, "c", &["t.example.com"], KeyKind::EcdsaP256, 30);
    let backend = TestBackend::start("app");
    let yaml = tls_config(&[&cert], "", "", backend.addr).replace(
        "  header_timeout: 1s\n",
        "  header_timeout: 1s\n  max_connections: 2\n",
    );
    let sy = Switchyard::start(&yaml);
    // The fixture's probes of the listener are accepted once the proxy runs: a request
    // served means they have been, and then they are gone.
    let cacert = cert.cert.display().to_string();
    let (resolve, url) = https("t.example.com", sy.addr, "/");
    let (code, _, err) = curl(&["--cacert", &cacert, "--resolve", &resolve, &url]);
    assert_eq!(code, 0, "{err}");
    wait_until("no connection open", Duration::from_secs(5), || {
        sample(&sy.scrape(), "switchyard_client_connections") == Some(0.0)
    });
    // Two connections that never start their handshake hold the two places...
    let mut idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(sy.addr).expect("connect"))
        .collect();
    wait_until("both counted", Duration::from_secs(5), || {
        sample(&sy.scrape(), "switchyard_client_connections") == Some(2.0)
    });
    // ...so a third is closed at once, before any handshake.
    let mut third = TcpStream::connect(sy.addr).expect("connect");
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let started = Instant::now();
    let mut byte = [0u8; 1];
    assert_eq!(third.read(&mut byte).unwrap_or(0), 0);
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
    // The two silent ones are closed once header_timeout has passed.
    for conn in &mut idle {
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let n = conn.read(&mut byte).unwrap_or(0);
        assert_eq!(n, 0);
    }
    let metrics = sy.scrape();
    let timed_out = sample(
        &metrics,
        "switchyard_client_connections_rejected_total{reason=\"header_timeout\"}",
    );
    assert_eq!(timed_out, Some(2.0), "{metrics}");
    let limit = sample(
        &metrics,
        "switchyard_client_connections_rejected_total{reason=\"limit\"}",
    );
    assert_eq!(limit, Some(1.0), "{metrics}");
    // A client that stops half-way through its handshake is no different.
    let mut half = TcpStream::connect(sy.addr).expect("connect");
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .expect("write");
    half.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = half.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(
        (Duration::from_millis(700)..Duration::from_secs(3)).contains(&waited),
        "{waited:?}"
    );
}

#[test]
fn cookies_issued_over_tls_are_secure_and_tls_1_3_can_be_required() {
    let dir = cert_dir();
    let cert = Cert::self_signed(&dir, "c", &["s.example.com"], KeyKind::EcdsaP256, 30);
    let cacert = cert.cert.display().to_string();
    let backend = TestBackend::start("app");
    let yaml = tls_config(&[&cert], "      min_version: \"1.3\"\n", "", backend.addr).replace(
        "    split:\n      app: 1\n",
        "    split:\n      app: 1\n    sticky:\n      cookie: switchyard_user\n      set_cookie: true\n",
    );
    let sy = Switchyard::start(&yaml);
    let (resolve, url) = https("s.example.com", sy.addr, "/");
    let (code, out, err) = curl(&["--cacert", &cacert, "--resolve", &resolve, "-i", &url]);
    assert_eq!(code, 0, "{err}");
    let cookie = out
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: switchyard_user=")
        })
        .unwrap_or_else(|| panic!("{out}"));
    assert!(cookie.trim_end().ends_with("; Secure"), "{cookie}");
    let (code, _, err) = curl(&[
        "--cacert",
        &cacert,
        "--resolve",
        &resolve,
        "--tlsv1.2",
        "--tls-max",
        "1.2",
        &url,
    ]);
    assert_ne!(code, 0, "TLS 1.2 was accepted: {err}");
}

#[test]
fn sessions_resume_by_ticket_and_by_session_id() {
    let dir = cert_dir();
    let cert = Cert::self_signed(&dir, "c", &["z.example.com"], KeyKind::EcdsaP256, 30);
    let backend = TestBackend::start("app");
    let sy = Switchyard::start(&tls_config(&[&cert], "", "", backend.addr));
    // Python's ssl (OpenSSL): a second connection offers the first one's session.
    let script = r#"
import socket, ssl, sys
port, cafile = int(sys.argv[1]), sys.argv[2]
for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ctx.maximum_version = version
    session, reused = None, []
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port)) as raw:
            with ctx.wrap_socket(raw, server_hostname="z.example.com", session=session) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: z.example.com\r\nConnection: close\r\n\r\n")
                while s.recv(4096):
                    pass
                reused.append(s.session_reused)
                session = s.session
    print(version.name, reused)
"#;
    let out = Command::new("python3")
        .args(["-c", script, &sy.addr.port().to_string()])
        .arg(&cert.cert)
        .output()
        .expect("run python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("TLSv1_2 [False, True, True]"), "{text}");
    assert!(text.contains("TLSv1_3 [False, True, True]"), "{text}");
}

/// A keep-alive HTTPS/1.1 connection through Python's `ssl`, driven line by line.
struct TlsClient {
    child: std::process::Child,
}

fn tls_client(addr: SocketAddr, name: &str, cafile: &Path) -> TlsClient {
    let script = r#"
import socket, ssl, sys
port, name, cafile = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=cafile)
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname=name)
f = s.makefile("rb")
for line in sys.stdin:
    s.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (line.strip(), name)).encode())
    status = f.readline().decode().strip()
    length = 0
    while True:
        h = f.readline().decode().strip()
        if not h:
            break
        if h.lower().startswith("content-length:"):
            length = int(h.split(":")[1])
    f.read(length)
    print(status, flush=True)
"#;
    let child = Command::new("python3")
        .args(["-c", script, &addr.port().to_string(), name])
        .arg(cafile)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run python3");
    TlsClient { child }
}

impl TlsClient {
    /// One request on the connection; the status line.
    fn get(&mut self, path: &str) -> String {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{path}").expect("to the client");
        stdin.flush().expect("flush");
        let stdout = self.child.stdout.as_mut().expect("stdout");
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        String::from_utf8_lossy(&line).into_owned()
    }
}

impl Drop for TlsClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}
