//! `switchyard_tls_certificate_expiry_timestamp_seconds{listener,name}`: each served
//! certificate's notAfter, so that an alert (`... - time() < 14 * 86400`) catches a renewal
//! that did not happen, before clients do. One series per listener address and certificate
//! name; a reload replaces the whole set, so a certificate taken out of the file loses its
//! series instead of alerting forever.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

use prometheus::{IntGaugeVec, Opts};
use switchyard_pool::Metrics;

use crate::load::Certificate;

pub(crate) const NAME: &str = "switchyard_tls_certificate_expiry_timestamp_seconds";

/// (listener address, certificate name) -> notAfter in Unix seconds.
pub(crate) type Series = BTreeMap<(String, String), i64>;

/// The series of one listener's certificates. A certificate without a name has `name=""`;
/// when several carry one name (an ECDSA and an RSA one), the series is the one that expires
/// first, since that is the one an alert must be about.
pub(crate) fn series(listener: SocketAddr, certificates: &[Certificate], into: &mut Series) {
    let listener = listener.to_string();
    for certificate in certificates {
        let names = certificate.names.iter().map(String::as_str);
        let names: Vec<&str> = if certificate.names.is_empty() {
            vec![""]
        } else {
            names.collect()
        };
        for name in names {
            into.entry((listener.clone(), name.to_string()))
                .and_modify(|at| *at = (*at).min(certificate.not_after))
                .or_insert(certificate.not_after);
        }
    }
}

pub(crate) struct ExpiryMetric {
    gauge: IntGaugeVec,
    /// What the gauge holds now, to know which series a new set drops.
    current: Mutex<Series>,
}

impl ExpiryMetric {
    pub(crate) fn register(metrics: &Metrics) -> ExpiryMetric {
        let gauge = IntGaugeVec::new(
            Opts::new(
                NAME,
                "When each served TLS certificate expires (its notAfter), in Unix seconds, by listener address and certificate name.",
            ),
            &["listener", "name"],
        );
        // The name and labels above are fixed and valid: only a bug could make this fail.
        let gauge = match gauge {
            Ok(gauge) => gauge,
            Err(e) => panic!("metric {NAME}: {e}"),
        };
        metrics.register(NAME, Box::new(gauge.clone()));
        ExpiryMetric {
            gauge,
            current: Mutex::new(Series::new()),
        }
    }

    /// Replaces every series with `next`: those not in it are removed, the others set.
    pub(crate) fn replace(&self, next: Series) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        for (listener, name) in current.keys() {
            if !next.contains_key(&(listener.clone(), name.clone())) {
                let _ = self.gauge.remove_label_values(&[listener, name]);
            }
        }
        for ((listener, name), not_after) in &next {
            self.gauge
                .with_label_values(&[listener.as_str(), name.as_str()])
                .set(*not_after);
        }
        *current = next;
    }

    /// The series set last.
    pub(crate) fn current(&self) -> Series {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    #[cfg(test)]
    pub(crate) fn values(&self) -> Series {
        use prometheus::core::Collector;
        let mut out = Series::new();
        for family in self.gauge.collect() {
            for metric in family.get_metric() {
                let label = |which: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == which)
                        .map(|l| l.value().to_string())
                        .unwrap_or_default()
                };
                out.insert(
                    (label("listener"), label("name")),
                    metric.get_gauge().get_value() as i64,
                );
            }
        }
        out
    }
}
