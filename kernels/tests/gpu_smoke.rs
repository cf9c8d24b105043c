//! GPU smoke test: loads every kernel and checks one FP8 GEMV against the CPU reference.
//! Skips (passes with a SKIP line) where there is no CUDA driver or no device, as in CI.
//! The full per-kernel checks and timings are in the `kernel-check` binary.

use cudarc::driver::DevicePtr;
use dspark_kernels::formats::{bf16_to_f32, f32_to_bf16};
use dspark_kernels::reference::{fp8_gemv, rel_err};
use dspark_kernels::{open_gpu, ActDtype, Fp8Gemv, Kernels, LoaderConfig, OutDtype};

#[test]
fn fp8_gemv_matches_reference_on_gpu() {
    let ctx = match open_gpu(0) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SKIP fp8_gemv_matches_reference_on_gpu: no GPU ({e})");
            return;
        }
    };
    let cache = tempfile::tempdir().unwrap();
    let cfg = LoaderConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        prebuilt_dir: None,
    };
    let k = Kernels::load(&ctx, &cfg).unwrap();
    let stream = ctx.default_stream();
    let (m, n, kd) = (3usize, 384usize, 512usize);
    // Deterministic but irregular data (no NaN codes: 0x7F/0xFF never occur below).
    let w: Vec<u8> = (0..n * kd)
        .map(|i| ((i * 37 + i / 7) % 127) as u8 | (((i / 3) % 2) as u8) << 7)
        .collect();
    let s: Vec<u8> = (0..n.div_ceil(128) * kd.div_ceil(128))
        .map(|i| 120 + (i % 7) as u8)
        .collect();
    let x: Vec<u16> = (0..m * kd)
        .map(|i| f32_to_bf16(((i % 13) as f32 - 6.0) * 0.25))
        .collect();
    let xf: Vec<f32> = x.iter().map(|&h| bf16_to_f32(h)).collect();
    let wb = stream.clone_htod(&w).unwrap();
    let sb = stream.clone_htod(&s).unwrap();
    let xb = stream.clone_htod(&x).unwrap();
    let ob = stream.clone_htod(&vec![f32::NAN; m * n]).unwrap();
    let a = Fp8Gemv {
        weight: wb.device_ptr(&stream).0,
        scale: sb.device_ptr(&stream).0,
        x: xb.device_ptr(&stream).0,
        x_dtype: ActDtype::Bf16,
        out: ob.device_ptr(&stream).0,
        out_dtype: OutDtype::F32,
        m,
        n,
        k: kd,
    };
    // SAFETY: the buffers above hold exactly these shapes.
    unsafe { k.fp8_gemv(&stream, &a) }.unwrap();
    stream.synchronize().unwrap();
    let out: Vec<f64> = stream
        .clone_dtoh(&ob)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let err = rel_err(&out, &fp8_gemv(&w, &s, &xf, m, n, kd));
    assert!(err < 1e-4, "rel err {err}");
}
