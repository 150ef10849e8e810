//! Signals and the end of the process.
//!
//! Pingora's defaults make SIGINT a fast exit and always sleep the whole grace period after
//! SIGTERM. The contract wants both to stop accepting, let in-flight requests finish, and exit
//! as soon as they have (within `grace_period`), so we hand Pingora our own signal watch and
//! run a drain that exits the process once nothing is in flight. SIGHUP reloads the config.
//! SIGQUIT hands the sockets over only once the upgrade socket has passed its check (see
//! `upgrade_socket`); a refused handover is logged and the process goes on serving.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use log::{error, info, warn};
use pingora::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::BackgroundService;
use switchyard_access_log::AccessLog;
use switchyard_proxy::Connections;
use tokio::signal::unix::{signal, SignalKind};

/// SIGTERM and SIGINT: graceful stop. SIGQUIT: hand the sockets over, then stop. Raises
/// `closing` first, so that responses stop offering keep-alive from that moment.
pub struct Signals {
    pub closing: Arc<AtomicBool>,
    /// SIGHUP: the same as `POST /api/v1/reload`.
    pub on_hangup: Box<dyn Fn() + Send + Sync>,
    /// SIGUSR1: reopen the access log (logrotate has moved it).
    pub access_log: Arc<AccessLog>,
    /// SIGQUIT, before anything else: may the listening sockets go to whoever listens on
    /// the upgrade socket? `Err` says why not.
    pub may_upgrade: Box<dyn Fn() -> Result<(), String> + Send + Sync>,
    /// SIGQUIT, before the sockets go: leave the runtime state for the new process.
    pub on_upgrade: Box<dyn Fn() + Send + Sync>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let signal = self.wait().await;
        self.closing.store(true, Ordering::Relaxed);
        if matches!(signal, ShutdownSignal::GracefulUpgrade) {
            // The admin API refuses changes from here on, so the state written is final.
            (self.on_upgrade)();
        }
        signal
    }
}

impl Signals {
    async fn wait(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int), Ok(mut quit), Ok(mut hup), Ok(mut usr1)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined1()),
        ) else {
            warn!("cannot install signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        loop {
            tokio::select! {
                _ = term.recv() => {
                    info!("SIGTERM: no new connections; finishing requests in flight");
                    return ShutdownSignal::GracefulTerminate;
                }
                _ = int.recv() => {
                    info!("SIGINT: no new connections; finishing requests in flight");
                    return ShutdownSignal::GracefulTerminate;
                }
                _ = quit.recv() => {
                    if let Err(e) = (self.may_upgrade)() {
                        error!("SIGQUIT refused, still serving: {e}");
                        continue;
                    }
                    info!("SIGQUIT: handing the listening sockets over, then draining");
                    return ShutdownSignal::GracefulUpgrade;
                }
                _ = hup.recv() => {
                    info!("SIGHUP: reloading the config");
                    (self.on_hangup)();
                }
                _ = usr1.recv() => match self.access_log.reopen() {
                    Some(path) => info!("SIGUSR1: reopening the access log {}", path.display()),
                    None => info!("SIGUSR1: there is no access log file to reopen"),
                },
            }
        }
    }
}

/// SIGHUP and SIGUSR1 end a process by default. Until [`Signals`] listens for them (once the
/// server runs), they are ignored instead: logrotate's SIGUSR1 or a SIGHUP that arrives while
/// a new process loads its certificates or waits for the upgrade's sockets must not kill it.
pub fn ignore_until_listening() {
    for signal in [libc::SIGHUP, libc::SIGUSR1] {
        // SAFETY: setting a standard signal's disposition to "ignore" before any handler of
        // ours exists; tokio installs its own handler over it later.
        unsafe {
            libc::signal(signal, libc::SIG_IGN);
        }
    }
}

/// Once shutdown has begun, waits until the proxy has served or closed every connection it
/// accepted, and ends the process.
pub struct Drain {
    /// Requests in flight, for the log when the grace period runs out.
    active: Arc<AtomicUsize>,
    connections: Arc<Connections>,
    grace_period: Duration,
    /// Written out before the process exits: the drained requests' lines are in it.
    access_log: Arc<AccessLog>,
}

impl Drain {
    pub fn new(
        active: Arc<AtomicUsize>,
        connections: Arc<Connections>,
        grace_period: Duration,
        access_log: Arc<AccessLog>,
    ) -> Self {
        Drain {
            active,
            connections,
            grace_period,
            access_log,
        }
    }
}

/// How often the drain looks at the in-flight count; a request takes longer than this.
const DRAIN_POLL: Duration = Duration::from_millis(20);

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        let deadline = Instant::now() + self.grace_period;
        info!(
            "{}",
            drain_started(self.grace_period, self.active.load(Ordering::Acquire))
        );
        loop {
            if self.connections.settled() {
                info!("every connection served or closed; exiting");
                self.exit()
            }
            if Instant::now() >= deadline {
                let active = self.active.load(Ordering::Acquire);
                warn!(
                    "grace period of {} over with {active} requests in flight; exiting",
                    switchyard_config::format_duration(self.grace_period)
                );
                self.exit()
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }
}

impl Drain {
    fn exit(&self) -> ! {
        self.access_log.flush(ACCESS_LOG_FLUSH);
        crate::pid_file::remove_if_ours();
        crate::alloc::report();
        std::process::exit(0)
    }
}

/// The longest the exit waits for the access log's last lines (a blocked pipe would wait
/// forever).
const ACCESS_LOG_FLUSH: Duration = Duration::from_secs(1);

/// The drain's first line: the grace period as configured (Pingora's own line, which says the
/// second it adds as a backstop, is withheld; see `logging`).
fn drain_started(grace_period: Duration, active: usize) -> String {
    format!(
        "draining: up to {} (server.grace_period) for {active} requests in flight",
        switchyard_config::format_duration(grace_period)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_says_the_grace_period_as_configured() {
        assert_eq!(
            drain_started(Duration::from_secs(30), 3),
            "draining: up to 30s (server.grace_period) for 3 requests in flight"
        );
        assert_eq!(
            drain_started(Duration::from_millis(1500), 0),
            "draining: up to 1500ms (server.grace_period) for 0 requests in flight"
        );
    }
}
