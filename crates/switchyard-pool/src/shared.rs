//! What sharing the state with other instances adds to the pool: the merge that keeps the
//! entries only another instance's config has, the other instances' in-flight requests in the
//! checks of a change, the cluster-wide window counters the rollout driver judges, and the
//! store's metrics.
//!
//! Instances may run different config files during a rolling config change. Each one runs the
//! state *fitted* to its own config, but what it writes back is the store's state with only
//! the entries its change touched replaced: a split of a route only the newer config has
//! survives a change made on an instance that still runs the older one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use prometheus::{IntCounter, IntGauge};

use crate::metrics::Metrics;
use crate::state::{BackendChange, Live, RuntimeState, UpstreamChanges};
use crate::stats::{StatsReading, Window};
use crate::store::InstanceReport;

/// `stored` with what the change made of `before` (both fitted to this instance's config)
/// into `after`: entries the change did not touch stay as the store has them.
pub(crate) fn merge(
    stored: &RuntimeState,
    before: &RuntimeState,
    after: &RuntimeState,
) -> RuntimeState {
    let mut out = stored.clone();
    merge_map(&mut out.splits, &before.splits, &after.splits);
    merge_map(&mut out.rollouts, &before.rollouts, &after.rollouts);
    let names: BTreeSet<&String> = before
        .upstreams
        .keys()
        .chain(after.upstreams.keys())
        .collect();
    let empty = UpstreamChanges::default();
    for name in names {
        let (b, a) = (
            before.upstreams.get(name).unwrap_or(&empty),
            after.upstreams.get(name).unwrap_or(&empty),
        );
        if a == b {
            continue;
        }
        let entry = out.upstreams.entry(name.clone()).or_default();
        merge_backend_changes(&mut entry.changed, &b.changed, &a.changed);
        let (b_removed, a_removed) = (&b.removed, &a.removed);
        for gone in b_removed.difference(a_removed) {
            entry.removed.remove(gone);
        }
        entry
            .removed
            .extend(a_removed.difference(b_removed).copied());
        // Added backends keep the store's order; ours are put where the change put them.
        if a.added != b.added {
            let ours: BTreeSet<SocketAddr> =
                b.added.iter().chain(&a.added).map(|x| x.address).collect();
            entry.added.retain(|x| !ours.contains(&x.address));
            entry.added.extend(a.added.iter().copied());
        }
        if entry == &empty {
            out.upstreams.remove(name);
        }
    }
    out.store_revision = None;
    // As a state file is: a binary from before a feature still reads a state without it.
    out.format = out.oldest_format();
    out
}

fn merge_map<K: Ord + Clone, V: Clone + PartialEq>(
    out: &mut BTreeMap<K, V>,
    before: &BTreeMap<K, V>,
    after: &BTreeMap<K, V>,
) {
    for key in before.keys().chain(after.keys()) {
        match (before.get(key), after.get(key)) {
            (b, Some(a)) if b != Some(a) => drop(out.insert(key.clone(), a.clone())),
            (Some(_), None) => drop(out.remove(key)),
            _ => {}
        }
    }
}

/// A backend's weight and its state are merged apart: a drain written by an instance whose
/// file gives the backend another weight (so its own view dropped the weight set through the
/// API) leaves that weight in the store for the instances it still fits.
fn merge_backend_changes(
    out: &mut BTreeMap<SocketAddr, BackendChange>,
    before: &BTreeMap<SocketAddr, BackendChange>,
    after: &BTreeMap<SocketAddr, BackendChange>,
) {
    let none = BackendChange::default();
    for address in before.keys().chain(after.keys()) {
        let (b, a) = (
            before.get(address).unwrap_or(&none),
            after.get(address).unwrap_or(&none),
        );
        if a == b {
            continue;
        }
        let mut merged = out.get(address).copied().unwrap_or_default();
        if (a.weight, a.file_weight) != (b.weight, b.file_weight) {
            merged.weight = a.weight;
            merged.file_weight = a.file_weight;
        }
        if a.state != b.state {
            merged.state = a.state;
        }
        if merged.weight.is_none() && merged.state.is_none() {
            out.remove(address);
        } else {
            out.insert(*address, merged);
        }
    }
}

/// The checks of a change see every instance's requests in flight, not only this one's: a
/// backend is removed only once every instance has drained it. Reports are at most about a
/// second old; an instance that died takes its report with its lease.
pub(crate) struct ClusterLive<'a, L> {
    pub local: L,
    pub peers: &'a [InstanceReport],
    pub me: &'a crate::Pool,
}

impl<L: Live> Live for ClusterLive<'_, L> {
    fn in_flight(&self, upstream: &str, address: SocketAddr) -> usize {
        let others: usize = self
            .peers
            .iter()
            .filter(|p| !self.me.is_me(p))
            .filter_map(|p| p.in_flight.get(upstream)?.get(&address))
            .sum();
        self.local.in_flight(upstream, address) + others
    }

    fn healthy(&self, upstream: &str, address: SocketAddr) -> bool {
        // Health is each instance's own: judged here by what this one sees.
        self.local.healthy(upstream, address)
    }
}

/// One pair's counters over every instance at one moment: this instance's own and the last
/// reported reading of each other one. A window is the sum of each instance's difference,
/// so that an instance joining late adds only what it counted since, and one that restarted
/// (its counters back at zero) nothing negative.
#[derive(Debug, Clone, Default)]
pub struct ClusterReading {
    pub(crate) by_instance: BTreeMap<String, StatsReading>,
}

impl ClusterReading {
    /// What happened between `earlier` and this reading, over every instance.
    pub fn since(&self, earlier: &ClusterReading) -> Window {
        let mut total = Window::default();
        for (name, now) in &self.by_instance {
            if let Some(before) = earlier.by_instance.get(name) {
                let window = if now.requests < before.requests {
                    // Restarted since: everything it counted is new.
                    now.total()
                } else {
                    now.since(before)
                };
                total.add(&window);
            }
        }
        total
    }
}

/// The store's health in metrics, as the contract names them.
pub(crate) struct StoreMetrics {
    pub up: IntGauge,
    pub revision: IntGauge,
    pub refused: IntCounter,
    pub driver: IntGauge,
}

impl StoreMetrics {
    pub fn new(metrics: &Metrics) -> StoreMetrics {
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("a valid metric definition");
            metrics.register(name, Box::new(g.clone()));
            g
        };
        let refused = IntCounter::new(
            "switchyard_state_store_refused_total",
            "States from the state store this instance could not apply (the old state stayed).",
        )
        .expect("a valid metric definition");
        metrics.register(
            "switchyard_state_store_refused_total",
            Box::new(refused.clone()),
        );
        StoreMetrics {
            up: gauge(
                "switchyard_state_store_up",
                "1 while the state store answers, 0 while it does not.",
            ),
            revision: gauge(
                "switchyard_state_store_revision",
                "The state store revision of the runtime state this instance runs.",
            ),
            refused,
            driver: gauge(
                "switchyard_rollout_driver",
                "1 while this instance drives rollouts (holds the store's lease).",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::SplitOverride;

    fn split(weights: &[(&str, u32)]) -> SplitOverride {
        SplitOverride {
            split: weights.iter().map(|(u, w)| (u.to_string(), *w)).collect(),
            file: BTreeMap::new(),
        }
    }

    #[test]
    fn a_change_replaces_only_what_it_touched() {
        let mut stored = RuntimeState::default();
        // Only the other instance's config has route "new" and backend 10.0.0.9.
        stored.splits.insert("new".into(), split(&[("a", 1)]));
        stored.splits.insert("web".into(), split(&[("blue", 100)]));
        let other_backend: SocketAddr = "10.0.0.9:80".parse().expect("address");
        let ours: SocketAddr = "10.0.0.1:80".parse().expect("address");
        let drained = BackendChange {
            state: Some(crate::BackendState::Draining),
            ..BackendChange::default()
        };
        stored
            .upstreams
            .entry("app".into())
            .or_default()
            .changed
            .insert(other_backend, drained);
        let mut before = RuntimeState::default();
        before.splits.insert("web".into(), split(&[("blue", 100)]));
        let mut after = before.clone();
        after
            .splits
            .insert("web".into(), split(&[("blue", 90), ("green", 10)]));
        after
            .upstreams
            .entry("app".into())
            .or_default()
            .changed
            .insert(ours, drained);
        let merged = merge(&stored, &before, &after);
        assert_eq!(merged.splits["new"], split(&[("a", 1)]));
        assert_eq!(merged.splits["web"], split(&[("blue", 90), ("green", 10)]));
        let app = &merged.upstreams["app"].changed;
        assert!(app.contains_key(&other_backend) && app.contains_key(&ours));
        // And taking our change back leaves the other's entry alone.
        let undone = merge(&merged, &after, &before);
        assert_eq!(undone.splits["web"], split(&[("blue", 100)]));
        assert_eq!(
            undone.upstreams["app"].changed.keys().collect::<Vec<_>>(),
            vec![&other_backend]
        );
    }

    #[test]
    fn a_drain_keeps_a_weight_only_another_instance_sees() {
        let backend: SocketAddr = "10.0.0.1:80".parse().expect("address");
        let weighted = BackendChange {
            weight: Some(5),
            file_weight: Some(1),
            state: None,
        };
        let mut stored = RuntimeState::default();
        stored
            .upstreams
            .entry("app".into())
            .or_default()
            .changed
            .insert(backend, weighted);
        // This instance's file gives the backend weight 2: its view dropped the weight.
        let before = RuntimeState::default();
        let mut after = RuntimeState::default();
        let drained = BackendChange {
            state: Some(crate::BackendState::Draining),
            ..BackendChange::default()
        };
        after
            .upstreams
            .entry("app".into())
            .or_default()
            .changed
            .insert(backend, drained);
        let merged = merge(&stored, &before, &after);
        let change = merged.upstreams["app"].changed[&backend];
        assert_eq!(change.weight, Some(5));
        assert_eq!(change.state, Some(crate::BackendState::Draining));
        // Undoing the drain leaves the weight.
        let undone = merge(&merged, &after, &before);
        assert_eq!(undone.upstreams["app"].changed[&backend], weighted);
    }

    #[test]
    fn a_window_sums_each_instance_since_its_own_reading() {
        let reading = |requests: u64, errors: u64| StatsReading::for_test(requests, errors);
        let before = ClusterReading {
            by_instance: [("a".into(), reading(100, 1)), ("b".into(), reading(50, 0))].into(),
        };
        let now = ClusterReading {
            by_instance: [
                ("a".into(), reading(150, 3)),
                // Restarted: its 20 are all new.
                ("b".into(), reading(20, 1)),
                // Joined since: counted from the next window on.
                ("c".into(), reading(1000, 1000)),
            ]
            .into(),
        };
        let window = now.since(&before);
        assert_eq!((window.requests, window.errors), (70, 3));
    }
}
