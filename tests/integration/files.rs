//! Files that must not be turned against the balancer (issue 11, finding 6): the state file's
//! temp file, a symlinked state file, temp files of a killed process, kept corrupt copies.

use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::fixtures::*;

const STATE: &str = "state_file: {dir}/state.json\n";

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
