//! Continuous batching (rank 0 only): decides each step's batch over the shared KV pool.
//!
//! Every step: running decodes first (one token each, oldest first), then prefill chunks of
//! running sequences, then new sequences from the waiting queue, all within the
//! `max_num_batched_tokens` budget and `max_num_seqs`. Blocks are taken on demand; when a
//! running sequence cannot get one, the newest running sequence not yet in this step is
//! preempted: its blocks are freed, it goes to the FRONT of the waiting queue and is later
//! recomputed (prompt + what it generated so far) through the prefix cache. Its stream just pauses.
//!
//! The scheduler is synchronous and owns the [`ModelRunner`]; [`handle`] runs it on a dedicated OS
//! thread and connects it to the async API over channels.

#[cfg(any(test, feature = "fake-engine"))]
pub mod fake_runner;
pub mod handle;
pub mod request;
pub mod sampler;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc::UnboundedSender;

use crate::engine::draft::{self, RequestRng, SpecDecodeStats};
use crate::engine::{
    DraftPlan, EngineError, LogitsWanted, ModelRunner, SeqPlan, StepOutput, StepPlan,
};
use crate::kv::{BlockTable, KvPool};
use crate::metrics::{FinishedReason, Metrics};

pub use handle::{SchedulerHandle, SubmitError};
pub use request::{Finish, FinishReason, GenerateRequest, SamplingParams, SeqEvent, TokenLogprobs};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Per-request ceiling on prompt + output tokens.
    pub max_model_len: usize,
    pub max_waiting_requests: usize,
    pub prefix_caching: bool,
    /// End-of-sequence token id.
    pub eos: u32,
}

/// One choice of one request: its tokens, where its KV lives, its sampler state.
#[derive(Debug)]
struct Sequence {
    seq_id: u64,
    request_id: u64,
    index: usize,
    /// Prompt followed by every token generated so far.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Leading tokens whose KV is in the pool.
    num_computed: usize,
    table: BlockTable,
    rng: ChaCha8Rng,
    params: Arc<SamplingParams>,
    events: UnboundedSender<SeqEvent>,
    last_token_at: Option<Instant>,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// Per-request bookkeeping shared by its `n` sequences.
#[derive(Debug)]
struct RequestState {
    arrival: Instant,
    remaining: usize,
    /// Not yet admitted at all: counts against `max_waiting_requests`.
    queued: bool,
    first_token_seen: bool,
    reason: FinishedReason,
}

/// What one call to [`Scheduler::step`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StepReport {
    /// Sequences in the step's plan.
    pub scheduled: usize,
    /// Tokens in the step's plan.
    pub tokens: usize,
    pub preempted: usize,
}

pub struct Scheduler {
    runner: Box<dyn ModelRunner>,
    pool: KvPool,
    cfg: SchedulerConfig,
    metrics: Arc<Metrics>,
    waiting: VecDeque<Sequence>,
    /// Admission order, oldest first: the last one is the next preemption victim.
    running: Vec<Sequence>,
    requests: HashMap<u64, RequestState>,
    next_seq_id: u64,
    /// Requests submitted but never admitted (shared with the handle for the 429 decision).
    queued: Arc<AtomicUsize>,
    /// Sequences running after the last step (the handle lets that many fewer than
    /// `max_num_seqs` queue on top of `max_waiting_requests`: they start at the next step).
    running_seqs: Arc<AtomicUsize>,
    /// Drafts per decode step (0: no speculation); the runner must draft (`SeqPlan::draft`).
    spec_tokens: usize,
    spec_stats: SpecDecodeStats,
    /// Verifications and time at the last acceptance log line.
    spec_logged: (u64, Instant),
}

/// One sequence's share of a step: `(index in running, tokens to compute, drafts asked)`.
#[derive(Debug, Clone, Copy)]
struct Scheduled {
    index: usize,
    chunk: usize,
    drafts: usize,
}

/// Verification steps between two log lines of the mean acceptance length...
const SPEC_LOG_EVERY: u64 = 256;
/// ...or this much time, when fewer verifications ran (a single stream, light traffic).
const SPEC_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

impl Scheduler {
    pub fn new(runner: Box<dyn ModelRunner>, cfg: SchedulerConfig, metrics: Arc<Metrics>) -> Self {
        let layout = runner.kv_layout();
        let pool = KvPool::new(layout, cfg.prefix_caching);
        metrics.kv_pool_tokens.set(pool.pool_tokens() as f64);
        metrics.kv_recent_blocks.set(pool.num_recent() as f64);
        // Set once: a rebuilt scheduler (tests) sees the same pool.
        let _ = metrics
            .cache_blocks
            .set((pool.block_size(), pool.num_blocks()));
        metrics
            .max_full_length_concurrency
            .set((pool.num_blocks() / pool.blocks_for(cfg.max_model_len).max(1)) as f64);
        Scheduler {
            runner,
            pool,
            cfg,
            metrics,
            waiting: VecDeque::new(),
            running: Vec::new(),
            requests: HashMap::new(),
            next_seq_id: 0,
            queued: Arc::default(),
            running_seqs: Arc::default(),
            spec_tokens: 0,
            spec_stats: SpecDecodeStats::default(),
            spec_logged: (0, Instant::now()),
        }
    }

    /// Turns on speculative decoding with up to `k` drafts per decode step (the runner must
    /// honour [`SeqPlan::draft`], e.g. `engine::speculative::SpeculativeRunner`).
    pub fn with_speculation(mut self, k: usize) -> Self {
        self.spec_tokens = k;
        if k > 0 {
            self.metrics
                .spec_decode_enabled
                .store(true, Ordering::Relaxed);
        }
        self
    }

    /// Drafting counters since start (tokens per target step: `mean_acceptance_length`).
    pub fn spec_stats(&self) -> &SpecDecodeStats {
        &self.spec_stats
    }

    /// Drafts worth asking for `s` this step: none when its sampling rules are ones the
    /// acceptance rule does not model (logit bias, min_tokens masking), and never more than it
    /// may still emit or its positions allow.
    fn drafts_for(&self, s: &Sequence, budget: usize) -> usize {
        let p = &s.params;
        if self.spec_tokens == 0 || !p.logit_bias.is_empty() || s.generated() < p.min_tokens {
            return 0;
        }
        let may_emit = p.max_tokens.saturating_sub(s.generated());
        let positions_left = self.cfg.max_model_len.saturating_sub(s.tokens.len());
        self.spec_tokens
            .min(may_emit.saturating_sub(1))
            .min(positions_left)
            .min(budget.saturating_sub(1))
    }

    pub fn pool(&self) -> &KvPool {
        &self.pool
    }
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    pub fn metrics_handle(&self) -> &Arc<Metrics> {
        &self.metrics
    }
    pub fn vocab_size(&self) -> usize {
        self.runner.vocab_size()
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }
    pub(crate) fn queued_counter(&self) -> Arc<AtomicUsize> {
        self.queued.clone()
    }

    pub(crate) fn running_counter(&self) -> Arc<AtomicUsize> {
        self.running_seqs.clone()
    }

    /// Tokens held in blocks of running sequences, a shared (prefix) block counted once.
    pub fn live_tokens(&self) -> usize {
        let bs = self.pool.block_size();
        let mut shared = HashSet::new();
        let mut live = 0;
        for s in &self.running {
            for (j, &b) in s.table.blocks().iter().enumerate() {
                let held = s.num_computed.saturating_sub(j * bs).min(bs);
                if self.pool.ref_count(b) > 1 {
                    if shared.insert(b) {
                        live += held;
                    }
                } else {
                    live += held;
                }
            }
        }
        live
    }

    /// Queues a request (already validated by the handle). Its `n` sequences wait for a slot.
    pub fn add(&mut self, request_id: u64, req: GenerateRequest) {
        let params = Arc::new(req.params);
        let n = params.n.max(1);
        for index in 0..n {
            let rng = match params.seed {
                Some(seed) => ChaCha8Rng::seed_from_u64(seed.wrapping_add(index as u64)),
                None => ChaCha8Rng::seed_from_u64(rand::random()),
            };
            self.waiting.push_back(Sequence {
                seq_id: self.next_seq_id,
                request_id,
                index,
                tokens: req.prompt.clone(),
                prompt_len: req.prompt.len(),
                num_computed: 0,
                table: BlockTable::default(),
                rng,
                params: params.clone(),
                events: req.events.clone(),
                last_token_at: None,
            });
            self.next_seq_id += 1;
        }
        self.requests.insert(
            request_id,
            RequestState {
                arrival: req.arrival,
                remaining: n,
                queued: true,
                first_token_seen: false,
                reason: FinishedReason::Stop,
            },
        );
        self.update_gauges();
    }

    /// Ends choice `index` of a request (all choices when `None`), freeing its blocks.
    pub fn abort(&mut self, request_id: u64, index: Option<usize>) {
        let hit = |s: &Sequence| s.request_id == request_id && index.is_none_or(|i| s.index == i);
        self.remove_where(hit, FinishedReason::Abort, |s| {
            let _ = s.events.send(SeqEvent::Finished {
                index: s.index,
                reason: FinishReason::Abort,
            });
        });
        self.update_gauges();
    }

    /// Ends every request with an abort (shutdown deadline).
    pub fn abort_all(&mut self) {
        self.remove_where(
            |_| true,
            FinishedReason::Abort,
            |s| {
                let _ = s.events.send(SeqEvent::Finished {
                    index: s.index,
                    reason: FinishReason::Abort,
                });
            },
        );
        self.update_gauges();
    }

    /// Ends every request with an error (the engine is gone).
    pub fn fail_all(&mut self, message: &str) {
        self.remove_where(
            |_| true,
            FinishedReason::Abort,
            |s| {
                let _ = s.events.send(SeqEvent::Failed(message.to_string()));
            },
        );
        self.update_gauges();
    }

    /// One scheduling decision and one engine step.
    pub fn step(&mut self) -> Result<StepReport, EngineError> {
        let report = self.plan_and_run();
        self.running_seqs
            .store(self.running.len(), Ordering::SeqCst);
        report
    }

    fn plan_and_run(&mut self) -> Result<StepReport, EngineError> {
        // A dropped receiver means the client is gone: free its blocks before planning.
        self.remove_where(|s| s.events.is_closed(), FinishedReason::Abort, |_| {});
        let mut report = StepReport::default();
        let scheduled = self.schedule(&mut report);
        // Published before any token of this step reaches a client.
        self.running_seqs
            .store(self.running.len(), Ordering::SeqCst);
        if scheduled.is_empty() {
            self.update_gauges();
            return Ok(report);
        }
        // Per scheduled sequence: the seed of its acceptance draws when it drafts.
        let mut accept_seeds = Vec::with_capacity(scheduled.len());
        let plan = StepPlan {
            seqs: scheduled
                .iter()
                .map(|sc| {
                    let s = &mut self.running[sc.index];
                    let wanted = if sc.drafts > 0 {
                        LogitsWanted::All
                    } else if s.num_computed + sc.chunk == s.tokens.len() {
                        LogitsWanted::Last
                    } else {
                        LogitsWanted::None
                    };
                    // Both seeds come from the request's stream: a seeded request reproduces.
                    let draft = (sc.drafts > 0).then(|| DraftPlan {
                        num_drafts: sc.drafts,
                        seed: s.rng.random(),
                        temperature: s.params.temperature,
                        top_p: s.params.top_p,
                        top_k: s.params.top_k,
                    });
                    accept_seeds.push(draft.map(|_| s.rng.random::<u64>()));
                    SeqPlan {
                        seq_id: s.seq_id,
                        start_pos: s.num_computed,
                        tokens: s.tokens[s.num_computed..s.num_computed + sc.chunk].to_vec(),
                        block_table: s.table.blocks().to_vec(),
                        recent_table: s.table.recent().to_vec(),
                        logits: wanted,
                        draft,
                    }
                })
                .collect(),
        };
        report.scheduled = plan.seqs.len();
        report.tokens = plan.seqs.iter().map(|s| s.tokens.len()).sum::<usize>()
            + scheduled.iter().map(|sc| sc.drafts).sum::<usize>();
        let output = self
            .runner
            .step(&plan)
            .and_then(|o| check_output(&plan, o, self.runner.vocab_size()));
        let output = match output {
            Ok(o) => o,
            Err(e) => {
                let ids: HashSet<u64> = plan.seqs.iter().map(|s| s.seq_id).collect();
                let msg = format!("engine step failed: {e}");
                self.remove_where(
                    |s| ids.contains(&s.seq_id),
                    FinishedReason::Abort,
                    |s| {
                        let _ = s.events.send(SeqEvent::Failed(msg.clone()));
                    },
                );
                self.update_gauges();
                return Err(e);
            }
        };
        let now = Instant::now();
        let mut finished = Vec::new();
        let mut drafts = output.drafts;
        drafts.resize(plan.seqs.len(), None);
        for ((((sc, sp), rows), proposed), seed) in scheduled
            .iter()
            .zip(&plan.seqs)
            .zip(output.logits)
            .zip(drafts)
            .zip(accept_seeds)
        {
            let i = sc.index;
            if let (Some(seed), Some(proposed)) = (seed, proposed) {
                match self.verify_drafts(i, &proposed, &rows, seed) {
                    Ok(tokens) => {
                        // The anchor and the accepted drafts are now in the KV state; rows
                        // past them are rewritten by the next step.
                        self.running[i].num_computed += tokens.len();
                        for (j, token) in tokens.into_iter().enumerate() {
                            let logprobs = self.running[i]
                                .params
                                .logprobs
                                .map(|k| sampler::logprobs_of(&rows[j], token, k));
                            if let Some(f) = self.emit(i, token, logprobs, now) {
                                finished.push(f);
                                break;
                            }
                        }
                        let s = &mut self.running[i];
                        s.num_computed = s.num_computed.min(s.tokens.len().saturating_sub(1));
                        self.pool
                            .commit_full_blocks(&mut s.table, &s.tokens, s.num_computed);
                        self.pool.release_recent(&mut s.table, s.num_computed);
                    }
                    Err(msg) => {
                        let s = &self.running[i];
                        tracing::error!(seq_id = s.seq_id, "{msg}");
                        let _ = s.events.send(SeqEvent::Failed(msg));
                        finished.push((s.seq_id, FinishedReason::Abort));
                    }
                }
                continue;
            }
            let s = &mut self.running[i];
            s.num_computed += sc.chunk;
            self.pool
                .commit_full_blocks(&mut s.table, &s.tokens, s.num_computed);
            self.pool.release_recent(&mut s.table, s.num_computed);
            if sp.logits != LogitsWanted::Last {
                continue;
            }
            let Some(row) = rows.last() else {
                continue; // checked by check_output
            };
            let (token, logprobs) =
                sampler::sample(row, &s.params, s.generated(), self.cfg.eos, &mut s.rng);
            if let Some(f) = self.emit(i, token, logprobs, now) {
                finished.push(f);
            }
        }
        for (id, reason) in finished {
            self.remove_where(|s| s.seq_id == id, reason, |_| {});
        }
        self.update_gauges();
        Ok(report)
    }

    /// Verifies the drafts of `running[i]` against the target rows of `[anchor, drafts]` and
    /// records the acceptance; returns the tokens to emit (accepted drafts + the target's own).
    fn verify_drafts(
        &mut self,
        i: usize,
        proposed: &draft::Drafts,
        rows: &[Vec<f32>],
        seed: u64,
    ) -> Result<Vec<u32>, String> {
        let s = &self.running[i];
        let params = draft::SamplingParams {
            temperature: s.params.temperature,
            top_p: s.params.top_p,
            top_k: s.params.top_k,
        };
        let mut rng = RequestRng::seeded(seed);
        let verdict = draft::verify(
            &proposed.tokens,
            proposed.q.as_deref(),
            rows,
            &params,
            &mut rng,
        )
        .map_err(|e| format!("speculative verification failed: {e}"))?;
        let k = proposed.tokens.len();
        if k > 0 {
            self.spec_stats.record(k, verdict.num_accepted);
            self.metrics.record_spec_decode(k, verdict.num_accepted);
            let (last, at) = self.spec_logged;
            let n = self.spec_stats.num_drafts;
            if n - last >= SPEC_LOG_EVERY || at.elapsed() >= SPEC_LOG_INTERVAL {
                self.log_acceptance();
            }
        }
        Ok(verdict.tokens)
    }

    /// The mean acceptance length so far, in the log.
    fn log_acceptance(&mut self) {
        tracing::info!(
            mean_acceptance_length = self.spec_stats.mean_acceptance_length(),
            acceptance_rate = self.spec_stats.acceptance_rate(),
            verifications = self.spec_stats.num_drafts,
            "speculative decoding"
        );
        self.spec_logged = (self.spec_stats.num_drafts, Instant::now());
    }

    /// Appends `token` to `running[i]` and streams it; returns the sequence's finish, if any.
    fn emit(
        &mut self,
        i: usize,
        token: u32,
        logprobs: Option<TokenLogprobs>,
        now: Instant,
    ) -> Option<(u64, FinishedReason)> {
        let s = &mut self.running[i];
        s.tokens.push(token);
        self.metrics.generation_tokens.add(1);
        let generated = s.generated();
        let by_stop_token = s.params.stop_token_ids.contains(&token)
            || (!s.params.ignore_eos && token == self.cfg.eos);
        let finish = if by_stop_token {
            Some(FinishReason::Stop)
        } else if generated >= s.params.max_tokens || s.tokens.len() >= self.cfg.max_model_len {
            Some(FinishReason::Length)
        } else {
            None
        };
        if let Some(prev) = s.last_token_at {
            self.metrics
                .inter_token_latency
                .observe(now.duration_since(prev).as_secs_f64());
        }
        s.last_token_at = Some(now);
        if let Some(r) = self.requests.get_mut(&s.request_id) {
            if !r.first_token_seen {
                r.first_token_seen = true;
                self.metrics
                    .time_to_first_token
                    .observe(now.duration_since(r.arrival).as_secs_f64());
            }
        }
        let _ = s.events.send(SeqEvent::Token {
            index: s.index,
            token,
            logprobs,
            finish: finish.map(|reason| Finish {
                reason,
                by_stop_token,
            }),
        });
        match finish {
            Some(FinishReason::Length) => Some((s.seq_id, FinishedReason::Length)),
            Some(_) => Some((s.seq_id, FinishedReason::Stop)),
            None => None,
        }
    }

    /// Picks this step's work: `(index in running, tokens to compute)`, in plan order.
    fn schedule(&mut self, report: &mut StepReport) -> Vec<Scheduled> {
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut chosen: Vec<(u64, usize, usize)> = Vec::new();
        let mut in_plan: HashSet<u64> = HashSet::new();
        for decodes in [true, false] {
            let mut i = 0;
            while i < self.running.len() && budget > 0 {
                let s = &self.running[i];
                let num_new = s.tokens.len() - s.num_computed;
                if (num_new == 1) != decodes || in_plan.contains(&s.seq_id) {
                    i += 1;
                    continue;
                }
                let chunk = num_new.min(budget);
                let drafts = if decodes {
                    self.drafts_for(s, budget)
                } else {
                    0
                };
                let want = s.num_computed + chunk;
                loop {
                    // The drafts' positions first; a full pool drops the drafts before it
                    // preempts anyone for them.
                    let table = &mut self.running[i].table;
                    let drafts = if drafts > 0 && self.pool.allocate(table, want + drafts).is_ok() {
                        Some(drafts)
                    } else if self.pool.allocate(table, want).is_ok() {
                        Some(0)
                    } else {
                        None
                    };
                    if let Some(drafts) = drafts {
                        let id = self.running[i].seq_id;
                        chosen.push((id, chunk, drafts));
                        in_plan.insert(id);
                        budget -= chunk + drafts;
                        i += 1;
                        break;
                    }
                    // The newest sequence not in this plan; `i` itself qualifies, so one exists
                    // and it is at `i` or later (everything in the plan is older than `i`'s
                    // position or was skipped, never preempted).
                    let victim = (i..self.running.len())
                        .rev()
                        .find(|&j| !in_plan.contains(&self.running[j].seq_id))
                        .unwrap_or(i);
                    self.preempt(victim);
                    report.preempted += 1;
                    if victim == i {
                        break;
                    }
                }
            }
        }
        // New (or preempted, which sit at the front) sequences, in order, while they fit.
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(s) = self.waiting.front() else { break };
            let hit = if s.table.is_empty() {
                self.pool.match_prefix(&s.tokens)
            } else {
                Default::default()
            };
            let cached = hit.num_tokens(self.pool.block_size());
            let chunk = (s.tokens.len() - cached).min(budget);
            if !self.pool.can_start(&hit, cached + chunk) {
                break;
            }
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            self.metrics.prefix_cache_queries.add(s.tokens.len() as u64);
            self.metrics.prefix_cache_hits.add(cached as u64);
            self.pool.take_prefix(&mut s.table, hit);
            if self.pool.allocate(&mut s.table, cached + chunk).is_err() {
                // Counted above, cannot happen; put it back rather than lose it.
                self.pool.free(&mut s.table);
                self.waiting.push_front(s);
                break;
            }
            s.num_computed = cached;
            if let Some(r) = self.requests.get_mut(&s.request_id) {
                if r.queued {
                    r.queued = false;
                    release_queue_slot(&self.queued);
                    self.metrics
                        .request_queue_time
                        .observe(r.arrival.elapsed().as_secs_f64());
                    self.metrics.prompt_tokens.add(s.prompt_len as u64);
                }
            }
            chosen.push((s.seq_id, chunk, 0));
            in_plan.insert(s.seq_id);
            budget -= chunk;
            self.running.push(s);
        }
        let pos: HashMap<u64, usize> = self
            .running
            .iter()
            .enumerate()
            .map(|(i, s)| (s.seq_id, i))
            .collect();
        chosen
            .into_iter()
            .filter_map(|(id, chunk, drafts)| {
                pos.get(&id).map(|&index| Scheduled {
                    index,
                    chunk,
                    drafts,
                })
            })
            .collect()
    }

    /// Frees `running[i]`'s blocks and puts it first in line to resume (by recompute).
    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.pool.free(&mut s.table);
        s.num_computed = 0;
        self.runner.release(s.seq_id);
        self.metrics.num_preemptions.add(1);
        tracing::debug!(seq_id = s.seq_id, "preempted: KV pool full, will recompute");
        self.waiting.push_front(s);
    }

    /// Removes every sequence matching `pred` from running and waiting, frees its blocks, and
    /// closes out its request when it was the last one.
    fn remove_where(
        &mut self,
        pred: impl Fn(&Sequence) -> bool,
        reason: FinishedReason,
        mut on_removed: impl FnMut(&Sequence),
    ) {
        let mut removed = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            if pred(&self.running[i]) {
                removed.push(self.running.remove(i));
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.waiting.len() {
            if pred(&self.waiting[i]) {
                if let Some(s) = self.waiting.remove(i) {
                    removed.push(s);
                }
            } else {
                i += 1;
            }
        }
        for mut s in removed {
            on_removed(&s);
            self.pool.free(&mut s.table);
            self.runner.release(s.seq_id);
            let Some(r) = self.requests.get_mut(&s.request_id) else {
                continue;
            };
            r.remaining = r.remaining.saturating_sub(1);
            // A request's outcome is its worst choice's: abort > length > stop.
            r.reason = match (r.reason, reason) {
                (FinishedReason::Abort, _) | (_, FinishedReason::Abort) => FinishedReason::Abort,
                (FinishedReason::Length, _) | (_, FinishedReason::Length) => FinishedReason::Length,
                _ => FinishedReason::Stop,
            };
            if r.remaining == 0 {
                if let Some(r) = self.requests.remove(&s.request_id) {
                    if r.queued {
                        release_queue_slot(&self.queued);
                    }
                    self.metrics
                        .e2e_request_latency
                        .observe(r.arrival.elapsed().as_secs_f64());
                    self.metrics.request_finished(r.reason);
                }
            }
        }
    }

    fn update_gauges(&self) {
        self.metrics
            .num_requests_running
            .set(self.running.len() as f64);
        self.metrics
            .num_requests_waiting
            .set(self.waiting.len() as f64);
        self.metrics.kv_cache_usage_perc.set(self.pool.usage());
        self.metrics.kv_live_tokens.set(self.live_tokens() as f64);
        self.metrics
            .kv_recent_blocks_used
            .set((self.pool.num_recent() - self.pool.free_recent()) as f64);
    }
}

/// One request left the waiting queue (never below zero: requests added directly through
/// [`Scheduler::add`], as tests do, never took a slot).
impl Drop for Scheduler {
    /// The final acceptance figure when the server stops.
    fn drop(&mut self) {
        if self.spec_stats.num_drafts > self.spec_logged.0 {
            self.log_acceptance();
        }
    }
}

fn release_queue_slot(queued: &AtomicUsize) {
    let _ = queued.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| q.checked_sub(1));
}

/// The engine's answer must have a full logits row wherever the plan asked for one.
fn check_output(plan: &StepPlan, out: StepOutput, vocab: usize) -> Result<StepOutput, EngineError> {
    if out.logits.len() != plan.seqs.len() {
        return Err(EngineError::Invalid(format!(
            "engine returned logits for {} sequences, the plan had {}",
            out.logits.len(),
            plan.seqs.len()
        )));
    }
    for (sp, rows) in plan.seqs.iter().zip(&out.logits) {
        if sp.logits != LogitsWanted::None && rows.last().is_none_or(|r| r.len() != vocab) {
            return Err(EngineError::Invalid(format!(
                "engine returned no logits row of {vocab} for sequence {}",
                sp.seq_id
            )));
        }
    }
    Ok(out)
}
