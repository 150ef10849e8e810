//! `GET /metrics` on `metrics.address`: Prometheus text format, no auth.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use switchyard_pool::Pool;

pub struct MetricsEndpoint {
    pool: Arc<Pool>,
}

impl MetricsEndpoint {
    pub fn new(pool: Arc<Pool>) -> Self {
        MetricsEndpoint { pool }
    }
}

#[async_trait]
impl ServeHttp for MetricsEndpoint {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let (status, content_type, body) = match (&req.method, req.uri.path()) {
            (&Method::GET, "/metrics") => (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.pool
                    .metrics()
                    .render(&self.pool.snapshot(), &self.pool.rollouts()),
            ),
            (_, "/metrics") => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                b"only GET /metrics\n".to_vec(),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                b"metrics are at /metrics\n".to_vec(),
            ),
        };
        let mut builder = Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len());
        if status == StatusCode::METHOD_NOT_ALLOWED {
            builder = builder.header(http::header::ALLOW, "GET");
        }
        builder.body(body).unwrap_or_default()
    }
}
