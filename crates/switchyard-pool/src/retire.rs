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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chrono::DateTime;
use log::{debug, info, warn};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use switchyard_config::limits::MAX_BACKENDS;

use crate::events::{format_time, Source};
use crate::keys::ENCODED_LEN;
use crate::state::{Change, Rejection};
use crate::state_file::{read_whole, remove_stale_temp_files, target, write_whole};
use crate::Pool;

/// The longest the service sleeps: a wall clock that was set meanwhile is followed by then.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The latest deadline, 9999-12-31T23:59:59.999Z: the last time RFC 3339's four-digit years
/// can write, so that every deadline written reads back (and formats without panicking).
const LATEST_UNIX_MS: u64 = 253_402_300_799_999;

/// When a retiring backend becomes draining: a wall-clock time in whole milliseconds from
/// 1970 to [`LATEST_UNIX_MS`], written in RFC 3339 (UTC) in the state file and the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline {
    unix_ms: u64,
}

impl Deadline {
    /// `timeout` after `now`, or the latest deadline.
    pub fn after(now: SystemTime, timeout: Duration) -> Deadline {
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let ms = now.saturating_add(timeout).as_millis();
        Deadline::at(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    fn at(unix_ms: u64) -> Deadline {
        Deadline {
            unix_ms: unix_ms.min(LATEST_UNIX_MS),
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
        // A time before 1970 has passed like any other (the backend drains at once); an
        // offset can carry one past the latest deadline, which is then where it ends. Neither
        // is worth setting the whole state file aside for.
        Ok(Deadline::at(
            u64::try_from(time.timestamp_millis()).unwrap_or_default(),
        ))
    }
}

impl Pool {
    /// Ends every retiring window due at `now`: its backend becomes draining (source
    /// `retire`). Returns the first deadline still to come; none once the state is handed
    /// over at an upgrade (the next process ends them).
    pub fn end_due_retirements(&self, now: SystemTime) -> Option<Deadline> {
        if self.is_handed_over() {
            return None;
        }
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
                    // another deadline): it decides. Or the state was just handed over.
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

/// What starts a file of retiring backends' keys; the number is its format.
const KEYS_MAGIC: &[u8] = b"switchyard retiring keys 1\n";

/// The largest keys file read: every backend the limits allow, each with its filter and room
/// for its two length-prefixed fields (8 bytes, an address of at most 60 as text, an upstream
/// name of a couple of hundred). Anything larger was not written by a previous process.
const MAX_KEYS_BYTES: u64 = (KEYS_MAGIC.len() + MAX_BACKENDS * (ENCODED_LEN + 300)) as u64;

/// Where a process hands the keys of its retiring backends to the next one at an upgrade:
/// next to the hand-over of its state.
pub fn keys_path(handover: &Path) -> PathBuf {
    let mut path = handover.as_os_str().to_owned();
    path.push(".keys");
    PathBuf::from(path)
}

/// At a start that takes nothing over: removes a keys file a previous process left (a
/// SIGQUIT without a successor: stale for any later process), and the temp files of one that
/// died writing it.
pub fn discard_keys(handover: &Path) {
    let path = keys_path(handover);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            warn!("cannot remove {}: {e}", path.display())
        }
        _ => {}
    }
    remove_stale_keys_temp_files(&path);
}

fn remove_stale_keys_temp_files(path: &Path) {
    if let Ok(target) = target(path) {
        remove_stale_temp_files(&target);
    }
}

impl Pool {
    /// At an upgrade: writes the key filters of the retiring backends to [`keys_path`] for the
    /// next process, so that their users stay with them across it (16 KiB each; the other
    /// backends' filters start empty there and fill within a period). Removes an older file
    /// when no backend is retiring. Returns how many were written.
    pub(crate) fn hand_over_keys(&self, handover: &Path) -> Result<usize, String> {
        let path = keys_path(handover);
        let snapshot = self.snapshot();
        let mut bytes = KEYS_MAGIC.to_vec();
        let mut written = 0;
        for upstream in &snapshot.upstreams {
            for backend in &upstream.backends {
                let (Some(keys), Some(_)) = (&backend.keys, backend.state.retiring_until()) else {
                    continue;
                };
                for field in [
                    upstream.name.as_bytes(),
                    backend.live.address.to_string().as_bytes(),
                ] {
                    let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
                    bytes.extend_from_slice(&len.to_le_bytes());
                    bytes.extend_from_slice(field);
                }
                keys.encode(&mut bytes);
                written += 1;
            }
        }
        let result = if written == 0 {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            write_whole(&path, &bytes)
        };
        result.map(|()| written).map_err(|e| {
            format!(
                "cannot hand over the retiring backends' users in {}: {e}",
                path.display()
            )
        })
    }

    /// In the process that took over: gives its retiring backends the keys the previous one
    /// handed over, once (the file is removed). A file that cannot be read is a warning: those
    /// backends' users then move as if they were draining.
    pub(crate) fn take_over_keys(&self, handover: &Path) {
        let path = keys_path(handover);
        remove_stale_keys_temp_files(&path);
        let (target, bytes) = match read_whole(&path, MAX_KEYS_BYTES) {
            Ok(Some(read)) => read,
            Ok(None) => return,
            Err(e) => {
                warn!(
                    "cannot read the retiring backends' users from {}: {e}; their users move as if they were draining",
                    path.display()
                );
                return;
            }
        };
        if let Err(e) = std::fs::remove_file(&target) {
            warn!("cannot remove {}: {e}", target.display());
        }
        match self.take_keys(&bytes) {
            Ok(taken) => info!("{taken} retiring backends kept their users across the upgrade"),
            Err(taken) => warn!(
                "{} is damaged: {taken} retiring backends kept their users across the upgrade, the users of any other move",
                path.display()
            ),
        }
    }

    /// Restores the filters in `bytes` into the retiring backends they name; how many, `Err`
    /// when the bytes are not all as [`Pool::hand_over_keys`] writes them.
    fn take_keys(&self, bytes: &[u8]) -> Result<usize, usize> {
        let snapshot = self.snapshot();
        let mut rest = bytes.strip_prefix(KEYS_MAGIC).ok_or(0usize)?;
        let mut taken = 0;
        while !rest.is_empty() {
            let (upstream, address, after) = two_fields(rest).ok_or(taken)?;
            let keys = snapshot
                .upstream(&String::from_utf8_lossy(upstream))
                .and_then(|u| {
                    let address = std::str::from_utf8(address).ok()?;
                    let address = address.parse::<SocketAddr>().ok()?;
                    u.backends.iter().find(|b| b.live.address == address)
                })
                .filter(|b| b.state.retiring_until().is_some())
                .and_then(|b| b.keys.as_ref());
            // A backend that is gone or no longer retiring has no use for them.
            rest = match keys {
                Some(keys) => keys.decode(after),
                None => after.get(ENCODED_LEN..),
            }
            .ok_or(taken)?;
            taken += usize::from(keys.is_some());
        }
        Ok(taken)
    }
}

/// Two length-prefixed fields at the start of `bytes`, and what follows them.
fn two_fields(bytes: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (first, rest) = field(bytes)?;
    let (second, rest) = field(rest)?;
    Some((first, second, rest))
}

/// A field of a little-endian `u32` length and as many bytes, and what follows it.
fn field(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
    rest.split_at_checked(len)
}

impl Pool {
    /// Rotates the key filters of every ring backend that is not retiring, at `now_ms` of the
    /// service's monotonic clock. Returns how long until the next rotation, if any filter has
    /// one. Under the writer lock, with the snapshot current under it: a backend that starts
    /// to retire meanwhile must not lose half its users to a rotation that had not seen it.
    /// Requests never take the lock; a change waits for at most one pass over the filters.
    fn rotate_filters(&self, now_ms: u64) -> Option<Duration> {
        let _desired = self.lock();
        let snapshot = self.current.load();
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
            // Handed over at an upgrade: the next process's service has taken over.
            if self.pool.is_handed_over() {
                return;
            }
            let now = SystemTime::now();
            let deadline = self.pool.end_due_retirements(now);
            let now_ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
            let rotation = self.pool.rotate_filters(now_ms);
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
