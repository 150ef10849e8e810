//! Retiring, proven on a pool built from a real config: who stays, who moves, and when.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue};
use switchyard_config::Config;

use crate::{
    BackendState, Change, Deadline, Metrics, Pool, Rejection, Request, Source, UpstreamCas,
};

const CONFIG: &str = "
listeners:
  - address: 127.0.0.1:8080
upstreams:
  users:
    algorithm: hash
    hash_on: {header: X-User-Id}
    backends:
      - address: 127.0.0.1:9001
      - address: 127.0.0.1:9002
      - address: 127.0.0.1:9003
  plain:
    backends:
      - address: 127.0.0.1:9101
routes:
  - name: all
    split:
      users: 1
";

fn config() -> Config {
    Config::from_yaml(CONFIG).expect("valid test config")
}

fn pool() -> Pool {
    pool_of(config(), None)
}

/// A pool of `config` (which names no CA file), taking over from `handover` when given.
fn pool_of(config: Config, handover: Option<&std::path::Path>) -> Pool {
    Pool::new(
        config,
        UpstreamCas::default(),
        Arc::new(Metrics::new()),
        handover,
    )
    .expect("pool")
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The port of the backend that user `id`'s request is sent to now.
fn pick(pool: &Pool, id: u32) -> Option<u16> {
    let mut headers = HeaderMap::new();
    headers.insert("x-user-id", HeaderValue::from(id));
    let request = Request {
        host: None,
        path: "/",
        query: None,
        method: &http::Method::GET,
        headers: &headers,
        client: None,
        issued: None,
    };
    let snapshot = pool.snapshot();
    let users = snapshot.upstream("users").expect("upstream");
    let backend = users.pick_backend(&request, None)?;
    Some(users.backends[backend].live.address.port())
}

fn picks(pool: &Pool, ids: std::ops::Range<u32>) -> BTreeMap<u32, u16> {
    ids.map(|id| (id, pick(pool, id).expect("a backend")))
        .collect()
}

fn retire(port: u16, timeout: Option<Duration>) -> Change {
    Change::RetireBackend {
        upstream: "users".into(),
        address: addr(port),
        weight: None,
        timeout,
    }
}

fn set_state(port: u16, state: BackendState) -> Change {
    Change::UpdateBackend {
        upstream: "users".into(),
        address: addr(port),
        weight: None,
        state: Some(state),
    }
}

fn state_of(pool: &Pool, port: u16) -> BackendState {
    let snapshot = pool.snapshot();
    let users = snapshot.upstream("users").expect("upstream");
    let backend = users.backends.iter().find(|b| b.live.address == addr(port));
    backend.expect("backend").state
}

/// Where each user goes once `port` is gone from the ring: a pool of its own in which the
/// backend is draining (its filter is empty: nothing was sent through it).
fn without(port: u16, ids: std::ops::Range<u32>) -> BTreeMap<u32, u16> {
    let pool = pool();
    pool.apply(&set_state(port, BackendState::Draining), Source::Api)
        .expect("drain");
    picks(&pool, ids)
}

#[test]
fn users_of_a_retiring_backend_stay_new_ones_avoid_it_and_no_one_else_moves() {
    let pool = pool();
    let old = picks(&pool, 0..300);
    let retiring = 9002;
    let its_users = old.values().filter(|&&p| p == retiring).count();
    assert!(its_users > 50, "{its_users} of 300 users on {retiring}");
    let gone = without(retiring, 0..300);
    let new_users = without(retiring, 10_000..10_300);

    pool.apply(&retire(retiring, None), Source::Api)
        .expect("retire");
    let until = state_of(&pool, retiring)
        .retiring_until()
        .expect("retiring");
    let ten_minutes = until.remaining(SystemTime::now());
    assert!(
        ten_minutes > Duration::from_secs(590) && ten_minutes <= Duration::from_secs(600),
        "the upstream's retire_timeout: {ten_minutes:?}"
    );
    // Twice: a retiring backend's users are not forgotten by being served.
    for _ in 0..2 {
        assert_eq!(picks(&pool, 0..300), old, "every user where it was");
    }
    // New users go where they will stay, and never to the retiring backend.
    let fresh = picks(&pool, 10_000..10_300);
    assert_eq!(fresh, new_users);
    assert!(fresh.values().all(|&p| p != retiring));

    // Before the deadline nothing ends; at it the backend drains.
    assert_eq!(
        pool.end_due_retirements(until.time() - Duration::from_millis(1)),
        Some(until)
    );
    assert_eq!(state_of(&pool, retiring), BackendState::Retiring { until });
    assert_eq!(pool.end_due_retirements(until.time()), None);
    assert_eq!(state_of(&pool, retiring), BackendState::Draining);
    // Its users move once, to where the ring without it sends them; nobody else moves.
    assert_eq!(picks(&pool, 0..300), gone);
    for (id, port) in &gone {
        if old[id] != retiring {
            assert_eq!(*port, old[id], "user {id} was not on the retiring backend");
        }
    }
    assert_eq!(picks(&pool, 10_000..10_300), fresh);

    let event = pool.events().since(0, 100).pop().expect("an event");
    assert_eq!(
        (event.source, &*event.kind),
        (Source::Retire, "backend_changed")
    );
    assert_eq!(
        event.before,
        Some(
            serde_json::json!({"weight": 1, "state": "retiring", "retiring_until": until.to_string()})
        )
    );
    assert_eq!(
        event.after,
        Some(serde_json::json!({"weight": 1, "state": "draining"}))
    );
    assert!(
        event.message.contains("retire_timeout is over"),
        "{}",
        event.message
    );
    // Draining and idle: it may go.
    let remove = Change::RemoveBackend {
        upstream: "users".into(),
        address: addr(retiring),
    };
    pool.apply(&remove, Source::Api).expect("removed");
}

#[test]
fn a_user_that_moved_past_one_retiring_backend_stays_when_the_next_one_retires() {
    let full_ring = picks(&pool(), 10_000..10_600);
    let pool = pool();
    pool.apply(&retire(9001, None), Source::Api)
        .expect("retire 9001");
    // New users whose key finds 9001 first go past it; some to 9002, which records them.
    let on_9002 = picks(&pool, 10_000..10_600);
    let past_9001: Vec<u32> = (10_000..10_600)
        .filter(|id| full_ring[id] == 9001 && on_9002[id] == 9002)
        .collect();
    assert!(
        past_9001.len() > 20,
        "{} users went past 9001 to 9002",
        past_9001.len()
    );
    pool.apply(&retire(9002, None), Source::Api)
        .expect("retire 9002");
    // Both retire: each keeps its users, 9002 those that came past 9001 too.
    assert_eq!(picks(&pool, 10_000..10_600), on_9002);
    // Users neither has go to the one backend left.
    assert!(picks(&pool, 20_000..20_200).values().all(|&p| p == 9003));
}

#[test]
fn a_retiring_backend_that_fails_loses_its_users() {
    let pool = pool();
    let old = picks(&pool, 0..200);
    let retiring = 9001;
    pool.apply(
        &retire(retiring, Some(Duration::from_secs(60))),
        Source::Api,
    )
    .expect("retire");
    let snapshot = pool.snapshot();
    let live = Arc::clone(&snapshot.upstream("users").unwrap().backends[0].live);
    assert_eq!(live.address, addr(retiring));
    live.set_healthy(false);
    let gone = without(retiring, 0..200);
    // At once (the snapshot is not rebuilt yet), and after the rebuild.
    assert_eq!(picks(&pool, 0..200), gone);
    pool.refresh();
    assert_eq!(picks(&pool, 0..200), gone);
    // Back in health before the deadline, its users come back.
    live.set_healthy(true);
    pool.refresh();
    assert_eq!(picks(&pool, 0..200), old);
}

#[test]
fn retiring_is_refused_without_a_key_a_weight_or_from_draining_and_ends_only_as_set() {
    let pool = pool();
    let plain = Change::RetireBackend {
        upstream: "plain".into(),
        address: addr(9101),
        weight: None,
        timeout: None,
    };
    match pool.apply(&plain, Source::Api) {
        Err(Rejection::Invalid(why)) => {
            assert!(why.starts_with("state: \"retiring\""), "{why}");
            assert!(
                why.contains("round_robin") && why.contains("use \"draining\""),
                "{why}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        pool.apply(&retire(9001, Some(Duration::ZERO)), Source::Api),
        Err(Rejection::Invalid(
            "retire_timeout: must be longer than 0s".into()
        ))
    );
    // Nor past a week: a deadline must be a time the state file can hold.
    let too_long = Duration::from_secs(100_000_000 * 3600);
    assert_eq!(
        pool.apply(&retire(9001, Some(too_long)), Source::Api),
        Err(Rejection::Invalid(
            "retire_timeout: 100000000h is longer than the limit of 168h (7 days)".into()
        ))
    );
    assert_eq!(state_of(&pool, 9001), BackendState::Active);

    // The algorithm decides first: no timeout is right where there is no key.
    let plain_zero = Change::RetireBackend {
        upstream: "plain".into(),
        address: addr(9101),
        weight: None,
        timeout: Some(Duration::ZERO),
    };
    match pool.apply(&plain_zero, Source::Api) {
        Err(Rejection::Invalid(why)) => assert!(why.contains("use \"draining\""), "{why}"),
        other => panic!("{other:?}"),
    }
    // Weight 0 would serve none of its users: that is draining, said so.
    let weightless = Change::RetireBackend {
        upstream: "users".into(),
        address: addr(9001),
        weight: Some(0),
        timeout: None,
    };
    match pool.apply(&weightless, Source::Api) {
        Err(Rejection::Invalid(why)) => {
            assert!(
                why.starts_with("weight: ") && why.contains("\"draining\""),
                "{why}"
            )
        }
        other => panic!("{other:?}"),
    }
    // A draining or disabled backend's users have moved away: retiring would call them back.
    for state in [BackendState::Draining, BackendState::Disabled] {
        pool.apply(&set_state(9003, state), Source::Api)
            .expect("set");
        match pool.apply(&retire(9003, None), Source::Api) {
            Err(Rejection::Conflict(why)) => {
                assert!(why.contains(&format!("is {}", state.as_str())), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(state_of(&pool, 9003), state);
    }

    pool.apply(&retire(9001, Some(Duration::from_secs(5))), Source::Api)
        .expect("retire");
    let until = state_of(&pool, 9001).retiring_until().expect("retiring");
    // Nor can a retiring backend's weight go to 0.
    let zero = Change::UpdateBackend {
        upstream: "users".into(),
        address: addr(9001),
        weight: Some(0),
        state: None,
    };
    assert!(matches!(
        pool.apply(&zero, Source::Api),
        Err(Rejection::Invalid(why)) if why.starts_with("weight: ")
    ));
    let remove = Change::RemoveBackend {
        upstream: "users".into(),
        address: addr(9001),
    };
    match pool.apply(&remove, Source::Api) {
        Err(Rejection::Conflict(why)) => assert!(why.contains("is retiring until"), "{why}"),
        other => panic!("{other:?}"),
    }
    // Retired again, to a later deadline: the first one ends nothing.
    pool.apply(&retire(9001, Some(Duration::from_secs(3600))), Source::Api)
        .expect("retire again");
    let later = state_of(&pool, 9001).retiring_until().expect("retiring");
    assert!(later > until);
    let stale = Change::EndRetiring {
        upstream: "users".into(),
        address: addr(9001),
        until,
    };
    assert!(matches!(
        pool.apply(&stale, Source::Retire),
        Err(Rejection::Conflict(_))
    ));
    assert_eq!(
        pool.end_due_retirements(until.time() + Duration::from_secs(1)),
        Some(later)
    );
    // Set active by the operator: nothing is left to end.
    pool.apply(&set_state(9001, BackendState::Active), Source::Api)
        .expect("active");
    assert_eq!(
        pool.end_due_retirements(later.time() + Duration::from_secs(1)),
        None
    );
    assert_eq!(state_of(&pool, 9001), BackendState::Active);
}

#[test]
fn a_saved_retiring_backend_survives_a_restart_and_a_file_that_stopped_hashing() {
    let dir = std::env::temp_dir().join(format!("switchyard-retire-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("state.json");
    let mut with_file = config();
    with_file.state_file = Some(path.clone());
    let pool = pool_of(with_file.clone(), None);
    pool.apply(&retire(9003, Some(Duration::from_secs(120))), Source::Api)
        .expect("retire");
    let until = state_of(&pool, 9003).retiring_until().expect("retiring");

    let text = std::fs::read_to_string(&path).expect("saved");
    let saved: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(saved["format"], 4, "{text}");
    assert_eq!(
        saved["upstreams"]["users"]["changed"]["127.0.0.1:9003"]["state"],
        serde_json::json!({"retiring": {"until": until.to_string()}})
    );
    let restarted = pool_of(with_file.clone(), None);
    assert_eq!(state_of(&restarted, 9003), BackendState::Retiring { until });
    let metrics = restarted
        .metrics()
        .render(&restarted.snapshot(), &restarted.rollouts());
    let metrics = String::from_utf8(metrics).expect("text");
    assert!(
        metrics.contains(
            "switchyard_backend_state{backend=\"127.0.0.1:9003\",state=\"retiring\",upstream=\"users\"} 1"
        ),
        "{metrics}"
    );
    // Back to active: written in the format older binaries read.
    restarted
        .apply(&set_state(9003, BackendState::Active), Source::Api)
        .expect("active");
    assert!(!std::fs::read_to_string(&path)
        .expect("saved")
        .contains("format"));

    // A state file whose retiring backend's upstream no longer hashes: it drains.
    restarted
        .apply(&retire(9003, None), Source::Api)
        .expect("retire");
    let mut round_robin = with_file;
    round_robin.upstreams.retain(|u| u.name != "users");
    let mut users = config().upstream("users").expect("users").clone();
    users.algorithm = switchyard_config::Algorithm::RoundRobin;
    users.hash_on = None;
    round_robin.upstreams.push(users);
    round_robin.upstreams.sort_by(|a, b| a.name.cmp(&b.name));
    let warnings = restarted.reload(round_robin, UpstreamCas::default());
    assert_eq!(state_of(&restarted, 9003), BackendState::Draining);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("no longer ip_hash or hash: it is draining")),
        "{warnings:?}"
    );
    std::fs::remove_dir_all(dir).expect("clean up");
}

#[test]
fn deadlines_are_whole_milliseconds_in_rfc3339() {
    let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_796_119_200_123_456_789);
    let deadline = Deadline::after(at, Duration::from_secs(2));
    assert_eq!(deadline.to_string(), "2026-12-01T10:00:02.123Z");
    let json = serde_json::to_value(deadline).expect("json");
    assert_eq!(json, "2026-12-01T10:00:02.123Z");
    assert_eq!(
        serde_json::from_value::<Deadline>(json).expect("reads back"),
        deadline
    );
    assert_eq!(deadline.remaining(at), Duration::from_nanos(1_999_543_211));
    assert_eq!(deadline.remaining(deadline.time()), Duration::ZERO);
    assert!(serde_json::from_value::<Deadline>("tomorrow".into()).is_err());

    // However far off, a deadline formats, and what it writes reads back.
    let latest = Deadline::after(SystemTime::now(), Duration::MAX);
    assert_eq!(latest.to_string(), "9999-12-31T23:59:59.999Z");
    let json = serde_json::to_value(latest).expect("json");
    assert_eq!(
        serde_json::from_value::<Deadline>(json).expect("reads back"),
        latest
    );
    let past_it = serde_json::json!("9999-12-31T23:59:59-23:59");
    assert_eq!(
        serde_json::from_value::<Deadline>(past_it).expect("reads"),
        latest
    );
    let before_1970 = serde_json::json!("1960-01-01T00:00:00Z");
    let passed = serde_json::from_value::<Deadline>(before_1970).expect("reads");
    assert_eq!(passed.time(), SystemTime::UNIX_EPOCH);
}

#[test]
fn a_state_file_with_absurd_deadlines_loads_and_ends_the_passed_one() {
    let dir = std::env::temp_dir().join(format!("switchyard-retire-absurd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("state.json");
    std::fs::write(
        &path,
        r#"{"format": 4, "upstreams": {"users": {"changed": {
            "127.0.0.1:9001": {"state": {"retiring": {"until": "9999-12-31T23:59:59-23:59"}}},
            "127.0.0.1:9002": {"state": {"retiring": {"until": "1960-01-01T00:00:00Z"}}}}}}}"#,
    )
    .expect("write");
    let mut with_file = config();
    with_file.state_file = Some(path.clone());
    let pool = pool_of(with_file.clone(), None);
    let latest = Deadline::after(SystemTime::now(), Duration::MAX);
    assert_eq!(
        state_of(&pool, 9001),
        BackendState::Retiring { until: latest }
    );
    assert!(state_of(&pool, 9002).retiring_until().is_some());
    assert_eq!(pool.end_due_retirements(SystemTime::now()), Some(latest));
    assert_eq!(state_of(&pool, 9002), BackendState::Draining);
    // What the change saved reads back whole at the next start.
    let restarted = pool_of(with_file, None);
    assert_eq!(
        state_of(&restarted, 9001),
        BackendState::Retiring { until: latest }
    );
    assert_eq!(state_of(&restarted, 9002), BackendState::Draining);
    std::fs::remove_dir_all(dir).expect("clean up");
}

#[test]
fn filters_rotate_each_retire_timeout_except_a_retiring_backends() {
    let pool = pool();
    let period = Duration::from_secs(600);
    // The first pass starts every filter's clock.
    assert_eq!(pool.rotate_filters(0), Some(period));
    let old = picks(&pool, 0..200);
    let retiring = 9003;
    pool.apply(&retire(retiring, None), Source::Api)
        .expect("retire");
    let minute = Duration::from_secs(60);
    assert_eq!(
        pool.rotate_filters(540_000),
        Some(minute),
        "the next rotation of the others"
    );
    // Long after its users' last requests, they are still its users: what it has is what it
    // had when it started to retire.
    for periods in 1..=3 {
        pool.rotate_filters(periods * 600_000);
    }
    let snapshot = pool.snapshot();
    let users = snapshot.upstream("users").expect("upstream");
    let forgotten = users.backends[0].keys.as_ref().expect("a filter");
    let of_9001 = old.iter().find(|(_, &p)| p == 9001).map(|(&id, _)| id);
    let key = crate::keys::KeyHash::of(of_9001.expect("a user").to_string().as_bytes());
    assert!(
        !forgotten.knows(key),
        "an active backend's filter forgets in two periods"
    );
    assert_eq!(picks(&pool, 0..200), old);
}

#[test]
fn a_retiring_backends_users_are_handed_over_at_an_upgrade() {
    let dir =
        std::env::temp_dir().join(format!("switchyard-retire-handover-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let handover = dir.join("upgrade.sock.state.json");
    let old = pool();
    let before = picks(&old, 0..300);
    old.apply(&retire(9002, None), Source::Api).expect("retire");
    old.hand_over(&handover).expect("handed over");
    assert!(super::keys_path(&handover).exists());

    let new = pool_of(config(), Some(&handover));
    assert!(!super::keys_path(&handover).exists(), "taken over once");
    assert!(state_of(&new, 9002).retiring_until().is_some());
    assert_eq!(picks(&new, 0..300), before, "its users are still its users");
    assert!(picks(&new, 10_000..10_300).values().all(|&p| p != 9002));

    // Nothing retiring: nothing handed over, and an older file is not left for a later one.
    std::fs::write(super::keys_path(&handover), b"stale").expect("write");
    new.apply(&set_state(9002, BackendState::Active), Source::Api)
        .expect("active");
    new.hand_over(&handover).expect("handed over");
    assert!(!super::keys_path(&handover).exists());
    // A damaged file is a warning, not a failed start.
    std::fs::write(
        super::keys_path(&handover),
        b"switchyard retiring keys 1\n\x05",
    )
    .expect("write");
    pool_of(config(), Some(&handover));

    // The temp files of a process that died writing one go at the next start, an upgrade's
    // or not; a live writer's stay.
    let mut child = std::process::Command::new("true").spawn().expect("true");
    let dead = child.id();
    child.wait().expect("wait");
    let temp = |pid: u32| {
        let mut name = super::keys_path(&handover).into_os_string();
        name.push(format!(".tmp-{pid}-00ff"));
        std::path::PathBuf::from(name)
    };
    for pid in [dead, 1] {
        std::fs::write(temp(pid), b"half").expect("temp");
    }
    pool_of(config(), Some(&handover));
    assert!(!temp(dead).exists() && temp(1).exists());
    std::fs::write(temp(dead), b"half").expect("temp");
    std::fs::write(super::keys_path(&handover), b"stale").expect("write");
    super::discard_keys(&handover);
    assert!(!temp(dead).exists() && temp(1).exists());
    assert!(!super::keys_path(&handover).exists());
    std::fs::remove_dir_all(dir).expect("clean up");
}

#[test]
fn a_process_that_handed_over_ends_no_retiring_window() {
    let dir =
        std::env::temp_dir().join(format!("switchyard-retire-stopped-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let old = pool();
    old.apply(&retire(9002, Some(Duration::from_secs(5))), Source::Api)
        .expect("retire");
    let until = state_of(&old, 9002).retiring_until().expect("retiring");
    old.hand_over(&dir.join("upgrade.sock.state.json"))
        .expect("handed over");
    // Past the deadline, the old process (still running for Pingora's shutdown) leaves the
    // window to the new one, which has the state.
    let later = until.time() + Duration::from_secs(1);
    assert_eq!(old.end_due_retirements(later), None);
    assert_eq!(state_of(&old, 9002), BackendState::Retiring { until });
    let end = Change::EndRetiring {
        upstream: "users".into(),
        address: addr(9002),
        until,
    };
    assert!(matches!(
        old.apply(&end, Source::Retire),
        Err(Rejection::Conflict(_))
    ));
    std::fs::remove_dir_all(dir).expect("clean up");
}
