//! Prometheus metrics. Counters on the request path are label handles resolved on their first
//! use (per backend: when a snapshot is built), so counting is an atomic add with no lock and
//! no label lookup, and a route → upstream → backend → status series exists only once it has
//! counted something. Gauges that mirror state (health, in-flight, weights, splits) are
//! filled from the current snapshot at scrape time, so they can never drift from it.
//! The rollout analysis' per-pair counters ([`PairStats`]) are not Prometheus metrics, but
//! their registry sits here too: every snapshot build already gets the metrics, and resolves
//! each route's pairs at the same time as its metric handles.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::rollout::{Rollout, RolloutState, Verdict};
use crate::route::Routing;
use crate::snapshot::{BackendState, Upstream};
use crate::stats::{PairRegistry, PairStats};
use crate::Snapshot;

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_errors: IntCounterVec,
    health_checks: IntCounterVec,
    healthy: IntGaugeVec,
    in_flight: IntGaugeVec,
    weight: IntGaugeVec,
    backend_state: IntGaugeVec,
    split_weight: IntGaugeVec,
    reloads: IntCounterVec,
    last_reload: Gauge,
    rollout_weight: GaugeVec,
    rollout_state: IntGaugeVec,
    rollout_paused_by_failure: IntGaugeVec,
    rollout_windows: IntCounterVec,
    routing: IntCounterVec,
    /// Serialises scrapes: gauges are reset and refilled for each.
    scrape: Mutex<()>,
    /// Rollout analysis counters by route and upstream name, kept for the process's life.
    pair_stats: PairRegistry,
}

/// Why a request to a backend failed, as the `kind` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Connect,
    Timeout,
    Reset,
    Other,
}

impl ErrorKind {
    const ALL: [ErrorKind; 4] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Reset,
        ErrorKind::Other,
    ];

    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::Other => "other",
        }
    }
}

/// Per-backend error counters, one per kind.
#[derive(Clone)]
pub struct ErrorCounters([IntCounter; 4]);

impl ErrorCounters {
    pub fn count(&self, kind: ErrorKind) {
        self.0[kind as usize].inc();
    }
}

/// Distinct statuses of one route, upstream and backend that get a handle of their own; a
/// backend answering more kinds than this counts the rest through the label lookup.
const STATUS_SLOTS: usize = 16;

/// `switchyard_requests_total` of one route, upstream and backend, by status: an open-address
/// table whose slot for a status is filled on its first use, so that counting is a probe and
/// an atomic add. 16 slots (384 bytes) rather than one per possible code (500 slots, 8 KB):
/// a backend answers a handful of codes, and the table is only made once it answers at all.
struct StatusCounters([OnceLock<(u16, IntCounter)>; STATUS_SLOTS]);

impl StatusCounters {
    fn count(&self, status: u16, handle: impl Fn() -> IntCounter) {
        let start = usize::from(status) % STATUS_SLOTS;
        for k in 0..STATUS_SLOTS {
            let slot = &self.0[(start + k) % STATUS_SLOTS];
            // Whoever fills an empty slot first owns it; a slot filled with another status
            // sends the probe on.
            let (owner, counter) = slot.get_or_init(|| (status, handle()));
            if *owner == status {
                counter.inc();
                return;
            }
        }
        handle().inc();
    }
}

/// The handles of one route and one upstream it splits to, made on the pair's first request.
struct PairMetrics {
    duration: Histogram,
    /// By backend index, each made on the backend's first request on this route.
    by_backend: Box<[OnceLock<Box<StatusCounters>>]>,
}

/// Metric handles of one route, for each upstream it splits to. Nothing is made for a pair
/// until it carries a request, so memory and the scrape grow with the route → upstream →
/// backend combinations in use, not with every possible one; an unused pair costs one empty
/// slot. The prometheus series a handle points to outlives the handle: a snapshot built after
/// a change makes new handles to the same series, whose counts go on.
pub struct RouteMetrics {
    route: Arc<str>,
    requests: IntCounterVec,
    duration: HistogramVec,
    /// Upstream indices of the route's split, sorted, and the handles of each.
    upstreams: Box<[usize]>,
    pairs: Box<[OnceLock<PairMetrics>]>,
    /// The analysis counters of each upstream in `upstreams`, resolved when the snapshot was
    /// built: recording is a search of the few split indices and atomic adds, never a
    /// registry lookup.
    stats: Box<[Arc<PairStats>]>,
    /// `switchyard_route_routing_total`, by [`Routing`].
    routing: [IntCounter; Routing::ALL.len()],
}

impl RouteMetrics {
    pub(crate) fn routed(&self, how: Routing) {
        self.routing[how as usize].inc();
    }

    /// Requests routed so far, by how (for the admin API).
    pub(crate) fn routing_counts(&self) -> [(Routing, u64); Routing::ALL.len()] {
        Routing::ALL.map(|how| (how, self.routing[how as usize].get()))
    }

    /// Counts one answered request of this route and its duration.
    pub(crate) fn count(
        &self,
        index: usize,
        upstream: &Upstream,
        backend: usize,
        status: u16,
        seconds: f64,
    ) {
        let (Ok(at), Some(address)) = (
            self.upstreams.binary_search(&index),
            upstream.backends.get(backend).map(|b| b.live.address),
        ) else {
            return;
        };
        let slot = &self.pairs[at];
        let pair = slot.get_or_init(|| PairMetrics {
            duration: self
                .duration
                .with_label_values(&[&*self.route, &*upstream.name]),
            by_backend: upstream.backends.iter().map(|_| OnceLock::new()).collect(),
        });
        pair.duration.observe(seconds);
        let Some(statuses) = pair.by_backend.get(backend) else {
            return;
        };
        statuses
            .get_or_init(|| Box::new(StatusCounters(std::array::from_fn(|_| OnceLock::new()))))
            .count(status, || {
                self.requests.with_label_values(&[
                    &*self.route,
                    &*upstream.name,
                    &address.to_string(),
                    &status.to_string(),
                ])
            });
    }

    /// Counts one answered request of this route to upstream `index` in its analysis stats.
    pub(crate) fn record(&self, index: usize, status: u16, latency: Duration, failed: bool) {
        if let Ok(at) = self.upstreams.binary_search(&index) {
            self.stats[at].record(status, latency, failed);
        }
    }
}

fn must<T>(what: &str, r: prometheus::Result<T>) -> T {
    // Metric definitions are constants of this module: a failure is a bug, caught by tests.
    r.unwrap_or_else(|e| panic!("metric {what}: {e}"))
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let vec = must(name, IntCounterVec::new(Opts::new(name, help), labels));
            must(name, registry.register(Box::new(vec.clone())));
            vec
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let vec = must(name, IntGaugeVec::new(Opts::new(name, help), labels));
            must(name, registry.register(Box::new(vec.clone())));
            vec
        };
        let requests = counter(
            "switchyard_requests_total",
            "Requests answered, by route, upstream, backend and HTTP status.",
            &["route", "upstream", "backend", "status"],
        );
        let upstream_errors = counter(
            "switchyard_upstream_errors_total",
            "Failed attempts to get an answer from a backend, by kind.",
            &["upstream", "backend", "kind"],
        );
        let health_checks = counter(
            "switchyard_health_checks_total",
            "Active health checks run, by result.",
            &["upstream", "backend", "result"],
        );
        let reloads = counter(
            "switchyard_config_reloads_total",
            "Config reloads (SIGHUP or POST /api/v1/reload), by result.",
            &["result"],
        );
        let healthy = gauge(
            "switchyard_backend_healthy",
            "1 if the backend passes its health checks (or has none).",
            &["upstream", "backend"],
        );
        let in_flight = gauge(
            "switchyard_backend_in_flight",
            "Requests of this process in flight to the backend.",
            &["upstream", "backend"],
        );
        let weight = gauge(
            "switchyard_backend_weight",
            "The backend's weight (0 takes no new traffic).",
            &["upstream", "backend"],
        );
        let backend_state = gauge(
            "switchyard_backend_state",
            "1 for the state the operator set the backend to (active, draining, disabled, retiring), 0 for the others.",
            &["upstream", "backend", "state"],
        );
        let split_weight = gauge(
            "switchyard_route_split_weight",
            "The route's split weight for the upstream.",
            &["route", "upstream"],
        );
        let rollout_state = gauge(
            "switchyard_rollout_state",
            "1 for the state the route's current or last rollout is in.",
            &["route", "state"],
        );
        let rollout_paused_by_failure = gauge(
            "switchyard_rollout_paused_by_failure",
            "1 while the route's rollout is paused because it failed (on_failure: pause), 0 otherwise.",
            &["route"],
        );
        let rollout_windows = counter(
            "switchyard_rollout_windows_total",
            "Analysis windows judged by rollouts, by verdict.",
            &["route", "verdict"],
        );
        let routing = counter(
            "switchyard_route_routing_total",
            "Requests a route sent to an upstream, by how the upstream was chosen: split (the smooth split), sticky (by the sticky key), sticky_missing (no key: the smooth split), cookie_issued (a new sticky cookie), rollout_match (a rollout's match step).",
            &["route", "routing"],
        );
        let rollout_weight = must(
            "switchyard_rollout_weight",
            GaugeVec::new(
                Opts::new(
                    "switchyard_rollout_weight",
                    "The new version's share in percent of the two upstreams' weight in the route's rollout.",
                ),
                &["route", "from", "to"],
            ),
        );
        must(
            "rollout_weight",
            registry.register(Box::new(rollout_weight.clone())),
        );
        let duration = must(
            "switchyard_request_duration_seconds",
            HistogramVec::new(
                HistogramOpts::new(
                    "switchyard_request_duration_seconds",
                    "Time from request start to the end of the response, by route and upstream.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
                &["route", "upstream"],
            ),
        );
        must("duration", registry.register(Box::new(duration.clone())));
        let last_reload = must(
            "switchyard_config_last_reload_timestamp_seconds",
            Gauge::new(
                "switchyard_config_last_reload_timestamp_seconds",
                "Unix time of the last successful config load (start or reload).",
            ),
        );
        must(
            "last_reload",
            registry.register(Box::new(last_reload.clone())),
        );
        let build_info = must(
            "switchyard_build_info",
            IntGaugeVec::new(
                Opts::new("switchyard_build_info", "Always 1; the version is a label."),
                &["version"],
            ),
        );
        must(
            "build_info",
            registry.register(Box::new(build_info.clone())),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let metrics = Metrics {
            registry,
            requests,
            duration,
            upstream_errors,
            health_checks,
            healthy,
            in_flight,
            weight,
            backend_state,
            split_weight,
            reloads,
            last_reload,
            rollout_weight,
            rollout_state,
            rollout_paused_by_failure,
            rollout_windows,
            routing,
            scrape: Mutex::new(()),
            pair_stats: PairRegistry::default(),
        };
        for result in ["success", "failure"] {
            metrics.reloads.with_label_values(&[result]);
        }
        metrics.loaded();
        metrics
    }

    /// Adds metrics owned elsewhere (the proxy's connection counters) to the same scrape.
    pub fn register(&self, name: &str, collector: Box<dyn prometheus::core::Collector>) {
        must(name, self.registry.register(collector));
    }

    /// Empty handles for `route`, which splits to the upstreams of these indices and names,
    /// with each pair's analysis stats (which go on from where they were).
    pub(crate) fn route<'a>(
        &self,
        route: Arc<str>,
        upstreams: impl Iterator<Item = (usize, &'a str)>,
    ) -> RouteMetrics {
        let mut upstreams: Vec<(usize, &str)> = upstreams.collect();
        upstreams.sort_unstable_by_key(|&(index, _)| index);
        upstreams.dedup_by_key(|&mut (index, _)| index);
        RouteMetrics {
            routing: Routing::ALL
                .map(|how| self.routing.with_label_values(&[&route, how.as_str()])),
            stats: upstreams
                .iter()
                .map(|&(_, name)| self.pair_stats(&route, name))
                .collect(),
            route,
            requests: self.requests.clone(),
            duration: self.duration.clone(),
            pairs: upstreams.iter().map(|_| OnceLock::new()).collect(),
            upstreams: upstreams.iter().map(|&(index, _)| index).collect(),
        }
    }

    /// The rollout analysis counters of `route` → `upstream`, made on first use (also for a
    /// pair no split has yet). Takes a lock: for snapshot builds and the rollout engine, not
    /// for requests, which record through their route's resolved handles.
    pub fn pair_stats(&self, route: &str, upstream: &str) -> Arc<PairStats> {
        self.pair_stats.pair(route, upstream)
    }

    /// A request that got no further than its route (404, 503): counted on the slow path.
    pub fn count_unrouted(&self, route: &str, status: u16) {
        self.requests
            .with_label_values(&[route, "", "", &status.to_string()])
            .inc();
    }

    pub fn error_counters(&self, upstream: &str, backend: &str) -> ErrorCounters {
        ErrorCounters(ErrorKind::ALL.map(|k| {
            self.upstream_errors
                .with_label_values(&[upstream, backend, k.as_str()])
        }))
    }

    /// Success and failure counters of one backend's health checks.
    pub fn health_check_counters(&self, upstream: &str, backend: &str) -> [IntCounter; 2] {
        ["success", "failure"].map(|r| {
            self.health_checks
                .with_label_values(&[upstream, backend, r])
        })
    }

    /// A config was loaded: at start or by a successful reload.
    pub fn loaded(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        self.last_reload.set(now);
    }

    pub fn reload_succeeded(&self) {
        self.reloads.with_label_values(&["success"]).inc();
        self.loaded();
    }

    pub fn reload_failed(&self) {
        self.reloads.with_label_values(&["failure"]).inc();
    }

    /// Counts one judged analysis window of the route's rollout.
    pub fn count_window(&self, route: &str, verdict: Verdict) {
        self.rollout_windows
            .with_label_values(&[route, verdict.as_str()])
            .inc();
    }

    /// The text exposition of every metric, gauges taken from `snapshot` and `rollouts`.
    pub fn render(&self, snapshot: &Snapshot, rollouts: &[Rollout]) -> Vec<u8> {
        let _scrape = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        for gauge in [
            &self.healthy,
            &self.in_flight,
            &self.weight,
            &self.backend_state,
            &self.split_weight,
            &self.rollout_state,
            &self.rollout_paused_by_failure,
        ] {
            gauge.reset();
        }
        self.rollout_weight.reset();
        for rollout in rollouts {
            let route = rollout.route.as_str();
            self.rollout_weight
                .with_label_values(&[route, &rollout.from, &rollout.to])
                .set(rollout.shown_weight());
            for state in RolloutState::ALL {
                self.rollout_state
                    .with_label_values(&[route, state.as_str()])
                    .set(i64::from(state == rollout.state));
            }
            // A pause by failure and one by an operator look alike in the state: this tells
            // the one an alert should page for.
            self.rollout_paused_by_failure
                .with_label_values(&[route])
                .set(i64::from(rollout.held_by_failure()));
            // Every verdict shows from the start, at 0 until it happens.
            for verdict in Verdict::ALL {
                self.rollout_windows
                    .with_label_values(&[route, verdict.as_str()]);
            }
        }
        for upstream in &snapshot.upstreams {
            for backend in &upstream.backends {
                let address = backend.live.address.to_string();
                let labels = [&*upstream.name, address.as_str()];
                let set = |g: &IntGaugeVec, v: i64| g.with_label_values(&labels).set(v);
                set(&self.healthy, i64::from(backend.live.is_healthy()));
                set(&self.in_flight, backend.live.in_flight() as i64);
                set(&self.weight, i64::from(backend.weight));
                for state in BackendState::NAMES {
                    self.backend_state
                        .with_label_values(&[&*upstream.name, address.as_str(), state])
                        .set(i64::from(state == backend.state.as_str()));
                }
            }
        }
        for route in &snapshot.routes {
            for &(upstream, weight) in &route.split {
                self.split_weight
                    .with_label_values(&[&*route.name, &*snapshot.upstreams[upstream].name])
                    .set(i64::from(weight));
            }
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::error!("cannot encode metrics: {e}");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
