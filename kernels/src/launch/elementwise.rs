//! Launches of `elementwise.cu`: the clipped SwiGLU and an in-place add, so an expert's
//! gate/up -> activation -> down chain (and the routed + shared sum) stays on the GPU.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaFunction, CudaStream};

use super::submit::SubmitKernel;
use super::{grid_stride, i32_arg, i64_arg, nonnull, Kernels};
use crate::error::KernelError;

impl Kernels {
    /// `out = silu(min(gate, limit)) * clamp(up, -limit, limit)` over `len` f32.
    ///
    /// # Safety
    /// `gate`, `up` and `out` must address `len` f32 of device memory of this context.
    pub unsafe fn swiglu_clip(
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
                &self.swiglu_clip,
                ["swiglu_clip", "launch swiglu_clip"],
                [gate, up, out],
                len,
                limit,
            )
        }
    }

    /// The clipped-SwiGLU launch of `f` (f32 or f16 output; the same arguments); `kernel` names
    /// it in checks, `what` in driver errors.
    ///
    /// # Safety
    /// `gate` and `up` must address `len` f32 and `out` `len` values of `f`'s output type, device
    /// memory of this context.
    pub(crate) unsafe fn swiglu_launch(
        &self,
        stream: &CudaStream,
        f: &CudaFunction,
        [kernel, what]: [&'static str; 2],
        [gate, up, out]: [CUdeviceptr; 3],
        len: usize,
        limit: f32,
    ) -> Result<(), KernelError> {
        if len == 0 {
            return Ok(());
        }
        nonnull(kernel, &[("gate", gate), ("up", up), ("out", out)])?;
        let n = i64_arg(kernel, "len", len)?;
        stream
            .kernel(f)
            .arg(&gate)
            .arg(&up)
            .arg(&out)
            .arg(&n)
            .arg(&limit)
            .launch(grid_stride(kernel, len, self.sms)?)
            .map_err(KernelError::driver(what))?;
        Ok(())
    }

    /// Widens an FP8 block-scaled weight `[rows, cols]` (e4m3 + E8M0 per 128x128 tile) to f32.
    ///
    /// # Safety
    /// `weight` must hold `rows * cols` bytes, `scales` `ceil(rows/128) * ceil(cols/128)`, and
    /// `out` `rows * cols` f32, all device memory of this context.
    pub unsafe fn fp8_dequant(
        &self,
        stream: &CudaStream,
        weight: CUdeviceptr,
        scales: CUdeviceptr,
        out: CUdeviceptr,
        rows: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "fp8_dequant";
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        nonnull(K, &[("weight", weight), ("scales", scales), ("out", out)])?;
        let (r, c) = (i32_arg(K, "rows", rows)?, i32_arg(K, "cols", cols)?);
        stream
            .kernel(&self.fp8_dequant)
            .arg(&weight)
            .arg(&scales)
            .arg(&out)
            .arg(&r)
            .arg(&c)
            .launch(grid_stride(K, rows * cols, self.sms)?)
            .map_err(KernelError::driver("launch fp8_dequant"))?;
        Ok(())
    }

    /// Widens an FP8 block-scaled weight `[rows, cols]` to f16, every value times `2^-shift`:
    /// exact where every tile's E8M0 byte `s` has `112 <= s - shift <= 134`
    /// ([`fp8_f16_shift`] picks the shift of a matrix from its scale range).
    ///
    /// # Safety
    /// `weight` must hold `rows * cols` bytes, `scales` `ceil(rows/128) * ceil(cols/128)`, and
    /// `out` `rows * cols` u16 (f16 bits), all device memory of this context, 16-byte aligned.
    pub unsafe fn fp8_dequant_f16(
        &self,
        stream: &CudaStream,
        [weight, scales, out]: [CUdeviceptr; 3],
        rows: usize,
        cols: usize,
        shift: i32,
    ) -> Result<(), KernelError> {
        const K: &str = "fp8_dequant_f16";
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        nonnull(K, &[("weight", weight), ("scales", scales), ("out", out)])?;
        if !cols.is_multiple_of(8) || !weight.is_multiple_of(8) || !out.is_multiple_of(16) {
            return Err(KernelError::invalid(
                K,
                format!("needs cols % 8 == 0 and aligned buffers (cols {cols})"),
            ));
        }
        let (r, c) = (i32_arg(K, "rows", rows)?, i32_arg(K, "cols", cols)?);
        stream
            .kernel(&self.fp8_dequant_f16)
            .arg(&weight)
            .arg(&scales)
            .arg(&out)
            .arg(&r)
            .arg(&c)
            .arg(&shift)
            .launch(grid_stride(K, rows * cols / 8, self.sms)?)
            .map_err(KernelError::driver("launch fp8_dequant_f16"))?;
        Ok(())
    }

    /// `rows` rows of `cols` f32 (row stride `ld_x`) to dense f16 rows, rounded to nearest even.
    ///
    /// # Safety
    /// `x` must hold `(rows - 1) * ld_x + cols` f32 and `out` `rows * cols` u16, device memory of
    /// this context; `x` 16-byte aligned, `out` 8-byte aligned.
    pub unsafe fn rows_to_f16(
        &self,
        stream: &CudaStream,
        x: CUdeviceptr,
        ld_x: usize,
        out: CUdeviceptr,
        rows: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "rows_to_f16";
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        nonnull(K, &[("x", x), ("out", out)])?;
        if !cols.is_multiple_of(4)
            || !ld_x.is_multiple_of(4)
            || ld_x < cols
            || !x.is_multiple_of(16)
            || !out.is_multiple_of(8)
        {
            return Err(KernelError::invalid(
                K,
                format!("needs cols and ld_x multiples of 4, ld_x >= cols and aligned buffers (cols {cols}, ld_x {ld_x})"),
            ));
        }
        let (r, c, ld) = (
            i32_arg(K, "rows", rows)?,
            i32_arg(K, "cols", cols)?,
            i64_arg(K, "ld_x", ld_x)?,
        );
        stream
            .kernel(&self.rows_to_f16)
            .arg(&x)
            .arg(&ld)
            .arg(&out)
            .arg(&r)
            .arg(&c)
            .launch(grid_stride(K, rows * cols / 4, self.sms)?)
            .map_err(KernelError::driver("launch rows_to_f16"))?;
        Ok(())
    }

    /// `acc += x` over `len` f32.
    ///
    /// # Safety
    /// `acc` and `x` must address `len` f32 of device memory of this context.
    pub unsafe fn add_into(
        &self,
        stream: &CudaStream,
        acc: CUdeviceptr,
        x: CUdeviceptr,
        len: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "add";
        if len == 0 {
            return Ok(());
        }
        nonnull(K, &[("acc", acc), ("x", x)])?;
        let n = i64_arg(K, "len", len)?;
        stream
            .kernel(&self.add)
            .arg(&acc)
            .arg(&x)
            .arg(&n)
            .launch(grid_stride(K, len, self.sms)?)
            .map_err(KernelError::driver("launch add"))?;
        Ok(())
    }
}

/// The power of two an FP8 matrix whose E8M0 bytes lie in `lo..=hi` is divided by when widened to
/// f16 ([`Kernels::fp8_dequant_f16`]) so that every value is exact: e4m3 values run from 2^-9
/// (its smallest step) to 448, so `s - shift` must lie in 112..=134. `None` when the range is
/// wider than that (or holds the NaN byte 0xFF): such a matrix stays on the f32 path.
pub fn fp8_f16_shift(lo: u8, hi: u8) -> Option<i32> {
    if lo > hi || hi == 0xff || hi - lo > 134 - 112 {
        return None;
    }
    // Centred, so the products and their sums keep headroom on both sides.
    let spare = (134 - 112) - i32::from(hi - lo);
    Some(i32::from(lo) - 112 - spare / 2)
}

#[cfg(test)]
mod tests {
    use super::fp8_f16_shift;

    /// Every e4m3 magnitude (its smallest step 2^-9 up to 448) times 2^(s - 127 - shift) must be
    /// an f16 value: on f16's 2^-24 grid and at most 65504.
    fn exact_in_f16(s: u8, shift: i32) -> bool {
        let e = i32::from(s) - 127 - shift;
        e - 9 >= -24 && 448.0 * 2f64.powi(e) <= 65504.0
    }

    #[test]
    fn f16_shift_keeps_every_scale_of_the_range_exact() {
        for lo in 0u8..=254 {
            for hi in lo..=254 {
                match fp8_f16_shift(lo, hi) {
                    Some(shift) => {
                        assert!(
                            exact_in_f16(lo, shift) && exact_in_f16(hi, shift),
                            "{lo}..{hi}"
                        );
                    }
                    None => assert!(hi - lo > 22, "{lo}..{hi} refused"),
                }
            }
        }
        assert_eq!(fp8_f16_shift(120, 119), None);
        assert_eq!(fp8_f16_shift(100, 0xff), None);
        // 24 scale values (hi - lo = 23) do not fit the 23 of 112..=134.
        assert_eq!(fp8_f16_shift(100, 123), None);
    }
}
