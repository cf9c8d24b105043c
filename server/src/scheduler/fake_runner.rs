//! A deterministic stand-in for the engine, for scheduler and API tests.
//!
//! It keeps a real KV store: each slot of each block holds the (token, position) written there,
//! in its persistent block and in its recent block, as the engine's pool does. A position's
//! logits are a hash of everything read back through the block table, and of its last
//! `recent_reach` positions read back through the recent table, so a wrong table, a block shared
//! by mistake, a recent block released too early, or KV overwritten by another sequence changes
//! the output (and a slot never written, or holding the wrong position, is an error).

use std::sync::{Arc, Mutex};

use crate::engine::{EngineError, KvLayout, LogitsWanted, ModelRunner, StepOutput, StepPlan};

pub const FAKE_EOS: u32 = 1;

#[derive(Debug, Default, Clone)]
pub struct FakeStats {
    pub steps: usize,
    pub max_seqs_in_step: usize,
    pub max_tokens_in_step: usize,
    /// (seq_id, start_pos) of every sequence's plan entries, in order.
    pub entries: Vec<(u64, usize, usize)>,
}

pub struct FakeRunner {
    layout: KvLayout,
    vocab: usize,
    kv: Vec<Option<(u32, usize)>>,
    recent_kv: Vec<Option<(u32, usize)>>,
    pub stats: Arc<Mutex<FakeStats>>,
    /// Wall time each step takes, so tests can observe a request while it runs.
    pub step_delay: std::time::Duration,
}

impl FakeRunner {
    pub fn new(block_size: usize, num_blocks: usize, vocab: usize) -> Self {
        // Enough recent blocks never to be the limit, a reach like V4-Flash's (window - 1).
        Self::with_recent(block_size, num_blocks, num_blocks, block_size - 1, vocab)
    }

    pub fn with_recent(
        block_size: usize,
        num_blocks: usize,
        recent_blocks: usize,
        recent_reach: usize,
        vocab: usize,
    ) -> Self {
        FakeRunner {
            layout: KvLayout {
                block_size,
                num_blocks,
                bytes_per_block: 1024,
                recent_blocks,
                bytes_per_recent: 4096,
                recent_reach,
            },
            vocab,
            kv: vec![None; block_size * num_blocks],
            recent_kv: vec![None; block_size * recent_blocks],
            stats: Arc::default(),
            step_delay: std::time::Duration::ZERO,
        }
    }

    fn slot(&self, table: &[u32], pos: usize) -> Result<usize, EngineError> {
        let bs = self.layout.block_size;
        let b = *table.get(pos / bs).ok_or_else(|| {
            EngineError::Invalid(format!("block table too short for position {pos}"))
        })? as usize;
        if b >= self.layout.num_blocks {
            return Err(EngineError::Invalid(format!("block {b} outside the pool")));
        }
        Ok(b * bs + pos % bs)
    }

    fn recent_slot(&self, recent: &[u32], pos: usize) -> Result<usize, EngineError> {
        let bs = self.layout.block_size;
        let r = *recent.get(pos / bs).ok_or_else(|| {
            EngineError::Invalid(format!("recent table too short for position {pos}"))
        })? as usize;
        if r >= self.layout.recent_blocks {
            return Err(EngineError::Invalid(format!(
                "position {pos}: recent block {r} outside the pool"
            )));
        }
        Ok(r * bs + pos % bs)
    }

    fn logits_at(
        &self,
        table: &[u32],
        recent: &[u32],
        pos: usize,
    ) -> Result<Vec<f32>, EngineError> {
        let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
        let near = pos.saturating_sub(self.layout.recent_reach);
        for p in 0..=pos {
            let mut read = vec![self.kv[self.slot(table, p)?]];
            if p >= near {
                read.push(self.recent_kv[self.recent_slot(recent, p)?]);
            }
            for kv in read {
                match kv {
                    Some((t, q)) if q == p => h = mix(h ^ (t as u64 + 1)),
                    other => {
                        return Err(EngineError::Invalid(format!(
                            "KV at position {p} holds {other:?}"
                        )))
                    }
                }
            }
        }
        Ok((0..self.vocab)
            .map(|v| {
                (mix(h ^ (v as u64).wrapping_mul(0xA24B_AED4_963E_E407)) >> 40) as f32
                    / (1u64 << 24) as f32
                    * 8.0
            })
            .collect())
    }
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl ModelRunner for FakeRunner {
    fn kv_layout(&self) -> KvLayout {
        self.layout
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, EngineError> {
        std::thread::sleep(self.step_delay);
        {
            let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            st.steps += 1;
            st.max_seqs_in_step = st.max_seqs_in_step.max(plan.seqs.len());
            let toks = plan.seqs.iter().map(|s| s.tokens.len()).sum();
            st.max_tokens_in_step = st.max_tokens_in_step.max(toks);
            for s in &plan.seqs {
                st.entries.push((s.seq_id, s.start_pos, s.tokens.len()));
            }
        }
        for s in &plan.seqs {
            for (i, &t) in s.tokens.iter().enumerate() {
                let slot = self.slot(&s.block_table, s.start_pos + i)?;
                self.kv[slot] = Some((t, s.start_pos + i));
                let slot = self.recent_slot(&s.recent_table, s.start_pos + i)?;
                self.recent_kv[slot] = Some((t, s.start_pos + i));
            }
        }
        let mut logits = Vec::new();
        for s in &plan.seqs {
            let end = s.start_pos + s.tokens.len();
            let rows = match s.logits {
                LogitsWanted::None => vec![],
                LogitsWanted::Last => {
                    vec![self.logits_at(&s.block_table, &s.recent_table, end - 1)?]
                }
                LogitsWanted::All => (s.start_pos..end)
                    .map(|p| self.logits_at(&s.block_table, &s.recent_table, p))
                    .collect::<Result<_, _>>()?,
            };
            logits.push(rows);
        }
        Ok(StepOutput {
            logits,
            drafts: Vec::new(),
        })
    }
    fn release(&mut self, _seq_id: u64) {}
}
