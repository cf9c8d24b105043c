//! Interleaved rotary embedding on the trailing `rope_dim` channels of a head, with optional YaRN.
//!
//! Arithmetic mirrors transformers' f32 computation (inverse frequencies in f32, `freq = inv *
//! pos` rounded to f32) so positions far into the sequence stay within an ulp of the reference.

use super::config::RopeParams;

#[derive(Debug, Clone)]
pub struct RopeTable {
    /// One inverse frequency per rotated pair.
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 for plain RoPE).
    pub attention_factor: f32,
}

impl RopeTable {
    /// `rope_dim` = rotated channels (`qk_rope_head_dim`).
    pub fn new(params: &RopeParams, rope_dim: usize) -> Self {
        let half = rope_dim / 2;
        let dim_f = rope_dim as f32;
        // pos_freqs = base ** (arange(0, dim, 2) / dim), all f32 as in torch.
        let base = params.theta as f32;
        let pos_freqs: Vec<f32> = (0..half)
            .map(|i| base.powf((2 * i) as f32 / dim_f))
            .collect();
        let Some(y) = &params.yarn else {
            return Self {
                inv_freq: pos_freqs.iter().map(|p| 1.0 / p).collect(),
                attention_factor: 1.0,
            };
        };
        let factor = y.factor as f32;
        // Correction range in f64 like Python's math; transformers' V4 path always truncates
        // (its `truncate` lookup reads the top-level nested dict, which never has the key).
        let corr = |rot: f64| {
            (rope_dim as f64
                * (y.original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI)).ln())
                / (2.0 * params.theta.ln())
        };
        let low = corr(y.beta_fast).floor().max(0.0);
        let high = corr(y.beta_slow).ceil().min(rope_dim as f64 - 1.0);
        let (low, mut high) = (low, high);
        if low == high {
            high += 0.001;
        }
        let inv_freq = (0..half)
            .map(|i| {
                let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                let extrap_factor = 1.0 - ramp;
                let extrap = 1.0 / pos_freqs[i];
                let interp = 1.0 / (factor * pos_freqs[i]);
                interp * (1.0 - extrap_factor) + extrap * extrap_factor
            })
            .collect();
        Self {
            inv_freq,
            attention_factor: y.attention_factor as f32,
        }
    }

    pub fn rope_dim(&self) -> usize {
        self.inv_freq.len() * 2
    }

    /// cos and sin for one position, one entry per pair.
    pub fn cos_sin(&self, pos: usize) -> (Vec<f32>, Vec<f32>) {
        let p = pos as f32;
        self.inv_freq
            .iter()
            .map(|&f| {
                let a = (f * p) as f64;
                (
                    (a.cos() as f32) * self.attention_factor,
                    (a.sin() as f32) * self.attention_factor,
                )
            })
            .unzip()
    }

    /// Rotates the trailing `rope_dim` channels of every `head_dim`-wide head in `x` (in place).
    /// `inverse` applies the conjugate rotation (`-sin`), used to undo RoPE on attention output.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, pos: usize, inverse: bool) {
        let (cos, sin) = self.cos_sin(pos);
        apply_with(x, head_dim, &cos, &sin, inverse);
    }
}

/// Interleaved rotation: pair `(x[2j], x[2j+1])` of the rope slice turns by angle `j`.
pub fn apply_with(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], inverse: bool) {
    let rd = cos.len() * 2;
    for head in x.chunks_mut(head_dim) {
        let rope = &mut head[head_dim - rd..];
        for j in 0..cos.len() {
            let (c, s) = (cos[j], if inverse { -sin[j] } else { sin[j] });
            let (x0, x1) = (rope[2 * j], rope[2 * j + 1]);
            rope[2 * j] = x0 * c + (-x1) * s;
            rope[2 * j + 1] = x1 * c + x0 * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::config::YarnParams;

    #[test]
    fn plain_rope_frequencies() {
        let t = RopeTable::new(
            &RopeParams {
                theta: 10000.0,
                yarn: None,
            },
            64,
        );
        assert_eq!(t.inv_freq[0], 1.0);
        assert!((t.inv_freq[1] - 0.749_894_2).abs() < 1e-6);
    }

    #[test]
    fn yarn_matches_transformers_flash_values() {
        // Printed by transformers 5.17 for the V4-Flash compress rope (theta 160000, factor 16,
        // original 65536, betas 32/1, 64 rotary dims).
        let t = RopeTable::new(
            &RopeParams {
                theta: 160000.0,
                yarn: Some(YarnParams {
                    factor: 16.0,
                    original_max_position_embeddings: 65536.0,
                    beta_fast: 32.0,
                    beta_slow: 1.0,
                    attention_factor: 1.0,
                }),
            },
            64,
        );
        let expect_head = [1.0000f32, 0.6877, 0.4729, 0.3252];
        for (a, b) in t.inv_freq.iter().zip(expect_head) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        let expect_tail = [1.7469e-06f32, 1.2013e-06, 8.2607e-07, 5.6805e-07];
        for (a, b) in t.inv_freq[28..].iter().zip(expect_tail) {
            assert!((a - b).abs() / b < 1e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn inverse_undoes_rotation() {
        let t = RopeTable::new(
            &RopeParams {
                theta: 10000.0,
                yarn: None,
            },
            8,
        );
        let orig: Vec<f32> = (0..24).map(|i| i as f32 * 0.1 - 1.0).collect();
        let mut x = orig.clone();
        t.apply(&mut x, 12, 37, false);
        assert_ne!(x, orig);
        // The leading (nope) channels are untouched.
        assert_eq!(&x[..4], &orig[..4]);
        t.apply(&mut x, 12, 37, true);
        for (a, b) in x.iter().zip(&orig) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
