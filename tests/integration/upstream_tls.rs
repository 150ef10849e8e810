//! Towards the backends: HTTPS/1.1 (a Python `http.server` behind TLS), cleartext HTTP/2 and
//! HTTP/2 over TLS (nghttpd), and gRPC (grpcio), each a real process; certificates made by
//! the `openssl` command for the run. Verification by name and by IP address, a wrong CA or
//! name refused (502), `verify: false`, health checks over TLS and HTTP/2, multiplexing, CA
//! files refused at start, by `check` and on reload, gRPC errors under HTTP 200 counted by
//! rollout analysis, and rollout checks and notifications over https.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::fixtures::*;
use crate::rollouts::{json, rollout, start, wait_for_state, FAST};

const LIMIT: Duration = Duration::from_secs(15);

/// Route `all` to upstream `api`: one backend, with `upstream` (YAML lines under it), and
/// the admin API.
fn one_backend(backend: SocketAddr, upstream: &str) -> String {
    format!(
        "server:\n  threads: 2\n  grace_period: 1s\n  upgrade_socket: {{upgrade_socket}}\n\
         listeners:\n  - address: {{listen}}\n\
         admin:\n  address: {{admin}}\n\
         upstreams:\n  api:\n    backends:\n      - address: {backend}\n{upstream}\
         routes:\n  - name: all\n    split:\n      api: 1\n"
    )
}

/// `tls:` under an upstream: `ca_file`, and `more` lines (server_name, verify).
fn tls(ca_file: &Path, more: &str) -> String {
    format!("    tls:\n      ca_file: {}\n{more}", ca_file.display())
}

/// A fast health check: `tcp`, or `http` of `/healthz`.
fn health_check(kind: &str) -> String {
    if kind == "http" {
        http_check("/healthz")
    } else {
        check_lines("type: tcp")
    }
}

fn http_check(path: &str) -> String {
    check_lines(&format!("type: http\n      path: {path}"))
}

fn check_lines(what: &str) -> String {
    format!("    health_check:\n      {what}\n      interval: 300ms\n      timeout: 250ms\n      rise: 1\n      fall: 1\n")
}

fn reload(sy: &Switchyard, yaml: &str) {
    sy.write_config(yaml);
    let r = sy.api("POST", "/api/v1/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The Python HTTPS/1.1 backend with the test server certificate; `/healthz` is 503 while
/// `sick` exists.
fn https_backend(name: &str, sick: &Path) -> BackendProcess {
    let certs = test_certs();
    https_backend_with(name, sick, &certs.cert, &certs.key)
}

fn https_backend_with(name: &str, sick: &Path, cert: &Path, key: &Path) -> BackendProcess {
    let script = backend_script("https_backend.py");
    BackendProcess::printing_port(
        Path::new("python3"),
        &[
            script.as_os_str(),
            cert.as_os_str(),
            key.as_os_str(),
            OsStr::new(name),
            sick.as_os_str(),
        ],
    )
}

/// nghttpd serving `htdocs` over HTTP/2: cleartext (h2c) or over TLS with the test server
/// certificate (ALPN h2), every answer with a body followed by the trailer `trailer`; a POST
/// is answered with its own body. `-v`: its log shows each connection's frames, `[id=N]` a
/// connection.
fn nghttpd(htdocs: &Path, tls: bool, trailer: Option<&str>) -> BackendProcess {
    let certs = test_certs();
    let port = free_port();
    let port_text = port.to_string();
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("-v"),
        OsStr::new("--echo-upload"),
        OsStr::new("-a"),
        OsStr::new("127.0.0.1"),
        OsStr::new("-d"),
        htdocs.as_os_str(),
    ];
    let trailer = trailer.map(|t| format!("--trailer={t}"));
    if let Some(t) = &trailer {
        args.push(OsStr::new(t));
    }
    if tls {
        args.extend([
            OsStr::new(&port_text),
            certs.key.as_os_str(),
            certs.cert.as_os_str(),
        ]);
    } else {
        args.extend([OsStr::new("--no-tls"), OsStr::new(&port_text)]);
    }
    BackendProcess::listening_on(
        &program("nghttpd", "nghttp2-server"),
        &args,
        SocketAddr::from(([127, 0, 0, 1], port)),
    )
}

/// A document root with `index.html` (`body`) and `healthz`.
fn htdocs(body: &str) -> PathBuf {
    let dir = temp_path("htdocs").parent().expect("dir").join("htdocs");
    std::fs::create_dir_all(&dir).expect("htdocs");
    std::fs::write(dir.join("index.html"), body).expect("index");
    std::fs::write(dir.join("healthz"), "ok\n").expect("healthz");
    dir
}

#[test]
fn https_backends_are_verified_by_name_or_address_against_their_ca() {
    let certs = test_certs();
    let backend = https_backend("tls-a", &temp_path("never"));
    let by_name = one_backend(
        backend.addr,
        &tls(&certs.ca, &format!("      server_name: {BACKEND_NAME}\n")),
    );
    let sy = Switchyard::start(&by_name);
    let r = get(sy.addr, "/");
    assert_eq!((r.status, r.text()), (200, "tls-a".to_string()), "{r:?}");
    assert_eq!(r.header("x-tls-version"), Some("TLSv1.3"));

    // Without server_name the backend's address is the name: its IP address SAN.
    reload(&sy, &one_backend(backend.addr, &tls(&certs.ca, "")));
    assert_eq!(get(sy.addr, "/").status, 200);

    // Another CA did not sign it; reused connections from before do not hide that.
    reload(&sy, &one_backend(backend.addr, &tls(&certs.other_ca, "")));
    let r = get(sy.addr, "/");
    assert_eq!(r.status, 502, "{r:?}");
    // The right CA for the wrong name.
    reload(
        &sy,
        &one_backend(
            backend.addr,
            &tls(&certs.ca, "      server_name: other.test\n"),
        ),
    );
    assert_eq!(get(sy.addr, "/").status, 502);
    assert!(
        sy.log_text().contains("invalid peer certificate"),
        "{}",
        sy.log_text()
    );

    // verify: false takes any certificate.
    reload(
        &sy,
        &one_backend(backend.addr, &tls(&certs.other_ca, "      verify: false\n")),
    );
    let r = get(sy.addr, "/");
    assert_eq!((r.status, r.text()), (200, "tls-a".to_string()));
}

#[test]
fn health_checks_reach_a_tls_backend_as_requests_do() {
    let certs = test_certs();
    let sick = temp_path("sick");
    let backend = https_backend("tls-h", &sick);
    let checked = |ca: &Path, kind: &str| {
        one_backend(
            backend.addr,
            &format!("{}{}", tls(ca, ""), health_check(kind)),
        )
    };
    let sy = Switchyard::start(&checked(&certs.ca, "http"));
    assert_eq!(get(sy.addr, "/").status, 200, "healthy from the start");

    std::fs::write(&sick, "").expect("sick");
    wait_until("the backend checked down", LIMIT, || {
        get(sy.addr, "/").status == 503
    });
    assert!(sy
        .log_text()
        .contains("is now unhealthy: 1 checks failed in a row, last: status 503"));
    std::fs::remove_file(&sick).expect("well");
    wait_until("the backend checked up", LIMIT, || {
        get(sy.addr, "/").status == 200
    });

    // A check that cannot verify the backend fails, as a request would.
    reload(&sy, &checked(&certs.other_ca, "http"));
    wait_until("checked down by its certificate", LIMIT, || {
        sy.log_text()
            .contains("is now unhealthy: 1 checks failed in a row, last: TLSHandshakeFailure")
    });
    assert_eq!(get(sy.addr, "/").status, 503);

    // A TCP check of a TLS upstream completes the handshake, verification included.
    reload(&sy, &checked(&certs.ca, "tcp"));
    wait_until("up by a TLS handshake", LIMIT, || {
        get(sy.addr, "/").status == 200
    });
    reload(&sy, &checked(&certs.other_ca, "tcp"));
    wait_until("down by a TLS handshake", LIMIT, || {
        get(sy.addr, "/").status == 503
    });
}

#[test]
fn a_ca_file_that_cannot_be_used_is_refused_at_start_by_check_and_on_reload() {
    let certs = test_certs();
    let backend = https_backend("tls-r", &temp_path("never"));
    let missing = temp_path("missing.pem");
    let text = temp_path("text.pem");
    std::fs::write(&text, "not a certificate\n").expect("write");
    let config = |ca: &Path| {
        fill(
            &one_backend(backend.addr, &tls(ca, "")),
            SocketAddr::from(([127, 0, 0, 1], free_port())),
        )
        .replace("{admin}", &format!("127.0.0.1:{}", free_port()))
    };
    for (ca, why) in [
        (
            &missing,
            "cannot read: No such file or directory (os error 2)",
        ),
        (&text, "no PEM certificate in it"),
    ] {
        let path = temp_path("config.yaml");
        std::fs::write(&path, config(ca)).expect("config");
        let line = format!("upstreams.api.tls.ca_file: {}: {why}\n", ca.display());
        let path = path.to_string_lossy();
        let (code, _, stderr) = run_binary(&["check", "--config", &path]);
        assert_eq!((code, stderr.as_str()), (1, line.as_str()));
        // `run` says it as it says a listener's certificate it cannot read. With `--upgrade`
        // it says so before it waits for the running process's sockets (Pingora waits 5 s
        // for them): nothing is taken over that it could not serve.
        for upgrade in [&[][..], &["--upgrade"]] {
            let began = std::time::Instant::now();
            let mut args = vec!["run", "--config", &path];
            args.extend(upgrade);
            let (code, _, stderr) = run_binary(&args);
            assert_eq!(
                (code, stderr.lines().last()),
                (1, Some(format!("switchyard: {}", line.trim_end()).as_str())),
                "{stderr}"
            );
            assert!(
                began.elapsed() < Duration::from_secs(3),
                "{:?}",
                began.elapsed()
            );
        }
    }

    let sy = Switchyard::start(&one_backend(backend.addr, &tls(&certs.ca, "")));
    sy.write_config(&one_backend(backend.addr, &tls(&text, "")));
    let r = sy.api("POST", "/api/v1/reload", None);
    assert_eq!(r.status, 400, "{}", r.text());
    let line = format!(
        "upstreams.api.tls.ca_file: {}: no PEM certificate in it",
        text.display()
    );
    assert_eq!(json(&r)["problems"], serde_json::json!([line]));
    assert_eq!(get(sy.addr, "/").status, 200, "the running config stays");

    sy.signal("HUP");
    wait_until("the SIGHUP reload refused", LIMIT, || {
        sy.log_text().matches("config reload refused").count() >= 2
    });
    assert!(sy.log_text().contains(&line));
    assert_eq!(get(sy.addr, "/").status, 200);
}

#[test]
fn h2c_backends_multiplex_and_are_health_checked_over_http2() {
    let backend = nghttpd(&htdocs("h2c"), false, None);
    let checked = |path: &str| {
        one_backend(
            backend.addr,
            &format!("    protocol: h2c\n{}", http_check(path)),
        )
    };
    let sy = Switchyard::start(&checked("/healthz"));
    // nghttpd speaks nothing but HTTP/2: an answer is one over h2c.
    assert_eq!(get(sy.addr, "/").text(), "h2c");
    // Ten uploads held open at once, each begun 50 ms after the one before: with
    // multiplexing they are ten streams of one backend connection per worker thread, which
    // has its own connections (Pingora's default of one stream per connection opens ten).
    // nghttpd echoes each body once it is complete.
    let answers = block_on(async {
        let mut held = Vec::new();
        for _ in 0..10 {
            let mut client = TcpStream::connect(sy.addr).await?;
            client
                .write_all(b"POST /upload HTTP/1.1\r\nHost: h2c\r\nContent-Length: 10\r\nConnection: close\r\n\r\nhello")
                .await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            held.push(client);
        }
        let mut answers = Vec::new();
        for mut client in held {
            client.write_all(b"world").await?;
            answers.push(read_response(&mut BufReader::new(client)).await?.text());
        }
        Ok::<_, std::io::Error>(answers)
    })
    .expect("uploads");
    assert_eq!(answers, vec!["helloworld"; 10]);
    let log = backend.log_text();
    let mut connections: Vec<&str> = log
        .lines()
        .filter(|l| l.ends_with(":path: /upload"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(connections.len(), 10, "{log}");
    connections.sort_unstable();
    connections.dedup();
    assert!(
        connections.len() <= 2,
        "ten uploads on {connections:?}, with 2 worker threads"
    );

    // The check is answered over h2c too: a path nghttpd has not is a 404. (nghttpd keeps
    // the files it served open for 10 s: removing one would take that long to show.)
    reload(&sy, &checked("/missing"));
    wait_until("checked down by a 404 over h2c", LIMIT, || {
        sy.log_text()
            .contains("is now unhealthy: 1 checks failed in a row, last: status 404")
    });
    assert_eq!(get(sy.addr, "/").status, 503);
    reload(&sy, &checked("/healthz"));
    wait_until("checked up", LIMIT, || get(sy.addr, "/").status == 200);
}

#[test]
fn h2_backends_over_tls_are_verified_and_checked() {
    let certs = test_certs();
    let backend = nghttpd(&htdocs("h2"), true, None);
    let sy = Switchyard::start(&one_backend(
        backend.addr,
        &format!(
            "    protocol: h2\n{}{}",
            tls(&certs.ca, &format!("      server_name: {BACKEND_NAME}\n")),
            health_check("tcp")
        ),
    ));
    let r = get(sy.addr, "/");
    assert_eq!((r.status, r.text()), (200, "h2".to_string()), "{r:?}");
    reload(
        &sy,
        &one_backend(
            backend.addr,
            &format!("    protocol: h2\n{}", tls(&certs.other_ca, "")),
        ),
    );
    assert_eq!(get(sy.addr, "/").status, 502);
}

/// Blue and green (route `web`) over h2c, each an nghttpd whose answers end with the trailer
/// `grpc-status: N`: a gRPC call's outcome under HTTP 200.
fn grpc_statuses(blue: &BackendProcess, green: &BackendProcess) -> String {
    let protocol = "    protocol: h2c\n";
    blue_green(blue.addr, green.addr, (1, 0), protocol, "")
}

#[test]
fn grpc_errors_under_http_200_count_as_errors_in_rollout_windows() {
    let ok = nghttpd(&htdocs("ok"), false, Some("grpc-status: 0"));
    let unavailable = nghttpd(&htdocs("unavailable"), false, Some("grpc-status: 14"));
    let sy = Switchyard::start(&grpc_statuses(&ok, &unavailable));
    let load = crate::load::Load::start(sy.addr, 4);
    let body = r#"{"to": "green", "steps": [100], "step_interval": "500ms", "analysis": {"interval": "250ms", "min_requests": 5, "max_error_rate": 0.1}}"#;
    start(&sy, body);
    let done = wait_for_state(&sy, "rolled_back", LIMIT);
    let report = load.stop();
    let window = &done["windows"][0];
    assert_eq!(window["verdict"], "failed", "{done:#}");
    assert!(window["requests"].as_u64() >= Some(5), "{window}");
    assert_eq!(window["errors"], window["requests"], "{window}");
    assert!(
        report.failures().is_empty(),
        "HTTP 200 every time: {:?}",
        report.failures()
    );
    // The requests metric keeps the HTTP status as its `status` label.
    let series = format!(
        "switchyard_requests_total{{backend=\"{}\",route=\"web\",status=\"200\",upstream=\"green\"}}",
        unavailable.addr
    );
    assert!(sample(&sy.scrape(), &series) >= Some(5.0), "{series}");

    // The same under grpc-status 0: no error.
    sy.write_config(&grpc_statuses(&ok, &ok));
    assert_eq!(sy.api("POST", "/api/v1/reload", None).status, 200);
    let load = crate::load::Load::start(sy.addr, 4);
    start(&sy, body);
    let done = wait_for_state(&sy, "succeeded", LIMIT);
    load.stop();
    let windows = done["windows"].as_array().expect("windows");
    let last: &Value = windows.last().expect("a window");
    assert_eq!(last["errors"], 0, "{done:#}");
}

/// gRPC end to end: a grpcio client through Switchyard's h2c listener to grpcio servers over
/// h2c and over TLS (h2).
#[test]
fn grpc_calls_pass_through_with_their_trailers() {
    let certs = test_certs();
    let grpc = |name: &str, tls: bool| {
        let script = backend_script("grpc_backend.py");
        let mut args = vec![script.into_os_string(), name.into()];
        if tls {
            args.extend([certs.cert.clone().into(), certs.key.clone().into()]);
        }
        let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        BackendProcess::printing_port(Path::new("python3"), &args)
    };
    let cleartext = grpc("h2c", false);
    let over_tls = grpc("h2", true);
    let yaml = format!(
        "server:\n  threads: 2\n  grace_period: 1s\n  upgrade_socket: {{upgrade_socket}}\n\
         listeners:\n  - address: {{listen}}\n    h2c: true\n\
         admin:\n  address: {{admin}}\n\
         upstreams:\n  blue:\n    protocol: h2c\n    backends:\n      - address: {}\n{}\
         \x20 green:\n    protocol: h2\n{}    backends:\n      - address: {}\n{}\
         routes:\n  - name: web\n    split:\n      blue: 1\n      green: 0\n",
        cleartext.addr,
        health_check("tcp"),
        tls(&certs.ca, &format!("      server_name: {BACKEND_NAME}\n")),
        over_tls.addr,
        health_check("tcp"),
    );
    let sy = Switchyard::start(&yaml);
    // `calls` calls on one channel; the last one's outcome.
    let call = |method: &str, calls: usize| -> Value {
        let out = std::process::Command::new("python3")
            .arg(backend_script("grpc_client.py"))
            .args([&sy.addr.to_string(), method, &calls.to_string()])
            .output()
            .expect("grpc client");
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    let said = call("Say", 1);
    assert_eq!(said["code"], "OK", "{said}");
    assert!(said["messages"][0]
        .as_str()
        .unwrap_or_default()
        .starts_with("h2c ipv4:127.0.0.1:"));
    // A trailers-only answer and one whose status comes in the trailers after a message.
    let failed = call("Fail", 1);
    assert_eq!(
        (failed["code"].as_str(), failed["details"].as_str()),
        (Some("UNAVAILABLE"), Some("injected failure"))
    );
    let streamed = call("SayThenFail", 1);
    assert_eq!(streamed["code"], "INTERNAL", "{streamed}");
    assert_eq!(streamed["messages"], serde_json::json!(["h2c"]));

    // Green (h2 over TLS) gets every call and fails them: the rollout is judged on their
    // grpc-status, every HTTP status being 200.
    start(
        &sy,
        r#"{"to": "green", "steps": [100], "step_interval": "1m", "analysis": {"interval": "1s", "min_requests": 3, "max_error_rate": 0.1}}"#,
    );
    let said = call("Say", 1);
    assert!(
        said["messages"][0]
            .as_str()
            .unwrap_or_default()
            .starts_with("h2 "),
        "{said}"
    );
    for _ in 0..20 {
        if rollout(&sy)["state"] != "progressing" {
            break;
        }
        call("Fail", 20);
    }
    let done = wait_for_state(&sy, "rolled_back", LIMIT);
    let failed: Vec<&Value> = done["windows"]
        .as_array()
        .expect("windows")
        .iter()
        .filter(|w| w["verdict"] == "failed")
        .collect();
    assert!(
        failed
            .first()
            .is_some_and(|w| w["errors"].as_u64() >= Some(3)),
        "{done:#}"
    );
}

#[test]
fn rollout_checks_and_notifications_go_over_https() {
    let certs = test_certs();
    let hooks = https_backend("hooks", &temp_path("never"));
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    // The system's roots, as an operator's: here the test CA through SSL_CERT_FILE.
    let sy = Switchyard::start_with_env(
        &blue_green(blue.addr, green.addr, (1, 0), "", ""),
        &[("SSL_CERT_FILE", &certs.ca.to_string_lossy())],
    );
    let port = hooks.addr.port();
    start(
        &sy,
        &format!(
            r#"{{"to": "green", "steps": [100], {FAST}, "checks": [{{"url": "https://127.0.0.1:{port}/healthz"}}], "notify": "https://127.0.0.1:{port}/hook"}}"#
        ),
    );
    let load = crate::load::Load::start(sy.addr, 4);
    wait_for_state(&sy, "succeeded", LIMIT);
    load.stop();
    wait_until("notifications over https", LIMIT, || {
        hooks.log_text().contains("POST /hook ")
    });

    // A certificate the roots did not sign: the check fails before any weight moves.
    let untrusted = https_backend_with(
        "untrusted",
        &temp_path("never"),
        &certs.other_cert,
        &certs.other_key,
    );
    let port = untrusted.addr.port();
    start(
        &sy,
        &format!(
            r#"{{"to": "blue", "steps": [100], {FAST}, "checks": [{{"url": "https://127.0.0.1:{port}/healthz"}}]}}"#
        ),
    );
    let done = wait_for_state(&sy, "rolled_back", LIMIT);
    let reason = done["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("check https://127.0.0.1:{port}/healthz failed: cannot connect to 127.0.0.1:{port}: TLSHandshakeFailure")),
        "{done:#}"
    );
}
