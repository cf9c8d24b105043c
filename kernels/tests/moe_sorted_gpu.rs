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
