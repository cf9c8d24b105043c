//! The whole-layer device forward: every layer of a step runs on the GPU with the residual
//! streams, projections, norms, RoPE, hyper-connections, compressors, indexer, attention,
//! routing and experts all in device memory, enqueued on one stream without a host sync. The
//! host uploads the step's row table (positions, block tables, key counts) once, and reads the
//! streams back once at the end (and after a captured layer for the DSpark draft).
//!
//! The op-by-op forward in `engine::model::forward` is the reference: every kernel here computes
//! what its host counterpart does, in f32 (docs/CUDA.md states the tolerances).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cudarc::driver::sys::{CUevent_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use dspark_kernels::kv_record::KvRowFormat;
use dspark_kernels::launch::attention::{
    attention_f16_form, attention_tc_form, check_attention_heads_tc, finishes_in_pass_one,
    AttentionTcForm, ATTENTION_HEAD_GROUP, TOPK_SINGLE_MAX_COUNT,
};
use dspark_kernels::launch::layer_ops::{
    hc_mix_workspace_floats, CopyRowsF32, DenseExpertsF32, HcPost, HcPostKernel, HcPreFused,
    HcPreKernel, HcSeam, RmsNormF32, RmsNormRopeF32, RopeF32, RouteF32, RouterScoring,
    HC_SEAM_MAX_TOKENS, HC_SEAM_TOKENS_PER_CLUSTER,
};
use dspark_kernels::launch::moe_sorted::GatherInto;
use dspark_kernels::launch::multi_gemv::{GemvSegment, SegmentWeights, GEMV_MAX_SEGMENTS};
use dspark_kernels::launch::paged::{
    key_counts, CompressParams, KeyMode, KeySelection, PoolSection, RowTable,
};
use dspark_kernels::launch::FP8_GEMV_MAX_M;
use dspark_kernels::{
    attention_splits, attention_workspace_floats, indexer_rank_candidates, indexer_row_share,
    topk_last_round, Fp4MoeCall, Fp8GroupedGemv, IndexerScores, InverseRope, OutDtype,
    PagedAttention, SkinnyMma, SkinnyWeight, TopKMergeRanks, TopKSelect,
};

use super::gemm_step::ExpertRows;
use super::kv::topk_work_floats;
use super::nccl::NcclCommunicator;
use super::{driver_err, kernel_err, CudaBackend, CudaExpertBank, CudaKvStore, CudaMatrix};
use crate::backend::{BackendError, StackModel, StackRows, StackStreams};
use crate::engine::model::config::{AttentionKind, ScoringFunc};
use crate::engine::model::hyper::HyperConnection;
use crate::engine::model::load::{ExpertWeights, LayerWeights, MoeWeights, Routing};
use crate::ranks::Communicator;

/// Most rows a layer-stack step takes; larger steps (prefill chunks) run op by op, where the
/// FP8 projections switch to widened SGEMMs.
pub const STACK_MAX_ROWS: usize = 64;

/// One hyper-connection site on the device.
struct HcSite {
    fn_: CudaSlice<f32>,
    base: CudaSlice<f32>,
    scale: [f32; 3],
}

/// The model's head as a step's graph runs it ([`CudaBackend::stack_head`]): the final
/// hyper-connection collapse as a site whose mix rows past the first `hc` are zero (a seam's
/// pre coefficients, `sigmoid(m * scale + base) + hc_eps`, are the head's), and the model norm.
/// The LM head's matrix is the model's.
struct StackHead {
    site: HcSite,
    norm: CudaSlice<f32>,
}

/// A compressor's small parameters.
struct CompressorParams {
    ape: CudaSlice<f32>,
    norm: CudaSlice<f32>,
}

enum RouteTable {
    Bias(CudaSlice<f32>),
    Hash(CudaSlice<i32>),
}

/// Routed experts that are not one FP4 bank: f32 `[E, inter, hidden]` (w1, w3) and
/// `[E, hidden, inter]` (w2), contiguous for the grouped f32 kernel.
struct DenseExperts {
    w1: CudaSlice<f32>,
    w3: CudaSlice<f32>,
    w2: CudaSlice<f32>,
    experts: usize,
    hidden: usize,
    inter: usize,
}

struct StackLayer {
    attn_norm: CudaSlice<f32>,
    ffn_norm: CudaSlice<f32>,
    q_norm: CudaSlice<f32>,
    kv_norm: CudaSlice<f32>,
    sinks: CudaSlice<f32>,
    hc_attn: HcSite,
    hc_ffn: HcSite,
    compressor: Option<CompressorParams>,
    indexer: Option<CompressorParams>,
    routes: RouteTable,
    dense_experts: Option<DenseExperts>,
    /// The output projection's FP8 groups stacked into one matrix `[groups * o_lora_rank,
    /// group_in]` (weights, scales) for one grouped launch.
    wo_a_stacked: Option<StackedFp8>,
}

/// FP8 weights and their scale tiles, several matrices stacked along the rows.
type StackedFp8 = (CudaSlice<u8>, CudaSlice<u8>);

/// One piece's share of a step's [`StackStreams`]: the piece rows to copy back, as (piece row,
/// row of `kept`), into `kept`'s rows of `hc * hidden` values.
struct PieceStreams<'a> {
    keep: Vec<(usize, usize)>,
    kept: &'a mut [f32],
    /// Where the kept rows' logits go if the piece runs the head ([`StackStreams::logits`]).
    logits: Option<&'a mut Vec<Vec<f32>>>,
}

impl<'a> PieceStreams<'a> {
    /// The kept rows among step rows `start .. start + len`; the logits' place only for a
    /// piece that is the whole step (`whole`).
    fn of(all: &'a mut StackStreams<'_>, start: usize, len: usize, whole: bool) -> Self {
        PieceStreams {
            logits: if whole {
                all.logits.as_deref_mut()
            } else {
                None
            },
            keep: all
                .keep
                .iter()
                .enumerate()
                .filter(|&(_, &r)| (start..start + len).contains(&r))
                .map(|(at, &r)| (r - start, at))
                .collect(),
            kept: all.kept,
        }
    }
}

/// Device buffers of one step, sized for `rows` rows (the ones whose size depends on the
/// context are sized per step by [`CudaBackend::size_scratch`]).
struct Scratch {
    rows: usize,
    streams: CudaSlice<f32>,
    hc_work: CudaSlice<f32>,
    /// The rows whose sums of squares of the current streams a GEMM step's post left in
    /// `hc_work` for the next site's pre ([`CudaBackend::hc_post_then`]); `None` once read or
    /// when the streams were written otherwise (the embedding).
    hc_squares_of: Option<HcRows>,
    /// The rows whose next site's pre the last seam ran ([`CudaBackend::hc_seam`]): that
    /// site's `x` and `mix` are ready and its [`CudaBackend::hc_pre_rows`] has nothing to do.
    hc_pre_done: Option<HcRows>,
    /// Whether `mix`'s comb is being written by the Sinkhorn on the second stream, which the
    /// main stream waits for ([`SidePoint::Comb`]) before a post reads it.
    comb_on_side: bool,
    mix: CudaSlice<f32>,
    x: CudaSlice<f32>,
    /// A split GEMM step's feed-forward input rounded to f16, gathered in place of `x` where
    /// every reader rounds it so ([`CudaBackend::ffn_takes_f16_rows`]); `[rows, hidden]`.
    x_f16: CudaSlice<u16>,
    q_lora: CudaSlice<f32>,
    kv: CudaSlice<f32>,
    comp_kv: CudaSlice<f32>,
    comp_gate: CudaSlice<f32>,
    idx_kv: CudaSlice<f32>,
    idx_gate: CudaSlice<f32>,
    idx_weights: CudaSlice<f32>,
    q: CudaSlice<f32>,
    idx_q: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    group_in: CudaSlice<f32>,
    group_out: CudaSlice<f32>,
    grouped: CudaSlice<f32>,
    sub_out: CudaSlice<f32>,
    router_logits: CudaSlice<f32>,
    route_ids: CudaSlice<i32>,
    route_weights: CudaSlice<f32>,
    expert_h: CudaSlice<f32>,
    expert_partial: CudaSlice<f32>,
    shared_gate: CudaSlice<f32>,
    shared_up: CudaSlice<f32>,
    shared_act: CudaSlice<f32>,
    shared_down: CudaSlice<f32>,
    sel_idx: CudaSlice<i32>,
    sel_val: CudaSlice<f32>,
    scores: CudaSlice<f32>,
    key_offsets: CudaSlice<i64>,
    attn_work: CudaSlice<f32>,
    /// The two-stage indexer top-k's candidates (f32 values, then i32 indices), in f32 units.
    topk_work: CudaSlice<f32>,
    /// Where the indexer's rows are split between ranks: this rank's top k of its share (values
    /// `[rows, k]`, then indices as i32 bits), and every rank's, gathered.
    share_top: CudaSlice<f32>,
    shares_gathered: CudaSlice<f32>,
    /// The streams after each captured layer (copied inside the step, read after it).
    captures: Vec<CudaSlice<f32>>,
    /// GEMM steps only (one element otherwise).
    gemm: GemmScratch,
}

/// What only GEMM steps use: widened weights and the routed experts sorted by expert.
pub(super) struct GemmScratch {
    /// One widened weight matrix (f32, or f16 pairs), grown to the largest.
    pub(super) wide: CudaSlice<f32>,
    /// A projection's activations rounded to f16 (`gemm_step::ProjGemm::F16`), and which
    /// `(x, ldx, rows, cols)` they are while one input's projections run.
    pub(super) x_half: CudaSlice<u16>,
    pub(super) x_half_of: Option<(cudarc::driver::sys::CUdeviceptr, usize, usize, usize)>,
    /// A group of experts' widened w1, w3, w2.
    pub(super) experts_wide: CudaSlice<f32>,
    /// The (token, slot) pairs in expert order: their activation rows, gate and up outputs.
    pub(super) x_sorted: CudaSlice<f32>,
    pub(super) gate: CudaSlice<f32>,
    pub(super) up: CudaSlice<f32>,
    /// i32: each sorted pair's token; each (token, slot)'s sorted row or -1; the experts in use.
    pub(super) tokens: CudaSlice<i32>,
    pub(super) slots: CudaSlice<i32>,
    pub(super) experts: CudaSlice<i32>,
    /// The grouped FP4 kernels' tiles, four i32 each.
    pub(super) tiles: CudaSlice<i32>,
    /// Device pointer arrays of a grouped GEMM.
    pub(super) gemm_ptrs: CudaSlice<u64>,
}

/// The widths the scratch buffers are sized by (per rank).
#[derive(Clone, Copy, Debug)]
struct ScratchDims {
    hidden: usize,
    width: usize,
    hc_outs: usize,
    q_lora: usize,
    head_dim: usize,
    heads: usize,
    index_heads: usize,
    index_dim: usize,
    index_topk: usize,
    group_in: usize,
    o_lora: usize,
    groups: usize,
    experts: usize,
    topk: usize,
    inter: usize,
    shared_inter: usize,
    /// Values of the largest projection a GEMM step widens.
    widest: usize,
    /// Columns of the widest projection a GEMM step multiplies (its f16 activations' width).
    widest_cols: usize,
    /// Whether GEMM steps widen some FP4 bank's routed experts (`gemm_step::grouped_shift` says
    /// no for it): only then are the widened weights and the gate/up outputs allocated up front
    /// (~1.8 GB at V4-Flash's 8K-row pieces).
    widened_experts: bool,
}

impl ScratchDims {
    fn of(model: &StackModel<'_, CudaBackend>) -> Self {
        let cfg = model.cfg;
        let ws = model.shard.world_size.max(1);
        let (h, hc) = (cfg.hidden_size, cfg.hc_mult);
        let max_over = |f: &dyn Fn(&LayerWeights<CudaBackend>) -> usize| {
            model.weights.layers.iter().map(f).max().unwrap_or(0)
        };
        Self {
            hidden: h,
            width: hc * h,
            hc_outs: (2 + hc) * hc,
            q_lora: cfg.q_lora_rank,
            head_dim: cfg.head_dim,
            heads: cfg.num_attention_heads.div_ceil(ws),
            // Every rank holds all the indexer heads (load.rs).
            index_heads: cfg.index_n_heads,
            index_dim: cfg.index_head_dim,
            index_topk: cfg.index_topk.max(1),
            group_in: cfg.num_attention_heads / cfg.o_groups.max(1) * cfg.head_dim,
            o_lora: cfg.o_lora_rank,
            groups: cfg.o_groups.div_ceil(ws),
            experts: cfg.n_routed_experts,
            topk: cfg.num_experts_per_tok,
            inter: max_over(&|lw| match &lw.moe.experts {
                CudaExpertBank::Fp4(b) => b.inter,
                CudaExpertBank::Each(e) => e.first().map_or(0, |m| m[0].shape().0),
            })
            .max(1),
            shared_inter: max_over(&|lw| lw.moe.shared.w1.shape().0).max(1),
            widened_experts: model.weights.layers.iter().any(|lw| {
                matches!(&lw.moe.experts, CudaExpertBank::Fp4(b)
                    if super::gemm_step::grouped_shift(b, super::gemm_step::tf32_allowed()).is_none())
            }),
            widest: max_over(&|lw| {
                gemm_matrices(lw)
                    .iter()
                    .map(|w| {
                        let (r, c) = w.shape();
                        r * c
                    })
                    .max()
                    .unwrap_or(1)
            }),
            widest_cols: max_over(&|lw| {
                gemm_matrices(lw)
                    .iter()
                    .map(|w| w.shape().1)
                    .max()
                    .unwrap_or(1)
            }),
        }
    }
}

/// Every projection matrix of a layer that GEMM steps multiply through `gemm_linear`.
fn gemm_matrices(lw: &LayerWeights<CudaBackend>) -> Vec<&CudaMatrix> {
    let (a, m) = (&lw.attn, &lw.moe);
    let mut mats: Vec<&CudaMatrix> = vec![&a.wq_a, &a.wq_b, &a.wkv, &a.wo_b, &m.gate];
    mats.extend(a.wo_a.iter());
    mats.extend([&m.shared.w1, &m.shared.w3, &m.shared.w2]);
    if let Some(c) = &a.compressor {
        mats.extend([&c.wkv, &c.wgate]);
    }
    if let Some(i) = &a.indexer {
        mats.extend([
            &i.wq_b,
            &i.weights_proj,
            &i.compressor.wkv,
            &i.compressor.wgate,
        ]);
    }
    mats
}

/// The CUDA backend's [`crate::backend::Backend::LayerStack`].
pub struct CudaLayerStack {
    /// The scratch of steps over [`STACK_MAX_ROWS`] rows (GEMM steps), [`gemm_piece_rows_max`] rows
    /// of it, swapped in for each (so the graphed steps' buffers never move).
    gemm_scratch: Scratch,
    layers: Vec<StackLayer>,
    rope_main: CudaSlice<f32>,
    rope_compress: CudaSlice<f32>,
    scratch: Scratch,
    /// GPU time per stage, where asked for (`DSPARK_STACK_PROFILE=1`; steps then run without
    /// graphs).
    clock: Option<StageClock>,
    /// Whether steps are captured and replayed as CUDA graphs (`DSPARK_CUDA_GRAPHS=0` or a
    /// failed capture turns it off).
    graphs_on: bool,
    graphs: Vec<CapturedStep>,
    /// Steps run, for least-recently-used eviction of graphs.
    uses: u64,
    /// The step's packed metadata (row table, key starts, indexer counts).
    meta32: CudaSlice<i32>,
    meta64: CudaSlice<i64>,
    /// The second stream for work off the critical path (`None` where it could not be made).
    side: Option<SideBranch>,
    head: StackHead,
    /// The logits of a step that runs the head (`[world, rows, vocab / world]`), for
    /// [`HC_SEAM_MAX_TOKENS`] rows: made with the stack, so a GPU without room for it fails at
    /// start, and graphs never see it move.
    head_logits: CudaSlice<f32>,
}

/// A stream beside the backend's for a layer's work that the launches queued next do not read:
/// an attention sub-layer's KV writes and compressors beside its query path, a decode step's
/// shared expert beside the router and routed experts. A decode step is a chain of small
/// launches that each leave most of the GPU idle; these run beside it instead of in it. The
/// main stream forks the side one (an event the side waits on) and waits for a marked point of
/// it before the first launch that reads the side's results; a graph capture takes both
/// streams' launches with those edges. Every step ends joined ([`Self::join`]).
pub(super) struct SideBranch {
    stream: Arc<CudaStream>,
    forked: CudaEvent,
    /// Points of the side stream the main one waits for, one per [`SidePoint`].
    marks: [CudaEvent; 5],
    /// Whether work was forked since the last [`Self::join`] (a join without it would wait on
    /// an event from outside a running capture).
    forked_since_join: std::sync::atomic::AtomicBool,
}

/// The marks of [`SideBranch`] a layer waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SidePoint {
    /// The indexer's compressed keys and scaled head weights (read by its scores).
    IndexerKeys = 0,
    /// The latent row and the compressed rows in the pool (read by the attention).
    AttentionKeys = 1,
    /// The shared expert's output (the routed experts' addend).
    SharedExpert = 2,
    /// A hyper-connection site's comb (the Sinkhorn after a seam; read by the site's post).
    Comb = 3,
    /// Everything queued on the side stream ([`SideBranch::join`]).
    Done = 4,
}

impl Drop for SideBranch {
    fn drop(&mut self) {
        dspark_kernels::launch::submit::clear_high_priority(&self.stream);
    }
}

impl SideBranch {
    fn new(main: &Arc<CudaStream>) -> Result<Self, BackendError> {
        let stream = main.fork().map_err(driver_err("side stream"))?;
        if dspark_kernels::launch::submit::side_priority_allowed(
            std::env::var("DSPARK_SIDE_PRIORITY").ok().as_deref(),
        ) {
            dspark_kernels::launch::submit::set_high_priority(&stream)
                .map_err(driver_err("side stream priority"))?;
        }
        let event = || {
            main.context()
                .new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .map_err(driver_err("side stream event"))
        };
        Ok(Self {
            stream,
            forked: event()?,
            marks: [event()?, event()?, event()?, event()?, event()?],
            forked_since_join: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The side stream, after everything queued on `main` so far.
    fn fork(&self, main: &CudaStream) -> Result<&Arc<CudaStream>, BackendError> {
        self.forked
            .record(main)
            .map_err(driver_err("side stream: fork"))?;
        self.stream
            .wait(&self.forked)
            .map_err(driver_err("side stream: fork"))?;
        self.forked_since_join.store(true, Ordering::Relaxed);
        Ok(&self.stream)
    }

    /// Marks everything queued on the side stream so far as `point`.
    fn mark(&self, point: SidePoint) -> Result<&CudaEvent, BackendError> {
        let event = &self.marks[point as usize];
        event
            .record(&self.stream)
            .map_err(driver_err("side stream: mark"))?;
        Ok(event)
    }

    /// `main` waits for the side stream's work up to `point`'s last mark.
    fn wait(&self, main: &CudaStream, point: SidePoint) -> Result<(), BackendError> {
        main.wait(&self.marks[point as usize])
            .map_err(driver_err("side stream: join"))
    }

    /// `main` waits for everything queued on the side stream (nothing to do where nothing was
    /// forked since the last join).
    fn join(&self, main: &CudaStream) -> Result<(), BackendError> {
        if !self.forked_since_join.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        self.mark(SidePoint::Done)?;
        self.wait(main, SidePoint::Done)
    }
}

/// GPU time of the stack's stages: an event recorded where each stage starts, read after the
/// step's final synchronisation (so profiling adds no sync inside the step).
#[derive(Default)]
pub(super) struct StageClock {
    events: Vec<CudaEvent>,
    marks: Vec<&'static str>,
}

impl StageClock {
    fn mark(&mut self, stream: &Arc<CudaStream>, stage: &'static str) -> Result<(), BackendError> {
        if self.marks.len() == self.events.len() {
            let e = stream
                .context()
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(driver_err("create event"))?;
            self.events.push(e);
        }
        self.events[self.marks.len()]
            .record(stream)
            .map_err(driver_err("record event"))?;
        self.marks.push(stage);
        Ok(())
    }

    /// Seconds per stage of the finished step (the stream has synchronised).
    fn drain(&mut self) -> Result<Vec<(&'static str, f64)>, BackendError> {
        let mut out: Vec<(&'static str, f64)> = Vec::new();
        for i in 1..self.marks.len() {
            let ms = self.events[i - 1]
                .elapsed_ms(&self.events[i])
                .map_err(driver_err("event time"))?;
            let stage = self.marks[i - 1];
            match out.iter_mut().find(|(s, _)| *s == stage) {
                Some((_, t)) => *t += f64::from(ms) * 1e-3,
                None => out.push((stage, f64::from(ms) * 1e-3)),
            }
        }
        self.marks.clear();
        Ok(out)
    }
}

/// What identifies a captured step: its rows, its context bucket and the captured layers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GraphKey {
    rows: usize,
    bucket: usize,
    capture: Vec<usize>,
    /// The indexer split threshold the step was captured under (it picks the launches).
    split_rows: usize,
    /// Which steps took the f16 attention when the step was captured (it picks the kernel).
    attention_f16: AttentionTcSteps,
    /// Whether the step was captured with its side work on the second stream.
    side_stream: bool,
    /// Whether the step runs the model's head ([`StepShape::head`]).
    head: bool,
}

/// A captured step's executable graph.
struct StepGraph(CudaGraph);

// SAFETY: a graph is only launched (and dropped) through `&mut CudaLayerStack`, so never from two
// threads at once, which is all CUDA asks of graph objects; its stream is Send + Sync.
unsafe impl Send for StepGraph {}
// SAFETY: as for Send: no `&StepGraph` method is reachable concurrently (every use needs the
// stack mutably).
unsafe impl Sync for StepGraph {}

struct CapturedStep {
    key: GraphKey,
    graph: StepGraph,
    last_use: u64,
}

/// Tokens up to which a decode step's hyper-connection sites meet in seams by default
/// ([`CudaBackend::hc_seam_max_tokens`]): every decode-sized step. On an H200 at one TP=2
/// rank's shapes (12 layers, against seams up to 2 tokens) 4 tokens took 7% less time, a K = 5
/// verify step 1-3% and 16 tokens 1-3% (docs/PERFORMANCE.md).
const HC_SEAM_DEFAULT_MAX_TOKENS: usize = HC_SEAM_MAX_TOKENS;

/// `DSPARK_HC_SEAM_TOKENS_PER_CLUSTER`'s value: unset is 0 (the kernels' choice), else 0 or one
/// of [`HC_SEAM_TOKENS_PER_CLUSTER`]; `Err` carries a value that is neither.
fn seam_tokens_per_cluster(value: Option<&str>) -> Result<usize, String> {
    let Some(v) = value else {
        return Ok(0);
    };
    match v.trim().parse::<usize>() {
        Ok(n) if n == 0 || HC_SEAM_TOKENS_PER_CLUSTER.contains(&n) => Ok(n),
        _ => Err(v.to_string()),
    }
}

/// `DSPARK_HC_SEAM_MAX_TOKENS`'s value: unset is the default, else a whole number in
/// 1..=[`HC_SEAM_MAX_TOKENS`]; `Err` carries a value that is neither.
fn seam_max_tokens(value: Option<&str>) -> Result<usize, String> {
    let Some(v) = value else {
        return Ok(HC_SEAM_DEFAULT_MAX_TOKENS);
    };
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=HC_SEAM_MAX_TOKENS).contains(&n) => Ok(n),
        _ => Err(v.to_string()),
    }
}

/// The step's scratch holds `rows` of every buffer a hyper-connection site reads or writes: the
/// streams, the normed input, the mix and the sub-layer's output.
fn hc_rows_fit(sc: &Scratch, rows: HcRows, hidden: usize, hc: usize) -> Result<(), BackendError> {
    let end = rows.start + rows.len;
    fits("stack streams", sc.streams.len(), end * hc * hidden)?;
    fits("stack x rows", sc.x.len(), end * hidden)?;
    fits("stack mix rows", sc.mix.len(), end * (2 + hc) * hc)?;
    fits("stack output rows", sc.sub_out.len(), end * hidden)
}

/// The rows of a step whose hyper-connections this rank computes. GEMM steps of a
/// tensor-parallel group on NCCL split them ([`HcRows::split`]): rank r owns rows `[r * share,
/// r * share + share)` (the last rank may own fewer; the buffers hold `ranks * share` rows) and
/// mixes, collapses and expands only its share of the residual streams. Each sub-layer's output
/// is reduce-scattered onto the owners' rows. Of its input, the feed-forward sub-layer gathers
/// the normed rows (with the routes of the router, which ran on each rank's own rows); the
/// attention sub-layer gathers instead what its replicated projections make of them, each rank
/// projecting its own rows.
#[derive(Clone, Copy, Debug, PartialEq)]
struct HcRows {
    start: usize,
    len: usize,
    /// Rows of one rank's part of a collective; 0 when the rows are not split.
    share: usize,
}

impl HcRows {
    fn whole(n: usize) -> Self {
        Self {
            start: 0,
            len: n,
            share: 0,
        }
    }

    fn split(n: usize, ranks: usize, rank: usize) -> Self {
        let share = n.div_ceil(ranks.max(1));
        let start = (rank * share).min(n);
        Self {
            start,
            len: share.min(n - start),
            share,
        }
    }

    fn is_split(self) -> bool {
        self.share > 0
    }
}

/// One step's metadata pointers and launch shapes, as the layers need them.
struct StepShape<'a> {
    table: &'a RowTable,
    /// i32 `[rows]` token ids (hash routing).
    ids: u64,
    key_classes: &'a [KeyClass],
    index_classes: &'a [IndexerClass],
    n: usize,
    /// The rows this rank's hyper-connections cover.
    hc: HcRows,
    capture: &'a [usize],
    /// Whether the step ends with the model's head: the last post meets the head's collapse in
    /// a seam, then the LM head into [`CudaLayerStack::head_logits`] (gathered over the ranks).
    head: bool,
}

/// What [`CudaBackend::stack_compress`] needs of one compressor (the attention's or the
/// indexer's).
struct CompressorSite {
    block_size: usize,
    input: PoolSection,
    output: PoolSection,
    kv: u64,
    gate: u64,
    params: CompressParams,
}

/// Key lists of one attention class (sliding, HCA of a ratio, CSA of a ratio) in one step.
struct KeyClass {
    mode: KeyMode,
    ratio: usize,
    /// i32 `[rows + 1]`.
    starts: u64,
    total: usize,
    max_keys: usize,
}

/// Indexer row counts of one step for a compress ratio.
struct IndexerClass {
    ratio: usize,
    /// i32 `[rows]`: compressed rows each row sees.
    visible: u64,
    /// i64 `[rows]`: where each row's scores start.
    out_starts: u64,
    /// i32 `[rows]`: `min(index_topk, visible)`.
    selected: u64,
    total: usize,
    max_visible: usize,
    /// Where the ranks of a tensor-parallel group split the rows (each scores and selects from
    /// its share, then the shares' top k are gathered and merged); else every rank scores all.
    split: Option<IndexerShares>,
}

/// This rank's shares of the indexer rows ([`indexer_row_share`]), packed per row.
#[derive(Clone, Copy, Debug)]
struct IndexerShares {
    /// i32 `[rows]`: the share's first row.
    starts: u64,
    /// i32 `[rows]`: the row after its last.
    ends: u64,
    /// i32 `[rows]`: the share's rows.
    counts: u64,
    /// i64 `[rows]`: where the share's scores start (`out_starts + starts`).
    score_starts: u64,
    /// i32 `[rows]`: every rank's candidates together ([`indexer_rank_candidates`]).
    candidates: u64,
    /// i32 `[rows]`: rank 0's candidates (every rank's before the last with rows).
    per_rank: u64,
    plan: SharePlan,
}

/// The launch shapes of a step's split indexer class, from its bucket: decided once, when its
/// shares are packed.
#[derive(Clone, Copy, Debug)]
struct SharePlan {
    /// The most rows of a share: sizes the scoring grid and the top-k.
    max_share: usize,
    /// Where a share's select takes rounds, where its last round's candidates lie in the
    /// workspace ([`topk_last_round`]): the merge takes them instead of the share's top k.
    last_round: Option<(usize, usize, usize)>,
}

impl SharePlan {
    /// The plan of a step of `n` rows in `bucket` at `ratio`, where a group of `ranks` splits
    /// its rows ([`indexer_splits`]).
    fn of(
        ranks: usize,
        bucket: usize,
        ratio: usize,
        split_rows: usize,
        n: usize,
        k: usize,
    ) -> Option<Self> {
        indexer_splits(ranks, bucket, ratio, split_rows).then(|| {
            let max_share = max_share_rows(bucket / ratio.max(1), ranks, k);
            Self {
                max_share,
                last_round: topk_last_round(n, max_share, k),
            }
        })
    }

    /// Rounds of a share's select before the merge (0: the merge takes its top k).
    fn levels(self) -> usize {
        self.last_round.map_or(0, |(_, _, levels)| levels)
    }

    /// Candidates per token a rank sends to the merge.
    fn stride(self, k: usize) -> usize {
        self.last_round.map_or(k, |(_, stride, _)| stride)
    }
}

/// The most rows of a rank's [`indexer_row_share`] when tokens see at most `max_visible` rows.
fn max_share_rows(max_visible: usize, ranks: usize, k: usize) -> usize {
    max_visible.min(max_visible.div_ceil(ranks.max(1)).max(k))
}

/// Compressed rows above which the ranks of a tensor-parallel group split the indexer's rows
/// rather than each scoring all of them (32K context at ratio 4: where one token's top k needs
/// the two-stage select). Below it the whole select costs less than the exchange of the ranks'
/// candidates, and needs no collective.
pub(super) const INDEXER_SPLIT_ROWS: usize = TOPK_SINGLE_MAX_COUNT;

/// Attention classes (mode, ratio) and indexer ratios a model may have (V4: sliding, HCA 128,
/// CSA 4; and one indexer ratio).
const MAX_KEY_CLASSES: usize = 8;
const MAX_INDEX_CLASSES: usize = 4;
/// i32 arrays per indexer class: visible, selected, share starts, share ends, share counts,
/// candidates, rank 0's candidates.
const INDEX_ARRAYS: usize = 7;
/// Element offsets of the step metadata for steps of up to `room` rows: positions, ids, block
/// table starts and lengths, key starts per class, indexer visible / selected counts per class,
/// then the block tables. Steps of up to [`STACK_MAX_ROWS`] rows all use `room =
/// STACK_MAX_ROWS`, so a captured graph's pointers stay valid from step to step; larger (GEMM)
/// steps, never captured, use their own row count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MetaLayout {
    room: usize,
}

impl MetaLayout {
    const GRAPHED: MetaLayout = MetaLayout {
        room: STACK_MAX_ROWS,
    };

    fn for_rows(n: usize) -> Self {
        if n <= STACK_MAX_ROWS {
            Self::GRAPHED
        } else {
            Self { room: n }
        }
    }

    fn positions(self) -> usize {
        0
    }

    fn ids(self) -> usize {
        self.room
    }

    fn bt_starts(self) -> usize {
        2 * self.room
    }

    fn bt_lens(self) -> usize {
        3 * self.room
    }

    /// Key class `c`'s `room + 1` starts.
    fn keys(self, c: usize) -> usize {
        4 * self.room + c * (self.room + 1)
    }

    /// Indexer class `c`'s visible counts; its selected counts, share starts, share ends, share
    /// counts, candidate counts and rank 0's candidate counts follow, `room` apart.
    fn index(self, c: usize) -> usize {
        4 * self.room + MAX_KEY_CLASSES * (self.room + 1) + c * INDEX_ARRAYS * self.room
    }

    fn tables(self) -> usize {
        self.index(MAX_INDEX_CLASSES)
    }

    /// i64 entries: indexer class `c`'s score starts at `2 c room`, its shares' score starts
    /// `room` later.
    fn i64_len(self) -> usize {
        MAX_INDEX_CLASSES * 2 * self.room
    }
}
/// Initial room for block tables (grown, and graphs dropped, when a step needs more).
const META_TABLE_ROOM: usize = 1 << 20;
/// Contexts are bucketed by powers of two from here: launch shapes (grids, splits, buffer sizes)
/// come from the bucket, so one graph serves every step of a bucket.
const MIN_CONTEXT_BUCKET: usize = 1024;
/// Graphs kept (least recently used dropped first).
const MAX_GRAPHS: usize = 48;

/// The step's metadata as built on the host at the fixed offsets above, uploaded in one copy
/// per array into the stack's persistent buffers.
struct MetaBuilder {
    layout: MetaLayout,
    i32s: Vec<i32>,
    i64s: Vec<i64>,
}

impl MetaBuilder {
    fn new(layout: MetaLayout) -> Self {
        Self {
            layout,
            i32s: vec![0; layout.tables()],
            i64s: vec![0; layout.i64_len()],
        }
    }

    fn put32(&mut self, at: usize, v: &[i32]) {
        self.i32s[at..at + v.len()].copy_from_slice(v);
    }
}

/// Whether the environment allows CUDA graphs (`DSPARK_CUDA_GRAPHS=0` forbids them).
fn graphs_allowed() -> bool {
    std::env::var("DSPARK_CUDA_GRAPHS").map_or(true, |v| v != "0")
}

/// The context bucket of a step whose longest row is at `max_pos`: launch shapes are sized for
/// it, so every step of the bucket can replay one graph.
fn context_bucket(max_pos: usize) -> usize {
    (max_pos + 1).next_power_of_two().max(MIN_CONTEXT_BUCKET)
}

/// Most keys a row of a step in `bucket` can have in an attention class: its window (at most
/// `window` rows) plus its compressed rows (none, all `bucket / ratio`, or the indexer's top
/// `topk` of them).
fn key_bound(mode: KeyMode, ratio: usize, window: usize, topk: usize, bucket: usize) -> usize {
    let compressed = match mode {
        KeyMode::Window => 0,
        KeyMode::AllCompressed => bucket / ratio.max(1),
        KeyMode::Selected => topk.min(bucket / ratio.max(1)),
    };
    window.min(bucket) + compressed
}

/// Most rows of one GEMM piece at the default `--max-num-batched-tokens` (a default 8,192-token
/// prefill chunk is one piece): larger pieces widen each expert's weights for more rows and give
/// its GEMMs more rows, at the price of scratch (about 5 GB of activations at V4-Flash width and
/// TP=2). [`CudaBackend::gemm_piece_rows_max`] follows the step budget.
pub const GEMM_PIECE_ROWS: usize = crate::engine::model::STEP_PIECE_TOKENS;
/// Most indexer scores one GEMM piece of [`GEMM_PIECE_ROWS`] keeps (f32: 1 GiB), scaled with
/// the piece rows: long contexts take smaller pieces.
const GEMM_PIECE_SCORES: usize = 1 << 28;

/// `DSPARK_GEMM_PIECE_ROWS`: most rows of a GEMM piece whatever the step budget (65..=65,536).
fn parse_gemm_piece_rows(value: Option<&str>) -> Option<usize> {
    value
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map(|r| r.clamp(STACK_MAX_ROWS + 1, 1 << 16))
}

impl CudaBackend {
    /// Most rows of one GEMM piece, what the GEMM scratch is sized for at start-up:
    /// `DSPARK_GEMM_PIECE_ROWS` where set, else [`crate::engine::model::step_piece_tokens`] of
    /// the step budget the engine told ([`crate::backend::Backend::set_step_tokens`]). A step of
    /// more rows runs as several pieces.
    pub(super) fn gemm_piece_rows_max(&self) -> usize {
        let told = self.step_tokens.load(Ordering::Relaxed);
        parse_gemm_piece_rows(std::env::var("DSPARK_GEMM_PIECE_ROWS").ok().as_deref())
            .unwrap_or_else(|| crate::engine::model::step_piece_tokens((told > 0).then_some(told)))
    }
}

/// Whether a group of `ranks` splits the indexer's rows of a step in `bucket` at `ratio`
/// ([`IndexerClass::split`]): more than `split_rows` compressed rows.
fn indexer_splits(ranks: usize, bucket: usize, ratio: usize, split_rows: usize) -> bool {
    ranks > 1 && bucket / ratio.max(1) > split_rows
}

/// Rows per GEMM piece of a step in `bucket`: `max_rows`, fewer where every row's indexer scores
/// over the bucket's compressed rows would not fit the scores of [`GEMM_PIECE_SCORES`] scaled to
/// `max_rows`.
fn gemm_piece_rows(
    bucket: usize,
    cfg: &crate::engine::model::ModelConfig,
    max_rows: usize,
) -> usize {
    let finest = (0..cfg.num_hidden_layers)
        .filter_map(|l| cfg.compress_ratio(l))
        .filter(|&r| r > 0)
        .min()
        .unwrap_or(bucket.max(1));
    let visible = (bucket / finest).max(1);
    let scores = GEMM_PIECE_SCORES / GEMM_PIECE_ROWS * max_rows;
    (scores / visible).clamp(STACK_MAX_ROWS + 1, max_rows)
}

/// Keys per token from which a decode step's attention shares each key row among a group of
/// heads (below it, one block per head keeps more of the GPU busy on short lists).
const HEAD_GROUPED_MIN_KEYS: usize = 2048;

/// A set of steps an attention kernel choice applies to, read from a switch: unset, "1" or
/// "all" = every step, "prefill" = GEMM steps only, "0" = none. Two switches take it:
/// - `DSPARK_ATTENTION_TC`: which steps run the head-grouped attention on the tensor cores (while
///   TF32 is on). Measured on H200 (8 layers, FP8 KV): an 8K prefill chunk 467 -> 335 ms,
///   batch-1 decode at 8K 2.10 -> 2.01 ms, batch 16 8.99 -> 8.66 ms.
/// - `DSPARK_ATTENTION_F16`: which of those run the f16 form (`dsk_attend_partial_heads_f16*`,
///   f16 MMAs over key tiles decoded once from the raw records) instead of the TF32 one. Both
///   round Q, K = V and P to 10-bit mantissas (the same error bound); rows stored as f32 stay
///   on TF32 (see docs/KERNELS.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AttentionTcSteps {
    Off,
    Prefill,
    All,
}

impl AttentionTcSteps {
    pub(super) fn from_env(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            Some("0") => Self::Off,
            Some("prefill") => Self::Prefill,
            _ => Self::All,
        }
    }

    /// Whether a step of `n` rows is in the set.
    fn takes(self, n: usize) -> bool {
        match self {
            Self::Off => false,
            Self::Prefill => n > STACK_MAX_ROWS,
            Self::All => true,
        }
    }

    /// As stored in the backend's atomic (see [`Self::from_code`]).
    pub(super) fn code(self) -> u8 {
        match self {
            Self::Off => 0,
            Self::Prefill => 1,
            Self::All => 2,
        }
    }

    pub(super) fn from_code(code: u8) -> Self {
        match code {
            0 => Self::Off,
            1 => Self::Prefill,
            _ => Self::All,
        }
    }
}

/// How a step's attention over lists of up to `max_keys` keys runs: head-grouped (a key row read
/// once per [`ATTENTION_HEAD_GROUP`] heads: GEMM steps, long lists, and rows stored in a
/// compact format, which are then decoded once per group instead of once per head) where the
/// heads divide into groups, else one block per head; and its split count.
fn attention_plan(
    max_keys: usize,
    n: usize,
    heads: usize,
    format: KvRowFormat,
    sms: usize,
) -> (bool, usize) {
    let grouped = heads.is_multiple_of(ATTENTION_HEAD_GROUP)
        && (n > STACK_MAX_ROWS || max_keys >= HEAD_GROUPED_MIN_KEYS || format != KvRowFormat::F32);
    let blocks_per_token = if grouped {
        heads / ATTENTION_HEAD_GROUP
    } else {
        heads
    };
    (
        grouped,
        attention_splits(max_keys, n, blocks_per_token, sms),
    )
}

/// Whether `w` runs as GEMV launches on any stream ([`CudaBackend::gemv_rows_on`]).
fn gemv_weight(w: &CudaMatrix) -> bool {
    matches!(w, CudaMatrix::Fp8 { .. } | CudaMatrix::Bf16 { .. })
}

/// A buffer [`CudaBackend::size_scratch`] sized for the step must hold `need` elements (it
/// always does; a step never grows a buffer, which would move it under a captured graph).
pub(super) fn fits(what: &str, len: usize, need: usize) -> Result<(), BackendError> {
    if len < need {
        return Err(shape_err(format!(
            "{what}: {len} elements sized for the step, {need} needed"
        )));
    }
    Ok(())
}

fn comm_err(e: crate::ranks::CommError) -> BackendError {
    BackendError::Other(format!("collective: {e}"))
}

fn shape_err(detail: String) -> BackendError {
    BackendError::Shape {
        op: "layer_stack",
        detail,
    }
}

fn i32_of(v: usize) -> Result<i32, BackendError> {
    i32::try_from(v).map_err(|_| shape_err(format!("{v} exceeds i32")))
}

/// The address of row `row` of a buffer of 4-byte values, `width` a row.
fn rows_at(base: u64, row: usize, width: usize) -> u64 {
    base + (row * width * 4) as u64
}

/// A scratch buffer of 4-byte values (f32 or i32) a split step gathers by rows
/// ([`CudaBackend::gather_split_rows`]).
struct SplitBuffer {
    at: u64,
    /// Values it holds.
    len: usize,
    /// Values a row.
    width: usize,
}

impl SplitBuffer {
    fn of<T>(s: &Arc<CudaStream>, buf: &mut CudaSlice<T>, width: usize) -> Self {
        const { assert!(std::mem::size_of::<T>() == 4) };
        Self {
            at: ptr_mut(s, buf),
            len: buf.len(),
            width,
        }
    }

    /// f16 rows of `width` (even) values, moved as `width / 2` four-byte units.
    fn of_f16(s: &Arc<CudaStream>, buf: &mut CudaSlice<u16>, width: usize) -> Self {
        Self {
            at: ptr_mut(s, buf),
            len: buf.len() / 2,
            width: width / 2,
        }
    }
}

fn ptr<T>(s: &Arc<CudaStream>, b: &CudaSlice<T>) -> u64 {
    b.device_ptr(s).0
}

fn ptr_mut<T>(s: &Arc<CudaStream>, b: &mut CudaSlice<T>) -> u64 {
    b.device_ptr_mut(s).0
}

impl CudaLayerStack {
    /// Turns graph capture off (dropping the graphs) or back on (unless `DSPARK_CUDA_GRAPHS=0`).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs_on = on && graphs_allowed();
        if !self.graphs_on {
            self.graphs.clear();
        }
    }
}

/// A kernel choice from the environment variable `var`, read once into `cell`: its default when
/// unset, and (with a warning) when the value does not parse.
/// A count read once per process from `var` by `parse` (unset included; `Err` carries a value it
/// does not take), which is reported with `what` (what it wants, what is kept) and `fallback`
/// kept. Later calls only read the cell.
fn env_count(
    cell: &'static std::sync::OnceLock<usize>,
    var: &str,
    parse: fn(Option<&str>) -> Result<usize, String>,
    fallback: usize,
    what: impl FnOnce() -> String,
) -> usize {
    *cell.get_or_init(|| {
        parse(std::env::var(var).ok().as_deref()).unwrap_or_else(|bad| {
            tracing::warn!(value = %bad, "{var}: {}", what());
            fallback
        })
    })
}

fn env_kernel<T>(cell: &'static std::sync::OnceLock<T>, var: &str) -> T
where
    T: Copy + Default + std::str::FromStr<Err = String>,
{
    *cell.get_or_init(|| match std::env::var(var) {
        Ok(v) => v.parse().unwrap_or_else(|e: String| {
            tracing::warn!("{var}: {e}; using the default");
            T::default()
        }),
        Err(_) => T::default(),
    })
}

impl CudaBackend {
    fn alloc_f32(&self, len: usize) -> Result<CudaSlice<f32>, BackendError> {
        self.zeros(len)
    }

    fn alloc_i32(&self, len: usize) -> Result<CudaSlice<i32>, BackendError> {
        self.stream
            .alloc_zeros::<i32>(len.max(1))
            .map_err(driver_err("alloc"))
    }

    /// Marks the start of a stage when the stack is being profiled.
    pub(super) fn stage(
        &self,
        clock: &mut Option<StageClock>,
        stage: &'static str,
    ) -> Result<(), BackendError> {
        match clock {
            Some(c) => c.mark(&self.stream, stage),
            None => Ok(()),
        }
    }

    /// [`StackHead`] from the model's head parameters.
    fn stack_head(&self, model: &StackModel<'_, CudaBackend>) -> Result<StackHead, BackendError> {
        let cfg = model.cfg;
        let (h, hc) = (cfg.hidden_size, cfg.hc_mult);
        let (width, outs) = (hc * h, (2 + hc) * hc);
        let head = &model.weights.hc_head;
        if head.fn_.len() != hc * width || head.base.len() != hc || model.weights.norm.len() != h {
            return Err(shape_err(format!(
                "head collapse of {} weights and {} biases, model norm of {}, for hc {hc} and \
                 hidden {h}",
                head.fn_.len(),
                head.base.len(),
                model.weights.norm.len()
            )));
        }
        let mut fn_ = vec![0f32; outs * width];
        fn_[..hc * width].copy_from_slice(&head.fn_);
        let mut base = vec![0f32; outs];
        base[..hc].copy_from_slice(&head.base);
        Ok(StackHead {
            site: HcSite {
                fn_: self.upload(&fn_)?,
                base: self.upload(&base)?,
                scale: [head.scale, 0.0, 0.0],
            },
            norm: self.upload(&model.weights.norm)?,
        })
    }

    fn hc_site(&self, site: &HyperConnection) -> Result<HcSite, BackendError> {
        Ok(HcSite {
            fn_: self.upload(&site.fn_)?,
            base: self.upload(&site.base)?,
            scale: site.scale,
        })
    }

    /// Contiguous f32 copies of per-expert dense matrices, or `None` if any is not dense.
    fn dense_experts(
        &self,
        experts: &[[CudaMatrix; 3]],
    ) -> Result<Option<DenseExperts>, BackendError> {
        let Some([first, ..]) = experts.first() else {
            return Ok(None);
        };
        let (inter, hidden) = first.shape();
        let mut parts: [Vec<&CudaMatrix>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        for e in experts {
            for (which, m) in e.iter().enumerate() {
                let want = if which == 2 {
                    (hidden, inter)
                } else {
                    (inter, hidden)
                };
                match m {
                    CudaMatrix::Dense { rows, cols, .. } | CudaMatrix::Bf16 { rows, cols, .. }
                        if (*rows, *cols) == want =>
                    {
                        parts[which].push(m)
                    }
                    _ => return Ok(None),
                }
            }
        }
        // f32 copies back to back (bf16 ones widened: exact).
        let join = |ps: &[&CudaMatrix]| -> Result<CudaSlice<f32>, BackendError> {
            let each = inter * hidden;
            let mut all = self.alloc_f32(each * ps.len())?;
            for (i, p) in ps.iter().enumerate() {
                match p {
                    CudaMatrix::Dense { w, .. } => self
                        .stream
                        .memcpy_dtod(w, &mut all.slice_mut(i * each..(i + 1) * each))
                        .map_err(driver_err("copy on GPU"))?,
                    CudaMatrix::Bf16 { w, .. } => {
                        let s = &self.stream;
                        let dst = ptr_mut(s, &mut all) + (i * each * 4) as u64;
                        // SAFETY: w holds `each` bf16 values, `all` room for them from `dst`.
                        unsafe { self.kernels.bf16_to_f32(s, ptr(s, w), dst, each) }
                            .map_err(kernel_err)?;
                    }
                    _ => return Err(shape_err("a dense expert changed encoding".into())),
                }
            }
            Ok(all)
        };
        Ok(Some(DenseExperts {
            w1: join(&parts[0])?,
            w3: join(&parts[1])?,
            w2: join(&parts[2])?,
            experts: experts.len(),
            hidden,
            inter,
        }))
    }

    /// The output projection's groups stacked for [`Kernels::fp8_gemv_grouped`], when they are
    /// all FP8 of one shape with whole scale tiles.
    fn stack_wo_a(&self, groups: &[CudaMatrix]) -> Result<Option<StackedFp8>, BackendError> {
        let mut parts = Vec::with_capacity(groups.len());
        let mut shape = None;
        for g in groups {
            match g {
                CudaMatrix::Fp8 {
                    w,
                    scales,
                    rows,
                    cols,
                    ..
                } if rows % 128 == 0 && shape.is_none_or(|s| s == (*rows, *cols)) => {
                    shape = Some((*rows, *cols));
                    parts.push((w, scales));
                }
                _ => return Ok(None),
            }
        }
        if parts.is_empty() {
            return Ok(None);
        }
        let weights: Vec<&CudaSlice<u8>> = parts.iter().map(|p| p.0).collect();
        let scales: Vec<&CudaSlice<u8>> = parts.iter().map(|p| p.1).collect();
        Ok(Some((self.concat(&weights)?, self.concat(&scales)?)))
    }

    fn stack_layer(
        &self,
        lw: &LayerWeights<CudaBackend>,
    ) -> Result<Option<StackLayer>, BackendError> {
        let aw = &lw.attn;
        let mw = &lw.moe;
        // Every matrix must be one the device projections take (not FP4).
        if gemm_matrices(lw)
            .iter()
            .any(|m| matches!(m, CudaMatrix::Fp4 { .. }))
        {
            return Ok(None);
        }
        let dense_experts = match &mw.experts {
            CudaExpertBank::Fp4(_) => None,
            CudaExpertBank::Each(each) => match self.dense_experts(each)? {
                Some(d) => Some(d),
                None => return Ok(None),
            },
        };
        let comp = |c: &crate::engine::model::load::CompressorWeights<CudaBackend>| {
            Ok::<_, BackendError>(CompressorParams {
                ape: self.upload(&c.ape)?,
                norm: self.upload(&c.norm)?,
            })
        };
        let wo_a_stacked = self.stack_wo_a(&aw.wo_a)?;
        Ok(Some(StackLayer {
            wo_a_stacked,
            attn_norm: self.upload(&lw.attn_norm)?,
            ffn_norm: self.upload(&lw.ffn_norm)?,
            q_norm: self.upload(&aw.q_norm)?,
            kv_norm: self.upload(&aw.kv_norm)?,
            sinks: self.upload(&aw.sinks)?,
            hc_attn: self.hc_site(&lw.hc_attn)?,
            hc_ffn: self.hc_site(&lw.hc_ffn)?,
            compressor: aw.compressor.as_ref().map(comp).transpose()?,
            indexer: aw
                .indexer
                .as_ref()
                .map(|i| comp(&i.compressor))
                .transpose()?,
            routes: match &mw.routing {
                Routing::TopK(bias) => RouteTable::Bias(self.upload(bias)?),
                Routing::Hash(table) => {
                    let t: Vec<i32> = table
                        .iter()
                        .map(|&e| i32::try_from(e).unwrap_or(i32::MAX))
                        .collect();
                    RouteTable::Hash(self.upload(&t)?)
                }
            },
            dense_experts,
        }))
    }

    /// A step's buffers for up to `rows` rows; `gemm` adds those only GEMM steps use.
    fn new_scratch(
        &self,
        d: &ScratchDims,
        rows: usize,
        gemm: bool,
    ) -> Result<Scratch, BackendError> {
        let pairs = rows * d.topk;
        let only_gemm = |len: usize| if gemm { len } else { 1 };
        // Grown on first use if the widened path runs after all (e.g. TF32 turned off later).
        let only_widened = |len: usize| if d.widened_experts { only_gemm(len) } else { 1 };
        Ok(Scratch {
            rows,
            streams: self.alloc_f32(rows * d.width)?,
            hc_work: self.alloc_f32(hc_mix_workspace_floats(rows, d.hc_outs))?,
            hc_squares_of: None,
            hc_pre_done: None,
            comb_on_side: false,
            mix: self.alloc_f32(rows * d.hc_outs)?,
            x: self.alloc_f32(rows * d.hidden)?,
            x_f16: self
                .stream
                .alloc_zeros::<u16>(only_gemm(rows * d.hidden))
                .map_err(driver_err("alloc"))?,
            q_lora: self.alloc_f32(rows * d.q_lora)?,
            kv: self.alloc_f32(rows * d.head_dim)?,
            comp_kv: self.alloc_f32(rows * 2 * d.head_dim)?,
            comp_gate: self.alloc_f32(rows * 2 * d.head_dim)?,
            idx_kv: self.alloc_f32(rows * 2 * d.index_dim)?,
            idx_gate: self.alloc_f32(rows * 2 * d.index_dim)?,
            idx_weights: self.alloc_f32(rows * d.index_heads)?,
            q: self.alloc_f32(rows * d.heads * d.head_dim)?,
            idx_q: self.alloc_f32(rows * d.index_heads * d.index_dim)?,
            attn: self.alloc_f32(rows * d.heads * d.head_dim)?,
            group_in: self.alloc_f32(rows * d.group_in)?,
            group_out: self.alloc_f32(rows * d.o_lora)?,
            grouped: self.alloc_f32(rows * d.groups * d.o_lora)?,
            sub_out: self.alloc_f32(rows * d.hidden)?,
            router_logits: self.alloc_f32(rows * d.experts)?,
            route_ids: self.alloc_i32(pairs)?,
            route_weights: self.alloc_f32(pairs)?,
            expert_h: self.alloc_f32(pairs * d.inter)?,
            expert_partial: self.alloc_f32(pairs * d.hidden)?,
            shared_gate: self.alloc_f32(rows * d.shared_inter)?,
            shared_up: self.alloc_f32(rows * d.shared_inter)?,
            shared_act: self.alloc_f32(rows * d.shared_inter)?,
            shared_down: self.alloc_f32(rows * d.hidden)?,
            sel_idx: self.alloc_i32(rows * d.index_topk)?,
            sel_val: self.alloc_f32(rows * d.index_topk)?,
            scores: self.alloc_f32(1 << 16)?,
            key_offsets: self
                .stream
                .alloc_zeros::<i64>(1 << 16)
                .map_err(driver_err("alloc"))?,
            attn_work: self.alloc_f32(1 << 16)?,
            topk_work: self.alloc_f32(1 << 10)?,
            share_top: self.alloc_f32(1)?,
            shares_gathered: self.alloc_f32(1)?,
            captures: Vec::new(),
            gemm: GemmScratch {
                wide: self.alloc_f32(only_gemm(d.widest))?,
                x_half: self
                    .stream
                    .alloc_zeros::<u16>(only_gemm(rows * d.widest_cols))
                    .map_err(driver_err("alloc"))?,
                x_half_of: None,
                experts_wide: self.alloc_f32(only_widened(
                    super::gemm_step::expert_group_floats(d.experts, d.inter, d.hidden),
                ))?,
                x_sorted: self.alloc_f32(only_gemm(pairs * d.hidden))?,
                gate: self.alloc_f32(only_widened(pairs * d.inter))?,
                up: self.alloc_f32(only_widened(pairs * d.inter))?,
                tokens: self.alloc_i32(only_gemm(pairs))?,
                slots: self.alloc_i32(only_gemm(pairs))?,
                experts: self.alloc_i32(only_gemm(d.experts))?,
                tiles: self.alloc_i32(only_gemm(
                    4 * dspark_kernels::launch::moe_grouped::fp4_grouped_max_tiles(
                        pairs, d.experts,
                    ),
                ))?,
                gemm_ptrs: self
                    .stream
                    .alloc_zeros::<u64>(only_gemm(6 * d.experts))
                    .map_err(driver_err("alloc"))?,
            },
        })
    }

    /// Builds the layer stack, or `None` when a layer uses an encoding the device path does not
    /// take (it then runs op by op).
    pub(super) fn build_layer_stack(
        &self,
        model: &StackModel<'_, CudaBackend>,
    ) -> Result<Option<CudaLayerStack>, BackendError> {
        let mut layers = Vec::with_capacity(model.weights.layers.len());
        for (l, lw) in model.weights.layers.iter().enumerate() {
            match self.stack_layer(lw)? {
                Some(layer) => layers.push(layer),
                None => {
                    tracing::info!(
                        layer = l,
                        "layer stack off: a layer's weights are in an encoding only the \
                         op-by-op path takes"
                    );
                    return Ok(None);
                }
            }
        }
        let dims = ScratchDims::of(model);
        let scratch = self.new_scratch(&dims, STACK_MAX_ROWS, false)?;
        let stack = CudaLayerStack {
            // Made now, not at the first prefill, so a GPU without room for it fails at start
            // with the allocation error rather than in the middle of serving.
            gemm_scratch: self.new_scratch(&dims, self.gemm_piece_rows_max(), true)?,
            layers,
            rope_main: self.upload(&model.rope_main.inv_freq)?,
            rope_compress: self.upload(&model.rope_compress.inv_freq)?,
            scratch,
            clock: std::env::var("DSPARK_STACK_PROFILE")
                .is_ok_and(|v| v == "1")
                .then(StageClock::default),
            graphs_on: graphs_allowed(),
            graphs: Vec::new(),
            uses: 0,
            meta32: self.alloc_i32(MetaLayout::GRAPHED.tables() + META_TABLE_ROOM)?,
            meta64: self
                .stream
                .alloc_zeros::<i64>(MetaLayout::GRAPHED.i64_len())
                .map_err(driver_err("alloc"))?,
            // A device that cannot make the stream runs every launch on the main one.
            side: SideBranch::new(&self.stream)
                .inspect_err(|e| tracing::warn!(error = %e, "no side stream; one stream"))
                .ok(),
            head: self.stack_head(model)?,
            head_logits: self.alloc_f32(
                model.shard.world_size * HC_SEAM_MAX_TOKENS * model.weights.head.shape().0,
            )?,
        };
        self.stream
            .synchronize()
            .map_err(driver_err("synchronize"))?;
        Ok(Some(stack))
    }

    /// Packs the row table: positions, token ids, block table starts and lengths (rows of one
    /// sequence share one table, packed once after the layout's `tables()`).
    fn pack_rows(meta: &mut MetaBuilder, rows: &StackRows<'_>) -> Result<(), BackendError> {
        let positions: Vec<i32> = rows
            .positions
            .iter()
            .map(|&p| i32_of(p))
            .collect::<Result<_, _>>()?;
        let ids: Vec<i32> = rows
            .ids
            .iter()
            .map(|&t| i32::try_from(t).unwrap_or(i32::MAX))
            .collect();
        let mut starts = Vec::with_capacity(rows.ids.len());
        let mut lens = Vec::with_capacity(rows.ids.len());
        let mut last: Option<(*const u32, usize, usize)> = None;
        for (bt, rt) in rows.block_tables.iter().zip(&rows.recent_tables) {
            let key = (bt.as_ptr(), bt.len());
            match last {
                Some((p, l, at)) if (p, l) == key => starts.push(i32_of(at)?),
                _ => {
                    let at = meta.i32s.len() - meta.layout.tables();
                    starts.push(i32_of(at)?);
                    last = Some((key.0, key.1, at));
                    // Block ids are below the pool's block count, itself an i32-sized count
                    // (checked by the caller): the bit pattern is the u32 the kernels read
                    // (u32::MAX, a released recent block, stays u32::MAX). The recent table
                    // follows its block table (paged.cu).
                    meta.i32s.extend(bt.iter().map(|&b| b as i32));
                    meta.i32s.extend(rt.iter().map(|&r| r as i32));
                }
            }
            lens.push(i32_of(bt.len())?);
        }
        let lay = meta.layout;
        meta.put32(lay.positions(), &positions);
        meta.put32(lay.ids(), &ids);
        meta.put32(lay.bt_starts(), &starts);
        meta.put32(lay.bt_lens(), &lens);
        Ok(())
    }

    /// Packs key class `c`'s starts; returns its total and longest list.
    #[allow(clippy::too_many_arguments)]
    fn pack_keys(
        meta: &mut MetaBuilder,
        c: usize,
        positions: &[usize],
        window: usize,
        mode: KeyMode,
        ratio: usize,
        topk: usize,
    ) -> Result<(usize, usize), BackendError> {
        let counts = key_counts(positions, window, ratio.max(1), mode, topk);
        let mut starts = Vec::with_capacity(counts.len() + 1);
        let mut at = 0usize;
        starts.push(0);
        for &k in &counts {
            at += k;
            starts.push(i32_of(at)?);
        }
        meta.put32(meta.layout.keys(c), &starts);
        Ok((at, counts.iter().copied().max().unwrap_or(0)))
    }

    /// Packs indexer class `c`: visible and selected counts, score starts.
    /// With `split` (ranks, rank, levels), also this rank's share of each row's indexer rows and
    /// the candidates of rank 0 and of every rank together that the merge takes: each share's top
    /// k, or its select's candidates after `levels` rounds ([`SharePlan::levels`]).
    fn pack_indexer(
        meta: &mut MetaBuilder,
        c: usize,
        positions: &[usize],
        ratio: usize,
        topk: usize,
        split: Option<(usize, usize, usize)>,
    ) -> Result<(), BackendError> {
        let room = meta.layout.room;
        let visible: Vec<usize> = positions.iter().map(|&p| (p + 1) / ratio).collect();
        let mut total = 0i64;
        for (r, &v) in visible.iter().enumerate() {
            meta.i64s[2 * c * room + r] = total;
            if let Some((ranks, rank, _)) = split {
                let (start, _) = indexer_row_share(v, topk, ranks, rank);
                meta.i64s[(2 * c + 1) * room + r] = total + start as i64;
            }
            total += v as i64;
        }
        if let Some((ranks, rank, levels)) = split {
            let mut per_rank = Vec::with_capacity(visible.len());
            let mut starts = Vec::with_capacity(visible.len());
            let mut ends = Vec::with_capacity(visible.len());
            let mut counts = Vec::with_capacity(visible.len());
            let mut candidates = Vec::with_capacity(visible.len());
            for &v in &visible {
                let (start, end) = indexer_row_share(v, topk, ranks, rank);
                starts.push(i32_of(start)?);
                ends.push(i32_of(end)?);
                counts.push(i32_of(end - start)?);
                let (first, all) = indexer_rank_candidates(v, topk, ranks, levels);
                per_rank.push(i32_of(first)?);
                candidates.push(i32_of(all)?);
            }
            let at = meta.layout.index(c);
            meta.put32(at + 2 * room, &starts);
            meta.put32(at + 3 * room, &ends);
            meta.put32(at + 4 * room, &counts);
            meta.put32(at + 5 * room, &candidates);
            meta.put32(at + 6 * room, &per_rank);
        }
        let vis: Vec<i32> = visible
            .iter()
            .map(|&v| i32_of(v))
            .collect::<Result<_, _>>()?;
        let sel: Vec<i32> = visible
            .iter()
            .map(|&v| i32_of(v.min(topk)))
            .collect::<Result<_, _>>()?;
        let at = meta.layout.index(c);
        meta.put32(at, &vis);
        meta.put32(at + meta.layout.room, &sel);
        Ok(())
    }

    /// Sum over ranks of `len` floats of `buf`: NCCL on this stream when the communicator is
    /// NCCL on the same stream, else through the host.
    fn stack_all_reduce(
        &self,
        comm: &dyn Communicator,
        buf: &mut CudaSlice<f32>,
        len: usize,
    ) -> Result<(), BackendError> {
        if comm.world_size() <= 1 || len == 0 {
            return Ok(());
        }
        let comm_err = |e: crate::ranks::CommError| BackendError::Other(format!("all-reduce: {e}"));
        if let Some(nccl) = self.stream_nccl(comm) {
            fits("all-reduce buffer", buf.len(), len)?;
            // Decode-sized sums: one kernel over the peer's memory, a few microseconds where
            // NCCL's launch and protocol take ~12 (two a layer).
            if let Some(link) = nccl.peer_link().filter(|l| l.fits(len)) {
                let at = ptr_mut(&self.stream, buf);
                // SAFETY: `buf` holds at least `len` f32 (checked); the link's regions live as
                // long as the communicator, which the model holds past its stream's work; every
                // rank runs this call in the same order with the same `len`, on the stream the
                // communicator serves.
                unsafe {
                    self.kernels
                        .peer_all_reduce2(&self.stream, &link.all_reduce(at, at, len))
                }
                .map_err(kernel_err)?;
                self.peer_all_reduces.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            return nccl
                .all_reduce_sum_device(&mut buf.slice_mut(0..len))
                .map_err(comm_err);
        }
        let mut host = vec![0f32; len];
        self.stream
            .memcpy_dtoh(&buf.slice(0..len), &mut host)
            .map_err(driver_err("copy from GPU"))?;
        self.stream
            .synchronize()
            .map_err(driver_err("synchronize"))?;
        comm.all_reduce_sum(&mut host).map_err(comm_err)?;
        self.stream
            .memcpy_htod(&host, &mut buf.slice_mut(0..len))
            .map_err(driver_err("copy to GPU"))
    }

    /// Every rank's `len` floats of `send` from `from`, in rank order, into `recv`: NCCL on this
    /// stream when the communicator is NCCL on the same stream, else through the host.
    fn stack_all_gather(
        &self,
        comm: &dyn Communicator,
        send: &CudaSlice<f32>,
        from: usize,
        len: usize,
        recv: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        let ranks = comm.world_size();
        fits("all-gather receive buffer", recv.len(), ranks * len)?;
        let comm_err = |e: crate::ranks::CommError| BackendError::Other(format!("all-gather: {e}"));
        if let Some(nccl) = self.stream_nccl(comm) {
            return nccl
                .all_gather_device(
                    &send.slice(from..from + len),
                    &mut recv.slice_mut(0..ranks * len),
                )
                .map_err(comm_err);
        }
        let mut host = vec![0f32; len];
        self.stream
            .memcpy_dtoh(&send.slice(from..from + len), &mut host)
            .map_err(driver_err("copy from GPU"))?;
        self.stream
            .synchronize()
            .map_err(driver_err("synchronize"))?;
        let all = comm.all_gather(&host).map_err(comm_err)?;
        fits("all-gather result", ranks * len, all.len())?;
        self.stream
            .memcpy_htod(&all, &mut recv.slice_mut(0..all.len()))
            .map_err(driver_err("copy to GPU"))
    }

    /// A split step's ([`HcRows`]) in-place collective over `buf` (`width` values a row): the
    /// NCCL communicator (split steps are only made with one on this stream), the buffer's
    /// address and one rank's share in floats, the buffer checked to hold every rank's.
    fn split_share<'c>(
        &self,
        comm: &'c dyn Communicator,
        buf: &mut CudaSlice<f32>,
        width: usize,
        rows: HcRows,
        what: &str,
    ) -> Result<(&'c NcclCommunicator, u64, usize), BackendError> {
        let share = rows.share * width;
        fits(what, buf.len(), comm.world_size() * share)?;
        Ok((self.split_nccl(comm)?, ptr_mut(&self.stream, buf), share))
    }

    /// The NCCL communicator of a split step ([`HcRows`]): split steps are only made with one
    /// on this stream.
    fn split_nccl<'c>(
        &self,
        comm: &'c dyn Communicator,
    ) -> Result<&'c NcclCommunicator, BackendError> {
        self.stream_nccl(comm).ok_or_else(|| {
            BackendError::Other("a split step without NCCL on the backend's stream".into())
        })
    }

    /// A split step's ([`HcRows`]) every rank's rows of `width` values of `buf` to every rank,
    /// in place; nothing for a whole step.
    fn gather_hc_rows(
        &self,
        comm: &dyn Communicator,
        buf: &mut CudaSlice<f32>,
        width: usize,
        rows: HcRows,
    ) -> Result<(), BackendError> {
        if !rows.is_split() {
            return Ok(());
        }
        let buf = SplitBuffer::of(&self.stream, buf, width);
        self.gather_split_rows(comm, rows, &[buf])
    }

    /// `y = x W^T` for each job over a split step's own rows ([`HcRows`]) only, each output at
    /// the same rows (GEMMs at any row count, as a whole GEMM step's projections are).
    fn own_rows_linear_many(
        &self,
        x: &CudaSlice<f32>,
        rows: HcRows,
        jobs: &mut [(&CudaMatrix, &mut CudaSlice<f32>)],
        g: &mut GemmScratch,
    ) -> Result<(), BackendError> {
        let s = &self.stream;
        let end = rows.start + rows.len;
        // Every job reads the same rows of x: one f16 copy of them serves all.
        g.x_half_of = None;
        for (w, y) in jobs.iter_mut() {
            let (outs, cols) = w.shape();
            fits("projection input rows", x.len(), end * cols)?;
            fits("projection output rows", y.len(), end * outs)?;
            if rows.len == 0 {
                continue;
            }
            let xp = rows_at(ptr(s, x), rows.start, cols);
            let yp = rows_at(ptr_mut(s, *y), rows.start, outs);
            // SAFETY: x holds rows.start + rows.len rows of cols and y as many of outs (checked
            // above), both scratch of this stream.
            unsafe { self.gemm_linear(xp, cols, rows.len, w, yp, outs, g, true) }?;
        }
        g.x_half_of = None;
        Ok(())
    }

    /// Whether a split step's ([`HcRows`]) feed-forward sub-layer gathers its input as f16
    /// ([`Scratch::x_f16`]): every reader after the gather must round it so (the shared expert's
    /// gate and up on the f16 GEMM, the routed experts on the grouped kernels that gather their
    /// own rows), and the scratch must hold every rank's rows.
    fn ffn_takes_f16_rows(
        &self,
        mw: &MoeWeights<CudaBackend>,
        sc: &Scratch,
        h: usize,
        ranks: usize,
        rows: HcRows,
    ) -> bool {
        let routed = match &mw.experts {
            CudaExpertBank::Fp4(b) => b.hidden == h && self.experts_take_f16_rows(b),
            _ => false,
        };
        self.ffn_gather_f16.load(Ordering::Relaxed)
            && routed
            && h.is_multiple_of(32)
            && self.takes_f16_input(&mw.shared.w1)
            && self.takes_f16_input(&mw.shared.w3)
            && sc.x_f16.len() >= ranks * rows.share * h
    }

    /// A split step's ([`HcRows`]) every rank's rows of each buffer to every rank, in place, as
    /// one NCCL group.
    fn gather_split_rows(
        &self,
        comm: &dyn Communicator,
        rows: HcRows,
        bufs: &[SplitBuffer],
    ) -> Result<(), BackendError> {
        self.gather_split_rows_on(&self.stream, comm, rows, bufs)
    }

    /// [`Self::gather_split_rows`] enqueued on `on` (the backend's stream or the side one). A
    /// collective on the side stream must have run before the main stream calls the next one:
    /// the main stream waits for a side mark after it first.
    fn gather_split_rows_on(
        &self,
        on: &CudaStream,
        comm: &dyn Communicator,
        rows: HcRows,
        bufs: &[SplitBuffer],
    ) -> Result<(), BackendError> {
        let ranks = comm.world_size();
        let nccl = self.split_nccl(comm)?;
        let mut shares = Vec::with_capacity(bufs.len());
        for b in bufs {
            fits("all-gather buffer", b.len, ranks * rows.share * b.width)?;
            shares.push((b.at, rows.share * b.width));
        }
        // SAFETY: every buffer holds ranks * share rows of its width (checked above), is
        // scratch of the stack alive past the stream's work on it, and they are distinct.
        unsafe { nccl.all_gather_many_in_place_f32_on(on, &shares) }.map_err(comm_err)
    }

    /// A sub-layer's output (`width` values a row) summed over the ranks: reduce-scattered onto
    /// each rank's rows in a split step ([`HcRows`]), else all-reduced over all of them.
    fn reduce_sub_out(
        &self,
        comm: &dyn Communicator,
        buf: &mut CudaSlice<f32>,
        width: usize,
        rows: HcRows,
    ) -> Result<(), BackendError> {
        if !rows.is_split() {
            return self.stack_all_reduce(comm, buf, rows.len * width);
        }
        let (nccl, at, share) =
            self.split_share(comm, buf, width, rows, "reduce-scatter buffer")?;
        // SAFETY: as in gather_hc_rows.
        unsafe { nccl.reduce_scatter_in_place_f32(at, share) }.map_err(comm_err)
    }

    /// `y = x W^T` between scratch buffers: GEMVs on the packed weights up to
    /// [`STACK_MAX_ROWS`] rows, else one GEMM on the weight widened into `g`
    /// (`CudaBackend::gemm_linear`; `reuse_x` as there).
    fn stack_linear(
        &self,
        x: &CudaSlice<f32>,
        n: usize,
        w: &CudaMatrix,
        y: &mut CudaSlice<f32>,
        g: &mut GemmScratch,
        reuse_x: bool,
    ) -> Result<(), BackendError> {
        let (rows, cols) = w.shape();
        if x.len() < n * cols || y.len() < n * rows {
            return Err(shape_err(format!(
                "projection [{rows}, {cols}] of {n} rows does not fit its buffers"
            )));
        }
        if n > STACK_MAX_ROWS {
            let s = &self.stream;
            let (xp, yp) = (ptr(s, x), ptr_mut(s, y));
            // SAFETY: x holds n rows of cols and y n rows of rows f32 (checked above).
            return unsafe { self.gemm_linear(xp, cols, n, w, yp, rows, g, reuse_x) };
        }
        // FP8 weights stay packed (GEMV in 16-row chunks): widening would allocate.
        self.linear_on_with(
            &x.slice(0..n * cols),
            n,
            w,
            &mut y.slice_mut(0..n * rows),
            false,
        )
    }

    /// `y = x W^T` for several matrices reading the same `x` (see [`Self::stack_linear`]). A
    /// one-row step runs the FP8 ones as one launch and the bf16 ones as another
    /// ([`dspark_kernels::Kernels::gemv_multi`]: the same bits as a launch each); other steps,
    /// and matrices alone of their kind, go through [`Self::stack_linear`].
    fn stack_linear_many(
        &self,
        x: &CudaSlice<f32>,
        n: usize,
        jobs: &mut [(&CudaMatrix, &mut CudaSlice<f32>)],
        g: &mut GemmScratch,
    ) -> Result<(), BackendError> {
        let merged = self.gemv_multi_jobs(&self.stream, x, n, jobs)?;
        // The outputs are other buffers than x: its f16 copy serves every job (none left over
        // from an earlier input).
        g.x_half_of = None;
        for ((w, y), done) in jobs.iter_mut().zip(merged) {
            if !done {
                self.stack_linear(x, n, w, y, g, true)?;
            }
        }
        g.x_half_of = None;
        Ok(())
    }

    /// [`Self::stack_linear_many`] on `on` (a stream beside the backend's) for steps of up to
    /// [`STACK_MAX_ROWS`] rows whose matrices are all FP8 or bf16: the same launches, so the
    /// same bits.
    fn linear_many_on(
        &self,
        on: &CudaStream,
        x: &CudaSlice<f32>,
        n: usize,
        jobs: &mut [(&CudaMatrix, &mut CudaSlice<f32>)],
    ) -> Result<(), BackendError> {
        let merged = self.gemv_multi_jobs(on, x, n, jobs)?;
        for ((w, y), done) in jobs.iter_mut().zip(merged) {
            if done {
                continue;
            }
            let (rows, cols) = w.shape();
            if n > STACK_MAX_ROWS || x.len() < n * cols || y.len() < n * rows {
                return Err(shape_err(format!(
                    "projection [{rows}, {cols}] of {n} rows does not fit its buffers"
                )));
            }
            let (xp, yp) = (ptr(&self.stream, x), ptr_mut(&self.stream, *y));
            // SAFETY: x holds n rows of cols and y n rows of rows f32 (checked above).
            if !unsafe { self.gemv_rows_on(on, w, xp, n, yp) }? {
                return Err(shape_err(format!(
                    "projection [{rows}, {cols}] has no GEMV for a second stream"
                )));
            }
        }
        Ok(())
    }

    /// The jobs of [`Self::stack_linear_many`] that a one-row step runs as one launch per
    /// weight kind ([`dspark_kernels::Kernels::gemv_multi`]) on `on`, launched; `true` where
    /// merged so.
    fn gemv_multi_jobs(
        &self,
        on: &CudaStream,
        x: &CudaSlice<f32>,
        n: usize,
        jobs: &mut [(&CudaMatrix, &mut CudaSlice<f32>)],
    ) -> Result<Vec<bool>, BackendError> {
        let mut merged = vec![false; jobs.len()];
        if n == 1 && self.gemv_multi {
            let s = &self.stream;
            for kind in [SegmentWeights::Fp8, SegmentWeights::Bf16] {
                let mut segs = Vec::with_capacity(jobs.len());
                let mut members = Vec::with_capacity(jobs.len());
                let mut cols_of = None;
                for (i, (w, y)) in jobs.iter_mut().enumerate() {
                    let (rows, cols) = w.shape();
                    let (weight, scale) = match (kind, &**w) {
                        (SegmentWeights::Fp8, CudaMatrix::Fp8 { w, scales, .. }) => {
                            (ptr(s, w), ptr(s, scales))
                        }
                        (SegmentWeights::Bf16, CudaMatrix::Bf16 { w, .. }) => (ptr(s, w), 0),
                        _ => continue,
                    };
                    if x.len() < cols || y.len() < rows || *cols_of.get_or_insert(cols) != cols {
                        continue;
                    }
                    segs.push(GemvSegment {
                        weight,
                        scale,
                        out: ptr_mut(s, *y),
                        rows,
                    });
                    members.push(i);
                }
                if segs.len() < 2 || segs.len() > GEMV_MAX_SEGMENTS {
                    continue;
                }
                let k = cols_of.unwrap_or(0);
                // SAFETY: every segment's weight holds [rows, k] of its kind (with its tiles),
                // its output at least `rows` f32, x at least k (checked above); the outputs are
                // distinct scratch buffers, none of them x.
                unsafe { self.kernels.gemv_multi(on, kind, &segs, ptr(s, x), k) }
                    .map_err(kernel_err)?;
                members.iter().for_each(|&i| merged[i] = true);
            }
        }
        Ok(merged)
    }

    /// A decode step's shared expert on `on` (gate and up, the clipped SwiGLU, down) into
    /// `sc.shared_down`: the launches of [`Self::stack_ffn`]'s own path, on another stream.
    fn shared_expert_on(
        &self,
        on: &CudaStream,
        sc: &mut Scratch,
        sh: &ExpertWeights<CudaBackend>,
        n: usize,
        limit: f32,
    ) -> Result<(), BackendError> {
        let inter = sh.w1.shape().0;
        self.linear_many_on(
            on,
            &sc.x,
            n,
            &mut [(&sh.w1, &mut sc.shared_gate), (&sh.w3, &mut sc.shared_up)],
        )?;
        let s = &self.stream;
        let (g, u, a) = (
            ptr(s, &sc.shared_gate),
            ptr(s, &sc.shared_up),
            ptr_mut(s, &mut sc.shared_act),
        );
        fits("shared expert activations", sc.shared_act.len(), n * inter)?;
        // SAFETY: gate, up and act hold n rows of the shared expert's inter size.
        unsafe { self.kernels.swiglu_clip(on, g, u, a, n * inter, limit) }.map_err(kernel_err)?;
        self.linear_many_on(on, &sc.shared_act, n, &mut [(&sh.w2, &mut sc.shared_down)])
    }

    /// The layer stack over one step (see [`crate::backend::Backend::run_layer_stack`]). Steps
    /// of up to [`STACK_MAX_ROWS`] rows run whole, as CUDA graphs where allowed; larger ones
    /// (prefill chunks) run as GEMM steps in pieces of at most [`gemm_piece_rows`] rows, one
    /// after another: a piece's rows see the KV every earlier piece wrote, exactly as the next
    /// chunk of a chunked prefill does.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_stack(
        &self,
        stack: &mut CudaLayerStack,
        model: &StackModel<'_, CudaBackend>,
        kv: &mut CudaKvStore,
        comm: &dyn Communicator,
        rows: &StackRows<'_>,
        mut streams: StackStreams<'_>,
        capture: &[usize],
    ) -> Result<Vec<(usize, Vec<f32>)>, BackendError> {
        let cfg = model.cfg;
        let n = rows.ids.len();
        let (h, hc) = (cfg.hidden_size, cfg.hc_mult);
        let width = hc * h;
        if n == 0 {
            return Ok(Vec::new());
        }
        let streams_ok =
            streams.kept.len() == streams.keep.len() * width && streams.keep.iter().all(|&r| r < n);
        if !streams_ok
            || rows.positions.len() != n
            || rows.block_tables.len() != n
            || rows.recent_tables.len() != n
        {
            return Err(shape_err(format!(
                "{n} rows ({} positions, {} tables, {} recent tables), streams that do not \
                 match them",
                rows.positions.len(),
                rows.block_tables.len(),
                rows.recent_tables.len(),
            )));
        }
        let (vocab, cols) = model.weights.embed.shape();
        if cols != h {
            return Err(shape_err(format!(
                "embedding rows of {cols} values for a hidden size of {h}"
            )));
        }
        if let Some(id) = rows.ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(shape_err(format!(
                "token id {id} of {vocab} embedding rows"
            )));
        }
        // Every row's pool rows must lie inside its tables and the pool (the kernels trust
        // them): its block table covers it, its recent table names a recent block for every
        // block of its last `recent_reach` positions, and every id is inside the pool.
        let pool = model.pool;
        let g = &pool.geometry;
        if pool.floats() > kv.len {
            return Err(shape_err(format!(
                "a pool of {} slots for a layout of {}",
                kv.len,
                pool.floats()
            )));
        }
        if pool.num_blocks.max(pool.num_recent) > i32::MAX as usize {
            return Err(shape_err("more pool blocks than i32 block ids".into()));
        }
        for ((&p, bt), rt) in rows
            .positions
            .iter()
            .zip(&rows.block_tables)
            .zip(&rows.recent_tables)
        {
            let need = p / g.block_size + 1;
            let first = g.first_recent_block(p);
            let covered = bt.len() >= need
                && rt.len() == bt.len()
                && bt[..need].iter().all(|&b| (b as usize) < pool.num_blocks)
                && rt[first..need]
                    .iter()
                    .all(|&r| (r as usize) < pool.num_recent);
            if !covered {
                return Err(shape_err(format!(
                    "position {p}: block table of {} blocks (recent table of {}) does not cover \
                     it inside the pool",
                    bt.len(),
                    rt.len()
                )));
            }
        }
        if n <= STACK_MAX_ROWS {
            let piece = PieceStreams::of(&mut streams, 0, n, true);
            return self.run_piece(stack, model, kv, comm, rows, piece, capture);
        }
        let max_pos = rows.positions.iter().copied().max().unwrap_or(0);
        let piece = gemm_piece_rows(context_bucket(max_pos), cfg, stack.gemm_scratch.rows);
        let mut captured: Vec<(usize, Vec<f32>)> = capture
            .iter()
            .map(|&l| (l, Vec::with_capacity(n * h)))
            .collect();
        for (start, len) in super::row_chunks(n, piece) {
            let range = start..start + len;
            let part = StackRows {
                positions: rows.positions[range.clone()].to_vec(),
                ids: rows.ids[range.clone()].to_vec(),
                block_tables: rows.block_tables[range.clone()].to_vec(),
                recent_tables: rows.recent_tables[range].to_vec(),
            };
            let piece = PieceStreams::of(&mut streams, start, len, false);
            let got = self.run_piece(stack, model, kv, comm, &part, piece, capture)?;
            for ((_, all), (_, rows_of_piece)) in captured.iter_mut().zip(got) {
                all.extend(rows_of_piece);
            }
        }
        Ok(captured)
    }

    /// The residual streams of the step's `rows` made on the device (the stack's `streams`
    /// scratch): each row's embedding gathered by its id (`ids`: the step's i32 ids on the
    /// device) into the scratch `x`, then copied into each of the `hc` streams. The same f32
    /// values the host path uploads (the same gather kernel).
    fn embed_streams(
        &self,
        sc: &mut Scratch,
        model: &StackModel<'_, CudaBackend>,
        ids: u64,
        rows: HcRows,
    ) -> Result<(), BackendError> {
        let s = &self.stream;
        let (h, hc) = (model.cfg.hidden_size, model.cfg.hc_mult);
        let (first, n) = (rows.start, rows.len);
        // New streams: no post's squares describe them, no seam ran the next pre.
        sc.hc_squares_of = None;
        sc.hc_pre_done = None;
        fits("stack x rows", sc.x.len(), (first + n) * h)?;
        fits("stack streams", sc.streams.len(), (first + n) * hc * h)?;
        let ids = ids + (first * 4) as u64;
        let x = ptr_mut(s, &mut sc.x) + (first * h * 4) as u64;
        match &model.weights.embed {
            // SAFETY: the embedding holds rows * cols values with cols == h (checked by
            // run_stack, as every id below rows); x has room for n rows of h.
            CudaMatrix::Bf16 { w, rows, cols } => unsafe {
                self.kernels
                    .gather_rows_bf16(s, ptr(s, w), ids, x, n, *cols, *rows)
            }
            .map_err(kernel_err)?,
            // SAFETY: as above.
            CudaMatrix::Dense { w, cols, .. } => unsafe {
                self.kernels
                    .gather_rows(s, GatherInto::F32, ptr(s, w), ids, n, *cols, x)
            }
            .map_err(kernel_err)?,
            CudaMatrix::Fp8 { .. } | CudaMatrix::Fp4 { .. } => {
                return Err(shape_err(
                    "the embedding must be bf16 or f32 (it is bf16 in the checkpoint)".into(),
                ))
            }
        }
        let streams = ptr_mut(s, &mut sc.streams) + (first * hc * h * 4) as u64;
        for k in 0..hc {
            let copy = CopyRowsF32 {
                src: x,
                ld_src: h,
                dst: streams + (k * h * 4) as u64,
                ld_dst: hc * h,
                rows: n,
                width: h,
            };
            // SAFETY: x holds n rows of h, the streams n rows of hc * h (both checked above).
            unsafe { self.kernels.copy_rows_f32(s, &copy) }.map_err(kernel_err)?;
        }
        Ok(())
    }

    /// One piece of a step (checked by [`Self::run_stack`]): up to [`STACK_MAX_ROWS`] rows on
    /// the graphed scratch, more on the GEMM scratch (swapped in for the piece).
    #[allow(clippy::too_many_arguments)]
    fn run_piece(
        &self,
        stack: &mut CudaLayerStack,
        model: &StackModel<'_, CudaBackend>,
        kv: &mut CudaKvStore,
        comm: &dyn Communicator,
        rows: &StackRows<'_>,
        streams: PieceStreams<'_>,
        capture: &[usize],
    ) -> Result<Vec<(usize, Vec<f32>)>, BackendError> {
        let n = rows.ids.len();
        if n <= STACK_MAX_ROWS {
            return self.run_rows(stack, model, kv, comm, rows, streams, capture);
        }
        // Pieces are at most gemm_piece_rows_max rows, what the GEMM scratch was made for.
        fits("GEMM scratch rows", stack.gemm_scratch.rows, n)?;
        std::mem::swap(&mut stack.scratch, &mut stack.gemm_scratch);
        let out = self.run_rows(stack, model, kv, comm, rows, streams, capture);
        std::mem::swap(&mut stack.scratch, &mut stack.gemm_scratch);
        out
    }

    /// [`Self::run_piece`] on the scratch in place.
    #[allow(clippy::too_many_arguments)]
    fn run_rows(
        &self,
        stack: &mut CudaLayerStack,
        model: &StackModel<'_, CudaBackend>,
        kv: &mut CudaKvStore,
        comm: &dyn Communicator,
        rows: &StackRows<'_>,
        streams: PieceStreams<'_>,
        capture: &[usize],
    ) -> Result<Vec<(usize, Vec<f32>)>, BackendError> {
        let cfg = model.cfg;
        let n = rows.ids.len();
        let (h, hc) = (cfg.hidden_size, cfg.hc_mult);
        let width = hc * h;
        let window = cfg.sliding_window;
        let max_pos = rows.positions.iter().copied().max().unwrap_or(0);
        let bucket = context_bucket(max_pos);
        let split_rows = if n > STACK_MAX_ROWS && self.indexer_split_prefill.load(Ordering::Relaxed)
        {
            0
        } else {
            self.indexer_split_rows.load(Ordering::Relaxed)
        };
        let layout = MetaLayout::for_rows(n);
        let mut meta = MetaBuilder::new(layout);
        Self::pack_rows(&mut meta, rows)?;
        // Classes in layer order: (mode, ratio) of every attention kind, and every indexer
        // ratio; counts packed at fixed offsets, launch shapes from the bucket.
        let mut key_at: Vec<(KeyMode, usize)> = Vec::new();
        let mut index_at: Vec<(usize, Option<SharePlan>)> = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let aw = &model.weights.layers[l].attn;
            let ratio = cfg.compress_ratio(l).unwrap_or(0);
            let mode = match (&aw.compressor, &aw.indexer) {
                (Some(_), Some(_)) => KeyMode::Selected,
                (Some(_), None) => KeyMode::AllCompressed,
                _ => KeyMode::Window,
            };
            if !key_at.contains(&(mode, ratio)) {
                if key_at.len() == MAX_KEY_CLASSES {
                    return Err(shape_err(
                        "more attention classes than the stack packs".into(),
                    ));
                }
                Self::pack_keys(
                    &mut meta,
                    key_at.len(),
                    &rows.positions,
                    window,
                    mode,
                    ratio,
                    cfg.index_topk,
                )?;
                key_at.push((mode, ratio));
            }
            if mode == KeyMode::Selected && !index_at.iter().any(|&(r, _)| r == ratio) {
                if index_at.len() == MAX_INDEX_CLASSES {
                    return Err(shape_err("more indexer ratios than the stack packs".into()));
                }
                let ranks = comm.world_size();
                let plan = SharePlan::of(ranks, bucket, ratio, split_rows, n, cfg.index_topk);
                Self::pack_indexer(
                    &mut meta,
                    index_at.len(),
                    &rows.positions,
                    ratio.max(1),
                    cfg.index_topk,
                    plan.map(|p| (ranks, comm.rank(), p.levels())),
                )?;
                index_at.push((ratio, plan));
            }
        }
        let s = self.stream.clone();
        if stack.meta32.len() < meta.i32s.len() {
            stack.meta32 = self.alloc_i32(
                meta.i32s
                    .len()
                    .next_power_of_two()
                    .max(MetaLayout::GRAPHED.tables() + META_TABLE_ROOM),
            )?;
            stack.graphs.clear();
        }
        if stack.meta64.len() < meta.i64s.len() {
            stack.meta64 = self
                .stream
                .alloc_zeros::<i64>(meta.i64s.len())
                .map_err(driver_err("alloc"))?;
            stack.graphs.clear();
        }
        let m32 = ptr(&s, &stack.meta32);
        let m64 = ptr(&s, &stack.meta64);
        let at32 = |i: usize| m32 + (i * 4) as u64;
        let at64 = |i: usize| m64 + (i * 8) as u64;
        let key_classes: Vec<KeyClass> = key_at
            .iter()
            .enumerate()
            .map(|(c, &(mode, ratio))| {
                let max_keys = key_bound(mode, ratio, window, cfg.index_topk, bucket);
                KeyClass {
                    mode,
                    ratio,
                    starts: at32(layout.keys(c)),
                    total: n * max_keys,
                    max_keys,
                }
            })
            .collect();
        let index_classes: Vec<IndexerClass> = index_at
            .iter()
            .enumerate()
            .map(|(c, &(ratio, plan))| {
                let max_visible = bucket / ratio.max(1);
                let at = layout.index(c);
                let split = plan.map(|plan| IndexerShares {
                    starts: at32(at + 2 * layout.room),
                    ends: at32(at + 3 * layout.room),
                    counts: at32(at + 4 * layout.room),
                    score_starts: at64((2 * c + 1) * layout.room),
                    candidates: at32(at + 5 * layout.room),
                    per_rank: at32(at + 6 * layout.room),
                    plan,
                });
                IndexerClass {
                    ratio,
                    visible: at32(at),
                    out_starts: at64(2 * c * layout.room),
                    selected: at32(at + layout.room),
                    total: n * max_visible,
                    max_visible,
                    split,
                }
            })
            .collect();
        self.size_scratch(stack, model, n, &key_classes, &index_classes, capture)?;
        s.memcpy_htod(&meta.i32s, &mut stack.meta32.slice_mut(0..meta.i32s.len()))
            .map_err(driver_err("copy to GPU"))?;
        s.memcpy_htod(&meta.i64s, &mut stack.meta64.slice_mut(0..meta.i64s.len()))
            .map_err(driver_err("copy to GPU"))?;
        let ranks = comm.world_size();
        let hc_rows = if n > STACK_MAX_ROWS
            && ranks > 1
            && self.hc_split_prefill.load(Ordering::Relaxed)
            && self.stream_nccl(comm).is_some()
            && n.div_ceil(ranks) * ranks <= stack.scratch.rows
        {
            HcRows::split(n, ranks, comm.rank())
        } else {
            HcRows::whole(n)
        };
        self.embed_streams(&mut stack.scratch, model, at32(layout.ids()), hc_rows)?;
        let head = streams.logits.is_some()
            && !streams.keep.is_empty()
            && self.stack_head_takes(cfg, comm, hc_rows, model.weights.head.shape().1);
        let table = RowTable {
            positions: at32(layout.positions()),
            bt_starts: at32(layout.bt_starts()),
            bt_lens: at32(layout.bt_lens()),
            block_tables: at32(layout.tables()),
            rows: n,
        };
        let step = StepShape {
            table: &table,
            ids: at32(layout.ids()),
            key_classes: &key_classes,
            index_classes: &index_classes,
            n,
            hc: hc_rows,
            capture,
            head,
        };
        // GEMM steps are never captured: they synchronise (the expert sort) and allocate.
        let graphable = n <= STACK_MAX_ROWS
            && stack.graphs_on
            && stack.clock.is_none()
            && (comm.world_size() <= 1 || self.stream_nccl(comm).is_some());
        if graphable {
            let key = GraphKey {
                rows: n,
                bucket,
                capture: capture.to_vec(),
                split_rows,
                attention_f16: self.attention_f16_steps(),
                side_stream: self.side_stream_on(),
                head,
            };
            stack.uses += 1;
            let uses = stack.uses;
            if let Some(g) = stack.graphs.iter_mut().find(|g| g.key == key) {
                g.last_use = uses;
                g.graph.0.launch().map_err(driver_err("launch graph"))?;
                self.graph_steps.fetch_add(1, Ordering::Relaxed);
            } else {
                // NCCL sets up a captured collective with calls that the stricter modes refuse
                // while a capture runs (the relaxed mode still captures only this stream).
                let mode = if comm.world_size() > 1 {
                    CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED
                } else {
                    CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
                };
                s.begin_capture(mode).map_err(driver_err("begin capture"))?;
                let enqueued = self.enqueue_layers(stack, model, kv, comm, &step);
                let ended =
                    s.end_capture(dspark_kernels::launch::submit::graph_instantiate_flags());
                match (enqueued, ended) {
                    (Ok(()), Ok(Some(graph))) => {
                        graph.launch().map_err(driver_err("launch graph"))?;
                        self.graph_steps.fetch_add(1, Ordering::Relaxed);
                        if stack.graphs.len() == MAX_GRAPHS {
                            if let Some(oldest) = stack
                                .graphs
                                .iter()
                                .enumerate()
                                .min_by_key(|(_, g)| g.last_use)
                                .map(|(i, _)| i)
                            {
                                stack.graphs.swap_remove(oldest);
                            }
                        }
                        stack.graphs.push(CapturedStep {
                            key,
                            graph: StepGraph(graph),
                            last_use: uses,
                        });
                        tracing::debug!(rows = n, bucket, "captured a layer-stack graph");
                    }
                    (enqueued, ended) => {
                        // Nothing ran while capturing: run this step eagerly, and keep doing so.
                        tracing::warn!(
                            enqueue = ?enqueued.err(),
                            capture = ?ended.err(),
                            "CUDA graph capture of the layer stack failed; running it without \
                             graphs"
                        );
                        stack.graphs_on = false;
                        stack.graphs.clear();
                        self.enqueue_layers(stack, model, kv, comm, &step)?;
                    }
                }
            }
        } else {
            self.enqueue_layers(stack, model, kv, comm, &step)?;
        }
        if hc_rows.is_split() && !streams.keep.is_empty() {
            // The kept rows may be any rank's: every rank's share of the streams to all.
            self.stage(&mut stack.clock, "stack: all-gather")?;
            let sc = &mut stack.scratch;
            self.gather_hc_rows(comm, &mut sc.streams, width, hc_rows)?;
        }
        self.stage(&mut stack.clock, "stack: end")?;
        let mut captured = Vec::with_capacity(capture.len());
        for (i, &l) in capture.iter().enumerate() {
            let mut host = vec![0f32; n * width];
            s.memcpy_dtoh(&stack.scratch.captures[i].slice(0..n * width), &mut host)
                .map_err(driver_err("copy from GPU"))?;
            captured.push((l, host));
        }
        if head {
            let (vl, _) = model.weights.head.shape();
            let logits = &stack.head_logits;
            // The whole step's piece lists its kept rows in `keep`'s order (PieceStreams::of).
            let picks: Vec<usize> = streams.keep.iter().map(|&(row, _)| row).collect();
            let rows_out = self.logit_rows(&logits.slice(..), ranks, n, vl, &picks)?;
            if let Some(out) = streams.logits {
                *out = rows_out;
            }
            self.stack_head_steps.fetch_add(1, Ordering::Relaxed);
        }
        // Runs of consecutive kept rows (a decode step keeps all of them) in one copy each; a
        // step that ran the head keeps none.
        let keep: &[(usize, usize)] = if head { &[] } else { &streams.keep };
        let mut i = 0;
        while i < keep.len() {
            let (row, at) = keep[i];
            let mut len = 1;
            while i + len < keep.len() && keep[i + len] == (row + len, at + len) {
                len += 1;
            }
            s.memcpy_dtoh(
                &stack
                    .scratch
                    .streams
                    .slice(row * width..(row + len) * width),
                &mut streams.kept[at * width..(at + len) * width],
            )
            .map_err(driver_err("copy from GPU"))?;
            i += len;
        }
        s.synchronize().map_err(driver_err("synchronize"))?;
        // The draft's features: the mean of the residual streams after each captured layer.
        let captured = captured
            .into_iter()
            .map(|(l, host)| {
                let mean: Vec<f32> = host
                    .chunks(width)
                    .flat_map(|t| {
                        (0..h).map(move |c| (0..hc).map(|k| t[k * h + c]).sum::<f32>() / hc as f32)
                    })
                    .collect();
                (l, mean)
            })
            .collect();
        if let Some(clock) = stack.clock.as_mut() {
            let stages = clock.drain()?;
            let mut totals = self.stage_times.lock().unwrap_or_else(|p| p.into_inner());
            for (stage, secs) in stages {
                match totals.iter_mut().find(|t| t.op == stage) {
                    Some(t) => {
                        t.calls += 1;
                        t.seconds += secs;
                    }
                    None => totals.push(crate::engine::OpTime {
                        op: stage,
                        calls: 1,
                        seconds: secs,
                    }),
                }
            }
        }
        Ok(captured)
    }

    /// The communicator's NCCL side when it enqueues on this backend's stream (the same stream
    /// handle in the same primary context, however each side opened it).
    pub(super) fn stream_nccl<'c>(
        &self,
        comm: &'c dyn Communicator,
    ) -> Option<&'c NcclCommunicator> {
        comm.nccl().filter(|nccl| {
            nccl.stream().cu_stream() == self.stream.cu_stream()
                && nccl.stream().context().cu_ctx() == self.stream.context().cu_ctx()
        })
    }

    /// Sizes the context-dependent scratch for this step's launch shapes before anything is
    /// enqueued (a graph must not see a buffer move); a move drops the captured graphs.
    fn size_scratch(
        &self,
        stack: &mut CudaLayerStack,
        model: &StackModel<'_, CudaBackend>,
        n: usize,
        key_classes: &[KeyClass],
        index_classes: &[IndexerClass],
        capture: &[usize],
    ) -> Result<(), BackendError> {
        let cfg = model.cfg;
        let ranks = model.shard.world_size.max(1);
        let hd = cfg.head_dim;
        let heads = model
            .weights
            .layers
            .first()
            .map_or(0, |lw| lw.attn.wq_b.shape().0 / hd.max(1));
        let scores = index_classes.iter().map(|c| c.total).max().unwrap_or(0);
        let keys = key_classes.iter().map(|c| c.total).max().unwrap_or(0);
        let work = key_classes
            .iter()
            .map(|c| {
                let (_, splits) = attention_plan(
                    c.max_keys,
                    n,
                    heads,
                    model.pool.geometry.latent_format,
                    self.kernels.multiprocessors(),
                );
                attention_workspace_floats(n, heads, hd, splits)
            })
            .max()
            .unwrap_or(0);
        let topk = index_classes
            .iter()
            .map(|c| topk_work_floats(n, c.max_visible, cfg.index_topk))
            .max()
            .unwrap_or(0);
        // A split indexer's top k of this rank's share, and every rank's candidates gathered
        // (its top k, or its select's last round).
        let share_top = if index_classes.iter().any(|c| c.split.is_some()) {
            2 * n * cfg.index_topk
        } else {
            0
        };
        let gathered = index_classes
            .iter()
            .filter_map(|c| c.split)
            .map(|sh| ranks * 2 * n * sh.plan.stride(cfg.index_topk))
            .max()
            .unwrap_or(0);

        let sc = &mut stack.scratch;
        let mut moved = false;
        if sc.scores.len() < scores {
            sc.scores = self.alloc_f32(scores.next_power_of_two())?;
            moved = true;
        }
        if sc.key_offsets.len() < keys {
            sc.key_offsets = self
                .stream
                .alloc_zeros::<i64>(keys.next_power_of_two())
                .map_err(driver_err("alloc"))?;
            moved = true;
        }
        if sc.attn_work.len() < work {
            sc.attn_work = self.alloc_f32(work.next_power_of_two())?;
            moved = true;
        }
        if sc.topk_work.len() < topk {
            sc.topk_work = self.alloc_f32(topk.next_power_of_two())?;
            moved = true;
        }
        if sc.share_top.len() < share_top {
            sc.share_top = self.alloc_f32(share_top.next_power_of_two())?;
            moved = true;
        }
        if sc.shares_gathered.len() < gathered {
            sc.shares_gathered = self.alloc_f32(gathered.next_power_of_two())?;
            moved = true;
        }
        let width = cfg.hc_mult * cfg.hidden_size;
        while sc.captures.len() < capture.len() {
            sc.captures.push(self.alloc_f32(sc.rows * width)?);
        }
        // The GEMM scratch is never under a graph.
        if moved && n <= STACK_MAX_ROWS {
            stack.graphs.clear();
        }
        Ok(())
    }

    /// Enqueues every layer of the step (and the copies of captured layers' streams).
    fn enqueue_layers(
        &self,
        stack: &mut CudaLayerStack,
        model: &StackModel<'_, CudaBackend>,
        kv: &mut CudaKvStore,
        comm: &dyn Communicator,
        step: &StepShape<'_>,
    ) -> Result<(), BackendError> {
        let enqueued = self.enqueue_layers_on(stack, model, kv, comm, step);
        // Whatever the side stream still holds (a layer that failed between a fork and its
        // join included) finishes before the main stream goes on, and a capture ends joined.
        let joined = match &stack.side {
            Some(side) => side.join(&self.stream),
            None => Ok(()),
        };
        enqueued.and(joined)
    }

    /// The layers of [`Self::enqueue_layers`].
    fn enqueue_layers_on(
        &self,
        stack: &mut CudaLayerStack,
        model: &StackModel<'_, CudaBackend>,
        kv: &mut CudaKvStore,
        comm: &dyn Communicator,
        step: &StepShape<'_>,
    ) -> Result<(), BackendError> {
        let cfg = model.cfg;
        let n = step.n;
        let width = cfg.hc_mult * cfg.hidden_size;
        // Nothing of an earlier step's seams carries over (a failed step may have left them).
        stack.scratch.hc_pre_done = None;
        stack.scratch.comb_on_side = false;
        for l in 0..cfg.num_hidden_layers {
            self.stack_attention(stack, model, kv, comm, step, l)?;
            self.stack_ffn(stack, model, comm, step, l)?;
            if let Some(i) = step.capture.iter().position(|&c| c == l) {
                if step.hc.is_split() {
                    let sc = &mut stack.scratch;
                    let (nccl, recv, share) = self.split_share(
                        comm,
                        &mut sc.captures[i],
                        width,
                        step.hc,
                        "captured streams",
                    )?;
                    fits("stack streams", sc.streams.len(), comm.world_size() * share)?;
                    let send = ptr(&self.stream, &sc.streams) + (comm.rank() * share * 4) as u64;
                    // SAFETY: both buffers hold world_size * share floats (checked) and live in
                    // the stack, which outlives the stream's work on them.
                    unsafe { nccl.all_gather_raw_f32(send, recv, share) }.map_err(comm_err)?;
                    continue;
                }
                let src = stack.scratch.streams.slice(0..n * width);
                let mut dst = stack.scratch.captures[i].slice_mut(0..n * width);
                self.stream
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(driver_err("copy on GPU"))?;
            }
        }
        if step.head {
            self.stack_head_logits(stack, model, comm, n)?;
        }
        Ok(())
    }

    /// The LM head of a step that runs the head ([`StepShape::head`]): the normed rows the
    /// head's seam left in `scratch.x` through this rank's vocabulary rows, into its share of
    /// [`CudaLayerStack::head_logits`], then every rank's share to all (NCCL, in place).
    fn stack_head_logits(
        &self,
        stack: &mut CudaLayerStack,
        model: &StackModel<'_, CudaBackend>,
        comm: &dyn Communicator,
        n: usize,
    ) -> Result<(), BackendError> {
        let s = &self.stream;
        let w = &model.weights.head;
        let (vl, cols) = w.shape();
        let (ranks, rank) = (comm.world_size(), comm.rank());
        let logits = &mut stack.head_logits;
        fits("head logits", logits.len(), ranks * n * vl)?;
        fits("stack x", stack.scratch.x.len(), n * cols)?;
        let share = n * vl;
        self.linear_on_with(
            &stack.scratch.x.slice(0..n * cols),
            n,
            w,
            &mut logits.slice_mut(rank * share..(rank + 1) * share),
            false,
        )?;
        if ranks > 1 {
            let nccl = self.stream_nccl(comm).ok_or_else(|| {
                BackendError::Other("the head's all-gather needs NCCL on this stream".into())
            })?;
            let recv = ptr_mut(s, logits);
            // SAFETY: `logits` holds ranks * share floats (checked above); this rank's share,
            // the send buffer, is its slot of the receive buffer (NCCL's in-place all-gather).
            unsafe { nccl.all_gather_raw_f32(recv + (rank * share * 4) as u64, recv, share) }
                .map_err(comm_err)?;
        }
        Ok(())
    }

    /// Which kernels carry the hyper-connection pre side: `DSPARK_HC_KERNEL` = `old` | `split`
    /// | `new` (default), read once per process, so runs can A/B them (all give the same bits).
    fn hc_pre_kernel() -> HcPreKernel {
        static KERNEL: std::sync::OnceLock<HcPreKernel> = std::sync::OnceLock::new();
        env_kernel(&KERNEL, "DSPARK_HC_KERNEL")
    }

    /// Collapses the streams of `rows` (this rank's in a split step, [`HcRows`]) at a
    /// hyper-connection site and norms the sub-layer input into `scratch.x`; the site's mix stays
    /// in `scratch.mix` for [`Self::hc_post`]. The kernels are [`Self::hc_pre_kernel`]'s. A split
    /// step's caller gathers what every rank needs of it: the attention its projections, the
    /// feed-forward `x` itself with the routes.
    #[allow(clippy::too_many_arguments)]
    fn hc_pre_rows(
        &self,
        clock: &mut Option<StageClock>,
        side: Option<&SideBranch>,
        sc: &mut Scratch,
        site: &HcSite,
        norm: &CudaSlice<f32>,
        cfg: &crate::engine::model::ModelConfig,
        rows: HcRows,
    ) -> Result<(), BackendError> {
        if self.hc_seam_takes(cfg, rows) {
            // The seam at the end of the last sub-layer ran this pre; the step's first site
            // has no post before it.
            if sc.hc_pre_done.take() == Some(rows) {
                return Ok(());
            }
            self.stage(clock, "stack: hyper-connections (pre)")?;
            return self.hc_seam(side, sc, site, norm, cfg, rows, false, false);
        }
        let s = &self.stream;
        let (h, hc) = (cfg.hidden_size, cfg.hc_mult);
        let (first, n) = (rows.start, rows.len);
        let outs = (2 + hc) * hc;
        // Whether the last post left these rows' squares in the workspace (read at most once).
        let squares_ready = sc.hc_squares_of.take() == Some(rows);
        hc_rows_fit(sc, rows, h, hc)?;
        let call = HcPreFused {
            streams: ptr(s, &sc.streams) + (first * hc * h * 4) as u64,
            fn_: ptr(s, &site.fn_),
            base: ptr(s, &site.base),
            scale: site.scale,
            norm_weight: ptr(s, norm),
            x_out: ptr_mut(s, &mut sc.x) + (first * h * 4) as u64,
            mix_out: ptr_mut(s, &mut sc.mix) + (first * outs * 4) as u64,
            workspace: ptr_mut(s, &mut sc.hc_work),
            n,
            hc,
            hidden: h,
            sinkhorn_iters: cfg.hc_sinkhorn_iters,
            hc_eps: cfg.hc_eps,
            norm_eps: cfg.rms_norm_eps,
            kernel: Self::hc_pre_kernel(),
        };
        if Self::hc_pre_by_gemm(n) {
            let (width, outs) = (hc * h, (2 + hc) * hc);
            let dots = dspark_kernels::Kernels::hc_given_dots(call.workspace, n, hc);
            // SAFETY: as below; the squares launch (unless the post that wrote these streams
            // left their squares), the GEMM of the streams [n, width] by the site's [outs,
            // width] projection into the workspace's [n, outs] dots, and the finish, in this
            // order on the backend's stream (cuBLAS's handle is bound to it).
            unsafe {
                self.stage(clock, "stack: hyper-connections (mix)")?;
                if !squares_ready {
                    self.kernels.hc_squares_f32(s, &call).map_err(kernel_err)?;
                }
                self.gemm_rows(call.streams, width, n, call.fn_, outs, width, dots, outs)?;
                self.stage(clock, "stack: hyper-connections (pre)")?;
                return self
                    .kernels
                    .hc_pre_from_dots_f32(s, &call)
                    .map_err(kernel_err);
            }
        }
        self.stage(clock, "stack: hyper-connections (pre)")?;
        // SAFETY: the scratch buffers hold first + n rows of each width (checked above; hc_work
        // sized by hc_mix_workspace_floats for the scratch's rows, allocated zeroed: its counter
        // header starts at 0 and every launch on this stream leaves it 0); the site's parameters
        // are [outs, hc * hidden] and [outs], the norm weight `hidden` values.
        unsafe { self.kernels.hc_pre_fused_f32(s, &call) }.map_err(kernel_err)
    }

    /// Whether the hyper-connection sites of a step over `rows` meet in seams
    /// ([`Self::hc_seam`]): decode steps of up to [`Self::hc_seam_max_tokens`] unsplit rows,
    /// with the default pre and post kernels (`DSPARK_HC_KERNEL` / `DSPARK_HC_POST_KERNEL` keep
    /// their A/B meaning), a shape the seam kernel takes here, and unless `DSPARK_HC_SEAM=0`.
    fn hc_seam_takes(&self, cfg: &crate::engine::model::ModelConfig, rows: HcRows) -> bool {
        Self::hc_seam_on()
            && !rows.is_split()
            && rows.len <= Self::hc_seam_max_tokens()
            && Self::hc_pre_kernel() == HcPreKernel::Fused
            && Self::hc_post_kernel() == HcPostKernel::New
            && self
                .kernels
                .hc_seam_cluster(cfg.hc_mult, cfg.hidden_size)
                .is_some()
    }

    /// The most tokens a step may have for its sites to meet in seams: `DSPARK_HC_SEAM_MAX_TOKENS`
    /// (1..=[`HC_SEAM_MAX_TOKENS`], default [`HC_SEAM_DEFAULT_MAX_TOKENS`]), read once per
    /// process; another value is reported and the default kept.
    fn hc_seam_max_tokens() -> usize {
        static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        env_count(
            &MAX,
            "DSPARK_HC_SEAM_MAX_TOKENS",
            seam_max_tokens,
            HC_SEAM_DEFAULT_MAX_TOKENS,
            || format!("want 1..={HC_SEAM_MAX_TOKENS}; keeping {HC_SEAM_DEFAULT_MAX_TOKENS}"),
        )
    }

    /// Whether a step over `rows` runs the model's head in its own launches (and graph): where
    /// its last post meets the head's collapse in a seam ([`Self::hc_seam_takes`]: decode and
    /// verify steps of up to 16 rows), the ranks gather on this stream (NCCL) and the LM head
    /// reads `hidden` features; [`CudaBackend::set_stack_head`] (`DSPARK_DEVICE_HEAD=0`) turns
    /// it off, leaving the collapse and norm to the host and the LM head to its own call.
    fn stack_head_takes(
        &self,
        cfg: &crate::engine::model::ModelConfig,
        comm: &dyn Communicator,
        rows: HcRows,
        head_cols: usize,
    ) -> bool {
        // hc_seam_takes bounds the rows by HC_SEAM_MAX_TOKENS, what head_logits holds.
        self.stack_head.load(Ordering::Relaxed)
            && head_cols == cfg.hidden_size
            && self.hc_seam_takes(cfg, rows)
            && (comm.world_size() <= 1 || self.stream_nccl(comm).is_some())
    }

    /// Tokens a seam cluster serves: `DSPARK_HC_SEAM_TOKENS_PER_CLUSTER` = 1 | 2 | 4 (an A/B
    /// switch), else 0, the kernels' choice (the fewest that fit the step's clusters in one wave
    /// of the GPU); read once per process, another value reported and 0 kept.
    fn hc_seam_tokens_per_cluster() -> usize {
        static TOKENS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        env_count(
            &TOKENS,
            "DSPARK_HC_SEAM_TOKENS_PER_CLUSTER",
            seam_tokens_per_cluster,
            0,
            || format!("want one of {HC_SEAM_TOKENS_PER_CLUSTER:?}; keeping the kernels' choice"),
        )
    }

    /// `DSPARK_HC_SEAM=0` keeps the pre and post of every site apart (an A/B switch), read once
    /// per process.
    fn hc_seam_on() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var("DSPARK_HC_SEAM").map_or(true, |v| v.trim() != "0"))
    }

    /// The seam between the site that ends (its post, when `post`) and `site`, which starts:
    /// one launch for both ([`HcSeam`]), leaving `site`'s normed input in `scratch.x` and its
    /// mix in `scratch.mix` with the comb's logits, then the Sinkhorn of those logits in place,
    /// on the second stream where there is one (only the site's post reads the comb, a
    /// sub-layer later; [`Self::comb_ready`]).
    /// The head's seam ([`StackHead`]) passes `head`: its comb is never read, so no Sinkhorn.
    #[allow(clippy::too_many_arguments)]
    fn hc_seam(
        &self,
        side: Option<&SideBranch>,
        sc: &mut Scratch,
        site: &HcSite,
        norm: &CudaSlice<f32>,
        cfg: &crate::engine::model::ModelConfig,
        rows: HcRows,
        post: bool,
        head: bool,
    ) -> Result<(), BackendError> {
        let s = &self.stream;
        let (h, hc) = (cfg.hidden_size, cfg.hc_mult);
        let (first, n) = (rows.start, rows.len);
        let outs = (2 + hc) * hc;
        hc_rows_fit(sc, rows, h, hc)?;
        if post {
            self.comb_ready(side, sc)?;
        }
        let mix = ptr_mut(s, &mut sc.mix) + (first * outs * 4) as u64;
        let call = HcSeam {
            streams: ptr_mut(s, &mut sc.streams) + (first * hc * h * 4) as u64,
            post_mix: if post { mix } else { 0 },
            out: ptr(s, &sc.sub_out) + (first * h * 4) as u64,
            fn_: ptr(s, &site.fn_),
            base: ptr(s, &site.base),
            scale: site.scale,
            norm_weight: ptr(s, norm),
            x_out: ptr_mut(s, &mut sc.x) + (first * h * 4) as u64,
            mix_out: mix,
            n,
            hc,
            hidden: h,
            hc_eps: cfg.hc_eps,
            norm_eps: cfg.rms_norm_eps,
            tokens_per_cluster: Self::hc_seam_tokens_per_cluster(),
        };
        // SAFETY: the scratch holds first + n rows of every width (checked above); the site's
        // parameters are [outs, hc * hidden] and [outs], the norm weight `hidden` values. The
        // mix and streams the seam reads before its PDL wait were written by the last seam or
        // pre, a sub-layer of launches ago (or, for the first site, are read after it).
        unsafe { self.kernels.hc_seam_f32(s, &call) }.map_err(kernel_err)?;
        sc.hc_pre_done = Some(rows);
        sc.hc_squares_of = None;
        if head {
            return Ok(());
        }
        let (iters, eps) = (cfg.hc_sinkhorn_iters, cfg.hc_eps);
        match side {
            Some(branch) => {
                let on = branch.fork(s)?;
                // SAFETY: `mix` holds n rows of outs (checked above); the fork orders the
                // Sinkhorn after the seam that wrote them.
                unsafe { self.kernels.hc_sinkhorn_f32(on, mix, n, iters, eps) }
                    .map_err(kernel_err)?;
                branch.mark(SidePoint::Comb)?;
                sc.comb_on_side = true;
            }
            None => {
                // SAFETY: as above, in stream order.
                unsafe { self.kernels.hc_sinkhorn_f32(s, mix, n, iters, eps) }
                    .map_err(kernel_err)?;
            }
        }
        Ok(())
    }

    /// The main stream waits for the comb a seam's Sinkhorn writes on the second stream, where
    /// one is still pending.
    fn comb_ready(&self, side: Option<&SideBranch>, sc: &mut Scratch) -> Result<(), BackendError> {
        if !std::mem::take(&mut sc.comb_on_side) {
            return Ok(());
        }
        match side {
            Some(branch) => branch.wait(&self.stream, SidePoint::Comb),
            None => Err(shape_err(
                "a hyper-connection comb is pending on the second stream, which is gone".into(),
            )),
        }
    }

    /// The tensor-core form a step of `n` rows runs its head-grouped attention's scores and
    /// values in, if any: only with TF32 allowed (the same rounding of Q, K and the probabilities
    /// as the step's GEMMs; `DSPARK_GEMM_TF32=0` keeps f32), in the steps [`AttentionTcSteps`]
    /// names, where a kernel takes the shape (head_dim 512, heads a multiple of 16); the f16 form
    /// in the steps `DSPARK_ATTENTION_F16` names where it fits, else TF32.
    fn attention_tc_form(&self, call: &PagedAttention, n: usize) -> Option<AttentionTcForm> {
        if !self.attention_tc.takes(n) || !self.gemm_tf32.load(Ordering::Relaxed) {
            return None;
        }
        let optin = self.kernels.smem_optin();
        // f32 rows stay on TF32: their raw tile takes a block's second slot on the SM (H200,
        // 32 heads of an 8K chunk over 640 keys: TF32 7.7 ms, f16 8.5 ms).
        let f16 = attention_f16_form(call.heads, n, call.format, optin);
        if call.format != KvRowFormat::F32
            && self.attention_f16_steps().takes(n)
            && check_attention_heads_tc(call, f16, optin).is_ok()
        {
            return Some(f16);
        }
        let tf32 = attention_tc_form(call.heads, n, optin);
        check_attention_heads_tc(call, tf32, optin)
            .is_ok()
            .then_some(tf32)
    }

    /// Whether the f16 attention forms norm and rotate the raw queries as they stage them and
    /// finish one-split rows themselves (the same bits as the separate launches): on unless
    /// `DSPARK_ATTENTION_FUSED=0`, read once per process (an A/B switch).
    fn attention_fused() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var("DSPARK_ATTENTION_FUSED").map_or(true, |v| v != "0"))
    }

    /// Whether GEMM steps compute the hyper-connection mix dots as one cuBLAS GEMM (reading the
    /// streams once) instead of the chunk kernels (once per output): on unless
    /// `DSPARK_HC_GEMM=0`, read once per process (an A/B switch).
    fn hc_mix_by_gemm() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var("DSPARK_HC_GEMM").map_or(true, |v| v != "0"))
    }

    /// Whether the pre side over `n` rows of this rank runs as the squares, a GEMM and the
    /// finish from the dots ([`Self::hc_pre_rows`]); the post before such a site writes the
    /// squares ([`Self::hc_post_then`]).
    fn hc_pre_by_gemm(n: usize) -> bool {
        n > STACK_MAX_ROWS && Self::hc_mix_by_gemm()
    }

    /// Which kernel carries the hyper-connection post side: `DSPARK_HC_POST_KERNEL` = `old` |
    /// `new` (default), read once per process (same bits). `old` also leaves the squares of GEMM
    /// steps to the next site's pre, as before.
    fn hc_post_kernel() -> HcPostKernel {
        static KERNEL: std::sync::OnceLock<HcPostKernel> = std::sync::OnceLock::new();
        env_kernel(&KERNEL, "DSPARK_HC_POST_KERNEL")
    }

    /// One compressor of a layer: the step's `kv` and `gate` rows (`coff * dim` each) into the
    /// pool's input section, then every window closing in the step pooled, normed and rotated
    /// into its compressed row (the closing windows read earlier inputs from the pool).
    fn stack_compress(
        &self,
        s: &CudaStream,
        pool: u64,
        table: &RowTable,
        site: &CompressorSite,
    ) -> Result<(), BackendError> {
        let c = &site.params;
        // SAFETY: kv and gate hold the step's rows of coff * dim; the sections are this
        // layer's parts of blocks the caller checked against the pool.
        unsafe {
            self.kernels
                .pool_write_kv_gate(
                    s,
                    pool,
                    table,
                    site.block_size,
                    &site.input,
                    site.kv,
                    site.gate,
                    c.coff * c.dim,
                )
                .and_then(|()| {
                    self.kernels.compress_rows(
                        s,
                        pool,
                        table,
                        site.block_size,
                        &site.input,
                        &site.output,
                        c,
                    )
                })
        }
        .map_err(kernel_err)
    }

    /// `streams = post * sub_out + comb^T streams` over `rows` with the mix of the last
    /// [`Self::hc_pre_rows`]. `next`: the site (and its norm weight) that reads these streams
    /// next in this step (every post but the last layer's FFN one). Where the step's sites meet
    /// in seams ([`Self::hc_seam_takes`]) this post and that site's pre are one launch
    /// ([`Self::hc_seam`]; `side`: the second stream where the step uses one).
    /// If that site's pre runs as a GEMM ([`Self::hc_pre_by_gemm`]), the post also leaves the
    /// rows' sums of squares of the new streams where that pre reads them (the bits of its
    /// squares launch, which it then skips). `next_is_head`: `next` is the model's head
    /// ([`StackHead`]), which only a seam runs.
    #[allow(clippy::too_many_arguments)]
    fn hc_post_then(
        &self,
        side: Option<&SideBranch>,
        sc: &mut Scratch,
        cfg: &crate::engine::model::ModelConfig,
        rows: HcRows,
        next: Option<(&HcSite, &CudaSlice<f32>)>,
        next_is_head: bool,
    ) -> Result<(), BackendError> {
        if self.hc_seam_takes(cfg, rows) {
            if let Some((site, norm)) = next {
                return self.hc_seam(side, sc, site, norm, cfg, rows, true, next_is_head);
            }
            // The step's last site: a plain post, once its comb is there.
            self.comb_ready(side, sc)?;
        }
        if next_is_head {
            return Err(shape_err(
                "the head's collapse runs only in a seam, which this step does not take".into(),
            ));
        }
        let next_site = next.is_some();
        let s = &self.stream;
        let (h, hc) = (cfg.hidden_size, cfg.hc_mult);
        let (first, n) = (rows.start, rows.len);
        let outs = (2 + hc) * hc;
        hc_rows_fit(sc, rows, h, hc)?;
        let kernel = Self::hc_post_kernel();
        let squares = next_site && kernel == HcPostKernel::New && Self::hc_pre_by_gemm(n);
        sc.hc_squares_of = None;
        let sq = if squares {
            fits(
                "stack hc workspace",
                sc.hc_work.len(),
                hc_mix_workspace_floats(n, outs),
            )?;
            dspark_kernels::Kernels::hc_given_squares(ptr(s, &sc.hc_work), n, hc)
        } else {
            0
        };
        let streams = ptr_mut(s, &mut sc.streams) + (first * hc * h * 4) as u64;
        // SAFETY: streams, mix and sub_out hold first + n rows of hc * hidden, (2 + hc) * hc and
        // hidden, hc_work (when sq is set) the squares of n rows after the dots (checked above).
        unsafe {
            self.kernels.hc_post_f32(
                s,
                &HcPost {
                    streams,
                    mix: ptr(s, &sc.mix) + (first * outs * 4) as u64,
                    out: ptr(s, &sc.sub_out) + (first * h * 4) as u64,
                    squares: sq,
                    n,
                    hc: cfg.hc_mult,
                    hidden: cfg.hidden_size,
                    kernel,
                },
            )
        }
        .map_err(kernel_err)?;
        if squares {
            sc.hc_squares_of = Some(rows);
        }
        Ok(())
    }

    fn stack_attention(
        &self,
        stack: &mut CudaLayerStack,
        model: &StackModel<'_, CudaBackend>,
        kv: &mut CudaKvStore,
        comm: &dyn Communicator,
        step: &StepShape<'_>,
        l: usize,
    ) -> Result<(), BackendError> {
        let (table, n) = (step.table, step.n);
        let cfg = model.cfg;
        let s = &self.stream;
        let lw = &model.weights.layers[l];
        let aw = &lw.attn;
        let layer = &stack.layers[l];
        let sc = &mut stack.scratch;
        let (h, hd, eps) = (cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps);
        let rd = cfg.qk_rope_head_dim;
        let kind = cfg.layer_types[l];
        let ratio = cfg.compress_ratio(l).unwrap_or(0);
        let (rope, rope_af) = match kind {
            AttentionKind::Sliding => (&stack.rope_main, model.rope_main.attention_factor),
            _ => (&stack.rope_compress, model.rope_compress.attention_factor),
        };
        let compress_af = model.rope_compress.attention_factor;
        let positions = table.positions;
        let g = &model.pool.geometry;
        let lay = &g.layers[l];
        // The pool is layer-major: this layer's persistent part of block b at start + b *
        // lay.len, its recent part of recent block r at recent + r * lay.recent_len.
        let (fpb, rfpb) = (lay.len, lay.recent_len);
        let start = model.pool.layer_start(l);
        let recent = model.pool.recent_layer_start(l);
        let bs = g.block_size;
        let window_section = PoolSection {
            floats_per_block: rfpb,
            base: recent + lay.window,
            stride: g.latent_slots,
            ratio: 1,
            recent: true,
        };

        // A split step's normed input is not gathered: its projections are (below).
        let side_on = self.side_stream_on() && stack.clock.is_none();
        self.hc_pre_rows(
            &mut stack.clock,
            stack.side.as_ref().filter(|_| side_on),
            sc,
            &layer.hc_attn,
            &layer.attn_norm,
            cfg,
            step.hc,
        )?;
        self.stage(&mut stack.clock, "stack: projections")?;
        // The side work: nothing on the query path reads it before the indexer's scores (its
        // compressed keys, its scaled head weights) or the attention (the latent row in its
        // window slot, the compressed rows), so it runs on the second stream where there is one
        // (not while profiling: the stages would overlap).
        let side = stack
            .side
            .as_ref()
            .filter(|_| self.side_stream_on() && stack.clock.is_none());
        // Every projection of the normed input: one launch per weight kind at one row. Only
        // wq_a's feeds the query path: where the others have GEMVs for the second stream (a
        // decode step), they run there, first of the side work.
        let mut jobs: Vec<(&CudaMatrix, &mut CudaSlice<f32>)> =
            vec![(&aw.wq_a, &mut sc.q_lora), (&aw.wkv, &mut sc.kv)];
        if let Some(cw) = &aw.compressor {
            jobs.push((&cw.wkv, &mut sc.comp_kv));
            jobs.push((&cw.wgate, &mut sc.comp_gate));
        }
        let mut idx_heads = 0;
        if let Some(iw) = &aw.indexer {
            jobs.push((&iw.compressor.wkv, &mut sc.idx_kv));
            jobs.push((&iw.compressor.wgate, &mut sc.idx_gate));
            jobs.push((&iw.weights_proj, &mut sc.idx_weights));
            idx_heads = iw.weights_proj.shape().0;
        }
        let side_projects =
            side.is_some() && n <= STACK_MAX_ROWS && jobs[1..].iter().all(|(w, _)| gemv_weight(w));
        // wq_a alone on the main stream where the rest go to the side stream, else all of them.
        let on_main = if side_projects { 1 } else { jobs.len() };
        let (query, rest) = jobs.split_at_mut(on_main);
        // A split step's outputs gathered on the side stream, where their readers run.
        let mut side_gathered = Vec::new();
        if step.hc.is_split() {
            // Each rank projects its own rows, then every output is gathered: half the
            // multiplications of projecting every row, and (outside the CSA layers, whose
            // outputs are about as wide as the input) fewer bytes on the links.
            self.own_rows_linear_many(&sc.x, step.hc, query, &mut sc.gemm)?;
            self.stage(&mut stack.clock, "stack: all-gather")?;
            let mut outputs: Vec<_> = query
                .iter_mut()
                .map(|(w, y)| SplitBuffer::of(s, &mut **y, w.shape().0))
                .collect();
            // Only wq_a's output feeds the query path: with a side stream, the rest (60-75% of
            // the bytes) cross the links there while this stream multiplies the queries. The
            // main stream's next collective (the indexer's candidates, or the output's
            // reduce-scatter) comes after it waits for the side's keys, so after this gather.
            if side.is_some() && self.split_side_gather.load(Ordering::Relaxed) {
                side_gathered = outputs.split_off(1);
            }
            self.gather_split_rows(comm, step.hc, &outputs)?;
        } else {
            self.stack_linear_many(&sc.x, n, query, &mut sc.gemm)?;
        }
        let on = match side {
            Some(branch) => branch.fork(s)?,
            None => s,
        };
        if !side_gathered.is_empty() {
            self.side_gathers.fetch_add(1, Ordering::Relaxed);
            self.gather_split_rows_on(on, comm, step.hc, &side_gathered)?;
        }
        if !rest.is_empty() {
            self.linear_many_on(on, &sc.x, n, rest)?;
        }
        // Whether the indexer scores this step (its queries are projected beside the attention's).
        let indexer_runs = cfg.index_topk > 0
            && layer.indexer.is_some()
            && step
                .index_classes
                .iter()
                .any(|c| c.ratio == ratio && c.total > 0);
        let heads = aw.wq_b.shape().0 / hd;
        let pool = ptr_mut(s, &mut kv.data);
        let indexer_site = match (&aw.indexer, &layer.indexer) {
            (Some(_), Some(ip)) => Some(ip),
            _ => None,
        };
        if let Some(ip) = indexer_site {
            self.stage(&mut stack.clock, "stack: compressors")?;
            let ihd = cfg.index_head_dim;
            self.stack_compress(
                on,
                pool,
                table,
                &CompressorSite {
                    block_size: bs,
                    input: PoolSection {
                        floats_per_block: rfpb,
                        base: recent + lay.idx_in,
                        stride: 2 * lay.idx_width,
                        ratio: 1,
                        recent: true,
                    },
                    output: PoolSection {
                        floats_per_block: fpb,
                        base: start + lay.idx_rows,
                        stride: g.index_slots,
                        ratio,
                        recent: false,
                    },
                    kv: ptr(s, &sc.idx_kv),
                    gate: ptr(s, &sc.idx_gate),
                    params: CompressParams {
                        ratio,
                        coff: 2,
                        dim: ihd,
                        ape: ptr(s, &ip.ape),
                        norm: ptr(s, &ip.norm),
                        inv_freq: ptr(s, &stack.rope_compress),
                        rope_dim: rd,
                        attention_factor: compress_af,
                        eps,
                        out_format: g.index_format,
                    },
                },
            )?;
            if indexer_runs {
                self.stage(&mut stack.clock, "stack: indexer: scores")?;
                let iwts = ptr_mut(s, &mut sc.idx_weights);
                let wscale = (cfg.index_n_heads as f32).powf(-0.5);
                // SAFETY: idx_weights holds n * idx_heads values.
                unsafe { self.kernels.scale_f32(on, iwts, n * idx_heads, wscale) }
                    .map_err(kernel_err)?;
            }
        }
        if let Some(branch) = side {
            branch.mark(SidePoint::IndexerKeys)?;
        }
        self.stage(&mut stack.clock, "stack: norms, RoPE, KV write")?;
        // The latent KV row: kv_norm, RoPE, into each row's window slot.
        let kvp = ptr_mut(s, &mut sc.kv);
        // SAFETY: kv holds n rows of head_dim; every row's block was checked to lie in the pool.
        unsafe {
            self.kernels
                .rms_norm_rope_f32(
                    on,
                    &RmsNormRopeF32 {
                        norm: RmsNormF32 {
                            x: kvp,
                            out: kvp,
                            weight: ptr(s, &layer.kv_norm),
                            rows: n,
                            dim: hd,
                            ld_x: hd,
                            ld_out: hd,
                            eps,
                        },
                        positions,
                        inv_freq: ptr(s, rope),
                        heads: 1,
                        rope_dim: rd,
                        attention_factor: rope_af,
                    },
                )
                .and_then(|()| {
                    self.kernels.pool_write_rows(
                        on,
                        pool,
                        table,
                        bs,
                        &window_section,
                        kvp,
                        hd,
                        hd,
                        g.latent_format,
                    )
                })
        }
        .map_err(kernel_err)?;
        self.stage(&mut stack.clock, "stack: compressors")?;
        // Compressors: this step's inputs into the pool, then every window closing in it.
        if let (Some(_), Some(cp)) = (&aw.compressor, &layer.compressor) {
            let coff = if kind == AttentionKind::Csa { 2 } else { 1 };
            let input = PoolSection {
                floats_per_block: rfpb,
                base: recent + lay.comp_in,
                stride: 2 * lay.comp_width,
                ratio: 1,
                recent: true,
            };
            self.stack_compress(
                on,
                pool,
                table,
                &CompressorSite {
                    block_size: bs,
                    input,
                    output: PoolSection {
                        floats_per_block: fpb,
                        base: start + lay.comp_rows,
                        stride: g.latent_slots,
                        ratio,
                        recent: false,
                    },
                    kv: ptr(s, &sc.comp_kv),
                    gate: ptr(s, &sc.comp_gate),
                    params: CompressParams {
                        ratio,
                        coff,
                        dim: hd,
                        ape: ptr(s, &cp.ape),
                        norm: ptr(s, &cp.norm),
                        inv_freq: ptr(s, &stack.rope_compress),
                        rope_dim: rd,
                        attention_factor: compress_af,
                        eps,
                        out_format: g.latent_format,
                    },
                },
            )?;
        }
        if let Some(branch) = side {
            branch.mark(SidePoint::AttentionKeys)?;
        }
        self.stage(&mut stack.clock, "stack: norms, RoPE, KV write")?;
        // Queries: q LoRA norm (kept as the indexer's input), wq_b, per-head norm, RoPE.
        let qr = cfg.q_lora_rank;
        let ql = ptr_mut(s, &mut sc.q_lora);
        // SAFETY: q_lora holds n rows of q_lora_rank; q_norm that many values.
        unsafe {
            self.kernels.rms_norm_f32(
                s,
                &RmsNormF32 {
                    x: ql,
                    out: ql,
                    weight: ptr(s, &layer.q_norm),
                    rows: n,
                    dim: qr,
                    ld_x: qr,
                    ld_out: qr,
                    eps,
                },
            )
        }
        .map_err(kernel_err)?;
        self.stage(&mut stack.clock, "stack: projections")?;
        // The queries, and the indexer's queries where its scores run this step (both read the
        // normed q LoRA: one launch at one row).
        let mut jobs: Vec<(&CudaMatrix, &mut CudaSlice<f32>)> = vec![(&aw.wq_b, &mut sc.q)];
        if let (Some(iw), true) = (&aw.indexer, indexer_runs) {
            jobs.push((&iw.wq_b, &mut sc.idx_q));
        }
        self.stack_linear_many(&sc.q_lora, n, &mut jobs, &mut sc.gemm)?;
        self.stage(&mut stack.clock, "stack: norms, RoPE, KV write")?;
        let key_mode;
        if indexer_site.is_some() {
            key_mode = KeyMode::Selected;
            let ihd = cfg.index_head_dim;
            let class = step
                .index_classes
                .iter()
                .find(|c| c.ratio == ratio)
                .ok_or_else(|| shape_err(format!("no indexer rows for ratio {ratio}")))?;
            if indexer_runs {
                // Indexer queries (projected with wq_b above), RoPE'd like the compressed keys.
                self.stage(&mut stack.clock, "stack: indexer: scores")?;
                let iq = ptr_mut(s, &mut sc.idx_q);
                let iwts = ptr(s, &sc.idx_weights);
                // SAFETY: idx_q holds n * idx_heads rows of ihd.
                unsafe {
                    self.kernels.rope_f32(
                        s,
                        &RopeF32 {
                            x: iq,
                            positions,
                            inv_freq: ptr(s, &stack.rope_compress),
                            tokens: n,
                            heads: idx_heads,
                            head_dim: ihd,
                            rope_dim: rd,
                            ld_token: idx_heads * ihd,
                            ld_head: ihd,
                            attention_factor: compress_af,
                            inverse: false,
                        },
                    )
                }
                .map_err(kernel_err)?;
                // The keys and head weights from the side stream.
                if let Some(branch) = side {
                    branch.wait(s, SidePoint::IndexerKeys)?;
                }
                fits("indexer scores", sc.scores.len(), class.total)?;
                let share = class.split;
                let call = IndexerScores {
                    pool,
                    q: iq,
                    weights: iwts,
                    block_tables: table.block_tables,
                    block_table_starts: table.bt_starts,
                    visible: share.map_or(class.visible, |sh| sh.ends),
                    row_starts: share.map_or(0, |sh| sh.starts),
                    out_starts: class.out_starts,
                    out: ptr_mut(s, &mut sc.scores),
                    tokens: n,
                    max_visible: share.map_or(class.max_visible, |sh| sh.plan.max_share),
                    floats_per_block: fpb,
                    block_size: bs,
                    base: start + lay.idx_rows,
                    ratio,
                    stride: g.index_slots,
                    heads: idx_heads,
                    dim: ihd,
                    scale: (ihd as f32).powf(-0.5),
                    format: g.index_format,
                    tensor_cores: self.indexer_tensor_cores(class.max_visible, n),
                };
                // SAFETY: the tables cover every visible row of every token (checked above),
                // `scores` holds their sum; a share lies inside its token's rows.
                unsafe { self.kernels.indexer_scores(s, &call) }.map_err(kernel_err)?;
                self.stage(&mut stack.clock, "stack: indexer: top-k")?;
                fits(
                    "indexer top-k workspace",
                    sc.topk_work.len(),
                    topk_work_floats(n, class.max_visible, cfg.index_topk),
                )?;
                let k = cfg.index_topk;
                let select = TopKSelect {
                    scores: ptr(s, &sc.scores),
                    starts: class.out_starts,
                    counts: class.visible,
                    tokens: n,
                    k,
                    out_idx: ptr_mut(s, &mut sc.sel_idx),
                    out_val: ptr_mut(s, &mut sc.sel_val),
                    max_count: class.max_visible,
                    workspace: ptr_mut(s, &mut sc.topk_work),
                    index_base: 0,
                    index_order: false,
                    rounds_only: false,
                };
                match share {
                    None => {
                        // SAFETY: each token's scores lie inside `scores`; sel_* hold n *
                        // index_topk; max_visible bounds every row's visible count and
                        // topk_work holds the workspace for it (checked above).
                        unsafe { self.kernels.topk_select(s, &select) }.map_err(kernel_err)?;
                    }
                    Some(sh) => {
                        // This rank's share: its top k in row order (one block a token), or,
                        // where the share's select takes rounds, the last round's candidates
                        // (a superset of it, in row order, left in the workspace: the merge's
                        // select stands in for the share's last block). Every rank's gathered,
                        // then merged into the top k of the whole list.
                        let ranks = comm.world_size();
                        let last_round = sh.plan.last_round;
                        let stride = sh.plan.stride(k);
                        fits("indexer share top-k", sc.share_top.len(), 2 * n * k)?;
                        fits(
                            "gathered indexer shares",
                            sc.shares_gathered.len(),
                            ranks * 2 * n * stride,
                        )?;
                        let top = ptr_mut(s, &mut sc.share_top);
                        let call = TopKSelect {
                            starts: sh.score_starts,
                            counts: sh.counts,
                            out_val: top,
                            out_idx: top + (n * k * 4) as u64,
                            max_count: sh.plan.max_share,
                            index_base: sh.starts,
                            index_order: true,
                            rounds_only: last_round.is_some(),
                            ..select
                        };
                        // SAFETY: each share's scores lie inside `scores`; share_top holds 2 n
                        // k; max_share bounds every share and topk_work holds the workspace for
                        // the whole lists (checked above), so for the shares too.
                        unsafe { self.kernels.topk_select(s, &call) }.map_err(kernel_err)?;
                        self.stage(&mut stack.clock, "stack: all-gather")?;
                        let (send, from) = match last_round {
                            Some((bytes, _, _)) => (&sc.topk_work, bytes / 4),
                            None => (&sc.share_top, 0),
                        };
                        self.stack_all_gather(
                            comm,
                            send,
                            from,
                            2 * n * stride,
                            &mut sc.shares_gathered,
                        )?;
                        self.stage(&mut stack.clock, "stack: indexer: top-k")?;
                        let merge = TopKMergeRanks {
                            gathered: ptr(s, &sc.shares_gathered),
                            counts: sh.candidates,
                            per_rank: sh.per_rank,
                            stride,
                            max_count: ranks * stride,
                            tokens: n,
                            k,
                            out_idx: select.out_idx,
                            out_val: select.out_val,
                        };
                        // SAFETY: shares_gathered holds every rank's 2 n stride words, and no
                        // count exceeds what the ranks hold (indexer_rank_candidates).
                        unsafe { self.kernels.topk_merge_ranks(s, &merge) }.map_err(kernel_err)?;
                    }
                }
            }
        } else if aw.compressor.is_some() {
            key_mode = KeyMode::AllCompressed;
        } else {
            key_mode = KeyMode::Window;
        }
        self.stage(&mut stack.clock, "stack: attention")?;
        // Attention over each row's window + compressed rows, with the per-head sinks.
        let class = step
            .key_classes
            .iter()
            .find(|c| c.mode == key_mode && c.ratio == ratio)
            .ok_or_else(|| shape_err(format!("no key lists for layer {l}")))?;
        if class.total > 0 {
            fits("key offsets", sc.key_offsets.len(), class.total)?;
            let index_class = step.index_classes.iter().find(|c| c.ratio == ratio);
            // SAFETY: key_offsets holds `total` i64, the starts n + 1 i32 summing to it; the
            // selected indices (CSA) were written by topk_select for n rows of index_topk.
            unsafe {
                self.kernels.build_key_offsets(
                    s,
                    table,
                    bs,
                    cfg.sliding_window,
                    &window_section,
                    // A sliding layer reads no compressed rows (and has no such section).
                    &if key_mode == KeyMode::Window {
                        window_section
                    } else {
                        PoolSection {
                            floats_per_block: fpb,
                            base: start + lay.comp_rows,
                            stride: g.latent_slots,
                            ratio,
                            recent: false,
                        }
                    },
                    &KeySelection {
                        mode: key_mode,
                        selected: if key_mode == KeyMode::Selected {
                            ptr(s, &sc.sel_idx)
                        } else {
                            0
                        },
                        selected_counts: match (key_mode, index_class) {
                            (KeyMode::Selected, Some(c)) => c.selected,
                            _ => 0,
                        },
                        sel_stride: cfg.index_topk.max(1),
                    },
                    class.starts,
                    ptr_mut(s, &mut sc.key_offsets),
                    class.max_keys,
                )
            }
            .map_err(kernel_err)?;
        }
        let (grouped, splits) = attention_plan(
            class.max_keys,
            n,
            heads,
            model.pool.geometry.latent_format,
            self.kernels.multiprocessors(),
        );
        fits(
            "attention workspace",
            sc.attn_work.len(),
            attention_workspace_floats(n, heads, hd, splits),
        )?;
        let call = PagedAttention {
            pool,
            q: ptr(s, &sc.q),
            key_offsets: ptr(s, &sc.key_offsets),
            key_starts: class.starts,
            sinks: ptr(s, &layer.sinks),
            out: ptr_mut(s, &mut sc.attn),
            workspace: ptr_mut(s, &mut sc.attn_work),
            tokens: n,
            heads,
            head_dim: hd,
            splits,
            scale: (hd as f32).powf(-0.5),
            format: model.pool.geometry.latent_format,
            // K = V carried RoPE into the output; the merge undoes it at the query position.
            inverse_rope: Some(InverseRope {
                positions,
                inv_freq: ptr(s, rope),
                rope_dim: rd,
                attention_factor: rope_af,
            }),
            query_norm_eps: None,
            separate_merge: !Self::attention_fused(),
            out_f16: false,
        };
        let form = grouped.then(|| self.attention_tc_form(&call, n)).flatten();
        // The queries' per-head norm and RoPE: in the f16 forms' staging (no round trip of the
        // n x heads x 512 queries through memory), else one launch of their own first.
        let fuse_query = form.is_some_and(|f| f.is_f16()) && Self::attention_fused();
        // A GEMM step whose output projection runs on f16 tensor cores takes the attention's
        // rows in f16, written so by pass 1 where it finishes them (the rounding the GEMM would
        // apply to f32 rows: no f32 round trip, no conversion launch).
        let gemm_step = n > STACK_MAX_ROWS;
        let out_f16 = gemm_step
            && form.is_some_and(|f| finishes_in_pass_one(&call, f))
            && aw.wo_a.iter().all(|w| self.takes_f16_input(w));
        let call = PagedAttention {
            query_norm_eps: fuse_query.then_some(eps),
            out_f16,
            ..call
        };
        if !fuse_query {
            let q = ptr_mut(s, &mut sc.q);
            // SAFETY: q holds n * heads rows of head_dim; positions n i32; the RoPE table rd / 2.
            unsafe {
                self.kernels.rms_norm_rope_f32(
                    s,
                    &RmsNormRopeF32 {
                        norm: RmsNormF32 {
                            x: q,
                            out: q,
                            weight: 0,
                            rows: n * heads,
                            dim: hd,
                            ld_x: hd,
                            ld_out: hd,
                            eps,
                        },
                        positions,
                        inv_freq: ptr(s, rope),
                        heads,
                        rope_dim: rd,
                        attention_factor: rope_af,
                    },
                )
            }
            .map_err(kernel_err)?;
        }
        // The latent and compressed rows from the side stream.
        if let Some(branch) = side {
            branch.wait(s, SidePoint::AttentionKeys)?;
        }
        // SAFETY: q/attn hold n * heads * head_dim, the key lists were built above inside the
        // pool, the workspace has the size the launch asks for.
        unsafe {
            if let Some(form) = form {
                self.kernels.paged_attention_heads_tc_form(s, &call, form)
            } else if grouped {
                self.kernels.paged_attention_heads(s, &call)
            } else {
                self.kernels.paged_attention(s, &call)
            }
        }
        .map_err(kernel_err)?;
        self.stage(&mut stack.clock, "stack: output projection")?;
        // Grouped low-rank output projection, then wo_b and the sum over ranks.
        let group_in = cfg.num_attention_heads / cfg.o_groups * hd;
        let orank = cfg.o_lora_rank;
        let local_groups = aw.wo_a.len();
        if let Some(wg) = aw.wo_a.iter().find(|w| w.shape() != (orank, group_in)) {
            return Err(shape_err(format!(
                "layer {l}: wo_a group {:?}, expected [{orank}, {group_in}]",
                wg.shape()
            )));
        }
        if gemm_step {
            // One GEMM per group, reading its heads and writing its slot in place.
            let (xp, op) = (ptr(s, &sc.attn), ptr_mut(s, &mut sc.grouped));
            for (gi, wg) in aw.wo_a.iter().enumerate() {
                let y = op + (gi * orank * 4) as u64;
                let ldy = local_groups * orank;
                // SAFETY: attn rows hold local_groups * group_in values (f32, or f16 where
                // out_f16 had the attention write them so), grouped rows local_groups * orank;
                // group gi reads and writes its own columns.
                unsafe {
                    if out_f16 {
                        let xh = xp + (gi * group_in * 2) as u64;
                        self.gemm_linear_f16_input(xh, heads * hd, n, wg, y, ldy, &mut sc.gemm)
                    } else {
                        let x = xp + (gi * group_in * 4) as u64;
                        self.gemm_linear(x, heads * hd, n, wg, y, ldy, &mut sc.gemm, false)
                    }
                }?;
            }
        } else if let Some((w, scales)) = &layer.wo_a_stacked {
            // All groups in one launch per 16 rows: group g reads its heads at g * group_in.
            let (wp, sp) = (ptr(s, w), ptr(s, scales));
            let (xp, op) = (ptr(s, &sc.attn), ptr_mut(s, &mut sc.grouped));
            let n_out = local_groups * orank;
            for (start, m) in super::row_chunks(n, FP8_GEMV_MAX_M) {
                let (xs, os) = (
                    xp + (start * heads * hd * 4) as u64,
                    op + (start * n_out * 4) as u64,
                );
                if self.skinny(SkinnyWeight::Fp8, m, n_out, group_in) {
                    let call = SkinnyMma {
                        ld_x: heads * hd,
                        group_rows: orank,
                        x_group_stride: group_in,
                        ..SkinnyMma::plain(wp, SkinnyWeight::Fp8, sp, xs, os, (m, n_out, group_in))
                    };
                    // SAFETY: as the grouped GEMV below.
                    unsafe { self.kernels.skinny_mma(s, &call) }.map_err(kernel_err)?;
                    continue;
                }
                let call = Fp8GroupedGemv {
                    weight: wp,
                    scale: sp,
                    x: xs,
                    out: os,
                    m,
                    n: n_out,
                    k: group_in,
                    group_rows: orank,
                    x_group_stride: group_in,
                    ld_x: heads * hd,
                    ld_out: n_out,
                };
                // SAFETY: the stacked weight is [n_out, group_in] FP8 with its tiles; attn holds
                // n rows of heads * hd = local_groups * group_in, grouped n rows of n_out.
                unsafe { self.kernels.fp8_gemv_grouped(s, &call) }.map_err(kernel_err)?;
            }
        }
        let per_group = if gemm_step || layer.wo_a_stacked.is_some() {
            &aw.wo_a[..0]
        } else {
            &aw.wo_a[..]
        };
        for (gi, wg) in per_group.iter().enumerate() {
            if n == 1 {
                // One row: the group's heads and its output slot are contiguous already.
                let (rows, cols) = wg.shape();
                self.linear_on(
                    &sc.attn.slice(gi * group_in..gi * group_in + cols),
                    1,
                    wg,
                    &mut sc.grouped.slice_mut(gi * orank..gi * orank + rows),
                )?;
                continue;
            }
            let src = ptr(s, &sc.attn) + (gi * group_in * 4) as u64;
            let dst = ptr_mut(s, &mut sc.group_in);
            // SAFETY: attn rows hold local_groups * group_in values, group_in n rows of it.
            unsafe {
                self.kernels.copy_rows_f32(
                    s,
                    &CopyRowsF32 {
                        src,
                        ld_src: heads * hd,
                        dst,
                        ld_dst: group_in,
                        rows: n,
                        width: group_in,
                    },
                )
            }
            .map_err(kernel_err)?;
            self.stack_linear(&sc.group_in, n, wg, &mut sc.group_out, &mut sc.gemm, false)?;
            let src = ptr(s, &sc.group_out);
            let dst = ptr_mut(s, &mut sc.grouped) + (gi * orank * 4) as u64;
            // SAFETY: group_out holds n rows of orank, grouped n rows of local_groups * orank.
            unsafe {
                self.kernels.copy_rows_f32(
                    s,
                    &CopyRowsF32 {
                        src,
                        ld_src: orank,
                        dst,
                        ld_dst: local_groups * orank,
                        rows: n,
                        width: orank,
                    },
                )
            }
            .map_err(kernel_err)?;
        }
        self.stack_linear(
            &sc.grouped,
            n,
            &aw.wo_b,
            &mut sc.sub_out,
            &mut sc.gemm,
            false,
        )?;
        self.stage(&mut stack.clock, "stack: all-reduce")?;
        self.reduce_sub_out(comm, &mut sc.sub_out, h, step.hc)?;
        self.stage(&mut stack.clock, "stack: hyper-connections (post)")?;
        let side_on = self.side_stream_on() && stack.clock.is_none();
        let next = (&layer.hc_ffn, &layer.ffn_norm);
        let side = stack.side.as_ref().filter(|_| side_on);
        self.hc_post_then(side, sc, cfg, step.hc, Some(next), false)
    }

    fn stack_ffn(
        &self,
        stack: &mut CudaLayerStack,
        model: &StackModel<'_, CudaBackend>,
        comm: &dyn Communicator,
        step: &StepShape<'_>,
        l: usize,
    ) -> Result<(), BackendError> {
        let n = step.n;
        let cfg = model.cfg;
        let s = &self.stream;
        let mw = &model.weights.layers[l].moe;
        let layer = &stack.layers[l];
        let sc = &mut stack.scratch;
        let h = cfg.hidden_size;
        let (e, k) = (cfg.n_routed_experts, cfg.num_experts_per_tok);
        // A split step gathers its normed input after the router has run on its own rows
        // (below), with the routes.
        let side_on = self.side_stream_on() && stack.clock.is_none();
        self.hc_pre_rows(
            &mut stack.clock,
            stack.side.as_ref().filter(|_| side_on),
            sc,
            &layer.hc_ffn,
            &layer.ffn_norm,
            cfg,
            step.hc,
        )?;
        // A decode step's shared expert runs on the side stream beside the router, the routing
        // and the routed experts' products (not while profiling); their combine, which adds it,
        // waits for it. Its matrices must have GEMVs there.
        let sh = &mw.shared;
        let side = stack.side.as_ref().filter(|_| {
            self.side_stream_on()
                && stack.clock.is_none()
                && n <= STACK_MAX_ROWS
                && matches!(mw.experts, CudaExpertBank::Fp4(_))
                && [&sh.w1, &sh.w3, &sh.w2].into_iter().all(gemv_weight)
        });
        let shared_ready = match side {
            Some(branch) => {
                let on = branch.fork(s)?;
                self.shared_expert_on(on, sc, sh, n, cfg.swiglu_limit)?;
                Some(branch.mark(SidePoint::SharedExpert)?)
            }
            None => None,
        };
        self.stage(&mut stack.clock, "stack: router")?;
        // The rows this rank routes: its own in a split step, whose routes are then gathered.
        let routed = if step.hc.is_split() {
            self.own_rows_linear_many(
                &sc.x,
                step.hc,
                &mut [(&mw.gate, &mut sc.router_logits)],
                &mut sc.gemm,
            )?;
            step.hc
        } else {
            self.stack_linear(
                &sc.x,
                n,
                &mw.gate,
                &mut sc.router_logits,
                &mut sc.gemm,
                false,
            )?;
            HcRows::whole(n)
        };
        let routed_end = routed.start + routed.len;
        fits("router logits", sc.router_logits.len(), routed_end * e)?;
        fits("route ids", sc.route_ids.len(), routed_end * k)?;
        fits("route weights", sc.route_weights.len(), routed_end * k)?;
        let (bias, hash) = match &layer.routes {
            RouteTable::Bias(b) => (ptr(s, b), 0),
            RouteTable::Hash(t) => (0, ptr(s, t)),
        };
        let call = RouteF32 {
            logits: rows_at(ptr(s, &sc.router_logits), routed.start, e),
            scoring: match cfg.scoring_func {
                ScoringFunc::Sigmoid => RouterScoring::Sigmoid,
                ScoringFunc::SqrtSoftplus => RouterScoring::SqrtSoftplus,
            },
            bias,
            hash_table: hash,
            token_ids: rows_at(step.ids, routed.start, 1),
            vocab: cfg.vocab_size,
            n: routed.len,
            experts: e,
            k,
            routed_scaling_factor: cfg.routed_scaling_factor,
            out_ids: rows_at(ptr_mut(s, &mut sc.route_ids), routed.start, k),
            out_weights: rows_at(ptr_mut(s, &mut sc.route_weights), routed.start, k),
        };
        if routed.len > 0 {
            // SAFETY: the logits, ids and weights hold routed.start + routed.len rows (checked
            // above), the step's ids n >= that many; the tables are the layer's.
            unsafe { self.kernels.route_f32(s, &call) }.map_err(kernel_err)?;
        }
        // Where every reader of the gathered input rounds it to f16 (the shared expert's f16
        // GEMMs, the grouped experts' gather), the ranks exchange it so rounded: half the bytes
        // of the f32 rows, the same values for every reader.
        let x_f16 =
            step.hc.is_split() && self.ffn_takes_f16_rows(mw, sc, h, comm.world_size(), step.hc);
        if step.hc.is_split() {
            self.stage(&mut stack.clock, "stack: all-gather")?;
            let x_rows = if x_f16 {
                self.ffn_f16_gathers.fetch_add(1, Ordering::Relaxed);
                let (first, len) = (step.hc.start, step.hc.len);
                let from = rows_at(ptr(s, &sc.x), first, h);
                // f16 rows of `h` values are h / 2 four-byte units.
                let into = rows_at(ptr_mut(s, &mut sc.x_f16), first, h / 2);
                // SAFETY: x holds this rank's rows of hidden f32 and x_f16 room for every rank's
                // rows of hidden f16 (ffn_takes_f16_rows checked both widths and lengths).
                unsafe { self.kernels.rows_to_f16(s, from, h, into, len, h) }
                    .map_err(kernel_err)?;
                SplitBuffer::of_f16(s, &mut sc.x_f16, h)
            } else {
                SplitBuffer::of(s, &mut sc.x, h)
            };
            let gathered = [
                x_rows,
                SplitBuffer::of(s, &mut sc.route_ids, k),
                SplitBuffer::of(s, &mut sc.route_weights, k),
            ];
            self.gather_split_rows(comm, step.hc, &gathered)?;
        }
        // The shared expert first (unless it runs on the side stream), through the scratch (no
        // allocation inside a captured step).
        if shared_ready.is_none() {
            self.stage(&mut stack.clock, "stack: shared expert")?;
            let sh = &mw.shared;
            let inter = sh.w1.shape().0;
            if x_f16 {
                let xh = ptr(s, &sc.x_f16);
                for (w, y) in [(&sh.w1, &mut sc.shared_gate), (&sh.w3, &mut sc.shared_up)] {
                    fits("shared expert rows", y.len(), n * inter)?;
                    let yp = ptr_mut(s, y);
                    // SAFETY: x_f16 holds n rows of hidden f16 (gathered above), y n rows of
                    // the shared expert's inter f32 (checked).
                    unsafe { self.gemm_linear_f16_input(xh, h, n, w, yp, inter, &mut sc.gemm) }?;
                }
            } else {
                self.stack_linear_many(
                    &sc.x,
                    n,
                    &mut [(&sh.w1, &mut sc.shared_gate), (&sh.w3, &mut sc.shared_up)],
                    &mut sc.gemm,
                )?;
            }
            let (g, u, a) = (
                ptr(s, &sc.shared_gate),
                ptr(s, &sc.shared_up),
                ptr_mut(s, &mut sc.shared_act),
            );
            // SAFETY: gate, up and act hold n rows of the shared expert's inter size.
            unsafe {
                self.kernels
                    .swiglu_clip(s, g, u, a, n * inter, cfg.swiglu_limit)
            }
            .map_err(kernel_err)?;
            self.stack_linear(
                &sc.shared_act,
                n,
                &sh.w2,
                &mut sc.shared_down,
                &mut sc.gemm,
                false,
            )?;
        }
        // The routed experts' sum takes the shared expert's output as its addend where the
        // kernel can (the FP4 decode path), else it is added after.
        let mut shared_added = false;
        self.stage(&mut stack.clock, "stack: routed experts")?;
        match (&mw.experts, &layer.dense_experts) {
            (CudaExpertBank::Fp4(b), _) if n > STACK_MAX_ROWS => {
                let x = if x_f16 {
                    ExpertRows::F16(ptr(s, &sc.x_f16))
                } else {
                    ExpertRows::F32(ptr(s, &sc.x))
                };
                let (w, out, addend) = (
                    ptr(s, &sc.route_weights),
                    ptr_mut(s, &mut sc.sub_out),
                    ptr(s, &sc.shared_down),
                );
                shared_added = true;
                self.sorted_experts(
                    &mut stack.clock,
                    b,
                    &mut sc.gemm,
                    x,
                    &sc.route_ids,
                    w,
                    &mut sc.expert_h,
                    &mut sc.expert_partial,
                    (out, addend),
                    n,
                    k,
                    cfg.swiglu_limit,
                )?;
            }
            (CudaExpertBank::Fp4(b), _) => {
                let bank = self.fp4_experts(
                    [&b.w1, &b.s1, &b.w3, &b.s3, &b.w2, &b.s2],
                    b.experts,
                    b.hidden,
                    b.inter,
                );
                let call = Fp4MoeCall {
                    x: ptr(s, &sc.x),
                    ids: ptr(s, &sc.route_ids),
                    weights: ptr(s, &sc.route_weights),
                    h: ptr_mut(s, &mut sc.expert_h),
                    partial: ptr_mut(s, &mut sc.expert_partial),
                    out: ptr_mut(s, &mut sc.sub_out),
                    out_dtype: OutDtype::F32,
                    tokens: n,
                    topk: k,
                    swiglu_limit: cfg.swiglu_limit,
                    addend: ptr(s, &sc.shared_down),
                };
                shared_added = true;
                // SAFETY: the bank is this layer's FP4 weights; ids come from the router (below
                // `experts`), the scratch holds n * k rows of inter / hidden. With the shared
                // expert on the side stream, the combine reads its output after `ready`, the
                // side stream's mark after its last write.
                unsafe {
                    match shared_ready {
                        Some(ready) => self.kernels.fp4_moe_after(s, &bank, &call, ready),
                        None => self.kernels.fp4_moe(s, &bank, &call),
                    }
                }
                .map_err(kernel_err)?;
            }
            (_, Some(d)) => {
                // SAFETY: the dense bank is [experts, inter, hidden] x2 and [experts, hidden,
                // inter]; the scratch holds n * k rows of inter, sub_out n rows of hidden.
                unsafe {
                    self.kernels.dense_experts_f32(
                        s,
                        &DenseExpertsF32 {
                            w1: ptr(s, &d.w1),
                            w3: ptr(s, &d.w3),
                            w2: ptr(s, &d.w2),
                            x: ptr(s, &sc.x),
                            ids: ptr(s, &sc.route_ids),
                            weights: ptr(s, &sc.route_weights),
                            h_scratch: ptr_mut(s, &mut sc.expert_h),
                            out: ptr_mut(s, &mut sc.sub_out),
                            n,
                            k,
                            experts: d.experts,
                            hidden: d.hidden,
                            inter: d.inter,
                            limit: cfg.swiglu_limit,
                        },
                    )
                }
                .map_err(kernel_err)?;
            }
            _ => return Err(shape_err(format!("layer {l}: no device experts"))),
        }
        if !shared_added {
            let (acc, down) = (ptr_mut(s, &mut sc.sub_out), ptr(s, &sc.shared_down));
            // SAFETY: sub_out and shared_down both hold n rows of hidden.
            unsafe { self.kernels.add_into(s, acc, down, n * h) }.map_err(kernel_err)?;
        }
        self.stage(&mut stack.clock, "stack: all-reduce")?;
        self.reduce_sub_out(comm, &mut sc.sub_out, h, step.hc)?;
        self.stage(&mut stack.clock, "stack: hyper-connections (post)")?;
        // The last layer's streams go to the head: in a seam with its collapse where the step
        // runs it, else to the caller.
        let side_on = self.side_stream_on() && stack.clock.is_none();
        let up = stack.layers.get(l + 1);
        let to_head = up.is_none() && step.head;
        let next = match up {
            Some(up) => Some((&up.hc_attn, &up.attn_norm)),
            None => step.head.then_some((&stack.head.site, &stack.head.norm)),
        };
        let side = stack.side.as_ref().filter(|_| side_on);
        self.hc_post_then(side, sc, cfg, step.hc, next, to_head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seam_tokens_per_cluster_takes_the_built_forms_and_reports_the_rest() {
        assert_eq!(seam_tokens_per_cluster(None), Ok(0));
        for (v, want) in [("0", 0), ("1", 1), (" 2", 2), ("4 ", 4)] {
            assert_eq!(seam_tokens_per_cluster(Some(v)), Ok(want), "{v:?}");
        }
        for bad in ["3", "8", "-1", "two", ""] {
            assert_eq!(seam_tokens_per_cluster(Some(bad)), Err(bad.to_string()));
        }
    }

    #[test]
    fn seam_max_tokens_takes_1_to_16_and_reports_the_rest() {
        assert_eq!(seam_max_tokens(None), Ok(HC_SEAM_DEFAULT_MAX_TOKENS));
        assert_eq!(seam_max_tokens(Some("1")), Ok(1));
        assert_eq!(seam_max_tokens(Some(" 16 ")), Ok(16));
        for bad in ["0", "17", "-1", "two", ""] {
            assert_eq!(seam_max_tokens(Some(bad)), Err(bad.to_string()), "{bad}");
        }
    }

    #[test]
    fn attention_tc_switch_defaults_to_every_step() {
        assert_eq!(AttentionTcSteps::from_env(None), AttentionTcSteps::All);
        assert_eq!(
            AttentionTcSteps::from_env(Some("all")),
            AttentionTcSteps::All
        );
        assert_eq!(
            AttentionTcSteps::from_env(Some("prefill")),
            AttentionTcSteps::Prefill
        );
        assert_eq!(AttentionTcSteps::from_env(Some("0")), AttentionTcSteps::Off);
        assert_eq!(AttentionTcSteps::from_env(Some("1")), AttentionTcSteps::All);
        assert_eq!(
            AttentionTcSteps::from_env(Some(" prefill")),
            AttentionTcSteps::Prefill
        );
        assert!(AttentionTcSteps::Prefill.takes(STACK_MAX_ROWS + 1));
        assert!(!AttentionTcSteps::Prefill.takes(STACK_MAX_ROWS));
        assert!(AttentionTcSteps::All.takes(1) && !AttentionTcSteps::Off.takes(100_000));
        for steps in [
            AttentionTcSteps::Off,
            AttentionTcSteps::Prefill,
            AttentionTcSteps::All,
        ] {
            assert_eq!(AttentionTcSteps::from_code(steps.code()), steps);
        }
    }

    #[test]
    fn split_hyper_connection_rows_tile_the_step_in_equal_shares() {
        for (n, ranks) in [(8192, 2), (77, 2), (100, 4), (65, 3), (4097, 8)] {
            let mut next = 0;
            for rank in 0..ranks {
                let r = HcRows::split(n, ranks, rank);
                assert!(r.is_split());
                assert_eq!(r.share, n.div_ceil(ranks));
                assert_eq!(r.start, next);
                assert!(r.len <= r.share);
                next = r.start + r.len;
            }
            assert_eq!(next, n, "{n} rows over {ranks} ranks");
        }
        let one = HcRows::split(77, 2, 1);
        assert_eq!((one.start, one.len), (39, 38));
        let whole = HcRows::whole(300);
        assert!(!whole.is_split());
        assert_eq!((whole.start, whole.len), (0, 300));
    }

    #[test]
    fn rows_are_chunked_for_the_gemv_kernels() {
        let chunks = |n| super::super::row_chunks(n, 16).collect::<Vec<_>>();
        assert_eq!(chunks(0), vec![]);
        assert_eq!(chunks(1), vec![(0, 1)]);
        assert_eq!(chunks(16), vec![(0, 16)]);
        assert_eq!(chunks(37), vec![(0, 16), (16, 16), (32, 5)]);
    }

    /// The packing and the launch bounds are host code: checked here without a GPU.
    #[test]
    fn every_rows_keys_fit_its_buckets_bound() {
        let (window, topk) = (128, 512);
        for max_pos in [0usize, 5, 127, 1023, 1024, 8191, 8192, 131_071, 1_048_447] {
            let bucket = context_bucket(max_pos);
            assert!(bucket > max_pos && bucket >= MIN_CONTEXT_BUCKET);
            assert!(bucket.is_power_of_two());
            let positions: Vec<usize> = (0..=max_pos).rev().step_by(97).take(64).collect();
            for (mode, ratio) in [
                (KeyMode::Window, 0),
                (KeyMode::AllCompressed, 128),
                (KeyMode::Selected, 4),
            ] {
                let bound = key_bound(mode, ratio, window, topk, bucket);
                let counts = key_counts(&positions, window, ratio.max(1), mode, topk);
                assert!(
                    counts.iter().all(|&c| c <= bound),
                    "{mode:?} at {max_pos}: {counts:?} over {bound}"
                );
            }
        }
    }

    #[test]
    fn step_metadata_lands_at_fixed_offsets_and_tables_are_packed_once() {
        let table_a: Vec<u32> = vec![7, 3, 9];
        let table_b: Vec<u32> = vec![4];
        let recent_a: Vec<u32> = vec![u32::MAX, 0, 5];
        let recent_b: Vec<u32> = vec![2];
        let rows = StackRows {
            positions: vec![300, 301, 5],
            ids: vec![11, 12, 13],
            block_tables: vec![&table_a, &table_a, &table_b],
            recent_tables: vec![&recent_a, &recent_a, &recent_b],
        };
        let lay = MetaLayout::GRAPHED;
        let mut meta = MetaBuilder::new(lay);
        CudaBackend::pack_rows(&mut meta, &rows).unwrap();
        assert_eq!(
            &meta.i32s[lay.positions()..lay.positions() + 3],
            &[300, 301, 5]
        );
        assert_eq!(&meta.i32s[lay.ids()..lay.ids() + 3], &[11, 12, 13]);
        // Rows of one sequence share one packed table, its recent table right after it; the
        // other sequence's follow them.
        assert_eq!(&meta.i32s[lay.bt_starts()..lay.bt_starts() + 3], &[0, 0, 6]);
        assert_eq!(&meta.i32s[lay.bt_lens()..lay.bt_lens() + 3], &[3, 3, 1]);
        assert_eq!(&meta.i32s[lay.tables()..], &[7, 3, 9, -1, 0, 5, 4, 2]);

        let (total, max) = CudaBackend::pack_keys(
            &mut meta,
            1,
            &rows.positions,
            128,
            KeyMode::AllCompressed,
            128,
            512,
        )
        .unwrap();
        let counts = key_counts(&rows.positions, 128, 128, KeyMode::AllCompressed, 512);
        let at = lay.keys(1);
        let starts = &meta.i32s[at..at + 4];
        assert_eq!(starts[0], 0);
        for r in 0..3 {
            assert_eq!((starts[r + 1] - starts[r]) as usize, counts[r]);
        }
        assert_eq!(total, counts.iter().sum::<usize>());
        assert_eq!(max, *counts.iter().max().unwrap());

        CudaBackend::pack_indexer(&mut meta, 0, &rows.positions, 4, 512, None).unwrap();
        let visible: [usize; 3] = [301 / 4, 302 / 4, 6 / 4];
        assert_eq!(
            &meta.i32s[lay.index(0)..lay.index(0) + 3],
            &visible.map(|v| v as i32)
        );
        assert_eq!(
            &meta.i32s[lay.index(0) + lay.room..lay.index(0) + lay.room + 3],
            &visible.map(|v| v.min(512) as i32)
        );
        assert_eq!(
            &meta.i64s[..3],
            &[0, visible[0] as i64, (visible[0] + visible[1]) as i64]
        );

        // Rank 1 of 2 splitting the rows of indexer class 1 (k = 32): shares of max(ceil(v /
        // 2), 32) rows, so a token of 75 rows is split 38 / 37, one of 1 row is rank 0's alone.
        let positions = [300usize, 5, 4000];
        CudaBackend::pack_indexer(&mut meta, 1, &positions, 4, 32, Some((2, 1, 0))).unwrap();
        let at = lay.index(1);
        let room = lay.room;
        let arrays = |i: usize| meta.i32s[at + i * room..at + i * room + 3].to_vec();
        assert_eq!(arrays(0), [75, 1, 1000]);
        assert_eq!(arrays(1), [32, 1, 32]);
        assert_eq!(arrays(2), [38, 1, 500], "share starts");
        assert_eq!(arrays(3), [75, 1, 1000], "share ends");
        assert_eq!(arrays(4), [37, 0, 500], "share counts");
        assert_eq!(arrays(5), [64, 1, 64], "candidates of both ranks");
        assert_eq!(arrays(6), [32, 1, 32], "candidates of rank 0");
        // Score starts, then the share's: the token's start plus its share's first row.
        assert_eq!(&meta.i64s[2 * room..2 * room + 3], &[0, 75, 76]);
        assert_eq!(&meta.i64s[3 * room..3 * room + 3], &[38, 76, 576]);
        // Class 0 was not split: its arrays are untouched.
        assert_eq!(&meta.i64s[..3], &[0, 75, 150]);
        // A 1M-context decode token (262,112 rows) whose shares' selects take two rounds before
        // the merge: each rank keeps 4 x 512 candidates of its 131,056 rows.
        let plan = SharePlan::of(2, 1 << 20, 4, INDEXER_SPLIT_ROWS, 1, 512).unwrap();
        assert_eq!(
            (plan.max_share, plan.levels(), plan.stride(512)),
            (131_072, 2, 2_048)
        );
        CudaBackend::pack_indexer(&mut meta, 2, &[1_048_448], 4, 512, Some((2, 0, 2))).unwrap();
        let at = lay.index(2);
        assert_eq!(meta.i32s[at], 262_112);
        assert_eq!(meta.i32s[at + 4 * room], 131_056, "share counts");
        assert_eq!(meta.i32s[at + 5 * room], 4_096, "candidates of both ranks");
        assert_eq!(meta.i32s[at + 6 * room], 2_048, "candidates of rank 0");
        // Splitting starts above the threshold's compressed rows, and only with more than one
        // rank.
        assert!(!indexer_splits(2, 32_768, 4, INDEXER_SPLIT_ROWS));
        assert!(indexer_splits(2, 65_536, 4, INDEXER_SPLIT_ROWS));
        assert!(!indexer_splits(1, 1 << 20, 4, INDEXER_SPLIT_ROWS));
        assert!(indexer_splits(2, 1024, 4, 0));
    }

    #[test]
    fn graphed_steps_keep_one_layout_and_gemm_steps_get_room_for_their_rows() {
        let small = MetaLayout::for_rows(STACK_MAX_ROWS);
        assert_eq!(small, MetaLayout::GRAPHED);
        assert_eq!(MetaLayout::for_rows(1), MetaLayout::GRAPHED);
        // The graphed layout is the one captured graphs were built on: positions first, tables
        // after every per-row section.
        assert_eq!(small.positions(), 0);
        assert_eq!(small.ids(), STACK_MAX_ROWS);
        assert_eq!(small.keys(0), 4 * STACK_MAX_ROWS);
        let big = MetaLayout::for_rows(3000);
        assert_eq!(big.room, 3000);
        // Sections never overlap: each ends where the next starts.
        assert_eq!(big.keys(MAX_KEY_CLASSES), big.index(0));
        assert_eq!(big.index(MAX_INDEX_CLASSES), big.tables());
        let rows = StackRows {
            positions: (0..3000).collect(),
            ids: vec![1; 3000],
            block_tables: vec![&[0u32][..]; 3000],
            recent_tables: vec![&[0u32][..]; 3000],
        };
        let mut meta = MetaBuilder::new(big);
        CudaBackend::pack_rows(&mut meta, &rows).unwrap();
        assert_eq!(meta.i32s[big.positions() + 2999], 2999);
        assert_eq!(meta.i32s[big.ids() + 2999], 1);
        assert_eq!(meta.i32s.len(), big.tables() + 2);
    }

    #[test]
    fn attention_groups_heads_for_gemm_steps_and_long_lists_only() {
        let sms = 132;
        // Decode at 8K context (~700 keys): one block per head.
        let f32 = KvRowFormat::F32;
        assert!(!attention_plan(700, 1, 32, f32, sms).0);
        // Decode over a 1M-context HCA list: grouped, with more splits for fewer head blocks.
        let (grouped, splits) = attention_plan(8320, 1, 32, f32, sms);
        assert!(grouped);
        assert!(splits > attention_splits(8320, 1, 32, sms));
        // A GEMM step: grouped whatever the list.
        assert!(attention_plan(700, 4096, 64, f32, sms).0);
        // FP8 or bf16 rows: grouped, so each row is decoded once per group of heads.
        assert!(attention_plan(700, 1, 32, KvRowFormat::Fp8Latent { rope: 64 }, sms).0);
        assert!(attention_plan(700, 1, 32, KvRowFormat::Bf16, sms).0);
        // Heads that do not divide into groups never are.
        assert!(!attention_plan(8320, 4096, 4, f32, sms).0);
    }

    #[test]
    fn gemm_pieces_shrink_with_the_context_to_bound_indexer_scores() {
        let cfg = crate::engine::model::ModelConfig::from_json_str(include_str!(
            "../../../tests/fixtures/v4-flash-config.json"
        ))
        .unwrap();
        let rows = |bucket| gemm_piece_rows(bucket, &cfg, GEMM_PIECE_ROWS);
        assert_eq!(rows(8192), GEMM_PIECE_ROWS);
        assert_eq!(rows(131_072), GEMM_PIECE_ROWS);
        let at_1m = rows(1 << 20);
        assert_eq!(at_1m, 1024);
        assert!(at_1m * ((1 << 20) / 4) <= GEMM_PIECE_SCORES);
        assert!(rows(1 << 30) > STACK_MAX_ROWS);
        // Twice the rows a piece: twice the scores, so the same cut-over at long contexts.
        let wide = |bucket| gemm_piece_rows(bucket, &cfg, 2 * GEMM_PIECE_ROWS);
        assert_eq!(wide(8192), 2 * GEMM_PIECE_ROWS);
        assert_eq!(wide(131_072), 2 * GEMM_PIECE_ROWS);
        assert_eq!(wide(1 << 20), 2 * at_1m);
    }

    #[test]
    fn gemm_piece_rows_switch_is_clamped() {
        assert_eq!(parse_gemm_piece_rows(None), None);
        assert_eq!(parse_gemm_piece_rows(Some("x")), None);
        assert_eq!(parse_gemm_piece_rows(Some(" 16384")), Some(16384));
        assert_eq!(parse_gemm_piece_rows(Some("8")), Some(STACK_MAX_ROWS + 1));
        assert_eq!(parse_gemm_piece_rows(Some("10000000")), Some(1 << 16));
    }
}
