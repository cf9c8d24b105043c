//! OpenAI chat messages -> DeepSeek-V4 prompt.
//!
//! DeepSeek-V4 ships no Jinja template; the official `encoding_dsv4.py` defines the format and
//! this is a Rust rendering of it (checked against prompts the official script produced, see
//! `server/tests/fixtures/chat/`). Request-level `tools` are attached to the leading system
//! message (or a new empty one) as vLLM does, so the `## Tools` block follows the system text.
//!
//! Deviations, all where the official script has no OpenAI equivalent:
//! - `developer` messages are treated as `system` (OpenAI's meaning; the official script
//!   renders `developer` as an internal search-agent user turn).
//! - Content given as an array of text parts is joined with `\n` (vLLM's flattening) except in
//!   tool results, where the official script joins with `\n\n`. Non-text parts are rejected.
//! - Internal quick-instruction tasks and `latest_reminder` are not exposed.

use super::format;
use super::json::OrderedJson;
use super::{Tokenizer, TokenizerError};
use serde::{Deserialize, Deserializer, Serialize};

/// Why a conversation cannot be encoded. Every variant is the client's fault (HTTP 400)
/// except [`ChatError::Tokenizer`].
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("messages must not be empty")]
    NoMessages,
    #[error("messages[{index}]: {reason}")]
    InvalidMessage { index: usize, reason: String },
    #[error("tools[{index}]: {reason}")]
    InvalidTool { index: usize, reason: String },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

/// Message content: a string or an array of parts (only `text` parts are supported).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl MessageContent {
    /// The text of the content, parts joined with `sep`; an error names an unsupported part.
    fn flatten(&self, sep: &str) -> Result<String, String> {
        match self {
            MessageContent::Text(s) => Ok(s.clone()),
            MessageContent::Parts(parts) => {
                let mut texts = Vec::with_capacity(parts.len());
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => texts.push(t.as_str()),
                        ("text", None) => return Err("a text part has no `text`".into()),
                        (other, _) => {
                            return Err(format!("content part type {other:?} is not supported"))
                        }
                    }
                }
                Ok(texts.join(sep))
            }
        }
    }
}

/// One OpenAI chat message (`role` + the fields that role may carry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    /// Reasoning of an earlier assistant turn (`reasoning_content`, or vLLM's newer `reasoning`).
    #[serde(default, alias = "reasoning", skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// For `role: "tool"`: the id of the call this result answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message with plain text content.
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: Some(MessageContent::Text(content.into())),
            reasoning_content: None,
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// An assistant tool call, OpenAI shape: `{"id", "type": "function", "function": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_kind() -> String {
    "function".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text of the arguments object. Some clients send an object instead of a string;
    /// it is accepted and kept as (order-preserving) JSON text.
    #[serde(deserialize_with = "arguments_text")]
    pub arguments: String,
}

fn arguments_text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match OrderedJson::deserialize(d)? {
        OrderedJson::String(s) => s,
        other => other.to_python_json(),
    })
}

/// An OpenAI tool: `{"type": "function", "function": {"name", "description", "parameters"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    pub function: FunctionSpec,
}

/// A function definition, kept whole and in order: the prompt shows it as the client sent it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct FunctionSpec(OrderedJson);

impl<'de> Deserialize<'de> for FunctionSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = OrderedJson::deserialize(d)?;
        if !matches!(value, OrderedJson::Object(_)) {
            return Err(serde::de::Error::custom("`function` must be an object"));
        }
        if value.get("name").and_then(OrderedJson::as_str).is_none() {
            return Err(serde::de::Error::custom("`function.name` must be a string"));
        }
        Ok(Self(value))
    }
}

impl FunctionSpec {
    pub fn name(&self) -> &str {
        self.0
            .get("name")
            .and_then(OrderedJson::as_str)
            .unwrap_or("")
    }
    pub fn description(&self) -> Option<&str> {
        self.0.get("description").and_then(OrderedJson::as_str)
    }
    pub fn parameters(&self) -> Option<&OrderedJson> {
        self.0.get("parameters")
    }
    pub fn as_json(&self) -> &OrderedJson {
        &self.0
    }
}

/// How to render the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatOptions {
    /// Thinking mode: the generation prompt ends with `<think>` (else `</think>`).
    pub thinking: bool,
    /// End with `<｜Assistant｜>` + `<think>`/`</think>` after a final user/tool message.
    pub add_generation_prompt: bool,
    /// The last message is an assistant prefix to continue: rendered without its EOS.
    pub continue_final_message: bool,
    /// Drop the reasoning of assistant turns before the last user message (ignored, i.e. kept,
    /// when tools are given, as the official encoder does).
    pub drop_thinking: bool,
    /// `reasoning_effort: "max"`: prepend the official maximum-effort instruction (thinking
    /// mode only; other levels add nothing in V4-Flash's encoder).
    pub reasoning_effort_max: bool,
}

impl Default for ChatOptions {
    /// vLLM's defaults for DeepSeek-V4: thinking on unless the request turns it off.
    fn default() -> Self {
        Self {
            thinking: true,
            add_generation_prompt: true,
            continue_final_message: false,
            drop_thinking: true,
            reasoning_effort_max: false,
        }
    }
}

impl ChatOptions {
    /// Applies `chat_template_kwargs` the way vLLM's DeepSeek-V4 tokenizer reads them:
    /// `thinking` / `enable_thinking` (either truthy turns thinking on; if only falsy ones are
    /// present it is off; if neither is present the current value stays), `drop_thinking`,
    /// `reasoning_effort`.
    pub fn apply_template_kwargs(&mut self, kwargs: &serde_json::Map<String, serde_json::Value>) {
        let truthy = |v: &serde_json::Value| match v {
            serde_json::Value::Null => false,
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::Number(n) => n.as_f64() != Some(0.0),
            serde_json::Value::String(s) => !s.is_empty(),
            serde_json::Value::Array(a) => !a.is_empty(),
            serde_json::Value::Object(o) => !o.is_empty(),
        };
        let thinking = kwargs.get("thinking");
        let enable = kwargs.get("enable_thinking");
        if thinking.is_some() || enable.is_some() {
            self.thinking = thinking.is_some_and(truthy) || enable.is_some_and(truthy);
        }
        if let Some(serde_json::Value::Bool(b)) = kwargs.get("drop_thinking") {
            self.drop_thinking = *b;
        }
        if let Some(serde_json::Value::String(effort)) = kwargs.get("reasoning_effort") {
            self.apply_reasoning_effort(effort);
        }
    }

    /// Applies the request's `reasoning_effort`: `"none"` turns thinking off, `"max"` asks for
    /// the maximum-effort instruction, other levels change nothing (as in vLLM + V4-Flash).
    pub fn apply_reasoning_effort(&mut self, effort: &str) {
        match effort {
            "none" => {
                self.thinking = false;
                self.reasoning_effort_max = false;
            }
            "max" => self.reasoning_effort_max = true,
            _ => self.reasoning_effort_max = false,
        }
    }
}

/// Prompt token ids for a conversation: BOS, then the rendered prompt.
pub fn encode_chat(
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
    tools: &[ToolSpec],
    options: &ChatOptions,
) -> Result<Vec<u32>, ChatError> {
    let prompt = render_chat(messages, tools, options)?;
    let mut ids = Vec::with_capacity(prompt.len() / 3 + 2);
    ids.push(tokenizer.special().bos);
    ids.extend(tokenizer.encode(&prompt)?);
    Ok(ids)
}

/// The prompt text for a conversation, without the leading BOS.
pub fn render_chat(
    messages: &[ChatMessage],
    tools: &[ToolSpec],
    options: &ChatOptions,
) -> Result<String, ChatError> {
    if messages.is_empty() {
        return Err(ChatError::NoMessages);
    }
    for (index, tool) in tools.iter().enumerate() {
        if tool.kind != "function" {
            return Err(ChatError::InvalidTool {
                index,
                reason: format!("tool type {:?} is not supported", tool.kind),
            });
        }
    }
    let mut turns = merge_turns(messages, tools)?;
    sort_tool_results_by_call_order(&mut turns);
    let drop_thinking = options.drop_thinking && tools.is_empty();
    if options.continue_final_message {
        match turns.last_mut() {
            Some(last) if last.kind == TurnKind::Assistant => last.without_eos = true,
            _ => {
                return Err(ChatError::InvalidMessage {
                    index: messages.len() - 1,
                    reason: "continue_final_message needs a final assistant message".into(),
                })
            }
        }
    }
    let last_user = turns.iter().rposition(|t| t.kind == TurnKind::User);
    if options.thinking && drop_thinking {
        for (i, turn) in turns.iter_mut().enumerate() {
            if turn.kind == TurnKind::Assistant && last_user.is_some_and(|u| i < u) {
                turn.reasoning = None;
            }
        }
    }

    let mut prompt = String::new();
    for i in 0..turns.len() {
        render_turn(&mut prompt, i, &turns, last_user, drop_thinking, options)?;
    }
    Ok(prompt)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TurnKind {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone)]
enum Block {
    Text(String),
    ToolResult { call_id: String, content: String },
}

/// A message after tool results were merged into user turns (the official `merge_tool_messages`).
#[derive(Debug, Clone)]
struct Turn<'a> {
    kind: TurnKind,
    /// System or assistant text.
    content: String,
    /// User turns: text and tool-result blocks, joined with a blank line.
    blocks: Vec<Block>,
    reasoning: Option<String>,
    tool_calls: &'a [ToolCall],
    tools: &'a [ToolSpec],
    without_eos: bool,
}

impl<'a> Turn<'a> {
    fn new(kind: TurnKind) -> Self {
        Self {
            kind,
            content: String::new(),
            blocks: Vec::new(),
            reasoning: None,
            tool_calls: &[],
            tools: &[],
            without_eos: false,
        }
    }
}

fn merge_turns<'a>(
    messages: &'a [ChatMessage],
    tools: &'a [ToolSpec],
) -> Result<Vec<Turn<'a>>, ChatError> {
    let mut turns: Vec<Turn<'a>> = Vec::with_capacity(messages.len() + 1);
    for (index, msg) in messages.iter().enumerate() {
        let invalid = |reason: String| ChatError::InvalidMessage { index, reason };
        let text = |sep: &str| -> Result<String, ChatError> {
            msg.content
                .as_ref()
                .map(|c| c.flatten(sep))
                .transpose()
                .map(Option::unwrap_or_default)
                .map_err(invalid)
        };
        if msg.role != Role::Assistant && msg.tool_calls.as_ref().is_some_and(|c| !c.is_empty()) {
            return Err(invalid(
                "only assistant messages may carry tool_calls".into(),
            ));
        }
        match msg.role {
            Role::System | Role::Developer => {
                let mut turn = Turn::new(TurnKind::System);
                turn.content = text("\n")?;
                turns.push(turn);
            }
            Role::User | Role::Tool => {
                let block = if msg.role == Role::User {
                    Block::Text(text("\n")?)
                } else {
                    Block::ToolResult {
                        call_id: msg.tool_call_id.clone().unwrap_or_default(),
                        content: text("\n\n")?,
                    }
                };
                // Consecutive user text and tool results share one user turn.
                match turns.last_mut() {
                    Some(last) if last.kind == TurnKind::User => last.blocks.push(block),
                    _ => {
                        let mut turn = Turn::new(TurnKind::User);
                        turn.blocks.push(block);
                        turns.push(turn);
                    }
                }
            }
            Role::Assistant => {
                let mut turn = Turn::new(TurnKind::Assistant);
                turn.content = text("\n")?;
                turn.reasoning = msg.reasoning_content.clone();
                turn.tool_calls = msg.tool_calls.as_deref().unwrap_or(&[]);
                turns.push(turn);
            }
        }
    }
    if !tools.is_empty() {
        match turns.first_mut() {
            Some(first) if first.kind == TurnKind::System => first.tools = tools,
            _ => {
                let mut turn = Turn::new(TurnKind::System);
                turn.tools = tools;
                turns.insert(0, turn);
            }
        }
    }
    Ok(turns)
}

/// Tool results of one user turn follow the order of the calls of the latest assistant turn
/// (the official `sort_tool_results_by_call_order`; unknown ids sort as the first call).
fn sort_tool_results_by_call_order(turns: &mut [Turn<'_>]) {
    let mut call_order: Vec<&str> = Vec::new();
    for turn in turns.iter_mut() {
        match turn.kind {
            TurnKind::Assistant if !turn.tool_calls.is_empty() => {
                call_order = turn
                    .tool_calls
                    .iter()
                    .map(|c| c.id.as_deref().unwrap_or(""))
                    .collect();
            }
            TurnKind::User => {
                let results: Vec<Block> = turn
                    .blocks
                    .iter()
                    .filter(|b| matches!(b, Block::ToolResult { .. }))
                    .cloned()
                    .collect();
                if results.len() < 2 || call_order.iter().all(|id| id.is_empty()) {
                    continue;
                }
                let rank = |b: &Block| match b {
                    Block::ToolResult { call_id, .. } => call_order
                        .iter()
                        .position(|id| !id.is_empty() && id == call_id)
                        .unwrap_or(0),
                    Block::Text(_) => 0,
                };
                let mut sorted = results;
                sorted.sort_by_key(rank);
                let mut sorted = sorted.into_iter();
                for block in turn.blocks.iter_mut() {
                    if matches!(block, Block::ToolResult { .. }) {
                        if let Some(next) = sorted.next() {
                            *block = next;
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

fn render_turn(
    prompt: &mut String,
    index: usize,
    turns: &[Turn<'_>],
    last_user: Option<usize>,
    drop_thinking: bool,
    options: &ChatOptions,
) -> Result<(), ChatError> {
    let turn = &turns[index];
    if index == 0 && options.thinking && options.reasoning_effort_max {
        prompt.push_str(format::REASONING_EFFORT_MAX);
    }
    match turn.kind {
        TurnKind::System => {
            prompt.push_str(&turn.content);
            if !turn.tools.is_empty() {
                prompt.push_str("\n\n");
                prompt.push_str(&render_tools(turn.tools));
            }
        }
        TurnKind::User => {
            prompt.push_str(format::USER);
            for (i, block) in turn.blocks.iter().enumerate() {
                if i > 0 {
                    prompt.push_str("\n\n");
                }
                match block {
                    Block::Text(t) => prompt.push_str(t),
                    Block::ToolResult { content, .. } => {
                        prompt.push_str(format::TOOL_RESULT_OPEN);
                        prompt.push_str(content);
                        prompt.push_str(format::TOOL_RESULT_CLOSE);
                    }
                }
            }
        }
        TurnKind::Assistant => {
            let after_last_user = last_user.is_none_or(|u| index > u);
            if options.thinking && (!drop_thinking || after_last_user) {
                prompt.push_str(turn.reasoning.as_deref().unwrap_or(""));
                prompt.push_str(format::THINK_END);
            }
            prompt.push_str(&turn.content);
            if !turn.tool_calls.is_empty() {
                prompt.push_str(&render_tool_calls(turn.tool_calls, index)?);
            }
            if !turn.without_eos {
                prompt.push_str(format::EOS);
            }
        }
    }

    // The generation prompt follows a user turn that is last or followed by an assistant turn.
    let next_is_assistant = turns.get(index + 1).map(|t| t.kind == TurnKind::Assistant);
    let is_last = next_is_assistant.is_none();
    if turn.kind == TurnKind::User
        && next_is_assistant != Some(false)
        && (!is_last || options.add_generation_prompt)
    {
        prompt.push_str(format::ASSISTANT);
        let open_thinking =
            options.thinking && (!drop_thinking || last_user.is_some_and(|u| index >= u));
        prompt.push_str(if open_thinking {
            format::THINK_START
        } else {
            format::THINK_END
        });
    }
    Ok(())
}

fn render_tools(tools: &[ToolSpec]) -> String {
    let schemas: Vec<String> = tools
        .iter()
        .map(|t| t.function.as_json().to_python_json())
        .collect();
    format::TOOLS_TEMPLATE.replace("{tool_schemas}", &schemas.join("\n"))
}

/// `\n\n<｜DSML｜tool_calls>` ... `</｜DSML｜tool_calls>` for an assistant turn's calls.
fn render_tool_calls(calls: &[ToolCall], index: usize) -> Result<String, ChatError> {
    let mut invokes = Vec::with_capacity(calls.len());
    for call in calls {
        // Arguments that are not JSON are passed as one string parameter, as officially.
        let args = match OrderedJson::parse(&call.function.arguments) {
            Ok(OrderedJson::Object(members)) => members,
            Ok(_) => {
                return Err(ChatError::InvalidMessage {
                    index,
                    reason: format!(
                        "tool call {:?}: arguments must be a JSON object",
                        call.function.name
                    ),
                })
            }
            Err(_) => vec![(
                "arguments".to_string(),
                OrderedJson::String(call.function.arguments.clone()),
            )],
        };
        let params: Vec<String> = args
            .iter()
            .map(|(key, value)| {
                let (is_str, text) = match value {
                    OrderedJson::String(s) => ("true", s.clone()),
                    other => ("false", other.to_python_json()),
                };
                format!(
                    "{} name=\"{key}\" string=\"{is_str}\">{text}{}",
                    format::PARAMETER_OPEN,
                    format::PARAMETER_CLOSE
                )
            })
            .collect();
        invokes.push(format!(
            "{} name=\"{}\">\n{}\n{}",
            format::INVOKE_OPEN,
            call.function.name,
            params.join("\n"),
            format::INVOKE_CLOSE
        ));
    }
    Ok(format!(
        "\n\n{}\n{}\n{}",
        format::TOOL_CALLS_OPEN,
        invokes.join("\n"),
        format::TOOL_CALLS_CLOSE
    ))
}

#[cfg(test)]
mod tests;
