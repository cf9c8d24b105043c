use super::*;
use crate::engine::tokenizer::test_support::tokenizer;
use serde::Deserialize;
use serde_json::json;

fn fixtures_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat")
}

#[derive(Deserialize)]
struct Request {
    messages: Vec<ChatMessage>,
    #[serde(default)]
    tools: Vec<ToolSpec>,
    #[serde(default)]
    options: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct PromptCase {
    name: String,
    request: Request,
    prompt: String,
    token_ids: Vec<u32>,
}

fn options_of(map: &serde_json::Map<String, serde_json::Value>) -> ChatOptions {
    let flag = |k: &str, default: bool| map.get(k).and_then(|v| v.as_bool()).unwrap_or(default);
    let d = ChatOptions::default();
    ChatOptions {
        thinking: flag("thinking", d.thinking),
        add_generation_prompt: flag("add_generation_prompt", d.add_generation_prompt),
        continue_final_message: flag("continue_final_message", d.continue_final_message),
        drop_thinking: flag("drop_thinking", d.drop_thinking),
        reasoning_effort_max: flag("reasoning_effort_max", d.reasoning_effort_max),
    }
}

fn user(text: &str) -> ChatMessage {
    ChatMessage::text(Role::User, text)
}

#[test]
fn prompts_match_official_encoder() {
    let text = std::fs::read_to_string(fixtures_dir().join("prompts.json")).unwrap();
    let cases: Vec<PromptCase> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 10);
    let bos = crate::engine::tokenizer::format::BOS;
    for case in &cases {
        let opts = options_of(&case.request.options);
        let rendered = render_chat(&case.request.messages, &case.request.tools, &opts)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let want = case
            .prompt
            .strip_prefix(bos)
            .expect("fixture prompt starts with BOS");
        assert_eq!(rendered, want, "prompt text of {}", case.name);
        let ids = encode_chat(
            tokenizer(),
            &case.request.messages,
            &case.request.tools,
            &opts,
        )
        .unwrap();
        assert_eq!(ids, case.token_ids, "token ids of {}", case.name);
    }
}

#[test]
fn openai_request_shapes_deserialize() {
    // From text, as a request body is read: `serde_json::Value` (and `json!`) would sort keys
    // before our order-keeping types see them.
    let messages: Vec<ChatMessage> = serde_json::from_str(
        r#"[
        {"role": "system", "content": [{"type": "text", "text": "sys"}]},
        {"role": "user", "content": "hi", "name": "bob"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"b": 1, "a": "x"}}}
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        {"role": "assistant", "content": "done", "tool_calls": null, "reasoning": "r"}
    ]"#,
    )
    .unwrap();
    let call = &messages[2].tool_calls.as_ref().unwrap()[0];
    // An arguments object is kept as JSON text in the client's key order.
    assert_eq!(call.function.arguments, r#"{"b": 1, "a": "x"}"#);
    assert_eq!(messages[4].reasoning_content.as_deref(), Some("r"));
    assert!(messages[4].tool_calls.is_none());

    let tools: Vec<ToolSpec> = serde_json::from_value(json!([
        {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
    ]))
    .unwrap();
    assert_eq!(tools[0].function.name(), "f");
    assert_eq!(tools[0].function.description(), Some("d"));
    assert!(tools[0].function.parameters().is_some());
    let no_name: Result<Vec<ToolSpec>, _> =
        serde_json::from_value(json!([{"type": "function", "function": {"description": "d"}}]));
    assert!(no_name.is_err());
}

#[test]
fn developer_is_rendered_as_system() {
    let dev = vec![ChatMessage::text(Role::Developer, "rules"), user("q")];
    let sys = vec![ChatMessage::text(Role::System, "rules"), user("q")];
    let opts = ChatOptions::default();
    assert_eq!(
        render_chat(&dev, &[], &opts).unwrap(),
        render_chat(&sys, &[], &opts).unwrap()
    );
}

#[test]
fn generation_prompt_can_be_left_out() {
    let msgs = vec![user("q")];
    let mut opts = ChatOptions {
        thinking: false,
        ..ChatOptions::default()
    };
    assert_eq!(
        render_chat(&msgs, &[], &opts).unwrap(),
        "<｜User｜>q<｜Assistant｜></think>"
    );
    opts.add_generation_prompt = false;
    assert_eq!(render_chat(&msgs, &[], &opts).unwrap(), "<｜User｜>q");
}

#[test]
fn bad_conversations_are_clear_errors() {
    let opts = ChatOptions::default();
    assert!(matches!(
        render_chat(&[], &[], &opts),
        Err(ChatError::NoMessages)
    ));

    let image: Vec<ChatMessage> = serde_json::from_value(json!([
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    ]))
    .unwrap();
    let err = render_chat(&image, &[], &opts).unwrap_err().to_string();
    assert!(
        err.contains("messages[0]") && err.contains("image_url"),
        "{err}"
    );

    let list_args: Vec<ChatMessage> = serde_json::from_value(json!([
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "[1]"}}]}
    ]))
    .unwrap();
    let err = render_chat(&list_args, &[], &opts).unwrap_err().to_string();
    assert!(err.contains("JSON object"), "{err}");

    let user_calls: Vec<ChatMessage> = serde_json::from_value(json!([
        {"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}
    ]))
    .unwrap();
    assert!(render_chat(&user_calls, &[], &opts).is_err());

    let tools: Vec<ToolSpec> = serde_json::from_value(json!([
        {"type": "retrieval", "function": {"name": "f"}}
    ]))
    .unwrap();
    assert!(matches!(
        render_chat(&[user("x")], &tools, &opts),
        Err(ChatError::InvalidTool { index: 0, .. })
    ));

    let cont = ChatOptions {
        continue_final_message: true,
        ..opts
    };
    assert!(render_chat(&[user("x")], &[], &cont).is_err());
}

#[test]
fn template_kwargs_follow_vllm() {
    let kw = |v: serde_json::Value| v.as_object().unwrap().clone();
    let mut o = ChatOptions::default();
    o.apply_template_kwargs(&kw(json!({})));
    assert!(o.thinking, "thinking defaults on");
    o.apply_template_kwargs(&kw(json!({"thinking": false})));
    assert!(!o.thinking);
    o.apply_template_kwargs(&kw(json!({"enable_thinking": true})));
    assert!(o.thinking);
    o.apply_template_kwargs(&kw(json!({"thinking": false, "enable_thinking": false})));
    assert!(!o.thinking);
    o.apply_template_kwargs(&kw(
        json!({"drop_thinking": false, "reasoning_effort": "max"}),
    ));
    assert!(!o.drop_thinking && o.reasoning_effort_max);
    o.apply_reasoning_effort("none");
    assert!(!o.thinking && !o.reasoning_effort_max);
}
