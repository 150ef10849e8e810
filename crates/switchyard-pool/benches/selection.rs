//! What Switchyard adds to every request before Pingora connects: route match, split pick,
//! backend pick and counting the request in flight (up and down), and counting it in the
//! metrics and the rollout analysis stats when it is answered, per algorithm, as backends grow
//! from 2 to 1 000 and routes from 1 to 100. Then the counting alone, per answered request:
//! the Prometheus metrics (`count_request`), the analysis stats (`count_for_analysis`), and
//! both, as the proxy's logging phase does. And routing by request content: a `match` on a
//! header, a cookie, a query parameter and the method in front of a sticky split keyed by a
//! cookie, and a `hash` upstream keyed by a header, over browser-like request heads.
//! Also counts heap allocations on that path, which must be zero once each route, upstream,
//! backend and status has been counted once (their metric handles are made on first use).
//!
//! `cargo bench -p switchyard-pool` measures (release profile). Run as a test (`cargo test
//! --all-targets`) it does a few iterations of each case and fails if any allocates.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method};
use switchyard_config::Config;
use switchyard_pool::{Metrics, Pick, Pool, Request, Routing, Snapshot, UpstreamCas};

static NO_HEADERS: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(HeaderMap::new);

/// A GET of `path` on example.com from `client`.
fn request<'a>(path: &'a str, client: IpAddr, headers: &'a HeaderMap) -> Request<'a> {
    Request {
        host: Some("example.com"),
        path,
        query: None,
        method: &Method::GET,
        headers,
        client: Some(client),
        issued: None,
    }
}

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One upstream `app` of `backends` backends (weights 1..=4), and `routes` path-prefix routes
/// of which only the last matches the benchmark's path.
fn config(algorithm: &str, backends: usize, routes: usize) -> String {
    let mut yaml = String::from("listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n");
    writeln!(yaml, "  app:\n    algorithm: {algorithm}\n    backends:").unwrap();
    for i in 0..backends {
        let weight = if algorithm == "round_robin" {
            1
        } else {
            1 + i % 4
        };
        let (hi, lo) = (i / 250, i % 250);
        writeln!(
            yaml,
            "      - address: 127.0.{hi}.{}:8000\n        weight: {weight}",
            lo + 1
        )
        .unwrap();
    }
    yaml.push_str("  canary:\n    backends:\n      - address: 127.0.9.1:8000\nroutes:\n");
    for r in 0..routes {
        let prefix = if r + 1 == routes { "/app/" } else { "/other/" };
        writeln!(
            yaml,
            "  - name: r{r}\n    path_prefix: {prefix}{r}\n    split:\n      app: 90\n      canary: 10"
        )
        .unwrap();
    }
    yaml
}

fn snapshot(yaml: &str) -> Arc<Snapshot> {
    let config = Config::from_yaml(yaml).expect("benchmark config is valid");
    Pool::new(
        config,
        UpstreamCas::default(),
        Arc::new(Metrics::new()),
        None,
    )
    .expect("no state file")
    .snapshot()
}

/// One request's worth of decisions; returns something so that none is optimised away.
fn decide(snapshot: &Snapshot, path: &str, client: IpAddr, headers: &HeaderMap) -> usize {
    let (path, query) = path
        .split_once('?')
        .map_or((path, None), |(path, query)| (path, Some(query)));
    let request = Request {
        query,
        ..request(path, client, headers)
    };
    let route = snapshot.match_route(&request).expect("a route matches");
    let Pick {
        upstream, backend, ..
    } = snapshot.pick(route, &request).expect("a backend");
    // The request's in-flight count, up now and down when it ends, as the proxy does.
    let request = snapshot.upstreams[upstream].hold(backend);
    black_box(&request);
    snapshot.count_request(route, upstream, backend, 200, Duration::from_micros(50));
    snapshot.count_for_analysis(route, upstream, 200, Duration::from_micros(50), false);
    upstream + backend
}

/// What the logging phase counts of an answered request.
#[derive(Clone, Copy)]
enum Count {
    /// The Prometheus metrics alone: the logging phase before the analysis stats.
    Prometheus,
    Analysis,
    Both,
}

impl Count {
    const ALL: [Count; 3] = [Count::Prometheus, Count::Analysis, Count::Both];

    fn name(self) -> &'static str {
        match self {
            Count::Prometheus => "count_request (Prometheus only)",
            Count::Analysis => "count_for_analysis (pair stats only)",
            Count::Both => "count_request + count_for_analysis",
        }
    }
}

/// Counts `iterations` answered requests of the first route, upstream and backend of `case`,
/// with latencies spread over a thousand histogram values; returns the time taken and the
/// allocations made.
fn run_counting(case: &Case, how: Count, iterations: usize) -> (Duration, u64) {
    let snapshot = &case.snapshot;
    let route = snapshot
        .match_route(&request(&case.path, clients()[0], &NO_HEADERS))
        .expect("a route matches");
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let start = Instant::now();
    for i in 0..iterations {
        let latency = Duration::from_micros(50 + (i % 1000) as u64 * 7);
        let (route, status) = (black_box(route), black_box(200));
        if matches!(how, Count::Prometheus | Count::Both) {
            snapshot.count_request(route, 0, 0, status, latency);
        }
        if matches!(how, Count::Analysis | Count::Both) {
            snapshot.count_for_analysis(route, 0, status, latency, false);
        }
    }
    (
        start.elapsed(),
        ALLOCATIONS.load(Ordering::Relaxed) - before,
    )
}

struct Case {
    name: String,
    snapshot: Arc<Snapshot>,
    path: String,
    /// Request heads taken in turn (one per simulated user).
    heads: Vec<HeaderMap>,
}

/// Browser-like request heads of 64 users: a dozen headers, five cookies of which the
/// sticky one is the fourth, a user id and a group header.
fn heads() -> Vec<HeaderMap> {
    (0..64)
        .map(|user| {
            let mut head = HeaderMap::new();
            for (name, value) in [
                ("host", "example.com".to_string()),
                ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0".into()),
                ("accept", "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8".into()),
                ("accept-language", "en-GB,en;q=0.9".into()),
                ("accept-encoding", "gzip, deflate, br".into()),
                ("referer", "https://example.com/".into()),
                ("x-user-group", "beta".into()),
                ("x-user-id", format!("user-{user}")),
                (
                    "cookie",
                    format!("_ga=GA1.2.{user}; theme=dark; session=abcdef0123456789; switchyard_user={user:032x}; lang=en"),
                ),
            ] {
                head.append(
                    http::HeaderName::from_static(name),
                    value.parse().expect("a valid header value"),
                );
            }
            head
        })
        .collect()
}

/// `sticky_routes` routes that each check (and miss) a header, then one that matches beta users' GETs with a preview query and splits
/// them by their sticky cookie; and a `hash` upstream keyed by `X-User-Id`.
fn routing_config(sticky_routes: usize) -> String {
    let mut yaml = String::from(
        "listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  blue:\n    backends:\n      - address: 127.0.1.1:8000\n  green:\n    algorithm: hash\n    hash_on: {header: X-User-Id}\n    backends:\n",
    );
    for i in 0..10 {
        writeln!(
            yaml,
            "      - address: 127.0.2.{}:8000\n        weight: {}",
            i + 1,
            1 + i % 3
        )
        .unwrap();
    }
    yaml.push_str("routes:\n");
    for r in 0..sticky_routes {
        writeln!(
            yaml,
            "  - name: other{r}\n    match: {{headers: {{X-User-Group: alpha}}}}\n    split: {{blue: 1}}"
        )
        .unwrap();
    }
    yaml.push_str(
        "  - name: beta\n    path_prefix: /app/\n    match:\n      headers: {X-User-Group: beta}\n      cookies: {session: '*'}\n      query: {preview: '1'}\n      methods: [GET, HEAD]\n    split: {blue: 95, green: 5}\n    sticky: {cookie: switchyard_user}\n",
    );
    yaml
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for algorithm in [
        "round_robin",
        "weighted_round_robin",
        "least_connections",
        "ip_hash",
    ] {
        for backends in [2, 10, 100, 1000] {
            cases.push(Case {
                name: format!("{algorithm}, {backends} backends, 1 route"),
                snapshot: snapshot(&config(algorithm, backends, 1)),
                path: "/app/0/x".into(),
                heads: vec![HeaderMap::new()],
            });
        }
    }
    for routes in [10, 100] {
        cases.push(Case {
            name: format!("round_robin, 2 backends, {routes} routes (last matches)"),
            snapshot: snapshot(&config("round_robin", 2, routes)),
            path: format!("/app/{}/x", routes - 1),
            heads: vec![HeaderMap::new()],
        });
    }
    for routes in [0, 10] {
        cases.push(Case {
            name: format!("match + sticky cookie, hash on header ({routes} routes before)"),
            snapshot: snapshot(&routing_config(routes)),
            path: "/app/page?lang=en&preview=1".into(),
            heads: heads(),
        });
    }
    cases
}

/// Distinct client addresses, so that ip_hash does not hit one ring point.
fn clients() -> Vec<IpAddr> {
    (0..1024u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 7919)))
        .collect()
}

/// Runs `iterations` decisions; returns the time taken and the allocations made.
fn run(case: &Case, clients: &[IpAddr], iterations: usize) -> (Duration, u64) {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut sink = 0;
    for i in 0..iterations {
        sink += decide(
            &case.snapshot,
            black_box(&case.path),
            clients[i % clients.len()],
            &case.heads[i % case.heads.len()],
        );
    }
    black_box(sink);
    (
        start.elapsed(),
        ALLOCATIONS.load(Ordering::Relaxed) - before,
    )
}

/// Warms up with 100k iterations of `round`, then takes the best of five rounds of 1M (the
/// least disturbed by the rest of the machine): ns per iteration, and the allocations of all
/// five rounds.
fn measure(round: impl Fn(usize) -> (Duration, u64)) -> (f64, u64) {
    round(100_000);
    let mut best = Duration::MAX;
    let mut allocations = 0;
    for _ in 0..5 {
        let (took, allocated) = round(1_000_000);
        best = best.min(took);
        allocations += allocated;
    }
    (best.as_nanos() as f64 / 1e6, allocations)
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let clients = clients();
    let cases = cases();
    if !measuring {
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        black_box(vec![0u8; 16]);
        assert!(
            ALLOCATIONS.load(Ordering::Relaxed) > before,
            "the counter counts"
        );
        for case in &cases {
            // Long enough to make every backend's handles (a weighted period is 2 500 picks).
            run(case, &clients, 10_000);
            let (_, allocations) = run(case, &clients, 1000);
            assert_eq!(allocations, 0, "{}: the request path allocated", case.name);
        }
        for case in cases.iter().filter(|c| c.heads.len() > 1) {
            let counts = case
                .snapshot
                .routes
                .last()
                .expect("a route")
                .routing_counts();
            assert!(
                counts
                    .iter()
                    .all(|&(how, n)| (how == Routing::Sticky) == (n > 0)),
                "{}: every request matched and went by its sticky key: {counts:?}",
                case.name
            );
        }
        for how in Count::ALL {
            run_counting(&cases[0], how, 1000);
            let (_, allocations) = run_counting(&cases[0], how, 1000);
            assert_eq!(allocations, 0, "{}: counting allocated", how.name());
        }
        println!(
            "{} selection cases and {} ways of counting run, none allocated",
            cases.len(),
            Count::ALL.len()
        );
        return;
    }
    println!("{:<64} {:>10} {:>12}", "case", "ns/request", "allocations");
    for case in &cases {
        let (ns, allocations) = measure(|n| run(case, &clients, n));
        println!("{:<64} {ns:>10.1} {allocations:>12}", case.name);
    }
    println!();
    println!(
        "{:<58} {:>10} {:>12}",
        "counting an answered request", "ns/call", "allocations"
    );
    for how in Count::ALL {
        let (ns, allocations) = measure(|n| run_counting(&cases[0], how, n));
        println!("{:<58} {ns:>10.1} {allocations:>12}", how.name());
    }
}
