//! Properties of selection and splitting, proven on snapshots built from real configs.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use switchyard_config::Config;

use crate::least::SCAN_LIMIT;
use crate::{
    BackendState, Change, InFlight, Metrics, Rejection, Request, RuntimeState, Snapshot,
    UpstreamCas,
};

static NO_HEADERS: std::sync::LazyLock<http::HeaderMap> =
    std::sync::LazyLock::new(http::HeaderMap::new);

/// A GET of `/` from `client` with no headers.
fn bare(client: Option<IpAddr>) -> Request<'static> {
    Request {
        host: None,
        path: "/",
        query: None,
        method: &http::Method::GET,
        headers: &NO_HEADERS,
        client,
        issued: None,
    }
}

/// A GET of `path` on `host` with no headers.
fn at<'a>(host: Option<&'a str>, path: &'a str) -> Request<'a> {
    Request {
        host,
        path,
        ..bare(None)
    }
}

fn build(config: &Config, previous: Option<&Snapshot>) -> Snapshot {
    Snapshot::build(
        config,
        &UpstreamCas::default(),
        &RuntimeState::default(),
        &Metrics::new(),
        previous,
    )
}

fn config(algorithm: &str, weights: &[u32]) -> Config {
    config_with(algorithm, weights, "")
}

/// `extra` is YAML for the upstream, after its backends (e.g. a health check).
fn config_with(algorithm: &str, weights: &[u32], extra: &str) -> Config {
    let backends: String = weights
        .iter()
        .enumerate()
        .map(|(i, w)| {
            format!(
                "      - address: 127.0.0.1:{}\n        weight: {w}\n",
                9001 + i
            )
        })
        .collect();
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  pool:\n    algorithm: {algorithm}\n    backends:\n{backends}{extra}routes:\n  - name: all\n    split:\n      pool: 1\n"
    );
    Config::from_yaml(&yaml).expect("valid test config")
}

fn port_of(snapshot: &Snapshot, backend: usize) -> u16 {
    snapshot.upstreams[0].backends[backend].live.address.port()
}

fn picks(snapshot: &Snapshot, n: usize) -> Vec<u16> {
    (0..n)
        .map(|_| {
            let b = snapshot.upstreams[0]
                .pick_backend(&bare(None), None)
                .expect("a backend");
            port_of(snapshot, b)
        })
        .collect()
}

fn counts(ports: &[u16]) -> HashMap<u16, usize> {
    let mut out = HashMap::new();
    for p in ports {
        *out.entry(*p).or_default() += 1;
    }
    out
}

/// Applies `change` to the first upstream's backends and rebuilds, as an admin change would.
fn with_backends(snapshot: &Snapshot, change: impl Fn(usize, &mut crate::Backend)) -> Snapshot {
    let mut next = snapshot.rebuilt();
    for (i, b) in next.upstreams[0].backends.iter_mut().enumerate() {
        change(i, b);
    }
    next.rebuilt()
}

#[test]
fn smooth_weighted_round_robin_is_exact_in_every_window_and_interleaved() {
    let s = build(&config("weighted_round_robin", &[5, 1, 1]), None);
    let seq = picks(&s, 700);
    assert_eq!(&seq[..7], &[9001, 9001, 9002, 9001, 9003, 9001, 9001]);
    for window in seq.windows(7) {
        let c = counts(window);
        assert_eq!((c[&9001], c[&9002], c[&9003]), (5, 1, 1), "{window:?}");
    }
    let longest_run = seq
        .chunk_by(|a, b| a == b)
        .map(|run| run.len())
        .max()
        .unwrap();
    // nginx's sequence ends and starts with "a a", so 4 in a row across periods is its
    // longest run; a bursty a-a-a-a-a-b-c would show 5.
    assert!(longest_run <= 4, "runs of {longest_run}: not smooth");
}

#[test]
fn round_robin_ignores_weights() {
    let s = build(&config("round_robin", &[5, 1, 1]), None);
    let c = counts(&picks(&s, 300));
    assert_eq!((c[&9001], c[&9002], c[&9003]), (100, 100, 100));
}

#[test]
fn least_connections_prefers_the_least_loaded_relative_to_weight() {
    let s = build(&config("least_connections", &[1, 1, 2]), None);
    let up = &s.upstreams[0];
    // A slow backend holds requests: it must get none while the others have fewer.
    let held: Vec<InFlight> = (0..3).map(|_| up.hold(0)).collect();
    let mut guards = Vec::new();
    for _ in 0..6 {
        let b = up.pick_backend(&bare(None), None).unwrap();
        guards.push(up.hold(b));
    }
    let c = counts(
        &guards
            .iter()
            .map(|g| g.backend().address.port())
            .collect::<Vec<_>>(),
    );
    // 9001 holds 3; 9002 (w1) and 9003 (w2) fill so that load/weight stays lowest: 2 and 4.
    assert_eq!(c.get(&9001), None);
    assert_eq!((c[&9002], c[&9003]), (2, 4));
    drop(held);
    drop(guards);
    // All idle: ties are broken round robin, not always the first backend.
    let c = counts(&picks(&s, 300));
    assert_eq!((c[&9001], c[&9002], c[&9003]), (100, 100, 100));
}

/// Small deterministic generator for randomised sequences of requests.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Whether backend `b` has the fewest in-flight requests relative to weight of all.
fn is_least_loaded(s: &Snapshot, b: usize) -> bool {
    is_least_loaded_but(s, b, None)
}

/// Whether backend `b` has the fewest in-flight requests relative to weight of all but
/// `excluded`.
fn is_least_loaded_but(s: &Snapshot, b: usize, excluded: Option<usize>) -> bool {
    let up = &s.upstreams[0];
    let key = |i: usize| {
        (
            up.backends[i].live.in_flight() as u64,
            u64::from(up.backends[i].weight),
        )
    };
    let (load, weight) = key(b);
    (0..up.backends.len())
        .filter(|&i| Some(i) != excluded)
        .all(|i| {
            let (other, other_weight) = key(i);
            load * other_weight <= other * weight
        })
}

#[test]
fn least_connections_is_exact_over_any_sequence_of_starts_and_ends() {
    // Small upstreams scan, large ones keep a tree.
    for backends in [5, SCAN_LIMIT + 13] {
        let weights: Vec<u32> = (0..backends).map(|i| 1 + (i as u32 * 7) % 5).collect();
        let s = build(&config("least_connections", &weights), None);
        let up = &s.upstreams[0];
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut held: Vec<InFlight> = Vec::new();
        for step in 0..5000 {
            if held.is_empty() || rng.below(3) > 0 {
                let b = up.pick_backend(&bare(None), None).unwrap();
                assert!(
                    is_least_loaded(&s, b),
                    "{backends}, step {step}: picked {b}"
                );
                held.push(up.hold(b));
            } else {
                let gone = rng.below(held.len());
                held.swap_remove(gone);
            }
        }
    }
}

#[test]
fn least_connections_follows_requests_that_end_after_a_rebuild() {
    let s = build(&config("least_connections", &[1; 40]), None);
    let first = s.upstreams[0].pick_backend(&bare(None), None).unwrap();
    assert_eq!(first, 0);
    // One request on every backend but 0, five on backend 0.
    let mut old: Vec<InFlight> = (1..40).map(|b| s.upstreams[0].hold(b)).collect();
    old.extend((0..5).map(|_| s.upstreams[0].hold(0)));

    // Requests of the old snapshot end before the new one picks for the first time.
    let next = s.rebuilt();
    old.truncate(39);
    assert_eq!(next.upstreams[0].pick_backend(&bare(None), None), Some(0));

    // And after the new one took over.
    let held: Vec<InFlight> = (0..4).map(|_| next.upstreams[0].hold(0)).collect();
    let last = next.rebuilt();
    let up = &last.upstreams[0];
    let busy: Vec<InFlight> = (0..2)
        .map(|_| up.hold(up.pick_backend(&bare(None), None).unwrap()))
        .collect();
    assert!(busy.iter().all(|g| g.backend().address.port() != 9001));
    drop(held);
    assert_eq!(up.pick_backend(&bare(None), None), Some(0));
}

#[test]
fn least_connections_stays_exact_after_threads_race_on_it() {
    let weights: Vec<u32> = (0..64).map(|i| 1 + i % 3).collect();
    let s = build(&config("least_connections", &weights), None);
    let up = &s.upstreams[0];
    // Each thread leaves its last requests in flight, so the loads stay uneven.
    let mut held: Vec<InFlight> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                scope.spawn(move || {
                    let mut rng = XorShift(0x2545_f491_4f6c_dd1d + t);
                    let mut held: Vec<InFlight> = Vec::new();
                    for _ in 0..20_000 {
                        if held.len() < 40 && rng.below(2) == 0 {
                            held.push(up.hold(up.pick_backend(&bare(None), None).unwrap()));
                        } else if !held.is_empty() {
                            let gone = rng.below(held.len());
                            held.swap_remove(gone);
                        }
                    }
                    held
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    // A node left behind by the race is corrected within one round of picks.
    for _ in 0..2 * weights.len() {
        drop(up.hold(up.pick_backend(&bare(None), None).unwrap()));
    }
    let mut rng = XorShift(7);
    for step in 0..2000 {
        let b = up.pick_backend(&bare(None), None).unwrap();
        assert!(
            is_least_loaded(&s, b),
            "step {step} after the race: picked {b}"
        );
        held.push(up.hold(b));
        let gone = rng.below(held.len());
        held.swap_remove(gone);
    }
}

#[test]
fn least_connections_ties_stay_round_robin_across_rebuilds() {
    for backends in [5, 40] {
        let mut s = build(&config("least_connections", &vec![1; backends]), None);
        let mut tally = vec![0usize; backends];
        for _ in 0..200 {
            s = s.rebuilt();
            let b = s.upstreams[0].pick_backend(&bare(None), None).unwrap();
            drop(s.upstreams[0].hold(b));
            tally[b] += 1;
        }
        let even = 200 / backends;
        assert!(
            tally.iter().all(|&n| n.abs_diff(even) <= 1),
            "{backends} backends: {tally:?}"
        );
    }
}

#[test]
fn least_connections_counts_requests_of_a_smaller_snapshot_in_the_tree() {
    // Two backends down: as many available as still scan.
    let n = SCAN_LIMIT + 2;
    let s = build(&config("least_connections", &vec![1; n]), None);
    let (spare_a, spare_b) = (n - 2, n - 1);
    s.upstreams[0].backends[spare_a].live.set_healthy(false);
    s.upstreams[0].backends[spare_b].live.set_healthy(false);
    let s = s.rebuilt();
    let mut held: Vec<InFlight> = (0..2 * SCAN_LIMIT)
        .map(|_| s.upstreams[0].hold(s.upstreams[0].pick_backend(&bare(None), None).unwrap()))
        .collect();
    // Back up: a tree.
    s.upstreams[0].backends[spare_a].live.set_healthy(true);
    s.upstreams[0].backends[spare_b].live.set_healthy(true);
    let next = s.rebuilt();
    let up = &next.upstreams[0];
    held.extend((0..2).flat_map(|_| [up.hold(spare_a), up.hold(spare_b)]));
    drop(up.hold(up.pick_backend(&bare(None), None).unwrap()));
    // Requests picked from the smaller snapshot end now: backend 5 alone is idle.
    held.retain(|g| g.backend().address.port() != 9006);
    for step in 0..200 {
        let b = up.pick_backend(&bare(None), None).unwrap();
        assert!(is_least_loaded(&next, b), "step {step}: picked {b}");
        drop(up.hold(b));
    }
}

#[test]
fn least_connections_retries_from_an_old_snapshot_leave_the_new_one_exact() {
    let s = build(&config("least_connections", &[1; 40]), None);
    let mut held: Vec<InFlight> = (0..60)
        .map(|_| s.upstreams[0].hold(s.upstreams[0].pick_backend(&bare(None), None).unwrap()))
        .collect();
    let next = s.rebuilt();
    let mut rng = XorShift(11);
    for step in 0..500 {
        let b = next.upstreams[0].pick_backend(&bare(None), None).unwrap();
        assert!(is_least_loaded(&next, b), "step {step}: picked {b}");
        held.push(next.upstreams[0].hold(b));
        // A retry of a request that began before the swap picks from the old snapshot.
        let retry = s.upstreams[0].pick_backend(&bare(None), Some(b)).unwrap();
        assert!(
            is_least_loaded_but(&s, retry, Some(b)),
            "step {step}: retried on {retry}"
        );
        held.push(s.upstreams[0].hold(retry));
        for _ in 0..2 {
            let gone = rng.below(held.len());
            held.swap_remove(gone);
        }
    }
}

#[test]
fn least_connections_falls_back_to_the_least_loaded_usable_backend() {
    let s = build(&config("least_connections", &[1; 40]), None);
    let up = &s.upstreams[0];
    let _held: Vec<InFlight> = (1..40).map(|b| up.hold(b)).collect();
    assert_eq!(up.pick_backend(&bare(None), None), Some(0));
    // Excluded (a retry) or down before the rebuild: the next least loaded, not any.
    let _more: Vec<InFlight> = (2..40).map(|b| up.hold(b)).collect();
    assert_eq!(up.pick_backend(&bare(None), Some(0)), Some(1));
    up.backends[0].live.set_healthy(false);
    assert_eq!(up.pick_backend(&bare(None), None), Some(1));
}

#[test]
fn least_connections_lets_go_of_backends_when_the_upstream_goes() {
    let s = build(&config("least_connections", &[1; SCAN_LIMIT + 8]), None);
    let b = s.upstreams[0].pick_backend(&bare(None), None).unwrap();
    drop(s.upstreams[0].hold(b));
    let backend = Arc::downgrade(&s.upstreams[0].backends[b].live);
    drop(s);
    assert!(
        backend.upgrade().is_none(),
        "the backend outlived its upstream"
    );
}

#[test]
fn least_connections_corrects_requests_that_never_reported_within_a_round() {
    let n = SCAN_LIMIT + 8;
    let rr = build(&config("round_robin", &vec![1; n]), None);
    // Requests that began under round robin do not report.
    let mut silent: Vec<InFlight> = (0..n).map(|b| rr.upstreams[0].hold(b)).collect();
    silent.extend((0..n).map(|b| rr.upstreams[0].hold(b)));
    let lc = build(&config("least_connections", &vec![1; n]), Some(&rr));
    let up = &lc.upstreams[0];
    let mut held: Vec<InFlight> = (0..n)
        .map(|_| up.hold(up.pick_backend(&bare(None), None).unwrap()))
        .collect();
    // Two backends go idle without a word to the tree.
    silent.retain(|g| ![9003, 9020].contains(&g.backend().address.port()));
    for _ in 0..2 * n {
        held.push(up.hold(up.pick_backend(&bare(None), None).unwrap()));
        held.swap_remove(0);
    }
    for step in 0..200 {
        let b = up.pick_backend(&bare(None), None).unwrap();
        assert!(is_least_loaded(&lc, b), "step {step}: picked {b}");
        held.push(up.hold(b));
        held.swap_remove(0);
    }
}

#[test]
fn least_connections_lets_go_of_removed_backends_after_a_switch_to_round_robin() {
    let n = SCAN_LIMIT + 8;
    let lc = build(&config("least_connections", &vec![1; n]), None);
    drop(lc.upstreams[0].hold(lc.upstreams[0].pick_backend(&bare(None), None).unwrap()));
    let last = Arc::downgrade(&lc.upstreams[0].backends[n - 1].live);
    let rr = build(&config("round_robin", &vec![1; n - 1]), Some(&lc));
    drop(lc);
    assert!(last.upgrade().is_none(), "a removed backend is kept");
    drop(rr);
}

fn ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn assignment(s: &Snapshot, clients: u32) -> Vec<SocketAddr> {
    (0..clients)
        .map(|i| {
            let b = s.upstreams[0]
                .pick_backend(&bare(Some(ip(i))), None)
                .unwrap();
            s.upstreams[0].backends[b].live.address
        })
        .collect()
}

#[test]
fn ip_hash_moves_only_the_clients_of_a_backend_that_leaves() {
    // Equal weights, weights with a common divisor, and weights the ring scales down (none,
    // over its bound); the backend leaves by failing its check, by weight 0, or removed.
    for weights in [
        &[1, 1, 1, 1][..],
        &[3, 6, 5],
        &[997, 991, 1000, 983, 977, 971, 967, 953, 947, 941],
    ] {
        for how in ["unhealthy", "weight 0", "removed"] {
            moves_only_the_clients_of_a_backend_that_leaves(weights, how);
        }
    }
}

fn moves_only_the_clients_of_a_backend_that_leaves(weights: &[u32], how: &str) {
    let s = build(&config("ip_hash", weights), None);
    let before = assignment(&s, 10_000);
    assert_eq!(before, assignment(&s, 10_000), "same client, same backend");
    let gone = s.upstreams[0].backends[2].live.address;
    let after = match how {
        "unhealthy" => {
            s.upstreams[0].backends[2].live.set_healthy(false);
            s.rebuilt()
        }
        "weight 0" => with_backends(&s, |i, b| {
            if i == 2 {
                b.weight = 0;
            }
        }),
        _ => {
            let mut next = s.rebuilt();
            next.upstreams[0].backends.remove(2);
            next.rebuilt()
        }
    };
    let after = assignment(&after, 10_000);
    let mut moved_from_gone = 0;
    for (b, a) in before.iter().zip(&after) {
        if *b == gone {
            assert_ne!(a, &gone);
            moved_from_gone += 1;
        } else {
            assert_eq!(
                a, b,
                "{weights:?}, {how}: a client of a backend that stayed moved"
            );
        }
    }
    assert!(
        moved_from_gone > 10_000 / weights.len() / 4,
        "{weights:?}, {how}: {moved_from_gone}"
    );
}

#[test]
fn ip_hash_spreads_clients_in_proportion_to_weight() {
    let s = build(&config("ip_hash", &[1, 2, 3, 4]), None);
    let c = counts(
        &assignment(&s, 10_000)
            .iter()
            .map(|a| a.port())
            .collect::<Vec<_>>(),
    );
    for (port, weight) in [(9001, 1.0), (9002, 2.0), (9003, 3.0), (9004, 4.0)] {
        let share = c[&port] as f64 / 10_000.0;
        let want = weight / 10.0;
        assert!((share - want).abs() < 0.03, "{port}: {share} vs {want}");
    }
}

#[test]
fn unavailable_backends_get_no_new_requests() {
    for algorithm in [
        "round_robin",
        "weighted_round_robin",
        "least_connections",
        "ip_hash",
    ] {
        let s = build(&config(algorithm, &[1, 0, 1, 1, 1]), None);
        let s = with_backends(&s, |i, b| match i {
            2 => b.state = BackendState::Draining,
            3 => b.state = BackendState::Disabled,
            _ => {}
        });
        s.upstreams[0].backends[4].live.set_healthy(false);
        let s = s.rebuilt();
        for i in 0..500 {
            let b = s.upstreams[0]
                .pick_backend(&bare(Some(ip(i))), None)
                .unwrap();
            assert_eq!(b, 0, "{algorithm} picked backend {b}");
        }
        assert_eq!(
            s.upstreams[0].pick_backend(&bare(Some(ip(1))), Some(0)),
            None,
            "{algorithm}: nothing left after excluding the only one"
        );
    }
}

#[test]
fn a_health_flip_is_honoured_before_the_rebuild() {
    let s = build(&config("weighted_round_robin", &[3, 1]), None);
    s.upstreams[0].backends[0].live.set_healthy(false);
    assert!(picks(&s, 50).iter().all(|&p| p == 9002));
}

#[test]
fn retries_exclude_the_failed_backend() {
    for algorithm in [
        "round_robin",
        "weighted_round_robin",
        "least_connections",
        "ip_hash",
    ] {
        let s = build(&config(algorithm, &[1, 1, 1]), None);
        for i in 0..100 {
            let first = s.upstreams[0]
                .pick_backend(&bare(Some(ip(i))), None)
                .unwrap();
            let second = s.upstreams[0]
                .pick_backend(&bare(Some(ip(i))), Some(first))
                .unwrap();
            assert_ne!(first, second, "{algorithm}");
        }
    }
}

const TWO_UPSTREAMS: &str = r#"
listeners:
  - address: 127.0.0.1:8080
upstreams:
  blue:
    backends:
      - address: 127.0.0.1:9001
  green:
    backends:
      - address: 127.0.0.1:9002
routes:
  - name: api
    host: api.example.com
    path_prefix: /v1/
    split:
      green: 1
  - name: web
    split:
      blue: 90
      green: 10
"#;

#[test]
fn split_is_exact_over_every_ten_requests() {
    let s = build(&Config::from_yaml(TWO_UPSTREAMS).unwrap(), None);
    let web = s.match_route(&at(Some("example.com"), "/")).unwrap();
    let upstreams: Vec<usize> = (0..1000)
        .map(|_| {
            s.pick(web, &bare(None))
                .map(|p| (p.upstream, p.backend))
                .unwrap()
                .0
        })
        .collect();
    for window in upstreams.windows(10) {
        assert_eq!(window.iter().filter(|&&u| u == 1).count(), 1, "{window:?}");
    }
}

#[test]
fn an_upstream_without_backends_gives_its_share_away_and_none_left_is_none() {
    let s = build(&Config::from_yaml(TWO_UPSTREAMS).unwrap(), None);
    let web = s.match_route(&at(None, "/")).unwrap();
    s.upstreams[0].backends[0].live.set_healthy(false);
    let s = s.rebuilt();
    assert!((0..100).all(|_| s
        .pick(web, &bare(None))
        .map(|p| (p.upstream, p.backend))
        .unwrap()
        .0
        == 1));
    s.upstreams[1].backends[0].live.set_healthy(false);
    let s = s.rebuilt();
    assert_eq!(
        s.pick(web, &bare(None)).map(|p| (p.upstream, p.backend)),
        None
    );
}

const THREE_UPSTREAMS: &str = r#"
listeners: [{address: 127.0.0.1:8080}]
upstreams:
  amber: {backends: [{address: 127.0.0.1:9003}]}
  blue: {backends: [{address: 127.0.0.1:9001}]}
  green: {backends: [{address: 127.0.0.1:9002}]}
routes:
  - {name: web, split: {blue: 60, green: 30, amber: 10}}
"#;

#[test]
fn effective_shares_follow_the_split_over_the_upstreams_with_a_backend() {
    let s = build(&Config::from_yaml(THREE_UPSTREAMS).unwrap(), None);
    let web = s.match_route(&at(None, "/")).unwrap();
    let shares = |s: &Snapshot| -> Vec<(String, f64)> {
        s.routes[web]
            .effective_shares(&s.upstreams)
            .iter()
            .map(|&(u, share)| (s.upstreams[u].name.to_string(), share))
            .collect()
    };
    let near = |got: Vec<(String, f64)>, want: &[(&str, f64)]| {
        assert_eq!(got.len(), want.len(), "{got:?}");
        for ((name, share), (want_name, want_share)) in got.iter().zip(want) {
            assert_eq!(name, want_name);
            assert!((share - want_share).abs() < 1e-9, "{got:?} vs {want:?}");
        }
    };
    // Split order is upstream name order.
    near(shares(&s), &[("amber", 0.1), ("blue", 0.6), ("green", 0.3)]);

    // Blue loses its only backend: its 60 go to green and amber in proportion (3:1), exactly
    // as the picks go.
    s.upstreams[1].backends[0].live.set_healthy(false);
    let s = s.rebuilt();
    near(
        shares(&s),
        &[("amber", 0.25), ("blue", 0.0), ("green", 0.75)],
    );
    let picked = (0..400)
        .filter(|_| s.pick(web, &bare(None)).map(|p| p.upstream) == Some(2))
        .count();
    assert_eq!(picked, 300);

    // None left with a backend: all 0, and every request is a 503.
    for u in [0, 2] {
        s.upstreams[u].backends[0].live.set_healthy(false);
    }
    let s = s.rebuilt();
    near(shares(&s), &[("amber", 0.0), ("blue", 0.0), ("green", 0.0)]);
    assert_eq!(s.pick(web, &bare(None)), None);
}

#[test]
fn routes_match_host_without_port_and_path_prefix_in_order() {
    let s = build(&Config::from_yaml(TWO_UPSTREAMS).unwrap(), None);
    // The proxy hands over the name without its port (switchyard-proxy's `host.rs`).
    let host = Some;
    assert_eq!(
        s.match_route(&at(host("API.example.com"), "/v1/users")),
        Some(0)
    );
    assert_eq!(
        s.match_route(&at(host("api.example.com"), "/v2/users")),
        Some(1)
    );
    assert_eq!(s.match_route(&at(host("other"), "/v1/users")), Some(1));
    assert_eq!(s.match_route(&at(None, "/v1/users")), Some(1));
}

#[test]
fn live_state_and_cursors_survive_a_rebuild_from_config() {
    let check = "    health_check:\n      type: tcp\n";
    let config = config_with("weighted_round_robin", &[5, 1, 1], check);
    let s = build(&config, None);
    for b in &s.upstreams[0].backends {
        b.live.set_healthy(true);
    }
    let s = s.rebuilt();
    let first = picks(&s, 3);
    let guard = s.upstreams[0].hold(1);
    s.upstreams[0].backends[2].live.set_healthy(false);
    let next = build(&config, Some(&s));
    assert_eq!(next.upstreams[0].backends[1].live.in_flight(), 1);
    assert!(!next.upstreams[0].backends[2].live.is_healthy());
    let next = with_backends(&next, |_, _| {});
    next.upstreams[0].backends[2].live.set_healthy(true);
    let next = next.rebuilt();
    // The sequence carries on where the old snapshot stopped: a a b | a c a a.
    assert_eq!(first, vec![9001, 9001, 9002]);
    assert_eq!(picks(&next, 4), vec![9001, 9003, 9001, 9001]);
    drop(guard);
}

#[test]
fn a_backend_added_to_a_checked_upstream_waits_for_its_first_check() {
    let yaml = "listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  pool:\n    backends:\n      - address: 127.0.0.1:9001\n    health_check:\n      type: tcp\nroutes:\n  - name: all\n    split:\n      pool: 1\n";
    let before = Config::from_yaml(yaml).unwrap();
    let s = build(&before, None);
    s.upstreams[0].backends[0].live.set_healthy(true);
    let s = s.rebuilt();
    let after = Config::from_yaml(&yaml.replace(
        "      - address: 127.0.0.1:9001\n",
        "      - address: 127.0.0.1:9001\n      - address: 127.0.0.1:9002\n",
    ))
    .unwrap();
    let s = build(&after, Some(&s));
    assert!(
        s.upstreams[0].backends[0].live.is_healthy(),
        "kept its health"
    );
    assert!(
        picks(&s, 20).iter().all(|&p| p == 9001),
        "new backend unchecked"
    );
    s.upstreams[0].backends[1].live.set_healthy(true);
    let c = counts(&picks(&s.rebuilt(), 20));
    assert_eq!((c[&9001], c[&9002]), (10, 10));
}

fn blue_green() -> Config {
    Config::from_yaml(TWO_UPSTREAMS).unwrap()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn changes_are_checked_and_a_rejected_one_changes_nothing() {
    let config = blue_green();
    let state = RuntimeState::default();
    let idle = |_: &str, _: SocketAddr| 0;
    let split = |pairs: &[(&str, u32)]| Change::SetSplit {
        route: "web".into(),
        split: pairs.iter().map(|(u, w)| (u.to_string(), *w)).collect(),
    };
    let next = state
        .with_change(&config, &split(&[("blue", 70), ("green", 30)]), idle)
        .unwrap();
    assert_eq!(
        next.split(&config, "web").unwrap(),
        vec![("blue", 70), ("green", 30)]
    );
    for (change, want) in [
        (split(&[("purple", 1)]), Rejection::Invalid("split.purple: unknown upstream \"purple\"".into())),
        (split(&[("blue", 0)]), Rejection::Invalid("split: weights must not all be 0".into())),
        (split(&[("blue", 10001)]), Rejection::Invalid("split.blue: 10001 is out of range 0..=10000".into())),
        (
            Change::SetSplit { route: "nope".into(), split: [("blue".to_string(), 1)].into() },
            Rejection::NotFound("no route named \"nope\"".into()),
        ),
        (
            Change::UpdateBackend { upstream: "blue".into(), address: addr(1), weight: Some(1), state: None },
            Rejection::NotFound("upstream \"blue\" has no backend 127.0.0.1:1".into()),
        ),
        (
            Change::UpdateBackend { upstream: "blue".into(), address: addr(9001), weight: Some(1001), state: None },
            Rejection::Invalid("weight: 1001 is out of range 0..=1000".into()),
        ),
        (
            Change::RemoveBackend { upstream: "blue".into(), address: addr(9001) },
            Rejection::Conflict("backend 127.0.0.1:9001 is active; set its state to \"draining\" or \"disabled\" first".into()),
        ),
        (
            Change::AddBackend { upstream: "blue".into(), address: addr(9001), weight: Some(1) },
            Rejection::Conflict("upstream \"blue\" already has backend 127.0.0.1:9001".into()),
        ),
    ] {
        assert_eq!(next.with_change(&config, &change, idle), Err(want));
    }
}

#[test]
fn drain_then_remove_and_add_back() {
    let config = blue_green();
    let idle = |_: &str, _: SocketAddr| 0;
    let busy = |_: &str, _: SocketAddr| 2;
    let drain = Change::UpdateBackend {
        upstream: "blue".into(),
        address: addr(9001),
        weight: None,
        state: Some(BackendState::Draining),
    };
    let remove = Change::RemoveBackend {
        upstream: "blue".into(),
        address: addr(9001),
    };
    let s = RuntimeState::default()
        .with_change(&config, &drain, idle)
        .unwrap();
    assert_eq!(
        s.with_change(&config, &remove, busy),
        Err(Rejection::Conflict(
            "backend 127.0.0.1:9001 still has 2 requests in flight; retry when it has none".into()
        ))
    );
    let s = s.with_change(&config, &remove, idle).unwrap();
    assert!(s.backends(&config, "blue").is_empty());
    let add = Change::AddBackend {
        upstream: "blue".into(),
        address: addr(9004),
        weight: Some(3),
    };
    let s = s.with_change(&config, &add, idle).unwrap();
    let backends = s.backends(&config, "blue");
    assert_eq!(backends.len(), 1);
    assert_eq!((backends[0].address, backends[0].weight), (addr(9004), 3));
}

#[test]
fn state_that_no_longer_fits_the_config_is_dropped_with_warnings() {
    let config = blue_green();
    let idle = |_: &str, _: SocketAddr| 0;
    let s = RuntimeState::default()
        .with_change(
            &config,
            &Change::SetSplit {
                route: "web".into(),
                split: [("green".to_string(), 1)].into(),
            },
            idle,
        )
        .unwrap()
        .with_change(
            &config,
            &Change::AddBackend {
                upstream: "blue".into(),
                address: addr(9004),
                weight: Some(1),
            },
            idle,
        )
        .unwrap();
    let smaller = Config::from_yaml(
        &TWO_UPSTREAMS
            .replace("  - name: api\n    host: api.example.com\n    path_prefix: /v1/\n    split:\n      green: 1\n", "")
            .replace("  green:\n    backends:\n      - address: 127.0.0.1:9002\n", "")
            .replace("      green: 10\n", ""),
    )
    .unwrap();
    let (kept, warnings) = s.fit(&smaller);
    assert_eq!(
        warnings,
        vec!["state: split of route \"web\" dropped: split.green: unknown upstream \"green\""]
    );
    assert_eq!(
        kept.backends(&smaller, "blue").len(),
        2,
        "the added backend stays"
    );
    let json = serde_json::to_string(&kept).unwrap();
    assert_eq!(serde_json::from_str::<RuntimeState>(&json).unwrap(), kept);
}

#[test]
fn an_edit_of_the_file_wins_over_an_older_api_override() {
    let config = blue_green();
    let idle = |_: &str, _: SocketAddr| 0;
    let s = RuntimeState::default()
        .with_change(
            &config,
            &Change::SetSplit {
                route: "web".into(),
                split: [("blue".to_string(), 70), ("green".to_string(), 30)].into(),
            },
            idle,
        )
        .unwrap()
        .with_change(
            &config,
            &Change::UpdateBackend {
                upstream: "blue".into(),
                address: addr(9001),
                weight: Some(5),
                state: Some(BackendState::Draining),
            },
            idle,
        )
        .unwrap();
    let (same, warnings) = s.fit(&config);
    assert_eq!(
        (same, warnings.len()),
        (s.clone(), 0),
        "an unchanged file keeps everything"
    );
    let edited = Config::from_yaml(
        &TWO_UPSTREAMS
            .replace("blue: 90", "blue: 80")
            .replace("green: 10", "green: 20")
            .replace(
                "      - address: 127.0.0.1:9001\n",
                "      - address: 127.0.0.1:9001\n        weight: 3\n",
            ),
    )
    .unwrap();
    let (kept, warnings) = s.fit(&edited);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert_eq!(
        kept.split(&edited, "web").unwrap(),
        vec![("blue", 80), ("green", 20)]
    );
    let blue = kept.backends(&edited, "blue");
    assert_eq!(
        (blue[0].weight, blue[0].state),
        (3, BackendState::Draining),
        "the drain stays"
    );
}

#[test]
fn a_removed_file_backend_comes_back_with_the_files_weight() {
    let config = Config::from_yaml(&TWO_UPSTREAMS.replace(
        "      - address: 127.0.0.1:9001\n",
        "      - address: 127.0.0.1:9001\n        weight: 4\n",
    ))
    .unwrap();
    let idle = |_: &str, _: SocketAddr| 0;
    let s = RuntimeState::default()
        .with_change(
            &config,
            &Change::UpdateBackend {
                upstream: "blue".into(),
                address: addr(9001),
                weight: None,
                state: Some(BackendState::Disabled),
            },
            idle,
        )
        .unwrap()
        .with_change(
            &config,
            &Change::RemoveBackend {
                upstream: "blue".into(),
                address: addr(9001),
            },
            idle,
        )
        .unwrap()
        .with_change(
            &config,
            &Change::AddBackend {
                upstream: "blue".into(),
                address: addr(9001),
                weight: None,
            },
            idle,
        )
        .unwrap();
    let blue = s.backends(&config, "blue");
    assert_eq!((blue[0].weight, blue[0].state), (4, BackendState::Active));
}

#[test]
fn long_weighted_periods_are_walked_exactly_and_spread_without_being_laid_out() {
    use crate::select::Rotation;
    let weights = [700u32, 200, 100, 37];
    let rotation = Rotation::new(&[(0usize, 700), (1, 200), (2, 100), (3, 37)]);
    assert!(matches!(rotation, Rotation::Stride { .. }));
    let period: usize = weights.iter().map(|&w| w as usize).sum();
    let seq: Vec<usize> = (0..3 * period)
        .map(|k| rotation.candidates(k).next().unwrap())
        .collect();
    // Any window of one period holds each id exactly its weight.
    for start in (0..2 * period).step_by(89) {
        let mut counts = [0u32; 4];
        for &id in &seq[start..start + period] {
            counts[id] += 1;
        }
        assert_eq!(counts, weights, "window from {start}");
    }
    // Spread: in any 100 picks each id is within 3 of its share.
    for window in seq.windows(100) {
        for (id, &w) in weights.iter().enumerate() {
            let got = window.iter().filter(|&&i| i == id).count() as f64;
            let share = f64::from(w) * 100.0 / period as f64;
            assert!(
                (got - share).abs() <= 3.0,
                "id {id}: {got} of 100, share {share}"
            );
        }
    }
    // Every candidate once after the first, for the fallback when it is not usable.
    let mut all: Vec<usize> = rotation.candidates(5).collect();
    all.sort_unstable();
    assert_eq!(all, [0, 1, 2, 3]);
    // A canary of 1 in 10 000 is one pick in any 10 000, and nothing is laid out to know it.
    let canary = Rotation::new(&[("main", 9999), ("canary", 1)]);
    let hits = (0..10_000)
        .filter(|&k| canary.candidates(k + 1234).next() == Some("canary"))
        .count();
    assert_eq!(hits, 1);
    // Short periods keep nginx's order.
    assert!(matches!(
        Rotation::new(&[(0, 5), (1, 1)]),
        Rotation::Laid(_)
    ));
}

#[test]
fn routes_count_only_pairs_in_use_and_their_statuses() {
    let cfg = config("round_robin", &[1, 1]);
    let metrics = Metrics::new();
    let s = Snapshot::build(
        &cfg,
        &UpstreamCas::default(),
        &RuntimeState::default(),
        &metrics,
        None,
    );
    let text = |s: &Snapshot| String::from_utf8(metrics.render(s, &[])).unwrap();
    assert!(!text(&s).contains("switchyard_requests_total{"));
    assert!(!text(&s).contains("switchyard_request_duration_seconds_count"));
    // More distinct statuses than the table has slots, from several threads.
    std::thread::scope(|scope| {
        for t in 0..4 {
            let s = &s;
            scope.spawn(move || {
                for status in 200..230u16 {
                    s.count_request(0, 0, t % 2, status, std::time::Duration::from_millis(1));
                }
            });
        }
    });
    let out = text(&s);
    for status in 200..230 {
        for port in [9001, 9002] {
            let series = format!("switchyard_requests_total{{backend=\"127.0.0.1:{port}\",route=\"all\",status=\"{status}\",upstream=\"pool\"}} 2");
            assert!(out.contains(&series), "no {series} in\n{out}");
        }
    }
    assert!(out.contains(
        "switchyard_request_duration_seconds_count{route=\"all\",upstream=\"pool\"} 120"
    ));
}

#[test]
fn ip_hash_rings_stay_small_whatever_the_weights() {
    let weights: Vec<u32> = (0..100).map(|i| 1000 - i).collect();
    let started = std::time::Instant::now();
    let s = build(&config("ip_hash", &weights), None);
    // 100 backends of ~1000: 15 million points unscaled, 400 units (64 000 points) now.
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let mut seen = std::collections::HashSet::new();
    for i in 0..20_000u32 {
        let client = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 7919));
        seen.insert(
            s.upstreams[0]
                .pick_backend(&bare(Some(client)), None)
                .unwrap(),
        );
    }
    assert_eq!(seen.len(), 100, "every backend keeps its share of the ring");
}

#[test]
fn added_backends_must_be_real_hosts_and_within_the_limit() {
    use switchyard_config::limits::MAX_BACKENDS_PER_UPSTREAM;
    let config = blue_green();
    let idle = |_: &str, _: SocketAddr| 0;
    let add = |address: SocketAddr| Change::AddBackend {
        upstream: "blue".into(),
        address,
        weight: None,
    };
    let bad: SocketAddr = "0.0.0.0:9000".parse().unwrap();
    assert!(matches!(
        RuntimeState::default().with_change(&config, &add(bad), idle),
        Err(Rejection::Invalid(m)) if m.starts_with("address: 0.0.0.0:9000 is unspecified")
    ));
    let mut state = RuntimeState::default();
    let mut port = 20_000;
    while state.backends(&config, "blue").len() < MAX_BACKENDS_PER_UPSTREAM {
        state = state.with_change(&config, &add(addr(port)), idle).unwrap();
        port += 1;
    }
    assert_eq!(
        state.with_change(&config, &add(addr(port)), idle),
        Err(Rejection::Invalid(
            "upstream \"blue\" has 1000 backends, the limit (see docs/configuration.md, \"Limits\")"
                .into()
        ))
    );
    // A state file beyond the limit keeps what fits, and drops impossible addresses.
    let mut file = state.clone();
    let changes = file.upstreams.get_mut("blue").unwrap();
    changes.added.push(crate::state::AddedBackend {
        address: addr(port),
        weight: 1,
        state: BackendState::Active,
    });
    changes.added.push(crate::state::AddedBackend {
        address: "255.255.255.255:80".parse().unwrap(),
        weight: 1,
        state: BackendState::Active,
    });
    let (fitted, warnings) = file.fit(&config);
    assert_eq!(fitted, state);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
}

#[test]
fn a_split_change_past_the_pair_limit_is_refused() {
    use std::fmt::Write;
    use switchyard_config::limits::MAX_ROUTE_UPSTREAM_PAIRS;
    // 100 routes: r0 splits to one of 101 upstreams, the 99 others to all: the limit exactly.
    let mut yaml = String::from("listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n");
    for u in 0..101 {
        writeln!(
            yaml,
            "  u{u}:\n    backends:\n      - address: 127.0.0.1:{}",
            9000 + u
        )
        .unwrap();
    }
    yaml.push_str("routes:\n");
    for r in 0..100 {
        let all: String = (0..101).map(|u| format!("      u{u}: 1\n")).collect();
        let split = if r == 0 {
            "      u0: 1\n".to_string()
        } else {
            all
        };
        writeln!(
            yaml,
            "  - name: r{r}\n    path_prefix: /r{r}/\n    split:\n{split}"
        )
        .unwrap();
    }
    let config = Config::from_yaml(&yaml).unwrap();
    assert_eq!(99 * 101 + 1, MAX_ROUTE_UPSTREAM_PAIRS);
    let idle = |_: &str, _: SocketAddr| 0;
    let set = |weights: &[&str]| Change::SetSplit {
        route: "r0".into(),
        split: weights.iter().map(|u| (u.to_string(), 1)).collect(),
    };
    let state = RuntimeState::default();
    assert!(state.with_change(&config, &set(&["u0"]), idle).is_ok());
    assert_eq!(
        state.with_change(&config, &set(&["u0", "u1"]), idle),
        Err(Rejection::Invalid(
            "the routes would have 10001 route/upstream pairs (entries of all routes' splits), over the limit of 10000 (see docs/configuration.md, \"Limits\")".into()
        ))
    );
}

#[test]
fn admin_changes_keep_route_backend_pairs_within_the_limit() {
    use std::fmt::Write;
    // 100 routes over `a` (999 backends) and `b` (1): 100 000 route/backend pairs, the limit.
    let mut yaml =
        String::from("listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  a:\n    backends:\n");
    for i in 0..999 {
        writeln!(
            yaml,
            "      - address: 127.0.{}.{}:80",
            1 + i / 250,
            1 + i % 250
        )
        .unwrap();
    }
    yaml.push_str("  b:\n    backends:\n      - address: 127.0.9.1:80\n  c:\n    backends:\n      - address: 127.0.9.2:80\nroutes:\n");
    for r in 0..100 {
        writeln!(yaml, "  - {{name: r{r}, split: {{a: 1, b: 1}}}}").unwrap();
    }
    let config = Config::from_yaml(&yaml).unwrap();
    let idle = |_: &str, _: SocketAddr| 0;
    let over = |r: Result<RuntimeState, Rejection>| matches!(r, Err(Rejection::Invalid(m)) if m.contains("route/backend pairs"));
    let add = Change::AddBackend {
        upstream: "b".into(),
        address: addr(9100),
        weight: None,
    };
    assert!(over(
        RuntimeState::default().with_change(&config, &add, idle)
    ));
    // Adding to an upstream no route uses is fine; a split that adds `c` to a route is not.
    let add_c = Change::AddBackend {
        upstream: "c".into(),
        address: addr(9101),
        weight: None,
    };
    assert!(RuntimeState::default()
        .with_change(&config, &add_c, idle)
        .is_ok());
    let split = Change::SetSplit {
        route: "r0".into(),
        split: [
            ("a".to_string(), 1),
            ("b".to_string(), 1),
            ("c".to_string(), 1),
        ]
        .into(),
    };
    assert!(over(
        RuntimeState::default().with_change(&config, &split, idle)
    ));
    let narrower = Change::SetSplit {
        route: "r0".into(),
        split: [("b".to_string(), 1)].into(),
    };
    assert!(RuntimeState::default()
        .with_change(&config, &narrower, idle)
        .is_ok());
}

#[test]
fn analysis_stats_follow_their_pair_through_split_changes_and_reloads() {
    use std::time::Duration;

    use crate::Pool;

    let pool = Pool::new(
        blue_green(),
        UpstreamCas::default(),
        Arc::new(Metrics::new()),
        None,
    )
    .expect("no state file");
    // The engine may ask before any request.
    let green = pool.pair_stats("web", "green");
    assert_eq!(green.read().requests, 0);
    let ms = Duration::from_millis(1);
    let count = |s: &Snapshot, status: u16, failed: bool| {
        let web = s.match_route(&at(Some("example.com"), "/")).unwrap();
        let upstream = s
            .upstreams
            .iter()
            .position(|u| &*u.name == "green")
            .unwrap();
        s.count_for_analysis(web, upstream, status, ms, failed);
    };
    let before = pool.snapshot();
    for (status, failed) in [
        (200, false),
        (200, false),
        (503, false),
        (200, true),
        (499, false),
    ] {
        count(&before, status, failed);
    }
    let first = green.read();
    assert_eq!((first.requests, first.errors), (4, 2));
    assert_eq!(
        pool.pair_stats("api", "green").read().requests,
        0,
        "another route's pair"
    );
    assert_eq!(
        pool.pair_stats("web", "blue").read().requests,
        0,
        "another upstream's pair"
    );

    let split = |pairs: &[(&str, u32)]| Change::SetSplit {
        route: "web".into(),
        split: pairs.iter().map(|(u, w)| (u.to_string(), *w)).collect(),
    };
    pool.apply(&split(&[("blue", 50), ("green", 50)]), crate::Source::Api)
        .unwrap();
    count(&pool.snapshot(), 200, false);
    // A request that started on the old snapshot ends on it, into the same pair.
    count(&before, 500, false);
    // Out of the split, green takes no requests on this route and counts none...
    pool.apply(&split(&[("blue", 1)]), crate::Source::Api)
        .unwrap();
    count(&pool.snapshot(), 200, false);
    // ...and back in, it goes on from where it was.
    pool.apply(&split(&[("blue", 1), ("green", 1)]), crate::Source::Api)
        .unwrap();
    count(&pool.snapshot(), 200, false);

    // A reload that puts another upstream first, so green's index moves.
    let reloaded = TWO_UPSTREAMS.replace(
        "upstreams:\n",
        "upstreams:\n  amber:\n    backends:\n      - address: 127.0.0.1:9003\n",
    );
    pool.reload(
        Config::from_yaml(&reloaded).unwrap(),
        UpstreamCas::default(),
    );
    let after = pool.snapshot();
    assert_eq!(&*after.upstreams[0].name, "amber");
    count(&after, 200, false);

    assert!(Arc::ptr_eq(&green, &pool.pair_stats("web", "green")));
    let window = green.read().since(&first);
    assert_eq!((window.requests, window.errors), (4, 1));
    let total = green.read().total();
    assert_eq!((total.requests, total.errors), (8, 3));
    assert!(total.p99().unwrap() >= ms);
    assert_eq!(pool.pair_stats("web", "blue").read().requests, 0);
    assert_eq!(pool.pair_stats("web", "amber").read().requests, 0);
}

#[test]
fn the_pool_records_each_change_once_with_its_source_and_nothing_for_a_refusal() {
    use crate::{Pool, Source};
    use serde_json::json;

    let pool = Arc::new(
        Pool::new(
            blue_green(),
            UpstreamCas::default(),
            Arc::new(Metrics::new()),
            None,
        )
        .expect("no state file"),
    );
    let kinds = |pool: &Pool| -> Vec<(Source, String)> {
        pool.events()
            .since(0, 100)
            .into_iter()
            .map(|e| (e.source, e.kind))
            .collect()
    };
    assert_eq!(kinds(&pool), [(Source::Startup, "started".to_string())]);

    let split = Change::SetSplit {
        route: "web".into(),
        split: [("blue".to_string(), 1), ("green".to_string(), 1)].into(),
    };
    pool.apply(&split, Source::Rollout).unwrap();
    let refused = Change::RemoveBackend {
        upstream: "blue".into(),
        address: addr(9001),
    };
    assert!(pool.apply(&refused, Source::Api).is_err(), "still active");
    let drain = Change::UpdateBackend {
        upstream: "blue".into(),
        address: addr(9001),
        weight: None,
        state: Some(BackendState::Draining),
    };
    pool.apply(&drain, Source::Api).unwrap();
    pool.apply(&refused, Source::Api).unwrap();
    let mut config = blue_green();
    config.routes.retain(|r| r.name != "web");
    pool.reload(config, UpstreamCas::default());

    let snapshot = pool.snapshot();
    let green = snapshot.upstream("green").unwrap();
    for _ in 0..3 {
        pool.connect_failed(green, &green.backends[0].live);
    }

    let events = pool.events().since(1, 100);
    let summary: Vec<(Source, &str)> = events.iter().map(|e| (e.source, &*e.kind)).collect();
    assert_eq!(
        summary,
        [
            (Source::Rollout, "split_changed"),
            (Source::Api, "backend_changed"),
            (Source::Api, "backend_removed"),
            (Source::Reload, "reloaded"),
            (Source::Reload, "state_dropped"),
            (Source::Passive, "backend_unhealthy"),
        ]
    );
    assert_eq!(events[0].after, Some(json!({"blue": 1, "green": 1})));
    assert_eq!(
        events[2].before,
        Some(json!({"weight": 1, "state": "draining"}))
    );
    assert_eq!(events[2].after, None);
    assert_eq!(events[3].message, "config reloaded: routes removed: web");
    assert_eq!(events[5].backend.as_deref(), Some("127.0.0.1:9002"));
    assert_eq!(events[5].after, Some(json!({"healthy": false})));
    assert_eq!(pool.events().last_id(), 7);
}

/// The blue/green config with blue's backend 9001 healthy or not, for whole-upstream changes.
struct Health {
    blue_healthy: bool,
}

impl crate::Live for &Health {
    fn in_flight(&self, _: &str, _: SocketAddr) -> usize {
        0
    }

    fn healthy(&self, upstream: &str, _: SocketAddr) -> bool {
        upstream != "blue" || self.blue_healthy
    }
}

fn whole_upstream(upstream: &str, state: BackendState, force: bool) -> Change {
    Change::UpdateUpstream {
        upstream: upstream.into(),
        weight: None,
        state: Some(state),
        force,
    }
}

#[test]
fn a_whole_upstream_drains_at_once_unless_it_is_a_routes_last() {
    let config = blue_green();
    let healthy = &Health { blue_healthy: true };
    let last = |route: &str, upstream: &str| {
        Err(Rejection::Conflict(format!(
            "route \"{route}\" would have no upstream with an available backend and answer 503: \"{upstream}\" is the last one it has; send \"force\": true to do it anyway"
        )))
    };
    let none = RuntimeState::default();
    let set = |s: &RuntimeState, upstream: &str, to, force, live: &Health| {
        s.with_change(&config, &whole_upstream(upstream, to, force), live)
    };
    let states = |s: &RuntimeState, upstream: &str| -> Vec<BackendState> {
        s.backends(&config, upstream)
            .iter()
            .map(|b| b.state)
            .collect()
    };
    use BackendState::{Active, Disabled, Draining};
    // Route api has green alone.
    assert_eq!(
        set(&none, "green", Draining, false, healthy),
        last("api", "green")
    );
    // Route web keeps green when blue goes.
    let s = set(&none, "blue", Disabled, false, healthy).unwrap();
    assert_eq!(states(&s, "blue"), [Disabled]);
    let forced = set(&s, "green", Draining, true, healthy).unwrap();
    assert_eq!(states(&forced, "green"), [Draining]);
    // Routes that answer 503 already are not made worse by another change.
    assert!(set(&forced, "blue", Draining, false, healthy).is_ok());
    // Health counts: with blue unhealthy, green is the last of both routes.
    let sick = &Health {
        blue_healthy: false,
    };
    let api_ok = Change::SetSplit {
        route: "api".into(),
        split: [("blue".to_string(), 1), ("green".to_string(), 1)].into(),
    };
    let both = none.with_change(&config, &api_ok, sick).unwrap();
    assert_eq!(
        set(&both, "green", Disabled, false, sick),
        last("api", "green")
    );
    // Weight 0 for all takes them out as well; active brings them back.
    let zero = Change::UpdateUpstream {
        upstream: "green".into(),
        weight: Some(0),
        state: None,
        force: false,
    };
    assert_eq!(
        none.with_change(&config, &zero, healthy),
        last("api", "green")
    );
    let back = set(&forced, "green", Active, false, healthy).unwrap();
    assert_eq!(states(&back, "green"), [Active]);
    for (change, want) in [
        (
            whole_upstream("purple", BackendState::Draining, false),
            Rejection::NotFound("no upstream named \"purple\"".into()),
        ),
        (
            Change::UpdateUpstream {
                upstream: "blue".into(),
                weight: None,
                state: None,
                force: false,
            },
            Rejection::Invalid("give \"state\" and/or \"weight\" to change".into()),
        ),
        (
            Change::UpdateUpstream {
                upstream: "blue".into(),
                weight: Some(1001),
                state: None,
                force: false,
            },
            Rejection::Invalid("weight: 1001 is out of range 0..=1000".into()),
        ),
    ] {
        assert_eq!(none.with_change(&config, &change, healthy), Err(want));
    }
}

#[test]
fn a_reset_drops_every_runtime_change_but_not_a_busy_added_backend() {
    let config = blue_green();
    let idle = |_: &str, _: SocketAddr| 0;
    let busy = |_: &str, _: SocketAddr| 1;
    let changes = [
        Change::SetSplit {
            route: "web".into(),
            split: [("blue".to_string(), 1), ("green".to_string(), 3)].into(),
        },
        Change::UpdateBackend {
            upstream: "blue".into(),
            address: addr(9001),
            weight: Some(5),
            state: Some(BackendState::Draining),
        },
        Change::AddBackend {
            upstream: "green".into(),
            address: addr(9004),
            weight: Some(2),
        },
    ];
    let mut s = RuntimeState::default();
    for change in &changes {
        s = s.with_change(&config, change, idle).unwrap();
    }
    assert_eq!(
        s.overrides(),
        [
            "route web split blue 1, green 3",
            "upstream blue backend 127.0.0.1:9001 weight 5 draining",
            "upstream green backend 127.0.0.1:9004 added (weight 2 active)",
        ]
    );
    // The added backend still takes traffic: the reset would cut it off.
    assert_eq!(
        s.with_change(&config, &Change::ResetState, idle),
        Err(Rejection::Conflict(
            "upstream \"green\" backend 127.0.0.1:9004 was added at run time and is active: a reset removes it; set it to \"draining\" first, and reset once it has no requests in flight".into()
        ))
    );
    let drain_added = Change::UpdateBackend {
        upstream: "green".into(),
        address: addr(9004),
        weight: None,
        state: Some(BackendState::Draining),
    };
    let s = s.with_change(&config, &drain_added, idle).unwrap();
    assert_eq!(
        s.with_change(&config, &Change::ResetState, busy),
        Err(Rejection::Conflict(
            "upstream \"green\" backend 127.0.0.1:9004 was added at run time and still has 1 requests in flight; a reset removes it: retry when it has none".into()
        ))
    );
    let reset = s.with_change(&config, &Change::ResetState, idle).unwrap();
    assert_eq!(reset, RuntimeState::default());
    assert!(reset.overrides().is_empty());
    // The events say what was dropped.
    let events =
        crate::state::change_event(&config, &s, &reset, &Change::ResetState, crate::Source::Api);
    assert_eq!(events.len(), 1);
    assert!(
        events[0].message().starts_with(
            "runtime state reset, the config file rules again; dropped: route web split blue 1, green 3; "
        ),
        "{}",
        events[0].message()
    );
}

#[test]
fn the_effective_config_is_the_file_with_the_runtime_state() {
    let config = blue_green();
    let idle = |_: &str, _: SocketAddr| 0;
    let s = RuntimeState::default()
        .with_change(
            &config,
            &Change::SetSplit {
                route: "web".into(),
                split: [("blue".to_string(), 9), ("green".to_string(), 1)].into(),
            },
            idle,
        )
        .and_then(|s| {
            s.with_change(
                &config,
                &Change::AddBackend {
                    upstream: "blue".into(),
                    address: addr(9005),
                    weight: Some(4),
                },
                idle,
            )
        })
        .unwrap();
    let effective = s.effective_config(&config);
    let yaml = effective.to_yaml();
    assert_eq!(Config::from_yaml(&yaml).as_ref(), Ok(&effective), "{yaml}");
    let web = effective.routes.iter().find(|r| r.name == "web").unwrap();
    assert_eq!(
        web.split
            .iter()
            .map(|w| (w.upstream.as_str(), w.weight))
            .collect::<Vec<_>>(),
        [("blue", 9), ("green", 1)]
    );
    let blue = effective.upstream("blue").unwrap();
    assert_eq!(
        blue.backends
            .iter()
            .map(|b| (b.address, b.weight))
            .collect::<Vec<_>>(),
        [(addr(9001), 1), (addr(9005), 4)]
    );
}
