//! Rolling back the target's KV state after rejected drafts, for every KV layer type of the tiny
//! model (sliding window, CSA with its indexer keys, HCA): a verify pass writes the KV of
//! `[anchor, d_1..d_k]`; only the anchor and the accepted drafts stay valid and the next step
//! starts right after them, rewriting the rejected positions. Every later logits row must equal
//! plain one-token decoding of the accepted tokens, including where a compression window
//! (CSA: 4 positions, HCA: 128) completed inside a rejected tail.
//! Also: a draft state dropped mid-request (preemption) is rebuilt by recomputing the prefix.

mod support;

use std::sync::Arc;

use dspark_server::backend::cpu::CpuBackend;
use dspark_server::engine::draft::sampling::argmax;
use dspark_server::engine::model::{self, DeepseekV4, LoadOptions};
use dspark_server::engine::speculative::SpeculativeRunner;
use dspark_server::engine::{DraftPlan, LogitsWanted, ModelRunner, SeqPlan, StepPlan};
use dspark_server::ranks::SingleRank;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use support::tiny_dir;

fn target() -> DeepseekV4<CpuBackend> {
    let opts = LoadOptions {
        kv_pool_tokens: 2048,
        ..LoadOptions::default()
    };
    model::load_cpu(&tiny_dir(), &opts, Arc::new(SingleRank)).unwrap()
}

fn step(
    m: &mut dyn ModelRunner,
    start: usize,
    tokens: &[u32],
    logits: LogitsWanted,
    draft: Option<DraftPlan>,
) -> (Vec<Vec<f32>>, Vec<u32>) {
    let blocks = m.kv_layout().num_blocks as u32;
    let out = m
        .step(&StepPlan {
            seqs: vec![SeqPlan {
                seq_id: 1,
                start_pos: start,
                tokens: tokens.to_vec(),
                block_table: (0..blocks).collect(),
                recent_table: (0..blocks).collect(),
                logits,
                draft,
            }],
        })
        .unwrap();
    let drafts = out
        .drafts
        .first()
        .cloned()
        .flatten()
        .map(|d| d.tokens)
        .unwrap_or_default();
    (out.logits.into_iter().next().unwrap(), drafts)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Plain greedy decoding from `prompt`: the full token sequence and the logits row of every
/// position from `prompt.len() - 1` on.
fn plain(prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut m = target();
    let (rows, _) = step(&mut m, 0, prompt, LogitsWanted::Last, None);
    let mut rows_by_pos = vec![rows[0].clone()];
    let mut toks = prompt.to_vec();
    for _ in 0..steps {
        let t = argmax(rows_by_pos.last().unwrap());
        toks.push(t);
        let (r, _) = step(&mut m, toks.len() - 1, &[t], LogitsWanted::Last, None);
        rows_by_pos.push(r[0].clone());
    }
    (toks, rows_by_pos)
}

fn rollback_matches_plain(prompt_len: usize, accept_pattern: &[usize], seed: u64) {
    let k = 5;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let prompt: Vec<u32> = (0..prompt_len).map(|_| rng.random_range(2..5000)).collect();
    let steps = accept_pattern.iter().map(|m| m + 1).sum::<usize>() + k + 1;
    let (full, reference) = plain(&prompt, steps);
    let row_of = |pos: usize| &reference[pos + 1 - prompt_len];

    let mut m = target();
    let (rows, _) = step(&mut m, 0, &prompt, LogitsWanted::Last, None);
    assert_eq!(max_diff(&rows[0], row_of(prompt_len - 1)), 0.0);
    let mut pos = prompt_len;
    for &accepted in accept_pattern {
        // `accepted` right drafts, then wrong ones (a wrong one is never the greedy token).
        let mut block = vec![full[pos]];
        block.extend_from_slice(&full[pos + 1..pos + 1 + accepted]);
        while block.len() < k + 1 {
            let p = pos + block.len();
            let mut t = rng.random_range(2..129_000);
            if t == full[p] {
                t += 1;
            }
            block.push(t);
        }
        let (rows, _) = step(&mut m, pos, &block, LogitsWanted::All, None);
        assert_eq!(rows.len(), k + 1);
        for (j, row) in rows.iter().enumerate().take(accepted + 1) {
            let d = max_diff(row, row_of(pos + j));
            assert!(
                d <= 1e-6,
                "prompt {prompt_len}: position {} after rollbacks differs by {d}",
                pos + j
            );
        }
        // The first rejected row's argmax is the correction: the next anchor.
        assert_eq!(argmax(&rows[accepted]), full[pos + accepted + 1]);
        pos += accepted + 1;
    }
    // Plain decoding continues exactly after the last rollback.
    let (rows, _) = step(&mut m, pos, &[full[pos]], LogitsWanted::Last, None);
    assert!(max_diff(&rows[0], row_of(pos)) <= 1e-6);
}

#[test]
fn rollback_inside_csa_windows_and_the_sliding_window() {
    // Every accept length; tails of up to 5 rejected positions cover every CSA window phase
    // and, after 32 positions, the sliding window wraps over rejected slots.
    rollback_matches_plain(37, &[0, 1, 2, 3, 4, 5, 0, 0, 2, 1, 0, 3, 0, 4, 0, 0, 1], 1);
}

#[test]
fn rollback_across_an_hca_window_boundary() {
    // Positions 124..=129 are drafted and all rejected: the HCA window 0..128 completes on a
    // rejected row (127), then again on the real one; the next CSA windows too.
    rollback_matches_plain(124, &[0, 0, 0, 1, 0, 2, 0, 0, 5, 0], 2);
    // The second HCA window (128..256), completing after a partial acceptance.
    rollback_matches_plain(251, &[2, 0, 1, 0, 0, 3, 0], 3);
}

/// The draft state of a sequence dropped mid-generation (as preemption does) is rebuilt when
/// it recomputes its prefix: the next drafts equal those of a run never interrupted.
#[test]
fn a_dropped_draft_state_is_rebuilt_by_recompute() {
    let opts = LoadOptions {
        kv_pool_tokens: 2048,
        ..LoadOptions::default()
    };
    let load = || SpeculativeRunner::load_cpu(&tiny_dir(), &opts, Arc::new(SingleRank)).unwrap();
    let plan = |k| {
        Some(DraftPlan {
            num_drafts: k,
            seed: 0,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
        })
    };
    let prompt: Vec<u32> = (0..45).map(|i| 7 + (i * 13) % 300).collect();
    // Uninterrupted: prefill, then drafting verify steps, greedy acceptance.
    let mut a = load();
    let (rows, _) = step(&mut a, 0, &prompt, LogitsWanted::Last, None);
    let mut toks = prompt.clone();
    toks.push(argmax(&rows[0]));
    let mut history = Vec::new();
    for _ in 0..6 {
        let pos = toks.len() - 1;
        let (rows, drafts) = step(&mut a, pos, &[toks[pos]], LogitsWanted::All, plan(5));
        assert_eq!(drafts.len(), 5);
        history.push((pos, drafts.clone()));
        let mut n = 0;
        while n < drafts.len() && drafts[n] == argmax(&rows[n]) {
            n += 1;
        }
        toks.extend_from_slice(&drafts[..n]);
        toks.push(argmax(&rows[n]));
    }
    // Interrupted before step 4: state dropped, prefix recomputed from position 0.
    let (resume_pos, want) = history[3].clone();
    let mut b = load();
    step(&mut b, 0, &prompt, LogitsWanted::Last, None);
    b.release(1);
    step(&mut b, 0, &toks[..resume_pos], LogitsWanted::Last, None);
    let (_, drafts) = step(
        &mut b,
        resume_pos,
        &[toks[resume_pos]],
        LogitsWanted::All,
        plan(5),
    );
    assert_eq!(drafts, want);
}
