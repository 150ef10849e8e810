//! `GET /api/v1/stats`: requests per second, error rate and p99 latency per upstream and per
//! (route, upstream) pair over the last second and the last ten seconds — what the status
//! page and an operator's `watch curl` want to see right now.
//!
//! The numbers come from the very counters the rollout analysis judges ([`PairStats`]), so
//! "error" means what it means there: a 5xx from the backend or from the balancer for it, a
//! connect failure or timeout, a body broken off, a gRPC error status; a 499 (the client left)
//! is not counted at all. Those counters are cumulative, and a rate needs two readings some
//! time apart: [`StatsSampler`], a background service, reads every pair once a second (the
//! request path only adds to atomics, as before) and keeps a short ring of readings; an answer
//! reads the counters once more and takes the difference with the reading about 1 s and 10 s
//! old. Nothing on the request path changes, and nothing is reset.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::Serialize;
use switchyard_pool::stats::RANGE;
use switchyard_pool::{PairStats, Pool, Snapshot, StatsReading, Window};

/// How often the sampler reads the counters.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The windows an answer reports, shortest first.
const SHORT: Duration = Duration::from_secs(1);
const LONG: Duration = Duration::from_secs(10);

/// Readings kept: enough that one at least [`LONG`] old is there even when a tick runs late.
const RING: usize = 13;

/// A route's name and the name of an upstream of its split.
type PairName = (Arc<str>, Arc<str>);

/// Every known pair's counters at one moment.
struct Reading {
    at: Instant,
    pairs: HashMap<PairName, StatsReading>,
}

#[derive(Default)]
struct Ring {
    /// Oldest first.
    readings: VecDeque<Reading>,
    /// Every pair seen in a split so far, so a tick locks the pool's registry only for a new
    /// one. Pairs are never dropped, as in the registry: one that leaves a split and comes back
    /// goes on counting.
    known: HashMap<PairName, Arc<PairStats>>,
}

/// The sampler and the readings it took; shared by the background service and the API.
#[derive(Clone)]
pub struct StatsSampler {
    pool: Arc<Pool>,
    ring: Arc<Mutex<Ring>>,
}

impl StatsSampler {
    pub fn new(pool: Arc<Pool>) -> StatsSampler {
        StatsSampler {
            pool,
            ring: Arc::default(),
        }
    }

    /// Takes one reading of every pair of the current snapshot's splits (and of every pair
    /// seen before), dropping the oldest past [`RING`].
    pub fn sample(&self) {
        self.sample_at(Instant::now());
    }

    fn sample_at(&self, at: Instant) {
        let snapshot = self.pool.snapshot();
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        self.learn(&mut ring, &snapshot);
        let pairs = ring
            .known
            .iter()
            .map(|(name, stats)| (name.clone(), stats.read()))
            .collect();
        ring.readings.push_back(Reading { at, pairs });
        while ring.readings.len() > RING {
            ring.readings.pop_front();
        }
    }

    /// Adds the snapshot's pairs not known yet.
    fn learn(&self, ring: &mut Ring, snapshot: &Snapshot) {
        for (route, upstream) in pair_names(snapshot) {
            if !ring.known.contains_key(&(route.clone(), upstream.clone())) {
                let stats = self.pool.pair_stats(&route, &upstream);
                ring.known.insert((route, upstream), stats);
            }
        }
    }

    /// The answer of `GET /api/v1/stats` for `snapshot`'s routes and upstreams.
    pub fn view(&self, snapshot: &Snapshot) -> StatsView {
        self.view_at(snapshot, Instant::now())
    }

    fn view_at(&self, snapshot: &Snapshot, now: Instant) -> StatsView {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        self.learn(&mut ring, snapshot);
        let mut pairs = Vec::new();
        // Per upstream name: its merged window and its requests per second, for each window.
        let mut by_upstream: HashMap<&str, [(Window, f64); 2]> = HashMap::new();
        for (route, upstream) in pair_names(snapshot) {
            let name = (route, upstream);
            let Some(stats) = ring.known.get(&name) else {
                continue;
            };
            let current = stats.read();
            let windows = [SHORT, LONG].map(|span| {
                let (window, seconds) = match earlier(&ring.readings, &name, now, span) {
                    Some((reading, at)) => (
                        current.since(reading),
                        now.saturating_duration_since(at).as_secs_f64(),
                    ),
                    // A pair first seen just now has no earlier reading to count from.
                    None => (Window::default(), 0.0),
                };
                (window, seconds)
            });
            if let Some(u) = snapshot.upstream(&name.1) {
                let slot = by_upstream.entry(&u.name).or_default();
                for (k, (window, seconds)) in windows.iter().enumerate() {
                    slot[k].0.merge(window);
                    slot[k].1 += per_second(window.requests, *seconds);
                }
            }
            let [short, long] =
                windows.map(|(w, s)| WindowView::of(&w, s, per_second(w.requests, s)));
            pairs.push(PairView {
                route: name.0.to_string(),
                upstream: name.1.to_string(),
                last_1s: short,
                last_10s: long,
            });
        }
        // The window's own span for an upstream: the reading the answer compared against.
        let spans = [SHORT, LONG].map(|span| {
            ring.readings
                .iter()
                .rev()
                .find(|r| now.saturating_duration_since(r.at) >= span)
                .or(ring.readings.front())
                .map_or(0.0, |r| now.saturating_duration_since(r.at).as_secs_f64())
        });
        let upstreams = snapshot
            .upstreams
            .iter()
            .map(|u| {
                let [short, long] = by_upstream.remove(&*u.name).unwrap_or_default();
                UpstreamStatsView {
                    name: u.name.to_string(),
                    last_1s: WindowView::of(&short.0, spans[0], short.1),
                    last_10s: WindowView::of(&long.0, spans[1], long.1),
                }
            })
            .collect();
        StatsView {
            sampled_every_ms: millis(SAMPLE_EVERY),
            upstreams,
            pairs,
        }
    }
}

/// Every (route, upstream) pair of the snapshot's splits, in route and split order.
fn pair_names(snapshot: &Snapshot) -> impl Iterator<Item = PairName> + '_ {
    snapshot.routes.iter().flat_map(move |route| {
        route.split.iter().filter_map(move |&(u, _)| {
            let upstream = snapshot.upstreams.get(u)?;
            Some((Arc::clone(&route.name), Arc::clone(&upstream.name)))
        })
    })
}

/// The reading to count `pair`'s last `span` from, and when it was taken: the newest at least
/// `span` old, or, early in the process's life (or for a pair seen only lately), the oldest
/// that has the pair.
fn earlier<'a>(
    readings: &'a VecDeque<Reading>,
    pair: &PairName,
    now: Instant,
    span: Duration,
) -> Option<(&'a StatsReading, Instant)> {
    let with_pair = |r: &'a Reading| r.pairs.get(pair).map(|reading| (reading, r.at));
    readings
        .iter()
        .rev()
        .filter(|r| now.saturating_duration_since(r.at) >= span)
        .find_map(with_pair)
        .or_else(|| readings.iter().find_map(with_pair))
}

fn per_second(requests: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        requests as f64 / seconds
    } else {
        0.0
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Rounded for people: three decimals are below what a one-second window can tell apart.
fn rounded(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// The answer of `GET /api/v1/stats`.
#[derive(Debug, Serialize)]
pub struct StatsView {
    /// How often the counters are read: the resolution of the windows.
    pub sampled_every_ms: u64,
    /// Every upstream, in name order, over all the routes that split to it.
    pub upstreams: Vec<UpstreamStatsView>,
    /// Every (route, upstream) pair of the routes' splits, in route order.
    pub pairs: Vec<PairView>,
}

#[derive(Debug, Serialize)]
pub struct UpstreamStatsView {
    pub name: String,
    pub last_1s: WindowView,
    pub last_10s: WindowView,
}

#[derive(Debug, Serialize)]
pub struct PairView {
    pub route: String,
    pub upstream: String,
    pub last_1s: WindowView,
    pub last_10s: WindowView,
}

/// One window of requests.
#[derive(Debug, Default, Serialize)]
pub struct WindowView {
    /// How long the window really is (the readings are about a second apart); 0 right after
    /// start, before a first reading.
    pub seconds: f64,
    pub requests: u64,
    pub errors: u64,
    pub requests_per_second: f64,
    /// Errors over requests, 0 without requests.
    pub error_rate: f64,
    /// The p99 time to the response head, to a bucket (≤ 6.25 %) above the exact one; `null`
    /// without requests. Beyond the histogram's range (67 s) it reads as that range.
    pub p99_ms: Option<f64>,
}

impl WindowView {
    fn of(window: &Window, seconds: f64, requests_per_second: f64) -> WindowView {
        WindowView {
            seconds: rounded(seconds, 3),
            requests: window.requests,
            errors: window.errors,
            requests_per_second: rounded(requests_per_second, 2),
            error_rate: rounded(window.error_rate(), 4),
            p99_ms: window
                .p99()
                .map(|p99| rounded(p99.min(RANGE).as_secs_f64() * 1000.0, 3)),
        }
    }
}

#[async_trait]
impl BackgroundService for StatsSampler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        // A late tick (a busy machine) is one reading later, not a burst of readings.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => self.sample(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_config::Config;
    use switchyard_pool::{Metrics, UpstreamCas};

    const CONFIG: &str = "listeners:\n  - address: 127.0.0.1:8080\n\
        upstreams:\n  blue:\n    backends:\n      - address: 127.0.0.1:9001\n\
        \x20 green:\n    backends:\n      - address: 127.0.0.1:9002\n\
        routes:\n  - name: api\n    path_prefix: /api/\n    split: {green: 1}\n\
        \x20 - name: web\n    split: {blue: 90, green: 10}\n";

    fn sampler() -> StatsSampler {
        let config = Config::from_yaml(CONFIG).expect("valid test config");
        let pool = Pool::new(
            config,
            UpstreamCas::default(),
            Arc::new(Metrics::new()),
            None,
        )
        .expect("pool");
        StatsSampler::new(Arc::new(pool))
    }

    fn record(s: &StatsSampler, route: &str, upstream: &str, n: u64, status: u16, ms: u64) {
        let stats = s.pool.pair_stats(route, upstream);
        for _ in 0..n {
            stats.record(status, Duration::from_millis(ms), false);
        }
    }

    fn upstream<'a>(view: &'a StatsView, name: &str) -> &'a UpstreamStatsView {
        view.upstreams
            .iter()
            .find(|u| u.name == name)
            .expect("upstream listed")
    }

    #[test]
    fn rates_come_from_the_readings_one_and_ten_seconds_old() {
        let s = sampler();
        let t0 = Instant::now();
        s.sample_at(t0);
        // Ten seconds of 10 green requests a second on `web`, one of them a 503 each second,
        // and 5 a second on `api`; each second a reading.
        for second in 1..=10u64 {
            record(&s, "web", "green", 9, 200, 2);
            record(&s, "web", "green", 1, 503, 2);
            record(&s, "api", "green", 5, 200, 40);
            s.sample_at(t0 + Duration::from_secs(second));
        }
        // The last half second: 20 more on web/green, all fine.
        record(&s, "web", "green", 20, 200, 2);
        let now = t0 + Duration::from_millis(10_500);
        let view = s.view_at(&s.pool.snapshot(), now);

        let green = upstream(&view, "green");
        // 1 s window: the reading at 9 s (1.5 s old): 10 + 5 requests of second 10, and 20.
        assert_eq!(green.last_1s.seconds, 1.5);
        assert_eq!(green.last_1s.requests, 35);
        assert_eq!(green.last_1s.errors, 1);
        assert_eq!(green.last_1s.requests_per_second, rounded(35.0 / 1.5, 2));
        // 10 s window: the reading at 0 s, 10.5 s old: everything.
        assert_eq!(green.last_10s.seconds, 10.5);
        assert_eq!((green.last_10s.requests, green.last_10s.errors), (170, 10));
        assert_eq!(green.last_10s.error_rate, rounded(10.0 / 170.0, 4));
        // The slow `api` requests are 50 of 170: more than 1 %, so the p99 is theirs.
        let p99 = green.last_10s.p99_ms.expect("requests");
        assert!((40.0..=42.5).contains(&p99), "{p99}");

        let blue = upstream(&view, "blue");
        assert_eq!((blue.last_10s.requests, blue.last_10s.p99_ms), (0, None));
        assert_eq!(blue.last_10s.requests_per_second, 0.0);

        let pair = |route: &str, up: &str| {
            view.pairs
                .iter()
                .find(|p| p.route == route && p.upstream == up)
                .expect("pair listed")
        };
        assert_eq!(pair("web", "green").last_10s.requests, 120);
        assert_eq!(
            pair("web", "green").last_10s.error_rate,
            rounded(1.0 / 12.0, 4)
        );
        assert_eq!(pair("api", "green").last_1s.requests, 5);
        assert_eq!(
            pair("web", "green").last_1s.p99_ms,
            pair("web", "green").last_10s.p99_ms
        );
        assert_eq!(view.pairs.len(), 3);
    }

    #[test]
    fn early_answers_count_from_the_first_reading_and_499_is_no_request() {
        let s = sampler();
        let t0 = Instant::now();
        // No reading yet: empty windows, no division by zero.
        let view = s.view_at(&s.pool.snapshot(), t0);
        assert_eq!(upstream(&view, "green").last_1s.seconds, 0.0);
        assert_eq!(upstream(&view, "green").last_1s.requests_per_second, 0.0);
        s.sample_at(t0);
        record(&s, "web", "blue", 4, 200, 1);
        record(&s, "web", "blue", 3, 499, 1);
        let view = s.view_at(&s.pool.snapshot(), t0 + Duration::from_millis(500));
        let blue = upstream(&view, "blue");
        // Both windows count from the only reading there is, half a second old.
        for window in [&blue.last_1s, &blue.last_10s] {
            assert_eq!((window.seconds, window.requests), (0.5, 4));
            assert_eq!(window.requests_per_second, 8.0);
        }
    }

    #[test]
    fn the_ring_keeps_a_reading_ten_seconds_old_and_no_more() {
        let s = sampler();
        let t0 = Instant::now();
        for second in 0..40 {
            s.sample_at(t0 + Duration::from_secs(second));
        }
        let ring = s.ring.lock().unwrap_or_else(PoisonError::into_inner);
        assert_eq!(ring.readings.len(), RING);
        let oldest = ring.readings.front().expect("readings").at;
        assert!(t0 + Duration::from_secs(39) - oldest > LONG);
    }

    #[test]
    fn the_view_has_the_documented_shape() {
        let s = sampler();
        s.sample();
        let json = serde_json::to_value(s.view(&s.pool.snapshot())).expect("serializes");
        assert_eq!(json["sampled_every_ms"], 1000);
        assert_eq!(json["upstreams"][0]["name"], "blue");
        assert_eq!(json["pairs"][0]["route"], "api");
        for field in [
            "seconds",
            "requests",
            "errors",
            "requests_per_second",
            "error_rate",
            "p99_ms",
        ] {
            assert!(
                json["upstreams"][1]["last_10s"].get(field).is_some(),
                "{field}: {json}"
            );
            assert!(json["pairs"][0]["last_1s"].get(field).is_some(), "{field}");
        }
    }
}
