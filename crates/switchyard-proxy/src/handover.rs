//! Keeps the last connections of a process that hands over (upgrade) or stops.
//!
//! When Pingora stops a listener it also drops every connection still waiting for its first
//! request bytes (`handle_new_request` selects on shutdown). A client that connected a few
//! microseconds before the listener closed has sent its request, but the bytes are not read
//! yet: it sees its connection closed with no answer. Once the process is closing, this gate
//! waits for a new connection's first byte itself, counted as in flight so the drain waits
//! too, and only then hands the connection to the proxy, which finds the request already
//! buffered and serves it. Before closing, connections go straight through, at no cost.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;

/// How long a connection may stay silent once the process is closing.
const FIRST_BYTE_LIMIT: Duration = Duration::from_secs(2);

pub struct HandoverGate<A> {
    inner: Arc<A>,
    closing: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
}

impl<A> HandoverGate<A> {
    /// `active` is the proxy's count of requests in flight (see `Proxy::active_requests`).
    pub fn new(inner: A, closing: Arc<AtomicBool>, active: Arc<AtomicUsize>) -> Self {
        HandoverGate {
            inner: Arc::new(inner),
            closing,
            active,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HandoverGate<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if !self.closing.load(Ordering::Relaxed) {
            return self.inner.process_new(stream, shutdown).await;
        }
        // Counted until the request is done, not only until its first byte: between the two,
        // the proxy has not created its own count yet and the drain must not exit.
        self.active.fetch_add(1, Ordering::AcqRel);
        let mut first = [0u8; 1];
        let arrived = tokio::time::timeout(FIRST_BYTE_LIMIT, stream.try_peek(&mut first)).await;
        let reused = match arrived {
            Ok(Ok(true)) => self.inner.process_new(stream, shutdown).await,
            _ => None,
        };
        self.active.fetch_sub(1, Ordering::AcqRel);
        reused
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}
