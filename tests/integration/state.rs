//! Runtime state across restarts and reloads: the state file, a corrupt one, and reload with
//! good and bad files (POST and SIGHUP).

use std::time::Duration;

use serde_json::{json, Value};

use crate::fixtures::*;

fn json_body(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

fn split_of(sy: &Switchyard) -> Value {
    json_body(&sy.api("GET", "/api/v1/routes/web", None))["split"].clone()
}

const STATE: &str = "state_file: {dir}/state.json\n";

#[test]
fn a_restart_keeps_the_canary_split_and_the_drain() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let mut sy = Switchyard::start(&blue_green(blue.addr, green.addr, (100, 0), "", STATE));
    canary_and_drain(&sy, &green);
    let saved = std::fs::read_to_string(sy.dir.join("state.json")).expect("state file written");
    assert!(saved.contains("\"draining\""), "{saved}");

    sy.restart();
    assert_eq!(split_of(&sy), json!({"blue": 70, "green": 30}));
    let green_view = json_body(&sy.api("GET", "/api/v1/upstreams/green", None));
    assert_eq!(green_view["backends"][0]["state"], "draining");
    // Green is draining, so the 30% goes to blue.
    for _ in 0..10 {
        assert_eq!(get(sy.addr, "/").text(), "blue");
    }
}

#[test]
fn a_corrupt_state_file_is_kept_aside_and_the_start_goes_on() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let mut sy = Switchyard::start(&blue_green(blue.addr, green.addr, (90, 10), "", STATE));
    sy.signal("TERM");
    sy.wait_exit(Duration::from_secs(10));
    std::fs::write(sy.dir.join("state.json"), "{ this is not json").expect("corrupt");
    sy.restart_stopped();
    assert_eq!(split_of(&sy), json!({"blue": 90, "green": 10}));
    let kept: Vec<String> = std::fs::read_dir(&sy.dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("state.json.corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let aside = std::fs::read_to_string(sy.dir.join(&kept[0])).expect("kept");
    assert_eq!(aside, "{ this is not json");
    assert!(sy.log_text().contains("is corrupt"), "{}", sy.log_text());
}

#[test]
fn reload_refuses_a_bad_file_and_applies_a_good_one_keeping_state() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let original = blue_green(blue.addr, green.addr, (90, 10), "", STATE);
    let sy = Switchyard::start(&original);
    let r = sy.api(
        "PATCH",
        &format!("/api/v1/upstreams/green/backends/{}", green.addr),
        Some(r#"{"weight": 7}"#),
    );
    assert_eq!(r.status, 200);

    sy.write_config(&original.replace("green: 10", "purple: 10"));
    let r = sy.api("POST", "/api/v1/reload", None);
    assert_eq!(r.status, 400);
    let body = json_body(&r);
    assert_eq!(
        body["problems"],
        json!(["routes[0].split.purple: unknown upstream \"purple\""])
    );
    assert!(body["error"]
        .as_str()
        .unwrap_or_default()
        .starts_with("invalid config, nothing changed"));
    assert_eq!(
        split_of(&sy),
        json!({"blue": 90, "green": 10}),
        "the running config stays"
    );
    assert_eq!(get(sy.addr, "/").status, 200);

    let changed = original
        .replace("blue: 90", "blue: 50")
        .replace("green: 10", "green: 50")
        .replace("threads: 2", "threads: 1");
    sy.write_config(&changed);
    let r = sy.api("POST", "/api/v1/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let body = json_body(&r);
    assert_eq!(
        body["needs_restart"],
        json!(["server.threads: changed in the file; needs restart or upgrade"])
    );
    assert_eq!(split_of(&sy), json!({"blue": 50, "green": 50}));
    let green_view = json_body(&sy.api("GET", "/api/v1/upstreams/green", None));
    assert_eq!(
        green_view["backends"][0]["weight"], 7,
        "runtime state survives a reload"
    );

    sy.write_config(
        &changed
            .replace("blue: 50", "blue: 20")
            .replace("green: 50", "green: 80"),
    );
    sy.signal("HUP");
    // The reload is counted right after the new config is live, not before.
    wait_until("SIGHUP reload, counted", Duration::from_secs(10), || {
        split_of(&sy) == json!({"blue": 20, "green": 80})
            && sample(
                &sy.scrape(),
                "switchyard_config_reloads_total{result=\"success\"}",
            ) == Some(2.0)
    });
    let metrics = sy.scrape();
    assert_eq!(
        sample(
            &metrics,
            "switchyard_config_reloads_total{result=\"failure\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn a_state_entry_that_no_longer_fits_is_dropped_with_a_warning() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let original = blue_green(blue.addr, green.addr, (90, 10), "", STATE);
    let sy = Switchyard::start(&original);
    let r = sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(r#"{"blue": 70, "green": 30}"#),
    );
    assert_eq!(r.status, 200);
    let without_green = original
        .replace(
            &format!("  green:\n    backends:\n      - address: {}\n", green.addr),
            "",
        )
        .replace("      green: 10\n", "");
    sy.write_config(&without_green);
    let r = sy.api("POST", "/api/v1/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        json_body(&r)["dropped_state"],
        json!(["state: split of route \"web\" dropped: split.green: unknown upstream \"green\""])
    );
    assert_eq!(split_of(&sy), json!({"blue": 90}));
    assert!(sy
        .log_text()
        .contains("state: split of route \"web\" dropped"));
}

#[test]
fn a_state_file_that_cannot_be_written_refuses_the_change_with_500() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let unwritable = "state_file: {dir}/no-such-dir/state.json\n";
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (90, 10), "", unwritable));
    let r = sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(r#"{"blue": 1, "green": 1}"#),
    );
    assert_eq!(r.status, 500);
    let error = json_body(&r)["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.starts_with("cannot save state file "), "{error}");
    assert_eq!(
        split_of(&sy),
        json!({"blue": 90, "green": 10}),
        "not applied"
    );
}

#[test]
fn without_a_state_file_changes_live_in_memory_and_the_log_says_so_once() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (90, 10), "", ""));
    let r = sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(r#"{"blue": 1, "green": 1}"#),
    );
    assert_eq!(r.status, 200);
    assert_eq!(sy.log_text().matches("no state_file configured").count(), 1);
}

#[test]
fn without_a_state_file_an_upgrade_still_keeps_the_runtime_state() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let mut sy = Switchyard::start(&blue_green(blue.addr, green.addr, (90, 10), "", ""));
    canary_and_drain(&sy, &green);
    sy.upgrade();
    assert_eq!(split_of(&sy), json!({"blue": 70, "green": 30}));
    let green_view = json_body(&sy.api("GET", "/api/v1/upstreams/green", None));
    assert_eq!(green_view["backends"][0]["state"], "draining");
    assert!(
        !sy.dir.join("upgrade.sock.state.json").exists(),
        "the handed-over state is taken once"
    );
    assert!(sy
        .log_text()
        .contains("runtime state taken over from the previous process"));
}

#[test]
fn a_reset_is_saved_so_a_restart_keeps_the_file_alone_and_waits_for_a_running_rollout() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let mut sy = Switchyard::start(&blue_green(blue.addr, green.addr, (100, 0), "", STATE));
    canary_and_drain(&sy, &green);
    let r = sy.api("POST", "/api/v1/state/reset", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let saved: Value = serde_json::from_str(
        &std::fs::read_to_string(sy.dir.join("state.json")).expect("state file"),
    )
    .expect("JSON");
    assert_eq!(saved["splits"], json!({}), "{saved}");
    assert_eq!(saved.get("upstreams"), Some(&json!({})), "{saved}");
    sy.restart();
    assert_eq!(split_of(&sy), json!({"blue": 100, "green": 0}));
    let green_view = json_body(&sy.api("GET", "/api/v1/upstreams/green", None));
    assert_eq!(green_view["backends"][0]["state"], "active");

    // A running rollout owns the split: the reset waits until it is aborted or promoted.
    let start = sy.api(
        "POST",
        "/api/v1/routes/web/rollout",
        Some(r#"{"to": "green", "steps": [10, 50], "step_interval": "1m"}"#),
    );
    assert_eq!(start.status, 201, "{}", start.text());
    let r = sy.api("POST", "/api/v1/state/reset", None);
    assert_eq!(r.status, 409, "{}", r.text());
    let error = json_body(&r)["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.starts_with("route \"web\" has a rollout running: web (blue → green"),
        "{error}"
    );
    assert!(error.contains("abort or promote it first"), "{error}");
    assert_eq!(
        sy.api("POST", "/api/v1/routes/web/rollout/abort", None)
            .status,
        200
    );
    assert_eq!(sy.api("POST", "/api/v1/state/reset", None).status, 200);
    assert_eq!(split_of(&sy), json!({"blue": 100, "green": 0}));
}
