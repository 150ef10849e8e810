//! The connection to etcd: the settings read from `state_store.etcd` (files read once, at
//! start), one client shared by every task and recreated after a failure, the deadline every
//! request runs under, what an error means to the caller, and the backoff between retries.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use rand::Rng;
use switchyard_config::EtcdConfig;
use tokio::sync::Mutex;

/// The HTTP/2 keep-alive ping interval on a connection with streams open (watch, lease
/// keep-alive). etcd's server refuses pings more often than every 5 s by default
/// (`--grpc-keepalive-min-time`, answered with `GOAWAY too_many_pings`), so not less.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Why a request did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No answer: down, partitioned, timed out, connection lost.
    Unavailable(String),
    /// An answer that says no: authentication, permission, a request etcd calls invalid.
    Refused(String),
}

impl Failure {
    pub(crate) fn reason(&self) -> &str {
        match self {
            Failure::Unavailable(r) | Failure::Refused(r) => r,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

/// What an etcd client error means: no answer (retried, `503`) or a refusal.
pub(crate) fn classify(error: etcd_client::Error) -> Failure {
    use etcd_client::Error as E;
    use tonic::Code;
    match &error {
        E::GRpcStatus(status) => {
            let message = format!("{}: {}", code_name(status.code()), status.message());
            match status.code() {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Unknown
                | Code::Aborted
                | Code::Internal => Failure::Unavailable(message),
                // etcd answers a lease that ran out (our report or campaign with it) so: the
                // lease task grants a new one, this request is a retry away.
                Code::NotFound if status.message().contains("lease not found") => {
                    Failure::Unavailable(message)
                }
                _ => Failure::Refused(message),
            }
        }
        E::TransportError(_)
        | E::IoError(_)
        | E::WatchError(_)
        | E::LeaseKeepAliveError(_)
        | E::EndpointError(_)
        | E::Internal(_) => Failure::Unavailable(error.to_string()),
        _ => Failure::Refused(error.to_string()),
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The settings of the connection, files read.
pub(crate) struct Settings {
    pub(crate) endpoints: Vec<String>,
    pub(crate) options: ConnectOptions,
    pub(crate) request_timeout: Duration,
}

impl Settings {
    /// Reads the password and TLS files (no network). Errors name the field.
    pub(crate) fn read(config: &EtcdConfig) -> Result<Settings, String> {
        let request_timeout = config.request_timeout;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(request_timeout)
            .with_keep_alive(
                KEEP_ALIVE_INTERVAL,
                request_timeout.max(Duration::from_secs(1)),
            )
            // Pings only while a stream is open: etcd counts pings on an idle connection
            // against the client (`PermitWithoutStream` is off) and closes it.
            .with_keep_alive_while_idle(false)
            // A member cut off from the cluster's leader answers nothing: unary requests fail
            // at once and watches end, instead of serving a stale state.
            .with_require_leader(true);
        match (&config.username, &config.password_file) {
            (Some(user), Some(file)) => {
                let password = read_text(file, "state_store.etcd.password_file")?;
                options = options
                    .with_user(user.clone(), password)
                    .with_auto_token_refresh(true);
            }
            (None, None) => {}
            _ => {
                return Err(
                    "state_store.etcd.password_file: username and password_file go together".into(),
                )
            }
        }
        if let Some(tls) = &config.tls {
            let Some(ca_file) = &tls.ca_file else {
                return Err("state_store.etcd.tls.ca_file: needed: the CA that signed etcd's certificates (no system roots are trusted for etcd)".into());
            };
            let ca = read_pem(
                ca_file,
                "state_store.etcd.tls.ca_file",
                PemKind::Certificate,
            )?;
            let mut tls_options = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
            match (&tls.cert_file, &tls.key_file) {
                (Some(cert_file), Some(key_file)) => {
                    let cert = read_pem(
                        cert_file,
                        "state_store.etcd.tls.cert_file",
                        PemKind::Certificate,
                    )?;
                    let key = read_pem(key_file, "state_store.etcd.tls.key_file", PemKind::Key)?;
                    tls_options = tls_options.identity(Identity::from_pem(cert, key));
                }
                (None, None) => {}
                _ => {
                    return Err("state_store.etcd.tls.key_file: cert_file and key_file go together (the client certificate and its key)".into())
                }
            }
            options = options.with_tls(tls_options);
        }
        Ok(Settings {
            endpoints: config.endpoints.clone(),
            options,
            request_timeout,
        })
    }
}

/// A text file's content, its trailing newline dropped.
fn read_text(path: &Path, field: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{field}: {}: cannot read: {e}", path.display()))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() {
        return Err(format!("{field}: {}: empty", path.display()));
    }
    Ok(text.to_string())
}

#[derive(Clone, Copy)]
enum PemKind {
    Certificate,
    Key,
}

/// A PEM file's bytes, checked to hold what it should (so that a wrong file is named at
/// start, not as a handshake failure later).
fn read_pem(path: &Path, field: &str, kind: PemKind) -> Result<Vec<u8>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bytes = std::fs::read(path)
        .map_err(|e| format!("{field}: {}: cannot read: {e}", path.display()))?;
    let valid = match kind {
        PemKind::Certificate => {
            let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
            match certs {
                Ok(certs) if !certs.is_empty() => Ok(()),
                Ok(_) => Err("no PEM certificate in it".to_string()),
                Err(e) => Err(format!("not PEM certificates: {e}")),
            }
        }
        PemKind::Key => PrivateKeyDer::from_pem_slice(&bytes)
            .map(drop)
            .map_err(|e| format!("no PEM private key in it: {e}")),
    };
    valid.map_err(|e| format!("{field}: {}: {e}", path.display()))?;
    Ok(bytes)
}

/// One member of the cluster: an index into the endpoints.
pub(crate) type Member = usize;

/// The clients of the store, one per endpoint, each made on first use and again after a
/// failure (without a user that does no network I/O; with one it authenticates, under the
/// caller's deadline). Requests go to one member at a time, as etcd's own client does: a
/// member that fails (no answer, no connection, no leader) hands over to the next one, so
/// that one member down fails no request that another could answer.
pub(crate) struct Conn {
    settings: Settings,
    members: Mutex<Members>,
}

struct Members {
    clients: Vec<Option<Client>>,
    /// The member requests go to.
    current: Member,
}

impl Conn {
    pub(crate) fn new(settings: Settings) -> Conn {
        let members = Members {
            clients: vec![None; settings.endpoints.len()],
            current: 0,
        };
        Conn {
            settings,
            members: Mutex::new(members),
        }
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        self.settings.request_timeout
    }

    /// The current member's client, made now if there is none.
    async fn client(&self) -> (Member, Result<Client, etcd_client::Error>) {
        let mut members = self.members.lock().await;
        let member = members.current;
        if let Some(client) = &members.clients[member] {
            return (member, Ok(client.clone()));
        }
        let endpoint = [self.settings.endpoints[member].as_str()];
        match Client::connect(endpoint, Some(self.settings.options.clone())).await {
            Ok(client) => {
                members.clients[member] = Some(client.clone());
                (member, Ok(client))
            }
            Err(e) => (member, Err(e)),
        }
    }

    /// `member` did not answer: its client goes (the next one is made anew: new connection,
    /// new token), and requests go to the next member.
    pub(crate) async fn failed(&self, member: Member) {
        let mut members = self.members.lock().await;
        members.clients[member] = None;
        if members.current == member {
            members.current = (member + 1) % members.clients.len();
        }
    }

    /// Runs `request` with a client under the request deadline.
    pub(crate) async fn run<T, F, Fut>(&self, request: F) -> Result<T, Failure>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.run_within(self.settings.request_timeout, request)
            .await
            .map(|(_, answer)| answer)
    }

    /// Runs `request` with a client within `deadline`, and says which member answered (for a
    /// stream: [`Conn::failed`] when it breaks). A member that could not be reached at all
    /// (the request was not sent) hands over to the next one at once, each member once.
    pub(crate) async fn run_within<T, F, Fut>(
        &self,
        deadline: Duration,
        mut request: F,
    ) -> Result<(Member, T), Failure>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let asked = AtomicUsize::new(usize::MAX);
        let attempts = async {
            let mut tries = 0;
            loop {
                tries += 1;
                let (member, client) = self.client().await;
                asked.store(member, Ordering::Relaxed);
                let answer = match client {
                    Ok(client) => request(client).await,
                    Err(e) => Err(e),
                };
                let error = match answer {
                    Ok(answer) => return Ok((member, answer)),
                    Err(error) => error,
                };
                let unsent = not_sent(&error);
                let failure = classify(error);
                if let Failure::Unavailable(_) = failure {
                    self.failed(member).await;
                    if unsent && tries < self.settings.endpoints.len() {
                        continue;
                    }
                }
                return Err(failure);
            }
        };
        match tokio::time::timeout(deadline, attempts).await {
            Ok(result) => result,
            Err(_) => {
                let member = asked.load(Ordering::Relaxed);
                if member != usize::MAX {
                    self.failed(member).await;
                }
                Err(Failure::Unavailable(format!(
                    "no answer within {}",
                    show(deadline)
                )))
            }
        }
    }
}

/// The request never left: no connection could be made (so another member may take it,
/// even a write).
fn not_sent(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unavailable
                && ["tcp connect error", "tcp open error", "dns error"]
                    .iter()
                    .any(|m| status.message().starts_with(m))
        }
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

/// A duration as config files write it: `500ms`, `2s`, `1.5s`.
pub(crate) fn show(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// Jittered exponential backoff between retries: 100 ms doubling to 5 s, each wait drawn
/// between half and all of the current step, so that instances that lost etcd together do
/// not come back in step.
pub(crate) struct Backoff {
    step: Duration,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff { step: BACKOFF_MIN }
    }

    pub(crate) fn reset(&mut self) {
        self.step = BACKOFF_MIN;
    }

    /// The next wait.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(BACKOFF_MAX);
        let half = step / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=step - half)
    }

    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_100ms_to_5s_with_jitter() {
        let mut backoff = Backoff::new();
        let first = backoff.next_delay();
        assert!((Duration::from_millis(50)..=Duration::from_millis(100)).contains(&first));
        let mut last = first;
        for _ in 0..20 {
            last = backoff.next_delay();
            assert!(last <= BACKOFF_MAX);
        }
        assert!(last >= BACKOFF_MAX / 2);
        backoff.reset();
        assert!(backoff.next_delay() <= BACKOFF_MIN);
    }

    #[test]
    fn durations_read_as_in_the_config() {
        assert_eq!(show(Duration::from_millis(500)), "500ms");
        assert_eq!(show(Duration::from_secs(2)), "2s");
        assert_eq!(show(Duration::from_millis(1500)), "1.5s");
    }
}
