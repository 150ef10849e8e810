//! The request path: Pingora's proxy phases, each a thin step over the pool.
//!
//! `request_filter` matches the route and picks upstream and backend (404/503 when it cannot),
//! `upstream_peer` hands Pingora that backend's peer as the snapshot made it (timeouts,
//! protocol, TLS; see `switchyard_pool::peer`), `fail_to_connect`
//! retries a refused or timed-out connect once on another backend of the same upstream, and
//! `fail_to_proxy` turns the remaining failures into short plain-text 502/504 answers. The
//! context holds the snapshot the request started with, so a swap mid-request changes nothing
//! for it, and an [`InFlight`] guard so that least-connections and draining see it.

mod client_stream;
mod connection;
mod front;
mod grpc;
mod h2_stream;
mod handover;
mod host;
mod redirect;
mod request_id;
mod sticky_cookie;
mod websocket;
mod wrapped;

pub use client_stream::ClientStream;
pub use connection::{accepted_tcp, ClientApp, ClientCounters, Rejection};
pub use front::{ListenerFront, TlsTerminator};
pub use handover::{Connections, Watched};

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use pingora_core::modules::http::HttpModules;
use pingora_core::protocols::Digest;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, OrErr, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};
use switchyard_access_log::{AccessLog, Record};
use switchyard_config::ClientLimits;
use switchyard_pool::metrics::ErrorKind;
use switchyard_pool::{local_failure, InFlight, LocalFailure, Pool, Request, Snapshot};

use redirect::Redirect;
use sticky_cookie::IssuedCookie;

const NO_HOST_TO_REDIRECT: &str =
    "400 Bad Request: this listener redirects to https and the request names no host\n";

/// Switchyard's `ProxyHttp`: all decisions come from the pool's current snapshot. One per
/// listener ([`Proxy::on_listener`]), sharing everything but the listener's [`ListenerFront`].
#[derive(Clone)]
pub struct Proxy {
    pool: Arc<Pool>,
    active: Arc<AtomicUsize>,
    closing: Arc<AtomicBool>,
    limits: ClientLimits,
    counters: Arc<ClientCounters>,
    front: ListenerFront,
    access_log: Arc<AccessLog>,
}

impl Proxy {
    /// `closing` is raised as soon as a stop or upgrade signal arrives; `counters` are the
    /// connection app's, which this counts body and send refusals in.
    pub fn new(
        pool: Arc<Pool>,
        closing: Arc<AtomicBool>,
        limits: ClientLimits,
        counters: Arc<ClientCounters>,
        access_log: Arc<AccessLog>,
    ) -> Proxy {
        Proxy {
            pool,
            active: Arc::default(),
            closing,
            limits,
            counters,
            front: ListenerFront::plain(),
            access_log,
        }
    }

    /// The same proxy for the requests of another listener.
    pub fn on_listener(&self, front: ListenerFront) -> Proxy {
        Proxy {
            front,
            ..self.clone()
        }
    }

    /// Requests being handled right now, for draining at shutdown.
    pub fn active_requests(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.active)
    }
}

/// Per-request state.
pub struct RequestCtx {
    _active: Active,
    started: Instant,
    /// The request head's first byte, when the connection tells it (HTTP/1): where the access
    /// log's duration starts, as nginx's `$request_time`. Analysis latency starts at `started`,
    /// once the head is in: a client's slow head is not the backend's slowness.
    first_byte: Option<Instant>,
    /// When the backend's response head went to the client, after `started`: the latency
    /// rollout analysis judges (a WebSocket or a long stream is not slow for lasting).
    head_sent: Option<Duration>,
    snapshot: Option<Arc<Snapshot>>,
    /// Matched route (set with or without a picked backend), for metrics.
    route: Option<usize>,
    client: Option<IpAddr>,
    upstream: usize,
    backend: usize,
    in_flight: Option<InFlight>,
    retried: bool,
    /// Attempts after the first: our connect retry and Pingora's retry of a request that
    /// met a stale backend connection. For the access log.
    retries: u8,
    /// `X-Request-Id`, the client's or ours (see [`request_id`]); set before any answer.
    request_id: Option<HeaderValue>,
    /// A sticky cookie issued with this request (`set_cookie`), sent with the response.
    issued: Option<IssuedCookie>,
    /// Set when connecting failed on our side (out of descriptors, ...), not the backend's.
    local_failure: Option<LocalFailure>,
    /// The backend (`h2`/`h2c`) ended a gRPC call with a `grpc-status` other than 0, in the
    /// response head or trailers: an error for rollout analysis whatever the HTTP status.
    grpc_failed: bool,
}

/// Counts a request as active from its first byte to the end of its logging phase.
struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

impl RequestCtx {
    /// The snapshot and upstream a picked request goes to (`None` before the pick, and when
    /// no backend of the matched route was available).
    fn target(&self) -> Option<(&Snapshot, usize)> {
        self.in_flight.as_ref()?;
        self.snapshot.as_deref().map(|s| (s, self.upstream))
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = RequestCtx;

    /// No downstream modules: Pingora's default is a compression module switched off, which
    /// still costs every request a module context and a call per header and body chunk.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        self.active.fetch_add(1, Ordering::AcqRel);
        RequestCtx {
            _active: Active(Arc::clone(&self.active)),
            started: Instant::now(),
            first_byte: None,
            head_sent: None,
            snapshot: None,
            route: None,
            client: None,
            upstream: 0,
            backend: 0,
            in_flight: None,
            retried: false,
            retries: 0,
            request_id: None,
            issued: None,
            local_failure: None,
            grpc_failed: false,
        }
    }

    /// Pingora has the request head: the client stream stops holding bytes back, and the
    /// body and the answer get their own timeouts, per read and per write.
    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let downstream = session.as_downstream_mut();
        if let Some(client) = downstream.stream().and_then(ClientStream::of) {
            client.head_complete();
            ctx.first_byte = Some(client.head_started());
        }
        downstream.set_read_timeout(Some(self.limits.body_timeout));
        downstream.set_write_timeout(Some(self.limits.send_timeout));
        // Pipelined requests are answered in order instead of closing after the first.
        downstream.set_pipelining_enabled(true);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let snapshot = self.pool.snapshot();
        ctx.client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.request_id = Some(request_id::of(&session.req_header().headers));
        let req = session.req_header();
        let host = match host::route_host(req) {
            Ok(host) => host,
            Err(e) => {
                self.respond_plain(session, ctx, 400, e.answer(), None)
                    .await?;
                return Ok(true);
            }
        };
        if self.front.redirect_https {
            match redirect::https_redirect(req, host) {
                Redirect::To(location) => {
                    let location = (http::header::LOCATION, location);
                    self.respond_plain(session, ctx, 308, redirect::BODY, Some(location))
                        .await?;
                    return Ok(true);
                }
                Redirect::NoHost => {
                    self.respond_plain(session, ctx, 400, NO_HOST_TO_REDIRECT, None)
                        .await?;
                    return Ok(true);
                }
                Redirect::Serve => {}
            }
        }
        if let Some(limit) = self.limits.max_request_body_bytes {
            if declared_length(req).is_some_and(|length| length > limit) {
                self.counters.reject(Rejection::BodyTooLarge);
                self.respond_plain(session, ctx, 413, BODY_TOO_LARGE, None)
                    .await?;
                return Ok(true);
            }
        }
        let request = request_of(req, host, ctx.client, None);
        let Some(route) = snapshot.match_route(&request) else {
            self.respond_plain(
                session,
                ctx,
                404,
                "404 Not Found: no route matches this request\n",
                None,
            )
            .await?;
            return Ok(true);
        };
        // A sticky route that issues cookies gives a request without one its key now, so
        // that this request already goes where the key's next requests will.
        let issued = snapshot.routes[route]
            .cookie_to_issue(&request)
            .map(IssuedCookie::new);
        let request = Request {
            issued: issued.as_ref().map(IssuedCookie::as_pair),
            ..request
        };
        let Some(pick) = snapshot.pick(route, &request) else {
            self.pool
                .metrics()
                .count_unrouted(&snapshot.routes[route].name, 503);
            ctx.route = Some(route);
            ctx.snapshot = Some(snapshot);
            self.respond_plain(
                session,
                ctx,
                503,
                "503 Service Unavailable: no backend is available for this route\n",
                None,
            )
            .await?;
            return Ok(true);
        };
        ctx.in_flight = Some(snapshot.upstreams[pick.upstream].hold(pick.backend));
        ctx.upstream = pick.upstream;
        ctx.backend = pick.backend;
        ctx.route = Some(route);
        ctx.issued = issued;
        ctx.snapshot = Some(snapshot);
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some((snapshot, upstream)) = ctx.target() else {
            return Error::e_explain(ErrorType::InternalError, "no backend picked");
        };
        let mut peer = snapshot.upstreams[upstream].peer(ctx.backend);
        websocket::hold_answer_until_sent(session.req_header(), &mut peer);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // The error path may hold its own reference; the context changes below.
        let Some(snapshot) = ctx.snapshot.clone() else {
            return e;
        };
        let upstream = &snapshot.upstreams[ctx.upstream];
        let failed = &upstream.backends[ctx.backend];
        if let Some(kind) = local_failure(&e) {
            // The backend never saw this attempt: its health and error counts stay as they
            // are, and another backend would fail the same way.
            ctx.local_failure = Some(kind);
            self.pool.local_errors().record(kind, || {
                format!("upstream {}: cannot connect to {peer}: {e}", upstream.name)
            });
            e.set_retry(false);
            return e;
        }
        failed.errors.count(error_kind(e.etype()));
        self.pool.connect_failed(upstream, &failed.live);
        if std::mem::replace(&mut ctx.retried, true) {
            return e;
        }
        // The same key as the first pick, so that a `hash` upstream's retry goes to the next
        // backend on the key's ring (the host does not matter for a backend's pick).
        let request = request_of(
            session.req_header(),
            None,
            ctx.client,
            ctx.issued.as_ref().map(IssuedCookie::as_pair),
        );
        match upstream.pick_backend(&request, Some(ctx.backend)) {
            Some(next) => {
                log::warn!(
                    "upstream {}: connect to {} failed ({}), retrying on {}",
                    upstream.name,
                    failed.live.address,
                    e.etype().as_str(),
                    upstream.backends[next].live.address
                );
                ctx.in_flight = Some(upstream.hold(next));
                ctx.backend = next;
                ctx.retries = ctx.retries.saturating_add(1);
                e.set_retry(true);
            }
            None => e.set_retry(false),
        }
        e
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        _digest: Option<&Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if !reused {
            if let Some(b) = ctx.in_flight.as_ref() {
                b.backend().connect_succeeded();
            }
        }
        Ok(())
    }

    /// Pingora retries a request that failed on a reused backend connection (the keep-alive
    /// race: the backend closed it just as we sent) only when the method is idempotent. A
    /// request without a body is as safe to send again, whatever its method: nothing of it can
    /// have been half-consumed. A request whose body no longer fits the retry buffer is not.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let req = session.req_header();
        let bodyless = !req.headers.contains_key(http::header::TRANSFER_ENCODING)
            && req
                .headers
                .get(http::header::CONTENT_LENGTH)
                .is_none_or(|v| v.as_bytes() == b"0");
        let repeatable = req.method.is_idempotent() || bodyless;
        if repeatable && !session.as_ref().retry_buffer_truncated() {
            e.retry.decide_reuse(client_reused);
        } else {
            e.set_retry(false);
        }
        if e.retry() {
            // Routine (the backend closed an idle connection as we reused it): Pingora's own
            // warning for it is suppressed, see `suppress_proxy_warn_log`.
            log::debug!("{e}: retrying the request on a new connection");
            ctx.retries = ctx.retries.saturating_add(1);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(ip) = ctx.client {
            let value = forwarded_for(&upstream_request.headers, ip)?;
            upstream_request.insert_header("X-Forwarded-For", value)?;
        }
        let proto = if self.front.is_tls() { "https" } else { "http" };
        upstream_request.insert_header("X-Forwarded-Proto", HeaderValue::from_static(proto))?;
        if let Some(id) = &ctx.request_id {
            upstream_request.insert_header(request_id::X_REQUEST_ID, id.clone())?;
        }
        // The backend gets the host the request was routed on, as `Host` and as
        // `X-Forwarded-Host`, and never a client's own `X-Forwarded-Host`.
        let req = session.req_header();
        match (
            req.headers.get(http::header::HOST),
            host::target_authority(req),
        ) {
            (Some(host), _) => {
                let host = host.clone();
                upstream_request.insert_header("X-Forwarded-Host", host)?;
            }
            (None, Some(authority)) => {
                let host = HeaderValue::from_bytes(authority)
                    .or_err(ErrorType::InvalidHTTPHeader, "request authority")?;
                upstream_request.insert_header(http::header::HOST, host.clone())?;
                upstream_request.insert_header("X-Forwarded-Host", host)?;
            }
            (None, None) => {
                upstream_request.remove_header("X-Forwarded-Host");
            }
        }
        single_content_length(upstream_request)?;
        Ok(())
    }

    /// Counts the body against `max_request_body_bytes` as it streams (a chunked body has no
    /// length to check up front).
    async fn request_body_filter(
        &self,
        session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        let downstream = session.as_downstream();
        // After a 101 the "body" is the tunnel's bytes, which no body limit is about. What
        // was read, not the chunks seen: a retry replays its buffer through here again.
        if let (Some(limit), false) = (
            self.limits.max_request_body_bytes,
            downstream.was_upgraded(),
        ) {
            if downstream.body_bytes_read() as u64 > limit {
                self.counters.reject(Rejection::BodyTooLarge);
                return Error::e_explain(
                    ErrorType::HTTPStatus(413),
                    "request body over max_request_body_bytes",
                );
            }
        }
        Ok(())
    }

    /// A `204` or `1xx` has no body, so no `Content-Length` either (RFC 9110 §8.6), whatever
    /// the backend sent. An HTTP/2 backend's trailers-only gRPC answer has its `grpc-status`
    /// here.
    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = response.status.as_u16();
        if status == 204 || (100..200).contains(&status) {
            response.remove_header(&http::header::CONTENT_LENGTH);
        }
        let h2 = ctx
            .target()
            .is_some_and(|(s, u)| s.upstreams[u].connect.protocol.is_h2());
        if let Some(failed) = h2.then(|| grpc::call_failed(&response.headers)).flatten() {
            ctx.grpc_failed = failed;
        }
        Ok(())
    }

    /// A gRPC call's `grpc-status` (see [`grpc`]). Pingora reads trailers from HTTP/2
    /// backends only, and passes them on to HTTP/2 clients only.
    fn upstream_response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut HeaderMap,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(failed) = grpc::call_failed(trailers) {
            ctx.grpc_failed = failed;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some((snapshot, upstream)) = ctx.target() {
            if snapshot.debug_headers {
                let upstream = &snapshot.upstreams[upstream];
                response.insert_header("X-Switchyard-Upstream", &*upstream.name)?;
                response.insert_header(
                    "X-Switchyard-Backend",
                    upstream.backends[ctx.backend].live.address.to_string(),
                )?;
            }
        }
        if let Some(id) = &ctx.request_id {
            response.insert_header(request_id::X_REQUEST_ID, id.clone())?;
        }
        // On the final head only (a `100 Continue` or `103 Early Hints` comes first; a `101`
        // is a WebSocket's final answer).
        let status = response.status;
        if let (Some(cookie), false) = (
            &ctx.issued,
            status.is_informational() && status != http::StatusCode::SWITCHING_PROTOCOLS,
        ) {
            // Appended: the backend's own cookies go on as they were.
            response.append_header(
                http::header::SET_COOKIE,
                cookie.header(self.front.is_tls())?,
            )?;
            if let Some(value) = sticky_cookie::private_cache_control(
                response.headers.get(http::header::CACHE_CONTROL),
            ) {
                response.insert_header(http::header::CACHE_CONTROL, value)?;
            }
        }
        self.add_hsts(response)?;
        // Once a stop or upgrade signal has arrived, tell keep-alive clients to reconnect (to
        // the new process) instead of reusing a connection that is about to be closed.
        // Pingora's own flag is raised only when the listeners stop, 5 s into an upgrade.
        if self.closing.load(Ordering::Relaxed) {
            session.set_keepalive(None);
        }
        // Each head overwrites the last: after a `100 Continue` the final answer's counts.
        ctx.head_sent = Some(ctx.started.elapsed());
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        // No response at all: the client went away first; nginx's 499 says so.
        let status = session
            .response_written()
            .map_or(CLIENT_CLOSED, |r| r.status.as_u16());
        let elapsed = ctx.started.elapsed();
        if self.access_log.enabled() {
            let duration = ctx.first_byte.map_or(elapsed, |at| at.elapsed());
            self.access_log
                .log(&access_record(session, e, ctx, status, duration));
        }
        let (Some((snapshot, _)), Some(route)) = (ctx.target(), ctx.route) else {
            return;
        };
        snapshot.count_request(route, ctx.upstream, ctx.backend, status, elapsed);
        // Rollout analysis, by the request's final answer. A connect retry that succeeded
        // ended without error; one that did not, a timeout, or a backend that broke off
        // mid-body (after a 200 head) ended with an upstream error. Our own failures
        // (`local_failure`) are not the backend's, though their 503 still counts as one.
        // Latency is to the response head; an answer the balancer made itself (502/504 from
        // `fail_to_proxy`) sent no backend head and takes the whole time. Requests answered
        // 503 in `request_filter` because no backend of the route was available picked no
        // upstream and never get here: no pair counts them. A gRPC call the backend ended
        // with an error status is an error under its HTTP 200 (the `status` label of
        // `switchyard_requests_total` above stays the HTTP status).
        let upstream_failed =
            e.is_some_and(|e| e.esource() == &ErrorSource::Upstream && ctx.local_failure.is_none());
        snapshot.count_for_analysis(
            route,
            ctx.upstream,
            status,
            ctx.head_sent.unwrap_or(elapsed),
            upstream_failed || ctx.grpc_failed,
        );
        // Connect errors were counted per attempt in `fail_to_connect`; local ones not at all.
        if let Some(e) = e {
            match (e.esource(), e.etype()) {
                (ErrorSource::Downstream, ErrorType::ReadTimedout) => {
                    self.counters.reject(Rejection::BodyTimeout)
                }
                (ErrorSource::Downstream, ErrorType::WriteTimedout) => {
                    self.counters.reject(Rejection::SendTimeout)
                }
                _ => {}
            }
            if e.esource() == &ErrorSource::Upstream
                && !is_connect_error(e.etype())
                && ctx.local_failure.is_none()
            {
                snapshot.upstreams[ctx.upstream].backends[ctx.backend]
                    .errors
                    .count(error_kind(e.etype()));
            }
        }
    }

    /// A client that goes away mid-request is an everyday event (nginx logs it at info, as
    /// 499); it is counted as 499 in the metrics instead of an ERROR line each time. So are a
    /// client's own faults (a body over the limit, a body or an answer it does not take in
    /// time): any client could otherwise write an ERROR line per request. The access log has
    /// each of them, with its error.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, e: &Error) -> bool {
        client_went_away(e)
            || matches!(e.etype(), ErrorType::HTTPStatus(code) if (400..500).contains(code))
            || (e.esource() == &ErrorSource::Downstream
                && matches!(
                    e.etype(),
                    ErrorType::ReadTimedout | ErrorType::WriteTimedout
                ))
    }

    /// A retry is said once, by us: `fail_to_connect` names the upstream and the next
    /// backend, `error_while_proxy` the stale connection (at debug).
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        _e: &Error,
        context: ProxyWarnLogContext,
    ) -> bool {
        context == ProxyWarnLogContext::UpstreamRetry
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let (code, body) = match (e.esource(), e.etype()) {
            _ if ctx.local_failure.is_some() => (
                503,
                "503 Service Unavailable: the balancer is out of resources; try again\n",
            ),
            (_, ErrorType::HTTPStatus(413)) => (413, BODY_TOO_LARGE),
            (_, ErrorType::HTTPStatus(code)) => (*code, ""),
            (
                ErrorSource::Upstream,
                ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout,
            ) => (
                504,
                "504 Gateway Timeout: the backend did not answer in time\n",
            ),
            (ErrorSource::Upstream, _) => (502, "502 Bad Gateway: the backend failed to answer\n"),
            _ if client_went_away(e) => (0, ""),
            (ErrorSource::Downstream, ErrorType::ReadTimedout) => (
                408,
                "408 Request Timeout: the request body did not arrive in time\n",
            ),
            (ErrorSource::Downstream, _) => (400, "400 Bad Request\n"),
            _ => (500, "500 Internal Server Error\n"),
        };
        if code > 0 {
            if let Err(write_error) = self.respond_plain(session, ctx, code, body, None).await {
                log::debug!("could not send {code} to the client: {write_error}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}

/// What the pool may see of a request head.
fn request_of<'a>(
    req: &'a RequestHeader,
    host: Option<&'a str>,
    client: Option<IpAddr>,
    issued: Option<(&'a str, &'a str)>,
) -> Request<'a> {
    Request {
        host,
        path: req.uri.path(),
        query: req.uri.query(),
        method: &req.method,
        headers: &req.headers,
        client,
        issued,
    }
}

/// The client's address appended to any `X-Forwarded-For` the request came with, built in one
/// allocation and without `core::fmt` (this runs for every proxied request).
fn forwarded_for(headers: &HeaderMap, client: IpAddr) -> Result<HeaderValue> {
    let earlier = headers.get_all(X_FORWARDED_FOR);
    let earlier_len: usize = earlier.iter().map(|v| v.len() + 2).sum();
    // Long enough for any IPv6 address in text form.
    let mut value = Vec::with_capacity(earlier_len + 46);
    for v in earlier {
        value.extend_from_slice(v.as_bytes());
        value.extend_from_slice(b", ");
    }
    switchyard_access_log::ip_text(&mut value, client);
    HeaderValue::from_maybe_shared(Bytes::from(value)).or_err(
        ErrorType::InvalidHTTPHeader,
        "X-Forwarded-For of the request",
    )
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

const BODY_TOO_LARGE: &str = "413 Content Too Large: the request body is over the limit\n";

/// The body length a request declares, when it declares one (Pingora has checked that every
/// `Content-Length` it carries agrees).
fn declared_length(req: &RequestHeader) -> Option<u64> {
    if req.headers.contains_key(http::header::TRANSFER_ENCODING) {
        return None;
    }
    let value = req
        .headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?;
    value.split(',').next()?.trim().parse().ok()
}

/// Pingora accepts a `Content-Length` repeated with the same value (RFC 9110 §8.6) but
/// forwards every copy; the backend gets it once.
fn single_content_length(req: &mut RequestHeader) -> Result<()> {
    let values = req.headers.get_all(http::header::CONTENT_LENGTH);
    let repeated =
        values.iter().nth(1).is_some() || values.iter().any(|v| v.as_bytes().contains(&b','));
    if !repeated {
        return Ok(());
    }
    if req.headers.contains_key(http::header::TRANSFER_ENCODING) {
        // Chunked framing wins; Pingora drops the length itself in that case.
        req.remove_header(&http::header::CONTENT_LENGTH);
        return Ok(());
    }
    let Some(length) = declared_length(req) else {
        return Error::e_explain(
            ErrorType::InvalidHTTPHeader,
            "Content-Length of the request",
        );
    };
    req.insert_header(http::header::CONTENT_LENGTH, length)?;
    Ok(())
}

fn client_went_away(e: &Error) -> bool {
    e.esource() == &ErrorSource::Downstream
        && matches!(
            e.etype(),
            ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed
        )
}

/// Status recorded for a request that got no response because the client left.
const CLIENT_CLOSED: u16 = 499;

fn is_connect_error(etype: &ErrorType) -> bool {
    matches!(
        etype,
        ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::BindError
            | ErrorType::SocketError
            | ErrorType::ConnectProxyFailure
    )
}

fn error_kind(etype: &ErrorType) -> ErrorKind {
    match etype {
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            ErrorKind::Timeout
        }
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => {
            ErrorKind::Reset
        }
        t if is_connect_error(t) => ErrorKind::Connect,
        _ => ErrorKind::Other,
    }
}

impl Proxy {
    /// Answers with a short plain-text body (with the request's id, the listener's HSTS and
    /// one more header if given) and closes the connection.
    async fn respond_plain(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        status: u16,
        body: &'static str,
        extra: Option<(HeaderName, HeaderValue)>,
    ) -> Result<()> {
        let mut resp = ResponseHeader::build(status, Some(6))?;
        if let Some((name, value)) = extra {
            resp.insert_header(name, value)?;
        }
        if let Some(id) = &ctx.request_id {
            resp.insert_header(request_id::X_REQUEST_ID, id.clone())?;
        }
        resp.insert_header("Content-Type", "text/plain; charset=utf-8")?;
        resp.insert_header("Content-Length", body.len())?;
        resp.insert_header("Connection", "close")?;
        self.add_hsts(&mut resp)?;
        session
            .as_downstream_mut()
            .write_error_response(resp, Bytes::from_static(body.as_bytes()))
            .await
    }

    /// The listener's `Strict-Transport-Security`, unless the backend sent its own policy.
    fn add_hsts(&self, response: &mut ResponseHeader) -> Result<()> {
        if let Some(hsts) = self.front.tls.as_ref().and_then(|tls| tls.hsts()) {
            if !response
                .headers
                .contains_key(http::header::STRICT_TRANSPORT_SECURITY)
            {
                response.insert_header(http::header::STRICT_TRANSPORT_SECURITY, hsts)?;
            }
        }
        Ok(())
    }
}

/// The request's access log line, from what the session and the context hold at its end.
fn access_record<'a>(
    session: &'a Session,
    e: Option<&'a Error>,
    ctx: &'a RequestCtx,
    status: u16,
    elapsed: Duration,
) -> Record<'a> {
    let req = session.req_header();
    let header = |name: http::header::HeaderName| req.headers.get(name).map(HeaderValue::as_bytes);
    let snapshot = ctx.snapshot.as_deref();
    let target = ctx.target().map(|(s, u)| &s.upstreams[u]);
    let downstream = session.as_downstream();
    Record {
        time: SystemTime::now(),
        client: ctx.client,
        method: Some(req.method.as_str()),
        host: header(http::header::HOST).or_else(|| host::target_authority(req)),
        path: Some(req.uri.path()),
        query: req.uri.query(),
        protocol: Some(protocol(req.version)),
        status,
        bytes_sent: downstream.body_bytes_sent(),
        duration: elapsed,
        route: snapshot.zip(ctx.route).map(|(s, r)| &*s.routes[r].name),
        upstream: target.map(|u| &*u.name),
        backend: target.map(|u| u.backends[ctx.backend].live.address),
        request_id: ctx.request_id.as_ref().map_or(b"-", HeaderValue::as_bytes),
        retries: ctx.retries,
        user_agent: header(http::header::USER_AGENT),
        referer: header(http::header::REFERER),
        tls: downstream
            .digest()
            .and_then(|d| d.ssl_digest.as_deref())
            .map(|tls| (&*tls.version, &*tls.cipher)),
        error: e.map(|e| e.etype().as_str()),
    }
}

fn protocol(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP",
    }
}
