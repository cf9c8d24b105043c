//! GPU checks of `dense_gemv.cu` (bf16 weights, f32 activations) against f64 host references,
//! at the DeepSeek-V4-Flash decode shapes (LM head, compressor, router) and tiny/odd ones, plus a
//! bandwidth print. Products are exact (bf16 -> f32 is), so the tolerance only covers the f32
//! summation. Skips (passes with a SKIP line) where there is no GPU.

use std::time::Instant;

use cudarc::driver::CudaSlice;
use dspark_kernels::formats::bf16_to_f32;
use dspark_kernels::launch::dense_gemv::{check_bf16_gemv, Bf16Gemv};
use dspark_kernels::reference::rel_err;

mod common;
use common::{bf16_bits, bf16_gemv_ref, gpu, Gpu, Rng};

const TOL: f64 = 1e-5;

fn run_gemv(
    g: &Gpu,
    w: &CudaSlice<u16>,
    x: &CudaSlice<f32>,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let ob = g.up(&vec![f32::NAN; m * n]);
    let a = Bf16Gemv {
        weight: g.ptr(w),
        x: g.ptr(x),
        out: g.ptr(&ob),
        m,
        n,
        k,
    };
    // SAFETY: w holds n * k bf16, x m * k f32 and ob m * n f32.
    unsafe { g.k.bf16_gemv(&g.s, &a) }.unwrap();
    g.down(&ob)
}

fn check(g: &Gpu, rng: &mut Rng, m_list: &[usize], n: usize, k: usize) {
    let w = bf16_bits(rng, n * k);
    let wb = g.up(&w);
    let mmax = m_list.iter().copied().max().unwrap_or(1);
    let x = rng.vec(mmax * k, -1.0, 1.0);
    let xb = g.up(&x);
    for &m in m_list {
        let out = run_gemv(g, &wb, &xb, m, n, k);
        let o: Vec<f64> = out.iter().map(|&v| f64::from(v)).collect();
        let err = rel_err(&o, &bf16_gemv_ref(&w, &x[..m * k], m, n, k));
        eprintln!("bf16_gemv m={m} n={n} k={k}: rel err {err:.2e}");
        assert!(err < TOL, "m={m} n={n} k={k}: rel err {err}");
    }
}

/// A token's outputs do not depend on the batch it runs in: up to four tokens share one block,
/// more run as 4-token tiles along grid.y, and every token's arithmetic is the same either way,
/// so each of m tokens gives the bits it gives alone.
#[test]
fn bf16_gemv_tokens_give_their_bits_alone() {
    let Some(g) = gpu("bf16_gemv_tokens_give_their_bits_alone") else {
        return;
    };
    let mut rng = Rng(0x7e57_0b17);
    for (n, k) in [(256, 4096), (1001, 1024), (37, 264)] {
        let w = bf16_bits(&mut rng, n * k);
        let wb = g.up(&w);
        let x = rng.vec(16 * k, -1.0, 1.0);
        let alone: Vec<Vec<f32>> = (0..16)
            .map(|t| run_gemv(&g, &wb, &g.up(&x[t * k..(t + 1) * k]), 1, n, k))
            .collect();
        let xb = g.up(&x);
        for m in [2, 3, 4, 5, 6, 8, 9, 13, 16] {
            let out = run_gemv(&g, &wb, &xb, m, n, k);
            for (t, want) in alone.iter().take(m).enumerate() {
                let got = &out[t * n..(t + 1) * n];
                assert!(
                    got.iter()
                        .zip(want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "n {n} k {k}: token {t} of {m} differs from the token alone"
                );
            }
        }
    }
}

#[test]
fn bf16_gemv_matches_reference() {
    let Some(g) = gpu("bf16_gemv_matches_reference") else {
        return;
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // LM head at one token.
    check(&g, &mut rng, &[1], 129_280, 4096);
    // Compressor wkv / wgate, every token bucket and the counts between them.
    check(&g, &mut rng, &[1, 2, 3, 4, 5, 8, 11, 16], 1024, 4096);
    // Router gate, indexer compressor / weights_proj.
    check(&g, &mut rng, &[1, 7], 256, 4096);
    check(&g, &mut rng, &[1, 16], 512, 4096);
    check(&g, &mut rng, &[2], 64, 4096);
    // Odd row counts (partial row groups, clamped tail rows), short and odd K.
    check(&g, &mut rng, &[1, 3, 16], 1001, 1024);
    check(&g, &mut rng, &[1, 6], 37, 264);
    check(&g, &mut rng, &[1, 2, 16], 3, 32);
    check(&g, &mut rng, &[1, 9], 129, 8);
}

#[test]
fn bf16_gemv_rejects_bad_shapes() {
    let a = Bf16Gemv {
        weight: 256,
        x: 256,
        out: 256,
        m: 1,
        n: 8,
        k: 12,
    };
    assert!(check_bf16_gemv(&a).is_err());
    let Some(g) = gpu("bf16_gemv_rejects_bad_shapes") else {
        return;
    };
    // SAFETY: rejected before launch.
    assert!(unsafe { g.k.bf16_gemv(&g.s, &Bf16Gemv { m: 17, k: 16, ..a }) }.is_err());
}

#[test]
fn bf16_widen_and_gather_are_exact() {
    let Some(g) = gpu("bf16_widen_and_gather_are_exact") else {
        return;
    };
    let mut rng = Rng(42);
    for len in [1usize, 7, 8, 9, 4096 + 5, 3_000_001] {
        let src = bf16_bits(&mut rng, len);
        let sb = g.up(&src);
        let db = g.up(&vec![f32::NAN; len]);
        // SAFETY: sb holds len bf16 and db len f32.
        unsafe { g.k.bf16_to_f32(&g.s, g.ptr(&sb), g.ptr(&db), len) }.unwrap();
        let got = g.down(&db);
        let want: Vec<f32> = src.iter().map(|&h| bf16_to_f32(h)).collect();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "bf16_to_f32 len {len} not exact"
        );
    }
    for (rows, k) in [(129_280usize, 4096usize), (10, 8), (5, 24)] {
        let w = bf16_bits(&mut rng, rows * k);
        let wb = g.up(&w);
        let ids: Vec<i32> = vec![
            0,
            rows as i32 - 1,
            3 % rows as i32,
            -1,
            rows as i32,
            i32::MAX,
            (rows / 2) as i32,
        ];
        let ib = g.up(&ids);
        let ob = g.up(&vec![f32::NAN; ids.len() * k]);
        // SAFETY: wb holds rows * k bf16, ib ids.len() i32, ob ids.len() * k f32.
        unsafe {
            g.k.gather_rows_bf16(&g.s, g.ptr(&wb), g.ptr(&ib), g.ptr(&ob), ids.len(), k, rows)
        }
        .unwrap();
        let got = g.down(&ob);
        for (i, &id) in ids.iter().enumerate() {
            let row = &got[i * k..(i + 1) * k];
            if id < 0 || id as usize >= rows {
                assert!(row.iter().all(|&v| v.to_bits() == 0), "id {id}: not zero");
            } else {
                let want = &w[id as usize * k..(id as usize + 1) * k];
                assert!(
                    row.iter()
                        .zip(want)
                        .all(|(a, &b)| a.to_bits() == bf16_to_f32(b).to_bits()),
                    "row {id} of [{rows}, {k}] differs"
                );
            }
        }
    }
}

/// Effective weight bandwidth at decode shapes (printed, not asserted: shared GPUs vary). Wall
/// time over back-to-back launches, so small shapes include launch gaps; `kernel-check` has the
/// event-timed numbers.
#[test]
fn bf16_gemv_bandwidth() {
    let Some(g) = gpu("bf16_gemv_bandwidth") else {
        return;
    };
    let mut rng = Rng(7);
    for (m, n, k) in [
        (1usize, 129_280usize, 4096usize),
        (1, 1024, 4096),
        (16, 1024, 4096),
        (1, 256, 4096),
        (4, 129_280, 4096),
        (16, 129_280, 4096),
    ] {
        // Values do not change the time; a constant fill keeps the host side quick. Small
        // matrices rotate over copies totalling > 256 MB so the weights come from HBM, not L2.
        let host = vec![0x3f80u16; n * k];
        let sets = (256usize << 20).div_ceil(n * k * 2).clamp(1, 64);
        let wsets: Vec<CudaSlice<u16>> = (0..sets).map(|_| g.up(&host)).collect();
        let xb = g.up(&rng.vec(m * k, -1.0, 1.0));
        let ob = g.up(&vec![0f32; m * n]);
        let calls: Vec<Bf16Gemv> = wsets
            .iter()
            .map(|wb| Bf16Gemv {
                weight: g.ptr(wb),
                x: g.ptr(&xb),
                out: g.ptr(&ob),
                m,
                n,
                k,
            })
            .collect();
        let iters = if n * k > 100_000_000 { 20 } else { 256 };
        // SAFETY (all launches below): the buffers hold the shapes in each call.
        unsafe { g.k.bf16_gemv(&g.s, &calls[0]) }.unwrap();
        g.s.synchronize().unwrap();
        let t0 = Instant::now();
        for i in 0..iters {
            unsafe { g.k.bf16_gemv(&g.s, &calls[i % sets]) }.unwrap();
        }
        g.s.synchronize().unwrap();
        let secs = t0.elapsed().as_secs_f64() / iters as f64;
        let gbs = (n * k * 2) as f64 / secs / 1e9;
        eprintln!(
            "bf16_gemv m={m:2} [{n}, {k}]: {:8.2} us  {gbs:7.0} GB/s of weights",
            secs * 1e6
        );
    }
}
