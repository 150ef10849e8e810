//! Backend selection: the four algorithms of the contract, precomputed per snapshot so that a
//! pick is an atomic increment and an index, and every worker thread shares one position.
//!
//! Pingora's own weighted selection repeats a backend `weight` times in a row (a a a b), and it
//! has no least-connections; we build nginx's smooth sequence once per snapshot instead, keep
//! a tournament tree for least-connections ([`crate::least`]) and reuse Pingora's Ketama ring
//! for `ip_hash`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pingora_ketama::{Bucket, Continuum};
use switchyard_config::Algorithm;

use crate::least::{Current, LoadTree, Report};
use crate::snapshot::Backend;

/// Ring points visited before giving up on clockwise order.
const RING_WALK_LIMIT: usize = 4096;

/// Selection state of one upstream that outlives snapshots, shared by all threads.
#[derive(Default)]
pub(crate) struct Shared {
    /// Position in the selection order; also the pick sequence of least-connections.
    cursor: AtomicUsize,
    /// Also held by every backend of the upstream, which report to it.
    pub(crate) least: Arc<Current>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The upstream is gone from every snapshot: end the cycle between its backends and
        // the least-connections tree.
        self.least.release();
    }
}

/// Backend indices (into the upstream's `backends`) that may take new requests, arranged for
/// the upstream's algorithm.
pub(crate) enum Selector {
    /// No backend can take a request.
    Empty,
    /// Available backends, taken in turn.
    RoundRobin(Box<[usize]>),
    /// Smooth weighted round robin over available backends.
    Smooth(Rotation<usize>),
    /// Available backends with their (possibly ramping) weight; the least loaded relative to
    /// weight wins.
    LeastConnections(Arc<LoadTree>),
    /// Ketama ring over available backends' addresses, weighted, and the index of each
    /// address, sorted by address: the ring gives addresses. `ip_hash` and `hash`. Retiring
    /// backends that can serve their users are on it too, as they were before they retired.
    Ketama(Continuum, Box<[(SocketAddr, usize)]>),
}

impl Selector {
    /// `available` are indices of backends that may take traffic (active, weight > 0, healthy);
    /// `weights` are every backend's weight now (lower than configured while slow-starting).
    pub(crate) fn build(
        algorithm: Algorithm,
        backends: &[Backend],
        weights: &[u32],
        available: Vec<usize>,
        ring_divisor: u32,
    ) -> Self {
        if available.is_empty() {
            return Selector::Empty;
        }
        match algorithm {
            Algorithm::RoundRobin => Selector::RoundRobin(available.into()),
            Algorithm::LeastConnections => Selector::LeastConnections(Arc::new(LoadTree::new(
                backends.len(),
                available
                    .iter()
                    .map(|&i| (i, weights[i], Arc::clone(&backends[i].live))),
            ))),
            Algorithm::WeightedRoundRobin => {
                let weighted: Vec<(usize, u32)> =
                    available.iter().map(|&i| (i, weights[i])).collect();
                Selector::Smooth(Rotation::new(&weighted))
            }
            Algorithm::IpHash | Algorithm::Hash => {
                let buckets: Vec<Bucket> = available
                    .iter()
                    .map(|&i| {
                        let units = ring_units(backends[i].weight, ring_divisor);
                        Bucket::new(backends[i].live.address, units)
                    })
                    .collect();
                let mut index: Vec<(SocketAddr, usize)> = backends
                    .iter()
                    .enumerate()
                    .map(|(i, b)| (b.live.address, i))
                    .collect();
                index.sort_unstable();
                Selector::Ketama(Continuum::new(&buckets), index.into())
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, Selector::Empty)
    }

    /// How a request on backend `i` reports its start and end, if the algorithm needs it.
    pub(crate) fn report(&self, i: usize) -> Option<Report> {
        match self {
            Selector::LeastConnections(tree) => tree.report(i),
            _ => None,
        }
    }

    /// Picks a backend for which `usable` holds, trying further candidates in the algorithm's
    /// own order when the first is not usable (a health flip not yet rebuilt, a retry). `key`
    /// is what a ring hashes (requests without one share the empty key); `keeps` tells
    /// whether a retiring backend on the ring keeps this key.
    pub(crate) fn pick(
        &self,
        backends: &[Backend],
        shared: &Shared,
        key: &[u8],
        usable: impl Fn(usize) -> bool,
        keeps: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        match self {
            Selector::Empty => None,
            Selector::RoundRobin(order) => {
                let start = shared.cursor.fetch_add(1, Ordering::Relaxed);
                (0..order.len())
                    .map(|k| order[(start + k) % order.len()])
                    .find(|&i| usable(i))
            }
            Selector::Smooth(rotation) => {
                let start = shared.cursor.fetch_add(1, Ordering::Relaxed);
                rotation.candidates(start).find(|&i| usable(i))
            }
            Selector::LeastConnections(tree) => {
                let sequence = shared.cursor.fetch_add(1, Ordering::Relaxed);
                tree.pick(&shared.least, sequence as u64, usable)
            }
            Selector::Ketama(ring, index) => {
                // Walking the ring finds the next backend clockwise, which keeps other
                // clients in place; the walk is bounded because a heavy backend owns long runs
                // of points, and past the bound any available backend will do.
                let mut walk = ring
                    .node_iter(key)
                    .take(RING_WALK_LIMIT)
                    .filter_map(|addr| index_of(index, addr))
                    .filter(|&i| usable(i));
                // The first backend clockwise that takes new keys or, retiring, has this one:
                // the ring without the retiring backends that do not know the key. A new key
                // goes where it will stay, no other backend's key moves, and a key that moved
                // past one retiring backend to the next stays there when that one retires too.
                let retiring = |i: usize| backends[i].state.retiring_until().is_some();
                walk.find(|&i| !retiring(i) || keeps(i)).or_else(|| {
                    (0..backends.len()).find(|&i| backends[i].takes_traffic() && usable(i))
                })
            }
        }
    }
}

/// Ring weight units an `ip_hash` upstream may have on average per backend, and at least in
/// all. Ketama puts 160 points (8 bytes each, an MD5 per 4) on the ring per unit, and every
/// ring is rebuilt at each health change: 1 000 upstreams of 10 backends weighted ~1 000 are
/// 1.6 billion points as weighted, and still 41 million (400 MB, 50 s to start on the debug
/// build) at 256 units per upstream. With these bounds the 10 000 backends the config limits
/// allow have at most 6.4 million points (51 MB) in all.
const RING_UNITS_PER_BACKEND: u64 = 4;
const RING_UNITS_MIN: u64 = 32;

/// What an `ip_hash` upstream's backend weights are divided by to give ring units, taken from
/// the weights its config file gives: their common divisor and, when the total is over the
/// bound, the factor that brings it down to it. Fixed while the process runs that file, so a
/// backend's units depend on its own weight alone: a health change, a drain, an admin weight
/// change, an added or a removed backend leaves every other backend's points where they were.
pub(crate) fn ring_divisor(configured: &[u32]) -> u32 {
    let common = common_divisor(configured.iter().copied()).max(1);
    let total: u64 = configured.iter().map(|&w| u64::from(w / common)).sum();
    let bound = (RING_UNITS_PER_BACKEND * configured.len() as u64).max(RING_UNITS_MIN);
    let scale = total.div_ceil(bound).max(1);
    u32::try_from(u64::from(common) * scale).unwrap_or(u32::MAX)
}

/// A backend's ring units: its weight over the divisor, rounded, at least 1 (a weight of 0
/// is not on the ring at all: such a backend is not available).
fn ring_units(weight: u32, divisor: u32) -> u32 {
    let divisor = divisor.max(1);
    (weight.saturating_add(divisor / 2) / divisor).max(1)
}

fn index_of(index: &[(SocketAddr, usize)], addr: &SocketAddr) -> Option<usize> {
    index
        .binary_search_by(|(a, _)| a.cmp(addr))
        .ok()
        .map(|at| index[at].1)
}

/// Periods of at most this many picks are laid out in full, in nginx's smooth order; longer
/// ones (a 9999:1 canary split, a thousand weighted backends) are walked with a stride, so
/// that neither memory nor build time grows with the weights: nginx's order takes a slot per
/// pick of the period and a pass over every id per slot to build.
const LAID_OUT_LIMIT: u64 = 1024;

/// One period of weighted picks over `(id, weight)`: each id appears exactly `weight / gcd`
/// times per period, interleaved rather than in runs, so any window of a period's length
/// holds each id exactly that often.
pub(crate) enum Rotation<T> {
    /// Nginx's smooth order, one entry per pick.
    Laid(Box<[T]>),
    /// Pick `k` is the id owning slot `k * step mod period` of the ids laid end to end, each
    /// over `weight / gcd` slots. `step` is coprime to `period`, so a period visits every
    /// slot once (exact counts); near `period / φ`, so consecutive picks land far apart and
    /// every id's slots are visited evenly spread (the three-distance theorem), as nginx's order
    /// does.
    Stride {
        ids: Box<[T]>,
        /// Exclusive end slot of each id.
        ends: Box<[u64]>,
        period: u64,
        step: u64,
    },
}

impl<T: Copy> Rotation<T> {
    pub(crate) fn new(weighted: &[(T, u32)]) -> Self {
        let divisor = common_divisor(weighted.iter().map(|&(_, w)| w));
        if divisor == 0 {
            return Rotation::Laid(Box::new([]));
        }
        let period: u64 = weighted.iter().map(|&(_, w)| u64::from(w / divisor)).sum();
        if period <= LAID_OUT_LIMIT {
            return Rotation::Laid(smooth_sequence(weighted).into());
        }
        let (ids, ends): (Vec<T>, Vec<u64>) = weighted
            .iter()
            .filter(|&&(_, w)| w > 0)
            .scan(0u64, |end, &(id, w)| {
                *end += u64::from(w / divisor);
                Some((id, *end))
            })
            .unzip();
        // 0.618… of the period, then the next number coprime to it (a few steps at most).
        let mut step = period * 618_034 / 1_000_000;
        while gcd64(step, period) != 1 {
            step += 1;
        }
        Rotation::Stride {
            ids: ids.into(),
            ends: ends.into(),
            period,
            step,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        match self {
            Rotation::Laid(order) => order.is_empty(),
            Rotation::Stride { ids, .. } => ids.is_empty(),
        }
    }

    /// Pick `k` first, then every other candidate, each id at least once: a laid-out order
    /// from pick `k` on; a stride's id of pick `k`, then the others in turn.
    pub(crate) fn candidates(&self, k: usize) -> impl Iterator<Item = T> + '_ {
        let (len, first) = match self {
            Rotation::Laid(order) => (order.len(), k % order.len().max(1)),
            Rotation::Stride {
                ids,
                ends,
                period,
                step,
            } => {
                let slot = (k as u128 * u128::from(*step) % u128::from(*period)) as u64;
                (ids.len(), ends.partition_point(|&end| end <= slot))
            }
        };
        (0..len).map(move |n| match self {
            Rotation::Laid(order) => order[(first + n) % len],
            Rotation::Stride { ids, .. } => ids[(first + n) % len],
        })
    }
}

/// One period of nginx's smooth weighted round robin over `(id, weight)`: each id appears
/// exactly `weight / gcd` times, spread out rather than in runs. Zero weights never appear.
pub fn smooth_sequence<T: Copy>(weighted: &[(T, u32)]) -> Vec<T> {
    let divisor = common_divisor(weighted.iter().map(|&(_, w)| w));
    if divisor == 0 {
        return Vec::new();
    }
    let weights: Vec<i64> = weighted
        .iter()
        .map(|&(_, w)| i64::from(w / divisor))
        .collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut sequence = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..weights.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        sequence.push(weighted[best].0);
    }
    sequence
}

fn gcd64(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd64(b, a % b)
    }
}

/// The greatest common divisor of the positive weights; 0 when there is none.
fn common_divisor(weights: impl Iterator<Item = u32>) -> u32 {
    weights.filter(|&w| w > 0).fold(0, gcd)
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
