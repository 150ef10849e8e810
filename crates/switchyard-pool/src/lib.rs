//! Switchyard's runtime state and every decision a request needs from it.
//!
//! The request path reads one immutable [`Snapshot`] per request (an `ArcSwap` load, no lock)
//! and picks a route, an upstream and a backend from structures precomputed when the snapshot
//! was built. Anything that changes the state (health transitions now; admin changes and
//! reloads later) builds the next snapshot off the request path and swaps it in. Per-backend
//! live state (health, in-flight count) and per-route/upstream cursors sit in `Arc`s that the
//! next snapshot reuses, so a swap loses none of them.

pub mod health;
mod live;
mod select;
mod snapshot;

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use switchyard_config::Config;
use tokio::sync::watch;

pub use live::{BackendLive, InFlight};
pub use select::smooth_sequence;
pub use snapshot::{strip_port, Backend, BackendState, Route, Snapshot, Upstream};

/// The shared, swappable runtime state of one Switchyard process.
pub struct Pool {
    current: ArcSwap<Snapshot>,
    /// Serialises writers so that two changes never build from the same base.
    writer: Mutex<()>,
    /// Bumped after every swap, for background work that follows the state (health checks).
    version: watch::Sender<u64>,
}

impl Pool {
    pub fn new(config: &Config) -> Pool {
        Pool {
            current: ArcSwap::from_pointee(Snapshot::from_config(config, None)),
            writer: Mutex::new(()),
            version: watch::Sender::new(0),
        }
    }

    /// The current snapshot, kept alive for as long as the caller holds it.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Rebuilds the selection structures from the live health of every backend.
    pub fn refresh(&self) {
        self.update(|current| current.rebuilt());
    }

    /// Follows swaps: the receiver sees a new value after each one.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn update(&self, next: impl FnOnce(&Snapshot) -> Snapshot) {
        let _writer = self
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let built = next(&self.current.load());
        self.current.store(Arc::new(built));
        self.version.send_modify(|v| *v += 1);
    }
}

#[cfg(test)]
mod tests;
