//! Properties of selection and splitting, proven on snapshots built from real configs.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use switchyard_config::Config;

use crate::{BackendState, InFlight, Snapshot};

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
                .pick_backend(None, None)
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
    let s = Snapshot::from_config(&config("weighted_round_robin", &[5, 1, 1]), None);
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
    let s = Snapshot::from_config(&config("round_robin", &[5, 1, 1]), None);
    let c = counts(&picks(&s, 300));
    assert_eq!((c[&9001], c[&9002], c[&9003]), (100, 100, 100));
}

#[test]
fn least_connections_prefers_the_least_loaded_relative_to_weight() {
    let s = Snapshot::from_config(&config("least_connections", &[1, 1, 2]), None);
    let up = &s.upstreams[0];
    // A slow backend holds requests: it must get none while the others have fewer.
    let held: Vec<InFlight> = (0..3)
        .map(|_| InFlight::new(&up.backends[0].live))
        .collect();
    let mut guards = Vec::new();
    for _ in 0..6 {
        let b = up.pick_backend(None, None).unwrap();
        guards.push(InFlight::new(&up.backends[b].live));
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

fn ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn assignment(s: &Snapshot, clients: u32) -> Vec<SocketAddr> {
    (0..clients)
        .map(|i| {
            let b = s.upstreams[0].pick_backend(Some(ip(i)), None).unwrap();
            s.upstreams[0].backends[b].live.address
        })
        .collect()
}

#[test]
fn ip_hash_moves_only_the_clients_of_a_backend_that_leaves() {
    let s = Snapshot::from_config(&config("ip_hash", &[1, 1, 1, 1]), None);
    let before = assignment(&s, 10_000);
    assert_eq!(before, assignment(&s, 10_000), "same client, same backend");
    let gone = s.upstreams[0].backends[2].live.address;
    s.upstreams[0].backends[2].live.set_healthy(false);
    let after = assignment(&s.rebuilt(), 10_000);
    let mut moved_from_gone = 0;
    for (b, a) in before.iter().zip(&after) {
        if *b == gone {
            assert_ne!(a, &gone);
            moved_from_gone += 1;
        } else {
            assert_eq!(a, b, "a client of a backend that stayed moved");
        }
    }
    assert!(moved_from_gone > 2_000, "{moved_from_gone}");
}

#[test]
fn ip_hash_spreads_clients_in_proportion_to_weight() {
    let s = Snapshot::from_config(&config("ip_hash", &[1, 2, 3, 4]), None);
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
        let s = Snapshot::from_config(&config(algorithm, &[1, 0, 1, 1, 1]), None);
        let s = with_backends(&s, |i, b| match i {
            2 => b.state = BackendState::Draining,
            3 => b.state = BackendState::Disabled,
            _ => {}
        });
        s.upstreams[0].backends[4].live.set_healthy(false);
        let s = s.rebuilt();
        for i in 0..500 {
            let b = s.upstreams[0].pick_backend(Some(ip(i)), None).unwrap();
            assert_eq!(b, 0, "{algorithm} picked backend {b}");
        }
        assert_eq!(
            s.upstreams[0].pick_backend(Some(ip(1)), Some(0)),
            None,
            "{algorithm}: nothing left after excluding the only one"
        );
    }
}

#[test]
fn a_health_flip_is_honoured_before_the_rebuild() {
    let s = Snapshot::from_config(&config("weighted_round_robin", &[3, 1]), None);
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
        let s = Snapshot::from_config(&config(algorithm, &[1, 1, 1]), None);
        for i in 0..100 {
            let first = s.upstreams[0].pick_backend(Some(ip(i)), None).unwrap();
            let second = s.upstreams[0]
                .pick_backend(Some(ip(i)), Some(first))
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
    let s = Snapshot::from_config(&Config::from_yaml(TWO_UPSTREAMS).unwrap(), None);
    let web = s.match_route(Some("example.com"), "/").unwrap();
    let upstreams: Vec<usize> = (0..1000).map(|_| s.pick(web, None).unwrap().0).collect();
    for window in upstreams.windows(10) {
        assert_eq!(window.iter().filter(|&&u| u == 1).count(), 1, "{window:?}");
    }
}

#[test]
fn an_upstream_without_backends_gives_its_share_away_and_none_left_is_none() {
    let s = Snapshot::from_config(&Config::from_yaml(TWO_UPSTREAMS).unwrap(), None);
    let web = s.match_route(None, "/").unwrap();
    s.upstreams[0].backends[0].live.set_healthy(false);
    let s = s.rebuilt();
    assert!((0..100).all(|_| s.pick(web, None).unwrap().0 == 1));
    s.upstreams[1].backends[0].live.set_healthy(false);
    let s = s.rebuilt();
    assert_eq!(s.pick(web, None), None);
}

#[test]
fn routes_match_host_without_port_and_path_prefix_in_order() {
    let s = Snapshot::from_config(&Config::from_yaml(TWO_UPSTREAMS).unwrap(), None);
    let host = |h| Some(crate::strip_port(h));
    assert_eq!(
        s.match_route(host("API.example.com:8080"), "/v1/users"),
        Some(0)
    );
    assert_eq!(s.match_route(host("api.example.com"), "/v2/users"), Some(1));
    assert_eq!(s.match_route(host("other"), "/v1/users"), Some(1));
    assert_eq!(s.match_route(None, "/v1/users"), Some(1));
    assert_eq!(crate::strip_port("[::1]:8080"), "[::1]");
}

#[test]
fn live_state_and_cursors_survive_a_rebuild_from_config() {
    let check = "    health_check:\n      type: tcp\n";
    let config = config_with("weighted_round_robin", &[5, 1, 1], check);
    let s = Snapshot::from_config(&config, None);
    for b in &s.upstreams[0].backends {
        b.live.set_healthy(true);
    }
    let s = s.rebuilt();
    let first = picks(&s, 3);
    let guard = InFlight::new(&s.upstreams[0].backends[1].live);
    s.upstreams[0].backends[2].live.set_healthy(false);
    let next = Snapshot::from_config(&config, Some(&s));
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
    let s = Snapshot::from_config(&before, None);
    s.upstreams[0].backends[0].live.set_healthy(true);
    let s = s.rebuilt();
    let after = Config::from_yaml(&yaml.replace(
        "      - address: 127.0.0.1:9001\n",
        "      - address: 127.0.0.1:9001\n      - address: 127.0.0.1:9002\n",
    ))
    .unwrap();
    let s = Snapshot::from_config(&after, Some(&s));
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
