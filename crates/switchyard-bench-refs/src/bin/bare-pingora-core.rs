//! The bench's bare pingora-core HTTP/1.1 proxy: no pingora-proxy, no phases. Per request it
//! reads the head (pingora-core's keep-alive loop around `HttpServerApp`), takes a pooled
//! upstream connection from pingora-core's HTTP connector (the one pingora-proxy uses, built
//! from the same `ServerConf`), writes the head without its hop-by-hop headers, streams the
//! request body and then the response body (one after the other, not duplex: enough for the
//! bench's GETs), writes the response head downstream, returns the upstream connection to the
//! pool and hands the client's connection back for its next request. Round robin by an atomic
//! counter. Only `make bench` uses it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::prelude::{HttpPeer, Result};
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora::services::listening::Service;
use pingora::upstreams::peer::Peer;
use pingora::Error;
use pingora::ErrorType::InvalidHTTPHeader;
use switchyard_bench_refs::{server, Args};

struct BareCore {
    connector: Connector,
    peers: Vec<HttpPeer>,
    next: AtomicUsize,
}

#[async_trait]
impl HttpServerApp for BareCore {
    async fn process_new_http(
        self: &Arc<Self>,
        mut downstream: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        // false: the client closed an idle connection; an error: a bad or timed-out head.
        if !downstream.read_request().await.ok()? {
            return None;
        }
        if *shutdown.borrow() {
            downstream.set_keepalive(None);
        }
        let peer = &self.peers[self.next.fetch_add(1, Ordering::Relaxed) % self.peers.len()];
        let mut upstream = match self.connector.get_http_session(peer).await {
            Ok((upstream, _reused)) => upstream,
            Err(_) => {
                let _ = downstream.respond_error(502).await;
                return None;
            }
        };
        if proxy(&mut downstream, &mut upstream).await.is_err() {
            // Neither connection is in a known state: close both (a 502 if nothing was sent).
            if downstream.response_written().is_none() {
                let _ = downstream.respond_error(502).await;
            }
            return None;
        }
        self.connector
            .release_http_session(upstream, peer, peer.idle_timeout())
            .await;
        let settings = HttpPersistentSettings::for_session(&downstream);
        let reusable = downstream.finish().await.ok()??;
        Some(ReusedHttpStream::from_reusable_stream(reusable, settings))
    }
}

/// Hop-by-hop request headers (RFC 9110 7.6.1) that pingora-proxy strips too: forwarded, a
/// client's `Connection: close` would close the pooled upstream connection after each request.
/// Transfer-Encoding stays (the body is passed through in the client's framing); headers that
/// `Connection` nominates are not looked for (the bench sends none).
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// One exchange: request head and body up, response head and body down.
async fn proxy(downstream: &mut ServerSession, upstream: &mut HttpSession) -> Result<()> {
    let mut head = Box::new(downstream.req_header().clone());
    for name in HOP_BY_HOP {
        head.remove_header(name);
    }
    upstream.write_request_header(head).await?;
    if !downstream.is_body_empty() {
        while let Some(chunk) = downstream.read_request_body().await? {
            upstream.write_request_body(chunk, false).await?;
        }
    }
    upstream.finish_request_body().await?;
    upstream.read_response_header().await?;
    let head = upstream
        .response_header()
        .ok_or_else(|| Error::explain(InvalidHTTPHeader, "no response head"))?;
    downstream.write_response_header_ref(head).await?;
    while let Some(chunk) = upstream.read_response_body().await? {
        downstream.write_response_body(chunk, false).await?;
    }
    downstream.finish_body().await
}

fn main() {
    let args = Args::from_env();
    let mut server = server(args.threads);
    let app = BareCore {
        connector: Connector::new(Some(ConnectorOptions::from_server_conf(
            &server.configuration,
        ))),
        peers: args
            .backends
            .iter()
            .map(|addr| HttpPeer::new(*addr, false, String::new()))
            .collect(),
        next: AtomicUsize::new(0),
    };
    let mut service = Service::new("bare pingora-core".to_string(), app);
    service.add_tcp(&args.listen.to_string());
    server.add_service(service);
    server.run_forever();
}
