//! The runtime state as a whole: `GET /api/v1/state` (what the state file holds: the changes
//! on top of the config file), `POST /api/v1/state/reset` (drop them all, the file rules),
//! and the body of `PATCH /api/v1/upstreams/{upstream}` (every backend of an upstream at
//! once). Each change goes to the pool as one `Change`, like every other.

use serde_json::{json, Value};
use switchyard_config::MAX_BACKEND_WEIGHT;
use switchyard_pool::{BackendState, Change, Pool, Rejection, Source};

/// `GET /api/v1/state`.
pub fn view(pool: &Pool) -> Result<Value, Rejection> {
    serde_json::to_value(pool.runtime_state())
        .map_err(|e| Rejection::Storage(format!("the runtime state cannot be shown: {e}")))
}

/// `POST /api/v1/state/reset`: the answer names what was dropped (as the event does).
pub fn reset(pool: &Pool) -> Result<Value, Rejection> {
    let dropped = pool.runtime_state().overrides();
    pool.apply(&Change::ResetState, Source::Api)?;
    Ok(json!({ "reset": true, "dropped": dropped }))
}

/// The change a `PATCH /api/v1/upstreams/{upstream}` body asks for, or the 400 message
/// naming the field.
pub fn whole_upstream(upstream: &str, body: &[u8]) -> Result<Change, String> {
    let fields = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => fields,
        Ok(other) => return Err(format!("body: expected a JSON object, got {other}")),
        Err(e) => return Err(format!("body: invalid JSON: {e}")),
    };
    let mut weight = None;
    let mut state = None;
    let mut force = false;
    for (field, value) in &fields {
        match field.as_str() {
            "state" => {
                state = Some(match value.as_str() {
                    Some("active") => BackendState::Active,
                    Some("draining") => BackendState::Draining,
                    Some("disabled") => BackendState::Disabled,
                    Some("retiring") => return Err(
                        "state: \"retiring\" is set backend by backend (PATCH .../backends/{address}); for the whole upstream use \"draining\"".into(),
                    ),
                    _ => return Err(format!(
                        "state: must be \"active\", \"draining\" or \"disabled\", got {value}"
                    )),
                })
            }
            "weight" => {
                weight = Some(crate::api::integer(value, MAX_BACKEND_WEIGHT).ok_or_else(|| {
                    format!("weight: must be an integer 0..={MAX_BACKEND_WEIGHT}, got {value}")
                })?)
            }
            "force" => {
                force = value
                    .as_bool()
                    .ok_or_else(|| format!("force: must be true or false, got {value}"))?
            }
            other => {
                return Err(format!(
                    "{other}: unknown field; expected \"state\" and/or \"weight\" (and \"force\")"
                ))
            }
        }
    }
    if state.is_none() && weight.is_none() {
        return Err("give \"state\" and/or \"weight\" to change".into());
    }
    Ok(Change::UpdateUpstream {
        upstream: upstream.to_string(),
        weight,
        state,
        force,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_upstream_body_is_read_field_by_field() {
        assert_eq!(
            whole_upstream("blue", br#"{"state": "draining"}"#),
            Ok(Change::UpdateUpstream {
                upstream: "blue".into(),
                weight: None,
                state: Some(BackendState::Draining),
                force: false
            })
        );
        assert_eq!(
            whole_upstream("blue", br#"{"weight": 0, "force": true}"#),
            Ok(Change::UpdateUpstream {
                upstream: "blue".into(),
                weight: Some(0),
                state: None,
                force: true
            })
        );
        for (body, want) in [
            (
                &br#"{"state": "gone"}"#[..],
                "state: must be \"active\", \"draining\" or \"disabled\", got \"gone\"",
            ),
            (
                br#"{"state": "retiring"}"#,
                "state: \"retiring\" is set backend by backend",
            ),
            (
                br#"{"weight": 1001}"#,
                "weight: must be an integer 0..=1000, got 1001",
            ),
            (
                br#"{"force": "yes", "state": "active"}"#,
                "force: must be true or false, got \"yes\"",
            ),
            (br#"{"colour": 1}"#, "colour: unknown field"),
            (
                br#"{"force": true}"#,
                "give \"state\" and/or \"weight\" to change",
            ),
            (br#"[1]"#, "body: expected a JSON object, got [1]"),
            (b"{", "body: invalid JSON"),
        ] {
            let e = whole_upstream("blue", body).expect_err(want);
            assert!(e.starts_with(want), "{e}");
        }
    }
}
