//! Typed launches. Every entry point takes raw device pointers (`CUdeviceptr`) and shapes, so the
//! CUDA backend can call it on whatever buffers it owns (weights mapped once, activations from its
//! arena) and inside CUDA-graph capture. Shapes are validated before launch; pointer validity is
//! the caller's contract (hence `unsafe`).

use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUdeviceptr, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, LaunchConfig};

use crate::error::KernelError;
use crate::loader::{load_module, target_arch, LoaderConfig, ModuleOrigin};
use crate::sources;
use submit::SubmitKernel;

pub mod attention;
pub mod collective;
pub mod dense_gemv;
pub mod elementwise;
pub mod layer_ops;
pub mod moe_grouped;
pub mod moe_sorted;
pub mod multi_gemv;
pub mod paged;
pub mod skinny_mma;
pub mod submit;

/// Activation element type of a GEMV input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActDtype {
    Bf16,
    F32,
}

/// Element type of a kernel output that supports both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    Bf16,
    F32,
}

impl OutDtype {
    fn flag(self) -> i32 {
        i32::from(self == OutDtype::Bf16)
    }
}

/// Token-count buckets of the FP8 GEMV (one instantiation each; M rounds up to the next).
pub const FP8_GEMV_MAX_M: usize = 16;
const FP8_M_BUCKETS: [usize; 5] = [1, 2, 4, 8, 16];
pub(crate) const FP8_WARPS: usize = 8;
/// Which FP8 GEMV kernel to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Path {
    /// Tensor cores for bf16 activations with m >= FP8_TC_MIN_M, k % 128 == 0 and at least one
    /// 32-row block per SM (the tensor-core kernel does not split K across blocks yet); else CUDA
    /// cores. From the H200 measurements in docs/KERNELS.md.
    Auto,
    /// f32 FMAs on CUDA cores (bf16 or f32 activations, k % 16 == 0).
    CudaCore,
    /// mma.sync f16 (bf16 activations, k % 128 == 0).
    TensorCore,
}

/// Smallest token count that `Fp8Path::Auto` sends to the tensor cores.
pub const FP8_TC_MIN_M: usize = 2;

/// Whether the tensor-core FP8 kernel takes this call.
pub fn fp8_tensor_core_fits(a: &Fp8Gemv) -> bool {
    a.x_dtype == ActDtype::Bf16 && a.k.is_multiple_of(128) && a.m <= FP8_GEMV_MAX_M
}

/// Which FP4 expert kernels to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoePath {
    /// The faster one as measured on H200 (docs/KERNELS.md): mma2 for calls of at least
    /// [`FP4_MMA2_MIN_TOKENS`] tokens (where it fits), v2 below; DSPARK_FP4_KERNEL=v1|v2|mma2 at
    /// load forces one (an A/B switch).
    Auto,
    /// f32 FMAs on CUDA cores (any hidden/inter multiple of 32), v2: the nibble pairs decoded in
    /// fewer integer instructions, results bit-identical to v1.
    CudaCore,
    /// The first CUDA-core kernels (same products and order as v2), kept for A/B timing.
    CudaCoreV1,
    /// mma.sync f16 with an f16 residual column (hidden, inter multiples of 256). Exact to f32
    /// level like the CUDA-core path, but slower on H200 at decode shapes (the FP4 unpacking,
    /// not the multiply-adds, limits both).
    TensorCore,
    /// mma2: the same mma and accuracy, organised for streaming (B fragments staged once per
    /// block, one 16-row tile per warp over the whole K, weights through a cp.async ring, no
    /// shared-memory reduction). Hidden, inter multiples of 256, scale pointers 8-byte aligned;
    /// `Auto` falls back to `CudaCore` otherwise. On H200 faster than v2 from a few tokens up
    /// (T=16: 346 against 433 us), slower at one token (45 against 40 us).
    TensorCoreV2,
}

/// Tokens of an FP4 expert call from which `MoePath::Auto` runs mma2. Measured on H200
/// (`fp4_moe_timing_print`, 4096 hidden, top-6): at one token v2 is faster (40.8 against 45.5 us
/// at inter 2048, 29.1 against 31.9 at 1024: each expert sees one row and the unpacking limits
/// both); at two tokens it depends on the width (mma2 63.1 against 67.6 us at 2048, v2 42.5
/// against 45.0 at 1024, the TP=2 shard); from four tokens mma2 leads at both widths (107 against
/// 122 us and 62.7 against 71.5 at 4; 349 against 434 and 190 against 245 at 16), where v2's
/// per-token FMAs grow and mma2's tensor-core steps do not. Re-measured after v2's two-row
/// gate/up and prefetch-free down and mma2's batched staging (session 28): one token 21.1
/// against 27.4 us at 1024 and 36.6 against 41.4 at 2048; two tokens 35.2 against 40.2 at 1024,
/// 63.4 against 57.5 at 2048 (only TP=1 has that width; left at v2 with the threshold).
pub const FP4_MMA2_MIN_TOKENS: usize = 4;

/// The FP4 expert kernels `MoePath::Auto` runs, from DSPARK_FP4_KERNEL: unset, empty or "auto"
/// = by token count (`Auto`: mma2 from [`FP4_MMA2_MIN_TOKENS`], v2 below), "v2" = `CudaCore`,
/// "v1" = `CudaCoreV1`, "mma2" = `TensorCoreV2` (v2 where mma2 does not fit).
pub fn fp4_kernel_choice(value: Option<&str>) -> Result<MoePath, KernelError> {
    match value.map(str::trim) {
        None | Some("") | Some("auto") => Ok(MoePath::Auto),
        Some("v2") => Ok(MoePath::CudaCore),
        Some("v1") => Ok(MoePath::CudaCoreV1),
        Some("mma2") => Ok(MoePath::TensorCoreV2),
        Some(other) => Err(KernelError::invalid(
            "fp4_moe",
            format!("DSPARK_FP4_KERNEL = {other:?}; expected auto, v1, v2 or mma2"),
        )),
    }
}

/// Where the mma2 gate/up stages its token's activations as B fragments (DSPARK_FP4_MMA2_STAGE:
/// `block` or `once`). `Block`, the default: every block converts its token's row itself,
/// `topk * inter / 64` times a token (about a tenth of the kernel's warp samples under ncu at 16
/// tokens, session 36). `Once`: one launch (`dsk_fp4_moe_stage_b_mma2`, a block a token) writes
/// every token's fragments into the call's `partial` scratch, which down only writes later, and
/// each gate/up block copies its token's by cp.async (`dsk_fp4_moe_gate_up_mma2_pre`); its first
/// form, whose copy took nine round trips to L2, made a 16-token step 0.9 ms slower, and the
/// one-round-trip copy has not yet been timed on a GPU (docs/PERFORMANCE.md, session 36). The
/// same fragments either way, so the same bits (GPU test
/// `fp4_moe_mma2_matches_the_reference_and_v2`, CPU emulation `tools/fp4_moe_mma2_emu.cpp`).
/// Calls whose `partial` cannot hold the fragments (top-1: they need 4.5 bytes a value) stage in
/// the blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mma2Staging {
    Once,
    Block,
}

/// [`Mma2Staging`] from DSPARK_FP4_MMA2_STAGE's value (unset or empty: `Block`).
pub fn mma2_staging_choice(value: Option<&str>) -> Result<Mma2Staging, KernelError> {
    let forms = [("block", Mma2Staging::Block), ("once", Mma2Staging::Once)];
    attention::env_switch("fp4_moe", "DSPARK_FP4_MMA2_STAGE", value, &forms)
}

/// Bytes of the mma2 B fragments of `tokens` activation rows of `k` values (144 per 32 values:
/// the rounded f16 pairs, their residuals and a zero uint4, `MMA2_BQ` in fp4_moe.cu).
pub fn fp4_mma2_staged_b_bytes(tokens: usize, k: usize) -> usize {
    tokens * (k / 32) * 144
}

/// v2's gate/up runs two rows a warp where four would give fewer blocks than this per SM. H200,
/// 200 calls from memory (session 28), four rows -> two: inter 1,024 at 1 / 2 / 3 tokens (192 /
/// 384 / 576 blocks of four) 24.3 -> 21.1, 36.1 -> 35.2, 51.3 -> 48.4 us; inter 2,048 (384 /
/// 768 / 1,152 blocks) 37.4 -> 36.6, 64.1 -> 63.4, 91.4 -> 90.5 us. Larger calls are untimed
/// (v2 runs them only where mma2 does not fit or is switched off) and keep four.
pub const V2_TWO_ROWS_BELOW_BLOCKS_PER_SM: usize = 9;

/// The widest experts whose rows are one 32-value chunk per lane of v2's down (32 lanes x 32
/// values): there its next-chunk prefetch never fires, so the prefetch-free form runs.
const V2_DOWN_ONE_CHUNK_MAX_INTER: usize = 32 * 32;

/// Rows a warp of v2's gate/up (`Kernels::fp4_v2_forms`), from DSPARK_FP4_V2_ROWS: unset, empty
/// or "auto" = by the call's block count (`None`), "2" or "4" always that form (an A/B switch:
/// both give the same bits).
pub fn fp4_v2_rows_choice(value: Option<&str>) -> Result<Option<usize>, KernelError> {
    match value.map(str::trim) {
        None | Some("") | Some("auto") => Ok(None),
        Some("2") => Ok(Some(2)),
        Some("4") => Ok(Some(4)),
        Some(other) => Err(KernelError::invalid(
            "fp4_moe",
            format!("DSPARK_FP4_V2_ROWS = {other:?}; expected auto, 2 or 4"),
        )),
    }
}

/// Whether the tensor-core expert kernels take these shapes.
pub fn moe_tensor_core_fits(hidden: usize, inter: usize) -> bool {
    hidden.is_multiple_of(256) && inter.is_multiple_of(256)
}

/// Whether the mma2 expert kernels take this call: the tensor-core shapes, and scale rows they
/// copy 8 bytes at a time (their stage of 8 chunks; K / 32 is then a multiple of 8).
pub fn moe_mma2_fits(e: &Fp4Experts) -> bool {
    moe_tensor_core_fits(e.hidden, e.inter)
        && [e.s1, e.s3, e.s2].iter().all(|p| p.is_multiple_of(8))
}

/// Rows per block of the FP4 expert kernels (8 warps x 4 rows).
const MOE_ROWS_PER_BLOCK: usize = 32;
/// Warps per block of the mma2 kernels (MMA2_WARPS in fp4_moe.cu), one 16-row tile each.
const MMA2_WARPS: usize = 4;
/// One warp's ring stage for one matrix (MMA2_STAGE): 16 rows x 128 weight bytes + 16 x 8
/// scale bytes; MMA2_NST stages.
const MMA2_STAGE_BYTES: usize = 16 * 128 + 16 * 8;
const MMA2_NST: usize = 3;
const TOPK_CHUNK: usize = 2048;
const TOPK_STAGE2_MAX: usize = 4096;
/// Largest k of `topk` (selection is k block-wide rounds).
pub const TOPK_MAX_K: usize = 64;

/// out[m, n] = sum_k x[m, k] * W[n, k], W e4m3 [n, k] with E8M0 scales [ceil(n/128), ceil(k/128)].
#[derive(Clone, Copy, Debug)]
pub struct Fp8Gemv {
    pub weight: CUdeviceptr,
    pub scale: CUdeviceptr,
    pub x: CUdeviceptr,
    pub x_dtype: ActDtype,
    pub out: CUdeviceptr,
    pub out_dtype: OutDtype,
    /// Rows of x (tokens), 1..=16.
    pub m: usize,
    /// Output features (rows of W).
    pub n: usize,
    /// Input features; multiple of 16.
    pub k: usize,
}

/// Grouped FP8 GEMV (DeepSeek-V4's wo_a in one launch): `n / group_rows` matrices
/// [group_rows, k] stacked into one e4m3 W [n, k] (E8M0 scales [n/128, ceil(k/128)], the groups'
/// scale grids stacked), group g reading its own k inputs of each token:
/// out[m * ld_out + r] = sum_j x[m * ld_x + (r / group_rows) * x_group_stride + j] * W[r, j].
/// f32 activations and output; same arithmetic as the CUDA-core `Fp8Gemv` kernel.
#[derive(Clone, Copy, Debug)]
pub struct Fp8GroupedGemv {
    pub weight: CUdeviceptr,
    pub scale: CUdeviceptr,
    /// f32, row m of group g at `x + m * ld_x + g * x_group_stride` (elements).
    pub x: CUdeviceptr,
    /// f32 [m, ld_out]; columns 0..n written.
    pub out: CUdeviceptr,
    /// Rows of x (tokens), 1..=16.
    pub m: usize,
    /// Output features of all groups together (rows of W).
    pub n: usize,
    /// Input features per group; multiple of 16.
    pub k: usize,
    /// Rows of one group: divides n, multiple of 128.
    pub group_rows: usize,
    /// Elements between the inputs of consecutive groups (multiple of 4).
    pub x_group_stride: usize,
    /// Elements between tokens in x (multiple of 4).
    pub ld_x: usize,
    /// Elements between tokens in out (>= n).
    pub ld_out: usize,
}

/// Routed experts, FP4 weights in the checkpoint layout for ALL `experts` experts of a layer:
/// w1/w3 [experts, inter, hidden/2] + scales [experts, inter, hidden/32]; w2 [experts, hidden,
/// inter/2] + scales [experts, hidden, inter/32].
#[derive(Clone, Copy, Debug)]
pub struct Fp4Experts {
    pub w1: CUdeviceptr,
    pub s1: CUdeviceptr,
    pub w3: CUdeviceptr,
    pub s3: CUdeviceptr,
    pub w2: CUdeviceptr,
    pub s2: CUdeviceptr,
    pub experts: usize,
    pub hidden: usize,
    pub inter: usize,
}

/// One MoE call for `tokens` tokens: x f32 [tokens, hidden]; ids i32 [tokens, topk];
/// weights f32 [tokens, topk] (already normalised and scaled by the router);
/// h f32 [tokens * topk, inter] and partial f32 [tokens * topk, hidden] scratch (h holds the
/// SwiGLU output, partial each slot's weighted down projection and, before down writes it, the
/// mma2 gate/up's staged activations, [`Mma2Staging`]); out [tokens, hidden], plus
/// `addend` f32 [tokens, hidden] where one is given (0 = none).
#[derive(Clone, Copy, Debug)]
pub struct Fp4MoeCall {
    pub x: CUdeviceptr,
    pub ids: CUdeviceptr,
    pub weights: CUdeviceptr,
    pub h: CUdeviceptr,
    pub partial: CUdeviceptr,
    pub out: CUdeviceptr,
    pub out_dtype: OutDtype,
    pub tokens: usize,
    pub topk: usize,
    /// SwiGLU clipping (config `swiglu_limit`, 10 for V4-Flash).
    pub swiglu_limit: f32,
    /// f32 `[tokens, hidden]` added to the sum before `out` is written (the shared expert's
    /// output, saving a launch), or 0.
    pub addend: CUdeviceptr,
}

/// bf16 RMSNorm over rows of length d (strides in elements).
#[derive(Clone, Copy, Debug)]
pub struct RmsNorm {
    pub x: CUdeviceptr,
    pub weight: CUdeviceptr,
    pub out: CUdeviceptr,
    pub rows: usize,
    pub d: usize,
    pub ld_x: usize,
    pub ld_out: usize,
    pub eps: f32,
}

/// In-place interleaved RoPE on the trailing `rope_dim` channels of x [tokens, heads, d] (bf16).
#[derive(Clone, Copy, Debug)]
pub struct Rope {
    pub x: CUdeviceptr,
    /// i32 [tokens]
    pub positions: CUdeviceptr,
    /// f32 [rope_dim / 2] (plain or YaRN-corrected inverse frequencies)
    pub inv_freq: CUdeviceptr,
    pub tokens: usize,
    pub heads: usize,
    pub d: usize,
    pub rope_dim: usize,
    pub ld_token: usize,
    pub ld_head: usize,
    /// attention scaling (YaRN mscale; 1.0 for plain RoPE)
    pub mscale: f32,
    pub inverse: bool,
}

/// Top-k (k = 1: greedy argmax) of f32 logits [rows, vocab] (row stride ld). Writes values f32
/// [rows, k] and indices i32 [rows, k], sorted descending. `workspace` must hold
/// `topk_workspace_bytes(rows, vocab, k)` bytes.
#[derive(Clone, Copy, Debug)]
pub struct TopK {
    pub logits: CUdeviceptr,
    pub rows: usize,
    pub vocab: usize,
    pub ld: usize,
    pub k: usize,
    pub out_values: CUdeviceptr,
    pub out_indices: CUdeviceptr,
    pub workspace: CUdeviceptr,
}

/// Dynamic shared memory of an FP4 expert block staging `len` f32 activations (padded 4 per 32).
pub fn moe_stage_bytes(len: usize) -> usize {
    (len + len / 8) * 4
}

/// Dynamic shared memory of the v2 CUDA-core FP4 expert kernels: the 256-entry f32 table of the
/// E8M0 block scales, then the staged activation row.
pub fn fp4_moe_v2_smem_bytes(len: usize) -> usize {
    256 * 4 + moe_stage_bytes(len)
}

/// Dynamic shared memory of the mma2 FP4 expert kernels for an activation row of `k` values and
/// `matrices` weight matrices per tile (gate/up 2, down 1): the scale table, the B fragments
/// (144 bytes per 32 values: hi, residual and a zero fragment), then each warp's ring.
pub fn fp4_moe_mma2_smem_bytes(k: usize, matrices: usize) -> usize {
    256 * 4 + k / 32 * 144 + MMA2_WARPS * matrices * MMA2_NST * MMA2_STAGE_BYTES
}

/// Scratch bytes `Kernels::topk` needs.
pub fn topk_workspace_bytes(rows: usize, vocab: usize, k: usize) -> usize {
    rows * vocab.div_ceil(TOPK_CHUNK) * k * 8
}

fn i32_arg(kernel: &'static str, what: &str, v: usize) -> Result<i32, KernelError> {
    i32::try_from(v).map_err(|_| KernelError::invalid(kernel, format!("{what} = {v} exceeds i32")))
}

fn i64_arg(kernel: &'static str, what: &str, v: usize) -> Result<i64, KernelError> {
    i64::try_from(v).map_err(|_| KernelError::invalid(kernel, format!("{what} = {v} exceeds i64")))
}

fn u32_grid(kernel: &'static str, v: usize) -> Result<u32, KernelError> {
    u32::try_from(v)
        .map_err(|_| KernelError::invalid(kernel, format!("grid dimension {v} too large")))
}

/// A kernel of a loaded module by name.
pub(crate) fn function(module: &Arc<CudaModule>, name: &str) -> Result<CudaFunction, KernelError> {
    module
        .load_function(name)
        .map_err(KernelError::driver("cuModuleGetFunction"))
}

/// Threads per block of the grid-stride elementwise kernels.
const STRIDE_BLOCK: usize = 256;

/// A grid-stride launch of 256-thread blocks over `len` elements: enough blocks to fill the GPU,
/// no more than the elements need.
pub(crate) fn grid_stride(
    kernel: &'static str,
    len: usize,
    sms: usize,
) -> Result<LaunchConfig, KernelError> {
    let blocks = len.div_ceil(STRIDE_BLOCK).clamp(1, 8 * sms.max(1));
    Ok(LaunchConfig {
        grid_dim: (u32_grid(kernel, blocks)?, 1, 1),
        block_dim: (STRIDE_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn nonnull(kernel: &'static str, ptrs: &[(&str, CUdeviceptr)]) -> Result<(), KernelError> {
    match ptrs.iter().find(|(_, p)| *p == 0) {
        Some((name, _)) => Err(KernelError::invalid(
            kernel,
            format!("{name} is a null pointer"),
        )),
        None => Ok(()),
    }
}

fn aligned16(kernel: &'static str, ptrs: &[(&str, CUdeviceptr)]) -> Result<(), KernelError> {
    match ptrs.iter().find(|(_, p)| !p.is_multiple_of(16)) {
        Some((name, _)) => Err(KernelError::invalid(
            kernel,
            format!("{name} must be 16-byte aligned"),
        )),
        None => Ok(()),
    }
}

/// Warps sharing one row pair along K: the fewest that still give >= 2 blocks per SM, never more
/// than leaves each lane a chunk.
pub fn fp8_ksplit(n: usize, k: usize, sms: usize) -> usize {
    let pairs = n.div_ceil(2);
    let chunks = k / 16;
    let mut ks = 1;
    while ks < FP8_WARPS && pairs.div_ceil(FP8_WARPS / ks) < 2 * sms && 32 * ks * 2 <= chunks {
        ks *= 2;
    }
    ks
}

/// The K split of one-token FP8 CUDA-core launches while the one-chunk kernels are on
/// (`Kernels::set_fp8_one_chunk`): the fewest warps (1, 2, 4 or 8) that leave every lane at most
/// one 16-byte chunk of a row. It depends on k alone.
pub fn fp8_ksplit_one_chunk(k: usize) -> usize {
    let chunks = k / 16;
    let mut ks = 1;
    while ks < FP8_WARPS && 32 * ks < chunks {
        ks *= 2;
    }
    ks
}

/// Longest row the one-chunk kernels take: one 16-byte chunk for each lane of [`FP8_WARPS`] warps.
const FP8_M1C_MAX_K: usize = 16 * 32 * FP8_WARPS;

/// The K split of an FP8 CUDA-core launch of `m` tokens through an `[n, k]` matrix on `sms` SMs,
/// `one_chunk` saying whether the one-chunk kernels may take it (on, f32 in and out):
/// [`fp8_ksplit_one_chunk`] for one token whose row they can hold, else [`fp8_ksplit`], so a launch
/// that ends on the two-row kernels always has their own split. Launches of several tokens keep
/// it too: at the one-chunk split (wo_b's 8 ways instead of 2) a K=5 verify step was 0.4 ms
/// slower. The one-token kernel is then a kernel of its own, as the skinny GEMMs of 4-16 rows are
/// (docs/CUDA.md, batch shape and summation order).
pub fn fp8_split_for(one_chunk: bool, m: usize, n: usize, k: usize, sms: usize) -> usize {
    if one_chunk && m == 1 && k <= FP8_M1C_MAX_K {
        fp8_ksplit_one_chunk(k)
    } else {
        fp8_ksplit(n, k, sms)
    }
}

/// Rows a warp of the one-chunk kernels (`FP8_M1C_ROWS` in fp8_gemv.cu); the others take two.
const FP8_M1C_ROWS: usize = 4;

/// Whether a launch of `m` tokens over inner size `k` split `ks` ways runs on the one-chunk
/// kernels (`dsk_fp8_gemv_*_m1c`) when they are `on`: one token, every lane at most one chunk.
pub fn fp8_takes_one_chunk(on: bool, m: usize, k: usize, ks: usize) -> bool {
    on && m == 1 && k / 16 <= 32 * ks
}

/// Blocks of an FP8 CUDA-core launch over `n` rows split `ks` ways: four rows a warp on the
/// one-chunk kernels, two on the others.
pub fn fp8_gemv_blocks(n: usize, ks: usize, one_chunk: bool) -> usize {
    let rows = if one_chunk { FP8_M1C_ROWS } else { 2 };
    n.div_ceil(rows).div_ceil(FP8_WARPS / ks)
}

/// The FP8 GEMV's token bucket for m tokens.
pub fn fp8_m_bucket(m: usize) -> Option<usize> {
    FP8_M_BUCKETS.iter().copied().find(|&b| b >= m)
}

/// The token count and matrix shape every FP8 GEMV launch takes.
fn check_fp8_shape(kernel: &'static str, m: usize, n: usize, k: usize) -> Result<(), KernelError> {
    if m == 0 || m > FP8_GEMV_MAX_M {
        return Err(KernelError::invalid(
            kernel,
            format!("m = {m} must be in 1..={FP8_GEMV_MAX_M}"),
        ));
    }
    if n == 0 || k == 0 || !k.is_multiple_of(16) {
        return Err(KernelError::invalid(
            kernel,
            format!("n = {n}, k = {k}: need n > 0 and k a positive multiple of 16"),
        ));
    }
    Ok(())
}

/// Launch-time checks of an FP8 GEMV, separate so they are testable without a GPU.
pub fn check_fp8_gemv(a: &Fp8Gemv) -> Result<(), KernelError> {
    const K: &str = "fp8_gemv";
    check_fp8_shape(K, a.m, a.n, a.k)?;
    nonnull(
        K,
        &[
            ("weight", a.weight),
            ("scale", a.scale),
            ("x", a.x),
            ("out", a.out),
        ],
    )?;
    aligned16(K, &[("weight", a.weight), ("x", a.x)])
}

/// Launch-time checks of a grouped FP8 GEMV (testable without a GPU).
pub fn check_fp8_grouped_gemv(a: &Fp8GroupedGemv) -> Result<(), KernelError> {
    const K: &str = "fp8_gemv_grouped";
    check_fp8_shape(K, a.m, a.n, a.k)?;
    // A 128-row scale tile must not span two groups, and a warp's row pair must share one.
    if a.group_rows == 0 || !a.group_rows.is_multiple_of(128) || !a.n.is_multiple_of(a.group_rows) {
        return Err(KernelError::invalid(
            K,
            format!(
                "group_rows = {} must be a positive multiple of 128 dividing n = {}",
                a.group_rows, a.n
            ),
        ));
    }
    // x rows are read 16 bytes at a time.
    if !a.ld_x.is_multiple_of(4) || !a.x_group_stride.is_multiple_of(4) {
        return Err(KernelError::invalid(
            K,
            format!(
                "ld_x = {}, x_group_stride = {} must be multiples of 4 (16-byte f32 loads)",
                a.ld_x, a.x_group_stride
            ),
        ));
    }
    let groups = a.n / a.group_rows;
    let x_span = (groups - 1)
        .checked_mul(a.x_group_stride)
        .and_then(|v| v.checked_add(a.k));
    if x_span.is_none_or(|span| span > a.ld_x) {
        return Err(KernelError::invalid(
            K,
            format!(
                "{groups} groups x_group_stride = {} with k = {} overrun ld_x = {}",
                a.x_group_stride, a.k, a.ld_x
            ),
        ));
    }
    if a.ld_out < a.n {
        return Err(KernelError::invalid(
            K,
            format!("ld_out = {} < n = {}", a.ld_out, a.n),
        ));
    }
    // The kernel indexes with 64-bit m * ld products and 32-bit shapes.
    for (what, v) in [
        ("m", a.m),
        ("n", a.n),
        ("k", a.k),
        ("group_rows", a.group_rows),
    ] {
        i32_arg(K, what, v)?;
    }
    for (what, v) in [
        ("x_group_stride", a.x_group_stride),
        ("ld_x", a.ld_x),
        ("ld_out", a.ld_out),
    ] {
        i64_arg(K, what, v)?;
    }
    if a.ld_x.checked_mul(a.m).is_none() || a.ld_out.checked_mul(a.m).is_none() {
        return Err(KernelError::invalid(K, "m * ld overflows"));
    }
    nonnull(
        K,
        &[
            ("weight", a.weight),
            ("scale", a.scale),
            ("x", a.x),
            ("out", a.out),
        ],
    )?;
    aligned16(K, &[("weight", a.weight), ("x", a.x)])?;
    if !a.out.is_multiple_of(4) {
        return Err(KernelError::invalid(K, "out must be 4-byte aligned (f32)"));
    }
    Ok(())
}

pub fn check_fp4_moe(e: &Fp4Experts, c: &Fp4MoeCall) -> Result<(), KernelError> {
    const K: &str = "fp4_moe";
    if e.hidden == 0 || e.inter == 0 || !e.hidden.is_multiple_of(32) || !e.inter.is_multiple_of(32)
    {
        return Err(KernelError::invalid(
            K,
            format!(
                "hidden = {}, inter = {} must be positive multiples of 32",
                e.hidden, e.inter
            ),
        ));
    }
    if e.experts == 0 || c.tokens == 0 || c.topk == 0 || c.topk > e.experts {
        return Err(KernelError::invalid(
            K,
            format!(
                "experts = {}, tokens = {}, topk = {}",
                e.experts, c.tokens, c.topk
            ),
        ));
    }
    if c.swiglu_limit.is_nan() || c.swiglu_limit <= 0.0 {
        return Err(KernelError::invalid(
            K,
            format!("swiglu_limit = {} must be > 0", c.swiglu_limit),
        ));
    }
    let ptrs = [
        ("w1", e.w1),
        ("s1", e.s1),
        ("w3", e.w3),
        ("s3", e.s3),
        ("w2", e.w2),
        ("s2", e.s2),
    ];
    nonnull(K, &ptrs)?;
    nonnull(
        K,
        &[
            ("partial", c.partial),
            ("x", c.x),
            ("ids", c.ids),
            ("weights", c.weights),
            ("h", c.h),
            ("out", c.out),
        ],
    )?;
    aligned16(
        K,
        &[
            ("w1", e.w1),
            ("w3", e.w3),
            ("w2", e.w2),
            ("x", c.x),
            ("h", c.h),
        ],
    )
}

pub fn check_rmsnorm(a: &RmsNorm) -> Result<(), KernelError> {
    const K: &str = "rmsnorm";
    if a.rows == 0
        || a.d == 0
        || !a.d.is_multiple_of(8)
        || !a.ld_x.is_multiple_of(8)
        || !a.ld_out.is_multiple_of(8)
        || a.ld_x < a.d
        || a.ld_out < a.d
    {
        return Err(KernelError::invalid(K, format!("rows = {}, d = {}, ld_x = {}, ld_out = {}: d and strides must be multiples of 8, strides >= d", a.rows, a.d, a.ld_x, a.ld_out)));
    }
    nonnull(K, &[("x", a.x), ("weight", a.weight), ("out", a.out)])?;
    aligned16(K, &[("x", a.x), ("weight", a.weight), ("out", a.out)])
}

pub fn check_rope(a: &Rope) -> Result<(), KernelError> {
    const K: &str = "rope";
    if a.tokens == 0
        || a.heads == 0
        || a.rope_dim == 0
        || !a.rope_dim.is_multiple_of(8)
        || a.rope_dim > a.d
        || !(a.d - a.rope_dim).is_multiple_of(8)
    {
        return Err(KernelError::invalid(
            K,
            format!(
                "d = {}, rope_dim = {}: rope_dim and d - rope_dim must be multiples of 8",
                a.d, a.rope_dim
            ),
        ));
    }
    if !a.ld_head.is_multiple_of(8)
        || !a.ld_token.is_multiple_of(8)
        || a.ld_head < a.d
        || a.ld_token < a.ld_head * (a.heads - 1) + a.d
    {
        return Err(KernelError::invalid(
            K,
            format!(
                "strides ld_token = {}, ld_head = {} do not fit [heads = {}, d = {}]",
                a.ld_token, a.ld_head, a.heads, a.d
            ),
        ));
    }
    nonnull(
        K,
        &[
            ("x", a.x),
            ("positions", a.positions),
            ("inv_freq", a.inv_freq),
        ],
    )?;
    aligned16(K, &[("x", a.x)])
}

pub fn check_topk(a: &TopK) -> Result<(), KernelError> {
    const K: &str = "topk";
    if a.rows == 0 || a.vocab == 0 || a.ld < a.vocab {
        return Err(KernelError::invalid(
            K,
            format!("rows = {}, vocab = {}, ld = {}", a.rows, a.vocab, a.ld),
        ));
    }
    if a.k == 0 || a.k > TOPK_MAX_K || a.k > a.vocab {
        return Err(KernelError::invalid(
            K,
            format!("k = {} must be in 1..={TOPK_MAX_K} and <= vocab", a.k),
        ));
    }
    if a.vocab.div_ceil(TOPK_CHUNK) * a.k > TOPK_STAGE2_MAX {
        return Err(KernelError::invalid(
            K,
            format!(
                "vocab {} with k {} exceeds the merge stage ({TOPK_STAGE2_MAX} candidates)",
                a.vocab, a.k
            ),
        ));
    }
    nonnull(
        K,
        &[
            ("logits", a.logits),
            ("out_values", a.out_values),
            ("out_indices", a.out_indices),
            ("workspace", a.workspace),
        ],
    )
}

/// All kernels loaded into one context, with the device facts their launches need.
pub struct Kernels {
    ctx: Arc<CudaContext>,
    arch: String,
    sms: usize,
    origins: Vec<(&'static str, ModuleOrigin)>,
    fp8_gemv: [[CudaFunction; 5]; 2],
    fp8_gemv_grouped: [CudaFunction; 5],
    fp8_gemv_multi: CudaFunction,
    /// The one-chunk kernels: plain, grouped, merged (`fp8_takes_one_chunk`).
    fp8_m1c: [CudaFunction; 3],
    /// Whether one-token FP8 launches take them (on unless DSPARK_FP8_ONE_CHUNK=0 at load).
    fp8_one_chunk: bool,
    fp8_tc: [CudaFunction; 2],
    fp4_gate_up: CudaFunction,
    fp4_down: CudaFunction,
    /// v2 with two rows a warp (calls of few pairs, [`Self::fp4_v2_forms`]).
    fp4_gate_up_r2: CudaFunction,
    /// v2 down without the prefetch (inter up to 1,024, [`Self::fp4_v2_forms`]).
    fp4_down_once: CudaFunction,
    fp4_gate_up_v1: CudaFunction,
    fp4_down_v1: CudaFunction,
    /// What `MoePath::Auto` runs (DSPARK_FP4_KERNEL at load).
    fp4_auto: MoePath,
    /// v2 gate/up's rows a warp when forced (DSPARK_FP4_V2_ROWS at load), else by block count.
    fp4_v2_rows: Option<usize>,
    fp4_combine: CudaFunction,
    fp4_gate_up_mma: CudaFunction,
    fp4_down_mma: CudaFunction,
    fp4_gate_up_mma2: CudaFunction,
    /// The gate/up on fragments staged once a token, and that staging (`Mma2Staging::Once`).
    fp4_gate_up_mma2_pre: CudaFunction,
    fp4_stage_b_mma2: CudaFunction,
    /// Where the mma2 gate/up stages its activations (DSPARK_FP4_MMA2_STAGE at load).
    mma2_staging: Mma2Staging,
    fp4_down_mma2: CudaFunction,
    /// Largest dynamic shared memory a block may opt in to (bytes).
    smem_optin: usize,
    rmsnorm: CudaFunction,
    rope: CudaFunction,
    topk1: CudaFunction,
    topk2: CudaFunction,
    spin: CudaFunction,
    kv_scatter: CudaFunction,
    kv_gather: CudaFunction,
    attend_partial: CudaFunction,
    attend_partial_heads: CudaFunction,
    attend_partial_heads_tc: CudaFunction,
    attend_partial_heads_tc32: CudaFunction,
    attend_partial_heads_f16: CudaFunction,
    attend_partial_heads_f16x32: CudaFunction,
    attend_combine: CudaFunction,
    attend_combine_one: CudaFunction,
    indexer_scores: CudaFunction,
    indexer_scores_tiled: CudaFunction,
    indexer_scores_tiled16: CudaFunction,
    /// How the tiled indexer's tile height is picked (DSPARK_INDEXER_TILE at load).
    indexer_tile: attention::IndexerTileChoice,
    indexer_scores_mma: CudaFunction,
    indexer_scores_mma_f16: CudaFunction,
    /// Whether FP8 rows take the f16 tensor-core indexer (DSPARK_INDEXER_F16 at load).
    indexer_f16: bool,
    swiglu_clip: CudaFunction,
    add: CudaFunction,
    topk_select: CudaFunction,
    topk_select_segments: CudaFunction,
    topk_select_reduce: CudaFunction,
    topk_select_merge: CudaFunction,
    topk_merge_ranks: CudaFunction,
    topk_select_smem: CudaFunction,
    topk_merge_ranks_smem: CudaFunction,
    /// Which block form the many-token selects take (DSPARK_TOPK_BLOCK at load).
    topk_block: attention::TopKBlockChoice,
    /// Which kernel routes tokens (DSPARK_ROUTE_KERNEL at load).
    route_kernel: layer_ops::RouteKernel,
    fp8_dequant: CudaFunction,
    fp8_dequant_f16: CudaFunction,
    rows_to_f16: CudaFunction,
    paged: paged::PagedFns,
    layer_ops: layer_ops::LayerOpsFns,
    dense_gemv: dense_gemv::DenseGemvFns,
    moe_sorted: moe_sorted::MoeSortedFns,
    moe_grouped: moe_grouped::MoeGroupedFns,
    skinny_mma: skinny_mma::SkinnyMmaFns,
    collective: collective::CollectiveFns,
}

impl Kernels {
    /// Loads every module for the context's device (prebuilt, cache, or NVRTC; see `loader`).
    pub fn load(ctx: &Arc<CudaContext>, cfg: &LoaderConfig) -> Result<Self, KernelError> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(KernelError::driver("compute capability"))?;
        let arch = target_arch(major, minor)?;
        submit::enable_pdl(major);
        let sms = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(KernelError::driver("multiprocessor count"))?;
        let mut origins = Vec::new();
        let mut module = |src: &sources::KernelSource| {
            let (m, origin) = load_module(ctx, src, &arch, cfg)?;
            origins.push((src.name, origin));
            Ok::<_, KernelError>(m)
        };
        let smem_optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(KernelError::driver("shared memory opt-in limit"))?;
        let smem_optin = usize::try_from(smem_optin).unwrap_or(0);
        // The f16 skinny GEMM splits K over thread-block clusters; without them it stays off.
        let clusters = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH)
            .map_err(KernelError::driver("cluster launch support"))?
            != 0;
        let fp8 = module(&sources::FP8_GEMV)?;
        let moe = module(&sources::FP4_MOE)?;
        let norm = module(&sources::RMSNORM)?;
        let rope = module(&sources::ROPE)?;
        let samp = module(&sources::SAMPLING)?;
        let timing = module(&sources::TIMING)?;
        let attn = module(&sources::ATTENTION)?;
        let elementwise = module(&sources::ELEMENTWISE)?;
        let fp4_auto = fp4_kernel_choice(std::env::var("DSPARK_FP4_KERNEL").ok().as_deref())?;
        let fp4_v2_rows = fp4_v2_rows_choice(std::env::var("DSPARK_FP4_V2_ROWS").ok().as_deref())?;
        let indexer_tile =
            attention::indexer_tile_choice(std::env::var("DSPARK_INDEXER_TILE").ok().as_deref())?;
        let topk_block =
            attention::topk_block_choice(std::env::var("DSPARK_TOPK_BLOCK").ok().as_deref())?;
        let route_kernel =
            layer_ops::route_kernel_choice(std::env::var("DSPARK_ROUTE_KERNEL").ok().as_deref())?;
        let mma2_staging =
            mma2_staging_choice(std::env::var("DSPARK_FP4_MMA2_STAGE").ok().as_deref())?;
        let f = function;
        // One instantiation per token bucket: `{prefix}_m1` .. `{prefix}_m16`.
        let fp8_fns = |prefix: &str| -> Result<[CudaFunction; 5], KernelError> {
            Ok([
                f(&fp8, &format!("{prefix}_m1"))?,
                f(&fp8, &format!("{prefix}_m2"))?,
                f(&fp8, &format!("{prefix}_m4"))?,
                f(&fp8, &format!("{prefix}_m8"))?,
                f(&fp8, &format!("{prefix}_m16"))?,
            ])
        };
        let kernels = Self {
            fp8_gemv: [
                fp8_fns("dsk_fp8_gemv_xbf16")?,
                fp8_fns("dsk_fp8_gemv_xf32")?,
            ],
            fp8_gemv_grouped: fp8_fns("dsk_fp8_gemv_grouped_xf32")?,
            fp8_gemv_multi: f(&fp8, "dsk_fp8_gemv_multi_xf32_m1")?,
            fp8_m1c: [
                f(&fp8, "dsk_fp8_gemv_xf32_m1c")?,
                f(&fp8, "dsk_fp8_gemv_grouped_xf32_m1c")?,
                f(&fp8, "dsk_fp8_gemv_multi_xf32_m1c")?,
            ],
            fp8_one_chunk: std::env::var("DSPARK_FP8_ONE_CHUNK").map_or(true, |v| v.trim() != "0"),
            fp8_tc: [
                f(&fp8, "dsk_fp8_gemm_tc_xbf16_n8")?,
                f(&fp8, "dsk_fp8_gemm_tc_xbf16_n16")?,
            ],
            fp4_gate_up: f(&moe, "dsk_fp4_moe_gate_up_v2")?,
            fp4_down: f(&moe, "dsk_fp4_moe_down_v2")?,
            fp4_gate_up_r2: f(&moe, "dsk_fp4_moe_gate_up_v2_r2")?,
            fp4_down_once: f(&moe, "dsk_fp4_moe_down_v2_once")?,
            fp4_gate_up_v1: f(&moe, "dsk_fp4_moe_gate_up")?,
            fp4_down_v1: f(&moe, "dsk_fp4_moe_down")?,
            fp4_auto,
            fp4_v2_rows,
            fp4_combine: f(&moe, "dsk_fp4_moe_combine")?,
            fp4_gate_up_mma: f(&moe, "dsk_fp4_moe_gate_up_mma")?,
            fp4_down_mma: f(&moe, "dsk_fp4_moe_down_mma")?,
            fp4_gate_up_mma2: f(&moe, "dsk_fp4_moe_gate_up_mma2")?,
            fp4_gate_up_mma2_pre: f(&moe, "dsk_fp4_moe_gate_up_mma2_pre")?,
            fp4_stage_b_mma2: f(&moe, "dsk_fp4_moe_stage_b_mma2")?,
            mma2_staging,
            fp4_down_mma2: f(&moe, "dsk_fp4_moe_down_mma2")?,
            moe_grouped: moe_grouped::MoeGroupedFns::load(&moe, smem_optin, &arch)?,
            smem_optin,
            rmsnorm: f(&norm, "dsk_rmsnorm_bf16")?,
            rope: f(&rope, "dsk_rope_interleaved_bf16")?,
            topk1: f(&samp, "dsk_topk_stage1")?,
            topk2: f(&samp, "dsk_topk_stage2")?,
            spin: f(&timing, "dsk_spin_ns")?,
            kv_scatter: f(&attn, "dsk_kv_scatter_f32")?,
            kv_gather: f(&attn, "dsk_kv_gather_f32")?,
            attend_partial: f(&attn, "dsk_attend_partial_f32")?,
            attend_partial_heads: f(&attn, "dsk_attend_partial_heads_f32")?,
            attend_partial_heads_tc: f(&attn, "dsk_attend_partial_heads_tc")?,
            attend_partial_heads_tc32: f(&attn, "dsk_attend_partial_heads_tc32")?,
            attend_partial_heads_f16: f(&attn, "dsk_attend_partial_heads_f16")?,
            attend_partial_heads_f16x32: f(&attn, "dsk_attend_partial_heads_f16x32")?,
            attend_combine: f(&attn, "dsk_attend_combine_f32")?,
            attend_combine_one: f(&attn, "dsk_attend_combine_one_f32")?,
            indexer_scores: f(&attn, "dsk_indexer_scores_f32")?,
            indexer_scores_tiled: f(&attn, "dsk_indexer_scores_tiled_f32")?,
            indexer_scores_tiled16: f(&attn, "dsk_indexer_scores_tiled16_f32")?,
            indexer_tile,
            indexer_scores_mma: f(&attn, "dsk_indexer_scores_mma")?,
            indexer_scores_mma_f16: f(&attn, "dsk_indexer_scores_mma_f16")?,
            indexer_f16: std::env::var("DSPARK_INDEXER_F16").map_or(true, |v| v.trim() != "0"),
            swiglu_clip: f(&elementwise, "dsk_swiglu_clip_f32")?,
            topk_select: f(&attn, "dsk_topk_select_f32")?,
            topk_select_segments: f(&attn, "dsk_topk_select_segments_f32")?,
            topk_select_reduce: f(&attn, "dsk_topk_select_reduce_f32")?,
            topk_select_merge: f(&attn, "dsk_topk_select_merge_f32")?,
            topk_merge_ranks: f(&attn, "dsk_topk_merge_ranks_f32")?,
            topk_select_smem: f(&attn, "dsk_topk_select_smem_f32")?,
            topk_merge_ranks_smem: f(&attn, "dsk_topk_merge_ranks_smem_f32")?,
            topk_block,
            route_kernel,
            fp8_dequant: f(&elementwise, "dsk_fp8_dequant_f32")?,
            fp8_dequant_f16: f(&elementwise, "dsk_fp8_dequant_f16")?,
            rows_to_f16: f(&elementwise, "dsk_rows_f32_to_f16")?,
            add: f(&elementwise, "dsk_add_f32")?,
            paged: paged::PagedFns::load(&module(&sources::PAGED)?)?,
            layer_ops: layer_ops::LayerOpsFns::load(&module(&sources::LAYER_OPS)?, clusters)?,
            dense_gemv: dense_gemv::DenseGemvFns::load(&module(&sources::DENSE_GEMV)?)?,
            moe_sorted: moe_sorted::MoeSortedFns::load(&module(&sources::MOE_SORTED)?)?,
            skinny_mma: skinny_mma::SkinnyMmaFns::load(&module(&sources::SKINNY_MMA)?, clusters)?,
            collective: collective::CollectiveFns::load(&module(&sources::COLLECTIVE)?)?,
            ctx: ctx.clone(),
            arch,
            sms: usize::try_from(sms).unwrap_or(1).max(1),
            origins,
        };
        // The expert kernels stage one activation row in dynamic shared memory; let them use
        // more than the default 48 KB (checked per launch against `smem_optin`).
        let optin = i32::try_from(kernels.smem_optin).unwrap_or(i32::MAX);
        for func in [
            &kernels.fp4_gate_up,
            &kernels.fp4_down,
            &kernels.fp4_gate_up_r2,
            &kernels.fp4_down_once,
            &kernels.fp4_gate_up_v1,
            &kernels.fp4_down_v1,
            &kernels.fp4_gate_up_mma2,
            &kernels.fp4_gate_up_mma2_pre,
            &kernels.fp4_down_mma2,
            &kernels.moe_grouped.gate_up[0],
            &kernels.moe_grouped.gate_up[1],
            &kernels.moe_grouped.gate_up[2],
            &kernels.moe_grouped.down[0],
            &kernels.moe_grouped.down[1],
            &kernels.moe_grouped.down[2],
            &kernels.indexer_scores_tiled,
            &kernels.indexer_scores_tiled16,
            &kernels.indexer_scores_mma,
            &kernels.indexer_scores_mma_f16,
            &kernels.attend_partial_heads_tc,
            &kernels.attend_partial_heads_tc32,
            &kernels.attend_partial_heads_f16,
            &kernels.attend_partial_heads_f16x32,
        ]
        .into_iter()
        .chain(kernels.skinny_mma.large_smem())
        {
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                optin,
            )
            .map_err(KernelError::driver("cuFuncSetAttribute"))?;
        }
        // The shared-key selects have static arrays too: they opt in to their largest key buffer.
        let topk_keys = attention::topk_smem_keys(usize::MAX, kernels.smem_optin);
        for func in [&kernels.topk_select_smem, &kernels.topk_merge_ranks_smem] {
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                (topk_keys * 4) as i32,
            )
            .map_err(KernelError::driver("cuFuncSetAttribute (top-k keys)"))?;
        }
        Ok(kernels)
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The FP4 expert kernels `MoePath::Auto` runs: `Auto` (by token count), or the one
    /// DSPARK_FP4_KERNEL forced (`CudaCore` = v2, `CudaCoreV1`, or `TensorCoreV2` where it fits,
    /// v2 elsewhere).
    pub fn fp4_auto_path(&self) -> MoePath {
        self.fp4_auto
    }

    /// The compile target in use (e.g. "sm_90a").
    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn multiprocessors(&self) -> usize {
        self.sms
    }

    /// How the tiled indexer's tile height is picked (DSPARK_INDEXER_TILE at load).
    pub fn indexer_tile_choice(&self) -> attention::IndexerTileChoice {
        self.indexer_tile
    }

    /// Overrides DSPARK_INDEXER_TILE for later launches (A/B timing and tests in one process).
    pub fn set_indexer_tile_choice(&mut self, choice: attention::IndexerTileChoice) {
        self.indexer_tile = choice;
    }

    /// Whether FP8 indexer rows take the f16 tensor-core kernel (DSPARK_INDEXER_F16 at load).
    pub fn indexer_f16(&self) -> bool {
        self.indexer_f16
    }

    /// Overrides DSPARK_INDEXER_F16 for later launches (A/B timing and tests in one process).
    pub fn set_indexer_f16(&mut self, on: bool) {
        self.indexer_f16 = on;
    }

    /// Whether one-token FP8 GEMVs take the one-chunk kernels (on unless DSPARK_FP8_ONE_CHUNK=0 at
    /// load).
    pub fn fp8_one_chunk(&self) -> bool {
        self.fp8_one_chunk
    }

    /// Overrides DSPARK_FP8_ONE_CHUNK for later launches (A/B timing and tests in one process).
    pub fn set_fp8_one_chunk(&mut self, on: bool) {
        self.fp8_one_chunk = on;
    }

    /// The K split FP8 CUDA-core launches of `m` tokens through an `[n, k]` matrix take
    /// ([`fp8_split_for`] on this device).
    pub fn fp8_split(&self, m: usize, n: usize, k: usize) -> usize {
        fp8_split_for(self.fp8_one_chunk, m, n, k, self.sms)
    }

    /// Where the mma2 gate/up stages its activations (DSPARK_FP4_MMA2_STAGE at load).
    pub fn mma2_staging(&self) -> Mma2Staging {
        self.mma2_staging
    }

    /// Overrides DSPARK_FP4_MMA2_STAGE for later launches (A/B timing and tests in one process).
    pub fn set_mma2_staging(&mut self, staging: Mma2Staging) {
        self.mma2_staging = staging;
    }

    /// Which kernel routes tokens (DSPARK_ROUTE_KERNEL at load).
    pub fn route_kernel_choice(&self) -> layer_ops::RouteKernel {
        self.route_kernel
    }

    /// Overrides DSPARK_ROUTE_KERNEL for later launches (A/B timing and tests in one process).
    pub fn set_route_kernel_choice(&mut self, choice: layer_ops::RouteKernel) {
        self.route_kernel = choice;
    }

    /// Which block form many-token top-k selects take (DSPARK_TOPK_BLOCK at load).
    pub fn topk_block_choice(&self) -> attention::TopKBlockChoice {
        self.topk_block
    }

    /// Overrides DSPARK_TOPK_BLOCK for later launches (A/B timing and tests in one process).
    pub fn set_topk_block_choice(&mut self, choice: attention::TopKBlockChoice) {
        self.topk_block = choice;
    }

    /// Largest dynamic shared memory a block may opt in to (bytes): decides which indexer kernel
    /// runs (see `attention::indexer_kernel`).
    pub fn smem_optin(&self) -> usize {
        self.smem_optin
    }

    /// Where each module came from.
    pub fn origins(&self) -> &[(&'static str, ModuleOrigin)] {
        &self.origins
    }

    /// FP8 block-scaled GEMV / skinny GEMM (see `Fp8Gemv`), kernel chosen by `Fp8Path::Auto`.
    ///
    /// # Safety
    /// Every pointer must address device memory of this context holding the shapes in `a`.
    /// The weights (and scales) are read before the kernel waits for the previous kernel of the
    /// stream (PDL): no kernel still running before this launch may write them.
    pub unsafe fn fp8_gemv(&self, stream: &CudaStream, a: &Fp8Gemv) -> Result<(), KernelError> {
        self.fp8_gemv_path(stream, a, Fp8Path::Auto)
    }

    /// `fp8_gemv` with an explicit kernel choice (benchmarks, checks).
    ///
    /// # Safety
    /// As `fp8_gemv`.
    pub unsafe fn fp8_gemv_path(
        &self,
        stream: &CudaStream,
        a: &Fp8Gemv,
        path: Fp8Path,
    ) -> Result<(), KernelError> {
        check_fp8_gemv(a)?;
        const K: &str = "fp8_gemv";
        let fits = fp8_tensor_core_fits(a);
        let tensor = match path {
            Fp8Path::Auto => fits && a.m >= FP8_TC_MIN_M && a.n.div_ceil(32) >= self.sms,
            Fp8Path::CudaCore => false,
            Fp8Path::TensorCore if fits => true,
            Fp8Path::TensorCore => {
                return Err(KernelError::invalid(
                    K,
                    "tensor-core path needs bf16 activations and k a multiple of 128",
                ))
            }
        };
        let (m, n, k) = (
            i32_arg(K, "m", a.m)?,
            i32_arg(K, "n", a.n)?,
            i32_arg(K, "k", a.k)?,
        );
        let flag = a.out_dtype.flag();
        if tensor {
            let func = &self.fp8_tc[usize::from(a.m > 8)];
            let cfg = LaunchConfig {
                grid_dim: (u32_grid(K, a.n.div_ceil(32))?, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            stream
                .kernel(func)
                .arg(&a.weight)
                .arg(&a.scale)
                .arg(&a.x)
                .arg(&a.out)
                .arg(&flag)
                .arg(&m)
                .arg(&n)
                .arg(&k)
                .launch(cfg)
                .map_err(KernelError::driver("launch fp8_gemm_tc"))?;
            return Ok(());
        }
        let bucket = fp8_m_bucket(a.m).ok_or_else(|| KernelError::invalid(K, "m out of range"))?;
        let mi = FP8_M_BUCKETS.iter().position(|&b| b == bucket).unwrap_or(0);
        // The one-chunk kernels take f32 in and out only.
        let on = self.fp8_one_chunk && a.x_dtype == ActDtype::F32 && a.out_dtype == OutDtype::F32;
        let ks = fp8_split_for(on, a.m, a.n, a.k, self.sms);
        let one_chunk = fp8_takes_one_chunk(on, a.m, a.k, ks);
        // The one-chunk kernel takes the same parameters.
        let func = if one_chunk {
            &self.fp8_m1c[0]
        } else {
            &self.fp8_gemv[usize::from(a.x_dtype == ActDtype::F32)][mi]
        };
        let blocks = fp8_gemv_blocks(a.n, ks, one_chunk);
        let ks = ks as i32;
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, blocks)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(func)
            .arg(&a.weight)
            .arg(&a.scale)
            .arg(&a.x)
            .arg(&a.out)
            .arg(&flag)
            .arg(&m)
            .arg(&n)
            .arg(&k)
            .arg(&ks)
            .launch(cfg)
            .map_err(KernelError::driver("launch fp8_gemv"))?;
        Ok(())
    }

    /// Grouped FP8 GEMV (see `Fp8GroupedGemv`) in one launch, K split across warps as the
    /// plain CUDA-core kernel would split an [n, k] matrix (`fp8_ksplit`).
    ///
    /// # Safety
    /// Every pointer must address device memory of this context holding the shapes in `a`.
    /// The weights (and scales) are read before the kernel waits for the previous kernel of the
    /// stream (PDL): no kernel still running before this launch may write them.
    pub unsafe fn fp8_gemv_grouped(
        &self,
        stream: &CudaStream,
        a: &Fp8GroupedGemv,
    ) -> Result<(), KernelError> {
        self.fp8_gemv_grouped_ksplit(stream, a, self.fp8_split(a.m, a.n, a.k))
    }

    /// `fp8_gemv_grouped` with an explicit K split (1, 2, 4 or 8 warps per row set): with the
    /// split a group's own launch takes (`self.fp8_split(m, group_rows, k)`) every output is
    /// bit-identical to a plain `fp8_gemv` of its group alone (checks, benchmarks).
    ///
    /// # Safety
    /// As `fp8_gemv_grouped`.
    pub unsafe fn fp8_gemv_grouped_ksplit(
        &self,
        stream: &CudaStream,
        a: &Fp8GroupedGemv,
        ksplit: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "fp8_gemv_grouped";
        check_fp8_grouped_gemv(a)?;
        if !matches!(ksplit, 1 | 2 | 4 | 8) {
            return Err(KernelError::invalid(
                K,
                format!("ksplit = {ksplit} must be 1, 2, 4 or 8"),
            ));
        }
        let bucket = fp8_m_bucket(a.m).ok_or_else(|| KernelError::invalid(K, "m out of range"))?;
        let mi = FP8_M_BUCKETS.iter().position(|&b| b == bucket).unwrap_or(0);
        // The one-chunk kernel takes the same parameters.
        let one_chunk = fp8_takes_one_chunk(self.fp8_one_chunk, a.m, a.k, ksplit);
        let func = if one_chunk {
            &self.fp8_m1c[1]
        } else {
            &self.fp8_gemv_grouped[mi]
        };
        let blocks = fp8_gemv_blocks(a.n, ksplit, one_chunk);
        let (m, n, k, ks, group_rows) = (
            i32_arg(K, "m", a.m)?,
            i32_arg(K, "n", a.n)?,
            i32_arg(K, "k", a.k)?,
            i32_arg(K, "ksplit", ksplit)?,
            i32_arg(K, "group_rows", a.group_rows)?,
        );
        let (x_group_stride, ld_x, ld_out) = (
            i64_arg(K, "x_group_stride", a.x_group_stride)?,
            i64_arg(K, "ld_x", a.ld_x)?,
            i64_arg(K, "ld_out", a.ld_out)?,
        );
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, blocks)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(func)
            .arg(&a.weight)
            .arg(&a.scale)
            .arg(&a.x)
            .arg(&a.out)
            .arg(&m)
            .arg(&n)
            .arg(&k)
            .arg(&ks)
            .arg(&group_rows)
            .arg(&x_group_stride)
            .arg(&ld_x)
            .arg(&ld_out)
            .launch(cfg)
            .map_err(KernelError::driver("launch fp8_gemv_grouped"))?;
        Ok(())
    }

    /// Routed experts for the selected experts only: gate/up + SwiGLU into `c.h`, down (weighted
    /// by the router) into `c.partial`, then the top-k slots summed in order into `c.out`. Three
    /// launches; `MoePath::Auto` (v2 below [`FP4_MMA2_MIN_TOKENS`] tokens, mma2 from there, unless
    /// DSPARK_FP4_KERNEL forces one).
    ///
    /// # Safety
    /// Every pointer must address device memory of this context holding the shapes given.
    pub unsafe fn fp4_moe(
        &self,
        stream: &CudaStream,
        e: &Fp4Experts,
        c: &Fp4MoeCall,
    ) -> Result<(), KernelError> {
        self.fp4_moe_path(stream, e, c, MoePath::Auto)
    }

    /// `fp4_moe` whose final combine (the only launch reading `c.addend`) first waits for
    /// `addend_ready`, an event recorded on another stream after the addend's last write: the
    /// experts' products overlap whatever writes the addend there (a decode step's shared
    /// expert).
    ///
    /// # Safety
    /// As `fp4_moe`; the addend may still be being written until the event completes.
    pub unsafe fn fp4_moe_after(
        &self,
        stream: &CudaStream,
        e: &Fp4Experts,
        c: &Fp4MoeCall,
        addend_ready: &CudaEvent,
    ) -> Result<(), KernelError> {
        self.fp4_moe_path_after(stream, e, c, MoePath::Auto, Some(addend_ready))
    }

    /// `fp4_moe` with an explicit kernel choice (benchmarks, checks).
    ///
    /// # Safety
    /// As `fp4_moe`.
    pub unsafe fn fp4_moe_path(
        &self,
        stream: &CudaStream,
        e: &Fp4Experts,
        c: &Fp4MoeCall,
        path: MoePath,
    ) -> Result<(), KernelError> {
        self.fp4_moe_path_after(stream, e, c, path, None)
    }

    /// `fp4_moe_path`, the combine waiting for `addend_ready` where given (`fp4_moe_after`).
    ///
    /// # Safety
    /// As `fp4_moe_after`.
    unsafe fn fp4_moe_path_after(
        &self,
        stream: &CudaStream,
        e: &Fp4Experts,
        c: &Fp4MoeCall,
        path: MoePath,
        addend_ready: Option<&CudaEvent>,
    ) -> Result<(), KernelError> {
        check_fp4_moe(e, c)?;
        const K: &str = "fp4_moe";
        let fits = moe_tensor_core_fits(e.hidden, e.inter);
        let path = match (path, self.fp4_auto) {
            (MoePath::Auto, MoePath::Auto) => {
                if c.tokens >= FP4_MMA2_MIN_TOKENS && moe_mma2_fits(e) {
                    MoePath::TensorCoreV2
                } else {
                    MoePath::CudaCore
                }
            }
            (MoePath::Auto, MoePath::TensorCoreV2) if !moe_mma2_fits(e) => MoePath::CudaCore,
            (MoePath::Auto, chosen) => chosen,
            (p, _) => p,
        };
        if path == MoePath::TensorCoreV2 {
            if !moe_mma2_fits(e) {
                return Err(KernelError::invalid(
                    K,
                    format!(
                        "mma2 path needs hidden ({}) and inter ({}) multiples of 256 and 8-byte \
                         aligned scales",
                        e.hidden, e.inter
                    ),
                ));
            }
            return self.fp4_moe_mma2(stream, e, c, addend_ready);
        }
        let tensor = match path {
            MoePath::Auto | MoePath::CudaCore | MoePath::CudaCoreV1 | MoePath::TensorCoreV2 => {
                false
            }
            MoePath::TensorCore if fits => true,
            MoePath::TensorCore => {
                return Err(KernelError::invalid(
                    K,
                    format!(
                        "tensor-core path needs hidden ({}) and inter ({}) multiples of 256",
                        e.hidden, e.inter
                    ),
                ))
            }
        };
        let (rows_per_block, f_gate_up, f_down) = if tensor {
            ([16, 16], &self.fp4_gate_up_mma, &self.fp4_down_mma)
        } else if path == MoePath::CudaCoreV1 {
            (
                [MOE_ROWS_PER_BLOCK; 2],
                &self.fp4_gate_up_v1,
                &self.fp4_down_v1,
            )
        } else {
            self.fp4_v2_forms(c.tokens * c.topk, e.inter)
        };
        let smem = |len: usize| -> Result<u32, KernelError> {
            let bytes = if path == MoePath::CudaCore {
                fp4_moe_v2_smem_bytes(len)
            } else {
                moe_stage_bytes(len)
            };
            if bytes > self.smem_optin {
                return Err(KernelError::invalid(
                    K,
                    format!(
                        "{len} activations need {bytes} B of shared memory; the GPU allows {}",
                        self.smem_optin
                    ),
                ));
            }
            u32_grid(K, bytes)
        };
        let (smem_gate_up, smem_down) = if tensor {
            (0, 0)
        } else {
            (smem(e.hidden)?, smem(e.inter)?)
        };
        // SAFETY: this function's contract; the kernels take the shared arguments.
        unsafe {
            self.fp4_moe_launches(
                stream,
                e,
                c,
                [f_gate_up, f_down],
                rows_per_block,
                256,
                [smem_gate_up, smem_down],
                addend_ready,
            )
        }
    }

    /// The v2 kernels for `pairs` (token, slot) pairs of `inter`-wide experts, with their rows
    /// per block (gate/up, down); all give the same bits. Gate/up takes two rows a warp where
    /// four would give fewer than [`V2_TWO_ROWS_BELOW_BLOCKS_PER_SM`] blocks an SM (one token at
    /// inter 1,024: 192 blocks of 32 rows for 132 SMs, so some SMs ran two and others one), or
    /// as DSPARK_FP4_V2_ROWS forces; down leaves out the prefetch, which never fires when every
    /// lane holds a row's only chunk (inter <= 1,024).
    fn fp4_v2_forms(
        &self,
        pairs: usize,
        inter: usize,
    ) -> ([usize; 2], &CudaFunction, &CudaFunction) {
        let two_rows = match self.fp4_v2_rows {
            Some(rows) => rows == 2,
            None => {
                pairs * inter.div_ceil(MOE_ROWS_PER_BLOCK)
                    < V2_TWO_ROWS_BELOW_BLOCKS_PER_SM * self.sms
            }
        };
        let (rows_gate_up, gate_up) = if two_rows {
            (MOE_ROWS_PER_BLOCK / 2, &self.fp4_gate_up_r2)
        } else {
            (MOE_ROWS_PER_BLOCK, &self.fp4_gate_up)
        };
        let down = if inter <= V2_DOWN_ONE_CHUNK_MAX_INTER {
            &self.fp4_down_once
        } else {
            &self.fp4_down
        };
        ([rows_gate_up, MOE_ROWS_PER_BLOCK], gate_up, down)
    }

    /// The gate/up and down launches of one FP4 expert path (every path's kernels take the same
    /// arguments), each over (pair, rows / `rows_per_block[i]`) blocks of `block` threads with
    /// the dynamic shared memory given, then the combine.
    ///
    /// # Safety
    /// As `fp4_moe`, with the functions and launch shapes of one path.
    #[allow(clippy::too_many_arguments)]
    unsafe fn fp4_moe_launches(
        &self,
        stream: &CudaStream,
        e: &Fp4Experts,
        c: &Fp4MoeCall,
        [f_gate_up, f_down]: [&CudaFunction; 2],
        [rows_gate_up, rows_down]: [usize; 2],
        block: usize,
        [smem_gate_up, smem_down]: [u32; 2],
        addend_ready: Option<&CudaEvent>,
    ) -> Result<(), KernelError> {
        const K: &str = "fp4_moe";
        let pairs = c.tokens * c.topk;
        let (topk, experts) = (
            i32_arg(K, "topk", c.topk)?,
            i32_arg(K, "experts", e.experts)?,
        );
        let (inter, hidden) = (
            i32_arg(K, "inter", e.inter)?,
            i32_arg(K, "hidden", e.hidden)?,
        );
        let block = u32_grid(K, block)?;
        let cfg1 = LaunchConfig {
            grid_dim: (
                u32_grid(K, pairs)?,
                u32_grid(K, e.inter.div_ceil(rows_gate_up))?,
                1,
            ),
            block_dim: (block, 1, 1),
            shared_mem_bytes: smem_gate_up,
        };
        stream
            .kernel(f_gate_up)
            .arg(&c.x)
            .arg(&c.ids)
            .arg(&e.w1)
            .arg(&e.s1)
            .arg(&e.w3)
            .arg(&e.s3)
            .arg(&c.h)
            .arg(&topk)
            .arg(&experts)
            .arg(&inter)
            .arg(&hidden)
            .arg(&c.swiglu_limit)
            .launch(cfg1)
            .map_err(KernelError::driver("launch fp4_moe gate/up"))?;
        let cfg2 = LaunchConfig {
            grid_dim: (
                u32_grid(K, pairs)?,
                u32_grid(K, e.hidden.div_ceil(rows_down))?,
                1,
            ),
            block_dim: (block, 1, 1),
            shared_mem_bytes: smem_down,
        };
        stream
            .kernel(f_down)
            .arg(&c.h)
            .arg(&c.ids)
            .arg(&c.weights)
            .arg(&e.w2)
            .arg(&e.s2)
            .arg(&c.partial)
            .arg(&experts)
            .arg(&hidden)
            .arg(&inter)
            .launch(cfg2)
            .map_err(KernelError::driver("launch fp4_moe down"))?;
        if let Some(ready) = addend_ready {
            stream
                .wait(ready)
                .map_err(KernelError::driver("fp4_moe: wait for the addend"))?;
        }
        self.fp4_moe_combine(stream, e, c)
    }

    /// The mma2 gate/up and down launches (shapes checked by the caller), then the combine.
    ///
    /// # Safety
    /// As `fp4_moe`.
    unsafe fn fp4_moe_mma2(
        &self,
        stream: &CudaStream,
        e: &Fp4Experts,
        c: &Fp4MoeCall,
        addend_ready: Option<&CudaEvent>,
    ) -> Result<(), KernelError> {
        const K: &str = "fp4_moe";
        let rows_per_block = [16 * MMA2_WARPS; 2];
        let smem = |len: usize, matrices: usize| -> Result<u32, KernelError> {
            let bytes = fp4_moe_mma2_smem_bytes(len, matrices);
            if bytes > self.smem_optin {
                return Err(KernelError::invalid(
                    K,
                    format!(
                        "{len} activations need {bytes} B of shared memory (mma2); the GPU allows {}",
                        self.smem_optin
                    ),
                ));
            }
            u32_grid(K, bytes)
        };
        let smem = [smem(e.hidden, 2)?, smem(e.inter, 1)?];
        // `partial` is [tokens * topk, hidden] f32 and only down writes it (after the gate/up
        // has finished: its PDL wait), so until then it can hold the staged fragments.
        let once = self.mma2_staging == Mma2Staging::Once
            && fp4_mma2_staged_b_bytes(c.tokens, e.hidden) <= c.tokens * c.topk * e.hidden * 4;
        if !once {
            // SAFETY: this function's contract; the mma2 kernels take the shared arguments.
            return unsafe {
                self.fp4_moe_launches(
                    stream,
                    e,
                    c,
                    [&self.fp4_gate_up_mma2, &self.fp4_down_mma2],
                    rows_per_block,
                    32 * MMA2_WARPS,
                    smem,
                    addend_ready,
                )
            };
        }
        let hidden = i32_arg(K, "hidden", e.hidden)?;
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, c.tokens)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x holds tokens rows of hidden f32 and partial at least the fragments' bytes
        // (checked above); the kernel writes only those.
        unsafe {
            stream
                .kernel(&self.fp4_stage_b_mma2)
                .arg(&c.x)
                .arg(&c.partial)
                .arg(&hidden)
                .launch(cfg)
        }
        .map_err(KernelError::driver("launch fp4_moe stage_b"))?;
        // The gate/up's first argument is then the fragments; nothing after it reads x.
        let staged = Fp4MoeCall { x: c.partial, ..*c };
        // SAFETY: as above; the pre-staged gate/up takes the plain one's arguments with x
        // replaced by the fragments.
        unsafe {
            self.fp4_moe_launches(
                stream,
                e,
                &staged,
                [&self.fp4_gate_up_mma2_pre, &self.fp4_down_mma2],
                rows_per_block,
                32 * MMA2_WARPS,
                smem,
                addend_ready,
            )
        }
    }

    /// The top-k slots of `c.partial` summed in order into `c.out` (plus `c.addend`).
    ///
    /// # Safety
    /// As `fp4_moe`.
    unsafe fn fp4_moe_combine(
        &self,
        stream: &CudaStream,
        e: &Fp4Experts,
        c: &Fp4MoeCall,
    ) -> Result<(), KernelError> {
        const K: &str = "fp4_moe";
        let (topk, hidden, tokens) = (
            i32_arg(K, "topk", c.topk)?,
            i32_arg(K, "hidden", e.hidden)?,
            i32_arg(K, "tokens", c.tokens)?,
        );
        let cfg3 = LaunchConfig {
            grid_dim: (u32_grid(K, (c.tokens * e.hidden).div_ceil(256))?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let flag = c.out_dtype.flag();
        stream
            .kernel(&self.fp4_combine)
            .arg(&c.partial)
            .arg(&c.out)
            .arg(&flag)
            .arg(&tokens)
            .arg(&topk)
            .arg(&hidden)
            .arg(&c.addend)
            .launch(cfg3)
            .map_err(KernelError::driver("launch fp4_moe_combine"))?;
        Ok(())
    }

    /// # Safety
    /// Every pointer must address device memory of this context holding the shapes given.
    pub unsafe fn rmsnorm(&self, stream: &CudaStream, a: &RmsNorm) -> Result<(), KernelError> {
        check_rmsnorm(a)?;
        const K: &str = "rmsnorm";
        let d = i32_arg(K, "d", a.d)?;
        let (ldx, ldo) = (i64_arg(K, "ld_x", a.ld_x)?, i64_arg(K, "ld_out", a.ld_out)?);
        let threads = (a.d / 8).next_power_of_two().clamp(32, 256) as u32;
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, a.rows)?, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.rmsnorm)
            .arg(&a.x)
            .arg(&a.weight)
            .arg(&a.out)
            .arg(&d)
            .arg(&ldx)
            .arg(&ldo)
            .arg(&a.eps)
            .launch(cfg)
            .map_err(KernelError::driver("launch rmsnorm"))?;
        Ok(())
    }

    /// # Safety
    /// Every pointer must address device memory of this context holding the shapes given.
    pub unsafe fn rope(&self, stream: &CudaStream, a: &Rope) -> Result<(), KernelError> {
        check_rope(a)?;
        const K: &str = "rope";
        let threads = a.tokens * a.heads * (a.rope_dim / 8);
        let (t, h) = (
            i32_arg(K, "tokens", a.tokens)?,
            i32_arg(K, "heads", a.heads)?,
        );
        let (d, r) = (i32_arg(K, "d", a.d)?, i32_arg(K, "rope_dim", a.rope_dim)?);
        let (ldt, ldh) = (
            i64_arg(K, "ld_token", a.ld_token)?,
            i64_arg(K, "ld_head", a.ld_head)?,
        );
        let inv = i32::from(a.inverse);
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, threads.div_ceil(256))?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.rope)
            .arg(&a.x)
            .arg(&a.positions)
            .arg(&a.inv_freq)
            .arg(&t)
            .arg(&h)
            .arg(&d)
            .arg(&r)
            .arg(&ldt)
            .arg(&ldh)
            .arg(&a.mscale)
            .arg(&inv)
            .launch(cfg)
            .map_err(KernelError::driver("launch rope"))?;
        Ok(())
    }

    /// Top-k / argmax over logit rows (two launches).
    ///
    /// # Safety
    /// Every pointer must address device memory of this context holding the shapes given.
    pub unsafe fn topk(&self, stream: &CudaStream, a: &TopK) -> Result<(), KernelError> {
        check_topk(a)?;
        const K: &str = "topk";
        let chunks = a.vocab.div_ceil(TOPK_CHUNK);
        let (v, k) = (i32_arg(K, "vocab", a.vocab)?, i32_arg(K, "k", a.k)?);
        let ld = i64_arg(K, "ld", a.ld)?;
        let chunk_len = TOPK_CHUNK as i32;
        let cand_v = a.workspace;
        let cand_i = a.workspace + (a.rows * chunks * a.k * 4) as u64;
        let cfg1 = LaunchConfig {
            grid_dim: (u32_grid(K, chunks)?, u32_grid(K, a.rows)?, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.topk1)
            .arg(&a.logits)
            .arg(&v)
            .arg(&ld)
            .arg(&chunk_len)
            .arg(&k)
            .arg(&cand_v)
            .arg(&cand_i)
            .launch(cfg1)
            .map_err(KernelError::driver("launch topk_stage1"))?;
        let n = i32_arg(K, "candidates", chunks * a.k)?;
        let cfg2 = LaunchConfig {
            grid_dim: (u32_grid(K, a.rows)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.topk2)
            .arg(&cand_v)
            .arg(&cand_i)
            .arg(&n)
            .arg(&k)
            .arg(&a.out_values)
            .arg(&a.out_indices)
            .launch(cfg2)
            .map_err(KernelError::driver("launch topk_stage2"))?;
        Ok(())
    }

    /// Benchmark helper: occupies `stream` for `ns` nanoseconds.
    pub fn spin(&self, stream: &CudaStream, ns: u64) -> Result<(), KernelError> {
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel takes one integer and touches no memory.
        unsafe { stream.kernel(&self.spin).arg(&ns).launch(cfg) }
            .map_err(KernelError::driver("launch spin"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gemv(m: usize, n: usize, k: usize) -> Fp8Gemv {
        Fp8Gemv {
            weight: 256,
            scale: 512,
            x: 1024,
            x_dtype: ActDtype::Bf16,
            out: 2048,
            out_dtype: OutDtype::F32,
            m,
            n,
            k,
        }
    }

    #[test]
    fn fp8_shape_checks() {
        assert!(check_fp8_gemv(&gemv(1, 4096, 1024)).is_ok());
        assert!(check_fp8_gemv(&gemv(0, 4096, 1024)).is_err());
        assert!(check_fp8_gemv(&gemv(17, 4096, 1024)).is_err());
        assert!(check_fp8_gemv(&gemv(1, 4096, 1000)).is_err());
        let mut a = gemv(1, 8, 16);
        a.x = 1026;
        assert!(matches!(
            check_fp8_gemv(&a),
            Err(KernelError::InvalidLaunch { .. })
        ));
        a.x = 0;
        assert!(check_fp8_gemv(&a).is_err());
    }

    fn grouped(m: usize) -> Fp8GroupedGemv {
        // DeepSeek-V4-Flash wo_a: 8 groups of [1024, 4096], x = attention output [m, 64 * 512].
        Fp8GroupedGemv {
            weight: 256,
            scale: 512,
            x: 1024,
            out: 2048,
            m,
            n: 8 * 1024,
            k: 4096,
            group_rows: 1024,
            x_group_stride: 4096,
            ld_x: 8 * 4096,
            ld_out: 8 * 1024,
        }
    }

    #[test]
    fn fp8_grouped_checks() {
        let ok = grouped(1);
        assert!(check_fp8_grouped_gemv(&ok).is_ok());
        assert!(check_fp8_grouped_gemv(&grouped(16)).is_ok());
        // One group is the plain GEMV with strides.
        assert!(check_fp8_grouped_gemv(&Fp8GroupedGemv {
            n: 1024,
            x_group_stride: 0,
            ld_x: 4096,
            ld_out: 1024,
            ..ok
        })
        .is_ok());
        // Every group may read the same inputs.
        assert!(check_fp8_grouped_gemv(&Fp8GroupedGemv {
            x_group_stride: 0,
            ld_x: 4096,
            ..ok
        })
        .is_ok());
        let bad = [
            grouped(0),
            grouped(17),
            Fp8GroupedGemv { k: 4008, ..ok },
            Fp8GroupedGemv { k: 0, ..ok },
            Fp8GroupedGemv { n: 0, ..ok },
            Fp8GroupedGemv {
                group_rows: 0,
                ..ok
            },
            // Not a multiple of 128: a scale tile would span two groups.
            Fp8GroupedGemv {
                group_rows: 64,
                ..ok
            },
            // Does not divide n.
            Fp8GroupedGemv {
                group_rows: 3 * 1024,
                ..ok
            },
            // The last group's inputs run past the row.
            Fp8GroupedGemv {
                ld_x: 8 * 4096 - 4,
                ..ok
            },
            Fp8GroupedGemv {
                x_group_stride: 4100,
                ..ok
            },
            Fp8GroupedGemv {
                ld_out: 8 * 1024 - 1,
                ..ok
            },
            // Misaligned f32 rows.
            Fp8GroupedGemv {
                ld_x: 8 * 4096 + 2,
                ..ok
            },
            Fp8GroupedGemv {
                x_group_stride: 4098,
                ld_x: 8 * 4096 + 16,
                ..ok
            },
            Fp8GroupedGemv { x: 1028, ..ok },
            Fp8GroupedGemv { weight: 264, ..ok },
            Fp8GroupedGemv { out: 2050, ..ok },
            Fp8GroupedGemv { scale: 0, ..ok },
            Fp8GroupedGemv { out: 0, ..ok },
            // Overflowing stride arithmetic is an error, not a wrap.
            Fp8GroupedGemv {
                x_group_stride: usize::MAX / 4 * 4,
                ..ok
            },
            Fp8GroupedGemv {
                ld_x: usize::MAX / 4 * 4,
                m: 16,
                ..ok
            },
        ];
        for a in bad {
            assert!(
                matches!(
                    check_fp8_grouped_gemv(&a),
                    Err(KernelError::InvalidLaunch { .. })
                ),
                "{a:?} accepted"
            );
        }
    }

    #[test]
    fn fp8_split_fills_the_gpu() {
        // wq_b (TP=2): plenty of rows, no split. wq_a: 1024 rows x 4096 -> split 8 ways.
        assert_eq!(fp8_ksplit(16384, 1024, 132), 1);
        assert_eq!(fp8_ksplit(1024, 4096, 132), 8);
        // Never split past one 16-byte chunk per lane: k = 1024 has 64 chunks -> at most 2 warps.
        assert_eq!(fp8_ksplit(2, 1024, 132), 2);
        // The one-chunk split: every lane one chunk of a row (k = 1024: 2 warps; 4096: 8), k alone.
        assert_eq!(fp8_ksplit_one_chunk(1024), 2);
        assert_eq!(fp8_ksplit_one_chunk(4096), 8);
        assert_eq!(fp8_ksplit_one_chunk(2048), 4);
        assert_eq!(fp8_ksplit_one_chunk(512), 1);
        assert_eq!(fp8_ksplit_one_chunk(128), 1);
        assert_eq!(fp8_ksplit_one_chunk(16_384), 8);
        // Only one token takes the one-chunk split; more keep the two-row kernels'.
        assert_eq!(fp8_split_for(true, 1, 4096, 4096, 132), 8);
        assert_eq!(
            fp8_split_for(true, 6, 4096, 4096, 132),
            fp8_ksplit(4096, 4096, 132)
        );
        assert_eq!(
            fp8_split_for(false, 1, 4096, 4096, 132),
            fp8_ksplit(4096, 4096, 132)
        );
        // A row longer than 8 warps' lanes hold: the two-row kernels, at their own split.
        assert_eq!(
            fp8_split_for(true, 1, 512, 8192, 132),
            fp8_ksplit(512, 8192, 132)
        );
        assert!(!fp8_takes_one_chunk(
            true,
            1,
            8192,
            fp8_split_for(true, 1, 512, 8192, 132)
        ));
        // One token, on, one chunk a lane: four rows a warp; otherwise the two-row kernels.
        assert!(fp8_takes_one_chunk(true, 1, 4096, 8));
        assert!(fp8_takes_one_chunk(true, 1, 1040, 4));
        assert!(!fp8_takes_one_chunk(false, 1, 4096, 8));
        assert!(!fp8_takes_one_chunk(true, 2, 4096, 8));
        assert!(!fp8_takes_one_chunk(true, 1, 1024, 1));
        assert!(!fp8_takes_one_chunk(true, 1, 8192, 8));
        assert_eq!(fp8_gemv_blocks(16_384, 2, true), 1024);
        assert_eq!(fp8_gemv_blocks(16_384, 1, false), 1024);
        assert_eq!(fp8_gemv_blocks(6, 8, true), 2);
        assert_eq!(fp8_gemv_blocks(1024, 8, false), 512);
        assert!(fp8_tensor_core_fits(&gemv(16, 4096, 1024)));
        assert!(!fp8_tensor_core_fits(&gemv(4, 4096, 1040)));
        assert!(!fp8_tensor_core_fits(&Fp8Gemv {
            x_dtype: ActDtype::F32,
            ..gemv(4, 4096, 1024)
        }));
        assert_eq!(fp8_m_bucket(3), Some(4));
        assert_eq!(fp8_m_bucket(16), Some(16));
        assert_eq!(fp8_m_bucket(17), None);
    }

    #[test]
    fn topk_checks_and_workspace() {
        let a = TopK {
            logits: 16,
            rows: 2,
            vocab: 129_280,
            ld: 129_280,
            k: 50,
            out_values: 16,
            out_indices: 16,
            workspace: 16,
        };
        assert!(check_topk(&a).is_ok());
        assert_eq!(topk_workspace_bytes(2, 129_280, 50), 2 * 64 * 50 * 8);
        assert!(check_topk(&TopK { k: 65, ..a }).is_err());
        assert!(check_topk(&TopK { k: 0, ..a }).is_err());
        assert!(check_topk(&TopK {
            vocab: 300_000,
            ld: 300_000,
            k: 64,
            ..a
        })
        .is_err());
    }

    #[test]
    fn rope_and_norm_checks() {
        let r = Rope {
            x: 16,
            positions: 16,
            inv_freq: 16,
            tokens: 1,
            heads: 64,
            d: 512,
            rope_dim: 64,
            ld_token: 64 * 512,
            ld_head: 512,
            mscale: 1.0,
            inverse: false,
        };
        assert!(check_rope(&r).is_ok());
        assert!(check_rope(&Rope { rope_dim: 60, ..r }).is_err());
        assert!(check_rope(&Rope { ld_token: 512, ..r }).is_err());
        let n = RmsNorm {
            x: 16,
            weight: 16,
            out: 16,
            rows: 1,
            d: 4096,
            ld_x: 4096,
            ld_out: 4096,
            eps: 1e-6,
        };
        assert!(check_rmsnorm(&n).is_ok());
        assert!(check_rmsnorm(&RmsNorm {
            d: 4100,
            ld_x: 4100,
            ld_out: 4100,
            ..n
        })
        .is_err());
    }

    #[test]
    fn mma2_staging_switch_and_fragment_bytes() {
        assert_eq!(mma2_staging_choice(None).unwrap(), Mma2Staging::Block);
        assert_eq!(mma2_staging_choice(Some(" ")).unwrap(), Mma2Staging::Block);
        assert_eq!(
            mma2_staging_choice(Some("once")).unwrap(),
            Mma2Staging::Once
        );
        let err = mma2_staging_choice(Some("twice")).unwrap_err().to_string();
        assert!(err.contains("DSPARK_FP4_MMA2_STAGE"), "{err}");
        // 16 tokens of V4-Flash's 4,096: 128 chunks of 9 uint4 a token, inside partial's
        // 16 x 6 x 4,096 f32 from top-2 up, not at top-1.
        assert_eq!(fp4_mma2_staged_b_bytes(16, 4096), 16 * 128 * 9 * 16);
        assert!(fp4_mma2_staged_b_bytes(16, 4096) <= 16 * 2 * 4096 * 4);
        assert!(fp4_mma2_staged_b_bytes(16, 4096) > 16 * 4096 * 4);
    }

    #[test]
    fn fp4_kernel_switch() {
        assert_eq!(fp4_kernel_choice(None).unwrap(), MoePath::Auto);
        assert_eq!(fp4_kernel_choice(Some("")).unwrap(), MoePath::Auto);
        assert_eq!(fp4_kernel_choice(Some("auto")).unwrap(), MoePath::Auto);
        assert_eq!(fp4_kernel_choice(Some("v2")).unwrap(), MoePath::CudaCore);
        assert_eq!(
            fp4_kernel_choice(Some("mma2")).unwrap(),
            MoePath::TensorCoreV2
        );
        assert_eq!(
            fp4_kernel_choice(Some(" v1 ")).unwrap(),
            MoePath::CudaCoreV1
        );
        let err = fp4_kernel_choice(Some("old")).unwrap_err().to_string();
        assert!(
            err.contains("DSPARK_FP4_KERNEL") && err.contains("auto, v1, v2 or mma2"),
            "{err}"
        );
        assert_eq!(fp4_v2_rows_choice(None).unwrap(), None);
        assert_eq!(fp4_v2_rows_choice(Some(" auto ")).unwrap(), None);
        assert_eq!(fp4_v2_rows_choice(Some("2")).unwrap(), Some(2));
        assert_eq!(fp4_v2_rows_choice(Some("4")).unwrap(), Some(4));
        let err = fp4_v2_rows_choice(Some("8")).unwrap_err().to_string();
        assert!(
            err.contains("DSPARK_FP4_V2_ROWS") && err.contains("auto, 2 or 4"),
            "{err}"
        );
    }

    #[test]
    fn moe_checks() {
        let e = Fp4Experts {
            w1: 16,
            s1: 16,
            w3: 16,
            s3: 16,
            w2: 16,
            s2: 16,
            experts: 256,
            hidden: 4096,
            inter: 2048,
        };
        let c = Fp4MoeCall {
            partial: 16,
            x: 16,
            ids: 16,
            weights: 16,
            h: 16,
            out: 16,
            out_dtype: OutDtype::F32,
            tokens: 1,
            topk: 6,
            swiglu_limit: 10.0,
            addend: 0,
        };
        assert!(check_fp4_moe(&e, &c).is_ok());
        assert!(moe_tensor_core_fits(4096, 2048) && moe_tensor_core_fits(4096, 1024));
        assert!(!moe_tensor_core_fits(4096, 96));
        assert!(moe_mma2_fits(&e) && moe_mma2_fits(&Fp4Experts { inter: 1024, ..e }));
        assert!(!moe_mma2_fits(&Fp4Experts { inter: 96, ..e }));
        assert!(!moe_mma2_fits(&Fp4Experts { s3: 20, ..e }));
        // V4-Flash: gate/up (K = 4096, 2 matrices) and down (K = 2048, 1) fit the 227 KB opt-in
        // of H200 with room for several blocks per SM.
        assert_eq!(fp4_moe_mma2_smem_bytes(4096, 2), 1024 + 18432 + 52224);
        assert!(fp4_moe_mma2_smem_bytes(4096, 2) * 3 < 227 * 1024);
        assert!(fp4_moe_mma2_smem_bytes(2048, 1) < 36 * 1024);
        assert!(check_fp4_moe(&Fp4Experts { inter: 2000, ..e }, &c).is_err());
        assert!(check_fp4_moe(&e, &Fp4MoeCall { topk: 300, ..c }).is_err());
        assert!(check_fp4_moe(
            &e,
            &Fp4MoeCall {
                swiglu_limit: f32::NAN,
                ..c
            }
        )
        .is_err());
    }
}
