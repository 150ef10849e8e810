//! Rollout notifications: each rollout event (started, step, window failed, paused, resumed,
//! ended) is POSTed as the event's JSON to the rollout's `notify` URL, so a chat hook can
//! follow a deploy. Fire-and-forget: each POST runs on its own with a timeout, and a hook that
//! is down or slow never holds the rollout back.

use std::sync::Arc;
use std::time::Duration;

use log::{debug, warn};
use pingora_core::connectors::http::Connector;
use switchyard_pool::{Event, Pool};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;

use crate::checks::send;

/// A hook that takes longer than this to answer is given up on.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Notifier {
    pool: Arc<Pool>,
    connector: Arc<Connector>,
}

impl Notifier {
    pub fn new(pool: Arc<Pool>) -> Notifier {
        Notifier {
            pool,
            connector: Arc::new(Connector::new(None)),
        }
    }

    /// Forwards rollout events until the event log closes.
    pub async fn run(&self, mut events: Receiver<Event>) {
        loop {
            match events.recv().await {
                Ok(event) => self.forward(event),
                Err(RecvError::Lagged(missed)) => {
                    warn!("rollout notifications: {missed} events came faster than they could be sent and were skipped")
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    fn forward(&self, event: Event) {
        if !event.kind.starts_with("rollout_") {
            return;
        }
        let Some(route) = event.route.as_deref() else {
            return;
        };
        let Some(url) = self.pool.rollout(route).and_then(|r| r.spec.notify) else {
            return;
        };
        let body = match serde_json::to_vec(&event) {
            Ok(body) => body,
            Err(e) => return warn!("rollout notification not sent: {e}"),
        };
        let connector = Arc::clone(&self.connector);
        tokio::spawn(async move {
            let sent = tokio::time::timeout(
                NOTIFY_TIMEOUT,
                send(
                    &connector,
                    "POST",
                    &url,
                    Some(("application/json", body)),
                    false,
                ),
            )
            .await;
            match sent {
                Ok(Ok((status, _))) if (200..300).contains(&status) => {
                    debug!("rollout event {} sent to {url}", event.id)
                }
                Ok(Ok((status, _))) => {
                    warn!("rollout notification to {url} answered {status}")
                }
                Ok(Err(why)) => warn!("rollout notification to {url} failed: {why}"),
                Err(_) => {
                    warn!("rollout notification to {url}: no answer within {NOTIFY_TIMEOUT:?}")
                }
            }
        });
    }
}
