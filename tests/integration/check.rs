//! `switchyard check`, and `run` refusing what it cannot start, with the exact lines.

use crate::fixtures::*;

const BAD: &str = r#"
listeners:
  - address: 127.0.0.1:8080
upstreams:
  green:
    backends:
      - address: 127.0.0.1:9003
      - address: not-an-address
      - address: 127.0.0.1:9003
    health_check:
      type: tcp
      interval: 1s
      timeout: 2s
      fall: 0
routes:
  - name: web
    path_prefix: app
    split:
      green: 0
      blue: 10
"#;

const BAD_LINES: &str = "\
upstreams.green.backends[1].address: \"not-an-address\" is not a valid address: expected IP:port, e.g. 127.0.0.1:9001
upstreams.green.backends[2].address: 127.0.0.1:9003 is listed twice (also backends[0])
upstreams.green.health_check.timeout: 2s must be shorter than interval (1s)
upstreams.green.health_check.fall: must be at least 1
routes[0].path_prefix: \"app\" must start with '/'
routes[0].split.blue: unknown upstream \"blue\"
routes[0].split: weights must not all be 0
";

fn write(yaml: &str) -> String {
    let path = temp_path("config.yaml");
    std::fs::write(&path, yaml).expect("write config");
    path.display().to_string()
}

#[test]
fn check_accepts_a_valid_file() {
    let backend = TestBackend::start("a");
    let yaml = one_upstream("round_robin", &[(backend.addr, 1)], "");
    let path = write(&fill(&yaml, "127.0.0.1:8080".parse().expect("addr")));
    let (code, stdout, stderr) = run_binary(&["check", "--config", &path]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.ends_with(": ok\n"), "{stdout}");
}

#[test]
fn check_lists_every_problem_with_its_field_path() {
    let path = write(BAD);
    let (code, _, stderr) = run_binary(&["check", "--config", &path]);
    assert_eq!(code, 1);
    assert_eq!(stderr, BAD_LINES);
}

#[test]
fn check_reports_yaml_errors_with_line_and_column() {
    let path = write("listeners:\n  - address: 127.0.0.1:8080\n    port: 80\n");
    let (code, _, stderr) = run_binary(&["check", "--config", &path]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("listeners[0].port: unknown field; expected one of address,")
            && stderr.contains("(line 3, column 5)")
            && stderr.ends_with("; problems after this one are not checked until it is fixed\n"),
        "{stderr}"
    );
    let path = write("upstreams:\n  a:\n    backends:\n  - [\n");
    let (code, _, stderr) = run_binary(&["check", "--config", &path]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("switchyard: YAML syntax error: ") && stderr.contains("(line 4, column"),
        "{stderr}"
    );
}

#[test]
fn run_with_an_invalid_config_prints_the_same_lines_and_binds_nothing() {
    let port = free_port();
    let path = write(&BAD.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}")));
    let (code, _, stderr) = run_binary(&["run", "--config", &path]);
    assert_eq!(code, 1);
    assert_eq!(stderr, BAD_LINES);
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
}

#[test]
fn run_on_a_port_in_use_is_one_line_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let backend = TestBackend::start("a");
    let path = write(&fill(
        &one_upstream("round_robin", &[(backend.addr, 1)], ""),
        addr,
    ));
    let (code, _, stderr) = run_binary(&["run", "--config", &path]);
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "switchyard: listeners[0].address: cannot listen on {addr}: "
        )),
        "{stderr}"
    );
}

#[test]
fn usage_errors_exit_2_and_version_prints() {
    let (code, _, stderr) = run_binary(&["frobnicate"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("unrecognized subcommand 'frobnicate'"),
        "{stderr}"
    );
    let (code, _, stderr) = run_binary(&["check"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--config <FILE>"), "{stderr}");
    let (code, stdout, _) = run_binary(&["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("switchyard "), "{stdout}");
}

#[test]
fn config_path_can_come_from_the_environment() {
    let path = write(BAD);
    let out = std::process::Command::new(BINARY)
        .arg("check")
        .env("SWITCHYARD_CONFIG", &path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr), BAD_LINES);
}
