//! GPU checks of the tensor-core skinny GEMMs (`Kernels::skinny_mma`: f32 activations split into
//! two TF32 halves, or for FP8 weights into two f16 halves on the cluster kernel) against f64 host
//! references and against the CUDA-core GEMVs they replace for 2..=16 rows, FP8 (block-scaled)
//! and bf16 weights, plain and grouped (wo_a), at odd and at DeepSeek-V4-Flash shapes; that a
//! token's f16 result is the same bits in any batch and at any activation magnitude; then a timing
//! print of the paths at the decode shapes. Skips (passes with a SKIP line) where there is no GPU.

use std::sync::Mutex;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use dspark_kernels::formats::{e4m3_to_f32, e8m0_to_f64};
use dspark_kernels::launch::dense_gemv::Bf16Gemv;
use dspark_kernels::launch::skinny_mma::{
    check_skinny_mma, skinny_f16_plan, SkinnyMma, SkinnyPath, SkinnyWeight,
};
use dspark_kernels::reference::{fp8_gemv, rel_err};
use dspark_kernels::{ActDtype, Fp8Gemv, Fp8Path, OutDtype};

mod common;
use common::{bf16_bits, bf16_gemv_ref, gpu, Gpu, Rng};

/// The split keeps every product within 2^-22 of the f32 product and the sums are f32 over
/// k <= 4096 random-sign terms: the norm-wise error against the exact f64 result is ~1e-7.
/// 2e-6 leaves margin and still fails a TF32-only product (2^-11 per activation: ~1e-4) or any
/// wrong weight, scale, slot or token (>= 1e-2).
const TOL: f64 = 2e-6;

static GPU_LOCK: Mutex<()> = Mutex::new(());

/// Padding columns of the output hold this; the kernel must leave them alone.
const OUT_PAD: f32 = -12345.0;
const OUT_PAD_COLS: usize = 8;

/// Any e4m3 code but the NaNs (0x7F, 0xFF).
fn e4m3_codes(rng: &mut Rng, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            let b = rng.next() as u8;
            if b & 0x7f == 0x7f {
                b ^ 1
            } else {
                b
            }
        })
        .collect()
}

/// A random FP8 weight `[n, k]` and its 128 x 128 E8M0 scales (2^-9 .. 2^-2).
fn fp8_weight(rng: &mut Rng, n: usize, k: usize) -> (Vec<u8>, Vec<u8>) {
    let w = e4m3_codes(rng, n * k);
    let s = (0..n.div_ceil(128) * k.div_ceil(128))
        .map(|_| 118 + (rng.next() % 8) as u8)
        .collect();
    (w, s)
}

/// Runs the skinny kernel into a padded output and returns the [m, n] values.
fn run_skinny(gpu: &Gpu, a: SkinnyMma) -> Vec<f32> {
    run_skinny_on(gpu, a, SkinnyPath::Auto)
}

fn run_skinny_on(gpu: &Gpu, a: SkinnyMma, path: SkinnyPath) -> Vec<f32> {
    let ld_out = a.n + OUT_PAD_COLS;
    let mut init = vec![f32::NAN; a.m * ld_out];
    for row in init.chunks_mut(ld_out) {
        row[a.n..].fill(OUT_PAD);
    }
    let out = gpu.up(&init);
    let call = SkinnyMma {
        out: gpu.ptr(&out),
        ld_out,
        ..a
    };
    check_skinny_mma(&call).unwrap();
    // SAFETY: the callers' buffers hold W [n, k] (+ scales) and x rows as `a` describes; out was
    // just allocated for m rows of ld_out.
    unsafe { gpu.k.skinny_mma_path(&gpu.s, &call, path) }.unwrap();
    let v = gpu.down(&out);
    let mut dense = Vec::with_capacity(a.m * a.n);
    for row in v.chunks(ld_out) {
        assert!(
            row[a.n..].iter().all(|&p| p == OUT_PAD),
            "{a:?}: wrote past n"
        );
        dense.extend_from_slice(&row[..a.n]);
    }
    dense
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

fn check_fp8(gpu: &Gpu, n: usize, k: usize, ms: &[usize], seed: u64) {
    let mut rng = Rng(seed);
    let (w, s) = fp8_weight(&mut rng, n, k);
    let mmax = ms.iter().copied().max().unwrap_or(1);
    let x = rng.vec(mmax * k, -1.0, 1.0);
    let (wb, sb, xb) = (gpu.up(&w), gpu.up(&s), gpu.up(&x));
    let mut paths = vec![SkinnyPath::Tf32];
    let plain = |m| {
        SkinnyMma::plain(
            gpu.ptr(&wb),
            SkinnyWeight::Fp8,
            gpu.ptr(&sb),
            gpu.ptr(&xb),
            0,
            (m, n, k),
        )
    };
    if skinny_f16_plan(&plain(1), gpu.k.multiprocessors()).is_some() {
        paths.push(SkinnyPath::F16);
    }
    for (&m, path) in ms.iter().flat_map(|m| paths.iter().map(move |p| (m, *p))) {
        let got = run_skinny_on(gpu, plain(m), path);
        let reference = fp8_gemv(&w, &s, &x[..m * k], m, n, k);
        let err = rel_err(&f64s(&got), &reference);
        // The CUDA-core kernel on the same inputs (what the backend ran before).
        let ob = gpu.up(&vec![f32::NAN; m * n]);
        let a = Fp8Gemv {
            weight: gpu.ptr(&wb),
            scale: gpu.ptr(&sb),
            x: gpu.ptr(&xb),
            x_dtype: ActDtype::F32,
            out: gpu.ptr(&ob),
            out_dtype: OutDtype::F32,
            m,
            n,
            k,
        };
        // SAFETY: as above; ob holds m * n f32.
        unsafe { gpu.k.fp8_gemv_path(&gpu.s, &a, Fp8Path::CudaCore) }.unwrap();
        let gemv = gpu.down(&ob);
        let vs_gemv = rel_err(&f64s(&got), &f64s(&gemv));
        eprintln!(
            "skinny fp8 {path:?} m={m} n={n} k={k}: vs f64 {err:.2e}, vs CUDA-core GEMV {vs_gemv:.2e}"
        );
        assert!(err < TOL, "fp8 {path:?} m={m} n={n} k={k}: rel err {err}");
        assert!(
            vs_gemv < 2.0 * TOL,
            "fp8 {path:?} m={m} n={n} k={k}: vs GEMV {vs_gemv}"
        );
    }
}

fn check_bf16(gpu: &Gpu, n: usize, k: usize, ms: &[usize], seed: u64) {
    let mut rng = Rng(seed);
    let w = bf16_bits(&mut rng, n * k);
    let mmax = ms.iter().copied().max().unwrap_or(1);
    let x = rng.vec(mmax * k, -1.0, 1.0);
    let (wb, xb) = (gpu.up(&w), gpu.up(&x));
    for &m in ms {
        let got = run_skinny(
            gpu,
            SkinnyMma::plain(
                gpu.ptr(&wb),
                SkinnyWeight::Bf16,
                0,
                gpu.ptr(&xb),
                0,
                (m, n, k),
            ),
        );
        let err = rel_err(&f64s(&got), &bf16_gemv_ref(&w, &x[..m * k], m, n, k));
        eprintln!("skinny bf16 m={m} n={n} k={k}: vs f64 {err:.2e}");
        assert!(err < TOL, "bf16 m={m} n={n} k={k}: rel err {err}");
    }
}

#[test]
fn skinny_fp8_matches_f64_and_the_gemv() {
    let _lock = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = gpu("skinny_fp8_matches_f64_and_the_gemv") else {
        return;
    };
    let ms = [1, 2, 3, 5, 8, 9, 13, 16];
    // Odd row counts (partial tiles and 128-row scale blocks), one span, several scale columns.
    check_fp8(&gpu, 3, 64, &ms, 1);
    check_fp8(&gpu, 130, 192, &ms, 2);
    check_fp8(&gpu, 1000, 1024, &ms, 3);
    // V4-Flash: wq_a [1024, 4096]; wq_b at TP=2 [16384, 1024] (32-row blocks); wo_b [4096, 8192].
    check_fp8(&gpu, 1024, 4096, &[2, 16], 4);
    check_fp8(&gpu, 16_384, 1024, &[2, 7, 16], 5);
    check_fp8(&gpu, 4096, 8192, &[16], 6);
    // The f16 kernel's cluster splits: wo_b and the shared expert's w2 at TP=2.
    check_fp8(&gpu, 4096, 4096, &[4, 16], 7);
    check_fp8(&gpu, 4096, 1024, &[6, 16], 8);
}

/// The f16 kernel: a token's outputs are the same bits alone, in any batch and at any position
/// in it (the backend batches decode tokens of different sequences), and activations far outside
/// the f16 range (or deep in its subnormals) lose nothing: each span is scaled by a power of two.
#[test]
fn skinny_f16_is_batch_invariant_at_any_magnitude() {
    let _lock = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = gpu("skinny_f16_is_batch_invariant_at_any_magnitude") else {
        return;
    };
    for &(n, k, seed) in &[(1024, 4096, 21u64), (4096, 1024, 22), (16_384, 1024, 23)] {
        let mut rng = Rng(seed);
        let (w, s) = fp8_weight(&mut rng, n, k);
        // 16 tokens of different magnitudes: 1e6 overflows f16, 1e-9 is below its subnormals.
        let scales = [
            1.0, 1e6, 1e-9, 3.0, 1e30, 1e-30, 0.5, 100.0, 1.0, 7e4, 2.0, 1e-3, 1.0, 0.0, 5.0, 1.0,
        ];
        let mut x = Vec::with_capacity(16 * k);
        for sc in scales {
            x.extend(rng.vec(k, -1.0, 1.0).into_iter().map(|v| v * sc as f32));
        }
        let (wb, sb) = (gpu.up(&w), gpu.up(&s));
        let rows_of = |x: &[f32], m: usize| -> Vec<f32> {
            let xb = gpu.up(x);
            run_skinny_on(
                &gpu,
                SkinnyMma::plain(
                    gpu.ptr(&wb),
                    SkinnyWeight::Fp8,
                    gpu.ptr(&sb),
                    gpu.ptr(&xb),
                    0,
                    (m, n, k),
                ),
                SkinnyPath::F16,
            )
        };
        let all = rows_of(&x, 16);
        let reference = fp8_gemv(&w, &s, &x, 16, n, k);
        for (t, sc) in scales.iter().enumerate() {
            let got = f64s(&all[t * n..(t + 1) * n]);
            let want = &reference[t * n..(t + 1) * n];
            if *sc == 0.0 {
                assert!(got.iter().all(|&v| v == 0.0), "n={n} k={k}: zero token");
                continue;
            }
            let err = rel_err(&got, want);
            eprintln!("skinny f16 n={n} k={k} token {t} (x ~ {sc:e}): vs f64 {err:.2e}");
            assert!(
                err < TOL,
                "n={n} k={k} token {t} (x ~ {sc:e}): rel err {err}"
            );
        }
        // Each token alone, and the batch reversed: the same bits as in the batch of 16.
        for t in [0usize, 1, 2, 7, 8, 15] {
            let alone = rows_of(&x[t * k..(t + 1) * k], 1);
            assert!(
                alone
                    .iter()
                    .zip(&all[t * n..(t + 1) * n])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "n={n} k={k}: token {t} alone differs from the batch"
            );
        }
        let reversed: Vec<f32> = (0..16)
            .rev()
            .flat_map(|t| x[t * k..(t + 1) * k].to_vec())
            .collect();
        let rev = rows_of(&reversed, 16);
        for t in 0..16 {
            let (a, b) = (&rev[(15 - t) * n..(16 - t) * n], &all[t * n..(t + 1) * n]);
            assert!(
                a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()),
                "n={n} k={k}: token {t} differs at another position"
            );
        }
        // The first 8 tokens as a batch of 8 (one token tile instead of two).
        let eight = rows_of(&x[..8 * k], 8);
        assert!(
            eight
                .iter()
                .zip(&all[..8 * n])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "n={n} k={k}: a batch of 8 differs from the first 8 of 16"
        );
    }
}

#[test]
fn skinny_bf16_matches_f64() {
    let _lock = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = gpu("skinny_bf16_matches_f64") else {
        return;
    };
    let ms = [1, 2, 4, 8, 11, 16];
    check_bf16(&gpu, 3, 32, &ms, 11);
    check_bf16(&gpu, 1000, 96, &ms, 12);
    // The router [256, 4096] and a slice of the LM head at 32-row blocks.
    check_bf16(&gpu, 256, 4096, &[2, 16], 13);
    check_bf16(&gpu, 8192, 4096, &[3, 16], 14);
}

#[test]
fn skinny_grouped_reads_each_groups_inputs() {
    let _lock = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = gpu("skinny_grouped_reads_each_groups_inputs") else {
        return;
    };
    // groups x [rows, k]; group g's inputs at g * stride of each row, NaN in the gaps between
    // groups and after them, so a read outside a group's span poisons its outputs.
    for &(groups, rows, k, gap, m) in &[
        (8, 128, 256, 16, 2),
        (4, 32, 64, 4, 16),
        (8, 1024, 4096, 0, 16),
    ] {
        let mut rng = Rng(0x5a_0000 + m as u64 + rows as u64);
        let (n, stride) = (groups * rows, k + gap);
        let ld_x = groups * stride + gap;
        let (w, s) = fp8_weight(&mut rng, n, k);
        let kb = k.div_ceil(128);
        let mut x = vec![f32::NAN; m * ld_x];
        for t in 0..m {
            for g in 0..groups {
                let at = t * ld_x + g * stride;
                for v in &mut x[at..at + k] {
                    *v = rng.uniform(-1.0, 1.0);
                }
            }
        }
        let (wb, sb, xb) = (gpu.up(&w), gpu.up(&s), gpu.up(&x));
        let got = run_skinny(
            &gpu,
            SkinnyMma {
                ld_x,
                group_rows: rows,
                x_group_stride: stride,
                ..SkinnyMma::plain(
                    gpu.ptr(&wb),
                    SkinnyWeight::Fp8,
                    gpu.ptr(&sb),
                    gpu.ptr(&xb),
                    0,
                    (m, n, k),
                )
            },
        );
        for g in 0..groups {
            let xg: Vec<f32> = (0..m)
                .flat_map(|t| x[t * ld_x + g * stride..t * ld_x + g * stride + k].to_vec())
                .collect();
            // Row by row over the full scale grid (groups under 128 rows share a scale block).
            let mut reference = vec![0f64; m * rows];
            for t in 0..m {
                for i in 0..rows {
                    let row = g * rows + i;
                    reference[t * rows + i] = (0..k)
                        .map(|j| {
                            let sc = e8m0_to_f64(s[row / 128 * kb + j / 128]);
                            f64::from(e4m3_to_f32(w[row * k + j])) * sc * f64::from(xg[t * k + j])
                        })
                        .sum();
                }
            }
            let cols: Vec<f64> = (0..m)
                .flat_map(|t| {
                    got[t * n + g * rows..t * n + (g + 1) * rows]
                        .iter()
                        .map(|&v| f64::from(v))
                })
                .collect();
            let err = rel_err(&cols, &reference);
            eprintln!("skinny grouped {groups}x[{rows},{k}] m={m} group {g}: vs f64 {err:.2e}");
            assert!(
                err < TOL,
                "group {g} of {groups}x[{rows},{k}] m={m}: rel err {err}"
            );
        }
    }
}

/// GPU time per call, `reps` calls back to back between two events behind a spin kernel (what a
/// CUDA graph of these launches sustains).
fn time_us(gpu: &Gpu, reps: usize, mut call: impl FnMut(usize)) -> f64 {
    for i in 0..5 {
        call(i);
    }
    gpu.s.synchronize().unwrap();
    let ev = || {
        gpu.ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap()
    };
    let (start, end) = (ev(), ev());
    gpu.k.spin(&gpu.s, 20_000_000).unwrap();
    start.record(&gpu.s).unwrap();
    for i in 0..reps {
        call(i);
    }
    end.record(&gpu.s).unwrap();
    gpu.s.synchronize().unwrap();
    f64::from(start.elapsed_ms(&end).unwrap()) * 1000.0 / reps as f64
}

/// Copies of a weight rotated through, so timed calls read memory, not the 60 MB L2.
fn copies_for(bytes: usize) -> usize {
    (512usize << 20).div_ceil(bytes.max(1)).clamp(2, 64)
}

#[test]
fn skinny_timing_print() {
    let _lock = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = gpu("skinny_timing_print") else {
        return;
    };
    let mut rng = Rng(0x71);
    let x = gpu.up(&rng.vec(16 * 8192, -1.0, 1.0));
    let out = gpu.up(&vec![0f32; 16 * 129_280]);
    // (name, n, k) of FP8 projections at TP=2, then bf16 ones.
    let fp8_shapes = [
        ("wq_a", 1024, 4096),
        ("wq_b TP2", 16_384, 1024),
        ("wo_b TP2", 4096, 4096),
        ("shared w1 TP2", 1024, 4096),
        ("shared w2 TP2", 4096, 1024),
        ("wkv", 512, 4096),
    ];
    for (name, n, k) in fp8_shapes {
        let copies = copies_for(n * k);
        let ws: Vec<CudaSlice<u8>> = (0..copies)
            .map(|_| gpu.up(&e4m3_codes(&mut rng, n * k)))
            .collect();
        let sc = gpu.up(&vec![127u8; n.div_ceil(128) * k.div_ceil(128)]);
        for m in [1, 2, 4, 8, 16] {
            let skinny_on = |path| {
                time_us(&gpu, 200, |i| {
                    let a = SkinnyMma::plain(
                        gpu.ptr(&ws[i % copies]),
                        SkinnyWeight::Fp8,
                        gpu.ptr(&sc),
                        gpu.ptr(&x),
                        gpu.ptr(&out),
                        (m, n, k),
                    );
                    // SAFETY: W [n, k] and its scales, x >= 16 x 8192 and out >= 16 x 129280 f32.
                    unsafe { gpu.k.skinny_mma_path(&gpu.s, &a, path) }.unwrap();
                })
            };
            let skinny = skinny_on(SkinnyPath::Tf32);
            let f16 = skinny_on(SkinnyPath::F16);
            let gemv = time_us(&gpu, 200, |i| {
                let a = Fp8Gemv {
                    weight: gpu.ptr(&ws[i % copies]),
                    scale: gpu.ptr(&sc),
                    x: gpu.ptr(&x),
                    x_dtype: ActDtype::F32,
                    out: gpu.ptr(&out),
                    out_dtype: OutDtype::F32,
                    m,
                    n,
                    k,
                };
                // SAFETY: as above.
                unsafe { gpu.k.fp8_gemv_path(&gpu.s, &a, Fp8Path::CudaCore) }.unwrap();
            });
            let gb = (n * k) as f64 / 1e3;
            eprintln!(
                "TIMING fp8 {name:14} m={m:2}: f16 cluster {f16:7.2} us ({:6.0} GB/s), TF32 skinny {skinny:7.2} us ({:6.0} GB/s), CUDA-core GEMV {gemv:7.2} us ({:6.0} GB/s)",
                gb / f16,
                gb / skinny,
                gb / gemv
            );
        }
    }
    for (name, n, k) in [("router", 256, 4096), ("head TP2", 64_640, 4096)] {
        let copies = copies_for(2 * n * k);
        let ws: Vec<CudaSlice<u16>> = (0..copies)
            .map(|_| gpu.up(&bf16_bits(&mut rng, n * k)))
            .collect();
        for m in [1, 2, 4, 8, 16] {
            let skinny = time_us(&gpu, 100, |i| {
                let a = SkinnyMma::plain(
                    gpu.ptr(&ws[i % copies]),
                    SkinnyWeight::Bf16,
                    0,
                    gpu.ptr(&x),
                    gpu.ptr(&out),
                    (m, n, k),
                );
                // SAFETY: W [n, k] bf16, x >= 16 x 8192 and out >= 16 x 129280 f32.
                unsafe { gpu.k.skinny_mma(&gpu.s, &a) }.unwrap();
            });
            let gemv = time_us(&gpu, 100, |i| {
                let a = Bf16Gemv {
                    weight: gpu.ptr(&ws[i % copies]),
                    x: gpu.ptr(&x),
                    out: gpu.ptr(&out),
                    m,
                    n,
                    k,
                };
                // SAFETY: as above.
                unsafe { gpu.k.bf16_gemv(&gpu.s, &a) }.unwrap();
            });
            let gb = (2 * n * k) as f64 / 1e3;
            eprintln!(
                "TIMING bf16 {name:14} m={m:2}: skinny {skinny:7.2} us ({:6.0} GB/s), CUDA-core GEMV {gemv:7.2} us ({:6.0} GB/s)",
                gb / skinny,
                gb / gemv
            );
        }
    }
}
