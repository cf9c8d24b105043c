//! Server-sent events as OpenAI-compatible servers stream them, and the meaning of each chunk.
//!
//! The byte parser is incremental because TCP reads split events (and even UTF-8 characters)
//! anywhere; it only looks at whole lines.

use serde_json::Value;

/// One dispatched SSE event: its `data` lines joined by `\n` (OpenAI servers send one per event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

/// Incremental SSE parser: feed it bytes as they arrive, collect whole events.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Vec<String>,
    event: Option<String>,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Consume `bytes`; returns the events completed by them (possibly none).
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if let Some(ev) = self.on_line(&line) {
                    out.push(ev);
                }
            } else {
                self.line.push(b);
            }
        }
        out
    }

    /// End of stream: a final event not followed by a blank line is still delivered.
    pub fn finish(&mut self) -> Option<SseEvent> {
        let line = std::mem::take(&mut self.line);
        if !line.is_empty() {
            if let Some(ev) = self.on_line(&line) {
                return Some(ev);
            }
        }
        self.dispatch()
    }

    fn on_line(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return None; // comment / keep-alive
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.find(':') {
            Some(i) => {
                let v = &text[i + 1..];
                (&text[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (&text[..], ""),
        };
        match field {
            "data" => self.data.push(value.to_string()),
            "event" => self.event = Some(value.to_string()),
            _ => {} // id, retry and unknown fields do not matter to a benchmark
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        if self.data.is_empty() {
            self.event = None;
            return None;
        }
        let data = std::mem::take(&mut self.data).join("\n");
        Some(SseEvent {
            event: self.event.take(),
            data,
        })
    }
}

/// Token usage as reported by `stream_options.include_usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

/// What a benchmark needs to know about one streamed chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    /// A completion chunk. `has_text` is true when it carries generated text (content, reasoning
    /// or completions `text`): such a chunk marks the arrival of at least one token.
    Data {
        has_text: bool,
        usage: Option<Usage>,
        finish_reason: Option<String>,
    },
    /// `data: [DONE]`.
    Done,
    /// An error object sent in the stream (vLLM and OpenAI send `{"error": {...}}`).
    Error(String),
}

/// Interpret one event's data. Unparseable JSON is an error for the caller to classify.
pub fn parse_chunk(event: &SseEvent) -> Result<Chunk, String> {
    let data = event.data.trim();
    if data == "[DONE]" {
        return Ok(Chunk::Done);
    }
    let v: Value = serde_json::from_str(data).map_err(|e| format!("invalid JSON chunk: {e}"))?;
    if let Some(err) = v.get("error") {
        let msg = err
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| err.to_string());
        return Ok(Chunk::Error(msg));
    }
    if event.event.as_deref() == Some("error") {
        return Ok(Chunk::Error(data.to_string()));
    }
    let mut has_text = false;
    let mut finish_reason = None;
    if let Some(choices) = v.get("choices").and_then(Value::as_array) {
        for c in choices {
            let delta = c.get("delta");
            let texts = [
                delta.and_then(|d| d.get("content")),
                delta.and_then(|d| d.get("reasoning_content")),
                delta.and_then(|d| d.get("reasoning")),
                c.get("text"),
            ];
            if texts
                .iter()
                .flatten()
                .any(|t| t.as_str().is_some_and(|s| !s.is_empty()))
            {
                has_text = true;
            }
            if let Some(fr) = c.get("finish_reason").and_then(Value::as_str) {
                finish_reason = Some(fr.to_string());
            }
        }
    }
    let usage = v.get("usage").filter(|u| !u.is_null()).map(|u| Usage {
        prompt_tokens: u.get("prompt_tokens").and_then(Value::as_u64),
        completion_tokens: u.get("completion_tokens").and_then(Value::as_u64),
    });
    Ok(Chunk::Data {
        has_text,
        usage,
        finish_reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(s: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: s.to_string(),
        }
    }

    #[test]
    fn events_split_across_reads_at_every_byte() {
        let stream =
            "data: {\"a\":1}\n\ndata: {\"b\":\"é\"}\r\n\r\n: keep-alive\n\ndata: [DONE]\n\n";
        let want = vec![data("{\"a\":1}"), data("{\"b\":\"é\"}"), data("[DONE]")];
        // Every split point, including inside the two-byte 'é' and between \r and \n.
        for cut in 0..=stream.len() {
            let (a, b) = stream.as_bytes().split_at(cut);
            let mut p = SseParser::new();
            let mut got = p.feed(a);
            got.extend(p.feed(b));
            assert_eq!(p.finish(), None, "cut {cut}");
            assert_eq!(got, want, "cut {cut}");
        }
        // One byte at a time.
        let mut p = SseParser::new();
        let got: Vec<_> = stream.bytes().flat_map(|b| p.feed(&[b])).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn multi_line_data_event_name_and_unterminated_tail() {
        let mut p = SseParser::new();
        let got = p.feed(b"event: error\ndata: line1\ndata:line2\nid: 7\n\ndata: tail");
        assert_eq!(
            got,
            vec![SseEvent {
                event: Some("error".into()),
                data: "line1\nline2".into()
            }]
        );
        assert_eq!(p.finish(), Some(data("tail")));
        assert_eq!(p.finish(), None);
    }

    #[test]
    fn chat_content_chunk_counts_as_text() {
        let ev = data(
            r#"{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
        );
        assert_eq!(
            parse_chunk(&ev).unwrap(),
            Chunk::Data {
                has_text: true,
                usage: None,
                finish_reason: None
            }
        );
        // Role-only first chunk and empty content carry no token.
        let ev = data(r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#);
        assert!(matches!(
            parse_chunk(&ev).unwrap(),
            Chunk::Data {
                has_text: false,
                ..
            }
        ));
        // Reasoning tokens (thinking mode) are generated tokens too.
        let ev = data(r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hmm"}}]}"#);
        assert!(matches!(
            parse_chunk(&ev).unwrap(),
            Chunk::Data { has_text: true, .. }
        ));
    }

    #[test]
    fn completions_text_and_finish_reason() {
        let ev = data(
            r#"{"object":"text_completion","choices":[{"index":0,"text":" world","finish_reason":"length"}]}"#,
        );
        assert_eq!(
            parse_chunk(&ev).unwrap(),
            Chunk::Data {
                has_text: true,
                usage: None,
                finish_reason: Some("length".into())
            }
        );
    }

    #[test]
    fn usage_chunk_from_include_usage() {
        // vLLM's final usage chunk: empty choices, usage set.
        let ev = data(
            r#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"total_tokens":112,"completion_tokens":100}}"#,
        );
        assert_eq!(
            parse_chunk(&ev).unwrap(),
            Chunk::Data {
                has_text: false,
                usage: Some(Usage {
                    prompt_tokens: Some(12),
                    completion_tokens: Some(100)
                }),
                finish_reason: None
            }
        );
        // "usage": null on ordinary chunks is not a usage report.
        let ev = data(r#"{"choices":[{"delta":{"content":"a"}}],"usage":null}"#);
        assert!(matches!(
            parse_chunk(&ev).unwrap(),
            Chunk::Data { usage: None, .. }
        ));
    }

    #[test]
    fn done_and_error_events() {
        assert_eq!(parse_chunk(&data("[DONE]")).unwrap(), Chunk::Done);
        let ev =
            data(r#"{"error":{"message":"KV cache exhausted","type":"server_error","code":500}}"#);
        assert_eq!(
            parse_chunk(&ev).unwrap(),
            Chunk::Error("KV cache exhausted".into())
        );
        let ev = SseEvent {
            event: Some("error".into()),
            data: r#"{"detail":"boom"}"#.into(),
        };
        assert!(matches!(parse_chunk(&ev).unwrap(), Chunk::Error(_)));
        assert!(parse_chunk(&data("{not json")).is_err());
    }
}
