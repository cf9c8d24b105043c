//! Launches of `moe_sorted.cu`: the glue of the routed experts over many tokens (prefill), where
//! the (token, slot) pairs are sorted by expert and each expert's rows go through one cuBLAS GEMM
//! on its widened weights. No launch synchronises or allocates.

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchConfig};

use super::submit::SubmitKernel;
use super::{aligned16, function, grid_stride, i32_arg, i64_arg, nonnull, u32_grid, Kernels};
use crate::error::KernelError;

/// The `moe_sorted.cu` kernels.
pub struct MoeSortedFns {
    dequant: CudaFunction,
    dequant_f16: CudaFunction,
    gather: CudaFunction,
    gather_f16: CudaFunction,
    gather_f16_k8: CudaFunction,
    swiglu_f16: CudaFunction,
    combine: CudaFunction,
    u8_range: CudaFunction,
}

impl MoeSortedFns {
    pub(crate) fn load(module: &Arc<CudaModule>) -> Result<Self, KernelError> {
        let f = |name: &str| function(module, name);
        Ok(Self {
            dequant: f("dsk_fp4_dequant_experts_f32")?,
            dequant_f16: f("dsk_fp4_dequant_experts_f16")?,
            gather: f("dsk_gather_rows_f32")?,
            gather_f16: f("dsk_gather_rows_f32_to_f16")?,
            gather_f16_k8: f("dsk_gather_rows_f32_to_f16_k8")?,
            swiglu_f16: f("dsk_swiglu_clip_to_f16")?,
            combine: f("dsk_moe_combine_sorted_f32")?,
            u8_range: f("dsk_u8_range")?,
        })
    }
}

/// E8M0 scale bytes (exponent + 127) with which every FP4 value of a block is exact in f16:
/// 6 * 2^13 is under f16's largest value, 1.5 * 2^-23 (the finest step, 2^-24) its smallest.
pub const F16_EXACT_SCALES: std::ops::RangeInclusive<u8> = 104..=140;

/// What [`Kernels::gather_rows`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatherInto {
    /// The rows as they are (`dsk_gather_rows_f32`).
    F32,
    /// Rounded to f16, to nearest (`dsk_gather_rows_f32_to_f16`).
    F16,
    /// Rounded to f16 with every 8 values of a row stored in the order 0 4 1 5 2 6 3 7, the
    /// grouped FP4 kernels' "k8 order" (see `moe_grouped`; `dsk_gather_rows_f32_to_f16_k8`):
    /// `width` a multiple of 8, `src` and `dst` 16-byte aligned.
    F16K8,
}

/// Most matrices of one [`Kernels::fp4_dequant_experts`] launch (grid.y).
const GRID_Y_MAX: usize = 65_535;

/// Launch-time checks of [`Kernels::fp4_dequant_experts`], testable without a GPU.
pub fn check_fp4_dequant_experts(
    ptrs: [CUdeviceptr; 4],
    count: usize,
    rows: usize,
    k: usize,
) -> Result<(), KernelError> {
    const K: &str = "fp4_dequant_experts";
    if k == 0 || !k.is_multiple_of(32) {
        return Err(KernelError::invalid(
            K,
            format!("k = {k} must be a positive multiple of 32 (one scale per 32 values)"),
        ));
    }
    if count > GRID_Y_MAX {
        return Err(KernelError::invalid(
            K,
            format!("{count} matrices in one launch (at most {GRID_Y_MAX})"),
        ));
    }
    i32_arg(K, "rows", rows)?;
    i32_arg(K, "k", k)?;
    let [w, s, experts, out] = ptrs;
    nonnull(K, &[("w", w), ("s", s), ("experts", experts), ("out", out)])?;
    // One 16-byte load of 32 weights and eight 16-byte stores per thread.
    aligned16(K, &[("w", w), ("out", out)])
}

impl Kernels {
    /// Widens the FP4 matrices `[rows, k]` of `count` experts (ids in `experts`, device i32) of
    /// one bank (`w` `[E, rows, k/2]` bytes, `s` `[E, rows, k/32]` E8M0) to f32 `[count, rows, k]`
    /// in `out`: exact values, as the CPU reference widens them.
    ///
    /// # Safety
    /// `w` and `s` must hold the bank, every id in `experts` must be below its expert count, and
    /// `out` must hold `count * rows * k` f32, all device memory of this context.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn fp4_dequant_experts(
        &self,
        stream: &CudaStream,
        w: CUdeviceptr,
        s: CUdeviceptr,
        experts: CUdeviceptr,
        count: usize,
        rows: usize,
        k: usize,
        out: CUdeviceptr,
    ) -> Result<(), KernelError> {
        // SAFETY: this function's contract.
        unsafe { self.fp4_dequant_experts_as(stream, [w, s, experts, out], count, rows, k, false) }
    }

    /// [`Self::fp4_dequant_experts`] into f16 `[count, rows, k]` (exact where every scale byte
    /// of the bank is in [`F16_EXACT_SCALES`], see [`Self::u8_range`]).
    ///
    /// # Safety
    /// As [`Self::fp4_dequant_experts`], with `out` holding `count * rows * k` f16.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn fp4_dequant_experts_f16(
        &self,
        stream: &CudaStream,
        w: CUdeviceptr,
        s: CUdeviceptr,
        experts: CUdeviceptr,
        count: usize,
        rows: usize,
        k: usize,
        out: CUdeviceptr,
    ) -> Result<(), KernelError> {
        // SAFETY: this function's contract.
        unsafe { self.fp4_dequant_experts_as(stream, [w, s, experts, out], count, rows, k, true) }
    }

    /// The f32 or f16 widening launch.
    ///
    /// # Safety
    /// As [`Self::fp4_dequant_experts`] for the output type.
    #[allow(clippy::too_many_arguments)]
    unsafe fn fp4_dequant_experts_as(
        &self,
        stream: &CudaStream,
        ptrs: [CUdeviceptr; 4],
        count: usize,
        rows: usize,
        k: usize,
        f16: bool,
    ) -> Result<(), KernelError> {
        const K: &str = "fp4_dequant_experts";
        if count == 0 || rows == 0 {
            return Ok(());
        }
        check_fp4_dequant_experts(ptrs, count, rows, k)?;
        let [w, s, experts, out] = ptrs;
        let (c, r, kk) = (count as i32, rows as i32, k as i32);
        // grid.y = the matrix; grid.x strides over its values four (f32) or eight (f16) at a
        // time.
        let per_thread = if f16 { 8 } else { 4 };
        let per_matrix = (rows * k / per_thread)
            .div_ceil(256)
            .clamp(1, 4 * self.sms.max(1));
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, per_matrix)?, u32_grid(K, count)?, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = if f16 {
            &self.moe_sorted.dequant_f16
        } else {
            &self.moe_sorted.dequant
        };
        stream
            .kernel(f)
            .arg(&w)
            .arg(&s)
            .arg(&experts)
            .arg(&c)
            .arg(&r)
            .arg(&kk)
            .arg(&out)
            .launch(cfg)
            .map_err(KernelError::driver("launch fp4_dequant_experts"))?;
        Ok(())
    }

    /// `dst[i, :] = src[idx[i], :]` for `n` rows of `width` f32 values, written as `into` says.
    ///
    /// # Safety
    /// `idx` must hold `n` device i32, each a row of `src` (`width` f32 per row); `dst` must
    /// hold `n * width` values of the output type; all device memory of this context.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gather_rows(
        &self,
        stream: &CudaStream,
        into: GatherInto,
        src: CUdeviceptr,
        idx: CUdeviceptr,
        n: usize,
        width: usize,
        dst: CUdeviceptr,
    ) -> Result<(), KernelError> {
        let (kernel, what, f, per_thread) = match into {
            GatherInto::F32 => (
                "gather_rows_f32",
                "launch gather_rows_f32",
                &self.moe_sorted.gather,
                1,
            ),
            GatherInto::F16 => (
                "gather_rows_f32_to_f16",
                "launch gather_rows_f32_to_f16",
                &self.moe_sorted.gather_f16,
                1,
            ),
            // Two 16-byte loads and one 16-byte store per 8 values.
            GatherInto::F16K8 => (
                "gather_rows_f32_to_f16_k8",
                "launch gather_rows_f32_to_f16_k8",
                &self.moe_sorted.gather_f16_k8,
                8,
            ),
        };
        if n == 0 || width == 0 {
            return Ok(());
        }
        nonnull(kernel, &[("src", src), ("idx", idx), ("dst", dst)])?;
        if into == GatherInto::F16K8 {
            if !width.is_multiple_of(8) {
                return Err(KernelError::invalid(
                    kernel,
                    format!("width {width} must be a multiple of 8"),
                ));
            }
            aligned16(kernel, &[("src", src), ("dst", dst)])?;
        }
        let (nn, w) = (i32_arg(kernel, "n", n)?, i32_arg(kernel, "width", width)?);
        stream
            .kernel(f)
            .arg(&src)
            .arg(&idx)
            .arg(&nn)
            .arg(&w)
            .arg(&dst)
            .launch(grid_stride(kernel, n * width / per_thread, self.sms)?)
            .map_err(KernelError::driver(what))?;
        Ok(())
    }

    /// [`Self::swiglu_clip`]'s values (the same f32 arithmetic) stored as f16 in `out`.
    ///
    /// # Safety
    /// `gate` and `up` must address `len` f32 and `out` `len` f16 of device memory of this
    /// context.
    pub unsafe fn swiglu_clip_to_f16(
        &self,
        stream: &CudaStream,
        gate: CUdeviceptr,
        up: CUdeviceptr,
        out: CUdeviceptr,
        len: usize,
        limit: f32,
    ) -> Result<(), KernelError> {
        // SAFETY: this function's contract.
        unsafe {
            self.swiglu_launch(
                stream,
                &self.moe_sorted.swiglu_f16,
                ["swiglu_clip_to_f16", "launch swiglu_clip_to_f16"],
                [gate, up, out],
                len,
                limit,
            )
        }
    }

    /// The smallest and largest of `n` bytes at `v`, into `range` (two device u32 that must
    /// hold 255 and 0 before the launch).
    ///
    /// # Safety
    /// `v` must address `n` bytes and `range` two u32 of device memory of this context.
    pub unsafe fn u8_range(
        &self,
        stream: &CudaStream,
        v: CUdeviceptr,
        n: usize,
        range: CUdeviceptr,
    ) -> Result<(), KernelError> {
        const K: &str = "u8_range";
        if n == 0 {
            return Ok(());
        }
        nonnull(K, &[("v", v), ("range", range)])?;
        let nn = i64_arg(K, "n", n)?;
        stream
            .kernel(&self.moe_sorted.u8_range)
            .arg(&v)
            .arg(&nn)
            .arg(&range)
            .launch(grid_stride(K, n, self.sms)?)
            .map_err(KernelError::driver("launch u8_range"))?;
        Ok(())
    }

    /// `out[t, :] = sum_j weights[t, j] * y[pos[t, j], :]` over the `topk` slots in order (a
    /// negative position adds nothing): the expert outputs, sorted by expert, back in token
    /// order.
    ///
    /// # Safety
    /// `pos` and `weights` must hold `tokens * topk` device i32 / f32, every non-negative
    /// position a row of `y` (`hidden` f32 per row); `out` must hold `tokens * hidden` f32; all
    /// device memory of this context.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn moe_combine_sorted(
        &self,
        stream: &CudaStream,
        y: CUdeviceptr,
        pos: CUdeviceptr,
        weights: CUdeviceptr,
        tokens: usize,
        topk: usize,
        hidden: usize,
        out: CUdeviceptr,
    ) -> Result<(), KernelError> {
        const K: &str = "moe_combine_sorted";
        if tokens == 0 || hidden == 0 {
            return Ok(());
        }
        nonnull(
            K,
            &[("y", y), ("pos", pos), ("weights", weights), ("out", out)],
        )?;
        let (t, k, h) = (
            i32_arg(K, "tokens", tokens)?,
            i32_arg(K, "topk", topk)?,
            i32_arg(K, "hidden", hidden)?,
        );
        stream
            .kernel(&self.moe_sorted.combine)
            .arg(&y)
            .arg(&pos)
            .arg(&weights)
            .arg(&t)
            .arg(&k)
            .arg(&h)
            .arg(&out)
            .launch(grid_stride(K, tokens * hidden, self.sms)?)
            .map_err(KernelError::driver("launch moe_combine_sorted"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequant_needs_whole_scale_groups_and_real_pointers() {
        assert!(check_fp4_dequant_experts([16, 16, 16, 16], 2, 4, 64).is_ok());
        assert!(check_fp4_dequant_experts([16, 16, 16, 16], 2, 4, 48).is_err());
        assert!(check_fp4_dequant_experts([16, 0, 16, 16], 2, 4, 64).is_err());
        assert!(check_fp4_dequant_experts([16, 16, 16, 8], 2, 4, 64).is_err());
        assert!(check_fp4_dequant_experts([16, 16, 16, 16], 65_536, 4, 64).is_err());
    }
}
