//! Load progress in the logs: bytes, tensors and rate, at most every few seconds.

use std::time::{Duration, Instant};

/// Counts what a loader has read; logs progress periodically and a summary at the end.
#[derive(Debug)]
pub struct LoadProgress {
    what: String,
    total_bytes: u64,
    total_tensors: usize,
    bytes: u64,
    tensors: usize,
    started: Instant,
    last_log: Instant,
    every: Duration,
}

impl LoadProgress {
    pub fn new(what: &str, total_bytes: u64, total_tensors: usize) -> LoadProgress {
        let now = Instant::now();
        LoadProgress {
            what: what.to_string(),
            total_bytes,
            total_tensors,
            bytes: 0,
            tensors: 0,
            started: now,
            last_log: now,
            every: Duration::from_secs(5),
        }
    }

    /// One more tensor of `bytes` stored bytes is loaded.
    pub fn tick(&mut self, bytes: u64) {
        self.bytes += bytes;
        self.tensors += 1;
        if self.last_log.elapsed() >= self.every {
            self.last_log = Instant::now();
            self.log("loading");
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn tensors(&self) -> usize {
        self.tensors
    }

    /// Logs the summary and returns the elapsed seconds.
    pub fn finish(self) -> f64 {
        self.log("loaded");
        self.started.elapsed().as_secs_f64()
    }

    fn log(&self, state: &str) {
        let secs = self.started.elapsed().as_secs_f64();
        tracing::info!(
            what = %self.what,
            state,
            gb = self.bytes as f64 / 1e9,
            total_gb = self.total_bytes as f64 / 1e9,
            tensors = self.tensors,
            total_tensors = self.total_tensors,
            gb_per_s = self.bytes as f64 / 1e9 / secs.max(1e-9),
            seconds = secs,
            "weights"
        );
    }
}
