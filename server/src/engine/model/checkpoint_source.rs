//! The checkpoint layer (`engine::weights`) as the model's weight source, and the server's
//! entry point [`load`].

use super::config::ModelConfig;
use super::load::{HostTensor, LoadError, WeightSource};
use super::manifest::{self, StoredDtype};
use super::{build, build_cpu, DeepseekV4, Device, LoadFormat, LoadOptions};
use crate::backend::cpu::CpuBackend;
use crate::backend::PackedWeight;
use crate::engine::weights::{Checkpoint, DType, TensorSpec, WeightFormat, WeightsError};
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
    fn packed(
        &self,
        name: &str,
        slice: Option<(usize, Range<usize>)>,
    ) -> Result<Option<(Vec<usize>, PackedWeight)>, LoadError> {
        packed_slice(self, name, slice)
    }
}

/// E8M0 bytes of scales read as f32 (exact powers of two); `None` if one is not.
fn e8m0_bytes(scales: &[f32]) -> Option<Vec<u8>> {
    scales
        .iter()
        .map(|&s| {
            let bits = s.to_bits();
            if bits == 0x0040_0000 {
                return Some(0); // 2^-127, an f32 subnormal
            }
            let (exp, man) = ((bits >> 23) & 0xFF, bits & 0x7F_FFFF);
            (bits >> 31 == 0 && man == 0 && exp != 0 && exp != 0xFF).then_some(exp as u8)
        })
        .collect()
}

/// Rows `r` of a row-major `[_, cols]` byte matrix, columns `c` of each.
fn sub_bytes(data: &[u8], cols: usize, r: Range<usize>, c: Range<usize>) -> Vec<u8> {
    let mut out = Vec::with_capacity(r.len() * c.len());
    for row in r {
        out.extend_from_slice(&data[row * cols + c.start..row * cols + c.end]);
    }
    out
}

/// `name` packed as the backend wants it: FP8 with 128x128 E8M0 tiles, FP4 with E8M0 per 32.
/// Slices that cut a scale tile fall back to f32 (`None`).
fn packed_slice(
    ckpt: &Checkpoint,
    name: &str,
    slice: Option<(usize, Range<usize>)>,
) -> Result<Option<(Vec<usize>, PackedWeight)>, LoadError> {
    use crate::backend::{FP4_GROUP, FP8_BLOCK};
    let (format, Some(scale_name)) = (ckpt.format(name), ckpt.scale_name(name)) else {
        return Ok(None);
    };
    let (spec, bytes) = ckpt.raw(name).map_err(source_err)?;
    // The checkpoint reports logical shapes (FP4: values, not packed bytes).
    let &[rows, cols] = spec.shape.as_slice() else {
        return Ok(None);
    };
    let scale_values = Checkpoint::tensor_f32(ckpt, scale_name).map_err(source_err)?;
    let Some(scale_bytes) = e8m0_bytes(&scale_values.data) else {
        return Ok(None);
    };
    match format {
        Some(WeightFormat::Fp8Block { block }) if block == [FP8_BLOCK, FP8_BLOCK] => {
            let (sr, sc) = (rows.div_ceil(FP8_BLOCK), cols.div_ceil(FP8_BLOCK));
            if scale_bytes.len() != sr * sc || bytes.len() != rows * cols {
                return Ok(None);
            }
            let aligned = |r: &Range<usize>, n: usize| {
                r.start.is_multiple_of(FP8_BLOCK) && (r.end.is_multiple_of(FP8_BLOCK) || r.end == n)
            };
            let (rr, cr) = match slice {
                None => (0..rows, 0..cols),
                Some((0, r)) if aligned(&r, rows) && r.end <= rows => (r, 0..cols),
                Some((1, c)) if aligned(&c, cols) && c.end <= cols => (0..rows, c),
                Some(_) => return Ok(None),
            };
            let srr = rr.start / FP8_BLOCK..rr.end.div_ceil(FP8_BLOCK);
            let scr = cr.start / FP8_BLOCK..cr.end.div_ceil(FP8_BLOCK);
            let shape = vec![rr.len(), cr.len()];
            Ok(Some((
                shape,
                PackedWeight::Fp8Block {
                    data: sub_bytes(bytes, cols, rr, cr),
                    scales: sub_bytes(&scale_bytes, sc, srr, scr),
                },
            )))
        }
        Some(WeightFormat::Fp4 { group }) if group == FP4_GROUP => {
            let groups = cols / FP4_GROUP;
            if !cols.is_multiple_of(FP4_GROUP)
                || bytes.len() != rows * cols / 2
                || scale_bytes.len() != rows * groups
            {
                return Ok(None);
            }
            let (rr, cr) = match slice {
                None => (0..rows, 0..cols),
                Some((0, r)) if r.end <= rows => (r, 0..cols),
                Some((1, c))
                    if c.start.is_multiple_of(FP4_GROUP)
                        && c.end.is_multiple_of(FP4_GROUP)
                        && c.end <= cols =>
                {
                    (0..rows, c)
                }
                Some(_) => return Ok(None),
            };
            let shape = vec![rr.len(), cr.len()];
            let (data, scales) = (
                sub_bytes(bytes, cols / 2, rr.clone(), cr.start / 2..cr.end / 2),
                sub_bytes(
                    &scale_bytes,
                    groups,
                    rr,
                    cr.start / FP4_GROUP..cr.end / FP4_GROUP,
                ),
            );
            Ok(Some((shape, PackedWeight::Fp4 { data, scales })))
        }
        _ => Ok(None),
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
