//! DSpark speculative decoding end to end through the scheduler, on the REAL tiny model (its
//! `mtp.*` draft weights are random, so acceptance is low, but every accept length occurs and
//! the machinery must be exact): greedy output equals plain greedy token for token, alone and
//! with requests churning and being preempted; an oracle draft makes every step emit K + 1
//! tokens; sampled output follows the target's distribution; a two-rank group drafts and
//! outputs what one rank does.

mod support;

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Arc;

use dspark_server::backend::cpu::CpuBackend;
use dspark_server::engine::model::{self, LoadOptions};
use dspark_server::engine::speculative::SpeculativeRunner;
use dspark_server::engine::{EngineError, KvLayout, ModelRunner, StepOutput, StepPlan};
use dspark_server::metrics::Metrics;
use dspark_server::ranks::{Communicator, SingleRank};
use dspark_server::scheduler::{SamplingParams, Scheduler, SchedulerConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use support::scheduler::{run, submit, tokens};
use support::tiny_dir;

fn opts(pool_tokens: usize) -> LoadOptions {
    LoadOptions {
        kv_pool_tokens: pool_tokens,
        ..LoadOptions::default()
    }
}

fn plain_runner(pool_tokens: usize) -> Box<dyn ModelRunner> {
    model::load(&tiny_dir(), &opts(pool_tokens), Arc::new(SingleRank)).expect("tiny model")
}

fn spec_runner(pool_tokens: usize) -> SpeculativeRunner<CpuBackend> {
    SpeculativeRunner::load_cpu(&tiny_dir(), &opts(pool_tokens), Arc::new(SingleRank))
        .expect("tiny model and draft")
}

struct Setup {
    max_model_len: usize,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    prefix_caching: bool,
}

const SOLO: Setup = Setup {
    max_model_len: 1024,
    max_num_seqs: 1,
    max_num_batched_tokens: 256,
    prefix_caching: false,
};

fn scheduler(runner: Box<dyn ModelRunner>, k: usize, s: &Setup) -> Scheduler {
    Scheduler::new(
        runner,
        SchedulerConfig {
            max_num_seqs: s.max_num_seqs,
            max_num_batched_tokens: s.max_num_batched_tokens,
            max_model_len: s.max_model_len,
            max_waiting_requests: 1 << 20,
            prefix_caching: s.prefix_caching,
            eos: 1,
        },
        Arc::new(Metrics::new("tiny")),
    )
    .with_speculation(k)
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(max_tokens)
    }
}

/// Runs `reqs` one after another (max_num_seqs 1) and returns each output.
fn outputs(mut s: Scheduler, reqs: &[(Vec<u32>, SamplingParams)]) -> (Vec<Vec<u32>>, Scheduler) {
    let mut rxs: Vec<_> = reqs
        .iter()
        .enumerate()
        .map(|(i, (p, params))| submit(&mut s, i as u64, p.clone(), params.clone()))
        .collect();
    run(&mut s);
    (rxs.iter_mut().map(tokens).collect(), s)
}

fn fixture_prompts() -> Vec<(String, Vec<u32>, Vec<u32>)> {
    let path = support::repo_path("tests/fixtures/reference.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids = |x: &serde_json::Value| -> Vec<u32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect()
    };
    let mut out: Vec<_> = v["prompts"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, p)| (name.clone(), ids(&p["input_ids"]), ids(&p["greedy"])))
        .collect();
    out.sort_by_key(|(_, p, _)| p.len());
    out
}

#[test]
fn fixtures_greedy_with_speculation_equal_plain_greedy_and_transformers() {
    let fixtures = fixture_prompts();
    let reqs: Vec<_> = fixtures
        .iter()
        .map(|(_, p, g)| (p.clone(), greedy(g.len())))
        .collect();
    let (plain, _) = outputs(scheduler(plain_runner(4096), 0, &SOLO), &reqs);
    for ((name, _, g), out) in fixtures.iter().zip(&plain) {
        assert_eq!(out, g, "plain greedy differs from transformers on {name}");
    }
    for k in 1..=5 {
        let (spec, s) = outputs(scheduler(Box::new(spec_runner(4096)), k, &SOLO), &reqs);
        for ((name, _, _), (a, b)) in fixtures.iter().zip(spec.iter().zip(&plain)) {
            assert_eq!(a, b, "k = {k}: speculative greedy differs on {name}");
        }
        let st = s.spec_stats();
        assert!(st.num_drafts > 0);
        eprintln!(
            "k = {k}: {} verifications, {} drafts, {} accepted, tokens per target step {:.3}, \
             per position {:?}",
            st.num_drafts,
            st.num_draft_tokens,
            st.num_accepted_tokens,
            st.mean_acceptance_length(),
            st.per_position_rates(k)
        );
    }
}

fn random_requests(seed: u64, n: usize) -> Vec<(Vec<u32>, SamplingParams)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(1..200);
            // Half from a small id range so tokens repeat (the draft then agrees more often).
            let hi = if rng.random_bool(0.5) { 64 } else { 129_000 };
            let prompt = (0..len).map(|_| rng.random_range(2..hi)).collect();
            (prompt, greedy(rng.random_range(1..48)))
        })
        .collect()
}

#[test]
fn random_prompts_greedy_with_speculation_equal_plain_greedy() {
    let reqs = random_requests(7, 24);
    let (plain, _) = outputs(scheduler(plain_runner(4096), 0, &SOLO), &reqs);
    let mut accepted = 0;
    for k in [1, 3, 5] {
        let (spec, s) = outputs(scheduler(Box::new(spec_runner(4096)), k, &SOLO), &reqs);
        for (i, (a, b)) in spec.iter().zip(&plain).enumerate() {
            assert_eq!(a, b, "k = {k}: request {i} differs");
        }
        accepted += s.spec_stats().num_accepted_tokens;
    }
    // Both accept paths (rejections and acceptances) ran through the target's KV.
    assert!(
        accepted > 0,
        "no draft was ever accepted: the test proves less"
    );
}

/// One long request while short ones start and finish around it, 8 at a time, over a pool that
/// forces preemption (the victims' draft state is dropped and rebuilt on resume), with the
/// prefix cache on (a resumed or prefix-hit request drafts from where its features start).
#[test]
fn churning_concurrent_requests_with_preemption_match_their_solo_outputs() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // The long request crosses into its third block a few tokens in, while others hold it.
    let system: Vec<u32> = (0..250).map(|i| 3000 + (i * 31) % 500).collect();
    let long = (system.clone(), greedy(100));
    let shorts: Vec<(Vec<u32>, SamplingParams)> = (0..24)
        .map(|i| {
            let tail: Vec<u32> = (0..rng.random_range(1..40))
                .map(|_| rng.random_range(2..200))
                .collect();
            let prompt = if i % 2 == 0 {
                [system.clone(), tail].concat()
            } else {
                tail
            };
            (prompt, greedy(rng.random_range(2..30)))
        })
        .collect();
    let all: Vec<_> = std::iter::once(long.clone())
        .chain(shorts.iter().cloned())
        .collect();
    let (solo, _) = outputs(scheduler(plain_runner(8192), 0, &SOLO), &all);

    let block = plain_runner(1).kv_layout().block_size;
    assert_eq!(block, 128);
    let setup = Setup {
        max_model_len: 1024,
        max_num_seqs: 8,
        max_num_batched_tokens: 128,
        prefix_caching: true,
    };
    // Four blocks of 128: the long request alone needs three, so the running ones preempt each
    // other.
    let mut s = scheduler(Box::new(spec_runner(4 * block)), 5, &setup);
    let metrics = s.metrics_handle().clone();
    let mut rxs = vec![submit(&mut s, 0, long.0.clone(), long.1.clone())];
    let mut next = 0;
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); all.len()];
    let mut steps = 0;
    while s.has_work() || next < shorts.len() {
        // Two new short requests every third step while they last.
        if steps % 3 == 0 {
            for _ in 0..2 {
                if next < shorts.len() {
                    let (p, params) = shorts[next].clone();
                    rxs.push(submit(&mut s, next as u64 + 1, p, params));
                    next += 1;
                }
            }
        }
        s.step().expect("engine step");
        assert!(s.num_running() <= 8);
        steps += 1;
        for (i, rx) in rxs.iter_mut().enumerate() {
            got[i].extend(tokens(rx));
        }
    }
    for (i, (a, b)) in got.iter().zip(&solo).enumerate() {
        assert_eq!(a, b, "request {i} differs from its solo plain output");
    }
    assert!(
        metrics.num_preemptions.get() > 0,
        "the pool never preempted"
    );
    assert!(s.spec_stats().num_drafts > 0);
    eprintln!(
        "churn: {steps} steps, {} preemptions, tokens per target step {:.3}",
        metrics.num_preemptions.get(),
        s.spec_stats().mean_acceptance_length()
    );
}

/// A draft that knows the target's greedy continuation: every draft is accepted and every
/// verification emits K + 1 tokens.
#[test]
fn an_oracle_draft_makes_every_step_emit_k_plus_one_tokens() {
    let reqs = random_requests(3, 4);
    for k in 1..=5 {
        let steps = 6;
        let reqs: Vec<_> = reqs
            .iter()
            .map(|(p, _)| (p.clone(), greedy(1 + steps * (k + 1))))
            .collect();
        let (plain, _) = outputs(scheduler(plain_runner(4096), 0, &SOLO), &reqs);
        // Sequence ids are given in submission order.
        let full: HashMap<u64, Vec<u32>> = reqs
            .iter()
            .zip(&plain)
            .enumerate()
            .map(|(i, ((p, _), out))| (i as u64, [p.clone(), out.clone()].concat()))
            .collect();
        let mut runner = spec_runner(4096);
        runner.set_draft_override(Box::new(move |seq, pos, n| {
            full[&seq][pos + 1..].iter().take(n).copied().collect()
        }));
        let (spec, s) = outputs(scheduler(Box::new(runner), k, &SOLO), &reqs);
        assert_eq!(spec, plain, "k = {k}");
        let st = s.spec_stats();
        assert_eq!(st.num_drafts, (steps * reqs.len()) as u64, "k = {k}");
        assert_eq!(st.num_draft_tokens, (steps * reqs.len() * k) as u64);
        assert_eq!(st.num_accepted_tokens, st.num_draft_tokens);
        assert_eq!(st.mean_acceptance_length(), (k + 1) as f64);
        let m = s.metrics_handle().render();
        assert!(
            m.contains(&format!(
                "vllm:spec_decode_num_accepted_tokens_total{{model_name=\"tiny\"}} {}",
                steps * reqs.len() * k
            )),
            "{m}"
        );
        for pos in 0..k {
            assert!(m.contains(&format!(
                "vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name=\"tiny\",position=\"{pos}\"}} {}",
                steps * reqs.len()
            )));
        }
    }
}

/// Sampled output with speculation follows the target's distribution: over many seeds, the
/// second token (decided by accepting or rejecting the draft's sampled proposal, or by the
/// residual distribution) given the most frequent first token, against the target's own
/// `softmax(top_k(logits / T))` for that context. Chi-square at the 0.1% level.
#[test]
fn sampled_output_with_speculation_follows_the_target_distribution() {
    let prompt: Vec<u32> = vec![5, 900, 41, 77, 1203, 9];
    let (temperature, top_k) = (1.0f32, 4usize);
    let n = 3000u64;
    let setup = Setup {
        max_model_len: 64,
        max_num_seqs: 256,
        max_num_batched_tokens: 4096,
        prefix_caching: true,
    };
    let block = plain_runner(1).kv_layout().block_size;
    let mut s = scheduler(Box::new(spec_runner(300 * block)), 1, &setup);
    let mut rxs: Vec<_> = (0..n)
        .map(|seed| {
            let params = SamplingParams {
                temperature,
                top_k,
                seed: Some(seed),
                ignore_eos: true,
                ..SamplingParams::greedy(3)
            };
            submit(&mut s, seed, prompt.clone(), params)
        })
        .collect();
    run(&mut s);
    let outs: Vec<Vec<u32>> = rxs.iter_mut().map(tokens).collect();
    assert!(
        s.spec_stats().num_drafts >= n,
        "every request verified a draft"
    );
    let rejected = s.spec_stats().num_draft_tokens - s.spec_stats().num_accepted_tokens;
    assert!(rejected > 100, "the residual path must be exercised");

    let mut first: HashMap<u32, u64> = HashMap::new();
    for o in &outs {
        *first.entry(o[0]).or_default() += 1;
    }
    let (&t0, _) = first
        .iter()
        .max_by_key(|(t, c)| (**c, u32::MAX - **t))
        .unwrap();
    let mut second: HashMap<u32, u64> = HashMap::new();
    for o in outs.iter().filter(|o| o[0] == t0) {
        *second.entry(o[1]).or_default() += 1;
    }
    let total: u64 = second.values().sum();

    // The target's distribution of the next token after prompt + t0.
    let mut plain = plain_runner(4096);
    let ctx: Vec<u32> = [prompt.clone(), vec![t0]].concat();
    let plan = StepPlan {
        seqs: vec![dspark_server::engine::SeqPlan {
            seq_id: 0,
            start_pos: 0,
            tokens: ctx,
            block_table: vec![0],
            recent_table: vec![0],
            logits: dspark_server::engine::LogitsWanted::Last,
            draft: None,
        }],
    };
    let logits = plain.step(&plan).unwrap().logits.remove(0).remove(0);
    let p = dspark_server::engine::draft::sampling::probabilities(
        &logits,
        &dspark_server::engine::draft::SamplingParams {
            temperature,
            top_p: 1.0,
            top_k,
        },
    );
    let mut chi2 = 0.0;
    let mut cells = 0;
    for (t, &pt) in p.iter().enumerate() {
        let observed = second.get(&(t as u32)).copied().unwrap_or(0) as f64;
        if pt == 0.0 {
            assert_eq!(observed, 0.0, "token {t} is outside the target's top-k");
            continue;
        }
        let expected = pt as f64 * total as f64;
        chi2 += (observed - expected).powi(2) / expected;
        cells += 1;
    }
    assert_eq!(cells, top_k);
    eprintln!("chi-square {chi2:.2} over {total} samples (first token {t0})");
    // 3 degrees of freedom, 0.1% critical value.
    assert!(total > 500, "too few samples: {total}");
    assert!(
        chi2 < 16.27,
        "chi-square {chi2}: speculative sampling drifts from the target"
    );
}

/// Rank 0's runner in a two-rank group: every plan (and release) also goes to rank 1, which
/// runs it on its shard, as `ranks::run_follower` does; rank 1's drafts are checked equal.
struct TwoRanks {
    local: SpeculativeRunner<CpuBackend>,
    to_follower: mpsc::Sender<Option<Result<StepPlan, u64>>>,
    from_follower: mpsc::Receiver<Vec<Option<Vec<u32>>>>,
}

fn draft_tokens(out: &StepOutput) -> Vec<Option<Vec<u32>>> {
    out.drafts
        .iter()
        .map(|d| d.as_ref().map(|d| d.tokens.clone()))
        .collect()
}

impl ModelRunner for TwoRanks {
    fn kv_layout(&self) -> KvLayout {
        self.local.kv_layout()
    }
    fn vocab_size(&self) -> usize {
        self.local.vocab_size()
    }
    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, EngineError> {
        self.to_follower.send(Some(Ok(plan.clone()))).unwrap();
        let out = self.local.step(plan)?;
        let theirs = self.from_follower.recv().unwrap();
        assert_eq!(theirs, draft_tokens(&out), "rank 1 drafted differently");
        Ok(out)
    }
    fn release(&mut self, seq_id: u64) {
        self.local.release(seq_id);
        self.to_follower.send(Some(Err(seq_id))).unwrap();
    }
}

#[test]
fn a_two_rank_group_drafts_and_outputs_what_one_rank_does() {
    let mut reqs = random_requests(5, 6);
    // Two seeded sampled requests too: both ranks must draw the same draft samples.
    for (i, r) in reqs.iter_mut().enumerate().take(2) {
        r.1.temperature = 0.8;
        r.1.top_p = 0.95;
        r.1.seed = Some(i as u64);
    }
    let setup = Setup {
        max_num_seqs: 4,
        ..SOLO
    };
    let (single, _) = outputs(scheduler(Box::new(spec_runner(4096)), 5, &setup), &reqs);

    let mut comms = support::local_group::group(2).into_iter();
    let (c0, c1) = (comms.next().unwrap(), comms.next().unwrap());
    let shard = |rank| LoadOptions {
        shard: model::Shard {
            rank,
            world_size: 2,
        },
        ..opts(4096)
    };
    let (to_f, f_rx) = mpsc::channel::<Option<Result<StepPlan, u64>>>();
    let (f_tx, from_f) = mpsc::channel();
    let follower = std::thread::spawn(move || {
        let comm: Arc<dyn Communicator> = Arc::new(c1);
        let mut r = SpeculativeRunner::load_cpu(&tiny_dir(), &shard(1), comm).unwrap();
        while let Ok(Some(msg)) = f_rx.recv() {
            match msg {
                Ok(plan) => {
                    let out = r.step(&plan).unwrap();
                    f_tx.send(draft_tokens(&out)).unwrap();
                }
                Err(id) => r.release(id),
            }
        }
    });
    let local = SpeculativeRunner::load_cpu(&tiny_dir(), &shard(0), Arc::new(c0)).unwrap();
    let group = TwoRanks {
        local,
        to_follower: to_f.clone(),
        from_follower: from_f,
    };
    let (grouped, _) = outputs(scheduler(Box::new(group), 5, &setup), &reqs);
    to_f.send(None).unwrap();
    follower.join().unwrap();
    assert_eq!(grouped, single);
}
