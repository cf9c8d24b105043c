//! GPU checks of the grouped FP8 GEMV (`Kernels::fp8_gemv_grouped`, DeepSeek-V4's wo_a in one
//! launch) against (a) the f64 host reference `reference::fp8_gemv` applied to each group alone
//! and (b) the plain CUDA-core kernel (`Fp8Path::CudaCore`) launched once per group on a
//! contiguous copy of that group's inputs (what the layer does today). Also prints the achieved
//! GB/s at M = 1 for 8 x [1024, 4096], one grouped launch vs 8 launches. Skips (passes with a SKIP
//! line) where there is no GPU.
//!
//! Expectation for (b): bit-identical outputs when the grouped launch splits K across warps as the
//! plain kernel splits a [group_rows, k] matrix (`Kernels::fp8_split(m, group_rows, k)`, forced
//! with `fp8_gemv_grouped_ksplit`): both run the same template body, so each output element gets the
//! same per-lane chunks in the same order, the same explicit fmaf chain and per-16-chunk scale
//! FMA, the same warp shuffle tree and the same in-order sum of the split partials; only which
//! block computes the row and where x is read from differ. The default split is chosen for the
//! whole [n, k] matrix, which for 8 x 1024 rows is a different split (another summation order),
//! so there the check is the reference tolerance only.

use std::sync::Mutex;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use dspark_kernels::launch::fp8_ksplit_one_chunk;
use dspark_kernels::reference::{fp8_gemv, rel_err};
use dspark_kernels::{ActDtype, Fp8Gemv, Fp8GroupedGemv, Fp8Path, OutDtype};

mod common;
use common::{e4m3_codes, e8m0_scales_near_one, gpu, Gpu, Rng};

/// f32 accumulation of k <= 4096 random-sign terms against the exactly rounded f64 sum: the
/// error is ~1e-7 of the result's norm; 1e-5 leaves two orders of margin and still catches any
/// wrong weight, scale or input (each moves the result by ~1/sqrt(k) >= 1.5e-2).
const TOL: f64 = 1e-5;

/// The tests of this file share the GPU one at a time (the timing must run alone).
static GPU_LOCK: Mutex<()> = Mutex::new(());

/// One grouped projection: `groups` matrices [rows, k] stacked, x [m, ld_x] with group g's inputs
/// at g * x_group_stride. `gap` extra elements after each group's inputs (and after the row) are
/// NaN, so a read outside a group's span poisons its outputs.
#[derive(Clone, Copy, Debug)]
struct Case {
    groups: usize,
    rows: usize,
    k: usize,
    m: usize,
    gap: usize,
}

impl Case {
    fn n(&self) -> usize {
        self.groups * self.rows
    }
    fn stride(&self) -> usize {
        self.k + self.gap
    }
    fn ld_x(&self) -> usize {
        self.groups * self.stride() + self.gap
    }
    fn kb(&self) -> usize {
        self.k.div_ceil(128)
    }
}

struct Data {
    /// e4m3 [n, k]: the groups' matrices stacked.
    w: Vec<u8>,
    /// E8M0 [n / 128, kb]: the groups' scale grids stacked.
    s: Vec<u8>,
    /// f32 [m, ld_x].
    x: Vec<f32>,
}

fn data(c: &Case, seed: u64) -> Data {
    let mut rng = Rng(seed);
    let w = e4m3_codes(&mut rng, c.n() * c.k);
    let s = e8m0_scales_near_one(&mut rng, c.n() / 128 * c.kb());
    let mut x = vec![f32::NAN; c.m * c.ld_x()];
    for m in 0..c.m {
        for g in 0..c.groups {
            let at = m * c.ld_x() + g * c.stride();
            for v in &mut x[at..at + c.k] {
                *v = rng.uniform(-1.0, 1.0);
            }
        }
    }
    Data { w, s, x }
}

/// Group g's inputs as a contiguous [m, k] matrix.
fn group_x(c: &Case, d: &Data, g: usize) -> Vec<f32> {
    (0..c.m)
        .flat_map(|m| {
            let at = m * c.ld_x() + g * c.stride();
            d.x[at..at + c.k].iter().copied()
        })
        .collect()
}

/// Padding columns of the grouped output hold this; the kernel must leave them alone.
const OUT_PAD: f32 = -12345.0;
const OUT_PAD_COLS: usize = 8;

/// Runs the grouped kernel (default split, or `ksplit`) and returns out [m, ld_out].
fn run_grouped(
    gpu: &Gpu,
    c: &Case,
    w: &CudaSlice<u8>,
    s: &CudaSlice<u8>,
    x: &CudaSlice<f32>,
    ksplit: Option<usize>,
) -> Vec<f32> {
    let ld_out = c.n() + OUT_PAD_COLS;
    let mut init = vec![f32::NAN; c.m * ld_out];
    for row in init.chunks_mut(ld_out) {
        row[c.n()..].fill(OUT_PAD);
    }
    let out = gpu.up(&init);
    let a = Fp8GroupedGemv {
        weight: gpu.ptr(w),
        scale: gpu.ptr(s),
        x: gpu.ptr(x),
        out: gpu.ptr(&out),
        m: c.m,
        n: c.n(),
        k: c.k,
        group_rows: c.rows,
        x_group_stride: c.stride(),
        ld_x: c.ld_x(),
        ld_out,
    };
    // SAFETY: the buffers hold the shapes in `a` (W [n, k], S [n/128, kb], x [m, ld_x], out [m, ld_out]).
    unsafe {
        match ksplit {
            None => gpu.k.fp8_gemv_grouped(&gpu.s, &a),
            Some(ks) => gpu.k.fp8_gemv_grouped_ksplit(&gpu.s, &a, ks),
        }
    }
    .unwrap();
    let v = gpu.down(&out);
    for row in v.chunks(ld_out) {
        assert!(
            row[c.n()..].iter().all(|&p| p == OUT_PAD),
            "{c:?}: wrote past n"
        );
    }
    v
}

/// Group g's columns of a grouped output [m, ld_out] as [m, rows].
fn group_cols(c: &Case, out: &[f32], g: usize) -> Vec<f32> {
    let ld_out = c.n() + OUT_PAD_COLS;
    (0..c.m)
        .flat_map(|m| {
            let at = m * ld_out + g * c.rows;
            out[at..at + c.rows].iter().copied()
        })
        .collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// Group g alone through the plain CUDA-core kernel (on its slice of W and S and a copy of its
/// inputs), and the f64 reference of that group.
fn plain_group(
    gpu: &Gpu,
    c: &Case,
    d: &Data,
    (wb, sb): (&CudaSlice<u8>, &CudaSlice<u8>),
    g: usize,
) -> (Vec<f32>, Vec<f64>) {
    let (wrows, srows) = (c.rows * c.k, c.rows / 128 * c.kb());
    let xg = group_x(c, d, g);
    let wg = &d.w[g * wrows..(g + 1) * wrows];
    let sg = &d.s[g * srows..(g + 1) * srows];
    let reference = fp8_gemv(wg, sg, &xg, c.m, c.rows, c.k);
    let xgb = gpu.up(&xg);
    let outg = gpu.up(&vec![f32::NAN; c.m * c.rows]);
    let a = Fp8Gemv {
        weight: gpu.ptr(wb) + (g * wrows) as u64,
        scale: gpu.ptr(sb) + (g * srows) as u64,
        x: gpu.ptr(&xgb),
        x_dtype: ActDtype::F32,
        out: gpu.ptr(&outg),
        out_dtype: OutDtype::F32,
        m: c.m,
        n: c.rows,
        k: c.k,
    };
    // SAFETY: group g's rows of W/S, x [m, k] and out [m, rows] as allocated above.
    unsafe { gpu.k.fp8_gemv_path(&gpu.s, &a, Fp8Path::CudaCore) }.unwrap();
    (gpu.down(&outg), reference)
}

fn check_case(gpu: &Gpu, c: Case, seed: u64) {
    let d = data(&c, seed);
    let (wb, sb, xb) = (gpu.up(&d.w), gpu.up(&d.s), gpu.up(&d.x));
    let per_group_split = gpu.k.fp8_split(c.m, c.rows, c.k);
    let auto_split = gpu.k.fp8_split(c.m, c.n(), c.k);
    let grouped_auto = run_grouped(gpu, &c, &wb, &sb, &xb, None);
    let grouped_same = run_grouped(gpu, &c, &wb, &sb, &xb, Some(per_group_split));
    for g in 0..c.groups {
        // Today's path: the plain kernel on this group alone.
        let (plain, reference) = plain_group(gpu, &c, &d, (&wb, &sb), g);

        let auto_g = group_cols(&c, &grouped_auto, g);
        let same_g = group_cols(&c, &grouped_same, g);
        let e_plain = rel_err(&f64s(&plain), &reference);
        let e_auto = rel_err(&f64s(&auto_g), &reference);
        let e_same = rel_err(&f64s(&same_g), &reference);
        assert!(
            e_plain < TOL,
            "{c:?} group {g}: plain kernel rel err {e_plain}"
        );
        assert!(e_auto < TOL, "{c:?} group {g}: grouped rel err {e_auto}");
        assert!(
            e_same < TOL,
            "{c:?} group {g}: grouped (ksplit {per_group_split}) rel err {e_same}"
        );
        let differing = |v: &[f32]| {
            v.iter()
                .zip(&plain)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count()
        };
        // Same split => same arithmetic => same bits (see the file comment).
        assert_eq!(
            differing(&same_g),
            0,
            "{c:?} group {g}: grouped with ksplit {per_group_split} differs from the plain kernel"
        );
        if auto_split == per_group_split {
            assert_eq!(differing(&auto_g), 0, "{c:?} group {g}: not bit-identical");
        }
        if g == 0 {
            eprintln!(
                "{c:?}: rel err vs f64 reference: grouped {e_auto:.2e} (ksplit {auto_split}), \
                 plain per group {e_plain:.2e} (ksplit {per_group_split}); {} of {} outputs of \
                 group 0 differ in bits between the two splits",
                differing(&auto_g),
                plain.len()
            );
        }
    }
}

/// The one-chunk kernels (`Kernels::set_fp8_one_chunk`: one token, four rows a warp, every lane
/// at most one chunk of a row) against the two-row kernels at the same split: the same bits,
/// grouped and plain; and the reference tolerance.
#[test]
fn fp8_one_chunk_kernels_give_the_two_row_kernels_bits() {
    let _lock = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut gpu) = gpu("fp8_one_chunk_kernels_give_the_two_row_kernels_bits") else {
        return;
    };
    // wo_a at TP=2 (4 x [1024, 4096]), wq_b's K (1024: two warps a row set), and a K whose
    // last lanes have no chunk (65 chunks over 128 lanes); NaN gaps between the groups' inputs.
    let cases = [
        Case {
            groups: 4,
            rows: 1024,
            k: 4096,
            m: 1,
            gap: 0,
        },
        Case {
            groups: 4,
            rows: 256,
            k: 1024,
            m: 1,
            gap: 16,
        },
        Case {
            groups: 2,
            rows: 256,
            k: 1040,
            m: 1,
            gap: 4,
        },
    ];
    let loaded = gpu.k.fp8_one_chunk();
    for (i, c) in cases.into_iter().enumerate() {
        let d = data(&c, 0x1c4a_0000 + i as u64);
        let (wb, sb, xb) = (gpu.up(&d.w), gpu.up(&d.s), gpu.up(&d.x));
        let ks = fp8_ksplit_one_chunk(c.k);
        gpu.k.set_fp8_one_chunk(false);
        let two_row = run_grouped(&gpu, &c, &wb, &sb, &xb, Some(ks));
        gpu.k.set_fp8_one_chunk(true);
        assert_eq!(gpu.k.fp8_split(1, c.n(), c.k), ks);
        let one_chunk = run_grouped(&gpu, &c, &wb, &sb, &xb, None);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&one_chunk),
            bits(&two_row),
            "{c:?}: grouped, one-chunk against two-row"
        );
        for g in 0..c.groups {
            // The plain kernel, on the one-chunk kernel too now.
            let (plain, reference) = plain_group(&gpu, &c, &d, (&wb, &sb), g);
            let grouped = group_cols(&c, &one_chunk, g);
            assert_eq!(
                bits(&plain),
                bits(&grouped),
                "{c:?} group {g}: plain one-chunk kernel"
            );
            let e = rel_err(&f64s(&plain), &reference);
            assert!(e < TOL, "{c:?} group {g}: one-chunk rel err {e}");
        }
        gpu.k.set_fp8_one_chunk(loaded);
        eprintln!("{c:?}: one-chunk kernels at ksplit {ks}: the two-row kernels' bits");
    }
}

#[test]
fn fp8_grouped_matches_reference_and_per_group_kernel() {
    let _lock = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = gpu("fp8_grouped_matches_reference_and_per_group_kernel") else {
        return;
    };
    // DeepSeek-V4-Flash wo_a: 8 groups of [1024, 4096]; contiguous inputs (the real layout) and
    // with NaN gaps between groups and rows.
    for (m, gap) in [(1, 0), (3, 16), (16, 0), (16, 16)] {
        let c = Case {
            groups: 8,
            rows: 1024,
            k: 4096,
            m,
            gap,
        };
        check_case(&gpu, c, 0x5eed_0000 + m as u64);
    }
    for m in [1, 3, 5, 16] {
        let c = Case {
            groups: 2,
            rows: 128,
            k: 256,
            m,
            gap: 16,
        };
        check_case(&gpu, c, 0x7a1_0000 + m as u64);
    }
}

/// GPU time per call: `reps` calls back to back between two events, queued behind a spin kernel so
/// the host's launch cost stays out (what a CUDA graph of these launches would sustain), and the
/// median of events around each call alone.
fn time_us(gpu: &Gpu, reps: usize, mut call: impl FnMut()) -> (f64, f64) {
    for _ in 0..5 {
        call();
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
    for _ in 0..reps {
        call();
    }
    end.record(&gpu.s).unwrap();
    gpu.s.synchronize().unwrap();
    let b2b = f64::from(start.elapsed_ms(&end).unwrap()) * 1000.0 / reps as f64;
    let pairs: Vec<_> = (0..reps).map(|_| (ev(), ev())).collect();
    gpu.k.spin(&gpu.s, 20_000_000).unwrap();
    for (a, b) in &pairs {
        a.record(&gpu.s).unwrap();
        call();
        b.record(&gpu.s).unwrap();
    }
    gpu.s.synchronize().unwrap();
    let mut each: Vec<f64> = pairs
        .iter()
        .map(|(a, b)| f64::from(a.elapsed_ms(b).unwrap()) * 1000.0)
        .collect();
    each.sort_by(f64::total_cmp);
    (b2b, each[reps / 2])
}

#[test]
fn fp8_grouped_bandwidth_m1() {
    let _lock = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = gpu("fp8_grouped_bandwidth_m1") else {
        return;
    };
    let c = Case {
        groups: 8,
        rows: 1024,
        k: 4096,
        m: 1,
        gap: 0,
    };
    let d = data(&c, 0xb_0000);
    let (wb, sb, xb) = (gpu.up(&d.w), gpu.up(&d.s), gpu.up(&d.x));
    let out = gpu.up(&vec![0f32; c.n()]);
    let (wp, sp, xp, op) = (gpu.ptr(&wb), gpu.ptr(&sb), gpu.ptr(&xb), gpu.ptr(&out));
    let grouped = Fp8GroupedGemv {
        weight: wp,
        scale: sp,
        x: xp,
        out: op,
        m: 1,
        n: c.n(),
        k: c.k,
        group_rows: c.rows,
        x_group_stride: c.k,
        ld_x: c.ld_x(),
        ld_out: c.n(),
    };
    // At M = 1 each group's inputs are already contiguous: the plain launches need no copies.
    let (wrows, srows) = (c.rows * c.k, c.rows / 128 * c.kb());
    let plain: Vec<Fp8Gemv> = (0..c.groups)
        .map(|g| Fp8Gemv {
            weight: wp + (g * wrows) as u64,
            scale: sp + (g * srows) as u64,
            x: xp + (g * c.k * 4) as u64,
            x_dtype: ActDtype::F32,
            out: op + (g * c.rows * 4) as u64,
            out_dtype: OutDtype::F32,
            m: 1,
            n: c.rows,
            k: c.k,
        })
        .collect();
    let (auto_split, group_split) = (
        gpu.k.fp8_split(1, c.n(), c.k),
        gpu.k.fp8_split(1, c.rows, c.k),
    );
    let bytes = (d.w.len() + d.s.len() + 4 * (c.groups * c.k + c.n())) as f64;
    let reps = 200;
    let report = |what: &str, (b2b, median): (f64, f64)| {
        eprintln!(
            "fp8 wo_a 8x[1024,4096] M=1 {what}: {b2b:.2} us back-to-back ({:.0} GB/s), \
             {median:.2} us median alone ({:.0} GB/s)",
            bytes / b2b / 1e3,
            bytes / median / 1e3
        );
    };
    // SAFETY (all three): the buffers hold the shapes in the descriptors built above.
    report(
        &format!("grouped, 1 launch (ksplit {auto_split})"),
        time_us(&gpu, reps, || {
            unsafe { gpu.k.fp8_gemv_grouped(&gpu.s, &grouped) }.unwrap()
        }),
    );
    report(
        &format!("grouped, 1 launch (ksplit {group_split})"),
        time_us(&gpu, reps, || {
            unsafe { gpu.k.fp8_gemv_grouped_ksplit(&gpu.s, &grouped, group_split) }.unwrap()
        }),
    );
    report(
        &format!("plain, {} launches (ksplit {group_split})", c.groups),
        time_us(&gpu, reps, || {
            for a in &plain {
                unsafe { gpu.k.fp8_gemv_path(&gpu.s, a, Fp8Path::CudaCore) }.unwrap();
            }
        }),
    );
}
