//! Per-backend state that outlives snapshots: health and in-flight requests. A snapshot
//! rebuilt for a backend that stays keeps pointing at the same `BackendLive`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct BackendLive {
    pub address: SocketAddr,
    /// Requests of this process (all worker threads) currently sent to this backend.
    in_flight: AtomicUsize,
    healthy: AtomicBool,
}

impl BackendLive {
    pub fn new(address: SocketAddr, healthy: bool) -> Arc<Self> {
        Arc::new(BackendLive {
            address,
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(healthy),
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
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
