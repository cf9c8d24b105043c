//! The device KV row codec (`common.cuh` `dsk_kv_*`) against the host codec, which is the spec
//! (`kv_record.rs`): rows the kernels store (`pool_write_rows`, `compress_rows`) must be the host
//! encoding bit for bit, and the kernels that read stored rows (both attention paths, both
//! indexer kernels) must match an f64 reference over the host-DECODED rows. Skips (passes with a
//! SKIP line) where there is no GPU.

use dspark_kernels::formats::e4m3_to_f32;
use dspark_kernels::launch::paged::{CompressParams, PoolSection, RowTable};
use dspark_kernels::{
    attention_splits, attention_workspace_floats, IndexerScores, KvRowFormat, PagedAttention,
};

mod common;
use common::{gpu, worst_row_err, Gpu, Rng};

use KvRowFormat::{Bf16, Fp8Indexer, Fp8Latent, F32};

/// The same bounds as attention_heads_gpu.rs: per (token, head) row, max |diff| / max |ref|.
const TOL_VS_KERNEL: f64 = 1e-5;
const TOL_VS_F64: f64 = 1e-4;

fn pow2(e: i32) -> f32 {
    2f32.powi(e)
}

// --- Rows: random, and the edges of the codec ---

/// Group scales of the codec tests: far apart.
const WIDE: &[i32] = &[-12, -9, -6, -3, 0, 3, 6, 9];
/// Group scales of the attention inputs: logits stay moderate (as in attention_heads_gpu.rs),
/// so the f32 kernels stay inside the f64 bound.
const NARROW: &[i32] = &[-2, -1, 0, 1];

/// Random rows whose 64-groups have different scales 2^exps[..] (shifting row by row).
fn random_rows(rng: &mut Rng, n: usize, dim: usize, exps: &[i32]) -> Vec<Vec<f32>> {
    (0..n)
        .map(|r| {
            (0..dim)
                .map(|i| rng.uniform(-1.0, 1.0) * pow2(exps[(i / 64 + r) % exps.len()]))
                .collect()
        })
        .collect()
}

/// Every midpoint between neighbouring positive e4m3 values (round-half-even cases), both signs.
fn e4m3_ties() -> Vec<f32> {
    let mut v = Vec::new();
    for c in 0u8..0x7e {
        let m = (e4m3_to_f32(c) + e4m3_to_f32(c + 1)) / 2.0;
        v.extend([m, -m]);
    }
    v
}

/// Rows at the codec's edges, `dim` values with `rope` trailing bf16 dims (latent record; 0
/// otherwise). Each 64-group's amax decides its scale, so the edges are placed per group.
fn edge_rows(rng: &mut Rng, dim: usize, rope: usize) -> Vec<Vec<f32>> {
    let nope = dim - rope;
    let mut rows = Vec::new();
    rows.push(vec![0f32; dim]);
    rows.push(
        (0..dim)
            .map(|i| if i % 2 == 0 { 0.0 } else { -0.0 })
            .collect(),
    );
    // One huge value in the first group, a large negative one in the last.
    let mut r = rng.signed_vec(dim, 1.0);
    r[5] = 3.0e38;
    r[nope.saturating_sub(3)] = -1.0e30;
    rows.push(r);
    // Tiny values: normal near the bottom of f32 (the scale exponent clamps at -126) and
    // subnormal.
    rows.push(rng.signed_vec(dim, 1.0e-38));
    rows.push(rng.signed_vec(dim, 1.0e-42));
    // Scale boundaries: each group's amax exactly 448 * 2^s (fits 2^s exactly), 1.75 * 2^s,
    // the next float above it (needs one more power), 2^s and the float below it.
    for (kind, s) in [(0, 0), (1, 3), (2, -5), (3, 7), (4, -9)] {
        let mut r = Vec::with_capacity(dim);
        for i in 0..dim {
            let g = i / 64;
            let s = s + g as i32;
            let amax = match (kind + g) % 5 {
                0 => 448.0 * pow2(s),
                1 => 1.75 * pow2(s),
                2 => f32::from_bits((1.75 * pow2(s)).to_bits() + 1),
                3 => pow2(s),
                _ => f32::from_bits(pow2(s).to_bits() - 1),
            };
            // The group's largest magnitude at a position that moves with the group.
            let v = if i % 64 == (7 * g + kind) % 64 {
                if g % 2 == 0 {
                    amax
                } else {
                    -amax
                }
            } else {
                rng.uniform(-1.0, 1.0) * amax
            };
            r.push(v);
        }
        rows.push(r);
    }
    // Ties of the e4m3 rounding, at scale 1 (448 in every group pins e = 0), at 2^2 and at
    // 2^-20; values far below a group's step round to signed zeros. The bf16 dims get bf16 ties.
    let ties = e4m3_ties();
    for scale in [1.0f32, 4.0, pow2(-20)] {
        let mut r = Vec::with_capacity(dim);
        let mut k = 0;
        for i in 0..dim {
            let v = if i >= nope {
                // 1 + (2j + 1) * 2^-8: halfway between bf16 neighbours.
                let j = (i - nope) as f32;
                (1.0 + (2.0 * j + 1.0) * pow2(-8)) * if i % 2 == 0 { 1.0 } else { -1.0 }
            } else if i % 64 == 0 {
                448.0
            } else if i % 64 == 63 {
                -1.0e-4
            } else if i % 64 == 62 {
                1.0e-4
            } else {
                k += 1;
                ties[(k - 1) % ties.len()]
            };
            r.push(if i >= nope { v } else { v * scale });
        }
        rows.push(r);
    }
    rows
}

// --- Pool writes ---

/// Sequences' block tables and one step's rows (sequence, position; negative = padding), on the
/// device.
struct Table {
    positions: cudarc::driver::CudaSlice<i32>,
    starts: cudarc::driver::CudaSlice<i32>,
    lens: cudarc::driver::CudaSlice<i32>,
    tables: cudarc::driver::CudaSlice<u32>,
    rows: usize,
}

impl Table {
    fn new(g: &Gpu, tables: &[Vec<u32>], rows: &[(usize, i32)]) -> Self {
        let mut starts_of = Vec::new();
        let mut flat = Vec::new();
        for t in tables {
            starts_of.push(flat.len() as i32);
            flat.extend_from_slice(t);
        }
        Self {
            positions: g.up(&rows.iter().map(|r| r.1).collect::<Vec<_>>()),
            starts: g.up(&rows.iter().map(|r| starts_of[r.0]).collect::<Vec<_>>()),
            lens: g.up(&rows
                .iter()
                .map(|r| tables[r.0].len() as i32)
                .collect::<Vec<_>>()),
            tables: g.up(&flat),
            rows: rows.len(),
        }
    }

    fn rows(&self, g: &Gpu) -> RowTable {
        RowTable {
            positions: g.ptr(&self.positions),
            bt_starts: g.ptr(&self.starts),
            bt_lens: g.ptr(&self.lens),
            block_tables: g.ptr(&self.tables),
            rows: self.rows,
        }
    }
}

/// A pool of random bit patterns: pad bytes the kernels forget to zero, or slots they should
/// not touch, show up as differences.
fn noise_pool(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| f32::from_bits(rng.next() as u32))
        .collect()
}

fn first_diff(got: &[f32], want: &[f32]) -> Option<usize> {
    (0..want.len()).find(|&i| got[i].to_bits() != want[i].to_bits())
}

/// `pool_write_rows` of `rows` in `format` equals the host encoding bit for bit, and writes
/// nothing else (the row's stride has a spare slot; a padding row writes nothing).
fn pool_write_case(g: &Gpu, rng: &mut Rng, format: KvRowFormat, dim: usize) {
    let rows = {
        let mut r = edge_rows(rng, dim, format.rope());
        r.extend(random_rows(rng, 9, dim, WIDE));
        r
    };
    let n = rows.len();
    let (bs, base) = (16, 3);
    let slots = format.slots(dim);
    let stride = slots + 1;
    let fpb = base + bs * stride + 5;
    let blocks = n.div_ceil(bs);
    let table: Vec<u32> = rng.permutation(blocks + 1)[..blocks].to_vec();
    let mut step: Vec<(usize, i32)> = (0..n).map(|p| (0, p as i32)).collect();
    step.insert(n / 2, (0, -1));
    let ld = dim + 3;
    let mut src = vec![f32::NAN; step.len() * ld];
    for (r, &(_, p)) in step.iter().enumerate() {
        if p >= 0 {
            src[r * ld..r * ld + dim].copy_from_slice(&rows[p as usize]);
        }
    }
    let pool = noise_pool(rng, (blocks + 1) * fpb);
    let pool_d = g.up(&pool);
    let src_d = g.up(&src);
    let t = Table::new(g, std::slice::from_ref(&table), &step);
    let section = PoolSection {
        floats_per_block: fpb,
        base,
        stride,
        ratio: 1,
        recent: false,
    };
    // SAFETY: src holds step.len() rows of ld f32; every block id is below blocks + 1, and the
    // section's rows fit a block of fpb floats.
    unsafe {
        g.k.pool_write_rows(
            &g.s,
            g.ptr(&pool_d),
            &t.rows(g),
            bs,
            &section,
            g.ptr(&src_d),
            ld,
            dim,
            format,
        )
    }
    .unwrap();
    let got = g.down(&pool_d);
    let mut want = pool.clone();
    for (p, row) in rows.iter().enumerate() {
        let at = table[p / bs] as usize * fpb + base + (p % bs) * stride;
        format.encode(row, &mut want[at..at + slots]);
    }
    if let Some(i) = first_diff(&got, &want) {
        let rel = i % fpb;
        panic!(
            "pool_write {format:?} dim {dim}: slot {i} (block offset {rel}) is {:08x}, the host \
             encoding {:08x}",
            got[i].to_bits(),
            want[i].to_bits()
        );
    }
    eprintln!("pool_write {format:?} dim {dim}: {n} rows bit-exact");
}

#[test]
fn pool_write_encodes_rows_like_the_host_codec() {
    let Some(g) = gpu("pool_write_encodes_rows_like_the_host_codec") else {
        return;
    };
    let mut rng = Rng(0x6b76_7265_636f_7264);
    for (format, dim) in [
        (F32, 512),
        (Bf16, 512),
        (Bf16, 64),
        // V4-Flash's latent record, and the tiny model's (one partial 48-value group).
        (Fp8Latent { rope: 64 }, 512),
        (Fp8Latent { rope: 16 }, 64),
        // nope 450: a 2-value last group, bf16 part not 4-byte aligned.
        (Fp8Latent { rope: 62 }, 512),
        (Fp8Indexer, 128),
        (Fp8Indexer, 32),
    ] {
        pool_write_case(&g, &mut rng, format, dim);
    }
}

// --- Compressed rows ---

/// One compressor's closing windows written twice from the same inputs, once as f32 rows and
/// once as `format` records: the records must be the host encoding of the f32 rows, bit for
/// bit, and nothing else may change.
fn compress_case(g: &Gpu, rng: &mut Rng, format: KvRowFormat, dim: usize, rope_dim: usize) {
    let (bs, ratio, coff) = (16, 4, 2);
    let width = coff * dim;
    let in_stride = 2 * width;
    // Sequence A: 48 positions over 3 blocks (12 windows, overlaps crossing blocks); B: 16
    // positions of one block; one padding row.
    let tables = vec![vec![2u32, 0, 4], vec![3u32]];
    let mut step: Vec<(usize, i32)> = (0..48).map(|p| (0, p)).collect();
    step.extend((0..16).map(|p| (1, p)));
    step.push((0, -1));
    let n = step.len();
    let kv = g.up(&rng.signed_vec(n * width, 1.0));
    let gate = g.up(&rng.signed_vec(n * width, 2.0));
    let ape = g.up(&rng.signed_vec(ratio * width, 0.5));
    let norm: Vec<f32> = rng
        .signed_vec(dim, 1.0)
        .iter()
        .map(|v| 1.0 + 0.5 * v)
        .collect();
    let norm = g.up(&norm);
    let inv_freq: Vec<f32> = (0..rope_dim / 2)
        .map(|i| 10000f32.powf(-((2 * i) as f32) / rope_dim as f32))
        .collect();
    let inv_freq = g.up(&inv_freq);
    let t = Table::new(g, &tables, &step);
    // Runs the step into a fresh pool whose output rows take `out_slots` (+ 1 spare) slots.
    let run = |out_format: KvRowFormat, seed_pool: &[f32]| -> (Vec<f32>, PoolSection, usize) {
        let out_stride = out_format.slots(dim) + 1;
        let fpb = bs * in_stride + bs / ratio * out_stride;
        let input = PoolSection {
            floats_per_block: fpb,
            base: 0,
            stride: in_stride,
            ratio: 1,
            recent: false,
        };
        let output = PoolSection {
            floats_per_block: fpb,
            base: bs * in_stride,
            stride: out_stride,
            ratio,
            recent: false,
        };
        let pool_d = g.up(&seed_pool[..5 * fpb]);
        let params = CompressParams {
            ratio,
            coff,
            dim,
            ape: g.ptr(&ape),
            norm: g.ptr(&norm),
            inv_freq: g.ptr(&inv_freq),
            rope_dim,
            attention_factor: 1.25,
            eps: 1e-6,
            out_format,
        };
        // SAFETY: kv/gate hold n rows of width, ape [ratio, width], norm [dim], inv_freq
        // [rope_dim / 2]; block ids are below 5 and the sections fit a block of fpb floats.
        unsafe {
            g.k.pool_write_kv_gate(
                &g.s,
                g.ptr(&pool_d),
                &t.rows(g),
                bs,
                &input,
                g.ptr(&kv),
                g.ptr(&gate),
                width,
            )
            .unwrap();
            g.k.compress_rows(
                &g.s,
                g.ptr(&pool_d),
                &t.rows(g),
                bs,
                &input,
                &output,
                &params,
            )
            .unwrap();
        }
        (g.down(&pool_d), output, fpb)
    };
    let seed = noise_pool(rng, 5 * (bs * in_stride + bs / ratio * (dim + 1)));
    let (f32_pool, f32_out, f32_fpb) = run(F32, &seed);
    let (got, out, fpb) = run(format, &seed);
    // Expected: the record pool as it was, with the inputs written (the f32 run's bytes
    // there), then every closing window's f32 row encoded.
    let mut want = seed[..5 * fpb].to_vec();
    let slots = format.slots(dim);
    let mut windows = 0;
    for (seq, table) in tables.iter().enumerate() {
        let last = step.iter().filter(|r| r.0 == seq).map(|r| r.1).max();
        let Some(last) = last else { continue };
        for p in 0..=last as usize {
            let blk = table[p / bs] as usize;
            let (src, dst) = (
                blk * f32_fpb + (p % bs) * in_stride,
                blk * fpb + (p % bs) * in_stride,
            );
            want[dst..dst + in_stride].copy_from_slice(&f32_pool[src..src + in_stride]);
            if (p + 1) % ratio == 0 {
                let w = (p + 1) / ratio - 1;
                let wp = w * ratio;
                let blk = table[wp / bs] as usize;
                let row = (wp % bs) / ratio;
                let src = blk * f32_fpb + f32_out.base + row * f32_out.stride;
                let dst = blk * fpb + out.base + row * out.stride;
                format.encode(&f32_pool[src..src + dim], &mut want[dst..dst + slots]);
                windows += 1;
            }
        }
    }
    if let Some(i) = first_diff(&got, &want) {
        panic!(
            "compress {format:?} dim {dim}: slot {i} (block offset {}) is {:08x}, the host \
             encoding of the f32 row gives {:08x}",
            i % fpb,
            got[i].to_bits(),
            want[i].to_bits()
        );
    }
    eprintln!("compress {format:?} dim {dim}: {windows} compressed rows bit-exact");
}

#[test]
fn compressed_rows_are_the_host_encoding_of_the_f32_rows() {
    let Some(g) = gpu("compressed_rows_are_the_host_encoding_of_the_f32_rows") else {
        return;
    };
    let mut rng = Rng(0xc0de_c0de_0001);
    compress_case(&g, &mut rng, Fp8Latent { rope: 64 }, 512, 64);
    compress_case(&g, &mut rng, Bf16, 512, 64);
    compress_case(&g, &mut rng, Fp8Latent { rope: 16 }, 64, 16);
    compress_case(&g, &mut rng, Fp8Indexer, 128, 64);
    compress_case(&g, &mut rng, Bf16, 128, 64);
}

// --- Attention over stored rows ---

/// Key rows stored as `format` records at scattered slot offsets, their host-decoded values,
/// per-token key lists (some slots without a key), queries and sinks.
struct AttnCase {
    heads: usize,
    hd: usize,
    format: KvRowFormat,
    pool: Vec<f32>,
    decoded: Vec<Vec<f32>>,
    /// Pool offset of each decoded row.
    row_at: Vec<usize>,
    q: Vec<f32>,
    sinks: Vec<f32>,
    /// Key list entries: a row index, or None for a slot without a key.
    keys: Vec<Option<usize>>,
    starts: Vec<i32>,
}

impl AttnCase {
    fn new(
        rng: &mut Rng,
        format: KvRowFormat,
        heads: usize,
        hd: usize,
        counts: &[usize],
        hole: usize,
    ) -> Self {
        let mut rows = random_rows(rng, 600, hd, NARROW);
        // The edge rows with moderate values (zeros, tiny, small scales and ties).
        rows.extend(
            edge_rows(rng, hd, format.rope())
                .into_iter()
                .filter(|r| r.iter().all(|v| v.abs() < 8.0)),
        );
        let slots = format.slots(hd);
        let mut pool = Vec::new();
        let mut row_at = Vec::new();
        let mut decoded = Vec::new();
        for row in &rows {
            // Rows at offsets that are not multiples of anything in particular.
            pool.extend((0..rng.below(3)).map(|_| f32::NAN));
            row_at.push(pool.len());
            let mut rec = vec![0f32; slots];
            format.encode(row, &mut rec);
            pool.extend_from_slice(&rec);
            let mut back = vec![0f32; hd];
            format.decode(&rec, &mut back);
            decoded.push(back);
        }
        let mut keys = Vec::new();
        let mut starts = vec![0i32];
        for &c in counts {
            for _ in 0..c {
                let masked = hole > 0 && rng.below(hole) == 0;
                keys.push((!masked).then(|| rng.below(rows.len())));
            }
            starts.push(keys.len() as i32);
        }
        if keys.is_empty() {
            keys.push(None);
        }
        Self {
            heads,
            hd,
            format,
            pool,
            decoded,
            row_at,
            q: rng.signed_vec(counts.len() * heads * hd, 1.0),
            sinks: rng.signed_vec(heads, 2.0),
            keys,
            starts,
        }
    }

    fn tokens(&self) -> usize {
        self.starts.len() - 1
    }

    /// f64 attention over the decoded rows with the sink in the denominator.
    fn reference(&self, scale: f32) -> Vec<f64> {
        let (heads, hd) = (self.heads, self.hd);
        let mut out = vec![0f64; self.tokens() * heads * hd];
        for t in 0..self.tokens() {
            let keys: Vec<&[f32]> = self.keys[self.starts[t] as usize..self.starts[t + 1] as usize]
                .iter()
                .flatten()
                .map(|&r| self.decoded[r].as_slice())
                .collect();
            for h in 0..heads {
                let qh = &self.q[(t * heads + h) * hd..][..hd];
                let logits: Vec<f64> = keys
                    .iter()
                    .map(|k| {
                        let dot: f64 = qh
                            .iter()
                            .zip(k.iter())
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum();
                        dot * f64::from(scale)
                    })
                    .collect();
                let sink = f64::from(self.sinks[h]);
                let mx = logits.iter().copied().fold(sink, f64::max);
                let mut den = (sink - mx).exp();
                let o = &mut out[(t * heads + h) * hd..][..hd];
                for (k, &lg) in keys.iter().zip(&logits) {
                    let p = (lg - mx).exp();
                    den += p;
                    for (d, &v) in o.iter_mut().zip(k.iter()) {
                        *d += p * f64::from(v);
                    }
                }
                o.iter_mut().for_each(|d| *d /= den);
            }
        }
        out
    }

    fn run(&self, g: &Gpu, splits: usize, scale: f32, heads_path: bool) -> Vec<f32> {
        let tokens = self.tokens();
        let offsets: Vec<i64> = self
            .keys
            .iter()
            .map(|k| k.map_or(-1, |r| self.row_at[r] as i64))
            .collect();
        let (pool, q, sinks) = (g.up(&self.pool), g.up(&self.q), g.up(&self.sinks));
        let (offsets, starts) = (g.up(&offsets), g.up(&self.starts));
        let out = g.up(&vec![f32::NAN; tokens * self.heads * self.hd]);
        let ws = g.up(&vec![
            f32::NAN;
            attention_workspace_floats(
                tokens, self.heads, self.hd, splits
            )
        ]);
        let a = PagedAttention {
            pool: g.ptr(&pool),
            q: g.ptr(&q),
            key_offsets: g.ptr(&offsets),
            key_starts: g.ptr(&starts),
            sinks: g.ptr(&sinks),
            out: g.ptr(&out),
            workspace: g.ptr(&ws),
            tokens,
            heads: self.heads,
            head_dim: self.hd,
            splits,
            scale,
            format: self.format,
            inverse_rope: None,
            query_norm_eps: None,
            separate_merge: false,
            out_f16: false,
        };
        // SAFETY: every buffer holds the shape `a` names; every key offset starts a whole
        // record inside the pool.
        unsafe {
            if heads_path {
                g.k.paged_attention_heads(&g.s, &a)
            } else {
                g.k.paged_attention(&g.s, &a)
            }
        }
        .unwrap();
        g.down(&out)
    }
}

fn attention_check(g: &Gpu, c: &AttnCase, grouped: bool) {
    let scale = 1.0 / (c.hd as f32).sqrt();
    let counts: Vec<usize> = c
        .starts
        .windows(2)
        .map(|w| (w[1] - w[0]) as usize)
        .collect();
    let max_keys = counts.iter().copied().max().unwrap_or(0);
    let picked = attention_splits(max_keys, c.tokens(), c.heads, g.k.multiprocessors());
    let want = c.reference(scale);
    let mut split_counts = vec![1, 3, picked];
    split_counts.sort_unstable();
    split_counts.dedup();
    for splits in split_counts {
        let per_head = c.run(g, splits, scale, false);
        let err = worst_row_err(&per_head, &want, c.hd);
        let mut line = format!("per-head vs f64 {err:.2e}");
        assert!(
            err < TOL_VS_F64,
            "{:?} heads={} hd={} keys={counts:?} splits={splits}: per-head vs f64 {err}",
            c.format,
            c.heads,
            c.hd
        );
        if grouped {
            let heads = c.run(g, splits, scale, true);
            let vs_f64 = worst_row_err(&heads, &want, c.hd);
            let ph64: Vec<f64> = per_head.iter().map(|&v| f64::from(v)).collect();
            let vs_kernel = worst_row_err(&heads, &ph64, c.hd);
            line += &format!(", grouped vs f64 {vs_f64:.2e}, vs per-head {vs_kernel:.2e}");
            assert!(
                vs_f64 < TOL_VS_F64 && vs_kernel < TOL_VS_KERNEL,
                "{:?} heads={} hd={} keys={counts:?} splits={splits}: grouped vs f64 {vs_f64}, \
                 vs per-head {vs_kernel}",
                c.format,
                c.heads,
                c.hd
            );
        }
        eprintln!(
            "attention {:?} heads={} hd={} keys={counts:?} splits={splits}: {line}",
            c.format, c.heads, c.hd
        );
    }
}

#[test]
fn attention_over_stored_rows_matches_f64_over_decoded_rows() {
    let Some(g) = gpu("attention_over_stored_rows_matches_f64_over_decoded_rows") else {
        return;
    };
    let mut rng = Rng(0xa77e_4d5e_c0de);
    for format in [Fp8Latent { rope: 64 }, Bf16, Fp8Latent { rope: 62 }] {
        for heads in [64, 32] {
            let c = AttnCase::new(&mut rng, format, heads, 512, &[1, 7, 128, 700], 0);
            attention_check(&g, &c, true);
        }
        let c = AttnCase::new(&mut rng, format, 64, 512, &[700, 1, 1400, 7, 0, 128], 5);
        attention_check(&g, &c, true);
    }
    // The tiny model's shape (one partial scale group), the indexer record read as keys, and a
    // head count only the per-head kernel takes.
    for format in [Fp8Latent { rope: 16 }, Bf16, Fp8Indexer] {
        let c = AttnCase::new(&mut rng, format, 16, 64, &[1, 7, 20, 0, 33], 3);
        attention_check(&g, &c, true);
        let c = AttnCase::new(&mut rng, format, 4, 64, &[1, 7, 20, 90], 4);
        attention_check(&g, &c, false);
    }
}

// --- Indexer scores over stored rows ---

/// Scores of `tokens` query tokens (each with its own scattered block table and visible count)
/// over rows stored as `format`, against f64 over the decoded rows. The bound is relative to
/// the sum of magnitudes behind each score (sum_h |w| * sum_d |q k| * scale): f32 sums of 128
/// products and 64 heads stay well inside 5e-5 of it.
fn indexer_case(
    g: &Gpu,
    rng: &mut Rng,
    format: KvRowFormat,
    heads: usize,
    dim: usize,
    visible: &[usize],
    extra_stride: usize,
) {
    let (bs, ratio) = (128, 4);
    let rows_per_block = bs / ratio;
    let slots = format.slots(dim);
    let stride = slots + extra_stride;
    let base = 5;
    let fpb = base + rows_per_block * stride + 3;
    let max_vis = visible.iter().copied().max().unwrap_or(0);
    let blocks_per_seq = max_vis.div_ceil(rows_per_block).max(1);
    let num_blocks = visible.len() * blocks_per_seq + 2;
    let mut pool = noise_pool(rng, num_blocks * fpb);
    // Every row slot of every block holds a record (rows a token does not see too).
    let mut decoded = vec![Vec::new(); num_blocks * rows_per_block];
    let mut edge = edge_rows(rng, dim, 0)
        .into_iter()
        .filter(|r| r.iter().all(|v| v.abs() < 1e6));
    for b in 0..num_blocks {
        for s in 0..rows_per_block {
            let row = edge
                .next()
                .unwrap_or_else(|| random_rows(rng, 1, dim, WIDE).remove(0));
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
    let scale = (dim as f32).powf(-0.5);
    let mut flat = Vec::new();
    let mut bt_starts = Vec::new();
    let mut out_starts = Vec::new();
    let mut total = 0i64;
    for (t, table) in tables.iter().enumerate() {
        bt_starts.push(flat.len() as i32);
        flat.extend_from_slice(table);
        out_starts.push(total);
        total += visible[t] as i64;
    }
    let vis: Vec<i32> = visible.iter().map(|&v| v as i32).collect();
    let (pool_d, q_d, w_d) = (g.up(&pool), g.up(&q), g.up(&w));
    let (bt_d, bts_d, vis_d, os_d) = (g.up(&flat), g.up(&bt_starts), g.up(&vis), g.up(&out_starts));
    let out_d = g.up(&vec![f32::NAN; (total as usize).max(1)]);
    let call = IndexerScores {
        pool: g.ptr(&pool_d),
        q: g.ptr(&q_d),
        weights: g.ptr(&w_d),
        block_tables: g.ptr(&bt_d),
        block_table_starts: g.ptr(&bts_d),
        visible: g.ptr(&vis_d),
        row_starts: 0,
        out_starts: g.ptr(&os_d),
        out: g.ptr(&out_d),
        tokens,
        max_visible: max_vis,
        floats_per_block: fpb,
        block_size: bs,
        base,
        ratio,
        stride,
        heads,
        dim,
        scale,
        format,
        tensor_cores: false,
    };
    // SAFETY: q [tokens, heads, dim], weights [tokens, heads], each token's table covers its
    // visible rows, out holds their sum.
    unsafe { g.k.indexer_scores(&g.s, &call) }.unwrap();
    let got = g.down(&out_d);
    let mut worst = 0f64;
    for t in 0..tokens {
        for r in 0..visible[t] {
            let pos = r * ratio;
            let blk = tables[t][pos / bs] as usize;
            let k = &decoded[blk * rows_per_block + (pos % bs) / ratio];
            let (mut want, mut mag) = (0f64, 0f64);
            for h in 0..heads {
                let qh = &q[(t * heads + h) * dim..][..dim];
                let dot: f64 = qh
                    .iter()
                    .zip(k)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                let abs: f64 = qh
                    .iter()
                    .zip(k)
                    .map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs())
                    .sum();
                let wh = f64::from(w[t * heads + h]);
                want += dot.max(0.0) * f64::from(scale) * wh;
                mag += abs * f64::from(scale) * wh.abs();
            }
            let v = f64::from(got[out_starts[t] as usize + r]);
            let err = if mag > 0.0 {
                (v - want).abs() / mag
            } else if v == 0.0 {
                0.0
            } else {
                f64::INFINITY
            };
            assert!(
                err < 5e-5,
                "indexer {format:?} heads={heads} dim={dim} token {t} row {r}: {v} vs {want} \
                 (err {err:.2e} of {mag:.3e})"
            );
            worst = worst.max(err);
        }
    }
    eprintln!("indexer {format:?} heads={heads} dim={dim} visible={visible:?}: worst {worst:.2e}");
}

#[test]
fn indexer_scores_over_stored_rows_match_f64_over_decoded_rows() {
    let Some(g) = gpu("indexer_scores_over_stored_rows_match_f64_over_decoded_rows") else {
        return;
    };
    let mut rng = Rng(0x1d3e_5c0e_0002);
    for format in [Fp8Indexer, Bf16, F32] {
        // Tiled kernel (heads <= 64, dim <= 128): V4-Flash's 64 x 128 and a narrow row.
        indexer_case(&g, &mut rng, format, 64, 128, &[1, 50, 300, 64], 0);
        indexer_case(&g, &mut rng, format, 64, 128, &[129, 7], 3);
        indexer_case(&g, &mut rng, format, 8, 32, &[33, 200], 1);
        // Plain kernel: wider rows or more heads than the tile takes.
        indexer_case(&g, &mut rng, format, 16, 256, &[1, 50, 300], 0);
        indexer_case(&g, &mut rng, format, 80, 64, &[70, 3], 2);
    }
}
