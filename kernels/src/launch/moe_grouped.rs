//! Launches of the grouped FP4 expert GEMMs (`dsk_fp4_grouped_*` in `fp4_moe.cu`): the routed
//! experts of a GEMM step (prefill chunk) with the FP4 weights decoded inside the kernel, on the
//! f16 tensor cores, instead of widened to f16 per step and multiplied by cuBLAS. The (token,
//! slot) pairs are sorted by expert (on the device, `Kernels::moe_sort`, or on the host) and
//! each expert's run of sorted rows is cut into tiles of the form's
//! [`Fp4GroupedForm::tile_rows`] ([`fp4_grouped_tiles_of`]). Activations travel as f16 in the
//! form's [`ActivationOrder`]: k8 for the mma.sync builds, k32 for the warpgroup-MMA one
//! ([`Kernels::gather_rows_grouped`]). No launch synchronises or allocates.

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchConfig};

use super::moe_sorted::GatherInto;
use super::submit::SubmitKernel;
use super::{aligned16, function, i32_arg, nonnull, u32_grid, Kernels};
use crate::error::KernelError;
use crate::Fp4Experts;

/// Sorted rows (tokens of one expert) one block takes (the mma.sync forms).
pub const FP4_GROUPED_TILE_ROWS: usize = 64;
/// Sorted rows one block of the wgmma form takes.
pub const FP4_GROUPED_WG_TILE_ROWS: usize = 128;
/// Rows of W1 (and the same rows of W3) one gate/up block takes.
pub const FP4_GROUPED_GATE_UP_ROWS: usize = 128;
/// Rows of W2 one down block takes.
pub const FP4_GROUPED_DOWN_ROWS: usize = 256;
/// Values along K per pipeline stage: K must be a multiple.
pub const FP4_GROUPED_K_STEP: usize = 128;
/// Bytes of one pipeline stage (weights, their scales, activations).
const STAGE_BYTES: usize = 256 * 64 + 256 * 4 + 64 * 256;
/// The wgmma form's stage (128 tokens) and stage count.
const WG_STAGE_BYTES: usize = 256 * 64 + 256 * 4 + 128 * 256;
const WG_STAGES: usize = 4;

/// The builds of the grouped kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp4GroupedForm {
    /// Hopper's warpgroup MMA (sm_90a only): 128 tokens a tile, asynchronous MMAs with A from
    /// registers, activations in k32 order, 4 stages (199 KB, one block an SM). The default on
    /// sm_90a; `DSPARK_GROUPED_FORM=wg`.
    Wgmma,
    /// 2 stages in flight (67 KB of shared memory a block; fits sm_121's 99 KB): the default,
    /// measured faster on H200 (8 layers of an 8K prefill: gate/up 46.3 against 52.1 ms, down
    /// 23.6 against 23.2; a 100K prompt 4.30 against 4.46 s).
    TwoStages,
    /// 3 stages (100 KB), `DSPARK_GROUPED_FORM=3`, where the device allows it.
    ThreeStages,
}

impl Fp4GroupedForm {
    /// The form `DSPARK_GROUPED_FORM` (`wg`, `2` or `3`, read by the caller) asks for, or the
    /// default: the wgmma form on `sm_90a` (`arch`) where the device allows its shared memory,
    /// else 2 stages. A form the device cannot run falls back to 2 stages.
    pub fn choose(value: Option<&str>, smem_optin: usize, arch: &str) -> Result<Self, KernelError> {
        let wg_runs = arch == "sm_90a" && Fp4GroupedForm::Wgmma.smem_bytes() <= smem_optin;
        match value.map(str::trim) {
            None | Some("") | Some("wg") if wg_runs => Ok(Fp4GroupedForm::Wgmma),
            None | Some("") | Some("wg") => Ok(Fp4GroupedForm::TwoStages),
            Some("3") if Fp4GroupedForm::ThreeStages.smem_bytes() <= smem_optin => {
                Ok(Fp4GroupedForm::ThreeStages)
            }
            Some("3") => Ok(Fp4GroupedForm::TwoStages),
            Some("2") => Ok(Fp4GroupedForm::TwoStages),
            Some(other) => Err(KernelError::invalid(
                "fp4_grouped",
                format!(
                    "DSPARK_GROUPED_FORM={other:?}: expected wg (warpgroup MMA), 3 or 2 \
                     (pipeline stages)"
                ),
            )),
        }
    }

    /// Dynamic shared memory of a block: the factor table and the stages.
    pub fn smem_bytes(self) -> usize {
        match self {
            // The table, 1 KB of slack to put the stages on a 1024-byte boundary, the stages.
            Fp4GroupedForm::Wgmma => 1024 + 1024 + WG_STAGES * WG_STAGE_BYTES,
            Fp4GroupedForm::ThreeStages => 1024 + 3 * STAGE_BYTES,
            Fp4GroupedForm::TwoStages => 1024 + 2 * STAGE_BYTES,
        }
    }

    /// Whether gate/up can read x rows through a row list (the gather done by its loads).
    pub fn gathers_in_kernel(self) -> bool {
        self == Fp4GroupedForm::Wgmma
    }

    /// Sorted rows a tile of this form holds at most ([`fp4_grouped_tiles_of`]).
    pub fn tile_rows(self) -> usize {
        match self {
            Fp4GroupedForm::Wgmma => FP4_GROUPED_WG_TILE_ROWS,
            _ => FP4_GROUPED_TILE_ROWS,
        }
    }

    /// The order the form's activations (x and the gate/up output) are stored in.
    pub fn order(self) -> ActivationOrder {
        match self {
            Fp4GroupedForm::Wgmma => ActivationOrder::K32,
            _ => ActivationOrder::K8,
        }
    }
}

/// How the grouped kernels store a row of f16 activations (see the kernels' comments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivationOrder {
    /// Every 8 values as 0 4 1 5 2 6 3 7 (the mma.sync forms' B fragments).
    K8,
    /// In every 32 values, position `16 st + 8 h + 2 t + e` holds value `8 t + 2 st + h + 4 e`
    /// (the wgmma form: K in order in shared memory, matching the decode's nibble pairs).
    K32,
}

impl ActivationOrder {
    /// Where value `v` of a row is stored.
    pub fn position(self, v: usize) -> usize {
        match self {
            ActivationOrder::K8 => (v & !7) | ((v & 3) << 1) | ((v >> 2) & 1),
            ActivationOrder::K32 => {
                let (t, r) = ((v & 31) >> 3, v & 7);
                (v & !31) + 16 * ((r >> 1) & 1) + 8 * (r & 1) + 2 * t + (r >> 2)
            }
        }
    }
}

/// The grouped kernels' kernels, both forms.
pub struct MoeGroupedFns {
    pub(crate) gate_up: [CudaFunction; 3],
    pub(crate) down: [CudaFunction; 3],
    pub(crate) form: Fp4GroupedForm,
}

impl MoeGroupedFns {
    /// From the `fp4_moe` module, for a device whose blocks may opt in to `smem_optin` bytes.
    pub(crate) fn load(
        module: &Arc<CudaModule>,
        smem_optin: usize,
        arch: &str,
    ) -> Result<Self, KernelError> {
        let f = |name: &str| function(module, name);
        let value = std::env::var("DSPARK_GROUPED_FORM").ok();
        Ok(Self {
            gate_up: [
                f("dsk_fp4_grouped_gate_up")?,
                f("dsk_fp4_grouped_gate_up_2st")?,
                f("dsk_fp4_grouped_gate_up_wg")?,
            ],
            down: [
                f("dsk_fp4_grouped_down")?,
                f("dsk_fp4_grouped_down_2st")?,
                f("dsk_fp4_grouped_down_wg")?,
            ],
            form: Fp4GroupedForm::choose(value.as_deref(), smem_optin, arch)?,
        })
    }

    fn index(&self) -> usize {
        match self.form {
            Fp4GroupedForm::ThreeStages => 0,
            Fp4GroupedForm::TwoStages => 1,
            Fp4GroupedForm::Wgmma => 2,
        }
    }
}

/// The power of two the grouped kernels divide every weight by so that a bank whose E8M0 scale
/// bytes lie in `lo..=hi` is exact in f16 inside the kernel, or `None` when no such shift exists
/// (the caller then widens the weights instead).
///
/// The kernel multiplies the decoded value (an e2m1 value v times 2^-14, exact in f16) by the
/// f16 factor 2^(s - 113 - shift): the product v * 2^(s - 127 - shift) must be exact in f16
/// (the smallest, 0.5 * 2^(lo - 127 - shift), at least f16's finest step 2^-24: lo >= 104 +
/// shift) and the factor itself finite (s - 113 - shift <= 15: hi <= 128 + shift); the largest
/// product, 6 * 2^(hi - 127 - shift), is then at most 6 * 2, far below f16's limit.
pub fn fp4_grouped_scale_shift(lo: u8, hi: u8) -> Option<u32> {
    let shift = u32::from(hi).saturating_sub(128);
    (lo <= hi && u32::from(lo) >= 104 + shift).then_some(shift)
}

/// Whether a bank of this shape takes the grouped kernels: hidden and inter are K of one
/// kernel and rows of the other.
pub fn fp4_grouped_fits(hidden: usize, inter: usize) -> bool {
    hidden > 0
        && inter > 0
        && hidden.is_multiple_of(FP4_GROUPED_DOWN_ROWS)
        && hidden.is_multiple_of(FP4_GROUPED_K_STEP)
        && inter.is_multiple_of(FP4_GROUPED_GATE_UP_ROWS)
        && inter.is_multiple_of(FP4_GROUPED_K_STEP)
}

/// The tiles of expert runs `(expert, first sorted row, rows)`: `[expert, first row, rows, 0]`
/// for every [`FP4_GROUPED_TILE_ROWS`] rows of a run (the last one of a run may be shorter).
pub fn fp4_grouped_tiles(runs: &[(usize, usize, usize)]) -> Vec<[i32; 4]> {
    fp4_grouped_tiles_of(runs, FP4_GROUPED_TILE_ROWS)
}

/// [`fp4_grouped_tiles`] with tiles of up to `tile_rows` rows (a form's
/// [`Fp4GroupedForm::tile_rows`]).
pub fn fp4_grouped_tiles_of(runs: &[(usize, usize, usize)], tile_rows: usize) -> Vec<[i32; 4]> {
    let tile_rows = tile_rows.max(1);
    let mut tiles = Vec::new();
    for &(expert, first, rows) in runs {
        let mut at = 0;
        while at < rows {
            let n = (rows - at).min(tile_rows);
            // Experts, rows and positions are below the step's pair count (an i32 on the device).
            tiles.push([expert as i32, (first + at) as i32, n as i32, 0]);
            at += n;
        }
    }
    tiles
}

/// Most tiles `pairs` sorted rows over at most `experts` runs can make (64-row tiles).
pub fn fp4_grouped_max_tiles(pairs: usize, experts: usize) -> usize {
    fp4_grouped_max_tiles_of(pairs, experts, FP4_GROUPED_TILE_ROWS)
}

/// Most tiles of at most `tile_rows` sorted rows that `pairs` rows over at most `experts` runs
/// can make: `pairs / tile_rows` whole tiles plus one partial tile per used expert.
pub fn fp4_grouped_max_tiles_of(pairs: usize, experts: usize, tile_rows: usize) -> usize {
    pairs.div_ceil(tile_rows.max(1)) + experts.min(pairs)
}

/// One layer's FP4 bank as the grouped kernels read it: the decode kernels' view of the
/// checkpoint layout, and the power of two every weight is divided by inside the kernel
/// ([`fp4_grouped_scale_shift`], which the bank's scale bytes must allow).
#[derive(Clone, Copy, Debug)]
pub struct Fp4GroupedBank {
    pub experts: Fp4Experts,
    pub shift: u32,
}

/// Launch-time checks of both grouped kernels, testable without a GPU.
pub fn check_fp4_grouped(
    bank: &Fp4GroupedBank,
    io: [CUdeviceptr; 3],
    tiles: usize,
    smem_optin: usize,
    form: Fp4GroupedForm,
) -> Result<(), KernelError> {
    const K: &str = "fp4_grouped";
    if !fp4_grouped_fits(bank.experts.hidden, bank.experts.inter) {
        return Err(KernelError::invalid(
            K,
            format!(
                "hidden {} must be a multiple of {FP4_GROUPED_DOWN_ROWS} and inter {} of \
                 {FP4_GROUPED_GATE_UP_ROWS}",
                bank.experts.hidden, bank.experts.inter
            ),
        ));
    }
    if bank.shift > 15 {
        return Err(KernelError::invalid(
            K,
            format!("scale shift {} (at most 15)", bank.shift),
        ));
    }
    let need = form.smem_bytes();
    if need > smem_optin {
        return Err(KernelError::invalid(
            K,
            format!("needs {need} B of shared memory, the device allows {smem_optin}"),
        ));
    }
    u32_grid(K, tiles)?;
    let [x, tile_list, out] = io;
    let ptrs = [
        ("w1", bank.experts.w1),
        ("s1", bank.experts.s1),
        ("w3", bank.experts.w3),
        ("s3", bank.experts.s3),
        ("w2", bank.experts.w2),
        ("s2", bank.experts.s2),
        ("x", x),
        ("tiles", tile_list),
        ("out", out),
    ];
    nonnull(K, &ptrs)?;
    // 16-byte cp.async of weights and activations, 16-byte tile descriptors and stores; the
    // 4-byte scale copies need 4 (rows of K / 32 bytes, K a multiple of 128).
    aligned16(
        K,
        &[
            ("w1", bank.experts.w1),
            ("w3", bank.experts.w3),
            ("w2", bank.experts.w2),
            ("x", x),
            ("tiles", tile_list),
            ("out", out),
        ],
    )?;
    for (name, p) in [
        ("s1", bank.experts.s1),
        ("s3", bank.experts.s3),
        ("s2", bank.experts.s2),
    ] {
        if p % 4 != 0 {
            return Err(KernelError::invalid(
                K,
                format!("{name} must be 4-byte aligned"),
            ));
        }
    }
    Ok(())
}

impl Kernels {
    /// `dst[i, :] = f16(src[idx[i], :])` for `n` rows of `width` values, in the activation
    /// order of the grouped form that runs ([`Fp4GroupedForm::order`]); a negative index makes a
    /// zero row. In k32 order a null `idx` converts the rows in place order (`dst[i] = src[i]`:
    /// x for a gate/up that gathers through its row list).
    ///
    /// # Safety
    /// `idx` must hold `n` device i32, each a row of `src` (`width` f32 per row) or negative in
    /// k32 order; `dst` must hold `n * width` f16; all device memory of this context.
    pub unsafe fn gather_rows_grouped(
        &self,
        stream: &CudaStream,
        src: CUdeviceptr,
        idx: CUdeviceptr,
        n: usize,
        width: usize,
        dst: CUdeviceptr,
    ) -> Result<(), KernelError> {
        let into = match self.moe_grouped.form.order() {
            ActivationOrder::K8 => GatherInto::F16K8,
            ActivationOrder::K32 => GatherInto::F16K32,
        };
        // SAFETY: this function's contract.
        unsafe { self.gather_rows(stream, into, src, idx, n, width, dst) }
    }

    /// Which build of the grouped kernels runs (DSPARK_GROUPED_FORM at load).
    pub fn fp4_grouped_form(&self) -> Fp4GroupedForm {
        self.moe_grouped.form
    }

    /// Overrides the form for later launches (A/B timing and tests in one process; a form whose
    /// shared memory the device does not allow fails at launch with `InvalidLaunch`).
    pub fn set_fp4_grouped_form(&mut self, form: Fp4GroupedForm) {
        self.moe_grouped.form = form;
    }

    /// `act[r, i] = f16(silu(min(g, limit)) * clamp(u, -limit, limit))` with `g = W1[e] x[r]`,
    /// `u = W3[e] x[r]` for every sorted row r of every tile `(e, first row, rows)` in `tiles`
    /// (`count` device `[i32; 4]`); `x` `[rows, hidden]` and `act` `[rows, inter]` are f16 in
    /// the form's [`ActivationOrder`]. `x_rows` (the wgmma form only): `x` holds the step's own
    /// rows and `x_rows` (one i32 per sorted row: its row of `x`, or -1 for a zero row) says
    /// which, so the kernel's loads do the gather.
    ///
    /// # Safety
    /// The bank's pointers must hold its experts (every tile's expert below their count), `x`
    /// (or `x_rows`, and `x` every row it names) and `act` every row any tile names, `tiles`
    /// `count` descriptors; all device memory of this context.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn fp4_grouped_gate_up(
        &self,
        stream: &CudaStream,
        bank: &Fp4GroupedBank,
        x: CUdeviceptr,
        x_rows: Option<CUdeviceptr>,
        tiles: CUdeviceptr,
        count: usize,
        act: CUdeviceptr,
        limit: f32,
    ) -> Result<(), KernelError> {
        const K: &str = "fp4_grouped_gate_up";
        if count == 0 {
            return Ok(());
        }
        let form = self.moe_grouped.form;
        check_fp4_grouped(bank, [x, tiles, act], count, self.smem_optin, form)?;
        let row_of = match x_rows {
            Some(p) if form.gathers_in_kernel() => {
                nonnull(K, &[("x_rows", p)])?;
                p
            }
            Some(_) => {
                return Err(KernelError::invalid(
                    K,
                    format!("the {form:?} form reads x in sorted order (no row list)"),
                ))
            }
            None => 0,
        };
        let (i, k, shift) = (
            i32_arg(K, "inter", bank.experts.inter)?,
            i32_arg(K, "hidden", bank.experts.hidden)?,
            bank.shift as i32,
        );
        let cfg = grouped_config(
            K,
            count,
            bank.experts.inter / FP4_GROUPED_GATE_UP_ROWS,
            form,
        )?;
        let mut launch = stream.kernel(&self.moe_grouped.gate_up[self.moe_grouped.index()]);
        launch
            .arg(&x)
            .arg(&tiles)
            .arg(&bank.experts.w1)
            .arg(&bank.experts.s1)
            .arg(&bank.experts.w3)
            .arg(&bank.experts.s3)
            .arg(&act)
            .arg(&i)
            .arg(&k)
            .arg(&shift)
            .arg(&limit);
        // The row list is the last argument of the builds that take one.
        if form.gathers_in_kernel() {
            launch.arg(&row_of);
        }
        launch
            .launch(cfg)
            .map_err(KernelError::driver("launch fp4_grouped_gate_up"))?;
        Ok(())
    }

    /// `y[r, n] = W2[e] act[r]` (f32 `[rows, hidden]`) for every sorted row r of every tile, as
    /// [`Self::fp4_grouped_gate_up`] produces `act`.
    ///
    /// # Safety
    /// As [`Self::fp4_grouped_gate_up`], with `y` holding every row any tile names.
    pub unsafe fn fp4_grouped_down(
        &self,
        stream: &CudaStream,
        bank: &Fp4GroupedBank,
        act: CUdeviceptr,
        tiles: CUdeviceptr,
        count: usize,
        y: CUdeviceptr,
    ) -> Result<(), KernelError> {
        const K: &str = "fp4_grouped_down";
        if count == 0 {
            return Ok(());
        }
        let form = self.moe_grouped.form;
        check_fp4_grouped(bank, [act, tiles, y], count, self.smem_optin, form)?;
        let (n, k, shift) = (
            i32_arg(K, "hidden", bank.experts.hidden)?,
            i32_arg(K, "inter", bank.experts.inter)?,
            bank.shift as i32,
        );
        let cfg = grouped_config(K, count, bank.experts.hidden / FP4_GROUPED_DOWN_ROWS, form)?;
        stream
            .kernel(&self.moe_grouped.down[self.moe_grouped.index()])
            .arg(&act)
            .arg(&tiles)
            .arg(&bank.experts.w2)
            .arg(&bank.experts.s2)
            .arg(&y)
            .arg(&n)
            .arg(&k)
            .arg(&shift)
            .launch(cfg)
            .map_err(KernelError::driver("launch fp4_grouped_down"))?;
        Ok(())
    }
}

/// grid = (tile, block of weight rows), 256 threads, the stages' shared memory.
fn grouped_config(
    kernel: &'static str,
    tiles: usize,
    row_blocks: usize,
    form: Fp4GroupedForm,
) -> Result<LaunchConfig, KernelError> {
    let y = u32_grid(kernel, row_blocks)?;
    if y > 65_535 {
        return Err(KernelError::invalid(
            kernel,
            format!("{row_blocks} row blocks (grid.y at most 65535)"),
        ));
    }
    Ok(LaunchConfig {
        grid_dim: (u32_grid(kernel, tiles)?, y, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: form.smem_bytes() as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_shift_keeps_every_product_exact_in_f16() {
        // Scales 2^-23 .. 2^1: no shift.
        assert_eq!(fp4_grouped_scale_shift(104, 128), Some(0));
        assert_eq!(fp4_grouped_scale_shift(120, 120), Some(0));
        // 2^-24 would lose 0.5 * 2^-24 (below f16's finest step).
        assert_eq!(fp4_grouped_scale_shift(103, 120), None);
        // Scales up to 2^13: shift by 12, which needs lo >= 116.
        assert_eq!(fp4_grouped_scale_shift(116, 140), Some(12));
        assert_eq!(fp4_grouped_scale_shift(115, 140), None);
        // The NaN code 255 can never be shifted into range.
        assert_eq!(fp4_grouped_scale_shift(200, 255), None);
        // An empty range (no scales read) is not a bank.
        assert_eq!(fp4_grouped_scale_shift(255, 0), None);
    }

    #[test]
    fn form_defaults_to_wgmma_on_hopper_and_fits_the_device() {
        use Fp4GroupedForm::{ThreeStages, TwoStages, Wgmma};
        let (h200, gb10) = (227 * 1024, 99 * 1024);
        assert_eq!(Fp4GroupedForm::choose(None, h200, "sm_90a").unwrap(), Wgmma);
        assert!(Wgmma.smem_bytes() <= h200);
        // wgmma is sm_90a's alone; GB10 (sm_121) and a device without the room take 2 stages.
        assert_eq!(
            Fp4GroupedForm::choose(None, gb10, "sm_121").unwrap(),
            TwoStages
        );
        assert_eq!(
            Fp4GroupedForm::choose(Some("wg"), h200, "sm_121").unwrap(),
            TwoStages
        );
        assert_eq!(
            Fp4GroupedForm::choose(None, 100 * 1024, "sm_90a").unwrap(),
            TwoStages
        );
        assert!(TwoStages.smem_bytes() <= gb10);
        assert_eq!(
            Fp4GroupedForm::choose(Some(" 2"), h200, "sm_90a").unwrap(),
            TwoStages
        );
        assert_eq!(
            Fp4GroupedForm::choose(Some("3"), h200, "sm_90a").unwrap(),
            ThreeStages
        );
        assert_eq!(
            Fp4GroupedForm::choose(Some("3"), gb10, "sm_121").unwrap(),
            TwoStages
        );
        let err = Fp4GroupedForm::choose(Some("4"), h200, "sm_90a")
            .unwrap_err()
            .to_string();
        assert!(err.contains("DSPARK_GROUPED_FORM"), "{err}");
        assert_eq!(Wgmma.tile_rows(), 128);
        assert_eq!(TwoStages.tile_rows(), 64);
    }

    #[test]
    fn activation_orders_are_permutations_within_their_groups() {
        for order in [ActivationOrder::K8, ActivationOrder::K32] {
            let group = if order == ActivationOrder::K8 { 8 } else { 32 };
            let mut seen = [false; 96];
            for v in 0..96 {
                let p = order.position(v);
                assert_eq!(p / group, v / group, "{order:?} {v}");
                assert!(!seen[p], "{order:?}: position {p} twice");
                seen[p] = true;
            }
        }
        // k8: 0 4 1 5 2 6 3 7.
        let k8: Vec<usize> = (0..8).map(|v| ActivationOrder::K8.position(v)).collect();
        assert_eq!(k8, [0, 2, 4, 6, 1, 3, 5, 7]);
        // k32: each k16 step holds, for lane t, the nibble pairs (8t + 2st + h, + 4) at
        // 2t + 8h: values 0 and 4 first, then 8 and 12, ...
        let at = |p: usize| (0..32).find(|&v| ActivationOrder::K32.position(v) == p);
        let first: Vec<usize> = (0..8).filter_map(at).collect();
        assert_eq!(first, [0, 4, 8, 12, 16, 20, 24, 28]);
        assert_eq!(at(8), Some(1));
        assert_eq!(at(16), Some(2));
        assert_eq!(at(31), Some(31));
    }

    #[test]
    fn runs_cut_into_tiles_of_64_rows() {
        let runs = [(3, 0, 64), (7, 64, 65), (9, 129, 1)];
        assert_eq!(
            fp4_grouped_tiles(&runs),
            vec![
                [3, 0, 64, 0],
                [7, 64, 64, 0],
                [7, 128, 1, 0],
                [9, 129, 1, 0]
            ]
        );
        assert!(fp4_grouped_tiles(&[]).is_empty());
        // The bound holds for any split of the pairs over the experts.
        assert!(fp4_grouped_max_tiles(130, 3) >= 4);
        assert_eq!(fp4_grouped_max_tiles(0, 256), 0);
    }

    #[test]
    fn shapes_and_pointers_are_checked_before_launch() {
        let experts = Fp4Experts {
            w1: 256,
            s1: 512,
            w3: 768,
            s3: 1024,
            w2: 1280,
            s2: 1536,
            experts: 256,
            hidden: 4096,
            inter: 2048,
        };
        let bank = Fp4GroupedBank { experts, shift: 0 };
        let smem = 227 * 1024;
        let two = Fp4GroupedForm::ThreeStages;
        assert!(check_fp4_grouped(&bank, [16, 32, 48], 10, smem, two).is_ok());
        assert!(
            check_fp4_grouped(&bank, [16, 32, 48], 10, smem, Fp4GroupedForm::TwoStages).is_ok()
        );
        // Two blocks of 3 stages fit an H200 SM's 228 KB.
        assert!(2 * (two.smem_bytes() + 1024) <= 228 * 1024);
        assert!(fp4_grouped_fits(4096, 1024));
        assert!(!fp4_grouped_fits(4096, 64));
        assert!(!fp4_grouped_fits(128, 2048));
        let odd = Fp4GroupedBank {
            experts: Fp4Experts {
                inter: 96,
                ..experts
            },
            ..bank
        };
        assert!(check_fp4_grouped(&odd, [16, 32, 48], 10, smem, two).is_err());
        assert!(check_fp4_grouped(&bank, [16, 0, 48], 10, smem, two).is_err());
        assert!(check_fp4_grouped(&bank, [16, 32, 40], 10, smem, two).is_err());
        let scales = Fp4GroupedBank {
            experts: Fp4Experts {
                s2: 1538,
                ..experts
            },
            ..bank
        };
        assert!(check_fp4_grouped(&scales, [16, 32, 48], 10, smem, two).is_err());
        assert!(check_fp4_grouped(&bank, [16, 32, 48], 10, 48 * 1024, two).is_err());
        let shifted = Fp4GroupedBank { shift: 16, ..bank };
        assert!(check_fp4_grouped(&shifted, [16, 32, 48], 10, smem, two).is_err());
    }
}
