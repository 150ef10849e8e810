//! The etcd state store: the only crate that knows etcd. [`EtcdStore`] is the pool's
//! [`StateStore`] when the config has `state_store.etcd`: the runtime state, a lease that
//! says which instance drives rollouts, and every instance's report live in one etcd cluster,
//! under the configured prefix:
//!
//! | key | value |
//! |---|---|
//! | `{prefix}/state` | the whole [`RuntimeState`] as JSON; its `mod_revision` is the [`Revision`] |
//! | `{prefix}/driver` | the rollout driver's instance name, under its lease |
//! | `{prefix}/instances/{name}@{pid}` | each process's [`InstanceReport`] as JSON, under its lease, written when it changed |
//! | `{prefix}/audit/{r0:020}` | one entry per state written, in the same transaction |
//!
//! An audit entry is `{"instance": name, "replaces": r0, "why": why, "at": RFC 3339}`, named
//! by `r0`, the revision of the state the write replaced (`0`: none). A transaction cannot
//! know the revision it will be given, so that of the new state is the entry's own
//! `mod_revision` (`etcdctl get --prefix {prefix}/audit/ -w json`): the entry and the state
//! are one write. The last 1000 entries are kept: every 50th write of an instance counts them
//! and deletes the oldest beyond that (keys sort by the zero-padded revision). Counted in
//! entries, not in etcd revisions, which every write to the cluster (the reports too) takes.
//!
//! The client lives on a runtime of its own: a thread named `etcd` running a current-thread
//! tokio runtime, where every request and every background task (the watches, the lease and
//! its campaign) runs. The trait's methods may be called from any runtime (Pingora's services
//! each have one); they hand their request over and wait for its answer. Nothing here blocks
//! on the network at start: etcd may be down, and the client connects (and reconnects, with
//! a jittered backoff from 100 ms to 5 s) in the background. Every request is bounded by
//! `request_timeout`, and goes to one member at a time: a member that does not answer (or
//! has no leader) hands over to the next endpoint.

mod conn;
mod lease;
mod watch;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};
use etcd_client::{KeyValue, TxnOpResponse};
use log::debug;
use switchyard_config::EtcdConfig;
use switchyard_pool::{
    InstanceReport, Revision, RuntimeState, StateStore, StoreError, StoreInfo, StoreUpdate, Stored,
    STATE_FORMAT,
};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, watch as tokio_watch, Notify};

use crate::conn::{Conn, Failure, Settings};
use crate::lease::LeaseState;

/// Audit entries kept: the last this many changes.
const AUDIT_KEEP: i64 = 1000;
/// How long a write that failed looks for its own audit entry (its answer lost).
const LANDED_CHECK: Duration = Duration::from_millis(500);
/// Every this many successful writes of this instance, the audit entries are counted.
const AUDIT_TRIM_EVERY: u64 = 50;

/// The keys of one store, all under its prefix.
pub(crate) struct Keys {
    pub(crate) state: String,
    pub(crate) driver: String,
    /// `{prefix}/instances/`: a report's key is this and the instance's name.
    pub(crate) instances: String,
    /// `{prefix}/audit/`.
    pub(crate) audit: String,
}

impl Keys {
    fn new(prefix: &str) -> Keys {
        let prefix = prefix.trim_end_matches('/');
        Keys {
            state: format!("{prefix}/state"),
            driver: format!("{prefix}/driver"),
            instances: format!("{prefix}/instances/"),
            audit: format!("{prefix}/audit/"),
        }
    }

    fn audit_entry(&self, replaces: Revision) -> String {
        format!("{}{replaces:020}", self.audit)
    }
}

/// What every task of one store shares.
pub(crate) struct Inner {
    pub(crate) conn: Conn,
    /// This instance's name (reports, the driver key, audit entries).
    pub(crate) name: String,
    /// What messages call the store: `etcd http://a:2379,http://b:2379 /prefix`.
    pub(crate) store: String,
    pub(crate) keys: Keys,
    pub(crate) lease_ttl: Duration,
    /// This instance's lease and whether it holds the driver key with it.
    pub(crate) lease: tokio_watch::Sender<LeaseState>,
    /// The public side of `lease.driver`.
    pub(crate) driver: tokio_watch::Sender<bool>,
    /// Wakes the lease task: something found the driver key or the lease not as it thought.
    pub(crate) poke: Notify,
    /// Successful state writes of this instance, for the audit's trimming.
    pub(crate) writes: std::sync::atomic::AtomicU64,
    /// The report last written, under which lease.
    pub(crate) last_report: std::sync::Mutex<Option<(i64, Vec<u8>)>>,
}

impl Inner {
    /// One key per process: during a binary upgrade two processes share the name.
    fn report_key(&self) -> String {
        format!(
            "{}{}@{}",
            self.keys.instances,
            self.name,
            std::process::id()
        )
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        self.conn.request_timeout()
    }

    fn error(&self, failure: Failure) -> StoreError {
        match failure {
            Failure::Unavailable(reason) => StoreError::Unavailable {
                store: self.store.clone(),
                reason,
            },
            Failure::Refused(reason) => StoreError::Refused {
                store: self.store.clone(),
                reason,
            },
        }
    }
}

/// The state store in etcd. Dropping it stops its runtime (and with it every watch stream
/// and the lease's keep-alive: the lease runs out after its TTL; [`StateStore::resign`]
/// gives it up at once).
pub struct EtcdStore {
    inner: Arc<Inner>,
    runtime: Handle,
    /// Dropped with the store: the runtime's thread then ends, and the runtime with it.
    _stop: oneshot::Sender<()>,
}

impl EtcdStore {
    /// Reads the password and TLS files named in `config` (errors name the field) and starts
    /// the client's thread, its lease and its campaign for the driver's key. Never waits for
    /// etcd.
    pub fn start(config: &EtcdConfig, name: String) -> Result<EtcdStore, String> {
        let settings = Settings::read(config)?;
        let store = format!(
            "etcd {} {}",
            config.endpoints.join(","),
            config.prefix.trim_end_matches('/')
        );
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("etcd".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = handle_tx.send(Err(format!(
                            "state_store.etcd: cannot start the etcd client's runtime: {e}"
                        )));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                // The runtime (and every task on it) is dropped here, outside async code.
            })
            .map_err(|e| format!("state_store.etcd: cannot start the etcd client's thread: {e}"))?;
        let runtime = handle_rx.recv().map_err(|_| {
            "state_store.etcd: the etcd client's thread ended at start".to_string()
        })??;
        let inner = Arc::new(Inner {
            conn: Conn::new(settings),
            name,
            store,
            keys: Keys::new(&config.prefix),
            lease_ttl: config.lease_ttl,
            lease: tokio_watch::Sender::new(LeaseState::default()),
            driver: tokio_watch::Sender::new(false),
            poke: Notify::new(),
            writes: std::sync::atomic::AtomicU64::new(0),
            last_report: std::sync::Mutex::new(None),
        });
        runtime.spawn(lease::run(inner.clone()));
        Ok(EtcdStore {
            inner,
            runtime,
            _stop: stop,
        })
    }

    /// Runs `request` on the store's runtime and waits for its answer, from any runtime.
    async fn on_runtime<T, F>(&self, request: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        match self.runtime.spawn(request).await {
            Ok(result) => result,
            Err(e) => Err(StoreError::Unavailable {
                store: self.inner.store.clone(),
                reason: format!("the etcd client stopped ({e})"),
            }),
        }
    }
}

/// The state in `kv` (the state key), or why it cannot be read.
pub(crate) fn parse_state(key: &str, kv: &KeyValue) -> Result<Stored, String> {
    #[derive(serde::Deserialize)]
    struct Format {
        format: Option<u32>,
    }
    let revision = kv.mod_revision().max(0) as Revision;
    if let Ok(Format {
        format: Some(format),
    }) = serde_json::from_slice::<Format>(kv.value())
    {
        if format > STATE_FORMAT {
            return Err(format!(
                "{key} at revision {revision} has format {format}, written by a newer Switchyard; this binary reads formats up to {STATE_FORMAT}"
            ));
        }
    }
    match serde_json::from_slice::<RuntimeState>(kv.value()) {
        Ok(state) => Ok(Stored { state, revision }),
        Err(e) => Err(format!("{key} at revision {revision}: {e}")),
    }
}

#[derive(serde::Serialize)]
struct AuditEntry<'a> {
    instance: &'a str,
    pid: u32,
    replaces: Revision,
    why: &'a str,
    at: String,
}

async fn compare_and_swap(
    inner: Arc<Inner>,
    value: Vec<u8>,
    expected: Revision,
    driver_lease: Option<i64>,
    why: String,
) -> Result<Revision, StoreError> {
    let keys = &inner.keys;
    let audit = serde_json::to_vec(&AuditEntry {
        instance: &inner.name,
        pid: std::process::id(),
        replaces: expected,
        why: &why,
        at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
    .map_err(|e| {
        inner.error(Failure::Refused(format!(
            "cannot write the audit entry: {e}"
        )))
    })?;
    let mut compares = vec![Compare::mod_revision(
        keys.state.as_str(),
        CompareOp::Equal,
        expected as i64,
    )];
    if let Some(lease) = driver_lease {
        compares.push(Compare::lease(
            keys.driver.as_str(),
            CompareOp::Equal,
            lease,
        ));
    }
    let writes = vec![
        TxnOp::put(keys.state.as_str(), value, None),
        TxnOp::put(keys.audit_entry(expected), audit, None),
    ];
    let audit_key = keys.audit_entry(expected);
    let txn = Txn::new().when(compares).and_then(writes).or_else(vec![
        TxnOp::get(keys.state.as_str(), None),
        TxnOp::get(keys.driver.as_str(), None),
        TxnOp::get(audit_key.as_str(), None),
    ]);
    let response = match inner
        .conn
        .run(|mut client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .await
    {
        Ok(response) => response,
        Err(f) => {
            // The answer may be lost after etcd applied the write: its audit entry says so.
            // Asked briefly: an unreachable store must not take twice its timeout to say so.
            let audit_key = audit_key.clone();
            let landed = inner
                .conn
                .run_within(LANDED_CHECK.min(inner.request_timeout()), |mut client| {
                    let key = audit_key.clone();
                    async move { client.get(key, None).await }
                })
                .await
                .ok()
                .and_then(|(_, r)| r.kvs().first().and_then(|kv| ours(kv, &inner.name, &why)));
            return landed.ok_or_else(|| inner.error(f));
        }
    };
    if response.succeeded() {
        let revision = response.header().map_or(0, |h| h.revision()).max(0) as Revision;
        let writes = inner
            .writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if writes.is_multiple_of(AUDIT_TRIM_EVERY) {
            tokio::spawn(trim_audit(inner.clone(), AUDIT_KEEP));
        }
        return Ok(revision);
    }
    let responses = response.op_responses();
    // A write sent again (to another member, its first answer lost) finds its own first try.
    if let Some(TxnOpResponse::Get(get)) = responses.get(2) {
        if let Some(revision) = get.kvs().first().and_then(|kv| ours(kv, &inner.name, &why)) {
            return Ok(revision);
        }
    }
    let current = match responses.first() {
        Some(TxnOpResponse::Get(get)) => get.kvs().first().cloned(),
        _ => None,
    };
    let current_revision = current
        .as_ref()
        .map_or(0, |kv| kv.mod_revision().max(0) as Revision);
    if current_revision != expected {
        let current = match current {
            Some(kv) => Some(Box::new(
                parse_state(&keys.state, &kv).map_err(|e| inner.error(Failure::Refused(e)))?,
            )),
            None => None,
        };
        return Err(StoreError::Conflict { current });
    }
    // The state was as expected: the driver's key is not ours any more.
    inner.poke.notify_one();
    Err(StoreError::NotDriver {
        store: inner.store.clone(),
    })
}

/// Deletes the oldest audit entries beyond the last `keep`. Best effort: a failure leaves
/// them for the next count.
async fn trim_audit(inner: Arc<Inner>, keep: i64) {
    let prefix = inner.keys.audit.clone();
    let counted = inner
        .conn
        .run(|mut client| {
            let prefix = prefix.clone();
            async move {
                let options = GetOptions::new().with_prefix().with_count_only();
                client.get(prefix, Some(options)).await
            }
        })
        .await;
    let excess = match counted {
        Ok(counted) => counted.count() - keep,
        Err(e) => return debug!("{}: counting the audit entries: {e}", inner.store),
    };
    if excess <= 0 {
        return;
    }
    let oldest = inner
        .conn
        .run(|mut client| {
            let prefix = prefix.clone();
            async move {
                let options = GetOptions::new()
                    .with_prefix()
                    .with_keys_only()
                    .with_sort(etcd_client::SortTarget::Key, etcd_client::SortOrder::Ascend)
                    .with_limit(excess);
                client.get(prefix, Some(options)).await
            }
        })
        .await;
    let Some(last) = oldest
        .ok()
        .and_then(|r| r.kvs().last().map(|kv| kv.key().to_vec()))
    else {
        return;
    };
    // Every key from the prefix up to and with the last of the oldest.
    let mut end = last;
    end.push(0);
    let deleted = inner
        .conn
        .run(|mut client| {
            let (prefix, end) = (prefix.clone(), end.clone());
            async move {
                client
                    .delete(prefix, Some(DeleteOptions::new().with_range(end)))
                    .await
            }
        })
        .await;
    if let Err(e) = deleted {
        debug!("{}: deleting old audit entries: {e}", inner.store);
    }
}

/// The revision of the state an audit entry recorded, if this process wrote it for `why`.
fn ours(kv: &KeyValue, name: &str, why: &str) -> Option<Revision> {
    let entry: serde_json::Value = serde_json::from_slice(kv.value()).ok()?;
    let mine =
        entry["instance"] == name && entry["pid"] == std::process::id() && entry["why"] == why;
    mine.then(|| kv.mod_revision().max(0) as Revision)
}

async fn load(inner: Arc<Inner>) -> Result<Option<Stored>, StoreError> {
    let key = inner.keys.state.clone();
    let response = inner
        .conn
        .run(|mut client| {
            let key = key.clone();
            async move { client.get(key, None).await }
        })
        .await
        .map_err(|f| inner.error(f))?;
    match response.kvs().first() {
        None => Ok(None),
        Some(kv) => parse_state(&inner.keys.state, kv)
            .map(Some)
            .map_err(|e| inner.error(Failure::Refused(e))),
    }
}

async fn report(inner: Arc<Inner>, mine: Vec<u8>) -> Result<Vec<InstanceReport>, StoreError> {
    let deadline = inner.request_timeout();
    let attempt = async {
        // At start the first lease may still be on its way.
        let mut lease = inner.lease.subscribe();
        let state = *lease
            .wait_for(|l| l.lease.is_some())
            .await
            .map_err(|_| Failure::Unavailable("the etcd client stopped".into()))?;
        let key = inner.report_key();
        let mut ops = Vec::new();
        // Written again only when it changed (or the lease did): the lease keeps it alive,
        // and every write is a revision etcd keeps until it is compacted.
        let unchanged = |last: &Option<(i64, Vec<u8>)>| {
            last.as_ref()
                .is_some_and(|(l, v)| Some(*l) == state.lease && *v == mine)
        };
        let put = state
            .lease
            .filter(|_| !unchanged(&inner.last_report.lock().unwrap_or_else(|p| p.into_inner())));
        if let Some(lease) = put {
            ops.push(TxnOp::put(
                key,
                mine.clone(),
                Some(PutOptions::new().with_lease(lease)),
            ));
        }
        ops.push(TxnOp::get(
            inner.keys.instances.as_str(),
            Some(GetOptions::new().with_prefix()),
        ));
        let txn = Txn::new().and_then(ops);
        let result = inner
            .conn
            .run_within(deadline, |mut client| {
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await
            .map(|(_, response)| response);
        if matches!(&result, Err(f) if lease::is_lease_gone(f)) {
            inner.poke.notify_one();
        }
        if let (Ok(_), Some(lease)) = (&result, put) {
            *inner.last_report.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((lease, mine.clone()));
        }
        result
    };
    let response = match tokio::time::timeout(deadline, attempt).await {
        Ok(response) => response,
        Err(_) => Err(Failure::Unavailable(format!(
            "no lease from etcd within {}",
            conn::show(deadline)
        ))),
    }
    .map_err(|f| {
        // etcd answered: the store is up, only this instance's lease ran out (a new one is
        // being granted). Not a reason to call the store down.
        if lease::is_lease_gone(&f) {
            inner.error(Failure::Refused(format!(
                "this instance's lease is gone ({}); a new one is being granted",
                f.reason()
            )))
        } else {
            inner.error(f)
        }
    })?;
    let mut reports = Vec::new();
    let key = inner.report_key();
    let mut ours_listed = false;
    for op in response.op_responses() {
        let TxnOpResponse::Get(get) = op else {
            continue;
        };
        for kv in get.kvs() {
            ours_listed |= kv.key() == key.as_bytes() && kv.value() == mine.as_slice();
            match serde_json::from_slice::<InstanceReport>(kv.value()) {
                Ok(report) => reports.push(report),
                Err(e) => debug!(
                    "{}: skipping the report at {}: {e}",
                    inner.store,
                    String::from_utf8_lossy(kv.key())
                ),
            }
        }
    }
    if !ours_listed {
        // Deleted or replaced behind our back (a wiped prefix, a restored snapshot): the
        // next report is written again whatever it holds.
        *inner.last_report.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
    Ok(reports)
}

#[async_trait]
impl StateStore for EtcdStore {
    fn info(&self) -> StoreInfo {
        StoreInfo {
            kind: "etcd",
            name: self.inner.store.clone(),
            shared: true,
        }
    }

    fn runtime(&self) -> Option<Handle> {
        Some(self.runtime.clone())
    }

    async fn load(&self) -> Result<Option<Stored>, StoreError> {
        self.on_runtime(load(self.inner.clone())).await
    }

    async fn compare_and_swap(
        &self,
        next: &RuntimeState,
        expected: Revision,
        as_driver: bool,
        why: &str,
    ) -> Result<Revision, StoreError> {
        let value = serde_json::to_vec(next).map_err(|e| StoreError::Refused {
            store: self.inner.store.clone(),
            reason: format!("cannot write the state as JSON: {e}"),
        })?;
        let driver_lease = if as_driver {
            let state = *self.inner.lease.borrow();
            match state.lease {
                Some(lease) if state.driver => Some(lease),
                _ => {
                    return Err(StoreError::NotDriver {
                        store: self.inner.store.clone(),
                    })
                }
            }
        } else {
            None
        };
        self.on_runtime(compare_and_swap(
            self.inner.clone(),
            value,
            expected,
            driver_lease,
            why.to_string(),
        ))
        .await
    }

    fn watch(&self, from: Revision) -> mpsc::Receiver<StoreUpdate> {
        watch::spawn(self.inner.clone(), &self.runtime, from)
    }

    fn driver(&self) -> tokio_watch::Receiver<bool> {
        self.inner.driver.subscribe()
    }

    async fn report(&self, mine: &InstanceReport) -> Result<Vec<InstanceReport>, StoreError> {
        let value = serde_json::to_vec(mine).map_err(|e| StoreError::Refused {
            store: self.inner.store.clone(),
            reason: format!("cannot write the report as JSON: {e}"),
        })?;
        self.on_runtime(report(self.inner.clone(), value)).await
    }

    async fn resign(&self) {
        let inner = self.inner.clone();
        let _ = self
            .on_runtime(async move {
                lease::step_down(&inner).await;
                Ok(())
            })
            .await;
    }
}
