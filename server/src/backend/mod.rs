//! Compute backends behind one trait: `cpu` (reference, f32) and `cuda`.
//!
//! The model code (`engine::model`) is written once over [`Backend`]. The trait holds the
//! weight-heavy kernels (projections, embedding gathers); the CPU backend implements them in f32
//! with rayon. Activations cross the trait as host `f32` rows for now; the CUDA backend will add a
//! device activation type and move the remaining per-token math (norms, RoPE, attention) behind it.
pub mod cpu;
pub mod cuda;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("{0}")]
    Other(String),
}

/// A compute device holding weight matrices and running the kernels the model needs.
pub trait Backend: Send + Sync + 'static {
    /// A weight matrix `[rows, cols]` (row-major, `rows` = output features) resident on the
    /// device.
    type Matrix: Send + Sync;

    fn name(&self) -> &'static str;

    /// Moves a dense f32 matrix to the device.
    fn matrix(
        &self,
        rows: usize,
        cols: usize,
        data: Vec<f32>,
    ) -> Result<Self::Matrix, BackendError>;

    /// `(rows, cols)` of a matrix.
    fn shape(&self, m: &Self::Matrix) -> (usize, usize);

    /// `y[r, o] = sum_i x[r, i] * w[o, i]` for `x` of `n` rows. Each output element is computed
    /// with a fixed summation order independent of `n`, so a row's result does not depend on
    /// what else is in the batch.
    fn linear(&self, x: &[f32], n: usize, w: &Self::Matrix) -> Result<Vec<f32>, BackendError>;

    /// Rows `ids` of `w`, concatenated (embedding lookup).
    fn gather_rows(&self, w: &Self::Matrix, ids: &[u32]) -> Result<Vec<f32>, BackendError>;
}
