//! Retiring a backend of a hash upstream (`ip_hash`, `hash`): the users it has keep reaching
//! it until a deadline, new users go elsewhere; then it is draining. What nginx Plus and
//! HAProxy do for sticky sessions on a server being taken out; `draining` keeps its meaning
//! (no new requests at all).
//!
//! "The users it has" are the keys it was picked for recently, in each backend's
//! [`KeyFilter`](crate::keys::KeyFilter). While a backend retires its points stay on the ring:
//! a request whose key finds it first goes there when its filter knows the key, and else on
//! round the ring past it, which is where the key goes once the backend is gone, so that a new
//! user moves never and an old one once. A retiring backend records nothing and its filter
//! stops rotating: its users are those of the moment it started to retire.
//!
//! Time passes here, in one background service: it rotates the filters (each generation
//! lasts the upstream's `retire_timeout`) and ends every retiring window whose deadline has
//! come, through [`Pool::apply`] like any change (saved, and recorded as an event of source
//! `retire`). Deadlines are wall-clock times, so they hold across a restart or an upgrade.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chrono::DateTime;
use log::{debug, warn};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::events::{format_time, Source};
use crate::snapshot::Snapshot;
use crate::state::{Change, Rejection};
use crate::Pool;

/// The longest the service sleeps: a wall clock that was set meanwhile is followed by then.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// When a retiring backend becomes draining: a wall-clock time in whole milliseconds,
/// written in RFC 3339 (UTC) in the state file and the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline {
    unix_ms: u64,
}

impl Deadline {
    /// `timeout` after `now`.
    pub fn after(now: SystemTime, timeout: Duration) -> Deadline {
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let ms = now.saturating_add(timeout).as_millis();
        Deadline {
            unix_ms: u64::try_from(ms).unwrap_or(u64::MAX),
        }
    }

    pub fn time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.unix_ms)
    }

    /// How long until the deadline (zero once it has come).
    pub fn remaining(self, now: SystemTime) -> Duration {
        self.time().duration_since(now).unwrap_or_default()
    }

    pub fn is_due(self, now: SystemTime) -> bool {
        self.time() <= now
    }
}

impl std::fmt::Display for Deadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format_time(self.time()))
    }
}

impl serde::Serialize for Deadline {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Deadline {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let time = DateTime::parse_from_rfc3339(&text).map_err(|e| {
            serde::de::Error::custom(format!("until: {text:?} is not an RFC 3339 time: {e}"))
        })?;
        let unix_ms = u64::try_from(time.timestamp_millis())
            .map_err(|_| serde::de::Error::custom(format!("until: {text:?} is before 1970")))?;
        Ok(Deadline { unix_ms })
    }
}

impl Pool {
    /// Ends every retiring window due at `now`: its backend becomes draining (source
    /// `retire`). Returns the first deadline still to come.
    pub fn end_due_retirements(&self, now: SystemTime) -> Option<Deadline> {
        let snapshot = self.snapshot();
        let mut next = None;
        for upstream in &snapshot.upstreams {
            for backend in &upstream.backends {
                let Some(until) = backend.state.retiring_until() else {
                    continue;
                };
                if !until.is_due(now) {
                    next = Some(next.map_or(until, |n: Deadline| n.min(until)));
                    continue;
                }
                let change = Change::EndRetiring {
                    upstream: upstream.name.to_string(),
                    address: backend.live.address,
                    until,
                };
                match self.apply(&change, Source::Retire) {
                    Ok(()) => {}
                    // An admin change came first (the backend is no longer retiring, or to
                    // another deadline): it decides.
                    Err(Rejection::Conflict(why) | Rejection::NotFound(why)) => {
                        debug!("retire: {why}")
                    }
                    // The backend keeps its users a while longer, the safe side; tried again
                    // at the next tick.
                    Err(e) => warn!(
                        "upstream {} backend {}: cannot end its retiring: {e}",
                        upstream.name, backend.live.address
                    ),
                }
            }
        }
        next
    }
}

/// Rotates the key filters of every ring backend that is not retiring, at `now_ms` of the
/// service's monotonic clock. Returns how long until the next rotation, if any filter has one.
fn rotate_filters(snapshot: &Snapshot, now_ms: u64) -> Option<Duration> {
    let mut next: Option<Duration> = None;
    for upstream in &snapshot.upstreams {
        for backend in &upstream.backends {
            let Some(keys) = &backend.keys else {
                continue;
            };
            if backend.state.retiring_until().is_some() {
                continue;
            }
            let due = keys.rotate_if_due(now_ms, upstream.retire_timeout);
            next = Some(next.map_or(due, |n| n.min(due)));
        }
    }
    next
}

/// The background service that rotates key filters and ends retiring windows.
pub struct Retirement {
    pool: Arc<Pool>,
}

impl Retirement {
    pub fn new(pool: Arc<Pool>) -> Self {
        Retirement { pool }
    }
}

#[async_trait]
impl BackgroundService for Retirement {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let clock = tokio::time::Instant::now();
        let mut changes = self.pool.subscribe();
        loop {
            let now = SystemTime::now();
            let deadline = self.pool.end_due_retirements(now);
            let now_ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
            let rotation = rotate_filters(&self.pool.snapshot(), now_ms);
            let wait = [rotation, deadline.map(|d| d.remaining(now))]
                .into_iter()
                .flatten()
                .fold(MAX_WAIT, Duration::min);
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(wait) => {}
                // A new retiring backend, a new backend to stamp.
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
