//! What the GPU tests of this crate share: a GPU with every kernel loaded (or a SKIP line where
//! there is none, as in CI), buffer helpers, and deterministic inputs.
#![allow(dead_code)]

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use dspark_kernels::{open_gpu, Kernels, KvRowFormat, LoaderConfig};

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub k: Kernels,
    pub s: Arc<CudaStream>,
}

/// GPU 0 with the kernels loaded, or `None` (after a SKIP line naming `test`) without one.
pub fn gpu(test: &str) -> Option<Gpu> {
    let ctx = match open_gpu(0) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SKIP {test}: no GPU ({e})");
            return None;
        }
    };
    // One cache for every test (entries are keyed by source hash and written atomically), so
    // NVRTC compiles each module once per machine.
    let cfg = LoaderConfig {
        cache_dir: Some(std::env::temp_dir().join("dspark-kernel-test-cache")),
        prebuilt_dir: None,
    };
    let k = Kernels::load(&ctx, &cfg).unwrap();
    let s = ctx.default_stream();
    Some(Gpu { ctx, k, s })
}

impl Gpu {
    pub fn up<T: DeviceRepr>(&self, v: &[T]) -> CudaSlice<T> {
        self.s.clone_htod(v).unwrap()
    }

    pub fn ptr<T>(&self, b: &CudaSlice<T>) -> CUdeviceptr {
        b.device_ptr(&self.s).0
    }

    pub fn down<T: DeviceRepr + Default + Clone>(&self, b: &CudaSlice<T>) -> Vec<T> {
        self.s.synchronize().unwrap();
        self.s.clone_dtoh(b).unwrap()
    }
}

/// xorshift64*: deterministic inputs without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[lo, hi)` on a grid of 2^-24 of the range.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    pub fn vec(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len).map(|_| self.uniform(lo, hi)).collect()
    }

    /// Uniform in `[-1, 1)` times `scale` (the product rounded once).
    pub fn signed_vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.uniform(-1.0, 1.0) * scale).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A random permutation of `0..n` (Fisher-Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<u32> {
        let mut v: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            v.swap(i, self.below(i + 1));
        }
        v
    }
}

/// A pool of indexer rows for the timing tests: `blocks` blocks of `rows_per_block` random rows
/// (`dim` values in [-1, 1]) stored as `format`, `base` slots into each block, `stride` slots
/// apart, `floats_per_block` a block (3 slots of padding after the rows).
pub struct IndexerPool {
    pub data: Vec<f32>,
    pub floats_per_block: usize,
    pub base: usize,
    pub stride: usize,
}

pub fn random_indexer_pool(
    rng: &mut Rng,
    format: KvRowFormat,
    dim: usize,
    rows_per_block: usize,
    blocks: usize,
) -> IndexerPool {
    let stride = format.slots(dim);
    let base = 5;
    let fpb = base + rows_per_block * stride + 3;
    let mut data = vec![0f32; blocks * fpb];
    for b in 0..blocks {
        for s in 0..rows_per_block {
            let row = rng.signed_vec(dim, 1.0);
            let at = b * fpb + base + s * stride;
            format.encode(&row, &mut data[at..at + stride]);
        }
    }
    IndexerPool {
        data,
        floats_per_block: fpb,
        base,
        stride,
    }
}

/// Random e4m3 codes: any byte but the two NaNs (0x7F, 0xFF).
pub fn e4m3_codes(rng: &mut Rng, len: usize) -> Vec<u8> {
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

/// Random E8M0 block scales near 1 (2^-9 .. 2^-2).
pub fn e8m0_scales_near_one(rng: &mut Rng, len: usize) -> Vec<u8> {
    (0..len).map(|_| 118 + (rng.next() % 8) as u8).collect()
}

/// Random bf16 bit patterns of finite values in about +-2^(-8..1), both signs.
pub fn bf16_bits(rng: &mut Rng, len: usize) -> Vec<u16> {
    (0..len)
        .map(|_| {
            let r = rng.next();
            let sign = ((r >> 63) as u16) << 15;
            let exp = 119 + (r >> 32) as u16 % 9;
            sign | (exp << 7) | (r as u16 & 0x7f)
        })
        .collect()
}

/// `out[m, n] = sum_k x[m, k] w[n, k]` in f64 over bf16 weights (the exact widened products).
pub fn bf16_gemv_ref(w: &[u16], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for t in 0..m {
        let xr = &x[t * k..(t + 1) * k];
        for r in 0..n {
            out[t * n + r] = w[r * k..(r + 1) * k]
                .iter()
                .zip(xr)
                .map(|(&a, &b)| f64::from(dspark_kernels::formats::bf16_to_f32(a)) * f64::from(b))
                .sum();
        }
    }
    out
}

/// Per (token, head) row of `hd` values: max |diff| / max |reference|. A row whose reference is
/// all zeros (no key, so the sink took everything) must match exactly; NaN counts as infinite.
pub fn row_errs(got: &[f32], want: &[f64], hd: usize) -> Vec<f64> {
    got.chunks(hd)
        .zip(want.chunks(hd))
        .map(|(g, w)| {
            let diff = g
                .iter()
                .zip(w)
                .map(|(&a, &b)| (f64::from(a) - b).abs())
                .fold(
                    0.0,
                    |m: f64, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
                );
            let mag = w.iter().fold(0.0, |m: f64, &b| m.max(b.abs()));
            if mag > 0.0 {
                diff / mag
            } else if diff == 0.0 {
                0.0
            } else {
                f64::INFINITY
            }
        })
        .collect()
}

/// The worst of [`row_errs`].
pub fn worst_row_err(got: &[f32], want: &[f64], hd: usize) -> f64 {
    row_errs(got, want, hd).into_iter().fold(0.0, f64::max)
}

/// Each rank's share of the rows ([`dspark_kernels::indexer_row_share`], for 2 ranks with k = 64
/// and 3 with k = 100) scored by `call` with `row_starts` (`call` as launched for `full`, the
/// whole rows' scores, with `visible` and `out_starts` its tokens'): inside its share a rank's
/// scores are bit-identical to the whole launch's (a row's score does not depend on the tile or
/// group it is computed in), and nothing outside the share is written (NaN sentinels, `out_len`
/// floats). Returns the launches checked.
pub fn check_row_shares(
    g: &Gpu,
    call: &dspark_kernels::IndexerScores,
    visible: &[usize],
    out_starts: &[i64],
    out_len: usize,
    full: &[f32],
    label: &str,
) -> usize {
    let mut launches = 0;
    for (ranks, k) in [(2, 64), (3, 100)] {
        for rank in 0..ranks {
            let shares: Vec<(usize, usize)> = visible
                .iter()
                .map(|&v| dspark_kernels::indexer_row_share(v, k, ranks, rank))
                .collect();
            let starts: Vec<i32> = shares.iter().map(|&(s, _)| s as i32).collect();
            let ends: Vec<i32> = shares.iter().map(|&(_, e)| e as i32).collect();
            let most = shares.iter().map(|&(s, e)| e - s).max().unwrap_or(0);
            let (starts_d, ends_d) = (g.up(&starts), g.up(&ends));
            let out_d = g.up(&vec![f32::NAN; out_len]);
            let share_call = dspark_kernels::IndexerScores {
                visible: g.ptr(&ends_d),
                row_starts: g.ptr(&starts_d),
                out: g.ptr(&out_d),
                max_visible: most,
                ..*call
            };
            // SAFETY: as the whole launch, which `call` was; each share lies inside its token's
            // visible rows.
            unsafe { g.k.indexer_scores(&g.s, &share_call) }.unwrap();
            let got = g.down(&out_d);
            let mut inside = vec![false; out_len];
            for (t, &(s, e)) in shares.iter().enumerate() {
                let at = out_starts[t] as usize;
                for r in s..e {
                    inside[at + r] = true;
                    assert!(
                        got[at + r].to_bits() == full[at + r].to_bits(),
                        "{label}: rank {rank} of {ranks}: token {t} row {r} (share {s}..{e}): {} \
                         vs the whole launch's {}",
                        got[at + r],
                        full[at + r]
                    );
                }
            }
            for (i, x) in got.iter().enumerate() {
                assert!(
                    inside[i] || x.is_nan(),
                    "{label}: rank {rank} of {ranks} wrote score {i} outside its shares ({x})"
                );
            }
            launches += 1;
        }
    }
    launches
}

/// Microseconds per call of `f` over `reps` calls back to back on the stream, between two
/// events (one call first, untimed, to warm up).
pub fn time_us(g: &Gpu, reps: usize, f: &dyn Fn()) -> f64 {
    f();
    let ev = || {
        g.ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap()
    };
    let (start, end) = (ev(), ev());
    start.record(&g.s).unwrap();
    for _ in 0..reps {
        f();
    }
    end.record(&g.s).unwrap();
    g.s.synchronize().unwrap();
    f64::from(start.elapsed_ms(&end).unwrap()) * 1000.0 / reps as f64
}
