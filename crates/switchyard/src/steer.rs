//! The commands that change a running instance, one admin API call each, for what operators
//! did with curl: `split`, `backend ...`, `upstream ...`, `reload`, `events` and `state ...`.
//! Each prints what the API answered as a table (or, with `--json`, the JSON as it came); a
//! refusal is the API's error, exit 1.

use serde_json::{json, Map, Value};
use switchyard_pool::RuntimeState;

use crate::admin_client::{segment, AdminClient};
use crate::cli::{ApiArgs, Backend, EventsArgs, OnBackend, OnUpstream, SplitArgs, State, Upstream};
use crate::tables;

/// An API answer, printed as tables by `table` unless `--json`.
fn show(api: &ApiArgs, answer: &Value, table: impl FnOnce(&Value) -> String) {
    if api.json {
        println!("{answer:#}");
    } else {
        print!("{}", table(answer));
    }
}

fn client(api: &ApiArgs) -> Result<AdminClient, String> {
    AdminClient::from_config(&api.config)
}

/// `switchyard split ROUTE UPSTREAM=WEIGHT...`: `PUT /api/v1/routes/{route}/split`.
pub fn split(args: &SplitArgs) -> Result<(), String> {
    let body: Map<String, Value> = args
        .weights
        .iter()
        .map(|(upstream, weight)| (upstream.clone(), json!(weight)))
        .collect();
    let path = format!("/api/v1/routes/{}/split", segment(&args.route));
    let route = client(&args.api)?
        .put(&path, &Value::Object(body))
        .map_err(|e| e.to_string())?;
    show(&args.api, &route, |route| {
        tables::routes(std::slice::from_ref(route))
    });
    Ok(())
}

/// `switchyard backend drain|disable|enable|weight|add|remove`.
pub fn backend(command: &Backend) -> Result<(), String> {
    let (on, body) = match command {
        Backend::Drain(on) => (on, json!({ "state": "draining" })),
        Backend::Disable(on) => (on, json!({ "state": "disabled" })),
        Backend::Enable(on) => (on, json!({ "state": "active" })),
        Backend::Weight(w) => {
            let path = backend_path(&w.upstream, &w.address.to_string());
            let answer = client(&w.api)?
                .patch(&path, &json!({ "weight": w.weight }))
                .map_err(|e| e.to_string())?;
            show(&w.api, &answer, |b| tables::backend(&w.upstream, b));
            return Ok(());
        }
        Backend::Add(add) => {
            let mut body = json!({ "address": add.address.to_string() });
            if let Some(weight) = add.weight {
                body["weight"] = json!(weight);
            }
            let path = format!("/api/v1/upstreams/{}/backends", segment(&add.upstream));
            let answer = client(&add.api)?
                .post(&path, Some(&body))
                .map_err(|e| e.to_string())?;
            show(&add.api, &answer, |b| tables::backend(&add.upstream, b));
            return Ok(());
        }
        Backend::Remove(on) => return remove(on),
    };
    let path = backend_path(&on.upstream, &on.address.to_string());
    let answer = client(&on.api)?
        .patch(&path, &body)
        .map_err(|e| e.to_string())?;
    show(&on.api, &answer, |b| tables::backend(&on.upstream, b));
    Ok(())
}

fn remove(on: &OnBackend) -> Result<(), String> {
    let path = backend_path(&on.upstream, &on.address.to_string());
    let answer = client(&on.api)?.delete(&path).map_err(|e| e.to_string())?;
    show(&on.api, &answer, |_| {
        format!("upstream {} backend {} removed\n", on.upstream, on.address)
    });
    Ok(())
}

fn backend_path(upstream: &str, address: &str) -> String {
    format!(
        "/api/v1/upstreams/{}/backends/{}",
        segment(upstream),
        segment(address)
    )
}

/// `switchyard upstream drain|disable|enable UPSTREAM`: `PATCH /api/v1/upstreams/{upstream}`.
pub fn upstream(command: &Upstream) -> Result<(), String> {
    let (on, state): (&OnUpstream, &str) = match command {
        Upstream::Drain(on) => (on, "draining"),
        Upstream::Disable(on) => (on, "disabled"),
        Upstream::Enable(on) => (on, "active"),
    };
    let mut body = json!({ "state": state });
    if on.force {
        body["force"] = json!(true);
    }
    let path = format!("/api/v1/upstreams/{}", segment(&on.upstream));
    let answer = client(&on.api)?
        .patch(&path, &body)
        .map_err(|e| e.to_string())?;
    show(&on.api, &answer, |u| {
        tables::upstreams(std::slice::from_ref(u))
    });
    Ok(())
}

/// `switchyard reload`: `POST /api/v1/reload`.
pub fn reload(api: &ApiArgs) -> Result<(), String> {
    let answer = client(api)?
        .post("/api/v1/reload", None)
        .map_err(|e| e.to_string())?;
    show(api, &answer, tables::reload);
    Ok(())
}

/// `switchyard events [--since ID] [--limit N]`: `GET /api/v1/events`.
pub fn events(args: &EventsArgs) -> Result<(), String> {
    let mut query = Vec::new();
    if let Some(since) = args.since {
        query.push(format!("since={since}"));
    }
    if let Some(limit) = args.limit {
        query.push(format!("limit={limit}"));
    }
    let path = match query.is_empty() {
        true => "/api/v1/events".to_string(),
        false => format!("/api/v1/events?{}", query.join("&")),
    };
    let answer = client(&args.api)?.get(&path).map_err(|e| e.to_string())?;
    show(&args.api, &answer, tables::events);
    Ok(())
}

/// `switchyard state show|reset`.
pub fn state(command: &State) -> Result<(), String> {
    match command {
        State::Show { api } => {
            let answer = client(api)?
                .get("/api/v1/state")
                .map_err(|e| e.to_string())?;
            show(api, &answer, |state| {
                match serde_json::from_value::<RuntimeState>(state.clone()) {
                    Ok(state) => tables::overrides(
                        "runtime changes on top of the config file",
                        &state.overrides(),
                    ),
                    // A server of another version: its JSON is still worth showing.
                    Err(_) => format!("{state:#}\n"),
                }
            });
        }
        State::Reset { api } => {
            let answer = client(api)?
                .post("/api/v1/state/reset", None)
                .map_err(|e| e.to_string())?;
            show(api, &answer, |answer| {
                let dropped: Vec<String> = answer["dropped"]
                    .as_array()
                    .map(|d| {
                        d.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                tables::overrides(
                    "runtime state reset, the config file rules; dropped",
                    &dropped,
                )
            });
        }
    }
    Ok(())
}
