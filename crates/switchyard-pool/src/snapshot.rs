//! One immutable view of routes, upstreams and backends, with everything a request needs
//! precomputed: route order and each route's picking ([`crate::route`]), and each upstream's
//! selector and the way its backends are reached ([`crate::peer`]).

use std::sync::Arc;
use std::time::Duration;

use pingora_core::upstreams::peer::HttpPeer;
use switchyard_config::{Algorithm, Config, HealthCheck, PassiveCheck, RequestKey, Timeouts};

use crate::keys::{KeyFilter, KeyHash};
use crate::live::{BackendLive, InFlight};
use crate::metrics::{ErrorCounters, Metrics};
use crate::peer::{set_timeouts, Connect};
use crate::request::{Key, KeyField, Request};
use crate::retire::Deadline;
use crate::route::{MatchSteps, Pick, Route, RouteSpec};
use crate::select::{ring_divisor, Selector, Shared};
use crate::state::RuntimeState;
use crate::upstream_tls::UpstreamCas;

/// What the operator wants of a backend, apart from its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    Active,
    /// No new requests; requests in flight finish.
    Draining,
    /// No requests at all, as if removed, but kept in the list.
    Disabled,
    /// `ip_hash` and `hash` only: the users it has (keys it was recently picked for) keep
    /// coming until `until`, new keys go elsewhere; then it is draining (see [`crate::retire`]).
    Retiring {
        until: Deadline,
    },
}

impl BackendState {
    /// Every state's [`BackendState::as_str`].
    pub const NAMES: [&'static str; 4] = ["active", "draining", "disabled", "retiring"];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
            BackendState::Disabled => "disabled",
            BackendState::Retiring { .. } => "retiring",
        }
    }

    /// When a retiring backend becomes draining.
    pub fn retiring_until(self) -> Option<Deadline> {
        match self {
            BackendState::Retiring { until } => Some(until),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct Backend {
    pub live: Arc<BackendLive>,
    pub weight: u32,
    pub state: BackendState,
    pub errors: ErrorCounters,
    /// Backends of `ip_hash` and `hash` upstreams: the keys it was recently picked for, kept
    /// across snapshots like `live`.
    pub(crate) keys: Option<Arc<KeyFilter>>,
}

impl Backend {
    /// Whether the operator lets this backend take new requests (health aside).
    pub fn takes_traffic(&self) -> bool {
        self.state == BackendState::Active && self.weight > 0
    }

    fn available(&self) -> bool {
        self.takes_traffic() && self.live.is_healthy()
    }

    /// A retiring backend that can still serve the users it has: it stays on the ring, as
    /// the first owner of their keys only.
    fn keeps_users(&self) -> bool {
        self.state.retiring_until().is_some() && self.weight > 0 && self.live.is_healthy()
    }

    /// The backend is retiring and was recently picked for `key`.
    fn keeps(&self, key: Option<KeyHash>) -> bool {
        match (key, &self.keys) {
            (Some(key), Some(keys)) => self.keeps_users() && keys.knows(key),
            _ => false,
        }
    }
}

/// While a backend ramps, every weight of the upstream is multiplied by this, so that even a
/// weight of 1 can ramp in fine steps.
const RAMP_SCALE: u32 = 100;

/// The share of its weight a backend has now: below 1 while it slow-starts.
fn ramp_share(backend: &Backend, slow_start: Option<Duration>) -> Option<f64> {
    let ramp = slow_start?;
    let in_service = backend.live.in_service_for()?;
    (in_service < ramp && backend.weight > 0).then(|| in_service.as_secs_f64() / ramp.as_secs_f64())
}

/// Every backend's weight now. During a ramp the weights are scaled by [`RAMP_SCALE`] and a
/// ramping backend gets its share of that (at least 1); otherwise they are as configured.
fn current_weights(backends: &[Backend], slow_start: Option<Duration>) -> (Vec<u32>, bool) {
    let shares: Vec<Option<f64>> = backends
        .iter()
        .map(|b| ramp_share(b, slow_start).filter(|_| b.available()))
        .collect();
    if shares.iter().all(Option::is_none) {
        return (backends.iter().map(|b| b.weight).collect(), false);
    }
    let weights = backends
        .iter()
        .zip(&shares)
        .map(|(b, share)| {
            let full = b.weight.saturating_mul(RAMP_SCALE);
            match share {
                Some(share) => ((f64::from(full) * share).ceil() as u32).clamp(1, full),
                None => full,
            }
        })
        .collect();
    (weights, true)
}

pub struct Upstream {
    pub name: Arc<str>,
    pub algorithm: Algorithm,
    pub backends: Vec<Backend>,
    pub health_check: Option<HealthCheck>,
    pub timeouts: Timeouts,
    pub passive: PassiveCheck,
    pub slow_start: Option<Duration>,
    /// `hash`: the key hashed onto the ring.
    pub hash_on: Option<RequestKey>,
    hash_field: Option<KeyField>,
    /// `ip_hash` and `hash`: a retiring backend's default timeout, and how long its keys
    /// filter's generations last.
    pub retire_timeout: Duration,
    /// Protocol and TLS towards the backends.
    pub connect: Arc<Connect>,
    /// By backend index, the peer each request to it gets a copy of; `None` for plain
    /// HTTP/1.1, whose peers are built per request.
    peers: Option<Arc<[HttpPeer]>>,
    /// Every backend's weight when this snapshot was built (lower during slow start).
    weights: Vec<u32>,
    /// Whether a backend was still ramping up when this snapshot was built.
    ramping: bool,
    /// `ip_hash`: what weights are divided by for ring units, from the config file's weights.
    ring_divisor: u32,
    selector: Selector,
    /// Whether a backend could take a new key at build time (active, weight > 0, healthy):
    /// a ring whose backends all retire serves only the users they have.
    takes_new_keys: bool,
    /// Selection state shared by all threads and kept across snapshots.
    selection: Arc<Shared>,
}

impl Upstream {
    // One argument per configured field of the upstream, plus its live state: grouping them
    // into a struct would only rename the same list.
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: Arc<str>,
        algorithm: Algorithm,
        backends: Vec<Backend>,
        health_check: Option<HealthCheck>,
        timeouts: Timeouts,
        passive: PassiveCheck,
        slow_start: Option<Duration>,
        hash_on: Option<RequestKey>,
        retire_timeout: Duration,
        connect: Arc<Connect>,
        selection: Arc<Shared>,
        ring_divisor: u32,
    ) -> Upstream {
        // A ring keeps its retiring backends' points, so that their users' keys still find
        // them first; new keys pass them by (see `Selector::pick`).
        let ring = algorithm.is_hash_ring();
        let takes_new_keys = backends.iter().any(Backend::available);
        let available: Vec<usize> = (0..backends.len())
            .filter(|&i| backends[i].available() || (ring && backends[i].keeps_users()))
            .collect();
        let (weights, ramping) = current_weights(&backends, slow_start);
        if !matches!(algorithm, Algorithm::LeastConnections) {
            // Nothing picks from the last least-connections tree any more; it would keep its
            // backends, removed ones too. (Should this snapshot never go live, the live one's
            // tree takes over again at its next pick.)
            selection.least.release();
        }
        let peers = (!connect.is_plain()).then(|| {
            backends
                .iter()
                .map(|b| connect.peer(b.live.address, &timeouts))
                .collect()
        });
        Upstream {
            selector: Selector::build(algorithm, &backends, &weights, available, ring_divisor),
            ring_divisor,
            takes_new_keys,
            slow_start,
            hash_field: hash_on.as_ref().and_then(KeyField::new),
            hash_on,
            retire_timeout,
            connect,
            peers,
            weights,
            ramping,
            name,
            algorithm,
            backends,
            health_check,
            timeouts,
            passive,
            selection,
        }
    }

    /// Whether a backend's weight was still ramping up (slow start) at build time: then the
    /// selection needs rebuilding as time passes.
    pub fn is_ramping(&self) -> bool {
        self.ramping
    }

    /// The weight backend `i` is picked with now, on its configured scale (less during slow
    /// start, at least 1 then).
    pub fn effective_weight(&self, i: usize) -> u32 {
        let weight = self.weights.get(i).copied().unwrap_or_default();
        if self.ramping {
            weight.div_ceil(RAMP_SCALE)
        } else {
            weight
        }
    }

    /// Whether any backend could take a request when this snapshot was built (on a ring, a
    /// retiring backend counts: it takes its users' requests).
    pub fn has_available(&self) -> bool {
        !self.selector.is_empty()
    }

    /// Whether a backend could take a request of a new user when this snapshot was built:
    /// [`Upstream::has_available`] without the retiring backends, which take only their own.
    pub fn takes_new_keys(&self) -> bool {
        self.takes_new_keys
    }

    /// Picks a backend for a new request; `exclude` is a backend that just failed. On a ring,
    /// the picked backend remembers the key (a retiring one keeps what it has).
    pub fn pick_backend(&self, request: &Request, exclude: Option<usize>) -> Option<usize> {
        let key = self.ring_key(request);
        let hash = key.as_ref().map(|k| KeyHash::of(k.as_bytes()));
        let key = key.as_ref().map_or(&[][..], Key::as_bytes);
        let picked = self.selector.pick(
            &self.backends,
            &self.selection,
            key,
            |i| Some(i) != exclude && self.backends[i].live.is_healthy(),
            |i| self.backends[i].keeps(hash),
        )?;
        let backend = &self.backends[picked];
        if let (Some(keys), Some(hash), None) =
            (&backend.keys, hash, backend.state.retiring_until())
        {
            keys.record(hash);
        }
        Some(picked)
    }

    /// What a ring hashes: `ip_hash` the client IP; `hash` its key, or the client IP for a
    /// request without the key (so that such a client still keeps its backend).
    fn ring_key<'a>(&self, request: &Request<'a>) -> Option<Key<'a>> {
        match self.algorithm {
            Algorithm::IpHash => request.client.map(Key::ip),
            Algorithm::Hash => self
                .hash_field
                .as_ref()
                .and_then(|field| field.of(request))
                .or_else(|| request.client.map(Key::ip)),
            _ => None,
        }
    }

    /// The peer for a request to backend `i`: its address, the upstream's timeouts, protocol
    /// and TLS. Plain HTTP/1.1 builds it as a bare peer; other protocols copy the one made
    /// with the snapshot.
    pub fn peer(&self, i: usize) -> HttpPeer {
        if let Some(peers) = &self.peers {
            return peers[i].clone();
        }
        let mut peer = HttpPeer::new(self.backends[i].live.address, false, String::new());
        set_timeouts(&mut peer.options, &self.timeouts);
        peer
    }

    /// Counts a request against backend `i` until the guard drops.
    pub fn hold(&self, i: usize) -> InFlight {
        InFlight::new(&self.backends[i].live, self.selector.report(i))
    }

    fn rebuilt(&self) -> Upstream {
        Upstream::new(
            Arc::clone(&self.name),
            self.algorithm,
            self.backends.clone(),
            self.health_check.clone(),
            self.timeouts,
            self.passive,
            self.slow_start,
            self.hash_on.clone(),
            self.retire_timeout,
            Arc::clone(&self.connect),
            Arc::clone(&self.selection),
            self.ring_divisor,
        )
    }
}

pub struct Snapshot {
    pub routes: Vec<Route>,
    pub upstreams: Vec<Upstream>,
    pub debug_headers: bool,
}

impl Snapshot {
    /// Builds the state that config and runtime state describe together, reusing live state
    /// and cursors from `previous` for every backend, upstream and route that keeps its name
    /// (and address). `cas` are the CA certificates read with `config`
    /// ([`crate::load_upstream_tls`]).
    pub fn build(
        config: &Config,
        cas: &UpstreamCas,
        state: &RuntimeState,
        metrics: &Metrics,
        previous: Option<&Snapshot>,
    ) -> Snapshot {
        let upstreams: Vec<Upstream> = config
            .upstreams
            .iter()
            .map(|u| {
                let old = previous.and_then(|p| p.upstream(&u.name));
                let selection: Arc<Shared> =
                    old.map(|o| Arc::clone(&o.selection)).unwrap_or_default();
                // Unchecked backends are healthy; checked ones earn it. A backend whose check
                // was removed has no watcher left to mark it healthy.
                let unchecked = u.health_check.is_none();
                // Only rings remember keys: 16 KiB a backend (see `keys`).
                let ring = u.algorithm.is_hash_ring();
                let backends = state
                    .backends(config, &u.name)
                    .into_iter()
                    .map(|b| {
                        let reused = old.and_then(|o| {
                            o.backends.iter().find(|ob| ob.live.address == b.address)
                        });
                        let (live, errors) = match reused {
                            Some(ob) => {
                                // Only when the check was just removed: a backend that passive
                                // detection took out stays out until its cooldown ends.
                                if unchecked && old.is_some_and(|o| o.health_check.is_some()) {
                                    ob.live.set_healthy(true);
                                }
                                let takes = b.state == BackendState::Active && b.weight > 0;
                                if takes && !ob.takes_traffic() {
                                    ob.live.back_in_service();
                                }
                                (Arc::clone(&ob.live), ob.errors.clone())
                            }
                            None => (
                                BackendLive::new(
                                    b.address,
                                    unchecked,
                                    Arc::clone(&selection.least),
                                ),
                                metrics.error_counters(&u.name, &b.address.to_string()),
                            ),
                        };
                        let keys =
                            ring.then(|| reused.and_then(|ob| ob.keys.clone()).unwrap_or_default());
                        Backend {
                            live,
                            weight: b.weight,
                            state: b.state,
                            errors,
                            keys,
                        }
                    })
                    .collect();
                Upstream::new(
                    u.name.as_str().into(),
                    u.algorithm,
                    backends,
                    u.health_check.clone(),
                    u.timeouts,
                    u.passive,
                    u.slow_start,
                    u.hash_on.clone(),
                    u.retire_timeout,
                    Arc::new(Connect::new(&u.name, u.protocol, u.tls.as_ref(), cas)),
                    selection,
                    ring_divisor(&u.backends.iter().map(|b| b.weight).collect::<Vec<_>>()),
                )
            })
            .collect();
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let split: Vec<(usize, u32)> = state
                    .split(config, &r.name)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(name, weight)| {
                        let index = upstreams.iter().position(|u| *u.name == *name)?;
                        Some((index, weight))
                    })
                    .collect();
                let cursor = previous
                    .and_then(|p| p.routes.iter().find(|old| *old.name == *r.name))
                    .map(|old| Arc::clone(&old.cursor))
                    .unwrap_or_default();
                let rollout = state.rollouts.get(&r.name);
                let index_of = |name: &str| upstreams.iter().position(|u| *u.name == *name);
                let rollout_pair =
                    rollout.and_then(|r| Some((index_of(&r.from)?, index_of(&r.to)?)));
                let match_steps = rollout.and_then(|r| MatchSteps::of(r, rollout_pair?.1, &split));
                let name: Arc<str> = r.name.as_str().into();
                let metrics = Arc::new(metrics.route(
                    Arc::clone(&name),
                    split.iter().map(|&(u, _)| (u, &*upstreams[u].name)),
                ));
                Route::new(
                    RouteSpec {
                        name,
                        host: r.host.as_deref().map(Into::into),
                        path_prefix: r.path_prefix.as_deref().map(Into::into),
                        matching: r.matching.clone(),
                        sticky: r.sticky.clone(),
                        match_steps,
                        rollout_pair,
                        split,
                    },
                    &upstreams,
                    cursor,
                    metrics,
                )
            })
            .collect();
        Snapshot {
            routes,
            upstreams,
            debug_headers: config.server.debug_headers,
        }
    }

    /// A config's snapshot alone: no CA files read, no runtime state, no previous snapshot.
    #[cfg(test)]
    pub(crate) fn of(config: &Config) -> Snapshot {
        let metrics = Metrics::new();
        Snapshot::build(
            config,
            &UpstreamCas::default(),
            &RuntimeState::default(),
            &metrics,
            None,
        )
    }

    /// The same state with selection recomputed from current health.
    pub fn rebuilt(&self) -> Snapshot {
        let upstreams: Vec<Upstream> = self.upstreams.iter().map(Upstream::rebuilt).collect();
        let routes = self.routes.iter().map(|r| r.rebuilt(&upstreams)).collect();
        Snapshot {
            routes,
            upstreams,
            debug_headers: self.debug_headers,
        }
    }

    /// A route's split in force, by upstream name (empty for no such route).
    pub fn split_of(&self, route: &str) -> std::collections::BTreeMap<String, u32> {
        self.routes
            .iter()
            .find(|r| *r.name == *route)
            .map(|r| {
                r.split
                    .iter()
                    .map(|&(u, w)| (self.upstreams[u].name.to_string(), w))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| *u.name == *name)
    }

    /// Counts a request of `route` answered with `status` by `backend` of `upstream` (indices
    /// of this snapshot), and how long it took. `status` is the HTTP status, also for a gRPC
    /// call that failed under a 200 (which [`Snapshot::count_for_analysis`] counts as an
    /// error).
    pub fn count_request(
        &self,
        route: usize,
        upstream: usize,
        backend: usize,
        status: u16,
        elapsed: Duration,
    ) {
        if let (Some(r), Some(u)) = (self.routes.get(route), self.upstreams.get(upstream)) {
            r.metrics
                .count(upstream, u, backend, status, elapsed.as_secs_f64());
        }
    }

    /// Counts a request of `route` to `upstream` (indices of this snapshot) for rollout
    /// analysis, by its final answer: `status`, the time to its response head (`latency`),
    /// and whether it failed whatever its status says (`failed`: broken off by the backend,
    /// or a gRPC error status); see [`PairStats::record`](crate::PairStats::record). Lock- and
    /// allocation-free.
    pub fn count_for_analysis(
        &self,
        route: usize,
        upstream: usize,
        status: u16,
        latency: Duration,
        failed: bool,
    ) {
        if let Some(r) = self.routes.get(route) {
            r.metrics.record(upstream, status, latency, failed);
        }
    }

    /// The first route whose host, path and `match` hold for `request`.
    pub fn match_route(&self, request: &Request) -> Option<usize> {
        self.routes.iter().position(|r| r.matches(request))
    }

    /// Picks upstream and backend for a request on `route` (see [`Route::pick`]).
    pub fn pick(&self, route: usize, request: &Request) -> Option<Pick> {
        self.routes[route].pick(&self.upstreams, request)
    }
}
