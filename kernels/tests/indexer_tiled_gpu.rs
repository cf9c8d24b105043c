//! The tiled f32 Lightning Indexer kernel in both tile heights (`dsk_indexer_scores_tiled_f32`,
//! 64 rows, and `dsk_indexer_scores_tiled16_f32`, 16 rows, picked by `attention::indexer_tile`
//! or forced with `Kernels::set_indexer_tile_choice` / DSPARK_INDEXER_TILE), on V4-Flash's shapes
//! (64 heads at TP=1, 32 at TP=2, x 128 dims) over F32, BF16 and FP8_INDEXER records through
//! shuffled block tables, several tokens per launch with different visible counts:
//! - the 16-row scores are bit-identical to the 64-row ones (same fmaf chain per (row, head),
//!   same per-row sum and shuffle tree);
//! - both are within server/tests/backend_kv_cuda.rs's bound of an f64 reference over the
//!   host-decoded rows (max |got - want| / max |want| < 1e-4), and each score within 1e-5 of the
//!   magnitude behind it (`sum_h |w_h| scale sum_d |q k|`: f32 accumulation only, as
//!   tests/indexer_mma_gpu.rs bounds it);
//! - the shares of the rows a tensor-parallel group's ranks take (`IndexerScores::row_starts`)
//!   are bit-identical to the whole launch inside each share, and nothing else is written;
//! - every visible row is written and nothing else: NaN sentinels between the tokens' score
//!   ranges and after the last stay NaN. (That each row is written exactly once, not twice with
//!   the same value, is checked by the CPU emulator, kernels/tools/indexer_tiled_emu.cpp, which
//!   gives every thread its own output.)
//!
//! `tiled_indexer_timing` prints microseconds per launch of both forms (200 launches back to
//! back): `cargo test -p dspark-kernels --release --test indexer_tiled_gpu -- --nocapture
//! --test-threads 1`. Skips (passes with a SKIP line) where there is no GPU.

use std::sync::Mutex;

use cudarc::driver::CudaSlice;
use dspark_kernels::launch::attention::{
    indexer_kernel, indexer_tile, IndexerKernel, IndexerTile, IndexerTileChoice,
};
use dspark_kernels::{IndexerScores, KvRowFormat};

mod common;
use common::{check_row_shares, gpu, time_us, Gpu, Rng};

use KvRowFormat::{Bf16, Fp8Indexer, F32};

/// One test at a time on the GPU: the timing must not share it.
static GPU_LOCK: Mutex<()> = Mutex::new(());

/// NaN sentinels between two tokens' score ranges (and 16 after the last).
const GAP: usize = 3;
const BLOCK_SIZE: usize = 128;
const RATIO: usize = 4;

/// A launch's inputs on the device, and what the host needs to check its scores.
struct Case {
    format: KvRowFormat,
    heads: usize,
    dim: usize,
    visible: Vec<usize>,
    tables: Vec<Vec<u32>>,
    /// Decoded rows by pool slot (`block * rows_per_block + slot`).
    decoded: Vec<Vec<f32>>,
    q: Vec<f32>,
    w: Vec<f32>,
    out_starts: Vec<i64>,
    out_len: usize,
    stride: usize,
    fpb: usize,
    base: usize,
    bufs: Bufs,
}

struct Bufs {
    pool: CudaSlice<f32>,
    q: CudaSlice<f32>,
    w: CudaSlice<f32>,
    bt: CudaSlice<u32>,
    bt_starts: CudaSlice<i32>,
    vis: CudaSlice<i32>,
    out_starts: CudaSlice<i64>,
    out: CudaSlice<f32>,
}

/// Random rows whose 32-value groups have scales 2^-6 .. 2^6 (varying row by row).
fn random_row(rng: &mut Rng, dim: usize) -> Vec<f32> {
    let e: Vec<i32> = (0..dim.div_ceil(32))
        .map(|_| rng.below(13) as i32 - 6)
        .collect();
    (0..dim)
        .map(|i| rng.uniform(-1.0, 1.0) * 2f32.powi(e[i / 32]))
        .collect()
}

impl Case {
    fn new(
        g: &Gpu,
        rng: &mut Rng,
        format: KvRowFormat,
        heads: usize,
        visible: &[usize],
        extra_stride: usize,
    ) -> Self {
        let dim = 128;
        let rows_per_block = BLOCK_SIZE / RATIO;
        let slots = format.slots(dim);
        let stride = slots + extra_stride;
        let base = 5;
        let fpb = base + rows_per_block * stride + 3;
        let max_vis = visible.iter().copied().max().unwrap_or(0);
        let blocks_per_seq = max_vis.div_ceil(rows_per_block).max(1);
        let num_blocks = visible.len() * blocks_per_seq + 2;
        // Noise between and around the records: a kernel reading the wrong slots shows.
        let mut pool = rng.signed_vec(num_blocks * fpb, 1.0e3);
        let mut decoded = vec![Vec::new(); num_blocks * rows_per_block];
        for b in 0..num_blocks {
            for s in 0..rows_per_block {
                let row = random_row(rng, dim);
                let at = b * fpb + base + s * stride;
                format.encode(&row, &mut pool[at..at + slots]);
                let mut back = vec![0f32; dim];
                format.decode(&pool[at..at + slots], &mut back);
                decoded[b * rows_per_block + s] = back;
            }
        }
        let perm = rng.permutation(num_blocks);
        let tables: Vec<Vec<u32>> = (0..visible.len())
            .map(|t| perm[t * blocks_per_seq..(t + 1) * blocks_per_seq].to_vec())
            .collect();
        let tokens = visible.len();
        let q = rng.signed_vec(tokens * heads * dim, 1.0);
        let w = rng.signed_vec(tokens * heads, 1.0);
        let (mut flat, mut bt_starts, mut out_starts) = (Vec::new(), Vec::new(), Vec::new());
        let mut total = 0usize;
        for (t, table) in tables.iter().enumerate() {
            bt_starts.push(flat.len() as i32);
            flat.extend_from_slice(table);
            out_starts.push(total as i64);
            total += visible[t] + GAP;
        }
        let out_len = total + 16;
        let vis: Vec<i32> = visible.iter().map(|&v| v as i32).collect();
        let bufs = Bufs {
            pool: g.up(&pool),
            q: g.up(&q),
            w: g.up(&w),
            bt: g.up(&flat),
            bt_starts: g.up(&bt_starts),
            vis: g.up(&vis),
            out_starts: g.up(&out_starts),
            out: g.up(&vec![f32::NAN; out_len]),
        };
        Self {
            format,
            heads,
            dim,
            visible: visible.to_vec(),
            tables,
            decoded,
            q,
            w,
            out_starts,
            out_len,
            stride,
            fpb,
            base,
            bufs,
        }
    }

    fn call(&self, g: &Gpu) -> IndexerScores {
        IndexerScores {
            pool: g.ptr(&self.bufs.pool),
            q: g.ptr(&self.bufs.q),
            weights: g.ptr(&self.bufs.w),
            block_tables: g.ptr(&self.bufs.bt),
            block_table_starts: g.ptr(&self.bufs.bt_starts),
            visible: g.ptr(&self.bufs.vis),
            row_starts: 0,
            out_starts: g.ptr(&self.bufs.out_starts),
            out: g.ptr(&self.bufs.out),
            tokens: self.visible.len(),
            max_visible: self.visible.iter().copied().max().unwrap_or(0),
            floats_per_block: self.fpb,
            block_size: BLOCK_SIZE,
            base: self.base,
            ratio: RATIO,
            stride: self.stride,
            heads: self.heads,
            dim: self.dim,
            scale: (self.dim as f32).powf(-0.5),
            format: self.format,
            tensor_cores: false,
        }
    }

    /// Scores of one launch with the tile height picked by `choice`, out reset to NaN first.
    fn run(&mut self, g: &mut Gpu, choice: IndexerTileChoice) -> Vec<f32> {
        g.s.memcpy_htod(&vec![f32::NAN; self.out_len], &mut self.bufs.out)
            .unwrap();
        g.k.set_indexer_tile_choice(choice);
        let call = self.call(g);
        assert_eq!(
            indexer_kernel(&call, g.k.smem_optin()),
            IndexerKernel::Tiled
        );
        // SAFETY: q [tokens, heads, dim], weights [tokens, heads], each token's table covers its
        // visible rows inside the pool, out holds out_len floats past every token's start.
        unsafe { g.k.indexer_scores(&g.s, &call) }.unwrap();
        g.down(&self.bufs.out)
    }

    /// (max |got - want| / max |want|, worst |got - want| / magnitude) over the visible rows;
    /// panics on a NaN among them or a written sentinel.
    fn errors(&self, got: &[f32], label: &str) -> (f64, f64) {
        let rows_per_block = BLOCK_SIZE / RATIO;
        let scale = f64::from((self.dim as f32).powf(-0.5));
        let (heads, dim) = (self.heads, self.dim);
        let mut written = vec![false; self.out_len];
        let (mut max_diff, mut max_want, mut worst_mag) = (0f64, 0f64, 0f64);
        for (t, &vis) in self.visible.iter().enumerate() {
            let start = self.out_starts[t] as usize;
            for r in 0..vis {
                let pos = r * RATIO;
                let blk = self.tables[t][pos / BLOCK_SIZE] as usize;
                let k = &self.decoded[blk * rows_per_block + (pos % BLOCK_SIZE) / RATIO];
                let (mut want, mut mag) = (0f64, 0f64);
                for h in 0..heads {
                    let qh = &self.q[(t * heads + h) * dim..][..dim];
                    let (mut dot, mut abs) = (0f64, 0f64);
                    for d in 0..dim {
                        let p = f64::from(qh[d]) * f64::from(k[d]);
                        dot += p;
                        abs += p.abs();
                    }
                    let wh = f64::from(self.w[t * heads + h]);
                    want += dot.max(0.0) * scale * wh;
                    mag += abs * scale * wh.abs();
                }
                let v = got[start + r];
                assert!(!v.is_nan(), "{label}: token {t} row {r} not written");
                written[start + r] = true;
                let diff = (f64::from(v) - want).abs();
                max_diff = max_diff.max(diff);
                max_want = max_want.max(want.abs());
                worst_mag = worst_mag.max(diff / mag);
            }
        }
        for (i, x) in got.iter().enumerate() {
            assert!(
                written[i] || x.is_nan(),
                "{label}: sentinel {i} outside every token's rows was written ({x})"
            );
        }
        (max_diff / max_want.max(1e-30), worst_mag)
    }
}

#[test]
fn tiled_16_row_scores_are_bit_identical_to_64_row_and_match_f64() {
    let _lock = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut g) = gpu("tiled_16_row_scores_are_bit_identical_to_64_row_and_match_f64") else {
        return;
    };
    let mut rng = Rng(0x1d3e_5c0e_0016);
    for format in [Fp8Indexer, Bf16, F32] {
        for (heads, visible, extra) in [
            (64, vec![1, 7, 100, 2048, 3000], 0),
            (32, vec![3000, 100, 7, 1, 2048], 3),
            (64, vec![2048], 1),
            (32, vec![8192], 0),
            (64, vec![0, 16, 17, 64, 65], 2),
        ] {
            let mut c = Case::new(&g, &mut rng, format, heads, &visible, extra);
            let o64 = c.run(&mut g, IndexerTileChoice::Force(IndexerTile::Rows64));
            let o16 = c.run(&mut g, IndexerTileChoice::Force(IndexerTile::Rows16));
            let label = format!("{format:?} heads={heads} visible={visible:?}");
            let diff_at = o64
                .iter()
                .zip(&o16)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            assert!(
                diff_at.is_none(),
                "{label}: 16-row scores differ from 64-row ones at {diff_at:?}"
            );
            let (rel64, mag64) = c.errors(&o64, &format!("{label} 64"));
            let (rel16, mag16) = c.errors(&o16, &format!("{label} 16"));
            for (rel, mag, rows) in [(rel64, mag64, 64), (rel16, mag16, 16)] {
                assert!(
                    rel < 1e-4 && mag < 1e-5,
                    "{label} {rows}-row: relative difference {rel:.2e} (bound 1e-4), worst \
                     {mag:.2e} of magnitude (bound 1e-5)"
                );
            }
            // The rule's own pick runs one of the two: the same scores.
            let picked = indexer_tile(
                visible.len(),
                visible.iter().copied().max().unwrap_or(0),
                g.k.multiprocessors(),
                IndexerTileChoice::Auto,
            );
            let oa = c.run(&mut g, IndexerTileChoice::Auto);
            assert!(oa.iter().zip(&o64).all(|(a, b)| a.to_bits() == b.to_bits()));
            // The ranks' shares of the rows (IndexerScores::row_starts) in both tile heights.
            for tile in [IndexerTile::Rows64, IndexerTile::Rows16] {
                g.k.set_indexer_tile_choice(IndexerTileChoice::Force(tile));
                check_row_shares(
                    &g,
                    &c.call(&g),
                    &c.visible,
                    &c.out_starts,
                    c.out_len,
                    &o64,
                    &format!("{label} {tile:?}"),
                );
            }
            g.k.set_indexer_tile_choice(IndexerTileChoice::Auto);
            eprintln!(
                "{label}: bit-identical, rank shares too; vs f64 {rel64:.2e} (bound 1e-4), per \
                 score {mag64:.2e} of magnitude; auto picks {picked:?}"
            );
        }
    }
}

/// Microseconds per launch of each tile height, 200 launches back to back between two events
/// (queued behind a spin kernel, so the host's launch cost stays out).
#[test]
fn tiled_indexer_timing() {
    let _lock = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut g) = gpu("tiled_indexer_timing") else {
        return;
    };
    let mut rng = Rng(0x1d3e_5c0e_0017);
    let reps = 200;
    for format in [Fp8Indexer, Bf16] {
        for heads in [64, 32] {
            for rows in [2048, 8192] {
                for tokens in [1, 16] {
                    let mut c = Case::new(&g, &mut rng, format, heads, &vec![rows; tokens], 0);
                    let auto =
                        indexer_tile(tokens, rows, g.k.multiprocessors(), IndexerTileChoice::Auto);
                    let mut us = Vec::new();
                    for tile in [IndexerTile::Rows64, IndexerTile::Rows16] {
                        c.run(&mut g, IndexerTileChoice::Force(tile));
                        let call = c.call(&g);
                        g.k.spin(&g.s, 20_000_000).unwrap();
                        // SAFETY: as in `Case::run` (the same buffers and shapes).
                        us.push(time_us(&g, reps, &|| unsafe {
                            g.k.indexer_scores(&g.s, &call).unwrap()
                        }));
                    }
                    eprintln!(
                        "tiled indexer {format:?} heads={heads} rows={rows} tokens={tokens}: \
                         64-row {:.2} us, 16-row {:.2} us per launch (auto picks {auto:?})",
                        us[0], us[1]
                    );
                }
            }
        }
    }
    g.k.set_indexer_tile_choice(IndexerTileChoice::Auto);
}
