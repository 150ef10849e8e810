//! Slow start needs time to pass: while a backend's weight ramps up, this background service
//! rebuilds the selection every [`RAMP_STEP`] so the precomputed sequences follow the ramp.
//! Between ramps it sleeps until the pool changes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::Pool;

/// How often a ramping weight is recomputed.
const RAMP_STEP: Duration = Duration::from_millis(250);

pub struct SlowStart {
    pool: Arc<Pool>,
}

impl SlowStart {
    pub fn new(pool: Arc<Pool>) -> Self {
        SlowStart { pool }
    }
}

#[async_trait]
impl BackgroundService for SlowStart {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut changes = self.pool.subscribe();
        loop {
            let ramping = self
                .pool
                .snapshot()
                .upstreams
                .iter()
                .any(|u| u.is_ramping());
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(RAMP_STEP), if ramping => self.pool.refresh(),
                changed = changes.changed(), if !ramping => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }
}
