//! A bounded load generator for the deploy suite: concurrent clients, half on keep-alive
//! connections and half opening a connection per request, recording every outcome with its
//! time so a scenario can count failures and measure shares per phase. The clients speak
//! HTTP/1.1 in clear text or over TLS ([`TlsClient`]), with the same halves and the same
//! failure accounting.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::tls::{
    CertificateDer, CertificateError, ClientConfig, ClientTlsStream, DigitallySignedStruct,
    HandshakeSignatureValid, RootCertStore, RusTlsError, ServerCertVerified, ServerCertVerifier,
    ServerName, SignatureScheme, TlsConnector, UnixTime, WebPkiServerVerifier,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::fixtures::{read_response, request_from, runtime, Response};

/// Pause between two requests of one client, so the load leaves the machine room to work.
const PACE: Duration = Duration::from_millis(5);
/// Upper bounds, whatever the scenario does.
const MAX_PER_CLIENT: usize = 20_000;
const MAX_TIME: Duration = Duration::from_secs(120);
/// A request without an answer this long counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What one request got: the backend's answer, or what went wrong.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the request was sent: routing is decided then, however long the answer takes.
    pub at: Instant,
    pub outcome: Result<String, String>,
    /// Whether the request opened its connection (and, over TLS, made its handshake).
    pub new_connection: bool,
    /// Over TLS: the certificate of its connection's session (the one its handshake got, or
    /// for a resumed session the one of the handshake that began it), as [`cert_id`] names it.
    pub cert: Option<u64>,
}

/// A short name for a certificate (DER), to compare what handshakes got with files.
pub fn cert_id(der: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    der.hash(&mut hasher);
    hasher.finish()
}

/// The first certificate of a PEM file, as [`cert_id`] names it.
pub fn cert_file_id(path: &Path) -> u64 {
    cert_id(&pem_certificate(path))
}

fn pem_certificate(path: &Path) -> Vec<u8> {
    let der = pingora::tls::load_pem_file_ca(&path.display().to_string())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(!der.is_empty(), "{}: no certificate", path.display());
    der
}

/// The client side of TLS for the tests: trusts exactly the given self-signed certificates,
/// sends a name from them as SNI, and offers the given ALPN protocols.
///
/// Each connection makes a full handshake unless the client is made [`TlsClient::resuming`]:
/// the handshake the proxy pays most for, and the one that shows which certificate it serves
/// now (a resumed session keeps the certificate of the handshake that began it, even across a
/// reload, as with any server).
#[derive(Clone)]
pub struct TlsClient {
    verifier: Arc<Pinned>,
    alpn: Vec<Vec<u8>>,
    name: ServerName<'static>,
    /// One session cache for every connection, when they resume.
    resuming: Option<TlsConnector>,
}

impl TlsClient {
    /// Trusts the certificates in the PEM files `certs` (and no other), with `sni` sent in
    /// every ClientHello and `alpn` offered (none: the server picks HTTP/1.1).
    pub fn trusting(certs: &[&Path], sni: &str, alpn: &[&[u8]]) -> TlsClient {
        pingora::tls::install_default_crypto_provider();
        let pinned: Vec<CertificateDer<'static>> = certs
            .iter()
            .map(|path| CertificateDer::from(pem_certificate(path)))
            .collect();
        let mut roots = RootCertStore::empty();
        for cert in &pinned {
            roots
                .add(cert.clone())
                .expect("a certificate as trust anchor");
        }
        let signatures = WebPkiServerVerifier::builder(Arc::new(roots))
            .build()
            .expect("a verifier for the test certificates");
        TlsClient {
            verifier: Arc::new(Pinned {
                pinned,
                signatures,
                verified: AtomicUsize::new(0),
            }),
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
            name: ServerName::try_from(sni.to_string()).expect("a DNS name for SNI"),
            resuming: None,
        }
    }

    /// The same client, but its connections share one session cache and resume (by ticket
    /// or session ID, as the server offers) as browsers do. Its count of full handshakes
    /// starts at zero.
    pub fn resuming(mut self) -> TlsClient {
        self.verifier = Arc::new(Pinned {
            pinned: self.verifier.pinned.clone(),
            signatures: Arc::clone(&self.verifier.signatures),
            verified: AtomicUsize::new(0),
        });
        self.resuming = Some(self.connector());
        self
    }

    /// Handshakes that verified the server's certificate: full ones, as a resumed session
    /// sends none.
    pub fn full_handshakes(&self) -> usize {
        self.verifier.verified.load(Ordering::SeqCst)
    }

    /// A connector with a session cache of its own: an empty one makes a full handshake.
    fn connector(&self) -> TlsConnector {
        let verifier: Arc<dyn ServerCertVerifier> = self.verifier.clone();
        let mut config = ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = self.alpn.clone();
        TlsConnector::from(Arc::new(config))
    }

    /// A TCP connection to `addr` and a TLS handshake on it.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<ClientTlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let connector = self.resuming.clone().unwrap_or_else(|| self.connector());
        connector.connect(self.name.clone(), tcp).await
    }
}

/// A server certificate is trusted when it is one of the test's own, byte for byte. The
/// certificates `openssl req -x509` makes are marked CA, which WebPKI refuses as a server's
/// own certificate; pinning them is what a test wants anyway. Signatures are checked as usual.
#[derive(Debug)]
struct Pinned {
    pinned: Vec<CertificateDer<'static>>,
    signatures: Arc<WebPkiServerVerifier>,
    /// Certificates verified so far.
    verified: AtomicUsize,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, RusTlsError> {
        if self
            .pinned
            .iter()
            .any(|c| c.as_ref() == end_entity.as_ref())
        {
            self.verified.fetch_add(1, Ordering::SeqCst);
            Ok(ServerCertVerified::assertion())
        } else {
            Err(RusTlsError::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RusTlsError> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RusTlsError> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

/// The certificate of a client TLS connection's session.
fn served_cert(stream: &ClientTlsStream<TcpStream>) -> Option<u64> {
    let (_, connection) = stream.get_ref();
    connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| cert_id(leaf.as_ref()))
}

/// Any byte stream a load client talks over.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A keep-alive client's connection, and what its handshake got.
struct Open {
    stream: BufReader<Box<dyn Io>>,
    cert: Option<u64>,
}

/// Opens a connection to `addr`, with a TLS handshake when `tls` is given.
async fn open(addr: SocketAddr, tls: Option<&TlsClient>) -> Result<Open, String> {
    match tls {
        None => {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            Ok(Open {
                stream: BufReader::new(Box::new(stream)),
                cert: None,
            })
        }
        Some(tls) => {
            let stream = tls
                .connect(addr)
                .await
                .map_err(|e| format!("TLS connect: {e}"))?;
            let cert = served_cert(&stream);
            Ok(Open {
                stream: BufReader::new(Box::new(stream)),
                cert,
            })
        }
    }
}

/// One `GET path` on a connection of its own, closed after the answer; with the certificate
/// its handshake got.
pub async fn tls_request(
    tls: &TlsClient,
    addr: SocketAddr,
    path: &str,
) -> Result<(Response, Option<u64>), String> {
    let mut open = open(addr, Some(tls)).await?;
    let head = format!("GET {path} HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n");
    open.stream
        .get_mut()
        .write_all(head.as_bytes())
        .await
        .map_err(|e| format!("new connection write: {e}"))?;
    let response = read_response(&mut open.stream)
        .await
        .map_err(|e| format!("new connection: {e}"))?;
    Ok((response, open.cert))
}

/// The body of a 2xx answer, or what it was instead.
fn answer(r: &Response) -> Result<String, String> {
    if (200..300).contains(&r.status) {
        Ok(r.text())
    } else {
        Err(format!("status {}: {}", r.status, r.text()))
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    clients: JoinSet<Vec<Sample>>,
}

impl Load {
    /// Starts `clients` clients (half keep-alive) sending `GET /` to `addr`.
    pub fn start(addr: SocketAddr, clients: usize) -> Load {
        Load::start_with(addr, clients, None)
    }

    /// The same over TLS: every new connection makes a handshake with `tls`.
    pub fn start_tls(addr: SocketAddr, clients: usize, tls: &TlsClient) -> Load {
        Load::start_with(addr, clients, Some(tls))
    }

    fn start_with(addr: SocketAddr, clients: usize, tls: Option<&TlsClient>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let _guard = runtime().enter();
        let mut set = JoinSet::new();
        for i in 0..clients {
            let stop = Arc::clone(&stop);
            let done = Arc::clone(&done);
            let keep_alive = i % 2 == 0;
            let tls = tls.cloned();
            set.spawn(async move { client(addr, tls, keep_alive, stop, done).await });
        }
        Load {
            stop,
            done,
            clients: set,
        }
    }

    /// Waits until `n` more requests have completed (at most `limit`), and returns when.
    pub fn run_for(&self, n: usize, limit: Duration) -> Instant {
        let target = self.done.load(Ordering::SeqCst) + n;
        crate::fixtures::wait_until("load progress", limit, || {
            self.done.load(Ordering::SeqCst) >= target
        });
        Instant::now()
    }

    /// Stops every client after its current request and returns all samples, in time order.
    pub fn stop(mut self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        let mut samples = runtime().block_on(async {
            let mut all = Vec::new();
            while let Some(part) = self.clients.join_next().await {
                all.extend(part.expect("a load client panicked"));
            }
            all
        });
        samples.sort_by_key(|s| s.at);
        Report { samples }
    }
}

async fn client(
    addr: SocketAddr,
    tls: Option<TlsClient>,
    keep_alive: bool,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> Vec<Sample> {
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut connection: Option<Open> = None;
    while !stop.load(Ordering::SeqCst)
        && samples.len() < MAX_PER_CLIENT
        && started.elapsed() < MAX_TIME
    {
        let sent = Instant::now();
        let new_connection = !keep_alive || connection.is_none();
        let mut cert = None;
        let attempt = async {
            if keep_alive {
                keep_alive_request(addr, tls.as_ref(), &mut connection, &mut cert).await
            } else if let Some(tls) = &tls {
                let (response, served) = tls_request(tls, addr, "/").await?;
                cert = served;
                answer(&response)
            } else {
                match request_from(None, addr, "GET", "/", &[]).await {
                    Ok(r) => answer(&r),
                    Err(e) => Err(format!("new connection: {e}")),
                }
            }
        };
        let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
            Ok(outcome) => outcome,
            Err(_) => {
                connection = None;
                Err(format!("no answer within {REQUEST_TIMEOUT:?}"))
            }
        };
        samples.push(Sample {
            at: sent,
            outcome,
            new_connection,
            cert,
        });
        done.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(PACE).await;
    }
    samples
}

/// One request on the client's persistent connection, opening one when there is none. A
/// failure on a reused connection counts: that is what users of keep-alive would see.
async fn keep_alive_request(
    addr: SocketAddr,
    tls: Option<&TlsClient>,
    connection: &mut Option<Open>,
    cert: &mut Option<u64>,
) -> Result<String, String> {
    if connection.is_none() {
        *connection = Some(open(addr, tls).await?);
    }
    let Some(conn) = connection.as_mut() else {
        return Err("no connection".into());
    };
    *cert = conn.cert;
    let sent = conn
        .stream
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: load\r\n\r\n")
        .await;
    let result = match sent {
        Ok(()) => read_response(&mut conn.stream)
            .await
            .map_err(|e| format!("keep-alive: {e}")),
        Err(e) => Err(format!("keep-alive write: {e}")),
    };
    match result {
        Ok(r) => {
            if r.header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"))
            {
                *connection = None;
            }
            answer(&r)
        }
        Err(e) => {
            *connection = None;
            Err(e)
        }
    }
}

pub struct Report {
    pub samples: Vec<Sample>,
}

impl Report {
    pub fn total(&self) -> usize {
        self.samples.len()
    }

    pub fn failures(&self) -> Vec<&String> {
        self.samples
            .iter()
            .filter_map(|s| s.outcome.as_ref().err())
            .collect()
    }

    /// Answers from `who` among the successful answers to requests sent between `from` and
    /// `to`, as a share.
    pub fn share(&self, who: &str, from: Instant, to: Instant) -> (f64, usize) {
        let window: Vec<&String> = self
            .samples
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .filter_map(|s| s.outcome.as_ref().ok())
            .collect();
        let hits = window.iter().filter(|b| b.as_str() == who).count();
        (hits as f64 / window.len().max(1) as f64, window.len())
    }
}

/// Asserts that no request of `report` failed, naming the first few that did; prints the
/// totals either way.
pub fn assert_no_failures(name: &str, report: &Report) {
    let failures = report.failures();
    eprintln!(
        "{name}: {} requests, {} failed",
        report.total(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{name}: {} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
}
