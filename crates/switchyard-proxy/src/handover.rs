//! Keeps the last connections of a process that hands over (upgrade) or stops.
//!
//! Two of Pingora's ways of stopping lose a request that has already reached the process:
//!
//! - When it stops a listener it also drops every connection whose request head it has not
//!   read in full (`handle_new_request` selects on shutdown). A client that connected a few
//!   microseconds before the listener closed has sent its request, but the bytes are not read
//!   yet, or not all of them. The connection app ([`crate::ClientApp`]) reads every request
//!   head itself and only then hands the connection to the proxy, which finds the whole head
//!   already read and serves it; once the process is closing, that wait no longer ends at
//!   the stop, only after a while without a whole head. Over TLS the same holds:
//!   the app has run the handshake itself, and the [`crate::ClientStream`] it reads the head
//!   through reads (it does not peek, which a rustls stream cannot), so the head it holds is
//!   the decrypted one. HTTP/2 needs none of this: Pingora's HTTP/2 server answers a stop
//!   with a GOAWAY and serves every stream the client opened before it saw it.
//! - A connection accepted just before the listener stopped gets a task that has not run yet:
//!   no count of requests sees it, and a drain that exits when the count is zero kills it.
//!   [`Connections`] knows instead when the last connection task of every listener has ended
//!   (see there).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::RuntimeOpts;
use pingora_core::server::{ListenFds, ShutdownWatch};
use pingora_core::services::{ServiceReadyNotifier, ServiceWithDependents};

/// Whether the proxy may still take or answer a connection, for the drain at shutdown.
///
/// Learns both from the connection apps, one per listener: see their `Drop`.
#[derive(Default)]
pub struct Connections {
    started: AtomicBool,
    /// Connection apps not yet dropped.
    apps: AtomicUsize,
}

impl Connections {
    pub(crate) fn app_created(&self) {
        self.apps.fetch_add(1, Ordering::AcqRel);
    }

    /// A connection app is gone: its listener accepts and serves nothing more.
    pub(crate) fn app_ended(&self) {
        self.apps.fetch_sub(1, Ordering::AcqRel);
    }

    /// True when the proxy never started, or has stopped and every connection it accepted has
    /// been served or closed.
    pub fn settled(&self) -> bool {
        !self.started.load(Ordering::Acquire) || self.apps.load(Ordering::Acquire) == 0
    }
}

/// The proxy's listening service, which marks its [`Connections`] started before it can
/// accept anything.
pub struct Watched<S> {
    service: S,
    connections: Arc<Connections>,
}

impl<S> Watched<S> {
    pub fn new(service: S, connections: Arc<Connections>) -> Self {
        Watched {
            service,
            connections,
        }
    }
}

#[async_trait]
impl<S: ServiceWithDependents> ServiceWithDependents for Watched<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
        ready_notifier: ServiceReadyNotifier,
    ) {
        self.connections.started.store(true, Ordering::Release);
        self.service
            .start_service(fds, shutdown, listeners_per_fd, ready_notifier)
            .await;
    }

    fn name(&self) -> &str {
        self.service.name()
    }

    fn threads(&self) -> Option<usize> {
        self.service.threads()
    }

    fn runtime_opts_override(&self, global: &RuntimeOpts) -> Option<RuntimeOpts> {
        self.service.runtime_opts_override(global)
    }

    fn on_startup_delay(&self, time_waited: Duration) {
        self.service.on_startup_delay(time_waited);
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.service.listen_addresses()
    }
}
