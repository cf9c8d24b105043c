//! `dspark-server bench`: an offline benchmark of the engine through [`ModelRunner`] (no HTTP,
//! no scheduler), on whatever backend `model::build` gives for the device.
//!
//! For each case it fills the KV state untimed, times the steps, and turns the step time into
//! an achieved bandwidth with a model of the bytes the step had to move ([`bytes`]), compared
//! with a copy bandwidth measured in the same run ([`copy`]). What each figure means:
//! docs/PERFORMANCE.md.

pub mod bytes;
pub mod cases;
pub mod copy;
pub mod report;
pub mod tensor_parallel;

use std::path::PathBuf;
use std::sync::Arc;

use crate::cli::{BenchArgs, KvCacheDtype, LoadFormat, WeightsAs};
use crate::engine::model::{
    self, checkpoint_source, kv::BlockGeometry, manifest, ConfigError, Device, LoadError,
    LoadOptions, ModelConfig,
};
use crate::engine::EngineError;
use crate::ranks::SingleRank;
use bytes::{KvDtype, WeightStorage};
use cases::{BytesModel, Case, RunSettings};
use report::{Outcome, Report, Row};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Args(String),
    #[error("{0}")]
    Case(String),
    #[error("reading the model config: {0}")]
    Config(#[from] ConfigError),
    #[error("loading the model: {0}")]
    Load(#[from] LoadError),
    #[error("engine step failed: {0}")]
    Engine(EngineError),
    #[error("copy bandwidth: {0}")]
    Copy(String),
    #[error("{0}")]
    Io(String),
}

/// The shape the bench runs: the config (possibly cut to fewer layers) and the full depth.
pub struct Shape {
    pub cfg: ModelConfig,
    /// The config as written (all layers).
    pub full: ModelConfig,
    pub full_layers: usize,
    pub source: PathBuf,
}

/// Reads the config (--config-json, else the model directory's) and applies --num-layers.
pub fn shape(args: &BenchArgs) -> Result<Shape, BenchError> {
    let source = args
        .config_json
        .clone()
        .unwrap_or_else(|| args.model_dir().join("config.json"));
    let text = std::fs::read_to_string(&source).map_err(|e| ConfigError::Io {
        path: source.display().to_string(),
        source: e,
    })?;
    let mut value: serde_json::Value = serde_json::from_str(&text).map_err(ConfigError::Json)?;
    let full = ModelConfig::from_json(&value)?;
    let full_layers = full.num_hidden_layers;
    let cfg = match args.num_layers {
        None => full.clone(),
        Some(n) if n > full_layers => {
            return Err(BenchError::Args(format!(
                "--num-layers {n}: the config has only {full_layers} layers"
            )))
        }
        Some(n) => {
            // The parser cuts the per-layer lists to num_hidden_layers (as transformers does):
            // the reduced model is the first n layers of the full one.
            if let Some(obj) = value.as_object_mut() {
                obj.insert("num_hidden_layers".into(), n.into());
            }
            ModelConfig::from_json(&value)?
        }
    };
    Ok(Shape {
        cfg,
        full,
        full_layers,
        source,
    })
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn host_memory_available() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = m
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// Why a case cannot run with these settings, if it cannot.
fn skip_reason(
    case: &Case,
    cfg: &ModelConfig,
    max_context: Option<usize>,
    pool_blocks: Option<usize>,
    block_size: usize,
    shared: bool,
) -> Option<String> {
    let end = case.end_position();
    if let Some(m) = max_context {
        if end > m {
            return Some(format!("needs {end} positions, above --max-context {m}"));
        }
    }
    if end > cfg.max_position_embeddings {
        return Some(format!(
            "needs {end} positions, beyond max_position_embeddings {}",
            cfg.max_position_embeddings
        ));
    }
    let need = case.blocks_needed(block_size, shared);
    match pool_blocks {
        Some(have) if need > have => Some(format!(
            "needs {} KV tokens, the pool holds {} (--kv-pool-tokens)",
            need * block_size,
            have * block_size
        )),
        _ => None,
    }
}

/// Runs the benchmark described by `args`, handing `sink` the report as it grows (progress goes
/// to the log). A case whose step fails is reported as failed and the next one runs.
pub fn run(args: &BenchArgs, sink: &mut dyn ReportSink) -> Result<Report, BenchError> {
    args.validate().map_err(BenchError::Args)?;
    let device = crate::cli::resolve_device(args.device);
    let cases = match &args.cases {
        Some(list) => cases::parse_cases(list)?,
        None => cases::default_cases(),
    };
    let Shape {
        cfg,
        full,
        full_layers,
        source,
    } = shape(args)?;
    let block_size = cfg.default_block_size();
    let shared = args.shared_context;
    let user_pool_blocks = args.kv_pool_tokens.map(|t| t.div_ceil(block_size));

    let mut skips: Vec<Option<String>> = cases
        .iter()
        .map(|c| {
            skip_reason(
                c,
                &cfg,
                args.max_context,
                user_pool_blocks,
                block_size,
                shared,
            )
        })
        .collect();
    let largest = cases
        .iter()
        .zip(&skips)
        .filter(|(_, s)| s.is_none())
        .map(|(c, _)| c.blocks_needed(block_size, shared))
        .max()
        .unwrap_or(1);
    let pool_blocks = user_pool_blocks.unwrap_or(largest).max(1);

    // The pool stores rows as --kv-cache-dtype says, on both backends.
    let kv_dtype = match args.kv_cache_dtype {
        KvCacheDtype::Auto => KvDtype::F32,
        KvCacheDtype::Bf16 => KvDtype::Bf16,
        KvCacheDtype::Fp8 => KvDtype::Fp8,
        KvCacheDtype::Nvfp4 => {
            return Err(BenchError::Args(
                "--kv-cache-dtype nvfp4 is not implemented (use fp8 or bf16)".into(),
            ))
        }
    };
    let geometry = BlockGeometry::new(&cfg, block_size, kv_dtype.storage())
        .map_err(|e| BenchError::Args(e.to_string()))?;

    let manifest = manifest::target_tensors(&cfg);
    // The pool is allocated whole at load (host memory on the CPU backend, with its f32 weights;
    // GPU memory on CUDA, where a pool that does not fit is a clear allocation error): refuse
    // what cannot fit the host rather than being killed.
    // Recent blocks for the widest case's sequences and the fill's steps (docs/KV.md).
    let widest = cases.iter().map(Case::batch).max().unwrap_or(1);
    let step_tokens = cases
        .iter()
        .map(|c| c.batch() * c.new_tokens())
        .max()
        .unwrap_or(1)
        .max(args.max_num_batched_tokens);
    let recent_blocks = geometry
        .recent_blocks_for(widest, step_tokens)
        .min(pool_blocks);
    let pool = pool_blocks as u64 * geometry.bytes_per_block() as u64
        + recent_blocks as u64 * geometry.bytes_per_recent() as u64;
    let weights: u64 = match device {
        Device::Cpu => manifest
            .iter()
            .map(|t| t.shape.iter().product::<usize>() as u64 * 4)
            .sum(),
        Device::Cuda => 0,
    };
    if let Some(avail) = host_memory_available().filter(|_| device == Device::Cpu) {
        if pool + weights > avail {
            let advice = if weights > avail {
                "the weights alone do not fit: use --device cuda or fewer --num-layers"
            } else {
                "lower --max-context or --kv-pool-tokens, pass fewer --cases, or use \
                 --shared-context"
            };
            let weights_note = if weights > 0 {
                format!(
                    " and the CPU backend {:.2} GB for f32 weights",
                    weights as f64 / 1e9
                )
            } else {
                String::new()
            };
            return Err(BenchError::Args(format!(
                "the KV pool needs {:.2} GB of host memory ({pool_blocks} blocks of {block_size} \
                 tokens){weights_note}; the host has {:.2} GB available: {advice}",
                pool as f64 / 1e9,
                avail as f64 / 1e9
            )));
        }
    }

    let storage = match (args.weights_as, device) {
        (WeightsAs::Auto, Device::Cpu) | (WeightsAs::F32, _) => WeightStorage::F32,
        (WeightsAs::PackedF32, _) => WeightStorage::PackedF32,
        (WeightsAs::Auto, Device::Cuda) | (WeightsAs::Checkpoint, _) => WeightStorage::Checkpoint,
    };

    // Before the model takes the memory.
    tracing::info!(bytes = args.copy_bytes, "measuring copy bandwidth");
    let copy_bw = copy::copy_bandwidth(device, args.copy_bytes)?;
    tracing::info!(gb_s = copy_bw.gb_s, device = %copy_bw.device_name, "copy bandwidth");

    let opts = LoadOptions {
        device,
        load_format: match args.load_format {
            LoadFormat::Auto => model::LoadFormat::Auto,
            LoadFormat::Safetensors => model::LoadFormat::Safetensors,
            LoadFormat::Dummy => model::LoadFormat::Dummy,
        },
        kv_pool_tokens: pool_blocks * block_size,
        kv_storage: kv_dtype.storage(),
        kv_recent_blocks: Some(recent_blocks),
        // As the server passes them: the step budget sizes the GEMM pieces of prefill chunks.
        batch_limits: Some((widest, args.max_num_batched_tokens)),
        block_size: Some(block_size),
        shard: model::Shard::SINGLE,
        dummy_seed: args.seed,
        // The copy above measured GPU 0 too.
        gpu_ordinal: 0,
        // The bench sizes the pool for its cases.
        gpu_memory_utilization: None,
        enforce_eager: args.enforce_eager,
    };
    let load_started = std::time::Instant::now();
    let dir = args.model_dir();
    let mut all_reduce = None;
    let mut runner: Box<dyn crate::engine::ModelRunner> = if args.world_size > 1 {
        let peer =
            crate::backend::cuda::peer::peer_all_reduce_wanted(args.disable_custom_all_reduce);
        let group = tensor_parallel::build(&cfg, &opts, args.world_size, &dir, peer)?;
        all_reduce = Some(group.all_reduce.clone());
        Box::new(group)
    } else {
        let ckpt = checkpoint_source::open(&dir, &cfg, &opts)?;
        model::build(cfg.clone(), &ckpt, &opts, Arc::new(SingleRank))?
    };
    let load_s = load_started.elapsed().as_secs_f64();
    let layout = runner.kv_layout();
    tracing::info!(
        secs = load_s,
        num_blocks = layout.num_blocks,
        block_size = layout.block_size,
        "model built"
    );
    tracing::info!(
        "DSpark acceptance: not applicable (dummy weights); verify cases time the target's \
         K+1-row verification pass only"
    );

    let model = BytesModel {
        cfg: &cfg,
        weights: bytes::weight_bytes(&cfg, &manifest, storage),
        full_cfg: &full,
        full_weights: bytes::weight_bytes(&full, &manifest::target_tensors(&full), storage),
        kv: kv_dtype.entry_bytes(&cfg),
    };
    let settings = RunSettings {
        iters: args.iters,
        warmup: args.warmup,
        chunk: args.max_num_batched_tokens,
        shared_context: shared,
        seed: args.seed,
        random_fill: args.kv_fill == crate::cli::KvFill::Random,
    };
    let mut resources = cases::CaseResources::new(&layout);
    let mut report = Report {
        device: match device {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        },
        device_name: copy_bw.device_name.clone(),
        copy: copy_bw,
        config_source: source.display().to_string(),
        layers: cfg.num_hidden_layers,
        full_layers,
        layer_mix: report::layer_mix(&cfg),
        weights_as: storage,
        kv_dtype,
        shared_context: shared,
        random_fill: args.kv_fill == crate::cli::KvFill::Random,
        world_size: args.world_size,
        all_reduce,
        pool_tokens: layout.num_blocks * layout.block_size,
        chunk: args.max_num_batched_tokens,
        iters: args.iters,
        warmup: args.warmup,
        date: chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        rows: Vec::with_capacity(cases.len()),
    };
    sink.begin(&report)?;
    for (case, skip) in cases.iter().zip(skips.iter_mut()) {
        let outcome = match skip.take() {
            Some(why) => {
                tracing::info!(case = %case.label(), "skipped: {why}");
                Outcome::Skipped(why)
            }
            None => {
                tracing::info!(case = %case.label(), "running");
                match cases::run_case(runner.as_mut(), &mut resources, *case, &settings, &model) {
                    Ok(m) => {
                        if m.setup_tokens > 0 {
                            tracing::info!(
                                case = %case.label(),
                                tokens = m.setup_tokens,
                                secs = m.setup.as_secs_f64(),
                                "KV fill (untimed setup)"
                            );
                        }
                        tracing::info!(case = %case.label(), ms = m.mean_s() * 1e3, "done");
                        Outcome::Ran(m)
                    }
                    // Keep what the other cases measure (e.g. one case out of device memory).
                    Err(e) => {
                        tracing::error!(case = %case.label(), "failed: {e}");
                        Outcome::Failed(e.to_string())
                    }
                }
            }
        };
        let row = Row {
            case: *case,
            outcome,
        };
        sink.row(&report, &row)?;
        report.rows.push(row);
    }
    Ok(report)
}

/// Receives the report as it grows, so a run cut short keeps what it measured: the run's
/// context once, then each row as its case ends.
pub trait ReportSink {
    fn begin(&mut self, report: &Report) -> Result<(), BenchError>;
    fn row(&mut self, report: &Report, row: &Row) -> Result<(), BenchError>;
}

/// Discards everything (the caller reads the returned report).
pub struct NoSink;

impl ReportSink for NoSink {
    fn begin(&mut self, _: &Report) -> Result<(), BenchError> {
        Ok(())
    }
    fn row(&mut self, _: &Report, _: &Row) -> Result<(), BenchError> {
        Ok(())
    }
}

/// The table on a writer (stdout) and, optionally, the CSV in a file, each row flushed as it
/// comes.
pub struct WriterSink<W: std::io::Write> {
    pub table: W,
    pub csv: Option<(PathBuf, std::fs::File)>,
}

impl<W: std::io::Write> WriterSink<W> {
    /// Creates the CSV file now, so a bad path fails before any work.
    pub fn new(table: W, csv: Option<&std::path::Path>) -> Result<Self, BenchError> {
        let csv = match csv {
            None => None,
            Some(p) => Some((
                p.to_path_buf(),
                std::fs::File::create(p).map_err(|e| {
                    BenchError::Io(format!("cannot create the CSV {}: {e}", p.display()))
                })?,
            )),
        };
        Ok(Self { table, csv })
    }

    fn write(&mut self, table: &str, csv: &str) -> Result<(), BenchError> {
        self.table
            .write_all(table.as_bytes())
            .and_then(|()| self.table.flush())
            .map_err(|e| BenchError::Io(format!("cannot write the table: {e}")))?;
        if let Some((path, file)) = &mut self.csv {
            use std::io::Write as _;
            file.write_all(csv.as_bytes())
                .and_then(|()| file.flush())
                .map_err(|e| BenchError::Io(format!("cannot write {}: {e}", path.display())))?;
        }
        Ok(())
    }
}

impl<W: std::io::Write> ReportSink for WriterSink<W> {
    fn begin(&mut self, report: &Report) -> Result<(), BenchError> {
        self.write(&report.table_header(), &format!("{}\n", report::CSV_HEADER))
    }
    fn row(&mut self, report: &Report, row: &Row) -> Result<(), BenchError> {
        self.write(&report.table_row(row), &report.csv_row(row))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> BenchArgs {
        let argv = ["dspark-server", "bench"].iter().chain(extra.iter());
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::Bench(a) => *a,
            other => panic!("expected bench, got {other:?}"),
        }
    }

    #[test]
    fn reduced_depth_keeps_the_first_layers() {
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/v4-flash-config.json"
        );
        let s = shape(&args(&["--config-json", fixture, "--num-layers", "4"])).unwrap();
        assert_eq!(s.full_layers, 43);
        assert_eq!(s.cfg.num_hidden_layers, 4);
        assert_eq!(s.cfg.hidden_size, 4096);
        assert_eq!(report::layer_mix(&s.cfg), "2 sliding, 1 CSA, 1 HCA");
        let e = shape(&args(&["--config-json", fixture, "--num-layers", "44"]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("only 43 layers"), "{e}");
    }

    #[test]
    fn cases_past_the_limits_are_skipped_with_a_reason() {
        let s = shape(&args(&[])).unwrap();
        let c = Case::Decode {
            batch: 2,
            context: 1000,
        };
        let why = skip_reason(&c, &s.cfg, Some(512), None, 128, false).unwrap();
        assert!(why.contains("above --max-context 512"), "{why}");
        let c = Case::Decode {
            batch: 1,
            context: 1_048_576,
        };
        let why = skip_reason(&c, &s.cfg, None, None, 128, false).unwrap();
        assert!(why.contains("max_position_embeddings"), "{why}");
        let c = Case::Prefill { prompt: 1024 };
        let why = skip_reason(&c, &s.cfg, None, Some(4), 128, false).unwrap();
        assert!(why.contains("pool holds 512"), "{why}");
        assert!(skip_reason(&c, &s.cfg, None, Some(8), 128, false).is_none());
    }

    #[test]
    fn two_ranks_run_in_process_on_the_cpu() {
        // The CPU's in-process group: same cases at TP=1 and TP=2 both run.
        let one = run(
            &args(&["--cases", "decode:1:64", "--device", "cpu"]),
            &mut NoSink,
        )
        .unwrap();
        let two = run(
            &args(&[
                "--cases",
                "decode:1:64",
                "--device",
                "cpu",
                "--world-size",
                "2",
            ]),
            &mut NoSink,
        )
        .unwrap();
        assert_eq!(two.world_size, 2);
        for r in [&one, &two] {
            assert!(
                matches!(r.rows[0].outcome, Outcome::Ran(_)),
                "{:?}",
                r.rows[0].outcome
            );
        }
        assert!(two.table().contains("tensor parallel: 2 ranks"));
    }
}
