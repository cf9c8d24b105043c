//! The CPU model against transformers 5.17 `DeepseekV4ForCausalLM` fixtures
//! (server/tests/fixtures/reference.json, made by make_fixtures.py), plus the engine's own
//! consistency properties (chunking, decode, batching, prefix sharing).
//!
//! Error bound: for every compared logit, |ours - reference| / max|reference logit of the row|
//! must stay below `REL_BOUND` (metric and checks in support/reference.rs).

mod support;

use dspark_server::backend::cpu::CpuBackend;
use dspark_server::engine::model::{self, DeepseekV4, LoadOptions, ModelConfig};
use dspark_server::engine::{LogitsWanted, ModelRunner, SeqPlan, StepPlan};
use dspark_server::ranks::SingleRank;
use std::sync::{Arc, OnceLock};
use support::reference::{
    blocks_for, cut_three_ways, ids, max_rel_diff, prefill_then_decode, run, seq, Reference,
};

fn fixture() -> &'static Reference {
    static F: OnceLock<Reference> = OnceLock::new();
    F.get_or_init(|| {
        // DSPARK_MODEL_REFERENCE points at another reference of the same layout, for
        // investigating a disagreement (e.g. one made with a patched transformers).
        let path = std::env::var("DSPARK_MODEL_REFERENCE")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| support::repo_path("tests/fixtures/reference.json"));
        Reference::load(&path)
    })
}

fn tiny_model(pool_tokens: usize) -> DeepseekV4<CpuBackend> {
    let dir = support::tiny_dir();
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let src = support::tiny_checkpoint();
    let opts = LoadOptions {
        kv_pool_tokens: pool_tokens,
        ..LoadOptions::default()
    };
    model::build_cpu(cfg, &src, &opts, Arc::new(SingleRank)).unwrap()
}

fn prompt(name: &str) -> &'static serde_json::Value {
    fixture().prompt(name)
}

const PROMPTS: [&str; 4] = ["short", "chat", "one_hca_block", "long"];

#[test]
fn prefill_logits_match_transformers() {
    let worst = fixture().check_prefill(&mut tiny_model(2048), &PROMPTS);
    eprintln!("worst relative logit error vs transformers: {worst:e}");
}

#[test]
fn one_shot_prefill_matches_transformers() {
    fixture().check_one_shot_prefill(&mut tiny_model(512), &["short", "chat"]);
}

#[test]
fn greedy_continuations_match_token_for_token() {
    let worst = fixture().check_greedy(&mut tiny_model(2048), &PROMPTS);
    eprintln!("worst relative decode-step logit error vs transformers: {worst:e}");
}

#[test]
fn decode_and_chunked_prefill_equal_one_prefill() {
    // Crosses an HCA window (128) and several CSA windows in both modes: 100 tokens then decode
    // one by one, and uneven chunks, against one prefill.
    let p = prompt("one_hca_block");
    let mut toks = ids(&p["input_ids"]);
    toks.extend(ids(&p["greedy"]));
    let n = toks.len();
    let [one, logits, chunked] = cut_three_ways(&mut tiny_model(1024), &toks);
    assert_eq!(logits.len(), n);
    assert_eq!(chunked.len(), n);
    for i in 0..n {
        let d = max_rel_diff(&logits[i], &one[i]);
        assert!(d < 1e-5, "decode vs prefill at {i}: {d:e}");
        let d = max_rel_diff(&chunked[i], &one[i]);
        assert!(d < 1e-5, "chunked vs prefill at {i}: {d:e}");
    }
}

#[test]
fn batch_composition_does_not_change_logits() {
    let a = ids(&prompt("chat")["input_ids"]);
    let b = ids(&prompt("one_hca_block")["input_ids"]);
    let c = ids(&prompt("short")["input_ids"]);
    let mut m = tiny_model(2048);
    // Alone.
    let bt_a = blocks_for(&m, 0, a.len());
    let alone = run(&mut m, vec![seq(1, 0, &a, &bt_a, LogitsWanted::All)]).remove(0);
    // Mixed: b decoding (after its prefill), c prefilling a chunk, a prefilling whole.
    let bt_b = blocks_for(&m, 10, b.len() + 1);
    run(&mut m, vec![seq(2, 0, &b, &bt_b, LogitsWanted::Last)]);
    let bt_c = vec![12];
    let bt_a2 = vec![14];
    let mixed = run(
        &mut m,
        vec![
            seq(2, b.len(), &[42], &bt_b, LogitsWanted::Last),
            seq(3, 0, &c[..5], &bt_c, LogitsWanted::None),
            seq(4, 0, &a, &bt_a2, LogitsWanted::All),
        ],
    );
    assert!(mixed[1].is_empty());
    assert_eq!(mixed[2], alone, "logits changed with the batch around them");
}

#[test]
fn continues_from_shared_prefix_blocks() {
    // Two requests share the first full block of a prompt; the second resumes at the block
    // boundary from the shared block alone.
    let p = prompt("one_hca_block");
    let toks = ids(&p["input_ids"]);
    let mut m = tiny_model(1024);
    let bs = m.kv_layout().block_size;
    assert!(toks.len() > bs);
    let bt_a = vec![0u32, 1];
    let full = run(&mut m, vec![seq(1, 0, &toks, &bt_a, LogitsWanted::All)]).remove(0);
    let bt_b = vec![0u32, 5];
    let resumed = run(
        &mut m,
        vec![seq(2, bs, &toks[bs..], &bt_b, LogitsWanted::All)],
    )
    .remove(0);
    for (i, row) in resumed.iter().enumerate() {
        assert_eq!(row, &full[bs + i], "position {}", bs + i);
    }
}

#[test]
fn released_recent_blocks_change_no_logit() {
    // 420 tokens over 4 blocks of 128: the first blocks' recent blocks are released while the
    // sequence decodes past them.
    let long = ids(&prompt("long")["input_ids"]);
    let toks: Vec<u32> = long.iter().copied().cycle().take(420).collect();
    let mut m = tiny_model(2048);
    support::reference::check_released_recent_blocks(&mut m, &toks);
}

#[test]
fn bad_plans_are_clear_errors() {
    let mut m = tiny_model(256);
    let bad = |m: &mut DeepseekV4<CpuBackend>, s: SeqPlan| {
        m.step(&StepPlan { seqs: vec![s] }).unwrap_err().to_string()
    };
    let e = bad(&mut m, seq(1, 0, &[1, 2], &[], LogitsWanted::Last));
    assert!(e.contains("block table"), "{e}");
    let e = bad(&mut m, seq(1, 0, &[1, 2], &[99], LogitsWanted::Last));
    assert!(e.contains("outside the pool"), "{e}");
    let e = bad(&mut m, seq(1, 0, &[200_000], &[0], LogitsWanted::Last));
    assert!(e.contains("vocabulary"), "{e}");
    let e = bad(&mut m, seq(1, 0, &[], &[0], LogitsWanted::Last));
    assert!(e.contains("no tokens"), "{e}");
    // A step must have the recent blocks of its window; entries outside it may be released.
    let mut s = seq(1, 200, &[1], &[0, 1], LogitsWanted::Last);
    s.recent_table = vec![0, u32::MAX];
    let e = bad(&mut m, s);
    assert!(e.contains("recent block none"), "{e}");
    let mut s = seq(1, 0, &[1], &[0], LogitsWanted::Last);
    s.recent_table = vec![];
    let e = bad(&mut m, s);
    assert!(e.contains("recent table of 0 entries"), "{e}");
    let mut s = seq(1, 0, &[1], &[0], LogitsWanted::Last);
    s.recent_table = vec![77];
    let e = bad(&mut m, s);
    assert!(e.contains("recent block 77"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = support::tiny_dir();
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let src = support::tiny_checkpoint();
    let name = "layers.3.attn.indexer.compressor.ape";
    let err = model::build_cpu(
        cfg,
        &support::WithoutTensor {
            inner: &src,
            missing: name,
        },
        &LoadOptions::default(),
        Arc::new(SingleRank),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains(name), "{err}");
}

#[test]
fn tensor_parallel_two_ranks_match_one() {
    // Heads, output groups, indexer heads, expert channels and vocab split over two ranks,
    // joined by all-reduce / all-gather: same logits as one rank.
    let p = prompt("one_hca_block");
    let toks = ids(&p["input_ids"]);
    let dir = support::tiny_dir();
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let src = support::tiny_checkpoint();
    let mut single = tiny_model(512);
    let bt = blocks_for(&single, 0, toks.len() + 1);
    let (want_prefill, want_decode) = prefill_then_decode(&mut single, &toks, &bt, 77);
    let results = support::local_group::run_ranks(2, |rank, comm| {
        let opts = LoadOptions {
            kv_pool_tokens: 512,
            shard: model::Shard {
                rank,
                world_size: 2,
            },
            ..LoadOptions::default()
        };
        let mut m = model::build_cpu(cfg.clone(), &src, &opts, Arc::new(comm)).unwrap();
        prefill_then_decode(&mut m, &toks, &bt, 77)
    });
    for (a, b) in &results {
        for (got, want) in a[0].iter().zip(&want_prefill[0]) {
            assert!(max_rel_diff(got, want) < 1e-5);
        }
        assert!(max_rel_diff(&b[0][0], &want_decode[0][0]) < 1e-5);
    }
    assert_eq!(results[0], results[1], "ranks disagree");
}

#[test]
fn load_entry_point_reads_the_checkpoint_and_dummy_weights() {
    let dir = support::tiny_dir();
    let toks = ids(&prompt("short")["input_ids"]);
    let plan = StepPlan {
        seqs: vec![seq(1, 0, &toks, &[0], LogitsWanted::Last)],
    };
    let opts = LoadOptions {
        kv_pool_tokens: 128,
        ..LoadOptions::default()
    };
    let mut runner = model::load(&dir, &opts, Arc::new(SingleRank)).unwrap();
    assert_eq!(runner.kv_layout().num_blocks, 1);
    let got = runner.step(&plan).unwrap().logits;
    let want = run(&mut tiny_model(128), plan.seqs.clone());
    assert_eq!(got, want);

    // Dummy weights: right shapes, finite, deterministic for a seed.
    let dummy = LoadOptions {
        load_format: model::LoadFormat::Dummy,
        dummy_seed: 7,
        ..opts.clone()
    };
    let a = model::load(&dir, &dummy, Arc::new(SingleRank))
        .unwrap()
        .step(&plan)
        .unwrap()
        .logits;
    let b = model::load(&dir, &dummy, Arc::new(SingleRank))
        .unwrap()
        .step(&plan)
        .unwrap()
        .logits;
    assert_eq!(a, b);
    assert!(a[0][0].iter().all(|x| x.is_finite()));
    assert_ne!(a, want);
}

#[test]
fn real_size_model_on_cpu_is_refused_before_loading() {
    // V4-Flash dimensions with dummy weights: ~1.1 TB as f32, refused up front (no OOM kill).
    let dir = tempfile::tempdir().unwrap();
    let mut ratios = vec![0, 0];
    for _ in 0..20 {
        ratios.extend([4, 128]);
    }
    ratios.extend([4, 0]);
    let cfg = serde_json::json!({"model_type": "deepseek_v4", "compress_ratios": ratios,
        "quantization_config": {"quant_method": "fp8"}, "expert_dtype": "fp4"});
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let opts = LoadOptions {
        load_format: model::LoadFormat::Dummy,
        ..LoadOptions::default()
    };
    let err = model::load(dir.path(), &opts, Arc::new(SingleRank))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("f32 weights"), "{err}");
}
