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
//! value too), -0.0 next to +0.0 and negative values. The split select of a tensor-parallel
//! group (each rank's top k of its share of the rows in index order, then
//! `Kernels::topk_merge_ranks` over the ranks' candidates as gathered) equals the same reference
//! exactly, for 2 and 3 ranks, ties straddling the share boundary included. Every
//! one-block-per-token launch runs in both block forms (`TopKBlock::Wide`, 1,024 threads, and
//! `TopKBlock::Smem`, 256 threads with the keys in shared memory, lists past its 16,384 keys read
//! from global memory). `prefill_chunk_select_timing` times both forms on a prefill chunk's
//! 8,192 lists and asserts their outputs equal bit for bit. Skips (passes with a SKIP line) where
//! there is no GPU.

use dspark_kernels::launch::attention::{
    topk_two_stage, TopKBlock, TopKBlockChoice, TOPK_SEGMENT, TOPK_SINGLE_MAX_COUNT,
    TOPK_TWO_STAGE_MAX_TOKENS,
};
use dspark_kernels::{
    indexer_rank_candidates, indexer_row_share, reference, topk_last_round,
    topk_select_workspace_bytes, TopKMergeRanks, TopKSelect,
};

mod common;
use common::{gpu, random_indexer_pool, time_us, Gpu, Rng};

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
        index_base: 0,
        index_order: false,
        rounds_only: false,
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
    let Some(mut g) = gpu("two_stage_select_equals_single_block_and_reference") else {
        return;
    };
    // Every one-block-per-token launch in both block forms.
    for block in [TopKBlock::Wide, TopKBlock::Smem] {
        g.k.set_topk_block_choice(TopKBlockChoice::Force(block));
        eprintln!("two_stage_select_equals_single_block_and_reference: {block:?} blocks");
        two_stage_cases(&g);
    }
}

fn two_stage_cases(g: &Gpu) {
    let mut rng = Rng(0x70b5_e1ec_7001);
    let (k, seg) = (512, TOPK_SEGMENT);
    assert_eq!(TOPK_SINGLE_MAX_COUNT, 2 * seg);
    // A 1M-context decode: 262,144 scores.
    check(
        g,
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
    check(g, "random mixed counts", &mixed, k);
    // Heavy ties: 7 distinct values, then 2.
    let vals = [-3.0f32, -1.0, -0.5, 0.0, 0.25, 1.0, 2.0];
    let mut ties: Vec<Vec<f32>> = [262_144, 70_000, 2 * seg + 1, 5000]
        .iter()
        .map(|&n| (0..n).map(|_| vals[rng.below(7)]).collect())
        .collect();
    check(g, "7 distinct values", &ties, k);
    for l in &mut ties {
        for x in l.iter_mut() {
            *x = if *x > 0.0 { 1.0 } else { -1.0 };
        }
    }
    check(g, "2 distinct values", &ties, k);
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
    check(g, "ties at the k-th across segment boundaries", &[v, z], k);
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
    check(g, "-inf below k finite scores", &[few, all], k);
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
    check(g, "-inf and negatives", &[neg], k);
    // A k that is not a power of two; a last segment of one score.
    check(
        g,
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
    check(g, "128 tokens", &many, k);
}

/// The select of a tensor-parallel group whose ranks split each token's scores
/// ([`indexer_row_share`]): every rank's top k of its share (index order, rows numbered from the
/// share's start), or with `from_rounds`, where the shares take the two stages, the last round's
/// candidates left in the workspace (`rounds_only`); the ranks' outputs concatenated as an
/// all-gather leaves them, then `topk_merge_ranks` over them. Returns out_idx and out_val,
/// `[tokens, k]`, of the merge.
fn select_in_shares(
    g: &Gpu,
    lists: &[Vec<f32>],
    tokens: usize,
    k: usize,
    ranks: usize,
    from_rounds: bool,
) -> (Vec<i32>, Vec<f32>) {
    let mut flat = Vec::new();
    let mut list_starts = Vec::new();
    for t in 0..tokens {
        list_starts.push(flat.len() as i64);
        flat.extend_from_slice(lists.get(t).map_or(&[][..], |l| &l[..]));
    }
    flat.push(0.0);
    let count = |t: usize| lists.get(t).map_or(0, Vec::len);
    let sd = g.up(&flat);
    // One bound for every rank's launch (rank 0 has the longest shares), as the layer stack
    // sizes them from the step's bucket.
    let max_count = (0..tokens)
        .map(|t| {
            let (s, e) = indexer_row_share(count(t), k, ranks, 0);
            e - s
        })
        .max()
        .unwrap_or(0);
    let last_round = if from_rounds {
        topk_last_round(tokens, max_count, k)
    } else {
        None
    };
    let (stride, levels) = last_round.map_or((k, 0), |(_, stride, levels)| (stride, levels));
    let mut gathered: Vec<f32> = Vec::new();
    for rank in 0..ranks {
        let shares: Vec<(usize, usize)> = (0..tokens)
            .map(|t| indexer_row_share(count(t), k, ranks, rank))
            .collect();
        let starts: Vec<i64> = (0..tokens)
            .map(|t| list_starts[t] + shares[t].0 as i64)
            .collect();
        let counts: Vec<i32> = shares.iter().map(|&(s, e)| (e - s) as i32).collect();
        let bases: Vec<i32> = shares.iter().map(|&(s, _)| s as i32).collect();
        let bytes = topk_select_workspace_bytes(tokens, max_count, k);
        let (std_, cd, bd) = (g.up(&starts), g.up(&counts), g.up(&bases));
        // NaN where a rank writes nothing: a merge reading past a rank's candidates would take it.
        let send = g.up(&vec![f32::NAN; 2 * tokens * k]);
        let work = g.up(&vec![f32::NAN; bytes.div_ceil(4).max(1)]);
        let call = TopKSelect {
            scores: g.ptr(&sd),
            starts: g.ptr(&std_),
            counts: g.ptr(&cd),
            tokens,
            k,
            out_val: g.ptr(&send),
            out_idx: g.ptr(&send) + (tokens * k * 4) as u64,
            max_count,
            workspace: if bytes > 0 { g.ptr(&work) } else { 0 },
            index_base: g.ptr(&bd),
            index_order: true,
            rounds_only: last_round.is_some(),
        };
        // SAFETY: each share lies inside `flat`, send holds 2 tokens k, max_count is the largest
        // share and `work` holds the workspace for it.
        unsafe { g.k.topk_select(&g.s, &call) }.unwrap();
        match last_round {
            Some((bytes, stride, _)) => {
                let at = bytes / 4;
                gathered.extend_from_slice(&g.down(&work)[at..at + 2 * tokens * stride]);
            }
            None => gathered.extend(g.down(&send)),
        }
    }
    let (per, candidates): (Vec<i32>, Vec<i32>) = (0..tokens)
        .map(|t| {
            let (per, all) = indexer_rank_candidates(count(t), k, ranks, levels);
            (per as i32, all as i32)
        })
        .unzip();
    let (gd, cd, pd) = (g.up(&gathered), g.up(&candidates), g.up(&per));
    let idx = g.up(&vec![SENTINEL_IDX; tokens * k]);
    let val = g.up(&vec![SENTINEL_VAL; tokens * k]);
    let merge = TopKMergeRanks {
        gathered: g.ptr(&gd),
        counts: g.ptr(&cd),
        per_rank: g.ptr(&pd),
        stride,
        max_count: ranks * stride,
        tokens,
        k,
        out_idx: g.ptr(&idx),
        out_val: g.ptr(&val),
    };
    // SAFETY: gathered holds every rank's 2 tokens stride words; no count exceeds what they
    // hold.
    unsafe { g.k.topk_merge_ranks(&g.s, &merge) }.unwrap();
    (g.down(&idx), g.down(&val))
}

/// The split select over `lists` equals the reference exactly, with each rank's share through
/// the two stages (the lists as given, where a share is long), merged from the shares' top k
/// and from their last rounds' candidates, and through the single block (padded past
/// TOPK_TWO_STAGE_MAX_TOKENS tokens).
fn check_shares(g: &Gpu, name: &str, lists: &[Vec<f32>], k: usize, ranks: usize) {
    let padded = TOPK_TWO_STAGE_MAX_TOKENS + 1;
    let runs = [
        (
            "shares",
            select_in_shares(g, lists, lists.len(), k, ranks, false),
        ),
        (
            "shares' last rounds",
            select_in_shares(g, lists, lists.len(), k, ranks, true),
        ),
        (
            "single-block shares",
            select_in_shares(g, lists, padded, k, ranks, true),
        ),
    ];
    for (t, list) in lists.iter().enumerate() {
        let want = written_order(reference::topk(list, k));
        for (which, (idx, val)) in &runs {
            for j in 0..k {
                let (gi, gv) = (idx[t * k + j], val[t * k + j]);
                match want.get(j) {
                    Some(&(wv, wi)) => assert!(
                        gi == wi && gv.to_bits() == wv.to_bits(),
                        "{name} {which} ({ranks} ranks): token {t} ({} scores) row {j}: ({gi}, \
                         {gv}) vs ({wi}, {wv})",
                        list.len()
                    ),
                    None => assert!(
                        gi == SENTINEL_IDX && gv.to_bits() == SENTINEL_VAL.to_bits(),
                        "{name} {which} ({ranks} ranks): token {t} ({} scores) wrote row {j} \
                         past min(k, count)",
                        list.len()
                    ),
                }
            }
        }
    }
    eprintln!(
        "top-k {name}: {} tokens over {ranks} ranks' shares, k {k}: exact",
        lists.len()
    );
}

/// A tensor-parallel group's split select (each rank's top k of its share of the rows, gathered
/// and merged) writes exactly what one select over the whole lists writes: the same rows in the
/// same order, ties at the k-th value to the lower row even where they straddle two shares.
#[test]
fn rank_shares_merged_equal_one_select() {
    let Some(mut g) = gpu("rank_shares_merged_equal_one_select") else {
        return;
    };
    // Every one-block-per-token launch in both block forms.
    for block in [TopKBlock::Wide, TopKBlock::Smem] {
        g.k.set_topk_block_choice(TopKBlockChoice::Force(block));
        eprintln!("rank_shares_merged_equal_one_select: {block:?} blocks");
        rank_share_cases(&g);
    }
}

fn rank_share_cases(g: &Gpu) {
    let mut rng = Rng(0x70b5_e1ec_7002);
    let k = 512;
    // The shares of each rank are max(ceil(n / ranks), k) rows.
    assert_eq!(indexer_row_share(262_144, k, 2, 1), (131_072, 262_144));
    assert_eq!(indexer_row_share(700, k, 2, 0), (0, 512));
    assert_eq!(indexer_row_share(700, k, 2, 1), (512, 700));
    assert_eq!(indexer_row_share(300, k, 2, 1), (300, 300));
    assert_eq!(indexer_rank_candidates(700, k, 2, 0), (512, 700));
    assert_eq!(indexer_rank_candidates(262_144, k, 2, 0), (512, 1024));
    assert_eq!(indexer_rank_candidates(300, k, 3, 0), (300, 300));
    // After the rounds of a two-stage select: 131,072 rows keep 32 x 512, then 4 x 512.
    assert_eq!(indexer_rank_candidates(262_144, k, 2, 1), (16_384, 32_768));
    assert_eq!(indexer_rank_candidates(262_144, k, 2, 2), (2_048, 4_096));
    assert_eq!(topk_last_round(1, 131_072, k), Some((16_384 * 8, 2_048, 2)));
    assert_eq!(topk_last_round(1, 8_192, k), None);
    for ranks in [2, 3] {
        // A 1M-context decode, long and short lists, exactly k, 2 k, 2 k + 1, below k, 1, 0.
        let mixed = vec![
            random_list(&mut rng, 262_144, 3.0),
            random_list(&mut rng, 70_000, 3.0),
            random_list(&mut rng, 2 * k + 1, 3.0),
            random_list(&mut rng, 2 * k, 3.0),
            random_list(&mut rng, k + 188, 3.0),
            random_list(&mut rng, k, 3.0),
            random_list(&mut rng, 100, 3.0),
            random_list(&mut rng, 1, 3.0),
            Vec::new(),
        ];
        check_shares(g, "random mixed counts", &mixed, k, ranks);
        // Heavy ties: 3 distinct values, so the k-th value's ties fill every share.
        let vals = [-1.0f32, 0.0, 1.0];
        let ties: Vec<Vec<f32>> = [70_000, 5_000, 1_500, 700]
            .iter()
            .map(|&n| (0..n).map(|_| vals[rng.below(3)]).collect())
            .collect();
        check_shares(g, "3 distinct values", &ties, k, ranks);
        // k - 10 rows above, then ties at the k-th value on both sides of the share boundary.
        let n = 70_000;
        let mut v: Vec<f32> = (0..n).map(|_| -2.0 - rng.uniform(0.0, 1.0)).collect();
        for (i, x) in v.iter_mut().take(k - 10).enumerate() {
            *x = 1.0 + i as f32;
        }
        let boundary = indexer_row_share(n, k, ranks, 1).0;
        for x in &mut v[boundary - 20..boundary + 20] {
            *x = 0.5;
        }
        // -inf below fewer than k finite scores.
        let mut few = vec![f32::NEG_INFINITY; 20_000];
        for x in few.iter_mut().step_by(97) {
            *x = rng.uniform(-5.0, 5.0);
        }
        check_shares(
            g,
            "ties across the share boundary, -inf",
            &[v, few],
            k,
            ranks,
        );
        check_shares(
            g,
            "k 100",
            &[
                random_list(&mut rng, 9_000, 1.0),
                random_list(&mut rng, 150, 1.0),
            ],
            100,
            ranks,
        );
    }
}

/// Microseconds per decode token and CSA layer of the indexer's scores and select, as a rank of
/// a TP=2 group runs them, over FP8 rows on the tensor cores (`--nocapture` prints them):
/// - heads split (each rank 32 of the 64 heads over every row, the scores then all-reduced, and
///   every rank selecting from all of them),
/// - whole (a rank with all 64 heads over every row, no exchange: short contexts),
/// - rows split (64 heads over the rank's share, its top k in index order, then the merge of
///   both ranks' candidates).
///
/// The collectives are not in these figures (an all-reduce of the scores against an all-gather
/// of 2 k candidates per rank).
#[test]
fn split_indexer_timing() {
    let Some(g) = gpu("split_indexer_timing") else {
        return;
    };
    use dspark_kernels::{IndexerScores, KvRowFormat};
    let mut rng = Rng(0x70b5_e1ec_7003);
    let (heads, dim, k, bs, ratio) = (64, 128, 512, 128, 4);
    let format = KvRowFormat::Fp8Indexer;
    let rows_per_block = bs / ratio;
    let max_rows = 262_144;
    let blocks = max_rows / rows_per_block;
    let pool = random_indexer_pool(&mut rng, format, dim, rows_per_block, blocks);
    let (fpb, base, stride) = (pool.floats_per_block, pool.base, pool.stride);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let pool_d = g.up(&pool.data);
    let bt_d = g.up(&table);
    let q_d = g.up(&rng.signed_vec(heads * dim, 1.0));
    let w_d = g.up(&rng.signed_vec(heads, 1.0));
    let zero_i32 = g.up(&[0i32]);
    let zero_i64 = g.up(&[0i64]);
    let scores = g.up(&vec![0f32; max_rows]);
    let send = g.up(&vec![0f32; 4 * k]);
    // Both ranks' candidates as the merge reads them: their top k, or their last rounds'.
    let gathered = g.up(&vec![0f32; 4 * TOPK_SEGMENT]);
    let out_idx = g.up(&vec![0i32; k]);
    let out_val = g.up(&vec![0f32; k]);
    let reps = 100;
    for rows in [2_048usize, 32_768, 262_144] {
        let (share_start, share_end) = indexer_row_share(rows, k, 2, 1);
        let share = share_end - share_start;
        let vis_d = g.up(&[rows as i32]);
        let share_start_d = g.up(&[share_start as i32]);
        let share_count_d = g.up(&[share as i32]);
        let share_end_d = g.up(&[share_end as i32]);
        let share_at_d = g.up(&[share_start as i64]);
        // Where the share's select takes rounds, the merge takes its last round's candidates.
        let last_round = topk_last_round(1, share, k);
        let (merge_stride, levels) =
            last_round.map_or((k, 0), |(_, stride, levels)| (stride, levels));
        let (per, all) = indexer_rank_candidates(rows, k, 2, levels);
        let (per_d, cand_d) = (g.up(&[per as i32]), g.up(&[all as i32]));
        let work = g.up(&vec![
            0f32;
            topk_select_workspace_bytes(1, rows, k)
                .div_ceil(4)
                .max(1)
        ]);
        let scoring = |heads: usize, row_starts, visible, max_visible| IndexerScores {
            pool: g.ptr(&pool_d),
            q: g.ptr(&q_d),
            weights: g.ptr(&w_d),
            block_tables: g.ptr(&bt_d),
            block_table_starts: g.ptr(&zero_i32),
            visible,
            row_starts,
            out_starts: g.ptr(&zero_i64),
            out: g.ptr(&scores),
            tokens: 1,
            max_visible,
            floats_per_block: fpb,
            block_size: bs,
            base,
            ratio,
            stride,
            heads,
            dim,
            scale: (dim as f32).powf(-0.5),
            format,
            tensor_cores: true,
        };
        let select = TopKSelect {
            scores: g.ptr(&scores),
            starts: g.ptr(&zero_i64),
            counts: g.ptr(&vis_d),
            tokens: 1,
            k,
            out_idx: g.ptr(&out_idx),
            out_val: g.ptr(&out_val),
            max_count: rows,
            workspace: g.ptr(&work),
            index_base: 0,
            index_order: false,
            rounds_only: false,
        };
        let share_select = TopKSelect {
            starts: g.ptr(&share_at_d),
            counts: g.ptr(&share_count_d),
            out_val: g.ptr(&send),
            out_idx: g.ptr(&send) + (k * 4) as u64,
            max_count: share,
            index_base: g.ptr(&share_start_d),
            index_order: true,
            rounds_only: last_round.is_some(),
            ..select
        };
        let merge = TopKMergeRanks {
            gathered: g.ptr(&gathered),
            counts: g.ptr(&cand_d),
            per_rank: g.ptr(&per_d),
            stride: merge_stride,
            max_count: 2 * merge_stride,
            tokens: 1,
            k,
            out_idx: g.ptr(&out_idx),
            out_val: g.ptr(&out_val),
        };
        let time = |f: &dyn Fn()| time_us(&g, reps, f);
        // SAFETY (all three): the pool holds every row the table addresses, scores `rows`
        // floats, the workspace is sized for `rows`, send 2 k values and indices (the merge
        // reads it as both ranks' candidates).
        let heads_split = time(&|| unsafe {
            g.k.indexer_scores(&g.s, &scoring(32, 0, g.ptr(&vis_d), rows))
                .unwrap();
            g.k.topk_select(&g.s, &select).unwrap();
        });
        let whole = time(&|| unsafe {
            g.k.indexer_scores(&g.s, &scoring(64, 0, g.ptr(&vis_d), rows))
                .unwrap();
            g.k.topk_select(&g.s, &select).unwrap();
        });
        let scores_only = time(&|| unsafe {
            g.k.indexer_scores(
                &g.s,
                &scoring(64, g.ptr(&share_start_d), g.ptr(&share_end_d), share),
            )
            .unwrap();
        });
        let rows_split = time(&|| unsafe {
            g.k.indexer_scores(
                &g.s,
                &scoring(64, g.ptr(&share_start_d), g.ptr(&share_end_d), share),
            )
            .unwrap();
            g.k.topk_select(&g.s, &share_select).unwrap();
            g.k.topk_merge_ranks(&g.s, &merge).unwrap();
        });
        eprintln!(
            "indexer at {rows} rows, one decode token, a rank of TP=2 ({levels} rounds before the \
             merge): heads split {heads_split:.1} \
             us, whole {whole:.1} us, rows split {rows_split:.1} us (its scores {scores_only:.1} \
             us); collectives not included"
        );
    }
}

/// Microseconds per CSA layer of a prefill chunk's select on one rank of a TP=2 group (8,192
/// tokens, `--nocapture` prints them): each token's top 512 of its share of the rows (index
/// order), then the merge of both ranks' 512 candidates, in both block forms ([`TopKBlock`]),
/// for a chunk in the middle of a 100K prompt (shares of 5.6-6.6K rows) and at its end (11.5-12.5K).
/// The two forms' outputs must be equal bit for bit.
#[test]
fn prefill_chunk_select_timing() {
    let Some(mut g) = gpu("prefill_chunk_select_timing") else {
        return;
    };
    let mut rng = Rng(0x70b5_e1ec_7004);
    let (tokens, k, ratio) = (8_192usize, 512usize, 4usize);
    // One pool of scores that every token's list is a window of.
    let pool_len = 1 << 25;
    let pool = g.up(&random_list(&mut rng, pool_len, 2.0));
    let gathered_vals = random_list(&mut rng, 2 * tokens * k, 2.0);
    let mut gathered = Vec::with_capacity(4 * tokens * k);
    for rank in 0..2 {
        gathered.extend_from_slice(&gathered_vals[rank * tokens * k..(rank + 1) * tokens * k]);
        gathered.extend((0..tokens * k).map(|i| f32::from_bits((rank * k + i % k) as u32)));
    }
    let gathered = g.up(&gathered);
    let merge_counts = g.up(&vec![2 * k as i32; tokens]);
    let merge_per = g.up(&vec![k as i32; tokens]);
    let reps = 5;
    for first_pos in [48_000usize, 92_000] {
        let shares: Vec<(usize, usize)> = (0..tokens)
            .map(|t| indexer_row_share((first_pos + t + 1) / ratio, k, 2, 0))
            .collect();
        let max_share = shares.iter().map(|&(s, e)| e - s).max().unwrap_or(0);
        let starts: Vec<i64> = (0..tokens)
            .map(|t| ((t * 7_919) % (pool_len - max_share)) as i64)
            .collect();
        let counts: Vec<i32> = shares.iter().map(|&(s, e)| (e - s) as i32).collect();
        let bases: Vec<i32> = shares.iter().map(|&(s, _)| s as i32).collect();
        let (std_, cd, bd) = (g.up(&starts), g.up(&counts), g.up(&bases));
        let send = g.up(&vec![0f32; 2 * tokens * k]);
        let (out_idx, out_val) = (g.up(&vec![0i32; tokens * k]), g.up(&vec![0f32; tokens * k]));
        let select = TopKSelect {
            scores: g.ptr(&pool),
            starts: g.ptr(&std_),
            counts: g.ptr(&cd),
            tokens,
            k,
            out_val: g.ptr(&send),
            out_idx: g.ptr(&send) + (tokens * k * 4) as u64,
            max_count: max_share,
            workspace: 0,
            index_base: g.ptr(&bd),
            index_order: true,
            rounds_only: false,
        };
        let merge = TopKMergeRanks {
            gathered: g.ptr(&gathered),
            counts: g.ptr(&merge_counts),
            per_rank: g.ptr(&merge_per),
            stride: k,
            max_count: 2 * k,
            tokens,
            k,
            out_idx: g.ptr(&out_idx),
            out_val: g.ptr(&out_val),
        };
        let mut outputs = Vec::new();
        for block in [TopKBlock::Wide, TopKBlock::Smem] {
            g.k.set_topk_block_choice(TopKBlockChoice::Force(block));
            let g = &g;
            // SAFETY: every window lies inside the pool, send holds 2 tokens k, the gathered
            // buffer both ranks' 2 tokens k words, the outputs tokens k.
            let select_us = time_us(g, reps, &|| unsafe {
                g.k.topk_select(&g.s, &select).unwrap();
            });
            let merge_us = time_us(g, reps, &|| unsafe {
                g.k.topk_merge_ranks(&g.s, &merge).unwrap();
            });
            eprintln!(
                "prefill chunk at {first_pos}: {tokens} tokens, shares up to {max_share} rows, \
                 {block:?} blocks: select {select_us:.0} us, merge {merge_us:.0} us"
            );
            outputs.push((
                g.down(&send)
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                g.down(&out_idx),
                g.down(&out_val)
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
            ));
        }
        assert!(
            outputs[0] == outputs[1],
            "prefill chunk at {first_pos}: the block forms' outputs differ"
        );
    }
}
