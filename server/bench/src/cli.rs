//! Command line of `dspark-bench`. Flag names follow vLLM's `vllm bench serve` where one exists.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::client::Api;

#[derive(Debug, Parser, Serialize)]
#[command(
    name = "dspark-bench",
    version,
    about = "Load benchmark for OpenAI-compatible endpoints (dspark or vLLM): streaming latency, \
             throughput, speculative-decoding acceptance, soak; JSON/CSV results and PNG plots"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every scenario takes (they may be given before or after the subcommand).
#[derive(Debug, Args, Serialize)]
#[command(next_help_heading = "Common options")]
pub struct CommonArgs {
    /// OpenAI-compatible base URL, including /v1.
    #[arg(
        long,
        global = true,
        env = "DSPARK_BENCH_BASE_URL",
        default_value = "http://127.0.0.1:8000/v1"
    )]
    pub base_url: String,
    /// Bearer token sent with every request (never written to the results).
    #[arg(long, global = true, env = "OPENAI_API_KEY", hide_env_values = true)]
    #[serde(skip)]
    pub api_key: Option<String>,
    /// Model name to request [default: the first model listed by GET /v1/models].
    #[arg(long, global = true)]
    pub model: Option<String>,
    /// Which API to call [default: chat; completions for `prefill`].
    #[arg(long, global = true, value_enum)]
    pub endpoint: Option<Api>,
    /// max_tokens per request [default: 256; 16 for `prefill`; 128 for `soak`].
    #[arg(long, global = true)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature (0 = greedy).
    #[arg(long, global = true, default_value_t = 0.0)]
    pub temperature: f64,
    /// Send `ignore_eos: true` (vLLM extension) so every request generates max_tokens tokens.
    #[arg(long, global = true)]
    pub ignore_eos: bool,
    /// Seed for prompt order, arrivals and synthetic prompts; also sent as the request `seed`.
    #[arg(long, global = true)]
    pub seed: Option<u64>,
    /// Per-request limit (whole stream), e.g. 600, 90s, 10m.
    #[arg(long, global = true, default_value = "600s", value_parser = parse_duration)]
    pub timeout: f64,
    /// Requests per group (prompt set, concurrency level, rate, depth; see each scenario).
    #[arg(long, global = true)]
    pub requests: Option<usize>,
    /// Stop issuing requests after this long per group (soak: in total), e.g. 60s, 5m.
    #[arg(long, global = true, value_parser = parse_duration)]
    pub duration: Option<f64>,
    /// Unrecorded short requests sent first (connection set-up, lazy kernel compilation).
    #[arg(long, global = true, default_value_t = 1)]
    pub warmup: usize,
    /// Directory for <scenario>.json, CSVs and PNG plots.
    #[arg(long, global = true, default_value = "bench-results")]
    pub out: PathBuf,
    /// Prometheus endpoint for acceptance and RSS [default: <base-url without /v1>/metrics].
    #[arg(long, global = true)]
    pub metrics_url: Option<String>,
    /// Do not read /metrics (acceptance figures are then absent).
    #[arg(long, global = true)]
    pub no_metrics: bool,
    /// JSON object merged into every request body, e.g.
    /// '{"chat_template_kwargs":{"thinking":false}}'.
    #[arg(long, global = true)]
    pub extra_body: Option<String>,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand, Serialize)]
pub enum Command {
    /// Single-stream decode speed (mean and peak tok/s) per prompt set / content type, with
    /// speculative-decoding acceptance per set when /metrics has it. --requests: per set [10].
    Decode(PromptArgs),
    /// Concurrency scaling: aggregate and per-stream tok/s at each level.
    /// --requests: per level [2 x level]; or --duration per level.
    Concurrency(ConcurrencyArgs),
    /// Open-loop staggered arrivals at Poisson rates. --requests: per rate [100]; or --duration.
    Poisson(PoissonArgs),
    /// TTFT at prompt depths (synthetic prompts of exact token length). --requests: per depth [1].
    Prefill(PrefillArgs),
    /// Like `decode`, but fails unless the server's vllm:spec_decode_* counters moved; reports
    /// acceptance rate, mean acceptance length and per-position rates per prompt set.
    Acceptance(PromptArgs),
    /// Fixed concurrency for a duration [5m]: requests, errors, p50/p99 latency and server RSS
    /// per time window.
    Soak(SoakArgs),
}

#[derive(Debug, Args, Serialize)]
pub struct PromptArgs {
    /// Prompt sets: JSONL files (a `prompt` or `messages` field per line) or builtin:humaneval,
    /// builtin:mtbench. Repeat or comma-separate. [default: builtin:humaneval,builtin:mtbench]
    #[arg(long, value_delimiter = ',')]
    pub prompts: Vec<String>,
}

#[derive(Debug, Args, Serialize)]
pub struct ConcurrencyArgs {
    /// Concurrent streams per level.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,6,8,16")]
    pub levels: Vec<usize>,
    /// Prompt sets (see `decode`) [default: builtin:mtbench].
    #[arg(long, value_delimiter = ',')]
    pub prompts: Vec<String>,
}

#[derive(Debug, Args, Serialize)]
pub struct PoissonArgs {
    /// Arrival rates in requests per second (one group each); vLLM's --request-rate is an alias.
    #[arg(long, alias = "request-rate", value_delimiter = ',', required = true)]
    pub rate: Vec<f64>,
    /// Cap on requests in flight (arrivals wait for a slot); unlimited by default.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Prompt sets (see `decode`) [default: builtin:mtbench].
    #[arg(long, value_delimiter = ',')]
    pub prompts: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyntheticKind {
    /// Random token ids as the `prompt` array of /v1/completions: exact length, no tokenizer.
    Ids,
    /// Random common words (about one token each), for servers without token-id prompts.
    Text,
}

#[derive(Debug, Args, Serialize)]
pub struct PrefillArgs {
    /// Prompt lengths in tokens; K = 1024, M = 1048576. Depths whose prompt + max_tokens exceed
    /// the served max_model_len (when /v1/models reports it) are skipped.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "8K,16K,32K,64K,128K,256K,512K,1M",
        value_parser = parse_tokens
    )]
    pub depths: Vec<u64>,
    /// How synthetic prompts are built.
    #[arg(long, value_enum, default_value = "ids")]
    pub synthetic: SyntheticKind,
    /// Lowest token id drawn for synthetic prompts (stay clear of special tokens).
    #[arg(long, default_value_t = 1000)]
    pub token_id_min: u32,
    /// Highest token id drawn for synthetic prompts (must be inside the vocabulary).
    #[arg(long, default_value_t = 30000)]
    pub token_id_max: u32,
}

#[derive(Debug, Args, Serialize)]
pub struct SoakArgs {
    /// Concurrent streams held for the whole run.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Width of a reporting window.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub window: f64,
    /// Server process to sample RSS from (/proc/PID/status; the server must run on this
    /// machine). Without it, process_resident_memory_bytes from /metrics is used if present.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Prompt sets (see `decode`) [default: builtin:mtbench].
    #[arg(long, value_delimiter = ',')]
    pub prompts: Vec<String>,
}

/// `90`, `90s`, `500ms`, `5m`, `1h` -> seconds.
pub fn parse_duration(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 30s, 5m, 500ms)"))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(format!("duration `{s}` must be positive"));
    }
    Ok(v * mult)
}

/// `8192`, `8K`, `1M` -> tokens (binary multiples, as context lengths are quoted).
pub fn parse_tokens(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1024),
        Some('m' | 'M') => (&t[..t.len() - 1], 1024 * 1024),
        _ => (t, 1),
    };
    let v: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a token count (try 8192, 8K, 1M)"))?;
    if v == 0 {
        return Err("a prompt depth must be at least 1 token".into());
    }
    v.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_and_token_counts() {
        assert_eq!(parse_duration("90").unwrap(), 90.0);
        assert_eq!(parse_duration("500ms").unwrap(), 0.5);
        assert_eq!(parse_duration("5m").unwrap(), 300.0);
        assert!(parse_duration("-1s").is_err() && parse_duration("x").is_err());
        assert_eq!(parse_tokens("8K").unwrap(), 8192);
        assert_eq!(parse_tokens("1M").unwrap(), 1_048_576);
        assert_eq!(parse_tokens("300").unwrap(), 300);
        assert!(parse_tokens("0").is_err() && parse_tokens("1.5K").is_err());
    }

    #[test]
    fn global_flags_after_subcommand() {
        let cli = Cli::try_parse_from([
            "dspark-bench",
            "concurrency",
            "--levels",
            "1,4",
            "--max-tokens",
            "32",
            "--base-url",
            "http://x:1/v1",
        ])
        .unwrap();
        assert_eq!(cli.common.max_tokens, Some(32));
        assert_eq!(cli.common.base_url, "http://x:1/v1");
        match cli.command {
            Command::Concurrency(c) => assert_eq!(c.levels, vec![1, 4]),
            other => panic!("{other:?}"),
        }
    }
}
