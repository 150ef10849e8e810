//! A rollout as runtime state: where it stands (state, step, `to`'s weight, the last windows)
//! and the weight arithmetic that turns that into the route's split. The record lives in
//! [`RuntimeState`](crate::RuntimeState), so it is saved, survives restart and upgrade, and
//! every move of it goes through `Pool::apply` like any other change. The timing and the
//! judgement (when a step advances, what a window says) belong to the rollout engine; this
//! module only knows what each state means for the split and for the match steps in force.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use switchyard_config::rollout::{RolloutSpec, Step};
use switchyard_config::{Config, RouteMatch};

use serde_json::json;

use crate::events::{Draft, Source};
use crate::state::{check_split, file_split, Rejection, RuntimeState, SplitOverride};

/// The contract's rescaled total of a split during a rollout.
pub const SPLIT_TOTAL: u32 = 10_000;
/// Windows kept in the record (the contract asks for at least the last 20).
pub const KEPT_WINDOWS: usize = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Progressing,
    Paused,
    Succeeded,
    Failed,
    RolledBack,
    Aborted,
}

impl RolloutState {
    pub const ALL: [RolloutState; 6] = [
        RolloutState::Progressing,
        RolloutState::Paused,
        RolloutState::Succeeded,
        RolloutState::Failed,
        RolloutState::RolledBack,
        RolloutState::Aborted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Progressing => "progressing",
            RolloutState::Paused => "paused",
            RolloutState::Succeeded => "succeeded",
            RolloutState::Failed => "failed",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Aborted => "aborted",
        }
    }

    /// Progressing or paused: the rollout owns the route's split.
    pub fn is_active(self) -> bool {
        matches!(self, RolloutState::Progressing | RolloutState::Paused)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Passed,
    Failed,
    Inconclusive,
}

impl Verdict {
    pub const ALL: [Verdict; 3] = [Verdict::Passed, Verdict::Failed, Verdict::Inconclusive];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Passed => "passed",
            Verdict::Failed => "failed",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

/// One judged analysis window, with the numbers it was judged on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowRecord {
    /// When the window closed.
    pub at: String,
    /// The step the rollout was at (1-based; 0 before the first).
    pub step: usize,
    /// `to`'s requests and errors in the window.
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub p99_ms: Option<f64>,
    /// `from`'s p99 in the same window.
    pub baseline_p99_ms: Option<f64>,
    pub baseline_requests: u64,
    pub verdict: Verdict,
    /// Which limit, with the numbers, for a failed or inconclusive window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A rollout on one route: its spec and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub route: String,
    pub from: String,
    pub to: String,
    pub spec: RolloutSpec,
    pub state: RolloutState,
    /// Index in `spec.steps` of the step in force; `None` before the first is applied.
    pub step: Option<usize>,
    /// `to`'s share of `total`, in percent.
    pub weight: f64,
    /// `R`: `from`'s plus `to`'s weight in the rescaled split.
    pub total: u32,
    /// The route's split at start, rescaled to [`SPLIT_TOTAL`]: what the other upstreams keep.
    pub base: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub started_at: String,
    pub updated_at: String,
    #[serde(default)]
    pub windows: Vec<WindowRecord>,
    /// Failed windows over the whole rollout (resume does not reset it).
    #[serde(default)]
    pub failed_windows: u32,
    /// Hold time spent in the current step while progressing, in milliseconds: what a restart
    /// or upgrade carries over (the time the process was down does not count).
    #[serde(default)]
    pub held_ms: u64,
    /// Time spent progressing since the last step change or passing window, against
    /// `progress_deadline`.
    #[serde(default)]
    pub stalled_ms: u64,
    /// An operator resumed the manual hold of the current step.
    #[serde(default)]
    pub released: bool,
    /// Paused by `on_failure: pause` (failed windows over `failure_limit`, a failed check,
    /// `progress_deadline`), not by an operator or a manual step: the pause that needs
    /// someone to decide, which `switchyard_rollout_paused_by_failure` shows. Written only
    /// while true (format 5), so other states still read in older binaries.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused_by_failure: bool,
    /// Bumped by every change, so that a change built on an older record is refused.
    #[serde(default)]
    pub revision: u64,
    /// Counts the route's rollouts: with `started_at`, which rollout of the route this is
    /// (two may start within one millisecond).
    #[serde(default)]
    pub serial: u64,
}

impl Rollout {
    /// `to`'s integer weight at `percent` of `total`.
    pub fn to_weight(&self, percent: f64) -> u32 {
        let w = (f64::from(self.total) * percent / 100.0).round();
        (w as u32).min(self.total)
    }

    /// The route's split this record stands for.
    pub fn split(&self) -> BTreeMap<String, u32> {
        let to = match self.state {
            RolloutState::RolledBack | RolloutState::Aborted => 0,
            RolloutState::Succeeded => self.total,
            RolloutState::Progressing | RolloutState::Paused | RolloutState::Failed => {
                self.to_weight(self.weight)
            }
        };
        let mut split = self.base.clone();
        split.insert(self.to.clone(), to);
        split.insert(self.from.clone(), self.total - to);
        split
    }

    /// Whether `other` is a record of this very rollout (not a later one on the route).
    pub fn same_rollout(&self, other: &Rollout) -> bool {
        self.started_at == other.started_at && self.serial == other.serial
    }

    /// Paused now because of a failure (see [`Rollout::paused_by_failure`]).
    pub fn held_by_failure(&self) -> bool {
        self.state == RolloutState::Paused && self.paused_by_failure
    }

    /// `to`'s share in percent as the API and metrics show it: the record's while the rollout
    /// owns the split, and final once it ended.
    pub fn shown_weight(&self) -> f64 {
        match self.state {
            RolloutState::Succeeded => 100.0,
            RolloutState::RolledBack | RolloutState::Aborted => 0.0,
            _ => self.weight,
        }
    }

    /// Takes `split` (the file's, when the file ended the rollout) as the record's weights:
    /// its `to` share and, rescaled, the split the record stands for.
    pub(crate) fn settle_on(&mut self, split: &BTreeMap<String, u32>) {
        self.base = rescale(split);
        let weight = |u: &String| self.base.get(u).copied().unwrap_or(0);
        self.total = weight(&self.from) + weight(&self.to);
        self.weight = if self.total > 0 {
            f64::from(weight(&self.to)) * 100.0 / f64::from(self.total)
        } else {
            0.0
        };
    }

    /// The match steps in force: every one taken so far, while the rollout runs. Once it
    /// ended there are none: a rollback or abort sends the matched users back with everyone
    /// else, and after success `to` has the whole share anyway.
    pub fn matches_in_force(&self) -> impl Iterator<Item = &RouteMatch> {
        let taken = match (self.state.is_active(), self.step) {
            (true, Some(i)) => i + 1,
            _ => 0,
        };
        self.spec
            .steps
            .iter()
            .take(taken)
            .filter_map(Step::matching)
    }

    /// The 1-based number of the step in force (0 before the first).
    pub fn step_number(&self) -> usize {
        self.step.map_or(0, |i| i + 1)
    }

    /// A short name for log lines and conflicts: "web (blue → green, step 2/5)".
    pub fn describe(&self) -> String {
        format!(
            "{} ({} → {}, step {}/{}, {})",
            self.route,
            self.from,
            self.to,
            self.step_number(),
            self.spec.steps.len(),
            self.state.as_str()
        )
    }

    /// Ends the rollout in `state`, saying why.
    pub fn end(&mut self, state: RolloutState, reason: impl Into<String>) {
        self.state = state;
        self.paused_by_failure = false;
        self.reason = Some(reason.into());
        self.updated_at = crate::events::now();
    }

    /// Keeps the last [`KEPT_WINDOWS`] windows.
    pub fn push_window(&mut self, window: WindowRecord) {
        self.windows.push(window);
        let extra = self.windows.len().saturating_sub(KEPT_WINDOWS);
        self.windows.drain(..extra);
    }
}

/// What an operator asks of a running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutCommand {
    Pause,
    Resume,
    Promote,
    Abort,
}

impl RolloutCommand {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutCommand::Pause => "pause",
            RolloutCommand::Resume => "resume",
            RolloutCommand::Promote => "promote",
            RolloutCommand::Abort => "abort",
        }
    }
}

/// The transitions of a rollout's record, each checked against the state it starts from. The
/// route's split follows the record: whenever a rollout changes, its split is written as the
/// route's override, so snapshot, state file and metrics see the integers the contract names.
impl RuntimeState {
    pub(crate) fn start_rollout(
        &mut self,
        config: &Config,
        route: &str,
        spec: &RolloutSpec,
    ) -> Result<(), Rejection> {
        if !config.routes.iter().any(|r| r.name == route) {
            return Err(Rejection::NotFound(format!("no route named {route:?}")));
        }
        if let Some(running) = self.rollouts.get(route).filter(|r| r.state.is_active()) {
            return Err(Rejection::Conflict(format!(
                "route {route:?} already has a rollout running: {}; abort or promote it first",
                running.describe()
            )));
        }
        let split: BTreeMap<String, u32> = self
            .split(config, route)
            .unwrap_or_default()
            .into_iter()
            .map(|(u, w)| (u.to_string(), w))
            .collect();
        let in_split = |field: &str, name: &str| {
            if config.upstream(name).is_none() {
                return Err(Rejection::Invalid(format!(
                    "{field}: no upstream named {name:?}"
                )));
            }
            if !split.contains_key(name) {
                let names: Vec<&str> = split.keys().map(String::as_str).collect();
                return Err(Rejection::Invalid(format!(
                    "{field}: upstream {name:?} is not in route {route:?}'s split ({}); add it to the split with weight 0 first",
                    names.join(", ")
                )));
            }
            Ok(())
        };
        in_split("to", &spec.to)?;
        let from = match &spec.from {
            Some(from) => from.clone(),
            // The other upstream with the largest weight; ties: the first by name.
            None => split
                .iter()
                .filter(|(u, _)| **u != spec.to)
                .fold(None::<(&String, u32)>, |best, (u, w)| match best {
                    Some((_, bw)) if bw >= *w => best,
                    _ => Some((u, *w)),
                })
                .map(|(u, _)| u.clone())
                .ok_or_else(|| {
                    Rejection::Invalid(format!(
                        "from: route {route:?} splits only to {:?}; name the upstream to move weight from",
                        spec.to
                    ))
                })?,
        };
        in_split("from", &from)?;
        if from == spec.to {
            return Err(Rejection::Invalid(format!(
                "from: {from:?} is also \"to\"; a rollout moves weight between two upstreams"
            )));
        }
        let base = rescale(&split);
        let total = base[&from] + base[&spec.to];
        if total == 0 {
            return Err(Rejection::Invalid(format!(
                "from: {from:?} and {:?} both have weight 0 in route {route:?}'s split: there is no share to move",
                spec.to
            )));
        }
        let weight = f64::from(base[&spec.to]) * 100.0 / f64::from(total);
        if spec
            .steps
            .iter()
            .filter_map(Step::weight)
            .all(|w| w <= weight)
        {
            return Err(Rejection::Invalid(format!(
                "to: {:?} already has the whole share of {from:?} and itself; there is nothing to roll out",
                spec.to
            )));
        }
        let now = crate::events::now();
        let last = self.rollouts.get(route);
        let revision = last.map_or(0, |r| r.revision + 1);
        let serial = last.map_or(1, |r| r.serial + 1);
        let rollout = Rollout {
            route: route.to_string(),
            from,
            to: spec.to.clone(),
            spec: spec.clone(),
            state: RolloutState::Progressing,
            step: None,
            weight,
            total,
            base,
            reason: None,
            started_at: now.clone(),
            updated_at: now,
            windows: Vec::new(),
            failed_windows: 0,
            held_ms: 0,
            stalled_ms: 0,
            released: false,
            paused_by_failure: false,
            revision,
            serial,
        };
        self.set_rollout(config, rollout)
    }

    pub(crate) fn command_rollout(
        &mut self,
        config: &Config,
        route: &str,
        command: RolloutCommand,
    ) -> Result<(), Rejection> {
        let mut rollout = self.running(config, route, command.as_str())?.clone();
        match command {
            RolloutCommand::Pause => {
                if rollout.state == RolloutState::Paused {
                    return Ok(());
                }
                rollout.state = RolloutState::Paused;
                rollout.reason = Some("paused by an operator".into());
                rollout.paused_by_failure = false;
            }
            RolloutCommand::Resume => {
                if rollout.state == RolloutState::Progressing {
                    return Ok(());
                }
                rollout.state = RolloutState::Progressing;
                rollout.reason = None;
                rollout.released = true;
                // A fresh progress deadline: one that ran out paused it, and resuming says
                // the operator wants it to try again (failed windows still count).
                rollout.stalled_ms = 0;
            }
            RolloutCommand::Promote => {
                rollout.state = RolloutState::Succeeded;
                rollout.weight = 100.0;
                rollout.reason = Some(format!(
                    "promoted by an operator at step {}/{}: {:?} has the whole share",
                    rollout.step_number(),
                    rollout.spec.steps.len(),
                    rollout.to
                ));
            }
            RolloutCommand::Abort => {
                rollout.state = RolloutState::Aborted;
                rollout.weight = 0.0;
                rollout.reason = Some(format!(
                    "aborted by an operator at step {}/{}: {:?} has the whole share back",
                    rollout.step_number(),
                    rollout.spec.steps.len(),
                    rollout.from
                ));
            }
        }
        if rollout.state != RolloutState::Paused {
            // Resumed or ended: no failure holds it any more.
            rollout.paused_by_failure = false;
        }
        rollout.updated_at = crate::events::now();
        rollout.revision += 1;
        self.set_rollout(config, rollout)
    }

    pub(crate) fn update_rollout(
        &mut self,
        config: &Config,
        route: &str,
        next: &Rollout,
    ) -> Result<(), Rejection> {
        let current = self.running(config, route, "update")?;
        // The start time tells a route's rollouts apart even when revisions restart.
        if current.revision != next.revision || !current.same_rollout(next) {
            return Err(Rejection::Conflict(format!(
                "the rollout on route {route:?} changed meanwhile (revision {} now, {} given)",
                current.revision, next.revision
            )));
        }
        let mut next = next.clone();
        next.revision += 1;
        self.set_rollout(config, next)
    }

    /// The route's running rollout, for `what` to act on.
    fn running(&self, config: &Config, route: &str, what: &str) -> Result<&Rollout, Rejection> {
        if !config.routes.iter().any(|r| r.name == route) {
            return Err(Rejection::NotFound(format!("no route named {route:?}")));
        }
        match self.rollouts.get(route) {
            None => Err(Rejection::NotFound(format!(
                "route {route:?} has no rollout to {what}"
            ))),
            Some(r) if !r.state.is_active() => Err(Rejection::Conflict(format!(
                "the rollout on route {route:?} has ended ({}); there is nothing to {what}",
                r.state.as_str()
            ))),
            Some(r) => Ok(r),
        }
    }

    /// What a snapshot's routes hold of the rollouts besides their splits: each route's
    /// rollout pair (the sticky layout's order) and its match steps in force, so a change of
    /// it needs a new snapshot.
    pub(crate) fn rollouts_in_snapshot(&self) -> Vec<(&str, &str, &str, Vec<&RouteMatch>)> {
        self.rollouts
            .values()
            .map(|r| {
                (
                    r.route.as_str(),
                    r.from.as_str(),
                    r.to.as_str(),
                    r.matches_in_force().collect(),
                )
            })
            .collect()
    }

    /// Stores the record and writes the split it stands for as the route's override.
    fn set_rollout(&mut self, config: &Config, rollout: Rollout) -> Result<(), Rejection> {
        let split = rollout.split();
        check_split(config, &split)?;
        self.splits.insert(
            rollout.route.clone(),
            SplitOverride {
                split,
                file: file_split(config, &rollout.route),
            },
        );
        self.rollouts.insert(rollout.route.clone(), rollout);
        Ok(())
    }
}

/// The events a change of rollout records made, route by route: a start, a step, a change of
/// state (with its reason), a failed window.
pub(crate) fn rollout_events(
    before: &RuntimeState,
    after: &RuntimeState,
    source: Source,
) -> Vec<Draft> {
    let mut events = Vec::new();
    for (route, now) in &after.rollouts {
        let was = before.rollouts.get(route).filter(|w| w.same_rollout(now));
        let view = |r: &Rollout| json!({"state": r.state.as_str(), "step": r.step_number(), "weight": r.shown_weight(), "split": r.split()});
        let draft = |kind: &str, message: String| {
            Draft::new(source, kind, message)
                .route(route)
                .upstream(&now.to)
        };
        let Some(was) = was else {
            let steps: Vec<String> = now
                .spec
                .steps
                .iter()
                .map(|s| s.target.to_string())
                .collect();
            events.push(
                draft(
                    "rollout_started",
                    format!(
                        "rollout {} → {} started on route {route}, steps [{}]",
                        now.from,
                        now.to,
                        steps.join(", ")
                    ),
                )
                .after(view(now)),
            );
            continue;
        };
        if now.failed_windows > was.failed_windows {
            let why = now
                .windows
                .last()
                .and_then(|w| w.reason.clone())
                .unwrap_or_default();
            events.push(
                draft(
                    "rollout_window_failed",
                    format!(
                        "rollout on route {route}: window failed at step {}/{}: {why}",
                        now.step_number(),
                        now.spec.steps.len()
                    ),
                )
                .warning(),
            );
        }
        if now.step != was.step {
            events.push(
                draft(
                    "rollout_step",
                    format!(
                        "rollout on route {route}: step {}/{}, {} at {}%{}",
                        now.step_number(),
                        now.spec.steps.len(),
                        now.to,
                        now.weight,
                        now.step
                            .and_then(|i| now.spec.steps.get(i))
                            .and_then(Step::matching)
                            .map(|m| format!(
                                ", and requests that match {} go to it",
                                serde_json::to_string(m).unwrap_or_default()
                            ))
                            .unwrap_or_default()
                    ),
                )
                .before(view(was))
                .after(view(now)),
            );
        }
        if now.state != was.state {
            let kind = match (was.state, now.state) {
                (RolloutState::Paused, RolloutState::Progressing) => "rollout_resumed".to_string(),
                (_, state) => format!("rollout_{}", state.as_str()),
            };
            let reason = now.reason.as_deref().unwrap_or("resumed");
            let mut event = draft(
                &kind,
                format!(
                    "rollout {} is {}: {reason}",
                    was.describe(),
                    now.state.as_str()
                ),
            )
            .before(view(was))
            .after(view(now));
            if matches!(now.state, RolloutState::RolledBack | RolloutState::Failed) {
                event = event.warning();
            }
            events.push(event);
        }
    }
    events
}

/// `split` rescaled to integers summing to [`SPLIT_TOTAL`], in the same ratios: each weight
/// rounded down, and the units left over go to the largest remainders (ties: by name), so the
/// total is exact.
pub fn rescale(split: &BTreeMap<String, u32>) -> BTreeMap<String, u32> {
    let sum: u64 = split.values().map(|w| u64::from(*w)).sum();
    if sum == 0 {
        return split.clone();
    }
    let total = u64::from(SPLIT_TOTAL);
    let mut out: BTreeMap<String, u32> = BTreeMap::new();
    let mut remainders: Vec<(u64, &String)> = Vec::new();
    for (name, w) in split {
        let scaled = u64::from(*w) * total;
        out.insert(name.clone(), (scaled / sum) as u32);
        remainders.push((scaled % sum, name));
    }
    let given: u64 = out.values().map(|w| u64::from(*w)).sum();
    // Stable sort: equal remainders keep name order.
    remainders.sort_by_key(|r| std::cmp::Reverse(r.0));
    for (_, name) in remainders.iter().take((total - given) as usize) {
        if let Some(w) = out.get_mut(*name) {
            *w += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Change;

    fn config(split: &str) -> Config {
        let yaml = format!(
            "listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  blue:\n    backends:\n      - address: 127.0.0.1:9001\n  green:\n    backends:\n      - address: 127.0.0.1:9002\n  red:\n    backends:\n      - address: 127.0.0.1:9003\nroutes:\n  - name: web\n    split: {split}\n"
        );
        Config::from_yaml(&yaml).expect("valid test config")
    }

    fn start(body: &str) -> Change {
        Change::StartRollout {
            route: "web".into(),
            spec: Box::new(RolloutSpec::from_json(body.as_bytes()).expect("valid spec")),
        }
    }

    fn apply(
        state: &RuntimeState,
        config: &Config,
        change: &Change,
    ) -> Result<RuntimeState, Rejection> {
        state.with_change(config, change, |_: &str, _| 0)
    }

    fn command(command: RolloutCommand) -> Change {
        Change::RolloutCommand {
            route: "web".into(),
            command,
        }
    }

    fn route_split(state: &RuntimeState, config: &Config) -> Vec<(String, u32)> {
        state
            .split(config, "web")
            .unwrap_or_default()
            .into_iter()
            .map(|(u, w)| (u.to_string(), w))
            .collect()
    }

    fn pairs(p: &[(&str, u32)]) -> Vec<(String, u32)> {
        p.iter().map(|(u, w)| (u.to_string(), *w)).collect()
    }

    #[test]
    fn a_start_rescales_the_split_and_steps_move_only_from_and_to() {
        let config = config("{blue: 60, green: 0, red: 40}");
        let state = apply(
            &RuntimeState::default(),
            &config,
            &start(r#"{"to": "green"}"#),
        )
        .unwrap();
        let rollout = &state.rollouts["web"];
        // `from` defaults to the other upstream with the largest weight.
        assert_eq!(
            (rollout.from.as_str(), rollout.total, rollout.weight),
            ("blue", 6000, 0.0)
        );
        assert_eq!(
            route_split(&state, &config),
            pairs(&[("blue", 6000), ("green", 0), ("red", 4000)])
        );
        let mut next = rollout.clone();
        next.step = Some(1);
        next.weight = 25.0;
        let update = Change::RolloutUpdate {
            route: "web".into(),
            next: Box::new(next.clone()),
        };
        let state = apply(&state, &config, &update).unwrap();
        assert_eq!(
            route_split(&state, &config),
            pairs(&[("blue", 4500), ("green", 1500), ("red", 4000)])
        );
        // The same record again is built on an older revision now.
        assert!(matches!(
            apply(&state, &config, &update),
            Err(Rejection::Conflict(_))
        ));
        let promoted = apply(&state, &config, &command(RolloutCommand::Promote)).unwrap();
        assert_eq!(promoted.rollouts["web"].state, RolloutState::Succeeded);
        assert_eq!(
            route_split(&promoted, &config),
            pairs(&[("blue", 0), ("green", 6000), ("red", 4000)])
        );
        let aborted = apply(&state, &config, &command(RolloutCommand::Abort)).unwrap();
        assert_eq!(aborted.rollouts["web"].state, RolloutState::Aborted);
        assert_eq!(
            route_split(&aborted, &config),
            pairs(&[("blue", 6000), ("green", 0), ("red", 4000)])
        );
        // Ended: commands are conflicts, a split PUT is allowed again, and a new start too.
        assert!(
            matches!(apply(&aborted, &config, &command(RolloutCommand::Resume)), Err(Rejection::Conflict(m)) if m.contains("has ended (aborted)"))
        );
        let split = Change::SetSplit {
            route: "web".into(),
            split: [("blue".to_string(), 1)].into(),
        };
        assert!(apply(&aborted, &config, &split).is_ok());
        assert!(apply(&aborted, &config, &start(r#"{"to": "green"}"#)).is_ok());
    }

    #[test]
    fn a_running_rollout_owns_the_split() {
        let config = config("{blue: 90, green: 10}");
        let state = apply(
            &RuntimeState::default(),
            &config,
            &start(r#"{"to": "green", "steps": [5, 10, 50]}"#),
        )
        .unwrap();
        let rollout = &state.rollouts["web"];
        assert_eq!(rollout.weight, 10.0);
        let split = Change::SetSplit {
            route: "web".into(),
            split: [("blue".to_string(), 1)].into(),
        };
        match apply(&state, &config, &split) {
            Err(Rejection::Conflict(m)) => assert!(
                m.contains("rollout running: web (blue → green, step 0/4, progressing)"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(apply(&state, &config, &start(r#"{"to": "green"}"#)), Err(Rejection::Conflict(m)) if m.contains("already has a rollout running"))
        );
        let paused = apply(&state, &config, &command(RolloutCommand::Pause)).unwrap();
        assert_eq!(paused.rollouts["web"].state, RolloutState::Paused);
        assert!(matches!(
            apply(&paused, &config, &split),
            Err(Rejection::Conflict(_))
        ));
        let resumed = apply(&paused, &config, &command(RolloutCommand::Resume)).unwrap();
        assert_eq!(resumed.rollouts["web"].state, RolloutState::Progressing);
    }

    #[test]
    fn a_start_that_cannot_work_says_why() {
        let config = config("{blue: 1, green: 0}");
        let refused = |body: &str| match apply(&RuntimeState::default(), &config, &start(body)) {
            Err(Rejection::Invalid(m)) => m,
            other => panic!("{body}: {other:?}"),
        };
        assert!(refused(r#"{"to": "red"}"#)
            .starts_with("to: upstream \"red\" is not in route \"web\"'s split (blue, green)"));
        assert!(refused(r#"{"to": "nope"}"#).starts_with("to: no upstream named \"nope\""));
        assert!(refused(r#"{"to": "green", "from": "red"}"#)
            .starts_with("from: upstream \"red\" is not in"));
        assert!(refused(r#"{"to": "blue"}"#).contains("already has the whole share"));
        let zero = self::config("{blue: 0, green: 0, red: 1}");
        let m = match apply(
            &RuntimeState::default(),
            &zero,
            &start(r#"{"to": "green", "from": "blue"}"#),
        ) {
            Err(Rejection::Invalid(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(m.contains("both have weight 0"), "{m}");
        let missing = Change::StartRollout {
            route: "api".into(),
            spec: Box::new(RolloutSpec::from_json(br#"{"to": "green"}"#).unwrap()),
        };
        assert!(matches!(
            apply(&RuntimeState::default(), &config, &missing),
            Err(Rejection::NotFound(_))
        ));
    }

    #[test]
    fn a_reload_ends_a_rollout_only_when_it_takes_what_the_rollout_needs() {
        let config = config("{blue: 1, green: 0}");
        let state = apply(
            &RuntimeState::default(),
            &config,
            &start(r#"{"to": "green"}"#),
        )
        .unwrap();
        let (kept, warnings) = state.fit(&config);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(kept.rollouts["web"].state, RolloutState::Progressing);
        let edited = self::config("{blue: 1, green: 1}");
        let (ended, warnings) = state.fit(&edited);
        let rollout = &ended.rollouts["web"];
        assert_eq!(rollout.state, RolloutState::Failed);
        assert!(rollout
            .reason
            .as_deref()
            .unwrap()
            .contains("the config file changed the route's split"));
        // Ending the rollout is its own event, not dropped state: only the split override's
        // warning is left, and the rollout's event names it as it was.
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let events = rollout_events(&state, &ended, Source::Reload);
        assert_eq!(events.len(), 1);
        assert!(
            events[0]
                .message()
                .starts_with("rollout web (blue → green, step 0/4, progressing) is failed: ended by the config file"),
            "{}",
            events[0].message()
        );
        // A removed route ends it failed too, and the record stays listed.
        let yaml = "listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  blue:\n    backends:\n      - address: 127.0.0.1:9001\n  green:\n    backends:\n      - address: 127.0.0.1:9002\nroutes:\n  - name: api\n    split: {blue: 1}\n";
        let without = Config::from_yaml(yaml).expect("valid");
        let (gone, _) = state.fit(&without);
        assert_eq!(gone.rollouts["web"].state, RolloutState::Failed);
        assert!(gone.rollouts["web"]
            .reason
            .as_deref()
            .unwrap()
            .contains("the route is no longer in the config"));
        // Once ended, a later reload lets the record of the removed route go.
        let (later, warnings) = gone.fit(&without);
        assert!(later.rollouts.is_empty());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        // The file's split applies.
        assert_eq!(
            route_split(&ended, &edited),
            pairs(&[("blue", 1), ("green", 1)])
        );
    }

    /// Where the pool's snapshot sends a GET with `headers` on route `web`, and how.
    fn routed(pool: &crate::Pool, headers: &[(&str, &str)]) -> (String, crate::Routing) {
        let mut map = http::HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                value.parse().expect("value"),
            );
        }
        let request = crate::Request {
            host: None,
            path: "/",
            query: None,
            method: &http::Method::GET,
            headers: &map,
            client: None,
            issued: None,
        };
        let snapshot = pool.snapshot();
        let pick = snapshot.pick(0, &request).expect("a pick");
        (
            snapshot.upstreams[pick.upstream].name.to_string(),
            pick.routing,
        )
    }

    #[test]
    fn match_steps_send_matching_requests_to_to_while_the_rollout_runs() {
        use crate::Routing::{RolloutMatch, Split};
        let pool = crate::Pool::new(
            config("{blue: 1, green: 0}"),
            crate::UpstreamCas::default(),
            std::sync::Arc::new(crate::Metrics::new()),
            None,
        )
        .expect("pool");
        pool.apply(
            &start(
                r#"{"to": "green", "steps": [{"match": {"headers": {"X-User-Group": "beta"}}}, {"match": {"cookies": {"plan": "pro"}}}, 50]}"#,
            ),
            Source::Api,
        )
        .unwrap();
        let beta = [("x-user-group", "beta")];
        let pro = [("cookie", "plan=pro")];
        let take = |step: usize, weight: f64| {
            let mut next = pool.rollout("web").expect("a rollout");
            next.step = Some(step);
            next.weight = weight;
            pool.apply_rollout_update(&Change::RolloutUpdate {
                route: "web".into(),
                next: Box::new(next),
            })
            .unwrap();
        };
        // Before the match step is taken, nobody is matched.
        assert_eq!(routed(&pool, &beta), ("blue".into(), Split));
        // Taking it leaves the split as it was, and still the snapshot follows.
        take(0, 0.0);
        assert_eq!(routed(&pool, &beta), ("green".into(), RolloutMatch));
        assert_eq!(routed(&pool, &pro), ("blue".into(), Split));
        assert_eq!(routed(&pool, &[]), ("blue".into(), Split));
        // A later match step adds its users; the earlier ones stay matched at every weight.
        take(1, 0.0);
        take(2, 50.0);
        for _ in 0..10 {
            assert_eq!(routed(&pool, &beta), ("green".into(), RolloutMatch));
            assert_eq!(routed(&pool, &pro), ("green".into(), RolloutMatch));
        }
        // With no backend in `to`, matched requests take the split (which then has only blue).
        let green_backend = |state| Change::UpdateBackend {
            upstream: "green".into(),
            address: "127.0.0.1:9002".parse().expect("address"),
            weight: None,
            state: Some(state),
        };
        pool.apply(&green_backend(crate::BackendState::Disabled), Source::Api)
            .unwrap();
        assert_eq!(routed(&pool, &beta), ("blue".into(), Split));
        let counts = |pool: &crate::Pool| {
            pool.snapshot().routes[0].routing_counts()[RolloutMatch as usize].1
        };
        assert_eq!(counts(&pool), 21);
        // An abort sends every matched user back at once.
        pool.apply(&green_backend(crate::BackendState::Active), Source::Api)
            .unwrap();
        assert_eq!(routed(&pool, &beta), ("green".into(), RolloutMatch));
        pool.apply(&command(RolloutCommand::Abort), Source::Api)
            .unwrap();
        for _ in 0..10 {
            assert_eq!(routed(&pool, &beta), ("blue".into(), Split));
        }
        assert_eq!(counts(&pool), 22);
        // Ended at the match step itself, where the split does not change: still at once.
        pool.apply(
            &start(
                r#"{"to": "green", "steps": [{"match": {"headers": {"X-User-Group": "beta"}}}]}"#,
            ),
            Source::Api,
        )
        .unwrap();
        take(0, 0.0);
        assert_eq!(routed(&pool, &beta), ("green".into(), RolloutMatch));
        pool.apply(&command(RolloutCommand::Abort), Source::Api)
            .unwrap();
        assert_eq!(routed(&pool, &beta), ("blue".into(), Split));
    }

    fn split(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
        pairs.iter().map(|(n, w)| (n.to_string(), *w)).collect()
    }

    #[test]
    fn rescaling_keeps_ratios_and_sums_exactly() {
        assert_eq!(
            rescale(&split(&[("blue", 90), ("green", 10)])),
            split(&[("blue", 9000), ("green", 1000)])
        );
        assert_eq!(
            rescale(&split(&[("a", 1), ("b", 1), ("c", 1)])),
            split(&[("a", 3334), ("b", 3333), ("c", 3333)])
        );
        assert_eq!(
            rescale(&split(&[("blue", 1), ("green", 0)])),
            split(&[("blue", 10_000), ("green", 0)])
        );
        let odd = rescale(&split(&[("a", 7), ("b", 13), ("c", 9999)]));
        assert_eq!(odd.values().sum::<u32>(), SPLIT_TOTAL);
    }
}
