//! CUDA kernels for dspark's decode hot paths, on the checkpoint's own data types, and the code
//! that builds and loads them.
//!
//! - `sources`: the `kernels/*.cu` files, embedded (`include_str!`).
//! - `loader`: prebuilt cubin -> on-disk cache -> NVRTC, for the device's arch (sm_90a, sm_121).
//! - `launch`: `Kernels`, one typed `unsafe` launch per kernel over raw device pointers + shapes.
//! - `formats`, `reference`: host decoding of e4m3/e2m1/e8m0/bf16 and f64 CPU references.
//!
//! Everything builds and its tests run without CUDA: cudarc loads libcuda/libnvrtc at run time,
//! and `gpu_available` says whether a device can be used.

pub mod error;
pub mod formats;
pub mod kv_record;
pub mod launch;
pub mod loader;
pub mod reference;
pub mod sources;

pub use error::KernelError;
pub use kv_record::KvRowFormat;
pub use launch::attention::{
    attention_splits, attention_workspace_floats, indexer_rank_candidates, indexer_row_share,
    topk_last_round, topk_select_workspace_bytes, IndexerScores, InverseRope, KvRows,
    PagedAttention, TopKMergeRanks, TopKSelect,
};
pub use launch::dense_gemv::{Bf16Gemv, BF16_GEMV_MAX_M};
pub use launch::skinny_mma::{SkinnyMma, SkinnyWeight, SKINNY_MMA_MAX_M};
pub use launch::{
    ActDtype, Fp4Experts, Fp4MoeCall, Fp8Gemv, Fp8GroupedGemv, Fp8Path, Kernels, MoePath, OutDtype,
    RmsNorm, Rope, TopK,
};
pub use loader::{LoaderConfig, ModuleOrigin};

use std::sync::Arc;

use cudarc::driver::CudaContext;

/// A context on GPU `ordinal`, or why there is none (no driver library, no device, ...).
/// Never panics on machines without CUDA.
pub fn open_gpu(ordinal: usize) -> Result<Arc<CudaContext>, KernelError> {
    // SAFETY: only tries to dlopen libcuda by its candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(KernelError::NoDriver);
    }
    CudaContext::new(ordinal).map_err(KernelError::driver("open GPU"))
}
