//! Benchmark cases: parsing `--cases`, and running one case through a [`ModelRunner`] (fill the
//! KV state untimed, then time the steps).

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::bytes::{self, KvEntryBytes, SeqShape, StepBytes, WeightBytes};
use super::BenchError;
use crate::engine::model::kv::first_recent_block;
use crate::engine::model::{ModelConfig, NO_RECENT};
use crate::engine::{KvLayout, LogitsWanted, ModelRunner, OpTime, SeqPlan, StepPlan};

/// What one case measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// `batch` sequences with `context` tokens of KV each, one new token per sequence per step.
    Decode { batch: usize, context: usize },
    /// One sequence's prompt of `prompt` tokens, in chunks of `--max-num-batched-tokens`.
    Prefill { prompt: usize },
    /// `batch` sequences at `context` each verifying an anchor and `k` drafts (`k + 1` rows of
    /// logits per sequence), the target's share of a DSpark step.
    Verify {
        batch: usize,
        context: usize,
        k: usize,
    },
}

/// 1M as a context: the largest block-aligned context that leaves room for the decode/verify
/// tokens below V4-Flash's `max_position_embeddings` (1,048,576).
pub const CONTEXT_1M: usize = 1_048_576 - 128;

/// The issue's list: decode at batch 1/6/16 x 8K/128K/1M, prefill of 8K/32K/100K prompts,
/// verify (K = 5) at batch 1/6/16 and 8K.
pub fn default_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for context in [8192, 131_072, CONTEXT_1M] {
        for batch in [1, 6, 16] {
            v.push(Case::Decode { batch, context });
        }
    }
    for prompt in [8192, 32_768, 100_000] {
        v.push(Case::Prefill { prompt });
    }
    for batch in [1, 6, 16] {
        v.push(Case::Verify {
            batch,
            context: 8192,
            k: 5,
        });
    }
    v
}

impl Case {
    pub fn kind(&self) -> &'static str {
        match self {
            Case::Decode { .. } => "decode",
            Case::Prefill { .. } => "prefill",
            Case::Verify { .. } => "verify",
        }
    }

    /// The `--cases` spelling.
    pub fn label(&self) -> String {
        match *self {
            Case::Decode { batch, context } => format!("decode:{batch}:{context}"),
            Case::Prefill { prompt } => format!("prefill:{prompt}"),
            Case::Verify { batch, context, k } => format!("verify:{batch}:{context}:{k}"),
        }
    }

    pub fn batch(&self) -> usize {
        match *self {
            Case::Decode { batch, .. } | Case::Verify { batch, .. } => batch,
            Case::Prefill { .. } => 1,
        }
    }

    /// Tokens already in the KV state of each sequence when the timed work starts.
    pub fn context(&self) -> usize {
        match *self {
            Case::Decode { context, .. } | Case::Verify { context, .. } => context,
            Case::Prefill { .. } => 0,
        }
    }

    /// Tokens each sequence runs in the timed unit.
    pub fn new_tokens(&self) -> usize {
        match *self {
            Case::Decode { .. } => 1,
            Case::Prefill { prompt } => prompt,
            Case::Verify { k, .. } => k + 1,
        }
    }

    /// Positions each sequence covers at the end: `context + new_tokens`.
    pub fn end_position(&self) -> usize {
        self.context() + self.new_tokens()
    }

    /// KV blocks the case holds at once (including a shared context's blocks).
    pub fn blocks_needed(&self, block_size: usize, shared_context: bool) -> usize {
        let per_seq = self.end_position().div_ceil(block_size);
        let b = self.batch();
        if shared_context && b > 1 {
            let shared = self.context() / block_size;
            shared + b * (per_seq - shared)
        } else {
            b * per_seq
        }
    }
}

/// Parses `--cases`: comma-separated `decode:B:C`, `prefill:P`, `verify:B:C:K`.
pub fn parse_cases(list: &str) -> Result<Vec<Case>, BenchError> {
    let cases = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse_case)
        .collect::<Result<Vec<_>, _>>()?;
    if cases.is_empty() {
        return Err(BenchError::Case(format!("--cases `{list}` names no case")));
    }
    Ok(cases)
}

fn parse_case(s: &str) -> Result<Case, BenchError> {
    let parts: Vec<&str> = s.split(':').collect();
    let err = |why: String| BenchError::Case(format!("case `{s}`: {why}"));
    let num = |what: &str, v: &str| -> Result<usize, BenchError> {
        let n = parse_count(v).ok_or_else(|| {
            err(format!(
                "{what} `{v}` is not a positive integer (suffixes k, m allowed)"
            ))
        })?;
        if n == 0 {
            return Err(err(format!("{what} must be at least 1")));
        }
        Ok(n)
    };
    match parts.as_slice() {
        ["decode", b, c] => Ok(Case::Decode {
            batch: num("batch", b)?,
            context: parse_count(c)
                .ok_or_else(|| err(format!("context `{c}` is not an integer")))?,
        }),
        ["decode", ..] => Err(err("expected decode:BATCH:CONTEXT".into())),
        ["prefill", p] => Ok(Case::Prefill {
            prompt: num("prompt length", p)?,
        }),
        ["prefill", ..] => Err(err("expected prefill:PROMPT_TOKENS".into())),
        ["verify", b, c, k] => Ok(Case::Verify {
            batch: num("batch", b)?,
            context: parse_count(c)
                .ok_or_else(|| err(format!("context `{c}` is not an integer")))?,
            k: num("K (drafts)", k)?,
        }),
        ["verify", ..] => Err(err("expected verify:BATCH:CONTEXT:K".into())),
        [kind, ..] => Err(err(format!(
            "unknown kind `{kind}` (expected decode, prefill or verify)"
        ))),
        [] => Err(err("empty".into())),
    }
}

/// `8192`, `8k` (x1024), `1m` (x1048576).
fn parse_count(v: &str) -> Option<usize> {
    let v = v.trim();
    let (digits, mult) = match v.char_indices().last()? {
        (i, 'k' | 'K') => (&v[..i], 1024),
        (i, 'm' | 'M') => (&v[..i], 1024 * 1024),
        _ => (v, 1),
    };
    digits.parse::<usize>().ok()?.checked_mul(mult)
}

/// Hands out pool block ids; a case returns its blocks when it ends.
#[derive(Debug)]
pub struct BlockAllocator {
    free: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        // Lowest ids first.
        Self {
            free: (0..num_blocks as u32).rev().collect(),
        }
    }

    pub fn available(&self) -> usize {
        self.free.len()
    }

    pub fn take(&mut self, n: usize) -> Result<Vec<u32>, BenchError> {
        if n > self.free.len() {
            return Err(BenchError::Case(format!(
                "needs {n} more KV blocks, the pool has {} free",
                self.free.len()
            )));
        }
        Ok(self.free.split_off(self.free.len() - n))
    }

    pub fn give_back(&mut self, blocks: Vec<u32>) {
        self.free.extend(blocks);
    }
}

/// Hands out recent block ids (docs/KV.md) as the scheduler would: a plan's recent table names
/// one for every block from `reach` positions before its first token through its last, and
/// earlier ones are given back. Ref-counted, because the sequences of a shared-context case read
/// the shared prefix's last recent blocks together.
#[derive(Debug)]
pub struct RecentAllocator {
    free: Vec<u32>,
    refs: Vec<u32>,
    block_size: usize,
    reach: usize,
}

impl RecentAllocator {
    pub fn new(layout: &KvLayout) -> Self {
        Self {
            free: (0..layout.recent_blocks as u32).rev().collect(),
            refs: vec![0; layout.recent_blocks],
            block_size: layout.block_size.max(1),
            reach: layout.recent_reach,
        }
    }

    /// Makes `recent` (one entry per block of a `blocks`-long table) name a recent block for
    /// every block a step over positions `start..end` reads or writes, releasing the rest.
    fn cover(
        &mut self,
        recent: &mut Vec<u32>,
        blocks: usize,
        start: usize,
        end: usize,
    ) -> Result<(), BenchError> {
        recent.resize(blocks, NO_RECENT);
        let first = first_recent_block(start, self.reach, self.block_size);
        let last = end.saturating_sub(1) / self.block_size;
        for (i, r) in recent.iter_mut().enumerate() {
            if (i < first || i > last) && *r != NO_RECENT {
                self.release(std::mem::replace(r, NO_RECENT));
            }
        }
        for r in recent.iter_mut().take(last + 1).skip(first) {
            if *r == NO_RECENT {
                let Some(id) = self.free.pop() else {
                    return Err(BenchError::Case(format!(
                        "needs more recent KV blocks than the pool's {}",
                        self.refs.len()
                    )));
                };
                self.refs[id as usize] = 1;
                *r = id;
            }
        }
        Ok(())
    }

    /// Another reader of the recent blocks in `recent`.
    fn share(&mut self, recent: &[u32]) -> Vec<u32> {
        for &r in recent.iter().filter(|&&r| r != NO_RECENT) {
            self.refs[r as usize] += 1;
        }
        recent.to_vec()
    }

    fn release(&mut self, r: u32) {
        let c = &mut self.refs[r as usize];
        *c = c.saturating_sub(1);
        if *c == 0 {
            self.free.push(r);
        }
    }

    fn give_back(&mut self, recent: Vec<u32>) {
        for r in recent.into_iter().filter(|&r| r != NO_RECENT) {
            self.release(r);
        }
    }
}

/// What the cases of a run share: the pool's block ids, its recent block ids, sequence ids.
#[derive(Debug)]
pub struct CaseResources {
    pub blocks: BlockAllocator,
    pub recent: RecentAllocator,
    pub next_seq_id: u64,
}

impl CaseResources {
    pub fn new(layout: &KvLayout) -> Self {
        Self {
            blocks: BlockAllocator::new(layout.num_blocks),
            recent: RecentAllocator::new(layout),
            next_seq_id: 1,
        }
    }
}

/// Run-wide settings of the cases.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub iters: usize,
    pub warmup: usize,
    pub chunk: usize,
    pub shared_context: bool,
    pub seed: u64,
    /// Contexts as random pool contents instead of a prefill (`--kv-fill random`).
    pub random_fill: bool,
}

/// What running one case measured.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Tokens run in one timed unit (a step; for prefill the whole prompt).
    pub tokens: usize,
    /// Engine steps in one timed unit (1, or the prefill's chunks).
    pub steps: usize,
    /// Wall time of each timed unit.
    pub times: Vec<Duration>,
    /// Modelled bytes of one unit, at the depth run.
    pub bytes: StepBytes,
    /// The same at the config's full depth (equal to `bytes` when all layers run).
    pub full_depth_bytes: StepBytes,
    /// Untimed KV fill before the timed steps.
    pub setup: Duration,
    pub setup_tokens: usize,
}

impl Measured {
    pub fn mean_s(&self) -> f64 {
        let n = self.times.len().max(1) as f64;
        self.times.iter().map(Duration::as_secs_f64).sum::<f64>() / n
    }
    pub fn min_s(&self) -> f64 {
        self.times
            .iter()
            .map(Duration::as_secs_f64)
            .fold(f64::INFINITY, f64::min)
    }
}

/// The byte model's inputs for the run, at the depth run and at the full depth.
pub struct BytesModel<'a> {
    pub cfg: &'a ModelConfig,
    pub weights: WeightBytes,
    pub full_cfg: &'a ModelConfig,
    pub full_weights: WeightBytes,
    pub kv: KvEntryBytes,
}

impl BytesModel<'_> {
    /// `(run depth, full depth)` bytes of one step.
    fn step(&self, seqs: &[SeqShape], wants_logits: bool) -> (StepBytes, StepBytes) {
        (
            bytes::step_bytes(self.cfg, &self.weights, self.kv, seqs, wants_logits),
            bytes::step_bytes(
                self.full_cfg,
                &self.full_weights,
                self.kv,
                seqs,
                wants_logits,
            ),
        )
    }
}

/// One sequence of a case: its id, block table and recent table.
struct BenchSeq {
    id: u64,
    table: Vec<u32>,
    recent: Vec<u32>,
}

/// Runs `case` on `runner`: fills the KV state (untimed), warms up, times `iters` units, and
/// releases its sequences and blocks whatever happens.
pub fn run_case(
    runner: &mut dyn ModelRunner,
    res: &mut CaseResources,
    case: Case,
    settings: &RunSettings,
    model: &BytesModel<'_>,
) -> Result<Measured, BenchError> {
    let CaseResources {
        blocks: alloc,
        recent: recent_alloc,
        next_seq_id,
    } = res;
    let bs = runner.kv_layout().block_size;
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed ^ (*next_seq_id << 20));
    let vocab = runner.vocab_size() as u32;
    let mut owned: Vec<Vec<u32>> = Vec::new();
    let mut owned_recent: Vec<Vec<u32>> = Vec::new();
    let mut ids: Vec<u64> = Vec::new();
    let result = (|| {
        let mut new_id = || {
            let id = *next_seq_id;
            *next_seq_id += 1;
            ids.push(id);
            id
        };
        match case {
            Case::Prefill { prompt } => {
                let blocks = alloc.take(prompt.div_ceil(bs))?;
                owned.push(blocks.clone());
                let mut seq = BenchSeq {
                    id: new_id(),
                    table: blocks,
                    recent: Vec::new(),
                };
                let tokens: Vec<u32> = (0..prompt).map(|_| rng.random_range(0..vocab)).collect();
                let measured =
                    time_prefill(runner, &mut seq, recent_alloc, &tokens, settings, model);
                owned_recent.push(std::mem::take(&mut seq.recent));
                measured
            }
            Case::Decode { batch, context } | Case::Verify { batch, context, .. } => {
                let q = case.new_tokens();
                let end_blocks = (context + q).div_ceil(bs);
                let context_tokens: Vec<u32> =
                    (0..context).map(|_| rng.random_range(0..vocab)).collect();
                let started = Instant::now();
                let mut fills: Vec<Fill> = Vec::new();
                let mut seqs = Vec::with_capacity(batch);
                // Blocks holding only context positions may be shared between the sequences.
                let (shared, shared_recent) = if settings.shared_context && batch > 1 {
                    let n = context / bs;
                    let blocks = alloc.take(n)?;
                    owned.push(blocks.clone());
                    if n > 0 {
                        fills.push(Fill {
                            seq: new_id(),
                            table: blocks.clone(),
                            recent: Vec::new(),
                            start: 0,
                            tokens: context_tokens[..n * bs].to_vec(),
                        });
                    }
                    // The shared prefix is filled before any sequence reads it.
                    let filled = fill(runner, recent_alloc, &mut fills, settings);
                    let recent = fills.pop().map(|f| f.recent).unwrap_or_default();
                    owned_recent.push(recent.clone());
                    filled?;
                    (blocks, recent)
                } else {
                    (Vec::new(), Vec::new())
                };
                let setup_tokens_shared = shared.len() * bs;
                for _ in 0..batch {
                    let own = alloc.take(end_blocks - shared.len())?;
                    owned.push(own.clone());
                    let mut table = shared.clone();
                    table.extend(own);
                    let id = new_id();
                    let start = shared.len() * bs;
                    // Each sequence reads the tail of the shared prefix's recent blocks.
                    let recent = recent_alloc.share(&shared_recent);
                    if start < context {
                        fills.push(Fill {
                            seq: id,
                            table: table.clone(),
                            recent,
                            start,
                            tokens: context_tokens[start..].to_vec(),
                        });
                        seqs.push(BenchSeq {
                            id,
                            table,
                            recent: Vec::new(),
                        });
                    } else {
                        seqs.push(BenchSeq { id, table, recent });
                    }
                }
                let filled = fill(runner, recent_alloc, &mut fills, settings);
                if filled.is_err() {
                    owned_recent.extend(fills.drain(..).map(|f| f.recent));
                    owned_recent.extend(seqs.iter_mut().map(|s| std::mem::take(&mut s.recent)));
                }
                let setup_tokens = setup_tokens_shared + filled?;
                // Each sequence continues with the recent blocks its fill ended with.
                for f in fills.drain(..) {
                    if let Some(s) = seqs.iter_mut().find(|s| s.id == f.seq) {
                        s.recent = f.recent;
                    }
                }
                for s in &mut seqs {
                    let blocks = s.table.len();
                    let held = recent_alloc.cover(&mut s.recent, blocks, context, context + q);
                    owned_recent.push(s.recent.clone());
                    held?;
                }
                let setup = started.elapsed();
                let wanted = if q == 1 {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::All
                };
                let plan = StepPlan {
                    seqs: seqs
                        .iter()
                        .map(|s| SeqPlan {
                            seq_id: s.id,
                            start_pos: context,
                            tokens: (0..q).map(|_| rng.random_range(0..vocab)).collect(),
                            block_table: s.table.clone(),
                            recent_table: s.recent.clone(),
                            logits: wanted,
                            draft: None,
                        })
                        .collect(),
                };
                let shapes = vec![
                    SeqShape {
                        start: context as u64,
                        tokens: q as u64,
                    };
                    batch
                ];
                // Each repetition rewrites the same positions (as after rejected drafts), so
                // the context stays exactly `context`.
                let times = time_steps(runner, &plan, settings)?;
                let (bytes, full_depth_bytes) = model.step(&shapes, true);
                Ok(Measured {
                    tokens: batch * q,
                    steps: 1,
                    times,
                    bytes,
                    full_depth_bytes,
                    setup,
                    setup_tokens,
                })
            }
        }
    })();
    for id in ids {
        runner.release(id);
    }
    for blocks in owned {
        alloc.give_back(blocks);
    }
    for recent in owned_recent {
        recent_alloc.give_back(recent);
    }
    result
}

/// A stretch of one sequence's tokens to run untimed, and the recent blocks it holds.
struct Fill {
    seq: u64,
    table: Vec<u32>,
    recent: Vec<u32>,
    start: usize,
    tokens: Vec<u32>,
}

/// Runs the fills packed into steps of at most `settings.chunk` tokens, no logits (or, with
/// `random_fill`, writes random KV into their blocks and the recent blocks of their ends when
/// the runner can). Each fill's `recent` ends as a sequence at its end holds it (the caller
/// gives the ids back). Returns the tokens.
fn fill(
    runner: &mut dyn ModelRunner,
    recent_alloc: &mut RecentAllocator,
    fills: &mut [Fill],
    settings: &RunSettings,
) -> Result<usize, BenchError> {
    let total: usize = fills.iter().map(|f| f.tokens.len()).sum();
    if settings.random_fill {
        let bs = runner.kv_layout().block_size;
        let mut blocks = Vec::new();
        let mut recent = Vec::new();
        for f in fills.iter_mut().filter(|f| !f.tokens.is_empty()) {
            let end = f.start + f.tokens.len();
            blocks.extend_from_slice(&f.table[f.start / bs..end.div_ceil(bs)]);
            // As a sequence that ran to `end` holds them: the blocks of its last positions.
            let fresh: Vec<u32> = f.recent.clone();
            recent_alloc.cover(&mut f.recent, f.table.len(), end, end)?;
            recent.extend(
                f.recent
                    .iter()
                    .filter(|&&r| r != NO_RECENT && !fresh.contains(&r))
                    .copied(),
            );
        }
        if runner
            .fill_blocks_random(&blocks, &recent, settings.seed)
            .map_err(BenchError::Engine)?
        {
            return Ok(total);
        }
    }
    let chunk = settings.chunk;
    let mut done = vec![0usize; fills.len()];
    let mut ran = 0;
    while ran < total {
        let mut budget = chunk;
        let mut plan = StepPlan::default();
        for (f, d) in fills.iter_mut().zip(done.iter_mut()) {
            if budget == 0 {
                break;
            }
            let n = (f.tokens.len() - *d).min(budget);
            if n == 0 {
                continue;
            }
            let start = f.start + *d;
            recent_alloc.cover(&mut f.recent, f.table.len(), start, start + n)?;
            plan.seqs.push(SeqPlan {
                seq_id: f.seq,
                start_pos: start,
                tokens: f.tokens[*d..*d + n].to_vec(),
                block_table: f.table.clone(),
                recent_table: f.recent.clone(),
                logits: LogitsWanted::None,
                draft: None,
            });
            *d += n;
            budget -= n;
            ran += n;
        }
        runner.step(&plan).map_err(BenchError::Engine)?;
    }
    Ok(total)
}

fn time_steps(
    runner: &mut dyn ModelRunner,
    plan: &StepPlan,
    settings: &RunSettings,
) -> Result<Vec<Duration>, BenchError> {
    for _ in 0..settings.warmup {
        runner.step(plan).map_err(BenchError::Engine)?;
    }
    let before = runner.backend_time();
    let mut times = Vec::with_capacity(settings.iters);
    for _ in 0..settings.iters {
        let t = Instant::now();
        runner.step(plan).map_err(BenchError::Engine)?;
        times.push(t.elapsed());
    }
    report_backend_split(&before, &runner.backend_time(), &times);
    Ok(times)
}

/// Per timed unit: the time spent inside the backend's operations (each includes its
/// host<->device copies), in the engine's measured host phases (`host: ...`: hyper-connections,
/// norms, RoPE, routing, ...), and what is left (collectives, allocation, glue), on stderr beside
/// the fill time.
fn report_backend_split(before: &[OpTime], after: &[OpTime], times: &[Duration]) {
    if after.is_empty() || times.is_empty() {
        return;
    }
    let units = times.len() as f64;
    let total_ms = times.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3 / units;
    let (mut device, mut host, mut stages) = (Vec::new(), Vec::new(), Vec::new());
    let mut graph_steps = 0.0;
    let (mut device_ms, mut host_ms) = (0.0, 0.0);
    for a in after {
        let b = before.iter().find(|b| b.op == a.op);
        let ms = (a.seconds - b.map_or(0.0, |b| b.seconds)) * 1e3 / units;
        let calls = (a.calls - b.map_or(0, |b| b.calls)) as f64 / units;
        if calls <= 0.0 {
            continue;
        }
        if a.op == crate::backend::cuda::GRAPH_STEPS_OP {
            graph_steps = calls;
            continue;
        }
        if let Some(stage) = a.op.strip_prefix("stack: ") {
            // GPU time inside the layer stack's one call (DSPARK_STACK_PROFILE=1).
            stages.push(format!("{stage} {ms:.3} ms"));
            continue;
        }
        match a.op.strip_prefix("host: ") {
            Some(phase) => {
                host.push(format!("{phase} {ms:.3} ms"));
                host_ms += ms;
            }
            None => {
                device.push(format!("{} {ms:.3} ms ({calls:.0} calls)", a.op));
                device_ms += ms;
            }
        }
    }
    if device.is_empty() {
        // The CPU backend times nothing of its own: its work is the rest.
        eprintln!(
            "  per unit {total_ms:.3} ms: host phases {host_ms:.3} ms [{}], backend and the rest \
             {:.3} ms",
            host.join(", "),
            total_ms - host_ms
        );
        return;
    }
    eprintln!(
        "  per unit {total_ms:.3} ms: backend {device_ms:.3} ms [{}], host phases {host_ms:.3} ms \
         [{}], the rest {:.3} ms",
        device.join(", "),
        host.join(", "),
        total_ms - device_ms - host_ms
    );
    if !stages.is_empty() {
        eprintln!("  layer stack, GPU time per stage: {}", stages.join(", "));
    }
    if graph_steps > 0.0 {
        eprintln!("  layer stack steps from CUDA graphs per unit: {graph_steps:.0}");
    }
}

/// Times the whole chunked prefill of `tokens` from position 0 (each repetition rewrites it).
fn time_prefill(
    runner: &mut dyn ModelRunner,
    seq: &mut BenchSeq,
    recent_alloc: &mut RecentAllocator,
    tokens: &[u32],
    settings: &RunSettings,
    model: &BytesModel<'_>,
) -> Result<Measured, BenchError> {
    let mut chunks: Vec<StepPlan> = Vec::new();
    for (i, c) in tokens.chunks(settings.chunk).enumerate() {
        let start = i * settings.chunk;
        let last = start + c.len() == tokens.len();
        // Each chunk's recent blocks as the scheduler would hold them then; the plans run in
        // this order every repetition, so reusing released ids is sound.
        recent_alloc.cover(&mut seq.recent, seq.table.len(), start, start + c.len())?;
        chunks.push(StepPlan {
            seqs: vec![SeqPlan {
                seq_id: seq.id,
                start_pos: start,
                tokens: c.to_vec(),
                block_table: seq.table.clone(),
                recent_table: seq.recent.clone(),
                logits: if last {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::None
                },
                draft: None,
            }],
        });
    }
    let mut bytes = StepBytes::default();
    let mut full_depth_bytes = StepBytes::default();
    for p in &chunks {
        let s = &p.seqs[0];
        let shape = SeqShape {
            start: s.start_pos as u64,
            tokens: s.tokens.len() as u64,
        };
        let (run, full) = model.step(&[shape], s.logits != LogitsWanted::None);
        bytes.add(&run);
        full_depth_bytes.add(&full);
    }
    let run = |runner: &mut dyn ModelRunner| -> Result<Duration, BenchError> {
        let t = Instant::now();
        for p in &chunks {
            runner.step(p).map_err(BenchError::Engine)?;
        }
        Ok(t.elapsed())
    };
    for _ in 0..settings.warmup {
        run(runner)?;
    }
    let before = runner.backend_time();
    let times = (0..settings.iters)
        .map(|_| run(runner))
        .collect::<Result<Vec<_>, _>>()?;
    report_backend_split(&before, &runner.backend_time(), &times);
    Ok(Measured {
        tokens: tokens.len(),
        steps: chunks.len(),
        times,
        bytes,
        full_depth_bytes,
        setup: Duration::ZERO,
        setup_tokens: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineError, KvLayout, StepOutput};

    /// Records the plans it gets; fails the `fail_at`-th step.
    struct Scripted {
        plans: Vec<StepPlan>,
        released: Vec<u64>,
        fail_at: Option<usize>,
    }

    impl Scripted {
        fn new(fail_at: Option<usize>) -> Self {
            Self {
                plans: vec![],
                released: vec![],
                fail_at,
            }
        }
    }

    impl ModelRunner for Scripted {
        fn kv_layout(&self) -> KvLayout {
            KvLayout {
                block_size: 16,
                num_blocks: 64,
                bytes_per_block: 1,
                recent_blocks: 12,
                bytes_per_recent: 1,
                recent_reach: 15,
            }
        }
        fn vocab_size(&self) -> usize {
            100
        }
        fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, EngineError> {
            // The engine's rule: a recent block for every block from 15 positions before the
            // first token through the last.
            for s in &plan.seqs {
                let end = s.start_pos + s.tokens.len();
                assert_eq!(s.recent_table.len(), s.block_table.len());
                for i in s.start_pos.saturating_sub(15) / 16..=(end - 1) / 16 {
                    assert!(s.recent_table[i] < 12, "{s:?}: no recent block {i}");
                }
            }
            self.plans.push(plan.clone());
            if Some(self.plans.len()) == self.fail_at {
                return Err(EngineError::Backend("out of device memory".into()));
            }
            Ok(StepOutput::default())
        }
        fn release(&mut self, seq_id: u64) {
            self.released.push(seq_id);
        }
    }

    fn bytes_model(cfg: &ModelConfig) -> BytesModel<'_> {
        let w = WeightBytes::default();
        BytesModel {
            cfg,
            weights: w,
            full_cfg: cfg,
            full_weights: w,
            kv: KvEntryBytes {
                latent_row: 1,
                indexer_row: 1,
            },
        }
    }

    fn tiny() -> ModelConfig {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-dsv4");
        ModelConfig::from_dir(&dir).unwrap()
    }

    fn settings(shared_context: bool) -> RunSettings {
        RunSettings {
            iters: 2,
            warmup: 1,
            chunk: 40,
            shared_context,
            seed: 7,
            random_fill: false,
        }
    }

    #[test]
    fn plans_have_the_shapes_of_each_case() {
        let cfg = tiny();
        let model = bytes_model(&cfg);
        let mut r = Scripted::new(None);
        let mut res = CaseResources::new(&Scripted::new(None).kv_layout());
        // Verify at 50 for 2 sequences: fills of 50 tokens each packed in 40-token steps
        // (40 | 10 + 30 | 20), then 1 + 2 steps of K+1 = 4 rows with all logits.
        let case = Case::Verify {
            batch: 2,
            context: 50,
            k: 3,
        };
        let m = run_case(&mut r, &mut res, case, &settings(false), &model).unwrap();
        assert_eq!(
            (m.tokens, m.steps, m.times.len(), m.setup_tokens),
            (8, 1, 2, 100)
        );
        let fills: Vec<usize> = r.plans[..3]
            .iter()
            .map(|p| p.seqs.iter().map(|s| s.tokens.len()).sum())
            .collect();
        assert_eq!(fills, vec![40, 40, 20]);
        assert!(r.plans[..3]
            .iter()
            .flat_map(|p| &p.seqs)
            .all(|s| s.logits == LogitsWanted::None));
        for p in &r.plans[3..] {
            assert_eq!(p.seqs.len(), 2);
            for s in &p.seqs {
                assert_eq!((s.start_pos, s.tokens.len()), (50, 4));
                assert_eq!(s.logits, LogitsWanted::All);
                // 54 positions in blocks of 16: 4 blocks, none shared.
                assert_eq!(s.block_table.len(), 4);
                assert!(s.draft.is_none());
            }
            assert!(p.seqs[0]
                .block_table
                .iter()
                .all(|b| !p.seqs[1].block_table.contains(b)));
        }
        assert_eq!(r.released, vec![1, 2]);
        assert_eq!(res.blocks.available(), 64);
        assert_eq!(res.recent.free.len(), 12, "every recent block returned");

        // Shared context: the 3 full blocks (48 tokens) once, then 2 tokens per sequence.
        r.plans.clear();
        let case = Case::Decode {
            batch: 2,
            context: 50,
        };
        let m = run_case(&mut r, &mut res, case, &settings(true), &model).unwrap();
        assert_eq!(m.setup_tokens, 48 + 2 * 2);
        let timed = r.plans.last().unwrap();
        let (a, b) = (&timed.seqs[0].block_table, &timed.seqs[1].block_table);
        assert_eq!(a[..3], b[..3]);
        assert_ne!(a[3], b[3]);
        assert_eq!(timed.seqs[0].logits, LogitsWanted::Last);
        assert_eq!(res.blocks.available(), 64);
        assert_eq!(res.recent.free.len(), 12, "every recent block returned");

        // Prefill of 100 in chunks of 40: logits only at the end.
        r.plans.clear();
        let m = run_case(
            &mut r,
            &mut res,
            Case::Prefill { prompt: 100 },
            &settings(false),
            &model,
        )
        .unwrap();
        assert_eq!((m.tokens, m.steps), (100, 3));
        let one: Vec<(usize, usize, LogitsWanted)> = r.plans[..3]
            .iter()
            .map(|p| {
                (
                    p.seqs[0].start_pos,
                    p.seqs[0].tokens.len(),
                    p.seqs[0].logits,
                )
            })
            .collect();
        assert_eq!(
            one,
            vec![
                (0, 40, LogitsWanted::None),
                (40, 40, LogitsWanted::None),
                (80, 20, LogitsWanted::Last)
            ]
        );
        // Warm-up + 2 timed runs of 3 chunks.
        assert_eq!(r.plans.len(), 9);
    }

    #[test]
    fn random_fill_falls_back_to_the_prefill_when_the_runner_cannot() {
        let cfg = tiny();
        let model = bytes_model(&cfg);
        let mut r = Scripted::new(None);
        let mut res = CaseResources::new(&Scripted::new(None).kv_layout());
        let settings = RunSettings {
            random_fill: true,
            ..settings(false)
        };
        let case = Case::Decode {
            batch: 1,
            context: 50,
        };
        let m = run_case(&mut r, &mut res, case, &settings, &model).unwrap();
        // Scripted has no random fill: the 50 context tokens ran as 40 + 10, then 1 + 2 steps.
        assert_eq!(m.setup_tokens, 50);
        assert_eq!(r.plans.len(), 5);
    }

    #[test]
    fn a_failing_step_still_releases_the_case() {
        let cfg = tiny();
        let model = bytes_model(&cfg);
        let mut r = Scripted::new(Some(2));
        let mut res = CaseResources::new(&Scripted::new(None).kv_layout());
        let case = Case::Decode {
            batch: 3,
            context: 20,
        };
        let e = run_case(&mut r, &mut res, case, &settings(false), &model)
            .unwrap_err()
            .to_string();
        assert!(e.contains("out of device memory"), "{e}");
        assert_eq!(r.released, vec![1, 2, 3]);
        assert_eq!(res.blocks.available(), 64);
        assert_eq!(res.recent.free.len(), 12, "every recent block returned");
    }

    #[test]
    fn parses_the_three_kinds() {
        let c = parse_cases("decode:1:8192, prefill:100000,verify:16:8k:5,decode:6:1m").unwrap();
        assert_eq!(
            c,
            vec![
                Case::Decode {
                    batch: 1,
                    context: 8192
                },
                Case::Prefill { prompt: 100_000 },
                Case::Verify {
                    batch: 16,
                    context: 8192,
                    k: 5
                },
                Case::Decode {
                    batch: 6,
                    context: 1_048_576
                },
            ]
        );
        assert_eq!(c[2].label(), "verify:16:8192:5");
        assert_eq!(c[2].new_tokens(), 6);
        assert_eq!(c[2].end_position(), 8198);
        // Decode at context 0 is allowed (first token of an empty sequence).
        assert_eq!(parse_cases("decode:1:0").unwrap()[0].end_position(), 1);
    }

    #[test]
    fn bad_case_strings_are_clear_errors() {
        let cases = [
            ("decode:1", "expected decode:BATCH:CONTEXT"),
            ("decode:x:8192", "batch `x` is not a positive integer"),
            ("decode:0:8192", "batch must be at least 1"),
            ("decode:1:-5", "context `-5` is not an integer"),
            ("prefill", "expected prefill:PROMPT_TOKENS"),
            ("prefill:0", "prompt length must be at least 1"),
            ("verify:1:8192", "expected verify:BATCH:CONTEXT:K"),
            ("verify:1:8192:0", "K (drafts) must be at least 1"),
            ("train:1:2", "unknown kind `train`"),
            ("decode:1:99999999999999999999m", "not an integer"),
            (" , ", "names no case"),
        ];
        for (input, want) in cases {
            let e = parse_cases(input).unwrap_err().to_string();
            assert!(e.contains(want), "`{input}`: {e}");
        }
    }

    #[test]
    fn default_list_is_the_issues() {
        let d = default_cases();
        assert_eq!(d.len(), 15);
        assert!(d.contains(&Case::Decode {
            batch: 16,
            context: CONTEXT_1M
        }));
        assert!(d.contains(&Case::Prefill { prompt: 100_000 }));
        assert!(d.iter().all(|c| c.end_position() <= 1_048_576));
        assert_eq!(CONTEXT_1M % 128, 0);
    }

    #[test]
    fn block_counts() {
        let c = Case::Decode {
            batch: 6,
            context: 1000,
        };
        // 1001 positions: 8 blocks of 128 each.
        assert_eq!(c.blocks_needed(128, false), 48);
        // Shared: 7 full context blocks + 1 own block each.
        assert_eq!(c.blocks_needed(128, true), 7 + 6);
        assert_eq!(Case::Prefill { prompt: 129 }.blocks_needed(128, true), 2);
        let mut a = BlockAllocator::new(4);
        let b = a.take(3).unwrap();
        assert_eq!(a.available(), 1);
        assert!(a
            .take(2)
            .unwrap_err()
            .to_string()
            .contains("pool has 1 free"));
        a.give_back(b);
        assert_eq!(a.available(), 4);
    }
}
