//! The checkpoint layer (`engine::weights`) as the model's weight source, and the server's
//! entry point [`load`].

use super::config::ModelConfig;
use super::load::{HostTensor, LoadError, WeightSource};
use super::manifest::{self, StoredDtype};
use super::{build, LoadFormat, LoadOptions};
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

/// Opens the model in `dir` (config.json + safetensors, or dummy weights) and builds this
/// rank's runner with its KV pool.
pub fn load(
    dir: &Path,
    opts: &LoadOptions,
    comm: Arc<dyn Communicator>,
) -> Result<Box<dyn ModelRunner>, LoadError> {
    let cfg = ModelConfig::from_dir(dir)?;
    let started = Instant::now();
    let ckpt = match opts.load_format {
        LoadFormat::Dummy => Checkpoint::dummy(&tensor_specs(&cfg), opts.dummy_seed),
        LoadFormat::Auto | LoadFormat::Safetensors => Checkpoint::open(dir).map_err(source_err)?,
    };
    let runner = build(cfg, &ckpt, opts, comm)?;
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
    Ok(runner)
}
