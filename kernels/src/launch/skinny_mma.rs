//! Launches of `skinny_mma.cu`: projections of 2..=16 f32 activation rows (decode batches, DSpark
//! verify) on the tensor cores, with every activation split into two halves so the products keep
//! f32 precision (see the kernels' headers). FP8 (block-scaled) weights take the f16 kernel that
//! stages the activations once per block and splits K over a thread-block cluster where it fits
//! ([`skinny_f16_plan`]), bf16 weights (and FP8 ones it does not fit) the TF32 kernel. One launch
//! per call; no launch synchronises or allocates.

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

/// K range of one round of an f16 block's weight loads (`SKF_SPANS` spans: 16 loads a lane).
const F16_ROUND_K: usize = 512;
/// Largest K range one f16 block stages (64 KB of B fragments at 16 tokens).
const F16_MAX_BLOCK_K: usize = 1024;
/// Smallest K range a cluster split made only to spread a small matrix leaves a block.
const F16_MIN_BLOCK_K: usize = 256;
/// Largest cluster (the portable size).
const F16_MAX_CLUSTER: usize = 8;
/// `SkinnyPath::Auto` takes the f16 kernel above this many tokens. At 9-16 tokens it is faster
/// on every V4-Flash projection (H200, TP=2 shapes: wq_b 17.8 -> 15.0 us, wo_b 25.6 -> 21.9,
/// wq_a 13.0 -> 11.6); at 8 and fewer the TF32 kernel, which streams each warp's rows over the
/// whole K, is as fast or faster on the matrices whose K takes a cluster of 8 (wo_b 12.9 against
/// 18.1 us), so `Auto` keeps it there (docs/KERNELS.md).
pub const F16_AUTO_ABOVE_M: usize = 8;

/// Which skinny kernel runs FP8 weights (`DSPARK_SKINNY_KERNEL=tf32|f16`, default `auto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkinnyPath {
    /// f16 for more than [`F16_AUTO_ABOVE_M`] tokens where [`skinny_f16_plan`] fits, TF32
    /// otherwise; bf16 weights always TF32.
    Auto,
    /// The TF32 kernel for every weight.
    Tf32,
    /// The f16 cluster kernel; an FP8 call it does not fit is an error.
    F16,
}

impl SkinnyPath {
    /// `DSPARK_SKINNY_KERNEL` (unset or unknown: `Auto`).
    pub fn from_env() -> Self {
        match std::env::var("DSPARK_SKINNY_KERNEL")
            .as_deref()
            .map(str::trim)
        {
            Ok("tf32") => Self::Tf32,
            Ok("f16") => Self::F16,
            _ => Self::Auto,
        }
    }
}

/// How the f16 kernel covers an `[n, k]` FP8 weight: blocks of `rows_per_block` rows (one
/// 16-row tile a warp), `cluster` of them along K (each taking `k / cluster`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkinnyF16Plan {
    /// 128 where the K range is whole 128s (and groups whole blocks), else 64.
    pub rows_per_block: usize,
    /// 1, 2, 4 or 8.
    pub cluster: usize,
}

impl SkinnyF16Plan {
    /// Dynamic shared memory of a block: B fragments, span unscales, the partial tile.
    pub fn smem_bytes(&self, k: usize, m: usize) -> usize {
        let kb = k / self.cluster;
        let token_tiles = if m > 8 { 2 } else { 1 };
        kb / 16 * token_tiles * 32 * 16 + kb / 64 * 16 * 4 + 16 * (self.rows_per_block + 4) * 4
    }
}

/// The f16 kernel's split of an FP8 projection, or `None` where it does not fit: the smallest
/// cluster whose blocks' K ranges are whole spans of at most 512 (one round of loads; up to 1024
/// in two rounds where 8 blocks do not reach that), doubled further (to ranges of 256) while the
/// blocks do not cover the SMs once; groups (wo_a) of whole blocks. Depends on the shape only,
/// never on `m`, so a token's result does not depend on the batch it is in.
pub fn skinny_f16_plan(a: &SkinnyMma, sms: usize) -> Option<SkinnyF16Plan> {
    if a.weight_type != SkinnyWeight::Fp8 || a.n == 0 || a.k == 0 {
        return None;
    }
    // An 8-warp block stages its K range in whole rounds of its 256 threads: 2 x 8 tokens x Kb
    // values, so Kb must be a multiple of 128 (a 4-warp block's 64 always is).
    // 128-row blocks (8 warps) wherever they fit, 64 (4 warps) otherwise: the larger block stages
    // the activations once for twice the rows, and is faster even where it leaves SMs without a
    // block (a chain of launches at 16 tokens, H200: [1024, 4096] 10.0 -> 7.9 us in 64 blocks,
    // [512, 4096] 8.1 -> 7.5 us in 32; docs/KERNELS.md).
    let wide = f16_plan_with(a, sms, 128).filter(|p| (a.k / p.cluster).is_multiple_of(128));
    wide.or_else(|| f16_plan_with(a, sms, 64))
}

/// [`skinny_f16_plan`] for blocks of `rows_per_block` rows.
fn f16_plan_with(a: &SkinnyMma, sms: usize, rows_per_block: usize) -> Option<SkinnyF16Plan> {
    if a.group_rows < a.n && !a.group_rows.is_multiple_of(rows_per_block) {
        return None;
    }
    let halves = |c: usize| c < F16_MAX_CLUSTER && a.k.is_multiple_of(SPAN_BYTES * 2 * c);
    let mut cluster = 1;
    while a.k / cluster > F16_ROUND_K && halves(cluster) {
        cluster *= 2;
    }
    let row_blocks = a.n.div_ceil(rows_per_block);
    while row_blocks * cluster < sms && halves(cluster) && a.k / (2 * cluster) >= F16_MIN_BLOCK_K {
        cluster *= 2;
    }
    (a.k.is_multiple_of(SPAN_BYTES * cluster) && a.k / cluster <= F16_MAX_BLOCK_K).then_some(
        SkinnyF16Plan {
            rows_per_block,
            cluster,
        },
    )
}

/// The `skinny_mma.cu` kernels: TF32 indexed [weight type][tokens <= 8, <= 16][16, 32 rows],
/// f16 (FP8 weights) [tokens <= 8, <= 16][64, 128 rows].
pub struct SkinnyMmaFns {
    fns: [[[CudaFunction; 2]; 2]; 2],
    f16: [[CudaFunction; 2]; 2],
    path: SkinnyPath,
    clusters: bool,
}

impl SkinnyMmaFns {
    /// `clusters`: whether the device launches thread-block clusters (sm_90+); without them
    /// every FP8 call takes the TF32 kernel, whatever `DSPARK_SKINNY_KERNEL` says.
    pub(crate) fn load(module: &Arc<CudaModule>, clusters: bool) -> Result<Self, KernelError> {
        let f = |w: &str, t: usize, r: usize| {
            function(module, &format!("dsk_skinny_mma_{w}_t{t}_r{r}"))
        };
        let set = |w: &str| -> Result<[[CudaFunction; 2]; 2], KernelError> {
            Ok([[f(w, 8, 16)?, f(w, 8, 32)?], [f(w, 16, 16)?, f(w, 16, 32)?]])
        };
        let h = |t: usize, r: usize| function(module, &format!("dsk_skinny_f16_fp8_t{t}_r{r}"));
        Ok(Self {
            fns: [set("fp8")?, set("bf16")?],
            f16: [[h(8, 64)?, h(8, 128)?], [h(16, 64)?, h(16, 128)?]],
            path: if clusters {
                SkinnyPath::from_env()
            } else {
                SkinnyPath::Tf32
            },
            clusters,
        })
    }

    /// The f16 kernels, which stage up to ~74 KB of shared memory.
    pub(crate) fn large_smem(&self) -> impl Iterator<Item = &CudaFunction> {
        self.f16.iter().flatten()
    }
}

impl Kernels {
    /// Skinny GEMM on the tensor cores (see [`SkinnyMma`]), one launch.
    ///
    /// # Safety
    /// Every pointer must address device memory of this context: `weight` `n * k` elements (and
    /// its FP8 scale grid), `x` rows `0..m` of stride `ld_x` (plus the group offsets) of which `k`
    /// values are read, `out` `m` rows of stride `ld_out` (not overlapping `x`).
    /// The weights (and scales) are read before the kernel waits for the previous kernel of the
    /// stream (PDL): no kernel still running before this launch may write them.
    pub unsafe fn skinny_mma(&self, stream: &CudaStream, a: &SkinnyMma) -> Result<(), KernelError> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.skinny_mma_path(stream, a, self.skinny_mma.path) }
    }

    /// The skinny kernel `DSPARK_SKINNY_KERNEL` picks at load ([`SkinnyPath`]).
    pub fn skinny_path(&self) -> SkinnyPath {
        self.skinny_mma.path
    }

    /// [`Self::skinny_mma`] on the given kernel (A/B timing and tests).
    ///
    /// # Safety
    /// As [`Self::skinny_mma`].
    pub unsafe fn skinny_mma_path(
        &self,
        stream: &CudaStream,
        a: &SkinnyMma,
        path: SkinnyPath,
    ) -> Result<(), KernelError> {
        check_skinny_mma(a)?;
        const K: &str = "skinny_mma";
        let f16_wanted = match path {
            SkinnyPath::Tf32 => false,
            SkinnyPath::F16 => true,
            SkinnyPath::Auto => self.skinny_mma.clusters && a.m > F16_AUTO_ABOVE_M,
        };
        if f16_wanted {
            if !self.skinny_mma.clusters {
                return Err(KernelError::invalid(
                    K,
                    "the f16 kernel needs thread-block clusters, which this device lacks",
                ));
            }
            match skinny_f16_plan(a, self.sms) {
                // SAFETY: the caller's promise; the plan fits the call.
                Some(plan) => return unsafe { self.skinny_f16(stream, a, plan) },
                None if path == SkinnyPath::F16 => {
                    return Err(KernelError::invalid(
                        K,
                        format!(
                            "the f16 kernel takes FP8 weights whose k = {} splits into at most \
                             {F16_MAX_CLUSTER} blocks of whole {SPAN_BYTES}-value spans, at most \
                             {F16_MAX_BLOCK_K} each, and groups of whole blocks (group_rows = {})",
                            a.k, a.group_rows
                        ),
                    ))
                }
                None => {}
            }
        }
        let rows = skinny_rows_per_block(a.n, self.sms);
        let func = &self.skinny_mma.fns[usize::from(a.weight_type == SkinnyWeight::Bf16)]
            [usize::from(a.m > 8)][usize::from(rows == 32)];
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, a.n.div_ceil(rows))?, 1, 1),
            block_dim: ((32 * warps_per_block(rows)) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller's promise; the TF32 kernels take the call's arguments alone.
        unsafe { submit_skinny(stream, func, a, cfg, None) }
    }

    /// The f16 cluster kernel (checked call, fitting plan).
    ///
    /// # Safety
    /// As [`Self::skinny_mma`].
    unsafe fn skinny_f16(
        &self,
        stream: &CudaStream,
        a: &SkinnyMma,
        plan: SkinnyF16Plan,
    ) -> Result<(), KernelError> {
        const K: &str = "skinny_mma f16";
        let smem = plan.smem_bytes(a.k, a.m);
        if smem > self.smem_optin {
            return Err(KernelError::invalid(
                K,
                format!(
                    "{smem} bytes of shared memory, the device allows {}",
                    self.smem_optin
                ),
            ));
        }
        let func =
            &self.skinny_mma.f16[usize::from(a.m > 8)][usize::from(plan.rows_per_block == 128)];
        let blocks = a.n.div_ceil(plan.rows_per_block) * plan.cluster;
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, blocks)?, 1, 1),
            block_dim: ((plan.rows_per_block / 16 * 32) as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the caller's promise; the f16 kernels take the cluster size last.
        unsafe { submit_skinny(stream, func, a, cfg, Some(plan.cluster)) }
    }
}

/// Submits a skinny kernel with the call's arguments, then, for the f16 form, its cluster size
/// (the blocks grouped into clusters of that many).
///
/// # Safety
/// As [`Kernels::skinny_mma`]; `func` takes exactly these parameters.
unsafe fn submit_skinny(
    stream: &CudaStream,
    func: &CudaFunction,
    a: &SkinnyMma,
    cfg: LaunchConfig,
    cluster: Option<usize>,
) -> Result<(), KernelError> {
    const K: &str = "skinny_mma";
    let cluster_x = cluster.unwrap_or(1);
    let (m, n, k, group_rows, cl) = (
        i32_arg(K, "m", a.m)?,
        i32_arg(K, "n", a.n)?,
        i32_arg(K, "k", a.k)?,
        i32_arg(K, "group_rows", a.group_rows)?,
        i32_arg(K, "cluster", cluster_x)?,
    );
    let (ld_x, ld_out, xgs) = (
        i64_arg(K, "ld_x", a.ld_x)?,
        i64_arg(K, "ld_out", a.ld_out)?,
        i64_arg(K, "x_group_stride", a.x_group_stride)?,
    );
    let mut launch = stream.kernel(func);
    launch
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
        .arg(&xgs);
    if cluster.is_some() {
        launch.arg(&cl);
    }
    // SAFETY: the parameters are the kernel's (the caller's promise for `func`), the pointers
    // valid for the call (the caller's promise for `a`).
    unsafe { launch.launch_clusters(cfg, cluster_x as u32) }
        .map_err(KernelError::driver("launch skinny_mma"))
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
    fn f16_plans_split_k_over_clusters_by_shape_only() {
        use SkinnyWeight::{Bf16, Fp8};
        let plan = |n, k| skinny_f16_plan(&call(16, n, k, Fp8), 132);
        let p = |rows_per_block, cluster| {
            Some(SkinnyF16Plan {
                rows_per_block,
                cluster,
            })
        };
        // V4-Flash at TP=2: wq_a, wq_b, wo_b, the shared expert's w1 and w2, wkv.
        assert_eq!(plan(1024, 4096), p(128, 8));
        assert_eq!(plan(16_384, 1024), p(128, 2));
        assert_eq!(plan(4096, 4096), p(128, 8));
        assert_eq!(plan(4096, 1024), p(128, 4));
        assert_eq!(plan(512, 4096), p(128, 8));
        // Short K stays in one block; odd K ranges split only into whole spans; a K of 8192
        // (wo_b at TP=1) takes two rounds of 512 in each of 8 blocks.
        assert_eq!(plan(3, 64), p(64, 1));
        assert_eq!(plan(130, 192), p(64, 1));
        assert_eq!(plan(1000, 1024), p(128, 4));
        assert_eq!(plan(4096, 8192), p(128, 8));
        // An 8-warp block needs a K range of whole 128s: K = 576 (one block of 576) and 640 (two
        // of 320) take 4-warp blocks.
        assert_eq!(plan(4096, 576), p(64, 1));
        assert_eq!(plan(4096, 640), p(64, 2));
        assert_eq!(plan(4096, 384), p(128, 1));
        // K too long for 8 blocks of 1024, or not whole spans: the TF32 kernel.
        assert_eq!(plan(1024, 16_384), None);
        assert_eq!(plan(1024, 96), None);
        // The same plan whatever m is.
        for m in 1..=16 {
            assert_eq!(
                skinny_f16_plan(&call(m, 4096, 4096, Fp8), 132),
                plan(4096, 4096)
            );
        }
        // bf16 weights, groups of part of a block: no plan.
        assert_eq!(skinny_f16_plan(&call(16, 4096, 4096, Bf16), 132), None);
        let grouped = SkinnyMma {
            group_rows: 32,
            ..call(16, 1024, 4096, Fp8)
        };
        assert_eq!(skinny_f16_plan(&grouped, 132), None);
        let grouped = SkinnyMma {
            group_rows: 1024,
            ..call(16, 8192, 4096, Fp8)
        };
        assert_eq!(skinny_f16_plan(&grouped, 132), p(128, 8));
        // Groups of 64 rows: 4-warp blocks.
        let grouped = SkinnyMma {
            group_rows: 64,
            ..call(16, 4096, 4096, Fp8)
        };
        assert_eq!(skinny_f16_plan(&grouped, 132), p(64, 8));
        let grouped = SkinnyMma {
            group_rows: 96,
            ..call(16, 4032, 4096, Fp8)
        };
        assert_eq!(skinny_f16_plan(&grouped, 132), None);
        // Shared memory at 16 tokens and the largest K range: 64 KB of fragments.
        let wide = p(128, 8).unwrap();
        assert_eq!(wide.smem_bytes(8192, 16), 65_536 + 1024 + 16 * 132 * 4);
        assert_eq!(
            p(64, 8).unwrap().smem_bytes(4096, 8),
            16_384 + 512 + 16 * 68 * 4
        );
    }

    #[test]
    fn rows_per_block_fill_the_sms() {
        assert_eq!(skinny_rows_per_block(32_768, 132), 32);
        assert_eq!(skinny_rows_per_block(4224, 132), 32);
        assert_eq!(skinny_rows_per_block(4096, 132), 16);
        assert_eq!(skinny_rows_per_block(1024, 132), 16);
    }
}
