//! Upgrade requests (WebSocket, h2c): the backend connection that keeps Pingora 0.9 from
//! ending a tunnel right after its `101` (cloudflare/pingora#946, fix proposed in #947).
//!
//! Why it is needed: once the request head is sent, Pingora's upstream half waits in one
//! `select!` (random branch order) for the backend's answer and for the end of the request
//! body, which for an upgrade request is empty and is queued before that loop first runs. If
//! it takes the `101` first, it switches to tunnel mode and then reads the queued body end as
//! the end of the tunnel: the client gets the `101`, then the connection end. With a backend
//! that answers the handshake at once and 4 clients in parallel, 1 tunnel in 60 (debug build)
//! to 1 in 700 (the run that found it) was lost that way. No proxy phase runs between the
//! head and that loop, but the backend connection takes part in it: a [`HoldUntilSent`]
//! connection keeps the backend's answer unread from the head's flush until the next flush,
//! which is the one that ends the (empty) body. The body end is therefore always taken first,
//! the order in which Pingora keeps the tunnel open, whatever the backend's timing.
//!
//! Only bodyless HTTP/1.1 upgrade requests take this path (with a body, the answer would wait
//! for the whole body). They always get a fresh connection, as they would from nginx: a
//! wrapped connection has no file descriptor Pingora can check before reuse, so it is never
//! kept idle (after a `101` Pingora never keeps a connection anyway). Plain requests are not
//! touched: one header lookup each.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::connectors::L4Connect;
use pingora_core::protocols::l4::ext;
use pingora_core::protocols::l4::socket::SocketAddr;
use pingora_core::protocols::l4::stream::Stream;
use pingora_core::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorType, Result};
use pingora_http::RequestHeader;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Pool group of upgrade connections, so that an upgrade request is never handed a pooled
/// connection made for a plain request (which would not hold the answer back).
const UPGRADE_GROUP: u64 = u64::from_be_bytes(*b"upgrade\0");

/// Makes `peer` connect through [`HoldUntilSent`] when `request` is a bodyless HTTP/1.1
/// upgrade request; call it once the peer's timeouts are set.
pub(crate) fn hold_answer_until_sent(request: &RequestHeader, peer: &mut HttpPeer) {
    // TLS to backends would flush during its handshake, before the head; not supported yet.
    if !is_bodyless_upgrade(request) || peer.is_tls() {
        return;
    }
    peer.options.custom_l4 = Some(Arc::new(UpgradeConnector {
        timeout: peer.options.connection_timeout,
    }));
    peer.group_key = UPGRADE_GROUP;
    // A refused upgrade's connection would be put in the pool; drop it at once instead.
    peer.options.idle_timeout = Some(Duration::ZERO);
}

/// The requests Pingora treats as upgrades (`is_upgrade_req` in pingora-core: HTTP/1.1 with
/// an `Upgrade` header) and that carry no body.
fn is_bodyless_upgrade(request: &RequestHeader) -> bool {
    use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING, UPGRADE};
    let headers = &request.headers;
    request.version == http::Version::HTTP_11
        && headers.contains_key(UPGRADE)
        && !headers.contains_key(TRANSFER_ENCODING)
        && headers
            .get_all(CONTENT_LENGTH)
            .iter()
            .all(|v| v.as_bytes() == b"0")
}

/// Connects as Pingora does for a plain TCP peer (same error types, so retries, health and
/// metrics see no difference), then wraps the connection in [`HoldUntilSent`].
#[derive(Debug)]
struct UpgradeConnector {
    timeout: Option<Duration>,
}

#[async_trait]
impl L4Connect for UpgradeConnector {
    async fn connect(&self, addr: &SocketAddr) -> Result<Stream> {
        let SocketAddr::Inet(inet) = addr else {
            return Error::e_explain(
                ErrorType::InternalError,
                format!("upgrade connection to {addr}: only TCP backends are supported"),
            );
        };
        let connecting = ext::connect(inet, None);
        let connected = match self.timeout {
            Some(t) => tokio::time::timeout(t, connecting)
                .await
                .unwrap_or_else(|_| {
                    Error::e_explain(
                        ErrorType::ConnectTimedout,
                        format!("timeout {t:?} connecting to server {addr}"),
                    )
                }),
            None => connecting.await,
        };
        let tcp = connected.map_err(|e| match e.etype() {
            // As in Pingora's own connect: no socket or no local port is our fault.
            ErrorType::SocketError | ErrorType::BindError => Error::because(
                ErrorType::InternalError,
                format!("Fail to connect to {addr}"),
                e,
            ),
            _ => e.more_context(format!("Fail to connect to {addr}")),
        })?;
        Ok(VirtualSocketStream::new(Box::new(HoldUntilSent::new(tcp))).into())
    }
}

/// A backend connection whose reads stay pending until the request is sent: from the start
/// through the head's flush and up to the next flush (the end of the request body).
#[derive(Debug)]
struct HoldUntilSent {
    tcp: TcpStream,
    flushes_left: u8,
    reader: Option<Waker>,
}

impl HoldUntilSent {
    fn new(tcp: TcpStream) -> Self {
        HoldUntilSent {
            tcp,
            // The head's, then the body end's.
            flushes_left: 2,
            reader: None,
        }
    }
}

impl AsyncRead for HoldUntilSent {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.flushes_left > 0 {
            this.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for HoldUntilSent {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.tcp).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) && this.flushes_left > 0 {
            this.flushes_left -= 1;
            if this.flushes_left == 0 {
                if let Some(reader) = this.reader.take() {
                    reader.wake();
                }
            }
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

impl VirtualSocket for HoldUntilSent {
    fn set_socket_option(&self, opt: VirtualSockOpt) -> io::Result<()> {
        match opt {
            VirtualSockOpt::NoDelay => self.tcp.set_nodelay(true),
            VirtualSockOpt::KeepAlive(ka) => {
                ext::set_tcp_keepalive(&self.tcp, &ka).map_err(|e| io::Error::other(e.to_string()))
            }
            // Options added to Pingora later: a plain TCP connection does without them.
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn request(extra: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/ws", None).expect("request");
        for (name, value) in extra {
            req.append_header(name.to_string(), *value).expect("header");
        }
        req
    }

    #[test]
    fn only_bodyless_http11_upgrades_are_held() {
        let upgrade = ("Upgrade", "websocket");
        assert!(is_bodyless_upgrade(&request(&[upgrade])));
        assert!(is_bodyless_upgrade(&request(&[
            upgrade,
            ("Content-Length", "0")
        ])));
        assert!(!is_bodyless_upgrade(&request(&[])));
        assert!(!is_bodyless_upgrade(&request(&[
            upgrade,
            ("Content-Length", "5")
        ])));
        assert!(!is_bodyless_upgrade(&request(&[
            upgrade,
            ("Transfer-Encoding", "chunked")
        ])));
        let mut http10 = request(&[upgrade]);
        http10.set_version(http::Version::HTTP_10);
        assert!(!is_bodyless_upgrade(&http10));
    }

    #[test]
    fn upgrade_peers_get_the_holding_connector_and_their_own_pool_group() {
        let addr = "127.0.0.1:9".to_string();
        let mut plain = HttpPeer::new(addr.clone(), false, String::new());
        hold_answer_until_sent(&request(&[]), &mut plain);
        assert!(plain.options.custom_l4.is_none());

        let mut upgrade = HttpPeer::new(addr, false, String::new());
        hold_answer_until_sent(&request(&[("Upgrade", "websocket")]), &mut upgrade);
        assert!(upgrade.options.custom_l4.is_some());
        assert_eq!(upgrade.options.idle_timeout, Some(Duration::ZERO));
        use pingora_core::upstreams::peer::Peer;
        assert_ne!(upgrade.reuse_hash(), plain.reuse_hash());
    }

    /// The backend's answer is already there; it is read only after the second flush.
    #[tokio::test]
    async fn reads_wait_for_the_second_flush() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let backend = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.expect("accept");
            conn.write_all(b"101").await.expect("answer");
            let mut head = [0u8; 4];
            conn.read_exact(&mut head).await.expect("head");
            head
        });
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let mut conn = HoldUntilSent::new(tcp);
        let mut answer = [0u8; 3];
        conn.write_all(b"head").await.expect("write head");
        conn.flush().await.expect("flush head");
        assert_eq!(backend.await.expect("backend"), *b"head");
        let early = tokio::time::timeout(Duration::from_millis(50), conn.read(&mut answer)).await;
        assert!(early.is_err(), "read before the body end: {early:?}");
        conn.flush().await.expect("flush body end");
        conn.read_exact(&mut answer).await.expect("read answer");
        assert_eq!(&answer, b"101");
    }

    #[tokio::test]
    async fn connect_errors_keep_pingoras_types() {
        // A port that was just free: refused, which counts against the backend.
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let inet = free.local_addr().expect("addr");
        drop(free);
        let connector = UpgradeConnector {
            timeout: Some(Duration::from_secs(5)),
        };
        let addr = SocketAddr::Inet(inet);
        let e = connector.connect(&addr).await.expect_err("nothing listens");
        assert_eq!(e.etype(), &ErrorType::ConnectRefused);
    }
}
