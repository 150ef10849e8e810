//! The commands that talk to a running instance (`status`, `rollout`), run as an operator runs
//! them: the real binary, pointed at the config file of a real instance.

use std::path::Path;

use serde_json::Value;

use crate::fixtures::*;

/// `switchyard <args> --config <config>`: exit code, stdout, stderr.
fn run_with(config: &Path, args: &[&str]) -> (i32, String, String) {
    let config = config.display().to_string();
    let mut all = args.to_vec();
    all.extend(["--config", &config]);
    run_binary(&all)
}

/// The blue/green config with `token_file` under `admin`.
fn with_token(yaml: &str, token_file: &Path) -> String {
    yaml.replace(
        "  address: {admin}\n",
        &format!(
            "  address: {{admin}}\n  token_file: {}\n",
            token_file.display()
        ),
    )
}

#[test]
fn status_lists_the_route_its_split_and_every_backend() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (90, 10), "", ""));
    let (code, stdout, stderr) = run_with(&sy.config, &["status"]);
    assert_eq!(code, 0, "{stderr}");
    let route = stdout
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("no row for route web:\n{stdout}"));
    assert!(route.ends_with("blue=90 (90%) green=10 (10%)"), "{stdout}");
    for (upstream, backend) in [("blue", blue.addr), ("green", green.addr)] {
        let row = stdout
            .lines()
            .find(|l| l.contains(&backend.to_string()))
            .unwrap_or_else(|| panic!("no row for {backend}:\n{stdout}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                upstream,
                "round_robin",
                &backend.to_string(),
                "true",
                "active",
                "1",
                "0"
            ],
            "{stdout}"
        );
    }

    let (code, stdout, stderr) = run_with(&sy.config, &["status", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let json: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(json["routes"][0]["name"], "web");
    assert_eq!(json["routes"][0]["split"]["green"], 10);
    assert_eq!(json["upstreams"].as_array().map(Vec::len), Some(2));
}

#[test]
fn status_sends_the_token_from_the_file_and_says_when_it_cannot_read_it() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let token_file = temp_path("admin.token");
    std::fs::write(&token_file, "cli-s3cret\n").expect("token");
    let sy = Switchyard::start(&with_token(
        &blue_green(blue.addr, green.addr, (1, 1), "", ""),
        &token_file,
    ));
    // The operator's copy of the config names the API by its wildcard: dialled on loopback.
    let text = std::fs::read_to_string(&sy.config).expect("config");
    let wildcard = sy.dir.join("wildcard.yaml");
    std::fs::write(
        &wildcard,
        text.replace(
            &sy.admin.to_string(),
            &format!("0.0.0.0:{}", sy.admin.port()),
        ),
    )
    .expect("write config");
    assert_ne!(std::fs::read_to_string(&wildcard).ok(), Some(text));
    for config in [&sy.config, &wildcard] {
        let (code, stdout, stderr) = run_with(config, &["status"]);
        assert_eq!(code, 0, "{}: {stderr}", config.display());
        assert!(stdout.contains(&blue.addr.to_string()), "{stdout}");
    }

    std::fs::remove_file(&token_file).expect("remove token");
    let (code, stdout, stderr) = run_with(&sy.config, &["status"]);
    assert_eq!(code, 1, "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "switchyard: admin.token_file: cannot read {}: ",
            token_file.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret") && !stdout.contains("s3cret"));
}

#[test]
fn a_refused_call_prints_the_apis_error_and_exits_1() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (1, 1), "", ""));
    let answer = sy.api("GET", "/api/v1/routes/nope/rollout", None);
    assert_eq!(answer.status, 404, "{}", answer.text());
    let body: Value = serde_json::from_slice(&answer.body).expect("JSON error");
    let error = body["error"].as_str().expect("an error field");

    let (code, stdout, stderr) = run_with(&sy.config, &["rollout", "status", "nope"]);
    assert_eq!(code, 1, "{stdout}");
    assert_eq!(stderr, format!("switchyard: {error} (HTTP 404)\n"));
    assert_eq!(stdout, "");
}

#[test]
fn an_unreachable_api_or_a_config_without_one_is_named() {
    let port = free_port();
    let yaml = fill(
        &blue_green(
            "127.0.0.1:1".parse().expect("address"),
            "127.0.0.1:2".parse().expect("address"),
            (1, 1),
            "",
            "",
        ),
        "127.0.0.1:3".parse().expect("address"),
    )
    .replace("{admin}", &format!("127.0.0.1:{port}"))
    .replace("{metrics}", &format!("127.0.0.1:{}", free_port()));
    let config = temp_path("unreachable.yaml");
    std::fs::write(&config, &yaml).expect("write config");
    let (code, _, stderr) = run_with(&config, &["status"]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with(&format!(
            "switchyard: the admin API is unreachable: cannot connect to 127.0.0.1:{port}: "
        )),
        "{stderr}"
    );
    assert!(
        stderr.ends_with(&format!(
            "; 127.0.0.1:{port} is admin.address in {0}; is `switchyard run --config {0}` running with this config?\n",
            config.display()
        )),
        "{stderr}"
    );

    let without_admin = temp_path("no-admin.yaml");
    let yaml = yaml.replace(&format!("admin:\n  address: 127.0.0.1:{port}\n"), "");
    std::fs::write(&without_admin, yaml).expect("write config");
    let (code, _, stderr) = run_with(&without_admin, &["rollout", "abort", "web"]);
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        format!(
            "switchyard: {} has no admin section, so the instance it runs has no admin API for this command; add one (admin: {{address: 127.0.0.1:9000}}) and restart it\n",
            without_admin.display()
        )
    );
}

#[test]
fn every_command_has_its_own_help() {
    let (code, stdout, stderr) = run_binary(&["rollout", "start", "--help"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("Usage: switchyard rollout start [OPTIONS] --to <UPSTREAM> <ROUTE>"),
        "{stdout}"
    );
    for option in [
        "--every",
        "--steps",
        "--check",
        "--max-error-rate",
        "--on-failure",
    ] {
        assert!(stdout.contains(option), "{option}: {stdout}");
    }
    for command in [
        &["status"][..],
        &["rollout"],
        &["run"],
        &["check"],
        &["demo"],
        &["split"],
        &["backend", "drain"],
        &["upstream", "disable"],
        &["reload"],
        &["events"],
        &["state", "reset"],
        &["config"],
        &["completions"],
        &["man"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let (code, stdout, _) = run_binary(&args);
        assert_eq!(code, 0, "{args:?}");
        assert!(stdout.contains("Usage: switchyard "), "{args:?}: {stdout}");
    }
}

/// The row of a table whose first cells are `first`.
fn row<'a>(stdout: &'a str, first: &[&str]) -> Vec<&'a str> {
    stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.starts_with(first))
        .unwrap_or_else(|| panic!("no row {first:?}:\n{stdout}"))
}

#[test]
fn the_commands_operators_used_curl_for_print_tables_and_refusals() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let extra = TestBackend::start("extra");
    let sy = Switchyard::start(&blue_green(
        blue.addr,
        green.addr,
        (90, 10),
        "",
        "state_file: {dir}/state.json\n",
    ));
    let ok = |args: &[&str]| {
        let (code, stdout, stderr) = run_with(&sy.config, args);
        assert_eq!(code, 0, "{args:?}: {stderr}");
        stdout
    };
    let out = ok(&["split", "web", "blue=50", "green=50"]);
    assert!(
        row(&out, &["web"]).ends_with(&["blue=50", "(50%)", "green=50", "(50%)"]),
        "{out}"
    );

    let (b, e) = (blue.addr.to_string(), extra.addr.to_string());
    let out = ok(&["backend", "drain", "blue", &b]);
    assert_eq!(
        row(&out, &["blue", &b]),
        ["blue", &b, "true", "draining", "1", "1", "0"]
    );
    let out = ok(&["backend", "weight", "blue", &b, "5"]);
    assert_eq!(row(&out, &["blue", &b])[4], "5", "{out}");
    let out = ok(&["backend", "add", "green", &e, "--weight", "2"]);
    assert_eq!(row(&out, &["green", &e])[3..5], ["active", "2"], "{out}");
    // An active backend cannot be removed: the API's error, exit 1.
    let (code, stdout, stderr) = run_with(&sy.config, &["backend", "remove", "green", &e]);
    assert_eq!((code, stdout.as_str()), (1, ""));
    assert_eq!(
        stderr,
        format!("switchyard: backend {e} is active; set its state to \"draining\" or \"disabled\" first (HTTP 409)\n")
    );
    ok(&["backend", "disable", "green", &e]);
    assert_eq!(
        ok(&["backend", "remove", "green", &e]),
        format!("upstream green backend {e} removed\n")
    );

    // Blue is draining: green is all route web has left.
    let (code, _, stderr) = run_with(&sy.config, &["upstream", "drain", "green"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("route \"web\" would have no upstream with an available backend"),
        "{stderr}"
    );
    assert!(
        stderr.ends_with("send \"force\": true to do it anyway (HTTP 409)\n"),
        "{stderr}"
    );
    let out = ok(&["upstream", "drain", "green", "--force"]);
    assert_eq!(row(&out, &["green"])[4], "draining", "{out}");
    assert_eq!(get(sy.addr, "/").status, 503);
    for upstream in ["blue", "green"] {
        ok(&["upstream", "enable", upstream]);
    }
    assert_eq!(get(sy.addr, "/").status, 200);

    let out = ok(&["events", "--limit", "3"]);
    assert!(out.starts_with("ID "), "{out}");
    assert_eq!(out.lines().count(), 4, "{out}");
    assert!(row(&out, &[]).len() > 4, "{out}");
    let json: Value =
        serde_json::from_str(&ok(&["events", "--since", "0", "--json"])).expect("JSON");
    assert!(
        json.as_array()
            .is_some_and(|e| e.iter().any(|e| e["kind"] == "upstream_changed")),
        "{json}"
    );
    let (code, _, stderr) = run_with(&sy.config, &["events", "--limit", "5000"]);
    assert_eq!(
        (code, stderr.as_str()),
        (
            1,
            "switchyard: limit: 5000 is out of range 1..=1000 (HTTP 400)\n"
        )
    );

    assert_eq!(ok(&["reload"]), "config reloaded\n");

    let out = ok(&["state", "show"]);
    assert!(
        out.starts_with(
            "runtime changes on top of the config file:\n  route web split blue 50, green 50\n"
        ),
        "{out}"
    );
    let out = ok(&["state", "reset"]);
    assert!(out.starts_with("runtime state reset, the config file rules; dropped:\n  route web split blue 50, green 50\n"), "{out}");
    assert_eq!(
        ok(&["state", "show"]),
        "no runtime changes: the config file rules\n"
    );
    let out = ok(&["status"]);
    assert!(
        row(&out, &["web"]).ends_with(&["blue=90", "(90%)", "green=10", "(10%)"]),
        "{out}"
    );
}

#[test]
fn config_prints_the_effective_config_that_check_accepts() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let mut sy = Switchyard::start(&blue_green(
        blue.addr,
        green.addr,
        (90, 10),
        "",
        "state_file: {dir}/state.json\n",
    ));
    canary_and_drain(&sy, &green);

    let effective = |sy: &Switchyard| {
        let (code, stdout, stderr) = run_with(&sy.config, &["config"]);
        assert_eq!(code, 0, "{stderr}");
        let yaml: serde_yaml::Value = serde_yaml::from_str(&stdout).expect("YAML");
        assert_eq!(yaml["routes"][0]["split"]["blue"], 70, "{stdout}");
        assert_eq!(yaml["routes"][0]["split"]["green"], 30, "{stdout}");
        assert_eq!(
            yaml["upstreams"]["green"]["backends"][0]["weight"], 1,
            "{stdout}"
        );
        // Defaults filled in.
        assert_eq!(
            yaml["upstreams"]["blue"]["algorithm"], "round_robin",
            "{stdout}"
        );
        assert_eq!(yaml["server"]["keepalive_timeout"], "1m", "{stdout}");
        assert!(
            stdout.contains(&format!(
                "#   upstream green backend {}: draining\n",
                green.addr
            )),
            "{stdout}"
        );
        let file = sy.dir.join("effective.yaml");
        std::fs::write(&file, &stdout).expect("write");
        let (code, _, stderr) = run_binary(&["check", "--config", &file.display().to_string()]);
        assert_eq!(code, 0, "{stderr}\n{stdout}");
        stdout
    };
    let live = effective(&sy);
    assert!(
        live.contains(&format!(
            "# and the runtime state from the running instance's admin API ({}).",
            sy.admin
        )),
        "{live}"
    );
    let (code, stdout, stderr) = run_with(&sy.config, &["config", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let json: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(
        json["config"]["routes"][0]["split"]["green"], 30,
        "{stdout}"
    );
    assert!(
        json["comment"][0]
            .as_str()
            .is_some_and(|c| c.starts_with("Effective config of ")),
        "{stdout}"
    );
    // Stopped, the state file speaks for it.
    sy.signal("TERM");
    assert_eq!(
        sy.wait_exit(std::time::Duration::from_secs(10)).code(),
        Some(0)
    );
    let on_disk = effective(&sy);
    assert!(
        on_disk.contains(&format!(
            "# and the runtime state from state_file {}",
            sy.dir.join("state.json").display()
        )),
        "{on_disk}"
    );
}

#[test]
fn completions_and_the_man_page_name_the_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, stdout, stderr) = run_binary(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {stderr}");
        for command in ["split", "backend", "upstream", "events", "rollout"] {
            assert!(stdout.contains(command), "{shell}: {command}");
        }
    }
    let (code, stdout, stderr) = run_binary(&["man"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(".TH switchyard 1"), "{stdout}");
    assert!(
        stdout.contains("split") && stdout.contains("completions"),
        "{stdout}"
    );
}
