//! CPU references in f64 for every kernel, written straight from the format definitions
//! (MODEL.md) and transformers' DeepSeek-V4 code, independent of the CUDA sources.

use crate::formats::{bf16_to_f32, e2m1_at, e4m3_to_f32, e8m0_to_f64, f32_to_bf16};

/// out[m, n] = sum_k x[m, k] * e4m3(W[n, k]) * 2^(S[n/128, k/128] - 127).
pub fn fp8_gemv(w: &[u8], s: &[u8], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let kb = k.div_ceil(128);
    let table: Vec<f64> = (0..=255u8).map(|b| f64::from(e4m3_to_f32(b))).collect();
    let mut out = vec![0.0f64; m * n];
    let mut dec = vec![0.0f64; k];
    for row in 0..n {
        let wrow = &w[row * k..(row + 1) * k];
        for (blk, chunk) in wrow.chunks(128).enumerate() {
            let sc = e8m0_to_f64(s[(row / 128) * kb + blk]);
            for (j, &b) in chunk.iter().enumerate() {
                dec[blk * 128 + j] = table[usize::from(b)] * sc;
            }
        }
        for mi in 0..m {
            let xr = &x[mi * k..(mi + 1) * k];
            out[mi * n + row] = dec.iter().zip(xr).map(|(a, &b)| a * f64::from(b)).sum();
        }
    }
    out
}

/// Dot of FP4 row `row` of an expert tensor ([rows, kdim/2] bytes + [rows, kdim/32] scales).
fn fp4_row_dot(w: &[u8], s: &[u8], row: usize, kdim: usize, x: &[f64]) -> f64 {
    let packed = &w[row * kdim / 2..(row + 1) * kdim / 2];
    let sc = &s[row * kdim / 32..(row + 1) * kdim / 32];
    (0..kdim / 32)
        .map(|blk| {
            let part: f64 = (blk * 32..(blk + 1) * 32)
                .map(|j| f64::from(e2m1_at(packed, j)) * x[j])
                .sum();
            part * e8m0_to_f64(sc[blk])
        })
        .sum()
}

/// Shapes of one routed-expert layer: `experts` experts, w1/w3 [inter, hidden], w2 [hidden, inter].
#[derive(Clone, Copy, Debug)]
pub struct MoeShape {
    pub experts: usize,
    pub hidden: usize,
    pub inter: usize,
    pub topk: usize,
}

/// Borrowed FP4 expert tensors (all experts, the checkpoint's layout).
pub struct Fp4Experts<'a> {
    pub w1: &'a [u8],
    pub s1: &'a [u8],
    pub w3: &'a [u8],
    pub s3: &'a [u8],
    pub w2: &'a [u8],
    pub s2: &'a [u8],
}

/// transformers' DeepseekV4Experts for the selected experts: returns (h [T*topk, inter],
/// out [T, hidden]) with h = silu(min(g, limit)) * clamp(u, -limit, limit).
pub fn fp4_moe(
    sh: MoeShape,
    ex: &Fp4Experts<'_>,
    x: &[f32],
    ids: &[i32],
    weights: &[f32],
    limit: f32,
) -> (Vec<f64>, Vec<f64>) {
    let t_count = ids.len() / sh.topk;
    let (hid, inter) = (sh.hidden, sh.inter);
    let mut h = vec![0.0f64; ids.len() * inter];
    let mut out = vec![0.0f64; t_count * hid];
    let lim = f64::from(limit);
    for (p, &e) in ids.iter().enumerate() {
        let Ok(e) = usize::try_from(e) else { continue };
        if e >= sh.experts {
            continue;
        }
        let t = p / sh.topk;
        let xt: Vec<f64> = x[t * hid..(t + 1) * hid]
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        for i in 0..inter {
            let g = fp4_row_dot(ex.w1, ex.s1, e * inter + i, hid, &xt).min(lim);
            let u = fp4_row_dot(ex.w3, ex.s3, e * inter + i, hid, &xt).clamp(-lim, lim);
            h[p * inter + i] = g / (1.0 + (-g).exp()) * u;
        }
        let hp = &h[p * inter..(p + 1) * inter];
        for n in 0..hid {
            out[t * hid + n] +=
                f64::from(weights[p]) * fp4_row_dot(ex.w2, ex.s2, e * hid + n, inter, hp);
        }
    }
    (h, out)
}

/// transformers' DeepseekV4RMSNorm on bf16 rows, WITHOUT its intermediate bf16 roundings (the
/// exact value the kernel approximates).
pub fn rmsnorm(x: &[u16], w: &[u16], rows: usize, d: usize, eps: f64) -> Vec<f64> {
    let mut out = vec![0.0; rows * d];
    for r in 0..rows {
        let xr: Vec<f64> = x[r * d..(r + 1) * d]
            .iter()
            .map(|&v| f64::from(bf16_to_f32(v)))
            .collect();
        let ms = xr.iter().map(|v| v * v).sum::<f64>() / d as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for j in 0..d {
            out[r * d + j] = f64::from(bf16_to_f32(w[j])) * xr[j] * inv;
        }
    }
    out
}

/// Interleaved RoPE on the trailing `rope_dim` channels of each [D]-row of x [T, H, D] (bf16),
/// as transformers does it: f32 angle, cos/sin * mscale rounded to bf16, rotation in f64, result
/// NOT rounded. Returns all channels (the nope part unchanged).
#[allow(clippy::too_many_arguments)]
pub fn rope_interleaved(
    x: &[u16],
    positions: &[i32],
    inv_freq: &[f32],
    h: usize,
    d: usize,
    rope_dim: usize,
    mscale: f32,
    inverse: bool,
) -> Vec<f64> {
    let mut out: Vec<f64> = x.iter().map(|&v| f64::from(bf16_to_f32(v))).collect();
    for (t, &pos) in positions.iter().enumerate() {
        for hd in 0..h {
            let base = (t * h + hd) * d + (d - rope_dim);
            for (i, &f) in inv_freq.iter().enumerate().take(rope_dim / 2) {
                let ang = f64::from(pos as f32 * f);
                let c = f64::from(bf16_to_f32(f32_to_bf16((ang.cos() as f32) * mscale)));
                let mut s = f64::from(bf16_to_f32(f32_to_bf16((ang.sin() as f32) * mscale)));
                if inverse {
                    s = -s;
                }
                let x0 = out[base + 2 * i];
                let x1 = out[base + 2 * i + 1];
                out[base + 2 * i] = x0 * c - x1 * s;
                out[base + 2 * i + 1] = x1 * c + x0 * s;
            }
        }
    }
    out
}

/// Top k of a row: larger value first, ties -> smaller index first (torch.argmax order).
pub fn topk(row: &[f32], k: usize) -> Vec<(f32, i32)> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.into_iter()
        .take(k)
        .map(|i| (row[i], i32::try_from(i).unwrap_or(i32::MAX)))
        .collect()
}

/// ||a - b|| / ||b||, with NaN anywhere counted as a failure (returns +inf).
pub fn rel_err(out: &[f64], reference: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        if !o.is_finite() || !r.is_finite() {
            return f64::INFINITY;
        }
        num += (o - r) * (o - r);
        den += r * r;
    }
    if out.len() != reference.len() {
        return f64::INFINITY;
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_gemv_hand_example() {
        // One 1x128 row: all weights 1.0 (0x38) with scale 2^-1, x = 2 everywhere: 128 * 1.
        let w = vec![0x38u8; 128];
        let s = vec![126u8];
        let x = vec![2.0f32; 128];
        assert_eq!(fp8_gemv(&w, &s, &x, 1, 1, 128), vec![128.0]);
    }

    #[test]
    fn fp4_moe_swiglu_clips() {
        // 1 expert, hidden = inter = 32, scales 1. w1 = all 6.0 (nibble 7), w3 = all -6.0
        // (nibble 15), w2 = all 1.0 (nibble 2); x = 1: g = 192 clips to 10, u = -192 to -10.
        let sh = MoeShape {
            experts: 1,
            hidden: 32,
            inter: 32,
            topk: 1,
        };
        let (w1, w3, w2) = (
            vec![0x77u8; 32 * 16],
            vec![0xFFu8; 32 * 16],
            vec![0x22u8; 32 * 16],
        );
        let sc = vec![127u8; 32];
        let ex = Fp4Experts {
            w1: &w1,
            s1: &sc,
            w3: &w3,
            s3: &sc,
            w2: &w2,
            s2: &sc,
        };
        let (h, out) = fp4_moe(sh, &ex, &[1.0; 32], &[0], &[0.5], 10.0);
        let hv = 10.0 / (1.0 + (-10.0f64).exp()) * -10.0;
        assert!(h.iter().all(|&v| (v - hv).abs() < 1e-12));
        assert!(out.iter().all(|&v| (v - 0.5 * 32.0 * hv).abs() < 1e-9));
    }

    #[test]
    fn topk_orders_ties_by_index() {
        let row = [1.0f32, 3.0, 3.0, -1.0, 2.0];
        assert_eq!(topk(&row, 3), vec![(3.0, 1), (3.0, 2), (2.0, 4)]);
    }

    #[test]
    fn rope_quarter_turn() {
        // One pair, inv_freq = pi/2 at pos 1 -> (x0, x1) = (1, 0) rotates to (cos, sin).
        let x = [f32_to_bf16(1.0), f32_to_bf16(0.0)];
        let out = rope_interleaved(
            &x,
            &[1],
            &[std::f32::consts::FRAC_PI_2],
            1,
            2,
            2,
            1.0,
            false,
        );
        assert!(
            out[0].abs() < 1e-2 && (out[1] - 1.0).abs() < 1e-2,
            "{out:?}"
        );
    }

    #[test]
    fn rel_err_flags_nan() {
        assert!(rel_err(&[f64::NAN], &[1.0]).is_infinite());
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    }
}
