//! `switchyard demo`: two small backends, `blue` and `green`, and a load balancer splitting
//! 90/10 between them, all on fixed local ports and with no file to write.

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;
use switchyard_config::Config;

use crate::launch::{self, Prerequisites};

const BLUE: &str = "127.0.0.1:9001";
const GREEN: &str = "127.0.0.1:9002";

/// The embedded config: blue and green behind one route, with HTTP health checks.
pub const CONFIG: &str = r#"
server:
  grace_period: 5s
  debug_headers: true
  max_connections: 1000
listeners:
  - address: 127.0.0.1:8080
admin:
  address: 127.0.0.1:9000
metrics:
  address: 127.0.0.1:9100
upstreams:
  blue:
    algorithm: round_robin
    backends:
      - address: 127.0.0.1:9001
    health_check:
      type: http
      path: /healthz
      interval: 1s
      timeout: 500ms
      rise: 2
      fall: 2
  green:
    algorithm: round_robin
    backends:
      - address: 127.0.0.1:9002
    health_check:
      type: http
      path: /healthz
      interval: 1s
      timeout: 500ms
      rise: 2
      fall: 2
routes:
  - name: web
    path_prefix: /
    split:
      blue: 90
      green: 10
"#;

pub fn run() -> Result<(), String> {
    let mut config = Config::from_yaml(CONFIG).map_err(|p| format!("embedded demo config: {p}"))?;
    config.server.upgrade_socket = upgrade_socket();
    let mut backends: Prerequisites = Vec::new();
    for (name, version, address) in [("blue", "v1", BLUE), ("green", "v2", GREEN)] {
        let parsed = address
            .parse()
            .map_err(|e| format!("demo backend address {address}: {e}"))?;
        launch::ensure_free(&format!("demo backend {name}"), parsed)?;
        let mut service = Service::new(
            format!("demo backend {name}"),
            DemoBackend { name, version },
        );
        service.add_tcp(address);
        backends.push(Box::new(service));
    }
    println!("{}", instructions(&config));
    launch::run(config, None, false, backends)
}

/// The demo runs as any user, who cannot create the default `/run/switchyard`: the upgrade
/// socket goes in a directory of that user's own (the session's runtime directory, else one
/// in the temp directory named by uid; `upgrade_socket` refuses it if someone else made it).
fn upgrade_socket() -> std::path::PathBuf {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(runtime) if !runtime.is_empty() => {
            std::path::PathBuf::from(runtime).join("switchyard-demo")
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        _ => std::env::temp_dir().join(format!("switchyard-demo-{}", unsafe { libc::geteuid() })),
    };
    dir.join("upgrade.sock")
}

fn instructions(config: &Config) -> String {
    let lb = config
        .listeners
        .first()
        .map(|l| l.address.to_string())
        .unwrap_or_default();
    let admin = config
        .admin
        .as_ref()
        .map(|a| a.address.to_string())
        .unwrap_or_default();
    let metrics = config
        .metrics
        .as_ref()
        .map(|m| m.address.to_string())
        .unwrap_or_default();
    format!(
        "\
Switchyard demo
  load balancer  http://{lb}/   route `web`: blue 90, green 10
  blue backend   http://{BLUE}/   (v1)
  green backend  http://{GREEN}/   (v2)

Try:
  curl -i http://{lb}/                      # X-Switchyard-Upstream says who answered
  for i in $(seq 20); do curl -s http://{lb}/; done | sort | uniq -c    # about 18 blue, 2 green

Shift the canary, drain, watch (admin API at http://{admin}/api/v1/, metrics at http://{metrics}/metrics):
  curl -s http://{admin}/api/v1/routes
  curl -s -X PUT http://{admin}/api/v1/routes/web/split -d '{{\"blue\": 50, \"green\": 50}}'
  curl -s -X PATCH http://{admin}/api/v1/upstreams/green/backends/{GREEN} -d '{{\"state\": \"draining\"}}'
  curl -s http://{admin}/api/v1/upstreams/green
  curl -s -X PATCH http://{admin}/api/v1/upstreams/green/backends/{GREEN} -d '{{\"state\": \"active\"}}'
  curl -s http://{metrics}/metrics | grep switchyard_requests_total

Stop with Ctrl+C (in-flight requests finish first).
"
    )
}

/// A backend that names itself: `hello from blue (v1)`; `/healthz` answers `ok`.
struct DemoBackend {
    name: &'static str,
    version: &'static str,
}

#[async_trait]
impl ServeHttp for DemoBackend {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let body = if session.req_header().uri.path() == "/healthz" {
            "ok\n".to_string()
        } else {
            format!("hello from {} ({})\n", self.name, self.version)
        };
        Response::builder()
            .status(200)
            .header("Content-Type", "text/plain; charset=utf-8")
            .header("Content-Length", body.len())
            .header("X-Demo-Backend", self.name)
            .body(body.into_bytes())
            .unwrap_or_default()
    }
}
