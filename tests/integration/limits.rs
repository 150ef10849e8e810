//! The largest config `check` accepts and `run` starts (issue 11, finding 8), and the backend
//! addresses no host can have (finding 9): refused in the config with the field path, and by
//! the admin API with 400.
//!
//! The big configs' backends are addresses on 127.0.1.0/24 and up, where no test listens:
//! requests to them fail to connect (502), which is all these tests need of them.

use std::fmt::Write;
use std::time::{Duration, Instant};

use crate::fixtures::*;

/// `upstreams` upstreams of `backends` backends each, and `routes` routes splitting to
/// `per_route` upstreams each with weights 10000, 9999, ... (a long smooth period), written
/// out in full; the first route is `/r0/`.
fn big(upstreams: usize, backends: usize, routes: usize, per_route: usize) -> String {
    let mut yaml = String::from(
        "server:\n  threads: 2\n  upgrade_socket: {upgrade_socket}\nlisteners:\n  - address: {listen}\nadmin:\n  address: {admin}\nmetrics:\n  address: {metrics}\nupstreams:\n",
    );
    let mut n = 0;
    for u in 0..upstreams {
        writeln!(
            yaml,
            "  u{u}:\n    algorithm: weighted_round_robin\n    backends:"
        )
        .unwrap();
        for b in 0..backends {
            writeln!(
                yaml,
                "      - {{address: 127.0.{}.{}:{}, weight: {}}}",
                1 + n / 50_000,
                1 + (n / 250) % 200,
                1024 + n % 50_000,
                1 + b
            )
            .unwrap();
            n += 1;
        }
    }
    yaml.push_str("routes:\n");
    for r in 0..routes {
        writeln!(yaml, "  - name: r{r}\n    path_prefix: /r{r}/\n    split:").unwrap();
        for k in 0..per_route {
            writeln!(yaml, "      u{}: {}", (r + k) % upstreams, 10_000 - k).unwrap();
        }
    }
    yaml
}

/// 200 upstreams and one split naming all of them, used by `routes` routes through an alias.
fn fanned_out(routes: usize) -> String {
    let mut yaml = String::from("listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  u0:\n    backends: &b\n      - address: 127.0.1.1:1024\n      - address: 127.0.1.2:1024\n");
    for u in 1..200 {
        writeln!(yaml, "  u{u}: {{backends: *b}}").unwrap();
    }
    yaml.push_str("routes:\n  - name: r0\n    split: &all\n");
    for u in 0..200 {
        writeln!(yaml, "      u{u}: 1").unwrap();
    }
    for r in 1..routes {
        writeln!(yaml, "  - {{name: r{r}, split: *all}}").unwrap();
    }
    yaml
}

fn write(yaml: &str) -> String {
    let path = temp_path("config.yaml");
    std::fs::write(&path, yaml).expect("write config");
    path.display().to_string()
}

fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        / 1024
}

#[test]
fn check_and_run_refuse_an_alias_fan_out_in_seconds_naming_the_limit() {
    // 150 KB standing for 6 000 routes × 200 upstreams: 1.2 million pairs.
    let path = write(&fanned_out(6000));
    for command in ["check", "run"] {
        let started = Instant::now();
        let (code, _, stderr) = run_binary(&[command, "--config", &path]);
        assert_eq!(code, 1, "{command}: {stderr}");
        assert!(
            stderr.contains("the limit of 1000000 YAML nodes"),
            "{command}: {stderr}"
        );
        assert!(started.elapsed() < Duration::from_secs(20), "{command}");
    }
}

#[test]
fn check_refuses_more_route_upstream_pairs_than_the_limit() {
    // 250 routes × 200 upstreams in 25 KB, within the YAML limits.
    let path = write(&fanned_out(250));
    let (code, _, stderr) = run_binary(&["check", "--config", &path]);
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        "routes: 50000 route/upstream pairs (entries of all routes' splits), over the limit of 10000 (see docs/configuration.md, \"Limits\")\n"
    );
    // Over the size limit, cut inside a multi-byte character: the size is what is said.
    let path = write(&format!("{}#{}\n", fanned_out(2), "é".repeat(3 << 20)));
    let (code, _, stderr) = run_binary(&["check", "--config", &path]);
    assert_eq!(code, 1);
    assert!(stderr.contains("over the limit of 4194304"), "{stderr}");
}

#[test]
fn a_config_at_the_pair_limit_starts_in_seconds_and_grows_with_use() {
    // 10 000 route/upstream pairs, 200-way splits whose smooth periods are ~2 million picks,
    // 600 backends.
    let yaml = big(200, 3, 50, 200);
    let path = write(
        &fill(&yaml, "127.0.0.1:8080".parse().expect("addr"))
            .replace("{admin}", "127.0.0.1:8081")
            .replace("{metrics}", "127.0.0.1:8082"),
    );
    let (code, _, stderr) = run_binary(&["check", "--config", &path]);
    assert_eq!(code, 0, "{stderr}");
    let started = Instant::now();
    let sy = Switchyard::start(&yaml);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "listening after {took:?}");
    let rss = rss_mib(sy.child.id());
    assert!(rss < 200, "{rss} MiB resident at start");

    let before = sy.scrape();
    // Split weights and per-backend gauges are there from the start; no request series yet.
    assert_eq!(
        before.matches("switchyard_route_split_weight{").count(),
        10_000
    );
    assert_eq!(before.matches("switchyard_backend_weight{").count(), 600);
    assert!(!before.contains("switchyard_requests_total{"));
    assert!(!before.contains("switchyard_request_duration_seconds_count{"));
    assert!(before.len() < 2 << 20, "{} bytes", before.len());

    for _ in 0..3 {
        assert_eq!(get(sy.addr, "/r0/x").status, 502);
    }
    let after = sy.scrape();
    let counted: f64 = after
        .lines()
        .filter(|l| l.starts_with("switchyard_requests_total{") && l.contains("route=\"r0\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted, 3.0, "{after}");
    // Only what carried requests: r0's pairs (at most 3 upstreams), one histogram each.
    let series = after
        .matches("switchyard_request_duration_seconds_count{")
        .count();
    assert!((1..=3).contains(&series), "{series} histograms");
}

#[test]
fn check_refuses_backend_addresses_no_host_can_have_naming_the_field() {
    let yaml = "listeners:\n  - address: 0.0.0.0:8080\nupstreams:\n  green:\n    backends:\n      - address: 127.0.0.1:9003\n      - address: 0.0.0.0:9004\n      - address: 255.255.255.255:80\n      - address: 224.0.0.1:80\n      - address: '[::]:80'\n      - address: 10.0.0.1:0\n      - address: 192.168.0.255:80\nroutes:\n  - name: web\n    split:\n      green: 1\n";
    let path = write(yaml);
    let (code, _, stderr) = run_binary(&["check", "--config", &path]);
    assert_eq!(code, 1);
    let fields: Vec<&str> = stderr
        .lines()
        .map(|l| l.split_once(": ").map_or(l, |(field, _)| field))
        .collect();
    assert_eq!(
        fields,
        (1..=5)
            .map(|i| format!("upstreams.green.backends[{i}].address"))
            .collect::<Vec<_>>(),
        "{stderr}"
    );
    assert!(
        stderr.starts_with("upstreams.green.backends[1].address: 0.0.0.0:9004 is unspecified"),
        "{stderr}"
    );
}

#[test]
fn the_admin_api_refuses_backend_addresses_no_host_can_have() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (1, 0), "", ""));
    for address in [
        "0.0.0.0:0",
        "0.0.0.0:9000",
        "127.0.0.1:0",
        "255.255.255.255:9000",
        "224.0.0.1:9000",
        "[::]:9000",
        "[ff02::1]:9000",
    ] {
        let body = format!(r#"{{"address": "{address}", "weight": 1}}"#);
        let r = sy.api("POST", "/api/v1/upstreams/blue/backends", Some(&body));
        assert_eq!(r.status, 400, "{address}: {}", r.text());
        assert!(r.text().contains("\"error\": \"address: "), "{}", r.text());
    }
    let r = sy.api("GET", "/api/v1/upstreams/blue", None);
    assert_eq!(r.text().matches("\"address\"").count(), 1, "{}", r.text());
    // Loopback and private addresses stay fine.
    let r = sy.api(
        "POST",
        "/api/v1/upstreams/blue/backends",
        Some(r#"{"address": "10.1.2.3:8080", "weight": 0}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
}
