//! `dspark-server`: `serve` runs rank 0 (HTTP API + scheduler + engine) or a follower rank.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use dspark_server::api::{self, AppState, Serving};
use dspark_server::cli::{normalize_vllm_args, BenchArgs, Cli, Command, ServeArgs};
use dspark_server::cli::{resolve_device, KvCacheDtype, LoadFormat, SpeculativeMethod};
use dspark_server::engine::model;
use dspark_server::engine::speculative::SpeculativeRunner;
use dspark_server::engine::tokenizer::Tokenizer;
use dspark_server::engine::{
    EngineError, KvLayout, LogitsWanted, ModelRunner, SeqPlan, StepOutput, StepPlan,
};
use dspark_server::metrics::Metrics;
use dspark_server::ranks::{
    self, CommError, Communicator, FailPolicy, FollowerError, GroupFingerprint, GroupHealth,
    LeaderRunner, NcclUniqueId, RankConfig, Role, SingleRank, EXIT_PEER_LOST,
};
use dspark_server::scheduler::{Scheduler, SchedulerConfig, SchedulerHandle};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse_from(normalize_vllm_args(std::env::args()));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Bench(args) => bench(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            eprintln!("dspark-server: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `dspark-server bench`: the table on stdout and the CSV where --csv says, row by row.
fn bench(args: &BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    use dspark_server::bench::{self, report::Outcome};
    let mut sink = bench::WriterSink::new(std::io::stdout(), args.csv.as_deref())?;
    let report = bench::run(args, &mut sink)?;
    let failed = report
        .rows
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
        .count();
    if failed > 0 {
        bail!("{failed} case(s) failed (see the table)");
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn serve(args: ServeArgs) -> anyhow::Result<std::process::ExitCode> {
    if let Err(m) = args.validate() {
        bail!("{m}");
    }
    if args.launches_local_group() {
        // Supervise one process per rank on loopback; they fail (and stop) together.
        return Ok(ranks::launch_local(
            args.world_size,
            std::env::args().skip(1).collect(),
        ));
    }
    let health = if args.world_size == 1 {
        GroupHealth::single_rank()
    } else {
        GroupHealth::new(FailPolicy::default())
    };
    if args.rank() > 0 {
        return run_follower(&args, &health);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("dspark-http")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_leader(args, health))?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Forms the tensor-parallel group (blocks until every rank joined or the deadline passed).
fn form_group(args: &ServeArgs, health: &GroupHealth) -> anyhow::Result<ranks::Group> {
    let cfg = RankConfig {
        rank: args.rank(),
        world_size: args.world_size,
        leader_addr: args.leader_addr.clone(),
        control_port: args.control_port,
        rendezvous_timeout: Duration::from_secs(args.rendezvous_timeout_secs),
        ..Default::default()
    };
    let fingerprint = GroupFingerprint::new(group_description(args));
    let nccl_id = if args.rank() == 0 && resolve_device(args.device) == model::Device::Cuda {
        Some(
            NcclUniqueId::create()
                .map_err(|e| anyhow::anyhow!("cannot create the NCCL id: {e}"))?,
        )
    } else {
        None
    };
    ranks::rendezvous(&cfg, &fingerprint, health, nccl_id).context("cannot form the rank group")
}

/// What every rank must agree on: the model (its config) and the profile flags.
fn group_description(args: &ServeArgs) -> String {
    use sha2::{Digest, Sha256};
    let config = std::fs::read(args.model_dir().join("config.json")).unwrap_or_default();
    let digest = Sha256::digest(&config);
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!(
        "config={hex} device={:?} max_model_len={:?} kv_cache_dtype={:?} kv_pool_tokens={:?} \
         max_num_seqs={} max_num_batched_tokens={} speculative={:?}/{:?} load_format={:?}",
        resolve_device(args.device),
        args.max_model_len,
        args.kv_cache_dtype,
        args.kv_pool_tokens,
        args.max_num_seqs,
        args.max_num_batched_tokens,
        args.speculative_method,
        args.num_speculative_tokens,
        args.load_format
    )
}

/// Rank > 0: joins the group, loads its shard, and runs rank 0's plans until told to stop.
fn run_follower(args: &ServeArgs, health: &GroupHealth) -> anyhow::Result<std::process::ExitCode> {
    // SIGTERM reaches every pod of the group at once: rank 0 finishes its requests and then
    // shuts the group down in order, so a follower waits for that instead of dying mid-step.
    let patience = Duration::from_secs(args.shutdown_timeout_secs + 15);
    std::thread::Builder::new()
        .name("dspark-signals".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                shutdown_signal().await;
                info!(
                    "signal received: waiting up to {}s for rank 0 to end the group",
                    patience.as_secs()
                );
                tokio::time::sleep(patience).await;
                warn!("rank 0 did not end the group in time; exiting");
                std::process::exit(0);
            });
        })
        .context("cannot start the signal thread")?;
    let ready = Arc::new(AtomicBool::new(false));
    spawn_follower_probes(args, ready.clone())?;
    let group = form_group(args, health)?;
    let comm = engine_communicator(args, &group)?;
    let Role::Follower(link) = group.role else {
        bail!("rank {} was given the leader's role", args.rank());
    };
    let (mut runner, _) = load_engine(args, comm)?;
    ready.store(true, Ordering::Release);
    match ranks::run_follower(runner.as_mut(), &link) {
        Ok(()) => {
            info!("rank {}: group shut down", args.rank());
            Ok(std::process::ExitCode::SUCCESS)
        }
        // Already logged once by the group health watcher.
        Err(FollowerError::Comm(CommError::PeerLost { .. })) => {
            Ok(std::process::ExitCode::from(EXIT_PEER_LOST as u8))
        }
        Err(e) => Err(e.into()),
    }
}

/// Serves `/health` and `/ready` for a follower's pod probes on `--host:--port`.
fn spawn_follower_probes(args: &ServeArgs, ready: Arc<AtomicBool>) -> anyhow::Result<()> {
    let addr = listen_addr(args)?;
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("rank {}: cannot listen on {addr} for probes", args.rank()))?;
    listener.set_nonblocking(true)?;
    info!(
        "rank {}: probe endpoints /health and /ready on {}",
        args.rank(),
        listener.local_addr()?
    );
    std::thread::Builder::new()
        .name("dspark-probes".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                error!("cannot start the probe runtime");
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    error!("cannot serve the probe endpoints");
                    return;
                };
                if let Err(e) = axum::serve(listener, api::follower_probe_router(ready)).await {
                    error!("probe endpoints stopped: {e}");
                }
            });
        })
        .context("cannot start the probe thread")?;
    Ok(())
}

fn listen_addr(args: &ServeArgs) -> anyhow::Result<SocketAddr> {
    format!("{}:{}", args.host, args.port)
        .parse()
        .or_else(|_| format!("[{}]:{}", args.host, args.port).parse())
        .with_context(|| format!("invalid --host {:?} / --port {}", args.host, args.port))
}

async fn run_leader(args: ServeArgs, health: GroupHealth) -> anyhow::Result<()> {
    let model_dir = args.model_dir();
    let name = args.served_model_name();
    let metrics = Arc::new(Metrics::new(name.clone()));
    let _ = metrics.cache_dtype.set(args.kv_cache_dtype.as_str());
    let state = Arc::new(AppState::new(
        name.clone(),
        model_dir.display().to_string(),
        args.api_key(),
        metrics.clone(),
    ));
    let addr = listen_addr(&args)?;
    // Listen first: /health answers while the model loads, /ready once it is warm.
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    info!(%addr, model = %model_dir.display(), served_model_name = %name, "listening");

    let (engine_done_tx, mut engine_done) =
        tokio::sync::mpsc::unbounded_channel::<anyhow::Result<()>>();
    let loader_state = state.clone();
    let loader_args = args.clone();
    std::thread::Builder::new()
        .name("dspark-loader".into())
        .spawn(move || {
            let outcome = load_and_run(&loader_args, &loader_state, metrics, &health);
            let _ = engine_done_tx.send(outcome);
        })
        .context("cannot start the loader thread")?;

    let app = api::router(state.clone(), args.max_request_body_bytes);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown_state = state.clone();
    let grace = Duration::from_secs(args.shutdown_timeout_secs);
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let mut stop_rx = stop_rx;
                let _ = stop_rx.wait_for(|s| *s).await;
            })
            .await
    });

    let engine_failure = tokio::select! {
        _ = shutdown_signal() => None,
        outcome = engine_done.recv() => match outcome {
            Some(Err(e)) => Some(e),
            _ => Some(anyhow::anyhow!("the engine stopped unexpectedly")),
        },
        r = &mut server => {
            r.context("HTTP server task")?.context("HTTP server")?;
            return Ok(());
        }
    };
    if let Some(e) = engine_failure {
        // Fail together: in-flight requests already got an error from the scheduler.
        return Err(e);
    }
    info!(
        grace_secs = grace.as_secs(),
        "shutting down: no new requests, finishing in-flight ones"
    );
    shutdown_state.begin_shutdown();
    let _ = stop_tx.send(true);
    if tokio::time::timeout(grace, &mut server).await.is_err() {
        warn!("shutdown deadline passed: cancelling in-flight requests");
        if let Some(s) = shutdown_state.serving_handle() {
            s.scheduler.abort_all();
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut server)
            .await
            .is_err()
        {
            warn!("connections still open after cancelling; exiting anyway");
        }
    }
    // Stop the scheduler: it drops the engine, which (in a group) ends the group in order.
    if let Some(s) = shutdown_state.serving_handle() {
        s.scheduler.stop();
        match tokio::time::timeout(Duration::from_secs(10), engine_done.recv()).await {
            Ok(Some(Err(e))) => warn!("engine ended with an error during shutdown: {e:#}"),
            Ok(_) => {}
            Err(_) => warn!("the engine did not stop within 10s"),
        }
    }
    info!("stopped");
    Ok(())
}

/// Loads tokenizer and engine, warms up, opens the API, then runs until the scheduler ends.
/// Runs on its own thread: loading blocks for minutes on a real checkpoint.
fn load_and_run(
    args: &ServeArgs,
    state: &AppState,
    metrics: Arc<Metrics>,
    health: &GroupHealth,
) -> anyhow::Result<()> {
    let tokenizer_path = args.tokenizer_path();
    let tokenizer = Tokenizer::from_file(&tokenizer_path)
        .with_context(|| format!("cannot load the tokenizer {}", tokenizer_path.display()))?;
    let (comm, plans): (Arc<dyn Communicator>, _) = if args.world_size > 1 {
        let group = form_group(args, health)?;
        let comm = engine_communicator(args, &group)?;
        let Role::Leader(plans) = group.role else {
            bail!("rank 0 was given a follower's role");
        };
        (comm, Some(plans))
    } else {
        (Arc::new(SingleRank), None)
    };
    let (local, spec_tokens) = load_engine(args, comm)?;
    let mut runner: Box<dyn ModelRunner> = match plans {
        Some(plans) => Box::new(GroupLeader::new(local, plans)),
        None => local,
    };
    let layout = runner.kv_layout();
    let pool_tokens = layout.block_size * layout.num_blocks;
    let model_limit = max_position_embeddings(&args.model_dir());
    let max_model_len = match args.max_model_len {
        Some(m) if m > pool_tokens => bail!(
            "--max-model-len {m} exceeds the KV pool ({pool_tokens} tokens): one request at full \
             length could never fit; lower --max-model-len or raise --kv-pool-tokens / \
             --gpu-memory-utilization"
        ),
        Some(m) => m,
        None => model_limit.map_or(pool_tokens, |l| l.min(pool_tokens)),
    };
    if let Some(l) = model_limit {
        if max_model_len > l {
            warn!(
                max_model_len,
                max_position_embeddings = l,
                "max_model_len exceeds the model's trained length"
            );
        }
    }
    let bytes_per_token = layout.bytes_per_block / layout.block_size.max(1);
    let full_length = pool_tokens / max_model_len.max(1);
    let recent_mb = (layout.recent_blocks * layout.bytes_per_recent) as f64 / 1e6;
    info!(
        pool_tokens,
        bytes_per_token,
        block_size = layout.block_size,
        num_blocks = layout.num_blocks,
        recent_blocks = layout.recent_blocks,
        max_model_len,
        max_concurrency_at_full_length = full_length,
        "KV pool ready: {pool_tokens} tokens x {bytes_per_token} B/token, plus {} recent blocks \
         ({recent_mb:.1} MB) for the sliding windows and compressor inputs; {full_length} \
         request(s) at full length ({max_model_len} tokens) fit at once",
        layout.recent_blocks
    );
    warm_up(runner.as_mut(), tokenizer.special().bos)?;
    let eos = tokenizer.special().eos;
    if runner.vocab_size() < tokenizer.vocab_size() {
        bail!(
            "the model's vocabulary ({}) is smaller than the tokenizer's ({})",
            runner.vocab_size(),
            tokenizer.vocab_size()
        );
    }
    let scheduler = Scheduler::new(
        runner,
        SchedulerConfig {
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens: args.max_num_batched_tokens,
            max_model_len,
            max_waiting_requests: args.max_waiting_requests,
            prefix_caching: args.prefix_caching(),
            eos,
        },
        metrics,
    )
    .with_speculation(spec_tokens);
    let (handle, join) =
        SchedulerHandle::spawn(scheduler).context("cannot start the scheduler thread")?;
    state.set_serving(Serving {
        scheduler: handle,
        tokenizer,
    });
    info!("ready");
    match join.join() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(anyhow::anyhow!("engine failed: {e}")),
        Err(_) => Err(anyhow::anyhow!("the scheduler thread panicked")),
    }
}

/// Prompt tokens of the warm-up's prefill step: more than the CUDA layer stack's 64-row steps,
/// so its GEMM-step path (cuBLAS handles and kernels, the expert GEMM streams) is made ready too.
const WARMUP_PREFILL_TOKENS: usize = 256;

/// Two small steps through the engine before /ready turns green, so the first user request does
/// not pay for lazy initialisation (and a broken engine is found now, not by a user): one token
/// (the decode path), then a short prefill where the pool has room for it (the chunked-prefill
/// path; on an H200 the first 8K prefill chunk of a fresh process took 584 ms against 312 ms
/// for the next ones).
fn warm_up(runner: &mut dyn ModelRunner, bos: u32) -> anyhow::Result<()> {
    const WARMUP_SEQ: u64 = u64::MAX;
    let layout = runner.kv_layout();
    let prefill_blocks = WARMUP_PREFILL_TOKENS.div_ceil(layout.block_size.max(1));
    let mut lengths = vec![1];
    if prefill_blocks <= layout.num_blocks.min(layout.recent_blocks) {
        lengths.push(WARMUP_PREFILL_TOKENS);
    }
    for tokens in lengths {
        let blocks = tokens.div_ceil(layout.block_size.max(1)) as u32;
        let plan = StepPlan {
            seqs: vec![SeqPlan {
                seq_id: WARMUP_SEQ,
                start_pos: 0,
                tokens: vec![bos; tokens],
                block_table: (0..blocks).collect(),
                recent_table: (0..blocks).collect(),
                logits: LogitsWanted::Last,
                draft: None,
            }],
        };
        runner
            .step(&plan)
            .with_context(|| format!("warm-up step of {tokens} token(s) failed"))?;
        runner.release(WARMUP_SEQ);
    }
    Ok(())
}

/// The engine (this rank's shard) for `args`. This is the single point where the server meets
/// the engine's constructor (issues 3 / 5 / 7 wire it): it must build the backend on
/// `args.device`, load `args.model_dir()` per `args.load_format`, shard over `comm`, and size the
/// KV pool from `args.kv_pool_tokens` or `args.gpu_memory_utilization`.
/// Also returns the drafts per decode step (0 without `--speculative-method dspark`).
fn load_engine(
    args: &ServeArgs,
    comm: Arc<dyn Communicator>,
) -> anyhow::Result<(Box<dyn ModelRunner>, usize)> {
    #[cfg(feature = "fake-engine")]
    if std::env::var("DSPARK_FAKE_ENGINE").is_ok_and(|v| v == "1") {
        warn!("DSPARK_FAKE_ENGINE=1: serving a deterministic fake model (API tests only)");
        let pool = args.kv_pool_tokens.unwrap_or(16 * 1024);
        let vocab = Tokenizer::from_file(&args.tokenizer_path())?.vocab_size();
        if args.speculative_method == Some(SpeculativeMethod::Dspark) {
            bail!("--speculative-method dspark needs the real engine, not DSPARK_FAKE_ENGINE");
        }
        return Ok((
            Box::new(dspark_server::scheduler::fake_runner::FakeRunner::new(
                16,
                pool.div_ceil(16),
                vocab,
            )),
            0,
        ));
    }
    let dir = args.model_dir();
    let device = resolve_device(args.device);
    let kv_storage = match args.kv_cache_dtype {
        KvCacheDtype::Auto => model::KvStorage::F32,
        KvCacheDtype::Bf16 => model::KvStorage::Bf16,
        KvCacheDtype::Fp8 => model::KvStorage::Fp8,
        KvCacheDtype::Nvfp4 => bail!(
            "--kv-cache-dtype nvfp4 is not implemented; use fp8 (the 584-byte FP8 record), bf16 \
             or auto (f32)"
        ),
    };
    let opts = model::LoadOptions {
        device,
        gpu_ordinal: if device == model::Device::Cuda {
            gpu_ordinal(args)?
        } else {
            0
        },
        load_format: match args.load_format {
            LoadFormat::Auto => model::LoadFormat::Auto,
            LoadFormat::Safetensors => model::LoadFormat::Safetensors,
            LoadFormat::Dummy => model::LoadFormat::Dummy,
        },
        kv_storage,
        kv_pool_tokens: args
            .kv_pool_tokens
            .unwrap_or(model::LoadOptions::default().kv_pool_tokens),
        // Without --kv-pool-tokens the GPU's pool takes what the utilization leaves after the
        // weights (as vLLM sizes its KV cache); the CPU keeps the fixed default.
        gpu_memory_utilization: (args.kv_pool_tokens.is_none() && device == model::Device::Cuda)
            .then_some(args.gpu_memory_utilization),
        enforce_eager: args.enforce_eager,
        // Recent blocks for the batch the scheduler may run (drafts count in the token budget).
        batch_limits: Some((args.max_num_seqs, args.max_num_batched_tokens)),
        shard: model::load::Shard {
            rank: args.rank(),
            world_size: args.world_size,
        },
        ..model::LoadOptions::default()
    };
    if args.speculative_method != Some(SpeculativeMethod::Dspark) {
        if args.num_speculative_tokens.is_some_and(|k| k > 0) {
            warn!("--num-speculative-tokens is ignored without --speculative-method dspark");
        }
        let runner = model::load(&dir, &opts, comm)
            .map_err(|e| anyhow::anyhow!("loading the model from {} failed: {e}", dir.display()))?;
        return Ok((runner, 0));
    }
    let failed = |e: model::LoadError| {
        anyhow::anyhow!(
            "loading the model and its DSpark draft from {} failed: {e}",
            dir.display()
        )
    };
    let (runner, block): (Box<dyn ModelRunner>, usize) = match opts.device {
        model::Device::Cpu => {
            let r = SpeculativeRunner::load_cpu(&dir, &opts, comm).map_err(failed)?;
            let block = r.block_size();
            (Box::new(r), block)
        }
        model::Device::Cuda => {
            let r = SpeculativeRunner::load_cuda(&dir, &opts, comm).map_err(failed)?;
            let block = r.block_size();
            (Box::new(r), block)
        }
    };
    let k = args.num_speculative_tokens.unwrap_or(block);
    if k == 0 || k > block {
        bail!(
            "--num-speculative-tokens {k}: the DSpark draft proposes 1..={block} tokens per step \
             (its block size; more needs a second drafting pass, see docs/DSPARK.md)"
        );
    }
    info!(
        num_speculative_tokens = k,
        block_size = block,
        "DSpark speculative decoding on"
    );
    Ok((runner, k))
}

/// Rank 0's engine in a group: each step goes to every rank first. Dropping it (the scheduler
/// stopped) tells the other ranks to shut down, so the whole group exits 0.
struct GroupLeader {
    inner: Option<LeaderRunner<LocalShard>>,
    layout: KvLayout,
    vocab_size: usize,
}

/// This rank's own runner, as the concrete type `LeaderRunner` wraps.
struct LocalShard(Box<dyn ModelRunner>);

impl ModelRunner for LocalShard {
    fn kv_layout(&self) -> KvLayout {
        self.0.kv_layout()
    }
    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }
    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, EngineError> {
        self.0.step(plan)
    }
    fn release(&mut self, seq_id: u64) {
        self.0.release(seq_id)
    }
}

impl GroupLeader {
    fn new(local: Box<dyn ModelRunner>, plans: ranks::PlanBroadcaster) -> Self {
        let layout = local.kv_layout();
        let vocab_size = local.vocab_size();
        GroupLeader {
            inner: Some(LeaderRunner::new(LocalShard(local), plans)),
            layout,
            vocab_size,
        }
    }
}

impl ModelRunner for GroupLeader {
    fn kv_layout(&self) -> KvLayout {
        self.layout
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, EngineError> {
        match self.inner.as_mut() {
            Some(l) => l.step(plan),
            None => Err(EngineError::Comm("the group was shut down".into())),
        }
    }
    fn release(&mut self, seq_id: u64) {
        if let Some(l) = self.inner.as_mut() {
            l.release(seq_id);
        }
    }
}

impl Drop for GroupLeader {
    fn drop(&mut self) {
        if let Some(l) = self.inner.take() {
            info!("ending the group: the other ranks shut down");
            if let (_, Err(e)) = l.shutdown() {
                warn!("group shutdown: {e}");
            }
        }
    }
}

/// This rank's GPU: a pod sees one (0); the ranks of a local group share one machine, rank r
/// on GPU r.
fn gpu_ordinal(args: &ServeArgs) -> anyhow::Result<usize> {
    let count = dspark_server::backend::cuda::gpu_count()
        .map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?;
    if count == 0 {
        bail!("--device cuda: no GPU is visible to this process");
    }
    Ok(args.rank() % count)
}

/// The communicator the engine's collectives use: NCCL on CUDA (over the id rank 0 sent at
/// rendezvous), TCP on the CPU backend.
fn engine_communicator(
    args: &ServeArgs,
    group: &ranks::Group,
) -> anyhow::Result<Arc<dyn Communicator>> {
    if resolve_device(args.device) != model::Device::Cuda {
        return Ok(group.comm.clone());
    }
    let Some(id) = group.nccl_unique_id.as_ref() else {
        bail!("rank 0 sent no NCCL id: every rank must run with the same --device");
    };
    let stream = dspark_server::backend::cuda::group_stream(gpu_ordinal(args)?)
        .map_err(|e| anyhow::anyhow!("cannot open the GPU for NCCL: {e}"))?;
    let mut comm = dspark_server::backend::cuda::nccl::NcclCommunicator::new(
        stream,
        group.rank,
        group.world_size,
        id,
    )
    .map_err(|e| anyhow::anyhow!("cannot join the NCCL group: {e}"))?;
    let small_sums = comm
        .connect_peer_memory(dspark_server::backend::cuda::peer::peer_all_reduce_wanted(
            args.disable_custom_all_reduce,
        ))
        .map_err(|e| anyhow::anyhow!("cannot set up the peer all-reduce: {e}"))?;
    info!(rank = group.rank, all_reduce = %small_sums, "NCCL communicator ready");
    Ok(Arc::new(comm))
}

/// `max_position_embeddings` from the model's config.json, if readable.
fn max_position_embeddings(model_dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(model_dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("max_position_embeddings")?
        .as_u64()
        .map(|x| x as usize)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
