//! CPU backend: the f32 reference every other backend is checked against.

use super::{Backend, BackendError};
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

impl Backend for CpuBackend {
    type Matrix = CpuMatrix;
    type ExpertBank = Vec<[CpuMatrix; 3]>;

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
