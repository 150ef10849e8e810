//! Per-backend state that outlives snapshots: health and in-flight requests. A snapshot
//! rebuilt for a backend that stays keeps pointing at the same `BackendLive`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct BackendLive {
    pub address: SocketAddr,
    /// Requests of this process (all worker threads) currently sent to this backend.
    in_flight: AtomicUsize,
    healthy: AtomicBool,
    /// Failed connects in a row, for passive failure detection.
    connect_failures: AtomicU32,
}

impl BackendLive {
    pub fn new(address: SocketAddr, healthy: bool) -> Arc<Self> {
        Arc::new(BackendLive {
            address,
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(healthy),
            connect_failures: AtomicU32::new(0),
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
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

    /// Returns whether the value changed.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
    }
}

/// Counts one request against a backend for as long as it lives, so errors, retries and
/// cancelled requests all give the count back.
#[derive(Debug)]
pub struct InFlight(Arc<BackendLive>);

impl InFlight {
    pub fn new(backend: &Arc<BackendLive>) -> Self {
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(backend))
    }

    pub fn backend(&self) -> &BackendLive {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
