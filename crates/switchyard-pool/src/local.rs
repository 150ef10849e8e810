//! Failures that are the balancer's own, not a backend's: out of file descriptors, of local
//! ports, of memory.
//!
//! When the process cannot even create a socket, the backend never saw a thing. Counting that
//! against the backend (passive take-out, a failed health check) takes healthy backends out
//! under a local pressure and leaves clients with `503` after it is gone. So both the proxy
//! and the health checks ask [`local_failure`] first, and a local failure is counted in
//! `switchyard_local_errors_total{kind}` and logged at most once per [`LOG_EVERY`] instead.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pingora_core::{Error, ErrorType};
use prometheus::{IntCounter, IntCounterVec, Opts};

use crate::metrics::Metrics;

/// How often, at most, a local failure is logged.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// What the process ran out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalFailure {
    /// `EMFILE`, `ENFILE`: the open-file limit of the process or the system.
    OpenFiles,
    /// `EADDRNOTAVAIL`: no local port left to connect from.
    LocalPorts,
    /// `ENOBUFS`, `ENOMEM`.
    Memory,
    /// A socket that could not be created or bound for another local reason.
    Socket,
}

impl LocalFailure {
    const ALL: [LocalFailure; 4] = [
        LocalFailure::OpenFiles,
        LocalFailure::LocalPorts,
        LocalFailure::Memory,
        LocalFailure::Socket,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LocalFailure::OpenFiles => "open_files",
            LocalFailure::LocalPorts => "local_ports",
            LocalFailure::Memory => "memory",
            LocalFailure::Socket => "socket",
        }
    }
}

/// Whether a failed connect (or probe) failed on our side.
pub fn local_failure(e: &Error) -> Option<LocalFailure> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e.root_cause());
    while let Some(c) = cause {
        if let Some(errno) = c
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            match errno {
                libc::EMFILE | libc::ENFILE => return Some(LocalFailure::OpenFiles),
                libc::EADDRNOTAVAIL => return Some(LocalFailure::LocalPorts),
                libc::ENOBUFS | libc::ENOMEM => return Some(LocalFailure::Memory),
                _ => {}
            }
        }
        cause = c.source();
    }
    // Pingora's connector turns a failed socket() or bind() into an internal error.
    matches!(
        e.etype(),
        ErrorType::InternalError | ErrorType::SocketError | ErrorType::BindError
    )
    .then_some(LocalFailure::Socket)
}

/// Counts local failures and keeps the log to one line per [`LOG_EVERY`].
pub struct LocalErrors {
    counters: [IntCounter; 4],
    /// Unix seconds of the last line logged.
    last_logged: AtomicU64,
}

impl LocalErrors {
    pub fn new(metrics: &Metrics) -> LocalErrors {
        let vec = IntCounterVec::new(
            Opts::new(
                "switchyard_local_errors_total",
                "Requests or health checks that failed on the balancer's side (not counted against a backend), by what ran out.",
            ),
            &["kind"],
        )
        .expect("a valid metric definition");
        metrics.register("switchyard_local_errors_total", Box::new(vec.clone()));
        LocalErrors {
            counters: LocalFailure::ALL.map(|k| vec.with_label_values(&[k.as_str()])),
            last_logged: AtomicU64::new(0),
        }
    }

    /// Counts one; logs it with `what` unless a line went out less than [`LOG_EVERY`] ago.
    pub fn record(&self, kind: LocalFailure, what: impl FnOnce() -> String) {
        self.counters[kind as usize].inc();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_logged.load(Ordering::Relaxed);
        if now < last + LOG_EVERY.as_secs() {
            return;
        }
        if self
            .last_logged
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            log::error!(
                "{} (ran out of {}; not counted against the backend; {} so far; logged at most every {:?})",
                what(),
                kind.as_str(),
                self.total(),
                LOG_EVERY
            );
        }
    }

    fn total(&self) -> u64 {
        self.counters.iter().map(IntCounter::get).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_error(etype: ErrorType, errno: i32) -> Box<Error> {
        Error::because(
            etype,
            "Fail to connect",
            io::Error::from_raw_os_error(errno),
        )
    }

    #[test]
    fn running_out_of_files_ports_or_memory_is_ours() {
        let local = |etype, errno| local_failure(&connect_error(etype, errno));
        assert_eq!(
            local(ErrorType::InternalError, libc::EMFILE),
            Some(LocalFailure::OpenFiles)
        );
        assert_eq!(
            local(ErrorType::ConnectError, libc::ENFILE),
            Some(LocalFailure::OpenFiles)
        );
        assert_eq!(
            local(ErrorType::ConnectError, libc::EADDRNOTAVAIL),
            Some(LocalFailure::LocalPorts)
        );
        assert_eq!(
            local(ErrorType::ConnectError, libc::ENOBUFS),
            Some(LocalFailure::Memory)
        );
        assert_eq!(
            local(ErrorType::InternalError, libc::EACCES),
            Some(LocalFailure::Socket)
        );
        // A nested Pingora error is looked through.
        let nested = Error::because(
            ErrorType::ConnectError,
            "outer",
            connect_error(ErrorType::SocketError, libc::EMFILE),
        );
        assert_eq!(local_failure(&nested), Some(LocalFailure::OpenFiles));
    }

    #[test]
    fn what_the_backend_did_is_the_backends() {
        let local = |etype, errno| local_failure(&connect_error(etype, errno));
        assert_eq!(local(ErrorType::ConnectRefused, libc::ECONNREFUSED), None);
        assert_eq!(local(ErrorType::ConnectTimedout, libc::ETIMEDOUT), None);
        assert_eq!(local(ErrorType::ConnectNoRoute, libc::EHOSTUNREACH), None);
    }
}
