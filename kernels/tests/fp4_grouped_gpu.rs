//! GPU checks of the grouped FP4 expert GEMMs (`dsk_fp4_grouped_*`, the routed experts of
//! prefill chunks with the weights decoded in the kernel) against an f64 host reference over
//! the same f16 activations:
//! - gate/up: the SwiGLU of two FP4 GEMMs, stored as f16 in the form's order (k8, or k32 for the
//!   wgmma form). The products are exact,
//!   the sums f32 on the tensor cores, then one f16 rounding (relative 2^-11 per value): the
//!   relative L2 error is bounded by 1e-3.
//! - down: f32 outputs from the kernel's own f16 activations, so only the f32 sums differ:
//!   1e-4, as the other f32 kernels (docs/KERNELS.md).
//!
//! Shapes: expert runs of 1, 63, 64, 65 and 130 rows (partial tiles, several tiles, a run that
//! starts mid-tile), experts left out, K from 256 (2 stages) to V4-Flash's 4096, scale shifts
//! 0 and 6, every build (the wgmma form on sm_90a, 3 and 2 pipeline stages); nothing written past
//! the sorted rows. Skips (passes with a SKIP line) without a GPU.

use dspark_kernels::formats::{e2m1_at, e8m0_to_f64};
use dspark_kernels::launch::moe_grouped::{
    fp4_grouped_scale_shift, fp4_grouped_tiles_of, ActivationOrder, Fp4GroupedBank, Fp4GroupedForm,
};
use dspark_kernels::Fp4Experts;
use half::f16;

mod common;
use common::{gpu, Gpu, Rng};

const LIMIT: f32 = 7.0;

/// A row of f16 bits stored in `order` back in natural order, as f64.
fn unpermute(row: &[u16], order: ActivationOrder) -> Vec<f64> {
    (0..row.len())
        .map(|v| f64::from(f16::from_bits(row[order.position(v)]).to_f32()))
        .collect()
}

/// One FP4 matrix bank `[experts, rows, k]`: nibbles and scale bytes in `lo..=hi`.
struct Bank {
    w: Vec<u8>,
    s: Vec<u8>,
    rows: usize,
    k: usize,
}

impl Bank {
    fn random(rng: &mut Rng, experts: usize, rows: usize, k: usize, lo: u8, hi: u8) -> Self {
        let w = (0..experts * rows * k / 2)
            .map(|_| rng.next() as u8)
            .collect();
        let span = usize::from(hi - lo) + 1;
        let s = (0..experts * rows * k / 32)
            .map(|_| lo + rng.below(span) as u8)
            .collect();
        Self { w, s, rows, k }
    }

    /// Row `r` of expert `e` as exact f64 values.
    fn row(&self, e: usize, r: usize) -> Vec<f64> {
        let at = e * self.rows + r;
        let packed = &self.w[at * self.k / 2..(at + 1) * self.k / 2];
        (0..self.k)
            .map(|c| f64::from(e2m1_at(packed, c)) * e8m0_to_f64(self.s[at * self.k / 32 + c / 32]))
            .collect()
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Runs gate/up and down over `runs` (expert, rows) of a bank with `experts`, checks both and
/// that nothing past the sorted rows is written.
fn check(
    g: &Gpu,
    seed: u64,
    experts: usize,
    hidden: usize,
    inter: usize,
    scales: (u8, u8),
    runs: &[(usize, usize)],
) {
    let mut rng = Rng(seed);
    let shift = fp4_grouped_scale_shift(scales.0, scales.1).expect("an allowed scale range");
    let w1 = Bank::random(&mut rng, experts, inter, hidden, scales.0, scales.1);
    let w3 = Bank::random(&mut rng, experts, inter, hidden, scales.0, scales.1);
    let w2 = Bank::random(&mut rng, experts, hidden, inter, scales.0, scales.1);
    let mut spans = Vec::new();
    let mut at = 0;
    for &(e, rows) in runs {
        spans.push((e, at, rows));
        at += rows;
    }
    let sorted = at;
    // Activations sized so that g and u come out a few units: the SwiGLU's clip binds only
    // now and then, so both sides of it are tested.
    let tokens = 41;
    let mid = 2f32.powf((f32::from(scales.0) + f32::from(scales.1)) / 2.0 - 127.0);
    let x = rng.signed_vec(tokens * hidden, 2.0 / (mid * (hidden as f32).sqrt()));
    let idx: Vec<i32> = (0..sorted).map(|_| rng.below(tokens) as i32).collect();
    let (xb, ib) = (g.up(&x), g.up(&idx));
    let form = g.k.fp4_grouped_form();
    let order = form.order();
    // One spare row past the sorted rows, which must stay poisoned.
    let xs = g.up(&vec![0xffffu16; (sorted + 1) * hidden]);
    // SAFETY: idx rows are tokens of x; xs holds sorted rows (and one more).
    unsafe {
        g.k.gather_rows_grouped(&g.s, g.ptr(&xb), g.ptr(&ib), sorted, hidden, g.ptr(&xs))
    }
    .unwrap();
    let xs_host = g.down(&xs);
    for (r, &t) in idx.iter().enumerate() {
        let want: Vec<f64> = x[t as usize * hidden..(t as usize + 1) * hidden]
            .iter()
            .map(|&v| f64::from(f16::from_f32(v).to_f32()))
            .collect();
        assert_eq!(
            unpermute(&xs_host[r * hidden..(r + 1) * hidden], order),
            want,
            "gathered row {r}"
        );
    }
    let tiles = fp4_grouped_tiles_of(&spans, form.tile_rows());
    let flat: Vec<i32> = tiles.iter().flatten().copied().collect();
    let tb = g.up(&flat);
    let (b1w, b1s, b3w, b3s, b2w, b2s) = (
        g.up(&w1.w),
        g.up(&w1.s),
        g.up(&w3.w),
        g.up(&w3.s),
        g.up(&w2.w),
        g.up(&w2.s),
    );
    let bank = Fp4GroupedBank {
        experts: Fp4Experts {
            w1: g.ptr(&b1w),
            s1: g.ptr(&b1s),
            w3: g.ptr(&b3w),
            s3: g.ptr(&b3s),
            w2: g.ptr(&b2w),
            s2: g.ptr(&b2s),
            experts,
            hidden,
            inter,
        },
        shift,
    };
    let act = g.up(&vec![0xffffu16; (sorted + 1) * inter]);
    let y = g.up(&vec![f32::NAN; (sorted + 1) * hidden]);
    // SAFETY: the tiles name rows below `sorted` of experts below `experts`; every buffer holds
    // those rows.
    unsafe {
        g.k.fp4_grouped_gate_up(
            &g.s,
            &bank,
            g.ptr(&xs),
            None,
            g.ptr(&tb),
            tiles.len(),
            g.ptr(&act),
            LIMIT,
        )
        .unwrap();
        g.k.fp4_grouped_down(&g.s, &bank, g.ptr(&act), g.ptr(&tb), tiles.len(), g.ptr(&y))
            .unwrap();
    }
    let act_host = g.down(&act);
    let y_host = g.down(&y);
    if form.gathers_in_kernel() {
        // The same gate/up reading x's own rows through the row list (its loads do the
        // gather): the same values in the same order, so the same bits.
        let xf = g.up(&vec![0xffffu16; tokens * hidden]);
        let act2 = g.up(&vec![0xffffu16; (sorted + 1) * inter]);
        // SAFETY: x holds `tokens` rows, xf as many f16; idx names rows of x for every sorted
        // row the tiles cover.
        unsafe {
            g.k.gather_rows_grouped(&g.s, g.ptr(&xb), 0, tokens, hidden, g.ptr(&xf))
                .unwrap();
            g.k.fp4_grouped_gate_up(
                &g.s,
                &bank,
                g.ptr(&xf),
                Some(g.ptr(&ib)),
                g.ptr(&tb),
                tiles.len(),
                g.ptr(&act2),
                LIMIT,
            )
            .unwrap();
        }
        assert!(
            g.down(&act2) == act_host,
            "gate/up through the row list differs from gate/up over gathered rows"
        );
    } else {
        // SAFETY: as above; only the wgmma form takes a row list.
        let refused = unsafe {
            g.k.fp4_grouped_gate_up(
                &g.s,
                &bank,
                g.ptr(&xs),
                Some(g.ptr(&ib)),
                g.ptr(&tb),
                tiles.len(),
                g.ptr(&act),
                LIMIT,
            )
        };
        assert!(refused.is_err(), "{form:?} accepted a row list");
    }
    assert!(
        act_host[sorted * inter..].iter().all(|&v| v == 0xffff),
        "act written past the sorted rows"
    );
    assert!(
        y_host[sorted * hidden..].iter().all(|v| v.is_nan()),
        "y written past the sorted rows"
    );
    let (mut act_got, mut act_want, mut y_got, mut y_want) = (vec![], vec![], vec![], vec![]);
    let mut clipped = 0;
    for &(e, first, rows) in &spans {
        let w1_rows: Vec<Vec<f64>> = (0..inter).map(|i| w1.row(e, i)).collect();
        let w3_rows: Vec<Vec<f64>> = (0..inter).map(|i| w3.row(e, i)).collect();
        let w2_rows: Vec<Vec<f64>> = (0..hidden).map(|n| w2.row(e, n)).collect();
        for r in first..first + rows {
            let xr = unpermute(&xs_host[r * hidden..(r + 1) * hidden], order);
            let ar = unpermute(&act_host[r * inter..(r + 1) * inter], order);
            for i in 0..inter {
                let gv = dot(&w1_rows[i], &xr).min(f64::from(LIMIT));
                let uv = dot(&w3_rows[i], &xr).clamp(-f64::from(LIMIT), f64::from(LIMIT));
                if gv == f64::from(LIMIT) || uv.abs() == f64::from(LIMIT) {
                    clipped += 1;
                }
                act_want.push(gv / (1.0 + (-gv).exp()) * uv);
                act_got.push(ar[i]);
            }
            for n in 0..hidden {
                y_want.push(dot(&w2_rows[n], &ar));
                y_got.push(f64::from(y_host[r * hidden + n]));
            }
        }
    }
    assert!(
        y_got.iter().all(|v| v.is_finite()),
        "a sorted row of y was not written"
    );
    let (ea, ey) = (rel_l2(&act_got, &act_want), rel_l2(&y_got, &y_want));
    eprintln!(
        "grouped FP4 experts={experts} hidden={hidden} inter={inter} scales={scales:?} \
         (shift {shift}) rows={sorted} tiles={}: act rel L2 {ea:.3e} ({clipped} clipped), y rel L2 {ey:.3e}",
        tiles.len()
    );
    assert!(ea < 1e-3, "gate/up: {ea:e}");
    assert!(ey < 1e-4, "down: {ey:e}");
}

#[test]
fn grouped_fp4_experts_match_f64_reference() {
    let Some(mut g) = gpu("grouped_fp4_experts_match_f64_reference") else {
        return;
    };
    let mut forms = vec![Fp4GroupedForm::ThreeStages, Fp4GroupedForm::TwoStages];
    if g.k.arch() == "sm_90a" {
        forms.insert(0, Fp4GroupedForm::Wgmma);
    }
    for form in forms {
        g.k.set_fp4_grouped_form(form);
        eprintln!("{form:?}");
        // Expert 2 and 5 take no rows; expert 4's run ends mid-tile and expert 1's starts there.
        // With 128-row tiles: 65 and 128 rows take the n128 MMAs, 1, 2, 63 and 64 the n64 ones.
        let runs = [(4, 65), (1, 130), (0, 1), (3, 63), (6, 64)];
        check(&g, 0x6a0e, 7, 256, 256, (118, 128), &runs);
        // More stages than the ring holds (K = 512 and 384), a scale shift of 6.
        check(&g, 0x6a0f, 7, 512, 384, (112, 134), &runs);
        // TP=2's shard of V4-Flash (inter 1024), then V4-Flash's own K = 4096.
        check(&g, 0x6a10, 3, 256, 1024, (115, 126), &[(2, 70), (0, 5)]);
        check(&g, 0x6a11, 3, 4096, 256, (116, 124), &[(1, 66), (2, 3)]);
    }
}
