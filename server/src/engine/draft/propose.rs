//! The DSpark draft model: committing target features into the per-request rings, and one
//! drafting pass giving up to `block_size` drafts per request.
//!
//! A drafting pass for a request whose target has processed positions `..p` and chosen the
//! anchor token `a` for position `p`:
//! 1. the block `[a, noise x (B - 1)]` at positions `p .. p + B` (B = `dspark_block_size`),
//!    embedded with the target's embedding and copied into the `hc_mult` streams;
//! 2. per stage: hc -> attn_norm -> attention -> hc -> ffn_norm -> MoE -> hc, where attention
//!    keys/values are the ring rows of positions `p - window .. p` plus the block's own B rows,
//!    with no causal mask inside the block, a per-head sink and scale `head_dim^-0.5`;
//! 3. the last stage's `hc_head`, `norm` and the target's LM head give base logits `U_j`;
//! 4. the Markov head, sequentially: `y_0 = a`, `y_{j+1}` = argmax (or a draw from the
//!    request's filtered distribution) of `U_j + W2 . W1[y_j]`; the drafts are `y_1 .. y_k`.
//!
//! The full block always runs, also for `k < B`: the block attention is non-causal, so a shorter
//! block would change every row's input away from what the draft was trained on. Drafts for
//! `k` are therefore the first `k` drafts for `B`.

use super::ring::{DraftRings, RingError};
use super::sampling::{argmax, probabilities, RequestRng, SamplingParams};
use super::weights::{load_draft_weights, DsparkWeights};
use crate::backend::cpu::dot;
use crate::backend::Backend;
use crate::engine::model::config::DsparkConfig;
use crate::engine::model::forward::{attend_with_sinks, hc_post};
use crate::engine::model::ops::{rms_norm_rows, sigmoid};
use crate::engine::model::{DeepseekV4, LoadError, WeightSource};
use crate::engine::EngineError;
use rayon::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum DraftError {
    #[error("the checkpoint has no DSpark draft: config.json lacks the dspark_* settings")]
    NotConfigured,
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Invalid(String),
}

impl From<DraftError> for EngineError {
    fn from(e: DraftError) -> Self {
        match e {
            DraftError::Engine(e) => e,
            other => EngineError::Invalid(other.to_string()),
        }
    }
}

/// One request's share of a drafting pass.
pub struct ProposeRequest<'a> {
    /// Stable request id (the ring's key).
    pub req_id: u64,
    /// The token the target chose last; not yet run through the target, it sits at `pos`.
    pub anchor: u32,
    /// Position of the anchor = number of positions committed to the ring.
    pub pos: usize,
    /// Drafts wanted, `1 ..= block_size`.
    pub num_drafts: usize,
    pub params: SamplingParams,
    /// The request's own random stream (used only when sampling).
    pub rng: &'a mut RequestRng,
}

/// Drafts of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Drafts {
    pub tokens: Vec<u32>,
    /// The filtered distribution each draft was drawn from (`tokens.len()` rows of `vocab`),
    /// for rejection sampling; `None` for greedy requests.
    pub q: Option<Vec<Vec<f32>>>,
    /// The confidence head's estimate that each draft is accepted (unused by default).
    pub confidence: Vec<f32>,
}

/// The DSpark draft with the rings of every live request.
pub struct DsparkDraft<B: Backend> {
    settings: DsparkConfig,
    weights: DsparkWeights<B>,
    rings: DraftRings,
}

impl<B: Backend> DsparkDraft<B> {
    /// Loads the draft for `target` (which provides the embedding, LM head, backend and shard).
    pub fn load(
        src: &dyn WeightSource,
        target: &DeepseekV4<B>,
        stages: usize,
    ) -> Result<Self, LoadError> {
        let cfg = target.config();
        let settings = cfg
            .dspark
            .clone()
            .ok_or_else(|| LoadError::Source(DraftError::NotConfigured.to_string()))?;
        if settings.block_size == 0 {
            return Err(LoadError::Source(
                "dspark_block_size must be at least 1".into(),
            ));
        }
        if let Some(&l) = settings
            .target_layer_ids
            .iter()
            .find(|&&l| l >= cfg.num_hidden_layers)
        {
            return Err(LoadError::Source(format!(
                "dspark_target_layer_ids names layer {l}, the target has {}",
                cfg.num_hidden_layers
            )));
        }
        if settings.noise_token_id as usize >= cfg.vocab_size {
            return Err(LoadError::Source(format!(
                "dspark_noise_token_id {} outside the vocabulary of {}",
                settings.noise_token_id, cfg.vocab_size
            )));
        }
        let weights = load_draft_weights(
            src,
            target.backend(),
            cfg,
            &settings,
            stages,
            target.shard(),
        )?;
        let rings = DraftRings::new(stages, cfg.sliding_window, cfg.head_dim);
        Ok(Self {
            settings,
            weights,
            rings,
        })
    }

    pub fn settings(&self) -> &DsparkConfig {
        &self.settings
    }

    pub fn block_size(&self) -> usize {
        self.settings.block_size
    }

    /// Target layers whose outputs the scheduler must capture
    /// (`DeepseekV4::set_capture_layers`).
    pub fn target_layers(&self) -> &[usize] {
        &self.settings.target_layer_ids
    }

    pub fn rings(&self) -> &DraftRings {
        &self.rings
    }

    /// Positions committed for `req` (the position its next anchor must have).
    pub fn next_pos(&self, req: u64) -> usize {
        self.rings.next_pos(req)
    }

    /// Drops the request's draft state.
    pub fn release(&mut self, req: u64) {
        self.rings.release(req);
    }

    /// Target features `[rows.len(), n_layers * hidden]` of step rows `rows` from
    /// `DeepseekV4::take_captured` (each `(layer, [step_rows, hidden])`), concatenated in
    /// `dspark_target_layer_ids` order.
    pub fn features_from_captured(
        &self,
        captured: &[(usize, Vec<f32>)],
        hidden: usize,
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<f32>, DraftError> {
        let mut per_layer = Vec::with_capacity(self.settings.target_layer_ids.len());
        for &l in &self.settings.target_layer_ids {
            let (_, data) = captured.iter().find(|(cl, _)| *cl == l).ok_or_else(|| {
                DraftError::Invalid(format!("target layer {l} was not captured this step"))
            })?;
            if data.len() < rows.end * hidden {
                return Err(DraftError::Invalid(format!(
                    "captured layer {l} has {} rows, row {} wanted",
                    data.len() / hidden.max(1),
                    rows.end
                )));
            }
            per_layer.push(data);
        }
        let mut out = Vec::with_capacity(rows.len() * per_layer.len() * hidden);
        for r in rows {
            for data in &per_layer {
                out.extend_from_slice(&data[r * hidden..(r + 1) * hidden]);
            }
        }
        Ok(out)
    }

    /// Commits accepted positions `first_pos .. first_pos + rows` of request `req` from their
    /// target features (`[rows, n_layers * hidden]`): `main_x = main_norm(main_proj(f))`, then
    /// each stage's `wkv`, `kv_norm` and RoPE at the position, into the stage's ring.
    /// Call it with the prompt's features after prefill, and after each verification with the
    /// features of the anchor and the accepted drafts only.
    pub fn commit(
        &mut self,
        target: &DeepseekV4<B>,
        req: u64,
        first_pos: usize,
        features: &[f32],
        rows: usize,
    ) -> Result<(), DraftError> {
        let cfg = target.config();
        let h = cfg.hidden_size;
        let width = self.settings.target_layer_ids.len() * h;
        if features.len() != rows * width {
            return Err(DraftError::Invalid(format!(
                "request {req}: {} feature values for {rows} rows of {width}",
                features.len()
            )));
        }
        if let Some(want) = self.rings.get(req).map(|r| r.next_pos()) {
            if first_pos != want {
                return Err(RingError::Gap {
                    req,
                    got: first_pos,
                    want,
                }
                .into());
            }
        }
        let kept = self.rings.kept_rows(rows);
        let skip = rows - kept;
        let mut main_x = target.linear(&features[skip * width..], kept, &self.weights.main_proj)?;
        rms_norm_rows(
            &mut main_x,
            h,
            Some(&self.weights.main_norm),
            cfg.rms_norm_eps,
        );
        let positions: Vec<usize> = (first_pos + skip..first_pos + rows).collect();
        let stage_rows = self
            .weights
            .stages
            .iter()
            .map(|st| target.project_kv(&st.attn, &main_x, &positions, target.rope_main()))
            .collect::<Result<Vec<_>, _>>()?;
        self.rings.commit(req, first_pos, rows, &stage_rows)?;
        Ok(())
    }

    /// One drafting pass over every request of `reqs` (each with its own ring and anchor).
    /// Leaves the rings unchanged.
    pub fn propose(
        &self,
        target: &DeepseekV4<B>,
        reqs: &mut [ProposeRequest<'_>],
    ) -> Result<Vec<Drafts>, DraftError> {
        let cfg = target.config();
        let (h, hc, eps, hc_eps) = (cfg.hidden_size, cfg.hc_mult, cfg.rms_norm_eps, cfg.hc_eps);
        let bsz = self.settings.block_size;
        for r in reqs.iter() {
            if r.num_drafts == 0 || r.num_drafts > bsz {
                return Err(DraftError::Invalid(format!(
                    "request {}: {} drafts asked, the DSpark block drafts 1..={bsz}",
                    r.req_id, r.num_drafts
                )));
            }
            if r.anchor as usize >= cfg.vocab_size {
                return Err(DraftError::Invalid(format!(
                    "request {}: anchor token {} outside the vocabulary of {}",
                    r.req_id, r.anchor, cfg.vocab_size
                )));
            }
            let next = self.rings.next_pos(r.req_id);
            if self.rings.get(r.req_id).is_none_or(|g| g.next_pos() == 0) {
                return Err(RingError::Empty { req: r.req_id }.into());
            }
            if r.pos != next {
                return Err(DraftError::Invalid(format!(
                    "request {}: anchor at position {}, but target features are committed up \
                     to position {}",
                    r.req_id,
                    r.pos,
                    next - 1
                )));
            }
            if r.pos + bsz > cfg.max_position_embeddings {
                return Err(DraftError::Invalid(format!(
                    "request {}: the block would reach position {}, beyond {}",
                    r.req_id,
                    r.pos + bsz,
                    cfg.max_position_embeddings
                )));
            }
        }
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let n = reqs.len() * bsz;
        let mut ids = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        for r in reqs.iter() {
            ids.push(r.anchor);
            ids.extend(std::iter::repeat_n(self.settings.noise_token_id, bsz - 1));
            positions.extend(r.pos..r.pos + bsz);
        }

        let embed = target
            .backend()
            .gather_rows(&target.weights().embed, &ids)
            .map_err(|e| EngineError::Backend(e.to_string()))?;
        let mut streams = vec![0f32; n * hc * h];
        streams
            .par_chunks_mut(hc * h)
            .zip(embed.par_chunks(h))
            .for_each(|(dst, e)| dst.chunks_mut(h).for_each(|s| s.copy_from_slice(e)));

        for s in 0..self.weights.stages.len() {
            let st = &self.weights.stages[s];
            let (mixes, mut x) = target.hc_pre(&streams, &st.hc_attn, n)?;
            rms_norm_rows(&mut x, h, Some(&st.attn_norm), eps);
            let attn = self.stage_attention(target, s, &x, reqs, &positions)?;
            hc_post(&mut streams, &mixes, &attn, h, hc);
            let (mixes, mut x) = target.hc_pre(&streams, &st.hc_ffn, n)?;
            rms_norm_rows(&mut x, h, Some(&st.ffn_norm), eps);
            let ffn = target.moe_block(&st.moe, &x, &ids)?;
            hc_post(&mut streams, &mixes, &ffn, h, hc);
        }

        // Pre-norm head hidden (the confidence head's input), then norm + the target's head.
        let hidden: Vec<f32> = streams
            .par_chunks(hc * h)
            .flat_map_iter(|t| self.weights.hc_head.collapse(t, hc, hc_eps, eps))
            .collect();
        let mut normed = hidden.clone();
        rms_norm_rows(&mut normed, h, Some(&self.weights.norm), eps);
        let logits = target.head_logits(&normed, n)?;
        self.markov_walk(target, reqs, &logits, &hidden)
    }

    /// Attention of one stage for all block rows: each row attends to its request's ring rows
    /// and to all rows of its own block.
    fn stage_attention(
        &self,
        target: &DeepseekV4<B>,
        s: usize,
        x: &[f32],
        reqs: &[ProposeRequest<'_>],
        positions: &[usize],
    ) -> Result<Vec<f32>, DraftError> {
        let cfg = target.config();
        let hd = cfg.head_dim;
        let bsz = self.settings.block_size;
        let aw = &self.weights.stages[s].attn;
        let rope = target.rope_main();
        let (_, q) = target.project_queries(aw, x, positions, rope)?;
        let block_kv = target.project_kv(aw, x, positions, rope)?;
        let n = positions.len();
        let local_heads = q.len() / (n * hd);
        let rings: Vec<Vec<&[f32]>> = reqs
            .iter()
            .map(|r| self.rings.visible(r.req_id, s))
            .collect::<Result<_, _>>()?;
        let scale = (hd as f32).powf(-0.5);
        let mut out = vec![0f32; n * local_heads * hd];
        out.par_chunks_mut(local_heads * hd)
            .enumerate()
            .for_each(|(i, o)| {
                let ri = i / bsz;
                let mut keys = rings[ri].clone();
                keys.extend(block_kv[ri * bsz * hd..(ri + 1) * bsz * hd].chunks(hd));
                attend_with_sinks(
                    &q[i * local_heads * hd..(i + 1) * local_heads * hd],
                    &keys,
                    &aw.sinks,
                    scale,
                    o,
                );
                // K = V carried RoPE into the output; undo it at the query position.
                rope.apply(o, hd, positions[i], true);
            });
        Ok(target.project_output(aw, &out, n)?)
    }

    /// The sequential Markov head over base logits `[reqs * block, vocab]`.
    fn markov_walk(
        &self,
        target: &DeepseekV4<B>,
        reqs: &mut [ProposeRequest<'_>],
        logits: &[f32],
        hidden: &[f32],
    ) -> Result<Vec<Drafts>, DraftError> {
        let cfg = target.config();
        let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let rank = self.settings.markov_rank;
        let bsz = self.settings.block_size;
        let (conf_h, conf_m) = self.weights.confidence.split_at(h);
        let mut out: Vec<Drafts> = reqs
            .iter()
            .map(|r| Drafts {
                tokens: Vec::with_capacity(r.num_drafts),
                q: (!r.params.is_greedy()).then(Vec::new),
                confidence: Vec::with_capacity(r.num_drafts),
            })
            .collect();
        let mut prev: Vec<u32> = reqs.iter().map(|r| r.anchor).collect();
        let steps = reqs.iter().map(|r| r.num_drafts).max().unwrap_or(0);
        for j in 0..steps {
            // Requests still drafting at step j, their Markov embeddings in one batch.
            let active: Vec<usize> = (0..reqs.len())
                .filter(|&i| reqs[i].num_drafts > j)
                .collect();
            let mut emb = Vec::with_capacity(active.len() * rank);
            for &i in &active {
                let t = prev[i] as usize;
                emb.extend_from_slice(&self.weights.markov_w1[t * rank..(t + 1) * rank]);
            }
            let bias = target.linear(&emb, active.len(), &self.weights.markov_w2)?;
            for (a, &i) in active.iter().enumerate() {
                let row = i * bsz + j;
                let e = &emb[a * rank..(a + 1) * rank];
                let corrected: Vec<f32> = logits[row * vocab..(row + 1) * vocab]
                    .iter()
                    .zip(&bias[a * vocab..(a + 1) * vocab])
                    .map(|(u, b)| u + b)
                    .collect();
                let conf = sigmoid(dot(conf_h, &hidden[row * h..(row + 1) * h]) + dot(conf_m, e));
                let r = &mut reqs[i];
                let token = if r.params.is_greedy() {
                    argmax(&corrected)
                } else {
                    let q = probabilities(&corrected, &r.params);
                    let t = sample(r.rng, &q);
                    if let Some(qs) = out[i].q.as_mut() {
                        qs.push(q);
                    }
                    t
                };
                out[i].tokens.push(token);
                out[i].confidence.push(conf);
                prev[i] = token;
            }
        }
        Ok(out)
    }
}

fn sample(rng: &mut RequestRng, q: &[f32]) -> u32 {
    rng.categorical(q).unwrap_or_else(|| argmax(q))
}
