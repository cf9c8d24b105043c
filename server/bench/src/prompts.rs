//! Prompt sets: JSONL files the user points at (or the built-in HumanEval / MT-Bench extracts),
//! and synthetic prompts of an exact token length for prefill sweeps.

use std::path::Path;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::client::{Api, Payload};

const BUILTIN_HUMANEVAL: &str = include_str!("../prompts/humaneval.jsonl");
const BUILTIN_MTBENCH: &str = include_str!("../prompts/mtbench.jsonl");

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("reading prompt file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Line {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{0}: no prompts")]
    Empty(String),
    #[error("prompt {id} of {set}: {reason}")]
    Unusable {
        set: String,
        id: String,
        reason: String,
    },
}

/// A chat message as OpenAI's API takes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: Value,
}

/// One prompt; a file line may give the text, the chat messages or both.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub id: String,
    pub text: Option<String>,
    pub token_ids: Option<Vec<u32>>,
    pub messages: Option<Vec<Message>>,
}

impl Prompt {
    /// The request payload for `api`: chat prefers `messages` and wraps a plain `prompt` as one
    /// user message; completions needs `prompt` (text or token ids).
    pub fn payload(&self, api: Api) -> Result<Payload, String> {
        match api {
            Api::Chat => {
                if let Some(m) = &self.messages {
                    Ok(Payload::Chat(m.clone()))
                } else if let Some(t) = &self.text {
                    Ok(Payload::Chat(vec![Message {
                        role: "user".into(),
                        content: Value::String(t.clone()),
                    }]))
                } else {
                    Err("token-id prompts need --endpoint completions".into())
                }
            }
            Api::Completions => {
                if let Some(ids) = &self.token_ids {
                    Ok(Payload::TokenIds(ids.clone()))
                } else if let Some(t) = &self.text {
                    Ok(Payload::Text(t.clone()))
                } else {
                    Err("a prompt with only `messages` needs --endpoint chat".into())
                }
            }
        }
    }
}

/// A named list of prompts (the name labels results, e.g. "humaneval").
#[derive(Debug, Clone)]
pub struct PromptSet {
    pub name: String,
    pub prompts: Vec<Prompt>,
}

impl PromptSet {
    /// `builtin:humaneval`, `builtin:mtbench`, or a path to a JSONL file.
    pub fn load(spec: &str) -> Result<Self, PromptError> {
        match spec {
            "builtin:humaneval" => Self::parse("humaneval", BUILTIN_HUMANEVAL),
            "builtin:mtbench" => Self::parse("mtbench", BUILTIN_MTBENCH),
            path => {
                let text = std::fs::read_to_string(path).map_err(|source| PromptError::Read {
                    path: path.to_string(),
                    source,
                })?;
                let name = Path::new(path)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| path.to_string());
                Self::parse_named(&name, path, &text)
            }
        }
    }

    /// Parse JSONL text; each non-blank line needs `prompt` (string or token-id array) or
    /// `messages`.
    pub fn parse(name: &str, text: &str) -> Result<Self, PromptError> {
        Self::parse_named(name, name, text)
    }

    fn parse_named(name: &str, path: &str, text: &str) -> Result<Self, PromptError> {
        let mut prompts = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let err = |reason: String| PromptError::Line {
                path: path.to_string(),
                line: i + 1,
                reason,
            };
            let v: Value = serde_json::from_str(line).map_err(|e| err(format!("not JSON: {e}")))?;
            let id = match v.get("id") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => format!("{name}#{}", prompts.len()),
            };
            let (text, token_ids) = match v.get("prompt") {
                None | Some(Value::Null) => (None, None),
                Some(Value::String(s)) => (Some(s.clone()), None),
                Some(Value::Array(a)) => {
                    let ids = a
                        .iter()
                        .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                        .collect::<Option<Vec<u32>>>()
                        .ok_or_else(|| err("`prompt` array must hold token ids (u32)".into()))?;
                    (None, Some(ids))
                }
                Some(_) => return Err(err("`prompt` must be a string or token-id array".into())),
            };
            let messages = match v.get("messages") {
                None | Some(Value::Null) => None,
                Some(m) => Some(
                    serde_json::from_value::<Vec<Message>>(m.clone())
                        .map_err(|e| err(format!("bad `messages`: {e}")))?,
                ),
            };
            if text.is_none() && token_ids.is_none() && messages.is_none() {
                return Err(err("needs a `prompt` or `messages` field".into()));
            }
            prompts.push(Prompt {
                id,
                text,
                token_ids,
                messages,
            });
        }
        if prompts.is_empty() {
            return Err(PromptError::Empty(path.to_string()));
        }
        Ok(Self {
            name: name.to_string(),
            prompts,
        })
    }

    /// Payloads for every prompt, checked up front so a bad set fails before any traffic.
    pub fn payloads(&self, api: Api) -> Result<Vec<Payload>, PromptError> {
        self.prompts
            .iter()
            .map(|p| {
                p.payload(api).map_err(|reason| PromptError::Unusable {
                    set: self.name.clone(),
                    id: p.id.clone(),
                    reason,
                })
            })
            .collect()
    }
}

/// Words that are one token each (with their leading space) in common BPE vocabularies; the
/// text fallback uses them to approach a token count when token-id prompts are not accepted.
const FILLER_WORDS: &[&str] = &[
    " the", " of", " and", " to", " in", " is", " that", " for", " it", " as", " was", " with",
    " be", " by", " on", " not", " he", " this", " are", " or", " his", " from", " at", " which",
    " but", " have", " an", " had", " they", " you", " were", " their", " one", " all", " we",
    " can", " her", " has", " there", " been", " if", " more", " when", " will", " would", " who",
    " so", " no", " time", " water", " house", " river", " music", " light", " stone", " green",
];

/// Random token ids in [lo, hi] (a range of ordinary tokens of the served vocabulary). Each
/// `(seed, salt)` gives a different prompt, so prefix caching cannot shortcut the prefill.
pub fn synthetic_token_ids(len: usize, lo: u32, hi: u32, seed: u64, salt: u64) -> Vec<u32> {
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
    (0..len).map(|_| rng.random_range(lo..=hi)).collect()
}

/// Random filler text of about `len` tokens (one common word per token; the server's reported
/// `prompt_tokens` gives the exact figure).
pub fn synthetic_text(len: usize, seed: u64, salt: u64) -> String {
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut s = String::with_capacity(len * 6);
    for _ in 0..len {
        s.push_str(FILLER_WORDS[rng.random_range(0..FILLER_WORDS.len())]);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_sets_load_with_both_forms() {
        let he = PromptSet::load("builtin:humaneval").unwrap();
        assert_eq!(he.prompts.len(), 164);
        assert_eq!(he.prompts[0].id, "HumanEval/0");
        assert!(he.payloads(Api::Chat).is_ok());
        assert!(he.payloads(Api::Completions).is_ok());
        let mt = PromptSet::load("builtin:mtbench").unwrap();
        assert_eq!(mt.prompts.len(), 80);
    }

    #[test]
    fn prompt_forms_and_api_mapping() {
        let text = r#"{"prompt": "hello"}
{"prompt": [1, 2, 3], "id": 7}

{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}"#;
        let set = PromptSet::parse("mine", text).unwrap();
        assert_eq!(set.prompts.len(), 3);
        assert_eq!(set.prompts[1].id, "7");
        assert_eq!(
            set.prompts[1].payload(Api::Completions).unwrap(),
            Payload::TokenIds(vec![1, 2, 3])
        );
        assert!(set.prompts[1].payload(Api::Chat).is_err());
        assert!(set.prompts[2].payload(Api::Completions).is_err());
        match set.prompts[0].payload(Api::Chat).unwrap() {
            Payload::Chat(m) => assert_eq!(m[0].content, "hello"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            set.payloads(Api::Chat),
            Err(PromptError::Unusable { .. })
        ));
    }

    #[test]
    fn bad_files_give_line_numbers() {
        let e = PromptSet::parse("f", "{\"prompt\":\"a\"}\n{\"text\":1}").unwrap_err();
        assert!(e.to_string().contains("f:2"), "{e}");
        assert!(PromptSet::parse("f", "nope").is_err());
        assert!(PromptSet::parse("f", "{\"prompt\":[-1]}").is_err());
        assert!(PromptSet::parse("f", "{\"messages\":\"x\"}").is_err());
        assert!(matches!(
            PromptSet::parse("f", "\n\n"),
            Err(PromptError::Empty(_))
        ));
        assert!(PromptSet::load("/nonexistent/prompts.jsonl").is_err());
    }

    #[test]
    fn synthetic_prompts_are_exact_deterministic_and_distinct() {
        let a = synthetic_token_ids(8192, 1000, 2000, 7, 0);
        assert_eq!(a.len(), 8192);
        assert!(a.iter().all(|&t| (1000..=2000).contains(&t)));
        assert_eq!(a, synthetic_token_ids(8192, 1000, 2000, 7, 0));
        assert_ne!(a, synthetic_token_ids(8192, 1000, 2000, 7, 1));
        let t = synthetic_text(100, 1, 0);
        assert_eq!(t.split(' ').count(), 101);
    }
}
