//! The DeepSeek-V4-Flash target model: config, tensor manifest, weights, KV block layout and the
//! batched forward pass, written over [`crate::backend::Backend`].
//!
//! Entry point for the server:
//! ```ignore
//! let opts = LoadOptions { device: Device::Cpu, load_format: LoadFormat::Auto,
//!     kv_pool_tokens, block_size: None, shard: Shard { rank, world_size }, dummy_seed: 0 };
//! let mut runner: Box<dyn ModelRunner> = model::load(dir, &opts, communicator)?;
//! let layout = runner.kv_layout();          // block_size, num_blocks, bytes_per_block
//! let out = runner.step(&plan)?;            // any mix of prefill chunks and decodes
//! ```
//! Every rank of a tensor-parallel group loads its shard (`Shard`) and runs the same plans;
//! the layers all-reduce through the communicator. What a KV block holds: docs/KV.md.

pub mod checkpoint_source;
pub mod config;
pub mod forward;
pub mod host_clock;
pub mod hyper;
pub mod kv;
pub mod load;
pub mod manifest;
pub mod ops;
pub mod rope;

pub use checkpoint_source::{load, load_cpu, tensor_specs};
pub use config::{ConfigError, ModelConfig};
pub use forward::DeepseekV4;
pub use load::{HostTensor, LoadError, Shard, WeightSource};

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::Backend;
use crate::engine::ModelRunner;
use crate::ranks::Communicator;
use kv::{BlockGeometry, KvPool};
pub use kv::{KvStorage, NO_RECENT};
use std::sync::Arc;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

/// How weights are obtained (vLLM's `--load-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadFormat {
    /// Safetensors from the model directory.
    Auto,
    Safetensors,
    /// Deterministic pseudo-random values of the right shapes and dtypes.
    Dummy,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub load_format: LoadFormat,
    /// Tokens the KV pool must hold (rounded up to whole blocks).
    pub kv_pool_tokens: usize,
    /// What the pool stores KV rows as (`--kv-cache-dtype`).
    pub kv_storage: KvStorage,
    /// Recent blocks (window rows and compressor inputs of the blocks near each sequence's end,
    /// docs/KV.md), at most one per block. `None`: [`BlockGeometry::recent_blocks_for`]
    /// `batch_limits` when given, else one per block.
    pub kv_recent_blocks: Option<usize>,
    /// The scheduler's `(max_num_seqs, max_num_batched_tokens)`, which bound how many recent
    /// blocks can be in use at once.
    pub batch_limits: Option<(usize, usize)>,
    /// Tokens per block; `None` = [`ModelConfig::default_block_size`]. Must be a multiple of
    /// every compress ratio.
    pub block_size: Option<usize>,
    pub shard: Shard,
    /// Seed of `LoadFormat::Dummy`.
    pub dummy_seed: u64,
    /// GPU ordinal of `Device::Cuda` (a pod sees one GPU: 0; the local launcher gives rank r
    /// GPU r).
    pub gpu_ordinal: usize,
    /// vLLM's `--gpu-memory-utilization`: when set and the backend reports its memory, the pool
    /// takes what is left of this fraction of the device after the weights and
    /// [`workspace_reserve`] bytes, instead of `kv_pool_tokens`; the ranks of a group agree on
    /// the smallest.
    pub gpu_memory_utilization: Option<f64>,
    /// vLLM's `--enforce-eager`: run the CUDA layer stack without capturing CUDA graphs (every
    /// kernel launched from the host each step).
    pub enforce_eager: bool,
}

/// Device memory kept free for activations and per-step buffers when the pool is sized from
/// `gpu_memory_utilization`, for prefill pieces of [`STEP_PIECE_TOKENS`] rows
/// ([`workspace_reserve`] scales it). The CUDA layer stack's scratch is made right after the pool
/// (for pieces of 8,192 rows about 6.5 GB at V4-Flash width and TP=2): it comes out of this and
/// of the share the utilization leaves, and a GPU without room for it fails at start.
pub const KV_WORKSPACE_RESERVE: usize = 4 << 30;

/// Rows of a prefill piece (one pass of a step's rows through the layers) at the default
/// `--max-num-batched-tokens`.
pub const STEP_PIECE_TOKENS: usize = 8192;
/// Most rows of a prefill piece that a larger `--max-num-batched-tokens` gives: a longer step's
/// rows run as several pieces. Two H200s, 43 layers, TP=2: a 100K prompt in chunks of 16,384
/// took 6.45 s against 6.76 s in chunks of 8,192 (the grouped experts' 128-row tiles fuller, a
/// collective and a launch of each kernel for twice the rows), at ~6 GB more scratch a GPU.
pub const STEP_PIECE_TOKENS_MAX: usize = 16384;

/// Rows of a prefill piece for a step budget of `step_tokens`: the budget rounded up to a
/// multiple of 256 (even shares for the ranks, whole GEMM tiles), within
/// `[STEP_PIECE_TOKENS, STEP_PIECE_TOKENS_MAX]` (`None`: the default).
pub fn step_piece_tokens(step_tokens: Option<usize>) -> usize {
    step_tokens
        .unwrap_or(STEP_PIECE_TOKENS)
        .clamp(STEP_PIECE_TOKENS, STEP_PIECE_TOKENS_MAX)
        .next_multiple_of(256)
}

/// [`KV_WORKSPACE_RESERVE`] for prefill pieces of [`step_piece_tokens`] rows: the per-step
/// buffers grow with them.
pub fn workspace_reserve(step_tokens: Option<usize>) -> usize {
    KV_WORKSPACE_RESERVE / STEP_PIECE_TOKENS * step_piece_tokens(step_tokens)
}

/// Blocks of `bytes_per_block` that fit in `utilization` of a device of `total` bytes with
/// `free` bytes free now (weights loaded), keeping `reserve` bytes for the workspace and
/// `fixed` bytes for the recent blocks.
pub fn pool_blocks_for_memory(
    free: usize,
    total: usize,
    utilization: f64,
    reserve: usize,
    fixed: usize,
    bytes_per_block: usize,
) -> Result<usize, LoadError> {
    let used = total.saturating_sub(free);
    let budget = (total as f64 * utilization) as usize;
    let left = kv_memory(free, total, utilization, reserve).saturating_sub(fixed);
    let blocks = left / bytes_per_block.max(1);
    if blocks == 0 {
        return Err(LoadError::KvPool(format!(
            "no room for the KV pool: {:.1} GB of {:.1} GB are in use (weights and other \
             processes), --gpu-memory-utilization {utilization} allows {:.1} GB, {:.1} GB are \
             kept for the workspace and {:.1} GB for the recent blocks (--max-num-seqs, \
             --max-num-batched-tokens); one block needs {:.1} MB. Raise \
             --gpu-memory-utilization, use more ranks, or give --kv-pool-tokens",
            used as f64 / 1e9,
            total as f64 / 1e9,
            budget as f64 / 1e9,
            reserve as f64 / 1e9,
            fixed as f64 / 1e9,
            bytes_per_block as f64 / 1e6
        )));
    }
    Ok(blocks)
}

/// Bytes `utilization` of a device of `total` bytes leaves for KV with `free` bytes free now
/// (weights loaded) and `reserve` kept for the workspace.
fn kv_memory(free: usize, total: usize, utilization: f64, reserve: usize) -> usize {
    let used = total.saturating_sub(free);
    ((total as f64 * utilization) as usize)
        .saturating_sub(used)
        .saturating_sub(reserve)
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            load_format: LoadFormat::Auto,
            kv_pool_tokens: 16 * 1024,
            kv_storage: KvStorage::F32,
            kv_recent_blocks: None,
            batch_limits: None,
            block_size: None,
            shard: Shard::SINGLE,
            dummy_seed: 0,
            gpu_ordinal: 0,
            gpu_memory_utilization: None,
            enforce_eager: false,
        }
    }
}

impl LoadOptions {
    /// Recent blocks asked for (before the cap at one per block); `None` = one per block.
    pub fn recent_blocks(&self, geometry: &BlockGeometry) -> Option<usize> {
        self.kv_recent_blocks.or_else(|| {
            self.batch_limits
                .map(|(seqs, tokens)| geometry.recent_blocks_for(seqs, tokens))
        })
    }
}

/// The block geometry `opts` asks for (block size, KV storage).
pub fn geometry_of(cfg: &ModelConfig, opts: &LoadOptions) -> Result<BlockGeometry, LoadError> {
    let bs = opts.block_size.unwrap_or_else(|| cfg.default_block_size());
    BlockGeometry::new(cfg, bs, opts.kv_storage).map_err(|e| LoadError::KvPool(e.to_string()))
}

/// Validates the block size and sizes the pool from `opts.kv_pool_tokens`.
pub fn kv_pool(cfg: &ModelConfig, opts: &LoadOptions) -> Result<KvPool, LoadError> {
    kv_pool_of(cfg, opts, None)
}

/// Blocks and recent blocks agreed from the device memory (overriding the options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SizedPool {
    blocks: usize,
    recent: Option<usize>,
}

/// [`kv_pool`] with `sized` overriding `opts.kv_pool_tokens` and the recent blocks asked for.
fn kv_pool_of(
    cfg: &ModelConfig,
    opts: &LoadOptions,
    sized: Option<SizedPool>,
) -> Result<KvPool, LoadError> {
    let bs = opts.block_size.unwrap_or_else(|| cfg.default_block_size());
    for l in 0..cfg.num_hidden_layers {
        if let Some(r) = cfg.compress_ratio(l) {
            if bs == 0 || !bs.is_multiple_of(r) {
                return Err(LoadError::KvPool(format!(
                    "block size {bs} is not a multiple of compress ratio {r} (layer {l})"
                )));
            }
        }
    }
    let num_blocks = sized
        .map_or_else(|| opts.kv_pool_tokens.div_ceil(bs), |s| s.blocks)
        .max(1);
    let geometry = geometry_of(cfg, opts)?;
    // A recent block is only ever held with its block, so more than one per block never helps.
    let num_recent = match sized {
        Some(s) => s.recent,
        None => opts.recent_blocks(&geometry),
    }
    .unwrap_or(num_blocks)
    .clamp(1, num_blocks);
    tracing::info!(
        block_size = bs,
        num_blocks,
        bytes_per_block = geometry.bytes_per_block(),
        recent_blocks = num_recent,
        bytes_per_recent = geometry.bytes_per_recent(),
        kv_cache_dtype = ?opts.kv_storage,
        "KV pool"
    );
    Ok(KvPool::new(geometry, num_blocks, num_recent))
}

/// The CPU backend holds every weight as f32: refuse a model that cannot fit instead of being
/// killed half way through loading (e.g. the real V4-Flash, ~1.1 TB in f32).
fn check_host_memory(
    expected: &[manifest::ExpectedTensor],
    world_size: usize,
) -> Result<(), LoadError> {
    let values: usize = expected
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    let need = values as u64 * 4 / world_size.max(1) as u64;
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    match available {
        Some(avail) if need > avail => Err(LoadError::Source(format!(
            "the CPU backend needs ~{:.1} GB for f32 weights of this rank, the host has {:.1} GB \
             available; use --device cuda or a smaller model",
            need as f64 / 1e9,
            avail as f64 / 1e9
        ))),
        _ => Ok(()),
    }
}

/// Builds this rank's model on `backend` from a weight source.
pub fn build_on<B: Backend>(
    cfg: ModelConfig,
    src: &dyn WeightSource,
    opts: &LoadOptions,
    comm: Arc<dyn Communicator>,
    backend: B,
) -> Result<DeepseekV4<B>, LoadError> {
    if comm.world_size() != opts.shard.world_size || comm.rank() != opts.shard.rank {
        return Err(LoadError::Sharding(format!(
            "communicator is rank {}/{}, options say {}/{}",
            comm.rank(),
            comm.world_size(),
            opts.shard.rank,
            opts.shard.world_size
        )));
    }
    let expected = manifest::target_tensors(&cfg);
    manifest::check_complete(src, &expected)?;
    let weights = load::load_weights(src, &backend, &cfg, opts.shard)?;
    if let Some((_, tokens)) = opts.batch_limits {
        backend.set_step_tokens(tokens);
    }
    let sized = pool_from_memory(&cfg, opts, &backend, comm.as_ref())?;
    let pool = kv_pool_of(&cfg, opts, sized)?;
    let mut model = DeepseekV4::new(cfg, backend, weights, pool, comm, opts.shard)?;
    if opts.enforce_eager {
        model.set_cuda_graphs(false);
    }
    Ok(model)
}

/// Most of the memory left for KV that the recent blocks take: a `--max-num-seqs` too large to
/// give every sequence its recent blocks then bounds how many run at once (the scheduler admits
/// fewer, or preempts) instead of starving the pool.
const RECENT_SHARE_MAX: f64 = 0.5;

/// With `opts.gpu_memory_utilization` on a backend that reports its memory: the pool's blocks
/// (and recent blocks) from the memory left after the weights, the smallest over the ranks (they
/// must hold the same block ids). `None` otherwise (size from `kv_pool_tokens`).
fn pool_from_memory<B: Backend>(
    cfg: &ModelConfig,
    opts: &LoadOptions,
    backend: &B,
    comm: &dyn Communicator,
) -> Result<Option<SizedPool>, LoadError> {
    let (Some(utilization), Some((free, total))) =
        (opts.gpu_memory_utilization, backend.memory_info())
    else {
        return Ok(None);
    };
    let geometry = geometry_of(cfg, opts)?;
    let asked = opts.recent_blocks(&geometry);
    // The recent blocks come off the top (none asked: one per block, in the block's price).
    let reserve = workspace_reserve(opts.batch_limits.map(|(_, tokens)| tokens));
    let left = kv_memory(free, total, utilization, reserve);
    let recent = asked.map(|n| {
        let cap = (left as f64 * RECENT_SHARE_MAX) as usize / geometry.bytes_per_recent().max(1);
        if n > cap {
            tracing::warn!(
                asked = n,
                kept = cap,
                "the recent blocks for --max-num-seqs would take over half of the KV memory; \
                 keeping {cap}: fewer sequences run at once than --max-num-seqs allows"
            );
        }
        n.min(cap).max(1)
    });
    let per_block = geometry.bytes_per_block()
        + if recent.is_none() {
            geometry.bytes_per_recent()
        } else {
            0
        };
    let mine = pool_blocks_for_memory(
        free,
        total,
        utilization,
        reserve,
        recent.unwrap_or(0) * geometry.bytes_per_recent(),
        per_block,
    )?;
    // Every rank sees the same gathered values, so every rank picks the same minima.
    let all = comm
        .all_gather(&[mine as f32, recent.unwrap_or(0) as f32])
        .map_err(|e| LoadError::KvPool(format!("agreeing on the pool size: {e}")))?;
    let smallest = |i: usize| {
        all.chunks(2)
            .map(|v| v[i])
            .fold(f32::INFINITY, f32::min)
            .max(1.0) as usize
    };
    let agreed = SizedPool {
        blocks: smallest(0),
        recent: recent.map(|_| smallest(1)),
    };
    tracing::info!(
        free_gb = free as f64 / 1e9,
        total_gb = total as f64 / 1e9,
        utilization,
        blocks = agreed.blocks,
        recent_blocks = ?agreed.recent,
        "KV pool sized from --gpu-memory-utilization"
    );
    Ok(Some(agreed))
}

/// Builds the CPU model of this rank from a weight source.
pub fn build_cpu(
    cfg: ModelConfig,
    src: &dyn WeightSource,
    opts: &LoadOptions,
    comm: Arc<dyn Communicator>,
) -> Result<DeepseekV4<CpuBackend>, LoadError> {
    check_host_memory(&manifest::target_tensors(&cfg), opts.shard.world_size)?;
    build_on(cfg, src, opts, comm, CpuBackend)
}

/// Builds the CUDA model of this rank on GPU `opts.gpu_ordinal`.
pub fn build_cuda(
    cfg: ModelConfig,
    src: &dyn WeightSource,
    opts: &LoadOptions,
    comm: Arc<dyn Communicator>,
) -> Result<DeepseekV4<CudaBackend>, LoadError> {
    let backend = CudaBackend::open(opts.gpu_ordinal)?;
    build_on(cfg, src, opts, comm, backend)
}

/// Builds a runner over an already opened weight source (checkpoint or dummy).
pub fn build(
    cfg: ModelConfig,
    src: &dyn WeightSource,
    opts: &LoadOptions,
    comm: Arc<dyn Communicator>,
) -> Result<Box<dyn ModelRunner>, LoadError> {
    match opts.device {
        Device::Cpu => Ok(Box::new(build_cpu(cfg, src, opts, comm)?)),
        Device::Cuda => Ok(Box::new(build_cuda(cfg, src, opts, comm)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_pieces_and_the_workspace_reserve_follow_the_step_budget() {
        assert_eq!(step_piece_tokens(None), STEP_PIECE_TOKENS);
        // Smaller budgets keep the default pieces (a step never fills them anyway).
        assert_eq!(step_piece_tokens(Some(2048)), STEP_PIECE_TOKENS);
        assert_eq!(step_piece_tokens(Some(12_000)), 12_032);
        assert_eq!(step_piece_tokens(Some(16_384)), STEP_PIECE_TOKENS_MAX);
        // Larger budgets run as several pieces of the most rows.
        assert_eq!(step_piece_tokens(Some(1 << 20)), STEP_PIECE_TOKENS_MAX);
        assert_eq!(workspace_reserve(None), KV_WORKSPACE_RESERVE);
        assert_eq!(workspace_reserve(Some(16_384)), 2 * KV_WORKSPACE_RESERVE);
        assert_eq!(workspace_reserve(Some(1 << 20)), 2 * KV_WORKSPACE_RESERVE);
    }

    #[test]
    fn pool_is_sized_in_whole_blocks_and_block_size_is_checked() {
        let cfg = ModelConfig::from_json(&serde_json::json!({
            "model_type": "deepseek_v4", "num_hidden_layers": 2, "hidden_size": 32, "head_dim": 64,
            "index_head_dim": 32, "qk_rope_head_dim": 16, "sliding_window": 32,
            "layer_types": ["sliding_attention", "compressed_sparse_attention"]
        }))
        .unwrap();
        // Only CSA (ratio 4) here: the smallest multiple of 4 reaching the window is 32.
        assert_eq!(cfg.default_block_size(), 32);
        let opts = LoadOptions {
            kv_pool_tokens: 100,
            ..LoadOptions::default()
        };
        let pool = kv_pool(&cfg, &opts).unwrap();
        assert_eq!(pool.num_blocks, 4);
        assert_eq!(
            pool.num_recent, 4,
            "one recent block per block unless asked"
        );
        for (asked, got) in [(2, 2), (100, 4), (0, 1)] {
            let o = LoadOptions {
                kv_recent_blocks: Some(asked),
                ..opts.clone()
            };
            assert_eq!(kv_pool(&cfg, &o).unwrap().num_recent, got, "asked {asked}");
        }
        let bad = LoadOptions {
            block_size: Some(30),
            ..opts
        };
        let e = kv_pool(&cfg, &bad).unwrap_err().to_string();
        assert!(e.contains("multiple of compress ratio 4"), "{e}");
    }

    #[test]
    fn pool_from_memory_is_what_the_utilization_leaves() {
        const GB: usize = 1 << 30;
        // 100 GiB device, 30 GiB in use, half allowed: 50 - 30 - 4 = 16 blocks of 1 GiB.
        let b = pool_blocks_for_memory(70 * GB, 100 * GB, 0.5, 4 * GB, 0, GB).unwrap();
        assert_eq!(b, 16);
        // A partial block does not count.
        let b = pool_blocks_for_memory(70 * GB, 100 * GB, 0.5, 4 * GB, 0, GB - 1).unwrap();
        assert_eq!(b, 16);
        // The recent blocks come off the top.
        let b = pool_blocks_for_memory(70 * GB, 100 * GB, 0.5, 4 * GB, 3 * GB, GB).unwrap();
        assert_eq!(b, 13);
        // Weights already past the budget: a clear error, not a zero-block pool.
        let e = pool_blocks_for_memory(5 * GB, 100 * GB, 0.9, 4 * GB, 0, GB)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no room for the KV pool") && e.contains("--gpu-memory-utilization"),
            "{e}"
        );
    }
}
