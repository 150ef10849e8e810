//! Against a real etcd (`/usr/bin/etcd`, Debian's etcd-server): each test starts its own on
//! free ports, with its own data directory, and kills it when done.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use etcd_client::{Client, CompactionOptions, GetOptions};
use switchyard_config::{EtcdConfig, EtcdTls};
use switchyard_pool::{InstanceReport, RuntimeState, StateStore, StoreError, StoreUpdate};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::EtcdStore;

const ETCD: &str = "/usr/bin/etcd";
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
const LEASE_TTL: Duration = Duration::from_secs(2);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-etcd-{name}-{}-{}",
        std::process::id(),
        free_port()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// TLS files for an etcd on 127.0.0.1 that asks for a client certificate.
struct TlsFiles {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// One etcd member on free ports, killed (by its PID) when dropped.
struct Etcd {
    dir: PathBuf,
    /// The member's name in `--initial-cluster`.
    member: String,
    client_port: u16,
    peer_port: u16,
    /// `--initial-cluster`: this member alone, or every member of a cluster.
    initial_cluster: String,
    tls: Option<TlsFiles>,
    child: Option<Child>,
}

impl Etcd {
    async fn start(name: &str) -> Etcd {
        Etcd::start_with(name, None).await
    }

    async fn start_with(name: &str, tls: Option<TlsFiles>) -> Etcd {
        let mut etcd = Etcd::new(name, "default", tls);
        etcd.initial_cluster = format!("default=http://127.0.0.1:{}", etcd.peer_port);
        etcd.run().await;
        etcd
    }

    fn new(name: &str, member: &str, tls: Option<TlsFiles>) -> Etcd {
        Etcd {
            dir: temp_dir(&format!("{name}-{member}")),
            member: member.into(),
            client_port: free_port(),
            peer_port: free_port(),
            initial_cluster: String::new(),
            tls,
            child: None,
        }
    }

    /// A cluster of `n` members, every one answering.
    async fn cluster(name: &str, n: usize) -> Vec<Etcd> {
        let mut members: Vec<Etcd> = (0..n)
            .map(|i| Etcd::new(name, &format!("m{i}"), None))
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.member, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        for member in &mut members {
            member.initial_cluster = initial.clone();
            member.spawn();
        }
        for member in &members {
            member.ready().await;
        }
        members
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.client_port)
    }

    /// Starts the member (again: same data directory, same ports) and waits until it answers.
    async fn run(&mut self) {
        self.spawn();
        self.ready().await;
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .expect("log file");
        let mut command = Command::new(ETCD);
        command
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &self.url()])
            .args(["--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--name", &self.member])
            .args(["--initial-cluster", &self.initial_cluster])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        self.child = Some(command.spawn().expect("etcd starts"));
    }

    async fn ready(&self) {
        if self.tls.is_some() {
            // The raw test client has no TLS: wait for the port instead.
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "etcd did not listen: {}",
                    self.log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answered = tokio::time::timeout(Duration::from_secs(1), async {
                let mut client = Client::connect([self.url()], None).await.ok()?;
                client.get("/", None).await.ok()
            })
            .await;
            if let Ok(Some(_)) = answered {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not answer: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    async fn client(&self) -> Client {
        Client::connect([self.url()], None)
            .await
            .expect("test client")
    }

    fn config(&self) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![self.url()],
            prefix: "/switchyard/test".into(),
            name: None,
            username: None,
            password_file: None,
            tls: None,
            request_timeout: REQUEST_TIMEOUT,
            lease_ttl: LEASE_TTL,
        }
    }

    fn store(&self, name: &str) -> EtcdStore {
        EtcdStore::start(&self.config(), name.into()).expect("store starts")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A state that says `n` (the weight of `app` in route `web`'s split).
fn state(n: u32) -> RuntimeState {
    serde_json::from_value(serde_json::json!({
        "format": switchyard_pool::STATE_FORMAT,
        "splits": {"web": {"split": {"app": n}}},
    }))
    .expect("a state")
}

/// A write that the test needs done: retried while etcd does not answer in time (a loaded
/// machine), and done when a retry finds it was (its answer lost).
async fn cas(
    store: &EtcdStore,
    next: &RuntimeState,
    expected: u64,
    as_driver: bool,
    why: &str,
) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.compare_and_swap(next, expected, as_driver, why).await {
            Ok(revision) => return revision,
            Err(StoreError::Conflict {
                current: Some(current),
            }) if current.state == *next => return current.revision,
            Err(StoreError::Unavailable { reason, .. }) if Instant::now() < deadline => {
                eprintln!("retrying a write: {reason}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("write {why:?} on {expected}: {e}"),
        }
    }
}

async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: not within {limit:?}"),
    }
}

/// The next update that `wanted` accepts, within `limit`; the others are skipped (and shown if
/// none comes).
async fn next_update(
    updates: &mut mpsc::Receiver<StoreUpdate>,
    limit: Duration,
    wanted: impl Fn(&StoreUpdate) -> bool,
) -> StoreUpdate {
    let deadline = Instant::now() + limit;
    let mut skipped = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, updates.recv()).await {
            Ok(Some(update)) if wanted(&update) => return update,
            Ok(Some(update)) => skipped.push(update),
            Ok(None) => panic!("the watch ended; before: {skipped:?}"),
            Err(_) => panic!("no wanted update within {limit:?}; got {skipped:?}"),
        }
    }
}

/// A watch of a store that holds nothing yet, past its first answers: `Up`, then the
/// listing's `Empty`.
async fn watch_empty(store: &EtcdStore) -> mpsc::Receiver<StoreUpdate> {
    let mut updates = store.watch(0);
    next_update(&mut updates, Duration::from_secs(5), |u| {
        *u == StoreUpdate::Up
    })
    .await;
    next_update(&mut updates, Duration::from_secs(5), |u| {
        matches!(u, StoreUpdate::Empty { .. })
    })
    .await;
    updates
}

/// The next state the watch delivers, within a second, is the one written at `revision`.
async fn state_arrives(updates: &mut mpsc::Receiver<StoreUpdate>, revision: u64) {
    let update = next_update(updates, Duration::from_secs(1), |u| {
        matches!(u, StoreUpdate::State(_))
    })
    .await;
    assert!(
        matches!(&update, StoreUpdate::State(s) if s.revision == revision),
        "{update:?}"
    );
}

async fn wait_driver(driver: &mut watch::Receiver<bool>, want: bool, limit: Duration) {
    within(
        limit,
        &format!("driver == {want}"),
        driver.wait_for(|d| *d == want),
    )
    .await
    .expect("the store lives");
}

/// Waits until one of `a` and `b` is the driver: `true` for `a`.
async fn one_driver(a: &mut watch::Receiver<bool>, b: &mut watch::Receiver<bool>) -> bool {
    within(LEASE_TTL + Duration::from_secs(2), "a driver", async {
        loop {
            if *a.borrow_and_update() {
                return true;
            }
            if *b.borrow_and_update() {
                return false;
            }
            tokio::select! {
                _ = a.changed() => {}
                _ = b.changed() => {}
            }
        }
    })
    .await
}

fn is_state(n: u32) -> impl Fn(&StoreUpdate) -> bool {
    move |u| matches!(u, StoreUpdate::State(s) if s.state == state(n))
}

#[tokio::test]
async fn compare_and_swap_creates_from_zero_then_succeeds_on_the_revision_and_conflicts_on_another()
{
    let etcd = Etcd::start("cas").await;
    let store = etcd.store("a");
    assert_eq!(store.load().await, Ok(None));
    assert_eq!(
        store.info(),
        switchyard_pool::StoreInfo {
            kind: "etcd",
            name: format!("etcd {} /switchyard/test", etcd.url()),
            shared: true,
        }
    );

    let first = cas(&store, &state(1), 0, false, "first").await;
    assert!(first > 0);
    let loaded = store.load().await.expect("load").expect("a state");
    assert_eq!((loaded.state, loaded.revision), (state(1), first));

    let second = cas(&store, &state(2), first, false, "second").await;
    assert!(second > first);

    // Built on an older revision, or on "nothing stored": the current state comes back.
    for expected in [first, 0] {
        match store
            .compare_and_swap(&state(3), expected, false, "stale")
            .await
        {
            Err(StoreError::Conflict {
                current: Some(current),
            }) => {
                assert_eq!((current.state, current.revision), (state(2), second));
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    // And a state that exists only in the caller's mind: the store holds nothing.
    let mut raw = etcd.client().await;
    raw.delete("/switchyard/test/state", None).await.unwrap();
    match store
        .compare_and_swap(&state(4), second, false, "gone")
        .await
    {
        Err(StoreError::Conflict { current: None }) => {}
        other => panic!("expected a conflict with nothing, got {other:?}"),
    }

    // One audit entry per write, named by the revision it replaced.
    let audit = raw
        .get(
            "/switchyard/test/audit/",
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let entries: Vec<(String, i64, serde_json::Value)> = audit
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                kv.mod_revision(),
                serde_json::from_slice(kv.value()).unwrap(),
            )
        })
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[0].0, "/switchyard/test/audit/00000000000000000000");
    assert_eq!(entries[0].1 as u64, first);
    assert_eq!(entries[0].2["instance"], "a");
    assert_eq!(entries[0].2["why"], "first");
    assert_eq!(entries[0].2["replaces"], 0);
    assert_eq!(entries[1].0, format!("/switchyard/test/audit/{first:020}"));
    assert_eq!(entries[1].1 as u64, second);
    assert_eq!(entries[1].2["why"], "second");
    assert!(entries[1].2["at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn the_audit_keeps_the_last_entries_whatever_else_moves_the_revision() {
    let etcd = Etcd::start("audit").await;
    let store = etcd.store("a");
    let mut raw = etcd.client().await;
    let mut revision = cas(&store, &state(1), 0, false, "first").await;
    // Other keys move the store's revision on (as every instance's report does): the audit
    // counts entries, not revisions.
    for i in 0..50 {
        raw.put("/switchyard/test/other", format!("{i}"), None)
            .await
            .unwrap();
    }
    for n in 2..=5 {
        revision = cas(&store, &state(n), revision, false, &format!("change {n}")).await;
    }
    let whys = async |raw: &mut Client| -> Vec<String> {
        let audit = raw
            .get(
                "/switchyard/test/audit/",
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        audit
            .kvs()
            .iter()
            .map(|kv| {
                let entry: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
                entry["why"].as_str().unwrap().to_string()
            })
            .collect()
    };
    assert_eq!(
        whys(&mut raw).await,
        ["first", "change 2", "change 3", "change 4", "change 5"]
    );
    crate::trim_audit(store.inner.clone(), 2).await;
    assert_eq!(whys(&mut raw).await, ["change 4", "change 5"]);
    crate::trim_audit(store.inner.clone(), 2).await;
    assert_eq!(whys(&mut raw).await, ["change 4", "change 5"]);
}

#[tokio::test]
async fn a_state_written_by_another_store_arrives_within_a_second() {
    let etcd = Etcd::start("watch").await;
    let a = etcd.store("a");
    let b = etcd.store("b");
    let mut updates = watch_empty(&a).await;

    let written = Instant::now();
    let revision = cas(&b, &state(1), 0, false, "b").await;
    let update = next_update(&mut updates, Duration::from_secs(1), |_| true).await;
    assert_eq!(
        update,
        StoreUpdate::State(switchyard_pool::Stored {
            state: state(1),
            revision
        })
    );
    assert!(written.elapsed() < Duration::from_secs(1));

    // Its own writes too, in order; nothing older than `from` again.
    let next = cas(&a, &state(2), revision, false, "a").await;
    let update = next_update(&mut updates, Duration::from_secs(1), |_| true).await;
    assert!(matches!(update, StoreUpdate::State(s) if s.revision == next));

    let mut later = b.watch(next);
    next_update(&mut later, Duration::from_secs(5), |u| {
        *u == StoreUpdate::Up
    })
    .await;
    let last = cas(&b, &state(3), next, false, "b").await;
    let update = next_update(&mut later, Duration::from_secs(1), |_| true).await;
    assert!(matches!(update, StoreUpdate::State(s) if s.revision == last));
}

#[tokio::test]
async fn a_watch_from_a_compacted_revision_lists_again_and_delivers_the_latest() {
    let etcd = Etcd::start("compact").await;
    let store = etcd.store("a");
    let first = cas(&store, &state(1), 0, false, "1").await;
    let second = cas(&store, &state(2), first, false, "2").await;
    let third = cas(&store, &state(3), second, false, "3").await;
    let mut raw = etcd.client().await;
    raw.compact(third as i64, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();

    let mut updates = store.watch(first);
    let update = next_update(&mut updates, Duration::from_secs(5), |u| {
        matches!(u, StoreUpdate::State(_))
    })
    .await;
    assert!(
        matches!(&update, StoreUpdate::State(s) if s.revision == third && s.state == state(3)),
        "{update:?}"
    );
    // And it watches on from there.
    cas(&store, &state(4), third, false, "4").await;
    next_update(&mut updates, Duration::from_secs(1), is_state(4)).await;
}

#[tokio::test]
async fn a_deleted_state_key_is_empty_and_bad_json_is_unreadable() {
    let etcd = Etcd::start("delete").await;
    let store = etcd.store("a");
    let revision = cas(&store, &state(1), 0, false, "1").await;
    let mut updates = store.watch(revision);
    next_update(&mut updates, Duration::from_secs(5), |u| {
        *u == StoreUpdate::Up
    })
    .await;

    let mut raw = etcd.client().await;
    let deleted = raw.delete("/switchyard/test/state", None).await.unwrap();
    let at = deleted.header().unwrap().revision() as u64;
    let update = next_update(&mut updates, Duration::from_secs(1), |_| true).await;
    assert_eq!(update, StoreUpdate::Empty { revision: at });

    let put = raw
        .put("/switchyard/test/state", "{not json", None)
        .await
        .unwrap();
    let at = put.header().unwrap().revision() as u64;
    let update = next_update(&mut updates, Duration::from_secs(1), |_| true).await;
    match update {
        StoreUpdate::Unreadable { revision, reason } => {
            assert_eq!(revision, at);
            assert!(reason.contains("/switchyard/test/state"), "{reason}");
        }
        other => panic!("expected unreadable, got {other:?}"),
    }
    match store.load().await {
        Err(StoreError::Refused { reason, .. }) => {
            assert!(
                reason.starts_with("/switchyard/test/state at revision"),
                "{reason}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // A newer binary's format is named as such.
    raw.put("/switchyard/test/state", r#"{"format": 99}"#, None)
        .await
        .unwrap();
    let update = next_update(&mut updates, Duration::from_secs(1), |_| true).await;
    assert!(
        matches!(&update, StoreUpdate::Unreadable { reason, .. } if reason.contains("has format 99, written by a newer Switchyard")),
        "{update:?}"
    );

    // The watch goes on.
    let current =
        raw.get("/switchyard/test/state", None).await.unwrap().kvs()[0].mod_revision() as u64;
    cas(&store, &state(5), current, false, "5").await;
    next_update(&mut updates, Duration::from_secs(1), is_state(5)).await;

    // A listing that finds nothing is `Empty` as well (here: after a compaction).
    raw.delete("/switchyard/test/state", None).await.unwrap();
    let status = raw.get("/", None).await.unwrap();
    let now = status.header().unwrap().revision();
    raw.compact(now, None).await.unwrap();
    let mut fresh = store.watch(1);
    let update = next_update(&mut fresh, Duration::from_secs(5), |u| {
        !matches!(u, StoreUpdate::Up)
    })
    .await;
    assert_eq!(
        update,
        StoreUpdate::Empty {
            revision: now as u64
        }
    );
}

#[tokio::test]
async fn one_driver_at_a_time_and_the_other_takes_over_when_it_resigns_or_dies() {
    let etcd = Etcd::start("driver").await;
    let a = etcd.store("a");
    let b = etcd.store("b");
    let mut a_driver = a.driver();
    let mut b_driver = b.driver();
    let limit = LEASE_TTL + Duration::from_secs(2);
    one_driver(&mut a_driver, &mut b_driver).await;
    // Exactly one, and it stays so.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_ne!(*a_driver.borrow(), *b_driver.borrow());
    let (driver, other, mut other_driver, driver_name) = if *a_driver.borrow() {
        (a, b, b_driver, "a")
    } else {
        (b, a, a_driver, "b")
    };
    let mut raw = etcd.client().await;
    let key = raw.get("/switchyard/test/driver", None).await.unwrap();
    assert_eq!(key.kvs()[0].value_str().unwrap(), driver_name);

    // Resign: the other takes over (it polls about every second).
    let resigned = Instant::now();
    within(REQUEST_TIMEOUT * 2, "resign", driver.resign()).await;
    assert!(!*driver.driver().borrow());
    wait_driver(&mut other_driver, true, limit).await;
    assert!(resigned.elapsed() < Duration::from_secs(2));
    // The resigned one does not campaign again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!*driver.driver().borrow());
    drop(driver);

    // A third store; the driver dies (dropped without resigning): the lease runs out.
    let third = etcd.store("c");
    let mut third_driver = third.driver();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!*third_driver.borrow());
    let died = Instant::now();
    drop(other);
    drop(other_driver);
    wait_driver(&mut third_driver, true, limit).await;
    assert!(died.elapsed() < limit);
}

#[tokio::test]
async fn a_deposed_drivers_write_is_refused_as_not_driver() {
    let etcd = Etcd::start("deposed").await;
    let a = etcd.store("a");
    let mut a_driver = a.driver();
    wait_driver(&mut a_driver, true, LEASE_TTL + Duration::from_secs(2)).await;
    let b = etcd.store("b");
    // Not the driver: refused without asking etcd.
    assert_eq!(
        b.compare_and_swap(&state(1), 0, true, "b").await,
        Err(StoreError::NotDriver {
            store: b.info().name
        })
    );
    let revision = cas(&a, &state(1), 0, true, "a").await;

    // Its lease revoked behind its back: its next guarded write fails in etcd's compare
    // (before it noticed), and it is no longer the driver.
    let mut raw = etcd.client().await;
    let key = raw.get("/switchyard/test/driver", None).await.unwrap();
    raw.lease_revoke(key.kvs()[0].lease()).await.unwrap();
    assert_eq!(
        a.compare_and_swap(&state(2), revision, true, "a").await,
        Err(StoreError::NotDriver {
            store: a.info().name
        })
    );
    // Unguarded writes still go.
    cas(&a, &state(2), revision, false, "a").await;
    // Someone becomes the driver again (either: both campaign).
    one_driver(&mut a_driver, &mut b.driver()).await;
}

#[tokio::test]
async fn reports_of_every_live_instance_and_none_of_a_dead_one() {
    let etcd = Etcd::start("report").await;
    let a = etcd.store("a");
    let b = etcd.store("b");
    let report = |name: &str, revision| InstanceReport {
        name: name.into(),
        revision,
        ..InstanceReport::default()
    };
    a.report(&report("a", 1)).await.unwrap();
    let mut all = b.report(&report("b", 2)).await.unwrap();
    all.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(all, [report("a", 1), report("b", 2)]);

    // Something that is not a report is skipped.
    let mut raw = etcd.client().await;
    raw.put("/switchyard/test/instances/junk", "nope", None)
        .await
        .unwrap();
    // Replaced, not added.
    let all = a.report(&report("a", 3)).await.unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all.contains(&report("a", 3)));

    // A resigned instance only stops driving: its report stays while it lives (its requests
    // in flight still count), and goes with its lease once it is gone.
    b.resign().await;
    let all = a.report(&report("a", 4)).await.unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    drop(b);
    let deadline = Instant::now() + LEASE_TTL + Duration::from_secs(3);
    loop {
        let all = a.report(&report("a", 5)).await.unwrap();
        if all == [report("a", 5)] {
            break;
        }
        assert!(Instant::now() < deadline, "{all:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_stopped_etcd_is_unavailable_at_once_and_the_watch_resumes_when_it_is_back() {
    let mut etcd = Etcd::start("restart").await;
    let a = etcd.store("a");
    let b = etcd.store("b");
    let revision = cas(&a, &state(1), 0, false, "1").await;
    let mut updates = a.watch(revision);
    next_update(&mut updates, Duration::from_secs(5), |u| {
        *u == StoreUpdate::Up
    })
    .await;

    etcd.stop();
    let asked = Instant::now();
    match b.compare_and_swap(&state(2), revision, false, "2").await {
        Err(StoreError::Unavailable { store, reason }) => {
            assert_eq!(store, b.info().name);
            assert!(!reason.is_empty());
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert!(
        asked.elapsed() <= REQUEST_TIMEOUT + Duration::from_millis(200),
        "{:?}",
        asked.elapsed()
    );
    assert!(matches!(
        b.load().await,
        Err(StoreError::Unavailable { .. })
    ));
    assert!(matches!(
        b.report(&InstanceReport::default()).await,
        Err(StoreError::Unavailable { .. })
    ));
    next_update(&mut updates, REQUEST_TIMEOUT * 4, |u| {
        matches!(u, StoreUpdate::Down(_))
    })
    .await;

    etcd.run().await;
    next_update(&mut updates, Duration::from_secs(10), |u| {
        *u == StoreUpdate::Up
    })
    .await;
    let next = within(
        Duration::from_secs(5),
        "a write after the restart",
        cas(&b, &state(2), revision, false, "2"),
    )
    .await;
    state_arrives(&mut updates, next).await;
}

#[tokio::test]
async fn a_silent_etcd_is_down_and_back_up_when_it_speaks_again() {
    let etcd = Etcd::start("silent").await;
    let a = etcd.store("a");
    let mut updates = watch_empty(&a).await;
    let pid = etcd.child.as_ref().unwrap().id().to_string();
    let signal = |name: &str| {
        let status = Command::new("kill")
            .args([name, pid.as_str()])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    signal("-STOP");
    let stopped = Instant::now();
    let update = next_update(&mut updates, REQUEST_TIMEOUT * 6, |u| {
        matches!(u, StoreUpdate::Down(_))
    })
    .await;
    signal("-CONT");
    assert!(
        matches!(&update, StoreUpdate::Down(reason) if reason.contains("silent") || reason.contains("no answer")),
        "{update:?} after {:?}",
        stopped.elapsed()
    );
    next_update(&mut updates, Duration::from_secs(10), |u| {
        *u == StoreUpdate::Up
    })
    .await;
    let revision = cas(&a, &state(1), 0, false, "1").await;
    state_arrives(&mut updates, revision).await;
}

#[tokio::test]
async fn a_store_works_from_any_runtime_and_dropping_it_in_async_code_is_fine() {
    let etcd = Etcd::start("runtimes").await;
    let store = std::sync::Arc::new(etcd.store("a"));
    // A runtime of its own on another thread, as a Pingora service has.
    let other = store.clone();
    let revision = std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
            .block_on(cas(&other, &state(1), 0, false, "1"))
    })
    .join()
    .unwrap();
    let loaded = store.load().await.unwrap().unwrap();
    assert_eq!(loaded.revision, revision);
    let mut updates = store.watch(revision);
    let mut driver = store.driver();
    drop(store);
    // Every stream ends with the store.
    within(Duration::from_secs(2), "the watch ends", async {
        while updates.recv().await.is_some() {}
    })
    .await;
    within(Duration::from_secs(2), "the driver flag ends", async {
        while driver.changed().await.is_ok() {}
    })
    .await;
}

#[tokio::test]
async fn etcd_not_running_at_start_is_no_error_and_the_store_connects_later() {
    let mut etcd = Etcd::start("late").await;
    etcd.stop();
    let started = Instant::now();
    let store = etcd.store("a");
    assert!(started.elapsed() < Duration::from_millis(200));
    let mut updates = store.watch(0);
    next_update(&mut updates, REQUEST_TIMEOUT * 4, |u| {
        matches!(u, StoreUpdate::Down(_))
    })
    .await;
    assert!(matches!(
        store.load().await,
        Err(StoreError::Unavailable { .. })
    ));
    etcd.run().await;
    next_update(&mut updates, Duration::from_secs(10), |u| {
        *u == StoreUpdate::Up
    })
    .await;
    let mut driver = store.driver();
    wait_driver(&mut driver, true, Duration::from_secs(10)).await;
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn files_are_read_at_start_and_errors_name_the_field() {
    let dir = temp_dir("files");
    let mut config = EtcdConfig {
        endpoints: vec!["http://127.0.0.1:1".into()],
        prefix: "/x".into(),
        name: None,
        username: Some("root".into()),
        password_file: Some(dir.join("missing")),
        tls: None,
        request_timeout: REQUEST_TIMEOUT,
        lease_ttl: LEASE_TTL,
    };
    let error = EtcdStore::start(&config, "a".into()).err().unwrap();
    assert!(
        error.starts_with(&format!(
            "state_store.etcd.password_file: {}: cannot read: ",
            dir.join("missing").display()
        )),
        "{error}"
    );
    config.password_file = Some(write(&dir, "password", "secret\n"));
    let settings = crate::conn::Settings::read(&config).unwrap();
    assert!(format!("{:?}", settings.options).contains("\"secret\""));

    config.endpoints = vec!["https://127.0.0.1:1".into()];
    config.tls = Some(EtcdTls {
        ca_file: Some(dir.join("ca.pem")),
        cert_file: None,
        key_file: None,
    });
    let error = EtcdStore::start(&config, "a".into()).err().unwrap();
    assert!(
        error.starts_with(&format!(
            "state_store.etcd.tls.ca_file: {}/ca.pem: cannot read: ",
            dir.display()
        )),
        "{error}"
    );
    write(&dir, "ca.pem", "not a certificate\n");
    let error = EtcdStore::start(&config, "a".into()).err().unwrap();
    assert!(
        error.starts_with("state_store.etcd.tls.ca_file: ") && error.contains("no PEM certificate"),
        "{error}"
    );
    config.tls = Some(EtcdTls {
        ca_file: None,
        cert_file: None,
        key_file: None,
    });
    let error = EtcdStore::start(&config, "a".into()).err().unwrap();
    assert!(
        error.starts_with("state_store.etcd.tls.ca_file: needed"),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn user_and_password_and_a_wrong_password_is_refused() {
    let etcd = Etcd::start("auth").await;
    let mut raw = etcd.client().await;
    raw.role_add("root").await.unwrap();
    raw.user_add("root", "secret", None).await.unwrap();
    raw.user_grant_role("root", "root").await.unwrap();
    raw.auth_enable().await.unwrap();
    let dir = temp_dir("auth-files");

    let mut config = etcd.config();
    config.username = Some("root".into());
    config.password_file = Some(write(&dir, "password", "secret\n"));
    let store = EtcdStore::start(&config, "a".into()).unwrap();
    let revision = cas(&store, &state(1), 0, false, "1").await;
    let mut updates = store.watch(0);
    next_update(
        &mut updates,
        Duration::from_secs(5),
        |u| matches!(u, StoreUpdate::State(s) if s.revision == revision),
    )
    .await;
    let mut driver = store.driver();
    wait_driver(&mut driver, true, LEASE_TTL + Duration::from_secs(2)).await;

    config.password_file = Some(write(&dir, "wrong", "wrong\n"));
    let wrong = EtcdStore::start(&config, "b".into()).unwrap();
    match wrong.load().await {
        Err(StoreError::Refused { reason, .. }) => {
            assert!(reason.contains("authentication failed"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Makes a CA, a server certificate for 127.0.0.1 and a client certificate with `openssl`.
fn tls_files(dir: &Path) -> TlsFiles {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test ca",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for who in ["server", "client"] {
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{who}.key"),
            "-out",
            &format!("{who}.csr"),
            "-subj",
            &format!("/CN={who}"),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{who}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{who}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{who}.ext"),
        ]);
    }
    TlsFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}

#[tokio::test]
async fn tls_with_a_ca_and_a_client_certificate() {
    let dir = temp_dir("tls-files");
    let files = tls_files(&dir);
    let (ca, cert, key) = (
        files.ca.clone(),
        files.client_cert.clone(),
        files.client_key.clone(),
    );
    let etcd = Etcd::start_with("tls", Some(files)).await;
    let mut config = etcd.config();
    config.tls = Some(EtcdTls {
        ca_file: Some(ca.clone()),
        cert_file: Some(cert),
        key_file: Some(key),
    });
    let store = EtcdStore::start(&config, "a".into()).unwrap();
    let revision = within(
        Duration::from_secs(10),
        "a write over TLS",
        cas(&store, &state(1), 0, false, "1"),
    )
    .await;
    assert_eq!(store.load().await.unwrap().unwrap().revision, revision);

    // Without the client certificate etcd refuses the handshake.
    config.tls = Some(EtcdTls {
        ca_file: Some(ca),
        cert_file: None,
        key_file: None,
    });
    let anonymous = EtcdStore::start(&config, "b".into()).unwrap();
    assert!(anonymous.load().await.is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_dead_member_among_the_endpoints_does_not_fail_requests() {
    let etcd = Etcd::start("members").await;
    let mut config = etcd.config();
    // A member that is down: nothing listens there.
    config.endpoints = vec![format!("http://127.0.0.1:{}", free_port()), etcd.url()];
    let store = EtcdStore::start(&config, "a".into()).unwrap();
    let mut revision = 0;
    let mut failures = Vec::new();
    for i in 0..30 {
        match store
            .compare_and_swap(&state(i), revision, false, "n")
            .await
        {
            Ok(next) => revision = next,
            // An answer lost to a slow machine: the write was done.
            Err(StoreError::Conflict {
                current: Some(current),
            }) => revision = current.revision,
            Err(e) if e.to_string().contains("connect") => failures.push(e.to_string()),
            Err(e) => eprintln!("not the dead member's doing: {e}"),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test]
async fn an_idle_watch_stays_up() {
    let etcd = Etcd::start("idle").await;
    let store = etcd.store("a");
    let mut updates = watch_empty(&store).await;
    // Five request timeouts without a change: the progress answers keep it alive.
    tokio::time::sleep(REQUEST_TIMEOUT * 5).await;
    assert_eq!(
        updates.try_recv(),
        Err(tokio::sync::mpsc::error::TryRecvError::Empty)
    );
}

#[tokio::test]
async fn a_wiped_store_is_listed_again_and_found_empty() {
    let mut etcd = Etcd::start("wiped").await;
    let a = etcd.store("a");
    let mut revision = 0;
    for n in 1..=5 {
        revision = cas(&a, &state(n), revision, false, "n").await;
    }
    let mut updates = a.watch(revision);
    next_update(&mut updates, Duration::from_secs(5), |u| {
        *u == StoreUpdate::Up
    })
    .await;

    // A new cluster where the old one was: another cluster ID, revisions from 1 again.
    etcd.stop();
    std::fs::remove_dir_all(etcd.dir.join("data")).unwrap();
    etcd.run().await;
    // Told as a reset, with nothing in it: never as an empty state to run.
    let update = next_update(&mut updates, Duration::from_secs(10), |u| {
        matches!(
            u,
            StoreUpdate::Empty { .. } | StoreUpdate::State(_) | StoreUpdate::Reset { .. }
        )
    })
    .await;
    assert!(
        matches!(&update, StoreUpdate::Reset { state: None, reason } if reason.contains("backwards") || reason.contains("behind") || reason.contains("cluster")),
        "{update:?}"
    );
    // The follower writes back what it has; it is delivered although its revision is lower.
    let written = within(
        Duration::from_secs(5),
        "the write-back",
        cas(&a, &state(5), 0, false, "write back"),
    )
    .await;
    assert!(written < revision);
    state_arrives(&mut updates, written).await;
}

#[tokio::test]
async fn a_member_down_hands_over_to_another_member() {
    let mut members = Etcd::cluster("cluster", 3).await;
    let mut config = members[0].config();
    config.endpoints = members.iter().map(|m| m.url()).collect();
    let a = EtcdStore::start(&config, "a".into()).unwrap();
    let b = EtcdStore::start(&config, "b".into()).unwrap();
    let mut revision = cas(&a, &state(0), 0, false, "0").await;
    let mut updates = b.watch(revision);
    next_update(&mut updates, Duration::from_secs(5), |u| {
        *u == StoreUpdate::Up
    })
    .await;
    let (mut a_driver, mut b_driver) = (a.driver(), b.driver());
    let (driver, other, mut driver_flag, mut other_flag) =
        if one_driver(&mut a_driver, &mut b_driver).await {
            (a, b, a_driver, b_driver)
        } else {
            (b, a, b_driver, a_driver)
        };

    // The member both stores talk to goes (the first endpoint; it may be the leader).
    members[0].stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 1;
    // Once the cluster has settled (a new leader if needed), writes go without a failure.
    let mut in_a_row = 0;
    while in_a_row < 20 {
        match other
            .compare_and_swap(&state(n), revision, false, "n")
            .await
        {
            Ok(next) => {
                revision = next;
                n += 1;
                in_a_row += 1;
            }
            Err(StoreError::Unavailable { reason, .. }) => {
                assert!(Instant::now() < deadline, "still failing: {reason}");
                in_a_row = 0;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // The watch follows on another member, and delivers the last write.
    next_update(
        &mut updates,
        Duration::from_secs(5),
        |u| matches!(u, StoreUpdate::State(s) if s.revision == revision),
    )
    .await;
    // The driver's lease is kept alive through another member: it stays the driver.
    assert!(*driver_flag.borrow_and_update());
    assert!(!*other_flag.borrow());
    tokio::time::sleep(LEASE_TTL).await;
    assert!(*driver_flag.borrow());
    // And when it resigns, the other takes over through the members left.
    driver.resign().await;
    wait_driver(&mut other_flag, true, LEASE_TTL + Duration::from_secs(2)).await;
    assert!(other.report(&InstanceReport::default()).await.is_ok());
}

#[tokio::test]
async fn a_follower_slow_to_take_updates_is_no_silence() {
    let etcd = Etcd::start("slow").await;
    let store = etcd.store("a");
    let mut updates = watch_empty(&store).await;
    // More updates than the stream holds, then nobody reads for a while.
    let mut revision = 0;
    for n in 0..100 {
        revision = cas(&store, &state(n), revision, false, "n").await;
    }
    tokio::time::sleep(REQUEST_TIMEOUT * 5).await;
    let mut last = 0;
    while last != revision {
        match within(Duration::from_secs(1), "an update", updates.recv()).await {
            Some(StoreUpdate::State(s)) => {
                assert!(s.revision > last);
                last = s.revision;
            }
            other => panic!("{other:?}"),
        }
    }
    tokio::time::sleep(REQUEST_TIMEOUT * 2).await;
    assert_eq!(
        updates.try_recv(),
        Err(tokio::sync::mpsc::error::TryRecvError::Empty)
    );
}

#[tokio::test]
async fn a_write_sent_again_after_its_answer_was_lost_finds_itself() {
    let etcd = Etcd::start("again").await;
    let a = etcd.store("a");
    let first = cas(&a, &state(1), 0, false, "set 1").await;
    // The same write again (as after a lost answer): its own first try, not a conflict.
    let again = a
        .compare_and_swap(&state(1), 0, false, "set 1")
        .await
        .expect("found");
    assert_eq!(again, first);
    // Another change built on the same revision is a conflict as ever.
    let other = a.compare_and_swap(&state(2), 0, false, "set 2").await;
    assert!(
        matches!(other, Err(StoreError::Conflict { .. })),
        "{other:?}"
    );
}
