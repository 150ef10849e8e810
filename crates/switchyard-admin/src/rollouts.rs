//! The rollout endpoints: a start body parsed into a `RolloutSpec`, commands turned into
//! `Change`s for the pool, and the status view the API, the CLI and metrics readers share.

use serde_json::{json, Value};
use switchyard_config::rollout::RolloutSpec;
use switchyard_pool::{Change, Rollout, RolloutCommand, Snapshot};

/// The contract's status of a rollout; `snapshot` gives the route's split in force.
pub fn status_view(rollout: &Rollout, snapshot: &Snapshot) -> Value {
    let split = snapshot.split_of(&rollout.route);
    // The spec written as its start body (defaults filled in): its `steps` are the contract's
    // `steps`, spelled the way they were asked for.
    let spec = serde_json::to_value(&rollout.spec).unwrap_or_default();
    let steps = spec.get("steps").cloned().unwrap_or_default();
    json!({
        "route": rollout.route,
        "from": rollout.from,
        "to": rollout.to,
        "state": rollout.state.as_str(),
        "step": rollout.step_number(),
        "weight": rollout.shown_weight(),
        "steps": steps,
        "reason": rollout.reason,
        "started_at": rollout.started_at,
        "updated_at": rollout.updated_at,
        "split": split,
        "failed_windows": rollout.failed_windows,
        "held_ms": rollout.held_ms,
        "windows": rollout.windows,
        "spec": spec,
    })
}

/// The change a start body asks for, or the problems with it (each naming its field).
pub fn start(route: &str, body: &[u8]) -> Result<Change, String> {
    let spec = RolloutSpec::from_json(body).map_err(|problems| {
        problems
            .0
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    Ok(Change::StartRollout {
        route: route.to_string(),
        spec: Box::new(spec),
    })
}

/// `pause`, `resume`, `promote` or `abort`.
pub fn command(name: &str) -> Option<RolloutCommand> {
    match name {
        "pause" => Some(RolloutCommand::Pause),
        "resume" => Some(RolloutCommand::Resume),
        "promote" => Some(RolloutCommand::Promote),
        "abort" => Some(RolloutCommand::Abort),
        _ => None,
    }
}
