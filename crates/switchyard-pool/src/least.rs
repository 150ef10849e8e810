//! `least_connections` in O(log n) per request: a tournament tree over an upstream's available
//! backends whose every node holds the winner of its subtree (fewest in-flight requests
//! relative to weight, then least recently picked). A pick reads the root; a request starting
//! or ending replays the matches on its backend's path to the root.
//!
//! The in-flight counts stay in [`BackendLive`] (draining and the admin API read them there);
//! the tree stores only which leaf won, so a match always compares counts as they are now. Two
//! threads replaying overlapping paths can leave a node one update behind; the next request
//! that starts or ends below it corrects it, and a node can only lag behind a backend that
//! still has requests in flight, whose ends correct it.
//!
//! Ties go to the leaf picked least recently (by the upstream's pick sequence), which is round
//! robin among equally loaded backends, as the contract asks.
//!
//! Up to [`SCAN_LIMIT`] backends a scan of all of them is cheaper than keeping the tree up to
//! date (it needs no reports), so small upstreams scan.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::live::BackendLive;

/// An empty node: padding beyond the last leaf.
const NONE: u32 = u32::MAX;

/// Backends up to which picks scan instead of keeping the tree. Measured per request (pick,
/// in-flight up and down) with `cargo bench -p switchyard-pool`: scan 37 / 50 / 75 / 147 ns at
/// 2 / 16 / 32 / 100 backends, tree 57 / 67 / 71 / 87 ns, and 116 ns at 1 000.
const SCAN_LIMIT: usize = 32;

/// Gives every tree an identity that outlives it, so that "is this still the current tree" is
/// one integer compare.
static TREES: AtomicU64 = AtomicU64::new(1);

/// The tree of an upstream that requests report to: the one of the newest snapshot that
/// picked. Kept across snapshots.
#[derive(Default)]
pub(crate) struct Current {
    id: AtomicU64,
    tree: ArcSwapOption<LoadTree>,
}

impl Current {
    /// Makes `tree` the one requests report to, if it is not yet. A snapshot built but never
    /// used (a rejected change) never picks, so it never takes over.
    fn take_over(&self, tree: &Arc<LoadTree>) {
        if self.id.load(Ordering::Acquire) == tree.id {
            return;
        }
        self.tree.store(Some(Arc::clone(tree)));
        self.id.store(tree.id, Ordering::Release);
        // Requests that reported to the previous tree while this one was built.
        tree.replay_all();
    }
}

/// What a request in flight on a tracked least-connections backend reports through when it
/// starts and ends.
pub(crate) struct Report {
    current: Arc<Current>,
    tree: Arc<LoadTree>,
    /// The backend's leaf in `tree`.
    leaf: u32,
}

impl Report {
    pub(crate) fn changed(&self, live: &BackendLive) {
        if self.current.id.load(Ordering::Acquire) == self.tree.id {
            self.tree.replay(self.leaf as usize);
        } else if let Some(tree) = self.current.tree.load().as_ref() {
            // A newer snapshot's tree took over while this request was on its way.
            tree.changed(live);
        }
    }
}

struct Leaf {
    /// Index into the upstream's backends.
    backend: usize,
    weight: u32,
    live: Arc<BackendLive>,
    /// Pick sequence number of this leaf's last pick (0: not picked by this tree).
    last_pick: AtomicU64,
}

pub(crate) struct LoadTree {
    id: u64,
    leaves: Box<[Leaf]>,
    /// Each backend's leaf, by backend index ([`NONE`]: not available).
    leaf_of: Box<[u32]>,
    /// `(BackendLive` address, leaf`)`, sorted: requests report by backend, not by leaf.
    by_live: Box<[(usize, u32)]>,
    /// Subtree winners in heap order: node 1 is the root, node k's children are 2k and 2k+1,
    /// leaf i is node `width + i`. Node 0 is unused.
    winners: Box<[AtomicU32]>,
    width: usize,
}

impl LoadTree {
    /// `available` are `(backend index, weight, live state)` of some of `backends` backends;
    /// weights are above 0.
    pub(crate) fn new(
        backends: usize,
        available: impl Iterator<Item = (usize, u32, Arc<BackendLive>)>,
    ) -> Self {
        let leaves: Box<[Leaf]> = available
            .map(|(backend, weight, live)| Leaf {
                backend,
                weight,
                live,
                last_pick: AtomicU64::new(0),
            })
            .collect();
        let width = leaves.len().next_power_of_two();
        let winners: Box<[AtomicU32]> = (0..2 * width)
            .map(|node| {
                let leaf = node.checked_sub(width).filter(|&l| l < leaves.len());
                AtomicU32::new(leaf.map_or(NONE, |l| l as u32))
            })
            .collect();
        let mut by_live: Vec<(usize, u32)> = leaves
            .iter()
            .enumerate()
            .map(|(i, leaf)| (Arc::as_ptr(&leaf.live) as usize, i as u32))
            .collect();
        by_live.sort_unstable();
        let mut leaf_of = vec![NONE; backends];
        for (i, leaf) in leaves.iter().enumerate() {
            leaf_of[leaf.backend] = i as u32;
        }
        let tree = LoadTree {
            id: TREES.fetch_add(1, Ordering::Relaxed),
            leaf_of: leaf_of.into(),
            leaves,
            by_live: by_live.into(),
            winners,
            width,
        };
        tree.replay_all();
        tree
    }

    fn tracked(&self) -> bool {
        self.leaves.len() > SCAN_LIMIT
    }

    /// The backend with the fewest requests relative to weight that is `usable`: the root's
    /// winner, or by a full scan when the tree is not tracked or its winner is not usable (a
    /// backend just excluded, or a health flip that the next snapshot will reflect).
    /// `sequence` orders picks, for ties.
    pub(crate) fn pick(
        self: &Arc<Self>,
        current: &Current,
        sequence: u64,
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let root = if self.tracked() {
            current.take_over(self);
            self.winners[1].load(Ordering::Relaxed)
        } else {
            NONE
        };
        let leaf = match self.leaves.get(root as usize) {
            Some(leaf) if usable(leaf.backend) => root as usize,
            _ => self.scan(&usable)?,
        };
        // The pick alone moves the leaf behind its equals, even before its request counts.
        self.leaves[leaf]
            .last_pick
            .store(sequence + 1, Ordering::Relaxed);
        if self.tracked() {
            self.replay(leaf);
        }
        Some(self.leaves[leaf].backend)
    }

    /// Where a request on `backend` reports, if this tree is tracked.
    pub(crate) fn report(
        self: &Arc<Self>,
        current: &Arc<Current>,
        backend: usize,
    ) -> Option<Report> {
        let leaf = *self.leaf_of.get(backend).filter(|&&l| l != NONE)?;
        self.tracked().then(|| Report {
            current: Arc::clone(current),
            tree: Arc::clone(self),
            leaf,
        })
    }

    /// A request on `live` started or ended.
    fn changed(&self, live: &BackendLive) {
        let key = live as *const BackendLive as usize;
        if let Ok(at) = self.by_live.binary_search_by_key(&key, |&(k, _)| k) {
            self.replay(self.by_live[at].1 as usize);
        }
    }

    /// Every node again, bottom up: for a tree that takes over from another, whose requests
    /// reported there.
    fn replay_all(&self) {
        for node in (1..self.width).rev() {
            self.rematch(node);
        }
    }

    fn replay(&self, leaf: usize) {
        let mut node = (self.width + leaf) / 2;
        while node >= 1 {
            self.rematch(node);
            node /= 2;
        }
    }

    fn rematch(&self, node: usize) {
        let left = self.winners[2 * node].load(Ordering::Relaxed);
        let right = self.winners[2 * node + 1].load(Ordering::Relaxed);
        self.winners[node].store(self.better(left, right), Ordering::Relaxed);
    }

    /// The winner of two leaves (either may be [`NONE`]); the left one on a full tie.
    fn better(&self, a: u32, b: u32) -> u32 {
        let (Some(la), Some(lb)) = (self.leaves.get(a as usize), self.leaves.get(b as usize))
        else {
            return if a == NONE { b } else { a };
        };
        if lighter(la, lb).unwrap_or_else(|| {
            la.last_pick.load(Ordering::Relaxed) <= lb.last_pick.load(Ordering::Relaxed)
        }) {
            a
        } else {
            b
        }
    }

    /// The best usable leaf by looking at all of them, each count read once.
    fn scan(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let mut best: Option<(usize, u64, u64)> = None;
        for (i, leaf) in self.leaves.iter().enumerate() {
            if !usable(leaf.backend) {
                continue;
            }
            let (load, weight) = (leaf.live.in_flight() as u64, u64::from(leaf.weight));
            let wins = match best {
                None => true,
                // load / weight against best_load / best_weight, without division.
                Some((b, best_load, best_weight)) => {
                    match (load * best_weight).cmp(&(best_load * weight)) {
                        std::cmp::Ordering::Less => true,
                        std::cmp::Ordering::Greater => false,
                        std::cmp::Ordering::Equal => {
                            leaf.last_pick.load(Ordering::Relaxed)
                                < self.leaves[b].last_pick.load(Ordering::Relaxed)
                        }
                    }
                }
            };
            if wins {
                best = Some((i, load, weight));
            }
        }
        best.map(|(i, _, _)| i)
    }
}

/// Whether `a` carries less load relative to weight than `b` (`None`: equal).
fn lighter(a: &Leaf, b: &Leaf) -> Option<bool> {
    // load_a / weight_a against load_b / weight_b, without division.
    let load_a = a.live.in_flight() as u64 * u64::from(b.weight);
    let load_b = b.live.in_flight() as u64 * u64::from(a.weight);
    (load_a != load_b).then_some(load_a < load_b)
}
