//! Every metric the server exports, by name, and their Prometheus text rendering.
//!
//! Names are vLLM's where vLLM has the metric, so existing dashboards, autoscalers and benchmark
//! scripts work unchanged; dspark's own carry the `dspark_` prefix. The scheduler thread writes,
//! `/metrics` reads; everything is atomic or behind a short lock.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

pub const NUM_REQUESTS_RUNNING: &str = "vllm:num_requests_running";
pub const NUM_REQUESTS_WAITING: &str = "vllm:num_requests_waiting";
pub const KV_CACHE_USAGE_PERC: &str = "vllm:kv_cache_usage_perc";
pub const NUM_PREEMPTIONS: &str = "vllm:num_preemptions";
pub const PROMPT_TOKENS: &str = "vllm:prompt_tokens";
pub const GENERATION_TOKENS: &str = "vllm:generation_tokens";
pub const PREFIX_CACHE_QUERIES: &str = "vllm:prefix_cache_queries";
pub const PREFIX_CACHE_HITS: &str = "vllm:prefix_cache_hits";
pub const REQUEST_SUCCESS: &str = "vllm:request_success";
pub const TIME_TO_FIRST_TOKEN: &str = "vllm:time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "vllm:inter_token_latency_seconds";
pub const TIME_PER_OUTPUT_TOKEN: &str = "vllm:time_per_output_token_seconds";
pub const E2E_REQUEST_LATENCY: &str = "vllm:e2e_request_latency_seconds";
pub const REQUEST_QUEUE_TIME: &str = "vllm:request_queue_time_seconds";
pub const SPEC_DECODE_NUM_DRAFTS: &str = "vllm:spec_decode_num_drafts";
pub const SPEC_DECODE_NUM_DRAFT_TOKENS: &str = "vllm:spec_decode_num_draft_tokens";
pub const SPEC_DECODE_NUM_ACCEPTED_TOKENS: &str = "vllm:spec_decode_num_accepted_tokens";
pub const SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS: &str =
    "vllm:spec_decode_num_accepted_tokens_per_pos";
pub const KV_POOL_TOKENS: &str = "dspark_kv_pool_tokens";
pub const CACHE_CONFIG_INFO: &str = "vllm:cache_config_info";
pub const KV_LIVE_TOKENS: &str = "dspark_kv_live_tokens";
pub const KV_RECENT_BLOCKS: &str = "dspark_kv_recent_blocks";
pub const KV_RECENT_BLOCKS_USED: &str = "dspark_kv_recent_blocks_used";
pub const MAX_FULL_LENGTH_CONCURRENCY: &str = "dspark_max_full_length_concurrency";

// vLLM's bucket boundaries, so histogram quantiles compare across servers.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Why a request finished, as vLLM labels `vllm:request_success_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishedReason {
    Stop,
    Length,
    Abort,
}

impl FinishedReason {
    fn label(self) -> &'static str {
        match self {
            FinishedReason::Stop => "stop",
            FinishedReason::Length => "length",
            FinishedReason::Abort => "abort",
        }
    }
}

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<HistogramState>,
}

#[derive(Debug, Default, Clone)]
struct HistogramState {
    /// Non-cumulative counts per bucket; the last entry is +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            state: Mutex::new(HistogramState {
                counts: vec![0; bounds.len() + 1],
                ..Default::default()
            }),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.counts[i] += 1;
        s.sum += v;
        s.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).count
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += s.counts[i];
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b:?}\"}} {cumulative}");
        }
        cumulative += s.counts[self.bounds.len()];
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {:?}", s.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", s.count);
    }
}

/// An f64 gauge kept as bits in an atomic.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub struct Metrics {
    model_name: String,
    pub num_requests_running: Gauge,
    pub num_requests_waiting: Gauge,
    pub kv_cache_usage_perc: Gauge,
    pub num_preemptions: Counter,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub prefix_cache_queries: Counter,
    pub prefix_cache_hits: Counter,
    pub request_success_stop: Counter,
    pub request_success_length: Counter,
    pub request_success_abort: Counter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_request_latency: Histogram,
    pub request_queue_time: Histogram,
    /// Speculative decoding counters: exported only once speculation is on.
    pub spec_decode_enabled: AtomicBool,
    pub spec_decode_num_drafts: Counter,
    pub spec_decode_num_draft_tokens: Counter,
    pub spec_decode_num_accepted_tokens: Counter,
    /// `[i]`: drafts accepted at position `i` (0-based; vLLM's `position` label).
    pub spec_decode_num_accepted_tokens_per_pos: Mutex<Vec<u64>>,
    pub kv_pool_tokens: Gauge,
    pub kv_live_tokens: Gauge,
    /// Recent blocks (window rows and compressor inputs, docs/KV.md), and those held.
    pub kv_recent_blocks: Gauge,
    pub kv_recent_blocks_used: Gauge,
    pub max_full_length_concurrency: Gauge,
    /// vLLM's `vllm:cache_config_info` labels: the `--kv-cache-dtype` value, set at start...
    pub cache_dtype: std::sync::OnceLock<&'static str>,
    /// ...and `(block_size, num_gpu_blocks)`, set when the scheduler has the pool.
    pub cache_blocks: std::sync::OnceLock<(usize, usize)>,
}

impl Metrics {
    pub fn new(model_name: impl Into<String>) -> Self {
        Metrics {
            model_name: model_name.into(),
            num_requests_running: Gauge::default(),
            num_requests_waiting: Gauge::default(),
            kv_cache_usage_perc: Gauge::default(),
            num_preemptions: Counter::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            prefix_cache_queries: Counter::default(),
            prefix_cache_hits: Counter::default(),
            request_success_stop: Counter::default(),
            request_success_length: Counter::default(),
            request_success_abort: Counter::default(),
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            inter_token_latency: Histogram::new(ITL_BUCKETS),
            e2e_request_latency: Histogram::new(REQUEST_LATENCY_BUCKETS),
            request_queue_time: Histogram::new(REQUEST_LATENCY_BUCKETS),
            spec_decode_enabled: AtomicBool::new(false),
            spec_decode_num_drafts: Counter::default(),
            spec_decode_num_draft_tokens: Counter::default(),
            spec_decode_num_accepted_tokens: Counter::default(),
            spec_decode_num_accepted_tokens_per_pos: Mutex::new(Vec::new()),
            kv_pool_tokens: Gauge::default(),
            kv_live_tokens: Gauge::default(),
            kv_recent_blocks: Gauge::default(),
            kv_recent_blocks_used: Gauge::default(),
            max_full_length_concurrency: Gauge::default(),
            cache_dtype: std::sync::OnceLock::new(),
            cache_blocks: std::sync::OnceLock::new(),
        }
    }

    /// One verification of `num_draft_tokens` drafts, the first `num_accepted` accepted.
    pub fn record_spec_decode(&self, num_draft_tokens: usize, num_accepted: usize) {
        let accepted = num_accepted.min(num_draft_tokens);
        self.spec_decode_num_drafts.add(1);
        self.spec_decode_num_draft_tokens
            .add(num_draft_tokens as u64);
        self.spec_decode_num_accepted_tokens.add(accepted as u64);
        let mut per_pos = self
            .spec_decode_num_accepted_tokens_per_pos
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if per_pos.len() < num_draft_tokens {
            per_pos.resize(num_draft_tokens, 0);
        }
        for c in &mut per_pos[..accepted] {
            *c += 1;
        }
    }

    pub fn request_finished(&self, reason: FinishedReason) {
        match reason {
            FinishedReason::Stop => self.request_success_stop.add(1),
            FinishedReason::Length => self.request_success_length.add(1),
            FinishedReason::Abort => self.request_success_abort.add(1),
        }
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let labels = format!("model_name=\"{}\"", escape_label(&self.model_name));
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {v:?}"
            );
        };
        // Counters follow the Python client vLLM uses: family name without `_total`.
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name}_total {help}\n# TYPE {name} counter\n{name}_total{{{labels}}} {v}"
            );
        };
        gauge(
            &mut out,
            NUM_REQUESTS_RUNNING,
            "Number of requests in model execution batches.",
            self.num_requests_running.get(),
        );
        gauge(
            &mut out,
            NUM_REQUESTS_WAITING,
            "Number of requests waiting to be processed.",
            self.num_requests_waiting.get(),
        );
        gauge(
            &mut out,
            KV_CACHE_USAGE_PERC,
            "KV-cache usage. 1 means 100 percent usage.",
            self.kv_cache_usage_perc.get(),
        );
        counter(
            &mut out,
            NUM_PREEMPTIONS,
            "Cumulative number of preemptions.",
            self.num_preemptions.get(),
        );
        counter(
            &mut out,
            PROMPT_TOKENS,
            "Number of prefill tokens processed.",
            self.prompt_tokens.get(),
        );
        counter(
            &mut out,
            GENERATION_TOKENS,
            "Number of generation tokens processed.",
            self.generation_tokens.get(),
        );
        counter(
            &mut out,
            PREFIX_CACHE_QUERIES,
            "Prefix cache queries, in terms of number of queried tokens.",
            self.prefix_cache_queries.get(),
        );
        counter(
            &mut out,
            PREFIX_CACHE_HITS,
            "Prefix cache hits, in terms of number of cached tokens.",
            self.prefix_cache_hits.get(),
        );
        let _ = writeln!(
            out,
            "# HELP {REQUEST_SUCCESS}_total Count of successfully processed requests.\n# TYPE {REQUEST_SUCCESS} counter"
        );
        for (reason, c) in [
            (FinishedReason::Stop, &self.request_success_stop),
            (FinishedReason::Length, &self.request_success_length),
            (FinishedReason::Abort, &self.request_success_abort),
        ] {
            let _ = writeln!(
                out,
                "{REQUEST_SUCCESS}_total{{{labels},finished_reason=\"{}\"}} {}",
                reason.label(),
                c.get()
            );
        }
        self.time_to_first_token.render(
            &mut out,
            TIME_TO_FIRST_TOKEN,
            "Histogram of time to first token in seconds.",
            &labels,
        );
        self.inter_token_latency.render(
            &mut out,
            INTER_TOKEN_LATENCY,
            "Histogram of inter-token latency in seconds.",
            &labels,
        );
        // Older dashboards read the same observations under the pre-v1 name.
        self.inter_token_latency.render(
            &mut out,
            TIME_PER_OUTPUT_TOKEN,
            "Histogram of time per output token in seconds (same observations as inter-token latency).",
            &labels,
        );
        self.e2e_request_latency.render(
            &mut out,
            E2E_REQUEST_LATENCY,
            "Histogram of e2e request latency in seconds.",
            &labels,
        );
        self.request_queue_time.render(
            &mut out,
            REQUEST_QUEUE_TIME,
            "Histogram of time spent in WAITING phase for request.",
            &labels,
        );
        if self.spec_decode_enabled.load(Ordering::Relaxed) {
            counter(
                &mut out,
                SPEC_DECODE_NUM_DRAFTS,
                "Number of spec decoding drafts.",
                self.spec_decode_num_drafts.get(),
            );
            counter(
                &mut out,
                SPEC_DECODE_NUM_DRAFT_TOKENS,
                "Number of draft tokens.",
                self.spec_decode_num_draft_tokens.get(),
            );
            counter(
                &mut out,
                SPEC_DECODE_NUM_ACCEPTED_TOKENS,
                "Number of accepted tokens.",
                self.spec_decode_num_accepted_tokens.get(),
            );
            let per_pos = self
                .spec_decode_num_accepted_tokens_per_pos
                .lock()
                .map(|v| v.clone())
                .unwrap_or_else(|e| e.into_inner().clone());
            let _ = writeln!(
                out,
                "# HELP {SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS}_total Accepted tokens per draft's position in speculative sequence.\n# TYPE {SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS} counter"
            );
            for (pos, c) in per_pos.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS}_total{{{labels},position=\"{pos}\"}} {c}"
                );
            }
        }
        gauge(
            &mut out,
            KV_POOL_TOKENS,
            "Tokens the shared KV pool holds.",
            self.kv_pool_tokens.get(),
        );
        gauge(
            &mut out,
            KV_LIVE_TOKENS,
            "Tokens held in KV blocks of running requests (shared prefix blocks counted once).",
            self.kv_live_tokens.get(),
        );
        gauge(
            &mut out,
            KV_RECENT_BLOCKS,
            "Recent KV blocks (sliding-window rows and compressor inputs near each sequence's end).",
            self.kv_recent_blocks.get(),
        );
        gauge(
            &mut out,
            KV_RECENT_BLOCKS_USED,
            "Recent KV blocks held by running requests.",
            self.kv_recent_blocks_used.get(),
        );
        gauge(
            &mut out,
            MAX_FULL_LENGTH_CONCURRENCY,
            "Requests of max_model_len tokens the pool holds at once.",
            self.max_full_length_concurrency.get(),
        );
        if let Some((block_size, blocks)) = self.cache_blocks.get() {
            let dtype = self.cache_dtype.get().copied().unwrap_or("auto");
            let _ = writeln!(
                out,
                "# HELP {CACHE_CONFIG_INFO} Information of the KV cache configuration.\n# TYPE \
                 {CACHE_CONFIG_INFO} gauge\n{CACHE_CONFIG_INFO}{{{labels},block_size=\"{block_size}\",\
                 cache_dtype=\"{dtype}\",num_gpu_blocks=\"{blocks}\"}} 1.0"
            );
        }
        out
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_vllm_names_with_model_label() {
        let m = Metrics::new("tiny\"x");
        m.num_preemptions.add(3);
        m.time_to_first_token.observe(0.003);
        m.time_to_first_token.observe(1e9);
        m.num_requests_running.set(2.0);
        m.cache_dtype.set("fp8").unwrap();
        m.cache_blocks.set((128, 77)).unwrap();
        let text = m.render();
        assert!(text.contains(
            "vllm:cache_config_info{model_name=\"tiny\\\"x\",block_size=\"128\",cache_dtype=\"fp8\",\
             num_gpu_blocks=\"77\"} 1.0"
        ));
        assert!(text.contains("vllm:num_preemptions_total{model_name=\"tiny\\\"x\"} 3"));
        assert!(text.contains("vllm:num_requests_running{model_name=\"tiny\\\"x\"} 2.0"));
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{model_name=\"tiny\\\"x\",le=\"0.001\"} 0"
        ));
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{model_name=\"tiny\\\"x\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{model_name=\"tiny\\\"x\",le=\"+Inf\"} 2"
        ));
        assert!(text.contains("vllm:time_to_first_token_seconds_count{model_name=\"tiny\\\"x\"} 2"));
        for name in [
            KV_CACHE_USAGE_PERC,
            NUM_REQUESTS_WAITING,
            "vllm:prompt_tokens_total",
            "vllm:generation_tokens_total",
            "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total",
            INTER_TOKEN_LATENCY,
            TIME_PER_OUTPUT_TOKEN,
            E2E_REQUEST_LATENCY,
            REQUEST_QUEUE_TIME,
            KV_POOL_TOKENS,
            KV_LIVE_TOKENS,
            MAX_FULL_LENGTH_CONCURRENCY,
        ] {
            assert!(text.contains(name), "{name} missing");
        }
        assert!(!text.contains("spec_decode"));
        m.spec_decode_enabled.store(true, Ordering::Relaxed);
        assert!(m
            .render()
            .contains("vllm:spec_decode_num_accepted_tokens_total"));
    }
}
