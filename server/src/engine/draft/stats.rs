//! Counters behind vLLM's speculative-decoding metrics (`vllm:spec_decode_num_drafts_total`,
//! `..._num_draft_tokens_total`, `..._num_accepted_tokens_total`,
//! `..._num_accepted_tokens_per_pos`) and the mean acceptance length reported at the end of a
//! benchmark. The metrics module exports them; this only counts.

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecDecodeStats {
    /// Verification steps (one per request per step that carried drafts).
    pub num_drafts: u64,
    pub num_draft_tokens: u64,
    pub num_accepted_tokens: u64,
    /// `[i]`: how often the draft at position `i` (0-based) was accepted.
    pub accepted_per_position: Vec<u64>,
}

impl SpecDecodeStats {
    /// Records one verification of `num_draft_tokens` drafts of which the first
    /// `num_accepted` were accepted.
    pub fn record(&mut self, num_draft_tokens: usize, num_accepted: usize) {
        let accepted = num_accepted.min(num_draft_tokens);
        self.num_drafts += 1;
        self.num_draft_tokens += num_draft_tokens as u64;
        self.num_accepted_tokens += accepted as u64;
        if self.accepted_per_position.len() < num_draft_tokens {
            self.accepted_per_position.resize(num_draft_tokens, 0);
        }
        for c in &mut self.accepted_per_position[..accepted] {
            *c += 1;
        }
    }

    /// Tokens emitted per target step: `1 + accepted / drafts` (vLLM's mean acceptance
    /// length); 1 before any draft.
    pub fn mean_acceptance_length(&self) -> f64 {
        if self.num_drafts == 0 {
            return 1.0;
        }
        1.0 + self.num_accepted_tokens as f64 / self.num_drafts as f64
    }

    /// Accepted / drafted tokens.
    pub fn acceptance_rate(&self) -> f64 {
        if self.num_draft_tokens == 0 {
            return 0.0;
        }
        self.num_accepted_tokens as f64 / self.num_draft_tokens as f64
    }

    /// Per-position acceptance rates (accepted at `i` / verifications that drafted `i`).
    pub fn per_position_rates(&self, drafts_per_step: usize) -> Vec<f64> {
        (0..drafts_per_step)
            .map(|i| {
                let acc = self.accepted_per_position.get(i).copied().unwrap_or(0);
                if self.num_drafts == 0 {
                    0.0
                } else {
                    acc as f64 / self.num_drafts as f64
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_like_vllm() {
        let mut s = SpecDecodeStats::default();
        assert_eq!(s.mean_acceptance_length(), 1.0);
        s.record(5, 5);
        s.record(5, 2);
        s.record(5, 0);
        s.record(5, 3);
        assert_eq!(s.num_drafts, 4);
        assert_eq!(s.num_draft_tokens, 20);
        assert_eq!(s.num_accepted_tokens, 10);
        assert_eq!(s.accepted_per_position, vec![3, 3, 2, 1, 1]);
        assert_eq!(s.mean_acceptance_length(), 3.5);
        assert_eq!(s.acceptance_rate(), 0.5);
        assert_eq!(s.per_position_rates(5), vec![0.75, 0.75, 0.5, 0.25, 0.25]);
    }
}
