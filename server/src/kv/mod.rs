//! The shared on-demand KV block pool and the prefix cache.
//!
//! The pool counts blocks; what a block holds is the engine's business ([`KvLayout`]). Nothing is
//! reserved per request: a sequence's [`BlockTable`] grows a block at a time as its tokens are
//! computed, so the invariant "live tokens <= pool tokens" holds by construction.
//!
//! Two kinds of block (docs/KV.md): a *persistent* block keeps what every position of a long
//! context leaves behind (compressed rows, indexer keys); a *recent* block holds what is read
//! only near the sequence's end (sliding-window rows, compressor inputs). Every block a step
//! writes gets a recent block too; once the sequence has moved `recent_reach` positions past a
//! block, its recent block is released ([`KvPool::release_recent`]). The pool tokens are the
//! persistent blocks'; the recent blocks are a fixed set sized for the batch
//! ([`KvLayout::recent_blocks`]).
//!
//! Prefix caching (vLLM v1's scheme): once a block is FULL its identity is the hash chain of all
//! tokens up to its end; a later prompt with the same prefix takes the same block (ref-counted)
//! instead of recomputing it. Freed blocks keep their hash and sit in an LRU free list, so they
//! can still be hit until an allocation evicts them (least recently freed first). Continuing
//! after a cached prefix needs the recent blocks of its last `recent_reach` positions as well
//! (vLLM's sliding-window rule), so released recent blocks are cached the same way and a hit is
//! cut back to the longest prefix whose tail is still cached.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

use crate::engine::model::kv::first_recent_block;
/// Recent-table entry of a block without a recent block (released, or never needed).
pub use crate::engine::model::kv::NO_RECENT;
use crate::engine::KvLayout;

pub type BlockId = u32;

/// Identity of a full block: a hash of the parent block's hash and this block's tokens.
pub type BlockHash = u128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutOfBlocks {
    #[error("KV pool has {free} free blocks, {needed} needed")]
    Blocks { needed: usize, free: usize },
    #[error("KV pool has {free} free recent blocks, {needed} needed")]
    Recent { needed: usize, free: usize },
}

/// The pool blocks of one sequence, in position order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    /// Entry for entry with `blocks`: the recent block of each, or [`NO_RECENT`].
    recent: Vec<BlockId>,
    /// Hash chain of the leading full blocks whose tokens have been computed (or taken from
    /// the cache); `hashes[i]` names `blocks[i]`'s content.
    hashes: Vec<BlockHash>,
}

impl BlockTable {
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }
    pub fn recent(&self) -> &[BlockId] {
        &self.recent
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
    /// Entry for entry with `blocks`: the cached recent blocks of the prefix's tail.
    pub recent: Vec<BlockId>,
}

impl PrefixHit {
    pub fn num_tokens(&self, block_size: usize) -> usize {
        self.blocks.len() * block_size
    }
}

/// Ref-counted blocks of one kind with an LRU of freed ones that may still be hit by hash.
#[derive(Debug)]
struct Blocks {
    ref_counts: Vec<u32>,
    block_hash: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, BlockId>,
    /// Blocks with no reference, by when they were freed (smallest stamp is evicted first).
    free: BTreeMap<u64, BlockId>,
    free_stamp: Vec<Option<u64>>,
    next_stamp: u64,
    /// Stamps below zero-point go to the front: blocks with no cached content are reused first.
    next_front_stamp: u64,
}

const FRONT_BASE: u64 = 1 << 62;

impl Blocks {
    fn new(n: usize) -> Self {
        let mut free = BTreeMap::new();
        let mut free_stamp = vec![None; n];
        for (i, slot) in free_stamp.iter_mut().enumerate() {
            let stamp = FRONT_BASE + i as u64;
            free.insert(stamp, i as BlockId);
            *slot = Some(stamp);
        }
        Blocks {
            ref_counts: vec![0; n],
            block_hash: vec![None; n],
            cached: HashMap::new(),
            free,
            free_stamp,
            next_stamp: FRONT_BASE + n as u64,
            next_front_stamp: FRONT_BASE - 1,
        }
    }

    fn len(&self) -> usize {
        self.ref_counts.len()
    }

    /// Takes the least recently freed block, evicting whatever it cached.
    fn take(&mut self) -> Option<BlockId> {
        let (_, b) = self.free.pop_first()?;
        self.free_stamp[b as usize] = None;
        // Its content is about to be overwritten.
        if let Some(h) = self.block_hash[b as usize].take() {
            if self.cached.get(&h) == Some(&b) {
                self.cached.remove(&h);
            }
        }
        self.ref_counts[b as usize] = 1;
        Some(b)
    }

    fn add_ref(&mut self, b: BlockId) {
        if self.ref_counts[b as usize] == 0 {
            if let Some(stamp) = self.free_stamp[b as usize].take() {
                self.free.remove(&stamp);
            }
        }
        self.ref_counts[b as usize] += 1;
    }

    fn release(&mut self, b: BlockId) {
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

    /// Names `b`'s content `h` unless it (or another block) already has that name.
    fn register(&mut self, b: BlockId, h: BlockHash) {
        if self.block_hash[b as usize].is_none() && !self.cached.contains_key(&h) {
            self.block_hash[b as usize] = Some(h);
            self.cached.insert(h, b);
        }
    }

    /// How many free blocks taking `blocks` would consume (those nobody references yet).
    fn unreferenced(&self, blocks: &[BlockId]) -> usize {
        blocks
            .iter()
            .filter(|&&b| b != NO_RECENT && self.ref_counts[b as usize] == 0)
            .count()
    }
}

#[derive(Debug)]
pub struct KvPool {
    block_size: usize,
    recent_reach: usize,
    blocks: Blocks,
    recent: Blocks,
    prefix_caching: bool,
}

impl KvPool {
    pub fn new(layout: KvLayout, prefix_caching: bool) -> Self {
        KvPool {
            block_size: layout.block_size.max(1),
            recent_reach: layout.recent_reach,
            blocks: Blocks::new(layout.num_blocks),
            recent: Blocks::new(layout.recent_blocks),
            prefix_caching,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }
    pub fn num_recent(&self) -> usize {
        self.recent.len()
    }
    pub fn pool_tokens(&self) -> usize {
        self.num_blocks() * self.block_size
    }
    /// Blocks an allocation can take (unreferenced, cached or not).
    pub fn free_blocks(&self) -> usize {
        self.blocks.free.len()
    }
    /// Recent blocks an allocation can take.
    pub fn free_recent(&self) -> usize {
        self.recent.free.len()
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
        self.blocks.ref_counts[block as usize]
    }
    pub fn recent_ref_count(&self, block: BlockId) -> u32 {
        self.recent.ref_counts[block as usize]
    }
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// Index of the first block whose recent block is still read once `computed` positions are
    /// in the pool.
    fn first_recent_block(&self, computed: usize) -> usize {
        first_recent_block(computed, self.recent_reach, self.block_size)
    }

    /// Longest run of cached full blocks that prefixes `tokens`, leaving at least the last
    /// token to compute (its logits are needed), and whose tail's recent blocks are cached.
    pub fn match_prefix(&self, tokens: &[u32]) -> PrefixHit {
        let mut hit = PrefixHit::default();
        if !self.prefix_caching || tokens.is_empty() {
            return hit;
        }
        let full = (tokens.len() - 1) / self.block_size;
        let mut parent = None;
        for chunk in tokens.chunks(self.block_size).take(full) {
            let h = chain_hash(parent, chunk);
            match self.blocks.cached.get(&h) {
                Some(&b) => {
                    hit.blocks.push(b);
                    hit.hashes.push(h);
                    parent = Some(h);
                }
                None => break,
            }
        }
        // Cut back to the longest prefix that can be continued.
        while !hit.blocks.is_empty() {
            let n = hit.blocks.len();
            let first = self.first_recent_block(n * self.block_size);
            let tail: Option<Vec<BlockId>> = hit.hashes[first..]
                .iter()
                .map(|h| self.recent.cached.get(h).copied())
                .collect();
            if let Some(tail) = tail {
                hit.recent = vec![NO_RECENT; first];
                hit.recent.extend(tail);
                break;
            }
            hit.blocks.pop();
            hit.hashes.pop();
        }
        hit
    }

    /// Whether a sequence can start from `hit` and have blocks for `total_tokens` positions.
    pub fn can_start(&self, hit: &PrefixHit, total_tokens: usize) -> bool {
        let new = self
            .blocks_for(total_tokens)
            .saturating_sub(hit.blocks.len());
        new + self.blocks.unreferenced(&hit.blocks) <= self.free_blocks()
            && new + self.recent.unreferenced(&hit.recent) <= self.free_recent()
    }

    /// Starts `table` (empty) with the cached blocks of `hit`.
    pub fn take_prefix(&mut self, table: &mut BlockTable, hit: PrefixHit) {
        debug_assert!(table.is_empty());
        for &b in &hit.blocks {
            self.blocks.add_ref(b);
        }
        for &r in hit.recent.iter().filter(|&&r| r != NO_RECENT) {
            self.recent.add_ref(r);
        }
        table.blocks = hit.blocks;
        table.recent = hit.recent;
        table.hashes = hit.hashes;
    }

    /// Grows `table` to cover `total_tokens` positions, each new block with a recent block.
    /// All or nothing.
    pub fn allocate(
        &mut self,
        table: &mut BlockTable,
        total_tokens: usize,
    ) -> Result<(), OutOfBlocks> {
        let needed = self
            .blocks_for(total_tokens)
            .saturating_sub(table.blocks.len());
        if needed > self.free_blocks() {
            return Err(OutOfBlocks::Blocks {
                needed,
                free: self.free_blocks(),
            });
        }
        if needed > self.free_recent() {
            return Err(OutOfBlocks::Recent {
                needed,
                free: self.free_recent(),
            });
        }
        for _ in 0..needed {
            let (Some(b), Some(r)) = (self.blocks.take(), self.recent.take()) else {
                unreachable!("free counts checked above")
            };
            table.blocks.push(b);
            table.recent.push(r);
        }
        Ok(())
    }

    /// Releases the recent blocks of `table` that nothing reads any more once `computed`
    /// positions are in the pool. Cached ones stay findable (a later prompt's prefix tail)
    /// until evicted.
    pub fn release_recent(&mut self, table: &mut BlockTable, computed: usize) {
        let first = self.first_recent_block(computed).min(table.recent.len());
        // Latest first, as in `free`: the least likely to be shared goes first.
        for i in (0..first).rev() {
            let r = std::mem::replace(&mut table.recent[i], NO_RECENT);
            if r != NO_RECENT {
                self.recent.release(r);
            }
        }
    }

    /// Returns every block of `table` to the pool. Cached blocks stay findable until evicted.
    pub fn free(&mut self, table: &mut BlockTable) {
        // Tail first: the end of a sequence is the least likely to be shared, so it goes first.
        for (&b, &r) in table.blocks.iter().zip(&table.recent).rev() {
            self.blocks.release(b);
            if r != NO_RECENT {
                self.recent.release(r);
            }
        }
        table.blocks.clear();
        table.recent.clear();
        table.hashes.clear();
    }

    /// Registers the blocks of `table` that became full now that `tokens[..num_computed]` are in
    /// the KV state (with their recent blocks, while they have them), so later prompts can
    /// share them.
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
            self.blocks.register(table.blocks[i], h);
            if table.recent[i] != NO_RECENT {
                self.recent.register(table.recent[i], h);
            }
        }
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
                recent_blocks: blocks,
                bytes_per_recent: 1,
                recent_reach: 3,
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
            Err(OutOfBlocks::Blocks { needed: 3, free: 2 })
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
        assert!(p.can_start(&hit, 10));
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
        assert_eq!(p.blocks.unreferenced(&hit.blocks), 2);
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

    /// Block size 4, reach 3 (a window of 4), `recent` recent blocks.
    fn tight_pool(blocks: usize, recent: usize) -> KvPool {
        KvPool::new(
            KvLayout {
                block_size: 4,
                num_blocks: blocks,
                bytes_per_block: 64,
                recent_blocks: recent,
                bytes_per_recent: 256,
                recent_reach: 3,
            },
            true,
        )
    }

    #[test]
    fn recent_blocks_are_released_once_out_of_reach() {
        let mut p = tight_pool(8, 3);
        let toks: Vec<u32> = (0..20).collect();
        let mut a = BlockTable::default();
        p.allocate(&mut a, 10).unwrap();
        assert_eq!(a.recent().len(), 3);
        assert_eq!(p.free_recent(), 0);
        p.commit_full_blocks(&mut a, &toks, 10);
        // Position 10 reads back to 7: block 1 onwards.
        p.release_recent(&mut a, 10);
        assert_eq!(a.recent()[0], NO_RECENT);
        assert!(a.recent()[1..].iter().all(|&r| r != NO_RECENT));
        assert_eq!(p.free_recent(), 1);
        // A table may not grow past the recent blocks even with blocks to spare.
        assert!(matches!(
            p.allocate(&mut a, 20),
            Err(OutOfBlocks::Recent { needed: 2, free: 1 })
        ));
        assert_eq!(a.len(), 3, "all or nothing");
        p.allocate(&mut a, 16).unwrap();
        p.commit_full_blocks(&mut a, &toks, 16);
        p.release_recent(&mut a, 16);
        // Position 16 reads back to 13: block 3 only.
        assert_eq!(
            a.recent().iter().filter(|&&r| r != NO_RECENT).count(),
            1,
            "{:?}",
            a.recent()
        );
        p.free(&mut a);
        assert_eq!((p.free_blocks(), p.free_recent()), (8, 3));
    }

    #[test]
    fn a_prefix_hit_needs_its_tail_recent_block() {
        let mut p = tight_pool(16, 4);
        let toks: Vec<u32> = (0..13).collect();
        let mut a = BlockTable::default();
        for end in [4, 8, 12] {
            p.allocate(&mut a, end).unwrap();
            p.commit_full_blocks(&mut a, &toks, end);
            p.release_recent(&mut a, end);
        }
        // Blocks 0..3 cached; recent blocks of 0 and 1 released (and cached), 2 still held.
        let hit = p.match_prefix(&toks);
        assert_eq!(hit.blocks, a.blocks()[..3].to_vec());
        assert_eq!(hit.recent[..2], [NO_RECENT, NO_RECENT]);
        assert_eq!(hit.recent[2], a.recent()[2]);
        // A shorter prompt ending after block 1 takes the cached (freed) recent block of 1.
        let short = p.match_prefix(&toks[..9]);
        assert_eq!(short.blocks.len(), 2);
        assert_ne!(short.recent[1], NO_RECENT);
        assert_eq!(p.recent_ref_count(short.recent[1]), 0);
        let mut b = BlockTable::default();
        assert!(p.can_start(&short, 9));
        p.take_prefix(&mut b, short);
        p.allocate(&mut b, 9).unwrap();
        assert_eq!(p.recent_ref_count(b.recent()[1]), 1);
        p.free(&mut b);
        // Evict the recent block of block 0 and 1 (fill every free recent block): a hit ending
        // there can no longer be continued, so the lookup falls back to a shorter prefix.
        let mut c = BlockTable::default();
        p.allocate(&mut c, 12).unwrap();
        assert_eq!(p.match_prefix(&toks[..9]).blocks.len(), 0);
        // The longest hit still stands: its tail (block 2's recent block) is held by `a`.
        assert_eq!(p.match_prefix(&toks).blocks.len(), 3);
        p.free(&mut a);
        p.free(&mut c);
        assert_eq!((p.free_blocks(), p.free_recent()), (16, 4));
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
