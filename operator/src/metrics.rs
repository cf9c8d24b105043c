//! Operator metrics in the Prometheus text format. All metric names live here.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

pub const RECONCILES: &str = "dspark_operator_reconcile_total";
pub const FAILURES: &str = "dspark_operator_reconcile_failures_total";
pub const DURATION: &str = "dspark_operator_reconcile_duration_seconds";
pub const GROUP_RECREATES: &str = "dspark_operator_group_recreates_total";
pub const LEADER: &str = "dspark_operator_leader";

const BUCKETS: [f64; 9] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Default)]
struct Inner {
    reconciles: u64,
    failures: BTreeMap<String, u64>,
    recreates: u64,
    bucket_counts: [u64; BUCKETS.len()],
    duration_sum: f64,
    duration_count: u64,
    leader: bool,
}

/// Counters shared by the controller and the HTTP server.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A poisoned lock only means a panic elsewhere mid-update; counters stay usable.
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    pub fn reconciled(&self, took: Duration) {
        let secs = took.as_secs_f64();
        self.with(|m| {
            m.reconciles += 1;
            m.duration_sum += secs;
            m.duration_count += 1;
            for (i, le) in BUCKETS.iter().enumerate() {
                if secs <= *le {
                    m.bucket_counts[i] += 1;
                }
            }
        });
    }

    pub fn failed(&self, label: &str) {
        self.with(|m| *m.failures.entry(label.to_string()).or_default() += 1);
    }

    pub fn group_recreated(&self) {
        self.with(|m| m.recreates += 1);
    }

    pub fn set_leader(&self, leader: bool) {
        self.with(|m| m.leader = leader);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        self.with(|m| {
            let mut out = String::new();
            let _ = writeln!(out, "# HELP {RECONCILES} Reconcile passes run.\n# TYPE {RECONCILES} counter\n{RECONCILES} {}", m.reconciles);
            let _ = writeln!(out, "# HELP {FAILURES} Reconcile passes that failed, by error.\n# TYPE {FAILURES} counter");
            for (label, n) in &m.failures {
                let _ = writeln!(out, "{FAILURES}{{error=\"{label}\"}} {n}");
            }
            let _ = writeln!(out, "# HELP {GROUP_RECREATES} Serving groups recreated after a member failure.\n# TYPE {GROUP_RECREATES} counter\n{GROUP_RECREATES} {}", m.recreates);
            let _ = writeln!(out, "# HELP {LEADER} 1 while this replica holds the leader Lease.\n# TYPE {LEADER} gauge\n{LEADER} {}", u8::from(m.leader));
            let _ = writeln!(out, "# HELP {DURATION} Reconcile duration.\n# TYPE {DURATION} histogram");
            for (le, n) in BUCKETS.iter().zip(m.bucket_counts.iter()) {
                let _ = writeln!(out, "{DURATION}_bucket{{le=\"{le}\"}} {n}");
            }
            let _ = writeln!(out, "{DURATION}_bucket{{le=\"+Inf\"}} {}", m.duration_count);
            let _ = writeln!(out, "{DURATION}_sum {}", m.duration_sum);
            let _ = writeln!(out, "{DURATION}_count {}", m.duration_count);
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_histogram() {
        let m = Metrics::default();
        m.reconciled(Duration::from_millis(30));
        m.reconciled(Duration::from_secs(20));
        m.failed("kube");
        let text = m.render();
        assert!(text.contains("dspark_operator_reconcile_total 2"));
        assert!(text.contains("dspark_operator_reconcile_failures_total{error=\"kube\"} 1"));
        assert!(text.contains("dspark_operator_reconcile_duration_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("dspark_operator_reconcile_duration_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("dspark_operator_reconcile_duration_seconds_count 2"));
    }
}
