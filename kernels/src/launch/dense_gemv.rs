//! Launches of `dense_gemv.cu`: bf16 weights read as bf16 (half the bytes of an f32 copy) with f32
//! activations and f32 accumulation, so the products are exactly those of the widened weight and
//! only the summation order differs from an f32 reference. Also the bf16 -> f32 widening (for
//! SGEMM over many rows) and the bf16 embedding lookup. No launch synchronises or allocates.

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchConfig};

use super::submit::SubmitKernel;
use super::{aligned16, function, i32_arg, i64_arg, nonnull, u32_grid, Kernels};
use crate::error::KernelError;

/// Token buckets of the bf16 GEMV (one instantiation each; m rounds up to the next); more tokens
/// than the largest run as tiles of it along grid.y (dense_gemv.cu says why).
const M_BUCKETS: [usize; 3] = [1, 2, 4];
/// Most tokens (rows of x) per launch.
pub const BF16_GEMV_MAX_M: usize = 16;
/// Warps per block and weight rows per warp (`BG_WARPS`, `BG_ROWS` in the kernel).
const WARPS: usize = 8;
pub(crate) const ROWS_PER_WARP: usize = 4;
/// Weights per 16-byte load.
const CHUNK: usize = 8;

/// The `dense_gemv.cu` kernels.
pub struct DenseGemvFns {
    gemv: [CudaFunction; 3],
    pub(crate) gemv_multi: CudaFunction,
    widen: CudaFunction,
    gather: CudaFunction,
}

impl DenseGemvFns {
    pub(crate) fn load(module: &Arc<CudaModule>) -> Result<Self, KernelError> {
        let f = |name: &str| function(module, name);
        Ok(Self {
            gemv: [
                f("dsk_bf16_gemv_xf32_m1")?,
                f("dsk_bf16_gemv_xf32_m2")?,
                f("dsk_bf16_gemv_xf32_m4")?,
            ],
            gemv_multi: f("dsk_bf16_gemv_multi_xf32_m1")?,
            widen: f("dsk_widen_bf16_f32")?,
            gather: f("dsk_gather_rows_bf16")?,
        })
    }
}

/// `out[m, n] = sum_k x[m, k] * W[n, k]`: W bf16 `[n, k]` row-major, x f32 `[m, k]` (row stride
/// k), out f32 `[m, n]` (row stride n).
#[derive(Clone, Copy, Debug)]
pub struct Bf16Gemv {
    pub weight: CUdeviceptr,
    pub x: CUdeviceptr,
    pub out: CUdeviceptr,
    /// Rows of x (tokens), 1..=[`BF16_GEMV_MAX_M`].
    pub m: usize,
    /// Output features (rows of W).
    pub n: usize,
    /// Input features; a positive multiple of 8.
    pub k: usize,
}

/// Launch-time checks of [`Kernels::bf16_gemv`], testable without a GPU.
pub fn check_bf16_gemv(a: &Bf16Gemv) -> Result<(), KernelError> {
    const K: &str = "bf16_gemv";
    if a.m == 0 || a.m > BF16_GEMV_MAX_M {
        return Err(KernelError::invalid(
            K,
            format!("m = {} must be in 1..={BF16_GEMV_MAX_M}", a.m),
        ));
    }
    if a.n == 0 || a.k == 0 || !a.k.is_multiple_of(CHUNK) {
        return Err(KernelError::invalid(
            K,
            format!(
                "n = {}, k = {}: need n > 0 and k a positive multiple of {CHUNK}",
                a.n, a.k
            ),
        ));
    }
    // Row offsets inside the kernel are 64-bit; the loop index over 8-weight chunks is 32-bit.
    i32_arg(K, "n", a.n)?;
    i32_arg(K, "k", a.k)?;
    nonnull(K, &[("weight", a.weight), ("x", a.x), ("out", a.out)])?;
    aligned16(K, &[("weight", a.weight), ("x", a.x)])
}

/// Warps sharing one row group along K: the fewest that still give >= 2 blocks per SM, while
/// each lane keeps at least two 8-weight chunks (the loop is unrolled by two).
pub fn bf16_ksplit(n: usize, k: usize, sms: usize) -> usize {
    let groups = n.div_ceil(ROWS_PER_WARP);
    let chunks = k / CHUNK;
    let mut ks = 1;
    while ks < WARPS && groups.div_ceil(WARPS / ks) < 2 * sms && 32 * ks * 2 * 2 <= chunks {
        ks *= 2;
    }
    ks
}

/// Blocks of a [`Kernels::bf16_gemv`] launch with split `ks`.
pub(crate) fn gemv_blocks(n: usize, ks: usize) -> usize {
    n.div_ceil(ROWS_PER_WARP).div_ceil(WARPS / ks)
}

/// The instantiation (index into the buckets) and the token tiles along grid.y for m tokens:
/// one tile of the smallest bucket that holds m, else tiles of the largest.
fn token_tiles(m: usize) -> Result<(usize, u32), KernelError> {
    let bucket = m.min(M_BUCKETS[M_BUCKETS.len() - 1]);
    let mi = M_BUCKETS
        .iter()
        .position(|&b| b >= bucket)
        .ok_or_else(|| KernelError::invalid("bf16_gemv", "m out of range"))?;
    Ok((mi, m.div_ceil(M_BUCKETS[mi]) as u32))
}

/// Launch-time checks of [`Kernels::gather_rows_bf16`], testable without a GPU.
pub fn check_gather_rows_bf16(
    weight: CUdeviceptr,
    ids: CUdeviceptr,
    out: CUdeviceptr,
    n: usize,
    k: usize,
    rows: usize,
) -> Result<(), KernelError> {
    const K: &str = "gather_rows_bf16";
    if k == 0 || !k.is_multiple_of(CHUNK) {
        return Err(KernelError::invalid(
            K,
            format!("k = {k} must be a positive multiple of {CHUNK}"),
        ));
    }
    i32_arg(K, "n", n)?;
    i32_arg(K, "k", k)?;
    i32_arg(K, "rows", rows)?;
    nonnull(K, &[("weight", weight), ("ids", ids), ("out", out)])?;
    aligned16(K, &[("weight", weight), ("out", out)])
}

impl Kernels {
    /// bf16-weight GEMV / skinny GEMM (see [`Bf16Gemv`]), one launch.
    ///
    /// # Safety
    /// Every pointer must address device memory of this context: `weight` `n * k` bf16, `x`
    /// `m * k` f32, `out` `m * n` f32 (not overlapping `x`).
    /// The weights (and scales) are read before the kernel waits for the previous kernel of the
    /// stream (PDL): no kernel still running before this launch may write them.
    pub unsafe fn bf16_gemv(&self, stream: &CudaStream, a: &Bf16Gemv) -> Result<(), KernelError> {
        check_bf16_gemv(a)?;
        const K: &str = "bf16_gemv";
        let (mi, tiles) = token_tiles(a.m)?;
        let ks = bf16_ksplit(a.n, a.k, self.sms);
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, gemv_blocks(a.n, ks))?, tiles, 1),
            block_dim: ((32 * WARPS) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (m, n, k) = (
            i32_arg(K, "m", a.m)?,
            i32_arg(K, "n", a.n)?,
            i32_arg(K, "k", a.k)?,
        );
        let ks = ks as i32;
        stream
            .kernel(&self.dense_gemv.gemv[mi])
            .arg(&a.weight)
            .arg(&a.x)
            .arg(&a.out)
            .arg(&m)
            .arg(&n)
            .arg(&k)
            .arg(&ks)
            .launch(cfg)
            .map_err(KernelError::driver("launch bf16_gemv"))?;
        Ok(())
    }

    /// `dst[i] = f32(src[i])` for `i < len` (bf16 bits in, exact).
    ///
    /// # Safety
    /// `src` must hold `len` bf16 and `dst` `len` f32 of device memory of this context, not
    /// overlapping.
    pub unsafe fn bf16_to_f32(
        &self,
        stream: &CudaStream,
        src: CUdeviceptr,
        dst: CUdeviceptr,
        len: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "bf16_to_f32";
        if len == 0 {
            return Ok(());
        }
        nonnull(K, &[("src", src), ("dst", dst)])?;
        aligned16(K, &[("src", src), ("dst", dst)])?;
        let n = i64_arg(K, "len", len)?;
        // Grid-stride over 8-value groups: enough blocks to fill the GPU, no more than needed.
        let blocks = len.div_ceil(CHUNK * 256).clamp(1, 16 * self.sms.max(1));
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, blocks)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.dense_gemv.widen)
            .arg(&src)
            .arg(&dst)
            .arg(&n)
            .launch(cfg)
            .map_err(KernelError::driver("launch bf16_to_f32"))?;
        Ok(())
    }

    /// Embedding lookup widened to f32: `out[i, :] = f32(weight[ids[i], :])` for `i < n`, with
    /// `weight` bf16 `[rows, k]` and `ids` i32 `[n]`. An id outside `0..rows` gives a zero row
    /// (the kernel never reads past `weight`).
    ///
    /// # Safety
    /// `weight` must hold `rows * k` bf16, `ids` `n` i32 and `out` `n * k` f32 of device memory
    /// of this context.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gather_rows_bf16(
        &self,
        stream: &CudaStream,
        weight: CUdeviceptr,
        ids: CUdeviceptr,
        out: CUdeviceptr,
        n: usize,
        k: usize,
        rows: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "gather_rows_bf16";
        if n == 0 {
            return Ok(());
        }
        check_gather_rows_bf16(weight, ids, out, n, k, rows)?;
        let (ni, ki, ri) = (
            i32_arg(K, "n", n)?,
            i32_arg(K, "k", k)?,
            i32_arg(K, "rows", rows)?,
        );
        let threads = (k / CHUNK).next_power_of_two().clamp(32, 256) as u32;
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, n)?, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.dense_gemv.gather)
            .arg(&weight)
            .arg(&ids)
            .arg(&out)
            .arg(&ni)
            .arg(&ki)
            .arg(&ri)
            .launch(cfg)
            .map_err(KernelError::driver("launch gather_rows_bf16"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gemv(m: usize, n: usize, k: usize) -> Bf16Gemv {
        Bf16Gemv {
            weight: 256,
            x: 1024,
            out: 2048,
            m,
            n,
            k,
        }
    }

    #[test]
    fn more_than_four_tokens_run_as_four_token_tiles() {
        // (m, instantiation index, tiles): m1, m2, m4 alone; then m4 tiles.
        for (m, mi, tiles) in [
            (1, 0, 1),
            (2, 1, 1),
            (3, 2, 1),
            (4, 2, 1),
            (5, 2, 2),
            (6, 2, 2),
            (8, 2, 2),
            (9, 2, 3),
            (16, 2, 4),
        ] {
            assert_eq!(token_tiles(m).unwrap(), (mi, tiles), "m = {m}");
        }
    }

    #[test]
    fn shape_checks() {
        assert!(check_bf16_gemv(&gemv(1, 129_280, 4096)).is_ok());
        assert!(check_bf16_gemv(&gemv(16, 3, 32)).is_ok());
        assert!(check_bf16_gemv(&gemv(0, 8, 32)).is_err());
        assert!(check_bf16_gemv(&gemv(17, 8, 32)).is_err());
        assert!(check_bf16_gemv(&gemv(1, 0, 32)).is_err());
        assert!(check_bf16_gemv(&gemv(1, 8, 36)).is_err());
        assert!(check_bf16_gemv(&gemv(1, 8, 0)).is_err());
        assert!(check_bf16_gemv(&Bf16Gemv {
            x: 1032,
            ..gemv(1, 8, 32)
        })
        .is_err());
        assert!(check_bf16_gemv(&Bf16Gemv {
            out: 0,
            ..gemv(1, 8, 32)
        })
        .is_err());
        assert!(check_gather_rows_bf16(16, 16, 16, 4, 4096, 129_280).is_ok());
        assert!(check_gather_rows_bf16(16, 16, 16, 4, 4100, 129_280).is_err());
        assert!(check_gather_rows_bf16(16, 0, 16, 4, 4096, 129_280).is_err());
        assert!(check_gather_rows_bf16(16, 16, 24, 4, 4096, 129_280).is_err());
    }

    #[test]
    fn split_fills_the_gpu_and_buckets_round_up() {
        // LM head: 32320 row groups, no split. Compressor [1024, 4096]: 256 groups -> 8 ways.
        assert_eq!(bf16_ksplit(129_280, 4096, 132), 1);
        assert_eq!(bf16_ksplit(1024, 4096, 132), 8);
        assert_eq!(gemv_blocks(1024, 8), 256);
        // Router gate [256, 4096]: 64 groups, split as far as there are warps.
        assert_eq!(bf16_ksplit(256, 4096, 132), 8);
        // k = 32: 4 chunks, never split.
        assert_eq!(bf16_ksplit(3, 32, 132), 1);
        assert_eq!(gemv_blocks(3, 1), 1);
    }
}
