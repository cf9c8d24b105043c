//! CUDA backend (cudarc with dynamic loading: builds and links everywhere, finds libcuda at run
//! time).
//!
//! Weights live on the GPU in their checkpoint encodings: FP8 e4m3 with 128x128 E8M0 tiles
//! (`dspark-kernels` FP8 GEMV), FP4 e2m1 routed experts with E8M0 per 32 (the FP4 SwiGLU expert
//! kernel), bf16 tensors as bf16 (the bf16 GEMV with f32 activations and accumulation: exact
//! products, half the bytes of an f32 copy per decode step), and anything else as f32 through
//! cuBLAS SGEMM with TF32 off, so dense projections match the CPU reference to f32 rounding.
//! Activations arrive and leave as host f32 rows (the engine's attention, norms and RoPE still
//! run on the host; see docs/PERFORMANCE.md).

mod gemm_step;
mod kv;
mod layer_stack;
pub mod nccl;
pub mod peer;

pub use kv::CudaKvStore;
pub use layer_stack::{CudaLayerStack, STACK_MAX_ROWS};

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::{sys::cublasComputeType_t, CudaBlas};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use dspark_kernels::launch::moe_grouped;
use dspark_kernels::launch::skinny_mma::skinny_mma_pays;
use dspark_kernels::launch::FP8_GEMV_MAX_M;
use dspark_kernels::{
    ActDtype, Bf16Gemv, Fp4Experts, Fp4MoeCall, Fp8Gemv, Kernels, LoaderConfig, OutDtype,
    SkinnyMma, SkinnyWeight, BF16_GEMV_MAX_M,
};

use super::{Backend, BackendError, PackedWeight, FP4_GROUP};

fn driver_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> BackendError {
    move |e| BackendError::Other(format!("CUDA {what}: {e}"))
}

fn kernel_err(e: dspark_kernels::KernelError) -> BackendError {
    BackendError::Other(format!("kernel: {e}"))
}

/// A weight matrix `[rows, cols]` on the GPU.
pub enum CudaMatrix {
    /// f32, row-major.
    Dense {
        rows: usize,
        cols: usize,
        w: CudaSlice<f32>,
    },
    /// bf16 bits, row-major; `cols % 8 == 0` (the bf16 GEMV reads 8 weights per load).
    Bf16 {
        rows: usize,
        cols: usize,
        w: CudaSlice<u16>,
    },
    /// e4m3 `[rows, cols]` + E8M0 `[ceil(rows/128), ceil(cols/128)]`.
    Fp8 {
        rows: usize,
        cols: usize,
        w: CudaSlice<u8>,
        scales: CudaSlice<u8>,
        /// The power of two GEMM steps divide the weights by to widen them exactly to f16
        /// (`fp8_f16_shift` of the scale bytes' range); `None`: they widen to f32.
        f16_shift: Option<i32>,
    },
    /// e2m1 pairs `[rows, cols/2]` + E8M0 `[rows, cols/32]`.
    Fp4 {
        rows: usize,
        cols: usize,
        w: CudaSlice<u8>,
        scales: CudaSlice<u8>,
    },
}

impl CudaMatrix {
    fn shape(&self) -> (usize, usize) {
        match self {
            CudaMatrix::Dense { rows, cols, .. }
            | CudaMatrix::Bf16 { rows, cols, .. }
            | CudaMatrix::Fp8 { rows, cols, .. }
            | CudaMatrix::Fp4 { rows, cols, .. } => (*rows, *cols),
        }
    }
}

/// The routed experts of one MoE layer.
pub enum CudaExpertBank {
    /// All FP4 with one shape, contiguous for the grouped kernel.
    Fp4(Box<Fp4Bank>),
    /// Other encodings (or shapes the grouped kernel does not take): one expert at a time.
    Each(Vec<[CudaMatrix; 3]>),
}

/// A layer's FP4 experts in the checkpoint layout the grouped kernel reads: w1/w3
/// `[experts, inter, hidden/2]` + scales `[experts, inter, hidden/32]`, w2
/// `[experts, hidden, inter/2]` + scales `[experts, hidden, inter/32]`.
pub struct Fp4Bank {
    experts: usize,
    hidden: usize,
    inter: usize,
    /// Every block scale of the bank in `F16_EXACT_SCALES`: its values are exact in f16, so GEMM
    /// steps may multiply its experts on f16 tensor cores (`gemm_step`).
    f16_exact: bool,
    /// The grouped kernels' scale shift where they take this bank (its shape fits and its scales
    /// are exact in f16 after the shift: `moe_grouped::fp4_grouped_scale_shift`); `None` widens.
    grouped_shift: Option<u32>,
    w1: CudaSlice<u8>,
    s1: CudaSlice<u8>,
    w3: CudaSlice<u8>,
    s3: CudaSlice<u8>,
    w2: CudaSlice<u8>,
    s2: CudaSlice<u8>,
}

/// How many weight matrices of each encoding a backend holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MatrixCensus {
    /// f32 matrices (values that are not all bf16, or widths the bf16 GEMV does not take).
    pub dense: usize,
    /// bf16 matrices (every value exactly a bf16, as checkpoint bf16 tensors are).
    pub bf16: usize,
    pub fp8: usize,
    pub fp4: usize,
    /// MoE layers whose routed experts run as one grouped FP4 kernel.
    pub fp4_banks: usize,
}

/// Rows from which an FP8 or bf16 projection widens its weight to f32 and runs SGEMM (below, the
/// GEMV kernels read the packed weight once per 16 rows).
const FP8_WIDEN_MIN_ROWS: usize = 64;

/// Most f32 values of one widened bf16 tile: a large matrix (the LM head is 0.5 G values) is
/// widened and multiplied in row tiles of at most this size (256 MB), not as one 2 GB copy.
const BF16_WIDEN_TILE: usize = 64 << 20;

/// The bf16 bit patterns of `data` when every value is exactly a bf16 (the low 16 bits of its
/// f32 bits are zero, as for a checkpoint bf16 tensor widened by the loader); else `None`.
fn exact_bf16(data: &[f32]) -> Option<Vec<u16>> {
    if !data.iter().all(|v| v.to_bits() & 0xffff == 0) {
        return None;
    }
    Some(data.iter().map(|v| (v.to_bits() >> 16) as u16).collect())
}

/// Whether a `[rows, cols]` matrix of these values is stored as bf16 on the GPU.
fn bf16_storable(cols: usize, data: &[f32]) -> Option<Vec<u16>> {
    if cols == 0 || !cols.is_multiple_of(8) {
        return None;
    }
    exact_bf16(data)
}

/// Operation kinds timed by [`CudaBackend::op_times`].
const OPS: [&str; 8] = [
    "projections",
    "routed experts",
    "expert",
    "embedding",
    "kv write/read",
    "attention",
    "indexer",
    "layer stack",
];

/// The [`crate::engine::OpTime`] entry that counts layer-stack steps replayed from CUDA graphs.
pub const GRAPH_STEPS_OP: &str = "graph steps";

/// Per kind: calls and nanoseconds, counted at the outermost backend call only.
#[derive(Default)]
struct OpClock {
    calls: [AtomicU64; OPS.len()],
    nanos: [AtomicU64; OPS.len()],
}

thread_local! {
    /// Nesting depth of timed calls on this thread (a shared expert's projections are part of
    /// the expert's time, not counted twice).
    static TIMED_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Records one outermost call of kind `op` when dropped.
struct Timed<'a> {
    clock: &'a OpClock,
    op: usize,
    started: Option<std::time::Instant>,
}

impl<'a> Timed<'a> {
    fn start(clock: &'a OpClock, op: usize) -> Self {
        let outer = TIMED_DEPTH.with(|d| {
            d.set(d.get() + 1);
            d.get() == 1
        });
        Self {
            clock,
            op,
            started: outer.then(std::time::Instant::now),
        }
    }
}

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        TIMED_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        if let Some(t) = self.started {
            let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.clock.calls[self.op].fetch_add(1, Ordering::Relaxed);
            self.clock.nanos[self.op].fetch_add(ns, Ordering::Relaxed);
        }
    }
}

#[derive(Default)]
struct Counters {
    dense: AtomicUsize,
    bf16: AtomicUsize,
    fp8: AtomicUsize,
    fp4: AtomicUsize,
    fp4_banks: AtomicUsize,
}

/// One GPU: its stream, the dspark kernels and a cuBLAS handle.
pub struct CudaBackend {
    stream: Arc<CudaStream>,
    kernels: Kernels,
    blas: Mutex<CudaBlas>,
    device_name: String,
    counters: Counters,
    clock: OpClock,
    /// GPU time per layer-stack stage (`DSPARK_STACK_PROFILE=1`), reported as `stack: ...`.
    stage_times: Mutex<Vec<crate::engine::OpTime>>,
    /// Layer-stack steps replayed from a CUDA graph (captures included).
    graph_steps: AtomicU64,
    /// Whether the layer stack's GEMM steps use TF32 tensor cores (`gemm_step`).
    gemm_tf32: AtomicBool,
    /// Whether cuBLAS took the grouped GEMM of the sorted experts (else one GEMM each).
    grouped_gemm_ok: AtomicBool,
    /// Streams (with their own cuBLAS handles) beside `stream` that a GEMM step's per-expert
    /// GEMMs spread over; made on first use (`gemm_step::GemmLanes`).
    gemm_lanes: Mutex<Option<gemm_step::GemmLanes>>,
    /// Streams the per-expert GEMMs spread over, this one included (`DSPARK_GEMM_LANES`).
    gemm_lane_count: usize,
    /// Which steps run attention on the tensor cores (`DSPARK_ATTENTION_TC`).
    attention_tc: layer_stack::AttentionTcSteps,
    /// Which of those steps run the f16 form (`DSPARK_ATTENTION_F16`, or
    /// [`Self::set_attention_f16`]), as [`layer_stack::AttentionTcSteps::code`].
    attention_f16: std::sync::atomic::AtomicU8,
    /// Page-locked host staging for the LM head's logits (grown on demand, never shrunk): a
    /// download into pageable memory ran at ~3 GB/s, a page-locked one at the link's speed.
    head_staging: Mutex<Option<cudarc::driver::PinnedHostSlice<f32>>>,
    /// At TP>1 the LM head's logits are gathered over NCCL on the device (see
    /// [`Backend::head_rows`]); `DSPARK_HEAD_GATHER_DEVICE=0` gathers them through host memory.
    head_gather_device: AtomicBool,
    /// Whether decode steps run the model's head inside the layer stack
    /// (`DSPARK_DEVICE_HEAD`, default on), and how many steps did.
    stack_head: AtomicBool,
    stack_head_steps: AtomicU64,
    /// Compressed rows above which the ranks of a tensor-parallel group split the indexer's rows
    /// between them in the layer stack (`DSPARK_INDEXER_SPLIT_ROWS`, default
    /// [`layer_stack::INDEXER_SPLIT_ROWS`]); at or below it every rank scores all of them.
    indexer_split_rows: AtomicUsize,
    /// Whether GEMM steps (prefill chunks) split the indexer's rows at every context instead of
    /// above `indexer_split_rows` (`DSPARK_INDEXER_SPLIT_PREFILL=0` keeps them on the threshold):
    /// a chunk's many tokens amortise the all-gather and merge that a decode step's few cannot
    /// (two H200s, 43 layers: a 100K prompt 12.50 -> 12.28 s, an 8K one unchanged).
    indexer_split_prefill: AtomicBool,
    /// Whether GEMM steps of a tensor-parallel group split the hyper-connections' rows between
    /// the ranks (`DSPARK_HC_SPLIT=0` computes them whole on every rank): each sub-layer's
    /// all-reduce becomes a reduce-scatter and its input an all-gather, the same bytes on the
    /// links, while each rank mixes only its share of the residual streams.
    hc_split_prefill: AtomicBool,
    /// Whether such split steps gather the feed-forward input as f16 where every reader rounds
    /// it so (`DSPARK_FFN_GATHER_F16=0` keeps f32; the same bits either way, half the bytes).
    ffn_gather_f16: AtomicBool,
    /// Feed-forward sub-layers whose input a split step gathered as f16.
    ffn_f16_gathers: AtomicU64,
    /// Whether split steps gather the attention's projections other than `wq_a`'s on the second
    /// stream, beside the query path's GEMMs (`DSPARK_SPLIT_SIDE_GATHER=0` gathers them all on
    /// the main stream before it; the same values either way).
    split_side_gather: AtomicBool,
    /// Attention sub-layers whose projections a split step gathered partly on the second stream.
    side_gathers: AtomicU64,
    /// Layer-stack all-reduces enqueued as the peer-memory kernel (a graph counts once, when
    /// captured, not per replay).
    peer_all_reduces: AtomicU64,
    /// The engine's step budget (`--max-num-batched-tokens`; 0 = not told), which sizes the
    /// GEMM pieces ([`Self::gemm_piece_rows_max`]).
    step_tokens: AtomicUsize,
    /// Whether projections of 2..=16 rows run on the tensor-core skinny GEMM (`DSPARK_SKINNY_MMA=0`
    /// keeps them on the CUDA-core GEMVs; both are f32-exact, the switch is for comparisons).
    skinny_mma: bool,
    /// Whether a one-row step runs the projections that read one input as one launch
    /// (`DSPARK_GEMV_MULTI=0` keeps a launch per matrix; the results are the same bits).
    gemv_multi: bool,
    /// Whether layer-stack steps run the work off the critical path (an attention sub-layer's
    /// KV writes and compressors, a decode step's shared expert) on a second stream beside the
    /// main one (`DSPARK_SIDE_STREAM=0`, or [`Self::set_side_stream`], keeps one stream; the
    /// same kernels on the same inputs, so the same bits). Captured graphs are keyed by it.
    side_stream: AtomicBool,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.device_name)
            .field("arch", &self.kernels.arch())
            .finish()
    }
}

impl CudaBackend {
    /// Checks `n` rows and their routes against an FP4 bank and lays the routes out for the
    /// grouped kernel; `None` when there are no rows.
    fn routed_call(
        &self,
        b: &Fp4Bank,
        x: &[f32],
        n: usize,
        routes: &[Vec<(usize, f32)>],
        op: &'static str,
    ) -> Result<Option<RoutedCall>, BackendError> {
        Self::check_input(x, n, b.hidden, op)?;
        if routes.len() != n {
            return Err(BackendError::Shape {
                op,
                detail: format!("{} routes for {n} rows", routes.len()),
            });
        }
        if n == 0 {
            return Ok(None);
        }
        let (ids, weights, topk) = route_table(routes, b.experts)?;
        let bank = self.fp4_experts(
            [&b.w1, &b.s1, &b.w3, &b.s3, &b.w2, &b.s2],
            b.experts,
            b.hidden,
            b.inter,
        );
        Ok(Some(RoutedCall {
            bank,
            ids,
            weights,
            topk,
        }))
    }

    /// Opens GPU `ordinal` and loads the kernels (prebuilt cubins, the on-disk cache, or NVRTC).
    /// The backend works on the GPU's [`group_stream`] when one was made for a collective
    /// communicator, else on a stream of its own (a real stream, not the legacy default one, so
    /// the layer stack can be captured as CUDA graphs).
    pub fn open(ordinal: usize) -> Result<Self, BackendError> {
        let stream = match registered_stream(ordinal) {
            Some(s) => s,
            None => new_stream(ordinal)?,
        };
        Self::on_stream(stream)
    }

    /// A backend on an existing stream (shared with the NCCL communicator, so collectives and
    /// kernels are ordered on one queue).
    pub fn on_stream(stream: Arc<CudaStream>) -> Result<Self, BackendError> {
        let ctx: &Arc<CudaContext> = stream.context();
        ctx.bind_to_thread().map_err(driver_err("bind context"))?;
        let kernels = Kernels::load(ctx, &LoaderConfig::from_env()).map_err(kernel_err)?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| BackendError::Other(format!("cuBLAS init: {e:?}")))?;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        tracing::info!(
            device = %device_name,
            arch = kernels.arch(),
            origins = ?kernels.origins(),
            "CUDA backend ready"
        );
        Ok(Self {
            stream,
            kernels,
            blas: Mutex::new(blas),
            device_name,
            counters: Counters::default(),
            clock: OpClock::default(),
            stage_times: Mutex::new(Vec::new()),
            graph_steps: AtomicU64::new(0),
            gemm_tf32: AtomicBool::new(gemm_step::tf32_allowed()),
            grouped_gemm_ok: AtomicBool::new(true),
            gemm_lanes: Mutex::new(None),
            gemm_lane_count: gemm_step::gemm_lane_count(
                std::env::var("DSPARK_GEMM_LANES").ok().as_deref(),
            ),
            attention_tc: layer_stack::AttentionTcSteps::from_env(
                std::env::var("DSPARK_ATTENTION_TC").ok().as_deref(),
            ),
            attention_f16: std::sync::atomic::AtomicU8::new(
                layer_stack::AttentionTcSteps::from_env(
                    std::env::var("DSPARK_ATTENTION_F16").ok().as_deref(),
                )
                .code(),
            ),
            skinny_mma: std::env::var("DSPARK_SKINNY_MMA").map_or(true, |v| v != "0"),
            gemv_multi: std::env::var("DSPARK_GEMV_MULTI").map_or(true, |v| v != "0"),
            side_stream: AtomicBool::new(
                std::env::var("DSPARK_SIDE_STREAM").map_or(true, |v| v != "0"),
            ),
            head_staging: Mutex::new(None),
            head_gather_device: AtomicBool::new(
                std::env::var("DSPARK_HEAD_GATHER_DEVICE").map_or(true, |v| v.trim() != "0"),
            ),
            stack_head: AtomicBool::new(
                std::env::var("DSPARK_DEVICE_HEAD").map_or(true, |v| v.trim() != "0"),
            ),
            stack_head_steps: AtomicU64::new(0),
            indexer_split_rows: AtomicUsize::new(
                std::env::var("DSPARK_INDEXER_SPLIT_ROWS")
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(layer_stack::INDEXER_SPLIT_ROWS),
            ),
            indexer_split_prefill: AtomicBool::new(
                std::env::var("DSPARK_INDEXER_SPLIT_PREFILL").map_or(true, |v| v.trim() != "0"),
            ),
            hc_split_prefill: AtomicBool::new(
                std::env::var("DSPARK_HC_SPLIT").map_or(true, |v| v.trim() != "0"),
            ),
            ffn_gather_f16: AtomicBool::new(
                std::env::var("DSPARK_FFN_GATHER_F16").map_or(true, |v| v.trim() != "0"),
            ),
            ffn_f16_gathers: AtomicU64::new(0),
            split_side_gather: AtomicBool::new(
                std::env::var("DSPARK_SPLIT_SIDE_GATHER").map_or(true, |v| v.trim() != "0"),
            ),
            side_gathers: AtomicU64::new(0),
            peer_all_reduces: AtomicU64::new(0),
            step_tokens: AtomicUsize::new(0),
        })
    }

    /// Whether `m` rows through an `[n, k]` weight of this type take the tensor-core skinny
    /// GEMM (one launch, f32-exact) instead of the CUDA-core GEMV.
    fn skinny(&self, weight: SkinnyWeight, m: usize, n: usize, k: usize) -> bool {
        self.skinny_mma && skinny_mma_pays(weight, m, n, k)
    }

    /// Matrices held per encoding (how much of the checkpoint stayed packed).
    pub fn census(&self) -> MatrixCensus {
        MatrixCensus {
            dense: self.counters.dense.load(Ordering::Relaxed),
            bf16: self.counters.bf16.load(Ordering::Relaxed),
            fp8: self.counters.fp8.load(Ordering::Relaxed),
            fp4: self.counters.fp4.load(Ordering::Relaxed),
            fp4_banks: self.counters.fp4_banks.load(Ordering::Relaxed),
        }
    }

    /// Whether the LM head's logits are gathered over NCCL on the device at TP>1 (the default),
    /// or through host memory (as `DSPARK_HEAD_GATHER_DEVICE=0`).
    pub fn set_head_gather_device(&self, on: bool) {
        self.head_gather_device.store(on, Ordering::Relaxed);
    }

    /// Whether layer-stack steps of up to 16 rows end with the model's head on the device, in
    /// their graph (the default), or hand the streams back for the host's collapse and norm and
    /// the LM head's own call (as `DSPARK_DEVICE_HEAD=0`).
    pub fn set_stack_head(&self, on: bool) {
        self.stack_head.store(on, Ordering::Relaxed);
    }

    /// Layer-stack steps that ran the model's head on the device.
    pub fn stack_head_steps(&self) -> u64 {
        self.stack_head_steps.load(Ordering::Relaxed)
    }

    /// Compressed rows above which a tensor-parallel group splits the indexer's rows between its
    /// ranks (as `DSPARK_INDEXER_SPLIT_ROWS`; 0 splits at every context).
    pub fn set_indexer_split_rows(&self, rows: usize) {
        self.indexer_split_rows.store(rows, Ordering::Relaxed);
    }

    /// Whether GEMM steps split the indexer's rows at every context (the default) or only
    /// above [`Self::set_indexer_split_rows`]'s threshold, as decode steps do (as
    /// `DSPARK_INDEXER_SPLIT_PREFILL`).
    pub fn set_indexer_split_prefill(&self, on: bool) {
        self.indexer_split_prefill.store(on, Ordering::Relaxed);
    }

    /// Whether GEMM steps at TP>1 split the hyper-connections' rows between the ranks (the
    /// default) or compute them whole on every rank (as `DSPARK_HC_SPLIT=0`).
    pub fn set_hc_split_prefill(&self, on: bool) {
        self.hc_split_prefill.store(on, Ordering::Relaxed);
    }

    /// Whether split GEMM steps gather the feed-forward input as f16 where every reader rounds
    /// it so (the default) or as f32 (as `DSPARK_FFN_GATHER_F16=0`): the same bits either way.
    pub fn set_ffn_gather_f16(&self, on: bool) {
        self.ffn_gather_f16.store(on, Ordering::Relaxed);
    }

    /// Feed-forward sub-layers whose input a split GEMM step gathered as f16 so far.
    pub fn ffn_f16_gathers(&self) -> u64 {
        self.ffn_f16_gathers.load(Ordering::Relaxed)
    }

    /// Whether split GEMM steps gather the attention's projections other than `wq_a`'s on the
    /// second stream while the main one multiplies the queries (the default), or all of them
    /// on the main stream first (as `DSPARK_SPLIT_SIDE_GATHER=0`): the same values either way.
    pub fn set_split_side_gather(&self, on: bool) {
        self.split_side_gather.store(on, Ordering::Relaxed);
    }

    /// Attention sub-layers whose projections a split GEMM step gathered partly on the second
    /// stream so far.
    pub fn side_gathers(&self) -> u64 {
        self.side_gathers.load(Ordering::Relaxed)
    }

    /// Layer-stack all-reduces enqueued (or captured into a graph) as the peer-memory kernel
    /// rather than NCCL so far.
    pub fn peer_all_reduces(&self) -> u64 {
        self.peer_all_reduces.load(Ordering::Relaxed)
    }

    /// Whether the head-grouped attention runs its f16 tensor-core form (every step, over
    /// stored BF16 / FP8 rows) or stays on TF32 (as `DSPARK_ATTENTION_F16=all` / `0`); captured
    /// decode graphs are keyed by it.
    pub fn set_attention_f16(&self, on: bool) {
        let steps = if on {
            layer_stack::AttentionTcSteps::All
        } else {
            layer_stack::AttentionTcSteps::Off
        };
        self.attention_f16.store(steps.code(), Ordering::Relaxed);
    }

    /// Whether layer-stack steps put their side work on a second stream (the default) or keep
    /// every launch on one (as `DSPARK_SIDE_STREAM=0`); for comparisons, the results are the
    /// same bits.
    pub fn set_side_stream(&self, on: bool) {
        self.side_stream.store(on, Ordering::Relaxed);
    }

    fn side_stream_on(&self) -> bool {
        self.side_stream.load(Ordering::Relaxed)
    }

    fn attention_f16_steps(&self) -> layer_stack::AttentionTcSteps {
        layer_stack::AttentionTcSteps::from_code(self.attention_f16.load(Ordering::Relaxed))
    }

    /// Layer-stack steps that ran as a CUDA graph so far.
    pub fn graph_steps(&self) -> u64 {
        self.graph_steps.load(Ordering::Relaxed)
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn upload<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>, BackendError> {
        self.stream.clone_htod(v).map_err(driver_err("copy to GPU"))
    }

    fn download(&self, v: &CudaSlice<f32>) -> Result<Vec<f32>, BackendError> {
        self.stream
            .clone_dtoh(v)
            .map_err(driver_err("copy from GPU"))
    }

    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>, BackendError> {
        self.stream
            .alloc_zeros::<f32>(len.max(1))
            .map_err(driver_err("alloc"))
    }

    /// `y[n, rows] = x[n, cols] W^T` with W f32 row-major, through SGEMM in the column-major
    /// view: `y^T (rows x n) = W (cols x rows)^T * x^T (cols x n)`.
    fn sgemm<X: DevicePtr<f32>, Y: DevicePtrMut<f32>>(
        &self,
        x: &X,
        n: usize,
        w: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        y: &mut Y,
    ) -> Result<(), BackendError> {
        let s = &self.stream;
        let (xp, _x) = x.device_ptr(s);
        let (wp, _w) = w.device_ptr(s);
        let (yp, _y) = y.device_ptr_mut(s);
        // SAFETY: w holds rows * cols, x n * cols and y n * rows f32 on this stream's context
        // (checked by the callers).
        unsafe { self.sgemm_raw(xp, n, wp, rows, cols, yp, rows) }
    }

    /// FP8 GEMV/skinny GEMM in row chunks the kernel takes (<= 16 tokens per launch).
    #[allow(clippy::too_many_arguments)]
    fn fp8_linear<X: DevicePtr<f32>, Y: DevicePtrMut<f32>>(
        &self,
        x: &X,
        n: usize,
        w: &CudaSlice<u8>,
        scales: &CudaSlice<u8>,
        rows: usize,
        cols: usize,
        y: &mut Y,
        widen: bool,
    ) -> Result<(), BackendError> {
        if widen {
            // Many rows (prefill): widen the weight once and run one SGEMM instead of a GEMV
            // launch per 16 rows, each re-reading the whole weight.
            // SAFETY: uninitialised f32 storage, fully written by the dequantize kernel below
            // before anything reads it.
            let mut wide =
                unsafe { self.stream.alloc::<f32>(rows * cols) }.map_err(driver_err("alloc"))?;
            {
                let s = &self.stream;
                let (wp, _w) = w.device_ptr(s);
                let (sp, _s) = scales.device_ptr(s);
                let (op, _o) = wide.device_ptr_mut(s);
                // SAFETY: w holds rows * cols e4m3 bytes and `scales` their 128x128 tiles (the
                // matrix was built so); `wide` was just allocated for rows * cols f32.
                unsafe { self.kernels.fp8_dequant(s, wp, sp, op, rows, cols) }
                    .map_err(kernel_err)?;
            }
            return self.sgemm(x, n, &wide, rows, cols, y);
        }
        let s = &self.stream;
        let (wp, _w) = w.device_ptr(s);
        let (sp, _s) = scales.device_ptr(s);
        let (xp, _x) = x.device_ptr(s);
        let (yp, _y) = y.device_ptr_mut(s);
        // SAFETY: the weight/scale buffers hold [rows, cols] e4m3 and their tiles; x holds
        // n * cols and y n * rows f32 (the callers check it).
        unsafe { self.fp8_gemv_rows(s, [wp, sp], xp, yp, n, (rows, cols)) }
    }

    /// `y = x W^T` for an FP8 weight by GEMV (or skinny tensor-core GEMM) launches on `s`, in
    /// chunks of at most [`FP8_GEMV_MAX_M`] rows: the launches of [`Self::fp8_linear`] without
    /// widening, on any stream of this context.
    ///
    /// # Safety
    /// `wp` / `sp` must hold `[rows, cols]` e4m3 bytes and their 128x128 tiles, `xp` `n * cols`
    /// f32 and `yp` `n * rows` f32, device memory of this context.
    unsafe fn fp8_gemv_rows(
        &self,
        s: &CudaStream,
        [wp, sp]: [u64; 2],
        xp: u64,
        yp: u64,
        n: usize,
        (rows, cols): (usize, usize),
    ) -> Result<(), BackendError> {
        for (start, m) in row_chunks(n, FP8_GEMV_MAX_M) {
            let (xs, ys) = (
                xp + (start * cols * 4) as u64,
                yp + (start * rows * 4) as u64,
            );
            if self.skinny(SkinnyWeight::Fp8, m, rows, cols) {
                let call = SkinnyMma::plain(wp, SkinnyWeight::Fp8, sp, xs, ys, (m, rows, cols));
                // SAFETY: as the GEMV below: [rows, cols] e4m3 with its tiles, m rows of x and y.
                unsafe { self.kernels.skinny_mma(s, &call) }.map_err(kernel_err)?;
                continue;
            }
            let call = Fp8Gemv {
                weight: wp,
                scale: sp,
                x: xs,
                x_dtype: ActDtype::F32,
                out: ys,
                out_dtype: OutDtype::F32,
                m,
                n: rows,
                k: cols,
            };
            // SAFETY: the weight/scale buffers hold [rows, cols] e4m3 and their tiles; x holds
            // n*cols and y n*rows f32, so rows start..start+m of both are in bounds.
            unsafe { self.kernels.fp8_gemv(s, &call) }.map_err(kernel_err)?;
        }
        Ok(())
    }

    /// bf16-weight projection: up to 63 rows the bf16 GEMV in chunks of at most 16 rows (each
    /// chunk reads the weight once); from 64 rows the weight is widened to f32 in row tiles of at
    /// most [`BF16_WIDEN_TILE`] values, each multiplied by SGEMM straight into its columns of y.
    #[allow(clippy::too_many_arguments)]
    fn bf16_linear<X: DevicePtr<f32>, Y: DevicePtrMut<f32>>(
        &self,
        x: &X,
        n: usize,
        w: &CudaSlice<u16>,
        rows: usize,
        cols: usize,
        y: &mut Y,
        widen: bool,
    ) -> Result<(), BackendError> {
        if n == 0 || rows == 0 {
            return Ok(());
        }
        let s = &self.stream;
        if widen {
            let tile_rows = (BF16_WIDEN_TILE / cols.max(1)).clamp(1, rows);
            // SAFETY: uninitialised f32 storage; every tile is written by the widening kernel
            // before the SGEMM that reads it (same stream).
            let mut wide =
                unsafe { s.alloc::<f32>(tile_rows * cols) }.map_err(driver_err("alloc"))?;
            let (wp, _w) = w.device_ptr(s);
            let (xp, _x) = x.device_ptr(s);
            let (yp, _y) = y.device_ptr_mut(s);
            let (tp, _t) = wide.device_ptr_mut(s);
            let mut r0 = 0;
            while r0 < rows {
                let tr = tile_rows.min(rows - r0);
                // SAFETY: w holds rows * cols bf16, so rows r0..r0 + tr are in bounds (16-byte
                // aligned: cols % 8 == 0); the tile holds tile_rows * cols >= tr * cols f32.
                unsafe {
                    self.kernels
                        .bf16_to_f32(s, wp + (r0 * cols * 2) as u64, tp, tr * cols)
                }
                .map_err(kernel_err)?;
                // SAFETY: x holds n * cols and y n * rows f32 (checked by the callers); columns
                // r0..r0 + tr of y's rows are written with row stride `rows`.
                unsafe { self.sgemm_raw(xp, n, tp, tr, cols, yp + (r0 * 4) as u64, rows) }?;
                r0 += tr;
            }
            return Ok(());
        }
        let (wp, _w) = w.device_ptr(s);
        let (xp, _x) = x.device_ptr(s);
        let (yp, _y) = y.device_ptr_mut(s);
        // SAFETY: the weight holds [rows, cols] bf16; x holds n * cols and y n * rows f32 (the
        // callers check it).
        unsafe { self.bf16_gemv_rows(s, wp, xp, yp, n, (rows, cols)) }
    }

    /// `y = x W^T` for a bf16 weight by GEMV (or skinny tensor-core GEMM) launches on `s`, in
    /// chunks of at most [`BF16_GEMV_MAX_M`] rows: [`Self::bf16_linear`] without widening.
    ///
    /// # Safety
    /// `wp` must hold `[rows, cols]` bf16, `xp` `n * cols` f32 and `yp` `n * rows` f32, device
    /// memory of this context.
    unsafe fn bf16_gemv_rows(
        &self,
        s: &CudaStream,
        wp: u64,
        xp: u64,
        yp: u64,
        n: usize,
        (rows, cols): (usize, usize),
    ) -> Result<(), BackendError> {
        for (start, m) in row_chunks(n, BF16_GEMV_MAX_M) {
            let (xs, ys) = (
                xp + (start * cols * 4) as u64,
                yp + (start * rows * 4) as u64,
            );
            if self.skinny(SkinnyWeight::Bf16, m, rows, cols) {
                let call = SkinnyMma::plain(wp, SkinnyWeight::Bf16, 0, xs, ys, (m, rows, cols));
                // SAFETY: as the GEMV below: [rows, cols] bf16, m rows of x and y.
                unsafe { self.kernels.skinny_mma(s, &call) }.map_err(kernel_err)?;
                continue;
            }
            let call = Bf16Gemv {
                weight: wp,
                x: xs,
                out: ys,
                m,
                n: rows,
                k: cols,
            };
            // SAFETY: the weight holds [rows, cols] bf16; x holds n * cols and y n * rows f32, so
            // rows start..start + m of both are in bounds.
            unsafe { self.kernels.bf16_gemv(s, &call) }.map_err(kernel_err)?;
        }
        Ok(())
    }

    /// `y = x W^T` on raw device pointers: x f32 `[n, cols]`, W f32 `[rows, cols]` row-major, y
    /// the first `rows` columns of `n` rows of stride `ldy` (SGEMM in the column-major view of
    /// [`Self::sgemm`] with `ldc = ldy`).
    ///
    /// # Safety
    /// `x` must hold `n * cols` f32, `w` `rows * cols`, and `y` `(n - 1) * ldy + rows` f32, all
    /// device memory of this stream's context, with `ldy >= rows`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn sgemm_raw(
        &self,
        x: cudarc::driver::sys::CUdeviceptr,
        n: usize,
        w: cudarc::driver::sys::CUdeviceptr,
        rows: usize,
        cols: usize,
        y: cudarc::driver::sys::CUdeviceptr,
        ldy: usize,
    ) -> Result<(), BackendError> {
        // SAFETY: this function's contract, with x's rows packed (ldx = cols).
        unsafe {
            self.gemm_f32(
                x,
                cols,
                n,
                w,
                rows,
                cols,
                y,
                ldy,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
        }
    }

    fn check_input(x: &[f32], n: usize, cols: usize, op: &'static str) -> Result<(), BackendError> {
        if x.len() != n * cols {
            return Err(BackendError::Shape {
                op,
                detail: format!("input has {} values, expected {n} x {cols}", x.len()),
            });
        }
        Ok(())
    }
}

impl CudaBackend {
    /// The kernel's view of FP4 expert buffers `[w1, s1, w3, s3, w2, s2]`.
    fn fp4_experts(
        &self,
        [w1, s1, w3, s3, w2, s2]: [&CudaSlice<u8>; 6],
        experts: usize,
        hidden: usize,
        inter: usize,
    ) -> Fp4Experts {
        let s = &self.stream;
        Fp4Experts {
            w1: w1.device_ptr(s).0,
            s1: s1.device_ptr(s).0,
            w3: w3.device_ptr(s).0,
            s3: s3.device_ptr(s).0,
            w2: w2.device_ptr(s).0,
            s2: s2.device_ptr(s).0,
            experts,
            hidden,
            inter,
        }
    }

    /// The grouped SwiGLU expert kernel over `n` rows of host `x` with `topk` (id, weight)
    /// slots per row; returns `[n, hidden]`.
    ///
    /// # Safety
    /// `bank` must point at this context's FP4 weights of its shapes, and every id must be
    /// below `bank.experts`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn grouped_fp4(
        &self,
        bank: &Fp4Experts,
        x: &[f32],
        n: usize,
        ids: &[i32],
        weights: &[f32],
        topk: usize,
        limit: f32,
    ) -> Result<Vec<f32>, BackendError> {
        let xd = self.upload(x)?;
        // SAFETY: as this function's contract.
        let out = unsafe { self.grouped_fp4_on(bank, &xd, n, ids, weights, topk, limit) }?;
        let mut y = self.download(&out)?;
        y.truncate(n * bank.hidden);
        Ok(y)
    }

    /// [`Self::grouped_fp4`] over rows already on the GPU; returns `[n, hidden]` there.
    ///
    /// # Safety
    /// As [`Self::grouped_fp4`]; `xd` holds `n * bank.hidden` f32.
    #[allow(clippy::too_many_arguments)]
    unsafe fn grouped_fp4_on(
        &self,
        bank: &Fp4Experts,
        xd: &CudaSlice<f32>,
        n: usize,
        ids: &[i32],
        weights: &[f32],
        topk: usize,
        limit: f32,
    ) -> Result<CudaSlice<f32>, BackendError> {
        let s = &self.stream;
        let idd = self.upload(ids)?;
        let wd = self.upload(weights)?;
        let mut h = self.zeros(n * topk * bank.inter)?;
        let mut partial = self.zeros(n * topk * bank.hidden)?;
        let mut out = self.zeros(n * bank.hidden)?;
        {
            let call = Fp4MoeCall {
                x: xd.device_ptr(s).0,
                ids: idd.device_ptr(s).0,
                weights: wd.device_ptr(s).0,
                h: h.device_ptr_mut(s).0,
                partial: partial.device_ptr_mut(s).0,
                out: out.device_ptr_mut(s).0,
                out_dtype: OutDtype::F32,
                tokens: n,
                topk,
                swiglu_limit: limit,
                addend: 0,
            };
            // SAFETY: the caller vouches for the bank; x, ids, weights, h, partial and out
            // were just allocated for n rows x topk slots.
            unsafe { self.kernels.fp4_moe(s, bank, &call) }.map_err(kernel_err)?;
        }
        Ok(out)
    }

    /// [`Backend::head_rows`] on the device: the projection's output stays on the GPU, is
    /// gathered there over NCCL at more than one rank, and each (rank, row) slice is copied once
    /// into its row's `Vec`. The path it replaces downloaded the whole `[n, vocab]` block, copied
    /// it again per row, and at TP=2 also uploaded and downloaded it around a host all-gather
    /// (8 MB each way at 16 rows).
    fn head_rows_on(
        &self,
        x: &[f32],
        n: usize,
        w: &CudaMatrix,
        nccl: Option<&nccl::NcclCommunicator>,
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        use crate::ranks::Communicator;
        let _timed = Timed::start(&self.clock, 0);
        let (rows, cols) = w.shape();
        Self::check_input(x, n, cols, "linear")?;
        let world = nccl.map_or(1, |c| c.world_size());
        if n == 0 || rows == 0 {
            return Ok(vec![vec![0f32; rows * world]; n]);
        }
        let s = &self.stream;
        let xd = self.upload(x)?;
        let mut local = self.zeros(n * rows)?;
        self.linear_on(&xd, n, w, &mut local)?;
        let gathered = match nccl {
            None => local,
            Some(nccl) => {
                // SAFETY: uninitialised f32 storage, every element written by the all-gather
                // below before the copies read it (same stream).
                let mut all =
                    unsafe { s.alloc::<f32>(world * n * rows) }.map_err(driver_err("alloc"))?;
                nccl.all_gather_device(&local, &mut all)
                    .map_err(|e| BackendError::Other(format!("LM head all-gather: {e}")))?;
                all
            }
        };
        let picks: Vec<usize> = (0..n).collect();
        self.logit_rows(&gathered.slice(..), world, n, rows, &picks)
    }

    /// Rows `picks` (in that order) of a `[world, n, vl]` block of logits on the device (each
    /// rank's `vl` vocabulary columns of the `n` rows): one download of the block into
    /// page-locked staging, then each (rank, row) slice copied once into its row, rows in
    /// parallel (at 16 rows the block is 8 MB).
    pub(super) fn logit_rows(
        &self,
        block: &cudarc::driver::CudaView<'_, f32>,
        world: usize,
        n: usize,
        vl: usize,
        picks: &[usize],
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        use rayon::prelude::*;
        let s = &self.stream;
        let len = world * n * vl;
        if block.len() < len || picks.iter().any(|&r| r >= n) {
            return Err(BackendError::Shape {
                op: "logit rows",
                detail: format!(
                    "rows {picks:?} of {n} x {world} x {vl} logits in a block of {}",
                    block.len()
                ),
            });
        }
        let mut staging = self.head_staging.lock().unwrap_or_else(|p| p.into_inner());
        if staging.as_ref().is_none_or(|p| p.len() < len) {
            *staging = None;
            // SAFETY: uninitialised page-locked memory, written by the copy below before any
            // read; flags 0: cached (write-combined memory is slow for the CPU to read).
            let fresh = unsafe {
                s.context()
                    .alloc_pinned_with_flags::<f32>(len.next_power_of_two(), 0)
            }
            .map_err(driver_err("page-locked alloc"))?;
            *staging = Some(fresh);
        }
        let Some(stage) = staging.as_mut() else {
            return Err(BackendError::Other("no staging buffer".into()));
        };
        let host = stage.as_mut_ptr().map_err(driver_err("staging"))?;
        {
            let (src, _guard) = block.device_ptr(s);
            // SAFETY: `host` holds at least `len` f32 (checked above), `block` at least `len`;
            // the copy is on this stream, synchronised before the staging is read.
            unsafe {
                cudarc::driver::sys::cuMemcpyDtoHAsync_v2(
                    host.cast(),
                    src,
                    len * std::mem::size_of::<f32>(),
                    s.cu_stream(),
                )
            }
            .result()
            .map_err(driver_err("copy from GPU"))?;
        }
        s.synchronize().map_err(driver_err("synchronize"))?;
        let all = &stage.as_slice().map_err(driver_err("staging"))?[..len];
        Ok(picks
            .par_iter()
            .map(|&row| {
                let mut dst = Vec::with_capacity(world * vl);
                for rank in 0..world {
                    let src = (rank * n + row) * vl;
                    dst.extend_from_slice(&all[src..src + vl]);
                }
                dst
            })
            .collect())
    }

    /// `y = x W^T` for rows already on the GPU (dense SGEMM, the bf16 or the FP8 kernels).
    fn linear_on<X: DevicePtr<f32>, Y: DevicePtrMut<f32>>(
        &self,
        x: &X,
        n: usize,
        w: &CudaMatrix,
        y: &mut Y,
    ) -> Result<(), BackendError> {
        self.linear_on_with(x, n, w, y, n >= FP8_WIDEN_MIN_ROWS)
    }

    /// [`Self::linear_on`], saying whether an FP8 or bf16 weight may be widened for SGEMM
    /// (which allocates: not inside a graph capture).
    fn linear_on_with<X: DevicePtr<f32>, Y: DevicePtrMut<f32>>(
        &self,
        x: &X,
        n: usize,
        w: &CudaMatrix,
        y: &mut Y,
        widen_fp8: bool,
    ) -> Result<(), BackendError> {
        match w {
            CudaMatrix::Dense { w, rows, cols } => self.sgemm(x, n, w, *rows, *cols, y),
            CudaMatrix::Bf16 { w, rows, cols } => {
                self.bf16_linear(x, n, w, *rows, *cols, y, widen_fp8)
            }
            CudaMatrix::Fp8 {
                w,
                scales,
                rows,
                cols,
                ..
            } => self.fp8_linear(x, n, w, scales, *rows, *cols, y, widen_fp8),
            CudaMatrix::Fp4 { .. } => Err(BackendError::Other(
                "an FP4 matrix is only used inside a routed expert".into(),
            )),
        }
    }

    /// `y = x W^T` by the GEMV launches of an FP8 or bf16 weight on `s` (the paths
    /// [`Self::linear_on_with`] takes without widening), for work on a stream beside the
    /// backend's own. `Ok(false)`, with nothing launched, for the other encodings (SGEMM runs on
    /// the backend's stream only).
    ///
    /// # Safety
    /// `xp` must hold `n * cols` f32 and `yp` `n * rows` f32 of `w`'s `[rows, cols]`, device
    /// memory of this context.
    unsafe fn gemv_rows_on(
        &self,
        s: &CudaStream,
        w: &CudaMatrix,
        xp: u64,
        n: usize,
        yp: u64,
    ) -> Result<bool, BackendError> {
        let shape = w.shape();
        // SAFETY: the caller's contract; the weight buffers hold their matrix (built so).
        unsafe {
            match w {
                CudaMatrix::Fp8 { w, scales, .. } => {
                    let (wp, sp) = (w.device_ptr(s).0, scales.device_ptr(s).0);
                    self.fp8_gemv_rows(s, [wp, sp], xp, yp, n, shape)?;
                }
                CudaMatrix::Bf16 { w, .. } => {
                    self.bf16_gemv_rows(s, w.device_ptr(s).0, xp, yp, n, shape)?;
                }
                CudaMatrix::Dense { .. } | CudaMatrix::Fp4 { .. } => return Ok(false),
            }
        }
        Ok(true)
    }

    /// The shared expert (f32, bf16 or FP8) over rows on the GPU, added into `acc` there:
    /// gate and up projections, the clipped SwiGLU, the down projection, all on the device.
    #[allow(clippy::too_many_arguments)]
    fn add_swiglu_on<X: DevicePtr<f32>, A: DevicePtrMut<f32>>(
        &self,
        xd: &X,
        n: usize,
        [w1, w3, w2]: [&CudaMatrix; 3],
        limit: f32,
        acc: &mut A,
    ) -> Result<(), BackendError> {
        let (inter, hidden) = w1.shape();
        if w3.shape() != (inter, hidden) || w2.shape() != (hidden, inter) {
            return Err(BackendError::Shape {
                op: "moe_experts",
                detail: format!(
                    "shared expert w1 {:?}, w3 {:?}, w2 {:?}",
                    w1.shape(),
                    w3.shape(),
                    w2.shape()
                ),
            });
        }
        let s = &self.stream;
        let mut gate_up = self.zeros(2 * n * inter)?;
        self.linear_on(xd, n, w1, &mut gate_up.slice_mut(0..n * inter))?;
        self.linear_on(xd, n, w3, &mut gate_up.slice_mut(n * inter..2 * n * inter))?;
        let mut act = self.zeros(n * inter)?;
        {
            let (g, _g) = gate_up.device_ptr(s);
            let (a, _a) = act.device_ptr_mut(s);
            // SAFETY: gate_up holds 2 * n * inter f32 (gate then up), act n * inter.
            unsafe {
                self.kernels
                    .swiglu_clip(s, g, g + (n * inter * 4) as u64, a, n * inter, limit)
            }
            .map_err(kernel_err)?;
        }
        let mut down = self.zeros(n * hidden)?;
        self.linear_on(&act, n, w2, &mut down)?;
        let (ap, _a) = acc.device_ptr_mut(s);
        let (dp, _d) = down.device_ptr(s);
        // SAFETY: acc and down both hold n * hidden f32.
        unsafe { self.kernels.add_into(s, ap, dp, n * hidden) }.map_err(kernel_err)
    }

    /// Copies same-sized device buffers back to back into one allocation.
    /// The smallest and largest byte over `parts` (`None` when all are empty), on the device.
    fn scale_range(&self, parts: &[&CudaSlice<u8>]) -> Result<Option<(u8, u8)>, BackendError> {
        let s = &self.stream;
        let mut range = self.upload(&[255u32, 0u32])?;
        let mut any = false;
        for p in parts {
            if p.is_empty() {
                continue;
            }
            any = true;
            let (v, _v) = p.device_ptr(s);
            let (r, _r) = range.device_ptr_mut(s);
            // SAFETY: p holds p.len() bytes, range two u32 (255, 0 before the first launch).
            unsafe { self.kernels.u8_range(s, v, p.len(), r) }.map_err(kernel_err)?;
        }
        let got = self
            .stream
            .clone_dtoh(&range)
            .map_err(driver_err("copy from GPU"))?;
        Ok(match (any, got.as_slice()) {
            (true, [lo, hi]) => Some((*lo as u8, *hi as u8)),
            _ => None,
        })
    }

    fn concat(&self, parts: &[&CudaSlice<u8>]) -> Result<CudaSlice<u8>, BackendError> {
        let each = parts.first().map_or(0, |p| p.len());
        let mut all = self
            .stream
            .alloc_zeros::<u8>((each * parts.len()).max(1))
            .map_err(driver_err("alloc"))?;
        for (i, p) in parts.iter().enumerate() {
            self.stream
                .memcpy_dtod(*p, &mut all.slice_mut(i * each..(i + 1) * each))
                .map_err(driver_err("copy on GPU"))?;
        }
        Ok(all)
    }
}

impl Backend for CudaBackend {
    type KvStore = CudaKvStore;
    type LayerStack = CudaLayerStack;

    fn layer_stack(
        &self,
        model: &super::StackModel<'_, Self>,
    ) -> Result<Option<CudaLayerStack>, BackendError> {
        self.build_layer_stack(model)
    }

    fn set_step_tokens(&self, tokens: usize) {
        self.step_tokens.store(tokens, Ordering::Relaxed);
    }

    fn layer_stack_max_rows(&self) -> usize {
        // Steps over STACK_MAX_ROWS run as GEMM steps, in pieces.
        usize::MAX
    }

    fn set_layer_stack_graphs(&self, stack: &mut CudaLayerStack, on: bool) {
        stack.set_graphs(on);
    }

    fn run_layer_stack(
        &self,
        stack: &mut CudaLayerStack,
        model: &super::StackModel<'_, Self>,
        kv: &mut CudaKvStore,
        comm: &dyn crate::ranks::Communicator,
        rows: &super::StackRows<'_>,
        streams: super::StackStreams<'_>,
        capture: &[usize],
    ) -> Result<Vec<(usize, Vec<f32>)>, BackendError> {
        let _timed = Timed::start(&self.clock, 7);
        self.run_stack(stack, model, kv, comm, rows, streams, capture)
    }

    fn kv_store(&self, floats: usize) -> Result<CudaKvStore, BackendError> {
        self.kv_alloc(floats)
    }

    fn kv_write(
        &self,
        store: &mut CudaKvStore,
        offsets: &[usize],
        width: usize,
        rows: &[f32],
    ) -> Result<(), BackendError> {
        let _timed = Timed::start(&self.clock, 4);
        self.kv_scatter(store, offsets, width, rows)
    }

    fn kv_read(
        &self,
        store: &CudaKvStore,
        offsets: &[usize],
        width: usize,
    ) -> Result<Vec<f32>, BackendError> {
        let _timed = Timed::start(&self.clock, 4);
        self.kv_gather(store, offsets, width)
    }

    fn kv_attend(
        &self,
        store: &CudaKvStore,
        q: &[f32],
        heads: usize,
        head_dim: usize,
        keys: &super::kv::KeyLists,
        sinks: &[f32],
        scale: f32,
    ) -> Result<Vec<f32>, BackendError> {
        let _timed = Timed::start(&self.clock, 5);
        self.attend(store, q, heads, head_dim, keys, sinks, scale)
    }

    fn kv_indexer_scores(
        &self,
        store: &CudaKvStore,
        q: &[f32],
        weights: &[f32],
        heads: usize,
        dim: usize,
        rows: &super::kv::IndexerRows<'_>,
        scale: f32,
    ) -> Result<Vec<f32>, BackendError> {
        let _timed = Timed::start(&self.clock, 6);
        match self.indexer_on(store, q, weights, heads, dim, rows, scale)? {
            Some(scores) => self.download(&scores),
            None => Ok(Vec::new()),
        }
    }

    fn kv_indexer_top_k(
        &self,
        store: &CudaKvStore,
        q: &[f32],
        weights: &[f32],
        heads: usize,
        dim: usize,
        rows: &super::kv::IndexerRows<'_>,
        scale: f32,
        k: usize,
    ) -> Result<Vec<Vec<usize>>, BackendError> {
        let _timed = Timed::start(&self.clock, 6);
        self.indexer_top_k(store, q, weights, heads, dim, rows, scale, k)
    }

    type Matrix = CudaMatrix;
    type ExpertBank = CudaExpertBank;

    fn expert_bank(&self, experts: Vec<[CudaMatrix; 3]>) -> Result<CudaExpertBank, BackendError> {
        let shapes: Option<Vec<_>> = experts
            .iter()
            .map(|[w1, w3, w2]| match (w1, w3, w2) {
                (
                    CudaMatrix::Fp4 {
                        rows: i1, cols: h1, ..
                    },
                    CudaMatrix::Fp4 {
                        rows: i3, cols: h3, ..
                    },
                    CudaMatrix::Fp4 {
                        rows: h2, cols: i2, ..
                    },
                ) if (i1, h1) == (i3, h3) && (h2, i2) == (h1, i1) => Some((*i1, *h1)),
                _ => None,
            })
            .collect();
        let Some(shapes) = shapes else {
            return Ok(CudaExpertBank::Each(experts));
        };
        let Some(&(inter, hidden)) = shapes.first() else {
            return Ok(CudaExpertBank::Each(experts));
        };
        if shapes.iter().any(|&s| s != (inter, hidden)) {
            return Ok(CudaExpertBank::Each(experts));
        }
        let pick = |which: usize, scales: bool| -> Vec<&CudaSlice<u8>> {
            experts
                .iter()
                .filter_map(|e| match &e[which] {
                    CudaMatrix::Fp4 { w, scales: s, .. } => Some(if scales { s } else { w }),
                    _ => None,
                })
                .collect()
        };
        let (s1, s3, s2) = (
            self.concat(&pick(0, true))?,
            self.concat(&pick(1, true))?,
            self.concat(&pick(2, true))?,
        );
        let range = self.scale_range(&[&s1, &s3, &s2])?;
        let f16_exact = range.is_some_and(|(lo, hi)| {
            dspark_kernels::launch::moe_sorted::F16_EXACT_SCALES.contains(&lo)
                && dspark_kernels::launch::moe_sorted::F16_EXACT_SCALES.contains(&hi)
        });
        let grouped_shift = range
            .filter(|_| moe_grouped::fp4_grouped_fits(hidden, inter))
            .and_then(|(lo, hi)| moe_grouped::fp4_grouped_scale_shift(lo, hi));
        let bank = CudaExpertBank::Fp4(Box::new(Fp4Bank {
            experts: experts.len(),
            hidden,
            inter,
            f16_exact,
            grouped_shift,
            w1: self.concat(&pick(0, false))?,
            s1,
            w3: self.concat(&pick(1, false))?,
            s3,
            w2: self.concat(&pick(2, false))?,
            s2,
        }));
        self.counters.fp4_banks.fetch_add(1, Ordering::Relaxed);
        // The per-expert buffers are freed when `experts` drops; wait for the copies first.
        self.stream
            .synchronize()
            .map_err(driver_err("synchronize"))?;
        Ok(bank)
    }

    fn routed_experts(
        &self,
        bank: &CudaExpertBank,
        x: &[f32],
        n: usize,
        routes: &[Vec<(usize, f32)>],
        limit: f32,
    ) -> Result<Vec<f32>, BackendError> {
        let _timed = Timed::start(&self.clock, 1);
        let b = match bank {
            CudaExpertBank::Fp4(b) => b,
            CudaExpertBank::Each(each) => {
                return super::routed_experts_one_by_one(self, each, x, n, routes, limit)
            }
        };
        let Some(call) = self.routed_call(b, x, n, routes, "routed_experts")? else {
            return Ok(Vec::new());
        };
        // SAFETY: the bank holds its experts' FP4 weights contiguously and every id is below
        // their count (checked by routed_call).
        unsafe { self.grouped_fp4(&call.bank, x, n, &call.ids, &call.weights, call.topk, limit) }
    }

    fn moe_experts(
        &self,
        bank: &CudaExpertBank,
        shared: [&CudaMatrix; 3],
        x: &[f32],
        n: usize,
        routes: &[Vec<(usize, f32)>],
        limit: f32,
    ) -> Result<Vec<f32>, BackendError> {
        let shared_fits = shared.iter().all(|m| {
            matches!(
                m,
                CudaMatrix::Dense { .. } | CudaMatrix::Bf16 { .. } | CudaMatrix::Fp8 { .. }
            )
        });
        let (CudaExpertBank::Fp4(b), true) = (bank, shared_fits) else {
            return super::routed_plus_shared(self, bank, shared, x, n, routes, limit);
        };
        let _timed = Timed::start(&self.clock, 1);
        let Some(call) = self.routed_call(b, x, n, routes, "moe_experts")? else {
            return Ok(Vec::new());
        };
        // x goes up once; the routed sum and the shared expert meet on the GPU.
        let xd = self.upload(x)?;
        // SAFETY: as in routed_experts; xd holds n * hidden f32.
        let mut out = unsafe {
            self.grouped_fp4_on(
                &call.bank,
                &xd,
                n,
                &call.ids,
                &call.weights,
                call.topk,
                limit,
            )
        }?;
        self.add_swiglu_on(&xd, n, shared, limit, &mut out)?;
        let mut y = self.download(&out)?;
        y.truncate(n * b.hidden);
        Ok(y)
    }

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn memory_info(&self) -> Option<(usize, usize)> {
        self.stream.context().bind_to_thread().ok()?;
        cudarc::driver::result::mem_get_info().ok()
    }

    fn matrix(&self, rows: usize, cols: usize, data: Vec<f32>) -> Result<CudaMatrix, BackendError> {
        if data.len() != rows * cols {
            return Err(BackendError::Shape {
                op: "matrix",
                detail: format!("{} values for [{rows}, {cols}]", data.len()),
            });
        }
        if let Some(bits) = bf16_storable(cols, &data) {
            drop(data);
            self.counters.bf16.fetch_add(1, Ordering::Relaxed);
            return Ok(CudaMatrix::Bf16 {
                rows,
                cols,
                w: self.upload(&bits)?,
            });
        }
        self.counters.dense.fetch_add(1, Ordering::Relaxed);
        Ok(CudaMatrix::Dense {
            rows,
            cols,
            w: self.upload(&data)?,
        })
    }

    fn shape(&self, m: &CudaMatrix) -> (usize, usize) {
        m.shape()
    }

    fn accepts_packed(&self) -> bool {
        true
    }

    fn op_times(&self) -> Vec<crate::engine::OpTime> {
        let mut times: Vec<crate::engine::OpTime> = OPS
            .iter()
            .enumerate()
            .map(|(i, op)| crate::engine::OpTime {
                op,
                calls: self.clock.calls[i].load(Ordering::Relaxed),
                seconds: self.clock.nanos[i].load(Ordering::Relaxed) as f64 * 1e-9,
            })
            .collect();
        times.extend(
            self.stage_times
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        // A count, not a time: how many layer-stack steps ran from a CUDA graph.
        times.push(crate::engine::OpTime {
            op: GRAPH_STEPS_OP,
            calls: self.graph_steps(),
            seconds: 0.0,
        });
        times
    }

    fn packed_matrix(
        &self,
        rows: usize,
        cols: usize,
        w: PackedWeight,
    ) -> Result<CudaMatrix, BackendError> {
        w.check(rows, cols)?;
        match w {
            // The FP8 kernel reads 16 input features per step.
            PackedWeight::Fp8Block { data, scales } if cols.is_multiple_of(16) => {
                self.counters.fp8.fetch_add(1, Ordering::Relaxed);
                let f16_shift = match (scales.iter().min(), scales.iter().max()) {
                    (Some(&lo), Some(&hi)) if cols.is_multiple_of(8) => {
                        dspark_kernels::launch::elementwise::fp8_f16_shift(lo, hi)
                    }
                    _ => None,
                };
                Ok(CudaMatrix::Fp8 {
                    rows,
                    cols,
                    w: self.upload(&data)?,
                    scales: self.upload(&scales)?,
                    f16_shift,
                })
            }
            PackedWeight::Fp4 { data, scales }
                if rows.is_multiple_of(FP4_GROUP) && cols.is_multiple_of(FP4_GROUP) =>
            {
                self.counters.fp4.fetch_add(1, Ordering::Relaxed);
                Ok(CudaMatrix::Fp4 {
                    rows,
                    cols,
                    w: self.upload(&data)?,
                    scales: self.upload(&scales)?,
                })
            }
            other => {
                let data = other.dequantize(rows, cols)?;
                self.matrix(rows, cols, data)
            }
        }
    }

    fn linear(&self, x: &[f32], n: usize, w: &CudaMatrix) -> Result<Vec<f32>, BackendError> {
        let (rows, cols) = w.shape();
        Self::check_input(x, n, cols, "linear")?;
        if n == 0 || rows == 0 {
            return Ok(vec![0f32; n * rows]);
        }
        let mut out = self.linear_many(&[(x, w)], n)?;
        Ok(out.pop().unwrap_or_default())
    }

    fn head_rows(
        &self,
        x: &[f32],
        n: usize,
        w: &CudaMatrix,
        comm: &dyn crate::ranks::Communicator,
    ) -> Option<Result<Vec<Vec<f32>>, BackendError>> {
        if comm.world_size() == 1 {
            return Some(self.head_rows_on(x, n, w, None));
        }
        // On two H200s (43 layers, FP8 KV) the device gather took a batch-16 step from 30.7 to
        // 27.7 ms against the host one, which stays as the opt-out.
        if !self.head_gather_device.load(Ordering::Relaxed) {
            return None;
        }
        let nccl = self.stream_nccl(comm)?;
        Some(self.head_rows_on(x, n, w, Some(nccl)))
    }

    fn linear_many(
        &self,
        jobs: &[(&[f32], &CudaMatrix)],
        n: usize,
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        let _timed = Timed::start(&self.clock, 0);
        // Inputs uploaded once each (jobs often share one), outputs side by side in one buffer
        // brought back with a single copy.
        let mut inputs: Vec<(*const f32, usize, CudaSlice<f32>)> = Vec::new();
        let mut which = Vec::with_capacity(jobs.len());
        let mut offsets = Vec::with_capacity(jobs.len() + 1);
        offsets.push(0usize);
        for (x, w) in jobs {
            let (rows, cols) = w.shape();
            Self::check_input(x, n, cols, "linear")?;
            if matches!(w, CudaMatrix::Fp4 { .. }) {
                return Err(BackendError::Other(
                    "an FP4 matrix is only used inside a routed expert (swiglu_expert)".into(),
                ));
            }
            let key = (x.as_ptr(), x.len());
            let idx = match inputs.iter().position(|(p, l, _)| (*p, *l) == key) {
                Some(i) => i,
                None => {
                    inputs.push((key.0, key.1, self.upload(x)?));
                    inputs.len() - 1
                }
            };
            which.push(idx);
            offsets.push(offsets.last().copied().unwrap_or(0) + n * rows);
        }
        let total = offsets.last().copied().unwrap_or(0);
        if n == 0 || total == 0 {
            return Ok(jobs
                .iter()
                .map(|(_, w)| vec![0f32; n * w.shape().0])
                .collect());
        }
        let mut y = self.zeros(total)?;
        for (k, (_, w)) in jobs.iter().enumerate() {
            if w.shape().0 == 0 {
                continue;
            }
            let xd = &inputs[which[k]].2;
            let mut yk = y.slice_mut(offsets[k]..offsets[k + 1]);
            // FP4 was refused above; every other encoding goes through linear_on.
            self.linear_on(xd, n, w, &mut yk)?;
        }
        let all = self.download(&y)?;
        if jobs.len() == 1 {
            // One job (the LM head): its rows are the whole download, no second copy.
            return Ok(vec![all]);
        }
        Ok(offsets
            .windows(2)
            .map(|r| all[r[0]..r[1]].to_vec())
            .collect())
    }

    fn gather_rows(&self, w: &CudaMatrix, ids: &[u32]) -> Result<Vec<f32>, BackendError> {
        let _timed = Timed::start(&self.clock, 3);
        let (rows, cols) = w.shape();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= rows) {
            return Err(BackendError::Shape {
                op: "gather_rows",
                detail: format!("row {id} of {rows}"),
            });
        }
        if ids.is_empty() || cols == 0 {
            return Ok(vec![0f32; ids.len() * cols]);
        }
        let s = &self.stream;
        // SAFETY: uninitialised f32 storage; every row is written below before the download.
        let mut out = unsafe { s.alloc::<f32>(ids.len() * cols) }.map_err(driver_err("alloc"))?;
        match w {
            CudaMatrix::Bf16 { w, rows, cols } => {
                let idx: Vec<i32> = ids
                    .iter()
                    .map(|&id| i32::try_from(id))
                    .collect::<Result<_, _>>()
                    .map_err(|_| BackendError::Shape {
                        op: "gather_rows",
                        detail: format!("a row id of {rows} rows exceeds i32"),
                    })?;
                let idd = self.upload(&idx)?;
                let (wp, _w) = w.device_ptr(s);
                let (ip, _i) = idd.device_ptr(s);
                let (op, _o) = out.device_ptr_mut(s);
                // SAFETY: w holds rows * cols bf16, idd ids.len() i32 (each below rows, checked
                // above), out ids.len() * cols f32.
                unsafe {
                    self.kernels
                        .gather_rows_bf16(s, wp, ip, op, ids.len(), *cols, *rows)
                }
                .map_err(kernel_err)?;
            }
            CudaMatrix::Dense { w, cols, .. } => {
                // Device-side row copies, then one download.
                for (i, &id) in ids.iter().enumerate() {
                    let id = id as usize;
                    s.memcpy_dtod(
                        &w.slice(id * cols..(id + 1) * cols),
                        &mut out.slice_mut(i * cols..(i + 1) * cols),
                    )
                    .map_err(driver_err("copy on GPU"))?;
                }
            }
            CudaMatrix::Fp8 { .. } | CudaMatrix::Fp4 { .. } => {
                return Err(BackendError::Other(
                    "gather_rows needs a bf16 or f32 matrix (embeddings are bf16 in the \
                     checkpoint)"
                        .into(),
                ))
            }
        }
        self.download(&out)
    }

    fn swiglu_expert(
        &self,
        x: &[f32],
        n: usize,
        w1: &CudaMatrix,
        w3: &CudaMatrix,
        w2: &CudaMatrix,
        limit: f32,
    ) -> Result<Vec<f32>, BackendError> {
        let _timed = Timed::start(&self.clock, 2);
        let (
            CudaMatrix::Fp4 {
                rows: inter,
                cols: hidden,
                w: w1,
                scales: s1,
            },
            CudaMatrix::Fp4 {
                rows: inter3,
                cols: hidden3,
                w: w3,
                scales: s3,
            },
            CudaMatrix::Fp4 {
                rows: hidden2,
                cols: inter2,
                w: w2,
                scales: s2,
            },
        ) = (w1, w3, w2)
        else {
            // Dense or FP8 experts (the shared expert).
            return super::swiglu_by_projections(self, x, n, [w1, w3, w2], limit);
        };
        let (inter, hidden) = (*inter, *hidden);
        if (*inter3, *hidden3, *hidden2, *inter2) != (inter, hidden, hidden, inter) {
            return Err(BackendError::Shape {
                op: "swiglu_expert",
                detail: format!(
                    "w1 [{inter}, {hidden}], w3 [{inter3}, {hidden3}], w2 [{hidden2}, {inter2}]"
                ),
            });
        }
        Self::check_input(x, n, hidden, "swiglu_expert")?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let one = self.fp4_experts([w1, s1, w3, s3, w2, s2], 1, hidden, inter);
        // SAFETY: one expert's FP4 weights and scales of the shapes checked above; every row is
        // routed to it (id 0) with weight 1.
        unsafe { self.grouped_fp4(&one, x, n, &vec![0; n], &vec![1.0; n], 1, limit) }
    }
}

/// A grouped FP4 expert call: the bank's pointers and the routes in the kernel's layout.
struct RoutedCall {
    bank: Fp4Experts,
    ids: Vec<i32>,
    weights: Vec<f32>,
    topk: usize,
}

/// Per-token expert ids and weights in fixed `topk` slots (a shorter route is padded with weight
/// 0), checked against the bank's size.
fn route_table(
    routes: &[Vec<(usize, f32)>],
    experts: usize,
) -> Result<(Vec<i32>, Vec<f32>, usize), BackendError> {
    let n = routes.len();
    let topk = routes.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = vec![0i32; n * topk];
    let mut weights = vec![0f32; n * topk];
    for (t, r) in routes.iter().enumerate() {
        for (j, &(e, w)) in r.iter().enumerate() {
            if e >= experts {
                return Err(BackendError::Shape {
                    op: "routed_experts",
                    detail: format!("expert {e} of {experts}"),
                });
            }
            ids[t * topk + j] = e as i32;
            weights[t * topk + j] = w;
        }
    }
    Ok((ids, weights, topk))
}

/// `(first row, rows)` of `n` rows taken at most `max` at a time (the GEMV kernels' row limit).
pub(crate) fn row_chunks(n: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(max.max(1))
        .map(move |start| (start, (n - start).min(max.max(1))))
}

/// `(GPU ordinal, stream)` pairs.
type StreamsByGpu = Mutex<Vec<(usize, Arc<CudaStream>)>>;

/// Streams shared by a GPU's backend and its NCCL communicator.
static GROUP_STREAMS: std::sync::OnceLock<StreamsByGpu> = std::sync::OnceLock::new();

fn registered_stream(ordinal: usize) -> Option<Arc<CudaStream>> {
    let streams = GROUP_STREAMS.get()?;
    let streams = streams.lock().unwrap_or_else(|p| p.into_inner());
    streams
        .iter()
        .find(|(o, _)| *o == ordinal)
        .map(|(_, s)| s.clone())
}

/// A new stream on GPU `ordinal`, in a context handle whose buffers do not track their uses
/// with events: everything of a backend runs on its one stream in order, so the events would
/// only cost time (and they cannot be recorded inside a graph capture).
fn new_stream(ordinal: usize) -> Result<Arc<CudaStream>, BackendError> {
    let ctx = dspark_kernels::open_gpu(ordinal).map_err(kernel_err)?;
    // SAFETY: no buffer exists yet on this context handle; every buffer later made through the
    // stream below is used only on that stream (the backend's and, sharing it, NCCL's).
    unsafe { ctx.disable_event_tracking() };
    ctx.new_stream().map_err(driver_err("create stream"))
}

/// The stream that GPU `ordinal`'s backend and collective communicator share (made on first
/// use): NCCL's collectives then sit in the backend's queue, in order with its kernels and
/// inside its CUDA graphs. Make the communicator on it before opening the backend.
pub fn group_stream(ordinal: usize) -> Result<Arc<CudaStream>, BackendError> {
    let streams = GROUP_STREAMS.get_or_init(|| Mutex::new(Vec::new()));
    let mut streams = streams.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, s)) = streams.iter().find(|(o, _)| *o == ordinal) {
        return Ok(s.clone());
    }
    let s = new_stream(ordinal)?;
    streams.push((ordinal, s.clone()));
    Ok(s)
}

/// Whether a CUDA driver and at least one GPU can be used here.
pub fn gpu_present() -> bool {
    gpu_count().is_ok_and(|n| n > 0)
}

/// GPUs visible to this process (an error when there is no usable driver). Probed once: the
/// server asks at several points of start-up.
pub fn gpu_count() -> Result<usize, BackendError> {
    static COUNT: std::sync::OnceLock<Result<usize, String>> = std::sync::OnceLock::new();
    COUNT
        .get_or_init(|| {
            // SAFETY: only tries to dlopen libcuda by its candidate names.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err("no CUDA driver library (libcuda) found".into());
            }
            let n = CudaContext::device_count().map_err(|e| format!("CUDA device count: {e}"))?;
            Ok(usize::try_from(n).unwrap_or(0))
        })
        .clone()
        .map_err(BackendError::Other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_storage_only_for_exact_bf16_values() {
        // Values a loader widens from bf16: low 16 bits zero, sign/inf/NaN/subnormal included.
        let exact = [
            1.0f32,
            -2.5,
            0.0,
            -0.0,
            f32::INFINITY,
            f32::from_bits(0x7fc0_0000),
            f32::from_bits(0x0001_0000),
            3.140625,
        ];
        let bits = exact_bf16(&exact).unwrap();
        assert_eq!(bits[0], 0x3f80);
        assert_eq!(bits[1], 0xc020);
        assert_eq!(bits[3], 0x8000);
        for (b, v) in bits.iter().zip(&exact) {
            assert_eq!(f32::from_bits(u32::from(*b) << 16).to_bits(), v.to_bits());
        }
        // One value that needs more than bf16's 8 significant bits keeps the matrix f32.
        let mut mixed = exact.to_vec();
        mixed.push(0.1);
        assert!(exact_bf16(&mixed).is_none());
        assert!(exact_bf16(&[1.0 + f32::EPSILON]).is_none());
        assert_eq!(exact_bf16(&[]), Some(Vec::new()));
        // Widths the bf16 GEMV does not take stay f32 too.
        assert!(bf16_storable(8, &exact).is_some());
        assert!(bf16_storable(4, &exact[..4]).is_none());
        assert!(bf16_storable(0, &[]).is_none());
    }
}
