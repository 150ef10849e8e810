//! Following `{prefix}/state`: one task per [`watch`](crate::EtcdStore) stream, on the
//! store's runtime, that watches the key from the revision after the last one delivered and
//! says when the store stops or starts answering.
//!
//! The watch is listed again (a `get`, whose answer is delivered whatever its revision) when
//! what it follows can no longer be trusted to continue the history already delivered: the
//! revision to resume from was compacted away, the cluster answering is another one (its ID
//! changed), or the store's revision went backwards (wiped, or restored from a backup). A
//! watch that says nothing at all for three request timeouts, although asked for its
//! progress every request timeout, is dropped as dead and made again.

use std::convert::Infallible;
use std::sync::Arc;

use etcd_client::{EventType, WatchOptions, WatchResponse};
use log::{debug, warn};
use switchyard_pool::{Revision, StoreUpdate};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::time::{interval, Instant, MissedTickBehavior};

use crate::conn::{classify, show, Backoff, Failure, Member};
use crate::{parse_state, Inner};

/// Updates a slow follower has not taken yet before the watch waits for it.
const QUEUE: usize = 64;

pub(crate) fn spawn(
    inner: Arc<Inner>,
    runtime: &Handle,
    from: Revision,
) -> mpsc::Receiver<StoreUpdate> {
    let (updates, receiver) = mpsc::channel(QUEUE);
    runtime.spawn(follow(Follower {
        inner,
        updates,
        delivered: from,
        next: from as i64 + 1,
        cluster: None,
        // The caller has seen `from`: a store behind it was wiped or restored.
        seen: from as i64,
        health: Health::Unknown,
        // Listed first: a store behind the caller's revision (restored, replaced, wiped) is
        // told at once, and a caller far behind gets the state, not its whole history.
        relist: true,
        initial: true,
        reset: None,
        member: None,
    }));
    receiver
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Unknown,
    Up,
    Down,
}

/// Why a watch ended.
enum End {
    /// The follower dropped its receiver: the task ends.
    Closed,
    /// List again, then watch from there (no failure: no `Down`, no backoff).
    Relist,
    /// The store stopped answering (or the watch went silent).
    Failed(String),
}

struct Follower {
    inner: Arc<Inner>,
    updates: mpsc::Sender<StoreUpdate>,
    /// The revision of the last state (or emptiness) delivered.
    delivered: Revision,
    /// Where the next watch starts.
    next: i64,
    /// The cluster's ID, from the first answer on.
    cluster: Option<u64>,
    /// The highest store revision seen in an answer since the last listing.
    seen: i64,
    health: Health,
    /// List before watching again.
    relist: bool,
    /// The first listing is still to come: what the caller has already (the state at its
    /// revision, or nothing at 0) is not delivered again.
    initial: bool,
    /// Why the store counts as reset (wiped, restored, replaced): the next listing is
    /// delivered as [`StoreUpdate::Reset`], to be run whatever its revision.
    reset: Option<String>,
    /// The member the current watch goes to.
    member: Option<Member>,
}

async fn follow(mut f: Follower) {
    let mut backoff = Backoff::new();
    loop {
        match f.watch_once(&mut backoff).await {
            End::Closed => return,
            End::Relist => f.relist = true,
            End::Failed(reason) => {
                if f.health != Health::Down {
                    warn!("{}: watch: {reason}", f.inner.store);
                    f.health = Health::Down;
                    if f.send(StoreUpdate::Down(reason)).await.is_err() {
                        return;
                    }
                } else {
                    debug!("{}: watch: {reason}", f.inner.store);
                }
                tokio::select! {
                    _ = backoff.wait() => {}
                    _ = f.updates.closed() => return,
                }
            }
        }
    }
}

impl Follower {
    async fn send(&mut self, update: StoreUpdate) -> Result<(), End> {
        self.updates.send(update).await.map_err(|_| End::Closed)
    }

    async fn up(&mut self) -> Result<(), End> {
        if self.health != Health::Up {
            self.health = Health::Up;
            self.send(StoreUpdate::Up).await?;
        }
        Ok(())
    }

    /// Lists the state key and delivers what is there, whatever its revision.
    async fn list(&mut self) -> Result<(), End> {
        let key = self.inner.keys.state.clone();
        let mut response = self
            .inner
            .conn
            .run(|mut client| {
                let key = key.clone();
                async move { client.get(key, None).await }
            })
            .await
            .map_err(|f| End::Failed(format!("listing {}: {f}", self.inner.keys.state)))?;
        let (cluster, revision) = response
            .take_header()
            .map_or((None, 0), |h| (Some(h.cluster_id()), h.revision()));
        if revision < self.seen && self.reset.is_none() {
            self.reset = Some(format!(
                "it is at revision {revision}, behind the {} this instance had",
                self.seen
            ));
        }
        self.up().await?;
        self.cluster = cluster;
        self.seen = revision;
        self.next = revision + 1;
        let update = match response.kvs().first() {
            Some(kv) => self.read(kv),
            None => StoreUpdate::Empty {
                revision: revision.max(0) as Revision,
            },
        };
        let initial = std::mem::replace(&mut self.initial, false);
        if initial && self.reset.is_none() {
            match &update {
                // The caller has it already.
                StoreUpdate::State(stored) if stored.revision == self.delivered => {
                    self.relist = false;
                    return Ok(());
                }
                // Older than the caller's copy: the store was restored or replaced.
                StoreUpdate::State(stored) if stored.revision < self.delivered => {
                    self.reset = Some(format!(
                        "it holds revision {}, older than the {} this instance had",
                        stored.revision, self.delivered
                    ));
                }
                // Nothing: told even at 0, so that a state the caller has (a single node's
                // state file moving to a shared store) is written in.
                _ => {}
            }
        }
        self.delivered = match &update {
            StoreUpdate::State(stored) => stored.revision,
            StoreUpdate::Unreadable { revision, .. } | StoreUpdate::Empty { revision } => *revision,
            _ => self.delivered,
        };
        let update = match (self.reset.take(), update) {
            (Some(reason), StoreUpdate::State(stored)) => StoreUpdate::Reset {
                state: Some(stored),
                reason,
            },
            (Some(reason), StoreUpdate::Empty { .. }) => StoreUpdate::Reset {
                state: None,
                reason,
            },
            (_, update) => update,
        };
        self.relist = false;
        self.send(update).await
    }

    fn read(&self, kv: &etcd_client::KeyValue) -> StoreUpdate {
        match parse_state(&self.inner.keys.state, kv) {
            Ok(stored) => StoreUpdate::State(stored),
            Err(reason) => {
                warn!("{}: {reason}", self.inner.store);
                StoreUpdate::Unreadable {
                    revision: kv.mod_revision().max(0) as Revision,
                    reason,
                }
            }
        }
    }

    /// One watch, from making it to its end.
    async fn watch_once(&mut self, backoff: &mut Backoff) -> End {
        match self.watch_inner(backoff).await {
            Ok(never) => match never {},
            Err(End::Failed(reason)) => {
                // The member the watch went to does not answer: the next watch goes to another.
                if let Some(member) = self.member.take() {
                    self.inner.conn.failed(member).await;
                }
                End::Failed(reason)
            }
            Err(end) => end,
        }
    }

    async fn watch_inner(&mut self, backoff: &mut Backoff) -> Result<Infallible, End> {
        if self.relist {
            self.list().await?;
        }
        let timeout = self.inner.request_timeout();
        let silent_after = timeout * 3;
        let key = self.inner.keys.state.clone();
        let options = WatchOptions::new().with_start_revision(self.next);
        let (member, stream) = self
            .inner
            .conn
            .run_within(timeout, |mut client| {
                let (key, options) = (key.clone(), options.clone());
                async move { client.watch(key, Some(options)).await }
            })
            .await
            .map_err(|f: Failure| End::Failed(format!("watch: {f}")))?;
        self.member = Some(member);
        let (mut requests, mut answers) = stream.split();
        let mut last = Instant::now();
        let mut progress = interval(timeout);
        progress.set_missed_tick_behavior(MissedTickBehavior::Delay);
        progress.tick().await;
        loop {
            tokio::select! {
                answer = answers.message() => {
                    match answer {
                        Ok(Some(answer)) => {
                            self.answer(answer, backoff).await?;
                            // From when it was handled: a follower slow to take an update
                            // is no silence of etcd's.
                            last = Instant::now();
                        }
                        Ok(None) => return Err(End::Failed("the watch stream ended".into())),
                        Err(e) => return Err(End::Failed(format!("watch: {}", classify(e)))),
                    }
                }
                _ = progress.tick() => {
                    if last.elapsed() >= silent_after {
                        return Err(End::Failed(format!("watch silent for {}", show(silent_after))));
                    }
                    if let Err(e) = requests.request_progress().await {
                        return Err(End::Failed(format!("watch: {}", classify(e))));
                    }
                }
                _ = self.updates.closed() => return Err(End::Closed),
            }
        }
    }

    /// Delivers what one answer of the watch says.
    async fn answer(&mut self, answer: WatchResponse, backoff: &mut Backoff) -> Result<(), End> {
        // A header of zeros (the answer that cancels a watch of a compacted revision has one)
        // says nothing about the store.
        if let Some(header) = answer.header().filter(|h| h.revision() > 0) {
            if self.cluster.is_some_and(|c| c != header.cluster_id()) {
                let reason = format!(
                    "the cluster's ID changed ({:x} -> {:x})",
                    self.cluster.unwrap_or(0),
                    header.cluster_id()
                );
                warn!("{}: {reason}: listing the state again", self.inner.store);
                self.reset = Some(reason);
                return Err(End::Relist);
            }
            if header.revision() < self.seen {
                let reason = format!(
                    "its revision went backwards ({} -> {})",
                    self.seen,
                    header.revision()
                );
                warn!("{}: {reason}: listing the state again", self.inner.store);
                self.reset = Some(reason);
                return Err(End::Relist);
            }
            self.cluster = Some(header.cluster_id());
            self.seen = header.revision();
        }
        if answer.compact_revision() > 0 {
            debug!(
                "{}: revision {} was compacted (up to {}): listing the state again",
                self.inner.store,
                self.next,
                answer.compact_revision()
            );
            return Err(End::Relist);
        }
        if answer.canceled() {
            return Err(End::Failed(format!(
                "the watch was cancelled: {}",
                answer.cancel_reason()
            )));
        }
        if answer.created() {
            backoff.reset();
            return self.up().await;
        }
        if answer.events().is_empty() {
            // A progress answer: every event up to its revision has been sent.
            if let Some(header) = answer.header() {
                self.next = self.next.max(header.revision() + 1);
            }
            return self.up().await;
        }
        // Only the last change of an answer matters: the others are already replaced.
        let mut last = None;
        for event in answer.events() {
            let Some(kv) = event.kv() else {
                continue;
            };
            self.next = self.next.max(kv.mod_revision() + 1);
            let revision = kv.mod_revision().max(0) as Revision;
            if revision <= self.delivered {
                continue;
            }
            last = Some(match event.event_type() {
                EventType::Put => self.read(kv),
                EventType::Delete => StoreUpdate::Empty { revision },
            });
        }
        if let Some(update) = last {
            self.delivered = match &update {
                StoreUpdate::State(stored) => stored.revision,
                StoreUpdate::Unreadable { revision, .. } | StoreUpdate::Empty { revision } => {
                    *revision
                }
                _ => self.delivered,
            };
            self.up().await?;
            self.send(update).await?;
        }
        Ok(())
    }
}
