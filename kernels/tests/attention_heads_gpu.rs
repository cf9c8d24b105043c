//! GPU checks of the head-grouped split-KV attention (`paged_attention_heads`) against the
//! per-head kernel (`paged_attention`, same workspace and combine pass) and an f64 host reference
//! (softmax with the head's sink in the denominator), at DeepSeek-V4-Flash's shapes: 64 heads
//! (TP=1) and 32 (TP=2) of 512 over one shared key row per key, several tokens with different
//! key counts in one launch, one split and the split count `attention_splits` picks, and slots
//! without a key (offset -1). Skips (passes with a SKIP line) where there is no GPU.

use dspark_kernels::launch::attention::{check_attention_heads, ATTENTION_HEAD_GROUP};
use dspark_kernels::launch::layer_ops::RopeF32;
use dspark_kernels::{
    attention_splits, attention_workspace_floats, InverseRope, KernelError, KvRowFormat,
    PagedAttention,
};

mod common;
use common::{gpu, worst_row_err, Gpu, Rng};

/// Bounds per (token, head) row: max |diff| / max |reference|.
const TOL_VS_KERNEL: f64 = 1e-5;
const TOL_VS_F64: f64 = 1e-4;

/// One launch's inputs: a pool of `rows` key rows (at offsets that are not all multiples of
/// the row width), per-token key lists, queries and sinks.
struct Case {
    heads: usize,
    hd: usize,
    pool: Vec<f32>,
    q: Vec<f32>,
    sinks: Vec<f32>,
    offsets: Vec<i64>,
    starts: Vec<i32>,
}

impl Case {
    /// Every `hole`-th key on average is a slot without a key (0: none).
    fn new(rng: &mut Rng, heads: usize, hd: usize, counts: &[usize], hole: usize) -> Self {
        let rows = 9000;
        let pool = rng.signed_vec(rows * hd + 7, 1.0);
        let mut offsets = Vec::new();
        let mut starts = vec![0i32];
        for &c in counts {
            for _ in 0..c {
                let masked = hole > 0 && rng.below(hole) == 0;
                let off = rng.below(rows) * hd + 7 * rng.below(2);
                offsets.push(if masked { -1 } else { off as i64 });
            }
            starts.push(offsets.len() as i32);
        }
        if offsets.is_empty() {
            offsets.push(-1);
        }
        let q = rng.signed_vec(counts.len() * heads * hd, 1.0);
        let sinks = rng.signed_vec(heads, 2.0);
        Self {
            heads,
            hd,
            pool,
            q,
            sinks,
            offsets,
            starts,
        }
    }

    fn tokens(&self) -> usize {
        self.starts.len() - 1
    }

    /// f64 attention of every (token, head): softmax over the token's keys and the sink.
    fn reference(&self, scale: f32) -> Vec<f64> {
        let (heads, hd) = (self.heads, self.hd);
        let mut out = vec![0f64; self.tokens() * heads * hd];
        for t in 0..self.tokens() {
            let keys: Vec<usize> = self.offsets
                [self.starts[t] as usize..self.starts[t + 1] as usize]
                .iter()
                .filter(|&&o| o >= 0)
                .map(|&o| o as usize)
                .collect();
            for h in 0..heads {
                let qh = &self.q[(t * heads + h) * hd..][..hd];
                let logits: Vec<f64> = keys
                    .iter()
                    .map(|&o| {
                        let dot: f64 = qh
                            .iter()
                            .zip(&self.pool[o..o + hd])
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum();
                        dot * f64::from(scale)
                    })
                    .collect();
                let sink = f64::from(self.sinks[h]);
                let mx = logits.iter().copied().fold(sink, f64::max);
                let mut den = (sink - mx).exp();
                let o = &mut out[(t * heads + h) * hd..][..hd];
                for (&k, &lg) in keys.iter().zip(&logits) {
                    let p = (lg - mx).exp();
                    den += p;
                    for (d, &v) in o.iter_mut().zip(&self.pool[k..k + hd]) {
                        *d += p * f64::from(v);
                    }
                }
                o.iter_mut().for_each(|d| *d /= den);
            }
        }
        out
    }
}

/// Runs one attention path over `c` and returns its output.
fn run(g: &Gpu, c: &Case, splits: usize, scale: f32, heads_path: bool) -> Vec<f32> {
    run_with(g, c, splits, scale, heads_path, None)
}

/// [`run`], the merge also undoing RoPE where `inverse_rope` says.
fn run_with(
    g: &Gpu,
    c: &Case,
    splits: usize,
    scale: f32,
    heads_path: bool,
    inverse_rope: Option<InverseRope>,
) -> Vec<f32> {
    run_merged_twice(g, c, splits, scale, heads_path, inverse_rope).0
}

/// [`run_with`], then the general merge again over the same split records: (the path's
/// output, the general merge's).
fn run_merged_twice(
    g: &Gpu,
    c: &Case,
    splits: usize,
    scale: f32,
    heads_path: bool,
    inverse_rope: Option<InverseRope>,
) -> (Vec<f32>, Vec<f32>) {
    let tokens = c.tokens();
    let (pool, q, sinks) = (g.up(&c.pool), g.up(&c.q), g.up(&c.sinks));
    let (offsets, starts) = (g.up(&c.offsets), g.up(&c.starts));
    let out = g.up(&vec![f32::NAN; tokens * c.heads * c.hd]);
    let ws = g.up(&vec![
        f32::NAN;
        attention_workspace_floats(
            tokens, c.heads, c.hd, splits
        )
    ]);
    let a = PagedAttention {
        pool: g.ptr(&pool),
        q: g.ptr(&q),
        key_offsets: g.ptr(&offsets),
        key_starts: g.ptr(&starts),
        sinks: g.ptr(&sinks),
        out: g.ptr(&out),
        workspace: g.ptr(&ws),
        tokens,
        heads: c.heads,
        head_dim: c.hd,
        splits,
        scale,
        format: KvRowFormat::F32,
        inverse_rope,
        query_norm_eps: None,
        separate_merge: false,
        out_f16: false,
    };
    // SAFETY: every buffer holds the shape `a` names; every key offset leaves hd floats in the
    // pool.
    unsafe {
        if heads_path {
            g.k.paged_attention_heads(&g.s, &a)
        } else {
            g.k.paged_attention(&g.s, &a)
        }
    }
    .unwrap();
    let first = g.down(&out);
    // SAFETY: as above; pass 1 wrote every split record of the workspace.
    unsafe { g.k.attention_merge(&g.s, &a, true) }.unwrap();
    (first, g.down(&out))
}

fn check(g: &Gpu, rng: &mut Rng, heads: usize, hd: usize, counts: &[usize], hole: usize) {
    let c = Case::new(rng, heads, hd, counts, hole);
    let scale = 1.0 / (hd as f32).sqrt();
    let max_keys = counts.iter().copied().max().unwrap_or(0);
    let picked = attention_splits(max_keys, counts.len(), heads, g.k.multiprocessors());
    let want = c.reference(scale);
    let mut split_counts = vec![1, picked];
    split_counts.dedup();
    for splits in split_counts {
        let grouped = run(g, &c, splits, scale, true);
        let per_head = run(g, &c, splits, scale, false);
        let per_head64: Vec<f64> = per_head.iter().map(|&v| f64::from(v)).collect();
        let vs_kernel = worst_row_err(&grouped, &per_head64, hd);
        let vs_f64 = worst_row_err(&grouped, &want, hd);
        eprintln!(
            "attention_heads heads={heads} hd={hd} keys={counts:?} holes 1/{hole} \
             splits={splits}: vs paged_attention {vs_kernel:.2e}, vs f64 {vs_f64:.2e}"
        );
        assert!(
            vs_kernel < TOL_VS_KERNEL,
            "heads={heads} keys={counts:?} splits={splits}: vs paged_attention {vs_kernel}"
        );
        assert!(
            vs_f64 < TOL_VS_F64,
            "heads={heads} keys={counts:?} splits={splits}: vs f64 {vs_f64}"
        );
    }
}

#[test]
fn head_grouped_attention_matches_per_head_kernel_and_f64() {
    let Some(g) = gpu("head_grouped_attention_matches_per_head_kernel_and_f64") else {
        return;
    };
    let mut rng = Rng(0x5eed_a77e_u64);
    for heads in [64, 32] {
        // One decoding token per launch, each key count of a V4 layer (window only up to a
        // 1M-token HCA layer's 8192 + 128).
        for keys in [1, 7, 128, 700, 1400, 8320] {
            check(&g, &mut rng, heads, 512, &[keys], 0);
        }
        // A prefill-like launch: tokens with different key counts, some slots without a key.
        check(&g, &mut rng, heads, 512, &[1, 7, 128, 700, 1400, 8320], 0);
        check(&g, &mut rng, heads, 512, &[700, 1, 1400, 7, 128, 0, 700], 5);
        check(&g, &mut rng, heads, 512, &[8320], 3);
    }
    // Small heads and head_dim: lanes' upper dimensions unused, one head group.
    check(&g, &mut rng, 16, 64, &[1, 7, 20, 0, 33], 0);
    check(&g, &mut rng, 16, 64, &[1, 7, 20, 33], 2);
    // Every slot masked: the sink takes everything, the output is zeros.
    check(&g, &mut rng, 16, 64, &[5, 9], 1);
}

/// The merge's inverse RoPE gives the bits of the merge followed by an inverse `rope_f32` launch
/// (what the layer stack ran before), for both attention kernels and several split counts.
/// The merge's inverse RoPE at `positions` (V4's compressed-row theta, attention factor 1.1), with
/// the device tables it points at (alive as long as this value).
struct RopeTables {
    _positions: cudarc::driver::CudaSlice<i32>,
    _inv_freq: cudarc::driver::CudaSlice<f32>,
    inverse: InverseRope,
}

impl RopeTables {
    fn new(g: &Gpu, positions: &[i32], rope_dim: usize) -> Self {
        let inv_freq: Vec<f32> = (0..rope_dim / 2)
            .map(|i| 1.0 / 160000f32.powf((2 * i) as f32 / rope_dim as f32))
            .collect();
        let (positions, inv_freq) = (g.up(positions), g.up(&inv_freq));
        let inverse = InverseRope {
            positions: g.ptr(&positions),
            inv_freq: g.ptr(&inv_freq),
            rope_dim,
            attention_factor: 1.1,
        };
        Self {
            _positions: positions,
            _inv_freq: inv_freq,
            inverse,
        }
    }
}

/// One split's merge (a warp per (token, head) row: prefill chunks) gives the general merge's
/// bits, with and without the inverse RoPE, over tokens with keys, without keys (the sink takes
/// everything) and with every key masked.
#[test]
fn one_split_merge_equals_the_general_merge() {
    let Some(g) = gpu("one_split_merge_equals_the_general_merge") else {
        return;
    };
    let mut rng = Rng(0x0005_1a7e_u64);
    for (heads, hd, rope_dim, counts, hole) in [
        (
            32usize,
            512usize,
            64usize,
            vec![640usize, 0, 128, 7],
            0usize,
        ),
        (64, 512, 64, vec![33, 640], 5),
        (16, 64, 16, vec![5, 40], 1),
    ] {
        let c = Case::new(&mut rng, heads, hd, &counts, hole);
        let positions: Vec<i32> = (0..c.tokens()).map(|t| 4095 + 777 * t as i32).collect();
        let tables = RopeTables::new(&g, &positions, rope_dim);
        let inverse = tables.inverse;
        let scale = 1.0 / (hd as f32).sqrt();
        for rope in [None, Some(inverse)] {
            for heads_path in [true, false] {
                let (one, general) = run_merged_twice(&g, &c, 1, scale, heads_path, rope);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&one),
                    bits(&general),
                    "heads={heads} hd={hd} keys={counts:?} rope={} grouped={heads_path}",
                    rope.is_some()
                );
            }
        }
    }
}

#[test]
fn merge_with_inverse_rope_equals_a_separate_rope_launch() {
    let Some(g) = gpu("merge_with_inverse_rope_equals_a_separate_rope_launch") else {
        return;
    };
    let mut rng = Rng(0x00c0_ffee);
    for (heads, hd, rope_dim, counts) in [
        (64usize, 512usize, 64usize, vec![640usize]),
        (32, 512, 64, vec![128, 192, 7]),
        (16, 64, 16, vec![1, 33, 0]),
    ] {
        let c = Case::new(&mut rng, heads, hd, &counts, 0);
        let tokens = c.tokens();
        let positions: Vec<i32> = (0..tokens).map(|t| 8191 + 1000 * t as i32).collect();
        let tables = RopeTables::new(&g, &positions, rope_dim);
        let inverse = tables.inverse;
        let scale = 1.0 / (hd as f32).sqrt();
        for splits in [1, 3, 40] {
            for heads_path in [true, false] {
                let fused = run_with(&g, &c, splits, scale, heads_path, Some(inverse));
                let plain = g.up(&run(&g, &c, splits, scale, heads_path));
                // SAFETY: `plain` holds tokens x heads x hd; positions and inv_freq as above.
                unsafe {
                    g.k.rope_f32(
                        &g.s,
                        &RopeF32 {
                            x: g.ptr(&plain),
                            positions: inverse.positions,
                            inv_freq: inverse.inv_freq,
                            tokens,
                            heads,
                            head_dim: hd,
                            rope_dim,
                            ld_token: heads * hd,
                            ld_head: hd,
                            attention_factor: inverse.attention_factor,
                            inverse: true,
                        },
                    )
                }
                .unwrap();
                let want = g.down(&plain);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&fused),
                    bits(&want),
                    "heads={heads} hd={hd} keys={counts:?} splits={splits} grouped={heads_path}"
                );
            }
        }
    }
}

#[test]
fn head_grouped_attention_rejects_ungrouped_heads() {
    // heads 4 (or any count not a multiple of the group) is the caller's cue to run
    // paged_attention instead.
    let a = PagedAttention {
        pool: 256,
        q: 256,
        key_offsets: 256,
        key_starts: 256,
        sinks: 256,
        out: 256,
        workspace: 256,
        tokens: 1,
        heads: 4,
        head_dim: 64,
        splits: 1,
        scale: 0.125,
        format: KvRowFormat::F32,
        inverse_rope: None,
        query_norm_eps: None,
        separate_merge: false,
        out_f16: false,
    };
    assert_eq!(ATTENTION_HEAD_GROUP, 16);
    assert!(matches!(
        check_attention_heads(&a),
        Err(KernelError::InvalidLaunch { .. })
    ));
    let Some(g) = gpu("head_grouped_attention_rejects_ungrouped_heads") else {
        return;
    };
    // SAFETY: rejected before launch, no pointer is read.
    assert!(matches!(
        unsafe { g.k.paged_attention_heads(&g.s, &a) },
        Err(KernelError::InvalidLaunch { .. })
    ));
    // The tiny shape still runs through the per-head kernel, against f64.
    let mut rng = Rng(7);
    let c = Case::new(&mut rng, 4, 64, &[1, 7, 20], 3);
    let scale = 0.125;
    let got = run(&g, &c, 2, scale, false);
    let err = worst_row_err(&got, &c.reference(scale), 64);
    assert!(err < TOL_VS_F64, "tiny per-head: vs f64 {err}");
}
