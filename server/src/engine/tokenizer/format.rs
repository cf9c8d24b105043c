//! The literal strings of the DeepSeek-V4 prompt format (from the official `encoding_dsv4.py`).
//! Token ids are never derived from these except by a tokenizer lookup.

pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
pub const USER: &str = "<｜User｜>";
pub const ASSISTANT: &str = "<｜Assistant｜>";
pub const THINK_START: &str = "<think>";
pub const THINK_END: &str = "</think>";
pub const DSML: &str = "｜DSML｜";
pub const DSPARK_NOISE: &str = "<｜place▁holder▁no▁799｜>";

/// What separates content from the tool-call block in an assistant turn.
pub const TOOL_CALLS_START: &str = "\n\n<｜DSML｜tool_calls";
pub const TOOL_CALLS_OPEN: &str = "<｜DSML｜tool_calls>";
pub const TOOL_CALLS_CLOSE: &str = "</｜DSML｜tool_calls>";
pub const INVOKE_OPEN: &str = "<｜DSML｜invoke";
pub const INVOKE_CLOSE: &str = "</｜DSML｜invoke>";
pub const PARAMETER_OPEN: &str = "<｜DSML｜parameter";
pub const PARAMETER_CLOSE: &str = "</｜DSML｜parameter>";

pub const TOOL_RESULT_OPEN: &str = "<tool_result>";
pub const TOOL_RESULT_CLOSE: &str = "</tool_result>";

/// Prepended to the first message in thinking mode when the request asks for maximum effort.
pub const REASONING_EFFORT_MAX: &str = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n\
You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n\
Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

/// The `## Tools` block appended to the system text; `{tool_schemas}` is one JSON object per line.
pub const TOOLS_TEMPLATE: &str = "## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name=\"$TOOL_NAME\">
<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name=\"$TOOL_NAME2\">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{tool_schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
";
