//! The DSpark draft on the tiny model (server/assets/tiny-dsv4, random `mtp.*` tensors): loading,
//! determinism, every K in 1..=block size, and exact ring commits after partial acceptance.

mod support;

use dspark_server::backend::cpu::CpuBackend;
use dspark_server::engine::draft::{
    verify, DraftError, Drafts, DsparkDraft, ProposeRequest, RequestRng, SamplingParams,
    SpecDecodeStats, DEFAULT_NUM_STAGES,
};
use dspark_server::engine::model::{self, DeepseekV4, LoadOptions, ModelConfig};
use dspark_server::engine::weights::Checkpoint;
use dspark_server::engine::{LogitsWanted, ModelRunner, StepPlan};
use dspark_server::ranks::SingleRank;
use std::sync::Arc;
use support::reference::{blocks_for, seq};

fn tiny() -> (DeepseekV4<CpuBackend>, DsparkDraft<CpuBackend>) {
    let dir = support::tiny_dir();
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let src = support::tiny_checkpoint();
    let opts = LoadOptions {
        kv_pool_tokens: 4096,
        ..LoadOptions::default()
    };
    let mut target = model::build_cpu(cfg, &src, &opts, Arc::new(SingleRank)).unwrap();
    let draft = DsparkDraft::load(&src, &target, DEFAULT_NUM_STAGES).unwrap();
    target.set_capture_layers(draft.target_layers().to_vec());
    (target, draft)
}

fn prompt(len: usize, salt: usize) -> Vec<u32> {
    (0..len)
        .map(|i| (100 + (i * 7919 + salt * 104_729) % 5000) as u32)
        .collect()
}

/// Runs `tokens` at `start` for sequence `id` (block table from `first_block`), returning
/// all logit rows and the features of every row.
fn run(
    m: &mut DeepseekV4<CpuBackend>,
    d: &DsparkDraft<CpuBackend>,
    id: u64,
    first_block: u32,
    start: usize,
    tokens: &[u32],
) -> (Vec<Vec<f32>>, Vec<f32>) {
    let bt = blocks_for(m, first_block, start + tokens.len());
    let plan = StepPlan {
        seqs: vec![seq(id, start, tokens, &bt, LogitsWanted::All)],
    };
    let logits = m.step(&plan).unwrap().logits.remove(0);
    let captured = m.take_captured();
    let h = m.config().hidden_size;
    let f = d
        .features_from_captured(&captured, h, 0..tokens.len())
        .unwrap();
    (logits, f)
}

fn argmax(v: &[f32]) -> u32 {
    dspark_server::engine::draft::sampling::argmax(v)
}

fn propose(
    m: &DeepseekV4<CpuBackend>,
    d: &DsparkDraft<CpuBackend>,
    id: u64,
    (anchor, pos): (u32, usize),
    k: usize,
    params: SamplingParams,
    seed: u64,
) -> Result<Drafts, DraftError> {
    let mut rng = RequestRng::seeded(seed);
    let mut reqs = [ProposeRequest {
        req_id: id,
        anchor,
        pos,
        num_drafts: k,
        params,
        rng: &mut rng,
    }];
    d.propose(m, &mut reqs).map(|mut v| v.remove(0))
}

/// Greedy drafts (the seed does not matter).
fn propose_greedy(
    m: &DeepseekV4<CpuBackend>,
    d: &DsparkDraft<CpuBackend>,
    id: u64,
    at: (u32, usize),
    k: usize,
) -> Result<Drafts, DraftError> {
    propose(m, d, id, at, k, SamplingParams::GREEDY, 0)
}

/// Prefills a prompt of `len` tokens as request `id` and commits its features; returns the
/// anchor (the target's greedy next token).
fn prefill(
    m: &mut DeepseekV4<CpuBackend>,
    d: &mut DsparkDraft<CpuBackend>,
    id: u64,
    first_block: u32,
    toks: &[u32],
) -> u32 {
    let (logits, f) = run(m, d, id, first_block, 0, toks);
    d.commit(m, id, 0, &f, toks.len()).unwrap();
    argmax(logits.last().unwrap())
}

#[test]
fn draft_runs_and_is_deterministic_for_every_k() {
    let (mut m, mut d) = tiny();
    let bsz = d.block_size();
    assert_eq!(bsz, 5);
    let toks = prompt(20, 1);
    let anchor = prefill(&mut m, &mut d, 1, 0, &toks);
    let full = propose_greedy(&m, &d, 1, (anchor, toks.len()), bsz).unwrap();
    assert_eq!(full.tokens.len(), bsz);
    assert!(full.q.is_none());
    assert!(full
        .confidence
        .iter()
        .all(|c| c.is_finite() && *c > 0.0 && *c < 1.0));
    let vocab = m.config().vocab_size as u32;
    assert!(full.tokens.iter().all(|&t| t < vocab));
    // Same inputs, same drafts; the pass leaves the draft state alone.
    let again = propose_greedy(&m, &d, 1, (anchor, toks.len()), bsz).unwrap();
    assert_eq!(full, again);
    // Every K drafts the first K tokens of the full block (the block always runs whole).
    for k in 1..=bsz {
        let dk = propose_greedy(&m, &d, 1, (anchor, toks.len()), k).unwrap();
        assert_eq!(dk.tokens, full.tokens[..k].to_vec(), "k = {k}");
        assert_eq!(dk.confidence, full.confidence[..k].to_vec());
    }
    for bad in [0, bsz + 1] {
        assert!(matches!(
            propose_greedy(&m, &d, 1, (anchor, toks.len()), bad),
            Err(DraftError::Invalid(_))
        ));
    }
    // Wrong anchor position, unknown request: clear errors.
    assert!(propose_greedy(&m, &d, 1, (anchor, toks.len() + 1), 2).is_err());
    assert!(propose_greedy(&m, &d, 9, (anchor, 5), 2).is_err());
}

#[test]
fn sampled_drafts_come_with_their_distributions() {
    let (mut m, mut d) = tiny();
    let toks = prompt(12, 2);
    let anchor = prefill(&mut m, &mut d, 4, 0, &toks);
    let params = SamplingParams {
        temperature: 0.7,
        top_p: 0.95,
        top_k: 50,
    };
    let a = propose(&m, &d, 4, (anchor, toks.len()), 5, params, 42).unwrap();
    let b = propose(&m, &d, 4, (anchor, toks.len()), 5, params, 42).unwrap();
    assert_eq!(a, b, "same seed, same drafts");
    let q = a.q.as_ref().unwrap();
    assert_eq!(q.len(), 5);
    for (row, &t) in q.iter().zip(&a.tokens) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        assert!(row.iter().filter(|&&x| x > 0.0).count() <= 50);
        assert!(row[t as usize] > 0.0, "a draft was drawn outside its q");
    }
}

/// After a verification that accepts `n` of the drafts, committing only the anchor and the
/// accepted drafts leaves exactly the state a request that ran those tokens from the start has.
#[test]
fn ring_after_partial_accept_equals_ring_built_from_accepted_tokens() {
    let (mut m, mut d) = tiny();
    let window = d.rings().window();
    // Longer than the window, so a leaked rejected row would overwrite a visible slot.
    let toks = prompt(window + 9, 3);
    let l = toks.len();
    let anchor = prefill(&mut m, &mut d, 10, 0, &toks);
    let drafts = propose_greedy(&m, &d, 10, (anchor, l), 5).unwrap();
    let mut block = vec![anchor];
    block.extend(&drafts.tokens);
    for n in [0usize, 2, 5] {
        let spec_id = 100 + n as u64;
        let ref_id = 200 + n as u64;
        // Speculative request: prefill, then verify [anchor, d1..d5] in one target pass.
        let a = prefill(&mut m, &mut d, spec_id, 8, &toks);
        assert_eq!(a, anchor);
        let (vlogits, vf) = run(&mut m, &d, spec_id, 8, l, &block);
        assert_eq!(vlogits.len(), 6);
        // Accept n drafts by fiat (a random draft rarely matches a random target): commit the
        // anchor and the n accepted drafts only.
        let width = vf.len() / block.len();
        d.commit(&m, spec_id, l, &vf[..(n + 1) * width], n + 1)
            .unwrap();
        // Reference: the prompt and the accepted tokens as one prefill.
        let mut all = toks.clone();
        all.extend(&block[..n + 1]);
        prefill(&mut m, &mut d, ref_id, 16, &all);
        let spec = d.rings().get(spec_id).unwrap();
        let reference = d.rings().get(ref_id).unwrap();
        assert_eq!(spec.next_pos(), l + n + 1);
        assert_eq!(reference.next_pos(), l + n + 1);
        let (x, y) = (spec.storage(), reference.storage());
        let scale = y.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (i, (u, v)) in x.iter().zip(y).enumerate() {
            assert!(
                (u - v).abs() <= 1e-5 * scale,
                "n = {n}: ring value {i} differs: {u} vs {v}"
            );
        }
        // And the next drafts agree.
        let next_anchor = argmax(&vlogits[n]);
        let ds = propose_greedy(&m, &d, spec_id, (next_anchor, l + n + 1), 5);
        let dr = propose_greedy(&m, &d, ref_id, (next_anchor, l + n + 1), 5);
        assert_eq!(ds.unwrap().tokens, dr.unwrap().tokens, "n = {n}");
        // A commit that skips or repeats positions is refused.
        assert!(d.commit(&m, spec_id, l, &vf[..width], 1).is_err());
        d.release(spec_id);
        d.release(ref_id);
        assert_eq!(d.next_pos(spec_id), 0);
    }
}

/// Full loop with greedy verification, alone and with an oracle: every step emits between 1 and
/// K + 1 tokens, the emitted sequence equals the target's own greedy continuation, and with the
/// oracle (the target's greedy continuation as drafts, the `m`-th one corrupted, m cycling over
/// 0..=k) exactly `m` drafts are accepted, so every accept length including all K (K + 1
/// tokens per step) runs through verify, commit and the target's KV.
#[test]
fn speculative_greedy_equals_plain_greedy() {
    let (mut m, mut d) = tiny();
    let toks = prompt(10, 4);
    let steps_tokens = 40;
    // Plain greedy, long enough to serve as the oracle's drafts.
    let mut plain = toks.clone();
    let (logits, _) = run(&mut m, &d, 1, 0, 0, &toks);
    plain.push(argmax(logits.last().unwrap()));
    while plain.len() < toks.len() + steps_tokens + d.block_size() + 1 {
        let pos = plain.len() - 1;
        let (lg, _) = run(&mut m, &d, 1, 0, pos, &plain[pos..]);
        plain.push(argmax(&lg[0]));
    }
    for oracle in [false, true] {
        for k in 1..=d.block_size() {
            let id = 10 + k as u64 + if oracle { 100 } else { 0 };
            let mut out = toks.clone();
            let anchor = prefill(&mut m, &mut d, id, 4, &toks);
            out.push(anchor);
            let mut rng = RequestRng::seeded(0);
            let mut stats = SpecDecodeStats::default();
            let mut step = 0;
            while out.len() < toks.len() + steps_tokens {
                let pos = out.len() - 1;
                let dr = propose_greedy(&m, &d, id, (out[pos], pos), k);
                let mut drafts = dr.unwrap().tokens;
                let corrupt = step % (k + 1);
                if oracle {
                    drafts = plain[pos + 1..pos + 1 + k].to_vec();
                    if corrupt < k {
                        drafts[corrupt] = (drafts[corrupt] + 1) % 1000;
                    }
                }
                let mut block = vec![out[pos]];
                block.extend(&drafts);
                let (lg, f) = run(&mut m, &d, id, 4, pos, &block);
                let v = verify(&drafts, None, &lg, &SamplingParams::GREEDY, &mut rng).unwrap();
                assert!(!v.tokens.is_empty() && v.tokens.len() <= k + 1);
                if oracle {
                    assert_eq!(v.num_accepted, corrupt, "k = {k}, step {step}");
                }
                let width = f.len() / block.len();
                let rows = v.num_accepted + 1;
                d.commit(&m, id, pos, &f[..rows * width], rows).unwrap();
                stats.record(k, v.num_accepted);
                out.extend(&v.tokens);
                step += 1;
            }
            // The tiny draft's weights are random: its own acceptance says nothing here.
            eprintln!(
                "oracle {oracle}, k = {k}: {:.2} tokens per target step, per position {:?}",
                stats.mean_acceptance_length(),
                stats.per_position_rates(k)
            );
            let n = toks.len() + steps_tokens;
            assert_eq!(&out[..n], &plain[..n], "oracle {oracle}, k = {k}");
            d.release(id);
        }
    }
}

#[test]
fn missing_draft_tensor_is_named() {
    let dir = support::tiny_dir();
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let src = support::tiny_checkpoint();
    let target =
        model::build_cpu(cfg, &src, &LoadOptions::default(), Arc::new(SingleRank)).unwrap();
    for name in [
        "mtp.1.ffn.shared_experts.w2.weight",
        "mtp.2.confidence_head.proj.weight",
        "mtp.0.main_proj.weight",
    ] {
        let err = DsparkDraft::load(
            &support::WithoutTensor {
                inner: &src,
                missing: name,
            },
            &target,
            DEFAULT_NUM_STAGES,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains(name), "{err}");
    }
}

/// The draft over two tensor-parallel ranks (stage heads, output groups, expert channels and
/// the LM head's vocabulary split; main_proj, rings and Markov head replicated) drafts what one
/// rank drafts, and both ranks agree exactly.
#[test]
fn tensor_parallel_two_ranks_draft_like_one() {
    let toks = prompt(40, 5);
    let (mut m, mut d) = tiny();
    let anchor = prefill(&mut m, &mut d, 1, 0, &toks);
    let want = propose_greedy(&m, &d, 1, (anchor, toks.len()), 5).unwrap();
    let want_ring = d.rings().get(1).unwrap().storage().to_vec();

    let dir = support::tiny_dir();
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let src = support::tiny_checkpoint();
    let results: Vec<(Drafts, Vec<f32>)> = support::local_group::run_ranks(2, |rank, comm| {
        let opts = LoadOptions {
            kv_pool_tokens: 4096,
            shard: model::Shard {
                rank,
                world_size: 2,
            },
            ..LoadOptions::default()
        };
        let mut m = model::build_cpu(cfg.clone(), &src, &opts, Arc::new(comm)).unwrap();
        let mut d = DsparkDraft::load(&src, &m, DEFAULT_NUM_STAGES).unwrap();
        m.set_capture_layers(d.target_layers().to_vec());
        let a = prefill(&mut m, &mut d, 1, 0, &toks);
        let dr = propose_greedy(&m, &d, 1, (a, toks.len()), 5).unwrap();
        (dr, d.rings().get(1).unwrap().storage().to_vec())
    });
    assert_eq!(results[0], results[1], "ranks disagree");
    let (got, ring) = &results[0];
    assert_eq!(got.tokens, want.tokens);
    for (a, b) in got.confidence.iter().zip(&want.confidence) {
        assert!((a - b).abs() < 1e-5);
    }
    let scale = want_ring.iter().fold(0f32, |a, v| a.max(v.abs()));
    for (a, b) in ring.iter().zip(&want_ring) {
        assert!((a - b).abs() <= 1e-5 * scale);
    }
}

/// The quantized official-layout tiny checkpoint (FP8 projections with e8m0 block scales, FP4
/// routed experts, official `mtp.*` names, as the real checkpoint ships): the draft loads all
/// of it and drafts for every K.
#[test]
fn draft_loads_from_the_official_quantized_layout() {
    let dir = support::repo_path("tests/fixtures/tiny-dsv4-quant");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let src = Checkpoint::open(&dir).unwrap();
    let opts = LoadOptions {
        kv_pool_tokens: 2048,
        ..LoadOptions::default()
    };
    let mut m = model::build_cpu(cfg, &src, &opts, Arc::new(SingleRank)).unwrap();
    let mut d = DsparkDraft::load(&src, &m, DEFAULT_NUM_STAGES).unwrap();
    m.set_capture_layers(d.target_layers().to_vec());
    let toks: Vec<u32> = prompt(24, 6).iter().map(|t| t % 1000).collect();
    let anchor = prefill(&mut m, &mut d, 1, 0, &toks);
    let full = propose_greedy(&m, &d, 1, (anchor, toks.len()), d.block_size()).unwrap();
    for k in 1..=d.block_size() {
        let dk = propose_greedy(&m, &d, 1, (anchor, toks.len()), k).unwrap();
        assert_eq!(dk.tokens, full.tokens[..k].to_vec());
    }
}

/// Against an independent reference built from transformers' DeepSeek-V4 modules with the tiny
/// model's `mtp.*` weights (tests/fixtures/make_dspark_fixture.py): same target features and
/// anchor give the same drafts and confidences. The context is longer than the window, so the
/// ring has wrapped.
#[test]
fn drafts_match_the_transformers_built_reference() {
    let text = std::fs::read_to_string(support::repo_path("tests/fixtures/dspark_reference.json"))
        .unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let context = r["context"].as_u64().unwrap() as usize;
    let features: Vec<f32> = r["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let anchor = r["anchor"].as_u64().unwrap() as u32;
    let want: Vec<u32> = r["drafts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let (m, mut d) = tiny();
    // Commit in two uneven chunks: the ring must not care.
    let width = features.len() / context;
    d.commit(&m, 3, 0, &features[..7 * width], 7).unwrap();
    d.commit(&m, 3, 7, &features[7 * width..], context - 7)
        .unwrap();
    let got = propose_greedy(&m, &d, 3, (anchor, context), d.block_size()).unwrap();
    assert_eq!(got.tokens, want);
    for (g, w) in got
        .confidence
        .iter()
        .zip(r["confidence"].as_array().unwrap())
    {
        let w = w.as_f64().unwrap() as f32;
        assert!((g - w).abs() < 1e-4, "confidence {g} vs {w}");
    }
}
