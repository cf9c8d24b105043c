//! The checkpoint layer (`engine::weights`) as the model's weight source, and the server's
//! entry point [`load`].

use super::config::ModelConfig;
use super::load::{HostTensor, LoadError, WeightSource};
use super::manifest::{self, StoredDtype};
use super::{build, build_cpu, DeepseekV4, Device, LoadFormat, LoadOptions};
use crate::backend::cpu::CpuBackend;
use crate::engine::weights::{Checkpoint, DType, TensorSpec, WeightsError};
use crate::engine::ModelRunner;
use crate::ranks::Communicator;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

fn source_err(e: WeightsError) -> LoadError {
    LoadError::Source(e.to_string())
}

impl WeightSource for Checkpoint {
    fn contains(&self, name: &str) -> bool {
        Checkpoint::contains(self, name)
    }
    fn tensor_f32(&self, name: &str) -> Result<HostTensor, LoadError> {
        let t = Checkpoint::tensor_f32(self, name).map_err(source_err)?;
        Ok(HostTensor {
            shape: t.shape,
            data: t.data,
        })
    }
    fn tensor_f32_slice(
        &self,
        name: &str,
        dim: usize,
        range: Range<usize>,
    ) -> Result<HostTensor, LoadError> {
        let t = Checkpoint::tensor_f32_slice(self, name, dim, range).map_err(source_err)?;
        Ok(HostTensor {
            shape: t.shape,
            data: t.data,
        })
    }
    fn tensor_i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>), LoadError> {
        Checkpoint::tensor_i64(self, name).map_err(source_err)
    }
}

/// The target manifest as the checkpoint layer's specs (drives `--load-format dummy`).
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    manifest::target_tensors(cfg)
        .into_iter()
        .map(|t| {
            let dtype = match t.dtype {
                StoredDtype::F32 => DType::F32,
                StoredDtype::Bf16 => DType::BF16,
                StoredDtype::Fp8Block => DType::F8E4M3,
                StoredDtype::Fp4Expert => DType::I8,
                StoredDtype::I64 => DType::I64,
            };
            TensorSpec::new(t.name, &t.shape, dtype)
        })
        .collect()
}

pub(crate) fn open(
    dir: &Path,
    cfg: &ModelConfig,
    opts: &LoadOptions,
) -> Result<Checkpoint, LoadError> {
    if opts.device == Device::Cpu {
        // Before mapping or generating anything.
        super::check_host_memory(&manifest::target_tensors(cfg), opts.shard.world_size)?;
    }
    Ok(match opts.load_format {
        LoadFormat::Dummy => Checkpoint::dummy(&tensor_specs(cfg), opts.dummy_seed),
        LoadFormat::Auto | LoadFormat::Safetensors => Checkpoint::open(dir).map_err(source_err)?,
    })
}

pub(crate) fn log_loaded(dir: &Path, opts: &LoadOptions, ckpt: &Checkpoint, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    let bytes = ckpt.total_bytes();
    tracing::info!(
        dir = %dir.display(),
        format = ?opts.load_format,
        tensors = ckpt.names().len(),
        bytes,
        secs,
        mb_per_s = bytes as f64 / 1e6 / secs.max(1e-9),
        "model loaded"
    );
}

/// Opens the model in `dir` (config.json + safetensors, or dummy weights) and builds this
/// rank's runner with its KV pool, on `opts.device`.
pub fn load(
    dir: &Path,
    opts: &LoadOptions,
    comm: Arc<dyn Communicator>,
) -> Result<Box<dyn ModelRunner>, LoadError> {
    let cfg = ModelConfig::from_dir(dir)?;
    let started = Instant::now();
    let ckpt = open(dir, &cfg, opts)?;
    let runner = build(cfg, &ckpt, opts, comm)?;
    log_loaded(dir, opts, &ckpt, started);
    Ok(runner)
}

/// [`load`] on the CPU backend, returning the concrete model (for callers that need more than
/// [`ModelRunner`], e.g. the DSpark draft reading target features and weights).
pub fn load_cpu(
    dir: &Path,
    opts: &LoadOptions,
    comm: Arc<dyn Communicator>,
) -> Result<DeepseekV4<CpuBackend>, LoadError> {
    let cfg = ModelConfig::from_dir(dir)?;
    let started = Instant::now();
    let ckpt = open(dir, &cfg, opts)?;
    let model = build_cpu(cfg, &ckpt, opts, comm)?;
    log_loaded(dir, opts, &ckpt, started);
    Ok(model)
}
