//! Sticky splits: a user's key picks the route's upstream from the split's weights, the same
//! answer for the same split in every process, version and instance.
//!
//! The key is hashed with XXH3 (a specified hash, seed 0), which gives each user a fixed point
//! in `[0, 2^64)`. The split's upstreams own consecutive intervals of that space, each as wide
//! as its share, in name order except that a rollout's `to` comes right after its `from`
//! ([`crate::route`]). When weight moves between two neighbours only the boundary between
//! them moves, so no user of the growing one leaves it and no user of the shrinking one goes
//! anywhere else: a canary grows by taking users of the stable version and keeps every user
//! it has. A rollout's pair and any split of two upstreams are always neighbours. With three
//! or more, a PUT moving weight between two that are not neighbours shifts the intervals
//! between them. No function of the split alone can do better: it would have to keep every
//! third upstream's users in place for every pair, and for three upstreams the regions that
//! asks for cannot tile the possible splits (docs/configuration.md says what moves when).
//!
//! An upstream with no available backend is skipped for its users: they are placed by the
//! same points over the upstreams that are available, and come back when it does. One whose
//! backends all retire keeps the users they know, and its new users are placed the same way
//! over the upstreams that take new users ([`crate::route`]).

use xxhash_rust::xxh3::xxh3_64;

/// The hash of a sticky key, the same in every process.
pub fn key_point(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// Upstreams (indices) over the key space, in split order, by their share of the weight.
pub(crate) struct Layout {
    /// Exclusive upper bound of each interval in `[0, 2^64)`, and the upstream that owns it;
    /// zero-weight upstreams own none.
    ends: Box<[(u128, usize)]>,
}

impl Layout {
    /// `split` is `(upstream, weight)` in the order that lays them out.
    pub(crate) fn new(split: impl IntoIterator<Item = (usize, u32)>) -> Layout {
        let split: Vec<(usize, u32)> = split.into_iter().filter(|&(_, w)| w > 0).collect();
        let total: u128 = split.iter().map(|&(_, w)| u128::from(w)).sum();
        let mut below = 0u128;
        let ends = split
            .iter()
            .map(|&(upstream, weight)| {
                below += u128::from(weight);
                // The share of the space up to and including this upstream; the last ends at
                // 2^64 exactly, so every point has an owner.
                ((below << 64) / total, upstream)
            })
            .collect();
        Layout { ends }
    }

    /// The upstream that owns `point`.
    pub(crate) fn owner(&self, point: u64) -> Option<usize> {
        let point = u128::from(point);
        let at = self.ends.partition_point(|&(end, _)| end <= point);
        self.ends.get(at).map(|&(_, upstream)| upstream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(layout: &Layout, keys: &[u64], upstreams: usize) -> Vec<f64> {
        let mut counts = vec![0usize; upstreams];
        for &k in keys {
            counts[layout.owner(k).unwrap()] += 1;
        }
        counts
            .iter()
            .map(|&c| c as f64 * 100.0 / keys.len() as f64)
            .collect()
    }

    fn users() -> Vec<u64> {
        (0..10_000)
            .map(|i| key_point(format!("user-{i}").as_bytes()))
            .collect()
    }

    #[test]
    fn the_hash_is_fixed() {
        // XXH3-64 of "user-1", seed 0: the same in every build, or users would move at an
        // upgrade.
        assert_eq!(key_point(b"user-1"), xxh3_64(b"user-1"));
        assert_eq!(key_point(b""), 0x2d06_8005_38d3_94c2);
    }

    #[test]
    fn a_growing_canary_keeps_its_users_and_takes_only_stable_ones() {
        let keys = users();
        let mut previous: Option<Vec<usize>> = None;
        let steps = [0u32, 1, 5, 25, 50, 100, 50, 25, 5, 1, 0];
        for (n, &canary) in steps.iter().enumerate() {
            // 0 = blue (stable), 1 = green (canary), in name order.
            let layout = Layout::new([(0, 100 - canary), (1, canary)]);
            let now: Vec<usize> = keys.iter().map(|&k| layout.owner(k).unwrap()).collect();
            let share = shares(&layout, &keys, 2)[1];
            assert!(
                (share - f64::from(canary)).abs() <= 1.0,
                "green has {share:.2}% of the users at a weight of {canary}%"
            );
            if let Some(before) = &previous {
                let growing = n <= 5;
                for (b, a) in before.iter().zip(&now) {
                    if growing {
                        assert!(!(*b == 1 && *a == 0), "a canary user went back");
                    } else {
                        assert!(!(*b == 0 && *a == 1), "a stable user joined the canary");
                    }
                }
            }
            previous = Some(now);
        }
    }

    #[test]
    fn every_point_has_an_owner_and_zero_weights_own_nothing() {
        let layout = Layout::new([(0, 0), (1, 3), (2, 0), (3, 1)]);
        assert_eq!(layout.owner(0), Some(1));
        assert_eq!(layout.owner(u64::MAX), Some(3));
        assert_eq!(layout.owner((3u64 << 62) - 1), Some(1));
        assert_eq!(layout.owner(3u64 << 62), Some(3));
        assert_eq!(Layout::new([(0, 0)]).owner(7), None);
    }
}
