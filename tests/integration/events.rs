//! The event log against the real binary: a known sequence of changes (admin API, reload,
//! health) read back from `GET /api/v1/events` in order, with ids, names and before/after,
//! paging with `since` and `limit`, one log line per event, and the upgrade's events.

use std::time::Duration;

use serde_json::{json, Value};

use crate::fixtures::*;

const CHECK: &str = "    health_check:\n      type: http\n      path: /healthz\n      interval: 200ms\n      timeout: 100ms\n      rise: 2\n      fall: 2\n";

fn json_body(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

fn events(sy: &Switchyard, query: &str) -> Vec<Value> {
    let r = sy.api("GET", &format!("/api/v1/events{query}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    match json_body(&r) {
        Value::Array(events) => events,
        other => panic!("not an array: {other}"),
    }
}

fn ids(events: &[Value]) -> Vec<u64> {
    events.iter().filter_map(|e| e["id"].as_u64()).collect()
}

/// `source kind` of each event, to compare a sequence at a glance.
pub fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["source"].as_str().unwrap_or("?"),
                e["kind"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

fn has_kind(sy: &Switchyard, kind: &str) -> bool {
    events(sy, "").iter().any(|e| e["kind"] == kind)
}

/// The event's fields other than id, time and message, for an exact comparison.
fn fields(event: &Value) -> Value {
    let mut event = event.clone();
    if let Some(map) = event.as_object_mut() {
        for volatile in ["id", "time", "message"] {
            map.remove(volatile);
        }
    }
    event
}

#[test]
fn changes_are_recorded_in_order_and_read_back_by_id() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let sy = Switchyard::start(&blue_green(blue.addr, green.addr, (90, 10), CHECK, ""));
    let (b, g) = (blue.addr.to_string(), green.addr.to_string());

    let r = sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(r#"{"blue": 50, "green": 50}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let path = format!("/api/v1/upstreams/green/backends/{g}");
    let r = sy.api("PATCH", &path, Some(r#"{"state": "draining"}"#));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = sy.api(
        "PUT",
        "/api/v1/routes/web/split",
        Some(r#"{"blue": 0, "green": 0}"#),
    );
    assert_eq!(r.status, 400, "refused: recorded nothing");

    // The file's split changes, so the API's split is dropped (the file wins).
    sy.write_config(&blue_green(blue.addr, green.addr, (80, 20), CHECK, ""));
    let r = sy.api("POST", "/api/v1/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    std::fs::write(&sy.config, "listeners: [").expect("break the config");
    let r = sy.api("POST", "/api/v1/reload", None);
    assert_eq!(r.status, 400, "{}", r.text());

    blue.set_sick(true);
    wait_until("blue unhealthy", Duration::from_secs(10), || {
        has_kind(&sy, "backend_unhealthy")
    });
    blue.set_sick(false);
    wait_until("blue healthy again", Duration::from_secs(10), || {
        has_kind(&sy, "backend_healthy")
    });

    let all = events(&sy, "");
    assert_eq!(
        kinds(&all),
        [
            "startup started",
            "api split_changed",
            "api backend_changed",
            "reload reloaded",
            "reload state_dropped",
            "reload reload_refused",
            "health backend_unhealthy",
            "health backend_healthy",
        ],
        "{all:#?}"
    );
    assert_eq!(ids(&all), (1..=8).collect::<Vec<u64>>());

    let started = &all[0];
    assert_eq!(started["after"]["runtime_state"], "none");
    assert_eq!(started["after"]["pid"], sy.child.id());
    assert_eq!(started["after"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        fields(&all[1]),
        json!({"source": "api", "kind": "split_changed", "route": "web",
               "before": {"blue": 90, "green": 10}, "after": {"blue": 50, "green": 50}})
    );
    assert_eq!(
        fields(&all[2]),
        json!({"source": "api", "kind": "backend_changed", "upstream": "green", "backend": g,
               "before": {"weight": 1, "state": "active"},
               "after": {"weight": 1, "state": "draining"}})
    );
    assert_eq!(
        all[3]["message"], "config reloaded: routes changed: web",
        "{:#}",
        all[3]
    );
    let dropped = all[4]["message"].as_str().unwrap_or_default();
    assert!(
        dropped.starts_with("state: split of route \"web\" dropped: the config file changed"),
        "{dropped}"
    );
    let refused = all[5]["message"].as_str().unwrap_or_default();
    assert!(refused.starts_with("config reload refused"), "{refused}");
    assert_eq!(
        fields(&all[6]),
        json!({"source": "health", "kind": "backend_unhealthy", "upstream": "blue", "backend": b,
               "before": {"healthy": true}, "after": {"healthy": false}})
    );
    assert_eq!(
        fields(&all[7]),
        json!({"source": "health", "kind": "backend_healthy", "upstream": "blue", "backend": b,
               "before": {"healthy": false}, "after": {"healthy": true}})
    );
    let times: Vec<&str> = all.iter().filter_map(|e| e["time"].as_str()).collect();
    assert_eq!(times.len(), 8);
    for time in &times {
        assert!(time.len() == 24 && time.ends_with('Z'), "{time}");
    }
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");

    assert_eq!(ids(&events(&sy, "?since=3")), [4, 5, 6, 7, 8]);
    // Without `since`: the newest, oldest first; from the start: `since=0`.
    assert_eq!(ids(&events(&sy, "?limit=2")), [7, 8]);
    assert_eq!(ids(&events(&sy, "?since=0&limit=2")), [1, 2]);
    assert_eq!(ids(&events(&sy, "?since=3&limit=2")), [4, 5]);
    assert!(events(&sy, "?since=8").is_empty());
    for (query, names) in [
        ("?limit=abc", "limit"),
        ("?limit=1001", "limit"),
        ("?since=-1", "since"),
        ("?after=1", "after"),
    ] {
        let r = sy.api("GET", &format!("/api/v1/events{query}"), None);
        assert_eq!(r.status, 400, "{query}");
        let error = json_body(&r)["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(error.starts_with(names), "{query}: {error}");
    }
    assert_eq!(sy.api("POST", "/api/v1/events", None).status, 405);

    let log = sy.log_text();
    for event in &all {
        let line = format!(
            "event {} [{} {}]",
            event["id"],
            event["source"].as_str().unwrap_or_default(),
            event["kind"].as_str().unwrap_or_default()
        );
        assert_eq!(log.matches(&line).count(), 1, "{line} in:\n{log}");
    }
}

#[test]
fn an_upgrade_is_recorded_by_both_processes() {
    let blue = TestBackend::start("blue");
    let green = TestBackend::start("green");
    let mut sy = Switchyard::start(&blue_green(blue.addr, green.addr, (90, 10), "", ""));
    sy.upgrade();
    let after = events(&sy, "");
    assert_eq!(
        kinds(&after),
        ["startup started", "upgrade took_over"],
        "the ring starts anew"
    );
    assert_eq!(after[0]["after"]["runtime_state"], "handed_over");
    assert_eq!(after[0]["after"]["pid"], sy.child.id());
    assert!(
        sy.log_text().contains("[upgrade handed_over]"),
        "the old process recorded it"
    );
}
