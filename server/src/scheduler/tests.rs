//! Scheduler behaviour against the deterministic fake engine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedReceiver;

use super::fake_runner::{FakeRunner, FAKE_EOS};
use super::handle::SchedulerHandle;
use super::*;

const VOCAB: usize = 48;
const BS: usize = 4;

fn config(max_model_len: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: 64,
        max_num_batched_tokens: 64,
        max_model_len,
        max_waiting_requests: 1024,
        prefix_caching: true,
        eos: FAKE_EOS,
    }
}

fn scheduler(
    num_blocks: usize,
    cfg: SchedulerConfig,
) -> (Scheduler, Arc<std::sync::Mutex<fake_runner::FakeStats>>) {
    let runner = FakeRunner::new(BS, num_blocks, VOCAB);
    let stats = runner.stats.clone();
    (
        Scheduler::new(Box::new(runner), cfg, Arc::new(Metrics::new("fake"))),
        stats,
    )
}

fn prompt(i: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|j| ((i * 7 + j * 3) % (VOCAB - 2) + 2) as u32)
        .collect()
}

fn submit(
    s: &mut Scheduler,
    id: u64,
    prompt: Vec<u32>,
    params: SamplingParams,
) -> UnboundedReceiver<SeqEvent> {
    let (req, rx) = GenerateRequest::new(prompt, params, Instant::now());
    s.queued.fetch_add(1, Ordering::SeqCst);
    s.add(id, req);
    rx
}

/// Submits each (prompt, params) as request `i`.
fn submit_all(
    s: &mut Scheduler,
    reqs: &[(Vec<u32>, SamplingParams)],
) -> Vec<UnboundedReceiver<SeqEvent>> {
    reqs.iter()
        .enumerate()
        .map(|(i, (p, sp))| submit(s, i as u64, p.clone(), sp.clone()))
        .collect()
}

/// Drains a request's events into (tokens per choice, finish reason per choice).
fn collect(
    rx: &mut UnboundedReceiver<SeqEvent>,
    n: usize,
) -> (Vec<Vec<u32>>, Vec<Option<FinishReason>>) {
    let mut toks = vec![Vec::new(); n];
    let mut fin = vec![None; n];
    while let Ok(ev) = rx.try_recv() {
        match ev {
            SeqEvent::Token {
                index,
                token,
                finish,
                ..
            } => {
                toks[index].push(token);
                if let Some(f) = finish {
                    fin[index] = Some(f.reason);
                }
            }
            SeqEvent::Finished { index, reason } => fin[index] = Some(reason),
            SeqEvent::Failed(m) => panic!("request failed: {m}"),
        }
    }
    (toks, fin)
}

/// Steps until idle, checking the pool and batch invariants after every step.
fn run_to_end(s: &mut Scheduler) -> usize {
    let mut preempted = 0;
    for _ in 0..100_000 {
        if !s.has_work() {
            return preempted;
        }
        let r = s.step().expect("step");
        preempted += r.preempted;
        assert!(s.num_running() <= s.config().max_num_seqs);
        assert!(r.tokens <= s.config().max_num_batched_tokens);
        assert!(s.live_tokens() <= s.pool().pool_tokens());
    }
    panic!("scheduler did not finish");
}

fn alone(p: &[u32], params: &SamplingParams, max_model_len: usize) -> Vec<u32> {
    let (mut s, _) = scheduler(1024, config(max_model_len));
    let mut rx = submit(&mut s, 0, p.to_vec(), params.clone());
    run_to_end(&mut s);
    collect(&mut rx, 1).0.remove(0)
}

#[test]
fn tiny_pool_many_requests_same_greedy_outputs_as_alone() {
    // 16 requests of up to 40 tokens; the pool holds 3 of them at full length.
    let max_model_len = 40;
    let num_blocks = 3 * max_model_len / BS;
    let cfg = SchedulerConfig {
        max_num_seqs: 16,
        max_num_batched_tokens: 24,
        ..config(max_model_len)
    };
    let (mut s, stats) = scheduler(num_blocks, cfg);
    let reqs: Vec<(Vec<u32>, SamplingParams)> = (0..16)
        .map(|i| {
            let mut p = SamplingParams::greedy(40 - (6 + i % 9));
            p.ignore_eos = i % 2 == 0;
            (prompt(i, 6 + i % 9), p)
        })
        .collect();
    let mut rxs = submit_all(&mut s, &reqs);
    let preempted = run_to_end(&mut s);
    assert!(preempted > 0, "the pool was meant to run out");
    assert_eq!(s.metrics.num_preemptions.get(), preempted as u64);
    assert!(stats.lock().unwrap().max_seqs_in_step <= 16);
    for (i, ((p, sp), rx)) in reqs.iter().zip(rxs.iter_mut()).enumerate() {
        let (toks, fin) = collect(rx, 1);
        assert_eq!(toks[0], alone(p, sp, max_model_len), "request {i}");
        assert!(fin[0].is_some());
        if sp.ignore_eos {
            assert_eq!(toks[0].len(), sp.max_tokens);
            assert_eq!(fin[0], Some(FinishReason::Length));
        }
    }
    assert_eq!(s.pool().free_blocks(), num_blocks, "every block returned");
}

#[test]
fn max_num_seqs_is_never_exceeded() {
    let cfg = SchedulerConfig {
        max_num_seqs: 3,
        ..config(64)
    };
    let (mut s, stats) = scheduler(256, cfg);
    let mut rxs: Vec<_> = (0..10)
        .map(|i| {
            let mut p = SamplingParams::greedy(8);
            p.ignore_eos = true;
            submit(&mut s, i, prompt(i as usize, 5), p)
        })
        .collect();
    run_to_end(&mut s);
    assert_eq!(stats.lock().unwrap().max_seqs_in_step, 3);
    for rx in &mut rxs {
        assert_eq!(collect(rx, 1).0[0].len(), 8);
    }
}

#[test]
fn chunked_prefill_respects_budget_and_decodes_go_first() {
    let cfg = SchedulerConfig {
        max_num_batched_tokens: 8,
        ..config(128)
    };
    let (mut s, stats) = scheduler(256, cfg);
    let mut p = SamplingParams::greedy(6);
    p.ignore_eos = true;
    let mut a = submit(&mut s, 0, prompt(0, 3), p.clone());
    s.step().unwrap(); // a's prefill
    let mut b = submit(&mut s, 1, prompt(1, 50), p.clone());
    s.step().unwrap();
    // a decodes (1 token) and b gets the remaining 7 of the budget.
    let entries = stats.lock().unwrap().entries.clone();
    assert_eq!(entries[1], (0, 3, 1));
    assert_eq!(entries[2], (1, 0, 7));
    run_to_end(&mut s);
    assert_eq!(stats.lock().unwrap().max_tokens_in_step, 8);
    assert_eq!(collect(&mut a, 1).0[0], alone(&prompt(0, 3), &p, 128));
    assert_eq!(collect(&mut b, 1).0[0], alone(&prompt(1, 50), &p, 128));
}

#[test]
fn cancelled_stream_frees_its_blocks() {
    let (mut s, _) = scheduler(64, config(128));
    let mut p = SamplingParams::greedy(100);
    p.ignore_eos = true;
    let rx = submit(&mut s, 0, prompt(0, 20), p);
    for _ in 0..5 {
        s.step().unwrap();
    }
    assert!(s.pool().free_blocks() < 64);
    drop(rx);
    s.step().unwrap();
    assert!(!s.has_work());
    assert_eq!(s.pool().free_blocks(), 64);
    assert_eq!(s.live_tokens(), 0);
    assert_eq!(s.metrics.request_success_abort.get(), 1);
}

#[test]
fn abort_ends_one_choice_only() {
    let (mut s, _) = scheduler(64, config(64));
    let p = SamplingParams {
        n: 2,
        max_tokens: 10,
        ignore_eos: true,
        seed: Some(3),
        ..Default::default()
    };
    let mut rx = submit(&mut s, 7, prompt(0, 5), p);
    s.step().unwrap();
    s.abort(7, Some(0));
    run_to_end(&mut s);
    let (toks, fin) = collect(&mut rx, 2);
    assert_eq!(fin[0], Some(FinishReason::Abort));
    assert_eq!(fin[1], Some(FinishReason::Length));
    assert_eq!(toks[1].len(), 10);
    assert_eq!(s.pool().free_blocks(), 64);
}

#[test]
fn shared_system_prompt_hits_the_prefix_cache() {
    let (mut s, stats) = scheduler(64, config(128));
    let system = prompt(3, 22); // 5 full blocks
    let mut p = SamplingParams::greedy(4);
    p.ignore_eos = true;
    let mut first = submit(&mut s, 0, [system.clone(), vec![5, 6]].concat(), p.clone());
    run_to_end(&mut s);
    let mut second = submit(
        &mut s,
        1,
        [system.clone(), vec![7, 8, 9]].concat(),
        p.clone(),
    );
    run_to_end(&mut s);
    assert_eq!(
        s.metrics.prefix_cache_hits.get(),
        20,
        "5 full blocks of the system prompt"
    );
    assert_eq!(s.metrics.prefix_cache_queries.get(), 24 + 25);
    // The second request's first step started after the cached blocks.
    let entries = stats.lock().unwrap().entries.clone();
    assert!(entries.iter().any(|e| e.0 == 1 && e.1 == 20));
    assert_eq!(
        collect(&mut first, 1).0[0],
        alone(&[system.clone(), vec![5, 6]].concat(), &p, 128)
    );
    assert_eq!(
        collect(&mut second, 1).0[0],
        alone(&[system, vec![7, 8, 9]].concat(), &p, 128)
    );
}

#[test]
fn recent_blocks_sized_for_the_batch_never_run_out() {
    // Plenty of blocks, but recent blocks only for the batch: 8 sequences of up to
    // ceil(reach / BS) + 2 = 3 held, plus a 24-token step's 6 (BlockGeometry::recent_blocks_for).
    // Prompts of up to 70 tokens (18 blocks) each only fit if blocks behind each sequence's
    // window give their recent block back; half of them share a 22-token system prompt, so
    // prefix hits need the shared prefix's tail recent block too.
    let cfg = SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 24,
        ..config(96)
    };
    let recent = 8 * 3 + 6;
    let runner = FakeRunner::with_recent(BS, 400, recent, BS - 1, VOCAB);
    let mut s = Scheduler::new(Box::new(runner), cfg, Arc::new(Metrics::new("fake")));
    let system = prompt(3, 22);
    let reqs: Vec<(Vec<u32>, SamplingParams)> = (0..20)
        .map(|i| {
            let mut p = SamplingParams::greedy(10 + i % 7);
            p.ignore_eos = true;
            let own = prompt(i, 20 + (i * 11) % 48);
            let toks = if i % 2 == 0 {
                [system.clone(), own].concat()
            } else {
                own
            };
            (toks, p)
        })
        .collect();
    let mut rxs = submit_all(&mut s, &reqs);
    let preempted = run_to_end(&mut s);
    assert_eq!(preempted, 0, "the recent blocks were sized for this batch");
    assert!(
        s.metrics.prefix_cache_hits.get() > 0,
        "the system prompt was shared"
    );
    for (i, ((p, sp), rx)) in reqs.iter().zip(rxs.iter_mut()).enumerate() {
        let (toks, _) = collect(rx, 1);
        assert_eq!(toks[0], alone(p, sp, 96), "request {i}");
    }
    assert_eq!(s.pool().free_blocks(), 400);
    assert_eq!(
        s.pool().free_recent(),
        recent,
        "every recent block returned"
    );
    assert_eq!(s.metrics.kv_recent_blocks.get(), recent as f64);
    assert_eq!(s.metrics.kv_recent_blocks_used.get(), 0.0);
}

#[test]
fn recent_blocks_running_short_preempt_instead_of_failing() {
    // Fewer recent blocks than the batch needs: the scheduler preempts (and later resumes)
    // rather than failing a step or corrupting a sequence.
    let cfg = SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 24,
        ..config(64)
    };
    let runner = FakeRunner::with_recent(BS, 400, 12, BS - 1, VOCAB);
    let mut s = Scheduler::new(Box::new(runner), cfg, Arc::new(Metrics::new("fake")));
    let reqs: Vec<(Vec<u32>, SamplingParams)> = (0..10)
        .map(|i| {
            let mut p = SamplingParams::greedy(20);
            p.ignore_eos = true;
            (prompt(i, 30 + i), p)
        })
        .collect();
    let mut rxs = submit_all(&mut s, &reqs);
    let preempted = run_to_end(&mut s);
    assert!(
        preempted > 0,
        "12 recent blocks cannot hold 8 sequences' steps"
    );
    for (i, ((p, sp), rx)) in reqs.iter().zip(rxs.iter_mut()).enumerate() {
        assert_eq!(collect(rx, 1).0[0], alone(p, sp, 64), "request {i}");
    }
    assert_eq!(s.pool().free_recent(), 12);
}

#[test]
fn seeds_reproduce_regardless_of_batch() {
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        top_k: 20,
        seed: Some(42),
        max_tokens: 12,
        ignore_eos: true,
        ..Default::default()
    };
    let solo = alone(&prompt(1, 7), &p, 64);
    let (mut s, _) = scheduler(40, config(64));
    let mut others: Vec<_> = (0..6)
        .map(|i| {
            submit(
                &mut s,
                10 + i,
                prompt(i as usize + 5, 9),
                SamplingParams::default(),
            )
        })
        .collect();
    let mut rx = submit(&mut s, 0, prompt(1, 7), p.clone());
    run_to_end(&mut s);
    assert_eq!(collect(&mut rx, 1).0[0], solo);
    for o in &mut others {
        collect(o, 1);
    }
    let other_seed = SamplingParams {
        seed: Some(43),
        ..p.clone()
    };
    assert_ne!(alone(&prompt(1, 7), &other_seed, 64), solo);
    // n > 1: choice i draws from seed + i, so choice 1 of seed 42 is choice 0 of seed 43.
    let (mut s, _) = scheduler(64, config(64));
    let mut rx = submit(&mut s, 0, prompt(1, 7), SamplingParams { n: 2, ..p });
    run_to_end(&mut s);
    let (toks, _) = collect(&mut rx, 2);
    assert_eq!(toks[0], solo);
    assert_eq!(toks[1], alone(&prompt(1, 7), &other_seed, 64));
}

#[test]
fn stop_tokens_min_tokens_and_ceiling() {
    let base = alone(
        &prompt(2, 5),
        &SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(20)
        },
        64,
    );
    let stop_at = base[3];
    let first = base.iter().position(|t| *t == stop_at).unwrap();
    let (mut s, _) = scheduler(64, config(64));
    let p = SamplingParams {
        stop_token_ids: vec![stop_at],
        ignore_eos: true,
        ..SamplingParams::greedy(20)
    };
    let mut rx = submit(&mut s, 0, prompt(2, 5), p);
    run_to_end(&mut s);
    let (toks, fin) = collect(&mut rx, 1);
    assert_eq!(
        toks[0],
        base[..=first].to_vec(),
        "stops on (and includes) the stop token"
    );
    assert_eq!(fin[0], Some(FinishReason::Stop));

    // min_tokens masks the stop token until enough were generated.
    let p = SamplingParams {
        stop_token_ids: vec![stop_at],
        min_tokens: first + 2,
        ignore_eos: true,
        ..SamplingParams::greedy(20)
    };
    let (mut s, _) = scheduler(64, config(64));
    let mut rx = submit(&mut s, 0, prompt(2, 5), p);
    run_to_end(&mut s);
    let (toks, _) = collect(&mut rx, 1);
    assert!(!toks[0][..first + 2].contains(&stop_at));
}

/// Tokens streamed to `rx` up to and including the finishing one (each wait bounded).
async fn tokens_until_finish(rx: &mut UnboundedReceiver<SeqEvent>) -> usize {
    let mut n = 0;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
    {
        if let SeqEvent::Token { finish, .. } = ev {
            n += 1;
            if finish.is_some() {
                break;
            }
        }
    }
    n
}

#[test]
fn a_burst_into_an_idle_server_fills_free_slots_and_the_waiting_bound() {
    // Free running slots count on top of --max-waiting-requests, whether or not the scheduler
    // has admitted the first requests yet: 2 slots + 1 waiting accept 3, the 4th gets 429.
    let cfg = SchedulerConfig {
        max_num_seqs: 2,
        max_waiting_requests: 1,
        ..config(32)
    };
    let mut runner = FakeRunner::new(BS, 16, VOCAB);
    runner.step_delay = Duration::from_millis(5);
    let s = Scheduler::new(Box::new(runner), cfg, Arc::new(Metrics::new("fake")));
    let (h, join) = SchedulerHandle::spawn(s).unwrap();
    let now = Instant::now();
    let mut long = SamplingParams::greedy(20);
    long.ignore_eos = true;
    let accepted: Vec<_> = (0..3)
        .map(|i| h.submit(prompt(i, 4), long.clone(), now).unwrap())
        .collect();
    assert!(matches!(
        h.submit(prompt(3, 4), long.clone(), now),
        Err(SubmitError::QueueFull(_))
    ));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for (_, mut rx) in accepted {
            assert_eq!(tokens_until_finish(&mut rx).await, 20);
        }
    });
    drop(h);
    join.join().unwrap().unwrap();
}

#[test]
fn handle_validates_and_bounds_the_queue() {
    let cfg = SchedulerConfig {
        max_num_seqs: 1,
        max_waiting_requests: 1,
        ..config(32)
    };
    let mut runner = FakeRunner::new(BS, 16, VOCAB);
    // Slow enough that `a` is still running while the next two requests arrive.
    runner.step_delay = Duration::from_millis(5);
    let s = Scheduler::new(Box::new(runner), cfg, Arc::new(Metrics::new("fake")));
    let (h, join) = SchedulerHandle::spawn(s).unwrap();
    let now = Instant::now();
    let too_long = h.submit(prompt(0, 30), SamplingParams::greedy(3), now);
    assert!(
        matches!(too_long, Err(SubmitError::Invalid(m)) if m.contains("maximum context length is 32"))
    );
    assert!(matches!(
        h.submit(vec![], SamplingParams::greedy(1), now),
        Err(SubmitError::Invalid(_))
    ));
    assert!(matches!(
        h.submit(vec![VOCAB as u32], SamplingParams::greedy(1), now),
        Err(SubmitError::Invalid(_))
    ));
    assert!(matches!(
        h.submit(
            prompt(0, 3),
            SamplingParams {
                n: 2,
                ..SamplingParams::greedy(1)
            },
            now
        ),
        Err(SubmitError::Invalid(_))
    ));

    let mut long = SamplingParams::greedy(28);
    long.ignore_eos = true;
    let (_, mut a) = h.submit(prompt(0, 4), long.clone(), now).unwrap();
    // Wait until `a` runs, so the single waiting slot is free.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        assert!(matches!(a.recv().await, Some(SeqEvent::Token { .. })));
    });
    let (_, mut b) = h.submit(prompt(1, 4), long.clone(), now).unwrap();
    assert_eq!(
        h.submit(prompt(2, 4), long.clone(), now).unwrap_err(),
        SubmitError::QueueFull(1)
    );
    drop(a); // cancelling a lets b run
    rt.block_on(async {
        assert_eq!(tokens_until_finish(&mut b).await, 28);
    });
    drop(h);
    join.join().unwrap().unwrap();
}
