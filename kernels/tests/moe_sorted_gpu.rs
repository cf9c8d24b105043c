//! GPU checks of `moe_sorted.cu` (the routed experts over many tokens) against host references:
//! FP4 widening is exact, so it must match bit for bit; the gather is a copy; the combine sums
//! the slots in the same order as the host, so it matches to f32 rounding of the same sums.
//! The f16 forms (expert GEMMs on f16 tensor cores): the widening is exact for scales in
//! `F16_EXACT_SCALES`, the gather rounds to nearest even, the SwiGLU stores its f32 value rounded.
//! Skips (passes with a SKIP line) where there is no GPU.

use dspark_kernels::formats::{e2m1_at, e8m0_to_f64};
use dspark_kernels::launch::moe_sorted::{GatherInto, F16_EXACT_SCALES};
use half::f16;

mod common;
use common::{gpu, Rng};

/// The listed experts' matrices of an FP4 bank (`rows` x `k` each, nibbles `w`, E8M0 scales `s`
/// per 32 values) as exact f64 values, `[list index][row][col]`.
fn widened_bank(w: &[u8], s: &[u8], list: &[i32], rows: usize, k: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(list.len() * rows * k);
    for &e in list {
        let e = e as usize;
        for r in 0..rows {
            let row = &w[(e * rows + r) * k / 2..(e * rows + r + 1) * k / 2];
            for c in 0..k {
                let scale = e8m0_to_f64(s[(e * rows + r) * k / 32 + c / 32]);
                out.push(f64::from(e2m1_at(row, c)) * scale);
            }
        }
    }
    out
}

#[test]
fn fp4_experts_widen_exactly_in_list_order() {
    let Some(g) = gpu("fp4_experts_widen_exactly_in_list_order") else {
        return;
    };
    let mut rng = Rng(0x005e_edf4);
    let (experts, rows, k) = (5usize, 48usize, 96usize);
    let w: Vec<u8> = (0..experts * rows * k / 2)
        .map(|_| rng.next() as u8)
        .collect();
    // Scales around 2^0 (codes 120..134), never NaN.
    let s: Vec<u8> = (0..experts * rows * k / 32)
        .map(|_| 120 + rng.below(15) as u8)
        .collect();
    let list = [3i32, 0, 4, 3];
    let (wb, sb, lb) = (g.up(&w), g.up(&s), g.up(&list));
    let out = g.up(&vec![f32::NAN; list.len() * rows * k]);
    // SAFETY: buffers sized as the launch's contract asks (bank of `experts`, ids below it).
    unsafe {
        g.k.fp4_dequant_experts(
            &g.s,
            g.ptr(&wb),
            g.ptr(&sb),
            g.ptr(&lb),
            list.len(),
            rows,
            k,
            g.ptr(&out),
        )
    }
    .unwrap();
    let got = g.down(&out);
    let want = widened_bank(&w, &s, &list, rows, k);
    assert_eq!(got.len(), want.len());
    for (i, (&have, &want)) in got.iter().zip(&want).enumerate() {
        let (m, r, c) = (i / (rows * k), i / k % rows, i % k);
        assert_eq!(
            have.to_bits(),
            (want as f32).to_bits(),
            "expert {} row {r} col {c}",
            list[m]
        );
    }
}

#[test]
fn gather_and_combine_restore_token_order() {
    let Some(g) = gpu("gather_and_combine_restore_token_order") else {
        return;
    };
    let mut rng = Rng(0xc0b1);
    let (tokens, topk, hidden) = (37usize, 3usize, 80usize);
    let x = rng.signed_vec(tokens * hidden, 2.0);
    // A permutation of the pairs (as the host's sort by expert makes), one slot dropped.
    let pairs = tokens * topk;
    let mut order: Vec<usize> = (0..pairs).collect();
    for i in (1..pairs).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let dropped = 7usize;
    let sorted: Vec<usize> = order.iter().copied().filter(|&p| p != dropped).collect();
    let idx: Vec<i32> = sorted.iter().map(|&p| (p / topk) as i32).collect();
    let mut pos = vec![-1i32; pairs];
    for (i, &p) in sorted.iter().enumerate() {
        pos[p] = i as i32;
    }
    let weights = rng.vec(pairs, 0.0, 1.0);
    let (xb, ib) = (g.up(&x), g.up(&idx));
    let gathered = g.up(&vec![f32::NAN; sorted.len() * hidden]);
    // SAFETY: idx rows are tokens of x; gathered holds sorted.len() rows.
    unsafe {
        g.k.gather_rows(
            &g.s,
            GatherInto::F32,
            g.ptr(&xb),
            g.ptr(&ib),
            sorted.len(),
            hidden,
            g.ptr(&gathered),
        )
    }
    .unwrap();
    let got = g.down(&gathered);
    for (i, &p) in sorted.iter().enumerate() {
        let t = p / topk;
        assert_eq!(
            got[i * hidden..(i + 1) * hidden],
            x[t * hidden..(t + 1) * hidden]
        );
    }
    // y: the gathered rows scaled per pair, so each slot's contribution is distinct.
    let y: Vec<f32> = got
        .chunks(hidden)
        .enumerate()
        .flat_map(|(i, r)| r.iter().map(move |v| v * (1.0 + i as f32 / 64.0)))
        .collect();
    let (yb, pb, wb) = (g.up(&y), g.up(&pos), g.up(&weights));
    let out = g.up(&vec![f32::NAN; tokens * hidden]);
    // SAFETY: pos entries are rows of y or -1; out holds tokens rows.
    unsafe {
        g.k.moe_combine_sorted(
            &g.s,
            g.ptr(&yb),
            g.ptr(&pb),
            g.ptr(&wb),
            tokens,
            topk,
            hidden,
            g.ptr(&out),
            0,
        )
    }
    .unwrap();
    let got = g.down(&out);
    for t in 0..tokens {
        for c in 0..hidden {
            let mut want = 0f32;
            for j in 0..topk {
                let p = pos[t * topk + j];
                if p >= 0 {
                    want += weights[t * topk + j] * y[p as usize * hidden + c];
                }
            }
            let have = got[t * hidden + c];
            assert!(
                (have - want).abs() <= 1e-6 * want.abs().max(1.0),
                "token {t} col {c}: {have} vs {want}"
            );
        }
    }
    // The 16-byte form above and the scalar one (an output 4 bytes off alignment takes it) sum
    // the same products in the same order: the same bits.
    let out2 = g.up(&vec![f32::NAN; tokens * hidden + 1]);
    // SAFETY: as above, out2 holding one float more than the offset output needs.
    unsafe {
        g.k.moe_combine_sorted(
            &g.s,
            g.ptr(&yb),
            g.ptr(&pb),
            g.ptr(&wb),
            tokens,
            topk,
            hidden,
            g.ptr(&out2) + 4,
            0,
        )
    }
    .unwrap();
    let scalar = g.down(&out2);
    for (i, (a, b)) in got.iter().zip(&scalar[1..]).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "value {i}: vector {a} vs scalar {b}"
        );
    }
    // With an addend (the shared expert's rows), both forms give the bits of the sum above
    // plus a separate add_into after it, which GEMM steps used to launch.
    let addend = rng.signed_vec(tokens * hidden + 1, 2.0);
    let ab = g.up(&addend);
    for (offset, what) in [(0usize, "vector"), (1, "scalar")] {
        let want = g.up(&got);
        // SAFETY: want holds tokens * hidden f32, the addend one more than the offset needs.
        unsafe {
            g.k.add_into(
                &g.s,
                g.ptr(&want),
                g.ptr(&ab) + 4 * offset as u64,
                tokens * hidden,
            )
        }
        .unwrap();
        let want = g.down(&want);
        let out3 = g.up(&vec![f32::NAN; tokens * hidden + 1]);
        // SAFETY: as above; out3 and the addend hold one float more than the offset rows need.
        unsafe {
            g.k.moe_combine_sorted(
                &g.s,
                g.ptr(&yb),
                g.ptr(&pb),
                g.ptr(&wb),
                tokens,
                topk,
                hidden,
                g.ptr(&out3) + 4 * offset as u64,
                g.ptr(&ab) + 4 * offset as u64,
            )
        }
        .unwrap();
        let fused = g.down(&out3);
        for (i, (a, b)) in fused[offset..].iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{what} value {i}: {a} vs {b}");
        }
    }
}

#[test]
fn f16_forms_widen_exactly_gather_and_swiglu_round_once() {
    let Some(g) = gpu("f16_forms_widen_exactly_gather_and_swiglu_round_once") else {
        return;
    };
    let mut rng = Rng(0x0f16_f16f);
    let (experts, rows, k) = (4usize, 40usize, 128usize);
    let w: Vec<u8> = (0..experts * rows * k / 2)
        .map(|_| rng.next() as u8)
        .collect();
    // Every scale of the f16-exact range, the two ends included.
    let (lo, hi) = (*F16_EXACT_SCALES.start(), *F16_EXACT_SCALES.end());
    let mut s: Vec<u8> = (0..experts * rows * k / 32)
        .map(|_| lo + rng.below(usize::from(hi - lo) + 1) as u8)
        .collect();
    s[0] = lo;
    s[1] = hi;
    let list = [2i32, 0, 3];
    let (wb, sb, lb) = (g.up(&w), g.up(&s), g.up(&list));
    let out = g.up(&vec![0xffffu16; list.len() * rows * k]);
    // SAFETY: a bank of `experts`, ids below it, `out` sized for the listed matrices in f16.
    unsafe {
        g.k.fp4_dequant_experts_f16(
            &g.s,
            g.ptr(&wb),
            g.ptr(&sb),
            g.ptr(&lb),
            list.len(),
            rows,
            k,
            g.ptr(&out),
        )
    }
    .unwrap();
    let got = g.down(&out);
    let want = widened_bank(&w, &s, &list, rows, k);
    assert_eq!(got.len(), want.len());
    for (i, (&have, &want)) in got.iter().zip(&want).enumerate() {
        let (m, r, c) = (i / (rows * k), i / k % rows, i % k);
        assert_eq!(
            f16::from_bits(have).to_f64(),
            want,
            "f16 widening inexact: expert {} row {r} col {c}",
            list[m]
        );
    }

    // The byte range over two buffers, accumulated in one pair.
    let a: Vec<u8> = (0..10_001).map(|_| 100 + rng.below(30) as u8).collect();
    let mut b: Vec<u8> = (0..777).map(|_| 110 + rng.below(10) as u8).collect();
    b[500] = 97;
    let range = g.up(&[255u32, 0u32]);
    let (ab, bb) = (g.up(&a), g.up(&b));
    for (buf, len) in [(&ab, a.len()), (&bb, b.len())] {
        // SAFETY: `buf` holds `len` bytes, `range` two u32 set to (255, 0) before the first.
        unsafe { g.k.u8_range(&g.s, g.ptr(buf), len, g.ptr(&range)) }.unwrap();
    }
    let want_hi = a.iter().chain(&b).copied().max().unwrap_or(0);
    assert_eq!(g.down(&range), vec![97u32, u32::from(want_hi)]);

    // Gather into f16: round to nearest even, as half's conversion.
    let (n_src, width) = (9usize, 72usize);
    let src: Vec<f32> = (0..n_src * width)
        .map(|i| match i % 7 {
            0 => 0.0,
            1 => 1e-6 * rng.signed_vec(1, 1.0)[0],
            _ => rng.signed_vec(1, 300.0)[0],
        })
        .collect();
    let idx = [4i32, 4, 0, 8, 1];
    let (sb, ib) = (g.up(&src), g.up(&idx));
    let dst = g.up(&vec![0u16; idx.len() * width]);
    // SAFETY: every index is a row of `src`; `dst` holds idx.len() rows of `width` f16.
    unsafe {
        g.k.gather_rows(
            &g.s,
            GatherInto::F16,
            g.ptr(&sb),
            g.ptr(&ib),
            idx.len(),
            width,
            g.ptr(&dst),
        )
    }
    .unwrap();
    let got = g.down(&dst);
    for (i, &r) in idx.iter().enumerate() {
        for c in 0..width {
            let want = f16::from_f32(src[r as usize * width + c]).to_bits();
            assert_eq!(got[i * width + c], want, "gather row {i} col {c}");
        }
    }

    // SwiGLU into f16: the clipped f32 value, rounded once (relative 2^-11 of an f64 reference,
    // plus f32's own few ulps).
    let len = 5000usize;
    let gate = rng.signed_vec(len, 14.0);
    let up = rng.signed_vec(len, 14.0);
    let limit = 10.0f32;
    let (gb, ub) = (g.up(&gate), g.up(&up));
    let act = g.up(&vec![0u16; len]);
    // SAFETY: gate and up hold `len` f32, act `len` f16.
    unsafe {
        g.k.swiglu_clip_to_f16(&g.s, g.ptr(&gb), g.ptr(&ub), g.ptr(&act), len, limit)
    }
    .unwrap();
    let got = g.down(&act);
    for i in 0..len {
        let gv = f64::from(gate[i].min(limit));
        let uv = f64::from(up[i].clamp(-limit, limit));
        let want = gv / (1.0 + (-gv).exp()) * uv;
        let have = f16::from_bits(got[i]).to_f64();
        let bound = want.abs() * (2f64.powi(-11) + 1e-6) + 1e-7;
        assert!(
            (have - want).abs() <= bound,
            "swiglu {i}: {have} vs {want} (gate {}, up {})",
            gate[i],
            up[i]
        );
    }
}

/// The prefill projections' f16 forms (`elementwise.cu`): an FP8 matrix widened to f16 times
/// 2^-shift is exact for every scale its range check allows, the NaN-free e4m3 codes included,
/// and strided f32 rows round to f16 as half's round-to-nearest-even conversion does.
#[test]
fn fp8_widens_exactly_to_f16_and_rows_round_to_nearest_even() {
    use dspark_kernels::formats::e4m3_to_f32;
    use dspark_kernels::launch::elementwise::fp8_f16_shift;
    let Some(g) = gpu("fp8_widens_exactly_to_f16_and_rows_round_to_nearest_even") else {
        return;
    };
    let mut rng = Rng(0x0f08_0f16);
    // 3 x 2 tiles, the last ones partial; a range of 23 scale values (the widest allowed).
    let (rows, cols) = (300usize, 136usize);
    let w: Vec<u8> = (0..rows * cols)
        .map(|_| loop {
            let b = rng.next() as u8;
            if b & 0x7f != 0x7f {
                break b;
            }
        })
        .collect();
    let tiles = rows.div_ceil(128) * cols.div_ceil(128);
    let (lo, hi) = (105u8, 127u8);
    let mut s: Vec<u8> = (0..tiles).map(|_| lo + rng.below(23) as u8).collect();
    s[0] = lo;
    s[tiles - 1] = hi;
    let shift = fp8_f16_shift(lo, hi).expect("a 23-value range fits");
    let (wb, sb) = (g.up(&w), g.up(&s));
    let out = g.up(&vec![0xffffu16; rows * cols]);
    // SAFETY: rows * cols bytes with their tiles; out as many f16.
    unsafe {
        g.k.fp8_dequant_f16(
            &g.s,
            [g.ptr(&wb), g.ptr(&sb), g.ptr(&out)],
            rows,
            cols,
            shift,
        )
    }
    .unwrap();
    let got = g.down(&out);
    let scale_cols = cols.div_ceil(128);
    for r in 0..rows {
        for c in 0..cols {
            let scale = e8m0_to_f64(s[(r / 128) * scale_cols + c / 128]);
            let want = f64::from(e4m3_to_f32(w[r * cols + c])) * scale / 2f64.powi(shift);
            assert_eq!(
                f16::from_bits(got[r * cols + c]).to_f64(),
                want,
                "f16 widening inexact at row {r} col {c}"
            );
        }
    }

    // Strided rows to dense f16.
    let (n, width, ld) = (37usize, 260usize, 264usize);
    let src: Vec<f32> = (0..n * ld)
        .map(|i| match i % 5 {
            0 => 1e-6 * rng.signed_vec(1, 1.0)[0],
            1 => rng.signed_vec(1, 60_000.0)[0],
            _ => rng.signed_vec(1, 3.0)[0],
        })
        .collect();
    let sb = g.up(&src);
    let dst = g.up(&vec![0u16; n * width]);
    // SAFETY: src holds n rows at stride ld >= width, dst n * width f16.
    unsafe { g.k.rows_to_f16(&g.s, g.ptr(&sb), ld, g.ptr(&dst), n, width) }.unwrap();
    let got = g.down(&dst);
    for r in 0..n {
        for c in 0..width {
            assert_eq!(
                got[r * width + c],
                f16::from_f32(src[r * ld + c]).to_bits(),
                "row {r} col {c}"
            );
        }
    }
}

/// The host's sort of the pairs by expert (the server's `ExpertOrder::of`: a stable counting
/// sort, ids outside the bank dropped with slot -1) and its tiles of `tile_rows`, padded as the
/// device sort pads them: token -1 for the rows past the valid ones, empty tiles up to
/// `max_tiles`. `(tokens, slots, tiles as i32)`.
fn host_sort(
    ids: &[i32],
    topk: usize,
    experts: usize,
    tile_rows: usize,
    max_tiles: usize,
) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    use dspark_kernels::launch::moe_grouped::{fp4_grouped_tiles, FP4_GROUPED_TILE_ROWS};
    let bank = |e: i32| usize::try_from(e).ok().filter(|&e| e < experts);
    let mut counts = vec![0usize; experts];
    for &e in ids {
        if let Some(e) = bank(e) {
            counts[e] += 1;
        }
    }
    let (mut next, mut runs, mut at) = (vec![0usize; experts], Vec::new(), 0);
    for (e, &c) in counts.iter().enumerate() {
        next[e] = at;
        if c > 0 {
            runs.push((e, at, c));
        }
        at += c;
    }
    let (mut tokens, mut slots) = (vec![-1i32; ids.len()], vec![-1i32; ids.len()]);
    for (p, &e) in ids.iter().enumerate() {
        if let Some(e) = bank(e) {
            tokens[next[e]] = (p / topk) as i32;
            slots[p] = next[e] as i32;
            next[e] += 1;
        }
    }
    let mut tiles = Vec::new();
    for &(e, first, rows) in &runs {
        let mut r = 0;
        while r < rows {
            let n = (rows - r).min(tile_rows);
            tiles.push([e as i32, (first + r) as i32, n as i32, 0]);
            r += n;
        }
    }
    if tile_rows == FP4_GROUPED_TILE_ROWS {
        assert_eq!(tiles, fp4_grouped_tiles(&runs), "host tiles");
    }
    assert!(
        tiles.len() <= max_tiles,
        "{} tiles over the bound",
        tiles.len()
    );
    tiles.resize(max_tiles, [0; 4]);
    (tokens, slots, tiles.into_iter().flatten().collect())
}

/// A value no launch writes: every output element must be overwritten, nothing past the end.
const UNWRITTEN: i32 = 0x7ead_beef;

/// The device sort of `ids` compared byte for byte with [`host_sort`], one guard element (tile)
/// past each output.
fn check_device_sort(
    g: &common::Gpu,
    what: &str,
    ids: &[i32],
    topk: usize,
    experts: usize,
    tile_rows: usize,
) {
    use dspark_kernels::launch::moe_grouped::fp4_grouped_max_tiles_of;
    use dspark_kernels::launch::moe_sorted::{MoeSortBuffers, MoeSortShape};
    let pairs = ids.len();
    let max_tiles = fp4_grouped_max_tiles_of(pairs, experts, tile_rows);
    let idb = g.up(ids);
    let tokens = g.up(&vec![UNWRITTEN; pairs + 1]);
    let slots = g.up(&vec![UNWRITTEN; pairs + 1]);
    let tiles = g.up(&vec![UNWRITTEN; 4 * (max_tiles + 1)]);
    let ends = g.up(&vec![UNWRITTEN; experts]);
    let buf = MoeSortBuffers {
        ids: g.ptr(&idb),
        tokens: g.ptr(&tokens),
        slots: g.ptr(&slots),
        tiles: g.ptr(&tiles),
        ends: g.ptr(&ends),
    };
    let shape = MoeSortShape {
        pairs,
        topk,
        experts,
        tile_rows,
        max_tiles,
    };
    // SAFETY: every buffer holds what MoeSortBuffers asks for this shape (plus a guard).
    unsafe { g.k.moe_sort(&g.s, &buf, &shape) }.unwrap();
    let (want_tokens, want_slots, want_tiles) = host_sort(ids, topk, experts, tile_rows, max_tiles);
    let guard = |mut v: Vec<i32>, n: usize| {
        v.extend(std::iter::repeat_n(UNWRITTEN, n));
        v
    };
    for (name, got, want) in [
        ("tokens", g.down(&tokens), guard(want_tokens, 1)),
        ("slots", g.down(&slots), guard(want_slots, 1)),
        ("tiles", g.down(&tiles), guard(want_tiles, 4)),
    ] {
        if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
            panic!(
                "{what} ({pairs} pairs, {experts} experts, tiles of {tile_rows}): {name}[{i}] = \
                 {}, want {}",
                got[i], want[i]
            );
        }
    }
}

/// The device sort (`Kernels::moe_sort`) is the host's `ExpertOrder` + tiles bit for bit: one
/// pair, a V4-Flash prefill chunk (8,192 tokens x 6 of 256 experts), skewed routing, ids outside
/// the bank, 1 and 1,024 experts, tiles of 64 and 128 rows, pair counts not a multiple of 4;
/// with the tail of tokens -1 and the empty tiles. Prints the sort's time for the chunk.
#[test]
fn device_sort_matches_the_host_order_and_tiles() {
    let Some(g) = gpu("device_sort_matches_the_host_order_and_tiles") else {
        return;
    };
    let mut rng = Rng(0x5047_1d5e);
    let mut uniform = |n: usize, topk: usize, experts: usize| -> Vec<i32> {
        (0..n * topk).map(|_| rng.below(experts) as i32).collect()
    };
    let chunk = uniform(8192, 6, 256);
    let narrow = uniform(1433, 7, 1024);
    let one_expert = uniform(333, 3, 1);
    let three = uniform(2000, 5, 3);
    let mut bad_ids = uniform(1001, 7, 300);
    let mut rng = Rng(0x00ba_d1d5);
    for e in bad_ids.iter_mut() {
        if rng.below(5) == 0 {
            *e = [-1, 300, 1000, i32::MIN, i32::MAX, -300][rng.below(6)];
        }
    }
    // One expert takes 90% of the pairs.
    let skewed: Vec<i32> = (0..8192 * 6)
        .map(|_| {
            if rng.below(10) > 0 {
                7
            } else {
                rng.below(256) as i32
            }
        })
        .collect();
    for tile_rows in [64, 128] {
        check_device_sort(&g, "one pair", &[5], 1, 256, tile_rows);
        check_device_sort(&g, "one pair outside", &[256], 1, 256, tile_rows);
        check_device_sort(&g, "prefill chunk", &chunk, 6, 256, tile_rows);
        check_device_sort(&g, "skewed", &skewed, 6, 256, tile_rows);
        check_device_sort(&g, "ids outside the bank", &bad_ids, 7, 300, tile_rows);
        check_device_sort(&g, "1024 experts", &narrow, 7, 1024, tile_rows);
        check_device_sort(&g, "one expert", &one_expert, 3, 1, tile_rows);
        check_device_sort(&g, "three experts", &three, 5, 3, tile_rows);
        check_device_sort(&g, "all outside", &[999; 154], 2, 16, tile_rows);
    }

    // Too many experts for the plan's block: a clear error, nothing launched.
    use dspark_kernels::launch::moe_grouped::fp4_grouped_max_tiles_of;
    use dspark_kernels::launch::moe_sorted::{MoeSortBuffers, MoeSortShape, MOE_SORT_MAX_EXPERTS};
    let experts = MOE_SORT_MAX_EXPERTS + 1;
    let max_tiles = fp4_grouped_max_tiles_of(chunk.len(), experts, 64);
    let idb = g.up(&chunk);
    let (tokens, slots) = (
        g.up(&vec![0i32; chunk.len()]),
        g.up(&vec![0i32; chunk.len()]),
    );
    let (tiles, ends) = (g.up(&vec![0i32; 4 * max_tiles]), g.up(&vec![0i32; experts]));
    let buf = MoeSortBuffers {
        ids: g.ptr(&idb),
        tokens: g.ptr(&tokens),
        slots: g.ptr(&slots),
        tiles: g.ptr(&tiles),
        ends: g.ptr(&ends),
    };
    let mut shape = MoeSortShape {
        pairs: chunk.len(),
        topk: 6,
        experts,
        tile_rows: 64,
        max_tiles,
    };
    // SAFETY: buffers sized for the shape; the launch is refused before any kernel runs.
    let err = unsafe { g.k.moe_sort(&g.s, &buf, &shape) }.unwrap_err();
    assert!(err.to_string().contains("experts"), "{err}");

    // Timing of the chunk's sort (plan + scatter), back to back.
    shape.experts = 256;
    shape.max_tiles = fp4_grouped_max_tiles_of(chunk.len(), 256, 64);
    let runs = 50;
    g.s.synchronize().unwrap();
    let start = std::time::Instant::now();
    for _ in 0..runs {
        // SAFETY: as above, for 256 experts.
        unsafe { g.k.moe_sort(&g.s, &buf, &shape) }.unwrap();
    }
    g.s.synchronize().unwrap();
    println!(
        "device sort of {} pairs over 256 experts: {:.1} us",
        chunk.len(),
        start.elapsed().as_secs_f64() * 1e6 / runs as f64
    );
}

/// A negative gather index (a sorted row no pair maps to, from the device sort) writes a row of
/// zeros in every output type; the other rows are gathered as before.
#[test]
fn gather_writes_zero_rows_for_negative_indices() {
    let Some(g) = gpu("gather_writes_zero_rows_for_negative_indices") else {
        return;
    };
    let mut rng = Rng(0x2e60);
    let (rows, width) = (5usize, 64usize);
    let x = rng.signed_vec(rows * width, 3.0);
    let idx = [3i32, -1, 0, -1, 4, 4];
    let (xb, ib) = (g.up(&x), g.up(&idx));
    let n = idx.len();
    let want_f32: Vec<f32> = idx
        .iter()
        .flat_map(|&r| match usize::try_from(r) {
            Ok(r) => x[r * width..(r + 1) * width].to_vec(),
            Err(_) => vec![0.0; width],
        })
        .collect();
    for into in [GatherInto::F32, GatherInto::F16, GatherInto::F16K8] {
        // Filled with NaN (f32) / 0xffff (f16) so every written value shows.
        let out = g.up(&vec![u32::MAX; n * width]);
        // SAFETY: idx rows are rows of x or negative; out holds n rows of f32 (or f16).
        unsafe {
            g.k.gather_rows(&g.s, into, g.ptr(&xb), g.ptr(&ib), n, width, g.ptr(&out))
        }
        .unwrap();
        let got = g.down(&out);
        for (i, &want) in want_f32.iter().enumerate() {
            let (r, c) = (i / width, i % width);
            let have = match into {
                GatherInto::F32 => got[i],
                _ => {
                    // f16 values, two a u32; k8 stores value c of each 8 at 0 4 1 5 2 6 3 7.
                    let at = match into {
                        GatherInto::F16K8 => (c & !7) | ((c & 3) << 1) | ((c >> 2) & 1),
                        _ => c,
                    };
                    let h = r * width + at;
                    (got[h / 2] >> (16 * (h % 2))) & 0xffff
                }
            };
            let want = match into {
                GatherInto::F32 => want.to_bits(),
                _ => u32::from(f16::from_f32(want).to_bits()),
            };
            assert_eq!(have, want, "{into:?} row {r} value {c}");
        }
    }
}

/// Rows rounded to f16 first and then put in k32 order (a split step's gathered f16 x) equal the
/// k32 gather of the f32 rows with a null list, and the host's placement of every value.
#[test]
fn f16_rows_to_k32_equal_the_k32_gather_of_their_f32_rows() {
    let Some(g) = gpu("f16_rows_to_k32_equal_the_k32_gather_of_their_f32_rows") else {
        return;
    };
    let mut rng = Rng(0x6b32);
    let (n, width) = (7usize, 160usize);
    let x = rng.signed_vec(n * width, 40.0);
    let xb = g.up(&x);
    // Filled with 0xffff so every written value shows; f16 values two a u32.
    let (half, gathered, reordered) = (
        g.up(&vec![u32::MAX; n * width / 2]),
        g.up(&vec![u32::MAX; n * width / 2]),
        g.up(&vec![u32::MAX; n * width / 2]),
    );
    // SAFETY: x holds n rows of width f32; each output n * width f16.
    unsafe {
        g.k.rows_to_f16(&g.s, g.ptr(&xb), width, g.ptr(&half), n, width)
            .unwrap();
        g.k.gather_rows(
            &g.s,
            GatherInto::F16K32,
            g.ptr(&xb),
            0,
            n,
            width,
            g.ptr(&gathered),
        )
        .unwrap();
        g.k.rows_f16_to_k32(&g.s, g.ptr(&half), n, width, g.ptr(&reordered))
            .unwrap();
    }
    let (want, got) = (g.down(&gathered), g.down(&reordered));
    assert_eq!(got, want, "reordered f16 rows against the k32 gather");
    let at = |i: usize| (got[i / 2] >> (16 * (i % 2))) & 0xffff;
    for r in 0..n {
        for p in 0..width {
            let q = p % 32;
            let (st, h, t, e) = (q / 16, (q / 8) % 2, (q / 2) % 4, q % 2);
            let value = p - q + 8 * t + 2 * st + h + 4 * e;
            let want = u32::from(f16::from_f32(x[r * width + value]).to_bits());
            assert_eq!(at(r * width + p), want, "row {r} stored position {p}");
        }
    }
    // A width off the 32-value chunks is refused.
    // SAFETY: nothing is launched for a refused shape.
    let refused = unsafe {
        g.k.rows_f16_to_k32(&g.s, g.ptr(&half), n, 48, g.ptr(&reordered))
    };
    assert!(refused.is_err());
}
