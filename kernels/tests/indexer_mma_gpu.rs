//! The tensor-core Lightning Indexer kernel (`dsk_indexer_scores_mma`, chosen by
//! `IndexerScores::tensor_cores`) against an f64 reference over the host-DECODED rows, for rows
//! stored as F32, BF16 and FP8_INDEXER records, V4-Flash's shapes (64 heads x 128 dims at TP=1,
//! 32 at TP=2), 16 heads and a head count that is not a multiple of 8, thousands of rows through
//! shuffled block tables, several tokens per launch with different visible counts (0 and 1
//! included), queries of very different sizes per token. FP8 rows also through the f16 form
//! (`dsk_indexer_scores_mma_f16`, the default for them in launches of 64 tokens and more: e4m3
//! keys exact in f16, the row scale applied after the products, each token's queries scaled by a
//! power of two into f16's range, groups of neighbouring tokens sharing each key tile), under the
//! same bounds, since it keeps the same 11 significant bits of each query value; prefill chunks
//! whose tokens share a block table, next to tokens with tables of their own, check its groups.
//! Every case is also scored in the shares a tensor-parallel group's ranks take when they split
//! the rows (`IndexerScores::row_starts`): bit-identical to the whole launch inside a share,
//! nothing written outside it.
//! Skips (passes with a SKIP line) where there is no GPU.
//!
//! Bounds, per score, relative to the magnitude behind it (`mag = sum_h |w_h| scale sum_d |q k|`):
//! - against f64 over the decoded rows and the f32 queries: the kernel rounds each query value to
//!   TF32 (round to nearest: at most 2^-11 relative), and f32 keys too; bf16 and e4m3 keys are
//!   exact in TF32. So each product moves by at most 2^-11 of its magnitude (stored keys) or
//!   (1 + 2^-11)^2 - 1 < 2^-10 + 2^-21 (f32 keys), and relu is 1-Lipschitz: the score moves by at
//!   most that fraction of `mag`. The f32 accumulation (16 MMAs of 8 products, then up to 64
//!   heads) adds well under 1e-5 of `mag`; the bound is 2^-11 + 1e-5 (BF16, FP8) and
//!   2^-10 + 1e-5 (F32), the worst case, not a typical error.
//! - against f64 over the TF32-rounded queries (and f32 keys), rounded on the host as cvt.rna
//!   does (for the f16 form: as it scales and rounds them to f16, ties to even): only the
//!   accumulation is left, so 1e-5 of `mag`. This one catches a kernel that truncates instead
//!   of rounding, or drops part of a value.

use dspark_kernels::launch::attention::{
    indexer_kernel, indexer_mma_f16_fits, IndexerKernel, INDEXER_F16_MIN_TOKENS,
};
use dspark_kernels::{IndexerScores, KvRowFormat};

mod common;
use common::{check_row_shares, gpu, Gpu, Rng};

use KvRowFormat::{Bf16, Fp8Indexer, F32};

/// TF32 as cvt.rna.tf32.f32: round to nearest on the top 19 bits, ties away from zero.
fn tf32(x: f32) -> f64 {
    let u = x.to_bits();
    if u & 0x7f80_0000 == 0x7f80_0000 {
        return f64::from(x);
    }
    f64::from(f32::from_bits(u.wrapping_add(0x1000) & 0xffff_e000))
}

/// A token's query values as the f16 form multiplies them: times 2^e (the largest magnitude
/// into [2^14, 2^15)), rounded to f16 (nearest, ties to even), times 2^-e.
fn f16_form_queries(q: &[f32]) -> Vec<f64> {
    let m = q.iter().fold(0f32, |m, v| m.max(v.abs()));
    let e = if m > 0.0 && m.is_finite() {
        (14 - ((m.to_bits() >> 23) & 255) as i32 + 127).clamp(-126, 126)
    } else {
        0
    };
    let up = 2f32.powi(e);
    q.iter()
        .map(|&v| f64::from(half::f16::from_f32(v * up).to_f32()) / f64::from(up))
        .collect()
}

/// Random rows whose 32-value groups have scales 2^-6 .. 2^6 (varying row by row): every value
/// a normal f32 far from the subnormal range.
fn random_row(rng: &mut Rng, dim: usize) -> Vec<f32> {
    let e: Vec<i32> = (0..dim.div_ceil(32))
        .map(|_| rng.below(13) as i32 - 6)
        .collect();
    (0..dim)
        .map(|i| rng.uniform(-1.0, 1.0) * 2f32.powi(e[i / 32]))
        .collect()
}

/// Scores of `visible.len()` tokens, each with its own block table, over rows stored as `format`
/// on the tensor cores, checked against both references; returns the worst errors (vs f64, vs
/// TF32-rounded f64).
fn mma_case(
    g: &Gpu,
    rng: &mut Rng,
    format: KvRowFormat,
    heads: usize,
    dim: usize,
    visible: &[usize],
    extra_stride: usize,
) -> (f64, f64) {
    let own: Vec<usize> = (0..visible.len()).collect();
    mma_case_in(g, rng, format, heads, dim, visible, &own, extra_stride)
}

/// [`mma_case`] with token `t` in sequence `seq[t]`: the tokens of a sequence share one block
/// table (one start in the packed tables), as a prefill chunk's do.
#[allow(clippy::too_many_arguments)]
fn mma_case_in(
    g: &Gpu,
    rng: &mut Rng,
    format: KvRowFormat,
    heads: usize,
    dim: usize,
    visible: &[usize],
    seq: &[usize],
    extra_stride: usize,
) -> (f64, f64) {
    assert_eq!(seq.len(), visible.len());
    let seqs = seq.iter().copied().max().map_or(0, |s| s + 1);
    let (bs, ratio) = (128, 4);
    let rows_per_block = bs / ratio;
    let slots = format.slots(dim);
    let stride = slots + extra_stride;
    let base = 5;
    let fpb = base + rows_per_block * stride + 3;
    let max_vis = visible.iter().copied().max().unwrap_or(0);
    let blocks_per_seq = max_vis.div_ceil(rows_per_block).max(1);
    let num_blocks = seqs * blocks_per_seq + 2;
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
    let tables: Vec<Vec<u32>> = (0..seqs)
        .map(|s| perm[s * blocks_per_seq..(s + 1) * blocks_per_seq].to_vec())
        .collect();
    let tokens = visible.len();
    // Tokens' queries at different sizes (powers of two: exact), beyond f16's range for some:
    // the f16 form scales each token's queries into range itself.
    let mut q = rng.signed_vec(tokens * heads * dim, 1.0);
    for (i, v) in q.iter_mut().enumerate() {
        *v *= 2f32.powi([0, 18, -18, 7][i / (heads * dim) % 4]);
    }
    let w = rng.signed_vec(tokens * heads, 1.0);
    let scale = (dim as f32).powf(-0.5);
    let mut flat = Vec::new();
    let mut bt_starts = Vec::new();
    let mut out_starts = Vec::new();
    let mut total = 0i64;
    let mut table_at = Vec::new();
    for table in &tables {
        table_at.push(flat.len() as i32);
        flat.extend_from_slice(table);
    }
    for (t, &s) in seq.iter().enumerate() {
        bt_starts.push(table_at[s]);
        out_starts.push(total);
        total += visible[t] as i64;
    }
    let vis: Vec<i32> = visible.iter().map(|&v| v as i32).collect();
    let (pool_d, q_d, w_d) = (g.up(&pool), g.up(&q), g.up(&w));
    let (bt_d, bts_d, vis_d, os_d) = (g.up(&flat), g.up(&bt_starts), g.up(&vis), g.up(&out_starts));
    // Sixteen sentinels past the last score: nothing may write there.
    let out_d = g.up(&vec![f32::NAN; total as usize + 16]);
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
        tensor_cores: true,
    };
    assert_eq!(
        indexer_kernel(&call, g.k.smem_optin()),
        IndexerKernel::TensorCore,
        "{heads} heads x {dim} dims should take the tensor cores"
    );
    // SAFETY: q [tokens, heads, dim], weights [tokens, heads], each token's table covers its
    // visible rows, out holds their sum (and the sentinels).
    unsafe { g.k.indexer_scores(&g.s, &call) }.unwrap();
    // The second reference rounds the queries as the form that ran does: TF32 (cvt.rna), or the
    // f16 form's scaled f16 rounding (ties to even), per token.
    let f16_form = indexer_mma_f16_fits(&call, g.k.indexer_f16(), g.k.smem_optin());
    if g.k.indexer_f16() && format == Fp8Indexer && tokens >= INDEXER_F16_MIN_TOKENS {
        assert!(
            f16_form,
            "the f16 form should take {tokens} tokens of FP8 rows"
        );
    }
    let q_rounded: Vec<f64> = if f16_form {
        q.chunks(heads * dim).flat_map(f16_form_queries).collect()
    } else {
        q.iter().map(|&v| tf32(v)).collect()
    };
    let got = g.down(&out_d);
    let tol = match format {
        F32 => 2f64.powi(-10),
        _ => 2f64.powi(-11),
    } + 1e-5;
    let (mut worst, mut worst_tf32) = (0f64, 0f64);
    for t in 0..tokens {
        for r in 0..visible[t] {
            let pos = r * ratio;
            let blk = tables[seq[t]][pos / bs] as usize;
            let k = &decoded[blk * rows_per_block + (pos % bs) / ratio];
            // Keys as the kernel multiplies them: f32 keys round to TF32, stored ones are exact.
            let k_tf32: Vec<f64> = k
                .iter()
                .map(|&x| if format == F32 { tf32(x) } else { f64::from(x) })
                .collect();
            let (mut want, mut want_tf32, mut mag) = (0f64, 0f64, 0f64);
            for h in 0..heads {
                let qh = &q[(t * heads + h) * dim..][..dim];
                let (mut dot, mut dot_tf32, mut abs) = (0f64, 0f64, 0f64);
                for d in 0..dim {
                    let p = f64::from(qh[d]) * f64::from(k[d]);
                    dot += p;
                    abs += p.abs();
                    dot_tf32 += q_rounded[(t * heads + h) * dim + d] * k_tf32[d];
                }
                let wh = f64::from(w[t * heads + h]);
                let sc = f64::from(scale);
                want += dot.max(0.0) * sc * wh;
                want_tf32 += dot_tf32.max(0.0) * sc * wh;
                mag += abs * sc * wh.abs();
            }
            let v = f64::from(got[out_starts[t] as usize + r]);
            let (err, err_tf32) = ((v - want).abs() / mag, (v - want_tf32).abs() / mag);
            assert!(
                err < tol && err_tf32 < 1e-5,
                "{format:?} heads={heads} dim={dim} token {t} row {r}: {v} vs f64 {want} (err \
                 {err:.2e}, bound {tol:.2e}), vs TF32-rounded f64 {want_tf32} (err \
                 {err_tf32:.2e}, bound 1e-5); magnitude {mag:.3e}"
            );
            worst = worst.max(err);
            worst_tf32 = worst_tf32.max(err_tf32);
        }
    }
    assert!(
        got[total as usize..].iter().all(|x| x.is_nan()),
        "{format:?} heads={heads} dim={dim}: scores written past the last row"
    );
    let shares = check_row_shares(
        g,
        &call,
        visible,
        &out_starts,
        total as usize + 16,
        &got,
        &format!("{format:?} heads={heads} dim={dim}"),
    );
    eprintln!(
        "indexer mma {format:?} heads={heads} dim={dim} tokens={tokens} in {seqs} sequences (f16 \
         form: {}): worst {worst:.2e} of bound {tol:.2e}, vs TF32-rounded {worst_tf32:.2e}; \
         {shares} rank-share launches bit-identical",
        f16_form
    );
    (worst, worst_tf32)
}

#[test]
fn tensor_core_scores_match_f64_over_decoded_rows() {
    let Some(mut g) = gpu("tensor_core_scores_match_f64_over_decoded_rows") else {
        return;
    };
    let mut rng = Rng(0x1d3e_5c0e_00aa);
    // FP8 rows twice: the f16 form (the default) and the TF32 one; the other formats always
    // take TF32. The bounds are the same: both keep 11 significant bits of every query value.
    for (format, f16) in [
        (Fp8Indexer, true),
        (Fp8Indexer, false),
        (Bf16, true),
        (F32, true),
    ] {
        g.k.set_indexer_f16(f16);
        // The f16 form runs for launches of prefill size: the FP8 cases with it on get 64 more
        // tokens of 0 .. 299 rows each.
        let lists = |v: &[usize]| -> Vec<usize> {
            let mut v = v.to_vec();
            if f16 && format == Fp8Indexer {
                v.extend((0..INDEXER_F16_MIN_TOKENS).map(|i| i * 37 % 300));
            }
            v
        };
        // V4-Flash TP=1: a decoding token with thousands of rows next to short ones, 0 and 1.
        mma_case(
            &g,
            &mut rng,
            format,
            64,
            128,
            &lists(&[0, 1, 3000, 4097, 64, 63]),
            0,
        );
        // TP=2, and a padded stride.
        mma_case(&g, &mut rng, format, 32, 128, &lists(&[2500, 1, 0, 129]), 3);
        mma_case(&g, &mut rng, format, 16, 128, &lists(&[1000, 65, 7]), 1);
        // Heads not a multiple of 8: zero-padded to 16 in the kernel.
        mma_case(&g, &mut rng, format, 13, 128, &lists(&[777, 2]), 0);
        // Narrower rows (k-steps of 8 up to dim; the f16 form's 16).
        mma_case(&g, &mut rng, format, 8, 64, &lists(&[300, 33]), 2);
    }
}

/// One token over more rows than a wave of blocks covers (V4-Flash's FP8 rows): every block
/// scores several tiles, each prefetched during the previous one's MMAs.
#[test]
fn tensor_core_scores_over_many_tiles_per_block() {
    let Some(mut g) = gpu("tensor_core_scores_over_many_tiles_per_block") else {
        return;
    };
    let mut rng = Rng(0x1d3e_5c0e_00ab);
    let rows = 64 * 8 * g.k.multiprocessors() + 37;
    for f16 in [true, false] {
        g.k.set_indexer_f16(f16);
        let mut visible = vec![rows, 5, 700];
        visible.extend((0..INDEXER_F16_MIN_TOKENS).map(|i| i % 3));
        mma_case(&g, &mut rng, Fp8Indexer, 64, 128, &visible, 0);
    }
    mma_case(&g, &mut rng, Bf16, 32, 128, &[rows / 2, 0, 3], 0);
}

/// Prefill-shaped launches (the f16 form's): chunks of sequences whose tokens share a block table
/// and see causally growing row counts (a row per 4 positions), next to decode tokens with tables
/// of their own, so the f16 form's token groups (4 tokens at 64 heads, 8 at 32, 16 at 13) hold
/// one run of a table, or several (a group straddling two sequences or a decode row), and tokens
/// that see no row. Both forms, against the same references.
#[test]
fn prefill_chunks_sharing_tables_match_f64() {
    let Some(mut g) = gpu("prefill_chunks_sharing_tables_match_f64") else {
        return;
    };
    let mut rng = Rng(0x1d3e_5c0e_00ac);
    // (sequence, chunk start, tokens): a decode token, a 150-token chunk from position 1,999
    // (rows 500 .. 537), a decode token, a 70-token chunk from position 0 (rows 0 .. 17), a
    // 3-token chunk, a decode token.
    let layout: [(usize, usize); 6] = [
        (4_000, 1),
        (1_999, 150),
        (9_000, 1),
        (0, 70),
        (37, 3),
        (2_100, 1),
    ];
    let (mut visible, mut seq) = (Vec::new(), Vec::new());
    for (s, &(start, n)) in layout.iter().enumerate() {
        for i in 0..n {
            visible.push((start + i + 1) / 4);
            seq.push(s);
        }
    }
    for f16 in [true, false] {
        g.k.set_indexer_f16(f16);
        for heads in [64, 32, 13] {
            mma_case_in(&g, &mut rng, Fp8Indexer, heads, 128, &visible, &seq, 0);
        }
    }
}

/// Prints the scoring time of the last 8,192-token chunk of a 100K prompt at a CSA layer (ratio 4:
/// its tokens see 23,000 to 25,000 compressed rows through one table), 64 heads x 128 dims over
/// FP8 rows, whole and as one rank of two that split the rows, on the f16 form and on the TF32
/// kernel, with the rate of the products actually needed (`tokens x visible x heads x dim x 2`).
/// Timing only: correctness is the other tests'.
#[test]
fn f16_indexer_chunk_timing() {
    let Some(mut g) = gpu("f16_indexer_chunk_timing") else {
        return;
    };
    let mut rng = Rng(0x7e57_c4a2_0016);
    let (heads, dim, bs, ratio) = (64usize, 128usize, 128usize, 4usize);
    let (first, tokens) = (91_808usize, 8_192usize);
    let format = Fp8Indexer;
    let rows_per_block = bs / ratio;
    let max_visible = (first + tokens) / ratio;
    let blocks = max_visible.div_ceil(rows_per_block);
    let pool = common::random_indexer_pool(&mut rng, format, dim, rows_per_block, blocks);
    // Blocks in a shuffled order, as a pool hands them out.
    let table = rng.permutation(blocks);
    let visible: Vec<i32> = (0..tokens)
        .map(|t| ((first + t + 1) / ratio) as i32)
        .collect();
    // Rank 1 of 2 scores the second half of each token's rows.
    let share_start: Vec<i32> = visible.iter().map(|&v| v / 2).collect();
    let mut out_starts = Vec::with_capacity(tokens);
    let mut total = 0i64;
    for &v in &visible {
        out_starts.push(total);
        total += i64::from(v);
    }
    let pool_d = g.up(&pool.data);
    let bt_d = g.up(&table);
    let q_d = g.up(&rng.signed_vec(tokens * heads * dim, 1.0));
    let w_d = g.up(&rng.signed_vec(tokens * heads, 1.0));
    let tables_d = g.up(&vec![0i32; tokens]);
    let vis_d = g.up(&visible);
    let share_d = g.up(&share_start);
    let starts_d = g.up(&out_starts);
    let out_d = g.up(&vec![0f32; total as usize]);
    let (pool_p, q_p, w_p, bt_p) = (g.ptr(&pool_d), g.ptr(&q_d), g.ptr(&w_d), g.ptr(&bt_d));
    let (tables_p, vis_p, share_p) = (g.ptr(&tables_d), g.ptr(&vis_d), g.ptr(&share_d));
    let (starts_p, out_p) = (g.ptr(&starts_d), g.ptr(&out_d));
    let call = |row_starts| IndexerScores {
        pool: pool_p,
        q: q_p,
        weights: w_p,
        block_tables: bt_p,
        block_table_starts: tables_p,
        visible: vis_p,
        row_starts,
        out_starts: starts_p,
        out: out_p,
        tokens,
        max_visible,
        floats_per_block: pool.floats_per_block,
        block_size: bs,
        base: pool.base,
        ratio,
        stride: pool.stride,
        heads,
        dim,
        scale: (dim as f32).powf(-0.5),
        format,
        tensor_cores: true,
    };
    let whole_pairs: f64 = visible.iter().map(|&v| f64::from(v)).sum();
    let share_pairs: f64 = visible.iter().map(|&v| f64::from(v - v / 2)).sum();
    for f16 in [true, false] {
        g.k.set_indexer_f16(f16);
        let form = if f16 { "f16 form" } else { "TF32 kernel" };
        for (what, row_starts, pairs) in [
            ("whole", 0, whole_pairs),
            ("rank 1 of 2", share_p, share_pairs),
        ] {
            let c = call(row_starts);
            // SAFETY: the pool holds every block the table names, each token's output room is
            // its visible count, the queries and weights are [tokens, heads (, dim)].
            let us = common::time_us(&g, 5, &|| unsafe {
                g.k.indexer_scores(&g.s, &c).unwrap();
            });
            let tflops = pairs * (heads * dim * 2) as f64 / (us * 1e-6) / 1e12;
            eprintln!(
                "indexer scores, {tokens} tokens over {} .. {max_visible} FP8 rows, {heads} \
                 heads, {what}, {form}: {:.3} ms, {tflops:.1} TFLOPS",
                visible[0],
                us / 1000.0
            );
        }
    }
}
