//! Every client connection of the proxy, from accept to close: the connection limit, the
//! [`ClientStream`] around the accepted stream, and the HTTP/1 keep-alive loop.
//!
//! Pingora runs the keep-alive loop inside its own `ServerApp` (one `process_new` per
//! connection) and only offers a keep-alive timeout in whole seconds, applied per read. We run
//! the loop ourselves, the same few lines over Pingora's `HttpServerApp`, because this is the
//! one place that sees a request end and the next begin: the stream is told, and its own timers
//! bound the idle wait and the head to any precision. The wait for the next head is ours too
//! ([`ClientStream::next_head`]): Pingora gets the stream with a whole head in it, so an idle
//! keep-alive connection holds no Pingora session, header buffer or proxy future, only the
//! stream, its timer and this loop, in a task of our own (about 4 KiB resident in all, 29
//! before).
//!
//! Each proxy listener has its own [`ClientApp`] (it knows whether it is TLS, h2c, ...); they
//! share one [`ClientCounters`], so `max_connections` and the connection gauge count over all
//! of them. A TLS listener is a plain TCP listener to Pingora: the app runs the handshake
//! itself, after taking the connection's slot (a connection past the limit costs no
//! handshake) and under `header_timeout` (Pingora's own TLS listener allows a fixed 60 s).
//! Then ALPN (or, with h2c, the preface) decides: HTTP/2 goes to Pingora's HTTP/2 server
//! in an [`H2Stream`], HTTP/1 through [`ClientStream`] and the keep-alive loop below.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use switchyard_access_log::AccessLog;
use switchyard_config::ClientLimits;
use switchyard_pool::Metrics;
use tokio::io::AsyncReadExt;

use crate::client_stream::{ClientStream, HeadLimits, RefusalLog};
use crate::front::ListenerFront;
use crate::h2_stream::H2Stream;
use crate::handover::Connections;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub(crate) const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a connection may take to send its request head once the process is closing.
const HANDOVER_HEAD_TIME: Duration = Duration::from_secs(2);

/// Why a client connection was refused or cut short, as the `reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// `max_connections` reached: closed at once, unread.
    Limit,
    /// No complete request head within `header_timeout`.
    HeaderTimeout,
    /// A head over `max_request_header_bytes` (`431`/`414`).
    HeaderTooLarge,
    /// A request body that sent nothing for `body_timeout` (`408`).
    BodyTimeout,
    /// A request body over `max_request_body_bytes` (`413`).
    BodyTooLarge,
    /// A client that took nothing of the response for `send_timeout`.
    SendTimeout,
}

impl Rejection {
    const ALL: [Rejection; 6] = [
        Rejection::Limit,
        Rejection::HeaderTimeout,
        Rejection::HeaderTooLarge,
        Rejection::BodyTimeout,
        Rejection::BodyTooLarge,
        Rejection::SendTimeout,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Rejection::Limit => "limit",
            Rejection::HeaderTimeout => "header_timeout",
            Rejection::HeaderTooLarge => "header_too_large",
            Rejection::BodyTimeout => "body_timeout",
            Rejection::BodyTooLarge => "body_too_large",
            Rejection::SendTimeout => "send_timeout",
        }
    }
}

/// Open client connections and refusals: `switchyard_client_connections` and
/// `switchyard_client_connections_rejected_total{reason}`.
pub struct ClientCounters {
    open: AtomicUsize,
    gauge: IntGauge,
    rejected: [IntCounter; 6],
}

impl ClientCounters {
    /// Counters registered with the pool's metrics, so one scrape shows them.
    pub fn new(metrics: &Metrics) -> ClientCounters {
        let gauge = IntGauge::new(
            "switchyard_client_connections",
            "Client connections open on the proxy listeners.",
        )
        .expect("a valid metric definition");
        let rejected = IntCounterVec::new(
            Opts::new(
                "switchyard_client_connections_rejected_total",
                "Client connections refused or cut short, by reason.",
            ),
            &["reason"],
        )
        .expect("a valid metric definition");
        metrics.register("switchyard_client_connections", Box::new(gauge.clone()));
        metrics.register(
            "switchyard_client_connections_rejected_total",
            Box::new(rejected.clone()),
        );
        ClientCounters {
            open: AtomicUsize::new(0),
            gauge,
            rejected: Rejection::ALL.map(|r| rejected.with_label_values(&[r.as_str()])),
        }
    }

    pub fn reject(&self, why: Rejection) {
        self.rejected[why as usize].inc();
    }

    /// A place for one more connection, or `None` at the limit.
    pub(crate) fn open(self: &Arc<Self>, limit: usize) -> Option<Slot> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= limit {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.reject(Rejection::Limit);
            return None;
        }
        self.gauge.inc();
        Some(Slot {
            counters: Arc::clone(self),
            accepted: Instant::now(),
        })
    }
}

/// One open client connection, counted until it is dropped with its stream.
pub struct Slot {
    counters: Arc<ClientCounters>,
    accepted: Instant,
}

impl Slot {
    /// When the connection was accepted: `header_timeout` counts from here, through a TLS
    /// handshake or the h2c preface check and on into the first head or HTTP/2 preface.
    pub(crate) fn accepted(&self) -> Instant {
        self.accepted
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counters.open.fetch_sub(1, Ordering::AcqRel);
        self.counters.gauge.dec();
    }
}

/// One proxy listener's app: limits, wraps and serves each client connection.
pub struct ClientApp<A> {
    inner: Arc<A>,
    front: ListenerFront,
    limits: ClientLimits,
    counters: Arc<ClientCounters>,
    closing: Arc<AtomicBool>,
    connections: Arc<Connections>,
    /// For the heads this app refuses itself.
    access_log: Arc<AccessLog>,
}

impl<A> ClientApp<A> {
    /// `closing` is raised when a stop or upgrade begins; `connections` learns when the app,
    /// and with it the last connection task, is gone. The counters are shared by every
    /// listener's app, so `max_connections` counts over all of them.
    pub fn new(
        inner: A,
        front: ListenerFront,
        limits: ClientLimits,
        counters: Arc<ClientCounters>,
        closing: Arc<AtomicBool>,
        connections: Arc<Connections>,
        access_log: Arc<AccessLog>,
    ) -> Self {
        connections.app_created();
        ClientApp {
            inner: Arc::new(inner),
            front,
            limits,
            counters,
            closing,
            connections,
            access_log,
        }
    }
}

/// Pingora moves the listening app into an `Arc` when the service starts and gives every
/// connection task a clone of it from the moment the task is spawned; its own clones go when
/// the accept loops have ended. So the app is dropped exactly when no connection can arrive
/// any more and none is being served: what the drain at shutdown waits for.
impl<A> Drop for ClientApp<A> {
    fn drop(&mut self) {
        self.connections.app_ended();
    }
}

/// What a connection turned out to speak once it was accepted (and its handshake done).
enum Speaks {
    Http1(Stream),
    Http2(Stream),
}

impl<A: HttpServerApp + Send + Sync + 'static> ClientApp<A> {
    /// The TLS handshake (on a TLS listener) and the choice between HTTP/1 and HTTP/2: by ALPN
    /// over TLS, by the preface with h2c. Both are bounded by `header_timeout` from the
    /// accept, as the first head of a cleartext HTTP/1 connection is: Pingora's own TLS
    /// listener would give a handshake 60 s, and take it before any connection limit.
    async fn negotiate(&self, stream: Stream, accepted: Instant) -> Option<Speaks> {
        let due = accepted + self.limits.header_timeout;
        if let Some(tls) = &self.front.tls {
            let stream = match self.within(due, tls.handshake(stream)).await? {
                Ok(stream) => stream,
                Err(e) => {
                    // A client that gave up or speaks no TLS: not worth more than debug.
                    log::debug!("TLS handshake failed: {e}");
                    return None;
                }
            };
            let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
            return Some(if h2 {
                Speaks::Http2(stream)
            } else {
                Speaks::Http1(stream)
            });
        }
        if !self.front.h2c {
            return Some(Speaks::Http1(stream));
        }
        match self.within(due, sniff_preface(stream)).await? {
            Some((stream, true)) => Some(Speaks::Http2(stream)),
            Some((stream, false)) => Some(Speaks::Http1(stream)),
            None => None,
        }
    }

    /// Waits for the next request head of an HTTP/1 connection in our code, before Pingora
    /// gets the stream (see [`ClientStream::next_head`]): an idle keep-alive connection then
    /// holds no Pingora session or proxy future. False: drop the connection. An idle wait ends
    /// at a stop, as Pingora's own does. A head is awaited whatever the stop, for a while,
    /// once the process is closing or when part of it has arrived by the stop: when Pingora
    /// stops the listener it drops every connection whose head it has not read in full, and a
    /// client that connected just before has sent its request, but not all of it may be here
    /// yet (`next_head` keeps what it read in the stream).
    async fn next_head(&self, stream: &mut ClientStream, shutdown: &ShutdownWatch) -> bool {
        if !self.closing.load(Ordering::Relaxed) {
            let mut stop = shutdown.clone();
            let stopped = async move {
                if stop.wait_for(|stopping| *stopping).await.is_err() {
                    // No one can stop this process any more: it ends with the runtime.
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                // A head that is already here is served, as Pingora's own wait does.
                biased;
                ready = stream.next_head() => return ready,
                _ = stopped => {}
            }
            if !stream.head_begun() {
                return false;
            }
        }
        let head = tokio::time::timeout(HANDOVER_HEAD_TIME, stream.next_head());
        head.await.unwrap_or(false)
    }

    /// The HTTP/1 keep-alive loop of one connection, each head awaited here (see
    /// [`ClientApp::next_head`]) before Pingora serves the request.
    async fn serve_http1(&self, stream: Stream, slot: Slot, shutdown: &ShutdownWatch) {
        let limits = HeadLimits {
            keepalive_timeout: self.limits.keepalive_timeout,
            header_timeout: self.limits.header_timeout,
            max_header_bytes: self.limits.max_request_header_bytes,
        };
        let client = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let mut stream = Box::new(ClientStream::new(
            stream,
            limits,
            Arc::clone(&self.counters),
            slot,
        ));
        stream.log_refusals(RefusalLog {
            log: Arc::clone(&self.access_log),
            client,
        });
        let mut settings: Option<HttpPersistentSettings> = None;
        loop {
            // After a request with a body (or pipelined ones) Pingora may have read the next
            // request's start into `settings`, which has no getter for it: its own read of the
            // head must come first then, and the connection idles in Pingora's session.
            if !stream.read_ahead() && !self.next_head(&mut stream, shutdown).await {
                return;
            }
            let mut session = ServerSession::new_http1(stream);
            match settings {
                Some(settings) => settings.apply_to_session(&mut session),
                // Unbounded for Pingora: the stream's own timers bound the idle wait and the
                // head.
                None => session.set_keepalive(if *shutdown.borrow() { None } else { Some(0) }),
            }
            let Some(reused) = self.inner.process_new_http(session, shutdown).await else {
                return;
            };
            let (reused, next) = reused.consume();
            stream = match reused.into_any().downcast::<ClientStream>() {
                Ok(client) => client,
                Err(_) => {
                    log::error!("a kept-alive connection is no longer a client stream; closed");
                    return;
                }
            };
            stream.request_done();
            settings = next;
        }
    }

    /// `work`, unless `due` comes first: then it counts as a `header_timeout` refusal,
    /// counted before `work` (and the connection it holds) is dropped, so that a client that
    /// sees the close finds it counted.
    async fn within<F: std::future::Future>(&self, due: Instant, work: F) -> Option<F::Output> {
        tokio::pin!(work);
        tokio::select! {
            done = &mut work => Some(done),
            _ = tokio::time::sleep_until(due) => {
                self.counters.reject(Rejection::HeaderTimeout);
                None
            }
        }
    }
}

/// The TCP stream a proxy listener accepted, out of its box: what reading ahead and rewinding
/// (h2c) and a rustls handshake (whose stream then forwards the TCP digests) need. `None`,
/// logged as an error with `what` needed it: the stream was something else.
pub fn accepted_tcp(stream: Stream, what: &str) -> Option<Box<L4Stream>> {
    match stream.into_any().downcast::<L4Stream>() {
        Ok(tcp) => Some(tcp),
        Err(_) => {
            log::error!("{what}: an accepted connection is not a TCP stream; closed");
            None
        }
    }
}

/// Whether a cleartext connection starts with the HTTP/2 preface, read as its bytes arrive:
/// HTTP/1 is decided at the first byte that differs (Pingora's own h2c check waits for 24
/// bytes, which a short HTTP/1.0 request such as a load balancer's `OPTIONS / HTTP/1.0`
/// never sends). What was read is put back for whichever protocol it is. `None`: a read
/// error, or not a TCP stream.
async fn sniff_preface(stream: Stream) -> Option<(Stream, bool)> {
    let mut tcp = accepted_tcp(stream, "h2c")?;
    let mut seen = [0u8; H2_PREFACE.len()];
    let mut len = 0;
    let h2 = loop {
        let got = tcp.read(&mut seen[len..]).await.ok()?;
        len += got;
        if got == 0 || seen[..len] != H2_PREFACE[..len] {
            break false;
        }
        if len == H2_PREFACE.len() {
            break true;
        }
    };
    tcp.rewind(&seen[..len]);
    Some((tcp, h2))
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for ClientApp<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // Dropped unread past the limit: no buffer, no parser, no timer, no handshake for it.
        let slot = self.counters.open(self.limits.max_connections)?;
        // Boxed: a TLS handshake's state is large, and inline it would size this future, which
        // every idle keep-alive connection keeps for its whole life (8.6 KiB in a debug build).
        let stream = match Box::pin(self.negotiate(stream, slot.accepted())).await? {
            Speaks::Http1(stream) => stream,
            Speaks::Http2(stream) => {
                let stream = H2Stream::new(
                    stream,
                    self.limits.header_timeout,
                    Arc::clone(&self.counters),
                    slot,
                );
                // Pingora's own HTTP/2 server: the handshake, a task per stream, GOAWAY and
                // the streams finished at shutdown.
                return ServerApp::process_new(&self.inner, Box::new(stream), shutdown).await;
            }
        };
        // Served in a task of our own: Pingora's connection task is sized by its accept-time
        // TLS handshake state (about 8.5 KiB), which it would keep for the connection's whole
        // life. The app travels with it, so the drain still waits for this connection.
        let app = Arc::clone(self);
        let shutdown = shutdown.clone();
        tokio::spawn(async move { app.serve_http1(stream, slot, &shutdown).await });
        None
    }

    async fn cleanup(&self) {
        self.inner.http_cleanup().await;
    }
}
