//! Per route/upstream request counters for rollout analysis: how many requests a pair
//! answered, how many of them were errors, and how long they took to their response head.
//!
//! The rollout engine judges a canary over windows of a few seconds, on the balancer's own
//! view of every request (the contract's "Rollouts", `analysis`). Prometheus' histogram is
//! not fit for that: its buckets are too coarse for a p99 limit, and it times the whole
//! response, so a WebSocket would count as slow. So each pair keeps cumulative counters here
//! and the engine takes the difference of two readings ([`StatsReading::since`]): one writer
//! path, any number of readers, nothing to reset or rotate.
//!
//! [`PairStats::record`] runs once per request: three relaxed atomic adds into fixed arrays,
//! no lock, no allocation. The latency histogram is log-linear (HDR-style): each power-of-two
//! range of microseconds is cut into [`SUB_BUCKETS`] equal buckets, so a bucket is at most
//! 1/16 (6.25 %) of its lower bound wide, or 1 µs below 32 µs, from 1 µs to 67 s, with one
//! overflow bucket beyond. Pairs live in a registry ([`PairRegistry`]) that outlives every
//! snapshot, so a split change or a reload loses no count.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// log2 of [`SUB_BUCKETS`].
const SUB_BITS: u32 = 4;

/// Buckets per power-of-two range: the relative width of a bucket is at most `1 / SUB_BUCKETS`.
pub const SUB_BUCKETS: usize = 1 << SUB_BITS;

/// The highest bit a tracked latency in microseconds may have: 2^26 µs is 67.1 s, the first
/// value of the overflow bucket.
const TOP_BIT: u32 = 25;

/// Groups of [`SUB_BUCKETS`]: group 0 holds 0..16 µs one by one, group `g` ≥ 1 the values
/// whose highest bit is `g + 3`, in steps of `2^(g - 1)` µs.
const GROUPS: usize = (TOP_BIT - SUB_BITS + 2) as usize;

/// The overflow bucket's index: latencies of [`RANGE`] and more.
const OVERFLOW: usize = GROUPS * SUB_BUCKETS;

/// Histogram buckets, the overflow bucket included.
const BUCKETS: usize = OVERFLOW + 1;

/// The end of the histogram's range (2^26 µs, about 67 s): a quantile that falls beyond it is
/// reported as [`Duration::MAX`].
pub const RANGE: Duration = Duration::from_micros(1 << (TOP_BIT + 1));

/// The status the proxy records for a request whose client left before any answer.
const CLIENT_CLOSED: u16 = 499;

/// The bucket of a latency of `micros` microseconds.
fn bucket(micros: u64) -> usize {
    if micros < SUB_BUCKETS as u64 {
        return micros as usize;
    }
    let top = 63 - micros.leading_zeros();
    if top > TOP_BIT {
        return OVERFLOW;
    }
    let shift = top - SUB_BITS;
    // The value's top SUB_BITS + 1 bits: SUB_BUCKETS..2 * SUB_BUCKETS.
    let sub = (micros >> shift) as usize - SUB_BUCKETS;
    (shift as usize + 1) * SUB_BUCKETS + sub
}

/// The first value in microseconds past bucket `i` (below [`OVERFLOW`]): every latency
/// counted in it is shorter.
fn upper_bound(i: usize) -> u64 {
    let (group, sub) = (i / SUB_BUCKETS, (i % SUB_BUCKETS) as u64);
    if group == 0 {
        sub + 1
    } else {
        (SUB_BUCKETS as u64 + sub + 1) << (group - 1)
    }
}

/// The counters of one (route, upstream) pair since the process started.
pub struct PairStats {
    requests: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl PairStats {
    pub fn new() -> PairStats {
        PairStats {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Counts one request by its final answer: `status`, the time to its response head, and
    /// whether it failed whatever the status says (`failed`): it broke on the backend's side
    /// after that head (e.g. a read timeout mid-body), or it is a gRPC call the backend ended
    /// with a `grpc-status` other than 0 under its HTTP 200. An error is a 5xx or such a
    /// failure. A 499 (the client left before any answer) says nothing about the backend and
    /// is not counted at all.
    pub fn record(&self, status: u16, latency: Duration, failed: bool) {
        if status == CLIENT_CLOSED {
            return;
        }
        // Relaxed: the counters are independent totals; a reader taking a reading mid-record
        // sees this request in one counter and not yet in another, and the next window gets
        // the rest (`since` keeps errors within requests).
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 || failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency[bucket(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of the counters now; two readings give the window between them.
    pub fn read(&self) -> StatsReading {
        StatsReading {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency: std::array::from_fn(|i| self.latency[i].load(Ordering::Relaxed)),
        }
    }
}

impl Default for PairStats {
    fn default() -> Self {
        PairStats::new()
    }
}

impl fmt::Debug for PairStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PairStats").field(&self.read()).finish()
    }
}

/// The cumulative counters of one pair at one moment, from [`PairStats::read`].
#[derive(Clone)]
pub struct StatsReading {
    pub requests: u64,
    pub errors: u64,
    latency: [u64; BUCKETS],
}

impl StatsReading {
    /// What happened between `earlier` and this reading. Differences saturate at 0, so a
    /// reading of another pair (or of a restarted process) gives an empty window rather than
    /// a wrapped count.
    pub fn since(&self, earlier: &StatsReading) -> Window {
        let requests = self.requests.saturating_sub(earlier.requests);
        Window {
            requests,
            // A reading can catch a request's error before its request count.
            errors: self.errors.saturating_sub(earlier.errors).min(requests),
            latency: std::array::from_fn(|i| self.latency[i].saturating_sub(earlier.latency[i])),
        }
    }

    #[cfg(test)]
    pub(crate) fn for_test(requests: u64, errors: u64) -> StatsReading {
        StatsReading {
            requests,
            errors,
            ..StatsReading::default()
        }
    }

    /// Everything since the pair was made, as one window.
    pub fn total(&self) -> Window {
        self.since(&StatsReading::default())
    }
}

/// A reading as instances send it to each other (`store::InstanceReport`): the latency
/// histogram as `[bucket, count]` pairs of its non-empty buckets, most being empty.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SentReading {
    requests: u64,
    errors: u64,
    #[serde(default)]
    latency: Vec<(usize, u64)>,
}

impl serde::Serialize for StatsReading {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        SentReading {
            requests: self.requests,
            errors: self.errors,
            latency: (0..BUCKETS)
                .filter(|&i| self.latency[i] > 0)
                .map(|i| (i, self.latency[i]))
                .collect(),
        }
        .serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for StatsReading {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let sent = SentReading::deserialize(deserializer)?;
        let mut latency = [0; BUCKETS];
        for (bucket, count) in sent.latency {
            *latency.get_mut(bucket).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "latency bucket {bucket} out of range (0..{BUCKETS})"
                ))
            })? = count;
        }
        Ok(StatsReading {
            requests: sent.requests,
            errors: sent.errors,
            latency,
        })
    }
}

impl PartialEq for StatsReading {
    fn eq(&self, other: &Self) -> bool {
        self.requests == other.requests
            && self.errors == other.errors
            && self.latency == other.latency
    }
}

impl Default for StatsReading {
    fn default() -> Self {
        StatsReading {
            requests: 0,
            errors: 0,
            latency: [0; BUCKETS],
        }
    }
}

impl fmt::Debug for StatsReading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatsReading")
            .field("requests", &self.requests)
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

/// The requests of one pair between two readings.
#[derive(Clone)]
pub struct Window {
    pub requests: u64,
    /// Never more than `requests`.
    pub errors: u64,
    latency: [u64; BUCKETS],
}

impl Window {
    /// Adds another instance's window of the same pair to this one.
    pub fn add(&mut self, other: &Window) {
        self.requests += other.requests;
        self.errors += other.errors;
        for (mine, theirs) in self.latency.iter_mut().zip(other.latency.iter()) {
            *mine += theirs;
        }
    }

    /// Errors over requests; 0 without requests.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// The latency (to the response head) that a share `q` of the window's requests stayed
    /// under (`q` is clamped to 0..=1): the upper bound of the bucket holding the request of
    /// rank `ceil(q * n)`, so it is never below the exact quantile, and above it by at most
    /// one bucket (6.25 %, or 1 µs below 32 µs). A limit is thus never passed by rounding
    /// down. [`Duration::MAX`] when that request took [`RANGE`] or more; `None` without
    /// requests.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let counted: u64 = self.latency.iter().sum();
        if counted == 0 {
            return None;
        }
        // NaN clamps to NaN, whose cast is 0: the rank of the fastest request then.
        let rank = ((q.clamp(0.0, 1.0) * counted as f64).ceil() as u64).clamp(1, counted);
        let mut seen = 0;
        for (i, &n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(if i == OVERFLOW {
                    Duration::MAX
                } else {
                    Duration::from_micros(upper_bound(i))
                });
            }
        }
        Some(Duration::MAX)
    }

    /// [`Window::quantile`] at 0.99.
    pub fn p99(&self) -> Option<Duration> {
        self.quantile(0.99)
    }

    /// Adds `other`'s requests to this window, as if both had been counted by one pair: how
    /// an upstream's traffic over all its routes is summed (quantiles of the sum stay exact
    /// to a bucket, which averaging p99s would not).
    pub fn merge(&mut self, other: &Window) {
        self.requests += other.requests;
        self.errors += other.errors;
        for (mine, theirs) in self.latency.iter_mut().zip(&other.latency) {
            *mine += theirs;
        }
    }
}

impl Default for Window {
    fn default() -> Self {
        StatsReading::default().total()
    }
}

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Window")
            .field("requests", &self.requests)
            .field("errors", &self.errors)
            .field("p99", &self.p99())
            .finish_non_exhaustive()
    }
}

/// Every pair's stats by route and upstream name, kept for the life of the process: snapshots
/// resolve their pairs here when built, and the rollout engine asks for a pair by name, even
/// before its first request. Pairs are never dropped, so one that leaves a split and comes
/// back goes on counting; there is one per pair of names ever configured or asked for (about
/// 3 KB each).
/// A route's name and the name of an upstream it splits to.
type PairName = (Box<str>, Box<str>);

#[derive(Default)]
pub(crate) struct PairRegistry {
    pairs: Mutex<HashMap<PairName, Arc<PairStats>>>,
}

impl PairRegistry {
    /// The stats of `route` → `upstream`, made on first use. Never called per request.
    pub(crate) fn pair(&self, route: &str, upstream: &str) -> Arc<PairStats> {
        let mut pairs = self.pairs.lock().unwrap_or_else(|p| p.into_inner());
        // The key is built even when the pair exists: this runs per snapshot build, not per
        // request.
        Arc::clone(pairs.entry((route.into(), upstream.into())).or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so sample sets are random-ish and the
    /// same on every run.
    struct Xorshift(u64);

    impl Xorshift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn lower_bound(i: usize) -> u64 {
        if i == 0 {
            0
        } else {
            upper_bound(i - 1)
        }
    }

    #[test]
    fn buckets_are_contiguous_monotonic_and_as_fine_as_claimed() {
        assert_eq!(upper_bound(0), 1);
        for i in 1..OVERFLOW {
            let (low, high) = (lower_bound(i), upper_bound(i));
            assert!(high > low, "bucket {i}: {low}..{high}");
            assert_eq!(bucket(low), i, "bucket {i} starts at {low}");
            assert_eq!(bucket(high - 1), i, "bucket {i} ends before {high}");
            // At most 1/16 of its lower bound wide, or 1 µs.
            assert!(
                (high - low) * SUB_BUCKETS as u64 <= low.max(SUB_BUCKETS as u64),
                "bucket {i}: {low}..{high} is too wide"
            );
        }
        assert_eq!(upper_bound(OVERFLOW - 1), RANGE.as_micros() as u64);
        assert_eq!(bucket(upper_bound(OVERFLOW - 1)), OVERFLOW);
        assert_eq!(bucket(u64::MAX), OVERFLOW);
        // The range the contract needs: fine below 100 µs, tracked beyond 60 s.
        assert!(upper_bound(bucket(100)) - lower_bound(bucket(100)) <= 4);
        assert!(bucket(60_000_000) < OVERFLOW);
        // Monotonic over values too, including every power of two and its neighbours.
        let mut values: Vec<u64> = (0..64)
            .flat_map(|bit| {
                let power = 1u64 << bit;
                [power - 1, power, power.saturating_add(1)]
            })
            .collect();
        values.sort_unstable();
        for pair in values.windows(2) {
            assert!(bucket(pair[0]) <= bucket(pair[1]), "{pair:?}");
        }
    }

    /// The exact quantile of sorted `samples` as `quantile` defines its rank.
    fn exact(samples: &[Duration], q: f64) -> Duration {
        let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        samples[rank - 1]
    }

    #[test]
    fn quantiles_are_at_most_one_bucket_above_the_exact_ones() {
        let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
        // Uniform over a few ms, log-uniform over 1 µs..60 s, and two clusters far apart.
        let sets: Vec<Vec<Duration>> = vec![
            (0..1000)
                .map(|_| Duration::from_nanos(rng.next() % 5_000_000))
                .collect(),
            (0..5000)
                .map(|_| {
                    Duration::from_nanos(1000 << (rng.next() % 26))
                        + Duration::from_nanos(rng.next() % 1000)
                })
                .collect(),
            (0..997)
                .map(|k| {
                    let base = if k % 10 == 0 { 800_000_000 } else { 2_000_000 };
                    Duration::from_nanos(base + rng.next() % 100_000)
                })
                .collect(),
        ];
        for mut samples in sets {
            let stats = PairStats::new();
            for &s in &samples {
                stats.record(200, s, false);
            }
            samples.sort_unstable();
            let window = stats.read().total();
            assert_eq!(window.requests, samples.len() as u64);
            for q in [0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
                let want = exact(&samples, q);
                let got = window.quantile(q).expect("requests were recorded");
                assert!(got >= want, "q {q}: {got:?} below the exact {want:?}");
                let slack = want / SUB_BUCKETS as u32 + Duration::from_micros(1);
                assert!(
                    got <= want + slack,
                    "q {q}: {got:?} over {want:?} by more than a bucket"
                );
            }
            assert_eq!(window.p99(), window.quantile(0.99));
        }
    }

    #[test]
    fn quantile_edges() {
        let stats = PairStats::new();
        assert_eq!(stats.read().total().quantile(0.5), None);
        assert_eq!(Window::default().p99(), None);
        stats.record(200, Duration::from_micros(7), false);
        stats.record(200, Duration::from_secs(3600), false);
        let window = stats.read().total();
        assert_eq!(window.quantile(-1.0), Some(Duration::from_micros(8)));
        assert_eq!(window.quantile(f64::NAN), Some(Duration::from_micros(8)));
        assert_eq!(window.quantile(0.5), Some(Duration::from_micros(8)));
        // Beyond the range: no bound is known, so no limit can pass.
        assert_eq!(window.quantile(0.51), Some(Duration::MAX));
        assert_eq!(window.quantile(2.0), Some(Duration::MAX));
    }

    #[test]
    fn errors_are_5xx_or_failures_under_any_status_and_499_is_not_counted() {
        let stats = PairStats::new();
        let ms = Duration::from_millis(1);
        for (status, failed) in [
            (200, false),
            (404, false),
            (500, false),
            (503, false),
            // Broken off mid-body, or a gRPC error status under HTTP 200.
            (200, true),
            (499, false),
            (499, true),
        ] {
            stats.record(status, ms, failed);
        }
        let window = stats.read().total();
        assert_eq!((window.requests, window.errors), (5, 3));
        assert!((window.error_rate() - 0.6).abs() < 1e-12);
        assert_eq!(Window::default().error_rate(), 0.0);
    }

    #[test]
    fn since_takes_the_difference_of_two_readings() {
        let stats = PairStats::new();
        let fast = Duration::from_micros(100);
        let slow = Duration::from_millis(300);
        for _ in 0..10 {
            stats.record(200, slow, false);
        }
        let first = stats.read();
        for k in 0..100 {
            stats.record(if k < 4 { 502 } else { 200 }, fast, false);
        }
        let second = stats.read();
        let window = second.since(&first);
        assert_eq!((window.requests, window.errors), (100, 4));
        assert!((window.error_rate() - 0.04).abs() < 1e-12);
        // The slow requests before `first` are not in the window.
        let p99 = window.p99().unwrap();
        assert!(p99 >= fast && p99 < Duration::from_micros(110), "{p99:?}");
        assert!(second.total().p99().unwrap() >= slow);
        // Backwards (or against another pair's reading): empty, not wrapped.
        let back = first.since(&second);
        assert_eq!((back.requests, back.errors, back.p99()), (0, 0, None));
        // A reading that caught errors before their requests keeps errors within requests.
        let torn = StatsReading {
            errors: first.errors + 3,
            ..first.clone()
        };
        let window = torn.since(&first);
        assert_eq!(
            (window.requests, window.errors, window.error_rate()),
            (0, 0, 0.0)
        );
    }

    #[test]
    fn merged_windows_count_as_one_pair() {
        let (a, b, both) = (PairStats::new(), PairStats::new(), PairStats::new());
        for k in 0..100u64 {
            let (stats, status) = if k % 4 == 0 { (&b, 503) } else { (&a, 200) };
            let latency = Duration::from_micros(100 + k * 37);
            stats.record(status, latency, false);
            both.record(status, latency, false);
        }
        let mut merged = a.read().total();
        merged.merge(&b.read().total());
        let want = both.read().total();
        assert_eq!(
            (merged.requests, merged.errors),
            (want.requests, want.errors)
        );
        assert_eq!((merged.requests, merged.errors), (100, 25));
        assert_eq!(merged.p99(), want.p99());
        assert_eq!(merged.quantile(0.5), want.quantile(0.5));
    }

    #[test]
    fn concurrent_records_add_up_exactly() {
        let stats = PairStats::new();
        const PER_THREAD: u64 = 50_000;
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let stats = &stats;
                scope.spawn(move || {
                    for k in 0..PER_THREAD {
                        let status = if k % 10 == t { 500 } else { 200 };
                        stats.record(status, Duration::from_micros(k % 2000 + t), false);
                    }
                });
            }
        });
        let window = stats.read().total();
        assert_eq!(window.requests, 4 * PER_THREAD);
        assert_eq!(window.errors, 4 * PER_THREAD / 10);
        assert_eq!(window.latency.iter().sum::<u64>(), 4 * PER_THREAD);
    }

    #[test]
    fn the_registry_hands_out_one_pair_per_pair_of_names() {
        let registry = PairRegistry::default();
        let a = registry.pair("web", "green");
        assert!(Arc::ptr_eq(&a, &registry.pair("web", "green")));
        assert!(!Arc::ptr_eq(&a, &registry.pair("web", "blue")));
        assert!(!Arc::ptr_eq(&a, &registry.pair("api", "green")));
    }
}
