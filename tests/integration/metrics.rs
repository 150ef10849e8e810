//! The Prometheus endpoint after known traffic: names, labels, exact values, and `promtool`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::fixtures::*;

#[test]
fn known_traffic_is_counted_exactly_and_promtool_accepts_the_output() {
    let blue = TestBackend::start("blue");
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let check = "    health_check:\n      type: tcp\n      interval: 200ms\n      timeout: 100ms\n";
    // Passive detection off: every request to the dead backend must meet it.
    let yaml = blue_green(
        blue.addr,
        dead,
        (100, 0),
        "    max_connect_failures: 0\n",
        "",
    )
    .replace(
        &format!("      - address: {}\n", blue.addr),
        &format!("      - address: {}\n{check}", blue.addr),
    );
    let sy = Switchyard::start(&yaml);
    for _ in 0..100 {
        assert_eq!(get(sy.addr, "/").status, 200);
    }
    // Green has no health check and nothing listening: its requests fail to connect.
    let r = sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(r#"{"blue": 0, "green": 1}"#),
    );
    assert_eq!(r.status, 200);
    for _ in 0..3 {
        assert_eq!(get(sy.addr, "/").status, 502);
    }
    assert_eq!(get(sy.addr, "/nowhere-else").status, 502);
    let b = blue.addr;
    wait_until("health checks counted", Duration::from_secs(10), || {
        sample(
            &sy.scrape(),
            &format!("switchyard_health_checks_total{{backend=\"{b}\",result=\"success\",upstream=\"blue\"}}"),
        )
        .is_some_and(|n| n >= 2.0)
    });
    let m = sy.scrape();
    let value =
        |series: String| sample(&m, &series).unwrap_or_else(|| panic!("no {series} in\n{m}"));
    assert_eq!(
        value(format!("switchyard_requests_total{{backend=\"{b}\",route=\"web\",status=\"200\",upstream=\"blue\"}}")),
        100.0
    );
    assert_eq!(
        value(format!("switchyard_requests_total{{backend=\"{dead}\",route=\"web\",status=\"502\",upstream=\"green\"}}")),
        4.0
    );
    assert_eq!(
        value(format!("switchyard_upstream_errors_total{{backend=\"{dead}\",kind=\"connect\",upstream=\"green\"}}")),
        4.0
    );
    assert_eq!(
        value("switchyard_request_duration_seconds_count{route=\"web\",upstream=\"blue\"}".into()),
        100.0
    );
    assert_eq!(
        value(format!(
            "switchyard_backend_healthy{{backend=\"{b}\",upstream=\"blue\"}}"
        )),
        1.0
    );
    assert_eq!(
        value(format!(
            "switchyard_backend_in_flight{{backend=\"{b}\",upstream=\"blue\"}}"
        )),
        0.0
    );
    assert_eq!(
        value(format!(
            "switchyard_backend_weight{{backend=\"{dead}\",upstream=\"green\"}}"
        )),
        1.0
    );
    assert_eq!(
        value("switchyard_route_split_weight{route=\"web\",upstream=\"blue\"}".into()),
        0.0
    );
    assert_eq!(
        value("switchyard_route_split_weight{route=\"web\",upstream=\"green\"}".into()),
        1.0
    );
    assert_eq!(
        value(format!(
            "switchyard_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    assert!(value("switchyard_config_last_reload_timestamp_seconds".into()) > 1.7e9);
    assert!(m.contains("# TYPE switchyard_request_duration_seconds histogram"));

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (make test installs the Debian package prometheus)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(m.as_bytes())
        .expect("feed promtool");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_metrics_endpoint_serves_only_get_metrics() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (1, 1), "", ""));
    let r = get(sy.metrics, "/metrics");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(get(sy.metrics, "/").status, 404);
    let r = block_on(send(sy.metrics, "POST", "/metrics", &[], Some(b""))).expect("post");
    assert_eq!((r.status, r.header("allow")), (405, Some("GET")));
}

#[test]
fn a_client_that_leaves_before_the_answer_is_counted_499_without_an_error_line() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    blue.set_delay(Duration::from_millis(300));
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (1, 0), "", ""));
    block_on(async {
        use tokio::io::AsyncWriteExt;
        let mut client = tokio::net::TcpStream::connect(sy.addr)
            .await
            .expect("connect");
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
            .await
            .expect("send");
        // Gone while the backend is still working on it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
    let series = format!(
        "switchyard_requests_total{{backend=\"{}\",route=\"web\",status=\"499\",upstream=\"blue\"}}",
        blue.addr
    );
    wait_until("the 499 counted", Duration::from_secs(5), || {
        sample(&sy.scrape(), &series) == Some(1.0)
    });
    assert_eq!(get(sy.addr, "/").status, 200);
    let log = sy.log_text();
    assert!(
        !log.contains("ERROR"),
        "an ERROR line for a client that left:\n{log}"
    );
}
