//! `switchyard demo`: two small backends, `blue` (v1) and `green` (v2), and a load balancer
//! sending everything to blue, all on fixed local ports, ready for a rollout to green.
//!
//! Each backend answers `/version` (its name and version, for rollout checks) and takes
//! `POST /chaos?errors=30&delay=300ms`, which makes that share of its answers a 500 and
//! every answer that much slower, so that a newcomer can watch a rollout roll back on its
//! own. The effective config is written next to the upgrade socket for the CLI's `--config`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use http::{Method, Response};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;
use switchyard_config::{parse_duration, Config};

use crate::launch::{self, Prerequisites};

const BLUE: &str = "127.0.0.1:9001";
const GREEN: &str = "127.0.0.1:9002";

/// The longest delay `/chaos` takes: more only looks like a hung demo.
const MAX_DELAY: Duration = Duration::from_secs(30);

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
      blue: 100
      green: 0
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
            DemoBackend {
                name,
                version,
                chaos: Chaos::default(),
            },
        );
        service.add_tcp(address);
        backends.push(Box::new(service));
    }
    // The CLI reads the admin address from a config file; without one it could not be
    // pointed at the demo. A failure here costs only the CLI lines, not the demo.
    let config_file = write_config(&config.server.upgrade_socket);
    println!(
        "{}",
        instructions(&config, config_file.as_deref().map_err(String::as_str))
    );
    launch::run(config, None, false, backends)
}

/// The demo runs as any user, who cannot create the default `/run/switchyard`: the upgrade
/// socket goes in a directory of that user's own (the session's runtime directory, else one
/// in the temp directory named by uid; `upgrade_socket` refuses it if someone else made it).
fn upgrade_socket() -> PathBuf {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(runtime) if !runtime.is_empty() => PathBuf::from(runtime).join("switchyard-demo"),
        // SAFETY: geteuid has no preconditions and cannot fail.
        _ => std::env::temp_dir().join(format!("switchyard-demo-{}", unsafe { libc::geteuid() })),
    };
    dir.join("upgrade.sock")
}

/// Writes the effective config (the embedded one with its upgrade socket) as `demo.yaml` in
/// the upgrade socket's directory: that directory is checked to be ours alone, so nobody
/// else can put a file there for the CLI to read.
fn write_config(socket: &Path) -> Result<PathBuf, String> {
    crate::upgrade_socket::prepare(socket, false)?;
    let text = effective_config(socket)?;
    let file = socket.with_file_name("demo.yaml");
    std::fs::write(&file, text).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    Ok(file)
}

fn effective_config(socket: &Path) -> Result<String, String> {
    let socket = socket
        .to_str()
        .ok_or_else(|| format!("upgrade socket path {} is not UTF-8", socket.display()))?;
    // A JSON string is a YAML double-quoted scalar: any path is quoted right.
    let quoted = serde_json::to_string(socket).map_err(|e| format!("upgrade socket path: {e}"))?;
    Ok(CONFIG.replacen(
        "server:\n",
        &format!("server:\n  upgrade_socket: {quoted}\n"),
        1,
    ))
}

fn instructions(config: &Config, config_file: Result<&Path, &str>) -> String {
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
    // As the user started it (`./target/release/switchyard`), so the lines paste as they are.
    let exe = std::env::args()
        .next()
        .filter(|a| !a.is_empty() && !a.contains(char::is_whitespace))
        .unwrap_or_else(|| "switchyard".to_string());
    let rollout = format!(
        "{exe} rollout start web --to green --steps 10,50,100 --every 10s --analysis-interval 5s --min-requests 10 --check http://{GREEN}/version"
    );
    let api = format!("http://{admin}/api/v1");
    let post = format!(
        "curl -s -X POST {api}/routes/web/rollout -d '{{\"to\": \"green\", \"steps\": [10, 50, 100], \"step_interval\": \"10s\", \"analysis\": {{\"interval\": \"5s\", \"min_requests\": 10}}}}'"
    );
    // Without a file naming the admin API the CLI cannot find the demo: curl only then.
    let (setup, start, status) = match config_file {
        Ok(file) => (
            format!(
                "  export SWITCHYARD_CONFIG={}   # the CLI's --config: the demo's admin API\n",
                file.display()
            ),
            rollout,
            format!("{exe} rollout status web"),
        ),
        Err(why) => (
            format!(
                "  # (curl only: the CLI needs a config file, and none could be written: {why})\n"
            ),
            post.clone(),
            format!("curl -s {api}/routes/web/rollout"),
        ),
    };
    let with_curl = if config_file.is_ok() {
        format!("  # the same with curl: {post}\n")
    } else {
        String::new()
    };
    format!(
        "\
Switchyard demo
  load balancer  http://{lb}/   route `web`: blue 100, green 0
  blue backend   http://{BLUE}/   (v1)
  green backend  http://{GREEN}/   (v2)   both answer GET /version and POST /chaos

Try:
  curl -i http://{lb}/                         # X-Switchyard-Upstream says who answered
  while true; do curl -s http://{lb}/; done    # load: leave it running in a second terminal

A rollout to green that succeeds (10%, 50%, 100%, each step judged on 5 s windows):
{setup}  {start}
  {status}   # step, weight, verdicts; `status` shows everything
{with_curl}
One that rolls back on its own (blue back to 100, green fails 30% of its answers):
  curl -s -X PUT {api}/routes/web/split -d '{{\"blue\": 100, \"green\": 0}}'
  curl -s -X POST 'http://{GREEN}/chaos?errors=30'   # &delay=300ms: slower too
  {start}
  {status}   # rolled_back, and why
  curl -s {api}/events   # what happened, in order
  curl -s -X POST http://{GREEN}/chaos   # green healthy again

By hand (metrics at http://{metrics}/metrics):
  curl -s -X PUT {api}/routes/web/split -d '{{\"blue\": 50, \"green\": 50}}'
  curl -s -X PATCH {api}/upstreams/green/backends/{GREEN} -d '{{\"state\": \"draining\"}}'
  curl -s {api}/upstreams/green
  curl -s http://{metrics}/metrics | grep switchyard_requests_total

Stop with Ctrl+C (in-flight requests finish first).
"
    )
}

/// What `/chaos` set: the share of answers that become 500 and the latency added to each.
#[derive(Default)]
struct Chaos {
    errors_percent: AtomicU64,
    delay_ms: AtomicU64,
    /// Answers served, to spread the failures evenly (every 10th of 10%), not in bursts.
    served: AtomicU64,
}

/// A backend that names itself: `hello from blue (v1)`; `/healthz` answers `ok`.
struct DemoBackend {
    name: &'static str,
    version: &'static str,
    chaos: Chaos,
}

#[async_trait]
impl ServeHttp for DemoBackend {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let request = session.req_header();
        let (status, body) = match request.uri.path() {
            // Health checks and /version stay healthy under chaos: the rollout's analysis of
            // real traffic is what the demo shows failing, not the health checker.
            "/healthz" => (200, "ok\n".to_string()),
            "/version" => (
                200,
                format!(
                    "{{\"name\": \"{}\", \"version\": \"{}\"}}\n",
                    self.name, self.version
                ),
            ),
            "/chaos" => self.chaos_endpoint(&request.method, request.uri.query()),
            _ => self.answer().await,
        };
        Response::builder()
            .status(status)
            .header("Content-Type", "text/plain; charset=utf-8")
            .header("Content-Length", body.len())
            .header("X-Demo-Backend", self.name)
            .body(body.into_bytes())
            .unwrap_or_default()
    }
}

impl DemoBackend {
    /// The application's answer, made slow or failing as `/chaos` says.
    async fn answer(&self) -> (u16, String) {
        let delay = self.chaos.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let percent = self.chaos.errors_percent.load(Ordering::Relaxed);
        let k = self.chaos.served.fetch_add(1, Ordering::Relaxed) + 1;
        if (k * percent) % 100 < percent {
            let body = format!(
                "{} ({}) failed on purpose (/chaos)\n",
                self.name, self.version
            );
            return (500, body);
        }
        (
            200,
            format!("hello from {} ({})\n", self.name, self.version),
        )
    }

    /// `POST /chaos?errors=P&delay=D` sets both (one left out is 0: a bare POST heals);
    /// `GET /chaos` tells what is set.
    fn chaos_endpoint(&self, method: &Method, query: Option<&str>) -> (u16, String) {
        if *method == Method::POST {
            match parse_chaos(query) {
                Ok((percent, delay)) => {
                    self.chaos.errors_percent.store(percent, Ordering::Relaxed);
                    // At most MAX_DELAY, so the millis fit.
                    self.chaos
                        .delay_ms
                        .store(delay.as_millis() as u64, Ordering::Relaxed);
                }
                Err(why) => return (400, format!("/chaos: {why}\n")),
            }
        } else if *method != Method::GET {
            return (405, "/chaos: use POST to set, GET to read\n".to_string());
        }
        let percent = self.chaos.errors_percent.load(Ordering::Relaxed);
        let delay = self.chaos.delay_ms.load(Ordering::Relaxed);
        (
            200,
            format!("{}: errors={percent}% delay={delay}ms\n", self.name),
        )
    }
}

/// `errors` (a whole percentage, 0 to 100) and `delay` (a duration such as `300ms`, up to
/// [`MAX_DELAY`]); both optional, 0 when left out.
fn parse_chaos(query: Option<&str>) -> Result<(u64, Duration), String> {
    let (mut percent, mut delay) = (0, Duration::ZERO);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "errors" => {
                percent = value
                    .parse::<u64>()
                    .ok()
                    .filter(|p| *p <= 100)
                    .ok_or_else(|| {
                        format!("errors: {value:?} is not a whole percentage from 0 to 100")
                    })?
            }
            "delay" => {
                delay = parse_duration(value).map_err(|e| format!("delay: {e}"))?;
                if delay > MAX_DELAY {
                    return Err(format!("delay: {value} is over the limit of 30s"));
                }
            }
            other => {
                // Cut short: the message is for a person, not an echo of the query.
                let other: String = other.chars().take(40).collect();
                return Err(format!(
                    "{other}: unknown parameter; expected errors (percent of answers that become 500) and/or delay (e.g. 300ms)"
                ));
            }
        }
    }
    Ok((percent, delay))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chaos_takes_errors_and_delay_and_names_a_bad_parameter() {
        assert_eq!(
            parse_chaos(Some("errors=30&delay=300ms")),
            Ok((30, Duration::from_millis(300)))
        );
        assert_eq!(parse_chaos(None), Ok((0, Duration::ZERO)));
        assert_eq!(
            parse_chaos(Some("errors=0&delay=0ms")),
            Ok((0, Duration::ZERO))
        );
        for (query, named) in [
            ("errors=101", "errors:"),
            ("errors=x", "errors:"),
            ("delay=3", "delay:"),
            ("delay=31s", "delay:"),
            ("error=5", "error: unknown"),
        ] {
            match parse_chaos(Some(query)) {
                Err(why) => assert!(why.starts_with(named), "{query}: {why}"),
                Ok(set) => panic!("{query} accepted as {set:?}"),
            }
        }
    }

    #[test]
    fn the_written_config_is_the_demo_with_its_upgrade_socket() {
        let socket = Path::new("/run/user/1000/switchyard-demo/upgrade.sock");
        let text = effective_config(socket).expect("utf-8 path");
        let config = Config::from_yaml(&text).expect("valid");
        assert_eq!(config.server.upgrade_socket, socket);
        assert_eq!(
            config.admin.map(|a| a.address.to_string()),
            Some("127.0.0.1:9000".to_string())
        );
    }
}
