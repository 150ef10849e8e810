//! The admin API against the real binary: every endpoint, its errors, auth, and changes taking
//! effect on live traffic.

use std::time::Duration;

use serde_json::{json, Value};

use crate::fixtures::*;

fn json_of(r: &Response) -> Value {
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{}",
        r.text()
    );
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

/// A health check for both upstreams that turns a backend healthy at its first passing
/// result and unhealthy after three failed ones (within about 5 s): a check answered late on
/// a busy machine (under the 1 s timeout) or one lost check does not take a backend out, which
/// would move traffic that the tests count exactly.
const QUICK_CHECK: &str = "    health_check:\n      type: http\n      path: /healthz\n      interval: 1500ms\n      timeout: 1s\n      rise: 1\n      fall: 3\n";

/// Status and the `error` message of a refused call.
fn refused(r: &Response) -> (u16, String) {
    let body = json_of(r);
    (
        r.status,
        body["error"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn every_endpoint_answers_and_a_refused_call_changes_nothing() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (90, 10), "", ""));
    let (b, g) = (blue.addr.to_string(), green.addr.to_string());

    let r = sy.api("GET", "/healthz", None);
    assert_eq!((r.status, r.text()), (200, "ok\n".to_string()));

    let routes = json_of(&sy.api("GET", "/api/v1/routes", None));
    assert_eq!(routes[0]["name"], "web");
    assert_eq!(routes[0]["split"], json!({"blue": 90, "green": 10}));
    let r = sy.api("GET", "/api/v1/routes/web", None);
    assert_eq!(json_of(&r)["split"], json!({"blue": 90, "green": 10}));
    assert_eq!(
        refused(&sy.api("GET", "/api/v1/routes/nope", None)),
        (404, "no route named \"nope\"".into())
    );

    let r = sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(r#"{"blue": 80, "green": 20}"#),
    );
    assert_eq!(r.status, 200);
    assert_eq!(json_of(&r)["split"], json!({"blue": 80, "green": 20}));
    for (body, want) in [
        (
            r#"{"blue": 80, "purple": 20}"#,
            "split.purple: unknown upstream \"purple\"",
        ),
        (
            r#"{"blue": 0, "green": 0}"#,
            "split: weights must not all be 0",
        ),
        (
            r#"{"blue": 1.5}"#,
            "split.blue: must be an integer 0..=10000",
        ),
        (
            r#"{"blue": 10001}"#,
            "split.blue: must be an integer 0..=10000",
        ),
        (r#"{}"#, "split: at least one upstream is required"),
        (r#"[1, 2]"#, "body: expected a JSON object, got [1,2]"),
    ] {
        let r = sy.api("PUT", "/api/v1/routes/web/split", Some(body));
        assert_eq!(refused(&r), (400, want.to_string()), "{body}");
    }
    let r = sy.api("PUT", "/api/v1/routes/web/split", Some("{not json"));
    let (status, error) = refused(&r);
    assert_eq!(status, 400);
    assert!(error.starts_with("body: invalid JSON: "), "{error}");
    assert_eq!(
        refused(&sy.api("PUT", "/api/v1/routes/nope/split", Some(r#"{"blue": 1}"#))),
        (404, "no route named \"nope\"".into())
    );
    let r = sy.api("GET", "/api/v1/routes/web", None);
    assert_eq!(
        json_of(&r)["split"],
        json!({"blue": 80, "green": 20}),
        "refusals changed nothing"
    );

    let ups = json_of(&sy.api("GET", "/api/v1/upstreams", None));
    assert_eq!(ups.as_array().map(Vec::len), Some(2));
    let blue_view = json_of(&sy.api("GET", "/api/v1/upstreams/blue", None));
    assert_eq!(blue_view["algorithm"], "round_robin");
    assert_eq!(
        blue_view["backends"],
        json!([{"address": b, "weight": 1, "effective_weight": 1, "healthy": true, "state": "active", "in_flight": 0}])
    );
    assert_eq!(
        refused(&sy.api("GET", "/api/v1/upstreams/nope", None)),
        (404, "no upstream named \"nope\"".into())
    );

    let encoded = b.replace(':', "%3A");
    let r = sy.api(
        "PATCH",
        &format!("/api/v1/upstreams/blue/backends/{encoded}"),
        Some(r#"{"weight": 5}"#),
    );
    assert_eq!(r.status, 200);
    assert_eq!(json_of(&r)["weight"], 5);
    let r = sy.api(
        "PATCH",
        &format!("/api/v1/upstreams/blue/backends/{b}"),
        Some(r#"{"state": "disabled"}"#),
    );
    assert_eq!(
        (json_of(&r)["state"].clone(), json_of(&r)["weight"].clone()),
        (json!("disabled"), json!(5))
    );
    for (body, want) in [
        (
            r#"{"state": "sleeping"}"#,
            "state: must be \"active\", \"draining\", \"disabled\" or \"retiring\"",
        ),
        (r#"{"weight": 1001}"#, "weight: must be an integer 0..=1000"),
        (
            r#"{"colour": "red"}"#,
            "colour: unknown field; expected \"weight\" and/or \"state\" (with \"retire_timeout\" for \"retiring\")",
        ),
        (r#"{}"#, "give \"weight\" and/or \"state\" to change"),
    ] {
        let r = sy.api(
            "PATCH",
            &format!("/api/v1/upstreams/blue/backends/{b}"),
            Some(body),
        );
        assert_eq!(refused(&r), (400, want.to_string()), "{body}");
    }
    let r = sy.api(
        "PATCH",
        "/api/v1/upstreams/blue/backends/127.0.0.1:1",
        Some(r#"{"weight": 1}"#),
    );
    assert_eq!(
        refused(&r),
        (404, "upstream \"blue\" has no backend 127.0.0.1:1".into())
    );

    let r = sy.api(
        "POST",
        "/api/v1/upstreams/green/backends",
        Some(r#"{"address": "127.0.0.1:9", "weight": 2}"#),
    );
    assert_eq!(r.status, 201);
    assert_eq!(json_of(&r)["weight"], 2);
    let r = sy.api(
        "POST",
        "/api/v1/upstreams/green/backends",
        Some(&format!(r#"{{"address": "{g}"}}"#)),
    );
    assert_eq!(
        refused(&r),
        (409, format!("upstream \"green\" already has backend {g}"))
    );
    let r = sy.api(
        "POST",
        "/api/v1/upstreams/green/backends",
        Some(r#"{"address": "nowhere"}"#),
    );
    assert_eq!(
        refused(&r),
        (
            400,
            "address: \"nowhere\" is not an IP:port address, e.g. \"127.0.0.1:9004\"".into()
        )
    );
    let r = sy.api(
        "POST",
        "/api/v1/upstreams/green/backends",
        Some(r#"{"weight": 1}"#),
    );
    assert_eq!(refused(&r), (400, "address: is required".into()));

    let r = sy.api(
        "DELETE",
        &format!("/api/v1/upstreams/green/backends/{g}"),
        None,
    );
    assert_eq!(
        refused(&r),
        (
            409,
            format!("backend {g} is active; set its state to \"draining\" or \"disabled\" first")
        )
    );
    let r = sy.api(
        "DELETE",
        &format!("/api/v1/upstreams/blue/backends/{b}"),
        None,
    );
    assert_eq!(
        r.status,
        200,
        "disabled with nothing in flight: {}",
        r.text()
    );
    assert_eq!(
        json_of(&sy.api("GET", "/api/v1/upstreams/blue", None))["backends"],
        json!([])
    );

    let r = sy.api("POST", "/api/v1/routes", None);
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
    // HEAD is GET without the body, as on / and /healthz.
    for path in ["/api/v1/routes", "/api/v1/upstreams/green", "/api/v1/"] {
        let (get, head) = (sy.api("GET", path, None), sy.api("HEAD", path, None));
        assert_eq!((head.status, head.body.len()), (200, 0), "HEAD {path}");
        assert_eq!(
            head.header("content-length"),
            get.header("content-length"),
            "HEAD {path}"
        );
    }
    assert_eq!(sy.api("HEAD", "/api/v1/nothing", None).status, 404);
    let r = sy.api("GET", "/api/v1/upstreams/blue/backends/1.2.3.4:5", None);
    assert_eq!((r.status, r.header("allow")), (405, Some("PATCH, DELETE")));
    assert_eq!(sy.api("GET", "/api/v1/nothing", None).status, 404);
    let big = format!(r#"{{"blue": 1, "pad": "{}"}}"#, "x".repeat(70 * 1024));
    let r = sy.api("PUT", "/api/v1/routes/web/split", Some(&big));
    assert_eq!(refused(&r), (413, "body is larger than 65536 bytes".into()));
}

#[test]
fn routes_show_their_match_sticky_key_and_routing_counts_and_hash_upstreams_their_key() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let yaml = format!(
        r#"
server:
  threads: 2
  upgrade_socket: {{upgrade_socket}}
listeners:
  - address: {{listen}}
admin:
  address: {{admin}}
upstreams:
  blue:
    backends: [{{address: "{}"}}]
  green:
    algorithm: hash
    hash_on: {{cookie: session}}
    backends: [{{address: "{}"}}]
routes:
  - name: beta
    match:
      headers: {{X-User-Group: beta, X-Debug: "*"}}
      cookies: {{plan: pro}}
      query: {{preview: "1"}}
      methods: [get, HEAD]
    split: {{green: 1}}
  - name: plain
    path_prefix: /plain
    split: {{blue: 1}}
  - name: web
    sticky: {{cookie: switchyard_user, set_cookie: true}}
    split: {{blue: 90, green: 10}}
"#,
        blue.addr, green.addr
    );
    let sy = Switchyard::start(&yaml);
    // Two requests on web: one is issued a cookie, one brings its own.
    for cookie in [None, Some("switchyard_user=u1")] {
        let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("Cookie", *c)).collect();
        let r = block_on(request_from(None, sy.addr, "GET", "/", &headers)).expect("request");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("set-cookie").is_some(), cookie.is_none());
    }
    let routes = json_of(&sy.api("GET", "/api/v1/routes", None));
    assert_eq!(
        routes[0]["match"],
        json!({
            "headers": {"x-debug": "*", "x-user-group": "beta"},
            "cookies": {"plan": "pro"},
            "query": {"preview": "1"},
            "methods": ["GET", "HEAD"]
        })
    );
    assert_eq!(routes[0]["sticky"], Value::Null);
    assert_eq!(
        json_of(&sy.api("GET", "/api/v1/routes/web", None)),
        json!({
            "name": "web",
            "host": null,
            "path_prefix": null,
            "match": {},
            "sticky": {"cookie": "switchyard_user", "set_cookie": true},
            "split": {"blue": 90, "green": 10},
            "effective_share": {"blue": 0.9, "green": 0.1},
            "routing": {"split": 0, "sticky": 1, "sticky_missing": 0, "cookie_issued": 1, "rollout_match": 0}
        })
    );
    get(sy.addr, "/plain");
    assert_eq!(
        json_of(&sy.api("GET", "/api/v1/routes/plain", None))["routing"],
        json!({"split": 1, "sticky": 0, "sticky_missing": 0, "cookie_issued": 0, "rollout_match": 0})
    );
    let upstreams = json_of(&sy.api("GET", "/api/v1/upstreams", None));
    assert_eq!(upstreams[0]["hash_on"], Value::Null);
    assert_eq!(upstreams[1]["algorithm"], "hash");
    assert_eq!(upstreams[1]["hash_on"], json!({"cookie": "session"}));
    // A split change answers with the whole route view, the counts kept.
    let r = sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(r#"{"blue": 50, "green": 50}"#),
    );
    assert_eq!(r.status, 200);
    assert_eq!(json_of(&r)["routing"]["cookie_issued"], 1);
    assert_eq!(json_of(&r)["sticky"]["cookie"], "switchyard_user");
}

#[test]
fn a_token_guards_the_api_but_not_healthz_and_never_reaches_the_log() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let token_file = temp_path("admin.token");
    std::fs::write(&token_file, "s3cret-token\n").expect("token");
    let yaml = blue_green(blue.addr, green.addr, (1, 1), "", "").replace(
        "  address: {admin}\n",
        &format!(
            "  address: {{admin}}\n  token_file: {}\n",
            token_file.display()
        ),
    );
    let sy = Switchyard::start(&yaml);
    assert_eq!(sy.api("GET", "/healthz", None).status, 200);
    let r = sy.api("GET", "/api/v1/routes", None);
    assert_eq!(
        refused(&r),
        (
            401,
            "missing or wrong token: send Authorization: Bearer <token>".into()
        )
    );
    let r = sy.api_with(
        "GET",
        "/api/v1/routes",
        None,
        &[("Authorization", "Bearer wrong")],
    );
    assert_eq!(r.status, 401);
    // Every path under /api/ needs the token, even one that does not exist.
    assert_eq!(sy.api("GET", "/api/v2/anything", None).status, 401);
    let r = sy.api_with(
        "GET",
        "/api/v1/routes",
        None,
        &[("Authorization", "bearer s3cret-token")],
    );
    assert_eq!(r.status, 200, "the scheme is case-insensitive");
    let r = sy.api_with(
        "GET",
        "/api/v1/routes",
        None,
        &[("Authorization", "Bearer s3cret-token")],
    );
    assert_eq!(r.status, 200);
    // The status page holds no data: it is served without the token; the index and the
    // stats it reads are not.
    assert_eq!(sy.api("GET", "/", None).status, 200);
    for path in ["/api/v1/", "/api/v1", "/api/v1/stats"] {
        assert_eq!(sy.api("GET", path, None).status, 401, "{path}");
        let bearer = [("Authorization", "Bearer s3cret-token")];
        assert_eq!(
            sy.api_with("GET", path, None, &bearer).status,
            200,
            "{path}"
        );
    }
    assert!(!sy.log_text().contains("s3cret"));
}

#[test]
fn a_missing_or_empty_token_file_stops_the_start() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let token_file = temp_path("empty.token");
    std::fs::write(&token_file, "  \n").expect("token");
    for (file, want) in [
        (
            token_file.clone(),
            format!("admin.token_file: {} is empty", token_file.display()),
        ),
        (
            temp_path("missing.token"),
            "admin.token_file: cannot read".to_string(),
        ),
    ] {
        let yaml = blue_green(blue.addr, green.addr, (1, 1), "", "")
            .replace(
                "  address: {admin}\n",
                &format!(
                    "  address: 127.0.0.1:{}\n  token_file: {}\n",
                    free_port(),
                    file.display()
                ),
            )
            .replace("{metrics}", &format!("127.0.0.1:{}", free_port()))
            .replace("{listen}", &format!("127.0.0.1:{}", free_port()))
            .replace(
                "{upgrade_socket}",
                &temp_path("u.sock").display().to_string(),
            );
        let path = temp_path("config.yaml");
        std::fs::write(&path, yaml).expect("config");
        let (code, _, stderr) = run_binary(&["run", "--config", &path.display().to_string()]);
        assert_eq!(code, 1);
        assert!(stderr.contains(&want), "{stderr}");
        let (code, _, stderr) = run_binary(&["check", "--config", &path.display().to_string()]);
        assert_eq!(code, 1, "check reads the token file too");
        assert!(stderr.contains(&want), "{stderr}");
    }
}

/// Runs `clients` concurrent clients, `per_client` requests each, new connection per request;
/// returns the bodies of the answers, "ERR <what>" for failures.
fn load(
    addr: std::net::SocketAddr,
    clients: usize,
    per_client: usize,
) -> tokio::task::JoinHandle<Vec<String>> {
    runtime().spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            tasks.spawn(async move {
                let mut out = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    out.push(match request_from(None, addr, "GET", "/", &[]).await {
                        Ok(r) if r.status == 200 => r.text(),
                        Ok(r) => format!("ERR {}", r.status),
                        Err(e) => format!("ERR {e}"),
                    });
                }
                out
            });
        }
        let mut all = Vec::new();
        while let Some(part) = tasks.join_next().await {
            all.extend(part.unwrap_or_default());
        }
        all
    })
}

#[test]
fn a_split_change_under_load_applies_to_the_next_request_and_fails_nothing() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (100, 0), "", ""));
    let traffic = load(sy.addr, 4, 150);
    wait_until("traffic on blue", Duration::from_secs(10), || {
        blue.requests() >= 50
    });
    let r = sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(r#"{"blue": 0, "green": 100}"#),
    );
    assert_eq!(r.status, 200);
    let green_before = green.requests();
    // The very next request, on any worker thread, goes to green.
    assert_eq!(get(sy.addr, "/").text(), "green");
    assert!(green.requests() > green_before);
    let answers = block_on(traffic).expect("load");
    let failures: Vec<&String> = answers.iter().filter(|a| a.starts_with("ERR")).collect();
    assert_eq!(answers.len(), 600);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        answers.iter().any(|a| a == "green"),
        "the shift happened under load"
    );
}

#[test]
fn drain_lets_in_flight_finish_then_delete_succeeds() {
    let a = TestBackend::start("a");
    let b = TestBackend::start("b");
    let green = TestBackend::start("green");
    let yaml = blue_green(a.addr, green.addr, (1, 0), "", "").replace(
        &format!("      - address: {}\n", a.addr),
        &format!("      - address: {}\n      - address: {}\n", a.addr, b.addr),
    );
    let sy = Switchyard::start(&yaml);
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    let patch = |addr: &str, body: &str| {
        sy.api(
            "PATCH",
            &format!("/api/v1/upstreams/blue/backends/{addr}"),
            Some(body),
        )
        .status
    };
    assert_eq!(patch(&a_addr, r#"{"state": "draining"}"#), 200);
    let proxy = sy.addr;
    let slow =
        runtime().spawn(async move { request_from(None, proxy, "GET", "/slow/1500", &[]).await });
    wait_until("the slow request on b", Duration::from_secs(5), || {
        b.requests() == 1
    });
    assert_eq!(patch(&a_addr, r#"{"state": "active"}"#), 200);
    assert_eq!(patch(&b_addr, r#"{"state": "draining"}"#), 200);
    for _ in 0..10 {
        assert_eq!(
            get(sy.addr, "/").text(),
            "a",
            "a draining backend gets no new request"
        );
    }
    let r = sy.api(
        "DELETE",
        &format!("/api/v1/upstreams/blue/backends/{b_addr}"),
        None,
    );
    assert_eq!(
        refused(&r),
        (
            409,
            format!("backend {b_addr} still has 1 requests in flight; retry when it has none")
        )
    );
    let done = block_on(slow).expect("join").expect("slow request");
    assert_eq!(
        (done.status, done.text()),
        (200, "b".to_string()),
        "in flight finished normally"
    );
    wait_until("b idle", Duration::from_secs(5), || {
        json_of(&sy.api("GET", "/api/v1/upstreams/blue", None))["backends"][1]["in_flight"] == 0
    });
    let r = sy.api(
        "DELETE",
        &format!("/api/v1/upstreams/blue/backends/{b_addr}"),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let backends = json_of(&sy.api("GET", "/api/v1/upstreams/blue", None))["backends"].clone();
    assert_eq!(backends.as_array().map(Vec::len), Some(1));
}

#[test]
fn an_added_backend_that_is_down_gets_traffic_only_once_it_passes_its_check() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (1, 0), QUICK_CHECK, ""));
    let later = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let r = sy.api(
        "POST",
        "/api/v1/upstreams/blue/backends",
        Some(&format!(r#"{{"address": "{later}"}}"#)),
    );
    assert_eq!(r.status, 201);
    assert_eq!(
        json_of(&r)["healthy"],
        false,
        "unchecked backends start out of rotation"
    );
    for _ in 0..20 {
        assert_eq!(get(sy.addr, "/").text(), "blue");
    }
    let newcomer = TestBackend::start_on("newcomer", later);
    wait_until(
        "the newcomer passes its check",
        Duration::from_secs(10),
        || {
            sy.log_text()
                .contains(&format!("backend {later} is now healthy"))
        },
    );
    let answers: Vec<String> = (0..10).map(|_| get(sy.addr, "/").text()).collect();
    assert_eq!(
        answers.iter().filter(|a| *a == "newcomer").count(),
        5,
        "{answers:?}"
    );
    assert!(newcomer.requests() >= 5);
}

#[test]
fn a_whole_upstream_drains_in_one_call_unless_a_route_would_be_left_with_none() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (1, 1), "", ""));
    let answer = sy.api(
        "PATCH",
        "/api/v1/upstreams/green",
        Some(r#"{"state": "draining"}"#),
    );
    assert_eq!(answer.status, 200, "{}", answer.text());
    let view = json_of(&answer);
    assert_eq!(view["name"], "green");
    assert_eq!(view["backends"][0]["state"], "draining");
    for _ in 0..6 {
        assert_eq!(get(sy.addr, "/").text(), "blue");
    }
    // Blue is the last upstream of route web that can serve: 409, naming the route and force.
    let answer = sy.api(
        "PATCH",
        "/api/v1/upstreams/blue",
        Some(r#"{"state": "disabled"}"#),
    );
    assert_eq!(
        refused(&answer),
        (
            409,
            "route \"web\" would have no upstream with an available backend and answer 503: \"blue\" is the last one it has; send \"force\": true to do it anyway".into()
        )
    );
    assert_eq!(
        get(sy.addr, "/").text(),
        "blue",
        "a refused call changed nothing"
    );
    let answer = sy.api(
        "PATCH",
        "/api/v1/upstreams/blue",
        Some(r#"{"state": "disabled", "force": true}"#),
    );
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(get(sy.addr, "/").status, 503);
    for upstream in ["blue", "green"] {
        let path = format!("/api/v1/upstreams/{upstream}");
        let answer = sy.api("PATCH", &path, Some(r#"{"state": "active", "weight": 2}"#));
        assert_eq!(
            json_of(&answer)["backends"][0]["weight"],
            2,
            "{}",
            answer.text()
        );
    }
    assert_eq!(get(sy.addr, "/").status, 200);
    for (body, status, starts) in [
        (
            r#"{"state": "retiring"}"#,
            400,
            "state: \"retiring\" is set backend by backend",
        ),
        (
            r#"{"state": "paused"}"#,
            400,
            "state: must be \"active\", \"draining\" or \"disabled\"",
        ),
        (
            r#"{"force": true}"#,
            400,
            "give \"state\" and/or \"weight\" to change",
        ),
    ] {
        let (got, message) = refused(&sy.api("PATCH", "/api/v1/upstreams/blue", Some(body)));
        assert_eq!(got, status, "{body}: {message}");
        assert!(message.starts_with(starts), "{body}: {message}");
    }
    let (status, message) = refused(&sy.api(
        "PATCH",
        "/api/v1/upstreams/nope",
        Some(r#"{"state": "active"}"#),
    ));
    assert_eq!(
        (status, message.as_str()),
        (404, "no upstream named \"nope\"")
    );
    let answer = sy.api("DELETE", "/api/v1/upstreams/blue", None);
    assert_eq!(answer.status, 405);
    assert_eq!(answer.header("allow"), Some("GET, HEAD, PATCH"));
    // One event per whole-upstream change, from the API.
    let events = json_of(&sy.api("GET", "/api/v1/events", None));
    let changed: Vec<&Value> = events
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "upstream_changed")
        .collect();
    assert_eq!(changed.len(), 4, "{events:#}");
    assert!(changed.iter().all(|e| e["source"] == "api"));
    assert_eq!(changed[0]["upstream"], "green");
}

#[test]
fn the_state_endpoint_shows_the_runtime_changes_and_a_reset_drops_them() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let extra = TestBackend::start("extra");
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (1, 0), "", ""));
    assert_eq!(
        json_of(&sy.api("GET", "/api/v1/state", None))["splits"],
        json!({})
    );
    sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(r#"{"blue": 1, "green": 1}"#),
    );
    let added = format!(r#"{{"address": "{}"}}"#, extra.addr);
    assert_eq!(
        sy.api("POST", "/api/v1/upstreams/green/backends", Some(&added))
            .status,
        201
    );
    let state = json_of(&sy.api("GET", "/api/v1/state", None));
    assert_eq!(
        state["splits"]["web"]["split"],
        json!({"blue": 1, "green": 1})
    );
    assert_eq!(
        state["upstreams"]["green"]["added"][0]["address"],
        extra.addr.to_string()
    );

    // The added backend takes traffic: a reset would cut it off.
    let (status, message) = refused(&sy.api("POST", "/api/v1/state/reset", None));
    assert_eq!(status, 409, "{message}");
    assert!(
        message.contains(&format!(
            "backend {} was added at run time and is active",
            extra.addr
        )),
        "{message}"
    );
    let path = format!("/api/v1/upstreams/green/backends/{}", extra.addr);
    sy.api("PATCH", &path, Some(r#"{"state": "draining"}"#));
    let answer = sy.api("POST", "/api/v1/state/reset", None);
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = json_of(&answer);
    assert_eq!(body["reset"], true);
    assert_eq!(
        body["dropped"],
        json!([
            "route web split blue 1, green 1",
            format!(
                "upstream green backend {} added (weight 1 draining)",
                extra.addr
            )
        ])
    );
    let web = json_of(&sy.api("GET", "/api/v1/routes/web", None));
    assert_eq!(web["split"], json!({"blue": 1, "green": 0}));
    let green_view = json_of(&sy.api("GET", "/api/v1/upstreams/green", None));
    assert_eq!(green_view["backends"].as_array().map(Vec::len), Some(1));
    let events = sy.api("GET", "/api/v1/events", None).text();
    assert!(events.contains("\"kind\": \"state_reset\""), "{events}");
    assert_eq!(sy.api("GET", "/api/v1/state/reset", None).status, 405);
}

/// The status page's HTTP side (its rendering is `status_page.rs`'s, in Chromium), the
/// endpoint index, `GET /api/v1/stats` after known traffic, the effective share when an
/// upstream loses its last backend, and the log levels of reads and changes.
#[test]
fn status_page_index_stats_and_effective_share_answer_over_http() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = Switchyard::start(&blue_green(
        blue.addr,
        green.addr,
        (90, 10),
        QUICK_CHECK,
        "",
    ));

    let page = sy.api("GET", "/", None);
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let policy = page.header("content-security-policy").unwrap_or_default();
    assert!(
        policy.starts_with("default-src 'none'; script-src 'sha256-"),
        "{policy}"
    );
    assert!(page.text().contains("<title>Switchyard status</title>"));
    let head = sy.api("HEAD", "/", None);
    assert_eq!((head.status, head.body.len()), (200, 0));
    assert_eq!(head.header("content-length"), page.header("content-length"));
    let post = sy.api("POST", "/", Some("{}"));
    assert_eq!(
        (post.status, post.header("allow")),
        (405, Some("GET, HEAD"))
    );

    // The index, with and without the trailing slash; every path it lists exists: a method
    // it does not take is 405 naming the one listed, never 404.
    let index = json_of(&sy.api("GET", "/api/v1/", None));
    assert_eq!(json_of(&sy.api("GET", "/api/v1", None)), index);
    let endpoints = index["endpoints"].as_array().expect("endpoints");
    assert!(endpoints.len() >= 20, "{index}");
    for endpoint in endpoints {
        let (method, path) = (endpoint["method"].as_str(), endpoint["path"].as_str());
        let (Some(method), Some(path)) = (method, path) else {
            panic!("{endpoint}");
        };
        let concrete = path
            .replace("{route}", "web")
            .replace("{upstream}", "blue")
            .replace("{address}", &blue.addr.to_string());
        let concrete = concrete.split('?').next().unwrap_or_default();
        let r = sy.api("OPTIONS", concrete, None);
        assert_eq!(r.status, 405, "{method} {path}: {}", r.text());
        let allow = r.header("allow").unwrap_or_default();
        assert!(allow.split(", ").any(|m| m == method), "{path}: {allow}");
    }

    // Known traffic: 40 requests, 36 to blue and 4 to green (the split is exact per 10).
    for _ in 0..40 {
        assert_eq!(get(sy.addr, "/").status, 200);
    }
    let stats = |upstream: &str| -> Value {
        let all = json_of(&sy.api("GET", "/api/v1/stats", None));
        let found = all["upstreams"]
            .as_array()
            .and_then(|u| u.iter().find(|u| u["name"] == upstream).cloned());
        found.unwrap_or_else(|| panic!("{upstream} in {all}"))
    };
    // The sampler reads once a second: within a few seconds both windows hold the requests.
    wait_until(
        "the stats to count the traffic",
        Duration::from_secs(10),
        || {
            stats("blue")["last_10s"]["requests"] == 36
                && stats("green")["last_10s"]["requests"] == 4
        },
    );
    let blue_stats = stats("blue");
    let window = &blue_stats["last_10s"];
    assert_eq!(
        (window["errors"].as_u64(), window["error_rate"].as_f64()),
        (Some(0), Some(0.0))
    );
    assert!(
        window["requests_per_second"].as_f64().unwrap_or_default() > 0.0,
        "{window}"
    );
    assert!(
        window["p99_ms"].as_f64().unwrap_or_default() > 0.0,
        "{window}"
    );
    let all = json_of(&sy.api("GET", "/api/v1/stats", None));
    assert_eq!(all["pairs"][0]["route"], "web");
    assert_eq!(all["sampled_every_ms"], 1000);

    // Effective share: green loses its only backend, and blue takes its share.
    let route = json_of(&sy.api("GET", "/api/v1/routes/web", None));
    assert_eq!(route["split"], json!({"blue": 90, "green": 10}));
    assert_eq!(route["effective_share"], json!({"blue": 0.9, "green": 0.1}));
    green.set_sick(true);
    wait_until(
        "green to have no backend left",
        Duration::from_secs(20),
        || {
            json_of(&sy.api("GET", "/api/v1/routes/web", None))["effective_share"]
                == json!({"blue": 1.0, "green": 0.0})
        },
    );
    // The upstreams view says so itself (the status page draws from it).
    let available = |name: &str| {
        json_of(&sy.api("GET", &format!("/api/v1/upstreams/{name}"), None))["available"].clone()
    };
    assert_eq!(
        (available("blue"), available("green")),
        (json!(true), json!(false))
    );
    let routes = json_of(&sy.api("GET", "/api/v1/routes", None));
    assert_eq!(
        routes[0]["split"],
        json!({"blue": 90, "green": 10}),
        "configured stays"
    );
    assert_eq!(
        routes[0]["effective_share"],
        json!({"blue": 1.0, "green": 0.0})
    );

    // Reads at debug (the page polls), changes at info.
    let r = sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(r#"{"blue": 1, "green": 1}"#),
    );
    assert_eq!(r.status, 200);
    wait_until("the change in the log", Duration::from_secs(5), || {
        sy.log_text()
            .contains("admin: PUT /api/v1/routes/web/split -> 200")
    });
    let log = sy.log_text();
    assert!(!log.contains("admin: GET"), "{log}");
}

/// What a web page in the operator's browser could send: a cross-site "simple" POST (no
/// preflight), and a same-origin one after rebinding its own name to the admin address. Both
/// are refused with 403 and change nothing; curl-style requests (no Origin) go through.
#[test]
fn requests_from_other_web_pages_are_refused_and_change_nothing() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (90, 10), "", ""));
    let split = r#"{"blue": 0, "green": 100}"#;
    let evil = [
        vec![
            ("Origin", "https://evil.example".to_string()),
            ("Content-Type", "text/plain".to_string()),
        ],
        vec![
            ("Host", format!("evil.example:{}", sy.admin.port())),
            ("Origin", format!("http://evil.example:{}", sy.admin.port())),
        ],
    ];
    for headers in &evil {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let r = sy.api_with("PUT", "/api/v1/routes/web/split", Some(split), &headers);
        assert_eq!(r.status, 403, "{headers:?}: {}", r.text());
        let r = sy.api_with("GET", "/api/v1/routes/web", None, &headers);
        assert_eq!(r.status, 403, "{headers:?}: {}", r.text());
    }
    let web = json_of(&sy.api("GET", "/api/v1/routes/web", None));
    assert_eq!(web["split"], json!({"blue": 90, "green": 10}));
    // The page's own origin, and no Origin at all, are fine.
    let own = format!("http://{}", sy.admin);
    let r = sy.api_with(
        "PUT",
        "/api/v1/routes/web/split",
        Some(split),
        &[("Origin", &own)],
    );
    assert_eq!(r.status, 200, "{}", r.text());
}
