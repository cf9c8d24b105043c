//! The CUDA layer stack (every layer of a step on the device) against the op-by-op forward on
//! the same GPU and weights: chunked prefill through compression-window and block boundaries
//! (chunks over 64 rows run as GEMM steps), batched decode, a DSpark-style verify step of six
//! tokens and a step of twelve (the f16 skinny GEMM's row counts), at TP=1 and TP=2 (two shards
//! on one GPU over the in-process group, so the stack's host all-reduce is taken), and a prefill
//! long enough to run in two GEMM pieces.
//!
//! The transformers fixtures run through the stack too (model_cuda.rs: every step takes it). Needs a GPU: `DSPARK_TEST_CUDA=1 cargo test -p dspark-server --test
//! layer_stack_cuda`; elsewhere it says it was skipped and passes.

mod support;

use dspark_server::backend::cuda::peer::PeerMemory;
use dspark_server::backend::cuda::CudaBackend;
use dspark_server::engine::model::{self, DeepseekV4, KvStorage, LoadOptions, ModelConfig, Shard};
use dspark_server::engine::LogitsWanted;
use dspark_server::ranks::{Communicator, SingleRank};
use std::path::Path;
use std::sync::Arc;
use support::reference::{blocks_for, max_rel_diff, run, seq};

/// Same bound as CUDA against CPU: f32 throughout, only the summation order differs (GEMM steps
/// with TF32 off).
const BOUND: f64 = 1e-4;
/// GEMM steps on TF32 tensor cores: the weights are exact in TF32, the activations entering each
/// GEMM round to 11 significant bits (relative 2^-11 = 4.9e-4 each); through the layers' chained
/// projections that compounds to about 1e-3 of the logits' scale, and this bounds it with room.
/// It holds where the model makes no discrete choice that such a change can flip: the indexer's
/// top-k over near-equal scores and the router's top-k pick different rows and experts under
/// any rounding change (as bf16 or FP8 prefill would), so that check runs on a configuration
/// where the indexer keeps every compressed row and the router every expert.
const TF32_BOUND: f64 = 1e-2;

fn gpu_enabled(test: &str) -> bool {
    let on = std::env::var("DSPARK_TEST_CUDA").is_ok_and(|v| v == "1");
    if !on {
        eprintln!("{test}: skipped (set DSPARK_TEST_CUDA=1 on a machine with a GPU)");
    }
    on
}

fn wide_model(dir: &Path, shard: Shard, comm: Arc<dyn Communicator>) -> DeepseekV4<CudaBackend> {
    wide_model_on(dir, shard, comm, 0)
}

fn wide_model_on(
    dir: &Path,
    shard: Shard,
    comm: Arc<dyn Communicator>,
    gpu: usize,
) -> DeepseekV4<CudaBackend> {
    wide_model_with_pool(dir, shard, comm, gpu, 2048)
}

fn wide_model_with_pool(
    dir: &Path,
    shard: Shard,
    comm: Arc<dyn Communicator>,
    gpu: usize,
    kv_pool_tokens: usize,
) -> DeepseekV4<CudaBackend> {
    wide_model_stored(dir, shard, comm, gpu, kv_pool_tokens, KvStorage::F32)
}

fn wide_model_stored(
    dir: &Path,
    shard: Shard,
    comm: Arc<dyn Communicator>,
    gpu: usize,
    kv_pool_tokens: usize,
    kv_storage: KvStorage,
) -> DeepseekV4<CudaBackend> {
    let opts = LoadOptions {
        kv_storage,
        device: model::Device::Cuda,
        load_format: model::LoadFormat::Dummy,
        dummy_seed: 5,
        kv_pool_tokens,
        shard,
        gpu_ordinal: gpu,
        ..LoadOptions::default()
    };
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let ckpt = dspark_server::engine::weights::Checkpoint::dummy(&model::tensor_specs(&cfg), 5);
    model::build_cuda(cfg, &ckpt, &opts, comm).unwrap()
}

/// [`gpu_enabled`], and two GPUs there (a skip line otherwise).
fn two_gpus_enabled(test: &str) -> bool {
    if !gpu_enabled(test) {
        return false;
    }
    let gpus = dspark_server::backend::cuda::gpu_count().unwrap_or(0);
    if gpus < 2 {
        eprintln!("{test}: skipped ({gpus} GPU)");
    }
    gpus >= 2
}

/// Rank `rank` of a two-GPU group over NCCL (its own GPU and stream) with the wide model; small
/// all-reduces over peer memory, as served.
fn nccl_rank_model(
    dir: &Path,
    rank: usize,
    id: &dspark_server::ranks::NcclUniqueId,
) -> DeepseekV4<CudaBackend> {
    nccl_rank_model_with(dir, rank, id, true)
}

/// [`nccl_rank_model`], the peer all-reduce as `peer` says (false: NCCL carries every sum).
fn nccl_rank_model_with(
    dir: &Path,
    rank: usize,
    id: &dspark_server::ranks::NcclUniqueId,
    peer: bool,
) -> DeepseekV4<CudaBackend> {
    let stream = dspark_server::backend::cuda::group_stream(rank).unwrap();
    let mut comm =
        dspark_server::backend::cuda::nccl::NcclCommunicator::new(stream, rank, 2, id).unwrap();
    let memory = comm.connect_peer_memory(peer).unwrap();
    let want = if peer {
        PeerMemory::SameProcess
    } else {
        PeerMemory::Unused("off on this rank".into())
    };
    assert_eq!(memory, want, "rank {rank}");
    let shard = Shard {
        rank,
        world_size: 2,
    };
    wide_model_on(dir, shard, Arc::new(comm), rank)
}

/// One fixed schedule of steps; returns every logits row it produced, in order.
fn schedule(m: &mut DeepseekV4<CudaBackend>) -> Vec<Vec<f32>> {
    let vocab = m.config().vocab_size as u32;
    let tok = |i: usize| ((i * 7919 + 13) as u32) % vocab;
    let prompt: Vec<u32> = (0..300).map(tok).collect();
    let bt_a = blocks_for(m, 0, 400);
    let bt_b = blocks_for(m, bt_a.len() as u32, 400);
    let mut out = Vec::new();
    let mut keep = |step: Vec<Vec<Vec<f32>>>| {
        for s in step {
            out.extend(s);
        }
    };
    // Chunked prefill of A (windows of 4 and 128 and the 128-token blocks close inside chunks
    // and at their edges); chunks over 64 rows run as GEMM steps, so the decode-step and GEMM
    // paths also read each other's pool rows. B in one 64-row chunk.
    let mut at = 0;
    for (i, len) in [37usize, 100, 64, 27, 72].into_iter().enumerate() {
        let logits = if i % 2 == 0 {
            LogitsWanted::All
        } else {
            LogitsWanted::Last
        };
        keep(run(
            m,
            vec![seq(1, at, &prompt[at..at + len], &bt_a, logits)],
        ));
        at += len;
    }
    assert_eq!(at, 300);
    keep(run(
        m,
        vec![seq(2, 0, &prompt[..64], &bt_b, LogitsWanted::Last)],
    ));
    // Batched decode of A and B (CSA windows close every 4 positions).
    let (mut pa, mut pb) = (300usize, 64usize);
    for step in 0..10 {
        keep(run(
            m,
            vec![
                seq(1, pa, &[tok(1000 + step)], &bt_a, LogitsWanted::Last),
                seq(2, pb, &[tok(2000 + step)], &bt_b, LogitsWanted::Last),
            ],
        ));
        pa += 1;
        pb += 1;
    }
    // A verify step: six tokens of B at once, logits for all.
    let verify: Vec<u32> = (0..6).map(|i| tok(3000 + i)).collect();
    keep(run(m, vec![seq(2, pb, &verify, &bt_b, LogitsWanted::All)]));
    // Twelve tokens of A at once: projections of 9-16 rows large enough for the skinny kernels
    // (wq_b at TP=1) take their f16 cluster form, here inside a CUDA graph.
    let wide: Vec<u32> = (0..12).map(|i| tok(4000 + i)).collect();
    keep(run(m, vec![seq(1, pa, &wide, &bt_a, LogitsWanted::All)]));
    out
}

/// A third sequence's 77-token prompt (an odd GEMM step: split hyper-connections give the ranks
/// 39 and 38 rows) with every row's logits, and the draft features of two layers captured in
/// it, as extra rows after the logits. Runs after [`schedule`] (its blocks follow A's and B's).
fn captured_prompt(m: &mut DeepseekV4<CudaBackend>) -> Vec<Vec<f32>> {
    let vocab = m.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..77).map(|i| ((i * 6151 + 5) as u32) % vocab).collect();
    let last = m.config().num_hidden_layers - 1;
    let bt = blocks_for(m, 2 * blocks_for(m, 0, 400).len() as u32, 100);
    m.set_capture_layers(vec![0, last]);
    let mut out: Vec<Vec<f32>> = run(m, vec![seq(3, 0, &prompt, &bt, LogitsWanted::All)])
        .into_iter()
        .flatten()
        .collect();
    let captured = m.take_captured();
    m.set_capture_layers(Vec::new());
    assert_eq!(
        captured.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
        [0, last]
    );
    let h = m.config().hidden_size;
    for (_, features) in captured {
        assert_eq!(features.len(), prompt.len() * h);
        out.extend(features.chunks(h).map(<[f32]>::to_vec));
    }
    out
}

fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    assert_eq!(a.len(), b.len(), "different numbers of logits rows");
    a.iter()
        .zip(b)
        .map(|(x, y)| max_rel_diff(x, y))
        .fold(0.0, f64::max)
}

#[test]
fn layer_stack_equals_op_by_op_at_tp1_and_tp2() {
    if !gpu_enabled("layer_stack_equals_op_by_op_at_tp1_and_tp2") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    support::write_wide_config(dir.path(), &[("sliding_window", 32), ("index_topk", 8)]);
    let mut stacked = wide_model(dir.path(), Shard::SINGLE, Arc::new(SingleRank));
    assert!(
        stacked.uses_layer_stack(),
        "the wide FP8/FP4 model must take the layer stack"
    );
    stacked.backend().set_gemm_tf32(false);
    let mut reference = wide_model(dir.path(), Shard::SINGLE, Arc::new(SingleRank));
    reference.disable_layer_stack();
    // The op-by-op indexer follows the TF32 switch too: the reference stays f32.
    reference.backend().set_gemm_tf32(false);
    let got = schedule(&mut stacked);
    // TP=1: every stacked step after a shape's first ran from a CUDA graph.
    let graphs = stacked.backend().graph_steps();
    eprintln!("layer stack TP=1: {graphs} steps from CUDA graphs");
    assert!(graphs >= 10, "{graphs}");
    // Every step of up to 16 rows (ten decode steps, a verify step of 6 rows, one of 12) ran
    // the model's head inside the stack; the prefill chunks handed their streams back.
    let head_steps = stacked.backend().stack_head_steps();
    assert_eq!(head_steps, 12, "steps that ran the head on the device");
    let want = schedule(&mut reference);
    let w1 = worst(&got, &want);
    eprintln!("layer stack vs op by op (TP=1): worst relative logit difference {w1:e}");
    assert!(w1 < BOUND, "{w1:e}");
    // The host's collapse, norm and LM head call instead (DSPARK_DEVICE_HEAD=0).
    let mut host_head = wide_model(dir.path(), Shard::SINGLE, Arc::new(SingleRank));
    host_head.backend().set_gemm_tf32(false);
    host_head.backend().set_stack_head(false);
    let got_host_head = schedule(&mut host_head);
    assert_eq!(host_head.backend().stack_head_steps(), 0);
    drop(host_head);
    let w_head = worst(&got, &got_host_head);
    let w_host = worst(&got_host_head, &want);
    eprintln!(
        "layer stack, head on the device vs on the host: worst relative logit difference \
         {w_head:e} (host head vs op by op {w_host:e})"
    );
    assert!(w_head < BOUND && w_host < BOUND, "{w_head:e} {w_host:e}");

    let results = support::local_group::run_ranks(2, |rank, comm| {
        let shard = Shard {
            rank,
            world_size: 2,
        };
        let mut m = wide_model(dir.path(), shard, Arc::new(comm));
        assert!(m.uses_layer_stack());
        m.backend().set_gemm_tf32(false);
        schedule(&mut m)
    });
    let w2 = worst(&results[0], &want);
    eprintln!("layer stack TP=2 vs op by op TP=1: worst relative logit difference {w2:e}");
    assert!(w2 < BOUND, "{w2:e}");
    assert_eq!(results[0], results[1], "ranks disagree");
}

/// A pool of bf16 rows or FP8 records (`--kv-cache-dtype`): the stack encodes rows on the
/// device (pool writes, compressors) and decodes them in its attention and indexer kernels; the
/// op-by-op path encodes on the host with the same codec and decodes in the same kernels. Both
/// round the same rows, but a value within float noise of a rounding boundary can round the
/// other way on one side, moving by a whole bf16/e4m3 step; the tiny model's transformers
/// references show such flips moving the logits by up to ~5e-4 (kv_storage.rs). The bound is
/// 20x that, still far below what a wrong record would do (fp8 against an f32 pool: 0.35).
const STORED_BOUND: f64 = 1e-2;

#[test]
fn layer_stack_equals_op_by_op_with_bf16_and_fp8_kv() {
    if !gpu_enabled("layer_stack_equals_op_by_op_with_bf16_and_fp8_kv") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    support::write_wide_config(dir.path(), &[("sliding_window", 32), ("index_topk", 8)]);
    for storage in [KvStorage::Bf16, KvStorage::Fp8] {
        let load = || {
            wide_model_stored(
                dir.path(),
                Shard::SINGLE,
                Arc::new(SingleRank),
                0,
                2048,
                storage,
            )
        };
        let mut stacked = load();
        assert!(stacked.uses_layer_stack());
        stacked.backend().set_gemm_tf32(false);
        let mut reference = load();
        reference.disable_layer_stack();
        // The op-by-op indexer follows the TF32 switch too: the reference stays f32.
        reference.backend().set_gemm_tf32(false);
        let got = schedule(&mut stacked);
        assert!(stacked.backend().graph_steps() >= 10);
        let want = schedule(&mut reference);
        let w = worst(&got, &want);
        eprintln!(
            "layer stack vs op by op with {storage:?} KV: worst relative logit difference {w:e}"
        );
        assert!(w < STORED_BOUND, "{storage:?}: {w:e}");
    }
}

/// TP=2 over NCCL, rank r on GPU r, the communicator on the backend's stream: the steps run as
/// CUDA graphs with the all-reduces inside them. Needs two GPUs.
#[test]
fn layer_stack_graphs_over_nccl_on_two_gpus_equal_op_by_op() {
    if !two_gpus_enabled("layer_stack_graphs_over_nccl_on_two_gpus_equal_op_by_op") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    support::write_wide_config(dir.path(), &[("sliding_window", 32), ("index_topk", 8)]);
    let mut reference = wide_model(dir.path(), Shard::SINGLE, Arc::new(SingleRank));
    reference.disable_layer_stack();
    // The op-by-op indexer follows the TF32 switch too: the reference stays f32.
    reference.backend().set_gemm_tf32(false);
    let mut want = schedule(&mut reference);
    want.extend(captured_prompt(&mut reference));
    drop(reference);
    // The model's head in the steps of up to 16 rows (the default) and the LM head's own call
    // in the others, its logits gathered over NCCL on the device (the default), then through
    // host memory (DSPARK_HEAD_GATHER_DEVICE=0) with every step's head in that call
    // (DSPARK_DEVICE_HEAD=0); the indexer's rows scored whole on each rank in
    // every step, then split between the ranks in GEMM steps only (the default at these short
    // contexts), then at every context (each rank's top k of its share gathered and merged);
    // the hyper-connections of GEMM steps whole on each rank, then split by rows (the default).
    for (head_on_device, split_rows, split_prefill, hc_split) in [
        (true, None, false, false),
        (false, None, true, true),
        (true, Some(0), true, true),
    ] {
        let id = dspark_server::ranks::NcclUniqueId::create().unwrap();
        let results = support::local_group::run_ranks(2, |rank, _| {
            let mut m = nccl_rank_model(dir.path(), rank, &id);
            assert!(m.uses_layer_stack());
            m.backend().set_gemm_tf32(false);
            m.backend().set_head_gather_device(head_on_device);
            m.backend().set_stack_head(head_on_device);
            if let Some(rows) = split_rows {
                m.backend().set_indexer_split_rows(rows);
            }
            m.backend().set_indexer_split_prefill(split_prefill);
            m.backend().set_hc_split_prefill(hc_split);
            let mut out = schedule(&mut m);
            assert!(
                m.backend().graph_steps() >= 10,
                "NCCL steps did not run as graphs"
            );
            let head_steps = m.backend().stack_head_steps();
            assert_eq!(head_steps, if head_on_device { 12 } else { 0 });
            out.extend(captured_prompt(&mut m));
            out
        });
        let w = worst(&results[0], &want);
        eprintln!(
            "layer stack graphs, TP=2 over NCCL (LM head gathered on the device: \
             {head_on_device}; indexer rows split above {split_rows:?} rows, in GEMM steps at \
             every context: {split_prefill}; GEMM steps' hyper-connections split: {hc_split}) \
             vs op by op TP=1: worst relative difference of logits and captured features {w:e}"
        );
        assert!(w < BOUND, "{w:e}");
        assert_eq!(results[0], results[1], "ranks disagree");
    }
}

/// The one-kernel all-reduce over the peer GPU's memory (the ranks are threads of this process)
/// gives NCCL's bits for every step of the schedule, eager and from CUDA graphs, and the ranks
/// agree.
#[test]
fn peer_memory_all_reduce_over_nccl_pairs_keeps_the_nccl_bits() {
    if !two_gpus_enabled("peer_memory_all_reduce_over_nccl_pairs_keeps_the_nccl_bits") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    support::write_wide_config(dir.path(), &[("sliding_window", 32), ("index_topk", 8)]);
    let mut runs = Vec::new();
    for (peer, graphs) in [(false, true), (true, true), (true, false)] {
        let id = dspark_server::ranks::NcclUniqueId::create().unwrap();
        let results = support::local_group::run_ranks(2, |rank, _| {
            let mut m = nccl_rank_model_with(dir.path(), rank, &id, peer);
            m.backend().set_gemm_tf32(false);
            if !graphs {
                m.set_cuda_graphs(false);
            }
            let mut out = schedule(&mut m);
            out.extend(captured_prompt(&mut m));
            let sums = m.backend().peer_all_reduces();
            if peer {
                assert!(sums > 0, "rank {rank}: no all-reduce went over peer memory");
            } else {
                assert_eq!(sums, 0, "rank {rank}");
            }
            assert_eq!(m.backend().graph_steps() > 0, graphs, "rank {rank}");
            out
        });
        assert_eq!(
            results[0], results[1],
            "ranks disagree (peer {peer}, graphs {graphs})"
        );
        runs.push(results.into_iter().next().unwrap());
    }
    assert_eq!(
        runs[1], runs[0],
        "peer memory against NCCL, both from graphs"
    );
    assert_eq!(
        runs[2], runs[0],
        "peer memory eager against NCCL from graphs"
    );
}

/// Split GEMM steps over NCCL as served (TF32 on: the f16 projections and the grouped FP4
/// experts): gathering the feed-forward input as f16, which every reader after the gather rounds
/// it to anyway, and gathering the attention's projections other than wq_a's on the second
/// stream beside the query GEMMs, each give the bits of the plain f32 gathers on the main stream,
/// and both ranks agree.
#[test]
fn split_steps_over_nccl_keep_their_bits_with_the_f16_and_side_stream_gathers() {
    if !two_gpus_enabled(
        "split_steps_over_nccl_keep_their_bits_with_the_f16_and_side_stream_gathers",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    support::write_wide_config(dir.path(), &[("sliding_window", 32), ("index_topk", 8)]);
    let mut runs = Vec::new();
    for (f16_gather, side_gather) in [(false, false), (true, false), (true, true)] {
        let id = dspark_server::ranks::NcclUniqueId::create().unwrap();
        let results = support::local_group::run_ranks(2, |rank, _| {
            let mut m = nccl_rank_model(dir.path(), rank, &id);
            m.backend().set_ffn_gather_f16(f16_gather);
            m.backend().set_split_side_gather(side_gather);
            let out = schedule(&mut m);
            (
                out,
                m.backend().ffn_f16_gathers(),
                m.backend().side_gathers(),
            )
        });
        assert_eq!(
            results[0].0, results[1].0,
            "ranks disagree (f16 gather: {f16_gather}, side gather: {side_gather})"
        );
        eprintln!(
            "TP=2 split steps, f16 gather {f16_gather}, side gather {side_gather}: {} \
             feed-forward inputs gathered as f16, {} attention inputs gathered partly on the \
             side stream",
            results[0].1, results[0].2
        );
        runs.push(results);
    }
    let (plain, f16, side) = (&runs[0][0], &runs[1][0], &runs[2][0]);
    assert_eq!((plain.1, plain.2), (0, 0));
    assert!(
        f16.1 > 0,
        "no split step gathered its feed-forward input as f16"
    );
    assert_eq!(f16.2, 0);
    assert!(
        side.2 > 0,
        "no split step gathered its attention projections on the side stream"
    );
    assert!(
        f16.0 == plain.0,
        "the f16 gather changed the logits: worst relative difference {:e}",
        worst(&f16.0, &plain.0)
    );
    assert!(
        side.0 == plain.0,
        "the side-stream gather changed the logits: worst relative difference {:e}",
        worst(&side.0, &plain.0)
    );
}

/// An 8,300-token prompt in one step (two GEMM pieces: 8,192 rows, then 108 that read the first
/// piece's KV), a 100-row chunk with every row's logits, then batched decode from both.
fn long_prefill(m: &mut DeepseekV4<CudaBackend>) -> Vec<Vec<f32>> {
    let vocab = m.config().vocab_size as u32;
    let tok = |i: usize| ((i * 104_729 + 7) as u32) % vocab;
    let prompt: Vec<u32> = (0..8400).map(tok).collect();
    let bt_a = blocks_for(m, 0, 8500);
    let bt_b = blocks_for(m, bt_a.len() as u32, 300);
    let mut out = Vec::new();
    for step in [
        run(
            m,
            vec![seq(1, 0, &prompt[..8300], &bt_a, LogitsWanted::Last)],
        ),
        run(
            m,
            vec![
                seq(1, 8300, &prompt[8300..8400], &bt_a, LogitsWanted::All),
                seq(2, 0, &prompt[..90], &bt_b, LogitsWanted::Last),
            ],
        ),
    ] {
        for s in step {
            out.extend(s);
        }
    }
    for i in 0..3 {
        for s in run(
            m,
            vec![
                seq(1, 8400 + i, &[tok(9000 + i)], &bt_a, LogitsWanted::Last),
                seq(2, 90 + i, &[tok(9100 + i)], &bt_b, LogitsWanted::Last),
            ],
        ) {
            out.extend(s);
        }
    }
    out
}

#[test]
fn gemm_steps_equal_op_by_op_in_f32_and_closely_in_tf32() {
    if !gpu_enabled("gemm_steps_equal_op_by_op_in_f32_and_closely_in_tf32") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 16 heads: GEMM steps take the head-grouped attention kernel (the op-by-op path the
    // per-head one).
    support::write_wide_config(
        dir.path(),
        &[
            ("sliding_window", 32),
            ("index_topk", 8),
            ("num_attention_heads", 16),
        ],
    );
    let load = || wide_model_with_pool(dir.path(), Shard::SINGLE, Arc::new(SingleRank), 0, 9216);
    let mut reference = load();
    reference.disable_layer_stack();
    // The op-by-op indexer follows the TF32 switch too: the reference stays f32.
    reference.backend().set_gemm_tf32(false);
    let want = long_prefill(&mut reference);
    drop(reference);

    let mut exact = load();
    assert!(exact.uses_layer_stack());
    exact.backend().set_gemm_tf32(false);
    let got = long_prefill(&mut exact);
    drop(exact);
    let w = worst(&got, &want);
    eprintln!("GEMM steps (f32) vs op by op: worst relative logit difference {w:e}");
    assert!(w < BOUND, "{w:e}");

    // No discrete choices: index_topk above every row's compressed rows, top-2 of 2 experts.
    // Head dim 128 takes the f32 head-grouped attention; 512 (V4-Flash's) the tensor-core one,
    // in the GEMM steps and in the decode steps after them: TF32 over f32 rows, f16 over stored
    // BF16 records (the reference reads the stored values, in f32). FP8 records are compared
    // below against the same stack on TF32 attention instead: against the f32 reference the
    // TF32 GEMMs upstream move latent values across e4m3 rounding boundaries (a step of 1/16),
    // which measured 1.24e-2 with either attention form.
    for (head_dim, storage) in [
        (128, KvStorage::F32),
        (512, KvStorage::F32),
        (512, KvStorage::Bf16),
    ] {
        let smooth = smooth_config(head_dim);
        let load = || {
            wide_model_stored(
                smooth.path(),
                Shard::SINGLE,
                Arc::new(SingleRank),
                0,
                9216,
                storage,
            )
        };
        let mut reference = load();
        reference.disable_layer_stack();
        // The op-by-op indexer follows the TF32 switch too: the reference stays f32.
        reference.backend().set_gemm_tf32(false);
        let want = long_prefill(&mut reference);
        drop(reference);
        let mut fast = load();
        fast.backend().set_gemm_tf32(true);
        let got = long_prefill(&mut fast);
        let w = worst(&got, &want);
        eprintln!(
            "GEMM steps (TF32) vs op by op, no discrete choices, head_dim {head_dim}, \
             {storage:?} KV: worst relative logit difference {w:e}"
        );
        assert!(w < TF32_BOUND, "head_dim {head_dim}, {storage:?}: {w:e}");
    }
}

/// The wide config without discrete choices (index_topk above every row's compressed rows, top-2
/// of 2 experts) at `head_dim`, 16 heads.
fn smooth_config(head_dim: i64) -> tempfile::TempDir {
    let smooth = tempfile::tempdir().unwrap();
    support::write_wide_config(
        smooth.path(),
        &[
            ("sliding_window", 32),
            ("index_topk", 2048),
            ("n_routed_experts", 2),
            ("num_attention_heads", 16),
            ("head_dim", head_dim),
            // The indexer's keys carry the rotary dims (a quarter of head_dim here).
            ("index_head_dim", (head_dim / 4).max(64)),
        ],
    );
    smooth
}

/// The f16 attention (GEMM and decode steps) against the same layer stack on the TF32 form, over
/// stored BF16 and FP8 records at head_dim 512: the same upstream, so what differs is the two
/// kernels' rounding (both 10-bit mantissas) and what it moves downstream.
#[test]
fn f16_attention_equals_tf32_attention_over_stored_rows() {
    if !gpu_enabled("f16_attention_equals_tf32_attention_over_stored_rows") {
        return;
    }
    let smooth = smooth_config(512);
    for storage in [KvStorage::Bf16, KvStorage::Fp8] {
        let run = |f16: bool| {
            let mut m = wide_model_stored(
                smooth.path(),
                Shard::SINGLE,
                Arc::new(SingleRank),
                0,
                9216,
                storage,
            );
            assert!(m.uses_layer_stack());
            m.backend().set_gemm_tf32(true);
            m.backend().set_attention_f16(f16);
            long_prefill(&mut m)
        };
        let want = run(false);
        let got = run(true);
        let w = worst(&got, &want);
        eprintln!(
            "f16 attention vs TF32 attention, {storage:?} KV, head_dim 512: worst relative logit \
             difference {w:e}"
        );
        assert!(w < TF32_BOUND, "{storage:?}: {w:e}");
    }
}

/// The side stream (an attention sub-layer's KV writes and compressors beside its query path, a
/// decode step's shared expert beside the routed experts) against every launch on one stream:
/// the same kernels on the same inputs, so the same bits, in decode graphs, GEMM steps and the
/// verify step, over f32 rows and FP8 records.
#[test]
fn side_stream_gives_the_bits_of_one_stream() {
    if !gpu_enabled("side_stream_gives_the_bits_of_one_stream") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    support::write_wide_config(dir.path(), &[("sliding_window", 32), ("index_topk", 8)]);
    let bits = |rows: &[Vec<f32>]| -> Vec<Vec<u32>> {
        rows.iter()
            .map(|r| r.iter().map(|v| v.to_bits()).collect())
            .collect()
    };
    for storage in [KvStorage::F32, KvStorage::Fp8] {
        let run = |side: bool| {
            let mut m = wide_model_stored(
                dir.path(),
                Shard::SINGLE,
                Arc::new(SingleRank),
                0,
                2048,
                storage,
            );
            assert!(m.uses_layer_stack());
            m.backend().set_side_stream(side);
            let rows = schedule(&mut m);
            (rows, m.backend().graph_steps())
        };
        let (one, _) = run(false);
        let (two, graphs) = run(true);
        assert!(graphs >= 10, "{storage:?}: {graphs} steps from CUDA graphs");
        assert_eq!(one.len(), two.len());
        let differing = bits(&one)
            .iter()
            .zip(bits(&two))
            .filter(|(a, b)| **a != *b)
            .count();
        eprintln!(
            "side stream vs one stream, {storage:?} KV: {} logits rows, {differing} differ",
            one.len()
        );
        assert_eq!(differing, 0, "{storage:?}");
    }
}
