//! Per-backend state that outlives snapshots: health and in-flight requests. A snapshot
//! rebuilt for a backend that stays keeps pointing at the same `BackendLive`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::least::{Current, Report};

#[derive(Debug)]
pub struct BackendLive {
    pub address: SocketAddr,
    /// Requests of this process (all worker threads) currently sent to this backend.
    in_flight: AtomicUsize,
    healthy: AtomicBool,
    /// A health check has given its first verdict on this backend: a check restarted later
    /// (its settings changed on reload) goes by `rise` and `fall` from its first result on.
    checked: AtomicBool,
    /// Failed connects in a row, for passive failure detection.
    connect_failures: AtomicU32,
    /// When the backend last came into service, in ms since [`epoch`] (+1; 0: never), for
    /// slow start.
    in_service_since: AtomicU64,
    /// The upstream's pick sequence number of this backend's last pick (0: never), for
    /// least-connections' ties.
    pub(crate) last_pick: AtomicU64,
    /// The upstream's least-connections tree, which learns of every request's start and end.
    pub(crate) least: Arc<Current>,
}

/// A fixed point in time to store instants in atomics.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl BackendLive {
    pub(crate) fn new(address: SocketAddr, healthy: bool, least: Arc<Current>) -> Arc<Self> {
        Arc::new(BackendLive {
            address,
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(healthy),
            checked: AtomicBool::new(false),
            connect_failures: AtomicU32::new(0),
            in_service_since: AtomicU64::new(if healthy { now_mark() } else { 0 }),
            last_pick: AtomicU64::new(0),
            least,
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn last_picked(&self) -> u64 {
        self.last_pick.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Counts a failed connect; returns how many failed in a row.
    pub fn connect_failed(&self) -> u32 {
        self.connect_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A connect succeeded: the run of failures is over. Reads first so that the common case
    /// does not write a shared cache line.
    pub fn connect_succeeded(&self) {
        if self.connect_failures.load(Ordering::Relaxed) != 0 {
            self.connect_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Returns whether the value changed. Becoming healthy starts the slow-start ramp.
    /// Whether a health check has decided this backend's health before.
    pub(crate) fn was_checked(&self) -> bool {
        self.checked.load(Ordering::Relaxed)
    }

    pub(crate) fn mark_checked(&self) {
        self.checked.store(true, Ordering::Relaxed);
    }

    pub fn set_healthy(&self, healthy: bool) -> bool {
        let changed = self.healthy.swap(healthy, Ordering::Relaxed) != healthy;
        if changed && healthy {
            self.in_service_since.store(now_mark(), Ordering::Relaxed);
            self.connect_failures.store(0, Ordering::Relaxed);
        }
        changed
    }

    /// The operator let the backend take traffic again (active after a drain, weight after
    /// 0): for slow start that is coming into service, like a health recovery.
    pub fn back_in_service(&self) {
        if self.is_healthy() {
            self.in_service_since.store(now_mark(), Ordering::Relaxed);
        }
    }

    /// How long the backend has been in service, if it ever was.
    pub fn in_service_for(&self) -> Option<Duration> {
        match self.in_service_since.load(Ordering::Relaxed) {
            0 => None,
            mark => Some(
                epoch()
                    .elapsed()
                    .saturating_sub(Duration::from_millis(mark - 1)),
            ),
        }
    }
}

fn now_mark() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

/// Counts one request against a backend for as long as it lives, so errors, retries and
/// cancelled requests all give the count back. Made by [`crate::Upstream::hold`].
#[derive(Debug)]
pub struct InFlight {
    backend: Arc<BackendLive>,
    /// For least-connections: where the count's changes go.
    report: Option<Report>,
}

impl InFlight {
    pub(crate) fn new(backend: &Arc<BackendLive>, report: Option<Report>) -> Self {
        // SeqCst: a least-connections tree taking over reads the counts after its swap; this
        // count either reaches it through the report below or is read there.
        backend.in_flight.fetch_add(1, Ordering::SeqCst);
        if let Some(report) = &report {
            report.changed(backend);
        }
        InFlight {
            backend: Arc::clone(backend),
            report,
        }
    }

    pub fn backend(&self) -> &BackendLive {
        &self.backend
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(report) = &self.report {
            report.changed(&self.backend);
        }
    }
}
