//! Runs the [`Scheduler`] on its own OS thread (engine steps block for milliseconds to seconds and
//! must not stall the async runtime) and gives the API a cheap, cloneable handle to it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;

use super::request::{GenerateRequest, SamplingParams, SeqEvent};
use super::Scheduler;
use crate::engine::EngineError;

enum Command {
    Add(u64, GenerateRequest),
    Abort(u64, Option<usize>),
    AbortAll,
    /// End every request and stop the thread (dropping the runner).
    Stop,
}

/// Why a request was refused before it was queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The request itself is wrong (400).
    #[error("{0}")]
    Invalid(String),
    /// Too many requests already wait (429).
    #[error("the server has {0} requests waiting; try again later")]
    QueueFull(usize),
    /// The scheduler thread is gone (503).
    #[error("the engine is not running")]
    Unavailable,
}

/// Limits the API checks requests against, known once the engine is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_model_len: usize,
    pub pool_tokens: usize,
    pub block_size: usize,
    pub vocab_size: usize,
    pub max_waiting_requests: usize,
    pub max_num_seqs: usize,
}

#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Command>,
    queued: Arc<AtomicUsize>,
    running_seqs: Arc<AtomicUsize>,
    next_request_id: Arc<AtomicU64>,
    alive: Arc<AtomicBool>,
    limits: Limits,
}

impl SchedulerHandle {
    /// Starts the scheduler thread. It ends when every handle is dropped, after an engine error
    /// (the error is returned by the join handle), or never otherwise.
    pub fn spawn(
        scheduler: Scheduler,
    ) -> std::io::Result<(SchedulerHandle, JoinHandle<Result<(), EngineError>>)> {
        let (tx, rx) = mpsc::channel();
        let alive = Arc::new(AtomicBool::new(true));
        let pool = scheduler.pool();
        let cfg = scheduler.config();
        let limits = Limits {
            max_model_len: cfg.max_model_len,
            pool_tokens: pool.pool_tokens(),
            block_size: pool.block_size(),
            vocab_size: scheduler.vocab_size(),
            max_waiting_requests: cfg.max_waiting_requests,
            max_num_seqs: cfg.max_num_seqs,
        };
        let handle = SchedulerHandle {
            tx,
            queued: scheduler.queued_counter(),
            running_seqs: scheduler.running_counter(),
            next_request_id: Arc::new(AtomicU64::new(0)),
            alive: alive.clone(),
            limits,
        };
        let join = std::thread::Builder::new()
            .name("dspark-scheduler".into())
            .spawn(move || {
                let r = run(scheduler, rx);
                alive.store(false, Ordering::SeqCst);
                r
            })?;
        Ok((handle, join))
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Requests submitted and not yet admitted to run.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Validates and queues a request. Dropping the returned receiver cancels it.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        arrival: std::time::Instant,
    ) -> Result<(u64, UnboundedReceiver<SeqEvent>), SubmitError> {
        check_request(&self.limits, &prompt, &params)?;
        if !self.is_alive() {
            return Err(SubmitError::Unavailable);
        }
        // Reserve a queue slot atomically so concurrent submits cannot overshoot the bound.
        // Free running slots count on top of the waiting bound: what fills them starts at the
        // next step instead of waiting, so a burst into an idle server is not refused.
        let free = self
            .limits
            .max_num_seqs
            .saturating_sub(self.running_seqs.load(Ordering::SeqCst));
        let limit = self.limits.max_waiting_requests.saturating_add(free);
        self.queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q < limit).then_some(q + 1)
            })
            .map_err(SubmitError::QueueFull)?;
        let (req, rx) = GenerateRequest::new(prompt, params, arrival);
        let id = self.next_request_id.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(Command::Add(id, req)).is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Unavailable);
        }
        Ok((id, rx))
    }

    /// Ends one choice (stop string seen by the API) or the whole request.
    pub fn abort(&self, request_id: u64, index: Option<usize>) {
        let _ = self.tx.send(Command::Abort(request_id, index));
    }

    /// Ends every in-flight request (shutdown deadline passed).
    pub fn abort_all(&self) {
        let _ = self.tx.send(Command::AbortAll);
    }

    /// Ends every in-flight request and stops the scheduler thread, which drops the engine
    /// (for a group: tells the other ranks to shut down).
    pub fn stop(&self) {
        let _ = self.tx.send(Command::Stop);
    }
}

/// The KV pool rules of DESIGN.md, checked before anything is queued.
pub fn check_request(
    limits: &Limits,
    prompt: &[u32],
    params: &SamplingParams,
) -> Result<(), SubmitError> {
    if prompt.is_empty() {
        return Err(SubmitError::Invalid("the prompt is empty".into()));
    }
    if let Some(t) = prompt.iter().find(|t| **t as usize >= limits.vocab_size) {
        return Err(SubmitError::Invalid(format!(
            "token id {t} is out of vocabulary (size {})",
            limits.vocab_size
        )));
    }
    if params.max_tokens == 0 {
        return Err(SubmitError::Invalid("max_tokens must be at least 1".into()));
    }
    let total = prompt.len() + params.max_tokens;
    if total > limits.max_model_len {
        return Err(SubmitError::Invalid(format!(
            "This model's maximum context length is {} tokens. However, you requested {} tokens \
             ({} in the messages, {} in the completion). Please reduce the length of the messages \
             or completion.",
            limits.max_model_len,
            total,
            prompt.len(),
            params.max_tokens
        )));
    }
    // The last prompt token plus the first output need a slot: the whole pool must hold them.
    if prompt.len() + 1 > limits.pool_tokens {
        return Err(SubmitError::Invalid(format!(
            "the prompt ({} tokens) can never fit the KV pool ({} tokens)",
            prompt.len(),
            limits.pool_tokens
        )));
    }
    if params.n == 0 || params.n > limits.max_num_seqs {
        return Err(SubmitError::Invalid(format!(
            "n must be between 1 and {} (--max-num-seqs), got {}",
            limits.max_num_seqs, params.n
        )));
    }
    Ok(())
}

fn run(mut scheduler: Scheduler, rx: mpsc::Receiver<Command>) -> Result<(), EngineError> {
    let mut idle_wait = Duration::from_millis(1);
    loop {
        let cmd = if scheduler.has_work() {
            match rx.try_recv() {
                Ok(c) => Some(c),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
            }
        } else {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return Ok(()),
            }
        };
        if let Some(c) = cmd {
            if !apply(&mut scheduler, c) {
                return Ok(());
            }
            // Take everything already queued before planning, so one step sees all of it.
            while let Ok(c) = rx.try_recv() {
                if !apply(&mut scheduler, c) {
                    return Ok(());
                }
            }
        }
        if !scheduler.has_work() {
            continue;
        }
        match scheduler.step() {
            Ok(report) if report.scheduled == 0 => {
                // Nothing could run (all waiting on cancellation or space): don't spin.
                match rx.recv_timeout(idle_wait) {
                    Ok(c) => {
                        if !apply(&mut scheduler, c) {
                            return Ok(());
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                }
                idle_wait = (idle_wait * 2).min(Duration::from_millis(50));
            }
            Ok(_) => idle_wait = Duration::from_millis(1),
            Err(EngineError::Invalid(msg)) => {
                // That batch failed and was ended; the engine itself is still usable.
                tracing::error!("engine step rejected: {msg}");
            }
            Err(e) => {
                tracing::error!("engine failed, ending every request: {e}");
                scheduler.fail_all(&format!("engine failed: {e}"));
                return Err(e);
            }
        }
    }
}

/// Applies one command; `false` means stop the thread.
fn apply(scheduler: &mut Scheduler, cmd: Command) -> bool {
    match cmd {
        Command::Add(id, req) => scheduler.add(id, req),
        Command::Abort(id, index) => scheduler.abort(id, index),
        Command::AbortAll => scheduler.abort_all(),
        Command::Stop => {
            scheduler.abort_all();
            return false;
        }
    }
    true
}
