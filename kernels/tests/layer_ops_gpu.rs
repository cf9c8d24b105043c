//! GPU checks of `layer_ops.cu` against host references written here from the server's code
//! (engine/model/{ops,rope,hyper,forward}.rs), at the real DeepSeek-V4-Flash sizes and tiny ones.
//! Elementwise steps are f32 as on the host; long reductions (sums of squares, dot products)
//! accumulate in f64 and round once, so the reference is the exactly rounded value and the
//! tolerance measures the kernel's own error (the host's sequential f32 order is not a parallel
//! one either). Skips (passes with a SKIP line) where there is no GPU.

use dspark_kernels::launch::layer_ops::{
    hc_head_workspace_floats, hc_mix_workspace_floats, hc_post_squares_fits, hc_pre_rows_fits,
    CopyRowsF32, DenseExpertsF32, HcHead, HcMix, HcPost, HcPostKernel, HcPreFinish, HcPreFused,
    HcPreKernel, HcSeam, RmsNormF32, RmsNormRopeF32, RopeF32, RouteF32, RouteKernel, RouterScoring,
    HC_SEAM_TOKENS_PER_CLUSTER, HC_WS_HEADER,
};
use dspark_kernels::reference::rel_err;
use dspark_kernels::Kernels;

mod common;
use common::{gpu, Rng};

const TOL: f64 = 1e-5;

fn rel(out: &[f32], reference: &[f32]) -> f64 {
    let o: Vec<f64> = out.iter().map(|&v| f64::from(v)).collect();
    let r: Vec<f64> = reference.iter().map(|&v| f64::from(v)).collect();
    rel_err(&o, &r)
}

/// Exactly rounded dot product.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum::<f64>() as f32
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

// ------------------------------------------------------------------------------------------
// RMSNorm (ops::rms_norm_rows)

fn rms_norm_ref(x: &[f32], dim: usize, w: Option<&[f32]>, eps: f32) -> Vec<f32> {
    let mut out = x.to_vec();
    for row in out.chunks_mut(dim) {
        let ms = dot(row, row) / dim as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        match w {
            Some(w) => row.iter_mut().zip(w).for_each(|(v, w)| *v = w * (*v * inv)),
            None => row.iter_mut().for_each(|v| *v *= inv),
        }
    }
    out
}

#[test]
fn rms_norm_matches_host() {
    let Some(g) = gpu("rms_norm_matches_host") else {
        return;
    };
    let mut rng = Rng(0x1234_5678);
    // (rows, dim, ld_x, ld_out, weighted, in place)
    let cases = [
        (1, 4096, 4096, 4096, true, false),
        (3, 1024, 1100, 1030, true, false),
        (2 * 64, 512, 512, 512, false, true),
        (5, 128, 136, 136, true, true),
        (4, 16, 16, 20, true, false),
        (2, 16, 16, 16, false, false),
    ];
    for (rows, dim, ld_x, ld_out, weighted, in_place) in cases {
        let x = rng.vec(rows * ld_x, -2.0, 2.0);
        let w = rng.vec(dim, 0.5, 1.5);
        let compact: Vec<f32> = x.chunks(ld_x).flat_map(|r| r[..dim].to_vec()).collect();
        let want = rms_norm_ref(&compact, dim, weighted.then_some(&w[..]), 1e-6);
        let xb = g.up(&x);
        let wb = g.up(&w);
        let ob = g.up(&vec![7.0f32; rows * ld_out]);
        let out_ptr = if in_place { g.ptr(&xb) } else { g.ptr(&ob) };
        let ld_out = if in_place { ld_x } else { ld_out };
        let a = RmsNormF32 {
            x: g.ptr(&xb),
            out: out_ptr,
            weight: if weighted { g.ptr(&wb) } else { 0 },
            rows,
            dim,
            ld_x,
            ld_out,
            eps: 1e-6,
        };
        // SAFETY: the buffers above hold these shapes.
        unsafe { g.k.rms_norm_f32(&g.s, &a) }.unwrap();
        let got_full = g.down(if in_place { &xb } else { &ob });
        let got: Vec<f32> = got_full
            .chunks(ld_out)
            .flat_map(|r| r[..dim].to_vec())
            .collect();
        let err = rel(&got, &want);
        assert!(err < TOL, "rows {rows} dim {dim}: rel err {err}");
        // Padding past dim is left alone.
        for (r, row) in got_full.chunks(ld_out).enumerate() {
            let pad_want: Vec<f32> = if in_place {
                x[r * ld_x + dim..(r + 1) * ld_x].to_vec()
            } else {
                vec![7.0; ld_out - dim]
            };
            assert_eq!(&row[dim..], &pad_want[..], "row {r} padding changed");
        }
    }
}

// ------------------------------------------------------------------------------------------
// RoPE (RopeTable::apply / apply_with)

#[allow(clippy::too_many_arguments)]
fn rope_ref(
    x: &mut [f32],
    positions: &[i32],
    inv_freq: &[f32],
    heads: usize,
    head_dim: usize,
    ld_token: usize,
    ld_head: usize,
    af: f32,
    inverse: bool,
) {
    let rd = inv_freq.len() * 2;
    for (t, &pos) in positions.iter().enumerate() {
        let p = pos as f32;
        let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
            .iter()
            .map(|&f| {
                let a = (f * p) as f64;
                ((a.cos() as f32) * af, (a.sin() as f32) * af)
            })
            .unzip();
        for h in 0..heads {
            let head = &mut x[t * ld_token + h * ld_head..t * ld_token + h * ld_head + head_dim];
            let rope = &mut head[head_dim - rd..];
            for j in 0..cos.len() {
                let (c, s) = (cos[j], if inverse { -sin[j] } else { sin[j] });
                let (x0, x1) = (rope[2 * j], rope[2 * j + 1]);
                rope[2 * j] = x0 * c + (-x1) * s;
                rope[2 * j + 1] = x1 * c + x0 * s;
            }
        }
    }
}

#[test]
fn rope_matches_host() {
    let Some(g) = gpu("rope_matches_host") else {
        return;
    };
    let mut rng = Rng(0x9e37_79b9);
    // (tokens, heads, head_dim, rope_dim, ld_head, ld_token, attention_factor, inverse)
    let cases = [
        (3, 64, 512, 64, 512, 64 * 512, 1.0f32, false),
        (2, 64, 512, 64, 512, 64 * 512, 1.0, true),
        (4, 1, 512, 64, 512, 600, 1.25, false),
        (2, 3, 16, 8, 20, 64, 0.9, false),
        (1, 2, 8, 8, 8, 16, 1.0, true),
    ];
    for (tokens, heads, head_dim, rope_dim, ld_head, ld_token, af, inverse) in cases {
        let half = rope_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / rope_dim as f32))
            .collect();
        let positions: Vec<i32> = (0..tokens)
            .map(|t| [0, 17, 100_003, 65_535, 4097][t % 5] + t as i32)
            .collect();
        let x = rng.vec(tokens * ld_token, -3.0, 3.0);
        let mut want = x.clone();
        rope_ref(
            &mut want, &positions, &inv_freq, heads, head_dim, ld_token, ld_head, af, inverse,
        );
        let xb = g.up(&x);
        let pb = g.up(&positions);
        let fb = g.up(&inv_freq);
        let a = RopeF32 {
            x: g.ptr(&xb),
            positions: g.ptr(&pb),
            inv_freq: g.ptr(&fb),
            tokens,
            heads,
            head_dim,
            rope_dim,
            ld_token,
            ld_head,
            attention_factor: af,
            inverse,
        };
        // SAFETY: the buffers above hold these shapes.
        unsafe { g.k.rope_f32(&g.s, &a) }.unwrap();
        let got = g.down(&xb);
        let err = rel(&got, &want);
        assert!(err < TOL, "rope {tokens}x{heads}x{head_dim}: rel err {err}");
    }
}

/// The fused norm + RoPE launch gives the bits of `rms_norm_f32` then `rope_f32`, and both match
/// the host references (the query heads' and the latent row's shapes, and odd small ones).
#[test]
fn rms_norm_rope_fused_equals_the_two_launches() {
    let Some(g) = gpu("rms_norm_rope_fused_equals_the_two_launches") else {
        return;
    };
    let mut rng = Rng(0x0005_eed0_fa11);
    // (tokens, heads, dim, rope_dim, weighted, attention_factor)
    let cases = [
        (1, 64, 512, 64, false, 1.0f32),
        (3, 32, 512, 64, false, 1.2),
        (2, 1, 512, 64, true, 1.0),
        (5, 3, 48, 16, true, 0.9),
        (1, 2, 8, 8, true, 1.0),
    ];
    for (tokens, heads, dim, rope_dim, weighted, af) in cases {
        let rows = tokens * heads;
        let inv_freq: Vec<f32> = (0..rope_dim / 2)
            .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / rope_dim as f32))
            .collect();
        let positions: Vec<i32> = (0..tokens)
            .map(|t| [3, 8191, 1_048_000][t % 3] + t as i32)
            .collect();
        let x = rng.vec(rows * dim, -2.0, 2.0);
        let w = rng.vec(dim, 0.5, 1.5);
        let (pb, fb, wb) = (g.up(&positions), g.up(&inv_freq), g.up(&w));
        let norm = |xp| RmsNormF32 {
            x: xp,
            out: xp,
            weight: if weighted { g.ptr(&wb) } else { 0 },
            rows,
            dim,
            ld_x: dim,
            ld_out: dim,
            eps: 1e-6,
        };
        let two = g.up(&x);
        let fused = g.up(&x);
        // SAFETY: the buffers above hold these shapes.
        unsafe {
            g.k.rms_norm_f32(&g.s, &norm(g.ptr(&two))).unwrap();
            g.k.rope_f32(
                &g.s,
                &RopeF32 {
                    x: g.ptr(&two),
                    positions: g.ptr(&pb),
                    inv_freq: g.ptr(&fb),
                    tokens,
                    heads,
                    head_dim: dim,
                    rope_dim,
                    ld_token: heads * dim,
                    ld_head: dim,
                    attention_factor: af,
                    inverse: false,
                },
            )
            .unwrap();
            g.k.rms_norm_rope_f32(
                &g.s,
                &RmsNormRopeF32 {
                    norm: norm(g.ptr(&fused)),
                    positions: g.ptr(&pb),
                    inv_freq: g.ptr(&fb),
                    heads,
                    rope_dim,
                    attention_factor: af,
                },
            )
            .unwrap();
        }
        let (a, b) = (g.down(&two), g.down(&fused));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&a),
            bits(&b),
            "{tokens}x{heads}x{dim}: fused bits differ"
        );
        let mut want = rms_norm_ref(&x, dim, weighted.then_some(&w[..]), 1e-6);
        rope_ref(
            &mut want,
            &positions,
            &inv_freq,
            heads,
            dim,
            heads * dim,
            dim,
            af,
            false,
        );
        let err = rel(&b, &want);
        assert!(err < TOL, "{tokens}x{heads}x{dim}: rel err {err}");
    }
    // Rows that are not whole tokens of heads are refused before launch.
    let xb = g.up(&[0f32; 64]);
    let bad = RmsNormRopeF32 {
        norm: RmsNormF32 {
            x: g.ptr(&xb),
            out: g.ptr(&xb),
            weight: 0,
            rows: 3,
            dim: 16,
            ld_x: 16,
            ld_out: 16,
            eps: 1e-6,
        },
        positions: g.ptr(&xb),
        inv_freq: g.ptr(&xb),
        heads: 2,
        rope_dim: 8,
        attention_factor: 1.0,
    };
    // SAFETY: refused by the shape check, nothing is launched.
    assert!(unsafe { g.k.rms_norm_rope_f32(&g.s, &bad) }.is_err());
}

// ------------------------------------------------------------------------------------------
// Hyper-connections (hyper.rs)

fn mix_ref(streams: &[f32], width: usize, fn_: &[f32], outs: usize, eps: f32) -> Vec<f32> {
    let mut out = Vec::new();
    for t in streams.chunks(width) {
        let inv = 1.0 / (dot(t, t) / width as f32 + eps).sqrt();
        let flat: Vec<f32> = t.iter().map(|v| v * inv).collect();
        for o in 0..outs {
            out.push(dot(&flat, &fn_[o * width..(o + 1) * width]));
        }
    }
    out
}

fn sinkhorn_ref(logits: &[f32], hc: usize, iters: usize, eps: f32) -> Vec<f32> {
    let mut m = vec![0f32; hc * hc];
    for r in 0..hc {
        let row = &logits[r * hc..(r + 1) * hc];
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        for c in 0..hc {
            m[r * hc + c] = exps[c] / sum + eps;
        }
    }
    let cols = |m: &mut [f32]| {
        for c in 0..hc {
            let s: f32 = (0..hc).map(|r| m[r * hc + c]).sum::<f32>() + eps;
            for r in 0..hc {
                m[r * hc + c] /= s;
            }
        }
    };
    let rows = |m: &mut [f32]| {
        for r in 0..hc {
            let s: f32 = m[r * hc..(r + 1) * hc].iter().sum::<f32>() + eps;
            for v in &mut m[r * hc..(r + 1) * hc] {
                *v /= s;
            }
        }
    };
    cols(&mut m);
    for _ in 1..iters {
        rows(&mut m);
        cols(&mut m);
    }
    m
}

/// `finish` of one token: pre[hc], post[hc], comb[hc * hc] concatenated.
fn finish_ref(
    m: &[f32],
    base: &[f32],
    scale: [f32; 3],
    hc: usize,
    iters: usize,
    eps: f32,
) -> Vec<f32> {
    let mut out: Vec<f32> = (0..hc)
        .map(|i| sigmoid(m[i] * scale[0] + base[i]) + eps)
        .collect();
    out.extend((0..hc).map(|i| 2.0 * sigmoid(m[hc + i] * scale[1] + base[hc + i])));
    let logits: Vec<f32> = (0..hc * hc)
        .map(|i| m[2 * hc + i] * scale[2] + base[2 * hc + i])
        .collect();
    out.extend(sinkhorn_ref(&logits, hc, iters, eps));
    out
}

fn collapse_ref(streams: &[f32], pre: &[f32], hidden: usize) -> Vec<f32> {
    let mut out = vec![0f32; hidden];
    for (k, p) in pre.iter().enumerate() {
        for (o, s) in out.iter_mut().zip(&streams[k * hidden..(k + 1) * hidden]) {
            *o += p * s;
        }
    }
    out
}

fn expand_ref(streams: &mut [f32], mix: &[f32], out: &[f32], hc: usize, hidden: usize) {
    let old = streams.to_vec();
    for k in 0..hc {
        let dst = &mut streams[k * hidden..(k + 1) * hidden];
        for (d, o) in dst.iter_mut().zip(out) {
            *d = mix[hc + k] * o;
        }
        for j in 0..hc {
            let c = mix[2 * hc + j * hc + k];
            for (d, s) in dst.iter_mut().zip(&old[j * hidden..(j + 1) * hidden]) {
                *d += c * s;
            }
        }
    }
}

/// (n, hc, hidden): the real width (hc 4 x 4096), several token chunks, tiny odd sizes.
const HC_CASES: [(usize, usize, usize); 5] = [
    (1, 4, 4096),
    (3, 4, 4096),
    (17, 4, 4096),
    (2, 3, 40),
    (1, 8, 16),
];

#[test]
fn hc_mix_matches_host() {
    let Some(g) = gpu("hc_mix_matches_host") else {
        return;
    };
    let mut rng = Rng(0xdead_beef);
    for (n, hc, hidden) in HC_CASES {
        let (width, outs) = (hc * hidden, (2 + hc) * hc);
        let streams = rng.vec(n * width, -4.0, 4.0);
        let fn_ = rng.vec(outs * width, -0.05, 0.05);
        let want = mix_ref(&streams, width, &fn_, outs, 1e-6);
        let sb = g.up(&streams);
        let fb = g.up(&fn_);
        let ob = g.up(&vec![f32::NAN; n * outs]);
        let wb = g.up(&vec![f32::NAN; hc_mix_workspace_floats(n, outs)]);
        let a = HcMix {
            streams: g.ptr(&sb),
            fn_: g.ptr(&fb),
            out: g.ptr(&ob),
            workspace: g.ptr(&wb),
            n,
            width,
            outs,
            norm_eps: 1e-6,
        };
        // SAFETY: the buffers above hold these shapes.
        unsafe { g.k.hc_mix_f32(&g.s, &a) }.unwrap();
        let err = rel(&g.down(&ob), &want);
        assert!(
            err < TOL,
            "hc_mix n {n} hc {hc} hidden {hidden}: rel err {err}"
        );
    }
}

#[test]
fn hc_pre_finish_and_post_match_host() {
    let Some(g) = gpu("hc_pre_finish_and_post_match_host") else {
        return;
    };
    let mut rng = Rng(0x5eed_0001);
    for (n, hc, hidden) in HC_CASES {
        for iters in [20usize, 1, 0] {
            let (width, outs) = (hc * hidden, (2 + hc) * hc);
            let proj = rng.vec(n * outs, -2.0, 2.0);
            let base = rng.vec(outs, -1.0, 1.0);
            let scale = [
                rng.uniform(0.5, 1.5),
                rng.uniform(0.5, 1.5),
                rng.uniform(0.5, 1.5),
            ];
            let streams = rng.vec(n * width, -4.0, 4.0);
            let layer_out = rng.vec(n * hidden, -1.0, 1.0);
            let mut want_mix = Vec::new();
            let mut want_x = Vec::new();
            let mut want_streams = streams.clone();
            for t in 0..n {
                let m = finish_ref(
                    &proj[t * outs..(t + 1) * outs],
                    &base,
                    scale,
                    hc,
                    iters,
                    1e-6,
                );
                want_x.extend(collapse_ref(
                    &streams[t * width..(t + 1) * width],
                    &m[..hc],
                    hidden,
                ));
                expand_ref(
                    &mut want_streams[t * width..(t + 1) * width],
                    &m,
                    &layer_out[t * hidden..(t + 1) * hidden],
                    hc,
                    hidden,
                );
                want_mix.extend(m);
            }
            let pb = g.up(&proj);
            let bb = g.up(&base);
            let sb = g.up(&streams);
            let xb = g.up(&vec![f32::NAN; n * hidden]);
            let mb = g.up(&vec![f32::NAN; n * outs]);
            let ob = g.up(&layer_out);
            let a = HcPreFinish {
                proj: g.ptr(&pb),
                base: g.ptr(&bb),
                scale,
                streams: g.ptr(&sb),
                x_out: g.ptr(&xb),
                mix_out: g.ptr(&mb),
                n,
                hc,
                hidden,
                sinkhorn_iters: iters,
                hc_eps: 1e-6,
            };
            // SAFETY: the buffers above hold these shapes.
            unsafe { g.k.hc_pre_finish_f32(&g.s, &a) }.unwrap();
            let got_mix = g.down(&mb);
            let err = rel(&got_mix, &want_mix);
            assert!(err < TOL, "mix n {n} hc {hc} iters {iters}: rel err {err}");
            let err = rel(&g.down(&xb), &want_x);
            assert!(
                err < TOL,
                "collapse n {n} hc {hc} iters {iters}: rel err {err}"
            );
            // hc_post from the host's mix so the check isolates the expand step; each kernel
            // on its own copy of the streams, the new one with the old one's bits.
            let hb = g.up(&want_mix);
            let mut old_bits = None;
            for kernel in [HcPostKernel::Old, HcPostKernel::New] {
                let got = post_on_copy(&g, &streams, &hb, &ob, (n, hc, hidden), kernel);
                let err = rel(&got, &want_streams);
                assert!(err < TOL, "expand {kernel:?} n {n} hc {hc}: rel err {err}");
                match &old_bits {
                    None => old_bits = Some(got),
                    Some(old) => assert_eq!(
                        differing_bits(&got, old),
                        0,
                        "expand n {n} hc {hc}: new bits differ from the old kernel's"
                    ),
                }
            }
        }
    }
}

/// `hc_post_f32` with `kernel` on a device copy of `streams` ([n, hc * hidden]) with the given
/// mix and sub-layer output buffers; returns the new streams.
fn post_on_copy(
    g: &common::Gpu,
    streams: &[f32],
    mix: &cudarc::driver::CudaSlice<f32>,
    out: &cudarc::driver::CudaSlice<f32>,
    (n, hc, hidden): (usize, usize, usize),
    kernel: HcPostKernel,
) -> Vec<f32> {
    let sb = g.up(streams);
    let p = HcPost {
        streams: g.ptr(&sb),
        mix: g.ptr(mix),
        out: g.ptr(out),
        squares: 0,
        n,
        hc,
        hidden,
        kernel,
    };
    // SAFETY: the caller's buffers hold these shapes; the streams are this call's copy.
    unsafe { g.k.hc_post_f32(&g.s, &p) }.unwrap();
    g.down(&sb)
}

/// Elements whose bits differ (NaNs included), without a copy of either side.
fn differing_bits(a: &[f32], b: &[f32]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}

/// (n, hc, hidden) of the pre side: [`HC_CASES`] plus the decode batches 2 (the largest the
/// one-launch kernel takes), 16 and 64 at the real width.
const HC_PRE_CASES: [(usize, usize, usize); 8] = [
    (1, 4, 4096),
    (2, 4, 4096),
    (3, 4, 4096),
    (16, 4, 4096),
    (17, 4, 4096),
    (64, 4, 4096),
    (2, 3, 40),
    (1, 8, 16),
];

/// The fused pre side (mix projections, finish, collapse, sub-layer norm) against the host's
/// chain of the same steps, with each kernel choice: all within the tolerance, the new ones
/// with the old one's bits, the workspace's counter header zero after every launch, and a
/// repeated launch on the same workspace (the single-launch kernel's counter reset) with the
/// same bits.
#[test]
fn hc_pre_fused_matches_host() {
    let Some(g) = gpu("hc_pre_fused_matches_host") else {
        return;
    };
    let mut rng = Rng(0xf00d_0002);
    for (n, hc, hidden) in HC_PRE_CASES {
        for (iters, weighted) in [(20usize, true), (1, false), (0, true)] {
            let (width, outs) = (hc * hidden, (2 + hc) * hc);
            let streams = rng.vec(n * width, -4.0, 4.0);
            let fn_ = rng.vec(outs * width, -0.05, 0.05);
            let base = rng.vec(outs, -1.0, 1.0);
            let scale = [
                rng.uniform(0.5, 1.5),
                rng.uniform(0.5, 1.5),
                rng.uniform(0.5, 1.5),
            ];
            let norm = rng.vec(hidden, 0.5, 1.5);
            let proj = mix_ref(&streams, width, &fn_, outs, 1e-6);
            let mut want_mix = Vec::new();
            let mut want_x = Vec::new();
            for t in 0..n {
                let m = finish_ref(
                    &proj[t * outs..(t + 1) * outs],
                    &base,
                    scale,
                    hc,
                    iters,
                    1e-6,
                );
                let x = collapse_ref(&streams[t * width..(t + 1) * width], &m[..hc], hidden);
                want_x.extend(rms_norm_ref(
                    &x,
                    hidden,
                    weighted.then_some(&norm[..]),
                    1e-6,
                ));
                want_mix.extend(m);
            }
            let sb = g.up(&streams);
            let fb = g.up(&fn_);
            let bb = g.up(&base);
            let nb = g.up(&norm);
            let mut old_bits: Option<(Vec<u32>, Vec<u32>)> = None;
            for kernel in [HcPreKernel::Old, HcPreKernel::Split, HcPreKernel::Fused] {
                let what = format!("{kernel:?} n {n} hc {hc} hidden {hidden} iters {iters}");
                let xb = g.up(&vec![f32::NAN; n * hidden]);
                let mb = g.up(&vec![f32::NAN; n * outs]);
                // The header zero (as the layer stack allocates it), the partials' room NaN.
                let mut ws = vec![f32::NAN; hc_mix_workspace_floats(n, outs)];
                ws[..HC_WS_HEADER].fill(0.0);
                let wb = g.up(&ws);
                let a = HcPreFused {
                    streams: g.ptr(&sb),
                    fn_: g.ptr(&fb),
                    base: g.ptr(&bb),
                    scale,
                    norm_weight: if weighted { g.ptr(&nb) } else { 0 },
                    x_out: g.ptr(&xb),
                    mix_out: g.ptr(&mb),
                    workspace: g.ptr(&wb),
                    n,
                    hc,
                    hidden,
                    sinkhorn_iters: iters,
                    hc_eps: 1e-6,
                    norm_eps: 1e-6,
                    kernel,
                };
                // SAFETY: the buffers above hold these shapes.
                unsafe { g.k.hc_pre_fused_f32(&g.s, &a) }.unwrap();
                let (got_mix, got_x) = (g.down(&mb), g.down(&xb));
                let err = rel(&got_mix, &want_mix);
                assert!(err < TOL, "{what}: mix rel err {err}");
                let err = rel(&got_x, &want_x);
                assert!(err < TOL, "{what}: x rel err {err}");
                let header = g.down(&wb)[..HC_WS_HEADER].to_vec();
                assert!(
                    header.iter().all(|v| v.to_bits() == 0),
                    "{what}: workspace header {header:?}"
                );
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
                let (mix_bits, x_bits) = (bits(&got_mix), bits(&got_x));
                // Again on the same workspace and outputs: the same bits.
                // SAFETY: as above.
                unsafe { g.k.hc_pre_fused_f32(&g.s, &a) }.unwrap();
                assert_eq!(bits(&g.down(&mb)), mix_bits, "{what}: repeated mix");
                assert_eq!(bits(&g.down(&xb)), x_bits, "{what}: repeated x");
                assert!(
                    g.down(&wb)[..HC_WS_HEADER].iter().all(|v| v.to_bits() == 0),
                    "{what}: workspace header after a repeat"
                );
                match &old_bits {
                    None => old_bits = Some((mix_bits, x_bits)),
                    Some((om, ox)) => {
                        assert!(
                            mix_bits == *om,
                            "{what}: mix bits differ from the old kernels"
                        );
                        assert!(x_bits == *ox, "{what}: x bits differ from the old kernels");
                    }
                }
            }
        }
    }
}

/// (n, hidden) of the seam: V4-Flash's width (clusters of 16) at 1, 2, 6 (a K = 5 verify step)
/// and 16 tokens, and widths
/// that take each other cluster size (32 and 64: one block, as the tiny model; 512: 2; 1,024:
/// 4; 2,048: 8).
const HC_SEAM_CASES: [(usize, usize); 9] = [
    (1, 4096),
    (2, 4096),
    (6, 4096),
    (16, 4096),
    (1, 32),
    (2, 64),
    (1, 512),
    (2, 1024),
    (1, 2048),
];

/// The seam (one site's post and the next site's pre in one launch) and the in-place Sinkhorn
/// after it, against the host's expand then mix projections, finish, collapse and norm: the
/// new streams with the post kernel's bits, everything within the tolerance, with and without a
/// post, with the norm weight or none, with the output mix in the input mix's rows; repeated
/// launches give the same bits; shapes it does not take are errors.
#[test]
fn hc_seam_matches_host() {
    let Some(g) = gpu("hc_seam_matches_host") else {
        return;
    };
    let mut rng = Rng(0x5ea3_0001);
    let (hc, outs, iters, eps) = (4usize, 24usize, 20usize, 1e-6f32);
    for (n, hidden) in HC_SEAM_CASES {
        let Some((cluster, _)) = g.k.hc_seam_cluster(hc, hidden) else {
            eprintln!("SKIP hc_seam hidden {hidden}: no cluster size here");
            continue;
        };
        let width = hc * hidden;
        for (post, weighted, in_place) in [
            (true, true, false),
            (false, true, false),
            (true, false, true),
        ] {
            let what = format!("seam n {n} hidden {hidden} (cluster {cluster}) post {post} weighted {weighted} in place {in_place}");
            let streams = rng.vec(n * width, -4.0, 4.0);
            let layer_out = rng.vec(n * hidden, -1.0, 1.0);
            // The ending site's mix as its pre leaves it after the Sinkhorn.
            let mut post_mix = Vec::new();
            for _ in 0..n {
                let proj = rng.vec(outs, -2.0, 2.0);
                let b = rng.vec(outs, -1.0, 1.0);
                post_mix.extend(finish_ref(&proj, &b, [1.0, 1.0, 1.0], hc, iters, eps));
            }
            let fn_ = rng.vec(outs * width, -0.05, 0.05);
            let base = rng.vec(outs, -1.0, 1.0);
            let scale = [
                rng.uniform(0.5, 1.5),
                rng.uniform(0.5, 1.5),
                rng.uniform(0.5, 1.5),
            ];
            let norm = rng.vec(hidden, 0.5, 1.5);
            let mut new_streams = streams.clone();
            if post {
                for t in 0..n {
                    expand_ref(
                        &mut new_streams[t * width..(t + 1) * width],
                        &post_mix[t * outs..(t + 1) * outs],
                        &layer_out[t * hidden..(t + 1) * hidden],
                        hc,
                        hidden,
                    );
                }
            }
            let proj = mix_ref(&new_streams, width, &fn_, outs, eps);
            let (mut want_mix, mut want_x) = (Vec::new(), Vec::new());
            for t in 0..n {
                let m = finish_ref(
                    &proj[t * outs..(t + 1) * outs],
                    &base,
                    scale,
                    hc,
                    iters,
                    eps,
                );
                let x = collapse_ref(&new_streams[t * width..(t + 1) * width], &m[..hc], hidden);
                want_x.extend(rms_norm_ref(&x, hidden, weighted.then_some(&norm[..]), eps));
                want_mix.extend(m);
            }
            let sb = g.up(&streams);
            let pmb = g.up(&post_mix);
            let ob = g.up(&layer_out);
            let fb = g.up(&fn_);
            let bb = g.up(&base);
            let nb = g.up(&norm);
            let xb = g.up(&vec![f32::NAN; n * hidden]);
            let mb = g.up(&vec![f32::NAN; n * outs]);
            let a = HcSeam {
                streams: g.ptr(&sb),
                post_mix: if post { g.ptr(&pmb) } else { 0 },
                out: g.ptr(&ob),
                fn_: g.ptr(&fb),
                base: g.ptr(&bb),
                scale,
                norm_weight: if weighted { g.ptr(&nb) } else { 0 },
                x_out: g.ptr(&xb),
                mix_out: if in_place { g.ptr(&pmb) } else { g.ptr(&mb) },
                n,
                hc,
                hidden,
                hc_eps: eps,
                norm_eps: eps,
                tokens_per_cluster: 0,
            };
            // SAFETY: the buffers above hold these shapes; nothing else runs on the stream.
            unsafe { g.k.hc_seam_f32(&g.s, &a) }.unwrap();
            let mix_buf = if in_place { &pmb } else { &mb };
            let logits = g.down(mix_buf);
            // Every number of tokens a cluster that runs here: the same bits as the choice.
            let (chosen_x, chosen_streams) = (g.down(&xb), g.down(&sb));
            for tk in HC_SEAM_TOKENS_PER_CLUSTER {
                if g.k.hc_seam_tokens_per_cluster(hc, hidden, n, tk).is_none() {
                    eprintln!("SKIP {what}: {tk} tokens a cluster do not run here");
                    continue;
                }
                let (sb2, pmb2) = (g.up(&streams), g.up(&post_mix));
                let (xb2, mb2) = (
                    g.up(&vec![f32::NAN; n * hidden]),
                    g.up(&vec![f32::NAN; n * outs]),
                );
                let a2 = HcSeam {
                    streams: g.ptr(&sb2),
                    post_mix: if post { g.ptr(&pmb2) } else { 0 },
                    x_out: g.ptr(&xb2),
                    mix_out: if in_place { g.ptr(&pmb2) } else { g.ptr(&mb2) },
                    tokens_per_cluster: tk,
                    ..a
                };
                // SAFETY: fresh copies of the same shapes.
                unsafe { g.k.hc_seam_f32(&g.s, &a2) }.unwrap();
                let mix2 = g.down(if in_place { &pmb2 } else { &mb2 });
                for (got, want, of) in [
                    (g.down(&xb2), &chosen_x, "x"),
                    (mix2, &logits, "mix"),
                    (g.down(&sb2), &chosen_streams, "streams"),
                ] {
                    assert_eq!(
                        differing_bits(&got, want),
                        0,
                        "{what}: {tk} tokens a cluster changed the {of} bits"
                    );
                }
            }
            // SAFETY: mix_buf holds n rows of 24.
            unsafe { g.k.hc_sinkhorn_f32(&g.s, a.mix_out, n, iters, eps) }.unwrap();
            let got_mix = g.down(mix_buf);
            let err = rel(&got_mix, &want_mix);
            assert!(err < TOL, "{what}: mix rel err {err}");
            for t in 0..n {
                let row = t * outs;
                assert_eq!(
                    differing_bits(&got_mix[row..row + 8], &logits[row..row + 8]),
                    0,
                    "{what}: the Sinkhorn changed pre / post"
                );
            }
            let got_x = g.down(&xb);
            let err = rel(&got_x, &want_x);
            assert!(err < TOL, "{what}: x rel err {err}");
            let got_streams = g.down(&sb);
            let err = rel(&got_streams, &new_streams);
            assert!(err < TOL, "{what}: streams rel err {err}");
            if post {
                // The post kernel on the same mix: the same bits.
                let mix2 = g.up(&post_mix);
                let posted =
                    post_on_copy(&g, &streams, &mix2, &ob, (n, hc, hidden), HcPostKernel::New);
                assert_eq!(
                    differing_bits(&got_streams, &posted),
                    0,
                    "{what}: new streams differ from the post kernel's bits"
                );
            } else {
                assert_eq!(
                    differing_bits(&got_streams, &streams),
                    0,
                    "{what}: streams written"
                );
                // Again on the same inputs (no post: nothing it read has changed): the same bits.
                // SAFETY: as above.
                unsafe { g.k.hc_seam_f32(&g.s, &a) }.unwrap();
                unsafe { g.k.hc_sinkhorn_f32(&g.s, a.mix_out, n, iters, eps) }.unwrap();
                assert_eq!(
                    differing_bits(&g.down(mix_buf), &got_mix),
                    0,
                    "{what}: repeated mix"
                );
                assert_eq!(
                    differing_bits(&g.down(&xb), &got_x),
                    0,
                    "{what}: repeated x"
                );
            }
        }
    }
    // Shapes the seam does not take.
    let buf = g.up(&vec![0f32; 4 * 24 * 4096]);
    let p = g.ptr(&buf);
    let ok = HcSeam {
        streams: p,
        post_mix: p,
        out: p,
        fn_: p,
        base: p,
        scale: [1.0; 3],
        norm_weight: 0,
        x_out: p,
        mix_out: p,
        n: 1,
        hc,
        hidden: 32,
        hc_eps: eps,
        norm_eps: eps,
        tokens_per_cluster: 0,
    };
    for (bad, why) in [
        (
            HcSeam {
                tokens_per_cluster: 3,
                ..ok
            },
            "3 tokens a cluster",
        ),
        (HcSeam { hc: 3, ..ok }, "hc 3"),
        (HcSeam { n: 17, ..ok }, "17 tokens"),
        (HcSeam { out: 0, ..ok }, "a post without its output"),
        (HcSeam { hidden: 48, ..ok }, "48 channels: no whole warps"),
        (
            HcSeam {
                scale: [f32::NAN, 1.0, 1.0],
                ..ok
            },
            "a NaN scale",
        ),
    ] {
        // SAFETY: rejected before any launch.
        let r = unsafe { g.k.hc_seam_f32(&g.s, &bad) };
        assert!(r.is_err(), "{why}: accepted");
    }
}

#[test]
fn hc_head_matches_host() {
    let Some(g) = gpu("hc_head_matches_host") else {
        return;
    };
    let mut rng = Rng(0x0bad_cafe);
    for (n, hc, hidden) in HC_CASES {
        let width = hc * hidden;
        let streams = rng.vec(n * width, -4.0, 4.0);
        let fn_ = rng.vec(hc * width, -0.05, 0.05);
        let base = rng.vec(hc, -1.0, 1.0);
        let scale = 0.75f32;
        let dots = mix_ref(&streams, width, &fn_, hc, 1e-6);
        let mut want = Vec::new();
        for t in 0..n {
            let pre: Vec<f32> = (0..hc)
                .map(|i| sigmoid(dots[t * hc + i] * scale + base[i]) + 1e-6)
                .collect();
            want.extend(collapse_ref(
                &streams[t * width..(t + 1) * width],
                &pre,
                hidden,
            ));
        }
        let sb = g.up(&streams);
        let fb = g.up(&fn_);
        let bb = g.up(&base);
        let xb = g.up(&vec![f32::NAN; n * hidden]);
        let wb = g.up(&vec![f32::NAN; hc_head_workspace_floats(n, hc)]);
        let a = HcHead {
            streams: g.ptr(&sb),
            fn_: g.ptr(&fb),
            base: g.ptr(&bb),
            scale,
            x_out: g.ptr(&xb),
            workspace: g.ptr(&wb),
            n,
            hc,
            hidden,
            hc_eps: 1e-6,
            norm_eps: 1e-6,
        };
        // SAFETY: the buffers above hold these shapes.
        unsafe { g.k.hc_head_f32(&g.s, &a) }.unwrap();
        let err = rel(&g.down(&xb), &want);
        assert!(
            err < TOL,
            "hc_head n {n} hc {hc} hidden {hidden}: rel err {err}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Router (forward.rs router_scores + route)

fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// (ids, weights) of one token; `chosen` None = top-k of score + bias.
fn route_ref(
    logits: &[f32],
    scoring: RouterScoring,
    bias: &[f32],
    chosen: Option<&[i32]>,
    k: usize,
    rsf: f32,
) -> (Vec<i32>, Vec<f32>) {
    let s: Vec<f32> = logits
        .iter()
        .map(|&v| match scoring {
            RouterScoring::SqrtSoftplus => softplus(v).sqrt(),
            RouterScoring::Sigmoid => sigmoid(v),
        })
        .collect();
    let chosen: Vec<usize> = match chosen {
        Some(c) => c.iter().map(|&c| c as usize).collect(),
        None => {
            let biased: Vec<f32> = s.iter().zip(bias).map(|(a, b)| a + b).collect();
            let mut idx: Vec<usize> = (0..s.len()).collect();
            idx.sort_by(|&a, &b| biased[b].total_cmp(&biased[a]).then(a.cmp(&b)));
            // The test inputs must be tie-free at the cut for the ids to be well defined.
            assert!(biased[idx[k - 1]] != biased[idx[k]], "tie at the top-k cut");
            idx.truncate(k);
            idx
        }
    };
    let sum: f32 = chosen.iter().map(|&c| s[c]).sum::<f32>() + 1e-20;
    (
        chosen.iter().map(|&c| c as i32).collect(),
        chosen.iter().map(|&c| s[c] / sum * rsf).collect(),
    )
}

/// One router launch on the GPU: `logits` [n, experts], `bias` (None: no bias), a hash layer's
/// `table` [vocab, k] and `token_ids` (None: a top-k layer); the ids and weights it writes.
struct RouteCall<'a> {
    logits: &'a [f32],
    scoring: RouterScoring,
    bias: Option<&'a [f32]>,
    hash: Option<(&'a [i32], &'a [i32], usize)>,
    experts: usize,
    k: usize,
    scale: f32,
}

fn run_route(g: &common::Gpu, c: &RouteCall) -> (Vec<i32>, Vec<f32>) {
    let n = c.logits.len() / c.experts;
    let lb = g.up(c.logits);
    let bb = g.up(c.bias.unwrap_or(&[0.0]));
    let (table, ids, vocab) = c.hash.unwrap_or((&[0], &[0], 0));
    let (tb, ib) = (g.up(table), g.up(ids));
    let oi = g.up(&vec![-7i32; n * c.k]);
    let ow = g.up(&vec![f32::NAN; n * c.k]);
    let a = RouteF32 {
        logits: g.ptr(&lb),
        scoring: c.scoring,
        bias: if c.bias.is_some() { g.ptr(&bb) } else { 0 },
        hash_table: if c.hash.is_some() { g.ptr(&tb) } else { 0 },
        token_ids: g.ptr(&ib),
        vocab,
        n,
        experts: c.experts,
        k: c.k,
        routed_scaling_factor: c.scale,
        out_ids: g.ptr(&oi),
        out_weights: g.ptr(&ow),
    };
    // SAFETY: the buffers above hold these shapes.
    unsafe { g.k.route_f32(&g.s, &a) }.unwrap();
    (g.down(&oi), g.down(&ow))
}

#[test]
fn route_matches_host() {
    let Some(mut g) = gpu("route_matches_host") else {
        return;
    };
    for kernel in [RouteKernel::Block, RouteKernel::Warp] {
        g.k.set_route_kernel_choice(kernel);
        route_matches_host_on(&g, kernel);
    }
}

fn route_matches_host_on(g: &common::Gpu, kernel: RouteKernel) {
    let mut rng = Rng(0x7070_7070);
    // (n, experts, k, scoring, with bias, hash vocab)
    let cases = [
        (1, 256, 6, RouterScoring::SqrtSoftplus, true, None),
        (5, 256, 6, RouterScoring::SqrtSoftplus, true, None),
        (3, 256, 6, RouterScoring::Sigmoid, false, None),
        (4, 8, 2, RouterScoring::SqrtSoftplus, true, None),
        (
            3,
            256,
            6,
            RouterScoring::SqrtSoftplus,
            false,
            Some(1000usize),
        ),
        (2, 8, 2, RouterScoring::Sigmoid, false, Some(50)),
    ];
    for (n, experts, k, scoring, with_bias, hash) in cases {
        // sqrt(softplus): values past softplus's threshold of 20 included. Sigmoid: a range where
        // it does not saturate to 1.0 in f32 (which would tie the scores).
        let logits = match scoring {
            RouterScoring::SqrtSoftplus => rng.vec(n * experts, -6.0, 24.0),
            RouterScoring::Sigmoid => rng.vec(n * experts, -4.0, 4.0),
        };
        let bias = if with_bias {
            rng.vec(experts, -0.5, 0.5)
        } else {
            vec![0.0; experts]
        };
        let vocab = hash.unwrap_or(0);
        let table: Vec<i32> = (0..vocab * k).map(|_| rng.below(experts) as i32).collect();
        let token_ids: Vec<i32> = (0..n).map(|_| rng.below(vocab.max(1)) as i32).collect();
        let mut want_ids = Vec::new();
        let mut want_w = Vec::new();
        for t in 0..n {
            let chosen = hash.map(|_| {
                let id = token_ids[t] as usize;
                &table[id * k..(id + 1) * k]
            });
            let (ids, w) = route_ref(
                &logits[t * experts..(t + 1) * experts],
                scoring,
                &bias,
                chosen,
                k,
                2.5,
            );
            want_ids.extend(ids);
            want_w.extend(w);
        }
        let (got_ids, got_w) = run_route(
            g,
            &RouteCall {
                logits: &logits,
                scoring,
                bias: with_bias.then_some(&bias[..]),
                hash: hash.map(|vocab| (&table[..], &token_ids[..], vocab)),
                experts,
                k,
                scale: 2.5,
            },
        );
        assert_eq!(
            got_ids, want_ids,
            "{kernel:?}: route ids n {n} experts {experts} hash {hash:?}"
        );
        let err = rel(&got_w, &want_w);
        assert!(
            err < TOL,
            "{kernel:?}: route weights n {n} experts {experts}: rel err {err}"
        );
    }
}

#[test]
fn route_bad_token_id_gives_empty_slots() {
    let Some(mut g) = gpu("route_bad_token_id_gives_empty_slots") else {
        return;
    };
    for kernel in [RouteKernel::Block, RouteKernel::Warp] {
        g.k.set_route_kernel_choice(kernel);
        route_bad_token_id_on(&g);
    }
}

fn route_bad_token_id_on(g: &common::Gpu) {
    let (experts, k, vocab) = (8usize, 2usize, 4usize);
    let logits = vec![0.5f32; experts];
    // Row 1 of the table names an expert out of range.
    let table = vec![0i32, 1, 9, 2, 3, 4, 5, 6];
    for (id, want) in [(7i32, [-1, -1]), (1, [-1, 2])] {
        let (ids, w) = run_route(
            g,
            &RouteCall {
                logits: &logits,
                scoring: RouterScoring::Sigmoid,
                bias: None,
                hash: Some((&table, &[id], vocab)),
                experts,
                k,
                scale: 1.0,
            },
        );
        assert_eq!(ids, want);
        for (wi, idi) in w.iter().zip(want) {
            if idi < 0 {
                assert_eq!(*wi, 0.0);
            } else {
                assert!(wi.is_finite() && *wi > 0.0);
            }
        }
    }
}

/// The one-warp router against the block router, bit for bit: ids and weights, on logits with
/// ties at the cut (values on a coarse grid), a NaN, both scorings, with and without bias, expert
/// counts around a warp's multiples and past the warp kernel's 256 (which then take the block
/// kernel), hash layers with ids and table entries out of range, 1 to 300 tokens.
#[test]
fn route_warp_equals_route_block() {
    let Some(mut g) = gpu("route_warp_equals_route_block") else {
        return;
    };
    let mut rng = Rng(0x5eed_0b10);
    // (n, experts, k, hash vocab)
    let cases = [
        (1, 256, 6, None),
        (16, 256, 6, None),
        (300, 256, 8, None),
        (7, 1, 1, None),
        (5, 31, 16, None),
        (5, 33, 3, None),
        (9, 100, 6, None),
        (4, 255, 16, None),
        (3, 257, 6, None),
        (2, 1024, 16, None),
        (6, 256, 6, Some(40usize)),
        (3, 8, 2, Some(5)),
    ];
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (i, (n, experts, k, hash)) in cases.into_iter().enumerate() {
        for scoring in [RouterScoring::SqrtSoftplus, RouterScoring::Sigmoid] {
            for with_bias in [false, true] {
                // A grid of 0.25 from -6 to 24: many equal scores, so the cut falls on ties.
                let mut logits: Vec<f32> = (0..n * experts)
                    .map(|_| (rng.below(121) as f32) * 0.25 - 6.0)
                    .collect();
                if i % 3 == 1 {
                    logits[rng.below(n * experts)] = f32::NAN;
                }
                let bias: Vec<f32> = (0..experts)
                    .map(|_| (rng.below(5) as f32) * 0.125 - 0.25)
                    .collect();
                let vocab = hash.unwrap_or(0);
                let table: Vec<i32> = (0..vocab.max(1) * k)
                    .map(|_| rng.below(experts + 3) as i32 - 1)
                    .collect();
                let token_ids: Vec<i32> = (0..n).map(|_| rng.below(vocab + 3) as i32 - 1).collect();
                let call = RouteCall {
                    logits: &logits,
                    scoring,
                    bias: with_bias.then_some(&bias[..]),
                    hash: hash.map(|vocab| (&table[..], &token_ids[..], vocab)),
                    experts,
                    k,
                    scale: 1.5,
                };
                let mut outs = Vec::new();
                for kernel in [RouteKernel::Block, RouteKernel::Warp] {
                    g.k.set_route_kernel_choice(kernel);
                    let (ids, w) = run_route(&g, &call);
                    outs.push((ids, bits(&w)));
                }
                assert_eq!(
                    outs[0], outs[1],
                    "n {n} experts {experts} k {k} hash {hash:?} {scoring:?} bias {with_bias}: \
                     the warp router differs from the block router"
                );
            }
        }
    }
    g.k.set_route_kernel_choice(RouteKernel::Block);
}

// ------------------------------------------------------------------------------------------
// Dense SwiGLU experts

#[allow(clippy::too_many_arguments)]
fn dense_ref(
    w1: &[f32],
    w3: &[f32],
    w2: &[f32],
    x: &[f32],
    ids: &[i32],
    weights: &[f32],
    n: usize,
    k: usize,
    experts: usize,
    hidden: usize,
    inter: usize,
    limit: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; n * hidden];
    for t in 0..n {
        let xr = &x[t * hidden..(t + 1) * hidden];
        for j in 0..k {
            let e = ids[t * k + j];
            if e < 0 || e as usize >= experts {
                continue;
            }
            let e = e as usize;
            let a: Vec<f32> = (0..inter)
                .map(|r| {
                    let row = (e * inter + r) * hidden;
                    let gt = dot(&w1[row..row + hidden], xr).min(limit);
                    let u = dot(&w3[row..row + hidden], xr).clamp(-limit, limit);
                    gt / (1.0 + (-gt).exp()) * u
                })
                .collect();
            for c in 0..hidden {
                let row = (e * hidden + c) * inter;
                let y = dot(&w2[row..row + inter], &a);
                out[t * hidden + c] += weights[t * k + j] * y;
            }
        }
    }
    out
}

#[test]
fn dense_experts_match_host() {
    let Some(g) = gpu("dense_experts_match_host") else {
        return;
    };
    let mut rng = Rng(0x4242_4242);
    // (n, k, experts, hidden, inter)
    for (n, k, experts, hidden, inter) in [(3, 2, 8, 64, 32), (2, 6, 16, 256, 96), (1, 1, 1, 16, 8)]
    {
        let w1 = rng.vec(experts * inter * hidden, -0.3, 0.3);
        let w3 = rng.vec(experts * inter * hidden, -0.3, 0.3);
        let w2 = rng.vec(experts * hidden * inter, -0.3, 0.3);
        let x = rng.vec(n * hidden, -2.0, 2.0);
        let mut ids: Vec<i32> = (0..n * k).map(|_| rng.below(experts) as i32).collect();
        // Out-of-range ids are skipped (not read).
        if n * k > 2 {
            ids[1] = -1;
            ids[2] = experts as i32;
        }
        let weights = rng.vec(n * k, 0.1, 1.0);
        // A small limit so the clipping is exercised.
        let limit = 1.5f32;
        let want = dense_ref(
            &w1, &w3, &w2, &x, &ids, &weights, n, k, experts, hidden, inter, limit,
        );
        let b1 = g.up(&w1);
        let b3 = g.up(&w3);
        let b2 = g.up(&w2);
        let bx = g.up(&x);
        let bi = g.up(&ids);
        let bw = g.up(&weights);
        let bh = g.up(&vec![f32::NAN; n * k * inter]);
        let bo = g.up(&vec![f32::NAN; n * hidden]);
        let a = DenseExpertsF32 {
            w1: g.ptr(&b1),
            w3: g.ptr(&b3),
            w2: g.ptr(&b2),
            x: g.ptr(&bx),
            ids: g.ptr(&bi),
            weights: g.ptr(&bw),
            h_scratch: g.ptr(&bh),
            out: g.ptr(&bo),
            n,
            k,
            experts,
            hidden,
            inter,
            limit,
        };
        // SAFETY: the buffers above hold these shapes.
        unsafe { g.k.dense_experts_f32(&g.s, &a) }.unwrap();
        let err = rel(&g.down(&bo), &want);
        assert!(
            err < TOL,
            "dense experts n {n} k {k} hidden {hidden}: rel err {err}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// scale, copy_rows

#[test]
fn scale_and_copy_rows_are_exact() {
    let Some(g) = gpu("scale_and_copy_rows_are_exact") else {
        return;
    };
    let mut rng = Rng(0x1111_2222);
    let x = rng.vec(100_003, -5.0, 5.0);
    let xb = g.up(&x);
    // SAFETY: xb holds x.len() f32.
    unsafe { g.k.scale_f32(&g.s, g.ptr(&xb), x.len(), 0.375) }.unwrap();
    let want: Vec<f32> = x.iter().map(|v| v * 0.375).collect();
    assert_eq!(g.down(&xb), want);

    // Regroup 8 heads of 512 from a [4, 64 * 512] buffer into [4 * 8, 512].
    let (tokens, heads, hd) = (4usize, 8usize, 512usize);
    let src = rng.vec(tokens * 64 * hd, -1.0, 1.0);
    let sb = g.up(&src);
    let db = g.up(&vec![f32::NAN; tokens * heads * hd]);
    for t in 0..tokens {
        let a = CopyRowsF32 {
            src: g.ptr(&sb) + (t * 64 * hd * 4) as u64,
            ld_src: hd,
            dst: g.ptr(&db) + (t * heads * hd * 4) as u64,
            ld_dst: hd,
            rows: heads,
            width: hd,
        };
        // SAFETY: both ranges lie inside their buffers.
        unsafe { g.k.copy_rows_f32(&g.s, &a) }.unwrap();
    }
    let want: Vec<f32> = (0..tokens)
        .flat_map(|t| src[t * 64 * hd..t * 64 * hd + heads * hd].to_vec())
        .collect();
    assert_eq!(g.down(&db), want);
    // Strided on both sides, width below the strides.
    let db2 = g.up(&vec![9.0f32; 6 * 40]);
    let a = CopyRowsF32 {
        src: g.ptr(&sb),
        ld_src: 33,
        dst: g.ptr(&db2),
        ld_dst: 40,
        rows: 6,
        width: 31,
    };
    // SAFETY: both ranges lie inside their buffers.
    unsafe { g.k.copy_rows_f32(&g.s, &a) }.unwrap();
    let got = g.down(&db2);
    for r in 0..6 {
        assert_eq!(&got[r * 40..r * 40 + 31], &src[r * 33..r * 33 + 31]);
        assert!(got[r * 40 + 31..(r + 1) * 40].iter().all(|&v| v == 9.0));
    }
}

/// Time per hyper-connection pre side at DeepSeek-V4-Flash's width with each kernel choice
/// (printed, not asserted: shared GPUs vary). Wall time over back-to-back launches (so the
/// launch gaps the single-launch path removes count), the projection weights rotating over
/// copies totalling > 64 MB so they come from HBM as in a decode step (86 sites).
#[test]
fn hc_pre_time() {
    let Some(g) = gpu("hc_pre_time") else {
        return;
    };
    let mut rng = Rng(0x7173);
    let (hc, hidden, iters) = (4usize, 4096usize, 20usize);
    let (width, outs) = (hc * hidden, (2 + hc) * hc);
    let sets = 48;
    let fns: Vec<_> = (0..sets)
        .map(|_| g.up(&rng.vec(outs * width, -0.05, 0.05)))
        .collect();
    let base = g.up(&rng.vec(outs, -1.0, 1.0));
    let norm = g.up(&rng.vec(hidden, 0.5, 1.5));
    for n in [1usize, 2, 4, 16, 64] {
        let sb = g.up(&rng.vec(n * width, -4.0, 4.0));
        let xb = g.up(&vec![0f32; n * hidden]);
        let mb = g.up(&vec![0f32; n * outs]);
        let wb = g.up(&vec![0f32; hc_mix_workspace_floats(n, outs)]);
        let mut line = format!("hc_pre n={n:2}:");
        for kernel in [HcPreKernel::Old, HcPreKernel::Split, HcPreKernel::Fused] {
            let call = |f: usize| HcPreFused {
                streams: g.ptr(&sb),
                fn_: g.ptr(&fns[f % sets]),
                base: g.ptr(&base),
                scale: [0.7, 0.9, 1.1],
                norm_weight: g.ptr(&norm),
                x_out: g.ptr(&xb),
                mix_out: g.ptr(&mb),
                workspace: g.ptr(&wb),
                n,
                hc,
                hidden,
                sinkhorn_iters: iters,
                hc_eps: 1e-6,
                norm_eps: 1e-6,
                kernel,
            };
            let reps = 400;
            // SAFETY (all launches below): the buffers hold the shapes in each call.
            unsafe { g.k.hc_pre_fused_f32(&g.s, &call(0)) }.unwrap();
            g.s.synchronize().unwrap();
            let t0 = std::time::Instant::now();
            for i in 0..reps {
                unsafe { g.k.hc_pre_fused_f32(&g.s, &call(i)) }.unwrap();
            }
            g.s.synchronize().unwrap();
            let us = t0.elapsed().as_secs_f64() / reps as f64 * 1e6;
            line += &format!("  {kernel:?} {us:6.2} us");
        }
        eprintln!("{line}");
    }
}

// ------------------------------------------------------------------------------------------
// Hyper-connections of GEMM steps (and the post everywhere): the new kernels against the old.

/// (n, hc, hidden, streams offset in floats): V4-Flash's GEMM-step chunk (8,192 rows) and decode
/// batches (1, 3, 16); generic hc (3 and 8: float4 channels; 2 x 30: a channel per thread);
/// rows the fused squares do not take (1,000: not whole 256-channel columns, so post then
/// squares); V4's row with the streams off 16-byte alignment (the scalar post, finish2).
const HC_ROWS_CASES: [(usize, usize, usize, usize); 9] = [
    (8192, 4, 4096, 0),
    (1, 4, 4096, 0),
    (3, 4, 4096, 0),
    (16, 4, 4096, 0),
    (37, 3, 40, 0),
    (9, 8, 16, 0),
    (5, 2, 30, 0),
    (20, 4, 1000, 0),
    (2, 4, 4096, 1),
];

/// Buffers of one hyper-connection site: streams (`off` floats into their buffer), a mix per
/// token as the pre side leaves it (host `finish_ref` of random logits), the sub-layer output,
/// the site's parameters and the norm weight.
struct HcSiteBufs {
    streams: Vec<f32>,
    mix: cudarc::driver::CudaSlice<f32>,
    out: cudarc::driver::CudaSlice<f32>,
    fn_: cudarc::driver::CudaSlice<f32>,
    base_host: Vec<f32>,
    base: cudarc::driver::CudaSlice<f32>,
    norm_host: Vec<f32>,
    norm: cudarc::driver::CudaSlice<f32>,
    scale: [f32; 3],
    dots: Vec<f32>,
}

const HC_ITERS: usize = 20;

fn hc_site_bufs(
    g: &common::Gpu,
    rng: &mut Rng,
    n: usize,
    hc: usize,
    hidden: usize,
    off: usize,
) -> HcSiteBufs {
    let (width, outs) = (hc * hidden, (2 + hc) * hc);
    let base_host = rng.vec(outs, -1.0, 1.0);
    let scale = [
        rng.uniform(0.5, 1.5),
        rng.uniform(0.5, 1.5),
        rng.uniform(0.5, 1.5),
    ];
    let logits = rng.vec(n * outs, -2.0, 2.0);
    let mix: Vec<f32> = logits
        .chunks(outs)
        .flat_map(|m| finish_ref(m, &base_host, scale, hc, HC_ITERS, 1e-6))
        .collect();
    let norm_host = rng.vec(hidden, 0.5, 1.5);
    HcSiteBufs {
        streams: rng.vec(n * width + off, -4.0, 4.0),
        mix: g.up(&mix),
        out: g.up(&rng.vec(n * hidden, -1.0, 1.0)),
        fn_: g.up(&rng.vec(outs * width, -0.05, 0.05)),
        base: g.up(&base_host),
        base_host,
        norm: g.up(&norm_host),
        norm_host,
        scale,
        // Raw dots as the GEMM writes them (a token's streams by a projection row).
        dots: rng.vec(n * outs, -20.0, 20.0),
    }
}

/// The post, the squares and the GEMM steps' finish with the new kernels give the old ones'
/// bits: `dsk_lo_hc_post2_f32` (and the scalar / generic-hc paths) as `dsk_lo_hc_post_f32`;
/// the squares (`dsk_lo_hc_squares_f32`, and written by `dsk_lo_hc_post_squares_f32` or by a
/// post followed by that kernel) as the chunk kernel's over one chunk; `dsk_lo_hc_pre_rows_f32`
/// as `dsk_lo_hc_pre_finish2_f32` from the same dots and squares, which for up to 64 rows also
/// match the host's finish, collapse and norm.
#[test]
fn hc_rows_kernels_equal_the_old_ones() {
    let Some(g) = gpu("hc_rows_kernels_equal_the_old_ones") else {
        return;
    };
    let mut rng = Rng(0x0c0f_fee5);
    for (n, hc, hidden, off) in HC_ROWS_CASES {
        let (width, outs) = (hc * hidden, (2 + hc) * hc);
        let what = format!("n {n} hc {hc} hidden {hidden} offset {off}");
        let b = hc_site_bufs(&g, &mut rng, n, hc, hidden, off);
        let ws_len = hc_mix_workspace_floats(n, outs);
        let sq_at = HC_WS_HEADER + n * outs;
        let at = |buf: &cudarc::driver::CudaSlice<f32>| g.ptr(buf) + (off * 4) as u64;
        let post = |sb: &cudarc::driver::CudaSlice<f32>, kernel, squares| HcPost {
            streams: at(sb),
            mix: g.ptr(&b.mix),
            out: g.ptr(&b.out),
            squares,
            n,
            hc,
            hidden,
            kernel,
        };
        let xb = g.up(&vec![f32::NAN; n * hidden]);
        let mb = g.up(&vec![f32::NAN; n * outs]);
        let pre = |sb: &cudarc::driver::CudaSlice<f32>,
                   wb: &cudarc::driver::CudaSlice<f32>,
                   kernel| HcPreFused {
            streams: at(sb),
            fn_: g.ptr(&b.fn_),
            base: g.ptr(&b.base),
            scale: b.scale,
            norm_weight: g.ptr(&b.norm),
            x_out: g.ptr(&xb),
            mix_out: g.ptr(&mb),
            workspace: g.ptr(wb),
            n,
            hc,
            hidden,
            sinkhorn_iters: HC_ITERS,
            hc_eps: 1e-6,
            norm_eps: 1e-6,
            kernel,
        };
        // The old flow: the old post, then the chunk kernel's squares (one chunk).
        let (want_streams, want_sq) = {
            let sb = g.up(&b.streams);
            let wb = g.up(&vec![f32::NAN; ws_len]);
            // SAFETY: the buffers hold the shapes the call names (so in every launch below).
            unsafe { g.k.hc_post_f32(&g.s, &post(&sb, HcPostKernel::Old, 0)) }.unwrap();
            // SAFETY: the buffers hold the shapes the call names.
            unsafe { g.k.hc_squares_f32(&g.s, &pre(&sb, &wb, HcPreKernel::Split)) }.unwrap();
            (g.down(&sb), g.down(&wb)[sq_at..sq_at + n].to_vec())
        };
        assert!(want_sq.iter().all(|v| v.is_finite() && *v > 0.0), "{what}");
        // The squares kernel alone (the first site of a step).
        {
            let sb = g.up(&want_streams);
            let wb = g.up(&vec![f32::NAN; ws_len]);
            // SAFETY: the buffers hold the shapes the call names.
            unsafe { g.k.hc_squares_f32(&g.s, &pre(&sb, &wb, HcPreKernel::Fused)) }.unwrap();
            let got = g.down(&wb)[sq_at..sq_at + n].to_vec();
            assert_eq!(differing_bits(&got, &want_sq), 0, "{what}: squares kernel");
        }
        // The new post, without and with the squares, and the old one with them.
        for (kernel, squares) in [
            (HcPostKernel::New, false),
            (HcPostKernel::New, true),
            (HcPostKernel::Old, true),
        ] {
            let sb = g.up(&b.streams);
            let wb = g.up(&vec![f32::NAN; ws_len]);
            let sq = if squares {
                Kernels::hc_given_squares(g.ptr(&wb), n, hc)
            } else {
                0
            };
            let a = post(&sb, kernel, sq);
            // SAFETY: the buffers hold the shapes the call names.
            unsafe { g.k.hc_post_f32(&g.s, &a) }.unwrap();
            let fused = squares && kernel == HcPostKernel::New && hc_post_squares_fits(&a);
            let tag = format!("{what}: post {kernel:?} squares {squares} (one launch {fused})");
            assert_eq!(
                differing_bits(&g.down(&sb), &want_streams),
                0,
                "{tag}: streams"
            );
            if squares {
                let got = g.down(&wb)[sq_at..sq_at + n].to_vec();
                assert_eq!(differing_bits(&got, &want_sq), 0, "{tag}: squares");
            }
        }
        // The finish from the dots and those squares: finish2, then the rows kernel.
        let mut ws = vec![f32::NAN; ws_len];
        ws[..HC_WS_HEADER].fill(0.0);
        ws[HC_WS_HEADER..sq_at].copy_from_slice(&b.dots);
        ws[sq_at..sq_at + n].copy_from_slice(&want_sq);
        let sb = g.up(&want_streams);
        let wb = g.up(&ws);
        let mut old: Option<(Vec<f32>, Vec<f32>)> = None;
        for kernel in [HcPreKernel::Split, HcPreKernel::Fused] {
            let a = pre(&sb, &wb, kernel);
            let rows = kernel == HcPreKernel::Fused && hc_pre_rows_fits(&a);
            let xn = g.up(&vec![f32::NAN; n * hidden]);
            let mn = g.up(&vec![f32::NAN; n * outs]);
            let a = HcPreFused {
                x_out: g.ptr(&xn),
                mix_out: g.ptr(&mn),
                ..a
            };
            // SAFETY: the buffers hold the shapes the call names.
            unsafe { g.k.hc_pre_from_dots_f32(&g.s, &a) }.unwrap();
            let (x, m) = (g.down(&xn), g.down(&mn));
            let tag = format!("{what}: finish {kernel:?} (rows kernel {rows})");
            assert!(
                x.iter().chain(&m).all(|v| v.is_finite()),
                "{tag}: not finite"
            );
            match &old {
                None => old = Some((x, m)),
                Some((ox, om)) => {
                    assert_eq!(differing_bits(&m, om), 0, "{tag}: mix bits");
                    assert_eq!(differing_bits(&x, ox), 0, "{tag}: x bits");
                }
            }
        }
        if n <= 64 {
            // The host's finish, collapse and norm of the same dots and squares.
            let (x, m) = old.unwrap();
            let streams = &want_streams[off..];
            let (mut want_x, mut want_m) = (Vec::new(), Vec::new());
            for t in 0..n {
                let inv = 1.0 / (want_sq[t] / width as f32 + 1e-6).sqrt();
                let proj: Vec<f32> = b.dots[t * outs..(t + 1) * outs]
                    .iter()
                    .map(|d| d * inv)
                    .collect();
                let mt = finish_ref(&proj, &b.base_host, b.scale, hc, HC_ITERS, 1e-6);
                let xt = collapse_ref(&streams[t * width..(t + 1) * width], &mt[..hc], hidden);
                want_x.extend(rms_norm_ref(&xt, hidden, Some(&b.norm_host), 1e-6));
                want_m.extend(mt);
            }
            let err = rel(&m, &want_m);
            assert!(err < TOL, "{what}: mix rel err {err}");
            let err = rel(&x, &want_x);
            assert!(err < TOL, "{what}: x rel err {err}");
        }
    }
}

/// [`common::time_us`] queued behind a spin kernel, so the host's launch cost stays out (as in
/// a CUDA graph or a busy stream).
fn queued_us(g: &common::Gpu, reps: usize, f: &dyn Fn()) -> f64 {
    g.k.spin(&g.s, 20_000_000).unwrap();
    common::time_us(g, reps, f)
}

/// GPU microseconds per call of the hyper-connection kernels at V4-Flash's width, old against
/// new (printed, not asserted): at 8,192 rows (a GEMM step's chunk) the post, the post with the
/// next site's squares (old: the post, then the chunk kernel's squares launch), the squares
/// alone (a step's first site) and the finish from the dots; at 16 and 1 rows (decode) the
/// post. With the bytes each moves over its time, to set against a device copy (~4.15 TB/s on
/// an H200).
/// `cargo test --release -p dspark-kernels --test layer_ops_gpu hc_rows_timing_print -- --nocapture`
#[test]
fn hc_rows_timing_print() {
    let Some(g) = gpu("hc_rows_timing_print") else {
        return;
    };
    let mut rng = Rng(0x7173_0002);
    let (hc, hidden) = (4usize, 4096usize);
    let (width, outs) = (hc * hidden, (2 + hc) * hc);
    for n in [8192usize, 16, 1] {
        let b = hc_site_bufs(&g, &mut rng, n, hc, hidden, 0);
        let sb = g.up(&b.streams);
        let mut ws = vec![0f32; hc_mix_workspace_floats(n, outs)];
        ws[HC_WS_HEADER..HC_WS_HEADER + n * outs].copy_from_slice(&b.dots);
        let wb = g.up(&ws);
        let xb = g.up(&vec![0f32; n * hidden]);
        let mb = g.up(&vec![0f32; n * outs]);
        let sq = Kernels::hc_given_squares(g.ptr(&wb), n, hc);
        let post = |kernel, squares| HcPost {
            streams: g.ptr(&sb),
            mix: g.ptr(&b.mix),
            out: g.ptr(&b.out),
            squares,
            n,
            hc,
            hidden,
            kernel,
        };
        let pre = |kernel| HcPreFused {
            streams: g.ptr(&sb),
            fn_: g.ptr(&b.fn_),
            base: g.ptr(&b.base),
            scale: b.scale,
            norm_weight: g.ptr(&b.norm),
            x_out: g.ptr(&xb),
            mix_out: g.ptr(&mb),
            workspace: g.ptr(&wb),
            n,
            hc,
            hidden,
            sinkhorn_iters: HC_ITERS,
            hc_eps: 1e-6,
            norm_eps: 1e-6,
            kernel,
        };
        let reps = if n >= 1024 { 20 } else { 200 };
        // The timed posts update the streams in place; they stay finite (the comb matrices are
        // about doubly stochastic).
        let post_us = |kernel| {
            queued_us(&g, reps, &|| {
                // SAFETY: the buffers hold the shapes the call names.
                unsafe { g.k.hc_post_f32(&g.s, &post(kernel, 0)) }.unwrap();
            })
        };
        let (old, new) = (post_us(HcPostKernel::Old), post_us(HcPostKernel::New));
        // Streams and output read, streams written.
        let gbs = |us: f64| (n * (2 * width + hidden) * 4) as f64 / us / 1e3;
        eprintln!(
            "hc n={n:5} post:               old {old:8.1} us ({:6.0} GB/s)  new {new:8.1} us ({:6.0} GB/s)",
            gbs(old),
            gbs(new)
        );
        if n < 1024 {
            continue;
        }
        let old = queued_us(&g, reps, &|| {
            // SAFETY: the buffers hold the shapes the call names.
            unsafe { g.k.hc_post_f32(&g.s, &post(HcPostKernel::Old, 0)) }.unwrap();
            // SAFETY: the buffers hold the shapes the call names.
            unsafe { g.k.hc_squares_f32(&g.s, &pre(HcPreKernel::Split)) }.unwrap();
        });
        let new = queued_us(&g, reps, &|| {
            // SAFETY: the buffers hold the shapes the call names.
            unsafe { g.k.hc_post_f32(&g.s, &post(HcPostKernel::New, sq)) }.unwrap();
        });
        eprintln!(
            "hc n={n:5} post + squares:     old {old:8.1} us (post, then squares)  new {new:8.1} us ({:6.0} GB/s)",
            gbs(new)
        );
        let squares_us = |kernel| {
            queued_us(&g, reps, &|| {
                // SAFETY: the buffers hold the shapes the call names.
                unsafe { g.k.hc_squares_f32(&g.s, &pre(kernel)) }.unwrap();
            })
        };
        let (old, new) = (
            squares_us(HcPreKernel::Split),
            squares_us(HcPreKernel::Fused),
        );
        let gbs = |us: f64| (n * width * 4) as f64 / us / 1e3;
        eprintln!(
            "hc n={n:5} squares:            old {old:8.1} us ({:6.0} GB/s)  new {new:8.1} us ({:6.0} GB/s)",
            gbs(old),
            gbs(new)
        );
        // Real squares for the finish (the timing loops above left the streams changed).
        // SAFETY: the buffers hold the shapes the call names.
        unsafe { g.k.hc_squares_f32(&g.s, &pre(HcPreKernel::Fused)) }.unwrap();
        let finish_us = |kernel| {
            queued_us(&g, reps, &|| {
                // SAFETY: the buffers hold the shapes the call names.
                unsafe { g.k.hc_pre_from_dots_f32(&g.s, &pre(kernel)) }.unwrap();
            })
        };
        let (old, new) = (finish_us(HcPreKernel::Split), finish_us(HcPreKernel::Fused));
        // Streams read, x written.
        let gbs = |us: f64| (n * (width + hidden) * 4) as f64 / us / 1e3;
        eprintln!(
            "hc n={n:5} finish from dots:   old {old:8.1} us ({:6.0} GB/s)  new {new:8.1} us ({:6.0} GB/s)",
            gbs(old),
            gbs(new)
        );
    }
}
