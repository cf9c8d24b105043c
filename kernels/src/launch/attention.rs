//! Launches of `attention.cu`: the f32 KV pool's row scatter/gather, split-KV attention with
//! per-head sinks over per-token key lists, and the Lightning Indexer's scores over a sequence's
//! compressed rows addressed through its block table.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig};

use super::submit::SubmitKernel;
use super::{i32_arg, i64_arg, nonnull, u32_grid, Kernels};
use crate::error::KernelError;
use crate::kv_record::KvRowFormat;

/// Largest head dimension of the attention kernel (32 lanes x 16 values).
pub const ATTENTION_MAX_HEAD_DIM: usize = 512;
/// Largest indexer head dimension (32 lanes x 8 values).
pub const INDEXER_MAX_DIM: usize = 256;
/// Shared memory a block may use without opting in.
const DEFAULT_SMEM: usize = 48 * 1024;

/// `rows` rows of `width` f32 between a dense buffer and the pool: row `r` at pool element
/// `offsets[r]` (i64).
#[derive(Clone, Copy, Debug)]
pub struct KvRows {
    pub pool: CUdeviceptr,
    /// i64 `[rows]` element offsets into the pool.
    pub offsets: CUdeviceptr,
    /// f32 `[rows, width]`.
    pub dense: CUdeviceptr,
    pub rows: usize,
    pub width: usize,
}

/// Attention of `tokens` query tokens with `heads` heads of `head_dim` over per-token key lists
/// (K = V rows of the pool), softmax with a per-head sink logit.
#[derive(Clone, Copy, Debug)]
pub struct PagedAttention {
    pub pool: CUdeviceptr,
    /// f32 `[tokens, heads, head_dim]`.
    pub q: CUdeviceptr,
    /// i64 pool offsets of every key row, token by token.
    pub key_offsets: CUdeviceptr,
    /// i32 `[tokens + 1]`: token `t`'s keys are `key_offsets[key_starts[t]..key_starts[t + 1]]`.
    pub key_starts: CUdeviceptr,
    /// f32 `[heads]`.
    pub sinks: CUdeviceptr,
    /// f32 `[tokens, heads, head_dim]`.
    pub out: CUdeviceptr,
    /// f32 `[attention_workspace_floats(..)]`.
    pub workspace: CUdeviceptr,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Splits of each token's keys (see [`attention_splits`]).
    pub splits: usize,
    pub scale: f32,
    /// How the key rows are stored (a row of `head_dim` values at each offset).
    pub format: KvRowFormat,
    /// Undo RoPE on the output's trailing channels in the merge (K = V rows carried it into the
    /// output), saving the separate inverse [`super::RopeF32`] launch; `None` leaves it.
    pub inverse_rope: Option<InverseRope>,
    /// `Some(eps)`: `q` holds each head's raw projection, and pass 1 RMS-norms it (no weight,
    /// this epsilon) and rotates its trailing channels forward by [`Self::inverse_rope`]'s table
    /// as it stages the queries, the bits [`super::RmsNormRopeF32`] (norm + RoPE, 256-thread
    /// blocks) would write first, without that launch's round trip of the queries through
    /// memory. The f16 tensor-core forms only, with `inverse_rope` given (else `InvalidLaunch`).
    pub query_norm_eps: Option<f32>,
    /// Run pass 2 as its own launch even where pass 1 would finish the rows itself (the f16 forms
    /// over one split write the output directly, the same bits): tests compare the two.
    pub separate_merge: bool,
    /// `out` holds f16 `[tokens, heads, head_dim]` instead of f32: the values rounded to nearest
    /// as `rows_to_f16` rounds them, for a GEMM that takes f16 input. Only where pass 1 finishes
    /// the rows ([`finishes_in_pass_one`]), else `InvalidLaunch`.
    pub out_f16: bool,
}

/// Whether pass 1 in `form` finishes `a`'s rows itself (the f16 forms over one split, unless
/// [`PagedAttention::separate_merge`]), with no workspace records and no merge launch.
pub fn finishes_in_pass_one(a: &PagedAttention, form: AttentionTcForm) -> bool {
    form.is_f16() && a.splits == 1 && !a.separate_merge
}

/// The rotation [`PagedAttention::inverse_rope`] undoes: each token's position, the RoPE table
/// and attention factor the keys were rotated with, on the trailing `rope_dim` channels.
#[derive(Clone, Copy, Debug)]
pub struct InverseRope {
    /// i32 `[tokens]`.
    pub positions: CUdeviceptr,
    /// f32 `[rope_dim / 2]`.
    pub inv_freq: CUdeviceptr,
    pub rope_dim: usize,
    pub attention_factor: f32,
}

/// Dimensions one block of the attention merge writes (`DSK_COMBINE_DIMS` in attention.cu).
const COMBINE_DIMS: usize = 128;

/// Lightning Indexer scores of `tokens` query tokens over their sequences' compressed rows.
#[derive(Clone, Copy, Debug)]
pub struct IndexerScores {
    pub pool: CUdeviceptr,
    /// f32 `[tokens, heads, dim]` (RoPE applied).
    pub q: CUdeviceptr,
    /// f32 `[tokens, heads]` head weights, already scaled.
    pub weights: CUdeviceptr,
    /// u32 block tables of every token, concatenated.
    pub block_tables: CUdeviceptr,
    /// i32 `[tokens]`: where each token's block table starts.
    pub block_table_starts: CUdeviceptr,
    /// i32 `[tokens]`: the end of the rows each token scores: the rows it sees, or the end of
    /// its share of them.
    pub visible: CUdeviceptr,
    /// i32 `[tokens]`: the first row each token scores, or 0 (null) for all from row 0. A rank
    /// of a tensor-parallel group scores its share of the rows ([`indexer_row_share`]: starts
    /// here, ends in `visible`); rows outside `[row_starts[t], visible[t])` are not written.
    pub row_starts: CUdeviceptr,
    /// i64 `[tokens]`: where each token's scores start in `out` (row r at `out_starts[t] + r`).
    pub out_starts: CUdeviceptr,
    /// f32 scores, `sum(visible)` values.
    pub out: CUdeviceptr,
    pub tokens: usize,
    /// The most rows a token scores (`max(visible - row_starts)`), sizes the grid.
    pub max_visible: usize,
    /// Row addressing: `block_table[r * ratio / block_size] * floats_per_block + base +
    /// (r * ratio % block_size) / ratio * stride`.
    pub floats_per_block: usize,
    pub block_size: usize,
    pub base: usize,
    pub ratio: usize,
    pub stride: usize,
    pub heads: usize,
    pub dim: usize,
    pub scale: f32,
    /// How the rows are stored: `F32`, `Bf16` or `Fp8Indexer`; `stride` is in slots, at least
    /// `format.slots(dim)`.
    pub format: KvRowFormat,
    /// Score on the TF32 tensor cores where the shape fits ([`indexer_mma_fits`]): the queries
    /// (and f32 keys) round to TF32, 2^-11 relative per value. Off: the f32 kernels.
    pub tensor_cores: bool,
}

/// Top `k` of each token's scores, selected on the GPU: indices (i32) and values (f32) of the rows
/// above the k-th largest (in index order), then of its lowest-indexed ties (in index order),
/// `[tokens, k]` (the first `min(k, counts[t])` of a token's row are written).
#[derive(Clone, Copy, Debug)]
pub struct TopKSelect {
    /// f32 scores of every token, token after token.
    pub scores: CUdeviceptr,
    /// i64 `[tokens]`: where each token's scores start.
    pub starts: CUdeviceptr,
    /// i32 `[tokens]`: how many scores each token has.
    pub counts: CUdeviceptr,
    pub tokens: usize,
    pub k: usize,
    /// i32 `[tokens, k]`.
    pub out_idx: CUdeviceptr,
    /// f32 `[tokens, k]`.
    pub out_val: CUdeviceptr,
    /// At least every token's count: picks the single-block or the two-stage select
    /// ([`topk_two_stage`]) and sizes the two-stage grid; counts above it are cut to the
    /// segments it covers.
    pub max_count: usize,
    /// [`topk_select_workspace_bytes`]`(tokens, max_count, k)` bytes (4-byte aligned) of
    /// scratch for the two-stage select; 0 allowed where that is 0.
    pub workspace: CUdeviceptr,
    /// i32 `[tokens]`: the row of each token's first score (its indices are `index_base[t] +
    /// position`), or 0 (null) for rows from 0: a rank's share of the rows.
    pub index_base: CUdeviceptr,
    /// Write all the selected rows in index order (a rank's share, for
    /// [`Kernels::topk_merge_ranks`]) rather than those above the k-th value, then its ties.
    pub index_order: bool,
    /// Stop the two-stage select before its last block: the last round's candidates (a superset
    /// of the top k, in index order) stay in the workspace where [`topk_last_round`] says, for a
    /// rank's share to be merged with the other ranks' ([`Kernels::topk_merge_ranks`]) without a
    /// select of its own. Only with the two stages ([`topk_two_stage`]); out_idx / out_val are
    /// not written.
    pub rounds_only: bool,
}

/// The rows `[start, end)` of a token's `visible` indexer rows that rank `rank` of `ranks` scores
/// and selects from when a tensor-parallel group splits the rows (every rank holds all the
/// indexer heads): contiguous shares of `max(ceil(visible / ranks), k)` rows, rank after rank, so
/// every rank before the last with rows keeps exactly `k` candidates and the gathered candidates
/// are in row order ([`Kernels::topk_merge_ranks`]). Ranks past the rows get an empty share.
pub fn indexer_row_share(visible: usize, k: usize, ranks: usize, rank: usize) -> (usize, usize) {
    let share = visible.div_ceil(ranks.max(1)).max(k);
    let start = (rank * share).min(visible);
    (start, ((rank + 1) * share).min(visible))
}

/// Candidates of a token with `visible` rows once each of `ranks` kept a superset of the top `k`
/// of its [`indexer_row_share`]: its top k (`levels` 0: [`TopKSelect`] written out), or the
/// candidates after `levels` rounds of the two-stage select ([`TopKSelect::rounds_only`]).
/// Returns (what rank 0 keeps, which every rank before the last with rows keeps too; the sum
/// over the ranks).
pub fn indexer_rank_candidates(
    visible: usize,
    k: usize,
    ranks: usize,
    levels: usize,
) -> (usize, usize) {
    let kept = |r: usize| {
        let (start, end) = indexer_row_share(visible, k, ranks, r);
        if levels == 0 {
            (end - start).min(k)
        } else {
            topk_level_count(end - start, k.min(TOPK_SEGMENT), levels)
        }
    };
    (kept(0), (0..ranks.max(1)).map(kept).sum())
}

/// Candidates a list of `n` scores has after `levels` rounds of keeping the top `kseg` of every
/// [`TOPK_SEGMENT`] of them (`dsk_topk_level_count` in attention.cu).
pub fn topk_level_count(mut n: usize, kseg: usize, levels: usize) -> usize {
    for _ in 0..levels {
        if n == 0 {
            break;
        }
        let segs = n.div_ceil(TOPK_SEGMENT);
        n = (segs - 1) * kseg + kseg.min(n - (segs - 1) * TOPK_SEGMENT);
    }
    n
}

/// Where the two-stage select of `tokens` lists of at most `max_count` scores leaves its last
/// round's candidates in the workspace ([`TopKSelect::rounds_only`]): (byte offset, candidates
/// per token, rounds). The values `[tokens, stride]` (f32) start there, the indices
/// `[tokens, stride]` (i32) follow. `None` where the select is not two-stage.
pub fn topk_last_round(tokens: usize, max_count: usize, k: usize) -> Option<(usize, usize, usize)> {
    if !topk_two_stage(tokens, max_count, k) {
        return None;
    }
    let rounds = topk_rounds(max_count, k);
    let (last, before) = rounds.split_last()?;
    Some((
        tokens * before.iter().sum::<usize>() * 8,
        *last,
        rounds.len(),
    ))
}

/// The top `k` of each token's candidates gathered from the ranks of a tensor-parallel group
/// ([`Kernels::topk_merge_ranks`]).
#[derive(Clone, Copy, Debug)]
pub struct TopKMergeRanks {
    /// f32 words, `ranks` blocks of `2 * tokens * stride`: a rank's candidates' values
    /// `[tokens, stride]`, then their indices `[tokens, stride]` (i32 bits), as an all-gather of
    /// each rank's [`TopKSelect`] over its [`indexer_row_share`] leaves them: its output (index
    /// order, `stride` = k) or its last round ([`TopKSelect::rounds_only`], [`topk_last_round`]).
    pub gathered: CUdeviceptr,
    /// i32 `[tokens]`: candidates per token, over all the ranks ([`indexer_rank_candidates`]).
    pub counts: CUdeviceptr,
    /// i32 `[tokens]`: the candidates of rank 0 ([`indexer_rank_candidates`]).
    pub per_rank: CUdeviceptr,
    /// Candidates a rank's block holds per token.
    pub stride: usize,
    /// The largest count (at most `ranks * stride`): sizes the shared-memory select's key
    /// buffer ([`TopKBlock::Smem`]). A longer list is still selected exactly, its keys read
    /// from global memory in every pass.
    pub max_count: usize,
    pub tokens: usize,
    pub k: usize,
    /// i32 `[tokens, k]`.
    pub out_idx: CUdeviceptr,
    /// f32 `[tokens, k]`.
    pub out_val: CUdeviceptr,
}

/// The block form of a one-block-per-token select ([`Kernels::topk_select`] outside the two
/// stages, [`Kernels::topk_merge_ranks`]); both write the same rows in the same order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopKBlock {
    /// 1,024 threads over the list (`dsk_topk_block_of`): the lowest latency for one token,
    /// but one block an SM.
    Wide,
    /// 256 threads with the list's keys in shared memory (`dsk_topk_block_smem`): several
    /// blocks an SM, for launches of many tokens (prefill chunks).
    Smem,
}

/// How an A/B switch between kernel forms picks one: by the launch's rule, or always the one
/// named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelChoice<T> {
    Auto,
    Force(T),
}

/// How [`TopKBlock`] is picked (DSPARK_TOPK_BLOCK: `auto`, `wide` or `smem`): `Auto` takes
/// [`TopKBlock::Wide`] for launches of [`TOPK_WIDE_TOKENS`] tokens, else [`TopKBlock::Smem`].
pub type TopKBlockChoice = KernelChoice<TopKBlock>;

pub fn topk_block_choice(value: Option<&str>) -> Result<TopKBlockChoice, KernelError> {
    use KernelChoice::{Auto, Force};
    let forms = [
        ("auto", Auto),
        ("wide", Force(TopKBlock::Wide)),
        ("smem", Force(TopKBlock::Smem)),
    ];
    env_switch("topk_select", "DSPARK_TOPK_BLOCK", value, &forms)
}

/// An A/B switch's value: unset or empty is the first option, else the option named (spaces
/// trimmed), else an error naming the variable and its options.
pub(crate) fn env_switch<T: Copy>(
    kernel: &'static str,
    var: &str,
    value: Option<&str>,
    options: &[(&str, T)],
) -> Result<T, KernelError> {
    let value = value.map(str::trim).filter(|v| !v.is_empty());
    let Some(value) = value else {
        return Ok(options[0].1);
    };
    options
        .iter()
        .find(|(name, _)| *name == value)
        .map(|&(_, choice)| choice)
        .ok_or_else(|| {
            let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
            KernelError::invalid(
                kernel,
                format!("{var} = {value:?}; expected one of {}", names.join(", ")),
            )
        })
}

/// Tokens of a launch that [`TopKBlockChoice::Auto`] gives the wide blocks. Measured in decode
/// steps at 8K (one H200, one TP=2 rank's shapes, session 35): the shared-key form's fewer
/// barriers and its early end (a pass whose bin holds one key) won at 1 and 6 tokens (-0.05 and
/// -0.1 ms a step, a K=5 verify -0.1 ms) and lost at 16 (+0.13 ms); a prefill chunk's thousands
/// of lists fill every SM either way and the small blocks overlap each other's barriers.
pub const TOPK_WIDE_TOKENS: std::ops::RangeInclusive<usize> = 9..=TOPK_TWO_STAGE_MAX_TOKENS;
/// Most keys the shared-memory form keeps in shared memory (64 KB, three blocks an SM on H200).
pub const TOPK_SMEM_MAX_KEYS: usize = 16_384;
/// Threads of a shared-memory select block (`DSK_TOPK_SMEM_THREADS` in attention.cu).
const TOPK_SMEM_THREADS: u32 = 256;

/// The block form a select of `tokens` lists takes under `choice`.
pub fn topk_block(tokens: usize, choice: TopKBlockChoice) -> TopKBlock {
    match choice {
        TopKBlockChoice::Force(block) => block,
        TopKBlockChoice::Auto if TOPK_WIDE_TOKENS.contains(&tokens) => TopKBlock::Wide,
        TopKBlockChoice::Auto => TopKBlock::Smem,
    }
}

/// Keys the shared-memory form keeps for lists of at most `max_count` scores where blocks may
/// opt in to `smem_optin` bytes (its static arrays take about 8.3 KB).
pub(crate) fn topk_smem_keys(max_count: usize, smem_optin: usize) -> usize {
    let room = smem_optin.saturating_sub(9 * 1024) / 4;
    max_count.clamp(1, TOPK_SMEM_MAX_KEYS).min(room)
}

/// The launch of a shared-key select of `tokens` lists of at most `max_count` scores (a block a
/// list) and its `cap` argument: the keys its dynamic shared memory holds.
fn topk_smem_launch(
    kernel: &'static str,
    tokens: usize,
    max_count: usize,
    smem_optin: usize,
) -> Result<(LaunchConfig, i32), KernelError> {
    let keys = topk_smem_keys(max_count, smem_optin);
    let cfg = LaunchConfig {
        grid_dim: (u32_grid(kernel, tokens)?, 1, 1),
        block_dim: (TOPK_SMEM_THREADS, 1, 1),
        shared_mem_bytes: (keys * 4) as u32,
    };
    Ok((cfg, i32_arg(kernel, "shared keys", keys)?))
}

/// Scores per stage-1 block of the two-stage top-k (`DSK_TOPK_SEG` in attention.cu).
pub const TOPK_SEGMENT: usize = 4096;
/// Longest score list the single-block select takes; longer ones take the two stages.
pub const TOPK_SINGLE_MAX_COUNT: usize = 2 * TOPK_SEGMENT;
/// Most tokens of a two-stage select: past it the single-block select already has a block per
/// token on most SMs, and the second stage (a quarter more work at k = 512) would only add.
pub const TOPK_TWO_STAGE_MAX_TOKENS: usize = 128;

/// Whether [`Kernels::topk_select`] takes the two stages: few tokens with long lists, and a k
/// well below a segment (each segment keeps k candidates; near a segment that saves nothing).
pub fn topk_two_stage(tokens: usize, max_count: usize, k: usize) -> bool {
    tokens <= TOPK_TWO_STAGE_MAX_TOKENS
        && max_count > TOPK_SINGLE_MAX_COUNT
        && k > 0
        && k <= TOPK_SEGMENT / 2
}

/// Per-token candidates (the stride of each round's buffer) of the multi-stage select of lists
/// of up to `max_count` scores: the first round keeps `k` of every [`TOPK_SEGMENT`] scores, each
/// further round `k` of every segment of candidates, until at most a segment is left for the
/// final block (a 1M-context decode: 32,768 candidates, then 4,096). `k <= TOPK_SEGMENT / 2`
/// shrinks every round.
pub fn topk_rounds(max_count: usize, k: usize) -> Vec<usize> {
    let mut strides = vec![max_count.div_ceil(TOPK_SEGMENT) * k];
    while let Some(&s) = strides
        .last()
        .filter(|&&s| s > TOPK_SEGMENT && k <= TOPK_SEGMENT / 2)
    {
        strides.push(s.div_ceil(TOPK_SEGMENT) * k);
    }
    strides
}

/// Scratch bytes of a [`TopKSelect`]: per token and round of [`topk_rounds`], its candidates (f32
/// value + i32 index); 0 where the single-block select runs.
pub fn topk_select_workspace_bytes(tokens: usize, max_count: usize, k: usize) -> usize {
    if topk_two_stage(tokens, max_count, k) {
        tokens * topk_rounds(max_count, k).iter().sum::<usize>() * 8
    } else {
        0
    }
}

/// Fewest keys a split of [`attention_splits`] gets: one 16-row tile of the head-grouped kernel.
/// A decoding token's lists are short (a 128-key window, + 512 CSA rows), and the head-grouped
/// kernel has only `heads / 16` blocks per split: at 64 keys per split a window layer ran on 8
/// blocks (4 at TP=2), each a ~35 us chain of 64 keys, where 16 keys per split take ~8 us.
pub const ATTENTION_MIN_KEYS_PER_SPLIT: usize = 16;

/// Splits per token so `tokens * heads * splits` blocks fill the GPU about four times over, with
/// at least [`ATTENTION_MIN_KEYS_PER_SPLIT`] keys per split.
pub fn attention_splits(max_keys: usize, tokens: usize, heads: usize, sms: usize) -> usize {
    let blocks = (tokens * heads).max(1);
    let want = (4 * sms).div_ceil(blocks);
    want.min(max_keys.div_ceil(ATTENTION_MIN_KEYS_PER_SPLIT))
        .max(1)
}

/// f32 scratch of a [`PagedAttention`]: one `(max, sum, acc[head_dim])` record per split.
pub fn attention_workspace_floats(
    tokens: usize,
    heads: usize,
    head_dim: usize,
    splits: usize,
) -> usize {
    tokens * heads * splits * (head_dim + 2)
}

pub fn check_kv_rows(kernel: &'static str, a: &KvRows) -> Result<(), KernelError> {
    if a.rows == 0 || a.width == 0 {
        return Err(KernelError::invalid(
            kernel,
            format!("rows = {}, width = {}", a.rows, a.width),
        ));
    }
    nonnull(
        kernel,
        &[("pool", a.pool), ("offsets", a.offsets), ("dense", a.dense)],
    )
}

pub fn check_attention(a: &PagedAttention) -> Result<(), KernelError> {
    const K: &str = "attention";
    if a.tokens == 0
        || a.heads == 0
        || a.splits == 0
        || a.head_dim == 0
        || !a.head_dim.is_multiple_of(32)
        || a.head_dim > ATTENTION_MAX_HEAD_DIM
    {
        return Err(KernelError::invalid(
            K,
            format!(
                "tokens = {}, heads = {}, splits = {}, head_dim = {}: head_dim must be a multiple \
                 of 32 up to {ATTENTION_MAX_HEAD_DIM}",
                a.tokens, a.heads, a.splits, a.head_dim
            ),
        ));
    }
    a.format
        .check(a.head_dim)
        .map_err(|e| KernelError::invalid(K, e.to_string()))?;
    if let Some(r) = a.inverse_rope {
        // An even rope_dim keeps every channel pair inside one merge block (head_dim is even).
        if r.rope_dim == 0 || !r.rope_dim.is_multiple_of(2) || r.rope_dim > a.head_dim {
            return Err(KernelError::invalid(
                K,
                format!(
                    "inverse RoPE over {} channels of head_dim {}: need an even count up to it",
                    r.rope_dim, a.head_dim
                ),
            ));
        }
        nonnull(K, &[("positions", r.positions), ("inv_freq", r.inv_freq)])?;
    }
    if a.query_norm_eps.is_some() && a.inverse_rope.is_none() {
        return Err(KernelError::invalid(
            K,
            "raw queries (query_norm_eps) are rotated by inverse_rope's table: give it".to_string(),
        ));
    }
    nonnull(
        K,
        &[
            ("pool", a.pool),
            ("q", a.q),
            ("key_offsets", a.key_offsets),
            ("key_starts", a.key_starts),
            ("sinks", a.sinks),
            ("out", a.out),
            ("workspace", a.workspace),
        ],
    )
}

/// Heads per block of the head-grouped attention kernel (`dsk_attend_partial_heads_f32`):
/// `heads` must be a multiple of it.
pub const ATTENTION_HEAD_GROUP: usize = 16;
/// Key rows the head-grouped kernel stages in shared memory at a time.
const ATTENTION_HEADS_TILE: usize = 16;

/// Dynamic shared memory of the head-grouped attention block: a tile of key rows at a stride of
/// [`ATTENTION_MAX_HEAD_DIM`] floats, then one i32 flag per row (32 KB + 64 B: under the default
/// 48 KB, so no opt-in).
pub fn attention_heads_smem_bytes() -> usize {
    ATTENTION_HEADS_TILE * (ATTENTION_MAX_HEAD_DIM + 1) * 4
}

/// Launch-time checks of [`Kernels::paged_attention_heads`] (testable without a GPU): those of
/// [`Kernels::paged_attention`], and `heads` a multiple of [`ATTENTION_HEAD_GROUP`]. A caller
/// gets `KernelError::InvalidLaunch` otherwise and may fall back to `paged_attention`.
pub fn check_attention_heads(a: &PagedAttention) -> Result<(), KernelError> {
    check_attention(a)?;
    if !a.heads.is_multiple_of(ATTENTION_HEAD_GROUP) {
        return Err(KernelError::invalid(
            "attention_heads",
            format!(
                "heads = {} is not a multiple of the {ATTENTION_HEAD_GROUP} heads a block serves \
                 (use paged_attention)",
                a.heads
            ),
        ));
    }
    Ok(())
}

/// Head dimension the tensor-core attention kernels (`dsk_attend_partial_heads_tc*`) take: their
/// warps split the 512 dims (V4-Flash's latent rows).
pub const ATTENTION_TC_HEAD_DIM: usize = 512;
/// Key rows the tensor-core attention kernels stage at a time (`DSK_ATTC_TILE`).
const ATTENTION_TC_TILE: usize = 16;
/// Row stride in floats of their key tiles (`DSK_ATTC_LD`: 8 mod 32, conflict-free fragment loads).
const ATTENTION_TC_LD: usize = 520;

/// Key rows the f16 forms stage at a time (`DSK_ATTF_TILE`).
const ATTENTION_F16_TILE: usize = 32;
/// Row stride in halves of their Q and key tiles (`DSK_ATTF_LDH`: 1040 bytes = 65 x 16, so the 8
/// rows of an ldmatrix phase hit 8 distinct 16-byte bank groups).
const ATTENTION_F16_LDH: usize = 520;
/// RoPE pairs of their cos/sin table (`DSK_ATTF_ROPE_PAIRS`).
const ATTENTION_F16_ROPE_PAIRS: usize = 64;

/// The forms of the tensor-core attention pass 1: which MMAs, and heads a block serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionTcForm {
    /// `dsk_attend_partial_heads_tc`: TF32, 16 heads, 8 warps, 78.4 KB of shared memory (two
    /// blocks an H200 SM; fits sm_121's 99 KB).
    Heads16,
    /// `dsk_attend_partial_heads_tc32`: TF32, 32 heads, 16 warps, 115.8 KB (one block an SM):
    /// each key row is read from L2 once per 32 heads instead of 16.
    Heads32,
    /// `dsk_attend_partial_heads_f16`: f16 m16n8k16, 16 heads, 8 warps, 32-key tiles whose
    /// stored records arrive raw by cp.async and are decoded once into an f16 tile.
    F16Heads16,
    /// `dsk_attend_partial_heads_f16x32`: the f16 form for 32 heads.
    F16Heads32,
}

impl AttentionTcForm {
    /// Heads a block serves: `heads` must be a multiple of it.
    pub fn heads(self) -> usize {
        match self {
            Self::Heads16 | Self::F16Heads16 => 16,
            Self::Heads32 | Self::F16Heads32 => 32,
        }
    }

    /// Whether the form runs f16 MMAs (else TF32).
    pub fn is_f16(self) -> bool {
        matches!(self, Self::F16Heads16 | Self::F16Heads32)
    }

    /// Threads a block: a warp per two heads (TF32), 8 warps (f16).
    pub fn threads(self) -> usize {
        if self.is_f16() {
            256
        } else {
            self.heads() * 16
        }
    }

    /// Dynamic shared memory of a block over rows stored as `format` (head_dim
    /// [`ATTENTION_TC_HEAD_DIM`]).
    /// - TF32 (`DSK_ATTC_SMEM_FLOATS(G)`, any format): two key tiles `[16][520]` f32 (one
    ///   computed on while cp.async fills the other), the warps' partial logits `[G / 2][G][24]`,
    ///   probabilities `[G][20]`, G corrections and 2 x 16 row flags.
    /// - f16 (`DSK_ATTF_SMEM_BYTES(G, rs)`): Q `[G][520]` and the key tile `[32][520]` in f16,
    ///   partial logits `[64 / G][G][36]` f32, probabilities `[G][40]` f16, G corrections,
    ///   2 x 32 row flags, the RoPE table `[2][64]` f32 and 32 raw rows of the record's bytes
    ///   rounded up to 16.
    pub fn smem_bytes(self, format: KvRowFormat) -> usize {
        let g = self.heads();
        if self.is_f16() {
            let (_, raw_stride) = attention_f16_raw_rows(format);
            (g + ATTENTION_F16_TILE) * ATTENTION_F16_LDH * 2
                + (64 / g) * g * (ATTENTION_F16_TILE + 4) * 4
                + g * (ATTENTION_F16_TILE + 8) * 2
                + g * 4
                + 2 * ATTENTION_F16_TILE * 4
                + 2 * ATTENTION_F16_ROPE_PAIRS * 4
                + ATTENTION_F16_TILE * raw_stride
        } else {
            (2 * ATTENTION_TC_TILE * ATTENTION_TC_LD
                + (g / 2) * g * (ATTENTION_TC_TILE + 8)
                + g * (ATTENTION_TC_TILE + 4)
                + g
                + 2 * ATTENTION_TC_TILE)
                * 4
        }
    }
}

/// The f16 forms' raw rows: the bytes of one stored record they copy, and its stride in shared
/// memory (rounded up to 16 bytes).
fn attention_f16_raw_rows(format: KvRowFormat) -> (usize, usize) {
    let bytes = format.bytes(ATTENTION_TC_HEAD_DIM);
    (bytes, bytes.next_multiple_of(16))
}

/// Launches of at most this many tokens take the 16-head form: their grids are small, and twice
/// the blocks beat reading each key row half as often. Measured on H200 (64 heads, FP8 rows,
/// pass 1 + merge, 16 / 32 heads a block): one token over 128 keys 15.5 / 19.3 us, over 640 keys
/// 27.0 / 30.8 us, over 8,320 keys 196 / 191 us (f32 rows 114 / 150); 6 tokens over 640 keys
/// 74.4 / 76.0 us; 16 tokens 139.7 / 137.6 us; an 8,192-token prefill chunk over 640 keys
/// 22.2 / 19.1 ms.
pub const ATTENTION_TC_NARROW_MAX_TOKENS: usize = 64;

/// The TF32 form [`Kernels::paged_attention_heads_tc`] runs for `tokens` tokens: 32 heads a
/// block where there are more than [`ATTENTION_TC_NARROW_MAX_TOKENS`] tokens, `heads` is a
/// multiple of 32 and its shared memory fits the device's opt-in (`smem_optin` bytes), else 16.
pub fn attention_tc_form(heads: usize, tokens: usize, smem_optin: usize) -> AttentionTcForm {
    let wide = AttentionTcForm::Heads32;
    if tokens > ATTENTION_TC_NARROW_MAX_TOKENS
        && heads.is_multiple_of(wide.heads())
        && wide.smem_bytes(KvRowFormat::F32) <= smem_optin
    {
        wide
    } else {
        AttentionTcForm::Heads16
    }
}

/// The f16 form for `tokens` tokens of `heads` over rows stored as `format`: 32 heads a block
/// where there are more than [`ATTENTION_TC_NARROW_MAX_TOKENS`] tokens, `heads` is a multiple of
/// 32 and its shared memory fits `smem_optin`, else 16 (as the TF32 forms; measured on H200, 64
/// heads over FP8 records, 16 / 32 heads a block: one token over 640 keys 22.5 / 28.3 us, 16
/// tokens 105 / 132 us, an 8,192-token chunk 17.9 / 12.4 ms). Whether it fits at all is
/// [`check_attention_heads_tc`]'s to say.
pub fn attention_f16_form(
    heads: usize,
    tokens: usize,
    format: KvRowFormat,
    smem_optin: usize,
) -> AttentionTcForm {
    let wide = AttentionTcForm::F16Heads32;
    if tokens > ATTENTION_TC_NARROW_MAX_TOKENS
        && heads.is_multiple_of(wide.heads())
        && wide.smem_bytes(format) <= smem_optin
    {
        wide
    } else {
        AttentionTcForm::F16Heads16
    }
}

/// Launch-time checks of the tensor-core attention in `form` (testable without a GPU) on a device
/// whose blocks may opt in to `smem_optin` bytes of shared memory: those of
/// [`check_attention_heads`], `heads` a multiple of the form's, `head_dim`
/// [`ATTENTION_TC_HEAD_DIM`], the block's shared memory within `smem_optin`, and for the f16
/// forms rows of f32, BF16 or FP8 latent records whose parts fall on 16-byte chunks (RoPE dims a
/// multiple of 8). A caller gets `KernelError::InvalidLaunch` otherwise and may fall back to
/// `paged_attention_heads`.
pub fn check_attention_heads_tc(
    a: &PagedAttention,
    form: AttentionTcForm,
    smem_optin: usize,
) -> Result<(), KernelError> {
    check_attention_heads(a)?;
    const K: &str = "attention_heads_tc";
    if a.head_dim != ATTENTION_TC_HEAD_DIM || !a.heads.is_multiple_of(form.heads()) {
        return Err(KernelError::invalid(
            K,
            format!(
                "heads = {}, head_dim = {}: the tensor-core kernel ({form:?}) takes a multiple of \
                 {} heads of {ATTENTION_TC_HEAD_DIM} (use paged_attention_heads)",
                a.heads,
                a.head_dim,
                form.heads()
            ),
        ));
    }
    if a.out_f16 && !finishes_in_pass_one(a, form) {
        return Err(KernelError::invalid(
            K,
            format!(
                "{form:?} over {} splits merges into f32; f16 output needs an f16 form finishing \
                 one split",
                a.splits
            ),
        ));
    }
    if a.query_norm_eps.is_some() && !form.is_f16() {
        return Err(KernelError::invalid(
            K,
            format!("{form:?} takes normed queries; only the f16 forms norm raw ones"),
        ));
    }
    if let (true, Some(r)) = (form.is_f16(), a.inverse_rope) {
        if r.rope_dim > 2 * ATTENTION_F16_ROPE_PAIRS {
            return Err(KernelError::invalid(
                K,
                format!(
                    "{form:?} holds a RoPE table of {ATTENTION_F16_ROPE_PAIRS} pairs, not {} channels",
                    r.rope_dim
                ),
            ));
        }
    }
    if form.is_f16() {
        let chunked = match a.format {
            KvRowFormat::F32 | KvRowFormat::Bf16 => true,
            KvRowFormat::Fp8Latent { rope } => rope.is_multiple_of(8) && rope < a.head_dim,
            KvRowFormat::Fp8Indexer => false,
        };
        if !chunked {
            return Err(KernelError::invalid(
                K,
                format!(
                    "{form:?} decodes f32, BF16 or FP8 latent rows with RoPE dims a multiple of 8, \
                     not {:?}",
                    a.format
                ),
            ));
        }
    }
    let smem = form.smem_bytes(a.format);
    if smem > smem_optin {
        return Err(KernelError::invalid(
            K,
            format!(
                "{form:?} needs {smem} bytes of shared memory a block, the device allows \
                 {smem_optin}"
            ),
        ));
    }
    Ok(())
}

/// Shared memory of the indexer block: the token's queries and head weights.
pub fn indexer_smem_bytes(heads: usize, dim: usize) -> usize {
    (heads * dim + heads) * 4
}

/// Largest heads and dim of the tiled indexer kernel, and its rows per tile.
pub const INDEXER_TILED_MAX_HEADS: usize = 64;
pub const INDEXER_TILED_MAX_DIM: usize = 128;
const INDEXER_TILED_ROWS: usize = 64;

/// Shared memory of the tiled indexer block: queries `[128][64]` and a key tile `[128][65]`.
pub fn indexer_tiled_smem_bytes() -> usize {
    INDEXER_TILED_MAX_DIM * (INDEXER_TILED_MAX_HEADS + INDEXER_TILED_ROWS + 1) * 4
}

/// Rows per tile of the short-list tiled kernel (`dsk_indexer_scores_tiled16_f32`).
const INDEXER_TILED16_ROWS: usize = 16;
/// Its query row stride in words (64 heads + 4: conflict-free transposed stores).
const INDEXER_TILED16_QLD: usize = INDEXER_TILED_MAX_HEADS + 4;

/// Tile height of the tiled (f32) indexer kernel. Both give bit-identical scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexerTile {
    /// 64 rows a tile (`dsk_indexer_scores_tiled_f32`): long lists, busy GPUs.
    Rows64,
    /// 16 rows a tile (`dsk_indexer_scores_tiled16_f32`): 4x the blocks of a short list.
    Rows16,
}

impl IndexerTile {
    pub fn rows(self) -> usize {
        match self {
            IndexerTile::Rows64 => INDEXER_TILED_ROWS,
            IndexerTile::Rows16 => INDEXER_TILED16_ROWS,
        }
    }

    /// Shared memory of its block: queries `[128][64]` (`[128][68]` for 16 rows) and a key tile
    /// `[128][rows + 1]`.
    pub fn smem_bytes(self) -> usize {
        match self {
            IndexerTile::Rows64 => indexer_tiled_smem_bytes(),
            IndexerTile::Rows16 => {
                INDEXER_TILED_MAX_DIM * (INDEXER_TILED16_QLD + INDEXER_TILED16_ROWS + 1) * 4
            }
        }
    }
}

/// How the tile height is picked, from DSPARK_INDEXER_TILE at load: unset, empty or "auto" =
/// [`indexer_tile`]'s rule; "64" or "16" = always that one (an A/B switch).
pub type IndexerTileChoice = KernelChoice<IndexerTile>;

pub fn indexer_tile_choice(value: Option<&str>) -> Result<IndexerTileChoice, KernelError> {
    use KernelChoice::{Auto, Force};
    let tiles = [
        ("auto", Auto),
        ("64", Force(IndexerTile::Rows64)),
        ("16", Force(IndexerTile::Rows16)),
    ];
    env_switch("indexer_scores", "DSPARK_INDEXER_TILE", value, &tiles)
}

/// The tile height of a tiled launch of `tokens` tokens seeing up to `max_visible` rows on `sms`
/// SMs. A block's tile is one serial chain (stage the queries, load and decode the rows, 2,048
/// FMAs a thread at 64 rows, write), so a short list's 64-row grid leaves most SMs idle (a decode
/// token at 8K context: 32 blocks on 132 SMs). 16-row tiles split the same rows over 4x the
/// blocks, each with a quarter of the tile work but the whole query staging (32 KB a block); they
/// pay while their grid fits in one wave, one block per SM. Measured on H200 (one token, FP8
/// rows): 2,048 rows 9.8 us at 16 rows (128 blocks) against 13.5 us at 64; 8,192 rows 20.2 us at
/// 16 rows (512 blocks) against 13.8 us at 64.
pub fn indexer_tile(
    tokens: usize,
    max_visible: usize,
    sms: usize,
    choice: IndexerTileChoice,
) -> IndexerTile {
    match choice {
        IndexerTileChoice::Force(tile) => tile,
        IndexerTileChoice::Auto => {
            let blocks16 = max_visible
                .div_ceil(IndexerTile::Rows16.rows())
                .saturating_mul(tokens);
            if blocks16 <= sms {
                IndexerTile::Rows16
            } else {
                IndexerTile::Rows64
            }
        }
    }
}

/// Whether the tiled kernel takes this shape on a device whose blocks may opt in to `smem_optin`
/// bytes of shared memory.
pub fn indexer_tiled_fits(heads: usize, dim: usize, smem_optin: usize) -> bool {
    heads <= INDEXER_TILED_MAX_HEADS
        && dim <= INDEXER_TILED_MAX_DIM
        && indexer_tiled_smem_bytes() <= smem_optin
}

/// Largest heads and dim of the tensor-core indexer kernel, and its rows per tile.
pub const INDEXER_MMA_MAX_HEADS: usize = 64;
pub const INDEXER_MMA_MAX_DIM: usize = 128;
const INDEXER_MMA_ROWS: usize = 64;
/// Row stride of its shared tiles in words (128 + 4: conflict-free fragment loads).
const INDEXER_MMA_LD: usize = 132;

/// Shared memory of the tensor-core indexer block: the key tile `[64][132]`, the two warps'
/// partial scores `[2][64]`, head weights `[64]`, queries `[heads rounded up to 8][132]`.
pub fn indexer_mma_smem_bytes(heads: usize) -> usize {
    (INDEXER_MMA_ROWS * INDEXER_MMA_LD
        + 2 * INDEXER_MMA_ROWS
        + INDEXER_MMA_MAX_HEADS
        + heads.next_multiple_of(8) * INDEXER_MMA_LD)
        * 4
}

/// Query columns (token x head) of a block of the f16 form, and the most tokens it groups
/// (`DSK_IDXT_COLS`, `DSK_IDXT_MAX_TOKENS` in attention.cu).
const INDEXER_F16_COLS: usize = 256;
const INDEXER_F16_MAX_TOKENS: usize = 32;

/// A token's query columns in the f16 form (`dsk_idxh_heads`): its heads rounded up to a power
/// of two, at least 8, so that one warp's 64 columns hold whole tokens.
pub fn indexer_f16_heads(heads: usize) -> usize {
    heads.next_power_of_two().max(8)
}

/// Consecutive tokens a block of the f16 form scores together (`dsk_indexer_scores_mma_f16`): as
/// many as fill [`INDEXER_F16_COLS`] query columns, 4 at 64 heads, 8 at 32.
pub fn indexer_f16_group_tokens(heads: usize) -> usize {
    (INDEXER_F16_COLS / indexer_f16_heads(heads)).clamp(1, INDEXER_F16_MAX_TOKENS)
}

/// Shared memory of the f16 form for FP8 rows (`dsk_indexer_scores_mma_f16`): the key tile
/// `[64][136]` f16, row scales `[64]`, head weights `[256]`, per-token query factors (f32),
/// output starts (i64), visible counts, table starts, query exponents and first rows (i32) `[32]`
/// each, the group's queries `[256][136]` f16 (~87 KB: two blocks an SM on H200, and within
/// sm_121's 99 KB).
pub fn indexer_mma_f16_smem_bytes(heads: usize) -> usize {
    let columns = indexer_f16_group_tokens(heads) * indexer_f16_heads(heads);
    INDEXER_MMA_ROWS * 136 * 2
        + (INDEXER_MMA_ROWS + INDEXER_F16_COLS + INDEXER_F16_MAX_TOKENS) * 4
        + INDEXER_F16_MAX_TOKENS * (8 + 4 * 4)
        + columns * 136 * 2
}

/// Fewest tokens of a launch that takes the f16 form. It scores groups of neighbouring tokens
/// against each key tile (prefill: they see the same rows); decode steps have a few tokens, each
/// over its own table, where the TF32 kernel's one token a block spreads a long list over more
/// blocks (at 1M context the per-token f16 form measured slower: 8 layers, H200, 2.616 against
/// 2.517 ms a step).
pub const INDEXER_F16_MIN_TOKENS: usize = 64;

/// Whether a tensor-core launch of `a` takes the f16 form: FP8 rows (their e4m3 values are exact
/// in f16, the row scale is applied after the products), dims in whole 16-value k-steps, at
/// least [`INDEXER_F16_MIN_TOKENS`] tokens, its block within `smem_optin` bytes of shared
/// memory, and the switch on (`DSPARK_INDEXER_F16=0` keeps the TF32 form).
pub fn indexer_mma_f16_fits(a: &IndexerScores, enabled: bool, smem_optin: usize) -> bool {
    enabled
        && a.format == KvRowFormat::Fp8Indexer
        && a.dim.is_multiple_of(16)
        && a.tokens >= INDEXER_F16_MIN_TOKENS
        && indexer_mma_f16_smem_bytes(a.heads) <= smem_optin
}

/// Whether the tensor-core kernel takes this shape (heads up to 64, zero-padded to a multiple of
/// 8; dim a multiple of 8 up to 128) on a device whose blocks may opt in to `smem_optin` bytes.
pub fn indexer_mma_fits(heads: usize, dim: usize, smem_optin: usize) -> bool {
    heads > 0
        && heads <= INDEXER_MMA_MAX_HEADS
        && dim > 0
        && dim.is_multiple_of(8)
        && dim <= INDEXER_MMA_MAX_DIM
        && indexer_mma_smem_bytes(heads) <= smem_optin
}

/// The kernel an [`IndexerScores`] launch runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexerKernel {
    /// TF32 tensor cores (`dsk_indexer_scores_mma`).
    TensorCore,
    /// f32, 64- or 16-row tiles from shared memory (`dsk_indexer_scores_tiled_f32`,
    /// `dsk_indexer_scores_tiled16_f32`; [`indexer_tile`] picks).
    Tiled,
    /// f32, a warp per row (`dsk_indexer_scores_f32`).
    Plain,
}

/// Which kernel scores `a` on a device whose blocks may opt in to `smem_optin` bytes of shared
/// memory: the tensor cores when asked for and the shape fits, else the f32 kernels.
pub fn indexer_kernel(a: &IndexerScores, smem_optin: usize) -> IndexerKernel {
    if a.tensor_cores && indexer_mma_fits(a.heads, a.dim, smem_optin) {
        IndexerKernel::TensorCore
    } else if indexer_tiled_fits(a.heads, a.dim, smem_optin) {
        IndexerKernel::Tiled
    } else {
        IndexerKernel::Plain
    }
}

pub fn check_indexer(a: &IndexerScores) -> Result<(), KernelError> {
    const K: &str = "indexer_scores";
    if a.tokens == 0
        || a.heads == 0
        || a.dim == 0
        || !a.dim.is_multiple_of(32)
        || a.dim > INDEXER_MAX_DIM
        || a.ratio == 0
        || a.block_size == 0
        || !a.block_size.is_multiple_of(a.ratio)
    {
        return Err(KernelError::invalid(
            K,
            format!(
                "tokens = {}, heads = {}, dim = {}, ratio = {}, block_size = {}: dim must be a \
                 multiple of 32 up to {INDEXER_MAX_DIM}, block_size a multiple of ratio",
                a.tokens, a.heads, a.dim, a.ratio, a.block_size
            ),
        ));
    }
    if a.max_visible.saturating_mul(a.ratio) > i32::MAX as usize {
        return Err(KernelError::invalid(
            K,
            format!(
                "{} rows of ratio {} reach past the i32 positions the kernel uses",
                a.max_visible, a.ratio
            ),
        ));
    }
    a.format
        .check(a.dim)
        .map_err(|e| KernelError::invalid(K, e.to_string()))?;
    if matches!(a.format, KvRowFormat::Fp8Latent { .. }) {
        return Err(KernelError::invalid(
            K,
            "indexer rows are stored as F32, Bf16 or Fp8Indexer, not the latent record",
        ));
    }
    if a.stride < a.format.slots(a.dim) {
        return Err(KernelError::invalid(
            K,
            format!(
                "stride {} slots is shorter than a {:?} row of {} values ({} slots)",
                a.stride,
                a.format,
                a.dim,
                a.format.slots(a.dim)
            ),
        ));
    }
    if indexer_smem_bytes(a.heads, a.dim) > DEFAULT_SMEM
        && !indexer_tiled_fits(a.heads, a.dim, usize::MAX)
    {
        return Err(KernelError::invalid(
            K,
            format!(
                "{} heads x {} dims do not fit one block's shared memory",
                a.heads, a.dim
            ),
        ));
    }
    nonnull(
        K,
        &[
            ("pool", a.pool),
            ("q", a.q),
            ("weights", a.weights),
            ("block_tables", a.block_tables),
            ("block_table_starts", a.block_table_starts),
            ("visible", a.visible),
            ("out_starts", a.out_starts),
            ("out", a.out),
        ],
    )
}

/// Checks a [`TopKSelect`] before launch: its pointers, k and, for the two stages, the
/// workspace and the segment count (`max_count` within i32).
pub fn check_topk_select(a: &TopKSelect) -> Result<(), KernelError> {
    const K: &str = "topk_select";
    nonnull(
        K,
        &[
            ("scores", a.scores),
            ("starts", a.starts),
            ("counts", a.counts),
            ("out_idx", a.out_idx),
            ("out_val", a.out_val),
        ],
    )?;
    i32_arg(K, "k", a.k)?;
    u32_grid(K, a.tokens)?;
    if a.rounds_only && !topk_two_stage(a.tokens, a.max_count, a.k) {
        return Err(KernelError::invalid(
            K,
            "rounds_only needs the two-stage select (few tokens, long lists)",
        ));
    }
    if topk_two_stage(a.tokens, a.max_count, a.k) {
        nonnull(K, &[("workspace (two-stage select)", a.workspace)])?;
        if !a.workspace.is_multiple_of(4) {
            return Err(KernelError::invalid(K, "workspace is not 4-byte aligned"));
        }
        i32_arg(
            K,
            "max_count rounded up to a segment",
            a.max_count.div_ceil(TOPK_SEGMENT) * TOPK_SEGMENT,
        )?;
    }
    Ok(())
}

impl Kernels {
    /// Exact top-k selection per token (see [`TopKSelect`]): one block per token over all its
    /// scores, or, for few tokens with long lists ([`topk_two_stage`]), a block per
    /// [`TOPK_SEGMENT`] scores keeping each segment's top k, rounds of the same over the
    /// candidates while more than a segment of them is left ([`topk_rounds`]), then a block per
    /// token selecting among the last candidates. Both give the same rows in the same order.
    ///
    /// # Safety
    /// Every pointer must address device memory of this context holding the shapes given; each
    /// token's scores must lie inside `scores`; `max_count` must be at least every token's
    /// count; the workspace must hold [`topk_select_workspace_bytes`] bytes.
    pub unsafe fn topk_select(
        &self,
        stream: &CudaStream,
        a: &TopKSelect,
    ) -> Result<(), KernelError> {
        const K: &str = "topk_select";
        if a.tokens == 0 || a.k == 0 {
            return Ok(());
        }
        check_topk_select(a)?;
        let k = i32_arg(K, "k", a.k)?;
        if topk_two_stage(a.tokens, a.max_count, a.k) {
            return self.topk_select_two_stage(stream, a, k);
        }
        if topk_block(a.tokens, self.topk_block_choice()) == TopKBlock::Smem {
            let (cfg, cap) = topk_smem_launch(K, a.tokens, a.max_count, self.smem_optin())?;
            stream
                .kernel(&self.topk_select_smem)
                .arg(&a.scores)
                .arg(&a.starts)
                .arg(&a.counts)
                .arg(&k)
                .arg(&a.out_idx)
                .arg(&a.out_val)
                .arg(&a.index_base)
                .arg(&i32::from(a.index_order))
                .arg(&cap)
                .launch(cfg)
                .map_err(KernelError::driver("launch topk_select (shared keys)"))?;
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, a.tokens)?, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.topk_select)
            .arg(&a.scores)
            .arg(&a.starts)
            .arg(&a.counts)
            .arg(&k)
            .arg(&a.out_idx)
            .arg(&a.out_val)
            .arg(&a.index_base)
            .arg(&i32::from(a.index_order))
            .launch(cfg)
            .map_err(KernelError::driver("launch topk_select"))?;
        Ok(())
    }

    /// The two stages of [`Self::topk_select`] (validated there).
    unsafe fn topk_select_two_stage(
        &self,
        stream: &CudaStream,
        a: &TopKSelect,
        k: i32,
    ) -> Result<(), KernelError> {
        const K: &str = "topk_select";
        let segs = a.max_count.div_ceil(TOPK_SEGMENT);
        let max_segs = i32_arg(K, "max_count / segment", segs)?;
        // Each round's candidates: values (f32), then their global indices (i32).
        let rounds = topk_rounds(a.max_count, a.k);
        let mut at = a.workspace;
        let buffers: Vec<(CUdeviceptr, CUdeviceptr, i64)> = rounds
            .iter()
            .map(|&stride| {
                let (val, idx) = (at, at + (a.tokens * stride * 4) as CUdeviceptr);
                at += (a.tokens * stride * 8) as CUdeviceptr;
                Ok((val, idx, i64_arg(K, "candidates per token", stride)?))
            })
            .collect::<Result<_, KernelError>>()?;
        let (cand_val, cand_idx, _) = buffers[0];
        let stage1 = LaunchConfig {
            grid_dim: (u32_grid(K, segs)?, u32_grid(K, a.tokens)?, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.topk_select_segments)
            .arg(&a.scores)
            .arg(&a.starts)
            .arg(&a.counts)
            .arg(&k)
            .arg(&max_segs)
            .arg(&cand_idx)
            .arg(&cand_val)
            .arg(&a.index_base)
            .launch(stage1)
            .map_err(KernelError::driver("launch topk_select segments"))?;
        for (level, pair) in buffers.windows(2).enumerate() {
            let ((in_val, in_idx, in_stride), (out_val, out_idx, out_stride)) = (pair[0], pair[1]);
            let level = i32_arg(K, "round", level + 1)?;
            let round = LaunchConfig {
                grid_dim: (
                    u32_grid(K, (in_stride as usize).div_ceil(TOPK_SEGMENT))?,
                    u32_grid(K, a.tokens)?,
                    1,
                ),
                block_dim: (1024, 1, 1),
                shared_mem_bytes: 0,
            };
            stream
                .kernel(&self.topk_select_reduce)
                .arg(&a.counts)
                .arg(&k)
                .arg(&max_segs)
                .arg(&level)
                .arg(&in_idx)
                .arg(&in_val)
                .arg(&in_stride)
                .arg(&out_idx)
                .arg(&out_val)
                .arg(&out_stride)
                .launch(round)
                .map_err(KernelError::driver("launch topk_select round"))?;
        }
        if a.rounds_only {
            return Ok(());
        }
        let (last_val, last_idx, last_stride) = buffers[buffers.len() - 1];
        let level = i32_arg(K, "rounds", buffers.len())?;
        let last = LaunchConfig {
            grid_dim: (u32_grid(K, a.tokens)?, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.topk_select_merge)
            .arg(&a.counts)
            .arg(&k)
            .arg(&max_segs)
            .arg(&level)
            .arg(&last_stride)
            .arg(&last_idx)
            .arg(&last_val)
            .arg(&a.out_idx)
            .arg(&a.out_val)
            .arg(&i32::from(a.index_order))
            .launch(last)
            .map_err(KernelError::driver("launch topk_select merge"))?;
        Ok(())
    }

    /// The top `k` of each token's candidates from the ranks of a tensor-parallel group (see
    /// [`TopKMergeRanks`]), one block per token: the same rows, in the same order, as
    /// [`Self::topk_select`] over the token's whole list (ties to the lower row), since the
    /// candidates hold every row of the answer and come in row order.
    ///
    /// # Safety
    /// Every pointer must address device memory of this context holding the shapes given; no
    /// count may exceed `ranks * k` for the ranks whose blocks `gathered` holds.
    pub unsafe fn topk_merge_ranks(
        &self,
        stream: &CudaStream,
        a: &TopKMergeRanks,
    ) -> Result<(), KernelError> {
        const K: &str = "topk_merge_ranks";
        if a.tokens == 0 || a.k == 0 {
            return Ok(());
        }
        nonnull(
            K,
            &[
                ("gathered", a.gathered),
                ("counts", a.counts),
                ("per_rank", a.per_rank),
                ("out_idx", a.out_idx),
                ("out_val", a.out_val),
            ],
        )?;
        let k = i32_arg(K, "k", a.k)?;
        let tokens = i32_arg(K, "tokens", a.tokens)?;
        let stride = i64_arg(K, "stride", a.stride)?;
        if a.stride == 0 {
            return Err(KernelError::invalid(K, "stride 0: no candidates per rank"));
        }
        i64_arg(K, "2 x tokens x stride", 2 * a.tokens * a.stride)?;
        if topk_block(a.tokens, self.topk_block_choice()) == TopKBlock::Smem {
            let (cfg, cap) = topk_smem_launch(K, a.tokens, a.max_count, self.smem_optin())?;
            stream
                .kernel(&self.topk_merge_ranks_smem)
                .arg(&a.gathered)
                .arg(&a.counts)
                .arg(&a.per_rank)
                .arg(&stride)
                .arg(&tokens)
                .arg(&k)
                .arg(&a.out_idx)
                .arg(&a.out_val)
                .arg(&cap)
                .launch(cfg)
                .map_err(KernelError::driver("launch topk_merge_ranks (shared keys)"))?;
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, a.tokens)?, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.topk_merge_ranks)
            .arg(&a.gathered)
            .arg(&a.counts)
            .arg(&a.per_rank)
            .arg(&stride)
            .arg(&tokens)
            .arg(&k)
            .arg(&a.out_idx)
            .arg(&a.out_val)
            .launch(cfg)
            .map_err(KernelError::driver("launch topk_merge_ranks"))?;
        Ok(())
    }

    /// Writes dense rows into the pool at their offsets.
    ///
    /// # Safety
    /// Every pointer must address device memory of this context holding the shapes given, and
    /// every offset must leave `width` floats inside the pool.
    pub unsafe fn kv_scatter(&self, stream: &CudaStream, a: &KvRows) -> Result<(), KernelError> {
        self.kv_rows(stream, a, "kv_scatter")
    }

    /// Reads pool rows at their offsets into dense rows.
    ///
    /// # Safety
    /// As [`Self::kv_scatter`].
    pub unsafe fn kv_gather(&self, stream: &CudaStream, a: &KvRows) -> Result<(), KernelError> {
        self.kv_rows(stream, a, "kv_gather")
    }

    unsafe fn kv_rows(
        &self,
        stream: &CudaStream,
        a: &KvRows,
        kernel: &'static str,
    ) -> Result<(), KernelError> {
        check_kv_rows(kernel, a)?;
        let width = i32_arg(kernel, "width", a.width)?;
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(kernel, a.rows)?, 1, 1),
            block_dim: ((a.width.next_power_of_two().clamp(32, 256)) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let func = if kernel == "kv_scatter" {
            &self.kv_scatter
        } else {
            &self.kv_gather
        };
        stream
            .kernel(func)
            .arg(&a.pool)
            .arg(&a.offsets)
            .arg(&a.dense)
            .arg(&width)
            .launch(cfg)
            .map_err(KernelError::driver("launch kv rows"))?;
        Ok(())
    }

    /// Split-KV attention with sinks (two launches: partial softmax per split, then merge).
    ///
    /// # Safety
    /// Every pointer must address device memory of this context holding the shapes given; every
    /// key offset must leave a `format` row of `head_dim` values (`format.slots(head_dim)` slots)
    /// inside the pool.
    pub unsafe fn paged_attention(
        &self,
        stream: &CudaStream,
        a: &PagedAttention,
    ) -> Result<(), KernelError> {
        check_attention(a)?;
        const K: &str = "attention";
        let partial = LaunchConfig {
            grid_dim: (
                u32_grid(K, a.splits)?,
                u32_grid(K, a.heads)?,
                u32_grid(K, a.tokens)?,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: this function's contract; the shapes were checked above.
        unsafe {
            self.attend(
                stream,
                a,
                (&self.attend_partial, "launch attend_partial"),
                partial,
                K,
                None,
            )
        }
    }

    /// Split-KV attention with sinks as [`Self::paged_attention`] (same inputs, workspace and
    /// output), pass 1 head-grouped for multi-query attention: a block serves
    /// [`ATTENTION_HEAD_GROUP`] heads of one token and reads each key row once for all of them.
    /// Shapes it does not take (see [`check_attention_heads`]) are an `InvalidLaunch` error, not
    /// a silent fallback: the caller chooses `paged_attention` instead.
    ///
    /// # Safety
    /// As [`Self::paged_attention`].
    pub unsafe fn paged_attention_heads(
        &self,
        stream: &CudaStream,
        a: &PagedAttention,
    ) -> Result<(), KernelError> {
        check_attention_heads(a)?;
        const K: &str = "attention_heads";
        let partial = LaunchConfig {
            grid_dim: (
                u32_grid(K, a.splits)?,
                u32_grid(K, a.heads / ATTENTION_HEAD_GROUP)?,
                u32_grid(K, a.tokens)?,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: attention_heads_smem_bytes() as u32,
        };
        // SAFETY: this function's contract; the shapes were checked above.
        unsafe {
            self.attend(
                stream,
                a,
                (&self.attend_partial_heads, "launch attend_partial_heads"),
                partial,
                K,
                None,
            )
        }
    }

    /// Split-KV attention with sinks as [`Self::paged_attention_heads`] (same inputs, workspace
    /// and output), pass 1 on the TF32 tensor cores in the form [`attention_tc_form`] picks: Q,
    /// the key rows and the probabilities are rounded to TF32 (10-bit mantissas), products summed
    /// in f32, so outputs differ from the f32 kernels' by about 1e-3 relative (more where logits
    /// are large: a logit's error grows with |q| |k|). Shapes it does not take (see
    /// [`check_attention_heads_tc`]) are an `InvalidLaunch` error: the caller chooses
    /// `paged_attention_heads` instead.
    ///
    /// # Safety
    /// As [`Self::paged_attention`].
    pub unsafe fn paged_attention_heads_tc(
        &self,
        stream: &CudaStream,
        a: &PagedAttention,
    ) -> Result<(), KernelError> {
        let form = attention_tc_form(a.heads, a.tokens, self.smem_optin);
        // SAFETY: this function's contract.
        unsafe { self.paged_attention_heads_tc_form(stream, a, form) }
    }

    /// [`Self::paged_attention_heads_tc`] in a given form (tests, timing).
    ///
    /// # Safety
    /// As [`Self::paged_attention`].
    pub unsafe fn paged_attention_heads_tc_form(
        &self,
        stream: &CudaStream,
        a: &PagedAttention,
        form: AttentionTcForm,
    ) -> Result<(), KernelError> {
        check_attention_heads_tc(a, form, self.smem_optin)?;
        const K: &str = "attention_heads_tc";
        let partial = LaunchConfig {
            grid_dim: (
                u32_grid(K, a.splits)?,
                u32_grid(K, a.heads / form.heads())?,
                u32_grid(K, a.tokens)?,
            ),
            block_dim: (form.threads() as u32, 1, 1),
            shared_mem_bytes: form.smem_bytes(a.format) as u32,
        };
        let func = match form {
            AttentionTcForm::Heads16 => (
                &self.attend_partial_heads_tc,
                "launch attend_partial_heads_tc",
            ),
            AttentionTcForm::Heads32 => (
                &self.attend_partial_heads_tc32,
                "launch attend_partial_heads_tc32",
            ),
            AttentionTcForm::F16Heads16 => (
                &self.attend_partial_heads_f16,
                "launch attend_partial_heads_f16",
            ),
            AttentionTcForm::F16Heads32 => (
                &self.attend_partial_heads_f16x32,
                "launch attend_partial_heads_f16x32",
            ),
        };
        // The f16 forms also take the bytes of a stored row and their stride in shared memory.
        let raw = form.is_f16().then(|| attention_f16_raw_rows(a.format));
        // SAFETY: this function's contract; the shapes were checked above.
        unsafe { self.attend(stream, a, func, partial, K, raw) }
    }

    /// Pass 1 (`partial`, either kernel: both take the same arguments) on `cfg`, then pass 2.
    ///
    /// # Safety
    /// As [`Self::paged_attention`], with `a` checked for `partial`'s shapes.
    unsafe fn attend(
        &self,
        stream: &CudaStream,
        a: &PagedAttention,
        (partial, launch): (&CudaFunction, &'static str),
        cfg: LaunchConfig,
        name: &'static str,
        raw_rows: Option<(usize, usize)>,
    ) -> Result<(), KernelError> {
        let (heads, hd) = (
            i32_arg(name, "heads", a.heads)?,
            i32_arg(name, "head_dim", a.head_dim)?,
        );
        let splits = i32_arg(name, "splits", a.splits)?;
        let (fmt, rope) = (a.format.code(), i32_arg(name, "rope", a.format.rope())?);
        let mut launch_args = stream.kernel(partial);
        launch_args
            .arg(&a.pool)
            .arg(&a.q)
            .arg(&a.key_offsets)
            .arg(&a.key_starts)
            .arg(&heads)
            .arg(&hd)
            .arg(&splits)
            .arg(&a.scale)
            .arg(&a.workspace)
            .arg(&fmt)
            .arg(&rope);
        let raw = raw_rows
            .map(|(bytes, stride)| {
                Ok::<_, KernelError>((
                    i32_arg(name, "row bytes", bytes)?,
                    i32_arg(name, "row stride", stride)?,
                ))
            })
            .transpose()?;
        if raw.is_none() && (a.query_norm_eps.is_some() || a.out_f16) {
            return Err(KernelError::invalid(
                name,
                "only the f16 forms norm raw queries or write f16".to_string(),
            ));
        }
        // The f16 forms also take the RoPE table's source where they rotate (the raw queries
        // forward, the finished rows back; a null table otherwise, so no block computes it), the
        // raw-query switch, and where they finish one split themselves the sinks and the output.
        let finish = raw.is_some() && a.splits == 1 && !a.separate_merge;
        let rotates = a.query_norm_eps.is_some() || finish;
        let rope = match a.inverse_rope {
            Some(r) if rotates => (
                r.positions,
                r.inv_freq,
                i32_arg(name, "rope_dim", r.rope_dim)?,
                r.attention_factor,
            ),
            _ => (0, 0, 0, 1.0f32),
        };
        let (q_raw, q_eps) = (
            i32::from(a.query_norm_eps.is_some()),
            a.query_norm_eps.unwrap_or(0.0),
        );
        let out: CUdeviceptr = if finish { a.out } else { 0 };
        let out_f16 = i32::from(a.out_f16);
        if let Some((bytes, stride)) = &raw {
            launch_args
                .arg(bytes)
                .arg(stride)
                .arg(&rope.0)
                .arg(&rope.1)
                .arg(&rope.2)
                .arg(&rope.3)
                .arg(&q_raw)
                .arg(&q_eps)
                .arg(&a.sinks)
                .arg(&out)
                .arg(&out_f16);
        }
        launch_args
            .launch(cfg)
            .map_err(KernelError::driver(launch))?;
        if finish {
            return Ok(());
        }
        // SAFETY: pass 1 above wrote every split record of `a`'s workspace.
        unsafe { self.attention_merge(stream, a, false) }
    }

    /// Pass 2 of every attention path (run by them; public so tests can run it again over a
    /// workspace): merges each (token, head)'s split records in `a.workspace` with its sink into
    /// `a.out`, undoing the output's RoPE where `a.inverse_rope` says. One split takes a warp per
    /// (token, head) row (`dsk_attend_combine_one_f32`) unless `general`, which forces the
    /// general kernel; both give the same bits.
    ///
    /// # Safety
    /// As [`Self::paged_attention`], with every split record of the workspace written.
    pub unsafe fn attention_merge(
        &self,
        stream: &CudaStream,
        a: &PagedAttention,
        general: bool,
    ) -> Result<(), KernelError> {
        check_attention(a)?;
        const K: &str = "attention";
        let (heads, hd) = (
            i32_arg(K, "heads", a.heads)?,
            i32_arg(K, "head_dim", a.head_dim)?,
        );
        let splits = i32_arg(K, "splits", a.splits)?;
        let (positions, inv_freq, rope_dim, factor) = match a.inverse_rope {
            Some(r) => (
                r.positions,
                r.inv_freq,
                i32_arg(K, "rope_dim", r.rope_dim)?,
                r.attention_factor,
            ),
            None => (0, 0, 0, 1.0f32),
        };
        if !general && a.splits == 1 && a.head_dim.is_multiple_of(2) && rope_dim % 2 == 0 {
            // One split (prefill chunks): a warp per (token, head) row, the same bits.
            let tokens = i32_arg(K, "tokens", a.tokens)?;
            let one = LaunchConfig {
                grid_dim: (u32_grid(K, (a.tokens * a.heads).div_ceil(8))?, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            stream
                .kernel(&self.attend_combine_one)
                .arg(&a.workspace)
                .arg(&a.sinks)
                .arg(&tokens)
                .arg(&heads)
                .arg(&hd)
                .arg(&a.out)
                .arg(&positions)
                .arg(&inv_freq)
                .arg(&rope_dim)
                .arg(&factor)
                .launch(one)
                .map_err(KernelError::driver("launch attend_combine_one"))?;
            return Ok(());
        }
        let combine = LaunchConfig {
            grid_dim: (
                u32_grid(K, a.heads)?,
                u32_grid(K, a.tokens)?,
                u32_grid(K, a.head_dim.div_ceil(COMBINE_DIMS))?,
            ),
            block_dim: (COMBINE_DIMS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        stream
            .kernel(&self.attend_combine)
            .arg(&a.workspace)
            .arg(&a.sinks)
            .arg(&heads)
            .arg(&hd)
            .arg(&splits)
            .arg(&a.out)
            .arg(&positions)
            .arg(&inv_freq)
            .arg(&rope_dim)
            .arg(&factor)
            .launch(combine)
            .map_err(KernelError::driver("launch attend_combine"))?;
        Ok(())
    }

    /// Lightning Indexer scores over compressed rows in the pool.
    ///
    /// # Safety
    /// Every pointer must address device memory of this context holding the shapes given; every
    /// row a token sees must be covered by its block table and lie inside the pool.
    pub unsafe fn indexer_scores(
        &self,
        stream: &CudaStream,
        a: &IndexerScores,
    ) -> Result<(), KernelError> {
        check_indexer(a)?;
        const K: &str = "indexer_scores";
        if a.max_visible == 0 {
            return Ok(());
        }
        let fpb = i64_arg(K, "floats_per_block", a.floats_per_block)?;
        let bs = i32_arg(K, "block_size", a.block_size)?;
        let base = i64_arg(K, "base", a.base)?;
        let ratio = i32_arg(K, "ratio", a.ratio)?;
        let stride = i32_arg(K, "stride", a.stride)?;
        let (heads, dim) = (i32_arg(K, "heads", a.heads)?, i32_arg(K, "dim", a.dim)?);
        let fmt = a.format.code();
        // Tensor-core: 64 rows per pass of a block; tiled: 64 or 16 ([`indexer_tile`]). Else 8
        // warps a block, one row each per pass. About four blocks per SM over all tokens.
        let kernel = indexer_kernel(a, self.smem_optin);
        if kernel == IndexerKernel::Plain && indexer_smem_bytes(a.heads, a.dim) > DEFAULT_SMEM {
            return Err(KernelError::invalid(
                K,
                format!("{} heads x {} dims need the tiled kernel, which does not fit this device's shared memory", a.heads, a.dim),
            ));
        }
        let f16_form = kernel == IndexerKernel::TensorCore
            && indexer_mma_f16_fits(a, self.indexer_f16, self.smem_optin);
        let (rows_per_block, smem, func) = match kernel {
            IndexerKernel::TensorCore if f16_form => (
                INDEXER_MMA_ROWS,
                indexer_mma_f16_smem_bytes(a.heads),
                &self.indexer_scores_mma_f16,
            ),
            IndexerKernel::TensorCore => (
                INDEXER_MMA_ROWS,
                indexer_mma_smem_bytes(a.heads),
                &self.indexer_scores_mma,
            ),
            IndexerKernel::Tiled => {
                let tile = indexer_tile(a.tokens, a.max_visible, self.sms, self.indexer_tile);
                let func = match tile {
                    IndexerTile::Rows64 => &self.indexer_scores_tiled,
                    IndexerTile::Rows16 => &self.indexer_scores_tiled16,
                };
                (tile.rows(), tile.smem_bytes(), func)
            }
            IndexerKernel::Plain => (
                8 * 4,
                indexer_smem_bytes(a.heads, a.dim),
                &self.indexer_scores,
            ),
        };
        // The f16 form's blocks take groups of tokens (grid y), the others one token each.
        let row_groups = if f16_form {
            a.tokens.div_ceil(indexer_f16_group_tokens(a.heads))
        } else {
            a.tokens
        };
        // The tensor-core kernels prefetch a block's next tile during its MMAs, so they get
        // as many blocks as fit the GPU at once (one wave, equal shares) rather than four per SM.
        let per_sm = match kernel {
            IndexerKernel::TensorCore => func
                .occupancy_max_active_blocks_per_multiprocessor(256, smem, None)
                .map_err(KernelError::driver("indexer_scores occupancy"))?
                .max(1) as usize,
            _ => 4,
        };
        let per_group = (per_sm * self.sms).div_ceil(row_groups).max(1);
        let blocks = a.max_visible.div_ceil(rows_per_block).min(per_group).max(1);
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, blocks)?, u32_grid(K, row_groups)?, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let tokens = i32_arg(K, "tokens", a.tokens)?;
        let mut launch = stream.kernel(func);
        launch
            .arg(&a.pool)
            .arg(&a.q)
            .arg(&a.weights)
            .arg(&a.block_tables)
            .arg(&a.block_table_starts)
            .arg(&a.visible)
            .arg(&a.row_starts)
            .arg(&a.out_starts)
            .arg(&fpb)
            .arg(&bs)
            .arg(&base)
            .arg(&ratio)
            .arg(&stride)
            .arg(&heads)
            .arg(&dim)
            .arg(&a.scale)
            .arg(&a.out)
            .arg(&fmt);
        if f16_form {
            launch.arg(&tokens);
        }
        launch
            .launch(cfg)
            .map_err(KernelError::driver("launch indexer_scores"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shared memory an H200 block may opt in to.
    const H200_SMEM: usize = 227 * 1024;

    /// A V4-Flash indexer launch at TP=1 over FP8 rows (132-byte records) for one decode token at
    /// 1M context, on the tensor cores; tests change the fields they are about.
    fn v4_fp8_indexer() -> IndexerScores {
        IndexerScores {
            pool: 16,
            q: 16,
            weights: 16,
            block_tables: 16,
            block_table_starts: 16,
            visible: 16,
            row_starts: 0,
            out_starts: 16,
            out: 16,
            tokens: 1,
            max_visible: 262_144,
            floats_per_block: 1 << 20,
            block_size: 128,
            base: 0,
            ratio: 4,
            stride: 33,
            heads: 64,
            dim: 128,
            scale: 1.0,
            format: KvRowFormat::Fp8Indexer,
            tensor_cores: true,
        }
    }

    fn topk_call(tokens: usize, max_count: usize, k: usize, workspace: CUdeviceptr) -> TopKSelect {
        TopKSelect {
            scores: 16,
            starts: 16,
            counts: 16,
            tokens,
            k,
            out_idx: 16,
            out_val: 16,
            max_count,
            workspace,
            index_base: 0,
            index_order: false,
            rounds_only: false,
        }
    }

    #[test]
    fn long_lists_of_few_tokens_take_the_two_stage_select() {
        // A 1M-context decode: 262,144 scores, k = 512.
        assert!(topk_two_stage(1, 262_144, 512));
        assert!(topk_two_stage(
            TOPK_TWO_STAGE_MAX_TOKENS,
            TOPK_SINGLE_MAX_COUNT + 1,
            512
        ));
        // Short lists, many tokens, or a k near a segment: one block per token.
        assert!(!topk_two_stage(1, TOPK_SINGLE_MAX_COUNT, 512));
        assert!(!topk_two_stage(1, 4000, 512));
        assert!(!topk_two_stage(TOPK_TWO_STAGE_MAX_TOKENS + 1, 262_144, 512));
        assert!(!topk_two_stage(1, 262_144, TOPK_SEGMENT / 2 + 1));
        assert!(!topk_two_stage(1, 262_144, 0));
    }

    #[test]
    fn two_stage_workspace_holds_k_candidates_per_segment() {
        // 64 segments of 512 (value, index) pairs per token, then 8 segments of 512 of those.
        assert_eq!(topk_rounds(262_144, 512), [64 * 512, 8 * 512]);
        assert_eq!(topk_select_workspace_bytes(1, 262_144, 512), 72 * 512 * 8);
        assert_eq!(
            topk_select_workspace_bytes(3, 262_144, 512),
            3 * 72 * 512 * 8
        );
        // Every round shrinks the candidates until a segment is left; short lists take one.
        assert_eq!(topk_rounds(70_000, 512), [18 * 512, 3 * 512]);
        assert_eq!(
            topk_rounds(4 << 20, 2048),
            [
                1024 * 2048,
                512 * 2048,
                256 * 2048,
                128 * 2048,
                64 * 2048,
                32 * 2048,
                16 * 2048,
                8 * 2048,
                4 * 2048,
                2 * 2048
            ]
        );
        assert_eq!(topk_rounds(2 * TOPK_SEGMENT + 1, 512), [3 * 512]);
        // A partial last segment still gets its k slots.
        assert_eq!(
            topk_select_workspace_bytes(2, 2 * TOPK_SEGMENT + 1, 512),
            2 * 3 * 512 * 8
        );
        assert_eq!(topk_select_workspace_bytes(1, 70_000, 100), 18 * 100 * 8);
        // The single-block select needs none.
        assert_eq!(
            topk_select_workspace_bytes(1, TOPK_SINGLE_MAX_COUNT, 512),
            0
        );
        assert_eq!(topk_select_workspace_bytes(1000, 262_144, 512), 0);
    }

    #[test]
    fn topk_segment_is_the_kernels_segment() {
        let define = format!("#define DSK_TOPK_SEG {TOPK_SEGMENT}\n");
        assert!(crate::sources::ATTENTION.body.contains(&define));
    }

    #[test]
    fn topk_select_needs_a_workspace_only_for_two_stages() {
        assert!(check_topk_select(&topk_call(1, 4096, 512, 0)).is_ok());
        let e = check_topk_select(&topk_call(1, 262_144, 512, 0)).unwrap_err();
        assert!(e.to_string().contains("workspace"), "{e}");
        assert!(check_topk_select(&topk_call(1, 262_144, 512, 16)).is_ok());
        let e = check_topk_select(&topk_call(1, 262_144, 512, 18)).unwrap_err();
        assert!(e.to_string().contains("aligned"), "{e}");
        // Counts past i32 cannot be indexed.
        let e = check_topk_select(&topk_call(1, 1 << 31, 512, 16)).unwrap_err();
        assert!(e.to_string().contains("i32"), "{e}");
        let mut a = topk_call(1, 4096, 512, 0);
        a.out_val = 0;
        assert!(check_topk_select(&a).is_err());
    }

    #[test]
    fn splits_fill_the_gpu_but_keep_work_per_split() {
        // One decoding token, 64 heads, 132 SMs: 9 splits if the keys allow it.
        assert_eq!(attention_splits(8320, 1, 64, 132), 9);
        // Few keys: at least 16 per split; a window layer's 128 keys at TP=2 (2 head groups)
        // get 8 splits.
        assert_eq!(attention_splits(40, 1, 64, 132), 3);
        assert_eq!(attention_splits(130, 1, 64, 132), 9);
        assert_eq!(attention_splits(128, 1, 2, 132), 8);
        // A prefill chunk already fills the GPU.
        assert_eq!(attention_splits(640, 2048, 64, 132), 1);
        assert_eq!(attention_workspace_floats(2, 4, 64, 3), 2 * 4 * 3 * 66);
    }

    #[test]
    fn shapes_are_checked_before_launch() {
        let a = PagedAttention {
            pool: 16,
            q: 16,
            key_offsets: 16,
            key_starts: 16,
            sinks: 16,
            out: 16,
            workspace: 16,
            tokens: 1,
            heads: 1,
            head_dim: 1024,
            splits: 1,
            scale: 1.0,
            format: KvRowFormat::F32,
            inverse_rope: None,
            query_norm_eps: None,
            separate_merge: false,
            out_f16: false,
        };
        assert!(check_attention(&a).is_err());
        assert!(check_attention(&PagedAttention { head_dim: 512, ..a }).is_ok());
        assert!(check_attention(&PagedAttention {
            q: 0,
            head_dim: 512,
            ..a
        })
        .is_err());
        let i = IndexerScores {
            max_visible: 1,
            floats_per_block: 1,
            stride: 128,
            format: KvRowFormat::F32,
            tensor_cores: false,
            ..v4_fp8_indexer()
        };
        // The head-grouped kernel: V4-Flash's 64 heads (TP=1) and 32 (TP=2), not 8 or 24.
        let v4 = PagedAttention {
            heads: 64,
            head_dim: 512,
            ..a
        };
        assert!(check_attention_heads(&v4).is_ok());
        assert!(check_attention_heads(&PagedAttention { heads: 32, ..v4 }).is_ok());
        assert!(check_attention_heads(&PagedAttention {
            heads: 16,
            head_dim: 64,
            ..v4
        })
        .is_ok());
        for bad in [
            PagedAttention { heads: 8, ..v4 },
            PagedAttention { heads: 24, ..v4 },
            PagedAttention {
                head_dim: 1024,
                ..v4
            },
            PagedAttention {
                head_dim: 500,
                ..v4
            },
            PagedAttention { tokens: 0, ..v4 },
            PagedAttention { splits: 0, ..v4 },
            PagedAttention { workspace: 0, ..v4 },
        ] {
            assert!(
                matches!(
                    check_attention_heads(&bad),
                    Err(KernelError::InvalidLaunch { .. })
                ),
                "{bad:?} accepted"
            );
        }
        assert!(attention_heads_smem_bytes() <= DEFAULT_SMEM);
        assert!(check_indexer(&i).is_ok());
        assert!(check_indexer(&IndexerScores { heads: 128, ..i }).is_err());
        // The tiled kernel takes V4-Flash's 64 x 128 (65 KB of shared memory, opt-in).
        assert!(indexer_tiled_fits(64, 128, 227 * 1024));
        assert!(!indexer_tiled_fits(64, 128, 48 * 1024));
        assert!(!indexer_tiled_fits(64, 256, usize::MAX));
        assert!(check_indexer(&IndexerScores { ratio: 3, ..i }).is_err());
    }

    #[test]
    fn tensor_core_attention_takes_v4_shapes_only() {
        use AttentionTcForm::{Heads16, Heads32};
        let v4 = PagedAttention {
            pool: 16,
            q: 16,
            key_offsets: 16,
            key_starts: 16,
            sinks: 16,
            out: 16,
            workspace: 16,
            tokens: 8192,
            heads: 64,
            head_dim: 512,
            splits: 1,
            scale: 1.0,
            format: KvRowFormat::F32,
            inverse_rope: None,
            query_norm_eps: None,
            separate_merge: false,
            out_f16: false,
        };
        // H200 (227 KB a block) takes both forms; GB10 (99 KB) the 16-head one; the default
        // 48 KB neither.
        let (h200, gb10) = (227 * 1024, 99 * 1024);
        for form in [Heads16, Heads32] {
            assert!(check_attention_heads_tc(&v4, form, h200).is_ok());
            // TP=2's 32 heads, several splits, stored latent records.
            let tp2 = PagedAttention {
                heads: 32,
                splits: 5,
                format: KvRowFormat::Bf16,
                ..v4
            };
            assert!(check_attention_heads_tc(&tp2, form, h200).is_ok());
        }
        assert!(check_attention_heads_tc(&v4, Heads16, gb10).is_ok());
        let h48 = PagedAttention { heads: 48, ..v4 };
        for (bad, form, optin) in [
            (v4, Heads16, DEFAULT_SMEM),
            (v4, Heads32, gb10),
            (h48, Heads32, h200),
            (PagedAttention { heads: 16, ..v4 }, Heads32, h200),
            (PagedAttention { heads: 8, ..v4 }, Heads16, h200),
            (PagedAttention { heads: 24, ..v4 }, Heads16, h200),
            (PagedAttention { head_dim: 64, ..v4 }, Heads16, h200),
            (
                PagedAttention {
                    head_dim: 256,
                    ..v4
                },
                Heads32,
                h200,
            ),
            (
                PagedAttention {
                    head_dim: 1024,
                    ..v4
                },
                Heads16,
                h200,
            ),
            (PagedAttention { tokens: 0, ..v4 }, Heads16, h200),
            (PagedAttention { splits: 0, ..v4 }, Heads32, h200),
            (PagedAttention { q: 0, ..v4 }, Heads16, h200),
            (PagedAttention { workspace: 0, ..v4 }, Heads32, h200),
        ] {
            assert!(
                matches!(
                    check_attention_heads_tc(&bad, form, optin),
                    Err(KernelError::InvalidLaunch { .. })
                ),
                "{bad:?} accepted by {form:?} with {optin} bytes"
            );
        }
        // 48 heads run 16 a block on any device; 64 and 32 take 32 where it fits.
        assert!(check_attention_heads_tc(&h48, Heads16, h200).is_ok());
        // Prefill-sized launches (more than 64 tokens) take 32 where it fits, decode-sized 16.
        assert_eq!(attention_tc_form(48, 8192, h200), Heads16);
        assert_eq!(attention_tc_form(64, 8192, h200), Heads32);
        assert_eq!(attention_tc_form(32, 65, h200), Heads32);
        assert_eq!(attention_tc_form(64, 8192, gb10), Heads16);
        assert_eq!(attention_tc_form(64, 64, h200), Heads16);
        assert_eq!(attention_tc_form(32, 1, h200), Heads16);
        // The kernels' layouts (attention.cu DSK_ATTC_SMEM_FLOATS(G)).
        let f32r = KvRowFormat::F32;
        assert_eq!(Heads16.smem_bytes(f32r), 20080 * 4);
        assert_eq!(Heads32.smem_bytes(f32r), 29632 * 4);
        assert_eq!((Heads16.threads(), Heads32.threads()), (256, 512));
        // Two 16-head blocks an H200 SM (228 KB an SM, 1 KB reserved per block).
        assert!(2 * (Heads16.smem_bytes(f32r) + 1024) <= 228 * 1024);
    }

    #[test]
    fn f16_attention_forms_fit_and_reject_what_they_cannot_decode() {
        use AttentionTcForm::{F16Heads16, F16Heads32};
        let v4 = PagedAttention {
            pool: 16,
            q: 16,
            key_offsets: 16,
            key_starts: 16,
            sinks: 16,
            out: 16,
            workspace: 16,
            tokens: 8192,
            heads: 32,
            head_dim: 512,
            splits: 1,
            scale: 1.0,
            format: KvRowFormat::Fp8Latent { rope: 64 },
            inverse_rope: None,
            query_norm_eps: None,
            separate_merge: false,
            out_f16: false,
        };
        let (h200, gb10) = (227 * 1024, 99 * 1024);
        let (fp8, bf16, f32r) = (
            KvRowFormat::Fp8Latent { rope: 64 },
            KvRowFormat::Bf16,
            KvRowFormat::F32,
        );
        // attention.cu's DSK_ATTF_SMEM_BYTES(G, rs): (G + 32) x 1040 + (64 / G) x G x 144
        // + G x 80 + 4 G + 256 + 512 + 32 rs, rs the record's bytes rounded up to 16 (584 ->
        // 592).
        assert_eq!(
            F16Heads32.smem_bytes(fp8),
            64 * 1040 + 9216 + 2560 + 128 + 256 + 512 + 32 * 592
        );
        assert_eq!(
            F16Heads16.smem_bytes(fp8),
            48 * 1040 + 9216 + 1280 + 64 + 256 + 512 + 32 * 592
        );
        assert_eq!(
            F16Heads32.smem_bytes(f32r),
            64 * 1040 + 9216 + 2560 + 128 + 256 + 512 + 32 * 2048
        );
        assert_eq!((F16Heads16.threads(), F16Heads32.threads()), (256, 256));
        assert!(F16Heads32.is_f16() && !AttentionTcForm::Heads32.is_f16());
        // Two blocks an H200 SM over stored records (228 KB an SM, 1 KB reserved per block);
        // both forms fit GB10 over FP8 records.
        for format in [fp8, bf16] {
            assert!(2 * (F16Heads32.smem_bytes(format) + 1024) <= 228 * 1024);
        }
        for form in [F16Heads16, F16Heads32] {
            for format in [fp8, bf16, f32r] {
                let a = PagedAttention { format, ..v4 };
                assert!(
                    check_attention_heads_tc(&a, form, h200).is_ok(),
                    "{form:?} {format:?}"
                );
            }
            assert!(check_attention_heads_tc(&v4, form, gb10).is_ok());
        }
        // Raw queries: the f16 forms norm them, with the RoPE table given and at most 64 pairs.
        let rope = InverseRope {
            positions: 256,
            inv_freq: 256,
            rope_dim: 64,
            attention_factor: 1.0,
        };
        let raw = PagedAttention {
            format: fp8,
            query_norm_eps: Some(1e-6),
            inverse_rope: Some(rope),
            ..v4
        };
        for form in [F16Heads16, F16Heads32] {
            assert!(check_attention_heads_tc(&raw, form, h200).is_ok());
            let wide = InverseRope {
                rope_dim: 130,
                ..rope
            };
            let too_wide = PagedAttention {
                inverse_rope: Some(wide),
                ..raw
            };
            assert!(check_attention_heads_tc(&too_wide, form, h200).is_err());
        }
        for form in [AttentionTcForm::Heads16, AttentionTcForm::Heads32] {
            assert!(check_attention_heads_tc(&raw, form, h200).is_err());
        }
        let unrotated = PagedAttention {
            inverse_rope: None,
            ..raw
        };
        assert!(check_attention(&unrotated).is_err());
        // f16 output: only where an f16 form finishes one split itself.
        let half = PagedAttention {
            out_f16: true,
            splits: 1,
            ..raw
        };
        for form in [F16Heads16, F16Heads32] {
            assert!(finishes_in_pass_one(&half, form));
            assert!(check_attention_heads_tc(&half, form, h200).is_ok());
            for bad in [
                PagedAttention { splits: 2, ..half },
                PagedAttention {
                    separate_merge: true,
                    ..half
                },
            ] {
                assert!(!finishes_in_pass_one(&bad, form));
                assert!(check_attention_heads_tc(&bad, form, h200).is_err());
            }
        }
        assert!(check_attention_heads_tc(&half, AttentionTcForm::Heads32, h200).is_err());
        assert_eq!(attention_f16_form(32, 8192, fp8, h200), F16Heads32);
        assert_eq!(attention_f16_form(64, 65, bf16, h200), F16Heads32);
        assert_eq!(attention_f16_form(64, 64, fp8, h200), F16Heads16);
        assert_eq!(attention_f16_form(32, 1, fp8, h200), F16Heads16);
        assert_eq!(attention_f16_form(48, 8192, fp8, h200), F16Heads16);
        assert_eq!(attention_f16_form(64, 8192, f32r, gb10), F16Heads16);
        for (bad, form, optin) in [
            // RoPE dims that split a 16-byte chunk, indexer rows.
            (
                PagedAttention {
                    format: KvRowFormat::Fp8Latent { rope: 60 },
                    ..v4
                },
                F16Heads16,
                h200,
            ),
            (
                PagedAttention {
                    format: KvRowFormat::Fp8Indexer,
                    ..v4
                },
                F16Heads32,
                h200,
            ),
            (PagedAttention { format: f32r, ..v4 }, F16Heads32, gb10),
            (
                PagedAttention {
                    head_dim: 256,
                    ..v4
                },
                F16Heads16,
                h200,
            ),
            (PagedAttention { heads: 16, ..v4 }, F16Heads32, h200),
            (v4, F16Heads16, DEFAULT_SMEM),
        ] {
            assert!(
                matches!(
                    check_attention_heads_tc(&bad, form, optin),
                    Err(KernelError::InvalidLaunch { .. })
                ),
                "{bad:?} accepted by {form:?} with {optin} bytes"
            );
        }
    }

    #[test]
    fn tensor_cores_score_when_asked_and_the_shape_fits() {
        let v4 = v4_fp8_indexer();
        let h200 = 227 * 1024;
        // V4-Flash at TP=1 (64 heads) and TP=2 (32), any stored format, and narrower shapes;
        // heads not a multiple of 8 are zero-padded.
        for (heads, dim) in [(64, 128), (32, 128), (16, 128), (13, 128), (1, 8), (64, 32)] {
            for (format, stride) in [
                (KvRowFormat::Fp8Indexer, 33),
                (KvRowFormat::Bf16, 64),
                (KvRowFormat::F32, 128),
            ] {
                let a = IndexerScores {
                    heads,
                    dim,
                    format,
                    stride,
                    ..v4
                };
                assert_eq!(indexer_kernel(&a, h200), IndexerKernel::TensorCore, "{a:?}");
                // The TF32 switch off: the f32 kernels, as before.
                let exact = IndexerScores {
                    tensor_cores: false,
                    ..a
                };
                assert_eq!(indexer_kernel(&exact, h200), IndexerKernel::Tiled);
            }
        }
        // More heads or wider rows than the tile takes: the f32 kernels.
        assert_eq!(
            indexer_kernel(&IndexerScores { heads: 80, ..v4 }, h200),
            IndexerKernel::Plain
        );
        assert_eq!(
            indexer_kernel(
                &IndexerScores {
                    dim: 256,
                    heads: 16,
                    ..v4
                },
                h200
            ),
            IndexerKernel::Plain
        );
        assert!(!indexer_mma_fits(64, 124, h200));
        assert!(!indexer_mma_fits(0, 128, h200));
        assert!(!indexer_mma_fits(64, 0, h200));
        // 64 heads need 67 KB of shared memory (opt-in), 32 heads 50 KB; a device that cannot
        // give it keeps the f32 kernels.
        assert_eq!(
            indexer_mma_smem_bytes(64),
            (64 * 132 + 128 + 64 + 64 * 132) * 4
        );
        assert_eq!(indexer_mma_smem_bytes(13), indexer_mma_smem_bytes(16));
        assert!(indexer_mma_fits(64, 128, 99 * 1024));
        assert!(!indexer_mma_fits(64, 128, 48 * 1024));
        assert_eq!(indexer_kernel(&v4, 48 * 1024), IndexerKernel::Plain);
        assert!(check_indexer(&v4).is_ok());
    }

    #[test]
    fn stored_row_formats_are_checked_before_launch() {
        let a = PagedAttention {
            pool: 16,
            q: 16,
            key_offsets: 16,
            key_starts: 16,
            sinks: 16,
            out: 16,
            workspace: 16,
            tokens: 1,
            heads: 64,
            head_dim: 512,
            splits: 1,
            scale: 1.0,
            format: KvRowFormat::Fp8Latent { rope: 64 },
            inverse_rope: None,
            query_norm_eps: None,
            separate_merge: false,
            out_f16: false,
        };
        assert!(check_attention(&a).is_ok());
        assert!(check_attention_heads(&a).is_ok());
        for format in [KvRowFormat::Bf16, KvRowFormat::Fp8Indexer] {
            assert!(check_attention(&PagedAttention { format, ..a }).is_ok());
        }
        for format in [
            // Odd e4m3 part, more rope dims than dims.
            KvRowFormat::Fp8Latent { rope: 63 },
            KvRowFormat::Fp8Latent { rope: 576 },
        ] {
            let bad = PagedAttention { format, ..a };
            assert!(
                matches!(
                    check_attention(&bad),
                    Err(KernelError::InvalidLaunch { .. })
                ),
                "{format:?} accepted"
            );
            assert!(check_attention_heads(&bad).is_err());
        }
        let i = IndexerScores {
            max_visible: 1,
            tensor_cores: false,
            ..v4_fp8_indexer()
        };
        assert!(check_indexer(&i).is_ok());
        assert!(check_indexer(&IndexerScores { stride: 32, ..i }).is_err());
        let bf16 = IndexerScores {
            format: KvRowFormat::Bf16,
            stride: 64,
            ..i
        };
        assert!(check_indexer(&bf16).is_ok());
        assert!(check_indexer(&IndexerScores { stride: 63, ..bf16 }).is_err());
        // The f32 row needs its full width too.
        let f32_rows = IndexerScores {
            format: KvRowFormat::F32,
            stride: 127,
            ..i
        };
        assert!(check_indexer(&f32_rows).is_err());
        assert!(check_indexer(&IndexerScores {
            format: KvRowFormat::Fp8Latent { rope: 0 },
            stride: 128,
            ..i
        })
        .is_err());
    }

    #[test]
    fn f16_indexer_takes_fp8_rows_of_prefill_sized_launches() {
        let a = IndexerScores {
            tokens: 8192,
            max_visible: 2048,
            ..v4_fp8_indexer()
        };
        assert!(indexer_mma_f16_fits(&a, true, H200_SMEM));
        assert!(!indexer_mma_f16_fits(&a, false, H200_SMEM));
        // A decode step (even at 1M context) keeps the TF32 form.
        let decode = IndexerScores {
            tokens: 1,
            max_visible: 262_144,
            ..a
        };
        assert!(!indexer_mma_f16_fits(&decode, true, H200_SMEM));
        assert!(!indexer_mma_f16_fits(
            &IndexerScores {
                format: KvRowFormat::Bf16,
                stride: 64,
                ..a
            },
            true,
            H200_SMEM
        ));
        assert!(!indexer_mma_f16_fits(
            &IndexerScores { dim: 40, ..a },
            true,
            H200_SMEM
        ));
        // A group of 4 tokens at V4-Flash's 64 heads, 8 at 32: 256 query columns, ~87 KB, which
        // fits sm_121's 99 KB opt-in (101,376 bytes) but not a 48 KB default. Heads round up to
        // a power of two (a token's columns within one warp's 64).
        assert_eq!(indexer_f16_group_tokens(64), 4);
        assert_eq!(indexer_f16_group_tokens(40), 4);
        assert_eq!(indexer_f16_group_tokens(32), 8);
        assert_eq!(indexer_f16_group_tokens(13), 16);
        assert_eq!(indexer_f16_group_tokens(8), 32);
        assert_eq!(indexer_f16_group_tokens(3), 32);
        assert_eq!(indexer_f16_heads(24), 32);
        for heads in [1, 3, 8, 13, 24, 32, 40, 64] {
            assert_eq!(indexer_mma_f16_smem_bytes(heads), 89_216, "{heads} heads");
        }
        assert!(indexer_mma_f16_fits(&a, true, 101_376));
        assert!(!indexer_mma_f16_fits(&a, true, DEFAULT_SMEM));
    }

    #[test]
    fn tiled_tile_smem_fits_its_arrays() {
        // 64 rows: queries [128][64] + tile [128][65] (opt-in); 16 rows: [128][68] + [128][17],
        // under the default 48 KB.
        assert_eq!(IndexerTile::Rows64.smem_bytes(), indexer_tiled_smem_bytes());
        assert_eq!(IndexerTile::Rows64.smem_bytes(), 128 * (64 + 65) * 4);
        assert_eq!(IndexerTile::Rows16.smem_bytes(), 128 * (68 + 17) * 4);
        assert!(IndexerTile::Rows16.smem_bytes() <= DEFAULT_SMEM);
        assert_eq!(IndexerTile::Rows64.rows(), 64);
        assert_eq!(IndexerTile::Rows16.rows(), 16);
    }

    #[test]
    fn short_lists_on_an_idle_gpu_take_16_row_tiles() {
        let auto = IndexerTileChoice::Auto;
        let h200 = 132;
        // A decode token at 8K context (2,048 CSA rows): 128 blocks of 16 rows, one wave.
        assert_eq!(indexer_tile(1, 2048, h200, auto), IndexerTile::Rows16);
        // 32K context: 512 blocks of 16 would be four waves; 64-row tiles (measured faster).
        assert_eq!(indexer_tile(1, 8192, h200, auto), IndexerTile::Rows64);
        // 16 tokens at 8K: 512 blocks of 64 already fill the GPU.
        assert_eq!(indexer_tile(16, 2048, h200, auto), IndexerTile::Rows64);
        // The boundary: 132 blocks of 16 rows.
        assert_eq!(indexer_tile(1, 132 * 16, h200, auto), IndexerTile::Rows16);
        assert_eq!(
            indexer_tile(1, 132 * 16 + 1, h200, auto),
            IndexerTile::Rows64
        );
        assert_eq!(indexer_tile(4, 33 * 16, h200, auto), IndexerTile::Rows16);
        assert_eq!(
            indexer_tile(4, 33 * 16 + 1, h200, auto),
            IndexerTile::Rows64
        );
        // Tiny lists, and no overflow on absurd ones.
        assert_eq!(indexer_tile(1, 1, h200, auto), IndexerTile::Rows16);
        assert_eq!(
            indexer_tile(usize::MAX, usize::MAX, h200, auto),
            IndexerTile::Rows64
        );
        // The switch overrides the rule both ways.
        let f64_ = IndexerTileChoice::Force(IndexerTile::Rows64);
        let f16 = IndexerTileChoice::Force(IndexerTile::Rows16);
        assert_eq!(indexer_tile(1, 2048, h200, f64_), IndexerTile::Rows64);
        assert_eq!(indexer_tile(64, 1 << 20, h200, f16), IndexerTile::Rows16);
    }

    #[test]
    fn indexer_tile_switch_parses() {
        use KernelChoice::{Auto, Force};
        assert_eq!(indexer_tile_choice(None).unwrap(), Auto);
        assert_eq!(indexer_tile_choice(Some("")).unwrap(), Auto);
        assert_eq!(indexer_tile_choice(Some(" auto ")).unwrap(), Auto);
        assert_eq!(
            indexer_tile_choice(Some("64")).unwrap(),
            Force(IndexerTile::Rows64)
        );
        assert_eq!(
            indexer_tile_choice(Some("16")).unwrap(),
            Force(IndexerTile::Rows16)
        );
        let err = indexer_tile_choice(Some("32")).unwrap_err().to_string();
        assert!(err.contains("DSPARK_INDEXER_TILE"), "{err}");
    }

    #[test]
    fn topk_block_form_follows_the_token_count_unless_forced() {
        use KernelChoice::{Auto, Force};
        assert_eq!(topk_block_choice(None).unwrap(), Auto);
        assert_eq!(topk_block_choice(Some(" auto")).unwrap(), Auto);
        assert_eq!(
            topk_block_choice(Some("wide")).unwrap(),
            Force(TopKBlock::Wide)
        );
        assert_eq!(
            topk_block_choice(Some("smem")).unwrap(),
            Force(TopKBlock::Smem)
        );
        let err = topk_block_choice(Some("fast")).unwrap_err().to_string();
        assert!(err.contains("DSPARK_TOPK_BLOCK"), "{err}");
        // Decode steps (up to the two-stage select's tokens) keep the wide blocks, prefill chunks
        // take the shared-key ones; a forced form holds at any count.
        assert_eq!(topk_block(1, Auto), TopKBlock::Smem);
        assert_eq!(topk_block(8, Auto), TopKBlock::Smem);
        assert_eq!(topk_block(9, Auto), TopKBlock::Wide);
        assert_eq!(topk_block(TOPK_TWO_STAGE_MAX_TOKENS, Auto), TopKBlock::Wide);
        assert_eq!(
            topk_block(TOPK_TWO_STAGE_MAX_TOKENS + 1, Auto),
            TopKBlock::Smem
        );
        assert_eq!(topk_block(8192, Force(TopKBlock::Wide)), TopKBlock::Wide);
        assert_eq!(topk_block(1, Force(TopKBlock::Smem)), TopKBlock::Smem);
    }

    #[test]
    fn topk_shared_keys_fit_the_list_and_the_device() {
        // A list's own length up to 16,384 keys (64 KB), never more than the device allows next
        // to the static arrays, and at least one key.
        assert_eq!(topk_smem_keys(1024, H200_SMEM), 1024);
        assert_eq!(topk_smem_keys(12_524, H200_SMEM), 12_524);
        assert_eq!(topk_smem_keys(usize::MAX, H200_SMEM), TOPK_SMEM_MAX_KEYS);
        assert_eq!(topk_smem_keys(0, H200_SMEM), 1);
        assert_eq!(topk_smem_keys(usize::MAX, 48 * 1024), (48 - 9) * 1024 / 4);
    }
}
