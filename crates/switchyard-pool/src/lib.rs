//! Switchyard's runtime state and every decision a request needs from it.
//!
//! The request path reads one immutable [`Snapshot`] per request (an `ArcSwap` load, no lock)
//! and picks a route, an upstream and a backend from structures precomputed when the snapshot
//! was built. Everything that changes the state goes through [`Pool`]: an admin [`Change`], a
//! config reload, or a health transition. Each takes the writer lock (never taken by requests),
//! checks the change against config and runtime state, saves the state file when there is one,
//! builds the next snapshot and swaps it in. Per-backend live state (health, in-flight count)
//! and per-route/upstream cursors sit in `Arc`s that the next snapshot reuses, so a swap loses
//! none of them; the rollout analysis counters ([`PairStats`]) sit in a registry by name that
//! every snapshot resolves its routes' pairs from. Each change, and each moment of the
//! process's life, is recorded once in its [`Events`] log.

pub mod events;
pub mod health;
mod keys;
mod least;
mod live;
pub mod local;
mod matcher;
pub mod metrics;
pub mod peer;
mod probe;
pub mod ramp;
pub mod request;
pub mod retire;
pub mod rollout;
mod route;
mod select;
mod snapshot;
mod state;
mod state_file;
pub mod stats;
pub mod sticky;
pub mod store;
pub mod upstream_tls;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use log::{info, warn};
use serde_json::json;
use switchyard_config::Config;
use tokio::sync::watch;

pub use events::{Draft, Event, Events, Source};
pub use live::{BackendLive, InFlight};
pub use local::{local_failure, LocalErrors, LocalFailure};
pub use metrics::Metrics;
pub use request::Request;
pub use retire::Deadline;
pub use rollout::{Rollout, RolloutCommand, RolloutState, Verdict, WindowRecord};
pub use route::{Pick, Route, Routing};
pub use select::smooth_sequence;
pub use snapshot::{Backend, BackendState, Snapshot, Upstream};
pub use state::{Change, Live, Rejection, RuntimeState, STATE_FORMAT};
pub use state_file::StateFile;
pub use stats::{PairStats, StatsReading, Window};
pub use store::{
    InstanceReport, LocalStore, Revision, SharedStore, StateStore, StoreError, StoreInfo,
    StoreUpdate, Stored,
};
pub use upstream_tls::{load_upstream_tls, UpstreamCas};

/// The shared, swappable runtime state of one Switchyard process.
pub struct Pool {
    current: ArcSwap<Snapshot>,
    /// The writer lock, and what the current snapshot was built from.
    desired: Mutex<Desired>,
    store: Option<StateFile>,
    metrics: Arc<Metrics>,
    local_errors: LocalErrors,
    /// Bumped after every swap, for background work that follows the state (health checks).
    version: watch::Sender<u64>,
    /// Bumped after every change of a rollout record, for the rollout engine.
    rollouts_moved: watch::Sender<u64>,
    events: Events,
    /// Set by [`Pool::hand_over`] under the writer lock: from then on the next process ends
    /// retiring windows, and one ended here would save this process's stale state over its
    /// changes (Pingora keeps this one running for seconds after the hand-over).
    handed_over: AtomicBool,
}

struct Desired {
    config: Config,
    /// The CA certificates `config`'s upstreams name, read with it.
    cas: UpstreamCas,
    state: RuntimeState,
    /// The state file is behind `state` (a save failed and the change applied anyway).
    unsaved: bool,
}

impl Pool {
    /// Builds the pool from `config`, the CA certificates read from it ([`load_upstream_tls`],
    /// before anything of the process is committed: a binary upgrade takes the sockets over
    /// after that) and the state file it names. Without a state file, the state a previous
    /// process handed over at `handover` (see [`Pool::hand_over`]) is taken once, so a binary
    /// upgrade keeps runtime changes even then. `Err` names a state file this binary cannot
    /// read without losing what it holds.
    pub fn new(
        config: Config,
        cas: UpstreamCas,
        metrics: Arc<Metrics>,
        handover: Option<&Path>,
    ) -> Result<Pool, String> {
        let store = config.state_file.clone().map(StateFile::new);
        let (saved, origin) = match (&store, handover.filter(|p| p.exists())) {
            (Some(store), _) => (store.load()?, "state_file"),
            (None, Some(path)) => {
                let state = StateFile::new(path.to_path_buf()).load()?;
                if let Err(e) = std::fs::remove_file(path) {
                    warn!("cannot remove handed-over state {}: {e}", path.display());
                }
                info!("runtime state taken over from the previous process; without a state_file it lives in memory only");
                (state, "handed_over")
            }
            (None, None) => {
                info!("no state_file configured: admin changes live in memory only and a restart undoes them");
                (RuntimeState::default(), "none")
            }
        };
        let events = Events::new();
        // The pool's version is the workspace's, which the binary shares.
        let version = env!("CARGO_PKG_VERSION");
        let pid = std::process::id();
        let loaded = match (origin, &config.state_file) {
            ("state_file", Some(path)) => format!("runtime state from {}", path.display()),
            ("handed_over", _) => "runtime state handed over by the previous process".into(),
            _ => "no runtime state (no state_file), the config file alone".into(),
        };
        events.record(
            Draft::new(
                Source::Startup,
                "started",
                format!("switchyard {version} started, pid {pid}; {loaded}"),
            )
            .after(json!({ "version": version, "pid": pid, "runtime_state": origin })),
        );
        let (state, warnings) = saved.fit(&config);
        for warning in warnings {
            events.record(Draft::new(Source::Startup, "state_dropped", warning).warning());
        }
        // Rollouts the file no longer fits (it changed while the process was down) end here.
        for event in rollout::rollout_events(&saved, &state, Source::Startup) {
            events.record(event);
        }
        // What was ended is saved at once: a later start must not bring it back.
        if let (Some(store), true) = (&store, state.rollouts != saved.rollouts) {
            if let Err(e) = store.save(&state) {
                warn!("{e}");
            }
        }
        let snapshot = Snapshot::build(&config, &cas, &state, &metrics, None);
        let pool = Pool {
            current: ArcSwap::from_pointee(snapshot),
            desired: Mutex::new(Desired {
                config,
                cas,
                state,
                unsaved: false,
            }),
            store,
            local_errors: LocalErrors::new(&metrics),
            metrics,
            version: watch::Sender::new(0),
            rollouts_moved: watch::Sender::new(0),
            events,
            handed_over: AtomicBool::new(false),
        };
        if let Some(handover) = handover {
            pool.take_over_keys(handover);
        }
        Ok(pool)
    }

    /// What changed, and when: every change made through the pool is recorded here.
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// The current snapshot, kept alive for as long as the caller holds it.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The rollout analysis counters of `route` → `upstream` by name, made on first use. They
    /// outlive every snapshot swap and reload, so readings taken across them can be
    /// subtracted ([`StatsReading::since`]). Takes a lock: not for the request path.
    pub fn pair_stats(&self, route: &str, upstream: &str) -> Arc<PairStats> {
        self.metrics.pair_stats(route, upstream)
    }

    /// Failures of the balancer's own, kept apart from the backends'.
    pub fn local_errors(&self) -> &LocalErrors {
        &self.local_errors
    }

    /// The config file the pool runs now.
    pub fn config(&self) -> Config {
        self.lock().config.clone()
    }

    /// Checks and applies one change asked for by `source`: saved to the state file first (when
    /// there is one), then swapped in for the next request, and recorded as an event. On `Err`
    /// nothing changed and nothing is recorded.
    pub fn apply(&self, change: &Change, source: Source) -> Result<(), Rejection> {
        self.apply_with(change, source, false)
    }

    /// The rollout engine's changes, as [`Pool::apply`], except that they apply even when the
    /// state file cannot be written: a failing version keeping its share because a disk is
    /// full (its failed windows never adding up, its rollback never made) would be worse than
    /// a restart that does not know the latest moves. The first unsaved change is recorded as
    /// an event; every later change tries the save again, and so does a hand-over.
    pub fn apply_rollout_update(&self, change: &Change) -> Result<(), Rejection> {
        self.apply_with(change, Source::Rollout, true)
    }

    fn apply_with(
        &self,
        change: &Change,
        source: Source,
        even_unsaved: bool,
    ) -> Result<(), Rejection> {
        let mut desired = self.lock();
        // Only the retire service is stopped here: the admin API refuses changes once the
        // process is closing, and the rollout engine is stopped before the hand-over.
        if source == Source::Retire && self.handed_over.load(Ordering::Relaxed) {
            return Err(Rejection::Conflict(
                "this process handed its state over to a new one, which ends retiring windows from now on".into(),
            ));
        }
        let current = self.current.load_full();
        let next = desired
            .state
            .with_change(&desired.config, change, &*current)?;
        let mut unsaved = None;
        if let Some(store) = &self.store {
            match store.save(&next) {
                Ok(()) => desired.unsaved = false,
                Err(e) if even_unsaved => {
                    // Said once, until a save works again.
                    if !std::mem::replace(&mut desired.unsaved, true) {
                        unsaved = Some(e);
                    } else {
                        warn!("{e}");
                    }
                }
                Err(e) => return Err(Rejection::Storage(e)),
            }
        }
        // A rollout's progress that leaves every split, rollout pair and match step as it was
        // (a judged window, hold time) needs no new snapshot: selection would be rebuilt for
        // nothing.
        let rebuild = next.splits != desired.state.splits
            || next.upstreams != desired.state.upstreams
            || next.rollouts_in_snapshot() != desired.state.rollouts_in_snapshot();
        let rollouts_moved = next.rollouts != desired.state.rollouts;
        let events = state::change_event(&desired.config, &desired.state, &next, change, source);
        if rebuild {
            let built = Snapshot::build(
                &desired.config,
                &desired.cas,
                &next,
                &self.metrics,
                Some(&current),
            );
            desired.state = next;
            self.swap(built);
        } else {
            desired.state = next;
        }
        if rollouts_moved {
            self.rollouts_moved.send_modify(|v| *v += 1);
        }
        // Under the writer lock, so that events are in the order the changes were made.
        if let Some(e) = unsaved {
            self.events.record(
                Draft::new(
                    source,
                    "state_not_saved",
                    format!("{e}; the rollout engine's changes apply anyway, in memory only, until a save works again: a restart now would not know them"),
                )
                .warning(),
            );
        }
        for event in events {
            self.events.record(event);
        }
        Ok(())
    }

    /// Follows changes of any rollout (started, moved, ended), for the engine.
    pub fn subscribe_rollouts(&self) -> watch::Receiver<u64> {
        self.rollouts_moved.subscribe()
    }

    /// A route's current or last rollout.
    pub fn rollout(&self, route: &str) -> Option<Rollout> {
        self.lock().state.rollouts.get(route).cloned()
    }

    /// The runtime state on top of the config file (what the state file holds).
    pub fn runtime_state(&self) -> RuntimeState {
        self.lock().state.clone()
    }

    /// Every route's current or last rollout, by route name.
    pub fn rollouts(&self) -> Vec<Rollout> {
        self.lock().state.rollouts.values().cloned().collect()
    }

    /// Runs a new config, with the CA certificates read from it ([`load_upstream_tls`]: the
    /// caller refuses the config when they cannot be read), keeping the runtime state that
    /// still fits it. Records a `reloaded` event naming what the file changed, and one
    /// `state_dropped` event per warning about state that was dropped; returns those warnings.
    pub fn reload(&self, config: Config, cas: UpstreamCas) -> Vec<String> {
        let mut desired = self.lock();
        let (state, mut warnings) = desired.state.fit(&config);
        if state != desired.state {
            if let Some(store) = &self.store {
                if let Err(e) = store.save(&state) {
                    warn!("{e}");
                }
            }
        }
        let built = Snapshot::build(
            &config,
            &cas,
            &state,
            &self.metrics,
            Some(&self.current.load()),
        );
        let changed = config_changes(&desired.config, &config);
        let ended = rollout::rollout_events(&desired.state, &state, Source::Reload);
        let rollouts_moved = desired.state.rollouts != state.rollouts;
        *desired = Desired {
            config,
            cas,
            state,
            unsaved: false,
        };
        self.swap(built);
        self.events.record(Draft::new(
            Source::Reload,
            "reloaded",
            format!("config reloaded: {changed}"),
        ));
        for warning in &warnings {
            self.events
                .record(Draft::new(Source::Reload, "state_dropped", warning.clone()).warning());
        }
        if rollouts_moved {
            self.rollouts_moved.send_modify(|v| *v += 1);
        }
        for event in ended {
            // The reload's answer names what it ended too.
            warnings.push(event.message().to_string());
            self.events.record(event);
        }
        warnings
    }

    /// Before a binary upgrade: without a state file, writes the runtime state to `path` for
    /// the new process (with one, the file is already current).
    /// Records a `handed_over` event either way.
    pub fn hand_over(&self, path: &Path) -> Result<(), String> {
        let desired = self.lock();
        // Under the writer lock, so that no retiring window ends after the state written here.
        self.handed_over.store(true, Ordering::Relaxed);
        let result = match &self.store {
            // A state the file is behind gets one more try: the new process reads the file.
            Some(store) if desired.unsaved => store
                .save(&desired.state)
                .map(|()| "the runtime state is in the state file"),
            Some(_) => Ok("the runtime state is in the state file"),
            None => StateFile::new(path.to_path_buf())
                .save(&desired.state)
                .map(|()| "the runtime state was written for it"),
        };
        drop(desired);
        // Handed over even when the state was not: the deadlines may be in the state file.
        match self.hand_over_keys(path) {
            Ok(0) => {}
            Ok(n) => info!("the users of {n} retiring backends handed over"),
            Err(e) => warn!("{e}; their users move at the upgrade as if they were draining"),
        }
        let message = match &result {
            Ok(how) => format!("handing the listening sockets over to a new process; {how}"),
            Err(e) => format!(
                "handing the listening sockets over to a new process without the runtime state: {e}"
            ),
        };
        let draft = Draft::new(Source::Upgrade, "handed_over", message);
        self.events.record(if result.is_ok() {
            draft
        } else {
            draft.warning()
        });
        result.map(drop)
    }

    /// Rebuilds the selection structures from the live health of every backend.
    pub fn refresh(&self) {
        let _desired = self.lock();
        let built = self.current.load().rebuilt();
        self.swap(built);
    }

    /// Passive failure detection: counts a failed connect to `backend` of `upstream` and takes
    /// the backend out once the upstream's `max_connect_failures` are reached in a row. An
    /// active health check brings it back; without one it is tried again after the cooldown.
    pub fn connect_failed(self: &Arc<Self>, upstream: &Upstream, backend: &Arc<BackendLive>) {
        let limit = upstream.passive.max_connect_failures;
        if limit == 0 || backend.connect_failed() < limit {
            return;
        }
        if !backend.set_healthy(false) {
            return;
        }
        let back = if upstream.health_check.is_some() {
            "until its health check passes".to_string()
        } else {
            format!("for {:?}", upstream.passive.cooldown)
        };
        self.events.record(
            health_event(Source::Passive, &upstream.name, backend.address, Some(true), false, format!(
                "upstream {} backend {} taken out after {limit} failed connects in a row (passive check), {back}",
                upstream.name, backend.address
            ))
            .warning(),
        );
        self.refresh();
        if upstream.health_check.is_none() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let pool = Arc::clone(self);
                let backend = Arc::clone(backend);
                let cooldown = upstream.passive.cooldown;
                let name = Arc::clone(&upstream.name);
                runtime.spawn(async move {
                    tokio::time::sleep(cooldown).await;
                    backend.connect_succeeded();
                    if backend.set_healthy(true) {
                        pool.events.record(health_event(
                            Source::Passive,
                            &name,
                            backend.address,
                            Some(false),
                            true,
                            format!(
                                "upstream {name} backend {} back in after its cooldown",
                                backend.address
                            ),
                        ));
                        pool.refresh();
                    }
                });
            }
        }
    }

    /// Whether [`Pool::hand_over`] ran: the next process has the state from then on.
    pub fn is_handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Relaxed)
    }

    /// Follows swaps: the receiver sees a new value after each one.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Desired> {
        self.desired.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn swap(&self, next: Snapshot) {
        self.current.store(Arc::new(next));
        self.version.send_modify(|v| *v += 1);
    }
}

/// The live side of the current snapshot's backends: a backend it does not have has nothing
/// in flight and counts as healthy (it was just added and is not checked yet).
impl Live for &Snapshot {
    fn in_flight(&self, upstream: &str, address: std::net::SocketAddr) -> usize {
        self.backend_live(upstream, address)
            .map_or(0, |b| b.in_flight())
    }

    fn healthy(&self, upstream: &str, address: std::net::SocketAddr) -> bool {
        self.backend_live(upstream, address)
            .is_none_or(|b| b.is_healthy())
    }
}

impl Snapshot {
    fn backend_live(&self, upstream: &str, address: std::net::SocketAddr) -> Option<&BackendLive> {
        self.upstream(upstream)?
            .backends
            .iter()
            .find(|b| b.live.address == address)
            .map(|b| &*b.live)
    }
}

/// A backend's health became `healthy` (`was` it before, when known): `backend_healthy` or
/// `backend_unhealthy`.
pub(crate) fn health_event(
    source: Source,
    upstream: &str,
    backend: std::net::SocketAddr,
    was: Option<bool>,
    healthy: bool,
    message: String,
) -> Draft {
    let kind = if healthy {
        "backend_healthy"
    } else {
        "backend_unhealthy"
    };
    let draft = Draft::new(source, kind, message)
        .upstream(upstream)
        .backend(backend)
        .after(json!({ "healthy": healthy }));
    match was {
        Some(was) => draft.before(json!({ "healthy": was })),
        None => draft,
    }
}

/// What a reload changed in the file, by route and upstream name, for its event.
fn config_changes(was: &Config, now: &Config) -> String {
    fn diff<'a, T: PartialEq>(
        kind: &str,
        was: &'a [T],
        now: &'a [T],
        name: impl Fn(&T) -> &str,
        out: &mut Vec<String>,
    ) {
        let find = |list: &'a [T], n: &str| list.iter().find(|t| name(t) == n);
        let names = |list: &'a [T], keep: &dyn Fn(&T) -> bool| {
            list.iter()
                .filter(|t| keep(t))
                .map(|t| name(t).to_string())
                .collect::<Vec<_>>()
        };
        let added = names(now, &|t| find(was, name(t)).is_none());
        let removed = names(was, &|t| find(now, name(t)).is_none());
        let changed = names(now, &|t| find(was, name(t)).is_some_and(|w| w != t));
        for (what, list) in [("added", added), ("removed", removed), ("changed", changed)] {
            if !list.is_empty() {
                out.push(format!("{kind} {what}: {}", list.join(", ")));
            }
        }
    }
    let mut out = Vec::new();
    diff("routes", &was.routes, &now.routes, |r| &r.name, &mut out);
    diff(
        "upstreams",
        &was.upstreams,
        &now.upstreams,
        |u| &u.name,
        &mut out,
    );
    if out.is_empty() {
        "no route or upstream changed".into()
    } else {
        out.join("; ")
    }
}

#[cfg(test)]
mod tests;
