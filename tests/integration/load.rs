//! A bounded load generator for the deploy suite: concurrent clients, half on keep-alive
//! connections and half opening a connection per request, recording every outcome with its
//! time so a scenario can count failures and measure shares per phase.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::fixtures::{read_response, request_from, runtime};

/// Pause between two requests of one client, so the load leaves the machine room to work.
const PACE: Duration = Duration::from_millis(5);
/// Upper bounds, whatever the scenario does.
const MAX_PER_CLIENT: usize = 20_000;
const MAX_TIME: Duration = Duration::from_secs(120);
/// A request without an answer this long counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What one request got: the backend's answer, or what went wrong.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the request was sent: routing is decided then, however long the answer takes.
    pub at: Instant,
    pub outcome: Result<String, String>,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    clients: JoinSet<Vec<Sample>>,
}

impl Load {
    /// Starts `clients` clients (half keep-alive) sending `GET /` to `addr`.
    pub fn start(addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let _guard = runtime().enter();
        let mut set = JoinSet::new();
        for i in 0..clients {
            let stop = Arc::clone(&stop);
            let done = Arc::clone(&done);
            let keep_alive = i % 2 == 0;
            set.spawn(async move { client(addr, keep_alive, stop, done).await });
        }
        Load {
            stop,
            done,
            clients: set,
        }
    }

    /// Waits until `n` more requests have completed (at most `limit`), and returns when.
    pub fn run_for(&self, n: usize, limit: Duration) -> Instant {
        let target = self.done.load(Ordering::SeqCst) + n;
        crate::fixtures::wait_until("load progress", limit, || {
            self.done.load(Ordering::SeqCst) >= target
        });
        Instant::now()
    }

    /// Stops every client after its current request and returns all samples, in time order.
    pub fn stop(mut self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        let mut samples = runtime().block_on(async {
            let mut all = Vec::new();
            while let Some(part) = self.clients.join_next().await {
                all.extend(part.expect("a load client panicked"));
            }
            all
        });
        samples.sort_by_key(|s| s.at);
        Report { samples }
    }
}

async fn client(
    addr: SocketAddr,
    keep_alive: bool,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> Vec<Sample> {
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut connection: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::SeqCst)
        && samples.len() < MAX_PER_CLIENT
        && started.elapsed() < MAX_TIME
    {
        let sent = Instant::now();
        let attempt = async {
            if keep_alive {
                keep_alive_request(addr, &mut connection).await
            } else {
                match request_from(None, addr, "GET", "/", &[]).await {
                    Ok(r) if (200..300).contains(&r.status) => Ok(r.text()),
                    Ok(r) => Err(format!("status {}: {}", r.status, r.text())),
                    Err(e) => Err(format!("new connection: {e}")),
                }
            }
        };
        let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
            Ok(outcome) => outcome,
            Err(_) => {
                connection = None;
                Err(format!("no answer within {REQUEST_TIMEOUT:?}"))
            }
        };
        samples.push(Sample { at: sent, outcome });
        done.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(PACE).await;
    }
    samples
}

/// One request on the client's persistent connection, opening one when there is none. A
/// failure on a reused connection counts: that is what users of keep-alive would see.
async fn keep_alive_request(
    addr: SocketAddr,
    connection: &mut Option<BufReader<TcpStream>>,
) -> Result<String, String> {
    if connection.is_none() {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        *connection = Some(BufReader::new(stream));
    }
    let Some(conn) = connection.as_mut() else {
        return Err("no connection".into());
    };
    let sent = conn
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: load\r\n\r\n")
        .await;
    let result = match sent {
        Ok(()) => read_response(conn)
            .await
            .map_err(|e| format!("keep-alive: {e}")),
        Err(e) => Err(format!("keep-alive write: {e}")),
    };
    match result {
        Ok(r) => {
            if r.header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"))
            {
                *connection = None;
            }
            if (200..300).contains(&r.status) {
                Ok(r.text())
            } else {
                Err(format!("status {}: {}", r.status, r.text()))
            }
        }
        Err(e) => {
            *connection = None;
            Err(e)
        }
    }
}

pub struct Report {
    pub samples: Vec<Sample>,
}

impl Report {
    pub fn total(&self) -> usize {
        self.samples.len()
    }

    pub fn failures(&self) -> Vec<&String> {
        self.samples
            .iter()
            .filter_map(|s| s.outcome.as_ref().err())
            .collect()
    }

    /// Answers from `who` among the successful answers to requests sent between `from` and
    /// `to`, as a share.
    pub fn share(&self, who: &str, from: Instant, to: Instant) -> (f64, usize) {
        let window: Vec<&String> = self
            .samples
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .filter_map(|s| s.outcome.as_ref().ok())
            .collect();
        let hits = window.iter().filter(|b| b.as_str() == who).count();
        (hits as f64 / window.len().max(1) as f64, window.len())
    }
}

/// Asserts that no request of `report` failed, naming the first few that did; prints the
/// totals either way.
pub fn assert_no_failures(name: &str, report: &Report) {
    let failures = report.failures();
    eprintln!(
        "{name}: {} requests, {} failed",
        report.total(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{name}: {} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
}
