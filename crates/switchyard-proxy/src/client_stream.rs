//! The client side of one proxy connection: [`ClientStream`] wraps every accepted stream and
//! bounds what Pingora 0.9 leaves unbounded or counts per read.
//!
//! Pingora times each read of a request head on its own (a head trickled in a byte at a time
//! is never cut off), waits without limit for the next request on a keep-alive connection
//! unless told per request in whole seconds, and buffers up to 1 MiB of unfinished head. The
//! wrapper sits between the socket (or a TLS stream: it only needs a [`Stream`]) and Pingora's
//! HTTP/1 parser, and knows where in its life the connection is:
//!
//! - **waiting** for a request: closed quietly after `keepalive_timeout` (a new connection:
//!   `header_timeout` after it was accepted);
//! - **reading a head**: its bytes are held back until the blank line that ends it has arrived,
//!   so Pingora only ever sees whole heads. A head not complete `header_timeout` after its
//!   first byte is answered `408` (a new connection's first head, due `header_timeout` after
//!   the accept, is closed silently instead), one over `max_request_header_bytes` `431`
//!   (`414` while the request line alone is over it). As Pingora has seen none of it, the close is quiet: no
//!   error line per hostile client. The rest of what the client sends is then read and dropped
//!   for a moment (a lingering close, as nginx does), so that it reads the answer rather than a
//!   reset;
//! - **past the head**: the body, and any pipelined requests behind it, pass straight through.
//!   Body and send timeouts are Pingora's own per-read ones, set by the proxy per request.
//!
//! The proxy says when Pingora has a head ([`ClientStream::head_complete`]), the connection
//! loop when a request is over ([`ClientStream::request_done`]); both come from the
//! connection's own task, so plain atomics carry them without contention.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::protocols::{Peek, Stream};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::connection::{ClientCounters, Rejection, Slot};

/// Where a head refused here (`408`, `414`, `431`) gets its access log line: Pingora never
/// sees these requests, so no proxy phase logs them.
pub(crate) struct RefusalLog {
    pub log: Arc<switchyard_access_log::AccessLog>,
    pub client: Option<std::net::IpAddr>,
}

impl RefusalLog {
    fn refused(&self, answer: &[u8], started: std::time::Instant) {
        if !self.log.enabled() {
            return;
        }
        // Our own canned answers: `HTTP/1.1 NNN ...`, the body after the blank line.
        let status = std::str::from_utf8(answer.get(9..12).unwrap_or_default())
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(400);
        let body = memchr::memmem::find(answer, b"\r\n\r\n").map_or(0, |at| answer.len() - at - 4);
        let id = crate::request_id::new_id();
        self.log.log(&switchyard_access_log::Record {
            time: std::time::SystemTime::now(),
            client: self.client,
            method: None,
            host: None,
            path: None,
            query: None,
            protocol: None,
            status,
            bytes_sent: body,
            duration: started.elapsed(),
            route: None,
            upstream: None,
            backend: None,
            request_id: id.as_bytes(),
            retries: 0,
            user_agent: None,
            referer: None,
            tls: None,
            error: Some(match status {
                408 => "HeaderTimeout",
                414 => "RequestLineTooLong",
                _ => "HeaderTooLarge",
            }),
        });
    }
}

/// How long a rejected client may go on sending before the connection is closed anyway.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// How much a rejected client may send before the connection is closed anyway.
const LINGER_BYTES: usize = 256 * 1024;
/// How much of a head is read at once while it is held back.
const HEAD_CHUNK: usize = 4096;

/// The head limits a [`ClientStream`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub keepalive_timeout: Duration,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
}

pub struct ClientStream {
    inner: Stream,
    limits: HeadLimits,
    phase: Phase,
    /// When the current phase runs out; the timer is set to it only when it is polled.
    deadline: Instant,
    /// When the current request head's first byte arrived: where its duration starts.
    head_started: Instant,
    timer: Pin<Box<Sleep>>,
    timer_at: Instant,
    /// Head bytes read but not yet handed on (held while the head is incomplete).
    held: Vec<u8>,
    /// How much of `held` has been handed on.
    held_out: usize,
    /// Bytes of the current head seen so far.
    head_len: usize,
    /// Where in the current head its request line ends, once that has arrived.
    request_line_end: Option<usize>,
    /// Set by the connection app: where refused heads are logged.
    refusals: Option<RefusalLog>,
    /// No request of this connection has been answered yet.
    first_request: bool,
    /// The reader has had bytes past the current request's head: body, or the start of a
    /// pipelined request that Pingora keeps for the next session, out of our sight.
    read_ahead: bool,
    blank: BlankLine,
    /// [`HEAD_COMPLETE`] or [`REQUEST_DONE`], from the proxy and the connection loop.
    signal: AtomicU8,
    counters: Arc<ClientCounters>,
    _slot: Slot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No byte of the next request yet; `fresh`: the connection's first request.
    Waiting {
        fresh: bool,
    },
    /// Part of a head has arrived; held back.
    Head,
    /// The head has arrived whole and is handed on; waiting for the proxy to take it.
    Released,
    /// Past the head: everything passes through.
    Body,
    /// Sending a canned answer, then lingering, then closed.
    Answering {
        answer: &'static [u8],
        written: usize,
    },
    Lingering {
        dropped: usize,
    },
    Closed,
}

const HEAD_COMPLETE: u8 = 1;
const REQUEST_DONE: u8 = 2;

impl ClientStream {
    pub(crate) fn new(
        inner: Stream,
        limits: HeadLimits,
        counters: Arc<ClientCounters>,
        slot: Slot,
    ) -> ClientStream {
        let deadline = slot.accepted() + limits.header_timeout;
        ClientStream {
            inner,
            limits,
            phase: Phase::Waiting { fresh: true },
            deadline,
            head_started: slot.accepted(),
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            timer_at: deadline,
            held: Vec::new(),
            held_out: 0,
            head_len: 0,
            request_line_end: None,
            refusals: None,
            first_request: true,
            read_ahead: false,
            blank: BlankLine::default(),
            signal: AtomicU8::new(0),
            counters,
            _slot: slot,
        }
    }

    /// The proxy has the request head: what follows is body (or the next pipelined request).
    pub fn head_complete(&self) {
        self.signal.store(HEAD_COMPLETE, Ordering::Relaxed);
    }

    /// The request is answered and the connection kept: wait for the next one. The idle time
    /// counts from the next read, which the connection loop makes at once.
    pub fn request_done(&self) {
        self.signal.store(REQUEST_DONE, Ordering::Relaxed);
    }

    /// Whether the reader has had bytes past the head of the request just done: then Pingora
    /// may hold the next request already, and only its own read of the next head sees it.
    pub fn read_ahead(&self) -> bool {
        self.read_ahead
    }

    /// When the request head being handled began to arrive (its first byte).
    pub fn head_started(&self) -> std::time::Instant {
        self.head_started.into_std()
    }

    /// The `ClientStream` under a Pingora session's stream, if it is one.
    pub fn of(stream: &Stream) -> Option<&ClientStream> {
        stream.as_any().downcast_ref::<ClientStream>()
    }

    /// Whether part of a request head has arrived and the rest is awaited.
    pub fn head_begun(&self) -> bool {
        matches!(self.phase, Phase::Head)
    }

    /// Waits, reading, until the next request head is complete, without handing anything
    /// on: the connection loop calls this before it gives the stream to Pingora, so that an
    /// idle keep-alive connection holds no HTTP session, parser buffer or proxy task state,
    /// and a proxy that stops listening finds the whole head already read. While nothing has
    /// arrived, nothing is allocated for the next request either: the first read goes to the
    /// stack, and only the bytes that came are kept.
    ///
    /// True: there is something for the proxy to read (a whole head, or a refusal of ours to
    /// send). False: the client closed, the read failed, or the connection ran out of time
    /// with nothing to answer; drop it.
    pub async fn next_head(&mut self) -> bool {
        std::future::poll_fn(|cx| loop {
            self.take_signal();
            match self.phase {
                Phase::Released
                | Phase::Body
                | Phase::Answering { .. }
                | Phase::Lingering { .. } => return Poll::Ready(true),
                Phase::Closed => return Poll::Ready(false),
                Phase::Waiting { .. } if self.held.is_empty() => {
                    // Uninitialised: zeroing 4 KiB before every wait would cost more than
                    // the rest of the wait.
                    let mut first = [std::mem::MaybeUninit::<u8>::uninit(); HEAD_CHUNK];
                    let mut chunk = ReadBuf::uninit(&mut first);
                    match Pin::new(&mut *self.inner).poll_read(cx, &mut chunk) {
                        Poll::Pending => {
                            if !self.poll_deadline(cx) {
                                return Poll::Pending;
                            }
                            self.expire();
                        }
                        Poll::Ready(Err(_)) => return Poll::Ready(false),
                        Poll::Ready(Ok(())) if chunk.filled().is_empty() => {
                            return Poll::Ready(false)
                        }
                        Poll::Ready(Ok(())) => {
                            let new = chunk.filled();
                            self.arrived(new);
                            // A refused head's bytes are dropped with it.
                            if !matches!(self.phase, Phase::Answering { .. }) {
                                self.held.extend_from_slice(new);
                            }
                        }
                    }
                }
                Phase::Waiting { .. } | Phase::Head => match self.poll_head(cx) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(false),
                    Poll::Ready(Ok(_)) => {}
                    Poll::Pending => return Poll::Pending,
                },
            }
        })
        .await
    }

    fn take_signal(&mut self) {
        // Almost always 0: a load, not a read-modify-write, on the common path.
        let signal = self.signal.load(Ordering::Relaxed);
        if signal == 0 {
            return;
        }
        self.signal.store(0, Ordering::Relaxed);
        match (signal, self.phase) {
            (HEAD_COMPLETE, Phase::Waiting { .. } | Phase::Head | Phase::Released) => {
                self.phase = Phase::Body;
            }
            (REQUEST_DONE, Phase::Body | Phase::Released) => {
                self.phase = Phase::Waiting { fresh: false };
                self.deadline = Instant::now() + self.limits.keepalive_timeout;
                self.head_len = 0;
                self.request_line_end = None;
                self.first_request = false;
                self.read_ahead = false;
                if self.held_out < self.held.len() {
                    // Pipelined requests read ahead and not taken yet: the next head starts
                    // among them, and is held back or handed on like one that just arrived.
                    let mut rest = std::mem::take(&mut self.held);
                    rest.drain(..self.held_out);
                    self.held_out = 0;
                    self.arrived(&rest);
                    if !matches!(self.phase, Phase::Answering { .. }) {
                        self.held = rest;
                    }
                }
            }
            _ => {}
        }
    }

    /// Whether the current phase's deadline has passed (registering for it otherwise).
    ///
    /// The timer is only ever set earlier than, or to, the deadline, and moved only when it must
    /// fire sooner or has fired early: a keep-alive connection pushes its deadline later with
    /// every request, and re-arming the timer each time would cost a timer-wheel update per
    /// request; now it costs one per `keepalive_timeout`.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> bool {
        if self.deadline < self.timer_at {
            self.timer.as_mut().reset(self.deadline);
            self.timer_at = self.deadline;
        }
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.timer_at >= self.deadline || Instant::now() >= self.deadline {
                return true;
            }
            // Fired at an earlier deadline than today's: wait for the rest.
            self.timer.as_mut().reset(self.deadline);
            self.timer_at = self.deadline;
        }
    }

    /// The current phase ran out of time.
    fn expire(&mut self) {
        self.phase = match self.phase {
            // An idle keep-alive connection: closed like any keep-alive timeout.
            Phase::Waiting { fresh: false } => Phase::Closed,
            Phase::Waiting { fresh: true } => {
                self.counters.reject(Rejection::HeaderTimeout);
                Phase::Closed
            }
            // A new connection without a whole head by its deadline is closed silently, as the
            // contract says (and nginx does); a later request's head gets its `408`.
            Phase::Head if self.first_request => {
                self.counters.reject(Rejection::HeaderTimeout);
                Phase::Closed
            }
            Phase::Head => {
                self.counters.reject(Rejection::HeaderTimeout);
                self.answer(REQUEST_TIMEOUT);
                return;
            }
            // Neither waits on the client: no deadline of ours applies.
            Phase::Released | Phase::Body => self.phase,
            Phase::Answering { .. } | Phase::Lingering { .. } | Phase::Closed => Phase::Closed,
        };
    }

    /// Refused heads get an access log line through `refusals`.
    pub(crate) fn log_refusals(&mut self, refusals: RefusalLog) {
        self.refusals = Some(refusals);
    }

    fn answer(&mut self, answer: &'static [u8]) {
        if let Some(refusals) = &self.refusals {
            refusals.refused(answer, self.head_started.into_std());
        }
        self.held = Vec::new();
        self.held_out = 0;
        self.phase = Phase::Answering { answer, written: 0 };
        self.deadline = Instant::now() + LINGER_TIME;
    }

    /// Reads more of a held-back head and looks for its end. `Ok(0)`: the client closed.
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let start = self.held.len();
        // Grown a chunk at a time, never past one byte over the limit: a pending head costs
        // what it has sent, not a doubled allocation.
        let room = (self.limits.max_header_bytes + 1)
            .saturating_sub(self.head_len)
            .clamp(1, HEAD_CHUNK);
        self.held.reserve_exact(room);
        self.held.resize(start + room, 0);
        let mut chunk = ReadBuf::new(&mut self.held[start..]);
        let read = Pin::new(&mut *self.inner).poll_read(cx, &mut chunk);
        let n = chunk.filled().len();
        self.held.truncate(start + n);
        match read {
            Poll::Pending => {
                if self.poll_deadline(cx) {
                    self.expire();
                    return Poll::Ready(Ok(1));
                }
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) if n == 0 => Poll::Ready(Ok(0)),
            Poll::Ready(Ok(())) => {
                let held = std::mem::take(&mut self.held);
                self.arrived(&held[start..]);
                // A refused head's bytes are dropped with it.
                if !matches!(self.phase, Phase::Answering { .. }) {
                    self.held = held;
                }
                Poll::Ready(Ok(n))
            }
        }
    }

    /// New head bytes have arrived (in `held[start..]`, or read straight into the reader's
    /// buffer): true if the head is now complete and may be handed on; refuses it if it is too
    /// long.
    fn arrived(&mut self, new: &[u8]) -> bool {
        if let Phase::Waiting { fresh } = self.phase {
            self.phase = Phase::Head;
            let now = Instant::now();
            self.head_started = now;
            if !fresh {
                // A new connection's deadline counts from the accept; a later request's from
                // its first byte.
                self.deadline = now + self.limits.header_timeout;
            }
        }
        if self.request_line_end.is_none() {
            self.request_line_end = memchr::memchr(b'\n', new).map(|at| self.head_len + at);
        }
        match self.blank.find(new) {
            Some(end) if self.head_len + end <= self.limits.max_header_bytes => {
                // What follows is body or the next request, unless the blank line was not the
                // end (a blank line before the request line, which the parser skips): then
                // Pingora reads on, and all of it counts as head (see `poll_read`).
                self.head_len += new.len();
                self.blank.follow(&new[end..]);
                self.read_ahead |= end < new.len();
                self.phase = Phase::Released;
                true
            }
            _ => {
                self.head_len += new.len();
                if self.head_len > self.limits.max_header_bytes {
                    self.counters.reject(Rejection::HeaderTooLarge);
                    let line_fits = self
                        .request_line_end
                        .is_some_and(|end| end < self.limits.max_header_bytes);
                    self.answer(if line_fits {
                        HEADER_TOO_LARGE
                    } else {
                        URI_TOO_LONG
                    });
                }
                false
            }
        }
    }

    /// Hands on held bytes; true if there were any.
    fn deliver_held(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let rest = &self.held[self.held_out..];
        if rest.is_empty() {
            return false;
        }
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.blank.follow(&rest[..n]);
        self.held_out += n;
        if self.held_out == self.held.len() {
            // Held heads are rare (slow or large ones): give the memory back.
            self.held = Vec::new();
            self.held_out = 0;
        }
        true
    }

    /// Sends the canned answer, closes our side, and drops what the client still sends.
    fn poll_answer(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.phase {
                Phase::Answering { answer, written } if written < answer.len() => {
                    match Pin::new(&mut *self.inner).poll_write(cx, &answer[written..]) {
                        Poll::Ready(Ok(n)) if n > 0 => {
                            self.phase = Phase::Answering {
                                answer,
                                written: written + n,
                            }
                        }
                        Poll::Ready(_) => self.phase = Phase::Closed,
                        Poll::Pending => return self.pending_or_close(cx),
                    }
                }
                Phase::Answering { .. } => match Pin::new(&mut *self.inner).poll_shutdown(cx) {
                    Poll::Ready(_) => self.phase = Phase::Lingering { dropped: 0 },
                    Poll::Pending => return self.pending_or_close(cx),
                },
                Phase::Lingering { dropped } => {
                    let before = buf.filled().len();
                    let read = Pin::new(&mut *self.inner).poll_read(cx, buf);
                    let n = buf.filled().len() - before;
                    buf.set_filled(before);
                    match read {
                        Poll::Ready(Ok(())) if n > 0 && dropped + n < LINGER_BYTES => {
                            self.phase = Phase::Lingering {
                                dropped: dropped + n,
                            }
                        }
                        Poll::Ready(_) => self.phase = Phase::Closed,
                        Poll::Pending => return self.pending_or_close(cx),
                    }
                }
                // Closed: the reader sees the end of the stream.
                _ => return Poll::Ready(Ok(())),
            }
        }
    }

    fn pending_or_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.poll_deadline(cx) {
            self.phase = Phase::Closed;
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.take_signal();
        loop {
            match this.phase {
                Phase::Released => {
                    if this.deliver_held(buf) {
                        return Poll::Ready(Ok(()));
                    }
                    // Pingora has had the whole head and reads again without having taken it:
                    // it was not whole (a blank line before the request line). Held back again,
                    // with what was handed on counted against the limit.
                    this.phase = Phase::Head;
                }
                Phase::Body => {
                    if this.deliver_held(buf) {
                        return Poll::Ready(Ok(()));
                    }
                    let before = buf.filled().len();
                    let read = Pin::new(&mut *this.inner).poll_read(cx, buf);
                    if let Poll::Ready(Ok(())) = read {
                        this.blank.follow(&buf.filled()[before..]);
                        this.read_ahead |= buf.filled().len() > before;
                    }
                    return read;
                }
                // A reader that did not wait in `next_head` first (the connection loop always
                // does): the whole head usually comes in one read, straight into the reader's
                // buffer, and nothing is held.
                Phase::Waiting { .. } if this.held.is_empty() => {
                    let before = buf.filled().len();
                    match Pin::new(&mut *this.inner).poll_read(cx, buf) {
                        Poll::Pending => {
                            if this.poll_deadline(cx) {
                                this.expire();
                                continue;
                            }
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(())) if buf.filled().len() == before => {
                            return Poll::Ready(Ok(()))
                        }
                        Poll::Ready(Ok(())) => {
                            if this.arrived(&buf.filled()[before..]) {
                                return Poll::Ready(Ok(()));
                            }
                            // Incomplete: held back until the rest is there.
                            if matches!(this.phase, Phase::Head) {
                                this.held.extend_from_slice(&buf.filled()[before..]);
                            }
                            buf.set_filled(before);
                        }
                    }
                }
                Phase::Waiting { .. } | Phase::Head => match this.poll_head(cx) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                },
                Phase::Answering { .. } | Phase::Lingering { .. } | Phase::Closed => {
                    return this.poll_answer(cx, buf)
                }
            }
        }
    }
}

crate::wrapped::forward_to_inner!(ClientStream);

#[async_trait]
impl Peek for ClientStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        if self.held_out < self.held.len() {
            // Held bytes come before anything the socket has; peeking past them would lie.
            return Ok(false);
        }
        self.inner.try_peek(buf).await
    }
}

impl fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientStream")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

/// Finds the blank line that ends a request head across reads: a line feed, an optional
/// carriage return, a line feed (the proxy's parser accepts bare LF line ends too).
#[derive(Debug, Clone, Copy, Default)]
struct BlankLine {
    /// 0: inside a line; 1: just after a LF; 2: after LF CR.
    state: u8,
}

impl BlankLine {
    /// The index just past the blank line in `bytes`, if it is there.
    fn find(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            if self.state == 0 {
                let lf = memchr::memchr(b'\n', &bytes[i..])?;
                i += lf + 1;
                self.state = 1;
                continue;
            }
            match (self.state, bytes[i]) {
                (_, b'\n') => {
                    self.state = 0;
                    return Some(i + 1);
                }
                (1, b'\r') => self.state = 2,
                _ => self.state = 0,
            }
            i += 1;
        }
        None
    }

    /// Bytes passed through after a head: a head that starts among them (pipelined) may have
    /// its end split across reads, so the state follows their last bytes.
    fn follow(&mut self, bytes: &[u8]) {
        self.state = match bytes {
            [] => self.state,
            [.., b'\n'] => 1,
            [.., b'\n', b'\r'] => 2,
            [b'\r'] if self.state == 1 => 2,
            _ => 0,
        };
    }
}

const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 61\r\nConnection: close\r\n\r\n408 Request Timeout: the request head did not arrive in time\n";
const HEADER_TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 72\r\nConnection: close\r\n\r\n431 Request Header Fields Too Large: the request head is over the limit\n";
const URI_TOO_LONG: &[u8] = b"HTTP/1.1 414 URI Too Long\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 53\r\nConnection: close\r\n\r\n414 URI Too Long: the request line is over the limit\n";

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    const LIMITS: HeadLimits = HeadLimits {
        keepalive_timeout: Duration::from_secs(60),
        header_timeout: Duration::from_secs(10),
        max_header_bytes: 4096,
    };

    /// A client stream over an in-memory pipe, and the client's end of it.
    fn client_stream() -> (ClientStream, DuplexStream) {
        let (server, client) = tokio::io::duplex(64 * 1024);
        let counters = Arc::new(ClientCounters::new(&switchyard_pool::Metrics::new()));
        let slot = counters.open(10).expect("a place");
        (
            ClientStream::new(Box::new(server), LIMITS, counters, slot),
            client,
        )
    }

    /// Serves one request as the proxy would: the head, then the request's end.
    async fn serve_one(stream: &mut ClientStream, client: &mut DuplexStream) {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        client.write_all(head).await.expect("send");
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], head);
        stream.head_complete();
        stream.request_done();
    }

    /// Reads `stream` to its end, which must come `after` `since` (to within 10 ms), closes it
    /// and returns everything the client was sent.
    async fn ends_after(
        mut stream: ClientStream,
        mut client: DuplexStream,
        since: Instant,
        after: Duration,
    ) -> String {
        let mut buf = [0u8; 64];
        assert_eq!(stream.read(&mut buf).await.expect("read"), 0, "handed on");
        let waited = since.elapsed();
        assert!(
            waited >= after && waited < after + Duration::from_millis(10),
            "ended after {waited:?}, not {after:?}"
        );
        drop(stream);
        let mut text = Vec::new();
        client.read_to_end(&mut text).await.expect("answer");
        String::from_utf8_lossy(&text).into_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_keep_alive_connection_ends_at_keepalive_timeout_after_every_request() {
        let (mut stream, mut client) = client_stream();
        for _ in 0..3 {
            serve_one(&mut stream, &mut client).await;
            // Ready for the next request: idle for 59 s is still open.
            let mut buf = [0u8; 64];
            let idle = tokio::time::timeout(Duration::from_secs(59), stream.read(&mut buf)).await;
            assert!(idle.is_err(), "closed before keepalive_timeout");
        }
        // The wait began 59 s before this read, with the request's end.
        let answer = ends_after(stream, client, Instant::now(), Duration::from_secs(1)).await;
        assert_eq!(answer, "", "closed silently");
    }

    #[tokio::test(start_paused = true)]
    async fn next_head_waits_for_a_whole_head_and_hands_it_on_in_one_read() {
        let (mut stream, mut client) = client_stream();
        serve_one(&mut stream, &mut client).await;
        assert!(!stream.read_ahead(), "nothing past the head");
        let head = b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n";
        let waiting = tokio::spawn(async move {
            let ready = stream.next_head().await;
            (stream, ready)
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        client.write_all(&head[..10]).await.expect("part of a head");
        tokio::time::sleep(Duration::from_secs(1)).await;
        client.write_all(&head[10..]).await.expect("the rest");
        let (mut stream, ready) = waiting.await.expect("the wait");
        assert!(ready);
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], head);
    }

    #[tokio::test(start_paused = true)]
    async fn next_head_ends_an_idle_connection_at_keepalive_timeout_and_a_closed_one_at_once() {
        let (mut stream, mut client) = client_stream();
        serve_one(&mut stream, &mut client).await;
        let since = Instant::now();
        assert!(!stream.next_head().await, "nothing to serve");
        let waited = since.elapsed();
        assert!(
            waited >= LIMITS.keepalive_timeout
                && waited < LIMITS.keepalive_timeout + Duration::from_millis(10),
            "ended after {waited:?}"
        );
        let (mut stream, client) = client_stream();
        drop(client);
        assert!(!stream.next_head().await, "the client closed");
    }

    #[tokio::test(start_paused = true)]
    async fn next_head_hands_on_a_refusal_for_the_reader_to_send() {
        let (mut stream, mut client) = client_stream();
        serve_one(&mut stream, &mut client).await;
        client.write_all(b"GET / HT").await.expect("part of a head");
        assert!(stream.next_head().await, "a 408 to send");
        let answer = ends_after(stream, client, Instant::now(), Duration::from_secs(2)).await;
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pipelined_request_read_with_the_head_is_read_ahead() {
        let (mut stream, mut client) = client_stream();
        let two = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n";
        client.write_all(two).await.expect("send");
        assert!(stream.next_head().await);
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], two, "both, as Pingora reads them");
        stream.head_complete();
        stream.request_done();
        assert!(stream.read_ahead(), "Pingora may hold the second");
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_does_not_complete_in_time_is_answered_408_from_its_first_byte() {
        let (mut stream, mut client) = client_stream();
        serve_one(&mut stream, &mut client).await;
        tokio::time::sleep(Duration::from_secs(50)).await;
        client.write_all(b"GET / HT").await.expect("part of a head");
        // Nothing is handed on before the head is complete; the refusal ends the stream 10 s
        // from the head's first byte (not the keep-alive's 60 s), after the 2 s lingering close
        // while the client says nothing more.
        let answer = ends_after(stream, client, Instant::now(), Duration::from_secs(12)).await;
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connections_incomplete_first_head_is_closed_silently_at_header_timeout() {
        let (stream, mut client) = client_stream();
        let accepted = Instant::now();
        tokio::time::sleep(Duration::from_secs(4)).await;
        client
            .write_all(b"GET / HTTP/1.1\r\nHo")
            .await
            .expect("part of a head");
        // From the accept, not from the first byte.
        let answer = ends_after(stream, client, accepted, Duration::from_secs(10)).await;
        assert_eq!(answer, "");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_that_sends_nothing_is_closed_silently_at_header_timeout() {
        let (stream, client) = client_stream();
        let answer = ends_after(stream, client, Instant::now(), Duration::from_secs(10)).await;
        assert_eq!(answer, "");
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_over_the_limit_is_431_and_a_request_line_over_it_414() {
        for (head, status) in [
            (format!("GET / HTTP/1.1\r\nX: {}", "x".repeat(5000)), "431"),
            (format!("GET /{}", "p".repeat(5000)), "414"),
        ] {
            let (stream, mut client) = client_stream();
            client.write_all(head.as_bytes()).await.expect("send");
            AsyncWriteExt::shutdown(&mut client)
                .await
                .expect("done sending");
            // Refused at once: the client's end of sending ends the lingering close.
            let text = ends_after(stream, client, Instant::now(), Duration::ZERO).await;
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
        }
    }

    fn end(parts: &[&[u8]]) -> Option<(usize, usize)> {
        let mut blank = BlankLine::default();
        parts
            .iter()
            .enumerate()
            .find_map(|(i, p)| blank.find(p).map(|at| (i, at)))
    }

    #[test]
    fn the_end_of_a_head_is_found_across_reads_with_or_without_carriage_returns() {
        assert_eq!(
            end(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"]),
            Some((0, 27))
        );
        assert_eq!(end(&[b"GET / HTTP/1.1\nHost: a\n\n"]), Some((0, 24)));
        assert_eq!(end(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]), None);
        assert_eq!(end(&[b"GET / HTTP/1.1\r\n", b"\r", b"\n"]), Some((2, 1)));
        assert_eq!(
            end(&[b"GET / HTTP/1.1\r\nHost: a\r", b"\n\r\n"]),
            Some((1, 3))
        );
        assert_eq!(end(&[b"G", b"E", b"T / HTTP/1.1\n", b"\n"]), Some((3, 1)));
    }

    #[test]
    fn a_pipelined_head_split_after_a_passed_through_read_is_still_found() {
        let mut blank = BlankLine::default();
        // The previous read ended inside the next request's head, just after a line end.
        blank.follow(b"...GET /2 HTTP/1.1\r\nHost: a\r\n\r");
        assert_eq!(blank.find(b"\n"), Some(1));
        blank.follow(b"GET /3 HTTP/1.1\r\n");
        assert_eq!(blank.find(b"\r\n"), Some(2));
    }

    #[test]
    fn canned_answers_have_the_length_they_say() {
        for answer in [REQUEST_TIMEOUT, HEADER_TOO_LARGE, URI_TOO_LONG] {
            let text = std::str::from_utf8(answer).expect("ascii");
            let (head, body) = text.split_once("\r\n\r\n").expect("a head");
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .expect("a length");
            assert_eq!(length.parse::<usize>().ok(), Some(body.len()), "{head}");
        }
    }
}
