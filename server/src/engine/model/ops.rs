//! Small f32 row operations shared by the layers (norms, activations, softmax-gated pooling).

/// `weight * x * rsqrt(mean(x^2) + eps)` over each `dim`-wide row of `x`, in place.
pub fn rms_norm_rows(x: &mut [f32], dim: usize, weight: Option<&[f32]>, eps: f32) {
    for row in x.chunks_mut(dim) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        match weight {
            Some(w) => row.iter_mut().zip(w).for_each(|(v, w)| *v = w * (*v * inv)),
            None => row.iter_mut().for_each(|v| *v *= inv),
        }
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// torch's softplus (threshold 20: identity above).
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Indices of the `k` largest values, in descending order. Exact ties go to the lower index
/// (a stable sort); torch.topk's pick among exact ties is unspecified and differs between its
/// cached and uncached paths, so the fixtures are made free of ties at the cut.
pub fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    // Value descending, then index ascending: a total order. The indexer ranks ~context/4
    // rows, so find the k-th value by selection on the values themselves, take everything
    // above it and its ties by index, and sort only those k.
    if k == 0 {
        return Vec::new();
    }
    let order = |&a: &usize, &b: &usize| values[b].total_cmp(&values[a]).then(a.cmp(&b));
    if k >= values.len() {
        let mut idx: Vec<usize> = (0..values.len()).collect();
        idx.sort_by(order);
        return idx;
    }
    let mut scratch = values.to_vec();
    let kth = *scratch
        .select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a))
        .1;
    let mut idx: Vec<usize> = Vec::with_capacity(k);
    idx.extend((0..values.len()).filter(|&i| values[i].total_cmp(&kth).is_gt()));
    let ties = (0..values.len()).filter(|&i| values[i].total_cmp(&kth).is_eq());
    idx.extend(ties.take(k - idx.len()));
    idx.sort_by(order);
    idx
}

/// One slot of a softmax-gated pooling: the value row and the gate row (bias included).
pub struct PoolSlot<'a> {
    pub kv: &'a [f32],
    pub gate: &'a [f32],
    pub bias: &'a [f32],
}

/// Per channel: `sum_s softmax_s(gate_s + bias_s) * kv_s` (the compressor's window pooling).
pub fn gated_pool(slots: &[PoolSlot<'_>], dim: usize) -> Vec<f32> {
    let mut out = vec![0f32; dim];
    let mut logits = vec![0f32; slots.len()];
    for (c, o) in out.iter_mut().enumerate() {
        let mut max = f32::NEG_INFINITY;
        for (s, slot) in slots.iter().enumerate() {
            logits[s] = slot.gate[c] + slot.bias[c];
            max = max.max(logits[s]);
        }
        let mut denom = 0f32;
        for l in logits.iter_mut() {
            *l = (*l - max).exp();
            denom += *l;
        }
        let mut acc = 0f32;
        for (s, slot) in slots.iter().enumerate() {
            acc += slot.kv[c] * (logits[s] / denom);
        }
        *o = acc;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_equals_a_full_stable_sort_with_ties() {
        // Many exact ties (values repeat every 7) and k across the edges.
        let values: Vec<f32> = (0..1000).map(|i| ((i * 37) % 7) as f32 - 3.0).collect();
        let mut full: Vec<usize> = (0..values.len()).collect();
        full.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
        for k in [0, 1, 5, 142, 143, 512, 999, 1000, 2000] {
            let want: Vec<usize> = full.iter().copied().take(k).collect();
            assert_eq!(top_k_indices(&values, k), want, "k = {k}");
        }
    }
}
