//! The verdict on one analysis window: `to`'s counts against the spec's limits, and its p99
//! against `from`'s in the same window. Pure arithmetic, so every limit and its reason are
//! tested without a clock or a socket.

use std::time::Duration;

use switchyard_config::rollout::Analysis;
use switchyard_pool::Verdict;

/// What one upstream did in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    pub requests: u64,
    pub errors: u64,
    pub p99: Option<Duration>,
}

impl Counts {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// The verdict, and in words why a window failed or said nothing.
pub fn judge(analysis: &Analysis, to: &Counts, from: &Counts) -> (Verdict, Option<String>) {
    if to.requests < analysis.min_requests {
        return (
            Verdict::Inconclusive,
            Some(format!(
                "{} requests to the new version, fewer than min_requests {}",
                to.requests, analysis.min_requests
            )),
        );
    }
    let rate = to.error_rate();
    if rate > analysis.max_error_rate {
        return (
            Verdict::Failed,
            Some(format!(
                "error rate {} ({} of {} requests) is over max_error_rate {}",
                percent(rate),
                to.errors,
                to.requests,
                percent(analysis.max_error_rate)
            )),
        );
    }
    if let (Some(limit), Some(p99)) = (analysis.max_p99_latency, to.p99) {
        if p99 > limit {
            return (
                Verdict::Failed,
                Some(format!(
                    "p99 latency {} is over max_p99_latency {}",
                    millis(p99),
                    millis(limit)
                )),
            );
        }
    }
    if let (Some(ratio), Some(p99)) = (analysis.max_latency_ratio, to.p99) {
        // Skipped when `from` has too few requests to have a p99 worth comparing (at 100%).
        if let Some(baseline) = from.p99.filter(|_| from.requests >= analysis.min_requests) {
            let limit = baseline.as_secs_f64() * ratio;
            if p99.as_secs_f64() > limit {
                return (
                    Verdict::Failed,
                    Some(format!(
                        "p99 latency {} is {:.2}x the old version's {} in the same window, over max_latency_ratio {ratio}",
                        millis(p99),
                        p99.as_secs_f64() / baseline.as_secs_f64().max(1e-9),
                        millis(baseline)
                    )),
                );
            }
        }
    }
    (Verdict::Passed, None)
}

fn percent(rate: f64) -> String {
    format!("{:.2}%", rate * 100.0)
}

pub(crate) fn millis(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, errors: u64, p99_ms: u64) -> Counts {
        Counts {
            requests,
            errors,
            p99: (requests > 0).then(|| Duration::from_millis(p99_ms)),
        }
    }

    fn analysis() -> Analysis {
        Analysis {
            max_p99_latency: Some(Duration::from_millis(500)),
            max_latency_ratio: Some(1.5),
            ..Analysis::default()
        }
    }

    #[test]
    fn too_few_requests_say_nothing() {
        let (verdict, reason) = judge(&analysis(), &counts(19, 19, 900), &counts(100, 0, 10));
        assert_eq!(verdict, Verdict::Inconclusive);
        assert!(reason.unwrap().contains("19 requests"));
    }

    #[test]
    fn each_limit_fails_with_its_numbers() {
        let a = analysis();
        let (v, why) = judge(&a, &counts(100, 30, 10), &counts(100, 0, 10));
        assert_eq!(v, Verdict::Failed);
        assert_eq!(
            why.unwrap(),
            "error rate 30.00% (30 of 100 requests) is over max_error_rate 1.00%"
        );
        let (v, why) = judge(&a, &counts(100, 0, 600), &counts(100, 0, 590));
        assert_eq!(v, Verdict::Failed);
        assert!(why
            .unwrap()
            .contains("p99 latency 600.0ms is over max_p99_latency 500.0ms"));
        let (v, why) = judge(&a, &counts(100, 0, 310), &counts(100, 0, 10));
        assert_eq!(v, Verdict::Failed);
        assert!(why.unwrap().contains("31.00x the old version's 10.0ms"));
    }

    #[test]
    fn a_healthy_window_passes_and_the_ratio_needs_a_baseline() {
        let a = analysis();
        assert_eq!(
            judge(&a, &counts(100, 1, 12), &counts(100, 0, 10)).0,
            Verdict::Passed
        );
        // At 100% `from` has no requests left: the ratio is skipped, not failed.
        assert_eq!(
            judge(&a, &counts(100, 0, 300), &counts(3, 0, 10)).0,
            Verdict::Passed
        );
        // Error rate at exactly the limit passes.
        assert_eq!(
            judge(&a, &counts(100, 1, 10), &counts(0, 0, 0)).0,
            Verdict::Passed
        );
    }
}
