//! The batched forward pass of DeepSeek-V4 over a [`Backend`], reading and writing the KV pool.
//!
//! A step flattens every sequence's tokens into one list of rows: projections, norms, MoE and
//! hyper-connections run over all rows at once (prefill chunks and decodes alike); attention,
//! compression and indexing run per token against that token's own sequence blocks.

use super::config::{AttentionKind, ModelConfig, ScoringFunc};
use super::host_clock::{HostClock, HostPhase};
use super::hyper::{collapse, expand, HcMix};
use super::kv::{KvPool, NO_RECENT};
use super::load::{AttentionWeights, CompressorWeights, ModelWeights, MoeWeights, Routing, Shard};
use super::ops::{gated_pool, rms_norm_rows, sigmoid, softplus, top_k_indices, PoolSlot};
use super::rope::RopeTable;
use crate::backend::kv::{IndexerRows, KeyLists, KvRowFormat};
use crate::backend::{Backend, BackendError, StackModel, StackRows, StackStreams};
use crate::engine::{EngineError, KvLayout, LogitsWanted, ModelRunner, StepOutput, StepPlan};
use crate::ranks::Communicator;
use rayon::prelude::*;
use std::collections::HashSet;
use std::sync::Arc;

fn backend_err(e: crate::backend::BackendError) -> EngineError {
    EngineError::Backend(e.to_string())
}

fn comm_err(e: crate::ranks::CommError) -> EngineError {
    EngineError::Comm(e.to_string())
}

/// One row of the flattened step.
#[derive(Debug, Clone, Copy)]
struct TokenRow {
    seq: usize,
    pos: usize,
    id: u32,
}

/// Per-sequence view of the step.
struct SeqView<'a> {
    start: usize,
    len: usize,
    /// Index of this sequence's first row in the flattened step.
    first_row: usize,
    block_table: &'a [u32],
    recent_table: &'a [u32],
}

/// DeepSeek-V4 target model of one rank, with its KV pool.
pub struct DeepseekV4<B: Backend> {
    /// The backend's whole-layer device forward, where it has one for these weights. Declared
    /// first so it is dropped first: its CUDA graphs hold NCCL collectives, which must go before
    /// the communicator (`comm`) is torn down.
    stack: Option<B::LayerStack>,
    cfg: ModelConfig,
    backend: B,
    weights: ModelWeights<B>,
    rope_main: RopeTable,
    rope_compress: RopeTable,
    pool: KvPool,
    /// The pool's storage, on the backend.
    kv: B::KvStore,
    /// Time spent in host phases (reported with the backend's op times).
    host: HostClock,
    comm: Arc<dyn Communicator>,
    shard: Shard,
    /// Layers whose output (mean of the residual streams) is kept for the DSpark draft.
    capture_layers: Vec<usize>,
    captured: Vec<(usize, Vec<f32>)>,
}

/// Whether runners use the backend's layer stack (`DSPARK_LAYER_STACK=0` forces the op-by-op
/// path, e.g. to compare the two).
fn layer_stack_wanted() -> bool {
    std::env::var("DSPARK_LAYER_STACK").map_or(true, |v| v != "0")
}

impl<B: Backend> DeepseekV4<B> {
    pub fn new(
        cfg: ModelConfig,
        backend: B,
        weights: ModelWeights<B>,
        pool: KvPool,
        comm: Arc<dyn Communicator>,
        shard: Shard,
    ) -> Result<Self, BackendError> {
        let rope_main = RopeTable::new(&cfg.rope_main, cfg.qk_rope_head_dim);
        let rope_compress = RopeTable::new(&cfg.rope_compress, cfg.qk_rope_head_dim);
        let kv = backend.kv_store(pool.floats())?;
        let stack = if layer_stack_wanted() {
            backend.layer_stack(&StackModel {
                cfg: &cfg,
                weights: &weights,
                pool: &pool,
                rope_main: &rope_main,
                rope_compress: &rope_compress,
                shard,
            })?
        } else {
            None
        };
        Ok(Self {
            cfg,
            backend,
            weights,
            rope_main,
            rope_compress,
            pool,
            kv,
            host: HostClock::default(),
            comm,
            shard,
            capture_layers: Vec::new(),
            captured: Vec::new(),
            stack,
        })
    }

    /// Whether steps of up to the backend's row limit run as one device layer stack.
    pub fn uses_layer_stack(&self) -> bool {
        self.stack.is_some()
    }

    /// Whether the layer stack may run its steps as captured CUDA graphs (on by default;
    /// `--enforce-eager` turns it off).
    pub fn set_cuda_graphs(&mut self, on: bool) {
        if let Some(stack) = self.stack.as_mut() {
            self.backend.set_layer_stack_graphs(stack, on);
        }
    }

    /// Runs every later step op by op (the reference the layer stack is compared with).
    pub fn disable_layer_stack(&mut self) {
        self.stack = None;
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The backend the DSpark draft shares with the target.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// This rank's weights (the DSpark draft shares the embedding and LM head).
    pub fn weights(&self) -> &ModelWeights<B> {
        &self.weights
    }

    /// RoPE of the sliding-only (ratio 0) layers, which the draft stages also use.
    pub fn rope_main(&self) -> &RopeTable {
        &self.rope_main
    }

    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// Keep, for every row of each following step, the mean of the residual streams after these
    /// layers (the DSpark draft's target features).
    pub fn set_capture_layers(&mut self, layers: Vec<usize>) {
        self.capture_layers = layers;
    }

    /// `(layer, [rows, hidden])` captured by the last step, rows in plan order.
    pub fn take_captured(&mut self) -> Vec<(usize, Vec<f32>)> {
        std::mem::take(&mut self.captured)
    }

    fn validate(&self, plan: &StepPlan) -> Result<(), EngineError> {
        let bs = self.pool.geometry.block_size;
        let mut seen = HashSet::new();
        for s in &plan.seqs {
            if !seen.insert(s.seq_id) {
                return Err(EngineError::Invalid(format!(
                    "sequence {} appears twice in one step",
                    s.seq_id
                )));
            }
            if s.tokens.is_empty() {
                return Err(EngineError::Invalid(format!(
                    "sequence {} has no tokens to run",
                    s.seq_id
                )));
            }
            let end = s.start_pos + s.tokens.len();
            if end > self.cfg.max_position_embeddings {
                return Err(EngineError::Invalid(format!(
                    "sequence {} reaches position {end}, beyond max_position_embeddings {}",
                    s.seq_id, self.cfg.max_position_embeddings
                )));
            }
            if s.block_table.len() * bs < end {
                return Err(EngineError::Invalid(format!(
                    "sequence {}: block table of {} blocks covers {} positions, needs {end}",
                    s.seq_id,
                    s.block_table.len(),
                    s.block_table.len() * bs
                )));
            }
            if let Some(b) = s
                .block_table
                .iter()
                .find(|&&b| b as usize >= self.pool.num_blocks)
            {
                return Err(EngineError::Invalid(format!(
                    "sequence {}: block {b} outside the pool of {} blocks",
                    s.seq_id, self.pool.num_blocks
                )));
            }
            // The recent blocks this step reads and writes: those of the positions from
            // `recent_reach` before the first token through the last one.
            if s.recent_table.len() != s.block_table.len() {
                return Err(EngineError::Invalid(format!(
                    "sequence {}: recent table of {} entries for a block table of {}",
                    s.seq_id,
                    s.recent_table.len(),
                    s.block_table.len()
                )));
            }
            let first = self.pool.geometry.first_recent_block(s.start_pos);
            let last = (end - 1) / bs;
            for (i, &r) in s.recent_table.iter().enumerate() {
                let needed = (first..=last).contains(&i);
                if (needed || r != NO_RECENT) && r as usize >= self.pool.num_recent {
                    return Err(EngineError::Invalid(format!(
                        "sequence {}: block {i} (positions {}..{}) has recent block {}, the \
                         pool has {} recent blocks",
                        s.seq_id,
                        i * bs,
                        (i + 1) * bs,
                        if r == NO_RECENT {
                            "none".to_string()
                        } else {
                            r.to_string()
                        },
                        self.pool.num_recent
                    )));
                }
            }
            if let Some(t) = s
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size)
            {
                return Err(EngineError::Invalid(format!(
                    "sequence {}: token id {t} outside the vocabulary of {}",
                    s.seq_id, self.cfg.vocab_size
                )));
            }
        }
        Ok(())
    }

    pub fn linear(&self, x: &[f32], n: usize, w: &B::Matrix) -> Result<Vec<f32>, EngineError> {
        self.backend.linear(x, n, w).map_err(backend_err)
    }

    pub fn all_reduce(&self, data: &mut [f32]) -> Result<(), EngineError> {
        if self.shard.world_size > 1 {
            self.comm.all_reduce_sum(data).map_err(comm_err)?;
        }
        Ok(())
    }

    /// Runs one step: returns logits per sequence as the plan asks.
    pub fn forward(&mut self, plan: &StepPlan) -> Result<StepOutput, EngineError> {
        self.validate(plan)?;
        let (h, hc) = (self.cfg.hidden_size, self.cfg.hc_mult);
        let (eps, hc_eps) = (self.cfg.rms_norm_eps, self.cfg.hc_eps);

        let mut rows = Vec::new();
        let mut seqs = Vec::with_capacity(plan.seqs.len());
        for (si, s) in plan.seqs.iter().enumerate() {
            seqs.push(SeqView {
                start: s.start_pos,
                len: s.tokens.len(),
                first_row: rows.len(),
                block_table: &s.block_table,
                recent_table: &s.recent_table,
            });
            rows.extend(s.tokens.iter().enumerate().map(|(i, &id)| TokenRow {
                seq: si,
                pos: s.start_pos + i,
                id,
            }));
        }
        let n = rows.len();
        if n == 0 {
            return Ok(StepOutput::default());
        }

        let ids: Vec<u32> = rows.iter().map(|r| r.id).collect();
        let width = hc * h;

        // Rows whose logits are wanted.
        let mut wanted: Vec<usize> = Vec::new();
        let mut per_seq: Vec<Vec<usize>> = Vec::with_capacity(plan.seqs.len());
        for (s, view) in plan.seqs.iter().zip(&seqs) {
            let picks: Vec<usize> = match s.logits {
                LogitsWanted::None => vec![],
                LogitsWanted::Last => vec![view.first_row + view.len - 1],
                LogitsWanted::All => (view.first_row..view.first_row + view.len).collect(),
            };
            per_seq.push((wanted.len()..wanted.len() + picks.len()).collect());
            wanted.extend(picks);
        }

        self.captured.clear();
        // The residual streams of the wanted rows after the last layer, [wanted, hc * h].
        let mut head_streams = vec![0f32; wanted.len() * width];
        // The wanted rows' logits, where the layer stack ran the head on the device.
        let mut stack_logits: Vec<Vec<f32>> = Vec::new();
        match self.stack.as_mut() {
            Some(stack) if n <= self.backend.layer_stack_max_rows() => {
                let model = StackModel {
                    cfg: &self.cfg,
                    weights: &self.weights,
                    pool: &self.pool,
                    rope_main: &self.rope_main,
                    rope_compress: &self.rope_compress,
                    shard: self.shard,
                };
                let step_rows = StackRows {
                    positions: rows.iter().map(|r| r.pos).collect(),
                    ids: ids.clone(),
                    block_tables: rows.iter().map(|r| seqs[r.seq].block_table).collect(),
                    recent_tables: rows.iter().map(|r| seqs[r.seq].recent_table).collect(),
                };
                // The streams are built from the embedding on the device and stay there: only
                // the rows the head needs come back (a prefill chunk's 8,192 rows are 512 MB).
                self.captured = self
                    .backend
                    .run_layer_stack(
                        stack,
                        &model,
                        &mut self.kv,
                        self.comm.as_ref(),
                        &step_rows,
                        StackStreams {
                            keep: &wanted,
                            kept: &mut head_streams,
                            logits: Some(&mut stack_logits),
                        },
                        &self.capture_layers,
                    )
                    .map_err(backend_err)?;
            }
            _ => {
                let streams = self.forward_op_by_op(&ids, &rows, &seqs)?;
                for (dst, &r) in head_streams.chunks_exact_mut(width).zip(&wanted) {
                    dst.copy_from_slice(&streams[r * width..(r + 1) * width]);
                }
            }
        }

        let mut out = StepOutput {
            drafts: Vec::new(),
            logits: per_seq.iter().map(|_| Vec::new()).collect(),
        };
        if wanted.is_empty() {
            return Ok(out);
        }
        // The wanted rows' logits: from the layer stack where it ran the head, else the host's
        // collapse and norm, then the LM head.
        let rows = if stack_logits.is_empty() {
            let final_h = self.host.time(HostPhase::Logits, || {
                let mut final_h: Vec<f32> = Vec::with_capacity(wanted.len() * h);
                for row in head_streams.chunks_exact(width) {
                    final_h.extend(self.weights.hc_head.collapse(row, hc, hc_eps, eps));
                }
                rms_norm_rows(&mut final_h, h, Some(&self.weights.norm), eps);
                final_h
            });
            self.head_logit_rows(&final_h, wanted.len())?
        } else if stack_logits.len() != wanted.len()
            || stack_logits.iter().any(|r| r.len() != self.cfg.vocab_size)
        {
            return Err(EngineError::Backend(format!(
                "the layer stack's head returned {} rows of {} values, expected {} of {}",
                stack_logits.len(),
                stack_logits.first().map_or(0, Vec::len),
                wanted.len(),
                self.cfg.vocab_size
            )));
        } else {
            stack_logits
        };
        // Each sequence's picks are the next consecutive rows of `wanted`: moved, not copied.
        let mut rows = rows.into_iter();
        for (si, picks) in per_seq.iter().enumerate() {
            out.logits[si] = rows.by_ref().take(picks.len()).collect();
        }
        Ok(out)
    }

    /// The layers op by op (backends without a layer stack, or steps too large for it): the
    /// residual streams `[n, hc * h]` built on the host from the embedding and returned after
    /// the last layer.
    fn forward_op_by_op(
        &mut self,
        ids: &[u32],
        rows: &[TokenRow],
        seqs: &[SeqView<'_>],
    ) -> Result<Vec<f32>, EngineError> {
        let n = rows.len();
        let (h, hc) = (self.cfg.hidden_size, self.cfg.hc_mult);
        let eps = self.cfg.rms_norm_eps;
        let embed = self
            .backend
            .gather_rows(&self.weights.embed, ids)
            .map_err(backend_err)?;
        // Residual streams [n, hc, h]: the embedding copied into every stream.
        let mut streams = vec![0f32; n * hc * h];
        streams
            .par_chunks_mut(hc * h)
            .zip(embed.par_chunks(h))
            .for_each(|(dst, e)| dst.chunks_mut(h).for_each(|s| s.copy_from_slice(e)));

        for l in 0..self.cfg.num_hidden_layers {
            let lw = &self.weights.layers[l];
            // Attention site.
            let (mixes, mut x) = self.hc_pre(&streams, &lw.hc_attn, n)?;
            self.host.time(HostPhase::Norms, || {
                rms_norm_rows(&mut x, h, Some(&lw.attn_norm), eps)
            });
            let attn_out = self.attention(l, &x, rows, seqs)?;
            self.host.time(HostPhase::HyperConnections, || {
                hc_post(&mut streams, &mixes, &attn_out, h, hc)
            });
            // FFN site.
            let lw = &self.weights.layers[l];
            let (mixes, mut x) = self.hc_pre(&streams, &lw.hc_ffn, n)?;
            self.host.time(HostPhase::Norms, || {
                rms_norm_rows(&mut x, h, Some(&lw.ffn_norm), eps)
            });
            let ffn_out = self.moe(l, &x, ids)?;
            self.host.time(HostPhase::HyperConnections, || {
                hc_post(&mut streams, &mixes, &ffn_out, h, hc)
            });
            if self.capture_layers.contains(&l) {
                let mean: Vec<f32> = streams
                    .chunks(hc * h)
                    .flat_map(|t| {
                        (0..h).map(move |c| (0..hc).map(|k| t[k * h + c]).sum::<f32>() / hc as f32)
                    })
                    .collect();
                self.captured.push((l, mean));
            }
        }

        Ok(streams)
    }

    /// [`Self::head_logits`] one `Vec` per row, from the backend where it can (the CUDA backend
    /// copies each row once from the device), else split from the flat logits.
    pub fn head_logit_rows(&self, normed: &[f32], m: usize) -> Result<Vec<Vec<f32>>, EngineError> {
        let vocab = self.cfg.vocab_size;
        let own = self
            .backend
            .head_rows(normed, m, &self.weights.head, self.comm.as_ref());
        if let Some(rows) = own {
            let rows = rows.map_err(backend_err)?;
            if rows.len() != m || rows.iter().any(|r| r.len() != vocab) {
                return Err(EngineError::Comm(format!(
                    "the LM head returned {} rows of {} values, expected {m} of {vocab}",
                    rows.len(),
                    rows.first().map_or(0, Vec::len)
                )));
            }
            return Ok(rows);
        }
        let flat = self.head_logits(normed, m)?;
        if m == 1 {
            return Ok(vec![flat]);
        }
        let rows = self.host.time(HostPhase::Logits, || {
            flat.chunks_exact(vocab).map(<[f32]>::to_vec).collect()
        });
        Ok(rows)
    }

    /// Full-vocabulary logits `[m, vocab]` of `m` normed hidden rows through the LM head.
    pub fn head_logits(&self, normed: &[f32], m: usize) -> Result<Vec<f32>, EngineError> {
        let vocab = self.cfg.vocab_size;
        let local = self.linear(normed, m, &self.weights.head)?;
        if self.shard.world_size == 1 {
            return Ok(local);
        }
        // Vocab-parallel head: gather every rank's columns, then re-interleave per row.
        let gathered = self.comm.all_gather(&local).map_err(comm_err)?;
        let vl = vocab / self.shard.world_size;
        if gathered.len() != m * vocab {
            return Err(EngineError::Comm(format!(
                "all_gather of the LM head returned {} values, expected {}",
                gathered.len(),
                m * vocab
            )));
        }
        let mut full = vec![0f32; m * vocab];
        for rk in 0..self.shard.world_size {
            for r in 0..m {
                let src = &gathered[rk * m * vl + r * vl..rk * m * vl + (r + 1) * vl];
                full[r * vocab + rk * vl..r * vocab + (rk + 1) * vl].copy_from_slice(src);
            }
        }
        Ok(full)
    }

    /// Mixing coefficients of a hyper-connection site and the collapsed sub-layer input.
    pub fn hc_pre(
        &self,
        streams: &[f32],
        site: &super::hyper::HyperConnection,
        n: usize,
    ) -> Result<(Vec<HcMix>, Vec<f32>), EngineError> {
        let cfg = &self.cfg;
        let (h, hc) = (cfg.hidden_size, cfg.hc_mult);
        let (mixes, x) = self.host.time(HostPhase::HyperConnections, || {
            let mixes: Vec<HcMix> = site.mix_rows(
                streams,
                n,
                hc,
                cfg.hc_sinkhorn_iters,
                cfg.hc_eps,
                cfg.rms_norm_eps,
            );
            let mut x = vec![0f32; n * h];
            x.par_chunks_mut(h)
                .zip(streams.par_chunks(hc * h))
                .zip(mixes.par_iter())
                .for_each(|((dst, t), m)| dst.copy_from_slice(&collapse(t, &m.pre, h)));
            (mixes, x)
        });
        Ok((mixes, x))
    }

    fn rope_for(&self, kind: AttentionKind) -> &RopeTable {
        match kind {
            AttentionKind::Sliding => &self.rope_main,
            _ => &self.rope_compress,
        }
    }

    /// One attention block over all rows of the step; returns `[n, hidden]` (all-reduced).
    fn attention(
        &mut self,
        l: usize,
        x: &[f32],
        rows: &[TokenRow],
        seqs: &[SeqView<'_>],
    ) -> Result<Vec<f32>, EngineError> {
        let n = rows.len();
        let cfg = &self.cfg;
        let aw: &AttentionWeights<B> = &self.weights.layers[l].attn;
        let kind = cfg.layer_types[l];
        let (hd, eps) = (cfg.head_dim, cfg.rms_norm_eps);
        let rope = self.rope_for(kind).clone();

        let positions: Vec<usize> = rows.iter().map(|r| r.pos).collect();
        // Every projection of the layer input at once (one round trip on a device backend):
        // q LoRA, KV, the compressor's kv/gate, the indexer compressor's kv/gate and the
        // indexer's head weights.
        let mut jobs: Vec<(&[f32], &B::Matrix)> = vec![(x, &aw.wq_a), (x, &aw.wkv)];
        if let Some(cw) = &aw.compressor {
            jobs.extend([(x, &cw.wkv), (x, &cw.wgate)]);
        }
        if let Some(iw) = &aw.indexer {
            jobs.extend([
                (x, &iw.compressor.wkv),
                (x, &iw.compressor.wgate),
                (x, &iw.weights_proj),
            ]);
        }
        let mut projected = self
            .backend
            .linear_many(&jobs, n)
            .map_err(backend_err)?
            .into_iter();
        let mut next = || projected.next().unwrap_or_default();
        let (q_lora, kv_raw) = (next(), next());
        let (ckv, cg) = (next(), next());
        let (ikv, ig, index_weights) = (next(), next(), next());
        let (q_res, q) = self.queries_from_lora(aw, q_lora, &positions, &rope)?;
        let local_heads = q.len() / (n * hd);

        // The single latent KV head, written to each token's window slot.
        let kv = self.kv_from_projection(aw, kv_raw, &positions, &rope);
        let at: Vec<usize> = rows
            .iter()
            .map(|r| self.pool.window_row(seqs[r.seq].recent_table, l, r.pos))
            .collect();
        let latent = self.pool.geometry.latent_format;
        let stored = self
            .host
            .time(HostPhase::AttentionSetup, || latent.stored_rows(&kv, hd));
        self.backend
            .kv_write(&mut self.kv, &at, latent.slots(hd), &stored)
            .map_err(backend_err)?;

        // Compressor (CSA / HCA) and the Lightning Indexer (CSA).
        let ratio = cfg.compress_ratio(l).unwrap_or(0);
        let mut selected: Vec<Vec<usize>> = vec![Vec::new(); n];
        if let Some(cw) = &aw.compressor {
            let coff = if kind == AttentionKind::Csa { 2 } else { 1 };
            let win = Window {
                dim: hd,
                coff,
                ratio,
                indexer: false,
            };
            let mut compression = Compression {
                backend: &self.backend,
                kv: &mut self.kv,
                pool: &self.pool,
                rope: &self.rope_compress,
                eps,
                host: &self.host,
            };
            compression.compress(l, rows, seqs, (&ckv, &cg), cw, win)?;
            if let Some(iw) = &aw.indexer {
                let win = Window {
                    dim: cfg.index_head_dim,
                    coff: 2,
                    ratio,
                    indexer: true,
                };
                compression.compress(l, rows, seqs, (&ikv, &ig), &iw.compressor, win)?;
                selected = self.indexer_select(l, &q_res, index_weights, rows, seqs, ratio)?;
            } else {
                selected = rows
                    .iter()
                    .map(|r| (0..(r.pos + 1) / ratio).collect())
                    .collect();
            }
        }

        // Attention per token: window rows + chosen compressed rows, with the per-head sink.
        let window = cfg.sliding_window;
        let keys = self.host.time(HostPhase::AttentionSetup, || {
            let mut keys = KeyLists::new(latent);
            for (i, row) in rows.iter().enumerate() {
                let (bt, rt) = (seqs[row.seq].block_table, seqs[row.seq].recent_table);
                let lo = (row.pos + 1).saturating_sub(window);
                keys.offsets
                    .extend((lo..=row.pos).map(|p| self.pool.window_row(rt, l, p)));
                keys.offsets
                    .extend(selected[i].iter().map(|&w| self.pool.comp_row(bt, l, w)));
                keys.finish_token();
            }
            keys
        });
        let scale = (hd as f32).powf(-0.5);
        let mut out = self
            .backend
            .kv_attend(&self.kv, &q, local_heads, hd, &keys, &aw.sinks, scale)
            .map_err(backend_err)?;
        // K = V carried RoPE into the output; undo it at the query position.
        self.host.time(HostPhase::AttentionSetup, || {
            out.par_chunks_mut(hd)
                .enumerate()
                .for_each(|(i, oh)| rope.apply(oh, hd, rows[i / local_heads].pos, true));
        });
        self.project_output(aw, &out, n)
    }

    /// Queries of `n` rows: q LoRA (`q_res`, kept for the indexer), per-head unweighted norm,
    /// RoPE at each row's position. Returns `(q_res [n, q_lora_rank], q [n, local_heads * hd])`.
    pub fn project_queries(
        &self,
        aw: &AttentionWeights<B>,
        x: &[f32],
        positions: &[usize],
        rope: &RopeTable,
    ) -> Result<(Vec<f32>, Vec<f32>), EngineError> {
        let q_lora = self.linear(x, positions.len(), &aw.wq_a)?;
        self.queries_from_lora(aw, q_lora, positions, rope)
    }

    /// [`Self::project_queries`] from the q LoRA projection `x wq_a^T`.
    fn queries_from_lora(
        &self,
        aw: &AttentionWeights<B>,
        mut q_res: Vec<f32>,
        positions: &[usize],
        rope: &RopeTable,
    ) -> Result<(Vec<f32>, Vec<f32>), EngineError> {
        let cfg = &self.cfg;
        let (n, hd, eps) = (positions.len(), cfg.head_dim, cfg.rms_norm_eps);
        self.host.time(HostPhase::AttentionSetup, || {
            rms_norm_rows(&mut q_res, cfg.q_lora_rank, Some(&aw.q_norm), eps)
        });
        let mut q = self.linear(&q_res, n, &aw.wq_b)?;
        if n > 0 {
            let local_heads = q.len() / (n * hd);
            self.host.time(HostPhase::AttentionSetup, || {
                // Per head, so one decoding token's 64 heads spread over the cores.
                q.par_chunks_mut(hd).enumerate().for_each(|(i, qh)| {
                    rms_norm_rows(qh, hd, None, eps);
                    rope.apply(qh, hd, positions[i / local_heads], false);
                });
            });
        }
        Ok((q_res, q))
    }

    /// The single latent KV row (K = V) of each input row: `wkv`, `kv_norm`, RoPE.
    pub fn project_kv(
        &self,
        aw: &AttentionWeights<B>,
        x: &[f32],
        positions: &[usize],
        rope: &RopeTable,
    ) -> Result<Vec<f32>, EngineError> {
        let kv = self.linear(x, positions.len(), &aw.wkv)?;
        Ok(self.kv_from_projection(aw, kv, positions, rope))
    }

    /// [`Self::project_kv`] from the projection `x wkv^T`.
    fn kv_from_projection(
        &self,
        aw: &AttentionWeights<B>,
        mut kv: Vec<f32>,
        positions: &[usize],
        rope: &RopeTable,
    ) -> Vec<f32> {
        let (hd, eps) = (self.cfg.head_dim, self.cfg.rms_norm_eps);
        self.host.time(HostPhase::AttentionSetup, || {
            rms_norm_rows(&mut kv, hd, Some(&aw.kv_norm), eps);
            kv.par_chunks_mut(hd)
                .zip(positions.par_iter())
                .for_each(|(k, &pos)| rope.apply(k, hd, pos, false));
        });
        kv
    }

    /// Grouped low-rank output projection of the attention output `[n, local_heads * hd]`
    /// (each local group to o_lora_rank, then mixed); returns `[n, hidden]`, all-reduced.
    pub fn project_output(
        &self,
        aw: &AttentionWeights<B>,
        out: &[f32],
        n: usize,
    ) -> Result<Vec<f32>, EngineError> {
        let cfg = &self.cfg;
        let hd = cfg.head_dim;
        if n == 0 {
            return Ok(Vec::new());
        }
        let local_heads = out.len() / (n * hd);
        let hpg = cfg.num_attention_heads / cfg.o_groups;
        let group_in = hpg * hd;
        let local_groups = aw.wo_a.len();
        let orank = cfg.o_lora_rank;
        let mut grouped = vec![0f32; n * local_groups * orank];
        // Regrouping moves n x heads x head_dim values (a prefill chunk: gigabytes): row copies,
        // groups in parallel.
        let inputs: Vec<Vec<f32>> = (0..local_groups)
            .into_par_iter()
            .map(|g| {
                let mut xg = Vec::with_capacity(n * group_in);
                for r in out.chunks(local_heads * hd) {
                    xg.extend_from_slice(&r[g * group_in..(g + 1) * group_in]);
                }
                xg
            })
            .collect();
        let jobs: Vec<(&[f32], &B::Matrix)> = inputs
            .iter()
            .zip(&aw.wo_a)
            .map(|(xg, wg)| (xg.as_slice(), wg))
            .collect();
        let per_group = self.backend.linear_many(&jobs, n).map_err(backend_err)?;
        grouped
            .par_chunks_mut(local_groups * orank)
            .enumerate()
            .for_each(|(r, dst)| {
                for (g, yg) in per_group.iter().enumerate() {
                    dst[g * orank..(g + 1) * orank]
                        .copy_from_slice(&yg[r * orank..(r + 1) * orank]);
                }
            });
        let mut y = self.linear(&grouped, n, &aw.wo_b)?;
        self.all_reduce(&mut y)?;
        Ok(y)
    }

    /// Lightning Indexer: per token, the top `index_topk` visible compressed rows by
    /// `sum_h w_h * relu(q_h . k)`.
    fn indexer_select(
        &self,
        l: usize,
        q_res: &[f32],
        mut wts: Vec<f32>,
        rows: &[TokenRow],
        seqs: &[SeqView<'_>],
        ratio: usize,
    ) -> Result<Vec<Vec<usize>>, EngineError> {
        let cfg = &self.cfg;
        let n = rows.len();
        let Some(iw) = &self.weights.layers[l].attn.indexer else {
            return Ok(vec![Vec::new(); n]);
        };
        let ihd = cfg.index_head_dim;
        let mut iq = self.linear(q_res, n, &iw.wq_b)?;
        let heads = iq.len() / (n * ihd);
        self.host.time(HostPhase::IndexerTopK, || {
            iq.par_chunks_mut(heads * ihd)
                .zip(rows.par_iter())
                .for_each(|(r, row)| self.rope_compress.apply(r, ihd, row.pos, false));
        });
        let wscale = (cfg.index_n_heads as f32).powf(-0.5);
        wts.iter_mut().for_each(|w| *w *= wscale);
        let sscale = (ihd as f32).powf(-0.5);

        // Every rank holds all the indexer heads, so each selects the same rows on its own.
        let visible: Vec<usize> = rows.iter().map(|r| (r.pos + 1) / ratio).collect();
        let index_rows = IndexerRows {
            format: self.pool.geometry.index_format,
            addressing: self.pool.idx_rows_addressing(l),
            block_tables: rows.iter().map(|r| seqs[r.seq].block_table).collect(),
            visible,
        };
        self.backend
            .kv_indexer_top_k(
                &self.kv,
                &iq,
                &wts,
                heads,
                ihd,
                &index_rows,
                sscale,
                cfg.index_topk,
            )
            .map_err(backend_err)
    }

    /// The MoE block of layer `l` over rows `x` with token ids `ids`; returns `[n, hidden]`
    /// (all-reduced). Stateless, so also usable on its own (component tests).
    pub fn moe(&self, l: usize, x: &[f32], ids: &[u32]) -> Result<Vec<f32>, EngineError> {
        self.moe_block(&self.weights.layers[l].moe, x, ids)
    }

    /// An MoE block with weights `mw` (a target layer's or a DSpark draft stage's).
    pub fn moe_block(
        &self,
        mw: &MoeWeights<B>,
        x: &[f32],
        ids: &[u32],
    ) -> Result<Vec<f32>, EngineError> {
        let cfg = &self.cfg;
        let n = ids.len();
        let e = cfg.n_routed_experts;
        let k = cfg.num_experts_per_tok;
        let logits = self.linear(x, n, &mw.gate)?;
        let routes = self.host.time(HostPhase::Routing, || {
            let scores = router_scores(&logits, cfg.scoring_func);
            route(&scores, e, k, &mw.routing, ids, cfg.routed_scaling_factor)
        });
        let shared = [&mw.shared.w1, &mw.shared.w3, &mw.shared.w2];
        let mut out = self
            .backend
            .moe_experts(&mw.experts, shared, x, n, &routes, cfg.swiglu_limit)
            .map_err(backend_err)?;
        self.all_reduce(&mut out)?;
        Ok(out)
    }
}

pub use crate::backend::cpu::{attend_with_sinks, indexer_score};

/// What the compressors of one layer need of the model: the backend, the pool's storage and
/// geometry, the compressed branches' RoPE (borrowed apart from the layer's weights).
struct Compression<'a, B: Backend> {
    backend: &'a B,
    kv: &'a mut B::KvStore,
    pool: &'a KvPool,
    rope: &'a RopeTable,
    eps: f32,
    host: &'a HostClock,
}

impl<B: Backend> Compression<'_, B> {
    /// Stores this step's compressor inputs (`kv` then `gate` per row, `coff * dim` each) in the
    /// pool and builds every compressed row whose window closes inside the step. Inputs of
    /// positions before the step (the unfinished window, the CSA overlap) are read back from the
    /// pool: at most one window's worth per sequence.
    fn compress(
        &mut self,
        l: usize,
        rows: &[TokenRow],
        seqs: &[SeqView<'_>],
        (kv, gate): (&[f32], &[f32]),
        cw: &CompressorWeights<B>,
        win: Window,
    ) -> Result<(), EngineError> {
        let Window {
            dim,
            coff,
            ratio,
            indexer,
        } = win;
        let (width, eps) = (coff * dim, self.eps);
        let pool = self.pool;
        let input_at = |rt: &[u32], pos: usize| {
            if indexer {
                pool.idx_in_row(rt, l, pos)
            } else {
                pool.comp_in_row(rt, l, pos)
            }
        };
        let mut step_inputs = Vec::with_capacity(rows.len() * 2 * width);
        let mut at = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            step_inputs.extend_from_slice(&kv[i * width..(i + 1) * width]);
            step_inputs.extend_from_slice(&gate[i * width..(i + 1) * width]);
            at.push(input_at(seqs[r.seq].recent_table, r.pos));
        }
        // First position the windows closing in this step read, per sequence.
        let first_read: Vec<usize> = seqs
            .iter()
            .map(|s| {
                let w0 = s.start / ratio;
                if (s.start + s.len) / ratio <= w0 {
                    s.start
                } else if coff == 2 && w0 > 0 {
                    (w0 - 1) * ratio
                } else {
                    w0 * ratio
                }
            })
            .collect();
        let mut earlier_at = Vec::new();
        let mut earlier_first = Vec::with_capacity(seqs.len());
        for (s, &lo) in seqs.iter().zip(&first_read) {
            earlier_first.push(earlier_at.len());
            earlier_at.extend((lo..s.start).map(|p| input_at(s.recent_table, p)));
        }
        let windows: Vec<(usize, usize)> = seqs
            .iter()
            .enumerate()
            .flat_map(|(si, s)| (s.start / ratio..(s.start + s.len) / ratio).map(move |w| (si, w)))
            .collect();
        let new_at: Vec<usize> = windows
            .iter()
            .map(|&(si, w)| {
                let bt = seqs[si].block_table;
                if indexer {
                    pool.idx_row(bt, l, w)
                } else {
                    pool.comp_row(bt, l, w)
                }
            })
            .collect();
        self.backend
            .kv_write(self.kv, &at, 2 * width, &step_inputs)
            .map_err(backend_err)?;
        if windows.is_empty() {
            return Ok(());
        }
        let earlier = if earlier_at.is_empty() {
            Vec::new()
        } else {
            self.backend
                .kv_read(self.kv, &earlier_at, 2 * width)
                .map_err(backend_err)?
        };
        let rope = self.rope;
        let new_rows: Vec<f32> = self.host.time(HostPhase::Compressor, || {
            windows
                .par_iter()
                .flat_map_iter(|&(si, w)| {
                    let s = &seqs[si];
                    let input = |pos: usize| -> &[f32] {
                        let row = if pos >= s.start {
                            &step_inputs[(s.first_row + pos - s.start) * 2 * width..]
                        } else {
                            &earlier[(earlier_first[si] + pos - first_read[si]) * 2 * width..]
                        };
                        &row[..2 * width]
                    };
                    compress_window(input, w, &cw.ape, &cw.norm, win, rope, eps)
                })
                .collect()
        });
        let format = if indexer {
            pool.geometry.index_format
        } else {
            pool.geometry.latent_format
        };
        let stored = self
            .host
            .time(HostPhase::Compressor, || format.stored_rows(&new_rows, dim));
        self.backend
            .kv_write(self.kv, &new_at, format.slots(dim), &stored)
            .map_err(backend_err)
    }
}

/// Router scores from gate logits.
pub fn router_scores(logits: &[f32], func: ScoringFunc) -> Vec<f32> {
    logits
        .iter()
        .map(|&v| match func {
            ScoringFunc::SqrtSoftplus => softplus(v).sqrt(),
            ScoringFunc::Sigmoid => sigmoid(v),
        })
        .collect()
}

/// `(expert, weight)` per token: hash layers take `tid2eid[token]`, the others the top `k` of
/// `score + bias`; weights are the chosen scores renormalised, times `routed_scaling_factor`.
pub fn route(
    scores: &[f32],
    e: usize,
    k: usize,
    routing: &Routing,
    ids: &[u32],
    routed_scaling_factor: f32,
) -> Vec<Vec<(usize, f32)>> {
    ids.iter()
        .enumerate()
        .map(|(t, &id)| {
            let s = &scores[t * e..(t + 1) * e];
            let chosen: Vec<usize> = match routing {
                Routing::Hash(table) => {
                    let id = id as usize;
                    table[id * k..(id + 1) * k]
                        .iter()
                        .map(|&x| x as usize)
                        .collect()
                }
                Routing::TopK(bias) => {
                    let biased: Vec<f32> = s.iter().zip(bias).map(|(a, b)| a + b).collect();
                    top_k_indices(&biased, k)
                }
            };
            let sum: f32 = chosen.iter().map(|&c| s[c]).sum::<f32>() + 1e-20;
            chosen
                .iter()
                .map(|&c| (c, s[c] / sum * routed_scaling_factor))
                .collect()
        })
        .collect()
}

/// Shape of one compressor's windows.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Output row width (`head_dim` or `index_head_dim`).
    pub dim: usize,
    /// 2 for overlapping CSA windows, 1 for HCA.
    pub coff: usize,
    pub ratio: usize,
    /// Whether this is the indexer's compressor (selects the pool regions).
    pub indexer: bool,
}

/// One compressed row: softmax-gated pooling of window `w` (CSA: plus the previous window's
/// first-half channels), RMSNorm, RoPE at position `w * ratio`. `input(pos)` is the token's
/// `kv` then `gate` vector (each `coff * dim` wide).
pub fn compress_window<'a>(
    input: impl Fn(usize) -> &'a [f32],
    w: usize,
    ape: &[f32],
    norm: &[f32],
    win: Window,
    rope: &RopeTable,
    eps: f32,
) -> Vec<f32> {
    let Window {
        dim, coff, ratio, ..
    } = win;
    let width = coff * dim;
    let mut slots = Vec::with_capacity(2 * ratio);
    if coff == 2 && w > 0 {
        // Overlap: the previous window's first-half channels (Ca).
        for i in 0..ratio {
            let v = input((w - 1) * ratio + i);
            slots.push(PoolSlot {
                kv: &v[..dim],
                gate: &v[width..width + dim],
                bias: &ape[i * width..i * width + dim],
            });
        }
    }
    let off = (coff - 1) * dim;
    for i in 0..ratio {
        let v = input(w * ratio + i);
        slots.push(PoolSlot {
            kv: &v[off..off + dim],
            gate: &v[width + off..width + off + dim],
            bias: &ape[i * width + off..i * width + off + dim],
        });
    }
    let mut row = gated_pool(&slots, dim);
    rms_norm_rows(&mut row, dim, Some(norm), eps);
    rope.apply(&mut row, dim, w * ratio, false);
    row
}

/// Applies a site's mixing to every token's streams after its sub-layer.
pub fn hc_post(streams: &mut [f32], mixes: &[HcMix], out: &[f32], h: usize, hc: usize) {
    streams
        .par_chunks_mut(hc * h)
        .zip(mixes.par_iter())
        .zip(out.par_chunks(h))
        .for_each(|((s, m), o)| expand(s, m, o, h));
}

impl<B: Backend> ModelRunner for DeepseekV4<B> {
    fn kv_layout(&self) -> KvLayout {
        KvLayout {
            block_size: self.pool.geometry.block_size,
            num_blocks: self.pool.num_blocks,
            bytes_per_block: self.pool.geometry.bytes_per_block(),
            recent_blocks: self.pool.num_recent,
            bytes_per_recent: self.pool.geometry.bytes_per_recent(),
            recent_reach: self.pool.geometry.recent_reach,
        }
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, EngineError> {
        self.forward(plan)
    }

    fn release(&mut self, _seq_id: u64) {
        // The target keeps nothing outside the pool.
    }

    fn backend_time(&self) -> Vec<crate::engine::OpTime> {
        let mut t = self.backend.op_times();
        t.extend(self.host.times());
        t
    }

    fn fill_blocks_random(
        &mut self,
        blocks: &[u32],
        recent: &[u32],
        seed: u64,
    ) -> Result<bool, EngineError> {
        use rand::{Rng, SeedableRng};
        if let Some(b) = blocks.iter().find(|&&b| b as usize >= self.pool.num_blocks) {
            return Err(EngineError::Invalid(format!(
                "block {b} outside the pool of {} blocks",
                self.pool.num_blocks
            )));
        }
        if let Some(r) = recent.iter().find(|&&r| r as usize >= self.pool.num_recent) {
            return Err(EngineError::Invalid(format!(
                "recent block {r} outside the pool of {} recent blocks",
                self.pool.num_recent
            )));
        }
        // Four distinct random images of each layer's part of each kind of block, cycled; written
        // layer by layer (the pool is layer-major), a few blocks per call to bound the host
        // buffer. Values in [-1, 1), the scale of normed latent rows; rows in a stored format are
        // encoded, so an FP8 pool holds valid records (random bytes would include e4m3 NaNs).
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let g = self.pool.geometry.clone();
        let (hd, ihd) = (self.cfg.head_dim, self.cfg.index_head_dim);
        let latent = Some((g.latent_format, hd));
        let index = Some((g.index_format, ihd));
        let mut random_rows = |out: &mut [f32], format: Option<(KvRowFormat, usize)>| {
            let Some((format, dim)) = format else {
                out.iter_mut()
                    .for_each(|v| *v = rng.random_range(-1.0f32..1.0));
                return;
            };
            let mut row = vec![0f32; dim];
            for stored in out.chunks_exact_mut(format.slots(dim).max(1)) {
                row.iter_mut()
                    .for_each(|v| *v = rng.random_range(-1.0f32..1.0));
                format.encode(&row, stored);
            }
        };
        for (ids, is_recent) in [(blocks, false), (recent, true)] {
            // Per layer: where its parts start in the pool, their length, four images of one.
            let mut parts = Vec::with_capacity(g.layers.len());
            for (l, lay) in g.layers.iter().enumerate() {
                let (start, len) = if is_recent {
                    (self.pool.recent_layer_start(l), lay.recent_len)
                } else {
                    (self.pool.layer_start(l), lay.len)
                };
                let images: Vec<Vec<f32>> = (0..4)
                    .map(|_| {
                        let mut part = vec![0f32; len];
                        if is_recent {
                            random_rows(&mut part[lay.window..lay.comp_in], latent);
                            random_rows(&mut part[lay.comp_in..], None);
                        } else if len > 0 {
                            random_rows(&mut part[lay.comp_rows..lay.idx_rows], latent);
                            random_rows(&mut part[lay.idx_rows..], index);
                        }
                        part
                    })
                    .collect();
                parts.push((start, len, images));
            }
            let per_block: usize = parts.iter().map(|p| p.1).sum();
            let per_call = (256 << 20) / (per_block * 4).max(1);
            for (c, chunk) in ids.chunks(per_call.max(1)).enumerate() {
                for (start, len, images) in parts.iter().filter(|p| p.1 > 0) {
                    let offsets: Vec<usize> =
                        chunk.iter().map(|&b| start + b as usize * len).collect();
                    let rows: Vec<f32> = (0..chunk.len())
                        .flat_map(|i| images[(c + i) % images.len()].iter().copied())
                        .collect();
                    self.backend
                        .kv_write(&mut self.kv, &offsets, *len, &rows)
                        .map_err(backend_err)?;
                }
            }
        }
        Ok(true)
    }
}
