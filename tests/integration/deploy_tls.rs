//! The deploy suite under TLS: binary upgrades, a certificate reload and SIGTERM under load
//! from clients that speak HTTP/1.1 over TLS (half keep-alive, half a connection and a
//! handshake per request, full or resumed), counting failed requests. The target is zero, as
//! in `deploy.rs`, with whose scenarios these take turns.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::certs::{served_serial, Cert, KeyKind};
use crate::deploy::one_at_a_time;
use crate::fixtures::*;
use crate::load::{assert_no_failures, cert_file_id, tls_request, Load, Report, TlsClient};

const CLIENTS: usize = 16;
const PHASE: usize = 400;
const LIMIT: Duration = Duration::from_secs(30);
/// The name every test certificate carries (with 127.0.0.1), sent as SNI by our clients.
const NAME: &str = "localhost";

/// An ECDSA certificate for `NAME` and 127.0.0.1 in `dir`, as `<stem>.crt` and `<stem>.key`.
fn certificate(dir: &Path, stem: &str) -> Cert {
    certificate_of(dir, stem, KeyKind::EcdsaP256)
}

fn certificate_of(dir: &Path, stem: &str, kind: KeyKind) -> Cert {
    Cert::self_signed(dir, stem, &[NAME, "127.0.0.1"], kind, 30)
}

/// One upstream `web` with `backend` behind a TLS listener on `{listen}` serving `cert` (ALPN
/// h2 and http/1.1); admin API on `{admin}`.
fn tls_site(backend: SocketAddr, cert: &Cert) -> String {
    format!(
        "server:\n  threads: 2\n  grace_period: 5s\n  upgrade_socket: {{upgrade_socket}}\n\
         listeners:\n  - address: {{listen}}\n    tls:\n      certificates:\n        - cert: {}\n          key: {}\n    http2: true\n\
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
    let mut sy = start_tls(&tls_site(backend.addr, &cert), &tls);
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
    let sy = start_tls(&tls_site(backend.addr, &old), &tls);
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
    let mut sy = start_tls(&tls_site(backend.addr, &cert), &tls);
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
