//! The CUDA backend against the same references as the CPU backend: the transformers fixtures
//! (bf16 tiny model and the FP8/FP4 quantized one, same `REL_BOUND` as the CPU), and the CPU
//! backend itself on dummy weights at a width where every packed kernel path is taken, at TP=1 and
//! TP=2 (two shards on one GPU, joined by an in-process communicator).
//!
//! Needs a GPU: `DSPARK_TEST_CUDA=1 cargo test -p dspark-server --test model_cuda`. Elsewhere each
//! test says it was skipped and passes.
//!
//! Why the CPU bound holds on the GPU: dense weights stay f32 (cuBLAS SGEMM, TF32 off) and the
//! FP8/FP4 kernels decode the same e4m3/e2m1 values with exact power-of-two scales and accumulate
//! in f32, so only the summation order differs from the CPU (~1e-6 relative). Prompts over 64
//! tokens run as the layer stack's GEMM steps; these tests turn their TF32 tensor cores off
//! (layer_stack_cuda.rs bounds the TF32 default against this exact path).

mod support;

use dspark_server::backend::cuda::CudaBackend;
use dspark_server::engine::model::{self, DeepseekV4, KvStorage, LoadOptions, ModelConfig, Shard};
use dspark_server::engine::{LogitsWanted, ModelRunner, StepPlan};
use dspark_server::ranks::{Communicator, SingleRank};
use std::path::Path;
use std::sync::Arc;
use support::reference::{blocks_for, ids, max_rel_diff, seq, Reference};

/// CUDA against CPU on the same weights: f32 accumulation in a different order.
const CPU_BOUND: f64 = 1e-4;
/// TP=2 against TP=1 on the same backend (model_fixtures.rs uses the same bound on the CPU).
const TP_BOUND: f64 = 1e-5;

fn gpu_enabled(test: &str) -> bool {
    let on = std::env::var("DSPARK_TEST_CUDA").is_ok_and(|v| v == "1");
    if !on {
        eprintln!("{test}: skipped (set DSPARK_TEST_CUDA=1 on a machine with a GPU)");
    }
    on
}

fn cuda_opts(pool_tokens: usize) -> LoadOptions {
    LoadOptions {
        device: model::Device::Cuda,
        kv_pool_tokens: pool_tokens,
        ..LoadOptions::default()
    }
}

fn tiny_cuda(pool_tokens: usize) -> DeepseekV4<CudaBackend> {
    let dir = support::repo_path("assets/tiny-dsv4");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let src = support::tiny_checkpoint();
    exact(model::build_cuda(cfg, &src, &cuda_opts(pool_tokens), Arc::new(SingleRank)).unwrap())
}

/// The model with its GEMM steps in f32 (no TF32), the path these bounds are for.
fn exact(m: DeepseekV4<CudaBackend>) -> DeepseekV4<CudaBackend> {
    m.backend().set_gemm_tf32(false);
    m
}

fn quant_cuda(pool_tokens: usize) -> DeepseekV4<CudaBackend> {
    let dir = support::repo_path("tests/fixtures/tiny-dsv4-quant");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let ckpt = dspark_server::engine::weights::Checkpoint::open(&dir).unwrap();
    exact(model::build_cuda(cfg, &ckpt, &cuda_opts(pool_tokens), Arc::new(SingleRank)).unwrap())
}

#[test]
fn tiny_model_matches_transformers_on_cuda() {
    if !gpu_enabled("tiny_model_matches_transformers_on_cuda") {
        return;
    }
    let r = Reference::load(&support::repo_path("tests/fixtures/reference.json"));
    let prompts = ["short", "chat", "one_hca_block", "long"];
    let p = r.check_prefill(&mut tiny_cuda(2048), &prompts);
    let o = r.check_one_shot_prefill(&mut tiny_cuda(512), &["short", "chat"]);
    let g = r.check_greedy(&mut tiny_cuda(2048), &prompts);
    eprintln!("cuda tiny: worst relative error prefill {p:e}, one-shot {o:e}, decode {g:e}");
}

#[test]
fn released_recent_blocks_change_no_logit_on_cuda() {
    if !gpu_enabled("released_recent_blocks_change_no_logit_on_cuda") {
        return;
    }
    // As on the CPU (model_fixtures.rs): the 140-token chunks run the GEMM-step path, the
    // decode steps the graphed layer stack; with FP8 records too.
    let r = Reference::load(&support::repo_path("tests/fixtures/reference.json"));
    let long = ids(&r.prompt("long")["input_ids"]);
    let toks: Vec<u32> = long.iter().copied().cycle().take(420).collect();
    support::reference::check_released_recent_blocks(&mut tiny_cuda(2048), &toks);
    let dir = support::repo_path("assets/tiny-dsv4");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let opts = LoadOptions {
        kv_storage: KvStorage::Fp8,
        ..cuda_opts(2048)
    };
    let src = support::tiny_checkpoint();
    let mut m = exact(model::build_cuda(cfg, &src, &opts, Arc::new(SingleRank)).unwrap());
    support::reference::check_released_recent_blocks(&mut m, &toks);
    eprintln!("cuda tiny: released and renumbered recent blocks give identical logits");
}

/// A pool of bf16 rows or FP8 records against transformers with the same roundings
/// (make_kv_fixtures.py), at the CPU's bound for it (kv_storage.rs: rows within float noise of a
/// rounding boundary may round the other way).
const ROUNDED_BOUND: f64 = 1e-3;

#[test]
fn tiny_model_with_bf16_and_fp8_kv_matches_rounded_transformers_on_cuda() {
    if !gpu_enabled("tiny_model_with_bf16_and_fp8_kv_matches_rounded_transformers_on_cuda") {
        return;
    }
    let prompts = ["short", "chat", "one_hca_block", "long"];
    for (storage, file) in [
        (KvStorage::Bf16, "reference_kv_bf16.json"),
        (KvStorage::Fp8, "reference_kv_fp8.json"),
    ] {
        let r = Reference::load(&support::repo_path(&format!("tests/fixtures/{file}")));
        let load = || {
            let dir = support::repo_path("assets/tiny-dsv4");
            let cfg = ModelConfig::from_dir(&dir).unwrap();
            let opts = LoadOptions {
                kv_storage: storage,
                ..cuda_opts(2048)
            };
            let src = support::tiny_checkpoint();
            exact(model::build_cuda(cfg, &src, &opts, Arc::new(SingleRank)).unwrap())
        };
        let p = r.check_prefill_within(&mut load(), &prompts, ROUNDED_BOUND);
        let g = r.check_greedy_within(&mut load(), &prompts, ROUNDED_BOUND);
        eprintln!("cuda tiny, {storage:?} KV: worst relative error prefill {p:e}, decode {g:e}");
    }
}

#[test]
fn quantized_model_matches_transformers_on_cuda_with_native_fp8_and_fp4() {
    if !gpu_enabled("quantized_model_matches_transformers_on_cuda_with_native_fp8_and_fp4") {
        return;
    }
    let m = quant_cuda(1024);
    let census = m.backend().census();
    eprintln!("cuda quantized: matrices by kind {census:?}");
    assert!(census.fp8 > 0, "no FP8 matrix stayed packed: {census:?}");
    assert!(census.fp4 > 0, "no FP4 expert stayed packed: {census:?}");
    assert!(
        census.fp4_banks > 0,
        "no MoE layer runs grouped: {census:?}"
    );
    let r = Reference::load(&support::repo_path("tests/fixtures/reference_quant.json"));
    let prompts = ["short", "chat", "long"];
    let p = r.check_prefill(&mut quant_cuda(1024), &prompts);
    let o = r.check_one_shot_prefill(&mut quant_cuda(512), &prompts);
    let g = r.check_greedy(&mut quant_cuda(1024), &prompts);
    eprintln!("cuda quantized: worst relative error prefill {p:e}, one-shot {o:e}, decode {g:e}");
}

fn wide_logits(
    dir: &Path,
    device: model::Device,
    shard: Shard,
    comm: Arc<dyn Communicator>,
    toks: &[u32],
) -> (Vec<Vec<f32>>, Vec<f32>) {
    let opts = LoadOptions {
        device,
        load_format: model::LoadFormat::Dummy,
        dummy_seed: 11,
        kv_pool_tokens: 1024,
        shard,
        ..LoadOptions::default()
    };
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let ckpt = dspark_server::engine::weights::Checkpoint::dummy(&model::tensor_specs(&cfg), 11);
    let run = |m: &mut dyn ModelRunner, bt: &[u32]| {
        let prefill = m
            .step(&StepPlan {
                seqs: vec![seq(1, 0, toks, bt, LogitsWanted::All)],
            })
            .unwrap()
            .logits;
        let decode = m
            .step(&StepPlan {
                seqs: vec![seq(1, toks.len(), &[77], bt, LogitsWanted::Last)],
            })
            .unwrap()
            .logits;
        (prefill[0].clone(), decode[0][0].clone())
    };
    match device {
        model::Device::Cpu => {
            let mut m = model::build_cpu(cfg, &ckpt, &opts, comm).unwrap();
            let bt = blocks_for(&m, 0, toks.len() + 1);
            run(&mut m, &bt)
        }
        model::Device::Cuda => {
            let mut m = exact(model::build_cuda(cfg, &ckpt, &opts, comm).unwrap());
            if shard.world_size == 1 {
                let census = m.backend().census();
                assert!(
                    census.fp8 > 0 && census.fp4 > 0 && census.fp4_banks > 0,
                    "{census:?}"
                );
            }
            let bt = blocks_for(&m, 0, toks.len() + 1);
            run(&mut m, &bt)
        }
    }
}

#[test]
fn cuda_equals_cpu_on_wide_dummy_weights_at_tp1_and_tp2() {
    if !gpu_enabled("cuda_equals_cpu_on_wide_dummy_weights_at_tp1_and_tp2") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    support::write_wide_config(dir.path(), &[]);
    let r = Reference::load(&support::repo_path("tests/fixtures/reference.json"));
    let toks = ids(&r.prompt("one_hca_block")["input_ids"]);
    let (cpu_p, cpu_d) = wide_logits(
        dir.path(),
        model::Device::Cpu,
        Shard::SINGLE,
        Arc::new(SingleRank),
        &toks,
    );
    let (gpu_p, gpu_d) = wide_logits(
        dir.path(),
        model::Device::Cuda,
        Shard::SINGLE,
        Arc::new(SingleRank),
        &toks,
    );
    let mut worst: f64 = 0.0;
    for (g, c) in gpu_p.iter().zip(&cpu_p) {
        worst = worst.max(max_rel_diff(g, c));
    }
    worst = worst.max(max_rel_diff(&gpu_d, &cpu_d));
    eprintln!("cuda vs cpu (wide dummy, TP=1): worst relative logit difference {worst:e}");
    assert!(worst < CPU_BOUND, "{worst:e}");

    let comms = support::local_group::group(2);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let (path, toks) = (dir.path(), &toks);
                s.spawn(move || {
                    let shard = Shard {
                        rank,
                        world_size: 2,
                    };
                    wide_logits(path, model::Device::Cuda, shard, Arc::new(comm), toks)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut worst_tp: f64 = 0.0;
    for (p, d) in &results {
        for (g, want) in p.iter().zip(&gpu_p) {
            worst_tp = worst_tp.max(max_rel_diff(g, want));
        }
        worst_tp = worst_tp.max(max_rel_diff(d, &gpu_d));
    }
    eprintln!("cuda TP=2 vs TP=1 (wide dummy): worst relative logit difference {worst_tp:e}");
    assert!(worst_tp < TP_BOUND, "{worst_tp:e}");
    assert_eq!(results[0], results[1], "ranks disagree");
}
