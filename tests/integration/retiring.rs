//! Retiring a backend of a `hash` upstream through the admin API: its users stay until the
//! timeout, new users never reach it, nobody else moves; then it drains and can go.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use crate::fixtures::*;

fn config(backends: &[&TestBackend], plain: &TestBackend) -> String {
    let list: String = backends
        .iter()
        .map(|b| format!("      - address: {}\n", b.addr))
        .collect();
    format!(
        "server:
  threads: 2
  grace_period: 5s
  upgrade_socket: {{upgrade_socket}}
listeners:
  - address: {{listen}}
admin:
  address: {{admin}}
metrics:
  address: {{metrics}}
state_file: {{dir}}/state.json
upstreams:
  users:
    algorithm: hash
    hash_on: {{header: X-User-Id}}
    backends:
{list}  plain:
    backends:
      - address: {}
routes:
  - name: plain
    path_prefix: /plain
    split:
      plain: 1
  - name: users
    split:
      users: 1
",
        plain.addr
    )
}

/// Which backend answers each user, eight users at a time.
fn who_answers(proxy: SocketAddr, users: &[String]) -> BTreeMap<String, String> {
    let users = users.to_vec();
    block_on(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for chunk in users.chunks(users.len().div_ceil(8)) {
            let chunk = chunk.to_vec();
            tasks.spawn(async move {
                let mut answers = Vec::new();
                for user in chunk {
                    let response =
                        request_from(None, proxy, "GET", "/", &[("X-User-Id", &user)]).await;
                    let response = response.unwrap_or_else(|e| panic!("user {user}: {e}"));
                    assert_eq!(response.status, 200, "user {user}: {}", response.text());
                    answers.push((user, response.text()));
                }
                answers
            });
        }
        let mut all = BTreeMap::new();
        while let Some(answers) = tasks.join_next().await {
            all.extend(answers.expect("a client task"));
        }
        all
    })
}

fn users(prefix: &str) -> Vec<String> {
    (0..200).map(|i| format!("{prefix}-{i}")).collect()
}

fn json(response: &Response) -> Value {
    serde_json::from_str(&response.text())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", response.text()))
}

/// The backend's view in `GET /api/v1/upstreams/users`.
fn backend_view(sy: &Switchyard, address: SocketAddr) -> Value {
    let upstream = json(&sy.api("GET", "/api/v1/upstreams/users", None));
    let backends = upstream["backends"].as_array().expect("backends").clone();
    backends
        .into_iter()
        .find(|b| b["address"] == address.to_string())
        .expect("the backend is listed")
}

#[test]
fn a_retiring_backend_keeps_its_users_until_its_timeout_then_drains() {
    let all = [
        TestBackend::start("a"),
        TestBackend::start("b"),
        TestBackend::start("c"),
    ];
    let plain = TestBackend::start("plain");
    let mut sy = Switchyard::start(&config(&all.iter().collect::<Vec<_>>(), &plain));
    let old_users = users("user");
    let before = who_answers(sy.addr, &old_users);
    let retiring = &all[1];
    let its_users = before.values().filter(|b| *b == "b").count();
    assert!(its_users > 20, "b has {its_users} of 200 users: {before:?}");
    let path = format!("/api/v1/upstreams/users/backends/{}", retiring.addr);

    // Retired for an hour first, so that the checks below run well within the window however
    // slow the machine; then retired again with a short timeout, which ends it.
    let reply = sy.api(
        "PATCH",
        &path,
        Some(r#"{"state": "retiring", "retire_timeout": "1h"}"#),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let view = json(&reply);
    assert_eq!(view["state"], "retiring");
    assert!(view["retiring_until"].is_string(), "{view}");
    let remaining = view["retire_remaining_ms"].as_u64().expect("remaining");
    assert!((3_590_000..=3_600_000).contains(&remaining), "{view}");
    let metrics = sy.scrape();
    let series = format!(
        "switchyard_backend_state{{backend=\"{}\",state=\"retiring\",upstream=\"users\"}}",
        retiring.addr
    );
    assert_eq!(sample(&metrics, &series), Some(1.0), "{metrics}");

    assert_eq!(who_answers(sy.addr, &old_users), before, "nobody moved");
    let new_users = who_answers(sy.addr, &users("new"));
    assert!(
        new_users.values().all(|b| b != "b"),
        "new users reached the retiring backend: {new_users:?}"
    );
    // Its users are not forgotten by coming back, and the new ones stay where they went.
    assert_eq!(who_answers(sy.addr, &old_users), before);
    assert_eq!(who_answers(sy.addr, &users("new")), new_users);

    // A binary upgrade keeps the deadline and the users.
    let until = view["retiring_until"].clone();
    sy.upgrade();
    assert_eq!(backend_view(&sy, retiring.addr)["retiring_until"], until);
    assert_eq!(
        who_answers(sy.addr, &old_users),
        before,
        "nobody moved at the upgrade"
    );
    assert_eq!(who_answers(sy.addr, &users("new")), new_users);

    let reply = sy.api(
        "DELETE",
        &format!("/api/v1/upstreams/users/backends/{}", retiring.addr),
        None,
    );
    assert_eq!(
        reply.status,
        409,
        "retiring is not removable: {}",
        reply.text()
    );

    let reply = sy.api(
        "PATCH",
        &path,
        Some(r#"{"state": "retiring", "retire_timeout": "2s"}"#),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        json(&reply)["retire_remaining_ms"]
            .as_u64()
            .expect("remaining")
            <= 2000
    );
    wait_until(
        "the retiring backend to drain",
        Duration::from_secs(10),
        || backend_view(&sy, retiring.addr)["state"] == "draining",
    );
    let view = backend_view(&sy, retiring.addr);
    assert!(view.get("retiring_until").is_none(), "{view}");

    // Drained: its users moved, nobody else did, and it gets nothing.
    let served = retiring.requests();
    let after = who_answers(sy.addr, &old_users);
    assert_eq!(
        retiring.requests(),
        served,
        "a draining backend got requests"
    );
    for (user, backend) in &before {
        if backend == "b" {
            assert_ne!(after[user], "b");
        } else {
            assert_eq!(&after[user], backend, "{user} moved");
        }
    }
    assert_eq!(who_answers(sy.addr, &users("new")), new_users);

    let events = json(&sy.api("GET", "/api/v1/events", None));
    let ended = events
        .as_array()
        .expect("events")
        .iter()
        .rev()
        .find(|e| e["source"] == "retire")
        .unwrap_or_else(|| panic!("no retire event: {events}"));
    assert_eq!(ended["kind"], "backend_changed");
    assert_eq!(ended["after"]["state"], "draining");

    // Saved: a restart keeps it draining.
    let state = std::fs::read_to_string(sy.dir.join("state.json")).expect("state file");
    assert!(state.contains("draining"), "{state}");

    let reply = sy.api(
        "DELETE",
        &format!("/api/v1/upstreams/users/backends/{}", retiring.addr),
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[test]
fn retiring_is_refused_where_it_has_no_meaning() {
    let all = [TestBackend::start("a"), TestBackend::start("b")];
    let plain = TestBackend::start("plain");
    let sy = Switchyard::start(&config(&all.iter().collect::<Vec<_>>(), &plain));
    let plain_path = format!("/api/v1/upstreams/plain/backends/{}", plain.addr);
    let users_path = format!("/api/v1/upstreams/users/backends/{}", all[0].addr);
    // Every backend of both upstreams as the API shows them (weight, state, health, in
    // flight, any retiring_until); nothing is sent through the proxy, so nothing may differ.
    let backends = || {
        ["users", "plain"].map(|upstream| {
            json(&sy.api("GET", &format!("/api/v1/upstreams/{upstream}"), None))["backends"].clone()
        })
    };
    let before = backends();
    for view in before.iter().flat_map(|b| b.as_array().expect("backends")) {
        assert_eq!(
            (&view["state"], &view["weight"]),
            (&Value::from("active"), &Value::from(1)),
            "{view}"
        );
        assert!(view.get("retiring_until").is_none(), "{view}");
    }
    let refused = |path: &str, body: &str, field: &str, says: &str| {
        let reply = sy.api("PATCH", path, Some(body));
        assert_eq!(reply.status, 400, "{body}: {}", reply.text());
        let error = json(&reply)["error"].as_str().expect("error").to_string();
        assert!(error.starts_with(&format!("{field}: ")), "{body}: {error}");
        assert!(error.contains(says), "{body}: {error}");
    };
    refused(
        &plain_path,
        r#"{"state": "retiring"}"#,
        "state",
        "round_robin, which has no key to keep: use \"draining\"",
    );
    refused(
        &users_path,
        r#"{"retire_timeout": "2s"}"#,
        "retire_timeout",
        "only with \"state\": \"retiring\"",
    );
    refused(
        &users_path,
        r#"{"state": "retiring", "retire_timeout": "soon"}"#,
        "retire_timeout",
        "invalid duration",
    );
    refused(
        &users_path,
        r#"{"state": "retiring", "retire_timeout": "0s"}"#,
        "retire_timeout",
        "longer than 0s",
    );
    refused(
        &users_path,
        r#"{"state": "retiring", "retire_timeout": "100000000h"}"#,
        "retire_timeout",
        "longer than the limit of 168h",
    );
    refused(&users_path, r#"{"state": "gone"}"#, "state", "\"retiring\"");
    refused(
        &plain_path,
        r#"{"state": "retiring", "retire_timeout": "0s"}"#,
        "state",
        "use \"draining\"",
    );
    refused(
        &users_path,
        r#"{"state": "retiring", "weight": 0}"#,
        "weight",
        "\"draining\"",
    );
    // Nothing changed: the rejected requests left every field of every backend as it was.
    assert_eq!(backends(), before);
    // A draining backend's users have moved on: it does not retire.
    let drain = sy.api("PATCH", &users_path, Some(r#"{"state": "draining"}"#));
    assert_eq!(drain.status, 200, "{}", drain.text());
    let draining = backends();
    assert_eq!(backend_view(&sy, all[0].addr)["state"], "draining");
    let reply = sy.api("PATCH", &users_path, Some(r#"{"state": "retiring"}"#));
    assert_eq!(reply.status, 409, "{}", reply.text());
    assert_eq!(backends(), draining);
}
