//! The target and its DSpark draft as one [`ModelRunner`]: a [`SeqPlan`] with a
//! [`DraftPlan`](crate::engine::DraftPlan) drafts after its anchor and verifies the drafts in the
//! same target pass (docs/DSPARK.md, "Scheduler integration").
//!
//! Every rank runs this runner on the same plans, so the drafting collectives (the draft's
//! layers are sharded like the target's) and the draft's sampling (seeded by the plan) agree.
//!
//! Draft state follows the target's KV: rows of tokens the scheduler sent (prompt chunks,
//! anchors) are final and committed to the ring right away; rows of drafted tokens wait in
//! `pending` until a later plan for the sequence starts past them (the scheduler keeps only
//! accepted positions), and are dropped otherwise. The ring therefore never sees a rejected row.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::Backend;
use crate::engine::draft::DEFAULT_NUM_STAGES;
use crate::engine::draft::{Drafts, DsparkDraft, ProposeRequest, RequestRng, SamplingParams};
use crate::engine::model::config::ModelConfig;
use crate::engine::model::{build_cpu, build_cuda, DeepseekV4, LoadError, LoadOptions};
use crate::engine::{EngineError, KvLayout, LogitsWanted, ModelRunner, StepOutput, StepPlan};
use crate::ranks::Communicator;

/// Stands in for the draft's proposals (tests: an oracle that knows the target's output).
/// Called with `(seq_id, anchor position, drafts wanted)`; returns the drafts (greedy only).
pub type DraftOverride = Box<dyn FnMut(u64, usize, usize) -> Vec<u32> + Send>;

/// Target features of drafted rows, not yet known to be accepted.
struct PendingRows {
    first_pos: usize,
    rows: usize,
    features: Vec<f32>,
}

pub struct SpeculativeRunner<B: Backend> {
    target: DeepseekV4<B>,
    draft: DsparkDraft<B>,
    pending: HashMap<u64, PendingRows>,
    draft_override: Option<DraftOverride>,
}

impl SpeculativeRunner<CpuBackend> {
    /// Loads target and draft (`mtp.*`) from the checkpoint in `dir` on the CPU backend.
    pub fn load_cpu(
        dir: &Path,
        opts: &LoadOptions,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self, LoadError> {
        Self::load_with(dir, opts, comm, build_cpu)
    }
}

impl SpeculativeRunner<CudaBackend> {
    /// Loads target and draft (`mtp.*`) from the checkpoint in `dir` on GPU `opts.gpu_ordinal`.
    pub fn load_cuda(
        dir: &Path,
        opts: &LoadOptions,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self, LoadError> {
        Self::load_with(dir, opts, comm, build_cuda)
    }
}

type BuildTarget<B> = fn(
    ModelConfig,
    &dyn crate::engine::model::WeightSource,
    &LoadOptions,
    Arc<dyn Communicator>,
) -> Result<DeepseekV4<B>, LoadError>;

impl<B: Backend> SpeculativeRunner<B> {
    fn load_with(
        dir: &Path,
        opts: &LoadOptions,
        comm: Arc<dyn Communicator>,
        build_target: BuildTarget<B>,
    ) -> Result<Self, LoadError> {
        let cfg = ModelConfig::from_dir(dir)?;
        let started = Instant::now();
        let ckpt = crate::engine::model::checkpoint_source::open(dir, &cfg, opts)?;
        let target = build_target(cfg, &ckpt, opts, comm)?;
        let draft = DsparkDraft::load(&ckpt, &target, DEFAULT_NUM_STAGES)?;
        crate::engine::model::checkpoint_source::log_loaded(dir, opts, &ckpt, started);
        Ok(Self::new(target, draft))
    }

    pub fn new(mut target: DeepseekV4<B>, draft: DsparkDraft<B>) -> Self {
        target.set_capture_layers(draft.target_layers().to_vec());
        Self {
            target,
            draft,
            pending: HashMap::new(),
            draft_override: None,
        }
    }

    /// Most drafts one step can verify (the DSpark block size).
    pub fn block_size(&self) -> usize {
        self.draft.block_size()
    }

    pub fn target(&self) -> &DeepseekV4<B> {
        &self.target
    }

    pub fn draft(&self) -> &DsparkDraft<B> {
        &self.draft
    }

    /// Replaces the draft's proposals (tests).
    pub fn set_draft_override(&mut self, f: DraftOverride) {
        self.draft_override = Some(f);
    }

    fn feature_width(&self) -> usize {
        self.draft.target_layers().len() * self.target.config().hidden_size
    }

    /// Brings `seq`'s ring up to `start_pos`: commits the pending drafted rows the plan shows
    /// accepted, and drops state that cannot continue at `start_pos` (recomputed or rolled back
    /// sequences start a fresh ring there).
    fn settle(&mut self, seq: u64, start_pos: usize) -> Result<(), EngineError> {
        let pending = self.pending.remove(&seq);
        let next = self.draft.rings().get(seq).map(|r| r.next_pos());
        if start_pos == 0 || next.is_some_and(|n| n > start_pos) {
            self.draft.release(seq);
            return Ok(());
        }
        if let (Some(p), Some(n)) = (pending, next) {
            if p.first_pos == n && start_pos > n {
                let accepted = (start_pos - n).min(p.rows);
                let width = self.feature_width();
                self.draft.commit(
                    &self.target,
                    seq,
                    n,
                    &p.features[..accepted * width],
                    accepted,
                )?;
            }
        }
        if self
            .draft
            .rings()
            .get(seq)
            .is_some_and(|r| r.next_pos() != start_pos)
        {
            self.draft.release(seq);
        }
        Ok(())
    }

    fn run(&mut self, plan: &StepPlan) -> Result<StepOutput, EngineError> {
        for sp in &plan.seqs {
            self.settle(sp.seq_id, sp.start_pos)?;
        }
        // Draft for every sequence that asks and whose ring reaches its anchor.
        let mut drafts: Vec<Option<Drafts>> = vec![None; plan.seqs.len()];
        let mut asks = Vec::new();
        let mut rngs = Vec::new();
        for (i, sp) in plan.seqs.iter().enumerate() {
            let Some(d) = sp.draft else { continue };
            if sp.tokens.len() != 1 {
                return Err(EngineError::Invalid(format!(
                    "sequence {}: a drafting plan carries only the anchor, got {} tokens",
                    sp.seq_id,
                    sp.tokens.len()
                )));
            }
            drafts[i] = Some(Drafts {
                tokens: Vec::new(),
                q: None,
                confidence: Vec::new(),
            });
            // The block runs whole: near the trained length the target decodes alone.
            let fits = sp.start_pos + self.draft.block_size()
                <= self.target.config().max_position_embeddings;
            if d.num_drafts > 0 && fits && self.draft.next_pos(sp.seq_id) == sp.start_pos {
                asks.push(i);
                rngs.push(RequestRng::seeded(d.seed));
            }
        }
        if let Some(f) = self.draft_override.as_mut() {
            for &i in &asks {
                let sp = &plan.seqs[i];
                let k = sp.draft.map_or(0, |d| d.num_drafts);
                if let Some(d) = drafts[i].as_mut() {
                    d.tokens = f(sp.seq_id, sp.start_pos, k);
                    d.tokens.truncate(k);
                }
            }
        } else if !asks.is_empty() {
            let mut reqs: Vec<ProposeRequest<'_>> = asks
                .iter()
                .zip(rngs.iter_mut())
                .filter_map(|(&i, rng)| {
                    let sp = &plan.seqs[i];
                    let d = sp.draft?;
                    Some(ProposeRequest {
                        req_id: sp.seq_id,
                        anchor: sp.tokens[0],
                        pos: sp.start_pos,
                        num_drafts: d.num_drafts,
                        params: SamplingParams {
                            temperature: d.temperature,
                            top_p: d.top_p,
                            top_k: d.top_k,
                        },
                        rng,
                    })
                })
                .collect();
            let proposed = self.draft.propose(&self.target, &mut reqs)?;
            for (&i, p) in asks.iter().zip(proposed) {
                drafts[i] = Some(p);
            }
        }
        // One target pass: every sequence's own tokens, drafting ones followed by their drafts.
        let mut target_plan = plan.clone();
        for (sp, d) in target_plan.seqs.iter_mut().zip(&drafts) {
            if let Some(d) = d {
                sp.tokens.extend_from_slice(&d.tokens);
                sp.logits = LogitsWanted::All;
            }
            sp.draft = None;
        }
        let mut out = self.target.step(&target_plan)?;
        let captured = self.target.take_captured();
        let hidden = self.target.config().hidden_size;
        let mut row = 0;
        for (sp, tp) in plan.seqs.iter().zip(&target_plan.seqs) {
            let own = sp.tokens.len();
            let all = tp.tokens.len();
            if own > 0 {
                let f = self
                    .draft
                    .features_from_captured(&captured, hidden, row..row + own)?;
                self.draft
                    .commit(&self.target, sp.seq_id, sp.start_pos, &f, own)?;
            }
            if all > own {
                let features =
                    self.draft
                        .features_from_captured(&captured, hidden, row + own..row + all)?;
                self.pending.insert(
                    sp.seq_id,
                    PendingRows {
                        first_pos: sp.start_pos + own,
                        rows: all - own,
                        features,
                    },
                );
            }
            row += all;
        }
        out.drafts = drafts;
        Ok(out)
    }
}

impl<B: Backend> ModelRunner for SpeculativeRunner<B> {
    fn kv_layout(&self) -> KvLayout {
        self.target.kv_layout()
    }

    fn vocab_size(&self) -> usize {
        self.target.vocab_size()
    }

    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, EngineError> {
        self.run(plan)
    }

    fn backend_time(&self) -> Vec<crate::engine::OpTime> {
        self.target.backend_time()
    }

    fn release(&mut self, seq_id: u64) {
        self.target.release(seq_id);
        self.draft.release(seq_id);
        self.pending.remove(&seq_id);
    }
}
