//! Every client connection of the proxy, from accept to close: the connection limit, the
//! [`ClientStream`] around the accepted stream, and the HTTP/1 keep-alive loop.
//!
//! Pingora runs the keep-alive loop inside its own `ServerApp` (one `process_new` per
//! connection) and only offers a keep-alive timeout in whole seconds, applied per read. We run
//! the loop ourselves, the same few lines over Pingora's `HttpServerApp`, because this is the
//! one place that sees a request end and the next begin: the stream is told, and its own timers
//! bound the idle wait and the head to any precision.
//!
//! One [`ClientApp`] serves all the proxy listeners of a process, so `max_connections` and the
//! connection gauge count over all of them. A TLS listener fits the same app: Pingora hands
//! `process_new` the stream after its handshake, and [`ClientStream`] wraps any [`Stream`].
//! (Refusing past the limit *before* a handshake, and h2 over ALPN, belong to the listener
//! work of the TLS issue.)

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::{HttpServerApp, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use switchyard_config::ClientLimits;
use switchyard_pool::Metrics;

use crate::client_stream::{ClientStream, HeadLimits};
use crate::handover::Connections;

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
        Some(Slot(Arc::clone(self)))
    }
}

/// One open client connection, counted until it is dropped with its stream.
pub struct Slot(Arc<ClientCounters>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.dec();
    }
}

/// The proxy's listening app: limits, wraps and serves each client connection.
pub struct ClientApp<A> {
    inner: Arc<A>,
    limits: ClientLimits,
    counters: Arc<ClientCounters>,
    closing: Arc<AtomicBool>,
    connections: Arc<Connections>,
}

impl<A> ClientApp<A> {
    /// `closing` is raised when a stop or upgrade begins; `connections` learns when the app,
    /// and with it the last connection task, is gone.
    pub fn new(
        inner: A,
        limits: ClientLimits,
        counters: Arc<ClientCounters>,
        closing: Arc<AtomicBool>,
        connections: Arc<Connections>,
    ) -> Self {
        ClientApp {
            inner: Arc::new(inner),
            limits,
            counters,
            closing,
            connections,
        }
    }
}

/// Pingora moves the listening app into an `Arc` when the service starts and gives every
/// connection task a clone of it from the moment the task is spawned; its own clones go when
/// the accept loops have ended. So the app is dropped exactly when no connection can arrive
/// any more and none is being served: what the drain at shutdown waits for.
impl<A> Drop for ClientApp<A> {
    fn drop(&mut self) {
        self.connections.end();
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for ClientApp<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // Dropped unread past the limit: no buffer, no parser, no timer for it.
        let slot = self.counters.open(self.limits.max_connections)?;
        let limits = HeadLimits {
            keepalive_timeout: self.limits.keepalive_timeout,
            header_timeout: self.limits.header_timeout,
            max_header_bytes: self.limits.max_request_header_bytes,
        };
        let mut stream = ClientStream::new(stream, limits, Arc::clone(&self.counters), slot);
        if self.closing.load(Ordering::Relaxed) {
            // When Pingora stops the listener it drops every connection whose head it has not
            // read in full; a client that connected just before has sent its request, but not
            // all of it may be here yet. Read the head first, then hand it over.
            match tokio::time::timeout(HANDOVER_HEAD_TIME, stream.prefetch_head()).await {
                Ok(true) => {}
                _ => return None,
            }
        }
        let mut session = ServerSession::new_http1(Box::new(stream));
        // Unbounded for Pingora: the stream's own timers bound the idle wait and the head.
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(0) });
        let mut served = self.inner.process_new_http(session, shutdown).await;
        while let Some((stream, settings)) = served.map(|reused| reused.consume()) {
            if let Some(client) = ClientStream::of(&stream) {
                client.request_done();
            }
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            served = self.inner.process_new_http(session, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.http_cleanup().await;
    }
}
