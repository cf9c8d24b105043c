//! The copy bandwidth the step bandwidths are compared with, measured in the same run on the
//! same device.
//!
//! Convention (as STREAM "Copy" and CUDA's bandwidthTest device-to-device): a copy of `n` bytes
//! moves `2n` bytes (each byte read once and written once), so GB/s = 2n / time, 1 GB = 1e9 B.
//! The best of several repetitions is kept.

use std::time::Instant;

use rayon::prelude::*;

use super::BenchError;
use crate::engine::model::Device;

/// What the copy measurement found.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyBandwidth {
    /// Read + write bytes per second, in GB/s (1e9).
    pub gb_s: f64,
    /// Bytes of each of the two buffers.
    pub buffer_bytes: usize,
    /// The device, in words (CPU model or GPU name).
    pub device_name: String,
}

/// Repetitions; the best one counts.
const REPEATS: usize = 5;

/// Measures the copy bandwidth of `device` with two buffers of `bytes` each.
pub fn copy_bandwidth(device: Device, bytes: usize) -> Result<CopyBandwidth, BenchError> {
    match device {
        Device::Cpu => Ok(host_copy(bytes)),
        Device::Cuda => cuda_copy(bytes),
    }
}

/// Host memcpy over all rayon threads (the CPU backend computes on all of them too).
fn host_copy(bytes: usize) -> CopyBandwidth {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let piece = bytes
        .div_ceil(rayon::current_num_threads().max(1) * 4)
        .max(1 << 16);
    let mut best = f64::INFINITY;
    for _ in 0..REPEATS {
        let t = Instant::now();
        dst.par_chunks_mut(piece)
            .zip(src.par_chunks(piece))
            .for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed().as_secs_f64());
    }
    // Keep the copy observable so it is not optimised away.
    std::hint::black_box(&dst);
    CopyBandwidth {
        gb_s: 2.0 * bytes as f64 / best.max(1e-12) / 1e9,
        buffer_bytes: bytes,
        device_name: cpu_name(),
    }
}

/// `model name` of /proc/cpuinfo and the thread count.
fn cpu_name() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "CPU".to_string());
    format!("{model} ({} threads)", rayon::current_num_threads())
}

/// Device-to-device copy on GPU 0, timed with CUDA events.
fn cuda_copy(bytes: usize) -> Result<CopyBandwidth, BenchError> {
    let no_driver = || {
        BenchError::Copy(
            "cannot load the CUDA driver library (libcuda.so): no GPU here? use --device cpu"
                .into(),
        )
    };
    // SAFETY: this only dlopens libcuda (running its initialisers), which the first cudarc call
    // below would do anyway; no CUDA state exists yet in this process to be disturbed.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(no_driver());
    }
    // cudarc panics when it cannot load a symbol it needs: make that an error too.
    std::panic::catch_unwind(|| cuda_copy_inner(bytes))
        .map_err(|_| no_driver())?
        .map_err(|e| BenchError::Copy(format!("CUDA device-to-device copy: {e:?}")))
}

fn cuda_copy_inner(bytes: usize) -> Result<CopyBandwidth, cudarc::driver::DriverError> {
    use cudarc::driver::{sys::CUevent_flags, CudaContext};
    let ctx = CudaContext::new(0)?;
    let name = ctx.name()?;
    let stream = ctx.default_stream();
    let src = stream.alloc_zeros::<u8>(bytes)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes)?;
    // One untimed copy first (first touch, clocks).
    stream.memcpy_dtod(&src, &mut dst)?;
    stream.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..REPEATS {
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        stream.memcpy_dtod(&src, &mut dst)?;
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let ms = start.elapsed_ms(&end)? as f64;
        best = best.min(ms / 1e3);
    }
    Ok(CopyBandwidth {
        gb_s: 2.0 * bytes as f64 / best.max(1e-12) / 1e9,
        buffer_bytes: bytes,
        device_name: name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_copy_is_positive_and_named() {
        let c = copy_bandwidth(Device::Cpu, 8 << 20).unwrap();
        assert!(c.gb_s.is_finite() && c.gb_s > 0.0, "{c:?}");
        assert!(c.device_name.contains("threads"));
    }

    #[test]
    fn no_gpu_is_an_error_not_a_panic() {
        // On a machine with a GPU this measures it instead; both are fine, a panic is not.
        match copy_bandwidth(Device::Cuda, 1 << 20) {
            Ok(c) => assert!(c.gb_s > 0.0),
            Err(e) => assert!(e.to_string().contains("CUDA"), "{e}"),
        }
    }
}
