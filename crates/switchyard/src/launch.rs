//! Assembles the Pingora server from a validated config: pool, health checks, proxy
//! listeners and the shutdown drain, and runs it until a signal ends it.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use http::HeaderValue;
use log::info;
use pingora::apps::HttpServerOptions;
use pingora::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora::protocols::http::v2::server::H2Options;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use pingora::services::ServiceWithDependents;
use pingora::ErrorType;
use switchyard_access_log::AccessLog;
use switchyard_admin::{AdminApi, Control, MetricsEndpoint, StatsSampler};
use switchyard_config::{ClientLimits, Config, Listener, ListenerKind};
use switchyard_pool::health::HealthChecks;
use switchyard_pool::ramp::SlowStart;
use switchyard_pool::retire::Retirement;
use switchyard_pool::{Draft, Metrics, Pool, Source};
use switchyard_proxy::{
    accepted_tcp, ClientApp, ClientCounters, Connections, ListenerFront, Proxy, TlsTerminator,
    Watched,
};
use switchyard_rollout::{Engine, HttpProber, RolloutService};

use crate::signals::{Drain, Signals};
use crate::systemd::Notify;

/// Services that must be up before the first health checks run (the demo's backends).
pub type Prerequisites = Vec<Box<dyn ServiceWithDependents>>;

/// Runs the load balancer until SIGTERM, SIGINT or SIGQUIT has ended it. `config_path` is
/// the file a reload re-reads (`None` for the embedded demo config).
pub fn run(
    config: Config,
    config_path: Option<PathBuf>,
    upgrade: bool,
    prerequisites: Prerequisites,
) -> Result<(), String> {
    crate::signals::ignore_until_listening();
    // Before Pingora binds it (`--upgrade`) or will connect to it (SIGQUIT).
    crate::upgrade_socket::prepare(&config.server.upgrade_socket, upgrade)?;
    if !upgrade {
        ensure_sockets_free(&config)?;
    }
    let admin_address = config.admin.as_ref().map(|a| a.address);
    let metrics_address = config.metrics.as_ref().map(|m| m.address);
    let threads = config.server.threads;
    let server_conf = ServerConf {
        // Each proxy worker is a Pingora service of its own with one thread (see `workers`),
        // and what else runs (health checks, admin API, metrics, rollouts) needs no more. A
        // thread's runtime is tokio's current-thread one: no work stealing, no cross-thread
        // wake-ups. Pingora sizes each proxy's upstream keep-alive pool and shutdown
        // notifier by this count too: per worker, as they now are.
        threads: 1,
        work_stealing: false,
        upgrade_sock: config.server.upgrade_socket.display().to_string(),
        // Our drain ends the process as soon as in-flight requests are done, and at the
        // latest when server.grace_period is over; Pingora's own grace period is only the
        // upper bound behind it, a second later so that ours is always the one that ends it
        // (its log line saying so is withheld, see `logging`).
        grace_period_seconds: Some(pingora_grace_period(config.server.grace_period)),
        graceful_shutdown_timeout_seconds: Some(1),
        // Pingora counts attempts, not retries, and shares them between our connect retry
        // (once, on another backend; see `fail_to_connect`) and its own retry of a request
        // that failed on a reused, stale backend connection: first try plus one of each.
        max_retries: 3,
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    // Every certificate and key file read and checked (the upstreams' CA files too), and the
    // open-file limit raised, before `bootstrap`: a process started with `--upgrade` takes the
    // listening sockets there, and the old one goes once they are sent; failing after that
    // would leave no one listening. (Pingora's own TLS settings would panic on a bad file.)
    let metrics = Arc::new(Metrics::new());
    let tls_fronts = Arc::new(
        switchyard_tls::TlsFronts::load(&config, &metrics)
            .map_err(|problems| problems.join("\n"))?,
    );
    let upstream_cas =
        switchyard_pool::load_upstream_tls(&config).map_err(|problems| problems.join("\n"))?;
    let store = crate::store::open(&config)?;
    // The admin token file too (`Control::new` reads it again below, where it must not fail).
    if let Some(file) = config.admin.as_ref().and_then(|a| a.token_file.as_deref()) {
        switchyard_admin::Token::read(file)?;
    }
    // The access log's file too: one that cannot be opened is a start-up error, not a
    // process that serves without the log its operator asked for.
    let access_log = AccessLog::start(config.access_log.as_ref(), &metrics)?;
    if let Some(path) = &config.server.pid_file {
        crate::pid_file::check(path)?;
    }
    crate::limits::raise_open_files(config.server.clients.max_connections)?;
    check_system_roots()?;
    if upgrade {
        // Read after `bootstrap` to find the inherited sockets (see `workers`): a process
        // that could not would find out only once the old one had sent them.
        std::fs::read_dir("/proc/self/fd")
            .map_err(|e| format!("/proc/self/fd: cannot list this process's descriptors: {e}"))?;
    }
    let mut server = Server::new_with_opt_and_conf(opt, server_conf);
    server.bootstrap();
    // The listening sockets `bootstrap` received from the previous process, per address: each
    // is served again (see `workers`).
    let addresses: Vec<_> = config.listeners.iter().map(|l| l.address).collect();
    let inherited = if upgrade {
        // Not a reason to exit: the old process has sent its sockets and is going.
        crate::workers::inherited_sockets(&addresses).unwrap_or_else(|e| {
            log::warn!("{e}: serving the inherited sockets found so far");
            Default::default()
        })
    } else {
        Default::default()
    };
    let others: Vec<String> = admin_address
        .iter()
        .chain(metrics_address.iter())
        .map(|a| a.to_string())
        .collect();
    let plan = crate::workers::plan(&addresses, threads, &inherited, &others);
    if let Some(problem) = &plan.too_many {
        log::warn!("{problem}");
    }
    if upgrade {
        crate::systemd::tell(&format!("MAINPID={}\n", std::process::id()));
    }

    let listeners = config.listeners.clone();
    let upgrade_socket = config.server.upgrade_socket.clone();
    let grace_period = config.server.grace_period;
    let pid_file = config.server.pid_file.clone();
    let client_limits = config.server.clients;
    // Where the runtime state goes for the next process when there is no state file.
    let handover = PathBuf::from(format!(
        "{}.state.json",
        config.server.upgrade_socket.display()
    ));
    if !upgrade {
        // Left by a SIGQUIT that had no successor: stale for a process that did not take over.
        let _ = std::fs::remove_file(&handover);
        switchyard_pool::retire::discard_keys(&handover);
    }
    let handed = upgrade.then_some(handover.as_path());
    let pool = Arc::new(match store {
        Some((store, name)) => {
            Pool::with_store(config, upstream_cas, metrics, handed, store, name)?
        }
        None => Pool::new(config, upstream_cas, metrics, handed)?,
    });
    if upgrade {
        // `bootstrap` above has received the listening sockets from the old process.
        pool.events().record(Draft::new(
            Source::Upgrade,
            "took_over",
            "took the listening sockets over from the previous process (binary upgrade)",
        ));
    }
    let control = Arc::new(Control::new(
        Arc::clone(&pool),
        Arc::clone(&tls_fronts),
        Arc::clone(&access_log),
        config_path,
    )?);

    let closing = Arc::new(AtomicBool::new(false));
    let prerequisites = server.add_services(prerequisites);
    let health = server.add_service(background_service(
        "health checks",
        HealthChecks::new(Arc::clone(&pool)),
    ));
    for prerequisite in &prerequisites {
        health.add_dependency(prerequisite);
    }

    let counters = Arc::new(ClientCounters::new(pool.metrics()));
    let proxy = Proxy::new(
        Arc::clone(&pool),
        Arc::clone(&closing),
        client_limits,
        Arc::clone(&counters),
        Arc::clone(&access_log),
    );
    let active = proxy.active_requests();
    let connections = Arc::new(Connections::default());
    // One service per listener and worker thread, each with its own app and proxy (which
    // knows whether its requests came over TLS) and its own sockets; the connection counters
    // are shared. Services are started in parallel, so `ready` follows every one of them.
    let mut listener_services = Vec::new();
    for (listener, workers) in listeners.iter().zip(&plan.workers) {
        let front = ListenerFront {
            tls: tls_terminator(listener, &tls_fronts)?,
            h2c: matches!(listener.kind, ListenerKind::Plain { h2c: true, .. }),
            redirect_https: matches!(
                listener.kind,
                ListenerKind::Plain {
                    redirect_https: true,
                    ..
                }
            ),
        };
        for (index, worker) in workers.iter().enumerate() {
            let service = worker_service(
                listener,
                index,
                worker,
                ClientApp::new(
                    http_proxy(&proxy, &front, &server, &client_limits),
                    front.clone(),
                    client_limits,
                    Arc::clone(&counters),
                    Arc::clone(&closing),
                    Arc::clone(&connections),
                    Arc::clone(&access_log),
                ),
            );
            let service = server.add_service(Watched::new(service, Arc::clone(&connections)));
            service.add_dependency(&health);
            listener_services.push(service);
        }
    }
    let ready = server.add_service(background_service("systemd notify", Notify));
    for service in &listener_services {
        ready.add_dependency(service);
    }
    if let Some(path) = pid_file {
        let written = server.add_service(background_service(
            "pid file",
            crate::pid_file::WritePidFile(path),
        ));
        for service in &listener_services {
            written.add_dependency(service);
        }
    }

    if admin_address.is_none() {
        log::warn!(
            "no admin section in the config: no admin API, so splits, drains and rollouts cannot change while running (add admin: {{address: 127.0.0.1:9000}})"
        );
    }
    if let Some(address) = admin_address {
        // Reads the rollout analysis' counters once a second for `GET /api/v1/stats` and the
        // status page; without an admin API nobody would ask.
        let stats = StatsSampler::new(Arc::clone(&pool));
        server.add_service(background_service("traffic stats", stats.clone()));
        let mut admin = Service::new(
            "admin API".into(),
            AdminApi::new(Arc::clone(&control), Arc::clone(&closing), stats),
        );
        admin.add_tcp(&address.to_string());
        server.add_service(admin);
        info!("admin API on http://{address}/api/v1/, status page on http://{address}/");
    }
    if let Some(address) = metrics_address {
        let mut metrics = Service::new("metrics".into(), MetricsEndpoint::new(Arc::clone(&pool)));
        metrics.add_tcp(&address.to_string());
        server.add_service(metrics);
        info!("metrics on http://{address}/metrics");
    }
    server.add_service(background_service(
        "drain",
        Drain::new(active, connections, grace_period, Arc::clone(&access_log)),
    ));
    server.add_service(background_service(
        "slow start",
        SlowStart::new(Arc::clone(&pool)),
    ));
    server.add_service(background_service(
        "retiring backends",
        Retirement::new(Arc::clone(&pool)),
    ));
    server.add_service(background_service(
        "state store",
        switchyard_pool::StoreFollower::new(Arc::clone(&pool)),
    ));
    let engine = Arc::new(Engine::new(
        Arc::clone(&pool),
        Arc::new(HttpProber::default()),
    ));
    server.add_service(background_service(
        "rollouts",
        RolloutService(Arc::clone(&engine)),
    ));

    for listener in &listeners {
        let scheme = if listener.tls().is_some() {
            "https"
        } else {
            "http"
        };
        info!(
            "proxy listening on {scheme}://{} once health checks have run",
            listener.address
        );
    }
    let too_many = plan.too_many.clone();
    let reload = move || {
        // Off the signal task: a reload that waits (for a file on a slow disk) must not hold
        // up SIGTERM and SIGQUIT. The outcome is logged by the reload itself.
        let control = Arc::clone(&control);
        let started = std::thread::Builder::new()
            .name("reload".into())
            .spawn(move || {
                let _ = control.reload();
            });
        if let Err(e) = started {
            log::error!("SIGHUP: cannot start the reload: {e}");
        }
    };
    let hand_over = move || {
        // Before the state goes: two processes must never drive one rollout, and the state
        // handed over must be the engine's last word. The pool's hand-over stops the ending
        // of retiring windows itself, for the same reason.
        engine.stop();
        if let Err(e) = pool.hand_over(&handover) {
            log::error!("runtime state not handed over: {e}");
        }
    };
    // Pingora's own exit; ours (the drain's) removes the pid file itself.
    let _exit = RemovePidFileAtExit;
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            closing,
            on_hangup: Box::new(reload),
            access_log,
            may_upgrade: Box::new(move || {
                // Pingora would send more sockets than the new process can take.
                if let Some(problem) = &too_many {
                    return Err(problem.clone());
                }
                crate::upgrade_socket::check_peer(&upgrade_socket)
            }),
            on_upgrade: Box::new(hand_over),
        }),
    });
    Ok(())
}

/// One listener's Pingora proxy for one worker: its own upstream connection pool.
fn http_proxy(
    proxy: &Proxy,
    front: &ListenerFront,
    server: &Server,
    limits: &ClientLimits,
) -> HttpProxy<Proxy> {
    let mut http = HttpProxy::new(
        proxy.on_listener(front.clone()),
        Arc::clone(&server.configuration),
    );
    http.handle_init_modules();
    http.h2_options = Some(h2_options(limits));
    http.server_options = Some(h2_server_options(limits));
    http
}

/// The service of one worker of `listener`: its threads (one, unless the listener has fewer
/// sockets than threads), accepting on its sockets.
fn worker_service(
    listener: &Listener,
    index: usize,
    worker: &crate::workers::Worker,
    clients: ClientApp<HttpProxy<Proxy>>,
) -> Service<ClientApp<HttpProxy<Proxy>>> {
    let mut service = Service::new(
        format!("proxy {} worker {index}", listener.address),
        clients,
    );
    service.threads = Some(worker.threads);
    let mut options = TcpSocketOptions::default();
    options.so_reuseport = Some(true);
    for key in &worker.keys {
        // No user-space read buffer (Pingora's default of 64 KiB stays with every connection,
        // idle ones too): the client stream reads each request head itself. The five-upgrade
        // test's losses once put down to its absence (3 of 29 runs, against 0 of 8 with one:
        // no real difference) came before the drain stopped exiting while a just-accepted
        // connection's task had not run; without a buffer it now passes 20 runs of 20. A TLS
        // listener is a TCP listener to Pingora: the connection app runs the handshake (see
        // `ClientApp`).
        service.add_listener(
            ListenerConfig::tcp(key.clone())
                .tcp_socket_options(options.clone())
                .l4_buffer(L4BufferSettings::default().read(0)),
        );
    }
    service
}

/// Pingora's grace period, whole seconds: a second past ours, so that our drain ends the
/// process first, with its own log line.
fn pingora_grace_period(grace_period: std::time::Duration) -> u64 {
    grace_period.as_secs() + 1
}

/// Removes our pid file however `run` ends.
struct RemovePidFileAtExit;

impl Drop for RemovePidFileAtExit {
    fn drop(&mut self) {
        crate::pid_file::remove_if_ours();
    }
}

/// The hardening limits for HTTP/2 clients: the header list as `max_request_header_bytes`
/// (decoded, as HTTP/1's head is counted raw), Pingora's bounded default of concurrent streams.
fn h2_options(limits: &ClientLimits) -> H2Options {
    let mut options = pingora::protocols::http::v2::server::default_h2_options();
    options
        .max_header_list_size(u32::try_from(limits.max_request_header_bytes).unwrap_or(u32::MAX));
    options
}

/// `h2c` is on for every listener's Pingora server: the connection app hands it only
/// connections already known to be HTTP/2 (ALPN `h2`, or the preface on an h2c listener). An
/// HTTP/2 connection with no stream open is closed after `keepalive_timeout`.
fn h2_server_options(limits: &ClientLimits) -> HttpServerOptions {
    let mut options = HttpServerOptions::default();
    options.h2c = true;
    options.h2_idle_timeout = Some(limits.keepalive_timeout);
    options
}

/// Pingora panics in a service thread when a bind fails; check first for a one-line error.
fn ensure_sockets_free(config: &Config) -> Result<(), String> {
    for (i, listener) in config.listeners.iter().enumerate() {
        ensure_free(&format!("listeners[{i}].address"), listener.address)?;
    }
    if let Some(admin) = &config.admin {
        ensure_free("admin.address", admin.address)?;
    }
    if let Some(metrics) = &config.metrics {
        ensure_free("metrics.address", metrics.address)?;
    }
    Ok(())
}

pub fn ensure_free(field: &str, address: std::net::SocketAddr) -> Result<(), String> {
    std::net::TcpListener::bind(address)
        .map(drop)
        .map_err(|e| format!("{field}: cannot listen on {address}: {e}"))
}

/// Every Pingora connector (one per listener, the health checks', the rollout checks') loads
/// the system's root certificates, honouring `SSL_CERT_FILE` and `SSL_CERT_DIR`, and panics
/// when that fails: loaded once here first, so that a bad variable is a clear error before
/// the sockets are taken, not a panic after.
fn check_system_roots() -> Result<(), String> {
    let mut roots = pingora::tls::RootCertStore::empty();
    pingora::tls::load_platform_certs_incl_env_into_store(&mut roots).map_err(|e| {
        format!(
            "the system's root certificates (SSL_CERT_FILE, SSL_CERT_DIR) cannot be loaded: {e}"
        )
    })
}

/// The live TLS settings of a TLS listener, as the proxy runs handshakes with them; `None`
/// for a plain listener.
fn tls_terminator(
    listener: &Listener,
    fronts: &switchyard_tls::TlsFronts,
) -> Result<Option<Arc<dyn TlsTerminator>>, String> {
    if listener.tls().is_none() {
        return Ok(None);
    }
    // Never serve a TLS listener in cleartext.
    let front = fronts.front(listener.address).ok_or_else(|| {
        format!(
            "listener {}: its TLS settings were not loaded",
            listener.address
        )
    })?;
    Ok(Some(Arc::new(Terminator(front))))
}

struct Terminator(Arc<switchyard_tls::TlsFront>);

#[async_trait::async_trait]
impl TlsTerminator for Terminator {
    async fn handshake(&self, stream: Stream) -> pingora::Result<Stream> {
        // Pingora's TLS runs on the accepted TCP stream itself, which is what a listener
        // gives the app: unboxed, so that the TLS stream forwards its digests.
        let tcp = accepted_tcp(stream, "TLS")
            .ok_or_else(|| pingora::Error::explain(ErrorType::InternalError, "not a TCP stream"))?;
        // Loaded once: a reload during the handshake changes nothing for this connection.
        let state = self.0.current();
        let stream = state.acceptor.tls_handshake(*tcp).await?;
        Ok(Box::new(stream))
    }

    fn hsts(&self) -> Option<HeaderValue> {
        self.0.hsts()
    }
}
