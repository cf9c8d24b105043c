//! Compute backends behind one trait: `cpu` (reference, f32) and `cuda`.
//!
//! The model code (`engine::model`) is written once over [`Backend`]. The trait holds the
//! weight-heavy kernels (projections, routed experts, embedding gathers); the CPU backend
//! implements them in f32 with rayon, the CUDA backend on the GPU with the weights resident in
//! their checkpoint encodings (FP8 block-scaled, FP4 experts). The KV pool lives on the backend
//! too (`kv`): the engine writes rows into it and asks for attention and indexer scores over it,
//! so long-context reads stay on the device. Activations cross the trait as host `f32` rows;
//! norms, RoPE and hyper-connections run on the host (docs/PERFORMANCE.md says what that costs
//! and what moves next).
pub mod cpu;
pub mod cuda;
pub mod kv;

use crate::engine::model::ops::silu;

/// A weight matrix `[rows, cols]` in its checkpoint encoding, for backends that compute on it
/// without widening it first.
#[derive(Debug, Clone, PartialEq)]
pub enum PackedWeight {
    /// e4m3 bytes `[rows, cols]`; one E8M0 scale byte per 128x128 tile,
    /// `[ceil(rows/128), ceil(cols/128)]`.
    Fp8Block { data: Vec<u8>, scales: Vec<u8> },
    /// e2m1 pairs `[rows, cols/2]` (element 2j in the low nibble); one E8M0 scale per 32 values
    /// along a row, `[rows, cols/32]`.
    Fp4 { data: Vec<u8>, scales: Vec<u8> },
}

/// Side of the FP8 scale tile.
pub const FP8_BLOCK: usize = 128;
/// Values per FP4 scale.
pub const FP4_GROUP: usize = 32;

impl PackedWeight {
    /// Whether the byte counts fit `[rows, cols]`.
    pub fn check(&self, rows: usize, cols: usize) -> Result<(), BackendError> {
        let (data_len, scale_len, want_data, want_scales) = match self {
            PackedWeight::Fp8Block { data, scales } => (
                data.len(),
                scales.len(),
                rows * cols,
                rows.div_ceil(FP8_BLOCK) * cols.div_ceil(FP8_BLOCK),
            ),
            PackedWeight::Fp4 { data, scales } => {
                if !cols.is_multiple_of(FP4_GROUP) {
                    return Err(BackendError::Shape {
                        op: "packed_matrix",
                        detail: format!("FP4 columns {cols} not a multiple of {FP4_GROUP}"),
                    });
                }
                (
                    data.len(),
                    scales.len(),
                    rows * cols / 2,
                    rows * cols / FP4_GROUP,
                )
            }
        };
        if data_len != want_data || scale_len != want_scales {
            return Err(BackendError::Shape {
                op: "packed_matrix",
                detail: format!(
                    "{data_len} bytes + {scale_len} scales for [{rows}, {cols}], expected \
                     {want_data} + {want_scales}"
                ),
            });
        }
        Ok(())
    }

    /// The values as f32 (row-major `[rows, cols]`).
    pub fn dequantize(&self, rows: usize, cols: usize) -> Result<Vec<f32>, BackendError> {
        use dspark_kernels::formats::{e2m1_at, e4m3_to_f32, e8m0_to_f64};
        self.check(rows, cols)?;
        let mut out = vec![0f32; rows * cols];
        match self {
            PackedWeight::Fp8Block { data, scales } => {
                let scale_cols = cols.div_ceil(FP8_BLOCK);
                for r in 0..rows {
                    for c in 0..cols {
                        let s = e8m0_to_f64(scales[(r / FP8_BLOCK) * scale_cols + c / FP8_BLOCK]);
                        out[r * cols + c] = (f64::from(e4m3_to_f32(data[r * cols + c])) * s) as f32;
                    }
                }
            }
            PackedWeight::Fp4 { data, scales } => {
                for r in 0..rows {
                    let row = &data[r * cols / 2..(r + 1) * cols / 2];
                    for c in 0..cols {
                        let s = e8m0_to_f64(scales[r * (cols / FP4_GROUP) + c / FP4_GROUP]);
                        out[r * cols + c] = (f64::from(e2m1_at(row, c)) * s) as f32;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Checks the shapes of a [`Backend::kv_attend`] call against a pool of `pool_len` floats.
pub fn check_attend(
    pool_len: usize,
    q: &[f32],
    heads: usize,
    head_dim: usize,
    keys: &kv::KeyLists,
    sinks: &[f32],
) -> Result<(), BackendError> {
    let tokens = keys.tokens();
    if q.len() != tokens * heads * head_dim || sinks.len() != heads {
        return Err(BackendError::Shape {
            op: "kv_attend",
            detail: format!(
                "{} query values and {} sinks for {tokens} tokens x {heads} heads x {head_dim}",
                q.len(),
                sinks.len()
            ),
        });
    }
    keys.format
        .check(head_dim)
        .map_err(|e| BackendError::Shape {
            op: "kv_attend",
            detail: e.to_string(),
        })?;
    check_kv_rows(
        "kv_attend",
        pool_len,
        &keys.offsets,
        keys.format.slots(head_dim),
        None,
    )
}

/// Checks the shapes of a [`Backend::kv_indexer_scores`] call.
pub fn check_indexer(
    pool_len: usize,
    q: &[f32],
    weights: &[f32],
    heads: usize,
    dim: usize,
    rows: &kv::IndexerRows<'_>,
) -> Result<(), BackendError> {
    let tokens = rows.visible.len();
    if q.len() != tokens * heads * dim
        || weights.len() != tokens * heads
        || rows.block_tables.len() != tokens
    {
        return Err(BackendError::Shape {
            op: "kv_indexer_scores",
            detail: format!(
                "{} query values, {} weights, {} block tables for {tokens} tokens x {heads} \
                 heads x {dim}",
                q.len(),
                weights.len(),
                rows.block_tables.len()
            ),
        });
    }
    rows.format.check(dim).map_err(|e| BackendError::Shape {
        op: "kv_indexer_scores",
        detail: e.to_string(),
    })?;
    // Every row a token sees must be covered by its block table and lie inside the pool.
    let a = rows.addressing;
    let row_slots = rows.format.slots(dim);
    if a.ratio == 0 || a.block_size == 0 || row_slots > a.stride {
        return Err(BackendError::Shape {
            op: "kv_indexer_scores",
            detail: format!("row addressing {a:?} for rows of {dim}"),
        });
    }
    for (bt, &vis) in rows.block_tables.iter().zip(&rows.visible) {
        if vis == 0 {
            continue;
        }
        let blocks = ((vis - 1) * a.ratio) / a.block_size + 1;
        let last_row = (a.block_size / a.ratio - 1) * a.stride + row_slots;
        let outside = bt.len() < blocks
            || bt[..blocks]
                .iter()
                .any(|&b| b as usize * a.floats_per_block + a.base + last_row > pool_len);
        if outside {
            return Err(BackendError::Shape {
                op: "kv_indexer_scores",
                detail: format!("{vis} visible rows are not all inside the pool"),
            });
        }
    }
    Ok(())
}

/// Checks that `width`-float rows at `offsets` lie inside a pool of `pool_len` floats.
pub fn check_kv_rows(
    op: &'static str,
    pool_len: usize,
    offsets: &[usize],
    width: usize,
    rows_len: Option<usize>,
) -> Result<(), BackendError> {
    if let Some(len) = rows_len {
        if len != offsets.len() * width {
            return Err(BackendError::Shape {
                op,
                detail: format!("{len} values for {} rows of {width}", offsets.len()),
            });
        }
    }
    if let Some(o) = offsets.iter().find(|&&o| o + width > pool_len) {
        return Err(BackendError::Shape {
            op,
            detail: format!("row at {o} (+{width}) outside the pool of {pool_len} floats"),
        });
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("{0}")]
    Other(String),
}

/// The model as a whole-layer device forward needs it ([`Backend::layer_stack`]): config,
/// weights, pool geometry and RoPE tables, borrowed from the engine's runner.
pub struct StackModel<'a, B: Backend> {
    pub cfg: &'a crate::engine::model::ModelConfig,
    pub weights: &'a crate::engine::model::load::ModelWeights<B>,
    /// The pool's layout (geometry, persistent and recent block counts).
    pub pool: &'a crate::engine::model::kv::KvPool,
    pub rope_main: &'a crate::engine::model::rope::RopeTable,
    pub rope_compress: &'a crate::engine::model::rope::RopeTable,
    pub shard: crate::engine::model::Shard,
}

/// The rows of one step as the layer stack needs them: position, token id and the block and
/// recent tables of each row's sequence (rows of one sequence share them).
pub struct StackRows<'a> {
    pub positions: Vec<usize>,
    pub ids: Vec<u32>,
    pub block_tables: Vec<&'a [u32]>,
    pub recent_tables: Vec<&'a [u32]>,
}

/// The residual streams of a layer-stack step: built by the backend from the embedding rows of
/// the step's token ids (every one of the `hc` streams a copy) and kept on the device; after the
/// last layer the step rows `keep` come back into `kept` (`[keep.len(), hc * hidden]`, in
/// `keep`'s order).
///
/// Where `logits` is given, a backend may instead run the model's head on the device inside the
/// step (the final hyper-connection collapse, the model norm and the LM head, gathered over the
/// ranks) and put the `keep` rows' full-vocabulary logits there, in `keep`'s order; it then
/// leaves `kept` as it was. A backend that does not leaves `logits` empty.
pub struct StackStreams<'a> {
    pub keep: &'a [usize],
    pub kept: &'a mut [f32],
    pub logits: Option<&'a mut Vec<Vec<f32>>>,
}

/// A compute device holding weight matrices and running the kernels the model needs.
pub trait Backend: Send + Sync + 'static {
    /// A weight matrix `[rows, cols]` (row-major, `rows` = output features) resident on the
    /// device.
    type Matrix: Send + Sync;

    /// The routed experts of one MoE layer as the backend keeps them (one grouped kernel per
    /// layer on the GPU).
    type ExpertBank: Send + Sync;

    /// The KV pool storage: a flat array of f32 on the device (layout: `engine::model::kv`).
    type KvStore: Send + Sync;

    /// Device-resident copies of what the whole-layer forward needs beyond the matrices (norm
    /// weights, hyper-connection parameters, routing tables, scratch buffers).
    type LayerStack: Send + Sync;

    fn name(&self) -> &'static str;

    /// Prepares the whole-layer device forward (every layer of a step on the device, the
    /// residual streams never leaving it), or `None` where the backend has none or does not take
    /// this model's encodings; the engine then runs layers op by op.
    fn layer_stack(
        &self,
        _model: &StackModel<'_, Self>,
    ) -> Result<Option<Self::LayerStack>, BackendError>
    where
        Self: Sized,
    {
        Ok(None)
    }

    /// Whether the layer stack may capture its steps as CUDA graphs (vLLM's `--enforce-eager`
    /// turns it off); a no-op where there are none.
    fn set_layer_stack_graphs(&self, _stack: &mut Self::LayerStack, _on: bool)
    where
        Self: Sized,
    {
    }

    /// Most rows of a step the layer stack takes (0: none; larger steps run op by op).
    fn layer_stack_max_rows(&self) -> usize {
        0
    }

    /// Runs every layer over the step's residual streams ([`StackStreams`]) with the layer
    /// stack; returns `(layer, mean of the streams [rows, hidden])` after each layer
    /// of `capture`. Same results as the op-by-op forward to f32 rounding.
    #[allow(clippy::too_many_arguments)]
    fn run_layer_stack(
        &self,
        _stack: &mut Self::LayerStack,
        _model: &StackModel<'_, Self>,
        _kv: &mut Self::KvStore,
        _comm: &dyn crate::ranks::Communicator,
        _rows: &StackRows<'_>,
        _streams: StackStreams<'_>,
        _capture: &[usize],
    ) -> Result<Vec<(usize, Vec<f32>)>, BackendError>
    where
        Self: Sized,
    {
        Err(BackendError::Other(format!(
            "the {} backend has no layer stack",
            self.name()
        )))
    }

    /// `(free, total)` bytes of the device's memory, where the backend has its own (GPU).
    fn memory_info(&self) -> Option<(usize, usize)> {
        None
    }

    /// The scheduler's token budget of one step (`--max-num-batched-tokens`), told before the
    /// layer stack is built so its per-step buffers can be sized for it (the CUDA backend's
    /// prefill pieces, [`crate::engine::model::step_piece_tokens`]).
    fn set_step_tokens(&self, _tokens: usize) {}

    /// The top `k` rows of each token by Lightning Indexer score ([`Self::kv_indexer_scores`]),
    /// value descending with ties to the lower row, as `engine::model::ops::top_k_indices`. For
    /// one rank only: with tensor parallelism the scores are summed over ranks first.
    #[allow(clippy::too_many_arguments)]
    fn kv_indexer_top_k(
        &self,
        store: &Self::KvStore,
        q: &[f32],
        weights: &[f32],
        heads: usize,
        dim: usize,
        rows: &kv::IndexerRows<'_>,
        scale: f32,
        k: usize,
    ) -> Result<Vec<Vec<usize>>, BackendError> {
        let scores = self.kv_indexer_scores(store, q, weights, heads, dim, rows, scale)?;
        let (starts, _) = rows.score_starts();
        Ok(starts
            .iter()
            .zip(&rows.visible)
            .map(|(&from, &vis)| {
                crate::engine::model::ops::top_k_indices(&scores[from..from + vis], k)
            })
            .collect())
    }

    /// A zeroed pool of `floats` 4-byte slots.
    fn kv_store(&self, floats: usize) -> Result<Self::KvStore, BackendError>;

    /// Writes row `r` of `rows` (`width` slots each, as f32 bit patterns) at pool offset
    /// `offsets[r]`, unchanged: a row in a stored format is encoded by the caller
    /// ([`kv::KvRowFormat::stored_rows`]).
    fn kv_write(
        &self,
        store: &mut Self::KvStore,
        offsets: &[usize],
        width: usize,
        rows: &[f32],
    ) -> Result<(), BackendError>;

    /// Reads `width` slots at each offset, concatenated, unchanged.
    fn kv_read(
        &self,
        store: &Self::KvStore,
        offsets: &[usize],
        width: usize,
    ) -> Result<Vec<f32>, BackendError>;

    /// Softmax attention of each token's `heads` query heads (`q`: `[tokens, heads, head_dim]`)
    /// over its key rows in the pool (K = V, stored in `keys.format`, decoded to f32), with a
    /// per-head sink logit in the denominator:
    /// `out[t, h] = sum_k p_k row_k`, `p = softmax([q.k * scale..., sink_h])` without the sink's
    /// value. Returns `[tokens, heads, head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn kv_attend(
        &self,
        store: &Self::KvStore,
        q: &[f32],
        heads: usize,
        head_dim: usize,
        keys: &kv::KeyLists,
        sinks: &[f32],
        scale: f32,
    ) -> Result<Vec<f32>, BackendError>;

    /// Lightning Indexer scores `sum_h w[t, h] * relu(q[t, h] . k_r) * scale` of each token's
    /// visible compressed rows (`q`: `[tokens, heads, dim]`, `weights`: `[tokens, heads]`),
    /// token after token.
    #[allow(clippy::too_many_arguments)]
    fn kv_indexer_scores(
        &self,
        store: &Self::KvStore,
        q: &[f32],
        weights: &[f32],
        heads: usize,
        dim: usize,
        rows: &kv::IndexerRows<'_>,
        scale: f32,
    ) -> Result<Vec<f32>, BackendError>;

    /// Moves a dense f32 matrix to the device.
    fn matrix(
        &self,
        rows: usize,
        cols: usize,
        data: Vec<f32>,
    ) -> Result<Self::Matrix, BackendError>;

    /// `(rows, cols)` of a matrix.
    fn shape(&self, m: &Self::Matrix) -> (usize, usize);

    /// `y[r, o] = sum_i x[r, i] * w[o, i]` for `x` of `n` rows. On the CPU each output element
    /// is computed with a fixed summation order independent of `n`, so a row's result does not
    /// depend on what else is in the batch; device backends may pick kernels by `n` (the CUDA
    /// backend: docs/CUDA.md), which keeps f32 accuracy but not the summation order.
    fn linear(&self, x: &[f32], n: usize, w: &Self::Matrix) -> Result<Vec<f32>, BackendError>;

    /// The LM head's logits of `n` normed rows, one `Vec` per row: [`Self::linear`] at world
    /// size 1; at more ranks `w` is this rank's slice of the vocabulary and every rank's columns
    /// are gathered and interleaved (rank `r`'s at `r * rows` of each row). `None` where the
    /// backend has no better way than the engine's (`linear`, the communicator's host gather,
    /// then a copy per row).
    fn head_rows(
        &self,
        _x: &[f32],
        _n: usize,
        _w: &Self::Matrix,
        _comm: &dyn crate::ranks::Communicator,
    ) -> Option<Result<Vec<Vec<f32>>, BackendError>> {
        None
    }

    /// Several independent projections of `n` rows each, `y_k = x_k W_k^T`: one round trip on
    /// a device backend. Results are those of [`Self::linear`] one by one.
    fn linear_many(
        &self,
        jobs: &[(&[f32], &Self::Matrix)],
        n: usize,
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        jobs.iter().map(|(x, w)| self.linear(x, n, w)).collect()
    }

    /// Rows `ids` of `w`, concatenated (embedding lookup).
    fn gather_rows(&self, w: &Self::Matrix, ids: &[u32]) -> Result<Vec<f32>, BackendError>;

    /// Cumulative calls and wall time per kind of operation (device backends).
    fn op_times(&self) -> Vec<crate::engine::OpTime> {
        Vec::new()
    }

    /// Whether the loader should hand quantized tensors over packed ([`Self::packed_matrix`])
    /// instead of widened to f32.
    fn accepts_packed(&self) -> bool {
        false
    }

    /// A weight in its checkpoint encoding. By default widened to f32.
    fn packed_matrix(
        &self,
        rows: usize,
        cols: usize,
        w: PackedWeight,
    ) -> Result<Self::Matrix, BackendError> {
        let data = w.dequantize(rows, cols)?;
        self.matrix(rows, cols, data)
    }

    /// Takes a layer's routed experts, `[w1, w3, w2]` each, in expert-id order.
    fn expert_bank(
        &self,
        experts: Vec<[Self::Matrix; 3]>,
    ) -> Result<Self::ExpertBank, BackendError>;

    /// The routed experts' sum for `n` rows of `x`:
    /// `out[t] = sum over (e, w) in routes[t] of w * swiglu_expert_e(x[t])`.
    fn routed_experts(
        &self,
        bank: &Self::ExpertBank,
        x: &[f32],
        n: usize,
        routes: &[Vec<(usize, f32)>],
        limit: f32,
    ) -> Result<Vec<f32>, BackendError>;

    /// An MoE block's experts: the routed experts' sum plus the shared expert, `routed + shared`
    /// (one round trip on a device backend).
    #[allow(clippy::too_many_arguments)]
    fn moe_experts(
        &self,
        bank: &Self::ExpertBank,
        shared: [&Self::Matrix; 3],
        x: &[f32],
        n: usize,
        routes: &[Vec<(usize, f32)>],
        limit: f32,
    ) -> Result<Vec<f32>, BackendError> {
        routed_plus_shared(self, bank, shared, x, n, routes, limit)
    }

    /// One SwiGLU expert with clipping over `n` rows of `x`:
    /// `w2(silu(min(w1 x, limit)) * clamp(w3 x, -limit, limit))`.
    fn swiglu_expert(
        &self,
        x: &[f32],
        n: usize,
        w1: &Self::Matrix,
        w3: &Self::Matrix,
        w2: &Self::Matrix,
        limit: f32,
    ) -> Result<Vec<f32>, BackendError> {
        swiglu_by_projections(self, x, n, [w1, w3, w2], limit)
    }
}

/// [`Backend::swiglu_expert`] as three projections (gate and up together) around the clipped
/// SwiGLU on the host.
pub fn swiglu_by_projections<B: Backend + ?Sized>(
    backend: &B,
    x: &[f32],
    n: usize,
    [w1, w3, w2]: [&B::Matrix; 3],
    limit: f32,
) -> Result<Vec<f32>, BackendError> {
    let mut gate_up = backend.linear_many(&[(x, w1), (x, w3)], n)?.into_iter();
    let (gate, up) = (
        gate_up.next().unwrap_or_default(),
        gate_up.next().unwrap_or_default(),
    );
    let act: Vec<f32> = gate
        .iter()
        .zip(&up)
        .map(|(&g, &u)| silu(g.min(limit)) * u.clamp(-limit, limit))
        .collect();
    backend.linear(&act, n, w2)
}

/// [`Backend::moe_experts`] as two calls: the routed experts, then the shared expert, summed on
/// the host (the default, and the CUDA backend's path for banks its fused call does not take).
#[allow(clippy::too_many_arguments)]
pub fn routed_plus_shared<B: Backend + ?Sized>(
    backend: &B,
    bank: &B::ExpertBank,
    [w1, w3, w2]: [&B::Matrix; 3],
    x: &[f32],
    n: usize,
    routes: &[Vec<(usize, f32)>],
    limit: f32,
) -> Result<Vec<f32>, BackendError> {
    let mut out = backend.routed_experts(bank, x, n, routes, limit)?;
    let shared = backend.swiglu_expert(x, n, w1, w3, w2, limit)?;
    out.iter_mut().zip(&shared).for_each(|(o, s)| *o += s);
    Ok(out)
}

/// [`Backend::routed_experts`] one expert at a time, in ascending expert id (the order the
/// reference accumulates in): each expert runs once over the rows routed to it.
pub fn routed_experts_one_by_one<B: Backend + ?Sized>(
    backend: &B,
    experts: &[[B::Matrix; 3]],
    x: &[f32],
    n: usize,
    routes: &[Vec<(usize, f32)>],
    limit: f32,
) -> Result<Vec<f32>, BackendError> {
    let h = x.len().checked_div(n).unwrap_or(0);
    if x.len() != n * h || routes.len() != n {
        return Err(BackendError::Shape {
            op: "routed_experts",
            detail: format!(
                "{} values and {} routes for {n} rows",
                x.len(),
                routes.len()
            ),
        });
    }
    let mut out = vec![0f32; n * h];
    for (ei, [w1, w3, w2]) in experts.iter().enumerate() {
        let mut toks = Vec::new();
        let mut wts = Vec::new();
        for (t, r) in routes.iter().enumerate() {
            for &(c, w) in r {
                if c == ei {
                    toks.push(t);
                    wts.push(w);
                }
            }
        }
        if toks.is_empty() {
            continue;
        }
        let xs: Vec<f32> = toks
            .iter()
            .flat_map(|&t| x[t * h..(t + 1) * h].iter().copied())
            .collect();
        let y = backend.swiglu_expert(&xs, toks.len(), w1, w3, w2, limit)?;
        for (j, (&t, &w)) in toks.iter().zip(&wts).enumerate() {
            for (o, v) in out[t * h..(t + 1) * h]
                .iter_mut()
                .zip(&y[j * h..(j + 1) * h])
            {
                *o += v * w;
            }
        }
    }
    Ok(out)
}
