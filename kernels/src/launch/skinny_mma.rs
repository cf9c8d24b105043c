//! Launches of `skinny_mma.cu`: projections of 2..=16 f32 activation rows (decode batches, DSpark
//! verify) on the TF32 tensor cores, weights FP8 (block-scaled) or bf16, with every activation
//! split into two TF32 halves so the products keep f32 precision (see the kernel's header). One
//! launch per call; no launch synchronises or allocates.

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchConfig};

use super::submit::SubmitKernel;
use super::{aligned16, function, i32_arg, i64_arg, nonnull, u32_grid, Kernels};
use crate::error::KernelError;

/// Most activation rows (tokens) of one launch.
pub const SKINNY_MMA_MAX_M: usize = 16;
/// Fewest rows worth the tensor cores: up to 3 rows the CUDA-core GEMVs stream the weights at
/// least as fast (they are still bandwidth-bound there; H200, docs/KERNELS.md).
pub const SKINNY_MMA_MIN_M: usize = 4;
/// Fewest weight rows worth the tensor cores: smaller matrices (the 256-row router) are a few
/// blocks either way, and the GEMV's 4-row groups spread them over more SMs.
pub const SKINNY_MMA_MIN_N: usize = 512;
/// Bytes of each weight row one warp step covers (4 lanes x 16 bytes).
const SPAN_BYTES: usize = 64;

/// Element type of a skinny GEMM's weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkinnyWeight {
    /// e4m3 with one E8M0 scale per 128 x 128 tile (`scale` `[ceil(n/128), ceil(k/128)]`).
    Fp8,
    /// bf16 (`scale` unused, may be 0).
    Bf16,
}

impl SkinnyWeight {
    fn bytes(self) -> usize {
        match self {
            SkinnyWeight::Fp8 => 1,
            SkinnyWeight::Bf16 => 2,
        }
    }
}

/// `out[t * ld_out + r] = sum_j x[t * ld_x + (r / group_rows) * x_group_stride + j] * W[r, j]`
/// for `t < m`, `r < n`, `j < k`: W `[n, k]` row-major. The plain projection is
/// `group_rows = n`, `x_group_stride = 0`, `ld_x = k`, `ld_out = n`.
#[derive(Clone, Copy, Debug)]
pub struct SkinnyMma {
    pub weight: CUdeviceptr,
    pub weight_type: SkinnyWeight,
    pub scale: CUdeviceptr,
    /// f32 activations.
    pub x: CUdeviceptr,
    /// f32 output.
    pub out: CUdeviceptr,
    /// Rows of x (tokens), `1..=SKINNY_MMA_MAX_M` (see [`skinny_mma_pays`] for when it is
    /// faster than the GEMVs).
    pub m: usize,
    /// Output features (rows of W).
    pub n: usize,
    /// Input features: a row of W must be a whole number of 64-byte spans.
    pub k: usize,
    /// Row strides of x and out, in elements.
    pub ld_x: usize,
    pub ld_out: usize,
    /// Rows per group; a multiple of 32 when smaller than `n`.
    pub group_rows: usize,
    /// Extra x offset per group, in elements.
    pub x_group_stride: usize,
}

impl SkinnyMma {
    /// The plain projection `out[t, r] = sum_j x[t, j] W[r, j]` (x `[m, k]`, out `[m, n]`).
    pub fn plain(
        weight: CUdeviceptr,
        weight_type: SkinnyWeight,
        scale: CUdeviceptr,
        x: CUdeviceptr,
        out: CUdeviceptr,
        (m, n, k): (usize, usize, usize),
    ) -> Self {
        Self {
            weight,
            weight_type,
            scale,
            x,
            out,
            m,
            n,
            k,
            ld_x: k,
            ld_out: n,
            group_rows: n,
            x_group_stride: 0,
        }
    }
}

/// Whether the kernel takes a weight of this type and inner size: rows of whole 64-byte spans.
pub fn skinny_mma_fits(weight_type: SkinnyWeight, k: usize) -> bool {
    k > 0 && (k * weight_type.bytes()).is_multiple_of(SPAN_BYTES)
}

/// Whether `m` rows through an `[n, k]` weight of this type should take the skinny GEMM rather
/// than the CUDA-core GEMV (both f32-exact): it fits, and there are enough rows on both sides.
pub fn skinny_mma_pays(weight_type: SkinnyWeight, m: usize, n: usize, k: usize) -> bool {
    (SKINNY_MMA_MIN_M..=SKINNY_MMA_MAX_M).contains(&m)
        && n >= SKINNY_MMA_MIN_N
        && skinny_mma_fits(weight_type, k)
}

/// Launch-time checks of [`Kernels::skinny_mma`], testable without a GPU.
pub fn check_skinny_mma(a: &SkinnyMma) -> Result<(), KernelError> {
    const K: &str = "skinny_mma";
    if a.m == 0 || a.m > SKINNY_MMA_MAX_M {
        return Err(KernelError::invalid(
            K,
            format!("m = {} must be in 1..={SKINNY_MMA_MAX_M}", a.m),
        ));
    }
    if a.n == 0 || !skinny_mma_fits(a.weight_type, a.k) {
        return Err(KernelError::invalid(
            K,
            format!(
                "n = {}, k = {}: need n > 0 and rows of whole {SPAN_BYTES}-byte spans",
                a.n, a.k
            ),
        ));
    }
    if a.ld_x < a.k || a.ld_out < a.n || !a.ld_x.is_multiple_of(4) {
        return Err(KernelError::invalid(
            K,
            format!(
                "ld_x = {} (>= k = {}, a multiple of 4), ld_out = {} (>= n = {})",
                a.ld_x, a.k, a.ld_out, a.n
            ),
        ));
    }
    let grouped = a.group_rows < a.n;
    if a.group_rows == 0
        || (grouped && !a.group_rows.is_multiple_of(32))
        || !a.x_group_stride.is_multiple_of(4)
    {
        return Err(KernelError::invalid(
            K,
            format!(
                "group_rows = {} (a multiple of 32 below n = {}), x_group_stride = {} (a multiple of 4)",
                a.group_rows, a.n, a.x_group_stride
            ),
        ));
    }
    i32_arg(K, "n", a.n)?;
    i32_arg(K, "k", a.k)?;
    i32_arg(K, "group_rows", a.group_rows)?;
    let mut ptrs = vec![("weight", a.weight), ("x", a.x), ("out", a.out)];
    if a.weight_type == SkinnyWeight::Fp8 {
        ptrs.push(("scale", a.scale));
    }
    nonnull(K, &ptrs)?;
    aligned16(K, &[("weight", a.weight), ("x", a.x)])
}

/// Weight rows per block: 32 when that still gives every SM a block, else 16 (twice the blocks
/// for the small matrices: wq_a, wkv, the shared expert).
pub fn skinny_rows_per_block(n: usize, sms: usize) -> usize {
    if n.div_ceil(32) >= sms {
        32
    } else {
        16
    }
}

/// Warps of a block of `rows` weight rows (the kernels' `WARPS`).
fn warps_per_block(rows: usize) -> usize {
    if rows == 32 {
        8
    } else {
        16
    }
}

/// The `skinny_mma.cu` kernels, indexed [weight type][tokens <= 8, <= 16][16, 32 rows].
pub struct SkinnyMmaFns {
    fns: [[[CudaFunction; 2]; 2]; 2],
}

impl SkinnyMmaFns {
    pub(crate) fn load(module: &Arc<CudaModule>) -> Result<Self, KernelError> {
        let f = |w: &str, t: usize, r: usize| {
            function(module, &format!("dsk_skinny_mma_{w}_t{t}_r{r}"))
        };
        let set = |w: &str| -> Result<[[CudaFunction; 2]; 2], KernelError> {
            Ok([[f(w, 8, 16)?, f(w, 8, 32)?], [f(w, 16, 16)?, f(w, 16, 32)?]])
        };
        Ok(Self {
            fns: [set("fp8")?, set("bf16")?],
        })
    }
}

impl Kernels {
    /// Skinny GEMM on the tensor cores (see [`SkinnyMma`]), one launch.
    ///
    /// # Safety
    /// Every pointer must address device memory of this context: `weight` `n * k` elements (and
    /// its FP8 scale grid), `x` rows `0..m` of stride `ld_x` (plus the group offsets) of which `k`
    /// values are read, `out` `m` rows of stride `ld_out` (not overlapping `x`).
    pub unsafe fn skinny_mma(&self, stream: &CudaStream, a: &SkinnyMma) -> Result<(), KernelError> {
        check_skinny_mma(a)?;
        const K: &str = "skinny_mma";
        let rows = skinny_rows_per_block(a.n, self.sms);
        let func = &self.skinny_mma.fns[usize::from(a.weight_type == SkinnyWeight::Bf16)]
            [usize::from(a.m > 8)][usize::from(rows == 32)];
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, a.n.div_ceil(rows))?, 1, 1),
            block_dim: ((32 * warps_per_block(rows)) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (m, n, k, group_rows) = (
            i32_arg(K, "m", a.m)?,
            i32_arg(K, "n", a.n)?,
            i32_arg(K, "k", a.k)?,
            i32_arg(K, "group_rows", a.group_rows)?,
        );
        let (ld_x, ld_out, xgs) = (
            i64_arg(K, "ld_x", a.ld_x)?,
            i64_arg(K, "ld_out", a.ld_out)?,
            i64_arg(K, "x_group_stride", a.x_group_stride)?,
        );
        stream
            .kernel(func)
            .arg(&a.weight)
            .arg(&a.scale)
            .arg(&a.x)
            .arg(&a.out)
            .arg(&m)
            .arg(&n)
            .arg(&k)
            .arg(&ld_x)
            .arg(&ld_out)
            .arg(&group_rows)
            .arg(&xgs)
            .launch(cfg)
            .map_err(KernelError::driver("launch skinny_mma"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(m: usize, n: usize, k: usize, w: SkinnyWeight) -> SkinnyMma {
        SkinnyMma::plain(256, w, 512, 1024, 2048, (m, n, k))
    }

    #[test]
    fn launch_checks() {
        use SkinnyWeight::{Bf16, Fp8};
        assert!(check_skinny_mma(&call(16, 4096, 4096, Fp8)).is_ok());
        assert!(check_skinny_mma(&call(2, 129_280, 4096, Bf16)).is_ok());
        assert!(check_skinny_mma(&call(5, 3, 64, Fp8)).is_ok());
        assert!(check_skinny_mma(&call(5, 3, 32, Bf16)).is_ok());
        // k not a whole number of 64-byte spans, m out of range, empty n.
        assert!(check_skinny_mma(&call(2, 8, 32, Fp8)).is_err());
        assert!(check_skinny_mma(&call(2, 8, 48, Bf16)).is_err());
        assert!(check_skinny_mma(&call(17, 8, 64, Fp8)).is_err());
        assert!(check_skinny_mma(&call(0, 8, 64, Fp8)).is_err());
        assert!(check_skinny_mma(&call(2, 0, 64, Fp8)).is_err());
        // FP8 needs its scales; bf16 does not.
        let mut no_scale = call(2, 8, 64, Fp8);
        no_scale.scale = 0;
        assert!(check_skinny_mma(&no_scale).is_err());
        no_scale.weight_type = Bf16;
        assert!(check_skinny_mma(&no_scale).is_ok());
        // Grouped: groups of whole 32-row blocks, 16-byte aligned group offsets.
        let grouped = SkinnyMma {
            group_rows: 1024,
            x_group_stride: 4096,
            ld_x: 32768,
            ..call(16, 8192, 4096, Fp8)
        };
        assert!(check_skinny_mma(&grouped).is_ok());
        assert!(check_skinny_mma(&SkinnyMma {
            group_rows: 1000,
            ..grouped
        })
        .is_err());
        assert!(check_skinny_mma(&SkinnyMma {
            x_group_stride: 4098,
            ..grouped
        })
        .is_err());
        assert!(check_skinny_mma(&SkinnyMma {
            ld_x: 4000,
            ..grouped
        })
        .is_err());
        // Misaligned activations.
        assert!(check_skinny_mma(&SkinnyMma {
            x: 1028,
            ..call(2, 8, 64, Fp8)
        })
        .is_err());
    }

    #[test]
    fn pays_from_four_rows_on_large_enough_matrices() {
        use SkinnyWeight::{Bf16, Fp8};
        assert!(!skinny_mma_pays(Fp8, 1, 16_384, 1024));
        assert!(!skinny_mma_pays(Fp8, 3, 16_384, 1024));
        assert!(skinny_mma_pays(Fp8, 4, 16_384, 1024));
        assert!(skinny_mma_pays(Bf16, 16, 64_640, 4096));
        assert!(!skinny_mma_pays(Bf16, 16, 256, 4096));
        assert!(!skinny_mma_pays(Fp8, 17, 4096, 4096));
        assert!(!skinny_mma_pays(Fp8, 8, 4096, 32));
    }

    #[test]
    fn rows_per_block_fill_the_sms() {
        assert_eq!(skinny_rows_per_block(32_768, 132), 32);
        assert_eq!(skinny_rows_per_block(4224, 132), 32);
        assert_eq!(skinny_rows_per_block(4096, 132), 16);
        assert_eq!(skinny_rows_per_block(1024, 132), 16);
    }
}
