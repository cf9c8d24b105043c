//! Launches of `layer_ops.cu`: the f32 per-layer steps of the device-resident decode path
//! (RMSNorm, RoPE, hyper-connections, the MoE router, small dense experts, scale, row copy).
//! Each mirrors the server's host code (engine/model/{ops,rope,hyper,forward}.rs) to f32 rounding.
//! No launch synchronises or allocates, so all of them can be captured in a CUDA graph.

use std::sync::Arc;

use cudarc::driver::sys::{self, CUdeviceptr, CUfunction_attribute};
use cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchConfig};

use super::submit::SubmitKernel;
use super::{aligned16, function, grid_stride, i32_arg, i64_arg, nonnull, u32_grid, Kernels};
use crate::error::KernelError;

const BLOCK: usize = 256;
/// Threads of the fused hyper-connection pre kernel (`LO_HC_FUSED_BLOCK`): a decoding token's
/// block is alone on the GPU, so it takes as many threads as a block may have.
const HC_FUSED_BLOCK: usize = 1024;
/// Tokens one `hc_mix` block accumulates (more tokens take more blocks along grid z).
const MIX_TOKENS: usize = 16;
/// Most blocks one hyper-connection projection row is split over (sizes the workspace).
pub const HC_MAX_SPLITS: usize = 32;
/// f32 slots at the start of every hyper-connection workspace that hold the one-launch pre
/// kernel's block counters, one per token (u32, zero when the workspace is allocated zeroed and
/// after every launch); the partial sums start after them.
pub const HC_WS_HEADER: usize = 32;
/// Largest token count [`HcPreKernel::Fused`] runs as one launch (more take the split path).
/// The one launch reads the site's projection once per token where the split path's partial
/// blocks read it once for up to 16 tokens; on an H200 (`layer_ops_gpu hc_pre_time`, session
/// 21) it is faster at 1 and 2 tokens (11.3 against 13.1 us, 11.8 against 13.8) and slower
/// from 4 (16.6 against 14.9 us; 32.4 against 22.4 at 16). Both paths take their chunks from
/// [`hc_mix_splits`] of the same token count (so the same bits); the one launch needs a counter
/// a token in the workspace header (checked on the GPU up to 16 tokens).
pub const HC_SINGLE_MAX_TOKENS: usize = 2;
const _: () = assert!(HC_SINGLE_MAX_TOKENS <= HC_WS_HEADER);
/// Largest hyper-connection multiplicity (`hc_mult`).
pub const HC_MAX: usize = 8;
/// Tokens one Sinkhorn block of `dsk_lo_hc_pre_rows_f32` serves (`LO_ROWS_GROUP`): the grid
/// is groups of this many collapsing blocks and one Sinkhorn block.
const HC_ROWS_GROUP: usize = 8;
/// Widest row `dsk_lo_hc_pre_rows_f32` keeps in registers (`LO_ROWS_VPT` float4s per stream of
/// each of 256 threads).
pub const HC_ROWS_MAX_HIDDEN: usize = 4 * 4 * BLOCK;
/// Widest row `dsk_lo_hc_post_squares_f32` keeps in registers (`LO_PS_CPT` channels per stream
/// of each of 256 threads).
pub const HC_POST_SQUARES_MAX_HIDDEN: usize = 16 * BLOCK;
/// Threads of a `dsk_lo_hc_post2_f32` block when the step has too few rows to give every SM a
/// 256-thread block: a decoding row then spreads over more SMs (16 blocks at hidden 4096).
const HC_POST_SMALL_BLOCK: usize = 64;
/// Most tokens [`Kernels::hc_seam_f32`] takes (a cluster each, independent of the others; it
/// reads the next site's projection once per token, 1.5 MB at V4-Flash's width).
pub const HC_SEAM_MAX_TOKENS: usize = 16;
/// Cluster sizes the seam kernel is built for (`dsk_lo_hc_seam_c{C}_f32`), and the most threads
/// a block of it has (`LO_SEAM_MAX_T`: a thread per channel of its slice).
const HC_SEAM_CLUSTERS: [usize; 5] = [1, 2, 4, 8, 16];
const HC_SEAM_MAX_THREADS: usize = 256;
/// Tokens one seam cluster serves, as the kernel is built (`dsk_lo_hc_seam_c{C}[_t{TK}]_f32`).
pub const HC_SEAM_TOKENS_PER_CLUSTER: [usize; 3] = [1, 2, 4];
/// The seam's mix outputs plus the sum of squares: the rows of its shared-memory transpose.
const HC_SEAM_SUM_ROWS: usize = 25;
/// Largest expert count / top-k of `route_f32`.
pub const ROUTE_MAX_EXPERTS: usize = 1024;
pub const ROUTE_MAX_K: usize = 16;
/// Largest expert count of the one-warp router (`LO_ROUTE_WARP_MAX_E` in layer_ops.cu); more
/// take the block kernel whatever [`RouteKernel`] says.
pub const ROUTE_WARP_MAX_EXPERTS: usize = 256;

/// Which kernel routes the tokens (DSPARK_ROUTE_KERNEL: `warp` or `block`): `Warp`, the default,
/// a warp a token for up to [`ROUTE_WARP_MAX_EXPERTS`] experts (`dsk_lo_route_warp_f32`: the keys
/// in registers, a round one warp max, no barrier; a batch-1 step 1.4% faster on an H200 than
/// the block kernel, session 36); `Block`, a block of 256 threads a token (`dsk_lo_route_f32`:
/// each of the k rounds a block-wide max between two barriers), also for more experts. Both write
/// the same ids and weights bit for bit (GPU test `route_warp_equals_route_block`, CPU emulation
/// `tools/route_emu.cpp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKernel {
    Block,
    Warp,
}

/// [`RouteKernel`] from DSPARK_ROUTE_KERNEL's value (unset or empty: `Warp`).
pub fn route_kernel_choice(value: Option<&str>) -> Result<RouteKernel, KernelError> {
    let forms = [("warp", RouteKernel::Warp), ("block", RouteKernel::Block)];
    super::attention::env_switch("route_f32", "DSPARK_ROUTE_KERNEL", value, &forms)
}

/// The kernel a launch over `experts` experts takes under `choice`.
pub fn route_kernel(experts: usize, choice: RouteKernel) -> RouteKernel {
    match choice {
        RouteKernel::Warp if experts <= ROUTE_WARP_MAX_EXPERTS => RouteKernel::Warp,
        _ => RouteKernel::Block,
    }
}
/// CUDA's limit on grid y / z (tokens ride on them in some kernels).
const GRID_YZ_MAX: usize = 65_535;

/// The functions of `layer_ops.cu`.
pub struct LayerOpsFns {
    rms_norm: CudaFunction,
    rms_norm_rope: CudaFunction,
    rope: CudaFunction,
    hc_mix_partial: CudaFunction,
    hc_mix_reduce: CudaFunction,
    hc_pre_finish: CudaFunction,
    hc_pre_fused: CudaFunction,
    hc_mix_partial2: CudaFunction,
    hc_pre_finish2: CudaFunction,
    hc_pre_single: CudaFunction,
    hc_squares: CudaFunction,
    hc_pre_rows: CudaFunction,
    hc_post: CudaFunction,
    hc_post2: CudaFunction,
    hc_post_squares: CudaFunction,
    hc_head_finish: CudaFunction,
    /// `dsk_lo_hc_seam_c{C}[_t{TK}]_f32` for C in [`HC_SEAM_CLUSTERS`] order, then TK in
    /// [`HC_SEAM_TOKENS_PER_CLUSTER`] order.
    hc_seam: [[CudaFunction; 3]; 5],
    /// Clusters of a seam form resident at once, by (form, TK index, threads), asked of the
    /// driver at a form's first launch of that width.
    hc_seam_waves: std::sync::Mutex<Vec<(SeamForm, usize)>>,
    /// Whether the forms of each TK took their shared memory.
    hc_seam_tk_ok: [bool; 3],
    /// Largest cluster the seam may launch here: 1 without clusters, 8 (portable), or 16 where
    /// the device takes a non-portable cluster of 16 of its blocks.
    hc_seam_max_cluster: usize,
    hc_sinkhorn: CudaFunction,
    route: CudaFunction,
    route_warp: CudaFunction,
    dense_gate_up: CudaFunction,
    dense_down: CudaFunction,
    scale: CudaFunction,
    copy_rows: CudaFunction,
}

impl LayerOpsFns {
    /// `clusters`: whether the device launches thread-block clusters (sm_90+).
    pub fn load(m: &Arc<CudaModule>, clusters: bool) -> Result<Self, KernelError> {
        let f = |name: &str| function(m, name);
        let seam = |c: usize| -> Result<[CudaFunction; 3], KernelError> {
            Ok([
                f(&format!("dsk_lo_hc_seam_c{c}_f32"))?,
                f(&format!("dsk_lo_hc_seam_c{c}_t2_f32"))?,
                f(&format!("dsk_lo_hc_seam_c{c}_t4_f32"))?,
            ])
        };
        let hc_seam = [seam(1)?, seam(2)?, seam(4)?, seam(8)?, seam(16)?];
        // Each form may take its widest transpose; a device without that much shared memory
        // a block leaves the form out (hc_seam_tokens_per_cluster).
        let mut hc_seam_tk_ok = [true; 3];
        for (i, &tk) in HC_SEAM_TOKENS_PER_CLUSTER.iter().enumerate() {
            let bytes = seam_smem_bytes(tk, HC_SEAM_MAX_THREADS) as i32;
            for forms in &hc_seam {
                let set = forms[i].set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes,
                );
                hc_seam_tk_ok[i] &= set.is_ok();
            }
        }
        let hc_seam_max_cluster = if !clusters {
            1
        } else if hc_seam_tk_ok[0] && seam_takes_16(&hc_seam[4]) {
            16
        } else {
            8
        };
        Ok(Self {
            hc_seam,
            hc_seam_tk_ok,
            hc_seam_waves: std::sync::Mutex::new(Vec::new()),
            hc_seam_max_cluster,
            hc_sinkhorn: f("dsk_lo_hc_sinkhorn_f32")?,
            rms_norm: f("dsk_lo_rms_norm_f32")?,
            rms_norm_rope: f("dsk_lo_rms_norm_rope_f32")?,
            rope: f("dsk_lo_rope_f32")?,
            hc_mix_partial: f("dsk_lo_hc_mix_partial_f32")?,
            hc_mix_reduce: f("dsk_lo_hc_mix_reduce_f32")?,
            hc_pre_finish: f("dsk_lo_hc_pre_finish_f32")?,
            hc_pre_fused: f("dsk_lo_hc_pre_fused_f32")?,
            hc_mix_partial2: f("dsk_lo_hc_mix_partial2_f32")?,
            hc_pre_finish2: f("dsk_lo_hc_pre_finish2_f32")?,
            hc_pre_single: f("dsk_lo_hc_pre_single_f32")?,
            hc_squares: f("dsk_lo_hc_squares_f32")?,
            hc_pre_rows: f("dsk_lo_hc_pre_rows_f32")?,
            hc_post: f("dsk_lo_hc_post_f32")?,
            hc_post2: f("dsk_lo_hc_post2_f32")?,
            hc_post_squares: f("dsk_lo_hc_post_squares_f32")?,
            hc_head_finish: f("dsk_lo_hc_head_finish_f32")?,
            route: f("dsk_lo_route_f32")?,
            route_warp: f("dsk_lo_route_warp_f32")?,
            dense_gate_up: f("dsk_lo_dense_gate_up_f32")?,
            dense_down: f("dsk_lo_dense_down_f32")?,
            scale: f("dsk_lo_scale_f32")?,
            copy_rows: f("dsk_lo_copy_rows_f32")?,
        })
    }
}

/// A seam form at a width: (cluster form, tokens-a-cluster form, threads a block).
type SeamForm = (usize, usize, usize);

/// Dynamic shared memory of a seam block: its dots' transpose, TK tokens of 25 rows of a float
/// per thread.
fn seam_smem_bytes(tokens_per_cluster: usize, threads: usize) -> usize {
    tokens_per_cluster * HC_SEAM_SUM_ROWS * threads * 4
}

/// Whether clusters of 16 seam blocks of the widest form can run here: the non-portable size
/// allowed on every form and at least one such cluster of the one-token form resident (H100 /
/// H200: yes; smaller parts may have fewer SMs to a GPC). Any failure says no: the seam then
/// takes clusters of 8.
fn seam_takes_16(forms: &[CudaFunction; 3]) -> bool {
    let allowed = forms.iter().all(|f| {
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
            1,
        )
        .is_ok()
    });
    allowed
        && seam_active_clusters(&forms[0], 16, HC_SEAM_MAX_THREADS, seam_smem_bytes(1, 256))
            .is_some_and(|c| c >= 1)
}

/// Clusters of `cluster` blocks of `threads` threads and `smem` bytes of dynamic shared memory
/// of `f` resident at once (the driver's occupancy query), or `None` where it does not answer.
fn seam_active_clusters(
    f: &CudaFunction,
    cluster: usize,
    threads: usize,
    smem: usize,
) -> Option<usize> {
    // SAFETY: an all-zero attribute is a valid value of the C union; set below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim.x = cluster as u32;
    attr.value.clusterDim.y = 1;
    attr.value.clusterDim.z = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cluster as u32,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: threads as u32,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem as u32,
        hStream: std::ptr::null_mut(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    let mut clusters: std::ffi::c_int = 0;
    // SAFETY: the function is live, the config and its one attribute outlive the call, which
    // only writes `clusters`.
    let queried = unsafe {
        sys::cuOccupancyMaxActiveClusters(&mut clusters, f.cu_function(), &config).result()
    };
    queried
        .ok()
        .map(|()| usize::try_from(clusters).unwrap_or(0))
}

/// RMSNorm of `rows` rows of `dim` f32: `out = weight * (x * inv)`, `inv = 1 / sqrt(mean(x^2) +
/// eps)` (`ops::rms_norm_rows`). `weight` 0 = no weight. `x == out` (in place) is allowed.
#[derive(Clone, Copy, Debug)]
pub struct RmsNormF32 {
    pub x: CUdeviceptr,
    pub out: CUdeviceptr,
    /// f32 [dim], or 0 for none.
    pub weight: CUdeviceptr,
    pub rows: usize,
    pub dim: usize,
    pub ld_x: usize,
    pub ld_out: usize,
    pub eps: f32,
}

/// [`RmsNormF32`] of every row, then RoPE on its trailing `rope_dim` channels in the same launch
/// (row `r` is head `r % heads` of token `r / heads`, rotated at `positions[r / heads]`): the
/// bits of `rms_norm_f32` followed by `rope_f32` over `[tokens, heads, dim]` rows.
#[derive(Clone, Copy, Debug)]
pub struct RmsNormRopeF32 {
    pub norm: RmsNormF32,
    /// i32 `[rows / heads]`.
    pub positions: CUdeviceptr,
    /// f32 `[rope_dim / 2]`.
    pub inv_freq: CUdeviceptr,
    pub heads: usize,
    pub rope_dim: usize,
    pub attention_factor: f32,
}

/// In-place interleaved RoPE on the trailing `rope_dim` channels of every `head_dim`-wide head of
/// x [tokens, heads, head_dim] f32 (`RopeTable::apply`).
#[derive(Clone, Copy, Debug)]
pub struct RopeF32 {
    pub x: CUdeviceptr,
    /// i32 [tokens]
    pub positions: CUdeviceptr,
    /// f32 [rope_dim / 2]
    pub inv_freq: CUdeviceptr,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub ld_token: usize,
    pub ld_head: usize,
    pub attention_factor: f32,
    /// Conjugate rotation (`-sin`), undoing RoPE on attention output.
    pub inverse: bool,
}

/// Hyper-connection projections: `out[t, o] = dot(streams[t] * inv_t, fn_[o])`, `inv_t = 1 /
/// sqrt(mean(streams[t]^2) + norm_eps)` (`HyperConnection::mix_rows` before `finish`).
#[derive(Clone, Copy, Debug)]
pub struct HcMix {
    /// f32 [n, width] (a token's hc streams, stream-major).
    pub streams: CUdeviceptr,
    /// f32 [outs, width]
    pub fn_: CUdeviceptr,
    /// f32 [n, outs]
    pub out: CUdeviceptr,
    /// `hc_mix_workspace_floats(n, outs)` f32 of scratch.
    pub workspace: CUdeviceptr,
    pub n: usize,
    pub width: usize,
    pub outs: usize,
    pub norm_eps: f32,
}

/// `HyperConnection::finish` + `collapse` from the `hc_mix` projections.
#[derive(Clone, Copy, Debug)]
pub struct HcPreFinish {
    /// f32 [n, (2 + hc) * hc] (the `hc_mix` output).
    pub proj: CUdeviceptr,
    /// f32 [(2 + hc) * hc]
    pub base: CUdeviceptr,
    /// Scales of the pre / post / comb logits.
    pub scale: [f32; 3],
    /// f32 [n, hc * hidden]
    pub streams: CUdeviceptr,
    /// f32 [n, hidden]: the sub-layer input `sum_k pre[k] * stream_k`.
    pub x_out: CUdeviceptr,
    /// f32 [n, (2 + hc) * hc]: pre[hc], post[hc], comb[hc * hc] per token (for `hc_post`).
    pub mix_out: CUdeviceptr,
    pub n: usize,
    pub hc: usize,
    pub hidden: usize,
    pub sinkhorn_iters: usize,
    pub hc_eps: f32,
}

/// Which kernels carry [`HcPreFused`] (an A/B switch; all give the same bits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HcPreKernel {
    /// `dsk_lo_hc_mix_partial_f32` + `dsk_lo_hc_pre_fused_f32` (the Sinkhorn in shared memory,
    /// before the collapse). GEMM steps ([`Kernels::hc_squares_f32`] /
    /// [`Kernels::hc_pre_from_dots_f32`]): as `Split`.
    Old,
    /// `dsk_lo_hc_mix_partial2_f32` + `dsk_lo_hc_pre_finish2_f32`: loads issued together, the
    /// Sinkhorn in registers beside the collapse and norm. GEMM steps: the squares by the chunk
    /// kernel (one chunk), the finish by finish2.
    Split,
    /// As `Split`, but up to [`HC_SINGLE_MAX_TOKENS`] tokens in one launch
    /// (`dsk_lo_hc_pre_single_f32`: the last partial block finishes). GEMM steps:
    /// `dsk_lo_hc_squares_f32` and `dsk_lo_hc_pre_rows_f32` where the row fits it
    /// ([`hc_pre_rows_fits`]).
    #[default]
    Fused,
}

/// The kernel finishing a pre side from its chunk partials (`Kernels::hc_pre_finish_tokens`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PreFinish {
    /// `dsk_lo_hc_pre_fused_f32`, a 1,024-thread block per token.
    Fused,
    /// `dsk_lo_hc_pre_finish2_f32`, a 1,024-thread block per token.
    Finish2,
    /// `dsk_lo_hc_pre_rows_f32` (one chunk; [`hc_pre_rows_fits`]): groups of 8 collapsing
    /// blocks and a block of their Sinkhorns.
    Rows,
}

/// Which kernel carries [`HcPost`] (an A/B switch; both give the same bits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HcPostKernel {
    /// `dsk_lo_hc_post_f32`, a thread per channel (the squares, when asked for, by
    /// `dsk_lo_hc_squares_f32` after it).
    Old,
    /// `dsk_lo_hc_post2_f32` (float4 channels, the coefficients read once per block), or with
    /// the squares asked for `dsk_lo_hc_post_squares_f32` where it fits
    /// ([`hc_post_squares_fits`]).
    #[default]
    New,
}

impl std::str::FromStr for HcPostKernel {
    type Err = String;
    /// `old` or `new`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "old" => Ok(Self::Old),
            "new" => Ok(Self::New),
            other => Err(format!("unknown hc post kernel {other:?} (old, new)")),
        }
    }
}

impl std::str::FromStr for HcPreKernel {
    type Err = String;
    /// `old`, `split` or `new` (= `Fused`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "old" => Ok(Self::Old),
            "split" => Ok(Self::Split),
            "new" | "fused" => Ok(Self::Fused),
            other => Err(format!("unknown hc kernel {other:?} (old, split, new)")),
        }
    }
}

/// A hyper-connection site's whole pre side for `n` tokens: the mix projections of the streams
/// (as [`HcMix`]), pre / post / comb (as [`HcPreFinish`], into `mix_out`), the collapse, and
/// the sub-layer's RMSNorm with `norm_weight` (0: none) into `x_out` `[n, hidden]`. `workspace`
/// holds `hc_mix_workspace_floats(n, (2 + hc) * hc)` f32 whose first [`HC_WS_HEADER`] are zero
/// (as allocated zeroed; every launch leaves them zero). `norm_eps` is both the streams' RMS
/// epsilon and the sub-layer norm's (the model uses one `rms_norm_eps`).
#[derive(Clone, Copy, Debug)]
pub struct HcPreFused {
    pub streams: CUdeviceptr,
    pub fn_: CUdeviceptr,
    pub base: CUdeviceptr,
    pub scale: [f32; 3],
    pub norm_weight: CUdeviceptr,
    pub x_out: CUdeviceptr,
    pub mix_out: CUdeviceptr,
    pub workspace: CUdeviceptr,
    pub n: usize,
    pub hc: usize,
    pub hidden: usize,
    pub sinkhorn_iters: usize,
    pub hc_eps: f32,
    pub norm_eps: f32,
    pub kernel: HcPreKernel,
}

/// `expand`: `streams[t][k] = post[k] * out[t] + sum_j comb[j, k] * streams[t][j]` in place.
#[derive(Clone, Copy, Debug)]
pub struct HcPost {
    /// f32 [n, hc * hidden], updated in place.
    pub streams: CUdeviceptr,
    /// f32 [n, (2 + hc) * hc] from `hc_pre_finish`.
    pub mix: CUdeviceptr,
    /// f32 [n, hidden]: the sub-layer output.
    pub out: CUdeviceptr,
    /// f32 [n]: each token's sum of squares of its new streams, with the bits
    /// [`Kernels::hc_squares_f32`] gives (a GEMM step's next site reads them at
    /// [`Kernels::hc_given_squares`]), or 0 for none.
    pub squares: CUdeviceptr,
    pub n: usize,
    pub hc: usize,
    pub hidden: usize,
    pub kernel: HcPostKernel,
}

/// The seam between two hyper-connection sites of a decode step ([`Kernels::hc_seam_f32`]): the
/// ending site's post (`streams = post * out + comb^T streams`, [`Kernels::hc_post_f32`]'s bits)
/// and the starting site's pre (its mix: pre, post and the comb's *logits*; the collapse and the
/// sub-layer norm into `x_out`, [`Kernels::hc_pre_fused_f32`]'s values to f32 rounding) in one
/// launch. hc must be 4. A post reads the comb only after [`Kernels::hc_sinkhorn_f32`] has turned
/// the logits into it.
#[derive(Clone, Copy, Debug)]
pub struct HcSeam {
    /// f32 [n, hc * hidden]: read, and with a post updated in place.
    pub streams: CUdeviceptr,
    /// f32 [n, (2 + hc) * hc]: the ending site's mix with its final comb, or 0 for no post (the
    /// step's first site). At least one launch must separate the kernel that wrote it (and the
    /// streams) from this one: the seam reads both before its PDL wait.
    pub post_mix: CUdeviceptr,
    /// f32 [n, hidden]: the ending sub-layer's output (with a post).
    pub out: CUdeviceptr,
    /// The starting site's projection [(2 + hc) * hc, hc * hidden], biases and scales.
    pub fn_: CUdeviceptr,
    pub base: CUdeviceptr,
    pub scale: [f32; 3],
    /// f32 [hidden], or 0 for none.
    pub norm_weight: CUdeviceptr,
    /// f32 [n, hidden]: the starting sub-layer's normed input.
    pub x_out: CUdeviceptr,
    /// f32 [n, (2 + hc) * hc]: the starting site's mix; may be `post_mix` itself.
    pub mix_out: CUdeviceptr,
    pub n: usize,
    pub hc: usize,
    pub hidden: usize,
    pub hc_eps: f32,
    /// The mix projections' epsilon and the sub-layer norm's (the model uses one).
    pub norm_eps: f32,
    /// Tokens a cluster serves, one of [`HC_SEAM_TOKENS_PER_CLUSTER`], or 0 for
    /// [`Kernels::hc_seam_tokens_per_cluster`]'s choice. Every token gets the same bits either way.
    pub tokens_per_cluster: usize,
}

/// `HyperHead::collapse`: `pre[i] = sigmoid(dot(norm(streams), fn_[i]) * scale + base[i]) +
/// hc_eps`, then `x_out = sum_k pre[k] * stream_k`.
#[derive(Clone, Copy, Debug)]
pub struct HcHead {
    /// f32 [n, hc * hidden]
    pub streams: CUdeviceptr,
    /// f32 [hc, hc * hidden]
    pub fn_: CUdeviceptr,
    /// f32 [hc]
    pub base: CUdeviceptr,
    pub scale: f32,
    /// f32 [n, hidden]
    pub x_out: CUdeviceptr,
    /// `hc_head_workspace_floats(n, hc)` f32 of scratch.
    pub workspace: CUdeviceptr,
    pub n: usize,
    pub hc: usize,
    pub hidden: usize,
    pub hc_eps: f32,
    pub norm_eps: f32,
}

/// Router score function (config `scoring_func`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterScoring {
    /// sqrt(softplus(x)), softplus with torch's threshold 20.
    SqrtSoftplus,
    Sigmoid,
}

/// `router_scores` + `route`: expert ids and weights per token. Hash layers (`hash_table` != 0)
/// take `hash_table[token_id]`; the others the top `k` of `score + bias` (ties to the lower index,
/// descending). Weights: chosen scores / (their sum + 1e-20) * `routed_scaling_factor`.
/// A token id outside `[0, vocab)` or a table entry outside `[0, experts)` yields id -1, weight 0.
#[derive(Clone, Copy, Debug)]
pub struct RouteF32 {
    /// f32 [n, experts]
    pub logits: CUdeviceptr,
    pub scoring: RouterScoring,
    /// f32 [experts], or 0 for none (top-k layers only).
    pub bias: CUdeviceptr,
    /// i32 [vocab, k], or 0 for a top-k layer.
    pub hash_table: CUdeviceptr,
    /// i32 [n] (read only by hash layers; may be 0 otherwise).
    pub token_ids: CUdeviceptr,
    /// Rows of `hash_table` (ignored without one).
    pub vocab: usize,
    pub n: usize,
    pub experts: usize,
    pub k: usize,
    pub routed_scaling_factor: f32,
    /// i32 [n, k]
    pub out_ids: CUdeviceptr,
    /// f32 [n, k]
    pub out_weights: CUdeviceptr,
}

/// Dense f32 SwiGLU experts (banks that are not FP4; tiny models): per slot `(t, j)`,
/// `e = ids[t, j]`, `a = silu(min(w1[e] x, limit)) * clamp(w3[e] x, -limit, limit)`,
/// `out[t] = sum_j weights[t, j] * (w2[e] a)` (j ascending). Ids outside `[0, experts)` are skipped.
#[derive(Clone, Copy, Debug)]
pub struct DenseExpertsF32 {
    /// f32 [experts, inter, hidden]
    pub w1: CUdeviceptr,
    /// f32 [experts, inter, hidden]
    pub w3: CUdeviceptr,
    /// f32 [experts, hidden, inter]
    pub w2: CUdeviceptr,
    /// f32 [n, hidden]
    pub x: CUdeviceptr,
    /// i32 [n, k]
    pub ids: CUdeviceptr,
    /// f32 [n, k]
    pub weights: CUdeviceptr,
    /// f32 [n * k, inter] scratch.
    pub h_scratch: CUdeviceptr,
    /// f32 [n, hidden]
    pub out: CUdeviceptr,
    pub n: usize,
    pub k: usize,
    pub experts: usize,
    pub hidden: usize,
    pub inter: usize,
    pub limit: f32,
}

/// Strided row copy: `dst[r, c] = src[r, c]` for `r < rows`, `c < width` (f32).
#[derive(Clone, Copy, Debug)]
pub struct CopyRowsF32 {
    pub src: CUdeviceptr,
    pub ld_src: usize,
    pub dst: CUdeviceptr,
    pub ld_dst: usize,
    pub rows: usize,
    pub width: usize,
}

/// Scratch f32 `Kernels::hc_mix_f32` / `hc_pre_fused_f32` need for `n` tokens and `outs`
/// projections: the counter header, then the chunk partials and squares.
pub fn hc_mix_workspace_floats(n: usize, outs: usize) -> usize {
    HC_WS_HEADER + HC_MAX_SPLITS * n * (outs + 1)
}

/// Where the chunk partials (`[splits, n, outs]`) and then the squares (`[splits, n]`) sit in a
/// hyper-connection workspace.
fn hc_partials(workspace: CUdeviceptr, splits: usize, n: usize, outs: usize) -> (u64, u64) {
    let partial = workspace + (HC_WS_HEADER * 4) as u64;
    (partial, partial + (splits * n * outs * 4) as u64)
}

/// Scratch f32 `Kernels::hc_head_f32` needs.
pub fn hc_head_workspace_floats(n: usize, hc: usize) -> usize {
    hc_mix_workspace_floats(n, hc) + n * hc
}

/// Blocks one projection row is split over: enough blocks for two per SM, each chunk at least
/// one block of threads wide.
pub fn hc_mix_splits(n: usize, width: usize, outs: usize, sms: usize) -> usize {
    let base = outs.max(1) * n.div_ceil(MIX_TOKENS).max(1);
    (2 * sms.max(1))
        .div_ceil(base)
        .clamp(1, HC_MAX_SPLITS)
        .min(width.div_ceil(BLOCK).max(1))
}

fn invalid(kernel: &'static str, msg: String) -> KernelError {
    KernelError::invalid(kernel, msg)
}

pub fn check_rms_norm_f32(a: &RmsNormF32) -> Result<(), KernelError> {
    const K: &str = "rms_norm_f32";
    if a.rows == 0 || a.dim == 0 || a.ld_x < a.dim || a.ld_out < a.dim {
        return Err(invalid(
            K,
            format!(
                "rows = {}, dim = {}, ld_x = {}, ld_out = {}: need rows, dim > 0 and strides >= dim",
                a.rows, a.dim, a.ld_x, a.ld_out
            ),
        ));
    }
    i32_arg(K, "dim", a.dim)?;
    u32_grid(K, a.rows)?;
    i64_arg(K, "rows * ld", a.rows.saturating_mul(a.ld_x.max(a.ld_out)))?;
    nonnull(K, &[("x", a.x), ("out", a.out)])
}

pub fn check_rms_norm_rope_f32(a: &RmsNormRopeF32) -> Result<(), KernelError> {
    const K: &str = "rms_norm_rope_f32";
    check_rms_norm_f32(&a.norm)?;
    if a.heads == 0
        || !a.norm.rows.is_multiple_of(a.heads)
        || a.rope_dim == 0
        || !a.rope_dim.is_multiple_of(2)
        || a.rope_dim > a.norm.dim
    {
        return Err(invalid(
            K,
            format!(
                "rows = {}, heads = {}, rope_dim = {}, dim = {}: need whole tokens of heads and \
                 an even rope_dim up to dim",
                a.norm.rows, a.heads, a.rope_dim, a.norm.dim
            ),
        ));
    }
    i32_arg(K, "heads", a.heads)?;
    nonnull(K, &[("positions", a.positions), ("inv_freq", a.inv_freq)])
}

pub fn check_rope_f32(a: &RopeF32) -> Result<(), KernelError> {
    const K: &str = "rope_f32";
    if a.tokens == 0 || a.heads == 0 || a.rope_dim == 0 || !a.rope_dim.is_multiple_of(2) {
        return Err(invalid(
            K,
            format!(
                "tokens = {}, heads = {}, rope_dim = {}: need all > 0 and rope_dim even",
                a.tokens, a.heads, a.rope_dim
            ),
        ));
    }
    if a.rope_dim > a.head_dim
        || a.ld_head < a.head_dim
        || a.ld_token
            < a.ld_head
                .saturating_mul(a.heads - 1)
                .saturating_add(a.head_dim)
    {
        return Err(invalid(
            K,
            format!(
                "rope_dim = {}, head_dim = {}, ld_head = {}, ld_token = {} do not fit [heads = {}]",
                a.rope_dim, a.head_dim, a.ld_head, a.ld_token, a.heads
            ),
        ));
    }
    for (what, v) in [
        ("tokens", a.tokens),
        ("heads", a.heads),
        ("head_dim", a.head_dim),
    ] {
        i32_arg(K, what, v)?;
    }
    i64_arg(K, "tokens * ld_token", a.tokens.saturating_mul(a.ld_token))?;
    if a.attention_factor.is_nan() {
        return Err(invalid(K, "attention_factor is NaN".into()));
    }
    nonnull(
        K,
        &[
            ("x", a.x),
            ("positions", a.positions),
            ("inv_freq", a.inv_freq),
        ],
    )
}

pub fn check_hc_mix(a: &HcMix) -> Result<(), KernelError> {
    const K: &str = "hc_mix_f32";
    if a.n == 0 || a.width == 0 || a.outs == 0 || a.outs > GRID_YZ_MAX {
        return Err(invalid(
            K,
            format!(
                "n = {}, width = {}, outs = {}: need all > 0, outs <= {GRID_YZ_MAX}",
                a.n, a.width, a.outs
            ),
        ));
    }
    if a.n.div_ceil(MIX_TOKENS) > GRID_YZ_MAX {
        return Err(invalid(K, format!("n = {} too large", a.n)));
    }
    i32_arg(K, "width", a.width)?;
    i32_arg(K, "n * outs", a.n.saturating_mul(a.outs))?;
    nonnull(
        K,
        &[
            ("streams", a.streams),
            ("fn_", a.fn_),
            ("out", a.out),
            ("workspace", a.workspace),
        ],
    )
}

fn check_hc(kernel: &'static str, n: usize, hc: usize, hidden: usize) -> Result<(), KernelError> {
    if n == 0 || n > GRID_YZ_MAX || hc == 0 || hc > HC_MAX || hidden == 0 {
        return Err(invalid(
            kernel,
            format!("n = {n}, hc = {hc}, hidden = {hidden}: need n in 1..={GRID_YZ_MAX}, hc in 1..={HC_MAX}, hidden > 0"),
        ));
    }
    i32_arg(kernel, "hidden", hidden)?;
    i64_arg(kernel, "n * hc * hidden", n.saturating_mul(hc * hidden))?;
    Ok(())
}

pub fn check_hc_seam(a: &HcSeam) -> Result<(), KernelError> {
    const K: &str = "hc_seam_f32";
    check_hc(K, a.n, a.hc, a.hidden)?;
    if a.hc != 4 || a.n > HC_SEAM_MAX_TOKENS {
        return Err(invalid(
            K,
            format!(
                "n = {}, hc = {}: the seam takes hc 4 and 1..={HC_SEAM_MAX_TOKENS} tokens",
                a.n, a.hc
            ),
        ));
    }
    if a.tokens_per_cluster != 0 && !HC_SEAM_TOKENS_PER_CLUSTER.contains(&a.tokens_per_cluster) {
        return Err(invalid(
            K,
            format!(
                "{} tokens a cluster: the seam is built for {HC_SEAM_TOKENS_PER_CLUSTER:?} (0: \
                 its choice)",
                a.tokens_per_cluster
            ),
        ));
    }
    check_pre_site(K, [a.streams, a.fn_, a.base, a.x_out, a.mix_out], a.scale)?;
    if a.post_mix != 0 {
        nonnull(K, &[("out", a.out)])?;
    }
    Ok(())
}

/// What every pre side takes: the streams, the site's projection and biases, the normed input
/// and mix outputs (all non-null, in that order) and finite scales.
fn check_pre_site(
    kernel: &'static str,
    [streams, fn_, base, x_out, mix_out]: [CUdeviceptr; 5],
    scale: [f32; 3],
) -> Result<(), KernelError> {
    nonnull(
        kernel,
        &[
            ("streams", streams),
            ("fn_", fn_),
            ("base", base),
            ("x_out", x_out),
            ("mix_out", mix_out),
        ],
    )?;
    if scale.iter().any(|v| !v.is_finite()) {
        return Err(invalid(kernel, format!("scale {scale:?}")));
    }
    Ok(())
}

pub fn check_hc_pre_finish(a: &HcPreFinish) -> Result<(), KernelError> {
    const K: &str = "hc_pre_finish_f32";
    check_hc(K, a.n, a.hc, a.hidden)?;
    i32_arg(K, "sinkhorn_iters", a.sinkhorn_iters)?;
    nonnull(
        K,
        &[
            ("proj", a.proj),
            ("base", a.base),
            ("streams", a.streams),
            ("x_out", a.x_out),
            ("mix_out", a.mix_out),
        ],
    )
}

pub fn check_hc_pre_fused(a: &HcPreFused) -> Result<(), KernelError> {
    const K: &str = "hc_pre_fused_f32";
    check_pre_site(K, [a.streams, a.fn_, a.base, a.x_out, a.mix_out], a.scale)?;
    nonnull(K, &[("workspace", a.workspace)])?;
    check_hc(K, a.n, a.hc, a.hidden)?;
    i32_arg(K, "hc * hidden", a.hc * a.hidden)?;
    i32_arg(K, "sinkhorn_iters", a.sinkhorn_iters)?;
    Ok(())
}

pub fn check_hc_post(a: &HcPost) -> Result<(), KernelError> {
    const K: &str = "hc_post_f32";
    check_hc(K, a.n, a.hc, a.hidden)?;
    nonnull(K, &[("streams", a.streams), ("mix", a.mix), ("out", a.out)])
}

/// Whether `dsk_lo_hc_post2_f32` may move 4 channels per thread (16-byte accesses).
fn hc_post_vec4(a: &HcPost) -> bool {
    a.hidden.is_multiple_of(4)
        && aligned16("hc_post_f32", &[("streams", a.streams), ("out", a.out)]).is_ok()
}

/// Whether `dsk_lo_hc_post_squares_f32` takes the shape: hc 4 (V4-Flash), hidden a multiple of
/// 256 up to [`HC_POST_SQUARES_MAX_HIDDEN`] (its threads own channels `gt + 256 m`, as the
/// squares kernel's columns). Elsewhere the post and the squares are two launches.
pub fn hc_post_squares_fits(a: &HcPost) -> bool {
    a.hc == 4 && a.hidden.is_multiple_of(BLOCK) && a.hidden <= HC_POST_SQUARES_MAX_HIDDEN
}

/// Whether `dsk_lo_hc_pre_rows_f32` takes the shape: hidden a multiple of 4 up to
/// [`HC_ROWS_MAX_HIDDEN`], the streams, `x_out` and the norm weight 16-byte aligned. Elsewhere
/// GEMM steps finish with `dsk_lo_hc_pre_finish2_f32`.
pub fn hc_pre_rows_fits(a: &HcPreFused) -> bool {
    a.hidden.is_multiple_of(4)
        && a.hidden <= HC_ROWS_MAX_HIDDEN
        && aligned16(
            "hc_pre_rows",
            &[
                ("streams", a.streams),
                ("x_out", a.x_out),
                ("norm_weight", a.norm_weight),
            ],
        )
        .is_ok()
}

pub fn check_hc_head(a: &HcHead) -> Result<(), KernelError> {
    const K: &str = "hc_head_f32";
    check_hc(K, a.n, a.hc, a.hidden)?;
    i32_arg(K, "hc * hidden", a.hc * a.hidden)?;
    nonnull(
        K,
        &[
            ("streams", a.streams),
            ("fn_", a.fn_),
            ("base", a.base),
            ("x_out", a.x_out),
            ("workspace", a.workspace),
        ],
    )
}

pub fn check_route(a: &RouteF32) -> Result<(), KernelError> {
    const K: &str = "route_f32";
    if a.n == 0 || a.experts == 0 || a.experts > ROUTE_MAX_EXPERTS {
        return Err(invalid(
            K,
            format!(
                "n = {}, experts = {}: need n > 0, experts in 1..={ROUTE_MAX_EXPERTS}",
                a.n, a.experts
            ),
        ));
    }
    if a.k == 0 || a.k > ROUTE_MAX_K || (a.hash_table == 0 && a.k > a.experts) {
        return Err(invalid(
            K,
            format!(
                "k = {} must be in 1..={ROUTE_MAX_K} and <= experts ({})",
                a.k, a.experts
            ),
        ));
    }
    if a.hash_table != 0 && (a.token_ids == 0 || a.vocab == 0) {
        return Err(invalid(
            K,
            "a hash layer needs token_ids and vocab > 0".into(),
        ));
    }
    if a.routed_scaling_factor.is_nan() {
        return Err(invalid(K, "routed_scaling_factor is NaN".into()));
    }
    u32_grid(K, a.n)?;
    i32_arg(K, "vocab", a.vocab)?;
    i64_arg(K, "vocab * k", a.vocab.saturating_mul(a.k))?;
    nonnull(
        K,
        &[
            ("logits", a.logits),
            ("out_ids", a.out_ids),
            ("out_weights", a.out_weights),
        ],
    )
}

pub fn check_dense_experts(a: &DenseExpertsF32) -> Result<(), KernelError> {
    const K: &str = "dense_experts_f32";
    if a.n == 0 || a.k == 0 || a.experts == 0 || a.hidden == 0 || a.inter == 0 {
        return Err(invalid(
            K,
            format!(
                "n = {}, k = {}, experts = {}, hidden = {}, inter = {}: all must be > 0",
                a.n, a.k, a.experts, a.hidden, a.inter
            ),
        ));
    }
    if a.limit.is_nan() || a.limit <= 0.0 {
        return Err(invalid(K, format!("limit = {} must be > 0", a.limit)));
    }
    for (what, v) in [
        ("n", a.n),
        ("k", a.k),
        ("experts", a.experts),
        ("hidden", a.hidden),
        ("inter", a.inter),
    ] {
        i32_arg(K, what, v)?;
    }
    // Warps (one per output row) times 32 threads must index within i64 and the grid within u32.
    let threads = |a: usize, b: usize, c: usize| {
        a.checked_mul(b)
            .and_then(|r| r.checked_mul(c))
            .and_then(|r| r.checked_mul(32))
            .ok_or_else(|| invalid(K, "n * k * inter or n * hidden too large".into()))
    };
    u32_grid(K, threads(a.n, a.k, a.inter)?.div_ceil(BLOCK))?;
    u32_grid(K, threads(a.n, 1, a.hidden)?.div_ceil(BLOCK))?;
    nonnull(
        K,
        &[
            ("w1", a.w1),
            ("w3", a.w3),
            ("w2", a.w2),
            ("x", a.x),
            ("ids", a.ids),
            ("weights", a.weights),
            ("h_scratch", a.h_scratch),
            ("out", a.out),
        ],
    )
}

pub fn check_copy_rows(a: &CopyRowsF32) -> Result<(), KernelError> {
    const K: &str = "copy_rows_f32";
    if a.ld_src < a.width || a.ld_dst < a.width {
        return Err(invalid(
            K,
            format!(
                "width = {}, ld_src = {}, ld_dst = {}: strides must be >= width",
                a.width, a.ld_src, a.ld_dst
            ),
        ));
    }
    i32_arg(K, "rows", a.rows)?;
    i32_arg(K, "width", a.width)?;
    nonnull(K, &[("src", a.src), ("dst", a.dst)])
}

impl Kernels {
    /// # Safety
    /// `x` must hold `rows` rows of stride `ld_x`, `out` of stride `ld_out` (each >= dim), and
    /// `weight` (when not 0) `dim` f32, all device memory of this context.
    pub unsafe fn rms_norm_f32(
        &self,
        stream: &CudaStream,
        a: &RmsNormF32,
    ) -> Result<(), KernelError> {
        const K: &str = "rms_norm_f32";
        check_rms_norm_f32(a)?;
        let dim = i32_arg(K, "dim", a.dim)?;
        let (ldx, ldo) = (i64_arg(K, "ld_x", a.ld_x)?, i64_arg(K, "ld_out", a.ld_out)?);
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, a.rows)?, 1, 1),
            block_dim: (BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.layer_ops.rms_norm)
            .arg(&a.x)
            .arg(&a.out)
            .arg(&a.weight)
            .arg(&dim)
            .arg(&ldx)
            .arg(&ldo)
            .arg(&a.eps)
            .launch(cfg)
            .map_err(KernelError::driver("launch rms_norm_f32"))?;
        Ok(())
    }

    /// # Safety
    /// As [`Self::rms_norm_f32`] for `a.norm`, plus `positions` holding `rows / heads` i32 and
    /// `inv_freq` `rope_dim / 2` f32, device memory of this context.
    pub unsafe fn rms_norm_rope_f32(
        &self,
        stream: &CudaStream,
        a: &RmsNormRopeF32,
    ) -> Result<(), KernelError> {
        const K: &str = "rms_norm_rope_f32";
        check_rms_norm_rope_f32(a)?;
        let n = &a.norm;
        let dim = i32_arg(K, "dim", n.dim)?;
        let (ldx, ldo) = (i64_arg(K, "ld_x", n.ld_x)?, i64_arg(K, "ld_out", n.ld_out)?);
        let (heads, rd) = (
            i32_arg(K, "heads", a.heads)?,
            i32_arg(K, "rope_dim", a.rope_dim)?,
        );
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, n.rows)?, 1, 1),
            block_dim: (BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.layer_ops.rms_norm_rope)
            .arg(&n.x)
            .arg(&n.out)
            .arg(&n.weight)
            .arg(&dim)
            .arg(&ldx)
            .arg(&ldo)
            .arg(&n.eps)
            .arg(&a.positions)
            .arg(&a.inv_freq)
            .arg(&heads)
            .arg(&rd)
            .arg(&a.attention_factor)
            .launch(cfg)
            .map_err(KernelError::driver("launch rms_norm_rope_f32"))?;
        Ok(())
    }

    /// # Safety
    /// `x` must hold `tokens` x `heads` heads at the given strides, `positions` `tokens` i32 and
    /// `inv_freq` `rope_dim / 2` f32, all device memory of this context.
    pub unsafe fn rope_f32(&self, stream: &CudaStream, a: &RopeF32) -> Result<(), KernelError> {
        const K: &str = "rope_f32";
        check_rope_f32(a)?;
        let (t, h) = (
            i32_arg(K, "tokens", a.tokens)?,
            i32_arg(K, "heads", a.heads)?,
        );
        let (hd, rd) = (
            i32_arg(K, "head_dim", a.head_dim)?,
            i32_arg(K, "rope_dim", a.rope_dim)?,
        );
        let (ldt, ldh) = (
            i64_arg(K, "ld_token", a.ld_token)?,
            i64_arg(K, "ld_head", a.ld_head)?,
        );
        let inverse = i32::from(a.inverse);
        let pairs = a.tokens * a.heads * (a.rope_dim / 2);
        stream
            .kernel(&self.layer_ops.rope)
            .arg(&a.x)
            .arg(&a.positions)
            .arg(&a.inv_freq)
            .arg(&t)
            .arg(&h)
            .arg(&hd)
            .arg(&rd)
            .arg(&ldt)
            .arg(&ldh)
            .arg(&a.attention_factor)
            .arg(&inverse)
            .launch(grid_stride(K, pairs, self.sms)?)
            .map_err(KernelError::driver("launch rope_f32"))?;
        Ok(())
    }

    /// Hyper-connection projections (two launches: split partial dots, then a fixed-order reduce).
    ///
    /// # Safety
    /// `streams` [n, width], `fn_` [outs, width], `out` [n, outs] and `workspace`
    /// (`hc_mix_workspace_floats(n, outs)`) f32 must be device memory of this context; `out`
    /// must not overlap the others.
    pub unsafe fn hc_mix_f32(&self, stream: &CudaStream, a: &HcMix) -> Result<(), KernelError> {
        const K: &str = "hc_mix_f32";
        check_hc_mix(a)?;
        let splits = hc_mix_splits(a.n, a.width, a.outs, self.sms);
        let (partial, sq) = hc_partials(a.workspace, splits, a.n, a.outs);
        let (n, width) = (i32_arg(K, "n", a.n)?, i32_arg(K, "width", a.width)?);
        let (outs, splits_i) = (i32_arg(K, "outs", a.outs)?, i32_arg(K, "splits", splits)?);
        // SAFETY: as this function's contract.
        unsafe {
            self.hc_mix_partial(
                stream,
                a.streams,
                a.fn_,
                a.workspace,
                a.n,
                a.width,
                a.outs,
                false,
            )
        }?;
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, (a.n * a.outs).div_ceil(BLOCK))?, 1, 1),
            block_dim: (BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.layer_ops.hc_mix_reduce)
            .arg(&partial)
            .arg(&sq)
            .arg(&a.out)
            .arg(&n)
            .arg(&outs)
            .arg(&splits_i)
            .arg(&width)
            .arg(&a.norm_eps)
            .launch(cfg)
            .map_err(KernelError::driver("launch hc_mix_reduce"))?;
        Ok(())
    }

    /// The chunked projections of `hc_mix_f32` into `workspace` (partials, then squares);
    /// `loads_together` picks `dsk_lo_hc_mix_partial2_f32` (same values).
    ///
    /// # Safety
    /// As [`Self::hc_mix_f32`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn hc_mix_partial(
        &self,
        stream: &CudaStream,
        streams: CUdeviceptr,
        fn_: CUdeviceptr,
        workspace: CUdeviceptr,
        n: usize,
        width: usize,
        outs: usize,
        loads_together: bool,
    ) -> Result<(), KernelError> {
        const K: &str = "hc_mix_partial";
        let splits = hc_mix_splits(n, width, outs, self.sms);
        let chunk = width.div_ceil(splits);
        let (partial, sq) = hc_partials(workspace, splits, n, outs);
        let f = if loads_together {
            &self.layer_ops.hc_mix_partial2
        } else {
            &self.layer_ops.hc_mix_partial
        };
        let cfg = LaunchConfig {
            grid_dim: (
                u32_grid(K, splits)?,
                u32_grid(K, outs)?,
                u32_grid(K, n.div_ceil(MIX_TOKENS))?,
            ),
            block_dim: (BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(f)
            .arg(&streams)
            .arg(&fn_)
            .arg(&partial)
            .arg(&sq)
            .arg(&i32_arg(K, "n", n)?)
            .arg(&i32_arg(K, "width", width)?)
            .arg(&i32_arg(K, "outs", outs)?)
            .arg(&i32_arg(K, "chunk", chunk)?)
            .launch(cfg)
            .map_err(KernelError::driver("launch hc_mix_partial"))?;
        Ok(())
    }

    /// The pre side of a hyper-connection site with the kernels `a.kernel` names: two launches
    /// (chunk partials, then one finishing block per token), or for up to
    /// [`HC_SINGLE_MAX_TOKENS`] tokens with [`HcPreKernel::Fused`] one launch.
    ///
    /// # Safety
    /// Every pointer must address the f32 shape documented on [`HcPreFused`], device memory of
    /// this context; `x_out` and `mix_out` must not overlap the inputs. Launches that share a
    /// workspace must be ordered (one stream): the single-launch kernel counts its blocks there.
    pub unsafe fn hc_pre_fused_f32(
        &self,
        stream: &CudaStream,
        a: &HcPreFused,
    ) -> Result<(), KernelError> {
        const K: &str = "hc_pre_fused_f32";
        check_hc_pre_fused(a)?;
        let outs = (2 + a.hc) * a.hc;
        let width = a.hc * a.hidden;
        let splits = hc_mix_splits(a.n, width, outs, self.sms);
        let (partial, sq) = hc_partials(a.workspace, splits, a.n, outs);
        let (splits_i, width_i) = (i32_arg(K, "splits", splits)?, i32_arg(K, "width", width)?);
        let (hc, hidden) = (i32_arg(K, "hc", a.hc)?, i32_arg(K, "hidden", a.hidden)?);
        let iters = i32_arg(K, "sinkhorn_iters", a.sinkhorn_iters)?;
        if a.kernel == HcPreKernel::Fused && a.n <= HC_SINGLE_MAX_TOKENS {
            // One block per token and four (chunk, output) pairs, as 256-thread groups.
            let groups = HC_FUSED_BLOCK / BLOCK;
            let cfg = LaunchConfig {
                grid_dim: (
                    u32_grid(K, (splits * outs).div_ceil(groups))?,
                    u32_grid(K, a.n)?,
                    1,
                ),
                block_dim: (HC_FUSED_BLOCK as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let counter = a.workspace;
            let chunk = i32_arg(K, "chunk", width.div_ceil(splits))?;
            stream
                .kernel(&self.layer_ops.hc_pre_single)
                .arg(&a.streams)
                .arg(&a.fn_)
                .arg(&partial)
                .arg(&sq)
                .arg(&counter)
                .arg(&splits_i)
                .arg(&chunk)
                .arg(&width_i)
                .arg(&a.norm_eps)
                .arg(&a.base)
                .arg(&a.scale[0])
                .arg(&a.scale[1])
                .arg(&a.scale[2])
                .arg(&a.norm_weight)
                .arg(&a.x_out)
                .arg(&a.mix_out)
                .arg(&i32_arg(K, "n", a.n)?)
                .arg(&hc)
                .arg(&hidden)
                .arg(&iters)
                .arg(&a.hc_eps)
                .arg(&a.norm_eps)
                .launch(cfg)
                .map_err(KernelError::driver("launch hc_pre_single"))?;
            return Ok(());
        }
        let old = a.kernel == HcPreKernel::Old;
        // SAFETY: as this function's contract: the chunked mix projections into the workspace
        // (hc_mix_f32's first kernel; its reduce is fused into the kernel below).
        unsafe {
            self.hc_mix_partial(
                stream,
                a.streams,
                a.fn_,
                a.workspace,
                a.n,
                width,
                outs,
                !old,
            )
        }?;
        let finish = if old {
            PreFinish::Fused
        } else {
            PreFinish::Finish2
        };
        // SAFETY: as this function's contract; the partials were written just above.
        unsafe { self.hc_pre_finish_tokens(stream, a, splits, finish) }
    }

    /// The per-token finish of the pre side from `splits` chunk partials in the workspace, by
    /// `finish`'s kernel (all take the same arguments and give the same values).
    ///
    /// # Safety
    /// As [`Self::hc_pre_fused_f32`], with the workspace's partials and squares written for
    /// `splits` chunks.
    unsafe fn hc_pre_finish_tokens(
        &self,
        stream: &CudaStream,
        a: &HcPreFused,
        splits: usize,
        finish: PreFinish,
    ) -> Result<(), KernelError> {
        const K: &str = "hc_pre_fused_f32";
        let outs = (2 + a.hc) * a.hc;
        let (partial, sq) = hc_partials(a.workspace, splits, a.n, outs);
        let (splits_i, width_i) = (
            i32_arg(K, "splits", splits)?,
            i32_arg(K, "width", a.hc * a.hidden)?,
        );
        let (hc, hidden) = (i32_arg(K, "hc", a.hc)?, i32_arg(K, "hidden", a.hidden)?);
        let iters = i32_arg(K, "sinkhorn_iters", a.sinkhorn_iters)?;
        let (f, blocks, threads) = match finish {
            PreFinish::Fused => (&self.layer_ops.hc_pre_fused, a.n, HC_FUSED_BLOCK),
            PreFinish::Finish2 => (&self.layer_ops.hc_pre_finish2, a.n, HC_FUSED_BLOCK),
            PreFinish::Rows => (
                &self.layer_ops.hc_pre_rows,
                a.n.div_ceil(HC_ROWS_GROUP) * (HC_ROWS_GROUP + 1),
                BLOCK,
            ),
        };
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, blocks)?, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(f)
            .arg(&partial)
            .arg(&sq)
            .arg(&splits_i)
            .arg(&width_i)
            .arg(&a.norm_eps)
            .arg(&a.base)
            .arg(&a.scale[0])
            .arg(&a.scale[1])
            .arg(&a.scale[2])
            .arg(&a.streams)
            .arg(&a.norm_weight)
            .arg(&a.x_out)
            .arg(&a.mix_out)
            .arg(&i32_arg(K, "n", a.n)?)
            .arg(&hc)
            .arg(&hidden)
            .arg(&iters)
            .arg(&a.hc_eps)
            .arg(&a.norm_eps)
            .launch(cfg)
            .map_err(KernelError::driver("launch hc_pre_fused"))?;
        Ok(())
    }

    /// Where a GEMM writes the mix dots for [`Self::hc_pre_from_dots_f32`]: f32 `[n, (2 + hc) *
    /// hc]` row-major, the workspace's partials as one chunk.
    pub fn hc_given_dots(workspace: CUdeviceptr, n: usize, hc: usize) -> CUdeviceptr {
        hc_partials(workspace, 1, n, (2 + hc) * hc).0
    }

    /// Where [`Self::hc_squares_f32`] (or a post with [`HcPost::squares`]) leaves the sums of
    /// squares for [`Self::hc_pre_from_dots_f32`]: f32 `[n]` after the dots.
    pub fn hc_given_squares(workspace: CUdeviceptr, n: usize, hc: usize) -> CUdeviceptr {
        hc_partials(workspace, 1, n, (2 + hc) * hc).1
    }

    /// The pre side of a hyper-connection site for many tokens (GEMM steps) with the mix dots
    /// computed by the caller, first half: each token's sum of squares at
    /// [`Self::hc_given_squares`], with `a.kernel`'s choice: `dsk_lo_hc_squares_f32` (a block per
    /// token), or for `Old` / `Split` the chunk kernel over the whole width (output 0 only; it
    /// also writes output 0's dot, which the caller's GEMM into [`Self::hc_given_dots`] then
    /// overwrites); the same bits. The chunk kernels re-read the streams once per output (24
    /// times at V4-Flash's hc = 4), which for an 8,192-token piece (512 MB of streams) no cache
    /// holds; a GEMM reads them once.
    ///
    /// # Safety
    /// As [`Self::hc_pre_fused_f32`].
    pub unsafe fn hc_squares_f32(
        &self,
        stream: &CudaStream,
        a: &HcPreFused,
    ) -> Result<(), KernelError> {
        const K: &str = "hc_squares_f32";
        check_hc_pre_fused(a)?;
        let outs = (2 + a.hc) * a.hc;
        let width = a.hc * a.hidden;
        let (partial, sq) = hc_partials(a.workspace, 1, a.n, outs);
        if a.kernel == HcPreKernel::Fused {
            // SAFETY: the streams hold n rows of width, sq n floats (this function's contract).
            return unsafe { self.hc_row_squares(stream, a.streams, sq, a.n, width) };
        }
        let cfg = LaunchConfig {
            grid_dim: (1, 1, u32_grid(K, a.n.div_ceil(MIX_TOKENS))?),
            block_dim: (BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.layer_ops.hc_mix_partial2)
            .arg(&a.streams)
            .arg(&a.fn_)
            .arg(&partial)
            .arg(&sq)
            .arg(&i32_arg(K, "n", a.n)?)
            .arg(&i32_arg(K, "width", width)?)
            .arg(&i32_arg(K, "outs", outs)?)
            .arg(&i32_arg(K, "chunk", width)?)
            .launch(cfg)
            .map_err(KernelError::driver("launch hc squares"))?;
        Ok(())
    }

    /// `sq[t]` = the sum of squares of row `t` of `streams` `[n, width]`
    /// (`dsk_lo_hc_squares_f32`: the chunk kernel's bits for one chunk).
    ///
    /// # Safety
    /// `streams` must hold `n * width` f32 and `sq` `n`, device memory of this context.
    unsafe fn hc_row_squares(
        &self,
        stream: &CudaStream,
        streams: CUdeviceptr,
        sq: CUdeviceptr,
        n: usize,
        width: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "hc_squares_f32";
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, n)?, 1, 1),
            block_dim: (BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.layer_ops.hc_squares)
            .arg(&streams)
            .arg(&sq)
            .arg(&i32_arg(K, "width", width)?)
            .launch(cfg)
            .map_err(KernelError::driver("launch hc squares"))?;
        Ok(())
    }

    /// Second half of [`Self::hc_squares_f32`]: the per-token finish from the squares and the
    /// dots at [`Self::hc_given_dots`]: `dsk_lo_hc_pre_rows_f32` (groups of blocks collapsing a
    /// token each and a block of Sinkhorns) for [`HcPreKernel::Fused`] where
    /// [`hc_pre_rows_fits`], else `dsk_lo_hc_pre_finish2_f32` (a 1,024-thread block per token);
    /// the same bits.
    ///
    /// # Safety
    /// As [`Self::hc_pre_fused_f32`], with the squares and the dots written on this stream for
    /// the same `a`.
    pub unsafe fn hc_pre_from_dots_f32(
        &self,
        stream: &CudaStream,
        a: &HcPreFused,
    ) -> Result<(), KernelError> {
        check_hc_pre_fused(a)?;
        let finish = if a.kernel == HcPreKernel::Fused && hc_pre_rows_fits(a) {
            PreFinish::Rows
        } else {
            PreFinish::Finish2
        };
        // SAFETY: this function's contract (dots and squares written as one chunk).
        unsafe { self.hc_pre_finish_tokens(stream, a, 1, finish) }
    }

    /// # Safety
    /// Every pointer must address the f32 shape documented on `HcPreFinish`, device memory of
    /// this context; `x_out` and `mix_out` must not overlap the inputs.
    pub unsafe fn hc_pre_finish_f32(
        &self,
        stream: &CudaStream,
        a: &HcPreFinish,
    ) -> Result<(), KernelError> {
        const K: &str = "hc_pre_finish_f32";
        check_hc_pre_finish(a)?;
        let (hc, hidden) = (i32_arg(K, "hc", a.hc)?, i32_arg(K, "hidden", a.hidden)?);
        let iters = i32_arg(K, "sinkhorn_iters", a.sinkhorn_iters)?;
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, a.hidden.div_ceil(BLOCK))?, u32_grid(K, a.n)?, 1),
            block_dim: (BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.layer_ops.hc_pre_finish)
            .arg(&a.proj)
            .arg(&a.base)
            .arg(&a.scale[0])
            .arg(&a.scale[1])
            .arg(&a.scale[2])
            .arg(&a.streams)
            .arg(&a.x_out)
            .arg(&a.mix_out)
            .arg(&hc)
            .arg(&hidden)
            .arg(&iters)
            .arg(&a.hc_eps)
            .launch(cfg)
            .map_err(KernelError::driver("launch hc_pre_finish_f32"))?;
        Ok(())
    }

    /// The cluster size and index of the form [`Self::hc_seam_f32`] launches for tokens of
    /// `hidden` channels at multiplicity `hc`: the smallest cluster whose blocks each take a
    /// slice of whole warps of at most 256 threads (V4-Flash's 4,096: 16 blocks of 256), or
    /// `None` where there is none here (hc other than 4, or a larger cluster than the device
    /// launches). The layer stack runs the split pre and post where this is `None`.
    pub fn hc_seam_cluster(&self, hc: usize, hidden: usize) -> Option<(usize, usize)> {
        if hc != 4 {
            return None;
        }
        HC_SEAM_CLUSTERS
            .into_iter()
            .enumerate()
            .find(|&(_, c)| {
                c <= self.layer_ops.hc_seam_max_cluster
                    && hidden.is_multiple_of(c)
                    && (hidden / c).is_multiple_of(32)
                    && hidden / c <= HC_SEAM_MAX_THREADS
            })
            .map(|(i, c)| (c, i))
    }

    /// Tokens per cluster for a seam of `n` tokens of `hidden` channels (hc 4): the fewest of
    /// [`HC_SEAM_TOKENS_PER_CLUSTER`] whose clusters all fit on the GPU at once (one wave), else
    /// the most; `want` (non-zero) asks for one. `None` where the seam does not run (see
    /// [`Self::hc_seam_cluster`]) or the wanted form cannot run here.
    pub fn hc_seam_tokens_per_cluster(
        &self,
        hc: usize,
        hidden: usize,
        n: usize,
        want: usize,
    ) -> Option<usize> {
        let (cluster, form) = self.hc_seam_cluster(hc, hidden)?;
        let threads = hidden / cluster;
        let ops = &self.layer_ops;
        // Clusters of form i resident at once; 0 where the form cannot run here.
        let active = |i: usize| -> usize {
            if !ops.hc_seam_tk_ok[i] {
                return 0;
            }
            let key = (form, i, threads);
            let mut waves = ops.hc_seam_waves.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(&(_, a)) = waves.iter().find(|(k, _)| *k == key) {
                return a;
            }
            let smem = seam_smem_bytes(HC_SEAM_TOKENS_PER_CLUSTER[i], threads);
            // No answer (no clusters on this device): take the form as fitting.
            let a = seam_active_clusters(&ops.hc_seam[form][i], cluster, threads, smem)
                .unwrap_or(usize::MAX);
            waves.push((key, a));
            a
        };
        let runs: Vec<(usize, usize)> = HC_SEAM_TOKENS_PER_CLUSTER
            .iter()
            .enumerate()
            .map(|(i, &tk)| (tk, active(i)))
            .filter(|&(_, a)| a >= 1)
            .collect();
        if want != 0 {
            return runs.iter().find(|&&(tk, _)| tk == want).map(|&(tk, _)| tk);
        }
        runs.iter()
            .find(|&&(tk, a)| n.div_ceil(tk) <= a)
            .or(runs.last())
            .map(|&(tk, _)| tk)
    }

    /// One seam of a decode step (see [`HcSeam`]): a cluster of [`Self::hc_seam_cluster`]
    /// blocks per [`Self::hc_seam_tokens_per_cluster`] tokens.
    ///
    /// # Safety
    /// Every pointer must address the f32 shape documented on [`HcSeam`], device memory of this
    /// context; `x_out` must not overlap the others, `mix_out` only `post_mix`. The kernel that
    /// wrote `post_mix` and `streams` must not be the one launched just before on the stream.
    pub unsafe fn hc_seam_f32(&self, stream: &CudaStream, a: &HcSeam) -> Result<(), KernelError> {
        const K: &str = "hc_seam_f32";
        check_hc_seam(a)?;
        let (cluster, form) = self.hc_seam_cluster(a.hc, a.hidden).ok_or_else(|| {
            invalid(
                K,
                format!(
                    "hidden = {}: no cluster of at most {} blocks splits it into slices of whole warps of at most {HC_SEAM_MAX_THREADS} threads",
                    a.hidden, self.layer_ops.hc_seam_max_cluster
                ),
            )
        })?;
        let tokens = self
            .hc_seam_tokens_per_cluster(a.hc, a.hidden, a.n, a.tokens_per_cluster)
            .ok_or_else(|| {
                invalid(
                    K,
                    format!(
                        "{} tokens a cluster: want one of {HC_SEAM_TOKENS_PER_CLUSTER:?} that \
                         runs here (or 0)",
                        a.tokens_per_cluster
                    ),
                )
            })?;
        let tk_form = HC_SEAM_TOKENS_PER_CLUSTER
            .iter()
            .position(|&tk| tk == tokens)
            .unwrap_or(0);
        let threads = a.hidden / cluster;
        let cfg = LaunchConfig {
            grid_dim: (cluster as u32, u32_grid(K, a.n.div_ceil(tokens))?, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: seam_smem_bytes(tokens, threads) as u32,
        };
        let n = i32_arg(K, "n", a.n)?;
        let hidden = i32_arg(K, "hidden", a.hidden)?;
        stream
            .kernel(&self.layer_ops.hc_seam[form][tk_form])
            .arg(&a.streams)
            .arg(&a.post_mix)
            .arg(&a.out)
            .arg(&a.fn_)
            .arg(&a.base)
            .arg(&a.scale[0])
            .arg(&a.scale[1])
            .arg(&a.scale[2])
            .arg(&a.norm_weight)
            .arg(&a.x_out)
            .arg(&a.mix_out)
            .arg(&n)
            .arg(&hidden)
            .arg(&a.norm_eps)
            .arg(&a.hc_eps)
            .arg(&a.norm_eps)
            .launch_clusters(cfg, cluster as u32)
            .map_err(KernelError::driver("launch hc_seam"))?;
        Ok(())
    }

    /// The comb of `n` seam mix rows ([`HcSeam`], hc 4) in place: columns 8..24 of each row go
    /// from the logits the seam left to their Sinkhorn matrix (`sinkhorn_iters` passes), the
    /// bits [`Self::hc_pre_fused_f32`]'s finish writes for the same logits. A warp per row.
    ///
    /// # Safety
    /// `mix` must address `n` f32 rows of 24 in device memory of this context.
    pub unsafe fn hc_sinkhorn_f32(
        &self,
        stream: &CudaStream,
        mix: CUdeviceptr,
        n: usize,
        sinkhorn_iters: usize,
        hc_eps: f32,
    ) -> Result<(), KernelError> {
        const K: &str = "hc_sinkhorn_f32";
        nonnull(K, &[("mix", mix)])?;
        if n == 0 || n > GRID_YZ_MAX {
            return Err(invalid(K, format!("n = {n}: need 1..={GRID_YZ_MAX}")));
        }
        let iters = i32_arg(K, "sinkhorn_iters", sinkhorn_iters)?;
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, n)?, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.layer_ops.hc_sinkhorn)
            .arg(&mix)
            .arg(&iters)
            .arg(&hc_eps)
            .launch(cfg)
            .map_err(KernelError::driver("launch hc_sinkhorn"))?;
        Ok(())
    }

    /// The expand step with `a.kernel`'s kernels, and with `a.squares` set each token's sum of
    /// squares of its new streams (one launch where [`hc_post_squares_fits`], else the post then
    /// `dsk_lo_hc_squares_f32`); every choice gives the same bits.
    ///
    /// # Safety
    /// Every pointer must address the f32 shape documented on `HcPost`, device memory of this
    /// context; `out`, `mix` and `squares` must not overlap `streams`.
    pub unsafe fn hc_post_f32(&self, stream: &CudaStream, a: &HcPost) -> Result<(), KernelError> {
        const K: &str = "hc_post_f32";
        check_hc_post(a)?;
        let n = i32_arg(K, "n", a.n)?;
        let (hc, hidden) = (i32_arg(K, "hc", a.hc)?, i32_arg(K, "hidden", a.hidden)?);
        if a.kernel == HcPostKernel::New && a.squares != 0 && hc_post_squares_fits(a) {
            let cfg = LaunchConfig {
                grid_dim: (u32_grid(K, a.n)?, 1, 1),
                block_dim: (BLOCK as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            stream
                .kernel(&self.layer_ops.hc_post_squares)
                .arg(&a.streams)
                .arg(&a.mix)
                .arg(&a.out)
                .arg(&a.squares)
                .arg(&hidden)
                .launch(cfg)
                .map_err(KernelError::driver("launch hc_post_squares"))?;
            return Ok(());
        }
        match a.kernel {
            HcPostKernel::Old => {
                stream
                    .kernel(&self.layer_ops.hc_post)
                    .arg(&a.streams)
                    .arg(&a.mix)
                    .arg(&a.out)
                    .arg(&n)
                    .arg(&hc)
                    .arg(&hidden)
                    .launch(grid_stride(K, a.n * a.hidden, self.sms)?)
                    .map_err(KernelError::driver("launch hc_post_f32"))?;
            }
            HcPostKernel::New => {
                let vec4 = hc_post_vec4(a);
                let per_token = a.hidden.div_ceil(if vec4 { 4 } else { 1 });
                // A 256-thread block per 1,024 channels where that gives every SM a block;
                // smaller blocks (more of them) for decode's few rows.
                let threads = if a.n * per_token.div_ceil(BLOCK) >= self.sms {
                    BLOCK
                } else {
                    HC_POST_SMALL_BLOCK
                };
                let cfg = LaunchConfig {
                    grid_dim: (
                        u32_grid(K, per_token.div_ceil(threads))?,
                        u32_grid(K, a.n)?,
                        1,
                    ),
                    block_dim: (threads as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                stream
                    .kernel(&self.layer_ops.hc_post2)
                    .arg(&a.streams)
                    .arg(&a.mix)
                    .arg(&a.out)
                    .arg(&hc)
                    .arg(&hidden)
                    .arg(&i32::from(vec4))
                    .launch(cfg)
                    .map_err(KernelError::driver("launch hc_post2"))?;
            }
        }
        if a.squares != 0 {
            // SAFETY: the streams hold n rows of hc * hidden and `squares` n floats (this
            // function's contract); the post above wrote the streams first on this stream.
            unsafe { self.hc_row_squares(stream, a.streams, a.squares, a.n, a.hc * a.hidden) }?;
        }
        Ok(())
    }

    /// `HyperHead::collapse` (three launches: `hc_mix_f32` with `outs = hc`, then the finish).
    ///
    /// # Safety
    /// Every pointer must address the f32 shape documented on `HcHead`, device memory of this
    /// context; `x_out` and `workspace` must not overlap the inputs or each other.
    pub unsafe fn hc_head_f32(&self, stream: &CudaStream, a: &HcHead) -> Result<(), KernelError> {
        const K: &str = "hc_head_f32";
        check_hc_head(a)?;
        let proj = a.workspace + (hc_mix_workspace_floats(a.n, a.hc) * 4) as u64;
        self.hc_mix_f32(
            stream,
            &HcMix {
                streams: a.streams,
                fn_: a.fn_,
                out: proj,
                workspace: a.workspace,
                n: a.n,
                width: a.hc * a.hidden,
                outs: a.hc,
                norm_eps: a.norm_eps,
            },
        )?;
        let (hc, hidden) = (i32_arg(K, "hc", a.hc)?, i32_arg(K, "hidden", a.hidden)?);
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, a.hidden.div_ceil(BLOCK))?, u32_grid(K, a.n)?, 1),
            block_dim: (BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.layer_ops.hc_head_finish)
            .arg(&proj)
            .arg(&a.base)
            .arg(&a.scale)
            .arg(&a.streams)
            .arg(&a.x_out)
            .arg(&hc)
            .arg(&hidden)
            .arg(&a.hc_eps)
            .launch(cfg)
            .map_err(KernelError::driver("launch hc_head_finish"))?;
        Ok(())
    }

    /// # Safety
    /// Every non-zero pointer must address the shape documented on `RouteF32`, device memory of
    /// this context.
    pub unsafe fn route_f32(&self, stream: &CudaStream, a: &RouteF32) -> Result<(), KernelError> {
        const K: &str = "route_f32";
        check_route(a)?;
        let scoring = i32::from(a.scoring == RouterScoring::Sigmoid);
        let vocab = i32_arg(K, "vocab", a.vocab)?;
        let (e, k) = (i32_arg(K, "experts", a.experts)?, i32_arg(K, "k", a.k)?);
        // The warp kernel takes the block kernel's parameters.
        let (func, threads) = match route_kernel(a.experts, self.route_kernel_choice()) {
            RouteKernel::Warp => (&self.layer_ops.route_warp, 32),
            RouteKernel::Block => (&self.layer_ops.route, BLOCK as u32),
        };
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, a.n)?, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(func)
            .arg(&a.logits)
            .arg(&scoring)
            .arg(&a.bias)
            .arg(&a.hash_table)
            .arg(&a.token_ids)
            .arg(&vocab)
            .arg(&e)
            .arg(&k)
            .arg(&a.routed_scaling_factor)
            .arg(&a.out_ids)
            .arg(&a.out_weights)
            .launch(cfg)
            .map_err(KernelError::driver("launch route_f32"))?;
        Ok(())
    }

    /// # Safety
    /// Every pointer must address the shape documented on `DenseExpertsF32`, device memory of
    /// this context; `out` and `h_scratch` must not overlap the inputs or each other.
    pub unsafe fn dense_experts_f32(
        &self,
        stream: &CudaStream,
        a: &DenseExpertsF32,
    ) -> Result<(), KernelError> {
        const K: &str = "dense_experts_f32";
        check_dense_experts(a)?;
        let (n, k) = (i32_arg(K, "n", a.n)?, i32_arg(K, "k", a.k)?);
        let e = i32_arg(K, "experts", a.experts)?;
        let (hidden, inter) = (
            i32_arg(K, "hidden", a.hidden)?,
            i32_arg(K, "inter", a.inter)?,
        );
        let cfg = |warps: usize| -> Result<LaunchConfig, KernelError> {
            Ok(LaunchConfig {
                grid_dim: (u32_grid(K, (warps * 32).div_ceil(BLOCK))?, 1, 1),
                block_dim: (BLOCK as u32, 1, 1),
                shared_mem_bytes: 0,
            })
        };
        stream
            .kernel(&self.layer_ops.dense_gate_up)
            .arg(&a.w1)
            .arg(&a.w3)
            .arg(&a.x)
            .arg(&a.ids)
            .arg(&a.h_scratch)
            .arg(&n)
            .arg(&k)
            .arg(&e)
            .arg(&hidden)
            .arg(&inter)
            .arg(&a.limit)
            .launch(cfg(a.n * a.k * a.inter)?)
            .map_err(KernelError::driver("launch dense_gate_up"))?;
        stream
            .kernel(&self.layer_ops.dense_down)
            .arg(&a.w2)
            .arg(&a.h_scratch)
            .arg(&a.ids)
            .arg(&a.weights)
            .arg(&a.out)
            .arg(&n)
            .arg(&k)
            .arg(&e)
            .arg(&hidden)
            .arg(&inter)
            .launch(cfg(a.n * a.hidden)?)
            .map_err(KernelError::driver("launch dense_down"))?;
        Ok(())
    }

    /// `x *= s` over `len` f32.
    ///
    /// # Safety
    /// `x` must address `len` f32 of device memory of this context.
    pub unsafe fn scale_f32(
        &self,
        stream: &CudaStream,
        x: CUdeviceptr,
        len: usize,
        s: f32,
    ) -> Result<(), KernelError> {
        const K: &str = "scale_f32";
        if len == 0 {
            return Ok(());
        }
        nonnull(K, &[("x", x)])?;
        let n = i64_arg(K, "len", len)?;
        stream
            .kernel(&self.layer_ops.scale)
            .arg(&x)
            .arg(&n)
            .arg(&s)
            .launch(grid_stride(K, len, self.sms)?)
            .map_err(KernelError::driver("launch scale_f32"))?;
        Ok(())
    }

    /// # Safety
    /// `src` must hold `rows` rows of stride `ld_src`, `dst` of stride `ld_dst`, device memory of
    /// this context, not overlapping.
    pub unsafe fn copy_rows_f32(
        &self,
        stream: &CudaStream,
        a: &CopyRowsF32,
    ) -> Result<(), KernelError> {
        const K: &str = "copy_rows_f32";
        if a.rows == 0 || a.width == 0 {
            return Ok(());
        }
        check_copy_rows(a)?;
        let (rows, width) = (i32_arg(K, "rows", a.rows)?, i32_arg(K, "width", a.width)?);
        let (lds, ldd) = (
            i64_arg(K, "ld_src", a.ld_src)?,
            i64_arg(K, "ld_dst", a.ld_dst)?,
        );
        stream
            .kernel(&self.layer_ops.copy_rows)
            .arg(&a.src)
            .arg(&lds)
            .arg(&a.dst)
            .arg(&ldd)
            .arg(&rows)
            .arg(&width)
            .launch(grid_stride(K, a.rows * a.width, self.sms)?)
            .map_err(KernelError::driver("launch copy_rows_f32"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm() -> RmsNormF32 {
        RmsNormF32 {
            x: 16,
            out: 16,
            weight: 0,
            rows: 2,
            dim: 4096,
            ld_x: 4096,
            ld_out: 4096,
            eps: 1e-6,
        }
    }

    fn rope() -> RopeF32 {
        RopeF32 {
            x: 16,
            positions: 16,
            inv_freq: 16,
            tokens: 2,
            heads: 64,
            head_dim: 512,
            rope_dim: 64,
            ld_token: 64 * 512,
            ld_head: 512,
            attention_factor: 1.0,
            inverse: false,
        }
    }

    fn route() -> RouteF32 {
        RouteF32 {
            logits: 16,
            scoring: RouterScoring::SqrtSoftplus,
            bias: 16,
            hash_table: 0,
            token_ids: 0,
            vocab: 0,
            n: 3,
            experts: 256,
            k: 6,
            routed_scaling_factor: 1.5,
            out_ids: 16,
            out_weights: 16,
        }
    }

    #[test]
    fn norm_and_rope_checks() {
        assert!(check_rms_norm_f32(&norm()).is_ok());
        assert!(check_rms_norm_f32(&RmsNormF32 { dim: 16, ..norm() }).is_ok());
        assert!(check_rms_norm_f32(&RmsNormF32 { rows: 0, ..norm() }).is_err());
        assert!(check_rms_norm_f32(&RmsNormF32 {
            ld_x: 100,
            ..norm()
        })
        .is_err());
        assert!(check_rms_norm_f32(&RmsNormF32 { x: 0, ..norm() }).is_err());
        assert!(check_rope_f32(&rope()).is_ok());
        assert!(check_rope_f32(&RopeF32 {
            rope_dim: 63,
            ..rope()
        })
        .is_err());
        assert!(check_rope_f32(&RopeF32 {
            rope_dim: 514,
            ..rope()
        })
        .is_err());
        assert!(check_rope_f32(&RopeF32 {
            ld_token: 512,
            ..rope()
        })
        .is_err());
        assert!(check_rope_f32(&RopeF32 {
            positions: 0,
            ..rope()
        })
        .is_err());
    }

    #[test]
    fn hyper_connection_checks_and_workspace() {
        let mix = HcMix {
            streams: 16,
            fn_: 16,
            out: 16,
            workspace: 16,
            n: 1,
            width: 16384,
            outs: 24,
            norm_eps: 1e-6,
        };
        assert!(check_hc_mix(&mix).is_ok());
        assert!(check_hc_mix(&HcMix { n: 0, ..mix }).is_err());
        assert!(check_hc_mix(&HcMix {
            workspace: 0,
            ..mix
        })
        .is_err());
        // One token on an H200: 24 outputs x 11 splits >= 2 blocks per SM; never past the cap,
        // never a chunk narrower than a block.
        assert_eq!(hc_mix_splits(1, 16384, 24, 132), 11);
        assert!(hc_mix_splits(1, 16384, 4, 132) <= HC_MAX_SPLITS);
        assert_eq!(hc_mix_splits(1, 64, 24, 132), 1);
        assert_eq!(hc_mix_splits(64, 16384, 24, 132), 3);
        assert!(hc_mix_workspace_floats(3, 24) >= HC_WS_HEADER + HC_MAX_SPLITS * 3 * 25);
        // The partials start past the counter header, the squares past the partials.
        assert_eq!(
            hc_partials(1024, 11, 1, 24),
            (
                1024 + 4 * HC_WS_HEADER as u64,
                1024 + 4 * (HC_WS_HEADER + 11 * 24) as u64
            )
        );
        let pre = HcPreFused {
            streams: 16,
            fn_: 16,
            base: 16,
            scale: [1.0; 3],
            norm_weight: 0,
            x_out: 16,
            mix_out: 16,
            workspace: 16,
            n: 1,
            hc: 4,
            hidden: 4096,
            sinkhorn_iters: 20,
            hc_eps: 1e-6,
            norm_eps: 1e-6,
            kernel: HcPreKernel::default(),
        };
        assert!(check_hc_pre_fused(&pre).is_ok());
        assert!(check_hc_pre_fused(&HcPreFused { hc: 9, ..pre }).is_err());
        assert!(check_hc_pre_fused(&HcPreFused { n: 0, ..pre }).is_err());
        assert!(check_hc_pre_fused(&HcPreFused {
            workspace: 0,
            ..pre
        })
        .is_err());
        assert!(check_hc_pre_fused(&HcPreFused {
            scale: [1.0, f32::NAN, 1.0],
            ..pre
        })
        .is_err());
        assert_eq!("old".parse::<HcPreKernel>(), Ok(HcPreKernel::Old));
        assert_eq!(" Split".parse::<HcPreKernel>(), Ok(HcPreKernel::Split));
        assert_eq!("new".parse::<HcPreKernel>(), Ok(HcPreKernel::Fused));
        assert_eq!(HcPreKernel::default(), HcPreKernel::Fused);
        assert!("fast".parse::<HcPreKernel>().is_err());
        let post = HcPost {
            streams: 16,
            mix: 16,
            out: 16,
            squares: 0,
            n: 2,
            hc: 4,
            hidden: 4096,
            kernel: HcPostKernel::default(),
        };
        assert!(check_hc_post(&post).is_ok());
        assert!(check_hc_post(&HcPost { hc: 9, ..post }).is_err());
        assert!(check_hc_post(&HcPost { hidden: 0, ..post }).is_err());
        // float4 channels need hidden % 4 == 0 and 16-byte aligned streams and output.
        assert!(hc_post_vec4(&post));
        assert!(!hc_post_vec4(&HcPost { hidden: 30, ..post }));
        assert!(!hc_post_vec4(&HcPost { out: 20, ..post }));
        // The fused squares: hc 4 and whole 256-channel columns up to 16 per thread.
        assert!(hc_post_squares_fits(&post));
        assert!(!hc_post_squares_fits(&HcPost { hc: 3, ..post }));
        assert!(!hc_post_squares_fits(&HcPost {
            hidden: 4000,
            ..post
        }));
        assert!(!hc_post_squares_fits(&HcPost {
            hidden: 4352,
            ..post
        }));
        assert!(hc_post_squares_fits(&HcPost {
            hidden: 256,
            ..post
        }));
        assert_eq!(HcPostKernel::default(), HcPostKernel::New);
        assert_eq!("old".parse::<HcPostKernel>(), Ok(HcPostKernel::Old));
        assert_eq!(" New".parse::<HcPostKernel>(), Ok(HcPostKernel::New));
        assert!("split".parse::<HcPostKernel>().is_err());
        // The GEMM steps' finish: hidden a multiple of 4 up to 4,096, aligned rows.
        assert!(hc_pre_rows_fits(&pre));
        assert!(hc_pre_rows_fits(&HcPreFused { hidden: 40, ..pre }));
        assert!(!hc_pre_rows_fits(&HcPreFused {
            hidden: 4100,
            ..pre
        }));
        assert!(!hc_pre_rows_fits(&HcPreFused { hidden: 42, ..pre }));
        assert!(!hc_pre_rows_fits(&HcPreFused { x_out: 24, ..pre }));
        assert!(!hc_pre_rows_fits(&HcPreFused {
            norm_weight: 8,
            ..pre
        }));
        // The squares sit after the dots, where hc_pre_from_dots_f32 reads them.
        assert_eq!(
            Kernels::hc_given_squares(1024, 8192, 4),
            1024 + 4 * (HC_WS_HEADER + 8192 * 24) as u64
        );
        assert_eq!(
            Kernels::hc_given_dots(1024, 8192, 4),
            1024 + 4 * HC_WS_HEADER as u64
        );
        let fin = HcPreFinish {
            proj: 16,
            base: 16,
            scale: [1.0; 3],
            streams: 16,
            x_out: 16,
            mix_out: 16,
            n: 1,
            hc: 4,
            hidden: 4096,
            sinkhorn_iters: 20,
            hc_eps: 1e-6,
        };
        assert!(check_hc_pre_finish(&fin).is_ok());
        assert!(check_hc_pre_finish(&HcPreFinish { n: 70_000, ..fin }).is_err());
        assert!(check_hc_pre_finish(&HcPreFinish { mix_out: 0, ..fin }).is_err());
        let head = HcHead {
            streams: 16,
            fn_: 16,
            base: 16,
            scale: 1.0,
            x_out: 16,
            workspace: 16,
            n: 1,
            hc: 4,
            hidden: 4096,
            hc_eps: 1e-6,
            norm_eps: 1e-6,
        };
        assert!(check_hc_head(&head).is_ok());
        assert!(check_hc_head(&HcHead { hc: 0, ..head }).is_err());
    }

    #[test]
    fn route_kernel_choice_and_rule() {
        assert_eq!(route_kernel_choice(None).unwrap(), RouteKernel::Warp);
        assert_eq!(route_kernel_choice(Some(" ")).unwrap(), RouteKernel::Warp);
        assert_eq!(
            route_kernel_choice(Some("warp")).unwrap(),
            RouteKernel::Warp
        );
        assert_eq!(
            route_kernel_choice(Some("block")).unwrap(),
            RouteKernel::Block
        );
        let err = route_kernel_choice(Some("fast")).unwrap_err().to_string();
        assert!(err.contains("DSPARK_ROUTE_KERNEL"), "{err}");
        // V4-Flash's 256 experts fit the warp kernel; more take the block kernel.
        assert_eq!(route_kernel(256, RouteKernel::Warp), RouteKernel::Warp);
        assert_eq!(route_kernel(1, RouteKernel::Warp), RouteKernel::Warp);
        assert_eq!(route_kernel(257, RouteKernel::Warp), RouteKernel::Block);
        assert_eq!(route_kernel(256, RouteKernel::Block), RouteKernel::Block);
    }

    #[test]
    fn route_checks() {
        assert!(check_route(&route()).is_ok());
        assert!(check_route(&RouteF32 { k: 0, ..route() }).is_err());
        assert!(check_route(&RouteF32 { k: 17, ..route() }).is_err());
        assert!(check_route(&RouteF32 {
            experts: 4,
            ..route()
        })
        .is_err());
        assert!(check_route(&RouteF32 {
            experts: 2048,
            k: 6,
            ..route()
        })
        .is_err());
        // A hash layer needs the token ids and the table's row count.
        assert!(check_route(&RouteF32 {
            hash_table: 16,
            ..route()
        })
        .is_err());
        assert!(check_route(&RouteF32 {
            hash_table: 16,
            token_ids: 16,
            vocab: 129_280,
            ..route()
        })
        .is_ok());
        assert!(check_route(&RouteF32 {
            routed_scaling_factor: f32::NAN,
            ..route()
        })
        .is_err());
    }

    #[test]
    fn dense_and_copy_checks() {
        let d = DenseExpertsF32 {
            w1: 16,
            w3: 16,
            w2: 16,
            x: 16,
            ids: 16,
            weights: 16,
            h_scratch: 16,
            out: 16,
            n: 2,
            k: 2,
            experts: 8,
            hidden: 64,
            inter: 32,
            limit: 10.0,
        };
        assert!(check_dense_experts(&d).is_ok());
        assert!(check_dense_experts(&DenseExpertsF32 { limit: 0.0, ..d }).is_err());
        assert!(check_dense_experts(&DenseExpertsF32 { inter: 0, ..d }).is_err());
        assert!(check_dense_experts(&DenseExpertsF32 {
            inter: usize::MAX / 2,
            ..d
        })
        .is_err());
        let c = CopyRowsF32 {
            src: 16,
            ld_src: 512,
            dst: 16,
            ld_dst: 256,
            rows: 4,
            width: 256,
        };
        assert!(check_copy_rows(&c).is_ok());
        assert!(check_copy_rows(&CopyRowsF32 { width: 300, ..c }).is_err());
        assert!(check_copy_rows(&CopyRowsF32 { dst: 0, ..c }).is_err());
    }
}
