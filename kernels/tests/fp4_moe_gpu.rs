//! GPU checks of the FP4 routed-expert kernels (`fp4_moe.cu`, CUDA-core paths) against the f64
//! host reference, and of the v2 kernels (`MoePath::CudaCore`) against v1 (`CudaCoreV1`): v2
//! decodes the same f16 pairs and sums in the same order, so h, the weighted down rows and the
//! output must be bit-identical, including NaN/inf from the E8M0 codes 255 and 241..254.
//! Shapes: V4-Flash (hidden 4096, inter 2048 and the TP=2 shard 1024), tokens 1/3/16 with an
//! expert shared between tokens and an invalid id. The mma2 tensor-core kernels
//! (`MoePath::TensorCoreV2`) against the same f64 reference and bound (T = 1, 3, 16), against v2
//! (max difference printed) and against themselves with the activations staged the other way
//! (once a token or in every block: the same bits); `fp4_moe_timing_print` times
//! v2, the old tensor-core kernels and mma2. Skips (passes with a SKIP line) without a GPU.

use dspark_kernels::launch::{fp4_kernel_choice, Mma2Staging, FP4_MMA2_MIN_TOKENS};
use dspark_kernels::reference::{self, MoeShape};
use dspark_kernels::{Fp4Experts, Fp4MoeCall, MoePath, OutDtype};

use cudarc::driver::sys::CUevent_flags;

mod common;
use common::{gpu, Gpu, Rng};

/// TOL_F32 of kernel-check (docs/KERNELS.md): e2m1 x f32 products are exact, only the summation
/// order differs from the f64 reference.
const TOL_F32: f64 = 1e-4;

struct Layer {
    experts: usize,
    hidden: usize,
    inter: usize,
    w1: Vec<u8>,
    s1: Vec<u8>,
    w3: Vec<u8>,
    s3: Vec<u8>,
    w2: Vec<u8>,
    s2: Vec<u8>,
}

impl Layer {
    /// Random nibbles; scales 2^-3..2^1 (x in +-1 puts part of g/u past the clip limit), with
    /// `odd` codes planted at random (0 = 2^-127, 254, 255 = NaN).
    fn new(rng: &mut Rng, experts: usize, hidden: usize, inter: usize, odd: &[u8]) -> Self {
        let n = experts * hidden * inter;
        let mut bytes = |len: usize| (0..len).map(|_| rng.next() as u8).collect::<Vec<u8>>();
        let (w1, w3, w2) = (bytes(n / 2), bytes(n / 2), bytes(n / 2));
        let mut scales = |len: usize| {
            let mut s: Vec<u8> = (0..len).map(|_| 124 + rng.below(5) as u8).collect();
            for &code in odd.iter().cycle().take(odd.len() * 8) {
                let at = rng.below(len);
                s[at] = code;
            }
            s
        };
        let (s1, s3, s2) = (scales(n / 32), scales(n / 32), scales(n / 32));
        Self {
            experts,
            hidden,
            inter,
            w1,
            s1,
            w3,
            s3,
            w2,
            s2,
        }
    }
}

struct Outputs {
    h: Vec<f32>,
    partial: Vec<f32>,
    out: Vec<f32>,
}

fn run(g: &Gpu, l: &Layer, x: &[f32], ids: &[i32], weights: &[f32], path: MoePath) -> Outputs {
    run_adding(g, l, x, ids, weights, path, None)
}

/// [`run`] with `addend` (f32 `[tokens, hidden]`) summed into the output by the combine.
fn run_adding(
    g: &Gpu,
    l: &Layer,
    x: &[f32],
    ids: &[i32],
    weights: &[f32],
    path: MoePath,
    addend: Option<&[f32]>,
) -> Outputs {
    let (topk, tokens) = (ids.len() / (x.len() / l.hidden), x.len() / l.hidden);
    let (w1, s1, w3, s3, w2, s2) = (
        g.up(&l.w1),
        g.up(&l.s1),
        g.up(&l.w3),
        g.up(&l.s3),
        g.up(&l.w2),
        g.up(&l.s2),
    );
    let (xb, ib, wb) = (g.up(x), g.up(ids), g.up(weights));
    let hb = g.up(&vec![f32::NAN; ids.len() * l.inter]);
    let pb = g.up(&vec![f32::NAN; ids.len() * l.hidden]);
    let ob = g.up(&vec![f32::NAN; tokens * l.hidden]);
    let ab = addend.map(|a| g.up(a));
    let e = Fp4Experts {
        w1: g.ptr(&w1),
        s1: g.ptr(&s1),
        w3: g.ptr(&w3),
        s3: g.ptr(&s3),
        w2: g.ptr(&w2),
        s2: g.ptr(&s2),
        experts: l.experts,
        hidden: l.hidden,
        inter: l.inter,
    };
    let c = Fp4MoeCall {
        x: g.ptr(&xb),
        ids: g.ptr(&ib),
        weights: g.ptr(&wb),
        h: g.ptr(&hb),
        partial: g.ptr(&pb),
        out: g.ptr(&ob),
        out_dtype: OutDtype::F32,
        tokens,
        topk,
        swiglu_limit: 10.0,
        addend: ab.as_ref().map_or(0, |a| g.ptr(a)),
    };
    // SAFETY: every buffer holds the shapes in `e` and `c`; ids are below `experts` or invalid.
    unsafe { g.k.fp4_moe_path(&g.s, &e, &c, path) }.unwrap();
    Outputs {
        h: g.down(&hb),
        partial: g.down(&pb),
        out: g.down(&ob),
    }
}

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in got.iter().zip(want) {
        num += (f64::from(a) - b).powi(2);
        den += b * b;
    }
    (num / den.max(1e-300)).sqrt()
}

/// Ids of `tokens` x `topk` distinct experts per token; token 1 repeats token 0's first expert.
fn draw_ids(rng: &mut Rng, tokens: usize, topk: usize, experts: usize, bad_id: bool) -> Vec<i32> {
    assert!(
        topk <= experts,
        "{topk} distinct experts per token out of {experts} cannot be drawn"
    );
    let mut ids = Vec::with_capacity(tokens * topk);
    for t in 0..tokens {
        let mut row: Vec<i32> = Vec::new();
        if t == 1 {
            row.push(ids[0]);
        }
        while row.len() < topk {
            let e = rng.below(experts) as i32;
            if !row.contains(&e) {
                row.push(e);
            }
        }
        ids.extend(row);
    }
    if bad_id {
        ids[topk - 1] = -1;
    }
    ids
}

fn same_bits(a: &[f32], b: &[f32]) -> usize {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits() && !(x.is_nan() && y.is_nan()))
        .count()
}

fn case(g: &Gpu, rng: &mut Rng, l: &Layer, tokens: usize, bad_id: bool, check_ref: bool) {
    let topk = 6;
    let ids = draw_ids(rng, tokens, topk, l.experts, bad_id);
    let x = rng.signed_vec(tokens * l.hidden, 1.0);
    let weights = rng.vec(tokens * topk, 0.1, 0.9);
    let v1 = run(g, l, &x, &ids, &weights, MoePath::CudaCoreV1);
    let v2 = run(g, l, &x, &ids, &weights, MoePath::CudaCore);
    let auto = run(g, l, &x, &ids, &weights, MoePath::Auto);
    let name = format!(
        "E{} H{} I{} T{tokens}{}",
        l.experts,
        l.hidden,
        l.inter,
        if bad_id { " +invalid id" } else { "" }
    );
    assert_eq!(same_bits(&v1.h, &v2.h), 0, "{name}: h differs v1/v2");
    assert_eq!(
        same_bits(&v1.partial, &v2.partial),
        0,
        "{name}: weighted down rows differ v1/v2"
    );
    assert_eq!(same_bits(&v1.out, &v2.out), 0, "{name}: out differs v1/v2");
    let mma2_auto;
    let want_auto =
        match fp4_kernel_choice(std::env::var("DSPARK_FP4_KERNEL").ok().as_deref()).unwrap() {
            MoePath::CudaCoreV1 => &v1,
            // Every shape here fits mma2 (multiples of 256, allocations aligned).
            MoePath::Auto if tokens < FP4_MMA2_MIN_TOKENS => &v2,
            MoePath::TensorCoreV2 | MoePath::Auto => {
                mma2_auto = run(g, l, &x, &ids, &weights, MoePath::TensorCoreV2);
                &mma2_auto
            }
            _ => &v2,
        };
    assert_eq!(same_bits(&auto.out, &want_auto.out), 0, "{name}: Auto");
    // The combine's addend (the shared expert's output in the layer stack) gives the bits of
    // the separate f32 add it replaces.
    let addend = rng.signed_vec(tokens * l.hidden, 2.0);
    let added = run_adding(g, l, &x, &ids, &weights, MoePath::CudaCore, Some(&addend));
    let want_added: Vec<f32> = v2.out.iter().zip(&addend).map(|(a, b)| a + b).collect();
    assert_eq!(
        same_bits(&added.out, &want_added),
        0,
        "{name}: out + addend"
    );
    if !check_ref {
        let nan = v2.out.iter().filter(|v| v.is_nan()).count();
        eprintln!("{name}: v1 == v2 bitwise, {nan} NaN outputs");
        return;
    }
    let sh = MoeShape {
        experts: l.experts,
        hidden: l.hidden,
        inter: l.inter,
        topk,
    };
    let ex = reference::Fp4Experts {
        w1: &l.w1,
        s1: &l.s1,
        w3: &l.w3,
        s3: &l.s3,
        w2: &l.w2,
        s2: &l.s2,
    };
    let (rh, rout) = reference::fp4_moe(sh, &ex, &x, &ids, &weights, 10.0);
    let clipped = rh.iter().filter(|v| v.abs() > 5.0).count();
    let (eh, eo) = (rel_err(&v2.h, &rh), rel_err(&v2.out, &rout));
    eprintln!("{name}: v1 == v2 bitwise; rel err h {eh:.2e} out {eo:.2e} ({clipped} near clip)");
    assert!(clipped > 0, "{name}: clipping must be in play");
    assert!(eh < TOL_F32, "{name}: h rel err {eh:.3e}");
    assert!(eo < TOL_F32, "{name}: out rel err {eo:.3e}");
}

#[test]
fn fp4_moe_v2_matches_v1_bitwise_and_the_reference() {
    let Some(g) = gpu("fp4_moe_v2_matches_v1_bitwise_and_the_reference") else {
        return;
    };
    let mut rng = Rng(0xf40e_0002);
    for inter in [2048, 1024] {
        let l = Layer::new(&mut rng, 8, 4096, inter, &[]);
        case(&g, &mut rng, &l, 1, false, true);
        case(&g, &mut rng, &l, 3, true, true);
        // 16 tokens over 8 experts: every expert shared by several tokens (v1 == v2 only: the
        // f64 reference over 96 pairs is slow).
        case(&g, &mut rng, &l, 16, false, false);
    }
}

#[test]
fn fp4_moe_v2_matches_v1_on_extreme_scales() {
    let Some(g) = gpu("fp4_moe_v2_matches_v1_on_extreme_scales") else {
        return;
    };
    let mut rng = Rng(0xf40e_0003);
    // 8 experts: each token draws 6 distinct ones.
    let l = Layer::new(&mut rng, 8, 512, 256, &[0, 1, 240, 241, 254, 255]);
    case(&g, &mut rng, &l, 2, true, false);
    case(&g, &mut rng, &l, 5, false, false);
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
        .fold(0.0, f64::max)
}

/// mma2 on one case: against the f64 reference (TOL_F32), against v2 (printed) and against a
/// second run of itself with the activations staged the other way (`Mma2Staging`: once a token
/// or in every block), which must give the same bits (the same fragments, a fixed summation
/// order, no atomics).
fn mma2_case(g: &mut Gpu, rng: &mut Rng, l: &Layer, tokens: usize, bad_id: bool) {
    let topk = 6;
    let ids = draw_ids(rng, tokens, topk, l.experts, bad_id);
    let x = rng.signed_vec(tokens * l.hidden, 1.0);
    let weights = rng.vec(tokens * topk, 0.1, 0.9);
    let staging = g.k.mma2_staging();
    let other = match staging {
        Mma2Staging::Once => Mma2Staging::Block,
        Mma2Staging::Block => Mma2Staging::Once,
    };
    let m = run(g, l, &x, &ids, &weights, MoePath::TensorCoreV2);
    g.k.set_mma2_staging(other);
    let again = run(g, l, &x, &ids, &weights, MoePath::TensorCoreV2);
    g.k.set_mma2_staging(staging);
    let v2 = run(g, l, &x, &ids, &weights, MoePath::CudaCore);
    let name = format!(
        "mma2 E{} H{} I{} T{tokens}{}",
        l.experts,
        l.hidden,
        l.inter,
        if bad_id { " +invalid id" } else { "" }
    );
    assert_eq!(
        same_bits(&m.h, &again.h),
        0,
        "{name}: h differs between {staging:?} and {other:?} staging"
    );
    assert_eq!(
        same_bits(&m.partial, &again.partial),
        0,
        "{name}: partial differs between {staging:?} and {other:?} staging"
    );
    assert_eq!(
        same_bits(&m.out, &again.out),
        0,
        "{name}: out differs between {staging:?} and {other:?} staging"
    );
    for (p, &e) in ids.iter().enumerate() {
        if e < 0 {
            let h = &m.h[p * l.inter..(p + 1) * l.inter];
            let y = &m.partial[p * l.hidden..(p + 1) * l.hidden];
            assert!(
                h.iter().chain(y).all(|&v| v == 0.0),
                "{name}: invalid slot {p} not zero"
            );
        }
    }
    let sh = MoeShape {
        experts: l.experts,
        hidden: l.hidden,
        inter: l.inter,
        topk,
    };
    let ex = reference::Fp4Experts {
        w1: &l.w1,
        s1: &l.s1,
        w3: &l.w3,
        s3: &l.s3,
        w2: &l.w2,
        s2: &l.s2,
    };
    let (rh, rout) = reference::fp4_moe(sh, &ex, &x, &ids, &weights, 10.0);
    let clipped = rh.iter().filter(|v| v.abs() > 5.0).count();
    let (eh, eo) = (rel_err(&m.h, &rh), rel_err(&m.out, &rout));
    let (ev2h, ev2o) = (rel_err(&v2.h, &rh), rel_err(&v2.out, &rout));
    eprintln!(
        "{name}: rel err h {eh:.2e} out {eo:.2e} (v2 {ev2h:.2e} {ev2o:.2e}); vs v2 max |dh| {:.2e} \
         max |dout| {:.2e} (max |out| {:.2}); {clipped} near clip",
        max_abs_diff(&m.h, &v2.h),
        max_abs_diff(&m.out, &v2.out),
        v2.out.iter().fold(0.0f32, |a, v| a.max(v.abs())),
    );
    assert!(clipped > 0, "{name}: clipping must be in play");
    assert!(eh < TOL_F32, "{name}: h rel err {eh:.3e}");
    assert!(eo < TOL_F32, "{name}: out rel err {eo:.3e}");
}

#[test]
fn fp4_moe_mma2_matches_the_reference_and_v2() {
    let Some(mut g) = gpu("fp4_moe_mma2_matches_the_reference_and_v2") else {
        return;
    };
    let mut rng = Rng(0xf40e_0004);
    for inter in [2048, 1024] {
        let l = Layer::new(&mut rng, 8, 4096, inter, &[]);
        mma2_case(&mut g, &mut rng, &l, 1, false);
        mma2_case(&mut g, &mut rng, &l, 3, true);
        // 16 tokens over 8 experts: every expert shared by several tokens.
        mma2_case(&mut g, &mut rng, &l, 16, inter == 1024);
    }
    // Shapes mma2 does not take: an explicit request is refused before any launch (Auto runs v2
    // there).
    let e = Fp4Experts {
        w1: 16,
        s1: 16,
        w3: 16,
        s3: 16,
        w2: 16,
        s2: 16,
        experts: 8,
        hidden: 512,
        inter: 96,
    };
    let c = Fp4MoeCall {
        x: 16,
        ids: 16,
        weights: 16,
        h: 16,
        partial: 16,
        out: 16,
        out_dtype: OutDtype::F32,
        tokens: 1,
        topk: 6,
        swiglu_limit: 10.0,
        addend: 0,
    };
    assert!(!dspark_kernels::launch::moe_mma2_fits(&e));
    // SAFETY: refused by the shape check before anything is launched.
    let refused = unsafe { g.k.fp4_moe_path(&g.s, &e, &c, MoePath::TensorCoreV2) };
    assert!(refused.is_err(), "mma2 must refuse inter 96");
}

/// Bytes of one expert (w1, w3, w2 and their scales).
fn expert_bytes(hidden: usize, inter: usize) -> usize {
    3 * (hidden * inter / 2 + hidden * inter / 32)
}

/// v2, the old tensor-core kernels and mma2 at T = 1 to 16, inter 2048 and 1024: 200 calls back
/// to back between two events, behind a spin kernel, each call on other experts of a layer of
/// more than 512 MB (so weights come from memory, not the 60 MB L2). GB/s counts the distinct experts'
/// bytes each call must read. Prints only; run on the GPU with
/// `cargo test --release -p dspark-kernels --test fp4_moe_gpu fp4_moe_timing_print -- --nocapture`.
#[test]
fn fp4_moe_timing_print() {
    let Some(g) = gpu("fp4_moe_timing_print") else {
        return;
    };
    let (hidden, topk) = (4096usize, 6usize);
    // DSPARK_FP4_TIMING_{INTER,TOKENS,REPS} narrow the sweep (e.g. a few calls under ncu).
    let list = |var: &str, default: &[usize]| -> Vec<usize> {
        std::env::var(var)
            .ok()
            .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or_else(|| default.to_vec())
    };
    let reps = list("DSPARK_FP4_TIMING_REPS", &[200])
        .first()
        .copied()
        .unwrap_or(200)
        .max(1);
    let mut rng = Rng(0xf40e_0005);
    for inter in list("DSPARK_FP4_TIMING_INTER", &[2048, 1024]) {
        let experts = (512 << 20) / expert_bytes(hidden, inter) + 8;
        let n = experts * hidden * inter;
        let mut fill = |len: usize| -> Vec<u8> {
            let mut v = Vec::with_capacity(len + 8);
            while v.len() < len {
                v.extend_from_slice(&rng.next().to_le_bytes());
            }
            v.truncate(len);
            v
        };
        let (w1, w3, w2) = (fill(n / 2), fill(n / 2), fill(n / 2));
        let scales =
            |rng: &mut Rng| -> Vec<u8> { (0..n / 32).map(|_| 124 + rng.below(5) as u8).collect() };
        let (s1, s3, s2) = (scales(&mut rng), scales(&mut rng), scales(&mut rng));
        let dev = [&w1, &s1, &w3, &s3, &w2, &s2].map(|b| g.up(b));
        let e = Fp4Experts {
            w1: g.ptr(&dev[0]),
            s1: g.ptr(&dev[1]),
            w3: g.ptr(&dev[2]),
            s3: g.ptr(&dev[3]),
            w2: g.ptr(&dev[4]),
            s2: g.ptr(&dev[5]),
            experts,
            hidden,
            inter,
        };
        for tokens in list("DSPARK_FP4_TIMING_TOKENS", &[1, 2, 4, 6, 8, 16]) {
            // One id set per call, drawn as the router would (distinct per token).
            let sets: Vec<Vec<i32>> = (0..reps)
                .map(|_| draw_ids(&mut rng, tokens, topk, experts, false))
                .collect();
            let distinct: f64 = sets
                .iter()
                .map(|s| {
                    let mut d = s.clone();
                    d.sort_unstable();
                    d.dedup();
                    d.len() as f64
                })
                .sum::<f64>()
                / reps as f64;
            let ids = g.up(&sets.concat());
            let x = g.up(&rng.signed_vec(tokens * hidden, 1.0));
            let weights = g.up(&rng.vec(tokens * topk, 0.1, 0.9));
            let h = g.up(&vec![0f32; tokens * topk * inter]);
            let partial = g.up(&vec![0f32; tokens * topk * hidden]);
            let out = g.up(&vec![0f32; tokens * hidden]);
            let call = |i: usize| Fp4MoeCall {
                x: g.ptr(&x),
                ids: g.ptr(&ids) + (i * tokens * topk * 4) as u64,
                weights: g.ptr(&weights),
                h: g.ptr(&h),
                partial: g.ptr(&partial),
                out: g.ptr(&out),
                out_dtype: OutDtype::F32,
                tokens,
                topk,
                swiglu_limit: 10.0,
                addend: 0,
            };
            let bytes = distinct * expert_bytes(hidden, inter) as f64;
            for (what, path) in [
                ("v2 (CUDA cores)", MoePath::CudaCore),
                ("tensor cores (old)", MoePath::TensorCore),
                ("mma2", MoePath::TensorCoreV2),
            ] {
                let launch = |i: usize| {
                    // SAFETY: the layer holds `experts` experts of these shapes; every id set
                    // is `tokens * topk` ids below `experts`; scratch sized for the call.
                    unsafe { g.k.fp4_moe_path(&g.s, &e, &call(i), path) }.unwrap();
                };
                for i in 0..reps.min(5) {
                    launch(i);
                }
                g.s.synchronize().unwrap();
                let ev = || {
                    g.ctx
                        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                        .unwrap()
                };
                let (start, end) = (ev(), ev());
                g.k.spin(&g.s, 20_000_000).unwrap();
                start.record(&g.s).unwrap();
                for i in 0..reps {
                    launch(i);
                }
                end.record(&g.s).unwrap();
                g.s.synchronize().unwrap();
                let us = f64::from(start.elapsed_ms(&end).unwrap()) * 1000.0 / reps as f64;
                eprintln!(
                    "fp4_moe T{tokens} top{topk} I{inter} H{hidden} ({distinct:.1} distinct of \
                     {experts} experts) {what:>18}: {us:8.2} us {:6.0} GB/s",
                    bytes / us * 1e-3
                );
            }
        }
    }
}
