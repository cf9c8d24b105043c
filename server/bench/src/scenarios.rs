//! The scenarios: what traffic each sends, how it is grouped, and which plots it draws.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::cli::{Cli, Command, SyntheticKind};
use crate::client::{default_metrics_url, Api, ClientError, Endpoint, GenParams, Payload};
use crate::metrics::{self, Acceptance, MetricsError, SpecCounters};
use crate::plots::{self, PlotError, Series};
use crate::prompts::{synthetic_text, synthetic_token_ids, PromptError, PromptSet};
use crate::report::{error_counts, GroupSummary, Report, RssSample, SoakWindow};
use crate::runner::{progress_bar, Job, Limit, Runner};
use crate::stats::{percentile, Histogram};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Plot(#[from] PlotError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("writing results: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Usage(String),
    #[error("server at {0} lists no models; pass --model")]
    NoModel(String),
}

/// Where speculative-decoding counters and server RSS come from.
struct MetricsSource {
    url: Option<String>,
}

impl MetricsSource {
    async fn samples(&self, ep: &Endpoint) -> Option<Vec<metrics::Sample>> {
        let url = self.url.as_ref()?;
        match ep.get_text(url).await {
            Ok(text) => match metrics::parse(&text) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("{url}: {e}");
                    None
                }
            },
            Err(e) => {
                tracing::debug!("{e}");
                None
            }
        }
    }

    async fn spec(&self, ep: &Endpoint) -> Option<SpecCounters> {
        SpecCounters::from_samples(&self.samples(ep).await?)
    }
}

/// Resolved settings shared by the scenarios.
struct Ctx {
    runner: Runner,
    api: Api,
    seed: u64,
    duration: Option<Duration>,
    requests: Option<usize>,
    metrics: MetricsSource,
    max_model_len: Option<u64>,
}

/// What a finished run hands back: the report and the files written.
pub struct Outcome {
    pub report: Report,
    pub files: Vec<PathBuf>,
}

fn scenario_defaults(cmd: &Command) -> (&'static str, Api, u32) {
    match cmd {
        Command::Decode(_) => ("decode", Api::Chat, 256),
        Command::Concurrency(_) => ("concurrency", Api::Chat, 256),
        Command::Poisson(_) => ("poisson", Api::Chat, 256),
        Command::Prefill(_) => ("prefill", Api::Completions, 16),
        Command::Acceptance(_) => ("acceptance", Api::Chat, 256),
        Command::Soak(_) => ("soak", Api::Chat, 128),
    }
}

/// Run the scenario the command line names, write results and plots into `--out`.
pub async fn run(cli: &Cli) -> Result<Outcome, BenchError> {
    let c = &cli.common;
    let (scenario, default_api, default_max_tokens) = scenario_defaults(&cli.command);
    let extra_body = match &c.extra_body {
        None => None,
        Some(s) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => Some(v),
            _ => {
                return Err(BenchError::Usage(
                    "--extra-body must be a JSON object".into(),
                ))
            }
        },
    };
    let connect_timeout = Duration::from_secs_f64(c.timeout.min(30.0));
    let probe = Endpoint::new(
        &c.base_url,
        c.api_key.clone(),
        String::new(),
        connect_timeout,
    )?;
    // The model list also tells the context limit; only needed when --model is absent or
    // prompts are long, and a server without it is still benchmarkable with --model.
    let cards = match (&c.model, &cli.command) {
        (Some(_), Command::Prefill(_)) => probe.models().await.ok(),
        (Some(_), _) => None,
        (None, _) => Some(probe.models().await?),
    };
    let model = match &c.model {
        Some(m) => m.clone(),
        None => cards
            .as_ref()
            .and_then(|v| v.first())
            .map(|m| m.id.clone())
            .ok_or_else(|| BenchError::NoModel(c.base_url.clone()))?,
    };
    let max_model_len = cards
        .as_ref()
        .and_then(|v| v.iter().find(|m| m.id == model))
        .and_then(|m| m.max_model_len);
    let endpoint = Endpoint::new(
        &c.base_url,
        c.api_key.clone(),
        model.clone(),
        connect_timeout,
    )?;
    let params = GenParams {
        max_tokens: c.max_tokens.unwrap_or(default_max_tokens),
        temperature: c.temperature,
        ignore_eos: c.ignore_eos,
        seed: c.seed,
        extra_body,
    };
    let api = c.endpoint.unwrap_or(default_api);
    let ctx = Ctx {
        runner: Runner {
            endpoint: Arc::new(endpoint),
            params: Arc::new(params.clone()),
            timeout: Duration::from_secs_f64(c.timeout),
            run_start: Instant::now(),
            progress: indicatif::ProgressBar::hidden(),
        },
        api,
        seed: c.seed.unwrap_or(0),
        duration: c.duration.map(Duration::from_secs_f64),
        requests: c.requests,
        metrics: MetricsSource {
            url: (!c.no_metrics).then(|| {
                c.metrics_url
                    .clone()
                    .unwrap_or_else(|| default_metrics_url(&c.base_url))
            }),
        },
        max_model_len,
    };
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);

    let mut report = Report {
        scenario: scenario.to_string(),
        started_unix_s,
        base_url: c.base_url.clone(),
        model,
        settings: json!({
            "cli": cli,
            "api": api,
            "params": params,
            "max_model_len": max_model_len,
            "metrics_url": ctx.metrics.url,
        }),
        groups: Vec::new(),
        errors: Default::default(),
        itl_histogram_s: Histogram::new(&[], 1, 0.0, 1.0),
        windows: Vec::new(),
        rss: Vec::new(),
        skipped: Vec::new(),
        requests: Vec::new(),
    };
    // Fail on an unwritable --out before sending any traffic.
    std::fs::create_dir_all(&c.out)?;
    warmup(&ctx, c.warmup).await;
    let quiet = c.quiet;
    match &cli.command {
        Command::Decode(a) | Command::Acceptance(a) => {
            decode(&ctx, &a.prompts, quiet, &mut report).await?
        }
        Command::Concurrency(a) => {
            concurrency(&ctx, &a.levels, &a.prompts, quiet, &mut report).await?
        }
        Command::Poisson(a) => {
            poisson(
                &ctx,
                &a.rate,
                a.max_concurrency,
                &a.prompts,
                quiet,
                &mut report,
            )
            .await?
        }
        Command::Prefill(a) => prefill(&ctx, a, quiet, &mut report).await?,
        Command::Soak(a) => soak(&ctx, a, quiet, &mut report).await?,
    }

    report.errors = error_counts(&report.requests);
    let itl: Vec<f64> = report
        .requests
        .iter()
        .filter(|r| r.ok)
        .flat_map(|r| r.itl_s.iter().copied())
        .collect();
    report.itl_histogram_s = Histogram::auto(&itl, 50, 99.0);
    // Results first: a plotting problem must not lose a long run's numbers.
    let mut files = report.write(&c.out)?;
    let mut plot = |name: String, draw: &dyn Fn(&Path) -> Result<(), PlotError>| {
        let p = c.out.join(name);
        match draw(&p) {
            Ok(()) => files.push(p),
            Err(e) => tracing::warn!("plot not written: {e}"),
        }
    };
    match &cli.command {
        Command::Concurrency(_) => plot("throughput_vs_concurrency.png".into(), &|p| {
            plot_throughput(p, &report)
        }),
        Command::Prefill(_) => plot("ttft_vs_prompt_len.png".into(), &|p| plot_ttft(p, &report)),
        Command::Soak(_) => {
            plot("soak_latency.png".into(), &|p| {
                plot_soak_latency(p, &report)
            });
            if !report.rss.is_empty() {
                plot("soak_rss.png".into(), &|p| plot_soak_rss(p, &report));
            }
        }
        _ => {}
    }
    if !itl.is_empty() {
        plot(format!("{scenario}_itl_histogram.png"), &|p| {
            plots::histogram(
                p,
                &format!("Inter-token latency ({scenario}, up to p99)"),
                "inter-token latency (ms)",
                &report.itl_histogram_s,
                1e3,
            )
        });
    }
    Ok(Outcome { report, files })
}

/// Short unrecorded requests so the first measured one does not pay for connection set-up or
/// the server's lazy initialisation. Failures only warn: the measured run will report them.
async fn warmup(ctx: &Ctx, n: usize) {
    let payload = match ctx.api {
        Api::Chat => Payload::Chat(vec![crate::prompts::Message {
            role: "user".into(),
            content: Value::String("Hello".into()),
        }]),
        Api::Completions => Payload::Text("Hello".into()),
    };
    let params = GenParams {
        max_tokens: 8,
        ..(*ctx.runner.params).clone()
    };
    for _ in 0..n {
        let r = ctx
            .runner
            .endpoint
            .stream(
                "warmup",
                "warmup",
                &payload,
                &params,
                ctx.runner.timeout,
                Instant::now(),
            )
            .await;
        if let Some(class) = r.error {
            tracing::warn!("warm-up request failed ({class}): {:?}", r.error_detail);
        }
    }
}

fn default_prompts(given: &[String], default: &[&str]) -> Vec<String> {
    if given.is_empty() {
        default.iter().map(|s| s.to_string()).collect()
    } else {
        given.to_vec()
    }
}

/// Load every set and check every prompt fits the API before any traffic is sent.
fn load_jobs(specs: &[String], api: Api) -> Result<Vec<(String, Vec<Job>)>, BenchError> {
    let mut out = Vec::new();
    for spec in specs {
        let set = PromptSet::load(spec)?;
        let jobs = set
            .prompts
            .iter()
            .zip(set.payloads(api)?)
            .map(|(p, payload)| Job {
                prompt_id: p.id.clone(),
                payload,
            })
            .collect();
        out.push((set.name, jobs));
    }
    Ok(out)
}

/// All sets' jobs interleaved round-robin, so a mixed workload mixes from the first request.
fn interleave(sets: Vec<(String, Vec<Job>)>) -> Vec<Job> {
    let longest = sets.iter().map(|(_, j)| j.len()).max().unwrap_or(0);
    let mut out = Vec::new();
    for i in 0..longest {
        for (_, jobs) in &sets {
            if let Some(j) = jobs.get(i) {
                out.push(j.clone());
            }
        }
    }
    out
}

fn with_progress(ctx: &Ctx, len: Option<u64>, quiet: bool) -> Runner {
    let mut r = ctx.runner.clone();
    r.progress = progress_bar(len, quiet);
    r
}

async fn decode(
    ctx: &Ctx,
    prompts: &[String],
    quiet: bool,
    report: &mut Report,
) -> Result<(), BenchError> {
    let sets = load_jobs(
        &default_prompts(prompts, &["builtin:humaneval", "builtin:mtbench"]),
        ctx.api,
    )?;
    let per_set = ctx.requests.unwrap_or(10);
    let total = ctx
        .duration
        .is_none()
        .then_some((per_set * sets.len()) as u64);
    let runner = with_progress(ctx, total, quiet);
    for (i, (name, jobs)) in sets.into_iter().enumerate() {
        runner.progress.set_message(name.clone());
        let before = ctx.metrics.spec(&runner.endpoint).await;
        let limit = Limit {
            requests: Some(per_set).filter(|_| ctx.duration.is_none()),
            duration: ctx.duration,
        };
        let recs = runner.closed_loop(&name, Arc::new(jobs), 1, limit).await;
        let after = ctx.metrics.spec(&runner.endpoint).await;
        let mut g = GroupSummary::of(&name, i as f64, Some(1), &recs);
        g.acceptance = acceptance(before, after);
        report.groups.push(g);
        report.requests.extend(recs);
    }
    runner.progress.finish_and_clear();
    Ok(())
}

fn acceptance(before: Option<SpecCounters>, after: Option<SpecCounters>) -> Option<Acceptance> {
    Acceptance::between(&before?, &after?)
}

async fn concurrency(
    ctx: &Ctx,
    levels: &[usize],
    prompts: &[String],
    quiet: bool,
    report: &mut Report,
) -> Result<(), BenchError> {
    if levels.is_empty() || levels.contains(&0) {
        return Err(BenchError::Usage(
            "--levels must be positive integers".into(),
        ));
    }
    let jobs = Arc::new(interleave(load_jobs(
        &default_prompts(prompts, &["builtin:mtbench"]),
        ctx.api,
    )?));
    let per_level = |l: usize| ctx.requests.map_or(2 * l, |n| n.max(l));
    let total = ctx
        .duration
        .is_none()
        .then(|| levels.iter().map(|&l| per_level(l) as u64).sum());
    let runner = with_progress(ctx, total, quiet);
    for &level in levels {
        let name = format!("c={level}");
        runner.progress.set_message(name.clone());
        let before = ctx.metrics.spec(&runner.endpoint).await;
        let limit = Limit {
            requests: Some(per_level(level)).filter(|_| ctx.duration.is_none()),
            duration: ctx.duration,
        };
        let recs = runner.closed_loop(&name, jobs.clone(), level, limit).await;
        let after = ctx.metrics.spec(&runner.endpoint).await;
        let mut g = GroupSummary::of(&name, level as f64, Some(level), &recs);
        g.acceptance = acceptance(before, after);
        report.groups.push(g);
        report.requests.extend(recs);
    }
    runner.progress.finish_and_clear();
    Ok(())
}

async fn poisson(
    ctx: &Ctx,
    rates: &[f64],
    max_concurrency: Option<usize>,
    prompts: &[String],
    quiet: bool,
    report: &mut Report,
) -> Result<(), BenchError> {
    if rates.iter().any(|r| !r.is_finite() || *r <= 0.0) {
        return Err(BenchError::Usage("--rate values must be positive".into()));
    }
    let jobs = Arc::new(interleave(load_jobs(
        &default_prompts(prompts, &["builtin:mtbench"]),
        ctx.api,
    )?));
    let per_rate = ctx.requests.or(ctx.duration.is_none().then_some(100));
    let total = per_rate.map(|n| (n * rates.len()) as u64);
    let runner = with_progress(ctx, total, quiet);
    for (i, &rate) in rates.iter().enumerate() {
        let name = format!("rate={rate}");
        runner.progress.set_message(name.clone());
        let limit = Limit {
            requests: per_rate,
            duration: ctx.duration,
        };
        let seed = ctx.seed.wrapping_add(i as u64);
        let recs = runner
            .poisson(&name, jobs.clone(), rate, limit, max_concurrency, seed)
            .await;
        report
            .groups
            .push(GroupSummary::of(&name, rate, None, &recs));
        report.requests.extend(recs);
    }
    runner.progress.finish_and_clear();
    Ok(())
}

fn depth_label(d: u64) -> String {
    if d % (1024 * 1024) == 0 {
        format!("{}M", d / (1024 * 1024))
    } else if d % 1024 == 0 {
        format!("{}K", d / 1024)
    } else {
        d.to_string()
    }
}

async fn prefill(
    ctx: &Ctx,
    a: &crate::cli::PrefillArgs,
    quiet: bool,
    report: &mut Report,
) -> Result<(), BenchError> {
    if a.synthetic == SyntheticKind::Ids && ctx.api == Api::Chat {
        return Err(BenchError::Usage(
            "token-id prompts need --endpoint completions (or use --synthetic text)".into(),
        ));
    }
    let mut depths = a.depths.clone();
    depths.sort_unstable();
    depths.dedup();
    let max_tokens = u64::from(ctx.runner.params.max_tokens);
    let per_depth = ctx.requests.unwrap_or(1);
    let runnable: Vec<u64> = depths
        .into_iter()
        .filter(|&d| match ctx.max_model_len {
            Some(limit) if d + max_tokens > limit => {
                report.skipped.push(format!(
                    "depth {} + max_tokens {max_tokens} > max_model_len {limit}",
                    depth_label(d)
                ));
                false
            }
            _ => true,
        })
        .collect();
    let runner = with_progress(ctx, Some((runnable.len() * per_depth) as u64), quiet);
    for depth in runnable {
        let name = format!("depth={}", depth_label(depth));
        runner.progress.set_message(name.clone());
        let len = usize::try_from(depth)
            .map_err(|_| BenchError::Usage(format!("depth {depth} too large")))?;
        // A distinct prompt per request so the prefix cache cannot serve a repeat.
        let jobs: Vec<Job> = (0..per_depth)
            .map(|r| {
                let salt = depth.wrapping_mul(1000).wrapping_add(r as u64);
                let payload = match (a.synthetic, ctx.api) {
                    (SyntheticKind::Ids, _) => Payload::TokenIds(synthetic_token_ids(
                        len,
                        a.token_id_min,
                        a.token_id_max,
                        ctx.seed,
                        salt,
                    )),
                    (SyntheticKind::Text, Api::Completions) => {
                        Payload::Text(synthetic_text(len, ctx.seed, salt))
                    }
                    (SyntheticKind::Text, Api::Chat) => {
                        Payload::Chat(vec![crate::prompts::Message {
                            role: "user".into(),
                            content: Value::String(synthetic_text(len, ctx.seed, salt)),
                        }])
                    }
                };
                Job {
                    prompt_id: format!("synthetic-{}-{r}", depth_label(depth)),
                    payload,
                }
            })
            .collect();
        let limit = Limit {
            requests: Some(per_depth),
            duration: None,
        };
        let recs = runner.closed_loop(&name, Arc::new(jobs), 1, limit).await;
        report
            .groups
            .push(GroupSummary::of(&name, depth as f64, Some(1), &recs));
        report.requests.extend(recs);
    }
    runner.progress.finish_and_clear();
    Ok(())
}

async fn soak(
    ctx: &Ctx,
    a: &crate::cli::SoakArgs,
    quiet: bool,
    report: &mut Report,
) -> Result<(), BenchError> {
    if a.concurrency == 0 {
        return Err(BenchError::Usage("--concurrency must be positive".into()));
    }
    let jobs = Arc::new(interleave(load_jobs(
        &default_prompts(&a.prompts, &["builtin:mtbench"]),
        ctx.api,
    )?));
    let duration = match (ctx.duration, ctx.requests) {
        (Some(d), _) => Some(d),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(300)),
    };
    let runner = with_progress(ctx, ctx.requests.map(|n| n as u64), quiet);
    let phase_start = ctx.runner.run_start.elapsed().as_secs_f64();

    // RSS sampler: once a second until the load stops.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sampler = {
        let endpoint = runner.endpoint.clone();
        let metrics_url = ctx.metrics.url.clone();
        let pid = a.server_pid;
        let run_start = ctx.runner.run_start;
        tokio::spawn(async move {
            let source = MetricsSource { url: metrics_url };
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    _ = tick.tick() => {}
                }
                let bytes = match pid {
                    Some(pid) => match metrics::proc_rss_bytes(pid) {
                        Ok(b) => Some(b),
                        Err(e) => {
                            tracing::warn!("server RSS from pid {pid}: {e}");
                            None
                        }
                    },
                    None => source
                        .samples(&endpoint)
                        .await
                        .and_then(|s| metrics::sum(&s, metrics::PROCESS_RSS))
                        .map(|v| v as u64),
                };
                if let Some(bytes) = bytes {
                    samples.push(RssSample {
                        t_s: run_start.elapsed().as_secs_f64(),
                        bytes,
                    });
                }
            }
            samples
        })
    };
    let limit = Limit {
        requests: ctx.requests,
        duration,
    };
    let name = format!("c={}", a.concurrency);
    let recs = runner.closed_loop(&name, jobs, a.concurrency, limit).await;
    let _ = stop_tx.send(());
    report.rss = sampler.await.unwrap_or_default();
    runner.progress.finish_and_clear();

    report.windows = soak_windows(&recs, &report.rss, phase_start, a.window);
    report.groups.push(GroupSummary::of(
        &name,
        a.concurrency as f64,
        Some(a.concurrency),
        &recs,
    ));
    report.requests.extend(recs);
    Ok(())
}

/// Bucket requests by completion time into windows of `width` seconds from `start`.
pub fn soak_windows(
    recs: &[crate::client::RequestRecord],
    rss: &[RssSample],
    start: f64,
    width: f64,
) -> Vec<SoakWindow> {
    let end = recs
        .iter()
        .map(|r| r.start_s + r.e2e_s)
        .fold(start, f64::max);
    let n = (((end - start) / width).ceil() as usize).max(1);
    (0..n)
        .map(|i| {
            let (w0, w1) = (start + width * i as f64, start + width * (i + 1) as f64);
            let inside = |t: f64| t >= w0 && (t < w1 || (i == n - 1 && t <= w1));
            let done: Vec<_> = recs
                .iter()
                .filter(|r| inside(r.start_s + r.e2e_s))
                .collect();
            let ok: Vec<_> = done.iter().filter(|r| r.ok).collect();
            let sorted = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v
            };
            let e2e = sorted(ok.iter().map(|r| r.e2e_s).collect());
            let ttft = sorted(ok.iter().filter_map(|r| r.ttft_s).collect());
            let pct = |v: &[f64], p| percentile(v, p).unwrap_or(0.0);
            let owned: Vec<_> = done.iter().map(|r| (*r).clone()).collect();
            SoakWindow {
                start_s: w0 - start,
                end_s: w1 - start,
                completed: done.len(),
                ok: ok.len(),
                errors: error_counts(&owned),
                e2e_p50_s: pct(&e2e, 50.0),
                e2e_p99_s: pct(&e2e, 99.0),
                ttft_p50_s: pct(&ttft, 50.0),
                ttft_p99_s: pct(&ttft, 99.0),
                output_tok_s: ok.iter().map(|r| r.output_tokens).sum::<u64>() as f64 / width,
                rss_max_bytes: rss.iter().filter(|s| inside(s.t_s)).map(|s| s.bytes).max(),
            }
        })
        .collect()
}

fn plot_throughput(path: &Path, r: &Report) -> Result<(), PlotError> {
    let agg = r.groups.iter().map(|g| (g.x, g.aggregate_tok_s)).collect();
    let per = r
        .groups
        .iter()
        .filter_map(|g| g.per_stream_tok_s.map(|v| (g.x, v)))
        .collect();
    plots::lines(
        path,
        &format!("Throughput vs concurrency ({})", r.model),
        "concurrent streams",
        "output tokens/s",
        &[
            Series {
                name: "aggregate tok/s".into(),
                points: agg,
            },
            Series {
                name: "per-stream tok/s".into(),
                points: per,
            },
        ],
        &plots::number_label,
    )
}

fn plot_ttft(path: &Path, r: &Report) -> Result<(), PlotError> {
    let ok = |g: &&GroupSummary| g.ok > 0;
    let p50 = r
        .groups
        .iter()
        .filter(ok)
        .map(|g| (g.x.log2(), g.ttft_s.p50))
        .collect();
    let max = r
        .groups
        .iter()
        .filter(ok)
        .map(|g| (g.x.log2(), g.ttft_s.max))
        .collect();
    plots::lines(
        path,
        &format!("TTFT vs prompt length ({})", r.model),
        "prompt tokens (log2 scale)",
        "time to first token (s)",
        &[
            Series {
                name: "TTFT p50".into(),
                points: p50,
            },
            Series {
                name: "TTFT max".into(),
                points: max,
            },
        ],
        &plots::log2_tokens_label,
    )
}

fn plot_soak_latency(path: &Path, r: &Report) -> Result<(), PlotError> {
    let mid = |w: &SoakWindow| (w.start_s + w.end_s) / 2.0;
    let series = [
        Series {
            name: "e2e p50 (s)".into(),
            points: r.windows.iter().map(|w| (mid(w), w.e2e_p50_s)).collect(),
        },
        Series {
            name: "e2e p99 (s)".into(),
            points: r.windows.iter().map(|w| (mid(w), w.e2e_p99_s)).collect(),
        },
    ];
    plots::lines(
        path,
        "Soak: request latency per window",
        "time (s)",
        "latency (s)",
        &series,
        &plots::number_label,
    )
}

fn plot_soak_rss(path: &Path, r: &Report) -> Result<(), PlotError> {
    let t0 = r.rss.first().map_or(0.0, |s| s.t_s);
    let points = r
        .rss
        .iter()
        .map(|s| (s.t_s - t0, s.bytes as f64 / 1048576.0))
        .collect();
    plots::lines(
        path,
        "Soak: server resident memory",
        "time (s)",
        "RSS (MiB)",
        &[Series {
            name: "RSS".into(),
            points,
        }],
        &plots::number_label,
    )
}
