//! Streaming detokenization and stop strings.
//!
//! Byte-level BPE can split one UTF-8 character over several tokens (CJK, emoji). The
//! [`IncrementalDecoder`] keeps the bytes of an unfinished character until it completes, so a
//! text delta never carries half a character, and the concatenated deltas equal the tokenizer's
//! decode of the whole sequence (invalid bytes become U+FFFD exactly where a lossy decode of the
//! whole sequence puts them).

use super::{Tokenizer, TokenizerError};

/// Per-request streaming detokenizer: push ids, get text deltas.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    tokenizer: Tokenizer,
    skip_special: bool,
    /// Bytes of a character not yet complete.
    pending: Vec<u8>,
}

impl IncrementalDecoder {
    /// `skip_special` leaves out tokens the tokenizer marks special (BOS, EOS, pad); `</think>`
    /// and `｜DSML｜` are not special and always come through for the output parser.
    pub fn new(tokenizer: &Tokenizer, skip_special: bool) -> Self {
        Self {
            tokenizer: tokenizer.clone(),
            skip_special,
            pending: Vec::new(),
        }
    }

    /// Adds one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        let bytes = self.tokenizer.token_bytes(id)?;
        if self.skip_special && self.tokenizer.is_special(id) {
            return Ok(String::new());
        }
        self.pending.extend_from_slice(bytes);
        Ok(self.drain_complete())
    }

    /// Adds several tokens (e.g. an accepted speculative block); returns their joint delta.
    pub fn push_all(&mut self, ids: &[u32]) -> Result<String, TokenizerError> {
        let mut out = String::new();
        for &id in ids {
            out.push_str(&self.push(id)?);
        }
        Ok(out)
    }

    /// Ends the stream: an unfinished character becomes U+FFFD, as a lossy decode would show it.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }

    /// Whether bytes of an unfinished character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Emits every complete character of `pending`, keeping a trailing incomplete sequence.
    fn drain_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    // The prefix up to `valid` was just checked to be UTF-8.
                    out.push_str(&String::from_utf8_lossy(&self.pending[start..valid]));
                    match e.error_len() {
                        // Invalid bytes: same replacement `String::from_utf8_lossy` makes.
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid + n;
                        }
                        // Incomplete character at the end: wait for more bytes.
                        None => {
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}

/// Where a stop string ended the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopMatch {
    /// Index of the matched string in the list given to [`StopStrings::new`].
    pub index: usize,
    /// The matched stop string.
    pub stop: String,
}

/// Finds the earliest stop string across text deltas. Text that may be the start of a stop
/// string is held back until it is clear, so nothing past a stop is ever emitted.
#[derive(Debug, Clone)]
pub struct StopStrings {
    stops: Vec<String>,
    include_stop: bool,
    held: String,
    stopped: Option<StopMatch>,
}

impl StopStrings {
    /// `include_stop` mirrors vLLM's `include_stop_str_in_output`. Empty strings are ignored.
    pub fn new(stops: Vec<String>, include_stop: bool) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            include_stop,
            held: String::new(),
            stopped: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// The stop that ended the output, once one matched.
    pub fn stopped(&self) -> Option<&StopMatch> {
        self.stopped.as_ref()
    }

    /// Feeds a delta; returns the text safe to emit. After a match, returns the text up to the
    /// stop (plus the stop with `include_stop`) and [`stopped`](Self::stopped) is set; later
    /// pushes return nothing.
    pub fn push(&mut self, delta: &str) -> String {
        if self.stopped.is_some() {
            return String::new();
        }
        self.held.push_str(delta);
        // The earliest match wins; among matches at one position, the first listed.
        let found = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|pos| (pos, i)))
            .min();
        if let Some((pos, index)) = found {
            let stop = self.stops[index].clone();
            let end = if self.include_stop {
                pos + stop.len()
            } else {
                pos
            };
            let out = self.held[..end].to_string();
            self.held.clear();
            self.stopped = Some(StopMatch { index, stop });
            return out;
        }
        let keep = self.longest_stop_prefix_suffix();
        let emit_len = self.held.len() - keep;
        let out = self.held[..emit_len].to_string();
        self.held.drain(..emit_len);
        out
    }

    /// Ends the stream without a match: releases the held-back text.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop string.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let mut best = 0;
        for (start, _) in self.held.char_indices() {
            let suffix = &self.held[start..];
            if self
                .stops
                .iter()
                .any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            {
                best = suffix.len();
                break;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tokenizer::test_support::tokenizer;

    fn stream(ids: &[u32], skip_special: bool) -> (Vec<String>, String) {
        let mut dec = IncrementalDecoder::new(tokenizer(), skip_special);
        let mut deltas = Vec::new();
        for &id in ids {
            deltas.push(dec.push(id).unwrap());
        }
        deltas.push(dec.finish());
        let joined = deltas.concat();
        (deltas, joined)
    }

    #[test]
    fn multibyte_chars_split_over_tokens_stream_whole() {
        let t = tokenizer();
        let text = "北京今天天气晴朗 😀🎉 naïve café 🇨🇳 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok";
        let ids = t.encode(text).unwrap();
        // The test only means something if some token holds part of a character.
        let split = ids
            .iter()
            .filter(|&&id| std::str::from_utf8(t.token_bytes(id).unwrap()).is_err())
            .count();
        assert!(split > 0, "no token splits a character; pick another text");
        let (deltas, joined) = stream(&ids, false);
        assert_eq!(joined, t.decode(&ids, false).unwrap());
        assert_eq!(joined, text);
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')));
    }

    #[test]
    fn special_tokens_skipped_or_kept_like_decode() {
        let t = tokenizer();
        let s = *t.special();
        let mut ids = vec![s.bos, s.think_start];
        ids.extend(t.encode("想一想🙂").unwrap());
        ids.extend([s.think_end, s.dsml, s.eos]);
        for skip in [false, true] {
            let (_, joined) = stream(&ids, skip);
            assert_eq!(joined, t.decode(&ids, skip).unwrap(), "skip_special={skip}");
        }
    }

    #[test]
    fn invalid_byte_sequences_replace_like_lossy_decode() {
        let t = tokenizer();
        // Tokens that are lone continuation bytes / truncated lead bytes, interleaved with text.
        let byte_token = |b: u8| {
            (0..t.vocab_size() as u32)
                .find(|&id| t.token_bytes(id).unwrap() == [b])
                .unwrap()
        };
        let a = t.encode("a").unwrap()[0];
        let ids = vec![
            byte_token(0xE5),
            a,
            byte_token(0x80),
            byte_token(0xF0),
            byte_token(0x9F),
            a,
            byte_token(0xE5),
        ];
        let (_, joined) = stream(&ids, false);
        assert_eq!(joined, t.decode(&ids, false).unwrap());
        assert!(joined.contains('\u{FFFD}'));
    }

    #[test]
    fn random_id_streams_equal_whole_decode() {
        use rand::{Rng, SeedableRng};
        let t = tokenizer();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..20 {
            // Mostly single-byte tokens (which split characters), some of everything else.
            let ids: Vec<u32> = (0..300)
                .map(|_| {
                    if rng.random_bool(0.5) {
                        rng.random_range(0..256)
                    } else {
                        rng.random_range(0..t.vocab_size() as u32)
                    }
                })
                .collect();
            for skip in [false, true] {
                let (_, joined) = stream(&ids, skip);
                assert_eq!(joined, t.decode(&ids, skip).unwrap());
            }
        }
    }

    #[test]
    fn unknown_id_is_an_error() {
        let mut dec = IncrementalDecoder::new(tokenizer(), false);
        assert!(dec.push(tokenizer().vocab_size() as u32).is_err());
    }

    fn run_stops(stops: &[&str], include: bool, deltas: &[&str]) -> (String, Option<StopMatch>) {
        let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()).collect(), include);
        let mut out = String::new();
        for d in deltas {
            out.push_str(&s.push(d));
        }
        if s.stopped().is_none() {
            out.push_str(&s.finish());
        }
        (out, s.stopped().cloned())
    }

    #[test]
    fn stop_string_across_deltas() {
        let (out, m) = run_stops(&["STOP"], false, &["abc S", "TO", "P tail"]);
        assert_eq!(out, "abc ");
        assert_eq!(m.unwrap().index, 0);
        let (out, _) = run_stops(&["STOP"], true, &["abc S", "TO", "P tail"]);
        assert_eq!(out, "abc STOP");
    }

    #[test]
    fn earliest_stop_wins_and_prefixes_are_held() {
        let mut s = StopStrings::new(vec!["world".into(), "lo w".into()], false);
        // "l" could start "lo w": held back.
        assert_eq!(s.push("hel"), "he");
        assert_eq!(s.push("lo"), "l");
        // "world" matches too, but "lo w" starts earlier.
        assert_eq!(s.push(" world"), "");
        assert_eq!(s.stopped().unwrap().stop, "lo w");
        assert_eq!(s.push("more"), "");
    }

    #[test]
    fn held_prefix_released_when_it_diverges_or_at_finish() {
        let (out, m) = run_stops(&["</end>"], false, &["a</e", "x>b", "</en"]);
        assert_eq!(out, "a</ex>b</en");
        assert!(m.is_none());
        let mut s = StopStrings::new(vec!["é!".into()], false);
        assert_eq!(s.push("caf"), "caf");
        assert_eq!(s.push("é"), "");
        assert_eq!(s.push("é"), "é");
        assert_eq!(s.finish(), "é");
    }
}
