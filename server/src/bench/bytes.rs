//! The bytes one engine step has to move: the weights it touches given the routing, and the KV
//! entries its attention reads. Pure functions of the config, the tensor manifest and the plan
//! shape, so the bench can turn a step time into an achieved bandwidth.
//!
//! Model (docs/PERFORMANCE.md, "Bytes moved"):
//! - dense weights (everything but routed experts, the embedding and the hash-routing tables) are
//!   read whole every step; the LM head only when the step wants logits;
//! - the embedding (and each hash layer's `tid2eid` table) only for the distinct token ids looked
//!   up;
//! - routed experts: the *expected* number of distinct experts `t` tokens touch when each picks
//!   `k` of `E` uniformly, `E * (1 - (1 - k/E)^t)`, times the bytes of one expert (an expectation
//!   under uniform routing: trained routers are skewed, which touches fewer experts);
//! - KV read, per sequence and layer: the union of what its query tokens see (the sliding window
//!   rows from `start - window + 1` to the end, all compressed rows for HCA, for CSA the indexer
//!   keys of all compressed rows plus `min(rows, q * index_topk)` selected compressed rows).
//!
//! KV writes and activations are not counted (small next to the reads at these shapes).

use crate::engine::model::config::{AttentionKind, ModelConfig};
use crate::engine::model::manifest::{ExpectedTensor, StoredDtype};
use crate::engine::model::KvStorage;

/// How the backend holds the weights in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightStorage {
    /// The checkpoint's dtypes: FP8 e4m3 + one E8M0 scale per 128x128 block, FP4 e2m1 (two per
    /// byte) + one UE8M0 scale per 32 values, bf16, f32 (what the CUDA backend keeps).
    Checkpoint,
    /// FP8 and FP4 tensors kept packed as in the checkpoint, bf16 and f32 ones held as f32
    /// (the CUDA backend before bf16 tensors stayed bf16).
    PackedF32,
    /// Every float tensor dequantized to f32 (the CPU reference backend).
    F32,
}

impl WeightStorage {
    pub fn name(self) -> &'static str {
        match self {
            Self::Checkpoint => "checkpoint",
            Self::PackedF32 => "packed-f32",
            Self::F32 => "f32",
        }
    }
}

/// Bytes of one KV entry of each kind the attention reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvEntryBytes {
    /// A latent row (sliding-window row or compressed row), `head_dim` values.
    pub latent_row: u64,
    /// A Lightning Indexer key row, `index_head_dim` values (CSA layers).
    pub indexer_row: u64,
}

/// The KV cache element type the bytes model assumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// The CPU reference layout (docs/KV.md).
    F32,
    Bf16,
    /// The V4 FP8 record: e4m3 non-rotary dims, bf16 rotary dims, 8 scale bytes; indexer rows
    /// e4m3 + one f32 scale (584 and 132 bytes at V4-Flash dims).
    Fp8,
}

impl KvDtype {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Fp8 => "fp8",
        }
    }

    /// What the model's pool stores.
    pub fn storage(self) -> KvStorage {
        match self {
            Self::F32 => KvStorage::F32,
            Self::Bf16 => KvStorage::Bf16,
            Self::Fp8 => KvStorage::Fp8,
        }
    }

    /// Bytes of a stored row: the pool's own record sizes (`kv_record`).
    pub fn entry_bytes(self, cfg: &ModelConfig) -> KvEntryBytes {
        let storage = self.storage();
        KvEntryBytes {
            latent_row: storage.latent_format(cfg).bytes(cfg.head_dim) as u64,
            indexer_row: storage.index_format().bytes(cfg.index_head_dim) as u64,
        }
    }
}

/// Stored bytes of one tensor.
pub fn tensor_bytes(t: &ExpectedTensor, storage: WeightStorage) -> u64 {
    let n: u64 = t.shape.iter().map(|&d| d as u64).product();
    if t.dtype == StoredDtype::I64 {
        return n * 8;
    }
    if storage == WeightStorage::F32 {
        return n * 4;
    }
    match t.dtype {
        StoredDtype::F32 => n * 4,
        StoredDtype::Bf16 if storage == WeightStorage::PackedF32 => n * 4,
        StoredDtype::Bf16 => n * 2,
        StoredDtype::I64 => n * 8,
        StoredDtype::Fp8Block => {
            let rows = t.shape.first().copied().unwrap_or(1) as u64;
            let cols = t.shape.get(1).copied().unwrap_or(1) as u64;
            n + rows.div_ceil(128) * cols.div_ceil(128)
        }
        // Two e2m1 values per byte, one UE8M0 scale per 32 values along K.
        StoredDtype::Fp4Expert => n.div_ceil(2) + n.div_ceil(32),
    }
}

/// What a step touches, by category of weight.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WeightBytes {
    /// Read whole every step (attention, norms, hyper-connections, routers, shared experts).
    pub dense: u64,
    /// The LM head (`head.weight`, or the tied embedding).
    pub head: u64,
    /// Bytes of one embedding row.
    pub embed_row: u64,
    /// Bytes of one `tid2eid` row summed over the hash layers.
    pub hash_row: u64,
    /// Bytes of one routed expert (w1 + w2 + w3), summed over the MoE layers.
    pub expert_all_layers: u64,
    /// Routed experts per layer and how many each token picks.
    pub n_experts: u64,
    pub top_k: u64,
    pub vocab: u64,
}

/// Splits the manifest into the categories the step reads differently.
pub fn weight_bytes(
    cfg: &ModelConfig,
    manifest: &[ExpectedTensor],
    storage: WeightStorage,
) -> WeightBytes {
    let mut w = WeightBytes {
        n_experts: cfg.n_routed_experts as u64,
        top_k: cfg.num_experts_per_tok as u64,
        vocab: cfg.vocab_size as u64,
        ..WeightBytes::default()
    };
    for t in manifest {
        let b = tensor_bytes(t, storage);
        let rows = t.shape.first().copied().unwrap_or(1).max(1) as u64;
        if t.name == "embed.weight" {
            w.embed_row += b / rows;
            if cfg.tie_word_embeddings {
                w.head += b;
            }
        } else if t.name == "head.weight" {
            w.head += b;
        } else if t.name.ends_with(".gate.tid2eid") {
            w.hash_row += b / rows;
        } else if t.name.contains(".ffn.experts.") {
            w.expert_all_layers += b;
        } else {
            w.dense += b;
        }
    }
    // Summed over every expert above: one expert's share, all layers together.
    w.expert_all_layers /= w.n_experts.max(1);
    w
}

/// Expected distinct items hit by `draws` uniform picks of `picks` distinct items out of `n`:
/// `n * (1 - (1 - picks/n)^draws)`.
pub fn expected_distinct(n: u64, picks: u64, draws: u64) -> f64 {
    if n == 0 || draws == 0 {
        return 0.0;
    }
    let miss = 1.0 - (picks.min(n) as f64 / n as f64);
    n as f64 * (1.0 - miss.powf(draws as f64))
}

/// One sequence's share of a step: `tokens` new tokens starting at position `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqShape {
    pub start: u64,
    pub tokens: u64,
}

/// KV bytes one sequence's attention reads in a step, summed over the layers.
pub fn kv_read_bytes(cfg: &ModelConfig, kv: KvEntryBytes, seq: SeqShape) -> u64 {
    let end = seq.start + seq.tokens;
    let window = cfg.sliding_window as u64;
    // Union of the windows of the step's queries, which include the new rows themselves.
    let window_rows = end - (seq.start + 1).saturating_sub(window).min(end);
    let mut total = 0u64;
    for l in 0..cfg.num_hidden_layers {
        total += window_rows * kv.latent_row;
        let Some(ratio) = cfg.compress_ratio(l) else {
            continue;
        };
        // Rows the last query sees: windows w with (w + 1) * ratio <= end.
        let rows = end / ratio as u64;
        total += match cfg.layer_types[l] {
            AttentionKind::Hca => rows * kv.latent_row,
            AttentionKind::Csa => {
                let selected = rows.min(seq.tokens * cfg.index_topk as u64);
                rows * kv.indexer_row + selected * kv.latent_row
            }
            AttentionKind::Sliding => 0,
        };
    }
    total
}

/// The bytes of one step, by where they come from.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepBytes {
    pub dense_weights: f64,
    pub embedding: f64,
    pub routed_experts: f64,
    pub head: f64,
    pub kv_read: f64,
}

impl StepBytes {
    pub fn total(&self) -> f64 {
        self.dense_weights + self.embedding + self.routed_experts + self.head + self.kv_read
    }

    pub fn add(&mut self, o: &StepBytes) {
        self.dense_weights += o.dense_weights;
        self.embedding += o.embedding;
        self.routed_experts += o.routed_experts;
        self.head += o.head;
        self.kv_read += o.kv_read;
    }
}

/// Bytes of one step running `seqs` (all of one step), `wants_logits` when any row needs the
/// LM head. Token ids are taken as uniform over the vocabulary (the bench draws them so).
pub fn step_bytes(
    cfg: &ModelConfig,
    w: &WeightBytes,
    kv: KvEntryBytes,
    seqs: &[SeqShape],
    wants_logits: bool,
) -> StepBytes {
    let tokens: u64 = seqs.iter().map(|s| s.tokens).sum();
    let distinct_ids = expected_distinct(w.vocab, 1, tokens);
    StepBytes {
        dense_weights: w.dense as f64,
        embedding: distinct_ids * (w.embed_row + w.hash_row) as f64,
        routed_experts: expected_distinct(w.n_experts, w.top_k, tokens)
            * w.expert_all_layers as f64,
        head: if wants_logits { w.head as f64 } else { 0.0 },
        kv_read: seqs.iter().map(|&s| kv_read_bytes(cfg, kv, s) as f64).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::manifest::target_tensors;

    fn tiny() -> ModelConfig {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-dsv4");
        ModelConfig::from_dir(&dir).unwrap()
    }

    fn flash() -> ModelConfig {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/v4-flash-config.json");
        ModelConfig::from_json_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    #[test]
    fn quantized_tensor_bytes() {
        let t = |shape: Vec<usize>, dtype| ExpectedTensor {
            name: "x".into(),
            shape,
            dtype,
        };
        // FP8 [4096, 1024]: 4 Mi values + 32 x 8 block scales.
        let fp8 = t(vec![4096, 1024], StoredDtype::Fp8Block);
        assert_eq!(
            tensor_bytes(&fp8, WeightStorage::Checkpoint),
            4_194_304 + 256
        );
        assert_eq!(tensor_bytes(&fp8, WeightStorage::F32), 16_777_216);
        // FP4 [2048, 4096]: 8 Mi values in 4 MiB + 256 Ki scales.
        let fp4 = t(vec![2048, 4096], StoredDtype::Fp4Expert);
        assert_eq!(
            tensor_bytes(&fp4, WeightStorage::Checkpoint),
            4_194_304 + 262_144
        );
        // Packed FP8/FP4 stay packed, bf16 widens to f32.
        assert_eq!(
            tensor_bytes(&fp4, WeightStorage::PackedF32),
            4_194_304 + 262_144
        );
        assert_eq!(
            tensor_bytes(&fp8, WeightStorage::PackedF32),
            4_194_304 + 256
        );
        let bf16 = t(vec![256, 4096], StoredDtype::Bf16);
        assert_eq!(tensor_bytes(&bf16, WeightStorage::Checkpoint), 2_097_152);
        assert_eq!(tensor_bytes(&bf16, WeightStorage::PackedF32), 4_194_304);
        let ids = t(vec![10, 6], StoredDtype::I64);
        assert_eq!(tensor_bytes(&ids, WeightStorage::F32), 480);
    }

    #[test]
    fn distinct_expert_expectation() {
        assert_eq!(expected_distinct(256, 6, 0), 0.0);
        assert!((expected_distinct(256, 6, 1) - 6.0).abs() < 1e-9);
        // Two tokens: 256 * (1 - (250/256)^2) = 11.859375.
        assert!((expected_distinct(256, 6, 2) - 11.859375).abs() < 1e-9);
        // Many tokens touch every expert.
        assert!((expected_distinct(256, 6, 100_000) - 256.0).abs() < 1e-6);
        assert!((expected_distinct(8, 8, 3) - 8.0).abs() < 1e-12);
    }

    #[test]
    fn tiny_model_weight_split() {
        let cfg = tiny();
        let w = weight_bytes(&cfg, &target_tensors(&cfg), WeightStorage::F32);
        // One expert: w1, w3 [32, 32] and w2 [32, 32] = 3 * 1024 values * 4 B, in 4 layers.
        assert_eq!(w.expert_all_layers, 4 * 3 * 1024 * 4);
        assert_eq!(w.embed_row, 32 * 4);
        assert_eq!(w.head, 129_280 * 32 * 4);
        // tid2eid of the one hash layer: 2 i64 per token id.
        assert_eq!(w.hash_row, 16);
        // Dense, by hand. Per layer: norms 2 * 32; hyper-connections 2 * (24 * 128 + 24 + 3);
        // attention wq_a 32*32, q_norm 32, wq_b 256*32, wkv 64*32, kv_norm 64,
        // wo_a [2*16, 4*64/2] = 32*128, wo_b 32*32, sink 4; router 8*32; shared expert 3*1024.
        let common =
            64 + 2 * (24 * 128 + 27) + 1024 + 32 + 8192 + 2048 + 64 + 4096 + 1024 + 4 + 256 + 3072;
        // Compressors (wkv, wgate [coff*dim, 32], ape [ratio, coff*dim], norm [dim]).
        let comp =
            |dim: usize, coff: usize, ratio: usize| 2 * coff * dim * 32 + ratio * coff * dim + dim;
        // CSA also has the indexer: its compressor (dim 32), wq_b [16*32, 32], weights_proj [16, 32].
        let csa = comp(64, 2, 4) + comp(32, 2, 4) + 512 * 32 + 16 * 32;
        let hca = comp(64, 1, 128);
        // Routing: layer 0 is hash (tid2eid counted apart), layers 1-3 have an 8-entry bias.
        let layers = 4 * common + 2 * csa + hca + 3 * 8;
        // Final norm and head hyper-connection: 32 + 4 * 128 + 4 + 1.
        let dense = layers + 32 + 512 + 4 + 1;
        assert_eq!(w.dense, dense as u64 * 4);
    }

    #[test]
    fn tiny_model_kv_reads() {
        let cfg = tiny();
        let kv = KvDtype::F32.entry_bytes(&cfg);
        assert_eq!(kv.latent_row, 256);
        assert_eq!(kv.indexer_row, 128);
        // Decode at position 256: window rows 225..=256 (32), in each of the 4 layers.
        // CSA (layers 1, 3): 257 / 4 = 64 indexer keys + min(64, 8) selected rows.
        // HCA (layer 2): 257 / 128 = 2 rows.
        let b = kv_read_bytes(
            &cfg,
            kv,
            SeqShape {
                start: 256,
                tokens: 1,
            },
        );
        let want = 4 * 32 * 256 + 2 * (64 * 128 + 8 * 256) + 2 * 256;
        assert_eq!(b, want);
        // A verify block of 6 at 256 sees 37 window rows, 65 compressed rows, 48 selected.
        let b = kv_read_bytes(
            &cfg,
            kv,
            SeqShape {
                start: 256,
                tokens: 6,
            },
        );
        assert_eq!(b, 4 * 37 * 256 + 2 * (65 * 128 + 48 * 256) + 2 * 256);
        // The first chunk of a prompt: no history before position 0.
        let b = kv_read_bytes(
            &cfg,
            kv,
            SeqShape {
                start: 0,
                tokens: 10,
            },
        );
        assert_eq!(b, 4 * 10 * 256 + 2 * (2 * 128 + 2 * 256));
    }

    #[test]
    fn flash_shape_figures() {
        let cfg = flash();
        let m = target_tensors(&cfg);
        let w = weight_bytes(&cfg, &m, WeightStorage::Checkpoint);
        // One FP4 expert: 3 x 8 Mi values = 12 MiB + 768 KiB of scales, in 43 layers.
        assert_eq!(w.expert_all_layers, 43 * 3 * (4_194_304 + 262_144));
        assert_eq!(w.embed_row, 4096 * 2);
        assert_eq!(w.head, 129_280 * 4096 * 2);
        assert_eq!(w.hash_row, 3 * 6 * 8);
        // wq_b in FP8: [32768, 1024] values + 256 x 8 scales.
        let wq_b = m
            .iter()
            .find(|t| t.name == "layers.0.attn.wq_b.weight")
            .unwrap();
        assert_eq!(
            tensor_bytes(wq_b, WeightStorage::Checkpoint),
            32_768 * 1024 + 2048
        );

        // KV: the FP8 record of docs/KV.md.
        let fp8 = KvDtype::Fp8.entry_bytes(&cfg);
        assert_eq!((fp8.latent_row, fp8.indexer_row), (584, 132));
        let bf16 = KvDtype::Bf16.entry_bytes(&cfg);
        assert_eq!((bf16.latent_row, bf16.indexer_row), (1024, 256));
        // Batch-1 decode at 1M context (position 1,048,575 holds the new token): 43 layers
        // read 128 window rows; 21 CSA layers 262,144 indexer keys + 512 selected rows;
        // 20 HCA layers 8,192 rows.
        let b = kv_read_bytes(
            &cfg,
            bf16,
            SeqShape {
                start: 1_048_575,
                tokens: 1,
            },
        );
        let want = 43 * 128 * 1024 + 21 * (262_144 * 256 + 512 * 1024) + 20 * 8192 * 1024;
        assert_eq!(b, want);

        // A whole batch-1 decode step: every dense weight, 6 experts per layer, one embedding
        // row, the head.
        let s = step_bytes(
            &cfg,
            &w,
            bf16,
            &[SeqShape {
                start: 8191,
                tokens: 1,
            }],
            true,
        );
        assert!((s.routed_experts - 6.0 * w.expert_all_layers as f64).abs() < 1.0);
        assert!((s.embedding - (8192 + 144) as f64).abs() < 1e-6);
        assert_eq!(s.head, w.head as f64);
        // No logits wanted (middle of a prefill): the head is not read.
        let s = step_bytes(
            &cfg,
            &w,
            bf16,
            &[SeqShape {
                start: 0,
                tokens: 8192,
            }],
            false,
        );
        assert_eq!(s.head, 0.0);
        // 8192 tokens touch (almost surely) all 256 experts of every layer.
        assert!((s.routed_experts / (256.0 * w.expert_all_layers as f64) - 1.0).abs() < 1e-9);
    }
}
