//! The engine that drives every running rollout: once per `analysis.interval` it reads the
//! balancer's own counters for `to` and `from` on the route, judges the window, counts hold
//! time, and moves to the next step (after its checks), succeeds, or fails by `on_failure`.
//!
//! Everything it decides goes to the pool as one `Change::RolloutUpdate` built on the record
//! it read, so an operator's command in between wins and the engine simply reads again. The
//! engine keeps only what is worth nothing after a restart: the counter readings a window is
//! measured from, and whether a window passed at this step since the engine took over (the
//! contract asks for a new passing window after a restart or upgrade).
//!
//! One engine drives at a time: the pool's store says whether this process may (always on one
//! node; with a shared store, while it holds the store's lease, and its windows then count
//! every instance's traffic), and [`Engine::stop`] ends driving before a binary upgrade hands
//! the state over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{debug, info, warn};
use switchyard_config::rollout::{Hold, OnFailure};
use switchyard_pool::ClusterReading;
use switchyard_pool::{Change, Pool, Rejection, Rollout, RolloutState, Verdict, WindowRecord};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::checks::{run_checks, Prober};
use crate::judge::{judge, Counts};

pub struct Engine {
    pool: Arc<Pool>,
    prober: Arc<dyn Prober>,
    /// `false` once stopped. Held while a change is applied, so that when [`Engine::stop`]
    /// returns no change of the engine is half made and none follows.
    driving: Mutex<bool>,
    /// Numbers each start of checks.
    generations: std::sync::atomic::AtomicU64,
}

/// What the engine remembers of one rollout between windows.
struct Driver {
    /// The record taken over, for which rollout of the route this is (`same_rollout`): a
    /// route's next rollout gets a new driver.
    rollout: Rollout,
    /// When the next window closes.
    due: Instant,
    /// When the last window closed (or the engine took the rollout over).
    last: Instant,
    /// The pairs' counters over every instance when the window began.
    to_before: ClusterReading,
    from_before: ClusterReading,
    /// A window passed at the current step since this engine took the rollout over.
    passed: bool,
    /// The step `passed` is about.
    step: Option<usize>,
    /// The checks of the next step, while they run: windows go on being judged meanwhile.
    checks: Option<RunningChecks>,
}

impl Driver {
    /// The rollout is at `step` now: its first window starts here, not at the last window's
    /// end, and a window must pass at it.
    fn start_step(&mut self, pool: &Pool, step: Option<usize>, interval: Duration) {
        let now = Instant::now();
        self.last = now;
        self.due = now + interval;
        self.step = step;
        self.passed = false;
        (self.to_before, self.from_before) = self.read(pool);
    }

    /// The counters of `to` and `from` now, over every instance.
    fn read(&self, pool: &Pool) -> (ClusterReading, ClusterReading) {
        let r = &self.rollout;
        (
            pool.cluster_reading(&r.route, &r.to),
            pool.cluster_reading(&r.route, &r.from),
        )
    }
}

struct RunningChecks {
    /// The step they are for.
    next: usize,
    /// Tells these checks' end from that of checks dropped before (held, replaced).
    generation: u64,
    result: oneshot::Receiver<Result<(), String>>,
    task: tokio::task::JoinHandle<()>,
}

/// Checks that are dropped stop: their result could only be stale.
impl Drop for RunningChecks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Engine {
    pub fn new(pool: Arc<Pool>, prober: Arc<dyn Prober>) -> Engine {
        Engine {
            pool,
            prober,
            driving: Mutex::new(true),
            generations: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Stops driving for good: no change of the engine's is applied after this returns.
    pub fn stop(&self) {
        *self.gate() = false;
        info!("rollout engine stopped; running rollouts stay where they are for the next process");
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, bool> {
        self.driving.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drives rollouts until `shutdown` turns true (or the engine is stopped).
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.pool.subscribe_rollouts();
        let mut drivers: HashMap<String, Driver> = HashMap::new();
        // Check tasks name their route here when they are done, so it is driven at once.
        let (checked, mut checks_done) = mpsc::unbounded_channel::<(String, u64)>();
        loop {
            if *shutdown.borrow() || !*self.gate() {
                return;
            }
            // Of several instances sharing a store, the one holding its lease drives
            // (always this one on one node); a deposed driver's writes fail at the store.
            if self.pool.is_driver() {
                self.follow(&mut drivers);
                let now = Instant::now();
                let due: Vec<String> = drivers
                    .iter()
                    .filter(|(_, d)| d.due <= now)
                    .map(|(route, _)| route.clone())
                    .collect();
                for route in due {
                    self.drive(&route, &mut drivers, &checked);
                }
            } else {
                // Another instance drives; ours starts afresh when the lease comes back.
                drivers.clear();
            }
            let next = drivers
                .values()
                .map(|d| d.due)
                .min()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                changed = changes.changed() => if changed.is_err() { return },
                Some((route, generation)) = checks_done.recv() => {
                    self.checks_done(&route, generation, &mut drivers)
                }
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Takes on rollouts that started (or were resumed from the state) and lets go of those
    /// that ended or were replaced by a newer one on their route.
    fn follow(&self, drivers: &mut HashMap<String, Driver>) {
        let running: Vec<Rollout> = self
            .pool
            .rollouts()
            .into_iter()
            .filter(|r| r.state.is_active())
            .collect();
        drivers.retain(|route, d| {
            running
                .iter()
                .any(|r| r.route == *route && r.same_rollout(&d.rollout))
        });
        for rollout in running {
            if !drivers.contains_key(&rollout.route) {
                drivers.insert(rollout.route.clone(), self.take_on(&rollout));
            }
        }
    }

    fn take_on(&self, rollout: &Rollout) -> Driver {
        let now = Instant::now();
        let to_before = self.pool.cluster_reading(&rollout.route, &rollout.to);
        let from_before = self.pool.cluster_reading(&rollout.route, &rollout.from);
        info!("rollout {}: driving", rollout.describe());
        Driver {
            rollout: rollout.clone(),
            // Before the first step there is nothing to wait for: checks, then step 1.
            due: if rollout.step.is_none() {
                now
            } else {
                now + rollout.spec.analysis.interval
            },
            last: now,
            to_before,
            from_before,
            passed: false,
            step: rollout.step,
            checks: None,
        }
    }

    /// Closes one window of one rollout and acts on it.
    fn drive(
        &self,
        route: &str,
        drivers: &mut HashMap<String, Driver>,
        checked: &mpsc::UnboundedSender<(String, u64)>,
    ) {
        let Some(mut rollout) = self.pool.rollout(route).filter(|r| r.state.is_active()) else {
            drivers.remove(route);
            return;
        };
        let Some(driver) = drivers.get_mut(route) else {
            return;
        };
        if !driver.rollout.same_rollout(&rollout) {
            // Replaced since `follow`: its counters and timing are another rollout's.
            *driver = self.take_on(&rollout);
            return;
        }
        let now = Instant::now();
        let elapsed = now - driver.last;
        driver.last = now;
        driver.due = now + rollout.spec.analysis.interval;
        if driver.step != rollout.step {
            driver.step = rollout.step;
            driver.passed = false;
        }
        let (to_now, from_now) = driver.read(&self.pool);
        let to = counts(&to_now, &driver.to_before);
        let from = counts(&from_now, &driver.from_before);
        driver.to_before = to_now;
        driver.from_before = from_now;

        let mut verdict = None;
        if rollout.step.is_some() {
            let (v, why) = judge(&rollout.spec.analysis, &to, &from);
            verdict = Some(v);
            rollout.push_window(WindowRecord {
                at: switchyard_pool::events::now(),
                step: rollout.step_number(),
                requests: to.requests,
                errors: to.errors,
                error_rate: to.error_rate(),
                p99_ms: to.p99.map(as_ms),
                baseline_p99_ms: from.p99.map(as_ms),
                baseline_requests: from.requests,
                verdict: v,
                reason: why.clone(),
            });
            match v {
                Verdict::Passed => {
                    driver.passed = true;
                    rollout.stalled_ms = 0;
                }
                Verdict::Failed => {
                    rollout.failed_windows += 1;
                    let limit = rollout.spec.analysis.failure_limit;
                    let why = why.unwrap_or_default();
                    if rollout.failed_windows > limit {
                        let reason = format!(
                            "analysis failed at step {}/{} ({} failed windows, failure_limit {limit}): {why}",
                            rollout.step_number(),
                            rollout.spec.steps.len(),
                            rollout.failed_windows
                        );
                        fail(&mut rollout, reason);
                    } else {
                        warn!(
                            "rollout {}: window failed ({} of failure_limit {limit}): {why}",
                            rollout.describe(),
                            rollout.failed_windows
                        );
                    }
                }
                Verdict::Inconclusive => {}
            }
        }
        if rollout.state == RolloutState::Progressing {
            let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
            if rollout.step.is_some() {
                rollout.held_ms = rollout.held_ms.saturating_add(ms);
                if verdict != Some(Verdict::Passed) {
                    rollout.stalled_ms = rollout.stalled_ms.saturating_add(ms);
                }
            }
            let deadline = rollout.spec.progress_deadline;
            if u128::from(rollout.stalled_ms) >= deadline.as_millis() {
                let last = rollout
                    .windows
                    .last()
                    .and_then(|w| w.reason.clone())
                    .unwrap_or_else(|| "no window judged".into());
                let reason = format!(
                    "no passing window for {} at step {}/{} (progress_deadline); last window: {last}",
                    switchyard_config::format_duration(deadline),
                    rollout.step_number(),
                    rollout.spec.steps.len()
                );
                fail(&mut rollout, reason);
            } else if driver.checks.is_some() {
                // Waiting for the next step's checks; the window above was judged anyway.
            } else if ready(&rollout, driver.passed) {
                match next_step(&mut rollout) {
                    None => {}
                    Some(next) if rollout.spec.checks.is_empty() => take_step(&mut rollout, next),
                    Some(next) => {
                        driver.checks = Some(self.start_checks(route, &rollout, next, checked))
                    }
                }
            }
        }
        if rollout.state != RolloutState::Progressing {
            // Checks are for a rollout that moves on; a held one runs them again on resume.
            driver.checks = None;
        }
        let (step, interval) = (rollout.step, rollout.spec.analysis.interval);
        if self.commit(route, rollout, verdict) && step != driver.step {
            driver.start_step(&self.pool, step, interval);
        }
    }

    /// The next step's checks are in: take the step, or fail the rollout, at once (not at
    /// the next window), unless the rollout was held or changed meanwhile, or the traffic since
    /// the last window fails: then that window is judged now and the step waits.
    fn checks_done(&self, route: &str, generation: u64, drivers: &mut HashMap<String, Driver>) {
        let Some(driver) = drivers.get_mut(route) else {
            return;
        };
        if driver.checks.as_ref().map(|c| c.generation) != Some(generation) {
            return;
        }
        let Some(mut running) = driver.checks.take() else {
            return;
        };
        let Ok(result) = running.result.try_recv() else {
            return;
        };
        let Some(mut rollout) = self.pool.rollout(route).filter(|r| {
            r.state == RolloutState::Progressing
                && r.same_rollout(&driver.rollout)
                && r.step == driver.step
        }) else {
            return;
        };
        if rollout.step.is_some() {
            let (to_now, from_now) = driver.read(&self.pool);
            let to = counts(&to_now, &driver.to_before);
            let from = counts(&from_now, &driver.from_before);
            if judge(&rollout.spec.analysis, &to, &from).0 == Verdict::Failed {
                // Judged as a window of its own now, by `drive`; checks again when it is
                // ready to move on.
                driver.due = Instant::now();
                return;
            }
        }
        match result {
            Ok(()) => take_step(&mut rollout, running.next),
            Err(why) => {
                let reason = format!(
                    "{why}, before step {}/{}; the weight did not move",
                    running.next + 1,
                    rollout.spec.steps.len()
                );
                fail(&mut rollout, reason);
            }
        }
        let (step, interval) = (rollout.step, rollout.spec.analysis.interval);
        if self.commit(route, rollout, None) {
            // The traffic since the last window passed or said nothing (above), at the old
            // weight.
            driver.start_step(&self.pool, step, interval);
        }
    }

    /// Starts the checks of step `next` on their own task; the route is named on `checked`
    /// when they are done.
    fn start_checks(
        &self,
        route: &str,
        rollout: &Rollout,
        next: usize,
        checked: &mpsc::UnboundedSender<(String, u64)>,
    ) -> RunningChecks {
        let (tell, result) = oneshot::channel();
        let prober = Arc::clone(&self.prober);
        let checks = rollout.spec.checks.clone();
        let checked = checked.clone();
        let route = route.to_string();
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let task = tokio::spawn(async move {
            let _ = tell.send(run_checks(&*prober, &checks).await);
            let _ = checked.send((route, generation));
        });
        RunningChecks {
            next,
            generation,
            result,
            task,
        }
    }

    /// Hands the new record to the pool, unless this process no longer drives. Whether it
    /// was taken.
    fn commit(&self, route: &str, mut rollout: Rollout, verdict: Option<Verdict>) -> bool {
        let gate = self.gate();
        if !*gate || !self.pool.is_driver() {
            return false;
        }
        rollout.updated_at = switchyard_pool::events::now();
        let ended = (!rollout.state.is_active()).then_some(rollout.state);
        let change = Change::RolloutUpdate {
            route: route.to_string(),
            next: Box::new(rollout),
        };
        let taken = match self.pool.apply_rollout_update(&change) {
            Ok(()) => {
                if let Some(verdict) = verdict {
                    self.pool.metrics().count_window(route, verdict);
                }
                if let Some(state) = ended {
                    info!("rollout on route {route} ended: {}", state.as_str());
                }
                true
            }
            // An operator's command came in between; the next window starts from it.
            Err(Rejection::Conflict(why)) => {
                debug!("rollout on route {route}: {why}");
                false
            }
            Err(e) => {
                warn!("rollout on route {route}: cannot record its progress: {e}");
                false
            }
        };
        drop(gate);
        taken
    }
}

/// The step after the current one, or `None` once the last is done (then the rollout has
/// succeeded).
fn next_step(rollout: &mut Rollout) -> Option<usize> {
    match rollout.step {
        Some(i) if i >= rollout.spec.last_step() => {
            rollout.weight = 100.0;
            let reason = format!(
                "every step passed: {:?} has the whole share of {:?}",
                rollout.to, rollout.from
            );
            rollout.end(RolloutState::Succeeded, reason);
            None
        }
        // Weight steps at or below `to`'s share at start are skipped (after the first weight
        // step taken, every later one is above it). Match steps never are: each adds users
        // who go to `to`, whatever its share.
        Some(i) => Some(next_step_after(rollout, i + 1)),
        None => Some(next_step_after(rollout, 0)),
    }
}

/// The first step from index `from` on that changes something at `to`'s current share.
fn next_step_after(rollout: &Rollout, from: usize) -> usize {
    rollout
        .spec
        .steps
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, s)| s.weight().is_none_or(|w| w > rollout.weight))
        .map_or(rollout.spec.last_step(), |(i, _)| i)
}

/// Moves the rollout to step `next` (its checks have passed).
fn take_step(rollout: &mut Rollout, next: usize) {
    let steps = &rollout.spec.steps;
    // A match step leaves the weight where the last weight step put it (or where it was at
    // start: 0 unless `to` had a share then).
    let weight = steps[next].weight().unwrap_or(rollout.weight);
    info!(
        "rollout on route {}: step {}/{} ({}), {} at {weight}%",
        rollout.route,
        next + 1,
        steps.len(),
        steps[next].target,
        rollout.to
    );
    let manual = rollout.spec.hold(next) == Hold::Manual;
    let total = steps.len();
    rollout.step = Some(next);
    rollout.weight = weight;
    rollout.held_ms = 0;
    rollout.stalled_ms = 0;
    rollout.released = false;
    if manual {
        rollout.state = RolloutState::Paused;
        rollout.reason = Some(format!(
            "held at step {}/{total} ({weight}%) until resume or promote (pause: manual)",
            next + 1
        ));
    }
}

/// Whether the current step's hold is over and a window passed at it (or no step is applied
/// yet: the first is applied at once).
fn ready(rollout: &Rollout, passed: bool) -> bool {
    let Some(step) = rollout.step else {
        return true;
    };
    let hold_over = match rollout.spec.hold(step) {
        Hold::For(d) => u128::from(rollout.held_ms) >= d.as_millis(),
        Hold::Manual => rollout.released,
        Hold::Interval => true,
    };
    hold_over && passed
}

/// Fails the rollout by its `on_failure`.
fn fail(rollout: &mut Rollout, reason: String) {
    warn!("rollout {}: {reason}", rollout.describe());
    match rollout.spec.on_failure {
        OnFailure::Rollback => {
            rollout.weight = 0.0;
            rollout.end(RolloutState::RolledBack, reason);
        }
        OnFailure::Pause => {
            rollout.state = RolloutState::Paused;
            rollout.reason = Some(reason);
            rollout.paused_by_failure = true;
        }
    }
}

fn counts(now: &ClusterReading, before: &ClusterReading) -> Counts {
    let window = now.since(before);
    Counts {
        requests: window.requests,
        errors: window.errors,
        p99: window.p99(),
    }
}

fn as_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;
    use switchyard_config::rollout::{Check, RolloutSpec};
    use switchyard_config::Config;
    use switchyard_pool::{Metrics, Source, UpstreamCas};

    /// Checks that pass or fail as the test says, without a socket.
    #[derive(Default)]
    struct FakeProber {
        failing: AtomicBool,
        runs: std::sync::atomic::AtomicUsize,
        /// How long each check takes, in milliseconds.
        delay_ms: std::sync::atomic::AtomicU64,
    }

    #[async_trait]
    impl Prober for FakeProber {
        async fn probe(&self, _check: &Check) -> Result<(), String> {
            self.runs.fetch_add(1, Ordering::Relaxed);
            let delay = self.delay_ms.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(delay)).await;
            if self.failing.load(Ordering::Relaxed) {
                Err("status 503, expected 200".into())
            } else {
                Ok(())
            }
        }
    }

    struct Harness {
        pool: Arc<Pool>,
        engine: Arc<Engine>,
        prober: Arc<FakeProber>,
        _shutdown: watch::Sender<bool>,
    }

    fn harness() -> Harness {
        harness_with("listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  blue:\n    backends:\n      - address: 127.0.0.1:9001\n  green:\n    backends:\n      - address: 127.0.0.1:9002\nroutes:\n  - name: web\n    split: {blue: 1, green: 0}\n")
    }

    fn harness_with(yaml: &str) -> Harness {
        let config = Config::from_yaml(yaml).expect("valid config");
        let pool = Arc::new(
            Pool::new(
                config,
                UpstreamCas::default(),
                Arc::new(Metrics::new()),
                None,
            )
            .expect("pool"),
        );
        let prober = Arc::new(FakeProber::default());
        let engine = Arc::new(Engine::new(
            Arc::clone(&pool),
            Arc::clone(&prober) as Arc<dyn Prober>,
        ));
        let (shutdown, watch) = watch::channel(false);
        let running = Arc::clone(&engine);
        tokio::spawn(async move { running.run(watch).await });
        Harness {
            pool,
            engine,
            prober,
            _shutdown: shutdown,
        }
    }

    impl Harness {
        fn start(&self, body: &str) {
            let spec = RolloutSpec::from_json(body.as_bytes()).expect("valid spec");
            self.pool
                .apply(
                    &Change::StartRollout {
                        route: "web".into(),
                        spec: Box::new(spec),
                    },
                    Source::Api,
                )
                .expect("started");
        }

        fn rollout(&self) -> Rollout {
            self.pool.rollout("web").expect("a rollout")
        }

        fn command(&self, command: switchyard_pool::RolloutCommand) {
            self.pool
                .apply(
                    &Change::RolloutCommand {
                        route: "web".into(),
                        command,
                    },
                    Source::Api,
                )
                .expect("command taken");
        }

        /// The `switchyard_rollout_paused_by_failure` line of route `web` in a scrape now.
        fn paused_by_failure_metric(&self) -> String {
            let text = self
                .pool
                .metrics()
                .render(&self.pool.snapshot(), &self.pool.rollouts());
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| l.starts_with("switchyard_rollout_paused_by_failure{"))
                .unwrap_or_default()
                .to_string()
        }

        /// `to`'s weight in the route's split now.
        fn green(&self) -> u32 {
            self.rollout().split()["green"]
        }

        /// Serves traffic for `time` in 100 ms slices: `n` requests to each upstream per
        /// slice, every `bad`-th of green's answered 500 (0: none), green `slow` slower.
        async fn traffic(&self, time: Duration, n: u64, bad: u64, slow: Duration) {
            let green = self.pool.pair_stats("web", "green");
            let blue = self.pool.pair_stats("web", "blue");
            let mut k = 0;
            let end = Instant::now() + time;
            while Instant::now() < end {
                for _ in 0..n {
                    k += 1;
                    let status = if bad > 0 && k % bad == 0 { 500 } else { 200 };
                    green.record(status, Duration::from_millis(10) + slow, false);
                    blue.record(200, Duration::from_millis(10), false);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        /// Where the pool sends a request of the beta group now, and how.
        fn beta_goes_to(&self) -> (String, switchyard_pool::Routing) {
            let mut headers = http::HeaderMap::new();
            headers.insert("x-user-group", http::HeaderValue::from_static("beta"));
            let request = switchyard_pool::Request {
                host: None,
                path: "/",
                query: None,
                method: &http::Method::GET,
                headers: &headers,
                client: None,
                issued: None,
            };
            let snapshot = self.pool.snapshot();
            let pick = snapshot.pick(0, &request).expect("a pick");
            (
                snapshot.upstreams[pick.upstream].name.to_string(),
                pick.routing,
            )
        }

        /// Serves healthy traffic until the rollout is no longer active, or `limit` passes.
        async fn until_ended(&self, limit: Duration) -> Duration {
            let began = Instant::now();
            while self.rollout().state.is_active() && began.elapsed() < limit {
                self.traffic(Duration::from_millis(100), 10, 0, Duration::ZERO)
                    .await;
            }
            began.elapsed()
        }
    }

    const FAST: &str =
        r#""step_interval": "1s", "analysis": {"interval": "500ms", "min_requests": 5}"#;

    #[tokio::test(start_paused = true)]
    async fn a_healthy_version_is_promoted_step_by_step() {
        let h = harness();
        h.start(&format!(r#"{{"to": "green", "steps": [10, 50], {FAST}, "checks": [{{"url": "http://127.0.0.1:1/"}}]}}"#));
        // The first step is taken at once, after its checks.
        h.traffic(Duration::from_millis(100), 1, 0, Duration::ZERO)
            .await;
        assert_eq!((h.rollout().step_number(), h.green()), (1, 1000));
        // One second of hold (and passing windows) later, the next step.
        h.traffic(Duration::from_millis(1100), 10, 0, Duration::ZERO)
            .await;
        assert_eq!((h.rollout().step_number(), h.green()), (2, 5000));
        let took = h.until_ended(Duration::from_secs(10)).await;
        let rollout = h.rollout();
        assert_eq!(
            rollout.state,
            RolloutState::Succeeded,
            "{:?}",
            rollout.reason
        );
        assert_eq!(h.green(), 10_000);
        assert!(took < Duration::from_secs(3), "{took:?}");
        // Checks ran before each of the three steps.
        assert_eq!(h.prober.runs.load(Ordering::Relaxed), 3);
        assert!(rollout.windows.iter().all(|w| w.verdict == Verdict::Passed));
    }

    const BETA_FIRST: &str = r#"{"match": {"headers": {"X-User-Group": "beta"}}, "pause": "2s"}"#;

    #[tokio::test(start_paused = true)]
    async fn a_match_step_holds_its_pause_at_the_weight_before_it() {
        let h = harness();
        h.start(&format!(
            r#"{{"to": "green", "steps": [10, {BETA_FIRST}, 50], {FAST}}}"#
        ));
        h.traffic(Duration::from_millis(1100), 10, 0, Duration::ZERO)
            .await;
        assert_eq!((h.rollout().step_number(), h.green()), (2, 1000));
        assert_eq!(h.rollout().weight, 10.0);
        assert_eq!(
            h.beta_goes_to(),
            ("green".into(), switchyard_pool::Routing::RolloutMatch)
        );
        // Windows pass all along, but the step holds for its own 2 s, not step_interval's 1 s.
        h.traffic(Duration::from_millis(1600), 10, 0, Duration::ZERO)
            .await;
        let rollout = h.rollout();
        assert_eq!((rollout.step_number(), h.green()), (2, 1000));
        assert!(rollout.windows.iter().all(|w| w.verdict == Verdict::Passed));
        h.traffic(Duration::from_millis(700), 10, 0, Duration::ZERO)
            .await;
        assert_eq!((h.rollout().step_number(), h.green()), (3, 5000));
        assert_eq!(
            h.beta_goes_to(),
            ("green".into(), switchyard_pool::Routing::RolloutMatch)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_match_step_needs_a_passing_window_and_a_rollback_ends_its_match() {
        let h = harness();
        h.start(&format!(
            r#"{{"to": "green", "steps": [{BETA_FIRST}, 50], {FAST}}}"#
        ));
        // Taken at once, at weight 0: only the beta group goes to green.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!((h.rollout().step_number(), h.green()), (1, 0));
        assert_eq!(
            h.beta_goes_to(),
            ("green".into(), switchyard_pool::Routing::RolloutMatch)
        );
        // Its hold ends, but with no traffic no window passes: it stays.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rollout = h.rollout();
        assert_eq!((rollout.step_number(), h.green()), (1, 0));
        assert!(rollout
            .windows
            .iter()
            .all(|w| w.verdict == Verdict::Inconclusive));
        // The matched requests' errors are green's: they fail the rollout, and the beta group
        // goes back to blue with it.
        h.traffic(Duration::from_millis(700), 10, 3, Duration::ZERO)
            .await;
        let rollout = h.rollout();
        assert_eq!(
            (rollout.state, rollout.step_number()),
            (RolloutState::RolledBack, 1)
        );
        assert_eq!(
            h.beta_goes_to(),
            ("blue".into(), switchyard_pool::Routing::Split)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn weight_steps_below_the_share_at_start_are_skipped_and_match_steps_kept() {
        let h = harness_with("listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  blue:\n    backends:\n      - address: 127.0.0.1:9001\n  green:\n    backends:\n      - address: 127.0.0.1:9002\nroutes:\n  - name: web\n    split: {blue: 70, green: 30}\n");
        h.start(&format!(
            r#"{{"to": "green", "steps": [10, {{"match": {{"headers": {{"X-User-Group": "beta"}}}}}}, 20, 50], {FAST}}}"#
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // 10 is skipped; the match step is taken, and green keeps its 30%.
        let rollout = h.rollout();
        assert_eq!((rollout.step_number(), rollout.weight), (2, 30.0));
        assert_eq!(h.green(), 3000);
        // After it, 20 is skipped too: the next step is 50.
        h.traffic(Duration::from_millis(1100), 10, 0, Duration::ZERO)
            .await;
        assert_eq!((h.rollout().step_number(), h.green()), (4, 5000));
    }

    #[tokio::test(start_paused = true)]
    async fn errors_roll_back_within_one_window() {
        let h = harness();
        h.start(&format!(r#"{{"to": "green", "steps": [20, 50], {FAST}}}"#));
        h.traffic(Duration::from_millis(1200), 10, 0, Duration::ZERO)
            .await;
        assert_eq!(h.rollout().state, RolloutState::Progressing);
        let began = Instant::now();
        // 30% of green's answers are 500 from here on.
        while h.rollout().state.is_active() && began.elapsed() < Duration::from_secs(5) {
            h.traffic(Duration::from_millis(100), 10, 3, Duration::ZERO)
                .await;
        }
        let rollout = h.rollout();
        assert_eq!(rollout.state, RolloutState::RolledBack);
        assert!(
            began.elapsed() <= Duration::from_millis(600),
            "{:?}",
            began.elapsed()
        );
        assert_eq!(h.green(), 0);
        let reason = rollout.reason.unwrap();
        assert!(
            reason.contains("error rate") && reason.contains("max_error_rate 1.00%"),
            "{reason}"
        );
        assert_eq!(
            rollout.windows.last().map(|w| w.verdict),
            Some(Verdict::Failed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slower_version_fails_the_latency_ratio() {
        let h = harness();
        h.start(
            r#"{"to": "green", "steps": [50], "step_interval": "1s", "analysis": {"interval": "500ms", "min_requests": 5, "max_latency_ratio": 1.5}}"#,
        );
        h.traffic(Duration::from_secs(2), 10, 0, Duration::from_millis(300))
            .await;
        let rollout = h.rollout();
        assert_eq!(rollout.state, RolloutState::RolledBack);
        assert!(rollout.reason.unwrap().contains("max_latency_ratio 1.5"));
    }

    #[tokio::test(start_paused = true)]
    async fn without_traffic_it_holds_then_meets_its_deadline() {
        let h = harness();
        h.start(&format!(
            r#"{{"to": "green", "steps": [10, 50], "progress_deadline": "3s", {FAST}}}"#
        ));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let rollout = h.rollout();
        assert_eq!(
            (rollout.state, rollout.step_number()),
            (RolloutState::Progressing, 1)
        );
        assert!(rollout.windows.len() >= 4);
        assert!(rollout
            .windows
            .iter()
            .all(|w| w.verdict == Verdict::Inconclusive));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rollout = h.rollout();
        assert_eq!(rollout.state, RolloutState::RolledBack);
        assert!(rollout
            .reason
            .unwrap()
            .contains("no passing window for 3s at step 1/3 (progress_deadline)"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_check_stops_it_before_the_weight_moves() {
        let h = harness();
        h.prober.failing.store(true, Ordering::Relaxed);
        h.start(&format!(
            r#"{{"to": "green", {FAST}, "checks": [{{"url": "http://127.0.0.1:1/version"}}]}}"#
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let rollout = h.rollout();
        assert_eq!(rollout.state, RolloutState::RolledBack);
        assert_eq!(rollout.step, None);
        assert_eq!(h.green(), 0);
        let reason = rollout.reason.unwrap();
        assert!(
            reason.contains("check http://127.0.0.1:1/version failed: status 503"),
            "{reason}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn manual_steps_pause_until_resumed_and_pause_on_failure_holds() {
        let h = harness();
        h.start(&format!(
            r#"{{"to": "green", "steps": [{{"weight": 10, "pause": "manual"}}, 50], "on_failure": "pause", {FAST}}}"#
        ));
        h.traffic(Duration::from_secs(2), 10, 0, Duration::ZERO)
            .await;
        assert_eq!((h.rollout().state, h.green()), (RolloutState::Paused, 1000));
        // A manual step's hold is no failure.
        const HELD: &str = r#"switchyard_rollout_paused_by_failure{route="web"} 1"#;
        const NOT_HELD: &str = r#"switchyard_rollout_paused_by_failure{route="web"} 0"#;
        assert_eq!(h.paused_by_failure_metric(), NOT_HELD);
        h.pool
            .apply(
                &Change::RolloutCommand {
                    route: "web".into(),
                    command: switchyard_pool::RolloutCommand::Resume,
                },
                Source::Api,
            )
            .unwrap();
        h.traffic(Duration::from_millis(700), 10, 0, Duration::ZERO)
            .await;
        assert_eq!(
            (h.rollout().state, h.green()),
            (RolloutState::Progressing, 5000)
        );
        // A failing window now pauses where it is instead of rolling back.
        h.traffic(Duration::from_millis(700), 10, 2, Duration::ZERO)
            .await;
        let rollout = h.rollout();
        assert_eq!((rollout.state, h.green()), (RolloutState::Paused, 5000));
        assert!(rollout
            .reason
            .unwrap()
            .contains("analysis failed at step 2/3"));
        assert_eq!(h.paused_by_failure_metric(), HELD);
        // An operator's pause of it keeps it held by the failure; resuming clears that.
        h.command(switchyard_pool::RolloutCommand::Pause);
        assert_eq!(h.paused_by_failure_metric(), HELD);
        h.command(switchyard_pool::RolloutCommand::Resume);
        assert_eq!(h.paused_by_failure_metric(), NOT_HELD);
        assert!(!h.rollout().paused_by_failure);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_on_failure_by_a_check_or_the_deadline_shows_as_held_by_failure() {
        // A failed check: paused before the first step, weight unmoved.
        let h = harness();
        h.prober.failing.store(true, Ordering::Relaxed);
        h.start(&format!(
            r#"{{"to": "green", "on_failure": "pause", {FAST}, "checks": [{{"url": "http://127.0.0.1:1/version"}}]}}"#
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let rollout = h.rollout();
        assert_eq!(
            (rollout.state, rollout.failed_windows),
            (RolloutState::Paused, 0)
        );
        assert!(rollout.held_by_failure());
        assert_eq!(
            h.paused_by_failure_metric(),
            r#"switchyard_rollout_paused_by_failure{route="web"} 1"#
        );
        // No traffic until the progress deadline: held too, with no failed window either.
        let h = harness();
        h.start(&format!(
            r#"{{"to": "green", "steps": [10, 50], "progress_deadline": "3s", "on_failure": "pause", {FAST}}}"#
        ));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(
            h.paused_by_failure_metric(),
            r#"switchyard_rollout_paused_by_failure{route="web"} 0"#
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rollout = h.rollout();
        assert_eq!(
            (rollout.state, rollout.failed_windows),
            (RolloutState::Paused, 0)
        );
        assert!(rollout.held_by_failure(), "{:?}", rollout.reason);
        // A tolerated failed window and then a manual pause: not held by a failure.
        let h = harness();
        h.start(
            r#"{"to": "green", "steps": [10, 50], "step_interval": "1h", "analysis": {"interval": "500ms", "min_requests": 5, "failure_limit": 5}}"#,
        );
        h.traffic(Duration::from_millis(1200), 10, 2, Duration::ZERO)
            .await;
        assert!(h.rollout().failed_windows >= 1);
        h.command(switchyard_pool::RolloutCommand::Pause);
        assert_eq!(h.rollout().state, RolloutState::Paused);
        assert!(!h.rollout().held_by_failure());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_engine_changes_nothing_more() {
        let h = harness();
        h.start(&format!(r#"{{"to": "green", "steps": [10, 50], {FAST}}}"#));
        h.traffic(Duration::from_millis(300), 10, 0, Duration::ZERO)
            .await;
        h.engine.stop();
        let before = h.rollout();
        h.traffic(Duration::from_secs(3), 10, 0, Duration::ZERO)
            .await;
        assert_eq!(h.rollout(), before);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_checks_hold_the_weight_but_not_the_windows() {
        let h = harness();
        h.start(&format!(
            r#"{{"to": "green", "steps": [10, 50], {FAST}, "checks": [{{"url": "http://127.0.0.1:1/"}}]}}"#
        ));
        h.traffic(Duration::from_millis(100), 1, 0, Duration::ZERO)
            .await;
        assert_eq!(h.green(), 1000);
        // From now on each check takes 3 s: step 2 waits for them, the windows do not.
        h.prober.delay_ms.store(3000, Ordering::Relaxed);
        h.traffic(Duration::from_millis(1500), 10, 0, Duration::ZERO)
            .await;
        let windows = h.rollout().windows.len();
        h.traffic(Duration::from_millis(1500), 10, 0, Duration::ZERO)
            .await;
        let during = h.rollout();
        assert_eq!((during.step_number(), h.green()), (1, 1000));
        assert!(
            during.windows.len() >= windows + 2,
            "{} then {}",
            windows,
            during.windows.len()
        );
        h.traffic(Duration::from_millis(1500), 10, 0, Duration::ZERO)
            .await;
        assert_eq!((h.rollout().step_number(), h.green()), (2, 5000));
        // Errors while the next step's checks run fail at the old weight: no step 3.
        h.traffic(Duration::from_millis(600), 10, 0, Duration::ZERO)
            .await;
        h.traffic(Duration::from_millis(1000), 10, 2, Duration::ZERO)
            .await;
        let rollout = h.rollout();
        assert_eq!(
            (rollout.state, rollout.step_number()),
            (RolloutState::RolledBack, 2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_rollout_that_replaces_another_is_judged_on_its_own_upstreams() {
        let h = harness();
        h.start(&format!(r#"{{"to": "green", "steps": [10], {FAST}}}"#));
        h.traffic(Duration::from_millis(300), 10, 0, Duration::ZERO)
            .await;
        h.command(switchyard_pool::RolloutCommand::Promote);
        // Back the other way: blue is now the new version, and it fails.
        h.start(&format!(r#"{{"to": "blue", "steps": [20, 50], {FAST}}}"#));
        let green = h.pool.pair_stats("web", "green");
        let blue = h.pool.pair_stats("web", "blue");
        for k in 0..20u64 {
            for i in 0..10u64 {
                green.record(200, Duration::from_millis(10), false);
                let status = if (k * 10 + i) % 2 == 0 { 500 } else { 200 };
                blue.record(status, Duration::from_millis(10), false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rollout = h.rollout();
        assert_eq!(
            (rollout.to.as_str(), rollout.state),
            ("blue", RolloutState::RolledBack)
        );
        assert!(rollout.reason.unwrap().contains("error rate 50.00%"));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_windows_up_to_the_failure_limit_are_tolerated() {
        let h = harness();
        h.start(
            r#"{"to": "green", "steps": [10, 50], "step_interval": "10s", "analysis": {"interval": "500ms", "min_requests": 5, "failure_limit": 2}}"#,
        );
        // One bad burst: a single failed window.
        h.traffic(Duration::from_millis(600), 10, 0, Duration::ZERO)
            .await;
        h.traffic(Duration::from_millis(500), 10, 2, Duration::ZERO)
            .await;
        h.traffic(Duration::from_millis(1000), 10, 0, Duration::ZERO)
            .await;
        let rollout = h.rollout();
        assert_eq!(rollout.state, RolloutState::Progressing);
        assert!(
            (1..=2).contains(&rollout.failed_windows),
            "{}",
            rollout.failed_windows
        );
        // Going on failing passes the limit.
        h.traffic(Duration::from_millis(2000), 10, 2, Duration::ZERO)
            .await;
        let rollout = h.rollout();
        assert_eq!(rollout.state, RolloutState::RolledBack);
        assert_eq!(rollout.failed_windows, 3);
        assert!(rollout
            .reason
            .unwrap()
            .contains("(3 failed windows, failure_limit 2)"));
    }

    #[tokio::test(start_paused = true)]
    async fn checks_dropped_by_a_pause_neither_stall_nor_move_the_rollout() {
        let h = harness();
        h.start(&format!(
            r#"{{"to": "green", "steps": [10, 50], {FAST}, "checks": [{{"url": "http://127.0.0.1:1/"}}]}}"#
        ));
        h.traffic(Duration::from_millis(100), 1, 0, Duration::ZERO)
            .await;
        // Checks that take longer than a window, dropped twice by a pause and a resume.
        h.prober.delay_ms.store(800, Ordering::Relaxed);
        h.traffic(Duration::from_millis(1100), 10, 0, Duration::ZERO)
            .await;
        for _ in 0..2 {
            h.command(switchyard_pool::RolloutCommand::Pause);
            h.traffic(Duration::from_millis(300), 10, 0, Duration::ZERO)
                .await;
            h.command(switchyard_pool::RolloutCommand::Resume);
            h.traffic(Duration::from_millis(300), 10, 0, Duration::ZERO)
                .await;
        }
        assert_eq!(h.green(), 1000, "a dropped check moved the weight");
        // Left alone, the checks run to their end and the rollout goes on.
        h.traffic(Duration::from_millis(1500), 10, 0, Duration::ZERO)
            .await;
        assert_eq!((h.rollout().step_number(), h.green()), (2, 5000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_state_file_that_cannot_be_written_does_not_keep_a_failing_version_in() {
        let dir = std::env::temp_dir().join(format!("switchyard-engine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let yaml = format!(
            "listeners:\n  - address: 127.0.0.1:8080\nstate_file: {}/state.json\nupstreams:\n  blue:\n    backends:\n      - address: 127.0.0.1:9001\n  green:\n    backends:\n      - address: 127.0.0.1:9002\nroutes:\n  - name: web\n    split: {{blue: 1, green: 0}}\n",
            dir.display()
        );
        let h = harness_with(&yaml);
        h.start(
            r#"{"to": "green", "steps": [20], "step_interval": "10s", "analysis": {"interval": "500ms", "min_requests": 5, "failure_limit": 2}}"#,
        );
        h.traffic(Duration::from_millis(100), 10, 0, Duration::ZERO)
            .await;
        assert_eq!(h.green(), 2000);
        // The disk goes away: every window fails, and each must still count.
        std::fs::remove_dir_all(&dir).expect("remove");
        h.traffic(Duration::from_secs(3), 10, 2, Duration::ZERO)
            .await;
        let rollout = h.rollout();
        assert_eq!(
            (rollout.state, rollout.failed_windows),
            (RolloutState::RolledBack, 3)
        );
        assert_eq!(h.green(), 0);
        let kinds: Vec<String> = h
            .pool
            .events()
            .since(0, 1000)
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            kinds.iter().filter(|k| *k == "state_not_saved").count(),
            1,
            "{kinds:?}"
        );
    }
}
