//! The DeepSeek-V4-Flash target model: config, tensor manifest, weights, KV block layout and the
//! batched forward pass, written over [`crate::backend::Backend`].
//!
//! Entry point for the server: [`load`] returns a [`ModelRunner`] for a checkpoint directory.

pub mod config;
pub mod forward;
pub mod hyper;
pub mod kv;
pub mod load;
pub mod manifest;
pub mod ops;
pub mod rope;

pub use config::{ConfigError, ModelConfig};
pub use forward::DeepseekV4;
pub use load::{HostTensor, LoadError, Shard, WeightSource};

use crate::backend::cpu::CpuBackend;
use crate::engine::ModelRunner;
use crate::ranks::Communicator;
use kv::{BlockGeometry, KvPool};
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
    /// Tokens per block; `None` = [`ModelConfig::default_block_size`]. Must be a multiple of
    /// every compress ratio.
    pub block_size: Option<usize>,
    pub shard: Shard,
    /// Seed of `LoadFormat::Dummy`.
    pub dummy_seed: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            load_format: LoadFormat::Auto,
            kv_pool_tokens: 16 * 1024,
            block_size: None,
            shard: Shard::SINGLE,
            dummy_seed: 0,
        }
    }
}

/// Validates the block size and sizes the pool.
pub fn kv_pool(cfg: &ModelConfig, opts: &LoadOptions) -> Result<KvPool, LoadError> {
    let bs = opts.block_size.unwrap_or_else(|| cfg.default_block_size());
    for l in 0..cfg.num_hidden_layers {
        if let Some(r) = cfg.compress_ratio(l) {
            if bs == 0 || !bs.is_multiple_of(r) {
                return Err(LoadError::Source(format!(
                    "block size {bs} is not a multiple of compress ratio {r} (layer {l})"
                )));
            }
        }
    }
    let num_blocks = opts.kv_pool_tokens.div_ceil(bs).max(1);
    let geometry = BlockGeometry::new(cfg, bs);
    tracing::info!(
        block_size = bs,
        num_blocks,
        bytes_per_block = geometry.bytes_per_block(),
        "KV pool"
    );
    Ok(KvPool::new(geometry, num_blocks))
}

/// Builds the CPU model of this rank from a weight source.
pub fn build_cpu(
    cfg: ModelConfig,
    src: &dyn WeightSource,
    opts: &LoadOptions,
    comm: Arc<dyn Communicator>,
) -> Result<DeepseekV4<CpuBackend>, LoadError> {
    if comm.world_size() != opts.shard.world_size || comm.rank() != opts.shard.rank {
        return Err(LoadError::Sharding(format!(
            "communicator is rank {}/{}, options say {}/{}",
            comm.rank(),
            comm.world_size(),
            opts.shard.rank,
            opts.shard.world_size
        )));
    }
    manifest::check_complete(src, &manifest::target_tensors(&cfg))?;
    let backend = CpuBackend;
    let weights = load::load_weights(src, &backend, &cfg, opts.shard)?;
    let pool = kv_pool(&cfg, opts)?;
    Ok(DeepseekV4::new(
        cfg, backend, weights, pool, comm, opts.shard,
    ))
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
        Device::Cuda => Err(LoadError::Source(
            "the CUDA backend is not implemented yet; use --device cpu".into(),
        )),
    }
}
