//! GPU check of the merged one-row GEMV (`gemv_multi`): each segment's output must carry exactly
//! the bits of its own single-matrix launch (`fp8_gemv` / `bf16_gemv` with m = 1), at the decode
//! projections it merges (V4-Flash's q LoRA + latent KV in FP8, the compressor and indexer rows in
//! bf16, at TP=1 and TP=2 row counts) and odd small shapes; and stay near an f64 reference. The
//! FP8 cases run on the two-row kernels and again on the one-chunk kernels (the default,
//! `Kernels::set_fp8_one_chunk`), merged and single alike. Skips (passes with a SKIP line) where there is no GPU.

use dspark_kernels::launch::multi_gemv::{GemvSegment, SegmentWeights};
use dspark_kernels::{ActDtype, Bf16Gemv, Fp8Gemv, OutDtype};

mod common;
use common::{bf16_bits, bf16_gemv_ref, e4m3_codes, e8m0_scales_near_one, gpu, Gpu, Rng};

/// An FP8 matrix: e4m3 codes and E8M0 scales near 1.
fn fp8_matrix(rng: &mut Rng, rows: usize, k: usize) -> (Vec<u8>, Vec<u8>) {
    let w = e4m3_codes(rng, rows * k);
    let s = e8m0_scales_near_one(rng, rows.div_ceil(128) * k.div_ceil(128));
    (w, s)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn fp8_case(g: &Gpu, rng: &mut Rng, shapes: &[usize], k: usize) {
    let x = rng.signed_vec(k, 1.0);
    let xb = g.up(&x);
    let mats: Vec<_> = shapes.iter().map(|&r| fp8_matrix(rng, r, k)).collect();
    let bufs: Vec<_> = mats.iter().map(|(w, s)| (g.up(w), g.up(s))).collect();
    let merged: Vec<_> = shapes.iter().map(|&r| g.up(&vec![f32::NAN; r])).collect();
    let single: Vec<_> = shapes.iter().map(|&r| g.up(&vec![f32::NAN; r])).collect();
    let segs: Vec<GemvSegment> = shapes
        .iter()
        .zip(&bufs)
        .zip(&merged)
        .map(|((&rows, (w, s)), o)| GemvSegment {
            weight: g.ptr(w),
            scale: g.ptr(s),
            out: g.ptr(o),
            rows,
        })
        .collect();
    // SAFETY: every buffer above holds the shapes its segment / call names.
    unsafe {
        g.k.gemv_multi(&g.s, SegmentWeights::Fp8, &segs, g.ptr(&xb), k)
    }
    .unwrap();
    for (i, &rows) in shapes.iter().enumerate() {
        let a = Fp8Gemv {
            weight: g.ptr(&bufs[i].0),
            scale: g.ptr(&bufs[i].1),
            x: g.ptr(&xb),
            x_dtype: ActDtype::F32,
            out: g.ptr(&single[i]),
            out_dtype: OutDtype::F32,
            m: 1,
            n: rows,
            k,
        };
        // SAFETY: as above.
        unsafe { g.k.fp8_gemv(&g.s, &a) }.unwrap();
        let (got, want) = (g.down(&merged[i]), g.down(&single[i]));
        assert_eq!(
            bits(&got),
            bits(&want),
            "FP8 segment {i} [{rows}, {k}] of {shapes:?}"
        );
        // And near the f64 product (the scale of row r's tile times the decoded e4m3 weight).
        let (w, s) = &mats[i];
        let kb = k.div_ceil(128);
        let mut worst = 0f64;
        for r in 0..rows {
            let exact: f64 = (0..k)
                .map(|c| {
                    let scale = 2f64.powi(i32::from(s[r / 128 * kb + c / 128]) - 127);
                    dspark_kernels::formats::e4m3_to_f32(w[r * k + c]) as f64
                        * scale
                        * f64::from(x[c])
                })
                .sum();
            let mag: f64 = (0..k).map(|c| f64::from(x[c]).abs()).sum::<f64>() / k as f64;
            worst = worst.max((f64::from(got[r]) - exact).abs() / mag.max(1e-30));
        }
        assert!(worst < 1e-3, "FP8 segment {i}: {worst:e} from f64");
    }
}

fn bf16_case(g: &Gpu, rng: &mut Rng, shapes: &[usize], k: usize) {
    let x = rng.signed_vec(k, 1.0);
    let xb = g.up(&x);
    let mats: Vec<Vec<u16>> = shapes.iter().map(|&r| bf16_bits(rng, r * k)).collect();
    let bufs: Vec<_> = mats.iter().map(|w| g.up(w)).collect();
    let merged: Vec<_> = shapes.iter().map(|&r| g.up(&vec![f32::NAN; r])).collect();
    let single: Vec<_> = shapes.iter().map(|&r| g.up(&vec![f32::NAN; r])).collect();
    let segs: Vec<GemvSegment> = shapes
        .iter()
        .zip(&bufs)
        .zip(&merged)
        .map(|((&rows, w), o)| GemvSegment {
            weight: g.ptr(w),
            scale: 0,
            out: g.ptr(o),
            rows,
        })
        .collect();
    // SAFETY: every buffer above holds the shapes its segment / call names.
    unsafe {
        g.k.gemv_multi(&g.s, SegmentWeights::Bf16, &segs, g.ptr(&xb), k)
    }
    .unwrap();
    for (i, &rows) in shapes.iter().enumerate() {
        let a = Bf16Gemv {
            weight: g.ptr(&bufs[i]),
            x: g.ptr(&xb),
            out: g.ptr(&single[i]),
            m: 1,
            n: rows,
            k,
        };
        // SAFETY: as above.
        unsafe { g.k.bf16_gemv(&g.s, &a) }.unwrap();
        let (got, want) = (g.down(&merged[i]), g.down(&single[i]));
        assert_eq!(
            bits(&got),
            bits(&want),
            "bf16 segment {i} [{rows}, {k}] of {shapes:?}"
        );
        let exact = bf16_gemv_ref(&mats[i], &x, 1, rows, k);
        let worst = got
            .iter()
            .zip(&exact)
            .map(|(&a, &b)| (f64::from(a) - b).abs())
            .fold(0f64, f64::max);
        let mag = exact.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(
            worst / mag < 1e-5,
            "bf16 segment {i}: {:e} from f64",
            worst / mag
        );
    }
}

#[test]
fn merged_gemv_segments_equal_their_own_launches() {
    let Some(mut g) = gpu("merged_gemv_segments_equal_their_own_launches") else {
        return;
    };
    // The two-row kernels here (the one-chunk kernels, on by default, have the test below).
    g.k.set_fp8_one_chunk(false);
    let mut rng = Rng(0x0bad_5eed);
    // wq_a + wkv of V4-Flash at TP=1 and TP=2 (the latent row is not split), wq_b + the
    // indexer's wq_b, the shared expert's gate + up; odd small shapes.
    fp8_case(&g, &mut rng, &[1024, 512], 4096);
    fp8_case(&g, &mut rng, &[32768, 8192], 1024);
    fp8_case(&g, &mut rng, &[16384, 4096], 1024);
    fp8_case(&g, &mut rng, &[2048, 2048], 4096);
    fp8_case(&g, &mut rng, &[2, 130, 7, 256, 1, 128, 3, 64], 48);
    // A CSA layer's compressor + indexer rows (TP=1), an HCA layer's, odd ones.
    bf16_case(&g, &mut rng, &[1024, 1024, 256, 256, 64], 4096);
    bf16_case(&g, &mut rng, &[512, 512], 4096);
    bf16_case(&g, &mut rng, &[3, 5, 1, 9], 24);
}

#[test]
fn merged_gemv_on_the_one_chunk_kernels_equals_their_own_launches() {
    let Some(mut g) = gpu("merged_gemv_on_the_one_chunk_kernels_equals_their_own_launches") else {
        return;
    };
    g.k.set_fp8_one_chunk(true);
    let mut rng = Rng(0x1c4a_0001);
    fp8_case(&g, &mut rng, &[1024, 512], 4096);
    fp8_case(&g, &mut rng, &[16384, 4096], 1024);
    fp8_case(&g, &mut rng, &[2048, 2048], 4096);
    // Rows that leave a warp's four partly past the end; k = 48: one lane in 32 with a chunk.
    fp8_case(&g, &mut rng, &[2, 130, 7, 256, 1, 128, 3, 64], 48);
    // k = 8192: more chunks than 8 x 32 lanes, so the two-row kernels at their own split.
    fp8_case(&g, &mut rng, &[512, 256], 8192);
}

#[test]
fn merged_gemv_refuses_bad_tables() {
    let Some(g) = gpu("merged_gemv_refuses_bad_tables") else {
        return;
    };
    let b = g.up(&[0f32; 64]);
    let seg = GemvSegment {
        weight: g.ptr(&b),
        scale: 0,
        out: g.ptr(&b),
        rows: 2,
    };
    // SAFETY: every call is refused before launch (no scale for FP8; k not a multiple of 16).
    unsafe {
        assert!(g
            .k
            .gemv_multi(&g.s, SegmentWeights::Fp8, &[seg], g.ptr(&b), 16)
            .is_err());
        assert!(g
            .k
            .gemv_multi(&g.s, SegmentWeights::Bf16, &[seg], g.ptr(&b), 12)
            .is_err());
    }
}
