//! Distribution through the real proxy: each algorithm, and route splits.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use crate::fixtures::*;

fn backends(names: &[&str]) -> Vec<TestBackend> {
    names.iter().map(|n| TestBackend::start(n)).collect()
}

/// Sends `n` sequential requests and counts who answered.
fn tally(sy: &Switchyard, n: usize) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for _ in 0..n {
        let r = get(sy.addr, "/");
        assert_eq!(r.status, 200, "{}", r.text());
        *out.entry(r.text()).or_default() += 1;
    }
    out
}

#[test]
fn round_robin_takes_each_backend_in_turn() {
    let b = backends(&["a", "b", "c"]);
    let sy = Switchyard::start(&one_upstream(
        "round_robin",
        &[(b[0].addr, 5), (b[1].addr, 1), (b[2].addr, 1)],
        "",
    ));
    let order: Vec<String> = (0..6).map(|_| get(sy.addr, "/").text()).collect();
    assert_eq!(order[..3], order[3..], "not a fixed rotation: {order:?}");
    let t = tally(&sy, 150);
    assert_eq!(
        (t["a"], t["b"], t["c"]),
        (50, 50, 50),
        "weights are ignored"
    );
}

#[test]
fn weighted_round_robin_is_smooth_through_the_proxy() {
    let b = backends(&["a", "b", "c"]);
    let sy = Switchyard::start(&one_upstream(
        "weighted_round_robin",
        &[(b[0].addr, 5), (b[1].addr, 1), (b[2].addr, 1)],
        "",
    ));
    let picks: Vec<String> = (0..70).map(|_| get(sy.addr, "/").text()).collect();
    for window in picks.windows(7) {
        let count = |n: &str| window.iter().filter(|p| *p == n).count();
        assert_eq!(
            (count("a"), count("b"), count("c")),
            (5, 1, 1),
            "{window:?}"
        );
    }
}

#[test]
fn least_connections_sends_less_to_a_slow_backend() {
    let b = backends(&["fast", "slow"]);
    let sy = Switchyard::start(&one_upstream(
        "least_connections",
        &[(b[0].addr, 1), (b[1].addr, 1)],
        "",
    ));
    b[1].set_delay(Duration::from_millis(300));
    // 8 concurrent clients, 25 requests each: the slow backend keeps requests in flight, so
    // least-connections sends most of them to the fast one (round robin would split 100/100).
    let addr = sy.addr;
    let results = block_on(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..8 {
            tasks.spawn(async move {
                let mut names = Vec::new();
                for _ in 0..25 {
                    let r = request_from(None, addr, "GET", "/", &[]).await;
                    names.push(r.map(|r| r.text()).unwrap_or_default());
                }
                names
            });
        }
        let mut all = Vec::new();
        while let Some(names) = tasks.join_next().await {
            all.extend(names.unwrap_or_default());
        }
        all
    });
    let fast = results.iter().filter(|n| *n == "fast").count();
    let slow = results.iter().filter(|n| *n == "slow").count();
    assert_eq!(fast + slow, 200, "every request answered");
    assert!(slow * 3 < fast, "slow got {slow}, fast {fast}");
}

#[test]
fn ip_hash_keeps_a_client_on_one_backend_and_spreads_clients() {
    let b = backends(&["a", "b", "c"]);
    let sy = Switchyard::start(&one_upstream(
        "ip_hash",
        &[(b[0].addr, 1), (b[1].addr, 1), (b[2].addr, 1)],
        "",
    ));
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    for i in 2..=61u8 {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, i));
        *per_backend
            .entry(same_answer_for_client(sy.addr, ip, 3))
            .or_default() += 1;
    }
    assert_eq!(
        per_backend.len(),
        3,
        "60 clients all on one backend: {per_backend:?}"
    );
}

#[test]
fn route_split_is_exact_per_ten_requests_and_routes_match_in_order() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let api = TestBackend::start("api");
    let yaml = format!(
        r#"
server:
  threads: 2
  debug_headers: true
  upgrade_socket: {{upgrade_socket}}
listeners:
  - address: {{listen}}
upstreams:
  blue:
    backends:
      - address: {}
  green:
    backends:
      - address: {}
  api:
    backends:
      - address: {}
routes:
  - name: api
    host: api.example.com
    path_prefix: /v1/
    split:
      api: 1
  - name: web
    split:
      blue: 90
      green: 10
"#,
        blue.addr, green.addr, api.addr
    );
    let sy = Switchyard::start(&yaml);
    let picks: Vec<String> = (0..50).map(|_| get(sy.addr, "/").text()).collect();
    for window in picks.windows(10) {
        assert_eq!(
            window.iter().filter(|p| *p == "green").count(),
            1,
            "{window:?}"
        );
    }
    let r = block_on(request_from(
        None,
        sy.addr,
        "GET",
        "/v1/users",
        &[("Host", "API.example.com:8443")],
    ))
    .expect("request");
    assert_eq!(r.text(), "api");
    assert_eq!(r.header("x-switchyard-upstream"), Some("api"));
    let r = block_on(request_from(
        None,
        sy.addr,
        "GET",
        "/v2/users",
        &[("Host", "api.example.com")],
    ))
    .expect("request");
    assert_ne!(r.text(), "api");
}

#[test]
fn slow_start_ramps_an_added_backend_up_instead_of_flooding_it() {
    let a = TestBackend::start("a");
    let b = TestBackend::start("b");
    let c = TestBackend::start("c");
    let yaml = blue_green(a.addr, b.addr, (1, 0), "", "")
        .replace(
            &format!("      - address: {}\n", a.addr),
            &format!("      - address: {}\n        weight: 10\n    algorithm: weighted_round_robin\n    slow_start: 3s\n", a.addr),
        );
    let sy = Switchyard::start(&yaml);
    let effective = |addr: std::net::SocketAddr| {
        let view: serde_json::Value =
            serde_json::from_slice(&sy.api("GET", "/api/v1/upstreams/blue", None).body)
                .unwrap_or_default();
        view["backends"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["address"] == addr.to_string()))
            .and_then(|b| b["effective_weight"].as_u64())
    };
    // Every backend ramps at start too; wait until `a` is at full weight.
    wait_until("a at full weight", Duration::from_secs(10), || {
        effective(a.addr) == Some(10)
    });
    let r = sy.api(
        "POST",
        "/api/v1/upstreams/blue/backends",
        Some(&format!(r#"{{"address": "{}", "weight": 10}}"#, c.addr)),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        effective(c.addr).is_some_and(|w| w < 10),
        "{:?}",
        effective(c.addr)
    );
    let early: Vec<String> = (0..40).map(|_| get(sy.addr, "/").text()).collect();
    let early_c = early.iter().filter(|n| *n == "c").count();
    assert!(
        early_c <= 8,
        "c got {early_c} of 40 right after it was added: {early:?}"
    );
    wait_until("c at full weight", Duration::from_secs(10), || {
        effective(c.addr) == Some(10)
    });
    wait_until("c's full share", Duration::from_secs(10), || {
        let window: Vec<String> = (0..20).map(|_| get(sy.addr, "/").text()).collect();
        window.iter().filter(|n| *n == "c").count() == 10
    });
    // A backend set active again after a drain ramps again too.
    let path = format!("/api/v1/upstreams/blue/backends/{}", c.addr);
    assert_eq!(
        sy.api("PATCH", &path, Some(r#"{"state": "draining"}"#))
            .status,
        200
    );
    assert_eq!(
        sy.api("PATCH", &path, Some(r#"{"state": "active"}"#))
            .status,
        200
    );
    assert!(
        effective(c.addr).is_some_and(|w| w < 10),
        "{:?}",
        effective(c.addr)
    );
}
