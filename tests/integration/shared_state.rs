//! Several balancers, one state: real etcd (Debian's `etcd-server`) on 127.0.0.1 with a
//! temporary data dir, and two or three real Switchyard instances sharing it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fixtures::*;
use crate::load::{assert_no_failures, Load};

/// One etcd member, killed (by its PID) when dropped.
struct Etcd {
    client: SocketAddr,
    peer: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
    /// With TLS: the CA, and the client certificate and key etcdctl shows.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// `user:password` once auth is enabled.
    user: Option<String>,
}

impl Etcd {
    fn start() -> Etcd {
        Etcd::start_with(None)
    }

    fn start_with(tls: Option<(PathBuf, PathBuf, PathBuf)>) -> Etcd {
        let port = |_| SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut etcd = Etcd {
            client: port(0),
            peer: port(1),
            dir: temp_path("etcd"),
            child: None,
            tls,
            user: None,
        };
        etcd.spawn();
        etcd
    }

    fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.client)
    }

    fn spawn(&mut self) {
        let (client, peer) = (self.endpoint(), format!("http://{}", self.peer));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .expect("etcd log");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--name", "default"])
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("default={peer}")])
            .args(self.server_tls())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (apt-get install etcd-server)");
        self.child = Some(child);
        // A read, as the instances make them; generous, as a loaded host starts etcd slowly.
        wait_until("etcd answers", Duration::from_secs(60), || {
            self.ctl(&["get", "/switchyard-test-probe"]).is_ok()
        });
    }

    fn server_tls(&self) -> Vec<String> {
        let certs = test_certs();
        match &self.tls {
            None => Vec::new(),
            Some(_) => vec![
                format!("--cert-file={}", certs.cert.display()),
                format!("--key-file={}", certs.key.display()),
                format!("--trusted-ca-file={}", certs.ca.display()),
                "--client-cert-auth".into(),
            ],
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `etcdctl` against this member: its output, or what it printed when it failed.
    fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let mut command = Command::new("etcdctl");
        command.env("ETCDCTL_API", "3").args([
            "--endpoints",
            &self.endpoint(),
            "--command-timeout",
            "5s",
        ]);
        if let Some((ca, cert, key)) = &self.tls {
            command
                .arg("--cacert")
                .arg(ca)
                .arg("--cert")
                .arg(cert)
                .arg("--key")
                .arg(key);
        }
        if let Some(user) = &self.user {
            command.args(["--user", user]);
        }
        let out = command.args(args).output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn state(&self, prefix: &str) -> Option<Value> {
        let text = self
            .ctl(&["get", &format!("{prefix}/state"), "--print-value-only"])
            .ok()?;
        serde_json::from_str(text.trim()).ok()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn store(etcd: &Etcd, prefix: &str) -> String {
    format!(
        "state_file: {{dir}}/state.json\nstate_store:\n  etcd:\n    endpoints: [\"{}\"]\n    prefix: {prefix}\n    request_timeout: 2s\n    lease_ttl: 2s\n",
        etcd.endpoint()
    )
}

fn instance(blue: &TestBackend, green: &TestBackend, etcd: &Etcd, prefix: &str) -> Switchyard {
    Switchyard::start(&blue_green(
        blue.addr,
        green.addr,
        (1, 0),
        "",
        &store(etcd, prefix),
    ))
}

fn json(r: &Response) -> Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", r.status, r.text()))
}

fn split(sy: &Switchyard) -> Value {
    json(&sy.api("GET", "/api/v1/routes/web", None))["split"].clone()
}

fn set_split(sy: &Switchyard, blue: u32, green: u32) -> Response {
    sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(&format!(r#"{{"blue": {blue}, "green": {green}}}"#)),
    )
}

fn store_status(sy: &Switchyard) -> Value {
    json(&sy.api("GET", "/api/v1/store", None))
}

fn metric(sy: &Switchyard, name: &str) -> Option<f64> {
    sample(&sy.scrape(), name)
}

#[test]
fn a_split_set_on_one_instance_is_live_on_the_others_within_a_second() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let etcd = Etcd::start();
    let all: Vec<Switchyard> = (0..3)
        .map(|_| instance(&blue, &green, &etcd, "/sy/a"))
        .collect();
    wait_until("every instance reports", Duration::from_secs(10), || {
        all.iter()
            .all(|sy| store_status(sy)["instances"].as_array().map_or(0, Vec::len) == 3)
    });
    // Exactly one drives rollouts, and every instance says which.
    let drivers: Vec<bool> = all
        .iter()
        .map(|sy| store_status(sy)["driver"] == true)
        .collect();
    assert_eq!(drivers.iter().filter(|d| **d).count(), 1, "{drivers:?}");

    let mut slowest = Duration::ZERO;
    for (round, (b, g)) in [(90, 10), (50, 50), (100, 0)].into_iter().enumerate() {
        let writer = &all[round % 3];
        let set = Instant::now();
        let r = set_split(writer, b, g);
        assert_eq!(r.status, 200, "{}", r.text());
        for sy in &all {
            let want = serde_json::json!({"blue": b, "green": g});
            wait_until(
                "the split on every instance",
                Duration::from_secs(1),
                || split(sy) == want,
            );
        }
        slowest = slowest.max(set.elapsed());
    }
    println!("split propagation to 3 instances, slowest of 3 rounds: {slowest:?}");
    let revisions: Vec<Value> = all
        .iter()
        .map(|sy| store_status(sy)["revision"].clone())
        .collect();
    assert!(revisions.windows(2).all(|w| w[0] == w[1]), "{revisions:?}");
    assert_eq!(
        metric(&all[1], "switchyard_state_store_revision"),
        revisions[0].as_f64()
    );
    assert_eq!(metric(&all[2], "switchyard_state_store_up"), Some(1.0));
    // The store holds it, and every change left an audit entry.
    let stored = etcd.state("/sy/a").expect("state key");
    assert_eq!(stored["splits"]["web"]["split"]["blue"], 100, "{stored:#}");
    let audit = etcd
        .ctl(&["get", "--prefix", "/sy/a/audit/", "--keys-only"])
        .expect("audit");
    assert!(
        audit.lines().filter(|l| !l.is_empty()).count() >= 3,
        "{audit}"
    );
    // `switchyard status` shows the store and every instance.
    let config = all[0].config.display().to_string();
    let (code, stdout, stderr) = run_binary(&["status", "--config", &config]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("State store etcd"), "{stdout}");
    assert!(
        stdout.contains("INSTANCE") && stdout.contains("DRIVER"),
        "{stdout}"
    );
    // Changes that came from the store are events with source `store`.
    let events = json(&all[2].api("GET", "/api/v1/events", None));
    assert!(
        events.to_string().contains("\"source\":\"store\""),
        "{events:#}"
    );
}

#[test]
fn concurrent_changes_from_several_instances_lose_none() {
    let backends: Vec<TestBackend> = (0..8)
        .map(|i| TestBackend::start(&format!("b{i}")))
        .collect();
    let etcd = Etcd::start();
    let list: Vec<(SocketAddr, u32)> = backends.iter().map(|b| (b.addr, 1)).collect();
    let yaml = one_upstream(
        "round_robin",
        &list,
        &format!(
            "admin:\n  address: {{admin}}\nmetrics:\n  address: {{metrics}}\n{}",
            store(&etcd, "/sy/b")
        ),
    );
    let a = Switchyard::start(&yaml);
    let b = Switchyard::start(&yaml);
    // Each instance sets the weights of its half of the backends, both at once, three rounds.
    std::thread::scope(|s| {
        for (who, half) in [(&a, 0..4), (&b, 4..8)] {
            let backends = &backends;
            s.spawn(move || {
                for round in 2..5u32 {
                    for i in half.clone() {
                        let path = format!("/api/v1/upstreams/pool/backends/{}", backends[i].addr);
                        let body = format!(r#"{{"weight": {}}}"#, round * 10 + i as u32);
                        let r = who.api("PATCH", &path, Some(&body));
                        assert_eq!(r.status, 200, "{path}: {}", r.text());
                    }
                }
            });
        }
    });
    for sy in [&a, &b] {
        wait_until(
            "every weight on both instances",
            Duration::from_secs(2),
            || {
                let view = json(&sy.api("GET", "/api/v1/upstreams/pool", None));
                (0..8).all(|i| {
                    view["backends"].as_array().is_some_and(|list| {
                        list.iter().any(|x| {
                            x["address"] == backends[i].addr.to_string()
                                && x["weight"] == 40 + i as u64
                        })
                    })
                })
            },
        );
    }
}

#[test]
fn etcd_down_keeps_serving_refuses_changes_with_503_and_everyone_catches_up() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let mut etcd = Etcd::start();
    let a = instance(&blue, &green, &etcd, "/sy/c");
    let b = instance(&blue, &green, &etcd, "/sy/c");
    assert_eq!(set_split(&a, 50, 50).status, 200);
    wait_until("b has the split", Duration::from_secs(1), || {
        split(&b) == serde_json::json!({"blue": 50, "green": 50})
    });
    let load_a = Load::start(a.addr, 4);
    let load_b = Load::start(b.addr, 4);
    load_a.run_for(50, Duration::from_secs(10));
    etcd.kill();
    wait_until("both see the store down", Duration::from_secs(5), || {
        [&a, &b]
            .iter()
            .all(|sy| metric(sy, "switchyard_state_store_up") == Some(0.0))
    });
    let refused = set_split(&a, 10, 90);
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        refused.text().contains(&etcd.endpoint()),
        "{}",
        refused.text()
    );
    assert_eq!(split(&a), serde_json::json!({"blue": 50, "green": 50}));
    load_b.run_for(200, Duration::from_secs(10));
    etcd.spawn();
    wait_until("both see the store up", Duration::from_secs(10), || {
        [&a, &b]
            .iter()
            .all(|sy| metric(sy, "switchyard_state_store_up") == Some(1.0))
    });
    assert_eq!(set_split(&b, 20, 80).status, 200);
    wait_until("a catches up", Duration::from_secs(1), || {
        split(&a) == serde_json::json!({"blue": 20, "green": 80})
    });
    load_a.run_for(100, Duration::from_secs(10));
    let (a_report, b_report) = (load_a.stop(), load_b.stop());
    println!(
        "etcd killed and restarted under load: {} requests through a, {} through b",
        a_report.total(),
        b_report.total()
    );
    assert_no_failures("a", &a_report);
    assert_no_failures("b", &b_report);
}

#[test]
fn an_instance_started_while_etcd_is_down_serves_from_its_local_copy() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let mut etcd = Etcd::start();
    let mut a = instance(&blue, &green, &etcd, "/sy/d");
    assert_eq!(set_split(&a, 0, 100).status, 200);
    let copy = std::fs::read_to_string(a.dir.join("state.json")).expect("local copy");
    assert!(copy.contains("store_revision"), "{copy}");
    etcd.kill();
    a.restart();
    assert_eq!(split(&a), serde_json::json!({"blue": 0, "green": 100}));
    for _ in 0..5 {
        assert_eq!(get(a.addr, "/").text(), "green");
    }
    assert_eq!(metric(&a, "switchyard_state_store_up"), Some(0.0));
    etcd.spawn();
    wait_until("the store up again", Duration::from_secs(10), || {
        metric(&a, "switchyard_state_store_up") == Some(1.0)
    });
    assert_eq!(set_split(&a, 100, 0).status, 200);
}

#[test]
fn the_rollout_driver_killed_mid_rollout_is_replaced_and_goes_on_at_the_same_step() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let etcd = Etcd::start();
    let mut all: Vec<Switchyard> = (0..2)
        .map(|_| instance(&blue, &green, &etcd, "/sy/e"))
        .collect();
    wait_until("a driver", Duration::from_secs(10), || {
        all.iter().any(|sy| store_status(sy)["driver"] == true)
    });
    let driver = all
        .iter()
        .position(|sy| store_status(sy)["driver"] == true)
        .expect("driver");
    let r = all[driver].api(
        "POST",
        "/api/v1/routes/web/rollout",
        Some(r#"{"to": "green", "steps": [10, 50], "step_interval": "1h", "analysis": {"interval": "250ms", "min_requests": 1}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let step = |sy: &Switchyard| json(&sy.api("GET", "/api/v1/routes/web/rollout", None));
    let other = 1 - driver;
    wait_until("step 1 on both", Duration::from_secs(5), || {
        all.iter().all(|sy| step(sy)["step"] == 1)
    });
    let load = Load::start(all[other].addr, 2);
    load.run_for(20, Duration::from_secs(10));
    all[driver].signal("KILL");
    let killed = Instant::now();
    wait_until("the other drives", Duration::from_secs(8), || {
        store_status(&all[other])["driver"] == true
    });
    println!("rollout driver taken over after {:?}", killed.elapsed());
    // Same step, still progressing, and the new driver judges windows.
    let windows = |v: &Value| v["windows"].as_array().map_or(0, Vec::len);
    let before = windows(&step(&all[other]));
    wait_until(
        "windows from the new driver",
        Duration::from_secs(5),
        || windows(&step(&all[other])) > before,
    );
    let now = step(&all[other]);
    assert_eq!(
        (now["step"].clone(), now["state"].clone()),
        (1.into(), "progressing".into()),
        "{now:#}"
    );
    let report = load.stop();
    println!(
        "rollout driver killed: {} requests through the survivor",
        report.total()
    );
    assert_no_failures("survivor", &report);
    drop(all.remove(driver));
}

#[test]
fn a_wiped_store_gets_the_state_back_and_compaction_changes_nothing() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let etcd = Etcd::start();
    let a = instance(&blue, &green, &etcd, "/sy/f");
    let b = instance(&blue, &green, &etcd, "/sy/f");
    assert_eq!(set_split(&a, 70, 30).status, 200);
    let want = serde_json::json!({"blue": 70, "green": 30});
    wait_until("b has it", Duration::from_secs(1), || split(&b) == want);
    // Compaction of everything so far: the next change still reaches both.
    let status = etcd
        .ctl(&["endpoint", "status", "--write-out", "json"])
        .expect("status");
    let revision = serde_json::from_str::<Value>(&status).expect("json")[0]["Status"]["header"]
        ["revision"]
        .as_u64()
        .expect("revision");
    etcd.ctl(&["compact", &revision.to_string()])
        .expect("compact");
    assert_eq!(set_split(&b, 60, 40).status, 200);
    let want = serde_json::json!({"blue": 60, "green": 40});
    wait_until("a has it after compaction", Duration::from_secs(1), || {
        split(&a) == want
    });
    // Wiped: nobody runs an empty state, and the state is written back.
    etcd.ctl(&["del", "--prefix", "/sy/f/"]).expect("wipe");
    wait_until("the state written back", Duration::from_secs(5), || {
        etcd.state("/sy/f")
            .is_some_and(|s| s["splits"]["web"]["split"]["blue"] == 60)
    });
    assert_eq!(split(&a), want);
    assert_eq!(split(&b), want);
}

#[test]
fn an_instance_on_an_older_config_keeps_what_only_the_newer_config_has() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let etcd = Etcd::start();
    let old = instance(&blue, &green, &etcd, "/sy/g");
    // The newer config has a second route, `api`.
    let newer = blue_green(blue.addr, green.addr, (1, 0), "", &store(&etcd, "/sy/g"))
        + "  - name: api\n    host: api.example.com\n    split:\n      blue: 1\n";
    let new = Switchyard::start(&newer);
    let r = new.api(
        "PUT",
        "/api/v1/routes/api/split",
        Some(r#"{"blue": 1, "green": 1}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until(
        "the old instance at that revision",
        Duration::from_secs(1),
        || store_status(&old)["revision"] == store_status(&new)["revision"],
    );
    assert_eq!(set_split(&old, 30, 70).status, 200);
    let stored = etcd.state("/sy/g").expect("state");
    assert_eq!(stored["splits"]["api"]["split"]["green"], 1, "{stored:#}");
    assert_eq!(stored["splits"]["web"]["split"]["green"], 70, "{stored:#}");
    wait_until(
        "the newer instance has both",
        Duration::from_secs(1),
        || split(&new) == serde_json::json!({"blue": 30, "green": 70}),
    );
    let api = json(&new.api("GET", "/api/v1/routes/api", None));
    assert_eq!(api["split"], serde_json::json!({"blue": 1, "green": 1}));
}

/// A client certificate for etcd's `--client-cert-auth`, signed by the tests' CA.
fn client_cert() -> (PathBuf, PathBuf, PathBuf) {
    let certs = test_certs();
    let dir = certs.ca.parent().expect("certs dir").to_path_buf();
    let (key, csr, cert) = (
        dir.join("etcd-client.key"),
        dir.join("etcd-client.csr"),
        dir.join("etcd-client.pem"),
    );
    if !cert.exists() {
        let ext = dir.join("etcd-client.ext");
        std::fs::write(
            &ext,
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        )
        .expect("ext");
        let run = |args: &[&std::ffi::OsStr]| {
            let out = Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let os = std::ffi::OsStr::new;
        run(&[
            os("req"),
            os("-newkey"),
            os("ec"),
            os("-pkeyopt"),
            os("ec_paramgen_curve:prime256v1"),
            os("-nodes"),
            os("-keyout"),
            key.as_os_str(),
            os("-out"),
            csr.as_os_str(),
            os("-subj"),
            os("/CN=switchyard"),
        ]);
        let ca_key = dir.join("ca.key");
        run(&[
            os("x509"),
            os("-req"),
            os("-in"),
            csr.as_os_str(),
            os("-CA"),
            certs.ca.as_os_str(),
            os("-CAkey"),
            ca_key.as_os_str(),
            os("-CAcreateserial"),
            os("-out"),
            cert.as_os_str(),
            os("-days"),
            os("3"),
            os("-extfile"),
            ext.as_os_str(),
        ]);
    }
    (certs.ca.clone(), cert, key)
}

#[test]
fn over_tls_with_a_client_certificate_a_password_and_a_dead_endpoint_it_works() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let (ca, cert, key) = client_cert();
    let mut etcd = Etcd::start_with(Some((ca.clone(), cert.clone(), key.clone())));
    etcd.ctl(&["user", "add", "root:s3cret"]).expect("user add");
    etcd.ctl(&["auth", "enable"]).expect("auth enable");
    etcd.user = Some("root:s3cret".into());
    let password = temp_path("etcd-password");
    std::fs::write(&password, "s3cret\n").expect("password file");
    // The first member named is down: the client goes on to the next.
    let dead = format!("https://127.0.0.1:{}", free_port());
    let yaml = |name: &str, password: &std::path::Path| {
        let store = format!(
            "state_file: {{dir}}/state.json\nstate_store:\n  etcd:\n    endpoints: [\"{dead}\", \"{}\"]\n    prefix: /sy/tls\n    name: {name}\n    username: root\n    password_file: {}\n    tls:\n      ca_file: {}\n      cert_file: {}\n      key_file: {}\n",
            etcd.endpoint(),
            password.display(),
            ca.display(),
            cert.display(),
            key.display()
        );
        blue_green(blue.addr, green.addr, (1, 0), "", &store)
    };
    let a = Switchyard::start(&yaml("lb-a", &password));
    let b = Switchyard::start(&yaml("lb-b", &password));
    let r = set_split(&a, 25, 75);
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until("b has the split", Duration::from_secs(1), || {
        split(&b) == serde_json::json!({"blue": 25, "green": 75})
    });
    let status = store_status(&b);
    assert_eq!(status["instance"], "lb-b", "{status:#}");
    assert_eq!(status["kind"], "etcd", "{status:#}");
    let stored = etcd
        .state("/sy/tls")
        .expect("state readable with the password");
    assert_eq!(stored["splits"]["web"]["split"]["green"], 75);
    // A wrong password: the instance serves, and changes are refused naming the store.
    let wrong = temp_path("etcd-password");
    std::fs::write(&wrong, "wrong\n").expect("password file");
    let c = Switchyard::start(&yaml("lb-c", &wrong));
    let refused = set_split(&c, 50, 50);
    assert!(
        matches!(refused.status, 500 | 503),
        "{} {}",
        refused.status,
        refused.text()
    );
    assert!(refused.text().contains("/sy/tls"), "{}", refused.text());
    assert_eq!(get(c.addr, "/").status, 200);
}

#[test]
fn the_driver_judges_windows_on_every_instances_traffic() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let etcd = Etcd::start();
    let all: Vec<Switchyard> = (0..2)
        .map(|_| instance(&blue, &green, &etcd, "/sy/h"))
        .collect();
    wait_until("a driver and both reports", Duration::from_secs(10), || {
        all.iter().any(|sy| store_status(sy)["driver"] == true)
            && store_status(&all[0])["instances"]
                .as_array()
                .map_or(0, Vec::len)
                == 2
    });
    let driver = all
        .iter()
        .position(|sy| store_status(sy)["driver"] == true)
        .expect("driver");
    let other = &all[1 - driver];
    // Only the instance that does not drive gets traffic: the driver's own counters stay at
    // zero, and its windows still see the requests.
    let load = Load::start(other.addr, 4);
    let r = all[driver].api(
        "POST",
        "/api/v1/routes/web/rollout",
        Some(r#"{"to": "green", "steps": [50], "step_interval": "1h", "analysis": {"interval": "500ms", "min_requests": 5}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let rollout = |sy: &Switchyard| json(&sy.api("GET", "/api/v1/routes/web/rollout", None));
    wait_until("a window with requests", Duration::from_secs(10), || {
        rollout(&all[driver])["windows"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["requests"].as_u64() > Some(0)))
    });
    green.set_failing_percent(100);
    wait_until(
        "rolled back on the other's errors",
        Duration::from_secs(10),
        || rollout(&all[driver])["state"] == "rolled_back",
    );
    wait_until(
        "the other instance rolled back too",
        Duration::from_secs(1),
        || {
            split(other) == serde_json::json!({"blue": 10000, "green": 0})
                || rollout(other)["state"] == "rolled_back"
        },
    );
    drop(load.stop());
}

#[test]
fn a_backend_is_removed_only_once_every_instance_has_drained_it() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let etcd = Etcd::start();
    let a = instance(&blue, &green, &etcd, "/sy/i");
    let b = instance(&blue, &green, &etcd, "/sy/i");
    assert_eq!(set_split(&a, 1, 1).status, 200);
    wait_until(
        "a sees both instances at the split's revision",
        Duration::from_secs(5),
        || {
            let status = store_status(&a);
            status["instances"].as_array().is_some_and(|all| {
                all.len() == 2 && all.iter().all(|i| i["revision"] == status["revision"])
            })
        },
    );
    green.set_delay(Duration::from_secs(3));
    // A slow request to green through b, while the operator drains green through a.
    let slow = std::thread::spawn({
        let addr = b.addr;
        move || {
            for _ in 0..20 {
                if get(addr, "/").text() == "green" {
                    return;
                }
            }
            panic!("no request reached green");
        }
    });
    let green_backend = format!("/api/v1/upstreams/green/backends/{}", green.addr);
    let held_by_b = |sy: &Switchyard| {
        store_status(sy)["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["in_flight"]["green"][green.addr.to_string()].as_u64() > Some(0))
    };
    // The slow request has reached green (counted on arrival; blue's answers are quick).
    wait_until("the slow request at green", Duration::from_secs(5), || {
        green.requests() > 0
    });
    let drained = a.api("PATCH", &green_backend, Some(r#"{"state": "draining"}"#));
    assert_eq!(drained.status, 200, "{}", drained.text());
    // b reports what it still has in flight to a backend it no longer sends new requests to,
    // once it runs the drain: until then a removal waits for it.
    let early = a.api("DELETE", &green_backend, None);
    assert_eq!(early.status, 409, "{}", early.text());
    wait_until(
        "a sees b's request in flight",
        Duration::from_secs(5),
        || held_by_b(&a),
    );
    let refused = a.api("DELETE", &green_backend, None);
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert!(refused.text().contains("in flight"), "{}", refused.text());
    slow.join().expect("slow request");
    wait_until(
        "b's request done, as a sees it",
        Duration::from_secs(5),
        || !held_by_b(&a),
    );
    let removed = a.api("DELETE", &green_backend, None);
    assert_eq!(removed.status, 200, "{}", removed.text());
    wait_until("removed on b too", Duration::from_secs(1), || {
        json(&b.api("GET", "/api/v1/upstreams/green", None))["backends"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
}

#[test]
fn a_binary_upgrade_of_the_driver_hands_the_lease_and_the_state_to_the_new_process() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let etcd = Etcd::start();
    let mut a = instance(&blue, &green, &etcd, "/sy/j");
    wait_until("a drives", Duration::from_secs(10), || {
        store_status(&a)["driver"] == true
    });
    let b = instance(&blue, &green, &etcd, "/sy/j");
    assert_eq!(set_split(&b, 80, 20).status, 200);
    let want = serde_json::json!({"blue": 80, "green": 20});
    wait_until("a has b's split", Duration::from_secs(1), || {
        split(&a) == want
    });
    let load = Load::start(a.addr, 4);
    load.run_for(50, Duration::from_secs(10));
    let old_pid = store_status(&a)["instances"]
        .as_array()
        .and_then(|all| all.iter().find(|i| i["driver"] == true).cloned())
        .expect("a's report")["pid"]
        .clone();
    a.upgrade();
    // The new process runs the shared state and follows what b writes; the old one gave the
    // lease up at the hand-over, so one of the two live processes drives.
    assert_eq!(split(&a), want);
    wait_until("a live process drives", Duration::from_secs(5), || {
        [&a, &b].iter().any(|sy| store_status(sy)["driver"] == true)
    });
    assert_eq!(set_split(&b, 40, 60).status, 200);
    let want = serde_json::json!({"blue": 40, "green": 60});
    wait_until("the new process has it", Duration::from_secs(1), || {
        split(&a) == want
    });
    wait_until(
        "one report per live process",
        Duration::from_secs(5),
        || {
            store_status(&b)["instances"]
                .as_array()
                .is_some_and(|all| all.len() == 2 && all.iter().all(|i| i["pid"] != old_pid))
        },
    );
    load.run_for(50, Duration::from_secs(10));
    let report = load.stop();
    println!("upgrade of the driver: {} requests", report.total());
    assert_no_failures("a", &report);
}
