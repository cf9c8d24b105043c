//! The command line of `dspark-server`: the one place where server flags and their defaults live.
//!
//! Every flag also reads `DSPARK_<FLAG_IN_UPPER_SNAKE>`; where vLLM has a flag for the same thing
//! its name is accepted too (`--tensor-parallel-size`, `-tp`, `VLLM_API_KEY`, positional model).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Where the tiny model ships in the repository (relative to the repo root, the usual cwd).
pub const TINY_MODEL_DIR: &str = "server/assets/tiny-dsv4";

#[derive(Debug, Parser)]
#[command(
    name = "dspark-server",
    version,
    about = "OpenAI-compatible server for DeepSeek-V4-Flash with DSpark speculative decoding"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI-compatible API (rank 0) or follow rank 0's step plans (rank > 0).
    Serve(Box<ServeArgs>),
    /// Offline engine benchmark (no HTTP): step times, bytes moved and achieved bandwidth per
    /// case, against a copy bandwidth measured in the same run (docs/PERFORMANCE.md).
    Bench(Box<BenchArgs>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    Cuda,
    Cpu,
}

/// The device `--device` asks for; without it, CUDA when a GPU can be opened here.
pub fn resolve_device(device: Option<Device>) -> crate::engine::model::Device {
    use crate::engine::model::Device as Model;
    match device {
        Some(Device::Cpu) => Model::Cpu,
        Some(Device::Cuda) => Model::Cuda,
        None if crate::backend::cuda::gpu_present() => Model::Cuda,
        None => Model::Cpu,
    }
}

/// How `dspark-server bench` builds the context of decode and verify cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvFill {
    /// Run the model over the context (chunked prefill, untimed).
    Model,
    /// Write seeded random values into the context's pool blocks: same bytes to read, no
    /// prefill (a 1M-token context is otherwise hours of prefill on a reduced build).
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvCacheDtype {
    /// f32 rows: exact, what transformers computes (docs/KV.md).
    Auto,
    /// bf16 latent, compressed and indexer key rows.
    Bf16,
    /// V4's FP8 records: 584-byte latent rows (e4m3 + bf16 rope + UE8M0 scales), 132-byte
    /// indexer rows (the vLLM recipe's format).
    Fp8,
    /// Not implemented: refused at start.
    Nvfp4,
}

impl KvCacheDtype {
    /// The flag's value, as vLLM's `cache_dtype` label shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            KvCacheDtype::Auto => "auto",
            KvCacheDtype::Bf16 => "bf16",
            KvCacheDtype::Fp8 => "fp8",
            KvCacheDtype::Nvfp4 => "nvfp4",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SpeculativeMethod {
    Dspark,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LoadFormat {
    /// safetensors from the model directory.
    Auto,
    Safetensors,
    /// Random weights of the right shapes: no checkpoint needed (tests, benchmarks of the plumbing).
    Dummy,
}

/// Flags of `dspark-server serve`. The operator passes the resolved profile as these flags.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Model directory (config.json, *.safetensors, tokenizer.json), vLLM-style positional form.
    #[arg(value_name = "MODEL", conflicts_with = "model")]
    pub model_tag: Option<PathBuf>,

    /// Model directory (config.json, *.safetensors, tokenizer.json) [default: the tiny model in the repo]
    #[arg(long, env = "DSPARK_MODEL")]
    pub model: Option<PathBuf>,

    /// Name clients use in `model` [default: the model directory's name].
    #[arg(long, env = "DSPARK_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    /// tokenizer.json to use [default: the one in the model directory].
    #[arg(long, env = "DSPARK_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,

    #[arg(long, env = "DSPARK_HOST", default_value = "0.0.0.0")]
    pub host: String,

    #[arg(long, env = "DSPARK_PORT", default_value_t = 8000)]
    pub port: u16,

    /// Backend [default: cuda when a CUDA driver is present, else cpu].
    #[arg(long, env = "DSPARK_DEVICE", value_enum)]
    pub device: Option<Device>,

    /// Ranks of the tensor-parallel group (one GPU, one pod each).
    #[arg(
        long,
        env = "DSPARK_WORLD_SIZE",
        visible_alias = "tensor-parallel-size",
        default_value_t = 1
    )]
    pub world_size: usize,

    /// This process's rank; 0 leads and serves HTTP (the operator sets it from the pod index).
    /// Omitted with --world-size > 1: start every rank on this machine (local launcher).
    #[arg(long, env = "DSPARK_RANK")]
    pub rank: Option<usize>,

    /// Rank 0's control address HOST:PORT, dialled by the other ranks.
    #[arg(long, env = "DSPARK_LEADER_ADDR")]
    pub leader_addr: Option<String>,

    /// Port rank 0 listens on for the other ranks.
    #[arg(long, env = "DSPARK_CONTROL_PORT", default_value_t = 29500)]
    pub control_port: u16,

    /// How long ranks wait for each other to form the group before giving up.
    #[arg(long, env = "DSPARK_RENDEZVOUS_TIMEOUT_SECS", default_value_t = 600)]
    pub rendezvous_timeout_secs: u64,

    /// Per-request ceiling on prompt + output tokens [default: the pool size, capped by the
    /// model's max_position_embeddings].
    #[arg(long, env = "DSPARK_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,

    /// Most requests (sequences) running at once.
    #[arg(long, env = "DSPARK_MAX_NUM_SEQS", default_value_t = 256)]
    pub max_num_seqs: usize,

    /// Token budget of one step: decodes first, then prefill chunks. On CUDA a chunk runs in
    /// pieces of up to this many rows (8,192 to 16,384; buffers sized at start): 16384 gives long
    /// prompts ~5% more throughput for ~6 GB more memory a GPU and longer mixed steps.
    #[arg(long, env = "DSPARK_MAX_NUM_BATCHED_TOKENS", default_value_t = 8192)]
    pub max_num_batched_tokens: usize,

    /// Storage type of KV entries. Accepted for vLLM compatibility and the operator's profiles;
    /// today the pool stores f32 entries (in GPU memory on CUDA) whatever is asked (a warning says
    /// so; docs/KV.md).
    #[arg(long, env = "DSPARK_KV_CACHE_DTYPE", value_enum, default_value_t = KvCacheDtype::Auto)]
    pub kv_cache_dtype: KvCacheDtype,

    /// Tokens in the shared KV pool [default on CUDA: what --gpu-memory-utilization leaves after
    /// the weights and a 4 GiB workspace, the same on every rank; on the CPU: 16384].
    #[arg(long, env = "DSPARK_KV_POOL_TOKENS")]
    pub kv_pool_tokens: Option<usize>,

    /// Fraction of GPU memory the process may use (weights + workspace + KV pool); sizes the
    /// pool when --kv-pool-tokens is not given.
    #[arg(long, env = "DSPARK_GPU_MEMORY_UTILIZATION", default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,

    /// Run every decode step's kernels from the host instead of replaying captured CUDA graphs
    /// (vLLM's flag; for debugging and comparison). Also `--enforce-eager=true|false`.
    #[arg(long, env = "DSPARK_ENFORCE_EAGER", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub enforce_eager: bool,

    /// Keep every all-reduce on NCCL (vLLM's flag). The one-kernel all-reduce over the peer
    /// GPU's memory, for decode-sized sums of a pair on one host, is opt-in for now
    /// (`DSPARK_CUSTOM_ALL_REDUCE=1`, docs/CUDA.md); this flag keeps it off even then. Also
    /// `--disable-custom-all-reduce=true|false`.
    #[arg(long, env = "DSPARK_DISABLE_CUSTOM_ALL_REDUCE", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub disable_custom_all_reduce: bool,

    /// Speculative decoding [default: dspark when the checkpoint carries the draft, else none].
    #[arg(long, env = "DSPARK_SPECULATIVE_METHOD", value_enum)]
    pub speculative_method: Option<SpeculativeMethod>,

    /// Draft tokens per step [default: the checkpoint's dspark_block_size].
    #[arg(long, env = "DSPARK_NUM_SPECULATIVE_TOKENS")]
    pub num_speculative_tokens: Option<usize>,

    #[arg(long, env = "DSPARK_LOAD_FORMAT", value_enum, default_value_t = LoadFormat::Auto)]
    pub load_format: LoadFormat,

    /// Clients must send `Authorization: Bearer KEY` on /v1/* (also read from VLLM_API_KEY).
    #[arg(long, env = "DSPARK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Requests allowed to wait for a slot beyond the free running slots; past it new requests
    /// get 429.
    #[arg(long, env = "DSPARK_MAX_WAITING_REQUESTS", default_value_t = 1024)]
    pub max_waiting_requests: usize,

    /// Reuse KV blocks of identical prompt prefixes (full blocks, by hash chain).
    #[arg(long, env = "DSPARK_ENABLE_PREFIX_CACHING", num_args = 0..=1, default_value_t = true,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub enable_prefix_caching: bool,

    /// Same as --enable-prefix-caching=false (vLLM's spelling).
    #[arg(long, env = "DSPARK_NO_ENABLE_PREFIX_CACHING")]
    pub no_enable_prefix_caching: bool,

    /// On SIGTERM/SIGINT: stop accepting, let in-flight requests finish for this long, then
    /// cancel the rest and exit 0.
    #[arg(long, env = "DSPARK_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,

    /// Largest request body accepted; larger ones get 413.
    #[arg(long, env = "DSPARK_MAX_REQUEST_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_request_body_bytes: usize,
}

impl ServeArgs {
    /// The model directory: --model, else the positional MODEL, else the tiny model in the repo.
    pub fn model_dir(&self) -> PathBuf {
        if let Some(m) = self.model.as_ref().or(self.model_tag.as_ref()) {
            return m.clone();
        }
        let in_cwd = PathBuf::from(TINY_MODEL_DIR);
        if in_cwd.exists() {
            return in_cwd;
        }
        // Running from elsewhere in a source checkout: the crate's own copy.
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-dsv4")
    }

    /// The name clients use in `model`.
    pub fn served_model_name(&self) -> String {
        if let Some(n) = &self.served_model_name {
            return n.clone();
        }
        let dir = self.model_dir();
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.to_string_lossy().into_owned())
    }

    /// This process's rank (0 when not given).
    pub fn rank(&self) -> usize {
        self.rank.unwrap_or(0)
    }

    /// `--world-size N > 1` without `--rank`: this process supervises N local ranks.
    pub fn launches_local_group(&self) -> bool {
        self.world_size > 1 && self.rank.is_none()
    }

    pub fn prefix_caching(&self) -> bool {
        self.enable_prefix_caching && !self.no_enable_prefix_caching
    }

    /// --api-key / DSPARK_API_KEY, else VLLM_API_KEY (what vLLM users already set).
    pub fn api_key(&self) -> Option<String> {
        self.api_key
            .clone()
            .or_else(|| std::env::var("VLLM_API_KEY").ok())
            .filter(|k| !k.is_empty())
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.tokenizer
            .clone()
            .unwrap_or_else(|| self.model_dir().join("tokenizer.json"))
    }

    /// Checks that do not need the model. Returns a message fit for the user.
    pub fn validate(&self) -> Result<(), String> {
        if self.world_size == 0 {
            return Err("--world-size must be at least 1".into());
        }
        if self.rank() >= self.world_size {
            return Err(format!(
                "--rank {} is outside the group (--world-size {})",
                self.rank(),
                self.world_size
            ));
        }
        if self.max_num_seqs == 0 {
            return Err("--max-num-seqs must be at least 1".into());
        }
        if self.max_num_batched_tokens == 0 {
            return Err("--max-num-batched-tokens must be at least 1".into());
        }
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            return Err("--gpu-memory-utilization must be in (0, 1]".into());
        }
        if self.max_model_len == Some(0) {
            return Err("--max-model-len must be at least 1".into());
        }
        if self.kv_pool_tokens == Some(0) {
            return Err("--kv-pool-tokens must be at least 1".into());
        }
        if self.rank() > 0 && self.leader_addr.is_none() {
            return Err(format!(
                "rank {} needs --leader-addr HOST:PORT",
                self.rank()
            ));
        }
        Ok(())
    }
}

/// How `dspark-server bench` counts weight bytes (see docs/PERFORMANCE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightsAs {
    /// f32 on cpu, checkpoint on cuda: what each backend holds today (the CUDA backend keeps
    /// FP8/FP4 packed and bf16 tensors as bf16).
    Auto,
    /// The checkpoint's encodings throughout (FP8 + tiles, FP4 + scales, bf16 at 2 bytes).
    Checkpoint,
    /// FP8/FP4 packed, bf16 and f32 tensors as f32.
    PackedF32,
    /// Everything as f32.
    F32,
}

/// Flags of `dspark-server bench`: an offline benchmark of the engine through `ModelRunner`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Model directory (config.json; safetensors unless --load-format dummy) [default: the tiny
    /// model in the repo].
    #[arg(long, env = "DSPARK_MODEL")]
    pub model: Option<PathBuf>,

    /// A config.json giving the model's shape instead of <model>/config.json (with dummy weights
    /// no model directory is needed, e.g. server/tests/fixtures/v4-flash-config.json).
    #[arg(long, env = "DSPARK_CONFIG_JSON")]
    pub config_json: Option<PathBuf>,

    #[arg(long, env = "DSPARK_LOAD_FORMAT", value_enum, default_value_t = LoadFormat::Dummy)]
    pub load_format: LoadFormat,

    /// Backend [default: cuda when a CUDA driver is present, else cpu].
    #[arg(long, env = "DSPARK_DEVICE", value_enum)]
    pub device: Option<Device>,

    /// Run only the first N layers of the config (reduced depth); the report also gives step
    /// times scaled to the config's full depth.
    #[arg(long, env = "DSPARK_NUM_LAYERS")]
    pub num_layers: Option<usize>,

    /// Cases, comma-separated: decode:BATCH:CONTEXT, prefill:PROMPT, verify:BATCH:CONTEXT:K
    /// (numbers take k = 1024 and m = 1048576 suffixes) [default: the list].
    #[arg(long, env = "DSPARK_CASES")]
    pub cases: Option<String>,

    /// Cases whose positions go past this are reported as skipped.
    #[arg(long, env = "DSPARK_MAX_CONTEXT")]
    pub max_context: Option<usize>,

    /// Timed repetitions per case.
    #[arg(long, env = "DSPARK_ITERS", default_value_t = 10)]
    pub iters: usize,

    /// Untimed repetitions before timing.
    #[arg(long, env = "DSPARK_WARMUP", default_value_t = 2)]
    pub warmup: usize,

    /// Also write the results as CSV here.
    #[arg(long, env = "DSPARK_CSV")]
    pub csv: Option<PathBuf>,

    /// Tokens in the KV pool [default: what the largest case needs].
    #[arg(long, env = "DSPARK_KV_POOL_TOKENS")]
    pub kv_pool_tokens: Option<usize>,

    /// Tokens per prefill step (setup fills and prefill cases are chunked by it).
    #[arg(long, env = "DSPARK_MAX_NUM_BATCHED_TOKENS", default_value_t = 8192)]
    pub max_num_batched_tokens: usize,

    /// KV element type the bytes model assumes [auto: f32, the pool both backends keep today
    /// (docs/KV.md)]. The runner's own KV storage is not changed by this flag.
    #[arg(long, env = "DSPARK_KV_CACHE_DTYPE", value_enum, default_value_t = KvCacheDtype::Auto)]
    pub kv_cache_dtype: KvCacheDtype,

    /// How the bytes model counts weight bytes [auto: f32 on cpu; packed-f32 on cuda, FP8/FP4
    /// packed and bf16 widened to f32 as the CUDA backend holds them today (docs/CUDA.md)].
    #[arg(long, env = "DSPARK_WEIGHTS_AS", value_enum, default_value_t = WeightsAs::Auto)]
    pub weights_as: WeightsAs,

    /// Sequences of a decode/verify case share the KV blocks of their common context (filled
    /// once, as prefix caching would) instead of each filling its own: much faster setup, but
    /// caches may then serve part of the KV reads the bytes model counts per sequence.
    #[arg(long, env = "DSPARK_SHARED_CONTEXT")]
    pub shared_context: bool,

    /// How decode/verify contexts are built: `model` runs the prefill, `random` writes seeded
    /// random KV rows into the blocks (timing only; logits are then meaningless).
    #[arg(long, env = "DSPARK_KV_FILL", value_enum, default_value_t = KvFill::Model)]
    pub kv_fill: KvFill,

    /// Launch the layer stack's kernels from the host every step instead of replaying CUDA
    /// graphs (vLLM's `--enforce-eager`).
    #[arg(long, env = "DSPARK_ENFORCE_EAGER")]
    pub enforce_eager: bool,

    /// Keep every all-reduce of a `--world-size 2` run on NCCL even where
    /// `DSPARK_CUSTOM_ALL_REDUCE=1` opts in to the peer-memory kernel (vLLM's flag; as `serve`'s).
    #[arg(long, env = "DSPARK_DISABLE_CUSTOM_ALL_REDUCE", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub disable_custom_all_reduce: bool,

    /// Bytes of each buffer of the copy-bandwidth measurement.
    #[arg(long, env = "DSPARK_COPY_BYTES", default_value_t = 1 << 30)]
    pub copy_bytes: usize,

    /// Tensor-parallel ranks, all in this process: on CUDA rank r on GPU r over NCCL, on the
    /// CPU over an in-process group.
    #[arg(
        long,
        env = "DSPARK_WORLD_SIZE",
        visible_alias = "tensor-parallel-size",
        default_value_t = 1
    )]
    pub world_size: usize,

    /// Seed of the dummy weights and of the benchmark's token ids.
    #[arg(long, env = "DSPARK_SEED", default_value_t = 0)]
    pub seed: u64,
}

impl BenchArgs {
    /// The model directory: --model, else the tiny model in the repo.
    pub fn model_dir(&self) -> PathBuf {
        if let Some(m) = &self.model {
            return m.clone();
        }
        let in_cwd = PathBuf::from(TINY_MODEL_DIR);
        if in_cwd.exists() {
            return in_cwd;
        }
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-dsv4")
    }

    /// Checks that do not need the model. Returns a message fit for the user.
    pub fn validate(&self) -> Result<(), String> {
        if self.world_size == 0 {
            return Err("--world-size must be at least 1".into());
        }
        if self.iters == 0 {
            return Err("--iters must be at least 1".into());
        }
        if self.max_num_batched_tokens == 0 {
            return Err("--max-num-batched-tokens must be at least 1".into());
        }
        if self.num_layers == Some(0) {
            return Err("--num-layers must be at least 1".into());
        }
        if self.kv_pool_tokens == Some(0) {
            return Err("--kv-pool-tokens must be at least 1".into());
        }
        if self.copy_bytes < 1 << 20 {
            return Err("--copy-bytes must be at least 1 MiB".into());
        }
        if self.kv_cache_dtype == KvCacheDtype::Nvfp4 {
            return Err(
                "--kv-cache-dtype nvfp4: the bench's bytes model has no NVFP4 KV record \
                 yet (auto, bf16, fp8)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Rewrites vLLM spellings clap cannot express (`-tp N`, `-tp=N`) into ours.
pub fn normalize_vllm_args<I: IntoIterator<Item = String>>(args: I) -> Vec<String> {
    args.into_iter()
        .map(|a| {
            if a == "-tp" {
                "--tensor-parallel-size".to_string()
            } else if let Some(v) = a.strip_prefix("-tp=") {
                format!("--tensor-parallel-size={v}")
            } else {
                a
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> ServeArgs {
        let argv = normalize_vllm_args(
            std::iter::once("dspark-server".to_string())
                .chain(std::iter::once("serve".to_string()))
                .chain(args.iter().map(|s| s.to_string())),
        );
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(a) => *a,
            other => panic!("expected serve, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_contract() {
        let a = parse(&[]);
        assert_eq!(a.host, "0.0.0.0");
        assert_eq!(a.port, 8000);
        assert_eq!(a.world_size, 1);
        assert_eq!(a.rank(), 0);
        assert!(!a.launches_local_group());
        assert_eq!(a.control_port, 29500);
        assert_eq!(a.rendezvous_timeout_secs, 600);
        assert_eq!(a.gpu_memory_utilization, 0.9);
        assert_eq!(a.kv_cache_dtype, KvCacheDtype::Auto);
        assert_eq!(a.load_format, LoadFormat::Auto);
        assert!(a.prefix_caching());
        assert!(a.model_dir().ends_with("tiny-dsv4"));
        assert_eq!(a.served_model_name(), "tiny-dsv4");
        a.validate().unwrap();
    }

    #[test]
    fn vllm_spellings_are_accepted() {
        assert_eq!(parse(&["-tp", "2"]).world_size, 2);
        assert!(parse(&["-tp", "2"]).launches_local_group());
        assert!(!parse(&["-tp", "2", "--rank", "0"]).launches_local_group());
        assert_eq!(parse(&["-tp=2"]).world_size, 2);
        assert_eq!(parse(&["--tensor-parallel-size", "2"]).world_size, 2);
        let a = parse(&["/models/V4-Flash"]);
        assert_eq!(a.model_dir(), PathBuf::from("/models/V4-Flash"));
        assert_eq!(a.served_model_name(), "V4-Flash");
        assert!(!parse(&["--no-enable-prefix-caching"]).prefix_caching());
        assert!(!parse(&["--enable-prefix-caching=false"]).prefix_caching());
        assert!(parse(&["--enable-prefix-caching"]).prefix_caching());
        assert!(parse(&["--enforce-eager"]).enforce_eager);
        assert!(parse(&["--enforce-eager=true"]).enforce_eager);
        assert!(!parse(&["--enforce-eager=false"]).enforce_eager);
        // As the operator renders it (a value after every flag).
        assert!(!parse(&["--enforce-eager", "false"]).enforce_eager);
        assert!(parse(&["--enforce-eager", "true", "--port", "9000"]).enforce_eager);
        assert!(!parse(&[]).enforce_eager);
        assert!(parse(&["--disable-custom-all-reduce"]).disable_custom_all_reduce);
        assert!(!parse(&["--disable-custom-all-reduce=false"]).disable_custom_all_reduce);
        assert!(!parse(&[]).disable_custom_all_reduce);
    }

    #[test]
    fn bad_combinations_are_clear_errors() {
        let e = parse(&["--world-size", "2", "--rank", "2"])
            .validate()
            .unwrap_err();
        assert!(e.contains("outside the group"), "{e}");
        let e = parse(&["--world-size", "2", "--rank", "1"])
            .validate()
            .unwrap_err();
        assert!(e.contains("--leader-addr"), "{e}");
        assert!(
            Cli::try_parse_from(["dspark-server", "serve", "--kv-cache-dtype", "int3"]).is_err()
        );
    }
}
