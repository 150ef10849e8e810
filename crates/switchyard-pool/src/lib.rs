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
mod follow;
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
mod shared;
mod snapshot;
mod state;
mod state_file;
pub mod stats;
pub mod sticky;
pub mod store;
pub mod upstream_tls;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use log::{info, warn};
use serde_json::json;
use switchyard_config::Config;
use tokio::sync::watch;

pub use events::{Draft, Event, Events, Source};
pub use follow::{InstanceStatus, StoreFollower, StoreStatus};
pub use live::{BackendLive, InFlight};
pub use local::{local_failure, LocalErrors, LocalFailure};
pub use metrics::Metrics;
pub use request::Request;
pub use retire::Deadline;
pub use rollout::{Rollout, RolloutCommand, RolloutState, Verdict, WindowRecord};
pub use route::{Pick, Route, Routing};
pub use select::smooth_sequence;
pub use shared::ClusterReading;
pub use snapshot::{Backend, BackendState, Snapshot, Upstream};
pub use state::{Change, Live, Rejection, RuntimeState, STATE_FORMAT};
pub use state_file::StateFile;
pub use stats::{PairStats, StatsReading, Window};
pub use store::{
    InstanceReport, LocalStore, Revision, SharedStore, StateStore, StoreError, StoreInfo,
    StoreUpdate, Stored,
};
pub use upstream_tls::{load_upstream_tls, UpstreamCas};

/// Tries of a change whose compare-and-swap finds that another instance changed the state
/// first; then the change is refused (`409`). Between tries a random pause of up to
/// [`CAS_BACKOFF`] times the try's number: two instances writing in a tight loop would
/// otherwise find each other's write every time.
const CAS_ATTEMPTS: u32 = 10;
const CAS_BACKOFF: Duration = Duration::from_millis(10);
/// No new try after this long: the caller (an admin request) gets its `409` in time.
const CAS_BUDGET: Duration = Duration::from_secs(5);
/// How often a removal looks again whether every instance runs its revision.
const PEER_POLL: Duration = Duration::from_millis(100);

/// The longest this process waits for a shared store's answer, beyond the store's own
/// request timeout.
const STORE_WAIT: Duration = Duration::from_secs(30);

/// The shared, swappable runtime state of one Switchyard process.
pub struct Pool {
    current: ArcSwap<Snapshot>,
    /// What the current snapshot was built from; held briefly, never across a store request.
    desired: Mutex<Desired>,
    /// Orders this process's own changes: held across the store's compare-and-swap, so two
    /// local changes never race each other (other instances' changes are the CAS's job).
    writer: Mutex<()>,
    /// Where the state lives: the state file (or memory) alone, or a shared store.
    store: SharedStore,
    /// The config's state file. With a shared store, the local copy an instance starts from
    /// while the store is unreachable, written after every revision it applies.
    state_file: Option<StateFile>,
    /// With a shared store: this instance's name among the others, and their latest reports.
    name: String,
    peers: ArcSwap<Vec<InstanceReport>>,
    store_up: AtomicBool,
    /// The store's lease was given up (hand-over or stop): no more reports.
    resigned: AtomicBool,
    store_metrics: shared::StoreMetrics,
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

pub(crate) struct Desired {
    config: Config,
    /// The CA certificates `config`'s upstreams name, read with it.
    cas: UpstreamCas,
    /// The runtime state fitted to `config`: what runs.
    state: RuntimeState,
    /// The state as the store holds it (with a shared store, entries only other instances'
    /// configs have too; on one node the same as `state`), and its revision.
    stored: RuntimeState,
    revision: Revision,
    /// What fitting the store's last state to `config` dropped: said once, not at every
    /// revision that still has it.
    dropped: BTreeSet<String>,
    /// The state file is behind `state` (a save failed and the change applied anyway).
    unsaved: bool,
}

impl Desired {
    /// The state as a file holds it: with a shared store, with the revision it was copied at.
    pub(crate) fn copy(&self, shared: bool) -> RuntimeState {
        let mut copy = self.stored.clone();
        copy.store_revision = shared.then_some(self.revision);
        copy
    }
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
        let store = LocalStore::new(config.state_file.clone().map(StateFile::new));
        Pool::with_store(
            config,
            cas,
            metrics,
            handover,
            Arc::new(store),
            String::new(),
        )
    }

    /// [`Pool::new`] on `store`, where this instance is `name` (empty on one node). With a
    /// shared store it starts from the state file (the local copy of the store's last state
    /// it applied) at once, whether or not the store answers; [`Pool::follow_store`] catches
    /// up from there.
    pub fn with_store(
        config: Config,
        cas: UpstreamCas,
        metrics: Arc<Metrics>,
        handover: Option<&Path>,
        store: SharedStore,
        name: String,
    ) -> Result<Pool, String> {
        let is_shared = store.info().shared;
        let file = config.state_file.clone().map(StateFile::new);
        let (saved, origin) = match (&file, handover.filter(|p| p.exists())) {
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
        let info = store.info();
        let loaded = match (origin, &config.state_file) {
            ("state_file", Some(path)) if is_shared => format!(
                "runtime state from the local copy {} (revision {}) until state store {} answers",
                path.display(),
                saved.store_revision.unwrap_or(0),
                info.name
            ),
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
        let revision = if is_shared {
            saved.store_revision.unwrap_or(0)
        } else {
            0
        };
        let mut stored = saved.clone();
        stored.store_revision = None;
        let (state, warnings) = saved.fit(&config);
        for warning in warnings.iter().cloned() {
            events.record(Draft::new(Source::Startup, "state_dropped", warning).warning());
        }
        // Rollouts the file no longer fits (it changed while the process was down) end here.
        for event in rollout::rollout_events(&saved, &state, Source::Startup) {
            events.record(event);
        }
        // What was ended is saved at once: a later start must not bring it back. (With a
        // shared store, the store decides: the local copy is only a copy.)
        if let (Some(file), true, false) = (&file, state.rollouts != saved.rollouts, is_shared) {
            if let Err(e) = file.save(&state) {
                warn!("{e}");
            }
        }
        let stored = if is_shared { stored } else { state.clone() };
        let dropped = if is_shared {
            warnings.iter().cloned().collect()
        } else {
            BTreeSet::new()
        };
        let snapshot = Snapshot::build(&config, &cas, &state, &metrics, None);
        let pool = Pool {
            current: ArcSwap::from_pointee(snapshot),
            desired: Mutex::new(Desired {
                config,
                cas,
                state,
                stored,
                revision,
                dropped,
                unsaved: false,
            }),
            writer: Mutex::new(()),
            state_file: file,
            store,
            name,
            peers: ArcSwap::from_pointee(Vec::new()),
            store_up: AtomicBool::new(!is_shared),
            resigned: AtomicBool::new(false),
            store_metrics: shared::StoreMetrics::new(&metrics),
            local_errors: LocalErrors::new(&metrics),
            metrics,
            version: watch::Sender::new(0),
            rollouts_moved: watch::Sender::new(0),
            events,
            handed_over: AtomicBool::new(false),
        };
        pool.store_metrics.up.set(i64::from(!is_shared));
        pool.store_metrics.driver.set(i64::from(!is_shared));
        pool.store_metrics.revision.set(revision as i64);
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
        // Waited for before the writer lock: the follower goes on applying others' changes.
        let removal = matches!(change, Change::RemoveBackend { .. } | Change::ResetState);
        let started = std::time::Instant::now();
        if removal {
            self.wait_for_peers(started)?;
        }
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        // Only the retire service is stopped here: the admin API refuses changes once the
        // process is closing, and the rollout engine is stopped before the hand-over.
        if source == Source::Retire && self.handed_over.load(Ordering::Relaxed) {
            return Err(Rejection::Conflict(
                "this process handed its state over to a new one, which ends retiring windows from now on".into(),
            ));
        }
        let as_driver = source == Source::Rollout && self.store.info().shared;
        for attempt in 0..CAS_ATTEMPTS {
            if attempt > 0 && started.elapsed() > CAS_BUDGET {
                break;
            }
            if attempt > 0 {
                use std::hash::BuildHasher;
                let random = std::hash::RandomState::new().hash_one(attempt);
                let most = CAS_BACKOFF * attempt;
                std::thread::sleep(most.mul_f64((random % 1000) as f64 / 1000.0));
            }
            // After a conflict brought a newer revision, the instances must catch up with it.
            if attempt > 0 && removal {
                self.wait_for_peers(started)?;
            }
            let (next, stored, revision, why) = {
                let desired = self.lock();
                let current = self.current.load_full();
                let peers = self.peers.load();
                let live = shared::ClusterLive {
                    local: &*current,
                    peers: &peers,
                    me: self,
                };

                let next = desired.state.with_change(&desired.config, change, live)?;
                let stored = shared::merge(&desired.stored, &desired.state, &next);
                let why =
                    state::change_event(&desired.config, &desired.state, &next, change, source)
                        .first()
                        .map_or_else(|| format!("{change:?}"), |e| e.message().to_string());
                (next, stored, desired.revision, why)
            };
            let written = self.wait({
                let store = Arc::clone(&self.store);
                let stored = stored.clone();
                async move {
                    store
                        .compare_and_swap(&stored, revision, as_driver, &why)
                        .await
                }
            });
            let (revision, unsaved) = match written {
                Ok(revision) => (revision, None),
                Err(StoreError::NotSaved(e)) if even_unsaved => (revision, Some(e)),
                Err(StoreError::Conflict { current }) => {
                    // Another instance was first: take its state and build the change again.
                    match current {
                        Some(current) => self.adopt(*current),
                        None => self.adopt_nothing(),
                    }
                    continue;
                }
                Err(e @ StoreError::Unavailable { .. }) => {
                    self.store_down(&e.to_string());
                    return Err(Rejection::Unavailable(e.to_string()));
                }
                Err(StoreError::NotDriver { store }) => {
                    return Err(Rejection::Conflict(format!(
                        "this instance is no longer the rollout driver (its lease in state store {store} is gone); the new driver goes on"
                    )))
                }
                Err(e) => return Err(Rejection::Storage(e.to_string())),
            };
            self.commit(change, source, next, stored, revision, unsaved);
            return Ok(());
        }
        Err(Rejection::Conflict(format!(
            "the state in {} kept changing while this change was being made (other instances are changing it; tried up to {CAS_ATTEMPTS} times within {CAS_BUDGET:?}): try again",
            self.store.info().name
        )))
    }

    /// A removal counts every instance's requests in flight from their reports: one that
    /// still runs an older revision may not have applied the drain yet, so it is waited for
    /// (its next report comes within a second), up to the retries' budget.
    fn wait_for_peers(&self, started: std::time::Instant) -> Result<(), Rejection> {
        loop {
            let behind = self.behind(self.lock().revision);
            if behind.is_empty() {
                return Ok(());
            }
            if started.elapsed() > CAS_BUDGET {
                return Err(Rejection::Conflict(format!(
                    "instances still run an older state: {}; retry once they have caught up",
                    behind.join(", ")
                )));
            }
            std::thread::sleep(PEER_POLL);
        }
    }

    /// Runs `next` (and `stored`, the store's side of it, at `revision`) after the store took
    /// it: the next snapshot, the events, the local copy.
    fn commit(
        &self,
        change: &Change,
        source: Source,
        next: RuntimeState,
        stored: RuntimeState,
        revision: Revision,
        unsaved: Option<String>,
    ) {
        let mut desired = self.lock();
        let current = self.current.load_full();
        // A rollout's progress that leaves every split, rollout pair and match step as it was
        // (a judged window, hold time) needs no new snapshot: selection would be rebuilt for
        // nothing.
        let rebuild = next.splits != desired.state.splits
            || next.upstreams != desired.state.upstreams
            || next.rollouts_in_snapshot() != desired.state.rollouts_in_snapshot();
        let rollouts_moved = next.rollouts != desired.state.rollouts;
        let events = state::change_event(&desired.config, &desired.state, &next, change, source);
        if unsaved.is_none() {
            desired.unsaved = false;
        }
        if rebuild {
            let built = Snapshot::build(
                &desired.config,
                &desired.cas,
                &next,
                &self.metrics,
                Some(&current),
            );
            self.swap(built);
        }
        desired.state = next;
        desired.stored = stored;
        desired.revision = revision;
        self.store_metrics.revision.set(revision as i64);
        let copy = self.local_copy(&desired);
        if rollouts_moved {
            self.rollouts_moved.send_modify(|v| *v += 1);
        }
        // Under the lock, so that events are in the order the changes were made.
        if let Some(e) = unsaved {
            // Said once, until a save works again.
            if !std::mem::replace(&mut desired.unsaved, true) {
                self.events.record(
                    Draft::new(
                        source,
                        "state_not_saved",
                        format!("{e}; the rollout engine's changes apply anyway, in memory only, until a save works again: a restart now would not know them"),
                    )
                    .warning(),
                );
            } else {
                warn!("{e}");
            }
        }
        for event in events {
            self.events.record(event);
        }
        drop(desired);
        self.write_local_copy(copy);
    }

    /// Runs a store request to its end. The local store's requests finish without waiting;
    /// a shared store's run on its own runtime, bounded by its request timeout (and by
    /// [`STORE_WAIT`] here, should it hang anyway).
    fn wait<T: Send + 'static>(
        &self,
        request: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let unavailable = |reason: &str| StoreError::Unavailable {
            store: self.store.info().name,
            reason: reason.into(),
        };
        match self.store.runtime() {
            None => {
                let mut request = std::pin::pin!(request);
                let mut context = std::task::Context::from_waker(std::task::Waker::noop());
                match request.as_mut().poll(&mut context) {
                    std::task::Poll::Ready(result) => result,
                    std::task::Poll::Pending => {
                        Err(unavailable("a local store request did not finish at once"))
                    }
                }
            }
            Some(runtime) => {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                runtime.spawn(async move {
                    let _ = tx.send(request.await);
                });
                rx.recv_timeout(STORE_WAIT)
                    .unwrap_or_else(|_| Err(unavailable("no answer in time")))
            }
        }
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
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut desired = self.lock();
        let shared = self.store.info().shared;
        // With a shared store the store's state is fitted again (an entry the old config
        // dropped may fit the new one); nothing is written back: what this config does not
        // have stays in the store for the instances whose config has it.
        let base = if shared {
            &desired.stored
        } else {
            &desired.state
        };
        let (state, mut warnings) = base.fit(&config);
        if !shared && state != desired.state {
            if let Some(file) = self.local_file() {
                if let Err(e) = file.save(&state) {
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
        let stored = if shared {
            desired.stored.clone()
        } else {
            state.clone()
        };
        let dropped = if shared {
            warnings.iter().cloned().collect()
        } else {
            BTreeSet::new()
        };
        *desired = Desired {
            config,
            cas,
            state,
            stored,
            revision: desired.revision,
            dropped,
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
        // The next process drives from now on: the driver's key goes at once, not when this
        // one's shutdown begins seconds later.
        self.resign();
        // One node: under the writer lock, so that no retiring window ends after the state
        // written here. A shared store's changes are in the store, where the next process
        // reads them: a change being written there must not hold the sockets' hand-over up.
        let shared = self.store.info().shared;
        let _writer = (!shared).then(|| self.writer.lock().unwrap_or_else(|p| p.into_inner()));
        let desired = self.lock();
        self.handed_over.store(true, Ordering::Relaxed);
        let result = match self.local_file() {
            // Written now from what runs, whatever the copy last written says.
            Some(file) if shared => file
                .save(&desired.copy(shared))
                .map(|()| "the runtime state is in the local copy of the state store"),
            // A state the file is behind gets one more try: the new process reads the file.
            Some(file) if desired.unsaved => file
                .save(&desired.state)
                .map(|()| "the runtime state is in the state file"),
            Some(_) => Ok("the runtime state is in the state file"),
            None => {
                // With a shared store, the new process starts from the store's state at
                // this revision and catches up from there.
                StateFile::new(path.to_path_buf())
                    .save(&desired.copy(shared))
                    .map(|()| "the runtime state was written for it")
            }
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

    /// The state file this process writes: the single-node store's, or the shared store's
    /// local copy.
    fn local_file(&self) -> Option<&StateFile> {
        self.state_file.as_ref()
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
