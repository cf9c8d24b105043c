//! What one KV pool block holds, per layer (CPU f32 layout; see docs/KV.md).
//!
//! A block covers `block_size` consecutive positions of one sequence. `block_size` is a multiple
//! of every compress ratio, so a compression window never spans two blocks and a block boundary
//! is always a window boundary. Per layer a block stores, for each of its token slots:
//! - the latent KV row (`head_dim`, after kv_norm + RoPE) read by the sliding window;
//! - for CSA / HCA layers, the compressor inputs of the token (`kv_proj` and `gate_proj`
//!   outputs), from which the compressed rows are built (the CSA overlap reads the previous
//!   window, which may sit in the previous block);
//! - for CSA layers, the indexer compressor inputs likewise;
//!
//! and, per window completed inside it, the compressed row (and the indexer key row). So a
//! sequence can continue from any position given only its block table.
//!
//! The pool is layer-major: layer `l`'s parts of all blocks lie together (`num_blocks *
//! base_l + block * len_l`), so a scan of one layer's rows over a long context (the indexer's
//! keys, an HCA layer's compressed rows) stays inside one region instead of striding over
//! every layer of every block (at 1M tokens that was one GPU page per row read).

use dspark_kernels::kv_record::KvFormatError;

use super::config::{AttentionKind, ModelConfig};
use crate::backend::kv::{KvRowFormat, RowAddressing};

/// What the pool stores the latent, compressed and indexer key rows as (`--kv-cache-dtype`).
/// The compressor inputs (the unfinished windows' raw rows) stay f32 in every case: they are
/// pooled again and are a bounded part of a long context (docs/KV.md).
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

/// Offsets (in 4-byte pool slots) of one layer's part of a block (`base` is where it would start in a
/// block holding every layer; the pool itself is layer-major, see [`KvPool::layer_start`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerBlockLayout {
    pub kind: AttentionKind,
    /// Start of this layer's region within the block.
    pub base: usize,
    /// `[block_size]` latent rows (`latent_slots` each).
    pub window: usize,
    /// Compress ratio (0 for sliding layers).
    pub ratio: usize,
    /// Width of one token's compressor `kv` (and `gate`) vector: `coff * head_dim`.
    pub comp_width: usize,
    /// `[block_size, 2 * comp_width]`: per token `kv` then `gate`.
    pub comp_in: usize,
    /// `[block_size / ratio]` compressed rows (`latent_slots` each).
    pub comp_rows: usize,
    /// Width of one token's indexer `kv` (and `gate`): `2 * index_head_dim` (CSA only).
    pub idx_width: usize,
    /// `[block_size, 2 * idx_width]` indexer compressor inputs.
    pub idx_in: usize,
    /// `[block_size / ratio]` indexer key rows (`index_slots` each).
    pub idx_rows: usize,
    /// Values of this layer's region.
    pub len: usize,
}

/// Geometry of the whole pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockGeometry {
    pub block_size: usize,
    pub layers: Vec<LayerBlockLayout>,
    /// Slots per block (all layers).
    pub floats_per_block: usize,
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
        let mut base = 0;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let kind = cfg.layer_types[l];
            let ratio = cfg.compress_ratio(l).unwrap_or(0);
            let coff = match kind {
                AttentionKind::Sliding => 0,
                AttentionKind::Hca => 1,
                AttentionKind::Csa => 2,
            };
            let comp_width = coff * hd;
            let idx_width = if kind == AttentionKind::Csa {
                2 * ihd
            } else {
                0
            };
            let rows = block_size.checked_div(ratio).unwrap_or(0);
            let window = 0;
            let comp_in = window + block_size * latent_slots;
            let comp_rows = comp_in + block_size * 2 * comp_width;
            let idx_in = comp_rows + if coff > 0 { rows * latent_slots } else { 0 };
            let idx_rows = idx_in + block_size * 2 * idx_width;
            let len = idx_rows + if idx_width > 0 { rows * index_slots } else { 0 };
            layers.push(LayerBlockLayout {
                kind,
                base,
                window,
                ratio,
                comp_width,
                comp_in,
                comp_rows,
                idx_width,
                idx_in,
                idx_rows,
                len,
            });
            base += len;
        }
        Ok(Self {
            block_size,
            layers,
            floats_per_block: base,
            latent_format,
            latent_slots,
            index_format,
            index_slots,
        })
    }

    pub fn bytes_per_block(&self) -> usize {
        self.floats_per_block * std::mem::size_of::<f32>()
    }
}

/// The pool's shape: `num_blocks * floats_per_block` 4-byte slots, stored by the backend
/// (`Backend::KvStore`); the methods give slot offsets into that array.
#[derive(Debug, Clone)]
pub struct KvPool {
    pub geometry: BlockGeometry,
    pub num_blocks: usize,
}

impl KvPool {
    pub fn new(geometry: BlockGeometry, num_blocks: usize) -> Self {
        Self {
            geometry,
            num_blocks,
        }
    }

    /// Slots of the whole pool.
    pub fn floats(&self) -> usize {
        self.geometry.floats_per_block * self.num_blocks
    }

    /// Where `layer`'s parts of all blocks start (block `b`'s part at `+ b * len`).
    #[inline]
    pub fn layer_start(&self, layer: usize) -> usize {
        self.num_blocks * self.geometry.layers[layer].base
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

    /// Index of the first value of `layer`'s part of the block holding `pos`.
    #[inline]
    pub fn region(&self, block_table: &[u32], layer: usize, pos: usize) -> usize {
        let g = &self.geometry;
        self.layer_start(layer) + block_table[pos / g.block_size] as usize * g.layers[layer].len
    }

    /// The latent window row of the token at `pos`.
    #[inline]
    pub fn window_row(&self, bt: &[u32], layer: usize, pos: usize) -> usize {
        let g = &self.geometry;
        let slot = pos % g.block_size;
        self.region(bt, layer, pos) + g.layers[layer].window + slot * g.latent_slots
    }

    /// The compressor input (`kv` then `gate`, each `comp_width`) of the token at `pos`.
    #[inline]
    pub fn comp_in_row(&self, bt: &[u32], layer: usize, pos: usize) -> usize {
        let l = &self.geometry.layers[layer];
        let slot = pos % self.geometry.block_size;
        self.region(bt, layer, pos) + l.comp_in + slot * 2 * l.comp_width
    }

    /// The compressed row of window `w`.
    #[inline]
    pub fn comp_row(&self, bt: &[u32], layer: usize, w: usize) -> usize {
        let l = &self.geometry.layers[layer];
        let pos = w * l.ratio;
        let idx = (pos % self.geometry.block_size) / l.ratio;
        self.region(bt, layer, pos) + l.comp_rows + idx * self.geometry.latent_slots
    }

    #[inline]
    pub fn idx_in_row(&self, bt: &[u32], layer: usize, pos: usize) -> usize {
        let l = &self.geometry.layers[layer];
        let slot = pos % self.geometry.block_size;
        self.region(bt, layer, pos) + l.idx_in + slot * 2 * l.idx_width
    }

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
        let bytes = |cfg: &ModelConfig, storage| {
            let g = BlockGeometry::new(cfg, cfg.default_block_size(), storage).unwrap();
            assert_eq!(g.block_size, 128);
            g.bytes_per_block()
        };
        assert_eq!(bytes(&flash, KvStorage::F32), 398_784 * 128);
        // Per block: 2 sliding layers of 128 rows, 20 HCA (rows, f32 inputs, 1 compressed
        // row), 21 CSA (rows, inputs, 32 compressed rows, indexer inputs, 32 indexer rows).
        let per_block = |latent: usize, index: usize| {
            2 * 128 * latent
                + 20 * (128 * latent + 128 * 4096 + latent)
                + 21 * (128 * latent + 128 * 8192 + 32 * latent + 128 * 2048 + 32 * index)
        };
        assert_eq!(bytes(&flash, KvStorage::Fp8), per_block(584, 132));
        assert_eq!(bytes(&flash, KvStorage::Bf16), per_block(1024, 256));

        let tiny = ModelConfig::from_json(&json!({
            "model_type": "deepseek_v4", "hidden_size": 32, "head_dim": 64, "index_head_dim": 32,
            "qk_rope_head_dim": 16, "num_hidden_layers": 4, "sliding_window": 32,
            "layer_types": ["sliding_attention", "compressed_sparse_attention",
                            "heavily_compressed_attention", "compressed_sparse_attention"]
        }))
        .unwrap();
        assert_eq!(bytes(&tiny, KvStorage::F32), 614_656);
        // 84-byte latent records, 36-byte indexer rows.
        assert_eq!(bytes(&tiny, KvStorage::Fp8), 509_524);
    }
}
