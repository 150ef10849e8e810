//! The admin HTTP API: JSON in and out, errors as `{"error": ...}` naming the field, every
//! change turned into one `Change` for the pool (which checks it, saves it, and swaps it in).
//! `/` is the status page (`status_page.rs`), `/api/v1/` the endpoint index (`index.rs`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use log::{log, Level};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::{json, Map, Value};
use switchyard_config::{parse_duration, MAX_BACKEND_WEIGHT, MAX_SPLIT_WEIGHT};
use switchyard_pool::{BackendState, Change, Rejection, Snapshot, Source, Upstream};

use crate::control::{Control, ReloadRefused};
use crate::stats::StatsSampler;
use crate::{index, origin, rollouts, status_page};

/// Larger bodies get 413; the largest real body (a split) is a few hundred bytes.
pub const MAX_BODY: usize = 64 * 1024;

pub struct AdminApi {
    control: Arc<Control>,
    /// Raised when this process hands over to a new one (upgrade) or stops: from then on a
    /// change made here would not reach the process that takes over, so changes are refused.
    closing: Arc<AtomicBool>,
    /// The readings `GET /api/v1/stats` computes its rates from; sampled by the background
    /// service the binary runs beside this one.
    stats: StatsSampler,
}

impl AdminApi {
    pub fn new(control: Arc<Control>, closing: Arc<AtomicBool>, stats: StatsSampler) -> Self {
        AdminApi {
            control,
            closing,
            stats,
        }
    }
}

/// A finished answer: status, JSON (or plain) body, and an `Allow` header for 405.
struct Reply {
    status: StatusCode,
    body: Value,
    allow: Option<Cow<'static, str>>,
}

impl Reply {
    fn ok(body: Value) -> Reply {
        Reply::with(StatusCode::OK, body)
    }

    fn with(status: StatusCode, body: Value) -> Reply {
        Reply {
            status,
            body,
            allow: None,
        }
    }

    fn error(status: StatusCode, message: impl Into<String>) -> Reply {
        Reply::with(status, json!({ "error": message.into() }))
    }

    fn method_not_allowed(method: &Method, allow: &'static str) -> Reply {
        // An endpoint that answers GET answers HEAD too (see `response`): said here once
        // rather than at every endpoint.
        let allow: Cow<'static, str> = match allow.strip_prefix("GET") {
            Some(rest) if !allow.contains("HEAD") => format!("GET, HEAD{rest}").into(),
            _ => allow.into(),
        };
        Reply {
            allow: Some(allow.clone()),
            ..Reply::error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} is not allowed here; allowed: {allow}"),
            )
        }
    }

    fn rejected(rejection: Rejection) -> Reply {
        let status = match &rejection {
            Rejection::Invalid(_) => StatusCode::BAD_REQUEST,
            Rejection::NotFound(_) => StatusCode::NOT_FOUND,
            Rejection::Conflict(_) => StatusCode::CONFLICT,
            Rejection::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Rejection::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Reply::error(status, rejection.to_string())
    }
}

#[async_trait]
impl ServeHttp for AdminApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        if path == "/" {
            let page = status_page::serve(&method);
            log_call(&method, &path, page.status());
            return page;
        }
        // HEAD is GET without the body (Pingora sends none for HEAD and keeps the GET's
        // Content-Length), on every endpoint that answers GET.
        let dispatched = if method == Method::HEAD {
            Method::GET
        } else {
            method.clone()
        };
        let reply = self.handle(session, &dispatched, &path).await;
        log_call(&method, &path, reply.status);
        let mut builder = Response::builder().status(reply.status);
        if let Some(allow) = &reply.allow {
            builder = builder.header(http::header::ALLOW, allow.as_ref());
        }
        let (content_type, body) = match reply.body {
            Value::String(text) => (
                "text/plain; charset=utf-8",
                format!("{text}\n").into_bytes(),
            ),
            json => ("application/json", format!("{json:#}\n").into_bytes()),
        };
        builder
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_default()
    }
}

impl AdminApi {
    async fn handle(&self, session: &mut ServerSession, method: &Method, path: &str) -> Reply {
        if path == "/healthz" {
            return match *method {
                Method::GET | Method::HEAD => Reply::ok(Value::String("ok".into())),
                _ => Reply::method_not_allowed(method, "GET, HEAD"),
            };
        }
        if path.starts_with("/api/") {
            let headers = &session.req_header().headers;
            if let Some(why) = origin::refuse_cross_site(headers, self.control.has_token()) {
                return Reply::error(StatusCode::FORBIDDEN, why);
            }
            let authorization = session
                .req_header()
                .headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            if !self.control.authorized(authorization) {
                return Reply::error(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong token: send Authorization: Bearer <token>",
                );
            }
        }
        let Some(rest) = path
            .strip_prefix("/api/v1/")
            .or((path == "/api/v1").then_some(""))
        else {
            return Reply::error(StatusCode::NOT_FOUND, format!("no endpoint {path}"));
        };
        let body = match read_body(session).await {
            Ok(body) => body,
            Err(reply) => {
                // Do not read the rest of an oversized body just to keep the connection.
                session.set_keepalive(None);
                return reply;
            }
        };
        if *method != Method::GET && self.closing.load(Ordering::Relaxed) {
            return Reply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "this process is handing over to a new one (upgrade or shutdown); send the change again in a moment",
            );
        }
        let segments: Vec<String> = rest.split('/').map(percent_decode).collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let snapshot = self.control.pool().snapshot();
        match segments.as_slice() {
            [""] => match *method {
                Method::GET => Reply::ok(json!(index::index())),
                _ => Reply::method_not_allowed(method, "GET"),
            },
            ["stats"] => match *method {
                Method::GET => Reply::ok(json!(self.stats.view(&snapshot))),
                _ => Reply::method_not_allowed(method, "GET"),
            },
            ["routes"] => match *method {
                Method::GET => Reply::ok(Value::Array(
                    (0..snapshot.routes.len())
                        .map(|r| route_view(&snapshot, r))
                        .collect(),
                )),
                _ => Reply::method_not_allowed(method, "GET"),
            },
            ["routes", route] => match *method {
                Method::GET => match snapshot.routes.iter().position(|r| *r.name == **route) {
                    Some(r) => Reply::ok(route_view(&snapshot, r)),
                    None => {
                        Reply::error(StatusCode::NOT_FOUND, format!("no route named {route:?}"))
                    }
                },
                _ => Reply::method_not_allowed(method, "GET"),
            },
            ["routes", route, "rollout"] => match *method {
                Method::GET => match self.control.pool().rollout(route) {
                    Some(r) => Reply::ok(rollouts::status_view(&r, &snapshot)),
                    None => self.no_rollout(&snapshot, route),
                },
                // An unknown route is 404 whatever the body says.
                Method::POST if !snapshot.routes.iter().any(|r| *r.name == **route) => {
                    Reply::error(StatusCode::NOT_FOUND, format!("no route named {route:?}"))
                }
                Method::POST => match rollouts::start(route, &body) {
                    Ok(change) => self.rollout_reply(&change, route, StatusCode::CREATED),
                    Err(problems) => Reply::error(StatusCode::BAD_REQUEST, problems),
                },
                _ => Reply::method_not_allowed(method, "GET, POST"),
            },
            ["routes", route, "rollout", name] => match (method, rollouts::command(name)) {
                (&Method::POST, Some(command)) => {
                    let change = Change::RolloutCommand {
                        route: route.to_string(),
                        command,
                    };
                    self.rollout_reply(&change, route, StatusCode::OK)
                }
                (_, Some(_)) => Reply::method_not_allowed(method, "POST"),
                (_, None) => Reply::error(
                    StatusCode::NOT_FOUND,
                    format!("no endpoint {path}; a rollout takes pause, resume, promote or abort"),
                ),
            },
            ["rollouts"] => match *method {
                Method::GET => Reply::ok(Value::Array(
                    self.control
                        .pool()
                        .rollouts()
                        .iter()
                        .map(|r| rollouts::status_view(r, &snapshot))
                        .collect(),
                )),
                _ => Reply::method_not_allowed(method, "GET"),
            },
            ["routes", route, "split"] => match *method {
                Method::PUT => self.set_split(route, &body),
                _ => Reply::method_not_allowed(method, "PUT"),
            },
            ["upstreams"] => match *method {
                Method::GET => Reply::ok(Value::Array(
                    snapshot.upstreams.iter().map(upstream_view).collect(),
                )),
                _ => Reply::method_not_allowed(method, "GET"),
            },
            ["upstreams", upstream] => match *method {
                Method::GET => match snapshot.upstream(upstream) {
                    Some(u) => Reply::ok(upstream_view(u)),
                    None => Reply::error(
                        StatusCode::NOT_FOUND,
                        format!("no upstream named {upstream:?}"),
                    ),
                },
                Method::PATCH => self.update_upstream(upstream, &body),
                _ => Reply::method_not_allowed(method, "GET, PATCH"),
            },
            ["upstreams", upstream, "backends"] => match *method {
                Method::POST => self.add_backend(upstream, &body),
                _ => Reply::method_not_allowed(method, "POST"),
            },
            ["upstreams", upstream, "backends", address] => match *method {
                Method::PATCH => self.update_backend(upstream, address, &body),
                Method::DELETE => self.remove_backend(upstream, address),
                _ => Reply::method_not_allowed(method, "PATCH, DELETE"),
            },
            ["reload"] => match *method {
                Method::POST => self.reload(),
                _ => Reply::method_not_allowed(method, "POST"),
            },
            ["state"] => match *method {
                Method::GET => {
                    crate::state::view(self.control.pool()).map_or_else(Reply::rejected, Reply::ok)
                }
                _ => Reply::method_not_allowed(method, "GET"),
            },
            ["state", "reset"] => match *method {
                Method::POST => {
                    crate::state::reset(self.control.pool()).map_or_else(Reply::rejected, Reply::ok)
                }
                _ => Reply::method_not_allowed(method, "POST"),
            },
            ["store"] => match *method {
                Method::GET => Reply::ok(
                    serde_json::to_value(self.control.pool().store_status()).unwrap_or(Value::Null),
                ),
                _ => Reply::method_not_allowed(method, "GET"),
            },
            ["events"] => match *method {
                Method::GET => {
                    let query = session.req_header().uri.query();
                    crate::events::list(self.control.pool().events(), query)
                        .map_or_else(|e| Reply::error(StatusCode::BAD_REQUEST, e), Reply::ok)
                }
                _ => Reply::method_not_allowed(method, "GET"),
            },
            _ => Reply::error(StatusCode::NOT_FOUND, format!("no endpoint {path}")),
        }
    }

    fn apply(&self, change: &Change) -> Result<Arc<Snapshot>, Reply> {
        self.control
            .pool()
            .apply(change, Source::Api)
            .map_err(Reply::rejected)?;
        Ok(self.control.pool().snapshot())
    }

    /// Applies a rollout change and answers with the rollout's status.
    fn rollout_reply(&self, change: &Change, route: &str, status: StatusCode) -> Reply {
        let snapshot = match self.apply(change) {
            Ok(snapshot) => snapshot,
            Err(reply) => return reply,
        };
        match self.control.pool().rollout(route) {
            Some(r) => Reply::with(status, rollouts::status_view(&r, &snapshot)),
            None => Reply::error(
                StatusCode::NOT_FOUND,
                format!("route {route:?} has no rollout"),
            ),
        }
    }

    fn no_rollout(&self, snapshot: &Snapshot, route: &str) -> Reply {
        let message = if snapshot.routes.iter().any(|r| *r.name == *route) {
            format!("route {route:?} has had no rollout")
        } else {
            format!("no route named {route:?}")
        };
        Reply::error(StatusCode::NOT_FOUND, message)
    }

    fn set_split(&self, route: &str, body: &[u8]) -> Reply {
        let fields = match json_object(body) {
            Ok(fields) => fields,
            Err(reply) => return reply,
        };
        let mut split = BTreeMap::new();
        for (upstream, weight) in &fields {
            match integer(weight, MAX_SPLIT_WEIGHT) {
                Some(w) => split.insert(upstream.clone(), w),
                None => {
                    return Reply::error(
                        StatusCode::BAD_REQUEST,
                        format!("split.{upstream}: must be an integer 0..={MAX_SPLIT_WEIGHT}"),
                    )
                }
            };
        }
        let change = Change::SetSplit {
            route: route.to_string(),
            split,
        };
        match self.apply(&change) {
            Ok(snapshot) => match snapshot.routes.iter().position(|r| *r.name == *route) {
                Some(r) => Reply::ok(route_view(&snapshot, r)),
                None => Reply::error(StatusCode::NOT_FOUND, format!("no route named {route:?}")),
            },
            Err(reply) => reply,
        }
    }

    fn update_backend(&self, upstream: &str, address: &str, body: &[u8]) -> Reply {
        let address = match backend_in_path(upstream, address) {
            Ok(address) => address,
            Err(reply) => return reply,
        };
        let fields = match json_object(body) {
            Ok(fields) => fields,
            Err(reply) => return reply,
        };
        let mut weight = None;
        let mut state = None;
        let mut retire_timeout = None;
        for (field, value) in &fields {
            match field.as_str() {
                "weight" => match backend_weight(value) {
                    Ok(w) => weight = Some(w),
                    Err(reply) => return reply,
                },
                "state" => match value.as_str().and_then(parse_state) {
                    Some(s) => state = Some(s),
                    None => {
                        return Reply::error(
                            StatusCode::BAD_REQUEST,
                            "state: must be \"active\", \"draining\", \"disabled\" or \"retiring\"",
                        )
                    }
                },
                "retire_timeout" => match value.as_str().map(parse_duration) {
                    Some(Ok(timeout)) => retire_timeout = Some(timeout),
                    Some(Err(why)) => {
                        return Reply::error(
                            StatusCode::BAD_REQUEST,
                            format!("retire_timeout: {why}"),
                        )
                    }
                    None => {
                        return Reply::error(
                            StatusCode::BAD_REQUEST,
                            format!("retire_timeout: must be a duration string such as \"10m\", got {value}"),
                        )
                    }
                },
                other => {
                    return Reply::error(
                        StatusCode::BAD_REQUEST,
                        format!("{other}: unknown field; expected \"weight\" and/or \"state\" (with \"retire_timeout\" for \"retiring\")"),
                    )
                }
            }
        }
        let upstream_name = upstream.to_string();
        let change = match (state, retire_timeout) {
            (Some(Wanted::Retiring), timeout) => Change::RetireBackend {
                upstream: upstream_name,
                address,
                weight,
                timeout,
            },
            (_, Some(_)) => {
                return Reply::error(
                    StatusCode::BAD_REQUEST,
                    "retire_timeout: applies only with \"state\": \"retiring\"",
                )
            }
            (Some(Wanted::Is(state)), None) => Change::UpdateBackend {
                upstream: upstream_name,
                address,
                weight,
                state: Some(state),
            },
            (None, None) => Change::UpdateBackend {
                upstream: upstream_name,
                address,
                weight,
                state: None,
            },
        };
        self.apply(&change).map_or_else(
            |r| r,
            |s| backend_reply(&s, upstream, address, StatusCode::OK),
        )
    }

    fn add_backend(&self, upstream: &str, body: &[u8]) -> Reply {
        let fields = match json_object(body) {
            Ok(fields) => fields,
            Err(reply) => return reply,
        };
        let mut address = None;
        let mut weight = None;
        for (field, value) in &fields {
            match field.as_str() {
                "address" => match value.as_str().and_then(parse_address) {
                    Some(a) => address = Some(a),
                    None => {
                        return Reply::error(
                            StatusCode::BAD_REQUEST,
                            format!(
                            "address: {value} is not an IP:port address, e.g. \"127.0.0.1:9004\""
                        ),
                        )
                    }
                },
                "weight" => match backend_weight(value) {
                    Ok(w) => weight = Some(w),
                    Err(reply) => return reply,
                },
                other => {
                    return Reply::error(
                        StatusCode::BAD_REQUEST,
                        format!("{other}: unknown field; expected \"address\" and \"weight\""),
                    )
                }
            }
        }
        let Some(address) = address else {
            return Reply::error(StatusCode::BAD_REQUEST, "address: is required");
        };
        let change = Change::AddBackend {
            upstream: upstream.to_string(),
            address,
            weight,
        };
        self.apply(&change).map_or_else(
            |r| r,
            |s| backend_reply(&s, upstream, address, StatusCode::CREATED),
        )
    }

    fn remove_backend(&self, upstream: &str, address: &str) -> Reply {
        let address = match backend_in_path(upstream, address) {
            Ok(address) => address,
            Err(reply) => return reply,
        };
        let change = Change::RemoveBackend {
            upstream: upstream.to_string(),
            address,
        };
        match self.apply(&change) {
            Ok(_) => Reply::ok(
                json!({ "upstream": upstream, "address": address.to_string(), "removed": true }),
            ),
            Err(reply) => reply,
        }
    }

    /// `PATCH /api/v1/upstreams/{upstream}`: every backend's state and/or weight at once.
    fn update_upstream(&self, upstream: &str, body: &[u8]) -> Reply {
        let change = match crate::state::whole_upstream(upstream, body) {
            Ok(change) => change,
            Err(message) => return Reply::error(StatusCode::BAD_REQUEST, message),
        };
        match self.apply(&change) {
            Ok(snapshot) => match snapshot.upstream(upstream) {
                Some(u) => Reply::ok(upstream_view(u)),
                None => Reply::error(
                    StatusCode::NOT_FOUND,
                    format!("no upstream named {upstream:?}"),
                ),
            },
            Err(reply) => reply,
        }
    }

    fn reload(&self) -> Reply {
        match self.control.reload() {
            Ok(report) => Reply::ok(json!({
                "reloaded": true,
                "needs_restart": report.needs_restart,
                "dropped_state": report.dropped_state,
                "warnings": report.warnings,
            })),
            // Nothing is wrong with the request or a config: this instance has no file.
            Err(ReloadRefused::NoConfigFile) => {
                Reply::error(StatusCode::CONFLICT, ReloadRefused::NO_CONFIG_FILE)
            }
            Err(ReloadRefused::Invalid(problems)) => Reply::with(
                StatusCode::BAD_REQUEST,
                json!({
                    "error": format!("invalid config, nothing changed: {}", problems.join("; ")),
                    "problems": problems,
                }),
            ),
        }
    }
}

/// Reads are logged at debug (the status page asks five times a second), changes at info.
fn log_call(method: &Method, path: &str, status: StatusCode) {
    let level = if *method == Method::GET || *method == Method::HEAD {
        Level::Debug
    } else {
        Level::Info
    };
    // Our API's paths are short; a long one is a client's junk, not for the log.
    if path.len() <= 200 {
        log!(level, "admin: {method} {path} -> {}", status.as_u16());
    } else {
        log!(
            level,
            "admin: {method} <{}-byte path> -> {}",
            path.len(),
            status.as_u16()
        );
    }
}

async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Reply> {
    let too_large = || {
        Reply::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body is larger than {MAX_BODY} bytes"),
        )
    };
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(Reply::error(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the body: {e}"),
                ))
            }
        }
    }
}

fn json_object(body: &[u8]) -> Result<Map<String, Value>, Reply> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(other) => Err(Reply::error(
            StatusCode::BAD_REQUEST,
            format!("body: expected a JSON object, got {other}"),
        )),
        Err(e) => Err(Reply::error(
            StatusCode::BAD_REQUEST,
            format!("body: invalid JSON: {e}"),
        )),
    }
}

pub(crate) fn integer(value: &Value, max: u32) -> Option<u32> {
    value
        .as_u64()
        .filter(|v| *v <= u64::from(max))
        .and_then(|v| u32::try_from(v).ok())
}

/// The `{address}` segment of a backend path; one that is not IP:port names no backend.
fn backend_in_path(upstream: &str, text: &str) -> Result<SocketAddr, Reply> {
    parse_address(text).ok_or_else(|| {
        Reply::error(
            StatusCode::NOT_FOUND,
            format!("upstream {upstream:?} has no backend {text:?} (addresses are IP:port)"),
        )
    })
}

/// A `weight` field of a backend body.
fn backend_weight(value: &Value) -> Result<u32, Reply> {
    integer(value, MAX_BACKEND_WEIGHT).ok_or_else(|| {
        Reply::error(
            StatusCode::BAD_REQUEST,
            format!("weight: must be an integer 0..={MAX_BACKEND_WEIGHT}"),
        )
    })
}

/// A `state` field: a state as it is, or `retiring`, whose deadline the pool sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    Is(BackendState),
    Retiring,
}

fn parse_state(text: &str) -> Option<Wanted> {
    match text {
        "active" => Some(Wanted::Is(BackendState::Active)),
        "draining" => Some(Wanted::Is(BackendState::Draining)),
        "disabled" => Some(Wanted::Is(BackendState::Disabled)),
        "retiring" => Some(Wanted::Retiring),
        _ => None,
    }
}

fn parse_address(text: &str) -> Option<SocketAddr> {
    text.trim().parse().ok()
}

/// `%3A` -> `:`; anything that is not a valid escape stays as it is.
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn route_view(snapshot: &Snapshot, index: usize) -> Value {
    let route = &snapshot.routes[index];
    let split: Map<String, Value> = route
        .split
        .iter()
        .map(|&(u, w)| (snapshot.upstreams[u].name.to_string(), json!(w)))
        .collect();
    // How each request was routed, one count per way, zeros included: a script can read
    // `routing.sticky_missing` without asking whether it exists yet.
    let routing: Map<String, Value> = route
        .routing_counts()
        .iter()
        .map(|&(how, count)| (how.as_str().to_string(), json!(count)))
        .collect();
    json!({
        "name": &*route.name,
        "host": route.host.as_deref(),
        "path_prefix": route.path_prefix.as_deref(),
        // Always present, `{}` for a route without conditions: the same shape as written.
        "match": &route.matching,
        "sticky": &route.sticky,
        "split": split,
        "effective_share": effective_share(snapshot, route),
        "routing": routing,
    })
}

/// What fraction of the route's requests each upstream of its split gets now (an upstream
/// without an available backend 0, its share spread over the others), rounded to 1e-4.
fn effective_share(snapshot: &Snapshot, route: &switchyard_pool::Route) -> Map<String, Value> {
    route
        .effective_shares(&snapshot.upstreams)
        .iter()
        .map(|&(u, share)| {
            let share = (share * 10_000.0).round() / 10_000.0;
            (snapshot.upstreams[u].name.to_string(), json!(share))
        })
        .collect()
}

fn backend_view(upstream: &Upstream, i: usize) -> Value {
    let backend = &upstream.backends[i];
    let mut view = json!({
        "address": backend.live.address.to_string(),
        "weight": backend.weight,
        "effective_weight": upstream.effective_weight(i),
        "healthy": backend.live.is_healthy(),
        "state": backend.state.as_str(),
        "in_flight": backend.live.in_flight(),
    });
    if let Some(until) = backend.state.retiring_until() {
        let remaining = until.remaining(SystemTime::now());
        view["retiring_until"] = until.to_string().into();
        view["retire_remaining_ms"] = u64::try_from(remaining.as_millis())
            .unwrap_or(u64::MAX)
            .into();
    }
    view
}

fn upstream_view(upstream: &Upstream) -> Value {
    json!({
        "name": &*upstream.name,
        "algorithm": upstream.algorithm.as_str(),
        // The key a `hash` upstream hashes on; null for every other algorithm.
        "hash_on": &upstream.hash_on,
        "health_checked": upstream.health_check.is_some(),
        // The selection's own answer, so that no client redoes its rules (a retiring backend
        // counts only on a hash ring).
        "available": upstream.has_available(),
        "backends": (0..upstream.backends.len())
            .map(|i| backend_view(upstream, i))
            .collect::<Vec<_>>(),
    })
}

fn backend_reply(
    snapshot: &Snapshot,
    upstream: &str,
    address: SocketAddr,
    status: StatusCode,
) -> Reply {
    snapshot
        .upstream(upstream)
        .and_then(|u| {
            let i = u.backends.iter().position(|b| b.live.address == address)?;
            Some(backend_view(u, i))
        })
        .map_or_else(
            || {
                Reply::error(
                    StatusCode::NOT_FOUND,
                    format!("upstream {upstream:?} has no backend {address}"),
                )
            },
            |view| Reply::with(status, view),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_in_paths_are_percent_decoded() {
        assert_eq!(percent_decode("127.0.0.1%3A9001"), "127.0.0.1:9001");
        assert_eq!(percent_decode("127.0.0.1%3a9001"), "127.0.0.1:9001");
        assert_eq!(percent_decode("127.0.0.1:9001"), "127.0.0.1:9001");
        assert_eq!(percent_decode("bad%zz"), "bad%zz");
    }

    #[test]
    fn weights_must_be_integers_in_range() {
        assert_eq!(integer(&json!(5), 1000), Some(5));
        for bad in [json!(1001), json!(-1), json!(1.5), json!("5"), json!(null)] {
            assert_eq!(integer(&bad, 1000), None, "{bad}");
        }
    }
}
