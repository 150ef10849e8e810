//! This instance's lease and the rollout driver's key. One task on the store's runtime
//! grants the lease (TTL `lease_ttl`), keeps it alive every third of its TTL, and campaigns
//! about every second: it puts `{prefix}/driver` with the lease when the key is absent, and
//! otherwise reads who holds it. The instance is the driver while the key holds its lease.
//!
//! A keep-alive that has not been answered by the time the lease would run out (counted
//! from when the last answered keep-alive was sent, so never later than etcd counts) means
//! the lease is lost: not the driver any more, and a new lease is granted when etcd answers
//! again. The reports written with the old lease go with it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::TxnOpResponse;
use etcd_client::{Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp};
use log::{debug, info, warn};
use tokio::time::{interval, sleep_until, Instant, MissedTickBehavior};

use crate::conn::{Backoff, Failure};
use crate::Inner;

/// How often a candidate looks at the driver's key (and the driver checks it still holds it).
const CAMPAIGN_EVERY: Duration = Duration::from_secs(1);

/// This instance's lease as the lease task knows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LeaseState {
    /// The live lease, `None` while there is none (etcd unreachable).
    pub(crate) lease: Option<i64>,
    /// The driver's key holds this lease.
    pub(crate) driver: bool,
    /// [`step_down`] was called: the lease (and the report on it) stays, the driver's key
    /// is given up and never campaigned for again.
    pub(crate) stepped_down: bool,
}

/// etcd's answer for a lease that is gone (ran out, or revoked).
pub(crate) fn is_lease_gone(failure: &Failure) -> bool {
    failure.reason().contains("lease not found")
}

impl Inner {
    /// Sets the lease state (and the public driver flag); returns the new state.
    fn set_lease(&self, change: impl FnOnce(&mut LeaseState)) -> LeaseState {
        let mut now = LeaseState::default();
        self.lease.send_if_modified(|state| {
            let before = *state;
            change(state);
            if state.lease.is_none() || state.stepped_down {
                state.driver = false;
            }
            now = *state;
            before != *state
        });
        self.driver.send_if_modified(|driver| {
            let changed = *driver != now.driver;
            *driver = now.driver;
            changed
        });
        now
    }
}

/// Stops driving at once, for good: the driver's key goes (if this lease holds it) so that
/// another instance takes over within a campaign round, while the lease and this process's
/// report on it stay until the process ends (its requests in flight still count). Bounded by
/// `request_timeout`.
pub(crate) async fn step_down(inner: &Arc<Inner>) {
    let mut lease = None;
    inner.set_lease(|state| {
        lease = state.lease;
        state.stepped_down = true;
    });
    let Some(lease) = lease else {
        return;
    };
    let key = inner.keys.driver.clone();
    let txn = Txn::new()
        .when(vec![Compare::lease(key.as_str(), CompareOp::Equal, lease)])
        .and_then(vec![TxnOp::delete(key.as_str(), None)]);
    match inner
        .conn
        .run(|mut client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .await
    {
        Ok(response) if response.succeeded() => {
            info!(
                "{}: {} gave up the rollout driver's key",
                inner.store, inner.name
            )
        }
        Ok(_) => {}
        Err(e) => warn!(
            "{}: cannot give up the rollout driver's key ({e}); it goes with the lease",
            inner.store
        ),
    }
}

/// The lease task: runs while the store lives.
pub(crate) async fn run(inner: Arc<Inner>) {
    let ttl = inner.lease_ttl.as_secs().max(1) as i64;
    let mut backoff = Backoff::new();
    loop {
        let sent = Instant::now();
        let granted = inner
            .conn
            .run(|mut client| async move { client.lease_grant(ttl, None).await })
            .await;
        let lease = match granted {
            Ok(granted) => granted.id(),
            Err(e) => {
                debug!("{}: no lease: {e}", inner.store);
                tokio::select! {
                    _ = backoff.wait() => {}
                    _ = inner.poke.notified() => {}
                }
                continue;
            }
        };
        inner.set_lease(|state| state.lease = Some(lease));
        debug!("{}: lease {lease:x} granted", inner.store);
        backoff.reset();
        hold(&inner, lease, sent + inner.lease_ttl).await;
        inner.set_lease(|state| {
            if state.lease == Some(lease) {
                state.lease = None;
            }
        });
        warn!(
            "{}: lease {lease:x} lost; no longer the rollout driver until a new lease is granted",
            inner.store
        );
        // It may still live in etcd (answers that came too late): give it up, so that the
        // driver's key goes now rather than when etcd runs it out.
        let _ = inner
            .conn
            .run(|mut client| async move { client.lease_revoke(lease).await })
            .await;
        backoff.wait().await;
    }
}

/// Keeps `lease` alive and campaigns with it until it is lost or the instance resigns.
async fn hold(inner: &Arc<Inner>, lease: i64, mut expires: Instant) {
    let mut keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
    // The member the keep-alive stream goes to.
    let mut member = 0;
    // Send times of the keep-alives not answered yet, oldest first.
    let mut unanswered: VecDeque<Instant> = VecDeque::new();
    let mut keep_alive = interval((inner.lease_ttl / 3).max(Duration::from_millis(100)));
    keep_alive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut campaign = interval(CAMPAIGN_EVERY);
    campaign.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        // Every request below stops when the lease would run out: the driver flag never
        // outlives the lease by more than a poll.
        let budget = inner
            .request_timeout()
            .min(expires.saturating_duration_since(Instant::now()));
        if budget.is_zero() {
            return;
        }
        tokio::select! {
            _ = sleep_until(expires) => {
                debug!("{}: lease {lease:x}: no keep-alive answered in time", inner.store);
                return;
            }
            _ = keep_alive.tick() => {
                let stuck = unanswered
                    .front()
                    .is_some_and(|sent| sent.elapsed() > inner.request_timeout());
                if stuck {
                    // A stream that stopped answering: open another (on the next member).
                    debug!("{}: lease {lease:x}: keep-alive unanswered", inner.store);
                    keeper = None;
                    unanswered.clear();
                    inner.conn.failed(member).await;
                }
                match &mut keeper {
                    Some((sender, _)) => {
                        unanswered.push_back(Instant::now());
                        if let Err(e) = sender.keep_alive().await {
                            debug!("{}: lease {lease:x} keep-alive: {e}", inner.store);
                            keeper = None;
                            unanswered.clear();
                        }
                    }
                    None => {
                        // Opening the stream sends a keep-alive and waits for its answer.
                        let sent = Instant::now();
                        match inner
                            .conn
                            .run_within(budget, |mut client| async move {
                                client.lease_keep_alive(lease).await
                            })
                            .await
                        {
                            Ok((to, opened)) => {
                                member = to;
                                keeper = Some(opened);
                                expires = expires.max(sent + inner.lease_ttl);
                            }
                            Err(e) if is_lease_gone(&e) => return,
                            Err(e) => debug!("{}: lease {lease:x} keep-alive: {e}", inner.store),
                        }
                    }
                }
            }
            answer = next_answer(&mut keeper) => {
                match answer {
                    Ok(Some(answer)) if answer.ttl() > 0 => {
                        if let Some(sent) = unanswered.pop_front() {
                            let ttl = Duration::from_secs(answer.ttl() as u64);
                            expires = expires.max(sent + ttl);
                        }
                    }
                    Ok(Some(_)) => {
                        debug!("{}: lease {lease:x} is gone", inner.store);
                        return;
                    }
                    Ok(None) => {
                        debug!("{}: lease {lease:x} keep-alive stream ended", inner.store);
                        keeper = None;
                        unanswered.clear();
                    }
                    Err(e) => {
                        debug!("{}: lease {lease:x} keep-alive: {e}", inner.store);
                        keeper = None;
                        unanswered.clear();
                        inner.conn.failed(member).await;
                    }
                }
            }
            _ = campaign.tick() => {
                if !run_campaign(inner, lease, budget).await {
                    return;
                }
            }
            _ = inner.poke.notified() => {
                if !run_campaign(inner, lease, budget).await {
                    return;
                }
            }
        }
    }
}

async fn next_answer(
    keeper: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
) -> Result<Option<etcd_client::LeaseKeepAliveResponse>, etcd_client::Error> {
    match keeper {
        Some((_, answers)) => answers.message().await,
        None => std::future::pending().await,
    }
}

/// Puts the driver's key with `lease` if it is absent, else reads who holds it, and sets the
/// driver flag accordingly. `false`: the lease is gone.
async fn run_campaign(inner: &Arc<Inner>, lease: i64, budget: Duration) -> bool {
    if inner.lease.borrow().stepped_down {
        return true;
    }
    let key = inner.keys.driver.clone();
    let txn = Txn::new()
        .when(vec![Compare::create_revision(
            key.as_str(),
            CompareOp::Equal,
            0,
        )])
        .and_then(vec![TxnOp::put(
            key.as_str(),
            inner.name.as_str(),
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else(vec![TxnOp::get(key.as_str(), None)]);
    let response = match inner
        .conn
        .run_within(budget, |mut client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .await
    {
        Ok((_, response)) => response,
        Err(e) if is_lease_gone(&e) => return false,
        Err(e) => {
            // Unanswered: the driver stays the driver until its lease would run out.
            debug!("{}: campaign: {e}", inner.store);
            return true;
        }
    };
    let holds = response.succeeded()
        || response.op_responses().iter().any(|op| {
            matches!(op, TxnOpResponse::Get(get)
                if get.kvs().first().is_some_and(|kv| kv.lease() == lease))
        });
    let before = inner.lease.borrow().driver;
    let now = inner.set_lease(|state| {
        if state.lease == Some(lease) {
            state.driver = holds;
        }
    });
    if now.driver != before {
        if now.driver {
            info!("{}: {} is the rollout driver", inner.store, inner.name);
        } else {
            info!(
                "{}: {} is no longer the rollout driver",
                inner.store, inner.name
            );
        }
    }
    true
}
