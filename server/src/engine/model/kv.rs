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

use super::config::{AttentionKind, ModelConfig};
use crate::backend::kv::RowAddressing;

/// Offsets (in f32 values) of one layer's part of a block (`base` is where it would start in a
/// block holding every layer; the pool itself is layer-major, see [`KvPool::layer_start`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerBlockLayout {
    pub kind: AttentionKind,
    /// Start of this layer's region within the block.
    pub base: usize,
    /// `[block_size, head_dim]` latent rows.
    pub window: usize,
    /// Compress ratio (0 for sliding layers).
    pub ratio: usize,
    /// Width of one token's compressor `kv` (and `gate`) vector: `coff * head_dim`.
    pub comp_width: usize,
    /// `[block_size, 2 * comp_width]`: per token `kv` then `gate`.
    pub comp_in: usize,
    /// `[block_size / ratio, head_dim]` compressed rows.
    pub comp_rows: usize,
    /// Width of one token's indexer `kv` (and `gate`): `2 * index_head_dim` (CSA only).
    pub idx_width: usize,
    /// `[block_size, 2 * idx_width]` indexer compressor inputs.
    pub idx_in: usize,
    /// `[block_size / ratio, index_head_dim]` indexer key rows.
    pub idx_rows: usize,
    /// Values of this layer's region.
    pub len: usize,
}

/// Geometry of the whole pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockGeometry {
    pub block_size: usize,
    pub layers: Vec<LayerBlockLayout>,
    /// f32 values per block (all layers).
    pub floats_per_block: usize,
}

impl BlockGeometry {
    pub fn new(cfg: &ModelConfig, block_size: usize) -> Self {
        let hd = cfg.head_dim;
        let ihd = cfg.index_head_dim;
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
            let comp_in = window + block_size * hd;
            let comp_rows = comp_in + block_size * 2 * comp_width;
            let idx_in = comp_rows + if coff > 0 { rows * hd } else { 0 };
            let idx_rows = idx_in + block_size * 2 * idx_width;
            let len = idx_rows + if idx_width > 0 { rows * ihd } else { 0 };
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
        Self {
            block_size,
            layers,
            floats_per_block: base,
        }
    }

    pub fn bytes_per_block(&self) -> usize {
        self.floats_per_block * std::mem::size_of::<f32>()
    }
}

/// The pool's shape: `num_blocks * floats_per_block` f32 values, stored by the backend
/// (`Backend::KvStore`); the methods give element offsets into that array.
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

    /// f32 values of the whole pool.
    pub fn floats(&self) -> usize {
        self.geometry.floats_per_block * self.num_blocks
    }

    /// Where `layer`'s parts of all blocks start (block `b`'s part at `+ b * len`).
    #[inline]
    pub fn layer_start(&self, layer: usize) -> usize {
        self.num_blocks * self.geometry.layers[layer].base
    }

    /// How the indexer key rows of `layer` are found through a block table.
    pub fn idx_rows_addressing(&self, layer: usize, ihd: usize) -> RowAddressing {
        let l = &self.geometry.layers[layer];
        RowAddressing {
            floats_per_block: l.len,
            block_size: self.geometry.block_size,
            base: self.layer_start(layer) + l.idx_rows,
            ratio: l.ratio,
            stride: ihd,
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
    pub fn window_row(&self, bt: &[u32], layer: usize, pos: usize, hd: usize) -> usize {
        let slot = pos % self.geometry.block_size;
        self.region(bt, layer, pos) + self.geometry.layers[layer].window + slot * hd
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
    pub fn comp_row(&self, bt: &[u32], layer: usize, w: usize, hd: usize) -> usize {
        let l = &self.geometry.layers[layer];
        let pos = w * l.ratio;
        let idx = (pos % self.geometry.block_size) / l.ratio;
        self.region(bt, layer, pos) + l.comp_rows + idx * hd
    }

    #[inline]
    pub fn idx_in_row(&self, bt: &[u32], layer: usize, pos: usize) -> usize {
        let l = &self.geometry.layers[layer];
        let slot = pos % self.geometry.block_size;
        self.region(bt, layer, pos) + l.idx_in + slot * 2 * l.idx_width
    }

    #[inline]
    pub fn idx_row(&self, bt: &[u32], layer: usize, w: usize, ihd: usize) -> usize {
        let l = &self.geometry.layers[layer];
        let pos = w * l.ratio;
        let idx = (pos % self.geometry.block_size) / l.ratio;
        self.region(bt, layer, pos) + l.idx_rows + idx * ihd
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
        let g = BlockGeometry::new(&flash, flash.default_block_size());
        assert_eq!(g.block_size, 128);
        assert_eq!(g.bytes_per_block(), 398_784 * 128);

        let tiny = ModelConfig::from_json(&json!({
            "model_type": "deepseek_v4", "hidden_size": 32, "head_dim": 64, "index_head_dim": 32,
            "qk_rope_head_dim": 16, "num_hidden_layers": 4, "sliding_window": 32,
            "layer_types": ["sliding_attention", "compressed_sparse_attention",
                            "heavily_compressed_attention", "compressed_sparse_attention"]
        }))
        .unwrap();
        let g = BlockGeometry::new(&tiny, tiny.default_block_size());
        assert_eq!(g.block_size, 128);
        assert_eq!(g.bytes_per_block(), 614_656);
    }
}
