//! Launches of `paged.cu`: KV pool rows addressed on the device from each step row's position and
//! its sequence's tables (writes of this step's rows, the compressor's compressed rows, and the
//! attention key lists), so a decode step needs no host-built offsets.
//!
//! Row `i` of a [`PoolSection`] for a sequence with table `t` is at element
//! `t[i * ratio / block_size] * floats_per_block + base + (i * ratio % block_size) / ratio *
//! stride`, where `t` is the sequence's block table, or for a `recent` section its recent table
//! (server/src/engine/model/kv.rs: `window_row`, `comp_in_row`, `comp_row`, ...).
//! A step row with a negative position is padding: every kernel skips it.

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchConfig};

use super::submit::SubmitKernel;
use super::{function, i32_arg, i64_arg, nonnull, u32_grid, Kernels};
use crate::error::KernelError;
use crate::kv_record::KvRowFormat;

/// Largest compressed row width (`head_dim` 512 of V4-Flash).
pub const COMPRESS_MAX_DIM: usize = 512;
/// Widest row [`Kernels::pool_write_rows`] stores in a format other than f32 (staged in shared
/// memory: `DSK_PW_MAX_DIM` in paged.cu).
pub const POOL_WRITE_MAX_DIM: usize = 1024;
/// Largest compress ratio (a CSA row pools `2 * ratio` slots, at most 256).
pub const COMPRESS_MAX_RATIO: usize = 128;
/// Threads of a key-list block, and the most blocks per row.
const KEY_THREADS: usize = 256;
const MAX_KEY_CHUNKS: usize = 65_535;

/// The `paged.cu` kernels.
pub struct PagedFns {
    write: CudaFunction,
    compress: CudaFunction,
    key_offsets: CudaFunction,
}

impl PagedFns {
    pub(crate) fn load(module: &Arc<CudaModule>) -> Result<Self, KernelError> {
        let f = |name: &str| function(module, name);
        Ok(Self {
            write: f("dsk_pool_write_f32")?,
            compress: f("dsk_compress_rows_f32")?,
            key_offsets: f("dsk_build_key_offsets")?,
        })
    }
}

/// One region of a layer's part of every block: block `b`'s region at `b * floats_per_block +
/// base` (`base`: where the layer's parts start in the pool plus the region's offset in a part),
/// `stride` floats per row, `ratio` positions per row (1 for per-token rows, the compress ratio
/// for compressed rows). `recent`: the blocks are named by the rows' recent tables (window rows,
/// compressor inputs), else by their block tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSection {
    pub floats_per_block: usize,
    pub base: usize,
    pub stride: usize,
    pub ratio: usize,
    pub recent: bool,
}

/// The step's rows and their sequences' tables, all device memory.
#[derive(Clone, Copy, Debug)]
pub struct RowTable {
    /// i32 `[rows]`: each row's position (negative: padding, skipped).
    pub positions: CUdeviceptr,
    /// i32 `[rows]`: where each row's block table starts in `block_tables`.
    pub bt_starts: CUdeviceptr,
    /// i32 `[rows]`: how many blocks each row's table has (no entry past it is read).
    pub bt_lens: CUdeviceptr,
    /// u32: every sequence's block table, each followed by its recent table (as many entries;
    /// `u32::MAX` where released, never read), concatenated.
    pub block_tables: CUdeviceptr,
    pub rows: usize,
}

/// One compressor (`compress_window` on the host).
#[derive(Clone, Copy, Debug)]
pub struct CompressParams {
    /// Compress ratio: 4 (CSA) or 128 (HCA), at most [`COMPRESS_MAX_RATIO`].
    pub ratio: usize,
    /// 2 for overlapping CSA windows, 1 for HCA.
    pub coff: usize,
    /// Compressed row width, at most [`COMPRESS_MAX_DIM`].
    pub dim: usize,
    /// f32 `[ratio, coff * dim]` position biases.
    pub ape: CUdeviceptr,
    /// f32 `[dim]` RMSNorm weight.
    pub norm: CUdeviceptr,
    /// f32 `[rope_dim / 2]` inverse frequencies (plain or YaRN).
    pub inv_freq: CUdeviceptr,
    /// Rotated trailing channels; even, at most `dim`.
    pub rope_dim: usize,
    /// Multiplies cos and sin (YaRN attention factor; 1 for plain RoPE).
    pub attention_factor: f32,
    pub eps: f32,
    /// How the compressed rows are stored (the output section's stride is in slots, at least
    /// `out_format.slots(dim)`).
    pub out_format: KvRowFormat,
}

/// Which compressed rows follow a row's window keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyMode {
    /// Sliding layer: window rows only.
    Window = 0,
    /// HCA: every visible compressed row `0..(pos + 1) / ratio`.
    AllCompressed = 1,
    /// CSA: the indexer's selected rows.
    Selected = 2,
}

/// Keys of each row: window rows `lo..=pos` (`lo = (pos + 1).saturating_sub(window)`), then
/// none / all `(pos + 1) / ratio` visible compressed rows / `min(topk, visible)` of them.
pub fn key_counts(
    positions: &[usize],
    window: usize,
    ratio: usize,
    mode: KeyMode,
    topk: usize,
) -> Vec<usize> {
    positions
        .iter()
        .map(|&pos| {
            let lo = (pos + 1).saturating_sub(window);
            let win = pos + 1 - lo;
            let visible = (pos + 1).checked_div(ratio).unwrap_or(0);
            win + match mode {
                KeyMode::Window => 0,
                KeyMode::AllCompressed => visible,
                KeyMode::Selected => topk.min(visible),
            }
        })
        .collect()
}

/// `key_starts` (i32 `[rows + 1]`, a prefix sum) of the given key counts, or an error when the
/// total does not fit the kernels' i32 key indices.
pub fn key_starts(counts: &[usize]) -> Result<Vec<i32>, KernelError> {
    let mut starts = Vec::with_capacity(counts.len() + 1);
    let mut total = 0usize;
    starts.push(0);
    for &c in counts {
        total = total.saturating_add(c);
        starts.push(i32_arg("key_starts", "total keys", total)?);
    }
    Ok(starts)
}

/// Checks a section against the block geometry: the ratio divides the block, and the section's
/// `block_size / ratio` rows of `width` floats fit in a block.
pub fn check_section(
    kernel: &'static str,
    what: &str,
    block_size: usize,
    s: &PoolSection,
    width: usize,
) -> Result<(), KernelError> {
    let fpb = s.floats_per_block;
    if block_size == 0 || s.ratio == 0 || !block_size.is_multiple_of(s.ratio) {
        return Err(KernelError::invalid(
            kernel,
            format!(
                "{what}: block_size = {block_size} must be a positive multiple of ratio = {}",
                s.ratio
            ),
        ));
    }
    if width == 0 || s.stride < width {
        return Err(KernelError::invalid(
            kernel,
            format!(
                "{what}: rows of {width} floats do not fit stride {}",
                s.stride
            ),
        ));
    }
    // A block's rows of the section must fit one block's part (`fpb` floats). Where the part
    // starts inside the pool (`base`) depends on the pool's layout (block- or layer-major), so
    // only the span is checked here; the caller checks block ids against the pool.
    let end = (block_size / s.ratio - 1)
        .checked_mul(s.stride)
        .and_then(|v| v.checked_add(width));
    match end {
        Some(end) if end <= fpb && s.base.checked_add(end).is_some() => Ok(()),
        _ => Err(KernelError::invalid(
            kernel,
            format!(
                "{what}: {} rows of stride {} pass the block's {fpb} floats",
                block_size / s.ratio,
                s.stride,
            ),
        )),
    }
}

fn check_rows(kernel: &'static str, pool: CUdeviceptr, rows: &RowTable) -> Result<(), KernelError> {
    nonnull(
        kernel,
        &[
            ("pool", pool),
            ("positions", rows.positions),
            ("bt_starts", rows.bt_starts),
            ("bt_lens", rows.bt_lens),
            ("block_tables", rows.block_tables),
        ],
    )
}

/// Launch-time checks of [`Kernels::pool_write_rows`] / [`Kernels::pool_write_kv_gate`]
/// (`parts` = 1 or 2 rows of `width` written back to back; a format other than f32 stores one
/// row of at most [`POOL_WRITE_MAX_DIM`] values), testable without a GPU.
#[allow(clippy::too_many_arguments)]
pub fn check_pool_write(
    pool: CUdeviceptr,
    rows: &RowTable,
    block_size: usize,
    section: &PoolSection,
    width: usize,
    parts: usize,
    format: KvRowFormat,
) -> Result<(), KernelError> {
    const K: &str = "pool_write";
    check_rows(K, pool, rows)?;
    format
        .check(width)
        .map_err(|e| KernelError::invalid(K, e.to_string()))?;
    if format != KvRowFormat::F32 && (parts != 1 || width > POOL_WRITE_MAX_DIM) {
        return Err(KernelError::invalid(
            K,
            format!(
                "{format:?} stores one row of at most {POOL_WRITE_MAX_DIM} values, got {parts} \
                 of {width}"
            ),
        ));
    }
    if section.ratio != 1 {
        return Err(KernelError::invalid(
            K,
            format!("per-token section needs ratio 1, got {}", section.ratio),
        ));
    }
    check_section(
        K,
        "section",
        block_size,
        section,
        parts * format.slots(width),
    )
}

/// Launch-time checks of [`Kernels::compress_rows`], testable without a GPU.
pub fn check_compress(
    pool: CUdeviceptr,
    rows: &RowTable,
    block_size: usize,
    input: &PoolSection,
    output: &PoolSection,
    c: &CompressParams,
) -> Result<(), KernelError> {
    const K: &str = "compress_rows";
    check_rows(K, pool, rows)?;
    nonnull(
        K,
        &[("ape", c.ape), ("norm", c.norm), ("inv_freq", c.inv_freq)],
    )?;
    if !(1..=2).contains(&c.coff)
        || c.ratio == 0
        || c.ratio > COMPRESS_MAX_RATIO
        || c.dim == 0
        || c.dim > COMPRESS_MAX_DIM
        || c.rope_dim > c.dim
        || !c.rope_dim.is_multiple_of(2)
    {
        return Err(KernelError::invalid(
            K,
            format!(
                "coff = {}, ratio = {}, dim = {}, rope_dim = {}: need coff 1 or 2, ratio in \
                 1..={COMPRESS_MAX_RATIO}, dim in 1..={COMPRESS_MAX_DIM}, rope_dim even and <= dim",
                c.coff, c.ratio, c.dim, c.rope_dim
            ),
        ));
    }
    if input.ratio != 1 || output.ratio != c.ratio {
        return Err(KernelError::invalid(
            K,
            format!(
                "input ratio {} must be 1 and output ratio {} the compress ratio {}",
                input.ratio, output.ratio, c.ratio
            ),
        ));
    }
    if !c.eps.is_finite() || c.eps < 0.0 || !c.attention_factor.is_finite() {
        return Err(KernelError::invalid(
            K,
            format!("eps = {}, attention_factor = {}", c.eps, c.attention_factor),
        ));
    }
    c.out_format
        .check(c.dim)
        .map_err(|e| KernelError::invalid(K, e.to_string()))?;
    check_section(K, "input", block_size, input, 2 * c.coff * c.dim)?;
    check_section(K, "output", block_size, output, c.out_format.slots(c.dim))
}

/// The compressed rows a key list reads (see [`Kernels::build_key_offsets`]).
#[derive(Clone, Copy, Debug)]
pub struct KeySelection {
    pub mode: KeyMode,
    /// i32 `[rows, sel_stride]` selected compressed row indices ([`KeyMode::Selected`]; else 0).
    pub selected: CUdeviceptr,
    /// i32 `[rows]`: how many of a row's `selected` entries count ([`KeyMode::Selected`]; else 0).
    pub selected_counts: CUdeviceptr,
    pub sel_stride: usize,
}

/// Launch-time checks of [`Kernels::build_key_offsets`], testable without a GPU.
#[allow(clippy::too_many_arguments)]
pub fn check_key_offsets(
    rows: &RowTable,
    block_size: usize,
    window_section: &PoolSection,
    comp_section: &PoolSection,
    sel: &KeySelection,
    key_starts: CUdeviceptr,
    key_offsets: CUdeviceptr,
) -> Result<(), KernelError> {
    const K: &str = "build_key_offsets";
    nonnull(
        K,
        &[
            ("positions", rows.positions),
            ("bt_starts", rows.bt_starts),
            ("bt_lens", rows.bt_lens),
            ("block_tables", rows.block_tables),
            ("key_starts", key_starts),
            ("key_offsets", key_offsets),
        ],
    )?;
    if window_section.ratio != 1 {
        return Err(KernelError::invalid(
            K,
            format!("window section ratio {} must be 1", window_section.ratio),
        ));
    }
    let (ws, cs) = (window_section, comp_section);
    check_section(K, "window section", block_size, ws, ws.stride)?;
    if sel.mode != KeyMode::Window {
        check_section(K, "compressed section", block_size, cs, cs.stride)?;
    }
    if sel.mode == KeyMode::Selected {
        nonnull(
            K,
            &[
                ("selected", sel.selected),
                ("selected_counts", sel.selected_counts),
            ],
        )?;
        if sel.sel_stride == 0 {
            return Err(KernelError::invalid(K, "sel_stride must be positive"));
        }
    }
    Ok(())
}

impl Kernels {
    /// Row `r` of `src` (`[rows, ld_src]`, first `width` floats) to the section row of
    /// `positions[r]` (per-token section, ratio 1), stored as `format` (the section's stride is
    /// in slots, at least `format.slots(width)`). For the latent KV row (`head_dim`) and other
    /// per-token rows.
    ///
    /// # Safety
    /// Every pointer must address device memory of this context: `src` `rows` rows of `ld_src`,
    /// the row table as documented on [`RowTable`], every block id below the pool's block count.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pool_write_rows(
        &self,
        stream: &CudaStream,
        pool: CUdeviceptr,
        rows: &RowTable,
        block_size: usize,
        section: &PoolSection,
        src: CUdeviceptr,
        ld_src: usize,
        width: usize,
        format: KvRowFormat,
    ) -> Result<(), KernelError> {
        const K: &str = "pool_write_rows";
        if rows.rows == 0 {
            return Ok(());
        }
        check_pool_write(pool, rows, block_size, section, width, 1, format)?;
        nonnull(K, &[("src", src)])?;
        if ld_src < width {
            return Err(KernelError::invalid(
                K,
                format!("ld_src = {ld_src} < width = {width}"),
            ));
        }
        self.pool_write(
            stream,
            pool,
            rows,
            block_size,
            section,
            (src, ld_src),
            (0, 0),
            width,
            format,
        )
    }

    /// The compressor inputs of this step's tokens: row `r` of `kv` and of `gate` (both
    /// `[rows, width]`, `width = coff * dim`) to the token's `2 * width` input row, `kv` first.
    ///
    /// # Safety
    /// As [`Self::pool_write_rows`]; `kv` and `gate` hold `rows * width` f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pool_write_kv_gate(
        &self,
        stream: &CudaStream,
        pool: CUdeviceptr,
        rows: &RowTable,
        block_size: usize,
        section: &PoolSection,
        kv: CUdeviceptr,
        gate: CUdeviceptr,
        width: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "pool_write_kv_gate";
        if rows.rows == 0 {
            return Ok(());
        }
        check_pool_write(pool, rows, block_size, section, width, 2, KvRowFormat::F32)?;
        nonnull(K, &[("kv", kv), ("gate", gate)])?;
        self.pool_write(
            stream,
            pool,
            rows,
            block_size,
            section,
            (kv, width),
            (gate, width),
            width,
            KvRowFormat::F32,
        )
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn pool_write(
        &self,
        stream: &CudaStream,
        pool: CUdeviceptr,
        rows: &RowTable,
        block_size: usize,
        section: &PoolSection,
        (a, lda): (CUdeviceptr, usize),
        (b, ldb): (CUdeviceptr, usize),
        width: usize,
        format: KvRowFormat,
    ) -> Result<(), KernelError> {
        const K: &str = "pool_write";
        let (fmt, rope) = (format.code(), i32_arg(K, "rope", format.rope())?);
        let fpb = i64_arg(K, "floats_per_block", section.floats_per_block)?;
        let bs = i32_arg(K, "block_size", block_size)?;
        let base = i64_arg(K, "base", section.base)?;
        let stride = i64_arg(K, "stride", section.stride)?;
        let recent = i32::from(section.recent);
        let (lda, ldb) = (i64_arg(K, "ld", lda)?, i64_arg(K, "ld", ldb)?);
        let w = i32_arg(K, "width", width)?;
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, rows.rows)?, 1, 1),
            block_dim: (width.min(256).next_power_of_two().max(32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.paged.write)
            .arg(&pool)
            .arg(&rows.positions)
            .arg(&rows.bt_starts)
            .arg(&rows.bt_lens)
            .arg(&rows.block_tables)
            .arg(&fpb)
            .arg(&bs)
            .arg(&base)
            .arg(&stride)
            .arg(&recent)
            .arg(&a)
            .arg(&lda)
            .arg(&b)
            .arg(&ldb)
            .arg(&w)
            .arg(&fmt)
            .arg(&rope)
            .launch(cfg)
            .map_err(KernelError::driver("launch pool_write"))?;
        Ok(())
    }

    /// Builds the compressed row of every step row whose window closes at its position
    /// (`(pos + 1) % ratio == 0`) from the per-token inputs in `input` (`kv` then `gate`,
    /// `coff * dim` each; written first with [`Self::pool_write_kv_gate`]) into row
    /// `(pos + 1) / ratio - 1` of `output` (stored as `c.out_format`), exactly as the host's
    /// `compress_window`. Other rows, and rows whose window reaches past their block table,
    /// write nothing.
    ///
    /// # Safety
    /// Every pointer must address device memory of this context: the row table as documented on
    /// [`RowTable`] with every block id below the pool's block count, `ape` `[ratio, coff *
    /// dim]`, `norm` `[dim]`, `inv_freq` `[rope_dim / 2]` f32. Input and output sections must
    /// not overlap.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn compress_rows(
        &self,
        stream: &CudaStream,
        pool: CUdeviceptr,
        rows: &RowTable,
        block_size: usize,
        input: &PoolSection,
        output: &PoolSection,
        c: &CompressParams,
    ) -> Result<(), KernelError> {
        const K: &str = "compress_rows";
        if rows.rows == 0 {
            return Ok(());
        }
        check_compress(pool, rows, block_size, input, output, c)?;
        let bs = i32_arg(K, "block_size", block_size)?;
        let (in_fpb, in_base, in_stride, in_recent) = (
            i64_arg(K, "input floats_per_block", input.floats_per_block)?,
            i64_arg(K, "input base", input.base)?,
            i64_arg(K, "input stride", input.stride)?,
            i32::from(input.recent),
        );
        let (out_fpb, out_base, out_stride, out_recent) = (
            i64_arg(K, "output floats_per_block", output.floats_per_block)?,
            i64_arg(K, "output base", output.base)?,
            i64_arg(K, "output stride", output.stride)?,
            i32::from(output.recent),
        );
        let (ratio, coff) = (i32_arg(K, "ratio", c.ratio)?, i32_arg(K, "coff", c.coff)?);
        let (dim, rope_dim) = (
            i32_arg(K, "dim", c.dim)?,
            i32_arg(K, "rope_dim", c.rope_dim)?,
        );
        let (out_fmt, out_rope) = (
            c.out_format.code(),
            i32_arg(K, "out rope", c.out_format.rope())?,
        );
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, rows.rows)?, 1, 1),
            block_dim: (c.dim.min(256).next_power_of_two().max(32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.paged.compress)
            .arg(&pool)
            .arg(&rows.positions)
            .arg(&rows.bt_starts)
            .arg(&rows.bt_lens)
            .arg(&rows.block_tables)
            .arg(&bs)
            .arg(&in_fpb)
            .arg(&in_base)
            .arg(&in_stride)
            .arg(&in_recent)
            .arg(&out_fpb)
            .arg(&out_base)
            .arg(&out_stride)
            .arg(&out_recent)
            .arg(&ratio)
            .arg(&coff)
            .arg(&dim)
            .arg(&c.ape)
            .arg(&c.norm)
            .arg(&c.inv_freq)
            .arg(&rope_dim)
            .arg(&c.attention_factor)
            .arg(&c.eps)
            .arg(&out_fmt)
            .arg(&out_rope)
            .launch(cfg)
            .map_err(KernelError::driver("launch compress_rows"))?;
        Ok(())
    }

    /// Each row's attention keys as i64 pool offsets at `key_offsets[key_starts[r]..]`: its
    /// window rows `lo..=pos` (`lo = max(0, pos + 1 - window)`) of `window_section`, then the
    /// compressed rows of `comp_section` chosen by `sel` ([`KeyMode`]; `Selected` takes
    /// `selected[r * sel_stride + j]` for `j < min(selected_counts[r], sel_stride)`, as
    /// `topk_select` writes them). `key_starts` (i32 `[rows + 1]`) comes from [`key_counts`] /
    /// [`key_starts`]; a row never writes past `key_starts[r + 1]`, and any slot it has no valid
    /// key for (room past its keys, a selected index outside `0..(pos + 1) / ratio`, a block
    /// past its table) gets -1. `max_keys` (the largest row's room) only sizes the grid: any
    /// value gives the same offsets (each block grid-strides over the rest).
    ///
    /// # Safety
    /// Every pointer must address device memory of this context: the row table as documented on
    /// [`RowTable`], `key_starts` `[rows + 1]` i32 non-decreasing, `key_offsets`
    /// `key_starts[rows]` i64, `selected`/`selected_counts` as documented on [`KeySelection`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn build_key_offsets(
        &self,
        stream: &CudaStream,
        rows: &RowTable,
        block_size: usize,
        window: usize,
        window_section: &PoolSection,
        comp_section: &PoolSection,
        sel: &KeySelection,
        key_starts: CUdeviceptr,
        key_offsets: CUdeviceptr,
        max_keys: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "build_key_offsets";
        if rows.rows == 0 {
            return Ok(());
        }
        check_key_offsets(
            rows,
            block_size,
            window_section,
            comp_section,
            sel,
            key_starts,
            key_offsets,
        )?;
        let bs = i32_arg(K, "block_size", block_size)?;
        let win = i32_arg(K, "window", window)?;
        let (win_fpb, win_base, win_stride, win_recent) = (
            i64_arg(
                K,
                "window floats_per_block",
                window_section.floats_per_block,
            )?,
            i64_arg(K, "window base", window_section.base)?,
            i64_arg(K, "window stride", window_section.stride)?,
            i32::from(window_section.recent),
        );
        let (comp_fpb, comp_base, comp_stride, comp_recent) = (
            i64_arg(
                K,
                "compressed floats_per_block",
                comp_section.floats_per_block,
            )?,
            i64_arg(K, "compressed base", comp_section.base)?,
            i64_arg(K, "compressed stride", comp_section.stride)?,
            i32::from(comp_section.recent),
        );
        let ratio = if sel.mode == KeyMode::Window {
            0
        } else {
            i32_arg(K, "ratio", comp_section.ratio)?
        };
        let mode = sel.mode as i32;
        let sel_stride = i32_arg(K, "sel_stride", sel.sel_stride)?;
        // Chunks of a row's keys: what its keys need, but no more than fills the GPU about
        // four times over with all rows (each block grid-strides over the rest).
        let per_row = (4 * self.sms).div_ceil(rows.rows).max(1);
        let chunks = max_keys
            .div_ceil(KEY_THREADS)
            .min(per_row)
            .clamp(1, MAX_KEY_CHUNKS);
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, rows.rows)?, u32_grid(K, chunks)?, 1),
            block_dim: (KEY_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.paged.key_offsets)
            .arg(&rows.positions)
            .arg(&rows.bt_starts)
            .arg(&rows.bt_lens)
            .arg(&rows.block_tables)
            .arg(&bs)
            .arg(&win)
            .arg(&win_fpb)
            .arg(&win_base)
            .arg(&win_stride)
            .arg(&win_recent)
            .arg(&comp_fpb)
            .arg(&comp_base)
            .arg(&comp_stride)
            .arg(&comp_recent)
            .arg(&ratio)
            .arg(&mode)
            .arg(&sel.selected)
            .arg(&sel.selected_counts)
            .arg(&sel_stride)
            .arg(&key_starts)
            .arg(&key_offsets)
            .launch(cfg)
            .map_err(KernelError::driver("launch build_key_offsets"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use KvRowFormat::F32;

    /// `s` as a section of blocks of `fpb` floats.
    fn at(s: &PoolSection, fpb: usize) -> PoolSection {
        PoolSection {
            floats_per_block: fpb,
            ..*s
        }
    }

    const ROWS: RowTable = RowTable {
        positions: 16,
        bt_starts: 16,
        bt_lens: 16,
        block_tables: 16,
        rows: 2,
    };

    #[test]
    fn key_counts_follow_the_host_key_lists() {
        // window 128, ratio 4: pos 0 sees 1 window row and no compressed row; pos 3 closes
        // window 0; pos 200 sees rows 73..=200 and 50 windows.
        let pos = [0, 3, 127, 200];
        assert_eq!(
            key_counts(&pos, 128, 0, KeyMode::Window, 0),
            [1, 4, 128, 128]
        );
        assert_eq!(
            key_counts(&pos, 128, 4, KeyMode::AllCompressed, 0),
            [1, 5, 160, 178]
        );
        assert_eq!(
            key_counts(&pos, 128, 4, KeyMode::Selected, 16),
            [1, 5, 144, 144]
        );
        assert_eq!(key_counts(&[1], 0, 4, KeyMode::Selected, 16), [0]);
        // 1M context, HCA: 128 window rows + 8192 compressed.
        assert_eq!(
            key_counts(&[(1 << 20) - 1], 128, 128, KeyMode::AllCompressed, 0),
            [128 + 8192]
        );
        assert_eq!(key_starts(&[1, 5, 160]).unwrap(), [0, 1, 6, 166]);
        assert_eq!(key_starts(&[]).unwrap(), [0]);
        assert!(key_starts(&[usize::MAX / 2, usize::MAX / 2]).is_err());
        assert!(key_starts(&[1 << 31]).is_err());
    }

    #[test]
    fn sections_must_fit_the_block() {
        // Tiny geometry: block 16, ratio 4, latent 64 at base 10 of a 2000-float block.
        let s = PoolSection {
            floats_per_block: 0,
            base: 10,
            stride: 64,
            ratio: 1,
            recent: false,
        };
        assert!(check_section("t", "s", 16, &at(&s, 16 * 64), 64).is_ok());
        assert!(check_section("t", "s", 16, &at(&s, 16 * 64 - 1), 64).is_err());
        assert!(check_section("t", "s", 16, &at(&s, 5000), 65).is_err());
        assert!(check_section("t", "s", 0, &at(&s, 5000), 64).is_err());
        let c = PoolSection { ratio: 3, ..s };
        assert!(check_section("t", "s", 16, &at(&c, 5000), 64).is_err());
        let c = PoolSection { ratio: 4, ..s };
        assert!(check_section("t", "s", 16, &at(&c, 4 * 64), 64).is_ok());
        let huge = PoolSection {
            base: usize::MAX - 1,
            ..s
        };
        assert!(check_section("t", "s", 16, &at(&huge, usize::MAX), 64).is_err());
    }

    #[test]
    fn stored_row_formats_are_checked_before_launch() {
        use KvRowFormat::{Bf16, Fp8Indexer, Fp8Latent};
        let latent = Fp8Latent { rope: 64 };
        // V4-Flash's 584-byte latent record in a 146-slot row.
        let sec = PoolSection {
            floats_per_block: 0,
            base: 0,
            stride: 146,
            ratio: 1,
            recent: false,
        };
        assert!(check_pool_write(16, &ROWS, 128, &at(&sec, 1 << 20), 512, 1, latent).is_ok());
        assert!(check_pool_write(16, &ROWS, 128, &at(&sec, 1 << 20), 512, 1, F32).is_err());
        let short = PoolSection { stride: 145, ..sec };
        assert!(check_pool_write(16, &ROWS, 128, &at(&short, 1 << 20), 512, 1, latent).is_err());
        // A block part that holds 127 rows of 146 slots but not the 128th.
        assert!(
            check_pool_write(16, &ROWS, 128, &at(&sec, 128 * 146 - 1), 512, 1, latent).is_err()
        );
        // Records are one row (no kv + gate pair), at most POOL_WRITE_MAX_DIM wide, and the
        // width must suit the format.
        assert!(check_pool_write(16, &ROWS, 128, &at(&sec, 1 << 20), 64, 2, Bf16).is_err());
        let wide = PoolSection {
            stride: 4096,
            ..sec
        };
        assert!(check_pool_write(16, &ROWS, 128, &at(&wide, 1 << 22), 2048, 1, Bf16).is_err());
        assert!(check_pool_write(16, &ROWS, 128, &at(&sec, 1 << 20), 30, 1, Fp8Indexer).is_err());
        assert!(check_pool_write(16, &ROWS, 128, &at(&sec, 1 << 20), 128, 1, Fp8Indexer).is_ok());
        assert!(check_pool_write(16, &ROWS, 128, &at(&sec, 1 << 20), 7, 1, Bf16).is_err());
        let odd_nope = Fp8Latent { rope: 63 };
        assert!(check_pool_write(16, &ROWS, 128, &at(&sec, 1 << 20), 512, 1, odd_nope).is_err());

        let c = CompressParams {
            ratio: 4,
            coff: 2,
            dim: 512,
            ape: 16,
            norm: 16,
            inv_freq: 16,
            rope_dim: 64,
            attention_factor: 1.0,
            eps: 1e-6,
            out_format: latent,
        };
        let input = PoolSection {
            floats_per_block: 0,
            base: 0,
            stride: 2048,
            ratio: 1,
            recent: false,
        };
        let output = PoolSection {
            floats_per_block: 0,
            base: 128 * 2048,
            stride: 146,
            ratio: 4,
            recent: false,
        };
        let fpb = 128 * 2048 + 32 * 146;
        assert!(check_compress(16, &ROWS, 128, &at(&input, fpb), &at(&output, fpb), &c).is_ok());
        let short = PoolSection {
            stride: 145,
            ..output
        };
        assert!(check_compress(16, &ROWS, 128, &at(&input, fpb), &at(&short, fpb), &c).is_err());
        let f32_out = CompressParams {
            out_format: F32,
            ..c
        };
        assert!(check_compress(
            16,
            &ROWS,
            128,
            &at(&input, fpb),
            &at(&output, fpb),
            &f32_out
        )
        .is_err());
        let bad = CompressParams {
            out_format: Fp8Latent { rope: 513 },
            ..c
        };
        assert!(check_compress(16, &ROWS, 128, &at(&input, fpb), &at(&output, fpb), &bad).is_err());
        // The indexer's compressed keys: 128 values in 33 slots.
        let idx = CompressParams {
            dim: 128,
            out_format: Fp8Indexer,
            ..c
        };
        let idx_out = PoolSection {
            stride: 33,
            ..output
        };
        let input = PoolSection {
            stride: 512,
            ..input
        };
        let fpb = 128 * 512 + 32 * 33;
        assert!(check_compress(16, &ROWS, 128, &at(&input, fpb), &at(&idx_out, fpb), &idx).is_ok());
        let idx_short = PoolSection {
            stride: 32,
            ..idx_out
        };
        assert!(
            check_compress(16, &ROWS, 128, &at(&input, fpb), &at(&idx_short, fpb), &idx).is_err()
        );
    }

    #[test]
    fn bad_launch_arguments_are_errors() {
        let sec = PoolSection {
            floats_per_block: 0,
            base: 0,
            stride: 128,
            ratio: 1,
            recent: false,
        };
        assert!(check_pool_write(16, &ROWS, 128, &at(&sec, 1 << 20), 64, 2, F32).is_ok());
        assert!(check_pool_write(16, &ROWS, 128, &at(&sec, 1 << 20), 65, 2, F32).is_err());
        assert!(check_pool_write(0, &ROWS, 128, &at(&sec, 1 << 20), 64, 1, F32).is_err());
        let no_lens = RowTable { bt_lens: 0, ..ROWS };
        assert!(check_pool_write(16, &no_lens, 128, &at(&sec, 1 << 20), 64, 1, F32).is_err());
        let ratio4 = PoolSection { ratio: 4, ..sec };
        assert!(check_pool_write(16, &ROWS, 128, &at(&ratio4, 1 << 20), 64, 1, F32).is_err());

        let c = CompressParams {
            ratio: 4,
            coff: 2,
            dim: 512,
            ape: 16,
            norm: 16,
            inv_freq: 16,
            rope_dim: 64,
            attention_factor: 1.0,
            eps: 1e-6,
            out_format: F32,
        };
        let input = PoolSection {
            floats_per_block: 0,
            base: 0,
            stride: 2048,
            ratio: 1,
            recent: false,
        };
        let output = PoolSection {
            floats_per_block: 0,
            base: 128 * 2048,
            stride: 512,
            ratio: 4,
            recent: false,
        };
        let fpb = 128 * 2048 + 32 * 512;
        assert!(check_compress(16, &ROWS, 128, &at(&input, fpb), &at(&output, fpb), &c).is_ok());
        let bad = [
            CompressParams { dim: 1024, ..c },
            CompressParams { coff: 3, ..c },
            CompressParams { ratio: 256, ..c },
            CompressParams { rope_dim: 63, ..c },
            CompressParams { rope_dim: 514, ..c },
            CompressParams { eps: f32::NAN, ..c },
            CompressParams { ape: 0, ..c },
        ];
        for b in bad {
            assert!(
                check_compress(16, &ROWS, 128, &at(&input, fpb), &at(&output, fpb), &b).is_err(),
                "{b:?}"
            );
        }
        // Input rows narrower than kv + gate, output ratio unlike the compressor's.
        let narrow = PoolSection {
            stride: 1024,
            ..input
        };
        assert!(check_compress(16, &ROWS, 128, &at(&narrow, fpb), &at(&output, fpb), &c).is_err());
        let wrong = PoolSection { ratio: 1, ..output };
        assert!(check_compress(16, &ROWS, 128, &at(&input, fpb), &at(&wrong, fpb), &c).is_err());
        // A block part one float shorter than the input rows' span.
        let span = 127 * input.stride + 2 * c.coff * c.dim;
        assert!(check_compress(
            16,
            &ROWS,
            128,
            &at(&input, span - 1),
            &at(&output, span - 1),
            &c
        )
        .is_err());

        let sel = KeySelection {
            mode: KeyMode::Selected,
            selected: 16,
            selected_counts: 16,
            sel_stride: 512,
        };
        let win = PoolSection {
            floats_per_block: 0,
            base: 0,
            stride: 512,
            ratio: 1,
            recent: false,
        };
        let comp = PoolSection {
            floats_per_block: 0,
            base: 128 * 512,
            stride: 512,
            ratio: 4,
            recent: false,
        };
        let fpb = 128 * 512 + 32 * 512;
        assert!(
            check_key_offsets(&ROWS, 128, &at(&win, fpb), &at(&comp, fpb), &sel, 16, 16).is_ok()
        );
        let no_sel = KeySelection { selected: 0, ..sel };
        assert!(
            check_key_offsets(&ROWS, 128, &at(&win, fpb), &at(&comp, fpb), &no_sel, 16, 16)
                .is_err()
        );
        let hca = KeySelection {
            mode: KeyMode::AllCompressed,
            ..no_sel
        };
        assert!(
            check_key_offsets(&ROWS, 128, &at(&win, fpb), &at(&comp, fpb), &hca, 16, 16).is_ok()
        );
        assert!(
            check_key_offsets(&ROWS, 128, &at(&win, fpb), &at(&comp, fpb), &hca, 16, 0).is_err()
        );
        assert!(
            check_key_offsets(&ROWS, 128, &at(&comp, fpb), &at(&comp, fpb), &hca, 16, 16).is_err()
        );
        let zero = KeySelection {
            sel_stride: 0,
            ..sel
        };
        assert!(
            check_key_offsets(&ROWS, 128, &at(&win, fpb), &at(&comp, fpb), &zero, 16, 16).is_err()
        );
    }
}
