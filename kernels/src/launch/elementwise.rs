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
