//! Manifold-constrained hyper-connections (mHC): `hc_mult` residual streams mixed around each
//! sub-layer, the mixing matrix projected onto doubly-stochastic matrices by Sinkhorn-Knopp.

/// Learned parameters of one hyper-connection site (`hc_attn_*` or `hc_ffn_*`).
#[derive(Debug, Clone)]
pub struct HyperConnection {
    /// `[(2 + hc) * hc, hc * hidden]`.
    pub fn_: Vec<f32>,
    /// `[(2 + hc) * hc]`.
    pub base: Vec<f32>,
    /// `[3]`: scales of the pre / post / comb logits.
    pub scale: [f32; 3],
}

/// The mixing a site applies to one token.
#[derive(Debug, Clone, PartialEq)]
pub struct HcMix {
    /// Collapse weights of the streams into the sub-layer input.
    pub pre: Vec<f32>,
    /// Placement weights of the sub-layer output into each stream (range [0, 2]).
    pub post: Vec<f32>,
    /// `[hc, hc]` row-major; new stream `k` = `post[k] * out + sum_j comb[j, k] * old[j]`.
    pub comb: Vec<f32>,
}

/// `x * rsqrt(mean(x^2) + eps)` without a weight, over the whole slice.
pub fn unweighted_rms_scale(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Row softmax + eps, then column normalisation, then `iters - 1` rounds of (row, column).
pub fn sinkhorn(logits: &[f32], hc: usize, iters: usize, eps: f32) -> Vec<f32> {
    let mut m = vec![0f32; hc * hc];
    for r in 0..hc {
        let row = &logits[r * hc..(r + 1) * hc];
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        for c in 0..hc {
            m[r * hc + c] = exps[c] / sum + eps;
        }
    }
    let normalise_cols = |m: &mut [f32]| {
        for c in 0..hc {
            let s: f32 = (0..hc).map(|r| m[r * hc + c]).sum::<f32>() + eps;
            for r in 0..hc {
                m[r * hc + c] /= s;
            }
        }
    };
    let normalise_rows = |m: &mut [f32]| {
        for r in 0..hc {
            let s: f32 = m[r * hc..(r + 1) * hc].iter().sum::<f32>() + eps;
            for v in &mut m[r * hc..(r + 1) * hc] {
                *v /= s;
            }
        }
    };
    normalise_cols(&mut m);
    for _ in 1..iters {
        normalise_rows(&mut m);
        normalise_cols(&mut m);
    }
    m
}

impl HyperConnection {
    /// Mixing coefficients for one token's streams (`[hc * hidden]`, stream-major).
    pub fn mix(
        &self,
        streams: &[f32],
        hc: usize,
        iters: usize,
        hc_eps: f32,
        norm_eps: f32,
    ) -> HcMix {
        let inv = unweighted_rms_scale(streams, norm_eps);
        let flat: Vec<f32> = streams.iter().map(|v| v * inv).collect();
        let width = streams.len();
        let mixes: Vec<f32> = (0..(2 + hc) * hc)
            .map(|o| crate::backend::cpu::dot(&flat, &self.fn_[o * width..(o + 1) * width]))
            .collect();
        self.finish(&mixes, hc, iters, hc_eps)
    }

    /// [`Self::mix`] of `n` tokens' streams at once (`[n, hc * hidden]`), parallel over tokens
    /// and over the mixing projections' outputs, so one decoding token also uses every core.
    /// Same values as calling [`Self::mix`] per token.
    pub fn mix_rows(
        &self,
        streams: &[f32],
        n: usize,
        hc: usize,
        iters: usize,
        hc_eps: f32,
        norm_eps: f32,
    ) -> Vec<HcMix> {
        use rayon::prelude::*;
        let width = streams.len().checked_div(n).unwrap_or(0);
        if width == 0 {
            return Vec::new();
        }
        let flats: Vec<Vec<f32>> = streams
            .par_chunks(width)
            .map(|t| {
                let inv = unweighted_rms_scale(t, norm_eps);
                t.iter().map(|v| v * inv).collect()
            })
            .collect();
        let outs = (2 + hc) * hc;
        let mixes: Vec<f32> = (0..n * outs)
            .into_par_iter()
            .map(|i| {
                let o = i % outs;
                crate::backend::cpu::dot(&flats[i / outs], &self.fn_[o * width..(o + 1) * width])
            })
            .collect();
        mixes
            .chunks(outs)
            .map(|m| self.finish(m, hc, iters, hc_eps))
            .collect()
    }

    /// Pre / post / comb from the `(2 + hc) * hc` projections of the normed streams.
    fn finish(&self, mixes: &[f32], hc: usize, iters: usize, hc_eps: f32) -> HcMix {
        let pre = (0..hc)
            .map(|i| sigmoid(mixes[i] * self.scale[0] + self.base[i]) + hc_eps)
            .collect();
        let post = (0..hc)
            .map(|i| 2.0 * sigmoid(mixes[hc + i] * self.scale[1] + self.base[hc + i]))
            .collect();
        let logits: Vec<f32> = (0..hc * hc)
            .map(|i| mixes[2 * hc + i] * self.scale[2] + self.base[2 * hc + i])
            .collect();
        let comb = sinkhorn(&logits, hc, iters, hc_eps);
        HcMix { pre, post, comb }
    }
}

/// `sum_k pre[k] * stream_k` for one token.
pub fn collapse(streams: &[f32], pre: &[f32], hidden: usize) -> Vec<f32> {
    let mut out = vec![0f32; hidden];
    for (k, p) in pre.iter().enumerate() {
        for (o, s) in out.iter_mut().zip(&streams[k * hidden..(k + 1) * hidden]) {
            *o += p * s;
        }
    }
    out
}

/// Applies a site's mixing after its sub-layer: `new[k] = post[k] * out + sum_j comb[j,k] * old[j]`.
pub fn expand(streams: &mut [f32], mix: &HcMix, out: &[f32], hidden: usize) {
    use rayon::prelude::*;
    let hc = mix.post.len();
    let old = streams.to_vec();
    // Streams in parallel (one decoding token is 4 x hidden of work); each element is computed
    // in the same order as a sequential pass.
    streams
        .par_chunks_mut(hidden)
        .enumerate()
        .take(hc)
        .for_each(|(k, dst)| {
            for (d, o) in dst.iter_mut().zip(out) {
                *d = mix.post[k] * o;
            }
            for j in 0..hc {
                let c = mix.comb[j * hc + k];
                for (d, s) in dst.iter_mut().zip(&old[j * hidden..(j + 1) * hidden]) {
                    *d += c * s;
                }
            }
        });
}

/// The final collapse before the model norm (`hc_head_*`).
#[derive(Debug, Clone)]
pub struct HyperHead {
    /// `[hc, hc * hidden]`.
    pub fn_: Vec<f32>,
    pub base: Vec<f32>,
    pub scale: f32,
}

impl HyperHead {
    pub fn collapse(&self, streams: &[f32], hc: usize, hc_eps: f32, norm_eps: f32) -> Vec<f32> {
        let hidden = streams.len() / hc;
        let inv = unweighted_rms_scale(streams, norm_eps);
        let flat: Vec<f32> = streams.iter().map(|v| v * inv).collect();
        let width = streams.len();
        let pre: Vec<f32> = (0..hc)
            .map(|i| {
                let m = crate::backend::cpu::dot(&flat, &self.fn_[i * width..(i + 1) * width]);
                sigmoid(m * self.scale + self.base[i]) + hc_eps
            })
            .collect();
        collapse(streams, &pre, hidden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_rows_equals_mix_per_token() {
        let (hc, hidden, n) = (4, 24, 3);
        let width = hc * hidden;
        let site = HyperConnection {
            fn_: (0..(2 + hc) * hc * width)
                .map(|i| ((i * 13) % 17) as f32 * 0.01 - 0.08)
                .collect(),
            base: (0..(2 + hc) * hc).map(|i| i as f32 * 0.1 - 1.0).collect(),
            scale: [0.5, 0.7, 1.3],
        };
        let streams: Vec<f32> = (0..n * width)
            .map(|i| ((i * 7) % 11) as f32 * 0.3 - 1.5)
            .collect();
        let rows = site.mix_rows(&streams, n, hc, 20, 1e-6, 1e-6);
        for (t, got) in rows.iter().enumerate() {
            let want = site.mix(&streams[t * width..(t + 1) * width], hc, 20, 1e-6, 1e-6);
            assert_eq!(*got, want);
        }
    }

    #[test]
    fn sinkhorn_is_doubly_stochastic() {
        let logits: Vec<f32> = (0..16).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
        let m = sinkhorn(&logits, 4, 20, 1e-6);
        for i in 0..4 {
            let row: f32 = m[i * 4..i * 4 + 4].iter().sum();
            let col: f32 = (0..4).map(|r| m[r * 4 + i]).sum();
            assert!(
                (row - 1.0).abs() < 1e-3 && (col - 1.0).abs() < 1e-4,
                "{row} {col}"
            );
        }
    }
}
