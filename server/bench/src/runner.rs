//! Traffic shapes: a fixed number of closed-loop streams, or open-loop Poisson arrivals.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;

use crate::client::{Endpoint, GenParams, Payload, RequestRecord};

/// One prompt ready to send.
#[derive(Debug, Clone)]
pub struct Job {
    pub prompt_id: String,
    pub payload: Payload,
}

/// When a traffic phase stops issuing requests (in-flight ones always finish).
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub requests: Option<usize>,
    pub duration: Option<Duration>,
}

/// Shared by every request of a run.
#[derive(Clone)]
pub struct Runner {
    pub endpoint: Arc<Endpoint>,
    pub params: Arc<GenParams>,
    pub timeout: Duration,
    pub run_start: Instant,
    pub progress: ProgressBar,
}

impl Runner {
    async fn one(&self, group: &str, job: &Job) -> RequestRecord {
        let rec = self
            .endpoint
            .stream(
                group,
                &job.prompt_id,
                &job.payload,
                &self.params,
                self.timeout,
                self.run_start,
            )
            .await;
        self.progress.inc(1);
        if let Some(class) = &rec.error {
            tracing::debug!(group, prompt = %job.prompt_id, class, detail = ?rec.error_detail, "request failed");
        }
        rec
    }

    /// `concurrency` streams, each sending its next request as soon as the previous one ends.
    /// Jobs are taken in order, wrapping around. Returns records in completion order.
    pub async fn closed_loop(
        &self,
        group: &str,
        jobs: Arc<Vec<Job>>,
        concurrency: usize,
        limit: Limit,
    ) -> Vec<RequestRecord> {
        if jobs.is_empty() {
            return Vec::new();
        }
        let next = Arc::new(AtomicUsize::new(0));
        let deadline = limit.duration.map(|d| Instant::now() + d);
        let mut workers = Vec::new();
        for _ in 0..concurrency.max(1) {
            let (me, jobs, next, group) =
                (self.clone(), jobs.clone(), next.clone(), group.to_string());
            workers.push(tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if limit.requests.is_some_and(|n| i >= n) {
                        break;
                    }
                    out.push(me.one(&group, &jobs[i % jobs.len()]).await);
                }
                out
            }));
        }
        collect(workers).await
    }

    /// Requests arriving as a Poisson process of `rate` per second (exponential gaps, seeded),
    /// regardless of how many are in flight unless `max_concurrency` caps them.
    pub async fn poisson(
        &self,
        group: &str,
        jobs: Arc<Vec<Job>>,
        rate: f64,
        limit: Limit,
        max_concurrency: Option<usize>,
        seed: u64,
    ) -> Vec<RequestRecord> {
        if jobs.is_empty() || rate <= 0.0 {
            return Vec::new();
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let cap = max_concurrency.map(|n| Arc::new(Semaphore::new(n.max(1))));
        let start = tokio::time::Instant::now();
        let mut at = start;
        let mut tasks = Vec::new();
        for i in 0.. {
            if limit.requests.is_some_and(|n| i >= n) {
                break;
            }
            // Inverse-CDF sample of Exp(rate); 1 - u is in (0, 1] so ln is finite.
            let u: f64 = rng.random();
            at += Duration::from_secs_f64(-(1.0 - u).ln() / rate);
            if limit
                .duration
                .is_some_and(|d| at.duration_since(start) >= d)
            {
                break;
            }
            tokio::time::sleep_until(at).await;
            let permit = match &cap {
                Some(sem) => match sem.clone().acquire_owned().await {
                    Ok(p) => Some(p),
                    Err(_) => break, // the semaphore is never closed
                },
                None => None,
            };
            let (me, jobs, group) = (self.clone(), jobs.clone(), group.to_string());
            tasks.push(tokio::spawn(async move {
                let rec = me.one(&group, &jobs[i % jobs.len()]).await;
                drop(permit);
                vec![rec]
            }));
        }
        collect(tasks).await
    }
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Vec<RequestRecord>>>) -> Vec<RequestRecord> {
    let mut out = Vec::new();
    for t in tasks {
        match t.await {
            Ok(recs) => out.extend(recs),
            Err(e) => tracing::error!("benchmark task failed: {e}"),
        }
    }
    out
}

/// A progress bar on stderr, or a hidden one when quiet or stderr is not a terminal.
/// `len` None means an open-ended run (a spinner with a count).
pub fn progress_bar(len: Option<u64>, quiet: bool) -> ProgressBar {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
    };
    let template = if len.is_some() {
        "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} requests {msg}"
    } else {
        "{spinner} [{elapsed_precise}] {pos} requests {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
