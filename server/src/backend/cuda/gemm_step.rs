//! The layer stack's GEMM steps (more than [`super::layer_stack::STACK_MAX_ROWS`] rows: prefill
//! chunks). A GEMV re-reads the weight for every 16 rows; here each weight is widened to f32 once
//! per step and multiplied by cuBLAS over all rows, and the routed experts are sorted by expert so
//! that each expert's rows are one GEMM on its widened weights.
//!
//! Precision: by default the GEMMs run on the TF32 tensor cores. Every checkpoint weight (e4m3,
//! e2m1, bf16, times a power-of-two scale) is exact in TF32, so only the activations round, to
//! 11 significant bits (relative 2^-11 per element) with f32 accumulation, finer than the bf16
//! activations the reference recipe runs. `DSPARK_GEMM_TF32=0` (or
//! [`CudaBackend::set_gemm_tf32`]) keeps them f32 for exact comparisons.
//!
//! The routed experts go one step further where that keeps the same accuracy: a bank whose block
//! scales all lie in `F16_EXACT_SCALES` (checked once when the bank is built) is widened to f16,
//! exactly, and its activations round to f16 (11 significant bits, as TF32 keeps; activations
//! must stay below 65504 in magnitude, as the decode mma2 kernels already assume), so its GEMMs
//! run on the f16 tensor cores with f32 accumulation and outputs: half the widened bytes and
//! twice the TF32 rate (8 layers of an 8K prefill on H200: widening 64 -> 43 ms, GEMMs 151 -> 77
//! ms). `DSPARK_EXPERT_GEMM=tf32` keeps them on the TF32 path.
//!
//! Where the bank's shape and scales allow (`Fp4Bank::grouped_shift`), the experts skip the
//! widening altogether: the grouped FP4 kernels (`dspark_kernels::launch::moe_grouped`) decode
//! the weights inside the GEMM, on the same f16 tensor cores with the same f16 activations, all
//! experts in one launch per matrix, and apply the SwiGLU to the gate/up accumulators. That is
//! the default; `DSPARK_EXPERT_GEMM=widen` keeps the widened-f16 cuBLAS path for an A/B.
//!
//! The grouped path also sorts the (token, slot) pairs by expert on the device
//! (`Kernels::moe_sort`, the host's order and tiles bit for bit), so the stream never waits for
//! the router's ids; the widened paths, banks of more than `MOE_SORT_MAX_EXPERTS` experts and
//! `DSPARK_EXPERT_SORT=host` sort on the host ([`ExpertOrder`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdeviceptr, CUevent_flags};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use dspark_kernels::launch::moe_grouped::{
    fp4_grouped_max_tiles_of, fp4_grouped_tiles_of, Fp4GroupedBank,
};
use dspark_kernels::launch::moe_sorted::{
    GatherInto, MoeSortBuffers, MoeSortShape, MOE_SORT_MAX_EXPERTS,
};

use super::layer_stack::{fits, GemmScratch, StageClock};
use super::{driver_err, kernel_err, CudaBackend, CudaMatrix, Fp4Bank};
use crate::backend::BackendError;

/// Most bytes of widened expert weights one group of experts takes (f32 w1, w3, w2).
const EXPERT_GROUP_BYTES: usize = 1 << 30;

/// Experts widened at once: as many w1/w3/w2 triples as fit [`EXPERT_GROUP_BYTES`] (at least 1).
fn expert_group(inter: usize, hidden: usize) -> usize {
    (EXPERT_GROUP_BYTES / (4 * 3 * inter * hidden).max(1)).max(1)
}

/// f32 values of one group of widened experts of a bank of `experts`.
pub(super) fn expert_group_floats(experts: usize, inter: usize, hidden: usize) -> usize {
    expert_group(inter, hidden).min(experts.max(1)) * 3 * inter * hidden
}

/// Whether the environment lets GEMM steps use TF32 (`DSPARK_GEMM_TF32=0` forbids it).
pub(super) fn tf32_allowed() -> bool {
    std::env::var("DSPARK_GEMM_TF32").map_or(true, |v| v != "0")
}

fn gemm_err(detail: String) -> BackendError {
    BackendError::Shape {
        op: "gemm_step",
        detail,
    }
}

fn dim(v: usize) -> Result<i32, BackendError> {
    i32::try_from(v).map_err(|_| gemm_err(format!("{v} exceeds cuBLAS's int range")))
}

/// The experts of a step's (token, slot) pairs in expert order: `tokens[i]` is sorted pair i's
/// token, `slots[t * topk + j]` where pair (t, j) went (-1: an id outside the bank, which adds
/// nothing, as in the decode kernels), and each used expert with its run of sorted rows.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct ExpertOrder {
    pub(super) tokens: Vec<i32>,
    pub(super) slots: Vec<i32>,
    /// (expert, first sorted row, rows).
    pub(super) runs: Vec<(usize, usize, usize)>,
}

impl ExpertOrder {
    /// Stable by pair order within an expert, so the result does not depend on thread timing.
    pub(super) fn of(ids: &[i32], topk: usize, experts: usize) -> Self {
        let mut counts = vec![0usize; experts];
        for &e in ids {
            if let Some(c) = usize::try_from(e).ok().and_then(|e| counts.get_mut(e)) {
                *c += 1;
            }
        }
        let mut next = vec![0usize; experts];
        let mut runs = Vec::new();
        let mut at = 0;
        for (e, &c) in counts.iter().enumerate() {
            next[e] = at;
            if c > 0 {
                runs.push((e, at, c));
            }
            at += c;
        }
        let mut tokens = vec![0i32; at];
        let mut slots = vec![-1i32; ids.len()];
        for (p, &e) in ids.iter().enumerate() {
            let Some(row) = usize::try_from(e).ok().and_then(|e| next.get_mut(e)) else {
                continue;
            };
            // Rows and tokens are below the step's pair count, an i32-sized kernel argument.
            tokens[*row] = (p / topk.max(1)) as i32;
            slots[p] = *row as i32;
            *row += 1;
        }
        Self {
            tokens,
            slots,
            runs,
        }
    }
}

/// The activations of a routed-expert call (`n` rows of hidden): f32, or already rounded to f16
/// (a split step's gathered rows, [`CudaBackend::experts_take_f16_rows`]), which only the grouped
/// kernels that gather through their own loads take.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum ExpertRows {
    F32(CUdeviceptr),
    F16(CUdeviceptr),
}

/// The step's side of a routed-expert call: activations `x` (`n` rows), the router's weights
/// (`n * topk`), where the summed outputs go, and the SwiGLU clip.
#[derive(Clone, Copy, Debug)]
pub(super) struct GroupedIo {
    x: ExpertRows,
    route_weights: CUdeviceptr,
    out: CUdeviceptr,
    /// Rows added to the sum (the shared expert's output), or 0.
    addend: CUdeviceptr,
    n: usize,
    topk: usize,
    limit: f32,
}

/// One `y = x W^T` of a grouped call (pointers and strides as [`CudaBackend::gemm_rows`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct GemmProblem {
    pub(super) x: CUdeviceptr,
    pub(super) ldx: usize,
    pub(super) n: usize,
    pub(super) w: CUdeviceptr,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) y: CUdeviceptr,
    pub(super) ldy: usize,
}

/// The element type of a GEMM's x and W (y is always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GemmInputs {
    /// f32, with the step's compute type (TF32 tensor cores unless turned off).
    F32,
    /// f16 on the f16 tensor cores, f32 accumulation: the routed experts of a bank whose values
    /// are exact in f16, with activations rounded to f16 (11 significant bits, as TF32 keeps).
    F16,
}

impl GemmInputs {
    fn data_type(self) -> cudaDataType {
        match self {
            GemmInputs::F32 => cudaDataType::CUDA_R_32F,
            GemmInputs::F16 => cudaDataType::CUDA_R_16F,
        }
    }

    /// The compute type for inputs of this kind, given the step's f32 one.
    fn compute(self, f32_compute: cublasComputeType_t) -> cublasComputeType_t {
        match self {
            GemmInputs::F32 => f32_compute,
            GemmInputs::F16 => cublasComputeType_t::CUBLAS_COMPUTE_32F,
        }
    }

    /// Bytes of one element.
    fn bytes(self) -> usize {
        match self {
            GemmInputs::F32 => 4,
            GemmInputs::F16 => 2,
        }
    }
}

/// A switch's value from the environment variable `var`, parsed once per process into `cell`.
fn env_choice<T: Copy>(cell: &'static OnceLock<T>, var: &str, parse: fn(Option<&str>) -> T) -> T {
    *cell.get_or_init(|| parse(std::env::var(var).ok().as_deref()))
}

/// How GEMM steps multiply the routed experts of an FP4 bank, from `DSPARK_EXPERT_GEMM`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ExpertGemm {
    /// The grouped kernels with the FP4 weights decoded inside (default), where the bank allows;
    /// the widened f16 path elsewhere.
    Grouped,
    /// `widen`: the weights widened to f16 per step and each expert's rows one cuBLAS GEMM.
    Widened,
    /// `tf32`: widened to f32, GEMMs on TF32 tensor cores.
    Tf32,
}

impl ExpertGemm {
    pub(super) fn parse(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            Some("tf32") => ExpertGemm::Tf32,
            Some("widen") => ExpertGemm::Widened,
            _ => ExpertGemm::Grouped,
        }
    }

    /// Read once per process.
    pub(super) fn from_env() -> Self {
        static CHOICE: OnceLock<ExpertGemm> = OnceLock::new();
        env_choice(&CHOICE, "DSPARK_EXPERT_GEMM", Self::parse)
    }
}

/// Where GEMM steps sort the routed experts' (token, slot) pairs for the grouped kernels, from
/// `DSPARK_EXPERT_SORT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ExpertSort {
    /// On the device (`Kernels::moe_sort`; default): no host round trip, for banks of at most
    /// `MOE_SORT_MAX_EXPERTS` experts (larger ones sort on the host).
    Device,
    /// `host`: the ids copied to the host and sorted there ([`ExpertOrder`]), one stream
    /// synchronisation per layer and step.
    Host,
}

impl ExpertSort {
    pub(super) fn parse(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            Some("host") => ExpertSort::Host,
            _ => ExpertSort::Device,
        }
    }

    /// Read once per process.
    pub(super) fn from_env() -> Self {
        static CHOICE: OnceLock<ExpertSort> = OnceLock::new();
        env_choice(&CHOICE, "DSPARK_EXPERT_SORT", Self::parse)
    }
}

/// How the grouped path got its pairs in expert order.
#[derive(Clone, Copy)]
enum GroupedSort<'a> {
    /// Sorted on the host: the order to upload (exact row and tile counts).
    Host(&'a ExpertOrder),
    /// To sort on the device from the router's ids (`n * topk` i32): every pair's row gathered
    /// and the worst-case tile count launched.
    Device(&'a CudaSlice<i32>),
}

/// How GEMM steps multiply the FP8 projections (attention, shared expert), from
/// `DSPARK_PROJ_GEMM`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ProjGemm {
    /// The weights widened exactly to f16 (times a power of two that the matrix's scale range
    /// allows: `fp8_f16_shift`), the activations rounded to f16 (11 significant bits, as TF32
    /// keeps; they must stay below 65504 in magnitude, which normed inputs and clipped SwiGLU
    /// outputs do), on the f16 tensor cores with f32 accumulation: twice the TF32 rate (default,
    /// where TF32 is allowed and the matrix's range fits).
    F16,
    /// `tf32`: widened to f32, on the TF32 tensor cores.
    Tf32,
}

impl ProjGemm {
    pub(super) fn parse(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            Some("tf32") => ProjGemm::Tf32,
            _ => ProjGemm::F16,
        }
    }

    /// Read once per process.
    pub(super) fn from_env() -> Self {
        static CHOICE: OnceLock<ProjGemm> = OnceLock::new();
        env_choice(&CHOICE, "DSPARK_PROJ_GEMM", Self::parse)
    }
}

/// The grouped kernels' scale shift when a GEMM step (TF32 allowed or not) multiplies `bank` on
/// them: the default choice, TF32 on (they round activations as it does), and a bank they take;
/// `None` widens. The layer stack sizes its scratch by the same rule.
pub(super) fn grouped_shift(bank: &Fp4Bank, tf32: bool) -> Option<u32> {
    bank.grouped_shift
        .filter(|_| tf32 && ExpertGemm::from_env() == ExpertGemm::Grouped)
}

/// How many streams a GEMM step's per-expert GEMMs spread over (this backend's own included),
/// from `DSPARK_GEMM_LANES`: default 4; 1 keeps them on the backend's stream, one after another.
pub(super) fn gemm_lane_count(value: Option<&str>) -> usize {
    value
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(4, |n| n.clamp(1, 16))
}

/// Streams beside the backend's own, each with a cuBLAS handle (and so its own workspace) bound
/// to it. They only ever run GEMMs between a [`Self::fork_from`] and a [`Self::join_into`] of the
/// backend's stream, so everything before and after stays in that stream's order.
pub(super) struct GemmLanes {
    lanes: Vec<(Arc<CudaStream>, CudaBlas)>,
}

impl GemmLanes {
    fn new(main: &Arc<CudaStream>, count: usize) -> Result<Self, BackendError> {
        let lanes = (0..count)
            .map(|_| {
                let stream = main.fork().map_err(driver_err("GEMM lane stream"))?;
                let blas = CudaBlas::new(stream.clone())
                    .map_err(|e| BackendError::Other(format!("cuBLAS init (GEMM lane): {e:?}")))?;
                Ok((stream, blas))
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        Ok(Self { lanes })
    }

    /// Every lane waits for the work queued on `main` so far.
    fn fork_from(&self, main: &CudaStream) -> Result<(), BackendError> {
        let ready = main
            .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(driver_err("GEMM lanes: record"))?;
        for (stream, _) in &self.lanes {
            stream
                .wait(&ready)
                .map_err(driver_err("GEMM lanes: wait"))?;
        }
        Ok(())
    }

    /// `main` waits for every lane's work.
    fn join_into(&self, main: &CudaStream) -> Result<(), BackendError> {
        for (stream, _) in &self.lanes {
            let done = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .map_err(driver_err("GEMM lanes: record"))?;
            main.wait(&done).map_err(driver_err("GEMM lanes: join"))?;
        }
        Ok(())
    }
}

/// One GEMM `p` as [`CudaBackend::gemm_typed`] describes it, on `blas` (bound to the stream it
/// runs on).
///
/// # Safety
/// As [`CudaBackend::gemm_typed`], for `p`'s fields.
unsafe fn gemm_on(
    blas: &CudaBlas,
    p: &GemmProblem,
    compute: cublasComputeType_t,
    inputs: GemmInputs,
    alpha: f32,
) -> Result<(), BackendError> {
    let GemmProblem {
        x,
        ldx,
        n,
        w,
        rows,
        cols,
        y,
        ldy,
    } = *p;
    let beta = 0.0f32;
    // SAFETY: the handle is bound to its stream; in cuBLAS's column-major view
    // W^T is [cols, rows] with lda = cols, x^T [cols, n] with ldb = ldx and y^T [rows, n]
    // with ldc = ldy, all inside the buffers this function's contract describes.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            dim(rows)?,
            dim(n)?,
            dim(cols)?,
            (&alpha as *const f32).cast(),
            w as *const std::ffi::c_void,
            inputs.data_type(),
            dim(cols)?,
            x as *const std::ffi::c_void,
            inputs.data_type(),
            dim(ldx)?,
            (&beta as *const f32).cast(),
            y as *mut std::ffi::c_void,
            cudaDataType::CUDA_R_32F,
            dim(ldy)?,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| BackendError::Other(format!("cuBLAS GEMM: {e:?}")))
}

/// The activations of an f16 GEMM: f32 rows rounded to f16 on the way (their copy kept for
/// the next projection of the same input where `reuse_x`), or rows already in f16.
#[derive(Clone, Copy)]
enum GemmX {
    F32 {
        x: CUdeviceptr,
        ldx: usize,
        reuse_x: bool,
    },
    F16 {
        x: CUdeviceptr,
        ldx: usize,
    },
}

impl CudaBackend {
    /// Whether GEMM steps use the TF32 tensor cores (see the module docs).
    pub fn set_gemm_tf32(&self, on: bool) {
        self.gemm_tf32.store(on, Ordering::Relaxed);
    }

    /// The compute type of GEMM steps: TF32 tensor cores unless turned off.
    fn gemm_compute(&self) -> cublasComputeType_t {
        if self.gemm_tf32.load(Ordering::Relaxed) {
            cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            cublasComputeType_t::CUBLAS_COMPUTE_32F
        }
    }

    /// `y = x W^T`: x f32 `[n, cols]` with row stride `ldx`, W f32 `[rows, cols]` row-major, y
    /// `[n, rows]` with row stride `ldy` (TF32 tensor cores unless turned off).
    ///
    /// # Safety
    /// `x` must hold `(n - 1) * ldx + cols` f32, `w` `rows * cols`, `y` `(n - 1) * ldy + rows`,
    /// all device memory of this stream's context, with `ldx >= cols` and `ldy >= rows`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_rows(
        &self,
        x: CUdeviceptr,
        ldx: usize,
        n: usize,
        w: CUdeviceptr,
        rows: usize,
        cols: usize,
        y: CUdeviceptr,
        ldy: usize,
    ) -> Result<(), BackendError> {
        // SAFETY: this function's contract.
        unsafe { self.gemm_f32(x, ldx, n, w, rows, cols, y, ldy, self.gemm_compute()) }
    }

    /// [`Self::gemm_rows`] with the compute type given (f32 data throughout).
    ///
    /// # Safety
    /// As [`Self::gemm_rows`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_f32(
        &self,
        x: CUdeviceptr,
        ldx: usize,
        n: usize,
        w: CUdeviceptr,
        rows: usize,
        cols: usize,
        y: CUdeviceptr,
        ldy: usize,
        compute: cublasComputeType_t,
    ) -> Result<(), BackendError> {
        // SAFETY: this function's contract.
        unsafe {
            self.gemm_typed(
                (x, ldx, n),
                (w, rows, cols),
                (y, ldy),
                compute,
                GemmInputs::F32,
                1.0,
            )
        }
    }

    /// `y = alpha x W^T` as [`Self::gemm_f32`], with x and W of the type `inputs` names (y f32):
    /// x `(pointer, row stride, rows)`, W `(pointer, rows, cols)`, y `(pointer, row stride)`.
    ///
    /// # Safety
    /// As [`Self::gemm_rows`], counting x and W in elements of `inputs`.
    unsafe fn gemm_typed(
        &self,
        (x, ldx, n): (CUdeviceptr, usize, usize),
        (w, rows, cols): (CUdeviceptr, usize, usize),
        (y, ldy): (CUdeviceptr, usize),
        compute: cublasComputeType_t,
        inputs: GemmInputs,
        alpha: f32,
    ) -> Result<(), BackendError> {
        if n == 0 || rows == 0 {
            return Ok(());
        }
        let blas = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        let problem = GemmProblem {
            x,
            ldx,
            n,
            w,
            rows,
            cols,
            y,
            ldy,
        };
        // SAFETY: this function's contract.
        unsafe { gemm_on(&blas, &problem, compute, inputs, alpha) }
    }

    /// Many small GEMMs (one per expert) as one cuBLAS grouped call, so they fill the GPU
    /// together instead of one after another; `ptrs` (device, grown to fit) carries their
    /// pointer arrays. Falls back to one call per problem where cuBLAS refuses the grouped form.
    ///
    /// # Safety
    /// Every problem must satisfy [`Self::gemm_rows`]'s contract.
    pub(super) unsafe fn gemm_grouped(
        &self,
        problems: &[GemmProblem],
        ptrs: &mut CudaSlice<u64>,
        inputs: GemmInputs,
    ) -> Result<(), BackendError> {
        let live: Vec<&GemmProblem> = problems.iter().filter(|p| p.n > 0 && p.rows > 0).collect();
        if live.is_empty() {
            return Ok(());
        }
        let compute = inputs.compute(self.gemm_compute());
        // cuBLAS 13 refuses grouped GEMMs of f16 inputs with f32 outputs
        // (CUBLAS_STATUS_NOT_SUPPORTED on H200), so f16 runs one GEMM per expert.
        if inputs == GemmInputs::F32 && self.grouped_gemm_ok.load(Ordering::Relaxed) {
            match unsafe { self.try_gemm_grouped(&live, ptrs, inputs, compute) } {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "cuBLAS grouped GEMM refused; one GEMM per expert from now on");
                    self.grouped_gemm_ok.store(false, Ordering::Relaxed);
                }
            }
        }
        // One GEMM per problem, dealt round-robin over the lanes: a single expert's GEMM fills
        // a fraction of the GPU (~190 rows of an 8K chunk by 2,048 or 4,096 columns), so
        // neighbours run side by side.
        let mut lanes = self.gemm_lanes.lock().unwrap_or_else(|p| p.into_inner());
        if lanes.is_none() && live.len() > 1 && self.gemm_lane_count > 1 {
            // A device that cannot make the streams or handles runs the GEMMs one after another.
            *lanes = Some(
                GemmLanes::new(&self.stream, self.gemm_lane_count - 1).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "no side streams for the expert GEMMs; one stream");
                    GemmLanes { lanes: Vec::new() }
                }),
            );
        }
        let side = lanes
            .as_ref()
            .filter(|l| live.len() > 1 && !l.lanes.is_empty());
        if let Some(side) = side {
            side.fork_from(&self.stream)?;
        }
        let blas = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        let ways = 1 + side.map_or(0, |l| l.lanes.len());
        for (i, p) in live.iter().enumerate() {
            let handle = match (i % ways, side) {
                (0, _) | (_, None) => &*blas,
                (k, Some(l)) => &l.lanes[k - 1].1,
            };
            // SAFETY: the caller's contract, per problem; every problem writes its own output
            // and the lanes waited for this stream's work before their first GEMM.
            unsafe { gemm_on(handle, p, compute, inputs, 1.0) }?;
        }
        if let Some(side) = side {
            side.join_into(&self.stream)?;
        }
        Ok(())
    }

    /// The grouped call itself; an error leaves nothing half-done that the per-problem
    /// fallback would not redo (every problem writes only its own output).
    ///
    /// # Safety
    /// As [`Self::gemm_grouped`].
    unsafe fn try_gemm_grouped(
        &self,
        live: &[&GemmProblem],
        ptrs: &mut CudaSlice<u64>,
        inputs: GemmInputs,
        compute: cublasComputeType_t,
    ) -> Result<(), BackendError> {
        let count = live.len();
        let s = &self.stream;
        if ptrs.len() < 3 * count {
            *ptrs = s
                .alloc_zeros::<u64>(3 * count)
                .map_err(driver_err("alloc"))?;
        }
        let mut host: Vec<u64> = Vec::with_capacity(3 * count);
        host.extend(live.iter().map(|p| p.w));
        host.extend(live.iter().map(|p| p.x));
        host.extend(live.iter().map(|p| p.y));
        s.memcpy_htod(&host, &mut ptrs.slice_mut(0..3 * count))
            .map_err(driver_err("copy to GPU"))?;
        let col = |f: &dyn Fn(&GemmProblem) -> usize| -> Result<Vec<i32>, BackendError> {
            live.iter().map(|p| dim(f(p))).collect()
        };
        let (m, n, k) = (col(&|p| p.rows)?, col(&|p| p.n)?, col(&|p| p.cols)?);
        let (lda, ldb, ldc) = (col(&|p| p.cols)?, col(&|p| p.ldx)?, col(&|p| p.ldy)?);
        let ta = vec![cublasOperation_t::CUBLAS_OP_T; count];
        let tb = vec![cublasOperation_t::CUBLAS_OP_N; count];
        let (alpha, beta) = (vec![1.0f32; count], vec![0.0f32; count]);
        let sizes = vec![1i32; count];
        let base = ptrs.device_ptr(s).0;
        let blas = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the host arrays hold `count` entries each; the device arrays at base hold the
        // W, x and y pointers of every problem (copied above, in stream order before the call),
        // each problem within gemm_rows's contract (the caller's).
        let status = unsafe {
            cudarc::cublas::sys::cublasGemmGroupedBatchedEx(
                *blas.handle(),
                ta.as_ptr(),
                tb.as_ptr(),
                m.as_ptr(),
                n.as_ptr(),
                k.as_ptr(),
                alpha.as_ptr().cast(),
                base as *const *const std::ffi::c_void,
                inputs.data_type(),
                lda.as_ptr(),
                (base + (count * 8) as u64) as *const *const std::ffi::c_void,
                inputs.data_type(),
                ldb.as_ptr(),
                beta.as_ptr().cast(),
                (base + (2 * count * 8) as u64) as *const *mut std::ffi::c_void,
                cudaDataType::CUDA_R_32F,
                ldc.as_ptr(),
                dim(count)?,
                sizes.as_ptr(),
                compute,
            )
        };
        status
            .result()
            .map_err(|e| BackendError::Other(format!("cuBLAS grouped GEMM: {e:?}")))
    }

    /// The f32 weights of `w` on the device: a dense matrix as it is, bf16 and FP8 ones widened
    /// (exactly) into `wide`, grown to fit.
    fn widened(
        &self,
        w: &CudaMatrix,
        wide: &mut CudaSlice<f32>,
    ) -> Result<CUdeviceptr, BackendError> {
        let s = &self.stream;
        let (rows, cols) = w.shape();
        let len = rows * cols;
        if !matches!(w, CudaMatrix::Dense { .. }) && wide.len() < len {
            *wide = self.zeros(len)?;
        }
        match w {
            CudaMatrix::Dense { w, .. } => Ok(w.device_ptr(s).0),
            CudaMatrix::Bf16 { w, .. } => {
                let out = wide.device_ptr_mut(s).0;
                // SAFETY: w holds rows * cols bf16, `wide` at least that many f32.
                unsafe { self.kernels.bf16_to_f32(s, w.device_ptr(s).0, out, len) }
                    .map_err(kernel_err)?;
                Ok(out)
            }
            CudaMatrix::Fp8 { w, scales, .. } => {
                let out = wide.device_ptr_mut(s).0;
                // SAFETY: w holds rows * cols e4m3 bytes and `scales` their 128x128 tiles;
                // `wide` at least rows * cols f32.
                unsafe {
                    self.kernels.fp8_dequant(
                        s,
                        w.device_ptr(s).0,
                        scales.device_ptr(s).0,
                        out,
                        rows,
                        cols,
                    )
                }
                .map_err(kernel_err)?;
                Ok(out)
            }
            CudaMatrix::Fp4 { .. } => Err(gemm_err(
                "an FP4 matrix is only used inside a routed expert".into(),
            )),
        }
    }

    /// `y = x W^T` over `n` rows (strides `ldx`, `ldy`) as one GEMM on the widened weight: an
    /// FP8 matrix whose scales allow it ([`ProjGemm`]) widened exactly to f16 and multiplied on
    /// the f16 tensor cores with its activations rounded to f16, others widened to f32 (TF32
    /// tensor cores unless turned off). `reuse_x`: `x` has not changed since the last call that
    /// passed it with the same shape (the projections of one input), so its f16 copy stands.
    ///
    /// # Safety
    /// As [`Self::gemm_rows`] with `(rows, cols) = w.shape()`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_linear(
        &self,
        x: CUdeviceptr,
        ldx: usize,
        n: usize,
        w: &CudaMatrix,
        y: CUdeviceptr,
        ldy: usize,
        g: &mut GemmScratch,
        reuse_x: bool,
    ) -> Result<(), BackendError> {
        let (rows, cols) = w.shape();
        if let Some((weight, shift)) = self.f16_weight(w) {
            // SAFETY: this function's contract; `weight` is w's bytes and tiles.
            return unsafe {
                self.gemm_fp8_f16(
                    GemmX::F32 { x, ldx, reuse_x },
                    n,
                    weight,
                    (rows, cols, shift),
                    (y, ldy),
                    g,
                )
            };
        }
        let wp = self.widened(w, &mut g.wide)?;
        // SAFETY: wp holds rows * cols f32 (widened above or the dense matrix itself); the rest
        // is the caller's contract.
        unsafe { self.gemm_rows(x, ldx, n, wp, rows, cols, y, ldy) }
    }

    /// An FP8 matrix's `(bytes, tiles)` and f16 shift where [`Self::gemm_linear`] runs it on the
    /// f16 tensor cores ([`ProjGemm`]), else `None`.
    fn f16_weight(&self, w: &CudaMatrix) -> Option<((CUdeviceptr, CUdeviceptr), i32)> {
        match w {
            CudaMatrix::Fp8 {
                w: wq,
                scales,
                f16_shift: Some(shift),
                ..
            } if self.gemm_tf32.load(Ordering::Relaxed)
                && ProjGemm::from_env() == ProjGemm::F16 =>
            {
                let s = &self.stream;
                Some(((wq.device_ptr(s).0, scales.device_ptr(s).0), *shift))
            }
            _ => None,
        }
    }

    /// Whether [`Self::gemm_linear_f16_input`] takes `w`.
    pub(super) fn takes_f16_input(&self, w: &CudaMatrix) -> bool {
        self.f16_weight(w).is_some()
    }

    /// [`Self::gemm_linear`] over activations already rounded to f16 (`xh`: `n` rows of
    /// `w.shape().1` halves at stride `ldxh`), where their producer wrote them so (the same
    /// rounding `gemm_linear` applies). `w` must be one [`Self::takes_f16_input`] accepts.
    ///
    /// # Safety
    /// As [`Self::gemm_rows`], with `xh` holding the f16 rows.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_linear_f16_input(
        &self,
        xh: CUdeviceptr,
        ldxh: usize,
        n: usize,
        w: &CudaMatrix,
        y: CUdeviceptr,
        ldy: usize,
        g: &mut GemmScratch,
    ) -> Result<(), BackendError> {
        let (rows, cols) = w.shape();
        let Some((weight, shift)) = self.f16_weight(w) else {
            return Err(gemm_err(format!(
                "a [{rows}, {cols}] matrix does not run on the f16 GEMM; it needs f32 input"
            )));
        };
        // SAFETY: this function's contract; `weight` is w's bytes and tiles.
        unsafe {
            self.gemm_fp8_f16(
                GemmX::F16 { x: xh, ldx: ldxh },
                n,
                weight,
                (rows, cols, shift),
                (y, ldy),
                g,
            )
        }
    }

    /// [`Self::gemm_linear`]'s f16 form: the FP8 weight `(bytes, tiles)` of `(rows, cols)` times
    /// `2^-shift` into `g.wide` (exact), f32 activations rounded to f16 into `g.x_half` (unless
    /// their `reuse_x` finds them there), one f16 GEMM with f32 accumulation and `alpha =
    /// 2^shift`.
    ///
    /// # Safety
    /// As [`Self::gemm_rows`]; `weight` must be an FP8 matrix of `(rows, cols)` with its tiles.
    unsafe fn gemm_fp8_f16(
        &self,
        x: GemmX,
        n: usize,
        (wq, scales): (CUdeviceptr, CUdeviceptr),
        (rows, cols, shift): (usize, usize, i32),
        (y, ldy): (CUdeviceptr, usize),
        g: &mut GemmScratch,
    ) -> Result<(), BackendError> {
        let s = &self.stream;
        // f16 pairs in the f32 buffer.
        if g.wide.len() * 2 < rows * cols {
            g.wide = self.zeros((rows * cols).div_ceil(2))?;
        }
        let wp = g.wide.device_ptr_mut(s).0;
        // SAFETY: wq holds rows * cols e4m3 bytes with their tiles, wide room for as many f16.
        unsafe {
            self.kernels
                .fp8_dequant_f16(s, [wq, scales, wp], rows, cols, shift)
        }
        .map_err(kernel_err)?;
        let (xh, ldxh) = match x {
            GemmX::F16 { x, ldx } => (x, ldx),
            GemmX::F32 { x, ldx, reuse_x } => {
                let key = (x, ldx, n, cols);
                if !(reuse_x && g.x_half_of == Some(key)) {
                    if g.x_half.len() < n * cols {
                        g.x_half = s
                            .alloc_zeros::<u16>(n * cols)
                            .map_err(driver_err("alloc"))?;
                    }
                    let xh = g.x_half.device_ptr_mut(s).0;
                    // SAFETY: x holds n rows of cols at stride ldx (the caller's contract),
                    // x_half room for n * cols f16.
                    unsafe { self.kernels.rows_to_f16(s, x, ldx, xh, n, cols) }
                        .map_err(kernel_err)?;
                    g.x_half_of = reuse_x.then_some(key);
                }
                (g.x_half.device_ptr(s).0, cols)
            }
        };
        // SAFETY: xh holds n rows of cols f16 at stride ldxh, wide rows * cols f16; y is the
        // caller's.
        unsafe {
            self.gemm_typed(
                (xh, ldxh, n),
                (wp, rows, cols),
                (y, ldy),
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                GemmInputs::F16,
                2f32.powi(shift),
            )
        }
    }

    /// Whether a GEMM step's routed experts of `bank` take their activations already rounded
    /// to f16 ([`ExpertRows::F16`]): the grouped kernels that gather through their own loads.
    pub(super) fn experts_take_f16_rows(&self, bank: &Fp4Bank) -> bool {
        grouped_shift(bank, self.gemm_tf32.load(Ordering::Relaxed)).is_some()
            && self.kernels.fp4_grouped_form().gathers_in_kernel()
    }

    /// The routed experts of `n` rows from an FP4 bank: the router's ids (device `route_ids`,
    /// `n * topk`) are sorted by expert (on the device for the grouped kernels, see
    /// [`ExpertSort`]; otherwise on the host); on the widened paths each used expert's
    /// w1/w3/w2 are widened (in groups) and its rows run as three GEMMs with the clipped SwiGLU
    /// between; the weighted slots are summed back in token order into `out` (`n` rows of
    /// hidden), plus `addend`'s rows unless it is 0 (the shared expert's output, added in the
    /// same pass).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sorted_experts(
        &self,
        clock: &mut Option<StageClock>,
        bank: &Fp4Bank,
        g: &mut GemmScratch,
        x: ExpertRows,
        route_ids: &CudaSlice<i32>,
        route_weights: CUdeviceptr,
        act: &mut CudaSlice<f32>,
        y_sorted: &mut CudaSlice<f32>,
        (out, addend): (CUdeviceptr, CUdeviceptr),
        n: usize,
        topk: usize,
        limit: f32,
    ) -> Result<(), BackendError> {
        let s = &self.stream;
        let (h, inter) = (bank.hidden, bank.inter);
        let pairs = n * topk;
        // f16 tensor cores where the bank's values are exact in f16 and TF32 is allowed (the
        // activations round alike): decoded inside the grouped kernels where the bank allows,
        // widened otherwise; f32 / TF32 elsewhere.
        let tf32 = self.gemm_tf32.load(Ordering::Relaxed);
        let grouped = grouped_shift(bank, tf32);
        let io = GroupedIo {
            x,
            route_weights,
            out,
            addend,
            n,
            topk,
            limit,
        };
        self.stage(clock, "stack: routed experts: sort")?;
        if let Some(shift) = grouped {
            if ExpertSort::from_env() == ExpertSort::Device && bank.experts <= MOE_SORT_MAX_EXPERTS
            {
                let sort = GroupedSort::Device(route_ids);
                return self.grouped_experts(clock, bank, shift, g, sort, act, y_sorted, io);
            }
        }
        let mut ids = vec![0i32; pairs];
        s.memcpy_dtoh(&route_ids.slice(0..pairs), &mut ids)
            .map_err(driver_err("copy from GPU"))?;
        s.synchronize().map_err(driver_err("synchronize"))?;
        let order = ExpertOrder::of(&ids, topk, bank.experts);
        if let Some(shift) = grouped {
            let sort = GroupedSort::Host(&order);
            return self.grouped_experts(clock, bank, shift, g, sort, act, y_sorted, io);
        }
        let ExpertRows::F32(x) = x else {
            return Err(gemm_err(
                "f16 expert rows reach only the grouped kernels that gather them".into(),
            ));
        };
        let sorted = order.tokens.len();
        fits("sorted rows", g.x_sorted.len(), sorted * h)?;
        fits("expert activations", act.len(), sorted * inter)?;
        fits("expert outputs", y_sorted.len(), sorted * h)?;
        fits("slots", g.slots.len(), pairs)?;
        let f16 = tf32 && ExpertGemm::from_env() != ExpertGemm::Tf32;
        // Allocated up front only where the stack expected this path (ScratchDims); otherwise
        // grown once to the piece's capacity (as many rows as x_sorted holds).
        let capacity = (g.x_sorted.len() / h.max(1) * inter).max(sorted * inter);
        for buf in [&mut g.gate, &mut g.up] {
            if buf.len() < sorted * inter {
                *buf = self.zeros(capacity)?;
            }
        }
        let used: Vec<i32> = order.runs.iter().map(|r| r.0 as i32).collect();
        if sorted > 0 {
            s.memcpy_htod(&order.tokens, &mut g.tokens.slice_mut(0..sorted))
                .map_err(driver_err("copy to GPU"))?;
            s.memcpy_htod(&used, &mut g.experts.slice_mut(0..used.len()))
                .map_err(driver_err("copy to GPU"))?;
        }
        s.memcpy_htod(&order.slots, &mut g.slots.slice_mut(0..pairs))
            .map_err(driver_err("copy to GPU"))?;
        let group = expert_group(inter, h);
        // Sized for the largest layer when the stack was built; a bank of other widths may
        // group differently.
        let need = expert_group_floats(order.runs.len(), inter, h);
        if g.experts_wide.len() < need {
            g.experts_wide = self.zeros(need)?;
        }
        // Buffers are f32-sized: f16 uses half.
        let inputs = if f16 && bank.f16_exact {
            GemmInputs::F16
        } else {
            GemmInputs::F32
        };
        let eb = inputs.bytes();
        self.stage(clock, "stack: routed experts: gather")?;
        let xs = g.x_sorted.device_ptr_mut(s).0;
        let (gate, up) = (g.gate.device_ptr_mut(s).0, g.up.device_ptr_mut(s).0);
        let (a, ys) = (act.device_ptr_mut(s).0, y_sorted.device_ptr_mut(s).0);
        let ew = g.experts_wide.device_ptr_mut(s).0;
        let used_ptr = g.experts.device_ptr(s).0;
        let tokens = g.tokens.device_ptr(s).0;
        // SAFETY: tokens holds `sorted` rows of x (each below n), x_sorted room for them.
        let into = match inputs {
            GemmInputs::F32 => GatherInto::F32,
            GemmInputs::F16 => GatherInto::F16,
        };
        unsafe { self.kernels.gather_rows(s, into, x, tokens, sorted, h, xs) }
            .map_err(kernel_err)?;
        let f4 = |b: &CudaSlice<u8>| b.device_ptr(s).0;
        for (gi, runs) in order.runs.chunks(group).enumerate() {
            let count = runs.len();
            let list = used_ptr + (gi * group * 4) as u64;
            self.stage(clock, "stack: routed experts: widen")?;
            let wide_of = |i: usize| ew + (i * count * inter * h * eb) as u64;
            let (w1, w3, w2) = (wide_of(0), wide_of(1), wide_of(2));
            for (i, (w, sc, rows, cols)) in [
                (&bank.w1, &bank.s1, inter, h),
                (&bank.w3, &bank.s3, inter, h),
                (&bank.w2, &bank.s2, h, inter),
            ]
            .into_iter()
            .enumerate()
            {
                let (wp, sp, out) = (f4(w), f4(sc), wide_of(i));
                // SAFETY: the list holds `count` expert ids of this bank; experts_wide holds
                // 3 * count * inter * hidden f32 (sized above), matrix i at wide_of(i).
                unsafe {
                    match inputs {
                        GemmInputs::F32 => self
                            .kernels
                            .fp4_dequant_experts(s, wp, sp, list, count, rows, cols, out),
                        GemmInputs::F16 => self
                            .kernels
                            .fp4_dequant_experts_f16(s, wp, sp, list, count, rows, cols, out),
                    }
                }
                .map_err(kernel_err)?;
            }
            self.stage(clock, "stack: routed experts: GEMMs")?;
            let mut problems = Vec::with_capacity(2 * count);
            for (j, &(_, first, rows)) in runs.iter().enumerate() {
                let wo = (j * inter * h * eb) as u64;
                let xr = xs + (first * h * eb) as u64;
                let yo = (first * inter * 4) as u64;
                for (w, y) in [(w1 + wo, gate + yo), (w3 + wo, up + yo)] {
                    problems.push(GemmProblem {
                        x: xr,
                        ldx: h,
                        n: rows,
                        w,
                        rows: inter,
                        cols: h,
                        y,
                        ldy: inter,
                    });
                }
            }
            // SAFETY: rows first..first + rows of the sorted buffers exist (sized above);
            // expert j's widened matrices are [inter, h], [inter, h], [h, inter].
            unsafe { self.gemm_grouped(&problems, &mut g.gemm_ptrs, inputs) }?;
            let (first, last) = (runs[0].1, runs[count - 1].1 + runs[count - 1].2);
            let (at, act_at) = ((first * inter * 4) as u64, (first * inter * eb) as u64);
            let len = (last - first) * inter;
            // SAFETY: the group's sorted rows first..last of gate, up and act hold inter values
            // each (f32; act in the GEMMs' input type).
            unsafe {
                match inputs {
                    GemmInputs::F32 => {
                        self.kernels
                            .swiglu_clip(s, gate + at, up + at, a + act_at, len, limit)
                    }
                    GemmInputs::F16 => self.kernels.swiglu_clip_to_f16(
                        s,
                        gate + at,
                        up + at,
                        a + act_at,
                        len,
                        limit,
                    ),
                }
            }
            .map_err(kernel_err)?;
            let problems: Vec<GemmProblem> = runs
                .iter()
                .enumerate()
                .map(|(j, &(_, first, rows))| GemmProblem {
                    x: a + (first * inter * eb) as u64,
                    ldx: inter,
                    n: rows,
                    w: w2 + (j * h * inter * eb) as u64,
                    rows: h,
                    cols: inter,
                    y: ys + (first * h * 4) as u64,
                    ldy: h,
                })
                .collect();
            // SAFETY: as above; expert j's w2 is [h, inter].
            unsafe { self.gemm_grouped(&problems, &mut g.gemm_ptrs, inputs) }?;
        }
        self.stage(clock, "stack: routed experts: combine")?;
        // SAFETY: slots holds n * topk rows of y_sorted or -1, the weights n * topk f32, out n
        // rows of hidden.
        unsafe {
            self.kernels.moe_combine_sorted(
                s,
                ys,
                g.slots.device_ptr(s).0,
                route_weights,
                n,
                topk,
                h,
                out,
                addend,
            )
        }
        .map_err(kernel_err)
    }

    /// [`Self::sorted_experts`] on the grouped FP4 kernels: the pairs sorted (`sort`) and cut
    /// into tiles of the running form's size, the sorted rows gathered as f16 in the form's
    /// order, gate/up with the SwiGLU in one launch and down in another, over every expert at
    /// once; the weights are never widened.
    #[allow(clippy::too_many_arguments)]
    fn grouped_experts(
        &self,
        clock: &mut Option<StageClock>,
        bank: &Fp4Bank,
        shift: u32,
        g: &mut GemmScratch,
        sort: GroupedSort<'_>,
        act: &mut CudaSlice<f32>,
        y_sorted: &mut CudaSlice<f32>,
        io: GroupedIo,
    ) -> Result<(), BackendError> {
        let s = &self.stream;
        let (h, inter) = (bank.hidden, bank.inter);
        let pairs = io.n * io.topk;
        let tile_rows = self.kernels.fp4_grouped_form().tile_rows();
        fits("slots", g.slots.len(), pairs)?;
        // Rows gathered and tiles launched: the host's exact counts, or every pair's row and
        // the most tiles for the device sort (its unused rows have token -1 and are gathered as
        // zeros, its unused tiles have no rows and return at once).
        let (rows, tile_count) = match sort {
            GroupedSort::Host(order) => {
                let sorted = order.tokens.len();
                let flat: Vec<i32> = fp4_grouped_tiles_of(&order.runs, tile_rows)
                    .into_iter()
                    .flatten()
                    .collect();
                fits("sorted tokens", g.tokens.len(), sorted)?;
                fits("expert tiles", g.tiles.len(), flat.len())?;
                if sorted > 0 {
                    s.memcpy_htod(&order.tokens, &mut g.tokens.slice_mut(0..sorted))
                        .map_err(driver_err("copy to GPU"))?;
                    s.memcpy_htod(&flat, &mut g.tiles.slice_mut(0..flat.len()))
                        .map_err(driver_err("copy to GPU"))?;
                }
                s.memcpy_htod(&order.slots, &mut g.slots.slice_mut(0..pairs))
                    .map_err(driver_err("copy to GPU"))?;
                (sorted, flat.len() / 4)
            }
            GroupedSort::Device(ids) => {
                let max_tiles = fp4_grouped_max_tiles_of(pairs, bank.experts, tile_rows);
                fits("router ids", ids.len(), pairs)?;
                fits("sorted tokens", g.tokens.len(), pairs)?;
                fits("expert tiles", g.tiles.len(), 4 * max_tiles)?;
                fits("expert sort workspace", g.experts.len(), bank.experts)?;
                let buf = MoeSortBuffers {
                    ids: ids.device_ptr(s).0,
                    tokens: g.tokens.device_ptr_mut(s).0,
                    slots: g.slots.device_ptr_mut(s).0,
                    tiles: g.tiles.device_ptr_mut(s).0,
                    ends: g.experts.device_ptr_mut(s).0,
                };
                let shape = MoeSortShape {
                    pairs,
                    topk: io.topk,
                    experts: bank.experts,
                    tile_rows,
                    max_tiles,
                };
                // SAFETY: ids holds the step's pairs, tokens and slots as many i32, tiles
                // 4 * max_tiles, the workspace (`experts`) the bank's expert count (all checked
                // above).
                unsafe { self.kernels.moe_sort(s, &buf, &shape) }.map_err(kernel_err)?;
                (pairs, max_tiles)
            }
        };
        fits("expert activations", act.len(), rows * inter)?;
        fits("expert outputs", y_sorted.len(), rows * h)?;
        self.stage(clock, "stack: routed experts: gather")?;
        let xs = g.x_sorted.device_ptr_mut(s).0;
        let (a, ys) = (act.device_ptr_mut(s).0, y_sorted.device_ptr_mut(s).0);
        let tokens = g.tokens.device_ptr(s).0;
        // The wgmma form gathers through its loads: x only needs its f16 copy (n rows, a sixth
        // of the sorted rows' bytes); the other forms read a gathered copy.
        let in_kernel = self.kernels.fp4_grouped_form().gathers_in_kernel();
        match (in_kernel, io.x) {
            (true, ExpertRows::F32(x)) => {
                fits("f16 rows", g.x_sorted.len(), io.n * h)?;
                // SAFETY: x holds n rows of hidden f32, x_sorted room for as many f16 (checked).
                unsafe { self.kernels.gather_rows_grouped(s, x, 0, io.n, h, xs) }
            }
            (true, ExpertRows::F16(x)) => {
                fits("f16 rows", g.x_sorted.len(), io.n * h)?;
                // SAFETY: x holds n rows of hidden f16, x_sorted room for as many (checked);
                // the wgmma form's rows are in k32 order, which this launch stores.
                unsafe { self.kernels.rows_f16_to_k32(s, x, io.n, h, xs) }
            }
            (false, ExpertRows::F32(x)) => {
                fits("sorted rows", g.x_sorted.len(), rows * h)?;
                // SAFETY: tokens holds `rows` rows of x (each below n) or -1 (a zero row);
                // x_sorted room for them as f16 (checked).
                unsafe { self.kernels.gather_rows_grouped(s, x, tokens, rows, h, xs) }
            }
            (false, ExpertRows::F16(_)) => {
                return Err(gemm_err(
                    "f16 expert rows reach only the grouped kernels that gather them".into(),
                ));
            }
        }
        .map_err(kernel_err)?;
        let kb = Fp4GroupedBank {
            experts: self.fp4_experts(
                [&bank.w1, &bank.s1, &bank.w3, &bank.s3, &bank.w2, &bank.s2],
                bank.experts,
                h,
                inter,
            ),
            shift,
        };
        let tp = g.tiles.device_ptr(s).0;
        self.stage(clock, "stack: routed experts: grouped gate/up")?;
        // SAFETY: the tiles name sorted rows below `rows` (which x_sorted, act and y_sorted
        // hold: checked above) of experts of this bank (other ids are dropped by either sort),
        // or no rows.
        unsafe {
            let x_rows = in_kernel.then_some(tokens);
            self.kernels
                .fp4_grouped_gate_up(s, &kb, xs, x_rows, tp, tile_count, a, io.limit)
        }
        .map_err(kernel_err)?;
        self.stage(clock, "stack: routed experts: grouped down")?;
        // SAFETY: as above.
        unsafe { self.kernels.fp4_grouped_down(s, &kb, a, tp, tile_count, ys) }
            .map_err(kernel_err)?;
        self.stage(clock, "stack: routed experts: combine")?;
        // SAFETY: slots holds n * topk rows of y_sorted or -1, the weights n * topk f32, out n
        // rows of hidden.
        unsafe {
            self.kernels.moe_combine_sorted(
                s,
                ys,
                g.slots.device_ptr(s).0,
                io.route_weights,
                io.n,
                io.topk,
                h,
                io.out,
                io.addend,
            )
        }
        .map_err(kernel_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_gemm_choice_defaults_to_f16() {
        assert_eq!(ProjGemm::parse(None), ProjGemm::F16);
        assert_eq!(ProjGemm::parse(Some("f16")), ProjGemm::F16);
        assert_eq!(ProjGemm::parse(Some(" tf32 ")), ProjGemm::Tf32);
    }

    #[test]
    fn expert_gemm_choice_defaults_to_the_grouped_kernels() {
        assert_eq!(ExpertGemm::parse(None), ExpertGemm::Grouped);
        assert_eq!(ExpertGemm::parse(Some("widen")), ExpertGemm::Widened);
        assert_eq!(ExpertGemm::parse(Some(" tf32 ")), ExpertGemm::Tf32);
        assert_eq!(ExpertGemm::parse(Some("grouped")), ExpertGemm::Grouped);
    }

    #[test]
    fn expert_sort_defaults_to_the_device() {
        assert_eq!(ExpertSort::parse(None), ExpertSort::Device);
        assert_eq!(ExpertSort::parse(Some("device")), ExpertSort::Device);
        assert_eq!(ExpertSort::parse(Some(" host ")), ExpertSort::Host);
    }

    #[test]
    fn gemm_lanes_default_to_four_and_stay_in_range() {
        assert_eq!(gemm_lane_count(None), 4);
        assert_eq!(gemm_lane_count(Some(" 2 ")), 2);
        assert_eq!(gemm_lane_count(Some("0")), 1);
        assert_eq!(gemm_lane_count(Some("99")), 16);
        assert_eq!(gemm_lane_count(Some("many")), 4);
    }

    #[test]
    fn pairs_sort_stably_by_expert_and_bad_ids_drop_out() {
        // 3 tokens x 2 slots; expert 9 is outside a bank of 4.
        let ids = [2, 0, 0, 9, 2, 1];
        let order = ExpertOrder::of(&ids, 2, 4);
        assert_eq!(order.runs, vec![(0, 0, 2), (1, 2, 1), (2, 3, 2)]);
        // Expert 0: pairs 1 (token 0) and 2 (token 1); expert 1: pair 5; expert 2: pairs 0, 4.
        assert_eq!(order.tokens, vec![0, 1, 2, 0, 2]);
        assert_eq!(order.slots, vec![3, 0, 1, -1, 4, 2]);
        assert_eq!(ExpertOrder::of(&[], 2, 4), ExpertOrder::default());
    }
}
