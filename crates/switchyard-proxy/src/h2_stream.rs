//! The client side of one HTTP/2 connection: [`H2Stream`] holds the connection's place under
//! `max_connections` and bounds the wait for the client's connection preface.
//!
//! HTTP/1's [`crate::ClientStream`] holds request heads back until they are whole; HTTP/2
//! frames need no such care (a stream's headers arrive in frames the h2 codec bounds by
//! `max_request_header_bytes` as its header list size, and the idle wait between requests is
//! Pingora's `h2_idle_timeout`). What the codec does not bound is its handshake: a client that
//! negotiated `h2` and then sends nothing would hold its task and slot for ever. The preface
//! (24 bytes) must therefore arrive within `header_timeout` of the accept (the TLS handshake
//! counts in it), like an HTTP/1 connection's first head; after it, reads pass straight
//! through. A connection that then opens no stream is closed after `keepalive_timeout`.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::protocols::{Peek, Stream};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::Sleep;

use crate::connection::{ClientCounters, Rejection, Slot};

/// Length of the HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE_LEN: usize = crate::connection::H2_PREFACE.len();

pub struct H2Stream {
    inner: Stream,
    /// Until the preface has been read: when it is due, and how much of it is still to come.
    preface: Option<(Pin<Box<Sleep>>, usize)>,
    counters: Arc<ClientCounters>,
    _slot: Slot,
}

impl H2Stream {
    pub(crate) fn new(
        inner: Stream,
        header_timeout: Duration,
        counters: Arc<ClientCounters>,
        slot: Slot,
    ) -> H2Stream {
        H2Stream {
            inner,
            preface: Some((
                Box::pin(tokio::time::sleep_until(slot.accepted() + header_timeout)),
                PREFACE_LEN,
            )),
            counters,
            _slot: slot,
        }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut *this.inner).poll_read(cx, buf);
        let Some((due, missing)) = this.preface.as_mut() else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len() - before;
                if got >= *missing || got == 0 {
                    this.preface = None;
                } else {
                    *missing -= got;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if due.as_mut().poll(cx).is_ready() => {
                this.preface = None;
                this.counters.reject(Rejection::HeaderTimeout);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 connection preface within header_timeout",
                )))
            }
            other => other,
        }
    }
}

crate::wrapped::forward_to_inner!(H2Stream);

/// Pingora's h2c detection peeks the preface on a plain stream (it was read and rewound by
/// the l4 stream already, see `ClientApp`); a TLS stream cannot peek and is never asked.
#[async_trait]
impl Peek for H2Stream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Stream")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}
