//! `least_connections` in O(log n) per request: a tournament tree over an upstream's available
//! backends whose every node holds the winner of its subtree (fewest in-flight requests
//! relative to weight, then least recently picked). A pick reads the root; a request starting
//! or ending replays the matches on its backend's path to the root.
//!
//! Counts and pick times stay in [`BackendLive`], which outlives snapshots (draining and the
//! admin API read the counts there); the tree stores only which leaf won, so a match always
//! compares values as they are now. Requests report to the tree of the newest snapshot that
//! picked (the upstream's [`Current`]), whichever snapshot they were picked from. Older trees,
//! still used by retries of requests that began before a swap, scan instead.
//!
//! Two threads replaying through the same node can leave it one update behind, and a request
//! begun under another algorithm does not report. So that neither lasts, every pick also
//! re-matches one more node, bottom up in turn, and its ancestors while that changes their
//! winner: a stale node is corrected within one round (one pick per node of the tree, fewer
//! than twice the backends).
//!
//! Ties go to the backend picked least recently (by the upstream's pick sequence), which is
//! round robin among equally loaded backends, as the contract asks, across snapshots too.
//!
//! Up to [`SCAN_LIMIT`] backends a scan of all of them is cheaper than keeping the tree up to
//! date, so small upstreams scan.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::live::BackendLive;

/// An empty node: padding beyond the last leaf.
const NONE: u32 = u32::MAX;

/// Backends up to which picks scan instead of keeping the tree. Measured per request (pick,
/// in-flight up and down) with `cargo bench -p switchyard-pool`: scan 39 / 53 / 78 / 157 ns at
/// 2 / 16 / 32 / 100 backends, tree 50 / 61 / 65 / 73 ns, and 156 ns at 1 000.
pub(crate) const SCAN_LIMIT: usize = 24;
// The bottom-up sweep needs a tree of more than one node.
const _: () = assert!(SCAN_LIMIT >= 2);

/// Numbers trees in the order they are built, so the newest is the largest.
static TREES: AtomicU64 = AtomicU64::new(1);

/// The tree of an upstream that requests report to: the newest that picked. Kept across
/// snapshots; every backend of the upstream holds it.
#[derive(Debug, Default)]
pub(crate) struct Current {
    /// The tree's id, readable without touching its reference count.
    id: AtomicU64,
    tree: ArcSwapOption<LoadTree>,
}

impl Current {
    /// Makes `tree` the one requests report to unless a newer tree already is; returns whether
    /// `tree` is current. A snapshot built but never used (a rejected change) never picks, so
    /// its tree never takes over.
    fn take_over(&self, tree: &Arc<LoadTree>) -> bool {
        let id = self.id.load(Ordering::SeqCst);
        if id >= tree.id {
            return id == tree.id;
        }
        loop {
            let current = self.tree.load();
            if current.as_ref().is_some_and(|t| t.id > tree.id) {
                return false;
            }
            let previous = self.tree.compare_and_swap(&current, Some(Arc::clone(tree)));
            if same(&previous, &current) {
                break;
            }
        }
        // SeqCst against the requests' count updates: a request that read the old id and
        // reported to the old tree changed its count before this replay reads it.
        self.id.fetch_max(tree.id, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        tree.replay_all();
        true
    }

    /// Lets go of the tree: it holds the upstream's backends, and they hold this. Any tree
    /// that picks afterwards takes over again.
    pub(crate) fn release(&self) {
        self.tree.store(None);
        self.id.store(0, Ordering::SeqCst);
    }
}

fn same(a: &Option<Arc<LoadTree>>, b: &Option<Arc<LoadTree>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// How a request in flight on a least-connections backend reports its start and end: to the
/// tree that picked it while that is current, otherwise to the current one.
#[derive(Debug)]
pub(crate) struct Report {
    /// The id of the tree that picked.
    id: u64,
    /// That tree, when it is tracked (a small one has nothing to replay).
    tree: Option<Arc<LoadTree>>,
    /// The backend's leaf in it.
    leaf: u32,
}

impl Report {
    pub(crate) fn changed(&self, live: &BackendLive) {
        let current = &live.least;
        if current.id.load(Ordering::SeqCst) == self.id {
            if let Some(tree) = &self.tree {
                tree.replay(self.leaf as usize);
            }
        } else if let Some(tree) = current.tree.load().as_ref() {
            tree.changed(live);
        }
    }
}

#[derive(Debug)]
struct Leaf {
    /// Index into the upstream's backends.
    backend: usize,
    weight: u32,
    live: Arc<BackendLive>,
}

// Aligned so that the reference count that requests change sits on another cache line than
// the fields every pick reads.
#[derive(Debug)]
#[repr(align(128))]
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
    /// winner, or by a full scan when the tree is small or not current or its winner is not
    /// usable (a backend just excluded, or a health flip that the next snapshot will
    /// reflect). `sequence` orders picks, for ties.
    pub(crate) fn pick(
        self: &Arc<Self>,
        current: &Current,
        sequence: u64,
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let tracked = current.take_over(self) && self.tracked();
        let root = if tracked {
            self.winners[1].load(Ordering::Relaxed)
        } else {
            NONE
        };
        let leaf = match self.leaves.get(root as usize) {
            Some(leaf) if usable(leaf.backend) => root as usize,
            _ => self.scan(&usable)?,
        };
        // The pick alone moves the backend behind its equals, even before its request counts.
        self.leaves[leaf]
            .live
            .last_pick
            .store(sequence + 1, Ordering::Relaxed);
        if tracked {
            self.replay(leaf);
            let mut node = self.width - 1 - sequence as usize % (self.width - 1);
            while node >= 1 && self.rematch(node) {
                node /= 2;
            }
        }
        Some(self.leaves[leaf].backend)
    }

    /// How a request on `backend`, picked from this tree, reports.
    pub(crate) fn report(self: &Arc<Self>, backend: usize) -> Option<Report> {
        let leaf = *self.leaf_of.get(backend).filter(|&&l| l != NONE)?;
        Some(Report {
            id: self.id,
            tree: self.tracked().then(|| Arc::clone(self)),
            leaf,
        })
    }

    /// A request on `live` started or ended.
    fn changed(&self, live: &BackendLive) {
        if !self.tracked() {
            return;
        }
        let key = live as *const BackendLive as usize;
        if let Ok(at) = self.by_live.binary_search_by_key(&key, |&(k, _)| k) {
            self.replay(self.by_live[at].1 as usize);
        }
    }

    /// Every node again, bottom up.
    fn replay_all(&self) {
        if self.tracked() {
            for node in (1..self.width).rev() {
                self.rematch(node);
            }
        }
    }

    fn replay(&self, leaf: usize) {
        let mut node = (self.width + leaf) / 2;
        while node >= 1 {
            self.rematch(node);
            node /= 2;
        }
    }

    /// Plays `node`'s match again; returns whether its winner changed.
    fn rematch(&self, node: usize) -> bool {
        let left = self.winners[2 * node].load(Ordering::Relaxed);
        let right = self.winners[2 * node + 1].load(Ordering::Relaxed);
        let winner = self.better(left, right);
        // Nodes near the root share cache lines that every replay passes: write only changes.
        let changed = self.winners[node].load(Ordering::Relaxed) != winner;
        if changed {
            self.winners[node].store(winner, Ordering::Relaxed);
        }
        changed
    }

    /// The winner of two leaves (either may be [`NONE`]); the left one on a full tie.
    fn better(&self, a: u32, b: u32) -> u32 {
        let (Some(la), Some(lb)) = (self.leaves.get(a as usize), self.leaves.get(b as usize))
        else {
            return if a == NONE { b } else { a };
        };
        if rank((la, key(la)), (lb, key(lb))).is_gt() {
            b
        } else {
            a
        }
    }

    /// The best usable leaf by looking at all of them, each count read once.
    fn scan(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let mut best: Option<(usize, (u64, u64))> = None;
        for (i, leaf) in self.leaves.iter().enumerate() {
            if !usable(leaf.backend) {
                continue;
            }
            let load = key(leaf);
            let wins = best.is_none_or(|(b, best_load)| {
                rank((leaf, load), (&self.leaves[b], best_load)).is_lt()
            });
            if wins {
                best = Some((i, load));
            }
        }
        best.map(|(i, _)| i)
    }
}

/// In-flight requests and weight of a leaf.
fn key(leaf: &Leaf) -> (u64, u64) {
    (leaf.live.in_flight() as u64, u64::from(leaf.weight))
}

/// Least-connections' order of two leaves with their [`key`]s: load relative to weight
/// (compared without division), then the one picked less recently first.
fn rank(a: (&Leaf, (u64, u64)), b: (&Leaf, (u64, u64))) -> std::cmp::Ordering {
    let ((leaf_a, (load_a, weight_a)), (leaf_b, (load_b, weight_b))) = (a, b);
    (load_a * weight_b)
        .cmp(&(load_b * weight_a))
        .then_with(|| leaf_a.live.last_picked().cmp(&leaf_b.live.last_picked()))
}
