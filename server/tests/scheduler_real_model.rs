//! The scheduler driving the REAL engine (the tiny DeepSeek-V4 model on the CPU backend): a pool
//! far smaller than the sum of the requests, preemption by recompute, the prefix cache, and
//! still every request's greedy output equals what it produces alone.

mod support;

use std::sync::Arc;

use dspark_server::engine::model::{self, LoadOptions};
use dspark_server::engine::ModelRunner;
use dspark_server::metrics::Metrics;
use dspark_server::ranks::SingleRank;
use dspark_server::scheduler::{SamplingParams, Scheduler, SchedulerConfig};
use support::scheduler::{run, submit, tokens};
use support::tiny_dir;

fn runner(pool_tokens: usize, recent_blocks: Option<usize>) -> Box<dyn ModelRunner> {
    let opts = LoadOptions {
        kv_pool_tokens: pool_tokens,
        kv_recent_blocks: recent_blocks,
        ..LoadOptions::default()
    };
    model::load(&tiny_dir(), &opts, Arc::new(SingleRank)).expect("load the tiny model")
}

fn scheduler(
    pool_tokens: usize,
    max_model_len: usize,
    max_num_seqs: usize,
    prefix_caching: bool,
) -> Scheduler {
    scheduler_with(
        pool_tokens,
        None,
        max_model_len,
        max_num_seqs,
        prefix_caching,
    )
}

fn scheduler_with(
    pool_tokens: usize,
    recent_blocks: Option<usize>,
    max_model_len: usize,
    max_num_seqs: usize,
    prefix_caching: bool,
) -> Scheduler {
    Scheduler::new(
        runner(pool_tokens, recent_blocks),
        SchedulerConfig {
            max_num_seqs,
            max_num_batched_tokens: 96,
            max_model_len,
            max_waiting_requests: 1024,
            prefix_caching,
            eos: 1,
        },
        Arc::new(Metrics::new("tiny")),
    )
}

/// Each prompt alone on a fresh scheduler from `make`: the reference outputs.
fn solo_outputs(
    make: impl Fn() -> Scheduler,
    ps: &[Vec<u32>],
    params: impl Fn(&Vec<u32>) -> SamplingParams,
) -> Vec<Vec<u32>> {
    ps.iter()
        .map(|p| {
            let mut s = make();
            let mut rx = submit(&mut s, 0, p.clone(), params(p));
            run(&mut s);
            tokens(&mut rx)
        })
        .collect()
}

/// Every prompt submitted to `s` at once and run to the end: each request's tokens.
fn together_outputs(
    s: &mut Scheduler,
    ps: &[Vec<u32>],
    params: impl Fn(&Vec<u32>) -> SamplingParams,
) -> Vec<Vec<u32>> {
    let mut rxs: Vec<_> = ps
        .iter()
        .enumerate()
        .map(|(i, p)| submit(s, i as u64, p.clone(), params(p)))
        .collect();
    run(s);
    rxs.iter_mut().map(tokens).collect()
}

/// 16 prompts sharing a system prefix of one full block, different tails.
fn prompts(block: usize) -> Vec<Vec<u32>> {
    let system: Vec<u32> = (0..block as u32).map(|i| 1000 + i * 7).collect();
    (0..16u32)
        .map(|i| {
            let tail: Vec<u32> = (0..(3 + i % 5)).map(|j| 20_000 + i * 97 + j * 13).collect();
            [system.clone(), tail].concat()
        })
        .collect()
}

#[test]
fn sixteen_requests_over_a_pool_for_three_match_their_solo_outputs() {
    let block = runner(1, None).kv_layout().block_size;
    let max_model_len = 2 * block + 8;
    let params = |p: &Vec<u32>| SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(max_model_len - p.len())
    };
    let ps = prompts(block);

    // Each prompt alone, no prefix caching: the reference.
    let solo = solo_outputs(
        || scheduler(4 * max_model_len, max_model_len, 1, false),
        &ps,
        params,
    );

    // All 16 at once over a pool for three at full length, prefix caching on.
    let mut s = scheduler(3 * max_model_len, max_model_len, 16, true);
    let together = together_outputs(&mut s, &ps, params);
    let metrics = s.metrics_handle();
    assert!(
        metrics.num_preemptions.get() > 0,
        "the pool was meant to run out"
    );
    assert!(
        metrics.prefix_cache_hits.get() > 0,
        "the shared system block was meant to hit"
    );
    for (i, (got, want)) in together.iter().zip(&solo).enumerate() {
        assert_eq!(got, want, "request {i}");
    }
    assert_eq!(s.pool().free_blocks(), s.pool().num_blocks());
}

#[test]
fn few_recent_blocks_still_give_every_request_its_solo_output() {
    // Sequences of up to 4 blocks with 6 recent blocks for 4 running at once: the window rows
    // and compressor inputs of blocks a sequence has moved past must be released (and, for the
    // 2-block system prompt, found again by the prefix cache) or nothing runs; where they run
    // short the scheduler waits or preempts. Outputs must not change.
    let block = runner(1, None).kv_layout().block_size;
    let max_model_len = 4 * block;
    let system: Vec<u32> = (0..2 * block as u32).map(|i| 1000 + i * 7).collect();
    let ps: Vec<Vec<u32>> = (0..8u32)
        .map(|i| {
            let tail: Vec<u32> = (0..(5 + i * 11))
                .map(|j| 20_000 + i * 97 + j * 13)
                .collect();
            [system.clone(), tail].concat()
        })
        .collect();
    let params = |p: &Vec<u32>| SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy((max_model_len - p.len()).min(block + 20))
    };
    let build = |recent: Option<usize>, max_num_seqs: usize, caching: bool| {
        scheduler_with(16 * block, recent, max_model_len, max_num_seqs, caching)
    };
    let solo = solo_outputs(|| build(None, 1, false), &ps, params);
    let mut s = build(Some(6), 4, true);
    assert_eq!(s.pool().num_recent(), 6);
    let together = together_outputs(&mut s, &ps, params);
    assert!(
        s.metrics_handle().prefix_cache_hits.get() > 0,
        "the system prompt's blocks (and the recent block of its tail) were meant to hit"
    );
    for (i, (got, want)) in together.iter().zip(&solo).enumerate() {
        assert_eq!(got, want, "request {i}");
    }
    assert_eq!(s.pool().free_blocks(), s.pool().num_blocks());
    assert_eq!(s.pool().free_recent(), 6, "every recent block returned");
}
