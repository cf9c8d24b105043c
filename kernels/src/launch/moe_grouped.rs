//! Launches of the grouped FP4 expert GEMMs (`dsk_fp4_grouped_*` at the end of `fp4_moe.cu`):
//! the routed experts of a GEMM step (prefill chunk) with the FP4 weights decoded inside the
//! kernel, on the f16 tensor cores, instead of widened to f16 per step and multiplied by cuBLAS.
//! The host sorts the (token, slot) pairs by expert and cuts each expert's run of sorted rows
//! into tiles of [`FP4_GROUPED_TILE_ROWS`] ([`fp4_grouped_tiles`]); activations travel as f16 in
//! "k8 order" (every 8 values stored 0 4 1 5 2 6 3 7, see the kernel's comment), gathered by
//! [`Kernels::gather_rows`] into `GatherInto::F16K8`. No launch synchronises or allocates.

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchConfig};

use super::submit::SubmitKernel;
use super::{aligned16, function, i32_arg, nonnull, u32_grid, Kernels};
use crate::error::KernelError;
use crate::Fp4Experts;

/// Sorted rows (tokens of one expert) one block takes.
pub const FP4_GROUPED_TILE_ROWS: usize = 64;
/// Rows of W1 (and the same rows of W3) one gate/up block takes.
pub const FP4_GROUPED_GATE_UP_ROWS: usize = 128;
/// Rows of W2 one down block takes.
pub const FP4_GROUPED_DOWN_ROWS: usize = 256;
/// Values along K per pipeline stage: K must be a multiple.
pub const FP4_GROUPED_K_STEP: usize = 128;
/// Bytes of one pipeline stage (weights, their scales, activations).
const STAGE_BYTES: usize = 256 * 64 + 256 * 4 + 64 * 256;

/// The two builds of the grouped kernels, by pipeline depth (both two blocks an SM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp4GroupedForm {
    /// 2 stages in flight (67 KB of shared memory a block; fits sm_121's 99 KB): the default,
    /// measured faster on H200 (8 layers of an 8K prefill: gate/up 46.3 against 52.1 ms, down
    /// 23.6 against 23.2; a 100K prompt 4.30 against 4.46 s).
    TwoStages,
    /// 3 stages (100 KB), `DSPARK_GROUPED_FORM=3`, where the device allows it.
    ThreeStages,
}

impl Fp4GroupedForm {
    /// The form `DSPARK_GROUPED_FORM` (`2` or `3`, read by the caller) asks for, or the default.
    /// A form needing more shared memory than the device allows (`smem_optin`) falls back to 2.
    pub fn choose(value: Option<&str>, smem_optin: usize) -> Result<Self, KernelError> {
        match value.map(str::trim) {
            None | Some("") => Ok(Fp4GroupedForm::TwoStages),
            Some("3") if Fp4GroupedForm::ThreeStages.smem_bytes() <= smem_optin => {
                Ok(Fp4GroupedForm::ThreeStages)
            }
            Some("3") => Ok(Fp4GroupedForm::TwoStages),
            Some("2") => Ok(Fp4GroupedForm::TwoStages),
            Some(other) => Err(KernelError::invalid(
                "fp4_grouped",
                format!("DSPARK_GROUPED_FORM={other:?}: expected 3 or 2 (pipeline stages)"),
            )),
        }
    }

    /// Dynamic shared memory of a block: the factor table and the stages.
    pub fn smem_bytes(self) -> usize {
        let stages = match self {
            Fp4GroupedForm::ThreeStages => 3,
            Fp4GroupedForm::TwoStages => 2,
        };
        1024 + stages * STAGE_BYTES
    }
}

/// The grouped kernels' kernels, both forms.
pub struct MoeGroupedFns {
    pub(crate) gate_up: [CudaFunction; 2],
    pub(crate) down: [CudaFunction; 2],
    pub(crate) form: Fp4GroupedForm,
}

impl MoeGroupedFns {
    /// From the `fp4_moe` module, for a device whose blocks may opt in to `smem_optin` bytes.
    pub(crate) fn load(module: &Arc<CudaModule>, smem_optin: usize) -> Result<Self, KernelError> {
        let f = |name: &str| function(module, name);
        let value = std::env::var("DSPARK_GROUPED_FORM").ok();
        Ok(Self {
            gate_up: [
                f("dsk_fp4_grouped_gate_up")?,
                f("dsk_fp4_grouped_gate_up_2st")?,
            ],
            down: [f("dsk_fp4_grouped_down")?, f("dsk_fp4_grouped_down_2st")?],
            form: Fp4GroupedForm::choose(value.as_deref(), smem_optin)?,
        })
    }

    fn index(&self) -> usize {
        match self.form {
            Fp4GroupedForm::ThreeStages => 0,
            Fp4GroupedForm::TwoStages => 1,
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
    let mut tiles = Vec::new();
    for &(expert, first, rows) in runs {
        let mut at = 0;
        while at < rows {
            let n = (rows - at).min(FP4_GROUPED_TILE_ROWS);
            // Experts, rows and positions are below the step's pair count (an i32 on the device).
            tiles.push([expert as i32, (first + at) as i32, n as i32, 0]);
            at += n;
        }
    }
    tiles
}

/// Most tiles `pairs` sorted rows over at most `experts` runs can make.
pub fn fp4_grouped_max_tiles(pairs: usize, experts: usize) -> usize {
    pairs.div_ceil(FP4_GROUPED_TILE_ROWS) + experts.min(pairs)
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
    /// k8 order.
    ///
    /// # Safety
    /// The bank's pointers must hold its experts (every tile's expert below their count), `x`
    /// and `act` every row any tile names, `tiles` `count` descriptors; all device memory of
    /// this context.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn fp4_grouped_gate_up(
        &self,
        stream: &CudaStream,
        bank: &Fp4GroupedBank,
        x: CUdeviceptr,
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
        stream
            .kernel(&self.moe_grouped.gate_up[self.moe_grouped.index()])
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
            .arg(&limit)
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
    fn form_defaults_to_two_stages_and_fits_the_device() {
        use Fp4GroupedForm::{ThreeStages, TwoStages};
        let (h200, gb10) = (227 * 1024, 99 * 1024);
        assert_eq!(Fp4GroupedForm::choose(None, h200).unwrap(), TwoStages);
        assert_eq!(Fp4GroupedForm::choose(None, gb10).unwrap(), TwoStages);
        assert!(TwoStages.smem_bytes() <= gb10);
        assert_eq!(Fp4GroupedForm::choose(Some(" 2"), h200).unwrap(), TwoStages);
        assert_eq!(
            Fp4GroupedForm::choose(Some("3"), h200).unwrap(),
            ThreeStages
        );
        assert_eq!(Fp4GroupedForm::choose(Some("3"), gb10).unwrap(), TwoStages);
        let err = Fp4GroupedForm::choose(Some("4"), h200)
            .unwrap_err()
            .to_string();
        assert!(err.contains("DSPARK_GROUPED_FORM"), "{err}");
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
