//! GPU check + bench of the dspark kernels.
//!
//! For every kernel: fresh random inputs, outputs poisoned (0xFF bytes = NaN), one launch, every
//! CUDA call checked and the stream synchronised, ‖out − ref‖ / ‖ref‖ against the f64 CPU
//! reference (`dspark_kernels::reference`) under a stated threshold. Then timing: CUDA events
//! around each launch, queued behind a spin kernel so launches run back to back, median of many
//! reps, inputs rotated over sets larger than L2; achieved GB/s against a device-to-device copy
//! measured in the same run. Table on stdout, CSV to $OUT/kernels.csv (or --out DIR).
//!
//! Usage: kernel-check [--quick] [--indexer] [--out DIR] [--reps N]
//!   --quick: small shapes, correctness only (for compute-sanitizer).
//!   --indexer: only the Lightning Indexer cases (f32 tiled kernel against the TF32 one).

// The case functions take their shapes as plain arguments: clearer here than a struct per case.
#![allow(clippy::too_many_arguments)]

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cudarc::driver::sys::{CUdeviceptr, CUevent_flags};
use cudarc::driver::{result as dres, CudaContext, CudaSlice, CudaStream, DevicePtr};
use dspark_kernels::formats::{bf16_to_f32, f32_to_bf16};
use dspark_kernels::launch::{self, topk_workspace_bytes};
use dspark_kernels::reference::{self, rel_err};
use dspark_kernels::{
    ActDtype, Bf16Gemv, Fp4Experts, Fp4MoeCall, Fp8Gemv, Fp8Path, IndexerScores, Kernels,
    KvRowFormat, LoaderConfig, MoePath, OutDtype, RmsNorm, Rope, TopK,
};

// ---------------------------------------------------------------- thresholds (see docs/KERNELS.md)
/// f32 outputs: products of e4m3/e2m1 with bf16/f32 inputs are exact in f32, so the only error is
/// f32 summation in another order, ~u·sqrt(K) ≈ 6e-8·90 ≈ 5e-6. 1e-4 leaves margin; a wrong scale,
/// nibble order or skipped chunk gives > 1e-2.
const TOL_F32: f64 = 1e-4;
/// bf16 outputs: one final rounding, relative ≤ 2^-9 ≈ 1.95e-3 per element, plus the f32 part.
const TOL_BF16: f64 = 2.0e-3 + TOL_F32;
/// RMSNorm rounds twice as transformers does (normalised x to bf16, then w·x to bf16): 2·2^-9.
const TOL_RMSNORM: f64 = 2.0 * 1.95e-3 + TOL_F32;

// ---------------------------------------------------------------- rng + byte helpers
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unif(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    /// e4m3 bytes without the NaN codes (0x7F, 0xFF).
    fn e4m3(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        for b in &mut v {
            if *b & 0x7F == 0x7F {
                *b &= 0xFE;
            }
        }
        v
    }
    /// E8M0 scales in [lo, lo + span).
    fn e8m0(&mut self, n: usize, lo: u8, span: u8) -> Vec<u8> {
        (0..n)
            .map(|_| lo + (self.next_u64() % u64::from(span)) as u8)
            .collect()
    }
    fn bf16s(&mut self, n: usize, amp: f32) -> Vec<u16> {
        (0..n).map(|_| f32_to_bf16(self.unif() * amp)).collect()
    }
    fn f32s(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.unif() * amp).collect()
    }
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

fn bytes_of<T: Copy>(v: &[T]) -> Vec<u8> {
    let n = std::mem::size_of_val(v);
    // SAFETY: plain-old-data slice viewed as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), n) }.to_vec()
}

fn f32s_of(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
fn u16s_of(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}
fn i32s_of(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn out_f64(bytes: &[u8], dt: OutDtype) -> Vec<f64> {
    match dt {
        OutDtype::F32 => f32s_of(bytes).into_iter().map(f64::from).collect(),
        OutDtype::Bf16 => u16s_of(bytes)
            .into_iter()
            .map(|h| f64::from(bf16_to_f32(h)))
            .collect(),
    }
}

// ---------------------------------------------------------------- device helpers
struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

struct Buf {
    slice: CudaSlice<u8>,
    ptr: CUdeviceptr,
    len: usize,
}

impl Gpu {
    fn alloc(&self, len: usize) -> Result<Buf> {
        // SAFETY: raw bytes; every buffer is written (upload or poison) before it is read.
        let slice = unsafe { self.stream.alloc::<u8>(len.max(16)) }.context("cuMemAlloc")?;
        let ptr = slice.device_ptr(&self.stream).0;
        Ok(Buf { slice, ptr, len })
    }
    fn upload(&self, data: &[u8]) -> Result<Buf> {
        let mut b = self.alloc(data.len())?;
        if !data.is_empty() {
            self.stream
                .memcpy_htod(data, &mut b.slice)
                .context("memcpy H2D")?;
        }
        Ok(b)
    }
    fn upload_at(&self, b: &mut Buf, data: &[u8]) -> Result<()> {
        self.stream
            .memcpy_htod(data, &mut b.slice)
            .context("memcpy H2D")
    }
    fn poison(&self, b: &Buf) -> Result<()> {
        // SAFETY: b.ptr is a live allocation of b.len bytes on this stream.
        unsafe { dres::memset_d8_async(b.ptr, 0xFF, b.len, self.stream.cu_stream()) }
            .context("memset poison")
    }
    fn download(&self, b: &Buf) -> Result<Vec<u8>> {
        let mut v = self.stream.clone_dtoh(&b.slice).context("memcpy D2H")?;
        v.truncate(b.len);
        Ok(v)
    }
    fn sync(&self, what: &str) -> Result<()> {
        self.stream
            .synchronize()
            .with_context(|| format!("kernel failed: {what}"))
    }

    /// GPU time of `launch(i)`: the median over `reps` of events around each launch (queued behind
    /// a spin kernel so the host's launch cost stays out), and the mean per launch of `reps`
    /// launches back to back between two events (what a stream of such kernels sustains).
    fn time(
        &self,
        k: &Kernels,
        reps: usize,
        mut launch: impl FnMut(usize) -> Result<()>,
    ) -> Result<Timing> {
        for i in 0..5 {
            launch(i)?;
        }
        self.sync("warm-up")?;
        let mut evs = Vec::with_capacity(2 * reps + 2);
        for _ in 0..2 * reps + 2 {
            evs.push(
                self.ctx
                    .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .context("event")?,
            );
        }
        // Hold the stream while the host queues everything (~60 µs per rep is generous).
        k.spin(&self.stream, 5_000_000 + 60_000 * reps as u64)?;
        for i in 0..reps {
            evs[2 * i].record(&self.stream).context("event record")?;
            launch(i)?;
            evs[2 * i + 1]
                .record(&self.stream)
                .context("event record")?;
        }
        self.sync("timed launches")?;
        let mut t: Vec<f64> = (0..reps)
            .map(|i| {
                evs[2 * i]
                    .elapsed_ms(&evs[2 * i + 1])
                    .map(|ms| f64::from(ms) * 1000.0)
            })
            .collect::<Result<_, _>>()
            .context("event elapsed")?;
        t.sort_by(f64::total_cmp);
        k.spin(&self.stream, 5_000_000 + 60_000 * reps as u64)?;
        evs[2 * reps].record(&self.stream).context("event record")?;
        for i in 0..reps {
            launch(i)?;
        }
        evs[2 * reps + 1]
            .record(&self.stream)
            .context("event record")?;
        self.sync("back-to-back launches")?;
        let total = evs[2 * reps]
            .elapsed_ms(&evs[2 * reps + 1])
            .context("event elapsed")?;
        Ok(Timing {
            median_us: t[reps / 2],
            b2b_us: f64::from(total) * 1000.0 / reps as f64,
        })
    }
}

#[derive(Clone, Copy)]
struct Timing {
    median_us: f64,
    b2b_us: f64,
}

// ---------------------------------------------------------------- report
struct Row {
    kernel: &'static str,
    case: String,
    check: Option<(f64, f64)>,
    time_us: Option<Timing>,
    bytes: f64,
}

struct Report {
    rows: Vec<Row>,
    copy_gbps: f64,
    failures: usize,
}

impl Report {
    fn check(&mut self, kernel: &'static str, case: String, err: f64, tol: f64) {
        let ok = err <= tol;
        if !ok {
            self.failures += 1;
        }
        println!(
            "{} {kernel:<10} {case:<52} rel_err {err:.3e} (tol {tol:.1e})",
            if ok { "PASS" } else { "FAIL" }
        );
        self.rows.push(Row {
            kernel,
            case,
            check: Some((err, tol)),
            time_us: None,
            bytes: 0.0,
        });
    }
    fn exact(&mut self, kernel: &'static str, case: String, ok: bool, detail: &str) {
        if !ok {
            self.failures += 1;
        }
        println!(
            "{} {kernel:<10} {case:<52} {detail}",
            if ok { "PASS" } else { "FAIL" }
        );
        self.rows.push(Row {
            kernel,
            case,
            check: Some((if ok { 0.0 } else { 1.0 }, 0.0)),
            time_us: None,
            bytes: 0.0,
        });
    }
    /// GB/s uses the back-to-back time (per-launch events add a fixed overhead; both are shown).
    fn timed(&mut self, kernel: &'static str, case: String, tm: Timing, bytes: f64) {
        let gbps = bytes / (tm.b2b_us * 1e3);
        println!(
            "TIME {kernel:<10} {case:<52} {:>8.2} us b2b {:>8.2} us ev {:>8.1} GB/s {:>5.1}% of copy",
            tm.b2b_us,
            tm.median_us,
            gbps,
            100.0 * gbps / self.copy_gbps
        );
        self.rows.push(Row {
            kernel,
            case,
            check: None,
            time_us: Some(tm),
            bytes,
        });
    }
    fn csv(&self) -> String {
        let mut s = String::from(
            "kernel,case,rel_err,threshold,pass,b2b_us,event_median_us,bytes,gbps,pct_of_copy\n",
        );
        for r in &self.rows {
            let (e, t, p) = match r.check {
                Some((e, t)) => (format!("{e:.3e}"), format!("{t:.1e}"), (e <= t).to_string()),
                None => (String::new(), String::new(), String::new()),
            };
            let (us, gb, pct) = match r.time_us {
                Some(tm) => {
                    let g = r.bytes / (tm.b2b_us * 1e3);
                    (
                        format!("{:.2},{:.2}", tm.b2b_us, tm.median_us),
                        format!("{g:.1}"),
                        format!("{:.1}", 100.0 * g / self.copy_gbps),
                    )
                }
                None => (",".to_string(), String::new(), String::new()),
            };
            let _ = writeln!(
                s,
                "{},\"{}\",{e},{t},{p},{us},{:.0},{gb},{pct}",
                r.kernel, r.case, r.bytes,
            );
        }
        let _ = writeln!(
            s,
            "copy,\"device-to-device copy (read+write)\",,,,,,,{:.1},100.0",
            self.copy_gbps
        );
        s
    }
}

// ---------------------------------------------------------------- copy ceiling
fn measure_copy(gpu: &Gpu, k: &Kernels, bytes: usize) -> Result<f64> {
    let src = gpu.alloc(bytes)?;
    let mut dst = gpu.alloc(bytes)?;
    gpu.poison(&src)?;
    let us = gpu.time(k, 20, |_| {
        gpu.stream
            .memcpy_dtod(&src.slice, &mut dst.slice)
            .context("memcpy D2D")
    })?;
    Ok(2.0 * bytes as f64 / (us.b2b_us * 1e3))
}

// ---------------------------------------------------------------- FP8 GEMV
fn fp8_case(
    gpu: &Gpu,
    k: &Kernels,
    rep: &mut Report,
    rng: &mut Rng,
    m: usize,
    n: usize,
    kd: usize,
    xd: ActDtype,
    od: OutDtype,
    subnormal: bool,
    path: Fp8Path,
) -> Result<()> {
    let mut w = rng.e4m3(n * kd);
    if subnormal {
        for b in &mut w {
            *b &= 0x87; // exponent 0: only e4m3 subnormals (and zeros)
        }
    }
    let s = rng.e8m0(n.div_ceil(128) * kd.div_ceil(128), 118, 12);
    let (xbytes, xval): (Vec<u8>, Vec<f32>) = match xd {
        ActDtype::Bf16 => {
            let x = rng.bf16s(m * kd, 2.0);
            (bytes_of(&x), x.iter().map(|&h| bf16_to_f32(h)).collect())
        }
        ActDtype::F32 => {
            let x = rng.f32s(m * kd, 2.0);
            (bytes_of(&x), x)
        }
    };
    let (wb, sb, xb) = (gpu.upload(&w)?, gpu.upload(&s)?, gpu.upload(&xbytes)?);
    let osz = if od == OutDtype::F32 { 4 } else { 2 };
    let ob = gpu.alloc(m * n * osz)?;
    gpu.poison(&ob)?;
    let a = Fp8Gemv {
        weight: wb.ptr,
        scale: sb.ptr,
        x: xb.ptr,
        x_dtype: xd,
        out: ob.ptr,
        out_dtype: od,
        m,
        n,
        k: kd,
    };
    // SAFETY: buffers sized for exactly these shapes above.
    unsafe { k.fp8_gemv_path(&gpu.stream, &a, path) }?;
    gpu.sync("fp8_gemv")?;
    let out = out_f64(&gpu.download(&ob)?, od);
    let r = reference::fp8_gemv(&w, &s, &xval, m, n, kd);
    let tol = if od == OutDtype::F32 {
        TOL_F32
    } else {
        TOL_BF16
    };
    rep.check(
        "fp8_gemv",
        format!(
            "{path:?} m{m} n{n} k{kd} x{xd:?} out{od:?}{}",
            if subnormal { " subnormal-W" } else { "" }
        ),
        rel_err(&out, &r),
        tol,
    );
    Ok(())
}

fn fp8_bench(
    gpu: &Gpu,
    k: &Kernels,
    rep: &mut Report,
    rng: &mut Rng,
    label: &str,
    m: usize,
    n: usize,
    kd: usize,
    reps: usize,
    path: Fp8Path,
) -> Result<()> {
    let wbytes = n * kd;
    let sbytes = n.div_ceil(128) * kd.div_ceil(128);
    let sets = (512usize << 20).div_ceil(wbytes).clamp(2, 64);
    let w = rng.e4m3(wbytes);
    let s = rng.e8m0(sbytes, 118, 12);
    let mut wset = Vec::new();
    for _ in 0..sets {
        wset.push((gpu.upload(&w)?, gpu.upload(&s)?));
    }
    let xb = gpu.upload(&bytes_of(&rng.bf16s(m * kd, 2.0)))?;
    let ob = gpu.alloc(m * n * 2)?;
    let us = gpu.time(k, reps, |i| {
        let (wb, sb) = &wset[i % sets];
        let a = Fp8Gemv {
            weight: wb.ptr,
            scale: sb.ptr,
            x: xb.ptr,
            x_dtype: ActDtype::Bf16,
            out: ob.ptr,
            out_dtype: OutDtype::Bf16,
            m,
            n,
            k: kd,
        };
        // SAFETY: buffers sized for these shapes.
        unsafe { k.fp8_gemv_path(&gpu.stream, &a, path) }.map_err(Into::into)
    })?;
    let bytes = (wbytes + sbytes + m * kd * 2 + m * n * 2) as f64;
    rep.timed(
        "fp8_gemv",
        format!("{path:?} {label} m{m} n{n} k{kd}"),
        us,
        bytes,
    );
    Ok(())
}

// ---------------------------------------------------------------- bf16 GEMV
fn bf16_case(
    gpu: &Gpu,
    k: &Kernels,
    rep: &mut Report,
    rng: &mut Rng,
    m: usize,
    n: usize,
    kd: usize,
) -> Result<()> {
    let w = rng.bf16s(n * kd, 1.0);
    let x = rng.f32s(m * kd, 2.0);
    let wb = gpu.upload(&bytes_of(&w))?;
    let xb = gpu.upload(&bytes_of(&x))?;
    let ob = gpu.alloc(m * n * 4)?;
    gpu.poison(&ob)?;
    let a = Bf16Gemv {
        weight: wb.ptr,
        x: xb.ptr,
        out: ob.ptr,
        m,
        n,
        k: kd,
    };
    // SAFETY: buffers sized for these shapes.
    unsafe { k.bf16_gemv(&gpu.stream, &a) }?;
    gpu.sync("bf16_gemv")?;
    let out: Vec<f64> = f32s_of(&gpu.download(&ob)?)
        .into_iter()
        .map(f64::from)
        .collect();
    let mut r = vec![0f64; m * n];
    for t in 0..m {
        for row in 0..n {
            r[t * n + row] = (0..kd)
                .map(|j| f64::from(bf16_to_f32(w[row * kd + j])) * f64::from(x[t * kd + j]))
                .sum();
        }
    }
    rep.check(
        "bf16_gemv",
        format!("m{m} n{n} k{kd}"),
        rel_err(&out, &r),
        TOL_F32,
    );
    Ok(())
}

fn bf16_bench(
    gpu: &Gpu,
    k: &Kernels,
    rep: &mut Report,
    rng: &mut Rng,
    label: &str,
    m: usize,
    n: usize,
    kd: usize,
    reps: usize,
) -> Result<()> {
    let wbytes = n * kd * 2;
    let sets = (512usize << 20).div_ceil(wbytes).clamp(2, 64);
    let w = bytes_of(&rng.bf16s(n * kd, 1.0));
    let mut wset = Vec::new();
    for _ in 0..sets {
        wset.push(gpu.upload(&w)?);
    }
    let xb = gpu.upload(&bytes_of(&rng.f32s(m * kd, 2.0)))?;
    let ob = gpu.alloc(m * n * 4)?;
    let us = gpu.time(k, reps, |i| {
        let a = Bf16Gemv {
            weight: wset[i % sets].ptr,
            x: xb.ptr,
            out: ob.ptr,
            m,
            n,
            k: kd,
        };
        // SAFETY: buffers sized for these shapes.
        unsafe { k.bf16_gemv(&gpu.stream, &a) }.map_err(Into::into)
    })?;
    let bytes = (wbytes + m * kd * 4 + m * n * 4) as f64;
    rep.timed("bf16_gemv", format!("{label} m{m} n{n} k{kd}"), us, bytes);
    Ok(())
}

// ---------------------------------------------------------------- FP4 MoE
struct MoeLayer {
    w1: Vec<u8>,
    s1: Vec<u8>,
    w3: Vec<u8>,
    s3: Vec<u8>,
    w2: Vec<u8>,
    s2: Vec<u8>,
    d: [Buf; 6],
    experts: usize,
    hidden: usize,
}

fn moe_layer(
    gpu: &Gpu,
    rng: &mut Rng,
    experts: usize,
    hidden: usize,
    inter: usize,
) -> Result<MoeLayer> {
    let mut rand_bytes = |n: usize| {
        let mut v = vec![0u8; n];
        rng.fill(&mut v);
        v
    };
    let (w1, w3, w2) = (
        rand_bytes(experts * inter * hidden / 2),
        rand_bytes(experts * inter * hidden / 2),
        rand_bytes(experts * hidden * inter / 2),
    );
    let s1 = rng.e8m0(experts * inter * hidden / 32, 118, 8);
    let s3 = rng.e8m0(experts * inter * hidden / 32, 118, 8);
    let s2 = rng.e8m0(experts * hidden * inter / 32, 118, 8);
    let d = [
        gpu.upload(&w1)?,
        gpu.upload(&s1)?,
        gpu.upload(&w3)?,
        gpu.upload(&s3)?,
        gpu.upload(&w2)?,
        gpu.upload(&s2)?,
    ];
    Ok(MoeLayer {
        w1,
        s1,
        w3,
        s3,
        w2,
        s2,
        d,
        experts,
        hidden,
    })
}

impl MoeLayer {
    /// The same memory viewed with a smaller intermediate size (the TP=2 shard shape).
    fn experts_arg(&self, inter: usize) -> Fp4Experts {
        Fp4Experts {
            w1: self.d[0].ptr,
            s1: self.d[1].ptr,
            w3: self.d[2].ptr,
            s3: self.d[3].ptr,
            w2: self.d[4].ptr,
            s2: self.d[5].ptr,
            experts: self.experts,
            hidden: self.hidden,
            inter,
        }
    }
}

/// Top-k ids per token: distinct within a token; `share` forces token t > 0 to reuse token 0's first expert.
fn draw_ids(rng: &mut Rng, tokens: usize, topk: usize, experts: usize, share: bool) -> Vec<i32> {
    let mut ids = Vec::with_capacity(tokens * topk);
    for t in 0..tokens {
        let mut row: Vec<i32> = Vec::new();
        if share && t > 0 {
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
    ids
}

fn moe_case(
    gpu: &Gpu,
    k: &Kernels,
    rep: &mut Report,
    rng: &mut Rng,
    l: &MoeLayer,
    inter: usize,
    tokens: usize,
    od: OutDtype,
    bad_id: bool,
    path: MoePath,
) -> Result<()> {
    let topk = 6;
    let mut ids = draw_ids(rng, tokens, topk, l.experts, true);
    if bad_id {
        ids[topk - 1] = -1; // must be skipped, never read
    }
    let weights: Vec<f32> = (0..tokens * topk)
        .map(|_| 0.1 + 0.4 * (rng.unif() + 1.0))
        .collect();
    let x = rng.f32s(tokens * l.hidden, 1.0);
    let (xb, ib, wb) = (
        gpu.upload(&bytes_of(&x))?,
        gpu.upload(&bytes_of(&ids))?,
        gpu.upload(&bytes_of(&weights))?,
    );
    let hb = gpu.alloc(tokens * topk * inter * 4)?;
    let pb = gpu.alloc(tokens * topk * l.hidden * 4)?;
    let osz = if od == OutDtype::F32 { 4 } else { 2 };
    let ob = gpu.alloc(tokens * l.hidden * osz)?;
    gpu.poison(&hb)?;
    gpu.poison(&pb)?;
    gpu.poison(&ob)?;
    let c = Fp4MoeCall {
        partial: pb.ptr,
        x: xb.ptr,
        ids: ib.ptr,
        weights: wb.ptr,
        h: hb.ptr,
        out: ob.ptr,
        out_dtype: od,
        tokens,
        topk,
        swiglu_limit: 10.0,
        addend: 0,
    };
    // SAFETY: buffers sized for these shapes; the layer holds `experts` experts at this inter or larger.
    unsafe { k.fp4_moe_path(&gpu.stream, &l.experts_arg(inter), &c, path) }?;
    gpu.sync("fp4_moe")?;
    let h = f32s_of(&gpu.download(&hb)?)
        .into_iter()
        .map(f64::from)
        .collect::<Vec<_>>();
    let out = out_f64(&gpu.download(&ob)?, od);
    let sh = reference::MoeShape {
        experts: l.experts,
        hidden: l.hidden,
        inter,
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
    let name = format!(
        "{path:?} T{tokens} top{topk} E{} I{inter} H{}{}",
        l.experts,
        l.hidden,
        if bad_id { " +invalid id" } else { "" }
    );
    // Clipping must actually happen for the check to cover it.
    let clipped = rh.iter().filter(|v| v.abs() > 5.0).count();
    rep.check(
        "fp4_moe",
        format!("{name} h (f32; {clipped} near clip)"),
        rel_err(&h, &rh),
        TOL_F32,
    );
    let tol = if od == OutDtype::F32 {
        TOL_F32
    } else {
        TOL_BF16
    };
    rep.check(
        "fp4_moe",
        format!("{name} out{od:?}"),
        rel_err(&out, &rout),
        tol,
    );
    Ok(())
}

fn moe_bench(
    gpu: &Gpu,
    k: &Kernels,
    rep: &mut Report,
    rng: &mut Rng,
    l: &MoeLayer,
    inter: usize,
    tokens: usize,
    reps: usize,
    path: MoePath,
) -> Result<()> {
    let topk = 6;
    let mut all_ids = Vec::new();
    let mut uniq_total = 0usize;
    for _ in 0..reps + 5 {
        let ids = draw_ids(rng, tokens, topk, l.experts, false);
        let mut u = ids.clone();
        u.sort_unstable();
        u.dedup();
        uniq_total += u.len();
        all_ids.extend(ids);
    }
    let ib = gpu.upload(&bytes_of(&all_ids))?;
    let wts: Vec<f32> = (0..tokens * topk).map(|_| 1.0 / 6.0).collect();
    let wb = gpu.upload(&bytes_of(&wts))?;
    let xb = gpu.upload(&bytes_of(&rng.f32s(tokens * l.hidden, 1.0)))?;
    let hb = gpu.alloc(tokens * topk * inter * 4)?;
    let pb = gpu.alloc(tokens * topk * l.hidden * 4)?;
    let ob = gpu.alloc(tokens * l.hidden * 2)?;
    let ex = l.experts_arg(inter);
    let us = gpu.time(k, reps, |i| {
        let c = Fp4MoeCall {
            partial: pb.ptr,
            x: xb.ptr,
            ids: ib.ptr + (i * tokens * topk * 4) as u64,
            weights: wb.ptr,
            h: hb.ptr,
            out: ob.ptr,
            out_dtype: OutDtype::Bf16,
            tokens,
            topk,
            swiglu_limit: 10.0,
            addend: 0,
        };
        // SAFETY: ids buffer holds reps+5 id sets; others sized above.
        unsafe { k.fp4_moe_path(&gpu.stream, &ex, &c, path) }.map_err(Into::into)
    })?;
    let uniq = uniq_total as f64 / (reps + 5) as f64;
    let per_expert = (3 * inter * l.hidden / 2 + 3 * inter * l.hidden / 32) as f64;
    // The fewest bytes: the selected experts' weights and scales, x in, out (bf16) back.
    let bytes = uniq * per_expert + (tokens * l.hidden * 4 + tokens * l.hidden * 2) as f64;
    rep.timed(
        "fp4_moe",
        format!(
            "{path:?} T{tokens} top{topk} I{inter} H{} ({uniq:.1} experts)",
            l.hidden
        ),
        us,
        bytes,
    );
    Ok(())
}

// ---------------------------------------------------------------- RMSNorm
fn rmsnorm_case(
    gpu: &Gpu,
    k: &Kernels,
    rep: &mut Report,
    rng: &mut Rng,
    rows: usize,
    d: usize,
    reps: Option<usize>,
) -> Result<()> {
    let x = rng.bf16s(rows * d, 3.0);
    let w = rng.bf16s(d, 1.5);
    let (xb, wb) = (gpu.upload(&bytes_of(&x))?, gpu.upload(&bytes_of(&w))?);
    let ob = gpu.alloc(rows * d * 2)?;
    gpu.poison(&ob)?;
    let a = RmsNorm {
        x: xb.ptr,
        weight: wb.ptr,
        out: ob.ptr,
        rows,
        d,
        ld_x: d,
        ld_out: d,
        eps: 1e-6,
    };
    // SAFETY: sized above.
    unsafe { k.rmsnorm(&gpu.stream, &a) }?;
    gpu.sync("rmsnorm")?;
    let out = out_f64(&gpu.download(&ob)?, OutDtype::Bf16);
    rep.check(
        "rmsnorm",
        format!("rows{rows} d{d}"),
        rel_err(&out, &reference::rmsnorm(&x, &w, rows, d, 1e-6)),
        TOL_RMSNORM,
    );
    if let Some(reps) = reps {
        let sets = (256usize << 20).div_ceil(rows * d * 4).clamp(1, 64);
        let mut bufs = Vec::new();
        for _ in 0..sets {
            bufs.push((gpu.upload(&bytes_of(&x))?, gpu.alloc(rows * d * 2)?));
        }
        let us = gpu.time(k, reps, |i| {
            let (xi, oi) = &bufs[i % sets];
            let a = RmsNorm {
                x: xi.ptr,
                out: oi.ptr,
                ..a
            };
            // SAFETY: sized above.
            unsafe { k.rmsnorm(&gpu.stream, &a) }.map_err(Into::into)
        })?;
        rep.timed(
            "rmsnorm",
            format!("rows{rows} d{d}"),
            us,
            (2 * rows * d * 2 + d * 2) as f64,
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- RoPE
fn inv_freq(rope_dim: usize, theta: f64) -> Vec<f32> {
    (0..rope_dim / 2)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / rope_dim as f64)) as f32)
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn rope_case(
    gpu: &Gpu,
    k: &Kernels,
    rep: &mut Report,
    rng: &mut Rng,
    tokens: usize,
    heads: usize,
    mscale: f32,
    inverse: bool,
    reps: Option<usize>,
) -> Result<()> {
    let (d, rd) = (512, 64);
    let x = rng.bf16s(tokens * heads * d, 2.0);
    let pos: Vec<i32> = (0..tokens).map(|_| rng.below(1 << 20) as i32).collect();
    let f = inv_freq(rd, 10000.0);
    let mut xb = gpu.upload(&bytes_of(&x))?;
    let (pb, fb) = (gpu.upload(&bytes_of(&pos))?, gpu.upload(&bytes_of(&f))?);
    let a = Rope {
        x: xb.ptr,
        positions: pb.ptr,
        inv_freq: fb.ptr,
        tokens,
        heads,
        d,
        rope_dim: rd,
        ld_token: heads * d,
        ld_head: d,
        mscale,
        inverse,
    };
    // SAFETY: sized above.
    unsafe { k.rope(&gpu.stream, &a) }?;
    gpu.sync("rope")?;
    let out_bits = u16s_of(&gpu.download(&xb)?);
    let r = reference::rope_interleaved(&x, &pos, &f, heads, d, rd, mscale, inverse);
    // Split: the nope channels must be bit-identical (in place, untouched); the rope channels close.
    let (mut nope_ok, mut o_rope, mut r_rope) = (true, Vec::new(), Vec::new());
    for (i, (&o, &orig)) in out_bits.iter().zip(&x).enumerate() {
        if i % d < d - rd {
            nope_ok &= o == orig;
        } else {
            o_rope.push(f64::from(bf16_to_f32(o)));
            r_rope.push(r[i]);
        }
    }
    let case = format!(
        "T{tokens} H{heads} D{d} rope{rd} mscale{mscale}{}",
        if inverse { " inverse" } else { "" }
    );
    rep.exact("rope", format!("{case} nope untouched"), nope_ok, "bitwise");
    rep.check("rope", case.clone(), rel_err(&o_rope, &r_rope), TOL_BF16);
    if let Some(reps) = reps {
        gpu.upload_at(&mut xb, &bytes_of(&x))?;
        let us = gpu.time(k, reps, |_| {
            // SAFETY: the same buffers as the checked launch (in place).
            unsafe { k.rope(&gpu.stream, &a) }.map_err(Into::into)
        })?;
        rep.timed(
            "rope",
            case,
            us,
            (tokens * heads * rd * 2 * 2 + tokens * 4) as f64,
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- top-k
/// Lightning Indexer scores of one decoding token over `rows` compressed rows stored as `format`
/// (V4-Flash: dim 128, ratio 4, block 128) through shuffled block tables: the TF32 tensor-core
/// kernel against the f32 tiled one on the same rows, then (with `reps`) both timed over three
/// row sets, together larger than L2. The check is a sanity bound (a wrong fragment or row is
/// off by ~1): TF32 moves a score by up to 2^-11 (2^-10 with f32 rows) of the magnitude behind
/// it, which can exceed the score itself; tests/indexer_mma_gpu.rs holds the precise bounds.
fn indexer_case(
    gpu: &Gpu,
    k: &Kernels,
    rep: &mut Report,
    rng: &mut Rng,
    format: KvRowFormat,
    heads: usize,
    rows: usize,
    reps: Option<usize>,
) -> Result<()> {
    let (dim, bs, ratio) = (128usize, 128usize, 4usize);
    let rows_per_block = bs / ratio;
    let stride = format.slots(dim);
    let fpb = rows_per_block * stride;
    let blocks = rows.div_ceil(rows_per_block);
    let sets = if reps.is_some() { 3 } else { 1 };
    let mut pool = vec![0u8; sets * blocks * fpb * 4];
    match format {
        KvRowFormat::F32 => {
            for c in pool.chunks_mut(4) {
                c.copy_from_slice(&rng.unif().to_le_bytes());
            }
        }
        KvRowFormat::Bf16 => {
            for c in pool.chunks_mut(2) {
                c.copy_from_slice(&f32_to_bf16(rng.unif()).to_le_bytes());
            }
        }
        _ => {
            // Records: dim e4m3 values, then an f32 power-of-two scale.
            for rec in pool.chunks_mut(stride * 4) {
                rec[..dim].copy_from_slice(&rng.e4m3(dim));
                let scale = 2f32.powi(rng.below(9) as i32 - 4);
                rec[dim..dim + 4].copy_from_slice(&scale.to_le_bytes());
            }
        }
    }
    let pool_b = gpu.upload(&pool)?;
    drop(pool);
    let mut tables = Vec::new();
    for set in 0..sets {
        let mut t: Vec<u32> = (0..blocks as u32)
            .map(|b| b + (set * blocks) as u32)
            .collect();
        for i in (1..t.len()).rev() {
            t.swap(i, rng.below(i + 1));
        }
        tables.push(gpu.upload(&bytes_of(&t))?);
    }
    let q = gpu.upload(&bytes_of(&rng.f32s(heads * dim, 1.0)))?;
    let w = gpu.upload(&bytes_of(&rng.f32s(heads, 0.2)))?;
    let zero = gpu.upload(&bytes_of(&[0i64]))?;
    let vis = gpu.upload(&bytes_of(&[rows as i32]))?;
    let outs = [gpu.alloc(rows * 4)?, gpu.alloc(rows * 4)?];
    let call = |set: usize, tensor_cores: bool| IndexerScores {
        pool: pool_b.ptr,
        q: q.ptr,
        weights: w.ptr,
        block_tables: tables[set].ptr,
        block_table_starts: zero.ptr,
        visible: vis.ptr,
        row_starts: 0,
        out_starts: zero.ptr,
        out: outs[usize::from(tensor_cores)].ptr,
        tokens: 1,
        max_visible: rows,
        floats_per_block: fpb,
        block_size: bs,
        base: 0,
        ratio,
        stride,
        heads,
        dim,
        scale: (dim as f32).powf(-0.5),
        format,
        tensor_cores,
    };
    let mut got = Vec::new();
    for tc in [false, true] {
        gpu.poison(&outs[usize::from(tc)])?;
        // SAFETY: every table covers `rows` rows of the pool; q, weights and out are sized above.
        unsafe { k.indexer_scores(&gpu.stream, &call(0, tc)) }?;
        gpu.sync("indexer_scores")?;
        let v: Vec<f64> = f32s_of(&gpu.download(&outs[usize::from(tc)])?)
            .into_iter()
            .map(f64::from)
            .collect();
        got.push(v);
    }
    let case = format!("{format:?} h{heads} d{dim} rows{rows}");
    rep.check(
        "indexer",
        format!("{case} tf32 vs f32"),
        rel_err(&got[1], &got[0]),
        1e-2,
    );
    if let Some(reps) = reps {
        for tc in [false, true] {
            let tm = gpu.time(k, reps, |i| {
                // SAFETY: as above.
                unsafe { k.indexer_scores(&gpu.stream, &call(i % sets, tc)) }.map_err(Into::into)
            })?;
            let kind = if tc { "tf32 mma" } else { "f32 tiled" };
            rep.timed(
                "indexer",
                format!("{case} {kind}"),
                tm,
                (rows * (stride + 1) * 4) as f64,
            );
        }
    }
    Ok(())
}

fn topk_case(
    gpu: &Gpu,
    k: &Kernels,
    rep: &mut Report,
    rng: &mut Rng,
    rows: usize,
    vocab: usize,
    kk: usize,
    reps: Option<usize>,
) -> Result<()> {
    let mut logits = rng.f32s(rows * vocab, 20.0);
    // A tie at the top: the smaller index must come first.
    let (a_i, b_i) = (rng.below(vocab / 2), vocab / 2 + rng.below(vocab / 2));
    logits[a_i] = 50.0;
    logits[b_i] = 50.0;
    let lb = gpu.upload(&bytes_of(&logits))?;
    let (vb, ib) = (gpu.alloc(rows * kk * 4)?, gpu.alloc(rows * kk * 4)?);
    let ws = gpu.alloc(topk_workspace_bytes(rows, vocab, kk))?;
    gpu.poison(&vb)?;
    gpu.poison(&ib)?;
    let a = TopK {
        logits: lb.ptr,
        rows,
        vocab,
        ld: vocab,
        k: kk,
        out_values: vb.ptr,
        out_indices: ib.ptr,
        workspace: ws.ptr,
    };
    // SAFETY: sized above.
    unsafe { k.topk(&gpu.stream, &a) }?;
    gpu.sync("topk")?;
    let (vals, idx) = (f32s_of(&gpu.download(&vb)?), i32s_of(&gpu.download(&ib)?));
    let mut ok = true;
    for r in 0..rows {
        let want = reference::topk(&logits[r * vocab..(r + 1) * vocab], kk);
        for (j, (wv, wi)) in want.iter().enumerate() {
            ok &= vals[r * kk + j] == *wv && idx[r * kk + j] == *wi;
        }
    }
    let case = format!("rows{rows} V{vocab} k{kk}");
    rep.exact(
        "topk",
        case.clone(),
        ok,
        "exact values + indices, tie -> lower index",
    );
    if let Some(reps) = reps {
        let sets = (256usize << 20).div_ceil(rows * vocab * 4).clamp(1, 256);
        let mut bufs = Vec::new();
        for _ in 0..sets {
            bufs.push(gpu.upload(&bytes_of(&logits))?);
        }
        let us = gpu.time(k, reps, |i| {
            let a = TopK {
                logits: bufs[i % sets].ptr,
                ..a
            };
            // SAFETY: sized above.
            unsafe { k.topk(&gpu.stream, &a) }.map_err(Into::into)
        })?;
        rep.timed("topk", case, us, (rows * vocab * 4) as f64);
    }
    Ok(())
}

// ---------------------------------------------------------------- main
fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only_indexer = args.iter().any(|a| a == "--indexer");
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let reps: usize = flag("--reps")
        .map(|s| s.parse())
        .transpose()
        .context("--reps")?
        .unwrap_or(200);
    let out_dir = flag("--out").or_else(|| std::env::var("OUT").ok());

    let ctx = match dspark_kernels::open_gpu(0) {
        Ok(c) => c,
        Err(e) => bail!("no usable GPU: {e}"),
    };
    // SAFETY: one stream, raw pointers: cudarc's per-buffer event tracking would only add events.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.default_stream();
    let gpu = Gpu {
        ctx: ctx.clone(),
        stream,
    };
    println!("GPU: {} (cc {:?})", ctx.name()?, ctx.compute_capability()?);

    let cfg = LoaderConfig::from_env();
    let t0 = Instant::now();
    let k = Kernels::load(&ctx, &cfg)?;
    println!(
        "kernels for {} loaded in {:.0} ms ({} SMs):",
        k.arch(),
        t0.elapsed().as_secs_f64() * 1e3,
        k.multiprocessors()
    );
    for (name, o) in k.origins() {
        println!("  {name:<10} {o:?}");
    }
    if cfg.cache_dir.is_some() {
        let t1 = Instant::now();
        let k2 = Kernels::load(&ctx, &cfg)?;
        let from_cache = k2
            .origins()
            .iter()
            .all(|(_, o)| !matches!(o, dspark_kernels::ModuleOrigin::Compiled { .. }));
        println!(
            "second load: {:.0} ms, no recompilation: {from_cache}",
            t1.elapsed().as_secs_f64() * 1e3
        );
    }

    if !quick {
        let floor = gpu.time(&k, 200, |_| k.spin(&gpu.stream, 0).map_err(Into::into))?;
        println!(
            "empty kernel: {:.2} us back to back, {:.2} us between events (the floors under the times below)",
            floor.b2b_us, floor.median_us
        );
    }
    let mut rng = Rng(seed());
    let mut rep = Report {
        rows: Vec::new(),
        copy_gbps: 0.0,
        failures: 0,
    };
    if !quick {
        rep.copy_gbps = measure_copy(&gpu, &k, 1 << 30)?;
        println!(
            "device-to-device copy: {:.1} GB/s (read + write)",
            rep.copy_gbps
        );
    } else {
        rep.copy_gbps = 1.0;
    }

    // Lightning Indexer: a 1M-token context's 262,144 compressed rows of a CSA layer, TP=1 and
    // TP=2 heads, every stored format.
    let indexer_rows = if quick { 5_000 } else { 262_144 };
    for format in [KvRowFormat::Fp8Indexer, KvRowFormat::Bf16, KvRowFormat::F32] {
        for heads in [64, 32] {
            let timed = (!quick).then_some(reps);
            indexer_case(
                &gpu,
                &k,
                &mut rep,
                &mut rng,
                format,
                heads,
                indexer_rows,
                timed,
            )?;
        }
    }
    if only_indexer {
        return finish(&rep, out_dir, quick);
    }

    // FP8 GEMV: correctness over buckets, dtypes, split-K and ragged shapes.
    for &(m, n, kd, xd, od, sub) in &[
        (1, 4096, 1024, ActDtype::Bf16, OutDtype::F32, false),
        (3, 1001, 4096, ActDtype::F32, OutDtype::F32, false),
        (16, 1024, 4096, ActDtype::Bf16, OutDtype::Bf16, false),
        (5, 2048, 1040, ActDtype::Bf16, OutDtype::F32, false),
        (2, 512, 2048, ActDtype::Bf16, OutDtype::F32, true),
    ] {
        for path in [Fp8Path::CudaCore, Fp8Path::TensorCore] {
            if path == Fp8Path::TensorCore && (xd != ActDtype::Bf16 || kd % 128 != 0) {
                continue;
            }
            fp8_case(&gpu, &k, &mut rep, &mut rng, m, n, kd, xd, od, sub, path)?;
        }
    }
    for path in [Fp8Path::CudaCore, Fp8Path::TensorCore] {
        for &(m, n, kd, od) in &[
            (9, 1000, 1024, OutDtype::F32),
            (8, 768, 3072, OutDtype::Bf16),
        ] {
            fp8_case(
                &gpu,
                &k,
                &mut rep,
                &mut rng,
                m,
                n,
                kd,
                ActDtype::Bf16,
                od,
                false,
                path,
            )?;
        }
        if !quick {
            fp8_case(
                &gpu,
                &k,
                &mut rep,
                &mut rng,
                4,
                32768,
                1024,
                ActDtype::Bf16,
                OutDtype::Bf16,
                false,
                path,
            )?;
        }
    }

    // bf16 GEMV.
    for &(m, n, kd) in &[(1, 1024, 4096), (16, 1001, 1024), (5, 37, 264), (3, 3, 32)] {
        bf16_case(&gpu, &k, &mut rep, &mut rng, m, n, kd)?;
    }

    // FP4 MoE.
    let (experts, hidden, inter) = if quick {
        (16, 512, 256)
    } else {
        (256, 4096, 2048)
    };
    let layer = moe_layer(&gpu, &mut rng, experts, hidden, inter)?;
    for path in [MoePath::CudaCore, MoePath::CudaCoreV1, MoePath::TensorCore] {
        let fits =
            |i: usize| path != MoePath::TensorCore || launch::moe_tensor_core_fits(hidden, i);
        if fits(inter) {
            moe_case(
                &gpu,
                &k,
                &mut rep,
                &mut rng,
                &layer,
                inter,
                1,
                OutDtype::F32,
                false,
                path,
            )?;
            moe_case(
                &gpu,
                &k,
                &mut rep,
                &mut rng,
                &layer,
                inter,
                4,
                OutDtype::Bf16,
                true,
                path,
            )?;
        }
        if fits(inter / 2) {
            moe_case(
                &gpu,
                &k,
                &mut rep,
                &mut rng,
                &layer,
                inter / 2,
                3,
                OutDtype::F32,
                false,
                path,
            )?;
        }
    }

    // RMSNorm, RoPE, top-k.
    for &(rows, d) in &[(1, 4096), (7, 512), (16, 1024)] {
        rmsnorm_case(&gpu, &k, &mut rep, &mut rng, rows, d, None)?;
    }
    rope_case(&gpu, &k, &mut rep, &mut rng, 5, 64, 1.0, false, None)?;
    rope_case(&gpu, &k, &mut rep, &mut rng, 3, 8, 1.2, true, None)?;
    topk_case(&gpu, &k, &mut rep, &mut rng, 1, 129_280, 1, None)?;
    topk_case(&gpu, &k, &mut rep, &mut rng, 3, 129_280, 50, None)?;
    topk_case(&gpu, &k, &mut rep, &mut rng, 2, 1000, 7, None)?;

    if !quick {
        println!("--- timing ({reps} reps, median) ---");
        for &(label, m, n, kd) in &[
            ("wq_b full", 1, 32768, 1024),
            ("wq_b full", 4, 32768, 1024),
            ("wq_b full", 16, 32768, 1024),
            ("wq_b TP2", 1, 16384, 1024),
            ("wq_b TP2", 16, 16384, 1024),
            ("wo_b full", 1, 4096, 8192),
            ("wq_a", 1, 1024, 4096),
            ("shared w1", 1, 2048, 4096),
        ] {
            for path in [Fp8Path::CudaCore, Fp8Path::TensorCore] {
                fp8_bench(&gpu, &k, &mut rep, &mut rng, label, m, n, kd, reps, path)?;
            }
        }
        for &(label, m, n, kd) in &[
            ("lm_head full", 1, 129_280, 4096),
            ("lm_head full", 4, 129_280, 4096),
            ("lm_head full", 16, 129_280, 4096),
            ("lm_head TP2", 1, 64_640, 4096),
            ("compressor wkv", 1, 1024, 4096),
            ("compressor wkv", 16, 1024, 4096),
            ("indexer compressor", 1, 512, 4096),
            ("router gate", 1, 256, 4096),
        ] {
            bf16_bench(&gpu, &k, &mut rep, &mut rng, label, m, n, kd, reps)?;
        }
        for &(inter, tokens) in &[(2048, 1), (2048, 16), (1024, 1), (1024, 16)] {
            for path in [MoePath::CudaCore, MoePath::CudaCoreV1, MoePath::TensorCore] {
                moe_bench(
                    &gpu, &k, &mut rep, &mut rng, &layer, inter, tokens, reps, path,
                )?;
            }
        }
        drop(layer);
        for &(rows, d) in &[(1, 4096), (16, 4096), (8192, 4096)] {
            rmsnorm_case(&gpu, &k, &mut rep, &mut rng, rows, d, Some(reps))?;
        }
        rope_case(&gpu, &k, &mut rep, &mut rng, 16, 64, 1.0, false, Some(reps))?;
        rope_case(
            &gpu,
            &k,
            &mut rep,
            &mut rng,
            8192,
            64,
            1.0,
            false,
            Some(reps),
        )?;
        topk_case(&gpu, &k, &mut rep, &mut rng, 1, 129_280, 1, Some(reps))?;
        topk_case(&gpu, &k, &mut rep, &mut rng, 16, 129_280, 1, Some(reps))?;
        topk_case(&gpu, &k, &mut rep, &mut rng, 1, 129_280, 50, Some(reps))?;
    }

    finish(&rep, out_dir, quick)
}

/// Writes the CSV (if asked) and fails on any failed check.
fn finish(rep: &Report, out_dir: Option<String>, quick: bool) -> Result<()> {
    if let Some(dir) = out_dir {
        let path = std::path::Path::new(&dir).join(if quick {
            "kernels-quick.csv"
        } else {
            "kernels.csv"
        });
        std::fs::write(&path, rep.csv()).with_context(|| format!("write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if rep.failures > 0 {
        bail!("{} check(s) failed", rep.failures);
    }
    println!("all checks passed");
    Ok(())
}
