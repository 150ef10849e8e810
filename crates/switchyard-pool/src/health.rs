//! Active health checks: one task per checked backend, run by a single Pingora background
//! service that follows the pool (a backend added or removed later gets or loses its task).
//!
//! Probes are those of Pingora's `TcpHealthCheck` and `HttpHealthCheck` over connectors all
//! checks share ([`crate::probe`]); rise and fall are counted here because Pingora keeps its
//! health state inside its `LoadBalancer`, which we do not use.
//! A backend's first check decides its state at once (like Envoy's cluster warming); after
//! that it takes `rise` successes or `fall` failures in a row to flip. The service reports
//! ready only when every backend has had its first check, and the proxy service depends on it,
//! so the listeners accept nothing before the pool knows which backends are up.
//!
//! A probe reaches its backend as requests do ([`Connect`]): over TLS with the upstream's
//! server name, CA certificates and verification when it has `tls` (a `tcp` check then
//! completes the TLS handshake too), and an `http` check over HTTP/2 for an `h2` or `h2c`
//! upstream, whose backends may speak nothing else (a gRPC server).
//!
//! Each flip is recorded as a `health` event. A first check that passes is not one: the
//! backend is then as the config has it, and recording it would fill the event log with one
//! event per backend at every start. A first check that fails is (the operator wants to know
//! that a backend was down from the start).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use log::{info, warn};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_core::services::ServiceReadyNotifier;
use pingora_core::{Error, ErrorType};
use switchyard_config::HealthCheck;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::events::Source;
use crate::live::BackendLive;
use crate::peer::Connect;
use crate::probe::{Connectors, Probe};
use crate::Pool;

/// The background service that runs every health check of the pool.
pub struct HealthChecks {
    pool: Arc<Pool>,
}

impl HealthChecks {
    pub fn new(pool: Arc<Pool>) -> Self {
        HealthChecks { pool }
    }
}

/// A running check task and what it was started for, to restart it when any changes.
struct Running {
    check: Checked,
    task: JoinHandle<()>,
}

/// What a backend's check task checks, and how it reaches the backend.
#[derive(Clone)]
struct Checked {
    check: HealthCheck,
    connect: Arc<Connect>,
    live: Arc<BackendLive>,
}

impl Checked {
    /// The same check of the same backend: a rebuilt snapshot's copy of the settings counts
    /// as the same (a reload that leaves an upstream as it was keeps its checks' streaks).
    fn same(&self, other: &Checked) -> bool {
        self.check == other.check
            && *self.connect == *other.connect
            && Arc::ptr_eq(&self.live, &other.live)
    }
}

type Key = (Arc<str>, SocketAddr);

#[async_trait]
impl BackgroundService for HealthChecks {
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let mut running: HashMap<Key, Running> = HashMap::new();
        // Made here, on the service's runtime, once for every check of the process.
        let connectors = Arc::new(Connectors::new());
        let mut changes = self.pool.subscribe();
        let (first_done, mut first_results) = mpsc::unbounded_channel();
        let started = self.reconcile(&mut running, &connectors, Some(&first_done));
        // Each watcher holds a sender until its first check is done; a watcher that ends
        // early drops it, so the wait always ends.
        drop(first_done);
        while first_results.recv().await.is_some() {}
        info!("health checks: first round done for {started} backends");
        ready.notify_ready();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.reconcile(&mut running, &connectors, None);
                }
            }
        }
        for (_, r) in running {
            r.task.abort();
        }
    }
}

impl HealthChecks {
    /// Starts a task for each checked backend that has none (or whose check changed) and
    /// stops the tasks of backends that are gone. Returns how many tasks it started.
    fn reconcile(
        &self,
        running: &mut HashMap<Key, Running>,
        connectors: &Arc<Connectors>,
        first_done: Option<&mpsc::UnboundedSender<()>>,
    ) -> usize {
        let snapshot = self.pool.snapshot();
        let mut wanted: HashMap<Key, Checked> = HashMap::new();
        for upstream in &snapshot.upstreams {
            let Some(check) = &upstream.health_check else {
                continue;
            };
            for backend in &upstream.backends {
                wanted.insert(
                    (Arc::clone(&upstream.name), backend.live.address),
                    Checked {
                        check: check.clone(),
                        connect: Arc::clone(&upstream.connect),
                        live: Arc::clone(&backend.live),
                    },
                );
            }
        }
        running.retain(|key, r| {
            let keep = wanted.get(key).is_some_and(|c| c.same(&r.check));
            if !keep {
                r.task.abort();
            }
            keep
        });
        let mut started = 0;
        for (key, checked) in wanted {
            if running.contains_key(&key) {
                continue;
            }
            let watcher = Watcher {
                pool: Arc::clone(&self.pool),
                upstream: Arc::clone(&key.0),
                live: Arc::clone(&checked.live),
                check: checked.check.clone(),
                connect: Arc::clone(&checked.connect),
                connectors: Arc::clone(connectors),
            };
            let task = tokio::spawn(watcher.run(first_done.cloned()));
            running.insert(
                key,
                Running {
                    check: checked,
                    task,
                },
            );
            started += 1;
        }
        started
    }
}

/// Checks one backend forever, flipping its health on `rise`/`fall`.
struct Watcher {
    pool: Arc<Pool>,
    upstream: Arc<str>,
    live: Arc<BackendLive>,
    check: HealthCheck,
    connect: Arc<Connect>,
    connectors: Arc<Connectors>,
}

impl Watcher {
    async fn run(self, mut first_done: Option<mpsc::UnboundedSender<()>>) {
        let probe = match Probe::new(&self.check, &self.connect, self.live.address) {
            Ok(probe) => probe,
            Err(e) => {
                // Never silently unchecked: a check that cannot be made fails, every time.
                warn!("health check of {} cannot be made: {e}", self.live.address);
                let mut streak = Streak::new(self.live.was_checked());
                let mut interval = tokio::time::interval(self.check.interval);
                loop {
                    interval.tick().await;
                    self.observe(&mut streak, Err(format!("the check cannot be made: {e}")));
                    if let Some(done) = first_done.take() {
                        let _ = done.send(());
                    }
                }
            }
        };
        let [passed, failed] = self
            .pool
            .metrics()
            .health_check_counters(&self.upstream, &self.live.address.to_string());
        let mut streak = Streak::new(self.live.was_checked());
        let mut interval = tokio::time::interval(self.check.interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let outcome =
                match tokio::time::timeout(self.check.timeout, probe.run(&self.connectors)).await {
                    Ok(Ok(())) => Some(Ok(())),
                    Ok(Err(e)) => {
                        if let Some(kind) = crate::local_failure(&e) {
                            // The probe never reached the backend: no verdict on it either way.
                            self.pool.local_errors().record(kind, || {
                                format!(
                                    "health check of upstream {} backend {} could not run: {}",
                                    self.upstream,
                                    self.live.address,
                                    describe(&e)
                                )
                            });
                            None
                        } else {
                            Some(Err(describe(&e)))
                        }
                    }
                    Err(_) => Some(Err(format!("no answer within {:?}", self.check.timeout))),
                };
            if let Some(outcome) = outcome {
                if outcome.is_ok() {
                    passed.inc()
                } else {
                    failed.inc()
                }
                self.observe(&mut streak, outcome);
            }
            if let Some(done) = first_done.take() {
                // The receiver is gone once the first round is over; nothing to tell then.
                let _ = done.send(());
            }
        }
    }

    fn observe(&self, streak: &mut Streak, outcome: Result<(), String>) {
        let healthy = self.live.is_healthy();
        let verdict = streak.record(outcome.is_ok(), healthy, &self.check);
        let Some(now_healthy) = verdict else {
            return;
        };
        self.live.mark_checked();
        let changed = self.live.set_healthy(now_healthy);
        // The first result is logged even when it confirms the initial state: it is the moment
        // the backend's health becomes known.
        if !changed && !streak.first {
            return;
        }
        let why = match (&outcome, streak.first) {
            (Ok(()), true) => "first check passed".to_string(),
            (Err(e), true) => format!("first check failed: {e}"),
            (Ok(()), false) => format!("{} checks passed in a row", self.check.rise),
            (Err(e), false) => format!("{} checks failed in a row, last: {e}", self.check.fall),
        };
        let message = format!(
            "upstream {} backend {} is now {}: {why}",
            self.upstream,
            self.live.address,
            if now_healthy { "healthy" } else { "unhealthy" }
        );
        if streak.first && now_healthy {
            info!("{message}");
        } else {
            // Before the first check nothing was known: there is no `before` to show.
            let was = (!streak.first).then_some(healthy);
            self.pool.events().record(crate::health_event(
                Source::Health,
                &self.upstream,
                self.live.address,
                was,
                now_healthy,
                message,
            ));
        }
        if changed {
            self.pool.refresh();
        }
    }
}

/// Consecutive results, for rise and fall.
#[derive(Default)]
struct Streak {
    checks: u64,
    /// Whether the last recorded check was the backend's first.
    first: bool,
    successes: u32,
    failures: u32,
}

impl Streak {
    /// `known`: a check has decided the backend's health before (this one was restarted by
    /// a reload): one result must not overturn it, `rise` and `fall` count from the start.
    fn new(known: bool) -> Streak {
        Streak {
            checks: u64::from(known),
            ..Streak::default()
        }
    }

    /// Returns the health the backend should have now, if this result decides it.
    fn record(&mut self, ok: bool, healthy: bool, check: &HealthCheck) -> Option<bool> {
        self.checks += 1;
        self.first = self.checks == 1;
        if ok {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
        if self.first {
            Some(ok)
        } else if !healthy && self.successes >= check.rise {
            Some(true)
        } else if healthy && self.failures >= check.fall {
            Some(false)
        } else {
            None
        }
    }
}

/// A Pingora error inside another, as the error itself or as its box (depending on how it was
/// wrapped).
fn nested<'a>(cause: &'a (dyn std::error::Error + Send + Sync + 'static)) -> Option<&'a Error> {
    cause
        .downcast_ref::<Error>()
        .or_else(|| cause.downcast_ref::<Box<Error>>().map(|b| &**b))
}

/// A failed check's cause, said once: Pingora nests its errors (`ConnectRefused context: Fail
/// to connect to ... cause: ConnectRefused ... cause: Connection refused`), so the type comes
/// from the outermost and the reason from the innermost. Pingora puts a TLS failure's reason
/// (e.g. "invalid peer certificate: UnknownIssuer") in the context, not the cause: without a
/// cause, the innermost context is the reason.
fn describe(e: &Error) -> String {
    if let ErrorType::CustomCode(_, status) = &e.etype {
        return format!("status {status}");
    }
    let mut context = e.context.as_ref().map(ToString::to_string);
    let mut cause = e.cause.as_deref();
    while let Some(inner) = cause.and_then(nested) {
        if let Some(c) = &inner.context {
            context = Some(c.to_string());
        }
        cause = inner.cause.as_deref();
    }
    match (cause, context) {
        (Some(cause), _) => format!("{}: {cause}", e.etype.as_str()),
        (None, Some(context)) => format!("{}: {context}", e.etype.as_str()),
        (None, None) => e.etype.as_str().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn check(rise: u32, fall: u32) -> HealthCheck {
        HealthCheck {
            probe: switchyard_config::Probe::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise,
            fall,
        }
    }

    #[test]
    fn a_restarted_check_goes_by_rise_and_fall_from_its_first_result() {
        let c = check(2, 3);
        let mut s = Streak::new(true);
        assert_eq!(s.record(false, true, &c), None, "one failure is not fall=3");
        assert_eq!(s.record(false, true, &c), None);
        assert_eq!(s.record(false, true, &c), Some(false));
        let mut s = Streak::new(true);
        assert_eq!(s.record(true, false, &c), None, "one success is not rise=2");
        assert_eq!(s.record(true, false, &c), Some(true));
    }

    #[test]
    fn first_result_decides_then_rise_and_fall_count() {
        let c = check(2, 3);
        let mut s = Streak::default();
        assert_eq!(
            s.record(false, false, &c),
            Some(false),
            "first check decides"
        );
        assert_eq!(s.record(true, false, &c), None, "one success is not rise=2");
        assert_eq!(s.record(true, false, &c), Some(true));
        assert_eq!(s.record(false, true, &c), None);
        assert_eq!(s.record(false, true, &c), None);
        assert_eq!(
            s.record(true, true, &c),
            None,
            "a success resets the failures"
        );
        assert_eq!(s.record(false, true, &c), None);
        assert_eq!(s.record(false, true, &c), None);
        assert_eq!(s.record(false, true, &c), Some(false), "fall=3 reached");
    }

    #[test]
    fn a_nested_failure_says_its_cause_once() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let inner = Error::because(
            ErrorType::ConnectRefused,
            "Fail to connect to 127.0.0.1:1",
            refused,
        );
        let outer = Error::because(
            ErrorType::ConnectRefused,
            "Fail to connect to addr: 127.0.0.1:1",
            inner,
        );
        let text = describe(&outer);
        assert_eq!(
            text,
            format!(
                "ConnectRefused: {}",
                std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
            )
        );
        let tls = Error::explain(
            ErrorType::TLSHandshakeFailure,
            "invalid peer certificate: UnknownIssuer",
        );
        assert_eq!(
            describe(&tls),
            "TLSHandshakeFailure: invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(
            describe(&Error::new(ErrorType::ConnectTimedout)),
            "ConnectTimedout"
        );
    }
}
