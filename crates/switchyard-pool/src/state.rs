//! Runtime state: what the admin API has changed on top of the config file (splits, backend
//! weights and states, added and removed backends), and the one place where a [`Change`] is
//! checked and turned into the next state.
//!
//! The state is kept as overrides, not as a copy of the config, so that a reload keeps an
//! operator's canary split or drain, and an override that no longer fits the config is dropped
//! with a warning rather than resurrecting what the file removed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use switchyard_config::limits::{
    backend_address_problem, MAX_BACKENDS, MAX_BACKENDS_PER_UPSTREAM, MAX_ROUTE_BACKEND_PAIRS,
    MAX_ROUTE_UPSTREAM_PAIRS,
};
use switchyard_config::{retire_timeout_problem, Config, MAX_BACKEND_WEIGHT, MAX_SPLIT_WEIGHT};

use crate::events::{Draft, Source};
use crate::retire::Deadline;
use crate::rollout::{Rollout, RolloutCommand};
use crate::snapshot::BackendState;
use switchyard_config::rollout::RolloutSpec;

/// The state file's format: 1 had no rollouts (and no `format` field); 2 added them; 3 added
/// match steps to their specs; 4 retiring backends; 5 a rollout paused by a failure; 6 the revision of
/// a shared store the file is the local copy of. A file is written in the oldest format
/// that holds what it has, so a binary from before a feature still reads a state that does
/// not use it. A file of a newer format than this binary knows is refused at start, never set
/// aside as corrupt: a binary of format 3 refuses a file with a retiring backend instead of
/// taking it for corrupt (it has no `retiring` state) and starting without the file.
pub const STATE_FORMAT: u32 = 6;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeState {
    /// Written as [`STATE_FORMAT`]; files without it are format 1.
    #[serde(default = "format_1")]
    pub format: u32,
    /// Route name -> replaced split.
    #[serde(default)]
    pub splits: BTreeMap<String, SplitOverride>,
    /// Upstream name -> changes to its backends.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamChanges>,
    /// Route name -> its current or last rollout.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rollouts: BTreeMap<String, Rollout>,
    /// In the local copy of a shared store's state (the state file beside etcd): the store's
    /// revision it was copied at, so that a start from the copy knows how far behind it is.
    /// Never part of what the store itself holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_revision: Option<u64>,
}

fn format_1() -> u32 {
    1
}

impl RuntimeState {
    /// The oldest format that holds this state: what a save writes, so that a downgrade
    /// keeps what the older binary can read (and a state it cannot is refused by it clearly).
    pub(crate) fn oldest_format(&self) -> u32 {
        let match_steps = self
            .rollouts
            .values()
            .any(|r| r.spec.steps.iter().any(|s| s.matching().is_some()));
        if self.store_revision.is_some() {
            6
        } else if self.rollouts.values().any(|r| r.paused_by_failure) {
            5
        } else if self.has_retiring() {
            4
        } else if match_steps {
            3
        } else if self.rollouts.is_empty() {
            1
        } else {
            2
        }
    }
}

impl Default for RuntimeState {
    fn default() -> Self {
        RuntimeState {
            format: STATE_FORMAT,
            splits: BTreeMap::new(),
            upstreams: BTreeMap::new(),
            rollouts: BTreeMap::new(),
            store_revision: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamChanges {
    /// Backends of the config file with a changed weight or state.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub changed: BTreeMap<SocketAddr, BackendChange>,
    /// Backends added through the admin API, in the order they were added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<AddedBackend>,
    /// Backends of the config file removed through the admin API.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub removed: BTreeSet<SocketAddr>,
}

impl UpstreamChanges {
    fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.added.is_empty() && self.removed.is_empty()
    }
}

/// A split set through the API, with the file's split it replaced: when the file's split
/// changes later, the operator edited the file on purpose and the file wins.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitOverride {
    pub split: BTreeMap<String, u32>,
    #[serde(default)]
    pub file: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// The file's weight when `weight` was set; a different one in the file later wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<BackendState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddedBackend {
    pub address: SocketAddr,
    pub weight: u32,
    pub state: BackendState,
}

/// One operator change, as the admin API (or anything else) asks for it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    SetSplit {
        route: String,
        split: BTreeMap<String, u32>,
    },
    UpdateBackend {
        upstream: String,
        address: SocketAddr,
        weight: Option<u32>,
        state: Option<BackendState>,
    },
    /// Sets a backend of an `ip_hash` or `hash` upstream to `retiring` for `timeout` from
    /// now (`None`: the upstream's `retire_timeout`), and its weight when given.
    RetireBackend {
        upstream: String,
        address: SocketAddr,
        weight: Option<u32>,
        timeout: Option<Duration>,
    },
    /// A retiring window ran out: the backend becomes draining. Refused unless it is still
    /// retiring until `until` (an admin change in between decides).
    EndRetiring {
        upstream: String,
        address: SocketAddr,
        until: Deadline,
    },
    AddBackend {
        upstream: String,
        address: SocketAddr,
        /// `None`: the config file's weight for a backend it lists, else 1.
        weight: Option<u32>,
    },
    RemoveBackend {
        upstream: String,
        address: SocketAddr,
    },
    /// Sets the weight and/or state of every backend of an upstream at once. Refused when it
    /// would leave a route that has an available upstream now with none (that route would
    /// answer 503), unless `force`.
    UpdateUpstream {
        upstream: String,
        weight: Option<u32>,
        state: Option<BackendState>,
        force: bool,
    },
    /// Drops every split, backend weight and state, added and removed backend set at run time:
    /// the config file alone rules again. Records of ended rollouts stay (they steer nothing).
    /// Refused while a rollout runs, and when it would remove an added backend that is still
    /// active or has requests in flight (the rule of `RemoveBackend`).
    ResetState,
    /// Starts a rollout on a route: its split is rescaled and from then on the rollout's.
    StartRollout {
        route: String,
        spec: Box<RolloutSpec>,
    },
    /// An operator's pause, resume, promote or abort.
    RolloutCommand {
        route: String,
        command: RolloutCommand,
    },
    /// The engine's next record of a rollout; refused unless built on the current one (same
    /// `revision`) and the rollout is still running.
    RolloutUpdate { route: String, next: Box<Rollout> },
}

/// Why a change was refused; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The request itself is wrong (a value out of range, an unknown upstream in a split).
    Invalid(String),
    /// The route, upstream or backend does not exist.
    NotFound(String),
    /// The change conflicts with the current state.
    Conflict(String),
    /// The state could not be saved.
    Storage(String),
    /// The shared state store does not answer: the message names it (`503`).
    Unavailable(String),
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Invalid(m)
            | Rejection::NotFound(m)
            | Rejection::Conflict(m)
            | Rejection::Storage(m)
            | Rejection::Unavailable(m) => f.write_str(m),
        }
    }
}

/// What a change is checked against beyond config and state: the live side of each backend.
pub trait Live {
    /// Requests `upstream`'s backend `address` has in flight (removal waits for none).
    fn in_flight(&self, upstream: &str, address: SocketAddr) -> usize;

    /// Whether its health check (or passive check) holds it healthy; a backend never
    /// checked is.
    fn healthy(&self, _upstream: &str, _address: SocketAddr) -> bool {
        true
    }
}

/// A closure telling the in-flight count; every backend healthy.
impl<F: Fn(&str, SocketAddr) -> usize> Live for F {
    fn in_flight(&self, upstream: &str, address: SocketAddr) -> usize {
        self(upstream, address)
    }
}

/// A backend as config and state together make it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveBackend {
    pub address: SocketAddr,
    pub weight: u32,
    pub state: BackendState,
}

impl RuntimeState {
    /// The split a route has now.
    pub fn split<'a>(&'a self, config: &'a Config, route: &str) -> Option<Vec<(&'a str, u32)>> {
        if let Some(o) = self.splits.get(route) {
            return Some(o.split.iter().map(|(u, w)| (u.as_str(), *w)).collect());
        }
        let route = config.routes.iter().find(|r| r.name == route)?;
        Some(
            route
                .split
                .iter()
                .map(|s| (s.upstream.as_str(), s.weight))
                .collect(),
        )
    }

    /// The backends an upstream has now, config order first, then added ones.
    pub fn backends(&self, config: &Config, upstream: &str) -> Vec<EffectiveBackend> {
        let Some(up) = config.upstream(upstream) else {
            return Vec::new();
        };
        let changes = self.upstreams.get(upstream);
        let mut out: Vec<EffectiveBackend> = up
            .backends
            .iter()
            .filter(|b| !changes.is_some_and(|c| c.removed.contains(&b.address)))
            .map(|b| {
                let change = changes
                    .and_then(|c| c.changed.get(&b.address))
                    .copied()
                    .unwrap_or_default();
                EffectiveBackend {
                    address: b.address,
                    weight: change.weight.unwrap_or(b.weight),
                    state: change.state.unwrap_or(BackendState::Active),
                }
            })
            .collect();
        if let Some(changes) = changes {
            out.extend(changes.added.iter().map(|a| EffectiveBackend {
                address: a.address,
                weight: a.weight,
                state: a.state,
            }));
        }
        out
    }

    /// The state with `change` applied, or why not. `live` tells how many requests a
    /// backend has in flight (for removal) and whether it is healthy (for whole-upstream
    /// changes).
    pub fn with_change(
        &self,
        config: &Config,
        change: &Change,
        live: impl Live,
    ) -> Result<RuntimeState, Rejection> {
        let in_flight = |upstream: &str, address| live.in_flight(upstream, address);
        let mut next = self.clone();
        match change {
            Change::SetSplit { route, split } => {
                if !config.routes.iter().any(|r| r.name == *route) {
                    return Err(Rejection::NotFound(format!("no route named {route:?}")));
                }
                if let Some(rollout) = self.rollouts.get(route).filter(|r| r.state.is_active()) {
                    return Err(Rejection::Conflict(format!(
                        "route {route:?} has a rollout running: {}; abort or promote it first (POST /api/v1/routes/{route}/rollout/abort or .../promote)",
                        rollout.describe()
                    )));
                }
                check_split(config, split)?;
                let pairs: usize = config
                    .routes
                    .iter()
                    .map(|r| match self.splits.get(&r.name) {
                        _ if r.name == *route => split.len(),
                        Some(o) => o.split.len(),
                        None => r.split.len(),
                    })
                    .sum();
                if pairs > MAX_ROUTE_UPSTREAM_PAIRS {
                    return Err(Rejection::Invalid(format!(
                        "the routes would have {pairs} route/upstream pairs (entries of all routes' splits), over the limit of {MAX_ROUTE_UPSTREAM_PAIRS} (see docs/configuration.md, \"Limits\")"
                    )));
                }
                self.backends_within_limits(config, Some((route, split)), None)?;
                next.splits.insert(
                    route.clone(),
                    SplitOverride {
                        split: split.clone(),
                        file: file_split(config, route),
                    },
                );
            }
            Change::UpdateBackend {
                upstream,
                address,
                weight,
                state,
            } => {
                self.backend(config, upstream, *address)?;
                if weight.is_none() && state.is_none() {
                    return Err(Rejection::Invalid(
                        "give \"weight\" and/or \"state\" to change".into(),
                    ));
                }
                next.update_backend(config, upstream, *address, *weight, *state)?;
            }
            Change::RetireBackend {
                upstream,
                address,
                weight,
                timeout,
            } => {
                self.backend(config, upstream, *address)?;
                // Before the timeout: on an upstream without keys no timeout is right.
                if let Some(up) = config.upstream(upstream) {
                    check_ring(upstream, up)?;
                }
                let timeout = match (timeout, config.upstream(upstream)) {
                    (Some(t), _) => match retire_timeout_problem(*t) {
                        Some(why) => {
                            return Err(Rejection::Invalid(format!("retire_timeout: {why}")))
                        }
                        None => *t,
                    },
                    (None, Some(u)) => u.retire_timeout,
                    (None, None) => return Err(no_upstream(upstream)),
                };
                let until = Deadline::after(SystemTime::now(), timeout);
                let state = BackendState::Retiring { until };
                next.update_backend(config, upstream, *address, *weight, Some(state))?;
            }
            Change::EndRetiring {
                upstream,
                address,
                until,
            } => {
                let current = self.backend(config, upstream, *address)?;
                if current.state != (BackendState::Retiring { until: *until }) {
                    return Err(Rejection::Conflict(format!(
                        "upstream {upstream:?} backend {address} is no longer retiring until {until}: it is {}",
                        current.state.as_str()
                    )));
                }
                let draining = Some(BackendState::Draining);
                next.update_backend(config, upstream, *address, None, draining)?;
            }
            Change::AddBackend {
                upstream,
                address,
                weight,
            } => {
                self.upstream_exists(config, upstream)?;
                check_weight(*weight)?;
                if let Some(why) = backend_address_problem(*address) {
                    return Err(Rejection::Invalid(format!("address: {why}")));
                }
                let current = self.backends(config, upstream);
                if current.iter().any(|b| b.address == *address) {
                    return Err(Rejection::Conflict(format!(
                        "upstream {upstream:?} already has backend {address}"
                    )));
                }
                if current.len() >= MAX_BACKENDS_PER_UPSTREAM {
                    return Err(Rejection::Invalid(format!(
                        "upstream {upstream:?} has {} backends, the limit (see docs/configuration.md, \"Limits\")",
                        current.len()
                    )));
                }
                self.backends_within_limits(config, None, Some(upstream))?;
                let changes = next.upstreams.entry(upstream.clone()).or_default();
                let in_config = config
                    .upstream(upstream)
                    .is_some_and(|u| u.backends.iter().any(|b| b.address == *address));
                if in_config {
                    // Re-adding a backend of the file that was removed: bring it back as it is
                    // there, with the weight asked for (or the file's).
                    changes.removed.remove(address);
                    if weight.is_some() {
                        let file_weight = config
                            .upstream(upstream)
                            .and_then(|u| u.backends.iter().find(|b| b.address == *address))
                            .map(|b| b.weight);
                        changes.changed.insert(
                            *address,
                            BackendChange {
                                weight: *weight,
                                file_weight,
                                state: None,
                            },
                        );
                    }
                } else {
                    changes.added.push(AddedBackend {
                        address: *address,
                        weight: weight.unwrap_or(1),
                        state: BackendState::Active,
                    });
                }
            }
            Change::StartRollout { route, spec } => next.start_rollout(config, route, spec)?,
            Change::RolloutCommand { route, command } => {
                next.command_rollout(config, route, *command)?
            }
            Change::RolloutUpdate {
                route,
                next: record,
            } => next.update_rollout(config, route, record)?,
            Change::RemoveBackend { upstream, address } => {
                let current = self.backend(config, upstream, *address)?;
                if current.state == BackendState::Active {
                    return Err(Rejection::Conflict(format!(
                        "backend {address} is active; set its state to \"draining\" or \"disabled\" first"
                    )));
                }
                if let Some(until) = current.state.retiring_until() {
                    return Err(Rejection::Conflict(format!(
                        "backend {address} is retiring until {until}: its users still reach it; it can be removed once it is draining (at that time, or set \"state\": \"draining\" now) with nothing in flight"
                    )));
                }
                let busy = in_flight(upstream, *address);
                if busy > 0 {
                    return Err(Rejection::Conflict(format!(
                        "backend {address} still has {busy} requests in flight; retry when it has none"
                    )));
                }
                let changes = next.upstreams.entry(upstream.clone()).or_default();
                if let Some(i) = changes.added.iter().position(|a| a.address == *address) {
                    changes.added.remove(i);
                } else {
                    changes.changed.remove(address);
                    changes.removed.insert(*address);
                }
            }
            Change::UpdateUpstream {
                upstream,
                weight,
                state,
                force,
            } => {
                self.upstream_exists(config, upstream)?;
                if weight.is_none() && state.is_none() {
                    return Err(Rejection::Invalid(
                        "give \"state\" and/or \"weight\" to change".into(),
                    ));
                }
                if state.is_some_and(|s| s.retiring_until().is_some()) {
                    return Err(Rejection::Invalid(
                        "state: \"retiring\" is set backend by backend (each keeps its own users); for the whole upstream use \"draining\"".into(),
                    ));
                }
                for backend in self.backends(config, upstream) {
                    next.update_backend(config, upstream, backend.address, *weight, *state)?;
                }
                if !force {
                    if let Some(route) = self.route_left_without_upstream(config, &next, &live) {
                        return Err(Rejection::Conflict(format!(
                            "route {route:?} would have no upstream with an available backend and answer 503: {upstream:?} is the last one it has; send \"force\": true to do it anyway"
                        )));
                    }
                }
            }
            Change::ResetState => {
                if let Some((route, rollout)) =
                    self.rollouts.iter().find(|(_, r)| r.state.is_active())
                {
                    return Err(Rejection::Conflict(format!(
                        "route {route:?} has a rollout running: {}; abort or promote it first (POST /api/v1/routes/{route}/rollout/abort or .../promote), then reset",
                        rollout.describe()
                    )));
                }
                for (upstream, changes) in &self.upstreams {
                    for added in &changes.added {
                        let address = added.address;
                        if !matches!(added.state, BackendState::Draining | BackendState::Disabled) {
                            return Err(Rejection::Conflict(format!(
                                "upstream {upstream:?} backend {address} was added at run time and is {}: a reset removes it; set it to \"draining\" first, and reset once it has no requests in flight",
                                added.state.as_str()
                            )));
                        }
                        let busy = in_flight(upstream, address);
                        if busy > 0 {
                            return Err(Rejection::Conflict(format!(
                                "upstream {upstream:?} backend {address} was added at run time and still has {busy} requests in flight; a reset removes it: retry when it has none"
                            )));
                        }
                    }
                }
                next.splits.clear();
                next.upstreams.clear();
            }
        }
        next.upstreams.retain(|_, c| !c.is_empty());
        Ok(next)
    }

    /// A route that has an upstream with an available backend (active, weight above 0,
    /// healthy) in this state, and none in `next`.
    fn route_left_without_upstream<'a>(
        &self,
        config: &'a Config,
        next: &RuntimeState,
        live: &impl Live,
    ) -> Option<&'a str> {
        let serves = |state: &RuntimeState, route: &str| {
            state
                .split(config, route)
                .unwrap_or_default()
                .iter()
                .filter(|(_, weight)| *weight > 0)
                .any(|(upstream, _)| {
                    state.backends(config, upstream).iter().any(|b| {
                        b.state == BackendState::Active
                            && b.weight > 0
                            && live.healthy(upstream, b.address)
                    })
                })
        };
        config
            .routes
            .iter()
            .find(|r| serves(self, &r.name) && !serves(next, &r.name))
            .map(|r| r.name.as_str())
    }

    /// Every runtime change this state makes to `config`, one line each, for a reset's
    /// answer and event.
    pub fn overrides(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (route, o) in &self.splits {
            let split: Vec<String> = o.split.iter().map(|(u, w)| format!("{u} {w}")).collect();
            out.push(format!("route {route} split {}", split.join(", ")));
        }
        for (upstream, changes) in &self.upstreams {
            for (address, change) in &changes.changed {
                let mut what = Vec::new();
                if let Some(w) = change.weight {
                    what.push(format!("weight {w}"));
                }
                if let Some(s) = change.state {
                    what.push(s.as_str().to_string());
                }
                out.push(format!(
                    "upstream {upstream} backend {address} {}",
                    what.join(" ")
                ));
            }
            for added in &changes.added {
                out.push(format!(
                    "upstream {upstream} backend {} added (weight {} {})",
                    added.address,
                    added.weight,
                    added.state.as_str()
                ));
            }
            for address in &changes.removed {
                out.push(format!("upstream {upstream} backend {address} removed"));
            }
        }
        out
    }

    /// `config` as this state makes it: every route's split and every upstream's backends
    /// (weights, added, removed) as they are now. Backend states have no place in the file;
    /// [`RuntimeState::backends`] tells them.
    pub fn effective_config(&self, config: &Config) -> Config {
        let mut out = config.clone();
        for route in &mut out.routes {
            if let Some(o) = self.splits.get(&route.name) {
                route.split = o
                    .split
                    .iter()
                    .map(|(upstream, weight)| switchyard_config::SplitWeight {
                        upstream: upstream.clone(),
                        weight: *weight,
                    })
                    .collect();
            }
        }
        for upstream in &mut out.upstreams {
            upstream.backends = self
                .backends(config, &upstream.name)
                .into_iter()
                .map(|b| switchyard_config::Backend {
                    address: b.address,
                    weight: b.weight,
                })
                .collect();
        }
        out
    }

    /// Sets a backend's weight and/or state, as a change of the file's backend or of an
    /// added one. `retiring` needs a ring upstream.
    fn update_backend(
        &mut self,
        config: &Config,
        upstream: &str,
        address: SocketAddr,
        weight: Option<u32>,
        state: Option<BackendState>,
    ) -> Result<(), Rejection> {
        check_weight(weight)?;
        let Some(up) = config.upstream(upstream) else {
            return Err(no_upstream(upstream));
        };
        let current = self.backend(config, upstream, address)?;
        let retiring = state.unwrap_or(current.state).retiring_until().is_some();
        if retiring {
            check_ring(upstream, up)?;
            if weight.unwrap_or(current.weight) == 0 {
                return Err(Rejection::Invalid(
                    "weight: a retiring backend with weight 0 would serve none of its users; give it a weight above 0, or set \"state\": \"draining\" to move them now".into(),
                ));
            }
        }
        // A draining or disabled backend's users have moved on already, but its filter still
        // names them: retiring it would take them back until the deadline, then move them again.
        if state.is_some_and(|s| s.retiring_until().is_some())
            && matches!(
                current.state,
                BackendState::Draining | BackendState::Disabled
            )
        {
            return Err(Rejection::Conflict(format!(
                "backend {address} is {}: its users have moved to other backends already, and retiring it would call some of them back; only an active (or retiring) backend can retire",
                current.state.as_str()
            )));
        }
        let changes = self.upstreams.entry(upstream.to_string()).or_default();
        if let Some(added) = changes.added.iter_mut().find(|a| a.address == address) {
            added.weight = weight.unwrap_or(added.weight);
            added.state = state.unwrap_or(added.state);
        } else {
            let file_weight = up
                .backends
                .iter()
                .find(|b| b.address == address)
                .map(|b| b.weight);
            let entry = changes.changed.entry(address).or_default();
            if weight.is_some() {
                entry.weight = weight;
                entry.file_weight = file_weight;
            }
            entry.state = state.or(entry.state);
        }
        Ok(())
    }

    /// Whether a backend is retiring: the state file is then written in format 4.
    pub(crate) fn has_retiring(&self) -> bool {
        self.upstreams.values().any(|c| {
            c.changed
                .values()
                .any(|b| b.state.is_some_and(|s| s.retiring_until().is_some()))
                || c.added.iter().any(|a| a.state.retiring_until().is_some())
        })
    }

    /// Refuses a change after which the backends of all upstreams would pass [`MAX_BACKENDS`],
    /// or the route/backend pairs (for every route, the backends of the upstreams it splits to)
    /// [`MAX_ROUTE_BACKEND_PAIRS`]: `split` replaces one route's split, `added_to` gains one
    /// backend.
    fn backends_within_limits(
        &self,
        config: &Config,
        split: Option<(&str, &BTreeMap<String, u32>)>,
        added_to: Option<&str>,
    ) -> Result<(), Rejection> {
        // Counted once per upstream: there may be 10 000 split entries.
        let counts: std::collections::HashMap<&str, usize> = config
            .upstreams
            .iter()
            .map(|u| {
                let added = usize::from(added_to == Some(u.name.as_str()));
                (
                    u.name.as_str(),
                    self.backends(config, &u.name).len() + added,
                )
            })
            .collect();
        let all: usize = counts.values().sum();
        if all > MAX_BACKENDS {
            return Err(Rejection::Invalid(format!(
                "the upstreams would have {all} backends in all, over the limit of {MAX_BACKENDS} (see docs/configuration.md, \"Limits\")"
            )));
        }
        let backends_of = |upstream: &str| counts.get(upstream).copied().unwrap_or(0);
        let pairs: usize = config
            .routes
            .iter()
            .map(|r| match (split, self.splits.get(&r.name)) {
                (Some((route, split)), _) if route == r.name => {
                    split.keys().map(|u| backends_of(u)).sum::<usize>()
                }
                (_, Some(o)) => o.split.keys().map(|u| backends_of(u)).sum(),
                _ => r.split.iter().map(|w| backends_of(&w.upstream)).sum(),
            })
            .sum();
        if pairs > MAX_ROUTE_BACKEND_PAIRS {
            return Err(Rejection::Invalid(format!(
                "the routes would have {pairs} route/backend pairs (for every route, the backends of the upstreams it splits to), over the limit of {MAX_ROUTE_BACKEND_PAIRS} (see docs/configuration.md, \"Limits\")"
            )));
        }
        Ok(())
    }

    /// Keeps what still fits `config`; returns the warnings for what was dropped. Also used
    /// on a state file read from disk, so every value is checked again.
    pub fn fit(&self, config: &Config) -> (RuntimeState, Vec<String>) {
        let mut warnings = Vec::new();
        let mut next = RuntimeState::default();
        for (route, o) in &self.splits {
            if !config.routes.iter().any(|r| r.name == *route) {
                warnings.push(format!(
                    "state: split of route {route:?} dropped: the route is no longer in the config"
                ));
            } else if let Err(why) = check_split(config, &o.split) {
                warnings.push(format!("state: split of route {route:?} dropped: {why}"));
            } else if file_split(config, route) != o.file {
                warnings.push(format!(
                    "state: split of route {route:?} dropped: the config file changed that split since it was set through the API, and the file wins"
                ));
            } else {
                next.splits.insert(route.clone(), o.clone());
            }
        }
        for (name, changes) in &self.upstreams {
            let Some(upstream) = config.upstream(name) else {
                warnings.push(format!(
                    "state: changes to upstream {name:?} dropped: the upstream is no longer in the config"
                ));
                continue;
            };
            let file_weight = |a: &SocketAddr| {
                upstream
                    .backends
                    .iter()
                    .find(|b| b.address == *a)
                    .map(|b| b.weight)
            };
            let mut kept = UpstreamChanges::default();
            for (address, change) in &changes.changed {
                let Some(in_file) = file_weight(address) else {
                    warnings.push(format!(
                        "state: change to backend {address} of {name:?} dropped: it is no longer in the config"
                    ));
                    continue;
                };
                let mut change = *change;
                change.state = change
                    .state
                    .map(|s| fit_retiring(s, upstream, *address, &mut warnings));
                if change.weight.is_some_and(|w| w > MAX_BACKEND_WEIGHT) {
                    warnings.push(format!(
                        "state: weight of backend {address} of {name:?} dropped: out of range 0..={MAX_BACKEND_WEIGHT}"
                    ));
                    change.weight = None;
                } else if change.weight.is_some() && change.file_weight != Some(in_file) {
                    warnings.push(format!(
                        "state: weight of backend {address} of {name:?} dropped: the config file changed it since it was set through the API, and the file wins"
                    ));
                    change.weight = None;
                }
                if change.weight.is_none() {
                    change.file_weight = None;
                }
                if change.weight.is_some() || change.state.is_some() {
                    kept.changed.insert(*address, change);
                }
            }
            for address in &changes.removed {
                if file_weight(address).is_some() {
                    kept.removed.insert(*address);
                } else {
                    warnings.push(format!(
                        "state: removal of backend {address} from {name:?} dropped: the config no longer has it"
                    ));
                }
            }
            for added in &changes.added {
                let count = upstream.backends.len() - kept.removed.len() + kept.added.len();
                if let Some(why) = backend_address_problem(added.address) {
                    warnings.push(format!("state: added backend of {name:?} dropped: {why}"));
                } else if count >= MAX_BACKENDS_PER_UPSTREAM
                    && file_weight(&added.address).is_none()
                {
                    warnings.push(format!(
                        "state: added backend {} of {name:?} dropped: the upstream has {count} backends, the limit",
                        added.address
                    ));
                } else if added.weight > MAX_BACKEND_WEIGHT {
                    warnings.push(format!(
                        "state: added backend {} of {name:?} dropped: weight out of range 0..={MAX_BACKEND_WEIGHT}",
                        added.address
                    ));
                } else if let Some(in_file) = file_weight(&added.address) {
                    // The file has it now: what the operator set stays as a change on it.
                    let state = fit_retiring(added.state, upstream, added.address, &mut warnings);
                    kept.changed.insert(
                        added.address,
                        BackendChange {
                            weight: Some(added.weight),
                            file_weight: Some(in_file),
                            state: Some(state),
                        },
                    );
                } else if kept.added.iter().any(|a| a.address == added.address) {
                    warnings.push(format!(
                        "state: backend {} of {name:?} was added twice; the first one is kept",
                        added.address
                    ));
                } else {
                    let state = fit_retiring(added.state, upstream, added.address, &mut warnings);
                    kept.added.push(AddedBackend { state, ..*added });
                }
            }
            if !kept.is_empty() {
                next.upstreams.insert(name.clone(), kept);
            }
        }
        // Ending a rollout is not dropping state: the caller records it as the rollout's own
        // event (see `rollout::rollout_events`), so no warning here.
        for (route, rollout) in &self.rollouts {
            let route_kept = config.routes.iter().any(|r| r.name == *route);
            if !route_kept && !rollout.state.is_active() {
                warnings.push(format!(
                    "state: the last rollout of route {route:?} dropped: the route is no longer in the config"
                ));
                continue;
            }
            let mut rollout = rollout.clone();
            if rollout.state.is_active() {
                let missing = [&rollout.from, &rollout.to]
                    .into_iter()
                    .find(|u| config.upstream(u).is_none());
                let why = match missing {
                    _ if !route_kept => Some("the route is no longer in the config".to_string()),
                    Some(gone) => Some(format!("upstream {gone:?} is no longer in the config")),
                    None if !next.splits.contains_key(route) => {
                        Some("the config file changed the route's split".to_string())
                    }
                    None => None,
                };
                if let Some(why) = why {
                    next.splits.remove(route);
                    // Its record says from here on what the file's split gives `to`.
                    rollout.settle_on(&file_split(config, route));
                    rollout.end(
                        crate::rollout::RolloutState::Failed,
                        format!("ended by the config file: {why}; the file's split applies"),
                    );
                }
            }
            // A failed rollout of a removed route stays listed until the next reload.
            next.rollouts.insert(route.clone(), rollout);
        }
        (next, warnings)
    }

    fn upstream_exists(&self, config: &Config, upstream: &str) -> Result<(), Rejection> {
        match config.upstream(upstream) {
            Some(_) => Ok(()),
            None => Err(no_upstream(upstream)),
        }
    }

    fn backend(
        &self,
        config: &Config,
        upstream: &str,
        address: SocketAddr,
    ) -> Result<EffectiveBackend, Rejection> {
        self.upstream_exists(config, upstream)?;
        self.backends(config, upstream)
            .into_iter()
            .find(|b| b.address == address)
            .ok_or_else(|| {
                Rejection::NotFound(format!("upstream {upstream:?} has no backend {address}"))
            })
    }
}

/// The event for `change`, applied by `source`: `before` is the state it was applied to and
/// `after` the state it made, so the event shows what the change did, not only what was asked
/// (a PATCH of the weight alone keeps the state it had).
pub(crate) fn change_event(
    config: &Config,
    before: &RuntimeState,
    after: &RuntimeState,
    change: &Change,
    source: Source,
) -> Vec<Draft> {
    let split = |state: &RuntimeState, route: &str| {
        let split = state.split(config, route).unwrap_or_default();
        let text = split
            .iter()
            .map(|(u, w)| format!("{u} {w}"))
            .collect::<Vec<_>>()
            .join(", ");
        let json: serde_json::Map<String, serde_json::Value> = split
            .iter()
            .map(|(u, w)| (u.to_string(), (*w).into()))
            .collect();
        (text, serde_json::Value::Object(json))
    };
    let backend = |state: &RuntimeState, upstream: &str, address: SocketAddr| {
        state
            .backends(config, upstream)
            .into_iter()
            .find(|b| b.address == address)
            .map(|b| {
                let mut text = format!("weight {} {}", b.weight, b.state.as_str());
                let mut json = serde_json::json!({ "weight": b.weight, "state": b.state.as_str() });
                if let Some(until) = b.state.retiring_until() {
                    text.push_str(&format!(" until {until}"));
                    json["retiring_until"] = until.to_string().into();
                }
                (text, json)
            })
            .unwrap_or_default()
    };
    let draft = match change {
        Change::StartRollout { .. }
        | Change::RolloutCommand { .. }
        | Change::RolloutUpdate { .. } => {
            return crate::rollout::rollout_events(before, after, source)
        }
        Change::SetSplit { route, .. } => {
            let (was, before) = split(before, route);
            let (now, after) = split(after, route);
            Draft::new(
                source,
                "split_changed",
                format!("route {route} split set to {now} (was {was})"),
            )
            .route(route)
            .before(before)
            .after(after)
        }
        Change::UpdateBackend {
            upstream, address, ..
        }
        | Change::RetireBackend {
            upstream, address, ..
        }
        | Change::EndRetiring {
            upstream, address, ..
        } => {
            let (was, before) = backend(before, upstream, *address);
            let (now, after) = backend(after, upstream, *address);
            let why = match change {
                Change::EndRetiring { .. } => "its retire_timeout is over, its users move now: ",
                _ => "",
            };
            Draft::new(
                source,
                "backend_changed",
                format!("upstream {upstream} backend {address} {why}set to {now} (was {was})"),
            )
            .upstream(upstream)
            .backend(address)
            .before(before)
            .after(after)
        }
        Change::AddBackend {
            upstream, address, ..
        } => {
            let (now, after) = backend(after, upstream, *address);
            Draft::new(
                source,
                "backend_added",
                format!("upstream {upstream} backend {address} added with {now}"),
            )
            .upstream(upstream)
            .backend(address)
            .after(after)
        }
        Change::UpdateUpstream { upstream, .. } => {
            let all = |state: &RuntimeState| {
                let backends = state.backends(config, upstream);
                let text = backends
                    .iter()
                    .map(|b| format!("{} weight {} {}", b.address, b.weight, b.state.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ");
                let json: serde_json::Map<String, serde_json::Value> = backends
                    .iter()
                    .map(|b| {
                        (
                            b.address.to_string(),
                            serde_json::json!({ "weight": b.weight, "state": b.state.as_str() }),
                        )
                    })
                    .collect();
                (text, serde_json::Value::Object(json))
            };
            let (was, before) = all(before);
            let (now, after) = all(after);
            Draft::new(
                source,
                "upstream_changed",
                format!("upstream {upstream}: every backend set at once: {now} (was {was})"),
            )
            .upstream(upstream)
            .before(before)
            .after(after)
        }
        Change::ResetState => {
            let dropped = before.overrides();
            let message = if dropped.is_empty() {
                "runtime state reset: there was none; the config file rules".to_string()
            } else {
                format!(
                    "runtime state reset, the config file rules again; dropped: {}",
                    dropped.join("; ")
                )
            };
            Draft::new(source, "state_reset", message)
                .before(serde_json::json!({ "dropped": dropped }))
        }
        Change::RemoveBackend { upstream, address } => {
            let (was, before) = backend(before, upstream, *address);
            Draft::new(
                source,
                "backend_removed",
                format!("upstream {upstream} backend {address} removed (had {was})"),
            )
            .upstream(upstream)
            .backend(address)
            .before(before)
        }
    };
    vec![draft]
}

/// A backend's saved state as `upstream` allows it: retiring needs a ring, and a backend of
/// an upstream that no longer hashes has no keys to keep, so it is draining (with a warning).
fn fit_retiring(
    state: BackendState,
    upstream: &switchyard_config::Upstream,
    address: SocketAddr,
    warnings: &mut Vec<String>,
) -> BackendState {
    match state {
        BackendState::Retiring { until } if !upstream.algorithm.is_hash_ring() => {
            warnings.push(format!(
                "state: backend {address} of {:?} was retiring until {until}, but the upstream's algorithm is no longer ip_hash or hash: it is draining",
                upstream.name
            ));
            BackendState::Draining
        }
        other => other,
    }
}

/// Refuses `retiring` on an upstream that hashes no key.
fn check_ring(name: &str, upstream: &switchyard_config::Upstream) -> Result<(), Rejection> {
    if upstream.algorithm.is_hash_ring() {
        return Ok(());
    }
    Err(Rejection::Invalid(format!(
        "state: \"retiring\" keeps the users (hash keys) a backend has, for upstreams with algorithm ip_hash or hash; upstream {name:?} is {}, which has no key to keep: use \"draining\"",
        upstream.algorithm.as_str()
    )))
}

fn no_upstream(upstream: &str) -> Rejection {
    Rejection::NotFound(format!("no upstream named {upstream:?}"))
}

/// A route's split as the config file has it.
pub(crate) fn file_split(config: &Config, route: &str) -> BTreeMap<String, u32> {
    config
        .routes
        .iter()
        .find(|r| r.name == route)
        .map(|r| {
            r.split
                .iter()
                .map(|s| (s.upstream.clone(), s.weight))
                .collect()
        })
        .unwrap_or_default()
}

fn check_weight(weight: Option<u32>) -> Result<(), Rejection> {
    match weight {
        Some(w) if w > MAX_BACKEND_WEIGHT => Err(Rejection::Invalid(format!(
            "weight: {w} is out of range 0..={MAX_BACKEND_WEIGHT}"
        ))),
        _ => Ok(()),
    }
}

pub(crate) fn check_split(config: &Config, split: &BTreeMap<String, u32>) -> Result<(), Rejection> {
    if split.is_empty() {
        return Err(Rejection::Invalid(
            "split: at least one upstream is required".into(),
        ));
    }
    for (upstream, weight) in split {
        if config.upstream(upstream).is_none() {
            return Err(Rejection::Invalid(format!(
                "split.{upstream}: unknown upstream {upstream:?}"
            )));
        }
        if *weight > MAX_SPLIT_WEIGHT {
            return Err(Rejection::Invalid(format!(
                "split.{upstream}: {weight} is out of range 0..={MAX_SPLIT_WEIGHT}"
            )));
        }
    }
    if split.values().all(|w| *w == 0) {
        return Err(Rejection::Invalid(
            "split: weights must not all be 0".into(),
        ));
    }
    Ok(())
}
