//! CPU backend: the f32 reference every other backend is checked against.

use super::kv::{IndexerRows, KeyLists, KvRowFormat};
use super::{check_attend, check_indexer, check_kv_rows, Backend, BackendError};
use rayon::prelude::*;

/// Dense row-major f32 matrix in host memory.
#[derive(Debug, Clone)]
pub struct CpuMatrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl CpuMatrix {
    pub fn data(&self) -> &[f32] {
        &self.data
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

/// Dot product with eight independent accumulators: vectorises well and has a fixed order.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for i in chunks * 8..n {
        tail += a[i] * b[i];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Lightning Indexer score of one key row: `sum_h w_h * relu(q_h . k) * scale` over the heads
/// in `q` (`[heads, k.len()]`), `w` already scaled by `index_n_heads^-0.5`.
pub fn indexer_score(q: &[f32], w: &[f32], k: &[f32], scale: f32) -> f32 {
    q.chunks(k.len())
        .zip(w)
        .map(|(qh, wh)| (dot(qh, k).max(0.0) * scale) * wh)
        .sum()
}

/// Softmax attention of one token's heads `q` (`[heads, hd]`) over `keys` (K = V), with a
/// per-head sink logit in the denominator; adds the result into `out` (`[heads, hd]`).
pub fn attend_with_sinks(q: &[f32], keys: &[&[f32]], sinks: &[f32], scale: f32, out: &mut [f32]) {
    let Some(hd) = keys.first().map(|k| k.len()) else {
        return;
    };
    let mut logits = vec![0f32; keys.len()];
    for (hh, (qh, oh)) in q.chunks(hd).zip(out.chunks_mut(hd)).enumerate() {
        let mut max = sinks[hh];
        for (lg, k) in logits.iter_mut().zip(keys) {
            *lg = dot(qh, k) * scale;
            max = max.max(*lg);
        }
        let mut denom = (sinks[hh] - max).exp();
        for lg in logits.iter_mut() {
            *lg = (*lg - max).exp();
            denom += *lg;
        }
        for (lg, k) in logits.iter().zip(keys) {
            let p = lg / denom;
            for (a, b) in oh.iter_mut().zip(k.iter()) {
                *a += p * b;
            }
        }
    }
}

/// A stored row as f32 values.
fn decode_row(format: KvRowFormat, slots: &[f32], dim: usize) -> Vec<f32> {
    let mut row = vec![0f32; dim];
    format.decode(slots, &mut row);
    row
}

impl Backend for CpuBackend {
    type Matrix = CpuMatrix;
    type ExpertBank = Vec<[CpuMatrix; 3]>;
    type KvStore = Vec<f32>;
    /// The CPU runs layers op by op.
    type LayerStack = ();

    fn kv_store(&self, floats: usize) -> Result<Vec<f32>, BackendError> {
        Ok(vec![0f32; floats])
    }

    fn kv_write(
        &self,
        store: &mut Vec<f32>,
        offsets: &[usize],
        width: usize,
        rows: &[f32],
    ) -> Result<(), BackendError> {
        check_kv_rows("kv_write", store.len(), offsets, width, Some(rows.len()))?;
        for (&o, row) in offsets.iter().zip(rows.chunks(width.max(1))) {
            store[o..o + width].copy_from_slice(row);
        }
        Ok(())
    }

    fn kv_read(
        &self,
        store: &Vec<f32>,
        offsets: &[usize],
        width: usize,
    ) -> Result<Vec<f32>, BackendError> {
        check_kv_rows("kv_read", store.len(), offsets, width, None)?;
        Ok(offsets
            .iter()
            .flat_map(|&o| store[o..o + width].iter().copied())
            .collect())
    }

    fn kv_attend(
        &self,
        store: &Vec<f32>,
        q: &[f32],
        heads: usize,
        head_dim: usize,
        keys: &KeyLists,
        sinks: &[f32],
        scale: f32,
    ) -> Result<Vec<f32>, BackendError> {
        check_attend(store.len(), q, heads, head_dim, keys, sinks)?;
        let mut out = vec![0f32; q.len()];
        // Parallel over tokens and, inside a token, over heads: a single decoding sequence at
        // long context still uses every core.
        let format = keys.format;
        let slots = format.slots(head_dim);
        out.par_chunks_mut(heads * head_dim)
            .enumerate()
            .for_each(|(t, o)| {
                let decoded: Vec<Vec<f32>> = match format {
                    KvRowFormat::F32 => Vec::new(),
                    _ => keys
                        .of(t)
                        .iter()
                        .map(|&at| decode_row(format, &store[at..at + slots], head_dim))
                        .collect(),
                };
                let rows: Vec<&[f32]> = match format {
                    KvRowFormat::F32 => keys
                        .of(t)
                        .iter()
                        .map(|&at| &store[at..at + head_dim])
                        .collect(),
                    _ => decoded.iter().map(Vec::as_slice).collect(),
                };
                let qt = &q[t * heads * head_dim..(t + 1) * heads * head_dim];
                o.par_chunks_mut(head_dim).enumerate().for_each(|(h, oh)| {
                    let qh = &qt[h * head_dim..(h + 1) * head_dim];
                    attend_with_sinks(qh, &rows, &sinks[h..h + 1], scale, oh);
                });
            });
        Ok(out)
    }

    fn kv_indexer_scores(
        &self,
        store: &Vec<f32>,
        q: &[f32],
        weights: &[f32],
        heads: usize,
        dim: usize,
        rows: &IndexerRows<'_>,
        scale: f32,
    ) -> Result<Vec<f32>, BackendError> {
        check_indexer(store.len(), q, weights, heads, dim, rows)?;
        let a = rows.addressing;
        let per_token: Vec<Vec<f32>> = (0..rows.visible.len())
            .into_par_iter()
            .map(|t| {
                let bt = rows.block_tables[t];
                let (qt, wt) = (
                    &q[t * heads * dim..(t + 1) * heads * dim],
                    &weights[t * heads..(t + 1) * heads],
                );
                // Rows in parallel too: one long sequence has ~context/4 rows to score.
                (0..rows.visible[t])
                    .into_par_iter()
                    .with_min_len(256)
                    .map(|r| {
                        let at = a.offset(bt, r);
                        match rows.format {
                            KvRowFormat::F32 => indexer_score(qt, wt, &store[at..at + dim], scale),
                            f => {
                                let key = decode_row(f, &store[at..at + f.slots(dim)], dim);
                                indexer_score(qt, wt, &key, scale)
                            }
                        }
                    })
                    .collect()
            })
            .collect();
        Ok(per_token.into_iter().flatten().collect())
    }

    fn expert_bank(&self, experts: Vec<[CpuMatrix; 3]>) -> Result<Self::ExpertBank, BackendError> {
        Ok(experts)
    }

    fn routed_experts(
        &self,
        bank: &Self::ExpertBank,
        x: &[f32],
        n: usize,
        routes: &[Vec<(usize, f32)>],
        limit: f32,
    ) -> Result<Vec<f32>, BackendError> {
        super::routed_experts_one_by_one(self, bank, x, n, routes, limit)
    }

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn matrix(&self, rows: usize, cols: usize, data: Vec<f32>) -> Result<CpuMatrix, BackendError> {
        if data.len() != rows * cols {
            return Err(BackendError::Shape {
                op: "matrix",
                detail: format!("{} values for [{rows}, {cols}]", data.len()),
            });
        }
        Ok(CpuMatrix { rows, cols, data })
    }

    fn shape(&self, m: &CpuMatrix) -> (usize, usize) {
        (m.rows, m.cols)
    }

    fn linear(&self, x: &[f32], n: usize, w: &CpuMatrix) -> Result<Vec<f32>, BackendError> {
        let (out_f, in_f) = (w.rows, w.cols);
        if x.len() != n * in_f {
            return Err(BackendError::Shape {
                op: "linear",
                detail: format!("input has {} values, expected {n} x {in_f}", x.len()),
            });
        }
        let mut y = vec![0f32; n * out_f];
        if n == 0 || out_f == 0 {
            return Ok(y);
        }
        // Each element is one `dot`, so the result is identical for any batch size or thread
        // count.
        y.par_chunks_mut(out_f).enumerate().for_each(|(r, row)| {
            let xr = &x[r * in_f..(r + 1) * in_f];
            row.par_iter_mut()
                .enumerate()
                .with_min_len(32)
                .for_each(|(c, o)| *o = dot(xr, &w.data[c * in_f..(c + 1) * in_f]));
        });
        Ok(y)
    }

    fn gather_rows(&self, w: &CpuMatrix, ids: &[u32]) -> Result<Vec<f32>, BackendError> {
        let mut out = Vec::with_capacity(ids.len() * w.cols);
        for &id in ids {
            let id = id as usize;
            if id >= w.rows {
                return Err(BackendError::Shape {
                    op: "gather_rows",
                    detail: format!("row {id} of {}", w.rows),
                });
            }
            out.extend_from_slice(&w.data[id * w.cols..(id + 1) * w.cols]);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_naive_and_is_batch_invariant() {
        let b = CpuBackend;
        let (o, i) = (70, 37);
        let w: Vec<f32> = (0..o * i)
            .map(|k| ((k * 7919) % 113) as f32 / 50.0 - 1.0)
            .collect();
        let x: Vec<f32> = (0..3 * i)
            .map(|k| ((k * 31) % 17) as f32 / 8.0 - 1.0)
            .collect();
        let m = b.matrix(o, i, w.clone()).unwrap();
        let y = b.linear(&x, 3, &m).unwrap();
        for r in 0..3 {
            for c in 0..o {
                let naive: f64 = (0..i)
                    .map(|k| x[r * i + k] as f64 * w[c * i + k] as f64)
                    .sum();
                assert!((y[r * o + c] as f64 - naive).abs() < 1e-4);
            }
        }
        let y1 = b.linear(&x[i..2 * i], 1, &m).unwrap();
        assert_eq!(&y[o..2 * o], &y1[..]);
    }
}
