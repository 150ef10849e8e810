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

    let without_admin = temp_path("no-admin.yaml");
    let yaml = yaml.replace(&format!("admin:\n  address: 127.0.0.1:{port}\n"), "");
    std::fs::write(&without_admin, yaml).expect("write config");
    let (code, _, stderr) = run_with(&without_admin, &["rollout", "abort", "web"]);
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        format!(
            "switchyard: {} has no admin section: status and rollout talk to the admin API it names\n",
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
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let (code, stdout, _) = run_binary(&args);
        assert_eq!(code, 0, "{args:?}");
        assert!(stdout.contains("Usage: switchyard "), "{args:?}: {stdout}");
    }
}
