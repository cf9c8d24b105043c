//! transformers reference logits (`reference.json`, `reference_quant.json`: format in
//! tests/fixtures/README.md) and the checks every model test runs against them.
//!
//! Error metric: for every compared logit (the row's top-20, the fixed sample ids, and the
//! logsumexp), |ours - reference| / max|reference logit of the row|; our top-1 must equal the
//! reference's.

use dspark_server::backend::Backend;
use dspark_server::engine::model::DeepseekV4;
use dspark_server::engine::{LogitsWanted, ModelRunner, SeqPlan, StepPlan};
use serde_json::Value;
use std::path::Path;

/// The relative bound the CPU model meets against transformers (float32 on both sides).
pub const REL_BOUND: f64 = 1e-4;

pub struct Reference {
    pub json: Value,
    sample_ids: Vec<usize>,
}

impl Reference {
    pub fn load(path: &Path) -> Reference {
        let text = std::fs::read_to_string(path).unwrap();
        let json: Value = serde_json::from_str(&text).unwrap();
        let sample_ids = usizes(&json["sample_ids"]);
        Reference { json, sample_ids }
    }

    pub fn prompt(&self, name: &str) -> &Value {
        let p = &self.json["prompts"][name];
        assert!(p.is_object(), "reference has no prompt {name}");
        p
    }

    /// Relative error of one row of our logits against reference row `i` of `rows` (a
    /// `topk_rows()` dict of the fixture script: a prompt, or its `greedy_step_logits`).
    pub fn row_error(&self, ours: &[f32], rows: &Value, i: usize) -> f64 {
        let (e, top_matches) = self.row_error_and_top1(ours, rows, i);
        assert!(top_matches, "top-1 differs (row {i})");
        e
    }

    /// [`Self::row_error`] without the top-1 check: the error and whether our top-1 is the
    /// reference's (for a lossy KV cache, whose top-1 may flip between near-tied logits).
    pub fn row_error_and_top1(&self, ours: &[f32], rows: &Value, i: usize) -> (f64, bool) {
        let max_abs = rows["max_abs_logit"][i].as_f64().unwrap();
        let mut worst: f64 = 0.0;
        let top_ids = usizes(&rows["topk_ids"][i]);
        let top_vals = floats(&rows["topk_logits"][i]);
        for (id, v) in top_ids.iter().zip(&top_vals) {
            worst = worst.max((ours[*id] as f64 - v).abs());
        }
        for (id, v) in self
            .sample_ids
            .iter()
            .zip(floats(&rows["sample_logits"][i]))
        {
            worst = worst.max((ours[*id] as f64 - v).abs());
        }
        let m = ours.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + ours.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        worst = worst.max((lse - rows["logsumexp"][i].as_f64().unwrap()).abs());
        (worst / max_abs, argmax(ours) == top_ids[0])
    }

    /// Prefills each named prompt in chunks ending at its reference positions; for every listed
    /// position: (prompt, position, relative error, whether our top-1 is the reference's).
    pub fn prefill_rows<B: Backend>(
        &self,
        m: &mut DeepseekV4<B>,
        names: &[&str],
    ) -> Vec<(String, usize, f64, bool)> {
        let mut out = Vec::new();
        for (k, name) in names.iter().enumerate() {
            let p = self.prompt(name);
            let toks = ids(&p["input_ids"]);
            let positions = usizes(&p["positions"]);
            let bt = blocks_for(m, 0, toks.len());
            let got = chunked_prefill(m, k as u64 + 1, &toks, &bt, &positions);
            for (i, pos) in positions.iter().enumerate() {
                let ours = &got.iter().find(|(q, _)| q == pos).unwrap().1;
                let (e, top) = self.row_error_and_top1(ours, p, i);
                out.push((name.to_string(), *pos, e, top));
            }
        }
        out
    }

    /// [`Self::prefill_rows`] summed up, asserting nothing: the worst relative error and how
    /// many top-1s equal the reference's, of how many.
    pub fn prefill_errors<B: Backend>(
        &self,
        m: &mut DeepseekV4<B>,
        names: &[&str],
    ) -> (f64, usize, usize) {
        let rows = self.prefill_rows(m, names);
        let worst = rows.iter().fold(0f64, |w, r| w.max(r.2));
        let same_top = rows.iter().filter(|r| r.3).count();
        (worst, same_top, rows.len())
    }

    /// Prefills each named prompt in chunks ending at its reference positions and checks every
    /// listed position; returns the worst relative error.
    pub fn check_prefill<B: Backend>(&self, m: &mut DeepseekV4<B>, names: &[&str]) -> f64 {
        self.check_prefill_within(m, names, REL_BOUND)
    }

    /// [`Self::check_prefill`] with another bound (a lossy KV cache's reference).
    pub fn check_prefill_within<B: Backend>(
        &self,
        m: &mut DeepseekV4<B>,
        names: &[&str],
        bound: f64,
    ) -> f64 {
        let mut worst: f64 = 0.0;
        for (name, pos, e, top) in self.prefill_rows(m, names) {
            assert!(top, "{name} position {pos}: top-1 differs");
            assert!(e < bound, "{name} position {pos}: relative error {e:e}");
            worst = worst.max(e);
        }
        worst
    }

    /// Prefills all of each named prompt in one step and checks the listed positions.
    pub fn check_one_shot_prefill<B: Backend>(&self, m: &mut DeepseekV4<B>, names: &[&str]) -> f64 {
        let mut worst: f64 = 0.0;
        for (k, name) in names.iter().enumerate() {
            let p = self.prompt(name);
            let toks = ids(&p["input_ids"]);
            let bt = blocks_for(m, 0, toks.len());
            let all = run(
                m,
                vec![seq(100 + k as u64, 0, &toks, &bt, LogitsWanted::All)],
            );
            for (i, pos) in usizes(&p["positions"]).iter().enumerate() {
                let e = self.row_error(&all[0][*pos], p, i);
                assert!(e < REL_BOUND, "{name} position {pos}: relative error {e:e}");
                worst = worst.max(e);
            }
        }
        worst
    }

    /// Greedy decoding from each named prompt (prefill, then one token per step through the
    /// KV cache) must reproduce the reference continuation token for token, with every step's
    /// logits within the bound; returns the worst relative error.
    pub fn check_greedy<B: Backend>(&self, m: &mut DeepseekV4<B>, names: &[&str]) -> f64 {
        self.check_greedy_within(m, names, REL_BOUND)
    }

    /// [`Self::check_greedy`] with another bound (a lossy KV cache's reference).
    pub fn check_greedy_within<B: Backend>(
        &self,
        m: &mut DeepseekV4<B>,
        names: &[&str],
        bound: f64,
    ) -> f64 {
        let mut worst: f64 = 0.0;
        for (k, name) in names.iter().enumerate() {
            let id = 200 + k as u64;
            let p = self.prompt(name);
            let toks = ids(&p["input_ids"]);
            let want = ids(&p["greedy"]);
            let bt = blocks_for(m, 0, toks.len() + want.len());
            let mut logits = run(m, vec![seq(id, 0, &toks, &bt, LogitsWanted::Last)])
                .remove(0)
                .remove(0);
            let mut got = Vec::new();
            for step in 0..want.len() {
                worst = worst.max(self.row_error(&logits, &p["greedy_step_logits"], step));
                let next = argmax(&logits) as u32;
                got.push(next);
                if got.len() == want.len() {
                    break;
                }
                let pos = toks.len() + step;
                logits = run(m, vec![seq(id, pos, &[next], &bt, LogitsWanted::Last)])
                    .remove(0)
                    .remove(0);
            }
            assert_eq!(got, want, "greedy continuation of {name}");
        }
        assert!(worst < bound, "decode logits relative error {worst:e}");
        worst
    }
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// First index of the largest value (the reference's tie rule).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// max |a - b| / max |b|.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Logits of `toks` prefilled at once, decoded one by one after 100, and in uneven chunks.
pub fn cut_three_ways<B: Backend>(m: &mut DeepseekV4<B>, toks: &[u32]) -> [Vec<Vec<f32>>; 3] {
    let n = toks.len();
    let bt = blocks_for(m, 0, n);
    let one = run(m, vec![seq(1, 0, toks, &bt, LogitsWanted::All)]).remove(0);
    let bt2 = blocks_for(m, bt.len() as u32, n);
    let mut decoded = run(m, vec![seq(2, 0, &toks[..100], &bt2, LogitsWanted::All)]).remove(0);
    for pos in 100..n {
        decoded.extend(
            run(
                m,
                vec![seq(2, pos, &toks[pos..pos + 1], &bt2, LogitsWanted::Last)],
            )
            .remove(0),
        );
    }
    let bt3 = blocks_for(m, 2 * bt.len() as u32, n);
    let mut chunked = Vec::new();
    let mut start: usize = 0;
    for len in [3usize, 1, 60, 64, 5, 20, usize::MAX] {
        let end = start.saturating_add(len).min(n);
        if end > start {
            chunked.extend(
                run(
                    m,
                    vec![seq(3, start, &toks[start..end], &bt3, LogitsWanted::All)],
                )
                .remove(0),
            );
        }
        start = end;
    }
    [one, decoded, chunked]
}

/// Consecutive KV block ids from `first`, enough for `tokens`.
pub fn blocks_for<B: Backend>(m: &DeepseekV4<B>, first: u32, tokens: usize) -> Vec<u32> {
    let bs = m.kv_layout().block_size;
    (first..first + tokens.div_ceil(bs) as u32).collect()
}

pub fn seq(id: u64, start: usize, tokens: &[u32], bt: &[u32], logits: LogitsWanted) -> SeqPlan {
    SeqPlan {
        seq_id: id,
        start_pos: start,
        tokens: tokens.to_vec(),
        block_table: bt.to_vec(),
        recent_table: bt.to_vec(),
        logits,
        draft: None,
    }
}

/// Runs `toks` twice with the same chunking (two prefill chunks, then one token per step):
/// once with a recent block for every block (the recent table equal to the block table), once
/// with other block ids and recent blocks handed out and released as the scheduler does
/// (released entries `u32::MAX`, freed ids reused at once). The logits must be identical: only
/// the last `recent_reach` positions are ever read from recent blocks. Needs a pool of at least
/// 2 * blocks(toks) blocks and as many recent blocks.
pub fn check_released_recent_blocks<B: Backend>(m: &mut DeepseekV4<B>, toks: &[u32]) {
    let layout = m.kv_layout();
    let (bs, reach) = (layout.block_size, layout.recent_reach);
    let n = toks.len();
    let blocks = n.div_ceil(bs);
    assert!(
        blocks >= 3,
        "{n} tokens: too short to release a recent block"
    );
    assert!(layout.num_blocks >= 2 * blocks && layout.recent_blocks >= 2 * blocks);
    let steps: Vec<(usize, usize)> = {
        let mut v = vec![(0, n / 3), (n / 3, 2 * n / 3)];
        v.extend((2 * n / 3..n).map(|p| (p, p + 1)));
        v
    };
    let plain: Vec<u32> = (0..blocks as u32).collect();
    let moved: Vec<u32> = (blocks as u32..2 * blocks as u32).rev().collect();
    let mut free: Vec<u32> = (0..layout.recent_blocks as u32).collect();
    let mut recent = vec![u32::MAX; blocks];
    let mut released = 0;
    for (k, &(start, end)) in steps.iter().enumerate() {
        let first = start.saturating_sub(reach) / bs;
        for (i, r) in recent.iter_mut().enumerate() {
            if i < first && *r != u32::MAX {
                free.push(std::mem::replace(r, u32::MAX));
                released += 1;
            }
        }
        for r in recent.iter_mut().take((end - 1) / bs + 1).skip(first) {
            if *r == u32::MAX {
                *r = free.pop().unwrap();
            }
        }
        let mut a = seq(1, start, &toks[start..end], &plain, LogitsWanted::All);
        a.recent_table = plain.clone();
        let mut b = seq(2, start, &toks[start..end], &moved, LogitsWanted::All);
        b.recent_table = recent.clone();
        let want = run(m, vec![a]);
        let got = run(m, vec![b]);
        assert_eq!(got, want, "step {k} (positions {start}..{end})");
    }
    assert!(released >= 1, "no recent block was released");
    m.release(1);
    m.release(2);
}

/// A step's logits: per sequence, per position, per vocabulary entry.
pub type StepLogits = Vec<Vec<Vec<f32>>>;

/// Logits of one sequence's prefill of `toks` (every position), then of one decode step of
/// `next`, over blocks `bt`.
pub fn prefill_then_decode(
    m: &mut dyn ModelRunner,
    toks: &[u32],
    bt: &[u32],
    next: u32,
) -> (StepLogits, StepLogits) {
    let prefill = StepPlan {
        seqs: vec![seq(1, 0, toks, bt, LogitsWanted::All)],
    };
    let decode = StepPlan {
        seqs: vec![seq(1, toks.len(), &[next], bt, LogitsWanted::All)],
    };
    let a = m.step(&prefill).unwrap().logits;
    let b = m.step(&decode).unwrap().logits;
    (a, b)
}

pub fn run<B: Backend>(m: &mut DeepseekV4<B>, seqs: Vec<SeqPlan>) -> Vec<Vec<Vec<f32>>> {
    m.step(&StepPlan { seqs }).unwrap().logits
}

/// Prefills `prompt` in chunks that end at each of `positions` (+ the prompt end), returning
/// the last-token logits of every chunk keyed by position.
pub fn chunked_prefill<B: Backend>(
    m: &mut DeepseekV4<B>,
    id: u64,
    prompt: &[u32],
    bt: &[u32],
    positions: &[usize],
) -> Vec<(usize, Vec<f32>)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut ends: Vec<usize> = positions.iter().map(|p| p + 1).collect();
    ends.push(prompt.len());
    ends.dedup();
    for end in ends {
        if end <= start {
            continue;
        }
        let l = run(
            m,
            vec![seq(id, start, &prompt[start..end], bt, LogitsWanted::Last)],
        );
        out.push((end - 1, l[0][0].clone()));
        start = end;
    }
    out
}
