//! Keeps the last connections of a process that hands over (upgrade) or stops.
//!
//! When Pingora stops a listener it also drops every connection whose request head it has not
//! read in full (`handle_new_request` selects on shutdown). A client that connected a few
//! microseconds before the listener closed has sent its request, but the bytes are not read
//! yet, or not all of them: it sees its connection closed with no answer. Once the process is
//! closing, this gate reads a new connection's request head itself, counted as in flight so
//! the drain waits too, puts the bytes back and only then hands the connection to the proxy,
//! which finds the whole head already read and serves it. Before closing, connections go
//! straight through, at no cost.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::l4::stream::Stream as TcpStream;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use tokio::io::AsyncReadExt;

/// How long a connection may take to send its request head once the process is closing.
const HEAD_TIME_LIMIT: Duration = Duration::from_secs(2);

/// The most the gate reads looking for the end of a head; Pingora answers a longer one itself.
const HEAD_SIZE_LIMIT: usize = 64 * 1024;

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
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if !self.closing.load(Ordering::Relaxed) {
            return self.inner.process_new(stream, shutdown).await;
        }
        // Counted until the request is done, not only until its head is in: between the two,
        // the proxy has not created its own count yet and the drain must not exit.
        self.active.fetch_add(1, Ordering::AcqRel);
        let reused = match tokio::time::timeout(HEAD_TIME_LIMIT, read_head(stream)).await {
            Ok(Some(stream)) => self.inner.process_new(stream, shutdown).await,
            _ => None,
        };
        self.active.fetch_sub(1, Ordering::AcqRel);
        reused
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
