//! The shared on-demand KV block pool and the prefix cache.
//!
//! The pool counts blocks; what a block holds is the engine's business ([`KvLayout`]). Nothing is
//! reserved per request: a sequence's [`BlockTable`] grows a block at a time as its tokens are
//! computed, so the invariant "live tokens <= pool tokens" holds by construction.
//!
//! Prefix caching (vLLM v1's scheme): once a block is FULL its identity is the hash chain of all
//! tokens up to its end; a later prompt with the same prefix takes the same block (ref-counted)
//! instead of recomputing it. Freed blocks keep their hash and sit in an LRU free list, so they
//! can still be hit until an allocation evicts them (least recently freed first).

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

use crate::engine::KvLayout;

pub type BlockId = u32;

/// Identity of a full block: a hash of the parent block's hash and this block's tokens.
pub type BlockHash = u128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KV pool has {free} free blocks, {needed} needed")]
pub struct OutOfBlocks {
    pub needed: usize,
    pub free: usize,
}

/// The pool blocks of one sequence, in position order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    /// Hash chain of the leading full blocks whose tokens have been computed (or taken from
    /// the cache); `hashes[i]` names `blocks[i]`'s content.
    hashes: Vec<BlockHash>,
}

impl BlockTable {
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }
    pub fn len(&self) -> usize {
        self.blocks.len()
    }
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// A prefix-cache lookup result: blocks to take instead of computing their tokens.
#[derive(Debug, Default, Clone)]
pub struct PrefixHit {
    pub blocks: Vec<BlockId>,
    pub hashes: Vec<BlockHash>,
}

impl PrefixHit {
    pub fn num_tokens(&self, block_size: usize) -> usize {
        self.blocks.len() * block_size
    }
}

#[derive(Debug)]
pub struct KvPool {
    block_size: usize,
    ref_counts: Vec<u32>,
    block_hash: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, BlockId>,
    /// Blocks with no reference, by when they were freed (smallest stamp is evicted first).
    free: BTreeMap<u64, BlockId>,
    free_stamp: Vec<Option<u64>>,
    next_stamp: u64,
    /// Stamps below zero-point go to the front: blocks with no cached content are reused first.
    next_front_stamp: u64,
    prefix_caching: bool,
}

const FRONT_BASE: u64 = 1 << 62;

impl KvPool {
    pub fn new(layout: KvLayout, prefix_caching: bool) -> Self {
        let n = layout.num_blocks;
        let mut free = BTreeMap::new();
        let mut free_stamp = vec![None; n];
        for (i, slot) in free_stamp.iter_mut().enumerate() {
            let stamp = FRONT_BASE + i as u64;
            free.insert(stamp, i as BlockId);
            *slot = Some(stamp);
        }
        KvPool {
            block_size: layout.block_size.max(1),
            ref_counts: vec![0; n],
            block_hash: vec![None; n],
            cached: HashMap::new(),
            free,
            free_stamp,
            next_stamp: FRONT_BASE + n as u64,
            next_front_stamp: FRONT_BASE - 1,
            prefix_caching,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }
    pub fn pool_tokens(&self) -> usize {
        self.num_blocks() * self.block_size
    }
    /// Blocks an allocation can take (unreferenced, cached or not).
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }
    pub fn used_blocks(&self) -> usize {
        self.num_blocks() - self.free_blocks()
    }
    pub fn usage(&self) -> f64 {
        if self.num_blocks() == 0 {
            0.0
        } else {
            self.used_blocks() as f64 / self.num_blocks() as f64
        }
    }
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts[block as usize]
    }
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// Longest run of cached full blocks that prefixes `tokens`, leaving at least the last
    /// token to compute (its logits are needed).
    pub fn match_prefix(&self, tokens: &[u32]) -> PrefixHit {
        let mut hit = PrefixHit::default();
        if !self.prefix_caching || tokens.is_empty() {
            return hit;
        }
        let full = (tokens.len() - 1) / self.block_size;
        let mut parent = None;
        for chunk in tokens.chunks(self.block_size).take(full) {
            let h = chain_hash(parent, chunk);
            match self.cached.get(&h) {
                Some(&b) => {
                    hit.blocks.push(b);
                    hit.hashes.push(h);
                    parent = Some(h);
                }
                None => break,
            }
        }
        hit
    }

    /// How many free blocks taking `hit` would consume (hit blocks nobody references yet).
    pub fn free_blocks_taken_by(&self, hit: &PrefixHit) -> usize {
        hit.blocks
            .iter()
            .filter(|b| self.ref_counts[**b as usize] == 0)
            .count()
    }

    /// Starts `table` (empty) with the cached blocks of `hit`.
    pub fn take_prefix(&mut self, table: &mut BlockTable, hit: PrefixHit) {
        debug_assert!(table.is_empty());
        for &b in &hit.blocks {
            self.add_ref(b);
        }
        table.blocks = hit.blocks;
        table.hashes = hit.hashes;
    }

    /// Grows `table` to cover `total_tokens` positions. All or nothing.
    pub fn allocate(
        &mut self,
        table: &mut BlockTable,
        total_tokens: usize,
    ) -> Result<(), OutOfBlocks> {
        let needed = self
            .blocks_for(total_tokens)
            .saturating_sub(table.blocks.len());
        if needed > self.free.len() {
            return Err(OutOfBlocks {
                needed,
                free: self.free.len(),
            });
        }
        for _ in 0..needed {
            let Some((_, b)) = self.free.pop_first() else {
                unreachable!("free count checked above")
            };
            self.free_stamp[b as usize] = None;
            // Evict whatever this block cached: its content is about to be overwritten.
            if let Some(h) = self.block_hash[b as usize].take() {
                if self.cached.get(&h) == Some(&b) {
                    self.cached.remove(&h);
                }
            }
            self.ref_counts[b as usize] = 1;
            table.blocks.push(b);
        }
        Ok(())
    }

    /// Returns every block of `table` to the pool. Cached blocks stay findable until evicted.
    pub fn free(&mut self, table: &mut BlockTable) {
        // Tail first: the end of a sequence is the least likely to be shared, so it goes first.
        for &b in table.blocks.iter().rev() {
            let rc = &mut self.ref_counts[b as usize];
            debug_assert!(*rc > 0, "double free of block {b}");
            *rc = rc.saturating_sub(1);
            if *rc == 0 {
                let stamp = if self.block_hash[b as usize].is_some() {
                    self.next_stamp += 1;
                    self.next_stamp
                } else {
                    self.next_front_stamp -= 1;
                    self.next_front_stamp
                };
                self.free.insert(stamp, b);
                self.free_stamp[b as usize] = Some(stamp);
            }
        }
        table.blocks.clear();
        table.hashes.clear();
    }

    /// Registers the blocks of `table` that became full now that `tokens[..num_computed]` are in
    /// the KV state, so later prompts can share them.
    pub fn commit_full_blocks(
        &mut self,
        table: &mut BlockTable,
        tokens: &[u32],
        num_computed: usize,
    ) {
        if !self.prefix_caching {
            return;
        }
        let full = (num_computed / self.block_size).min(table.blocks.len());
        while table.hashes.len() < full {
            let i = table.hashes.len();
            let parent = table.hashes.last().copied();
            let h = chain_hash(
                parent,
                &tokens[i * self.block_size..(i + 1) * self.block_size],
            );
            table.hashes.push(h);
            let b = table.blocks[i];
            if self.block_hash[b as usize].is_none() && !self.cached.contains_key(&h) {
                self.block_hash[b as usize] = Some(h);
                self.cached.insert(h, b);
            }
        }
    }

    fn add_ref(&mut self, b: BlockId) {
        if self.ref_counts[b as usize] == 0 {
            if let Some(stamp) = self.free_stamp[b as usize].take() {
                self.free.remove(&stamp);
            }
        }
        self.ref_counts[b as usize] += 1;
    }
}

fn chain_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut h = Sha256::new();
    h.update(parent.unwrap_or(0).to_le_bytes());
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    u128::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(blocks: usize, caching: bool) -> KvPool {
        KvPool::new(
            KvLayout {
                block_size: 4,
                num_blocks: blocks,
                bytes_per_block: 64,
            },
            caching,
        )
    }

    #[test]
    fn allocation_is_on_demand_and_all_or_nothing() {
        let mut p = pool(4, false);
        let mut a = BlockTable::default();
        p.allocate(&mut a, 5).unwrap();
        assert_eq!(a.len(), 2);
        p.allocate(&mut a, 8).unwrap();
        assert_eq!(a.len(), 2, "8 tokens still fit in 2 blocks");
        let mut b = BlockTable::default();
        assert_eq!(
            p.allocate(&mut b, 12),
            Err(OutOfBlocks { needed: 3, free: 2 })
        );
        assert!(b.is_empty());
        assert_eq!(p.free_blocks(), 2);
        p.free(&mut a);
        assert_eq!(p.free_blocks(), 4);
        p.allocate(&mut b, 16).unwrap();
        assert_eq!(p.free_blocks(), 0);
    }

    #[test]
    fn full_blocks_are_shared_by_hash_chain() {
        let mut p = pool(8, true);
        let prompt: Vec<u32> = (0..10).collect();
        let mut a = BlockTable::default();
        assert!(p.match_prefix(&prompt).blocks.is_empty());
        p.allocate(&mut a, 10).unwrap();
        p.commit_full_blocks(&mut a, &prompt, 10);
        let hit = p.match_prefix(&prompt);
        assert_eq!(hit.blocks, a.blocks()[..2].to_vec());
        // A different first block breaks the chain even if the second block's tokens match.
        let mut other = prompt.clone();
        other[0] = 99;
        assert!(p.match_prefix(&other).blocks.is_empty());
        // Exactly two full blocks: only the first may be taken, the last token must be computed.
        assert_eq!(p.match_prefix(&prompt[..8]).blocks.len(), 1);

        let mut b = BlockTable::default();
        assert_eq!(p.free_blocks_taken_by(&hit), 0);
        p.take_prefix(&mut b, hit);
        p.allocate(&mut b, 10).unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(p.ref_count(a.blocks()[0]), 2);
        assert_ne!(a.blocks()[2], b.blocks()[2]);
        p.free(&mut a);
        p.free(&mut b);
        assert_eq!(p.free_blocks(), 8);
        // Freed cached blocks are still hits until evicted...
        let hit = p.match_prefix(&prompt);
        assert_eq!(hit.blocks.len(), 2);
        assert_eq!(p.free_blocks_taken_by(&hit), 2);
        // ...uncached blocks are reused first, the cached ones last.
        let mut c = BlockTable::default();
        p.allocate(&mut c, 24).unwrap();
        assert_eq!(p.match_prefix(&prompt).blocks.len(), 2);
        p.allocate(&mut c, 32).unwrap();
        assert!(
            p.match_prefix(&prompt).blocks.is_empty(),
            "evicted once reused"
        );
    }

    #[test]
    fn caching_off_never_hits() {
        let mut p = pool(4, false);
        let prompt: Vec<u32> = (0..10).collect();
        let mut a = BlockTable::default();
        p.allocate(&mut a, 10).unwrap();
        p.commit_full_blocks(&mut a, &prompt, 10);
        assert!(p.match_prefix(&prompt).blocks.is_empty());
    }
}
