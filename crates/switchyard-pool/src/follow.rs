//! Following a shared store: states other instances wrote are applied through the same
//! snapshot swap as a local change (checked against this instance's config first), the
//! store's health is told in events and metrics, and once a second this instance reports what
//! only it knows (its rollout counters, its requests in flight) and reads the others'.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

use crate::events::{Draft, Source};
use crate::shared::ClusterReading;
use crate::snapshot::Snapshot;
use crate::state::RuntimeState;
use crate::store::{InstanceReport, Revision, StoreInfo, StoreUpdate, Stored};
use crate::{rollout, Pool};

/// How often an instance reports to the others (and reads their reports).
const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// The store as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StoreStatus {
    #[serde(flatten)]
    pub info: StoreInfo,
    /// This instance's name among the others (empty on one node).
    pub instance: String,
    pub up: bool,
    /// The revision of the state this instance runs.
    pub revision: Revision,
    /// This instance drives rollouts.
    pub driver: bool,
    /// Every live instance's last report: its name, revision and whether it drives.
    pub instances: Vec<InstanceStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    pub name: String,
    pub pid: u32,
    pub revision: Revision,
    pub driver: bool,
    /// Its requests in flight, upstream -> backend -> count (backends with any): what a
    /// `DELETE` of a backend waits for on every instance.
    pub in_flight:
        std::collections::BTreeMap<String, std::collections::BTreeMap<std::net::SocketAddr, usize>>,
}

impl Pool {
    /// Applies a state the store holds (written by another instance, or listed again),
    /// fitted to this instance's config; what does not fit is dropped here with a warning
    /// said once, and kept in the store for the instances whose config has it.
    pub(crate) fn adopt(&self, stored: Stored) {
        self.adopt_as(stored, None);
    }

    fn adopt_as(&self, stored: Stored, reset: Option<&str>) {
        let mut desired = self.lock();
        let mut raw = stored.state;
        raw.store_revision = None;
        if stored.revision == desired.revision && raw == desired.stored {
            return;
        }
        let (fitted, warnings) = raw.fit(&desired.config);
        let dropped: BTreeSet<String> = warnings.into_iter().collect();
        for warning in dropped.difference(&desired.dropped) {
            self.events.record(
                Draft::new(
                    Source::Store,
                    "state_dropped",
                    format!("{warning} (kept in the store for the instances whose config has it)"),
                )
                .warning(),
            );
        }
        let before: BTreeSet<String> = desired.state.overrides().into_iter().collect();
        let after: BTreeSet<String> = fitted.overrides().into_iter().collect();
        let store = self.store.info().name;
        if let Some(reason) = reset {
            self.events.record(
                Draft::new(
                    Source::Store,
                    "state_store_reset",
                    format!("state store {store} was reset ({reason}): running its state at revision {} as it is now", stored.revision),
                )
                .warning(),
            );
        }
        if before != after {
            let now: Vec<&String> = after.difference(&before).collect();
            let gone: Vec<&String> = before.difference(&after).collect();
            let mut what = Vec::new();
            if !now.is_empty() {
                what.push(format!("now {}", join(&now)));
            }
            if !gone.is_empty() {
                what.push(format!("no longer {}", join(&gone)));
            }
            self.events.record(
                Draft::new(
                    Source::Store,
                    "state_changed",
                    format!(
                        "revision {} from state store {store}: {}",
                        stored.revision,
                        what.join("; ")
                    ),
                )
                .after(json!({ "revision": stored.revision, "now": now, "no_longer": gone })),
            );
        }
        for event in rollout::rollout_events(&desired.state, &fitted, Source::Store) {
            self.events.record(event);
        }
        let rebuild = fitted.splits != desired.state.splits
            || fitted.upstreams != desired.state.upstreams
            || fitted.rollouts_in_snapshot() != desired.state.rollouts_in_snapshot();
        let rollouts_moved = fitted.rollouts != desired.state.rollouts;
        if rebuild {
            let current = self.current.load_full();
            let built = Snapshot::build(
                &desired.config,
                &desired.cas,
                &fitted,
                &self.metrics,
                Some(&current),
            );
            self.swap(built);
        }
        desired.state = fitted;
        desired.stored = raw;
        desired.revision = stored.revision;
        desired.dropped = dropped;
        self.store_metrics.revision.set(stored.revision as i64);
        let copy = self.local_copy(&desired);
        drop(desired);
        self.write_local_copy(copy);
        if rollouts_moved {
            self.rollouts_moved.send_modify(|v| *v += 1);
        }
    }

    /// The store holds nothing where this instance had a state: from now on writes start
    /// from revision 0, so that the next one puts the whole state back. Never applied as an
    /// empty state: a wiped store is no reason to drop every split and drain.
    pub(crate) fn adopt_nothing(&self) {
        let mut desired = self.lock();
        if desired.revision != 0 {
            self.events.record(
                Draft::new(
                    Source::Store,
                    "state_store_empty",
                    format!(
                        "state store {} holds no state (wiped or new); this instance keeps its own (revision {}) and writes it back",
                        self.store.info().name,
                        desired.revision
                    ),
                )
                .warning(),
            );
        }
        desired.revision = 0;
    }

    /// Writes this instance's state into an empty store, unless another instance did first
    /// (then its state is taken). Nothing is written for a state that has nothing in it.
    fn reseed(&self) {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.adopt_nothing();
        let stored = self.lock().stored.clone();
        if stored.splits.is_empty() && stored.upstreams.is_empty() && stored.rollouts.is_empty() {
            return;
        }
        let store = Arc::clone(&self.store);
        let state = stored.clone();
        let written = self.wait(async move {
            store
                .compare_and_swap(&state, 0, false, "the store was empty: state written back")
                .await
        });
        match written {
            Ok(revision) => {
                let mut desired = self.lock();
                desired.revision = revision;
                self.store_metrics.revision.set(revision as i64);
                let copy = self.local_copy(&desired);
                drop(desired);
                self.write_local_copy(copy);
                info!("state written back into the empty state store at revision {revision}");
            }
            Err(crate::StoreError::Conflict {
                current: Some(current),
            }) => self.adopt(*current),
            Err(e) => warn!("cannot write the state back into the empty state store: {e}"),
        }
    }

    /// The store stopped answering: said once (event, metric) until it answers again.
    pub(crate) fn store_down(&self, reason: &str) {
        if !self.store.info().shared {
            return;
        }
        if self.store_up.swap(false, Ordering::AcqRel) {
            self.store_metrics.up.set(0);
            self.events.record(
                Draft::new(
                    Source::Store,
                    "state_store_down",
                    format!(
                        "state store {} does not answer ({reason}): serving the last state (revision {}); admin changes are refused until it answers",
                        self.store.info().name,
                        self.lock().revision
                    ),
                )
                .warning(),
            );
        }
    }

    fn store_answers(&self) {
        if !self.store_up.swap(true, Ordering::AcqRel) {
            self.store_metrics.up.set(1);
            self.events.record(Draft::new(
                Source::Store,
                "state_store_up",
                format!("state store {} answers", self.store.info().name),
            ));
        }
    }

    /// What the local copy gets after the revision `desired` is at, taken under the state
    /// lock; written by [`Pool::write_local_copy`] once the lock is released (requests that
    /// refresh the snapshot take it too, and a save fsyncs).
    pub(crate) fn local_copy(&self, desired: &crate::Desired) -> Option<RuntimeState> {
        if !self.store.info().shared || self.state_file.is_none() {
            return None;
        }
        Some(desired.copy(true))
    }

    /// Writes the local copy. Every caller holds the writer lock, so copies land in the order
    /// of their revisions; after a hand-over the next process owns the file.
    pub(crate) fn write_local_copy(&self, copy: Option<RuntimeState>) {
        let (Some(copy), Some(file)) = (copy, &self.state_file) else {
            return;
        };
        if self.handed_over.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = file.save(&copy) {
            warn!("{e} (the local copy of the shared state)");
        }
    }

    /// Follows a shared store: applies what others write, keeps reporting. At `shutdown` it
    /// steps down as the rollout driver and goes on following while the process serves.
    /// Returns at once on one node.
    pub async fn follow_store(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if !self.store.info().shared {
            return;
        }
        let from = self.lock().revision;
        let mut updates = self.store.watch(from);
        let mut report = tokio::time::interval(REPORT_INTERVAL);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                update = updates.recv() => match update {
                    Some(update) => {
                        let pool = Arc::clone(&self);
                        // Applying may write (an empty store gets our state back): off the
                        // async threads, as every store write of the pool waits for its answer.
                        let _ = tokio::task::spawn_blocking(move || pool.on_update(update)).await;
                    }
                    None => return,
                },
                _ = report.tick() => self.report().await,
                _ = shutdown.changed(), if !*shutdown.borrow() => {
                    // Stopping: another instance drives at once; the states others write
                    // are still applied, and this one still reports, while its open
                    // connections finish.
                    if *shutdown.borrow() {
                        self.resign();
                    }
                }
            }
        }
    }

    fn on_update(&self, update: StoreUpdate) {
        // After any change of this process's own that is being written: its revision is
        // then known, and the watch's copy of it is not taken for someone else's.
        let writer = || self.writer.lock().unwrap_or_else(|p| p.into_inner());
        match update {
            StoreUpdate::State(stored) => {
                self.store_answers();
                let _writer = writer();
                // Ours (applied at the write) or older than what a conflict already brought.
                if stored.revision > self.lock().revision {
                    self.adopt(stored);
                }
            }
            StoreUpdate::Reset {
                state: Some(stored),
                reason,
            } => {
                self.store_answers();
                let _writer = writer();
                self.adopt_as(stored, Some(&reason));
            }
            StoreUpdate::Reset { state: None, .. } | StoreUpdate::Empty { .. } => {
                self.store_answers();
                self.reseed();
            }
            StoreUpdate::Up => self.store_answers(),
            StoreUpdate::Down(reason) => self.store_down(&reason),
            StoreUpdate::Unreadable { revision, reason } => {
                self.store_metrics.refused.inc();
                self.events.record(
                    Draft::new(
                        Source::Store,
                        "state_refused",
                        format!(
                            "state store {} holds a state this instance cannot apply at revision {revision}: {reason}; it keeps running revision {}",
                            self.store.info().name,
                            self.lock().revision
                        ),
                    )
                    .warning(),
                );
            }
        }
    }

    /// Stops driving rollouts for good (at a hand-over, or a stop): the driver's key goes
    /// at once, on the store's runtime, without waiting (a hand-over must send the sockets
    /// in time, whatever etcd does). Reports go on while the process serves. Once only;
    /// nothing on one node.
    pub(crate) fn resign(&self) {
        if !self.store.info().shared || self.resigned.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(runtime) = self.store.runtime() {
            let store = Arc::clone(&self.store);
            runtime.spawn(async move { store.resign().await });
        }
        self.store_metrics.driver.set(0);
        info!("no longer driving rollouts: the rollout driver's key is given up");
    }

    /// Publishes this instance's report and takes everyone's.
    async fn report(&self) {
        let driver = *self.store.driver().borrow();
        self.store_metrics.driver.set(i64::from(driver));
        let mine = self.own_report(driver);
        match self.store.report(&mine).await {
            Ok(all) => {
                self.store_answers();
                self.peers.store(Arc::new(all));
            }
            Err(e @ crate::StoreError::Unavailable { .. }) => self.store_down(&e.to_string()),
            Err(e) => warn!("cannot report to the state store: {e}"),
        }
    }

    fn own_report(&self, driver: bool) -> InstanceReport {
        let (revision, running) = {
            let desired = self.lock();
            let running: Vec<(String, String, String)> = desired
                .state
                .rollouts
                .values()
                .filter(|r| r.state.is_active())
                .map(|r| (r.route.clone(), r.to.clone(), r.from.clone()))
                .collect();
            (desired.revision, running)
        };
        let mut report = InstanceReport {
            name: self.name.clone(),
            pid: std::process::id(),
            revision,
            driver,
            ..InstanceReport::default()
        };
        for (route, to, from) in running {
            let pairs = report.pairs.entry(route.clone()).or_default();
            for upstream in [to, from] {
                let reading = self.pair_stats(&route, &upstream).read();
                pairs.insert(upstream, reading);
            }
        }
        // Only where a removal waits for it: backends this instance no longer sends new
        // requests to. (An instance still at an older revision is refused apart.)
        let snapshot = self.snapshot();
        for upstream in &snapshot.upstreams {
            for backend in &upstream.backends {
                let n = backend.live.in_flight();
                if n > 0 && backend.state != crate::BackendState::Active {
                    report
                        .in_flight
                        .entry(upstream.name.to_string())
                        .or_default()
                        .insert(backend.live.address, n);
                }
            }
        }
        report
    }

    /// `route` → `upstream`'s counters over every instance: this one's now, the others' as
    /// last reported. What the rollout driver judges its windows on.
    pub fn cluster_reading(&self, route: &str, upstream: &str) -> ClusterReading {
        let mut reading = ClusterReading::default();
        let me = std::process::id();
        reading.by_instance.insert(
            format!("{}@{me}", self.name),
            self.pair_stats(route, upstream).read(),
        );
        for peer in self.peers.load().iter().filter(|p| !self.is_me(p)) {
            if let Some(r) = peer.pairs.get(route).and_then(|p| p.get(upstream)) {
                reading
                    .by_instance
                    .insert(format!("{}@{}", peer.name, peer.pid), r.clone());
            }
        }
        reading
    }

    /// Whether `report` is this process's own.
    pub(crate) fn is_me(&self, report: &InstanceReport) -> bool {
        report.name == self.name && report.pid == std::process::id()
    }

    /// Instances that still run a revision before `revision`: a removal waits for them,
    /// since their reports may predate the drain it relies on.
    pub(crate) fn behind(&self, revision: Revision) -> Vec<String> {
        self.peers
            .load()
            .iter()
            .filter(|p| !self.is_me(p) && p.revision < revision)
            .map(|p| format!("{} (pid {}, revision {})", p.name, p.pid, p.revision))
            .collect()
    }

    /// Whether this instance drives rollouts now (always on one node).
    pub fn is_driver(&self) -> bool {
        *self.store.driver().borrow()
    }

    /// The store, this instance's place in it, and every live instance.
    pub fn store_status(&self) -> StoreStatus {
        let info = self.store.info();
        let driver = self.is_driver();
        let revision = self.lock().revision;
        let instances = if info.shared {
            self.peers
                .load()
                .iter()
                .map(|p| InstanceStatus {
                    name: p.name.clone(),
                    pid: p.pid,
                    revision: p.revision,
                    driver: p.driver,
                    in_flight: p.in_flight.clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        StoreStatus {
            info,
            instance: self.name.clone(),
            up: self.store_up.load(Ordering::Acquire),
            revision,
            driver,
            instances,
        }
    }
}

/// The background service that follows a shared store (nothing to do on one node).
pub struct StoreFollower(Arc<Pool>);

impl StoreFollower {
    pub fn new(pool: Arc<Pool>) -> StoreFollower {
        StoreFollower(pool)
    }
}

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for StoreFollower {
    async fn start(&self, shutdown: pingora_core::server::ShutdownWatch) {
        Arc::clone(&self.0).follow_store(shutdown).await;
    }
}

fn join(items: &[&String]) -> String {
    items
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
