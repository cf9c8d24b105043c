//! Launches of `moe_sorted.cu`: the glue of the routed experts over many tokens (prefill), where
//! the (token, slot) pairs are sorted by expert (on the host, or on the device for the grouped
//! FP4 kernels: [`Kernels::moe_sort`]) and each expert's rows go through one cuBLAS GEMM on its
//! widened weights. No launch synchronises or allocates.

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchConfig};

use super::moe_grouped::fp4_grouped_max_tiles_of;
use super::submit::SubmitKernel;
use super::{aligned16, function, grid_stride, i32_arg, i64_arg, nonnull, u32_grid, Kernels};
use crate::error::KernelError;

/// The `moe_sorted.cu` kernels.
pub struct MoeSortedFns {
    dequant: CudaFunction,
    dequant_f16: CudaFunction,
    gather: CudaFunction,
    gather_f16: CudaFunction,
    gather_f16_k8: CudaFunction,
    gather_f16_k32: CudaFunction,
    f16_to_k32: CudaFunction,
    swiglu_f16: CudaFunction,
    combine: CudaFunction,
    u8_range: CudaFunction,
    sort_plan: CudaFunction,
    sort_scatter: CudaFunction,
}

impl MoeSortedFns {
    pub(crate) fn load(module: &Arc<CudaModule>) -> Result<Self, KernelError> {
        let f = |name: &str| function(module, name);
        Ok(Self {
            dequant: f("dsk_fp4_dequant_experts_f32")?,
            dequant_f16: f("dsk_fp4_dequant_experts_f16")?,
            gather: f("dsk_gather_rows_f32")?,
            gather_f16: f("dsk_gather_rows_f32_to_f16")?,
            gather_f16_k8: f("dsk_gather_rows_f32_to_f16_k8")?,
            gather_f16_k32: f("dsk_gather_rows_f32_to_f16_k32")?,
            f16_to_k32: f("dsk_rows_f16_to_k32")?,
            swiglu_f16: f("dsk_swiglu_clip_to_f16")?,
            combine: f("dsk_moe_combine_sorted_f32")?,
            u8_range: f("dsk_u8_range")?,
            sort_plan: f("dsk_moe_sort_plan")?,
            sort_scatter: f("dsk_moe_sort_scatter")?,
        })
    }
}

/// E8M0 scale bytes (exponent + 127) with which every FP4 value of a block is exact in f16:
/// 6 * 2^13 is under f16's largest value, 1.5 * 2^-23 (the finest step, 2^-24) its smallest.
pub const F16_EXACT_SCALES: std::ops::RangeInclusive<u8> = 104..=140;

/// What [`Kernels::gather_rows`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatherInto {
    /// The rows as they are (`dsk_gather_rows_f32`).
    F32,
    /// Rounded to f16, to nearest (`dsk_gather_rows_f32_to_f16`).
    F16,
    /// Rounded to f16 with every 8 values of a row stored in the order 0 4 1 5 2 6 3 7, the
    /// grouped FP4 kernels' "k8 order" (see `moe_grouped`; `dsk_gather_rows_f32_to_f16_k8`):
    /// `width` a multiple of 8, `src` and `dst` 16-byte aligned.
    F16K8,
    /// Rounded to f16 in "k32 order" (in every 32 values, position `16 st + 8 h + 2 t + e` holds
    /// value `8 t + 2 st + h + 4 e`: the wgmma build of the grouped FP4 kernels,
    /// `moe_grouped::ActivationOrder::K32`; `dsk_gather_rows_f32_to_f16_k32`): `width` a multiple
    /// of 32, `dst` 16-byte aligned. A null `idx` converts the rows in place order
    /// (`dst[i] = src[i]`: x for a gate/up that gathers through its row list).
    F16K32,
}

/// Most matrices of one [`Kernels::fp4_dequant_experts`] launch (grid.y).
const GRID_Y_MAX: usize = 65_535;

/// Most experts [`Kernels::moe_sort`] takes: its plan kernel scans the experts with one thread
/// each (`MOE_SORT_MAX_EXPERTS` in `moe_sorted.cu`). Larger banks sort on the host.
pub const MOE_SORT_MAX_EXPERTS: usize = 1024;
/// Threads of the plan's single block (at least [`MOE_SORT_MAX_EXPERTS`]).
const SORT_PLAN_THREADS: u32 = 1024;
/// Threads of each of the scatter's blocks (one block per expert).
const SORT_SCATTER_THREADS: u32 = 256;

/// The device buffers of [`Kernels::moe_sort`] (all i32, device memory of this context).
#[derive(Clone, Copy, Debug)]
pub struct MoeSortBuffers {
    /// In: the router's expert ids, `pairs` values (pair p = token p / topk, slot p % topk);
    /// 16-byte aligned (read four at a time).
    pub ids: CUdeviceptr,
    /// Out, `pairs` values: sorted row r's token, -1 for the rows no pair maps to (past the
    /// last valid one, where ids fall outside the bank).
    pub tokens: CUdeviceptr,
    /// Out, `pairs` values: pair p's sorted row, -1 for an id outside `0..experts`.
    pub slots: CUdeviceptr,
    /// Out, `max_tiles` `[expert, first row, rows, 0]`: the tiles in expert order, then empty
    /// ones (`[0, 0, 0, 0]`: rows = 0); 16-byte aligned.
    pub tiles: CUdeviceptr,
    /// Workspace of `experts` values (each expert's end row, from the plan to the scatter).
    pub ends: CUdeviceptr,
}

/// The sizes of a [`Kernels::moe_sort`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeSortShape {
    /// (token, slot) pairs: `tokens * topk`.
    pub pairs: usize,
    pub topk: usize,
    /// Experts of the bank: ids outside `0..experts` are dropped (slot -1).
    pub experts: usize,
    /// Most sorted rows of one tile (the grouped kernels' tile size).
    pub tile_rows: usize,
    /// Tiles written: at least [`fp4_grouped_max_tiles_of`] of the other sizes.
    pub max_tiles: usize,
}

/// Launch-time checks of [`Kernels::moe_sort`], testable without a GPU.
pub fn check_moe_sort(buf: &MoeSortBuffers, shape: &MoeSortShape) -> Result<(), KernelError> {
    const K: &str = "moe_sort";
    let MoeSortShape {
        pairs,
        topk,
        experts,
        tile_rows,
        max_tiles,
    } = *shape;
    if experts == 0 || experts > MOE_SORT_MAX_EXPERTS {
        return Err(KernelError::invalid(
            K,
            format!("{experts} experts (the device sort takes 1..={MOE_SORT_MAX_EXPERTS})"),
        ));
    }
    if topk == 0 || tile_rows == 0 {
        return Err(KernelError::invalid(
            K,
            format!("topk {topk} and tile_rows {tile_rows} must be positive"),
        ));
    }
    let need = fp4_grouped_max_tiles_of(pairs, experts, tile_rows);
    if max_tiles < need {
        return Err(KernelError::invalid(
            K,
            format!(
                "max_tiles {max_tiles} below the {need} tiles {pairs} pairs over {experts} \
                 experts can make"
            ),
        ));
    }
    i32_arg(K, "pairs", pairs)?;
    i32_arg(K, "tile_rows", tile_rows)?;
    i32_arg(K, "max_tiles", max_tiles)?;
    let ptrs = [
        ("ids", buf.ids),
        ("tokens", buf.tokens),
        ("slots", buf.slots),
        ("tiles", buf.tiles),
        ("ends", buf.ends),
    ];
    nonnull(K, &ptrs)?;
    aligned16(K, &[("ids", buf.ids), ("tiles", buf.tiles)])
}

/// Launch-time checks of [`Kernels::fp4_dequant_experts`], testable without a GPU.
pub fn check_fp4_dequant_experts(
    ptrs: [CUdeviceptr; 4],
    count: usize,
    rows: usize,
    k: usize,
) -> Result<(), KernelError> {
    const K: &str = "fp4_dequant_experts";
    if k == 0 || !k.is_multiple_of(32) {
        return Err(KernelError::invalid(
            K,
            format!("k = {k} must be a positive multiple of 32 (one scale per 32 values)"),
        ));
    }
    if count > GRID_Y_MAX {
        return Err(KernelError::invalid(
            K,
            format!("{count} matrices in one launch (at most {GRID_Y_MAX})"),
        ));
    }
    i32_arg(K, "rows", rows)?;
    i32_arg(K, "k", k)?;
    let [w, s, experts, out] = ptrs;
    nonnull(K, &[("w", w), ("s", s), ("experts", experts), ("out", out)])?;
    // One 16-byte load of 32 weights and eight 16-byte stores per thread.
    aligned16(K, &[("w", w), ("out", out)])
}

impl Kernels {
    /// Widens the FP4 matrices `[rows, k]` of `count` experts (ids in `experts`, device i32) of
    /// one bank (`w` `[E, rows, k/2]` bytes, `s` `[E, rows, k/32]` E8M0) to f32 `[count, rows, k]`
    /// in `out`: exact values, as the CPU reference widens them.
    ///
    /// # Safety
    /// `w` and `s` must hold the bank, every id in `experts` must be below its expert count, and
    /// `out` must hold `count * rows * k` f32, all device memory of this context.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn fp4_dequant_experts(
        &self,
        stream: &CudaStream,
        w: CUdeviceptr,
        s: CUdeviceptr,
        experts: CUdeviceptr,
        count: usize,
        rows: usize,
        k: usize,
        out: CUdeviceptr,
    ) -> Result<(), KernelError> {
        // SAFETY: this function's contract.
        unsafe { self.fp4_dequant_experts_as(stream, [w, s, experts, out], count, rows, k, false) }
    }

    /// [`Self::fp4_dequant_experts`] into f16 `[count, rows, k]` (exact where every scale byte
    /// of the bank is in [`F16_EXACT_SCALES`], see [`Self::u8_range`]).
    ///
    /// # Safety
    /// As [`Self::fp4_dequant_experts`], with `out` holding `count * rows * k` f16.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn fp4_dequant_experts_f16(
        &self,
        stream: &CudaStream,
        w: CUdeviceptr,
        s: CUdeviceptr,
        experts: CUdeviceptr,
        count: usize,
        rows: usize,
        k: usize,
        out: CUdeviceptr,
    ) -> Result<(), KernelError> {
        // SAFETY: this function's contract.
        unsafe { self.fp4_dequant_experts_as(stream, [w, s, experts, out], count, rows, k, true) }
    }

    /// The f32 or f16 widening launch.
    ///
    /// # Safety
    /// As [`Self::fp4_dequant_experts`] for the output type.
    #[allow(clippy::too_many_arguments)]
    unsafe fn fp4_dequant_experts_as(
        &self,
        stream: &CudaStream,
        ptrs: [CUdeviceptr; 4],
        count: usize,
        rows: usize,
        k: usize,
        f16: bool,
    ) -> Result<(), KernelError> {
        const K: &str = "fp4_dequant_experts";
        if count == 0 || rows == 0 {
            return Ok(());
        }
        check_fp4_dequant_experts(ptrs, count, rows, k)?;
        let [w, s, experts, out] = ptrs;
        let (c, r, kk) = (count as i32, rows as i32, k as i32);
        // grid.y = the matrix; grid.x strides over its values four (f32) or eight (f16) at a
        // time.
        let per_thread = if f16 { 8 } else { 4 };
        let per_matrix = (rows * k / per_thread)
            .div_ceil(256)
            .clamp(1, 4 * self.sms.max(1));
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, per_matrix)?, u32_grid(K, count)?, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = if f16 {
            &self.moe_sorted.dequant_f16
        } else {
            &self.moe_sorted.dequant
        };
        stream
            .kernel(f)
            .arg(&w)
            .arg(&s)
            .arg(&experts)
            .arg(&c)
            .arg(&r)
            .arg(&kk)
            .arg(&out)
            .launch(cfg)
            .map_err(KernelError::driver("launch fp4_dequant_experts"))?;
        Ok(())
    }

    /// `dst[i, :] = src[idx[i], :]` for `n` rows of `width` f32 values, written as `into` says;
    /// a negative `idx[i]` writes a row of zeros (the rows [`Self::moe_sort`] leaves unused).
    ///
    /// # Safety
    /// `idx` must hold `n` device i32, each a row of `src` (`width` f32 per row) or negative
    /// (or be null for [`GatherInto::F16K32`], `src` then holding `n` rows); `dst` must hold
    /// `n * width` values of the output type; all device memory of this context.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gather_rows(
        &self,
        stream: &CudaStream,
        into: GatherInto,
        src: CUdeviceptr,
        idx: CUdeviceptr,
        n: usize,
        width: usize,
        dst: CUdeviceptr,
    ) -> Result<(), KernelError> {
        let (kernel, what, f, per_thread) = match into {
            GatherInto::F32 => (
                "gather_rows_f32",
                "launch gather_rows_f32",
                &self.moe_sorted.gather,
                1,
            ),
            GatherInto::F16 => (
                "gather_rows_f32_to_f16",
                "launch gather_rows_f32_to_f16",
                &self.moe_sorted.gather_f16,
                1,
            ),
            // Two 16-byte loads and one 16-byte store per 8 values.
            GatherInto::F16K8 => (
                "gather_rows_f32_to_f16_k8",
                "launch gather_rows_f32_to_f16_k8",
                &self.moe_sorted.gather_f16_k8,
                8,
            ),
            // Eight scattered loads and one 16-byte store per 8 values.
            GatherInto::F16K32 => (
                "gather_rows_f32_to_f16_k32",
                "launch gather_rows_f32_to_f16_k32",
                &self.moe_sorted.gather_f16_k32,
                8,
            ),
        };
        if n == 0 || width == 0 {
            return Ok(());
        }
        // Only the k32 form reads a null list as "the rows in order".
        if into == GatherInto::F16K32 {
            nonnull(kernel, &[("src", src), ("dst", dst)])?;
        } else {
            nonnull(kernel, &[("src", src), ("idx", idx), ("dst", dst)])?;
        }
        match into {
            GatherInto::F16K8 | GatherInto::F16K32 => {
                let group = if into == GatherInto::F16K8 { 8 } else { 32 };
                if !width.is_multiple_of(group) {
                    return Err(KernelError::invalid(
                        kernel,
                        format!("width {width} must be a multiple of {group}"),
                    ));
                }
                aligned16(kernel, &[("src", src), ("dst", dst)])?;
            }
            GatherInto::F32 | GatherInto::F16 => {}
        }
        let (nn, w) = (i32_arg(kernel, "n", n)?, i32_arg(kernel, "width", width)?);
        stream
            .kernel(f)
            .arg(&src)
            .arg(&idx)
            .arg(&nn)
            .arg(&w)
            .arg(&dst)
            .launch(grid_stride(kernel, n * width / per_thread, self.sms)?)
            .map_err(KernelError::driver(what))?;
        Ok(())
    }

    /// `n` rows of `width` f16 values (in place order) stored in [`GatherInto::F16K32`]'s order:
    /// what that gather with a null list stores for the f32 rows these were rounded from.
    ///
    /// # Safety
    /// `src` and `dst` must each address `n * width` u16 of device memory of this context, not
    /// overlapping.
    pub unsafe fn rows_f16_to_k32(
        &self,
        stream: &CudaStream,
        src: CUdeviceptr,
        n: usize,
        width: usize,
        dst: CUdeviceptr,
    ) -> Result<(), KernelError> {
        const K: &str = "rows_f16_to_k32";
        if n == 0 || width == 0 {
            return Ok(());
        }
        nonnull(K, &[("src", src), ("dst", dst)])?;
        if !width.is_multiple_of(32) {
            return Err(KernelError::invalid(
                K,
                format!("width {width} must be a multiple of 32"),
            ));
        }
        aligned16(K, &[("src", src), ("dst", dst)])?;
        let (nn, w) = (i32_arg(K, "n", n)?, i32_arg(K, "width", width)?);
        stream
            .kernel(&self.moe_sorted.f16_to_k32)
            .arg(&src)
            .arg(&nn)
            .arg(&w)
            .arg(&dst)
            .launch(grid_stride(K, n * width / 32, self.sms)?)
            .map_err(KernelError::driver("launch rows_f16_to_k32"))?;
        Ok(())
    }

    /// [`Self::swiglu_clip`]'s values (the same f32 arithmetic) stored as f16 in `out`.
    ///
    /// # Safety
    /// `gate` and `up` must address `len` f32 and `out` `len` f16 of device memory of this
    /// context.
    pub unsafe fn swiglu_clip_to_f16(
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
                &self.moe_sorted.swiglu_f16,
                ["swiglu_clip_to_f16", "launch swiglu_clip_to_f16"],
                [gate, up, out],
                len,
                limit,
            )
        }
    }

    /// The smallest and largest of `n` bytes at `v`, into `range` (two device u32 that must
    /// hold 255 and 0 before the launch).
    ///
    /// # Safety
    /// `v` must address `n` bytes and `range` two u32 of device memory of this context.
    pub unsafe fn u8_range(
        &self,
        stream: &CudaStream,
        v: CUdeviceptr,
        n: usize,
        range: CUdeviceptr,
    ) -> Result<(), KernelError> {
        const K: &str = "u8_range";
        if n == 0 {
            return Ok(());
        }
        nonnull(K, &[("v", v), ("range", range)])?;
        let nn = i64_arg(K, "n", n)?;
        stream
            .kernel(&self.moe_sorted.u8_range)
            .arg(&v)
            .arg(&nn)
            .arg(&range)
            .launch(grid_stride(K, n, self.sms)?)
            .map_err(KernelError::driver("launch u8_range"))?;
        Ok(())
    }

    /// Sorts a GEMM step's (token, slot) pairs by expert on the device, for the grouped FP4
    /// kernels: the host's order (experts ascending, stable by pair within an expert, ids
    /// outside the bank dropped) and its tiles of at most `tile_rows` rows, bit for bit, with
    /// no host synchronisation. Two launches: `dsk_moe_sort_plan` (one block: counts, scans,
    /// every tile, the tail of `tokens` and the dropped pairs' slots) and `dsk_moe_sort_scatter`
    /// (a block per expert: its pairs' slots and tokens in pair order). See [`MoeSortBuffers`]
    /// for what lands where; the `max_tiles` tiles past the used ones are empty (rows 0), the
    /// rows past the valid ones have token -1, so the gather and the grouped kernels can run
    /// over `pairs` rows and `max_tiles` tiles without knowing the counts.
    ///
    /// # Safety
    /// The buffers must hold what [`MoeSortBuffers`] says for `shape`, all device memory of this
    /// context.
    pub unsafe fn moe_sort(
        &self,
        stream: &CudaStream,
        buf: &MoeSortBuffers,
        shape: &MoeSortShape,
    ) -> Result<(), KernelError> {
        if shape.pairs == 0 && shape.max_tiles == 0 {
            return Ok(());
        }
        check_moe_sort(buf, shape)?;
        // pairs, tile_rows and max_tiles checked to fit i32, experts <= 1024.
        let (p, k, e) = (
            shape.pairs as i32,
            i32_arg("moe_sort", "topk", shape.topk)?,
            shape.experts as i32,
        );
        let (tr, mt) = (shape.tile_rows as i32, shape.max_tiles as i32);
        let plan = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (SORT_PLAN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.moe_sorted.sort_plan)
            .arg(&buf.ids)
            .arg(&p)
            .arg(&e)
            .arg(&tr)
            .arg(&mt)
            .arg(&buf.tiles)
            .arg(&buf.ends)
            .arg(&buf.tokens)
            .arg(&buf.slots)
            .launch(plan)
            .map_err(KernelError::driver("launch moe_sort_plan"))?;
        if shape.pairs == 0 {
            return Ok(());
        }
        let scatter = LaunchConfig {
            grid_dim: (u32_grid("moe_sort", shape.experts)?, 1, 1),
            block_dim: (SORT_SCATTER_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.moe_sorted.sort_scatter)
            .arg(&buf.ids)
            .arg(&p)
            .arg(&k)
            .arg(&buf.ends)
            .arg(&buf.tokens)
            .arg(&buf.slots)
            .launch(scatter)
            .map_err(KernelError::driver("launch moe_sort_scatter"))?;
        Ok(())
    }

    /// `out[t, :] = sum_j weights[t, j] * y[pos[t, j], :]` over the `topk` slots in order (a
    /// negative position adds nothing), then `+ addend[t, :]` unless `addend` is 0 (the shared
    /// expert's output: the bits of a separate `add_into` after the sum): the expert outputs,
    /// sorted by expert, back in token order.
    ///
    /// # Safety
    /// `pos` and `weights` must hold `tokens * topk` device i32 / f32, every non-negative
    /// position a row of `y` (`hidden` f32 per row); `out` (and a non-zero `addend`) must hold
    /// `tokens * hidden` f32; all device memory of this context.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn moe_combine_sorted(
        &self,
        stream: &CudaStream,
        y: CUdeviceptr,
        pos: CUdeviceptr,
        weights: CUdeviceptr,
        tokens: usize,
        topk: usize,
        hidden: usize,
        out: CUdeviceptr,
        addend: CUdeviceptr,
    ) -> Result<(), KernelError> {
        const K: &str = "moe_combine_sorted";
        if tokens == 0 || hidden == 0 {
            return Ok(());
        }
        nonnull(
            K,
            &[("y", y), ("pos", pos), ("weights", weights), ("out", out)],
        )?;
        let (t, k, h) = (
            i32_arg(K, "tokens", tokens)?,
            i32_arg(K, "topk", topk)?,
            i32_arg(K, "hidden", hidden)?,
        );
        stream
            .kernel(&self.moe_sorted.combine)
            .arg(&y)
            .arg(&pos)
            .arg(&weights)
            .arg(&t)
            .arg(&k)
            .arg(&h)
            .arg(&out)
            .arg(&addend)
            .launch(grid_stride(K, tokens * hidden, self.sms)?)
            .map_err(KernelError::driver("launch moe_combine_sorted"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequant_needs_whole_scale_groups_and_real_pointers() {
        assert!(check_fp4_dequant_experts([16, 16, 16, 16], 2, 4, 64).is_ok());
        assert!(check_fp4_dequant_experts([16, 16, 16, 16], 2, 4, 48).is_err());
        assert!(check_fp4_dequant_experts([16, 0, 16, 16], 2, 4, 64).is_err());
        assert!(check_fp4_dequant_experts([16, 16, 16, 8], 2, 4, 64).is_err());
        assert!(check_fp4_dequant_experts([16, 16, 16, 16], 65_536, 4, 64).is_err());
    }

    #[test]
    fn max_tiles_bound_any_split_and_match_the_grouped_kernels() {
        use crate::launch::moe_grouped::{fp4_grouped_max_tiles, FP4_GROUPED_TILE_ROWS};
        for (pairs, experts) in [(0, 256), (1, 256), (130, 3), (49_152, 256), (5, 1024)] {
            assert_eq!(
                fp4_grouped_max_tiles_of(pairs, experts, FP4_GROUPED_TILE_ROWS),
                fp4_grouped_max_tiles(pairs, experts)
            );
        }
        // Every split of `pairs` rows over `experts` runs fits the bound.
        for tile_rows in [1, 3, 64, 128] {
            for pairs in 0..40usize {
                for experts in 1..6usize {
                    let bound = fp4_grouped_max_tiles_of(pairs, experts, tile_rows);
                    // The worst split: every expert but one with a single row.
                    let used = experts.min(pairs);
                    let worst = if used == 0 {
                        0
                    } else {
                        (used - 1) + (pairs - (used - 1)).div_ceil(tile_rows)
                    };
                    assert!(
                        worst <= bound,
                        "{pairs} pairs, {experts} experts, {tile_rows}"
                    );
                }
            }
        }
    }

    #[test]
    fn device_sort_checks_experts_tiles_and_pointers() {
        let buf = MoeSortBuffers {
            ids: 256,
            tokens: 512,
            slots: 768,
            tiles: 1024,
            ends: 1280,
        };
        let shape = MoeSortShape {
            pairs: 49_152,
            topk: 6,
            experts: 256,
            tile_rows: 64,
            max_tiles: fp4_grouped_max_tiles_of(49_152, 256, 64),
        };
        assert!(check_moe_sort(&buf, &shape).is_ok());
        let too_many = MoeSortShape {
            experts: MOE_SORT_MAX_EXPERTS + 1,
            max_tiles: fp4_grouped_max_tiles_of(49_152, MOE_SORT_MAX_EXPERTS + 1, 64),
            ..shape
        };
        let err = check_moe_sort(&buf, &too_many).unwrap_err().to_string();
        assert!(err.contains("1025 experts"), "{err}");
        let short = MoeSortShape {
            max_tiles: shape.max_tiles - 1,
            ..shape
        };
        assert!(check_moe_sort(&buf, &short).is_err());
        for bad in [
            MoeSortShape { topk: 0, ..shape },
            MoeSortShape {
                tile_rows: 0,
                ..shape
            },
            MoeSortShape {
                experts: 0,
                ..shape
            },
        ] {
            assert!(check_moe_sort(&buf, &bad).is_err(), "{bad:?}");
        }
        assert!(check_moe_sort(&MoeSortBuffers { ends: 0, ..buf }, &shape).is_err());
        assert!(check_moe_sort(&MoeSortBuffers { ids: 260, ..buf }, &shape).is_err());
        assert!(check_moe_sort(&MoeSortBuffers { tiles: 1032, ..buf }, &shape).is_err());
    }
}
