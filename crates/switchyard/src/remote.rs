//! The commands that steer a running instance through its admin API: `status` and
//! `rollout ...`. Each makes its calls, then prints tables ([`crate::tables`]) or, with
//! `--json`, the API's JSON as it came. An `Err` is one line for the operator, exit 1.

use serde_json::{json, Map, Value};

use crate::admin_client::{segment, AdminClient, ApiError};
use crate::cli::{ApiArgs, Rollout, Start};
use crate::tables;

/// `switchyard status`.
pub fn status(api: &ApiArgs) -> Result<(), String> {
    let client = AdminClient::from_config(&api.config)?;
    let routes = client.get("/api/v1/routes").map_err(|e| e.to_string())?;
    // A server from before rollouts has no such endpoint: then there is no section for them.
    let rollouts = match client.get("/api/v1/rollouts") {
        Ok(rollouts) => Some(rollouts),
        Err(ApiError::Refused { status: 404, .. }) => None,
        Err(e) => return Err(e.to_string()),
    };
    let upstreams = client.get("/api/v1/upstreams").map_err(|e| e.to_string())?;
    // As for rollouts: a server from before shared stores has no such endpoint.
    let store = match client.get("/api/v1/store") {
        Ok(store) => Some(store),
        Err(ApiError::Refused { status: 404, .. }) => None,
        Err(e) => return Err(e.to_string()),
    };
    if api.json {
        let mut all = Map::new();
        all.insert("routes".into(), routes);
        if let Some(rollouts) = rollouts {
            all.insert("rollouts".into(), rollouts);
        }
        all.insert("upstreams".into(), upstreams);
        if let Some(store) = store {
            all.insert("store".into(), store);
        }
        println!("{:#}", Value::Object(all));
    } else {
        print!(
            "{}",
            tables::status(&routes, rollouts.as_ref(), &upstreams, store.as_ref())
        );
    }
    Ok(())
}

/// `switchyard rollout start|status|pause|resume|promote|abort ROUTE`.
pub fn rollout(command: &Rollout) -> Result<(), String> {
    let (on, action) = match command {
        Rollout::Start(start) => {
            let client = AdminClient::from_config(&start.api.config)?;
            let path = format!("/api/v1/routes/{}/rollout", segment(&start.route));
            let status = client
                .post(&path, Some(&start_body(start)))
                .map_err(|e| e.to_string())?;
            show(&start.api, &status);
            return Ok(());
        }
        Rollout::Status(on) => (on, None),
        Rollout::Pause(on) => (on, Some("pause")),
        Rollout::Resume(on) => (on, Some("resume")),
        Rollout::Promote(on) => (on, Some("promote")),
        Rollout::Abort(on) => (on, Some("abort")),
    };
    let client = AdminClient::from_config(&on.api.config)?;
    let path = format!("/api/v1/routes/{}/rollout", segment(&on.route));
    let status = match action {
        None => client.get(&path),
        Some(action) => client.post(&format!("{path}/{action}"), None),
    }
    .map_err(|e| e.to_string())?;
    show(&on.api, &status);
    Ok(())
}

fn show(api: &ApiArgs, status: &Value) {
    if api.json {
        println!("{status:#}");
    } else {
        print!("{}", tables::rollout(status));
    }
}

/// The start body of the contract, with only the fields the operator gave: the server's
/// defaults apply to the rest, and stay the server's to change.
fn start_body(start: &Start) -> Value {
    let mut body = Map::new();
    body.insert("to".into(), json!(start.to));
    if let Some(from) = &start.from {
        body.insert("from".into(), json!(from));
    }
    if let Some(steps) = &start.steps {
        body.insert(
            "steps".into(),
            steps.iter().map(|&s| number(s)).collect::<Value>(),
        );
    }
    if let Some(every) = &start.every {
        body.insert("step_interval".into(), json!(every));
    }
    let mut analysis = Map::new();
    let given = [
        (
            "interval",
            start.analysis_interval.as_ref().map(|d| json!(d)),
        ),
        ("min_requests", start.min_requests.map(|n| json!(n))),
        ("max_error_rate", start.max_error_rate.map(number)),
        ("max_p99_latency", start.max_p99.as_ref().map(|d| json!(d))),
        ("max_latency_ratio", start.max_latency_ratio.map(number)),
    ];
    for (field, value) in given {
        if let Some(value) = value {
            analysis.insert(field.into(), value);
        }
    }
    if !analysis.is_empty() {
        body.insert("analysis".into(), Value::Object(analysis));
    }
    if !start.checks.is_empty() {
        body.insert(
            "checks".into(),
            start
                .checks
                .iter()
                .map(|url| json!({ "url": url }))
                .collect(),
        );
    }
    if let Some(on_failure) = start.on_failure {
        body.insert("on_failure".into(), json!(on_failure.as_str()));
    }
    Value::Object(body)
}

/// A whole number as a JSON integer (`5`, not `5.0`), anything else as it is.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn start(args: &str) -> Start {
        let argv = ["switchyard", "rollout", "start", "--config", "x.yaml"];
        match Cli::try_parse_from(argv.into_iter().chain(args.split_whitespace())) {
            Ok(Cli {
                command: Command::Rollout(Rollout::Start(start)),
            }) => *start,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_the_given_fields_are_sent() {
        assert_eq!(start_body(&start("web --to green")), json!({"to": "green"}));
    }

    #[test]
    fn every_option_lands_where_the_contract_has_it() {
        let body = start_body(&start(
            "web --to green --from blue --steps 0.5,5,25,100 --every 1m --max-error-rate 0.01 \
             --check http://127.0.0.1:9002/version --check http://127.0.0.1:9002/ready \
             --analysis-interval 10s --min-requests 20 --max-p99 500ms --max-latency-ratio 1.5 \
             --on-failure rollback",
        ));
        assert_eq!(
            body,
            json!({
                "to": "green",
                "from": "blue",
                "steps": [0.5, 5, 25, 100],
                "step_interval": "1m",
                "analysis": {
                    "interval": "10s",
                    "min_requests": 20,
                    "max_error_rate": 0.01,
                    "max_p99_latency": "500ms",
                    "max_latency_ratio": 1.5
                },
                "checks": [
                    {"url": "http://127.0.0.1:9002/version"},
                    {"url": "http://127.0.0.1:9002/ready"}
                ],
                "on_failure": "rollback"
            })
        );
        // Whole numbers go out as integers, as an operator would write them.
        assert_eq!(body["steps"].to_string(), "[0.5,5,25,100]");
    }
}
