use super::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    reasoning: String,
    content: String,
    tool_calls: Vec<ExpectedCall>,
}

#[derive(Deserialize, Debug, PartialEq)]
struct ExpectedCall {
    name: String,
    arguments: String,
}

#[derive(Deserialize)]
struct OutputCase {
    name: String,
    thinking: bool,
    tools: bool,
    completion: String,
    expected: Expected,
}

/// Events of `text` fed in the given pieces, adjacent text events merged.
fn run(thinking: bool, tools: bool, pieces: &[&str]) -> Vec<OutputEvent> {
    let mut p = OutputParser::with_seed(thinking, tools, 7);
    let mut events = Vec::new();
    for piece in pieces {
        for e in p.feed(piece) {
            push_merged(&mut events, e);
        }
    }
    for e in p.finish() {
        push_merged(&mut events, e);
    }
    events
}

fn push_merged(events: &mut Vec<OutputEvent>, e: OutputEvent) {
    match e {
        OutputEvent::Reasoning(t) | OutputEvent::Content(t) if t.is_empty() => {
            panic!("empty text event")
        }
        e @ (OutputEvent::Reasoning(_) | OutputEvent::Content(_)) => push_text(events, e),
        e => events.push(e),
    }
}

fn chars(text: &str) -> Vec<&str> {
    text.char_indices()
        .map(|(i, c)| &text[i..i + c.len_utf8()])
        .collect()
}

/// Splits at pseudo-random char boundaries (deterministic).
fn random_pieces(text: &str, seed: u64) -> Vec<&str> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut pieces = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + rng.random_range(1..12)).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        pieces.push(&text[start..end]);
        start = end;
    }
    pieces
}

/// Every way of feeding `text` we try gives the same events; returns them.
fn parse_all_ways(thinking: bool, tools: bool, text: &str) -> Vec<OutputEvent> {
    let whole = run(thinking, tools, &[text]);
    assert_eq!(
        run(thinking, tools, &chars(text)),
        whole,
        "char by char: {text:?}"
    );
    for seed in 0..5 {
        assert_eq!(
            run(thinking, tools, &random_pieces(text, seed)),
            whole,
            "random split {seed}: {text:?}"
        );
    }
    whole
}

fn summary(events: &[OutputEvent]) -> (String, String, Vec<ExpectedCall>) {
    let (mut reasoning, mut content, mut calls) = (String::new(), String::new(), Vec::new());
    for (i, e) in events.iter().enumerate() {
        match e {
            OutputEvent::Reasoning(t) => reasoning.push_str(t),
            OutputEvent::Content(t) => content.push_str(t),
            OutputEvent::ToolCall {
                index,
                id,
                name,
                arguments_json,
            } => {
                assert_eq!(*index, calls.len(), "event {i}");
                assert!(id.starts_with("call_") && id.len() == 29, "{id}");
                // Arguments are always a JSON object.
                let v: serde_json::Value = serde_json::from_str(arguments_json).unwrap();
                assert!(v.is_object());
                calls.push(ExpectedCall {
                    name: name.clone(),
                    arguments: arguments_json.clone(),
                });
            }
        }
    }
    (reasoning, content, calls)
}

#[test]
fn outputs_match_official_parser_in_any_split() {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chat/outputs.json");
    let cases: Vec<OutputCase> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let events = parse_all_ways(case.thinking, case.tools, &case.completion);
        let (reasoning, content, calls) = summary(&events);
        assert_eq!(reasoning, case.expected.reasoning, "{}", case.name);
        assert_eq!(content, case.expected.content, "{}", case.name);
        assert_eq!(calls, case.expected.tool_calls, "{}", case.name);

        let whole = parse_output(&case.completion, case.thinking, case.tools);
        assert_eq!(whole.reasoning, case.expected.reasoning);
        assert_eq!(whole.content, case.expected.content);
        let names: Vec<&str> = whole.tool_calls.iter().map(|c| c.name.as_str()).collect();
        let want: Vec<&str> = case
            .expected
            .tool_calls
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, want);
    }
}

const CALL: &str = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"true\">x</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";

#[test]
fn think_end_split_across_deltas() {
    let events = run(true, false, &["abc</th", "ink>de"]);
    assert_eq!(
        events,
        vec![
            OutputEvent::Reasoning("abc".into()),
            OutputEvent::Content("de".into())
        ]
    );
    // Reasoning streams before the marker completes; only a possible marker prefix waits.
    let mut p = OutputParser::new(true, false);
    assert_eq!(p.feed("abc</"), vec![OutputEvent::Reasoning("abc".into())]);
    assert!(p.in_reasoning());
    assert_eq!(p.feed("x"), vec![OutputEvent::Reasoning("</x".into())]);
}

#[test]
fn repeated_think_tag_is_dropped_and_unclosed_thinking_is_reasoning() {
    assert_eq!(
        parse_all_ways(true, false, "<think>hmm</think>ok"),
        vec![
            OutputEvent::Reasoning("hmm".into()),
            OutputEvent::Content("ok".into())
        ]
    );
    assert_eq!(
        parse_all_ways(true, true, "still thinking </thi"),
        vec![OutputEvent::Reasoning("still thinking </thi".into())]
    );
    assert_eq!(
        parse_all_ways(true, false, "<thi"),
        vec![OutputEvent::Reasoning("<thi".into())]
    );
}

#[test]
fn content_newlines_are_held_only_until_clear() {
    let mut p = OutputParser::new(false, true);
    assert_eq!(p.feed("para\n"), vec![OutputEvent::Content("para".into())]);
    assert_eq!(
        p.feed("\nnext"),
        vec![OutputEvent::Content("\n\nnext".into())]
    );
    assert_eq!(p.feed("\n"), vec![]);
    assert_eq!(p.finish(), vec![OutputEvent::Content("\n".into())]);
}

#[test]
fn without_tools_dsml_is_content() {
    let text = format!("hi{CALL}");
    assert_eq!(
        parse_all_ways(false, false, &text),
        vec![OutputEvent::Content(text.clone())]
    );
}

#[test]
fn malformed_blocks_fall_back_to_content() {
    for bad in [
        // Bad attribute name.
        "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke nam=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
        // string flag neither true nor false.
        "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"maybe\">x</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
        // Duplicate parameter.
        "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"true\">x</｜DSML｜parameter>\n<｜DSML｜parameter name=\"a\" string=\"true\">y</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
        // Not the block's opening tag.
        "\n\n<｜DSML｜tool_callsX>\n",
        // Junk inside the block.
        "\n\n<｜DSML｜tool_calls>\nsome text\n</｜DSML｜tool_calls>",
        // Cut off mid-invoke (max_tokens).
        "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" str",
    ] {
        let text = format!("Answer.{bad}");
        assert_eq!(
            parse_all_ways(false, true, &text),
            vec![OutputEvent::Content(text.clone())],
            "{bad:?}"
        );
    }
}

#[test]
fn calls_before_a_broken_invoke_are_kept() {
    let text =
        "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n<｜DSML｜oops>";
    let events = parse_all_ways(false, true, text);
    assert!(
        matches!(&events[0], OutputEvent::ToolCall { name, arguments_json, .. }
        if name == "f" && arguments_json == "{}")
    );
    assert_eq!(events[1], OutputEvent::Content("\n<｜DSML｜oops>".into()));
    assert_eq!(events.len(), 2);
}

#[test]
fn lenient_where_harmless() {
    // Non-JSON value flagged string="false" becomes a string; no-parameter invokes with any
    // whitespace; text after the block is content; a truncated block with nothing left is
    // dropped.
    let text = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"g\">\n<｜DSML｜parameter name=\"n\" string=\"false\">not json</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls> trailing";
    let events = parse_all_ways(false, true, text);
    let (_, content, calls) = summary(&events);
    assert_eq!(content, " trailing");
    assert_eq!(calls[0].arguments, "{}");
    assert_eq!(calls[1].arguments, r#"{"n": "not json"}"#);

    let events = parse_all_ways(
        false,
        true,
        "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n",
    );
    assert_eq!(events.len(), 1);
    assert!(matches!(events[0], OutputEvent::ToolCall { .. }));
}

#[test]
fn call_ids_are_unique_and_indexed() {
    let text = CALL.replace(
        "</｜DSML｜invoke>\n",
        "</｜DSML｜invoke>\n<｜DSML｜invoke name=\"g\">\n</｜DSML｜invoke>\n",
    );
    let events = run(false, true, &[&text]);
    let ids: Vec<&String> = events
        .iter()
        .filter_map(|e| match e {
            OutputEvent::ToolCall { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    let mut p1 = OutputParser::new(false, true);
    let mut p2 = OutputParser::new(false, true);
    assert_ne!(
        p1.feed(CALL),
        p2.feed(CALL),
        "random ids differ between requests"
    );
}

#[test]
fn never_panics_on_marker_soup() {
    let atoms = [
        "<think>",
        "</think>",
        "</th",
        "\n\n",
        "\n",
        "<｜DSML｜tool_calls",
        ">",
        "<｜DSML｜invoke",
        " name=\"",
        "\"",
        "<｜DSML｜parameter",
        " string=\"false\"",
        "</｜DSML｜parameter>",
        "</｜DSML｜invoke>",
        "</｜DSML｜tool_calls>",
        "{\"a\":",
        "北",
        "😀",
        "x",
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    for round in 0..300 {
        let n = rng.random_range(1..40);
        let text: String = (0..n)
            .map(|_| atoms[rng.random_range(0..atoms.len())])
            .collect();
        for (thinking, tools) in [(true, true), (false, true), (true, false)] {
            let events = parse_all_ways(thinking, tools, &text);
            if !tools && !thinking {
                assert_eq!(
                    events,
                    vec![OutputEvent::Content(text.clone())],
                    "round {round}"
                );
            }
        }
    }
}
