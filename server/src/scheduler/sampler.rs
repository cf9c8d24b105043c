//! Turning one row of logits into the next token under a request's sampling rules.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::request::{SamplingParams, TokenLogprobs};

/// Below this temperature sampling is greedy (avoids dividing by ~0).
const GREEDY_TEMPERATURE: f32 = 1e-5;

/// Chooses the next token. `generated` is how many tokens the sequence already produced
/// (min_tokens masking); `eos` is the model's end-of-sequence id.
pub fn sample(
    logits: &[f32],
    params: &SamplingParams,
    generated: usize,
    eos: u32,
    rng: &mut ChaCha8Rng,
) -> (u32, Option<TokenLogprobs>) {
    let mut l = logits.to_vec();
    for &(t, b) in &params.logit_bias {
        if let Some(x) = l.get_mut(t as usize) {
            *x += b;
        }
    }
    if generated < params.min_tokens {
        for t in params
            .stop_token_ids
            .iter()
            .copied()
            .chain(std::iter::once(eos))
        {
            if let Some(x) = l.get_mut(t as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    let token = if params.temperature < GREEDY_TEMPERATURE {
        argmax(&l)
    } else {
        sample_from(&l, params, rng)
    };
    let logprobs = params.logprobs.map(|k| logprobs_of(logits, token, k));
    (token, logprobs)
}

fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in l.iter().enumerate() {
        // Strictly greater: ties go to the lowest id, so greedy output is reproducible.
        if x > l[best] {
            best = i;
        }
    }
    best as u32
}

/// Candidates examined first for top-p: the nucleus almost always lies within them, which
/// spares sorting the whole vocabulary (a full sort is the fallback).
const NUCLEUS_HEAD: usize = 1024;

/// Best first; equal logits by id, so seeded sampling is reproducible.
fn by_logit_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

fn mass(cand: &[(u32, f32)], max: f32) -> f64 {
    cand.iter().map(|c| ((c.1 - max) as f64).exp()).sum()
}

fn sample_from(l: &[f32], params: &SamplingParams, rng: &mut ChaCha8Rng) -> u32 {
    let inv_t = 1.0 / params.temperature;
    let mut cand: Vec<(u32, f32)> = l
        .iter()
        .enumerate()
        .filter(|(_, x)| x.is_finite())
        .map(|(i, &x)| (i as u32, x * inv_t))
        .collect();
    if cand.is_empty() {
        return argmax(l);
    }
    if params.top_k > 0 && params.top_k < cand.len() {
        cand.select_nth_unstable_by(params.top_k - 1, by_logit_desc);
        cand.truncate(params.top_k);
    }
    let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    if params.top_p < 1.0 {
        let total = mass(&cand, max);
        if cand.len() > NUCLEUS_HEAD {
            cand.select_nth_unstable_by(NUCLEUS_HEAD - 1, by_logit_desc);
            if mass(&cand[..NUCLEUS_HEAD], max) / total >= params.top_p as f64 {
                cand.truncate(NUCLEUS_HEAD);
            }
        }
        cand.sort_unstable_by(by_logit_desc);
        // Smallest prefix whose probability reaches top_p (always at least one token).
        let mut cum = 0.0;
        let mut keep = cand.len();
        for (i, c) in cand.iter().enumerate() {
            cum += ((c.1 - max) as f64).exp() / total;
            if cum >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        cand.truncate(keep);
    }
    let total = mass(&cand, max);
    let u: f64 = rng.random::<f64>() * total;
    let mut cum = 0.0;
    for c in &cand {
        cum += ((c.1 - max) as f64).exp();
        if u < cum {
            return c.0;
        }
    }
    cand[cand.len() - 1].0
}

/// Log-softmax of the raw model logits (vLLM's default: before any sampling transform).
pub(crate) fn logprobs_of(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits
        .iter()
        .map(|&x| ((x - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + max;
    let lp = |t: u32| {
        logits
            .get(t as usize)
            .map_or(f32::NEG_INFINITY, |x| x - lse)
    };
    let mut top = Vec::new();
    if k > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = k.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |a, b| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        });
        idx.truncate(k);
        idx.sort_by(|a, b| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        });
        top = idx.into_iter().map(|t| (t, lp(t))).collect();
    }
    TokenLogprobs {
        logprob: lp(token),
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    #[test]
    fn greedy_bias_and_min_tokens() {
        let logits = [0.0, 5.0, 1.0, 2.0];
        let mut p = SamplingParams::greedy(4);
        // eos = 1 is the argmax and, with min_tokens 0, allowed.
        assert_eq!(sample(&logits, &p, 0, 1, &mut rng(0)).0, 1);
        p.min_tokens = 2;
        assert_eq!(
            sample(&logits, &p, 1, 1, &mut rng(0)).0,
            3,
            "eos masked before min_tokens"
        );
        assert_eq!(sample(&logits, &p, 2, 1, &mut rng(0)).0, 1);
        p.min_tokens = 0;
        p.logit_bias = vec![(2, 10.0)];
        assert_eq!(sample(&logits, &p, 0, 9, &mut rng(0)).0, 2);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            ..Default::default()
        };
        let draw = |seed| {
            let mut r = rng(seed);
            (0..20)
                .map(|_| sample(&logits, &p, 0, 999, &mut r).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // The three largest logits (value 1.8) are ids 6, 13, 20 (lowest ids win the tie order).
        assert!(
            draw(7).iter().all(|t| [6, 13, 20].contains(t)),
            "{:?}",
            draw(7)
        );
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let logits = [10.0, 9.0, -10.0, -10.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        let mut r = rng(1);
        assert!((0..50).all(|_| sample(&logits, &p, 0, 999, &mut r).0 == 0));
    }

    #[test]
    fn top_p_over_a_large_vocabulary() {
        // Flat logits: the nucleus of 0.5 is the lower half of the ids (ties go to low ids),
        // larger than the fast path's head, so the full sort decides.
        let flat = vec![0.0f32; 5000];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        let mut r = rng(3);
        let draws: Vec<u32> = (0..200)
            .map(|_| sample(&flat, &p, 0, 99_999, &mut r).0)
            .collect();
        assert!(draws.iter().all(|&t| t < 2500), "{draws:?}");
        assert!(
            draws.iter().any(|&t| t >= 1024),
            "the nucleus reaches past the head"
        );
        // A peaked distribution is decided inside the head.
        let mut peaked = vec![0.0f32; 5000];
        peaked[4321] = 30.0;
        assert!((0..50).all(|_| sample(&peaked, &p, 0, 99_999, &mut r).0 == 4321));
    }

    #[test]
    fn logprobs_are_log_softmax_of_raw_logits() {
        let logits = [1.0f32, 2.0, 3.0];
        let p = SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy(1)
        };
        let (t, lp) = sample(&logits, &p, 0, 99, &mut rng(0));
        let lp = lp.unwrap();
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        assert_eq!(t, 2);
        assert!((lp.logprob - (3.0f32.exp() / z).ln()).abs() < 1e-5);
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![2, 1]);
        assert!((lp.top[1].1 - (2.0f32.exp() / z).ln()).abs() < 1e-5);
    }
}
