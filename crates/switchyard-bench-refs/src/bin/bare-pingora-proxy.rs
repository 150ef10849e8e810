//! The bench's bare pingora-proxy load balancer: `ProxyHttp` with only `new_ctx` and
//! `upstream_peer`, round robin over the backends through Pingora's own `LoadBalancer`, no
//! health checks. Everything else is pingora-proxy's default. Only `make bench` uses it.

use async_trait::async_trait;
use pingora::lb::selection::RoundRobin;
use pingora::lb::LoadBalancer;
use pingora::prelude::{HttpPeer, Result};
use pingora::proxy::{http_proxy_service, ProxyHttp, Session};
use pingora::Error;
use pingora::ErrorType::InternalError;
use switchyard_bench_refs::{server, Args};

struct Bare {
    backends: LoadBalancer<RoundRobin>,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        // Round robin ignores the key; 256 is the example's bound on skipped unhealthy picks.
        let backend = self
            .backends
            .select(b"", 256)
            .ok_or_else(|| Error::explain(InternalError, "no backend"))?;
        Ok(Box::new(HttpPeer::new(backend.addr, false, String::new())))
    }
}

fn main() {
    let args = Args::from_env();
    let backends = match LoadBalancer::try_from_iter(&args.backends) {
        Ok(lb) => lb,
        Err(e) => {
            eprintln!("backends: {e}");
            std::process::exit(2);
        }
    };
    let mut server = server(args.threads);
    let mut proxy = http_proxy_service(&server.configuration, Bare { backends });
    proxy.add_tcp(&args.listen.to_string());
    server.add_service(proxy);
    server.run_forever();
}
