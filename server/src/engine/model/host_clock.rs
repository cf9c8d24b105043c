//! Wall time of the host-side phases of the forward pass: what a device backend does not run
//! yet (hyper-connections, norms, RoPE, routing, ...). The benchmark prints it beside the
//! backend's own operation times, so the host share of a step is measured, not inferred.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::engine::OpTime;

/// Host phases of a step. Each names code that runs on the host between backend calls.
#[derive(Debug, Clone, Copy)]
pub enum HostPhase {
    /// Mixing coefficients (Sinkhorn), collapse and expand of the residual streams.
    HyperConnections,
    /// Input RMSNorms of the attention and FFN sites.
    Norms,
    /// q/kv norms, RoPE on queries and keys, building key lists, undoing RoPE on the output.
    AttentionSetup,
    /// Pooling of the compressor windows (CSA / HCA and the indexer's).
    Compressor,
    /// Indexer query RoPE and the top-k of its scores.
    IndexerTopK,
    /// Router scores and expert choice.
    Routing,
    /// Final collapse, norm and the per-sequence split of logits.
    Logits,
}

const PHASES: [&str; 7] = [
    "host: hyper-connections",
    "host: norms",
    "host: attention setup",
    "host: compressor",
    "host: indexer top-k",
    "host: routing",
    "host: logits",
];

/// Per phase: calls and nanoseconds since the model was built.
#[derive(Debug, Default)]
pub struct HostClock {
    calls: [AtomicU64; PHASES.len()],
    nanos: [AtomicU64; PHASES.len()],
}

impl HostClock {
    /// Runs `f`, counting its wall time against `phase`.
    pub fn time<T>(&self, phase: HostPhase, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = f();
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.calls[phase as usize].fetch_add(1, Ordering::Relaxed);
        self.nanos[phase as usize].fetch_add(ns, Ordering::Relaxed);
        out
    }

    pub fn times(&self) -> Vec<OpTime> {
        PHASES
            .iter()
            .enumerate()
            .map(|(i, op)| OpTime {
                op,
                calls: self.calls[i].load(Ordering::Relaxed),
                seconds: self.nanos[i].load(Ordering::Relaxed) as f64 * 1e-9,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_accumulate_calls_and_time() {
        let c = HostClock::default();
        let v = c.time(HostPhase::Routing, || {
            std::thread::sleep(std::time::Duration::from_millis(2));
            7
        });
        c.time(HostPhase::Routing, || ());
        assert_eq!(v, 7);
        let t = c.times();
        let routing = t.iter().find(|t| t.op == "host: routing").unwrap();
        assert_eq!(routing.calls, 2);
        assert!(routing.seconds >= 0.002);
        assert_eq!(t.iter().filter(|t| t.calls > 0).count(), 1);
    }
}
