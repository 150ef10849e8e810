//! Where the runtime state lives: the one small interface behind which the pool keeps it,
//! whether that is this process's state file (one node) or a store shared by several
//! balancers (etcd, in `switchyard-etcd`). The pool, the admin API and the rollout engine
//! only ever see [`StateStore`].
//!
//! The interface is what a shared store needs and a file has trivially: a [`Revision`] per
//! written state, a compare-and-swap on it (so that two instances changing the state at once
//! never lose one of the changes), a stream of states others wrote, a lease that says which
//! instance drives rollouts, and a place where each instance reports what only it knows
//! (its window counters, its in-flight requests).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::state::RuntimeState;
use crate::state_file::StateFile;
use crate::stats::StatsReading;

/// The store's version of the state: etcd's `mod_revision` of the state key, or a counter of
/// the saves this process made on one node. `0`: nothing stored yet.
pub type Revision = u64;

/// A state as the store holds it, with the revision it was written at.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub state: RuntimeState,
    pub revision: Revision,
}

/// Why the store did not do what was asked; callers tell these apart: a conflict is retried
/// on the newer state, an unreachable store is `503`, a refusal is `500`.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreError {
    /// The state changed since the revision the write was built on; `current` is what the
    /// store holds now (`None`: nothing).
    Conflict { current: Option<Box<Stored>> },
    /// The store did not answer (down, partitioned, timed out).
    Unavailable { store: String, reason: String },
    /// The store answered but refused, or holds something this binary cannot read.
    Refused { store: String, reason: String },
    /// A write guarded by the rollout driver's lease, from an instance that no longer holds it.
    NotDriver { store: String },
    /// One node: the state file could not be written. The state is this process's own, so
    /// the caller may decide to apply the change anyway (the rollout engine does).
    NotSaved(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Conflict { current } => match current {
                Some(c) => write!(
                    f,
                    "the state changed meanwhile (now at revision {})",
                    c.revision
                ),
                None => f.write_str("the state changed meanwhile (it is gone from the store)"),
            },
            StoreError::Unavailable { store, reason } => {
                write!(f, "state store {store} is unreachable: {reason}")
            }
            StoreError::Refused { store, reason } => {
                write!(f, "state store {store} refused: {reason}")
            }
            StoreError::NotDriver { store } => write!(
                f,
                "this instance is no longer the rollout driver (lease lost in state store {store})"
            ),
            StoreError::NotSaved(reason) => f.write_str(reason),
        }
    }
}

/// What the store tells the instance that follows it.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreUpdate {
    /// A state written by anyone (this instance too), newer than the last one delivered.
    State(Stored),
    /// The store has no state at all (a new or wiped cluster): never a reason to apply an
    /// empty state; the follower writes back what it has.
    Empty { revision: Revision },
    /// The store was wiped, restored from a backup or replaced by another cluster (its
    /// revision went backwards, its cluster ID changed): what it holds now, listed again,
    /// whatever its revision. `None`: it holds nothing, which the follower never applies as
    /// an empty state (it writes back what it has).
    Reset {
        state: Option<Stored>,
        reason: String,
    },
    /// The store answered again (after `Down`, or for the first time).
    Up,
    /// The store stopped answering; the reason names it.
    Down(String),
    /// The state cannot be read (bad JSON, a newer format): refused, the old state stays.
    Unreadable { revision: Revision, reason: String },
}

/// What one instance reports to the others about what only it knows: refreshed every second
/// under a lease, so that the report of an instance that died goes with it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceReport {
    /// The instance's name (`state_store.etcd.name`).
    pub name: String,
    /// Its process: during a binary upgrade two processes run under one name, and each one's
    /// counters and requests in flight are its own.
    #[serde(default)]
    pub pid: u32,
    /// The revision of the state it runs.
    pub revision: Revision,
    /// It holds the rollout driver's lease.
    pub driver: bool,
    /// Its own counters of every pair of a running rollout, route -> upstream -> reading.
    #[serde(default)]
    pub pairs: BTreeMap<String, BTreeMap<String, StatsReading>>,
    /// Its requests in flight, upstream -> backend -> count, for backends with any.
    #[serde(default)]
    pub in_flight: BTreeMap<String, BTreeMap<SocketAddr, usize>>,
}

/// How the store shows itself in the admin API and in messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreInfo {
    /// `"file"`, `"memory"` or `"etcd"`.
    pub kind: &'static str,
    /// What messages call it: the file's path, or `etcd http://a:2379,http://b:2379 /prefix`.
    pub name: String,
    /// Shared with other instances: they are listed and a lease decides the rollout driver.
    pub shared: bool,
}

/// The runtime state's home. Implementations keep their own connection (and its reconnects)
/// and never block the caller beyond their request timeout.
#[async_trait]
pub trait StateStore: Send + Sync {
    fn info(&self) -> StoreInfo;

    /// The runtime the store's requests run on, for callers outside any runtime or on a
    /// runtime of their own (the pool's change path is synchronous and waits for the answer
    /// there). `None`: its requests finish without waiting (the local store).
    fn runtime(&self) -> Option<tokio::runtime::Handle>;

    /// The stored state, or `None` when nothing is stored yet.
    async fn load(&self) -> Result<Option<Stored>, StoreError>;

    /// Writes `next` if the store is still at `expected` (`0`: nothing stored), returning
    /// the new revision. With `as_driver`, only while this instance holds the rollout
    /// driver's lease (a deposed driver's write fails with [`StoreError::NotDriver`]).
    /// `why` says what the change is (the event's message), for the store's audit trail.
    async fn compare_and_swap(
        &self,
        next: &RuntimeState,
        expected: Revision,
        as_driver: bool,
        why: &str,
    ) -> Result<Revision, StoreError>;

    /// Follows the store from `from` on: every newer state, and the store's health. The
    /// stream ends only when the store is dropped. A single node never sends anything.
    fn watch(&self, from: Revision) -> mpsc::Receiver<StoreUpdate>;

    /// Whether this instance drives rollouts: always on one node; with a shared store, while
    /// it holds the lease (campaigned for in the background).
    fn driver(&self) -> watch::Receiver<bool>;

    /// Publishes this instance's report (replacing the last one) and returns every live
    /// instance's latest, this one's included. A single node returns its own alone.
    async fn report(&self, mine: &InstanceReport) -> Result<Vec<InstanceReport>, StoreError>;

    /// At a stop or a hand-over: stops driving rollouts for good and gives the driver's key
    /// up at once, so that another instance takes over without waiting for the lease to run
    /// out. The report stays (its requests in flight still count) until the process ends.
    async fn resign(&self);
}

/// The single-node store: the state file when the config names one, else memory. The
/// revision counts this process's saves; nobody else writes.
pub struct LocalStore {
    file: Option<StateFile>,
    revision: std::sync::atomic::AtomicU64,
    driver: watch::Sender<bool>,
    /// Keeps every watch stream open (and silent) for as long as the store lives.
    watchers: std::sync::Mutex<Vec<mpsc::Sender<StoreUpdate>>>,
}

impl LocalStore {
    pub fn new(file: Option<StateFile>) -> LocalStore {
        LocalStore {
            file,
            revision: std::sync::atomic::AtomicU64::new(0),
            driver: watch::Sender::new(true),
            watchers: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub fn file(&self) -> Option<&StateFile> {
        self.file.as_ref()
    }
}

#[async_trait]
impl StateStore for LocalStore {
    fn info(&self) -> StoreInfo {
        match &self.file {
            Some(file) => StoreInfo {
                kind: "file",
                name: file.path().display().to_string(),
                shared: false,
            },
            None => StoreInfo {
                kind: "memory",
                name: "memory (no state_file)".into(),
                shared: false,
            },
        }
    }

    fn runtime(&self) -> Option<tokio::runtime::Handle> {
        None
    }

    async fn load(&self) -> Result<Option<Stored>, StoreError> {
        // The pool reads the file itself at start, before any runtime exists.
        Ok(None)
    }

    async fn compare_and_swap(
        &self,
        next: &RuntimeState,
        _expected: Revision,
        _as_driver: bool,
        _why: &str,
    ) -> Result<Revision, StoreError> {
        use std::sync::atomic::Ordering;
        // Nobody else writes: the pool's writer lock orders this process's changes.
        if let Some(file) = &self.file {
            file.save(next).map_err(StoreError::NotSaved)?;
        }
        Ok(self.revision.fetch_add(1, Ordering::AcqRel) + 1)
    }

    fn watch(&self, _from: Revision) -> mpsc::Receiver<StoreUpdate> {
        let (tx, rx) = mpsc::channel(1);
        if let Ok(mut watchers) = self.watchers.lock() {
            watchers.push(tx);
        }
        rx
    }

    fn driver(&self) -> watch::Receiver<bool> {
        self.driver.subscribe()
    }

    async fn report(&self, mine: &InstanceReport) -> Result<Vec<InstanceReport>, StoreError> {
        Ok(vec![mine.clone()])
    }

    async fn resign(&self) {}
}

/// A store shared by the pool and whoever follows it.
pub type SharedStore = Arc<dyn StateStore>;
