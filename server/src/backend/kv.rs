//! How the engine addresses the KV pool a backend holds (host memory on the CPU, GPU memory on
//! CUDA). The pool is a flat array of 4-byte slots (`f32` bit patterns); the engine computes slot
//! offsets from its block geometry (`engine::model::kv`) and asks the backend to write, read and
//! attend over rows there. Latent and indexer key rows are stored in a [`KvRowFormat`]
//! (`--kv-cache-dtype`); the backend decodes them where it reads them.

pub use dspark_kernels::kv_record::KvRowFormat;

/// Key rows of each query token, as pool offsets (each row `head_dim` values stored in
/// `format`, K = V).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLists {
    /// How every key row is stored.
    pub format: KvRowFormat,
    /// Every token's key offsets, token after token.
    pub offsets: Vec<usize>,
    /// `tokens + 1` entries: token `t`'s keys are `offsets[starts[t]..starts[t + 1]]`.
    pub starts: Vec<usize>,
}

impl KeyLists {
    pub fn new(format: KvRowFormat) -> Self {
        Self {
            format,
            offsets: Vec::new(),
            starts: vec![0],
        }
    }

    /// Closes the current token's list.
    pub fn finish_token(&mut self) {
        self.starts.push(self.offsets.len());
    }

    pub fn tokens(&self) -> usize {
        self.starts.len().saturating_sub(1)
    }

    pub fn of(&self, t: usize) -> &[usize] {
        &self.offsets[self.starts[t]..self.starts[t + 1]]
    }

    pub fn max_len(&self) -> usize {
        self.starts
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0)
    }
}

/// Where row `r` of one kind (a compressed row of window `r`, or a per-token row at position
/// `r` with `ratio` 1) of a sequence sits in the pool, given the sequence's block table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowAddressing {
    pub floats_per_block: usize,
    pub block_size: usize,
    /// Offset of the region inside a block (layer base + region).
    pub base: usize,
    pub ratio: usize,
    /// Slots between consecutive rows of the region.
    pub stride: usize,
}

impl RowAddressing {
    #[inline]
    pub fn offset(&self, block_table: &[u32], r: usize) -> usize {
        let pos = r * self.ratio;
        block_table[pos / self.block_size] as usize * self.floats_per_block
            + self.base
            + (pos % self.block_size) / self.ratio * self.stride
    }
}

/// The compressed rows each query token scores in the Lightning Indexer: rows `0..visible[t]`
/// of the sequence whose block table is `block_tables[t]`, stored in `format`.
#[derive(Debug, Clone)]
pub struct IndexerRows<'a> {
    pub format: KvRowFormat,
    pub addressing: RowAddressing,
    pub block_tables: Vec<&'a [u32]>,
    pub visible: Vec<usize>,
}

impl IndexerRows<'_> {
    /// Where each token's scores start in the flat result, and the total.
    pub fn score_starts(&self) -> (Vec<usize>, usize) {
        let mut starts = Vec::with_capacity(self.visible.len());
        let mut total = 0;
        for v in &self.visible {
            starts.push(total);
            total += v;
        }
        (starts, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_found_through_the_block_table() {
        let a = RowAddressing {
            floats_per_block: 1000,
            block_size: 8,
            base: 100,
            ratio: 4,
            stride: 10,
        };
        // Window 3 starts at position 12: block table entry 1 (block 7), slot 1.
        assert_eq!(a.offset(&[5, 7], 3), 7 * 1000 + 100 + 10);
        assert_eq!(a.offset(&[5, 7], 0), 5 * 1000 + 100);
        let mut k = KeyLists::new(KvRowFormat::F32);
        k.offsets.extend([1, 2, 3]);
        k.finish_token();
        k.offsets.push(9);
        k.finish_token();
        assert_eq!((k.tokens(), k.of(1), k.max_len()), (2, &[9][..], 3));
    }
}
