//! A route: which requests it takes (host, path prefix, `match`) and how it picks their
//! upstream — a running rollout's match steps first, then the sticky key's place in the
//! split, then the smooth split — precomputed per snapshot, so a pick allocates nothing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use switchyard_config::RequestKey;

use crate::matcher::Matcher;
use crate::metrics::RouteMetrics;
use crate::request::{KeyField, Request};
use crate::rollout::Rollout;
use crate::select::Rotation;
use crate::snapshot::Upstream;
use crate::sticky::{key_point, Layout};

/// How a request's upstream was chosen, for `switchyard_route_routing_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// The route's smooth split (the route is not sticky). The discriminants index the
    /// route's counters, in the order of [`Routing::ALL`].
    Split = 0,
    /// The sticky key's hash.
    Sticky = 1,
    /// A sticky route, but the request had no key: the smooth split.
    StickyMissing = 2,
    /// A sticky cookie was issued with this request, and its key placed it.
    CookieIssued = 3,
    /// A rollout's match step sent it to the new version.
    RolloutMatch = 4,
}

impl Routing {
    pub const ALL: [Routing; 5] = [
        Routing::Split,
        Routing::Sticky,
        Routing::StickyMissing,
        Routing::CookieIssued,
        Routing::RolloutMatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Routing::Split => "split",
            Routing::Sticky => "sticky",
            Routing::StickyMissing => "sticky_missing",
            Routing::CookieIssued => "cookie_issued",
            Routing::RolloutMatch => "rollout_match",
        }
    }
}

/// Where a request goes: indices of this snapshot, and how the upstream was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub upstream: usize,
    pub backend: usize,
    pub routing: Routing,
}

/// A route's sticky split, laid out for picking.
struct StickyPick {
    key: KeyField,
    /// The cookie `set_cookie` issues, if it does.
    issues: Option<Box<str>>,
    /// Every upstream of the split by weight; a key's first choice.
    layout: Layout,
    /// Only the upstreams that had an available backend at build time (a retiring one counts):
    /// where the users of one that had none go.
    available: Layout,
    /// Only the upstreams that had a backend for new users at build time: where a new user
    /// goes whose upstream by the layouts above has only retiring backends, which do not know
    /// it. Without them it is where their users go once they are gone, so it moves no more.
    open: Layout,
}

/// A running rollout's match steps on a route: a request that matches one of them goes to
/// `to` whatever the weights.
pub(crate) struct MatchSteps {
    /// One per match step taken so far; any of them suffices.
    matchers: Box<[Matcher]>,
    /// `to`'s upstream index (in the route's split).
    to: usize,
}

impl MatchSteps {
    /// The match steps `rollout` has in force, `to` being upstream `to` of the snapshot;
    /// `None` when there are none or `to` is not in the route's `split`.
    pub(crate) fn of(
        rollout: &Rollout,
        to: usize,
        split: &[(usize, u32)],
    ) -> Option<Arc<MatchSteps>> {
        let matchers: Box<[Matcher]> = rollout
            .matches_in_force()
            .filter_map(Matcher::new)
            .collect();
        let in_split = split.iter().any(|&(u, _)| u == to);
        (in_split && !matchers.is_empty()).then(|| Arc::new(MatchSteps { matchers, to }))
    }
}

/// One route of a snapshot: its conditions, its split in force, and what it picks with.
pub struct Route {
    pub name: Arc<str>,
    /// Lower-cased, without port.
    pub host: Option<Box<str>>,
    pub path_prefix: Option<Box<str>>,
    /// The `match` conditions, as configured.
    pub matching: switchyard_config::RouteMatch,
    matcher: Option<Matcher>,
    pub sticky: Option<switchyard_config::Sticky>,
    sticky_pick: Option<StickyPick>,
    /// Shared by the snapshots that rebuild this one for health: they have the same rollout.
    match_steps: Option<Arc<MatchSteps>>,
    /// `from` and `to` of the route's current or last rollout (upstream indices): a sticky
    /// layout puts `to` right after `from`.
    rollout_pair: Option<(usize, usize)>,
    /// Upstream index and weight, as configured.
    pub split: Vec<(usize, u32)>,
    /// One smooth period over the upstreams that had an available backend at build time.
    sequence: Rotation<usize>,
    pub(crate) cursor: Arc<AtomicUsize>,
    pub(crate) metrics: Arc<RouteMetrics>,
}

/// What a route is made of, apart from its live state.
pub(crate) struct RouteSpec {
    pub(crate) name: Arc<str>,
    pub(crate) host: Option<Box<str>>,
    pub(crate) path_prefix: Option<Box<str>>,
    pub(crate) matching: switchyard_config::RouteMatch,
    pub(crate) sticky: Option<switchyard_config::Sticky>,
    pub(crate) match_steps: Option<Arc<MatchSteps>>,
    pub(crate) rollout_pair: Option<(usize, usize)>,
    /// In upstream name order.
    pub(crate) split: Vec<(usize, u32)>,
}

impl Route {
    pub(crate) fn new(
        spec: RouteSpec,
        upstreams: &[Upstream],
        cursor: Arc<AtomicUsize>,
        metrics: Arc<RouteMetrics>,
    ) -> Route {
        let available: Vec<(usize, u32)> = spec
            .split
            .iter()
            .copied()
            .filter(|&(u, _)| upstreams[u].has_available())
            .collect();
        let open: Vec<(usize, u32)> = available
            .iter()
            .copied()
            .filter(|&(u, _)| upstreams[u].takes_new_keys())
            .collect();
        let sticky_pick = spec.sticky.as_ref().and_then(|sticky| {
            Some(StickyPick {
                key: KeyField::new(&sticky.key)?,
                issues: match (&sticky.key, sticky.set_cookie) {
                    (RequestKey::Cookie(name), true) => Some(name.as_str().into()),
                    _ => None,
                },
                layout: Layout::new(sticky_order(&spec.split, spec.rollout_pair)),
                available: Layout::new(sticky_order(&available, spec.rollout_pair)),
                open: Layout::new(sticky_order(&open, spec.rollout_pair)),
            })
        });
        Route {
            sequence: Rotation::new(&available),
            matcher: Matcher::new(&spec.matching),
            sticky_pick,
            match_steps: spec.match_steps,
            rollout_pair: spec.rollout_pair,
            name: spec.name,
            host: spec.host,
            path_prefix: spec.path_prefix,
            matching: spec.matching,
            sticky: spec.sticky,
            split: spec.split,
            cursor,
            metrics,
        }
    }

    pub(crate) fn matches(&self, request: &Request) -> bool {
        let host_ok = match (&self.host, request.host) {
            (None, _) => true,
            (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
            (Some(_), None) => false,
        };
        host_ok
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|prefix| request.path.starts_with(prefix))
            && self.matcher.as_ref().is_none_or(|m| m.is_match(request))
    }

    /// The cookie to issue with `request` (`set_cookie`, and the request has none): its name.
    /// The caller puts a fresh value into [`Request::issued`] before it picks.
    pub fn cookie_to_issue(&self, request: &Request) -> Option<&str> {
        let sticky = self.sticky_pick.as_ref()?;
        let name = sticky.issues.as_deref()?;
        sticky.key.of(request).is_none().then_some(name)
    }

    /// Requests routed so far, by how.
    pub fn routing_counts(&self) -> [(Routing, u64); Routing::ALL.len()] {
        self.metrics.routing_counts()
    }

    /// The share of the route's requests each upstream of its split gets now, in split order:
    /// its weight over the weights of the upstreams that have an available backend, and 0
    /// for one that has none, whose share the others take in proportion (the smooth split
    /// and a sticky key's fallback skip it alike, see [`Route::pick`]). All 0 when no
    /// upstream has a backend to give (every request is a 503). A running rollout's match
    /// steps send the requests they match to `to` on top of this.
    pub fn effective_shares(&self, upstreams: &[Upstream]) -> Vec<(usize, f64)> {
        let available = |u: usize| upstreams.get(u).is_some_and(Upstream::has_available);
        let total: u64 = self
            .split
            .iter()
            .filter(|&&(u, _)| available(u))
            .map(|&(_, w)| u64::from(w))
            .sum();
        self.split
            .iter()
            .map(|&(u, w)| {
                let share = if total > 0 && available(u) {
                    f64::from(w) / total as f64
                } else {
                    0.0
                };
                (u, share)
            })
            .collect()
    }

    pub(crate) fn rebuilt(&self, upstreams: &[Upstream]) -> Route {
        Route::new(
            RouteSpec {
                name: Arc::clone(&self.name),
                host: self.host.clone(),
                path_prefix: self.path_prefix.clone(),
                matching: self.matching.clone(),
                sticky: self.sticky.clone(),
                match_steps: self.match_steps.clone(),
                rollout_pair: self.rollout_pair,
                split: self.split.clone(),
            },
            upstreams,
            Arc::clone(&self.cursor),
            Arc::clone(&self.metrics),
        )
    }

    /// Picks upstream and backend for a request: `to` when it matches a running rollout's
    /// match step (and `to` has a backend to give), else by its sticky key when the route is
    /// sticky and the request has one, else by the smooth split, moving to the route's next
    /// upstream when one has no backend left to give. Counts how it chose.
    pub(crate) fn pick(&self, upstreams: &[Upstream], request: &Request) -> Option<Pick> {
        let route = self;
        if let Some(steps) = &route.match_steps {
            if steps.matchers.iter().any(|m| m.is_match(request)) {
                // With no backend in `to`, the request is better served by the split than
                // refused: a matched user is one who may try the new version, not must.
                if let Some(backend) = upstreams[steps.to].pick_backend(request, None) {
                    route.metrics.routed(Routing::RolloutMatch);
                    return Some(Pick {
                        upstream: steps.to,
                        backend,
                        routing: Routing::RolloutMatch,
                    });
                }
            }
        }
        // A sticky request whose upstreams could give no backend (a health change not yet
        // rebuilt) is placed by the split, and counted so.
        let mut routing = Routing::Split;
        if let Some(sticky) = &route.sticky_pick {
            match sticky.key.of(request) {
                Some(key) => {
                    let point = key_point(key.as_bytes());
                    if let Some((upstream, backend)) =
                        pick_sticky(upstreams, sticky, point, request)
                    {
                        let routing = if request.issued.is_some() {
                            Routing::CookieIssued
                        } else {
                            Routing::Sticky
                        };
                        route.metrics.routed(routing);
                        return Some(Pick {
                            upstream,
                            backend,
                            routing,
                        });
                    }
                }
                None => routing = Routing::StickyMissing,
            }
        }
        let sequence = &route.sequence;
        if sequence.is_empty() {
            return None;
        }
        let start = route.cursor.fetch_add(1, Ordering::Relaxed);
        let (upstream, backend) = sequence.candidates(start).find_map(|upstream| {
            upstreams[upstream]
                .pick_backend(request, None)
                .map(|backend| (upstream, backend))
        })?;
        route.metrics.routed(routing);
        Some(Pick {
            upstream,
            backend,
            routing,
        })
    }
}

/// The order a sticky split lays its upstreams out in: by name, except that a rollout's `to`
/// comes right next to its `from`, on the side it is on by name. A rollout moves weight
/// between those two only, so only the boundary between them moves, whatever other upstreams
/// the split has and however they are named. Two upstreams are never reordered; with more,
/// `to` usually starts at 0, so moving it next to `from` moves nobody. The order holds while
/// the rollout is the route's last: after a success `from` is at 0 and `to` keeps the place
/// where its users are. (A later rollout with another pair starts from name order again; with
/// three or more upstreams that may move users once, see docs/configuration.md.)
fn sticky_order(split: &[(usize, u32)], rollout: Option<(usize, usize)>) -> Vec<(usize, u32)> {
    let mut order = split.to_vec();
    if let Some((from, to)) = rollout {
        if let (Some(f), Some(t)) = (
            order.iter().position(|&(u, _)| u == from),
            order.iter().position(|&(u, _)| u == to),
        ) {
            let moved = order.remove(t);
            // Before `from` by name: right before it; after: right after it.
            let at = if t < f { f - 1 } else { f + 1 };
            order.insert(at, moved);
        }
    }
    order
}

/// The key's upstream by the split's weights; when it has no backend to give, its upstream
/// among those that had one at build time; when that has none for it either (its backends
/// retire, and none knows the key), its upstream among those that take new users. `None`: none
/// could give one (the smooth split then tries every upstream).
fn pick_sticky(
    upstreams: &[Upstream],
    sticky: &StickyPick,
    point: u64,
    request: &Request,
) -> Option<(usize, usize)> {
    let first = sticky.layout.owner(point)?;
    let from = |upstream: usize| {
        upstreams[upstream]
            .pick_backend(request, None)
            .map(|backend| (upstream, backend))
    };
    if let Some(pick) = from(first) {
        return Some(pick);
    }
    let available = sticky.available.owner(point);
    if let Some(pick) = available.filter(|&u| u != first).and_then(from) {
        return Some(pick);
    }
    let open = sticky.open.owner(point)?;
    (open != first && Some(open) != available)
        .then(|| from(open))
        .flatten()
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use http::{HeaderMap, HeaderValue, Method};
    use switchyard_config::Config;

    use super::*;
    use crate::{Metrics, RuntimeState, Snapshot, UpstreamCas};

    #[test]
    fn routing_kinds_index_their_counters_in_order() {
        for (i, how) in Routing::ALL.iter().enumerate() {
            assert_eq!(*how as usize, i, "{how:?}");
        }
    }

    #[test]
    fn a_rollouts_to_is_laid_right_after_its_from() {
        let split = [(0, 50), (1, 30), (2, 20)];
        let order = |pair| {
            sticky_order(&split, pair)
                .iter()
                .map(|&(u, _)| u)
                .collect::<Vec<_>>()
        };
        assert_eq!(order(None), [0, 1, 2]);
        assert_eq!(order(Some((0, 2))), [0, 2, 1]);
        assert_eq!(
            order(Some((2, 0))),
            [1, 0, 2],
            "to before from goes right before it"
        );
        assert_eq!(order(Some((2, 1))), [0, 1, 2]);
        assert_eq!(order(Some((1, 0))), [0, 1, 2]);
        let two = [(0, 50), (1, 50)];
        for pair in [(0, 1), (1, 0)] {
            assert_eq!(
                sticky_order(&two, Some(pair)),
                two,
                "two upstreams never move"
            );
        }
        assert_eq!(order(Some((1, 2))), [0, 1, 2]);
        assert_eq!(order(Some((0, 7))), [0, 1, 2], "to not in the split");
    }

    #[test]
    fn a_three_upstream_rollout_moves_users_of_from_to_to_only() {
        // a_stable 90 and b_mobile 10 of 10 000, then a rollout from a to c: a third
        // upstream's users stay where they are at every step.
        let keys: Vec<u64> = (0..10_000)
            .map(|i| key_point(format!("user-{i}").as_bytes()))
            .collect();
        let owners = |a: u32, c: u32| {
            let layout = Layout::new(sticky_order(&[(0, a), (1, 1000), (2, c)], Some((0, 2))));
            keys.iter()
                .map(|&k| layout.owner(k).unwrap_or(usize::MAX))
                .collect::<Vec<_>>()
        };
        let mut before = owners(9000, 0);
        for c in [90, 450, 2250, 4500, 9000] {
            let now = owners(9000 - c, c);
            for (b, n) in before.iter().zip(&now) {
                assert!(
                    b == n || (*b == 0 && *n == 2),
                    "a user went from {b} to {n}"
                );
            }
            before = now;
        }
    }

    const STICKY: &str = "listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  blue:\n    backends:\n      - address: 127.0.0.1:9001\n  green:\n    backends:\n      - address: 127.0.0.1:9002\n        weight: WEIGHT\n  hashed:\n    algorithm: hash\n    hash_on: {header: X-User-Id}\n    backends:\n      - address: 127.0.0.1:9101\n      - address: 127.0.0.1:9102\n      - address: 127.0.0.1:9103\nroutes:\n  - name: web\n    path_prefix: /web\n    split: {blue: 50, green: 50}\n    sticky: {header: X-User-Id}\n  - name: hashed\n    split: {hashed: 1}\n";

    fn snapshot(green_weight: u32) -> Snapshot {
        let yaml = STICKY.replace("WEIGHT", &green_weight.to_string());
        let config = Config::from_yaml(&yaml).unwrap();
        Snapshot::of(&config)
    }

    fn pick(s: &Snapshot, path: &str, user: Option<&str>, client: u8) -> Pick {
        let mut headers = HeaderMap::new();
        if let Some(user) = user {
            headers.insert("x-user-id", HeaderValue::from_str(user).unwrap());
        }
        let request = Request {
            host: None,
            path,
            query: None,
            method: &Method::GET,
            headers: &headers,
            client: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, client))),
            issued: None,
        };
        let route = s.match_route(&request).unwrap();
        s.pick(route, &request).unwrap()
    }

    #[test]
    fn a_sticky_user_keeps_its_upstream_and_a_keyless_request_takes_the_split() {
        let s = snapshot(1);
        let mut seen = [0; 2];
        for user in 0..200 {
            let user = format!("user-{user}");
            let first = pick(&s, "/web", Some(&user), 1);
            assert_eq!(first.routing, Routing::Sticky);
            for client in 2..6 {
                assert_eq!(
                    pick(&s, "/web", Some(&user), client).upstream,
                    first.upstream
                );
            }
            seen[first.upstream] += 1;
        }
        assert!(
            seen[0] > 70 && seen[1] > 70,
            "both upstreams have users: {seen:?}"
        );
        let keyless: Vec<usize> = (0..10)
            .map(|_| {
                let p = pick(&s, "/web", None, 1);
                assert_eq!(p.routing, Routing::StickyMissing);
                p.upstream
            })
            .collect();
        assert!(keyless.contains(&0) && keyless.contains(&1), "{keyless:?}");
        let web = &s.routes[0];
        let counts = web.routing_counts();
        assert_eq!(counts[1], (Routing::Sticky, 1000));
        assert_eq!(counts[2], (Routing::StickyMissing, 10));
    }

    #[test]
    fn a_client_ip_key_keeps_each_address_on_its_upstream() {
        let yaml = STICKY
            .replace("WEIGHT", "1")
            .replace("sticky: {header: X-User-Id}", "sticky: {client_ip: true}");
        let config = Config::from_yaml(&yaml).unwrap();
        let s = Snapshot::of(&config);
        let mut seen = [0; 2];
        for client in 1..=100 {
            let first = pick(&s, "/web", None, client);
            assert_eq!(first.routing, Routing::Sticky);
            for _ in 0..3 {
                assert_eq!(
                    pick(&s, "/web", Some("ignored"), client).upstream,
                    first.upstream
                );
            }
            seen[first.upstream] += 1;
        }
        assert!(seen[0] > 25 && seen[1] > 25, "{seen:?}");
    }

    #[test]
    fn users_of_an_upstream_without_a_backend_go_to_the_others_and_no_one_else_moves() {
        let three = |c_weight: u32| {
            let yaml = format!(
                "listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  a:\n    backends:\n      - address: 127.0.0.1:9001\n  b:\n    backends:\n      - address: 127.0.0.1:9002\n  c:\n    backends:\n      - address: 127.0.0.1:9003\n        weight: {c_weight}\nroutes:\n  - name: web\n    split: {{a: 1, b: 1, c: 1}}\n    sticky: {{header: X-User-Id}}\n"
            );
            let config = Config::from_yaml(&yaml).unwrap();
            Snapshot::of(&config)
        };
        // c's only backend takes no traffic: its users are placed among a and b.
        let (full, without) = (three(1), three(0));
        let mut moved = [0; 3];
        for user in 0..300 {
            let user = format!("user-{user}");
            let before = pick(&full, "/", Some(&user), 1);
            let now = pick(&without, "/", Some(&user), 1);
            assert_ne!(now.upstream, 2, "{user} went to c");
            assert_eq!(now.routing, Routing::Sticky);
            if before.upstream == 2 {
                moved[now.upstream] += 1;
            } else {
                assert_eq!(now.upstream, before.upstream, "{user} of a or b moved");
            }
        }
        // Placed by the same points over a and b: c's interval, the last, falls to b.
        assert!(moved[1] > 50 && moved[0] == 0, "c's users: {moved:?}");
    }

    #[test]
    fn an_upstream_whose_backends_all_retire_keeps_its_users_and_places_new_ones_by_key() {
        let yaml = STICKY.replace(
            "split: {blue: 50, green: 50}",
            "split: {blue: 30, green: 30, hashed: 40}",
        );
        let config = Config::from_yaml(&yaml.replace("WEIGHT", "1")).unwrap();
        let metrics = Metrics::new();
        let before = Snapshot::build(
            &config,
            &UpstreamCas::default(),
            &RuntimeState::default(),
            &metrics,
            None,
        );
        let users: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
        let placed: Vec<Pick> = users
            .iter()
            .map(|u| pick(&before, "/web", Some(u), 1))
            .collect();
        let hashed = 2;
        assert!(placed.iter().filter(|p| p.upstream == hashed).count() > 60);
        let mut state = RuntimeState::default();
        for port in [9101, 9102, 9103] {
            let retire = crate::Change::RetireBackend {
                upstream: "hashed".into(),
                address: SocketAddr::from(([127, 0, 0, 1], port)),
                weight: None,
                timeout: None,
            };
            state = state.with_change(&config, &retire, |_: &str, _| 0).unwrap();
        }
        let retiring = Snapshot::build(
            &config,
            &UpstreamCas::default(),
            &state,
            &metrics,
            Some(&before),
        );
        assert!(retiring.upstreams[hashed].has_available());
        assert!(!retiring.upstreams[hashed].takes_new_keys());
        // Its users stay on their backends, by their sticky key.
        for (user, was) in users.iter().zip(&placed) {
            let now = pick(&retiring, "/web", Some(user), 1);
            assert_eq!(
                (now.upstream, now.backend),
                (was.upstream, was.backend),
                "{user}"
            );
            assert_eq!(now.routing, Routing::Sticky);
        }
        // New users it would have had go by their key to the upstreams that take new users,
        // the same one every time, never by the smooth split.
        for i in 1000..1300 {
            let user = format!("new-{i}");
            let first = pick(&retiring, "/web", Some(&user), 1);
            assert_eq!(first.routing, Routing::Sticky, "{user}");
            assert_ne!(first.upstream, hashed, "{user}");
            for client in 2..5 {
                let again = pick(&retiring, "/web", Some(&user), client);
                assert_eq!(again.upstream, first.upstream, "{user}");
            }
        }
    }

    #[test]
    fn a_hash_upstream_keys_on_its_header_and_falls_back_to_the_client_ip() {
        let s = snapshot(1);
        let mut backends = std::collections::HashSet::new();
        for user in 0..60 {
            let user = format!("user-{user}");
            let first = pick(&s, "/", Some(&user), 1).backend;
            for client in 2..5 {
                assert_eq!(pick(&s, "/", Some(&user), client).backend, first);
            }
            backends.insert(first);
        }
        assert_eq!(backends.len(), 3, "keys spread over every backend");
        let by_ip: std::collections::HashSet<usize> = (1..60)
            .map(|client| pick(&s, "/", None, client).backend)
            .collect();
        assert_eq!(by_ip.len(), 3, "client IPs spread over every backend");
        for client in 1..20 {
            assert_eq!(
                pick(&s, "/", None, client).backend,
                pick(&s, "/", None, client).backend
            );
        }
    }
}
