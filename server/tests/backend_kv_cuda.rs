//! The CUDA backend's KV pool kernels against the CPU backend on random data: row scatter and
//! gather, split-KV attention with sinks (V4-Flash shape: 64 heads of 512 over a long key list,
//! and the tiny model's shape), Lightning Indexer scores through block tables (64 heads of 128),
//! each over rows stored as f32, bf16 and the FP8 records (`--kv-cache-dtype`). Both backends
//! decode a stored row to the same f32 values, so one bound serves every format.
//!
//! Needs a GPU: `DSPARK_TEST_CUDA=1 cargo test -p dspark-server --test backend_kv_cuda`.
//! Elsewhere each test says it was skipped and passes.

use dspark_server::backend::cpu::CpuBackend;
use dspark_server::backend::cuda::CudaBackend;
use dspark_server::backend::kv::{IndexerRows, KeyLists, KvRowFormat, RowAddressing};
use dspark_server::backend::Backend;
use rand::{Rng, SeedableRng};

/// f32 accumulation in another order (and split-KV merging) against the CPU: ~1e-6 relative.
const BOUND: f64 = 1e-4;

fn gpu_enabled(test: &str) -> bool {
    let on = std::env::var("DSPARK_TEST_CUDA").is_ok_and(|v| v == "1");
    if !on {
        eprintln!("{test}: skipped (set DSPARK_TEST_CUDA=1 on a machine with a GPU)");
    }
    on
}

fn random(rng: &mut rand::rngs::StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| rng.random_range(-1.0f32..1.0) * scale)
        .collect()
}

/// Largest |a - b| relative to the largest |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b
        .iter()
        .fold(0f64, |m, v| m.max(f64::from(v.abs())))
        .max(1e-30);
    a.iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max(f64::from((x - y).abs())))
        / scale
}

/// `rows` random rows of `dim` values in [-scale, scale), stored back to back in `format`.
fn stored_rows(
    rng: &mut rand::rngs::StdRng,
    format: KvRowFormat,
    rows: usize,
    dim: usize,
    scale: f32,
) -> Vec<f32> {
    format.encode_rows(&random(rng, rows * dim, scale), dim)
}

/// The same pool contents on both backends.
fn pools(
    cpu: &CpuBackend,
    gpu: &CudaBackend,
    data: &[f32],
) -> (Vec<f32>, <CudaBackend as Backend>::KvStore) {
    let mut c = cpu.kv_store(data.len()).unwrap();
    let mut g = gpu.kv_store(data.len()).unwrap();
    // Written in rows of 1000 at scattered offsets, so the scatter kernel is exercised too.
    let offsets: Vec<usize> = (0..data.len() / 1000).rev().map(|r| r * 1000).collect();
    let rows: Vec<f32> = offsets
        .iter()
        .flat_map(|&o| data[o..o + 1000].iter().copied())
        .collect();
    cpu.kv_write(&mut c, &offsets, 1000, &rows).unwrap();
    gpu.kv_write(&mut g, &offsets, 1000, &rows).unwrap();
    (c, g)
}

#[test]
fn kv_rows_round_trip_and_out_of_pool_rows_are_refused() {
    if !gpu_enabled("kv_rows_round_trip_and_out_of_pool_rows_are_refused") {
        return;
    }
    let gpu = CudaBackend::open(0).unwrap();
    let cpu = CpuBackend;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let data = random(&mut rng, 50_000, 1.0);
    let (c, g) = pools(&cpu, &gpu, &data);
    let offsets = [7usize, 49_000, 123, 30_001];
    let want = cpu.kv_read(&c, &offsets, 999).unwrap();
    assert_eq!(gpu.kv_read(&g, &offsets, 999).unwrap(), want);
    assert!(gpu.kv_read(&g, &[49_500], 999).is_err());
}

fn attention_case(format: KvRowFormat, heads: usize, hd: usize, key_counts: &[usize], seed: u64) {
    let gpu = CudaBackend::open(0).unwrap();
    let cpu = CpuBackend;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rows_in_pool = 12_000;
    let slots = format.slots(hd);
    let data = stored_rows(&mut rng, format, rows_in_pool, hd, 1.0);
    let (c, g) = pools(&cpu, &gpu, &data);
    let mut keys = KeyLists::new(format);
    for &count in key_counts {
        keys.offsets
            .extend((0..count).map(|_| rng.random_range(0..rows_in_pool) * slots));
        keys.finish_token();
    }
    // Large enough logits that the softmax is peaked and the max matters.
    let q = random(&mut rng, key_counts.len() * heads * hd, 0.5);
    let sinks = random(&mut rng, heads, 3.0);
    let scale = (hd as f32).powf(-0.5);
    let want = cpu
        .kv_attend(&c, &q, heads, hd, &keys, &sinks, scale)
        .unwrap();
    let got = gpu
        .kv_attend(&g, &q, heads, hd, &keys, &sinks, scale)
        .unwrap();
    let d = rel_diff(&got, &want);
    eprintln!(
        "attention {format:?} heads={heads} hd={hd} keys={key_counts:?}: relative difference {d:e}"
    );
    assert!(d < BOUND, "{d:e}");
}

/// The latent-row formats of a pool of `hd`-wide rows with `rope` rotary dims.
fn latent_formats(rope: usize) -> [KvRowFormat; 3] {
    [
        KvRowFormat::F32,
        KvRowFormat::Bf16,
        KvRowFormat::Fp8Latent { rope },
    ]
}

#[test]
fn attention_matches_cpu_at_v4_flash_shape() {
    if !gpu_enabled("attention_matches_cpu_at_v4_flash_shape") {
        return;
    }
    // One decoding token over 128 window + 8192 HCA rows (1M context), a CSA token (128 + 512),
    // and short lists (the first tokens of a sequence).
    for format in latent_formats(64) {
        attention_case(format, 64, 512, &[8320], 2);
        attention_case(format, 64, 512, &[640, 1, 128, 37], 3);
    }
}

#[test]
fn attention_matches_cpu_at_tiny_shape() {
    if !gpu_enabled("attention_matches_cpu_at_tiny_shape") {
        return;
    }
    let counts: Vec<usize> = (1..=40).collect();
    for format in latent_formats(16) {
        attention_case(format, 4, 64, &counts, 4);
    }
}

#[test]
fn indexer_scores_match_cpu_through_block_tables() {
    if !gpu_enabled("indexer_scores_match_cpu_through_block_tables") {
        return;
    }
    // V4-Flash's 64 heads x 128 (the tiled kernel), half of them (TP=2), the tiny model's 32-wide
    // rows, and 256-wide rows (the one-warp-per-row kernel).
    for format in [KvRowFormat::F32, KvRowFormat::Bf16, KvRowFormat::Fp8Indexer] {
        indexer_case(format, 64, 128, 5);
        indexer_case(format, 32, 128, 6);
        indexer_case(format, 4, 32, 7);
        indexer_case(format, 16, 256, 8);
    }
}

fn indexer_case(format: KvRowFormat, heads: usize, dim: usize, seed: u64) {
    let gpu = CudaBackend::open(0).unwrap();
    // f32 scores (the TF32 ones are bounded in kernels/tests/indexer_mma_gpu.rs).
    gpu.set_gemm_tf32(false);
    let cpu = CpuBackend;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (block_size, ratio) = (128, 4);
    // Blocks of whole stored rows, so every row the addressing finds is a valid record.
    let slots = format.slots(dim);
    let rows_per_block = 40_000 / dim;
    let floats_per_block = rows_per_block * slots;
    let num_blocks = 300;
    let data = stored_rows(&mut rng, format, rows_per_block * num_blocks, dim, 1.0);
    let (c, g) = pools(&cpu, &gpu, &data[..data.len() / 1000 * 1000]);
    let addressing = RowAddressing {
        floats_per_block,
        block_size,
        base: 9 * slots,
        ratio,
        stride: slots,
    };
    // Two sequences with shuffled block tables; three query tokens (two share a table).
    let mut ids: Vec<u32> = (0..num_blocks as u32 - 1).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.random_range(0..=i));
    }
    let (a, b) = (&ids[..200], &ids[200..]);
    let rows = IndexerRows {
        format,
        addressing,
        block_tables: vec![a, a, b],
        visible: vec![200 * block_size / ratio, 1_001, 97],
    };
    let q = random(&mut rng, 3 * heads * dim, 1.0);
    let w = random(&mut rng, 3 * heads, 0.2);
    let scale = (dim as f32).powf(-0.5);
    let want = cpu
        .kv_indexer_scores(&c, &q, &w, heads, dim, &rows, scale)
        .unwrap();
    let got = gpu
        .kv_indexer_scores(&g, &q, &w, heads, dim, &rows, scale)
        .unwrap();
    let d = rel_diff(&got, &want);
    eprintln!(
        "indexer scores {format:?} heads={heads} dim={dim} ({} rows): relative difference {d:e}",
        want.len()
    );
    assert!(d < BOUND, "{d:e}");
    // A row beyond the block table is refused, not read.
    let short = IndexerRows {
        visible: vec![200 * block_size / ratio + 1, 1, 1],
        ..rows
    };
    assert!(gpu
        .kv_indexer_scores(&g, &q, &w, heads, dim, &short, scale)
        .is_err());
}

#[test]
fn indexer_top_k_on_gpu_equals_top_k_of_its_scores_with_ties() {
    if !gpu_enabled("indexer_top_k_on_gpu_equals_top_k_of_its_scores_with_ties") {
        return;
    }
    // 12,800 rows (the single-block select). Key rows repeat every 7 rows, so scores tie
    // exactly and the cut falls among ties.
    indexer_top_k_case(9, 400, 7, |r| r % 7);
}

#[test]
fn indexer_top_k_two_stage_equals_top_k_of_its_scores_with_ties() {
    if !gpu_enabled("indexer_top_k_two_stage_equals_top_k_of_its_scores_with_ties") {
        return;
    }
    // 70,400 rows: the two-stage select (a 4096-row segment's top k, then their top k). 5003
    // distinct key rows each about 14 times, scattered over the whole list, so the top 512 are
    // ties spread over every segment and the cut falls among ties of one value.
    indexer_top_k_case(10, 2200, 5003, |r| (r * 7919) % 5003);
}

/// `kv_indexer_top_k` against `top_k_indices` of the GPU's own scores, for tokens seeing all
/// `num_blocks * 32` rows, fewer rows than k, and exactly k; row `r` holds key row `key_of(r)`
/// of `distinct` random ones.
fn indexer_top_k_case(seed: u64, num_blocks: usize, distinct: usize, key_of: fn(usize) -> usize) {
    let gpu = CudaBackend::open(0).unwrap();
    // f32 scores: equal rows score exactly equal.
    gpu.set_gemm_tf32(false);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (heads, dim, block_size, ratio, k) = (64, 128, 128, 4, 512);
    let rows_per_block = block_size / ratio;
    let floats_per_block = rows_per_block * dim;
    let keys = random(&mut rng, distinct * dim, 1.0);
    let data: Vec<f32> = (0..num_blocks * rows_per_block)
        .flat_map(|r| keys[key_of(r) * dim..(key_of(r) + 1) * dim].iter().copied())
        .collect();
    let mut g = gpu.kv_store(data.len()).unwrap();
    let all: Vec<usize> = (0..num_blocks).map(|b| b * floats_per_block).collect();
    gpu.kv_write(&mut g, &all, floats_per_block, &data).unwrap();
    let table: Vec<u32> = (0..num_blocks as u32).rev().collect();
    let rows = IndexerRows {
        format: KvRowFormat::F32,
        addressing: RowAddressing {
            floats_per_block,
            block_size,
            base: 0,
            ratio,
            stride: dim,
        },
        block_tables: vec![&table, &table, &table],
        // Many rows, fewer rows than k, exactly k.
        visible: vec![num_blocks * rows_per_block, 300, k],
    };
    let q = random(&mut rng, 3 * heads * dim, 1.0);
    let w = random(&mut rng, 3 * heads, 0.2);
    let scale = (dim as f32).powf(-0.5);
    let scores = gpu
        .kv_indexer_scores(&g, &q, &w, heads, dim, &rows, scale)
        .unwrap();
    let chosen = gpu
        .kv_indexer_top_k(&g, &q, &w, heads, dim, &rows, scale, k)
        .unwrap();
    let mut from = 0;
    for (t, &vis) in rows.visible.iter().enumerate() {
        let want = dspark_server::engine::model::ops::top_k_indices(&scores[from..from + vis], k);
        assert_eq!(chosen[t], want, "token {t} ({vis} rows)");
        from += vis;
    }
}
