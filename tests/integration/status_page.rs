//! The status page in a real headless Chromium, driven over the W3C WebDriver protocol
//! (`chromedriver`, Debian package `chromium-driver`), against the real binary and backends:
//! the rendered DOM shows the live values after known changes, and with a token file the page
//! shows nothing until the right token is entered.
//!
//! WebDriver is plain HTTP and JSON, so the suite's own small client speaks it; no WebDriver
//! crate. chromedriver runs in a process group of its own with the browser under it, and the
//! guard kills the whole group when dropped, a failed assertion included.
//!
//! With `SWITCHYARD_SCREENSHOT=<path>` the first test writes a screenshot of the page (a
//! canary rollout, a drained backend, traffic) there: `docs/status-page.png` is made so
//! (see docs/status-page.md, "The screenshot").

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::fixtures::*;

/// How long one WebDriver command may take: starting a browser on a busy two-core machine
/// takes seconds.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// How long the page may take to show a change: it polls every second.
const SHOWN_WITHIN: Duration = Duration::from_secs(15);

/// The W3C name of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless Chromium behind chromedriver, with one session open. Dropping it ends the
/// session and kills chromedriver's process group (the browser with it).
struct Browser {
    driver: Child,
    address: SocketAddr,
    session: String,
    profile: PathBuf,
}

impl Browser {
    fn start() -> Browser {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let profile = temp_path("chromium-profile");
        let log = profile.with_file_name("chromedriver.log");
        let log_file = std::fs::File::create(&log).expect("chromedriver log");
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(log_file)
            // Its own process group: the guard kills the browser processes along with it.
            .process_group(0)
            .spawn()
            .expect("chromedriver (make test-deps installs the Debian packages chromium and chromium-driver)");
        let mut browser = Browser {
            driver,
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            session: String::new(),
            profile,
        };
        wait_until("chromedriver to listen", Duration::from_secs(20), || {
            browser
                .call("GET", "/status", None)
                .is_ok_and(|v| v["ready"] == true)
        });
        let args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--no-first-run".into(),
            "--window-size=1400,1150".into(),
            format!("--user-data-dir={}", browser.profile.display()),
        ];
        let mut options = json!({ "args": args });
        if std::path::Path::new("/usr/bin/chromium").exists() {
            options["binary"] = "/usr/bin/chromium".into();
        }
        let session = browser
            .call(
                "POST",
                "/session",
                Some(json!({
                    "capabilities": { "alwaysMatch": {
                        "browserName": "chrome",
                        "goog:chromeOptions": options,
                    }}
                })),
            )
            .unwrap_or_else(|e| panic!("no browser session: {e}\n{}", browser.log()));
        browser.session = session["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {session}"))
            .to_string();
        browser
    }

    fn log(&self) -> String {
        let log = self.profile.with_file_name("chromedriver.log");
        let text = std::fs::read_to_string(log).unwrap_or_default();
        // The end says why; the whole log is long.
        let start = text.len().saturating_sub(4000);
        text.get(start..).unwrap_or_default().to_string()
    }

    /// One WebDriver command; `Ok` with the answer's `value`, `Err` with its error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map(|b| b.to_string());
        let headers = [("Content-Type", "application/json")];
        let answer = block_on(async {
            tokio::time::timeout(
                COMMAND_LIMIT,
                send(
                    self.address,
                    method,
                    path,
                    &headers,
                    body.as_deref().map(str::as_bytes),
                ),
            )
            .await
        })
        .map_err(|_| format!("{method} {path}: no answer within {COMMAND_LIMIT:?}"))?
        .map_err(|e| format!("{method} {path}: {e}"))?;
        let json: Value = serde_json::from_slice(&answer.body)
            .map_err(|e| format!("{method} {path}: {e}: {}", answer.text()))?;
        if answer.status != 200 {
            return Err(format!("{method} {path}: {} {json}", answer.status));
        }
        Ok(json["value"].clone())
    }

    /// A command of this session; panics on a WebDriver error.
    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.call(method, &path, body)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log()))
    }

    fn open(&self, url: &str) {
        self.command("POST", "/url", Some(json!({ "url": url })));
    }

    fn run(&self, script: &str) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    fn element(&self, css: &str) -> String {
        let found = self.command(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        );
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("{css}: {found}"))
            .to_string()
    }

    /// Types `text` into the field `css` and submits its form by clicking `button`, as a
    /// person does.
    fn type_and_submit(&self, css: &str, text: &str, button: &str) {
        let field = self.element(css);
        self.command("POST", &format!("/element/{field}/clear"), Some(json!({})));
        self.command(
            "POST",
            &format!("/element/{field}/value"),
            Some(json!({ "text": text })),
        );
        let button = self.element(button);
        self.command("POST", &format!("/element/{button}/click"), Some(json!({})));
    }

    /// What the page shows, read from its DOM (see [`PAGE_STATE`]).
    fn page(&self) -> Value {
        self.run(PAGE_STATE)
    }

    /// Reads the page until `shown` holds for it, at most `limit`; the last reading on
    /// timeout.
    fn wait_for(&self, what: &str, limit: Duration, shown: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let page = self.page();
            if shown(&page) {
                return page;
            }
            assert!(
                Instant::now() < deadline,
                "the page did not show {what} within {limit:?}; it shows:\n{page:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self, path: &str) {
        let png = self.command("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap_or_default())
            .expect("a base64 PNG");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        // The whole group: chromedriver and every browser process it started.
        if let Ok(group) = i32::try_from(self.driver.id()) {
            // SAFETY: kill(2) with a negative pid signals that process group only; the group is
            // the one this guard made (`process_group(0)` above).
            unsafe {
                libc::kill(-group, libc::SIGKILL);
            }
        }
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A script that reads what the page shows into JSON, cell by cell, as a person would read it.
const PAGE_STATE: &str = r##"
const rows = (id) => [...document.querySelectorAll("#" + id + " tbody tr")];
const text = (row, css) => { const c = row.querySelector(css); return c ? c.textContent.trim() : null; };
const shares = (row, css) => Object.fromEntries([...row.querySelectorAll(css + " .share")]
  .map((s) => [s.dataset.upstream, s.querySelector(".pct").textContent.trim()]));
return {
  state: document.body.dataset.state || null,
  banner: document.getElementById("banner").textContent,
  login_shown: getComputedStyle(document.getElementById("login")).display !== "none",
  login_error: document.getElementById("login-error").textContent,
  data_rows: document.querySelectorAll("#data tbody tr").length,
  text: document.body.innerText,
  routes: rows("routes").filter((r) => r.dataset.route).map((r) => ({
    name: r.dataset.route, match: text(r, "td.match"),
    split: shares(r, "td.split"), effective: shares(r, "td.effective"),
    effective_text: text(r, "td.effective") })),
  rollouts: rows("rollouts").filter((r) => r.dataset.route).map((r) => ({
    route: r.dataset.route, state: r.dataset.state, step: text(r, "td.step"),
    weight: text(r, "td.weight"), last_window: text(r, "td.last-window"),
    chips: r.querySelectorAll(".chip").length })),
  upstreams: rows("upstreams").filter((r) => r.classList.contains("upstream")).map((r) => ({
    name: r.dataset.upstream, unavailable: r.classList.contains("unavailable"),
    health: text(r, "td.health"), rps_1s: parseFloat(text(r, "td.rps-1s")),
    rps_10s: parseFloat(text(r, "td.rps-10s")), errors: text(r, "td.errors") })),
  backends: rows("upstreams").filter((r) => r.classList.contains("backend")).map((r) => ({
    upstream: r.dataset.upstream, address: r.dataset.backend, classes: r.className,
    health: text(r, "td.health"), state: text(r, "td.state"), weight: text(r, "td.weight"),
    effective_weight: text(r, "td.effective-weight"), in_flight: text(r, "td.in-flight") })),
  events: rows("events").filter((r) => r.dataset.id).map((r) => ({
    id: Number(r.dataset.id), kind: text(r, "td.kind"), message: text(r, "td.message") })),
};
"##;

fn route<'a>(page: &'a Value, name: &str) -> &'a Value {
    page["routes"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == name))
        .unwrap_or(&Value::Null)
}

fn upstream<'a>(page: &'a Value, name: &str) -> &'a Value {
    page["upstreams"]
        .as_array()
        .and_then(|u| u.iter().find(|u| u["name"] == name))
        .unwrap_or(&Value::Null)
}

fn backend(page: &Value, address: SocketAddr) -> &Value {
    let address = address.to_string();
    page["backends"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["address"] == address.as_str()))
        .unwrap_or(&Value::Null)
}

fn api_ok(sy: &Switchyard, method: &str, path: &str, body: &str) {
    let r = sy.api(method, path, Some(body));
    assert!(
        r.status == 200 || r.status == 201,
        "{method} {path}: {} {}",
        r.status,
        r.text()
    );
}

/// `n` requests through the proxy, every one answered.
fn traffic(sy: &Switchyard, n: usize) {
    for _ in 0..n {
        assert_eq!(get(sy.addr, "/").status, 200);
    }
}

/// Blue (two backends) and green (one, health-checked) behind `web`, and a `beta` route for
/// the requests whose `X-Group` header is `group` (which may hold markup, as a config may: the
/// page must show it as text).
fn config(blue: [SocketAddr; 2], green: SocketAddr, group: &str, admin_extra: &str) -> String {
    format!(
        r#"
server:
  threads: 2
  grace_period: 2s
  upgrade_socket: {{upgrade_socket}}
listeners:
  - address: {{listen}}
admin:
  address: {{admin}}
{admin_extra}upstreams:
  blue:
    backends:
      - address: "{}"
      - address: "{}"
  green:
    algorithm: least_connections
    backends:
      - address: "{green}"
    health_check: {{type: http, path: /healthz, interval: 1500ms, timeout: 1s, rise: 1, fall: 3}}
routes:
  - name: beta
    match:
      headers: {{X-Group: "{group}"}}
    split: {{green: 1}}
  - name: web
    split: {{blue: 90, green: 10}}
"#,
        blue[0], blue[1]
    )
}

/// The backends, the balancer (`config` without a token) and a browser on its page.
struct Opened {
    blue: [TestBackend; 2],
    green: TestBackend,
    sy: Switchyard,
    browser: Browser,
}

fn open_page() -> Opened {
    let blue = [TestBackend::start("blue-1"), TestBackend::start("blue-2")];
    let green = TestBackend::start("green");
    let sy = Switchyard::start(&config(
        [blue[0].addr, blue[1].addr],
        green.addr,
        "beta",
        "",
    ));
    let browser = Browser::start();
    browser.open(&format!("http://{}/", sy.admin));
    Opened {
        blue,
        green,
        sy,
        browser,
    }
}

#[test]
fn the_page_shows_live_routes_rollouts_backends_rates_and_events() {
    let Opened {
        blue,
        green,
        mut sy,
        browser,
    } = open_page();

    // Straight away, with no token file: every section, as configured.
    let page = browser.wait_for("the routes", SHOWN_WITHIN, |p| {
        p["state"] == "ok" && route(p, "web")["split"]["blue"] == "90.0 %"
    });
    assert!(!page["login_shown"].as_bool().unwrap_or(true), "{page:#}");
    assert_eq!(
        route(&page, "web")["split"],
        json!({"blue": "90.0 %", "green": "10.0 %"})
    );
    assert_eq!(
        route(&page, "web")["effective"],
        json!({"blue": "90.0 %", "green": "10.0 %"})
    );
    assert_eq!(route(&page, "web")["match"], "everything");
    assert_eq!(route(&page, "beta")["match"], "header x-group=beta");
    for b in [&blue[0], &blue[1], &green] {
        let row = backend(&page, b.addr);
        assert_eq!(
            (row["health"].as_str(), row["state"].as_str()),
            (Some("healthy"), Some("active"))
        );
        assert_eq!(
            (row["weight"].as_str(), row["effective_weight"].as_str()),
            (Some("1"), Some("1"))
        );
        assert_eq!(row["in_flight"], "0");
    }
    assert_eq!(page["rollouts"], json!([]));

    // A split change, then a drain: each shows within a refresh or two.
    api_ok(
        &sy,
        "PUT",
        "/api/v1/routes/web/split",
        r#"{"blue": 70, "green": 30}"#,
    );
    let page = browser.wait_for("the new split", SHOWN_WITHIN, |p| {
        route(p, "web")["split"] == json!({"blue": "70.0 %", "green": "30.0 %"})
    });
    assert_eq!(
        route(&page, "web")["effective"],
        json!({"blue": "70.0 %", "green": "30.0 %"})
    );
    let drained = format!("/api/v1/upstreams/blue/backends/{}", blue[1].addr);
    api_ok(&sy, "PATCH", &drained, r#"{"state": "draining"}"#);
    let page = browser.wait_for("the drained backend", SHOWN_WITHIN, |p| {
        backend(p, blue[1].addr)["state"] == "draining"
    });
    let row = backend(&page, blue[1].addr);
    assert!(
        row["classes"]
            .as_str()
            .unwrap_or_default()
            .contains("draining"),
        "{row}"
    );
    assert_eq!(backend(&page, blue[0].addr)["state"], "active");
    // Newest event first: the drain after the split (found by kind: a health check's event
    // may come between them).
    let events = page["events"].as_array().cloned().unwrap_or_default();
    assert!(events.len() >= 3, "{events:?}");
    assert!(
        events
            .windows(2)
            .all(|w| w[0]["id"].as_u64() > w[1]["id"].as_u64()),
        "{events:?}"
    );
    let newest = |kind: &str| events.iter().position(|e| e["kind"] == kind);
    let (drain, split) = (newest("backend_changed"), newest("split_changed"));
    assert!(
        drain.is_some() && split.is_some() && drain < split,
        "{events:?}"
    );

    // Traffic: requests per second above 0 for both upstreams.
    traffic(&sy, 50);
    let page = browser.wait_for("requests per second", SHOWN_WITHIN, |p| {
        upstream(p, "blue")["rps_10s"].as_f64() > Some(0.0)
            && upstream(p, "green")["rps_10s"].as_f64() > Some(0.0)
    });
    assert_eq!(upstream(&page, "blue")["errors"], "0.00 %");

    // A rollout to green: its state, step and weight, then its windows as traffic comes.
    api_ok(
        &sy,
        "POST",
        "/api/v1/routes/web/rollout",
        r#"{"to": "green", "steps": [40, 70, 100], "step_interval": "1h",
            "analysis": {"interval": "1s", "min_requests": 3}}"#,
    );
    let deadline = Instant::now() + SHOWN_WITHIN;
    let page = loop {
        traffic(&sy, 10);
        let page = browser.page();
        let rollout = &page["rollouts"][0];
        if rollout["last_window"]
            .as_str()
            .is_some_and(|w| w.starts_with("passed"))
        {
            break page;
        }
        assert!(
            Instant::now() < deadline,
            "no passed window shown:\n{page:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let rollout = &page["rollouts"][0];
    assert_eq!(
        (rollout["route"].as_str(), rollout["state"].as_str()),
        (Some("web"), Some("progressing"))
    );
    assert_eq!(
        (rollout["step"].as_str(), rollout["weight"].as_str()),
        (Some("1 / 3"), Some("40.0 %"))
    );
    assert!(rollout["chips"].as_u64() >= Some(1), "{rollout}");
    assert_eq!(
        route(&page, "web")["split"],
        json!({"blue": "60.0 %", "green": "40.0 %"})
    );
    if let Ok(path) = std::env::var("SWITCHYARD_SCREENSHOT") {
        // A few seconds of steady traffic so the rates are those of a live service.
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            traffic(&sy, 5);
            std::thread::sleep(Duration::from_millis(50));
        }
        browser.wait_for("rates from the steady traffic", SHOWN_WITHIN, |p| {
            upstream(p, "blue")["rps_1s"].as_f64() > Some(0.0)
        });
        browser.screenshot(&path);
    }

    // Green loses its only backend: 0 effective share, its share goes to blue, marked.
    green.set_sick(true);
    let page = browser.wait_for("green without a backend", SHOWN_WITHIN, |p| {
        route(p, "web")["effective"] == json!({"blue": "100.0 %", "green": "0.0 %"})
    });
    assert_eq!(
        route(&page, "web")["split"],
        json!({"blue": "60.0 %", "green": "40.0 %"})
    );
    assert!(route(&page, "web")["effective_text"]
        .as_str()
        .is_some_and(|t| t.contains("no available backend")));
    assert_eq!(upstream(&page, "green")["unavailable"], true);
    assert_eq!(backend(&page, green.addr)["health"], "DOWN");

    // The admin API goes away: the page says so, and since when.
    sy.signal("KILL");
    sy.wait_exit(Duration::from_secs(10));
    let page = browser.wait_for("the API unreachable", SHOWN_WITHIN, |p| {
        p["state"] == "error"
    });
    let banner = page["banner"].as_str().unwrap_or_default();
    assert!(
        banner.starts_with("Admin API unreachable since "),
        "{banner}"
    );
    assert!(banner.contains("the data below is from "), "{banner}");
}

/// Records in the page when each of its refreshes finished (the page counts them in
/// `data-refreshes` on `<body>`), in milliseconds of `performance.now()`.
const RECORD_REFRESHES: &str = r#"
window.refreshedAt = [];
new MutationObserver((records) => records.forEach(() => window.refreshedAt.push(performance.now())))
  .observe(document.body, { attributes: true, attributeFilter: ["data-refreshes"] });
"#;

/// SIGSTOP for the balancer while it lives, SIGCONT when dropped (a failed assertion too):
/// the kernel still accepts its connections, and nothing answers them.
struct Stopped<'a>(&'a Switchyard);

impl<'a> Stopped<'a> {
    fn new(sy: &'a Switchyard) -> Stopped<'a> {
        sy.signal("STOP");
        Stopped(sy)
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.signal("CONT");
    }
}

/// The page redraws at least every 2 s however slow the API is: a refresh starts on each tick
/// of a fixed 1 s clock (skipped while one is in flight) and gives up after 1.5 s. Measured in
/// the browser, while the API answers and while it hangs.
#[test]
fn the_page_refreshes_at_least_every_two_seconds_even_when_the_api_hangs() {
    let opened = open_page();
    let (sy, browser) = (&opened.sy, &opened.browser);
    browser.wait_for("the routes", SHOWN_WITHIN, |p| p["state"] == "ok");
    browser.run(RECORD_REFRESHES);
    std::thread::sleep(Duration::from_secs(3));
    {
        let _stopped = Stopped::new(sy);
        let page = browser.wait_for("the API hanging", Duration::from_secs(5), |p| {
            p["state"] == "error"
        });
        let banner = page["banner"].as_str().unwrap_or_default();
        assert!(banner.contains("(no answer within 1.5 s)"), "{banner}");
        std::thread::sleep(Duration::from_secs(4));
    }
    browser.wait_for("the data again", SHOWN_WITHIN, |p| p["state"] == "ok");
    let times = browser.run("return window.refreshedAt");
    let times: Vec<f64> =
        serde_json::from_value(times.clone()).unwrap_or_else(|e| panic!("{e}: {times}"));
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(times.len() >= 6, "{gaps:?}");
    // 2 s, and half a second for the timers of a busy two-core machine; the old page took
    // 5 s (a 4 s timeout, then 1 s) per refresh while the API hung.
    assert!(gaps.iter().all(|&g| g <= 2_500.0), "{gaps:?}");
    assert!(
        gaps.iter().any(|&g| g > 1_500.0),
        "no refresh timed out while the API hung: {gaps:?}"
    );
}

#[test]
fn with_a_token_file_the_page_shows_nothing_until_the_right_token_is_entered() {
    let blue = [TestBackend::start("blue-1"), TestBackend::start("blue-2")];
    let green = TestBackend::start("green");
    let token_file = temp_path("admin.token");
    std::fs::write(&token_file, "tab-secret\n").expect("token");
    let token = format!("  token_file: {}\n", token_file.display());
    let markup = "<img src=x onerror=document.title='owned'>";
    let sy = Switchyard::start(&config(
        [blue[0].addr, blue[1].addr],
        green.addr,
        markup,
        &token,
    ));
    let browser = Browser::start();
    let url = format!("http://{}/", sy.admin);
    browser.open(&url);

    let no_data = |p: &Value| {
        p["data_rows"] == 0
            && p["routes"] == json!([])
            && !p["text"]
                .as_str()
                .unwrap_or_default()
                .contains(&blue[0].addr.to_string())
    };
    let page = browser.wait_for("the token form", SHOWN_WITHIN, |p| p["state"] == "auth");
    assert!(
        page["login_shown"].as_bool().unwrap_or_default(),
        "{page:#}"
    );
    assert!(no_data(&page), "{page:#}");
    assert_eq!(page["login_error"], "", "asking is not an error");

    // A wrong token: an error, still no data, and the form again.
    browser.type_and_submit("#token", "not-the-token", "#token-submit");
    let page = browser.wait_for("the wrong token refused", SHOWN_WITHIN, |p| {
        p["state"] == "auth"
            && p["login_error"]
                .as_str()
                .is_some_and(|e| e.starts_with("Wrong token"))
    });
    assert!(no_data(&page), "{page:#}");
    assert_eq!(
        browser.run("return sessionStorage.length"),
        0,
        "a refused token is not kept"
    );

    // A token that no header can carry (fetch would throw): said as such, not "unreachable".
    browser.run(
        r"document.getElementById('token').value = 'p\u20acss'; document.getElementById('token-submit').click();",
    );
    let page = browser.wait_for("the unsendable token refused", SHOWN_WITHIN, |p| {
        p["state"] == "auth"
            && p["login_error"]
                .as_str()
                .is_some_and(|e| e.starts_with("The token has characters a header cannot carry"))
    });
    assert!(no_data(&page), "{page:#}");

    // The right one: the data, and the token kept for this tab only.
    browser.type_and_submit("#token", "tab-secret", "#token-submit");
    let page = browser.wait_for("the data", SHOWN_WITHIN, |p| {
        p["state"] == "ok" && route(p, "web")["split"]["blue"] == "90.0 %"
    });
    assert!(!page["login_shown"].as_bool().unwrap_or(true));
    assert_eq!(backend(&page, blue[0].addr)["state"], "active");
    // Markup from the config is shown as text and never becomes an element or runs.
    let shown = route(&page, "beta")["match"].as_str().map(str::to_string);
    assert_eq!(shown, Some(format!("header x-group={markup}")));
    let img = browser.run("return document.querySelectorAll('main img').length");
    assert_eq!(img, 0);
    assert_eq!(browser.run("return document.title"), "Switchyard status");
    let stored = browser
        .run("return [sessionStorage.getItem('switchyard-admin-token'), localStorage.length]");
    assert_eq!(stored, json!(["tab-secret", 0]));
    assert!(!browser
        .run("return document.cookie")
        .as_str()
        .is_some_and(|c| c.contains("tab-secret")));

    // The same tab loads the page again: still signed in.
    browser.open(&url);
    browser.wait_for("the data after a reload", SHOWN_WITHIN, |p| {
        p["state"] == "ok" && route(p, "web")["name"] == "web"
    });

    // "forget token": the form, and no refresh draws data after it.
    let signout = browser.element("#signout");
    browser.command(
        "POST",
        &format!("/element/{signout}/click"),
        Some(json!({})),
    );
    let page = browser.wait_for("the form after forget", SHOWN_WITHIN, |p| {
        p["state"] == "auth"
    });
    assert!(no_data(&page), "{page:#}");
    std::thread::sleep(Duration::from_millis(2500));
    let page = browser.page();
    assert!(page["state"] == "auth" && no_data(&page), "{page:#}");
    browser.type_and_submit("#token", "tab-secret", "#token-submit");
    browser.wait_for("the data again", SHOWN_WITHIN, |p| p["state"] == "ok");

    // The token changes (file and reload): the next refresh gets 401, and the page asks again
    // and shows nothing.
    std::fs::write(&token_file, "new-secret\n").expect("token");
    let r = sy.api_with(
        "POST",
        "/api/v1/reload",
        None,
        &[("Authorization", "Bearer tab-secret")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let page = browser.wait_for("the form again", SHOWN_WITHIN, |p| p["state"] == "auth");
    assert!(no_data(&page), "{page:#}");
    assert!(page["login_error"]
        .as_str()
        .is_some_and(|e| e.starts_with("Wrong token")));
}
