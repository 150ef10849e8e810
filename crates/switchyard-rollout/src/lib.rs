//! Progressive delivery inside the balancer: the rollout engine, judged on the balancer's own
//! counters, with checks before each step and automatic rollback.
//!
//! The pool owns a rollout's record and the split it implies; this crate owns time and
//! judgement. It changes nothing but through `Pool::apply`, and the admin API only turns
//! requests into pool changes, so there is one path for every change whoever makes it.

mod checks;
mod engine;
mod judge;
mod notify;

use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

pub use checks::{run_checks, HttpProber, Prober};
pub use engine::Engine;
pub use judge::{judge, Counts};
pub use notify::Notifier;

/// The engine as a Pingora background service.
pub struct RolloutService(pub Arc<Engine>);

#[async_trait]
impl BackgroundService for RolloutService {
    async fn start(&self, shutdown: ShutdownWatch) {
        // Subscribed first: building the notifier's connector loads the system's root
        // certificates, and an event recorded meanwhile would not be sent.
        let events = self.0.pool().events().subscribe();
        let notifier = Notifier::new(Arc::clone(self.0.pool()));
        tokio::select! {
            _ = self.0.run(shutdown) => {}
            _ = notifier.run(events) => {}
        }
    }
}
