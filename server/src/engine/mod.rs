//! The DeepSeek-V4-Flash engine: config, weights, model forward, DSpark draft, tokenizer.
//!
//! The scheduler hands the engine a [`StepPlan`] it did not choose; the engine runs it and returns
//! logits. Everything the engine keeps across steps lives in KV pool blocks named by each
//! sequence's block table, so the scheduler can allocate, free, share (prefix cache) and preempt.
pub mod draft;
pub mod model;
pub mod speculative;
pub mod tokenizer;
pub mod weights;

/// One step's work for one sequence.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SeqPlan {
    /// Stable id of the request (never a batch row): per-request state is keyed by it.
    pub seq_id: u64,
    /// Number of tokens of this sequence already in the KV state; `tokens[0]` sits at this position.
    pub start_pos: usize,
    /// Tokens to run this step: a prefill chunk, one decode token, or a verify block.
    pub tokens: Vec<u32>,
    /// Pool block ids covering positions `0 .. start_pos + tokens.len()`, in order.
    pub block_table: Vec<u32>,
    /// Entry for entry with `block_table`: the recent block of each block (its window rows and
    /// compressor inputs), `u32::MAX` for blocks whose recent block was released. Present for
    /// every block holding a position in `start_pos - recent_reach .. start_pos + tokens.len()`
    /// (drafts included).
    pub recent_table: Vec<u32>,
    /// Which rows of logits to return.
    pub logits: LogitsWanted,
    /// Speculative decoding: `tokens` is just the anchor (the last sampled token); the runner
    /// drafts up to `num_drafts` tokens, runs `[anchor, d_1..d_k]` at `start_pos..` in this same
    /// pass with logits of every row (`k + 1` rows) and returns the drafts in
    /// [`StepOutput::drafts`]. `block_table` must cover `start_pos + 1 + num_drafts` positions.
    /// It travels to every rank, so followers run the same drafting collectives and draw the
    /// same draft samples (same seed). Runners without a draft ignore it (`k = 0`).
    /// Target features of drafted rows are committed to the draft state only when a later plan
    /// shows them accepted (their positions are below that plan's `start_pos`).
    pub draft: Option<DraftPlan>,
}

/// What the draft needs to propose for one sequence (identical on every rank).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DraftPlan {
    /// Drafts wanted, `1..=` the draft's block size.
    pub num_drafts: usize,
    /// Seeds the draft's own sampling for this step (greedy requests never draw).
    pub seed: u64,
    /// The request's sampling transform, applied to the draft's logits too.
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LogitsWanted {
    /// Middle of a chunked prefill: no logits.
    None,
    /// Logits of the last token only (end of prefill, plain decode).
    Last,
    /// Logits of every token of `tokens` (speculative verification).
    All,
}

/// A batch: decodes and prefill chunks of many sequences run together in one forward pass.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepPlan {
    pub seqs: Vec<SeqPlan>,
}

/// Logits per sequence of the plan (same order), each a list of rows of `vocab_size` floats.
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    pub logits: Vec<Vec<Vec<f32>>>,
    /// Per sequence of the plan (same order; may be empty when no plan asked for drafts): the
    /// drafts run after the anchor, `None` for a sequence without [`SeqPlan::draft`]. `Some`
    /// with no tokens when the draft had no state for it yet (then one logits row came back).
    pub drafts: Vec<Option<crate::engine::draft::Drafts>>,
}

/// Geometry of the KV pool the engine was built with. The scheduler counts blocks; only the
/// engine knows what a block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Tokens covered by one block.
    pub block_size: usize,
    /// Number of blocks in the pool (block ids are `0..num_blocks`).
    pub num_blocks: usize,
    /// Bytes one block occupies (all layers), for sizing and reporting.
    pub bytes_per_block: usize,
    /// Number of recent blocks (ids `0..recent_blocks`): the sliding-window rows and compressor
    /// inputs of the blocks near each sequence's end (docs/KV.md).
    pub recent_blocks: usize,
    /// Bytes one recent block occupies (all layers).
    pub bytes_per_recent: usize,
    /// Positions before the next one to compute whose recent blocks are still read.
    pub recent_reach: usize,
}

/// What the scheduler (or a follower rank) drives. Implemented by the engine over a backend.
pub trait ModelRunner: Send {
    fn kv_layout(&self) -> KvLayout;
    fn vocab_size(&self) -> usize;
    /// Runs one batched forward pass. Writes the KV state of the new tokens into the blocks of
    /// each sequence's block table and returns the requested logits.
    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, EngineError>;
    /// Drops any per-request state kept outside the pool (e.g. draft rings) for `seq_id`.
    fn release(&mut self, seq_id: u64);
    /// Benchmarks only: writes seeded random values into every layer's part of `blocks` and of
    /// the recent blocks `recent`, as if a context had been run there, without running it (a
    /// 1M-token context is hours of prefill on a reduced build). `false` when the runner
    /// cannot; then nothing was written.
    fn fill_blocks_random(
        &mut self,
        _blocks: &[u32],
        _recent: &[u32],
        _seed: u64,
    ) -> Result<bool, EngineError> {
        Ok(false)
    }

    /// Cumulative time the backend spent per kind of operation (device backends; empty on the
    /// CPU). The benchmark subtracts it from step time to show what the host costs.
    fn backend_time(&self) -> Vec<OpTime> {
        Vec::new()
    }
}

/// Calls and wall time of one kind of backend operation, since the backend was built.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    pub op: &'static str,
    pub calls: u64,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Invalid(String),
    #[error("backend: {0}")]
    Backend(String),
    #[error("communicator: {0}")]
    Comm(String),
}
