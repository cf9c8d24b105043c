//! What the KV pool holds, per layer (see docs/KV.md).
//!
//! A block covers `block_size` consecutive positions of one sequence. `block_size` is a multiple
//! of every compress ratio, so a compression window never spans two blocks and a block boundary
//! is always a window boundary. What a block's positions leave in the pool comes in two parts:
//!
//! - the **persistent** part, which a long context keeps for every block: per window completed
//!   inside the block, the compressed row (CSA and HCA layers) and the indexer key row (CSA);
//! - the **recent** part, read only while the block is near the sequence's end: per token the
//!   latent KV row (`head_dim`, after kv_norm + RoPE) that the sliding window reads, the
//!   compressor inputs (`kv_proj` and `gate_proj` outputs) from which compressed rows are built
//!   (the CSA overlap reads the previous window), and for CSA layers the indexer's inputs.
//!
//! A sequence's block table names its persistent blocks; its recent table, entry for entry,
//! names a recent block for the blocks that still need one: those holding any of the last
//! [`BlockGeometry::recent_reach`] positions before the next one to compute (and, during a step,
//! every block the step writes). Earlier entries are [`NO_RECENT`]. So a 1M-token context costs
//! its compressed rows (~3.9 KB a token for V4-Flash with FP8 records) plus a few recent blocks,
//! instead of every token's window row and compressor inputs (~326 KB).
//!
//! The pool is one array: all persistent blocks, then all recent blocks. Each part is
//! layer-major: layer `l`'s parts of all blocks lie together (`num_blocks * base_l + block *
//! len_l`), so a scan of one layer's rows over a long context (the indexer's keys, an HCA
//! layer's compressed rows) stays inside one region instead of striding over every layer of
//! every block (at 1M tokens that was one GPU page per row read).

use dspark_kernels::kv_record::KvFormatError;

use super::config::{AttentionKind, ModelConfig};
use crate::backend::kv::{KvRowFormat, RowAddressing};

/// Recent-table entry of a block whose recent part was released (never read).
pub const NO_RECENT: u32 = u32::MAX;

/// Index of the first block whose recent part is still read once `computed` positions are in
/// the pool: the block of position `computed - reach` (blocks before it can release theirs).
pub fn first_recent_block(computed: usize, reach: usize, block_size: usize) -> usize {
    computed.saturating_sub(reach) / block_size.max(1)
}

/// What the pool stores the latent, compressed and indexer key rows as (`--kv-cache-dtype`).
/// The compressor inputs (the unfinished windows' raw rows) stay f32 in every case: they live
/// in recent blocks only, a bounded part of any context (docs/KV.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvStorage {
    /// Exact: what transformers computes with.
    #[default]
    F32,
    Bf16,
    /// The 584-byte FP8 latent record and the 132-byte FP8 indexer row of V4-Flash.
    Fp8,
}

impl KvStorage {
    /// Format of the latent window rows and the compressed rows.
    pub fn latent_format(self, cfg: &ModelConfig) -> KvRowFormat {
        match self {
            KvStorage::F32 => KvRowFormat::F32,
            KvStorage::Bf16 => KvRowFormat::Bf16,
            KvStorage::Fp8 => KvRowFormat::Fp8Latent {
                rope: cfg.qk_rope_head_dim,
            },
        }
    }

    /// Format of the Lightning Indexer's key rows.
    pub fn index_format(self) -> KvRowFormat {
        match self {
            KvStorage::F32 => KvRowFormat::F32,
            KvStorage::Bf16 => KvRowFormat::Bf16,
            KvStorage::Fp8 => KvRowFormat::Fp8Indexer,
        }
    }
}

/// Offsets (in 4-byte pool slots) of one layer's parts of a block. `base` / `recent_base` are
/// where they would start in a block holding every layer; the pool itself is layer-major (see
/// [`KvPool::layer_start`], [`KvPool::recent_layer_start`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerBlockLayout {
    pub kind: AttentionKind,
    /// Compress ratio (0 for sliding layers).
    pub ratio: usize,
    /// Width of one token's compressor `kv` (and `gate`) vector: `coff * head_dim`.
    pub comp_width: usize,
    /// Width of one token's indexer `kv` (and `gate`): `2 * index_head_dim` (CSA only).
    pub idx_width: usize,

    /// Start of this layer's persistent part within a persistent block.
    pub base: usize,
    /// `[block_size / ratio]` compressed rows (`latent_slots` each).
    pub comp_rows: usize,
    /// `[block_size / ratio]` indexer key rows (`index_slots` each).
    pub idx_rows: usize,
    /// Slots of this layer's persistent part (0 for sliding layers).
    pub len: usize,

    /// Start of this layer's recent part within a recent block.
    pub recent_base: usize,
    /// `[block_size]` latent rows (`latent_slots` each).
    pub window: usize,
    /// `[block_size, 2 * comp_width]`: per token `kv` then `gate`.
    pub comp_in: usize,
    /// `[block_size, 2 * idx_width]` indexer compressor inputs.
    pub idx_in: usize,
    /// Slots of this layer's recent part.
    pub recent_len: usize,
}

/// Geometry of the whole pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockGeometry {
    pub block_size: usize,
    pub layers: Vec<LayerBlockLayout>,
    /// Slots per persistent block (all layers).
    pub floats_per_block: usize,
    /// Slots per recent block (all layers).
    pub floats_per_recent: usize,
    /// How many positions before the next one to compute are still read from recent blocks:
    /// the sliding window's earlier rows (`sliding_window - 1`) and the compressor inputs of the
    /// unfinished window and, for CSA, the window before it (`coff * ratio - 1`).
    pub recent_reach: usize,
    /// How latent and compressed rows are stored, and their slots per row.
    pub latent_format: KvRowFormat,
    pub latent_slots: usize,
    /// How indexer key rows are stored, and their slots per row.
    pub index_format: KvRowFormat,
    pub index_slots: usize,
}

impl BlockGeometry {
    pub fn new(
        cfg: &ModelConfig,
        block_size: usize,
        storage: KvStorage,
    ) -> Result<Self, KvFormatError> {
        let hd = cfg.head_dim;
        let ihd = cfg.index_head_dim;
        let latent_format = storage.latent_format(cfg);
        let index_format = storage.index_format();
        latent_format.check(hd)?;
        index_format.check(ihd)?;
        let latent_slots = latent_format.slots(hd);
        let index_slots = index_format.slots(ihd);
        let (mut base, mut recent_base) = (0, 0);
        let mut recent_reach = cfg.sliding_window.saturating_sub(1);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let kind = cfg.layer_types[l];
            let ratio = cfg.compress_ratio(l).unwrap_or(0);
            let coff = match kind {
                AttentionKind::Sliding => 0,
                AttentionKind::Hca => 1,
                AttentionKind::Csa => 2,
            };
            if coff > 0 {
                recent_reach = recent_reach.max((coff * ratio).saturating_sub(1));
            }
            let comp_width = coff * hd;
            let idx_width = if kind == AttentionKind::Csa {
                2 * ihd
            } else {
                0
            };
            let rows = block_size.checked_div(ratio).unwrap_or(0);
            let comp_rows = 0;
            let idx_rows = comp_rows + if coff > 0 { rows * latent_slots } else { 0 };
            let len = idx_rows + if idx_width > 0 { rows * index_slots } else { 0 };
            let window = 0;
            let comp_in = window + block_size * latent_slots;
            let idx_in = comp_in + block_size * 2 * comp_width;
            let recent_len = idx_in + block_size * 2 * idx_width;
            layers.push(LayerBlockLayout {
                kind,
                ratio,
                comp_width,
                idx_width,
                base,
                comp_rows,
                idx_rows,
                len,
                recent_base,
                window,
                comp_in,
                idx_in,
                recent_len,
            });
            base += len;
            recent_base += recent_len;
        }
        Ok(Self {
            block_size,
            layers,
            floats_per_block: base,
            floats_per_recent: recent_base,
            recent_reach,
            latent_format,
            latent_slots,
            index_format,
            index_slots,
        })
    }

    /// Bytes of one persistent block: what each `block_size` tokens of context cost.
    pub fn bytes_per_block(&self) -> usize {
        self.floats_per_block * std::mem::size_of::<f32>()
    }

    /// Bytes of one recent block.
    pub fn bytes_per_recent(&self) -> usize {
        self.floats_per_recent * std::mem::size_of::<f32>()
    }

    /// Recent blocks that let `max_num_seqs` sequences run steps of up to `max_batched_tokens`
    /// tokens (drafts included) without ever running short. A sequence holds the blocks from
    /// `recent_reach` positions before its computed end through the end of its table (which
    /// runs ahead by a step's new tokens, or by drafts a step rejected, `e` positions): at most
    /// `ceil((reach + e) / block_size) + 1 <= ceil(reach / block_size) + 2 + e / block_size`, and
    /// the `e` of a step's sequences sum to at most its token budget.
    pub fn recent_blocks_for(&self, max_num_seqs: usize, max_batched_tokens: usize) -> usize {
        let bs = self.block_size.max(1);
        max_num_seqs.max(1) * (self.recent_reach.div_ceil(bs) + 2) + max_batched_tokens.div_ceil(bs)
    }

    /// Index of the first block whose recent part is still read once `computed` positions are in
    /// the pool (blocks before it can release theirs).
    pub fn first_recent_block(&self, computed: usize) -> usize {
        first_recent_block(computed, self.recent_reach, self.block_size)
    }
}

/// The pool's shape: `num_blocks` persistent blocks then `num_recent` recent blocks of 4-byte
/// slots, stored by the backend (`Backend::KvStore`); the methods give slot offsets into it.
#[derive(Debug, Clone)]
pub struct KvPool {
    pub geometry: BlockGeometry,
    pub num_blocks: usize,
    pub num_recent: usize,
}

impl KvPool {
    pub fn new(geometry: BlockGeometry, num_blocks: usize, num_recent: usize) -> Self {
        Self {
            geometry,
            num_blocks,
            num_recent,
        }
    }

    /// Slots of the whole pool.
    pub fn floats(&self) -> usize {
        self.persistent_floats() + self.geometry.floats_per_recent * self.num_recent
    }

    /// Slots of the persistent blocks (the recent blocks start here).
    pub fn persistent_floats(&self) -> usize {
        self.geometry.floats_per_block * self.num_blocks
    }

    /// Where `layer`'s persistent parts of all blocks start (block `b`'s part at `+ b * len`).
    #[inline]
    pub fn layer_start(&self, layer: usize) -> usize {
        self.num_blocks * self.geometry.layers[layer].base
    }

    /// Where `layer`'s recent parts of all recent blocks start (recent block `r`'s part at
    /// `+ r * recent_len`).
    #[inline]
    pub fn recent_layer_start(&self, layer: usize) -> usize {
        self.persistent_floats() + self.num_recent * self.geometry.layers[layer].recent_base
    }

    /// How the indexer key rows of `layer` are found through a block table.
    pub fn idx_rows_addressing(&self, layer: usize) -> RowAddressing {
        let l = &self.geometry.layers[layer];
        RowAddressing {
            floats_per_block: l.len,
            block_size: self.geometry.block_size,
            base: self.layer_start(layer) + l.idx_rows,
            ratio: l.ratio,
            stride: self.geometry.index_slots,
        }
    }

    /// Index of the first value of `layer`'s persistent part of the block holding `pos`.
    #[inline]
    pub fn region(&self, block_table: &[u32], layer: usize, pos: usize) -> usize {
        let g = &self.geometry;
        self.layer_start(layer) + block_table[pos / g.block_size] as usize * g.layers[layer].len
    }

    /// Index of the first value of `layer`'s recent part of the block holding `pos`.
    #[inline]
    pub fn recent_region(&self, recent_table: &[u32], layer: usize, pos: usize) -> usize {
        let g = &self.geometry;
        self.recent_layer_start(layer)
            + recent_table[pos / g.block_size] as usize * g.layers[layer].recent_len
    }

    /// The latent window row of the token at `pos` (a recent row).
    #[inline]
    pub fn window_row(&self, rt: &[u32], layer: usize, pos: usize) -> usize {
        let g = &self.geometry;
        let slot = pos % g.block_size;
        self.recent_region(rt, layer, pos) + g.layers[layer].window + slot * g.latent_slots
    }

    /// The compressor input (`kv` then `gate`, each `comp_width`) of the token at `pos` (a
    /// recent row).
    #[inline]
    pub fn comp_in_row(&self, rt: &[u32], layer: usize, pos: usize) -> usize {
        let l = &self.geometry.layers[layer];
        let slot = pos % self.geometry.block_size;
        self.recent_region(rt, layer, pos) + l.comp_in + slot * 2 * l.comp_width
    }

    /// The compressed row of window `w` (a persistent row).
    #[inline]
    pub fn comp_row(&self, bt: &[u32], layer: usize, w: usize) -> usize {
        let l = &self.geometry.layers[layer];
        let pos = w * l.ratio;
        let idx = (pos % self.geometry.block_size) / l.ratio;
        self.region(bt, layer, pos) + l.comp_rows + idx * self.geometry.latent_slots
    }

    /// The indexer compressor input of the token at `pos` (a recent row).
    #[inline]
    pub fn idx_in_row(&self, rt: &[u32], layer: usize, pos: usize) -> usize {
        let l = &self.geometry.layers[layer];
        let slot = pos % self.geometry.block_size;
        self.recent_region(rt, layer, pos) + l.idx_in + slot * 2 * l.idx_width
    }

    /// The indexer key row of window `w` (a persistent row).
    #[inline]
    pub fn idx_row(&self, bt: &[u32], layer: usize, w: usize) -> usize {
        let l = &self.geometry.layers[layer];
        let pos = w * l.ratio;
        let idx = (pos % self.geometry.block_size) / l.ratio;
        self.region(bt, layer, pos) + l.idx_rows + idx * self.geometry.index_slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::config::tests::flash_compress_ratios;
    use serde_json::json;

    #[test]
    fn bytes_per_block_match_docs_kv_md() {
        let flash = ModelConfig::from_json(
            &json!({"model_type": "deepseek_v4", "compress_ratios": flash_compress_ratios()}),
        )
        .unwrap();
        let geometry = |cfg: &ModelConfig, storage| {
            let g = BlockGeometry::new(cfg, cfg.default_block_size(), storage).unwrap();
            assert_eq!(g.block_size, 128);
            g
        };
        // Persistent, per block: 20 HCA layers (1 compressed row), 21 CSA layers (32 compressed
        // rows, 32 indexer rows). Recent: 2 sliding layers (128 rows), 20 HCA (rows, f32
        // inputs), 21 CSA (rows, inputs, indexer inputs).
        let persistent = |latent: usize, index: usize| 20 * latent + 21 * 32 * (latent + index);
        let recent = |latent: usize| {
            2 * 128 * latent
                + 20 * (128 * latent + 128 * 4096)
                + 21 * (128 * latent + 128 * 8192 + 128 * 2048)
        };
        for (storage, latent, index) in [
            (KvStorage::F32, 2048, 512),
            (KvStorage::Bf16, 1024, 256),
            (KvStorage::Fp8, 584, 132),
        ] {
            let g = geometry(&flash, storage);
            assert_eq!(
                g.bytes_per_block(),
                persistent(latent, index),
                "{storage:?}"
            );
            assert_eq!(g.bytes_per_recent(), recent(latent), "{storage:?}");
            // Sliding window 128, CSA windows of 4 overlapping the previous, HCA of 128.
            assert_eq!(g.recent_reach, 127);
        }
        // docs/KV.md: ~3.85 KB per token of context with FP8 records, 6.9 KB with bf16.
        assert_eq!(geometry(&flash, KvStorage::Fp8).bytes_per_block(), 492_832);
        assert_eq!(geometry(&flash, KvStorage::Bf16).bytes_per_block(), 880_640);
        // Everything a block held before the split is still held, once.
        assert_eq!(
            {
                let g = geometry(&flash, KvStorage::F32);
                g.bytes_per_block() + g.bytes_per_recent()
            },
            398_784 * 128
        );

        let tiny = ModelConfig::from_json(&json!({
            "model_type": "deepseek_v4", "hidden_size": 32, "head_dim": 64, "index_head_dim": 32,
            "qk_rope_head_dim": 16, "num_hidden_layers": 4, "sliding_window": 32,
            "layer_types": ["sliding_attention", "compressed_sparse_attention",
                            "heavily_compressed_attention", "compressed_sparse_attention"]
        }))
        .unwrap();
        let g = geometry(&tiny, KvStorage::F32);
        assert_eq!(g.bytes_per_block() + g.bytes_per_recent(), 614_656);
        // The HCA layer's window of 128 reaches further than the sliding window of 32.
        assert_eq!(g.recent_reach, 127);
        // 84-byte latent records, 36-byte indexer rows.
        let g = geometry(&tiny, KvStorage::Fp8);
        assert_eq!(g.bytes_per_block() + g.bytes_per_recent(), 509_524);
        assert_eq!(g.bytes_per_block(), 84 + 2 * 32 * (84 + 36));
    }

    #[test]
    fn recent_blocks_cover_the_reach_and_a_full_step() {
        let flash = ModelConfig::from_json(
            &json!({"model_type": "deepseek_v4", "compress_ratios": flash_compress_ratios()}),
        )
        .unwrap();
        let g = BlockGeometry::new(&flash, 128, KvStorage::Fp8).unwrap();
        // Next position 128k reads positions from 128k - 127: only block k - 1.
        assert_eq!(g.first_recent_block(256), 1);
        assert_eq!(g.first_recent_block(257), 1);
        assert_eq!(g.first_recent_block(383), 2);
        assert_eq!(g.first_recent_block(384), 2);
        assert_eq!(g.first_recent_block(5), 0);
        // 6 sequences, 8,192-token steps: 6 * (1 + 2) + 64.
        assert_eq!(g.recent_blocks_for(6, 8192), 82);
    }
}
