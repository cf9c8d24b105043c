//! The indexer's exact top-k select (`Kernels::topk_select`): the multi-stage select (a block per
//! 4096-score segment keeping its top k, rounds of the same over the candidates while more than
//! a segment of them is left, then a block per token over the last ones: 262,144 and 70,000
//! scores take a middle round, 2 * 4096 + 1 none), which few tokens with long lists take,
//! against the single-block select and a host reference
//! (`reference::topk`: value descending in total order, ties to the lower index), written as the
//! rows above the k-th value in index order, then its ties in index order; the rows past
//! `min(k, count)` stay untouched. Exactly equal indices and value
//! bits on random lists of 262,144 (a 1M-context decode), 70,000 and 2 * 4096 + 1 scores, tokens
//! of different counts in one launch (below k, exactly k, 1 and 0 included), heavy ties (7 and
//! 2 distinct values), ties at the k-th value spread over segment boundaries, -inf (as the k-th
//! value too), -0.0 next to +0.0 and negative values. Skips (passes with a SKIP line) where
//! there is no GPU.

use dspark_kernels::launch::attention::{
    topk_two_stage, TOPK_SEGMENT, TOPK_SINGLE_MAX_COUNT, TOPK_TWO_STAGE_MAX_TOKENS,
};
use dspark_kernels::{reference, topk_select_workspace_bytes, TopKSelect};

mod common;
use common::{gpu, Gpu, Rng};

const SENTINEL_IDX: i32 = -7;
const SENTINEL_VAL: f32 = 1234.5;

/// One `topk_select` over `lists` (padded with empty tokens to `tokens`): its out_idx and out_val,
/// `[tokens, k]`. The workspace starts as NaN, which would win any select that read a slot the
/// first stage did not write.
fn select(g: &Gpu, lists: &[Vec<f32>], tokens: usize, k: usize) -> (Vec<i32>, Vec<f32>) {
    let mut flat = Vec::new();
    let mut starts = Vec::new();
    let mut counts = Vec::new();
    for t in 0..tokens {
        starts.push(flat.len() as i64);
        let l = lists.get(t).map_or(&[][..], |l| &l[..]);
        counts.push(l.len() as i32);
        flat.extend_from_slice(l);
    }
    flat.push(0.0);
    let max_count = lists.iter().map(Vec::len).max().unwrap_or(0);
    let bytes = topk_select_workspace_bytes(tokens, max_count, k);
    let (sd, std_, cd) = (g.up(&flat), g.up(&starts), g.up(&counts));
    let idx = g.up(&vec![SENTINEL_IDX; tokens * k]);
    let val = g.up(&vec![SENTINEL_VAL; tokens * k]);
    let work = g.up(&vec![f32::NAN; bytes.div_ceil(4).max(1)]);
    let call = TopKSelect {
        scores: g.ptr(&sd),
        starts: g.ptr(&std_),
        counts: g.ptr(&cd),
        tokens,
        k,
        out_idx: g.ptr(&idx),
        out_val: g.ptr(&val),
        max_count,
        workspace: if bytes > 0 { g.ptr(&work) } else { 0 },
    };
    // SAFETY: each token's scores lie inside `flat`, idx / val hold tokens * k, max_count is the
    // largest count and `work` holds the workspace for it.
    unsafe { g.k.topk_select(&g.s, &call) }.unwrap();
    (g.down(&idx), g.down(&val))
}

/// The top k (value descending, ties to the lower index) as the selects write it: the rows above
/// the k-th value in index order, then its ties in index order.
fn written_order(mut top: Vec<(f32, i32)>) -> Vec<(f32, i32)> {
    if let Some(&(kth, _)) = top.last() {
        top.sort_by_key(|&(v, i)| (v.to_bits() == kth.to_bits(), i));
    }
    top
}

/// Both selects over `lists` equal the reference exactly.
fn check(g: &Gpu, name: &str, lists: &[Vec<f32>], k: usize) {
    let max_count = lists.iter().map(Vec::len).max().unwrap_or(0);
    // The lists as given take the two stages; padded past TOPK_TWO_STAGE_MAX_TOKENS tokens (the
    // padding empty), the same lists take the single-block select.
    let padded = TOPK_TWO_STAGE_MAX_TOKENS + 1;
    assert!(
        topk_two_stage(lists.len(), max_count, k),
        "{name}: should take the two-stage select"
    );
    assert!(!topk_two_stage(padded, max_count, k));
    let two = select(g, lists, lists.len(), k);
    let single = select(g, lists, padded, k);
    for (t, list) in lists.iter().enumerate() {
        let want = written_order(reference::topk(list, k));
        for (which, (idx, val)) in [("two-stage", &two), ("single-block", &single)] {
            let row = |j: usize| (idx[t * k + j], val[t * k + j]);
            for j in 0..k {
                let (gi, gv) = row(j);
                match want.get(j) {
                    Some(&(wv, wi)) => assert!(
                        gi == wi && gv.to_bits() == wv.to_bits(),
                        "{name} {which}: token {t} ({} scores) row {j}: ({gi}, {gv}) vs ({wi}, {wv})",
                        list.len()
                    ),
                    None => assert!(
                        gi == SENTINEL_IDX && gv.to_bits() == SENTINEL_VAL.to_bits(),
                        "{name} {which}: token {t} ({} scores) wrote row {j} past min(k, count)",
                        list.len()
                    ),
                }
            }
        }
    }
    // Nothing past the real tokens was written by the padded launch.
    assert!(single.0[lists.len() * k..]
        .iter()
        .all(|&i| i == SENTINEL_IDX));
    eprintln!(
        "top-k {name}: {} tokens, max count {max_count}, k {k}: exact",
        lists.len()
    );
}

fn random_list(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    rng.signed_vec(n, scale)
}

#[test]
fn two_stage_select_equals_single_block_and_reference() {
    let Some(g) = gpu("two_stage_select_equals_single_block_and_reference") else {
        return;
    };
    let mut rng = Rng(0x70b5_e1ec_7001);
    let (k, seg) = (512, TOPK_SEGMENT);
    assert_eq!(TOPK_SINGLE_MAX_COUNT, 2 * seg);
    // A 1M-context decode: 262,144 scores.
    check(
        &g,
        "random 262144",
        &[random_list(&mut rng, 262_144, 10.0)],
        k,
    );
    // Tokens of different counts in one launch (all through the same rounds): 1M, long,
    // 2 SEG + 1, SEG + 1, exactly k, below k, 1, 0.
    let mixed = vec![
        random_list(&mut rng, 262_144, 3.0),
        random_list(&mut rng, 70_000, 3.0),
        random_list(&mut rng, 2 * seg + 1, 3.0),
        random_list(&mut rng, seg + 1, 3.0),
        random_list(&mut rng, k, 3.0),
        random_list(&mut rng, 100, 3.0),
        random_list(&mut rng, 1, 3.0),
        Vec::new(),
    ];
    check(&g, "random mixed counts", &mixed, k);
    // Heavy ties: 7 distinct values, then 2.
    let vals = [-3.0f32, -1.0, -0.5, 0.0, 0.25, 1.0, 2.0];
    let mut ties: Vec<Vec<f32>> = [262_144, 70_000, 2 * seg + 1, 5000]
        .iter()
        .map(|&n| (0..n).map(|_| vals[rng.below(7)]).collect())
        .collect();
    check(&g, "7 distinct values", &ties, k);
    for l in &mut ties {
        for x in l.iter_mut() {
            *x = if *x > 0.0 { 1.0 } else { -1.0 };
        }
    }
    check(&g, "2 distinct values", &ties, k);
    // Ties exactly at the k-th value around segment boundaries: k - 10 rows above, 50 at it
    // (the 10 lowest-indexed are taken), the rest below.
    let n = 70_000;
    let mut v: Vec<f32> = (0..n).map(|_| -2.0 - rng.uniform(0.0, 1.0)).collect();
    let mut above = 0;
    while above < k - 10 {
        let i = rng.below(n);
        if v[i] < 0.0 {
            v[i] = 1.0 + above as f32;
            above += 1;
        }
    }
    let mut placed = 0;
    'boundaries: for b in (seg..n).step_by(seg) {
        for x in &mut v[b - 2..b + 2] {
            if placed == 50 {
                break 'boundaries;
            }
            if *x < 0.0 {
                *x = 0.5;
                placed += 1;
            }
        }
    }
    // The same with the ties at -0.0 and a few +0.0 rows (above them in total order).
    let mut z = v.clone();
    for x in z.iter_mut() {
        if *x == 0.5 {
            *x = -0.0;
        }
    }
    for x in &mut z[3 * seg - 3..3 * seg + 3] {
        if *x < -0.5 {
            *x = 0.0;
        }
    }
    check(&g, "ties at the k-th across segment boundaries", &[v, z], k);
    // -inf as the k-th value: fewer than k finite scores; and a list all -inf.
    let mut few = vec![f32::NEG_INFINITY; 70_000];
    for _ in 0..300 {
        let i = rng.below(few.len());
        few[i] = -rng.uniform(0.0, 1.0) * 1e3 - 2e3;
    }
    for b in (seg..few.len()).step_by(7 * seg) {
        few[b] = 5.0;
    }
    let all = vec![f32::NEG_INFINITY; 2 * seg + 1];
    check(&g, "-inf below k finite scores", &[few, all], k);
    // -inf every third score among negative ones.
    let neg: Vec<f32> = (0..70_000)
        .map(|i| {
            if i % 3 == 0 {
                f32::NEG_INFINITY
            } else {
                -rng.uniform(1.0, 2.0)
            }
        })
        .collect();
    check(&g, "-inf and negatives", &[neg], k);
    // A k that is not a power of two; a last segment of one score.
    check(
        &g,
        "k 100",
        &[
            random_list(&mut rng, 2 * seg + 1, 1.0),
            random_list(&mut rng, 3 * seg, 1.0),
        ],
        100,
    );
    // Many decoding tokens at once, each long (the largest two-stage launch).
    let many: Vec<Vec<f32>> = (0..TOPK_TWO_STAGE_MAX_TOKENS)
        .map(|t| random_list(&mut rng, 2 * seg + 1 + 997 * t, 1.0))
        .collect();
    check(&g, "128 tokens", &many, k);
}
