//! Keeps the last connections of a process that hands over (upgrade) or stops.
//!
//! Two of Pingora's ways of stopping lose a request that has already reached the process:
//!
//! - When it stops a listener it also drops every connection whose request head it has not
//!   read in full (`handle_new_request` selects on shutdown). A client that connected a few
//!   microseconds before the listener closed has sent its request, but the bytes are not read
//!   yet, or not all of them. Once the process is closing, [`HandoverGate`] reads a new
//!   connection's request head itself, puts the bytes back and only then hands the connection
//!   to the proxy, which finds the whole head already read and serves it. Before closing,
//!   connections go straight through, at no cost.
//! - A connection accepted just before the listener stopped gets a task that has not run yet:
//!   no count of requests sees it, and a drain that exits when the count is zero kills it.
//!   [`Connections`] knows instead when the last connection task has ended (see there).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::l4::stream::Stream as TcpStream;
use pingora_core::protocols::Stream;
use pingora_core::server::{ListenFds, RuntimeOpts, ShutdownWatch};
use pingora_core::services::{ServiceReadyNotifier, ServiceWithDependents};
use tokio::io::AsyncReadExt;

/// How long a connection may take to send its request head once the process is closing.
const HEAD_TIME_LIMIT: Duration = Duration::from_secs(2);

/// The most the gate reads looking for the end of a head; Pingora answers a longer one itself.
const HEAD_SIZE_LIMIT: usize = 64 * 1024;

/// Whether the proxy may still take or answer a connection, for the drain at shutdown.
///
/// Pingora moves the listening app (the gate) into an `Arc` when the service starts, and gives
/// every accepted connection a task holding a clone of it from the moment the task is spawned,
/// before it first runs, to its end; its own clones go when the accept loops have ended. So
/// the gate is dropped exactly when no connection can arrive any more and none is being served.
#[derive(Default)]
pub struct Connections {
    started: AtomicBool,
    ended: AtomicBool,
}

impl Connections {
    /// True when the proxy never started, or has stopped and every connection it accepted has
    /// been served or closed.
    pub fn settled(&self) -> bool {
        !self.started.load(Ordering::Acquire) || self.ended.load(Ordering::Acquire)
    }
}

/// The proxy's listening service, which marks its [`Connections`] started before it can
/// accept anything.
pub struct Watched<S> {
    service: S,
    connections: Arc<Connections>,
}

impl<S> Watched<S> {
    pub fn new(service: S, connections: Arc<Connections>) -> Self {
        Watched {
            service,
            connections,
        }
    }
}

#[async_trait]
impl<S: ServiceWithDependents> ServiceWithDependents for Watched<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
        ready_notifier: ServiceReadyNotifier,
    ) {
        self.connections.started.store(true, Ordering::Release);
        self.service
            .start_service(fds, shutdown, listeners_per_fd, ready_notifier)
            .await;
    }

    fn name(&self) -> &str {
        self.service.name()
    }

    fn threads(&self) -> Option<usize> {
        self.service.threads()
    }

    fn runtime_opts_override(&self, global: &RuntimeOpts) -> Option<RuntimeOpts> {
        self.service.runtime_opts_override(global)
    }

    fn on_startup_delay(&self, time_waited: Duration) {
        self.service.on_startup_delay(time_waited);
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.service.listen_addresses()
    }
}

pub struct HandoverGate<A> {
    inner: Arc<A>,
    closing: Arc<AtomicBool>,
    connections: Arc<Connections>,
}

impl<A> HandoverGate<A> {
    /// `connections` learns when the gate, and with it the last connection task, is gone.
    pub fn new(inner: A, closing: Arc<AtomicBool>, connections: Arc<Connections>) -> Self {
        HandoverGate {
            inner: Arc::new(inner),
            closing,
            connections,
        }
    }
}

impl<A> Drop for HandoverGate<A> {
    fn drop(&mut self) {
        self.connections.ended.store(true, Ordering::Release);
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HandoverGate<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if !self.closing.load(Ordering::Relaxed) {
            return self.inner.process_new(stream, shutdown).await;
        }
        match tokio::time::timeout(HEAD_TIME_LIMIT, read_head(stream)).await {
            Ok(Some(stream)) => self.inner.process_new(stream, shutdown).await,
            _ => None,
        }
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// Reads until the request head is complete (or the client stops sending, or it is longer than
/// [`HEAD_SIZE_LIMIT`]) and puts the bytes back to be read again. `None`: the client closed or
/// failed before sending anything.
async fn read_head(stream: Stream) -> Option<Stream> {
    let mut stream = if stream.as_any().is::<TcpStream>() {
        stream.into_any().downcast::<TcpStream>().ok()?
    } else {
        // Not a plain TCP stream (the proxy listens on nothing else): at least the first byte.
        let mut stream = stream;
        let mut first = [0u8; 1];
        return matches!(stream.try_peek(&mut first).await, Ok(true)).then_some(stream);
    };
    let mut head = Vec::with_capacity(1024);
    loop {
        let searched = head.len().saturating_sub(3);
        match stream.read_buf(&mut head).await {
            Ok(0) | Err(_) if head.is_empty() => return None,
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if ends_head(&head[searched..]) || head.len() >= HEAD_SIZE_LIMIT {
            break;
        }
        head.reserve(1024);
    }
    stream.rewind(&head);
    Some(stream)
}

/// Whether `bytes` hold the blank line that ends a request head (CRLF or bare LF, as the
/// proxy's parser accepts both).
fn ends_head(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|w| w == b"\n\n") || bytes.windows(3).any(|w| w == b"\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::ends_head;

    #[test]
    fn the_end_of_a_head_is_a_blank_line_with_or_without_carriage_returns() {
        assert!(ends_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(ends_head(b"GET / HTTP/1.1\nHost: a\n\n"));
        assert!(!ends_head(b"GET / HTTP/1.1\r\nHost: a\r\n"));
        assert!(!ends_head(b"GET / HTTP/1.1\r\n"));
    }
}
