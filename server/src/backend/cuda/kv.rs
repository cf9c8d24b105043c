//! The KV pool in GPU memory and the kernels that read it: row scatter/gather, split-KV
//! attention with sinks, Lightning Indexer scores. Long-context reads (the indexer scans every
//! compressed row of a CSA layer, HCA attends over all of its rows) stay on the GPU; only the
//! step's new rows go up and the attention output / indexer scores come back.

use std::sync::atomic::Ordering;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use dspark_kernels::{
    attention_splits, attention_workspace_floats, topk_select_workspace_bytes, IndexerScores,
    KvRows, PagedAttention, TopKSelect,
};

use super::{kernel_err, CudaBackend, STACK_MAX_ROWS};
use crate::backend::kv::{IndexerRows, KeyLists};
use crate::backend::{check_attend, check_indexer, check_kv_rows, BackendError};

/// The pool: `len` f32 in one device allocation.
pub struct CudaKvStore {
    pub(super) data: CudaSlice<f32>,
    pub(super) len: usize,
}

fn i32s(op: &'static str, v: impl IntoIterator<Item = usize>) -> Result<Vec<i32>, BackendError> {
    v.into_iter()
        .map(|x| {
            i32::try_from(x).map_err(|_| BackendError::Shape {
                op,
                detail: format!("{x} exceeds i32"),
            })
        })
        .collect()
}

fn i64s(v: &[usize]) -> Vec<i64> {
    // Pool offsets are below the pool length, itself an allocation size: always fits i64.
    v.iter().map(|&x| x as i64).collect()
}

/// Visible rows from which the Lightning Indexer scores on TF32 tensor cores (where TF32 is on,
/// [`CudaBackend::set_gemm_tf32`]): long scans, where the f32 kernel is a decode step's largest
/// stage (~0.6 ms a CSA layer at 1M context on an H200). Shorter scans of decode-sized steps
/// (below 64K tokens of context) keep exact f32 scores, so their top-k picks exactly the rows the
/// CPU reference picks; prefill chunks take the tensor cores at any length (see
/// [`CudaBackend::indexer_tensor_cores`]).
pub const INDEXER_TENSOR_CORE_MIN_ROWS: usize = 16_384;

/// f32 elements of the indexer top-k's workspace for `tokens` rows seeing at most `max_visible`
/// (the two-stage select's candidates; none for short lists).
pub(super) fn topk_work_floats(tokens: usize, max_visible: usize, k: usize) -> usize {
    topk_select_workspace_bytes(tokens, max_visible, k).div_ceil(4)
}

impl CudaBackend {
    /// Whether an indexer scan of `tokens` tokens seeing up to `max_visible` rows takes the TF32
    /// tensor-core kernel: long scans, and every step of more than [`STACK_MAX_ROWS`] tokens (a
    /// prefill chunk, whose GEMMs are on TF32 already). Measured on H200 (8 layers, 32K prompt):
    /// the f32 tiled kernel scored the first chunks at about 20 TFLOPS.
    pub(super) fn indexer_tensor_cores(&self, max_visible: usize, tokens: usize) -> bool {
        self.gemm_tf32.load(Ordering::Relaxed)
            && (max_visible >= INDEXER_TENSOR_CORE_MIN_ROWS || tokens > STACK_MAX_ROWS)
    }

    pub(super) fn kv_alloc(&self, floats: usize) -> Result<CudaKvStore, BackendError> {
        let data = self.zeros(floats).map_err(|e| {
            BackendError::Other(format!(
                "KV pool of {:.2} GB on {}: {e} (lower --kv-pool-tokens)",
                floats as f64 * 4e-9,
                self.device_name
            ))
        })?;
        Ok(CudaKvStore { data, len: floats })
    }

    pub(super) fn kv_scatter(
        &self,
        store: &mut CudaKvStore,
        offsets: &[usize],
        width: usize,
        rows: &[f32],
    ) -> Result<(), BackendError> {
        check_kv_rows("kv_write", store.len, offsets, width, Some(rows.len()))?;
        if offsets.is_empty() || width == 0 {
            return Ok(());
        }
        let s = &self.stream;
        let off = self.upload(&i64s(offsets))?;
        let dense = self.upload(rows)?;
        let (pool, _p) = store.data.device_ptr_mut(s);
        let (op, _o) = off.device_ptr(s);
        let (dp, _d) = dense.device_ptr(s);
        let call = KvRows {
            pool,
            offsets: op,
            dense: dp,
            rows: offsets.len(),
            width,
        };
        // SAFETY: `off` holds one i64 per row, `dense` rows * width f32, and every offset + width
        // was checked to lie inside the pool.
        unsafe { self.kernels.kv_scatter(s, &call) }.map_err(kernel_err)
    }

    pub(super) fn kv_gather(
        &self,
        store: &CudaKvStore,
        offsets: &[usize],
        width: usize,
    ) -> Result<Vec<f32>, BackendError> {
        check_kv_rows("kv_read", store.len, offsets, width, None)?;
        if offsets.is_empty() || width == 0 {
            return Ok(Vec::new());
        }
        let s = &self.stream;
        let off = self.upload(&i64s(offsets))?;
        let mut dense = self.zeros(offsets.len() * width)?;
        {
            let (pool, _p) = store.data.device_ptr(s);
            let (op, _o) = off.device_ptr(s);
            let (dp, _d) = dense.device_ptr_mut(s);
            let call = KvRows {
                pool,
                offsets: op,
                dense: dp,
                rows: offsets.len(),
                width,
            };
            // SAFETY: as in `kv_scatter`, with `dense` the destination.
            unsafe { self.kernels.kv_gather(s, &call) }.map_err(kernel_err)?;
        }
        self.download(&dense)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend(
        &self,
        store: &CudaKvStore,
        q: &[f32],
        heads: usize,
        head_dim: usize,
        keys: &KeyLists,
        sinks: &[f32],
        scale: f32,
    ) -> Result<Vec<f32>, BackendError> {
        check_attend(store.len, q, heads, head_dim, keys, sinks)?;
        let tokens = keys.tokens();
        if tokens == 0 || heads == 0 || head_dim == 0 {
            return Ok(vec![0f32; q.len()]);
        }
        let s = &self.stream;
        let splits = attention_splits(
            keys.max_len(),
            tokens,
            heads,
            self.kernels.multiprocessors(),
        );
        let qd = self.upload(q)?;
        // An empty key list still needs a valid pointer.
        let off = self.upload(&i64s(if keys.offsets.is_empty() {
            &[0]
        } else {
            &keys.offsets
        }))?;
        let starts = self.upload(&i32s("kv_attend", keys.starts.iter().copied())?)?;
        let sk = self.upload(sinks)?;
        let mut out = self.zeros(q.len())?;
        let mut work = self.zeros(attention_workspace_floats(tokens, heads, head_dim, splits))?;
        {
            let (pool, _p) = store.data.device_ptr(s);
            let (qp, _q) = qd.device_ptr(s);
            let (op, _o) = off.device_ptr(s);
            let (sp, _s) = starts.device_ptr(s);
            let (kp, _k) = sk.device_ptr(s);
            let (outp, _out) = out.device_ptr_mut(s);
            let (wp, _w) = work.device_ptr_mut(s);
            let call = PagedAttention {
                pool,
                q: qp,
                key_offsets: op,
                key_starts: sp,
                sinks: kp,
                out: outp,
                workspace: wp,
                tokens,
                heads,
                head_dim,
                splits,
                scale,
                format: keys.format,
                inverse_rope: None,
                query_norm_eps: None,
                separate_merge: false,
                out_f16: false,
            };
            // SAFETY: q and out hold tokens * heads * head_dim f32, starts tokens + 1 i32 indexing
            // into `off`, sinks `heads` f32, the workspace the size the launch asks for, and
            // every key offset + the row's slots in `keys.format` was checked to lie inside the
            // pool.
            unsafe { self.kernels.paged_attention(s, &call) }.map_err(kernel_err)?;
        }
        self.download(&out)
    }

    /// Indexer scores left on the GPU (`None` when no token sees a row).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn indexer_on(
        &self,
        store: &CudaKvStore,
        q: &[f32],
        weights: &[f32],
        heads: usize,
        dim: usize,
        rows: &IndexerRows<'_>,
        scale: f32,
    ) -> Result<Option<CudaSlice<f32>>, BackendError> {
        check_indexer(store.len, q, weights, heads, dim, rows)?;
        let (out_starts, total) = rows.score_starts();
        let tokens = rows.visible.len();
        if total == 0 {
            return Ok(None);
        }
        // Tokens of one sequence share its block table: upload each table once.
        let mut tables: Vec<u32> = Vec::new();
        let mut table_starts = Vec::with_capacity(tokens);
        let mut last: Option<(*const u32, usize, usize)> = None;
        for bt in &rows.block_tables {
            let key = (bt.as_ptr(), bt.len());
            match last {
                Some((p, l, at)) if (p, l) == key => table_starts.push(at),
                _ => {
                    table_starts.push(tables.len());
                    last = Some((key.0, key.1, tables.len()));
                    tables.extend_from_slice(bt);
                }
            }
        }
        if tables.is_empty() {
            tables.push(0);
        }
        let s = &self.stream;
        let qd = self.upload(q)?;
        let wd = self.upload(weights)?;
        let bt = self.upload(&tables)?;
        let bts = self.upload(&i32s("kv_indexer_scores", table_starts)?)?;
        let vis = self.upload(&i32s("kv_indexer_scores", rows.visible.iter().copied())?)?;
        let os = self.upload(&i64s(&out_starts))?;
        let mut out = self.zeros(total)?;
        {
            let a = rows.addressing;
            let (pool, _p) = store.data.device_ptr(s);
            let (qp, _q) = qd.device_ptr(s);
            let (wp, _w) = wd.device_ptr(s);
            let (btp, _b) = bt.device_ptr(s);
            let (btsp, _bs) = bts.device_ptr(s);
            let (vp, _v) = vis.device_ptr(s);
            let (osp, _os) = os.device_ptr(s);
            let (outp, _out) = out.device_ptr_mut(s);
            let call = IndexerScores {
                pool,
                q: qp,
                weights: wp,
                block_tables: btp,
                block_table_starts: btsp,
                visible: vp,
                row_starts: 0,
                out_starts: osp,
                out: outp,
                tokens,
                max_visible: rows.visible.iter().copied().max().unwrap_or(0),
                floats_per_block: a.floats_per_block,
                block_size: a.block_size,
                base: a.base,
                ratio: a.ratio,
                stride: a.stride,
                heads,
                dim,
                scale,
                format: rows.format,
                tensor_cores: self
                    .indexer_tensor_cores(rows.visible.iter().copied().max().unwrap_or(0), tokens),
            };
            // SAFETY: q holds tokens * heads * dim f32, weights tokens * heads, the tables and
            // their starts cover every visible row (checked against the pool by check_indexer),
            // out holds the sum of visible rows.
            unsafe { self.kernels.indexer_scores(s, &call) }.map_err(kernel_err)?;
        }
        Ok(Some(out))
    }

    /// Indexer scores and their per-token top `k` on the GPU; only the chosen rows come back.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn indexer_top_k(
        &self,
        store: &CudaKvStore,
        q: &[f32],
        weights: &[f32],
        heads: usize,
        dim: usize,
        rows: &IndexerRows<'_>,
        scale: f32,
        k: usize,
    ) -> Result<Vec<Vec<usize>>, BackendError> {
        let tokens = rows.visible.len();
        let Some(scores) = self.indexer_on(store, q, weights, heads, dim, rows, scale)? else {
            return Ok(vec![Vec::new(); tokens]);
        };
        if k == 0 {
            return Ok(vec![Vec::new(); tokens]);
        }
        let s = &self.stream;
        let (starts, _) = rows.score_starts();
        let starts_d = self.upload(&i64s(&starts))?;
        let counts_d = self.upload(&i32s("kv_indexer_top_k", rows.visible.iter().copied())?)?;
        let mut idx = self
            .stream
            .alloc_zeros::<i32>(tokens * k)
            .map_err(super::driver_err("alloc"))?;
        let mut val = self.zeros(tokens * k)?;
        let max_count = rows.visible.iter().copied().max().unwrap_or(0);
        let mut work = self.zeros(topk_work_floats(tokens, max_count, k))?;
        {
            let (sp, _s) = scores.device_ptr(s);
            let (stp, _st) = starts_d.device_ptr(s);
            let (cp, _c) = counts_d.device_ptr(s);
            let (ip, _i) = idx.device_ptr_mut(s);
            let (vp, _v) = val.device_ptr_mut(s);
            let (wp, _w) = work.device_ptr_mut(s);
            let call = TopKSelect {
                scores: sp,
                starts: stp,
                counts: cp,
                tokens,
                k,
                out_idx: ip,
                out_val: vp,
                max_count,
                workspace: wp,
                index_base: 0,
                index_order: false,
                rounds_only: false,
            };
            // SAFETY: each token's scores lie at starts[t] .. + counts[t] inside `scores` (their
            // sum is its length); idx and val hold tokens * k; max_count is the largest count
            // and `work` holds the workspace for it.
            unsafe { self.kernels.topk_select(s, &call) }.map_err(kernel_err)?;
        }
        let idx = s
            .clone_dtoh(&idx)
            .map_err(super::driver_err("copy from GPU"))?;
        let val = self.download(&val)?;
        // The kernel writes the chosen rows in row order; order them as top_k_indices does
        // (value descending, ties to the lower row).
        Ok((0..tokens)
            .map(|t| {
                let m = k.min(rows.visible[t]);
                let mut chosen: Vec<(f32, usize)> = (0..m)
                    .map(|j| (val[t * k + j], idx[t * k + j] as usize))
                    .collect();
                chosen.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                chosen.into_iter().map(|(_, i)| i).collect()
            })
            .collect())
    }
}
