//! Files that must not be turned against the balancer (issue 11, finding 6): the state file's
//! temp file, a symlinked state file, temp files of a killed process, kept corrupt copies,
//! and the upgrade socket, whose directory only we may write and whose listener must be ours.

use std::net::SocketAddr;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::fixtures::*;

const STATE: &str = "state_file: {dir}/state.json\n";
/// `nobody` on every Linux distribution.
const OTHER_UID: u32 = 65534;

fn put_split(sy: &Switchyard, blue: u32, green: u32) {
    let body = format!(r#"{{"blue": {blue}, "green": {green}}}"#);
    let r = sy.api("PUT", "/api/v1/routes/web/split", Some(&body));
    assert_eq!(r.status, 200, "{}", r.text());
}

fn split_of(sy: &Switchyard) -> Value {
    let r = sy.api("GET", "/api/v1/routes/web", None);
    serde_json::from_slice::<Value>(&r.body).expect("json")["split"].clone()
}

fn started(state: &str) -> (TestBackend, TestBackend, Switchyard) {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (90, 10), "", state));
    (blue, green, sy)
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[test]
fn a_link_planted_at_the_state_files_temp_name_is_not_written_through() {
    let (_blue, _green, sy) = started(STATE);
    let victim = sy.dir.join("victim");
    std::fs::write(&victim, "precious").expect("victim");
    // The name the temp file used to have: `<state file>.tmp-<pid>`.
    let planted = sy.dir.join(format!("state.json.tmp-{}", sy.child.id()));
    symlink(&victim, &planted).expect("plant");
    put_split(&sy, 70, 30);
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "precious"
    );
    let state = sy.dir.join("state.json");
    let meta = std::fs::symlink_metadata(&state).expect("state file");
    assert!(meta.is_file(), "the state file is a file of its own");
    assert!(std::fs::read_to_string(&state)
        .expect("state")
        .contains("70"));
}

#[test]
fn a_symlinked_state_file_stays_a_link_and_its_target_is_written() {
    let (_blue, _green, mut sy) = started(STATE);
    std::fs::create_dir(sy.dir.join("volume")).expect("volume");
    symlink("volume/state.json", sy.dir.join("state.json")).expect("link");
    put_split(&sy, 70, 30);
    let link = std::fs::symlink_metadata(sy.dir.join("state.json")).expect("link");
    assert!(link.file_type().is_symlink(), "still a link");
    let saved = std::fs::read_to_string(sy.dir.join("volume/state.json")).expect("target");
    assert!(saved.contains("70"), "{saved}");
    sy.restart();
    assert_eq!(split_of(&sy), json!({"blue": 70, "green": 30}));
}

#[test]
fn temp_files_a_killed_process_left_are_removed_at_the_next_start() {
    let (_blue, _green, mut sy) = started(STATE);
    put_split(&sy, 70, 30);
    sy.signal("KILL");
    sy.wait_exit(Duration::from_secs(10));
    // What a process killed mid-save leaves: this version's name, and the older one's.
    let dead = sy.child.id();
    let left = [
        sy.dir
            .join(format!("state.json.tmp-{dead}-0123456789abcdef")),
        sy.dir.join(format!("state.json.tmp-{dead}")),
    ];
    for file in &left {
        std::fs::write(file, "{ half written").expect("temp file");
    }
    sy.restart_stopped();
    for file in &left {
        assert!(!file.exists(), "{} still there", file.display());
    }
    assert_eq!(split_of(&sy), json!({"blue": 70, "green": 30}));
    assert!(sy.log_text().contains("which is no longer running"));
}

#[test]
fn a_corrupt_state_file_never_overwrites_a_kept_copy() {
    let (_blue, _green, mut sy) = started(STATE);
    sy.signal("TERM");
    sy.wait_exit(Duration::from_secs(10));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    // Copies kept by earlier starts under every name this start could pick in its first
    // seconds, as when two corrupt files come in the same second.
    let kept: Vec<(PathBuf, String)> = (now..now + 30)
        .map(|s| {
            let path = sy.dir.join(format!("state.json.corrupt-{s}"));
            let text = format!("first copy {s}");
            std::fs::write(&path, &text).expect("kept copy");
            (path, text)
        })
        .collect();
    std::fs::write(sy.dir.join("state.json"), "{ the second corrupt file").expect("corrupt");
    sy.restart_stopped();
    for (path, text) in &kept {
        assert_eq!(&std::fs::read_to_string(path).expect("kept copy"), text);
    }
    let log = sy.log_text();
    let aside = log
        .split("kept as ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no kept copy in the log:\n{log}"));
    assert_eq!(
        std::fs::read_to_string(aside).expect("new copy"),
        "{ the second corrupt file"
    );
}

/// `switchyard run --config <yaml> [extra]` with `socket` as `server.upgrade_socket`; the exit
/// code and stderr, or `None` if it was still running after `limit` (then killed).
fn run_with_socket(socket: &Path, extra: &[&str], limit: Duration) -> Option<(i32, String)> {
    let backend = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let yaml = one_upstream("round_robin", &[(backend, 1)], "")
        .replace("{upgrade_socket}", &socket.display().to_string())
        .replace("{listen}", &format!("127.0.0.1:{}", free_port()));
    let config = temp_path("switchyard.yaml");
    std::fs::write(&config, yaml).expect("config");
    let stderr = temp_path("stderr.log");
    let mut child = Command::new(BINARY)
        .args(["run", "--config"])
        .arg(&config)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("stderr"))
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + limit;
    let code = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status.code().unwrap_or(-1);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Some((code, std::fs::read_to_string(stderr).unwrap_or_default()))
}

/// In both modes, before anything is bound: exit 1 with one line naming the directory.
fn assert_refused(dir: &Path, says: &str) {
    let socket = dir.join("upgrade.sock");
    for extra in [&[][..], &["--upgrade"][..]] {
        let (code, stderr) = run_with_socket(&socket, extra, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("run {extra:?} with {} still running", dir.display()));
        assert_eq!(code, 1, "run {extra:?}: {stderr}");
        let line = format!("server.upgrade_socket: directory {} {says}", dir.display());
        assert!(stderr.contains(&line), "run {extra:?}: {stderr}");
        assert!(!socket.exists(), "run {extra:?} bound the socket");
    }
}

#[test]
fn an_upgrade_socket_directory_other_users_can_write_is_refused_at_start() {
    let dir = temp_path("shared");
    std::fs::create_dir(&dir).expect("dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    assert_refused(&dir, "is writable by other users (mode 0777)");
}

#[test]
fn an_upgrade_socket_directory_of_another_user_is_refused_at_start() {
    if !is_root() {
        eprintln!("skipped: needs root to chown a directory to uid {OTHER_UID}");
        return;
    }
    let dir = temp_path("theirs");
    std::fs::create_dir(&dir).expect("dir");
    std::os::unix::fs::chown(&dir, Some(OTHER_UID), None).expect("chown");
    assert_refused(&dir, &format!("is owned by uid {OTHER_UID}"));
}

#[test]
fn a_missing_upgrade_socket_directory_is_created_for_us_alone() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let yaml = blue_green(blue.addr, green.addr, (90, 10), "", "")
        .replace("{upgrade_socket}", "{dir}/run/switchyard/upgrade.sock");
    let sy = Switchyard::start(&yaml);
    for created in ["run", "run/switchyard"] {
        let mode = std::fs::metadata(sy.dir.join(created))
            .unwrap_or_else(|e| panic!("{created}: {e}"))
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{created}");
    }
}

#[test]
fn sigquit_refuses_the_handover_to_a_socket_of_another_user_and_keeps_serving() {
    if !is_root() {
        eprintln!("skipped: needs root to give a socket to uid {OTHER_UID}");
        return;
    }
    let (_blue, _green, mut sy) = started("");
    let socket = sy.dir.join("upgrade.sock");
    // Someone else listens where the new process would: they must not get our sockets.
    let squatter = UnixListener::bind(&socket).expect("bind");
    squatter.set_nonblocking(true).expect("nonblocking");
    std::os::unix::fs::chown(&socket, Some(OTHER_UID), None).expect("chown");
    sy.signal("QUIT");
    wait_until("the refusal in the log", Duration::from_secs(10), || {
        sy.log_text().contains("SIGQUIT refused")
    });
    let log = sy.log_text();
    assert!(
        log.contains(&format!(
            "was bound by uid {OTHER_UID}, not by this process's uid 0"
        )),
        "{log}"
    );
    let connected = squatter.accept();
    assert!(
        connected
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "the squatter got a connection: {connected:?}"
    );
    assert!(
        sy.child.try_wait().expect("child").is_none(),
        "still running"
    );
    assert_eq!(get(sy.addr, "/").status, 200);
    // The squatter gone, a real upgrade goes through as before.
    drop(squatter);
    sy.upgrade();
    assert_eq!(get(sy.addr, "/").status, 200);
    // The fixtures' directories are 0755: `run --upgrade` says what that exposes.
    assert!(sy
        .log_text()
        .contains("can be entered by other users (mode 0755)"));
}
