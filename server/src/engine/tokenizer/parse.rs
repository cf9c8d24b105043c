//! Streaming parse of DeepSeek-V4 output into reasoning, content and DSML tool calls.
//!
//! The assistant turn reads `{reasoning}</think>{content}` then optionally
//! `\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="k"
//! string="true|false">v</｜DSML｜parameter>\n...</｜DSML｜invoke>\n</｜DSML｜tool_calls>`.
//! Feed text deltas (decoded with `skip_special`, so no EOS text) and get events; any split of
//! the same text gives the same events once merged. A tool-call block that does not follow
//! the grammar is passed through as content from the point it breaks, never dropped.
//! Non-streaming use is one `feed` of the whole text followed by `finish`.

use super::format::{
    INVOKE_CLOSE, INVOKE_OPEN, PARAMETER_CLOSE, PARAMETER_OPEN, THINK_END, THINK_START,
    TOOL_CALLS_CLOSE, TOOL_CALLS_START,
};
use super::json::{python_json_string, OrderedJson};
use rand::{Rng, SeedableRng};

/// A piece of parsed output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputEvent {
    /// Text of the thinking block.
    Reasoning(String),
    /// Text of the answer.
    Content(String),
    /// One complete tool call. `arguments_json` is a JSON object text.
    ToolCall {
        /// Position among this turn's tool calls (OpenAI's `index`).
        index: usize,
        /// `call_` + 24 random alphanumerics.
        id: String,
        name: String,
        arguments_json: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Reasoning,
    Content,
    /// Inside the DSML block; `buf` holds unparsed text from just after `\n\n<｜DSML｜tool_calls`.
    ToolCalls,
    /// Everything else is content, verbatim (after a malformed block, or after the block ended).
    Passthrough,
}

/// Per-request streaming output parser.
#[derive(Debug, Clone)]
pub struct OutputParser {
    state: State,
    tools_enabled: bool,
    /// Text not yet turned into events (a possible marker prefix, or the DSML block so far).
    buf: String,
    /// Reasoning not started yet: a leading `<think>` the model may repeat is dropped.
    at_reasoning_start: bool,
    /// Whether the DSML block's opening `>\n` has been read.
    block_opened: bool,
    calls_emitted: usize,
    rng: rand_chacha::ChaCha8Rng,
}

impl OutputParser {
    /// `thinking`: the prompt ended with `<think>`, so output starts with reasoning.
    /// `tools_enabled`: the request offered tools, so DSML tool calls are parsed.
    pub fn new(thinking: bool, tools_enabled: bool) -> Self {
        let rng = rand_chacha::ChaCha8Rng::from_rng(&mut rand::rng());
        Self::with_rng(thinking, tools_enabled, rng)
    }

    /// Same as [`new`](Self::new) with reproducible tool-call ids.
    pub fn with_seed(thinking: bool, tools_enabled: bool, seed: u64) -> Self {
        Self::with_rng(
            thinking,
            tools_enabled,
            rand_chacha::ChaCha8Rng::seed_from_u64(seed),
        )
    }

    fn with_rng(thinking: bool, tools_enabled: bool, rng: rand_chacha::ChaCha8Rng) -> Self {
        Self {
            state: if thinking {
                State::Reasoning
            } else {
                State::Content
            },
            tools_enabled,
            buf: String::new(),
            at_reasoning_start: thinking,
            block_opened: false,
            calls_emitted: 0,
            rng,
        }
    }

    /// Whether the parser is still inside the thinking block.
    pub fn in_reasoning(&self) -> bool {
        self.state == State::Reasoning
    }

    /// Feeds a text delta; returns the events it completes.
    pub fn feed(&mut self, delta: &str) -> Vec<OutputEvent> {
        self.buf.push_str(delta);
        let mut events = Vec::new();
        self.step(&mut events, false);
        events
    }

    /// Ends the output: flushes held text (an unfinished tool-call block becomes content).
    pub fn finish(&mut self) -> Vec<OutputEvent> {
        let mut events = Vec::new();
        self.step(&mut events, true);
        events
    }

    fn step(&mut self, events: &mut Vec<OutputEvent>, done: bool) {
        loop {
            let progressed = match self.state {
                State::Reasoning => self.step_reasoning(events, done),
                State::Content => self.step_content(events, done),
                State::ToolCalls => self.step_tool_calls(events, done),
                State::Passthrough => {
                    let text = std::mem::take(&mut self.buf);
                    push_text(events, OutputEvent::Content(text));
                    false
                }
            };
            if !progressed {
                break;
            }
        }
    }

    /// Returns whether the state changed (so the caller runs the next state on the rest).
    fn step_reasoning(&mut self, events: &mut Vec<OutputEvent>, done: bool) -> bool {
        if self.at_reasoning_start {
            if self.buf.starts_with(THINK_START) {
                self.buf.drain(..THINK_START.len());
            } else if !done && THINK_START.starts_with(self.buf.as_str()) {
                return false;
            }
            self.at_reasoning_start = false;
        }
        if let Some(pos) = self.buf.find(THINK_END) {
            let reasoning = self.buf[..pos].to_string();
            self.buf.drain(..pos + THINK_END.len());
            push_text(events, OutputEvent::Reasoning(reasoning));
            self.state = State::Content;
            return true;
        }
        let keep = if done {
            0
        } else {
            held_marker_prefix(&self.buf, &[THINK_END])
        };
        let text: String = self.buf.drain(..self.buf.len() - keep).collect();
        push_text(events, OutputEvent::Reasoning(text));
        false
    }

    fn step_content(&mut self, events: &mut Vec<OutputEvent>, done: bool) -> bool {
        if !self.tools_enabled {
            self.state = State::Passthrough;
            return true;
        }
        if let Some(pos) = self.buf.find(TOOL_CALLS_START) {
            let content = self.buf[..pos].to_string();
            self.buf.drain(..pos + TOOL_CALLS_START.len());
            push_text(events, OutputEvent::Content(content));
            self.state = State::ToolCalls;
            return true;
        }
        let keep = if done {
            0
        } else {
            held_marker_prefix(&self.buf, &[TOOL_CALLS_START])
        };
        let text: String = self.buf.drain(..self.buf.len() - keep).collect();
        push_text(events, OutputEvent::Content(text));
        false
    }

    fn step_tool_calls(&mut self, events: &mut Vec<OutputEvent>, done: bool) -> bool {
        loop {
            let item = if self.block_opened {
                parse_block_item(&self.buf)
            } else {
                expect_literal(&self.buf, 0, ">").map(|end| (BlockItem::Open, end))
            };
            match item {
                Parsed::Done((item, consumed)) => {
                    self.buf.drain(..consumed);
                    match item {
                        BlockItem::Open => self.block_opened = true,
                        BlockItem::Invoke(name, args) => {
                            let index = self.calls_emitted;
                            self.calls_emitted += 1;
                            events.push(OutputEvent::ToolCall {
                                index,
                                id: self.call_id(),
                                name,
                                arguments_json: args,
                            });
                        }
                        BlockItem::Close => {
                            // Text after the block is unusual; keep it as content.
                            self.state = State::Passthrough;
                            return true;
                        }
                    }
                }
                Parsed::NeedMore if !done => return false,
                Parsed::NeedMore | Parsed::Malformed => {
                    // From where parsing broke, the text is content. Before any call was parsed
                    // that includes the block's opening marker.
                    if !self.block_opened {
                        self.buf.insert_str(0, TOOL_CALLS_START);
                    } else if self.calls_emitted == 0 {
                        self.buf.insert(0, '>');
                        self.buf.insert_str(0, TOOL_CALLS_START);
                    }
                    if done && self.buf.trim().is_empty() {
                        self.buf.clear();
                    }
                    self.state = State::Passthrough;
                    return true;
                }
            }
        }
    }

    fn call_id(&mut self) -> String {
        const ALPHANUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let tail: String = (0..24)
            .map(|_| ALPHANUM[self.rng.random_range(0..ALPHANUM.len())] as char)
            .collect();
        format!("call_{tail}")
    }
}

/// A whole assistant turn, parsed (the non-streaming form of the events).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedOutput {
    /// Thinking-block text (empty when not in thinking mode).
    pub reasoning: String,
    pub content: String,
    pub tool_calls: Vec<ParsedToolCall>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToolCall {
    pub id: String,
    pub name: String,
    pub arguments_json: String,
}

impl ParsedOutput {
    /// Collects events (from any number of `feed`s plus `finish`).
    pub fn from_events(events: impl IntoIterator<Item = OutputEvent>) -> Self {
        let mut out = Self::default();
        for event in events {
            match event {
                OutputEvent::Reasoning(t) => out.reasoning.push_str(&t),
                OutputEvent::Content(t) => out.content.push_str(&t),
                OutputEvent::ToolCall {
                    id,
                    name,
                    arguments_json,
                    ..
                } => out.tool_calls.push(ParsedToolCall {
                    id,
                    name,
                    arguments_json,
                }),
            }
        }
        out
    }
}

/// Parses a complete output (non-streaming responses): the streaming parser fed once.
pub fn parse_output(text: &str, thinking: bool, tools_enabled: bool) -> ParsedOutput {
    let mut parser = OutputParser::new(thinking, tools_enabled);
    let mut events = parser.feed(text);
    events.extend(parser.finish());
    ParsedOutput::from_events(events)
}

/// Appends text to the event list, merging with a preceding event of the same kind.
fn push_text(events: &mut Vec<OutputEvent>, event: OutputEvent) {
    match (&event, events.last_mut()) {
        (OutputEvent::Reasoning(t), _) | (OutputEvent::Content(t), _) if t.is_empty() => {}
        (OutputEvent::Reasoning(t), Some(OutputEvent::Reasoning(prev)))
        | (OutputEvent::Content(t), Some(OutputEvent::Content(prev))) => prev.push_str(t),
        _ => events.push(event),
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of one of `markers`.
fn held_marker_prefix(text: &str, markers: &[&str]) -> usize {
    for (start, _) in text.char_indices() {
        let suffix = &text[start..];
        if markers
            .iter()
            .any(|m| m.len() > suffix.len() && m.starts_with(suffix))
        {
            return suffix.len();
        }
    }
    0
}

enum Parsed<T> {
    Done(T),
    NeedMore,
    Malformed,
}

impl<T> Parsed<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Parsed<U> {
        match self {
            Parsed::Done(t) => Parsed::Done(f(t)),
            Parsed::NeedMore => Parsed::NeedMore,
            Parsed::Malformed => Parsed::Malformed,
        }
    }
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Parsed::Done(v) => v,
            Parsed::NeedMore => return Parsed::NeedMore,
            Parsed::Malformed => return Parsed::Malformed,
        }
    };
}

enum BlockItem {
    Open,
    Invoke(String, String),
    Close,
}

/// Skips whitespace from `at`; `NeedMore` if the text ends there.
fn skip_ws(text: &str, at: usize) -> Parsed<usize> {
    let rest = &text[at..];
    let trimmed = rest.trim_start();
    if trimmed.is_empty() {
        Parsed::NeedMore
    } else {
        Parsed::Done(at + rest.len() - trimmed.len())
    }
}

/// `lit` at `at`: the offset after it, `NeedMore` if the text is a prefix of it.
fn expect_literal(text: &str, at: usize, lit: &str) -> Parsed<usize> {
    let rest = &text[at..];
    if rest.starts_with(lit) {
        Parsed::Done(at + lit.len())
    } else if lit.starts_with(rest) {
        Parsed::NeedMore
    } else {
        Parsed::Malformed
    }
}

/// Finds `needle` from `at`: (start, end) of it, `NeedMore` if absent.
fn find_from(text: &str, at: usize, needle: &str) -> Parsed<(usize, usize)> {
    match text[at..].find(needle) {
        Some(p) => Parsed::Done((at + p, at + p + needle.len())),
        None => Parsed::NeedMore,
    }
}

/// ` name="value"` at `at` (leading whitespace allowed): the value and the offset after it.
fn attribute(text: &str, at: usize, name: &str) -> Parsed<(String, usize)> {
    let at = tri!(skip_ws(text, at));
    let at = tri!(expect_literal(text, at, name));
    let at = tri!(expect_literal(text, at, "=\""));
    let (end, after) = tri!(find_from(text, at, "\""));
    Parsed::Done((text[at..end].to_string(), after))
}

/// Next item of the DSML block, whitespace between items allowed: an invoke (complete), or
/// the closing tag.
fn parse_block_item(text: &str) -> Parsed<(BlockItem, usize)> {
    let at = tri!(skip_ws(text, 0));
    let rest = &text[at..];
    if TOOL_CALLS_CLOSE.starts_with(rest) && rest.len() < TOOL_CALLS_CLOSE.len() {
        return Parsed::NeedMore;
    }
    if rest.starts_with(TOOL_CALLS_CLOSE) {
        return Parsed::Done((BlockItem::Close, at + TOOL_CALLS_CLOSE.len()));
    }
    let at = tri!(expect_literal(text, at, INVOKE_OPEN));
    let (name, at) = tri!(attribute(text, at, "name"));
    let mut at = tri!(expect_literal(text, at, ">"));
    let mut args: Vec<(String, String)> = Vec::new();
    loop {
        at = tri!(skip_ws(text, at));
        let rest = &text[at..];
        if rest.starts_with(INVOKE_CLOSE) {
            at += INVOKE_CLOSE.len();
            break;
        }
        if INVOKE_CLOSE.starts_with(rest) {
            return Parsed::NeedMore;
        }
        at = tri!(expect_literal(text, at, PARAMETER_OPEN));
        let (key, next) = tri!(attribute(text, at, "name"));
        let (is_string, next) = tri!(attribute(text, next, "string"));
        let next = tri!(expect_literal(text, next, ">"));
        let (value_end, after) = tri!(find_from(text, next, PARAMETER_CLOSE));
        let raw = &text[next..value_end];
        let value = match is_string.as_str() {
            "true" => python_json_string(raw),
            // Valid JSON goes in verbatim, as the official decoder does.
            "false" => match OrderedJson::parse(raw) {
                Ok(_) => raw.to_string(),
                // Not JSON after all: keep the text as a string rather than lose the call.
                Err(_) => python_json_string(raw),
            },
            _ => return Parsed::Malformed,
        };
        if args.iter().any(|(k, _)| *k == key) {
            return Parsed::Malformed;
        }
        args.push((key, value));
        at = after;
    }
    let members: Vec<String> = args
        .iter()
        .map(|(k, v)| format!("{}: {v}", python_json_string(k)))
        .collect();
    let arguments = format!("{{{}}}", members.join(", "));
    Parsed::Done((BlockItem::Invoke(name, arguments), at))
}

#[cfg(test)]
mod tests;
