//! GPU checks of split-KV attention with pass 1 on the tensor cores (`paged_attention_heads_tc`,
//! every form: TF32 and f16 MMAs, 16 and 32 heads a block) against the f32 head-grouped kernel (`paged_attention_heads`,
//! same workspace and merge) and an f64 host reference (softmax with the head's sink in the
//! denominator), at DeepSeek-V4-Flash's shapes: 64 heads (TP=1) and 32 (TP=2) of 512 over one
//! shared key row per key, several tokens with different key counts in one launch, one split and
//! the split count `attention_splits` picks, slots without a key (offset -1), sharp logits, BF16
//! rows; and a timing print of every form at prefill and decode shapes. Skips (passes with a SKIP line)
//! where there is no GPU.
//!
//! Bound, per (token, head) row as max |got - want| / max |want| (the CPU emulation
//! kernels/tools/attention_tc_emu.cpp checks the same one): TF32 and f16 both round Q, K = V and
//! P to 10-bit mantissas (unit roundoff u = 2^-11), f32 accumulation. A value is off by up to u, a
//! probability by u from its own rounding and relatively by twice its logit's error; the
//! roundings of a logit's 512 products are independent and of either sign, so that error is about
//! E = u scale sqrt(sum_i (q_i k_i)^2) (the largest over the row's keys). Bound: 4 u + 16 E
//! (8 sigmas of the logit term) + 1e-5 of f32 accumulation; at these inputs (|q|, |k| <= 1) about
//! 5e-3, where the emulation measured 4e-4.

use cudarc::driver::sys::CUevent_flags;
use dspark_kernels::launch::attention::{
    attention_tc_form, check_attention_heads_tc, AttentionTcForm, ATTENTION_TC_HEAD_DIM,
};
use dspark_kernels::launch::layer_ops::{RmsNormF32, RmsNormRopeF32};
use dspark_kernels::{
    attention_splits, attention_workspace_floats, InverseRope, KernelError, KvRowFormat,
    PagedAttention,
};

mod common;
use common::{bf16_bits, gpu, row_errs, time_us, Gpu, Rng};

/// TF32's unit roundoff (round to nearest, 10 explicit mantissa bits), f16's as well: the f16
/// forms keep the same bound.
const TF32_U: f64 = 1.0 / 2048.0;

/// Every form of the tensor-core pass 1: TF32 and f16, 16 and 32 heads a block.
const ALL_FORMS: [AttentionTcForm; 4] = [
    AttentionTcForm::Heads16,
    AttentionTcForm::Heads32,
    AttentionTcForm::F16Heads16,
    AttentionTcForm::F16Heads32,
];

/// One launch's inputs: a pool of key rows (at offsets that are not all multiples of the row's
/// size), per-token key lists, queries and sinks.
struct Case {
    heads: usize,
    hd: usize,
    format: KvRowFormat,
    /// The pool as uploaded: f32 rows, or BF16 records (two values a slot).
    pool: Vec<f32>,
    /// Every row's values as the kernels decode them, by pool offset.
    values: std::collections::HashMap<usize, Vec<f32>>,
    q: Vec<f32>,
    sinks: Vec<f32>,
    offsets: Vec<i64>,
    starts: Vec<i32>,
}

impl Case {
    /// Every `hole`-th key on average is a slot without a key (0: none); queries times `qmag`.
    fn new(
        rng: &mut Rng,
        heads: usize,
        counts: &[usize],
        hole: usize,
        qmag: f32,
        format: KvRowFormat,
    ) -> Self {
        Self::with_layout(rng, heads, counts, hole, qmag, format, false)
    }

    /// As [`Self::new`]; rows `packed` back to back from an 8-byte aligned start, as the pool
    /// stores them (FP8 records alternately 16- and 8-byte aligned: the f16 forms' flat
    /// staging), else an odd number of slots apart (rows at any 4-byte alignment).
    fn with_layout(
        rng: &mut Rng,
        heads: usize,
        counts: &[usize],
        hole: usize,
        qmag: f32,
        format: KvRowFormat,
        packed: bool,
    ) -> Self {
        let (rows, hd) = (4000, ATTENTION_TC_HEAD_DIM);
        // Rows are stored in `format` by the crate's encoder; the reference uses the values its
        // decoder gives back (what the kernels see after staging).
        let slots = format.slots(hd);
        let (stride, first) = if packed { (slots, 6) } else { (slots + 3, 5) };
        let mut pool = vec![0f32; rows * stride + 8];
        let mut values = std::collections::HashMap::new();
        for r in 0..rows {
            let off = r * stride + first;
            let raw: Vec<f32> = if format == KvRowFormat::Bf16 {
                bf16_bits(rng, hd)
                    .iter()
                    .map(|&b| f32::from_bits(u32::from(b) << 16))
                    .collect()
            } else {
                rng.signed_vec(hd, 1.0)
            };
            format.encode(&raw, &mut pool[off..off + slots]);
            let mut row = vec![0f32; hd];
            format.decode(&pool[off..off + slots], &mut row);
            values.insert(off, row);
        }
        let mut offsets = Vec::new();
        let mut starts = vec![0i32];
        for &c in counts {
            for _ in 0..c {
                let masked = hole > 0 && rng.below(hole) == 0;
                let off = rng.below(rows) * stride + first;
                offsets.push(if masked { -1 } else { off as i64 });
            }
            starts.push(offsets.len() as i32);
        }
        if offsets.is_empty() {
            offsets.push(-1);
        }
        let q: Vec<f32> = rng
            .signed_vec(counts.len() * heads * hd, 1.0)
            .iter()
            .map(|&v| v * qmag)
            .collect();
        let sinks = rng.signed_vec(heads, 2.0);
        Self {
            heads,
            hd,
            format,
            pool,
            values,
            q,
            sinks,
            offsets,
            starts,
        }
    }

    fn tokens(&self) -> usize {
        self.starts.len() - 1
    }

    /// f64 attention of every (token, head) and the row's TF32 bound (see the module's doc).
    fn reference(&self, scale: f32) -> (Vec<f64>, Vec<f64>) {
        let (heads, hd) = (self.heads, self.hd);
        let mut out = vec![0f64; self.tokens() * heads * hd];
        let mut bounds = Vec::with_capacity(self.tokens() * heads);
        for t in 0..self.tokens() {
            let keys: Vec<&Vec<f32>> = self.offsets
                [self.starts[t] as usize..self.starts[t + 1] as usize]
                .iter()
                .filter(|&&o| o >= 0)
                .map(|&o| &self.values[&(o as usize)])
                .collect();
            for h in 0..heads {
                let qh = &self.q[(t * heads + h) * hd..][..hd];
                let mut e_logit = 0f64;
                let logits: Vec<f64> = keys
                    .iter()
                    .map(|k| {
                        let (mut dot, mut sq) = (0f64, 0f64);
                        for (&a, &b) in qh.iter().zip(k.iter()) {
                            let p = f64::from(a) * f64::from(b);
                            dot += p;
                            sq += p * p;
                        }
                        e_logit = e_logit.max(TF32_U * f64::from(scale) * sq.sqrt());
                        dot * f64::from(scale)
                    })
                    .collect();
                bounds.push(4.0 * TF32_U + 16.0 * e_logit + 1e-5);
                let sink = f64::from(self.sinks[h]);
                let mx = logits.iter().copied().fold(sink, f64::max);
                let mut den = (sink - mx).exp();
                let o = &mut out[(t * heads + h) * hd..][..hd];
                for (k, &lg) in keys.iter().zip(&logits) {
                    let p = (lg - mx).exp();
                    den += p;
                    for (d, &v) in o.iter_mut().zip(k.iter()) {
                        *d += p * f64::from(v);
                    }
                }
                o.iter_mut().for_each(|d| *d /= den);
            }
        }
        (out, bounds)
    }
}

/// Device buffers of one case.
struct Bufs {
    pool: cudarc::driver::CudaSlice<f32>,
    q: cudarc::driver::CudaSlice<f32>,
    sinks: cudarc::driver::CudaSlice<f32>,
    offsets: cudarc::driver::CudaSlice<i64>,
    starts: cudarc::driver::CudaSlice<i32>,
    out: cudarc::driver::CudaSlice<f32>,
    ws: cudarc::driver::CudaSlice<f32>,
}

fn upload(g: &Gpu, c: &Case, splits: usize) -> Bufs {
    let tokens = c.tokens();
    Bufs {
        pool: g.up(&c.pool),
        q: g.up(&c.q),
        sinks: g.up(&c.sinks),
        offsets: g.up(&c.offsets),
        starts: g.up(&c.starts),
        out: g.up(&vec![f32::NAN; tokens * c.heads * c.hd]),
        ws: g.up(&vec![
            f32::NAN;
            attention_workspace_floats(
                tokens, c.heads, c.hd, splits
            )
        ]),
    }
}

fn call(g: &Gpu, c: &Case, b: &Bufs, splits: usize, scale: f32) -> PagedAttention {
    PagedAttention {
        pool: g.ptr(&b.pool),
        q: g.ptr(&b.q),
        key_offsets: g.ptr(&b.offsets),
        key_starts: g.ptr(&b.starts),
        sinks: g.ptr(&b.sinks),
        out: g.ptr(&b.out),
        workspace: g.ptr(&b.ws),
        tokens: c.tokens(),
        heads: c.heads,
        head_dim: c.hd,
        splits,
        scale,
        format: c.format,
        inverse_rope: None,
        query_norm_eps: None,
        separate_merge: false,
        out_f16: false,
    }
}

/// Runs one attention path (the tensor cores in `form`, or the f32 head-grouped kernel) over `c`.
fn run(g: &Gpu, c: &Case, splits: usize, scale: f32, form: Option<AttentionTcForm>) -> Vec<f32> {
    let b = upload(g, c, splits);
    let a = call(g, c, &b, splits, scale);
    // SAFETY: every buffer holds the shape `a` names; every key offset leaves a row of the
    // case's format in the pool.
    unsafe {
        match form {
            Some(form) => g.k.paged_attention_heads_tc_form(&g.s, &a, form),
            None => g.k.paged_attention_heads(&g.s, &a),
        }
    }
    .unwrap();
    g.down(&b.out)
}

fn check(g: &Gpu, c: &Case, what: &str) {
    let hd = c.hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let counts: Vec<i32> = c.starts.windows(2).map(|w| w[1] - w[0]).collect();
    let max_keys = counts.iter().copied().max().unwrap_or(0) as usize;
    let picked = attention_splits(max_keys, c.tokens(), c.heads, g.k.multiprocessors());
    let (want, bounds) = c.reference(scale);
    let mut split_counts = vec![1, picked];
    split_counts.dedup();
    let forms: Vec<AttentionTcForm> = ALL_FORMS
        .into_iter()
        .filter(|f| c.heads.is_multiple_of(f.heads()))
        .collect();
    for (splits, form) in split_counts
        .iter()
        .flat_map(|&s| forms.iter().map(move |&f| (s, f)))
    {
        let tc = run(g, c, splits, scale, Some(form));
        let f32k: Vec<f64> = run(g, c, splits, scale, None)
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let vs_f64 = row_errs(&tc, &want, hd);
        let vs_kernel = row_errs(&tc, &f32k, hd);
        let worst = |e: &[f64]| e.iter().copied().fold(0.0, f64::max);
        let ratio = vs_f64
            .iter()
            .zip(&vs_kernel)
            .zip(&bounds)
            .map(|((&a, &b), &bd)| a.max(b) / bd)
            .fold(0.0, f64::max);
        eprintln!(
            "attention_heads_tc {form:?} {what}: heads={} keys={counts:?} splits={splits}: vs f64 {:.2e}, \
             vs paged_attention_heads {:.2e}, bound {:.2e}..{:.2e} (worst err/bound {ratio:.2})",
            c.heads,
            worst(&vs_f64),
            worst(&vs_kernel),
            bounds.iter().copied().fold(f64::INFINITY, f64::min),
            worst(&bounds),
        );
        for (row, ((&e64, &ek), &bd)) in vs_f64.iter().zip(&vs_kernel).zip(&bounds).enumerate() {
            assert!(
                e64 < bd && ek < bd,
                "{form:?} {what} heads={} splits={splits} (token, head) row {row}: vs f64 {e64}, vs f32 \
                 kernel {ek}, bound {bd}",
                c.heads
            );
        }
    }
}

/// One decoding token per launch over the short key counts of a V4 layer (a partial tile, one
/// tile, two, a window, an 8K CSA layer's 512 + 128), every form; small enough for racecheck.
#[test]
fn tensor_core_attention_short_lists_match_f32_kernel_and_f64() {
    let Some(g) = gpu("tensor_core_attention_short_lists_match_f32_kernel_and_f64") else {
        return;
    };
    let mut rng = Rng(0x7f32_5407_u64);
    for heads in [64, 32] {
        for keys in [1, 7, 31, 33, 128, 640] {
            let c = Case::new(&mut rng, heads, &[keys], 0, 1.0, KvRowFormat::F32);
            check(&g, &c, "decode");
        }
    }
    let c = Case::new(
        &mut rng,
        64,
        &[33, 7],
        4,
        1.0,
        KvRowFormat::Fp8Latent { rope: 64 },
    );
    check(&g, &c, "fp8 rows, short");
    let fp8 = KvRowFormat::Fp8Latent { rope: 64 };
    for heads in [64, 32] {
        let c = Case::with_layout(&mut rng, heads, &[33, 7, 1], 4, 1.0, fp8, true);
        check(&g, &c, "fp8 rows as the pool packs them, short");
    }
}

#[test]
fn tensor_core_attention_matches_f32_kernel_and_f64() {
    let Some(g) = gpu("tensor_core_attention_matches_f32_kernel_and_f64") else {
        return;
    };
    let mut rng = Rng(0x7f32_a77e_u64);
    let f32r = KvRowFormat::F32;
    for heads in [64, 32] {
        // One decoding token per launch over the long key counts (up to a 1M-token HCA layer's
        // 8192 + 128; the short ones have their own test), then prefill-like launches of mixed
        // counts.
        for keys in [1400, 8320] {
            let c = Case::new(&mut rng, heads, &[keys], 0, 1.0, f32r);
            check(&g, &c, "decode");
        }
        let c = Case::new(&mut rng, heads, &[1, 7, 128, 640, 1400, 8320], 0, 1.0, f32r);
        check(&g, &c, "mixed");
        let c = Case::new(
            &mut rng,
            heads,
            &[640, 1, 1400, 7, 128, 0, 611],
            5,
            1.0,
            f32r,
        );
        check(&g, &c, "mixed, holes");
        let c = Case::new(&mut rng, heads, &[8320], 3, 1.0, f32r);
        check(&g, &c, "8320 keys, holes");
    }
    // Sharp logits (queries x 8: logits of several units, where TF32's logit error grows).
    let c = Case::new(&mut rng, 64, &[640, 128, 1400], 7, 8.0, f32r);
    check(&g, &c, "sharp logits");
    // Stored BF16 rows, decoded as the tile is staged.
    let c = Case::new(&mut rng, 32, &[640, 7, 1400], 6, 1.0, KvRowFormat::Bf16);
    check(&g, &c, "bf16 rows");
    // FP8 latent records (448 e4m3 + 64 bf16 RoPE dims + scales), as `--kv-cache-dtype fp8`
    // stores them.
    let fp8 = KvRowFormat::Fp8Latent { rope: 64 };
    let c = Case::new(&mut rng, 64, &[640, 7, 1400, 128], 6, 1.0, fp8);
    check(&g, &c, "fp8 rows");
    for heads in [64, 32] {
        let c = Case::with_layout(&mut rng, heads, &[640, 7, 1400, 128, 0], 6, 1.0, fp8, true);
        check(&g, &c, "fp8 rows as the pool packs them");
    }
    // Every slot masked: the sink takes everything, the output is zeros.
    let c = Case::new(&mut rng, 16, &[5, 40], 1, 1.0, f32r);
    check(&g, &c, "all masked");
}

/// A RoPE table (V4's 64 rotated channels, base 10000) and a position per token up to 1M, on
/// the device: what the layer stack rotates queries and keys with.
struct RopeBufs {
    positions: cudarc::driver::CudaSlice<i32>,
    inv_freq: cudarc::driver::CudaSlice<f32>,
}

impl RopeBufs {
    const DIM: usize = 64;
    const FACTOR: f32 = 1.25;

    fn new(g: &Gpu, rng: &mut Rng, tokens: usize) -> Self {
        let inv_freq: Vec<f32> = (0..Self::DIM / 2)
            .map(|j| 10000f32.powf(-2.0 * j as f32 / Self::DIM as f32))
            .collect();
        let positions: Vec<i32> = (0..tokens).map(|_| rng.below(1 << 20) as i32).collect();
        Self {
            positions: g.up(&positions),
            inv_freq: g.up(&inv_freq),
        }
    }

    fn table(&self, g: &Gpu) -> InverseRope {
        InverseRope {
            positions: g.ptr(&self.positions),
            inv_freq: g.ptr(&self.inv_freq),
            rope_dim: Self::DIM,
            attention_factor: Self::FACTOR,
        }
    }

    /// The separate launch the f16 forms' raw-query staging replaces: each head of `q`
    /// RMS-normed (no weight) and rotated, into `out`.
    fn norm_rope(&self, g: &Gpu, q: u64, out: u64, tokens: usize, heads: usize, eps: f32) {
        let call = RmsNormRopeF32 {
            norm: RmsNormF32 {
                x: q,
                out,
                weight: 0,
                rows: tokens * heads,
                dim: ATTENTION_TC_HEAD_DIM,
                ld_x: ATTENTION_TC_HEAD_DIM,
                ld_out: ATTENTION_TC_HEAD_DIM,
                eps,
            },
            positions: g.ptr(&self.positions),
            inv_freq: g.ptr(&self.inv_freq),
            heads,
            rope_dim: Self::DIM,
            attention_factor: Self::FACTOR,
        };
        // SAFETY: q and out hold tokens x heads rows of 512, positions `tokens` i32, inv_freq
        // 32 f32.
        unsafe { g.k.rms_norm_rope_f32(&g.s, &call) }.unwrap();
    }
}

/// The f16 forms' fusions give the separate launches' bits: raw queries normed and rotated as
/// they are staged (against `rms_norm_rope_f32` first), and one split finished in pass 1 (against
/// pass 1's record and the one-split merge), each alone and both together, over FP8 and BF16
/// records, with holes, a token without keys and one whose keys are all masked; at several
/// splits the merge stays separate and only the queries' staging differs.
#[test]
fn f16_fused_query_norm_and_one_split_finish_equal_the_separate_launches() {
    let Some(g) = gpu("f16_fused_query_norm_and_one_split_finish_equal_the_separate_launches")
    else {
        return;
    };
    let mut rng = Rng(0x5f16_f05e_u64);
    let eps = 1e-6f32;
    let fp8 = KvRowFormat::Fp8Latent { rope: 64 };
    for (heads, format) in [(32, fp8), (64, fp8), (32, KvRowFormat::Bf16)] {
        // Raw projections of several units (the norm matters), holes in the key lists.
        let c = Case::new(&mut rng, heads, &[640, 7, 0, 128, 33, 1400], 5, 3.0, format);
        let masked = Case::new(&mut rng, heads, &[9], 1, 3.0, format);
        for c in [&c, &masked] {
            let tokens = c.tokens();
            let rope = RopeBufs::new(&g, &mut rng, tokens);
            let picked = attention_splits(1400, tokens, heads, g.k.multiprocessors());
            for splits in [1, picked.max(2)] {
                for form in [AttentionTcForm::F16Heads16, AttentionTcForm::F16Heads32] {
                    let b = upload(&g, c, splits);
                    let normed = g.up(&vec![f32::NAN; c.q.len()]);
                    rope.norm_rope(&g, g.ptr(&b.q), g.ptr(&normed), tokens, heads, eps);
                    let base = PagedAttention {
                        inverse_rope: Some(rope.table(&g)),
                        ..call(&g, c, &b, splits, 1.0 / (c.hd as f32).sqrt())
                    };
                    let mut outs = Vec::new();
                    // (raw queries, finish in pass 1 where one split)
                    for (raw, fused_finish) in
                        [(false, false), (false, true), (true, false), (true, true)]
                    {
                        let a = PagedAttention {
                            q: if raw { g.ptr(&b.q) } else { g.ptr(&normed) },
                            query_norm_eps: raw.then_some(eps),
                            separate_merge: !fused_finish,
                            out_f16: false,
                            ..base
                        };
                        // SAFETY: every buffer holds the shape `a` names; every key offset
                        // leaves a row of the case's format in the pool.
                        unsafe { g.k.paged_attention_heads_tc_form(&g.s, &a, form) }.unwrap();
                        outs.push(g.down(&b.out));
                    }
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                    assert!(
                        outs[0].iter().all(|v| v.is_finite()),
                        "{form:?}: non-finite output"
                    );
                    for (i, o) in outs.iter().enumerate().skip(1) {
                        assert!(
                            bits(o) == bits(&outs[0]),
                            "{form:?} {format:?} heads {heads} splits {splits}: variant {i} \
                             differs from the separate launches"
                        );
                    }
                    // One split: the rows finished straight to f16 equal the f32 output rounded by
                    // rows_to_f16 (what the output projection's GEMM would do with it); more
                    // splits merge into f32, and f16 output is refused.
                    let n = c.q.len();
                    let half = g.up(&vec![0u16; n]);
                    let a = PagedAttention {
                        q: g.ptr(&b.q),
                        out: g.ptr(&half),
                        query_norm_eps: Some(eps),
                        separate_merge: false,
                        out_f16: true,
                        ..base
                    };
                    // SAFETY: as above; `half` holds the output's values as f16.
                    let got = unsafe { g.k.paged_attention_heads_tc_form(&g.s, &a, form) };
                    if splits == 1 {
                        got.unwrap();
                        let want = g.up(&vec![0u16; n]);
                        let f32_out = g.up(&outs[0]);
                        // SAFETY: f32_out holds n / 512 rows of 512, want as many f16.
                        unsafe {
                            g.k.rows_to_f16(&g.s, g.ptr(&f32_out), 512, g.ptr(&want), n / 512, 512)
                        }
                        .unwrap();
                        assert!(
                            g.down(&half) == g.down(&want),
                            "{form:?} {format:?} heads {heads}: f16 output differs from the \
                             rounded f32 one"
                        );
                    } else {
                        assert!(matches!(got, Err(KernelError::InvalidLaunch { .. })));
                    }
                    eprintln!(
                        "f16 fusions {form:?} {format:?} heads {heads} tokens {tokens} splits \
                         {splits}: same bits"
                    );
                }
            }
        }
    }
}

#[test]
fn tensor_core_attention_rejects_other_head_dims() {
    let Some(g) = gpu("tensor_core_attention_rejects_other_head_dims") else {
        return;
    };
    let a = PagedAttention {
        pool: 256,
        q: 256,
        key_offsets: 256,
        key_starts: 256,
        sinks: 256,
        out: 256,
        workspace: 256,
        tokens: 1,
        heads: 16,
        head_dim: 64,
        splits: 1,
        scale: 0.125,
        format: KvRowFormat::F32,
        inverse_rope: None,
        query_norm_eps: None,
        separate_merge: false,
        out_f16: false,
    };
    for form in ALL_FORMS {
        assert!(check_attention_heads_tc(&a, form, g.k.smem_optin()).is_err());
    }
    // SAFETY: rejected before launch, no pointer is read.
    assert!(matches!(
        unsafe { g.k.paged_attention_heads_tc(&g.s, &a) },
        Err(KernelError::InvalidLaunch { .. })
    ));
    // V4's shape fits this device's shared memory in every form (H200: 227 KB a block).
    let v4 = PagedAttention {
        heads: 64,
        head_dim: 512,
        ..a
    };
    for form in ALL_FORMS {
        assert!(check_attention_heads_tc(&v4, form, g.k.smem_optin()).is_ok());
    }
    assert_eq!(
        attention_tc_form(64, 8192, g.k.smem_optin()),
        AttentionTcForm::Heads32
    );
}

/// Prints the time of both pass-1 kernels (+ the shared merge) at prefill and decode shapes:
/// `cargo test --release -p dspark-kernels --test attention_tc_gpu -- --nocapture timing`.
#[test]
fn attention_tc_timing_print() {
    let Some(g) = gpu("attention_tc_timing_print") else {
        return;
    };
    let mut rng = Rng(0x7117_0001);
    let hd = ATTENTION_TC_HEAD_DIM;
    let scale = 1.0 / (hd as f32).sqrt();
    // (tokens, heads, keys per token): an 8K prefill chunk at TP=1 and TP=2 (a 128-key window +
    // 512 compressed rows), a 2K chunk, one decoding token over 8320 keys.
    // Decode shapes: 1/6/16 tokens over a window (128), an 8K CSA layer (512 picked + 128) and a
    // 1M HCA layer (8192 + 128). Prefill shapes in f32 rows, decode shapes in FP8 records too.
    let fp8 = KvRowFormat::Fp8Latent { rope: 64 };
    for (tokens, heads, keys, format) in [
        (8192usize, 64usize, 640usize, KvRowFormat::F32),
        (8192, 32, 640, KvRowFormat::F32),
        (2048, 64, 640, KvRowFormat::F32),
        (8192, 64, 640, fp8),
        (8192, 32, 640, fp8),
        (1, 64, 8320, KvRowFormat::F32),
        (1, 64, 8320, fp8),
        (1, 64, 128, fp8),
        (1, 64, 640, fp8),
        (6, 64, 640, fp8),
        (16, 64, 640, fp8),
        (16, 64, 8320, fp8),
    ] {
        // `DSPARK_ATTENTION_TIMING=TxHxK` times that shape only (e.g. under a profiler).
        if let Ok(only) = std::env::var("DSPARK_ATTENTION_TIMING") {
            let fp8_rows = matches!(format, KvRowFormat::Fp8Latent { .. });
            if only != format!("{tokens}x{heads}x{keys}") || !fp8_rows {
                continue;
            }
        }
        let rows = 16384usize;
        let slots = format.slots(hd);
        let pool = g.up(&format.encode_rows(&rng.signed_vec(rows * hd, 1.0), hd));
        let offsets: Vec<i64> = (0..tokens * keys)
            .map(|_| (rng.below(rows) * slots) as i64)
            .collect();
        let starts: Vec<i32> = (0..=tokens).map(|t| (t * keys) as i32).collect();
        let splits = attention_splits(keys, tokens, heads, g.k.multiprocessors());
        let (offsets, starts) = (g.up(&offsets), g.up(&starts));
        let q = g.up(&rng.signed_vec(tokens * heads * hd, 1.0));
        let sinks = g.up(&rng.signed_vec(heads, 2.0));
        let out = g.up(&vec![0f32; tokens * heads * hd]);
        let ws = g.up(&vec![
            0f32;
            attention_workspace_floats(tokens, heads, hd, splits)
        ]);
        let rope = RopeBufs::new(&g, &mut rng, tokens);
        let normed = g.up(&vec![0f32; tokens * heads * hd]);
        let a = PagedAttention {
            pool: g.ptr(&pool),
            q: g.ptr(&normed),
            key_offsets: g.ptr(&offsets),
            key_starts: g.ptr(&starts),
            sinks: g.ptr(&sinks),
            out: g.ptr(&out),
            workspace: g.ptr(&ws),
            tokens,
            heads,
            head_dim: hd,
            splits,
            scale,
            format,
            inverse_rope: Some(rope.table(&g)),
            query_norm_eps: None,
            separate_merge: true,
            out_f16: false,
        };
        // The layer stack's two ways for the f16 forms: the queries' norm + RoPE launch, pass 1
        // and the merge; or pass 1 norming the raw queries and finishing one split itself.
        let fused = PagedAttention {
            q: g.ptr(&q),
            query_norm_eps: Some(1e-6),
            separate_merge: false,
            out_f16: false,
            ..a
        };
        for (what, form) in [
            ("F16 16", AttentionTcForm::F16Heads16),
            ("F16 32", AttentionTcForm::F16Heads32),
        ] {
            if format == KvRowFormat::F32 {
                continue;
            }
            let reps = if tokens > 16 { 5 } else { 200 };
            let separate = time_us(&g, reps, &|| {
                rope.norm_rope(&g, g.ptr(&q), g.ptr(&normed), tokens, heads, 1e-6);
                // SAFETY: as the launches below.
                unsafe { g.k.paged_attention_heads_tc_form(&g.s, &a, form) }.unwrap();
            });
            let together = time_us(&g, reps, &|| {
                // SAFETY: as the launches below; q holds the raw queries.
                unsafe { g.k.paged_attention_heads_tc_form(&g.s, &fused, form) }.unwrap();
            });
            eprintln!(
                "attention T{tokens} H{heads} keys {keys} {format:?} splits {splits} {what}: \
                 norm + RoPE, pass 1, merge {separate:10.1} us; fused {together:10.1} us"
            );
        }
        let flops = (tokens * heads * keys * hd * 4) as f64;
        let reps = if tokens > 16 { 5 } else { 200 };
        for (what, form) in [
            ("f32 heads", None),
            ("TC 16 heads", Some(AttentionTcForm::Heads16)),
            ("TC 32 heads", Some(AttentionTcForm::Heads32)),
            ("F16 16 heads", Some(AttentionTcForm::F16Heads16)),
            ("F16 32 heads", Some(AttentionTcForm::F16Heads32)),
        ] {
            let launch = || {
                // SAFETY: the buffers above hold the shapes `a` names; every offset leaves a
                // row in the pool.
                unsafe {
                    match form {
                        Some(form) => g.k.paged_attention_heads_tc_form(&g.s, &a, form),
                        None => g.k.paged_attention_heads(&g.s, &a),
                    }
                }
                .unwrap();
            };
            // Key row bytes the blocks read (from L2 mostly): each block reads its token's rows.
            let group = form.map_or(16, AttentionTcForm::heads);
            let row_bytes = (tokens * (heads / group) * keys * format.bytes(hd)) as f64;
            launch();
            g.s.synchronize().unwrap();
            let ev = || {
                g.ctx
                    .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .unwrap()
            };
            let (start, end) = (ev(), ev());
            g.k.spin(&g.s, 20_000_000).unwrap();
            start.record(&g.s).unwrap();
            for _ in 0..reps {
                launch();
            }
            end.record(&g.s).unwrap();
            g.s.synchronize().unwrap();
            let us = f64::from(start.elapsed_ms(&end).unwrap()) * 1000.0 / reps as f64;
            eprintln!(
                "attention T{tokens} H{heads} keys {keys} {format:?} splits {splits} {what:>12}: \
                 {us:10.1} us \
                 (pass 1 + merge) {:6.1} TFLOPS, key rows {:6.0} GB/s",
                flops / us * 1e-6,
                row_bytes / us * 1e-3
            );
        }
    }
}
