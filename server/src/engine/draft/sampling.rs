//! Turning logits into the distribution a request samples from (temperature, top-k, top-p),
//! and drawing from it with the request's own seeded generator.
//!
//! The same transform is applied to the target's logits (p) and to the draft's (q), so that
//! rejection sampling compares like with like and its output follows the target's filtered
//! distribution exactly.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Temperatures below this are greedy (vLLM's `_SAMPLING_EPS`).
pub const SAMPLING_EPS: f32 = 1e-5;

/// A request's sampling settings (OpenAI / vLLM field meanings).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 (or below [`SAMPLING_EPS`]) = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 = off.
    pub top_p: f32,
    /// Keep the `k` most likely tokens; 0 = off (vLLM's -1).
    pub top_k: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
        }
    }
}

impl SamplingParams {
    pub const GREEDY: SamplingParams = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
    };

    pub fn is_greedy(&self) -> bool {
        self.temperature < SAMPLING_EPS
    }
}

/// Index of the largest value (ties: lowest index), as every greedy path in the engine picks.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// The probability distribution `params` samples from: `softmax(top_p(top_k(logits / T)))`.
/// Greedy params give the one-hot distribution of the argmax. Filtered tokens get exactly 0.
pub fn probabilities(logits: &[f32], params: &SamplingParams) -> Vec<f32> {
    let mut probs = vec![0f32; logits.len()];
    if logits.is_empty() {
        return probs;
    }
    if params.is_greedy() {
        probs[argmax(logits) as usize] = 1.0;
        return probs;
    }
    let inv_t = 1.0 / params.temperature;
    let scaled: Vec<f32> = logits.iter().map(|l| l * inv_t).collect();
    // Candidate set in descending order (ties: lower id first), cut by top-k then top-p.
    let mut order: Vec<usize> = (0..scaled.len()).collect();
    order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a]).then(a.cmp(&b)));
    if params.top_k > 0 && params.top_k < order.len() {
        order.truncate(params.top_k);
    }
    let max = scaled[order[0]];
    let exps: Vec<f64> = order
        .iter()
        .map(|&i| ((scaled[i] - max) as f64).exp())
        .collect();
    let total: f64 = exps.iter().sum();
    let mut keep = exps.len();
    if params.top_p < 1.0 {
        // Smallest prefix whose mass reaches top_p (always at least one token).
        let mut acc = 0f64;
        for (n, e) in exps.iter().enumerate() {
            acc += e / total;
            if acc >= params.top_p as f64 {
                keep = n + 1;
                break;
            }
        }
    }
    let kept: f64 = exps[..keep].iter().sum();
    for (&i, e) in order[..keep].iter().zip(&exps) {
        probs[i] = (e / kept) as f32;
    }
    probs
}

/// The per-request random stream. Seeded from the request's `seed` when it has one, so a
/// seeded request reproduces regardless of what else runs in the batch.
#[derive(Debug, Clone)]
pub struct RequestRng {
    rng: ChaCha8Rng,
}

impl RequestRng {
    pub fn seeded(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// A draw from a (not necessarily normalised) non-negative weight vector; `None` when all
    /// weights are zero.
    pub fn categorical(&mut self, weights: &[f32]) -> Option<u32> {
        let total: f64 = weights.iter().map(|&w| w.max(0.0) as f64).sum();
        if total <= 0.0 {
            return None;
        }
        let u = self.uniform() * total;
        let mut acc = 0f64;
        let mut last = None;
        for (i, &w) in weights.iter().enumerate() {
            if w <= 0.0 {
                continue;
            }
            acc += w as f64;
            last = Some(i as u32);
            if u < acc {
                return last;
            }
        }
        // Rounding left u at the very top: the last token with mass.
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_one_hot_argmax() {
        let p = probabilities(&[0.1, 3.0, 3.0, -1.0], &SamplingParams::GREEDY);
        assert_eq!(p, vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn temperature_one_is_softmax() {
        let logits = [1.0f32, 2.0, 0.5];
        let p = probabilities(&logits, &SamplingParams::default());
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        for (pi, l) in p.iter().zip(logits) {
            assert!((*pi as f64 - (l as f64).exp() / z).abs() < 1e-6);
        }
    }

    #[test]
    fn top_k_and_top_p_cut_and_renormalise() {
        // softmax of ln([0.5, 0.3, 0.15, 0.05]) = the same numbers.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let k2 = probabilities(
            &logits,
            &SamplingParams {
                top_k: 2,
                ..Default::default()
            },
        );
        assert!((k2[0] - 0.625).abs() < 1e-6 && (k2[1] - 0.375).abs() < 1e-6);
        assert_eq!((k2[2], k2[3]), (0.0, 0.0));
        // top_p 0.75 keeps 0.5 + 0.3; 0.81 also needs 0.15.
        let p8 = probabilities(
            &logits,
            &SamplingParams {
                top_p: 0.75,
                ..Default::default()
            },
        );
        assert_eq!(p8.iter().filter(|&&x| x > 0.0).count(), 2);
        let p81 = probabilities(
            &logits,
            &SamplingParams {
                top_p: 0.81,
                ..Default::default()
            },
        );
        assert_eq!(p81.iter().filter(|&&x| x > 0.0).count(), 3);
        assert!((p81.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn categorical_never_draws_zero_weight() {
        let mut rng = RequestRng::seeded(7);
        for _ in 0..10_000 {
            let t = rng.categorical(&[0.0, 0.2, 0.0, 0.8]).unwrap();
            assert!(t == 1 || t == 3);
        }
        assert_eq!(rng.categorical(&[0.0, 0.0]), None);
    }
}
