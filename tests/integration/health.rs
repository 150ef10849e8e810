//! Health checks seen from outside: warming before listening, taking a dead backend out and
//! a recovered one back in, 503 when nothing is left, 404 when no route matches.

use std::time::Duration;

use crate::fixtures::*;

const CHECK: &str = "    health_check:\n      type: http\n      path: /healthz\n      interval: 200ms\n      timeout: 100ms\n      rise: 2\n      fall: 2\n";

#[test]
fn a_backend_down_at_start_gets_nothing_and_one_up_serves_at_once() {
    let up = TestBackend::start("up");
    let down_port = free_port();
    let down = format!("127.0.0.1:{down_port}").parse().expect("addr");
    let sy = Switchyard::start(&one_upstream(
        "round_robin",
        &[(up.addr, 1), (down, 1)],
        CHECK,
    ));
    // The very first request after the listener opens must not meet the dead backend.
    for _ in 0..20 {
        let r = get(sy.addr, "/");
        assert_eq!((r.status, r.text()), (200, "up".to_string()));
    }
    assert!(sy.log_text().contains(&format!(
        "upstream pool backend {down} is now unhealthy: first check failed"
    )));
}

#[test]
fn a_failing_backend_is_taken_out_and_brought_back() {
    let a = TestBackend::start("a");
    let mut b = TestBackend::start("b");
    let sy = Switchyard::start(&one_upstream(
        "round_robin",
        &[(a.addr, 1), (b.addr, 1)],
        CHECK,
    ));
    let t: Vec<String> = (0..4).map(|_| get(sy.addr, "/").text()).collect();
    assert!(t.contains(&"b".to_string()), "{t:?}");

    b.kill();
    wait_until("b marked unhealthy", Duration::from_secs(10), || {
        sy.log_text().contains(&format!(
            "backend {} is now unhealthy: 2 checks failed in a row",
            b.addr
        ))
    });
    for _ in 0..20 {
        let r = get(sy.addr, "/");
        assert_eq!((r.status, r.text()), (200, "a".to_string()));
    }

    let marked_down = format!("backend {} is now unhealthy", b.addr);
    assert_eq!(
        sy.log_text().matches(&marked_down).count(),
        1,
        "logged once"
    );
    b.restart();
    wait_until("b healthy again", Duration::from_secs(10), || {
        sy.log_text().contains(&format!(
            "backend {} is now healthy: 2 checks passed in a row",
            b.addr
        ))
    });
    let t: Vec<String> = (0..4).map(|_| get(sy.addr, "/").text()).collect();
    assert_eq!(t.iter().filter(|n| *n == "b").count(), 2, "{t:?}");
}

#[test]
fn an_unexpected_status_fails_the_check_and_all_down_is_503() {
    let a = TestBackend::start("a");
    let sy = Switchyard::start(&one_upstream("round_robin", &[(a.addr, 1)], CHECK));
    assert_eq!(get(sy.addr, "/").status, 200);
    a.set_sick(true);
    wait_until("a unhealthy on 503", Duration::from_secs(10), || {
        sy.log_text()
            .contains("checks failed in a row, last: status 503")
    });
    let r = get(sy.addr, "/");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(
        r.text(),
        "503 Service Unavailable: no backend is available for this route\n"
    );
}

#[test]
fn tcp_checks_work_and_unmatched_requests_get_404() {
    let mut a = TestBackend::start("a");
    let tcp = "    health_check:\n      type: tcp\n      interval: 200ms\n      timeout: 100ms\n";
    let yaml = one_upstream("round_robin", &[(a.addr, 1)], tcp)
        .replace("  - name: all\n", "  - name: all\n    path_prefix: /app/\n");
    let sy = Switchyard::start(&yaml);
    assert_eq!(get(sy.addr, "/app/x").text(), "a");
    let r = get(sy.addr, "/other");
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "404 Not Found: no route matches this request\n");
    a.kill();
    wait_until(
        "a refused by the tcp check",
        Duration::from_secs(10),
        || {
            sy.log_text()
                .contains("is now unhealthy: 3 checks failed in a row")
        },
    );
    assert_eq!(get(sy.addr, "/app/x").status, 503);
}

#[test]
fn an_upstream_without_healthy_backends_gives_its_split_share_away() {
    let blue = TestBackend::start("blue");
    let mut green = TestBackend::start("green");
    let yaml = format!(
        "server:\n  threads: 2\n  upgrade_socket: {{upgrade_socket}}\nlisteners:\n  - address: {{listen}}\nupstreams:\n  blue:\n    backends:\n      - address: {}\n{CHECK}  green:\n    backends:\n      - address: {}\n{CHECK}routes:\n  - name: web\n    split:\n      blue: 50\n      green: 50\n",
        blue.addr, green.addr
    );
    let sy = Switchyard::start(&yaml);
    green.kill();
    wait_until("green out", Duration::from_secs(10), || {
        sy.log_text().contains("upstream green backend")
            && sy.log_text().contains("is now unhealthy")
    });
    for _ in 0..10 {
        assert_eq!(get(sy.addr, "/").text(), "blue");
    }
}
